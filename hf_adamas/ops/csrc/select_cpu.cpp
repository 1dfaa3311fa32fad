// Adamas decode ops on CPU, for one decode token:
// - bucket_codes: the bucketize + pack of reference.hadamard_codes, for the keys each step appends.
// - select_by_table: per-byte table lookups over the packed key codes (no unpacking), then an exact
//   top-k with the ranking rules of hf_adamas.ops.reference.select_topk; its plain-PyTorch twin is
//   reference.select_by_table, compared index for index in tests/test_adamas_cpu_select.py.
// - select_by_centroids: the asymmetric rule's table built from the query's Hadamard values and the
//   centroids, then select_by_table; twin reference.centroid_table + reference.select_by_table.
// - rescore_selection: the exact q . k of an estimate's candidates, read in place, and their top-k;
//   twin reference.rescore_selection.
// - sparse_decode_attention: softmax attention over the selected rows only, read in place from the
//   (possibly preallocated, strided) cache; twin reference.sparse_decode_attention.
// - asymmetric_decode_step: the new keys' codes, select_by_centroids (and rescore_selection) and
//   sparse_decode_attention in one call (the default decode step); twin reference.asymmetric_decode_step.
// - tail_decode_attention: the tail estimate (AdamasConfig.value_code_bits), exact over the selection and
//   from the key and value codes elsewhere, in one call; twin reference.tail_decode_attention.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

// The ranking key of reference.select_topk for one position: forced positions first (most recent
// first), then by distance, ties to the more recent position; invalid positions never.
inline int64_t rank_key(int64_t distance, int64_t pos, int64_t seq_len, bool forced, bool valid) {
  if (!valid) return std::numeric_limits<int64_t>::max();
  if (forced) return -1 - pos;
  return distance * seq_len + (seq_len - 1 - pos);
}

// The positions of the `keep` best (smallest) rank keys, ascending, into dst (slots past the keys
// stay as they are: -1). Keys are unique and encode their position, so the selection runs on them.
void write_best_positions(std::vector<int64_t>& keys, int64_t keep, int64_t seq_len, int64_t* dst) {
  const int64_t kept = std::min<int64_t>(keep, keys.size());
  if (kept > 0) std::nth_element(keys.begin(), keys.begin() + (kept - 1), keys.end());
  for (int64_t i = 0; i < kept; ++i) dst[i] = keys[i] < 0 ? -1 - keys[i] : seq_len - 1 - keys[i] % seq_len;
  std::sort(dst, dst + kept);
}

// reference.largest_first: a non-negative integer ranking float32 scores largest first.
inline int64_t largest_first(float score) {
  int32_t bits;
  std::memcpy(&bits, &score, sizeof(bits));
  int64_t ordered = bits < 0 ? -static_cast<int64_t>(bits & 0x7FFFFFFF) : static_cast<int64_t>(bits);
  return (static_cast<int64_t>(1) << 31) - 1 - ordered;
}

// Calls body(std::integral_constant<int64_t, C>{}) with C = columns for the common column counts (a
// compile-time count keeps per-column accumulators in registers), and with C = 0 otherwise (the
// callee reads the count at run time).
template <typename Body>
void with_fixed_columns(int64_t columns, Body&& body) {
  switch (columns) {
    case 1: return body(std::integral_constant<int64_t, 1>{});
    case 2: return body(std::integral_constant<int64_t, 2>{});
    case 3: return body(std::integral_constant<int64_t, 3>{});
    case 4: return body(std::integral_constant<int64_t, 4>{});
    case 8: return body(std::integral_constant<int64_t, 8>{});
    default: return body(std::integral_constant<int64_t, 0>{});
  }
}

// Per key, the sum over its P code bytes of the table entries they pick, for C columns at once.
// Column c of key s goes to scores[c * column_stride + s]: each output row's scores are contiguous.
template <int64_t C>
void score_keys_fixed(const float* tab, const uint8_t* codes, int64_t row_stride, int64_t count,
                      int64_t packed, float* scores, int64_t column_stride) {
  for (int64_t s = 0; s < count; ++s) {
    const uint8_t* row = codes + s * row_stride;
    float acc[C] = {};
    for (int64_t p = 0; p < packed; ++p) {
      const float* entry = tab + (p * 256 + row[p]) * C;
      for (int64_t c = 0; c < C; ++c) acc[c] += entry[c];
    }
    for (int64_t c = 0; c < C; ++c) scores[c * column_stride + s] = acc[c];
  }
}

void score_keys(const float* tab, const uint8_t* codes, int64_t row_stride, int64_t count, int64_t packed,
                int64_t columns, float* scores, int64_t column_stride) {
  with_fixed_columns(columns, [&](auto fixed) {
    constexpr int64_t C = decltype(fixed)::value;
    if constexpr (C > 0) {
      score_keys_fixed<C>(tab, codes, row_stride, count, packed, scores, column_stride);
    } else {
      for (int64_t s = 0; s < count; ++s) {
        const uint8_t* row = codes + s * row_stride;
        for (int64_t c = 0; c < columns; ++c) {
          float acc = 0.0f;
          for (int64_t p = 0; p < packed; ++p) acc += tab[(p * 256 + row[p]) * columns + c];
          scores[c * column_stride + s] = acc;
        }
      }
    }
  });
}

// Per batch row, the forced valid positions (ascending); competes[b * seq_len + s] is 1 where a
// position competes for the budget (valid and not forced). valid may be null: all valid.
std::vector<std::vector<int64_t>> split_positions(const bool* forced, const bool* valid, int64_t batch,
                                                  int64_t seq_len, std::vector<uint8_t>& competes) {
  competes.assign(batch * seq_len, 0);
  std::vector<std::vector<int64_t>> forced_positions(batch);
  for (int64_t i = 0; i < batch * seq_len; ++i) {
    const bool is_valid = valid == nullptr || valid[i];
    competes[i] = is_valid && !forced[i];
    if (is_valid && forced[i]) forced_positions[i / seq_len].push_back(i % seq_len);
  }
  return forced_positions;
}

// Top-k by candidate pruning. Each row's "badness" (the L1 distance, or minus the score: smaller is
// better) is mapped to one of kBuckets buckets by a monotone function of it; a histogram finds the
// bucket that holds the need-th best competing position, and only positions in that bucket or better
// (plus the forced ones) go through the exact nth_element. Every position left out is worse than all
// kept ones and at least `need` are kept, so the result is the exact top-k.
constexpr int64_t kBuckets = 1024;

// Extent (lowest, highest) of the competing positions' badness; penalty is 0 where a position
// competes and +inf where it does not (forced or invalid). Eight independent lanes, so that it
// vectorizes (AVX2 clone where the CPU has it).
__attribute__((target_clones("avx2", "default")))
void badness_extent(const float* scores, const float* penalty, float sign, int64_t n, float* lowest,
                    float* highest) {
  constexpr int64_t kLanes = 8;
  float low[kLanes], high[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) {
    low[j] = std::numeric_limits<float>::infinity();
    high[j] = -low[j];
  }
  int64_t s = 0;
  for (; s + kLanes <= n; s += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const float value = sign * scores[s + j];
      low[j] = std::min(low[j], value + penalty[s + j]);
      high[j] = std::max(high[j], value - penalty[s + j]);
    }
  for (; s < n; ++s) {
    const float value = sign * scores[s];
    low[0] = std::min(low[0], value + penalty[s]);
    high[0] = std::max(high[0], value - penalty[s]);
  }
  *lowest = *std::min_element(low, low + kLanes);
  *highest = *std::max_element(high, high + kLanes);
}

// Bucket of each position (kBuckets for positions that do not compete), into buckets[].
__attribute__((target_clones("avx2", "default")))
void badness_buckets(const float* scores, const float* penalty, float sign, float lowest, float scale, int64_t n,
                     int32_t* buckets) {
  for (int64_t s = 0; s < n; ++s) {
    const float scaled = (sign * scores[s] - lowest) * scale + penalty[s];  // +inf stays +inf if scale is 0
    buckets[s] = static_cast<int32_t>(std::min(scaled, static_cast<float>(kBuckets)));
  }
}

// q . k for head_dim a multiple of 16 (check_head_dim: a power of two >= 16), in 16 independent
// partial sums so that the compiler vectorizes it without reassociating a single running sum.
inline float dot(const float* q, const float* k, int64_t dim) {
  float partial[16] = {};
  for (int64_t d = 0; d < dim; d += 16)
    for (int64_t j = 0; j < 16; ++j) partial[j] += q[d + j] * k[d + j];
  float total = 0.0f;
  for (int64_t j = 0; j < 16; ++j) total += partial[j];
  return total;
}

// q . k in double, for head_dim a multiple of 16, in 8 independent partial sums (vectorizable): it
// rounds to the same float32 as any other double summation order, but for a tie within 1e-16.
__attribute__((target_clones("avx2", "default")))
double dot_double(const double* q, const float* k, int64_t dim) {
  double partial[8] = {};
  for (int64_t d = 0; d < dim; d += 8)
    for (int64_t j = 0; j < 8; ++j) partial[j] += q[d + j] * static_cast<double>(k[d + j]);
  double total = 0.0;
  for (int64_t j = 0; j < 8; ++j) total += partial[j];
  return total;
}

// Selected rows are scattered over the cache: ask for a row a few iterations before it is read.
constexpr int64_t kAhead = 16;
inline void prefetch_row(const float* row, int64_t dim) {
  for (int64_t d = 0; d < dim; d += 16) __builtin_prefetch(row + d);
}

}  // namespace

// table: float32 [B, Hkv, P, 256, C]; codes: uint8 [B, Hkv, S, P] (last dim contiguous, any row stride);
// forced / valid: bool [B, S] (valid may be empty = all valid). largest: rank scores largest first
// (asymmetric) instead of smallest distance first (the L1 table of small integers).
// Returns int64 [B, Hkv * C, budget]: ascending positions, -1 where no valid position is left.
torch::Tensor select_by_table(torch::Tensor table, torch::Tensor codes, int64_t budget, torch::Tensor forced,
                              torch::Tensor valid, bool largest) {
  TORCH_CHECK(table.dtype() == torch::kFloat32 && table.dim() == 5 && table.is_contiguous(),
              "table must be contiguous float32 [B, Hkv, P, 256, C]");
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.dim() == 4 && codes.stride(3) == 1,
              "codes must be uint8 [B, Hkv, S, P] with contiguous bytes");
  const int64_t batch = codes.size(0), kv_heads = codes.size(1), seq_len = codes.size(2), packed = codes.size(3);
  const int64_t columns = table.size(4);
  TORCH_CHECK(table.size(0) == batch && table.size(1) == kv_heads && table.size(2) == packed && table.size(3) == 256,
              "table and codes disagree in shape");
  TORCH_CHECK(budget >= 1, "budget must be >= 1");
  TORCH_CHECK(forced.dtype() == torch::kBool && forced.is_contiguous() && forced.size(0) == batch &&
                  forced.size(1) == seq_len, "forced must be contiguous bool [B, S]");
  const bool has_valid = valid.numel() > 0;
  TORCH_CHECK(!has_valid || (valid.dtype() == torch::kBool && valid.is_contiguous() && valid.size(0) == batch &&
                             valid.size(1) == seq_len), "valid must be contiguous bool [B, S] or empty");

  auto out = torch::full({batch, kv_heads * columns, budget}, -1, torch::kInt64);
  const float* table_ptr = table.data_ptr<float>();
  const uint8_t* codes_ptr = codes.data_ptr<uint8_t>();
  const bool* forced_ptr = forced.data_ptr<bool>();
  const bool* valid_ptr = has_valid ? valid.data_ptr<bool>() : nullptr;
  int64_t* out_ptr = out.data_ptr<int64_t>();
  const int64_t cs0 = codes.stride(0), cs1 = codes.stride(1), cs2 = codes.stride(2);
  const int64_t keep = std::min(budget, seq_len);

  // Scores of every (batch, KV head, key), in chunks of keys so that all threads share the work;
  // output row (bh, c) holds its seq_len scores contiguously.
  constexpr int64_t kChunk = 1024;
  const int64_t chunks = (seq_len + kChunk - 1) / kChunk;
  // Reused across calls (one buffer per calling thread): a fresh vector of this size would be
  // zero-filled and, above the allocator's mmap threshold, page-faulted in on every decode step.
  // Worker threads must reach it through this pointer: inside the lambdas the name `buffer` would
  // be each worker's own (empty) thread_local.
  static thread_local std::vector<float> buffer;
  buffer.resize(std::max<size_t>(buffer.size(), batch * kv_heads * columns * seq_len));
  float* const scores = buffer.data();
  at::parallel_for(0, batch * kv_heads * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / chunks, first = (item % chunks) * kChunk;
      const int64_t b = bh / kv_heads, h = bh % kv_heads;
      const uint8_t* key_codes = codes_ptr + b * cs0 + h * cs1 + first * cs2;
      score_keys(table_ptr + bh * packed * 256 * columns, key_codes, cs2, std::min(kChunk, seq_len - first),
                 packed, columns, scores + bh * columns * seq_len + first, seq_len);
    }
  });
  // Per batch row: which positions compete for the budget (penalty 0), and the forced valid ones.
  std::vector<uint8_t> competes;
  const auto forced_positions = split_positions(forced_ptr, valid_ptr, batch, seq_len, competes);
  std::vector<float> penalty(batch * seq_len);
  for (int64_t i = 0; i < batch * seq_len; ++i)
    penalty[i] = competes[i] ? 0.0f : std::numeric_limits<float>::infinity();
  const float sign = largest ? -1.0f : 1.0f;
  // Then the exact top-k of each output row (query head, or KV group), on the pruned candidates.
  at::parallel_for(0, batch * kv_heads * columns, 1, [&](int64_t begin, int64_t end) {
    static thread_local std::vector<int32_t> buckets, histogram(kBuckets + 1);
    static thread_local std::vector<int64_t> keys;
    buckets.resize(std::max<size_t>(buckets.size(), seq_len));
    keys.reserve(seq_len);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (kv_heads * columns);
      const float* row_scores = scores + row * seq_len;
      const float* row_penalty = penalty.data() + b * seq_len;
      auto rank = [&](int64_t s, bool is_forced) {
        const float score = row_scores[s];
        return rank_key(largest ? largest_first(score) : static_cast<int64_t>(score), s, seq_len, is_forced, true);
      };
      keys.clear();
      for (const int64_t s : forced_positions[b]) keys.push_back(rank(s, true));
      const int64_t need = keep - static_cast<int64_t>(keys.size());
      float lowest, highest;
      badness_extent(row_scores, row_penalty, sign, seq_len, &lowest, &highest);
      if (need > 0 && lowest <= highest) {  // some position competes
        // The best competing position lands in bucket 0, the worst in kBuckets - 1 (at most).
        const float scale = highest > lowest ? static_cast<float>(kBuckets - 1) / (highest - lowest) : 0.0f;
        badness_buckets(row_scores, row_penalty, sign, lowest, scale, seq_len, buckets.data());
        std::fill(histogram.begin(), histogram.end(), 0);
        for (int64_t s = 0; s < seq_len; ++s) ++histogram[buckets[s]];
        int64_t cutoff = 0, seen = histogram[0];
        while (seen < need && cutoff < kBuckets - 1) seen += histogram[++cutoff];
        for (int64_t s = 0; s < seq_len; ++s)
          if (buckets[s] <= cutoff) keys.push_back(rank(s, false));
      }
      write_best_positions(keys, keep, seq_len, out_ptr + row * budget);
    }
  });
  return out;
}

// ---------------------------------------------------------------- the asymmetric rule, fast-scanned
//
// select_by_centroids ranks keys exactly as reference.centroid_table + reference.select_by_table do,
// but never scores most keys exactly. A key's score is a sum over its 2 * P code nibbles (4 bits:
// 2 dimensions at 2 bits, 4 at 1 bit) of a term the query and the centroids fix, so it has a cheap
// estimate: each nibble's 16 terms quantized to uint8 on one scale, summed per key in uint16 with
// byte shuffles over 32 keys at a time (AVX2 "fast scan", as FAISS' PQ fast scan; a portable loop
// elsewhere gives the same integers). The estimate is within a known bound of the exact float32
// score, so every key that can be in the exact top-k is within twice that bound of the need-th best
// estimate; only those candidates get the exact score, and the exact top-k runs on them.

namespace {

constexpr int64_t kBlock = 32;  // keys per fast-scan block
constexpr int64_t kNibble = 16;  // terms per nibble

// Per query head g of one KV head and byte p, the double sums of the terms of its low (side 0) and
// high (side 1) nibble's codes, q_hat * centroid: halves[((g * packed + p) * 2 + side) * 16 + v].
void centroid_halves(const float* q_hat, const float* centroids, int64_t bits, int64_t group, int64_t dim,
                     double* halves) {
  const int64_t per = 8 / bits, packed = dim / per, half_codes = per / 2, levels = int64_t{1} << bits;
  for (int64_t g = 0; g < group; ++g)
    for (int64_t p = 0; p < packed; ++p)
      for (int64_t side = 0; side < 2; ++side) {
        const float* q = q_hat + g * dim + p * per + side * half_codes;
        double* out = halves + ((g * packed + p) * 2 + side) * kNibble;
        for (int64_t v = 0; v < kNibble; ++v) {
          double total = 0.0;
          for (int64_t m = 0; m < half_codes; ++m)
            total += static_cast<double>(q[m]) * static_cast<double>(centroids[(v >> (bits * m)) & (levels - 1)]);
          out[v] = total;
        }
      }
}

// The float32 byte table of reference.centroid_table for the query heads [first, first + heads) of
// a KV head (one head, or a whole group summed in float32, g in order): table[p * 256 + v].
__attribute__((target_clones("avx2", "default")))
void byte_table(const double* halves, int64_t packed, int64_t first, int64_t heads, float* table) {
  for (int64_t p = 0; p < packed; ++p)
    for (int64_t g = first; g < first + heads; ++g) {
      const double* low = halves + (g * packed + p) * 2 * kNibble;
      const double* high = low + kNibble;
      for (int64_t hv = 0; hv < kNibble; ++hv) {
        float* entry = table + p * 256 + hv * kNibble;  // byte v = 16 hv + lv
        for (int64_t lv = 0; lv < kNibble; ++lv) {
          const float value = static_cast<float>(low[lv] + high[hv]);
          entry[lv] = g == first ? value : entry[lv] + value;
        }
      }
    }
}

// Exact scores of keys `positions[0..count)`: each key's byte entries summed in order in float32
// (as select_by_table), eight keys at a time so that their addition chains overlap.
void exact_scores(const float* table, const uint8_t* codes, int64_t row_stride, int64_t packed,
                  const int64_t* positions, int64_t count, float* scores) {
  constexpr int64_t kLanes = 8;
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    const uint8_t* rows[kLanes];
    float totals[kLanes] = {};
    for (int64_t j = 0; j < kLanes; ++j) rows[j] = codes + positions[i + j] * row_stride;
    for (int64_t p = 0; p < packed; ++p)
      for (int64_t j = 0; j < kLanes; ++j) totals[j] += table[p * 256 + rows[j][p]];
    for (int64_t j = 0; j < kLanes; ++j) scores[i + j] = totals[j];
  }
  for (; i < count; ++i) {
    const uint8_t* row = codes + positions[i] * row_stride;
    float total = 0.0f;
    for (int64_t p = 0; p < packed; ++p) total += table[p * 256 + row[p]];
    scores[i] = total;
  }
}

// How a row's uint16 estimates stand for its scores: score ~ offset + step * estimate, to within
// `bound` estimate units of the exact float32 score.
struct EstimateGrid {
  double bound, step, offset;
};

// The score a row's estimate stands for, in float32 (reference.quantized_centroid_scores).
inline float estimate_score(const EstimateGrid& grid, uint32_t estimate) {
  return static_cast<float>(grid.offset) + static_cast<float>(grid.step) * static_cast<float>(estimate);
}

// The uint8 nibble tables of one output row, luts[n * 16 + v] for nibble n = 2 p + side: each
// nibble's terms minus their lowest, on one grid of `step` = widest range / 255 (nearest, ties to
// even); `offset` is the sum of the lowest terms (twin: reference.quantized_centroid_scores).
EstimateGrid quantized_tables(const double* halves, int64_t packed, int64_t first, int64_t heads, uint8_t* luts) {
  const int64_t nibbles = 2 * packed;
  std::vector<double> terms(nibbles * kNibble, 0.0), lowest(nibbles);
  double widest = 0.0, magnitude = 0.0;
  for (int64_t n = 0; n < nibbles; ++n) {
    double low = std::numeric_limits<double>::infinity(), high = -low, largest_abs = 0.0;
    for (int64_t v = 0; v < kNibble; ++v) {
      double total = 0.0;
      for (int64_t g = first; g < first + heads; ++g) {
        const double term = halves[(g * packed + n / 2) * 2 * kNibble + (n % 2) * kNibble + v];
        total += term;
        largest_abs = std::max(largest_abs, std::abs(term));
      }
      terms[n * kNibble + v] = total;
      low = std::min(low, total);
      high = std::max(high, total);
    }
    lowest[n] = low;
    widest = std::max(widest, high - low);
    magnitude += heads * largest_abs;
  }
  const double scale = widest > 0.0 ? 255.0 / widest : 0.0;
  double offset = 0.0;
  for (int64_t n = 0; n < nibbles; ++n) offset += lowest[n];
  for (int64_t i = 0; i < nibbles * kNibble; ++i)
    luts[i] = static_cast<uint8_t>(std::min(255.0, std::nearbyint((terms[i] - lowest[i / kNibble]) * scale)));
  // Rounding each term to the grid moves a key's estimate by at most nibbles / 2; the float32
  // roundings of the exact score (per head and byte, across a group, across bytes) by far less than
  // 2**-22 * (packed + heads + 2) of the terms' magnitudes. Generous on both, to stay a bound.
  const double float_error = magnitude * static_cast<double>(packed + heads + 2) * std::ldexp(1.0, -22);
  return {0.5 * static_cast<double>(nibbles) * 1.001 + float_error * scale + 1e-6, widest / 255.0, offset};
}

// One key's estimate: the sum over its nibbles n of lut[n][nibble n of the key's `packed` bytes].
inline uint32_t nibble_estimate(const uint8_t* lut, const uint8_t* row, int64_t packed) {
  uint32_t total = 0;
  for (int64_t p = 0; p < packed; ++p)
    total += lut[(2 * p) * kNibble + (row[p] & 15)] + lut[(2 * p + 1) * kNibble + (row[p] >> 4)];
  return total;
}

// Estimates of 32 keys (rows of `packed` bytes, `stride` bytes apart) for `columns` output rows:
// out[c * 32 + i] = sum over nibbles n of luts[c][n][nibble n of key i].
void scan_block_portable(const uint8_t* rows, int64_t stride, int64_t packed, const uint8_t* luts,
                         int64_t columns, uint16_t* out) {
  for (int64_t c = 0; c < columns; ++c)
    for (int64_t i = 0; i < kBlock; ++i)
      out[c * kBlock + i] =
          static_cast<uint16_t>(nibble_estimate(luts + c * 2 * packed * kNibble, rows + i * stride, packed));
}

// The rows of a block of `count` <= 32 keys as the scans read them (`padded` bytes each): in place
// when the block is whole and rows need no padding, else copied into `scratch` (32 * padded bytes,
// zero past each row's `packed` bytes); `stride` is set to the rows' distance.
const uint8_t* scan_rows(const uint8_t* rows, int64_t row_stride, int64_t count, int64_t packed, int64_t padded,
                         uint8_t* scratch, int64_t& stride) {
  stride = row_stride;
  if (count == kBlock && packed == padded) return rows;
  for (int64_t i = 0; i < count; ++i) std::memcpy(scratch + i * padded, rows + i * row_stride, packed);
  stride = padded;
  return scratch;
}

// The same integers with AVX2 byte shuffles; rows readable to `padded` bytes (a multiple of 16).
// C > 0 fixes the column count at compile time (registers instead of arrays); C = 0 reads `columns`.
constexpr int64_t kMaxColumns = 16;
template <int64_t C>
__attribute__((target("avx2")))
void scan_block_avx2(const uint8_t* rows, int64_t stride, int64_t padded, int64_t packed, const uint8_t* luts,
                     int64_t runtime_columns, uint16_t* out) {
  const int64_t columns = C > 0 ? C : runtime_columns;
  __m256i even[C > 0 ? C : kMaxColumns], odd[C > 0 ? C : kMaxColumns];  // uint16 sums: FAISS' byte-lane split
  for (int64_t c = 0; c < columns; ++c) even[c] = odd[c] = _mm256_setzero_si256();
  const __m256i low_nibble = _mm256_set1_epi8(0x0F);
  for (int64_t chunk = 0; chunk < padded; chunk += 16) {
    // 16 bytes of keys i (low lane) and 16 + i (high lane), transposed in four unpack rounds so
    // that column[p] holds byte chunk + p of keys 0-15 (low lane) and 16-31 (high lane).
    __m256i column[16], next[16];
    for (int64_t i = 0; i < 16; ++i)
      column[i] = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(rows + (16 + i) * stride + chunk),
                                      reinterpret_cast<const __m128i*>(rows + i * stride + chunk));
    for (int64_t i = 0; i < 8; ++i) {  // word w of next[i]: byte w of keys 2i, 2i+1 (next[8 + i]: byte 8 + w)
      next[i] = _mm256_unpacklo_epi8(column[2 * i], column[2 * i + 1]);
      next[8 + i] = _mm256_unpackhi_epi8(column[2 * i], column[2 * i + 1]);
    }
    for (int64_t j = 0; j < 4; ++j) {  // dword d of column[4j + q]: byte 4q + d of keys 4j..4j+3
      column[4 * j] = _mm256_unpacklo_epi16(next[2 * j], next[2 * j + 1]);
      column[4 * j + 1] = _mm256_unpackhi_epi16(next[2 * j], next[2 * j + 1]);
      column[4 * j + 2] = _mm256_unpacklo_epi16(next[8 + 2 * j], next[9 + 2 * j]);
      column[4 * j + 3] = _mm256_unpackhi_epi16(next[8 + 2 * j], next[9 + 2 * j]);
    }
    for (int64_t k = 0; k < 2; ++k)  // qword e of next[8k + 2q + r]: byte 4q + 2r + e of keys 8k..8k+7
      for (int64_t q = 0; q < 4; ++q) {
        next[8 * k + 2 * q] = _mm256_unpacklo_epi32(column[8 * k + q], column[8 * k + 4 + q]);
        next[8 * k + 2 * q + 1] = _mm256_unpackhi_epi32(column[8 * k + q], column[8 * k + 4 + q]);
      }
    for (int64_t i = 0; i < 8; ++i) {  // column[2i + e]: byte 2i + e of keys 0-15
      column[2 * i] = _mm256_unpacklo_epi64(next[i], next[8 + i]);
      column[2 * i + 1] = _mm256_unpackhi_epi64(next[i], next[8 + i]);
    }
    for (int64_t p = 0; p < 16 && chunk + p < packed; ++p) {
      const __m256i low = _mm256_and_si256(column[p], low_nibble);
      const __m256i high = _mm256_and_si256(_mm256_srli_epi16(column[p], 4), low_nibble);
      for (int64_t c = 0; c < columns; ++c) {
        const uint8_t* lut = luts + (c * 2 * packed + 2 * (chunk + p)) * kNibble;
        const __m256i low_terms = _mm256_shuffle_epi8(
            _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut))), low);
        const __m256i high_terms = _mm256_shuffle_epi8(
            _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut + kNibble))), high);
        even[c] = _mm256_add_epi16(even[c], _mm256_add_epi16(low_terms, high_terms));
        odd[c] = _mm256_add_epi16(odd[c], _mm256_add_epi16(_mm256_srli_epi16(low_terms, 8),
                                                          _mm256_srli_epi16(high_terms, 8)));
      }
    }
  }
  for (int64_t c = 0; c < columns; ++c) {
    // even[c] summed whole uint16 lanes: the even key's terms plus 256 times the odd key's.
    const __m256i even_keys = _mm256_sub_epi16(even[c], _mm256_slli_epi16(odd[c], 8));
    const __m256i first = _mm256_unpacklo_epi16(even_keys, odd[c]);   // keys 0-7 | 16-23
    const __m256i second = _mm256_unpackhi_epi16(even_keys, odd[c]);  // keys 8-15 | 24-31
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c * kBlock), _mm256_permute2x128_si256(first, second, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c * kBlock + 16),
                        _mm256_permute2x128_si256(first, second, 0x31));
  }
}

void scan_block(bool simd, const uint8_t* rows, int64_t stride, int64_t padded, int64_t packed, const uint8_t* luts,
                int64_t columns, uint16_t* out) {
  if (!simd) return scan_block_portable(rows, stride, packed, luts, columns, out);
  with_fixed_columns(columns, [&](auto fixed) {
    scan_block_avx2<decltype(fixed)::value>(rows, stride, padded, packed, luts, columns, out);
  });
}

// How many of the n estimates are >= threshold (vectorizes).
__attribute__((target_clones("avx2", "default")))
int64_t count_at_least(const uint16_t* estimates, int64_t n, uint16_t threshold) {
  int32_t total = 0;
  for (int64_t s = 0; s < n; ++s) total += estimates[s] >= threshold;
  return total;
}

// Appends the positions s with estimates[s] >= floor to out[count..) and returns the new count;
// runs of 16 positions without one are skipped on a vectorized test. Writes out[count] once past.
__attribute__((target_clones("avx2", "default")))
int64_t collect_at_least(const uint16_t* estimates, int64_t n, uint16_t floor, int64_t* out, int64_t count) {
  constexpr int64_t kRun = 16;
  int64_t s = 0;
  for (; s + kRun <= n; s += kRun) {
    bool any = false;
    for (int64_t j = 0; j < kRun; ++j) any |= estimates[s + j] >= floor;
    if (!any) continue;
    for (int64_t j = 0; j < kRun; ++j) {
      out[count] = s + j;
      count += estimates[s + j] >= floor;
    }
  }
  for (; s < n; ++s) {
    out[count] = s;
    count += estimates[s] >= floor;
  }
  return count;
}

}  // namespace

// q_hat: float32 [B, Hq, D] contiguous (the query's Hadamard values); codes: uint8 [B, Hkv, S, P];
// centroids: float32 [Hkv, 2**bits] contiguous; forced / valid as select_by_table. The exact
// selection of reference.centroid_table (entry (p, v, g): the float32 rounding of the double sum
// of q_hat[g, p * per + m] * centroids[code m of byte v]; with `shared` the G tables summed in
// float32, g in order) + reference.select_by_table(largest=True), by the fast scan above.
// `portable` uses the plain loop instead of AVX2 (the same integers; for tests).
torch::Tensor select_by_centroids(torch::Tensor q_hat, torch::Tensor codes, torch::Tensor centroids, int64_t bits,
                                  bool shared, int64_t budget, torch::Tensor forced, torch::Tensor valid,
                                  bool portable) {
  TORCH_CHECK(q_hat.dtype() == torch::kFloat32 && q_hat.dim() == 3 && q_hat.is_contiguous(),
              "q_hat must be contiguous float32 [B, Hq, D]");
  TORCH_CHECK(centroids.dtype() == torch::kFloat32 && centroids.dim() == 2 && centroids.is_contiguous(),
              "centroids must be contiguous float32 [Hkv, 2**bits]");
  TORCH_CHECK(bits == 1 || bits == 2, "bits must be 1 or 2");
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.dim() == 4 && codes.stride(3) == 1,
              "codes must be uint8 [B, Hkv, S, P] with contiguous bytes");
  const int64_t batch = q_hat.size(0), q_heads = q_hat.size(1), dim = q_hat.size(2);
  const int64_t kv_heads = codes.size(1), seq_len = codes.size(2), packed = dim * bits / 8;
  TORCH_CHECK(codes.size(0) == batch && codes.size(3) == packed && q_heads % kv_heads == 0 &&
                  centroids.size(0) == kv_heads && centroids.size(1) == (int64_t{1} << bits),
              "q_hat, codes and centroids disagree in shape");
  TORCH_CHECK(budget >= 1, "budget must be >= 1");
  TORCH_CHECK(forced.dtype() == torch::kBool && forced.is_contiguous() && forced.size(0) == batch &&
                  forced.size(1) == seq_len, "forced must be contiguous bool [B, S]");
  const bool has_valid = valid.numel() > 0;
  TORCH_CHECK(!has_valid || (valid.dtype() == torch::kBool && valid.is_contiguous() && valid.size(0) == batch &&
                             valid.size(1) == seq_len), "valid must be contiguous bool [B, S] or empty");
  const int64_t group = q_heads / kv_heads, columns = shared ? 1 : group, nibbles = 2 * packed;
  // Estimates are uint16 sums of `nibbles` bytes; beyond that (head_dim > 512) every key is a candidate.
  const bool estimate = nibbles * 255 < 65536 && columns <= 16;
  const bool simd = !portable && __builtin_cpu_supports("avx2");
  const int64_t padded = (packed + 15) / 16 * 16;  // the AVX2 scan reads whole 16-byte chunks
  const int64_t rows = batch * kv_heads * columns, keep = std::min(budget, seq_len);
  auto out = torch::full({batch, rows / batch, budget}, -1, torch::kInt64);
  const float* q_ptr = q_hat.data_ptr<float>();
  const float* c_ptr = centroids.data_ptr<float>();
  const uint8_t* codes_ptr = codes.data_ptr<uint8_t>();
  const bool* forced_ptr = forced.data_ptr<bool>();
  const bool* valid_ptr = has_valid ? valid.data_ptr<bool>() : nullptr;
  int64_t* out_ptr = out.data_ptr<int64_t>();
  const int64_t cs0 = codes.stride(0), cs1 = codes.stride(1), cs2 = codes.stride(2);

  // Per (batch, KV head): the double halves; per output row: its uint8 tables and estimate bound.
  const int64_t halves_size = group * packed * 2 * kNibble;
  std::vector<double> halves(batch * kv_heads * halves_size), bounds(rows);
  std::vector<uint8_t> luts(rows * nibbles * kNibble);
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / kv_heads, h = bh % kv_heads;
      double* own = halves.data() + bh * halves_size;
      centroid_halves(q_ptr + (b * q_heads + h * group) * dim, c_ptr + h * (int64_t{1} << bits), bits, group, dim,
                      own);
      for (int64_t c = 0; c < columns; ++c)
        bounds[bh * columns + c] = quantized_tables(own, packed, shared ? 0 : c, shared ? group : 1,
                                                    luts.data() + (bh * columns + c) * nibbles * kNibble).bound;
    }
  });

  // Per batch row: which positions compete for the budget, and the forced valid ones.
  std::vector<uint8_t> competes;
  const auto forced_positions = split_positions(forced_ptr, valid_ptr, batch, seq_len, competes);

  // Estimates of every (batch, KV head, key), plus 1 where the position competes and 0 where it does
  // not, in chunks of keys so that all threads share the work. Reused across calls (one buffer per
  // calling thread), reached by the workers through this pointer.
  static thread_local std::vector<uint16_t> buffer;
  constexpr int64_t kChunk = 1024;
  const int64_t chunks = (seq_len + kChunk - 1) / kChunk;
  if (estimate) {
    buffer.resize(std::max<size_t>(buffer.size(), rows * seq_len));
    uint16_t* const estimates = buffer.data();
    at::parallel_for(0, batch * kv_heads * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> tail(kBlock * padded, 0);  // a short or narrow block, zero-padded
      std::vector<uint16_t> block(kBlock * columns);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bh = item / chunks, first = (item % chunks) * kChunk;
        const int64_t b = bh / kv_heads, h = bh % kv_heads, last = std::min(seq_len, first + kChunk);
        const uint8_t* head_luts = luts.data() + bh * columns * nibbles * kNibble;
        for (int64_t s = first; s < last; s += kBlock) {
          const int64_t count = std::min(kBlock, last - s);
          int64_t stride;
          const uint8_t* rows_ptr =
              scan_rows(codes_ptr + b * cs0 + h * cs1 + s * cs2, cs2, count, packed, padded, tail.data(), stride);
          scan_block(simd, rows_ptr, stride, padded, packed, head_luts, columns, block.data());
          const uint8_t* block_competes = competes.data() + b * seq_len + s;
          for (int64_t c = 0; c < columns; ++c) {
            uint16_t* dst = estimates + (bh * columns + c) * seq_len + s;
            for (int64_t i = 0; i < count; ++i)  // competes is 0 or 1: a select without a branch (vectorizes)
              dst[i] = static_cast<uint16_t>((block[c * kBlock + i] + 1) * block_competes[i]);
          }
        }
      }
    });
  }
  const uint16_t* const estimates = buffer.data();

  // Per output row: the candidates within twice the bound of a lower bound on the need-th best
  // estimate (a bisection on vectorized counts, to within 16), scored exactly, and the exact top-k
  // among them and the forced positions, written in ascending order.
  constexpr int64_t kResolution = 16;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> table(packed * 256), scores(seq_len);
    std::vector<int64_t> keys(seq_len), selected, picked, candidates(seq_len + 1);  // + 1: see collect_at_least
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / columns, c = row % columns, b = bh / kv_heads, h = bh % kv_heads;
      byte_table(halves.data() + bh * halves_size, packed, shared ? 0 : c, shared ? group : 1, table.data());
      const uint8_t* head_codes = codes_ptr + b * cs0 + h * cs1;
      const std::vector<int64_t>& row_forced = forced_positions[b];
      const int64_t forced_count = static_cast<int64_t>(row_forced.size());
      std::copy(row_forced.begin(), row_forced.end(), candidates.begin());
      int64_t count = forced_count;  // candidates[0..count): the forced, then the competing ones kept
      const int64_t need = keep - count;
      if (need > 0 && estimate) {
        const uint16_t* row_estimates = estimates + row * seq_len;
        // count(>= low) >= need > count(>= high): the need-th best estimate is in [low, high).
        int64_t low = 1, high = nibbles * 255 + 2;
        while (high - low > kResolution) {
          const int64_t middle = (low + high) / 2;
          if (count_at_least(row_estimates, seq_len, static_cast<uint16_t>(middle)) >= need)
            low = middle;
          else
            high = middle;
        }
        const int64_t floor = std::max<int64_t>(1, low - static_cast<int64_t>(std::floor(2.0 * bounds[row])) - 1);
        count = collect_at_least(row_estimates, seq_len, static_cast<uint16_t>(floor), candidates.data(), count);
      } else if (need > 0) {
        const uint8_t* row_competes = competes.data() + b * seq_len;
        for (int64_t s = 0; s < seq_len; ++s) {
          candidates[count] = s;
          count += row_competes[s];
        }
      }
      exact_scores(table.data(), head_codes, cs2, packed, candidates.data(), count, scores.data());
      for (int64_t i = 0; i < count; ++i)
        keys[i] = rank_key(largest_first(scores[i]), candidates[i], seq_len, i < forced_count, true);
      const int64_t kept = std::min(keep, count);
      if (kept == 0) continue;
      selected.assign(keys.begin(), keys.begin() + count);
      std::nth_element(selected.begin(), selected.begin() + (kept - 1), selected.end());
      const int64_t worst = selected[kept - 1];  // rank keys are unique: exactly `kept` are <= worst
      // The kept positions ascending: the forced ones and the competing ones (each ascending) merged.
      picked.clear();
      for (int64_t i = 0; i < count; ++i)
        if (keys[i] <= worst) picked.push_back(candidates[i]);
      const auto split = picked.begin() + std::count_if(keys.begin(), keys.begin() + forced_count,
                                                       [&](int64_t key) { return key <= worst; });
      std::merge(picked.begin(), split, split, picked.end(), out_ptr + row * budget);
    }
  });
  return out;
}

// x_hat: float32 [N, D] contiguous (Hadamard values); thresholds: float32 [2**bits - 1] contiguous.
// Returns uint8 [N, D * bits / 8]: the code of a value is the number of thresholds it is strictly
// greater than, dimension i at bits bits * (i % per) of byte i / per (twin: the bucketize + pack of
// reference.hadamard_codes).
torch::Tensor bucket_codes(torch::Tensor x_hat, torch::Tensor thresholds, int64_t bits) {
  TORCH_CHECK(x_hat.dtype() == torch::kFloat32 && x_hat.dim() == 2 && x_hat.is_contiguous(),
              "x_hat must be contiguous float32 [N, D]");
  TORCH_CHECK(bits == 1 || bits == 2, "bits must be 1 or 2");
  TORCH_CHECK(thresholds.dtype() == torch::kFloat32 && thresholds.dim() == 1 && thresholds.is_contiguous() &&
                  thresholds.size(0) == (int64_t{1} << bits) - 1,
              "thresholds must be contiguous float32 [2**bits - 1]");
  const int64_t count = x_hat.size(0), dim = x_hat.size(1), per = 8 / bits, levels = thresholds.size(0);
  TORCH_CHECK(dim % per == 0, "head_dim must be a multiple of ", per);
  auto out = torch::empty({count, dim / per}, torch::kUInt8);
  const float* x = x_hat.data_ptr<float>();
  const float* t = thresholds.data_ptr<float>();
  uint8_t* o = out.data_ptr<uint8_t>();
  for (int64_t byte = 0; byte < count * dim / per; ++byte) {
    uint32_t packed = 0;
    for (int64_t m = 0; m < per; ++m) {
      const float value = x[byte * per + m];
      uint32_t code = 0;
      for (int64_t j = 0; j < levels; ++j) code += value > t[j];
      packed |= code << (bits * m);
    }
    o[byte] = static_cast<uint8_t>(packed);
  }
  return out;
}

// query: float32 [B, Hq, D] contiguous; key/value: float32 [B, Hkv, S, D] with contiguous rows;
// indices: int64 [B, Hq or Hkv, K] contiguous (-1 = skipped). Returns float32 [B, Hq, D].
torch::Tensor sparse_decode_attention(torch::Tensor query, torch::Tensor key, torch::Tensor value,
                                      torch::Tensor indices, double scaling) {
  TORCH_CHECK(query.dtype() == torch::kFloat32 && query.dim() == 3 && query.is_contiguous(),
              "query must be contiguous float32 [B, Hq, D]");
  TORCH_CHECK(key.dtype() == torch::kFloat32 && value.dtype() == torch::kFloat32 && key.dim() == 4 &&
                  key.sizes() == value.sizes() && key.stride(3) == 1 && value.stride(3) == 1,
              "key and value must be float32 [B, Hkv, S, D] with contiguous rows");
  TORCH_CHECK(indices.dtype() == torch::kInt64 && indices.dim() == 3 && indices.is_contiguous(),
              "indices must be contiguous int64 [B, H, K]");
  const int64_t batch = query.size(0), q_heads = query.size(1), dim = query.size(2);
  const int64_t kv_heads = key.size(1), seq_len = key.size(2), budget = indices.size(2);
  TORCH_CHECK(key.size(0) == batch && key.size(3) == dim && q_heads % kv_heads == 0, "query and key disagree");
  const int64_t group = q_heads / kv_heads;
  const int64_t index_heads = indices.size(1);
  TORCH_CHECK(index_heads == q_heads || index_heads == kv_heads, "indices must have Hq or Hkv rows");
  auto out = torch::zeros({batch, q_heads, dim}, torch::kFloat32);
  const float* q_ptr = query.data_ptr<float>();
  const float* k_ptr = key.data_ptr<float>();
  const float* v_ptr = value.data_ptr<float>();
  const int64_t* i_ptr = indices.data_ptr<int64_t>();
  float* o_ptr = out.data_ptr<float>();
  const int64_t ks0 = key.stride(0), ks1 = key.stride(1), ks2 = key.stride(2);
  const int64_t vs0 = value.stride(0), vs1 = value.stride(1), vs2 = value.stride(2);

  at::parallel_for(0, batch * q_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(budget);
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / q_heads, hq = bq % q_heads, h = hq / group;
      const float* q = q_ptr + bq * dim;
      const int64_t* rows = i_ptr + (b * index_heads + (index_heads == q_heads ? hq : h)) * budget;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < budget; ++i) {
        if (i + kAhead < budget && rows[i + kAhead] >= 0) prefetch_row(k_ptr + b * ks0 + h * ks1 + rows[i + kAhead] * ks2, dim);
        const int64_t pos = rows[i];
        if (pos < 0) continue;
        TORCH_CHECK(pos < seq_len, "index ", pos, " out of range for ", seq_len, " cached positions");
        weights[i] = dot(q, k_ptr + b * ks0 + h * ks1 + pos * ks2, dim) * static_cast<float>(scaling);
        top = std::max(top, weights[i]);
      }
      if (top == -std::numeric_limits<float>::infinity()) continue;  // no valid index: zeros
      float total = 0.0f;
      float* o = o_ptr + bq * dim;
      for (int64_t i = 0; i < budget; ++i) {
        if (i + kAhead < budget && rows[i + kAhead] >= 0) prefetch_row(v_ptr + b * vs0 + h * vs1 + rows[i + kAhead] * vs2, dim);
        const int64_t pos = rows[i];
        if (pos < 0) continue;
        const float w = std::exp(weights[i] - top);
        total += w;
        const float* v = v_ptr + b * vs0 + h * vs1 + pos * vs2;
        for (int64_t d = 0; d < dim; ++d) o[d] += w * v[d];
      }
      for (int64_t d = 0; d < dim; ++d) o[d] /= total;
    }
  });
  return out;
}

// query: float32 [B, Hq, D] contiguous; key: float32 [B, Hkv, S, D] with contiguous rows; candidates:
// int64 [B, H, R] contiguous (H = Hq, or Hkv: a KV group scores with its summed query; -1 = empty);
// forced: bool [B, S] contiguous or empty. Keeps per row the `budget` candidates with the largest
// exact q . k (summed in double, ranked as float32), forced first; twin reference.rescore_selection.
torch::Tensor rescore_selection(torch::Tensor query, torch::Tensor key, torch::Tensor candidates, int64_t budget,
                                torch::Tensor forced) {
  TORCH_CHECK(query.dtype() == torch::kFloat32 && query.dim() == 3 && query.is_contiguous(),
              "query must be contiguous float32 [B, Hq, D]");
  TORCH_CHECK(key.dtype() == torch::kFloat32 && key.dim() == 4 && key.stride(3) == 1,
              "key must be float32 [B, Hkv, S, D] with contiguous rows");
  TORCH_CHECK(candidates.dtype() == torch::kInt64 && candidates.dim() == 3 && candidates.is_contiguous(),
              "candidates must be contiguous int64 [B, H, R]");
  TORCH_CHECK(budget >= 1, "budget must be >= 1");
  const int64_t batch = query.size(0), q_heads = query.size(1), dim = query.size(2);
  const int64_t kv_heads = key.size(1), seq_len = key.size(2);
  const int64_t rows = candidates.size(1), count = candidates.size(2);
  TORCH_CHECK(key.size(0) == batch && key.size(3) == dim && q_heads % kv_heads == 0 &&
                  (rows == q_heads || rows == kv_heads), "query, key and candidates disagree");
  const bool has_forced = forced.numel() > 0;
  TORCH_CHECK(!has_forced || (forced.dtype() == torch::kBool && forced.is_contiguous() && forced.size(0) == batch &&
                              forced.size(1) == seq_len), "forced must be contiguous bool [B, S] or empty");
  const int64_t group = q_heads / kv_heads;
  auto out = torch::full({batch, rows, budget}, -1, torch::kInt64);
  const float* q_ptr = query.data_ptr<float>();
  const float* k_ptr = key.data_ptr<float>();
  const int64_t* c_ptr = candidates.data_ptr<int64_t>();
  const bool* f_ptr = has_forced ? forced.data_ptr<bool>() : nullptr;
  int64_t* o_ptr = out.data_ptr<int64_t>();
  const int64_t ks0 = key.stride(0), ks1 = key.stride(1), ks2 = key.stride(2);

  at::parallel_for(0, batch * rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> q(dim);
    std::vector<int64_t> keys;
    keys.reserve(count);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / rows, h = row % rows;
      const int64_t kv = rows == q_heads ? h / group : h;
      const int64_t first = rows == q_heads ? h : h * group, heads = rows == q_heads ? 1 : group;
      for (int64_t d = 0; d < dim; ++d) {
        double total = 0.0;
        for (int64_t g = 0; g < heads; ++g) total += q_ptr[(b * q_heads + first + g) * dim + d];
        q[d] = total;
      }
      const int64_t* picks = c_ptr + row * count;
      const float* k_head = k_ptr + b * ks0 + kv * ks1;
      keys.clear();
      for (int64_t i = 0; i < count; ++i) {
        if (i + kAhead < count && picks[i + kAhead] >= 0) prefetch_row(k_head + picks[i + kAhead] * ks2, dim);
        const int64_t pos = picks[i];
        if (pos < 0) continue;
        TORCH_CHECK(pos < seq_len, "candidate ", pos, " out of range for ", seq_len, " cached positions");
        const double score = dot_double(q.data(), k_head + pos * ks2, dim);
        const bool is_forced = f_ptr != nullptr && f_ptr[b * seq_len + pos];
        keys.push_back(rank_key(largest_first(static_cast<float>(score)), pos, seq_len, is_forced, true));
      }
      write_best_positions(keys, budget, seq_len, o_ptr + row * budget);
    }
  });
  return out;
}


// The tail estimate in one call (AdamasConfig.value_code_bits): attention of one decode token over every
// valid position, exact at the selected ones, from the codes elsewhere; twin reference.tail_decode_attention.
// query: float32 [B, Hq, D] contiguous; key, value: float32 [B, Hkv, S, D] with contiguous rows (read in
// place); indices: int64 [B, Hq or Hkv, K] contiguous (-1 skipped), the selection (exact logit and value);
// exact_positions: empty, or int64 [B, Hq or Hkv, R] contiguous, positions whose logit is exact too (value
// from its codes); key_codes, value_codes: uint8 [B, Hkv, S, P] with contiguous rows; q_hat: float32
// [B, Hq, D] contiguous, the query's Hadamard values; key_centroids: float32 [Hkv, 2**key_bits] contiguous;
// value_centroids: float32 [Hkv, 2**value_bits] contiguous (value_bits 2 or 4); valid: bool [B, S]
// contiguous or empty (all valid); hadamard: float32 [D, D] contiguous (orthonormal, symmetric);
// portable: the plain C++ loops instead of AVX2 (for tests). Returns float32 [B, Hq, D], zeros for a
// row with no valid position.
//
// An estimated logit is the key codes' fast-scan estimate (select_by_centroids' uint8 nibble tables,
// one per query head), offset + step * estimate: reference.quantized_centroid_scores, within half a
// grid step per nibble of reference.centroid_scores.
namespace {

enum TailMark : uint8_t { kEstimated = 0, kExactLogit = 1, kSelected = 2, kExcluded = 3 };

// exp(x) for x <= 0 in place, 0 below float32's range (so -inf gives 0): Cephes' expf polynomial,
// eight at a time with AVX2 + FMA, std::exp elsewhere.
__attribute__((target("avx2,fma")))
void exp_nonpositive_avx2(float* x, int64_t count) {
  const __m256 lowest = _mm256_set1_ps(-87.3f), log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 ln2_hi = _mm256_set1_ps(0.693359375f), ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
  const float coefficients[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 raw = _mm256_loadu_ps(x + i);
    const __m256 under = _mm256_cmp_ps(raw, lowest, _CMP_LT_OQ);  // also -inf; NaN never comes here
    const __m256 v = _mm256_max_ps(raw, lowest);
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(v, log2e, half));
    __m256 r = _mm256_fnmadd_ps(n, ln2_hi, v);
    r = _mm256_fnmadd_ps(n, ln2_lo, r);
    __m256 poly = _mm256_set1_ps(coefficients[0]);
    for (int c = 1; c < 6; ++c) poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(coefficients[c]));
    poly = _mm256_fmadd_ps(poly, _mm256_mul_ps(r, r), _mm256_add_ps(r, one));
    const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 result = _mm256_mul_ps(poly, _mm256_castsi256_ps(exponent));
    _mm256_storeu_ps(x + i, _mm256_andnot_ps(under, result));
  }
  for (; i < count; ++i) x[i] = std::exp(x[i]);
}

void exp_nonpositive(float* x, int64_t count, bool simd) {
  if (simd) return exp_nonpositive_avx2(x, count);
  for (int64_t i = 0; i < count; ++i) x[i] = std::exp(x[i]);
}

// Per key of a chunk: its value codes' Hadamard values (PER_BYTE per byte, decoded once for the KV
// group), added to each query head's sum (outputs + g * 2 * dim) with that head's weight.
template <int64_t PER_BYTE>
__attribute__((target_clones("avx2", "default")))
void accumulate_code_values(const float* weights, int64_t weight_stride, int64_t group, int64_t count,
                            const uint8_t* codes, int64_t row_stride, int64_t value_bytes, const float* values_of,
                            float* outputs) {
  const int64_t dim = value_bytes * PER_BYTE;
  std::vector<float> row(dim);
  for (int64_t j = 0; j < count; ++j) {
    const uint8_t* packed = codes + j * row_stride;
    for (int64_t p = 0; p < value_bytes; ++p)
      for (int64_t m = 0; m < PER_BYTE; ++m) row[p * PER_BYTE + m] = values_of[packed[p] * PER_BYTE + m];
    for (int64_t g = 0; g < group; ++g) {
      const float w = weights[g * weight_stride + j];
      float* out = outputs + g * 2 * dim;
      for (int64_t d = 0; d < dim; ++d) out[d] += w * row[d];
    }
  }
}

// The same for 2-bit values (four per byte) and GROUP query heads, with AVX2: a block of VECS * 8
// dimensions at a time, its GROUP * VECS sums held in registers over all keys of the chunk.
template <int64_t GROUP>
__attribute__((target("avx2,fma")))
void accumulate_two_bit_values_avx2(const float* weights, int64_t weight_stride, int64_t count,
                                    const uint8_t* codes, int64_t row_stride, int64_t value_bytes,
                                    const float* values_of, float* outputs) {
  constexpr int64_t kVecs = GROUP <= 3 ? 4 : GROUP <= 6 ? 2 : 1;  // at most 12 accumulators
  const int64_t dim = value_bytes * 4;
  for (int64_t block = 0; block < dim; block += kVecs * 8) {
    __m256 sums[GROUP][kVecs];
    for (int64_t g = 0; g < GROUP; ++g)
      for (int64_t v = 0; v < kVecs; ++v) sums[g][v] = _mm256_setzero_ps();
    const int64_t first_byte = block / 4;
    for (int64_t j = 0; j < count; ++j) {
      const uint8_t* packed = codes + j * row_stride + first_byte;
      __m256 row[kVecs];
      for (int64_t v = 0; v < kVecs; ++v)
        row[v] = _mm256_set_m128(_mm_loadu_ps(values_of + packed[2 * v + 1] * 4),
                                 _mm_loadu_ps(values_of + packed[2 * v] * 4));
      for (int64_t g = 0; g < GROUP; ++g) {
        const __m256 w = _mm256_set1_ps(weights[g * weight_stride + j]);
        for (int64_t v = 0; v < kVecs; ++v) sums[g][v] = _mm256_fmadd_ps(w, row[v], sums[g][v]);
      }
    }
    for (int64_t g = 0; g < GROUP; ++g)
      for (int64_t v = 0; v < kVecs; ++v) {
        float* out = outputs + g * 2 * dim + block + v * 8;
        _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), sums[g][v]));
      }
  }
}

void accumulate_code_values_any(int64_t per_byte, bool simd, const float* weights, int64_t weight_stride,
                                int64_t group, int64_t count, const uint8_t* codes, int64_t row_stride,
                                int64_t value_bytes, const float* values_of, float* outputs) {
  const int64_t dim = value_bytes * per_byte;
  if (simd && per_byte == 4 && dim % 32 == 0 && group <= 8) {
    with_fixed_columns(group, [&](auto fixed) {
      constexpr int64_t kGroup = decltype(fixed)::value;
      if constexpr (kGroup > 0)
        accumulate_two_bit_values_avx2<kGroup>(weights, weight_stride, count, codes, row_stride, value_bytes,
                                               values_of, outputs);
      else
        accumulate_code_values<4>(weights, weight_stride, group, count, codes, row_stride, value_bytes, values_of,
                                  outputs);
    });
    return;
  }
  switch (per_byte) {
    case 1: return accumulate_code_values<1>(weights, weight_stride, group, count, codes, row_stride, value_bytes, values_of, outputs);
    case 2: return accumulate_code_values<2>(weights, weight_stride, group, count, codes, row_stride, value_bytes, values_of, outputs);
    case 4: return accumulate_code_values<4>(weights, weight_stride, group, count, codes, row_stride, value_bytes, values_of, outputs);
    case 8: return accumulate_code_values<8>(weights, weight_stride, group, count, codes, row_stride, value_bytes, values_of, outputs);
    default: TORCH_CHECK(false, "codes per byte must be 1, 2, 4 or 8, got ", per_byte);
  }
}

// The largest and the sum of x[0..count), in eight independent lanes so that they vectorize.
__attribute__((target_clones("avx2", "default")))
float max_of(const float* x, int64_t count) {
  float lanes[8];
  std::fill(lanes, lanes + 8, -std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 8 <= count; i += 8)
    for (int64_t l = 0; l < 8; ++l) lanes[l] = std::max(lanes[l], x[i + l]);
  for (; i < count; ++i) lanes[0] = std::max(lanes[0], x[i]);
  return *std::max_element(lanes, lanes + 8);
}

__attribute__((target_clones("avx2", "default")))
float sum_of(const float* x, int64_t count) {
  float lanes[8] = {};
  int64_t i = 0;
  for (; i + 8 <= count; i += 8)
    for (int64_t l = 0; l < 8; ++l) lanes[l] += x[i + l];
  for (; i < count; ++i) lanes[0] += x[i];
  float total = 0.0f;
  for (float lane : lanes) total += lane;
  return total;
}

// The positions of `rows` [B, Hq or Hkv, K] (-1 skipped) marked `mark` in marks [B * Hq, S] unless
// already marked higher.
void mark_positions(const torch::Tensor& rows, uint8_t mark, int64_t q_heads, int64_t seq_len, uint8_t* marks) {
  const int64_t batch = rows.size(0), per = rows.size(1), count = rows.size(2);
  const int64_t group = q_heads / per;  // 1 when each query head has its own rows
  const int64_t* r_ptr = rows.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t head = 0; head < q_heads; ++head) {
      const int64_t* picks = r_ptr + (b * per + head / group) * count;
      uint8_t* head_marks = marks + (b * q_heads + head) * seq_len;
      for (int64_t i = 0; i < count; ++i) {
        const int64_t pos = picks[i];
        if (pos < 0) continue;
        TORCH_CHECK(pos < seq_len, "position ", pos, " out of range for ", seq_len, " cached positions");
        if (head_marks[pos] < mark) head_marks[pos] = mark;
      }
    }
}

}  // namespace

torch::Tensor tail_decode_attention(torch::Tensor query, torch::Tensor q_hat, torch::Tensor key, torch::Tensor value,
                                    torch::Tensor indices, torch::Tensor exact_positions, torch::Tensor key_codes,
                                    torch::Tensor value_codes, torch::Tensor key_centroids, int64_t key_bits,
                                    torch::Tensor value_centroids, int64_t value_bits, torch::Tensor valid,
                                    torch::Tensor hadamard, double scaling, bool portable) {
  TORCH_CHECK(query.dtype() == torch::kFloat32 && query.dim() == 3 && query.is_contiguous(),
              "query must be contiguous float32 [B, Hq, D]");
  TORCH_CHECK(q_hat.dtype() == torch::kFloat32 && q_hat.is_contiguous() && q_hat.sizes() == query.sizes(),
              "q_hat must be contiguous float32 shaped as the query");
  TORCH_CHECK(key.dtype() == torch::kFloat32 && value.dtype() == torch::kFloat32 && key.dim() == 4 &&
                  key.sizes() == value.sizes() && key.stride(3) == 1 && value.stride(3) == 1,
              "key and value must be float32 [B, Hkv, S, D] with contiguous rows");
  TORCH_CHECK(key_codes.dtype() == torch::kUInt8 && value_codes.dtype() == torch::kUInt8 && key_codes.dim() == 4 &&
                  value_codes.dim() == 4 && key_codes.stride(3) == 1 && value_codes.stride(3) == 1,
              "key and value codes must be uint8 [B, Hkv, S, P] with contiguous rows");
  const int64_t batch = key.size(0), kv_heads = key.size(1), seq_len = key.size(2), dim = key.size(3);
  const int64_t q_heads = query.size(1), group = q_heads / kv_heads;
  TORCH_CHECK(query.size(0) == batch && query.size(2) == dim && q_heads % kv_heads == 0, "query and key disagree");
  const int64_t key_bytes = key_codes.size(3), value_bytes = value_codes.size(3);
  TORCH_CHECK(key_bits == 1 || key_bits == 2, "key code bits must be 1 or 2");
  TORCH_CHECK(key_centroids.dtype() == torch::kFloat32 && key_centroids.is_contiguous() && key_centroids.dim() == 2 &&
                  key_centroids.size(0) == kv_heads && key_centroids.size(1) == (int64_t{1} << key_bits),
              "key centroids must be contiguous float32 [Hkv, 2**key_bits]");
  TORCH_CHECK(value_bits == 2 || value_bits == 4, "value code bits must be 2 or 4");
  TORCH_CHECK(value_centroids.dtype() == torch::kFloat32 && value_centroids.is_contiguous() &&
                  value_centroids.dim() == 2 && value_centroids.size(0) == kv_heads &&
                  value_centroids.size(1) == (int64_t{1} << value_bits),
              "value centroids must be contiguous float32 [Hkv, 2**value_bits]");
  const int64_t value_per_byte = 8 / value_bits, value_levels = int64_t{1} << value_bits;
  TORCH_CHECK(key_bytes * 8 == dim * key_bits && value_bytes * value_per_byte == dim, "codes and head_dim disagree");
  TORCH_CHECK(dim % 16 == 0, "head_dim must be a multiple of 16, got ", dim);
  TORCH_CHECK(2 * key_bytes * 255 < 65536, "head_dim ", dim, " is too large for uint16 estimates");
  for (const auto& codes : {key_codes, value_codes})
    TORCH_CHECK(codes.size(0) == batch && codes.size(1) == kv_heads && codes.size(2) == seq_len,
                "codes and key disagree");
  for (const auto& rows : {indices, exact_positions})
    TORCH_CHECK(rows.numel() == 0 || (rows.dtype() == torch::kInt64 && rows.dim() == 3 && rows.is_contiguous() &&
                                      rows.size(0) == batch && (rows.size(1) == q_heads || rows.size(1) == kv_heads)),
                "indices and exact positions must be contiguous int64 [B, Hq or Hkv, K]");
  const bool has_valid = valid.numel() > 0;
  TORCH_CHECK(!has_valid || (valid.dtype() == torch::kBool && valid.is_contiguous() && valid.dim() == 2 &&
                             valid.size(0) == batch && valid.size(1) == seq_len),
              "valid must be contiguous bool [B, S] or empty");
  TORCH_CHECK(hadamard.dtype() == torch::kFloat32 && hadamard.is_contiguous() && hadamard.dim() == 2 &&
                  hadamard.size(0) == dim && hadamard.size(1) == dim, "hadamard must be contiguous float32 [D, D]");

  const float scale = static_cast<float>(scaling);
  const bool simd = !portable && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const float* q_ptr = query.data_ptr<float>();
  const float* k_ptr = key.data_ptr<float>();
  const float* v_ptr = value.data_ptr<float>();
  const uint8_t* kc_ptr = key_codes.data_ptr<uint8_t>();
  const uint8_t* vc_ptr = value_codes.data_ptr<uint8_t>();
  const float* qh_ptr = q_hat.data_ptr<float>();
  const float* kc_centroids = key_centroids.data_ptr<float>();
  // The Hadamard values each value code byte stands for (reference.byte_centroids): [Hkv, 256, per byte].
  std::vector<float> value_byte_values(kv_heads * 256 * value_per_byte);
  const float* vc_centroids = value_centroids.data_ptr<float>();
  for (int64_t h = 0; h < kv_heads; ++h)
    for (int64_t v = 0; v < 256; ++v)
      for (int64_t m = 0; m < value_per_byte; ++m)
        value_byte_values[(h * 256 + v) * value_per_byte + m] =
            vc_centroids[h * value_levels + ((v >> (value_bits * m)) & (value_levels - 1))];
  const float* vbv_ptr = value_byte_values.data();
  const float* h_ptr = hadamard.data_ptr<float>();
  const int64_t ks0 = key.stride(0), ks1 = key.stride(1), ks2 = key.stride(2);
  const int64_t vs0 = value.stride(0), vs1 = value.stride(1), vs2 = value.stride(2);
  const int64_t kcs0 = key_codes.stride(0), kcs1 = key_codes.stride(1), kcs2 = key_codes.stride(2);
  const int64_t vcs0 = value_codes.stride(0), vcs1 = value_codes.stride(1), vcs2 = value_codes.stride(2);
  const int64_t heads_total = batch * q_heads;

  // Marks per query head and position: excluded (not valid), selected, exact logit, or estimated.
  std::vector<uint8_t> marks(heads_total * seq_len, kEstimated);
  if (exact_positions.numel() > 0) mark_positions(exact_positions, kExactLogit, q_heads, seq_len, marks.data());
  if (indices.numel() > 0) mark_positions(indices, kSelected, q_heads, seq_len, marks.data());
  if (has_valid) {  // last: a selected position that is not valid is excluded too
    const bool* ok = valid.data_ptr<bool>();
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t head = 0; head < q_heads; ++head)
        for (int64_t j = 0; j < seq_len; ++j)
          if (!ok[b * seq_len + j]) marks[(b * q_heads + head) * seq_len + j] = kExcluded;
  }
  // Per query head, its positions not estimated, ascending: special[special_begin[bq] ..
  // special_begin[bq + 1]) (a few hundred among thousands; runs of 8 estimated ones skipped at once).
  std::vector<int64_t> special, special_begin(heads_total + 1, 0);
  for (int64_t bq = 0; bq < heads_total; ++bq) {
    const uint8_t* head_marks = marks.data() + bq * seq_len;
    int64_t j = 0;
    for (; j + 8 <= seq_len; j += 8) {
      uint64_t word;
      std::memcpy(&word, head_marks + j, 8);
      if (word == 0) continue;  // kEstimated is 0
      for (int64_t k = j; k < j + 8; ++k)
        if (head_marks[k] != kEstimated) special.push_back(k);
    }
    for (; j < seq_len; ++j)
      if (head_marks[j] != kEstimated) special.push_back(j);
    special_begin[bq + 1] = static_cast<int64_t>(special.size());
  }

  // Per query head: its uint8 nibble tables and grid (quantized_tables, as select_by_centroids
  // builds them), luts[(b * Hq + hq) * nibbles * 16 ..], and the level shift, log sum exp(estimate) -
  // log sum exp(exact) over the calibration sample.
  const int64_t nibbles = 2 * key_bytes, halves_size = group * key_bytes * 2 * kNibble;
  std::vector<uint8_t> luts(heads_total * nibbles * kNibble);
  std::vector<EstimateGrid> grids(heads_total);
  std::vector<float> shifts(heads_total, 0.0f);
  const int64_t stride = std::max<int64_t>(1, seq_len / 64);  // reference.tail_calibration_stride
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> halves(halves_size);
    std::vector<float> estimated, exact;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / kv_heads, h = bh % kv_heads;
      centroid_halves(qh_ptr + (b * q_heads + h * group) * dim, kc_centroids + h * (int64_t{1} << key_bits), key_bits,
                      group, dim, halves.data());
      const uint8_t* codes = kc_ptr + b * kcs0 + h * kcs1;
      const float* keys = k_ptr + b * ks0 + h * ks1;
      for (int64_t g = 0; g < group; ++g) {
        const int64_t bq = b * q_heads + h * group + g;
        uint8_t* lut = luts.data() + bq * nibbles * kNibble;
        grids[bq] = quantized_tables(halves.data(), key_bytes, g, 1, lut);
        const uint8_t* head_marks = marks.data() + bq * seq_len;
        estimated.clear();
        exact.clear();
        for (int64_t j = 0; j < seq_len; j += stride) {
          if (head_marks[j] != kEstimated) continue;
          estimated.push_back(estimate_score(grids[bq], nibble_estimate(lut, codes + j * kcs2, key_bytes)) * scale);
          exact.push_back(dot(q_ptr + bq * dim, keys + j * ks2, dim) * scale);
        }
        if (estimated.empty()) continue;
        auto log_sum_exp = [](const std::vector<float>& x) {
          const double top = *std::max_element(x.begin(), x.end());
          double total = 0.0;
          for (float e : x) total += std::exp(e - top);
          return top + std::log(total);
        };
        shifts[bq] = static_cast<float>(log_sum_exp(estimated) - log_sum_exp(exact));
      }
    }
  });

  // Per (batch, KV head, chunk of positions) and query head of the group: the chunk's logits, their
  // maximum m, l = sum exp(logit - m), and two weighted sums, the selected rows' values (model basis)
  // and the other positions' code values (Hadamard basis); merged across chunks like online softmax.
  constexpr int64_t kChunk = 512;
  const int64_t chunks = std::max<int64_t>(1, (seq_len + kChunk - 1) / kChunk);
  const int64_t items = batch * kv_heads * chunks;
  std::vector<float> part_max(items * group), part_sum(items * group), part_out(items * group * 2 * dim, 0.0f);
  const int64_t padded = (key_bytes + 15) / 16 * 16;  // the AVX2 scan reads whole 16-byte chunks
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(group * kChunk);
    std::vector<uint16_t> block(kMaxColumns * kBlock);
    std::vector<uint8_t> short_block(kBlock * padded, 0);  // a short or narrow block, zero-padded
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / chunks, chunk = item % chunks, b = bh / kv_heads, h = bh % kv_heads;
      const int64_t first = chunk * kChunk, count = std::min(kChunk, seq_len - first);
      const uint8_t* codes = kc_ptr + b * kcs0 + h * kcs1 + first * kcs2;
      const float* keys = k_ptr + b * ks0 + h * ks1 + first * ks2;
      const float* values = v_ptr + b * vs0 + h * vs1 + first * vs2;
      float* outputs = part_out.data() + item * group * 2 * dim;
      const int64_t first_head = b * q_heads + h * group;
      for (int64_t s = 0; s < count; s += kBlock) {  // the estimated logits, 32 keys at a time
        const int64_t keys_here = std::min(kBlock, count - s);
        int64_t row_stride;
        const uint8_t* rows =
            scan_rows(codes + s * kcs2, kcs2, keys_here, key_bytes, padded, short_block.data(), row_stride);
        for (int64_t g0 = 0; g0 < group; g0 += kMaxColumns) {
          const int64_t columns = std::min(kMaxColumns, group - g0);
          scan_block(simd, rows, row_stride, padded, key_bytes, luts.data() + (first_head + g0) * nibbles * kNibble,
                     columns, block.data());
          for (int64_t c = 0; c < columns; ++c) {
            const EstimateGrid& grid = grids[first_head + g0 + c];
            const float shift = shifts[first_head + g0 + c];
            float* w = weights.data() + (g0 + c) * kChunk + s;
            for (int64_t i = 0; i < keys_here; ++i) w[i] = estimate_score(grid, block[c * kBlock + i]) * scale - shift;
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        const int64_t bq = first_head + g;
        const uint8_t* head_marks = marks.data() + bq * seq_len + first;
        const float* q = q_ptr + bq * dim;
        float* w = weights.data() + g * kChunk;
        const int64_t* head_begin = special.data() + special_begin[bq];
        const int64_t* head_end = special.data() + special_begin[bq + 1];
        const int64_t* from = std::lower_bound(head_begin, head_end, first);
        const int64_t* to = std::lower_bound(from, head_end, first + count);  // this chunk's special positions
        for (const int64_t* it = from; it != to; ++it) {
          const int64_t j = *it - first;
          w[j] = head_marks[j] == kExcluded ? -std::numeric_limits<float>::infinity() : dot(q, keys + j * ks2, dim) * scale;
        }
        const float top = max_of(w, count);
        part_max[item * group + g] = top;
        if (top == -std::numeric_limits<float>::infinity()) {
          std::fill(w, w + count, 0.0f);
          part_sum[item * group + g] = 0.0f;
          continue;
        }
        for (int64_t j = 0; j < count; ++j) w[j] -= top;
        exp_nonpositive(w, count, simd);
        part_sum[item * group + g] = sum_of(w, count);
        float* exact_out = outputs + g * 2 * dim + dim;
        for (const int64_t* it = from; it != to; ++it) {
          const int64_t j = *it - first;
          if (head_marks[j] != kSelected) continue;
          for (int64_t d = 0; d < dim; ++d) exact_out[d] += w[j] * values[j * vs2 + d];
          w[j] = 0.0f;  // its value is exact: no code value for it
        }
      }
      accumulate_code_values_any(value_per_byte, simd, weights.data(), kChunk, group, count,
                                 vc_ptr + b * vcs0 + h * vcs1 + first * vcs2, vcs2, value_bytes,
                                 vbv_ptr + h * 256 * value_per_byte, outputs);
    }
  });

  auto out = torch::zeros({batch, q_heads, dim}, torch::kFloat32);
  float* o_ptr = out.data_ptr<float>();
  std::vector<float> code_sum(dim), exact_sum(dim), rotated(dim);
  for (int64_t bq = 0; bq < heads_total; ++bq) {
    const int64_t b = bq / q_heads, h = (bq % q_heads) / group, g = bq % group;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < chunks; ++c) top = std::max(top, part_max[((b * kv_heads + h) * chunks + c) * group + g]);
    if (top == -std::numeric_limits<float>::infinity()) continue;  // nothing valid: zeros
    float total = 0.0f;
    std::fill(code_sum.begin(), code_sum.end(), 0.0f);
    std::fill(exact_sum.begin(), exact_sum.end(), 0.0f);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t slot = ((b * kv_heads + h) * chunks + c) * group + g;
      if (part_max[slot] == -std::numeric_limits<float>::infinity()) continue;
      const float factor = std::exp(part_max[slot] - top);
      total += part_sum[slot] * factor;
      const float* sums = part_out.data() + slot * 2 * dim;
      for (int64_t d = 0; d < dim; ++d) {
        code_sum[d] += sums[d] * factor;
        exact_sum[d] += sums[dim + d] * factor;
      }
    }
    std::fill(rotated.begin(), rotated.end(), 0.0f);
    for (int64_t e = 0; e < dim; ++e)  // code_sum @ H, e in order for every d (vectorizes over d)
      for (int64_t d = 0; d < dim; ++d) rotated[d] += code_sum[e] * h_ptr[e * dim + d];
    float* o = o_ptr + bq * dim;
    for (int64_t d = 0; d < dim; ++d)
      o[d] = (exact_sum[d] + rotated[d]) / std::max(total, std::numeric_limits<float>::min());
  }
  return out;
}

// One sparse decode step of the asymmetric rule for a layer that stores key codes, in one call (the
// Python glue of the three steps cost about as much as the steps themselves at 8K):
// 1. the codes of keys [coded, S) written into `codes` in place (the cache's code buffer; its bytes
//    before `coded` are read as they are): their Hadamard values by the same matmul as
//    reference.hadamard_values, then bucket_codes;
// 2. select_by_centroids from the query's Hadamard values (the same matmul), of `pool` candidates
//    narrowed to the budget by rescore_selection when pool > budget;
// 3. sparse_decode_attention over the selection.
// query: float32 [B, Hq, D] (any strides); key/value/codes/forced/valid as those ops take them;
// hadamard: float32 [D, D] (reference.hadamard_matrix). Returns (float32 [B, Hq, D], the indices).
// Twin: reference.asymmetric_decode_step, after reference.hadamard_codes of keys [coded, S).
std::tuple<torch::Tensor, torch::Tensor> asymmetric_decode_step(
    torch::Tensor query, torch::Tensor key, torch::Tensor value, torch::Tensor codes, int64_t coded,
    torch::Tensor thresholds, torch::Tensor centroids, torch::Tensor hadamard, int64_t bits, bool shared,
    int64_t budget, int64_t pool, torch::Tensor forced, torch::Tensor valid, double scaling) {
  TORCH_CHECK(query.dtype() == torch::kFloat32 && key.dtype() == torch::kFloat32 && query.dim() == 3 &&
                  key.dim() == 4, "query must be float32 [B, Hq, D] and key float32 [B, Hkv, S, D]");
  TORCH_CHECK(codes.dim() == 4 && codes.size(2) == key.size(2), "codes must have one row per cached key");
  const int64_t seq_len = key.size(2);
  TORCH_CHECK(coded >= 0 && coded <= seq_len, "coded must be in [0, ", seq_len, "], got ", coded);
  if (coded < seq_len) {
    const auto fresh = key.narrow(2, coded, seq_len - coded);
    const auto fresh_hat = at::matmul(fresh, hadamard);
    const auto packed = bucket_codes(fresh_hat.reshape({-1, key.size(3)}).contiguous(), thresholds, bits);
    auto fresh_codes = codes.narrow(2, coded, seq_len - coded);
    fresh_codes.copy_(packed.view(fresh_codes.sizes()));
  }
  const auto q_hat = at::matmul(query, hadamard).contiguous();
  const auto q = query.contiguous();
  auto indices = select_by_centroids(q_hat, codes, centroids, bits, shared, std::max(pool, budget), forced, valid, false);
  if (pool > budget) indices = rescore_selection(q, key, indices, budget, forced);
  auto out = sparse_decode_attention(q, key, value, indices, scaling);
  return {out, indices};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("asymmetric_decode_step", &asymmetric_decode_step,
        "Encode new key codes, select by the asymmetric rule and attend, one decode step (CPU)");
  m.def("tail_decode_attention", &tail_decode_attention, "The tail estimate's attention over the whole cache (CPU)");
  m.def("select_by_centroids", &select_by_centroids, "Exact asymmetric selection by a fast-scanned estimate (CPU)");
  m.def("bucket_codes", &bucket_codes, "Bucketize and pack Hadamard values into codes (CPU)");
  m.def("rescore_selection", &rescore_selection, "Exact q . k second stage over selected candidates (CPU)");
  m.def("select_by_table", &select_by_table, "Fused Adamas byte-table scores and exact top-k (CPU)");
  m.def("sparse_decode_attention", &sparse_decode_attention, "Attention over selected cache rows (CPU)");
}

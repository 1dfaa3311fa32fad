// Adamas decode ops on CPU, for one decode token:
// - select_by_table: per-byte table lookups over the packed key codes (no unpacking), then an exact
//   top-k with the ranking rules of hf_adamas.ops.reference.select_topk; its plain-PyTorch twin is
//   reference.select_by_table, compared index for index in tests/test_adamas_cpu_select.py.
// - select_by_centroids: the asymmetric rule's table built from the query's Hadamard values and the
//   centroids, then select_by_table; twin reference.centroid_table + reference.select_by_table.
// - rescore_selection: the exact q . k of an estimate's candidates, read in place, and their top-k;
//   twin reference.rescore_selection.
// - sparse_decode_attention: softmax attention over the selected rows only, read in place from the
//   (possibly preallocated, strided) cache; twin reference.sparse_decode_attention.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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
  switch (columns) {
    case 1: return score_keys_fixed<1>(tab, codes, row_stride, count, packed, scores, column_stride);
    case 2: return score_keys_fixed<2>(tab, codes, row_stride, count, packed, scores, column_stride);
    case 3: return score_keys_fixed<3>(tab, codes, row_stride, count, packed, scores, column_stride);
    case 4: return score_keys_fixed<4>(tab, codes, row_stride, count, packed, scores, column_stride);
    case 8: return score_keys_fixed<8>(tab, codes, row_stride, count, packed, scores, column_stride);
    default:
      for (int64_t s = 0; s < count; ++s) {
        const uint8_t* row = codes + s * row_stride;
        for (int64_t c = 0; c < columns; ++c) {
          float acc = 0.0f;
          for (int64_t p = 0; p < packed; ++p) acc += tab[(p * 256 + row[p]) * columns + c];
          scores[c * column_stride + s] = acc;
        }
      }
  }
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
constexpr int64_t kAhead = 8;
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
  std::vector<float> penalty(batch * seq_len);
  std::vector<std::vector<int64_t>> forced_positions(batch);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t s = 0; s < seq_len; ++s) {
      const bool is_valid = !has_valid || valid_ptr[b * seq_len + s];
      const bool is_forced = forced_ptr[b * seq_len + s];
      penalty[b * seq_len + s] = is_valid && !is_forced ? 0.0f : std::numeric_limits<float>::infinity();
      if (is_valid && is_forced) forced_positions[b].push_back(s);
    }
  }
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

// The asymmetric rule's table built here, [B, Hkv, P, 256, C], from q_hat: float32 [B, Hq, D]
// contiguous (the query's Hadamard values) and centroids: float32 [Hkv, 2**bits] contiguous. Entry
// (p, v, g) is the float32 rounding of sum_m q_hat[g, p * per + m] * centroids[code m of byte v],
// summed in double (twin: reference.centroid_table); with `shared` the G rounded tables are summed in
// float32, g in order (twin: its sum over the group). Then select_by_table(largest=True).
torch::Tensor select_by_centroids(torch::Tensor q_hat, torch::Tensor codes, torch::Tensor centroids, int64_t bits,
                                  bool shared, int64_t budget, torch::Tensor forced, torch::Tensor valid) {
  TORCH_CHECK(q_hat.dtype() == torch::kFloat32 && q_hat.dim() == 3 && q_hat.is_contiguous(),
              "q_hat must be contiguous float32 [B, Hq, D]");
  TORCH_CHECK(centroids.dtype() == torch::kFloat32 && centroids.dim() == 2 && centroids.is_contiguous(),
              "centroids must be contiguous float32 [Hkv, 2**bits]");
  TORCH_CHECK(bits == 1 || bits == 2, "bits must be 1 or 2");
  const int64_t batch = q_hat.size(0), q_heads = q_hat.size(1), dim = q_hat.size(2);
  const int64_t kv_heads = codes.size(1), per = 8 / bits, packed = dim / per, levels = int64_t{1} << bits;
  TORCH_CHECK(codes.dim() == 4 && codes.size(0) == batch && codes.size(3) == packed && q_heads % kv_heads == 0 &&
                  centroids.size(0) == kv_heads && centroids.size(1) == levels,
              "q_hat, codes and centroids disagree in shape");
  const int64_t group = q_heads / kv_heads, columns = shared ? 1 : group;
  // A byte's codes split into a low and a high half (4 bits each) of per / 2 codes.
  const int64_t half_codes = per / 2, half_bits = half_codes * bits;
  auto table = torch::empty({batch, kv_heads, packed, 256, columns}, torch::kFloat32);
  const float* q_ptr = q_hat.data_ptr<float>();
  const float* c_ptr = centroids.data_ptr<float>();
  float* t_ptr = table.data_ptr<float>();
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> half(2 * 16);  // per byte half (4 bits), the sum of its codes' terms
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / kv_heads, h = bh % kv_heads;
      const float* cent = c_ptr + h * levels;
      for (int64_t p = 0; p < packed; ++p) {
        float* entry = t_ptr + (bh * packed + p) * 256 * columns;
        for (int64_t g = 0; g < group; ++g) {
          const float* q = q_ptr + (b * q_heads + h * group + g) * dim + p * per;
          for (int64_t side = 0; side < 2; ++side)
            for (int64_t v = 0; v < (int64_t{1} << half_bits); ++v) {
              double total = 0.0;
              for (int64_t m = 0; m < half_codes; ++m)
                total += static_cast<double>(q[side * half_codes + m]) *
                         static_cast<double>(cent[(v >> (bits * m)) & (levels - 1)]);
              half[side * 16 + v] = total;
            }
          for (int64_t v = 0; v < 256; ++v) {
            const float value = static_cast<float>(half[v & 15] + half[16 + (v >> 4)]);
            if (shared)
              entry[v] = g == 0 ? value : entry[v] + value;
            else
              entry[v * columns + g] = value;
          }
        }
      }
    }
  });
  return select_by_table(table, codes, budget, forced, valid, true);
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("select_by_centroids", &select_by_centroids, "Asymmetric table built in place, then select_by_table (CPU)");
  m.def("rescore_selection", &rescore_selection, "Exact q . k second stage over selected candidates (CPU)");
  m.def("select_by_table", &select_by_table, "Fused Adamas byte-table scores and exact top-k (CPU)");
  m.def("sparse_decode_attention", &sparse_decode_attention, "Attention over selected cache rows (CPU)");
}

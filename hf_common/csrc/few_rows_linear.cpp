// y = x @ w^T (+ bias) for inputs of a few rows, the weight streamed from memory once.
//
// For 2-16 input rows, MKL's float32 GEMM on the project's CPUs costs 1.5-3x its one-row GEMV although
// the weight, which dominates the memory traffic, is read once either way (hf_common.few_rows_linear).
// Here each pair of weight rows is loaded once and multiplied by every input row while it sits in L1:
// a 2 x 6 tile of AVX2 accumulators, the input rows read from L1/L2. Twin: torch.nn.functional.linear.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

namespace {

constexpr int64_t kTileInputs = 6;  // 2 weight rows x 6 input rows = 12 of the 16 AVX2 registers
constexpr int64_t kRowBlock = 16;   // weight rows per parallel work item

__attribute__((target("avx2,fma"))) inline float horizontal_sum(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1)));
}

// Inputs [first, first + Count) against weight rows w0 and w1 (w1 == w0 for a last odd row).
template <int64_t Count>
__attribute__((target("avx2,fma"))) void tile(const float* x, int64_t first, int64_t in_features,
                                              const float* w0, const float* w1, float* sums0, float* sums1) {
  __m256 acc0[Count], acc1[Count];
  for (int64_t i = 0; i < Count; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= in_features; c += 8) {
    const __m256 v0 = _mm256_loadu_ps(w0 + c), v1 = _mm256_loadu_ps(w1 + c);
    for (int64_t i = 0; i < Count; ++i) {
      const __m256 xi = _mm256_loadu_ps(x + (first + i) * in_features + c);
      acc0[i] = _mm256_fmadd_ps(v0, xi, acc0[i]);
      acc1[i] = _mm256_fmadd_ps(v1, xi, acc1[i]);
    }
  }
  for (int64_t i = 0; i < Count; ++i) {
    const float* row = x + (first + i) * in_features;
    float s0 = horizontal_sum(acc0[i]), s1 = horizontal_sum(acc1[i]);
    for (int64_t cc = c; cc < in_features; ++cc) {
      s0 += w0[cc] * row[cc];
      s1 += w1[cc] * row[cc];
    }
    sums0[i] = s0;
    sums1[i] = s1;
  }
}

using Tile = void (*)(const float*, int64_t, int64_t, const float*, const float*, float*, float*);
constexpr Tile kTiles[kTileInputs + 1] = {nullptr,  &tile<1>, &tile<2>, &tile<3>,
                                          &tile<4>, &tile<5>, &tile<6>};

}  // namespace

bool few_rows_linear_supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

// x: float32 [M, K] contiguous; weight: float32 [N, K] contiguous; bias: empty or float32 [N].
// Returns float32 [M, N].
torch::Tensor few_rows_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor bias) {
  TORCH_CHECK(few_rows_linear_supported(), "few_rows_linear needs a CPU with AVX2 and FMA");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(),
              "x must be contiguous float32 [M, K] on the CPU");
  TORCH_CHECK(weight.dtype() == torch::kFloat32 && weight.dim() == 2 && weight.is_contiguous() &&
                  weight.device().is_cpu() && weight.size(1) == x.size(1),
              "weight must be contiguous float32 [N, K] on the CPU, K = x.size(1)");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.dtype() == torch::kFloat32 && bias.dim() == 1 && bias.is_contiguous() &&
                            bias.size(0) == weight.size(0)),
              "bias must be empty or contiguous float32 [N]");
  const int64_t rows = x.size(0), in_features = x.size(1), out_features = weight.size(0);
  auto out = torch::empty({rows, out_features}, x.options());
  const float* x_ptr = x.data_ptr<float>();
  const float* w_ptr = weight.data_ptr<float>();
  const float* b_ptr = has_bias ? bias.data_ptr<float>() : nullptr;
  float* o_ptr = out.data_ptr<float>();
  const int64_t blocks = (out_features + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    float sums0[kTileInputs], sums1[kTileInputs];
    for (int64_t r = begin * kRowBlock; r < std::min(out_features, end * kRowBlock); r += 2) {
      const bool pair = r + 1 < out_features;
      const float* w0 = w_ptr + r * in_features;
      const float* w1 = pair ? w0 + in_features : w0;
      for (int64_t first = 0; first < rows; first += kTileInputs) {
        const int64_t count = std::min(kTileInputs, rows - first);
        kTiles[count](x_ptr, first, in_features, w0, w1, sums0, sums1);
        for (int64_t i = 0; i < count; ++i) {
          float* y = o_ptr + (first + i) * out_features + r;
          y[0] = sums0[i] + (b_ptr ? b_ptr[r] : 0.0f);
          if (pair) y[1] = sums1[i] + (b_ptr ? b_ptr[r + 1] : 0.0f);
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("few_rows_linear", &few_rows_linear, "x @ weight^T + bias for a few rows, the weight read once (CPU)");
  m.def("few_rows_linear_supported", &few_rows_linear_supported, "Whether this CPU has AVX2 and FMA");
}

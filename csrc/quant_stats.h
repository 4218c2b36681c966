// One pass over a weight tensor: MLX affine quantization error for several
// bit-widths at once and, given the base weights (or the adapter's low-rank
// factors), how much of the fine-tuning delta survives each bit-width.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "rank.h"

namespace qtools {

constexpr int kMaxBits = 6;  // bit-widths per call (2 3 4 5 6 8)

struct AnalyzeInput {
  const void* w1 = nullptr;  // fused (or only) weights, rows x cols, dtype w1_dtype
  int w1_dtype = 0;
  int64_t rows = 0, cols = 0;
  int group_size = 64;
  std::vector<int> bits;

  // Delta source, at most one of:
  const void* w0 = nullptr;  // base weights, same shape, dtype w0_dtype
  int w0_dtype = 0;
  const float* bt = nullptr;  // (rows x rank): scale * lora_b^T per row
  const float* at = nullptr;  // (experts*rank x cols): lora_a^T per expert
  int rank = 0;
  int64_t experts = 1;  // rows are split evenly between experts

  // Optional adapter subspace (orthonormal bases) for projected noise.
  const float* u = nullptr;   // (rows x rank): basis of the output subspace per expert
  const float* v = nullptr;   // (experts*cols x rank): basis of the input subspace
  int threads = 0;
  bool per_group = false;  // also hand back the per-group steps and squared errors
};

struct BitsStats {
  double sse = 0;        // sum of squared quantization error of w1
  double max_abs = 0;    // max |error|
  double dot = 0;        // <Dq, D>
  double dq2 = 0;        // |Dq|^2
  double err2 = 0;       // |Dq - D|^2
  double sub_noise = 0;  // |U^T (Dq - D) V|^2
  int64_t changed = 0;   // codes that differ between w1 and w0
  int64_t sign_agree = 0;
};

struct AnalyzeOutput {
  std::vector<BitsStats> by_bits;
  double w2 = 0;       // |W1|^2
  double d2 = 0;       // |D|^2
  double sub_d2 = 0;   // |U^T D V|^2
  int64_t nonzero_d = 0;
  int64_t nonfinite = 0;  // NaN/Inf elements found (w1 or w0)
  // Per bit-width order statistics, defined exactly as numpy's (NaN when the
  // tensor has non-finite values):
  std::vector<double> step_median;  // np.median(steps): float32 mean of the middle two
  std::vector<double> rmse_p50;     // np.percentile(sqrt(group_sse / G), [50, 99]),
  std::vector<double> rmse_p99;     // linear interpolation in float64
  // bits x groups, left uninitialised until the workers write them: zero-filling
  // megabytes per tensor first would fault every page in on one thread.
  // Kept in the output only with per_group; the order statistics read them.
  std::unique_ptr<float[]> steps;      // |stored scale| of w1
  std::unique_ptr<float[]> group_sse;  // squared error per group
  size_t groups = 0;
};

// Throws std::invalid_argument on unsupported bits/group size/shapes.
void analyze(const AnalyzeInput& in, AnalyzeOutput& out);

// Reference-friendly single bit-width quantization: codes (rows x cols),
// stored scales and biases (rows x cols/group) and the dequantized weights,
// all as MLX computes them.
void quantize_dequantize(const void* w, int dtype, int64_t rows, int64_t cols,
                         int bits, int group_size, uint8_t* codes,
                         float* scales, float* biases, float* deq);

void check_params(const std::vector<int>& bits, int group_size, int64_t cols);

}  // namespace qtools

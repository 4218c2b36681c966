// One fused LoRA tensor, bit for bit as MLX computes it on a CPU that links
// netlib's reference BLAS: out = dtype(float(W) + C) with C = sb @ at summed
// over the rank sequentially from +0.0f, no fused multiply-add; with rank 0,
// out = dtype(float(W)), MLX's astype.
#pragma once

#include <cstdint>

namespace qtools {

struct FuseInput {
  const void* w = nullptr;  // rows x cols, w_dtype (16-bit types as raw bits)
  int w_dtype = 0;
  const float* sb = nullptr;  // rows x rank: scale * B^T, as MLX computes it
  const float* at = nullptr;  // experts * rank x cols: the other factor, row-major
  void* out = nullptr;        // rows x cols, out_dtype
  int out_dtype = 0;
  int64_t rows = 0, cols = 0;
  int rank = 0;
  int64_t experts = 1;  // rows are experts x (rows / experts); expert e uses at's rows e*rank..
  int threads = 0;      // 0: all cores
};

// Returns how many output values are NaN or Inf.
int64_t fuse_lora(const FuseInput& in);

}  // namespace qtools

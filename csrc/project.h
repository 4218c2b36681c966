// Projection of per-bit-width delta errors onto the adapter's input subspace.
// Compiled on its own with FMA contraction allowed: these are statistics, not
// the MLX-exact quantization, so the order of float operations is free.
#pragma once

#include <cstdint>

#include "rank.h"

namespace qtools {

constexpr int kProjMaxRows = 6;

// c[b*r + k] += sum_j x[b*G + j] * v[j*r + k]   for b < nrows (<= 6), k < r (<= kMaxRank)
void project_rows(const float* x, int nrows, int G, const float* v, int r, double* c);

}  // namespace qtools

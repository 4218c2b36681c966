// Orthonormal bases of an adapter factor's column space, without BLAS.
#pragma once

#include <cstdint>

namespace qtools {

// out (n x r, row-major): an orthonormal basis of the column space of x, where
// x is n x r row-major, or, with transposed, given as its r x n transpose.
// Through the r x r Gram matrix in float64 and its Jacobi eigendecomposition
// (eigenvalues ascending, as numpy's eigh): columns with eigenvalue <= 1e-10 of
// the largest are zero (an untrained lora_b is all zeros). Any r >= 1 (the
// eigendecomposition is O(r^3) per sweep: meant for adapter ranks).
void orthonormal_columns(const float* x, int64_t n, int r, bool transposed, float* out);

}  // namespace qtools

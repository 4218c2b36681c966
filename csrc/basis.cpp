// Small dense linear algebra for the adapter subspace: per tensor it is
// O(n r^2) work, which numpy would hand to a threaded BLAS whose worker threads
// then spin for about 0.1 s after each call, taking a core from the kernel.
#include "basis.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <vector>

namespace qtools {

namespace {

// Cyclic Jacobi on a symmetric r x r matrix a (row-major, destroyed):
// eigenvalues w, eigenvectors as the columns of v (row-major r x r).
// Rotations are skipped once an off-diagonal entry is negligible relative to
// its diagonal pair, which keeps small eigenvalues of a Gram matrix accurate.
void jacobi_eigh(std::vector<double>& a, int r, std::vector<double>& w, std::vector<double>& v) {
  v.assign(static_cast<size_t>(r) * r, 0.0);
  for (int i = 0; i < r; ++i) v[static_cast<size_t>(i) * r + i] = 1.0;
  auto A = [&](int i, int j) -> double& { return a[static_cast<size_t>(i) * r + j]; };
  for (int sweep = 0; sweep < 100; ++sweep) {
    bool rotated = false;
    for (int p = 0; p < r; ++p) {
      for (int q = p + 1; q < r; ++q) {
        const double apq = A(p, q);
        const double app = A(p, p), aqq = A(q, q);
        if (apq == 0.0 || std::fabs(apq) <= 1e-18 * std::sqrt(std::fabs(app * aqq))) continue;
        rotated = true;
        const double theta = (aqq - app) / (2.0 * apq);
        const double t = std::fabs(theta) > 1e150
                             ? 0.5 / theta
                             : (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
        const double c = 1.0 / std::sqrt(t * t + 1.0), s = t * c;
        for (int k = 0; k < r; ++k) {  // columns p, q
          const double akp = A(k, p), akq = A(k, q);
          A(k, p) = c * akp - s * akq;
          A(k, q) = s * akp + c * akq;
        }
        for (int k = 0; k < r; ++k) {  // rows p, q
          const double apk = A(p, k), aqk = A(q, k);
          A(p, k) = c * apk - s * aqk;
          A(q, k) = s * apk + c * aqk;
        }
        A(p, q) = A(q, p) = 0.0;
        for (int k = 0; k < r; ++k) {
          double& vkp = v[static_cast<size_t>(k) * r + p];
          double& vkq = v[static_cast<size_t>(k) * r + q];
          const double x = vkp, y = vkq;
          vkp = c * x - s * y;
          vkq = s * x + c * y;
        }
      }
    }
    if (!rotated) break;
  }
  w.resize(r);
  for (int i = 0; i < r; ++i) w[i] = A(i, i);
}

}  // namespace

void orthonormal_columns(const float* x, int64_t n, int r, bool transposed, float* out) {
  if (r <= 0) throw std::invalid_argument("orthonormal_columns needs at least one column");
  const size_t rr = static_cast<size_t>(r) * r;
  const size_t nn = static_cast<size_t>(n);
  // x as r contiguous float64 columns, so every loop below runs along n
  std::vector<double> xt(rr / r * nn);
  for (int k = 0; k < r; ++k) {
    double* c = xt.data() + k * nn;
    if (transposed) {
      const float* src = x + k * nn;
      for (size_t i = 0; i < nn; ++i) c[i] = src[i];
    } else {
      for (size_t i = 0; i < nn; ++i) c[i] = x[i * r + k];
    }
  }
  // Gram matrix x^T x: dot products in 4 lanes (vectorizable, no -ffast-math needed)
  std::vector<double> gram(rr, 0.0);
  for (int p = 0; p < r; ++p) {
    for (int q = p; q < r; ++q) {
      const double* xp = xt.data() + p * nn;
      const double* xq = xt.data() + q * nn;
      double l[4] = {0, 0, 0, 0};
      size_t i = 0;
      for (; i + 4 <= nn; i += 4)
        for (int j = 0; j < 4; ++j) l[j] += xp[i + j] * xq[i + j];
      for (; i < nn; ++i) l[0] += xp[i] * xq[i];
      gram[static_cast<size_t>(p) * r + q] = gram[static_cast<size_t>(q) * r + p] = (l[0] + l[1]) + (l[2] + l[3]);
    }
  }
  std::vector<double> lam, vecs;
  jacobi_eigh(gram, r, lam, vecs);
  // ascending eigenvalues, as numpy's eigh orders them
  std::vector<int> order(r);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return lam[a] < lam[b]; });
  const double top = std::max(*std::max_element(lam.begin(), lam.end()), 0.0);
  // column j of the basis = x * eigenvector / sqrt(eigenvalue), or zero if not kept
  std::vector<double> col(nn);
  for (int j = 0; j < r; ++j) {
    const int e = order[j];
    std::fill(col.begin(), col.end(), 0.0);
    if (lam[e] > top * 1e-10) {
      const double inv = 1.0 / std::sqrt(lam[e]);
      for (int k = 0; k < r; ++k) {
        const double mk = vecs[static_cast<size_t>(k) * r + e] * inv;
        const double* xk = xt.data() + k * nn;
        for (size_t i = 0; i < nn; ++i) col[i] += mk * xk[i];
      }
    }
    for (size_t i = 0; i < nn; ++i) out[i * r + j] = static_cast<float>(col[i]);
  }
}

}  // namespace qtools

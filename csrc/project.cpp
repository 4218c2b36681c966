#include "project.h"

#include <cstring>
#include <type_traits>

namespace qtools {

namespace {

// GCC/Clang vector extensions: 4, 8 or 16 floats (AVX-512: 16 where the rank
// allows; elsewhere 4, one SSE/NEON register). Keeps the accumulators in registers and the
// vectorization over the rank, where a plain loop gets vectorized over j.
// Wider vectors than the target's registers are split poorly (through the stack).
typedef float vf4 __attribute__((vector_size(16)));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf16 __attribute__((vector_size(64)));
// 8-float vectors measured slower than 4-float ones with AVX2 (-march=haswell:
// 455 vs 330 ms per call with the projection, rank 16), so only AVX-512 goes wider.
#if defined(__AVX512F__)
constexpr int kVecFloats = 16;
#else
constexpr int kVecFloats = 4;
#endif

// acc[b][k] = sum_j x[b][j] * v[j][k], vectorized over k with v contiguous
// (the basis is stored cols x r, so a group's block is one contiguous read).
// A compile-time rank keeps the accumulators in registers; the vectors are the
// target's widest that divide the rank.
template <int N, int R, typename V>
void project_fixed(const float* x, int G, const float* v, double* c) {
  constexpr int L = sizeof(V) / sizeof(float);
  constexpr int W = R / L;
  // Independent accumulator sets over j, so that at least 8 chains of
  // multiply-adds are in flight (one row alone would wait on each add's latency).
  constexpr int S = N * W >= 8 ? 1 : (N * W >= 4 ? 2 : (N * W >= 2 ? 4 : 8));  // divides every G
  V acc[S][N][W];
  for (int p = 0; p < S; ++p)
    for (int b = 0; b < N; ++b)
      for (int q = 0; q < W; ++q) acc[p][b][q] = V{};
  for (int j0 = 0; j0 < G; j0 += S) {
    for (int p = 0; p < S; ++p) {
      const int j = j0 + p;
      V vj[W];
      std::memcpy(vj, v + static_cast<int64_t>(j) * R, sizeof vj);
      for (int b = 0; b < N; ++b) {
        const float xb = x[b * G + j];
        for (int q = 0; q < W; ++q) acc[p][b][q] += xb * vj[q];
      }
    }
  }
  for (int p = 1; p < S; ++p)
    for (int b = 0; b < N; ++b)
      for (int q = 0; q < W; ++q) acc[0][b][q] += acc[p][b][q];
  for (int b = 0; b < N; ++b) {
    float out[R];
    std::memcpy(out, acc[0][b], sizeof out);
    for (int k = 0; k < R; ++k) c[b * R + k] += out[k];
  }
}

template <int R>
bool project_rank(const float* x, int nrows, int G, const float* v, double* c) {
  using V = typename std::conditional<
      kVecFloats >= 16 && R % 16 == 0, vf16,
      typename std::conditional<kVecFloats >= 8 && R % 8 == 0, vf8, vf4>::type>::type;
  switch (nrows) {
    case 1: project_fixed<1, R, V>(x, G, v, c); return true;
    case 2: project_fixed<2, R, V>(x, G, v, c); return true;
    case 3: project_fixed<3, R, V>(x, G, v, c); return true;
    case 4: project_fixed<4, R, V>(x, G, v, c); return true;
    case 5: project_fixed<5, R, V>(x, G, v, c); return true;
    case 6: project_fixed<6, R, V>(x, G, v, c); return true;
    default: return false;
  }
}

void project_any(const float* x, int nrows, int G, const float* v, int r, double* c) {
  float acc[kProjMaxRows * kProjMaxRank];
  for (int i = 0; i < nrows * r; ++i) acc[i] = 0.0f;
  for (int j = 0; j < G; ++j) {
    const float* vj = v + static_cast<int64_t>(j) * r;
    for (int b = 0; b < nrows; ++b) {
      const float xb = x[b * G + j];
      float* ab = acc + b * r;
      for (int k = 0; k < r; ++k) ab[k] += xb * vj[k];
    }
  }
  for (int i = 0; i < nrows * r; ++i) c[i] += acc[i];
}

}  // namespace

void project_rows(const float* x, int nrows, int G, const float* v, int r, double* c) {
  bool done = false;
  switch (r) {
    case 8: done = project_rank<8>(x, nrows, G, v, c); break;
    case 16: done = project_rank<16>(x, nrows, G, v, c); break;
    case 32: done = project_rank<32>(x, nrows, G, v, c); break;
    default: break;
  }
  if (!done) project_any(x, nrows, G, v, r, c);
}

}  // namespace qtools

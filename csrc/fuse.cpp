// The LoRA fuse of one tensor (fuse.h). MLX's CPU matmul calls sgemm; netlib's
// reference sgemm zeroes C and adds the rank's products one after another
// (C += b * a, no FMA), so the sum here runs over l in the same order, one
// vector of output columns at a time, and the float32 -> float16/bfloat16
// conversions are MLX's own (mlx/types/fp16.h, bf16.h). Compiled with
// -ffp-contract=off (CMakeLists.txt): a contracted multiply-add would round once.
#include "fuse.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "pool.h"
#include "simd.h"

namespace qtools {
namespace {

using simd::vf;
using simd::vh;
using simd::vi;
using simd::vu;
constexpr int kW = simd::kW;

// The epilogue's helpers are inlined into every block: calls that pass vectors cost more than them.
#define QT_INLINE inline __attribute__((always_inline))

// MLX's _MLX_Float16(float): FP16's magic-number rounding, NaN -> sign | 0x7D00.
QT_INLINE vu to_half_bits(vf x) {
  const vu u = simd::as_u(x);
  const vu sign16 = (u & 0x80000000u) >> 16;
  vu e = u & 0x7f800000u;
  e = simd::select(simd::as_i(e) < 0x38800000, vu{} + 0x38800000u, e);
  e += 15u << 23;
  const vf magic = simd::as_f(e) + (simd::fabs_f(x) * 0x1p112f) * 0x1p-110f;
  const vu m = simd::as_u(magic);
  const vu h = sign16 | (((m >> 13) & 0x7c00u) + (m & 0x0fffu));
  return simd::select(x != x, sign16 | 0x7d00u, h);
}

// MLX's _MLX_BFloat16(float): round to nearest even, every NaN -> 0x7FC0.
QT_INLINE vu to_bf16_bits(vf x) {
  const vu u = simd::as_u(x);
  const vu r = (u + ((u >> 16) & 1u) + 0x7fffu) >> 16;
  return simd::select(x != x, vu{} + 0x7fc0u, r);
}

// Stores x as DT and returns -1 in the lanes whose stored value is NaN or Inf.
template <int DT>
QT_INLINE vi store_as(void* p, int64_t i, vf x) {
  if constexpr (DT == F32) {
    simd::store(static_cast<float*>(p) + i, x);
    return (simd::as_u(x) & 0x7f800000u) == 0x7f800000u;
  } else {
    const vu b = DT == F16 ? to_half_bits(x) : to_bf16_bits(x);
    const vh h = __builtin_convertvector(b, vh);
    std::memcpy(static_cast<uint16_t*>(p) + i, &h, sizeof h);
    const uint32_t e = DT == F16 ? 0x7c00u : 0x7f80u;
    return (b & e) == e;
  }
}

// W's float value as MLX's astype(float32) gives it: the float16 NaN that
// half_to_float leaves signalling is quieted, as MLX's conversion (a multiply) does.
template <int DT>
QT_INLINE vf load_w(const void* p, int64_t i) {
  vf x = simd::load_as_float<DT>(p, i);
  if constexpr (DT == F16) x = simd::select(x != x, simd::as_f(simd::as_u(x) | 0x00400000u), x);
  return x;
}

constexpr int kRows = 4;  // output rows sharing each vector of `at`
constexpr int kVecs = 2;  // vectors of output columns per step

struct Shared {
  const FuseInput* in;
  int64_t rows_per_expert, chunk, chunks_per_expert, nchunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> nonfinite{0};
};

// Output rows [i0, i0 + NR) x columns [j, j + NV * kW): C from +0, the rank in order.
// bad counts (negated) the lanes stored as NaN/Inf.
template <int WD, int OD, int NR, int NV>
inline void block(const FuseInput& in, const float* at, int64_t i0, int64_t j, vi& bad) {
  const int64_t cols = in.cols;
  const int r = in.rank;
  vf acc[NR][NV];
  for (int a = 0; a < NR; ++a)
    for (int v = 0; v < NV; ++v) acc[a][v] = vf{};
  for (int l = 0; l < r; ++l) {
    vf x[NV];
    for (int v = 0; v < NV; ++v) x[v] = simd::load(at + l * cols + j + v * kW);
    for (int a = 0; a < NR; ++a) {
      const vf s = simd::splat(in.sb[(i0 + a) * r + l]);
      for (int v = 0; v < NV; ++v) acc[a][v] = acc[a][v] + s * x[v];
    }
  }
  // Every load of W before the first store: a row of W is often 4 KiB past the row of out just
  // stored, and the CPU would wait for that store (4K aliasing: 2.5x slower for float16 -> float16).
  vf w[NR][NV];
  for (int a = 0; a < NR; ++a)
    for (int v = 0; v < NV; ++v) w[a][v] = load_w<WD>(in.w, (i0 + a) * cols + j + v * kW);
  for (int a = 0; a < NR; ++a)
    for (int v = 0; v < NV; ++v)  // rank 0: astype alone (W + 0 would turn -0 into +0)
      bad += store_as<OD>(in.out, (i0 + a) * cols + j + v * kW, r ? w[a][v] + acc[a][v] : w[a][v]);
}

// The last cols % kW columns of one row: the same lane arithmetic on
// zero-padded copies, so that every element takes the vector path.
template <int WD, int OD>
void tail(const FuseInput& in, const float* at, int64_t i, int64_t j, vi& bad) {
  const int n = static_cast<int>(in.cols - j);
  const int r = in.rank;
  const size_t esz = WD == F32 ? 4 : 2, osz = OD == F32 ? 4 : 2;
  vf acc = vf{};
  for (int l = 0; l < r; ++l) {
    float t[kW] = {};
    std::memcpy(t, at + l * in.cols + j, n * sizeof(float));
    acc = acc + simd::splat(in.sb[i * r + l]) * simd::load(t);
  }
  alignas(32) unsigned char wb[kW * 4] = {}, ob[kW * 4];
  std::memcpy(wb, static_cast<const unsigned char*>(in.w) + (i * in.cols + j) * esz, n * esz);
  const vi nf = store_as<OD>(ob, 0, r ? load_w<WD>(wb, 0) + acc : load_w<WD>(wb, 0));
  for (int k = 0; k < n; ++k) bad[k] += nf[k];  // the padding lanes do not count
  std::memcpy(static_cast<unsigned char*>(in.out) + (i * in.cols + j) * osz, ob, n * osz);
}

template <int WD, int OD, int NR>
void rows(const FuseInput& in, const float* at, int64_t i0, vi& bad) {
  const int64_t full = in.cols / kW * kW;
  int64_t j = 0;
  for (; j + kVecs * kW <= full; j += kVecs * kW) block<WD, OD, NR, kVecs>(in, at, i0, j, bad);
  for (; j < full; j += kW) block<WD, OD, NR, 1>(in, at, i0, j, bad);
  if (j < in.cols)
    for (int a = 0; a < NR; ++a) tail<WD, OD>(in, at, i0 + a, j, bad);
}

template <int WD, int OD>
void worker(Shared& sh) {
  const FuseInput& in = *sh.in;
  for (;;) {
    const int64_t c = sh.next.fetch_add(1);
    if (c >= sh.nchunks) return;
    const int64_t e = c / sh.chunks_per_expert;
    const int64_t first = e * sh.rows_per_expert + (c % sh.chunks_per_expert) * sh.chunk;
    const int64_t last = std::min(first + sh.chunk, (e + 1) * sh.rows_per_expert);
    const float* at = in.at + e * in.rank * in.cols;
    int64_t n = 0;
    auto flush = [&n](vi& bad) {  // per few rows: int32 lanes never overflow
      for (int k = 0; k < kW; ++k) n -= bad[k];
      bad = vi{};
    };
    vi bad = vi{};
    int64_t i = first;
    for (; i + kRows <= last; i += kRows) {
      rows<WD, OD, kRows>(in, at, i, bad);
      flush(bad);
    }
    for (; i < last; ++i) rows<WD, OD, 1>(in, at, i, bad);
    flush(bad);
    if (n) sh.nonfinite += n;
  }
}

using Worker = void (*)(Shared&);

template <int WD>
Worker pick_out(int od) {
  if (od == F16) return worker<WD, F16>;
  if (od == BF16) return worker<WD, BF16>;
  return worker<WD, F32>;
}

Worker pick(int wd, int od) {
  if (wd == F16) return pick_out<F16>(od);
  if (wd == BF16) return pick_out<BF16>(od);
  return pick_out<F32>(od);
}

}  // namespace

int64_t fuse_lora(const FuseInput& in) {
  Shared sh;
  sh.in = &in;
  sh.rows_per_expert = in.rows / in.experts;
  int threads = in.threads > 0 ? in.threads : static_cast<int>(std::thread::hardware_concurrency());
  // Small tensors are not worth a thread each: aim for >= 256K elements per thread.
  threads = static_cast<int>(std::clamp<int64_t>(in.rows * in.cols / (1 << 18), 1, std::max(1, threads)));
  sh.chunk = std::max<int64_t>(kRows, (sh.rows_per_expert / (threads * 8)) / kRows * kRows);
  sh.chunks_per_expert = (sh.rows_per_expert + sh.chunk - 1) / sh.chunk;
  sh.nchunks = sh.chunks_per_expert * in.experts;
  if (in.rows == 0 || in.cols == 0) return 0;
  Worker fn = pick(in.w_dtype, in.out_dtype);
  run_workers(threads, sh, fn);
  return sh.nonfinite.load();
}

}  // namespace qtools

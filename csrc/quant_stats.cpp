#include "quant_stats.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <type_traits>

#include "affine.h"
#include "project.h"
#include "pool.h"
#include "simd.h"

namespace qtools {

namespace {

// The worker's steps are small functions for reading; inlined into it, they
// compile to the one loop nest they were (the compiler would not inline them all
// on its own: each is shared by several worker instantiations).
#define QTOOLS_INLINE inline __attribute__((always_inline))

enum Mode { kNoDelta = 0, kBase = 1, kLowRank = 2 };
constexpr int kMaxGroup = 128;
// Logical lanes of every per-element reduction: fixed, so the sums are the same
// bits on every target; kRegs registers of simd::kW floats hold them.
constexpr int kLanes = 16;
using simd::kW;
using simd::vf;
using simd::vi;
constexpr int kRegs = kLanes / kW;
static_assert(kLanes % kW == 0, "lanes fill whole registers");
static_assert(kMaxGroup % kLanes == 0, "every group size is a multiple of the lanes");
constexpr int kLutSize = 32;  // dequantization tables for up to 5-bit codes

// Table of the dequantized values of the codes 0..31 of one group, held in
// four registers and read with variable two-register permutes, where GCC lowers
// __builtin_shuffle to them: AVX-512 (two vpermt2ps and a blend per 8 values,
// 6% faster than computing the two roundings). With AVX2 (vpermps) it measured
// no faster; SSE, NEON and Clang (no variable vector shuffle) compute them.
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__) && defined(__AVX512VL__)
constexpr bool kHaveLut = true;
alignas(64) constexpr float kIota[kLutSize] = {0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10,
                                               11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
                                               22, 23, 24, 25, 26, 27, 28, 29, 30, 31};
struct Lut {
  static_assert(kW == 8, "AVX-512 builds use 8-float vectors (simd.h)");
  vf t[kLutSize / kW];
  template <int DT>
  void build(vf scale_t, vf bias_t) {
    for (int c = 0; c < kLutSize / kW; ++c)
      t[c] = simd::dequant<DT>(simd::load(kIota + c * kW), scale_t, bias_t);
  }
  // codes q: integral floats in [0, kLutSize)
  vf lookup(vf q) const {
    const vi idx = __builtin_convertvector(q, vi);
    const vf lo = __builtin_shuffle(t[0], t[1], idx);  // mask taken modulo 16
    const vf hi = __builtin_shuffle(t[2], t[3], idx);
    return simd::select((idx & 16) != 0, hi, lo);
  }
};
#else
constexpr bool kHaveLut = false;
struct Lut {
  template <int DT>
  void build(vf, vf) {}
  vf lookup(vf q) const { return q; }
};
#endif

bool supported_bits(int b) {
  return b == 2 || b == 3 || b == 4 || b == 5 || b == 6 || b == 8;
}

struct Shared {
  const AnalyzeInput* in;
  AnalyzeOutput* out;
  int64_t groups_per_row;
  int64_t rows_per_expert;
  std::atomic<int64_t> next_row{0};
  int64_t chunk;
  std::mutex mu;
  // Subspace projections U^T X V, summed over threads per expert before squaring.
  std::vector<double> m_err;  // experts x bits x rank x rank
  std::vector<double> m_d;    // experts x rank x rank
  // Adapter factor A with rows padded: at a power-of-two row stride the rank's
  // rows all fall in the same L1 sets, and each group reads all of them.
  std::vector<float> at_padded;
  const float* at = nullptr;
  int64_t at_stride = 0;
};

enum BitSum { kDot = 0, kDq2, kErr2, kChanged, kAgree, kBitSums };

struct Local {
  std::vector<BitsStats> s;
  double w2 = 0, d2 = 0;
  int64_t nonzero_d = 0, nonfinite = 0;
  // Sums kept per lane across groups, folded once at the end: a vector add per
  // group instead of a serial 16-term sum. Float lanes widen to double; the
  // counts are exact in any order.
  double w2_l[kLanes] = {}, d2_l[kLanes] = {}, nz_l[kLanes] = {};
  std::vector<double> bits_l;   // bits x kBitSums x kLanes
  std::vector<float> maxabs_l;  // bits x kLanes
  // per-row projections onto the input basis: bits x rank, and the delta's
  std::vector<double> c_err, c_d;
  // U^T X V for the expert being processed
  std::vector<double> m_err, m_d;
  int64_t cur_expert = -1;

  Local(int nbits, int r, bool sub) {
    s.resize(nbits);
    bits_l.assign(static_cast<size_t>(nbits) * kBitSums * kLanes, 0.0);
    maxabs_l.assign(static_cast<size_t>(nbits) * kLanes, 0.0f);
    if (sub) {
      c_err.assign(static_cast<size_t>(nbits) * r, 0.0);
      c_d.assign(r, 0.0);
      m_err.assign(static_cast<size_t>(nbits) * r * r, 0.0);
      m_d.assign(static_cast<size_t>(r) * r, 0.0);
    }
  }
};

// One group's values as float, for the fused weights, the base and the delta,
// and the delta's error per bit-width (read by the projection).
struct GroupBuffers {
  alignas(64) float w1[kMaxGroup];
  alignas(64) float w0[kMaxGroup];
  alignas(64) float d[kMaxGroup];
  alignas(64) float ed[kMaxBits * kMaxGroup];
};

// What the group's quantization parameters are computed from.
struct GroupRange {
  float mn = INFINITY, mx = -INFINITY;
  float nonfinite = 0.0f;  // count of NaN/Inf elements
};

// Lanes of per-element sums of one group and one bit-width.
struct ErrorLanes {
  alignas(64) float sse[kLanes];
  alignas(64) float max[kLanes];  // max |error|
};
struct DeltaLanes {
  alignas(64) float dot[kLanes], dq2[kLanes], err2[kLanes], chg[kLanes], agree[kLanes];
};

// A group's GroupParams in every lane.
struct VecParams {
  vf scale, bias, scale_t, bias_t;
  explicit VecParams(const GroupParams& p)
      : scale(simd::splat(p.scale)), bias(simd::splat(p.bias)),
        scale_t(simd::splat(p.scale_t)), bias_t(simd::splat(p.bias_t)) {}
};

// Reductions run in kLanes independent lanes (lane l takes the elements j with
// j % kLanes == l, in order), kRegs target registers of kW each: vectorized
// without reassociating float sums (no -ffast-math), and the same sums, bit
// for bit, on every target.

// Min, max and non-finite count of the lanes, folded in lane order.
QTOOLS_INLINE void fold_range(const vf* v_nf, const vf* v_mn, const vf* v_mx, GroupRange& rg) {
  float l_nf[kLanes], l_mn[kLanes], l_mx[kLanes];
  std::memcpy(l_nf, v_nf, sizeof l_nf);
  std::memcpy(l_mn, v_mn, sizeof l_mn);
  std::memcpy(l_mx, v_mx, sizeof l_mx);
  for (int l = 0; l < kLanes; ++l) {
    rg.nonfinite += l_nf[l];
    rg.mn = min_f(rg.mn, l_mn[l]); rg.mx = max_f(rg.mx, l_mx[l]);
  }
}

QTOOLS_INLINE void add_lanes(double* acc, const vf* v) {
  float l[kLanes];
  std::memcpy(l, v, sizeof l);
  for (int i = 0; i < kLanes; ++i) acc[i] += l[i];
}

// Step 1: read the fused weights of group [base, base + G) as float into w1,
// add |W1|^2 to the lanes w2_l and return their range.
template <int DT1>
QTOOLS_INLINE GroupRange load_fused_group(const void* src, int64_t base, int G, float* w1, double* w2_l) {
  vf v_w2[kRegs], v_nf[kRegs], v_mn[kRegs], v_mx[kRegs];
  for (int q = 0; q < kRegs; ++q) {
    v_w2[q] = vf{}; v_nf[q] = vf{}; v_mn[q] = simd::splat(INFINITY); v_mx[q] = simd::splat(-INFINITY);
  }
  for (int j0 = 0; j0 < G; j0 += kLanes) {
    for (int q = 0; q < kRegs; ++q) {
      const int j = j0 + q * kW;
      const vf x = simd::load_as_float<DT1>(src, base + j);
      v_nf[q] += simd::ones_where(~simd::is_finite_bits(x));
      simd::store(w1 + j, x);
      v_w2[q] += x * x;
      v_mn[q] = simd::min_f(v_mn[q], x);
      v_mx[q] = simd::max_f(v_mx[q], x);
    }
  }
  GroupRange rg;
  fold_range(v_nf, v_mn, v_mx, rg);
  add_lanes(w2_l, v_w2);
  return rg;
}

// Step 2a: the base weights as given, as float.
template <int DT0>
QTOOLS_INLINE void load_base_group(const void* src, int64_t base, int G, float* w0) {
  for (int j = 0; j < G; j += kW) simd::store(w0 + j, simd::load_as_float<DT0>(src, base + j));
}

// Step 2b: the base rebuilt from the adapter, W0 = W1 - scale * B^T A^T, rounded
// to the fused dtype as the base was stored. brow: the row's r values of scale *
// B^T; acol: the group's first column of A^T, rows at_stride apart. kLanes
// columns at a time, so the partial sums stay in registers over k.
template <int DT1>
QTOOLS_INLINE void rebuild_base_group(const float* w1, const float* brow, const float* acol, int64_t at_stride,
                                      int r, int G, float* w0) {
  for (int j0 = 0; j0 < G; j0 += kLanes) {
    vf v_d[kRegs];
    for (int q = 0; q < kRegs; ++q) v_d[q] = vf{};
    for (int k = 0; k < r; ++k) {
      const vf bk = simd::splat(brow[k]);
      const float* arow = acol + k * at_stride + j0;
      for (int q = 0; q < kRegs; ++q) v_d[q] += bk * simd::load(arow + q * kW);
    }
    for (int q = 0; q < kRegs; ++q) {
      const int j = j0 + q * kW;
      simd::store(w0 + j, simd::round_to<DT1>(simd::load(w1 + j) - v_d[q]));
    }
  }
}

// Step 3: the delta D = W1 - W0 into d, |D|^2 and its nonzero count into the
// lanes d2_l and nz_l; returns the base's range.
QTOOLS_INLINE GroupRange delta_group(const float* w1, const float* w0, int G, float* d, double* d2_l,
                                     double* nz_l) {
  vf v_d2[kRegs], v_nz[kRegs], v_nf[kRegs], v_mn[kRegs], v_mx[kRegs];
  for (int q = 0; q < kRegs; ++q) {
    v_d2[q] = vf{}; v_nz[q] = vf{}; v_nf[q] = vf{};
    v_mn[q] = simd::splat(INFINITY); v_mx[q] = simd::splat(-INFINITY);
  }
  for (int j0 = 0; j0 < G; j0 += kLanes) {
    for (int q = 0; q < kRegs; ++q) {
      const int j = j0 + q * kW;
      const vf x0 = simd::load(w0 + j);
      const vf dj = simd::load(w1 + j) - x0;
      simd::store(d + j, dj);
      v_nf[q] += simd::ones_where(~simd::is_finite_bits(x0));
      v_d2[q] += dj * dj;
      v_nz[q] += simd::ones_where(dj != 0.0f);
      v_mn[q] = simd::min_f(v_mn[q], x0);
      v_mx[q] = simd::max_f(v_mx[q], x0);
    }
  }
  GroupRange rg;
  fold_range(v_nf, v_mn, v_mx, rg);
  add_lanes(d2_l, v_d2);
  add_lanes(nz_l, v_nz);
  return rg;
}

// Step 4a (no delta): quantization error lanes of the fused weights at one bit-width.
template <int DT1>
QTOOLS_INLINE void error_lanes(const float* w1, int G, vf v_nb, const VecParams& p1, ErrorLanes& out) {
  for (int q = 0; q < kRegs; ++q) {
    vf v_sse = vf{}, v_max = vf{};
    for (int j = q * kW; j < G; j += kLanes) {
      const vf x = simd::load(w1 + j);
      const vf q1 = simd::quant_code(x, p1.scale, p1.bias, v_nb);
      const vf e1 = simd::dequant<DT1>(q1, p1.scale_t, p1.bias_t) - x;
      v_sse += e1 * e1;
      v_max = simd::max_f(v_max, simd::fabs_f(e1));
    }
    simd::store(out.sse + q * kW, v_sse);
    simd::store(out.max + q * kW, v_max);
  }
}

// Step 4b (with a delta): the fused and the base weights quantized at one
// bit-width, the error lanes of the fused ones and the lanes of the delta's
// agreement; with SUB the delta's error Dq - D into ed. With few codes (<= 5
// bits) and a register permute to look them up (LUT), a per-group table of
// dequantized values, built with the same dequant(), replaces two float16
// roundings per element.
template <int DT1, int DTB, bool LUT, bool SUB>
QTOOLS_INLINE void delta_error_lanes(const GroupBuffers& buf, int G, vf v_nb, const VecParams& p1,
                                     const VecParams& p0, float* ed, ErrorLanes& el, DeltaLanes& dl) {
  Lut lut1, lut0;
  if constexpr (LUT) {
    lut1.template build<DT1>(p1.scale_t, p1.bias_t);
    lut0.template build<DTB>(p0.scale_t, p0.bias_t);
  }
  for (int q = 0; q < kRegs; ++q) {
    vf v_sse = vf{}, v_max = vf{}, v_dot = vf{}, v_dq2 = vf{}, v_err2 = vf{};
    vf v_chg = vf{}, v_agree = vf{};
    for (int j = q * kW; j < G; j += kLanes) {
      const vf x1 = simd::load(buf.w1 + j), dj = simd::load(buf.d + j);
      const vf q1 = simd::quant_code(x1, p1.scale, p1.bias, v_nb);
      const vf q0 = simd::quant_code(simd::load(buf.w0 + j), p0.scale, p0.bias, v_nb);
      vf y1, y0;
      if constexpr (LUT) {
        y1 = lut1.lookup(q1);
        y0 = lut0.lookup(q0);
      } else {
        y1 = simd::dequant<DT1>(q1, p1.scale_t, p1.bias_t);
        y0 = simd::dequant<DTB>(q0, p0.scale_t, p0.bias_t);
      }
      const vf e1 = y1 - x1;
      const vf dq = y1 - y0;
      const vf de = dq - dj;
      v_sse += e1 * e1;
      v_max = simd::max_f(v_max, simd::fabs_f(e1));
      v_dot += dq * dj;
      v_dq2 += dq * dq;
      v_err2 += de * de;
      v_chg += simd::ones_where(q1 != q0);
      v_agree += simd::ones_where(dq * dj > 0.0f);
      if constexpr (SUB) simd::store(ed + j, de);
    }
    simd::store(el.sse + q * kW, v_sse);
    simd::store(el.max + q * kW, v_max);
    simd::store(dl.dot + q * kW, v_dot);
    simd::store(dl.dq2 + q * kW, v_dq2);
    simd::store(dl.err2 + q * kW, v_err2);
    simd::store(dl.chg + q * kW, v_chg);
    simd::store(dl.agree + q * kW, v_agree);
  }
}

// Step 5a: the group's own squared error (kept per group, summed in lane
// order) and max-error lanes into one bit-width's stats; returns the sum.
QTOOLS_INLINE float accumulate_error_lanes(const ErrorLanes& el, BitsStats& st, float* maxabs_l) {
  float sse = 0.0f;
  for (int l = 0; l < kLanes; ++l) sse += el.sse[l];
  st.sse += sse;
  for (int l = 0; l < kLanes; ++l) maxabs_l[l] = max_f(maxabs_l[l], el.max[l]);
  return sse;
}

// Step 5b: the delta lanes into one bit-width's sums (kBitSums x kLanes).
QTOOLS_INLINE void accumulate_delta_lanes(double* acc, const DeltaLanes& dl) {
  for (int l = 0; l < kLanes; ++l) {
    acc[kDot * kLanes + l] += dl.dot[l];
    acc[kDq2 * kLanes + l] += dl.dq2[l];
    acc[kErr2 * kLanes + l] += dl.err2[l];
    acc[kChanged * kLanes + l] += dl.chg[l];
    acc[kAgree * kLanes + l] += dl.agree[l];
  }
}

// Step 6 (SUB, once per row): fold the row's input-side projections c_err and
// c_d into U^T X V of the current expert, then clear them.
QTOOLS_INLINE void fold_row_projection(Local& lo, const float* urow, int nbits, int r) {
  for (int p = 0; p < r; ++p) {
    const double up = urow[p];
    for (int b = 0; b < nbits; ++b) {
      const double* c = lo.c_err.data() + static_cast<size_t>(b) * r;
      double* m = lo.m_err.data() + (static_cast<size_t>(b) * r + p) * r;
      for (int k = 0; k < r; ++k) m[k] += up * c[k];
    }
    double* md = lo.m_d.data() + static_cast<size_t>(p) * r;
    for (int k = 0; k < r; ++k) md[k] += up * lo.c_d[k];
  }
  std::fill(lo.c_err.begin(), lo.c_err.end(), 0.0);
  std::fill(lo.c_d.begin(), lo.c_d.end(), 0.0);
}

// Step 7 (SUB): the current expert's U^T X V into the shared sums.
void flush_expert(Shared& sh, Local& lo, int nbits, int r) {
  if (lo.cur_expert < 0) return;
  std::lock_guard<std::mutex> lock(sh.mu);
  size_t e = static_cast<size_t>(lo.cur_expert);
  size_t rr = static_cast<size_t>(r) * r;
  for (size_t i = 0; i < nbits * rr; ++i) sh.m_err[e * nbits * rr + i] += lo.m_err[i];
  for (size_t i = 0; i < rr; ++i) sh.m_d[e * rr + i] += lo.m_d[i];
  std::fill(lo.m_err.begin(), lo.m_err.end(), 0.0);
  std::fill(lo.m_d.begin(), lo.m_d.end(), 0.0);
}

// Step 8: fold the thread's lanes into its totals, once at the end.
void fold_lanes(Local& lo, int nbits) {
  for (int b = 0; b < nbits; ++b) {
    BitsStats& st = lo.s[b];
    const double* acc = lo.bits_l.data() + static_cast<size_t>(b) * kBitSums * kLanes;
    double chg = 0.0, agree = 0.0;
    float mabs = 0.0f;
    for (int l = 0; l < kLanes; ++l) {
      st.dot += acc[kDot * kLanes + l];
      st.dq2 += acc[kDq2 * kLanes + l];
      st.err2 += acc[kErr2 * kLanes + l];
      chg += acc[kChanged * kLanes + l];
      agree += acc[kAgree * kLanes + l];
      mabs = max_f(mabs, lo.maxabs_l[static_cast<size_t>(b) * kLanes + l]);
    }
    st.changed = static_cast<int64_t>(chg);
    st.sign_agree = static_cast<int64_t>(agree);
    st.max_abs = mabs;
  }
  double nz = 0.0;
  for (int l = 0; l < kLanes; ++l) {
    lo.w2 += lo.w2_l[l];
    lo.d2 += lo.d2_l[l];
    nz += lo.nz_l[l];
  }
  lo.nonzero_d = static_cast<int64_t>(nz);
}

// Step 9: the thread's totals into the output.
void merge_into_output(Shared& sh, const Local& lo, int nbits) {
  std::lock_guard<std::mutex> lock(sh.mu);
  AnalyzeOutput& out = *sh.out;
  for (int b = 0; b < nbits; ++b) {
    BitsStats& o = out.by_bits[b];
    const BitsStats& s = lo.s[b];
    o.sse += s.sse;
    o.max_abs = std::max(o.max_abs, s.max_abs);
    o.dot += s.dot;
    o.dq2 += s.dq2;
    o.err2 += s.err2;
    o.changed += s.changed;
    o.sign_agree += s.sign_agree;
  }
  out.w2 += lo.w2;
  out.d2 += lo.d2;
  out.nonzero_d += lo.nonzero_d;
  out.nonfinite += lo.nonfinite;
}

// One worker thread: takes rows in chunks until none are left; per group, steps
// 1-5 for every bit-width; per row, step 6; at the end steps 7-9.
template <int DT1, int MODE, int DT0, bool SUB>
void worker(Shared& sh) {
  const AnalyzeInput& in = *sh.in;
  const int G = in.group_size;
  const int nbits = static_cast<int>(in.bits.size());
  const int r = in.rank;
  const int64_t cols = in.cols;
  const int64_t ngroups_total = in.rows * sh.groups_per_row;
  // The base's dtype: its own when given, the fused dtype when rebuilt from the adapter.
  constexpr int DTB = MODE == kBase ? DT0 : DT1;

  Local lo(nbits, r, SUB);
  float nb[kMaxBits];
  for (int b = 0; b < nbits; ++b) nb[b] = static_cast<float>((1 << in.bits[b]) - 1);
  GroupBuffers buf;

  for (;;) {
    int64_t r0 = sh.next_row.fetch_add(sh.chunk);
    if (r0 >= in.rows) break;
    int64_t r1 = std::min(in.rows, r0 + sh.chunk);
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t e = i / sh.rows_per_expert;
      if (SUB && e != lo.cur_expert) {
        flush_expert(sh, lo, nbits, r);
        lo.cur_expert = e;
      }
      for (int64_t g = 0; g < sh.groups_per_row; ++g) {
        const int64_t base = i * cols + g * G;
        const int64_t gidx = i * sh.groups_per_row + g;
        const GroupRange rg1 = load_fused_group<DT1>(in.w1, base, G, buf.w1, lo.w2_l);
        float nonfinite = rg1.nonfinite;
        GroupRange rg0;
        if constexpr (MODE != kNoDelta) {
          if constexpr (MODE == kBase) {
            load_base_group<DT0>(in.w0, base, G, buf.w0);
          } else {
            rebuild_base_group<DT1>(buf.w1, in.bt + i * r, sh.at + e * r * sh.at_stride + g * G,
                                    sh.at_stride, r, G, buf.w0);
          }
          rg0 = delta_group(buf.w1, buf.w0, G, buf.d, lo.d2_l, lo.nz_l);
          nonfinite += rg0.nonfinite;  // small integers: exact
          if constexpr (SUB) project_rows(buf.d, 1, G, in.v + (e * cols + g * G) * r, r, lo.c_d.data());
        }
        if (nonfinite != 0.0f) {
          lo.nonfinite += static_cast<int64_t>(nonfinite);
          for (int b = 0; b < nbits; ++b) {
            sh.out->steps[static_cast<size_t>(b) * ngroups_total + gidx] = NAN;
            sh.out->group_sse[static_cast<size_t>(b) * ngroups_total + gidx] = NAN;
          }
          continue;
        }

        for (int b = 0; b < nbits; ++b) {
          const float n_bins = nb[b];
          const vf v_nb = simd::splat(n_bins);
          const GroupParams p1 = group_params<DT1>(rg1.mn, rg1.mx, n_bins);
          ErrorLanes el;
          if constexpr (MODE == kNoDelta) {
            error_lanes<DT1>(buf.w1, G, v_nb, VecParams(p1), el);
          } else {
            const GroupParams p0 = group_params<DTB>(rg0.mn, rg0.mx, n_bins);
            DeltaLanes dl;
            float* ed = buf.ed + b * G;
            if (kHaveLut && DT1 != F32 && n_bins < static_cast<float>(kLutSize)) {
              delta_error_lanes<DT1, DTB, kHaveLut, SUB>(buf, G, v_nb, VecParams(p1), VecParams(p0), ed, el, dl);
            } else {
              delta_error_lanes<DT1, DTB, false, SUB>(buf, G, v_nb, VecParams(p1), VecParams(p0), ed, el, dl);
            }
            accumulate_delta_lanes(lo.bits_l.data() + static_cast<size_t>(b) * kBitSums * kLanes, dl);
          }
          const float sse = accumulate_error_lanes(el, lo.s[b], lo.maxabs_l.data() + static_cast<size_t>(b) * kLanes);
          sh.out->steps[static_cast<size_t>(b) * ngroups_total + gidx] = std::fabs(p1.scale_t);
          sh.out->group_sse[static_cast<size_t>(b) * ngroups_total + gidx] = sse;
        }
        if constexpr (SUB) project_rows(buf.ed, nbits, G, in.v + (e * cols + g * G) * r, r, lo.c_err.data());
      }
      if constexpr (SUB) fold_row_projection(lo, in.u + i * r, nbits, r);
    }
  }
  if (SUB) flush_expert(sh, lo, nbits, r);
  fold_lanes(lo, nbits);
  merge_into_output(sh, lo, nbits);
}

using WorkerFn = void (*)(Shared&);

template <int DT1, int MODE, int DT0>
WorkerFn pick_sub(bool sub) {
  if constexpr (MODE == kNoDelta) {
    return &worker<DT1, MODE, DT0, false>;
  } else {
    return sub ? &worker<DT1, MODE, DT0, true> : &worker<DT1, MODE, DT0, false>;
  }
}

template <int DT1>
WorkerFn pick_mode(int mode, int dt0, bool sub) {
  if (mode == kNoDelta) return pick_sub<DT1, kNoDelta, F32>(false);
  if (mode == kLowRank) return pick_sub<DT1, kLowRank, F32>(sub);
  switch (dt0) {
    case F32: return pick_sub<DT1, kBase, F32>(sub);
    case F16: return pick_sub<DT1, kBase, F16>(sub);
    default: return pick_sub<DT1, kBase, BF16>(sub);
  }
}

WorkerFn pick(int dt1, int mode, int dt0, bool sub) {
  switch (dt1) {
    case F32: return pick_mode<F32>(mode, dt0, sub);
    case F16: return pick_mode<F16>(mode, dt0, sub);
    default: return pick_mode<BF16>(mode, dt0, sub);
  }
}

// ---- Order statistics with numpy's definitions -------------------------------

// Per-thread scratch for the selections.
struct SelectScratch {
  std::vector<uint32_t> hist;   // 2^15 bins: high bits of a non-negative float
  std::vector<int8_t> slot;     // bin -> candidate list, -1 if none
  std::vector<float> cand[4];
  std::vector<float> buf;
};

// Exact order statistics by introselect on a copy: values of ranks[0..nr)
// (0-based, sorted ascending, duplicates allowed).
void select_small(const float* x, size_t n, const size_t* ranks, int nr, float* out,
                  std::vector<float>& buf) {
  buf.assign(x, x + n);
  size_t lo = 0;
  for (int i = 0; i < nr; ++i) {
    const size_t k = ranks[i];
    if (k >= lo) {
      if (k == lo) {  // the next rank up: the minimum of what is left
        std::iter_swap(buf.begin() + lo, std::min_element(buf.begin() + lo, buf.end()));
      } else {
        std::nth_element(buf.begin() + lo, buf.begin() + k, buf.end());
      }
      lo = k + 1;
    }
    out[i] = buf[k];
  }
}

// The same for non-negative, non-NaN floats (whose bit patterns sort like the
// values), in two streaming passes: a histogram of the high 15 value bits
// finds the bin of each wanted rank, then only the values in those bins are
// copied and selected among. Ranks in any order (at most 4), x is not modified.
void select_ranks(const float* x, size_t n, const size_t* ranks_in, int nr, float* out_in,
                  SelectScratch& s) {
  int order[4];
  for (int i = 0; i < nr; ++i) order[i] = i;
  std::sort(order, order + nr, [&](int a, int b) { return ranks_in[a] < ranks_in[b]; });
  size_t ranks[4];
  float out[4];
  for (int i = 0; i < nr; ++i) ranks[i] = ranks_in[order[i]];
  if (n <= (1u << 15)) {
    select_small(x, n, ranks, nr, out, s.buf);
  } else {
    constexpr int kBins = 1 << 15;
    auto key = [](float f) { return (float_to_bits(f) >> 16) & (kBins - 1); };
    s.hist.assign(kBins, 0);
    for (size_t i = 0; i < n; ++i) ++s.hist[key(x[i])];
    // bin of each rank and the rank's position inside it
    uint32_t bin[4];
    size_t within[4];
    size_t cum = 0;
    uint32_t b = 0;
    for (int i = 0; i < nr; ++i) {
      while (cum + s.hist[b] <= ranks[i]) cum += s.hist[b++];
      bin[i] = b;
      within[i] = ranks[i] - cum;
    }
    s.slot.assign(kBins, -1);
    int nslots = 0;
    int slot_of[4];
    for (int i = 0; i < nr; ++i) {
      if (s.slot[bin[i]] < 0) {
        s.cand[nslots].clear();
        s.cand[nslots].reserve(s.hist[bin[i]]);
        s.slot[bin[i]] = static_cast<int8_t>(nslots++);
      }
      slot_of[i] = s.slot[bin[i]];
    }
    for (size_t i = 0; i < n; ++i) {
      const int sl = s.slot[key(x[i])];
      if (sl >= 0) s.cand[sl].push_back(x[i]);
    }
    // the ranks of one bin are consecutive (bins ascend with the ranks)
    for (int i = 0; i < nr;) {
      int j = i;
      size_t w[4];
      while (j < nr && slot_of[j] == slot_of[i]) { w[j - i] = within[j]; ++j; }
      const std::vector<float>& c = s.cand[slot_of[i]];
      select_small(c.data(), c.size(), w, j - i, out + i, s.buf);
      i = j;
    }
  }
  for (int i = 0; i < nr; ++i) out_in[order[i]] = out[i];
}

// np.median of float32 values: the middle one, or the float32 mean of the two.
float median_f32(const float* x, size_t n, SelectScratch& s) {
  float v[2];
  if (n % 2) {
    const size_t k = (n - 1) / 2;
    select_ranks(x, n, &k, 1, v, s);
    return v[0];
  }
  const size_t k[2] = {n / 2 - 1, n / 2};
  select_ranks(x, n, k, 2, v, s);
  return (v[0] + v[1]) / 2.0f;
}

// np.percentile(f(x), [100*q]) with method="linear", for a non-decreasing f,
// replicating numpy's float operations: virtual index (n-1)*q in float64, the
// two neighbours (the last one twice at or past the end), their float32
// difference, and the lerp in float64 from the nearer side.
void percentiles(const float* x, size_t n, const double* q, int nq, float (*f)(float, float), float farg,
                 double* out, SelectScratch& s) {
  size_t ranks[4];
  double gamma[2];
  for (int i = 0; i < nq; ++i) {
    const double vi = static_cast<double>(n - 1) * q[i];
    double prev = std::floor(vi);
    size_t lo, hi;
    if (vi >= static_cast<double>(n - 1)) {
      lo = hi = n - 1;
      prev = -1.0;  // numpy indexes the last element as -1, and gamma follows
    } else {
      lo = static_cast<size_t>(prev);
      hi = lo + 1;
    }
    gamma[i] = vi - prev;
    ranks[2 * i] = lo;
    ranks[2 * i + 1] = hi;
  }
  float v[4];
  select_ranks(x, n, ranks, 2 * nq, v, s);
  for (int i = 0; i < nq; ++i) {
    const float a = f(v[2 * i], farg), b = f(v[2 * i + 1], farg);
    const float diff = b - a;
    const double t = gamma[i];
    out[i] = t >= 0.5 ? static_cast<double>(b) - static_cast<double>(diff) * (1.0 - t)
                      : static_cast<double>(a) + static_cast<double>(diff) * t;
  }
}

float group_rmse(float sse, float g) { return std::sqrt(sse / g); }

// Median step and group-RMSE percentiles of every bit-width, spread over threads.
void order_statistics(const AnalyzeInput& in, AnalyzeOutput& out, int threads) {
  const int nbits = static_cast<int>(in.bits.size());
  const size_t n = out.groups;
  out.step_median.assign(nbits, NAN);
  out.rmse_p50.assign(nbits, NAN);
  out.rmse_p99.assign(nbits, NAN);
  if (out.nonfinite) return;  // numpy's answer with NaN among the values
  std::atomic<int> next{0};
  auto run = [&] {
    SelectScratch s;
    for (int t; (t = next.fetch_add(1)) < 2 * nbits;) {
      const int b = t / 2;
      if (t % 2 == 0) {
        out.step_median[b] = median_f32(out.steps.get() + b * n, n, s);
      } else {
        static const double q[2] = {50.0 / 100.0, 99.0 / 100.0};
        double p[2];
        percentiles(out.group_sse.get() + b * n, n, q, 2, group_rmse, static_cast<float>(in.group_size), p, s);
        out.rmse_p50[b] = p[0];
        out.rmse_p99[b] = p[1];
      }
    }
  };
  threads = std::max(1, std::min(threads, 2 * nbits));
  if (threads == 1) {
    run();
  } else {
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) pool.emplace_back(run);
    for (auto& t : pool) t.join();
  }
}

}  // namespace

void check_params(const std::vector<int>& bits, int group_size, int64_t cols) {
  if (bits.empty() || bits.size() > static_cast<size_t>(kMaxBits))
    throw std::invalid_argument("between 1 and 6 bit-widths may be analysed at once");
  for (int b : bits)
    if (!supported_bits(b))
      throw std::invalid_argument("unsupported bits " + std::to_string(b) +
                                  " (MLX affine quantization supports 2, 3, 4, 5, 6, 8)");
  if (group_size != 32 && group_size != 64 && group_size != 128)
    throw std::invalid_argument("unsupported group size " + std::to_string(group_size) +
                                " (MLX supports 32, 64, 128)");
  if (cols <= 0 || cols % group_size != 0)
    throw std::invalid_argument("last dimension " + std::to_string(cols) +
                                " is not divisible by group size " + std::to_string(group_size));
}

void analyze(const AnalyzeInput& in, AnalyzeOutput& out) {
  check_params(in.bits, in.group_size, in.cols);
  if (in.rows <= 0) throw std::invalid_argument("empty tensor");
  const bool lowrank = in.bt != nullptr;
  if (lowrank && in.w0) throw std::invalid_argument("give the base weights or the adapter, not both");
  if ((lowrank || in.u) && (in.rank <= 0 || in.rank > kMaxRank))
    throw std::invalid_argument("adapter rank must be between 1 and " + std::to_string(kMaxRank));
  if (in.experts <= 0 || in.rows % in.experts != 0)
    throw std::invalid_argument("rows are not divisible by the number of experts");
  const int mode = lowrank ? kLowRank : (in.w0 ? kBase : kNoDelta);
  const bool sub = in.u != nullptr && in.v != nullptr && mode != kNoDelta;

  const int nbits = static_cast<int>(in.bits.size());
  Shared sh;
  sh.in = &in;
  sh.out = &out;
  sh.groups_per_row = in.cols / in.group_size;
  sh.rows_per_expert = in.rows / in.experts;
  out.by_bits.assign(nbits, BitsStats{});
  const size_t ngroups = static_cast<size_t>(in.rows * sh.groups_per_row);
  out.groups = ngroups;
  out.steps.reset(new float[ngroups * nbits]);
  out.group_sse.reset(new float[ngroups * nbits]);
  if (sub) {
    sh.m_err.assign(static_cast<size_t>(in.experts) * nbits * in.rank * in.rank, 0.0);
    sh.m_d.assign(static_cast<size_t>(in.experts) * in.rank * in.rank, 0.0);
  }

  int threads = in.threads > 0 ? in.threads : static_cast<int>(std::thread::hardware_concurrency());
  threads = std::max(1, threads);
  const int64_t elems = in.rows * in.cols;
  // Small tensors are not worth a thread each: aim for >= 256K elements per thread.
  threads = static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(1, elems / (1 << 18))));
  sh.chunk = std::max<int64_t>(1, in.rows / (threads * 8));

  if (lowrank) {
    sh.at_stride = in.cols + 16;
    const int64_t arows = in.experts * in.rank;
    sh.at_padded.assign(static_cast<size_t>(arows * sh.at_stride), 0.0f);
    for (int64_t k = 0; k < arows; ++k)
      std::copy(in.at + k * in.cols, in.at + (k + 1) * in.cols, sh.at_padded.begin() + k * sh.at_stride);
    sh.at = sh.at_padded.data();
  }

  WorkerFn fn = pick(in.w1_dtype, mode, in.w0_dtype, sub);
  run_workers(threads, sh, fn);
  order_statistics(in, out, threads);

  if (sub) {
    const size_t rr = static_cast<size_t>(in.rank) * in.rank;
    for (int64_t e = 0; e < in.experts; ++e) {
      for (int b = 0; b < nbits; ++b) {
        const double* m = sh.m_err.data() + (static_cast<size_t>(e) * nbits + b) * rr;
        double s = 0;
        for (size_t k = 0; k < rr; ++k) s += m[k] * m[k];
        out.by_bits[b].sub_noise += s;
      }
      const double* md = sh.m_d.data() + static_cast<size_t>(e) * rr;
      for (size_t k = 0; k < rr; ++k) out.sub_d2 += md[k] * md[k];
    }
  }
}

namespace {
template <int DT>
void qdq_impl(const void* w, int64_t rows, int64_t cols, int bits, int G,
              uint8_t* codes, float* scales, float* biases, float* deq) {
  const float n_bins = static_cast<float>((1 << bits) - 1);
  const int64_t gpr = cols / G;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t g = 0; g < gpr; ++g) {
      const int64_t base = i * cols + g * G;
      float mn = INFINITY, mx = -INFINITY;
      for (int j = 0; j < G; ++j) {
        float x = load_as_float<DT>(w, base + j);
        mn = std::fmin(mn, x);
        mx = std::fmax(mx, x);
      }
      GroupParams p = group_params<DT>(mn, mx, n_bins);
      scales[i * gpr + g] = p.scale_t;
      biases[i * gpr + g] = p.bias_t;
      for (int j = 0; j < G; ++j) {
        float q = quant_code(load_as_float<DT>(w, base + j), p.scale, p.bias, n_bins);
        codes[base + j] = static_cast<uint8_t>(q);
        deq[base + j] = dequant<DT>(q, p.scale_t, p.bias_t);
      }
    }
  }
}
}  // namespace

void quantize_dequantize(const void* w, int dtype, int64_t rows, int64_t cols,
                         int bits, int group_size, uint8_t* codes,
                         float* scales, float* biases, float* deq) {
  check_params({bits}, group_size, cols);
  switch (dtype) {
    case F32: qdq_impl<F32>(w, rows, cols, bits, group_size, codes, scales, biases, deq); break;
    case F16: qdq_impl<F16>(w, rows, cols, bits, group_size, codes, scales, biases, deq); break;
    default: qdq_impl<BF16>(w, rows, cols, bits, group_size, codes, scales, biases, deq); break;
  }
}

}  // namespace qtools

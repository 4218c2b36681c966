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

namespace qtools {

namespace {

enum Mode { kNoDelta = 0, kBase = 1, kLowRank = 2 };
constexpr int kMaxGroup = 128;
constexpr int kLanes = 16;
constexpr int kLutSize = 32;  // dequantization tables for up to 5-bit codes  // divides every group size; one AVX-512 or two AVX2/NEON x4 registers


// y[j] = lut[q[j]] for codes q (integral floats < kLutSize), j < G (a multiple of 16).
// GCC on AVX-512 turns the two-register shuffle into one permute per 16 values
// (vpermt2ps); elsewhere the loop is left to the compiler (a gather or loads).
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
typedef float lut_vf __attribute__((vector_size(64)));
typedef int32_t lut_vi __attribute__((vector_size(64)));
inline void lut_lookup(const float* lut, const float* q, float* y, int G) {
  static_assert(kLutSize == 32, "two 16-float registers");
  lut_vf lo, hi;
  std::memcpy(&lo, lut, sizeof lo);
  std::memcpy(&hi, lut + 16, sizeof hi);
  for (int j = 0; j < G; j += 16) {
    lut_vf qv;
    std::memcpy(&qv, q + j, sizeof qv);
    const lut_vf yv = __builtin_shuffle(lo, hi, __builtin_convertvector(qv, lut_vi));
    std::memcpy(y + j, &yv, sizeof yv);
  }
}
#else
inline void lut_lookup(const float* lut, const float* q, float* y, int G) {
  for (int j = 0; j < G; ++j) y[j] = lut[static_cast<int>(q[j])];
}
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
};

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

  Local lo;
  lo.s.resize(nbits);
  lo.bits_l.assign(static_cast<size_t>(nbits) * kBitSums * kLanes, 0.0);
  lo.maxabs_l.assign(static_cast<size_t>(nbits) * kLanes, 0.0f);
  if (SUB) {
    lo.c_err.assign(static_cast<size_t>(nbits) * r, 0.0);
    lo.c_d.assign(r, 0.0);
    lo.m_err.assign(static_cast<size_t>(nbits) * r * r, 0.0);
    lo.m_d.assign(static_cast<size_t>(r) * r, 0.0);
  }
  float nb[kMaxBits];
  for (int b = 0; b < nbits; ++b) nb[b] = static_cast<float>((1 << in.bits[b]) - 1);

  alignas(64) float a[kMaxGroup];
  alignas(64) float w0[kMaxGroup];
  alignas(64) float d[kMaxGroup];
  alignas(64) float ed[kMaxBits * kMaxGroup];

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
        // Reductions run in kLanes independent lanes: vectorizable without
        // reassociating float sums (no -ffast-math).
        float l_w2[kLanes], l_nf[kLanes], l_mn[kLanes], l_mx[kLanes];
        for (int l = 0; l < kLanes; ++l) {
          l_w2[l] = 0.0f; l_nf[l] = 0.0f; l_mn[l] = INFINITY; l_mx[l] = -INFINITY;
        }
        for (int j0 = 0; j0 < G; j0 += kLanes) {
          for (int l = 0; l < kLanes; ++l) {
            float x = load_as_float<DT1>(in.w1, base + j0 + l);
            l_nf[l] += is_finite_bits(x) ? 0.0f : 1.0f;
            a[j0 + l] = x;
            l_w2[l] += x * x;
            l_mn[l] = min_f(l_mn[l], x);
            l_mx[l] = max_f(l_mx[l], x);
          }
        }
        float nonfinite = 0.0f, mn1 = INFINITY, mx1 = -INFINITY;
        for (int l = 0; l < kLanes; ++l) {
          nonfinite += l_nf[l];
          mn1 = min_f(mn1, l_mn[l]); mx1 = max_f(mx1, l_mx[l]);
        }
        for (int l = 0; l < kLanes; ++l) lo.w2_l[l] += l_w2[l];
        float mn0 = 0.0f, mx0 = 0.0f;
        if constexpr (MODE != kNoDelta) {
          if constexpr (MODE == kBase) {
            for (int j = 0; j < G; ++j) w0[j] = load_as_float<DT0>(in.w0, base + j);
          } else {
            // W0 = W1 - scale * B^T A^T, rounded to the fused dtype as the base was stored.
            // kLanes columns at a time, so the partial sums stay in registers over k
            const float* brow = in.bt + i * r;
            const float* acol = sh.at + e * r * sh.at_stride + g * G;
            for (int j0 = 0; j0 < G; j0 += kLanes) {
              float l_d[kLanes];
              for (int l = 0; l < kLanes; ++l) l_d[l] = 0.0f;
              for (int k = 0; k < r; ++k) {
                const float bk = brow[k];
                const float* arow = acol + k * sh.at_stride + j0;
                for (int l = 0; l < kLanes; ++l) l_d[l] += bk * arow[l];
              }
              for (int l = 0; l < kLanes; ++l) d[j0 + l] = l_d[l];
            }
            for (int j = 0; j < G; ++j) w0[j] = round_to<DT1>(a[j] - d[j]);
          }
          float l_d2[kLanes], l_nz[kLanes];
          for (int l = 0; l < kLanes; ++l) {
            l_d2[l] = 0.0f; l_nz[l] = 0.0f; l_nf[l] = 0.0f; l_mn[l] = INFINITY; l_mx[l] = -INFINITY;
          }
          for (int j0 = 0; j0 < G; j0 += kLanes) {
            for (int l = 0; l < kLanes; ++l) {
              const float x0 = w0[j0 + l];
              const float dj = a[j0 + l] - x0;
              d[j0 + l] = dj;
              l_nf[l] += is_finite_bits(x0) ? 0.0f : 1.0f;
              l_d2[l] += dj * dj;
              l_nz[l] += dj != 0.0f ? 1.0f : 0.0f;
              l_mn[l] = min_f(l_mn[l], x0);
              l_mx[l] = max_f(l_mx[l], x0);
            }
          }
          mn0 = INFINITY;
          mx0 = -INFINITY;
          for (int l = 0; l < kLanes; ++l) {
            nonfinite += l_nf[l];
            mn0 = min_f(mn0, l_mn[l]); mx0 = max_f(mx0, l_mx[l]);
          }
          for (int l = 0; l < kLanes; ++l) {
            lo.d2_l[l] += l_d2[l];
            lo.nz_l[l] += l_nz[l];
          }
          if constexpr (SUB) {
            const float* v = in.v + (e * cols + g * G) * r;
            project_rows(d, 1, G, v, r, lo.c_d.data());
          }
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
          const GroupParams p1 = group_params<DT1>(mn1, mx1, n_bins);
          BitsStats& st = lo.s[b];
          float l_sse[kLanes], l_max[kLanes];
          for (int l = 0; l < kLanes; ++l) { l_sse[l] = 0.0f; l_max[l] = 0.0f; }
          if constexpr (MODE == kNoDelta) {
            for (int j0 = 0; j0 < G; j0 += kLanes) {
              for (int l = 0; l < kLanes; ++l) {
                const float x = a[j0 + l];
                const float q1 = quant_code(x, p1.scale, p1.bias, n_bins);
                const float e1 = dequant<DT1>(q1, p1.scale_t, p1.bias_t) - x;
                l_sse[l] += e1 * e1;
                l_max[l] = max_f(l_max[l], std::fabs(e1));
              }
            }
          } else {
            const GroupParams p0 = group_params<DTB>(mn0, mx0, n_bins);
            float l_dot[kLanes], l_dq2[kLanes], l_err2[kLanes], l_chg[kLanes], l_agree[kLanes];
            for (int l = 0; l < kLanes; ++l) {
              l_dot[l] = 0.0f; l_dq2[l] = 0.0f; l_err2[l] = 0.0f; l_chg[l] = 0.0f; l_agree[l] = 0.0f;
            }
            // With few codes (<= 5 bits) a per-group table of dequantized values, built
            // with the same dequant(), replaces two float16 roundings per element.
            auto run = [&](auto use_lut) {
              constexpr bool kLut = decltype(use_lut)::value;
              alignas(64) float lut1[kLutSize] = {}, lut0[kLutSize] = {};
              if constexpr (kLut) {
                for (int k = 0; k <= static_cast<int>(n_bins); ++k) {
                  lut1[k] = dequant<DT1>(static_cast<float>(k), p1.scale_t, p1.bias_t);
                  lut0[k] = dequant<DTB>(static_cast<float>(k), p0.scale_t, p0.bias_t);
                }
              }
              alignas(64) float qa1[kMaxGroup], qa0[kMaxGroup], ya1[kMaxGroup], ya0[kMaxGroup];
              if constexpr (kLut) {
                // codes first, then the table lookups as whole vectors
                for (int j = 0; j < G; ++j) {
                  qa1[j] = quant_code(a[j], p1.scale, p1.bias, n_bins);
                  qa0[j] = quant_code(w0[j], p0.scale, p0.bias, n_bins);
                }
                lut_lookup(lut1, qa1, ya1, G);
                lut_lookup(lut0, qa0, ya0, G);
              }
              for (int j0 = 0; j0 < G; j0 += kLanes) {
                for (int l = 0; l < kLanes; ++l) {
                  const int j = j0 + l;
                  const float x1 = a[j], dj = d[j];
                  float q1, q0, y1, y0;
                  if constexpr (kLut) {
                    q1 = qa1[j];
                    q0 = qa0[j];
                    y1 = ya1[j];
                    y0 = ya0[j];
                  } else {
                    q1 = quant_code(x1, p1.scale, p1.bias, n_bins);
                    q0 = quant_code(w0[j], p0.scale, p0.bias, n_bins);
                    y1 = dequant<DT1>(q1, p1.scale_t, p1.bias_t);
                    y0 = dequant<DTB>(q0, p0.scale_t, p0.bias_t);
                  }
                  const float e1 = y1 - x1;
                  const float dq = y1 - y0;
                  const float de = dq - dj;
                  l_sse[l] += e1 * e1;
                  l_max[l] = max_f(l_max[l], std::fabs(e1));
                  l_dot[l] += dq * dj;
                  l_dq2[l] += dq * dq;
                  l_err2[l] += de * de;
                  l_chg[l] += q1 != q0 ? 1.0f : 0.0f;
                  l_agree[l] += dq * dj > 0.0f ? 1.0f : 0.0f;
                  ed[b * G + j] = de;
                }
              }
            };
            if (DT1 != F32 && n_bins < static_cast<float>(kLutSize)) {
              run(std::true_type{});
            } else {
              run(std::false_type{});
            }
            double* acc = lo.bits_l.data() + static_cast<size_t>(b) * kBitSums * kLanes;
            for (int l = 0; l < kLanes; ++l) {
              acc[kDot * kLanes + l] += l_dot[l];
              acc[kDq2 * kLanes + l] += l_dq2[l];
              acc[kErr2 * kLanes + l] += l_err2[l];
              acc[kChanged * kLanes + l] += l_chg[l];
              acc[kAgree * kLanes + l] += l_agree[l];
            }
          }
          // the group's own sum (it is kept per group), in lane order as before
          float sse = 0.0f;
          for (int l = 0; l < kLanes; ++l) sse += l_sse[l];
          st.sse += sse;
          float* mabs = lo.maxabs_l.data() + static_cast<size_t>(b) * kLanes;
          for (int l = 0; l < kLanes; ++l) mabs[l] = max_f(mabs[l], l_max[l]);
          sh.out->steps[static_cast<size_t>(b) * ngroups_total + gidx] = std::fabs(p1.scale_t);
          sh.out->group_sse[static_cast<size_t>(b) * ngroups_total + gidx] = sse;
        }
        if constexpr (SUB) {
          project_rows(ed, nbits, G, in.v + (e * cols + g * G) * r, r, lo.c_err.data());
        }
      }
      if constexpr (SUB) {
        // Fold this row's input-side projection into U^T X V.
        const float* urow = in.u + i * r;
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
    }
  }
  if (SUB) flush_expert(sh, lo, nbits, r);

  // fold the lanes
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
  if (threads == 1) {
    fn(sh);
  } else {
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) pool.emplace_back([&sh, fn] { fn(sh); });
    for (auto& t : pool) t.join();
  }
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

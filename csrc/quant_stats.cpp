#include "quant_stats.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "affine.h"

namespace qtools {

namespace {

enum Mode { kNoDelta = 0, kBase = 1, kLowRank = 2 };
constexpr int kMaxGroup = 128;

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
};

struct Local {
  std::vector<BitsStats> s;
  double w2 = 0, d2 = 0;
  int64_t nonzero_d = 0, nonfinite = 0;
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
  alignas(64) float ed[kMaxGroup];

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
        float w2 = 0.0f, nonfinite = 0.0f;
        float mn1 = INFINITY, mx1 = -INFINITY;
        for (int j = 0; j < G; ++j) {
          float x = load_as_float<DT1>(in.w1, base + j);
          nonfinite += is_finite_bits(x) ? 0.0f : 1.0f;
          a[j] = x;
          w2 += x * x;
          mn1 = std::fmin(mn1, x);
          mx1 = std::fmax(mx1, x);
        }
        lo.w2 += w2;
        float mn0 = 0.0f, mx0 = 0.0f;
        if constexpr (MODE != kNoDelta) {
          if constexpr (MODE == kBase) {
            for (int j = 0; j < G; ++j) {
              float x = load_as_float<DT0>(in.w0, base + j);
              nonfinite += is_finite_bits(x) ? 0.0f : 1.0f;
              w0[j] = x;
            }
          } else {
            // W0 = W1 - scale * B^T A^T, rounded to the fused dtype as the base was stored.
            for (int j = 0; j < G; ++j) d[j] = 0.0f;
            const float* brow = in.bt + i * r;
            for (int k = 0; k < r; ++k) {
              const float bk = brow[k];
              const float* arow = in.at + (e * r + k) * cols + g * G;
              for (int j = 0; j < G; ++j) d[j] += bk * arow[j];
            }
            for (int j = 0; j < G; ++j) {
              w0[j] = round_to<DT1>(a[j] - d[j]);
              nonfinite += is_finite_bits(w0[j]) ? 0.0f : 1.0f;
            }
          }
          float d2 = 0.0f, nz = 0.0f;
          mn0 = INFINITY;
          mx0 = -INFINITY;
          for (int j = 0; j < G; ++j) {
            float dj = a[j] - w0[j];
            d[j] = dj;
            d2 += dj * dj;
            nz += dj != 0.0f ? 1.0f : 0.0f;
            mn0 = std::fmin(mn0, w0[j]);
            mx0 = std::fmax(mx0, w0[j]);
          }
          lo.d2 += d2;
          lo.nonzero_d += static_cast<int64_t>(nz);
          if constexpr (SUB) {
            const float* vt = in.vt + e * r * cols + g * G;
            for (int k = 0; k < r; ++k) {
              float acc = 0.0f;
              for (int j = 0; j < G; ++j) acc += d[j] * vt[k * cols + j];
              lo.c_d[k] += acc;
            }
          }
        }
        if (nonfinite != 0.0f) {
          lo.nonfinite += static_cast<int64_t>(nonfinite);
          continue;
        }

        for (int b = 0; b < nbits; ++b) {
          const float n_bins = nb[b];
          const GroupParams p1 = group_params<DT1>(mn1, mx1, n_bins);
          float sse = 0.0f, mabs = 0.0f;
          BitsStats& st = lo.s[b];
          if constexpr (MODE == kNoDelta) {
            for (int j = 0; j < G; ++j) {
              float q1 = quant_code(a[j], p1.scale, p1.bias, n_bins);
              float e1 = dequant<DT1>(q1, p1.scale_t, p1.bias_t) - a[j];
              sse += e1 * e1;
              mabs = std::fmax(mabs, std::fabs(e1));
            }
          } else {
            const GroupParams p0 = group_params<DTB>(mn0, mx0, n_bins);
            float sse0 = 0.0f, dot = 0.0f, dq2 = 0.0f, err2 = 0.0f, chg = 0.0f, agree = 0.0f;
            for (int j = 0; j < G; ++j) {
              float q1 = quant_code(a[j], p1.scale, p1.bias, n_bins);
              float y1 = dequant<DT1>(q1, p1.scale_t, p1.bias_t);
              float q0 = quant_code(w0[j], p0.scale, p0.bias, n_bins);
              float y0 = dequant<DTB>(q0, p0.scale_t, p0.bias_t);
              float e1 = y1 - a[j];
              float e0 = y0 - w0[j];
              float dq = y1 - y0;
              float de = dq - d[j];
              sse += e1 * e1;
              mabs = std::fmax(mabs, std::fabs(e1));
              sse0 += e0 * e0;
              dot += dq * d[j];
              dq2 += dq * dq;
              err2 += de * de;
              chg += q1 != q0 ? 1.0f : 0.0f;
              agree += dq * d[j] > 0.0f ? 1.0f : 0.0f;
              ed[j] = de;
            }
            st.sse0 += sse0;
            st.dot += dot;
            st.dq2 += dq2;
            st.err2 += err2;
            st.changed += static_cast<int64_t>(chg);
            st.sign_agree += static_cast<int64_t>(agree);
            if constexpr (SUB) {
              const float* vt = in.vt + e * r * cols + g * G;
              double* c = lo.c_err.data() + static_cast<size_t>(b) * r;
              for (int k = 0; k < r; ++k) {
                float acc = 0.0f;
                for (int j = 0; j < G; ++j) acc += ed[j] * vt[k * cols + j];
                c[k] += acc;
              }
            }
          }
          st.sse += sse;
          st.max_abs = std::max(st.max_abs, static_cast<double>(mabs));
          sh.out->steps[static_cast<size_t>(b) * ngroups_total + gidx] = std::fabs(p1.scale_t);
          sh.out->group_sse[static_cast<size_t>(b) * ngroups_total + gidx] = sse;
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

  std::lock_guard<std::mutex> lock(sh.mu);
  AnalyzeOutput& out = *sh.out;
  for (int b = 0; b < nbits; ++b) {
    BitsStats& o = out.by_bits[b];
    const BitsStats& s = lo.s[b];
    o.sse += s.sse;
    o.max_abs = std::max(o.max_abs, s.max_abs);
    o.sse0 += s.sse0;
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
  const bool sub = in.u != nullptr && in.vt != nullptr && mode != kNoDelta;

  const int nbits = static_cast<int>(in.bits.size());
  Shared sh;
  sh.in = &in;
  sh.out = &out;
  sh.groups_per_row = in.cols / in.group_size;
  sh.rows_per_expert = in.rows / in.experts;
  out.by_bits.assign(nbits, BitsStats{});
  const size_t ngroups = static_cast<size_t>(in.rows * sh.groups_per_row);
  out.steps.assign(ngroups * nbits, 0.0f);
  out.group_sse.assign(ngroups * nbits, 0.0f);
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

  WorkerFn fn = pick(in.w1_dtype, mode, in.w0_dtype, sub);
  if (threads == 1) {
    fn(sh);
  } else {
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) pool.emplace_back([&sh, fn] { fn(sh); });
    for (auto& t : pool) t.join();
  }

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

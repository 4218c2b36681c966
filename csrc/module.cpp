// nanobind bindings: qtools._ext
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "affine.h"
#include "basis.h"
#include "fuse.h"
#include "quant_stats.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using AnyArray = nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu>;
using F32Array = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

int parse_dtype(const std::string& s) {
  if (s == "float32" || s == "F32") return qtools::F32;
  if (s == "float16" || s == "F16") return qtools::F16;
  if (s == "bfloat16" || s == "BF16") return qtools::BF16;
  throw std::invalid_argument("unsupported dtype " + s + " (float16, bfloat16, float32)");
}

// Checks that a raw array holds `dtype` elements (16-bit types arrive as uint16
// or float16 views, since numpy has no bfloat16) and returns rows x cols.
template <typename Array>
void check_raw(const Array& a, int dtype, const char* what) {
  if (a.ndim() != 2) throw std::invalid_argument(std::string(what) + " must be 2-D (rows x cols)");
  bool ok = dtype == qtools::F32 ? a.dtype() == nb::dtype<float>()
                                 : (a.dtype() == nb::dtype<uint16_t>() ||
                                    a.dtype() == nb::dtype<int16_t>() ||
                                    (a.dtype().code == (uint8_t)nb::dlpack::dtype_code::Float &&
                                     a.dtype().bits == 16));
  if (!ok) throw std::invalid_argument(std::string(what) + ": array element type does not match dtype");
}

template <typename T>
nb::ndarray<nb::numpy, T> to_numpy(std::unique_ptr<T[]>&& p, std::vector<size_t> shape) {
  T* data = p.release();
  nb::capsule owner(data, [](void* q) noexcept { delete[] static_cast<T*>(q); });
  return nb::ndarray<nb::numpy, T>(data, shape.size(), shape.data(), owner);
}

template <typename T>
nb::ndarray<nb::numpy, T> to_numpy(std::vector<T>&& v, std::vector<size_t> shape) {
  auto* heap = new std::vector<T>(std::move(v));
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::ndarray<nb::numpy, T>(heap->data(), shape.size(), shape.data(), owner);
}

nb::dict analyze(const AnyArray& w1, const std::string& w1_dtype, std::vector<int> bits,
                 int group_size, std::optional<AnyArray> w0, std::optional<std::string> w0_dtype,
                 std::optional<F32Array> bt, std::optional<F32Array> at, int64_t experts,
                 std::optional<F32Array> u, std::optional<F32Array> v, int threads, bool per_group) {
  qtools::AnalyzeInput in;
  in.w1_dtype = parse_dtype(w1_dtype);
  check_raw(w1, in.w1_dtype, "w1");
  in.w1 = w1.data();
  in.rows = static_cast<int64_t>(w1.shape(0));
  in.cols = static_cast<int64_t>(w1.shape(1));
  in.group_size = group_size;
  in.bits = bits;
  in.experts = experts;
  in.threads = threads;
  in.per_group = per_group;
  if (w0) {
    in.w0_dtype = parse_dtype(w0_dtype.value_or(w1_dtype));
    check_raw(*w0, in.w0_dtype, "w0");
    if (w0->shape(0) != w1.shape(0) || w0->shape(1) != w1.shape(1))
      throw std::invalid_argument("w0 and w1 shapes differ");
    in.w0 = w0->data();
  }
  if (bt.has_value() != at.has_value()) throw std::invalid_argument("bt and at go together");
  if (bt) {
    in.rank = static_cast<int>(bt->shape(1));
    if (static_cast<int64_t>(bt->shape(0)) != in.rows)
      throw std::invalid_argument("adapter factor B has " + std::to_string(bt->shape(0)) +
                                  " rows, the weight has " + std::to_string(in.rows));
    if (static_cast<int64_t>(at->shape(0)) != experts * in.rank ||
        static_cast<int64_t>(at->shape(1)) != in.cols)
      throw std::invalid_argument("adapter factor A does not match the weight's input dimension");
    in.bt = bt->data();
    in.at = at->data();
  }
  if (u.has_value() != v.has_value()) throw std::invalid_argument("u and v go together");
  if (u) {
    int r = static_cast<int>(u->shape(1));
    if (in.rank && r != in.rank) throw std::invalid_argument("subspace rank differs from adapter rank");
    in.rank = r;
    if (static_cast<int64_t>(u->shape(0)) != in.rows ||
        static_cast<int64_t>(v->shape(0)) != experts * in.cols ||
        static_cast<int64_t>(v->shape(1)) != r)
      throw std::invalid_argument("subspace bases do not match the weight's shape");
    in.u = u->data();
    in.v = v->data();
  }
  qtools::check_params(in.bits, in.group_size, in.cols);

  qtools::AnalyzeOutput out;
  {
    nb::gil_scoped_release release;
    qtools::analyze(in, out);
  }

  const size_t nb_ = bits.size();
  std::vector<double> sse(nb_), max_abs(nb_), dot(nb_), dq2(nb_), err2(nb_), sub(nb_);
  std::vector<int64_t> changed(nb_), agree(nb_);
  for (size_t b = 0; b < nb_; ++b) {
    const auto& s = out.by_bits[b];
    sse[b] = s.sse; max_abs[b] = s.max_abs; dot[b] = s.dot;
    dq2[b] = s.dq2; err2[b] = s.err2; sub[b] = s.sub_noise;
    changed[b] = s.changed; agree[b] = s.sign_agree;
  }
  const size_t ngroups = out.groups;
  nb::dict d;
  d["sse"] = to_numpy(std::move(sse), {nb_});
  d["max_abs"] = to_numpy(std::move(max_abs), {nb_});
  d["dot"] = to_numpy(std::move(dot), {nb_});
  d["dq2"] = to_numpy(std::move(dq2), {nb_});
  d["err2"] = to_numpy(std::move(err2), {nb_});
  d["sub_noise"] = to_numpy(std::move(sub), {nb_});
  d["changed"] = to_numpy(std::move(changed), {nb_});
  d["sign_agree"] = to_numpy(std::move(agree), {nb_});
  d["step_median"] = to_numpy(std::move(out.step_median), {nb_});
  d["group_rmse_p50"] = to_numpy(std::move(out.rmse_p50), {nb_});
  d["group_rmse_p99"] = to_numpy(std::move(out.rmse_p99), {nb_});
  if (per_group) {
    d["steps"] = to_numpy(std::move(out.steps), {nb_, ngroups});
    d["group_sse"] = to_numpy(std::move(out.group_sse), {nb_, ngroups});
  }
  d["w2"] = out.w2;
  d["d2"] = out.d2;
  d["sub_d2"] = out.sub_d2;
  d["nonzero_d"] = out.nonzero_d;
  d["nonfinite"] = out.nonfinite;
  d["n"] = in.rows * in.cols;
  return d;
}

nb::tuple quantize_dequantize(const AnyArray& w, const std::string& dtype, int bits, int group_size) {
  int dt = parse_dtype(dtype);
  check_raw(w, dt, "w");
  const size_t rows = w.shape(0), cols = w.shape(1);
  qtools::check_params({bits}, group_size, static_cast<int64_t>(cols));
  std::vector<uint8_t> codes(rows * cols);
  std::vector<float> scales(rows * cols / group_size), biases(rows * cols / group_size), deq(rows * cols);
  {
    nb::gil_scoped_release release;
    qtools::quantize_dequantize(w.data(), dt, rows, cols, bits, group_size, codes.data(),
                                scales.data(), biases.data(), deq.data());
  }
  const size_t g = cols / group_size;
  return nb::make_tuple(to_numpy(std::move(codes), {rows, cols}), to_numpy(std::move(scales), {rows, g}),
                        to_numpy(std::move(biases), {rows, g}), to_numpy(std::move(deq), {rows, cols}));
}

nb::ndarray<nb::numpy, float> orthonormal_columns(const F32Array& x, bool transposed) {
  const size_t n = transposed ? x.shape(1) : x.shape(0);
  const size_t r = transposed ? x.shape(0) : x.shape(1);
  if (r == 0) throw std::invalid_argument("orthonormal_columns needs at least one column");
  std::unique_ptr<float[]> out(new float[n * r]);
  {
    nb::gil_scoped_release release;
    qtools::orthonormal_columns(x.data(), static_cast<int64_t>(n), static_cast<int>(r), transposed, out.get());
  }
  return to_numpy(std::move(out), {n, r});
}

using OutArray = nb::ndarray<nb::c_contig, nb::device::cpu>;

int64_t fuse_lora(const AnyArray& w, const std::string& w_dtype, const F32Array& sb, const F32Array& at,
               const OutArray& out, const std::string& out_dtype, int64_t experts, int threads) {
  qtools::FuseInput in;
  in.w_dtype = parse_dtype(w_dtype);
  in.out_dtype = parse_dtype(out_dtype);
  check_raw(w, in.w_dtype, "w");
  check_raw(out, in.out_dtype, "out");
  in.rows = static_cast<int64_t>(w.shape(0));
  in.cols = static_cast<int64_t>(w.shape(1));
  in.rank = static_cast<int>(sb.shape(1));
  in.experts = experts;
  in.threads = threads;
  if (experts <= 0 || in.rows % experts != 0)
    throw std::invalid_argument("rows are not divisible by the number of experts");
  if (out.shape(0) != w.shape(0) || out.shape(1) != w.shape(1))
    throw std::invalid_argument("out and w shapes differ");
  if (static_cast<int64_t>(sb.shape(0)) != in.rows)
    throw std::invalid_argument("sb has " + std::to_string(sb.shape(0)) + " rows, the weight has " +
                                std::to_string(in.rows));
  if (static_cast<int64_t>(at.shape(0)) != experts * in.rank || static_cast<int64_t>(at.shape(1)) != in.cols)
    throw std::invalid_argument("at must be (experts * rank) x cols");
  in.w = w.data();
  in.sb = sb.data();
  in.at = at.data();
  in.out = out.data();
  nb::gil_scoped_release release;
  return qtools::fuse_lora(in);
}

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "qtools native kernels: MLX-exact affine quantization statistics";
  // noconvert: a non-contiguous or wrongly typed weight is an error, never a silent copy of GBs.
  m.def("analyze", &analyze, nb::arg("w1").noconvert(), "w1_dtype"_a, "bits"_a, "group_size"_a,
        nb::arg("w0").noconvert() = nb::none(),
        "w0_dtype"_a = nb::none(), "bt"_a = nb::none(), "at"_a = nb::none(), "experts"_a = 1,
        "u"_a = nb::none(), "v"_a = nb::none(), "threads"_a = 0, "per_group"_a = false,
        "One pass over a weight tensor (rows x cols, raw dtype): quantization error for each\n"
        "bit-width and, with w0 or the adapter factors bt/at, the delta's survival statistics.\n"
        "step_median and group_rmse_p50/p99 are np.median(steps) and\n"
        "np.percentile(sqrt(group_sse / group_size), [50, 99]) per bit-width; per_group=True\n"
        "also returns the per-group steps and group_sse (bits x groups).");
  m.def("quantize_dequantize", &quantize_dequantize, "w"_a, "dtype"_a, "bits"_a, "group_size"_a,
        "MLX affine quantization of one bit-width: (codes, scales, biases, dequantized), float32.");
  m.def("orthonormal_columns", &orthonormal_columns, "x"_a, "transposed"_a = false,
        "Orthonormal basis (n x r, float32) of the column space of x (n x r float32), or with\n"
        "transposed=True of the row space of x given as r x n; zero columns where x is rank-deficient.\n"
        "Gram matrix and Jacobi eigendecomposition in float64, no BLAS.");
  m.def("fuse_lora", &fuse_lora, nb::arg("w").noconvert(), "w_dtype"_a, nb::arg("sb").noconvert(),
        nb::arg("at").noconvert(), nb::arg("out").noconvert(), "out_dtype"_a, "experts"_a = 1, "threads"_a = 0,
        "out = out_dtype(float32(w) + sb @ at) for one weight (rows x cols, raw dtype), sb (rows x rank)\n"
        "and at (experts * rank x cols) float32, written into out (rows x cols, raw out_dtype): the sum\n"
        "over the rank runs in order from +0 without fused multiply-add, as netlib's reference sgemm\n"
        "that MLX's CPU backend links on Linux, so the bits are MLX's. With experts > 1, expert e's rows\n"
        "use at's rows e * rank .. (e + 1) * rank. Rank 0 (sb rows x 0, at 0 x cols): MLX's astype of w.\nReturns how many of out's values are NaN or Inf.");
}

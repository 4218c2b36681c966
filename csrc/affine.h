// MLX affine quantization, bit for bit, as scalar inline functions the
// compiler can vectorize. The reference is MLX's CPU kernel
// (mlx/backend/cpu/quantized.cpp, `quantize`): parameters are computed in
// float32, codes use the float32 scale/bias, and the stored scale/bias are
// rounded to the tensor's dtype; dequantization rounds the product and the sum
// to the dtype separately (MLX's float16_t/bfloat16_t arithmetic).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace qtools {

enum DType : int { F32 = 0, F16 = 1, BF16 = 2 };

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// IEEE half -> float, branch-free (subnormals via an exact power-of-two multiply).
inline float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  float mag = bits_to_float(em << 13) * 0x1p112f;
  uint32_t bits = float_to_bits(mag);
  bits = static_cast<int32_t>(em) >= 0x7c00 ? (bits | 0x7f800000u) : bits;  // inf / nan
  return bits_to_float(bits | sign);
}

inline float bf16_to_float(uint16_t h) {
  return bits_to_float(static_cast<uint32_t>(h) << 16);
}

// Round a float to the nearest float16 value (ties to even) and return it as
// a float. Finite inputs only (NaN/Inf are rejected before this is used).
inline float round_to_half(float x) {
  uint32_t u = float_to_bits(x);
  uint32_t sign = u & 0x80000000u;
  uint32_t a = u ^ sign;
  // normal range: round the mantissa to 10 bits
  uint32_t n = (a + 0x0fffu + ((a >> 13) & 1u)) & ~0x1fffu;
  n = static_cast<int32_t>(n) >= 0x477ff000 ? 0x7f800000u : n;  // >= 65520 rounds to inf
  // subnormal range (< 2^-14): round to a multiple of 2^-24 with the FPU
  float sub = (bits_to_float(a) + 0.5f) - 0.5f;
  uint32_t s = float_to_bits(sub);
  uint32_t r = static_cast<int32_t>(a) < 0x38800000 ? s : n;
  return bits_to_float(r | sign);
}

// round_to_half for values that are either >= 2^-14 in magnitude or multiples
// of 2^-24 (products of a float16 scale and an integer code, sums of two
// float16 values): below 2^-14 such a value is already a float16 subnormal
// and has its low 13 mantissa bits clear, so the normal-range rounding alone
// is exact. Half the work of round_to_half in the dequantization hot loop.
inline float round_to_half_grid(float x) {
  uint32_t u = float_to_bits(x);
  uint32_t n = (u + 0x0fffu + ((u >> 13) & 1u)) & ~0x1fffu;  // sign bit is never carried into
  uint32_t inf = (u & 0x80000000u) | 0x7f800000u;
  // signed compare (both sides are non-negative): AVX2 has no unsigned one
  return bits_to_float(static_cast<int32_t>(u & 0x7fffffffu) >= 0x477ff000 ? inf : n);
}

inline float round_to_bf16(float x) {
  uint32_t u = float_to_bits(x);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  return bits_to_float(u);
}

template <int DT>
inline float round_to(float x) {
  if constexpr (DT == F16) {
    return round_to_half(x);
  } else if constexpr (DT == BF16) {
    return round_to_bf16(x);
  } else {
    return x;
  }
}

template <int DT>
inline float load_as_float(const void* p, int64_t i) {
  if constexpr (DT == F32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (DT == F16) {
    return half_to_float(static_cast<const uint16_t*>(p)[i]);
  } else {
    return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  }
}

inline bool is_finite_bits(float x) {
  return (float_to_bits(x) & 0x7f800000u) != 0x7f800000u;
}

// Round half to even for |x| < 2^22 (default rounding mode), vectorizable
// on every ISA, unlike std::rint without SSE4.1.
inline float rint_small(float x) {
  const float magic = 12582912.0f;  // 1.5 * 2^23
  return (x + magic) - magic;
}

struct GroupParams {
  float scale;    // float32 scale used to compute codes
  float bias;     // float32 bias used to compute codes
  float scale_t;  // scale as stored (rounded to the tensor dtype)
  float bias_t;   // bias as stored
};

template <int DT>
inline GroupParams group_params(float w_min, float w_max, float n_bins) {
  const float eps = 1e-7f;
  bool mask = std::fabs(w_min) > std::fabs(w_max);
  float scale = (w_max - w_min) / n_bins;
  scale = scale > eps ? scale : eps;  // std::fmax, NaN included, without a libm call
  scale = mask ? scale : -scale;
  float edge = mask ? w_min : w_max;
  float q0 = std::rint(edge / scale);
  float bias = 0.0f;
  if (q0 != 0.0f) {
    scale = edge / q0;
    bias = edge;
  }
  return {scale, bias, round_to<DT>(scale), round_to<DT>(bias)};
}

// Code of one element. The clamp before rounding keeps rint_small in range and
// does not change the result (rounding and clamping are both monotone).
// Ternary min/max (not std::fmin) so the compiler emits vector min/max; the
// inputs are finite, where both agree.
inline float min_f(float a, float b) { return a < b ? a : b; }
inline float max_f(float a, float b) { return a > b ? a : b; }

inline float quant_code(float w, float scale, float bias, float n_bins) {
  float x = (w - bias) / scale;
  x = min_f(max_f(x, -1.0f), n_bins + 1.0f);
  x = rint_small(x);
  return min_f(max_f(x, 0.0f), n_bins);
}

template <int DT>
inline float round_grid_to(float x) {
  if constexpr (DT == F16) {
    return round_to_half_grid(x);
  } else {
    return round_to<DT>(x);
  }
}

template <int DT>
inline float dequant(float q, float scale_t, float bias_t) {
  return round_grid_to<DT>(round_grid_to<DT>(scale_t * q) + bias_t);
}

}  // namespace qtools

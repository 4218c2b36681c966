// Vector versions of affine.h's element functions, written with GCC/Clang
// vector extensions (no ISA intrinsics), one target register wide: 8 floats
// with AVX2 (and AVX-512), 4 elsewhere (SSE, NEON, generic). Each function
// does exactly the float and integer operations of its scalar twin in
// affine.h, lane by lane, so the results are the same bits on every target.
//
#pragma once

#include <cstdint>
#include <cstring>

#include "affine.h"

#if !defined(__GNUC__) && !defined(__clang__)
#error "qtools needs GCC or Clang vector extensions"
#endif

namespace qtools {
namespace simd {

#if defined(__AVX2__)
// AVX-512 machines too: 256-bit vectors measured 6% faster than 512-bit ones
// on a Sapphire Rapids core (GCC 12), as GCC's own -mprefer-vector-width=256.
constexpr int kBytes = 32;
#else
constexpr int kBytes = 16;  // SSE, NEON, and anything else
#endif
constexpr int kW = kBytes / 4;  // floats per register

typedef float vf __attribute__((vector_size(kBytes)));
typedef int32_t vi __attribute__((vector_size(kBytes)));
typedef uint32_t vu __attribute__((vector_size(kBytes)));
typedef uint16_t vh __attribute__((vector_size(kBytes / 2)));

// s in every lane: vector-scalar arithmetic broadcasts the scalar, and x - (+0)
// is x for every x (-0 and NaN included), so this is one broadcast.
inline vf splat(float s) { return s - vf{}; }

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

// same-size vector casts reinterpret the bits (GCC and Clang)
inline vu as_u(vf v) { return (vu)v; }
inline vf as_f(vu v) { return (vf)v; }
inline vi as_i(vu v) { return (vi)v; }

// m ? a : b for a comparison mask m (all ones or all zeros per lane). The
// vector `?:` (GCC, Clang >= 10: every Apple-silicon Xcode) is what lets the
// compiler see min/max and blends, where a bitwise blend stays three logic ops.
inline vf select(vi m, vf a, vf b) { return m ? a : b; }
inline vu select(vi m, vu a, vu b) { return m ? a : b; }

inline vf min_f(vf a, vf b) { return select(a < b, a, b); }
inline vf max_f(vf a, vf b) { return select(a > b, a, b); }
inline vf fabs_f(vf a) { return as_f(as_u(a) & 0x7fffffffu); }
// 1.0f where m, else 0.0f
inline vf ones_where(vi m) { return as_f((vu)m & 0x3f800000u); }

inline vf half_to_float(vh h) {
  const vu x = __builtin_convertvector(h, vu);
  const vu sign = (x & 0x8000u) << 16;
  const vu em = x & 0x7fffu;
  const vf mag = as_f(em << 13) * 0x1p112f;
  vu bits = as_u(mag);
  bits = select(as_i(em) >= 0x7c00, bits | 0x7f800000u, bits);
  return as_f(bits | sign);
}

template <int DT>
inline vf load_as_float(const void* p, int64_t i) {
  if constexpr (DT == F32) {
    return load(static_cast<const float*>(p) + i);
  } else {
    vh h;
    std::memcpy(&h, static_cast<const uint16_t*>(p) + i, sizeof h);
    if constexpr (DT == F16) {
      return half_to_float(h);
    } else {
      return as_f(__builtin_convertvector(h, vu) << 16);
    }
  }
}

inline vi is_finite_bits(vf x) { return (as_u(x) & 0x7f800000u) != 0x7f800000u; }

inline vf round_to_half(vf x) {
  const vu u = as_u(x);
  const vu sign = u & 0x80000000u;
  const vu a = u ^ sign;
  vu n = (a + 0x0fffu + ((a >> 13) & 1u)) & ~0x1fffu;
  n = select(as_i(n) >= 0x477ff000, vu{} + 0x7f800000u, n);
  const vf sub = (as_f(a) + 0.5f) - 0.5f;
  const vu r = select(as_i(a) < 0x38800000, as_u(sub), n);
  return as_f(r | sign);
}

inline vf round_to_half_grid(vf x) {
  const vu u = as_u(x);
  const vu n = (u + 0x0fffu + ((u >> 13) & 1u)) & ~0x1fffu;
  const vu inf = (u & 0x80000000u) | 0x7f800000u;
  const vu a = u & 0x7fffffffu;
  return as_f(select(as_i(a) >= 0x477ff000, inf, n));
}

inline vf round_to_bf16(vf x) {
  const vu u = as_u(x);
  return as_f((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u);
}

template <int DT>
inline vf round_to(vf x) {
  if constexpr (DT == F16) {
    return round_to_half(x);
  } else if constexpr (DT == BF16) {
    return round_to_bf16(x);
  } else {
    return x;
  }
}

template <int DT>
inline vf round_grid_to(vf x) {
  if constexpr (DT == F16) {
    return round_to_half_grid(x);
  } else {
    return round_to<DT>(x);
  }
}

inline vf rint_small(vf x) {
  const float magic = 12582912.0f;  // 1.5 * 2^23
  return (x + magic) - magic;
}

// quant_code of affine.h with one clamp instead of two: rounding is monotone
// and fixes the integers 0 and n_bins, so clamping to [0, n_bins] before
// rounding gives what clamping after it does (x is never NaN: finite inputs,
// scale >= 1e-7 in magnitude).
inline vf quant_code(vf w, vf scale, vf bias, vf n_bins) {
  const vf x = (w - bias) / scale;
  return rint_small(min_f(max_f(x, vf{}), n_bins));
}

template <int DT>
inline vf dequant(vf q, vf scale_t, vf bias_t) {
  return round_grid_to<DT>(round_grid_to<DT>(scale_t * q) + bias_t);
}

}  // namespace simd
}  // namespace qtools

/*
 * cuda_dtypes.cuh: one tag type per mx_dtype, used as a template argument by
 * the kernels: its storage type T, its compute type C (float for f32, bf16
 * and f16; double for f64; int64_t for the integer types) and the
 * conversions. The CPU backend mirrors these conversions bit for bit:
 *
 *   load     bf16/f16 -> float by numeric.h; integers widen to int64.
 *   store    float -> bf16/f16 by numeric.h (nearest even, NaN quiet);
 *            int64 -> s32/u8 wraps modulo 2^32 / 2^8.
 *   from_double (fill values, scalars, alpha, casts from float types)
 *            f32: (float)v; f64: v; bf16/f16: mx_f64_to_f32_odd(v), so that
 *            the store's rounding is the correct f64 -> bf16/f16 rounding; integers: mx_d2i(v), i.e. truncation
 *            toward zero, NaN -> 0, saturating at the int64 limits, then
 *            wrapping on store.
 *
 * Integer arithmetic wraps (done in uint64_t, never signed overflow).
 * Float arithmetic uses the _rn intrinsics where a multiply meets an add, so
 * that nvcc cannot contract it into an FMA the CPU would not do.
 */
#ifndef MAMBEX_CUDA_DTYPES_CUH
#define MAMBEX_CUDA_DTYPES_CUH

#include <stdint.h>

#include "../core/backend.h"
#include "../core/numeric.h"

#define MX_DEV static __device__ __forceinline__

/* double -> int64: truncation toward zero, NaN -> 0, saturating. */
MX_DEV int64_t mx_d2i(double v) {
  if (v != v) return 0;
  if (v >= 9223372036854775808.0) return INT64_MAX;
  if (v <= -9223372036854775808.0) return INT64_MIN;
  return (int64_t)v;
}

/* Wrapping int64 arithmetic. */
MX_DEV int64_t mx_wadd(int64_t a, int64_t b) { return (int64_t)((uint64_t)a + (uint64_t)b); }
MX_DEV int64_t mx_wsub(int64_t a, int64_t b) { return (int64_t)((uint64_t)a - (uint64_t)b); }
MX_DEV int64_t mx_wmul(int64_t a, int64_t b) { return (int64_t)((uint64_t)a * (uint64_t)b); }
MX_DEV int64_t mx_wneg(int64_t a) { return (int64_t)(0 - (uint64_t)a); }
/* a / b truncating; b == 0 -> 0; INT64_MIN / -1 wraps. */
MX_DEV int64_t mx_idiv(int64_t a, int64_t b) {
  if (b == 0) return 0;
  if (b == -1) return mx_wneg(a); /* INT64_MIN / -1 wraps to INT64_MIN */
  return a / b;
}

struct mx_t_f32 {
  typedef float T;
  typedef float C;
  static const bool is_int = false;
  MX_DEV C load(T v) { return v; }
  MX_DEV T store(C v) { return v; }
  MX_DEV C from_double(double v) { return (float)v; }
  MX_DEV double to_double(C v) { return (double)v; }
  MX_DEV T step_down(T v, double) { return mx_step_down_f32(v); }
};

struct mx_t_f64 {
  typedef double T;
  typedef double C;
  static const bool is_int = false;
  MX_DEV C load(T v) { return v; }
  MX_DEV T store(C v) { return v; }
  MX_DEV C from_double(double v) { return v; }
  MX_DEV double to_double(C v) { return v; }
  /* the largest double below `limit` */
  MX_DEV T step_down(T, double limit) {
    if (limit == 0.0) return -4.9406564584124654e-324;
    long long u = __double_as_longlong(limit);
    return __longlong_as_double(limit > 0 ? u - 1 : u + 1);
  }
};

struct mx_t_bf16 {
  typedef uint16_t T;
  typedef float C;
  static const bool is_int = false;
  MX_DEV C load(T v) { return mx_bf16_to_f32(v); }
  MX_DEV T store(C v) { return mx_f32_to_bf16(v); }
  MX_DEV C from_double(double v) { return mx_f64_to_f32_odd(v); }
  MX_DEV double to_double(C v) { return (double)v; }
  MX_DEV T step_down(T v, double) { return mx_step_down16(v); }
};

struct mx_t_f16 {
  typedef uint16_t T;
  typedef float C;
  static const bool is_int = false;
  MX_DEV C load(T v) { return mx_f16_to_f32(v); }
  MX_DEV T store(C v) { return mx_f32_to_f16(v); }
  MX_DEV C from_double(double v) { return mx_f64_to_f32_odd(v); }
  MX_DEV double to_double(C v) { return (double)v; }
  MX_DEV T step_down(T v, double) { return mx_step_down16(v); }
};

struct mx_t_s32 {
  typedef int32_t T;
  typedef int64_t C;
  static const bool is_int = true;
  MX_DEV C load(T v) { return (int64_t)v; }
  MX_DEV T store(C v) { return (int32_t)(uint32_t)(uint64_t)v; }
  MX_DEV C from_double(double v) { return mx_d2i(v); }
  MX_DEV double to_double(C v) { return (double)v; }
};

struct mx_t_s64 {
  typedef int64_t T;
  typedef int64_t C;
  static const bool is_int = true;
  MX_DEV C load(T v) { return v; }
  MX_DEV T store(C v) { return v; }
  MX_DEV C from_double(double v) { return mx_d2i(v); }
  MX_DEV double to_double(C v) { return (double)v; }
};

struct mx_t_u8 {
  typedef uint8_t T;
  typedef int64_t C;
  static const bool is_int = true;
  MX_DEV C load(T v) { return (int64_t)v; }
  MX_DEV T store(C v) { return (uint8_t)(uint64_t)v; }
  MX_DEV C from_double(double v) { return mx_d2i(v); }
  MX_DEV double to_double(C v) { return (double)v; }
};

/* Call `fn.template run<Tag>()` for the tag of `dtype`; MX_E_ARG for an
 * unknown dtype. `fn` is a small struct holding the op's arguments. */
template <class F>
static int mx_dispatch_dtype(int dtype, F &fn) {
  switch (dtype) {
    case MX_F32: return fn.template run<mx_t_f32>();
    case MX_F64: return fn.template run<mx_t_f64>();
    case MX_BF16: return fn.template run<mx_t_bf16>();
    case MX_F16: return fn.template run<mx_t_f16>();
    case MX_S32: return fn.template run<mx_t_s32>();
    case MX_S64: return fn.template run<mx_t_s64>();
    case MX_U8: return fn.template run<mx_t_u8>();
    default: return MX_E_ARG;
  }
}

#endif /* MAMBEX_CUDA_DTYPES_CUH */

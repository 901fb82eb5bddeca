/*
 * cpu_backend.c: the C11 CPU backend, the default wherever no GPU answers.
 *
 * Every op runs at once on the calling thread (the NIF moves long ones to a
 * dirty CPU scheduler), so the "device queue" is simply program order and
 * sync is a no-op. Arithmetic follows backend.h: fp32 for f32/bf16/f16, fp64
 * for f64, int64 for integer types, and the same rounding helpers as the
 * CUDA backend (numeric.h), so both produce the same bits wherever the
 * operations are exactly rounded.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#ifdef __SSE2__
#include <immintrin.h>
#endif

#include "../core/backend.h"
#include "../core/numeric.h"
#include "cpu_kernels.h"
#include "cpu_pool.h"

/* ---- element access in the compute class of each dtype ---------------- */

static inline float ld_f(int dt, const void *p, size_t i) {
  switch (dt) {
    case MX_F32: return ((const float *)p)[i];
    case MX_BF16: return mx_bf16_to_f32(((const uint16_t *)p)[i]);
    case MX_F16: return mx_f16_to_f32(((const uint16_t *)p)[i]);
    default: return 0.0f;
  }
}

static inline void st_f(int dt, void *p, size_t i, float v) {
  switch (dt) {
    case MX_F32: ((float *)p)[i] = v; break;
    case MX_BF16: ((uint16_t *)p)[i] = mx_f32_to_bf16(v); break;
    case MX_F16: ((uint16_t *)p)[i] = mx_f32_to_f16(v); break;
    default: break;
  }
}

static inline int64_t ld_i(int dt, const void *p, size_t i) {
  switch (dt) {
    case MX_S32: return ((const int32_t *)p)[i];
    case MX_S64: return ((const int64_t *)p)[i];
    case MX_U8: return ((const uint8_t *)p)[i];
    default: return 0;
  }
}

static inline void st_i(int dt, void *p, size_t i, int64_t v) {
  switch (dt) {
    case MX_S32: ((int32_t *)p)[i] = (int32_t)(uint32_t)(uint64_t)v; break;
    case MX_S64: ((int64_t *)p)[i] = v; break;
    case MX_U8: ((uint8_t *)p)[i] = (uint8_t)(uint64_t)v; break;
    default: break;
  }
}

/* double -> the fp32 compute value of a float dtype: nearest for f32, round
 * to odd for bf16/f16 so that their final rounding is correct. */
static inline float f32_from_double(int dt, double v) {
  return dt == MX_F32 ? (float)v : mx_f64_to_f32_odd(v);
}

/* Any dtype through double (casts, creation). */
static inline double ld_d(int dt, const void *p, size_t i) {
  if (dt == MX_F64) return ((const double *)p)[i];
  if (mx_dtype_is_float(dt)) return (double)ld_f(dt, p, i);
  return (double)ld_i(dt, p, i);
}

static inline int64_t double_to_int(double v) {
  if (v != v) return 0;
  if (v >= 9.2233720368547758e18) return INT64_MAX;
  if (v <= -9.2233720368547758e18) return INT64_MIN;
  return (int64_t)v;
}

static inline void st_d(int dt, void *p, size_t i, double v) {
  if (dt == MX_F64) ((double *)p)[i] = v;
  else if (mx_dtype_is_float(dt)) st_f(dt, p, i, f32_from_double(dt, v));
  else st_i(dt, p, i, double_to_int(v));
}

static int arg_error(mx_err *err, const char *msg) {
  err->kind = MX_E_ARG;
  snprintf(err->msg, sizeof err->msg, "%s", msg);
  return MX_E_ARG;
}

/* ---- runtime ----------------------------------------------------------- */

static int cpu_device_count(mx_err *err) {
  err->kind = MX_OK;
  return 1;
}

static int cpu_device_name(int dev, char *buf, size_t len, mx_err *err) {
  (void)dev;
  (void)err;
  snprintf(buf, len, "cpu");
  return MX_OK;
}

static int cpu_alloc(int dev, size_t nbytes, void **out, mx_err *err) {
  (void)dev;
  /* 64-byte alignment for vector loads; aligned_alloc wants a multiple. */
  /* Large blocks are 2 MiB aligned and marked for transparent huge pages:
   * a fresh 64 MiB output then costs 32 page faults instead of 16384. */
  size_t align = nbytes >= ((size_t)4 << 20) ? ((size_t)2 << 20) : 64;
  size_t rounded = (nbytes + align - 1) & ~(align - 1);
  if (rounded < nbytes) rounded = 0;
  void *p = rounded ? aligned_alloc(align, rounded) : aligned_alloc(64, 64);
  if (p && align > 64) madvise(p, rounded, MADV_HUGEPAGE);
  if (!p || (nbytes && !rounded)) {
    free(p);
    err->kind = MX_E_OOM;
    snprintf(err->msg, sizeof err->msg, "aligned_alloc: out of host memory (%zu bytes)", nbytes);
    return MX_E_OOM;
  }
  *out = p;
  return MX_OK;
}

static void cpu_free_async(int dev, void *ptr) {
  (void)dev;
  free(ptr);
}

static int cpu_copy(int dev, void *dst, const void *src, size_t nbytes, mx_err *err) {
  (void)dev;
  (void)err;
  if (nbytes) memcpy(dst, src, nbytes);
  return MX_OK;
}

static int cpu_copy2d(int dev, void *dst, size_t dpitch, const void *src, size_t spitch,
                      size_t width, size_t height, mx_err *err) {
  (void)dev;
  (void)err;
  for (size_t r = 0; r < height; r++)
    memcpy((char *)dst + r * dpitch, (const char *)src + r * spitch, width);
  return MX_OK;
}

static int cpu_sync(int dev, mx_err *err) {
  (void)dev;
  (void)err;
  return MX_OK;
}

/* ---- creation ---------------------------------------------------------- */

static int cpu_fill(int dev, int dt, void *dst, size_t n, mx_scalar value, mx_err *err) {
  (void)dev;
  (void)err;
  if (dt == MX_F32) {
    float v = (float)value.f;
    float *y = dst;
    for (size_t i = 0; i < n; i++) y[i] = v;
    return MX_OK;
  }
  if (!mx_dtype_is_float(dt)) {
    for (size_t i = 0; i < n; i++) st_i(dt, dst, i, value.i);
    return MX_OK;
  }
  for (size_t i = 0; i < n; i++) st_d(dt, dst, i, value.f);
  return MX_OK;
}

static int cpu_iota(int dev, int dt, void *dst, size_t outer, size_t dim, size_t inner,
                    mx_err *err) {
  (void)dev;
  (void)err;
  size_t n = outer * dim * inner;
  for (size_t i = 0; i < n; i++) st_d(dt, dst, i, (double)((i / inner) % dim));
  return MX_OK;
}

static int cpu_random(int dev, int dt, void *dst, size_t n, uint64_t seed, int dist,
                      double a, double b, mx_err *err) {
  (void)dev;
  for (size_t i = 0; i < n; i++) {
    double v;
    if (dist == MX_UNIFORM) {
      v = a + (b - a) * mx_rand_unit(seed, i);
    } else if (dist == MX_NORMAL) {
      double u1 = 1.0 - mx_rand_unit(seed, 2 * (uint64_t)i);
      double u2 = mx_rand_unit(seed, 2 * (uint64_t)i + 1);
      v = a + b * (sqrt(-2.0 * log(u1)) * cos(MX_TWO_PI * u2));
    } else {
      return arg_error(err, "random: unknown distribution");
    }
    if (!mx_dtype_is_float(dt)) {
      st_i(dt, dst, i, double_to_int(floor(v)));
    } else {
      st_d(dt, dst, i, v);
      /* keep uniform samples below max after rounding to the dtype */
      if (dist == MX_UNIFORM && b > a && ld_d(dt, dst, i) >= b) {
        if (dt == MX_F64) ((double *)dst)[i] = nextafter(b, -INFINITY);
        else if (dt == MX_F32) ((float *)dst)[i] = mx_step_down_f32(((float *)dst)[i]);
        else ((uint16_t *)dst)[i] = mx_step_down16(((uint16_t *)dst)[i]);
      }
    }
  }
  return MX_OK;
}

/* ---- elementwise ------------------------------------------------------- */

static int cpu_cast(int dev, int sdt, const void *src, int ddt, void *dst, size_t n,
                    mx_err *err) {
  (void)dev;
  (void)err;
  if (sdt == ddt) {
    memcpy(dst, src, n * mx_dtype_size(sdt));
    return MX_OK;
  }
  if (!mx_dtype_is_float(sdt) && !mx_dtype_is_float(ddt)) { /* exact through int64 */
    for (size_t i = 0; i < n; i++) st_i(ddt, dst, i, ld_i(sdt, src, i));
    return MX_OK;
  }
  for (size_t i = 0; i < n; i++) st_d(ddt, dst, i, ld_d(sdt, src, i));
  return MX_OK;
}

static int unary_serial(int dev, int op, int dt, const void *x, void *y, size_t n, mx_err *err) {
  (void)dev;
  if (dt == MX_F64) {
    const double *a = x;
    double *o = y;
    for (size_t i = 0; i < n; i++) {
      double v = a[i];
      o[i] = op == MX_NEG ? -v : op == MX_EXP ? exp(v) : op == MX_LOG ? log(v) : sqrt(v);
    }
  } else if (mx_dtype_is_float(dt)) {
    for (size_t i = 0; i < n; i++) {
      float v = ld_f(dt, x, i);
      st_f(dt, y, i,
           op == MX_NEG ? -v : op == MX_EXP ? expf(v) : op == MX_LOG ? logf(v) : sqrtf(v));
    }
  } else {
    if (op != MX_NEG) return arg_error(err, "unary: exp, log and sqrt need a float type");
    for (size_t i = 0; i < n; i++) st_i(dt, y, i, (int64_t)(0 - (uint64_t)ld_i(dt, x, i)));
  }
  return MX_OK;
}

#define MX_BINOP(op, a, b)                                                        \
  ((op) == MX_ADD ? (a) + (b) : (op) == MX_SUB ? (a) - (b) : (op) == MX_MUL ? (a) * (b) \
   : (op) == MX_DIV ? (a) / (b) : (op) == MX_RSUB ? (b) - (a) : (b) / (a))

static inline float bin_f(int op, float a, float b) {
  if (op == MX_MAXIMUM) return (a != a || b != b) ? NAN : (a > b ? a : b);
  if (op == MX_MINIMUM) return (a != a || b != b) ? NAN : (a < b ? a : b);
  return MX_BINOP(op, a, b);
}

static inline double bin_d(int op, double a, double b) {
  if (op == MX_MAXIMUM) return (a != a || b != b) ? NAN : (a > b ? a : b);
  if (op == MX_MINIMUM) return (a != a || b != b) ? NAN : (a < b ? a : b);
  return MX_BINOP(op, a, b);
}

static inline int64_t bin_i(int op, int64_t a, int64_t b) {
  uint64_t ua = (uint64_t)a, ub = (uint64_t)b;
  switch (op) {
    case MX_ADD: return (int64_t)(ua + ub);
    case MX_SUB: return (int64_t)(ua - ub);
    case MX_RSUB: return (int64_t)(ub - ua);
    case MX_MUL: return (int64_t)(ua * ub);
    case MX_DIV: return b == 0 ? 0 : b == -1 ? (int64_t)(0 - ua) : a / b;
    case MX_RDIV: return a == 0 ? 0 : a == -1 ? (int64_t)(0 - ub) : b / a;
    case MX_MAXIMUM: return a > b ? a : b;
    default: return a < b ? a : b;
  }
}

static int binary_serial(int dev, int op, int dt, const void *a, const void *b, mx_scalar scalar,
                      int bmode, size_t n, size_t bn, void *out, mx_err *err) {
  (void)dev;
  if (bmode == MX_B_TRAILING && bn == 0 && n != 0)
    return arg_error(err, "binary: trailing operand is empty");
#ifdef __SSE2__
  /* Large same-shape f32 arithmetic: streaming stores skip the read-for-
   * ownership of the output, as memcpy does (a third fewer bytes moved). */
  if (dt == MX_F32 && bmode == MX_B_SAME && op <= MX_DIV && n >= ((size_t)1 << 16) &&
      ((uintptr_t)out & 15) == 0) {
    const float *x = a, *z = b;
    float *o = out;
    size_t n4 = n & ~(size_t)3;
    for (size_t i = 0; i < n4; i += 4) {
      __m128 p = _mm_loadu_ps(x + i), q = _mm_loadu_ps(z + i);
      __m128 r = op == MX_ADD ? _mm_add_ps(p, q) : op == MX_SUB ? _mm_sub_ps(p, q)
                 : op == MX_MUL ? _mm_mul_ps(p, q) : _mm_div_ps(p, q);
      _mm_stream_ps(o + i, r);
    }
    _mm_sfence();
    for (size_t i = n4; i < n; i++) o[i] = bin_f(op, x[i], z[i]);
    return MX_OK;
  }
#endif
  if (dt == MX_F32) { /* the hot type: one plain loop per op and operand mode */
    const float *x = a, *z = b;
    float *o = out, s = (float)scalar.f;
#define F32_LOOPS(EXPR)                                                            \
  do {                                                                             \
    if (bmode == MX_B_SAME) {                                                      \
      for (size_t i = 0; i < n; i++) { float p = x[i], q = z[i]; o[i] = (EXPR); }  \
    } else if (bmode == MX_B_SCALAR) {                                             \
      for (size_t i = 0; i < n; i++) { float p = x[i], q = s; o[i] = (EXPR); }     \
    } else {                                                                       \
      for (size_t i0 = 0; i0 < n; i0 += bn)                                        \
        for (size_t j = 0; j < bn; j++) { float p = x[i0 + j], q = z[j]; o[i0 + j] = (EXPR); } \
    }                                                                              \
  } while (0)
    switch (op) {
      case MX_ADD: F32_LOOPS(p + q); break;
      case MX_SUB: F32_LOOPS(p - q); break;
      case MX_MUL: F32_LOOPS(p * q); break;
      case MX_DIV: F32_LOOPS(p / q); break;
      case MX_RSUB: F32_LOOPS(q - p); break;
      case MX_RDIV: F32_LOOPS(q / p); break;
      default: F32_LOOPS(bin_f(op, p, q)); break;
    }
#undef F32_LOOPS
    return MX_OK;
  }
  if (dt == MX_F64) {
    const double *x = a, *z = b;
    double *o = out;
    for (size_t i = 0; i < n; i++) {
      double bv = bmode == MX_B_SCALAR ? scalar.f : z[bmode == MX_B_SAME ? i : i % bn];
      o[i] = bin_d(op, x[i], bv);
    }
  } else if (mx_dtype_is_float(dt)) {
    float s = f32_from_double(dt, scalar.f);
    for (size_t i = 0; i < n; i++) {
      float bv = bmode == MX_B_SCALAR ? s : ld_f(dt, b, bmode == MX_B_SAME ? i : i % bn);
      st_f(dt, out, i, bin_f(op, ld_f(dt, a, i), bv));
    }
  } else {
    int64_t s = scalar.i;
    for (size_t i = 0; i < n; i++) {
      int64_t bv = bmode == MX_B_SCALAR ? s : ld_i(dt, b, bmode == MX_B_SAME ? i : i % bn);
      st_i(dt, out, i, bin_i(op, ld_i(dt, a, i), bv));
    }
  }
  return MX_OK;
}

static int axpy_serial(int dev, int dt, mx_scalar alpha, const void *x, const void *y, void *out,
                    size_t n, mx_err *err) {
  (void)dev;
  (void)err;
  if (dt == MX_F64) {
    const double *a = x, *b = y;
    double *o = out;
    for (size_t i = 0; i < n; i++) o[i] = alpha.f * a[i] + b[i];
  } else if (mx_dtype_is_float(dt)) {
    float al = f32_from_double(dt, alpha.f);
    for (size_t i = 0; i < n; i++) st_f(dt, out, i, al * ld_f(dt, x, i) + ld_f(dt, y, i));
  } else {
    int64_t al = alpha.i;
    for (size_t i = 0; i < n; i++)
      st_i(dt, out, i, (int64_t)((uint64_t)al * (uint64_t)ld_i(dt, x, i) + (uint64_t)ld_i(dt, y, i)));
  }
  return MX_OK;
}

/* ---- threading of large elementwise ops ---------------------------------
 * Arrays of at least MX_PAR_MIN elements are cut into chunks of about
 * MX_PAR_CHUNK elements (a multiple of the trailing operand's length), each
 * chunk run by the serial kernel on a pool worker. Every chunk writes only
 * its own outputs, so results do not depend on the number of threads. */
#define MX_PAR_MIN ((size_t)1 << 21)
#define MX_PAR_CHUNK ((size_t)1 << 18)

typedef struct {
  int kind; /* 0 unary, 1 binary, 2 axpy */
  int op, dt, bmode;
  const char *a, *b;
  mx_scalar scalar;
  char *out;
  size_t n, bn, chunk, es;
} ew_job;

static void ew_item(void *ctx, int64_t item, int worker) {
  (void)worker;
  const ew_job *j = ctx;
  size_t i0 = (size_t)item * j->chunk;
  size_t len = j->n - i0 < j->chunk ? j->n - i0 : j->chunk;
  size_t off = i0 * j->es;
  mx_err err = {0, {0}};
  if (j->kind == 0) {
    unary_serial(0, j->op, j->dt, j->a + off, j->out + off, len, &err);
  } else if (j->kind == 1) {
    const char *b = j->bmode == MX_B_SAME ? j->b + off : j->b; /* trailing chunks start at 0 mod bn */
    binary_serial(0, j->op, j->dt, j->a + off, b, j->scalar, j->bmode, len, j->bn, j->out + off, &err);
  } else {
    axpy_serial(0, j->dt, j->scalar, j->a + off, j->b + off, j->out + off, len, &err);
  }
}

static void ew_parallel(ew_job *j) {
  size_t unit = j->bmode == MX_B_TRAILING && j->bn ? j->bn : 1;
  j->chunk = (MX_PAR_CHUNK + unit - 1) / unit * unit;
  j->es = mx_dtype_size(j->dt);
  mx_pool_for((int64_t)((j->n + j->chunk - 1) / j->chunk), ew_item, j);
}

static int cpu_unary(int dev, int op, int dt, const void *x, void *y, size_t n, mx_err *err) {
  if (n < MX_PAR_MIN || (op != MX_NEG && !mx_dtype_is_float(dt)))
    return unary_serial(dev, op, dt, x, y, n, err);
  ew_job j = {.kind = 0, .op = op, .dt = dt, .a = x, .out = y, .n = n};
  ew_parallel(&j);
  return MX_OK;
}

static int cpu_binary(int dev, int op, int dt, const void *a, const void *b, mx_scalar scalar,
                      int bmode, size_t n, size_t bn, void *out, mx_err *err) {
  if (n < MX_PAR_MIN || (bmode == MX_B_TRAILING && bn == 0))
    return binary_serial(dev, op, dt, a, b, scalar, bmode, n, bn, out, err);
  ew_job j = {.kind = 1, .op = op, .dt = dt, .bmode = bmode, .a = a, .b = b, .scalar = scalar,
              .out = out, .n = n, .bn = bn};
  ew_parallel(&j);
  return MX_OK;
}

static int cpu_axpy(int dev, int dt, mx_scalar alpha, const void *x, const void *y, void *out,
                    size_t n, mx_err *err) {
  if (n < MX_PAR_MIN) return axpy_serial(dev, dt, alpha, x, y, out, n, err);
  ew_job j = {.kind = 2, .dt = dt, .a = x, .b = y, .scalar = alpha, .out = out, .n = n};
  ew_parallel(&j);
  return MX_OK;
}

/* ---- reductions and permutes ------------------------------------------- */

static int cpu_reduce(int dev, int op, int dt, const void *x, void *out, size_t outer,
                      size_t dim, size_t inner, mx_err *err) {
  (void)dev;
  if (dim == 0) return arg_error(err, "reduce: empty axis");
  for (size_t o = 0; o < outer; o++) {
    for (size_t in = 0; in < inner; in++) {
      size_t base = o * dim * inner + in;
      size_t dst = o * inner + in;
      if (dt == MX_F64) {
        double acc = ((const double *)x)[base];
        for (size_t k = 1; k < dim; k++) {
          double v = ((const double *)x)[base + k * inner];
          acc = op == MX_RMAX ? ((acc != acc || v != v) ? NAN : (v > acc ? v : acc)) : acc + v;
        }
        ((double *)out)[dst] = op == MX_MEAN ? acc / (double)dim : acc;
      } else if (mx_dtype_is_float(dt)) {
        /* sums accumulate in double (sequentially, so the order is fixed):
         * a long f32 sum then carries no more than rounding of the result */
        double acc = ld_f(dt, x, base);
        for (size_t k = 1; k < dim; k++) {
          double v = ld_f(dt, x, base + k * inner);
          acc = op == MX_RMAX ? ((acc != acc || v != v) ? NAN : (v > acc ? v : acc)) : acc + v;
        }
        st_f(dt, out, dst, (float)(op == MX_MEAN ? acc / (double)dim : acc));
      } else {
        int64_t acc = ld_i(dt, x, base);
        for (size_t k = 1; k < dim; k++) {
          int64_t v = ld_i(dt, x, base + k * inner);
          acc = op == MX_RMAX ? (v > acc ? v : acc) : (int64_t)((uint64_t)acc + (uint64_t)v);
        }
        st_i(dt, out, dst, op == MX_MEAN ? acc / (int64_t)dim : acc);
      }
    }
  }
  return MX_OK;
}

static int cpu_permute(int dev, size_t elsize, const void *x, void *out, int rank,
                       const int64_t *x_shape, const int *perm, mx_err *err) {
  (void)dev;
  if (rank < 0 || rank > MX_MAX_RANK) return arg_error(err, "permute: rank out of range");
  int64_t x_stride[MX_MAX_RANK], out_shape[MX_MAX_RANK], src_stride[MX_MAX_RANK];
  int64_t n = 1;
  for (int k = rank - 1; k >= 0; k--) {
    x_stride[k] = n;
    n *= x_shape[k];
  }
  for (int k = 0; k < rank; k++) {
    out_shape[k] = x_shape[perm[k]];
    src_stride[k] = x_stride[perm[k]];
  }
  int64_t idx[MX_MAX_RANK] = {0};
  int64_t src = 0;
  const char *in = x;
  char *o = out;
  for (int64_t i = 0; i < n; i++) {
    memcpy(o + (size_t)i * elsize, in + (size_t)src * elsize, elsize);
    /* advance the output coordinate like an odometer */
    for (int k = rank - 1; k >= 0; k--) {
      idx[k]++;
      src += src_stride[k];
      if (idx[k] < out_shape[k]) break;
      src -= src_stride[k] * out_shape[k];
      idx[k] = 0;
    }
  }
  return MX_OK;
}

/* ---- timing (host clock: CPU ops run synchronously) -------------------- */

static int cpu_event_record(int dev, void **event, mx_err *err) {
  (void)dev;
  struct timespec *ts = malloc(sizeof *ts);
  if (!ts) {
    err->kind = MX_E_OOM;
    snprintf(err->msg, sizeof err->msg, "event_record: out of host memory");
    return MX_E_OOM;
  }
  clock_gettime(CLOCK_MONOTONIC, ts);
  *event = ts;
  return MX_OK;
}

static int cpu_event_elapsed(int dev, void *start, void *end, double *us, mx_err *err) {
  (void)dev;
  (void)err;
  const struct timespec *a = start, *b = end;
  *us = (double)(b->tv_sec - a->tv_sec) * 1e6 + (double)(b->tv_nsec - a->tv_nsec) * 1e-3;
  return MX_OK;
}

static void cpu_event_destroy(int dev, void *event) {
  (void)dev;
  free(event);
}

static int cpu_spin(int dev, double us, mx_err *err) {
  (void)dev;
  (void)us;
  (void)err;
  return MX_OK;
}

static const mx_backend cpu_backend = {
    .abi = MX_BACKEND_ABI,
    .name = "cpu",
    .device_count = cpu_device_count,
    .device_name = cpu_device_name,
    .alloc = cpu_alloc,
    .free_async = cpu_free_async,
    .upload = cpu_copy,
    .download = cpu_copy,
    .copy2d = cpu_copy2d,
    .sync = cpu_sync,
    .fill = cpu_fill,
    .iota = cpu_iota,
    .random = cpu_random,
    .cast = cpu_cast,
    .unary = cpu_unary,
    .binary = cpu_binary,
    .axpy = cpu_axpy,
    .reduce = cpu_reduce,
    .permute = cpu_permute,
    .event_record = cpu_event_record,
    .event_elapsed = cpu_event_elapsed,
    .event_destroy = cpu_event_destroy,
    .spin = cpu_spin,
    .scan_forward = cpu_scan_forward,
    .scan_backward = cpu_scan_backward,
    .gemm = cpu_gemm,
    .sum_rows = cpu_sum_rows,
    .conv1d_forward = cpu_conv1d_forward,
    .conv1d_backward = cpu_conv1d_backward,
    .norm_forward = cpu_norm_forward,
    .norm_backward = cpu_norm_backward,
    .act_forward = cpu_act_forward,
    .act_backward = cpu_act_backward,
    .swiglu_forward = cpu_swiglu_forward,
    .swiglu_backward = cpu_swiglu_backward,
    .cross_entropy = cpu_cross_entropy,
    .mse = cpu_mse,
    .adamw = cpu_adamw,
};

const mx_backend *mx_cpu_backend(void) { return &cpu_backend; }

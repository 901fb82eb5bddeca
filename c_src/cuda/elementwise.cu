/*
 * elementwise.cu: creation (fill, iota, random) and elementwise ops (cast,
 * unary, binary, axpy) of the CUDA backend.
 *
 * Every kernel is a grid-stride loop with 64-bit indices over n elements,
 * MX_BLOCK threads per block, at most one full wave of blocks
 * (mx_cuda_grid). f32 binary (SAME and SCALAR modes) and f32 axpy have a
 * float4 path taken when every pointer is 16-byte aligned and n is large.
 *
 * Numerics, which the CPU backend mirrors bit for bit (cuda_dtypes.cuh has
 * the conversions):
 *   fill     store(scalar_value(value)): integers exact, floats as from_double.
 *   iota     element i = store(from_double((double)((i / inner) % dim))).
 *   random   in double: UNIFORM v = a + (b - a) * u, u = mx_rand_unit(seed, i);
 *            NORMAL u1 = 1 - mx_rand_unit(seed, 2i), u2 = mx_rand_unit(seed, 2i+1),
 *            z = sqrt(-2 log u1) * cos(MX_TWO_PI u2), v = a + b * z; each
 *            multiply and add rounded separately (no FMA). Float dtypes store
 *            from_double(v); integer dtypes store mx_d2i(floor(v)).
 *            (CUDA's double log/cos may differ from libm's in the last ulp.)
 *   cast     same dtype: a byte copy. Integer -> integer: through int64
 *            (exact, then wraps). Otherwise through double:
 *            store(from_double(to_double(load(x)))).
 *   unary    NEG (all dtypes, integers wrap); EXP/LOG/SQRT float dtypes
 *            only: expf/logf/sqrtf in float, exp/log/sqrt in double.
 *   binary   in the compute type; the SCALAR operand is from_double(scalar).
 *            Integer DIV: divisor 0 -> 0, INT64_MIN / -1 -> 0, else C
 *            truncation. MAXIMUM = a or b NaN ? NAN : (a > b ? a : b) and
 *            MINIMUM likewise with <: the canonical quiet NaN, ties give b.
 *            (NaN payloads are not portable: GPU arithmetic on a NaN gives
 *            0x7fffffff where x86 keeps the operand's payload.)
 *   axpy     alpha * x + y with alpha = from_double(alpha), the product
 *            rounded before the add (no FMA); integers wrap.
 */
#include <type_traits>

#include "cuda_dtypes.cuh"
#include "cuda_ops.h"
#include "cuda_runtime_state.h"

/* Below this many elements the float4 path is not worth a second kernel. */
#define MX_VEC_MIN 4096

#define GRID_STRIDE_LOOP(i, n)                                                   \
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
       i += (uint64_t)gridDim.x * blockDim.x)

static int bad_dtype(mx_err *err, const char *op, int dtype) {
  return mx_cuda_fail(err, MX_E_ARG, "%s: unknown dtype %d", op, dtype);
}

static bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* ------------------------------------------------------------------------ */
/* Device math                                                               */

MX_DEV float mx_exp(float x) { return expf(x); }
MX_DEV double mx_exp(double x) { return exp(x); }
MX_DEV float mx_log(float x) { return logf(x); }
MX_DEV double mx_log(double x) { return log(x); }
MX_DEV float mx_sqrt(float x) { return sqrtf(x); }
MX_DEV double mx_sqrt(double x) { return sqrt(x); }
/* a * b + c with two roundings, never contracted into an FMA. */
MX_DEV float mx_mul_add(float a, float b, float c) { return __fadd_rn(__fmul_rn(a, b), c); }
MX_DEV double mx_mul_add(double a, double b, double c) { return __dadd_rn(__dmul_rn(a, b), c); }
MX_DEV int64_t mx_mul_add(int64_t a, int64_t b, int64_t c) { return mx_wadd(mx_wmul(a, b), c); }

template <int OP, class C>
MX_DEV C binop(C a, C b) {
  if constexpr (std::is_same<C, int64_t>::value) {
    switch (OP) {
      case MX_ADD: return mx_wadd(a, b);
      case MX_SUB: return mx_wsub(a, b);
      case MX_MUL: return mx_wmul(a, b);
      case MX_DIV: return mx_idiv(a, b);
      case MX_RSUB: return mx_wsub(b, a);
      case MX_RDIV: return mx_idiv(b, a);
      case MX_MAXIMUM: return a > b ? a : b;
      default: return a < b ? a : b; /* MX_MINIMUM */
    }
  } else {
    switch (OP) {
      case MX_ADD: return a + b;
      case MX_SUB: return a - b;
      case MX_MUL: return a * b;
      case MX_DIV: return a / b;
      case MX_RSUB: return b - a;
      case MX_RDIV: return b / a;
      case MX_MAXIMUM: return (a != a || b != b) ? (C)NAN : (a > b ? a : b);
      default: return (a != a || b != b) ? (C)NAN : (a < b ? a : b); /* MX_MINIMUM */
    }
  }
}

template <int OP, class C>
MX_DEV C unop(C x) {
  if constexpr (std::is_same<C, int64_t>::value) {
    return mx_wneg(x); /* only NEG exists for integers */
  } else {
    switch (OP) {
      case MX_NEG: return -x;
      case MX_EXP: return mx_exp(x);
      case MX_LOG: return mx_log(x);
      default: return mx_sqrt(x); /* MX_SQRT */
    }
  }
}

/* ------------------------------------------------------------------------ */
/* Kernels                                                                   */

template <class D>
static __global__ void __launch_bounds__(MX_BLOCK)
    fill_kernel(typename D::T *dst, // (n)
                uint64_t n, typename D::C value) {
  const typename D::T v = D::store(value);
  GRID_STRIDE_LOOP(i, n) dst[i] = v;
}

template <class D>
static __global__ void __launch_bounds__(MX_BLOCK)
    iota_kernel(typename D::T *dst, // (outer, dim, inner)
                uint64_t n, uint64_t dim, uint64_t inner) {
  GRID_STRIDE_LOOP(i, n) dst[i] = D::store(D::from_double((double)((i / inner) % dim)));
}

template <class D>
static __global__ void __launch_bounds__(MX_BLOCK)
    random_kernel(typename D::T *dst, // (n)
                  uint64_t n, uint64_t seed, int dist, double a, double b) {
  GRID_STRIDE_LOOP(i, n) {
    double v;
    if (dist == MX_UNIFORM) {
      double u = mx_rand_unit(seed, i);
      v = mx_mul_add(b - a, u, a);
    } else {
      double u1 = 1.0 - mx_rand_unit(seed, 2 * i);
      double u2 = mx_rand_unit(seed, 2 * i + 1);
      double z = __dmul_rn(sqrt(__dmul_rn(-2.0, log(u1))), cos(__dmul_rn(MX_TWO_PI, u2)));
      v = mx_mul_add(b, z, a);
    }
    if constexpr (D::is_int) {
      dst[i] = D::store(mx_d2i(floor(v)));
    } else {
      typename D::T r = D::store(D::from_double(v));
      /* keep uniform samples below max after rounding to the dtype */
      if (dist == MX_UNIFORM && b > a && D::to_double(D::load(r)) >= b) r = D::step_down(r, b);
      dst[i] = r;
    }
  }
}

template <class S, class D>
static __global__ void __launch_bounds__(MX_BLOCK)
    cast_kernel(const typename S::T *x, // (n)
                typename D::T *y,       // (n)
                uint64_t n) {
  GRID_STRIDE_LOOP(i, n) {
    if constexpr (S::is_int && D::is_int)
      y[i] = D::store((int64_t)S::load(x[i]));
    else
      y[i] = D::store(D::from_double(S::to_double(S::load(x[i]))));
  }
}

template <class D, int OP>
static __global__ void __launch_bounds__(MX_BLOCK)
    unary_kernel(const typename D::T *x, // (n)
                 typename D::T *y,       // (n)
                 uint64_t n) {
  GRID_STRIDE_LOOP(i, n) y[i] = D::store(unop<OP>(D::load(x[i])));
}

/* b is read as b[i] (SAME), the scalar s (SCALAR) or b[i % bn] (TRAILING). */
template <class D, int OP>
static __global__ void __launch_bounds__(MX_BLOCK)
    binary_kernel(const typename D::T *a, // (n)
                  const typename D::T *b, // (n), NULL or (bn)
                  typename D::C s, int mode, uint64_t n, uint64_t bn,
                  typename D::T *out) { // (n)
  if (mode == MX_B_SAME) {
    GRID_STRIDE_LOOP(i, n) out[i] = D::store(binop<OP>(D::load(a[i]), D::load(b[i])));
  } else if (mode == MX_B_SCALAR) {
    GRID_STRIDE_LOOP(i, n) out[i] = D::store(binop<OP>(D::load(a[i]), s));
  } else {
    /* Track j = i % bn incrementally: one division per thread, not per element. */
    uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    const uint64_t step = stride % bn;
    uint64_t j = i % bn;
    for (; i < n; i += stride) {
      out[i] = D::store(binop<OP>(D::load(a[i]), D::load(b[j])));
      j += step;
      if (j >= bn) j -= bn;
    }
  }
}

/* f32, SAME (b != NULL) or SCALAR (b == NULL); a, b, out 16-byte aligned. */
template <int OP>
static __global__ void __launch_bounds__(MX_BLOCK)
    binary_vec4_kernel(const float *a, // (n)
                       const float *b, // (n) or NULL
                       float s, uint64_t n,
                       float *out) { // (n)
  const uint64_t n4 = n / 4;
  const float4 *a4 = reinterpret_cast<const float4 *>(a);
  const float4 *b4 = reinterpret_cast<const float4 *>(b);
  float4 *o4 = reinterpret_cast<float4 *>(out);
  if (b) {
    GRID_STRIDE_LOOP(i, n4) {
      float4 x = a4[i], y = b4[i], r;
      r.x = binop<OP>(x.x, y.x);
      r.y = binop<OP>(x.y, y.y);
      r.z = binop<OP>(x.z, y.z);
      r.w = binop<OP>(x.w, y.w);
      o4[i] = r;
    }
  } else {
    GRID_STRIDE_LOOP(i, n4) {
      float4 x = a4[i], r;
      r.x = binop<OP>(x.x, s);
      r.y = binop<OP>(x.y, s);
      r.z = binop<OP>(x.z, s);
      r.w = binop<OP>(x.w, s);
      o4[i] = r;
    }
  }
  const uint64_t t = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t < n - n4 * 4) {
    const uint64_t i = n4 * 4 + t;
    out[i] = binop<OP>(a[i], b ? b[i] : s);
  }
}

template <class D>
static __global__ void __launch_bounds__(MX_BLOCK)
    axpy_kernel(typename D::C alpha,
                const typename D::T *x, // (n)
                const typename D::T *y, // (n)
                typename D::T *out,     // (n)
                uint64_t n) {
  GRID_STRIDE_LOOP(i, n) out[i] = D::store(mx_mul_add(alpha, D::load(x[i]), D::load(y[i])));
}

/* f32; x, y, out 16-byte aligned. */
static __global__ void __launch_bounds__(MX_BLOCK)
    axpy_vec4_kernel(float alpha,
                     const float *x, // (n)
                     const float *y, // (n)
                     float *out,     // (n)
                     uint64_t n) {
  const uint64_t n4 = n / 4;
  const float4 *x4 = reinterpret_cast<const float4 *>(x);
  const float4 *y4 = reinterpret_cast<const float4 *>(y);
  float4 *o4 = reinterpret_cast<float4 *>(out);
  GRID_STRIDE_LOOP(i, n4) {
    float4 u = x4[i], v = y4[i], r;
    r.x = mx_mul_add(alpha, u.x, v.x);
    r.y = mx_mul_add(alpha, u.y, v.y);
    r.z = mx_mul_add(alpha, u.z, v.z);
    r.w = mx_mul_add(alpha, u.w, v.w);
    o4[i] = r;
  }
  const uint64_t t = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t < n - n4 * 4) {
    const uint64_t i = n4 * 4 + t;
    out[i] = mx_mul_add(alpha, x[i], y[i]);
  }
}

/* ------------------------------------------------------------------------ */
/* Launchers: called with the device mutex held; they own the grid math.     */

namespace { /* internal linkage: nothing here reaches the symbol table */

/* A scalar operand in D's compute type, on the host, exactly as
 * D::from_double converts on the device (integers exact from s.i). */
template <class D>
static typename D::C scalar_value(mx_scalar s) {
  if constexpr (D::is_int)
    return (typename D::C)s.i;
  else if constexpr (std::is_same<D, mx_t_f64>::value)
    return s.f;
  else if constexpr (std::is_same<D, mx_t_f32>::value)
    return (float)s.f;
  else
    return mx_f64_to_f32_odd(s.f); /* bf16, f16: one correct final rounding */
}

struct fill_forward {
  mx_cuda_dev *d;
  void *dst;
  uint64_t n;
  mx_scalar value;
  mx_err *err;
  template <class D>
  int run() {
    fill_kernel<D><<<mx_cuda_grid(d, n), MX_BLOCK, 0, d->stream>>>((typename D::T *)dst, n,
                                                                   scalar_value<D>(value));
    MX_CUDA_LAUNCHED(d, err, "fill_kernel");
    return MX_OK;
  }
};

struct iota_forward {
  mx_cuda_dev *d;
  void *dst;
  uint64_t n, dim, inner;
  mx_err *err;
  template <class D>
  int run() {
    iota_kernel<D><<<mx_cuda_grid(d, n), MX_BLOCK, 0, d->stream>>>((typename D::T *)dst, n, dim,
                                                                   inner);
    MX_CUDA_LAUNCHED(d, err, "iota_kernel");
    return MX_OK;
  }
};

struct random_forward {
  mx_cuda_dev *d;
  void *dst;
  uint64_t n, seed;
  int dist;
  double a, b;
  mx_err *err;
  template <class D>
  int run() {
    random_kernel<D><<<mx_cuda_grid(d, n), MX_BLOCK, 0, d->stream>>>((typename D::T *)dst, n,
                                                                     seed, dist, a, b);
    MX_CUDA_LAUNCHED(d, err, "random_kernel");
    return MX_OK;
  }
};

/* Second level of the cast dispatch: the source tag is fixed. */
template <class S>
struct cast_to {
  mx_cuda_dev *d;
  const void *x;
  void *y;
  uint64_t n;
  mx_err *err;
  template <class D>
  int run() {
    cast_kernel<S, D><<<mx_cuda_grid(d, n), MX_BLOCK, 0, d->stream>>>(
        (const typename S::T *)x, (typename D::T *)y, n);
    MX_CUDA_LAUNCHED(d, err, "cast_kernel");
    return MX_OK;
  }
};

struct cast_forward {
  mx_cuda_dev *d;
  const void *x;
  int dst_dtype;
  void *y;
  uint64_t n;
  mx_err *err;
  template <class S>
  int run() {
    cast_to<S> to = {d, x, y, n, err};
    return mx_dispatch_dtype(dst_dtype, to);
  }
};

struct unary_forward {
  mx_cuda_dev *d;
  int op;
  const void *x;
  void *y;
  uint64_t n;
  mx_err *err;
  template <class D, int OP>
  int launch() {
    unary_kernel<D, OP><<<mx_cuda_grid(d, n), MX_BLOCK, 0, d->stream>>>(
        (const typename D::T *)x, (typename D::T *)y, n);
    MX_CUDA_LAUNCHED(d, err, "unary_kernel");
    return MX_OK;
  }
  template <class D>
  int run() {
    if constexpr (D::is_int) {
      return launch<D, MX_NEG>(); /* the caller allowed NEG only */
    } else {
      switch (op) {
        case MX_NEG: return launch<D, MX_NEG>();
        case MX_EXP: return launch<D, MX_EXP>();
        case MX_LOG: return launch<D, MX_LOG>();
        default: return launch<D, MX_SQRT>();
      }
    }
  }
};

struct binary_forward {
  mx_cuda_dev *d;
  int op;
  const void *a, *b;
  mx_scalar scalar;
  int bmode;
  uint64_t n, bn;
  void *out;
  mx_err *err;
  template <class D, int OP>
  int launch() {
    if constexpr (std::is_same<D, mx_t_f32>::value) {
      if (n >= MX_VEC_MIN && bmode != MX_B_TRAILING && aligned16(a) && aligned16(out) &&
          (bmode == MX_B_SCALAR || aligned16(b))) {
        binary_vec4_kernel<OP><<<mx_cuda_grid(d, n / 4), MX_BLOCK, 0, d->stream>>>(
            (const float *)a, bmode == MX_B_SAME ? (const float *)b : NULL, (float)scalar.f, n,
            (float *)out);
        MX_CUDA_LAUNCHED(d, err, "binary_vec4_kernel");
        return MX_OK;
      }
    }
    typename D::C s = scalar_value<D>(scalar);
    binary_kernel<D, OP><<<mx_cuda_grid(d, n), MX_BLOCK, 0, d->stream>>>(
        (const typename D::T *)a, (const typename D::T *)b, s, bmode, n, bn,
        (typename D::T *)out);
    MX_CUDA_LAUNCHED(d, err, "binary_kernel");
    return MX_OK;
  }
  template <class D>
  int run() {
    switch (op) {
      case MX_ADD: return launch<D, MX_ADD>();
      case MX_SUB: return launch<D, MX_SUB>();
      case MX_MUL: return launch<D, MX_MUL>();
      case MX_DIV: return launch<D, MX_DIV>();
      case MX_RSUB: return launch<D, MX_RSUB>();
      case MX_RDIV: return launch<D, MX_RDIV>();
      case MX_MAXIMUM: return launch<D, MX_MAXIMUM>();
      default: return launch<D, MX_MINIMUM>();
    }
  }
};

struct axpy_forward {
  mx_cuda_dev *d;
  mx_scalar alpha;
  const void *x, *y;
  void *out;
  uint64_t n;
  mx_err *err;
  template <class D>
  int run() {
    if constexpr (std::is_same<D, mx_t_f32>::value) {
      if (n >= MX_VEC_MIN && aligned16(x) && aligned16(y) && aligned16(out)) {
        axpy_vec4_kernel<<<mx_cuda_grid(d, n / 4), MX_BLOCK, 0, d->stream>>>(
            (float)alpha.f, (const float *)x, (const float *)y, (float *)out, n);
        MX_CUDA_LAUNCHED(d, err, "axpy_vec4_kernel");
        return MX_OK;
      }
    }
    typename D::C al = scalar_value<D>(alpha);
    axpy_kernel<D><<<mx_cuda_grid(d, n), MX_BLOCK, 0, d->stream>>>(
        al, (const typename D::T *)x, (const typename D::T *)y, (typename D::T *)out, n);
    MX_CUDA_LAUNCHED(d, err, "axpy_kernel");
    return MX_OK;
  }
};

} // namespace

/* ------------------------------------------------------------------------ */
/* Entry points                                                              */

/* Run `fn` for `dtype` with the device mutex held. */
template <class F>
static int enqueue(mx_cuda_dev *d, int dtype, F &fn) {
  pthread_mutex_lock(&d->mu);
  int rc = mx_dispatch_dtype(dtype, fn);
  mx_cuda_unlock(d);
  return rc;
}

int mx_cuda_fill(int dev, int dtype, void *dst, size_t n, mx_scalar value, mx_err *err) {
  mx_cuda_dev *d = NULL;
  int rc = mx_cuda_open(dev, err, &d);
  if (rc != MX_OK) return rc;
  if (!mx_dtype_size(dtype)) return bad_dtype(err, "fill", dtype);
  if (n == 0) return MX_OK;
  if (!dst) return mx_cuda_fail(err, MX_E_ARG, "fill: NULL pointer");
  fill_forward fn = {d, dst, n, value, err};
  return enqueue(d, dtype, fn);
}

int mx_cuda_iota(int dev, int dtype, void *dst, size_t outer, size_t dim, size_t inner,
                 mx_err *err) {
  mx_cuda_dev *d = NULL;
  int rc = mx_cuda_open(dev, err, &d);
  if (rc != MX_OK) return rc;
  if (!mx_dtype_size(dtype)) return bad_dtype(err, "iota", dtype);
  uint64_t n = (uint64_t)outer * dim * inner;
  if (n == 0) return MX_OK;
  if (!dst) return mx_cuda_fail(err, MX_E_ARG, "iota: NULL pointer");
  iota_forward fn = {d, dst, n, dim, inner, err};
  return enqueue(d, dtype, fn);
}

int mx_cuda_random(int dev, int dtype, void *dst, size_t n, uint64_t seed, int dist,
                   double a, double b, mx_err *err) {
  mx_cuda_dev *d = NULL;
  int rc = mx_cuda_open(dev, err, &d);
  if (rc != MX_OK) return rc;
  if (!mx_dtype_size(dtype)) return bad_dtype(err, "random", dtype);
  if (dist != MX_UNIFORM && dist != MX_NORMAL)
    return mx_cuda_fail(err, MX_E_ARG, "random: unknown distribution %d", dist);
  if (n == 0) return MX_OK;
  if (!dst) return mx_cuda_fail(err, MX_E_ARG, "random: NULL pointer");
  random_forward fn = {d, dst, n, seed, dist, a, b, err};
  return enqueue(d, dtype, fn);
}

int mx_cuda_cast(int dev, int src_dtype, const void *src, int dst_dtype, void *dst, size_t n,
                 mx_err *err) {
  mx_cuda_dev *d = NULL;
  int rc = mx_cuda_open(dev, err, &d);
  if (rc != MX_OK) return rc;
  if (!mx_dtype_size(src_dtype)) return bad_dtype(err, "cast", src_dtype);
  if (!mx_dtype_size(dst_dtype)) return bad_dtype(err, "cast", dst_dtype);
  if (n == 0) return MX_OK;
  if (!src || !dst) return mx_cuda_fail(err, MX_E_ARG, "cast: NULL pointer");
  if (src_dtype == dst_dtype) {
    pthread_mutex_lock(&d->mu);
    rc = MX_CUDA_CALL(d, err, cudaMemcpyAsync(dst, src, n * mx_dtype_size(src_dtype),
                                              cudaMemcpyDeviceToDevice, d->stream));
    mx_cuda_unlock(d);
    return rc;
  }
  cast_forward fn = {d, src, dst_dtype, dst, n, err};
  return enqueue(d, src_dtype, fn);
}

int mx_cuda_unary(int dev, int op, int dtype, const void *x, void *y, size_t n, mx_err *err) {
  mx_cuda_dev *d = NULL;
  int rc = mx_cuda_open(dev, err, &d);
  if (rc != MX_OK) return rc;
  if (!mx_dtype_size(dtype)) return bad_dtype(err, "unary", dtype);
  if (op < MX_NEG || op > MX_SQRT)
    return mx_cuda_fail(err, MX_E_ARG, "unary: unknown op %d", op);
  if (op != MX_NEG && !mx_dtype_is_float(dtype))
    return mx_cuda_fail(err, MX_E_ARG, "unary: op %d needs a float dtype, got %d", op, dtype);
  if (n == 0) return MX_OK;
  if (!x || !y) return mx_cuda_fail(err, MX_E_ARG, "unary: NULL pointer");
  unary_forward fn = {d, op, x, y, n, err};
  return enqueue(d, dtype, fn);
}

int mx_cuda_binary(int dev, int op, int dtype, const void *a, const void *b, mx_scalar scalar,
                   int bmode, size_t n, size_t bn, void *out, mx_err *err) {
  mx_cuda_dev *d = NULL;
  int rc = mx_cuda_open(dev, err, &d);
  if (rc != MX_OK) return rc;
  if (!mx_dtype_size(dtype)) return bad_dtype(err, "binary", dtype);
  if (op < MX_ADD || op > MX_MINIMUM)
    return mx_cuda_fail(err, MX_E_ARG, "binary: unknown op %d", op);
  if (bmode != MX_B_SAME && bmode != MX_B_SCALAR && bmode != MX_B_TRAILING)
    return mx_cuda_fail(err, MX_E_ARG, "binary: unknown operand mode %d", bmode);
  if (n == 0) return MX_OK;
  if (!a || !out || (bmode != MX_B_SCALAR && !b))
    return mx_cuda_fail(err, MX_E_ARG, "binary: NULL pointer");
  if (bmode == MX_B_TRAILING && bn == 0)
    return mx_cuda_fail(err, MX_E_ARG, "binary: trailing operand of 0 elements");
  binary_forward fn = {d, op, a, b, scalar, bmode, n, bn, out, err};
  return enqueue(d, dtype, fn);
}

int mx_cuda_axpy(int dev, int dtype, mx_scalar alpha, const void *x, const void *y, void *out,
                 size_t n, mx_err *err) {
  mx_cuda_dev *d = NULL;
  int rc = mx_cuda_open(dev, err, &d);
  if (rc != MX_OK) return rc;
  if (!mx_dtype_size(dtype)) return bad_dtype(err, "axpy", dtype);
  if (n == 0) return MX_OK;
  if (!x || !y || !out) return mx_cuda_fail(err, MX_E_ARG, "axpy: NULL pointer");
  axpy_forward fn = {d, alpha, x, y, out, n, err};
  return enqueue(d, dtype, fn);
}

/*
 * activation_cpu.c: pointwise activations (SiLU, GELU tanh form, softplus,
 * sigmoid) and SwiGLU, forward and backward, on the CPU, f32 (fp32 math)
 * and f64 (fp64 math).
 *
 *   sigmoid(x)  = 1 / (1 + exp(-x))           sigmoid' = s (1 - s)
 *   silu(x)     = x sigmoid(x)                silu'    = s (1 + x (1 - s))
 *   softplus(x) = log1p(exp(x)), x where x > 20
 *                                             softplus' = sigmoid(x), 1 where x > 20
 *   gelu(x)     = x (1 + tanh(u)) / 2,  u = k (x + c x^3), k = sqrt(2/pi), c = 0.044715
 *                 gelu' = (1 + t) / 2 + x (1 - t^2) k (1 + 3 c x^2) / 2,  t = tanh(u)
 *   swiglu(a, b) = silu(a) b:  da = dout b silu'(a),  db = dout silu(a)
 *
 * Evaluation: with e = exp(-|x|), sigmoid(x) and 1 - sigmoid(x) are 1/(1+e)
 * and e/(1+e) (in the order the sign of x says): no overflow and no
 * cancellation. GELU is evaluated as x sigmoid(2u) (= x (1 + tanh u) / 2)
 * and its derivative as s + 2 k x s (1 - s)(1 + 3 c x^2), s = sigmoid(2u),
 * the same functions without the cancellation of 1 + tanh(u) for x << 0. Elementwise: every output element depends
 * on its inputs only; big calls are cut into fixed chunks run on the pool
 * (cpu_pool.h), so results do not depend on the number of threads.
 */
#include <math.h>
#include <stdio.h>

#include "cpu_kernels.h"
#include "cpu_pool.h"

/* Calls of at least this many elements run on the pool, in chunks of ACT_CHUNK. */
#define ACT_PAR_MIN ((size_t)1 << 16)
#define ACT_CHUNK ((size_t)1 << 15)

#define GELU_K 0.79788456080286535588 /* sqrt(2 / pi) */
#define GELU_C 0.044715

static int act_fail(mx_err *err, const char *op, const char *msg) {
  err->kind = MX_E_ARG;
  snprintf(err->msg, sizeof err->msg, "%s: %s", op, msg);
  return MX_E_ARG;
}

/* The scalar functions, once per float type. sig2 gives sigmoid(x) and
 * 1 - sigmoid(x) from one e = exp(-|x|), both without cancellation. GELU
 * uses 1 + tanh(u) = 2 sigmoid(2u) and 1 - tanh(u)^2 = 4 sigmoid(2u)
 * (1 - sigmoid(2u)), so that its left tail keeps full relative precision. */
#define DEFINE_ACT_MATH(T, SFX, EXP, LOG1P)                                              \
  static inline void sig2_##SFX(T x, T *s, T *sm) {                                     \
    T e = EXP(x >= 0 ? -x : x);                                                         \
    T r = (T)1 / ((T)1 + e);                                                            \
    *s = x >= 0 ? r : e * r;                                                            \
    *sm = x >= 0 ? e * r : r;                                                           \
  }                                                                                     \
  static inline T sigm_##SFX(T x) {                                                     \
    T s, sm;                                                                            \
    sig2_##SFX(x, &s, &sm);                                                             \
    return s;                                                                           \
  }                                                                                     \
  static inline T act_f_##SFX(int act, T x) {                                           \
    switch (act) {                                                                      \
      case MX_ACT_SILU: return x * sigm_##SFX(x);                                       \
      case MX_ACT_GELU_TANH:                                                            \
        return x * sigm_##SFX((T)(2 * GELU_K) * (x + (T)GELU_C * x * x * x));           \
      case MX_ACT_SOFTPLUS: return x > (T)20 ? x : LOG1P(EXP(x));                       \
      default: return sigm_##SFX(x);                                                    \
    }                                                                                   \
  }                                                                                     \
  static inline T act_df_##SFX(int act, T x) {                                          \
    T s, sm;                                                                            \
    switch (act) {                                                                      \
      case MX_ACT_SILU:                                                                 \
        sig2_##SFX(x, &s, &sm);                                                         \
        return s * ((T)1 + x * sm);                                                     \
      case MX_ACT_GELU_TANH: {                                                          \
        T x2 = x * x;                                                                   \
        sig2_##SFX((T)(2 * GELU_K) * (x + (T)GELU_C * x2 * x), &s, &sm);                \
        return s + (T)(2 * GELU_K) * x * s * sm * ((T)1 + (T)(3 * GELU_C) * x2);        \
      }                                                                                 \
      case MX_ACT_SOFTPLUS: return x > (T)20 ? (T)1 : sigm_##SFX(x);                    \
      default:                                                                          \
        sig2_##SFX(x, &s, &sm);                                                         \
        return s * sm;                                                                  \
    }                                                                                   \
  }                                                                                     \
  /* kind: 0 act fwd, 1 act bwd, 2 swiglu fwd, 3 swiglu bwd; [i0, i1) */              \
  static void act_range_##SFX(int kind, int act, const T *restrict p0,                  \
                              const T *restrict p1, const T *restrict p2, T *restrict o0, \
                              T *restrict o1, size_t i0, size_t i1) {                   \
    switch (kind) {                                                                     \
      case 0:                                                                           \
        for (size_t i = i0; i < i1; i++) o0[i] = act_f_##SFX(act, p0[i]);               \
        break;                                                                          \
      case 1:                                                                           \
        for (size_t i = i0; i < i1; i++) o0[i] = p1[i] * act_df_##SFX(act, p0[i]);      \
        break;                                                                          \
      case 2:                                                                           \
        for (size_t i = i0; i < i1; i++) o0[i] = p0[i] * sigm_##SFX(p0[i]) * p1[i];     \
        break;                                                                          \
      default:                                                                          \
        for (size_t i = i0; i < i1; i++) {                                              \
          T a = p0[i], s, sm, g = p2[i];                                                \
          sig2_##SFX(a, &s, &sm);                                                       \
          o0[i] = g * p1[i] * (s * ((T)1 + a * sm));                                    \
          o1[i] = g * (a * s);                                                          \
        }                                                                               \
        break;                                                                          \
    }                                                                                   \
  }

DEFINE_ACT_MATH(float, f32, expf, log1pf)
DEFINE_ACT_MATH(double, f64, exp, log1p)

typedef struct {
  int kind, act, dtype;
  const void *p0, *p1, *p2;
  void *o0, *o1;
  size_t n;
} act_job;

static void act_run_range(const act_job *j, size_t i0, size_t i1) {
  if (j->dtype == MX_F32)
    act_range_f32(j->kind, j->act, j->p0, j->p1, j->p2, j->o0, j->o1, i0, i1);
  else
    act_range_f64(j->kind, j->act, j->p0, j->p1, j->p2, j->o0, j->o1, i0, i1);
}

static void act_item(void *ctx, int64_t item, int worker) {
  (void)worker;
  const act_job *j = ctx;
  size_t i0 = (size_t)item * ACT_CHUNK;
  size_t i1 = j->n - i0 < ACT_CHUNK ? j->n : i0 + ACT_CHUNK;
  act_run_range(j, i0, i1);
}

static int act_run(act_job *j, const char *op, mx_err *err) {
  if (j->dtype != MX_F32 && j->dtype != MX_F64)
    return act_fail(err, op, "the CPU takes f32 or f64");
  if (j->kind <= 1 && (j->act < MX_ACT_SILU || j->act > MX_ACT_SIGMOID))
    return act_fail(err, op, "unknown activation");
  if (j->n == 0) return MX_OK;
  if (!j->p0 || !j->o0 || (j->kind >= 1 && !j->p1) || (j->kind == 3 && (!j->p2 || !j->o1)))
    return act_fail(err, op, "NULL pointer");
  if (j->n < ACT_PAR_MIN) {
    act_run_range(j, 0, j->n);
  } else {
    mx_pool_for((int64_t)((j->n + ACT_CHUNK - 1) / ACT_CHUNK), act_item, j);
  }
  return MX_OK;
}

int cpu_act_forward(int dev, int act, int dtype, const void *x, void *y, size_t n, mx_err *err) {
  (void)dev;
  act_job j = {.kind = 0, .act = act, .dtype = dtype, .p0 = x, .o0 = y, .n = n};
  return act_run(&j, "act_forward", err);
}

int cpu_act_backward(int dev, int act, int dtype, const void *x, const void *dy, void *dx,
                     size_t n, mx_err *err) {
  (void)dev;
  act_job j = {.kind = 1, .act = act, .dtype = dtype, .p0 = x, .p1 = dy, .o0 = dx, .n = n};
  return act_run(&j, "act_backward", err);
}

int cpu_swiglu_forward(int dev, int dtype, const void *a, const void *b, void *out, size_t n,
                       mx_err *err) {
  (void)dev;
  act_job j = {.kind = 2, .dtype = dtype, .p0 = a, .p1 = b, .o0 = out, .n = n};
  return act_run(&j, "swiglu_forward", err);
}

int cpu_swiglu_backward(int dev, int dtype, const void *a, const void *b, const void *dout,
                        void *da, void *db, size_t n, mx_err *err) {
  (void)dev;
  act_job j = {.kind = 3, .dtype = dtype, .p0 = a, .p1 = b, .p2 = dout, .o0 = da, .o1 = db,
               .n = n};
  return act_run(&j, "swiglu_backward", err);
}

/*
 * norm_cpu.c: RMSNorm and LayerNorm over the last axis of (rows, dim), with
 * the optional fused residual add, forward and backward, on the CPU, for f32
 * (fp32 math) and f64 (fp64 math), io == param (see mx_norm_args in
 * backend.h).
 *
 * ---- Forward (one row) ------------------------------------------------------
 *
 *   s_j    = x_j + residual_j            (s = x without residual; written to sum)
 *   RMSNorm:   mean = 0,                 rstd = 1 / sqrt(sum_j s_j^2 / dim + eps)
 *   LayerNorm: mean = sum_j s_j / dim,   rstd = 1 / sqrt(sum_j (s_j - mean)^2 / dim + eps)
 *   xhat_j = (s_j - mean) rstd
 *   y_j    = xhat_j w_j (+ b_j)
 *
 * The LayerNorm variance is the centred second pass over the row (no
 * E[s^2] - mean^2 cancellation). The rstd of every row, and for LayerNorm its
 * mean, are saved for the backward.
 *
 * ---- Gradient conventions (backward) ------------------------------------------
 *
 * Given dy (rows, dim) and optionally dsum (the gradient reaching s along
 * the residual stream), with g_j = dy_j w_j:
 *
 *   RMSNorm:   ds_j = rstd (g_j - xhat_j sum_k(g_k xhat_k) / dim)
 *   LayerNorm: ds_j = rstd (g_j - sum_k g_k / dim - xhat_j sum_k(g_k xhat_k) / dim)
 *   dx_j  = ds_j + dsum_j                    (also the residual's gradient)
 *   dw_j  = sum over rows of dy_j xhat_j     dbias_j = sum over rows of dy_j
 *
 * xhat is recomputed from the saved s and statistics.
 *
 * ---- Work split and determinism -----------------------------------------------
 *
 * Rows are cut into chunks whose size depends on (rows, dim) only; each pool
 * item (cpu_pool.h) is one chunk. Forward items write their own rows. Backward
 * items write their rows of dx and one row of per-chunk partial sums of dw
 * and dbias (scratch, nchunks x dim, in row order inside the chunk); the
 * partials are then summed over chunks 0, 1, ... in order. Row reductions use
 * NLANE interleaved accumulators combined by a fixed tree. So results are
 * bit-identical from run to run whatever the number of threads. Small calls
 * run the same items on the calling thread.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"
#include "cpu_pool.h"

/* Interleaved accumulators of a row reduction (vectorisable, fixed order). */
#define NLANE 8
/* At most this many chunks of rows (so the partials stay small). */
#define MAX_CHUNKS 64
/* A chunk holds at least this many elements. */
#define CHUNK_MIN_ELEMS 16384
/* Below this many elements a call runs on the calling thread. */
#define PAR_MIN_ELEMS ((int64_t)1 << 16)

static int norm_fail(mx_err *err, int kind, const char *op, const char *msg) {
  err->kind = kind;
  snprintf(err->msg, sizeof err->msg, "%s: %s", op, msg);
  return kind;
}

static int norm_check(const mx_norm_args *a, const char *op, mx_err *err) {
  if (!a) return norm_fail(err, MX_E_ARG, op, "NULL arguments");
  if (a->io != a->param || (a->io != MX_F32 && a->io != MX_F64))
    return norm_fail(err, MX_E_ARG, op, "the CPU takes io == param in {f32, f64}");
  if (a->kind != MX_RMSNORM && a->kind != MX_LAYERNORM)
    return norm_fail(err, MX_E_ARG, op, "unknown norm kind");
  if (a->rows < 0 || a->dim < 1) return norm_fail(err, MX_E_ARG, op, "bad shape");
  if (a->bias && a->kind != MX_LAYERNORM)
    return norm_fail(err, MX_E_ARG, op, "bias is for LayerNorm only");
  if (!(a->eps >= 0)) return norm_fail(err, MX_E_ARG, op, "eps must be >= 0");
  return MX_OK;
}

/* Rows per chunk: a function of the shape only. */
static int64_t chunk_rows(int64_t rows, int64_t dim) {
  int64_t by_size = (CHUNK_MIN_ELEMS + dim - 1) / dim;
  int64_t by_count = (rows + MAX_CHUNKS - 1) / MAX_CHUNKS;
  int64_t c = by_size > by_count ? by_size : by_count;
  return c < 1 ? 1 : c;
}

static void run_items(int64_t count, mx_pool_fn fn, void *ctx, int parallel) {
  if (parallel && count > 1) {
    mx_pool_for(count, fn, ctx);
  } else {
    for (int64_t i = 0; i < count; i++) fn(ctx, i, 0);
  }
}

typedef struct {
  const mx_norm_args *a;
  int64_t chunk;
  /* forward */
  void *y, *sum, *mean, *rstd;
  /* backward */
  const void *smean, *srstd, *dy, *dsum;
  void *dx;
  void *pw, *pb; /* (nchunks, dim) partials of dweight / dbias, or NULL */
} norm_ctx;

/* One instance of the kernels per float type: T is the storage and compute
 * type (fp32 math for f32, fp64 for f64). */
#define DEFINE_NORM_KERNELS(T, SFX, SQRT)                                                    \
  static inline T rsum_##SFX(const T acc[NLANE]) {                                          \
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])); \
  }                                                                                          \
  /* sum_j v_j over (n) */                                                                   \
  static T row_sum_##SFX(const T *restrict v, int64_t n) {                                  \
    T acc[NLANE] = {0};                                                                      \
    int64_t j = 0;                                                                           \
    for (; j + NLANE <= n; j += NLANE)                                                       \
      for (int k = 0; k < NLANE; k++) acc[k] += v[j + k];                                    \
    for (int k = 0; j < n; j++, k++) acc[k] += v[j];                                         \
    return rsum_##SFX(acc);                                                                  \
  }                                                                                          \
  /* sum_j (v_j - c)^2 over (n) */                                                           \
  static T row_sqsum_##SFX(const T *restrict v, T c, int64_t n) {                           \
    T acc[NLANE] = {0};                                                                      \
    int64_t j = 0;                                                                           \
    for (; j + NLANE <= n; j += NLANE)                                                       \
      for (int k = 0; k < NLANE; k++) {                                                      \
        T d = v[j + k] - c;                                                                  \
        acc[k] += d * d;                                                                     \
      }                                                                                      \
    for (int k = 0; j < n; j++, k++) {                                                       \
      T d = v[j] - c;                                                                        \
      acc[k] += d * d;                                                                       \
    }                                                                                        \
    return rsum_##SFX(acc);                                                                  \
  }                                                                                          \
                                                                                             \
  static void fwd_item_##SFX(void *vctx, int64_t item, int worker) {                        \
    (void)worker;                                                                            \
    const norm_ctx *c = vctx;                                                                \
    const mx_norm_args *a = c->a;                                                            \
    const int64_t D = a->dim;                                                                \
    const int64_t r0 = item * c->chunk;                                                      \
    const int64_t r1 = r0 + c->chunk < a->rows ? r0 + c->chunk : a->rows;                   \
    const int ln = a->kind == MX_LAYERNORM;                                                  \
    const T eps = (T)a->eps, inv_d = (T)1 / (T)D;                                            \
    const T *restrict w = a->weight;                                                         \
    const T *restrict b = a->bias;                                                           \
    for (int64_t r = r0; r < r1; r++) {                                                      \
      const T *restrict x = (const T *)a->x + r * D;                                         \
      const T *s = x;                                                                        \
      if (a->residual) {                                                                     \
        const T *restrict res = (const T *)a->residual + r * D;                              \
        T *restrict sr = (T *)c->sum + r * D;                                                \
        for (int64_t j = 0; j < D; j++) sr[j] = x[j] + res[j];                               \
        s = sr;                                                                              \
      }                                                                                      \
      T mu = ln ? row_sum_##SFX(s, D) * inv_d : (T)0;                                        \
      T var = row_sqsum_##SFX(s, mu, D) * inv_d;                                             \
      T rs = (T)1 / SQRT(var + eps);                                                         \
      ((T *)c->rstd)[r] = rs;                                                                \
      if (ln) ((T *)c->mean)[r] = mu;                                                        \
      T *restrict y = (T *)c->y + r * D;                                                     \
      if (b) {                                                                               \
        for (int64_t j = 0; j < D; j++) y[j] = (s[j] - mu) * rs * w[j] + b[j];               \
      } else {                                                                               \
        for (int64_t j = 0; j < D; j++) y[j] = (s[j] - mu) * rs * w[j];                      \
      }                                                                                      \
    }                                                                                        \
  }                                                                                          \
                                                                                             \
  static void bwd_item_##SFX(void *vctx, int64_t item, int worker) {                        \
    (void)worker;                                                                            \
    const norm_ctx *c = vctx;                                                                \
    const mx_norm_args *a = c->a;                                                            \
    const int64_t D = a->dim;                                                                \
    const int64_t r0 = item * c->chunk;                                                      \
    const int64_t r1 = r0 + c->chunk < a->rows ? r0 + c->chunk : a->rows;                   \
    const int ln = a->kind == MX_LAYERNORM;                                                  \
    const T inv_d = (T)1 / (T)D;                                                             \
    const T *restrict w = a->weight;                                                         \
    T *restrict pw = c->pw ? (T *)c->pw + item * D : NULL;                                   \
    T *restrict pb = c->pb ? (T *)c->pb + item * D : NULL;                                   \
    if (pw) memset(pw, 0, (size_t)D * sizeof(T));                                            \
    if (pb) memset(pb, 0, (size_t)D * sizeof(T));                                            \
    for (int64_t r = r0; r < r1; r++) {                                                      \
      const T *restrict s = (const T *)a->x + r * D;                                         \
      const T *restrict dy = (const T *)c->dy + r * D;                                       \
      T *restrict dx = (T *)c->dx + r * D;                                                   \
      const T mu = ln ? ((const T *)c->smean)[r] : (T)0;                                     \
      const T rs = ((const T *)c->srstd)[r];                                                 \
      T acc_gx[NLANE] = {0}, acc_g[NLANE] = {0};                                             \
      int64_t j = 0;                                                                         \
      for (; j + NLANE <= D; j += NLANE)                                                     \
        for (int k = 0; k < NLANE; k++) {                                                    \
          T g = dy[j + k] * w[j + k];                                                        \
          acc_gx[k] += g * ((s[j + k] - mu) * rs);                                           \
          acc_g[k] += g;                                                                     \
        }                                                                                    \
      for (int k = 0; j < D; j++, k++) {                                                     \
        T g = dy[j] * w[j];                                                                  \
        acc_gx[k] += g * ((s[j] - mu) * rs);                                                 \
        acc_g[k] += g;                                                                       \
      }                                                                                      \
      const T mgx = rsum_##SFX(acc_gx) * inv_d;                                              \
      const T mg = ln ? rsum_##SFX(acc_g) * inv_d : (T)0;                                    \
      if (c->dsum) {                                                                         \
        const T *restrict dsum = (const T *)c->dsum + r * D;                                 \
        for (j = 0; j < D; j++) {                                                            \
          T xh = (s[j] - mu) * rs;                                                           \
          dx[j] = rs * (dy[j] * w[j] - mg - xh * mgx) + dsum[j];                             \
        }                                                                                    \
      } else {                                                                               \
        for (j = 0; j < D; j++) {                                                            \
          T xh = (s[j] - mu) * rs;                                                           \
          dx[j] = rs * (dy[j] * w[j] - mg - xh * mgx);                                       \
        }                                                                                    \
      }                                                                                      \
      if (pw)                                                                                \
        for (j = 0; j < D; j++) pw[j] += dy[j] * ((s[j] - mu) * rs);                         \
      if (pb)                                                                                \
        for (j = 0; j < D; j++) pb[j] += dy[j];                                              \
    }                                                                                        \
  }                                                                                          \
                                                                                             \
  /* out_j = [out_j +] sum over chunks k = 0, 1, ... of part[k, j] */                        \
  static void reduce_parts_##SFX(const T *restrict part, int64_t nchunks, int64_t D,        \
                                 T *restrict out, int accumulate) {                          \
    for (int64_t j = 0; j < D; j++) {                                                        \
      T t = 0;                                                                               \
      for (int64_t k = 0; k < nchunks; k++) t += part[k * D + j];                            \
      out[j] = accumulate ? out[j] + t : t;                                                  \
    }                                                                                        \
  }

DEFINE_NORM_KERNELS(float, f32, sqrtf)
DEFINE_NORM_KERNELS(double, f64, sqrt)

int cpu_norm_forward(int dev, const mx_norm_args *a, void *y, void *sum, void *mean, void *rstd,
                     mx_err *err) {
  (void)dev;
  const char *op = "norm_forward";
  int rc = norm_check(a, op, err);
  if (rc) return rc;
  if (a->rows == 0) return MX_OK;
  if (!a->x || !a->weight || !y || !rstd || (a->residual && !sum) ||
      (a->kind == MX_LAYERNORM && !mean))
    return norm_fail(err, MX_E_ARG, op, "missing input or output");
  norm_ctx c = {.a = a, .y = y, .sum = sum, .mean = mean, .rstd = rstd};
  c.chunk = chunk_rows(a->rows, a->dim);
  const int64_t items = (a->rows + c.chunk - 1) / c.chunk;
  const int par = (double)a->rows * (double)a->dim >= (double)PAR_MIN_ELEMS;
  run_items(items, a->io == MX_F32 ? fwd_item_f32 : fwd_item_f64, &c, par);
  return MX_OK;
}

int cpu_norm_backward(int dev, const mx_norm_args *a, const void *mean, const void *rstd,
                      const void *dy, const void *dsum, void *dx, void *dweight, void *dbias,
                      int accumulate, mx_err *err) {
  (void)dev;
  const char *op = "norm_backward";
  int rc = norm_check(a, op, err);
  if (rc) return rc;
  if (dbias && a->kind != MX_LAYERNORM)
    return norm_fail(err, MX_E_ARG, op, "dbias is for LayerNorm only");
  const size_t es = mx_dtype_size(a->io);
  const int64_t D = a->dim;
  if (a->rows == 0) { /* empty sums */
    if (!accumulate) {
      if (dweight) memset(dweight, 0, (size_t)D * es);
      if (dbias) memset(dbias, 0, (size_t)D * es);
    }
    return MX_OK;
  }
  if (!a->x || !a->weight || !rstd || !dy || !dx || (a->kind == MX_LAYERNORM && !mean))
    return norm_fail(err, MX_E_ARG, op, "missing input or output");
  norm_ctx c = {.a = a, .smean = mean, .srstd = rstd, .dy = dy, .dsum = dsum, .dx = dx};
  c.chunk = chunk_rows(a->rows, D);
  const int64_t items = (a->rows + c.chunk - 1) / c.chunk;
  const int nparts = (dweight ? 1 : 0) + (dbias ? 1 : 0);
  void *scratch = NULL;
  if (nparts) {
    scratch = malloc((size_t)items * (size_t)D * es * (size_t)nparts);
    if (!scratch) return norm_fail(err, MX_E_OOM, op, "out of host memory for partial sums");
    char *p = scratch;
    if (dweight) {
      c.pw = p;
      p += (size_t)items * (size_t)D * es;
    }
    if (dbias) c.pb = p;
  }
  const int par = (double)a->rows * (double)D >= (double)PAR_MIN_ELEMS;
  run_items(items, a->io == MX_F32 ? bwd_item_f32 : bwd_item_f64, &c, par);
  if (a->io == MX_F32) {
    if (dweight) reduce_parts_f32(c.pw, items, D, dweight, accumulate);
    if (dbias) reduce_parts_f32(c.pb, items, D, dbias, accumulate);
  } else {
    if (dweight) reduce_parts_f64(c.pw, items, D, dweight, accumulate);
    if (dbias) reduce_parts_f64(c.pb, items, D, dbias, accumulate);
  }
  free(scratch);
  return MX_OK;
}

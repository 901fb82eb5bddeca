/*
 * loss_cpu.c: the losses of the CPU backend: softmax cross-entropy over the
 * last axis of (rows, classes) logits with s32 targets, and the mean squared
 * error. f32 (fp32 math) and f64 (fp64 math), io == param. Each loss and its
 * gradient come from one pass over the inputs.
 *
 * ---- Cross-entropy (backend.h, mx_xent_args) --------------------------------
 *
 * For row r with target t = targets[r]:
 *   ignored  (has_ignore and t == ignore_index): l_r = 0, w_r = 0, the row's
 *            gradient is exactly 0 (whatever its logits);
 *   bad      (otherwise t outside [0, classes)): l_r = NaN and the row's
 *            gradient is NaN; it counts 1 in the mean's denominator (the
 *            targets are never used to index anything in that case);
 *   valid    w_r = weights[t] (1 without weights),
 *            m = max_j x_j, s = sum_j exp(x_j - m),
 *            l_r = w_r ((m - x_t) + log s)            (logsumexp - x_t, stable)
 *            dx_j = g w_r (exp(x_j - m) / s - [j == t])
 * with den = sum of w_r over the rows not ignored (rows without weights and
 * ignore) when `mean`, else 1, g = scale / den (0 when den == 0: 0/0 = 0),
 * and loss = g * sum_r l_r.
 *
 * ---- MSE ------------------------------------------------------------------
 *   loss = g' sum_i (p_i - y_i)^2,  dpred_i = 2 g' (p_i - y_i),
 *   g' = scale / n when `mean` (0 when n == 0), else scale.
 *
 * ---- Work split and determinism -------------------------------------------
 *
 * Rows (cross-entropy) and elements (MSE) are cut into work items of a fixed
 * size that depends on the shape only (XENT_ITEM_ELEMS logits per item, whole
 * rows; MSE_ITEM_ELEMS elements). Each item writes its own gradient slice and
 * one partial sum (double, accumulated in a fixed order inside the item);
 * the partials are summed in item order afterwards. So results are
 * bit-identical whatever the number of threads (cpu_pool.h) and from run to
 * run. Inside a row, the max and the sum of exponentials use LANES explicit
 * accumulators (element j goes to lane j % LANES, lanes combined by a fixed
 * tree), which the compiler turns into vertical vector operations at any
 * SIMD width without changing the order. The mean's denominator is summed
 * over rows in order (double) before the items run, since every gradient
 * needs it. Partial sums are in double for f32 too.
 *
 * ---- f32 exp ----------------------------------------------------------------
 * exp in f32 is xent_expf below (so that the loops vectorise; libm calls
 * would not): Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2, and the
 * degree-7 Taylor polynomial of exp(r) (truncation < 1e-8, a few ulp in
 * all). Inputs below -87 give 0 (no subnormals), NaN gives NaN; the softmax
 * only ever passes x - max <= 0. f64 uses libm's exp.
 *
 * The file includes itself once per type (LOSS_CPU_TYPED) to instantiate the
 * typed kernels for float and double.
 */
#ifndef LOSS_CPU_TYPED

/* ?: selects on float comparisons below are not if-converted, and so not
 * vectorised, under GCC's default -ftrapping-math; nothing here enables
 * FP traps, so the option changes no value. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/backend.h"
#include "cpu_kernels.h"
#include "cpu_pool.h"

#define LANES 16
/* Logits per cross-entropy work item (whole rows, at least one). */
#define XENT_ITEM_ELEMS 32768
/* Elements per MSE work item. */
#define MSE_ITEM_ELEMS 65536
/* Below this many elements a call runs on the calling thread. */
#define LOSS_SERIAL_ELEMS 65536

/* Row kinds (see the header). */
enum { ROW_VALID = 0, ROW_IGNORED = 1, ROW_BAD = 2 };

static inline float xent_expf(float x) {
  const float log2e = 1.44269504088896341f;
  const float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f; /* k ln2_hi is exact */
  const float shifter = 12582912.0f;                          /* 1.5 * 2^23 */
  const uint32_t shifter_bits = 0x4B400000u;
  float xc = x > -87.0f ? x : -87.0f; /* NaN becomes -87 here, NaN again below */
  xc = xc < 88.0f ? xc : 88.0f;
  float t = xc * log2e + shifter; /* shifter + k, k = round(x / ln2) in [-126, 127] */
  float k = t - shifter;
  float r = (xc - k * ln2_hi) - k * ln2_lo;
  float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 +
                        r * (1.0f / 720 + r * (1.0f / 5040)))))));
  uint32_t tb;
  memcpy(&tb, &t, sizeof tb);
  uint32_t bits = (tb - shifter_bits + 127u) << 23; /* 2^k, a normal number */
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  float e = p * scale;
  e = x < -87.0f ? 0.0f : e;
  return x != x ? x : e;
}

/* The row kind of target t. */
static inline int row_kind(const mx_xent_args *a, int64_t t) {
  if (a->has_ignore && t == a->ignore_index) return ROW_IGNORED;
  return (t < 0 || t >= a->classes) ? ROW_BAD : ROW_VALID;
}

typedef struct {
  const mx_xent_args *a;
  void *dlogits;
  double gscale;      /* scale / den (or scale) */
  int64_t item_rows;  /* rows per item */
  double *partial;    /* (items) */
} xent_ctx;

typedef struct {
  const void *pred, *target;
  void *dpred;
  size_t n;
  double gscale;      /* 2 * scale [/ n] */
  double *partial;    /* (items) */
} mse_ctx;

#define LOSS_CPU_TYPED
#define REAL float
#define SFX(name) name##_f32
#define LOSS_EXP(x) xent_expf(x)
#define LOSS_LOG(x) logf(x)
#include "loss_cpu.c" /* this file, typed part */
#undef REAL
#undef SFX
#undef LOSS_EXP
#undef LOSS_LOG

#define REAL double
#define SFX(name) name##_f64
#define LOSS_EXP(x) exp(x)
#define LOSS_LOG(x) log(x)
#include "loss_cpu.c" /* this file, typed part */
#undef REAL
#undef SFX
#undef LOSS_EXP
#undef LOSS_LOG
#undef LOSS_CPU_TYPED

/* ---- drivers ---------------------------------------------------------------- */

static int loss_fail(mx_err *err, int kind, const char *op, const char *msg) {
  err->kind = kind;
  snprintf(err->msg, sizeof err->msg, "%s: %s", op, msg);
  return kind;
}

/* Runs items on the pool, or in order on this thread for small calls. */
static void loss_run(int64_t count, mx_pool_fn fn, void *ctx, int parallel) {
  if (parallel && count > 1) {
    mx_pool_for(count, fn, ctx);
  } else {
    for (int64_t i = 0; i < count; i++) fn(ctx, i, 0);
  }
}

/* The sum of the partials in item order. */
static double sum_partials(const double *p, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; i++) s += p[i];
  return s;
}

int cpu_cross_entropy(int dev, const mx_xent_args *a, void *loss, void *dlogits, mx_err *err) {
  (void)dev;
  const char *op = "cross_entropy";
  if (!a) return loss_fail(err, MX_E_ARG, op, "no arguments");
  if (a->io != a->param || (a->io != MX_F32 && a->io != MX_F64))
    return loss_fail(err, MX_E_ARG, op, "the CPU backend takes io == param in {f32, f64}");
  if (a->rows < 0 || a->classes < 1)
    return loss_fail(err, MX_E_ARG, op, "bad sizes (need rows >= 0, classes >= 1)");
  if (!loss || (a->rows > 0 && (!a->logits || !a->targets)))
    return loss_fail(err, MX_E_ARG, op, "logits, targets and loss are required");
  const int f64 = a->io == MX_F64;

  /* The mean's denominator, over rows in order. */
  double den = 1.0;
  if (a->mean) {
    den = f64 ? den_f64(a) : den_f32(a);
  }
  const double gscale = den != 0.0 ? a->scale / den : 0.0;

  const int64_t rows = a->rows, C = a->classes;
  int64_t item_rows = XENT_ITEM_ELEMS / C;
  if (item_rows < 1) item_rows = 1;
  const int64_t items = (rows + item_rows - 1) / item_rows;
  double one_partial = 0.0;
  double *partial = &one_partial;
  if (items > 1) {
    partial = malloc((size_t)items * sizeof *partial);
    if (!partial) return loss_fail(err, MX_E_OOM, op, "out of memory for partial sums");
  }
  xent_ctx c = {a, dlogits, gscale, item_rows, partial};
  const double work = (double)rows * (double)C;
  loss_run(items, f64 ? xent_item_f64 : xent_item_f32, &c, work >= LOSS_SERIAL_ELEMS);
  const double total = items > 0 ? sum_partials(partial, items) : 0.0;
  if (partial != &one_partial) free(partial);
  /* gscale == 0 (den == 0) gives 0 unless a row is NaN. */
  const double value = total * gscale;
  if (f64)
    *(double *)loss = value;
  else
    *(float *)loss = (float)value;
  return MX_OK;
}

int cpu_mse(int dev, int io, int param, const void *pred, const void *target, size_t n, int mean,
            double scale, void *loss, void *dpred, mx_err *err) {
  (void)dev;
  const char *op = "mse";
  if (io != param || (io != MX_F32 && io != MX_F64))
    return loss_fail(err, MX_E_ARG, op, "the CPU backend takes io == param in {f32, f64}");
  if (!loss || (n > 0 && (!pred || !target)))
    return loss_fail(err, MX_E_ARG, op, "pred, target and loss are required");
  const int f64 = io == MX_F64;
  const double g = mean ? (n > 0 ? scale / (double)n : 0.0) : scale;
  const int64_t items = (int64_t)((n + MSE_ITEM_ELEMS - 1) / MSE_ITEM_ELEMS);
  double one_partial = 0.0;
  double *partial = &one_partial;
  if (items > 1) {
    partial = malloc((size_t)items * sizeof *partial);
    if (!partial) return loss_fail(err, MX_E_OOM, op, "out of memory for partial sums");
  }
  mse_ctx c = {pred, target, dpred, n, 2.0 * g, partial};
  loss_run(items, f64 ? mse_item_f64 : mse_item_f32, &c, n >= LOSS_SERIAL_ELEMS);
  const double total = items > 0 ? sum_partials(partial, items) : 0.0;
  if (partial != &one_partial) free(partial);
  const double value = total * g;
  if (f64)
    *(double *)loss = value;
  else
    *(float *)loss = (float)value;
  return MX_OK;
}

#else /* LOSS_CPU_TYPED: the typed kernels, REAL = float or double */

/* The mean's denominator: sum of w_r over rows not ignored (1 for a bad
 * target or without weights), in row order. */
static double SFX(den)(const mx_xent_args *a) {
  const REAL *w = (const REAL *)a->weights;
  double den = 0.0;
  for (int64_t r = 0; r < a->rows; r++) {
    const int64_t t = a->targets[r];
    const int kind = row_kind(a, t);
    if (kind == ROW_IGNORED) continue;
    den += (kind == ROW_VALID && w) ? (double)w[t] : 1.0;
  }
  return den;
}

/* One valid row x (C): returns w ((m - x_t) + log s); writes the gradient
 * g w (softmax - onehot) into dx when dx != NULL. */
static double SFX(xent_row)(const REAL *x, int64_t C, int64_t t, double w, double g, REAL *dx) {
  REAL lm[LANES];
  for (int l = 0; l < LANES; l++) lm[l] = (REAL)-INFINITY;
  const int64_t Cv = C - C % LANES;
  for (int64_t j = 0; j < Cv; j += LANES)
    for (int l = 0; l < LANES; l++) lm[l] = x[j + l] > lm[l] ? x[j + l] : lm[l];
  for (int64_t j = Cv; j < C; j++) lm[0] = x[j] > lm[0] ? x[j] : lm[0];
  for (int h = LANES / 2; h > 0; h /= 2)
    for (int l = 0; l < h; l++) lm[l] = lm[l + h] > lm[l] ? lm[l + h] : lm[l];
  const REAL m = lm[0];

  REAL ls[LANES];
  for (int l = 0; l < LANES; l++) ls[l] = 0;
  if (dx) {
    for (int64_t j = 0; j < Cv; j += LANES)
      for (int l = 0; l < LANES; l++) {
        const REAL e = LOSS_EXP(x[j + l] - m);
        dx[j + l] = e;
        ls[l] += e;
      }
    for (int64_t j = Cv; j < C; j++) {
      const REAL e = LOSS_EXP(x[j] - m);
      dx[j] = e;
      ls[0] += e;
    }
  } else {
    for (int64_t j = 0; j < Cv; j += LANES)
      for (int l = 0; l < LANES; l++) ls[l] += LOSS_EXP(x[j + l] - m);
    for (int64_t j = Cv; j < C; j++) ls[0] += LOSS_EXP(x[j] - m);
  }
  for (int h = LANES / 2; h > 0; h /= 2)
    for (int l = 0; l < h; l++) ls[l] = ls[l] + ls[l + h];
  const REAL s = ls[0];

  if (dx) {
    const REAL c = (REAL)(g * w);
    const REAL rs = (REAL)1 / s;
    const REAL et = dx[t];
    for (int64_t j = 0; j < C; j++) dx[j] = c * (dx[j] * rs);
    dx[t] = c * (et * rs - (REAL)1);
  }
  return w * ((double)(m - x[t]) + (double)LOSS_LOG(s));
}

/* Work item: rows [i * item_rows, ...) of the call. */
static void SFX(xent_item)(void *vctx, int64_t item, int worker) {
  (void)worker;
  const xent_ctx *c = vctx;
  const mx_xent_args *a = c->a;
  const int64_t C = a->classes;
  const int64_t r0 = item * c->item_rows;
  const int64_t r1 = r0 + c->item_rows < a->rows ? r0 + c->item_rows : a->rows;
  const REAL *w = (const REAL *)a->weights;
  double acc = 0.0;
  for (int64_t r = r0; r < r1; r++) {
    const REAL *x = (const REAL *)a->logits + r * C;
    REAL *dx = c->dlogits ? (REAL *)c->dlogits + r * C : NULL;
    const int64_t t = a->targets[r];
    switch (row_kind(a, t)) {
      case ROW_IGNORED:
        if (dx) memset(dx, 0, (size_t)C * sizeof(REAL));
        break;
      case ROW_BAD:
        if (dx)
          for (int64_t j = 0; j < C; j++) dx[j] = (REAL)NAN;
        acc += NAN;
        break;
      default:
        acc += SFX(xent_row)(x, C, t, w ? (double)w[t] : 1.0, c->gscale, dx);
    }
  }
  c->partial[item] = acc;
}

/* Work item: elements [i * MSE_ITEM_ELEMS, ...). */
static void SFX(mse_item)(void *vctx, int64_t item, int worker) {
  (void)worker;
  const mse_ctx *c = vctx;
  const size_t i0 = (size_t)item * MSE_ITEM_ELEMS;
  const size_t len = c->n - i0 < MSE_ITEM_ELEMS ? c->n - i0 : MSE_ITEM_ELEMS;
  const REAL *p = (const REAL *)c->pred + i0, *y = (const REAL *)c->target + i0;
  REAL *dp = c->dpred ? (REAL *)c->dpred + i0 : NULL;
  const REAL g = (REAL)c->gscale;
  double acc[LANES];
  for (int l = 0; l < LANES; l++) acc[l] = 0.0;
  const size_t lv = len - len % LANES;
  if (dp) {
    for (size_t i = 0; i < lv; i += LANES)
      for (int l = 0; l < LANES; l++) {
        const REAL d = p[i + l] - y[i + l];
        dp[i + l] = g * d;
        acc[l] += (double)d * (double)d;
      }
  } else {
    for (size_t i = 0; i < lv; i += LANES)
      for (int l = 0; l < LANES; l++) {
        const REAL d = p[i + l] - y[i + l];
        acc[l] += (double)d * (double)d;
      }
  }
  for (size_t i = lv; i < len; i++) {
    const REAL d = p[i] - y[i];
    if (dp) dp[i] = g * d;
    acc[0] += (double)d * (double)d;
  }
  for (int h = LANES / 2; h > 0; h /= 2)
    for (int l = 0; l < h; l++) acc[l] = acc[l] + acc[l + h];
  c->partial[item] = acc[0];
}

#endif /* LOSS_CPU_TYPED */

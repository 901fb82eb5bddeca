/*
 * conv1d_cpu.c: the causal depthwise conv1d on the CPU, forward and
 * backward, for f32 (fp32 math) and f64 (fp64 math), io == param.
 *
 * ---- Forward ----------------------------------------------------------------
 *
 * For batch b, step t, channel c, width W (1 <= W <= 8), K = W - 1:
 *
 *   xpad[b, s, c] = x[b, s, c] for 0 <= s < L; h0[b, c, K + s] for -K <= s < 0
 *                   (0 without h0)
 *   pre[b, t, c]  = bias[c] + sum_{j < W} w[c, j] xpad[b, t + j - K, c]
 *                   (summed j = 0, 1, ... after the bias; 0 without bias)
 *   out[b, t, c]  = silu(pre) = pre sigmoid(pre) when `silu`, else pre
 *   h_last[b, c, k] = xpad[b, L - K + k, c]     (k < K; h0 when L = 0)
 *
 * ---- Gradient conventions (backward) ----------------------------------------
 *
 * With d_out = dL/dout, dh_last = dL/dh_last (0 when absent), s = sigmoid(pre):
 *
 *   g[b, t, c]     = d_out silu'(pre) = d_out s (1 + pre (1 - s)), or d_out
 *                    (pre is recomputed from x: the forward saves nothing)
 *   dxpad[b, s, c] = sum_j w[c, j] g[b, s + K - j, c]  (terms with s+K-j
 *                    outside [0, L) are 0) + dh_last[b, c, s - L + K] when
 *                    s >= L - K
 *   dx[b, t, c]    = dxpad[b, t, c]                  (0 <= t < L)
 *   dh0[b, c, k]   = dxpad[b, k - K, c]              (k < K)
 *   dw[c, j]       = sum_b sum_t g[b, t, c] xpad[b, t + j - K, c]
 *   dbias[c]       = sum_b sum_t g[b, t, c]
 *
 * With `accumulate`, dw, dbias and dh0 are added to (old + new, the new
 * value summed first); dx is always written.
 *
 * ---- Work split and determinism ---------------------------------------------
 *
 * A "unit" is a range of steps of one sequence: each sequence is cut into
 * nchunks chunks of tchunk steps (one chunk when B >= CV_UNITS, else enough
 * for about CV_UNITS units, with at least CV_MIN_CHUNK steps each). The
 * forward runs one pool item per unit; each
 * writes only its own rows (and the last unit of a sequence its final
 * state). The backward runs `items` = min(CV_UNITS, units) pool items, item i
 * taking the units [i U / items, (i+1) U / items) in order; each recomputes
 * g for sub-chunks of CV_SUB steps (plus the K steps after, which the dx of
 * its last rows needs), writes its dx rows (and, for a sequence's first
 * unit, dh0), and sums g x and g over its steps into its own partial
 * (W+1, C). A last pass sums the partials in item order per channel. The
 * unit and item counts depend on the shapes only, so results are
 * bit-identical from run to run and whatever the number of threads; the
 * forward's and the backward's pre are computed by the same code.
 *
 * No FMA is formed (C11 mode: no contraction), so the f32 loops give the same
 * bits whatever vector width the compiler picks.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/backend.h"
#include "cpu_kernels.h"
#include "cpu_pool.h"

#define CV_MAX_WIDTH 8
/* Units (and backward items) wanted per call: a constant, so that the
 * partial sums do not depend on the number of threads. */
#define CV_UNITS 64
/* Fewest steps per unit (the backward recomputes K steps past each unit). */
#define CV_MIN_CHUNK 16
/* Steps per recompute sub-chunk of the backward (scratch: ~(CV_SUB + 2K) rows). */
#define CV_SUB 32
/* Below this many multiply-adds (B L C W) a call runs on the calling thread. */
#define CV_SERIAL_WORK 131072

typedef struct {
  const mx_conv1d_args *a;
  void *out, *h_last;          /* forward outputs */
  const void *d_out, *dh_last; /* backward inputs */
  void *dx, *dweight, *dbias, *dh0;
  int accumulate;
  int64_t nchunks, tchunk;     /* units: chunks per sequence, steps per chunk */
  int64_t items;               /* backward pool items */
  const void *wT;              /* (W, C): the weights transposed */
  void *part;                  /* (items, W + 1, C) backward partial sums */
  char *scratch;               /* per worker, scratch_stride bytes each */
  size_t scratch_stride;
} cv_ctx;

#define REAL float
#define SFX f32
#define CV_EXP(x) expf(x)
#include "conv1d_cpu_impl.h"
#undef REAL
#undef SFX
#undef CV_EXP

#define REAL double
#define SFX f64
#define CV_EXP(x) exp(x)
#include "conv1d_cpu_impl.h"
#undef REAL
#undef SFX
#undef CV_EXP

static int cv_fail(mx_err *err, int kind, const char *op, const char *msg) {
  err->kind = kind;
  snprintf(err->msg, sizeof err->msg, "%s: %s", op, msg);
  return kind;
}

static int cv_check(const mx_conv1d_args *a, const char *op, mx_err *err) {
  if (!a) return cv_fail(err, MX_E_ARG, op, "no arguments");
  if (a->io != a->param || (a->io != MX_F32 && a->io != MX_F64))
    return cv_fail(err, MX_E_ARG, op, "the CPU backend takes io == param in {f32, f64}");
  if (a->batch < 0 || a->len < 0 || a->channels < 0 || a->width < 1 ||
      a->width > CV_MAX_WIDTH)
    return cv_fail(err, MX_E_ARG, op, "bad sizes (need B, L, C >= 0 and 1 <= W <= 8)");
  if (a->batch * a->channels > 0 && !a->weight)
    return cv_fail(err, MX_E_ARG, op, "weight is required");
  if (a->batch * a->len * a->channels > 0 && !a->x)
    return cv_fail(err, MX_E_ARG, op, "x is required");
  return MX_OK;
}

static size_t round64(size_t n) { return (n + 63) & ~(size_t)63; }

/* Units of the call: chunks per sequence and steps per chunk (L >= 1). */
static void cv_units(cv_ctx *c, int64_t B, int64_t L) {
  int64_t n = B >= CV_UNITS ? 1 : (CV_UNITS + B - 1) / (B > 0 ? B : 1);
  if (n > (L + CV_MIN_CHUNK - 1) / CV_MIN_CHUNK) n = (L + CV_MIN_CHUNK - 1) / CV_MIN_CHUNK;
  if (n < 1) n = 1;
  c->tchunk = (L + n - 1) / n;
  c->nchunks = (L + c->tchunk - 1) / c->tchunk;
}

static void cv_run(int64_t count, mx_pool_fn fn, void *ctx, int parallel) {
  if (parallel) {
    mx_pool_for(count, fn, ctx);
  } else {
    for (int64_t i = 0; i < count; i++) fn(ctx, i, 0);
  }
}

/* wT[j][c] = w[c][j] */
static void cv_transpose(void *wT, const void *w, int64_t C, int64_t W, size_t rs) {
  for (int64_t c = 0; c < C; c++)
    for (int64_t j = 0; j < W; j++)
      memcpy((char *)wT + (size_t)(j * C + c) * rs, (const char *)w + (size_t)(c * W + j) * rs,
             rs);
}

/* Copies src (n elements) to dst, or zeroes it; adds instead when acc. */
static void cv_set(void *dst, const void *src, size_t n, int dtype, int acc) {
  if (!dst) return;
  if (dtype == MX_F32) {
    float *d = dst;
    const float *s = src;
    for (size_t i = 0; i < n; i++) d[i] = acc ? d[i] + (s ? s[i] : 0.0f) : (s ? s[i] : 0.0f);
  } else {
    double *d = dst;
    const double *s = src;
    for (size_t i = 0; i < n; i++) d[i] = acc ? d[i] + (s ? s[i] : 0.0) : (s ? s[i] : 0.0);
  }
}

int cpu_conv1d_forward(int dev, const mx_conv1d_args *a, void *out, void *h_last, mx_err *err) {
  (void)dev;
  const char *op = "conv1d_forward";
  int rc = cv_check(a, op, err);
  if (rc) return rc;
  const int64_t B = a->batch, L = a->len, C = a->channels, W = a->width, K = W - 1;
  const size_t rs = mx_dtype_size(a->io);
  if (B * C == 0) return MX_OK; /* every output is empty */
  if (L == 0) {                 /* the final state is the initial state */
    if (h_last) cv_set(h_last, a->h0, (size_t)(B * C * K), a->io, 0);
    return MX_OK;
  }
  if (!out) return cv_fail(err, MX_E_ARG, op, "missing output");
  cv_ctx c = {.a = a, .out = out, .h_last = h_last};
  cv_units(&c, B, L);
  const int parallel = (double)B * (double)L * (double)C * (double)W >= CV_SERIAL_WORK;
  const int workers = parallel ? mx_pool_size() : 1;
  const size_t wT_bytes = round64((size_t)(W * C) * rs);
  c.scratch_stride = round64((size_t)(K * C) * rs + 64);
  char *block = aligned_alloc(64, wT_bytes + c.scratch_stride * (size_t)workers);
  if (!block) return cv_fail(err, MX_E_OOM, op, "out of host memory for scratch");
  cv_transpose(block, a->weight, C, W, rs);
  c.wT = block;
  c.scratch = block + wT_bytes;
  cv_run(B * c.nchunks, a->io == MX_F32 ? fwd_item_f32 : fwd_item_f64, &c, parallel);
  free(block);
  return MX_OK;
}

int cpu_conv1d_backward(int dev, const mx_conv1d_args *a, const void *d_out, const void *dh_last,
                        void *dx, void *dweight, void *dbias, void *dh0, int accumulate,
                        mx_err *err) {
  (void)dev;
  const char *op = "conv1d_backward";
  int rc = cv_check(a, op, err);
  if (rc) return rc;
  const int64_t B = a->batch, L = a->len, C = a->channels, W = a->width, K = W - 1;
  const size_t rs = mx_dtype_size(a->io);
  if (B == 0 || L == 0 || C == 0) {
    /* sums over nothing; with L = 0, dh0 = dh_last (dxpad of the padded rows) */
    cv_set(dweight, NULL, (size_t)(C * W), a->io, accumulate);
    cv_set(dbias, NULL, (size_t)C, a->io, accumulate);
    cv_set(dh0, L == 0 ? dh_last : NULL, (size_t)(B * C * K), a->io, accumulate);
    return MX_OK;
  }
  if (!d_out) return cv_fail(err, MX_E_ARG, op, "d_out is required");
  cv_ctx c = {.a = a, .d_out = d_out, .dh_last = dh_last, .dx = dx, .dweight = dweight,
              .dbias = a->bias ? dbias : NULL, .dh0 = dh0, .accumulate = accumulate};
  cv_units(&c, B, L);
  const int64_t units = B * c.nchunks;
  c.items = units < CV_UNITS ? units : CV_UNITS;
  const int parallel = (double)B * (double)L * (double)C * (double)W >= CV_SERIAL_WORK;
  const int workers = parallel ? mx_pool_size() : 1;
  const size_t wT_bytes = round64((size_t)(W * C) * rs);
  const size_t part_bytes = round64((size_t)(c.items * (W + 1) * C) * rs);
  c.scratch_stride = round64((size_t)((K + CV_SUB + 2 * K + 1) * C) * rs + 64);
  char *block = aligned_alloc(64, wT_bytes + part_bytes + c.scratch_stride * (size_t)workers);
  if (!block) return cv_fail(err, MX_E_OOM, op, "out of host memory for scratch");
  cv_transpose(block, a->weight, C, W, rs);
  c.wT = block;
  c.part = block + wT_bytes;
  c.scratch = block + wT_bytes + part_bytes;
  const int f32 = a->io == MX_F32;
  cv_run(c.items, f32 ? bwd_item_f32 : bwd_item_f64, &c, parallel);
  if (c.dweight || c.dbias)
    cv_run((C + 63) / 64, f32 ? reduce_item_f32 : reduce_item_f64, &c,
           (double)c.items * (double)C * (double)(W + 1) >= CV_SERIAL_WORK);
  free(block);
  return MX_OK;
}

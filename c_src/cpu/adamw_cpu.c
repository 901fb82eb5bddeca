/*
 * adamw_cpu.c: the AdamW optimiser of the CPU backend (mx_backend.adamw).
 *
 * One call updates every tensor of an mx_adamw_args in place (param, m, v),
 * as backend.h states:
 *   norm = sqrt(sum over every tensor of grad^2)        (when wanted)
 *   clip = min(1, max_norm / (norm + 1e-6))             (max_norm > 0, else 1)
 *   t = *step + 1; *step = t
 *   g = clip * grad; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2
 *   p = p * (1 - lr wd) - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
 * (the decay factor is 1 for tensors with decay = 0).
 *
 * Numerics, which the CUDA backend (adamw.cu) follows operation for
 * operation, so that both give the same bits whenever their clip factors
 * agree (always without clipping):
 *   - the per-call coefficients (clip, lr / bc1, 1 / sqrt(bc2), 1 - lr wd)
 *     are computed in double from the f32 lr and the s32 step, then rounded
 *     to float once; b1, 1 - b1, b2, 1 - b2 and eps are rounded to float
 *     from double;
 *   - the per-element update is done in float with every operation rounded
 *     separately (no FMA: this file is C11, so GCC does not contract, and
 *     the SSE path uses separate multiply/add/sqrt/divide, all IEEE);
 *   - the sum of squares is accumulated in double: each tile of MX_ADAMW_TILE
 *     elements of one tensor (tiles numbered over the tensors in order) sums
 *     its squares in 8 interleaved lanes then adds the lanes in order; the
 *     tile sums are added in tile order. The grouping depends only on the
 *     tensor sizes, so the norm is the same whatever the number of threads.
 *     (The CUDA backend groups differently: its norm may differ in the last
 *     bits, and so may the clip factor.)
 *
 * Threading: totals of at least MX_ADAMW_PAR_MIN elements run their tiles
 * on the thread pool (cpu_pool.h); each tile writes only its own elements
 * and its own partial sum. Only f32 is taken (MX_E_ARG otherwise: the ABI has
 * no dtype field for AdamW).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#ifdef __SSE2__
#include <immintrin.h>
#endif

#include "cpu_kernels.h"
#include "cpu_pool.h"

/* Elements per tile (work item); a multiple of 8. */
#define MX_ADAMW_TILE ((int64_t)1 << 15)
/* Below this many elements in all, the call runs on the calling thread. */
#define MX_ADAMW_PAR_MIN ((int64_t)1 << 17)

typedef struct {
  float clip, step_size, inv_sqrt_bc2, decay_factor; /* per call */
  float b1, omb1, b2, omb2, eps;                      /* per call, from the hyper-parameters */
} adamw_coef;

typedef struct {
  const mx_adamw_args *a;
  const int64_t *tile_start; /* (ntensors + 1) prefix counts of tiles */
  double *partial;           /* (ntiles) sums of squares */
  adamw_coef coef;
} adamw_job;

static int adamw_fail(mx_err *err, int kind, const char *msg) {
  err->kind = kind;
  snprintf(err->msg, sizeof err->msg, "adamw: %s", msg);
  return kind;
}

/* The tensor that tile `tile` belongs to (tile_start is non-decreasing). */
static int tile_tensor(const adamw_job *j, int64_t tile) {
  int lo = 0, hi = j->a->ntensors; /* tile_start[lo] <= tile < tile_start[hi] */
  while (hi - lo > 1) {
    int mid = (lo + hi) / 2;
    if (j->tile_start[mid] <= tile) lo = mid;
    else hi = mid;
  }
  return lo;
}

/* Sum of squares of x[0..n), in double, 8 interleaved lanes added in order. */
static double sum_squares(const float *x, int64_t n) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; k++) {
      double g = (double)x[i + k];
      lane[k] += g * g;
    }
  for (int k = 0; i + k < n; k++) {
    double g = (double)x[i + k];
    lane[k] += g * g;
  }
  double s = 0.0;
  for (int k = 0; k < 8; k++) s += lane[k];
  return s;
}

static void norm_item(void *ctx, int64_t tile, int worker) {
  (void)worker;
  adamw_job *j = ctx;
  int k = tile_tensor(j, tile);
  const mx_adamw_tensor *t = &j->a->tensors[k];
  int64_t i0 = (tile - j->tile_start[k]) * MX_ADAMW_TILE;
  int64_t len = t->n - i0 < MX_ADAMW_TILE ? t->n - i0 : MX_ADAMW_TILE;
  j->partial[tile] = sum_squares((const float *)t->grad + i0, len);
}

/* The update of n elements, scalar: the reference order of operations. */
static void update_scalar(float *p, const float *gr, float *m, float *v, int64_t n,
                          const adamw_coef *c, float decay) {
  for (int64_t i = 0; i < n; i++) {
    float g = gr[i] * c->clip;
    float mi = c->b1 * m[i] + c->omb1 * g;
    float vi = c->b2 * v[i] + c->omb2 * (g * g);
    float denom = sqrtf(vi) * c->inv_sqrt_bc2 + c->eps;
    float upd = (c->step_size * mi) / denom;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay - upd;
  }
}

static void update(float *p, const float *gr, float *m, float *v, int64_t n, const adamw_coef *c,
                   float decay) {
  int64_t i = 0;
#ifdef __SSE2__
  const __m128 clip = _mm_set1_ps(c->clip), b1 = _mm_set1_ps(c->b1), omb1 = _mm_set1_ps(c->omb1);
  const __m128 b2 = _mm_set1_ps(c->b2), omb2 = _mm_set1_ps(c->omb2);
  const __m128 isb = _mm_set1_ps(c->inv_sqrt_bc2), eps = _mm_set1_ps(c->eps);
  const __m128 ss = _mm_set1_ps(c->step_size), dec = _mm_set1_ps(decay);
  for (; i + 4 <= n; i += 4) {
    __m128 g = _mm_mul_ps(_mm_loadu_ps(gr + i), clip);
    __m128 mi = _mm_add_ps(_mm_mul_ps(b1, _mm_loadu_ps(m + i)), _mm_mul_ps(omb1, g));
    __m128 vi =
        _mm_add_ps(_mm_mul_ps(b2, _mm_loadu_ps(v + i)), _mm_mul_ps(omb2, _mm_mul_ps(g, g)));
    __m128 denom = _mm_add_ps(_mm_mul_ps(_mm_sqrt_ps(vi), isb), eps);
    __m128 upd = _mm_div_ps(_mm_mul_ps(ss, mi), denom);
    _mm_storeu_ps(m + i, mi);
    _mm_storeu_ps(v + i, vi);
    _mm_storeu_ps(p + i, _mm_sub_ps(_mm_mul_ps(_mm_loadu_ps(p + i), dec), upd));
  }
#endif
  update_scalar(p + i, gr + i, m + i, v + i, n - i, c, decay);
}

static void update_item(void *ctx, int64_t tile, int worker) {
  (void)worker;
  adamw_job *j = ctx;
  int k = tile_tensor(j, tile);
  const mx_adamw_tensor *t = &j->a->tensors[k];
  int64_t i0 = (tile - j->tile_start[k]) * MX_ADAMW_TILE;
  int64_t len = t->n - i0 < MX_ADAMW_TILE ? t->n - i0 : MX_ADAMW_TILE;
  update((float *)t->param + i0, (const float *)t->grad + i0, (float *)t->m + i0,
         (float *)t->v + i0, len, &j->coef, t->decay ? j->coef.decay_factor : 1.0f);
}

static void run_tiles(int64_t ntiles, mx_pool_fn fn, adamw_job *j, int parallel) {
  if (parallel) {
    mx_pool_for(ntiles, fn, j);
  } else {
    for (int64_t i = 0; i < ntiles; i++) fn(j, i, 0);
  }
}

int cpu_adamw(int dev, const mx_adamw_args *a, mx_err *err) {
  (void)dev;
  if (!a || a->ntensors < 0 || (a->ntensors > 0 && !a->tensors))
    return adamw_fail(err, MX_E_ARG, "bad tensor table");
  if (!a->lr || !a->step) return adamw_fail(err, MX_E_ARG, "lr and step are required");
  if (!(a->beta1 >= 0.0 && a->beta1 < 1.0 && a->beta2 >= 0.0 && a->beta2 < 1.0 &&
        a->eps >= 0.0 && a->weight_decay >= 0.0 && isfinite(a->eps) &&
        isfinite(a->weight_decay) && !isnan(a->max_norm)))
    return adamw_fail(err, MX_E_ARG, "bad hyper-parameters");
  const int nt = a->ntensors;
  int64_t *tile_start = malloc(((size_t)nt + 1) * sizeof *tile_start);
  if (!tile_start) return adamw_fail(err, MX_E_OOM, "out of host memory");
  int64_t total = 0;
  tile_start[0] = 0;
  for (int k = 0; k < nt; k++) {
    const mx_adamw_tensor *t = &a->tensors[k];
    if (t->n < 0 || (t->n > 0 && (!t->param || !t->grad || !t->m || !t->v))) {
      free(tile_start);
      return adamw_fail(err, MX_E_ARG, "bad tensor entry");
    }
    total += t->n;
    tile_start[k + 1] = tile_start[k] + (t->n + MX_ADAMW_TILE - 1) / MX_ADAMW_TILE;
  }
  const int64_t ntiles = tile_start[nt];
  const int parallel = total >= MX_ADAMW_PAR_MIN && ntiles > 1;
  adamw_job j = {.a = a, .tile_start = tile_start};

  /* Norm and clip factor. */
  double clip = 1.0;
  if (a->grad_norm || a->max_norm > 0.0) {
    j.partial = malloc((size_t)(ntiles ? ntiles : 1) * sizeof *j.partial);
    if (!j.partial) {
      free(tile_start);
      return adamw_fail(err, MX_E_OOM, "out of host memory");
    }
    run_tiles(ntiles, norm_item, &j, parallel);
    double sum = 0.0;
    for (int64_t i = 0; i < ntiles; i++) sum += j.partial[i];
    free(j.partial);
    j.partial = NULL;
    double norm = sqrt(sum);
    if (a->grad_norm) *a->grad_norm = (float)norm;
    if (a->max_norm > 0.0) {
      double q = a->max_norm / (norm + 1e-6);
      clip = q < 1.0 ? q : 1.0; /* a NaN norm gives 1: m and v become NaN anyway */
    }
  }

  /* Step and coefficients (t wraps like the device's s32). */
  const int32_t t = (int32_t)((uint32_t)*a->step + 1u);
  *a->step = t;
  const double lr = (double)*a->lr;
  const double bc1 = 1.0 - pow(a->beta1, (double)t), bc2 = 1.0 - pow(a->beta2, (double)t);
  j.coef = (adamw_coef){
      .clip = (float)clip,
      .step_size = (float)(lr / bc1),
      .inv_sqrt_bc2 = (float)(1.0 / sqrt(bc2)),
      .decay_factor = (float)(1.0 - lr * a->weight_decay),
      .b1 = (float)a->beta1,
      .omb1 = (float)(1.0 - a->beta1),
      .b2 = (float)a->beta2,
      .omb2 = (float)(1.0 - a->beta2),
      .eps = (float)a->eps,
  };
  run_tiles(ntiles, update_item, &j, parallel);
  free(tile_start);
  return MX_OK;
}

/*
 * gemm_cpu.c: the CPU backend's GEMM (mx_gemm_args, backend.h) and
 * sum_rows (column sums, the bias gradient), for f32 (fp32 math) and f64
 * (fp64 math). The linear layer (Mambex.Linear) is built from these two.
 *
 * ---- GEMM: C (m, n) = alpha op(A) op(B) + beta C + bias -------------------
 *
 * Blocked in the classic way (packing into contiguous panels, a register
 * tile in the innermost loop), written from scratch:
 *
 *   1. op(B) is packed once per call into Bp, for every k block of KC rows,
 *      as NR-column panels (kc x NR, row-major, zero-padded past n); the
 *      packing is spread over the thread pool by groups of panels.
 *   2. Work items are blocks of C: MC rows x NCP panels. An item walks the k
 *      blocks in order; for each it packs its MC x kc block of op(A) into
 *      per-worker scratch as MR-row slivers (kc x MR, zero-padded), then for
 *      every panel of its columns (the kc x NR panel stays in L1) and every
 *      sliver (the A block stays in L2) runs the micro-kernel: an MR x NR
 *      register tile, 2 vectors wide, accumulating over the kc values of k in
 *      order, and folds it into C (gemm_cpu_impl.h, FN(store)):
 *        first k block:  C = alpha acc + beta C + bias   (beta == 0: C unread)
 *        later blocks:   C = C + alpha acc
 *   k = 0: C = beta C + bias (beta == 0: bias or 0), no packing.
 *
 * Determinism: every element of C is computed by the same sequence of
 * operations (k in order inside a block, blocks in order, KC fixed) whatever
 * the item it falls in, so results do not depend on the number of threads or
 * on which worker runs what: bit-identical from run to run. The variant
 * (SSE, AVX2+FMA, AVX-512+FMA, picked once at run time by
 * __builtin_cpu_supports) is fixed for a machine; the two FMA variants give
 * the same bits (same KC, one rounding per multiply-add), the SSE one
 * (separate multiply and add) differs from them in the last bits.
 *
 * Shapes of the register tile (MR x NR, NR = 2 vectors): f32 SSE 6 x 8,
 * AVX2 6 x 16, AVX-512 12 x 32; f64 SSE 6 x 4, AVX2 6 x 8, AVX-512 12 x 16.
 *
 * ---- sum_rows: out (cols) = [out +] sum over rows of x (rows, cols) -------
 *
 * Rows are cut into fixed blocks of SUM_ROW_BLOCK; each block's column sums
 * (rows in order, vectorised across columns) go to a partial row, and the
 * partials are added in block order (then added to out when accumulating).
 * One block: the sums go straight to out. Items of the pool are (row block,
 * column chunk) pairs; the order of every sum depends on the shape only.
 */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"
#include "cpu_pool.h"
#include "cpu_scratch.h"

/* k block (rows of a packed B panel, columns of a packed A sliver). */
#define GEMM_KC 256
/* Rows of C per work item (a multiple of every MR: 6 and 12). */
#define GEMM_MC 96
/* Columns of C per work item, in units of the variant's NR. */
#define GEMM_NC_COLS 512
/* B panels packed per packing item. */
#define GEMM_PACK_PANELS 2
/* Below this m n k a call runs on the calling thread. */
#define GEMM_SERIAL_WORK ((int64_t)1 << 20)
/* Scratch kept between calls (Bp and the A blocks), at most. */
#define GEMM_KEEP_BYTES ((size_t)64 << 20)

#define SUM_ROW_BLOCK 512
#define SUM_COL_CHUNK 1024
#define SUM_SERIAL_WORK ((int64_t)1 << 16)

typedef struct {
  const mx_gemm_args *g;
  int beta_zero;
  int64_t kc, mc;          /* k block, rows per item */
  int64_t ncp;             /* NR panels per item */
  int64_t npanels, np;     /* NR panels of n; np = npanels * NR */
  int64_t jblocks;         /* items per row block */
  void *bpack;             /* (K, np) in k blocks of panels */
  char *ascratch;          /* per worker, astride bytes each */
  size_t astride;
} gemm_ctx;

typedef struct {
  int mr, nr;
  size_t elsize;
  mx_pool_fn item, pack_b;
} gemm_variant;

/* ---- the variants -------------------------------------------------------- */

#define REAL float
#define VB 16
#define MR 6
#define SFX f32_sse
#include "gemm_cpu_impl.h"
#undef VB
#undef MR
#undef SFX
#undef REAL

#define REAL double
#define VB 16
#define MR 6
#define SFX f64_sse
#include "gemm_cpu_impl.h"
#undef VB
#undef MR
#undef SFX
#undef REAL

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define GEMM_HAVE_X86_VARIANTS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#pragma GCC optimize("fp-contract=fast")
#define REAL float
#define VB 32
#define MR 6
#define SFX f32_avx2
#include "gemm_cpu_impl.h"
#undef VB
#undef MR
#undef SFX
#undef REAL
#define REAL double
#define VB 32
#define MR 6
#define SFX f64_avx2
#include "gemm_cpu_impl.h"
#undef VB
#undef MR
#undef SFX
#undef REAL
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,fma,prefer-vector-width=512")
#pragma GCC optimize("fp-contract=fast")
#define REAL float
#define VB 64
#define MR 12
#define SFX f32_avx512
#include "gemm_cpu_impl.h"
#undef VB
#undef MR
#undef SFX
#undef REAL
#define REAL double
#define VB 64
#define MR 12
#define SFX f64_avx512
#include "gemm_cpu_impl.h"
#undef VB
#undef MR
#undef SFX
#undef REAL
#pragma GCC pop_options
#endif

static const gemm_variant *gemm_best[2] = {&variant_f32_sse, &variant_f64_sse};
static pthread_once_t gemm_pick_once = PTHREAD_ONCE_INIT;

/* MAMBEX_CPU_GEMM=sse|avx2|avx512 caps the variant (tests, benchmarks). */
static void gemm_pick(void) {
#ifdef GEMM_HAVE_X86_VARIANTS
  const char *cap = getenv("MAMBEX_CPU_GEMM");
  int level = !cap ? 2 : !strcmp(cap, "sse") ? 0 : !strcmp(cap, "avx2") ? 1 : 2;
  __builtin_cpu_init();
  if (level >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma")) {
    gemm_best[0] = &variant_f32_avx512;
    gemm_best[1] = &variant_f64_avx512;
  } else if (level >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    gemm_best[0] = &variant_f32_avx2;
    gemm_best[1] = &variant_f64_avx2;
  }
#endif
}

/* ---- scratch --------------------------------------------------------------- */

/* Scratch: one block kept between calls (cpu_scratch.h), up to GEMM_KEEP_BYTES. */
static mx_keep gemm_keep = MX_KEEP_INIT(GEMM_KEEP_BYTES);

__attribute__((destructor)) static void gemm_scratch_release(void) { mx_keep_release(&gemm_keep); }

/* ---- GEMM driver ---------------------------------------------------------------- */

static int gemm_fail(mx_err *err, int kind, const char *msg) {
  err->kind = kind;
  snprintf(err->msg, sizeof err->msg, "gemm: %s", msg);
  return kind;
}

/* k = 0: C = beta C + bias. */
#define GEMM_SCALE_BODY(REAL)                                                     \
  do {                                                                            \
    REAL *c = (REAL *)g->c;                                                       \
    const REAL *bias = (const REAL *)g->bias;                                     \
    const REAL beta = (REAL)g->beta;                                              \
    for (int64_t i = 0; i < g->m; i++) {                                          \
      REAL *ci = c + i * g->ldc;                                                  \
      for (int64_t j = 0; j < g->n; j++) {                                        \
        REAL v = g->beta == 0.0 ? (REAL)0 : beta * ci[j];                         \
        ci[j] = bias ? v + bias[j] : v;                                           \
      }                                                                           \
    }                                                                             \
  } while (0)

static void gemm_scale(const mx_gemm_args *g) {
  if (g->dtype == MX_F32) GEMM_SCALE_BODY(float);
  else GEMM_SCALE_BODY(double);
}

static void run_items(int64_t count, mx_pool_fn fn, void *ctx, int parallel) {
  if (parallel && count > 1) {
    mx_pool_for(count, fn, ctx);
  } else {
    for (int64_t i = 0; i < count; i++) fn(ctx, i, 0);
  }
}

/* ---- few rows: C rows as combinations of B's rows ------------------------
 * With m <= GEMM_SMALL_M and B not transposed (the linear forward of one
 * frame: x (1, K) . W (K, N)), packing B costs more than the product. Each
 * row of C is computed in strips of SMALL_STRIP columns held in registers:
 * acc[j] = sum over the k of a KC block, in k order, of a[i,k] * b[k,j],
 * folded like the blocked path (first block: alpha acc + beta C + bias;
 * later blocks: C + alpha acc). Strips are independent work items, so the
 * result does not depend on the thread count. The bits may differ in the
 * last place from the blocked path's (which may use FMA): results are
 * deterministic for a shape, not across the two paths. */
#define GEMM_SMALL_M 4
#define SMALL_STRIP 16

typedef struct {
  const mx_gemm_args *g;
  int64_t strips;
} small_ctx;

#define SMALL_ITEM_BODY(REAL)                                                        \
  do {                                                                               \
    const small_ctx *x = (const small_ctx *)vctx;                                    \
    const mx_gemm_args *g = x->g;                                                    \
    const REAL *A = (const REAL *)g->a, *B = (const REAL *)g->b;                     \
    const REAL *bias = (const REAL *)g->bias;                                        \
    REAL *C = (REAL *)g->c;                                                          \
    const REAL alpha = (REAL)g->alpha, beta = (REAL)g->beta;                         \
    const int64_t j0 = item * SMALL_STRIP;                                           \
    const int64_t nc = g->n - j0 < SMALL_STRIP ? g->n - j0 : SMALL_STRIP;            \
    for (int64_t i = 0; i < g->m; i++) {                                             \
      REAL *ci = C + i * g->ldc + j0;                                                \
      for (int64_t k0 = 0; k0 < g->k; k0 += GEMM_KC) {                               \
        const int64_t k1 = k0 + GEMM_KC < g->k ? k0 + GEMM_KC : g->k;               \
        REAL acc[SMALL_STRIP] = {0};                                                 \
        if (nc == SMALL_STRIP) {                                                     \
          for (int64_t kk = k0; kk < k1; kk++) {                                     \
            const REAL aik = g->trans_a ? A[kk * g->lda + i] : A[i * g->lda + kk];   \
            const REAL *restrict bk = B + kk * g->ldb + j0;                          \
            for (int t = 0; t < SMALL_STRIP; t++) acc[t] += aik * bk[t];             \
          }                                                                          \
        } else {                                                                     \
          for (int64_t kk = k0; kk < k1; kk++) {                                     \
            const REAL aik = g->trans_a ? A[kk * g->lda + i] : A[i * g->lda + kk];   \
            const REAL *restrict bk = B + kk * g->ldb + j0;                          \
            for (int64_t t = 0; t < nc; t++) acc[t] += aik * bk[t];                  \
          }                                                                          \
        }                                                                            \
        if (k0 == 0) {                                                               \
          for (int64_t t = 0; t < nc; t++) {                                         \
            REAL v = alpha * acc[t];                                                 \
            if (g->beta != 0.0) v += beta * ci[t];                                   \
            ci[t] = bias ? v + bias[j0 + t] : v;                                     \
          }                                                                          \
        } else {                                                                     \
          for (int64_t t = 0; t < nc; t++) ci[t] += alpha * acc[t];                  \
        }                                                                            \
      }                                                                              \
    }                                                                                \
  } while (0)

static void small_item_f32(void *vctx, int64_t item, int worker) {
  (void)worker;
  SMALL_ITEM_BODY(float);
}

static void small_item_f64(void *vctx, int64_t item, int worker) {
  (void)worker;
  SMALL_ITEM_BODY(double);
}

int cpu_gemm(int dev, const mx_gemm_args *g, mx_err *err) {
  (void)dev;
  if (!g) return gemm_fail(err, MX_E_ARG, "no arguments");
  if (g->dtype != MX_F32 && g->dtype != MX_F64)
    return gemm_fail(err, MX_E_ARG, "the CPU backend takes f32 or f64");
  if (g->m < 0 || g->n < 0 || g->k < 0)
    return gemm_fail(err, MX_E_ARG, "negative sizes");
  if (g->ldc < g->n || g->lda < (g->trans_a ? g->m : g->k) ||
      g->ldb < (g->trans_b ? g->k : g->n))
    return gemm_fail(err, MX_E_ARG, "a leading dimension is below its row length");
  if (g->m == 0 || g->n == 0) return MX_OK;
  if (!g->c || (g->k > 0 && (!g->a || !g->b)))
    return gemm_fail(err, MX_E_ARG, "NULL operand");
  if (g->k == 0) {
    gemm_scale(g);
    return MX_OK;
  }
  if (g->m <= GEMM_SMALL_M && !g->trans_b) {
    small_ctx sx = {g, (g->n + SMALL_STRIP - 1) / SMALL_STRIP};
    const int par = (double)g->m * (double)g->n * (double)g->k >= (double)GEMM_SERIAL_WORK;
    run_items(sx.strips, g->dtype == MX_F32 ? small_item_f32 : small_item_f64, &sx, par);
    return MX_OK;
  }
  pthread_once(&gemm_pick_once, gemm_pick);
  const gemm_variant *v = gemm_best[g->dtype == MX_F32 ? 0 : 1];

  gemm_ctx x;
  memset(&x, 0, sizeof x);
  x.g = g;
  x.beta_zero = g->beta == 0.0;
  x.kc = GEMM_KC;
  x.mc = GEMM_MC;
  x.npanels = (g->n + v->nr - 1) / v->nr;
  x.np = x.npanels * v->nr;
  x.ncp = GEMM_NC_COLS / v->nr;
  const int parallel = (double)g->m * (double)g->n * (double)g->k >= (double)GEMM_SERIAL_WORK;
  const int workers = parallel ? mx_pool_size() : 1;
  /* Smaller blocks of C until every worker has about 3 items (the blocking
   * of C does not change any element's sum, so this keeps the bits). */
  for (;;) {
    const int64_t items = ((g->m + x.mc - 1) / x.mc) * ((x.npanels + x.ncp - 1) / x.ncp);
    if (items >= 3 * (int64_t)workers) break;
    if (x.ncp > 4) x.ncp /= 2;
    else if (x.mc >= 4 * v->mr) x.mc = (x.mc / 2 + v->mr - 1) / v->mr * v->mr;
    else break;
  }
  x.jblocks = (x.npanels + x.ncp - 1) / x.ncp;
  const int64_t iblocks = (g->m + x.mc - 1) / x.mc;

  const size_t es = v->elsize;
  const size_t bbytes = ((size_t)g->k * (size_t)x.np * es + 63) & ~(size_t)63;
  x.astride = ((size_t)x.mc * (size_t)x.kc * es + 63) & ~(size_t)63;
  size_t size = 0;
  char *scratch = mx_keep_take(&gemm_keep, bbytes + x.astride * (size_t)workers, &size);
  if (!scratch) return gemm_fail(err, MX_E_OOM, "out of host memory for the packed panels");
  x.bpack = scratch;
  x.ascratch = scratch + bbytes;

  run_items((x.npanels + GEMM_PACK_PANELS - 1) / GEMM_PACK_PANELS, v->pack_b, &x, parallel);
  run_items(iblocks * x.jblocks, v->item, &x, parallel);
  mx_keep_give(&gemm_keep, scratch, size);
  return MX_OK;
}

/* ---- sum_rows ------------------------------------------------------------------- */

typedef struct {
  const void *x;
  int64_t rows, cols, nblocks, nchunks;
  void *dst;      /* (nblocks, cols) partials, or out when nblocks == 1 */
  int accumulate; /* only when writing out directly */
} sum_ctx;

#define SUM_ITEM_BODY(REAL)                                                         \
  do {                                                                              \
    const sum_ctx *s = (const sum_ctx *)vctx;                                       \
    const int64_t b = item / s->nchunks, ch = item % s->nchunks;                    \
    const int64_t r0 = b * SUM_ROW_BLOCK;                                           \
    const int64_t r1 = r0 + SUM_ROW_BLOCK < s->rows ? r0 + SUM_ROW_BLOCK : s->rows; \
    const int64_t c0 = ch * SUM_COL_CHUNK;                                          \
    const int64_t nc = s->cols - c0 < SUM_COL_CHUNK ? s->cols - c0 : SUM_COL_CHUNK; \
    const REAL *restrict x = (const REAL *)s->x + c0;                               \
    REAL *restrict d = (REAL *)s->dst + b * s->cols + c0;                           \
    REAL acc[SUM_COL_CHUNK];                                                        \
    for (int64_t j = 0; j < nc; j++) acc[j] = x[r0 * s->cols + j];                  \
    for (int64_t r = r0 + 1; r < r1; r++) {                                         \
      const REAL *restrict xr = x + r * s->cols;                                    \
      for (int64_t j = 0; j < nc; j++) acc[j] += xr[j];                             \
    }                                                                               \
    if (s->accumulate)                                                              \
      for (int64_t j = 0; j < nc; j++) d[j] += acc[j];                              \
    else                                                                            \
      for (int64_t j = 0; j < nc; j++) d[j] = acc[j];                               \
  } while (0)

static void sum_item_f32(void *vctx, int64_t item, int worker) {
  (void)worker;
  SUM_ITEM_BODY(float);
}

static void sum_item_f64(void *vctx, int64_t item, int worker) {
  (void)worker;
  SUM_ITEM_BODY(double);
}

/* out[j] = [out[j] +] sum over blocks b in order of part[b, j]. */
#define SUM_FINISH_BODY(REAL)                                                 \
  do {                                                                        \
    const REAL *part = (const REAL *)parts;                                   \
    REAL *o = (REAL *)out;                                                    \
    for (int64_t j = 0; j < cols; j++) {                                      \
      REAL acc = part[j];                                                     \
      for (int64_t b = 1; b < nblocks; b++) acc += part[b * cols + j];        \
      o[j] = accumulate ? o[j] + acc : acc;                                   \
    }                                                                         \
  } while (0)

int cpu_sum_rows(int dev, int dtype, const void *x, int64_t rows, int64_t cols, void *out,
                 int accumulate, mx_err *err) {
  (void)dev;
  if (dtype != MX_F32 && dtype != MX_F64) {
    err->kind = MX_E_ARG;
    snprintf(err->msg, sizeof err->msg, "sum_rows: the CPU backend takes f32 or f64");
    return MX_E_ARG;
  }
  if (rows < 0 || cols < 0 || (cols > 0 && !out) || (rows > 0 && cols > 0 && !x)) {
    err->kind = MX_E_ARG;
    snprintf(err->msg, sizeof err->msg, "sum_rows: bad sizes or NULL pointer");
    return MX_E_ARG;
  }
  if (cols == 0) return MX_OK;
  const size_t es = mx_dtype_size(dtype);
  if (rows == 0) {
    if (!accumulate) memset(out, 0, (size_t)cols * es);
    return MX_OK;
  }
  sum_ctx s = {x, rows, cols, (rows + SUM_ROW_BLOCK - 1) / SUM_ROW_BLOCK,
               (cols + SUM_COL_CHUNK - 1) / SUM_COL_CHUNK, out, accumulate};
  mx_pool_fn fn = dtype == MX_F32 ? sum_item_f32 : sum_item_f64;
  const int parallel = (double)rows * (double)cols >= (double)SUM_SERIAL_WORK;
  if (s.nblocks == 1) {
    run_items(s.nchunks, fn, &s, parallel);
    return MX_OK;
  }
  const int64_t nblocks = s.nblocks;
  void *parts = malloc((size_t)nblocks * (size_t)cols * es);
  if (!parts) {
    err->kind = MX_E_OOM;
    snprintf(err->msg, sizeof err->msg, "sum_rows: out of host memory for the partial sums");
    return MX_E_OOM;
  }
  s.dst = parts;
  s.accumulate = 0;
  run_items(nblocks * s.nchunks, fn, &s, parallel);
  if (dtype == MX_F32) SUM_FINISH_BODY(float);
  else SUM_FINISH_BODY(double);
  free(parts);
  return MX_OK;
}

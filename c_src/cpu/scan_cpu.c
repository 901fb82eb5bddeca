/*
 * scan_cpu.c: the Mamba-1 selective scan on the CPU, forward and backward,
 * for f32 (fp32 math) and f64 (fp64 math), with io == param.
 *
 * ---- Forward ---------------------------------------------------------------
 *
 * For batch b, channel d (group g = d / (D/G)), state n, step t:
 *
 *   x_t   = delta[b,t,d] + delta_bias[d]                  (bias 0 when absent)
 *   dt_t  = softplus(x_t) = log1p(exp(x_t)), or x_t where x_t > 20
 *           (dt_t = x_t without softplus)
 *   a_t,n = exp(dt_t A[d,n])
 *   r_t   = 0 where reset[b,t] is set, else 1
 *   h_t,n = r_t a_t,n h_{t-1},n + dt_t B[b,t,g,n] u_t      h_{-1} = h0[b,d,n] (or 0)
 *   y_t   = sum_n C[b,t,g,n] h_t,n + D[d] u_t             (sum over n in order)
 *   out_t = y_t silu(z_t) = y_t z_t sigmoid(z_t)           (out_t = y_t without z)
 *
 * and h_last[b,d,n] = h_{L-1},n (h0 when L = 0).
 *
 * ---- Gradient conventions (backward) ---------------------------------------
 *
 * Given g_t = d_out[b,t,d] and dh_last[b,d,n] (0 when absent), with
 * s_t = sigmoid(z_t):
 *
 *   dy_t    = g_t z_t s_t                     (dy_t = g_t without z)
 *   dz_t    = g_t y_t s_t (1 + z_t (1 - s_t))  the derivative of silu is s (1 + z (1 - s))
 *
 * The gradient reaching h_t comes from the output at t and from h_{t+1}:
 *
 *   c_{L-1},n = dh_last[b,d,n]
 *   dh_t,n    = c_t,n + dy_t C[b,t,g,n]                       (dL/dh_t)
 *   c_{t-1},n = r_t a_t,n dh_t,n                              (into h_{t-1})
 *   dh0[b,d,n] = c_{-1},n
 *
 * so where reset[b,t] is set (r_t = 0) no gradient flows into h_{t-1}, and
 * none reaches dh0 past it. Writing p_t,n = r_t h_{t-1},n for the state that
 * actually enters step t, and ga_t,n = dh_t,n p_t,n a_t,n (= dL/da_t,n a_t,n):
 *
 *   ddt_t       = sum_n ga_t,n A[d,n] + u_t sum_n dh_t,n B[b,t,g,n]
 *                 (a_t = exp(dt A) gives da/ddt = a A; h_t has the term dt B u)
 *   dx_t        = ddt_t sigmoid(x_t) where softplus and x_t <= 20, else ddt_t
 *                 (softplus' = sigmoid; above the threshold dt = x)
 *   ddelta[b,t,d] = dx_t
 *   ddelta_bias[d] = sum_b sum_t dx_t
 *   du[b,t,d]   = dt_t sum_n dh_t,n B[b,t,g,n] + dy_t D[d]
 *   dD[d]       = sum_b sum_t dy_t u_t
 *   dA[d,n]     = sum_b sum_t ga_t,n dt_t
 *   dB[b,t,g,n] = sum_{d in g} dh_t,n dt_t u_t
 *   dC[b,t,g,n] = sum_{d in g} dy_t h_t,n
 *
 * ---- Work split and determinism ---------------------------------------------
 *
 * The recurrence is sequential over t. Channels are processed in blocks of
 * LANES (16) inside one group, vectorised across the block (B and C are the
 * same for every channel of a group, so the inner loops are plain vertical
 * operations, and the per-step softplus and silu vectorise too); the pool
 * (cpu_pool.h) runs work items over (batch, group, channel range).
 *
 *   - Forward items are (b, g, block): each writes its own outputs only.
 *   - Backward items are (b, g, part): a part is a fixed range of blocks of
 *     one group, run one after another. Per (b, block) the backward
 *     recomputes the states: pass 1 stores the state entering each chunk of
 *     S steps (checkpoints), pass 2 takes the chunks from last to first,
 *     recomputes the chunk's states and exp(dt A) into scratch (S x N x
 *     LANES each) and runs the reverse recurrence through it. S is chosen so
 *     that a chunk fits in ~512 KiB, and at least sqrt(L) so that the
 *     checkpoints stay small; for L <= S there is a single chunk and no pass 1.
 *   - Every reduction has a fixed order that depends on the shapes only:
 *     over n in order; over the lanes of a block by a fixed tree
 *     (sum_lanes); over the blocks of a part in order; over the parts of a
 *     group (partials, summed p = 0, 1, ... afterwards); over t in reverse
 *     order inside an item; over batches (per-batch partials of dA, dD,
 *     ddelta_bias, summed b = 0, 1, ... afterwards). The number of parts and
 *     the batch slab size are functions of the shapes, never of the number
 *     of threads, so results are bit-identical from run to run and across
 *     machines of different core counts and vector widths (same build).
 *   - The forward states recomputed by the backward are computed by the same
 *     code (state_step) in the same order, so they are the very bits the
 *     forward produced.
 *
 * ---- f32 transcendentals ---------------------------------------------------
 *
 * exp, softplus and sigmoid in f32 are inline functions below, so that the
 * loops vectorise (libm calls would not):
 *   - the recurrence computes a = exp(dt A) as 2^(dt (A log2 e)), with
 *     A log2 e formed once per block: x = k + f, k = round(x), |f| <= 1/2,
 *     and 2^f by the degree-6 Taylor polynomial of exp(f ln 2)
 *     (scan_exp2f). Within 2.4e-7 of exact 2^x; the extra rounding of
 *     A log2 e adds |dt A| 6e-8 relative, so below 1e-6 in all for
 *     |dt A| < 12, and beyond that (a < 6e-6) at most 2.2e-8 absolute
 *     (|x| e^-|x| <= 1/e);
 *   - softplus and sigmoid use scan_expf, exp by Cody-Waite reduction
 *     x = k ln2 + r, |r| <= ln2/2, and the same degree-6 polynomial (within
 *     2.6e-7 of exact exp), and log1p(e) as 2 atanh(e / (2 + e)), a series
 *     in s = e / (2 + e) <= 1/3 with no cancellation for tiny e. softplus is
 *     within 3.3e-7, sigmoid within 2.8e-7 of the exact values (relative).
 * (Measured over the whole range in steps of 1e-4.) Results below 2.7e-38
 * (exp(x), x < -86.5) flush to zero, which also keeps subnormals out of
 * the loops; exp overflows to +inf from x > 88.38 (true overflow: 88.72);
 * NaN propagates. f64 uses libm.
 *
 * The AVX2 and AVX-512 builds of the f32 kernels (scan_kernels_for picks one
 * at run time) give the same bits as the SSE one: no FMA is formed (C11
 * mode), and no reduction depends on the vector width.
 */
/* The loops below select with ?: on float comparisons (clamps, thresholds).
 * Under GCC's default -ftrapping-math such selects are not if-converted and
 * no loop holding one is vectorised; nothing here enables FP traps, and the
 * option changes no value, only which exceptions flags may be raised. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/backend.h"
#include "cpu_kernels.h"
#include "cpu_pool.h"
#include "cpu_scratch.h"

#define LANES 16
#ifndef SC_AHEAD
#define SC_AHEAD 4 /* steps ahead to prefetch the (B, L, D) rows */
#endif
#define MX_SCAN_MAX_STATE 256
/* Work items wanted per backward call (a constant: it must not depend on the
 * number of threads, since the parts decide the order of the dB/dC sums). */
#define MX_SCAN_ITEMS 64
/* Below this many (b, t, d, n) elements a call runs on the calling thread
 * (about 100 us of work: the NIF runs such calls on a normal scheduler). */
#define MX_SCAN_SERIAL_WORK 65536
/* Scratch of one recompute chunk; memory budget of the backward partials. */
#define MX_SCAN_CHUNK_BYTES ((size_t)512 << 10)
#define MX_SCAN_PARTIAL_BYTES ((size_t)256 << 20)
#define MX_SCAN_KEEP_BYTES ((size_t)64 << 20)

typedef struct {
  const mx_scan_args *a;
  void *out, *h_last;           /* forward outputs */
  const void *d_out, *dh_last;  /* backward inputs */
  const mx_scan_grads *g;       /* backward outputs */
  int64_t nsub;                 /* channel blocks per group */
  int64_t parts;                /* backward items per (batch, group) */
  int64_t chunk, nchunks;       /* backward recompute chunk: steps, count */
  int64_t b0, slab_len;         /* backward: the batches [b0, b0 + slab_len) */
  char *scratch;                /* per worker, scratch_stride bytes each */
  size_t scratch_stride;
  void *bc_part;                /* (slab, G, parts, 2, L, N) when parts > 1 */
  void *dA_part, *dD_part, *dbias_part; /* (slab, D, N), (slab, D), (slab, D) */
} scan_ctx;

/* ---- f32 transcendentals (vectorisable; see the header comment) -------- */

static inline float scan_expf(float x) {
  const float log2e = 1.44269504088896341f;
  const float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f; /* ln2_hi k is exact */
  const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
  const uint32_t shifter_bits = 0x4B400000u;
  /* Clamp to [-86.5, 88.5] (a NaN becomes -86.5 here and NaN again below). */
  float xc = x >= -86.5f ? x : -86.5f;
  xc = xc <= 88.5f ? xc : 88.5f;
  float t = xc * log2e + shifter; /* shifter + k, k = round(x / ln2) in [-125, 128] */
  float k = t - shifter;
  float r = (xc - k * ln2_hi) - k * ln2_lo; /* |r| <= ln2 / 2 */
  float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 +
                                                                        r * (1.0f / 720))))));
  /* 2^k from the integer in t's low bits; k = 128 (x > 88.38) gives +inf. */
  uint32_t tb;
  memcpy(&tb, &t, sizeof tb);
  uint32_t bits = (tb - shifter_bits + 127u) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  float e = p * scale;
  e = x < -86.5f ? 0.0f : e;
  return x != x ? x : e;
}

/* 2^x, for the recurrence: exp(dt A) = 2^(dt (A log2 e)), with A log2 e formed
 * once per block (SC_KSCALE), so that no range reduction by ln 2 is needed:
 * x = k + f with k = round(x), f = x - k exact, |f| <= 1/2, and 2^f by the
 * degree-6 Taylor polynomial of exp(f ln 2). */
static inline float scan_exp2f(float x) {
  const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
  const uint32_t shifter_bits = 0x4B400000u;
  /* Clamp to [-124.79, 127.6] = [-86.5, 88.45] / ln 2 (a NaN becomes -124.79
   * here and NaN again below). */
  float xc = x >= -124.79f ? x : -124.79f;
  xc = xc <= 127.6f ? xc : 127.6f;
  float t = xc + shifter; /* shifter + k, k in [-125, 128] */
  float k = t - shifter;
  float f = xc - k;
  float p = 1.0f + f * (0.693147181f + f * (0.240226507f + f * (0.0555041087f +
                        f * (0.00961812911f + f * (0.00133335581f + f * 0.000154035304f)))));
  uint32_t tb;
  memcpy(&tb, &t, sizeof tb);
  uint32_t bits = (tb - shifter_bits + 127u) << 23; /* 2^k; k = 128 gives +inf */
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  float e = p * scale;
  e = x < -124.79f ? 0.0f : e;
  return x != x ? x : e;
}

static inline float scan_softplusf(float x) {
  float e = scan_expf(-fabsf(x));
  float s = e / (2.0f + e);
  float s2 = s * s;
  float q = 1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9 + s2 * (1.0f / 11 +
                                                                           s2 * (1.0f / 13)))));
  float l = 2.0f * s + 2.0f * s * s2 * q; /* log1p(e) */
  float m = x > 0.0f ? x : 0.0f;
  return x > 20.0f ? x : m + l;
}

static inline float scan_sigmoidf(float x) { return 1.0f / (1.0f + scan_expf(-x)); }

static inline double scan_softplus(double x) { return x > 20.0 ? x : log1p(exp(x)); }
static inline double scan_sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

/* ---- the kernels, once per type (and per vector width for f32) --------- */

#define SC_KSCALE 1.44269504088896341f
#define SC_EXPK(x) scan_exp2f(x)
#define SC_SOFTPLUS(x) scan_softplusf(x)
#define SC_SIGMOID(x) scan_sigmoidf(x)
#define REAL float

#define SFX f32
#include "scan_cpu_impl.h"
#undef SFX

/* The same f32 kernels built for AVX2 (8 lanes a vector instead of SSE's 4)
 * and AVX-512 (16: one vector per row of a block), chosen at run time by
 * scan_kernels_for. No FMA is ever formed (C11 mode: no contraction), so
 * every lane does the same IEEE operations in the same order in all three
 * builds, and they give the same bits. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SCAN_HAVE_X86_VARIANTS 1
#pragma GCC push_options
#pragma GCC target("avx2")
#define SFX f32_avx2
#include "scan_cpu_impl.h"
#undef SFX
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=512")
#define SFX f32_avx512
#include "scan_cpu_impl.h"
#undef SFX
#pragma GCC pop_options
#endif

#undef REAL
#undef SC_KSCALE
#undef SC_EXPK
#undef SC_SOFTPLUS
#undef SC_SIGMOID

#define REAL double
#define SFX f64
#define SC_KSCALE 1.0
#define SC_EXPK(x) exp(x)
#define SC_SOFTPLUS(x) scan_softplus(x)
#define SC_SIGMOID(x) scan_sigmoid(x)
#include "scan_cpu_impl.h"
#undef REAL
#undef SFX
#undef SC_KSCALE
#undef SC_EXPK
#undef SC_SOFTPLUS
#undef SC_SIGMOID

/* ---- drivers ------------------------------------------------------------- */

static int scan_fail(mx_err *err, int kind, const char *op, const char *msg) {
  err->kind = kind;
  snprintf(err->msg, sizeof err->msg, "%s: %s", op, msg);
  return kind;
}

static int scan_check(const mx_scan_args *a, const char *op, mx_err *err) {
  if (!a) return scan_fail(err, MX_E_ARG, op, "no arguments");
  if (a->io != a->param || (a->io != MX_F32 && a->io != MX_F64))
    return scan_fail(err, MX_E_ARG, op, "the CPU backend takes io == param in {f32, f64}");
  if (a->batch < 0 || a->len < 0 || a->dim < 0 || a->groups < 1 || a->dim % a->groups != 0 ||
      a->dstate < 1 || a->dstate > MX_SCAN_MAX_STATE)
    return scan_fail(err, MX_E_ARG, op, "bad sizes (need B, L, D >= 0, G >= 1, D % G == 0, "
                     "1 <= N <= 256)");
  if (a->batch * a->len * a->dim > 0 && (!a->u || !a->delta || !a->A || !a->Bm || !a->Cm))
    return scan_fail(err, MX_E_ARG, op, "u, delta, A, B and C are required");
  return MX_OK;
}

static size_t round64(size_t n) { return (n + 63) & ~(size_t)63; }

/* Scratch: one block kept between calls (cpu_scratch.h), up to MX_SCAN_KEEP_BYTES. */
static mx_keep scan_keep = MX_KEEP_INIT(MX_SCAN_KEEP_BYTES);

__attribute__((destructor)) static void scan_scratch_release(void) { mx_keep_release(&scan_keep); }

typedef struct {
  mx_pool_fn fwd, bwd, reduce_bc, reduce_param;
} scan_kernels;

static const scan_kernels scan_f32 = {fwd_item_f32, bwd_item_f32, reduce_bc_item_f32,
                                      reduce_param_item_f32};
static const scan_kernels scan_f64 = {fwd_item_f64, bwd_item_f64, reduce_bc_item_f64,
                                      reduce_param_item_f64};
static const scan_kernels *scan_f32_best = &scan_f32;
static pthread_once_t scan_pick_once = PTHREAD_ONCE_INIT;

/* The widest f32 build this CPU (and its OS) supports. */
static void scan_pick(void) {
#ifdef SCAN_HAVE_X86_VARIANTS
  static const scan_kernels f32_avx2 = {fwd_item_f32_avx2, bwd_item_f32_avx2,
                                        reduce_bc_item_f32_avx2, reduce_param_item_f32_avx2};
  static const scan_kernels f32_avx512 = {fwd_item_f32_avx512, bwd_item_f32_avx512,
                                          reduce_bc_item_f32_avx512,
                                          reduce_param_item_f32_avx512};
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    scan_f32_best = &f32_avx512;
  else if (__builtin_cpu_supports("avx2"))
    scan_f32_best = &f32_avx2;
#endif
}

static const scan_kernels *scan_kernels_for(int dtype) {
  if (dtype != MX_F32) return &scan_f64;
  pthread_once(&scan_pick_once, scan_pick);
  return scan_f32_best;
}

/* Runs the items on the pool, or on this thread when the call is small. */
static void scan_run(int64_t count, mx_pool_fn fn, void *ctx, int parallel) {
  if (parallel) {
    mx_pool_for(count, fn, ctx);
  } else {
    for (int64_t i = 0; i < count; i++) fn(ctx, i, 0);
  }
}

int cpu_scan_forward(int dev, const mx_scan_args *a, void *out, void *h_last, mx_err *err) {
  (void)dev;
  const char *op = "scan_forward";
  int rc = scan_check(a, op, err);
  if (rc) return rc;
  const int64_t B = a->batch, L = a->len, D = a->dim, N = a->dstate, G = a->groups;
  const size_t rs = mx_dtype_size(a->io);
  scan_ctx c = {.a = a, .out = out, .h_last = h_last};
  c.nsub = (D / G + LANES - 1) / LANES;
  const int64_t items = B * G * c.nsub;
  if (items == 0) return MX_OK; /* B or D is 0: every output is empty */
  if (!out || !h_last) return scan_fail(err, MX_E_ARG, op, "missing output");
  const double work = (double)B * (double)L * (double)D * (double)N;
  const int parallel = work >= MX_SCAN_SERIAL_WORK;
  const int workers = parallel ? mx_pool_size() : 1;
  c.scratch_stride = round64(2 * (size_t)N * LANES * rs);
  size_t size;
  c.scratch = mx_keep_take(&scan_keep, c.scratch_stride * (size_t)workers, &size);
  if (!c.scratch) return scan_fail(err, MX_E_OOM, op, "out of host memory for scratch");
  scan_run(items, scan_kernels_for(a->io)->fwd, &c, parallel);
  mx_keep_give(&scan_keep, c.scratch, size);
  return MX_OK;
}

int cpu_scan_backward(int dev, const mx_scan_args *a, const void *d_out, const void *dh_last,
                      const mx_scan_grads *g, mx_err *err) {
  (void)dev;
  const char *op = "scan_backward";
  int rc = scan_check(a, op, err);
  if (rc) return rc;
  if (!g) return scan_fail(err, MX_E_ARG, op, "no gradient outputs");
  const int64_t B = a->batch, L = a->len, D = a->dim, N = a->dstate, G = a->groups;
  const size_t rs = mx_dtype_size(a->io);
  if (B == 0 || D == 0) { /* sums over nothing; every other output is empty */
    if (g->dA) memset(g->dA, 0, (size_t)(D * N) * rs);
    if (g->dD) memset(g->dD, 0, (size_t)D * rs);
    if (g->ddelta_bias) memset(g->ddelta_bias, 0, (size_t)D * rs);
    return MX_OK;
  }
  if (!d_out && L > 0) return scan_fail(err, MX_E_ARG, op, "d_out is required");

  scan_ctx c = {.a = a, .d_out = d_out, .dh_last = dh_last, .g = g};
  c.nsub = (D / G + LANES - 1) / LANES;

  /* Recompute chunk: fits MX_SCAN_CHUNK_BYTES, at least sqrt(L) steps. */
  const size_t NL = (size_t)N * LANES;
  const size_t step_bytes = (2 * NL + 3 * LANES) * rs;
  int64_t S = (int64_t)(MX_SCAN_CHUNK_BYTES / step_bytes);
  int64_t root = (int64_t)ceil(sqrt((double)L));
  if (S < root) S = root;
  if (S > L) S = L;
  if (S < 1) S = 1;
  c.chunk = S;
  c.nchunks = (L + S - 1) / S;

  /* Parts per group and batches per slab: functions of the shapes only. */
  int64_t P = (MX_SCAN_ITEMS + B * G - 1) / (B * G);
  if (P > c.nsub) P = c.nsub;
  if (P < 1) P = 1;
  const double bc_per_part = 2.0 * (double)G * (double)L * (double)N * (double)rs;
  if (P > 1 && (double)P * bc_per_part > (double)MX_SCAN_PARTIAL_BYTES) {
    P = (int64_t)((double)MX_SCAN_PARTIAL_BYTES / bc_per_part);
    if (P < 2) P = 1;
  }
  c.parts = P;
  const double per_batch = (double)(D * N + 2 * D) * (double)rs + (P > 1 ? P * bc_per_part : 0);
  int64_t slab = (int64_t)((double)MX_SCAN_PARTIAL_BYTES / per_batch);
  if (slab < 1) slab = 1;
  if (slab > B) slab = B;

  const double work = (double)B * (double)L * (double)D * (double)N;
  const int parallel = work >= MX_SCAN_SERIAL_WORK;
  const int workers = parallel ? mx_pool_size() : 1;
  const int64_t nck = c.nchunks > 0 ? c.nchunks : 1;
  c.scratch_stride = round64(((7 + (size_t)nck + 2 * (size_t)S) * NL + 3 * (size_t)S * LANES) * rs);
  /* One block: per-worker scratch, then the partials. */
  const size_t scratch_bytes = c.scratch_stride * (size_t)workers;
  const size_t dA_bytes = round64((size_t)(slab * D * N) * rs);
  const size_t vec_bytes = round64((size_t)(slab * D) * rs);
  const size_t bc_bytes = P > 1 ? round64((size_t)(slab * G * P * 2 * L * N) * rs) : 0;
  size_t size;
  char *block = mx_keep_take(&scan_keep, scratch_bytes + dA_bytes + 2 * vec_bytes + bc_bytes, &size);
  if (!block) return scan_fail(err, MX_E_OOM, op, "out of host memory for scratch");
  c.scratch = block;
  c.dA_part = block + scratch_bytes;
  c.dD_part = block + scratch_bytes + dA_bytes;
  c.dbias_part = block + scratch_bytes + dA_bytes + vec_bytes;
  c.bc_part = P > 1 ? block + scratch_bytes + dA_bytes + 2 * vec_bytes : NULL;
  const scan_kernels *k = scan_kernels_for(a->io);
  for (int64_t b0 = 0; b0 < B; b0 += slab) {
    c.b0 = b0;
    c.slab_len = B - b0 < slab ? B - b0 : slab;
    scan_run(c.slab_len * G * P, k->bwd, &c, parallel);
    /* The sums of the partials are light: threaded only when large. */
    const double bc_work = (double)(c.slab_len * G * P) * (double)(2 * L * N);
    const double param_work = (double)(c.slab_len * D) * (double)(N + 2);
    if (P > 1) scan_run(c.slab_len * G, k->reduce_bc, &c, bc_work >= 8 * MX_SCAN_SERIAL_WORK);
    scan_run((D + 63) / 64, k->reduce_param, &c, param_work >= 8 * MX_SCAN_SERIAL_WORK);
  }
  mx_keep_give(&scan_keep, block, size);
  return MX_OK;
}

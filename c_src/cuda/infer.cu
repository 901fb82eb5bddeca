/*
 * infer.cu: fused inference of a whole Mambex.Model (backend.h,
 * mx_infer_args) in ONE persistent kernel, and captured per-frame plans.
 *
 * Why: at batch 1 every op of the model is a few kernels of a few hundred
 * threads; launched one by one they cost ~80 us of GPU time per frame,
 * almost all of it launch gaps. Here one cooperative kernel walks the model
 * in phases separated by grid-wide barriers:
 *
 *   P_in    s   = x . in_w + in_b                                   (R, DM)
 *   per layer:
 *   P_proj  xi | z = rmsnorm(s) . [in_x_w | in_z_w]                 (R, DI) x 2
 *   P_xproj xc  = silu(conv(xi) + conv_b) (each block rebuilds the rows
 *                 it needs);  dbc = xc . x_proj_w                   (R, R+2N)
 *   P_scan  delta = softplus(dbc[:, :R] . dt_w + dt_b); the selective
 *           scan over the rows' steps; y = (C.h + D u) silu(z);
 *           new conv and ssm states                                 (R, DI)
 *   P_out   s  += y . out_w                                         (R, DM)
 *   P_head  out = rmsnorm(s) . head_w + head_b                      (R, O)
 *
 * with R = batch * len rows (row r = b * len + t). Every phase is a loop over
 * work items (a tile of up to IF_TR rows by 8 or 32 columns of a product, or
 * one (batch row, channel group) of the scan) spread over the blocks. A
 * product tile stages its A rows in shared memory and splits K over 32
 * thread groups whose partial sums are added in a fixed order: results do
 * not depend on the grid size or on timing (bit-identical reruns).
 *
 * Invariants:
 *   - All blocks are co-resident (cooperative launch), so the barrier can
 *     spin. The barrier is a per-device pair {arrivals, exits} in device
 *     memory made once (g_bar), zero whenever no fused kernel runs: the
 *     last block to leave a kernel zeroes both. Only one fused kernel runs
 *     at a time per device: they are all on its one stream.
 *   - Weights never change during a kernel, so they are read through L1
 *     (and prefetched into it before each barrier); activations are not.
 *   - Data written in one phase and read by another block in a later phase
 *     (the scratch rows and the states) are read with __ldcg (L2, not the
 *     incoherent L1); the barrier fences before it arrives.
 *   - A state buffer that is both read and written (conv_out == conv_in)
 *     is read in P_xproj by every block and written only in P_scan, after
 *     the barrier; the ssm state is read and written by one thread.
 *   - Plans (infer_plan_*) own their device scratch, pinned host buffers,
 *     a private capture stream and the graph; they are replayed on the
 *     device's stream under its enqueue mutex, and freed only after their
 *     last replay has finished (the plan's event).
 */
#include <stdlib.h>
#include <string.h>

#include "infer_common.cuh"

#define IF_TR 8        /* rows per product tile */
#define IF_TT 64       /* scan steps staged per chunk, at most */
/* dynamic shared memory: an A tile of IF_TR rows of MX_INFER_MAX_K and the
 * K-group partials; the scan's staging is fitted into the same size */
#define IF_SMEM_FLOATS (IF_TR * MX_INFER_MAX_K + IF_THREADS * IF_TR)

/* Whether row b of the reset mask has a reset at some step in (lo, hi]. */
static __device__ __forceinline__ int reset_in(const if_params &p, int b, int lo, int hi) {
  if (!p.reset) return 0;
  if (lo < -1) lo = -1;
  for (int t = hi; t > lo; t--)
    if (p.reset[(size_t)b * p.L + t]) return 1;
  return 0;
}

/* RMSNorm scale of row r of s (DM): warp-wide; every lane gets it. */
static __device__ __forceinline__ float row_rstd(const if_params &p, const float *s, int r) {
  const int lane = threadIdx.x & 31;
  float acc = 0.0f;
#pragma unroll 8
  for (int k = lane; k < p.DM; k += 32) {
    const float v = __ldcg(s + (size_t)r * p.DM + k);
    acc += v * v;
  }
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  return rsqrtf(acc / (float)p.DM + p.eps);
}

/* The A tile of a product: rows r0 .. r0+nr-1 of length K into a_s
 * (IF_TR x K). kind: 0 = x, 1 = rmsnorm(s) * w, 2 = silu(conv(xi) + b) (and
 * writes xc when `store`), 3 = y. */
enum { A_X = 0, A_NORM = 1, A_CONV = 2, A_Y = 3 };

static __device__ void load_a(const if_params &p, int kind, const float *norm_w,
                              const if_layer *ly, int r0, int nr, int K, float *a_s, int store) {
  const int tid = threadIdx.x;
  if (kind == A_NORM) {
    const int warp = tid >> 5, lane = tid & 31;
    if (warp < nr) { /* IF_TR == warps per block */
      const int r = r0 + warp;
      const float rs = row_rstd(p, p.s, r);
#pragma unroll 8
      for (int k = lane; k < K; k += 32)
        a_s[warp * K + k] = __ldcg(p.s + (size_t)r * K + k) * rs * norm_w[k];
    }
  } else if (kind == A_X || kind == A_Y) {
    const float *src = kind == A_X ? p.x : p.y;
#pragma unroll 4
    for (int i = tid; i < nr * K; i += IF_THREADS) {
      const int row = i / K, k = i - row * K;
      a_s[i] = __ldcg(src + (size_t)(r0 + row) * K + k);
    }
  } else {
    /* causal depthwise conv of xi over each row's own steps, then SiLU */
    const int W = p.W;
#pragma unroll 2
    for (int i = tid; i < nr * K; i += IF_THREADS) {
      const int row = i / K, k = i - row * K;
      const int r = r0 + row, b = r / p.L, t = r - b * p.L;
      /* the first step whose input the conv may see at t */
      int lo = t - (W - 1);
      if (p.reset) {
        for (int u = t; u >= 0 && u >= t - (W - 1); u--)
          if (p.reset[(size_t)b * p.L + u]) {
            lo = u;
            break;
          }
        if (lo < 0 && reset_in(p, b, -1, t - W)) lo = 0;
      }
      float acc = ly->conv_b[k];
#pragma unroll
      for (int j = 0; j < IF_MAX_W; j++) {
        const int tt = t - (W - 1) + j;
        if (j >= W || tt < lo) continue;
        float v;
        if (tt >= 0) v = __ldcg(p.xi + ((size_t)b * p.L + tt) * K + k);
        else if (ly->conv_in) v = __ldcg(ly->conv_in + ((size_t)b * K + k) * (W - 1) + (W - 1) + tt);
        else v = 0.0f;
        acc += ly->conv_w[(size_t)k * W + j] * v;
      }
      const float v = silu_f(acc);
      a_s[i] = v;
      if (store) p.xc[(size_t)r * K + k] = v;
    }
  }
}

/* One product tile: v(i, c) = sum_k a_s[i][k] * W[k][c] for the TC
 * columns c0.. of W (K, ldw) (for P_proj, columns past `split` come from
 * w2 (K, ldw) at c - split). Thread (kg, cl) sums k = kg, kg + KG, ... (KG =
 * IF_THREADS / TC; the loop is unrolled so that the weight loads are in
 * flight together); the KG partials are added in order by the IF_TR * TC
 * first threads, which return their (i, c) through *oi, *oc and the value;
 * others get -1. TC = 8 for a few rows (more column tiles to spread), 32
 * for many (a warp reads 128 contiguous bytes of a weight row). */
template <int TC>
static __device__ float tile_product(const float *a_s, int nr, int K, const float *w1,
                                     const float *w2, int split, int ldw, int ncols, int c0,
                                     float *red_s, int *oi, int *oc) {
  constexpr int KG = IF_THREADS / TC;
  const int tid = threadIdx.x;
  const int cl = tid % TC, kg = tid / TC;
  const int c = c0 + cl;
  float acc[IF_TR];
#pragma unroll
  for (int i = 0; i < IF_TR; i++) acc[i] = 0.0f;
  if (c < ncols) {
    const float *wc = c < split ? w1 + c : w2 + (c - split);
    if (nr == 1) {
#pragma unroll 8
      for (int k = kg; k < K; k += KG) acc[0] += a_s[k] * __ldg(wc + (size_t)k * ldw);
    } else {
#pragma unroll 8
      for (int k = kg; k < K; k += KG) {
        const float wv = __ldg(wc + (size_t)k * ldw);
#pragma unroll
        for (int i = 0; i < IF_TR; i++)
          if (i < nr) acc[i] += a_s[i * K + k] * wv;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < IF_TR; i++) red_s[(kg * IF_TR + i) * TC + cl] = acc[i];
  __syncthreads();
  float v = 0.0f;
  *oi = -1;
  if (tid < IF_TR * TC) {
    const int i = tid / TC, cc = tid % TC;
    if (i < nr && c0 + cc < ncols) {
      for (int g = 0; g < KG; g++) v += red_s[(g * IF_TR + i) * TC + cc];
      *oi = i;
      *oc = c0 + cc;
    }
  }
  __syncthreads();
  return v;
}

enum { P_IN = 0, P_PROJ = 1, P_XPROJ = 2, P_OUT = 3, P_HEAD = 4 };

/* Columns per product tile: 8 for a few rows (more tiles to spread over the
 * blocks), 32 for many (a warp reads 128 contiguous bytes of a weight row). */
static __device__ __forceinline__ int tile_cols(int R) { return R <= IF_TR ? 8 : 32; }

/* What a product phase multiplies. */
typedef struct {
  int K, ncols, split, ldw, kind;
  const float *w1, *w2, *norm_w;
} if_prod;

static __device__ __forceinline__ if_prod phase_desc(const if_params &p, int phase, const if_layer *ly) {
  if_prod d;
  d.norm_w = NULL;
  switch (phase) {
    case P_IN: d.K = p.F; d.ncols = p.DM; d.w1 = d.w2 = p.in_w; d.split = d.ncols; d.ldw = p.DM; d.kind = A_X; break;
    case P_PROJ:
      d.K = p.DM; d.ncols = 2 * p.DI; d.w1 = ly->in_x_w; d.w2 = ly->in_z_w; d.split = p.DI; d.ldw = p.DI;
      d.kind = A_NORM; d.norm_w = ly->norm_w; break;
    case P_XPROJ:
      d.K = p.DI; d.ncols = p.RK + 2 * p.N; d.w1 = d.w2 = ly->x_proj_w; d.split = d.ncols; d.ldw = d.ncols;
      d.kind = A_CONV; break;
    case P_OUT: d.K = p.DI; d.ncols = p.DM; d.w1 = d.w2 = ly->out_w; d.split = d.ncols; d.ldw = p.DM; d.kind = A_Y; break;
    default:
      d.K = p.DM; d.ncols = p.O; d.w1 = d.w2 = p.head_w; d.split = d.ncols; d.ldw = p.O; d.kind = A_NORM;
      d.norm_w = p.norm_f_w; break;
  }
  return d;
}

/* Brings into L1 the weights this thread will load in the block's first
 * two items of `phase` (weights do not depend on earlier phases, so this
 * runs before the barrier and overlaps the wait). */
static __device__ void prefetch_weights(const if_params &p, int phase, const if_layer *ly) {
  const if_prod q = phase_desc(p, phase, ly);
  const int R = p.B * p.L;
  const int tc = tile_cols(R), kgs = IF_THREADS / tc;
  const int nrt = (R + IF_TR - 1) / IF_TR, nct = (q.ncols + tc - 1) / tc;
  const int cl = threadIdx.x % tc, kg = threadIdx.x / tc;
  int n = 0;
  for (int it = blockIdx.x; it < nrt * nct && n < 2; it += gridDim.x, n++) {
    const int c = (it % nct) * tc + cl;
    if (c >= q.ncols) continue;
    const float *wc = c < q.split ? q.w1 + c : q.w2 + (c - q.split);
    for (int k = kg; k < q.K; k += kgs)
      asm volatile("prefetch.global.L1 [%0];" ::"l"(wc + (size_t)k * q.ldw));
  }
}

/* A product phase over all (row tile, column tile) items. */
static __device__ void product_phase(const if_params &p, int phase, const if_layer *ly,
                                     float *smem) {
  const int R = p.B * p.L;
  const if_prod q = phase_desc(p, phase, ly);
  const int K = q.K, ncols = q.ncols, split = q.split, ldw = q.ldw, kind = q.kind;
  const float *w1 = q.w1, *w2 = q.w2, *norm_w = q.norm_w;
  float *a_s = smem;                    /* IF_TR * K */
  float *red_s = smem + IF_TR * MX_INFER_MAX_K; /* IF_THREADS * IF_TR */
  const int tc = tile_cols(R);
  const int nrt = (R + IF_TR - 1) / IF_TR, nct = (ncols + tc - 1) / tc;
  const int items = nrt * nct;
  int cur_rt = -1;
  for (int it = blockIdx.x; it < items; it += gridDim.x) {
    const int rt = it / nct, ct = it - rt * nct;
    const int r0 = rt * IF_TR, nr = min(IF_TR, R - r0);
    if (rt != cur_rt) {
      __syncthreads();
      load_a(p, kind, norm_w, ly, r0, nr, K, a_s, phase == P_XPROJ && ct == 0);
      __syncthreads();
      cur_rt = rt;
    }
    int i, c;
    const float v = tc == 8 ? tile_product<8>(a_s, nr, K, w1, w2, split, ldw, ncols, ct * tc, red_s, &i, &c)
                            : tile_product<32>(a_s, nr, K, w1, w2, split, ldw, ncols, ct * tc, red_s, &i, &c);
    if (i >= 0) {
      const size_t r = (size_t)(r0 + i);
      switch (phase) {
        case P_IN: p.s[r * p.DM + c] = v + p.in_b[c]; break;
        case P_PROJ:
          if (c < p.DI) p.xi[r * p.DI + c] = v;
          else p.z[r * p.DI + (c - p.DI)] = v;
          break;
        case P_XPROJ: p.dbc[r * ncols + c] = v; break;
        case P_OUT: p.s[r * p.DM + c] = __ldcg(p.s + r * p.DM + c) + v; break;
        default: p.out[r * p.O + c] = v + p.head_b[c]; break;
      }
    }
  }
  /* P_XPROJ: rows no item with ct == 0 staged cannot exist (every row tile
   * has a column tile 0), so xc is complete after the barrier. */
}

/* The scan phase: item = (batch row b, group of IF_THREADS / lp channels).
 * Thread (ch, n) owns state n of channel d; sums over n by shuffles within
 * lp lanes. Steps are staged p.tt (at most IF_TT) at a time. */
static __device__ void scan_phase(const if_params &p, const if_layer *ly, float *smem) {
  const int lp = p.lp, ch_per = IF_THREADS / lp;
  const int ngroups = (p.DI + ch_per - 1) / ch_per;
  const int items = p.B * ngroups;
  const int tid = threadIdx.x, chl = tid / lp, n = tid & (lp - 1);
  const int ncol = p.RK + 2 * p.N;
  float *delta_s = smem;                 /* tt * ch_per */
  float *u_s = delta_s + p.tt * ch_per;  /* tt * ch_per */
  float *z_s = u_s + p.tt * ch_per;      /* tt * ch_per */
  float *bc_s = z_s + p.tt * ch_per;     /* tt * ncol */
  for (int it = blockIdx.x; it < items; it += gridDim.x) {
    const int b = it / ngroups, g = it - b * ngroups;
    const int d0 = g * ch_per, d = d0 + chl;
    const int live = d < p.DI && n < p.N;
    const float a = live ? -expf(ly->a_log[(size_t)d * p.N + n]) : 0.0f;
    const float dd = d < p.DI ? ly->d[d] : 0.0f;
    float h = 0.0f;
    if (live && ly->ssm_in) h = __ldcg(ly->ssm_in + ((size_t)b * p.DI + d) * p.N + n);
    for (int t0 = 0; t0 < p.L; t0 += p.tt) {
      const int tn = min(p.tt, p.L - t0);
      __syncthreads();
#pragma unroll 4
      for (int i = tid; i < tn * ncol; i += IF_THREADS) {
        const int t = i / ncol, k = i - t * ncol;
        bc_s[i] = __ldcg(p.dbc + ((size_t)b * p.L + t0 + t) * ncol + k);
      }
      __syncthreads();
#pragma unroll 2
      for (int i = tid; i < tn * ch_per; i += IF_THREADS) {
        const int t = i / ch_per, c = i - t * ch_per, dc = d0 + c;
        if (dc >= p.DI) continue;
        const size_t r = (size_t)b * p.L + t0 + t;
        float acc = ly->dt_b[dc];
#pragma unroll 8
        for (int k = 0; k < p.RK; k++) acc += bc_s[t * ncol + k] * ly->dt_w[(size_t)k * p.DI + dc];
        delta_s[i] = softplus_f(acc);
        u_s[i] = __ldcg(p.xc + r * p.DI + dc);
        z_s[i] = __ldcg(p.z + r * p.DI + dc);
      }
      __syncthreads();
      {
        /* every lane runs the steps (the shuffles need the whole warp);
         * lanes past the channels or states compute zeros */
#pragma unroll 4
        for (int t = 0; t < tn; t++) {
          const float dt = delta_s[t * ch_per + chl], u = u_s[t * ch_per + chl];
          float bn = 0.0f, cn = 0.0f;
          if (n < p.N) {
            bn = bc_s[t * ncol + p.RK + n];
            cn = bc_s[t * ncol + p.RK + p.N + n];
          }
          if (p.reset && p.reset[(size_t)b * p.L + t0 + t]) h = 0.0f;
          h = live ? h * expf(dt * a) + dt * bn * u : 0.0f;
          float part = live ? cn * h : 0.0f;
          for (int o = lp >> 1; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o, lp);
          if (n == 0 && d < p.DI) {
            const float zz = z_s[t * ch_per + chl];
            p.y[((size_t)b * p.L + t0 + t) * p.DI + d] = (part + dd * u) * silu_f(zz);
          }
        }
      }
    }
    if (live) ly->ssm_out[((size_t)b * p.DI + d) * p.N + n] = h;
    /* The conv state after the last step: the raw inputs of the last W-1
     * steps (zero before the row's last reset; from the entering state
     * where the window is shorter). Lane n handles positions n, n + lp, ...
     * of its channel; conv_in may be conv_out, so every read of the block
     * comes before the barrier and every write after it (no other block
     * reads this row's state any more in this kernel). */
    float keep[IF_MAX_W];
    const int W = p.W;
#pragma unroll
    for (int q = 0; q < IF_MAX_W; q++) {
      const int j = n + q * lp;
      keep[q] = 0.0f;
      if (d < p.DI && j < W - 1) {
        const int tt = p.L - (W - 1) + j;
        if (!reset_in(p, b, tt, p.L - 1)) {
          if (tt >= 0) keep[q] = __ldcg(p.xi + ((size_t)b * p.L + tt) * p.DI + d);
          else if (ly->conv_in)
            keep[q] = __ldcg(ly->conv_in + ((size_t)b * p.DI + d) * (W - 1) + (W - 1) + tt);
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < IF_MAX_W; q++) {
      const int j = n + q * lp;
      if (d < p.DI && j < W - 1) ly->conv_out[((size_t)b * p.DI + d) * (W - 1) + j] = keep[q];
    }
  }
}

static __global__ void __launch_bounds__(IF_THREADS, 1) infer_kernel(if_params p) {
  extern __shared__ float smem[];
  product_phase(p, P_IN, NULL, smem);
  for (int l = 0; l < p.NL; l++) {
    const if_layer *ly = &p.layer[l];
    /* each wait at a barrier overlaps the fetch of the next phase's weights */
    prefetch_weights(p, P_PROJ, ly);
    grid_barrier(p.bar);
    product_phase(p, P_PROJ, ly, smem);
    prefetch_weights(p, P_XPROJ, ly);
    grid_barrier(p.bar);
    product_phase(p, P_XPROJ, ly, smem);
    grid_barrier(p.bar);
    scan_phase(p, ly, smem);
    prefetch_weights(p, P_OUT, ly);
    grid_barrier(p.bar);
    product_phase(p, P_OUT, ly, smem);
  }
  prefetch_weights(p, P_HEAD, NULL);
  grid_barrier(p.bar);
  product_phase(p, P_HEAD, NULL, smem);
  grid_exit(p.bar);
}

/* ------------------------------------------------------------------- host */

static unsigned *g_bar[MX_MAX_CUDA_DEVICES];
static int g_smem_set[MX_MAX_CUDA_DEVICES];
static int g_max_blocks[MX_MAX_CUDA_DEVICES];

static int check_args(const mx_infer_args *a, mx_err *err) {
  if (a->n_layers < 1 || a->n_layers > MX_INFER_MAX_LAYERS)
    return mx_cuda_fail(err, MX_E_ARG, "infer: n_layers must be 1..%d, got %d", MX_INFER_MAX_LAYERS,
                        a->n_layers);
  if (a->batch < 1 || a->len < 1 || a->batch * a->len > (1 << 24))
    return mx_cuda_fail(err, MX_E_ARG, "infer: batch * len must be 1..2^24");
  const int64_t k[4] = {a->features, a->d_model, a->d_inner, a->dt_rank + 2 * a->d_state};
  for (int i = 0; i < 4; i++)
    if (k[i] < 1 || k[i] > MX_INFER_MAX_K)
      return mx_cuda_fail(err, MX_E_ARG, "infer: a size exceeds %d", MX_INFER_MAX_K);
  if (a->d_state < 1 || a->d_state > IF_MAX_N || a->d_conv < 1 || a->d_conv > IF_MAX_W ||
      a->dt_rank < 1 || a->outputs < 1 || a->outputs > (1 << 20))
    return mx_cuda_fail(err, MX_E_ARG, "infer: d_state 1..%d, d_conv 1..%d, dt_rank >= 1 required",
                        IF_MAX_N, IF_MAX_W);
  if (a->blocks < 0 || a->step_channels < -1 || a->step_channels > 64 ||
      (a->blocks > 0 && a->step_channels > 0))
    return mx_cuda_fail(err, MX_E_ARG,
                        "infer: blocks >= 0 and step_channels -1..64 required, not both set");
  return MX_OK;
}

static size_t scratch_floats(const mx_infer_args *a) {
  const size_t R = (size_t)(a->batch * a->len);
  return R * ((size_t)a->d_model + 4 * (size_t)a->d_inner + (size_t)(a->dt_rank + 2 * a->d_state));
}

/* Kernel parameters from the arguments (scratch pointers set later). */
static void fill_params(if_params *p, const mx_infer_args *a, unsigned *bar) {
  memset(p, 0, sizeof *p);
  p->B = (int)a->batch;
  p->L = (int)a->len;
  p->F = (int)a->features;
  p->DM = (int)a->d_model;
  p->DI = (int)a->d_inner;
  p->N = (int)a->d_state;
  p->W = (int)a->d_conv;
  p->RK = (int)a->dt_rank;
  p->O = (int)a->outputs;
  p->NL = a->n_layers;
  int lp = 1;
  while (lp < p->N) lp <<= 1;
  p->lp = lp;
  const int per_step = 3 * (IF_THREADS / lp) + p->RK + 2 * p->N;
  p->tt = IF_SMEM_FLOATS / per_step < IF_TT ? IF_SMEM_FLOATS / per_step : IF_TT;
  p->eps = (float)a->eps;
  p->in_w = (const float *)a->in_w;
  p->in_b = (const float *)a->in_b;
  p->norm_f_w = (const float *)a->norm_f_w;
  p->head_w = (const float *)a->head_w;
  p->head_b = (const float *)a->head_b;
  p->x = (const float *)a->x;
  p->reset = a->reset;
  p->out = (float *)a->out;
  p->bar = bar;
  for (int l = 0; l < a->n_layers; l++) {
    const mx_infer_layer *q = &a->layers[l];
    if_layer *o = &p->layer[l];
    o->norm_w = (const float *)q->norm_w;
    o->in_x_w = (const float *)q->in_x_w;
    o->in_z_w = (const float *)q->in_z_w;
    o->conv_w = (const float *)q->conv_w;
    o->conv_b = (const float *)q->conv_b;
    o->x_proj_w = (const float *)q->x_proj_w;
    o->dt_w = (const float *)q->dt_w;
    o->dt_b = (const float *)q->dt_b;
    o->a_log = (const float *)q->a_log;
    o->d = (const float *)q->d;
    o->out_w = (const float *)q->out_w;
    o->conv_in = (const float *)q->conv_in;
    o->ssm_in = (const float *)q->ssm_in;
    o->conv_out = (float *)q->conv_out;
    o->ssm_out = (float *)q->ssm_out;
  }
}

/* Per-device set-up under d->mu: the barrier words, the general kernel's
 * shared-memory attribute and co-resident block limit, the opt-in shared
 * memory a block may have. */
static int infer_setup(mx_cuda_dev *d, mx_err *err) {
  const int i = d->index;
  if (!g_bar[i]) {
    unsigned *bar = NULL;
    int rc = MX_CUDA_CALL(d, err, cudaMalloc((void **)&bar, 2 * sizeof(unsigned)));
    if (rc == MX_OK) rc = MX_CUDA_CALL(d, err, cudaMemset(bar, 0, 2 * sizeof(unsigned)));
    if (rc != MX_OK) {
      if (bar) cudaFree(bar);
      return rc;
    }
    g_bar[i] = bar;
  }
  if (!g_smem_set[i]) {
    const int bytes = (int)(IF_SMEM_FLOATS * sizeof(float));
    MX_CUDA_TRY(d, err, cudaFuncSetAttribute(infer_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    int per_sm = 0;
    MX_CUDA_TRY(d, err, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, infer_kernel, IF_THREADS, bytes));
    if (per_sm < 1) return mx_cuda_fail(err, MX_E_RUNTIME, "infer: the kernel does not fit on an SM");
    g_max_blocks[i] = per_sm * d->sm_count;
    g_smem_set[i] = bytes;
  }
  return MX_OK;
}

/* How one call runs: which kernel, its parameters and grid. */
typedef struct {
  if_params p;
  int step;         /* 1: the step kernel (infer_step.cu) */
  int cluster;      /* 1: the cluster kernel (infer_cluster.cu) */
  unsigned blocks;  /* the general kernel's grid */
  size_t scratch;   /* floats of device scratch */
} if_run;

/* Chooses the kernel under d->mu (after infer_setup). Left to the backend
 * (blocks and step_channels 0), one step of one row runs on the cluster
 * kernel when it applies; else one step of at most IS_MAX_ROWS rows on the
 * step kernel when its slices fit; blocks > 0 or step_channels == -1 ask
 * for the general kernel, step_channels > 0 for the step kernel with that
 * many channels per block. */
static int configure(mx_cuda_dev *d, const mx_infer_args *a, if_run *run, mx_err *err) {
  fill_params(&run->p, a, g_bar[d->index]);
  run->step = 0;
  run->cluster = 0;
  if (a->blocks == 0 && a->step_channels == 0 && infer_cluster_configure(d, &run->p)) {
    run->cluster = 1;
    run->scratch = 4; /* it needs none; a plan still owns a (tiny) buffer */
    return MX_OK;
  }
  if (a->blocks == 0 && a->step_channels >= 0) {
    const char *why = NULL;
    int ok = infer_step_configure(&run->p, a->step_channels, d->sm_count,
                                  (size_t)d->smem_optin, &why) == 0;
    if (ok) {
      int max_blocks = 0;
      const int rc = infer_step_setup(d, run->p.B, (size_t)run->p.sl.total * sizeof(float), &max_blocks, err);
      if (rc != MX_OK) return rc;
      if (run->p.groups > max_blocks) {
        ok = 0;
        why = "its blocks cannot all be resident";
      }
    }
    if (ok) run->step = 1;
    else if (a->step_channels > 0)
      return mx_cuda_fail(err, MX_E_ARG, "infer: step_channels %d cannot be used: %s", a->step_channels, why);
  }
  if (run->step) {
    run->scratch = infer_step_scratch_floats(&run->p);
  } else {
    int want = a->blocks > 0 ? a->blocks
                             : (a->batch * a->len <= IF_TR ? d->sm_count : g_max_blocks[d->index]);
    if (want > g_max_blocks[d->index]) want = g_max_blocks[d->index];
    run->blocks = (unsigned)(want < 1 ? 1 : want);
    run->scratch = scratch_floats(a);
  }
  return MX_OK;
}

/* Carves the kernel's scratch out of `scratch` (run->scratch floats). */
static void set_scratch(if_run *run, float *scratch) {
  if_params *p = &run->p;
  if (run->cluster) return;
  if (run->step) {
    p->part_s = scratch;
    p->part_x = scratch + (size_t)p->groups * p->B * p->DM;
    return;
  }
  const size_t R = (size_t)p->B * p->L;
  float *s = scratch;
  p->s = s;
  s += R * p->DM;
  p->xi = s;
  s += R * p->DI;
  p->z = s;
  s += R * p->DI;
  p->xc = s;
  s += R * p->DI;
  p->y = s;
  s += R * p->DI;
  p->dbc = s;
}

static int launch(mx_cuda_dev *d, const if_run *run, cudaStream_t stream, mx_err *err) {
  if (run->cluster) return infer_cluster_launch(d, &run->p, stream, err);
  if (run->step) return infer_step_launch(d, &run->p, stream, err);
  return infer_coop_launch(d, infer_kernel, run->blocks, (size_t)g_smem_set[d->index], stream, &run->p, err);
}

extern "C" int mx_cuda_infer(int dev, const mx_infer_args *a, mx_err *err) {
  int rc = check_args(a, err);
  if (rc != MX_OK) return rc;
  if (!a->x || !a->out) return mx_cuda_fail(err, MX_E_ARG, "infer: x and out are required");
  mx_cuda_dev *d = NULL;
  rc = mx_cuda_begin(dev, err, &d);
  if (rc != MX_OK) return rc;
  rc = infer_setup(d, err);
  if_run run;
  if (rc == MX_OK) rc = configure(d, a, &run, err);
  float *scratch = NULL;
  if (rc == MX_OK)
    rc = MX_CUDA_CALL(d, err, cudaMallocAsync((void **)&scratch, run.scratch * sizeof(float), d->stream));
  if (rc == MX_OK) {
    set_scratch(&run, scratch);
    rc = launch(d, &run, d->stream, err);
  }
  if (scratch) {
    mx_err ignored;
    const int frc = MX_CUDA_CALL(d, rc == MX_OK ? err : &ignored, cudaFreeAsync(scratch, d->stream));
    if (rc == MX_OK) rc = frc;
  }
  mx_cuda_unlock(d);
  return rc;
}

/* ------------------------------------------------------------------ plans */

/* A plan's frame and logits live in mapped pinned host memory that the
 * kernel reads and writes directly (no copy nodes): one replay is one
 * kernel. */
typedef struct {
  int dev;
  size_t in_bytes, out_bytes;
  void *host_in, *host_out; /* pinned, mapped */
  float *scratch;
  cudaGraphExec_t exec;     /* NULL: replay by direct launches */
  cudaEvent_t done;
  if_run run;
} if_plan;

static void plan_release(mx_cuda_dev *d, if_plan *pl) {
  if (pl->done) {
    cudaEventSynchronize(pl->done);
    cudaEventDestroy(pl->done);
  }
  if (pl->exec) cudaGraphExecDestroy(pl->exec);
  if (d && pl->scratch) cudaFreeAsync(pl->scratch, d->stream);
  if (pl->host_in) cudaFreeHost(pl->host_in);
  if (pl->host_out) cudaFreeHost(pl->host_out);
  cudaGetLastError();
  free(pl);
}

/* Records the kernel into a graph on a private stream; 0 with pl->exec
 * set, or non-zero (the caller replays by direct launches). */
static int plan_capture(mx_cuda_dev *d, if_plan *pl) {
  cudaStream_t cs = NULL;
  cudaGraph_t graph = NULL;
  mx_err e;
  if (cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking) != cudaSuccess) {
    cudaGetLastError();
    return 1;
  }
  int ok = 0;
  if (cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal) == cudaSuccess) {
    const int rc = launch(d, &pl->run, cs, &e);
    const cudaError_t ec = cudaStreamEndCapture(cs, &graph);
    if (rc == MX_OK && ec == cudaSuccess && graph &&
        cudaGraphInstantiate(&pl->exec, graph, 0) == cudaSuccess)
      ok = 1;
  }
  if (graph) cudaGraphDestroy(graph);
  cudaStreamDestroy(cs);
  if (!ok) pl->exec = NULL;
  cudaGetLastError();
  return ok ? 0 : 1;
}

extern "C" int mx_cuda_infer_plan_new(int dev, const mx_infer_args *a, void **plan, void **host_in,
                                      void **host_out, size_t *device_bytes, mx_err *err) {
  *plan = NULL;
  *device_bytes = 0;
  int rc = check_args(a, err);
  if (rc != MX_OK) return rc;
  if (a->len != 1) return mx_cuda_fail(err, MX_E_ARG, "infer_plan_new: len must be 1");
  for (int l = 0; l < a->n_layers; l++)
    if (!a->layers[l].conv_in || !a->layers[l].ssm_in || a->layers[l].conv_out != a->layers[l].conv_in ||
        a->layers[l].ssm_out != a->layers[l].ssm_in)
      return mx_cuda_fail(err, MX_E_ARG, "infer_plan_new: layer %d needs in-place states", l);
  if_plan *pl = (if_plan *)calloc(1, sizeof *pl);
  if (!pl) return mx_cuda_fail(err, MX_E_OOM, "infer_plan_new: out of host memory");
  pl->dev = dev;
  const size_t B = (size_t)a->batch;
  pl->in_bytes = B * (size_t)a->features * sizeof(float) + B;
  pl->out_bytes = B * (size_t)a->outputs * sizeof(float);
  mx_cuda_dev *d = NULL;
  rc = mx_cuda_begin(dev, err, &d);
  if (rc != MX_OK) {
    free(pl);
    return rc;
  }
  rc = infer_setup(d, err);
  if (rc == MX_OK) rc = configure(d, a, &pl->run, err);
  const unsigned flags = cudaHostAllocMapped | cudaHostAllocPortable;
  if (rc == MX_OK) rc = MX_CUDA_CALL(d, err, cudaHostAlloc(&pl->host_in, pl->in_bytes, flags));
  if (rc == MX_OK) rc = MX_CUDA_CALL(d, err, cudaHostAlloc(&pl->host_out, pl->out_bytes, flags));
  void *dev_in = NULL, *dev_out = NULL;
  if (rc == MX_OK) rc = MX_CUDA_CALL(d, err, cudaHostGetDevicePointer(&dev_in, pl->host_in, 0));
  if (rc == MX_OK) rc = MX_CUDA_CALL(d, err, cudaHostGetDevicePointer(&dev_out, pl->host_out, 0));
  if (rc == MX_OK)
    rc = MX_CUDA_CALL(d, err, cudaMallocAsync((void **)&pl->scratch, pl->run.scratch * sizeof(float), d->stream));
  if (rc == MX_OK) rc = MX_CUDA_CALL(d, err, cudaEventCreateWithFlags(&pl->done, cudaEventDisableTiming));
  /* the device buffers must exist before a capture on another stream uses them */
  if (rc == MX_OK) rc = MX_CUDA_CALL(d, err, cudaStreamSynchronize(d->stream));
  if (rc == MX_OK) {
    memset(pl->host_in, 0, pl->in_bytes);
    memset(pl->host_out, 0, pl->out_bytes);
    pl->run.p.x = (const float *)dev_in;
    pl->run.p.reset = (const uint8_t *)dev_in + B * (size_t)a->features * sizeof(float);
    pl->run.p.out = (float *)dev_out;
    set_scratch(&pl->run, pl->scratch);
    (void)plan_capture(d, pl);
  }
  if (rc != MX_OK) {
    plan_release(d, pl);
    mx_cuda_unlock(d);
    return rc;
  }
  mx_cuda_unlock(d);
  *plan = pl;
  *host_in = pl->host_in;
  *host_out = pl->host_out;
  *device_bytes = pl->run.scratch * sizeof(float);
  return MX_OK;
}

extern "C" int mx_cuda_infer_plan_run(int dev, void *plan, mx_err *err) {
  if_plan *pl = (if_plan *)plan;
  if (!pl || pl->dev != dev) return mx_cuda_fail(err, MX_E_ARG, "infer_plan_run: not a plan of this device");
  mx_cuda_dev *d = NULL;
  int rc = mx_cuda_begin(dev, err, &d);
  if (rc != MX_OK) return rc;
  if (pl->exec) rc = MX_CUDA_CALL(d, err, cudaGraphLaunch(pl->exec, d->stream));
  else rc = launch(d, &pl->run, d->stream, err);
  if (rc == MX_OK) rc = MX_CUDA_CALL(d, err, cudaEventRecord(pl->done, d->stream));
  mx_cuda_unlock(d);
  if (rc != MX_OK) return rc;
  return MX_CUDA_CALL(d, err, cudaEventSynchronize(pl->done));
}

extern "C" void mx_cuda_infer_plan_free(int dev, void *plan) {
  if_plan *pl = (if_plan *)plan;
  if (!pl) return;
  mx_err ignored;
  mx_cuda_dev *d = NULL;
  if (mx_cuda_open(dev, &ignored, &d) != MX_OK) d = NULL;
  plan_release(d, pl);
}

/* Whether a plan replays a CUDA graph and which kernel it runs (tests and
 * benchmarks report it). */
extern "C" int mx_cuda_infer_plan_flags(const void *plan) {
  const if_plan *pl = (const if_plan *)plan;
  if (!pl) return 0;
  return (pl->exec ? MX_PLAN_GRAPHED : 0) | (pl->run.step ? MX_PLAN_STEP_KERNEL : 0) |
         (pl->run.cluster ? MX_PLAN_CLUSTER_KERNEL : 0);
}

/*
 * infer_step.cu: the step kernel of fused inference: one time step (len 1)
 * of a whole Mambex.Model for a few rows (batch <= IS_MAX_ROWS), in one
 * persistent cooperative kernel with 1 + 2 * n_layers grid barriers.
 *
 * Why a second kernel: the general kernel (infer.cu) spreads every product
 * over the whole grid, so each layer needs four barriers and every phase
 * re-reads its activations from L2; at one row that is ~4 us per phase.
 * Here block g owns a group of `cpb` channels of d_inner in every layer and
 * does everything that stays inside its channels by itself; only two things
 * cross channels, and they travel as per-group partial sums:
 *
 *   P_in   partial of x . in_w over the group's slice of the features
 *                                                   -> part_s (G, B, DM)
 *   per layer:
 *   A      s (+)= sum_g part_s (every block, same order: all hold the same
 *          s); u = rmsnorm(s); xi | z = u . in_w[:, own channels];
 *          xc = silu(conv(conv_state, xi)); new conv state;
 *          partial of xc . x_proj_w over own channels  -> part_x (G, B, RK+2N)
 *   B      dbc = sum_g part_x; delta = softplus(dbc[:RK] . dt_w + dt_b);
 *          h = exp(delta A) h + delta B xc; y = (C.h + D xc) silu(z);
 *          partial of y . out_w over own channels      -> part_s
 *   P_head s += sum_g part_s; out = rmsnorm(s) . head_w[:, own outputs] + b
 *
 * Each block copies its slices of the weights into shared memory with
 * cp.async (16-byte chunks where sizes and pointers allow): the input
 * projection, the head and layer 0 at the start, layer l + 1 during layer l
 * (two layer slots), so the weights arrive while earlier phases run. The
 * kernel is instantiated for one row (the smallest code: a step's code runs
 * once per launch, so its instruction fetches count) and for up to 8.
 *
 * Measured (H200, the DESIGN.md §7 model, bench/cuda/infer_harness.c and
 * its phase trace): ~33 us for 2 layers at one row against ~44 for the
 * general kernel; the phases are latency chains of a few warps (each L2
 * round trip ~1 us, each barrier ~1 us) and the copies of the weights cost
 * several us of issue at the start of a layer.
 *
 * Invariants:
 *   - The grid is exactly `groups` co-resident blocks (cooperative launch);
 *     block g owns channels [g * cpb, (g + 1) * cpb) of every layer, so it
 *     alone reads and writes their conv and ssm states: in place is safe
 *     (each state is read before it is written, by the same block).
 *   - part_s and part_x are written in one phase and read in the next by
 *     every block; a barrier (which fences) separates every write from the
 *     reads and every read from the next write. Reads use __ldcg (L2).
 *   - Sums over groups run in a fixed order that depends only on the sizes,
 *     so every block computes the same s and reruns are bit-identical.
 *   - A layer slot is overwritten (cp.async) only after the barrier that
 *     follows the last phase reading it.
 */
#include <stdlib.h>
#include <string.h>

#include "infer_common.cuh"

/* ---------------------------------------------------------------- trace */

/* Built with -DMX_INFER_TRACE (bench/cuda/infer_harness.c's probe build
 * only): thread 0 of every block stamps the SM clock at each phase edge
 * into g_trace[block][event]; mx_infer_step_trace copies them out. */
#ifdef MX_INFER_TRACE
#define IS_TRACE_EVENTS 64
static __device__ long long g_trace[1024][IS_TRACE_EVENTS];
#define TRACE(ev)                                                      \
  do {                                                                 \
    if (threadIdx.x == 0 && (ev) < IS_TRACE_EVENTS && blockIdx.x < 1024) \
      g_trace[blockIdx.x][(ev)] = clock64();                           \
  } while (0)
extern "C" __attribute__((visibility("default"))) int mx_infer_step_trace(long long *host, int blocks) {
  return cudaMemcpyFromSymbol(host, g_trace, sizeof(long long) * IS_TRACE_EVENTS * blocks) != cudaSuccess;
}
#else
#define TRACE(ev) ((void)0)
#endif
/* sub-phase edges of layers 0..3: events 32 + 8 l + k */
#define TRACE_SUB(l, k) \
  do {                  \
    if ((l) < 4) TRACE(32 + 8 * (l) + (k)); \
  } while (0)

/* ------------------------------------------------------------- cp.async */

/* One V-float chunk (V = 1 or 4) from global to shared memory, or zeros
 * when !valid. */
template <int V>
static __device__ __forceinline__ void cp_chunk(float *dst, const float *src, int valid) {
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  if (V == 4)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 4 : 0)
                 : "memory");
}

static __device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
static __device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* rows x cols floats from src (row stride lds) to dst (row stride ldd) in
 * V-float chunks; rows past vrows and columns past vcols read as zeros.
 * V = 4 needs cols, vcols, lds, ldd and both addresses in whole 16-byte
 * chunks. Not inlined: its many call sites would repeat the loop (code
 * that runs once per launch costs instruction fetches). */
template <int V>
static __device__ __noinline__ void stage_rows(float *dst, int ldd, const float *src, size_t lds, int rows,
                                               int cols, int vrows, int vcols) {
  const int cpr = cols / V, total = rows * cpr;
  for (int i = threadIdx.x; i < total; i += IF_THREADS) {
    const int r = i / cpr, c = (i - r * cpr) * V;
    const int ok = r < vrows && c < vcols;
    cp_chunk<V>(dst + r * ldd + c, ok ? src + r * lds + c : src, ok);
  }
}

/* n contiguous floats (the first `valid` readable). */
template <int V>
static __device__ __forceinline__ void stage_flat(float *dst, const float *src, int n, int valid) {
  stage_rows<V>(dst, 0, src, 0, 1, n, 1, valid);
}

/* Layer ly's weights for group g (channels c0 .. c0 + cpb - 1, zeros past
 * d_inner) into `slot`. */
template <int V>
static __device__ void stage_layer(const if_params &p, const if_layer *ly, int g, float *slot) {
  const is_layout &L = p.sl;
  const int C = p.cpb, c0 = g * C, DM = p.DM, DI = p.DI, NX = p.RK + 2 * p.N;
  const int vc = DI - c0 < C ? DI - c0 : C;
  stage_rows<V>(slot + L.w_in, 2 * C, ly->in_x_w + c0, DI, DM, C, DM, vc);     /* [k][x cols] */
  stage_rows<V>(slot + L.w_in + C, 2 * C, ly->in_z_w + c0, DI, DM, C, DM, vc); /* [k][z cols] */
  stage_flat<V>(slot + L.w_x, ly->x_proj_w + (size_t)c0 * NX, C * NX, vc * NX); /* [c][j] */
  stage_rows<V>(slot + L.w_dt, C, ly->dt_w + c0, DI, p.RK, C, p.RK, vc);       /* [k][c] */
  stage_flat<V>(slot + L.w_out, ly->out_w + (size_t)c0 * DM, C * DM, vc * DM);  /* [c][j] */
  stage_flat<V>(slot + L.conv_w, ly->conv_w + (size_t)c0 * p.W, C * p.W, vc * p.W);
  stage_flat<V>(slot + L.a_log, ly->a_log + (size_t)c0 * p.N, C * p.N, vc * p.N);
  stage_flat<V>(slot + L.conv_b, ly->conv_b + c0, C, vc);
  stage_flat<V>(slot + L.dt_b, ly->dt_b + c0, C, vc);
  stage_flat<V>(slot + L.d, ly->d + c0, C, vc);
  stage_flat<V>(slot + L.norm_w, ly->norm_w, DM, DM);
}

/* The input projection's and the head's slices for group g. */
template <int V>
static __device__ void stage_top(const if_params &p, int g, float *sm) {
  const is_layout &L = p.sl;
  const int DM = p.DM, f0 = g * p.fpg, o0 = g * p.cpo;
  const int vf = p.F - f0 < p.fpg ? (p.F - f0 > 0 ? p.F - f0 : 0) : p.fpg;
  const int vo = p.O - o0 < p.cpo ? (p.O - o0 > 0 ? p.O - o0 : 0) : p.cpo;
  stage_flat<V>(sm + L.w_inp, p.in_w + (vf > 0 ? (size_t)f0 * DM : 0), p.fpg * DM, vf * DM); /* [f][j] */
  stage_rows<V>(sm + L.w_head, p.cpo, p.head_w + (vo > 0 ? o0 : 0), p.O, DM, p.cpo, DM, vo); /* [k][o] */
  stage_flat<V>(sm + L.norm_f, p.norm_f_w, DM, DM);
}

static __device__ void stage_layer_any(const if_params &p, const if_layer *ly, int g, float *slot) {
  if (p.vec) stage_layer<4>(p, ly, g, slot);
  else stage_layer<1>(p, ly, g, slot);
}

/* ------------------------------------------------------------- phases */

/* out[e] = sum over groups of src[g * n + e], e < n, into shared memory, in
 * a fixed order: the groups split into ns consecutive slices (ns depends on
 * n and G only), each summed in order by one thread, then the slices in
 * order. Ends with __syncthreads. */
static __device__ __noinline__ void sum_groups(float *out, const float *src, int G, int n, float *red) {
  const int tid = threadIdx.x;
  if ((n & 3) == 0) {
    const int n4 = n >> 2;
    const int ns = n4 >= IF_THREADS ? 1 : min(G, IF_THREADS / n4);
    const int gps = (G + ns - 1) / ns;
    const float4 *s4 = (const float4 *)src;
    for (int t = tid; t < ns * n4; t += IF_THREADS) {
      const int sl = t / n4, e = t - sl * n4;
      const int g0 = sl * gps, g1 = min(G, g0 + gps);
      float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      for (int g = g0; g < g1; g += 8) {
        float4 v[8];
#pragma unroll
        for (int i = 0; i < 8; i++)
          v[i] = g + i < g1 ? __ldcg(s4 + (size_t)(g + i) * n4 + e) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
        for (int i = 0; i < 8; i++) {
          acc.x += v[i].x;
          acc.y += v[i].y;
          acc.z += v[i].z;
          acc.w += v[i].w;
        }
      }
      *(float4 *)((ns == 1 ? out : red + (size_t)sl * n) + 4 * e) = acc;
    }
    __syncthreads();
    if (ns > 1) {
      for (int e = tid; e < n; e += IF_THREADS) {
        float v = 0.0f;
        for (int sl = 0; sl < ns; sl++) v += red[sl * n + e];
        out[e] = v;
      }
      __syncthreads();
    }
    return;
  }
  for (int e = tid; e < n; e += IF_THREADS) {
    float acc = 0.0f;
    for (int g = 0; g < G; g++) acc += __ldcg(src + (size_t)g * n + e);
    out[e] = acc;
  }
  __syncthreads();
}

/* act[r][k] = s[r][k] * rstd(s[r]) * w[k] for the R rows. */
static __device__ void rmsnorm_rows(const if_params &p, const float *s, const float *w, float *act,
                                    float *rstd, int R) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, DM = p.DM;
  for (int r = warp; r < R; r += IF_THREADS / 32) {
    float acc = 0.0f;
    for (int k = lane; k < DM; k += 32) acc += s[r * DM + k] * s[r * DM + k];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) rstd[r] = rsqrtf(acc / (float)DM + p.eps);
  }
  __syncthreads();
  for (int i = tid; i < R * DM; i += IF_THREADS) {
    const int r = i / DM, k = i - r * DM;
    act[i] = s[i] * rstd[r] * w[k];
  }
  __syncthreads();
}

/* s (+)= the partial sums in part_s (+ in_b on the first layer). */
static __device__ void gather_s(const if_params &p, float *sm, int first, int R) {
  const is_layout &L = p.sl;
  float *s = sm + L.s, *sum = sm + L.act;
  sum_groups(sum, p.part_s, p.groups, R * p.DM, sm + L.red);
  for (int i = threadIdx.x; i < R * p.DM; i += IF_THREADS)
    s[i] = (first ? __ldg(p.in_b + i % p.DM) : s[i]) + sum[i];
  __syncthreads();
}

static __device__ void phase_in(const if_params &p, float *sm, int g, int R) {
  const is_layout &L = p.sl;
  const int tid = threadIdx.x, DM = p.DM, fpg = p.fpg;
  float *xs = sm + L.act; /* (R, fpg) */
  for (int i = tid; i < R; i += IF_THREADS) sm[L.rst + i] = p.reset && p.reset[i] ? 1.0f : 0.0f;
  for (int i = tid; i < R * fpg; i += IF_THREADS) {
    const int r = i / fpg, f = g * fpg + (i - r * fpg);
    xs[i] = f < p.F ? __ldcg(p.x + (size_t)r * p.F + f) : 0.0f;
  }
  cp_wait<1>(); /* the top slices (the newest group is layer 0) */
  __syncthreads();
  const float *w = sm + L.w_inp;
  for (int i = tid; i < R * DM; i += IF_THREADS) {
    const int r = i / DM, j = i - r * DM;
    float acc = 0.0f;
    for (int f = 0; f < fpg; f++) acc += xs[r * fpg + f] * w[f * DM + j];
    p.part_s[((size_t)g * R + r) * DM + j] = acc;
  }
}

/* Phase A of layer l (see the top): RM bounds the rows R. h: the thread's
 * ssm state per row, loaded here for phase B. Starts the copy of layer
 * l + 1's weights into `next` (the slot layer l - 1 used). */
template <int RM>
static __device__ void phase_a(const if_params &p, const if_layer *ly, const float *slot, float *next,
                               float *sm, int g, int l, int R, float h[RM]) {
  const is_layout &L = p.sl;
  const int tid = threadIdx.x, C = p.cpb, NC = 2 * C, c0 = g * C, DM = p.DM, DI = p.DI;
  const int W1 = p.W - 1, N = p.N, NX = p.RK + 2 * N;
  const float *rst = sm + L.rst;
  /* this group's ssm states into registers (used in phase B) and conv
   * states into shared memory, as one cp.async group (zeros where the
   * row resets); then layer l + 1's weights as the newest group */
  {
    const int c = tid / p.lp, n = tid - c * p.lp;
    const int live = c < C && c0 + c < DI && n < N && ly->ssm_in;
#pragma unroll
    for (int r = 0; r < RM; r++)
      h[r] = (r < R && live && rst[r] == 0.0f) ? __ldcg(ly->ssm_in + ((size_t)r * DI + c0 + c) * N + n) : 0.0f;
  }
  float *cst = sm + L.cst; /* (R, C, W-1) */
  if (W1 > 0) {
    const int vc = DI - c0 < C ? DI - c0 : C;
    for (int r = 0; r < R; r++) {
      const float *src = ly->conv_in ? ly->conv_in + ((size_t)r * DI + c0) * W1 : NULL;
      if (src && rst[r] == 0.0f) stage_flat<1>(cst + r * C * W1, src, C * W1, vc * W1);
      else
        for (int i = tid; i < C * W1; i += IF_THREADS) cst[r * C * W1 + i] = 0.0f;
    }
  }
  cp_commit();
  if (l + 1 < p.NL) stage_layer_any(p, &p.layer[l + 1], g, next);
  cp_commit();
  TRACE_SUB(l, 0);
  gather_s(p, sm, l == 0, R);
  cp_wait<1>(); /* all but layer l + 1: layer l's slot and the conv states */
  __syncthreads();
  TRACE_SUB(l, 1);
  float *act = sm + L.act;
  rmsnorm_rows(p, sm + L.s, slot + L.norm_w, act, sm + L.rstd, R);
  TRACE_SUB(l, 2);

  /* xi | z for own channels: thread (slice, col) sums k over its slice */
  float *red = sm + L.red, *xz = sm + L.xz;
  {
    const int nsl = IF_THREADS / NC, kps = (DM + nsl - 1) / nsl;
    const int col = tid % NC, sl = tid / NC;
    if (sl < nsl) {
      float acc[RM];
#pragma unroll
      for (int r = 0; r < RM; r++) acc[r] = 0.0f;
      const int k0 = sl * kps, k1 = min(DM, k0 + kps);
      const float *w = slot + L.w_in + col;
#pragma unroll 4
      for (int k = k0; k < k1; k++) {
        const float wv = w[k * NC];
#pragma unroll
        for (int r = 0; r < RM; r++)
          if (r < R) acc[r] += act[r * DM + k] * wv;
      }
#pragma unroll
      for (int r = 0; r < RM; r++)
        if (r < R) red[(sl * R + r) * NC + col] = acc[r];
    }
    __syncthreads();
    for (int i = tid; i < R * NC; i += IF_THREADS) {
      const int r = i / NC, cc = i - r * NC;
      float v = 0.0f;
      for (int s = 0; s < nsl; s++) v += red[(s * R + r) * NC + cc];
      xz[i] = v;
    }
    __syncthreads();
  }
  TRACE_SUB(l, 3);

  /* conv + SiLU; the new conv state (the last W-1 inputs) */
  float *xc = sm + L.xc;
  for (int i = tid; i < R * C; i += IF_THREADS) {
    const int r = i / C, c = i - r * C;
    const float xi = xz[r * NC + c];
    const float *cw = slot + L.conv_w + c * p.W;
    const float *st = cst + (r * C + c) * W1;
    float acc = slot[L.conv_b + c];
    for (int j = 0; j < W1; j++) acc += cw[j] * st[j];
    acc += cw[W1] * xi;
    xc[i] = silu_f(acc);
    if (c0 + c < DI && W1 > 0) {
      float *dst = ly->conv_out + ((size_t)r * DI + c0 + c) * W1;
      for (int j = 0; j + 1 < W1; j++) dst[j] = st[j + 1];
      dst[W1 - 1] = xi;
    }
  }
  __syncthreads();
  TRACE_SUB(l, 4);

  /* partial x_proj over own channels */
  const float *wx = slot + L.w_x;
  for (int i = tid; i < R * NX; i += IF_THREADS) {
    const int r = i / NX, j = i - r * NX;
    float acc = 0.0f;
    for (int c = 0; c < C; c++) acc += xc[r * C + c] * wx[c * NX + j];
    p.part_x[((size_t)g * R + r) * NX + j] = acc;
  }
}

template <int RM>
static __device__ void phase_b(const if_params &p, const if_layer *ly, const float *slot, float *sm,
                               int g, int l, int R, float h[RM]) {
  const is_layout &L = p.sl;
  const int tid = threadIdx.x, C = p.cpb, NC = 2 * C, c0 = g * C, DM = p.DM, DI = p.DI;
  const int N = p.N, RK = p.RK, NX = RK + 2 * N;
  float *dbc = sm + L.dbc, *delta = sm + L.delta, *y = sm + L.y;
  const float *xc = sm + L.xc, *xz = sm + L.xz;
  sum_groups(dbc, p.part_x, p.groups, R * NX, sm + L.red);
  TRACE_SUB(l, 5);
  for (int i = tid; i < R * C; i += IF_THREADS) {
    const int r = i / C, c = i - r * C;
    float acc = slot[L.dt_b + c];
    for (int k = 0; k < RK; k++) acc += dbc[r * NX + k] * slot[L.w_dt + k * C + c];
    delta[i] = softplus_f(acc);
  }
  __syncthreads();
  TRACE_SUB(l, 6);
  {
    /* the scan: thread (c, n), sums over n by shuffles within lp lanes */
    const int lp = p.lp, c = tid / lp, n = tid - c * lp;
    const int cl = c < C ? c : 0;
    const int live = c < C && c0 + c < DI && n < N;
    const float a = live ? -expf(slot[L.a_log + c * N + n]) : 0.0f;
    const float dd = slot[L.d + cl];
#pragma unroll
    for (int r = 0; r < RM; r++) {
      if (r >= R) break;
      const float dt = delta[r * C + cl], u = xc[r * C + cl];
      const float bn = live ? dbc[r * NX + RK + n] : 0.0f;
      const float cn = live ? dbc[r * NX + RK + N + n] : 0.0f;
      h[r] = live ? h[r] * expf(dt * a) + dt * bn * u : 0.0f;
      float part = cn * h[r];
      for (int o = lp >> 1; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o, lp);
      if (n == 0 && c < C) y[r * C + c] = (part + dd * u) * silu_f(xz[r * NC + C + c]);
      if (live) ly->ssm_out[((size_t)r * DI + c0 + c) * N + n] = h[r];
    }
  }
  __syncthreads();
  TRACE_SUB(l, 7);
  const float *wo = slot + L.w_out;
  for (int i = tid; i < R * DM; i += IF_THREADS) {
    const int r = i / DM, j = i - r * DM;
    float acc = 0.0f;
    for (int c = 0; c < C; c++) acc += y[r * C + c] * wo[c * DM + j];
    p.part_s[((size_t)g * R + r) * DM + j] = acc;
  }
}

static __device__ void phase_head(const if_params &p, float *sm, int g, int R) {
  const is_layout &L = p.sl;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, DM = p.DM, cpo = p.cpo;
  gather_s(p, sm, 0, R);
  float *act = sm + L.act;
  rmsnorm_rows(p, sm + L.s, sm + L.norm_f, act, sm + L.rstd, R);
  const float *w = sm + L.w_head;
  for (int q = warp; q < R * cpo; q += IF_THREADS / 32) {
    const int r = q / cpo, oo = q - r * cpo, o = g * cpo + oo;
    if (o >= p.O) continue;
    float acc = 0.0f;
    for (int k = lane; k < DM; k += 32) acc += act[r * DM + k] * w[k * cpo + oo];
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
    if (lane == 0) p.out[(size_t)r * p.O + o] = acc + __ldg(p.head_b + o);
  }
}

/* RM: a bound on the rows (1 for one agent: the smallest code). */
template <int RM>
static __global__ void __launch_bounds__(IF_THREADS, 1) infer_step_kernel(if_params p) {
  extern __shared__ __align__(16) float sm[];
  const int g = blockIdx.x, R = p.B;
  float *slot0 = sm, *slot1 = sm + p.sl.slot;
  TRACE(0);
  /* weights: the top slices and layer 0 now (two cp.async groups); each
   * later layer's during the layer before */
  if (p.vec) stage_top<4>(p, g, sm);
  else stage_top<1>(p, g, sm);
  cp_commit();
  stage_layer_any(p, &p.layer[0], g, slot0);
  cp_commit();
  float h[RM];
  TRACE(1);
  phase_in(p, sm, g, R);
  TRACE(2);
  for (int l = 0; l < p.NL; l++) {
    const if_layer *ly = &p.layer[l];
    float *slot = (l & 1) ? slot1 : slot0, *next = (l & 1) ? slot0 : slot1;
    grid_barrier(p.bar);
    TRACE(3 + 4 * l);
    phase_a<RM>(p, ly, slot, next, sm, g, l, R, h);
    TRACE(4 + 4 * l);
    grid_barrier(p.bar);
    TRACE(5 + 4 * l);
    phase_b<RM>(p, ly, slot, sm, g, l, R, h);
    TRACE(6 + 4 * l);
  }
  cp_wait<0>();
  grid_barrier(p.bar);
  TRACE(3 + 4 * p.NL);
  phase_head(p, sm, g, R);
  TRACE(4 + 4 * p.NL);
  grid_exit(p.bar);
}

/* ------------------------------------------------------------------ host */

/* per device and instantiation (one row, up to 8): the shared-memory
 * attribute set so far, and the last occupancy answer with its size */
static int g_step_smem[MX_MAX_CUDA_DEVICES][2];
static size_t g_step_occ_smem[MX_MAX_CUDA_DEVICES][2];
static int g_step_occ_blocks[MX_MAX_CUDA_DEVICES][2];

/* Every region starts on a 16-byte boundary (cp.async chunks, float4
 * stores). */
static int take(int *o, int n) {
  const int at = *o;
  *o += (n + 3) & ~3;
  return at;
}

static is_layout layout_for(const if_params *p) {
  is_layout L;
  const int C = p->cpb, NC = 2 * C, DM = p->DM, NX = p->RK + 2 * p->N, R = p->B;
  int o = 0;
  L.w_in = take(&o, DM * NC);
  L.w_x = take(&o, C * NX);
  L.w_dt = take(&o, p->RK * C);
  L.w_out = take(&o, C * DM);
  L.conv_w = take(&o, C * p->W);
  L.conv_b = take(&o, C);
  L.dt_b = take(&o, C);
  L.a_log = take(&o, C * p->N);
  L.d = take(&o, C);
  L.norm_w = take(&o, DM);
  L.slot = o;
  L.nslots = p->NL > 1 ? 2 : 1;
  o = L.nslots * L.slot;
  L.w_inp = take(&o, p->fpg * DM);
  L.w_head = take(&o, DM * p->cpo);
  L.norm_f = take(&o, DM);
  L.s = take(&o, R * DM);
  L.act = take(&o, R * (DM > p->fpg ? DM : p->fpg));
  L.xz = take(&o, R * NC);
  L.xc = take(&o, R * C);
  L.dbc = take(&o, R * NX);
  L.delta = take(&o, R * C);
  L.y = take(&o, R * C);
  L.cst = take(&o, R * C * (p->W - 1));
  L.rstd = take(&o, R);
  L.rst = take(&o, R);
  /* the in_proj slices (<= IF_THREADS * R) and sum_groups' (<= 4 * IF_THREADS) */
  L.red = take(&o, IF_THREADS * (R > 4 ? R : 4));
  L.total = o;
  return L;
}

static int aligned16(const void *q) { return ((uintptr_t)q & 15) == 0; }

/* Whether every weight can be staged in 16-byte chunks with cpb channels. */
static int can_vec(const if_params *p) {
  if (p->DM % 4 || p->DI % 4 || p->cpb % 4 || p->O % 4) return 0;
  const void *top[] = {p->in_w, p->norm_f_w, p->head_w};
  for (int i = 0; i < 3; i++)
    if (!aligned16(top[i])) return 0;
  for (int l = 0; l < p->NL; l++) {
    const if_layer *y = &p->layer[l];
    const void *w[] = {y->norm_w, y->in_x_w, y->in_z_w, y->conv_w, y->conv_b, y->x_proj_w,
                       y->dt_w,   y->dt_b,   y->a_log,  y->d,      y->out_w};
    for (int i = 0; i < 11; i++)
      if (!aligned16(w[i])) return 0;
  }
  return 1;
}

int infer_step_configure(if_params *p, int channels, int max_blocks, size_t max_smem, const char **why) {
  *why = NULL;
  if (p->L != 1) return (*why = "the step kernel takes one step (len 1)", 1);
  if (p->B > IS_MAX_ROWS) return (*why = "the step kernel takes at most 8 rows", 1);
  const int cmax = IF_THREADS / p->lp < 64 ? IF_THREADS / p->lp : 64;
  int c = channels > 0 ? channels : (cmax < 16 ? cmax : 16);
  if (c > cmax) return (*why = "step_channels exceeds 256 / (d_state rounded up to a power of two), or 64", 1);
  for (;;) {
    p->cpb = c;
    p->groups = (p->DI + c - 1) / c;
    p->fpg = (p->F + p->groups - 1) / p->groups;
    p->vec = can_vec(p);
    p->cpo = (p->O + p->groups - 1) / p->groups;
    if (p->vec) p->cpo = (p->cpo + 3) & ~3;
    p->sl = layout_for(p);
    const int fits = p->groups <= max_blocks && (size_t)p->sl.total * sizeof(float) <= max_smem;
    if (fits) return 0;
    /* auto: fewer channels a group, more groups, smaller slices */
    if (channels > 0 || c == 1 || p->groups > max_blocks)
      return (*why = "the step kernel's slices do not fit in shared memory or the grid", 1);
    c /= 2;
  }
}

size_t infer_step_scratch_floats(const if_params *p) {
  return (size_t)p->groups * p->B * ((size_t)p->DM + p->RK + 2 * p->N);
}

/* The instantiation for `rows` rows: one row (the smallest code) or up to 8. */
static void (*kernel_for(int rows))(if_params) {
  return rows == 1 ? infer_step_kernel<1> : infer_step_kernel<IS_MAX_ROWS>;
}

/* Under d->mu. The occupancy query runs once per shared-memory size (every
 * call of a model asks for the same): the last answer is kept. */
int infer_step_setup(mx_cuda_dev *d, int rows, size_t smem, int *max_blocks, mx_err *err) {
  const int i = d->index, k = rows == 1 ? 0 : 1;
  const void *fn = (const void *)kernel_for(rows);
  if (g_step_smem[i][k] < (int)smem) {
    MX_CUDA_TRY(d, err, cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    g_step_smem[i][k] = (int)smem;
  }
  if (g_step_occ_smem[i][k] != smem) {
    int per_sm = 0;
    MX_CUDA_TRY(d, err, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, IF_THREADS, smem));
    g_step_occ_smem[i][k] = smem;
    g_step_occ_blocks[i][k] = per_sm * d->sm_count;
  }
  *max_blocks = g_step_occ_blocks[i][k];
  return MX_OK;
}

int infer_step_launch(mx_cuda_dev *d, const if_params *p, cudaStream_t stream, mx_err *err) {
  return infer_coop_launch(d, kernel_for(p->B), (unsigned)p->groups, (size_t)p->sl.total * sizeof(float),
                           stream, p, err);
}

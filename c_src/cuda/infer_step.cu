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
 * cp.async at the start (the input projection, the head and the first two
 * layers) and one layer ahead after that (two layer slots), so the weights
 * arrive while earlier phases run.
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

/* ------------------------------------------------------------- cp.async */

static __device__ __forceinline__ void cp4(float *dst, const float *src, int valid) {
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 4 : 0)
               : "memory");
}

static __device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
static __device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* Layer l's weights for group g into `slot` (zeros past d_inner). */
static __device__ void stage_layer(const if_params &p, const if_layer *ly, int g, float *slot) {
  const is_layout &L = p.sl;
  const int C = p.cpb, NC = 2 * C, c0 = g * C, DM = p.DM, DI = p.DI, NX = p.RK + 2 * p.N;
  const int W = p.W, N = p.N, tid = threadIdx.x;
  for (int i = tid; i < DM * NC; i += IF_THREADS) { /* [k][x cols | z cols] */
    const int k = i / NC, j = i - k * NC, c = c0 + (j < C ? j : j - C), ok = c < DI;
    cp4(slot + L.w_in + i, (j < C ? ly->in_x_w : ly->in_z_w) + (ok ? (size_t)k * DI + c : 0), ok);
  }
  for (int i = tid; i < C * NX; i += IF_THREADS) { /* [c][j] */
    const int c = i / NX, ok = c0 + c < DI;
    cp4(slot + L.w_x + i, ly->x_proj_w + (ok ? (size_t)c0 * NX + i : 0), ok);
  }
  for (int i = tid; i < p.RK * C; i += IF_THREADS) { /* [k][c] */
    const int k = i / C, c = i - k * C, ok = c0 + c < DI;
    cp4(slot + L.w_dt + i, ly->dt_w + (ok ? (size_t)k * DI + c0 + c : 0), ok);
  }
  for (int i = tid; i < C * DM; i += IF_THREADS) { /* [c][j] */
    const int c = i / DM, ok = c0 + c < DI;
    cp4(slot + L.w_out + i, ly->out_w + (ok ? (size_t)c0 * DM + i : 0), ok);
  }
  for (int i = tid; i < C * W; i += IF_THREADS) {
    const int ok = c0 + i / W < DI;
    cp4(slot + L.conv_w + i, ly->conv_w + (ok ? (size_t)c0 * W + i : 0), ok);
  }
  for (int i = tid; i < C * N; i += IF_THREADS) {
    const int ok = c0 + i / N < DI;
    cp4(slot + L.a_log + i, ly->a_log + (ok ? (size_t)c0 * N + i : 0), ok);
  }
  for (int i = tid; i < C; i += IF_THREADS) {
    const int ok = c0 + i < DI;
    cp4(slot + L.conv_b + i, ly->conv_b + (ok ? c0 + i : 0), ok);
    cp4(slot + L.dt_b + i, ly->dt_b + (ok ? c0 + i : 0), ok);
    cp4(slot + L.d + i, ly->d + (ok ? c0 + i : 0), ok);
  }
  for (int i = tid; i < DM; i += IF_THREADS) cp4(slot + L.norm_w + i, ly->norm_w + i, 1);
}

/* The input projection's and the head's slices for group g. */
static __device__ void stage_top(const if_params &p, int g, float *sm) {
  const is_layout &L = p.sl;
  const int DM = p.DM, tid = threadIdx.x;
  for (int i = tid; i < p.fpg * DM; i += IF_THREADS) { /* [f][j] */
    const int f = g * p.fpg + i / DM, ok = f < p.F;
    cp4(sm + L.w_inp + i, p.in_w + (ok ? (size_t)f * DM + (i % DM) : 0), ok);
  }
  for (int i = tid; i < DM * p.cpo; i += IF_THREADS) { /* [k][o] */
    const int k = i / p.cpo, o = g * p.cpo + (i - k * p.cpo), ok = o < p.O;
    cp4(sm + L.w_head + i, p.head_w + (ok ? (size_t)k * p.O + o : 0), ok);
  }
  for (int i = tid; i < DM; i += IF_THREADS) cp4(sm + L.norm_f + i, p.norm_f_w + i, 1);
}

/* ------------------------------------------------------------- phases */

/* out[e] = sum over groups of src[g * n + e], e < n, into shared memory, in
 * a fixed order: the groups split into ns consecutive slices (ns depends on
 * n and G only), each summed in order by one thread, then the slices in
 * order. Ends with __syncthreads. */
static __device__ void sum_groups(float *out, const float *src, int G, int n, float *red) {
  const int tid = threadIdx.x;
  if ((n & 3) == 0) {
    const int n4 = n >> 2;
    const int ns = n4 >= IF_THREADS ? 1 : min(G, IF_THREADS / n4);
    const int gps = (G + ns - 1) / ns;
    const float4 *s4 = (const float4 *)src;
    for (int t = tid; t < ns * n4; t += IF_THREADS) {
      const int e = t % n4, sl = t / n4;
      const int g0 = sl * gps, g1 = min(G, g0 + gps);
      float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      int g = g0;
      for (; g + 8 <= g1; g += 8) {
        float4 v[8];
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = __ldcg(s4 + (size_t)(g + i) * n4 + e);
#pragma unroll
        for (int i = 0; i < 8; i++) {
          acc.x += v[i].x;
          acc.y += v[i].y;
          acc.z += v[i].z;
          acc.w += v[i].w;
        }
      }
      for (; g < g1; g++) {
        const float4 v = __ldcg(s4 + (size_t)g * n4 + e);
        acc.x += v.x;
        acc.y += v.y;
        acc.z += v.z;
        acc.w += v.w;
      }
      float *dst = ns == 1 ? out : red + (size_t)sl * n;
      dst[4 * e] = acc.x;
      dst[4 * e + 1] = acc.y;
      dst[4 * e + 2] = acc.z;
      dst[4 * e + 3] = acc.w;
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
  for (int i = tid; i < R * DM; i += IF_THREADS) act[i] = s[i] * rstd[i / DM] * w[i % DM];
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
  cp_wait<2>(); /* the top slices (the newest two groups are layers) */
  __syncthreads();
  const float *w = sm + L.w_inp;
  for (int i = tid; i < R * DM; i += IF_THREADS) {
    const int r = i / DM, j = i - r * DM;
    float acc = 0.0f;
    for (int f = 0; f < fpg; f++) acc += xs[r * fpg + f] * w[f * DM + j];
    p.part_s[((size_t)g * R + r) * DM + j] = acc;
  }
}

/* Phase A of layer l (see the top). h: the thread's ssm state per row,
 * loaded here for phase B. */
static __device__ void phase_a(const if_params &p, const if_layer *ly, const float *slot, float *sm,
                               int g, int l, int R, float h[IS_MAX_ROWS]) {
  const is_layout &L = p.sl;
  const int tid = threadIdx.x, C = p.cpb, NC = 2 * C, c0 = g * C, DM = p.DM, DI = p.DI;
  const int W1 = p.W - 1, N = p.N, NX = p.RK + 2 * N;
  const float *rst = sm + L.rst;
  /* this group's states (zero where the row resets) */
  float *cst = sm + L.cst; /* (R, C, W-1) */
  for (int i = tid; i < R * C * W1; i += IF_THREADS) {
    const int r = i / (C * W1), rem = i - r * C * W1, c = rem / W1, j = rem - c * W1;
    float v = 0.0f;
    if (c0 + c < DI && rst[r] == 0.0f && ly->conv_in)
      v = __ldcg(ly->conv_in + ((size_t)r * DI + c0 + c) * W1 + j);
    cst[i] = v;
  }
  {
    const int c = tid / p.lp, n = tid - c * p.lp;
    const int live = c < C && c0 + c < DI && n < N && ly->ssm_in;
#pragma unroll
    for (int r = 0; r < IS_MAX_ROWS; r++)
      h[r] = (r < R && live && rst[r] == 0.0f) ? __ldcg(ly->ssm_in + ((size_t)r * DI + c0 + c) * N + n) : 0.0f;
  }
  gather_s(p, sm, l == 0, R);
  float *act = sm + L.act;
  rmsnorm_rows(p, sm + L.s, slot + L.norm_w, act, sm + L.rstd, R);

  /* xi | z for own channels: thread (slice, col) sums k over its slice */
  float *red = sm + L.red, *xz = sm + L.xz;
  {
    const int nsl = IF_THREADS / NC, kps = (DM + nsl - 1) / nsl;
    const int col = tid % NC, sl = tid / NC;
    if (sl < nsl) {
      float acc[IS_MAX_ROWS];
#pragma unroll
      for (int r = 0; r < IS_MAX_ROWS; r++) acc[r] = 0.0f;
      const int k0 = sl * kps, k1 = min(DM, k0 + kps);
      const float *w = slot + L.w_in + col;
#pragma unroll 4
      for (int k = k0; k < k1; k++) {
        const float wv = w[k * NC];
#pragma unroll
        for (int r = 0; r < IS_MAX_ROWS; r++)
          if (r < R) acc[r] += act[r * DM + k] * wv;
      }
#pragma unroll
      for (int r = 0; r < IS_MAX_ROWS; r++)
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

  /* partial x_proj over own channels */
  const float *wx = slot + L.w_x;
  for (int i = tid; i < R * NX; i += IF_THREADS) {
    const int r = i / NX, j = i - r * NX;
    float acc = 0.0f;
    for (int c = 0; c < C; c++) acc += xc[r * C + c] * wx[c * NX + j];
    p.part_x[((size_t)g * R + r) * NX + j] = acc;
  }
}

static __device__ void phase_b(const if_params &p, const if_layer *ly, const float *slot, float *sm,
                               int g, int R, float h[IS_MAX_ROWS]) {
  const is_layout &L = p.sl;
  const int tid = threadIdx.x, C = p.cpb, NC = 2 * C, c0 = g * C, DM = p.DM, DI = p.DI;
  const int N = p.N, RK = p.RK, NX = RK + 2 * N;
  float *dbc = sm + L.dbc, *delta = sm + L.delta, *y = sm + L.y;
  const float *xc = sm + L.xc, *xz = sm + L.xz;
  sum_groups(dbc, p.part_x, p.groups, R * NX, sm + L.red);
  for (int i = tid; i < R * C; i += IF_THREADS) {
    const int r = i / C, c = i - r * C;
    float acc = slot[L.dt_b + c];
    for (int k = 0; k < RK; k++) acc += dbc[r * NX + k] * slot[L.w_dt + k * C + c];
    delta[i] = softplus_f(acc);
  }
  __syncthreads();
  {
    /* the scan: thread (c, n), sums over n by shuffles within lp lanes */
    const int lp = p.lp, c = tid / lp, n = tid - c * lp;
    const int cl = c < C ? c : 0;
    const int live = c < C && c0 + c < DI && n < N;
    const float a = live ? -expf(slot[L.a_log + c * N + n]) : 0.0f;
    const float dd = slot[L.d + cl];
#pragma unroll
    for (int r = 0; r < IS_MAX_ROWS; r++) {
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
  cp_wait<0>();
  __syncthreads();
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

static __global__ void __launch_bounds__(IF_THREADS, 1) infer_step_kernel(if_params p) {
  extern __shared__ float sm[];
  const int g = blockIdx.x, R = p.B;
  float *slot0 = sm, *slot1 = sm + p.sl.slot;
  TRACE(0);
  /* weights: the top slices, layer 0, layer 1 (or nothing): three groups */
  stage_top(p, g, sm);
  cp_commit();
  stage_layer(p, &p.layer[0], g, slot0);
  cp_commit();
  if (p.NL > 1) stage_layer(p, &p.layer[1], g, slot1);
  cp_commit();
  float h[IS_MAX_ROWS];
  TRACE(1);
  phase_in(p, sm, g, R);
  TRACE(2);
  for (int l = 0; l < p.NL; l++) {
    const if_layer *ly = &p.layer[l];
    float *slot = (l & 1) ? slot1 : slot0;
    grid_barrier(p.bar);
    TRACE(3 + 6 * l);
    if (l >= 1) {
      /* layer l + 1 into the slot layer l - 1 used (read before the barrier) */
      if (l + 1 < p.NL) stage_layer(p, &p.layer[l + 1], g, (l & 1) ? slot0 : slot1);
      cp_commit();
    }
    cp_wait<1>(); /* everything but the newest group: layer l is in */
    __syncthreads();
    TRACE(4 + 6 * l);
    phase_a(p, ly, slot, sm, g, l, R, h);
    TRACE(5 + 6 * l);
    grid_barrier(p.bar);
    TRACE(6 + 6 * l);
    phase_b(p, ly, slot, sm, g, R, h);
    TRACE(7 + 6 * l);
  }
  grid_barrier(p.bar);
  TRACE(3 + 6 * p.NL);
  phase_head(p, sm, g, R);
  TRACE(4 + 6 * p.NL);
  grid_exit(p.bar);
}

/* ------------------------------------------------------------------ host */

static int g_step_smem[MX_MAX_CUDA_DEVICES];

static is_layout layout_for(const if_params *p) {
  is_layout L;
  const int C = p->cpb, NC = 2 * C, DM = p->DM, NX = p->RK + 2 * p->N, R = p->B;
  int o = 0;
  L.w_in = o; o += DM * NC;
  L.w_x = o; o += C * NX;
  L.w_dt = o; o += p->RK * C;
  L.w_out = o; o += C * DM;
  L.conv_w = o; o += C * p->W;
  L.conv_b = o; o += C;
  L.dt_b = o; o += C;
  L.a_log = o; o += C * p->N;
  L.d = o; o += C;
  L.norm_w = o; o += DM;
  o = (o + 3) & ~3; /* 16-byte aligned slots */
  L.slot = o;
  L.nslots = p->NL > 1 ? 2 : 1;
  o = L.nslots * L.slot;
  L.w_inp = o; o += p->fpg * DM;
  L.w_head = o; o += DM * p->cpo;
  L.norm_f = o; o += DM;
  L.s = o; o += R * DM;
  L.act = o; o += R * (DM > p->fpg ? DM : p->fpg);
  L.xz = o; o += R * NC;
  L.xc = o; o += R * C;
  L.dbc = o; o += R * NX;
  L.delta = o; o += R * C;
  L.y = o; o += R * C;
  L.cst = o; o += R * C * (p->W - 1);
  L.rstd = o; o += R;
  L.rst = o; o += R;
  o = (o + 3) & ~3;
  L.red = o;
  /* the in_proj slices (<= IF_THREADS * R) and sum_groups' slices (<= 4 *
   * IF_THREADS) */
  o += IF_THREADS * (R > 4 ? R : 4);
  L.total = o;
  return L;
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
    p->cpo = (p->O + p->groups - 1) / p->groups;
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

int infer_step_setup(mx_cuda_dev *d, size_t smem, int *max_blocks, mx_err *err) {
  const int i = d->index;
  if (g_step_smem[i] < (int)smem) {
    MX_CUDA_TRY(d, err, cudaFuncSetAttribute(infer_step_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    g_step_smem[i] = (int)smem;
  }
  int per_sm = 0;
  MX_CUDA_TRY(d, err, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, infer_step_kernel, IF_THREADS, smem));
  *max_blocks = per_sm * d->sm_count;
  return MX_OK;
}

int infer_step_launch(mx_cuda_dev *d, const if_params *p, cudaStream_t stream, mx_err *err) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)p->groups);
  cfg.blockDim = dim3(IF_THREADS);
  cfg.dynamicSmemBytes = (size_t)p->sl.total * sizeof(float);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1] = {};
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return MX_CUDA_CALL(d, err, cudaLaunchKernelEx(&cfg, infer_step_kernel, *p));
}

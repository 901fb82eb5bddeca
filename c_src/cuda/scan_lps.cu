/*
 * scan_lps.cu: the selective scan's lane-per-state kernels for N = 16,
 * forward and backward (semantics and gradient formulas: scan.cu's header).
 *
 * One lane per (channel, state): a block of CH channels has CH * 16 threads,
 * thread c * 16 + n carrying h[b, d0 + c, n]; grid (D / CH, B). The 4-lane
 * kernels of scan.cu give each lane 4 states; these give a small batch 4x
 * the threads (batch 1, D = 512: 128 blocks of 64 threads instead of 16 of
 * 128), so its latency-bound recurrence is spread over the whole GPU.
 *
 * Time runs in chunks of LPS_TC steps streamed through a LPS_NSTAGE-stage
 * cp.async ring, as many chunks ahead. Per chunk: Δ (bias, softplus), Δ·u
 * and the other per-(t, d) terms are made once per (t, d) into shared
 * memory; the lanes run the steps and leave their per-state terms in shared
 * memory; then one thread per (t, d) adds the 16 states' terms (the output,
 * du, dδ, dz) and one thread per (t, n) adds the block's channels for dB and
 * dC. Every sum runs in a fixed order, so results are bit-identical from run
 * to run. The time-split variants (further down) also cut each 64-step chunk
 * into segments that run side by side.
 *
 * Checkpoints: the state entering every B16_SUB-th step, (B, nsub, D, N),
 * the layout of scan.cu's fast forward, and (but for the time-split forward,
 * which differs by rounding) the same bits, from the same per-state
 * arithmetic; any backward takes any forward's checkpoints. The backwards
 * write scan.cu's partials: dA (B, D, N), dD and dbias (B, D), dB and dC
 * (B, D / CH, L, N), reduced by scan.cu's kernels.
 *
 * No allocation, no synchronisation: the caller (scan.cu's launchers) owns
 * the scratch and holds the device's enqueue mutex while these enqueue.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <type_traits>

#include "scan_common.cuh"

#define LPS_TC 16 /* steps a chunk; a multiple of B16_SUB */
#define LPS_PAD 17 /* per-(t, d) rows of 16 state terms, padded: no bank conflicts */
#define LPS_NSTAGE 4 /* chunks in flight: a whole 60-step window is requested at once */

/* cp.async copies (the caller commits) of the chunk rows [t0, t0 + tc) of
 * what a kernel reads, packed in st one after the other: u, delta, dout
 * (BWD), z (when with_z; its slot is kept either way) as (TC, CH) blocks,
 * then B and C (when with_c) as (TC, 16). */
template <class IO, int CH, int TC, bool BWD>
static __device__ __forceinline__ void lps_stage(typename IO::T *st, const scan_params &p, int b, int g, int d0,
                                                 int t0, int tc, bool with_z, bool with_c) {
  typedef typename IO::T T;
  constexpr int N = 16, NX = BWD ? 4 : 3;
  const int64_t row = ((int64_t)b * p.L + t0) * p.D + d0, rs = (int64_t)p.D * sizeof(T);
  const int64_t brow = (((int64_t)b * p.L + t0) * p.G + g) * N, bs = (int64_t)p.G * N * sizeof(T);
  stage_rows<CH * sizeof(T)>(st, (const T *)p.u + row, rs, tc);
  stage_rows<CH * sizeof(T)>(st + TC * CH, (const T *)p.delta + row, rs, tc);
  if (BWD) stage_rows<CH * sizeof(T)>(st + 2 * TC * CH, (const T *)p.dout + row, rs, tc);
  if (with_z) stage_rows<CH * sizeof(T)>(st + (NX - 1) * TC * CH, (const T *)p.z + row, rs, tc);
  stage_rows<N * sizeof(T)>(st + NX * TC * CH, (const T *)p.Bm + brow, bs, tc);
  if (with_c) stage_rows<N * sizeof(T)>(st + NX * TC * CH + TC * N, (const T *)p.Cm + brow, bs, tc);
}

/* The forward's outputs of a chunk, one thread per (t, d) (NT threads, a
 * multiple of CH): the 16 lanes' C·h from y_s added in a fixed order, plus
 * D·u, gated with silu(z) when z_r is given. */
template <class IO, int CH, int NT>
static __device__ __forceinline__ void lps_forward_out(const scan_params &p, const float *y_s,
                                                       const typename IO::T *u_r, const typename IO::T *z_r,
                                                       int b, int t0, int tc, int d0, float my_D) {
  for (int i = threadIdx.x; i < tc * CH; i += NT) {
    const float *r = y_s + i * LPS_PAD;
    float sm[4];
#pragma unroll
    for (int q = 0; q < 4; q++) sm[q] = (r[4 * q] + r[4 * q + 1]) + (r[4 * q + 2] + r[4 * q + 3]);
    float y = fmaf(my_D, IO::load(u_r[i]), (sm[0] + sm[1]) + (sm[2] + sm[3]));
    if (z_r) {
      const float zz = IO::load(z_r[i]);
      y *= zz * sigmoid_fast(zz);
    }
    ((typename IO::T *)p.out)[((int64_t)b * p.L + t0 + i / CH) * p.D + d0 + i % CH] = IO::store(y);
  }
}

/* The backward's sums of a chunk. Per (t, d), one thread (NT threads, a
 * multiple of CH, so a thread keeps its channel): the 16 lanes' terms in
 * sa_s, sb_s (and yp_s with z) give du, dδ and dz, stored, and add to the
 * thread's dD and dbias sums. Per (t, n): dB and dC over the block's CH / 2
 * warp pairs in bc_s, in order, into the partials of block blk. */
template <class IO, int CH, int NT>
static __device__ __forceinline__ void lps_backward_sums(
    const scan_params &p, const float *sa_s, const float *sb_s, const float *yp_s, const float *bc_s,
    const float *dt_s, const float *dy_s, const float *fac_s, const typename IO::T *u_r,
    const typename IO::T *go_r, const typename IO::T *z_r, int b, int t0, int tc, int d0, int blk, float my_D,
    float &dD_acc, float &ddb_acc) {
  constexpr int N = 16, NW = CH / 2;
  for (int i = threadIdx.x; i < tc * CH; i += NT) {
    const float *ra = sa_s + i * LPS_PAD, *rb = sb_s + i * LPS_PAD;
    float sa = 0.0f, sb = 0.0f;
#pragma unroll
    for (int q = 0; q < 16; q++) {
      sa += ra[q];
      sb += rb[q];
    }
    const float uu = IO::load(u_r[i]), gy = dy_s[i];
    const float ddl = fmaf(LN2, sa, uu * sb) * fac_s[i];
    float yp = 0.0f, go = 0.0f, zz = 0.0f;
    if (z_r) {
      const float *ry = yp_s + i * LPS_PAD;
#pragma unroll
      for (int q = 0; q < 16; q++) yp += ry[q];
      yp = fmaf(my_D, uu, yp);
      go = IO::load(go_r[i]);
      zz = IO::load(z_r[i]);
    }
    store_grads_td<IO, true>(p, ((int64_t)b * p.L + t0 + i / CH) * p.D + d0 + i % CH,
                             fmaf(my_D, gy, dt_s[i] * sb), ddl, yp, go, zz);
    dD_acc = fmaf(gy, uu, dD_acc);
    ddb_acc += ddl;
  }
  const int nblk = p.D / CH;
  for (int i = threadIdx.x; i < tc * 32; i += NT) {
    const int t = i >> 5, slot = i & 31;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < NW; w++) sum += bc_s[(t * NW + w) * 32 + slot];
    float *dst = slot < N ? p.dB_part : p.dC_part;
    if (dst) dst[(((int64_t)b * nblk + blk) * p.L + t0 + t) * N + (slot & 15)] = sum;
  }
}

/* ---- forward --------------------------------------------------------------
 * shared: LPS_NSTAGE stages of u, delta, z (TC, CH) and B, C (TC, 16) raw; dt_s, du_s
 * (TC, CH) floats (Δ and Δ·u); y_s (TC, CH, LPS_PAD) (C·h of each lane);
 * rs_s (TC). p.out NULL: checkpoint-only (no z, no C, no output). */
template <class IO, int CH, bool RESET>
__global__ void __launch_bounds__(CH * 16) scan_forward_lps_kernel(scan_params p) {
  typedef typename IO::T T;
  constexpr int N = 16, TC = LPS_TC, NT = CH * 16;
  extern __shared__ __align__(16) unsigned char lsm[];
  const size_t stage_elems = 3 * TC * CH + 2 * TC * N;
  float *dt_s = (float *)(lsm + LPS_NSTAGE * stage_elems * sizeof(T));
  float *du_s = dt_s + TC * CH;
  float *y_s = du_s + TC * CH;
  float *rs_s = y_s + TC * CH * LPS_PAD;

  const int D = p.D, L = p.L, b = blockIdx.y, d0 = blockIdx.x * CH;
  const int g = d0 / (D / p.G);
  const int c = threadIdx.x >> 4, n = threadIdx.x & 15, d = d0 + c;
  const bool full = p.out != NULL;
  const T *z = full ? (const T *)p.z : NULL;
  const int nchunks = (L + TC - 1) / TC, nsub = (L + B16_SUB - 1) / B16_SUB;
  /* the (t, d) loops stride by NT, a multiple of CH: a thread always sees
   * channel d0 + threadIdx.x % CH there */
  const int pc = threadIdx.x % CH;
  const float my_bias = p.dbias ? p.dbias[d0 + pc] : 0.0f;
  const float my_D = p.Dskip ? p.Dskip[d0 + pc] : 0.0f;

  auto issue = [&](int k) {
    if (k < nchunks)
      lps_stage<IO, CH, TC, false>((T *)lsm + (k % LPS_NSTAGE) * stage_elems, p, b, g, d0, k * TC, min(TC, L - k * TC),
                                   z != NULL, full);
    __pipeline_commit();
  };

  const float a2 = p.A[(int64_t)d * N + n] * LOG2E;
  float h = p.h0 ? p.h0[((int64_t)b * D + d) * N + n] : 0.0f;
  float *ck = p.ck ? p.ck + ((int64_t)b * nsub * D + d) * N + n : NULL;

  for (int k = 0; k < LPS_NSTAGE; k++) issue(k);
  for (int k = 0; k < nchunks; k++) {
    const int t0 = k * TC, tc = min(TC, L - t0);
    const T *st = (const T *)lsm + (k % LPS_NSTAGE) * stage_elems;
    const T *u_r = st, *dl_r = st + TC * CH, *z_r = st + 2 * TC * CH;
    const T *B_r = st + 3 * TC * CH, *C_r = B_r + TC * N;
    __pipeline_wait_prior(LPS_NSTAGE - 1); /* chunk k has landed */
    __syncthreads();
    for (int i = threadIdx.x; i < tc * CH; i += NT) {
      const float dl = IO::load(dl_r[i]) + my_bias, dt = p.softplus ? softplus_fast(dl) : dl;
      dt_s[i] = dt;
      du_s[i] = dt * IO::load(u_r[i]);
    }
    if (RESET)
      for (int t = threadIdx.x; t < tc; t += NT) rs_s[t] = p.reset[(int64_t)b * L + t0 + t] ? 0.0f : 1.0f;
    __syncthreads();

    auto step = [&](int t) {
      if (ck && (t0 + t) % B16_SUB == 0) ck[(int64_t)((t0 + t) / B16_SUB) * D * N] = h;
      const int i = t * CH + c;
      const float a = ex2_ftz(dt_s[i] * a2);
      h = fmaf(a, RESET ? h * rs_s[t] : h, du_s[i] * IO::load(B_r[t * N + n]));
      if (full) y_s[i * LPS_PAD + n] = IO::load(C_r[t * N + n]) * h;
    };
    if (tc == TC) {
#pragma unroll
      for (int t = 0; t < TC; t++) step(t);
    } else {
      for (int t = 0; t < tc; t++) step(t);
    }
    __syncthreads();

    if (full) lps_forward_out<IO, CH, NT>(p, y_s, u_r, z ? z_r : NULL, b, t0, tc, d0, my_D);
    __syncthreads(); /* stage k's slot and the shared terms are free again */
    issue(k + LPS_NSTAGE);
  }
  if (p.h_last) p.h_last[((int64_t)b * D + d) * N + n] = h;
}

/* ---- backward -------------------------------------------------------------
 * Chunks last to first, and within a chunk B16_SUB-step pieces last to
 * first: a piece recomputes its states into registers from its checkpoint
 * (loaded one piece ahead), then runs the reverse recurrence. Per lane and
 * step the terms summed over states (a2·g·a·h', g·B, C·h) go to sa_s, sb_s,
 * yp_s; dB and dC, summed over channels, are first added over the warp's two
 * channels (lanes 0-15 keep dB, 16-31 dC) into bc_s.
 * shared: LPS_NSTAGE stages of u, delta, dout, z (TC, CH) and B, C (TC, 16) raw;
 *         dt_s, fac_s, dy_s, du_s (TC, CH) floats; rs_s (TC);
 *         sa_s, sb_s, yp_s (TC, CH, LPS_PAD); bc_s (TC, CH / 2, 32);
 *         acc_s (2, NT) for the per-channel sums at the end. */
template <class IO, int CH, bool RESET>
__global__ void __launch_bounds__(CH * 16) scan_backward_lps_kernel(scan_params p) {
  typedef typename IO::T T;
  constexpr int N = 16, TC = LPS_TC, NT = CH * 16, SUB = B16_SUB, NW = CH / 2;
  extern __shared__ __align__(16) unsigned char lsm[];
  const size_t stage_elems = 4 * TC * CH + 2 * TC * N;
  float *dt_s = (float *)(lsm + LPS_NSTAGE * stage_elems * sizeof(T));
  float *fac_s = dt_s + TC * CH;
  float *dy_s = fac_s + TC * CH;
  float *du_s = dy_s + TC * CH;
  float *sa_s = du_s + TC * CH;
  float *sb_s = sa_s + TC * CH * LPS_PAD;
  float *yp_s = sb_s + TC * CH * LPS_PAD;
  float *bc_s = yp_s + TC * CH * LPS_PAD;
  float *rs_s = bc_s + TC * NW * 32;
  float *acc_s = rs_s + TC;

  const int D = p.D, L = p.L, b = blockIdx.y, blk = blockIdx.x, d0 = blk * CH;
  const int g = d0 / (D / p.G);
  const int c = threadIdx.x >> 4, n = threadIdx.x & 15, d = d0 + c;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T *z = (const T *)p.z;
  const int nchunks = (L + TC - 1) / TC, nsub = (L + SUB - 1) / SUB;
  const float *ck = p.ck + ((int64_t)b * nsub * D + d) * N + n;
  const int pc = threadIdx.x % CH; /* the channel of the (t, d) loops */
  const float my_bias = p.dbias ? p.dbias[d0 + pc] : 0.0f;
  const float my_D = p.Dskip ? p.Dskip[d0 + pc] : 0.0f;

  auto issue = [&](int k, int m) {
    if (k >= 0)
      lps_stage<IO, CH, TC, true>((T *)lsm + (m % LPS_NSTAGE) * stage_elems, p, b, g, d0, k * TC, min(TC, L - k * TC),
                                  z != NULL, true);
    __pipeline_commit();
  };

  const float a2 = p.A[(int64_t)d * N + n] * LOG2E;
  float dh = p.dh_last ? p.dh_last[((int64_t)b * D + d) * N + n] : 0.0f;
  float dA = 0.0f, dD_acc = 0.0f, ddb_acc = 0.0f;
  int next_piece = nsub - 1;
  float ck_next = ck[(int64_t)next_piece * D * N];

  for (int m = 0; m < LPS_NSTAGE; m++) issue(nchunks - 1 - m, m);
  for (int m = 0; m < nchunks; m++) {
    const int k = nchunks - 1 - m, t0 = k * TC, tc = min(TC, L - t0);
    const T *st = (const T *)lsm + (m % LPS_NSTAGE) * stage_elems;
    const T *u_r = st, *dl_r = st + TC * CH, *go_r = st + 2 * TC * CH, *z_r = st + 3 * TC * CH;
    const T *B_r = st + 4 * TC * CH, *C_r = B_r + TC * N;
    __pipeline_wait_prior(LPS_NSTAGE - 1);
    __syncthreads();
    for (int i = threadIdx.x; i < tc * CH; i += NT) {
      float dt;
      delta_terms<true>(IO::load(dl_r[i]) + my_bias, p.softplus, &dt, &fac_s[i]);
      dt_s[i] = dt;
      du_s[i] = dt * IO::load(u_r[i]);
      dy_s[i] = dy_term<true>(IO::load(go_r[i]), z ? IO::load(z_r[i]) : 0.0f, z != NULL);
    }
    if (RESET)
      for (int t = threadIdx.x; t < tc; t += NT) rs_s[t] = p.reset[(int64_t)b * L + t0 + t] ? 0.0f : 1.0f;
    __syncthreads();

    /* one piece of sc steps from s0 (within the chunk); FULL: sc == SUB,
     * straight-line code */
    auto piece = [&](auto full_tag, int s0, int sc) {
      constexpr bool FULL = decltype(full_tag)::value;
      float av[SUB], hist[SUB];
      const int pi = (t0 + s0) / SUB;
      const float hin = pi == next_piece ? ck_next : ck[(int64_t)pi * D * N];
      next_piece = pi - 1;
      if (next_piece >= 0) ck_next = ck[(int64_t)next_piece * D * N];
#pragma unroll
      for (int t = 0; t < SUB; t++)
        if (FULL || t < sc) av[t] = ex2_ftz(dt_s[(s0 + t) * CH + c] * a2);
      float h = hin;
#pragma unroll
      for (int t = 0; t < SUB; t++) {
        if (FULL || t < sc) {
          const int tt = s0 + t, i = tt * CH + c;
          h = fmaf(av[t], RESET ? h * rs_s[tt] : h, du_s[i] * IO::load(B_r[tt * N + n]));
          hist[t] = h;
          if (z) yp_s[i * LPS_PAD + n] = IO::load(C_r[tt * N + n]) * h;
        }
      }
#pragma unroll
      for (int t = SUB - 1; t >= 0; t--) {
        if (FULL || t < sc) {
          const int tt = s0 + t, i = tt * CH + c;
          const float keep = RESET ? rs_s[tt] : 1.0f, gy = dy_s[i];
          const float hprev = (t > 0 ? hist[t > 0 ? t - 1 : 0] : hin) * keep;
          const float g_h = fmaf(IO::load(C_r[tt * N + n]), gy, dh);
          const float gha = g_h * av[t] * hprev;
          dA = fmaf(dt_s[i], gha, dA);
          sa_s[i * LPS_PAD + n] = a2 * gha;
          sb_s[i * LPS_PAD + n] = g_h * IO::load(B_r[tt * N + n]);
          /* dB (g·Δu) and dC (dy·h) over the warp's two channels: lanes
           * 0-15 keep dB[n], lanes 16-31 dC[n] */
          const float vb = g_h * du_s[i], vc = gy * hist[t];
          const bool hi = lane >= 16;
          const float sum = (hi ? vc : vb) + __shfl_xor_sync(0xffffffffu, hi ? vb : vc, 16);
          bc_s[(tt * NW + warp) * 32 + lane] = sum;
          dh = g_h * av[t] * keep;
        }
      }
    };
    for (int s0 = ((tc - 1) / SUB) * SUB; s0 >= 0; s0 -= SUB) {
      const int sc = min(SUB, tc - s0);
      if (sc == SUB) piece(std::true_type(), s0, sc);
      else piece(std::false_type(), s0, sc);
    }
    __syncthreads();

    lps_backward_sums<IO, CH, NT>(p, sa_s, sb_s, yp_s, bc_s, dt_s, dy_s, fac_s, u_r, go_r, z ? z_r : NULL, b, t0,
                                  tc, d0, blk, my_D, dD_acc, ddb_acc);
    __syncthreads();
    issue(k - LPS_NSTAGE, m);
  }

  p.dA_part[((int64_t)b * D + d) * N + n] = dA;
  if (p.dh0) p.dh0[((int64_t)b * D + d) * N + n] = dh;
  /* dD and dbias: the 16 threads of each channel, added in thread order */
  acc_s[threadIdx.x] = dD_acc;
  acc_s[NT + threadIdx.x] = ddb_acc;
  __syncthreads();
  if (threadIdx.x < CH) {
    float sd = 0.0f, sbias = 0.0f;
    for (int r = 0; r < 16; r++) {
      sd += acc_s[r * CH + threadIdx.x];
      sbias += acc_s[NT + r * CH + threadIdx.x];
    }
    p.dD_part[(int64_t)b * D + d0 + threadIdx.x] = sd;
    p.ddb_part[(int64_t)b * D + d0 + threadIdx.x] = sbias;
  }
}

/* ---- time-split kernels ------------------------------------------------------
 * At the smallest batches even a lane per state leaves most of the GPU idle,
 * and each lane walks the whole sequence. The split kernels also cut time:
 * chunks of SPL_TC steps as S segments, segment s of a chunk on its own
 * CH * 16 lanes (block = S * CH * 16 threads, thread s * CH * 16 + c * 16
 * + n). The recurrences are linear, so each segment runs from zero and keeps
 * what multiplies the unknown boundary value; the S segments' boundary
 * terms are then folded in segment order (every lane the same fold) and each
 * step fixed up:
 *   forward:  h_t = hl_t + P_t h_in, P_t the product of a' = exp(Δ A)·keep
 *             from the segment's first step to t, h_in the entering state;
 *   backward: g_t = gl_t + Q_t F, g = dL/dh_t, Q_t the product of a' after t
 *             to the segment's end, F the flow into its last state from later.
 * The forward's states (and so its checkpoints) differ from the step-by-step
 * kernels' by rounding; the backward recomputes each segment's states from
 * the checkpoint at its start (segments are whole multiples of B16_SUB). */
#define SPL_TC 64 /* steps a chunk: S segments of SPL_TC / S >= B16_SUB steps */

/* shared: 2 stages of u, delta, z (TC, CH) and B, C (TC, 16) raw; dt_s, du_s
 * (TC, CH); y_s (TC, CH, LPS_PAD); rs_s (TC); fold_s (2, S, CH * 16). */
template <class IO, int CH, bool RESET, int S>
__global__ void __launch_bounds__(S * CH * 16) scan_forward_split_kernel(scan_params p) {
  typedef typename IO::T T;
  constexpr int N = 16, TC = SPL_TC, SEG = SPL_TC / S, NL = CH * 16, NT = S * NL;
  extern __shared__ __align__(16) unsigned char lsm[];
  const size_t stage_elems = 3 * TC * CH + 2 * TC * N;
  float *dt_s = (float *)(lsm + 2 * stage_elems * sizeof(T));
  float *du_s = dt_s + TC * CH;
  float *y_s = du_s + TC * CH;
  float *rs_s = y_s + TC * CH * LPS_PAD;
  float *fold_s = rs_s + TC;

  const int D = p.D, L = p.L, b = blockIdx.y, d0 = blockIdx.x * CH;
  const int g = d0 / (D / p.G);
  const int s = threadIdx.x / NL, l = threadIdx.x % NL, c = l >> 4, n = l & 15, d = d0 + c;
  const bool full = p.out != NULL;
  const T *z = full ? (const T *)p.z : NULL;
  const int nchunks = (L + TC - 1) / TC, nsub = (L + B16_SUB - 1) / B16_SUB;
  const int pc = threadIdx.x % CH;
  const float my_bias = p.dbias ? p.dbias[d0 + pc] : 0.0f;
  const float my_D = p.Dskip ? p.Dskip[d0 + pc] : 0.0f;

  auto issue = [&](int k) {
    if (k < nchunks)
      lps_stage<IO, CH, TC, false>((T *)lsm + (k & 1) * stage_elems, p, b, g, d0, k * TC, min(TC, L - k * TC),
                                   z != NULL, full);
    __pipeline_commit();
  };

  const float a2 = p.A[(int64_t)d * N + n] * LOG2E;
  float h = p.h0 ? p.h0[((int64_t)b * D + d) * N + n] : 0.0f; /* the same in every segment */
  float *ck = p.ck ? p.ck + ((int64_t)b * nsub * D + d) * N + n : NULL;

  issue(0);
  issue(1);
  for (int k = 0; k < nchunks; k++) {
    const int t0 = k * TC, tc = min(TC, L - t0);
    const T *st = (const T *)lsm + (k & 1) * stage_elems;
    const T *u_r = st, *dl_r = st + TC * CH, *z_r = st + 2 * TC * CH;
    const T *B_r = st + 3 * TC * CH, *C_r = B_r + TC * N;
    __pipeline_wait_prior(1);
    __syncthreads();
    for (int i = threadIdx.x; i < tc * CH; i += NT) {
      const float dl = IO::load(dl_r[i]) + my_bias, dt = p.softplus ? softplus_fast(dl) : dl;
      dt_s[i] = dt;
      du_s[i] = dt * IO::load(u_r[i]);
    }
    if (RESET)
      for (int t = threadIdx.x; t < tc; t += NT) rs_s[t] = p.reset[(int64_t)b * L + t0 + t] ? 0.0f : 1.0f;
    __syncthreads();

    /* the segment from a zero state: hl_t, and P_t */
    const int ts = s * SEG, te = min(ts + SEG, tc);
    float hl_r[SEG], P_r[SEG], hl = 0.0f, P = 1.0f;
#pragma unroll
    for (int j = 0; j < SEG; j++) {
      const int t = ts + j;
      if (t < te) {
        const int i = t * CH + c;
        const float a = ex2_ftz(dt_s[i] * a2) * (RESET ? rs_s[t] : 1.0f);
        hl = fmaf(a, hl, du_s[i] * IO::load(B_r[t * N + n]));
        P *= a;
        hl_r[j] = hl;
        P_r[j] = P;
      }
    }
    fold_s[s * NL + l] = P;
    fold_s[(S + s) * NL + l] = hl;
    __syncthreads();
    /* fold the segments in order: this segment's entering state, and the
     * state after the chunk */
    float hin = h;
#pragma unroll
    for (int s2 = 0; s2 < S; s2++) {
      if (s2 == s) hin = h;
      h = fmaf(fold_s[s2 * NL + l], h, fold_s[(S + s2) * NL + l]);
    }
    float prev = hin;
#pragma unroll
    for (int j = 0; j < SEG; j++) {
      const int t = ts + j;
      if (t < te) {
        if (ck && (t0 + t) % B16_SUB == 0) ck[(int64_t)((t0 + t) / B16_SUB) * D * N] = prev;
        const float ht = fmaf(P_r[j], hin, hl_r[j]);
        if (full) y_s[(t * CH + c) * LPS_PAD + n] = IO::load(C_r[t * N + n]) * ht;
        prev = ht;
      }
    }
    __syncthreads();

    if (full) lps_forward_out<IO, CH, NT>(p, y_s, u_r, z ? z_r : NULL, b, t0, tc, d0, my_D);
    if (k + 2 < nchunks) __syncthreads(); /* the slot is refilled */
    issue(k + 2);
  }
  if (p.h_last && s == 0) p.h_last[((int64_t)b * D + d) * N + n] = h;
}

/* shared: 2 stages of u, delta, dout, z (TC, CH) and B, C (TC, 16) raw;
 * dt_s, fac_s, dy_s, du_s (TC, CH); sa_s, sb_s, yp_s (TC, CH, LPS_PAD);
 * bc_s (TC, CH / 2, 32); rs_s (TC); fold_s (2, S, CH * 16); acc_s (2, NT). */
template <class IO, int CH, bool RESET, int S>
__global__ void __launch_bounds__(S * CH * 16) scan_backward_split_kernel(scan_params p) {
  typedef typename IO::T T;
  constexpr int N = 16, TC = SPL_TC, SEG = SPL_TC / S, NL = CH * 16, NT = S * NL, SUB = B16_SUB;
  constexpr int NW = CH / 2; /* warps a segment */
  extern __shared__ __align__(16) unsigned char lsm[];
  const size_t stage_elems = 4 * TC * CH + 2 * TC * N;
  float *dt_s = (float *)(lsm + 2 * stage_elems * sizeof(T));
  float *fac_s = dt_s + TC * CH;
  float *dy_s = fac_s + TC * CH;
  float *du_s = dy_s + TC * CH;
  float *sa_s = du_s + TC * CH;
  float *sb_s = sa_s + TC * CH * LPS_PAD;
  float *yp_s = sb_s + TC * CH * LPS_PAD;
  float *bc_s = yp_s + TC * CH * LPS_PAD;
  float *rs_s = bc_s + TC * NW * 32;
  float *fold_s = rs_s + TC;
  float *acc_s = fold_s + 2 * S * NL;

  const int D = p.D, L = p.L, b = blockIdx.y, blk = blockIdx.x, d0 = blk * CH;
  const int g = d0 / (D / p.G);
  const int s = threadIdx.x / NL, l = threadIdx.x % NL, c = l >> 4, n = l & 15, d = d0 + c;
  const int lane = threadIdx.x & 31, wl = l >> 5;
  const T *z = (const T *)p.z;
  const int nchunks = (L + TC - 1) / TC, nsub = (L + SUB - 1) / SUB;
  const float *ck = p.ck + ((int64_t)b * nsub * D + d) * N + n;
  const int pc = threadIdx.x % CH;
  const float my_bias = p.dbias ? p.dbias[d0 + pc] : 0.0f;
  const float my_D = p.Dskip ? p.Dskip[d0 + pc] : 0.0f;

  auto issue = [&](int k, int m) {
    if (k >= 0)
      lps_stage<IO, CH, TC, true>((T *)lsm + (m & 1) * stage_elems, p, b, g, d0, k * TC, min(TC, L - k * TC),
                                  z != NULL, true);
    __pipeline_commit();
  };

  const float a2 = p.A[(int64_t)d * N + n] * LOG2E;
  /* dh: the flow into the last state of the chunk from later steps (the
   * same in every segment) */
  float dh = p.dh_last ? p.dh_last[((int64_t)b * D + d) * N + n] : 0.0f;
  float dA = 0.0f, dD_acc = 0.0f, ddb_acc = 0.0f;

  issue(nchunks - 1, 0);
  issue(nchunks - 2, 1);
  for (int m = 0; m < nchunks; m++) {
    const int k = nchunks - 1 - m, t0 = k * TC, tc = min(TC, L - t0);
    const T *st = (const T *)lsm + (m & 1) * stage_elems;
    const T *u_r = st, *dl_r = st + TC * CH, *go_r = st + 2 * TC * CH, *z_r = st + 3 * TC * CH;
    const T *B_r = st + 4 * TC * CH, *C_r = B_r + TC * N;
    const int ts = s * SEG, te = min(ts + SEG, tc);
    /* the segment's entering state, from its checkpoint (its latency
     * overlaps the wait and the conversion) */
    const float hin = ts < tc ? ck[(int64_t)((t0 + ts) / SUB) * D * N] : 0.0f;
    __pipeline_wait_prior(1);
    __syncthreads();
    for (int i = threadIdx.x; i < tc * CH; i += NT) {
      float dt;
      delta_terms<true>(IO::load(dl_r[i]) + my_bias, p.softplus, &dt, &fac_s[i]);
      dt_s[i] = dt;
      du_s[i] = dt * IO::load(u_r[i]);
      dy_s[i] = dy_term<true>(IO::load(go_r[i]), z ? IO::load(z_r[i]) : 0.0f, z != NULL);
    }
    if (RESET)
      for (int t = threadIdx.x; t < tc; t += NT) rs_s[t] = p.reset[(int64_t)b * L + t0 + t] ? 0.0f : 1.0f;
    __syncthreads();

    /* the segment's states, as the step-by-step forward computes them */
    float av[SEG], hist[SEG], h = hin;
#pragma unroll
    for (int j = 0; j < SEG; j++) {
      const int t = ts + j;
      if (t < te) {
        const int i = t * CH + c;
        av[j] = ex2_ftz(dt_s[i] * a2);
        h = fmaf(av[j], RESET ? h * rs_s[t] : h, du_s[i] * IO::load(B_r[t * N + n]));
        hist[j] = h;
        if (z) yp_s[i * LPS_PAD + n] = IO::load(C_r[t * N + n]) * h;
      }
    }
    /* the reverse from a zero flow: gl_t, and Q_t */
    float gl[SEG], Q[SEG], fl = 0.0f, q = 1.0f;
#pragma unroll
    for (int j = SEG - 1; j >= 0; j--) {
      const int t = ts + j;
      if (t < te) {
        gl[j] = fmaf(IO::load(C_r[t * N + n]), dy_s[t * CH + c], fl);
        Q[j] = q;
        const float ak = RESET ? av[j] * rs_s[t] : av[j];
        fl = gl[j] * ak;
        q *= ak;
      }
    }
    fold_s[s * NL + l] = q;
    fold_s[(S + s) * NL + l] = fl;
    __syncthreads();
    /* fold from the last segment: the flow into this segment's last state,
     * and the flow out of the chunk */
    float F = dh;
#pragma unroll
    for (int s2 = S - 1; s2 >= 0; s2--) {
      if (s2 == s) F = dh;
      dh = fmaf(fold_s[s2 * NL + l], dh, fold_s[(S + s2) * NL + l]);
    }
    const bool hi = lane >= 16;
#pragma unroll
    for (int j = 0; j < SEG; j++) {
      const int t = ts + j;
      if (t < te) {
        const int i = t * CH + c;
        const float keep = RESET ? rs_s[t] : 1.0f, gy = dy_s[i];
        const float hprev = (j > 0 ? hist[j > 0 ? j - 1 : 0] : hin) * keep;
        const float g_h = fmaf(Q[j], F, gl[j]);
        const float gha = g_h * av[j] * hprev;
        dA = fmaf(dt_s[i], gha, dA);
        sa_s[i * LPS_PAD + n] = a2 * gha;
        sb_s[i * LPS_PAD + n] = g_h * IO::load(B_r[t * N + n]);
        const float vb = g_h * du_s[i], vc = gy * hist[j];
        const float sum = (hi ? vc : vb) + __shfl_xor_sync(0xffffffffu, hi ? vb : vc, 16);
        bc_s[(t * NW + wl) * 32 + lane] = sum;
      }
    }
    __syncthreads();

    lps_backward_sums<IO, CH, NT>(p, sa_s, sb_s, yp_s, bc_s, dt_s, dy_s, fac_s, u_r, go_r, z ? z_r : NULL, b, t0,
                                  tc, d0, blk, my_D, dD_acc, ddb_acc);
    if (k >= 2) __syncthreads(); /* the slot is refilled */
    issue(k - 2, m);
  }

  /* dA over the segments, in segment order; dD and dbias over the NT / CH
   * threads of each channel, in thread order */
  acc_s[threadIdx.x] = dA;
  __syncthreads();
  if (s == 0) {
    float t = 0.0f;
    for (int s2 = 0; s2 < S; s2++) t += acc_s[s2 * NL + l];
    p.dA_part[((int64_t)b * D + d) * N + n] = t;
    if (p.dh0) p.dh0[((int64_t)b * D + d) * N + n] = dh;
  }
  __syncthreads();
  acc_s[threadIdx.x] = dD_acc;
  acc_s[NT + threadIdx.x] = ddb_acc;
  __syncthreads();
  if (threadIdx.x < CH) {
    float sd = 0.0f, sbias = 0.0f;
    for (int r = 0; r < NT / CH; r++) {
      sd += acc_s[r * CH + threadIdx.x];
      sbias += acc_s[NT + r * CH + threadIdx.x];
    }
    p.dD_part[(int64_t)b * D + d0 + threadIdx.x] = sd;
    p.ddb_part[(int64_t)b * D + d0 + threadIdx.x] = sbias;
  }
}

/* ---- launchers ------------------------------------------------------------ */

static size_t lps_forward_smem(int CH, size_t es, int split) {
  if (split) { /* split = S, the segments a chunk */
    const size_t TC = SPL_TC, NL = (size_t)CH * 16;
    return 2 * (3 * TC * CH + 2 * TC * 16) * es +
           sizeof(float) * (2 * TC * CH + TC * CH * LPS_PAD + TC + 2 * split * NL);
  }
  const size_t TC = LPS_TC;
  return LPS_NSTAGE * (3 * TC * CH + 2 * TC * 16) * es + sizeof(float) * (2 * TC * CH + TC * CH * LPS_PAD + TC);
}

static size_t lps_backward_smem(int CH, size_t es, int split) {
  if (split) {
    const size_t TC = SPL_TC, NL = (size_t)CH * 16;
    return 2 * (4 * TC * CH + 2 * TC * 16) * es +
           sizeof(float) * (4 * TC * CH + 3 * TC * CH * LPS_PAD + TC * (CH / 2) * 32 + TC + 2 * split * NL +
                            2 * split * NL);
  }
  const size_t TC = LPS_TC;
  return LPS_NSTAGE * (4 * TC * CH + 2 * TC * 16) * es +
         sizeof(float) * (4 * TC * CH + 3 * TC * CH * LPS_PAD + TC * (CH / 2) * 32 + TC + 2 * CH * 16);
}

/* The rule, from device times on the H200 at D = 512, L = 60 (forward /
 * forward+backward us; bench/results/scan_split_harness_*.txt):
 *   batch       1            2            4            8            32
 *   split   5.8 / 17.5   6.3 / 25.4   8.0 / 34.3  12.2 / 52.3  35.7 / 169
 *   lps     8.9 / 30.3   9.1 / 36.9   9.7 / 38.7  10.8 / 43.4  25.6 / 121
 *   lane4  10.8 / 40.1  10.8 / 46.6  11.0 / 47.0  11.3 / 47.6  16.5 / 67.6
 * and at (8, 4096) lps 410 / 1711 against lane4 418 / 1993 (split 464 /
 * 2265): the time split up to B * D = 2048, a lane per state up to 4096.
 * Split into 8 segments of 8 steps instead of 4 of 16: 5.5 / 16.8 at batch
 * 1, 6.8 / 29.8 at batch 2: 8 up to B * D = 512. */
#define SPLIT_MAX_BD 2048
#define SPLIT8_MAX_BD 512

static size_t lps_backward_smem(int CH, size_t es, int split);

int scan_lps_wanted(const scan_params &p, int io, const mx_cuda_dev *d) {
  const char *o = getenv("MAMBEX_SCAN_KERNEL");
  int kind;
  if (o && strcmp(o, "split") == 0) kind = 2;
  else if (o && strcmp(o, "lps") == 0) kind = 1;
  else if (o && strcmp(o, "lane4") == 0) kind = 0;
  else {
    const int64_t bd = (int64_t)p.B * p.D;
    kind = bd <= SPLIT_MAX_BD ? 2 : bd <= 4096 ? 1 : 0;
  }
  /* the time split's backward needs the most shared memory (170 KB for
   * 16-bit io): where the device has less, a lane per state, for the
   * forward too (so either direction sees the same checkpoints) */
  if (kind == 2) {
    const int ch = io == MX_F32 ? 4 : 8;
    if (lps_backward_smem(ch, mx_dtype_size(io), ch == 4 ? scan_lps_split(p) : 4) > (size_t)d->smem_optin) kind = 1;
  }
  return kind;
}

int scan_lps_split(const scan_params &p) { return (int64_t)p.B * p.D <= SPLIT8_MAX_BD ? 8 : 4; }

/* At least 16 bytes a staged row (4 f32 or 8 16-bit channels); the
 * time-split kernels take exactly that (their blocks are 4x larger), the
 * others as many as keep two blocks per SM busy, at most 16 (8 for the
 * backward, whose shared memory grows with CH). D / G is a multiple of 32
 * (the fast-path condition), so every choice divides it. */
int scan_lps_channels(const scan_params &p, int io, int backward, int sm_count) {
  const int min_ch = io == MX_F32 ? 4 : 8;
  if (p.split) return min_ch;
  int ch = backward ? 8 : 16;
  while (ch > min_ch && (int64_t)p.B * (p.D / ch) < 2LL * sm_count) ch >>= 1;
  return ch;
}

template <class K>
static int lps_launch(K kern, const scan_params &p, int threads, size_t smem, mx_cuda_dev *d, mx_err *err,
                      const char *name) {
  if (smem > 48 * 1024) {
    int rc = MX_CUDA_CALL(d, err, cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    if (rc != MX_OK) return rc;
  }
  kern<<<dim3((unsigned)(p.D / p.CH), (unsigned)p.B), threads, smem, d->stream>>>(p);
  return mx_cuda_check(cudaGetLastError(), d->index, err, name, __FILE__, __LINE__);
}

/* The segments a chunk of the time-split kernels: p.split (8 or 4) where
 * the block stays at 512 threads, else 4; 0 for the other kernels. */
static int split_segments(const scan_params &p, int CH) { return p.split == 8 && CH == 4 ? 8 : p.split ? 4 : 0; }

template <class IO, int CH, bool RESET>
static int lps_forward_launch(const scan_params &p, mx_cuda_dev *d, mx_err *err) {
  const size_t smem = lps_forward_smem(CH, sizeof(typename IO::T), split_segments(p, CH));
  if constexpr (CH == 4) {
    if (p.split == 8)
      return lps_launch(scan_forward_split_kernel<IO, CH, RESET, 8>, p, 8 * CH * 16, smem, d, err,
                        "scan_forward_split_kernel launch");
  }
  if constexpr (CH <= 8) {
    if (p.split)
      return lps_launch(scan_forward_split_kernel<IO, CH, RESET, 4>, p, 4 * CH * 16, smem, d, err,
                        "scan_forward_split_kernel launch");
  }
  return lps_launch(scan_forward_lps_kernel<IO, CH, RESET>, p, CH * 16, smem, d, err, "scan_forward_lps_kernel launch");
}

template <class IO, int CH, bool RESET>
static int lps_backward_launch(const scan_params &p, mx_cuda_dev *d, mx_err *err) {
  const size_t smem = lps_backward_smem(CH, sizeof(typename IO::T), split_segments(p, CH));
  if constexpr (CH == 4) {
    if (p.split == 8)
      return lps_launch(scan_backward_split_kernel<IO, CH, RESET, 8>, p, 8 * CH * 16, smem, d, err,
                        "scan_backward_split_kernel launch");
  }
  if constexpr (CH <= 8) {
    if (p.split)
      return lps_launch(scan_backward_split_kernel<IO, CH, RESET, 4>, p, 4 * CH * 16, smem, d, err,
                        "scan_backward_split_kernel launch");
  }
  return lps_launch(scan_backward_lps_kernel<IO, CH, RESET>, p, CH * 16, smem, d, err,
                    "scan_backward_lps_kernel launch");
}

template <class IO, bool RESET>
static int lps_forward_ch(const scan_params &p, mx_cuda_dev *d, mx_err *err) {
  switch (p.CH) {
    case 4:
      if constexpr (sizeof(typename IO::T) == 4) return lps_forward_launch<IO, 4, RESET>(p, d, err);
      break;
    case 8: return lps_forward_launch<IO, 8, RESET>(p, d, err);
    case 16:
      if (!p.split) return lps_forward_launch<IO, 16, RESET>(p, d, err);
      break;
  }
  return mx_cuda_fail(err, MX_E_ARG, "scan: no lane-per-state forward for %d channels a block", p.CH);
}
template <class IO, bool RESET>
static int lps_backward_ch(const scan_params &p, mx_cuda_dev *d, mx_err *err) {
  switch (p.CH) {
    case 4:
      if constexpr (sizeof(typename IO::T) == 4) return lps_backward_launch<IO, 4, RESET>(p, d, err);
      break;
    case 8: return lps_backward_launch<IO, 8, RESET>(p, d, err);
  }
  return mx_cuda_fail(err, MX_E_ARG, "scan: no lane-per-state backward for %d channels a block", p.CH);
}

template <class IO>
static int lps_forward_io(const scan_params &p, mx_cuda_dev *d, mx_err *err) {
  return p.reset ? lps_forward_ch<IO, true>(p, d, err) : lps_forward_ch<IO, false>(p, d, err);
}

template <class IO>
static int lps_backward_io(const scan_params &p, mx_cuda_dev *d, mx_err *err) {
  if (!p.ck_given) {
    /* the checkpoints first, by the forward in checkpoint-only mode */
    scan_params f = p;
    f.out = NULL;
    f.h_last = NULL;
    f.CH = scan_lps_channels(p, sizeof(typename IO::T) == 4 ? MX_F32 : MX_BF16, 0, d->sm_count);
    int rc = lps_forward_io<IO>(f, d, err);
    if (rc != MX_OK) return rc;
  }
  return p.reset ? lps_backward_ch<IO, true>(p, d, err) : lps_backward_ch<IO, false>(p, d, err);
}

int scan_lps_forward(const scan_params &p, int io, mx_cuda_dev *d, mx_err *err) {
  switch (io) {
    case MX_F32: return lps_forward_io<mx_t_f32>(p, d, err);
    case MX_BF16: return lps_forward_io<mx_t_bf16>(p, d, err);
    default: return lps_forward_io<mx_t_f16>(p, d, err);
  }
}

int scan_lps_backward(const scan_params &p, int io, mx_cuda_dev *d, mx_err *err) {
  switch (io) {
    case MX_F32: return lps_backward_io<mx_t_f32>(p, d, err);
    case MX_BF16: return lps_backward_io<mx_t_bf16>(p, d, err);
    default: return lps_backward_io<mx_t_f16>(p, d, err);
  }
}

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
 * cp.async ring, as many chunks ahead. Per chunk: Δ (bias, softplus), Δ·u and the other
 * per-(t, d) terms are made once per (t, d) into shared memory; the lanes run
 * the steps and leave their per-state terms in shared memory; then one
 * thread per (t, d) adds the 16 states' terms (the output, du, dδ, dz) and
 * one thread per (t, n) adds the block's channels for dB and dC. Every sum
 * runs in a fixed order, so results are bit-identical from run to run.
 *
 * Checkpoints: the state entering every B16_SUB-th step, (B, nsub, D, N),
 * the layout of scan.cu's fast forward, and the same bits (the same
 * per-state arithmetic), so a context saved by either forward serves either
 * backward. The backward writes scan.cu's partials: dA (B, D, N), dD and
 * dbias (B, D), dB and dC (B, D / CH, L, N), reduced by scan.cu's kernels.
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
  const T *u = (const T *)p.u, *delta = (const T *)p.delta, *z = full ? (const T *)p.z : NULL;
  const T *Bm = (const T *)p.Bm, *Cm = (const T *)p.Cm;
  const int nchunks = (L + TC - 1) / TC, nsub = (L + B16_SUB - 1) / B16_SUB;
  /* the (t, d) loops stride by NT, a multiple of CH: a thread always sees
   * channel d0 + threadIdx.x % CH there */
  const int pc = threadIdx.x % CH;
  const float my_bias = p.dbias ? p.dbias[d0 + pc] : 0.0f;
  const float my_D = p.Dskip ? p.Dskip[d0 + pc] : 0.0f;

  auto issue = [&](int k) {
    if (k < nchunks) {
      const int t0 = k * TC, tc = min(TC, L - t0);
      T *st = (T *)lsm + (k % LPS_NSTAGE) * stage_elems;
      const int64_t row = ((int64_t)b * L + t0) * D + d0, rs = (int64_t)D * sizeof(T);
      const int64_t brow = (((int64_t)b * L + t0) * p.G + g) * N, bs = (int64_t)p.G * N * sizeof(T);
      stage_rows<CH * sizeof(T)>(st, u + row, rs, tc);
      stage_rows<CH * sizeof(T)>(st + TC * CH, delta + row, rs, tc);
      if (z) stage_rows<CH * sizeof(T)>(st + 2 * TC * CH, z + row, rs, tc);
      stage_rows<N * sizeof(T)>(st + 3 * TC * CH, Bm + brow, bs, tc);
      if (full) stage_rows<N * sizeof(T)>(st + 3 * TC * CH + TC * N, Cm + brow, bs, tc);
    }
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

    if (full) {
      for (int i = threadIdx.x; i < tc * CH; i += NT) {
        const float *r = y_s + i * LPS_PAD;
        float s[4];
#pragma unroll
        for (int q = 0; q < 4; q++) s[q] = (r[4 * q] + r[4 * q + 1]) + (r[4 * q + 2] + r[4 * q + 3]);
        float y = (s[0] + s[1]) + (s[2] + s[3]);
        y = fmaf(my_D, IO::load(u_r[i]), y);
        if (z) {
          const float zz = IO::load(z_r[i]);
          y *= zz * sigmoid_fast(zz);
        }
        const int t = i / CH;
        ((T *)p.out)[((int64_t)b * L + t0 + t) * D + d0 + pc] = IO::store(y);
      }
    }
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

  const int D = p.D, L = p.L, b = blockIdx.y, blk = blockIdx.x, d0 = blk * CH, nblk = D / CH;
  const int g = d0 / (D / p.G);
  const int c = threadIdx.x >> 4, n = threadIdx.x & 15, d = d0 + c;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T *u = (const T *)p.u, *delta = (const T *)p.delta, *z = (const T *)p.z;
  const T *Bm = (const T *)p.Bm, *Cm = (const T *)p.Cm, *dout = (const T *)p.dout;
  const int nchunks = (L + TC - 1) / TC, nsub = (L + SUB - 1) / SUB;
  const float *ck = p.ck + ((int64_t)b * nsub * D + d) * N + n;
  const int pc = threadIdx.x % CH; /* the channel of the (t, d) loops */
  const float my_bias = p.dbias ? p.dbias[d0 + pc] : 0.0f;
  const float my_D = p.Dskip ? p.Dskip[d0 + pc] : 0.0f;

  auto issue = [&](int k, int m) {
    if (k >= 0) {
      const int t0 = k * TC, tc = min(TC, L - t0);
      T *st = (T *)lsm + (m % LPS_NSTAGE) * stage_elems;
      const int64_t row = ((int64_t)b * L + t0) * D + d0, rs = (int64_t)D * sizeof(T);
      const int64_t brow = (((int64_t)b * L + t0) * p.G + g) * N, bs = (int64_t)p.G * N * sizeof(T);
      stage_rows<CH * sizeof(T)>(st, u + row, rs, tc);
      stage_rows<CH * sizeof(T)>(st + TC * CH, delta + row, rs, tc);
      stage_rows<CH * sizeof(T)>(st + 2 * TC * CH, dout + row, rs, tc);
      if (z) stage_rows<CH * sizeof(T)>(st + 3 * TC * CH, z + row, rs, tc);
      stage_rows<N * sizeof(T)>(st + 4 * TC * CH, Bm + brow, bs, tc);
      stage_rows<N * sizeof(T)>(st + 4 * TC * CH + TC * N, Cm + brow, bs, tc);
    }
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

    /* per (t, d): sums over the 16 states, then du, dδ, dz */
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
      if (z) {
        const float *ry = yp_s + i * LPS_PAD;
#pragma unroll
        for (int q = 0; q < 16; q++) yp += ry[q];
        yp = fmaf(my_D, uu, yp);
        go = IO::load(go_r[i]);
        zz = IO::load(z_r[i]);
      }
      const int t = i / CH;
      store_grads_td<IO, true>(p, ((int64_t)b * L + t0 + t) * D + d0 + pc, fmaf(my_D, gy, dt_s[i] * sb),
                               ddl, yp, go, zz);
      dD_acc = fmaf(gy, uu, dD_acc);
      ddb_acc += ddl;
    }
    /* per (t, n): dB and dC over the block's channels (warp pairs in order) */
    for (int i = threadIdx.x; i < tc * 32; i += NT) {
      const int t = i >> 5, slot = i & 31;
      float s = 0.0f;
#pragma unroll
      for (int w = 0; w < NW; w++) s += bc_s[(t * NW + w) * 32 + slot];
      float *dst = slot < N ? p.dB_part : p.dC_part;
      if (dst) dst[(((int64_t)b * nblk + blk) * L + t0 + t) * N + (slot & 15)] = s;
    }
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

/* ---- launchers ------------------------------------------------------------ */

static size_t lps_forward_smem(int CH, size_t es) {
  const size_t TC = LPS_TC;
  return LPS_NSTAGE * (3 * TC * CH + 2 * TC * 16) * es + sizeof(float) * (2 * TC * CH + TC * CH * LPS_PAD + TC);
}

static size_t lps_backward_smem(int CH, size_t es) {
  const size_t TC = LPS_TC;
  return LPS_NSTAGE * (4 * TC * CH + 2 * TC * 16) * es +
         sizeof(float) * (4 * TC * CH + 3 * TC * CH * LPS_PAD + TC * (CH / 2) * 32 + TC + 2 * CH * 16);
}

/* Measured on the H200 (bench/results/scan_lps_*.txt): the lane-per-state
 * kernels win at the latency-bound sizes, B * D up to 4096 (batch 1: 8.6 /
 * 29.1 us forward / forward+backward against 10.9 / 40.0; (8, 4096): 1709
 * against 2075 us forward+backward), and lose 1.5-2x at B * D >= 16384. */
int scan_lps_wanted(const scan_params &p) {
  const char *o = getenv("MAMBEX_SCAN_KERNEL");
  if (o && strcmp(o, "lps") == 0) return 1;
  if (o && strcmp(o, "lane4") == 0) return 0;
  return (int64_t)p.B * p.D <= 4096;
}

/* At least 16 bytes a staged row (4 f32 or 8 16-bit channels), then as many
 * as keep two blocks per SM busy, at most 16 (8 for the backward, whose
 * shared memory grows with CH). D / G is a multiple of 32 (the fast-path
 * condition), so every choice divides it. */
int scan_lps_channels(const scan_params &p, int io, int backward, int sm_count) {
  const int min_ch = io == MX_F32 ? 4 : 8;
  int ch = backward ? 8 : 16;
  while (ch > min_ch && (int64_t)p.B * (p.D / ch) < 2LL * sm_count) ch >>= 1;
  return ch;
}

template <class IO, int CH, bool RESET>
static int lps_forward_launch(const scan_params &p, mx_cuda_dev *d, mx_err *err) {
  const size_t smem = lps_forward_smem(CH, sizeof(typename IO::T));
  auto kern = scan_forward_lps_kernel<IO, CH, RESET>;
  if (smem > 48 * 1024) {
    int rc = MX_CUDA_CALL(d, err, cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    if (rc != MX_OK) return rc;
  }
  kern<<<dim3((unsigned)(p.D / CH), (unsigned)p.B), CH * 16, smem, d->stream>>>(p);
  return MX_CUDA_LAUNCH_RC(d, err, "scan_forward_lps_kernel");
}

template <class IO, int CH, bool RESET>
static int lps_backward_launch(const scan_params &p, mx_cuda_dev *d, mx_err *err) {
  const size_t smem = lps_backward_smem(CH, sizeof(typename IO::T));
  auto kern = scan_backward_lps_kernel<IO, CH, RESET>;
  int rc = MX_CUDA_CALL(d, err, cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  if (rc != MX_OK) return rc;
  kern<<<dim3((unsigned)(p.D / CH), (unsigned)p.B), CH * 16, smem, d->stream>>>(p);
  return MX_CUDA_LAUNCH_RC(d, err, "scan_backward_lps_kernel");
}

template <class IO, bool RESET>
static int lps_forward_ch(const scan_params &p, mx_cuda_dev *d, mx_err *err) {
  switch (p.CH) {
    case 4:
      if constexpr (sizeof(typename IO::T) == 4) return lps_forward_launch<IO, 4, RESET>(p, d, err);
      break;
    case 8: return lps_forward_launch<IO, 8, RESET>(p, d, err);
    case 16: return lps_forward_launch<IO, 16, RESET>(p, d, err);
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

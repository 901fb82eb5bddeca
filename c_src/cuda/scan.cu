/*
 * scan.cu: the Mamba-1 selective scan on CUDA, forward and backward.
 *
 * Layout (batch, length, channels): u, delta, z, out (B, L, D); B and C
 * (B, L, G, N); A (D, N); D and delta_bias (D); states (B, D, N). io tensors
 * are f32, bf16 or f16; everything is computed and carried in fp32.
 *
 * Two sets of kernels:
 *   - generic (any N <= 256, any G, any alignment): one thread block per
 *     (batch b, block of CH channels of one group); LPC consecutive lanes
 *     share a channel, each owning NPT strided states (n = lane + k * LPC).
 *     Time runs sequentially in chunks of TC steps: the block stages a
 *     chunk's inputs in shared memory with coalesced loads (softplus once
 *     per (t, d)), every lane advances its states through the chunk, the
 *     outputs leave through shared memory with coalesced stores.
 *   - N = 16 fast path (scan_forward16_kernel, scan_backward16_kernel; used
 *     when D / G is a multiple of 32 and the io rows are 16-byte aligned):
 *     blocks of 128 threads, lanes owning contiguous states, inputs
 *     streamed by cp.async through a two-stage ring two chunks ahead. The
 *     forward can write the state every B16_SUB steps (checkpoints, kept by
 *     the caller between forward and backward); the backward then skips its
 *     own forward pass. See the comments above each kernel.
 * Sums over states use warp shuffles within the lanes of a channel.
 * The same N = 16 shapes at small B * D go to the lane-per-state kernels of
 * scan_lps.cu (one state a lane; time-split in 64-step chunks for the
 * smallest), chosen by scan_lps_wanted; they share this file's checkpoint
 * layout, partial sums and reduction kernels, and the launchers below. At
 * batch 1 the N = 16 backwards write dA, dD and dbias directly (nothing to
 * add over the batch).
 *
 * Gradient convention (dL/dx written dx). With Δ_t = softplus(δ_t + bias)
 * (or δ_t + bias), a_t = exp(Δ_t A), y_t = Σ_n C_t h_t + D u_t and
 * out_t = y_t silu(z_t):
 *   dy_t = dout_t silu(z_t);  dz_t = dout_t y_t silu'(z_t)
 *   dh_t = dh_{t+1} a_{t+1} + C_t dy_t            (dh_L = d_final_state)
 *   dh_t flows into h_{t-1} as dh_t a_t, except where reset_t is set
 *   dA    += dh_t Δ_t a_t h_{t-1}
 *   dΔ_t   = Σ_n dh_t (A a_t h_{t-1} + B_t u_t)
 *   dδ_t   = dΔ_t softplus'(δ_t + bias) = dΔ_t sigmoid(δ_t + bias)  (1 above 20)
 *   dB_t  += dh_t Δ_t u_t   (summed over the channels of a group)
 *   dC_t  += dy_t h_t       (likewise)
 *   du_t   = Σ_n dh_t Δ_t B_t + D dy_t;  dD += dy_t u_t;  dbias += dδ_t
 *   dh0    = the flow into h_{-1} (0 where reset_0 is set)
 *
 * Determinism: no atomics. Sums over channels (dB, dC) and over the batch
 * (dA, dD, dbias) are written as per-block partials and reduced in a fixed
 * order by a second kernel (one launch for dB and dC, one for each batch
 * sum), so results are bit-identical from run to run.
 *
 * Memory and lifetimes: the backward recomputes the states piece by piece
 * from checkpoints (the state at every piece start), either given by the
 * caller (args->ckpt, written by the forward) or made by its own first pass
 * in scratch from the stream-ordered pool; scratch and partial sums are
 * freed with cudaFreeAsync right after the launches that use them (stream
 * order makes that safe). Launchers hold the device's enqueue mutex only
 * while enqueueing and never synchronise.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_pipeline.h>
#include <type_traits>

#include "cuda_dtypes.cuh"
#include "cuda_ops.h"
#include "scan_common.cuh"


/* Sum over the LPC lanes of a channel (xor butterfly: every lane gets the
 * same bits). */
template <int LPC>
static __device__ __forceinline__ float lane_sum(float v, unsigned mask) {
#pragma unroll
  for (int o = LPC / 2; o > 0; o >>= 1) v += __shfl_xor_sync(mask, v, o, LPC);
  return v;
}

static __device__ __forceinline__ unsigned warp_mask(void) {
  int live = (int)blockDim.x - (int)(threadIdx.x & ~31u);
  return live >= 32 ? 0xffffffffu : ((1u << live) - 1u);
}

/* ---- forward --------------------------------------------------------------
 * grid (D / CH, B), block CH * LPC threads (LPC lanes per channel, NPT states
 * per lane). Chunks of TC steps are software-pipelined: the global loads of
 * chunk k + 1 are issued into registers (pre) before chunk k is computed,
 * and written to shared memory (converted, bias and softplus applied) after.
 * Lanes write partial sums over their states to ys_s; the store phase adds
 * the LPC partials of a channel, applies D·u and the gate, and writes out
 * coalesced. shared: u_s, dt_s (TC, CH); ys_s (TC, CH, LPC); B_s, C_s (TC, N);
 * rs_s (TC). PRE = per-thread prefetch slots = ceil(TC * CH / threads). */
template <class IO, int NPT, int LPC, int TC, int PRE>
__global__ void __launch_bounds__(256) scan_forward_kernel(scan_params p) {
  typedef typename IO::T T;
  extern __shared__ float smem[];
  const int CH = p.CH, N = p.N, D = p.D, L = p.L;
  float *u_s = smem;                  // (TC, CH)
  float *dt_s = u_s + TC * CH;        // (TC, CH)
  float *ys_s = dt_s + TC * CH;       // (TC, CH, LPC)
  float *B_s = ys_s + TC * CH * LPC;  // (TC, N)
  float *C_s = B_s + TC * N;          // (TC, N)
  float *rs_s = C_s + TC * N;         // (TC)

  const int b = blockIdx.y, d0 = blockIdx.x * CH, nthr = blockDim.x;
  const int g = d0 / (D / p.G);
  const int c = threadIdx.x / LPC, j = threadIdx.x % LPC, d = d0 + c;
  const T *u = (const T *)p.u, *delta = (const T *)p.delta;
  const T *Bm = (const T *)p.Bm, *Cm = (const T *)p.Cm, *z = (const T *)p.z;
  T *out = (T *)p.out;

  float a2[NPT], h[NPT];
#pragma unroll
  for (int k = 0; k < NPT; k++) {
    int n = j + k * LPC;
    a2[k] = n < N ? p.A[(int64_t)d * N + n] * LOG2E : 0.0f;
    h[k] = (n < N && p.h0) ? p.h0[((int64_t)b * D + d) * N + n] : 0.0f;
  }

  /* prefetch registers: raw u and delta of (t, cc) = slot i, B and C */
  const int PREBC = 4; /* B, C slots prefetched; any beyond are loaded at commit */
  T pu[PRE], pd[PRE], pb[PREBC], pc[PREBC];
  auto prefetch = [&](int t0) {
    const int tc = min(TC, L - t0);
#pragma unroll
    for (int r = 0; r < PRE; r++) {
      int i = threadIdx.x + r * nthr, t = i / CH, cc = i % CH;
      if (t < tc) {
        int64_t gi = ((int64_t)b * L + t0 + t) * D + d0 + cc;
        pu[r] = u[gi];
        pd[r] = delta[gi];
      }
    }
#pragma unroll
    for (int r = 0; r < PREBC; r++) {
      int i = threadIdx.x + r * nthr, t = i / N, n = i % N;
      if (t < tc) {
        int64_t gi = (((int64_t)b * L + t0 + t) * p.G + g) * N + n;
        pb[r] = Bm[gi];
        pc[r] = Cm[gi];
      }
    }
  };
  auto commit = [&](int t0) {
    const int tc = min(TC, L - t0);
#pragma unroll
    for (int r = 0; r < PRE; r++) {
      int i = threadIdx.x + r * nthr, t = i / CH, cc = i % CH;
      if (t < tc) {
        float dl = IO::load(pd[r]) + (p.dbias ? p.dbias[d0 + cc] : 0.0f);
        u_s[i] = IO::load(pu[r]);
        dt_s[i] = p.softplus ? softplus_f(dl) : dl;
      }
    }
#pragma unroll
    for (int r = 0; r < PREBC; r++) {
      int i = threadIdx.x + r * nthr;
      if (i < tc * N) {
        B_s[i] = IO::load(pb[r]);
        C_s[i] = IO::load(pc[r]);
      }
    }
    for (int i = threadIdx.x + PREBC * nthr; i < tc * N; i += nthr) {
      int t = i / N, n = i % N;
      int64_t gi = (((int64_t)b * L + t0 + t) * p.G + g) * N + n;
      B_s[i] = IO::load(Bm[gi]);
      C_s[i] = IO::load(Cm[gi]);
    }
    for (int t = threadIdx.x; t < tc; t += nthr)
      rs_s[t] = (p.reset && p.reset[(int64_t)b * L + t0 + t]) ? 0.0f : 1.0f;
  };

  prefetch(0);
  for (int t0 = 0; t0 < L; t0 += TC) {
    const int tc = min(TC, L - t0);
    commit(t0);
    __syncthreads();
    if (t0 + TC < L) prefetch(t0 + TC); /* in flight while this chunk runs */

    for (int t = 0; t < tc; t++) {
      const float dt = dt_s[t * CH + c], du = dt * u_s[t * CH + c], keep = rs_s[t];
      float acc = 0.0f;
#pragma unroll
      for (int k = 0; k < NPT; k++) {
        int n = j + k * LPC;
        if (n < N) {
          float a = exp2f(dt * a2[k]);
          h[k] = fmaf(a, h[k] * keep, du * B_s[t * N + n]);
          acc = fmaf(C_s[t * N + n], h[k], acc);
        }
      }
      ys_s[(t * CH + c) * LPC + j] = acc;
    }
    __syncthreads();

    /* sum the lane partials, skip term, gate, store */
    for (int i = threadIdx.x; i < tc * CH; i += nthr) {
      int t = i / CH, cc = i % CH;
      int64_t gi = ((int64_t)b * L + t0 + t) * D + d0 + cc;
      float y = 0.0f;
#pragma unroll
      for (int l = 0; l < LPC; l++) y += ys_s[i * LPC + l];
      if (p.Dskip) y = fmaf(p.Dskip[d0 + cc], u_s[i], y);
      if (z) {
        float zz = IO::load(z[gi]);
        y *= zz * sigmoid_f(zz);
      }
      out[gi] = IO::store(y);
    }
    __syncthreads(); /* u_s and ys_s are rewritten by the next chunk */
  }
#pragma unroll
  for (int k = 0; k < NPT; k++) {
    int n = j + k * LPC;
    if (n < N) p.h_last[((int64_t)b * D + d) * N + n] = h[k];
  }
}


/* ---- forward, N = 16 fast path -----------------------------------------------
 * Block = 32 channels x 4 lanes; lane j owns the contiguous states 4j..4j+3
 * (so B and C are read as one 16-byte vector per step). Chunks of TC steps
 * stream into a two-stage ring of shared buffers with cp.async, two chunks
 * ahead of the compute: global latency is paid once per launch, not per
 * chunk. Per chunk: wait for the stage; turn raw delta into Δ once per
 * (t, d) (bias, softplus) into dt_s; run the TC steps (sums over states by
 * two shuffles); add D·u, gate with z and store, coalesced; refill the stage.
 * Requires D / G % 32 == 0 and 16-byte aligned tensors (checked by the
 * launcher). shared: per stage u, delta, z (TC, 32) and B, C (TC, 16) raw;
 * dt_s, y_s (TC, 32) floats; rs_s (TC). */
#define F16_CH 32

/* LPC lanes per channel (4, 2 or 1), each owning NPT = 16 / LPC contiguous
 * states; CH = 128 / LPC channels per block of 128 threads. RESET: whether a
 * reset tensor was given (without one the state is never multiplied by the
 * keep flag). */
template <class IO, int TC, int LPC, bool RESET>
__global__ void __launch_bounds__(128) scan_forward16_kernel(scan_params p) {
  typedef typename IO::T T;
  constexpr int CH = 128 / LPC, N = 16, NPT = 16 / LPC;
  extern __shared__ __align__(16) unsigned char fsm[];
  const int D = p.D, L = p.L;
  const size_t es = sizeof(T);
  /* stage layout: u, delta, z (TC*CH each), B, C (TC*N each), raw T */
  const size_t stage_elems = 3 * TC * CH + 2 * TC * N;
  float *dt_s = (float *)(fsm + 2 * stage_elems * es);
  float *y_s = dt_s + TC * CH;
  float *rs_s = y_s + TC * CH;

  const int b = blockIdx.y, d0 = blockIdx.x * CH;
  const int g = d0 / (D / p.G);
  const int c = threadIdx.x / LPC, j = threadIdx.x % LPC, d = d0 + c;
  const T *u = (const T *)p.u, *delta = (const T *)p.delta, *z = (const T *)p.z;
  const T *Bm = (const T *)p.Bm, *Cm = (const T *)p.Cm;
  T *out = (T *)p.out;
  const int nchunks = (L + TC - 1) / TC, nsub = (L + B16_SUB - 1) / B16_SUB;
  /* the phase loops below stride by 128, a multiple of CH: each thread
   * always sees channel d0 + threadIdx.x % CH there */
  const float my_bias = p.dbias ? p.dbias[d0 + threadIdx.x % CH] : 0.0f;
  const float my_D = p.Dskip ? p.Dskip[d0 + threadIdx.x % CH] : 0.0f;

  /* issue the cp.async copies of chunk k into stage k % 2 (one group) */
  auto issue = [&](int k) {
    if (k < nchunks) {
      const int t0 = k * TC, tc = min(TC, L - t0);
      T *st = (T *)fsm + (k & 1) * stage_elems;
      const int64_t row = ((int64_t)b * L + t0) * D + d0, rs = (int64_t)D * sizeof(T);
      const int64_t brow = (((int64_t)b * L + t0) * p.G + g) * N, bs = (int64_t)p.G * N * sizeof(T);
      stage_rows<CH * sizeof(T)>(st, u + row, rs, tc);
      stage_rows<CH * sizeof(T)>(st + TC * CH, delta + row, rs, tc);
      if (z) stage_rows<CH * sizeof(T)>(st + 2 * TC * CH, z + row, rs, tc);
      stage_rows<N * sizeof(T)>(st + 3 * TC * CH, Bm + brow, bs, tc);
      stage_rows<N * sizeof(T)>(st + 3 * TC * CH + TC * N, Cm + brow, bs, tc);
    }
    __pipeline_commit(); /* an empty group past the end keeps the counting simple */
  };

  float a2[NPT], h[NPT];
#pragma unroll
  for (int k = 0; k < NPT; k++) {
    int n = NPT * j + k;
    a2[k] = p.A[(int64_t)d * N + n] * LOG2E;
    h[k] = p.h0 ? p.h0[((int64_t)b * D + d) * N + n] : 0.0f;
  }

  issue(0);
  issue(1);
  for (int k = 0; k < nchunks; k++) {
    const int t0 = k * TC, tc = min(TC, L - t0);
    const T *st = (const T *)fsm + (k & 1) * stage_elems;
    const T *u_r = st, *dl_r = st + TC * CH, *z_r = st + 2 * TC * CH;
    const T *B_r = st + 3 * TC * CH, *C_r = B_r + TC * N;
    __pipeline_wait_prior(1); /* chunk k has landed (k + 1 may be in flight) */
    __syncthreads();
    for (int i = threadIdx.x; i < tc * CH; i += blockDim.x) {
      float dl = IO::load(dl_r[i]) + my_bias;
      dt_s[i] = p.softplus ? softplus_fast(dl) : dl;
    }
    if (RESET)
      for (int t = threadIdx.x; t < tc; t += blockDim.x)
        rs_s[t] = p.reset[(int64_t)b * L + t0 + t] ? 0.0f : 1.0f;
    __syncthreads();

    auto step = [&](int t) {
      /* checkpoint stores go through __stwb: nvcc had split the plain
       * float4 assignments into four 4-byte stores (PTX) */
      if (p.ck && (t0 + t) % B16_SUB == 0) { /* the state entering t, for the backward */
        float *dst = p.ck + (((int64_t)b * nsub + (t0 + t) / B16_SUB) * D + d) * N + NPT * j;
#pragma unroll
        for (int q = 0; q < NPT / 4; q++)
          __stwb((float4 *)dst + q, make_float4(h[4 * q], h[4 * q + 1], h[4 * q + 2], h[4 * q + 3]));
      }
      const float dt = dt_s[t * CH + c], du = dt * IO::load(u_r[t * CH + c]);
      float bb[NPT], cc[NPT];
#pragma unroll
      for (int q = 0; q < NPT / 4; q++) {
        float4 bv = load4<IO>(B_r + t * N + NPT * j + 4 * q), cv = load4<IO>(C_r + t * N + NPT * j + 4 * q);
        bb[4 * q] = bv.x; bb[4 * q + 1] = bv.y; bb[4 * q + 2] = bv.z; bb[4 * q + 3] = bv.w;
        cc[4 * q] = cv.x; cc[4 * q + 1] = cv.y; cc[4 * q + 2] = cv.z; cc[4 * q + 3] = cv.w;
      }
      float acc = 0.0f;
#pragma unroll
      for (int q = 0; q < NPT; q++) {
        const float hk = RESET ? h[q] * rs_s[t] : h[q];
        h[q] = fmaf(ex2_ftz(dt * a2[q]), hk, du * bb[q]);
        acc = fmaf(cc[q], h[q], acc);
      }
#pragma unroll
      for (int o = LPC / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      if (j == 0) y_s[t * CH + c] = acc;
    };
    if (tc == TC && NPT == 4) {
      /* whole chunks, 4 states a lane (the latency-bound small batches):
       * per 8 steps, first every exp and B·Δu (independent of the state),
       * then the 8 dependent updates, so the special-function latency
       * overlaps instead of sitting on the recurrence */
#pragma unroll
      for (int t8 = 0; t8 < TC; t8 += 8) {
        if (p.ck) { /* t8 is a multiple of B16_SUB */
          float *dst = p.ck + (((int64_t)b * nsub + (t0 + t8) / B16_SUB) * D + d) * N + NPT * j;
          __stwb((float4 *)dst, make_float4(h[0], h[1], h[2], h[3]));
        }
        float av[8][4], bu[8][4], cw[8][4];
#pragma unroll
        for (int s2 = 0; s2 < 8; s2++) {
          const int t = t8 + s2;
          const float dt = dt_s[t * CH + c], du = dt * IO::load(u_r[t * CH + c]);
          const float4 bv = load4<IO>(B_r + t * N + 4 * j), cv = load4<IO>(C_r + t * N + 4 * j);
          av[s2][0] = ex2_ftz(dt * a2[0]);
          av[s2][1] = ex2_ftz(dt * a2[1]);
          av[s2][2] = ex2_ftz(dt * a2[2]);
          av[s2][3] = ex2_ftz(dt * a2[3]);
          bu[s2][0] = du * bv.x; bu[s2][1] = du * bv.y; bu[s2][2] = du * bv.z; bu[s2][3] = du * bv.w;
          cw[s2][0] = cv.x; cw[s2][1] = cv.y; cw[s2][2] = cv.z; cw[s2][3] = cv.w;
        }
#pragma unroll
        for (int s2 = 0; s2 < 8; s2++) {
          const int t = t8 + s2;
          float acc = 0.0f;
#pragma unroll
          for (int q = 0; q < 4; q++) {
            h[q] = fmaf(av[s2][q], RESET ? h[q] * rs_s[t] : h[q], bu[s2][q]);
            acc = fmaf(cw[s2][q], h[q], acc);
          }
#pragma unroll
          for (int o = LPC / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
          if (j == 0) y_s[t * CH + c] = acc;
        }
      }
    } else if (tc == TC) { /* whole chunks run as straight-line code */
#pragma unroll
      for (int t = 0; t < TC; t++) step(t);
    } else {
      for (int t = 0; t < tc; t++) step(t);
    }
    __syncthreads();

    for (int i = threadIdx.x; i < tc * CH; i += blockDim.x) {
      int t = i / CH, cc = i % CH;
      int64_t gi = ((int64_t)b * L + t0 + t) * D + d0 + cc;
      float y = y_s[i];
      y = fmaf(my_D, IO::load(u_r[i]), y);
      if (z) {
        float zz = IO::load(z_r[i]);
        y *= zz * sigmoid_fast(zz);
      }
      out[gi] = IO::store(y);
    }
    __syncthreads(); /* stage k % 2 is free again */
    issue(k + 2);
  }
#pragma unroll
  for (int k = 0; k < NPT; k++) p.h_last[((int64_t)b * D + d) * N + NPT * j + k] = h[k];
}

/* ---- backward -------------------------------------------------------------
 * grid (D / CH, B), block CH * LPC threads; chunks of TC steps, the states of
 * a chunk kept in registers (hist). Pass 1 runs forward and stores the state
 * at each chunk start; pass 2 walks the chunks backwards, recomputes each
 * chunk's states and runs the reverse recurrence.
 * shared: u_s, dt_s, fac_s, dy_s, yp_s, du_s, dd_s (TC, CH); B_s, C_s (TC, N);
 *         rs_s (TC); bc_s (2, TC, CH, N + 1). */
template <class IO, int NPT, int LPC, int TC>
__global__ void __launch_bounds__(256) scan_backward_kernel(scan_params p) {
  typedef typename IO::T T;
  extern __shared__ float smem[];
  const int CH = p.CH, N = p.N, D = p.D, L = p.L, NP = N + 1;
  float *u_s = smem;
  float *dt_s = u_s + TC * CH;
  float *fac_s = dt_s + TC * CH;  // dΔ/dδ
  float *dy_s = fac_s + TC * CH;  // dL/dy
  float *yp_s = dy_s + TC * CH;   // y before the gate
  float *du_s = yp_s + TC * CH;
  float *dd_s = du_s + TC * CH;   // dL/dδ
  float *B_s = dd_s + TC * CH;
  float *C_s = B_s + TC * N;
  float *rs_s = C_s + TC * N;
  float *bc_s = rs_s + TC;        // (2, TC, CH, N + 1)

  const int b = blockIdx.y, blk = blockIdx.x, d0 = blk * CH, nblk = D / CH;
  const int g = d0 / (D / p.G);
  const int c = threadIdx.x / LPC, j = threadIdx.x % LPC, d = d0 + c;
  const unsigned mask = warp_mask();
  const T *u = (const T *)p.u, *delta = (const T *)p.delta;
  const T *Bm = (const T *)p.Bm, *Cm = (const T *)p.Cm, *z = (const T *)p.z;
  const T *dout = (const T *)p.dout;
  const int nchunks = (L + TC - 1) / TC;
  float *ck = p.ck + (int64_t)b * nchunks * D * N;

  float A[NPT], a2[NPT], h[NPT];
#pragma unroll
  for (int k = 0; k < NPT; k++) {
    int n = j + k * LPC;
    A[k] = n < N ? p.A[(int64_t)d * N + n] : 0.0f;
    a2[k] = A[k] * LOG2E;
    h[k] = (n < N && p.h0) ? p.h0[((int64_t)b * D + d) * N + n] : 0.0f;
  }
  const float Dd = p.Dskip ? p.Dskip[d] : 0.0f;

  /* stage Δ (and u, B, reset) of a chunk; with `full`, also the
   * gradient-side inputs */
  auto stage = [&](int t0, int tc, bool full) {
    for (int i = threadIdx.x; i < tc * CH; i += blockDim.x) {
      int t = i / CH, cc = i % CH;
      int64_t gi = ((int64_t)b * L + t0 + t) * D + d0 + cc;
      float dl = IO::load(delta[gi]) + (p.dbias ? p.dbias[d0 + cc] : 0.0f);
      u_s[i] = IO::load(u[gi]);
      delta_terms<false>(dl, p.softplus, &dt_s[i], &fac_s[i]);
      if (full) {
        float zz = z ? IO::load(z[gi]) : 0.0f;
        dy_s[i] = dy_term<false>(IO::load(dout[gi]), zz, z != NULL);
      }
    }
    for (int i = threadIdx.x; i < tc * N; i += blockDim.x) {
      int t = i / N, n = i % N;
      int64_t gi = (((int64_t)b * L + t0 + t) * p.G + g) * N + n;
      B_s[i] = IO::load(Bm[gi]);
      if (full) C_s[i] = IO::load(Cm[gi]);
    }
    for (int t = threadIdx.x; t < tc; t += blockDim.x)
      rs_s[t] = (p.reset && p.reset[(int64_t)b * L + t0 + t]) ? 0.0f : 1.0f;
  };

  /* pass 1: states at every chunk start */
  for (int ci = 0; ci < nchunks; ci++) {
    const int t0 = ci * TC, tc = min(TC, L - t0);
#pragma unroll
    for (int k = 0; k < NPT; k++) {
      int n = j + k * LPC;
      if (n < N) ck[((int64_t)ci * D + d) * N + n] = h[k];
    }
    if (ci == nchunks - 1) break;
    __syncthreads();
    stage(t0, tc, false);
    __syncthreads();
    for (int t = 0; t < tc; t++) {
      const float dt = dt_s[t * CH + c], du = dt * u_s[t * CH + c], keep = rs_s[t];
#pragma unroll
      for (int k = 0; k < NPT; k++) {
        int n = j + k * LPC;
        if (n < N) h[k] = fmaf(exp2f(dt * a2[k]), h[k] * keep, du * B_s[t * N + n]);
      }
    }
  }

  /* pass 2: reverse */
  float dh[NPT], dA[NPT];
#pragma unroll
  for (int k = 0; k < NPT; k++) {
    int n = j + k * LPC;
    dh[k] = (n < N && p.dh_last) ? p.dh_last[((int64_t)b * D + d) * N + n] : 0.0f;
    dA[k] = 0.0f;
  }
  float dD_acc = 0.0f, ddb_acc = 0.0f;

  for (int ci = nchunks - 1; ci >= 0; ci--) {
    const int t0 = ci * TC, tc = min(TC, L - t0);
    __syncthreads();
    stage(t0, tc, true);
    __syncthreads();

    /* recompute the chunk's states; hist[t] is h_t */
    float hist[TC][NPT];
#pragma unroll
    for (int k = 0; k < NPT; k++) {
      int n = j + k * LPC;
      h[k] = n < N ? ck[((int64_t)ci * D + d) * N + n] : 0.0f;
    }
    float hin[NPT]; /* the state entering the chunk */
#pragma unroll
    for (int k = 0; k < NPT; k++) hin[k] = h[k];
#pragma unroll
    for (int t = 0; t < TC; t++) {
      if (t < tc) {
        const float dt = dt_s[t * CH + c], du = dt * u_s[t * CH + c], keep = rs_s[t];
        float acc = 0.0f;
#pragma unroll
        for (int k = 0; k < NPT; k++) {
          int n = j + k * LPC;
          if (n < N) {
            h[k] = fmaf(exp2f(dt * a2[k]), h[k] * keep, du * B_s[t * N + n]);
            acc = fmaf(C_s[t * N + n], h[k], acc);
          }
          hist[t][k] = h[k];
        }
        if (z) {
          acc = lane_sum<LPC>(acc, mask);
          if (j == 0) yp_s[t * CH + c] = fmaf(Dd, u_s[t * CH + c], acc);
        }
      }
    }

    /* reverse through the chunk */
#pragma unroll
    for (int t = TC - 1; t >= 0; t--) {
      if (t < tc) {
        const int i = t * CH + c;
        const float dt = dt_s[i], uu = u_s[i], gy = dy_s[i], keep = rs_s[t];
        float sdu = 0.0f, sdd = 0.0f;
#pragma unroll
        for (int k = 0; k < NPT; k++) {
          int n = j + k * LPC;
          float hprev = t > 0 ? hist[t > 0 ? t - 1 : 0][k] : hin[k];
          hprev *= keep;
          float a = exp2f(dt * a2[k]);
          float bn = n < N ? B_s[t * N + n] : 0.0f, cn = n < N ? C_s[t * N + n] : 0.0f;
          float g_h = fmaf(cn, gy, dh[k]);            /* dL/dh_t */
          float gha = g_h * a * hprev;
          dA[k] = fmaf(dt, gha, dA[k]);
          sdd = fmaf(A[k], gha, fmaf(g_h * bn, uu, sdd));
          sdu = fmaf(g_h * dt, bn, sdu);
          if (n < N) {
            bc_s[(t * CH + c) * NP + n] = g_h * dt * uu;                    /* dB part */
            bc_s[((TC + t) * CH + c) * NP + n] = gy * hist[t][k];           /* dC part */
          }
          dh[k] = g_h * a * keep;
        }
        sdu = lane_sum<LPC>(sdu, mask);
        sdd = lane_sum<LPC>(sdd, mask);
        if (j == 0) {
          float ddl = sdd * fac_s[i];
          du_s[i] = fmaf(Dd, gy, sdu);
          dd_s[i] = ddl;
          dD_acc = fmaf(gy, uu, dD_acc);
          ddb_acc += ddl;
        }
      }
    }
    __syncthreads();

    /* outputs of the chunk */
    for (int i = threadIdx.x; i < tc * CH; i += blockDim.x) {
      int t = i / CH, cc = i % CH;
      int64_t gi = ((int64_t)b * L + t0 + t) * D + d0 + cc;
      const bool dz = p.dz != NULL;
      store_grads_td<IO, false>(p, gi, du_s[i], dd_s[i], yp_s[i], dz ? IO::load(dout[gi]) : 0.0f,
                                dz ? IO::load(z[gi]) : 0.0f);
    }
    /* dB and dC summed over the block's channels, in channel order */
    for (int i = threadIdx.x; i < 2 * tc * N; i += blockDim.x) {
      int which = i / (tc * N), r = i % (tc * N), t = r / N, n = r % N;
      const float *src = bc_s + ((int64_t)(which * TC + t) * CH) * NP + n;
      float s = 0.0f;
      for (int cc = 0; cc < CH; cc++) s += src[cc * NP];
      float *dst = which ? p.dC_part : p.dB_part;
      if (dst) dst[(((int64_t)b * nblk + blk) * L + t0 + t) * N + n] = s;
    }
  }

#pragma unroll
  for (int k = 0; k < NPT; k++) {
    int n = j + k * LPC;
    if (n < N) {
      int64_t o = ((int64_t)b * D + d) * N + n;
      p.dA_part[o] = dA[k];
      if (p.dh0) p.dh0[o] = dh[k];
    }
  }
  if (j == 0) {
    p.dD_part[(int64_t)b * D + d] = dD_acc;
    p.ddb_part[(int64_t)b * D + d] = ddb_acc;
  }
}


/* ---- backward, N = 16 fast path ---------------------------------------------
 * Same lanes as the fast forward: 32 channels x 4 lanes, lane j owning states
 * 4j..4j+3. Inputs stream through a two-stage cp.async ring in chunks of TS
 * steps. Pass 1 runs forward and stores the state every SUB steps (global
 * scratch ck); pass 2 walks the chunks backwards and, per SUB-step piece,
 * recomputes the states into registers and runs the reverse recurrence.
 * Sums over states: two shuffles. dB and dC (8 values per lane and step) are
 * summed over the warp's 8 channels by a reduce-scatter butterfly (7
 * shuffles; lane l ends with one of the warp's 32 sums) and over the block's
 * 4 warps in shared memory, in a fixed order.
 * shared: 2 stages of u, delta, dout, z (TS, 32) and B, C (TS, 16) raw;
 *         dt_s, fac_s, dy_s, yp_s, du_s, dd_s (TS, 32); rs_s (TS);
 *         red_s (TS, 4, 32). */
#define B16_TS 16

template <class IO, bool RESET, bool CACHE>
__global__ void __launch_bounds__(128) scan_backward16_kernel(scan_params p) {
  typedef typename IO::T T;
  const int CH = F16_CH, N = 16, TS = B16_TS, SUB = B16_SUB;
  extern __shared__ __align__(16) unsigned char bsm[];
  const int D = p.D, L = p.L;
  const size_t es = sizeof(T);
  const size_t stage_elems = 4 * TS * CH + 2 * TS * N;
  float *dt_s = (float *)(bsm + 2 * stage_elems * es);
  float *fac_s = dt_s + TS * CH;
  float *dy_s = fac_s + TS * CH;
  float *yp_s = dy_s + TS * CH;
  float *du_s = yp_s + TS * CH;
  float *dd_s = du_s + TS * CH;
  float *rs_s = dd_s + TS * CH;
  float *red_s = rs_s + TS; /* (TS, 4, 32) */

  const int b = blockIdx.y, blk = blockIdx.x, d0 = blk * CH, nblk = D / CH;
  const int g = d0 / (D / p.G);
  const int c = threadIdx.x >> 2, j = threadIdx.x & 3, d = d0 + c;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T *u = (const T *)p.u, *delta = (const T *)p.delta, *z = (const T *)p.z;
  const T *Bm = (const T *)p.Bm, *Cm = (const T *)p.Cm, *dout = (const T *)p.dout;
  const int nchunks = (L + TS - 1) / TS, nsub = (L + SUB - 1) / SUB;
  float *ck = p.ck + (int64_t)b * nsub * D * N;
  /* phase loops stride by 128, a multiple of CH: channel d0 + threadIdx.x % CH */
  const float my_bias = p.dbias ? p.dbias[d0 + threadIdx.x % CH] : 0.0f;

  /* copy chunk k into ring slot m % 2; `full` adds C, dout and z */
  auto issue = [&](int k, int m, bool full) {
    if (k >= 0 && k < nchunks) {
      const int t0 = k * TS, tc = min(TS, L - t0);
      T *st = (T *)bsm + (m & 1) * stage_elems;
      const int64_t row = ((int64_t)b * L + t0) * D + d0, rs = (int64_t)D * sizeof(T);
      const int64_t brow = (((int64_t)b * L + t0) * p.G + g) * N, bs = (int64_t)p.G * N * sizeof(T);
      stage_rows<CH * sizeof(T)>(st, u + row, rs, tc);
      stage_rows<CH * sizeof(T)>(st + TS * CH, delta + row, rs, tc);
      if (full) {
        stage_rows<CH * sizeof(T)>(st + 2 * TS * CH, dout + row, rs, tc);
        if (z) stage_rows<CH * sizeof(T)>(st + 3 * TS * CH, z + row, rs, tc);
      }
      stage_rows<N * sizeof(T)>(st + 4 * TS * CH, Bm + brow, bs, tc);
      if (full) stage_rows<N * sizeof(T)>(st + 4 * TS * CH + TS * N, Cm + brow, bs, tc);
    }
    __pipeline_commit();
  };
  /* Δ, softplus' and dL/dy of a landed chunk */
  auto convert = [&](const T *st, int t0, int tc, bool full) {
    const T *dl_r = st + TS * CH, *go_r = st + 2 * TS * CH, *z_r = st + 3 * TS * CH;
    for (int i = threadIdx.x; i < tc * CH; i += blockDim.x) {
      delta_terms<true>(IO::load(dl_r[i]) + my_bias, p.softplus, &dt_s[i], &fac_s[i]);
      if (full) {
        float zz = z ? IO::load(z_r[i]) : 0.0f;
        dy_s[i] = dy_term<true>(IO::load(go_r[i]), zz, z != NULL);
      }
    }
    if (RESET)
      for (int t = threadIdx.x; t < tc; t += blockDim.x)
        rs_s[t] = p.reset[(int64_t)b * L + t0 + t] ? 0.0f : 1.0f;
  };

  float a2[4], h[4];
#pragma unroll
  for (int k = 0; k < 4; k++) {
    a2[k] = p.A[(int64_t)d * N + 4 * j + k] * LOG2E;
    h[k] = p.h0 ? p.h0[((int64_t)b * D + d) * N + 4 * j + k] : 0.0f;
  }
  const float Dd = p.Dskip ? p.Dskip[d] : 0.0f;

  /* pass 1: checkpoints every SUB steps (unless the forward saved them) */
  if (!p.ck_given) {
  issue(0, 0, false);
  issue(1, 1, false);
  for (int k = 0; k < nchunks; k++) {
    const int t0 = k * TS, tc = min(TS, L - t0);
    const T *st = (const T *)bsm + (k & 1) * stage_elems;
    const T *u_r = st, *B_r = st + 4 * TS * CH;
    __pipeline_wait_prior(1);
    __syncthreads();
    convert(st, t0, tc, false);
    __syncthreads();
    for (int t = 0; t < tc; t++) {
      if ((t0 + t) % SUB == 0)
        __stwb((float4 *)(ck + ((int64_t)((t0 + t) / SUB) * D + d) * N + 4 * j), make_float4(h[0], h[1], h[2], h[3]));
      const float dt = dt_s[t * CH + c], du = dt * IO::load(u_r[t * CH + c]), keep = RESET ? rs_s[t] : 1.0f;
      const float4 bv = load4<IO>(B_r + t * N + 4 * j);
      h[0] = fmaf(ex2_ftz(dt * a2[0]), h[0] * keep, du * bv.x);
      h[1] = fmaf(ex2_ftz(dt * a2[1]), h[1] * keep, du * bv.y);
      h[2] = fmaf(ex2_ftz(dt * a2[2]), h[2] * keep, du * bv.z);
      h[3] = fmaf(ex2_ftz(dt * a2[3]), h[3] * keep, du * bv.w);
    }
    __syncthreads();
    issue(k + 2, k, false);
  }
  __pipeline_wait_prior(0);
  __syncthreads();
  }

  /* pass 2: reverse */
  float dh[4], dA[4];
#pragma unroll
  for (int k = 0; k < 4; k++) {
    dh[k] = p.dh_last ? p.dh_last[((int64_t)b * D + d) * N + 4 * j + k] : 0.0f;
    dA[k] = 0.0f;
  }
  float dD_acc = 0.0f, ddb_acc = 0.0f;
  /* pieces run last to first; the checkpoint of the next one is loaded a
   * piece ahead, so its global latency overlaps the current piece */
  int next_piece = nsub - 1;
  float4 ck_next = *(const float4 *)(ck + ((int64_t)next_piece * D + d) * N + 4 * j);
  issue(nchunks - 1, 0, true);
  issue(nchunks - 2, 1, true);
  for (int m = 0; m < nchunks; m++) {
    const int k = nchunks - 1 - m, t0 = k * TS, tc = min(TS, L - t0);
    const T *st = (const T *)bsm + (m & 1) * stage_elems;
    const T *u_r = st, *B_r = st + 4 * TS * CH, *C_r = B_r + TS * N;
    __pipeline_wait_prior(1);
    __syncthreads();
    convert(st, t0, tc, true);
    __syncthreads();

    /* one SUB-step piece; FULL pieces compile to straight-line code */
    auto piece = [&](auto full_tag, int s0, int sc) {
      constexpr bool FULL = decltype(full_tag)::value;
      float hist[SUB][4], hin[4]; /* h_t of the piece */
      float av[CACHE ? SUB : 1][4];  /* CACHE: exp(Δ_t A) of the piece, computed first */
      if (CACHE) {
#pragma unroll
        for (int t = 0; t < SUB; t++)
          if (FULL || t < sc) {
            const float dt = dt_s[(s0 + t) * CH + c];
#pragma unroll
            for (int k2 = 0; k2 < 4; k2++) av[CACHE ? t : 0][k2] = ex2_ftz(dt * a2[k2]);
          }
      }
      const int pi = (t0 + s0) / SUB;
      const float4 hv = pi == next_piece ? ck_next
                                         : *(const float4 *)(ck + ((int64_t)pi * D + d) * N + 4 * j);
      next_piece = pi - 1;
      if (next_piece >= 0)
        ck_next = *(const float4 *)(ck + ((int64_t)next_piece * D + d) * N + 4 * j);
      hin[0] = hv.x; hin[1] = hv.y; hin[2] = hv.z; hin[3] = hv.w;
#pragma unroll
      for (int k2 = 0; k2 < 4; k2++) h[k2] = hin[k2];
#pragma unroll
      for (int t = 0; t < SUB; t++) {
        if (FULL || t < sc) {
          const int i = (s0 + t) * CH + c;
          const float dt = dt_s[i], du = dt * IO::load(u_r[i]), keep = RESET ? rs_s[s0 + t] : 1.0f;
          const float4 bv = load4<IO>(B_r + (s0 + t) * N + 4 * j);
          const float4 cv = load4<IO>(C_r + (s0 + t) * N + 4 * j);
#pragma unroll
          for (int k2 = 0; k2 < 4; k2++) {
            const float a = CACHE ? av[CACHE ? t : 0][k2] : ex2_ftz(dt * a2[k2]);
            const float bk = k2 == 0 ? bv.x : k2 == 1 ? bv.y : k2 == 2 ? bv.z : bv.w;
            h[k2] = fmaf(a, h[k2] * keep, du * bk);
            hist[t][k2] = h[k2];
          }
          if (z) {
            float acc = fmaf(cv.x, h[0], fmaf(cv.y, h[1], fmaf(cv.z, h[2], cv.w * h[3])));
            acc += __shfl_xor_sync(0xffffffffu, acc, 1);
            acc += __shfl_xor_sync(0xffffffffu, acc, 2);
            if (j == 0) yp_s[i] = fmaf(Dd, IO::load(u_r[i]), acc);
          }
        }
      }
#pragma unroll
      for (int t = SUB - 1; t >= 0; t--) {
        if (FULL || t < sc) {
          const int tt = s0 + t, i = tt * CH + c;
          const float dt = dt_s[i], uu = IO::load(u_r[i]), gy = dy_s[i], keep = RESET ? rs_s[tt] : 1.0f;
          const float4 bv = load4<IO>(B_r + tt * N + 4 * j);
          const float4 cv = load4<IO>(C_r + tt * N + 4 * j);
          const float bb[4] = {bv.x, bv.y, bv.z, bv.w}, cc[4] = {cv.x, cv.y, cv.z, cv.w};
          float sA = 0.0f, sB = 0.0f, v[8];
#pragma unroll
          for (int k2 = 0; k2 < 4; k2++) {
            const float hprev = (t > 0 ? hist[t > 0 ? t - 1 : 0][k2] : hin[k2]) * keep;
            const float a = CACHE ? av[CACHE ? t : 0][k2] : ex2_ftz(dt * a2[k2]);
            const float g_h = fmaf(cc[k2], gy, dh[k2]);
            const float gha = g_h * a * hprev;
            dA[k2] = fmaf(dt, gha, dA[k2]);
            sA = fmaf(a2[k2], gha, sA);
            sB = fmaf(g_h, bb[k2], sB);
            v[k2] = g_h * dt * uu;
            v[4 + k2] = gy * hist[t][k2];
            dh[k2] = g_h * a * keep;
          }
          sA += __shfl_xor_sync(0xffffffffu, sA, 1);
          sA += __shfl_xor_sync(0xffffffffu, sA, 2);
          sB += __shfl_xor_sync(0xffffffffu, sB, 1);
          sB += __shfl_xor_sync(0xffffffffu, sB, 2);
          /* reduce-scatter over the 8 channels of the warp (lane bits 2..4) */
#pragma unroll
          for (int st2 = 0; st2 < 3; st2++) {
            const int kept = 4 >> st2, o = 16 >> st2;
            const bool up = (lane & o) != 0;
#pragma unroll
            for (int q = 0; q < kept; q++) {
              float send = up ? v[q] : v[q + kept];
              float keepv = up ? v[q + kept] : v[q];
              v[q] = keepv + __shfl_xor_sync(0xffffffffu, send, o);
            }
          }
          const int vi = ((lane >> 4) & 1) * 4 + ((lane >> 3) & 1) * 2 + ((lane >> 2) & 1);
          red_s[(tt * 4 + warp) * 32 + (vi < 4 ? 0 : 16) + 4 * j + (vi & 3)] = v[0];
          if (j == 0) {
            const float ddl = fmaf(LN2, sA, uu * sB) * fac_s[i];
            du_s[i] = fmaf(Dd, gy, dt * sB);
            dd_s[i] = ddl;
            dD_acc = fmaf(gy, uu, dD_acc);
            ddb_acc += ddl;
          }
        }
      }
    };
    for (int s0 = ((tc - 1) / SUB) * SUB; s0 >= 0; s0 -= SUB) { /* pieces, last first */
      const int sc = min(SUB, tc - s0);
      if (sc == SUB) piece(std::true_type(), s0, sc);
      else piece(std::false_type(), s0, sc);
    }
    __syncthreads();

    for (int i = threadIdx.x; i < tc * CH; i += blockDim.x) {
      int t = i / CH, cc = i % CH;
      int64_t gi = ((int64_t)b * L + t0 + t) * D + d0 + cc;
      const bool dz = p.dz != NULL;
      const T *z_r = st + 3 * TS * CH, *go_r = st + 2 * TS * CH;
      store_grads_td<IO, true>(p, gi, du_s[i], dd_s[i], yp_s[i], dz ? IO::load(go_r[i]) : 0.0f,
                               dz ? IO::load(z_r[i]) : 0.0f);
    }
    for (int i = threadIdx.x; i < tc * 32; i += blockDim.x) {
      int t = i / 32, slot = i % 32;
      float sum = red_s[(t * 4 + 0) * 32 + slot] + red_s[(t * 4 + 1) * 32 + slot] +
                  red_s[(t * 4 + 2) * 32 + slot] + red_s[(t * 4 + 3) * 32 + slot];
      float *dst = slot < N ? p.dB_part : p.dC_part;
      if (dst) dst[(((int64_t)b * nblk + blk) * L + t0 + t) * N + (slot % N)] = sum;
    }
    __syncthreads();
    issue(k - 2, m, true);
  }

#pragma unroll
  for (int k = 0; k < 4; k++) {
    int64_t o = ((int64_t)b * D + d) * N + 4 * j + k;
    p.dA_part[o] = dA[k];
    if (p.dh0) p.dh0[o] = dh[k];
  }
  if (j == 0) {
    p.dD_part[(int64_t)b * D + d] = dD_acc;
    p.ddb_part[(int64_t)b * D + d] = ddb_acc;
  }
}

/* dB[b, t, g, n] = Σ over the blocks k of group g of partB[b, g·per_g + k, t, n],
 * and dC likewise from partC (an out pointer may be NULL: skipped). Work
 * items: X = 256 / Y consecutive (t, n) of one (b, g) and one of dB / dC;
 * block (X, Y): row y adds k = y, y + Y, ... in order (loads coalesced over
 * (t, n)), and the Y row sums are added in row order: a fixed order. Y = 1
 * (a thread per output) unless the blocks are many (the lane-per-state
 * kernels at batch 1), where Y = 8 spreads each sum over 8 threads. */
template <class IO, int Y>
__global__ void __launch_bounds__(256) scan_reduce_bc_kernel(const float *partB, void *outB, const float *partC,
                                                             void *outC, int B, int L, int G, int N, int nblk) {
  typedef typename IO::T T;
  constexpr int X = 256 / Y;
  __shared__ float acc_s[Y][X + 1];
  const int per_g = nblk / G;
  const int64_t LN = (int64_t)L * N, tiles = (LN + X - 1) / X, items = tiles * B * G * 2;
  for (int64_t w = blockIdx.x; w < items; w += gridDim.x) {
    const int64_t tile = w % tiles, bg = (w / tiles) % ((int64_t)B * G);
    const int which = (int)(w / (tiles * B * G));
    const float *part = which ? partC : partB;
    T *out = (T *)(which ? outC : outB);
    if (out == NULL) continue; /* uniform over the block */
    const int b = (int)(bg / G), g = (int)(bg % G);
    const int64_t i = tile * X + threadIdx.x;
    const float *src = part + ((int64_t)b * nblk + (int64_t)g * per_g) * LN + i;
    float s = 0.0f;
    if (i < LN) {
#pragma unroll 4
      for (int k = threadIdx.y; k < per_g; k += Y) s += src[k * LN];
    }
    if (Y > 1) {
      acc_s[threadIdx.y][threadIdx.x] = s;
      __syncthreads();
      if (threadIdx.y == 0)
        for (int y = 1; y < Y; y++) s += acc_s[y][threadIdx.x];
      __syncthreads();
    }
    if (threadIdx.y == 0 && i < LN) {
      const int64_t t = i / N, n = i % N;
      out[(((int64_t)b * L + t) * G + g) * N + n] = IO::store(s);
    }
  }
}

/* out[i] = Σ_b part[b, i] for i < M (dA, dD, dbias). Block (32, 8): 32
 * consecutive outputs (coalesced loads) times 8 slices of the batch, each
 * slice summing b = y, y + 8, ... in order; the 8 slice sums are then added
 * in slice order: a fixed order, whatever the launch. */
__global__ void scan_reduce_batch_kernel(const float *part, float *out, int B, int64_t M) {
  __shared__ float acc_s[8][33];
  const int64_t i = blockIdx.x * (int64_t)32 + threadIdx.x;
  float s = 0.0f;
  if (i < M)
    for (int b = threadIdx.y; b < B; b += 8) s += part[(int64_t)b * M + i];
  acc_s[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && i < M) {
    float t = acc_s[0][threadIdx.x];
    for (int y = 1; y < 8; y++) t += acc_s[y][threadIdx.x];
    out[i] = t;
  }
}

/* ---- launchers ---------------------------------------------------------- */

static int pow2_ceil(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

/* Channels per block: a power of two dividing D / G, at most 256 / LPC
 * threads' worth, and small enough that the grid fills the GPU. */
static int pick_ch(int B, int D, int G, int LPC, int sm_count) {
  int per_g = D / G, ch = LPC == 1 ? 128 : 32;
  while (ch > 1 && (per_g % ch != 0 || ch * LPC > 256)) ch >>= 1;
  while (ch > 1 && (int64_t)B * (D / ch) < 2LL * sm_count) ch >>= 1;
  return ch;
}

static int scan_validate(const mx_scan_args *a, mx_err *err) {
  if (a->param != MX_F32)
    return mx_cuda_fail(err, MX_E_ARG, "scan: parameters must be f32 on CUDA");
  if (a->io != MX_F32 && a->io != MX_BF16 && a->io != MX_F16)
    return mx_cuda_fail(err, MX_E_ARG, "scan: io tensors must be f32, bf16 or f16 on CUDA");
  if (a->batch < 1 || a->len < 1 || a->dim < 1 || a->dstate < 1 || a->dstate > 256 ||
      a->groups < 1 || a->dim % a->groups != 0 || a->batch > 65535 || a->dim > (1 << 24) ||
      a->len > (1 << 30))
    return mx_cuda_fail(err, MX_E_ARG, "scan: unsupported sizes");
  return MX_OK;
}

/* The (NPT, LPC) pair for N: NPT states per lane, LPC lanes per channel. */
static void pick_lanes(int N, int *npt, int *lpc) {
  *npt = N > 128 ? 8 : 4;
  *lpc = pow2_ceil((N + *npt - 1) / *npt);
  if (*lpc > 32) *lpc = 32;
}

/* Forward configurations: (NPT, LPC) pairs, TC = 16 steps per chunk,
 * block = CH * LPC threads with CH * LPC <= 256. PRE and PREBC are the
 * prefetch slots per thread for the chunk's (TC, CH) and (TC, N) inputs. */
/* steps per chunk: 8 when a lane owns 16 states (registers), else 16 */
static constexpr int fwd_tc(int npt) { return npt >= 16 ? 8 : 16; }

template <class IO, int NPT, int LPC>
static void launch_forward(const scan_params &p, dim3 grid, size_t smem, cudaStream_t s) {
  /* CH * LPC threads stage TC * CH slots: TC / LPC each (at least 1) */
  constexpr int TC = fwd_tc(NPT);
  scan_forward_kernel<IO, NPT, LPC, TC, (TC / LPC > 0 ? TC / LPC : 1)><<<grid, p.CH * LPC, smem, s>>>(p);
}

template <class IO>
static void forward_io(const scan_params &p, int npt, dim3 grid, size_t smem, cudaStream_t s) {
  if (npt == 4) {
    switch (p.LPC) {
      case 1: launch_forward<IO, 4, 1>(p, grid, smem, s); return;
      case 2: launch_forward<IO, 4, 2>(p, grid, smem, s); return;
      case 4: launch_forward<IO, 4, 4>(p, grid, smem, s); return;
      case 8: launch_forward<IO, 4, 8>(p, grid, smem, s); return;
      default: launch_forward<IO, 4, 16>(p, grid, smem, s); return;
    }
  }
  if (p.LPC <= 16) launch_forward<IO, 8, 16>(p, grid, smem, s);
  else launch_forward<IO, 8, 32>(p, grid, smem, s);
}

static void fill_common(scan_params *p, const mx_scan_args *a) {
  p->B = (int)a->batch;
  p->L = (int)a->len;
  p->D = (int)a->dim;
  p->N = (int)a->dstate;
  p->G = (int)a->groups;
  p->softplus = a->softplus;
  p->u = a->u;
  p->delta = a->delta;
  p->Bm = a->Bm;
  p->Cm = a->Cm;
  p->z = a->z;
  p->A = (const float *)a->A;
  p->Dskip = (const float *)a->Dskip;
  p->dbias = (const float *)a->delta_bias;
  p->h0 = (const float *)a->h0;
  p->reset = a->reset;
}

/* Generic forward lanes: NPT = 4 (8 above N = 128) states per lane and LPC
 * lanes per channel, at least 16 lanes when NPT is 8 (the N = 16 shapes the
 * fast kernel cannot take land here too). */
static void pick_forward_lanes(int N, int *npt, int *lpc) {
  pick_lanes(N, npt, lpc);
  if (*npt == 8 && *lpc < 16) *lpc = 16;
}

static int aligned16_ptr(const void *q) { return q == NULL || ((uintptr_t)q & 15) == 0; }

/* The N = 16 fast forward applies when channels come in whole blocks of 32
 * per group and every io row starts on a 16-byte boundary. */
static int forward16_ok(const mx_scan_args *a) {
  return a->dstate == 16 && (a->dim / a->groups) % F16_CH == 0 && aligned16_ptr(a->u) &&
         aligned16_ptr(a->delta) && aligned16_ptr(a->z) && aligned16_ptr(a->Bm) &&
         aligned16_ptr(a->Cm);
}

/* Chunk length by lanes per channel: the stage holds TC x (128 / LPC)
 * channels, so fewer lanes per channel take shorter chunks. */
static constexpr int f16_tc(int lpc) { return lpc == 4 ? 32 : lpc == 2 ? 16 : 8; }

template <class IO, int LPC, bool RESET>
static int forward16_launch(const scan_params &p, mx_cuda_dev *d, mx_err *err) {
  constexpr int TC = f16_tc(LPC), CH = 128 / LPC;
  const size_t es = sizeof(typename IO::T);
  size_t smem = 2 * (3 * TC * CH + 2 * TC * 16) * es + sizeof(float) * (2 * TC * CH + TC);
  auto kern = scan_forward16_kernel<IO, TC, LPC, RESET>;
  int rc = MX_CUDA_CALL(d, err, cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                     (int)smem));
  if (rc != MX_OK) return rc;
  dim3 grid((unsigned)(p.D / CH), (unsigned)p.B);
  kern<<<grid, 128, smem, d->stream>>>(p);
  return MX_CUDA_CALL(d, err, cudaGetLastError());
}

template <class IO>
static int forward16_io(const scan_params &p, mx_cuda_dev *d, mx_err *err) {
  const bool r = p.reset != NULL;
  switch (p.LPC) {
    case 1: return r ? forward16_launch<IO, 1, true>(p, d, err) : forward16_launch<IO, 1, false>(p, d, err);
    case 2: return r ? forward16_launch<IO, 2, true>(p, d, err) : forward16_launch<IO, 2, false>(p, d, err);
    default: return r ? forward16_launch<IO, 4, true>(p, d, err) : forward16_launch<IO, 4, false>(p, d, err);
  }
}

/* Lanes per channel for the fast forward: 4 for small batches (more
 * threads for the latency-bound case), fewer as the batch grows (less
 * per-state overhead for the throughput-bound case). MAMBEX_SCAN_LPC
 * overrides it (for benchmarks). */
static int forward16_lpc(const scan_params &p) {
  const char *o = getenv("MAMBEX_SCAN_LPC");
  int lpc = (int64_t)p.B * p.D >= 32768 ? 2 : 4; /* measured: bench/results/scan_lpc_sweep.txt */
  if (o && (atoi(o) == 1 || atoi(o) == 2 || atoi(o) == 4)) lpc = atoi(o);
  while (lpc < 4 && (p.D / p.G) % (128 / lpc) != 0) lpc *= 2;
  return lpc;
}

static int launch_forward16(scan_params &p, int io, mx_cuda_dev *d, mx_err *err) {
  p.LPC = forward16_lpc(p);
  p.CH = 128 / p.LPC;
  p.TC = f16_tc(p.LPC);
  switch (io) {
    case MX_F32: return forward16_io<mx_t_f32>(p, d, err);
    case MX_BF16: return forward16_io<mx_t_bf16>(p, d, err);
    default: return forward16_io<mx_t_f16>(p, d, err);
  }
}

int mx_cuda_scan_forward(int dev, const mx_scan_args *a, void *out, void *h_last,
                         mx_err *err) {
  mx_cuda_dev *d = NULL;
  int rc = scan_validate(a, err);
  if (rc != MX_OK) return rc;
  scan_params p;
  memset(&p, 0, sizeof p);
  fill_common(&p, a);
  p.out = out;
  p.h_last = (float *)h_last;
  rc = mx_cuda_begin(dev, err, &d);
  if (rc != MX_OK) return rc;
  if (forward16_ok(a)) {
    p.ck = (float *)a->ckpt;
    const int kind = scan_lps_wanted(p, a->io, d);
    if (kind) {
      p.split = kind == 2 ? scan_lps_split(p) : 0;
      p.CH = scan_lps_channels(p, a->io, 0, d->sm_count);
      rc = scan_lps_forward(p, a->io, d, err);
    } else {
      rc = launch_forward16(p, a->io, d, err);
    }
    mx_cuda_unlock(d);
    return rc;
  }
  int npt;
  pick_forward_lanes(p.N, &npt, &p.LPC);
  p.CH = pick_ch(p.B, p.D, p.G, p.LPC, d->sm_count);
  p.TC = fwd_tc(npt);
  size_t TC = (size_t)p.TC;
  size_t smem = sizeof(float) * (2 * TC * p.CH + TC * p.CH * p.LPC + 2 * TC * p.N + TC);
  dim3 grid((unsigned)(p.D / p.CH), (unsigned)p.B);
  switch (a->io) {
    case MX_F32: forward_io<mx_t_f32>(p, npt, grid, smem, d->stream); break;
    case MX_BF16: forward_io<mx_t_bf16>(p, npt, grid, smem, d->stream); break;
    default: forward_io<mx_t_f16>(p, npt, grid, smem, d->stream); break;
  }
  rc = MX_CUDA_CALL(d, err, cudaGetLastError());
  mx_cuda_unlock(d);
  return rc;
}

#define BWD_TC 8

template <class IO, int NPT, int LPC>
static int launch_backward(const scan_params &p, dim3 grid, size_t smem, cudaStream_t s,
                           mx_cuda_dev *d, mx_err *err) {
  auto kern = scan_backward_kernel<IO, NPT, LPC, BWD_TC>;
  if (smem > 48 * 1024) {
    int rc = MX_CUDA_CALL(d, err, cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                       (int)smem));
    if (rc != MX_OK) return rc;
  }
  kern<<<grid, p.CH * LPC, smem, s>>>(p);
  return MX_CUDA_CALL(d, err, cudaGetLastError());
}

template <class IO, int NPT>
static int backward_lpc(const scan_params &p, dim3 grid, size_t smem, cudaStream_t s,
                        mx_cuda_dev *d, mx_err *err) {
  switch (p.LPC) {
    case 1: return launch_backward<IO, NPT, 1>(p, grid, smem, s, d, err);
    case 2: return launch_backward<IO, NPT, 2>(p, grid, smem, s, d, err);
    case 4: return launch_backward<IO, NPT, 4>(p, grid, smem, s, d, err);
    case 8: return launch_backward<IO, NPT, 8>(p, grid, smem, s, d, err);
    case 16: return launch_backward<IO, NPT, 16>(p, grid, smem, s, d, err);
    default: return launch_backward<IO, NPT, 32>(p, grid, smem, s, d, err);
  }
}

template <class IO>
static int backward_reductions(const scan_params &p, const mx_scan_grads *gr, mx_cuda_dev *d,
                               mx_err *err);

template <class IO>
static int backward_io(const scan_params &p, const mx_scan_grads *gr, int npt, dim3 grid,
                       size_t smem, mx_cuda_dev *d, mx_err *err) {
  int rc;
  if (npt == 16) {
    /* latency-bound sizes (the forward's 4-lane range) keep each piece's
     * exps in registers: fewer special-function ops on the critical path,
     * at the cost of occupancy the large sizes need */
    const bool cache = (int64_t)p.B * p.D < 32768;
    auto kern = p.reset ? (cache ? scan_backward16_kernel<IO, true, true> : scan_backward16_kernel<IO, true, false>)
                        : (cache ? scan_backward16_kernel<IO, false, true> : scan_backward16_kernel<IO, false, false>);
    rc = MX_CUDA_CALL(d, err, cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   (int)smem));
    if (rc != MX_OK) return rc;
    kern<<<grid, F16_CH * 4, smem, d->stream>>>(p);
    rc = MX_CUDA_CALL(d, err, cudaGetLastError());
  } else {
    rc = npt == 4 ? backward_lpc<IO, 4>(p, grid, smem, d->stream, d, err)
                  : backward_lpc<IO, 8>(p, grid, smem, d->stream, d, err);
  }
  if (rc != MX_OK) return rc;
  return backward_reductions<IO>(p, gr, d, err);
}

template <class IO>
static int backward_reductions(const scan_params &p, const mx_scan_grads *gr, mx_cuda_dev *d,
                               mx_err *err) {
  int nblk = p.D / p.CH;
  if (gr->dB || gr->dC) {
    const int per_g = nblk / p.G, y = per_g >= 64 ? 8 : 1;
    const int64_t LN = (int64_t)p.L * p.N;
    const uint64_t items = (uint64_t)((LN + 256 / y - 1) / (256 / y)) * p.B * p.G * 2;
    const unsigned grid = (unsigned)(items < 65536 * 16 ? items : 65536 * 16);
    if (y == 8)
      scan_reduce_bc_kernel<IO, 8><<<grid, dim3(32, 8), 0, d->stream>>>(p.dB_part, gr->dB, p.dC_part, gr->dC,
                                                                       p.B, p.L, p.G, p.N, nblk);
    else
      scan_reduce_bc_kernel<IO, 1><<<grid, dim3(256, 1), 0, d->stream>>>(p.dB_part, gr->dB, p.dC_part, gr->dC,
                                                                        p.B, p.L, p.G, p.N, nblk);
    MX_CUDA_LAUNCHED(d, err, "scan_reduce_bc_kernel");
  }
  /* at batch 1 the N = 16 kernels write dA, dD and dbias directly */
  if (gr->dA && p.dA_part != (float *)gr->dA) {
    int64_t M = (int64_t)p.D * p.N;
    scan_reduce_batch_kernel<<<(unsigned)((M + 31) / 32), dim3(32, 8), 0, d->stream>>>(
        p.dA_part, (float *)gr->dA, p.B, M);
    MX_CUDA_LAUNCHED(d, err, "scan_reduce_batch_kernel");
  }
  if (gr->dD && p.dD_part != (float *)gr->dD) {
    scan_reduce_batch_kernel<<<(unsigned)((p.D + 31) / 32), dim3(32, 8), 0, d->stream>>>(
        p.dD_part, (float *)gr->dD, p.B, p.D);
    MX_CUDA_LAUNCHED(d, err, "scan_reduce_batch_kernel");
  }
  if (gr->ddelta_bias && p.ddb_part != (float *)gr->ddelta_bias) {
    scan_reduce_batch_kernel<<<(unsigned)((p.D + 31) / 32), dim3(32, 8), 0, d->stream>>>(
        p.ddb_part, (float *)gr->ddelta_bias, p.B, p.D);
    MX_CUDA_LAUNCHED(d, err, "scan_reduce_batch_kernel");
  }
  return MX_OK;
}

int mx_cuda_scan_backward(int dev, const mx_scan_args *a, const void *d_out,
                                     const void *dh_last, const mx_scan_grads *gr, mx_err *err) {
  mx_cuda_dev *d = NULL;
  int rc = scan_validate(a, err);
  if (rc != MX_OK) return rc;
  scan_params p;
  memset(&p, 0, sizeof p);
  fill_common(&p, a);
  p.dout = d_out;
  p.dh_last = (const float *)dh_last;
  p.du = gr->du;
  p.ddelta = gr->ddelta;
  p.dz = a->z ? gr->dz : NULL;
  p.dh0 = (float *)gr->dh0;
  int npt;
  rc = mx_cuda_begin(dev, err, &d);
  if (rc != MX_OK) return rc;
  size_t TC = BWD_TC, smem;
  p.TC = BWD_TC;
  int nsub = 0, lps = 0;
  const int fast = forward16_ok(a) && aligned16_ptr(d_out), kind = fast ? scan_lps_wanted(p, a->io, d) : 0;
  if (kind) { /* lane per state */
    npt = 16;
    lps = 1;
    p.split = kind == 2 ? scan_lps_split(p) : 0;
    p.CH = scan_lps_channels(p, a->io, 1, d->sm_count);
    p.TC = B16_SUB;
    smem = 0;
    nsub = (p.L + B16_SUB - 1) / B16_SUB;
  } else if (fast) { /* the fast path (npt 16 marks it) */
    npt = 16;
    p.LPC = 4;
    p.CH = F16_CH;
    p.TC = B16_SUB;
    size_t es = mx_dtype_size(a->io), TS = B16_TS;
    smem = 2 * (4 * TS * F16_CH + 2 * TS * 16) * es +
           sizeof(float) * (6 * TS * F16_CH + TS + TS * 4 * 32);
    nsub = (p.L + B16_SUB - 1) / B16_SUB;
  } else {
    pick_lanes(p.N, &npt, &p.LPC);
    p.CH = pick_ch(p.B, p.D, p.G, p.LPC, d->sm_count);
    size_t NP = (size_t)p.N + 1;
    smem = sizeof(float) * (7 * TC * p.CH + 2 * TC * p.N + TC + 2 * TC * p.CH * NP);
  }
  int nblk = p.D / p.CH, nchunks = npt == 16 ? nsub : (p.L + BWD_TC - 1) / BWD_TC;

  /* scratch: checkpoints and partial sums, one allocation */
  const int ck_given = npt == 16 && a->ckpt != NULL;
  size_t n_ck = ck_given ? 0 : (size_t)p.B * nchunks * p.D * p.N;
  size_t n_bd = (size_t)p.B * p.D, n_bdn = n_bd * p.N, n_bc = (size_t)p.B * nblk * p.L * p.N;
  size_t total = n_ck + n_bdn + 2 * n_bd + 2 * n_bc;
  float *scratch = NULL;
  rc = MX_CUDA_CALL(d, err, cudaMallocAsync((void **)&scratch, total * sizeof(float), d->stream));
  if (rc != MX_OK) {
    mx_cuda_unlock(d);
    return rc;
  }
  p.ck = ck_given ? (float *)a->ckpt : scratch;
  p.ck_given = ck_given;
  p.dA_part = scratch + n_ck;
  p.dD_part = p.dA_part + n_bdn;
  p.ddb_part = p.dD_part + n_bd;
  p.dB_part = p.ddb_part + n_bd;
  p.dC_part = p.dB_part + n_bc;
  if (npt == 16 && p.B == 1) { /* nothing to add over the batch: write the gradients */
    if (gr->dA) p.dA_part = (float *)gr->dA;
    if (gr->dD) p.dD_part = (float *)gr->dD;
    if (gr->ddelta_bias) p.ddb_part = (float *)gr->ddelta_bias;
  }
  dim3 grid((unsigned)nblk, (unsigned)p.B);
  if (lps) {
    rc = scan_lps_backward(p, a->io, d, err);
    if (rc == MX_OK) {
      switch (a->io) {
        case MX_F32: rc = backward_reductions<mx_t_f32>(p, gr, d, err); break;
        case MX_BF16: rc = backward_reductions<mx_t_bf16>(p, gr, d, err); break;
        default: rc = backward_reductions<mx_t_f16>(p, gr, d, err); break;
      }
    }
  } else {
    switch (a->io) {
      case MX_F32: rc = backward_io<mx_t_f32>(p, gr, npt, grid, smem, d, err); break;
      case MX_BF16: rc = backward_io<mx_t_bf16>(p, gr, npt, grid, smem, d, err); break;
      default: rc = backward_io<mx_t_f16>(p, gr, npt, grid, smem, d, err); break;
    }
  }
  cudaFreeAsync(scratch, d->stream); /* stream-ordered after the launches */
  mx_cuda_unlock(d);
  return rc;
}

int64_t mx_cuda_scan_ckpt_elems(int dev, const mx_scan_args *a) {
  (void)dev;
  mx_err err;
  if (scan_validate(a, &err) != MX_OK || !forward16_ok(a)) return 0;
  return a->batch * ((a->len + B16_SUB - 1) / B16_SUB) * a->dim * a->dstate;
}

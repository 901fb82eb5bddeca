/*
 * scan.cu: the Mamba-1 selective scan on CUDA, forward and backward.
 *
 * Layout (batch, length, channels): u, delta, z, out (B, L, D); B and C
 * (B, L, G, N); A (D, N); D and delta_bias (D); states (B, D, N). io tensors
 * are f32, bf16 or f16; everything is computed and carried in fp32.
 *
 * Work decomposition. One thread block per (batch b, block of CH channels of
 * one group); inside it, LPC consecutive lanes share a channel and each lane
 * owns NPT states (n = lane + k * LPC). The recurrence runs sequentially over
 * time in chunks of TC steps: the block first stages a chunk's inputs in
 * shared memory with coalesced loads (softplus is applied once per (t, d)
 * there), then every lane advances its states through the chunk, and the
 * outputs leave through shared memory with coalesced stores. Sums over
 * states use warp shuffles within the LPC lanes of a channel.
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
 * order by a second kernel, so results are bit-identical from run to run.
 *
 * Memory: the backward recomputes the states chunk by chunk from checkpoints
 * (the state at every chunk start), kept in scratch from the stream-ordered
 * pool and freed with cudaFreeAsync after the launches that use it.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cuda_dtypes.cuh"
#include "cuda_ops.h"

#define LOG2E 1.4426950408889634f

typedef struct {
  int B, L, D, N, G;
  int CH, LPC, TC;       /* channels per block, lanes per channel, steps per chunk */
  int softplus;
  const void *u, *delta, *Bm, *Cm, *z;
  const float *A, *Dskip, *dbias, *h0;
  const uint8_t *reset;
  /* forward */
  void *out;
  float *h_last;
  /* backward */
  const void *dout;
  const float *dh_last;
  float *ck;              /* (B, nchunks, D, N) state at each chunk start */
  void *du, *ddelta, *dz;
  float *dA_part;         /* (B, D, N) */
  float *dD_part, *ddb_part; /* (B, D) */
  float *dB_part, *dC_part;  /* (B, D / CH, L, N) */
  float *dh0;             /* (B, D, N) */
} scan_params;

static __device__ __forceinline__ float softplus_f(float x) {
  return x > 20.0f ? x : log1pf(expf(x));
}

static __device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

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
 * grid (D / CH, B), block CH * LPC threads.
 * shared: u_s, dt_s, y_s (TC, CH); B_s, C_s (TC, N); rs_s (TC). */
template <class IO, int NPT, int LPC>
__global__ void scan_forward_kernel(scan_params p) {
  typedef typename IO::T T;
  extern __shared__ float smem[];
  const int CH = p.CH, TC = p.TC, N = p.N, D = p.D, L = p.L;
  float *u_s = smem;                 // (TC, CH)
  float *dt_s = u_s + TC * CH;       // (TC, CH)
  float *y_s = dt_s + TC * CH;       // (TC, CH)
  float *B_s = y_s + TC * CH;        // (TC, N)
  float *C_s = B_s + TC * N;         // (TC, N)
  float *rs_s = C_s + TC * N;        // (TC)

  const int b = blockIdx.y, d0 = blockIdx.x * CH;
  const int g = d0 / (D / p.G);
  const int c = threadIdx.x / LPC, j = threadIdx.x % LPC, d = d0 + c;
  const unsigned mask = warp_mask();
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
  const float Dd = p.Dskip ? p.Dskip[d] : 0.0f;

  for (int t0 = 0; t0 < L; t0 += TC) {
    const int tc = min(TC, L - t0);
    /* stage the chunk's inputs */
    for (int i = threadIdx.x; i < tc * CH; i += blockDim.x) {
      int t = i / CH, cc = i % CH;
      int64_t gi = ((int64_t)b * L + t0 + t) * D + d0 + cc;
      float dl = IO::load(delta[gi]) + (p.dbias ? p.dbias[d0 + cc] : 0.0f);
      u_s[t * CH + cc] = IO::load(u[gi]);
      dt_s[t * CH + cc] = p.softplus ? softplus_f(dl) : dl;
    }
    for (int i = threadIdx.x; i < tc * N; i += blockDim.x) {
      int t = i / N, n = i % N;
      int64_t gi = (((int64_t)b * L + t0 + t) * p.G + g) * N + n;
      B_s[i] = IO::load(Bm[gi]);
      C_s[i] = IO::load(Cm[gi]);
    }
    for (int t = threadIdx.x; t < tc; t += blockDim.x)
      rs_s[t] = (p.reset && p.reset[(int64_t)b * L + t0 + t]) ? 0.0f : 1.0f;
    __syncthreads();

    /* advance the states through the chunk */
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
      acc = lane_sum<LPC>(acc, mask);
      if (j == 0) y_s[t * CH + c] = fmaf(Dd, u_s[t * CH + c], acc);
    }
    __syncthreads();

    /* gate and store */
    for (int i = threadIdx.x; i < tc * CH; i += blockDim.x) {
      int t = i / CH, cc = i % CH;
      int64_t gi = ((int64_t)b * L + t0 + t) * D + d0 + cc;
      float y = y_s[t * CH + cc];
      if (z) {
        float zz = IO::load(z[gi]);
        y *= zz * sigmoid_f(zz);
      }
      out[gi] = IO::store(y);
    }
    /* the next chunk's staging writes u_s/dt_s/B_s/C_s only: the barrier
     * above ordered every read of them; y_s is next written after the
     * next chunk's barrier. */
  }
#pragma unroll
  for (int k = 0; k < NPT; k++) {
    int n = j + k * LPC;
    if (n < N) p.h_last[((int64_t)b * D + d) * N + n] = h[k];
  }
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
      if (p.softplus) {
        dt_s[i] = softplus_f(dl);
        fac_s[i] = dl > 20.0f ? 1.0f : sigmoid_f(dl);
      } else {
        dt_s[i] = dl;
        fac_s[i] = 1.0f;
      }
      if (full) {
        float go = IO::load(dout[gi]);
        if (z) {
          float zz = IO::load(z[gi]);
          go *= zz * sigmoid_f(zz);
        }
        dy_s[i] = go;
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
      if (p.du) ((T *)p.du)[gi] = IO::store(du_s[i]);
      if (p.ddelta) ((T *)p.ddelta)[gi] = IO::store(dd_s[i]);
      if (p.dz) {
        float zz = IO::load(z[gi]), s = sigmoid_f(zz);
        float go = IO::load(dout[gi]);
        ((T *)p.dz)[gi] = IO::store(go * yp_s[i] * s * (1.0f + zz * (1.0f - s)));
      }
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

/* dB[b, t, g, n] = Σ over the blocks of group g of part[b, blk, t, n]. */
template <class IO>
__global__ void scan_reduce_bc_kernel(const float *part, void *out, int B, int L, int G, int N,
                                      int nblk) {
  typedef typename IO::T T;
  const int per_g = nblk / G;
  int64_t total = (int64_t)B * L * G * N;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    int n = (int)(i % N);
    int64_t r = i / N;
    int g = (int)(r % G);
    r /= G;
    int t = (int)(r % L);
    int b = (int)(r / L);
    float s = 0.0f;
    for (int k = 0; k < per_g; k++)
      s += part[(((int64_t)b * nblk + g * per_g + k) * L + t) * N + n];
    ((T *)out)[i] = IO::store(s);
  }
}

/* out[i] = Σ_b part[b, i] for i < M (dA, dD, dbias). */
__global__ void scan_reduce_batch_kernel(const float *part, float *out, int B, int64_t M) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < M;
       i += (int64_t)gridDim.x * blockDim.x) {
    float s = 0.0f;
    for (int b = 0; b < B; b++) s += part[(int64_t)b * M + i];
    out[i] = s;
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
  int per_g = D / G, ch = 32;
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

template <class IO, int NPT, int LPC>
static void launch_forward(const scan_params &p, dim3 grid, size_t smem, cudaStream_t s) {
  scan_forward_kernel<IO, NPT, LPC><<<grid, p.CH * LPC, smem, s>>>(p);
}

template <class IO, int NPT>
static int forward_lpc(const scan_params &p, dim3 grid, size_t smem, cudaStream_t s) {
  switch (p.LPC) {
    case 1: launch_forward<IO, NPT, 1>(p, grid, smem, s); break;
    case 2: launch_forward<IO, NPT, 2>(p, grid, smem, s); break;
    case 4: launch_forward<IO, NPT, 4>(p, grid, smem, s); break;
    case 8: launch_forward<IO, NPT, 8>(p, grid, smem, s); break;
    case 16: launch_forward<IO, NPT, 16>(p, grid, smem, s); break;
    default: launch_forward<IO, NPT, 32>(p, grid, smem, s); break;
  }
  return MX_OK;
}

template <class IO>
static void forward_io(const scan_params &p, int npt, dim3 grid, size_t smem, cudaStream_t s) {
  if (npt == 4) forward_lpc<IO, 4>(p, grid, smem, s);
  else forward_lpc<IO, 8>(p, grid, smem, s);
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
  int npt;
  pick_lanes(p.N, &npt, &p.LPC);
  rc = mx_cuda_begin(dev, err, &d);
  if (rc != MX_OK) return rc;
  p.CH = pick_ch(p.B, p.D, p.G, p.LPC, d->sm_count);
  p.TC = p.N > 64 ? 8 : 32;
  size_t smem = sizeof(float) * ((size_t)3 * p.TC * p.CH + 2 * (size_t)p.TC * p.N + p.TC);
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
static int backward_io(const scan_params &p, const mx_scan_grads *gr, int npt, dim3 grid,
                       size_t smem, mx_cuda_dev *d, mx_err *err) {
  int rc = npt == 4 ? backward_lpc<IO, 4>(p, grid, smem, d->stream, d, err)
                    : backward_lpc<IO, 8>(p, grid, smem, d->stream, d, err);
  if (rc != MX_OK) return rc;
  int nblk = p.D / p.CH;
  unsigned gbc = mx_cuda_grid(d, (uint64_t)p.B * p.L * p.G * p.N);
  if (gr->dB) {
    scan_reduce_bc_kernel<IO><<<gbc, MX_BLOCK, 0, d->stream>>>(p.dB_part, gr->dB, p.B, p.L, p.G, p.N, nblk);
    MX_CUDA_LAUNCHED(d, err, "scan_reduce_bc_kernel");
  }
  if (gr->dC) {
    scan_reduce_bc_kernel<IO><<<gbc, MX_BLOCK, 0, d->stream>>>(p.dC_part, gr->dC, p.B, p.L, p.G, p.N, nblk);
    MX_CUDA_LAUNCHED(d, err, "scan_reduce_bc_kernel");
  }
  if (gr->dA) {
    int64_t M = (int64_t)p.D * p.N;
    scan_reduce_batch_kernel<<<mx_cuda_grid(d, (uint64_t)M), MX_BLOCK, 0, d->stream>>>(
        p.dA_part, (float *)gr->dA, p.B, M);
    MX_CUDA_LAUNCHED(d, err, "scan_reduce_batch_kernel");
  }
  if (gr->dD) {
    scan_reduce_batch_kernel<<<mx_cuda_grid(d, (uint64_t)p.D), MX_BLOCK, 0, d->stream>>>(
        p.dD_part, (float *)gr->dD, p.B, p.D);
    MX_CUDA_LAUNCHED(d, err, "scan_reduce_batch_kernel");
  }
  if (gr->ddelta_bias) {
    scan_reduce_batch_kernel<<<mx_cuda_grid(d, (uint64_t)p.D), MX_BLOCK, 0, d->stream>>>(
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
  pick_lanes(p.N, &npt, &p.LPC);
  rc = mx_cuda_begin(dev, err, &d);
  if (rc != MX_OK) return rc;
  p.CH = pick_ch(p.B, p.D, p.G, p.LPC, d->sm_count);
  p.TC = BWD_TC;
  int nblk = p.D / p.CH, nchunks = (p.L + BWD_TC - 1) / BWD_TC;
  size_t TC = BWD_TC, NP = (size_t)p.N + 1;
  size_t smem = sizeof(float) * (7 * TC * p.CH + 2 * TC * p.N + TC + 2 * TC * p.CH * NP);

  /* scratch: checkpoints and partial sums, one allocation */
  size_t n_ck = (size_t)p.B * nchunks * p.D * p.N;
  size_t n_bd = (size_t)p.B * p.D, n_bdn = n_bd * p.N, n_bc = (size_t)p.B * nblk * p.L * p.N;
  size_t total = n_ck + n_bdn + 2 * n_bd + 2 * n_bc;
  float *scratch = NULL;
  rc = MX_CUDA_CALL(d, err, cudaMallocAsync((void **)&scratch, total * sizeof(float), d->stream));
  if (rc != MX_OK) {
    mx_cuda_unlock(d);
    return rc;
  }
  p.ck = scratch;
  p.dA_part = p.ck + n_ck;
  p.dD_part = p.dA_part + n_bdn;
  p.ddb_part = p.dD_part + n_bd;
  p.dB_part = p.ddb_part + n_bd;
  p.dC_part = p.dB_part + n_bc;
  dim3 grid((unsigned)nblk, (unsigned)p.B);
  switch (a->io) {
    case MX_F32: rc = backward_io<mx_t_f32>(p, gr, npt, grid, smem, d, err); break;
    case MX_BF16: rc = backward_io<mx_t_bf16>(p, gr, npt, grid, smem, d, err); break;
    default: rc = backward_io<mx_t_f16>(p, gr, npt, grid, smem, d, err); break;
  }
  cudaFreeAsync(scratch, d->stream); /* stream-ordered after the launches */
  mx_cuda_unlock(d);
  return rc;
}

/*
 * conv1d.cu: the causal depthwise conv1d of the CUDA backend, forward and
 * backward (math and gradient conventions: c_src/cpu/conv1d_cpu.c).
 *
 * Types: io (x, out, d_out, dx) f32 or bf16; param (weight, bias, states and
 * their gradients) f32; all math in fp32.
 *
 * Work split. A "lane" is one thread's channels: VEC consecutive channels
 * (forward 4, backward 2: one 16/8-byte f32 or 8/4-byte bf16 access) when C
 * is a multiple of VEC and the io pointers are aligned for it, else one
 * channel. An "item" is a tile of tt consecutive steps of one sequence:
 * item = b * ntt + tile. tt is as long as possible while the grid still has
 * about CV_*_THREADS_PER_SM threads per multiprocessor (about what is
 * resident at once: one wave, few recomputed halo steps; at B 256, L 60,
 * C 512 the backward takes whole sequences and the forward halves); a
 * function of the shapes and the device only (cv_layout). Blocks are
 * (TX, TY) = CV_BLOCK (256) threads: TX lanes along the channels (a warp
 * reads consecutive lanes of one row: coalesced) and TY items. Inside a
 * tile, offsets from the tile's first row are 32-bit (cv_check bounds
 * (1 + 2K) C and L); the tile's base pointer is computed in 64 bits.
 *
 * Forward: a thread keeps the last W inputs of its lane in registers (the
 * K = W - 1 before its tile come from x or the initial state), loads its
 * tile's rows CV_UNR_FWD at a time ahead of the arithmetic (no bounds checks
 * inside full batches), and writes out. The thread with a sequence's last
 * tile writes the final state (its window).
 *
 * Backward: a thread walks steps s = t0 .. t1 + K - 1 of its tile, keeping
 * windows of the last W inputs and the last W values of g = d_out silu'(pre)
 * (pre recomputed from the window). At step s it adds g_s x-window to its
 * dweight/dbias sums (s < t1) and writes dxpad[s - K] = sum_j w[j] g[s - j]
 * (+ dh_last): dx for s - K >= t0, and for the first tile of a sequence the
 * initial state's gradient (s - K < 0). Steps past L have g = 0. Only the K
 * steps past the tile (its halo) are computed twice. Rows are loaded
 * CV_UNR_BWD steps at a time (bounds checked only in the tile's last
 * batches), with the next batch's rows prefetched into L2.
 *
 * Parameter-gradient reduction (deterministic, no float atomics, one
 * launch): each block owns a group of TY * per consecutive items (thread ty
 * takes per of them, in order) and sums its threads' partials over
 * ty = 0, 1, ... through shared memory into part[lane tile][group]
 * ((W + 1) * VEC * TX floats). It then takes a ticket (an unsigned atomic
 * counter per lane tile); the block that draws the last ticket sums the
 * groups of its lane tile in CV_SLICES fixed slices of consecutive groups
 * (in order) and the slices in order, writes (or adds to) dweight and dbias
 * and resets the counter to 0 for the next launch. Which block is last does
 * not change any sum's order: bit-identical reruns. The counters are a static
 * device array (cv_tickets, zero at load, left at zero by every launch);
 * more lane tiles than it holds take zeroed counters in the scratch. Scratch
 * is stream-ordered (cudaMallocAsync/FreeAsync).
 */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_dtypes.cuh"
#include "cuda_ops.h"
#include "cuda_runtime_state.h"

#define CV_MAX_W 8
/* Rows loaded ahead of the arithmetic: forward, backward (two rows each). */
#define CV_UNR_FWD 8
#define CV_UNR_BWD 4
#define CV_GRID_Y 65535
/* Threads per block of the conv kernels (TX * TY). */
#define CV_BLOCK 256
/* Target threads per multiprocessor (sets the tile length). */
#define CV_FWD_THREADS_PER_SM 480
#define CV_BWD_THREADS_PER_SM 480
/* Backward: prefetch the next batch of rows into L2 (1) or not (0). */
#define CV_PREFETCH 1
/* Shortest tile (unless L is shorter). */
#define CV_MIN_TT 4
/* Backward: at most this many partial groups per lane tile. */
#define CV_MAX_GROUPS 128
/* Backward: slices of the final reduction over groups. */
#define CV_SLICES 4
/* Lane tiles with a static ticket counter. */
#define CV_TICKETS 4096

static __device__ unsigned cv_tickets[CV_TICKETS];

struct cv_params {
  const void *x;       /* (B, L, C) io */
  const float *w;      /* (C, W) */
  const float *bias;   /* (C) or NULL */
  const float *h0;     /* (B, C, K) or NULL */
  void *out;           /* (B, L, C) io (forward) */
  float *h_last;       /* (B, C, K) or NULL (forward) */
  const void *dout;    /* (B, L, C) io (backward) */
  const float *dh_last;/* (B, C, K) or NULL */
  void *dx;            /* (B, L, C) io or NULL */
  float *dh0;          /* (B, C, K) or NULL */
  float *dweight;      /* (C, W) or NULL */
  float *dbias;        /* (C) or NULL */
  float *part;         /* (lane tiles, groups, (W + 1) * VEC * TX) or NULL */
  unsigned *ticket;    /* (lane tiles) zeroed counters, or NULL: cv_tickets */
  int64_t B;
  int L, C;            /* <= INT_MAX; (tt + 2K) * C <= INT_MAX */
  int lanes;           /* ceil(C / VEC) */
  int tt;              /* steps per tile */
  int64_t ntt;         /* tiles per sequence */
  int64_t items;       /* B * ntt */
  int64_t per;         /* backward: items per thread in a group */
  int64_t groups;      /* backward: item groups (TY * per items each) */
  int accumulate;
  int prefetch;        /* backward: prefetch the next batch into L2 */
};

/* ---- vector loads and stores of VEC consecutive channels --------------- */

template <class IO, int VEC>
MX_DEV void cv_load(const typename IO::T *p, float (&v)[VEC]) {
  if constexpr (VEC == 4 && sizeof(typename IO::T) == 4) {
    const float4 q = *reinterpret_cast<const float4 *>(p);
    v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
  } else if constexpr (VEC == 4) {
    const uint2 q = *reinterpret_cast<const uint2 *>(p);
    v[0] = IO::load((uint16_t)(q.x & 0xffffu));
    v[1] = IO::load((uint16_t)(q.x >> 16));
    v[2] = IO::load((uint16_t)(q.y & 0xffffu));
    v[3] = IO::load((uint16_t)(q.y >> 16));
  } else if constexpr (VEC == 2 && sizeof(typename IO::T) == 4) {
    const float2 q = *reinterpret_cast<const float2 *>(p);
    v[0] = q.x; v[1] = q.y;
  } else if constexpr (VEC == 2) {
    const uint32_t q = *reinterpret_cast<const uint32_t *>(p);
    v[0] = IO::load((uint16_t)(q & 0xffffu));
    v[1] = IO::load((uint16_t)(q >> 16));
  } else {
#pragma unroll
    for (int i = 0; i < VEC; i++) v[i] = IO::load(p[i]);
  }
}

template <class IO, int VEC>
MX_DEV void cv_store(typename IO::T *p, const float (&v)[VEC]) {
  if constexpr (VEC == 4 && sizeof(typename IO::T) == 4) {
    *reinterpret_cast<float4 *>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else if constexpr (VEC == 4) {
    uint2 q;
    q.x = (uint32_t)IO::store(v[0]) | ((uint32_t)IO::store(v[1]) << 16);
    q.y = (uint32_t)IO::store(v[2]) | ((uint32_t)IO::store(v[3]) << 16);
    *reinterpret_cast<uint2 *>(p) = q;
  } else if constexpr (VEC == 2 && sizeof(typename IO::T) == 4) {
    *reinterpret_cast<float2 *>(p) = make_float2(v[0], v[1]);
  } else if constexpr (VEC == 2) {
    *reinterpret_cast<uint32_t *>(p) =
        (uint32_t)IO::store(v[0]) | ((uint32_t)IO::store(v[1]) << 16);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; i++) p[i] = IO::store(v[i]);
  }
}

/* sigmoid with the fast exp and divide (relative error ~1e-6; p -> -inf
 * gives 0, p -> +inf gives 1) */
MX_DEV float cv_sigmoid(float p) { return __fdividef(1.0f, 1.0f + __expf(-p)); }

/* The thread's weights (W, VEC) and bias (VEC). */
template <int W, int VEC>
MX_DEV void cv_weights(const cv_params &p, int c0, float (&w)[W][VEC], float (&bias)[VEC]) {
#pragma unroll
  for (int v = 0; v < VEC; v++) {
#pragma unroll
    for (int j = 0; j < W; j++) w[j][v] = p.w[(int64_t)(c0 + v) * W + j];
    bias[v] = p.bias ? p.bias[c0 + v] : 0.0f;
  }
}

/* The window before step t0 of sequence b (xt points at row t0, lane c0):
 * win[k + 1] = xpad[t0 - K + k] for k < K; win[0] (dropped by the first
 * shift) is 0. After the shift of step t, win[j] = xpad[t + j - K]. */
template <class IO, int W, int VEC>
MX_DEV void cv_window(const cv_params &p, const typename IO::T *xt, int64_t b, int c0, int t0,
                      float (&win)[W][VEC]) {
  constexpr int K = W - 1;
#pragma unroll
  for (int v = 0; v < VEC; v++) win[0][v] = 0.0f;
#pragma unroll
  for (int k = 0; k < K; k++) {
    const int s = t0 - K + k;
    float (&dst)[VEC] = win[k + 1 < W ? k + 1 : 0];
    if (s >= 0) {
      cv_load<IO, VEC>(xt - (K - k) * p.C, dst);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; v++)
        dst[v] = p.h0 ? p.h0[(b * p.C + c0 + v) * K + (K + s)] : 0.0f;
    }
  }
}

template <int W, int VEC>
MX_DEV void cv_shift(float (&win)[W][VEC], const float (&in)[VEC]) {
#pragma unroll
  for (int k = 0; k + 1 < W; k++)
#pragma unroll
    for (int v = 0; v < VEC; v++) win[k][v] = win[k + 1][v];
#pragma unroll
  for (int v = 0; v < VEC; v++) win[W - 1][v] = in[v];
}

/* pre = bias + sum_j w[j] win[j], j in order */
template <int W, int VEC>
MX_DEV void cv_pre(const float (&w)[W][VEC], const float (&bias)[VEC], const float (&win)[W][VEC],
                   float (&pre)[VEC]) {
#pragma unroll
  for (int v = 0; v < VEC; v++) {
    float acc = bias[v];
#pragma unroll
    for (int j = 0; j < W; j++) acc += w[j][v] * win[j][v];
    pre[v] = acc;
  }
}

/* ---- forward ------------------------------------------------------------- */

template <int W, int VEC, bool SILU>
MX_DEV void cv_fstep(const float (&w)[W][VEC], const float (&bias)[VEC], float (&win)[W][VEC],
                     const float (&xs)[VEC], float (&o)[VEC]) {
  cv_shift<W, VEC>(win, xs);
  cv_pre<W, VEC>(w, bias, win, o);
  if (SILU) {
#pragma unroll
    for (int v = 0; v < VEC; v++) o[v] = o[v] * cv_sigmoid(o[v]);
  }
}

template <class IO, int W, int VEC, bool SILU>
static __global__ void __launch_bounds__(CV_BLOCK) cv_forward_kernel(cv_params p) {
  constexpr int U = CV_UNR_FWD;
  typedef typename IO::T T;
  constexpr int K = W - 1;
  const int lane = blockIdx.x * blockDim.x + threadIdx.x;
  if (lane >= p.lanes) return;
  const int c0 = lane * VEC, C = p.C, L = p.L;
  float w[W][VEC], bias[VEC];
  cv_weights<W, VEC>(p, c0, w, bias);
  for (int64_t item = (int64_t)blockIdx.y * blockDim.y + threadIdx.y; item < p.items;
       item += (int64_t)gridDim.y * blockDim.y) {
    const int64_t b = item / p.ntt;
    const int tile = (int)(item - b * p.ntt);
    const int t0 = tile * p.tt, t1 = L - t0 > p.tt ? t0 + p.tt : L;
    const int64_t base = (b * L + t0) * C + c0; /* row t0, lane c0 */
    const T *xt = (const T *)p.x + base;
    T *ot = (T *)p.out + base;
    float win[W][VEC];
    cv_window<IO, W, VEC>(p, xt, b, c0, t0, win);
    /* batches of U rows; only the last one of a tile checks bounds */
    for (int s = t0, o = 0; s < t1; s += U, o += U * C) { /* o = (s - t0) * C */
      float xs[U][VEC];
      if (s + U <= t1) {
#pragma unroll
        for (int u = 0; u < U; u++) cv_load<IO, VEC>(xt + (o + u * C), xs[u]);
#pragma unroll
        for (int u = 0; u < U; u++) {
          float r[VEC];
          cv_fstep<W, VEC, SILU>(w, bias, win, xs[u], r);
          cv_store<IO, VEC>(ot + (o + u * C), r);
        }
      } else {
#pragma unroll
        for (int u = 0; u < U; u++)
          if (s + u < t1) cv_load<IO, VEC>(xt + (o + u * C), xs[u]);
#pragma unroll
        for (int u = 0; u < U; u++) {
          if (s + u < t1) {
            float r[VEC];
            cv_fstep<W, VEC, SILU>(w, bias, win, xs[u], r);
            cv_store<IO, VEC>(ot + (o + u * C), r);
          }
        }
      }
    }
    if (K > 0 && p.h_last && tile == p.ntt - 1) {
      /* win[k + 1] = xpad[L - K + k]: VEC * K consecutive floats */
      float *hl = p.h_last + (b * C + c0) * K;
#pragma unroll
      for (int v = 0; v < VEC; v++)
#pragma unroll
        for (int k = 0; k < K; k++) hl[v * K + k] = win[k + 1 < W ? k + 1 : 0][v];
    }
  }
}

/* ---- backward ------------------------------------------------------------ */

/* One backward step: shift x into the window (when `have`: the row exists),
 * g = d_out silu'(pre) (0 without the row), shift g into its window, add to
 * the parameter sums (`acc`: the step is the tile's own), and d = the dxpad
 * row complete at this step (s - K) without dh_last. */
template <int W, int VEC, bool SILU>
MX_DEV void cv_bstep(const float (&w)[W][VEC], const float (&bias)[VEC], float (&xw)[W][VEC],
                     float (&gw)[W][VEC], float (&dw)[W][VEC], float (&db)[VEC],
                     const float (&xs)[VEC], const float (&ds)[VEC], bool have, bool acc,
                     float (&d)[VEC]) {
  float g[VEC];
  if (have) {
    cv_shift<W, VEC>(xw, xs);
    if (SILU) {
      float pre[VEC];
      cv_pre<W, VEC>(w, bias, xw, pre);
#pragma unroll
      for (int v = 0; v < VEC; v++) {
        const float sg = cv_sigmoid(pre[v]);
        g[v] = ds[v] * (sg * (1.0f + pre[v] * (1.0f - sg)));
      }
    } else {
#pragma unroll
      for (int v = 0; v < VEC; v++) g[v] = ds[v];
    }
  } else {
#pragma unroll
    for (int v = 0; v < VEC; v++) g[v] = 0.0f;
  }
  cv_shift<W, VEC>(gw, g);
  if (acc) {
#pragma unroll
    for (int v = 0; v < VEC; v++) {
#pragma unroll
      for (int j = 0; j < W; j++) dw[j][v] += g[v] * xw[j][v];
      db[v] += g[v];
    }
  }
#pragma unroll
  for (int v = 0; v < VEC; v++) {
    float acc = 0.0f;
#pragma unroll
    for (int j = 0; j < W; j++) acc += w[j][v] * gw[W - 1 - j][v];
    d[v] = acc;
  }
}

template <class IO, int W, int VEC, bool SILU>
static __global__ void __launch_bounds__(CV_BLOCK, 2) cv_backward_kernel(cv_params p) {
  constexpr int U = CV_UNR_BWD;
  typedef typename IO::T T;
  constexpr int K = W - 1;
  constexpr int NP = (W + 1) * VEC; /* partial sums per thread */
  __shared__ float cv_sm[CV_BLOCK * NP]; /* (TY, NP, TX), then (CV_SLICES, NP * TX) */
  __shared__ int cv_last;
  const int lane = blockIdx.x * blockDim.x + threadIdx.x;
  const bool active = lane < p.lanes;
  const int c0 = lane * VEC, C = p.C, L = p.L;
  float w[W][VEC], bias[VEC];
  if (active) cv_weights<W, VEC>(p, c0, w, bias);
  float dw[W][VEC], db[VEC];
#pragma unroll
  for (int v = 0; v < VEC; v++) {
    db[v] = 0.0f;
#pragma unroll
    for (int j = 0; j < W; j++) dw[j][v] = 0.0f;
  }
  const int64_t first = ((int64_t)blockIdx.y * blockDim.y + threadIdx.y) * p.per;
  for (int64_t r = 0; r < p.per && active; r++) {
    const int64_t item = first + r;
    if (item >= p.items) break;
    const int64_t b = item / p.ntt;
    const int tile = (int)(item - b * p.ntt);
    const int t0 = tile * p.tt, t1 = L - t0 > p.tt ? t0 + p.tt : L;
    const int64_t base = (b * L + t0) * C + c0; /* row t0, lane c0 */
    const T *xt = (const T *)p.x + base;
    const T *dt = (const T *)p.dout + base;
    T *dxt = p.dx ? (T *)p.dx + base : NULL;
    float xw[W][VEC], gw[W][VEC];
    cv_window<IO, W, VEC>(p, xt, b, c0, t0, xw);
#pragma unroll
    for (int j = 0; j < W; j++)
#pragma unroll
      for (int v = 0; v < VEC; v++) gw[j][v] = 0.0f;
    /* the dxpad row t = s - K, finished at step s: dx, dh0 or nothing */
    auto put = [&](int s, float (&d)[VEC], bool tail) {
      const int t = s - K;
      if (t < t0 && (t0 > 0 || !p.dh0)) return; /* the previous tile's row, or unwanted */
      if (tail && p.dh_last && t >= L - K) {
#pragma unroll
        for (int v = 0; v < VEC; v++) d[v] += p.dh_last[(b * C + c0 + v) * K + (t - L + K)];
      }
      if (t >= t0) {
        if (dxt) cv_store<IO, VEC>(dxt + (t - t0) * C, d);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; v++) {
          float *dst = p.dh0 + (b * C + c0 + v) * K + (t + K);
          *dst = p.accumulate ? *dst + d[v] : d[v];
        }
      }
    };
    /* steps s < send in batches of U; batches inside [t0, t1) check no
     * bounds, the rest (the tile's end and its halo) do */
    const int send = t1 + K, sload = send < L ? send : L; /* rows < sload exist */
    for (int s = t0, o = 0; s < send; s += U, o += U * C) { /* o = (s - t0) * C */
      float xs[U][VEC], ds[U][VEC];
      if (p.prefetch) {
        /* the next batch's rows into L2 (no registers held) */
#pragma unroll
        for (int u = U; u < 2 * U; u++) {
          if (s + u < sload) {
            asm volatile("prefetch.global.L2 [%0];" ::"l"(xt + (o + u * C)));
            asm volatile("prefetch.global.L2 [%0];" ::"l"(dt + (o + u * C)));
          }
        }
      }
      if (s + U <= t1) {
#pragma unroll
        for (int u = 0; u < U; u++) {
          cv_load<IO, VEC>(xt + (o + u * C), xs[u]);
          cv_load<IO, VEC>(dt + (o + u * C), ds[u]);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
          float d[VEC];
          cv_bstep<W, VEC, SILU>(w, bias, xw, gw, dw, db, xs[u], ds[u], true, true, d);
          put(s + u, d, false);
        }
      } else {
#pragma unroll
        for (int u = 0; u < U; u++) {
          if (s + u < sload) {
            cv_load<IO, VEC>(xt + (o + u * C), xs[u]);
            cv_load<IO, VEC>(dt + (o + u * C), ds[u]);
          }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
          if (s + u < send) {
            float d[VEC];
            cv_bstep<W, VEC, SILU>(w, bias, xw, gw, dw, db, xs[u], ds[u], s + u < L, s + u < t1,
                                   d);
            put(s + u, d, true);
          }
        }
      }
    }
  }
  if (!p.part) return; /* uniform over the grid */

  /* the block's partial: sum over ty in order */
  const int TX = blockDim.x, TY = blockDim.y, NPT = NP * TX;
  const int tid = threadIdx.y * TX + threadIdx.x, nthreads = TX * TY;
#pragma unroll
  for (int i = 0; i < NP; i++)
    cv_sm[(threadIdx.y * NP + i) * TX + threadIdx.x] =
        i < W * VEC ? dw[i / VEC][i % VEC] : db[i - W * VEC];
  __syncthreads();
  const int G = gridDim.y;
  float *tile_part = p.part + (int64_t)blockIdx.x * G * NPT; /* (G, NPT) */
  for (int col = tid; col < NPT; col += nthreads) {
    float s = 0.0f;
    for (int y = 0; y < TY; y++) s += cv_sm[y * NPT + col];
    tile_part[(int64_t)blockIdx.y * NPT + col] = s;
  }
  __threadfence();
  __syncthreads();
  unsigned *ticket = (p.ticket ? p.ticket : cv_tickets) + blockIdx.x;
  if (tid == 0) cv_last = atomicAdd(ticket, 1u) == (unsigned)G - 1;
  __syncthreads();
  if (!cv_last) return;
  __threadfence();

  /* the last block of this lane tile: slice k sums groups
   * [G k / S, G (k + 1) / S) in order into cv_sm[k][col] */
  if (NPT % 4 == 0) {
    const int N4 = NPT / 4;
    for (int u = tid; u < N4 * CV_SLICES; u += nthreads) {
      const int c4 = u % N4, k = u / N4;
      const int g0 = G * k / CV_SLICES, g1 = G * (k + 1) / CV_SLICES;
      float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 4
      for (int g = g0; g < g1; g++) {
        const float4 q = __ldcg(reinterpret_cast<const float4 *>(tile_part + (int64_t)g * NPT) + c4);
        a.x += q.x; a.y += q.y; a.z += q.z; a.w += q.w;
      }
      float *dst = cv_sm + k * NPT + 4 * c4;
      dst[0] = a.x; dst[1] = a.y; dst[2] = a.z; dst[3] = a.w;
    }
  } else {
    for (int u = tid; u < NPT * CV_SLICES; u += nthreads) {
      const int col = u % NPT, k = u / NPT;
      const int g0 = G * k / CV_SLICES, g1 = G * (k + 1) / CV_SLICES;
      float a = 0.0f;
#pragma unroll 4
      for (int g = g0; g < g1; g++) a += __ldcg(tile_part + (int64_t)g * NPT + col);
      cv_sm[k * NPT + col] = a;
    }
  }
  __syncthreads();
  for (int col = tid; col < NPT; col += nthreads) {
    float t = cv_sm[col];
#pragma unroll
    for (int k = 1; k < CV_SLICES; k++) t += cv_sm[k * NPT + col];
    const int i = col / TX, tx = col - i * TX, j = i / VEC, v = i - j * VEC;
    const int c = (blockIdx.x * TX + tx) * VEC + v;
    if (c >= C) continue;
    float *dst = j < W ? (p.dweight ? p.dweight + (int64_t)c * W + j : NULL)
                       : (p.dbias ? p.dbias + c : NULL);
    if (dst) *dst = p.accumulate ? *dst + t : t;
  }
  if (tid == 0) *ticket = 0u;
}

/* dst[i] = [dst[i] +] (src ? src[i] : 0) */
static __global__ void __launch_bounds__(MX_BLOCK)
    cv_set_kernel(float *dst, const float *src, int64_t n, int accumulate) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const float v = src ? src[i] : 0.0f;
    dst[i] = accumulate ? dst[i] + v : v;
  }
}

/* ---- launchers ------------------------------------------------------------- */

static int cv_check(const mx_conv1d_args *a, const char *op, mx_err *err) {
  if (!a) return mx_cuda_fail(err, MX_E_ARG, "%s: no arguments", op);
  if (a->param != MX_F32 || (a->io != MX_F32 && a->io != MX_BF16))
    return mx_cuda_fail(err, MX_E_ARG, "%s: CUDA takes param f32 and io f32 or bf16", op);
  if (a->batch < 0 || a->len < 0 || a->channels < 0 || a->width < 1 || a->width > CV_MAX_W)
    return mx_cuda_fail(err, MX_E_ARG, "%s: bad sizes (need B, L, C >= 0 and 1 <= W <= 8)", op);
  /* 32-bit steps and in-tile offsets: (1 + 2K) C and L + K fit in an int */
  if (a->len > INT_MAX - 2 * CV_MAX_W || a->channels > INT_MAX / (2 * a->width - 1))
    return mx_cuda_fail(err, MX_E_ARG, "%s: L or C too large for the CUDA kernels", op);
  if (a->batch * a->channels > 0 && !a->weight)
    return mx_cuda_fail(err, MX_E_ARG, "%s: weight is required", op);
  if (a->batch * a->len * a->channels > 0 && !a->x)
    return mx_cuda_fail(err, MX_E_ARG, "%s: x is required", op);
  return MX_OK;
}

static int cv_set(mx_cuda_dev *d, float *dst, const float *src, int64_t n, int accumulate,
                  mx_err *err) {
  if (!dst || n <= 0 || (accumulate && !src)) return MX_OK;
  cv_set_kernel<<<mx_cuda_grid(d, (uint64_t)n), MX_BLOCK, 0, d->stream>>>(dst, src, n,
                                                                         accumulate);
  MX_CUDA_LAUNCHED(d, err, "cv_set_kernel");
  return MX_OK;
}

static bool cv_aligned(const void *ptr, size_t bytes) {
  return ptr == NULL || ((uintptr_t)ptr % bytes) == 0;
}

#ifdef CV_TUNE
/* tuning builds only (-DCV_TUNE): an integer from the environment, or `def`
 * (CV_FWD_TPSM, CV_BWD_TPSM, CV_MIN_TT, CV_PF, CV_MAX_GROUPS) */
static int cv_env(const char *name, int def) {
  const char *s = getenv(name);
  return s && *s ? atoi(s) : def;
}
#else
#define cv_env(name, def) (def)
#endif

/* The widest of `vecs` (descending, ending with 1) that divides C and whose
 * accesses the io pointers are aligned for. */
static int cv_pick_vec(const mx_conv1d_args *a, const void *const *io_ptrs, int n_ptrs,
                       const int *vecs) {
  const size_t es = mx_dtype_size(a->io);
  for (;; vecs++) {
    const int vec = *vecs;
    bool ok = vec == 1 || a->channels % vec == 0;
    for (int i = 0; i < n_ptrs && ok && vec > 1; i++)
      if (!cv_aligned(io_ptrs[i], vec * es)) ok = false;
    if (ok) return vec;
  }
}

/* Lanes, tiles and the block shape for lanes of `vec` channels. Tiles: as
 * long as possible while the grid still has about `threads` threads (so few
 * halo steps are recomputed), at least CV_MIN_TT steps (or L), and short
 * enough for 32-bit in-tile offsets. */
static void cv_layout(const mx_conv1d_args *a, int vec, int64_t threads, cv_params *p,
                      dim3 *block) {
  const int64_t K = a->width - 1;
  p->B = a->batch;
  p->L = (int)a->len;
  p->C = (int)a->channels;
  p->lanes = (int)((a->channels + vec - 1) / vec);
  const int64_t seqs = a->batch * p->lanes;
  int64_t want = (threads + seqs - 1) / seqs; /* tiles per sequence */
  if (want < 1) want = 1;
  if (want > a->len) want = a->len;
  int64_t tt = (a->len + want - 1) / want;
  const int64_t min_tt = cv_env("CV_MIN_TT", CV_MIN_TT);
  if (tt < min_tt) tt = min_tt < a->len ? min_tt : a->len;
  const int64_t max_tt = (int64_t)INT_MAX / (a->channels > 0 ? a->channels : 1) - 2 * K;
  if (tt > max_tt) tt = max_tt; /* >= 1 by cv_check */
  if (tt < 1) tt = 1;
  p->tt = (int)tt;
  p->ntt = (a->len + tt - 1) / tt;
  p->items = a->batch * p->ntt;
  p->x = a->x;
  p->w = (const float *)a->weight;
  p->bias = (const float *)a->bias;
  p->h0 = (const float *)a->h0;
  unsigned tx = 1;
  while (tx < 32 && (int64_t)tx < p->lanes) tx *= 2;
  *block = dim3(tx, CV_BLOCK / tx);
}

#define CV_BY_W(KERNEL, IO, VEC, SILU, W, ...)                     \
  switch (W) {                                                       \
    case 1: KERNEL<IO, 1, VEC, SILU> __VA_ARGS__; break;                    \
    case 2: KERNEL<IO, 2, VEC, SILU> __VA_ARGS__; break;                    \
    case 3: KERNEL<IO, 3, VEC, SILU> __VA_ARGS__; break;                    \
    case 4: KERNEL<IO, 4, VEC, SILU> __VA_ARGS__; break;                    \
    case 5: KERNEL<IO, 5, VEC, SILU> __VA_ARGS__; break;                    \
    case 6: KERNEL<IO, 6, VEC, SILU> __VA_ARGS__; break;                    \
    case 7: KERNEL<IO, 7, VEC, SILU> __VA_ARGS__; break;                    \
    default: KERNEL<IO, 8, VEC, SILU> __VA_ARGS__; break;                   \
  }

template <class IO, int VEC>
static void cv_forward_w(int W, int silu, const cv_params &p, dim3 grid, dim3 block,
                         cudaStream_t s) {
  if (silu) {
    CV_BY_W(cv_forward_kernel, IO, VEC, true, W, <<<grid, block, 0, s>>>(p))
  } else {
    CV_BY_W(cv_forward_kernel, IO, VEC, false, W, <<<grid, block, 0, s>>>(p))
  }
}

/* Backward instances: lanes of 2 channels (the fastest on the H200 at
 * B 256, L 60, C 512 in f32 and bf16: fewer registers than lanes of 4, so
 * two blocks per multiprocessor) or of 1. */
template <class IO, bool SILU>
static void cv_backward_w(int W, int vec, const cv_params &p, dim3 grid, dim3 block,
                          cudaStream_t s) {
  if (vec == 2) {
    CV_BY_W(cv_backward_kernel, IO, 2, SILU, W, <<<grid, block, 0, s>>>(p))
  } else {
    CV_BY_W(cv_backward_kernel, IO, 1, SILU, W, <<<grid, block, 0, s>>>(p))
  }
}

static unsigned cv_lane_blocks(const cv_params &p, dim3 block) {
  return (unsigned)((p.lanes + block.x - 1) / block.x);
}

int mx_cuda_conv1d_forward(int dev, const mx_conv1d_args *a, void *out, void *h_last,
                           mx_err *err) {
  int rc = cv_check(a, "conv1d_forward", err);
  if (rc != MX_OK) return rc;
  mx_cuda_dev *d = NULL;
  rc = mx_cuda_begin(dev, err, &d);
  if (rc != MX_OK) return rc;
  const int64_t B = a->batch, L = a->len, C = a->channels, K = a->width - 1;
  if (B * C == 0) {
    mx_cuda_unlock(d);
    return MX_OK;
  }
  if (L == 0) {
    rc = cv_set(d, (float *)h_last, (const float *)a->h0, B * C * K, 0, err);
    mx_cuda_unlock(d);
    return rc;
  }
  if (!out) {
    mx_cuda_unlock(d);
    return mx_cuda_fail(err, MX_E_ARG, "conv1d_forward: missing output");
  }
  cv_params p;
  memset(&p, 0, sizeof p);
  const void *ptrs[2] = {a->x, out};
  static const int vecs[] = {4, 1};
  const int vec = cv_pick_vec(a, ptrs, 2, vecs);
  dim3 block;
  cv_layout(a, vec, (int64_t)d->sm_count * cv_env("CV_FWD_TPSM", CV_FWD_THREADS_PER_SM), &p,
            &block);
  p.out = out;
  p.h_last = (float *)h_last;
  const int64_t ygroups = (p.items + block.y - 1) / block.y;
  dim3 grid(cv_lane_blocks(p, block), (unsigned)(ygroups < CV_GRID_Y ? ygroups : CV_GRID_Y));
  const int W = (int)a->width;
  if (a->io == MX_F32) {
    if (vec == 4) cv_forward_w<mx_t_f32, 4>(W, a->silu, p, grid, block, d->stream);
    else cv_forward_w<mx_t_f32, 1>(W, a->silu, p, grid, block, d->stream);
  } else {
    if (vec == 4) cv_forward_w<mx_t_bf16, 4>(W, a->silu, p, grid, block, d->stream);
    else cv_forward_w<mx_t_bf16, 1>(W, a->silu, p, grid, block, d->stream);
  }
  rc = MX_CUDA_LAUNCH_RC(d, err, "cv_forward_kernel");
  mx_cuda_unlock(d);
  return rc;
}

int mx_cuda_conv1d_backward(int dev, const mx_conv1d_args *a, const void *d_out,
                            const void *dh_last, void *dx, void *dweight, void *dbias,
                            void *dh0, int accumulate, mx_err *err) {
  int rc = cv_check(a, "conv1d_backward", err);
  if (rc != MX_OK) return rc;
  if (!a->bias) dbias = NULL;
  mx_cuda_dev *d = NULL;
  rc = mx_cuda_begin(dev, err, &d);
  if (rc != MX_OK) return rc;
  const int64_t B = a->batch, L = a->len, C = a->channels, W = a->width, K = W - 1;
  if (B == 0 || L == 0 || C == 0) {
    /* sums over nothing; with L = 0, dh0 = dh_last */
    rc = cv_set(d, (float *)dweight, NULL, C * W, accumulate, err);
    if (rc == MX_OK) rc = cv_set(d, (float *)dbias, NULL, C, accumulate, err);
    if (rc == MX_OK)
      rc = cv_set(d, (float *)dh0, L == 0 ? (const float *)dh_last : NULL, B * C * K, accumulate,
                  err);
    mx_cuda_unlock(d);
    return rc;
  }
  if (!d_out) {
    mx_cuda_unlock(d);
    return mx_cuda_fail(err, MX_E_ARG, "conv1d_backward: d_out is required");
  }
  cv_params p;
  memset(&p, 0, sizeof p);
  const void *ptrs[3] = {a->x, d_out, dx};
  static const int vecs[] = {2, 1};
  const int vec = cv_pick_vec(a, ptrs, 3, vecs);
  dim3 block;
  cv_layout(a, vec, (int64_t)d->sm_count * cv_env("CV_BWD_TPSM", CV_BWD_THREADS_PER_SM), &p,
            &block);
  p.dout = d_out;
  p.dh_last = (const float *)dh_last;
  p.dx = dx;
  p.dh0 = (float *)dh0;
  p.dweight = (float *)dweight;
  p.dbias = (float *)dbias;
  p.accumulate = accumulate;
  p.prefetch = cv_env("CV_PF", CV_PREFETCH);
  /* at most CV_MAX_GROUPS groups of TY * per items per lane tile */
  const int64_t ty = block.y;
  const int64_t max_groups = cv_env("CV_MAX_GROUPS", CV_MAX_GROUPS);
  p.per = (p.items + ty * max_groups - 1) / (ty * max_groups);
  if (p.per < 1) p.per = 1;
  p.groups = (p.items + ty * p.per - 1) / (ty * p.per);
  dim3 grid(cv_lane_blocks(p, block), (unsigned)p.groups);
  const bool want_params = dweight || dbias;
  if (want_params) {
    const size_t part_floats = (size_t)grid.x * p.groups * (W + 1) * vec * block.x;
    const bool own_tickets = grid.x > CV_TICKETS;
    const size_t bytes = part_floats * sizeof(float) + (own_tickets ? grid.x * sizeof(unsigned) : 0);
    rc = MX_CUDA_CALL(d, err, cudaMallocAsync((void **)&p.part, bytes, d->stream));
    if (rc == MX_OK && own_tickets) {
      p.ticket = (unsigned *)(p.part + part_floats);
      rc = MX_CUDA_CALL(d, err, cudaMemsetAsync(p.ticket, 0, grid.x * sizeof(unsigned),
                                                d->stream));
    }
    if (rc != MX_OK) {
      if (p.part) cudaFreeAsync(p.part, d->stream);
      mx_cuda_unlock(d);
      return rc;
    }
  }
  if (a->io == MX_F32) {
    if (a->silu) cv_backward_w<mx_t_f32, true>((int)W, vec, p, grid, block, d->stream);
    else cv_backward_w<mx_t_f32, false>((int)W, vec, p, grid, block, d->stream);
  } else {
    if (a->silu) cv_backward_w<mx_t_bf16, true>((int)W, vec, p, grid, block, d->stream);
    else cv_backward_w<mx_t_bf16, false>((int)W, vec, p, grid, block, d->stream);
  }
  rc = MX_CUDA_LAUNCH_RC(d, err, "cv_backward_kernel");
  if (p.part) cudaFreeAsync(p.part, d->stream); /* stream-ordered after the launch */
  mx_cuda_unlock(d);
  return rc;
}

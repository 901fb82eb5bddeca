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
 * channel. An "item" is a tile of TT consecutive steps of one sequence:
 * item = b * ntt + tile; TT is the longest of 4, 8, 16, 32 that still gives
 * about 2^18 threads (cv_layout; a function of the shapes only). Blocks are
 * (TX, TY) = CV_BLOCK (128) threads: TX lanes along the channels (a warp
 * reads consecutive lanes of one row: coalesced) and TY items. The grid is
 * (lane tiles, item groups), item groups folded onto gridDim.y <= 65535 by a
 * grid-stride loop.
 *
 * Forward: a thread keeps the last W inputs of its lane in registers (the
 * K = W - 1 before its tile come from x or the initial state), loads its
 * tile's rows UNR at a time ahead of the arithmetic, and writes out. The
 * thread with a sequence's last tile writes the final state (its window).
 *
 * Backward: a thread walks steps s = t0 .. t1 + K - 1 of its tile, keeping
 * windows of the last W inputs and the last W values of g = d_out silu'(pre)
 * (pre recomputed from the window). At step s it adds g_s x-window to its
 * dweight/dbias sums (s < t1) and writes dxpad[s - K] = sum_j w[j] g[s - j]
 * (+ dh_last): dx for s - K >= t0, and for the first tile of a sequence the
 * initial state's gradient (s - K < 0). Steps past L have g = 0.
 *
 * Parameter-gradient reduction (deterministic, no atomics): each block owns
 * a group of TY * PER consecutive items (thread ty takes PER of them, in
 * order) and sums its threads' partials over ty = 0, 1, ... through shared
 * memory into part[group] (W + 1, C); cv_reduce_kernel then sums the groups
 * g = ty, ty + 8, ... per (j, c) in 8 slices and the slices in order, and
 * writes (or adds to) dweight and dbias. PER is chosen so that there are at
 * most 1024 groups. Every order depends on the shapes only: bit-identical
 * reruns. Scratch (part) is stream-ordered (cudaMallocAsync/FreeAsync).
 */
#include <string.h>

#include "cuda_dtypes.cuh"
#include "cuda_ops.h"
#include "cuda_runtime_state.h"

#define CV_MAX_W 8
#define CV_MAX_GROUPS 1024
/* Rows loaded ahead of the arithmetic: forward, backward (two rows each). */
#define CV_UNR_FWD 8
#define CV_UNR_BWD 4
#define CV_GRID_Y 65535
/* Threads per block of the conv kernels (TX * TY). */
#define CV_BLOCK 128

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
  float *part;         /* (groups, W + 1, C) or NULL */
  int64_t B, L, C;
  int64_t lanes;       /* ceil(C / VEC) */
  int64_t tt, ntt;     /* steps per tile, tiles per sequence */
  int64_t items;       /* B * ntt */
  int64_t per;         /* backward: items per thread in a group */
  int64_t groups;      /* backward: item groups (TY * per items each) */
  int silu, accumulate;
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

/* sigmoid with the fast exp and reciprocal (relative error ~1e-6; p -> -inf
 * gives 0, p -> +inf gives 1) */
MX_DEV float cv_sigmoid(float p) { return __frcp_rn(1.0f + __expf(-p)); }

/* The thread's weights (W, VEC) and bias (VEC). */
template <int W, int VEC>
MX_DEV void cv_weights(const cv_params &p, int64_t c0, float (&w)[W][VEC], float (&bias)[VEC]) {
#pragma unroll
  for (int v = 0; v < VEC; v++) {
#pragma unroll
    for (int j = 0; j < W; j++) w[j][v] = p.w[(c0 + v) * W + j];
    bias[v] = p.bias ? p.bias[c0 + v] : 0.0f;
  }
}

/* The window before step t0: win[k + 1] = xpad[t0 - K + k] for k < K; win[0]
 * (dropped by the first shift) is 0. After the shift of step t,
 * win[j] = xpad[t + j - K]. */
template <class IO, int W, int VEC>
MX_DEV void cv_window(const cv_params &p, int64_t b, int64_t c0, int64_t t0,
                      float (&win)[W][VEC]) {
  typedef typename IO::T T;
  constexpr int K = W - 1;
#pragma unroll
  for (int v = 0; v < VEC; v++) win[0][v] = 0.0f;
#pragma unroll
  for (int k = 0; k < K; k++) {
    const int64_t s = t0 - K + k;
    float (&dst)[VEC] = win[k + 1 < W ? k + 1 : 0];
    if (s >= 0) {
      cv_load<IO, VEC>((const T *)p.x + (b * p.L + s) * p.C + c0, dst);
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

template <class IO, int W, int VEC>
static __global__ void __launch_bounds__(CV_BLOCK, 4) cv_forward_kernel(cv_params p) {
  constexpr int CV_UNR = CV_UNR_FWD;
  typedef typename IO::T T;
  constexpr int K = W - 1;
  const int64_t lane = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (lane >= p.lanes) return;
  const int64_t c0 = lane * VEC;
  float w[W][VEC], bias[VEC];
  cv_weights<W, VEC>(p, c0, w, bias);
  const T *x = (const T *)p.x;
  T *out = (T *)p.out;
  for (int64_t item = (int64_t)blockIdx.y * blockDim.y + threadIdx.y; item < p.items;
       item += (int64_t)gridDim.y * blockDim.y) {
    const int64_t b = item / p.ntt, tile = item - b * p.ntt;
    const int64_t t0 = tile * p.tt, t1 = t0 + p.tt < p.L ? t0 + p.tt : p.L;
    float win[W][VEC];
    cv_window<IO, W, VEC>(p, b, c0, t0, win);
    const int64_t row0 = b * p.L;
    for (int64_t t = t0; t < t1; t += CV_UNR) {
      float xs[CV_UNR][VEC];
#pragma unroll
      for (int u = 0; u < CV_UNR; u++)
        if (t + u < t1) cv_load<IO, VEC>(x + (row0 + t + u) * p.C + c0, xs[u]);
#pragma unroll
      for (int u = 0; u < CV_UNR; u++) {
        if (t + u < t1) {
          cv_shift<W, VEC>(win, xs[u]);
          float o[VEC];
          cv_pre<W, VEC>(w, bias, win, o);
          if (p.silu) {
#pragma unroll
            for (int v = 0; v < VEC; v++) o[v] = o[v] * cv_sigmoid(o[v]);
          }
          cv_store<IO, VEC>(out + (row0 + t + u) * p.C + c0, o);
        }
      }
    }
    if (K > 0 && p.h_last && tile == p.ntt - 1) {
      /* win[k + 1] = xpad[L - K + k]: VEC * K consecutive floats */
      float *hl = p.h_last + (b * p.C + c0) * K;
#pragma unroll
      for (int v = 0; v < VEC; v++)
#pragma unroll
        for (int k = 0; k < K; k++) hl[v * K + k] = win[k + 1 < W ? k + 1 : 0][v];
    }
  }
}

/* ---- backward ------------------------------------------------------------ */

template <class IO, int W, int VEC>
static __global__ void __launch_bounds__(CV_BLOCK, 4) cv_backward_kernel(cv_params p) {
  constexpr int CV_UNR = CV_UNR_BWD;
  typedef typename IO::T T;
  constexpr int K = W - 1;
  constexpr int NP = (W + 1) * VEC; /* partial sums per thread */
  extern __shared__ float cv_smem[]; /* (TY, TX, NP) */
  const int64_t lane = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const bool active = lane < p.lanes;
  const int64_t c0 = lane * VEC;
  float w[W][VEC], bias[VEC];
  if (active) cv_weights<W, VEC>(p, c0, w, bias);
  const T *x = (const T *)p.x;
  const T *dout = (const T *)p.dout;
  T *dx = (T *)p.dx;

  for (int64_t grp = blockIdx.y; grp < p.groups; grp += gridDim.y) {
    float dw[W][VEC], db[VEC];
#pragma unroll
    for (int v = 0; v < VEC; v++) {
      db[v] = 0.0f;
#pragma unroll
      for (int j = 0; j < W; j++) dw[j][v] = 0.0f;
    }
    const int64_t first = (grp * blockDim.y + threadIdx.y) * p.per;
    for (int64_t r = 0; r < p.per && active; r++) {
      const int64_t item = first + r;
      if (item >= p.items) break;
      const int64_t b = item / p.ntt, tile = item - b * p.ntt;
      const int64_t t0 = tile * p.tt, t1 = t0 + p.tt < p.L ? t0 + p.tt : p.L;
      const int64_t row0 = b * p.L;
      float xw[W][VEC], gw[W][VEC];
      cv_window<IO, W, VEC>(p, b, c0, t0, xw);
#pragma unroll
      for (int j = 0; j < W; j++)
#pragma unroll
        for (int v = 0; v < VEC; v++) gw[j][v] = 0.0f;
      const int64_t s_end = t1 + K;                    /* steps s < s_end */
      const int64_t s_load = s_end < p.L ? s_end : p.L; /* rows that exist */
      for (int64_t s = t0; s < s_end; s += CV_UNR) {
        float xs[CV_UNR][VEC], ds[CV_UNR][VEC];
#pragma unroll
        for (int u = 0; u < CV_UNR; u++) {
          if (s + u < s_load) {
            cv_load<IO, VEC>(x + (row0 + s + u) * p.C + c0, xs[u]);
            cv_load<IO, VEC>(dout + (row0 + s + u) * p.C + c0, ds[u]);
          }
        }
#pragma unroll
        for (int u = 0; u < CV_UNR; u++) {
          const int64_t st = s + u;
          if (st < s_end) {
            float g[VEC];
            if (st < s_load) {
              cv_shift<W, VEC>(xw, xs[u]);
              if (p.silu) {
                float pre[VEC];
                cv_pre<W, VEC>(w, bias, xw, pre);
#pragma unroll
                for (int v = 0; v < VEC; v++) {
                  const float sg = cv_sigmoid(pre[v]);
                  g[v] = ds[u][v] * (sg * (1.0f + pre[v] * (1.0f - sg)));
                }
              } else {
#pragma unroll
                for (int v = 0; v < VEC; v++) g[v] = ds[u][v];
              }
            } else {
#pragma unroll
              for (int v = 0; v < VEC; v++) g[v] = 0.0f;
            }
            cv_shift<W, VEC>(gw, g);
            if (st < t1) {
#pragma unroll
              for (int v = 0; v < VEC; v++) {
#pragma unroll
                for (int j = 0; j < W; j++) dw[j][v] += g[v] * xw[j][v];
                db[v] += g[v];
              }
            }
            const int64_t t = st - K; /* the dxpad row complete at this step */
            if (t >= t0 || (t0 == 0 && p.dh0)) {
              float d[VEC];
#pragma unroll
              for (int v = 0; v < VEC; v++) {
                float acc = 0.0f;
#pragma unroll
                for (int j = 0; j < W; j++) acc += w[j][v] * gw[W - 1 - j][v];
                d[v] = acc;
              }
              if (p.dh_last && t >= p.L - K) {
#pragma unroll
                for (int v = 0; v < VEC; v++)
                  d[v] += p.dh_last[(b * p.C + c0 + v) * K + (t - p.L + K)];
              }
              if (t >= t0) {
                if (dx) cv_store<IO, VEC>(dx + (row0 + t) * p.C + c0, d);
              } else {
#pragma unroll
                for (int v = 0; v < VEC; v++) {
                  float *dst = p.dh0 + (b * p.C + c0 + v) * K + (t + K);
                  *dst = p.accumulate ? *dst + d[v] : d[v];
                }
              }
            }
          }
        }
      }
    }
    if (p.part) {
      /* the block's partial: sum over ty in order */
      float *mine = cv_smem + ((size_t)threadIdx.y * blockDim.x + threadIdx.x) * NP;
#pragma unroll
      for (int v = 0; v < VEC; v++) {
#pragma unroll
        for (int j = 0; j < W; j++) mine[j * VEC + v] = dw[j][v];
        mine[W * VEC + v] = db[v];
      }
      __syncthreads();
      if (threadIdx.y == 0 && active) {
        float *dst = p.part + grp * (W + 1) * p.C;
        for (int i = 0; i < NP; i++) {
          float s = 0.0f;
          for (unsigned y = 0; y < blockDim.y; y++)
            s += cv_smem[((size_t)y * blockDim.x + threadIdx.x) * NP + i];
          const int j = i / VEC, v = i % VEC;
          dst[j * p.C + c0 + v] = s;
        }
      }
      __syncthreads();
    }
  }
}

/* dweight[c, j] (j < W) and dbias[c] (j = W) = [old +] sum over groups of
 * part[g, j, c]: slice ty sums g = ty, ty + 8, ... in order, then slice 0
 * adds the 8 slices in order. Blocks of (32, 8). */
static __global__ void __launch_bounds__(MX_BLOCK)
    cv_reduce_kernel(const float *part, float *dweight, float *dbias, int64_t C, int W,
                     int64_t groups, int accumulate) {
  __shared__ float sh[8][33];
  const int64_t e = (int64_t)blockIdx.x * 32 + threadIdx.x; /* e = j * C + c */
  const int64_t E = (int64_t)(W + 1) * C;
  float s = 0.0f;
  if (e < E)
    for (int64_t g = threadIdx.y; g < groups; g += 8) s += part[g * E + e];
  sh[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y != 0 || e >= E) return;
  float t = sh[0][threadIdx.x];
  for (int y = 1; y < 8; y++) t += sh[y][threadIdx.x];
  const int64_t j = e / C, c = e - j * C;
  float *dst = j < W ? (dweight ? dweight + c * W + j : NULL) : dbias ? dbias + c : NULL;
  if (dst) *dst = accumulate ? *dst + t : t;
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

/* Lanes, tiles and the block shape for vectors of up to max_vec channels;
 * returns VEC. Tiles of 4 to 32 steps: the longest that still gives about
 * 2^18 threads (enough loads in flight to cover the memory latency). */
static int cv_layout(const mx_conv1d_args *a, const void *const *io_ptrs, int n_ptrs,
                     int max_vec, cv_params *p, dim3 *block) {
  const size_t es = mx_dtype_size(a->io);
  int vec = a->channels % max_vec == 0 ? max_vec : 1;
  for (int i = 0; i < n_ptrs && vec > 1; i++)
    if (!cv_aligned(io_ptrs[i], vec * es)) vec = 1;
  p->B = a->batch;
  p->L = a->len;
  p->C = a->channels;
  p->lanes = (a->channels + vec - 1) / vec;
  p->tt = 4;
  while (p->tt < 32 && (double)p->lanes * (double)a->batch *
                               (double)((a->len + 2 * p->tt - 1) / (2 * p->tt)) >=
                           (double)(1 << 18))
    p->tt *= 2;
  p->ntt = (a->len + p->tt - 1) / p->tt;
  p->items = a->batch * p->ntt;
  p->silu = a->silu;
  p->x = a->x;
  p->w = (const float *)a->weight;
  p->bias = (const float *)a->bias;
  p->h0 = (const float *)a->h0;
  unsigned tx = 1;
  while (tx < 32 && (int64_t)tx < p->lanes) tx *= 2;
  *block = dim3(tx, CV_BLOCK / tx);
  return vec;
}

template <class IO, int VEC>
static void cv_forward_w(int W, const cv_params &p, dim3 grid, dim3 block, cudaStream_t s) {
  switch (W) {
    case 1: cv_forward_kernel<IO, 1, VEC><<<grid, block, 0, s>>>(p); break;
    case 2: cv_forward_kernel<IO, 2, VEC><<<grid, block, 0, s>>>(p); break;
    case 3: cv_forward_kernel<IO, 3, VEC><<<grid, block, 0, s>>>(p); break;
    case 4: cv_forward_kernel<IO, 4, VEC><<<grid, block, 0, s>>>(p); break;
    case 5: cv_forward_kernel<IO, 5, VEC><<<grid, block, 0, s>>>(p); break;
    case 6: cv_forward_kernel<IO, 6, VEC><<<grid, block, 0, s>>>(p); break;
    case 7: cv_forward_kernel<IO, 7, VEC><<<grid, block, 0, s>>>(p); break;
    default: cv_forward_kernel<IO, 8, VEC><<<grid, block, 0, s>>>(p); break;
  }
}

template <class IO, int VEC>
static void cv_backward_w(int W, const cv_params &p, dim3 grid, dim3 block, cudaStream_t s) {
  const size_t smem = p.part ? (size_t)CV_BLOCK * (W + 1) * VEC * sizeof(float) : 0;
  switch (W) {
    case 1: cv_backward_kernel<IO, 1, VEC><<<grid, block, smem, s>>>(p); break;
    case 2: cv_backward_kernel<IO, 2, VEC><<<grid, block, smem, s>>>(p); break;
    case 3: cv_backward_kernel<IO, 3, VEC><<<grid, block, smem, s>>>(p); break;
    case 4: cv_backward_kernel<IO, 4, VEC><<<grid, block, smem, s>>>(p); break;
    case 5: cv_backward_kernel<IO, 5, VEC><<<grid, block, smem, s>>>(p); break;
    case 6: cv_backward_kernel<IO, 6, VEC><<<grid, block, smem, s>>>(p); break;
    case 7: cv_backward_kernel<IO, 7, VEC><<<grid, block, smem, s>>>(p); break;
    default: cv_backward_kernel<IO, 8, VEC><<<grid, block, smem, s>>>(p); break;
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
  dim3 block;
  const int vec = cv_layout(a, ptrs, 2, 4, &p, &block);
  p.out = out;
  p.h_last = (float *)h_last;
  const int64_t ygroups = (p.items + block.y - 1) / block.y;
  dim3 grid(cv_lane_blocks(p, block), (unsigned)(ygroups < CV_GRID_Y ? ygroups : CV_GRID_Y));
  const int W = (int)a->width;
  if (a->io == MX_F32) {
    if (vec == 4) cv_forward_w<mx_t_f32, 4>(W, p, grid, block, d->stream);
    else cv_forward_w<mx_t_f32, 1>(W, p, grid, block, d->stream);
  } else {
    if (vec == 4) cv_forward_w<mx_t_bf16, 4>(W, p, grid, block, d->stream);
    else cv_forward_w<mx_t_bf16, 1>(W, p, grid, block, d->stream);
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
  dim3 block;
  const int vec = cv_layout(a, ptrs, 3, 2, &p, &block);
  p.dout = d_out;
  p.dh_last = (const float *)dh_last;
  p.dx = dx;
  p.dh0 = (float *)dh0;
  p.accumulate = accumulate;
  /* at most CV_MAX_GROUPS groups of TY * per items */
  const int64_t ty = block.y;
  p.per = (p.items + ty * CV_MAX_GROUPS - 1) / (ty * CV_MAX_GROUPS);
  if (p.per < 1) p.per = 1;
  p.groups = (p.items + ty * p.per - 1) / (ty * p.per);
  const bool want_params = dweight || dbias;
  if (want_params) {
    rc = MX_CUDA_CALL(d, err, cudaMallocAsync((void **)&p.part,
                                              (size_t)p.groups * (W + 1) * C * sizeof(float),
                                              d->stream));
    if (rc != MX_OK) {
      mx_cuda_unlock(d);
      return rc;
    }
  }
  dim3 grid(cv_lane_blocks(p, block), (unsigned)(p.groups < CV_GRID_Y ? p.groups : CV_GRID_Y));
  if (a->io == MX_F32) {
    if (vec == 2) cv_backward_w<mx_t_f32, 2>((int)W, p, grid, block, d->stream);
    else cv_backward_w<mx_t_f32, 1>((int)W, p, grid, block, d->stream);
  } else {
    if (vec == 2) cv_backward_w<mx_t_bf16, 2>((int)W, p, grid, block, d->stream);
    else cv_backward_w<mx_t_bf16, 1>((int)W, p, grid, block, d->stream);
  }
  rc = MX_CUDA_LAUNCH_RC(d, err, "cv_backward_kernel");
  if (rc == MX_OK && want_params) {
    const int64_t E = (W + 1) * C;
    cv_reduce_kernel<<<(unsigned)((E + 31) / 32), dim3(32, 8), 0, d->stream>>>(
        p.part, (float *)dweight, (float *)dbias, C, (int)W, p.groups, accumulate);
    rc = MX_CUDA_LAUNCH_RC(d, err, "cv_reduce_kernel");
  }
  if (p.part) cudaFreeAsync(p.part, d->stream); /* stream-ordered after the launches */
  mx_cuda_unlock(d);
  return rc;
}

/*
 * loss.cu: the losses of the CUDA backend: softmax cross-entropy over the
 * last axis of (rows, classes) logits with s32 targets, and the mean squared
 * error. io (logits, dlogits, pred, target, dpred) is f32 or bf16; param
 * (weights, the loss scalar) is f32; all math is fp32.
 *
 * Semantics (backend.h, mx_xent_args; the CPU backend's loss_cpu.c states
 * the same): for row r with target t,
 *   ignored  (has_ignore, t == ignore_index): loss term 0, gradient row 0;
 *   bad      (t outside [0, C)): loss NaN, gradient row NaN, weight 1 in the
 *            mean's denominator; t is never used as an index;
 *   valid    l_r = w[t] ((m - x_t) + log s), m = max x, s = sum exp(x - m),
 *            dx_j = g w[t] (exp(x_j - m) / s - [j == t]);
 *   loss = g sum_r l_r with g = scale / den (0 when den == 0), den = sum of
 *   the row weights not ignored when `mean`, else 1.
 * MSE: loss = g sum (p - y)^2, dpred = 2 g (p - y), g = scale [/ n].
 *
 * ---- Launches -----------------------------------------------------------------
 *
 * Cross-entropy is one kernel, two when the mean's denominator depends on the
 * data (mean with weights or ignore_index): xent_den_kernel first sums the
 * row weights in a fixed order into the device scratch (same two-stage,
 * last-block reduction as the loss).
 * Otherwise den = rows is known on the host. The main kernel reads every
 * logit once and writes every gradient once:
 *   - classes <= 1024 (xent_warp_kernel): a group of LPR lanes (LPR = 32,
 *     or the power of two >= classes for classes < 32, so a warp holds
 *     32 / LPR rows) holds a row in registers, K = ceil(classes / LPR)
 *     values per lane (element j in lane j % LPR, slot j / LPR); max and sum
 *     by xor-butterfly shuffles inside the group;
 *   - larger classes (xent_block_kernel): a block per row, each thread
 *     keeps an online (max, sum) over its strided elements, the block
 *     combines them by a fixed butterfly/tree, and a second sweep over the
 *     row (mostly from L2) writes the gradient.
 * MSE is one grid-stride kernel (mse_kernel).
 *
 * ---- Deterministic reductions --------------------------------------------------
 *
 * The grid size is a function of the shape only (at most LOSS_MAX_BLOCKS).
 * Each thread accumulates its rows / elements in a fixed order; a block sums
 * its threads by a fixed tree into one partial, written to a per-device
 * scratch; the last block to finish (an atomic ticket on an int counter,
 * after __threadfence) adds the partials in index order by a fixed tree,
 * writes the loss and resets the counter to 0 for the next call. Which block
 * comes last varies, but the sum it computes does not: results are
 * bit-identical from run to run. The xor butterflies leave the same bits in
 * every lane (each step adds a + b in one lane and b + a in its partner).
 *
 * ---- Scratch -----------------------------------------------------------------
 *
 * One small block per device (loss_scratch: ticket, den, partials), taken
 * from the device's stream-ordered pool on first use, zeroed once, and kept
 * for the life of the process. Every use is on the device's one stream, so
 * calls never overlap on it; the ticket is back at 0 after every complete
 * kernel.
 */
#include <float.h>
#include <math.h>

#include "cuda_dtypes.cuh"
#include "cuda_ops.h"
#include "cuda_runtime_state.h"

#define LOSS_MAX_BLOCKS 1024
#define XENT_WARP_MAX_CLASSES 1024
#define XENT_BLOCK 256     /* threads of the warp-path and MSE kernels */
#define XENT_BIG_BLOCK 1024 /* threads of the block-per-row kernel */
#define BIG_UNROLL 8        /* loads in flight per thread in xent_block_kernel */
#define DEN_UNROLL 4        /* rows per thread in flight in xent_den_kernel */
#define MSE_PER_THREAD 8   /* elements per thread when sizing the MSE grid */

struct loss_scratch {
  unsigned int ticket;
  float den;
  float partial[LOSS_MAX_BLOCKS];
};

/* Per device; touched only under the device's enqueue mutex. */
static loss_scratch *g_scratch[MX_MAX_CUDA_DEVICES];

static int scratch_for(mx_cuda_dev *d, loss_scratch **out, mx_err *err) {
  loss_scratch *s = g_scratch[d->index];
  if (!s) {
    MX_CUDA_TRY(d, err, cudaMallocAsync((void **)&s, sizeof *s, d->stream));
    int rc = MX_CUDA_CALL(d, err, cudaMemsetAsync(s, 0, sizeof *s, d->stream));
    if (rc != MX_OK) {
      cudaFreeAsync(s, d->stream);
      return rc;
    }
    g_scratch[d->index] = s;
  }
  *out = s;
  return MX_OK;
}

/* ------------------------------------------------------------------------ */
/* Block-level helpers                                                        */

/* Sum of v over the block (blockDim.x a multiple of 32, <= 1024) by a fixed
 * tree; the result is valid in thread 0. `sh` holds 32 floats. */
MX_DEV float block_sum(float v, float *sh) {
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned nwarps = blockDim.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads(); /* sh may still be read from an earlier use */
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? sh[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

/* Every block calls this once, with its partial sum in thread 0: the last
 * block to arrive adds all partials in index order and writes
 * loss = total * factor (factor read from the scratch's den when den_dev). */
MX_DEV void finish_loss(float mine, loss_scratch *sc, float *loss, float factor, bool den_dev,
                        float scale, float *sh) {
  __shared__ bool is_last;
  if (threadIdx.x == 0) {
    sc->partial[blockIdx.x] = mine;
    __threadfence();
    const unsigned ticket = atomicAdd(&sc->ticket, 1u);
    is_last = ticket == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  float v = 0.0f;
  for (unsigned i = threadIdx.x; i < gridDim.x; i += blockDim.x) v += __ldcg(&sc->partial[i]);
  v = block_sum(v, sh);
  if (threadIdx.x == 0) {
    if (den_dev) {
      const float den = __ldcg(&sc->den);
      factor = den != 0.0f ? scale / den : 0.0f;
    }
    *loss = v * factor;
    sc->ticket = 0;
  }
}

/* Row kinds. */
enum { ROW_VALID = 0, ROW_IGNORED = 1, ROW_BAD = 2 };

MX_DEV int row_kind(int32_t t, int64_t C, int has_ignore, int64_t ignore) {
  if (has_ignore && (int64_t)t == ignore) return ROW_IGNORED;
  return (t < 0 || (int64_t)t >= C) ? ROW_BAD : ROW_VALID;
}

/* The scale of row gradients: scale / den (0 when den == 0). */
MX_DEV float grad_factor(const loss_scratch *sc, float factor, bool den_dev, float scale) {
  if (!den_dev) return factor;
  const float den = sc->den;
  return den != 0.0f ? scale / den : 0.0f;
}

/* ------------------------------------------------------------------------ */
/* Kernels                                                                    */

/* den = sum over rows not ignored of w[t] (1 for a bad target or without
 * weights). Thread i of the grid takes rows i, i + stride, ... (DEN_UNROLL
 * loads in flight), blocks sum their threads, the last block the blocks, in
 * a fixed order, into sc->den. */
static __global__ void __launch_bounds__(XENT_BLOCK)
    xent_den_kernel(const int32_t *targets, // (rows)
                    const float *weights,   // (C) or NULL
                    int64_t rows, int64_t C, int has_ignore, int64_t ignore,
                    loss_scratch *sc) {
  __shared__ float sh[32];
  const int64_t stride = (int64_t)gridDim.x * XENT_BLOCK;
  float v = 0.0f;
  for (int64_t r0 = (int64_t)blockIdx.x * XENT_BLOCK + threadIdx.x; r0 < rows;
       r0 += DEN_UNROLL * stride) {
    int32_t t[DEN_UNROLL];
#pragma unroll
    for (int k = 0; k < DEN_UNROLL; k++) {
      const int64_t r = r0 + k * stride;
      t[k] = r < rows ? targets[r] : 0;
    }
#pragma unroll
    for (int k = 0; k < DEN_UNROLL; k++) {
      if (r0 + k * stride >= rows) continue;
      const int kind = row_kind(t[k], C, has_ignore, ignore);
      if (kind == ROW_IGNORED) continue;
      v += (kind == ROW_VALID && weights) ? weights[t[k]] : 1.0f;
    }
  }
  const float mine = block_sum(v, sh);
  finish_loss(mine, sc, &sc->den, 1.0f, false, 0.0f, sh);
}

/* Rows of at most LPR * K classes: a group of LPR lanes per row. */
template <class IO, int LPR, int K>
static __global__ void __launch_bounds__(XENT_BLOCK)
    xent_warp_kernel(const typename IO::T *x, // (rows, C)
                     const int32_t *targets,  // (rows)
                     const float *weights,    // (C) or NULL
                     typename IO::T *dx,      // (rows, C) or NULL
                     int64_t rows, int C, int has_ignore, int64_t ignore, float factor,
                     bool den_dev, float scale, loss_scratch *sc, float *loss) {
  __shared__ float sh[32];
  constexpr int RPW = 32 / LPR; /* rows per warp */
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gl = lane % LPR, sub = lane / LPR;
  const int64_t warps = (int64_t)gridDim.x * (XENT_BLOCK / 32);
  const float g = grad_factor(sc, factor, den_dev, scale);
  float acc = 0.0f; /* this lane's rows' loss terms (lane gl == 0 only) */

  for (int64_t base = ((int64_t)blockIdx.x * (XENT_BLOCK / 32) + warp) * RPW; base < rows;
       base += warps * RPW) {
    const int64_t r = base + sub;
    const bool live = r < rows;
    const typename IO::T *xr = x + (live ? r : 0) * (int64_t)C;
    float v[K];
#pragma unroll
    for (int k = 0; k < K; k++) {
      const int j = gl + k * LPR;
      v[k] = (live && j < C) ? IO::load(xr[j]) : -INFINITY;
    }
    const int32_t t = live ? targets[r] : 0;
    const int kind = row_kind(t, C, has_ignore, ignore);
    float m = v[0];
#pragma unroll
    for (int k = 1; k < K; k++) m = fmaxf(m, v[k]);
#pragma unroll
    for (int o = LPR / 2; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < K; k++) {
      const int j = gl + k * LPR;
      v[k] = j < C ? expf(v[k] - m) : 0.0f;
      s += v[k];
    }
#pragma unroll
    for (int o = LPR / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (!live) continue; /* the group's shuffles are done */

    float w = 0.0f, term = 0.0f;
    if (kind == ROW_VALID) {
      w = weights ? weights[t] : 1.0f;
      const float xt = IO::load(xr[t]);
      term = w * ((m - xt) + logf(s));
    } else if (kind == ROW_BAD) {
      w = NAN;
      term = NAN;
    }
    if (gl == 0) acc += term;
    if (dx) {
      typename IO::T *dr = dx + r * (int64_t)C;
      const float c = g * w, rs = 1.0f / s;
#pragma unroll
      for (int k = 0; k < K; k++) {
        const int j = gl + k * LPR;
        if (j < C) {
          const float p = v[k] * rs;
          const float val = kind == ROW_IGNORED ? 0.0f : c * (j == t ? p - 1.0f : p);
          dr[j] = IO::store(val);
        }
      }
    }
  }
  const float mine = block_sum(acc, sh);
  finish_loss(mine, sc, loss, factor, den_dev, scale, sh);
}

/* Online (max, sum of exp(x - max)) pairs. m starts at -FLT_MAX, not -inf,
 * so that exp(m - M) is never exp(-inf - -inf). */
MX_DEV void ms_combine(float &m, float &s, float m2, float s2) {
  const float M = fmaxf(m, m2);
  s = s * expf(m - M) + s2 * expf(m2 - M);
  m = M;
}

/* One block per row (any number of classes). */
template <class IO>
static __global__ void __launch_bounds__(XENT_BIG_BLOCK)
    xent_block_kernel(const typename IO::T *x, // (rows, C)
                      const int32_t *targets,  // (rows)
                      const float *weights,    // (C) or NULL
                      typename IO::T *dx,      // (rows, C) or NULL
                      int64_t rows, int64_t C, int has_ignore, int64_t ignore, float factor,
                      bool den_dev, float scale, loss_scratch *sc, float *loss) {
  __shared__ float sh[32];
  __shared__ float shm[32], shs[32];
  __shared__ float row_m, row_s;
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr unsigned NW = XENT_BIG_BLOCK / 32;
  const float g = grad_factor(sc, factor, den_dev, scale);
  float acc = 0.0f; /* thread 0: the block's rows' loss terms */

  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const typename IO::T *xr = x + r * C;
    float m = -FLT_MAX, s = 0.0f;
    int64_t j = threadIdx.x;
    for (; j + (BIG_UNROLL - 1) * XENT_BIG_BLOCK < C; j += BIG_UNROLL * XENT_BIG_BLOCK) {
      float a[BIG_UNROLL];
#pragma unroll
      for (int k = 0; k < BIG_UNROLL; k++) a[k] = IO::load(xr[j + k * XENT_BIG_BLOCK]);
      float M = m;
#pragma unroll
      for (int k = 0; k < BIG_UNROLL; k++) M = fmaxf(M, a[k]);
      if (M > m) {
        s *= expf(m - M);
        m = M;
      }
      float e = 0.0f;
#pragma unroll
      for (int k = 0; k < BIG_UNROLL; k++) e += expf(a[k] - m);
      s += e;
    }
    for (; j < C; j += XENT_BIG_BLOCK) {
      const float a0 = IO::load(xr[j]);
      if (a0 > m) {
        s *= expf(m - a0);
        m = a0;
      }
      s += expf(a0 - m);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
      const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
      ms_combine(m, s, m2, s2);
    }
    if (lane == 0) {
      shm[warp] = m;
      shs[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
      m = lane < NW ? shm[lane] : -FLT_MAX;
      s = lane < NW ? shs[lane] : 0.0f;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        ms_combine(m, s, m2, s2);
      }
      if (lane == 0) {
        row_m = m;
        row_s = s;
      }
    }
    __syncthreads();
    m = row_m;
    s = row_s;
    const int32_t t = targets[r];
    const int kind = row_kind(t, C, has_ignore, ignore);
    float w = 0.0f;
    if (kind == ROW_VALID) {
      w = weights ? weights[t] : 1.0f;
      if (threadIdx.x == 0) acc += w * ((m - IO::load(xr[t])) + logf(s));
    } else if (kind == ROW_BAD) {
      w = NAN;
      if (threadIdx.x == 0) acc += NAN;
    }
    if (dx) {
      typename IO::T *dr = dx + r * C;
      const float c = g * w, rs = 1.0f / s;
      for (j = threadIdx.x; j < C; j += BIG_UNROLL * XENT_BIG_BLOCK) {
        float a[BIG_UNROLL];
#pragma unroll
        for (int k = 0; k < BIG_UNROLL; k++) {
          const int64_t jk = j + k * XENT_BIG_BLOCK;
          a[k] = jk < C ? IO::load(xr[jk]) : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < BIG_UNROLL; k++) {
          const int64_t jk = j + k * XENT_BIG_BLOCK;
          if (jk >= C) break;
          float val = 0.0f;
          if (kind != ROW_IGNORED) {
            const float p = expf(a[k] - m) * rs;
            val = c * (jk == t ? p - 1.0f : p);
          }
          dr[jk] = IO::store(val);
        }
      }
    }
    __syncthreads(); /* row_m / row_s are rewritten by the next row */
  }
  finish_loss(threadIdx.x == 0 ? acc : 0.0f, sc, loss, factor, den_dev, scale, sh);
}

/* loss = g sum (p - y)^2, dpred = 2 g (p - y): grid-stride, element i goes
 * to thread i mod (grid * block), four in flight per iteration. */
template <class IO>
static __global__ void __launch_bounds__(XENT_BLOCK)
    mse_kernel(const typename IO::T *p, // (n)
               const typename IO::T *y, // (n)
               typename IO::T *dp,      // (n) or NULL
               uint64_t n, float g, float g2, loss_scratch *sc, float *loss) {
  __shared__ float sh[32];
  const uint64_t stride = (uint64_t)gridDim.x * XENT_BLOCK;
  uint64_t i = (uint64_t)blockIdx.x * XENT_BLOCK + threadIdx.x;
  float acc = 0.0f;
  for (; i + 3 * stride < n; i += 4 * stride) {
    float d[4];
#pragma unroll
    for (int k = 0; k < 4; k++) d[k] = IO::load(p[i + k * stride]) - IO::load(y[i + k * stride]);
#pragma unroll
    for (int k = 0; k < 4; k++) {
      acc += d[k] * d[k];
      if (dp) dp[i + k * stride] = IO::store(g2 * d[k]);
    }
  }
  for (; i < n; i += stride) {
    const float d = IO::load(p[i]) - IO::load(y[i]);
    acc += d * d;
    if (dp) dp[i] = IO::store(g2 * d);
  }
  const float mine = block_sum(acc, sh);
  finish_loss(mine, sc, loss, g, false, 0.0f, sh);
}

/* ------------------------------------------------------------------------ */
/* Launchers                                                                  */

namespace {

struct xent_launch {
  mx_cuda_dev *d;
  const mx_xent_args *a;
  void *dlogits;
  float *loss;
  loss_scratch *sc;
  float factor;
  bool den_dev;
  mx_err *err;

  template <class IO, int LPR, int K>
  int warp() {
    const int64_t rows_per_block = (XENT_BLOCK / 32) * (32 / LPR);
    int64_t blocks = (a->rows + rows_per_block - 1) / rows_per_block;
    if (blocks > LOSS_MAX_BLOCKS) blocks = LOSS_MAX_BLOCKS;
    xent_warp_kernel<IO, LPR, K><<<(unsigned)blocks, XENT_BLOCK, 0, d->stream>>>(
        (const typename IO::T *)a->logits, a->targets, (const float *)a->weights,
        (typename IO::T *)dlogits, a->rows, (int)a->classes, a->has_ignore, a->ignore_index,
        factor, den_dev, (float)a->scale, sc, loss);
    MX_CUDA_LAUNCHED(d, err, "xent_warp_kernel");
    return MX_OK;
  }

  template <class IO>
  int run() {
    const int64_t C = a->classes;
    if (C <= XENT_WARP_MAX_CLASSES) {
      if (C <= 1) return warp<IO, 1, 1>();
      if (C <= 2) return warp<IO, 2, 1>();
      if (C <= 4) return warp<IO, 4, 1>();
      if (C <= 8) return warp<IO, 8, 1>();
      if (C <= 16) return warp<IO, 16, 1>();
      if (C <= 32) return warp<IO, 32, 1>();
      if (C <= 64) return warp<IO, 32, 2>();
      if (C <= 128) return warp<IO, 32, 4>();
      if (C <= 256) return warp<IO, 32, 8>();
      if (C <= 512) return warp<IO, 32, 16>();
      return warp<IO, 32, 32>();
    }
    const int64_t blocks = a->rows < LOSS_MAX_BLOCKS ? a->rows : LOSS_MAX_BLOCKS;
    xent_block_kernel<IO><<<(unsigned)blocks, XENT_BIG_BLOCK, 0, d->stream>>>(
        (const typename IO::T *)a->logits, a->targets, (const float *)a->weights,
        (typename IO::T *)dlogits, a->rows, C, a->has_ignore, a->ignore_index, factor, den_dev,
        (float)a->scale, sc, loss);
    MX_CUDA_LAUNCHED(d, err, "xent_block_kernel");
    return MX_OK;
  }
};

} // namespace

int mx_cuda_cross_entropy(int dev, const mx_xent_args *a, void *loss, void *dlogits,
                          mx_err *err) {
  if (!a) return mx_cuda_fail(err, MX_E_ARG, "cross_entropy: no arguments");
  if (a->param != MX_F32 || (a->io != MX_F32 && a->io != MX_BF16))
    return mx_cuda_fail(err, MX_E_ARG,
                        "cross_entropy: the CUDA backend takes param f32 and io f32 or bf16");
  if (a->rows < 0 || a->classes < 1)
    return mx_cuda_fail(err, MX_E_ARG, "cross_entropy: bad sizes (need rows >= 0, classes >= 1)");
  if (!loss || (a->rows > 0 && (!a->logits || !a->targets)))
    return mx_cuda_fail(err, MX_E_ARG, "cross_entropy: logits, targets and loss are required");
  mx_cuda_dev *d = NULL;
  int rc = mx_cuda_begin(dev, err, &d);
  if (rc != MX_OK) return rc;
  if (a->rows == 0) { /* the sum of nothing; 0/0 = 0 for the mean */
    rc = MX_CUDA_CALL(d, err, cudaMemsetAsync(loss, 0, sizeof(float), d->stream));
    mx_cuda_unlock(d);
    return rc;
  }
  loss_scratch *sc = NULL;
  rc = scratch_for(d, &sc, err);
  if (rc != MX_OK) {
    mx_cuda_unlock(d);
    return rc;
  }
  /* The denominator: on the device when it depends on the targets. */
  const bool den_dev = a->mean && (a->weights || a->has_ignore);
  const double factor = !a->mean ? a->scale : den_dev ? 0.0 : a->scale / (double)a->rows;
  if (den_dev) {
    int64_t nb = (a->rows + (int64_t)XENT_BLOCK * DEN_UNROLL - 1) / ((int64_t)XENT_BLOCK * DEN_UNROLL);
    if (nb > LOSS_MAX_BLOCKS) nb = LOSS_MAX_BLOCKS;
    xent_den_kernel<<<(unsigned)nb, XENT_BLOCK, 0, d->stream>>>(
        a->targets, (const float *)a->weights, a->rows, a->classes, a->has_ignore,
        a->ignore_index, sc);
    rc = MX_CUDA_LAUNCH_RC(d, err, "xent_den_kernel");
  }
  if (rc == MX_OK) {
    xent_launch fn = {d, a, dlogits, (float *)loss, sc, (float)factor, den_dev, err};
    rc = a->io == MX_F32 ? fn.run<mx_t_f32>() : fn.run<mx_t_bf16>();
  }
  mx_cuda_unlock(d);
  return rc;
}

int mx_cuda_mse(int dev, int io, int param, const void *pred, const void *target, size_t n,
                int mean, double scale, void *loss, void *dpred, mx_err *err) {
  if (param != MX_F32 || (io != MX_F32 && io != MX_BF16))
    return mx_cuda_fail(err, MX_E_ARG, "mse: the CUDA backend takes param f32 and io f32 or bf16");
  if (!loss || (n > 0 && (!pred || !target)))
    return mx_cuda_fail(err, MX_E_ARG, "mse: pred, target and loss are required");
  mx_cuda_dev *d = NULL;
  int rc = mx_cuda_begin(dev, err, &d);
  if (rc != MX_OK) return rc;
  if (n == 0) {
    rc = MX_CUDA_CALL(d, err, cudaMemsetAsync(loss, 0, sizeof(float), d->stream));
    mx_cuda_unlock(d);
    return rc;
  }
  loss_scratch *sc = NULL;
  rc = scratch_for(d, &sc, err);
  if (rc != MX_OK) {
    mx_cuda_unlock(d);
    return rc;
  }
  const double g = mean ? scale / (double)n : scale;
  uint64_t blocks = (n + (uint64_t)XENT_BLOCK * MSE_PER_THREAD - 1) /
                    ((uint64_t)XENT_BLOCK * MSE_PER_THREAD);
  if (blocks > LOSS_MAX_BLOCKS) blocks = LOSS_MAX_BLOCKS;
  if (io == MX_F32)
    mse_kernel<mx_t_f32><<<(unsigned)blocks, XENT_BLOCK, 0, d->stream>>>(
        (const float *)pred, (const float *)target, (float *)dpred, n, (float)g,
        (float)(2.0 * g), sc, (float *)loss);
  else
    mse_kernel<mx_t_bf16><<<(unsigned)blocks, XENT_BLOCK, 0, d->stream>>>(
        (const uint16_t *)pred, (const uint16_t *)target, (uint16_t *)dpred, n, (float)g,
        (float)(2.0 * g), sc, (float *)loss);
  rc = MX_CUDA_LAUNCH_RC(d, err, "mse_kernel");
  mx_cuda_unlock(d);
  return rc;
}

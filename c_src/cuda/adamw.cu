/*
 * adamw.cu: the AdamW optimiser of the CUDA backend (mx_backend.adamw), with
 * the global gradient norm and clipping, all on the device.
 *
 * What one call does (backend.h, mx_adamw_args): over every tensor (f32
 * param, grad, m, v of n elements each, updated in place)
 *   norm = sqrt(sum grad^2)  (written to *grad_norm when asked)
 *   clip = min(1, max_norm / (norm + 1e-6)) when max_norm > 0, else 1
 *   t = *step + 1; *step = t   (s32 device scalar; lr is an f32 device scalar)
 *   g = clip * grad; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2
 *   p = p * (1 - lr wd) - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
 * with the decay factor 1 on tensors whose decay flag is 0. The host never
 * reads a device value: step and lr are read by the kernels.
 *
 * Layout of the work. Tensors are cut into tiles of AW_TILE elements (a
 * tile never spans two tensors); one thread block handles one tile. The
 * tensor table (pointers, sizes, tile prefix counts, decay and alignment
 * bits) travels as a kernel parameter (aw_table, ~3.1 KB, under the 4 KB
 * portable limit), AW_CH tensors per launch; more tensors take several
 * launches ("chunks"). A block finds its tensor by a binary search on the
 * tile prefix (block-uniform, so the constant bank broadcasts).
 *
 * Launches:
 *   - with the norm wanted (max_norm > 0 or grad_norm): per chunk,
 *     adamw_sumsq_kernel writes one double partial sum of squares per tile
 *     (fixed slots, fixed order inside the block); in the last chunk's
 *     launch the last block to finish (an integer atomic ticket, no float
 *     atomics) adds every partial in a fixed order, writes the norm, the
 *     clip factor and the coefficients (aw_coef) into scratch, and
 *     increments the step. Then per chunk adamw_update_kernel<false> reads
 *     those coefficients. Every chunk reads the same coefficients; the step
 *     is incremented once.
 *   - otherwise one launch per chunk of adamw_update_kernel<true>: each
 *     block computes the coefficients itself from *step and *lr (all blocks
 *     of all chunks see the same step), and in the last chunk the last block
 *     to finish writes *step = t.
   - with the norm wanted, one chunk, and every tile resident at once (one
 *     block per tile; 2^20 parameters are 256 tiles, an H200 holds 264):
 *     ONE cooperative launch of adamw_norm_update_kernel instead: tiles
 *     loaded into registers, per-tile partial sums published in
 *     epoch-stamped slots that double as the grid barrier, every block adds
 *     all partials in the same order (same norm everywhere), then updates
 *     from the registers. The gradients are read once. Its partials are
 *     rounded to float (the two-launch path keeps doubles), so the two
 *     paths' norms may differ in the last bits; each is deterministic.
 * So AdamW over tensors that fit one chunk is 1 launch with or without the
 * norm (2 with it when the tiles do not all fit at once). The ticket
 * counter is a per-device word allocated once (under the device mutex)
 * and reset to 0 by the block that used it last; the
 * partials and coefficients live in stream-ordered scratch freed after the
 * launches.
 *
 * Numerics (the CPU backend, adamw_cpu.c, does the same operations): the
 * coefficients in double from the f32 lr and s32 step, rounded to float
 * once; every per-element operation in float rounded separately (__fmul_rn
 * & co., so nvcc forms no FMA). Without clipping the two backends give the
 * same bits. The sum of squares is accumulated in double (per thread, warp
 * shuffles, then the block's 8 warps in order; tiles in order), so the norm
 * is bit-identical from run to run on one device, but may differ from the
 * CPU's (grouped differently) in the last bits.
 *
 * Vector path: a tensor whose four pointers are 16-byte aligned is read and
 * written as float4 (streaming loads and stores: the data is touched once);
 * the tail of n % 4 elements and unaligned tensors go element by element.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cuda_ops.h"

#define AW_CH 64          /* tensors per launch */
#define AW_THREADS 256    /* threads per block */
#define AW_UNROLL 4       /* float4 per thread per array: 4096-element tiles, so 2^20 parameters are 256 blocks, one wave at 2 blocks per SM */
#define AW_TILE ((int64_t)AW_THREADS * 4 * AW_UNROLL) /* elements per block */
/* The sum-of-squares kernel covers the same tiles with twice the threads
 * (two float4 per thread): it moves a quarter of the update's bytes, so it
 * needs more threads in flight, not more bytes per thread. */
#define AW_SQ_THREADS 512
#define AW_SQ_UNROLL (AW_TILE / (4 * AW_SQ_THREADS))
#define AW_MAX_GRID 0x7fffffffLL

namespace {

struct aw_table {
  float *p[AW_CH];
  const float *g[AW_CH];
  float *m[AW_CH];
  float *v[AW_CH];
  int64_t n[AW_CH];
  int64_t tile_start[AW_CH + 1]; /* chunk-local prefix counts of tiles */
  uint64_t decay_mask;           /* bit k: weight decay on tensor k */
  uint64_t vec_mask;             /* bit k: tensor k's pointers are 16-byte aligned */
  int count;
};

/* The per-call coefficients every element uses. */
struct aw_coef {
  float clip, step_size, inv_sqrt_bc2, decay_factor;
};

/* Hyper-parameters: floats as the element loop uses them (rounded from
 * double on the host, as the CPU backend does), doubles for the
 * coefficients. */
struct aw_hyper {
  float b1, omb1, b2, omb2, eps;
  double beta1, beta2, wd, max_norm;
};

/* Device scalars and scratch shared by every launch of one call. */
struct aw_shared {
  const float *lr;
  int32_t *step;
  float *grad_norm;    /* or NULL */
  double *partial;     /* (total tiles) sums of squares; norm mode only */
  aw_coef *coef;       /* norm mode only */
  unsigned *ticket;    /* per-device counter, 0 between calls */
  int64_t total_tiles; /* over every chunk */
};

__device__ __forceinline__ int aw_find(const aw_table &tab, int64_t tile) {
  int lo = 0, hi = tab.count; /* tile_start[lo] <= tile < tile_start[hi] */
  while (hi - lo > 1) {
    int mid = (lo + hi) >> 1;
    if (tab.tile_start[mid] <= tile) lo = mid;
    else hi = mid;
  }
  return lo;
}

/* Block sum in double, fixed order: shuffles within each warp, then the
 * warps in order by thread 0. The result is valid in thread 0. */
__device__ __forceinline__ double aw_block_sum(double s, double *warp_sums) {
  for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = s;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) total += warp_sums[w];
  return total;
}

/* The coefficients for this step; t is the new step value. Same double
 * operations as the CPU backend (no contraction: explicit _rn). */
__device__ aw_coef aw_coefficients(const aw_hyper &h, int32_t step, float lr_f, double clip,
                                   int32_t *t_out) {
  const int32_t t = (int32_t)((uint32_t)step + 1u);
  const double lr = (double)lr_f;
  const double bc1 = 1.0 - pow(h.beta1, (double)t);
  const double bc2 = 1.0 - pow(h.beta2, (double)t);
  aw_coef c;
  c.clip = (float)clip;
  c.step_size = (float)__ddiv_rn(lr, bc1);
  c.inv_sqrt_bc2 = (float)__ddiv_rn(1.0, __dsqrt_rn(bc2));
  c.decay_factor = (float)__dsub_rn(1.0, __dmul_rn(lr, h.wd));
  *t_out = t;
  return c;
}

/* The clip factor for a gradient norm: min(1, max_norm / (norm + 1e-6)),
 * 1 without clipping (and for a NaN norm: m and v become NaN anyway). */
__device__ __forceinline__ double aw_clip(const aw_hyper &h, double norm) {
  if (!(h.max_norm > 0.0)) return 1.0;
  const double q = h.max_norm / (norm + 1e-6);
  return q < 1.0 ? q : 1.0;
}

__device__ __forceinline__ void aw_elem(float &p, float g, float &m, float &v, const aw_coef &c,
                                        const aw_hyper &h, float decay) {
  g = __fmul_rn(g, c.clip);
  m = __fadd_rn(__fmul_rn(h.b1, m), __fmul_rn(h.omb1, g));
  v = __fadd_rn(__fmul_rn(h.b2, v), __fmul_rn(h.omb2, __fmul_rn(g, g)));
  const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(v), c.inv_sqrt_bc2), h.eps);
  const float upd = __fdiv_rn(__fmul_rn(c.step_size, m), denom);
  p = __fsub_rn(__fmul_rn(p, decay), upd);
}

/* Per tile: the sum of squares of its grads into sh.partial[tile_base +
 * tile]. With `finalize`, the last block of the launch reduces all partials
 * and writes norm, coefficients and step. */
__global__ void __launch_bounds__(AW_SQ_THREADS)
    adamw_sumsq_kernel(const aw_table tab, const aw_hyper h, const aw_shared sh,
                       int64_t tile_base, int finalize) {
  __shared__ double warp_sums[AW_SQ_THREADS / 32];
  __shared__ int is_last;
  const int64_t tile = blockIdx.x;
  const int tid = threadIdx.x;
  if (tab.count > 0 && tile < tab.tile_start[tab.count]) {
    const int k = aw_find(tab, tile);
    const int64_t n = tab.n[k];
    const int64_t e0 = (tile - tab.tile_start[k]) * AW_TILE;
    const float *g = tab.g[k];
    double s = 0.0;
    if ((tab.vec_mask >> k) & 1u) {
#pragma unroll
      for (int u = 0; u < AW_SQ_UNROLL; u++) {
        const int64_t e = e0 + 4 * ((int64_t)u * AW_SQ_THREADS + tid);
        if (e + 4 <= n) {
          const float4 x = __ldcs((const float4 *)(g + e));
          s = fma((double)x.x, (double)x.x, s);
          s = fma((double)x.y, (double)x.y, s);
          s = fma((double)x.z, (double)x.z, s);
          s = fma((double)x.w, (double)x.w, s);
        } else {
          for (int64_t i = e; i < n && i < e + 4; i++) {
            const double x = (double)g[i];
            s = fma(x, x, s);
          }
        }
      }
    } else {
#pragma unroll
      for (int u = 0; u < 4 * AW_SQ_UNROLL; u++) {
        const int64_t i = e0 + (int64_t)u * AW_SQ_THREADS + tid;
        if (i < n) {
          const double x = (double)g[i];
          s = fma(x, x, s);
        }
      }
    }
    s = aw_block_sum(s, warp_sums);
    if (tid == 0) sh.partial[tile_base + tile] = s;
  }
  if (!finalize) return;

  /* The last block of the last chunk: every partial is written (earlier
   * chunks finished before this launch began; this launch's blocks have
   * published theirs before taking a ticket). */
  if (tid == 0) {
    __threadfence();
    const unsigned prev = atomicAdd(sh.ticket, 1u);
    is_last = prev == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  double s = 0.0;
  for (int64_t i = tid; i < sh.total_tiles; i += AW_SQ_THREADS) s += __ldcg(sh.partial + i);
  __syncthreads(); /* warp_sums may still be read by thread 0 above */
  s = aw_block_sum(s, warp_sums);
  if (tid == 0) {
    const double norm = sqrt(s);
    if (sh.grad_norm) *sh.grad_norm = (float)norm;
    const double clip = aw_clip(h, norm);
    int32_t t;
    *sh.coef = aw_coefficients(h, *sh.step, *sh.lr, clip, &t);
    *sh.step = t;
    *sh.ticket = 0u;
  }
}

/* Per tile: the AdamW update. FUSED: coefficients from *step and *lr (no
 * clipping), and with `finalize` the last block writes the new step.
 * Otherwise the coefficients come from sh.coef. */
template <bool FUSED>
__global__ void __launch_bounds__(AW_THREADS)
    adamw_update_kernel(const aw_table tab, const aw_hyper h, const aw_shared sh, int finalize) {
  __shared__ aw_coef coef_s;
  __shared__ int32_t t_s;
  __shared__ int is_last;
  const int64_t tile = blockIdx.x;
  const int tid = threadIdx.x;

  /* Thread 0 fetches (or computes) the coefficients while the others'
   * loads are in flight. */
#define AW_FETCH_COEF()                                                            \
  do {                                                                             \
    if (tid == 0) {                                                                \
      if (FUSED) {                                                                 \
        int32_t t;                                                                 \
        coef_s = aw_coefficients(h, *sh.step, *sh.lr, 1.0, &t);                    \
        t_s = t;                                                                   \
      } else {                                                                     \
        coef_s = *sh.coef;                                                         \
      }                                                                            \
    }                                                                              \
    __syncthreads();                                                               \
  } while (0)

  if (tab.count > 0 && tile < tab.tile_start[tab.count]) {
    const int k = aw_find(tab, tile);
    const int64_t n = tab.n[k];
    const int64_t e0 = (tile - tab.tile_start[k]) * AW_TILE;
    float *p = tab.p[k], *m = tab.m[k], *v = tab.v[k];
    const float *g = tab.g[k];
    if ((tab.vec_mask >> k) & 1u) {
      float4 P[AW_UNROLL], G[AW_UNROLL], M[AW_UNROLL], V[AW_UNROLL];
#pragma unroll
      for (int u = 0; u < AW_UNROLL; u++) {
        const int64_t e = e0 + 4 * ((int64_t)u * AW_THREADS + tid);
        if (e + 4 <= n) {
          P[u] = __ldcs((const float4 *)(p + e));
          G[u] = __ldcs((const float4 *)(g + e));
          M[u] = __ldcs((const float4 *)(m + e));
          V[u] = __ldcs((const float4 *)(v + e));
        }
      }
      AW_FETCH_COEF();
      const aw_coef c = coef_s;
      const float decay = ((tab.decay_mask >> k) & 1u) ? c.decay_factor : 1.0f;
#pragma unroll
      for (int u = 0; u < AW_UNROLL; u++) {
        const int64_t e = e0 + 4 * ((int64_t)u * AW_THREADS + tid);
        if (e + 4 <= n) {
          aw_elem(P[u].x, G[u].x, M[u].x, V[u].x, c, h, decay);
          aw_elem(P[u].y, G[u].y, M[u].y, V[u].y, c, h, decay);
          aw_elem(P[u].z, G[u].z, M[u].z, V[u].z, c, h, decay);
          aw_elem(P[u].w, G[u].w, M[u].w, V[u].w, c, h, decay);
          __stcs((float4 *)(p + e), P[u]);
          __stcs((float4 *)(m + e), M[u]);
          __stcs((float4 *)(v + e), V[u]);
        } else {
          for (int64_t i = e; i < n && i < e + 4; i++) {
            float pi = p[i], mi = m[i], vi = v[i];
            aw_elem(pi, g[i], mi, vi, c, h, decay);
            p[i] = pi;
            m[i] = mi;
            v[i] = vi;
          }
        }
      }
    } else {
      AW_FETCH_COEF();
      const aw_coef c = coef_s;
      const float decay = ((tab.decay_mask >> k) & 1u) ? c.decay_factor : 1.0f;
#pragma unroll 4
      for (int u = 0; u < 4 * AW_UNROLL; u++) {
        const int64_t i = e0 + (int64_t)u * AW_THREADS + tid;
        if (i < n) {
          float pi = p[i], mi = m[i], vi = v[i];
          aw_elem(pi, g[i], mi, vi, c, h, decay);
          p[i] = pi;
          m[i] = mi;
          v[i] = vi;
        }
      }
    }
  } else if (FUSED && finalize) {
    AW_FETCH_COEF(); /* an empty launch still advances the step */
  }
#undef AW_FETCH_COEF
  if (!FUSED || !finalize) return;
  /* Every block read *step before taking its ticket (thread 0 used it for
   * the coefficients), so the last one may now write it. */
  if (tid == 0) {
    __threadfence();
    const unsigned prev = atomicAdd(sh.ticket, 1u);
    is_last = prev == gridDim.x - 1;
  }
  __syncthreads();
  if (is_last && tid == 0) {
    *sh.step = t_s;
    *sh.ticket = 0u;
  }
}

/* Norm mode in ONE launch, for a call whose tensors fit one chunk and
 * whose tiles are all resident at once (a cooperative launch, one block per
 * tile). Each block loads its tile's p, g, m and v into registers and
 * forms the tile's sum of squares (fixed order inside a thread, warps in
 * order), rounded to float, and publishes it in its slot of `slots` as ONE
 * 64-bit word: (epoch << 32) | float bits, with a release store. `epoch`
 * is new for every launch on the device (adamw.cu's per-device counter;
 * the slots keep older epochs between calls), so the word is both the
 * value and the flag that it is current: thread i of every block polls
 * slot i (acquire) until it carries this epoch, and the barrier and the
 * read of the partials are one round trip. Every block then adds the
 * partials (double) in the same fixed order, so every block gets the same
 * norm, bit for bit, forms the clip factor and updates its tile from the
 * registers. The step's coefficients are computed by thread 0 while it
 * waits; block 0 writes the norm and the new step (every block read *step
 * before its release store, and block 0 writes only after acquiring every
 * slot). The gradients are read once. */
#define AW_REGS (4 * AW_UNROLL) /* elements of one array per thread */
/* Element of register q of thread tid in the element-by-element layout. */
__device__ __forceinline__ int64_t aw_scalar_index(int64_t e0, int q, int tid) {
  return e0 + (int64_t)q * AW_THREADS + tid;
}

__device__ __forceinline__ void aw_store_release(unsigned long long *p, unsigned long long v) {
  asm volatile("st.release.gpu.global.u64 [%0], %1;\n" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ unsigned long long aw_load_acquire(const unsigned long long *p) {
  unsigned long long v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];\n" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__global__ void __launch_bounds__(AW_THREADS, 2)
    adamw_norm_update_kernel(const aw_table tab, const aw_hyper h, const aw_shared sh,
                             unsigned long long *slots, unsigned epoch) {
  __shared__ double warp_sums[AW_THREADS / 32];
  __shared__ aw_coef coef_s;
  __shared__ int32_t t_s;
  const int64_t tile = blockIdx.x; /* grid == tiles, every one valid */
  const int tid = threadIdx.x;
  /* thread 0's loads of the step and lr are in flight with the tile's */
  int32_t step0 = 0;
  float lr0 = 0.0f;
  if (tid == 0) {
    step0 = *sh.step;
    lr0 = *sh.lr;
  }
  const int k = aw_find(tab, tile);
  const int64_t n = tab.n[k];
  const int64_t e0 = (tile - tab.tile_start[k]) * AW_TILE;
  float *p = tab.p[k], *m = tab.m[k], *v = tab.v[k];
  const float *g = tab.g[k];
  const bool vec = (tab.vec_mask >> k) & 1u;

  float P[AW_REGS], G[AW_REGS], M[AW_REGS], V[AW_REGS];
  if (vec) {
#pragma unroll
    for (int u = 0; u < AW_UNROLL; u++) {
      const int64_t e = e0 + 4 * ((int64_t)u * AW_THREADS + tid);
      if (e + 4 <= n) {
        const float4 b = __ldcs((const float4 *)(g + e));
        G[4 * u] = b.x; G[4 * u + 1] = b.y; G[4 * u + 2] = b.z; G[4 * u + 3] = b.w;
      } else {
#pragma unroll
        for (int j = 0; j < 4; j++) G[4 * u + j] = e + j < n ? g[e + j] : 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < AW_UNROLL; u++) {
      const int64_t e = e0 + 4 * ((int64_t)u * AW_THREADS + tid);
      if (e + 4 <= n) {
        const float4 a = __ldcs((const float4 *)(p + e));
        const float4 c = __ldcs((const float4 *)(m + e)), d = __ldcs((const float4 *)(v + e));
        P[4 * u] = a.x; P[4 * u + 1] = a.y; P[4 * u + 2] = a.z; P[4 * u + 3] = a.w;
        M[4 * u] = c.x; M[4 * u + 1] = c.y; M[4 * u + 2] = c.z; M[4 * u + 3] = c.w;
        V[4 * u] = d.x; V[4 * u + 1] = d.y; V[4 * u + 2] = d.z; V[4 * u + 3] = d.w;
      } else {
#pragma unroll
        for (int j = 0; j < 4; j++) {
          const int64_t i = e + j;
          const bool in = i < n;
          P[4 * u + j] = in ? p[i] : 0.0f;
          M[4 * u + j] = in ? m[i] : 0.0f;
          V[4 * u + j] = in ? v[i] : 0.0f;
        }
      }
    }
  } else {
#pragma unroll
    for (int q = 0; q < AW_REGS; q++) {
      const int64_t i = aw_scalar_index(e0, q, tid);
      const bool in = i < n;
      P[q] = in ? p[i] : 0.0f;
      G[q] = in ? g[i] : 0.0f;
      M[q] = in ? m[i] : 0.0f;
      V[q] = in ? v[i] : 0.0f;
    }
  }

  /* This tile's sum of squares (out-of-range elements are 0), published. */
  double s = 0.0;
#pragma unroll
  for (int q = 0; q < AW_REGS; q++) s = fma((double)G[q], (double)G[q], s);
  s = aw_block_sum(s, warp_sums);
  if (tid == 0) {
    const float part = (float)s;
    aw_store_release(slots + tile, ((unsigned long long)epoch << 32) | __float_as_uint(part));
    int32_t t;
    coef_s = aw_coefficients(h, step0, lr0, 1.0, &t);
    t_s = t;
  }

  /* Every tile's partial, in tile order within each thread. */
  double ss = 0.0;
  for (int64_t i = tid; i < sh.total_tiles; i += AW_THREADS) {
    unsigned long long w;
    do {
      w = aw_load_acquire(slots + i);
    } while ((unsigned)(w >> 32) != epoch);
    ss += (double)__uint_as_float((unsigned)(w & 0xffffffffu));
  }
  __syncthreads(); /* warp_sums is read by thread 0 above */
  ss = aw_block_sum(ss, warp_sums);
  if (tid == 0) {
    const double norm = sqrt(ss);
    coef_s.clip = (float)aw_clip(h, norm);
    if (tile == 0) {
      if (sh.grad_norm) *sh.grad_norm = (float)norm;
      *sh.step = t_s;
    }
  }
  __syncthreads();
  const aw_coef c = coef_s;
  const float decay = ((tab.decay_mask >> k) & 1u) ? c.decay_factor : 1.0f;
#pragma unroll
  for (int q = 0; q < AW_REGS; q++) aw_elem(P[q], G[q], M[q], V[q], c, h, decay);
  if (vec) {
#pragma unroll
    for (int u = 0; u < AW_UNROLL; u++) {
      const int64_t e = e0 + 4 * ((int64_t)u * AW_THREADS + tid);
      if (e + 4 <= n) {
        __stcs((float4 *)(p + e), make_float4(P[4 * u], P[4 * u + 1], P[4 * u + 2], P[4 * u + 3]));
        __stcs((float4 *)(m + e), make_float4(M[4 * u], M[4 * u + 1], M[4 * u + 2], M[4 * u + 3]));
        __stcs((float4 *)(v + e), make_float4(V[4 * u], V[4 * u + 1], V[4 * u + 2], V[4 * u + 3]));
      } else {
#pragma unroll
        for (int j = 0; j < 4; j++)
          if (e + j < n) {
            p[e + j] = P[4 * u + j];
            m[e + j] = M[4 * u + j];
            v[e + j] = V[4 * u + j];
          }
      }
    }
  } else {
#pragma unroll
    for (int q = 0; q < AW_REGS; q++) {
      const int64_t i = aw_scalar_index(e0, q, tid);
      if (i < n) {
        p[i] = P[q];
        m[i] = M[q];
        v[i] = V[q];
      }
    }
  }
}

/* One chunk of the tensor table: host copy plus its tile count and the
 * global index of its first tile. */
struct aw_chunk {
  int first, end;  /* tensor indices [first, end) of the call's table */
  int64_t tiles, base;
};

bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* Fill the kernel table of chunk c. */
void fill_table(aw_table *tab, const mx_adamw_args *a, const aw_chunk &c) {
  memset(tab, 0, sizeof *tab);
  int k = 0;
  tab->tile_start[0] = 0;
  for (int i = c.first; i < c.end; i++) {
    const mx_adamw_tensor *t = &a->tensors[i];
    if (t->n == 0) continue;
    tab->p[k] = (float *)t->param;
    tab->g[k] = (const float *)t->grad;
    tab->m[k] = (float *)t->m;
    tab->v[k] = (float *)t->v;
    tab->n[k] = t->n;
    tab->tile_start[k + 1] = tab->tile_start[k] + (t->n + AW_TILE - 1) / AW_TILE;
    if (t->decay) tab->decay_mask |= (uint64_t)1 << k;
    if (aligned16(t->param) && aligned16(t->grad) && aligned16(t->m) && aligned16(t->v))
      tab->vec_mask |= (uint64_t)1 << k;
    k++;
  }
  tab->count = k;
}

/* Per-device ticket counters (0 between calls), allocated on first use
 * under the device mutex and kept for the life of the process. */
unsigned *g_ticket[MX_MAX_CUDA_DEVICES];

/* The one-launch kernel's per-device state, made on first use under the
 * device mutex and kept for the life of the process: how many of its
 * blocks fit at once plus one (0: not asked yet), one slot per such block,
 * and the last epoch used (launches are enqueued under the mutex, so
 * epochs increase in stream order; 0 is never used, slots start at 0). */
int g_coresident[MX_MAX_CUDA_DEVICES];
unsigned long long *g_slots[MX_MAX_CUDA_DEVICES];
unsigned g_epoch[MX_MAX_CUDA_DEVICES];

int coresident_blocks(mx_cuda_dev *d, mx_err *err, int64_t *out) {
  if (g_coresident[d->index] == 0) {
    int per_sm = 0;
    int rc = MX_CUDA_CALL(d, err, cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                                      &per_sm, adamw_norm_update_kernel, AW_THREADS, 0));
    if (rc != MX_OK) return rc;
    const int blocks = per_sm * d->sm_count;
    unsigned long long *slots = NULL;
    if (blocks > 0) {
      const size_t bytes = (size_t)blocks * sizeof *slots;
      rc = MX_CUDA_CALL(d, err, cudaMallocAsync((void **)&slots, bytes, d->stream));
      if (rc == MX_OK) rc = MX_CUDA_CALL(d, err, cudaMemsetAsync(slots, 0, bytes, d->stream));
      if (rc != MX_OK) {
        if (slots) cudaFreeAsync(slots, d->stream);
        return rc;
      }
    }
    g_slots[d->index] = slots;
    g_coresident[d->index] = 1 + blocks;
  }
  *out = g_coresident[d->index] - 1;
  return MX_OK;
}

} // namespace

int mx_cuda_adamw(int dev, const mx_adamw_args *a, mx_err *err) {
  if (!a || a->ntensors < 0 || (a->ntensors > 0 && !a->tensors))
    return mx_cuda_fail(err, MX_E_ARG, "adamw: bad tensor table");
  if (!a->lr || !a->step) return mx_cuda_fail(err, MX_E_ARG, "adamw: lr and step are required");
  if (!(a->beta1 >= 0.0 && a->beta1 < 1.0 && a->beta2 >= 0.0 && a->beta2 < 1.0 &&
        a->eps >= 0.0 && a->weight_decay >= 0.0 && isfinite(a->eps) &&
        isfinite(a->weight_decay) && !isnan(a->max_norm)))
    return mx_cuda_fail(err, MX_E_ARG, "adamw: bad hyper-parameters");

  /* Chunks of at most AW_CH non-empty tensors and AW_MAX_GRID tiles. */
  const int nt = a->ntensors;
  int nchunks = 0;
  int64_t total_tiles = 0;
  {
    int in_chunk = 0;
    int64_t chunk_tiles = 0;
    for (int i = 0; i < nt; i++) {
      const mx_adamw_tensor *t = &a->tensors[i];
      if (t->n < 0 || (t->n > 0 && (!t->param || !t->grad || !t->m || !t->v)))
        return mx_cuda_fail(err, MX_E_ARG, "adamw: bad tensor entry %d", i);
      if (t->n == 0) continue;
      const int64_t tiles = (t->n + AW_TILE - 1) / AW_TILE;
      if (tiles > AW_MAX_GRID)
        return mx_cuda_fail(err, MX_E_ARG, "adamw: tensor %d is too large (%lld elements)", i,
                            (long long)t->n);
      if (in_chunk == 0 || in_chunk == AW_CH || chunk_tiles + tiles > AW_MAX_GRID) {
        nchunks++;
        in_chunk = 0;
        chunk_tiles = 0;
      }
      in_chunk++;
      chunk_tiles += tiles;
      total_tiles += tiles;
    }
  }
  if (nchunks == 0) nchunks = 1; /* nothing to update: one launch still advances the step */

  const bool want_norm = a->grad_norm != NULL || a->max_norm > 0.0;
  aw_hyper h;
  h.b1 = (float)a->beta1;
  h.omb1 = (float)(1.0 - a->beta1);
  h.b2 = (float)a->beta2;
  h.omb2 = (float)(1.0 - a->beta2);
  h.eps = (float)a->eps;
  h.beta1 = a->beta1;
  h.beta2 = a->beta2;
  h.wd = a->weight_decay;
  h.max_norm = a->max_norm;

  mx_cuda_dev *d = NULL;
  int rc = mx_cuda_begin(dev, err, &d);
  if (rc != MX_OK) return rc;
  if (!g_ticket[d->index]) {
    unsigned *tk = NULL;
    rc = MX_CUDA_CALL(d, err, cudaMallocAsync((void **)&tk, sizeof(unsigned), d->stream));
    if (rc == MX_OK) rc = MX_CUDA_CALL(d, err, cudaMemsetAsync(tk, 0, sizeof(unsigned), d->stream));
    if (rc != MX_OK) {
      if (tk) cudaFreeAsync(tk, d->stream);
      mx_cuda_unlock(d);
      return rc;
    }
    g_ticket[d->index] = tk;
  }

  aw_shared sh;
  memset(&sh, 0, sizeof sh);
  sh.lr = a->lr;
  sh.step = a->step;
  sh.grad_norm = a->grad_norm;
  sh.ticket = g_ticket[d->index];
  sh.total_tiles = total_tiles;
  /* Norm mode over one chunk whose tiles can all be resident: one
   * cooperative launch (adamw_norm_update_kernel), which needs none of the
   * two-launch path's scratch. */
  if (want_norm && nchunks == 1 && total_tiles > 0) {
    int64_t fit = 0;
    rc = coresident_blocks(d, err, &fit);
    if (rc == MX_OK && total_tiles <= fit) {
      aw_chunk c = {0, nt, total_tiles, 0};
      aw_table tab1;
      fill_table(&tab1, a, c);
      unsigned long long *slots = g_slots[d->index];
      if (++g_epoch[d->index] == 0u) g_epoch[d->index] = 1u;
      unsigned epoch = g_epoch[d->index];
      void *args[] = {(void *)&tab1, (void *)&h, (void *)&sh, (void *)&slots, (void *)&epoch};
      rc = MX_CUDA_CALL(d, err, cudaLaunchCooperativeKernel((const void *)adamw_norm_update_kernel,
                                                            dim3((unsigned)total_tiles),
                                                            dim3(AW_THREADS), args, 0, d->stream));
      mx_cuda_unlock(d);
      return rc;
    }
    if (rc != MX_OK) {
      mx_cuda_unlock(d);
      return rc;
    }
  }

  char *scratch = NULL;
  if (want_norm) {
    const size_t bytes = 256 + (size_t)(total_tiles ? total_tiles : 1) * sizeof(double);
    rc = MX_CUDA_CALL(d, err, cudaMallocAsync((void **)&scratch, bytes, d->stream));
    if (rc != MX_OK) {
      mx_cuda_unlock(d);
      return rc;
    }
    sh.coef = (aw_coef *)scratch;
    sh.partial = (double *)(scratch + 256);
  }

  /* The chunks again, this time launching. pass 0: sums of squares (norm
   * mode only); pass 1: updates. */
  static_assert(sizeof(aw_table) + sizeof(aw_hyper) + sizeof(aw_shared) + 16 <= 4096,
                "adamw kernel parameters must stay under 4 KB");
  aw_table tab;
  for (int pass = want_norm ? 0 : 1; pass < 2 && rc == MX_OK; pass++) {
    aw_chunk c = {0, 0, 0, 0};
    int chunk_index = 0;
    int i = 0;
    do {
      /* Next chunk: [i, end) holding at most AW_CH non-empty tensors. */
      c.first = i;
      c.base += c.tiles;
      c.tiles = 0;
      int in_chunk = 0;
      while (i < nt) {
        const int64_t n = a->tensors[i].n;
        if (n == 0) {
          i++;
          continue;
        }
        const int64_t tiles = (n + AW_TILE - 1) / AW_TILE;
        if (in_chunk == AW_CH || c.tiles + tiles > AW_MAX_GRID) break;
        in_chunk++;
        c.tiles += tiles;
        i++;
      }
      c.end = i;
      const int last = ++chunk_index == nchunks;
      fill_table(&tab, a, c);
      const unsigned grid = (unsigned)(c.tiles > 0 ? c.tiles : 1);
      if (pass == 0) {
        adamw_sumsq_kernel<<<grid, AW_SQ_THREADS, 0, d->stream>>>(tab, h, sh, c.base, last);
        rc = MX_CUDA_LAUNCH_RC(d, err, "adamw_sumsq_kernel");
      } else if (want_norm) {
        if (c.tiles > 0) {
          adamw_update_kernel<false><<<grid, AW_THREADS, 0, d->stream>>>(tab, h, sh, 0);
          rc = MX_CUDA_LAUNCH_RC(d, err, "adamw_update_kernel");
        }
      } else {
        adamw_update_kernel<true><<<grid, AW_THREADS, 0, d->stream>>>(tab, h, sh, last);
        rc = MX_CUDA_LAUNCH_RC(d, err, "adamw_update_kernel");
      }
    } while (chunk_index < nchunks && rc == MX_OK);
  }
  if (scratch) {
    mx_err ignored;
    int frc = MX_CUDA_CALL(d, rc == MX_OK ? err : &ignored, cudaFreeAsync(scratch, d->stream));
    if (rc == MX_OK) rc = frc;
  }
  mx_cuda_unlock(d);
  return rc;
}

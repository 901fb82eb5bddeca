/*
 * norm.cu: RMSNorm and LayerNorm over the last axis of (rows, dim), with the
 * optional fused residual add, forward and backward, on CUDA. io is f32 or
 * bf16 (x, residual, y, sum, dy, dsum, dx); param is f32 (weight, bias,
 * mean, rstd, dweight, dbias). Math in fp32. The formulas and the gradient
 * conventions are those of c_src/cpu/norm_cpu.c:
 *
 *   s = x + residual (rounded to io; s = x without residual)
 *   y = (s - mean) rstd w (+ b)         mean = 0 for RMSNorm
 *   ds = rstd (g - mean(g) - xhat mean(g xhat)),  g = dy w, xhat = (s - mean) rstd
 *   dx = ds + dsum;  dw = sum_rows dy xhat;  db = sum_rows dy
 *
 * ---- Kernels --------------------------------------------------------------
 *
 * One warp per row, NORM_WARPS rows per block.
 *   - Vector path (dim % 4 == 0, dim <= 1024, aligned pointers): lane l holds
 *     the 4-element chunks l, l + 32, ... of the row in registers (NV chunks,
 *     NV = 1, 2, 4 or 8), loaded with one 16-byte (f32) or 8-byte (bf16)
 *     load each; row sums are warp-shuffle butterflies (every lane ends with
 *     the same bits). The forward is a grid-stride loop over rows with the
 *     weight kept in registers. The backward gives each block a fixed range
 *     of rows, accumulates dw / db per lane in registers, adds the block's
 *     warps in a fixed order through shared memory and writes one row of
 *     per-block partials (blocks, dim).
 *   - Generic path (any dim >= 1): the warp loops over its row (strided by
 *     32), re-reading it from memory (L1/L2) for each pass; the backward's
 *     dw / db partials come from a separate column-parallel kernel over
 *     fixed chunks of rows.
 *   - norm_reduce_kernel adds the partials over blocks/chunks in a fixed
 *     order (a fixed split over 32 thread rows, then those 32 in order) and
 *     writes or adds into dweight / dbias.
 * Block and chunk counts depend only on the shape and the device's SM count,
 * so results are bit-identical from run to run on one device. No atomics.
 * Scratch for the partials is stream-ordered (cudaMallocAsync /
 * cudaFreeAsync right after the kernels that use it).
 */
#include "cuda_dtypes.cuh"
#include "cuda_ops.h"
#include "cuda_runtime_state.h"

#define NORM_WARPS 8
#define NORM_THREADS (NORM_WARPS * 32)
/* Largest dim of the register (vector) path: 32 lanes x 8 chunks x 4. */
#define NORM_VEC_MAX_DIM 1024
/* Chunks of rows of the generic dw / db kernel. */
#define NORM_MAX_CHUNKS 1024

/* ------------------------------------------------------------------------ */
/* Device helpers                                                            */

MX_DEV float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/* 4 consecutive io elements <-> 4 floats; p aligned to 16 (f32) / 8 (bf16). */
template <class D>
MX_DEV void load4(const typename D::T *p, float v[4]) {
  if constexpr (sizeof(typename D::T) == 4) {
    float4 t = *reinterpret_cast<const float4 *>(p);
    v[0] = t.x;
    v[1] = t.y;
    v[2] = t.z;
    v[3] = t.w;
  } else {
    uint2 t = *reinterpret_cast<const uint2 *>(p);
    v[0] = D::load((uint16_t)(t.x & 0xffffu));
    v[1] = D::load((uint16_t)(t.x >> 16));
    v[2] = D::load((uint16_t)(t.y & 0xffffu));
    v[3] = D::load((uint16_t)(t.y >> 16));
  }
}

template <class D>
MX_DEV void store4(typename D::T *p, const float v[4]) {
  if constexpr (sizeof(typename D::T) == 4) {
    *reinterpret_cast<float4 *>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    uint2 t;
    t.x = (uint32_t)D::store(v[0]) | ((uint32_t)D::store(v[1]) << 16);
    t.y = (uint32_t)D::store(v[2]) | ((uint32_t)D::store(v[3]) << 16);
    *reinterpret_cast<uint2 *>(p) = t;
  }
}

MX_DEV void load4f(const float *p, float v[4]) {
  float4 t = *reinterpret_cast<const float4 *>(p);
  v[0] = t.x;
  v[1] = t.y;
  v[2] = t.z;
  v[3] = t.w;
}

/* The value io type D gives v (identity for f32). */
template <class D>
MX_DEV float round_io(float v) {
  return D::load(D::store(v));
}

/* ------------------------------------------------------------------------ */
/* Vector path                                                               */

template <class D, int NV, bool LN>
static __global__ void __launch_bounds__(NORM_THREADS)
    norm_fwd_vec_kernel(const typename D::T *__restrict__ x,   // (rows, dim)
                        const typename D::T *__restrict__ res, // (rows, dim) or NULL
                        const float *__restrict__ w,           // (dim)
                        const float *__restrict__ b,           // (dim) or NULL
                        typename D::T *__restrict__ y,         // (rows, dim)
                        typename D::T *__restrict__ sum,       // (rows, dim) or NULL
                        float *__restrict__ mean,              // (rows), LN only
                        float *__restrict__ rstd,              // (rows)
                        int64_t rows, int dim, float eps) {
  typedef typename D::T T;
  const int lane = threadIdx.x & 31;
  const float inv_d = 1.0f / (float)dim;
  float wv[NV][4], bv[NV][4];
#pragma unroll
  for (int k = 0; k < NV; k++) {
    const int c = 4 * (lane + 32 * k);
    if (c < dim) {
      load4f(w + c, wv[k]);
      if (LN && b) load4f(b + c, bv[k]);
      else bv[k][0] = bv[k][1] = bv[k][2] = bv[k][3] = 0.0f;
    } else {
#pragma unroll
      for (int i = 0; i < 4; i++) wv[k][i] = bv[k][i] = 0.0f;
    }
  }
  for (int64_t r = (int64_t)blockIdx.x * NORM_WARPS + (threadIdx.x >> 5); r < rows;
       r += (int64_t)gridDim.x * NORM_WARPS) {
    const int64_t base = r * dim;
    float v[NV][4];
#pragma unroll
    for (int k = 0; k < NV; k++) {
      const int c = 4 * (lane + 32 * k);
      if (c < dim) {
        load4<D>(x + base + c, v[k]);
        if (res) {
          float q[4];
          load4<D>(res + base + c, q);
#pragma unroll
          for (int i = 0; i < 4; i++) v[k][i] = round_io<D>(v[k][i] + q[i]);
          store4<D>(sum + base + c, v[k]);
        }
      } else {
#pragma unroll
        for (int i = 0; i < 4; i++) v[k][i] = 0.0f;
      }
    }
    float mu = 0.0f;
    if (LN) {
      float a = 0.0f;
#pragma unroll
      for (int k = 0; k < NV; k++) a += (v[k][0] + v[k][1]) + (v[k][2] + v[k][3]);
      mu = warp_sum(a) * inv_d;
    }
    float q = 0.0f;
#pragma unroll
    for (int k = 0; k < NV; k++) {
      if (4 * (lane + 32 * k) < dim) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
          const float d = v[k][i] - mu;
          q += d * d;
        }
      }
    }
    const float rs = 1.0f / sqrtf(warp_sum(q) * inv_d + eps);
    if (lane == 0) {
      rstd[r] = rs;
      if (LN) mean[r] = mu;
    }
#pragma unroll
    for (int k = 0; k < NV; k++) {
      const int c = 4 * (lane + 32 * k);
      if (c < dim) {
        float o[4];
#pragma unroll
        for (int i = 0; i < 4; i++) o[i] = (v[k][i] - mu) * rs * wv[k][i] + bv[k][i];
        store4<D>(y + base + c, o);
      }
    }
  }
}

/* Block b takes rows [b * rows_per_block, ...), warp w of it rows w, w + 8, ...
 * of that range. Dynamic shared memory: NORM_WARPS * dim floats. */
template <class D, int NV, bool LN>
static __global__ void __launch_bounds__(NORM_THREADS)
    norm_bwd_vec_kernel(const typename D::T *__restrict__ s,    // (rows, dim)
                        const float *__restrict__ w,            // (dim)
                        const float *__restrict__ mean,         // (rows), LN only
                        const float *__restrict__ rstd,         // (rows)
                        const typename D::T *__restrict__ dy,   // (rows, dim)
                        const typename D::T *__restrict__ dsum, // (rows, dim) or NULL
                        typename D::T *__restrict__ dx,         // (rows, dim)
                        float *__restrict__ part_w,             // (blocks, dim) or NULL
                        float *__restrict__ part_b,             // (blocks, dim) or NULL
                        int64_t rows, int dim, int64_t rows_per_block) {
  extern __shared__ float red[]; // (NORM_WARPS, dim)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float inv_d = 1.0f / (float)dim;
  float wv[NV][4], aw[NV][4], ab[NV][4];
#pragma unroll
  for (int k = 0; k < NV; k++) {
    const int c = 4 * (lane + 32 * k);
    if (c < dim) load4f(w + c, wv[k]);
    else wv[k][0] = wv[k][1] = wv[k][2] = wv[k][3] = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; i++) aw[k][i] = ab[k][i] = 0.0f;
  }
  const int64_t r0 = (int64_t)blockIdx.x * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < rows ? r0 + rows_per_block : rows;
  for (int64_t r = r0 + warp; r < r1; r += NORM_WARPS) {
    const int64_t base = r * dim;
    const float mu = LN ? mean[r] : 0.0f;
    const float rs = rstd[r];
    float xh[NV][4], g[NV][4];
    float sgx = 0.0f, sg = 0.0f;
#pragma unroll
    for (int k = 0; k < NV; k++) {
      const int c = 4 * (lane + 32 * k);
      if (c < dim) {
        float sv[4];
        load4<D>(s + base + c, sv);
        load4<D>(dy + base + c, g[k]);
#pragma unroll
        for (int i = 0; i < 4; i++) {
          xh[k][i] = (sv[i] - mu) * rs;
          aw[k][i] += g[k][i] * xh[k][i];
          ab[k][i] += g[k][i];
          g[k][i] *= wv[k][i];
          sgx += g[k][i] * xh[k][i];
          sg += g[k][i];
        }
      } else {
#pragma unroll
        for (int i = 0; i < 4; i++) xh[k][i] = g[k][i] = 0.0f;
      }
    }
    const float mgx = warp_sum(sgx) * inv_d;
    const float mg = LN ? warp_sum(sg) * inv_d : 0.0f;
#pragma unroll
    for (int k = 0; k < NV; k++) {
      const int c = 4 * (lane + 32 * k);
      if (c < dim) {
        float o[4], ds[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (dsum) load4<D>(dsum + base + c, ds);
#pragma unroll
        for (int i = 0; i < 4; i++) o[i] = rs * (g[k][i] - mg - xh[k][i] * mgx) + ds[i];
        store4<D>(dx + base + c, o);
      }
    }
  }
  /* Per-block partials: the block's warps added in order 0, 1, ... */
  for (int which = 0; which < 2; which++) {
    float *part = which == 0 ? part_w : part_b;
    if (!part) continue; /* uniform over the block */
#pragma unroll
    for (int k = 0; k < NV; k++) {
      const int c = 4 * (lane + 32 * k);
      if (c < dim) {
        const float *src = which == 0 ? aw[k] : ab[k];
        *reinterpret_cast<float4 *>(red + warp * dim + c) =
            make_float4(src[0], src[1], src[2], src[3]);
      }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < dim; j += NORM_THREADS) {
      float t = 0.0f;
#pragma unroll
      for (int q = 0; q < NORM_WARPS; q++) t += red[q * dim + j];
      part[(int64_t)blockIdx.x * dim + j] = t;
    }
    __syncthreads();
  }
}

/* ------------------------------------------------------------------------ */
/* Generic path                                                              */

template <class D, bool LN>
static __global__ void __launch_bounds__(NORM_THREADS)
    norm_fwd_generic_kernel(const typename D::T *__restrict__ x,   // (rows, dim)
                            const typename D::T *__restrict__ res, // (rows, dim) or NULL
                            const float *__restrict__ w,           // (dim)
                            const float *__restrict__ b,           // (dim) or NULL
                            typename D::T *__restrict__ y,         // (rows, dim)
                            typename D::T *__restrict__ sum,       // (rows, dim) or NULL
                            float *__restrict__ mean,              // (rows), LN only
                            float *__restrict__ rstd,              // (rows)
                            int64_t rows, int64_t dim, float eps) {
  typedef typename D::T T;
  const int lane = threadIdx.x & 31;
  const float fdim = (float)dim;
  for (int64_t r = (int64_t)blockIdx.x * NORM_WARPS + (threadIdx.x >> 5); r < rows;
       r += (int64_t)gridDim.x * NORM_WARPS) {
    const int64_t base = r * dim;
    const T *xr = x + base;
    float a = 0.0f;
    if (res) {
      const T *rr = res + base;
      T *sr = sum + base;
      for (int64_t j = lane; j < dim; j += 32) {
        const T q = D::store(D::load(xr[j]) + D::load(rr[j]));
        sr[j] = q;
        const float v = D::load(q);
        a += LN ? v : v * v;
      }
      xr = sr; /* this lane reads back only what it wrote */
    } else {
      for (int64_t j = lane; j < dim; j += 32) {
        const float v = D::load(xr[j]);
        a += LN ? v : v * v;
      }
    }
    const float tot = warp_sum(a);
    float mu = 0.0f, var;
    if (LN) {
      mu = tot / fdim;
      float q = 0.0f;
      for (int64_t j = lane; j < dim; j += 32) {
        const float d = D::load(xr[j]) - mu;
        q += d * d;
      }
      var = warp_sum(q) / fdim;
    } else {
      var = tot / fdim;
    }
    const float rs = 1.0f / sqrtf(var + eps);
    if (lane == 0) {
      rstd[r] = rs;
      if (LN) mean[r] = mu;
    }
    T *yr = y + base;
    for (int64_t j = lane; j < dim; j += 32) {
      float o = (D::load(xr[j]) - mu) * rs * w[j];
      if (LN && b) o += b[j];
      yr[j] = D::store(o);
    }
  }
}

template <class D, bool LN>
static __global__ void __launch_bounds__(NORM_THREADS)
    norm_bwd_generic_kernel(const typename D::T *__restrict__ s,    // (rows, dim)
                            const float *__restrict__ w,            // (dim)
                            const float *__restrict__ mean,         // (rows), LN only
                            const float *__restrict__ rstd,         // (rows)
                            const typename D::T *__restrict__ dy,   // (rows, dim)
                            const typename D::T *__restrict__ dsum, // (rows, dim) or NULL
                            typename D::T *__restrict__ dx,         // (rows, dim)
                            int64_t rows, int64_t dim) {
  const int lane = threadIdx.x & 31;
  const float fdim = (float)dim;
  for (int64_t r = (int64_t)blockIdx.x * NORM_WARPS + (threadIdx.x >> 5); r < rows;
       r += (int64_t)gridDim.x * NORM_WARPS) {
    const int64_t base = r * dim;
    const float mu = LN ? mean[r] : 0.0f;
    const float rs = rstd[r];
    float sgx = 0.0f, sg = 0.0f;
    for (int64_t j = lane; j < dim; j += 32) {
      const float g = D::load(dy[base + j]) * w[j];
      sgx += g * ((D::load(s[base + j]) - mu) * rs);
      sg += g;
    }
    const float mgx = warp_sum(sgx) / fdim;
    const float mg = LN ? warp_sum(sg) / fdim : 0.0f;
    for (int64_t j = lane; j < dim; j += 32) {
      const float g = D::load(dy[base + j]) * w[j];
      const float xh = (D::load(s[base + j]) - mu) * rs;
      float o = rs * (g - mg - xh * mgx);
      if (dsum) o += D::load(dsum[base + j]);
      dx[base + j] = D::store(o);
    }
  }
}

/* part_w[chunk, j] = sum over the chunk's rows (in order) of dy xhat; part_b
 * likewise of dy. Grid (ceil(dim / NORM_THREADS), chunks). */
template <class D, bool LN>
static __global__ void __launch_bounds__(NORM_THREADS)
    norm_dw_generic_kernel(const typename D::T *__restrict__ s,  // (rows, dim)
                           const float *__restrict__ mean,       // (rows), LN only
                           const float *__restrict__ rstd,       // (rows)
                           const typename D::T *__restrict__ dy, // (rows, dim)
                           float *__restrict__ part_w,           // (chunks, dim) or NULL
                           float *__restrict__ part_b,           // (chunks, dim) or NULL
                           int64_t rows, int64_t dim, int64_t rows_per_chunk) {
  const int64_t j = (int64_t)blockIdx.x * NORM_THREADS + threadIdx.x;
  if (j >= dim) return;
  const int64_t r0 = (int64_t)blockIdx.y * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  float aw = 0.0f, ab = 0.0f;
  for (int64_t r = r0; r < r1; r++) {
    const float g = D::load(dy[r * dim + j]);
    const float mu = LN ? mean[r] : 0.0f;
    aw += g * ((D::load(s[r * dim + j]) - mu) * rstd[r]);
    ab += g;
  }
  if (part_w) part_w[(int64_t)blockIdx.y * dim + j] = aw;
  if (part_b) part_b[(int64_t)blockIdx.y * dim + j] = ab;
}

/* out_y[j] = [out_y[j] +] sum over p < nparts of part_y[p, j], for y =
 * blockIdx.y in {0: weight, 1: bias}. Thread (tx, ty) sums p = ty, ty + 32,
 * ...; the 32 thread rows are then added in order. Block (32, 32). */
static __global__ void __launch_bounds__(1024)
    norm_reduce_kernel(const float *__restrict__ part0, // (nparts, dim)
                       const float *__restrict__ part1, // (nparts, dim) or NULL
                       float *__restrict__ out0,        // (dim)
                       float *__restrict__ out1,        // (dim) or NULL
                       int64_t nparts, int64_t dim, int accumulate) {
  __shared__ float sh[32][33];
  const float *part = blockIdx.y == 0 ? part0 : part1;
  float *out = blockIdx.y == 0 ? out0 : out1;
  const int64_t j = (int64_t)blockIdx.x * 32 + threadIdx.x;
  float t = 0.0f;
  if (j < dim)
    for (int64_t p = threadIdx.y; p < nparts; p += 32) t += part[p * dim + j];
  sh[threadIdx.y][threadIdx.x] = t;
  __syncthreads();
  if (threadIdx.y == 0 && j < dim) {
    float tot = 0.0f;
#pragma unroll
    for (int q = 0; q < 32; q++) tot += sh[q][threadIdx.x];
    out[j] = accumulate ? out[j] + tot : tot;
  }
}

/* ------------------------------------------------------------------------ */
/* Launchers (device mutex held)                                             */

namespace {

bool aligned(const void *p, unsigned bytes) { return ((uintptr_t)p % bytes) == 0; }

/* Chunks of 4 per lane for the vector path, or 0 for the generic path. */
int vec_chunks(const mx_norm_args *a, const void *const *io_ptrs, int n_io,
               const void *const *f_ptrs, int n_f) {
  if (a->dim % 4 != 0 || a->dim > NORM_VEC_MAX_DIM) return 0;
  const unsigned io_align = a->io == MX_F32 ? 16 : 8;
  for (int i = 0; i < n_io; i++)
    if (io_ptrs[i] && !aligned(io_ptrs[i], io_align)) return 0;
  for (int i = 0; i < n_f; i++)
    if (f_ptrs[i] && !aligned(f_ptrs[i], 16)) return 0;
  const int64_t per_lane = (a->dim + 127) / 128;
  return per_lane <= 1 ? 1 : per_lane <= 2 ? 2 : per_lane <= 4 ? 4 : 8;
}

unsigned row_grid(const mx_cuda_dev *d, int64_t rows) {
  int64_t blocks = (rows + NORM_WARPS - 1) / NORM_WARPS;
  const int64_t cap = (int64_t)d->sm_count * 16;
  if (blocks > cap) blocks = cap;
  return blocks < 1 ? 1u : (unsigned)blocks;
}

struct fwd_launch {
  mx_cuda_dev *d;
  const mx_norm_args *a;
  void *y, *sum, *mean, *rstd;
  mx_err *err;

  template <class D, int NV, bool LN>
  int vec() {
    typedef typename D::T T;
    norm_fwd_vec_kernel<D, NV, LN><<<row_grid(d, a->rows), NORM_THREADS, 0, d->stream>>>(
        (const T *)a->x, (const T *)a->residual, (const float *)a->weight,
        (const float *)a->bias, (T *)y, (T *)sum, (float *)mean, (float *)rstd, a->rows,
        (int)a->dim, (float)a->eps);
    MX_CUDA_LAUNCHED(d, err, "norm_fwd_vec_kernel");
    return MX_OK;
  }

  template <class D, bool LN>
  int pick(int nv) {
    typedef typename D::T T;
    switch (nv) {
      case 1: return vec<D, 1, LN>();
      case 2: return vec<D, 2, LN>();
      case 4: return vec<D, 4, LN>();
      case 8: return vec<D, 8, LN>();
      default: break;
    }
    norm_fwd_generic_kernel<D, LN><<<row_grid(d, a->rows), NORM_THREADS, 0, d->stream>>>(
        (const T *)a->x, (const T *)a->residual, (const float *)a->weight,
        (const float *)a->bias, (T *)y, (T *)sum, (float *)mean, (float *)rstd, a->rows, a->dim,
        (float)a->eps);
    MX_CUDA_LAUNCHED(d, err, "norm_fwd_generic_kernel");
    return MX_OK;
  }

  template <class D>
  int run() {
    const void *io[4] = {a->x, a->residual, y, sum};
    const void *f[2] = {a->weight, a->bias};
    const int nv = vec_chunks(a, io, 4, f, 2);
    return a->kind == MX_LAYERNORM ? pick<D, true>(nv) : pick<D, false>(nv);
  }
};

struct bwd_launch {
  mx_cuda_dev *d;
  const mx_norm_args *a;
  const void *mean, *rstd, *dy, *dsum;
  void *dx, *dweight, *dbias;
  int accumulate;
  mx_err *err;

  /* Partials (nparts, dim) of dw and db in one scratch buffer. */
  int with_partials(int64_t nparts, int (bwd_launch::*kernels)(int64_t, float *, float *)) {
    const int64_t dim = a->dim;
    const int nbuf = (dweight ? 1 : 0) + (dbias ? 1 : 0);
    float *scratch = NULL;
    if (nbuf) {
      MX_CUDA_TRY(d, err,
                  cudaMallocAsync((void **)&scratch,
                                  (size_t)nparts * (size_t)dim * nbuf * sizeof(float), d->stream));
    }
    float *pw = dweight ? scratch : NULL;
    float *pb = dbias ? scratch + (dweight ? (size_t)nparts * (size_t)dim : 0) : NULL;
    int rc = (this->*kernels)(nparts, pw, pb);
    if (rc == MX_OK && nbuf) {
      dim3 grid((unsigned)((dim + 31) / 32), (unsigned)nbuf);
      float *out0 = dweight ? (float *)dweight : (float *)dbias;
      const float *part0 = dweight ? pw : pb;
      norm_reduce_kernel<<<grid, dim3(32, 32), 0, d->stream>>>(
          part0, pb, out0, (float *)dbias, nparts, dim, accumulate);
      rc = MX_CUDA_LAUNCH_RC(d, err, "norm_reduce_kernel");
    }
    if (scratch) {
      mx_err ignored;
      (void)MX_CUDA_CALL(d, rc == MX_OK ? err : &ignored, cudaFreeAsync(scratch, d->stream));
    }
    return rc;
  }

  /* vector path state */
  int nv;
  int64_t rows_per_block;
  bool ln;

  template <class D, int NV, bool LN>
  int vec_kernel(int64_t nparts, float *pw, float *pb) {
    typedef typename D::T T;
    const size_t shmem = (size_t)NORM_WARPS * (size_t)a->dim * sizeof(float);
    norm_bwd_vec_kernel<D, NV, LN><<<(unsigned)nparts, NORM_THREADS, shmem, d->stream>>>(
        (const T *)a->x, (const float *)a->weight, (const float *)mean, (const float *)rstd,
        (const T *)dy, (const T *)dsum, (T *)dx, pw, pb, a->rows, (int)a->dim, rows_per_block);
    MX_CUDA_LAUNCHED(d, err, "norm_bwd_vec_kernel");
    return MX_OK;
  }

  template <class D, bool LN>
  int vec_pick(int64_t nparts, float *pw, float *pb) {
    switch (nv) {
      case 1: return vec_kernel<D, 1, LN>(nparts, pw, pb);
      case 2: return vec_kernel<D, 2, LN>(nparts, pw, pb);
      case 4: return vec_kernel<D, 4, LN>(nparts, pw, pb);
      default: return vec_kernel<D, 8, LN>(nparts, pw, pb);
    }
  }

  template <class D>
  int vec_kernels(int64_t nparts, float *pw, float *pb) {
    return ln ? vec_pick<D, true>(nparts, pw, pb) : vec_pick<D, false>(nparts, pw, pb);
  }

  template <class D, bool LN>
  int generic_pick(int64_t nparts, float *pw, float *pb) {
    typedef typename D::T T;
    norm_bwd_generic_kernel<D, LN><<<row_grid(d, a->rows), NORM_THREADS, 0, d->stream>>>(
        (const T *)a->x, (const float *)a->weight, (const float *)mean, (const float *)rstd,
        (const T *)dy, (const T *)dsum, (T *)dx, a->rows, a->dim);
    MX_CUDA_LAUNCHED(d, err, "norm_bwd_generic_kernel");
    if (pw || pb) {
      dim3 grid((unsigned)((a->dim + NORM_THREADS - 1) / NORM_THREADS), (unsigned)nparts);
      norm_dw_generic_kernel<D, LN><<<grid, NORM_THREADS, 0, d->stream>>>(
          (const T *)a->x, (const float *)mean, (const float *)rstd, (const T *)dy, pw, pb,
          a->rows, a->dim, rows_per_block);
      MX_CUDA_LAUNCHED(d, err, "norm_dw_generic_kernel");
    }
    return MX_OK;
  }

  template <class D>
  int generic_kernels(int64_t nparts, float *pw, float *pb) {
    return ln ? generic_pick<D, true>(nparts, pw, pb) : generic_pick<D, false>(nparts, pw, pb);
  }

  template <class D>
  int run() {
    ln = a->kind == MX_LAYERNORM;
    const void *io[4] = {a->x, dy, dsum, dx};
    const void *f[1] = {a->weight};
    nv = vec_chunks(a, io, 4, f, 1);
    const int64_t rows = a->rows;
    if (nv) {
      /* A fixed range of rows per block, about 4 blocks per SM. */
      int64_t blocks = (rows + NORM_WARPS - 1) / NORM_WARPS;
      const int64_t cap = (int64_t)d->sm_count * 4;
      if (blocks > cap) blocks = cap;
      rows_per_block = (rows + blocks - 1) / blocks;
      blocks = (rows + rows_per_block - 1) / rows_per_block;
      return with_partials(blocks, &bwd_launch::vec_kernels<D>);
    }
    int64_t chunks = rows < NORM_MAX_CHUNKS ? rows : NORM_MAX_CHUNKS;
    rows_per_block = (rows + chunks - 1) / chunks;
    chunks = (rows + rows_per_block - 1) / rows_per_block;
    return with_partials(chunks, &bwd_launch::generic_kernels<D>);
  }
};

int check_args(const mx_norm_args *a, const char *op, mx_err *err) {
  if (!a) return mx_cuda_fail(err, MX_E_ARG, "%s: NULL arguments", op);
  if (a->io != MX_F32 && a->io != MX_BF16)
    return mx_cuda_fail(err, MX_E_ARG, "%s: io must be f32 or bf16, got dtype %d", op, a->io);
  if (a->param != MX_F32)
    return mx_cuda_fail(err, MX_E_ARG, "%s: param must be f32, got dtype %d", op, a->param);
  if (a->kind != MX_RMSNORM && a->kind != MX_LAYERNORM)
    return mx_cuda_fail(err, MX_E_ARG, "%s: unknown norm kind %d", op, a->kind);
  if (a->rows < 0 || a->dim < 1)
    return mx_cuda_fail(err, MX_E_ARG, "%s: bad shape (%ld, %ld)", op, (long)a->rows,
                        (long)a->dim);
  if (a->bias && a->kind != MX_LAYERNORM)
    return mx_cuda_fail(err, MX_E_ARG, "%s: bias is for LayerNorm only", op);
  if (!(a->eps >= 0)) return mx_cuda_fail(err, MX_E_ARG, "%s: eps must be >= 0", op);
  return MX_OK;
}

template <class F>
int dispatch_io(int io, F &fn) {
  return io == MX_F32 ? fn.template run<mx_t_f32>() : fn.template run<mx_t_bf16>();
}

} // namespace

int mx_cuda_norm_forward(int dev, const mx_norm_args *a, void *y, void *sum, void *mean,
                         void *rstd, mx_err *err) {
  const char *op = "norm_forward";
  int rc = check_args(a, op, err);
  if (rc != MX_OK) return rc;
  mx_cuda_dev *d = NULL;
  rc = mx_cuda_open(dev, err, &d);
  if (rc != MX_OK) return rc;
  if (a->rows == 0) return MX_OK;
  if (!a->x || !a->weight || !y || !rstd || (a->residual && !sum) ||
      (a->kind == MX_LAYERNORM && !mean))
    return mx_cuda_fail(err, MX_E_ARG, "%s: missing input or output", op);
  fwd_launch fn = {d, a, y, sum, mean, rstd, err};
  pthread_mutex_lock(&d->mu);
  rc = dispatch_io(a->io, fn);
  mx_cuda_unlock(d);
  return rc;
}

int mx_cuda_norm_backward(int dev, const mx_norm_args *a, const void *mean, const void *rstd,
                          const void *dy, const void *dsum, void *dx, void *dweight, void *dbias,
                          int accumulate, mx_err *err) {
  const char *op = "norm_backward";
  int rc = check_args(a, op, err);
  if (rc != MX_OK) return rc;
  if (dbias && a->kind != MX_LAYERNORM)
    return mx_cuda_fail(err, MX_E_ARG, "%s: dbias is for LayerNorm only", op);
  mx_cuda_dev *d = NULL;
  rc = mx_cuda_open(dev, err, &d);
  if (rc != MX_OK) return rc;
  if (a->rows == 0) { /* empty sums: 0, or nothing to add */
    if (accumulate) return MX_OK;
    pthread_mutex_lock(&d->mu);
    const size_t bytes = (size_t)a->dim * sizeof(float);
    if (dweight) rc = MX_CUDA_CALL(d, err, cudaMemsetAsync(dweight, 0, bytes, d->stream));
    if (rc == MX_OK && dbias) rc = MX_CUDA_CALL(d, err, cudaMemsetAsync(dbias, 0, bytes, d->stream));
    mx_cuda_unlock(d);
    return rc;
  }
  if (!a->x || !a->weight || !rstd || !dy || !dx || (a->kind == MX_LAYERNORM && !mean))
    return mx_cuda_fail(err, MX_E_ARG, "%s: missing input or output", op);
  bwd_launch fn;
  fn.d = d;
  fn.a = a;
  fn.mean = mean;
  fn.rstd = rstd;
  fn.dy = dy;
  fn.dsum = dsum;
  fn.dx = dx;
  fn.dweight = dweight;
  fn.dbias = dbias;
  fn.accumulate = accumulate;
  fn.err = err;
  fn.nv = 0;
  fn.rows_per_block = 1;
  fn.ln = false;
  pthread_mutex_lock(&d->mu);
  rc = dispatch_io(a->io, fn);
  mx_cuda_unlock(d);
  return rc;
}

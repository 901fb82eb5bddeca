/*
 * reduce_permute.cu: reduction over one axis and axis permutation of the
 * CUDA backend.
 *
 * reduce: x viewed as (outer, dim, inner) is reduced over dim into out
 * (outer, inner); SUM, MEAN (the sum divided by dim in the accumulator type:
 * float for f32/bf16/f16, double for f64, int64 with C truncation for
 * integers) and RMAX. Integer sums wrap; float sums start from -0.0 (so a
 * sum of -0s is -0, as the CPU's, which starts from x[0]). Float RMAX is a
 * max in a total order: any NaN gives the canonical NAN, else the largest
 * value, +0 counting above -0, so it does not depend on the order (the CPU
 * keeps the first maximal element, which differs only for {-0, +0}).
 *
 * One kernel does every shape. A block of MX_BLOCK threads is laid out as
 * (TZ, TY, TX), all powers of two: TX lanes cover consecutive positions along
 * inner (TX = the power of two >= min(inner, 32), so loads coalesce), TY
 * lanes split one chunk of dim, and TZ independent items share the block.
 * An item is (o, c, jtile): one output tile of TX columns over chunk c of dim.
 * Each lane accumulates its elements k = lo+ty, lo+ty+TY, ... into four
 * accumulators in turn (a0 gets k, a1 k+TY, a2 k+2TY, a3 k+3TY, and so on
 * while four remain; the tail goes to a0), combines them as
 * (a0.a1).(a2.a3), then the TY lanes are combined by a halving tree (lane
 * ty < s takes lane ty + s; shared memory across warps, shuffles within one).
 * TY is chosen for about 16 elements per lane. The order depends on sizes only,
 * so results are bit-identical from run to run (no atomics). They are not
 * the CPU backend's bits for float SUM/MEAN (different summation order).
 *
 * When outer * jtiles is too small to fill the GPU and dim is long, dim is
 * split into chunks: pass 1 writes partials (outer, chunks, inner) in the
 * accumulator type into a stream-ordered temporary, pass 2 reduces them with
 * the same kernel (SUM for SUM and MEAN, RMAX for RMAX) and divides by the
 * original dim for MEAN. The chunking depends only on the sizes.
 *
 * permute: first size-1 axes are dropped and output axes that stay adjacent
 * in the input are merged. Then, when the innermost output axis is the
 * input's contiguous tail, a strided gather (the output index is split into
 * output coordinates and mapped to the input offset, 32-bit index math when
 * everything fits) with the element widened up to 16 bytes as alignment
 * allows; otherwise, when the innermost axes of both sides have >= 16
 * elements, a tiled transpose through shared memory; else the gather.
 */
#include <math.h>
#include <type_traits>

#include "cuda_dtypes.cuh"
#include "cuda_ops.h"
#include "cuda_runtime_state.h"

/* Pass 1 chunks dim until it has this many items (several waves of blocks,
 * so that the last wave's tail costs little). */
#define MX_REDUCE_TARGET_ITEMS 8192
/* A chunk gives each of its TY lanes at least this many elements. */
#define MX_REDUCE_MIN_PER_LANE 16
#define MX_MAX_GRID (1u << 20)

/* ------------------------------------------------------------------------ */
/* Reduce                                                                    */

/* Partials are read back through this tag: already in the accumulator type. */
template <class A>
struct mx_t_acc {
  typedef A T;
  MX_DEV A load(A v) { return v; }
};

template <int OP, class A>
MX_DEV A red_identity() {
  if constexpr (OP == MX_RMAX) {
    if constexpr (std::is_same<A, int64_t>::value)
      return INT64_MIN;
    else
      return (A)-INFINITY;
  } else {
    /* -0 is the exact additive identity: -0 + x == x for every x, -0 too. */
    return std::is_same<A, int64_t>::value ? (A)0 : (A)-0.0;
  }
}

template <int OP, class A>
MX_DEV A red_combine(A acc, A v) {
  if constexpr (OP == MX_RMAX) {
    if constexpr (std::is_same<A, int64_t>::value) {
      return v > acc ? v : acc;
    } else {
      /* A total order (NaN on top, +0 above -0), so the result does not
       * depend on the combining order. */
      if (acc != acc || v != v) return (A)NAN;
      return (v > acc || (v == acc && signbit(acc) && !signbit(v))) ? v : acc;
    }
  } else if constexpr (std::is_same<A, int64_t>::value) {
    return mx_wadd(acc, v);
  } else {
    return acc + v;
  }
}

template <int OP, class A>
MX_DEV A red_finish(A acc, uint64_t dim) {
  if constexpr (OP == MX_MEAN)
    return acc / (A)dim;
  else
    return acc;
}

template <class D, class S, int OP>
static __global__ void __launch_bounds__(MX_BLOCK)
    reduce_kernel(const typename S::T *x, // (outer, dim, inner)
                  typename D::C *partial, // (outer, chunks, inner) when chunks > 1
                  typename D::T *out,     // (outer, inner) when chunks == 1
                  uint64_t outer, uint64_t dim, uint64_t inner, uint64_t chunks,
                  uint64_t chunk_len, uint64_t jtiles, int tx_log, int ty_log,
                  uint64_t mean_dim) {
  typedef typename D::C A;
  __shared__ A sh[MX_BLOCK];
  const unsigned tid = threadIdx.x;
  const unsigned TX = 1u << tx_log, TY = 1u << ty_log;
  const unsigned TZ = MX_BLOCK >> (tx_log + ty_log);
  const unsigned tx = tid & (TX - 1);
  const unsigned ty = (tid >> tx_log) & (TY - 1);
  const unsigned tz = tid >> (tx_log + ty_log);
  const uint64_t items = outer * chunks * jtiles;

  /* Every thread of the block runs the same number of iterations (barriers). */
  for (uint64_t base = (uint64_t)blockIdx.x * TZ; base < items;
       base += (uint64_t)gridDim.x * TZ) {
    const uint64_t item = base + tz;
    uint64_t o = 0, c = 0, j = 0;
    bool live = false;
    A acc = red_identity<OP, A>();
    if (item < items) {
      const uint64_t oc = item / jtiles;
      j = (item - oc * jtiles) * TX + tx;
      o = oc / chunks;
      c = oc - o * chunks;
      live = j < inner;
    }
    if (live) {
      const uint64_t lo = c * chunk_len;
      const uint64_t hi = dim - lo < chunk_len ? dim : lo + chunk_len;
      const typename S::T *p = x + o * dim * inner + j; /* element k of the row: p[k * inner] */
      /* a_m takes the lane's elements number m, m+4, m+8, ... of its strided
       * sequence while four remain, the rest go to a0. The 8-wide loop only
       * keeps more loads in flight; it assigns exactly as the 4-wide one. */
      A a0 = acc, a1 = acc, a2 = acc, a3 = acc;
      uint64_t k = lo + ty;
      const uint64_t ty64 = TY;
      for (; k + 7 * ty64 < hi; k += 8 * ty64) {
        const A v0 = S::load(p[k * inner]);
        const A v1 = S::load(p[(k + ty64) * inner]);
        const A v2 = S::load(p[(k + 2 * ty64) * inner]);
        const A v3 = S::load(p[(k + 3 * ty64) * inner]);
        const A v4 = S::load(p[(k + 4 * ty64) * inner]);
        const A v5 = S::load(p[(k + 5 * ty64) * inner]);
        const A v6 = S::load(p[(k + 6 * ty64) * inner]);
        const A v7 = S::load(p[(k + 7 * ty64) * inner]);
        a0 = red_combine<OP>(a0, v0);
        a1 = red_combine<OP>(a1, v1);
        a2 = red_combine<OP>(a2, v2);
        a3 = red_combine<OP>(a3, v3);
        a0 = red_combine<OP>(a0, v4);
        a1 = red_combine<OP>(a1, v5);
        a2 = red_combine<OP>(a2, v6);
        a3 = red_combine<OP>(a3, v7);
      }
      for (; k + 3 * ty64 < hi; k += 4 * ty64) {
        const A v0 = S::load(p[k * inner]);
        const A v1 = S::load(p[(k + ty64) * inner]);
        const A v2 = S::load(p[(k + 2 * ty64) * inner]);
        const A v3 = S::load(p[(k + 3 * ty64) * inner]);
        a0 = red_combine<OP>(a0, v0);
        a1 = red_combine<OP>(a1, v1);
        a2 = red_combine<OP>(a2, v2);
        a3 = red_combine<OP>(a3, v3);
      }
      for (; k < hi; k += ty64) a0 = red_combine<OP>(a0, S::load(p[k * inner]));
      acc = red_combine<OP>(red_combine<OP>(a0, a1), red_combine<OP>(a2, a3));
    }
    /* Halving tree over ty: at step s, lane ty < s takes combine(its value,
     * lane ty + s's). Steps whose partner is in another warp go through
     * shared memory, the rest through shuffles; the order is the same. */
    unsigned s = TY >> 1;
    if ((TY << tx_log) > 32) {
      sh[tid] = acc;
      __syncthreads();
      for (; s > 0 && (s << tx_log) >= 32; s >>= 1) {
        if (ty < s) sh[tid] = red_combine<OP>(sh[tid], sh[tid + (s << tx_log)]);
        __syncthreads();
      }
      acc = sh[tid];
    }
    for (; s > 0; s >>= 1) {
      const A other = __shfl_xor_sync(0xffffffffu, acc, s << tx_log);
      acc = red_combine<OP>(acc, other);
    }
    if (ty == 0 && live) {
      if (chunks > 1)
        partial[(o * chunks + c) * inner + j] = acc;
      else
        out[o * inner + j] = D::store(red_finish<OP>(acc, mean_dim));
    }
    __syncthreads(); /* sh is rewritten by the next iteration */
  }
}

typedef struct {
  uint64_t chunks, chunk_len, jtiles, blocks;
  int tx_log, ty_log;
} reduce_plan;

/* Block layout and chunking for reducing (outer, dim, inner); sizes only. */
static reduce_plan plan_reduce(uint64_t outer, uint64_t dim, uint64_t inner, bool may_chunk) {
  reduce_plan p;
  p.tx_log = 0;
  while (p.tx_log < 5 && ((uint64_t)1 << p.tx_log) < inner) p.tx_log++;
  const int max_ty_log = 8 - p.tx_log; /* TX * TY <= MX_BLOCK = 256 */
  p.jtiles = (inner + ((uint64_t)1 << p.tx_log) - 1) >> p.tx_log;
  p.chunks = 1;
  const uint64_t base_items = outer * p.jtiles;
  if (may_chunk && base_items < MX_REDUCE_TARGET_ITEMS) {
    const uint64_t want = (MX_REDUCE_TARGET_ITEMS + base_items - 1) / base_items;
    const uint64_t most = dim / ((uint64_t)MX_REDUCE_MIN_PER_LANE << max_ty_log);
    p.chunks = want < most ? want : most;
    if (p.chunks < 1) p.chunks = 1;
  }
  p.chunk_len = (dim + p.chunks - 1) / p.chunks;
  p.chunks = (dim + p.chunk_len - 1) / p.chunk_len;
  /* TY: the power of two that gives each lane about 16 elements. */
  p.ty_log = 0;
  while (p.ty_log < max_ty_log && ((uint64_t)16 << p.ty_log) < p.chunk_len) p.ty_log++;
  const uint64_t tz = (uint64_t)MX_BLOCK >> (p.tx_log + p.ty_log);
  const uint64_t items = outer * p.chunks * p.jtiles;
  p.blocks = (items + tz - 1) / tz;
  if (p.blocks > MX_MAX_GRID) p.blocks = MX_MAX_GRID;
  return p;
}

namespace { /* internal linkage: nothing here reaches the symbol table */

struct reduce_forward {
  mx_cuda_dev *d;
  int op;
  const void *x;
  void *out;
  uint64_t outer, dim, inner;
  mx_err *err;

  template <class D, int OP>
  int launch() {
    typedef typename D::C A;
    const reduce_plan p1 = plan_reduce(outer, dim, inner, true);
    if (p1.chunks == 1) {
      reduce_kernel<D, D, OP><<<(unsigned)p1.blocks, MX_BLOCK, 0, d->stream>>>(
          (const typename D::T *)x, NULL, (typename D::T *)out, outer, dim, inner, 1,
          p1.chunk_len, p1.jtiles, p1.tx_log, p1.ty_log, dim);
      MX_CUDA_LAUNCHED(d, err, "reduce_kernel");
      return MX_OK;
    }
    /* Two passes through a temporary of partials (outer, chunks, inner). */
    A *tmp = NULL;
    MX_CUDA_TRY(d, err, cudaMallocAsync((void **)&tmp, outer * p1.chunks * inner * sizeof(A),
                                        d->stream));
    reduce_kernel<D, D, OP == MX_RMAX ? MX_RMAX : MX_SUM>
        <<<(unsigned)p1.blocks, MX_BLOCK, 0, d->stream>>>(
            (const typename D::T *)x, tmp, NULL, outer, dim, inner, p1.chunks, p1.chunk_len,
            p1.jtiles, p1.tx_log, p1.ty_log, dim);
    int rc = MX_CUDA_LAUNCH_RC(d, err, "reduce_kernel partials");
    if (rc == MX_OK) {
      const reduce_plan p2 = plan_reduce(outer, p1.chunks, inner, false);
      reduce_kernel<D, mx_t_acc<A>, OP><<<(unsigned)p2.blocks, MX_BLOCK, 0, d->stream>>>(
          tmp, NULL, (typename D::T *)out, outer, p1.chunks, inner, 1, p2.chunk_len,
          p2.jtiles, p2.tx_log, p2.ty_log, dim);
      rc = MX_CUDA_LAUNCH_RC(d, err, "reduce_kernel");
    }
    mx_err ignored;
    int frc = MX_CUDA_CALL(d, rc == MX_OK ? err : &ignored, cudaFreeAsync(tmp, d->stream));
    return rc != MX_OK ? rc : frc;
  }

  template <class D>
  int run() {
    switch (op) {
      case MX_SUM: return launch<D, MX_SUM>();
      case MX_MEAN: return launch<D, MX_MEAN>();
      default: return launch<D, MX_RMAX>();
    }
  }
};

} // namespace

int mx_cuda_reduce(int dev, int op, int dtype, const void *x, void *out, size_t outer,
                   size_t dim, size_t inner, mx_err *err) {
  mx_cuda_dev *d = NULL;
  int rc = mx_cuda_open(dev, err, &d);
  if (rc != MX_OK) return rc;
  if (!mx_dtype_size(dtype))
    return mx_cuda_fail(err, MX_E_ARG, "reduce: unknown dtype %d", dtype);
  if (op != MX_SUM && op != MX_MEAN && op != MX_RMAX)
    return mx_cuda_fail(err, MX_E_ARG, "reduce: unknown op %d", op);
  if ((uint64_t)outer * inner == 0) return MX_OK;
  if (dim == 0) return mx_cuda_fail(err, MX_E_ARG, "reduce: reduced axis of size 0");
  if (!x || !out) return mx_cuda_fail(err, MX_E_ARG, "reduce: NULL pointer");
  reduce_forward fn = {d, op, x, out, outer, dim, inner, err};
  pthread_mutex_lock(&d->mu);
  rc = mx_dispatch_dtype(dtype, fn);
  mx_cuda_unlock(d);
  return rc;
}

/* ------------------------------------------------------------------------ */
/* Permute                                                                   */

/* Output axes after simplification: size and input stride (in elements),
 * axis rank-1 innermost. Passed by value. */
template <class I>
struct permute_params {
  int rank;
  I size[MX_MAX_RANK];
  I stride[MX_MAX_RANK];
};

template <class U, class I>
static __global__ void __launch_bounds__(MX_BLOCK)
    permute_kernel(const U *x, // input, contiguous
                   U *out,     // (size[0], ..., size[rank-1])
                   uint64_t n, permute_params<I> p) {
  for (uint64_t o = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; o < n;
       o += (uint64_t)gridDim.x * blockDim.x) {
    I rem = (I)o, off = 0;
#pragma unroll
    for (int k = MX_MAX_RANK - 1; k >= 0; k--) {
      if (k < p.rank) {
        const I q = rem / p.size[k];
        off += (rem - q * p.size[k]) * p.stride[k];
        rem = q;
      }
    }
    out[o] = x[off];
  }
}

template <class U, class I>
static int permute_launch(mx_cuda_dev *d, const void *x, void *out, uint64_t n, int rank,
                          const uint64_t *size, const uint64_t *stride, mx_err *err) {
  permute_params<I> p;
  p.rank = rank;
  for (int k = 0; k < MX_MAX_RANK; k++) {
    p.size[k] = k < rank ? (I)size[k] : 1;
    p.stride[k] = k < rank ? (I)stride[k] : 0;
  }
  permute_kernel<U, I><<<mx_cuda_grid(d, n), MX_BLOCK, 0, d->stream>>>((const U *)x, (U *)out,
                                                                       n, p);
  MX_CUDA_LAUNCHED(d, err, "permute_kernel");
  return MX_OK;
}

/* The tiled path: axis A is the innermost output axis (input stride sa),
 * axis B the innermost input axis (output stride ob); the other axes are
 * batch axes. A block moves one 32 x 32 tile through shared memory, reading
 * rows along B and writing rows along A, so both sides coalesce. */
struct transpose_params {
  uint64_t na, nb, sa, ob, tiles_a, tiles_b;
  int nbatch;
  uint64_t bsize[MX_MAX_RANK], bin[MX_MAX_RANK], bout[MX_MAX_RANK];
};

template <class U>
static __global__ void __launch_bounds__(MX_BLOCK)
    permute_tiled_kernel(const U *x, // input, contiguous
                         U *out,     // output, contiguous
                         uint64_t tiles, transpose_params p) {
  __shared__ U tile[32][33];
  const unsigned tx = threadIdx.x & 31, ty = threadIdx.x >> 5; /* 32 x 8 threads */
  for (uint64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const uint64_t ta = t % p.tiles_a, rest = t / p.tiles_a;
    const uint64_t tb = rest % p.tiles_b;
    uint64_t bi = rest / p.tiles_b, in0 = 0, out0 = 0;
#pragma unroll
    for (int k = MX_MAX_RANK - 1; k >= 0; k--) {
      if (k < p.nbatch) {
        const uint64_t q = bi / p.bsize[k], c = bi - q * p.bsize[k];
        in0 += c * p.bin[k];
        out0 += c * p.bout[k];
        bi = q;
      }
    }
    const uint64_t a0 = ta * 32, b0 = tb * 32;
    for (unsigned i = ty; i < 32; i += 8) {
      const uint64_t a = a0 + i, b = b0 + tx;
      if (a < p.na && b < p.nb) tile[i][tx] = x[in0 + a * p.sa + b];
    }
    __syncthreads();
    for (unsigned i = ty; i < 32; i += 8) {
      const uint64_t b = b0 + i, a = a0 + tx;
      if (a < p.na && b < p.nb) out[out0 + b * p.ob + a] = tile[tx][i];
    }
    __syncthreads();
  }
}

/* Simplified axes (size, input stride), output order, output contiguous. */
template <class U>
static int permute_forward(mx_cuda_dev *d, const void *x, void *out, uint64_t n, int rank,
                           const uint64_t *size, const uint64_t *stride, mx_err *err) {
  int q = rank - 1; /* the output axis that is innermost in the input */
  while (q >= 0 && stride[q] != 1) q--;
  if (q >= 0 && q < rank - 1 && size[q] >= 16 && size[rank - 1] >= 16) {
    transpose_params p;
    uint64_t ostride[MX_MAX_RANK], batches = 1;
    ostride[rank - 1] = 1;
    for (int k = rank - 2; k >= 0; k--) ostride[k] = ostride[k + 1] * size[k + 1];
    p.na = size[rank - 1];
    p.sa = stride[rank - 1];
    p.nb = size[q];
    p.ob = ostride[q];
    p.tiles_a = (p.na + 31) / 32;
    p.tiles_b = (p.nb + 31) / 32;
    p.nbatch = 0;
    for (int k = 0; k < MX_MAX_RANK; k++) {
      p.bsize[k] = 1;
      p.bin[k] = p.bout[k] = 0;
    }
    for (int k = 0; k < rank - 1; k++) {
      if (k == q) continue;
      p.bsize[p.nbatch] = size[k];
      p.bin[p.nbatch] = stride[k];
      p.bout[p.nbatch] = ostride[k];
      p.nbatch++;
      batches *= size[k];
    }
    const uint64_t tiles = batches * p.tiles_a * p.tiles_b;
    const unsigned grid = tiles < MX_MAX_GRID ? (unsigned)tiles : MX_MAX_GRID;
    permute_tiled_kernel<U><<<grid, MX_BLOCK, 0, d->stream>>>((const U *)x, (U *)out, tiles, p);
    MX_CUDA_LAUNCHED(d, err, "permute_tiled_kernel");
    return MX_OK;
  }
  if (n <= UINT32_MAX)
    return permute_launch<U, uint32_t>(d, x, out, n, rank, size, stride, err);
  return permute_launch<U, uint64_t>(d, x, out, n, rank, size, stride, err);
}

int mx_cuda_permute(int dev, size_t elsize, const void *x, void *out, int rank,
                    const int64_t *x_shape, const int *perm, mx_err *err) {
  mx_cuda_dev *d = NULL;
  int rc = mx_cuda_open(dev, err, &d);
  if (rc != MX_OK) return rc;
  if (elsize != 1 && elsize != 2 && elsize != 4 && elsize != 8)
    return mx_cuda_fail(err, MX_E_ARG, "permute: element size %zu", elsize);
  if (rank < 0 || rank > MX_MAX_RANK)
    return mx_cuda_fail(err, MX_E_ARG, "permute: rank %d", rank);
  if (rank > 0 && (!x_shape || !perm))
    return mx_cuda_fail(err, MX_E_ARG, "permute: NULL shape or permutation");

  /* Input strides and the permutation check. */
  uint64_t xstride[MX_MAX_RANK], n = 1;
  int seen = 0;
  for (int i = rank - 1; i >= 0; i--) {
    if (x_shape[i] < 0) return mx_cuda_fail(err, MX_E_ARG, "permute: negative axis size");
    xstride[i] = n;
    n *= (uint64_t)x_shape[i];
    if (perm[i] < 0 || perm[i] >= rank || (seen & (1 << perm[i])))
      return mx_cuda_fail(err, MX_E_ARG, "permute: not a permutation");
    seen |= 1 << perm[i];
  }
  if (n == 0) return MX_OK;
  if (!x || !out) return mx_cuda_fail(err, MX_E_ARG, "permute: NULL pointer");

  /* Output axes without size-1 axes, merged where adjacent in the input. */
  uint64_t size[MX_MAX_RANK], stride[MX_MAX_RANK];
  int r = 0;
  for (int k = 0; k < rank; k++) {
    const uint64_t s = (uint64_t)x_shape[perm[k]], st = xstride[perm[k]];
    if (s == 1) continue;
    if (r > 0 && stride[r - 1] == s * st) {
      size[r - 1] *= s;
      stride[r - 1] = st;
    } else {
      size[r] = s;
      stride[r] = st;
      r++;
    }
  }

  if (r == 0 || (r == 1 && stride[0] == 1)) { /* the identity: a plain copy */
    pthread_mutex_lock(&d->mu);
    rc = MX_CUDA_CALL(d, err, cudaMemcpyAsync(out, x, n * elsize, cudaMemcpyDeviceToDevice,
                                              d->stream));
    mx_cuda_unlock(d);
    return rc;
  }

  /* Widen the element when the innermost output axis is contiguous in x:
   * every other stride is then a multiple of its length. */
  uint64_t w = elsize;
  if (stride[r - 1] == 1) {
    const uint64_t run_bytes = size[r - 1] * elsize;
    const uintptr_t align = (uintptr_t)x | (uintptr_t)out;
    for (uint64_t cand = 16; cand > elsize; cand >>= 1) {
      if (run_bytes % cand == 0 && (align & (cand - 1)) == 0) {
        w = cand;
        break;
      }
    }
    if (w != elsize) {
      const uint64_t f = w / elsize;
      size[r - 1] /= f;
      for (int k = 0; k < r - 1; k++) stride[k] /= f;
      n /= f;
    }
  }

  pthread_mutex_lock(&d->mu);
  switch (w) {
    case 1: rc = permute_forward<uint8_t>(d, x, out, n, r, size, stride, err); break;
    case 2: rc = permute_forward<uint16_t>(d, x, out, n, r, size, stride, err); break;
    case 4: rc = permute_forward<uint32_t>(d, x, out, n, r, size, stride, err); break;
    case 8: rc = permute_forward<uint64_t>(d, x, out, n, r, size, stride, err); break;
    default: rc = permute_forward<uint4>(d, x, out, n, r, size, stride, err); break;
  }
  mx_cuda_unlock(d);
  return rc;
}

/*
 * gemm_tf32.cu: a TF32 tensor-core GEMM for the linear forward's large
 * shapes, on Hopper's warpgroup MMA (wgmma, sm_90a). linear.cu sends it
 *   C (m, n) = alpha * A (m, k) . W (k, n) + bias (n)      (row-major, beta 0)
 * when gemm_tf32_applies() says so, and cuBLASLt everything else.
 *
 * Why a kernel of our own: for f32 inputs wgmma reads its shared-memory
 * operands only K-major (k contiguous). A's rows are; W (k, n) is not, so
 * cuBLASLt runs this layout on a slower path (bench/results/
 * linear_cublaslt_sweep_06086ae.txt). Computed transposed instead:
 *   C^T (n x m) = W^T (n x k) . A^T (k x m)
 * wgmma's M dimension runs over output columns n (64 per warpgroup), its N
 * over rows of A (GT_ROWS per tile), its K over k.
 *   - W^T is the REGISTER operand (any layout can be loaded into registers):
 *     each warpgroup loads its 64 columns of W once, k x 64, rounded to
 *     tf32, as wgmma A fragments (k / 2 registers a thread), and keeps them
 *     for every tile it computes.
 *   - A^T is the SHARED-MEMORY operand, K-major as required: tiles of
 *     GT_ROWS rows of A are brought by the bulk tensor copy engine (TMA)
 *     into a GT_STAGES-deep ring in the 128-byte-swizzle layout: per block
 *     of 32 k values a box of GT_ROWS rows x 128 bytes (8 KB), 16-byte
 *     chunk c of row r at chunk position c ^ (r & 7); rows past m arrive as
 *     zeros. Each wgmma step (8 k) starts 32 bytes further into the box;
 *     8-row groups are 1024 bytes apart (the descriptor's stride offset).
 *
 * Block: a producer warpgroup (one lane issues the copies) and two
 * consumer warpgroups that own 128 output columns [n0, n0 + 128);
 * `per_slice` blocks share a column slice and take its row tiles j, j +
 * per_slice, j + 2 per_slice, ... Stages are handed over by mbarriers (see
 * the kernel), never by a block-wide barrier. Per tile a consumer
 * warpgroup waits for the stage, runs one wgmma per 8 k (in order,
 * accumulating in fp32 registers), waits for them, releases the stage,
 * applies alpha and the bias, writes its 64 x 64 results into its own
 * staging area (transposed back to rows of C, in the same 128-byte
 * swizzle: no bank conflicts) and hands them to the copy engine as two
 * bulk tensor stores; meanwhile the other warpgroup's wgmmas keep the
 * tensor cores busy.
 *
 * Versions (PERFORMANCE.md, linear v3 and v4): 16-byte stores issued by
 * the consumers (which nvcc had split into 4-byte stores) cost k = 256
 * its lead over cuBLASLt; 8-byte W loads, conflict-free 8-byte staging
 * stores and the bulk stores took 15360 x 256 x 1024 from 46.7 to 35.4
 * us. Thread-block clusters that multicast each A tile to the blocks of
 * neighbouring column slices (A read from L2 once per cluster) measured
 * slower (2 blocks: +25 %, 4: +60 %): the blocks of a cluster wait for
 * each other's consumers before every refill.
 *
 * Numerics: W rounded to tf32 (round to nearest, ties away), A's low 13
 * mantissa bits ignored by the tensor cores (as cuBLAS's TF32 does), fp32
 * accumulation in a fixed order: bit-identical from run to run, for any
 * grid. Requirements (gemm_tf32_applies): f32, TF32 precision, no
 * transposes, beta 0, k in {64, 128, 256}, n a multiple of 128, A and C
 * 16-byte aligned with lda and ldc multiples of 4 (bias too when given), W
 * 8-byte aligned with an even ldb, enough rows to fill the machine; a
 * device of compute capability 9.0 and a build for sm_90 (the Makefile
 * compiles this file for sm_90a and defines MX_WGMMA; otherwise it is never
 * chosen).
 */
#include <stdint.h>

#include <cuda.h> /* CUtensorMap (types only: the encoder comes from the runtime's driver entry point) */
#include <cudaTypedefs.h>

#include "cuda_ops.h"

#define GT_ROWS 64     /* rows of A per tile: wgmma's N */
#define GT_COLS 128    /* output columns per block: 2 warpgroups x 64 */
#ifndef GT_STAGES
#define GT_STAGES 3    /* tiles of A in flight */
#endif
/* Probe builds only (bench/cuda/gemm_tf32_probe.cu): GT_ABLATE 1 skips the
 * stores, 2 skips the wgmmas, to see which part bounds the time. */
#ifndef GT_ABLATE
#define GT_ABLATE 0
#endif
#define GT_THREADS 384 /* two consumer warpgroups + a producer warpgroup */
/* Descriptor offsets of the swizzled layout: 8-row groups 1024 bytes apart
 * (stride); the leading offset is not used by K-major swizzled layouts. */
#define GT_LBO 16u
#define GT_SBO 1024u
#define GT_STAGING (GT_ROWS * 64 * 4) /* bytes of one warpgroup's staging */

#if defined(MX_WGMMA)

__device__ __forceinline__ uint32_t gt_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

/* Shared-memory matrix descriptor, 128-byte swizzle (layout type 1 in bits
 * 62-63): start address, leading and stride byte offsets, in 16-byte
 * units. */
__device__ __forceinline__ uint64_t gt_desc(uint32_t addr) {
  return (uint64_t)((addr & 0x3FFFFu) >> 4) | ((uint64_t)((GT_LBO >> 4) & 0x3FFFu) << 16) |
         ((uint64_t)((GT_SBO >> 4) & 0x3FFFu) << 32) | ((uint64_t)1 << 62);
}

/* d (64 x 64 fp32 fragment) = [d +] a (64 x 8 tf32, registers) . B (8 x 64, desc) */
__device__ __forceinline__ void gt_wgmma(float *d, uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint64_t desc, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32, %33, %34, %35}, %36, p, 1, 1;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(accumulate));
}

/* Wait for this warpgroup's wgmmas; the accumulators are operands so that
 * no use of them moves above the wait. */
__device__ __forceinline__ void gt_wgmma_wait(float *d) {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) :: "memory");
}

/* mbarriers (shared::cta, 8 bytes each) and the bulk tensor copy. */
__device__ __forceinline__ void gt_mbar_init(uint32_t bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void gt_mbar_expect(uint32_t bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void gt_mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

/* Wait until the phase with the given parity has completed. */
__device__ __forceinline__ void gt_mbar_wait(uint32_t bar, unsigned parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "GT_WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra GT_WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

/* Box (32 k, GT_ROWS rows) of A at (k0, row0) into `dst`, 128-byte
 * swizzled, completing on `bar`. Rows past m arrive as zeros. */
__device__ __forceinline__ void gt_tma_load(uint32_t dst, const CUtensorMap *map, int k0, int row0,
                                            uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"((uint64_t)map), "r"(k0), "r"(row0), "r"(bar)
      : "memory");
}

/* Box (32 columns, GT_ROWS rows) of C at (col0, row0) from `src`
 * (128-byte swizzled like the loads), by the copy engine; rows past m are
 * not written. Completes into this thread's bulk group. */
__device__ __forceinline__ void gt_tma_store(const CUtensorMap *map, int col0, int row0,
                                             uint32_t src) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"(
                   (uint64_t)map),
               "r"(col0), "r"(row0), "r"(src)
               : "memory");
}

/* KS = k / 8 wgmma steps per tile. Warps 0-7: two consumer warpgroups
 * (232 registers a thread: the W fragments alone take k / 2); warps 8-11:
 * the producer warpgroup (40 registers; one lane issues the bulk copies).
 * Stage s has a "full" barrier (the producer's expect_tx, completed by the
 * copy's bytes) and an "empty" one (one arrival per consumer warpgroup
 * once its wgmmas on the stage are done); use u of a stage waits full
 * parity u & 1, and its refill waits empty parity (u - 1) & 1. No
 * block-wide barrier after the set-up, so one warpgroup's epilogue
 * overlaps the other's wgmmas.
 *
 * Epilogue of a tile (per warpgroup): alpha and the bias are applied in
 * registers, the 64 x 64 results are written to the warpgroup's staging
 * area as two 64-row x 32-column boxes in the 128-byte-swizzle layout, and
 * one thread hands both to the copy engine (bulk tensor stores): the
 * warpgroup goes back to its next tile's wgmmas without issuing the
 * 16 KB of global stores itself. Before the staging is rewritten, that
 * thread waits until the engine has read the previous boxes. */
template <int KS>
__global__ void __launch_bounds__(GT_THREADS, 1)
    gemm_tf32_kernel(const __grid_constant__ CUtensorMap amap,
                     const __grid_constant__ CUtensorMap cmap, const float *__restrict__ w,
                     int64_t ldb, const float *__restrict__ bias, float alpha, int tiles,
                     int per_slice) {
  constexpr int KB = KS / 4;                       /* 32-k blocks of a row */
  constexpr uint32_t BOX = GT_ROWS * 128;          /* bytes of one box (32 k x GT_ROWS) */
  constexpr uint32_t STAGE = KB * BOX;             /* bytes of a stage */
  extern __shared__ __align__(1024) unsigned char gt_smem[];
  /* the swizzle pattern repeats every 1024 bytes: align the ring to it */
  const uint32_t raw = (uint32_t)__cvta_generic_to_shared(gt_smem);
  const uint32_t smem = (raw + 1023u) & ~1023u;
  unsigned char *const smem_ptr = gt_smem + (smem - raw);
  const uint32_t bars = smem + GT_STAGES * STAGE + 2 * GT_STAGING; /* full[S], empty[S] */
  const int slice = blockIdx.x / per_slice, j = blockIdx.x % per_slice;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

  if (tid == 0) {
    for (int s = 0; s < GT_STAGES; s++) {
      gt_mbar_init(bars + 8 * s, 1);
      gt_mbar_init(bars + 8 * (GT_STAGES + s), 2);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warp >= 8) { /* the producer warpgroup: one lane works, few registers */
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (warp == 8 && lane == 0) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"((uint64_t)&amap) : "memory");
      for (int it = 0;; it++) {
        const int tile = j + it * per_slice;
        if (tile >= tiles) break;
        const int s = it % GT_STAGES, use = it / GT_STAGES;
        if (use > 0) gt_mbar_wait(bars + 8 * (GT_STAGES + s), (unsigned)(use - 1) & 1u);
        gt_mbar_expect(bars + 8 * s, STAGE);
#pragma unroll
        for (int kb = 0; kb < KB; kb++)
          gt_tma_load(smem + s * STAGE + kb * BOX, &amap, kb * 32, tile * GT_ROWS, bars + 8 * s);
      }
    }
    return;
  }
  /* consumers: 2 x 128 x 232 + 128 x 40 registers fit the 64 K of an SM */
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");

  const int wg = tid >> 7, q = warp & 3, g = lane >> 2, t = lane & 3, wtid = tid & 127;
  const int nb = slice * GT_COLS + wg * 64; /* this warpgroup's first column */
  /* this warpgroup's staging: two boxes of 64 rows x 32 columns (8 KB
   * each), 16-byte chunk c of row r at chunk position c ^ (r & 7) */
  const uint32_t stg_addr = smem + GT_STAGES * STAGE + wg * GT_STAGING;
  float *const stg = (float *)(smem_ptr + GT_STAGES * STAGE + wg * GT_STAGING);
  if (wtid == 0) asm volatile("prefetch.tensormap [%0];\n" ::"l"((uint64_t)&cmap) : "memory");

  /* W^T fragments of the warpgroup's 64 columns. wgmma row 16 q + g (+ 8)
   * of this warpgroup is W column nb + 16 q + 2 g (+ 1): any assignment of
   * columns to rows works if the epilogue follows it, and this one puts a
   * thread's two columns side by side (one 8-byte load, and one 8-byte
   * staging store). Step s holds k = 8 s + t (+ 4). */
  uint32_t wf[4 * KS];
  {
    const float *w0 = w + (int64_t)t * ldb + nb + 16 * q + 2 * g;
#pragma unroll
    for (int s = 0; s < KS; s++) {
      const float *p = w0 + (int64_t)(8 * s) * ldb;
      const float2 lo = __ldg((const float2 *)p), hi = __ldg((const float2 *)(p + 4 * ldb));
      wf[4 * s + 0] = gt_tf32(lo.x);
      wf[4 * s + 1] = gt_tf32(lo.y);
      wf[4 * s + 2] = gt_tf32(hi.x);
      wf[4 * s + 3] = gt_tf32(hi.y);
    }
  }
  /* the bias of this thread's two columns */
  float2 bias2 = make_float2(0.0f, 0.0f);
  if (bias) bias2 = __ldg((const float2 *)(bias + nb + 16 * q + 2 * g));
  /* staging offsets (floats) of this thread's pairs: column n = 16 q + 2 g
   * is in box n >> 5, chunk (n >> 2) & 7, at n & 3 within it */
  const int n = 16 * q + 2 * g;
  const int box_off = (n >> 5) * (GT_ROWS * 32), chunk = (n >> 2) & 7, within = n & 3;

  float d[32];
  for (int it = 0;; it++) {
    const int tile = j + it * per_slice;
    if (tile >= tiles) break;
    const int s = it % GT_STAGES;
    const uint32_t stage = smem + (uint32_t)s * STAGE;
    gt_mbar_wait(bars + 8 * s, (unsigned)(it / GT_STAGES) & 1u);
    if (GT_ABLATE != 2) {
      asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
      for (int k = 0; k < KS; k++)
        gt_wgmma(d, wf[4 * k], wf[4 * k + 1], wf[4 * k + 2], wf[4 * k + 3],
                 gt_desc(stage + (uint32_t)((k >> 2) * BOX + (k & 3) * 32)), k > 0);
      asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
      gt_wgmma_wait(d);
    } else {
#pragma unroll
      for (int i = 0; i < 32; i++) d[i] = __uint_as_float(wf[i] ^ wf[4 * KS - 1 - i]);
    }
    if (wtid == 0) gt_mbar_arrive(bars + 8 * (GT_STAGES + s)); /* the stage may be refilled */
    /* the copy engine is done reading the previous tile's staging */
    if (wtid == 0) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory");
    /* d[i] is C^T (wgmma row 16 q + g + 8 ((i >> 1) & 1), tile row
     * 8 (i >> 2) + 2 t + (i & 1)): C row r, columns n (even i & 2) and
     * n + 1, staged together as one 8-byte store; each half-warp's stores
     * hit distinct banks. */
#pragma unroll
    for (int i = 0; i < 32; i += 4) {
#pragma unroll
      for (int e = 0; e < 2; e++) {
        const int r = 8 * (i >> 2) + 2 * t + e;
        float2 o;
        o.x = __fadd_rn(__fmul_rn(alpha, d[i + e]), bias2.x);
        o.y = __fadd_rn(__fmul_rn(alpha, d[i + 2 + e]), bias2.y);
        *(float2 *)(stg + box_off + r * 32 + ((chunk ^ (r & 7)) << 2) + within) = o;
      }
    }
    /* the generic-proxy writes become visible to the copy engine */
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory");
    if (wtid == 0 && GT_ABLATE != 1) {
      gt_tma_store(&cmap, nb, tile * GT_ROWS, stg_addr);
      gt_tma_store(&cmap, nb + 32, tile * GT_ROWS, stg_addr + GT_ROWS * 128);
      asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
    }
  }
  /* the last stores have read the staging before the block's shared
   * memory goes away (they complete to global memory on their own) */
  if (wtid == 0) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}

/* The driver's tensor-map encoder, looked up once through the runtime. */
static PFN_cuTensorMapEncodeTiled_v12000 gt_encoder(void) {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = NULL;
  static int looked = 0;
  if (!looked) {
    void *p = NULL;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault,
                                         &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      fn = (PFN_cuTensorMapEncodeTiled_v12000)p;
    looked = 1;
  }
  return fn;
}

/* Blocks sharing one 128-column slice: the grid fills the SMs once. */
static int64_t gt_per_slice(int64_t n, int sm_count) {
  const int64_t per_slice = sm_count / (n / GT_COLS);
  return per_slice < 1 ? 1 : per_slice;
}

/* A 2-D tensor map of a row-major f32 matrix (rows x cols, row stride ld
 * floats) with boxes of 32 columns x GT_ROWS rows, 128-byte swizzled. */
static int gt_map(CUtensorMap *map, PFN_cuTensorMapEncodeTiled_v12000 encode, const void *base,
                  int64_t rows, int64_t cols, int64_t ld) {
  const cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
  const cuuint64_t strides[1] = {(cuuint64_t)ld * 4};
  const cuuint32_t box[2] = {32, GT_ROWS};
  const cuuint32_t estrides[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 2, (void *)base, dims, strides, box, estrides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <int KS>
static cudaError_t gt_launch(const mx_gemm_args *g, cudaStream_t stream, int dev, int sm_count) {
  /* the ring, two staging areas, the barriers, and room to align to 1024 */
  const size_t smem = (size_t)GT_STAGES * GT_ROWS * KS * 8 * 4 + 2 * GT_STAGING +
                      16 * GT_STAGES + 1024;
  /* the shared-memory limit is raised once per device (callers hold the
   * device's mutex) */
  static int attr_set[MX_MAX_CUDA_DEVICES];
  if (!attr_set[dev]) {
    cudaError_t e = cudaFuncSetAttribute(gemm_tf32_kernel<KS>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
    attr_set[dev] = 1;
  }
  PFN_cuTensorMapEncodeTiled_v12000 encode = gt_encoder();
  if (!encode) return cudaErrorNotSupported;
  CUtensorMap amap, cmap;
  if (!gt_map(&amap, encode, g->a, g->m, g->k, g->lda) ||
      !gt_map(&cmap, encode, g->c, g->m, g->n, g->ldc))
    return cudaErrorInvalidValue;
  const int slices = (int)(g->n / GT_COLS);
  const int tiles = (int)((g->m + GT_ROWS - 1) / GT_ROWS);
  int per_slice = (int)gt_per_slice(g->n, sm_count);
  if (per_slice > tiles) per_slice = tiles;
  gemm_tf32_kernel<KS><<<slices * per_slice, GT_THREADS, smem, stream>>>(
      amap, cmap, (const float *)g->b, g->ldb, (const float *)g->bias, (float)g->alpha, tiles,
      per_slice);
  return cudaGetLastError();
}

int gemm_tf32_applies(const mx_gemm_args *g, int cc_major, int cc_minor, int sm_count) {
  if (cc_major != 9 || cc_minor != 0 || sm_count < 1) return 0;
  if (g->dtype != MX_F32 || g->precision != MX_PREC_TF32 || g->trans_a || g->trans_b) return 0;
  /* k = 64, 128, 256: W stays in registers (k / 2 a thread), so larger k
   * would not fit; measured 17 to 40 % faster than cuBLASLt at 15360 rows
   * (bench/results/gemm_tf32_probe_*.txt) */
  if (g->beta != 0.0 || !(g->k == 64 || g->k == 128 || g->k == 256)) return 0;
  if (g->n < GT_COLS || g->n % GT_COLS != 0 || g->n > ((int64_t)1 << 24)) return 0;
  if (((uintptr_t)g->a & 15u) != 0 || g->lda % 4 != 0) return 0;
  if (((uintptr_t)g->c & 15u) != 0 || g->ldc % 4 != 0) return 0;
  if (((uintptr_t)g->b & 7u) != 0 || g->ldb % 2 != 0) return 0; /* 8-byte loads of W */
  if (g->bias && ((uintptr_t)g->bias & 15u) != 0) return 0;
  if (g->m > ((int64_t)1 << 30)) return 0; /* tiles fit an int */
  /* Enough rows that every block of the grid gets at least 4 tiles: below
   * that the W fragments' load is not amortised (and cuBLASLt is fine). */
  return g->m >= gt_per_slice(g->n, sm_count) * 4 * GT_ROWS;
}

cudaError_t gemm_tf32_launch(const mx_gemm_args *g, cudaStream_t stream, int dev, int sm_count) {
  if (dev < 0 || dev >= MX_MAX_CUDA_DEVICES) return cudaErrorInvalidDevice;
  switch (g->k) {
  case 64: return gt_launch<8>(g, stream, dev, sm_count);
  case 128: return gt_launch<16>(g, stream, dev, sm_count);
  case 256: return gt_launch<32>(g, stream, dev, sm_count);
  default: return cudaErrorInvalidValue;
  }
}

#else /* built without sm_90a: never chosen */

int gemm_tf32_applies(const mx_gemm_args *g, int cc_major, int cc_minor, int sm_count) {
  (void)g;
  (void)cc_major;
  (void)cc_minor;
  (void)sm_count;
  return 0;
}

cudaError_t gemm_tf32_launch(const mx_gemm_args *g, cudaStream_t stream, int dev, int sm_count) {
  (void)g;
  (void)stream;
  (void)dev;
  (void)sm_count;
  return cudaErrorInvalidDeviceFunction;
}

#endif

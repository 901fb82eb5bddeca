/*
 * linear.cu: the CUDA backend's GEMM (mx_gemm_args, backend.h) through
 * cuBLASLt, and sum_rows (column sums: the bias gradient) as a
 * deterministic two-stage reduction. Types: f32, and bf16 (A, B, C and bias
 * all bf16; fp32 compute and scaling). f64 is refused (MX_E_ARG).
 *
 * ---- GEMM --------------------------------------------------------------------
 *
 * Large f32 TF32 GEMMs of the linear forward's layout (no transposes, beta
 * 0, k in {64, 128, 256}, n a multiple of 128) on an sm_90 device run our
 * own wgmma kernel (gemm_tf32.cu: cuBLASLt has no fast kernel for W (k, n)
 * in TF32); everything else goes to cuBLASLt as follows.
 *
 * Row-major C (m, n) is, read column-major, C^T (n, m) with the same leading
 * dimension, and C^T = op(B)^T op(A)^T. So cuBLASLt is asked for
 *   D (n x m, ld ldc) = alpha * opB'(Bm) * opA'(Am) + beta * C + bias
 * where its "A" is our B, read column-major as (n x k, ld ldb) (no
 * transpose) or, with trans_b, (k x n, ld ldb) transposed; its "B" is our A,
 * (k x m, ld lda), or with trans_a (m x k, ld lda) transposed. The bias of
 * every row-major row (length n) is then one value per row of the
 * column-major D: cuBLASLt's BIAS epilogue, so the linear forward is one
 * kernel. C and D are the same buffer (in place); with beta == 0 cuBLASLt
 * does not read C.
 *
 * Compute type: CUBLAS_COMPUTE_32F (plain fp32 FMAs for f32) for
 * MX_PREC_FP32, CUBLAS_COMPUTE_32F_FAST_TF32 (TF32 tensor cores) for f32 with
 * MX_PREC_TF32; bf16 always uses CUBLAS_COMPUTE_32F (bf16 tensor cores, fp32
 * accumulation). alpha and beta are host floats.
 *
 * Plans: the matmul descriptor, the three layouts and the algorithm the
 * heuristic ranks first are cached per device and per key (dtype, precision,
 * transposes, m, n, k, leading dimensions, bias or not, and the alignment
 * of A, B and C, which decides which kernels are legal), up to LT_PLANS
 * entries, least recently used replaced. The heuristic is asked once per key
 * with the device's workspace size and those alignments, and its first
 * algorithm is kept, except that large TF32 GEMMs take a later candidate
 * with the tile measured fastest for their layout when the list has one
 * (prefer_tile, a fixed rule, no timing): for one key the same algorithm
 * always runs. Every
 * split-K reduction scheme of cuBLASLt is ordered (through the workspace,
 * or in place with counters that keep the parts in sequence), so results
 * are bit-identical from run to run (cuBLAS's guarantee for a fixed
 * algorithm on one GPU). Plans, the handle and the workspace are used only
 * under the device mutex (cuda_runtime_state.h).
 *
 * Every cublasStatus_t goes through MX_CUBLAS_CALL, which names the call and
 * the site; a CUDA error left behind by a failed launch is reported (and a
 * sticky one marks the device lost) through mx_cuda_check.
 *
 * k == 0 (C = beta C + bias) and the empty cases run a small kernel or
 * nothing; cuBLASLt only sees m, n, k >= 1.
 *
 * ---- sum_rows: out (cols) = [out +] sum over rows of x (rows, cols) ----------
 *
 * Pass 1: blocks of 32 x 8 threads; a block owns 32 x V consecutive
 * columns (V = 4 when rows are whole 16-byte f32 / 8-byte bf16 vectors, so
 * a warp reads 512 / 256 contiguous bytes of a row; else V = 1) and one
 * split of the rows; thread (tx, ty) adds rows ty, ty + 8, ... of the split
 * in order, in fp32 (loads of eight rows in flight at a time), then lane
 * ty = 0 adds the 8 partial sums in order. With one split the
 * result goes to out; otherwise to a stream-ordered fp32 scratch (splits,
 * cols), and pass 2 reduces that scratch with the same kernel (one split:
 * lanes over splits ty, ty + 8, ..., then the lanes in order) into out,
 * adding out when accumulating.
 * The split count depends on (rows, cols) and the device's SM count only,
 * so results are bit-identical from run to run. No atomics.
 */
#include <stdio.h>
#include <string.h>

#include <cublasLt.h>

#include "cuda_dtypes.cuh"
#include "cuda_ops.h"
#include "cuda_runtime_state.h"

#define LT_PLANS 32
#define LT_HEURISTICS 8

/* ---- errors ------------------------------------------------------------------- */

static int mx_cublas_check(cublasStatus_t s, mx_cuda_dev *d, mx_err *err, const char *call,
                           const char *file, int line) {
  if (s == CUBLAS_STATUS_SUCCESS) return MX_OK;
  /* A failed kernel launch inside cuBLAS leaves a CUDA error: report that one
   * (mx_cuda_check marks the device lost when it is sticky). */
  cudaError_t ce = cudaGetLastError();
  if (ce != cudaSuccess) return mx_cuda_check(ce, d->index, err, call, file, line);
  int kind = s == CUBLAS_STATUS_ALLOC_FAILED ? MX_E_OOM : MX_E_RUNTIME;
  const char *base = strrchr(file, '/');
  base = base ? base + 1 : file;
  return mx_cuda_fail(err, kind, "%.*s: %s (%s:%d)", (int)strcspn(call, "("), call,
                      cublasLtGetStatusString(s), base, line);
}

/* `rc = MX_CUBLAS_CALL(d, err, cublasLtFoo(...))`: 0 or the mx_errkind. */
#define MX_CUBLAS_CALL(d, err, call) mx_cublas_check((call), (d), (err), #call, __FILE__, __LINE__)

#define MX_CUBLAS_TRY(d, err, call)                                          \
  do {                                                                       \
    int mx_rc_ = mx_cublas_check((call), (d), (err), #call, __FILE__, __LINE__); \
    if (mx_rc_ != MX_OK) return mx_rc_;                                      \
  } while (0)

/* ---- plans ----------------------------------------------------------------------- */

typedef struct {
  int32_t dtype, precision, trans_a, trans_b, has_bias;
  int32_t align_a, align_b, align_c;
  int64_t m, n, k, lda, ldb, ldc;
} lt_key;

typedef struct {
  int used;
  uint64_t stamp;
  lt_key key;
  cublasLtMatmulDesc_t op;
  cublasLtMatrixLayout_t la, lb, lc; /* cuBLASLt's A (our B), B (our A), C = D */
  cublasLtMatmulAlgo_t algo;
} lt_plan;

typedef struct {
  uint64_t clock;
  lt_plan plans[LT_PLANS];
} lt_cache;

/* The largest power of two (<= 256) dividing the address. */
static int32_t ptr_align(const void *p) {
  uintptr_t u = (uintptr_t)p;
  int32_t a = 1;
  while (a < 256 && (u & (uintptr_t)a) == 0) a <<= 1;
  return a;
}

static void plan_release(lt_plan *p) {
  if (p->op) cublasLtMatmulDescDestroy(p->op);
  if (p->la) cublasLtMatrixLayoutDestroy(p->la);
  if (p->lb) cublasLtMatrixLayoutDestroy(p->lb);
  if (p->lc) cublasLtMatrixLayoutDestroy(p->lc);
  memset(p, 0, sizeof *p);
}

/* Handle, workspace and cache of the device. Under d->mu. */
static int lt_ready(mx_cuda_dev *d, mx_err *err) {
  if (!d->lt_handle) {
    cublasLtHandle_t h = NULL;
    MX_CUBLAS_TRY(d, err, cublasLtCreate(&h));
    d->lt_handle = (void *)h;
  }
  if (!d->lt_workspace) {
    void *ws = NULL;
    MX_CUDA_TRY(d, err, cudaMallocAsync(&ws, MX_LT_WORKSPACE_BYTES, d->stream));
    d->lt_workspace = ws;
  }
  if (!d->lt_plans) {
    lt_cache *c = (lt_cache *)calloc(1, sizeof(lt_cache));
    if (!c) return mx_cuda_fail(err, MX_E_OOM, "gemm: out of host memory for the plan cache");
    d->lt_plans = c;
  }
  return MX_OK;
}

static int algo_attr(const cublasLtMatmulAlgo_t *a, cublasLtMatmulAlgoConfigAttributes_t attr) {
  int32_t v = -1;
  size_t written = 0;
  if (cublasLtMatmulAlgoConfigGetAttribute(a, attr, &v, sizeof v, &written) !=
          CUBLAS_STATUS_SUCCESS ||
      written != sizeof v)
    return -1;
  return v;
}

/* The candidate to keep among the heuristic's results res[0 .. found), given
 * `first`, the first usable one. Large TF32 GEMMs (m n k >= 2^31) take,
 * when there is one, the first later candidate of the same algorithm with no
 * split-K and the tile that was fastest for their layout on the H200
 * (bench/results/linear_cublaslt_sweep_*.txt, cuBLASLt 13.1: the heuristic
 * ranks 128x128 first for the forward's layout, our B not transposed, which
 * ran 43.3 us at x {15360, 256} w {256, 1024}, 256x64 41.2 us; for the dx
 * layout, B transposed, it ranks 256x64 first, 33.5 us, 128x128 30.9 us;
 * the outputs had the same bits either way). A fixed rule over the
 * heuristic's (deterministic) list: every process picks the same algorithm
 * for a key. */
static int prefer_tile(const lt_key *k, const cublasLtMatmulHeuristicResult_t *res, int found,
                       int first) {
  if (k->dtype != MX_F32 || k->precision != MX_PREC_TF32) return first;
  if ((double)k->m * (double)k->n * (double)k->k < 2147483648.0) return first;
  const int want_tile = k->trans_b ? CUBLASLT_MATMUL_TILE_128x128 : CUBLASLT_MATMUL_TILE_256x64;
  const int algo_id = algo_attr(&res[first].algo, CUBLASLT_ALGO_CONFIG_ID);
  if (algo_id < 0 || algo_attr(&res[first].algo, CUBLASLT_ALGO_CONFIG_TILE_ID) == want_tile)
    return first;
  for (int i = first + 1; i < found; i++) {
    if (res[i].state != CUBLAS_STATUS_SUCCESS || res[i].workspaceSize > MX_LT_WORKSPACE_BYTES)
      continue;
    const cublasLtMatmulAlgo_t *a = &res[i].algo;
    if (algo_attr(a, CUBLASLT_ALGO_CONFIG_ID) == algo_id &&
        algo_attr(a, CUBLASLT_ALGO_CONFIG_TILE_ID) == want_tile &&
        algo_attr(a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM) == 1)
      return i;
  }
  return first;
}

/* Build plan p for key k (p is empty). On failure p is left empty. */
static int plan_build(mx_cuda_dev *d, const lt_key *k, lt_plan *p, mx_err *err) {
  const cudaDataType_t dt = k->dtype == MX_F32 ? CUDA_R_32F : CUDA_R_16BF;
  const cublasComputeType_t ct = k->dtype == MX_F32 && k->precision == MX_PREC_TF32
                                     ? CUBLAS_COMPUTE_32F_FAST_TF32
                                     : CUBLAS_COMPUTE_32F;
  const cublasOperation_t op_a = k->trans_b ? CUBLAS_OP_T : CUBLAS_OP_N; /* Lt's A = our B */
  const cublasOperation_t op_b = k->trans_a ? CUBLAS_OP_T : CUBLAS_OP_N; /* Lt's B = our A */
  cublasLtMatmulPreference_t pref = NULL;
  int rc = MX_OK;
  p->key = *k;
#define PLAN_STEP(call)                                    \
  do {                                                     \
    if (rc == MX_OK) rc = MX_CUBLAS_CALL(d, err, call);    \
  } while (0)
  PLAN_STEP(cublasLtMatmulDescCreate(&p->op, ct, CUDA_R_32F));
  PLAN_STEP(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a,
                                           sizeof op_a));
  PLAN_STEP(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b,
                                           sizeof op_b));
  if (k->has_bias) {
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    PLAN_STEP(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi,
                                             sizeof epi));
    PLAN_STEP(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &dt,
                                             sizeof dt));
  }
  /* Lt's A: our B read column-major: (n, k) or, with trans_b, (k, n). */
  PLAN_STEP(cublasLtMatrixLayoutCreate(&p->la, dt, k->trans_b ? k->k : k->n,
                                       k->trans_b ? k->n : k->k, k->ldb));
  /* Lt's B: our A read column-major: (k, m) or, with trans_a, (m, k). */
  PLAN_STEP(cublasLtMatrixLayoutCreate(&p->lb, dt, k->trans_a ? k->m : k->k,
                                       k->trans_a ? k->k : k->m, k->lda));
  PLAN_STEP(cublasLtMatrixLayoutCreate(&p->lc, dt, k->n, k->m, k->ldc));

  PLAN_STEP(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = MX_LT_WORKSPACE_BYTES;
  PLAN_STEP(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                 &ws, sizeof ws));
  const uint32_t al[3] = {(uint32_t)k->align_b, (uint32_t)k->align_a, (uint32_t)k->align_c};
  PLAN_STEP(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al[0], sizeof al[0]));
  PLAN_STEP(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al[1], sizeof al[1]));
  PLAN_STEP(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al[2], sizeof al[2]));
  PLAN_STEP(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al[2], sizeof al[2]));

  cublasLtMatmulHeuristicResult_t res[LT_HEURISTICS];
  int found = 0;
  memset(res, 0, sizeof res);
  PLAN_STEP(cublasLtMatmulAlgoGetHeuristic((cublasLtHandle_t)d->lt_handle, p->op, p->la, p->lb,
                                           p->lc, p->lc, pref, LT_HEURISTICS, res, &found));
#undef PLAN_STEP
  if (pref) cublasLtMatmulPreferenceDestroy(pref);
  if (rc == MX_OK) {
    int pick = -1;
    for (int i = 0; i < found && pick < 0; i++)
      if (res[i].state == CUBLAS_STATUS_SUCCESS && res[i].workspaceSize <= MX_LT_WORKSPACE_BYTES)
        pick = i;
    if (pick >= 0) pick = prefer_tile(k, res, found, pick);
    if (pick < 0)
      rc = mx_cuda_fail(err, MX_E_RUNTIME,
                        "gemm: cuBLASLt has no algorithm for m=%lld n=%lld k=%lld (%s%s)",
                        (long long)k->m, (long long)k->n, (long long)k->k,
                        k->dtype == MX_F32 ? "f32" : "bf16", k->has_bias ? ", bias" : "");
    else
      p->algo = res[pick].algo;
  }
  if (rc != MX_OK) {
    plan_release(p);
    return rc;
  }
  p->used = 1;
  return MX_OK;
}

/* The plan for key k: cached, or built into the least recently used slot. */
static int plan_get(mx_cuda_dev *d, const lt_key *k, lt_plan **out, mx_err *err) {
  lt_cache *c = (lt_cache *)d->lt_plans;
  lt_plan *victim = &c->plans[0];
  for (int i = 0; i < LT_PLANS; i++) {
    lt_plan *p = &c->plans[i];
    if (p->used && memcmp(&p->key, k, sizeof *k) == 0) {
      p->stamp = ++c->clock;
      *out = p;
      return MX_OK;
    }
    if (!p->used) {
      if (victim->used) victim = p;
    } else if (victim->used && p->stamp < victim->stamp) {
      victim = p;
    }
  }
  if (victim->used) plan_release(victim);
  int rc = plan_build(d, k, victim, err);
  if (rc != MX_OK) return rc;
  victim->stamp = ++c->clock;
  *out = victim;
  return MX_OK;
}

/* ---- k == 0: C = beta C + bias ---------------------------------------------- */

template <class Tag>
static __global__ void gemm_scale_kernel(typename Tag::T *c, int64_t ldc, int64_t m, int64_t n,
                                         float beta, int beta_zero,
                                         const typename Tag::T *bias) {
  const int64_t total = m * n;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / n, j = i - r * n;
    typename Tag::T *p = c + r * ldc + j;
    float v = beta_zero ? 0.0f : __fmul_rn(beta, Tag::load(*p));
    if (bias) v = __fadd_rn(v, Tag::load(bias[j]));
    *p = Tag::store(v);
  }
}

static int gemm_check(const mx_gemm_args *g, mx_err *err) {
  if (!g) return mx_cuda_fail(err, MX_E_ARG, "gemm: no arguments");
  if (g->dtype != MX_F32 && g->dtype != MX_BF16)
    return mx_cuda_fail(err, MX_E_ARG, "gemm: the CUDA backend takes f32 or bf16");
  if (g->precision != MX_PREC_FP32 && g->precision != MX_PREC_TF32)
    return mx_cuda_fail(err, MX_E_ARG, "gemm: unknown precision %d", g->precision);
  if (g->m < 0 || g->n < 0 || g->k < 0)
    return mx_cuda_fail(err, MX_E_ARG, "gemm: negative sizes");
  if (g->ldc < g->n || g->lda < (g->trans_a ? g->m : g->k) ||
      g->ldb < (g->trans_b ? g->k : g->n))
    return mx_cuda_fail(err, MX_E_ARG, "gemm: a leading dimension is below its row length");
  if (g->m > 0 && g->n > 0 && (!g->c || (g->k > 0 && (!g->a || !g->b))))
    return mx_cuda_fail(err, MX_E_ARG, "gemm: NULL operand");
  return MX_OK;
}

int mx_cuda_gemm(int dev, const mx_gemm_args *g, mx_err *err) {
  int rc = gemm_check(g, err);
  if (rc != MX_OK) return rc;
  mx_cuda_dev *d = NULL;
  rc = mx_cuda_begin(dev, err, &d);
  if (rc != MX_OK) return rc;
  if (g->m == 0 || g->n == 0) {
    mx_cuda_unlock(d);
    return MX_OK;
  }
  if (g->k == 0) {
    const float beta = (float)g->beta;
    const int beta_zero = g->beta == 0.0;
    const unsigned grid = mx_cuda_grid(d, (uint64_t)g->m * (uint64_t)g->n);
    if (g->dtype == MX_F32)
      gemm_scale_kernel<mx_t_f32><<<grid, MX_BLOCK, 0, d->stream>>>(
          (float *)g->c, g->ldc, g->m, g->n, beta, beta_zero, (const float *)g->bias);
    else
      gemm_scale_kernel<mx_t_bf16><<<grid, MX_BLOCK, 0, d->stream>>>(
          (uint16_t *)g->c, g->ldc, g->m, g->n, beta, beta_zero, (const uint16_t *)g->bias);
    rc = MX_CUDA_LAUNCH_RC(d, err, "gemm_scale_kernel");
    mx_cuda_unlock(d);
    return rc;
  }
  if (gemm_tf32_applies(g, d->cc_major, d->cc_minor, d->sm_count)) {
    rc = MX_CUDA_CALL(d, err, gemm_tf32_launch(g, d->stream, d->index, d->sm_count));
    mx_cuda_unlock(d);
    return rc;
  }
  rc = lt_ready(d, err);
  lt_key key;
  memset(&key, 0, sizeof key); /* the padding takes part in memcmp */
  key.dtype = g->dtype;
  key.precision = g->dtype == MX_F32 ? g->precision : MX_PREC_FP32;
  key.trans_a = g->trans_a ? 1 : 0;
  key.trans_b = g->trans_b ? 1 : 0;
  key.has_bias = g->bias != NULL;
  key.align_a = ptr_align(g->a);
  key.align_b = ptr_align(g->b);
  key.align_c = ptr_align(g->c);
  key.m = g->m;
  key.n = g->n;
  key.k = g->k;
  key.lda = g->lda;
  key.ldb = g->ldb;
  key.ldc = g->ldc;
  lt_plan *p = NULL;
  if (rc == MX_OK) rc = plan_get(d, &key, &p, err);
  if (rc == MX_OK && g->bias)
    rc = MX_CUBLAS_CALL(d, err, cublasLtMatmulDescSetAttribute(
                                    p->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g->bias,
                                    sizeof g->bias));
  if (rc == MX_OK) {
    const float alpha = (float)g->alpha, beta = (float)g->beta;
    rc = MX_CUBLAS_CALL(d, err, cublasLtMatmul((cublasLtHandle_t)d->lt_handle, p->op, &alpha,
                                               g->b, p->la, g->a, p->lb, &beta, g->c, p->lc,
                                               g->c, p->lc, &p->algo, d->lt_workspace,
                                               MX_LT_WORKSPACE_BYTES, d->stream));
  }
  mx_cuda_unlock(d);
  return rc;
}

/* ---- sum_rows ------------------------------------------------------------------- */

#define SR_TX 32
#define SR_TY 8
#define SR_BATCH 8

/* V consecutive values of a row as floats: one 16-byte (f32) or 8-byte
 * (bf16) load when V = 4. */
template <class Tag, int V>
struct sr_load {
  static __device__ __forceinline__ void run(const typename Tag::T *p, float *v) {
#pragma unroll
    for (int i = 0; i < V; i++) v[i] = Tag::load(p[i]);
  }
};

template <>
struct sr_load<mx_t_f32, 4> {
  static __device__ __forceinline__ void run(const float *p, float *v) {
    const float4 q = __ldg((const float4 *)p);
    v[0] = q.x;
    v[1] = q.y;
    v[2] = q.z;
    v[3] = q.w;
  }
};

template <>
struct sr_load<mx_t_bf16, 4> {
  static __device__ __forceinline__ void run(const uint16_t *p, float *v) {
    const uint2 q = __ldg((const uint2 *)p);
    v[0] = mx_t_bf16::load((uint16_t)(q.x & 0xffffu));
    v[1] = mx_t_bf16::load((uint16_t)(q.x >> 16));
    v[2] = mx_t_bf16::load((uint16_t)(q.y & 0xffffu));
    v[3] = mx_t_bf16::load((uint16_t)(q.y >> 16));
  }
};

/* Column sums of one split of rows of x (rows, cols), In-typed, for
 * SR_TX * V columns (thread tx owns V consecutive columns; V = 4 needs
 * cols % 4 == 0 and an aligned x). Lane ty adds rows r0 + ty, r0 + ty +
 * SR_TY, ... in order, SR_BATCH rows' loads in flight at a time; the SR_TY lane
 * sums are then added in order, and written to out[split, col] (Out-typed;
 * added to what is there when `accumulate`). Pass 1 runs it over x with one
 * split per blockIdx.y; pass 2 over the fp32 partials (splits, cols) with a
 * single split. */
template <class In, class Out, int V>
static __global__ void sum_rows_kernel(const typename In::T *__restrict__ x, int64_t rows,
                                       int64_t cols, int64_t rows_per_split,
                                       typename Out::T *out, int accumulate) {
  __shared__ float acc[SR_TY][SR_TX * V + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col0 = ((int64_t)blockIdx.x * SR_TX + tx) * V;
  const int64_t r0 = (int64_t)blockIdx.y * rows_per_split;
  const int64_t r1 = r0 + rows_per_split < rows ? r0 + rows_per_split : rows;
  float s[V];
#pragma unroll
  for (int v = 0; v < V; v++) s[v] = 0.0f;
  if (col0 < cols) {
    const typename In::T *p = x + col0;
    /* SR_BATCH rows a step, their loads issued together; rows past the
     * split read as 0, and s + 0 = s exactly (s starts at +0). */
    for (int64_t r = r0 + ty; r < r1; r += SR_BATCH * SR_TY) {
      float a[SR_BATCH][V];
#pragma unroll
      for (int b = 0; b < SR_BATCH; b++) {
        if (r + b * SR_TY < r1) {
          sr_load<In, V>::run(p + (r + b * SR_TY) * cols, a[b]);
        } else {
#pragma unroll
          for (int v = 0; v < V; v++) a[b][v] = 0.0f;
        }
      }
#pragma unroll
      for (int b = 0; b < SR_BATCH; b++)
#pragma unroll
        for (int v = 0; v < V; v++) s[v] = __fadd_rn(s[v], a[b][v]);
    }
  }
#pragma unroll
  for (int v = 0; v < V; v++) acc[ty][tx * V + v] = s[v];
  __syncthreads();
  if (ty == 0 && col0 < cols) {
    typename Out::T *o = out + (int64_t)blockIdx.y * cols;
#pragma unroll
    for (int v = 0; v < V; v++) {
      const int64_t col = col0 + v;
      if (V > 1 && col >= cols) break;
      float t = acc[0][tx * V + v];
#pragma unroll
      for (int i = 1; i < SR_TY; i++) t = __fadd_rn(t, acc[i][tx * V + v]);
      o[col] = Out::store(accumulate ? __fadd_rn(Out::load(o[col]), t) : t);
    }
  }
}

template <class In, class Out>
static int sum_rows_launch(mx_cuda_dev *d, bool vec4, const typename In::T *x, int64_t rows,
                           int64_t cols, int64_t splits, int64_t per, typename Out::T *out,
                           int accumulate, mx_err *err) {
  const int64_t tiles = (cols + SR_TX * (vec4 ? 4 : 1) - 1) / (SR_TX * (vec4 ? 4 : 1));
  if (tiles > 0x7fffffff) return mx_cuda_fail(err, MX_E_ARG, "sum_rows: too many columns");
  const dim3 block(SR_TX, SR_TY), grid((unsigned)tiles, (unsigned)splits);
  if (vec4)
    sum_rows_kernel<In, Out, 4><<<grid, block, 0, d->stream>>>(x, rows, cols, per, out,
                                                               accumulate);
  else
    sum_rows_kernel<In, Out, 1><<<grid, block, 0, d->stream>>>(x, rows, cols, per, out,
                                                               accumulate);
  return MX_CUDA_LAUNCH_RC(d, err, "sum_rows_kernel");
}

/* Zero (or leave) out when there are no rows. */
template <class Tag>
static __global__ void sum_rows_zero(typename Tag::T *out, int64_t cols) {
  for (int64_t col = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; col < cols;
       col += (int64_t)gridDim.x * blockDim.x)
    out[col] = Tag::store(0.0f);
}

template <class Tag>
static int sum_rows_run(mx_cuda_dev *d, const void *xv, int64_t rows, int64_t cols, void *outv,
                        int accumulate, mx_err *err) {
  typedef typename Tag::T T;
  const T *x = (const T *)xv;
  T *out = (T *)outv;
  if (rows == 0) {
    if (accumulate) return MX_OK;
    sum_rows_zero<Tag><<<mx_cuda_grid(d, (uint64_t)cols), MX_BLOCK, 0, d->stream>>>(out, cols);
    return MX_CUDA_LAUNCH_RC(d, err, "sum_rows_zero");
  }
  /* Four columns a thread when rows are whole 16 / 8-byte vectors. */
  const bool vec4 = cols % 4 == 0 && (uintptr_t)x % (4 * sizeof(T)) == 0;
  const int64_t tiles = (cols + SR_TX * (vec4 ? 4 : 1) - 1) / (SR_TX * (vec4 ? 4 : 1));
  /* About 8 blocks per SM in all; each split keeps >= 64 rows (8 per lane). */
  const int64_t want = (int64_t)d->sm_count * 8;
  int64_t splits = (want + tiles - 1) / tiles;
  const int64_t max_splits = (rows + 63) / 64;
  if (splits > max_splits) splits = max_splits;
  if (splits > 65535) splits = 65535;
  if (splits < 1) splits = 1;
  const int64_t per = (rows + splits - 1) / splits;
  splits = (rows + per - 1) / per;
  if (splits == 1)
    return sum_rows_launch<Tag, Tag>(d, vec4, x, rows, cols, 1, per, out, accumulate, err);
  float *part = NULL;
  MX_CUDA_TRY(d, err, cudaMallocAsync((void **)&part, (size_t)splits * (size_t)cols * sizeof(float),
                                      d->stream));
  int rc = sum_rows_launch<Tag, mx_t_f32>(d, vec4, x, rows, cols, splits, per, part, 0, err);
  if (rc == MX_OK)
    rc = sum_rows_launch<mx_t_f32, Tag>(d, cols % 4 == 0, part, splits, cols, 1, splits, out,
                                        accumulate, err);
  mx_err ignored;
  int frc = MX_CUDA_CALL(d, rc == MX_OK ? err : &ignored, cudaFreeAsync(part, d->stream));
  return rc != MX_OK ? rc : frc;
}

int mx_cuda_sum_rows(int dev, int dtype, const void *x, int64_t rows, int64_t cols, void *out,
                     int accumulate, mx_err *err) {
  if (dtype != MX_F32 && dtype != MX_BF16)
    return mx_cuda_fail(err, MX_E_ARG, "sum_rows: the CUDA backend takes f32 or bf16");
  if (rows < 0 || cols < 0 || (cols > 0 && !out) || (rows > 0 && cols > 0 && !x))
    return mx_cuda_fail(err, MX_E_ARG, "sum_rows: bad sizes or NULL pointer");
  mx_cuda_dev *d = NULL;
  int rc = mx_cuda_begin(dev, err, &d);
  if (rc != MX_OK) return rc;
  if (cols > 0)
    rc = dtype == MX_F32 ? sum_rows_run<mx_t_f32>(d, x, rows, cols, out, accumulate, err)
                         : sum_rows_run<mx_t_bf16>(d, x, rows, cols, out, accumulate, err);
  mx_cuda_unlock(d);
  return rc;
}

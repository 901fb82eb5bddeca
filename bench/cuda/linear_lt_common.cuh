// linear_lt_common.cuh: the shared set-up of the standalone cuBLASLt tools
// linear_lt_probe.cu and linear_lt_sweep.cu (handles, workspace, timing, an
// f64 check of sampled results, configuration descriptions). Not part of the build.
#pragma once
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>
#include <algorithm>
#include <functional>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("CUDA %s at %d: %s\n", #x, __LINE__, cudaGetErrorString(e_)); exit(1);} } while (0)
#define CB(x) do { cublasStatus_t s_ = (x); if (s_ != CUBLAS_STATUS_SUCCESS) { printf("cuBLAS %s at %d: %d\n", #x, __LINE__, (int)s_); exit(1);} } while (0)

static cudaStream_t S;
static cublasLtHandle_t LT;
static cublasHandle_t BL;
static void *WS;
static const size_t WS_BYTES = (size_t)256 << 20;
static const int RUNS = 60;

// Reference on sampled entries: C[i][j] = sum_l A(i,l) B(l,j) (+ bias[j]) in double.
__global__ void ref_check(const float *A, long sa0, long sa1, const float *B, long sb0, long sb1,
                          const float *bias, const float *C, long ldc, long M, long N, long K,
                          int samples, unsigned seed, double *maxrel) {
  int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= samples) return;
  unsigned h = seed ^ (t * 2654435761u);
  h ^= h >> 13; h *= 0x5bd1e995; h ^= h >> 15;
  long i = h % M;
  h = h * 1103515245u + 12345u; h ^= h >> 11;
  long j = h % N;
  double s = 0, sa = 0;
  for (long l = 0; l < K; l++) { double p = (double)A[i * sa0 + l * sa1] * B[l * sb0 + j * sb1]; s += p; sa += fabs(p); }
  if (bias) { s += bias[j]; sa += fabs(bias[j]); }
  double e = fabs(C[i * ldc + j] - s) / (sa + 1e-30);
  unsigned long long *m = (unsigned long long *)maxrel;
  atomicMax(m, __double_as_longlong(e));  // e >= 0: bit order = value order
}

__global__ void transpose_k(const float *__restrict__ in, float *__restrict__ out, int rows, int cols) {
  __shared__ float t[32][33];
  int c = blockIdx.x * 32 + threadIdx.x, r0 = blockIdx.y * 32;
  for (int y = threadIdx.y; y < 32; y += 8) if (r0 + y < rows && c < cols) t[y][threadIdx.x] = in[(long)(r0 + y) * cols + c];
  __syncthreads();
  int oc = r0 + threadIdx.x, orow0 = blockIdx.x * 32;
  for (int y = threadIdx.y; y < 32; y += 8) if (orow0 + y < cols && oc < rows) out[(long)(orow0 + y) * rows + oc] = t[threadIdx.x][y];
}
static void transpose(const float *in, float *out, int rows, int cols) {
  dim3 g((cols + 31) / 32, (rows + 31) / 32), b(32, 8);
  transpose_k<<<g, b, 0, S>>>(in, out, rows, cols);
}

__global__ void count_diff(const unsigned *a, const unsigned *b, long n, unsigned long long *cnt) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
    if (a[i] != b[i]) atomicAdd(cnt, 1ull);
}

static double *d_rel; static unsigned long long *d_cnt;

template <class F> static double median_us(F f, int runs = RUNS) {
  std::vector<cudaEvent_t> ev(2 * runs);
  for (auto &e : ev) CK(cudaEventCreate(&e));
  for (int i = 0; i < 5; i++) f();
  for (int i = 0; i < runs; i++) { CK(cudaEventRecord(ev[2 * i], S)); f(); CK(cudaEventRecord(ev[2 * i + 1], S)); }
  CK(cudaStreamSynchronize(S));
  std::vector<float> t(runs);
  for (int i = 0; i < runs; i++) CK(cudaEventElapsedTime(&t[i], ev[2 * i], ev[2 * i + 1]));
  for (auto &e : ev) cudaEventDestroy(e);
  std::sort(t.begin(), t.end());
  return 1000.0 * t[runs / 2];
}

struct Prob {  // row-major C (M, N) = A (M, K) B (K, N) [+ bias], A(i,l) at i*sa0+l*sa1 etc.
  const float *A; long sa0, sa1; const float *B; long sb0, sb1; const float *bias; float *C; long M, N, K;
};
static double check(const Prob &p) {
  CK(cudaMemsetAsync(d_rel, 0, 8, S));
  ref_check<<<16, 256, 0, S>>>(p.A, p.sa0, p.sa1, p.B, p.sb0, p.sb1, p.bias, p.C, p.N, p.M, p.N, p.K, 4096, 1234u, d_rel);
  double r; CK(cudaMemcpyAsync(&r, d_rel, 8, cudaMemcpyDeviceToHost, S)); CK(cudaStreamSynchronize(S));
  return r;
}


// Lt problem (column-major view): D (n_d x m_d, ld ldd) = op(LA) op(LB) [+ bias per row of D]
struct LtCfg {
  const char *name; cublasComputeType_t ct; cudaDataType_t scale;
  cublasOperation_t ta, tb; long ra, ca, lda_, rb, cb, ldb_, rd, cd, ldd; int order_row; int bias;
  const void *A, *Bm, *biasp; void *D; size_t ws; int req, time_max; Prob ref; float *D2;
};

static void algo_desc(const cublasLtMatmulHeuristicResult_t &r, char *buf) {
  int id = 0, tile = 0, stages = 0, sk = 0, red = 0, swz = 0, cust = 0, cl = 0, inner = 0; size_t w;
  cublasLtMatmulAlgoConfigGetAttribute(&r.algo, CUBLASLT_ALGO_CONFIG_ID, &id, sizeof id, &w);
  cublasLtMatmulAlgoConfigGetAttribute(&r.algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof tile, &w);
  cublasLtMatmulAlgoConfigGetAttribute(&r.algo, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages, sizeof stages, &w);
  cublasLtMatmulAlgoConfigGetAttribute(&r.algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &sk, sizeof sk, &w);
  cublasLtMatmulAlgoConfigGetAttribute(&r.algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &red, sizeof red, &w);
  cublasLtMatmulAlgoConfigGetAttribute(&r.algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, &swz, sizeof swz, &w);
  cublasLtMatmulAlgoConfigGetAttribute(&r.algo, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, &cust, sizeof cust, &w);
  cublasLtMatmulAlgoConfigGetAttribute(&r.algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cl, sizeof cl, &w);
  cublasLtMatmulAlgoConfigGetAttribute(&r.algo, CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID, &inner, sizeof inner, &w);
  sprintf(buf, "algo %d tile %d stages %d splitk %d red %d swz %d cust %d cluster %d inner %d waves %.2f ws %zu",
          id, tile, stages, sk, red, swz, cust, cl, inner, r.wavesCount, r.workspaceSize);
}

// linear_lt_probe.cu: times cuBLASLt / cuBLAS configurations for the Mambex linear shapes
// (standalone; not part of the build). nvcc -O2 -arch=sm_90 linear_lt_probe.cu -lcublasLt -lcublas -o probe
#include "linear_lt_common.cuh"

// Returns the time of the first candidate (or -1).
static double lt_run(const LtCfg &c, std::function<void()> pre = nullptr, const char *pre_name = nullptr) {
  cublasLtMatmulDesc_t op; cublasLtMatrixLayout_t la, lb, ld; cublasLtMatmulPreference_t pref;
  CB(cublasLtMatmulDescCreate(&op, c.ct, c.scale));
  CB(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &c.ta, sizeof c.ta));
  CB(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &c.tb, sizeof c.tb));
  if (c.bias) {
    cublasLtEpilogue_t e = CUBLASLT_EPILOGUE_BIAS; cudaDataType_t dt = CUDA_R_32F;
    CB(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &e, sizeof e));
    CB(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &dt, sizeof dt));
    CB(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &c.biasp, sizeof c.biasp));
  }
  CB(cublasLtMatrixLayoutCreate(&la, CUDA_R_32F, c.ra, c.ca, c.lda_));
  CB(cublasLtMatrixLayoutCreate(&lb, CUDA_R_32F, c.rb, c.cb, c.ldb_));
  CB(cublasLtMatrixLayoutCreate(&ld, CUDA_R_32F, c.rd, c.cd, c.ldd));
  if (c.order_row) {
    cublasLtOrder_t o = CUBLASLT_ORDER_ROW;
    CB(cublasLtMatrixLayoutSetAttribute(la, CUBLASLT_MATRIX_LAYOUT_ORDER, &o, sizeof o));
    CB(cublasLtMatrixLayoutSetAttribute(lb, CUBLASLT_MATRIX_LAYOUT_ORDER, &o, sizeof o));
    CB(cublasLtMatrixLayoutSetAttribute(ld, CUBLASLT_MATRIX_LAYOUT_ORDER, &o, sizeof o));
  }
  CB(cublasLtMatmulPreferenceCreate(&pref));
  uint64_t ws = c.ws;
  CB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
  uint32_t al = 256;
  CB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al, 4));
  CB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al, 4));
  CB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al, 4));
  CB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al, 4));
  std::vector<cublasLtMatmulHeuristicResult_t> res(c.req);
  int found = 0;
  cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(LT, op, la, lb, ld, ld, pref, c.req, res.data(), &found);
  printf("== %s: heuristic %d, %d found (ws %zu)\n", c.name, (int)hs, found, c.ws);
  double first = -1;
  float alpha = 1, beta = 0;
  for (int i = 0; i < found && i < c.time_max; i++) {
    if (res[i].state != CUBLAS_STATUS_SUCCESS) continue;
    auto f = [&]() {
      if (pre) pre();
      cublasStatus_t s = cublasLtMatmul(LT, op, &alpha, c.A, la, c.Bm, lb, &beta, c.D, ld, c.D, ld, &res[i].algo, WS, WS_BYTES, S);
      if (s != CUBLAS_STATUS_SUCCESS) { printf("matmul failed %d\n", (int)s); exit(1); }
    };
    CK(cudaMemsetAsync(c.D, 0xff, c.rd * c.cd * 4, S));
    double t = median_us(f);
    double rel = check(c.ref);
    // bit identity: rerun into D2 by copying
    CK(cudaMemcpyAsync(c.D2, c.D, c.rd * c.cd * 4, cudaMemcpyDeviceToDevice, S));
    CK(cudaMemsetAsync(c.D, 0xff, c.rd * c.cd * 4, S));
    f();
    CK(cudaMemsetAsync(d_cnt, 0, 8, S));
    count_diff<<<1024, 256, 0, S>>>((unsigned *)c.D, (unsigned *)c.D2, c.rd * c.cd, d_cnt);
    unsigned long long nd; CK(cudaMemcpyAsync(&nd, d_cnt, 8, cudaMemcpyDeviceToHost, S)); CK(cudaStreamSynchronize(S));
    char buf[256]; algo_desc(res[i], buf);
    printf("  #%2d %8.2f us  rel %.1e diff %llu  %s%s%s\n", i, t, rel, nd, buf, pre_name ? "  +" : "", pre_name ? pre_name : "");
    if (first < 0) first = t;
  }
  fflush(stdout);
  cublasLtMatmulPreferenceDestroy(pref); cublasLtMatrixLayoutDestroy(la); cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(ld); cublasLtMatmulDescDestroy(op);
  return first;
}

static float *dev_rand(long n, unsigned seed) {
  std::vector<float> h(n); unsigned s = seed;
  for (long i = 0; i < n; i++) { s = s * 1664525u + 1013904223u; h[i] = ((s >> 8) / 16777216.0f) * 2 - 1; }
  float *d; CK(cudaMalloc(&d, n * 4)); CK(cudaMemcpy(d, h.data(), n * 4, cudaMemcpyHostToDevice)); return d;
}

int main() {
  CK(cudaStreamCreate(&S)); CB(cublasLtCreate(&LT)); CB(cublasCreate(&BL)); CB(cublasSetStream(BL, S));
  CK(cudaMalloc(&WS, WS_BYTES)); CB(cublasSetWorkspace(BL, WS, WS_BYTES));
  CK(cudaMalloc(&d_rel, 8)); CK(cudaMalloc(&d_cnt, 8));
  cudaDeviceProp pr; CK(cudaGetDeviceProperties(&pr, 0));
  printf("device %s, %d SMs, cuBLASLt %zu, runtime %d\n", pr.name, pr.multiProcessorCount, cublasLtGetVersion(), CUDART_VERSION);
  const long M = 15360, N = 1024, K = 256;
  float *X = dev_rand(M * K, 1), *W = dev_rand(K * N, 2), *b = dev_rand(N, 3), *dY = dev_rand(M * N, 4);
  float *Wt, *Y, *Y2, *dX, *dW;
  CK(cudaMalloc(&Wt, K * N * 4)); CK(cudaMalloc(&Y, M * N * 4)); CK(cudaMalloc(&Y2, M * N * 4));
  CK(cudaMalloc(&dX, M * K * 4)); CK(cudaMalloc(&dW, K * N * 4));
  transpose(W, Wt, K, N); CK(cudaStreamSynchronize(S));
  printf("transpose W (256x1024) alone: %.2f us\n", median_us([&]() { transpose(W, Wt, K, N); }));

  const cublasComputeType_t TF = CUBLAS_COMPUTE_32F_FAST_TF32, F32 = CUBLAS_COMPUTE_32F;
  const cublasOperation_t NO = CUBLAS_OP_N, TR = CUBLAS_OP_T;
  const size_t WS32 = (size_t)32 << 20;
  for (int ms = 0; ms < 3; ms++) {
    const long m = ms == 0 ? M : ms == 1 ? 1920 : 60;
    const int tmax = ms == 0 ? 32 : 3;
    Prob ref = {X, K, 1, W, N, 1, b, Y, m, N, K};
    Prob refnb = {X, K, 1, W, N, 1, nullptr, Y, m, N, K};
    char n1[96], n2[96], n3[96], n4[96];
    sprintf(n1, "fwd NN tf32 bias m%ld", m); sprintf(n2, "fwd TN tf32 bias m%ld (Wt given)", m);
    sprintf(n3, "fwd NN tf32 nobias m%ld", m); sprintf(n4, "fwd TN tf32 nobias m%ld", m);
    // NN: Lt A = W col-major (N x K, ld N), Lt B = X col-major (K x m, ld K)
    lt_run({n1, TF, CUDA_R_32F, NO, NO, N, K, N, K, m, K, N, m, N, 0, 1, W, X, b, Y, WS32, 32, tmax, ref, Y2});
    // TN: Lt A = Wt stored (K x N col-major, ld K), op T
    lt_run({n2, TF, CUDA_R_32F, TR, NO, K, N, K, K, m, K, N, m, N, 0, 1, Wt, X, b, Y, WS32, 32, tmax, ref, Y2});
    lt_run({n2, TF, CUDA_R_32F, TR, NO, K, N, K, K, m, K, N, m, N, 0, 1, Wt, X, b, Y, WS32, 32, 2, ref, Y2},
           [&]() { transpose(W, Wt, K, N); }, "transpose");
    if (ms == 0) {
      lt_run({n3, TF, CUDA_R_32F, NO, NO, N, K, N, K, m, K, N, m, N, 0, 0, W, X, nullptr, Y, WS32, 32, 8, refnb, Y2});
      lt_run({n4, TF, CUDA_R_32F, TR, NO, K, N, K, K, m, K, N, m, N, 0, 0, Wt, X, nullptr, Y, WS32, 32, 8, refnb, Y2});
      lt_run({"fwd NN tf32 bias ws0", TF, CUDA_R_32F, NO, NO, N, K, N, K, m, K, N, m, N, 0, 1, W, X, b, Y, 0, 32, 4, ref, Y2});
      lt_run({"fwd NN tf32 bias ws256M", TF, CUDA_R_32F, NO, NO, N, K, N, K, m, K, N, m, N, 0, 1, W, X, b, Y, WS_BYTES, 32, 4, ref, Y2});
      // row order: D (m x N) = X (m x K) W (K x N), all row-major, no bias
      lt_run({"fwd ROW tf32 nobias", TF, CUDA_R_32F, NO, NO, m, K, K, K, N, N, m, N, N, 1, 0, X, W, nullptr, Y, WS32, 32, 8, refnb, Y2});
      // fp32
      lt_run({"fwd NN fp32 bias", F32, CUDA_R_32F, NO, NO, N, K, N, K, m, K, N, m, N, 0, 1, W, X, b, Y, WS32, 32, 8, ref, Y2});
      lt_run({"fwd TN fp32 bias (Wt given)", F32, CUDA_R_32F, TR, NO, K, N, K, K, m, K, N, m, N, 0, 1, Wt, X, b, Y, WS32, 32, 8, ref, Y2});
      // legacy cuBLAS, no bias
      float a1 = 1, b0 = 0;
      CK(cudaMemsetAsync(Y, 0xff, m * N * 4, S));
      double t1 = median_us([&]() { CB(cublasGemmEx(BL, NO, NO, N, m, K, &a1, W, CUDA_R_32F, N, X, CUDA_R_32F, K, &b0, Y, CUDA_R_32F, N, TF, CUBLAS_GEMM_DEFAULT_TENSOR_OP)); });
      printf("legacy cublasGemmEx NN FAST_TF32 nobias: %.2f us rel %.1e\n", t1, check(refnb));
      double t2 = median_us([&]() { CB(cublasGemmEx(BL, TR, NO, N, m, K, &a1, Wt, CUDA_R_32F, K, X, CUDA_R_32F, K, &b0, Y, CUDA_R_32F, N, TF, CUBLAS_GEMM_DEFAULT_TENSOR_OP)); });
      printf("legacy cublasGemmEx TN FAST_TF32 nobias: %.2f us rel %.1e\n", t2, check(refnb));
      CB(cublasSetMathMode(BL, CUBLAS_TF32_TENSOR_OP_MATH));
      double t3 = median_us([&]() { CB(cublasSgemm(BL, NO, NO, N, m, K, &a1, W, N, X, K, &b0, Y, N)); });
      printf("legacy cublasSgemm NN TF32_TENSOR_OP_MATH nobias: %.2f us rel %.1e\n", t3, check(refnb));
      double t4 = median_us([&]() { CB(cublasSgemm(BL, TR, NO, N, m, K, &a1, Wt, K, X, K, &b0, Y, N)); });
      printf("legacy cublasSgemm TN TF32_TENSOR_OP_MATH nobias: %.2f us rel %.1e\n", t4, check(refnb));
      CB(cublasSetMathMode(BL, CUBLAS_DEFAULT_MATH));
      // memset floor: writing 63 MB
      printf("cudaMemsetAsync Y (63 MB): %.2f us\n", median_us([&]() { CK(cudaMemsetAsync(Y, 0, m * N * 4, S)); }));
      fflush(stdout);
    }
  }
  // backward shapes (the NIF's gemm args): dx (M,K) = dY (M,N) W^T: Lt A = W stored (N x K col-major ld N) op T, Lt B = dY (N x M ld N) op N
  {
    Prob r = {dY, N, 1, W, 1, N, nullptr, dX, M, K, N};
    lt_run({"dx TN tf32", TF, CUDA_R_32F, TR, NO, N, K, N, N, M, N, K, M, K, 0, 0, W, dY, nullptr, dX, WS32, 32, 16, r, (float *)Y2});
    lt_run({"dx TN fp32", F32, CUDA_R_32F, TR, NO, N, K, N, N, M, N, K, M, K, 0, 0, W, dY, nullptr, dX, WS32, 32, 4, r, (float *)Y2});
  }
  // dW (K,N) = X^T dY: Lt A = dY (N x M col-major ld N) op N, Lt B = X stored (K x M ld K) op T; D (N x K ld N)
  {
    Prob r = {X, 1, K, dY, N, 1, nullptr, dW, K, N, M};
    lt_run({"dW NT tf32", TF, CUDA_R_32F, NO, TR, N, M, N, K, M, K, N, K, N, 0, 0, dY, X, nullptr, dW, WS32, 32, 16, r, (float *)Y2});
    lt_run({"dW NT tf32 ws256M", TF, CUDA_R_32F, NO, TR, N, M, N, K, M, K, N, K, N, 0, 0, dY, X, nullptr, dW, WS_BYTES, 32, 8, r, (float *)Y2});
    lt_run({"dW NT fp32", F32, CUDA_R_32F, NO, TR, N, M, N, K, M, K, N, K, N, 0, 0, dY, X, nullptr, dW, WS32, 32, 4, r, (float *)Y2});
  }
  printf("done\n");
  return 0;
}

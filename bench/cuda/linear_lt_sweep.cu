// linear_lt_sweep.cu: sweeps cuBLASLt algorithm configurations for the Mambex linear shapes
// (standalone; not part of the build). nvcc -O2 -arch=sm_90 linear_lt_sweep.cu -lcublasLt -lcublas -o sweep; SWEEP_S=8 ./sweep
#include "linear_lt_common.cuh"


#include <chrono>
struct Cand { double t; cublasLtMatmulAlgo_t algo; size_t ws; float waves; };

static void algo_desc2(const cublasLtMatmulAlgo_t &a, size_t wsz, float waves, char *buf) {
  cublasLtMatmulHeuristicResult_t r; memset(&r, 0, sizeof r); r.algo = a; r.workspaceSize = wsz; r.wavesCount = waves;
  algo_desc(r, buf);
}

// Sweep every algo id / tile / stages / cluster / swizzle / custom option (splitk list), screen with 12 runs,
// re-time the best 10 with 100 runs and a bit-identity check; also print the heuristic's first 8 re-timed alike.
static void sweep(const LtCfg &c, std::vector<int> splits, double budget_s) {
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
  CB(cublasLtMatmulPreferenceCreate(&pref));
  uint64_t ws = c.ws;
  CB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
  float alpha = 1, beta = 0;
  auto timeit = [&](const cublasLtMatmulAlgo_t &a, int runs) {
    return median_us([&]() {
      cublasStatus_t s = cublasLtMatmul(LT, op, &alpha, c.A, la, c.Bm, lb, &beta, c.D, ld, c.D, ld, &a, WS, WS_BYTES, S);
      if (s != CUBLAS_STATUS_SUCCESS) { printf("matmul failed %d\n", (int)s); exit(1); }
    }, runs);
  };
  auto verify = [&](const cublasLtMatmulAlgo_t &a, double *rel, unsigned long long *nd) {
    auto f = [&]() { CB(cublasLtMatmul(LT, op, &alpha, c.A, la, c.Bm, lb, &beta, c.D, ld, c.D, ld, &a, WS, WS_BYTES, S)); };
    CK(cudaMemsetAsync(c.D, 0xff, c.rd * c.cd * 4, S)); f(); *rel = check(c.ref);
    CK(cudaMemcpyAsync(c.D2, c.D, c.rd * c.cd * 4, cudaMemcpyDeviceToDevice, S));
    CK(cudaMemsetAsync(c.D, 0xff, c.rd * c.cd * 4, S)); f();
    CK(cudaMemsetAsync(d_cnt, 0, 8, S));
    count_diff<<<1024, 256, 0, S>>>((unsigned *)c.D, (unsigned *)c.D2, c.rd * c.cd, d_cnt);
    CK(cudaMemcpyAsync(nd, d_cnt, 8, cudaMemcpyDeviceToHost, S)); CK(cudaStreamSynchronize(S));
  };
  printf("== sweep %s\n", c.name);
  cublasLtMatmulHeuristicResult_t hr[8]; int found = 0;
  CB(cublasLtMatmulAlgoGetHeuristic(LT, op, la, lb, ld, ld, pref, 8, hr, &found));
  for (int i = 0; i < found; i++) {
    double rel; unsigned long long nd; verify(hr[i].algo, &rel, &nd);
    char buf[256]; algo_desc(hr[i], buf);
    printf("  heur #%d %8.2f us rel %.1e diff %llu  %s\n", i, timeit(hr[i].algo, 100), rel, nd, buf);
  }
  fflush(stdout);
  int ids[256], nids = 0;
  CB(cublasLtMatmulAlgoGetIds(LT, c.ct, c.scale, CUDA_R_32F, CUDA_R_32F, CUDA_R_32F, CUDA_R_32F, 256, ids, &nids));
  {  // heuristic's algo ids first, in its order
    std::vector<int> order;
    for (int i = 0; i < found; i++) { int id; size_t w; cublasLtMatmulAlgoConfigGetAttribute(&hr[i].algo, CUBLASLT_ALGO_CONFIG_ID, &id, 4, &w); if (std::find(order.begin(), order.end(), id) == order.end()) order.push_back(id); }
    for (int i = 0; i < nids; i++) if (std::find(order.begin(), order.end(), ids[i]) == order.end()) order.push_back(ids[i]);
    for (int i = 0; i < nids; i++) ids[i] = order[i];
  }
  printf("  algo ids:"); for (int i = 0; i < nids; i++) printf(" %d", ids[i]); printf("\n");
  std::vector<Cand> cands;
  auto t0 = std::chrono::steady_clock::now();
  long checked = 0, valid = 0; bool out_of_time = false;
  const int clusters[] = {0, 2, 3, 5, 6, 4, 8};
  for (int ii = 0; ii < nids && !out_of_time; ii++) {
    cublasLtMatmulAlgo_t a; if (cublasLtMatmulAlgoInit(LT, c.ct, c.scale, CUDA_R_32F, CUDA_R_32F, CUDA_R_32F, CUDA_R_32F, ids[ii], &a) != CUBLAS_STATUS_SUCCESS) continue;
    size_t w; int tiles[256], stages[256], ntile = 0, nstage = 0, swz = 0, cmax = 0, sk = 0;
    if (cublasLtMatmulAlgoCapGetAttribute(&a, CUBLASLT_ALGO_CAP_TILE_IDS, tiles, sizeof tiles, &w) == CUBLAS_STATUS_SUCCESS) ntile = (int)(w / 4);
    if (cublasLtMatmulAlgoCapGetAttribute(&a, CUBLASLT_ALGO_CAP_STAGES_IDS, stages, sizeof stages, &w) == CUBLAS_STATUS_SUCCESS) nstage = (int)(w / 4);
    cublasLtMatmulAlgoCapGetAttribute(&a, CUBLASLT_ALGO_CAP_CTA_SWIZZLING_SUPPORT, &swz, sizeof swz, &w);
    cublasLtMatmulAlgoCapGetAttribute(&a, CUBLASLT_ALGO_CAP_CUSTOM_OPTION_MAX, &cmax, sizeof cmax, &w);
    cublasLtMatmulAlgoCapGetAttribute(&a, CUBLASLT_ALGO_CAP_SPLITK_SUPPORT, &sk, sizeof sk, &w);
    if (ntile == 0) { tiles[0] = 0; ntile = 1; }
    if (nstage == 0) { stages[0] = 0; nstage = 1; }
    printf("  algo %d: %d tiles, %d stages, swizzle %d, custom max %d, splitk %d\n", ids[ii], ntile, nstage, swz, cmax, sk);
    fflush(stdout);
    for (int ti = 0; ti < ntile && !out_of_time; ti++)
      for (int si = 0; si < nstage && !out_of_time; si++)
        for (int cl : clusters)
          for (int sw = 0; sw <= (swz ? 1 : 0); sw++)
            for (int co = 0; co <= (cmax < 3 ? cmax : 3); co++)
              for (int spl : splits) {
                if (out_of_time) break;
                if (spl > 1 && !sk) continue;
                cublasLtMatmulAlgo_t b = a;
                cublasLtMatmulAlgoConfigSetAttribute(&b, CUBLASLT_ALGO_CONFIG_TILE_ID, &tiles[ti], 4);
                cublasLtMatmulAlgoConfigSetAttribute(&b, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages[si], 4);
                cublasLtMatmulAlgoConfigSetAttribute(&b, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cl, 4);
                cublasLtMatmulAlgoConfigSetAttribute(&b, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, &sw, 4);
                cublasLtMatmulAlgoConfigSetAttribute(&b, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, &co, 4);
                cublasLtMatmulAlgoConfigSetAttribute(&b, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &spl, 4);
                int red = spl > 1 ? CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE : CUBLASLT_REDUCTION_SCHEME_NONE;
                cublasLtMatmulAlgoConfigSetAttribute(&b, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &red, 4);
                cublasLtMatmulHeuristicResult_t r;
                checked++;
                if ((checked & 255) == 0 && std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > budget_s) { out_of_time = true; break; }
                if (cublasLtMatmulAlgoCheck(LT, op, la, lb, ld, ld, &b, &r) != CUBLAS_STATUS_SUCCESS) continue;
                if (r.workspaceSize > c.ws) continue;
                valid++;
                double t = timeit(b, 12);
                cands.push_back({t, b, r.workspaceSize, r.wavesCount});
                if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > budget_s) { out_of_time = true; break; }
              }
  }
  printf("  checked %ld, valid %ld, timed %zu%s\n", checked, valid, cands.size(), out_of_time ? " (time budget hit)" : "");
  std::sort(cands.begin(), cands.end(), [](const Cand &x, const Cand &y) { return x.t < y.t; });
  for (size_t i = 0; i < cands.size() && i < 12; i++) {
    double rel; unsigned long long nd; verify(cands[i].algo, &rel, &nd);
    double t = timeit(cands[i].algo, 100), t2 = timeit(cands[i].algo, 100);
    char buf[256]; algo_desc2(cands[i].algo, cands[i].ws, cands[i].waves, buf);
    printf("  best %2zu screen %7.2f  %8.2f / %8.2f us rel %.1e diff %llu  %s\n", i, cands[i].t, t, t2, rel, nd, buf);
  }
  fflush(stdout);
  cublasLtMatmulPreferenceDestroy(pref); cublasLtMatrixLayoutDestroy(la); cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(ld); cublasLtMatmulDescDestroy(op);
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
  const long m = M;
  Prob ref = {X, K, 1, W, N, 1, b, Y, m, N, K};
  double B1 = atof(getenv("SWEEP_S") ? getenv("SWEEP_S") : "9");
  sweep({"fwd NN tf32 bias m15360", TF, CUDA_R_32F, NO, NO, N, K, N, K, m, K, N, m, N, 0, 1, W, X, b, Y, WS32, 32, 0, ref, Y2}, {1}, B1 * 1.5);
  sweep({"fwd TN tf32 bias m15360 (Wt given)", TF, CUDA_R_32F, TR, NO, K, N, K, K, m, K, N, m, N, 0, 1, Wt, X, b, Y, WS32, 32, 0, ref, Y2}, {1}, B1);
  {
    Prob r = {dY, N, 1, W, 1, N, nullptr, dX, M, K, N};
    sweep({"dx TN tf32", TF, CUDA_R_32F, TR, NO, N, K, N, N, M, N, K, M, K, 0, 0, W, dY, nullptr, dX, WS32, 32, 0, r, (float *)Y2}, {1, 2}, B1);
  }
  {
    Prob r = {X, 1, K, dY, N, 1, nullptr, dW, K, N, M};
    sweep({"dW NT tf32", TF, CUDA_R_32F, NO, TR, N, M, N, K, M, K, N, K, N, 0, 0, dY, X, nullptr, dW, WS32, 32, 0, r, (float *)Y2}, {1, 4, 8, 16}, B1);
  }
  {
    Prob r1920 = {X, K, 1, W, N, 1, b, Y, 1920, N, K};
    sweep({"fwd NN tf32 bias m1920", TF, CUDA_R_32F, NO, NO, N, K, N, K, 1920, K, N, 1920, N, 0, 1, W, X, b, Y, WS32, 32, 0, r1920, Y2}, {1}, B1 / 3);
  }
  sweep({"fwd NN fp32 bias m15360", F32, CUDA_R_32F, NO, NO, N, K, N, K, m, K, N, m, N, 0, 1, W, X, b, Y, WS32, 32, 0, ref, Y2}, {1}, B1);
  printf("done\n");
  return 0;
}

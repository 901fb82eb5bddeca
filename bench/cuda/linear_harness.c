/*
 * linear_harness.c: times the CUDA backend's gemm (cuBLASLt, linear.cu) at
 * the linear benchmark shapes and checks it, outside the BEAM, through the
 * backend table of a mambex_cuda.so (device events after a spinning kernel,
 * so the events see device time only).
 *
 *   cc -O2 -std=gnu11 -o /tmp/linear_harness bench/cuda/linear_harness.c -ldl -lm
 *   /tmp/linear_harness priv/mambex_cuda.so [runs]
 *
 * Per case: median / p10 / p90 device µs over `runs` (default 100) calls,
 * the largest error of 512 sampled outputs against an f64 host dot product
 * (relative to the sum of |terms|), whether a rerun gives the same bits, and
 * an FNV-1a hash of the output bits: running the harness in two processes
 * (or with two builds) and comparing hashes shows whether the same algorithm
 * ran. Inputs come from the backend's counter-based generator (fixed seeds).
 */
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

static void *dev_rand(size_t n, uint64_t seed) {
  void *d;
  OK(G->alloc(0, n * 4, &d, &E));
  OK(G->random(0, MX_F32, d, n, seed, MX_UNIFORM, -1.0, 1.0, &E));
  return d;
}

static float *host_copy(const void *d, size_t n) {
  float *h = malloc(n * 4);
  OK(G->download(0, h, d, n * 4, &E));
  return h;
}

static uint64_t fnv(const void *p, size_t n) {
  const unsigned char *b = p;
  uint64_t h = 1469598103934665603ULL;
  for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ULL;
  return h;
}

static void gemm_op(void *ctx, int i) {
  (void)i;
  OK(G->gemm(0, ctx, &E));
}

/* C (m, n) = op(A) op(B) [+ bias], row-major, f32; prec MX_PREC_TF32 / FP32. */
static void run_case(const char *name, int prec, int ta, int tb, int64_t m, int64_t n, int64_t k,
                     int bias, int runs) {
  const size_t na = (size_t)m * k, nb = (size_t)k * n, nc = (size_t)m * n;
  void *a = dev_rand(na, 11), *b = dev_rand(nb, 12), *bi = bias ? dev_rand(n, 13) : NULL, *c;
  OK(G->alloc(0, nc * 4, &c, &E));
  mx_gemm_args g = {.dtype = MX_F32, .precision = prec, .trans_a = ta, .trans_b = tb,
                    .m = m, .n = n, .k = k, .a = a, .lda = ta ? m : k, .b = b,
                    .ldb = tb ? k : n, .c = c, .ldc = n, .alpha = 1.0, .beta = 0.0,
                    .bias = bi};
  double *t = malloc(sizeof(double) * runs);
  hx_time(t, runs, 5, 100, gemm_op, &g);
  float *hc = host_copy(c, nc);
  OK(G->fill(0, MX_F32, c, nc, (mx_scalar){NAN, 0}, &E));
  OK(G->gemm(0, &g, &E));
  float *hc2 = host_copy(c, nc);
  const int same = memcmp(hc, hc2, nc * 4) == 0;
  float *ha = host_copy(a, na), *hb = host_copy(b, nb), *hbi = bias ? host_copy(bi, n) : NULL;
  double worst = 0;
  uint64_t s = 12345;
  for (int i = 0; i < 512; i++) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    const int64_t r = (int64_t)((s >> 33) % (uint64_t)m);
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    const int64_t col = (int64_t)((s >> 33) % (uint64_t)n);
    double acc = hbi ? hbi[col] : 0.0, mag = hbi ? fabs(hbi[col]) : 0.0;
    for (int64_t l = 0; l < k; l++) {
      const double x = ta ? ha[l * m + r] : ha[r * k + l];
      const double y = tb ? hb[col * k + l] : hb[l * n + col];
      acc += x * y;
      mag += fabs(x * y);
    }
    const double e = fabs(hc[r * n + col] - acc) / (mag > 0 ? mag : 1);
    if (!(e <= worst)) worst = e;
  }
  printf("%-34s m%-6lld n%-5lld k%-6lld median %8.2f us  p10 %8.2f  p90 %8.2f  err %.1e  "
         "rerun %s  hash %016llx\n",
         name, (long long)m, (long long)n, (long long)k, t[runs / 2], t[runs / 10],
         t[runs - 1 - runs / 10], worst, same ? "same bits" : "DIFFERENT", 
         (unsigned long long)fnv(hc, nc * 4));
  fflush(stdout);
  free(t);
  free(hc);
  free(hc2);
  free(ha);
  free(hb);
  free(hbi);
  G->free_async(0, a);
  G->free_async(0, b);
  if (bi) G->free_async(0, bi);
  G->free_async(0, c);
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s mambex_cuda.so [runs]\n", argv[0]);
    return 2;
  }
  const int runs = argc > 2 ? atoi(argv[2]) : 100;
  G = hx_load(argv[1], RTLD_NOW | RTLD_LOCAL, NULL);
  if (!G || G->device_count(&E) < 1) {
    fprintf(stderr, "no CUDA backend / device\n");
    return 1;
  }
  char dn[128];
  OK(G->device_name(0, dn, sizeof dn, &E));
  printf("# %s, %s, %d runs\n", argv[1], dn, runs);
  run_case("linear fwd tf32 +bias", MX_PREC_TF32, 0, 0, 15360, 1024, 256, 1, runs);
  run_case("linear fwd tf32 no bias", MX_PREC_TF32, 0, 0, 15360, 1024, 256, 0, runs);
  run_case("linear bwd dx tf32 (trans_b)", MX_PREC_TF32, 0, 1, 15360, 256, 1024, 0, runs);
  run_case("linear bwd dW tf32 (trans_a)", MX_PREC_TF32, 1, 0, 256, 1024, 15360, 0, runs);
  run_case("linear fwd tf32 +bias", MX_PREC_TF32, 0, 0, 1920, 1024, 256, 1, runs);
  run_case("linear fwd tf32 +bias", MX_PREC_TF32, 0, 0, 60, 1024, 256, 1, runs);
  run_case("linear fwd fp32 +bias", MX_PREC_FP32, 0, 0, 15360, 1024, 256, 1, runs);
  run_case("linear bwd dx fp32 (trans_b)", MX_PREC_FP32, 0, 1, 15360, 256, 1024, 0, runs);
  run_case("linear bwd dW fp32 (trans_a)", MX_PREC_FP32, 1, 0, 256, 1024, 15360, 0, runs);
  return 0;
}

/* copy_bench.cu: plain cudaMemcpy from pageable and pinned host memory, the
 * baselines for the backend's staged upload/download (selftest prints those).
 *   nvcc -O2 -o copy_bench c_src/cuda/test/copy_bench.cu && ./copy_bench */
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cuda_runtime.h>

static double secs(std::chrono::steady_clock::time_point a) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
}

int main() {
  const size_t n = (size_t)256 << 20;
  char *h = (char *)malloc(n), *p = nullptr;
  void *d = nullptr;
  memset(h, 1, n);
  if (cudaMalloc(&d, n) || cudaMallocHost((void **)&p, n)) return 1;
  memset(p, 1, n);
  cudaMemcpy(d, h, n, cudaMemcpyHostToDevice);
  const char *names[] = {"pageable H2D", "pageable D2H", "pinned H2D", "pinned D2H", "host memcpy"};
  for (int t = 0; t < 5; t++) {
    auto a = std::chrono::steady_clock::now();
    for (int r = 0; r < 3; r++) {
      char *src = t < 2 ? h : p;
      if (t == 4) memcpy(h, p, n);
      else if (t % 2 == 0) cudaMemcpy(d, src, n, cudaMemcpyHostToDevice);
      else cudaMemcpy(src, d, n, cudaMemcpyDeviceToHost);
    }
    double s = secs(a);
    printf("%-14s %6.1f GB/s\n", names[t], 3.0 * n / s / 1e9);
  }
  return 0;
}

/*
 * linear.cu: STUB, to be replaced by the linear family's CUDA kernels.
 */
#include "cuda_ops.h"

int mx_cuda_gemm(int dev, const mx_gemm_args *a, mx_err *err) {
  (void)dev;
  (void)a;
  return mx_cuda_fail(err, MX_E_RUNTIME, "gemm: not implemented on CUDA yet");
}

int mx_cuda_sum_rows(int dev, int dtype, const void *x, int64_t rows, int64_t cols, void *out, int accumulate, mx_err *err) {
  (void)dev;
  (void)dtype;
  (void)x;
  (void)rows;
  (void)cols;
  (void)out;
  (void)accumulate;
  return mx_cuda_fail(err, MX_E_RUNTIME, "sum_rows: not implemented on CUDA yet");
}

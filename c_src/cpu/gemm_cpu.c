/*
 * gemm_cpu.c: STUB, to be replaced by the gemm family's CPU kernels.
 */
#include <stdio.h>

#include "cpu_kernels.h"

int cpu_gemm(int dev, const mx_gemm_args *a, mx_err *err) {
  (void)dev;
  (void)a;
  err->kind = MX_E_RUNTIME;
  snprintf(err->msg, sizeof err->msg, "gemm: not implemented on the CPU yet");
  return MX_E_RUNTIME;
}

int cpu_sum_rows(int dev, int dtype, const void *x, int64_t rows, int64_t cols, void *out, int accumulate, mx_err *err) {
  (void)dev;
  (void)dtype;
  (void)x;
  (void)rows;
  (void)cols;
  (void)out;
  (void)accumulate;
  err->kind = MX_E_RUNTIME;
  snprintf(err->msg, sizeof err->msg, "sum_rows: not implemented on the CPU yet");
  return MX_E_RUNTIME;
}

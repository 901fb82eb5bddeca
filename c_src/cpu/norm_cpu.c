/*
 * norm_cpu.c: STUB, to be replaced by the norm family's CPU kernels.
 */
#include <stdio.h>

#include "cpu_kernels.h"

int cpu_norm_forward(int dev, const mx_norm_args *a, void *y, void *sum, void *mean, void *rstd, mx_err *err) {
  (void)dev;
  (void)a;
  (void)y;
  (void)sum;
  (void)mean;
  (void)rstd;
  err->kind = MX_E_RUNTIME;
  snprintf(err->msg, sizeof err->msg, "norm_forward: not implemented on the CPU yet");
  return MX_E_RUNTIME;
}

int cpu_norm_backward(int dev, const mx_norm_args *a, const void *mean, const void *rstd, const void *dy, const void *dsum, void *dx, void *dweight, void *dbias, int accumulate, mx_err *err) {
  (void)dev;
  (void)a;
  (void)mean;
  (void)rstd;
  (void)dy;
  (void)dsum;
  (void)dx;
  (void)dweight;
  (void)dbias;
  (void)accumulate;
  err->kind = MX_E_RUNTIME;
  snprintf(err->msg, sizeof err->msg, "norm_backward: not implemented on the CPU yet");
  return MX_E_RUNTIME;
}

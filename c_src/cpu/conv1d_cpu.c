/*
 * conv1d_cpu.c: STUB, to be replaced by the conv1d family's CPU kernels.
 */
#include <stdio.h>

#include "cpu_kernels.h"

int cpu_conv1d_forward(int dev, const mx_conv1d_args *a, void *out, void *h_last, mx_err *err) {
  (void)dev;
  (void)a;
  (void)out;
  (void)h_last;
  err->kind = MX_E_RUNTIME;
  snprintf(err->msg, sizeof err->msg, "conv1d_forward: not implemented on the CPU yet");
  return MX_E_RUNTIME;
}

int cpu_conv1d_backward(int dev, const mx_conv1d_args *a, const void *d_out, const void *dh_last, void *dx, void *dweight, void *dbias, void *dh0, int accumulate, mx_err *err) {
  (void)dev;
  (void)a;
  (void)d_out;
  (void)dh_last;
  (void)dx;
  (void)dweight;
  (void)dbias;
  (void)dh0;
  (void)accumulate;
  err->kind = MX_E_RUNTIME;
  snprintf(err->msg, sizeof err->msg, "conv1d_backward: not implemented on the CPU yet");
  return MX_E_RUNTIME;
}

/*
 * activation_cpu.c: STUB, to be replaced by the activation family's CPU kernels.
 */
#include <stdio.h>

#include "cpu_kernels.h"

int cpu_act_forward(int dev, int act, int dtype, const void *x, void *y, size_t n, mx_err *err) {
  (void)dev;
  (void)act;
  (void)dtype;
  (void)x;
  (void)y;
  (void)n;
  err->kind = MX_E_RUNTIME;
  snprintf(err->msg, sizeof err->msg, "act_forward: not implemented on the CPU yet");
  return MX_E_RUNTIME;
}

int cpu_act_backward(int dev, int act, int dtype, const void *x, const void *dy, void *dx, size_t n, mx_err *err) {
  (void)dev;
  (void)act;
  (void)dtype;
  (void)x;
  (void)dy;
  (void)dx;
  (void)n;
  err->kind = MX_E_RUNTIME;
  snprintf(err->msg, sizeof err->msg, "act_backward: not implemented on the CPU yet");
  return MX_E_RUNTIME;
}

int cpu_swiglu_forward(int dev, int dtype, const void *a, const void *b, void *out, size_t n, mx_err *err) {
  (void)dev;
  (void)dtype;
  (void)a;
  (void)b;
  (void)out;
  (void)n;
  err->kind = MX_E_RUNTIME;
  snprintf(err->msg, sizeof err->msg, "swiglu_forward: not implemented on the CPU yet");
  return MX_E_RUNTIME;
}

int cpu_swiglu_backward(int dev, int dtype, const void *a, const void *b, const void *dout, void *da, void *db, size_t n, mx_err *err) {
  (void)dev;
  (void)dtype;
  (void)a;
  (void)b;
  (void)dout;
  (void)da;
  (void)db;
  (void)n;
  err->kind = MX_E_RUNTIME;
  snprintf(err->msg, sizeof err->msg, "swiglu_backward: not implemented on the CPU yet");
  return MX_E_RUNTIME;
}

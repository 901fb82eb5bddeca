/*
 * activation.cu: STUB, to be replaced by the activation family's CUDA kernels.
 */
#include "cuda_ops.h"

int mx_cuda_act_forward(int dev, int act, int dtype, const void *x, void *y, size_t n, mx_err *err) {
  (void)dev;
  (void)act;
  (void)dtype;
  (void)x;
  (void)y;
  (void)n;
  return mx_cuda_fail(err, MX_E_RUNTIME, "act_forward: not implemented on CUDA yet");
}

int mx_cuda_act_backward(int dev, int act, int dtype, const void *x, const void *dy, void *dx, size_t n, mx_err *err) {
  (void)dev;
  (void)act;
  (void)dtype;
  (void)x;
  (void)dy;
  (void)dx;
  (void)n;
  return mx_cuda_fail(err, MX_E_RUNTIME, "act_backward: not implemented on CUDA yet");
}

int mx_cuda_swiglu_forward(int dev, int dtype, const void *a, const void *b, void *out, size_t n, mx_err *err) {
  (void)dev;
  (void)dtype;
  (void)a;
  (void)b;
  (void)out;
  (void)n;
  return mx_cuda_fail(err, MX_E_RUNTIME, "swiglu_forward: not implemented on CUDA yet");
}

int mx_cuda_swiglu_backward(int dev, int dtype, const void *a, const void *b, const void *dout, void *da, void *db, size_t n, mx_err *err) {
  (void)dev;
  (void)dtype;
  (void)a;
  (void)b;
  (void)dout;
  (void)da;
  (void)db;
  (void)n;
  return mx_cuda_fail(err, MX_E_RUNTIME, "swiglu_backward: not implemented on CUDA yet");
}

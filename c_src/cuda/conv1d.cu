/*
 * conv1d.cu: STUB, to be replaced by the conv1d family's CUDA kernels.
 */
#include "cuda_ops.h"

int mx_cuda_conv1d_forward(int dev, const mx_conv1d_args *a, void *out, void *h_last, mx_err *err) {
  (void)dev;
  (void)a;
  (void)out;
  (void)h_last;
  return mx_cuda_fail(err, MX_E_RUNTIME, "conv1d_forward: not implemented on CUDA yet");
}

int mx_cuda_conv1d_backward(int dev, const mx_conv1d_args *a, const void *d_out, const void *dh_last, void *dx, void *dweight, void *dbias, void *dh0, int accumulate, mx_err *err) {
  (void)dev;
  (void)a;
  (void)d_out;
  (void)dh_last;
  (void)dx;
  (void)dweight;
  (void)dbias;
  (void)dh0;
  (void)accumulate;
  return mx_cuda_fail(err, MX_E_RUNTIME, "conv1d_backward: not implemented on CUDA yet");
}

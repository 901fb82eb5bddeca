/*
 * adamw.cu: STUB, to be replaced by the adamw family's CUDA kernels.
 */
#include "cuda_ops.h"

int mx_cuda_adamw(int dev, const mx_adamw_args *a, mx_err *err) {
  (void)dev;
  (void)a;
  return mx_cuda_fail(err, MX_E_RUNTIME, "adamw: not implemented on CUDA yet");
}

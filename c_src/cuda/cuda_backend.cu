/*
 * cuda_backend.cu: the CUDA backend's mx_backend table and the one symbol
 * priv/mambex_cuda.so exports, mx_cuda_backend_get. The NIF dlopens the
 * object, calls mx_cuda_backend_get(MX_BACKEND_ABI) and uses the table for
 * {:cuda, index} tensors. Every other function of the object is hidden.
 * Nothing here touches the GPU: devices are set up on first use.
 */
#include "cuda_ops.h"

static const mx_backend mx_cuda_table = {
    .abi = MX_BACKEND_ABI,
    .name = "cuda",
    .device_count = mx_cuda_device_count,
    .device_name = mx_cuda_device_name,
    .alloc = mx_cuda_alloc,
    .free_async = mx_cuda_free_async,
    .upload = mx_cuda_upload,
    .download = mx_cuda_download,
    .copy2d = mx_cuda_copy2d,
    .sync = mx_cuda_sync,
    .fill = mx_cuda_fill,
    .iota = mx_cuda_iota,
    .random = mx_cuda_random,
    .cast = mx_cuda_cast,
    .unary = mx_cuda_unary,
    .binary = mx_cuda_binary,
    .axpy = mx_cuda_axpy,
    .reduce = mx_cuda_reduce,
    .permute = mx_cuda_permute,
    .event_record = mx_cuda_event_record,
    .event_elapsed = mx_cuda_event_elapsed,
    .event_destroy = mx_cuda_event_destroy,
    .spin = mx_cuda_spin,
    .scan_forward = mx_cuda_scan_forward,
    .scan_backward = mx_cuda_scan_backward,
    .scan_ckpt_elems = mx_cuda_scan_ckpt_elems,
    .gemm = mx_cuda_gemm,
    .sum_rows = mx_cuda_sum_rows,
    .conv1d_forward = mx_cuda_conv1d_forward,
    .conv1d_backward = mx_cuda_conv1d_backward,
    .norm_forward = mx_cuda_norm_forward,
    .norm_backward = mx_cuda_norm_backward,
    .act_forward = mx_cuda_act_forward,
    .act_backward = mx_cuda_act_backward,
    .swiglu_forward = mx_cuda_swiglu_forward,
    .swiglu_backward = mx_cuda_swiglu_backward,
    .cross_entropy = mx_cuda_cross_entropy,
    .mse = mx_cuda_mse,
    .adamw = mx_cuda_adamw,
    .infer = mx_cuda_infer,
    .infer_plan_new = mx_cuda_infer_plan_new,
    .infer_plan_run = mx_cuda_infer_plan_run,
    .infer_plan_free = mx_cuda_infer_plan_free,
    .infer_plan_flags = mx_cuda_infer_plan_flags,
};

extern "C" __attribute__((visibility("default"))) const mx_backend *mx_cuda_backend_get(int abi) {
  return abi == MX_BACKEND_ABI ? &mx_cuda_table : NULL;
}

/*
 * cuda_ops.h: the entry points of the CUDA backend, one per field of the
 * mx_backend table (backend.h says what each one does). cuda_backend.cu
 * collects them into the table; they are hidden from the dynamic symbol
 * table. Each one validates its device and arguments, answers MX_E_LOST on a
 * lost device, holds the device mutex only while enqueueing and never blocks
 * except download and sync.
 */
#ifndef MAMBEX_CUDA_OPS_H
#define MAMBEX_CUDA_OPS_H

#include "cuda_runtime_state.h"

#ifdef __cplusplus
extern "C" {
#endif

/* cuda_runtime.cu */
MX_CUDA_HIDDEN int mx_cuda_device_count(mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_device_name(int dev, char *buf, size_t len, mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_alloc(int dev, size_t nbytes, void **out, mx_err *err);
MX_CUDA_HIDDEN void mx_cuda_free_async(int dev, void *ptr);
MX_CUDA_HIDDEN int mx_cuda_upload(int dev, void *dst, const void *src, size_t nbytes,
                                  mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_download(int dev, void *dst, const void *src, size_t nbytes,
                                    mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_copy2d(int dev, void *dst, size_t dpitch, const void *src,
                                  size_t spitch, size_t width, size_t height, mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_sync(int dev, mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_event_record(int dev, void **event, mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_event_elapsed(int dev, void *start, void *end, double *us,
                                         mx_err *err);
MX_CUDA_HIDDEN void mx_cuda_event_destroy(int dev, void *event);
MX_CUDA_HIDDEN int mx_cuda_spin(int dev, double us, mx_err *err);

/* elementwise.cu */
MX_CUDA_HIDDEN int mx_cuda_fill(int dev, int dtype, void *dst, size_t n, mx_scalar value,
                                mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_iota(int dev, int dtype, void *dst, size_t outer, size_t dim,
                                size_t inner, mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_random(int dev, int dtype, void *dst, size_t n, uint64_t seed,
                                  int dist, double a, double b, mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_cast(int dev, int src_dtype, const void *src, int dst_dtype,
                                void *dst, size_t n, mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_unary(int dev, int op, int dtype, const void *x, void *y, size_t n,
                                 mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_binary(int dev, int op, int dtype, const void *a, const void *b,
                                  mx_scalar scalar, int bmode, size_t n, size_t bn, void *out,
                                  mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_axpy(int dev, int dtype, mx_scalar alpha, const void *x,
                                const void *y, void *out, size_t n, mx_err *err);

/* reduce_permute.cu */
MX_CUDA_HIDDEN int mx_cuda_reduce(int dev, int op, int dtype, const void *x, void *out,
                                  size_t outer, size_t dim, size_t inner, mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_permute(int dev, size_t elsize, const void *x, void *out,
                                   int rank, const int64_t *x_shape, const int *perm,
                                   mx_err *err);

/* scan.cu */
MX_CUDA_HIDDEN int mx_cuda_scan_forward(int dev, const mx_scan_args *a, void *out, void *h_last,
                                        mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_scan_backward(int dev, const mx_scan_args *a, const void *d_out,
                                         const void *dh_last, const mx_scan_grads *g, mx_err *err);
MX_CUDA_HIDDEN int64_t mx_cuda_scan_ckpt_elems(int dev, const mx_scan_args *a);

/* infer.cu */
MX_CUDA_HIDDEN int mx_cuda_infer(int dev, const mx_infer_args *a, mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_infer_plan_new(int dev, const mx_infer_args *a, void **plan, void **host_in,
                                          void **host_out, size_t *device_bytes, mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_infer_plan_run(int dev, void *plan, mx_err *err);
MX_CUDA_HIDDEN void mx_cuda_infer_plan_free(int dev, void *plan);
MX_CUDA_HIDDEN int mx_cuda_infer_plan_flags(const void *plan);

/* linear.cu */
MX_CUDA_HIDDEN int mx_cuda_gemm(int dev, const mx_gemm_args *a, mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_sum_rows(int dev, int dtype, const void *x, int64_t rows, int64_t cols, void *out, int accumulate, mx_err *err);

/* conv1d.cu */
MX_CUDA_HIDDEN int mx_cuda_conv1d_forward(int dev, const mx_conv1d_args *a, void *out, void *h_last, mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_conv1d_backward(int dev, const mx_conv1d_args *a, const void *d_out, const void *dh_last, void *dx, void *dweight, void *dbias, void *dh0, int accumulate, mx_err *err);

/* norm.cu */
MX_CUDA_HIDDEN int mx_cuda_norm_forward(int dev, const mx_norm_args *a, void *y, void *sum, void *mean, void *rstd, mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_norm_backward(int dev, const mx_norm_args *a, const void *mean, const void *rstd, const void *dy, const void *dsum, void *dx, void *dweight, void *dbias, int accumulate, mx_err *err);

/* activation.cu */
MX_CUDA_HIDDEN int mx_cuda_act_forward(int dev, int act, int dtype, const void *x, void *y, size_t n, mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_act_backward(int dev, int act, int dtype, const void *x, const void *dy, void *dx, size_t n, mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_swiglu_forward(int dev, int dtype, const void *a, const void *b, void *out, size_t n, mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_swiglu_backward(int dev, int dtype, const void *a, const void *b, const void *dout, void *da, void *db, size_t n, mx_err *err);

/* loss.cu */
MX_CUDA_HIDDEN int mx_cuda_cross_entropy(int dev, const mx_xent_args *a, void *loss, void *dlogits, mx_err *err);
MX_CUDA_HIDDEN int mx_cuda_mse(int dev, int io, int param, const void *pred, const void *target, size_t n, int mean, double scale, void *loss, void *dpred, mx_err *err);

/* adamw.cu */
MX_CUDA_HIDDEN int mx_cuda_adamw(int dev, const mx_adamw_args *a, mx_err *err);

/* gemm_tf32.cu (used by linear.cu, not a table entry): whether the wgmma
 * TF32 kernel takes this GEMM on a device of compute capability
 * cc_major.cc_minor with sm_count multiprocessors, and its launch on
 * `stream` of device index `dev` (whose mutex the caller holds). No
 * validation beyond the shape rules. */
MX_CUDA_HIDDEN int gemm_tf32_applies(const mx_gemm_args *g, int cc_major, int cc_minor,
                                     int sm_count);
MX_CUDA_HIDDEN cudaError_t gemm_tf32_launch(const mx_gemm_args *g, cudaStream_t stream, int dev,
                                            int sm_count);

#ifdef __cplusplus
}
#endif

#endif /* MAMBEX_CUDA_OPS_H */

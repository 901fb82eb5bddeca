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

#ifdef __cplusplus
}
#endif

#endif /* MAMBEX_CUDA_OPS_H */

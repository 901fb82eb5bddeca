/*
 * cpu_kernels.h: CPU kernels that live in their own files and fill entries
 * of the CPU backend table (cpu_backend.c). Same contracts as the matching
 * mx_backend function pointers in backend.h.
 */
#ifndef MAMBEX_CPU_KERNELS_H
#define MAMBEX_CPU_KERNELS_H

#include "../core/backend.h"

/* The selective scan (scan_cpu.c): io == param in {f32, f64}; any other
 * dtype gives MX_E_ARG. Runs on the CPU thread pool (cpu_pool.h). */
int cpu_scan_forward(int dev, const mx_scan_args *a, void *out, void *h_last, mx_err *err);
int cpu_scan_backward(int dev, const mx_scan_args *a, const void *d_out, const void *dh_last,
                      const mx_scan_grads *g, mx_err *err);

/* gemm_cpu.c */
int cpu_gemm(int dev, const mx_gemm_args *a, mx_err *err);
int cpu_sum_rows(int dev, int dtype, const void *x, int64_t rows, int64_t cols, void *out, int accumulate, mx_err *err);

/* conv1d_cpu.c */
int cpu_conv1d_forward(int dev, const mx_conv1d_args *a, void *out, void *h_last, mx_err *err);
int cpu_conv1d_backward(int dev, const mx_conv1d_args *a, const void *d_out, const void *dh_last, void *dx, void *dweight, void *dbias, void *dh0, int accumulate, mx_err *err);

/* norm_cpu.c */
int cpu_norm_forward(int dev, const mx_norm_args *a, void *y, void *sum, void *mean, void *rstd, mx_err *err);
int cpu_norm_backward(int dev, const mx_norm_args *a, const void *mean, const void *rstd, const void *dy, const void *dsum, void *dx, void *dweight, void *dbias, int accumulate, mx_err *err);

/* activation_cpu.c */
int cpu_act_forward(int dev, int act, int dtype, const void *x, void *y, size_t n, mx_err *err);
int cpu_act_backward(int dev, int act, int dtype, const void *x, const void *dy, void *dx, size_t n, mx_err *err);
int cpu_swiglu_forward(int dev, int dtype, const void *a, const void *b, void *out, size_t n, mx_err *err);
int cpu_swiglu_backward(int dev, int dtype, const void *a, const void *b, const void *dout, void *da, void *db, size_t n, mx_err *err);

/* loss_cpu.c */
int cpu_cross_entropy(int dev, const mx_xent_args *a, void *loss, void *dlogits, mx_err *err);
int cpu_mse(int dev, int io, int param, const void *pred, const void *target, size_t n, int mean, double scale, void *loss, void *dpred, mx_err *err);

/* adamw_cpu.c */
int cpu_adamw(int dev, const mx_adamw_args *a, mx_err *err);

#endif /* MAMBEX_CPU_KERNELS_H */

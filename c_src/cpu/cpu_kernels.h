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

#endif /* MAMBEX_CPU_KERNELS_H */

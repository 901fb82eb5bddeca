/*
 * loss_cpu.c: STUB, to be replaced by the loss family's CPU kernels.
 */
#include <stdio.h>

#include "cpu_kernels.h"

int cpu_cross_entropy(int dev, const mx_xent_args *a, void *loss, void *dlogits, mx_err *err) {
  (void)dev;
  (void)a;
  (void)loss;
  (void)dlogits;
  err->kind = MX_E_RUNTIME;
  snprintf(err->msg, sizeof err->msg, "cross_entropy: not implemented on the CPU yet");
  return MX_E_RUNTIME;
}

int cpu_mse(int dev, int io, int param, const void *pred, const void *target, size_t n, int mean, double scale, void *loss, void *dpred, mx_err *err) {
  (void)dev;
  (void)io;
  (void)param;
  (void)pred;
  (void)target;
  (void)n;
  (void)mean;
  (void)scale;
  (void)loss;
  (void)dpred;
  err->kind = MX_E_RUNTIME;
  snprintf(err->msg, sizeof err->msg, "mse: not implemented on the CPU yet");
  return MX_E_RUNTIME;
}

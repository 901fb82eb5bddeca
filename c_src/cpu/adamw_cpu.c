/*
 * adamw_cpu.c: STUB, to be replaced by the adamw family's CPU kernels.
 */
#include <stdio.h>

#include "cpu_kernels.h"

int cpu_adamw(int dev, const mx_adamw_args *a, mx_err *err) {
  (void)dev;
  (void)a;
  err->kind = MX_E_RUNTIME;
  snprintf(err->msg, sizeof err->msg, "adamw: not implemented on the CPU yet");
  return MX_E_RUNTIME;
}

/*
 * harness.h: what the standalone CUDA harnesses in bench/cuda
 * (scan_harness.c, conv1d_harness.c, infer_harness.c, linear_harness.c,
 * loss_harness.c) share. Each harness is a single C file that includes this
 * header and is built with the command in its own header comment; there is
 * nothing else to compile or link (-ldl for dlopen).
 *
 *   G, E        the backend table in use and the error record that every
 *               backend call fills (the harnesses use device 0 from one
 *               thread).
 *   OK(call)    runs a backend call; when it does not return MX_OK, prints
 *               file, line, the call's text and E.msg to stderr and exits
 *               with status 1.
 *   hx_load     dlopens a mambex_cuda.so and returns its backend table,
 *               mx_cuda_backend_get(MX_BACKEND_ABI) (exits with status 1
 *               after "dlopen: <reason>" when the library does not open).
 *               The harness checks the table, and the device count where it
 *               wants one, with its own message.
 *   hx_time     the device-event timing loop: `warmup` + `runs` calls of the
 *               harness's op, each enqueued after a spinning kernel
 *               (backend.h `spin`) and between two recorded events, so that
 *               the events measure device time, not host enqueue time. The
 *               times of the `runs` calls after the warm-up come back sorted
 *               ascending; the harness reads its median (t[runs / 2]) and
 *               percentiles from them.
 *   hx_time_median  hx_time for a harness that wants the median only.
 *
 * The functions are `static inline` so that a harness that leaves one unused
 * builds without warnings.
 */
#ifndef MAMBEX_BENCH_HARNESS_H
#define MAMBEX_BENCH_HARNESS_H

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

#include "../../c_src/core/backend.h"

static const mx_backend *G;
static mx_err E;

#define OK(call)                                                                  \
  do {                                                                            \
    if ((call) != MX_OK) {                                                        \
      fprintf(stderr, "%s:%d %s failed: %s\n", __FILE__, __LINE__, #call, E.msg); \
      exit(1);                                                                    \
    }                                                                             \
  } while (0)

/* Opens the shared object at `path` with dlopen(path, flags) and returns its
 * backend table for MX_BACKEND_ABI, or NULL when it has no
 * mx_cuda_backend_get or that refuses the ABI. *so (when so is non-NULL)
 * gets the handle, for further dlsym. Exits with status 1 after printing
 * "dlopen: <reason>" to stderr when the library cannot be opened. */
static inline const mx_backend *hx_load(const char *path, int flags, void **so) {
  void *h = dlopen(path, flags);
  if (!h) {
    fprintf(stderr, "dlopen: %s\n", dlerror());
    exit(1);
  }
  if (so) *so = h;
  mx_backend_get_fn get = (mx_backend_get_fn)dlsym(h, "mx_cuda_backend_get");
  return get ? get(MX_BACKEND_ABI) : NULL;
}

/* qsort comparator: doubles, ascending. */
static inline int hx_cmpd(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* The op timed by hx_time: enqueues the work of one call on device 0
 * (checking its backend calls with OK). `i` counts the calls from 0, the
 * warm-up's included, for ops that rotate over several input sets. */
typedef void hx_op_fn(void *ctx, int i);

/* Calls op(ctx, i) for i = 0 .. warmup + runs - 1, each time as: a spin of
 * `spin_us` µs, an event, the op, an event, then the device µs between the
 * two events (waiting for the second). The first `warmup` calls are not
 * kept; t[0 .. runs) gets the times of the others, sorted ascending. */
static inline void hx_time(double *t, int runs, int warmup, double spin_us, hx_op_fn *op,
                           void *ctx) {
  for (int r = -warmup; r < runs; r++) {
    void *e0, *e1;
    double us;
    OK(G->spin(0, spin_us, &E));
    OK(G->event_record(0, &e0, &E));
    op(ctx, r + warmup);
    OK(G->event_record(0, &e1, &E));
    OK(G->event_elapsed(0, e0, e1, &us, &E));
    G->event_destroy(0, e0);
    G->event_destroy(0, e1);
    if (r >= 0) t[r] = us;
  }
  qsort(t, runs, sizeof(double), hx_cmpd);
}

/* hx_time, returning the median device µs, t[runs / 2] of the sorted times. */
static inline double hx_time_median(int runs, int warmup, double spin_us, hx_op_fn *op,
                                    void *ctx) {
  double *t = malloc(sizeof(double) * runs);
  hx_time(t, runs, warmup, spin_us, op, ctx);
  const double m = t[runs / 2];
  free(t);
  return m;
}

#endif /* MAMBEX_BENCH_HARNESS_H */

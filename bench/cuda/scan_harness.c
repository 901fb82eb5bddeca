/*
 * scan_harness.c: times the CUDA selective scan outside the BEAM, through
 * the backend table of priv/mambex_cuda.so, with device events around each
 * call (after a spinning kernel, so the events see device time only). Also
 * the process to put under a profiler (ncu cannot follow the BEAM's child
 * processes).
 *
 *   cc -O2 -std=gnu11 -o /tmp/scan_harness bench/cuda/scan_harness.c -ldl -lm
 *   /tmp/scan_harness priv/mambex_cuda.so [runs] [shape index]
 *
 * Prints the device time of one empty kernel between the same events (the
 * floor of any one-launch figure), then: B L D N fwd_us fwdbwd_us
 * fwdbwd_nockpt_us (medians over `runs`, default 50). fwd: inference (no checkpoints); fwdbwd: a training step's
 * scan (the forward saves checkpoints, the backward reads them);
 * fwdbwd_nockpt: the backward re-runs the forward instead.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../c_src/core/backend.h"

static const mx_backend *G;
static mx_err E;

#define OK(call)                                                               \
  do {                                                                         \
    if ((call) != MX_OK) {                                                     \
      fprintf(stderr, "%s:%d %s failed: %s\n", __FILE__, __LINE__, #call, E.msg); \
      exit(1);                                                                 \
    }                                                                          \
  } while (0)

static void *dev_random(size_t n, uint64_t seed, double a, double b, int normal) {
  void *p;
  OK(G->alloc(0, n * 4, &p, &E));
  OK(G->random(0, MX_F32, p, n, seed, normal ? MX_NORMAL : MX_UNIFORM, a, b, &E));
  return p;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* median device time of `runs` calls of fwd (and bwd when `with_bwd`) */
static double time_scan(mx_scan_args *a, void *out, void *hl, mx_scan_grads *g, void *dout,
                        int with_bwd, void *ckpt, int runs) {
  a->ckpt = ckpt;
  double *t = malloc(sizeof(double) * runs);
  for (int r = -3; r < runs; r++) {
    void *e0, *e1;
    double us;
    OK(G->spin(0, 200, &E));
    OK(G->event_record(0, &e0, &E));
    OK(G->scan_forward(0, a, out, hl, &E));
    if (with_bwd) OK(G->scan_backward(0, a, dout, NULL, g, &E));
    OK(G->event_record(0, &e1, &E));
    OK(G->event_elapsed(0, e0, e1, &us, &E));
    G->event_destroy(0, e0);
    G->event_destroy(0, e1);
    if (r >= 0) t[r] = us;
  }
  qsort(t, runs, sizeof(double), cmp);
  double m = t[runs / 2];
  free(t);
  return m;
}

/* median device time of an empty kernel (a spin of 0 us) between events */
static double time_empty(int runs) {
  double *t = malloc(sizeof(double) * runs);
  for (int r = -3; r < runs; r++) {
    void *e0, *e1;
    double us;
    OK(G->spin(0, 200, &E));
    OK(G->event_record(0, &e0, &E));
    OK(G->spin(0, 0, &E));
    OK(G->event_record(0, &e1, &E));
    OK(G->event_elapsed(0, e0, e1, &us, &E));
    G->event_destroy(0, e0);
    G->event_destroy(0, e1);
    if (r >= 0) t[r] = us;
  }
  qsort(t, runs, sizeof(double), cmp);
  double m = t[runs / 2];
  free(t);
  return m;
}

int main(int argc, char **argv) {
  const char *path = argc > 1 ? argv[1] : "priv/mambex_cuda.so";
  int runs = argc > 2 ? atoi(argv[2]) : 50;
  int only = argc > 3 ? atoi(argv[3]) : -1; /* run one shape (an index) */
  void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
  if (!h) {
    fprintf(stderr, "dlopen: %s\n", dlerror());
    return 1;
  }
  mx_backend_get_fn get = (mx_backend_get_fn)dlsym(h, "mx_cuda_backend_get");
  G = get ? get(MX_BACKEND_ABI) : NULL;
  if (!G || G->device_count(&E) < 1) {
    fprintf(stderr, "no CUDA backend or device\n");
    return 1;
  }
  /* the table, then two more small batches (for the kernel rule) */
  static const int shapes[][2] = {{1, 60},   {32, 60}, {256, 60}, {256, 180}, {64, 1024},
                                  {8, 4096}, {2, 60},  {4, 60},   {8, 60}};
  const int D = 512, N = 16;
  printf("empty kernel between events: %.2f us\n", time_empty(runs));
  printf("B L D N fwd_us fwdbwd_us fwdbwd_nockpt_us\n");
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
    if (only >= 0 && (int)s != only) continue;
    const int B = shapes[s][0], L = shapes[s][1];
    size_t bld = (size_t)B * L * D, bln = (size_t)B * L * N, bdn = (size_t)B * D * N;
    mx_scan_args a = {.batch = B, .len = L, .dim = D, .dstate = N, .groups = 1, .io = MX_F32,
                      .param = MX_F32, .softplus = 1};
    a.u = dev_random(bld, 1, 0, 1, 1);
    a.delta = dev_random(bld, 2, 0, 0.5, 1);
    a.A = dev_random((size_t)D * N, 3, -2.0, -0.1, 0);
    a.Bm = dev_random(bln, 4, 0, 1, 1);
    a.Cm = dev_random(bln, 5, 0, 1, 1);
    a.z = dev_random(bld, 6, 0, 1, 1);
    a.Dskip = dev_random(D, 7, 0, 1, 1);
    a.delta_bias = dev_random(D, 8, 0, 1, 1);
    void *dout = dev_random(bld, 9, 0, 1, 1), *out, *hl;
    OK(G->alloc(0, bld * 4, &out, &E));
    OK(G->alloc(0, bdn * 4, &hl, &E));
    mx_scan_grads g;
    memset(&g, 0, sizeof g);
    OK(G->alloc(0, bld * 4, &g.du, &E));
    OK(G->alloc(0, bld * 4, &g.ddelta, &E));
    OK(G->alloc(0, bld * 4, &g.dz, &E));
    OK(G->alloc(0, bln * 4, &g.dB, &E));
    OK(G->alloc(0, bln * 4, &g.dC, &E));
    OK(G->alloc(0, (size_t)D * N * 4, &g.dA, &E));
    OK(G->alloc(0, D * 4, &g.dD, &E));
    OK(G->alloc(0, D * 4, &g.ddelta_bias, &E));
    void *ckpt = NULL;
    int64_t ck_elems = G->scan_ckpt_elems ? G->scan_ckpt_elems(0, &a) : 0;
    if (ck_elems > 0) OK(G->alloc(0, (size_t)ck_elems * 4, &ckpt, &E));
    double f = time_scan(&a, out, hl, &g, dout, 0, NULL, runs);
    double fb = time_scan(&a, out, hl, &g, dout, 1, ckpt, runs);
    double fbn = time_scan(&a, out, hl, &g, dout, 1, NULL, runs);
    printf("%d %d %d %d %.2f %.2f %.2f\n", B, L, D, N, f, fb, fbn);
    if (ckpt) G->free_async(0, ckpt);
    fflush(stdout);
    void *ptrs[] = {(void *)a.u, (void *)a.delta, (void *)a.A, (void *)a.Bm, (void *)a.Cm, (void *)a.z,
                    (void *)a.Dskip, (void *)a.delta_bias, dout, out, hl, g.du, g.ddelta, g.dz,
                    g.dB, g.dC, g.dA, g.dD, g.ddelta_bias};
    for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++) G->free_async(0, ptrs[i]);
  }
  OK(G->sync(0, &E));
  return 0;
}

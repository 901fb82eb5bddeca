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

#include "harness.h"

static void *dev_random(size_t n, uint64_t seed, double a, double b, int normal) {
  void *p;
  OK(G->alloc(0, n * 4, &p, &E));
  OK(G->random(0, MX_F32, p, n, seed, normal ? MX_NORMAL : MX_UNIFORM, a, b, &E));
  return p;
}

/* one timed call of time_scan: fwd, then bwd when `with_bwd` */
typedef struct {
  const mx_scan_args *a;
  void *out, *hl, *dout;
  const mx_scan_grads *g;
  int with_bwd;
} scan_call;

static void scan_op(void *ctx, int i) {
  const scan_call *c = ctx;
  (void)i;
  OK(G->scan_forward(0, c->a, c->out, c->hl, &E));
  if (c->with_bwd) OK(G->scan_backward(0, c->a, c->dout, NULL, c->g, &E));
}

/* median device time of `runs` calls of fwd (and bwd when `with_bwd`) */
static double time_scan(mx_scan_args *a, void *out, void *hl, mx_scan_grads *g, void *dout,
                        int with_bwd, void *ckpt, int runs) {
  a->ckpt = ckpt;
  scan_call c = {.a = a, .out = out, .hl = hl, .dout = dout, .g = g, .with_bwd = with_bwd};
  return hx_time_median(runs, 3, 200, scan_op, &c);
}

static void empty_op(void *ctx, int i) {
  (void)ctx;
  (void)i;
  OK(G->spin(0, 0, &E));
}

/* median device time of an empty kernel (a spin of 0 us) between events */
static double time_empty(int runs) { return hx_time_median(runs, 3, 200, empty_op, NULL); }

int main(int argc, char **argv) {
  const char *path = argc > 1 ? argv[1] : "priv/mambex_cuda.so";
  int runs = argc > 2 ? atoi(argv[2]) : 50;
  int only = argc > 3 ? atoi(argv[3]) : -1; /* run one shape (an index) */
  G = hx_load(path, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE, NULL);
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

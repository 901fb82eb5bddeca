/*
 * infer_harness.c: times fused inference (backend.h `infer`) of the
 * DESIGN.md §7 model (features 256, d_model 256, d_inner 512, d_state 16,
 * d_conv 4, dt_rank 16, 64 outputs) outside the BEAM, through the backend
 * table of a mambex_cuda.so, with device events around each call (after a
 * spinning kernel, so the events see device time only).
 *
 *   cc -O2 -std=gnu11 -o /tmp/infer_harness bench/cuda/infer_harness.c -ldl -lm
 *   /tmp/infer_harness priv/mambex_cuda.so [layers] [batch] [runs]
 *
 * Prints one line per kernel choice: the median device time of one step.
 * With a library built with -DMX_INFER_TRACE (bench/gpu/infer_probe.sh) it
 * also prints where the step kernel's time goes: per phase edge, the SM
 * cycles since the kernel's start (block 0, and the latest block).
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

static uint64_t g_seed = 1;

static void *dev_uniform(size_t n, double a, double b) {
  void *p;
  OK(G->alloc(0, n * 4, &p, &E));
  OK(G->random(0, MX_F32, p, n, g_seed++, MX_UNIFORM, a, b, &E));
  return p;
}

static void infer_op(void *ctx, int i) {
  (void)i;
  OK(G->infer(0, ctx, &E));
}

static double time_infer(mx_infer_args *a, int runs) {
  return hx_time_median(runs, 5, 200, infer_op, a);
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s mambex_cuda.so [layers] [batch] [runs]\n", argv[0]);
    return 2;
  }
  void *so = NULL;
  G = hx_load(argv[1], RTLD_NOW | RTLD_LOCAL, &so);
  if (!G) {
    fprintf(stderr, "no backend table (ABI %d)\n", MX_BACKEND_ABI);
    return 1;
  }
  int (*trace)(long long *, int) = (int (*)(long long *, int))dlsym(so, "mx_infer_step_trace");
  int (*ctrace)(long long *, int) = (int (*)(long long *, int))dlsym(so, "mx_infer_cluster_trace");
  const int NL = argc > 2 ? atoi(argv[2]) : 2, B = argc > 3 ? atoi(argv[3]) : 1,
            runs = argc > 4 ? atoi(argv[4]) : 200;
  const int F = 256, DM = 256, DI = 512, N = 16, W = 4, RK = 16, O = 64;

  mx_infer_args a;
  memset(&a, 0, sizeof a);
  a.batch = B;
  a.len = 1;
  a.features = F;
  a.d_model = DM;
  a.d_inner = DI;
  a.d_state = N;
  a.d_conv = W;
  a.dt_rank = RK;
  a.outputs = O;
  a.n_layers = NL;
  a.eps = 1e-5;
  a.in_w = dev_uniform((size_t)F * DM, -0.06, 0.06);
  a.in_b = dev_uniform(DM, -0.1, 0.1);
  a.norm_f_w = dev_uniform(DM, 0.9, 1.1);
  a.head_w = dev_uniform((size_t)DM * O, -0.06, 0.06);
  a.head_b = dev_uniform(O, -0.1, 0.1);
  for (int l = 0; l < NL; l++) {
    mx_infer_layer *y = &a.layers[l];
    y->norm_w = dev_uniform(DM, 0.9, 1.1);
    y->in_x_w = dev_uniform((size_t)DM * DI, -0.06, 0.06);
    y->in_z_w = dev_uniform((size_t)DM * DI, -0.06, 0.06);
    y->conv_w = dev_uniform((size_t)DI * W, -0.5, 0.5);
    y->conv_b = dev_uniform(DI, -0.1, 0.1);
    y->x_proj_w = dev_uniform((size_t)DI * (RK + 2 * N), -0.04, 0.04);
    y->dt_w = dev_uniform((size_t)RK * DI, -0.25, 0.25);
    y->dt_b = dev_uniform(DI, -4.0, -2.0);
    y->a_log = dev_uniform((size_t)DI * N, 0.0, 2.7);
    y->d = dev_uniform(DI, 0.9, 1.1);
    y->out_w = dev_uniform((size_t)DI * DM, -0.04, 0.04);
    y->conv_in = y->conv_out = dev_uniform((size_t)B * DI * (W - 1), -1.0, 1.0);
    y->ssm_in = y->ssm_out = dev_uniform((size_t)B * DI * N, -1.0, 1.0);
  }
  a.x = dev_uniform((size_t)B * F, -1.0, 1.0);
  OK(G->alloc(0, (size_t)B * O * 4, &a.out, &E));

  const struct {
    const char *name;
    int blocks, channels;
  } cfg[] = {{"auto", 0, 0}, /* batch 1: the cluster kernel */
             {"step c=4", 0, 4},   {"step c=8", 0, 8},
             {"step c=16", 0, 16}, {"general auto", 0, -1}, {"general 132", 132, -1}};
  printf("layers %d batch %d: median device us of one step (%d runs)\n", NL, B, runs);
  for (size_t i = 0; i < sizeof cfg / sizeof cfg[0]; i++) {
    a.blocks = cfg[i].blocks;
    a.step_channels = cfg[i].channels;
    if (G->infer(0, &a, &E) != MX_OK) {
      printf("%-14s n/a (%s)\n", cfg[i].name, E.msg);
      continue;
    }
    printf("%-14s %8.2f\n", cfg[i].name, time_infer(&a, runs));
    fflush(stdout);
  }

  if (ctrace && B == 1) {
    /* the cluster kernel: 0 start, 1 input product, 2 its barrier; layer l:
     * 3 + 6l gathered and normed, +1 in_proj and conv, +2 x_proj pushed,
     * +3 x barrier, +4 scan, +5 s barrier; 3 + 6 NL the end */
    const int EV = 64, nb = 16;
    a.blocks = 0;
    a.step_channels = 0;
    OK(G->infer(0, &a, &E));
    OK(G->sync(0, &E));
    long long *t = calloc((size_t)nb * EV, sizeof(long long));
    if (ctrace(t, nb)) {
      fprintf(stderr, "cluster trace read failed\n");
      return 1;
    }
    /* twice: the first launch after other kernels (cold code), then again */
    OK(G->infer(0, &a, &E));
    OK(G->sync(0, &E));
    long long *t2 = calloc((size_t)nb * EV, sizeof(long long));
    if (ctrace(t2, nb)) return 1;
    const int last = 3 + 6 * NL < EV ? 3 + 6 * NL : EV - 1;
    printf("cluster trace: event: block-0 cycles since its start / max over blocks / block 0 on a rerun\n");
    printf("  (32-36 start: before/after input panel, small weights, in_proj panel, barrier; 40 + 8l ..:\n"
           "   out panel, states, next in_proj panel, next small, x partial, dbc, out partial, pushed)\n");
    for (int e = 1; e < EV; e++) {
      if (e > last && e < 32) continue;
      if (t[e] == 0) continue;
      long long mx = 0;
      for (int b = 0; b < nb; b++) {
        const long long d = t[b * EV + e] - t[b * EV];
        if (d > mx) mx = d;
      }
      printf("  ev %2d %8lld %8lld %8lld\n", e, t[e] - t[0], mx, t2[e] - t2[0]);
    }
    free(t);
    free(t2);
  }

  if (trace) {
    const int EV = 64;
    for (int c = 4; c <= 16; c *= 2) {
      a.blocks = 0;
      a.step_channels = c;
      OK(G->infer(0, &a, &E));
      OK(G->sync(0, &E));
      const int nb = (DI + c - 1) / c;
      long long *t = calloc((size_t)nb * EV, sizeof(long long));
      if (trace(t, nb)) {
        fprintf(stderr, "trace read failed\n");
        return 1;
      }
      const int last = 4 + 4 * NL;
      printf("trace c=%d (%d blocks): event: block-0 cycles since its start / max over blocks\n", c, nb);
      for (int e = 1; e <= last; e++) {
        long long mx = 0;
        for (int b = 0; b < nb; b++) {
          const long long d = t[b * EV + e] - t[b * EV];
          if (d > mx) mx = d;
        }
        printf("  ev %2d %8lld %8lld\n", e, t[e] - t[0], mx);
      }
      /* within layers 0 and 1: a: states issued, s gathered, normed,
       * in_proj, conv; b: x_proj gathered, delta, scan (then out_proj) */
      for (int l = 0; l < NL && l < 4; l++) {
        printf("  layer %d sub-phases (block 0, cycles since the layer's phase start):", l);
        for (int k = 0; k < 8; k++)
          printf(" %lld", t[32 + 8 * l + k] - t[(k < 5 ? 3 : 5) + 4 * l]);
        printf("\n");
      }
      free(t);
    }
  }
  return 0;
}

/*
 * conv1d_harness.c: checks the CUDA conv1d against the CPU backend's f32
 * kernels and times it, outside the BEAM, through the backend table of
 * priv/mambex_cuda.so (device events after a spinning kernel, so the events
 * see device time only).
 *
 *   cc -O2 -std=gnu11 -D_GNU_SOURCE -pthread -o /tmp/conv1d_harness \
 *      bench/cuda/conv1d_harness.c c_src/cpu/conv1d_cpu.c c_src/cpu/cpu_pool.c -ldl -lm
 *   /tmp/conv1d_harness priv/mambex_cuda.so [runs]
 *
 * Check: for each case, random inputs (bf16 cases round x and d_out to bf16
 * first, so the CPU sees the same values), gradients pre-filled with random
 * values when accumulating, GPU outputs poisoned with NaN first; prints the
 * relative error of every output and whether a rerun gives the same bits.
 * Time: median device µs of forward and backward over `runs` (default 100),
 * bytes moved and the % of the 4.2 TB/s floor.
 */
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "../../c_src/core/numeric.h"
#include "../../c_src/cpu/cpu_kernels.h"

static int failures;

static uint64_t rng = 88172645463325252ULL;
static float frand(float lo, float hi) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return lo + (hi - lo) * (float)((rng >> 11) * (1.0 / 9007199254740992.0));
}

static float *host_rand(size_t n, float lo, float hi, int bf16) {
  float *p = malloc(n * 4 + 4);
  for (size_t i = 0; i < n; i++) {
    p[i] = frand(lo, hi);
    if (bf16) p[i] = mx_bf16_to_f32(mx_f32_to_bf16(p[i]));
  }
  return p;
}

/* upload n floats as io (f32 or bf16) */
static void *dev_io(const float *h, size_t n, int io) {
  void *d;
  size_t es = io == MX_BF16 ? 2 : 4;
  OK(G->alloc(0, n * es + 16, &d, &E));
  if (!h || n == 0) return d;
  if (io == MX_F32) {
    OK(G->upload(0, d, h, n * 4, &E));
  } else {
    uint16_t *b = malloc(n * 2);
    for (size_t i = 0; i < n; i++) b[i] = mx_f32_to_bf16(h[i]);
    OK(G->upload(0, d, b, n * 2, &E));
    free(b);
  }
  return d;
}

static float *download(const void *d, size_t n, int io) {
  float *h = malloc(n * 4 + 4);
  if (n == 0) return h;
  if (io == MX_F32) {
    OK(G->download(0, h, d, n * 4, &E));
  } else {
    uint16_t *b = malloc(n * 2);
    OK(G->download(0, b, d, n * 2, &E));
    for (size_t i = 0; i < n; i++) h[i] = mx_bf16_to_f32(b[i]);
    free(b);
  }
  return h;
}

static double rel_err(const float *a, const float *ref, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    if (!isfinite(a[i])) return INFINITY;
    double d = (double)a[i] - ref[i];
    num += d * d;
    den += (double)ref[i] * ref[i];
  }
  return den == 0 ? sqrt(num) : sqrt(num / den);
}

static void poison(void *d, size_t n, int io) {
  if (n) OK(G->fill(0, io, d, n, (mx_scalar){NAN, 0}, &E));
}

typedef struct {
  int B, L, C, W, silu, bias, h0, dhl, io, acc;
} cv_case;

static void check(cv_case k) {
  const size_t blc = (size_t)k.B * k.L * k.C, bck = (size_t)k.B * k.C * (k.W - 1);
  const size_t cw = (size_t)k.C * k.W;
  const int bf = k.io == MX_BF16;
  float *x = host_rand(blc, -2, 2, bf), *w = host_rand(cw, -1, 1, 0);
  float *bias = host_rand(k.C, -0.5, 0.5, 0), *h0 = host_rand(bck, -2, 2, 0);
  float *dout = host_rand(blc, -1, 1, bf), *dhl = host_rand(bck, -1, 1, 0);
  float *gw0 = host_rand(cw, -1, 1, 0), *gb0 = host_rand(k.C, -1, 1, 0),
        *gh0 = host_rand(bck, -1, 1, 0);
  /* CPU f32 */
  mx_conv1d_args a = {.batch = k.B, .len = k.L, .channels = k.C, .width = k.W, .io = MX_F32,
                      .param = MX_F32, .silu = k.silu, .x = x, .weight = w,
                      .bias = k.bias ? bias : NULL, .h0 = k.h0 ? h0 : NULL};
  float *out = malloc(blc * 4 + 4), *hl = malloc(bck * 4 + 4), *dx = malloc(blc * 4 + 4);
  float *dw = malloc(cw * 4), *db = malloc(k.C * 4), *dh0 = malloc(bck * 4 + 4);
  memcpy(dw, gw0, cw * 4);
  memcpy(db, gb0, k.C * 4);
  memcpy(dh0, gh0, bck * 4);
  OK(cpu_conv1d_forward(0, &a, out, hl, &E));
  OK(cpu_conv1d_backward(0, &a, dout, k.dhl ? dhl : NULL, dx, dw, k.bias ? db : NULL,
                         k.h0 ? dh0 : NULL, k.acc, &E));
  /* GPU */
  mx_conv1d_args g = a;
  g.io = k.io;
  g.x = dev_io(x, blc, k.io);
  g.weight = dev_io(w, cw, MX_F32);
  g.bias = k.bias ? dev_io(bias, k.C, MX_F32) : NULL;
  g.h0 = k.h0 ? dev_io(h0, bck, MX_F32) : NULL;
  void *gout = dev_io(NULL, blc, k.io), *ghl = dev_io(NULL, bck, MX_F32);
  void *gdout = dev_io(dout, blc, k.io), *gdhl = k.dhl ? dev_io(dhl, bck, MX_F32) : NULL;
  void *gdx = dev_io(NULL, blc, k.io);
  void *gdw = dev_io(gw0, cw, MX_F32), *gdb = dev_io(gb0, k.C, MX_F32),
       *gdh0 = dev_io(gh0, bck, MX_F32);
  poison(gout, blc, k.io);
  poison(ghl, bck, MX_F32);
  poison(gdx, blc, k.io);
  if (!k.acc) {
    poison(gdw, cw, MX_F32);
    poison(gdb, k.C, MX_F32);
    poison(gdh0, bck, MX_F32);
  }
  OK(G->conv1d_forward(0, &g, gout, ghl, &E));
  OK(G->conv1d_backward(0, &g, gdout, gdhl, gdx, gdw, k.bias ? gdb : NULL, k.h0 ? gdh0 : NULL,
                        k.acc, &E));
  float *r_out = download(gout, blc, k.io), *r_hl = download(ghl, bck, MX_F32);
  float *r_dx = download(gdx, blc, k.io), *r_dw = download(gdw, cw, MX_F32);
  float *r_db = download(gdb, k.C, MX_F32), *r_dh0 = download(gdh0, bck, MX_F32);
  double e[6] = {rel_err(r_out, out, blc), rel_err(r_hl, hl, bck), rel_err(r_dx, dx, blc),
                 rel_err(r_dw, dw, cw), k.bias ? rel_err(r_db, db, k.C) : 0,
                 k.h0 ? rel_err(r_dh0, dh0, bck) : 0};
  /* rerun (not accumulating): same bits */
  int same = 1;
  if (!k.acc) {
    poison(gdx, blc, k.io);
    poison(gdw, cw, MX_F32);
    OK(G->conv1d_backward(0, &g, gdout, gdhl, gdx, gdw, k.bias ? gdb : NULL, k.h0 ? gdh0 : NULL,
                          0, &E));
    float *r2 = download(gdw, cw, MX_F32), *r3 = download(gdx, blc, k.io);
    same = memcmp(r2, r_dw, cw * 4) == 0 && memcmp(r3, r_dx, blc * 4) == 0;
    free(r2);
    free(r3);
  }
  const double tf = bf ? 1e-2 : 1e-5, tg = bf ? 1e-2 : 1e-4;
  int bad = !(e[0] <= tf && e[1] <= tf && e[2] <= tg && e[3] <= tg && e[4] <= tg && e[5] <= tg &&
              same);
  failures += bad;
  printf("%s B%d L%d C%d W%d silu%d bias%d h0%d dhl%d %s acc%d: out %.2e hl %.2e dx %.2e dw %.2e "
         "db %.2e dh0 %.2e rerun %s\n",
         bad ? "FAIL" : "ok  ", k.B, k.L, k.C, k.W, k.silu, k.bias, k.h0, k.dhl,
         bf ? "bf16" : "f32", k.acc, e[0], e[1], e[2], e[3], e[4], e[5], same ? "same" : "DIFF");
  void *ptrs[] = {(void *)g.x, (void *)g.weight, (void *)g.bias, (void *)g.h0, gout, ghl, gdout,
                  gdhl, gdx, gdw, gdb, gdh0};
  for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++)
    if (ptrs[i]) G->free_async(0, ptrs[i]);
  float *hp[] = {x, w, bias, h0, dout, dhl, gw0, gb0, gh0, out, hl, dx, dw, db, dh0,
                 r_out, r_hl, r_dx, r_dw, r_db, r_dh0};
  for (size_t i = 0; i < sizeof hp / sizeof hp[0]; i++) free(hp[i]);
}

/* one timed call of time_op */
typedef struct {
  int which;
  const mx_conv1d_args *a;
  void *out, *hl, *dout, *dx, *dw, *db;
} conv_call;

static void conv_op(void *ctx, int i) {
  const conv_call *c = ctx;
  (void)i;
  if (c->which == 0) OK(G->conv1d_forward(0, c->a, c->out, c->hl, &E));
  else OK(G->conv1d_backward(0, c->a, c->dout, NULL, c->dx, c->dw, c->db, NULL, 0, &E));
}

/* median device µs of `runs` calls; which: 0 forward, 1 backward */
static double time_op(int which, mx_conv1d_args *a, void *out, void *hl, void *dout, void *dx,
                      void *dw, void *db, int runs) {
  conv_call c = {.which = which, .a = a, .out = out, .hl = hl, .dout = dout, .dx = dx,
                 .dw = dw, .db = db};
  return hx_time_median(runs, 5, 100, conv_op, &c);
}

static void bench(int B, int L, int C, int W, int silu, int io, int runs) {
  const size_t blc = (size_t)B * L * C, es = io == MX_BF16 ? 2 : 4;
  mx_conv1d_args a = {.batch = B, .len = L, .channels = C, .width = W, .io = io,
                      .param = MX_F32, .silu = silu};
  void *x, *dout, *out, *dx, *w, *bias, *hl, *dw, *db;
  OK(G->alloc(0, blc * es, &x, &E));
  OK(G->alloc(0, blc * es, &dout, &E));
  OK(G->alloc(0, blc * es, &out, &E));
  OK(G->alloc(0, blc * es, &dx, &E));
  OK(G->random(0, io, x, blc, 1, MX_NORMAL, 0, 1, &E));
  OK(G->random(0, io, dout, blc, 2, MX_NORMAL, 0, 1, &E));
  OK(G->alloc(0, (size_t)C * W * 4, &w, &E));
  OK(G->random(0, MX_F32, w, (size_t)C * W, 3, MX_NORMAL, 0, 0.5, &E));
  OK(G->alloc(0, (size_t)C * 4, &bias, &E));
  OK(G->random(0, MX_F32, bias, C, 4, MX_NORMAL, 0, 0.5, &E));
  OK(G->alloc(0, (size_t)B * C * (W - 1) * 4 + 4, &hl, &E));
  OK(G->alloc(0, (size_t)C * W * 4, &dw, &E));
  OK(G->alloc(0, (size_t)C * 4, &db, &E));
  a.x = x;
  a.weight = w;
  a.bias = bias;
  double f = time_op(0, &a, out, hl, NULL, NULL, NULL, NULL, runs);
  double b = time_op(1, &a, NULL, NULL, dout, dx, dw, db, runs);
  /* bytes: forward x in + out + final state; backward x, d_out in, dx out */
  double fbytes = 2.0 * blc * es + (double)B * C * (W - 1) * 4;
  double bbytes = 3.0 * blc * es;
  double ff = fbytes / 4.2e12 * 1e6, bf = bbytes / 4.2e12 * 1e6;
  printf("B%-4d L%-4d C%-4d W%d silu%d %-4s fwd %8.2f us (floor %6.2f, %5.1f%%)  "
         "bwd %8.2f us (floor %6.2f, %5.1f%%)\n",
         B, L, C, W, silu, io == MX_BF16 ? "bf16" : "f32", f, ff, 100 * ff / f, b, bf,
         100 * bf / b);
  fflush(stdout);
  void *ptrs[] = {x, dout, out, dx, w, bias, hl, dw, db};
  for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++) G->free_async(0, ptrs[i]);
}

int main(int argc, char **argv) {
  const char *path = argc > 1 ? argv[1] : "priv/mambex_cuda.so";
  int runs = argc > 2 ? atoi(argv[2]) : 100;
  G = hx_load(path, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE, NULL);
  if (!G || G->device_count(&E) < 1) {
    fprintf(stderr, "no CUDA backend or device\n");
    return 1;
  }
  static const cv_case cases[] = {
      {1, 1, 1, 1, 1, 1, 1, 1, MX_F32, 0},    {2, 61, 100, 4, 1, 1, 1, 1, MX_F32, 0},
      {2, 61, 100, 4, 0, 0, 0, 0, MX_F32, 0}, {3, 2, 5, 2, 1, 1, 1, 1, MX_F32, 0},
      {2, 1, 7, 3, 0, 0, 1, 1, MX_F32, 0},    {2, 3, 12, 8, 1, 1, 1, 1, MX_F32, 0},
      {1, 61, 100, 8, 1, 1, 1, 1, MX_F32, 0}, {3, 61, 1, 4, 1, 1, 0, 0, MX_F32, 0},
      {2, 2, 16, 4, 0, 1, 1, 1, MX_F32, 0},   {9, 130, 36, 4, 1, 1, 1, 0, MX_F32, 0},
      {3, 37, 64, 1, 1, 1, 1, 1, MX_F32, 0},  {3, 37, 64, 2, 0, 1, 1, 1, MX_F32, 0},
      {3, 37, 64, 3, 1, 1, 1, 1, MX_F32, 0},  {3, 37, 64, 4, 1, 1, 1, 1, MX_F32, 0},
      {3, 37, 64, 5, 1, 0, 1, 1, MX_F32, 0},  {3, 37, 64, 6, 1, 1, 1, 1, MX_F32, 0},
      {3, 37, 64, 7, 1, 1, 0, 1, MX_F32, 0},  {3, 37, 64, 8, 1, 1, 1, 1, MX_F32, 0},
      {64, 100, 64, 4, 1, 1, 1, 1, MX_F32, 0}, {5, 64, 128, 4, 1, 1, 1, 1, MX_F32, 1},
      {4, 61, 100, 4, 1, 1, 1, 1, MX_F32, 1}, {2, 61, 64, 4, 1, 1, 1, 1, MX_BF16, 0},
      {2, 61, 30, 3, 1, 1, 1, 1, MX_BF16, 0}, {256, 60, 512, 4, 1, 1, 1, 1, MX_F32, 0},
      {256, 60, 512, 4, 1, 1, 1, 1, MX_BF16, 1}, {2, 5000, 64, 4, 1, 1, 1, 1, MX_F32, 0},
      {300, 1000, 16, 4, 1, 1, 1, 1, MX_F32, 0},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) check(cases[i]);
  printf("%d failures\n", failures);
  static const int shapes[][3] = {{256, 60, 512}, {32, 60, 512}, {1, 60, 512}};
  for (int s = 0; s < 3; s++)
    for (int io = 0; io < 2; io++)
      for (int silu = 0; silu < 2; silu++)
        bench(shapes[s][0], shapes[s][1], shapes[s][2], 4, silu, io ? MX_BF16 : MX_F32, runs);
  bench(64, 1024, 512, 4, 1, MX_F32, runs);
  bench(256, 60, 512, 8, 1, MX_F32, runs);
  bench(256, 60, 100, 4, 1, MX_F32, runs);
  OK(G->sync(0, &E));
  return failures != 0;
}

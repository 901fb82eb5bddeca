/*
 * loss_harness.c: checks and times the CUDA losses outside the BEAM, through
 * the backend table of priv/mambex_cuda.so. The reference is the CPU
 * backend's f64 path (c_src/cpu/loss_cpu.c, compiled in), itself checked
 * against the Elixir float64 reference by test/loss_test.exs.
 *
 *   cc -O2 -std=gnu11 -D_GNU_SOURCE -pthread -o _build/loss_harness bench/cuda/loss_harness.c \
 *      c_src/cpu/loss_cpu.c c_src/cpu/cpu_pool.c -ldl -lm
 *   _build/loss_harness priv/mambex_cuda.so [check|time|all]
 *
 * check: cross-entropy over classes 1..50257 (warp and block paths), with
 * weights, ignore_index, out-of-range targets, sum/mean, scale, f32 and bf16
 * io; MSE f32/bf16. Outputs are poisoned (NaN) before each call; results
 * must match the reference (f32: loss 1e-5, gradients 1e-4; bf16: 1e-2),
 * bad rows must be NaN, ignored rows exactly 0, and a rerun must give the
 * same bits. time: device-event medians of the bench shapes.
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
static double urand(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (double)(rng >> 11) * (1.0 / 9007199254740992.0);
}

/* v rounded to io (f32 or bf16), as a float. */
static float q(float v, int io) { return io == MX_BF16 ? mx_bf16_to_f32(mx_f32_to_bf16(v)) : v; }

static void *to_dev(const float *h, size_t n, int io) {
  size_t es = mx_dtype_size(io);
  void *buf = malloc(n * es + 1), *d;
  for (size_t i = 0; i < n; i++) {
    if (io == MX_BF16)
      ((uint16_t *)buf)[i] = mx_f32_to_bf16(h[i]);
    else
      ((float *)buf)[i] = h[i];
  }
  OK(G->alloc(0, n * es, &d, &E));
  OK(G->upload(0, d, buf, n * es, &E));
  OK(G->sync(0, &E));
  free(buf);
  return d;
}

static void from_dev(float *h, const void *d, size_t n, int io) {
  size_t es = mx_dtype_size(io);
  void *buf = malloc(n * es + 1);
  OK(G->download(0, buf, d, n * es, &E));
  for (size_t i = 0; i < n; i++)
    h[i] = io == MX_BF16 ? mx_bf16_to_f32(((uint16_t *)buf)[i]) : ((float *)buf)[i];
  free(buf);
}

static void *dev_bytes(size_t bytes) {
  void *d;
  OK(G->alloc(0, bytes, &d, &E));
  return d;
}

static void poison(void *d, size_t n, int io) {
  mx_scalar nan = {NAN, 0};
  OK(G->fill(0, io, d, n, nan, &E));
}

/* ||a - b|| / ||b|| over the entries where `use` (NULL: all). */
static double rel(const float *a, const double *b, size_t n, const unsigned char *use) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    if (use && !use[i]) continue;
    double d = (double)a[i] - b[i];
    num += d * d;
    den += b[i] * b[i];
  }
  return den == 0 ? sqrt(num) : sqrt(num / den);
}

static void check_xent(int64_t rows, int64_t C, int weights, int ignore, int bad, int mean,
                       double scale, int io) {
  size_t n = (size_t)rows * C;
  float *x = malloc(n * sizeof(float) + 4);
  double *x64 = malloc(n * sizeof(double) + 8), *g64 = malloc(n * sizeof(double) + 8);
  float *g = malloc(n * sizeof(float) + 4), *g2 = malloc(n * sizeof(float) + 4);
  int32_t *t = malloc(rows * sizeof(int32_t) + 4);
  float *w = malloc(C * sizeof(float));
  double *w64 = malloc(C * sizeof(double));
  unsigned char *kind = malloc(rows + 1), *use = malloc(n + 1);
  for (size_t i = 0; i < n; i++) {
    x[i] = q((float)(urand() * 12.0 - 6.0), io);
    x64[i] = x[i];
  }
  for (int64_t c = 0; c < C; c++) {
    w[c] = (float)(0.25 + urand() * 2.0);
    w64[c] = w[c];
  }
  for (int64_t r = 0; r < rows; r++) {
    t[r] = (int32_t)(urand() * (double)C);
    kind[r] = 0;
    if (ignore == 2 || (ignore && r % 3 == 2)) {
      t[r] = -100;
      kind[r] = 1;
    } else if (bad && r % 5 == 1) {
      t[r] = (r % 2) ? (int32_t)C : -1;
      if (r % 7 == 1) t[r] = 2147483647;
      kind[r] = 2;
    }
  }
  mx_xent_args a = {.rows = rows, .classes = C, .io = MX_F64, .param = MX_F64, .logits = x64,
                    .targets = t, .weights = weights ? w64 : NULL, .has_ignore = ignore,
                    .ignore_index = -100, .mean = mean, .scale = scale};
  double loss_ref;
  OK(cpu_cross_entropy(0, &a, &loss_ref, g64, &E));

  void *dx = to_dev(x, n, io), *dt, *dw = weights ? to_dev(w, C, MX_F32) : NULL;
  OK(G->alloc(0, rows * 4, &dt, &E));
  OK(G->upload(0, dt, t, rows * 4, &E));
  void *dl = dev_bytes(4), *dg = dev_bytes(n * mx_dtype_size(io) + 1);
  poison(dl, 1, MX_F32);
  poison(dg, n, io);
  mx_xent_args b = a;
  b.io = io;
  b.param = MX_F32;
  b.logits = dx;
  b.targets = dt;
  b.weights = dw;
  OK(G->cross_entropy(0, &b, dl, dg, &E));
  float loss, loss2, loss3;
  from_dev(&loss, dl, 1, MX_F32);
  from_dev(g, dg, n, io);
  /* rerun, and without the gradient */
  poison(dg, n, io);
  OK(G->cross_entropy(0, &b, dl, dg, &E));
  from_dev(&loss2, dl, 1, MX_F32);
  from_dev(g2, dg, n, io);
  OK(G->cross_entropy(0, &b, dl, NULL, &E));
  from_dev(&loss3, dl, 1, MX_F32);

  const double tol_l = io == MX_BF16 ? 1e-2 : 1e-5, tol_g = io == MX_BF16 ? 1e-2 : 1e-4;
  int nbad = 0, nign_bad = 0, nbad_bad = 0;
  for (int64_t r = 0; r < rows; r++) {
    nbad += kind[r] == 2;
    for (int64_t j = 0; j < C; j++) {
      size_t i = (size_t)r * C + j;
      use[i] = kind[r] == 0;
      if (kind[r] == 1 && g[i] != 0.0f) nign_bad++;
      if (kind[r] == 2 && !isnan(g[i])) nbad_bad++;
    }
  }
  double el = nbad ? (isnan(loss) ? 0.0 : INFINITY) : fabs(loss - loss_ref) / (fabs(loss_ref) + 1e-30);
  double eg = rel(g, g64, n, use);
  int same = memcmp(&loss, &loss2, 4) == 0 && memcmp(g, g2, n * sizeof(float)) == 0 &&
             memcmp(&loss, &loss3, 4) == 0;
  int ok = el <= tol_l && eg <= tol_g && nign_bad == 0 && nbad_bad == 0 && same;
  if (!ok) failures++;
  printf("%s xent rows=%ld C=%ld w=%d ign=%d bad=%d mean=%d scale=%g io=%s loss=%.7g ref=%.7g "
         "rel_loss=%.2e rel_grad=%.2e ign_nonzero=%d bad_notnan=%d rerun_same=%d\n",
         ok ? "ok  " : "FAIL", (long)rows, (long)C, weights, ignore, bad, mean, scale,
         io == MX_BF16 ? "bf16" : "f32", loss, loss_ref, el, eg, nign_bad, nbad_bad, same);
  void *ptrs[] = {dx, dt, dw, dl, dg};
  for (int i = 0; i < 5; i++)
    if (ptrs[i]) G->free_async(0, ptrs[i]);
  free(x), free(x64), free(g64), free(g), free(g2), free(t), free(w), free(w64), free(kind),
      free(use);
}

static void check_mse(size_t n, int mean, double scale, int io) {
  float *p = malloc(n * 4 + 4), *y = malloc(n * 4 + 4), *g = malloc(n * 4 + 4);
  double *p64 = malloc(n * 8 + 8), *y64 = malloc(n * 8 + 8), *g64 = malloc(n * 8 + 8);
  for (size_t i = 0; i < n; i++) {
    p[i] = q((float)(urand() * 4 - 2), io);
    y[i] = q((float)(urand() * 4 - 2), io);
    p64[i] = p[i];
    y64[i] = y[i];
  }
  double ref;
  OK(cpu_mse(0, MX_F64, MX_F64, p64, y64, n, mean, scale, &ref, g64, &E));
  void *dp = to_dev(p, n, io), *dy = to_dev(y, n, io), *dl = dev_bytes(4),
       *dg = dev_bytes(n * mx_dtype_size(io) + 1);
  poison(dl, 1, MX_F32);
  poison(dg, n, io);
  OK(G->mse(0, io, MX_F32, dp, dy, n, mean, scale, dl, dg, &E));
  float loss, loss2;
  from_dev(&loss, dl, 1, MX_F32);
  from_dev(g, dg, n, io);
  OK(G->mse(0, io, MX_F32, dp, dy, n, mean, scale, dl, NULL, &E));
  from_dev(&loss2, dl, 1, MX_F32);
  const double tol = io == MX_BF16 ? 1e-2 : 1e-5;
  double el = fabs(loss - ref) / (fabs(ref) + 1e-30), eg = rel(g, g64, n, NULL);
  int ok = el <= tol && eg <= tol && memcmp(&loss, &loss2, 4) == 0;
  if (!ok) failures++;
  printf("%s mse n=%zu mean=%d scale=%g io=%s loss=%.7g ref=%.7g rel_loss=%.2e rel_grad=%.2e\n",
         ok ? "ok  " : "FAIL", n, mean, scale, io == MX_BF16 ? "bf16" : "f32", loss, ref, el, eg);
  G->free_async(0, dp), G->free_async(0, dy), G->free_async(0, dl), G->free_async(0, dg);
  free(p), free(y), free(g), free(p64), free(y64), free(g64);
}

/* one timed cross-entropy call: call i reads input set i % sets */
typedef struct {
  const mx_xent_args *a;
  int sets;
  void *loss, *grads;
} xent_call;

static void xent_op(void *ctx, int i) {
  const xent_call *c = ctx;
  OK(G->cross_entropy(0, &c->a[i % c->sets], c->loss, c->grads, &E));
}

/* Median device time of `runs` calls; inputs rotate over `sets` copies. */
static void time_xent(int64_t rows, int64_t C, int io, int weights_ignore, int runs) {
  const int sets = 4;
  size_t n = (size_t)rows * C, es = mx_dtype_size(io);
  mx_xent_args a[4];
  void *grads, *loss = dev_bytes(4);
  OK(G->alloc(0, n * es, &grads, &E));
  int32_t *t = malloc(rows * 4);
  for (int s = 0; s < sets; s++) {
    void *x, *tt, *w;
    OK(G->alloc(0, n * es, &x, &E));
    OK(G->random(0, io, x, n, 100 + s, MX_UNIFORM, -6, 6, &E));
    for (int64_t r = 0; r < rows; r++) t[r] = (int32_t)((r * 7919 + s) % C);
    if (weights_ignore)
      for (int64_t r = 0; r < rows; r += 10) t[r] = -100;
    OK(G->alloc(0, rows * 4, &tt, &E));
    OK(G->upload(0, tt, t, rows * 4, &E));
    OK(G->alloc(0, C * 4, &w, &E));
    OK(G->random(0, MX_F32, w, C, 7, MX_UNIFORM, 0.5, 2, &E));
    mx_xent_args b = {.rows = rows, .classes = C, .io = io, .param = MX_F32, .logits = x,
                      .targets = tt, .weights = weights_ignore ? w : NULL,
                      .has_ignore = weights_ignore, .ignore_index = -100, .mean = 1, .scale = 1};
    a[s] = b;
  }
  OK(G->sync(0, &E));
  double *tm = malloc(sizeof(double) * runs);
  xent_call c = {.a = a, .sets = sets, .loss = loss, .grads = grads};
  hx_time(tm, runs, 5, 100, xent_op, &c);
  double bytes = 2.0 * n * es + 4.0 * rows, floor_us = bytes / 4.2e12 * 1e6;
  printf("xent rows=%ld C=%ld io=%s%s median %.2f us p10 %.2f p90 %.2f  floor %.2f us (%.0f%%)\n",
         (long)rows, (long)C, io == MX_BF16 ? "bf16" : "f32", weights_ignore ? " w+ign" : "",
         tm[runs / 2], tm[runs / 10], tm[runs * 9 / 10], floor_us, 100 * floor_us / tm[runs / 2]);
  for (int s = 0; s < sets; s++) {
    G->free_async(0, (void *)a[s].logits);
    G->free_async(0, (void *)a[s].targets);
  }
  G->free_async(0, grads);
  free(tm);
  free(t);
}

/* one timed MSE call: call i reads input set i % 4 */
typedef struct {
  void **p, **y;
  size_t n;
  int io;
  void *loss, *g;
} mse_call;

static void mse_op(void *ctx, int i) {
  const mse_call *c = ctx;
  int s = i % 4;
  OK(G->mse(0, c->io, MX_F32, c->p[s], c->y[s], c->n, 1, 1.0, c->loss, c->g, &E));
}

static void time_mse(size_t n, int io, int runs) {
  size_t es = mx_dtype_size(io);
  void *p[4], *y[4], *g, *loss = dev_bytes(4);
  for (int s = 0; s < 4; s++) {
    OK(G->alloc(0, n * es, &p[s], &E));
    OK(G->alloc(0, n * es, &y[s], &E));
    OK(G->random(0, io, p[s], n, 200 + s, MX_UNIFORM, -1, 1, &E));
    OK(G->random(0, io, y[s], n, 300 + s, MX_UNIFORM, -1, 1, &E));
  }
  OK(G->alloc(0, n * es, &g, &E));
  double *tm = malloc(sizeof(double) * runs);
  mse_call c = {.p = p, .y = y, .n = n, .io = io, .loss = loss, .g = g};
  hx_time(tm, runs, 5, 100, mse_op, &c);
  double floor_us = 3.0 * n * es / 4.2e12 * 1e6;
  printf("mse n=%zu io=%s median %.2f us p10 %.2f p90 %.2f  floor %.2f us (%.0f%%)\n", n,
         io == MX_BF16 ? "bf16" : "f32", tm[runs / 2], tm[runs / 10], tm[runs * 9 / 10], floor_us,
         100 * floor_us / tm[runs / 2]);
  free(tm);
}

int main(int argc, char **argv) {
  const char *path = argc > 1 ? argv[1] : "priv/mambex_cuda.so";
  const char *what = argc > 2 ? argv[2] : "all";
  G = hx_load(path, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE, NULL);
  if (!G || G->device_count(&E) < 1) {
    fprintf(stderr, "no CUDA backend or device\n");
    return 1;
  }
  if (!strcmp(what, "check") || !strcmp(what, "all")) {
    static const int64_t shapes[][2] = {{1, 1},    {5, 2},    {9, 7},     {33, 16},  {33, 33},
                                        {2000, 64}, {37, 100}, {301, 1000}, {50, 1024}, {7, 1025},
                                        {37, 3000}, {3, 50257}, {1, 5000}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
      for (int io = 0; io < 2; io++) {
        int dt = io ? MX_BF16 : MX_F32;
        int64_t R = shapes[s][0], C = shapes[s][1];
        check_xent(R, C, 0, 0, 0, 1, 1.0, dt);
        check_xent(R, C, 1, 1, 0, 1, 0.5, dt);
        check_xent(R, C, 0, 1, 0, 0, 2.0, dt);
        check_xent(R, C, 1, 0, 0, 0, 1.0, dt);
        if (R >= 5) check_xent(R, C, 1, 1, 1, 1, 1.0, dt);
        if (R >= 5) check_xent(R, C, 0, 0, 1, 1, 1.0, dt);
      }
    check_xent(2, 10, 1, 2, 0, 1, 1.0, MX_F32); /* all rows ignored */
    check_xent(4, 3000, 0, 2, 0, 0, 1.0, MX_F32);
    static const size_t ns[] = {1, 7, 1031, 3001 * 37, 15360 * 256 + 3};
    for (size_t s = 0; s < sizeof ns / sizeof ns[0]; s++)
      for (int io = 0; io < 2; io++) {
        check_mse(ns[s], 1, 1.0, io ? MX_BF16 : MX_F32);
        check_mse(ns[s], 0, 0.5, io ? MX_BF16 : MX_F32);
      }
    printf("%d failures\n", failures);
  }
  if (!strcmp(what, "time") || !strcmp(what, "all")) {
    for (int io = 0; io < 2; io++) {
      int dt = io ? MX_BF16 : MX_F32;
      time_xent(15360, 64, dt, 0, 100);
      time_xent(15360, 64, dt, 1, 100);
      time_xent(15360, 1024, dt, 0, 100);
      time_xent(256, 50257, dt, 0, 100);
      time_mse(15360 * 256, dt, 100);
    }
  }
  OK(G->sync(0, &E));
  return failures != 0;
}

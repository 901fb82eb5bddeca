/*
 * selftest.c: a GPU-machine check of priv/mambex_cuda.so against the CPU
 * backend (c_src/cpu/cpu_backend.c), outside the BEAM. Every op of the table
 * runs on both backends on the same inputs; results are compared bit for bit
 * where the two backends promise the same bits, else by relative error.
 * Then host copies, determinism, a few timings, concurrency and the error
 * paths (out of memory, bad arguments, a lost device: that one runs last).
 *
 *   gcc -O2 -std=gnu11 -D_GNU_SOURCE -ffp-contract=off -o selftest c_src/cuda/test/selftest.c \
 *       c_src/cpu/*.c -ldl -lm -lpthread
 *   ./selftest priv/mambex_cuda.so [--quick] [--only=reduce,permute,...]
 */
#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../../core/backend.h"
#include "../../core/numeric.h"

static const mx_backend *G, *C;

/* A scalar operand for both backends: float value and exact integer. */
static mx_scalar S(double v) {
  mx_scalar r = {v, (int64_t)v};
  return r;
}
static mx_err E;
static int failures, quick;

#define CHECK_OK(call)                                                              \
  do {                                                                              \
    int rc_ = (call);                                                               \
    if (rc_ != MX_OK) {                                                             \
      printf("FAIL %s:%d %s -> %d (%s)\n", __FILE__, __LINE__, #call, rc_, E.msg); \
      exit(1);                                                                      \
    }                                                                               \
  } while (0)

static double ld(int dt, const void *p, size_t i) {
  switch (dt) {
    case MX_F32: return ((const float *)p)[i];
    case MX_F64: return ((const double *)p)[i];
    case MX_BF16: return mx_bf16_to_f32(((const uint16_t *)p)[i]);
    case MX_F16: return mx_f16_to_f32(((const uint16_t *)p)[i]);
    case MX_S32: return ((const int32_t *)p)[i];
    case MX_S64: return (double)((const int64_t *)p)[i];
    default: return ((const uint8_t *)p)[i];
  }
}

static const char *dtn(int dt) {
  static const char *n[] = {"f32", "f64", "bf16", "f16", "s32", "s64", "u8"};
  return n[dt];
}

static void *gpu_put(const void *h, size_t bytes) {
  void *d;
  CHECK_OK(G->alloc(0, bytes, &d, &E));
  CHECK_OK(G->upload(0, d, h, bytes, &E));
  return d;
}

static void *gpu_get(const void *d, size_t bytes) {
  void *h = malloc(bytes ? bytes : 1);
  CHECK_OK(G->download(0, h, d, bytes, &E));
  return h;
}

/* tol 0: bit-identical (any NaN equals any NaN); else ||a-b|| / ||a|| <= tol. */
static void compare(const char *what, int dt, const void *cpu, const void *gpu, size_t n,
                    double tol) {
  size_t es = mx_dtype_size(dt), bad = 0, first = (size_t)-1;
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    double a = ld(dt, cpu, i), b = ld(dt, gpu, i);
    int same = memcmp((const char *)cpu + i * es, (const char *)gpu + i * es, es) == 0 ||
               (a != a && b != b);
    if (!same) {
      if (first == (size_t)-1) first = i;
      bad++;
    }
    if (a == a && b == b && !isinf(a) && !isinf(b)) {
      num += (a - b) * (a - b);
      den += a * a;
    }
  }
  double rel = den > 0 ? sqrt(num / den) : sqrt(num);
  int ok = tol == 0 ? bad == 0 : rel <= tol;
  if (!ok || bad) {
    printf("%s %s %s: %zu/%zu differ, rel %.3g", ok ? "note" : "FAIL", what, dtn(dt), bad, n,
           rel);
    if (first != (size_t)-1)
      printf(" (first at %zu: cpu %.17g gpu %.17g)", first, ld(dt, cpu, first),
             ld(dt, gpu, first));
    printf("\n");
  }
  if (!ok) failures++;
}

/* Host input of dtype dt: random from the CPU backend, with a few specials. */
static void *make_input(int dt, size_t n, uint64_t seed, int positive, int specials) {
  void *h = malloc(n * mx_dtype_size(dt) + 16);
  if (mx_dtype_is_float(dt)) {
    if (positive) CHECK_OK(C->random(0, dt, h, n, seed, MX_UNIFORM, 0.05, 20.0, &E));
    else CHECK_OK(C->random(0, dt, h, n, seed, MX_NORMAL, 0.0, 3.0, &E));
    if (specials && n > 8) {
      double sp[] = {NAN, -0.0, 0.0, INFINITY, -INFINITY, 1e-42, -1e30};
      for (int k = 0; k < 7; k++) CHECK_OK(C->fill(0, dt, (char *)h + (k * 7 % n) * mx_dtype_size(dt), 1, S(sp[k]), &E));
    }
  } else {
    double lo = dt == MX_U8 ? 0 : -6, hi = dt == MX_U8 ? 256 : 6;
    if (!positive && dt != MX_U8 && seed % 2) { lo = -3e9; hi = 3e9; }
    CHECK_OK(C->random(0, dt, h, n, seed, MX_UNIFORM, lo, hi, &E));
    if (specials && n > 8 && dt == MX_S64) {
      ((int64_t *)h)[1] = INT64_MIN;
      ((int64_t *)h)[2] = -1;
      ((int64_t *)h)[3] = INT64_MAX;
    }
  }
  return h;
}

/* ------------------------------------------------------------------------ */

static void test_creation(void) {
  size_t ns[] = {1, 7, 1000003};
  double vals[] = {0.0, -0.0, 1.5, -2.7, 3e9, -1e300, NAN, 65504.9, 300.0};
  for (int dt = 0; dt < MX_NUM_DTYPES; dt++) {
    size_t es = mx_dtype_size(dt);
    for (int t = 0; t < 3; t++) {
      size_t n = ns[t];
      void *hc = malloc(n * es), *d;
      CHECK_OK(G->alloc(0, n * es, &d, &E));
      for (int v = 0; v < 9; v++) {
        CHECK_OK(C->fill(0, dt, hc, n, S(vals[v]), &E));
        CHECK_OK(G->fill(0, dt, d, n, S(vals[v]), &E));
        void *hg = gpu_get(d, n * es);
        compare("fill", dt, hc, hg, n, 0);
        free(hg);
      }
      size_t shapes[][3] = {{1, n, 1}, {n, 1, 1}, {1, 1, n}};
      for (int s = 0; s < 3; s++) {
        CHECK_OK(C->iota(0, dt, hc, shapes[s][0], shapes[s][1], shapes[s][2], &E));
        CHECK_OK(G->iota(0, dt, d, shapes[s][0], shapes[s][1], shapes[s][2], &E));
        void *hg = gpu_get(d, n * es);
        compare("iota", dt, hc, hg, n, 0);
        free(hg);
      }
      if (n == 1000003) {
        CHECK_OK(C->iota(0, dt, hc, 7, 1013, 141, &E));
        CHECK_OK(G->iota(0, dt, d, 7, 1013, 141, &E));
        void *hg = gpu_get(d, n * es);
        compare("iota3", dt, hc, hg, n, 0);
        free(hg);
      }
      for (int dist = 0; dist < 2; dist++) {
        double a = dist ? 1.0 : -5.0, b = dist ? 2.5 : 7.0;
        CHECK_OK(C->random(0, dt, hc, n, 12345 + t, dist, a, b, &E));
        CHECK_OK(G->random(0, dt, d, n, 12345 + t, dist, a, b, &E));
        void *hg = gpu_get(d, n * es);
        /* normal goes through libm vs CUDA log/cos: a last-ulp difference in
         * double may survive in f64 (and rarely flip a float rounding). */
        compare(dist ? "random-normal" : "random-uniform", dt, hc, hg, n,
                dist && mx_dtype_is_float(dt) ? 1e-6 : 0);
        free(hg);
      }
      G->free_async(0, d);
      free(hc);
    }
  }
}

static void test_cast(void) {
  size_t n = 100003;
  for (int s = 0; s < MX_NUM_DTYPES; s++) {
    void *hx = make_input(s, n, 77 + s, 0, 1);
    if (mx_dtype_is_float(s)) /* scale up so that integer destinations wrap */
      CHECK_OK(C->binary(0, MX_MUL, s, hx, NULL, S(100.0), MX_B_SCALAR, n, 0, hx, &E));
    void *dx = gpu_put(hx, n * mx_dtype_size(s));
    for (int t = 0; t < MX_NUM_DTYPES; t++) {
      size_t es = mx_dtype_size(t);
      void *hc = malloc(n * es), *dy;
      CHECK_OK(G->alloc(0, n * es, &dy, &E));
      CHECK_OK(C->cast(0, s, hx, t, hc, n, &E));
      CHECK_OK(G->cast(0, s, dx, t, dy, n, &E));
      void *hg = gpu_get(dy, n * es);
      char what[64];
      snprintf(what, sizeof what, "cast %s->", dtn(s));
      compare(what, t, hc, hg, n, 0);
      free(hg);
      free(hc);
      G->free_async(0, dy);
    }
    G->free_async(0, dx);
    free(hx);
  }
}

static void test_unary_binary_axpy(void) {
  size_t ns[] = {1, 5, 4099, 1000003};
  static const char *un[] = {"neg", "exp", "log", "sqrt"};
  static const char *bn[] = {"add", "sub", "mul", "div", "rsub", "rdiv", "max", "min"};
  for (int dt = 0; dt < MX_NUM_DTYPES; dt++) {
    size_t es = mx_dtype_size(dt);
    for (int t = 0; t < 4; t++) {
      size_t n = ns[t];
      void *ha = make_input(dt, n + 1, 1000 + t, 0, 1);
      void *hp = make_input(dt, n + 1, 2000 + t, 1, 0);
      void *hb = make_input(dt, n + 1, 3000 + t, 0, 1);
      void *da = gpu_put(ha, (n + 1) * es), *dp = gpu_put(hp, (n + 1) * es);
      void *db = gpu_put(hb, (n + 1) * es);
      void *hc = malloc((n + 1) * es), *dy;
      CHECK_OK(G->alloc(0, (n + 1) * es, &dy, &E));
      for (int off = 0; off < 2; off++) { /* off 1: misaligned pointers, scalar path */
        const char *oa = (const char *)da + off * es, *ob = (const char *)db + off * es;
        const char *ha1 = (const char *)ha + off * es, *hb1 = (const char *)hb + off * es;
        for (int op = 0; op < 4; op++) {
          if (op && !mx_dtype_is_float(dt)) continue;
          const void *hx = op >= MX_LOG ? (const char *)hp + off * es : ha1;
          const void *dx = op >= MX_LOG ? (const char *)dp + off * es : oa;
          CHECK_OK(C->unary(0, op, dt, hx, hc, n, &E));
          CHECK_OK(G->unary(0, op, dt, dx, dy, n, &E));
          void *hg = gpu_get(dy, n * es);
          char what[64];
          snprintf(what, sizeof what, "unary %s n=%zu", un[op], n);
          compare(what, dt, hc, hg, n, op == MX_EXP || op == MX_LOG ? 1e-6 : 0);
          free(hg);
        }
        for (int op = 0; op < 8; op++) {
          for (int mode = 0; mode < 3; mode++) {
            size_t bnn = mode == MX_B_TRAILING ? (n % 7 == 0 ? 7 : n) : n;
            if (mode == MX_B_TRAILING && n == 4099) bnn = 4099;
            if (mode == MX_B_TRAILING && n == 1000003) bnn = 1000003; /* prime */
            double sc = dt == MX_U8 ? 3.0 : -2.5;
            CHECK_OK(C->binary(0, op, dt, ha1, mode == MX_B_SCALAR ? NULL : hb1, S(sc), mode, n, bnn,
                               hc, &E));
            CHECK_OK(G->binary(0, op, dt, oa, mode == MX_B_SCALAR ? NULL : ob, S(sc), mode, n, bnn,
                               dy, &E));
            void *hg = gpu_get(dy, n * es);
            char what[64];
            snprintf(what, sizeof what, "binary %s mode %d n=%zu off %d", bn[op], mode, n, off);
            compare(what, dt, hc, hg, n, 0);
            free(hg);
          }
        }
        /* trailing with a real broadcast: rows of 64 */
        if (n == 1000003 && off == 0) {
          size_t rows = 15625, bnn = 64, m = rows * bnn;
          CHECK_OK(C->binary(0, MX_SUB, dt, ha, hb, S(0), MX_B_TRAILING, m, bnn, hc, &E));
          CHECK_OK(G->binary(0, MX_SUB, dt, da, db, S(0), MX_B_TRAILING, m, bnn, dy, &E));
          void *hg = gpu_get(dy, m * es);
          compare("binary trailing 64", dt, hc, hg, m, 0);
          free(hg);
        }
        CHECK_OK(C->axpy(0, dt, S(-1.75), ha1, hb1, hc, n, &E));
        CHECK_OK(G->axpy(0, dt, S(-1.75), oa, ob, dy, n, &E));
        void *hg = gpu_get(dy, n * es);
        char what[64];
        snprintf(what, sizeof what, "axpy n=%zu off %d", n, off);
        compare(what, dt, hc, hg, n, 0);
        free(hg);
      }
      G->free_async(0, da);
      G->free_async(0, dp);
      G->free_async(0, db);
      G->free_async(0, dy);
      free(ha), free(hp), free(hb), free(hc);
    }
  }
}

static void test_reduce(void) {
  size_t shapes[][3] = {{1, 1, 1},      {3, 1, 5},        {7, 5, 1},      {5, 100, 1},
                        {2, 1000, 1},   {1, 3000, 1},     {1, 1048583, 1}, {1, 100000, 3},
                        {4, 777, 33},   {1, 5000, 64},    {100, 7, 1000},  {2, 2, 65536},
                        {3, 40000, 2},  {1000, 31, 1},    {1, 65536, 1},   {2, 200003, 40}};
  static const char *rn[] = {"sum", "mean", "max"};
  for (int dt = 0; dt < MX_NUM_DTYPES; dt++) {
    size_t es = mx_dtype_size(dt);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
      size_t o = shapes[s][0], dim = shapes[s][1], in = shapes[s][2], n = o * dim * in;
      void *hx = make_input(dt, n, 500 + s, 0, dt != MX_F32 || s % 2);
      void *dx = gpu_put(hx, n * es);
      void *hc = malloc(o * in * es), *dy;
      CHECK_OK(G->alloc(0, o * in * es, &dy, &E));
      for (int op = 0; op < 3; op++) {
        CHECK_OK(C->reduce(0, op, dt, hx, hc, o, dim, in, &E));
        CHECK_OK(G->reduce(0, op, dt, dx, dy, o, dim, in, &E));
        void *hg = gpu_get(dy, o * in * es);
        char what[96];
        snprintf(what, sizeof what, "reduce %s (%zu,%zu,%zu)", rn[op], o, dim, in);
        if (op != MX_RMAX && mx_dtype_is_float(dt)) {
          /* float sums: both against a float64 reference (orders differ) */
          double tol = dt == MX_F64 ? 1e-13 : dt == MX_F32 ? 1e-6 : 1e-2;
          double num_g = 0, num_c = 0, den = 0;
          for (size_t a = 0; a < o; a++)
            for (size_t j = 0; j < in; j++) {
              double ref = 0;
              for (size_t k = 0; k < dim; k++) ref += ld(dt, hx, (a * dim + k) * in + j);
              if (op == MX_MEAN) ref /= (double)dim;
              double g = ld(dt, hg, a * in + j), c = ld(dt, hc, a * in + j);
              num_g += (g - ref) * (g - ref);
              num_c += (c - ref) * (c - ref);
              den += ref * ref;
            }
          double eg = sqrt(num_g / den), ec = sqrt(num_c / den);
          if (eg > tol || eg > 2 * ec + 1e-7) {
            printf("%s %s %s: rel err gpu %.3g cpu %.3g\n", eg > tol ? "FAIL" : "note", what,
                   dtn(dt), eg, ec);
            if (eg > tol) failures++;
          }
        } else {
          compare(what, dt, hc, hg, o * in, 0);
        }
        /* run to run: the same bits again */
        CHECK_OK(G->reduce(0, op, dt, dx, dy, o, dim, in, &E));
        void *hg2 = gpu_get(dy, o * in * es);
        if (memcmp(hg, hg2, o * in * es)) {
          printf("FAIL %s %s not deterministic\n", what, dtn(dt));
          failures++;
        }
        free(hg), free(hg2);
      }
      G->free_async(0, dx);
      G->free_async(0, dy);
      free(hx), free(hc);
    }
  }
}

static void test_permute(void) {
  struct { int rank; int64_t shape[8]; int perm[8]; } cases[] = {
      {0, {0}, {0}},
      {1, {17}, {0}},
      {2, {33, 65}, {1, 0}},
      {3, {2, 3, 4}, {2, 0, 1}},
      {4, {5, 1, 7, 3}, {3, 1, 0, 2}},
      {3, {64, 33, 8}, {1, 0, 2}},
      {3, {64, 128, 256}, {1, 0, 2}},
      {3, {64, 128, 256}, {0, 2, 1}},
      {3, {3, 5, 7}, {0, 1, 2}},
      {8, {2, 3, 2, 3, 2, 3, 2, 3}, {7, 6, 5, 4, 3, 2, 1, 0}},
      {8, {2, 3, 2, 3, 2, 3, 2, 3}, {0, 2, 1, 3, 5, 4, 6, 7}},
      {4, {4, 6, 10, 12}, {2, 3, 0, 1}},
      {2, {1024, 1023}, {1, 0}},
      {3, {3, 50, 70}, {0, 2, 1}},
      {4, {5, 17, 3, 33}, {3, 0, 2, 1}},
      {3, {20, 1, 40}, {2, 1, 0}},
      {5, {2, 16, 3, 16, 5}, {4, 1, 3, 0, 2}},
  };
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
    int64_t n = 1;
    for (int k = 0; k < cases[c].rank; k++) n *= cases[c].shape[k];
    for (size_t es = 1; es <= 8; es *= 2) {
      unsigned char *hx = malloc(n * es), *hc = malloc(n * es);
      for (int64_t i = 0; i < n * (int64_t)es; i++) hx[i] = (unsigned char)(i * 131 + i / 7);
      void *dx = gpu_put(hx, n * es), *dy;
      CHECK_OK(G->alloc(0, n * es, &dy, &E));
      CHECK_OK(C->permute(0, es, hx, hc, cases[c].rank, cases[c].shape, cases[c].perm, &E));
      CHECK_OK(G->permute(0, es, dx, dy, cases[c].rank, cases[c].shape, cases[c].perm, &E));
      unsigned char *hg = gpu_get(dy, n * es);
      if (memcmp(hc, hg, n * es)) {
        printf("FAIL permute case %zu elsize %zu\n", c, es);
        failures++;
      }
      free(hg), free(hx), free(hc);
      G->free_async(0, dx);
      G->free_async(0, dy);
    }
  }
}

static void test_copies(void) {
  size_t sizes[] = {0, 1, 3, 65535, 65536, 65537, (32u << 20) - 1, 32u << 20, (32u << 20) + 1,
                    (100u << 20) + 12345};
  for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
    size_t n = sizes[s];
    unsigned char *h = malloc(n + 1), *back;
    for (size_t i = 0; i < n; i++) h[i] = (unsigned char)(i * 2654435761u >> 13);
    void *d = gpu_put(h, n);
    back = gpu_get(d, n);
    if (n && memcmp(h, back, n)) {
      printf("FAIL upload/download %zu bytes\n", n);
      failures++;
    }
    free(back);
    G->free_async(0, d);
    free(h);
  }
  /* many small uploads in a row, then one download each (ring reuse) */
  {
    enum { K = 100, M = 1000 };
    void *d[K];
    float buf[M];
    for (int k = 0; k < K; k++) {
      for (int i = 0; i < M; i++) buf[i] = (float)(k * M + i);
      d[k] = gpu_put(buf, sizeof buf); /* buf is rewritten at once: upload must be done reading */
    }
    for (int k = 0; k < K; k++) {
      float *b = gpu_get(d[k], sizeof buf);
      for (int i = 0; i < M; i++)
        if (b[i] != (float)(k * M + i)) {
          printf("FAIL small upload ring %d %d\n", k, i);
          failures++;
          break;
        }
      free(b);
      G->free_async(0, d[k]);
    }
  }
  /* copy2d: a column block of a (rows, 100)-byte matrix */
  {
    size_t rows = 1000, w = 37, sp = 100, dp = 40;
    unsigned char *h = malloc(rows * sp), *hd = calloc(rows, dp), *hg;
    for (size_t i = 0; i < rows * sp; i++) h[i] = (unsigned char)(i * 7);
    void *ds = gpu_put(h, rows * sp), *dd = gpu_put(hd, rows * dp);
    CHECK_OK(G->copy2d(0, dd, dp, (char *)ds + 11, sp, w, rows, &E));
    CHECK_OK(C->copy2d(0, hd, dp, h + 11, sp, w, rows, &E));
    hg = gpu_get(dd, rows * dp);
    if (memcmp(hg, hd, rows * dp)) {
      printf("FAIL copy2d\n");
      failures++;
    }
    free(h), free(hd), free(hg);
    G->free_async(0, ds);
    G->free_async(0, dd);
  }
  /* 0-byte alloc gives distinct pointers */
  void *z1, *z2;
  CHECK_OK(G->alloc(0, 0, &z1, &E));
  CHECK_OK(G->alloc(0, 0, &z2, &E));
  if (!z1 || !z2 || z1 == z2) {
    printf("FAIL alloc(0)\n");
    failures++;
  }
  G->free_async(0, z1);
  G->free_async(0, z2);
}

/* ------------------------------------------------------------------------ */

typedef struct { int id; int bad; } worker;

static void *work(void *arg) {
  worker *w = arg;
  mx_err e;
  size_t n = 100000 + w->id * 17;
  float *h = malloc(n * 4);
  for (int it = 0; it < 50; it++) {
    for (size_t i = 0; i < n; i++) h[i] = (float)(i % 1000) + it;
    void *d = NULL, *o = NULL;
    if (G->alloc(0, n * 4, &d, &e) || G->alloc(0, n * 4, &o, &e) ||
        G->upload(0, d, h, n * 4, &e) ||
        G->binary(0, MX_ADD, MX_F32, d, NULL, S(w->id), MX_B_SCALAR, n, 0, o, &e) ||
        G->download(0, h, o, n * 4, &e)) {
      printf("FAIL worker %d: %s\n", w->id, e.msg);
      w->bad++;
      break;
    }
    for (size_t i = 0; i < n; i++)
      if (h[i] != (float)(i % 1000) + it + w->id) {
        w->bad++;
        break;
      }
    G->free_async(0, d);
    G->free_async(0, o);
  }
  free(h);
  return NULL;
}

static void test_threads(void) {
  enum { T = 8 };
  pthread_t th[T];
  worker w[T];
  for (int i = 0; i < T; i++) {
    w[i].id = i;
    w[i].bad = 0;
    pthread_create(&th[i], NULL, work, &w[i]);
  }
  for (int i = 0; i < T; i++) {
    pthread_join(th[i], NULL);
    if (w[i].bad) {
      printf("FAIL thread %d\n", i);
      failures++;
    }
  }
}

/* ------------------------------------------------------------------------ */

static double time_us(void (*fn)(void *), void *arg, int reps) {
  double best[64], us;
  if (reps > 64) reps = 64;
  fn(arg);
  for (int r = 0; r < reps; r++) {
    void *a, *b;
    CHECK_OK(G->event_record(0, &a, &E));
    fn(arg);
    CHECK_OK(G->event_record(0, &b, &E));
    CHECK_OK(G->event_elapsed(0, a, b, &us, &E));
    G->event_destroy(0, a);
    G->event_destroy(0, b);
    best[r] = us;
  }
  for (int i = 1; i < reps; i++) /* sort for the median */
    for (int j = i; j > 0 && best[j] < best[j - 1]; j--) {
      double t = best[j]; best[j] = best[j - 1]; best[j - 1] = t;
    }
  return best[reps / 2];
}

static void *B0, *B1, *B2;
static size_t BN;
static void run_add(void *p) { (void)p; CHECK_OK(G->binary(0, MX_ADD, MX_F32, B0, B1, S(0), 0, BN, 0, B2, &E)); }
static void run_axpy(void *p) { (void)p; CHECK_OK(G->axpy(0, MX_F32, S(0.5), B0, B1, B2, BN, &E)); }
static void run_copy(void *p) { (void)p; CHECK_OK(G->cast(0, MX_F32, B0, MX_F32, B2, BN, &E)); }
static void run_scale(void *p) { (void)p; CHECK_OK(G->binary(0, MX_MUL, MX_F32, B0, NULL, S(3), 1, BN, 0, B2, &E)); }
static void run_fill(void *p) { (void)p; CHECK_OK(G->fill(0, MX_F32, B2, BN, S(1.0), &E)); }
static void run_sum(void *p) { (void)p; CHECK_OK(G->reduce(0, MX_SUM, MX_F32, B0, B2, 1, BN, 1, &E)); }
static void run_rowsum(void *p) { (void)p; CHECK_OK(G->reduce(0, MX_SUM, MX_F32, B0, B2, BN / 512, 512, 1, &E)); }
static void run_colsum(void *p) { (void)p; CHECK_OK(G->reduce(0, MX_SUM, MX_F32, B0, B2, 1, BN / 512, 512, &E)); }
static void run_trans(void *p) {
  (void)p;
  int64_t shape[2] = {8192, 8192};
  int perm[2] = {1, 0};
  CHECK_OK(G->permute(0, 4, B0, B2, 2, shape, perm, &E));
}
static void run_blc(void *p) {
  (void)p;
  int64_t shape[3] = {256, 1024, 256};
  int perm[3] = {1, 0, 2};
  CHECK_OK(G->permute(0, 4, B0, B2, 3, shape, perm, &E));
}
static void run_bf16cast(void *p) { (void)p; CHECK_OK(G->cast(0, MX_F32, B0, MX_BF16, B2, BN, &E)); }
static void run_trailing(void *p) { (void)p; CHECK_OK(G->binary(0, MX_ADD, MX_F32, B0, B1, S(0), MX_B_TRAILING, BN, 512, B2, &E)); }
static void run_bf16add(void *p) { (void)p; CHECK_OK(G->binary(0, MX_ADD, MX_BF16, B0, B1, S(0), 0, BN, 0, B2, &E)); }
static void run_exp(void *p) { (void)p; CHECK_OK(G->unary(0, MX_EXP, MX_F32, B0, B2, BN, &E)); }
static void run_random(void *p) { (void)p; CHECK_OK(G->random(0, MX_F32, B2, BN, 9, MX_NORMAL, 0, 1, &E)); }

static void test_timing(void) {
  BN = (size_t)64 << 20;
  size_t bytes = BN * 4;
  CHECK_OK(G->alloc(0, bytes, &B0, &E));
  CHECK_OK(G->alloc(0, bytes, &B1, &E));
  CHECK_OK(G->alloc(0, bytes, &B2, &E));
  CHECK_OK(G->random(0, MX_F32, B0, BN, 1, MX_NORMAL, 0, 1, &E));
  CHECK_OK(G->random(0, MX_F32, B1, BN, 2, MX_NORMAL, 0, 1, &E));
  struct { const char *name; void (*fn)(void *); double bytes; } t[] = {
      {"copy 64M f32 (cudaMemcpyAsync)", run_copy, 2.0 * bytes},
      {"add 64M f32", run_add, 3.0 * bytes},
      {"axpy 64M f32", run_axpy, 3.0 * bytes},
      {"mul scalar 64M f32", run_scale, 2.0 * bytes},
      {"fill 64M f32", run_fill, 1.0 * bytes},
      {"sum all 64M f32", run_sum, 1.0 * bytes},
      {"sum rows (131072, 512)", run_rowsum, 1.0 * bytes},
      {"sum cols (131072, 512) over dim", run_colsum, 1.0 * bytes},
      {"transpose 8192x8192 f32", run_trans, 2.0 * bytes},
      {"permute (256,1024,256)->(1024,256,256)", run_blc, 2.0 * bytes},
      {"cast f32->bf16 64M", run_bf16cast, 1.5 * bytes},
      {"add trailing (131072, 512) + (512)", run_trailing, 2.0 * bytes},
      {"add 64M bf16", run_bf16add, 1.5 * bytes},
      {"exp 64M f32", run_exp, 2.0 * bytes},
      {"random normal 64M f32", run_random, 1.0 * bytes},
  };
  for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
    double us = time_us(t[i].fn, NULL, 20);
    printf("time %-42s %9.1f us  %7.0f GB/s\n", t[i].name, us, t[i].bytes / us / 1e3);
  }
  /* host copies, wall clock */
  {
    size_t hb = (size_t)256 << 20;
    char *h = malloc(hb);
    memset(h, 1, hb);
    struct timespec a, b;
    CHECK_OK(G->sync(0, &E));
    for (int dir = 0; dir < 2; dir++) {
      printf("time %-42s", dir ? "download 256 MiB, GB/s" : "upload 256 MiB, GB/s");
      for (int r = 0; r < 5; r++) {
        clock_gettime(CLOCK_MONOTONIC, &a);
        if (dir == 0) CHECK_OK(G->upload(0, B0, h, hb, &E));
        else CHECK_OK(G->download(0, h, B0, hb, &E));
        CHECK_OK(G->sync(0, &E));
        clock_gettime(CLOCK_MONOTONIC, &b);
        double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9;
        printf(" %5.1f", hb / s / 1e9);
      }
      printf("\n");
    }
    free(h);
  }
  G->free_async(0, B0);
  G->free_async(0, B1);
  G->free_async(0, B2);
}

/* ------------------------------------------------------------------------ */

static void test_errors(void) {
  void *p;
  int rc = G->alloc(0, (size_t)1 << 50, &p, &E);
  printf("alloc 1 PiB -> %d: %s\n", rc, E.msg);
  if (rc != MX_E_OOM) failures++;
  rc = G->alloc(0, 1000, &p, &E); /* still fine afterwards */
  if (rc != MX_OK) failures++;
  float one = 1;
  rc = G->fill(0, MX_F32, p, 10, S(2.0), &E);
  rc |= G->download(0, &one, p, 4, &E);
  if (rc != MX_OK || one != 2.0f) {
    printf("FAIL after OOM: %d %s\n", rc, E.msg);
    failures++;
  }
  G->free_async(0, p);
  rc = G->fill(99, MX_F32, p, 10, S(2.0), &E);
  printf("fill on device 99 -> %d: %s\n", rc, E.msg);
  if (rc != MX_E_ARG) failures++;
  rc = G->unary(0, MX_EXP, MX_S32, p, p, 10, &E);
  printf("exp on s32 -> %d: %s\n", rc, E.msg);
  if (rc != MX_E_ARG) failures++;
  rc = G->fill(0, 42, p, 10, S(2.0), &E);
  if (rc != MX_E_ARG) failures++;

  /* a lost device: a kernel reading a bad address */
  void *q;
  CHECK_OK(G->alloc(0, 4096, &q, &E));
  rc = G->binary(0, MX_ADD, MX_F32, (void *)(uintptr_t)0x1000, q, S(0), 0, 1000, 0, q, &E);
  printf("enqueue bad kernel -> %d\n", rc);
  rc = G->sync(0, &E);
  printf("sync -> %d: %s\n", rc, E.msg);
  if (rc != MX_E_LOST) failures++;
  rc = G->fill(0, MX_F32, q, 10, S(1.0), &E);
  printf("fill after -> %d: %s\n", rc, E.msg);
  if (rc != MX_E_LOST) failures++;
  G->free_async(0, q);
  rc = G->download(0, &one, q, 4, &E);
  if (rc != MX_E_LOST) failures++;
  printf("device_count still %d\n", G->device_count(&E));
}

int main(int argc, char **argv) {
  const char *path = argc > 1 ? argv[1] : "priv/mambex_cuda.so";
  const char *only = NULL;
  for (int i = 2; i < argc; i++) {
    if (!strcmp(argv[i], "--quick")) quick = 1;
    if (!strncmp(argv[i], "--only=", 7)) only = argv[i] + 7;
  }
  void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
  if (!h) {
    printf("dlopen: %s\n", dlerror());
    return 1;
  }
  mx_backend_get_fn get = (mx_backend_get_fn)dlsym(h, "mx_cuda_backend_get");
  if (!get || get(MX_BACKEND_ABI + 1) != NULL) return 1;
  G = get(MX_BACKEND_ABI);
  C = mx_cpu_backend();
  int n = G->device_count(&E);
  char name[128] = "";
  if (n > 0) CHECK_OK(G->device_name(0, name, sizeof name, &E));
  printf("devices %d: %s\n", n, name);
  if (n == 0) return 1;
#define RUN(name)                                                   \
  if (!only || strstr(only, #name)) {                               \
    test_##name();                                                  \
    printf(#name " done, failures %d\n", failures);                 \
  }
  RUN(copies);
  RUN(creation);
  RUN(cast);
  RUN(unary_binary_axpy);
  RUN(reduce);
  RUN(permute);
  RUN(threads);
  if (!quick) RUN(timing);
  if (only) return failures != 0; /* the lost-device test only in full runs */
  test_errors();
  printf("%s: %d failures\n", failures ? "FAILED" : "PASSED", failures);
  return failures != 0;
}

/*
 * linear_nif.c: the linear-layer NIFs (Mambex.Linear), on the backends'
 * gemm and sum_rows (backend.h, mx_gemm_args).
 *
 *   linear_forward(x, w, bias | nil, precision) -> y
 *       x (..., K), w (K, N), bias (N); y (..., N) = x w + bias
 *   linear_backward(x, w, dy, bias :: boolean, input_grad :: boolean, precision,
 *                   into_w | nil, into_bias | nil, into_x | nil)
 *       -> %{w: dw, [x: dx], [bias: db]}
 *       dy (..., N); dx = dy w^T (x's shape, when input_grad), dw = x^T dy
 *       with x flattened to (rows, K), db = column sums of dy (when bias).
 *       With into_w (and into_bias when bias), dw and db are ADDED to those
 *       tensors in place (gemm beta = 1, sum_rows accumulate = 1) and the
 *       map holds them; with into_x (x's shape, input_grad true), likewise
 *       dx, independently of into_w (e.g. two branches' input gradients
 *       summed without an add).
 *   matmul(a, b, transpose_a, transpose_b, alpha, beta, into | nil, precision) -> c
 *       c (m, n) = alpha op(a) op(b) [+ beta into, written into `into`]
 *       a, b rank 2; op(a) = a^T when transpose_a (likewise b).
 *
 * Types: every tensor of a call has one type: {:f, 32} or {:f, 64} on the
 * CPU, {:f, 32} or {:bf, 16} on CUDA. precision is :fp32 or :tf32 (TF32
 * tensor cores on CUDA for f32; the CPU ignores it).
 *
 * Invariants (those of mambex_nif.c): every argument is checked here, before
 * anything is allocated or any backend is called, and every failure raises
 * ArgumentError naming the op and the argument; storage references taken are
 * released on every path; the op moves to a dirty scheduler (CPU for host
 * work above MX_INLINE_BYTES of estimated work, IO for CUDA enqueues) before
 * allocating and is parsed again there. `into` tensors may not share memory
 * with an input of the call (the product would read what it writes). Empty
 * sizes are fine: K = 0 gives y = bias (or 0) and dw = 0; rows = 0 gives
 * dw = 0 and db = 0 (or leaves the `into` tensors as they were).
 */
#include <string.h>

#include "nif_common.h"

#define LIN_MAX_ARGS 6

typedef struct {
  mx_tensor *t[LIN_MAX_ARGS];
  mx_storage *s[LIN_MAX_ARGS];
} lin_call;

static void lin_release(lin_call *c) {
  for (int i = 0; i < LIN_MAX_ARGS; i++) {
    mx_storage_release(c->s[i]);
    c->s[i] = NULL;
  }
}

static void *lin_ptr(const lin_call *c, int i) {
  return c->t[i] ? mx_data(c->s[i], c->t[i]) : NULL;
}

/* Raise ArgumentError after releasing the call's storages. */
#define LIN_FAIL(...)                        \
  do {                                       \
    lin_release(c);                          \
    *ok = 0;                                 \
    return raise_arg(env, op, __VA_ARGS__);  \
  } while (0)

/* Decodes tensor argument `term` into slot i (nil allowed when optional). */
static ERL_NIF_TERM lin_get(ErlNifEnv *env, const char *op, lin_call *c, int i, ERL_NIF_TERM term,
                            const char *name, int optional, int *ok) {
  *ok = 1;
  if (optional && enif_is_identical(term, A_NIL)) return 0;
  if (!get_tensor_any(env, term, &c->t[i])) {
    c->t[i] = NULL;
    LIN_FAIL("%s must be a Mambex.Tensor%s, got: %.200T", name, optional ? " or nil" : "", term);
  }
  c->s[i] = mx_tensor_acquire(c->t[i]);
  if (!c->s[i]) {
    c->t[i] = NULL;
    LIN_FAIL("%s was freed and cannot be used", name);
  }
  return 0;
}

static int get_bool(ERL_NIF_TERM term, int *out) {
  if (enif_is_identical(term, A_TRUE)) *out = 1;
  else if (enif_is_identical(term, A_FALSE)) *out = 0;
  else return 0;
  return 1;
}

static int get_precision(ErlNifEnv *env, ERL_NIF_TERM term, int *out) {
  if (enif_is_identical(term, enif_make_atom(env, "fp32"))) *out = MX_PREC_FP32;
  else if (enif_is_identical(term, enif_make_atom(env, "tf32"))) *out = MX_PREC_TF32;
  else return 0;
  return 1;
}

/* One device and one supported type for the given tensors (names[i] for
 * slot i; slot `first` sets the device and the type). */
static ERL_NIF_TERM lin_check_common(ErlNifEnv *env, const char *op, lin_call *c,
                                     const char *const *names, int count, int *ok) {
  *ok = 1;
  const mx_tensor *f = c->t[0];
  for (int i = 1; i < count; i++)
    if (c->t[i] && c->t[i]->slot != f->slot)
      LIN_FAIL("%s is on %T but %s is on %T (all tensors must be on one device)", names[i],
               device_term(env, c->t[i]->slot), names[0], device_term(env, f->slot));
  const int dt = f->dtype;
  if (f->slot == MX_CPU_SLOT) {
    if (dt != MX_F32 && dt != MX_F64)
      LIN_FAIL("%s must have type {:f, 32} or {:f, 64} on the CPU, got: %T", names[0],
               dtype_term(env, dt));
  } else if (dt != MX_F32 && dt != MX_BF16) {
    LIN_FAIL("%s must have type {:f, 32} or {:bf, 16} on CUDA, got: %T", names[0],
             dtype_term(env, dt));
  }
  for (int i = 1; i < count; i++)
    if (c->t[i] && c->t[i]->dtype != dt)
      LIN_FAIL("%s must have the type of %s, %T, got: %T", names[i], names[0],
               dtype_term(env, dt), dtype_term(env, c->t[i]->dtype));
  return 0;
}

/* `into` slot i must not share storage with slots [0, upto). */
static ERL_NIF_TERM lin_check_alias(ErlNifEnv *env, const char *op, lin_call *c,
                                    const char *const *names, int i, int upto, int *ok) {
  *ok = 1;
  if (!c->t[i]) return 0;
  for (int j = 0; j < upto; j++)
    if (j != i && c->t[j] && c->s[j] == c->s[i])
      LIN_FAIL("%s shares memory with %s (it is written in place; give a separate tensor)",
               names[i], names[j]);
  return 0;
}

static void *out_ptr(mx_tensor *t) { return mx_data(t->storage, t); }

/* Estimated work in "bytes" for the scheduler choice: m n k, saturating. */
static size_t lin_work(double m, double n, double k, double factor) {
  double w = m * n * (k > 1 ? k : 1) * factor;
  return w >= 1e18 ? (size_t)1 << 60 : (size_t)w;
}

static int64_t leading_rows(const mx_tensor *x) {
  int64_t rows = 1;
  for (int i = 0; i + 1 < x->rank; i++) rows *= x->shape[i];
  return rows;
}

/* ---- forward ------------------------------------------------------------- */

enum { F_X, F_W, F_BIAS };

/* Checks x (..., K), w (K, N), bias (N) (slots 0, 1, 2 of c). */
static ERL_NIF_TERM lin_check_xw(ErlNifEnv *env, const char *op, lin_call *c, int *ok) {
  *ok = 1;
  const mx_tensor *x = c->t[F_X], *w = c->t[F_W];
  if (x->rank < 1)
    LIN_FAIL("x must have rank >= 1 with the features last, {..., in_features}, got: %T",
             shape_term(env, x->shape, x->rank));
  if (w->rank != 2)
    LIN_FAIL("w must have shape {in_features, out_features}, got: %T",
             shape_term(env, w->shape, w->rank));
  if (w->shape[0] != x->shape[x->rank - 1])
    LIN_FAIL("w must have shape {%ld, out_features} (its first axis is x's last), got: %T",
             (long)x->shape[x->rank - 1], shape_term(env, w->shape, 2));
  return 0;
}

#define OP "linear_forward"
ERL_NIF_TERM nif_linear_forward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  static const char *const names[] = {"x", "w", "bias"};
  const char *op = OP;
  lin_call call, *c = &call;
  memset(c, 0, sizeof *c);
  int ok, prec;
  ERL_NIF_TERM raised;
  if ((raised = lin_get(env, op, c, F_X, argv[0], "x", 0, &ok)), !ok) return raised;
  if ((raised = lin_get(env, op, c, F_W, argv[1], "w", 0, &ok)), !ok) return raised;
  if ((raised = lin_get(env, op, c, F_BIAS, argv[2], "bias", 1, &ok)), !ok) return raised;
  if (!get_precision(env, argv[3], &prec)) {
    lin_release(c);
    return raise_arg(env, op, "precision must be :fp32 or :tf32, got: %.200T", argv[3]);
  }
  if ((raised = lin_check_common(env, op, c, names, 3, &ok)), !ok) return raised;
  if ((raised = lin_check_xw(env, op, c, &ok)), !ok) return raised;
  const mx_tensor *x = c->t[F_X], *w = c->t[F_W], *b = c->t[F_BIAS];
  const int64_t K = w->shape[0], N = w->shape[1], rows = leading_rows(x);
  if (b && (b->rank != 1 || b->shape[0] != N)) {
    lin_release(c);
    return raise_arg(env, op, "bias must have shape {%ld} (w's out_features), got: %T", (long)N,
                     shape_term(env, b->shape, b->rank));
  }
  const mx_backend *be = mx_backend_for(x->slot);
  MAYBE_RESCHEDULE(nif_linear_forward, x->slot, lin_work(rows, N, K, 1.0), c->s[0], c->s[1],
                   c->s[2]);
  int64_t shape[MX_MAX_RANK];
  memcpy(shape, x->shape, sizeof shape);
  shape[x->rank - 1] = N;
  mx_tensor *y = output_new(env, op, x->slot, x->dtype, shape, x->rank, &raised, &ok);
  if (!ok) {
    lin_release(c);
    return raised;
  }
  mx_err err = {0, {0}};
  mx_gemm_args g = {.dtype = x->dtype, .precision = prec, .trans_a = 0, .trans_b = 0,
                    .m = rows, .n = N, .k = K,
                    .a = lin_ptr(c, F_X), .lda = K,
                    .b = lin_ptr(c, F_W), .ldb = N,
                    .c = out_ptr(y), .ldc = N,
                    .alpha = 1.0, .beta = 0.0, .bias = lin_ptr(c, F_BIAS)};
  int rc = be->gemm(mx_backend_dev(x->slot), &g, &err);
  lin_release(c);
  return finish(env, op, rc, &err, y);
}
#undef OP

/* ---- backward ------------------------------------------------------------ */

enum { B_X, B_W, B_DY, B_INTO_W, B_INTO_BIAS, B_INTO_X };

#define OP "linear_backward"
ERL_NIF_TERM nif_linear_backward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  static const char *const names[] = {"x", "w", "dy", "into w", "into bias", "into x"};
  const char *op = OP;
  lin_call call, *c = &call;
  memset(c, 0, sizeof *c);
  int ok, want_bias, want_dx, prec;
  ERL_NIF_TERM raised;
  if ((raised = lin_get(env, op, c, B_X, argv[0], "x", 0, &ok)), !ok) return raised;
  if ((raised = lin_get(env, op, c, B_W, argv[1], "w", 0, &ok)), !ok) return raised;
  if ((raised = lin_get(env, op, c, B_DY, argv[2], "dy", 0, &ok)), !ok) return raised;
  if ((raised = lin_get(env, op, c, B_INTO_W, argv[6], "into w", 1, &ok)), !ok) return raised;
  if ((raised = lin_get(env, op, c, B_INTO_BIAS, argv[7], "into bias", 1, &ok)), !ok)
    return raised;
  if ((raised = lin_get(env, op, c, B_INTO_X, argv[8], "into x", 1, &ok)), !ok) return raised;
  int *okp = &ok;
#define BW_FAIL(...)                         \
  do {                                       \
    lin_release(c);                          \
    *okp = 0;                                \
    return raise_arg(env, op, __VA_ARGS__);  \
  } while (0)
  if (!get_bool(argv[3], &want_bias))
    BW_FAIL("bias must be true or false, got: %.200T", argv[3]);
  if (!get_bool(argv[4], &want_dx))
    BW_FAIL("input_grad must be true or false, got: %.200T", argv[4]);
  if (!get_precision(env, argv[5], &prec))
    BW_FAIL("precision must be :fp32 or :tf32, got: %.200T", argv[5]);
  if ((raised = lin_check_common(env, op, c, names, 6, &ok)), !ok) return raised;
  if ((raised = lin_check_xw(env, op, c, &ok)), !ok) return raised;
  const mx_tensor *x = c->t[B_X], *w = c->t[B_W], *dy = c->t[B_DY];
  const mx_tensor *iw = c->t[B_INTO_W], *ib = c->t[B_INTO_BIAS], *ix = c->t[B_INTO_X];
  const int64_t K = w->shape[0], N = w->shape[1], rows = leading_rows(x);
  int dy_ok = dy->rank == x->rank && dy->shape[dy->rank - 1] == N;
  for (int i = 0; dy_ok && i + 1 < x->rank; i++) dy_ok = dy->shape[i] == x->shape[i];
  if (!dy_ok) {
    int64_t want[MX_MAX_RANK];
    memcpy(want, x->shape, sizeof want);
    want[x->rank - 1] = N;
    BW_FAIL("dy must have shape %T (x's leading axes, w's out_features), got: %T",
            shape_term(env, want, x->rank), shape_term(env, dy->shape, dy->rank));
  }
  if (!iw && ib) BW_FAIL("into bias needs into w (into must hold every parameter gradient)");
  if (iw) {
    if (iw->rank != 2 || iw->shape[0] != K || iw->shape[1] != N)
      BW_FAIL("into w must have the shape of w, {%ld, %ld}, got: %T", (long)K, (long)N,
              shape_term(env, iw->shape, iw->rank));
    if (want_bias && !ib)
      BW_FAIL("into must hold a bias tensor when bias: true (every parameter gradient)");
    if (!want_bias && ib) BW_FAIL("into bias is given but bias is false (no bias gradient)");
    if (ib && (ib->rank != 1 || ib->shape[0] != N))
      BW_FAIL("into bias must have shape {%ld}, got: %T", (long)N,
              shape_term(env, ib->shape, ib->rank));
    if ((raised = lin_check_alias(env, op, c, names, B_INTO_W, B_INTO_BIAS + 1, &ok)), !ok)
      return raised;
    if ((raised = lin_check_alias(env, op, c, names, B_INTO_BIAS, B_INTO_BIAS + 1, &ok)), !ok)
      return raised;
  }
  if (ix) {
    if (!want_dx) BW_FAIL("into x is given but input_grad is false (no input gradient)");
    int same = ix->rank == x->rank;
    for (int i = 0; same && i < x->rank; i++) same = ix->shape[i] == x->shape[i];
    if (!same)
      BW_FAIL("into x must have the shape of x, %T, got: %T", shape_term(env, x->shape, x->rank),
              shape_term(env, ix->shape, ix->rank));
    if ((raised = lin_check_alias(env, op, c, names, B_INTO_X, B_INTO_X + 1, &ok)), !ok) return raised;
  }
#undef BW_FAIL
  const mx_backend *be = mx_backend_for(x->slot);
  MAYBE_RESCHEDULE(nif_linear_backward, x->slot, lin_work(rows, N, K, want_dx ? 2.0 : 1.0),
                   c->s[0], c->s[1], c->s[2], c->s[3], c->s[4], c->s[5]);
  const int slot = x->slot, dt = x->dtype;
  mx_tensor *dx = NULL, *dw = NULL, *db = NULL;
  ok = 1;
  if (want_dx && !ix) dx = output_new(env, op, slot, dt, x->shape, x->rank, &raised, &ok);
  if (ok && !iw) dw = output_new(env, op, slot, dt, w->shape, 2, &raised, &ok);
  if (ok && want_bias && !ib) db = output_new(env, op, slot, dt, &N, 1, &raised, &ok);
  if (!ok) {
    output_drop(dx);
    output_drop(dw);
    output_drop(db);
    lin_release(c);
    return raised;
  }
  const int dev = mx_backend_dev(slot);
  mx_err err = {0, {0}};
  int rc = MX_OK;
  if (want_dx) { /* dx (rows, K) [+]= dy (rows, N) w^T, w (K, N) */
    mx_gemm_args g = {.dtype = dt, .precision = prec, .trans_a = 0, .trans_b = 1,
                      .m = rows, .n = K, .k = N,
                      .a = lin_ptr(c, B_DY), .lda = N,
                      .b = lin_ptr(c, B_W), .ldb = N,
                      .c = ix ? lin_ptr(c, B_INTO_X) : out_ptr(dx), .ldc = K,
                      .alpha = 1.0, .beta = ix ? 1.0 : 0.0, .bias = NULL};
    rc = be->gemm(dev, &g, &err);
  }
  if (rc == MX_OK) { /* dw (K, N) [+]= x^T (K, rows) dy (rows, N) */
    mx_gemm_args g = {.dtype = dt, .precision = prec, .trans_a = 1, .trans_b = 0,
                      .m = K, .n = N, .k = rows,
                      .a = lin_ptr(c, B_X), .lda = K,
                      .b = lin_ptr(c, B_DY), .ldb = N,
                      .c = iw ? lin_ptr(c, B_INTO_W) : out_ptr(dw), .ldc = N,
                      .alpha = 1.0, .beta = iw ? 1.0 : 0.0, .bias = NULL};
    rc = be->gemm(dev, &g, &err);
  }
  if (rc == MX_OK && want_bias)
    rc = be->sum_rows(dev, dt, lin_ptr(c, B_DY), rows, N,
                      ib ? lin_ptr(c, B_INTO_BIAS) : out_ptr(db), ib ? 1 : 0, &err);
  lin_release(c);
  if (rc != MX_OK) {
    output_drop(dx);
    output_drop(dw);
    output_drop(db);
    return raise_err(env, op, &err);
  }
  ERL_NIF_TERM keys[3], vals[3], map;
  unsigned n = 0;
  keys[n] = enif_make_atom(env, "w");
  vals[n++] = iw ? argv[6] : tensor_term(env, dw);
  if (want_dx) {
    keys[n] = enif_make_atom(env, "x");
    vals[n++] = ix ? argv[8] : tensor_term(env, dx);
  }
  if (want_bias) {
    keys[n] = enif_make_atom(env, "bias");
    vals[n++] = ib ? argv[7] : tensor_term(env, db);
  }
  enif_make_map_from_arrays(env, keys, vals, n, &map);
  return map;
}
#undef OP

/* ---- matmul ---------------------------------------------------------------- */

enum { M_A, M_B, M_INTO };

#define OP "matmul"
ERL_NIF_TERM nif_matmul(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  static const char *const names[] = {"a", "b", "into"};
  const char *op = OP;
  lin_call call, *c = &call;
  memset(c, 0, sizeof *c);
  int ok, ta, tb, prec;
  double alpha, beta;
  ERL_NIF_TERM raised;
  if ((raised = lin_get(env, op, c, M_A, argv[0], "a", 0, &ok)), !ok) return raised;
  if ((raised = lin_get(env, op, c, M_B, argv[1], "b", 0, &ok)), !ok) return raised;
  if ((raised = lin_get(env, op, c, M_INTO, argv[6], "into", 1, &ok)), !ok) return raised;
  int *okp = &ok;
#define MM_FAIL(...)                         \
  do {                                       \
    lin_release(c);                          \
    *okp = 0;                                \
    return raise_arg(env, op, __VA_ARGS__);  \
  } while (0)
  if (!get_bool(argv[2], &ta))
    MM_FAIL("transpose_a must be true or false, got: %.200T", argv[2]);
  if (!get_bool(argv[3], &tb))
    MM_FAIL("transpose_b must be true or false, got: %.200T", argv[3]);
  if (!get_number(env, argv[4], &alpha)) MM_FAIL("alpha must be a number, got: %.200T", argv[4]);
  if (!get_number(env, argv[5], &beta)) MM_FAIL("beta must be a number, got: %.200T", argv[5]);
  if (!get_precision(env, argv[7], &prec))
    MM_FAIL("precision must be :fp32 or :tf32, got: %.200T", argv[7]);
  if (!c->t[M_INTO] && beta != 0.0)
    MM_FAIL("beta must be 0 without into (there is no C to scale), got: %g", beta);
  if ((raised = lin_check_common(env, op, c, names, 3, &ok)), !ok) return raised;
  const mx_tensor *a = c->t[M_A], *b = c->t[M_B], *into = c->t[M_INTO];
  if (a->rank != 2) MM_FAIL("a must have rank 2, got: %T", shape_term(env, a->shape, a->rank));
  if (b->rank != 2) MM_FAIL("b must have rank 2, got: %T", shape_term(env, b->shape, b->rank));
  const int64_t m = ta ? a->shape[1] : a->shape[0], k = ta ? a->shape[0] : a->shape[1];
  const int64_t kb = tb ? b->shape[1] : b->shape[0], n = tb ? b->shape[0] : b->shape[1];
  if (k != kb)
    MM_FAIL("b: the contracted sizes differ: op(a) is {%ld, %ld} but op(b) is {%ld, %ld}",
            (long)m, (long)k, (long)kb, (long)n);
  const int64_t mn[2] = {m, n};
  if (into && (into->rank != 2 || into->shape[0] != m || into->shape[1] != n))
    MM_FAIL("into must have shape %T, got: %T", shape_term(env, mn, 2),
            shape_term(env, into->shape, into->rank));
  if ((raised = lin_check_alias(env, op, c, names, M_INTO, M_INTO, &ok)), !ok) return raised;
#undef MM_FAIL
  const mx_backend *be = mx_backend_for(a->slot);
  MAYBE_RESCHEDULE(nif_matmul, a->slot, lin_work(m, n, k, 1.0), c->s[0], c->s[1], c->s[2]);
  mx_tensor *out = NULL;
  if (!into) {
    out = output_new(env, op, a->slot, a->dtype, mn, 2, &raised, &ok);
    if (!ok) {
      lin_release(c);
      return raised;
    }
  }
  mx_err err = {0, {0}};
  mx_gemm_args g = {.dtype = a->dtype, .precision = prec, .trans_a = ta, .trans_b = tb,
                    .m = m, .n = n, .k = k,
                    .a = lin_ptr(c, M_A), .lda = a->shape[1],
                    .b = lin_ptr(c, M_B), .ldb = b->shape[1],
                    .c = into ? lin_ptr(c, M_INTO) : out_ptr(out), .ldc = n,
                    .alpha = alpha, .beta = into ? beta : 0.0, .bias = NULL};
  int rc = be->gemm(mx_backend_dev(a->slot), &g, &err);
  lin_release(c);
  if (into) {
    if (rc != MX_OK) return raise_err(env, op, &err);
    return argv[6];
  }
  return finish(env, op, rc, &err, out);
}
#undef OP

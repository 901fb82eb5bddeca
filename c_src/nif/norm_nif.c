/*
 * norm_nif.c: the RMSNorm / LayerNorm NIFs (Mambex.Norm).
 *
 *   norm_forward(kind, x, residual | nil, weight, bias | nil, eps)
 *     -> {y, sum | nil, mean | nil, rstd}
 *   norm_backward(kind, x, weight, bias | nil, mean | nil, rstd, dy, d_sum | nil,
 *                 into_weight | nil, into_bias | nil)
 *     -> {dx, dweight, dbias | nil}
 *
 * kind is :rms_norm or :layer_norm. The norm runs over the last axis of x
 * (rank >= 1, dim = the last axis >= 1); the leading axes are flattened into
 * rows (their product, which may be 0). In the backward, x is what the
 * forward normalised: its `sum` output when a residual was given, else its x.
 *
 * Shapes: x, residual, y, sum, dy, d_sum, dx: x's shape; weight, bias,
 * into_*, dweight, dbias: {dim}; mean, rstd: {rows}. Types: io (x, residual,
 * y, sum, dy, d_sum, dx) and param (weight, bias, mean, rstd and their
 * gradients). CPU: io f32 or f64, param == io. CUDA: io f32 or bf16, param
 * f32. bias and mean are for :layer_norm only (mean required there in the
 * backward). eps: a finite number >= 0.
 *
 * Accumulation: with into_weight (and into_bias exactly when bias is given)
 * the backend adds the parameter gradients into those tensors in place
 * (accumulate = 1) and the NIF returns them; otherwise new tensors. dx is
 * always new.
 *
 * Invariants (those of mambex_nif.c): every argument is checked before
 * anything is allocated or any backend is called; failures raise
 * ArgumentError naming the op and the argument; storage references are
 * released on every path; the op moves to a dirty scheduler (CPU for big
 * host calls, IO for CUDA enqueues) before allocating, and is parsed again
 * there.
 */
#include <math.h>
#include <string.h>

#include "nif_common.h"

enum { NA_X, NA_RES, NA_W, NA_B, NA_MEAN, NA_RSTD, NA_DY, NA_DSUM, NA_IW, NA_IB, NA_COUNT };

static const char *const ARG_NAME[NA_COUNT] = {"x",    "residual", "weight", "bias",
                                              "mean", "rstd",     "dy",     "d_sum",
                                              "into weight", "into bias"};
static const int IS_IO[NA_COUNT] = {1, 1, 0, 0, 0, 0, 1, 1, 0, 0};

typedef struct {
  mx_tensor *t[NA_COUNT];
  mx_storage *s[NA_COUNT];
  int kind, slot, io, param;
  int64_t rows, dim;
  double eps;
} norm_call;

static void norm_release(norm_call *c) {
  for (int i = 0; i < NA_COUNT; i++) {
    mx_storage_release(c->s[i]);
    c->s[i] = NULL;
  }
}

static const void *norm_ptr(const norm_call *c, int i) {
  return c->t[i] ? mx_data(c->s[i], c->t[i]) : NULL;
}

static int is_vec(const mx_tensor *t, int64_t n) { return t->rank == 1 && t->shape[0] == n; }

#define NORM_FAIL(...)                      \
  do {                                      \
    norm_release(c);                        \
    *ok = 0;                                \
    return raise_arg(env, op, __VA_ARGS__); \
  } while (0)

/* argidx[i]: argv index of argument i, or -1 when the NIF has none. Required
 * arguments: x, weight, rstd (backward) and dy (backward). */
static ERL_NIF_TERM norm_parse(ErlNifEnv *env, const char *op, const ERL_NIF_TERM argv[],
                               const int argidx[NA_COUNT], int backward, norm_call *c, int *ok) {
  memset(c, 0, sizeof *c);
  *ok = 1;
  if (enif_is_identical(argv[0], enif_make_atom(env, "rms_norm"))) c->kind = MX_RMSNORM;
  else if (enif_is_identical(argv[0], enif_make_atom(env, "layer_norm"))) c->kind = MX_LAYERNORM;
  else NORM_FAIL("kind must be :rms_norm or :layer_norm, got: %.200T", argv[0]);
  for (int i = 0; i < NA_COUNT; i++) {
    if (argidx[i] < 0) continue;
    ERL_NIF_TERM term = argv[argidx[i]];
    int required = i == NA_X || i == NA_W || (backward && (i == NA_RSTD || i == NA_DY));
    if (!required && enif_is_identical(term, A_NIL)) continue;
    if (!get_tensor_any(env, term, &c->t[i]))
      NORM_FAIL("%s must be a Mambex.Tensor%s, got: %.200T", ARG_NAME[i], required ? "" : " or nil",
                term);
    c->s[i] = mx_tensor_acquire(c->t[i]);
    if (!c->s[i]) NORM_FAIL("%s was freed and cannot be used", ARG_NAME[i]);
  }

  /* One device. */
  const mx_tensor *x = c->t[NA_X];
  c->slot = x->slot;
  for (int i = 1; i < NA_COUNT; i++)
    if (c->t[i] && c->t[i]->slot != c->slot)
      NORM_FAIL("%s is on %T but x is on %T (all tensors must be on one device)", ARG_NAME[i],
                device_term(env, c->t[i]->slot), device_term(env, c->slot));

  /* Types. */
  c->io = x->dtype;
  if (c->slot == MX_CPU_SLOT) {
    if (c->io != MX_F32 && c->io != MX_F64)
      NORM_FAIL("x must have type {:f, 32} or {:f, 64} on the CPU, got: %T",
                dtype_term(env, c->io));
    c->param = c->io;
  } else {
    if (c->io != MX_F32 && c->io != MX_BF16)
      NORM_FAIL("x must have type {:f, 32} or {:bf, 16} on CUDA, got: %T", dtype_term(env, c->io));
    c->param = MX_F32;
  }
  for (int i = 1; i < NA_COUNT; i++) {
    if (!c->t[i]) continue;
    int want = IS_IO[i] ? c->io : c->param;
    if (c->t[i]->dtype != want)
      NORM_FAIL("%s must have type %T%s, got: %T", ARG_NAME[i], dtype_term(env, want),
                IS_IO[i] ? " (the type of x)" : " (the parameter type)",
                dtype_term(env, c->t[i]->dtype));
  }

  /* Shapes. */
  if (x->rank < 1)
    NORM_FAIL("x must have at least one axis (the normalised one), got shape %T",
              shape_term(env, x->shape, x->rank));
  c->dim = x->shape[x->rank - 1];
  if (c->dim < 1) NORM_FAIL("x: the normalised (last) axis must have at least 1 element, got 0");
  int64_t rows = mx_numel_checked(x->shape, x->rank - 1, mx_dtype_size(c->io));
  if (rows < 0 || mx_numel_checked(x->shape, x->rank, mx_dtype_size(c->io)) < 0)
    NORM_FAIL("x: the size overflows");
  c->rows = rows;
  const int same[3] = {NA_RES, NA_DY, NA_DSUM};
  for (int k = 0; k < 3; k++) {
    const mx_tensor *t = c->t[same[k]];
    if (t && !tensor_has_shape(t, x->rank, x->shape))
      NORM_FAIL("%s must have the shape of x, %T, got: %T", ARG_NAME[same[k]],
                shape_term(env, x->shape, x->rank), shape_term(env, t->shape, t->rank));
  }
  const int vecs[4] = {NA_W, NA_B, NA_IW, NA_IB};
  for (int k = 0; k < 4; k++) {
    const mx_tensor *t = c->t[vecs[k]];
    if (t && !is_vec(t, c->dim))
      NORM_FAIL("%s must have shape {%ld} (the last axis of x), got: %T", ARG_NAME[vecs[k]],
                (long)c->dim, shape_term(env, t->shape, t->rank));
  }
  const int stats[2] = {NA_MEAN, NA_RSTD};
  for (int k = 0; k < 2; k++) {
    const mx_tensor *t = c->t[stats[k]];
    if (t && !is_vec(t, c->rows))
      NORM_FAIL("%s must have shape {%ld} (one value per row), got: %T", ARG_NAME[stats[k]],
                (long)c->rows, shape_term(env, t->shape, t->rank));
  }

  /* Kind-specific arguments. */
  if (c->kind == MX_RMSNORM) {
    if (c->t[NA_B]) NORM_FAIL("bias is for :layer_norm only, got a tensor for :rms_norm");
    if (c->t[NA_MEAN]) NORM_FAIL("mean is for :layer_norm only, got a tensor for :rms_norm");
  } else if (backward && !c->t[NA_MEAN]) {
    NORM_FAIL("mean must be a Mambex.Tensor for :layer_norm, got: nil");
  }
  if (backward) {
    if (c->t[NA_IB] && !c->t[NA_IW]) NORM_FAIL("into bias given without into weight");
    if (c->t[NA_IW] && !c->t[NA_IB] != !c->t[NA_B])
      NORM_FAIL("into bias must be given exactly when bias is (every parameter gradient "
                "accumulates)");
    if (c->t[NA_IW] && c->t[NA_IB] && c->s[NA_IW]->ptr == c->s[NA_IB]->ptr &&
        c->t[NA_IW]->offset == c->t[NA_IB]->offset)
      NORM_FAIL("into weight and into bias must be different tensors");
  }
  return 0;
}
#undef NORM_FAIL

static mx_norm_args norm_args(const norm_call *c) {
  mx_norm_args a;
  memset(&a, 0, sizeof a);
  a.kind = c->kind;
  a.rows = c->rows;
  a.dim = c->dim;
  a.io = c->io;
  a.param = c->param;
  a.eps = c->eps;
  a.x = norm_ptr(c, NA_X);
  a.residual = norm_ptr(c, NA_RES);
  a.weight = norm_ptr(c, NA_W);
  a.bias = norm_ptr(c, NA_B);
  return a;
}

static size_t norm_work(const norm_call *c, int passes) {
  double w = (double)passes * (double)c->rows * (double)c->dim * (double)mx_dtype_size(c->io);
  return w >= 1e18 ? (size_t)1 << 60 : (size_t)w;
}

static void *out_ptr(mx_tensor *t) { return t ? mx_data(t->storage, t) : NULL; }

#define OP "norm_forward"
ERL_NIF_TERM nif_norm_forward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  static const int idx[NA_COUNT] = {1, 2, 3, 4, -1, -1, -1, -1, -1, -1};
  norm_call call, *c = &call;
  int ok;
  ERL_NIF_TERM raised = norm_parse(env, OP, argv, idx, 0, c, &ok);
  if (!ok) return raised;
  if (!get_number(env, argv[5], &c->eps) || !isfinite(c->eps) || c->eps < 0) {
    norm_release(c);
    return raise_arg(env, OP, "eps must be a finite number >= 0, got: %.200T", argv[5]);
  }
  MAYBE_RESCHEDULE(nif_norm_forward, c->slot, norm_work(c, c->t[NA_RES] ? 4 : 2), c->s[NA_X],
                   c->s[NA_RES], c->s[NA_W], c->s[NA_B]);
  const mx_tensor *x = c->t[NA_X];
  mx_tensor *y = output_new(env, OP, c->slot, c->io, x->shape, x->rank, &raised, NULL);
  mx_tensor *sum = NULL, *mean = NULL, *rstd = NULL;
  ok = y != NULL;
  if (ok && c->t[NA_RES])
    ok = (sum = output_new(env, OP, c->slot, c->io, x->shape, x->rank, &raised, NULL)) != NULL;
  if (ok && c->kind == MX_LAYERNORM)
    ok = (mean = output_new(env, OP, c->slot, c->param, &c->rows, 1, &raised, NULL)) != NULL;
  if (ok) ok = (rstd = output_new(env, OP, c->slot, c->param, &c->rows, 1, &raised, NULL)) != NULL;
  if (!ok) {
    output_drop(y);
    output_drop(sum);
    output_drop(mean);
    norm_release(c);
    return raised;
  }
  mx_err err = {0, {0}};
  int rc = MX_OK;
  if (c->rows > 0) {
    mx_norm_args a = norm_args(c);
    rc = mx_backend_for(c->slot)->norm_forward(mx_backend_dev(c->slot), &a, out_ptr(y),
                                                out_ptr(sum), out_ptr(mean), out_ptr(rstd), &err);
  }
  norm_release(c);
  if (rc != MX_OK) {
    output_drop(y);
    output_drop(sum);
    output_drop(mean);
    output_drop(rstd);
    return raise_err(env, OP, &err);
  }
  return enif_make_tuple4(env, tensor_term(env, y), sum ? tensor_term(env, sum) : A_NIL,
                          mean ? tensor_term(env, mean) : A_NIL, tensor_term(env, rstd));
}
#undef OP

#define OP "norm_backward"
ERL_NIF_TERM nif_norm_backward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  static const int idx[NA_COUNT] = {1, -1, 2, 3, 4, 5, 6, 7, 8, 9};
  norm_call call, *c = &call;
  int ok;
  ERL_NIF_TERM raised = norm_parse(env, OP, argv, idx, 1, c, &ok);
  if (!ok) return raised;
  MAYBE_RESCHEDULE(nif_norm_backward, c->slot, norm_work(c, c->t[NA_DSUM] ? 4 : 3), c->s[NA_X],
                   c->s[NA_W], c->s[NA_B], c->s[NA_MEAN], c->s[NA_RSTD], c->s[NA_DY], c->s[NA_DSUM],
                   c->s[NA_IW], c->s[NA_IB]);
  const mx_tensor *x = c->t[NA_X];
  const int accumulate = c->t[NA_IW] != NULL;
  mx_tensor *dx = output_new(env, OP, c->slot, c->io, x->shape, x->rank, &raised, NULL);
  mx_tensor *dw = NULL, *db = NULL;
  ok = dx != NULL;
  if (ok && !accumulate) {
    ok = (dw = output_new(env, OP, c->slot, c->param, &c->dim, 1, &raised, NULL)) != NULL;
    if (ok && c->t[NA_B])
      ok = (db = output_new(env, OP, c->slot, c->param, &c->dim, 1, &raised, NULL)) != NULL;
  }
  if (!ok) {
    output_drop(dx);
    output_drop(dw);
    norm_release(c);
    return raised;
  }
  void *dwp = accumulate ? mx_data(c->s[NA_IW], c->t[NA_IW]) : out_ptr(dw);
  void *dbp = accumulate ? (c->t[NA_IB] ? mx_data(c->s[NA_IB], c->t[NA_IB]) : NULL) : out_ptr(db);
  mx_err err = {0, {0}};
  mx_norm_args a = norm_args(c);
  int rc = mx_backend_for(c->slot)->norm_backward(
      mx_backend_dev(c->slot), &a, norm_ptr(c, NA_MEAN), norm_ptr(c, NA_RSTD), norm_ptr(c, NA_DY),
      norm_ptr(c, NA_DSUM), out_ptr(dx), dwp, dbp, accumulate, &err);
  const int has_bias = c->t[NA_B] != NULL;
  norm_release(c);
  if (rc != MX_OK) {
    output_drop(dx);
    output_drop(dw);
    output_drop(db);
    return raise_err(env, OP, &err);
  }
  ERL_NIF_TERM dwt = accumulate ? argv[8] : tensor_term(env, dw);
  ERL_NIF_TERM dbt = !has_bias ? A_NIL : accumulate ? argv[9] : tensor_term(env, db);
  return enif_make_tuple3(env, tensor_term(env, dx), dwt, dbt);
}
#undef OP

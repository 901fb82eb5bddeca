/*
 * conv1d_nif.c: the causal depthwise conv1d NIFs (Mambex.Conv1d).
 *
 *   conv1d_forward(x, weight, bias | nil, initial_state | nil, silu)
 *     -> {out, final_state}
 *   conv1d_backward(x, weight, bias | nil, initial_state | nil, silu,
 *                   d_out, d_final_state | nil,
 *                   into_weight | nil, into_bias | nil, into_initial_state | nil)
 *     -> %{x: dx, weight: dw, [bias: db], [initial_state: dh0]}
 *
 * Shapes: x, d_out, out (B, L, C); weight (C, W) with 1 <= W <= 8; bias (C);
 * initial_state, d_final_state and the final state (B, C, W-1). Types: x,
 * d_out and out share the io type; weight, bias and the states the param
 * type. CPU: io f32 or f64, param == io. CUDA: io f32 or bf16, param f32.
 * B, L, C may be 0 (outputs empty; the final state is the initial state, or
 * zeros; with L = 0 the initial state's gradient is d_final_state, or 0).
 *
 * Accumulation: when into_weight is given the call accumulates: the
 * parameter gradients are added to into_weight, into_bias (required exactly
 * when bias is given) and into_initial_state (required exactly when
 * initial_state is given), which are returned under their keys; they must be
 * shaped and typed like the parameter and must not share memory with any
 * input. Without into tensors the gradients are new tensors. dx is always new.
 *
 * Invariants (those of mambex_nif.c): every argument is checked before
 * anything is allocated or any backend is called; failures raise
 * ArgumentError naming the op and the argument; storage references taken
 * are released on every path; the op moves to a dirty scheduler (CPU for
 * large host calls, IO for CUDA enqueues) before allocating, and is parsed
 * again there. Map keys are atoms from constant names.
 */
#include <string.h>

#include "nif_common.h"

enum { C_X, C_W, C_BIAS, C_H0, C_DOUT, C_DHL, C_IW, C_IB, C_IH, C_COUNT };

static const char *const CV_NAME[C_COUNT] = {
    "x", "weight", "bias", "initial_state", "d_out", "d_final_state",
    "into.weight", "into.bias", "into.initial_state"};
static const int CV_INDEX[C_COUNT] = {0, 1, 2, 3, 5, 6, 7, 8, 9};
static const int CV_OPTIONAL[C_COUNT] = {0, 0, 1, 1, 0, 1, 1, 1, 1};
#define SILU_INDEX 4
#define CV_MAX_WIDTH 8

typedef struct {
  mx_tensor *t[C_COUNT];
  mx_storage *s[C_COUNT];
  int slot, io, param, silu, accumulate;
  int64_t B, L, C, W;
} cv_call;

static void cv_release(cv_call *c) {
  for (int i = 0; i < C_COUNT; i++) {
    mx_storage_release(c->s[i]);
    c->s[i] = NULL;
  }
}

static const void *cv_ptr(const cv_call *c, int i) {
  return c->t[i] ? mx_data(c->s[i], c->t[i]) : NULL;
}

#define CV_FAIL(...)                         \
  do {                                       \
    cv_release(c);                           \
    *ok = 0;                                 \
    return raise_arg(env, op, __VA_ARGS__);  \
  } while (0)

/* Decodes and checks the arguments (n_args tensors: the first 4 for the
 * forward, all for the backward). On success *ok = 1 and every given tensor
 * holds a storage reference; otherwise the raised exception is returned and
 * nothing is held. */
static ERL_NIF_TERM cv_parse(ErlNifEnv *env, const char *op, const ERL_NIF_TERM argv[],
                             int n_args, cv_call *c, int *ok) {
  memset(c, 0, sizeof *c);
  *ok = 1;
  for (int i = 0; i < n_args; i++) {
    ERL_NIF_TERM term = argv[CV_INDEX[i]];
    if (CV_OPTIONAL[i] && enif_is_identical(term, A_NIL)) continue;
    if (!get_tensor_any(env, term, &c->t[i]))
      CV_FAIL("%s must be a Mambex.Tensor%s, got: %.200T", CV_NAME[i],
              CV_OPTIONAL[i] ? " or nil" : "", term);
    c->s[i] = mx_tensor_acquire(c->t[i]);
    if (!c->s[i]) CV_FAIL("%s was freed and cannot be used", CV_NAME[i]);
  }
  ERL_NIF_TERM sl = argv[SILU_INDEX];
  if (enif_is_identical(sl, A_TRUE)) c->silu = 1;
  else if (enif_is_identical(sl, A_FALSE)) c->silu = 0;
  else CV_FAIL("silu must be true or false, got: %.200T", sl);

  /* One device. */
  const mx_tensor *x = c->t[C_X];
  c->slot = x->slot;
  for (int i = 1; i < n_args; i++)
    if (c->t[i] && c->t[i]->slot != c->slot)
      CV_FAIL("%s is on %T but x is on %T (all tensors must be on one device)", CV_NAME[i],
              device_term(env, c->t[i]->slot), device_term(env, c->slot));

  /* Types. */
  c->io = x->dtype;
  if (c->slot == MX_CPU_SLOT) {
    if (c->io != MX_F32 && c->io != MX_F64)
      CV_FAIL("x must have type {:f, 32} or {:f, 64} on the CPU, got: %T",
              dtype_term(env, c->io));
    c->param = c->io;
  } else {
    if (c->io != MX_F32 && c->io != MX_BF16)
      CV_FAIL("x must have type {:f, 32} or {:bf, 16} on CUDA, got: %T", dtype_term(env, c->io));
    c->param = MX_F32;
  }
  for (int i = 1; i < n_args; i++) {
    if (!c->t[i]) continue;
    const int is_io = i == C_DOUT;
    const int want = is_io ? c->io : c->param;
    if (c->t[i]->dtype != want)
      CV_FAIL("%s must have type %T%s, got: %T", CV_NAME[i], dtype_term(env, want),
              is_io ? " (the type of x)" : " (the parameter type)",
              dtype_term(env, c->t[i]->dtype));
  }

  /* Shapes. */
  if (x->rank != 3)
    CV_FAIL("x must have shape {batch, length, channels}, got: %T",
            shape_term(env, x->shape, x->rank));
  c->B = x->shape[0];
  c->L = x->shape[1];
  c->C = x->shape[2];
  const mx_tensor *w = c->t[C_W];
  if (w->rank != 2 || w->shape[0] != c->C)
    CV_FAIL("weight must have shape {channels, width} = {%ld, W}, got: %T", (long)c->C,
            shape_term(env, w->shape, w->rank));
  c->W = w->shape[1];
  if (c->W < 1 || c->W > CV_MAX_WIDTH)
    CV_FAIL("weight: the kernel width W (weight's second axis) must be in 1..%d, got: %ld",
            CV_MAX_WIDTH, (long)c->W);
  const int64_t blc[3] = {c->B, c->L, c->C}, bck[3] = {c->B, c->C, c->W - 1};
  for (int i = 2; i < n_args; i++) {
    const mx_tensor *t = c->t[i];
    if (!t) continue;
    switch (i) {
      case C_BIAS:
      case C_IB:
        if (!tensor_has_shape(t, 1, &c->C))
          CV_FAIL("%s must have shape {%ld}, got: %T", CV_NAME[i], (long)c->C,
                  shape_term(env, t->shape, t->rank));
        break;
      case C_H0:
      case C_DHL:
      case C_IH:
        if (!tensor_has_shape(t, 3, bck))
          CV_FAIL("%s must have shape {batch, channels, width - 1} = %T, got: %T", CV_NAME[i],
                  shape_term(env, bck, 3), shape_term(env, t->shape, t->rank));
        break;
      case C_DOUT:
        if (!tensor_has_shape(t, 3, blc))
          CV_FAIL("d_out must have the shape of x, %T, got: %T", shape_term(env, blc, 3),
                  shape_term(env, t->shape, t->rank));
        break;
      case C_IW:
        if (!tensor_has_shape(t, 2, w->shape))
          CV_FAIL("into.weight must have the shape of weight, %T, got: %T",
                  shape_term(env, w->shape, 2), shape_term(env, t->shape, t->rank));
        break;
      default:
        break;
    }
  }

  /* Accumulation targets: all or none, one per parameter gradient. */
  if (n_args > C_IW) {
    c->accumulate = c->t[C_IW] != NULL;
    if (c->accumulate) {
      if (!c->t[C_IB] != !c->t[C_BIAS])
        CV_FAIL(c->t[C_BIAS] ? "into must hold a :bias tensor when bias was given"
                             : "into.bias given but the forward had no bias");
      if (!c->t[C_IH] != !c->t[C_H0])
        CV_FAIL(c->t[C_H0] ? "into must hold an :initial_state tensor when initial_state was given"
                           : "into.initial_state given but the forward had no initial_state");
    } else if (c->t[C_IB] || c->t[C_IH]) {
      CV_FAIL("into must hold a :weight tensor");
    }
    for (int i = C_IW; i <= C_IH; i++) {
      if (!c->s[i]) continue;
      for (int k = 0; k < C_COUNT; k++)
        if (k != i && c->s[k] && c->s[k]->ptr == c->s[i]->ptr)
          CV_FAIL("%s must not share memory with %s", CV_NAME[i], CV_NAME[k]);
    }
  }
  return 0;
}
#undef CV_FAIL

static mx_conv1d_args cv_args(const cv_call *c) {
  mx_conv1d_args a;
  memset(&a, 0, sizeof a);
  a.batch = c->B;
  a.len = c->L;
  a.channels = c->C;
  a.width = c->W;
  a.io = c->io;
  a.param = c->param;
  a.silu = c->silu;
  a.x = cv_ptr(c, C_X);
  a.weight = cv_ptr(c, C_W);
  a.bias = cv_ptr(c, C_BIAS);
  a.h0 = cv_ptr(c, C_H0);
  return a;
}

/* Bytes-ish work estimate that picks the scheduler (saturating). */
static size_t cv_work(const cv_call *c) {
  double w = (double)mx_dtype_size(c->io) * (double)c->B * (double)c->L * (double)c->C *
             (double)c->W;
  return w >= 1e18 ? (size_t)1 << 60 : (size_t)w;
}

static ERL_NIF_TERM cv_no_kernel(ErlNifEnv *env, const char *op, const cv_call *c) {
  mx_err e = {MX_E_RUNTIME, {0}};
  snprintf(e.msg, sizeof e.msg, "the %s backend has no %s kernel", mx_backend_for(c->slot)->name,
           op);
  return raise_err(env, op, &e);
}

#define OP "conv1d_forward"
ERL_NIF_TERM nif_conv1d_forward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  cv_call call, *c = &call;
  int ok;
  ERL_NIF_TERM raised = cv_parse(env, OP, argv, C_H0 + 1, c, &ok);
  if (!ok) return raised;
  const mx_backend *be = mx_backend_for(c->slot);
  if (!be->conv1d_forward) {
    cv_release(c);
    return cv_no_kernel(env, OP, c);
  }
  MAYBE_RESCHEDULE(nif_conv1d_forward, c->slot, cv_work(c), c->s[0], c->s[1], c->s[2], c->s[3]);
  const int64_t blc[3] = {c->B, c->L, c->C}, bck[3] = {c->B, c->C, c->W - 1};
  mx_tensor *out = output_new(env, OP, c->slot, c->io, blc, 3, &raised, &ok);
  mx_tensor *hl = ok ? output_new(env, OP, c->slot, c->param, bck, 3, &raised, &ok) : NULL;
  if (!ok) {
    output_drop(out);
    cv_release(c);
    return raised;
  }
  mx_err err = {0, {0}};
  int rc = MX_OK;
  if (c->B * c->C > 0) {
    mx_conv1d_args a = cv_args(c);
    rc = be->conv1d_forward(mx_backend_dev(c->slot), &a, mx_data(out->storage, out),
                            mx_data(hl->storage, hl), &err);
  }
  cv_release(c);
  if (rc != MX_OK) {
    output_drop(out);
    output_drop(hl);
    return raise_err(env, OP, &err);
  }
  return enif_make_tuple2(env, tensor_term(env, out), tensor_term(env, hl));
}
#undef OP

#define OP "conv1d_backward"
ERL_NIF_TERM nif_conv1d_backward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  cv_call call, *c = &call;
  int ok;
  ERL_NIF_TERM raised = cv_parse(env, OP, argv, C_COUNT, c, &ok);
  if (!ok) return raised;
  const mx_backend *be = mx_backend_for(c->slot);
  if (!be->conv1d_backward) {
    cv_release(c);
    return cv_no_kernel(env, OP, c);
  }
  MAYBE_RESCHEDULE(nif_conv1d_backward, c->slot, 3 * cv_work(c), c->s[0], c->s[1], c->s[2],
                   c->s[3], c->s[4], c->s[5], c->s[6], c->s[7], c->s[8]);
  /* dx always new; parameter gradients new or the into tensors */
  static const int GRAD_OF[4] = {C_X, C_W, C_BIAS, C_H0};
  static const int INTO_OF[4] = {-1, C_IW, C_IB, C_IH};
  static const char *const KEY[4] = {"x", "weight", "bias", "initial_state"};
  mx_tensor *grad[4] = {NULL};
  void *gp[4] = {NULL};
  ok = 1;
  for (int i = 0; i < 4 && ok; i++) {
    const mx_tensor *in = c->t[GRAD_OF[i]];
    if (!in) continue;
    if (c->accumulate && INTO_OF[i] >= 0) {
      gp[i] = (void *)cv_ptr(c, INTO_OF[i]);
    } else {
      grad[i] = output_new(env, OP, c->slot, in->dtype, in->shape, in->rank, &raised, &ok);
      if (grad[i]) gp[i] = mx_data(grad[i]->storage, grad[i]);
    }
  }
  if (!ok) {
    for (int i = 0; i < 4; i++) output_drop(grad[i]);
    cv_release(c);
    return raised;
  }
  mx_err err = {0, {0}};
  mx_conv1d_args a = cv_args(c);
  int rc = be->conv1d_backward(mx_backend_dev(c->slot), &a, cv_ptr(c, C_DOUT), cv_ptr(c, C_DHL),
                               gp[0], gp[1], gp[2], gp[3], c->accumulate, &err);
  cv_release(c);
  if (rc != MX_OK) {
    for (int i = 0; i < 4; i++) output_drop(grad[i]);
    return raise_err(env, OP, &err);
  }
  ERL_NIF_TERM keys[4], vals[4], map;
  unsigned n = 0;
  for (int i = 0; i < 4; i++) {
    if (grad[i]) {
      vals[n] = tensor_term(env, grad[i]);
    } else if (gp[i]) {
      vals[n] = argv[CV_INDEX[INTO_OF[i]]];
    } else {
      continue;
    }
    keys[n] = enif_make_atom(env, KEY[i]);
    n++;
  }
  enif_make_map_from_arrays(env, keys, vals, n, &map);
  return map;
}
#undef OP

/*
 * activation_nif.c: the pointwise activation NIFs (Mambex.Activation).
 *
 *   act_forward(act, x) -> y
 *   act_backward(act, x, dy) -> dx
 *   swiglu_forward(a, b) -> out                  out = silu(a) * b
 *   swiglu_backward(a, b, dout) -> {da, db}
 *
 * act is :silu, :gelu (tanh form), :softplus or :sigmoid. Every tensor of a
 * call has one shape (any rank, any size including 0), one type and one
 * device; outputs are new tensors of that shape and type. Types: f32 or f64
 * on the CPU, f32 or bf16 on CUDA (math in fp32, fp64 for f64).
 *
 * Invariants (those of mambex_nif.c): every argument is checked before
 * anything is allocated or any backend is called; failures raise
 * ArgumentError naming the op and the argument; storage references are
 * released on every path; the op moves to a dirty scheduler (CPU for big
 * host calls, IO for CUDA enqueues) before allocating, and is parsed again
 * there.
 */
#include <string.h>

#include "nif_common.h"

#define ACT_MAX_ARGS 3

typedef struct {
  mx_tensor *t[ACT_MAX_ARGS];
  mx_storage *s[ACT_MAX_ARGS];
  int n;
} act_call;

static void act_release(act_call *c) {
  for (int i = 0; i < c->n; i++) {
    mx_storage_release(c->s[i]);
    c->s[i] = NULL;
  }
}

/* Decodes n tensors argv[first..first+n-1] named names[]; all of one shape,
 * type and device, the type supported there. 0 on success; else the raised
 * exception with *ok = 0 and nothing held. */
static ERL_NIF_TERM act_parse(ErlNifEnv *env, const char *op, const ERL_NIF_TERM argv[],
                              int first, int n, const char *const names[], act_call *c,
                              int *ok) {
  memset(c, 0, sizeof *c);
  c->n = n;
  *ok = 0;
  for (int i = 0; i < n; i++) {
    ERL_NIF_TERM term = argv[first + i];
    if (!get_tensor_any(env, term, &c->t[i])) {
      act_release(c);
      return raise_arg(env, op, "%s must be a Mambex.Tensor, got: %.200T", names[i], term);
    }
    c->s[i] = mx_tensor_acquire(c->t[i]);
    if (!c->s[i]) {
      act_release(c);
      return raise_arg(env, op, "%s was freed and cannot be used", names[i]);
    }
  }
  const mx_tensor *t0 = c->t[0];
  if (t0->slot == MX_CPU_SLOT ? (t0->dtype != MX_F32 && t0->dtype != MX_F64)
                              : (t0->dtype != MX_F32 && t0->dtype != MX_BF16)) {
    act_release(c);
    return raise_arg(env, op, "%s must have type %s, got: %T", names[0],
                     t0->slot == MX_CPU_SLOT ? "{:f, 32} or {:f, 64} on the CPU"
                                             : "{:f, 32} or {:bf, 16} on CUDA",
                     dtype_term(env, t0->dtype));
  }
  for (int i = 1; i < n; i++) {
    const mx_tensor *t = c->t[i];
    if (t->slot != t0->slot) {
      act_release(c);
      return raise_arg(env, op, "%s is on %T but %s is on %T (all tensors must be on one device)",
                       names[i], device_term(env, t->slot), names[0], device_term(env, t0->slot));
    }
    if (t->dtype != t0->dtype) {
      act_release(c);
      return raise_arg(env, op, "%s must have the type of %s, %T, got: %T", names[i], names[0],
                       dtype_term(env, t0->dtype), dtype_term(env, t->dtype));
    }
    int same = t->rank == t0->rank;
    for (int k = 0; same && k < t->rank; k++) same = t->shape[k] == t0->shape[k];
    if (!same) {
      act_release(c);
      return raise_arg(env, op, "%s must have the shape of %s, %T, got: %T", names[i], names[0],
                       shape_term(env, t0->shape, t0->rank), shape_term(env, t->shape, t->rank));
    }
  }
  *ok = 1;
  return 0;
}

static int get_act(ErlNifEnv *env, ERL_NIF_TERM term) {
  if (enif_is_identical(term, enif_make_atom(env, "silu"))) return MX_ACT_SILU;
  if (enif_is_identical(term, enif_make_atom(env, "gelu"))) return MX_ACT_GELU_TANH;
  if (enif_is_identical(term, enif_make_atom(env, "softplus"))) return MX_ACT_SOFTPLUS;
  if (enif_is_identical(term, enif_make_atom(env, "sigmoid"))) return MX_ACT_SIGMOID;
  return -1;
}

static const char *const ACT_OP_FWD[4] = {"silu", "gelu", "softplus", "sigmoid"};
static const char *const ACT_OP_BWD[4] = {"silu_backward", "gelu_backward", "softplus_backward",
                                          "sigmoid_backward"};

static void *tdata(mx_tensor *t) { return mx_data(t->storage, t); }

ERL_NIF_TERM nif_act_forward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  int act = get_act(env, argv[0]);
  if (act < 0)
    return raise_arg(env, "act_forward", "activation must be :silu, :gelu, :softplus or :sigmoid, "
                     "got: %.200T", argv[0]);
  const char *op = ACT_OP_FWD[act];
  static const char *const names[1] = {"x"};
  act_call call, *c = &call;
  int ok;
  ERL_NIF_TERM raised = act_parse(env, op, argv, 1, 1, names, c, &ok);
  if (!ok) return raised;
  const mx_tensor *x = c->t[0];
#define OP op
  MAYBE_RESCHEDULE(nif_act_forward, x->slot, x->nbytes * 8, c->s[0]);
#undef OP
  mx_tensor *y = output_new(env, op, x->slot, x->dtype, x->shape, x->rank, &raised, NULL);
  if (!y) {
    act_release(c);
    return raised;
  }
  mx_err err = {0, {0}};
  size_t n = tensor_numel(x);
  int rc = n ? mx_backend_for(x->slot)->act_forward(mx_backend_dev(x->slot), act, x->dtype,
                                                     mx_data(c->s[0], x), tdata(y), n, &err)
             : MX_OK;
  act_release(c);
  return finish(env, op, rc, &err, y);
}

ERL_NIF_TERM nif_act_backward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  int act = get_act(env, argv[0]);
  if (act < 0)
    return raise_arg(env, "act_backward", "activation must be :silu, :gelu, :softplus or "
                     ":sigmoid, got: %.200T", argv[0]);
  const char *op = ACT_OP_BWD[act];
  static const char *const names[2] = {"x", "dy"};
  act_call call, *c = &call;
  int ok;
  ERL_NIF_TERM raised = act_parse(env, op, argv, 1, 2, names, c, &ok);
  if (!ok) return raised;
  const mx_tensor *x = c->t[0];
#define OP op
  MAYBE_RESCHEDULE(nif_act_backward, x->slot, x->nbytes * 12, c->s[0], c->s[1]);
#undef OP
  mx_tensor *dx = output_new(env, op, x->slot, x->dtype, x->shape, x->rank, &raised, NULL);
  if (!dx) {
    act_release(c);
    return raised;
  }
  mx_err err = {0, {0}};
  size_t n = tensor_numel(x);
  int rc = n ? mx_backend_for(x->slot)->act_backward(mx_backend_dev(x->slot), act, x->dtype,
                                                      mx_data(c->s[0], x),
                                                      mx_data(c->s[1], c->t[1]), tdata(dx), n,
                                                      &err)
             : MX_OK;
  act_release(c);
  return finish(env, op, rc, &err, dx);
}

#define OP "swiglu"
ERL_NIF_TERM nif_swiglu_forward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  static const char *const names[2] = {"a", "b"};
  act_call call, *c = &call;
  int ok;
  ERL_NIF_TERM raised = act_parse(env, OP, argv, 0, 2, names, c, &ok);
  if (!ok) return raised;
  const mx_tensor *a = c->t[0];
  MAYBE_RESCHEDULE(nif_swiglu_forward, a->slot, a->nbytes * 12, c->s[0], c->s[1]);
  mx_tensor *out = output_new(env, OP, a->slot, a->dtype, a->shape, a->rank, &raised, NULL);
  if (!out) {
    act_release(c);
    return raised;
  }
  mx_err err = {0, {0}};
  size_t n = tensor_numel(a);
  int rc = n ? mx_backend_for(a->slot)->swiglu_forward(mx_backend_dev(a->slot), a->dtype,
                                                        mx_data(c->s[0], a),
                                                        mx_data(c->s[1], c->t[1]), tdata(out), n,
                                                        &err)
             : MX_OK;
  act_release(c);
  return finish(env, OP, rc, &err, out);
}
#undef OP

#define OP "swiglu_backward"
ERL_NIF_TERM nif_swiglu_backward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  static const char *const names[3] = {"a", "b", "dout"};
  act_call call, *c = &call;
  int ok;
  ERL_NIF_TERM raised = act_parse(env, OP, argv, 0, 3, names, c, &ok);
  if (!ok) return raised;
  const mx_tensor *a = c->t[0];
  MAYBE_RESCHEDULE(nif_swiglu_backward, a->slot, a->nbytes * 20, c->s[0], c->s[1], c->s[2]);
  mx_tensor *da = output_new(env, OP, a->slot, a->dtype, a->shape, a->rank, &raised, NULL);
  mx_tensor *db = da ? output_new(env, OP, a->slot, a->dtype, a->shape, a->rank, &raised, NULL) : NULL;
  if (!db) {
    output_drop(da);
    act_release(c);
    return raised;
  }
  mx_err err = {0, {0}};
  size_t n = tensor_numel(a);
  int rc = n ? mx_backend_for(a->slot)->swiglu_backward(
                   mx_backend_dev(a->slot), a->dtype, mx_data(c->s[0], a),
                   mx_data(c->s[1], c->t[1]), mx_data(c->s[2], c->t[2]), tdata(da), tdata(db), n,
                   &err)
             : MX_OK;
  act_release(c);
  if (rc != MX_OK) {
    output_drop(da);
    output_drop(db);
    return raise_err(env, OP, &err);
  }
  return enif_make_tuple2(env, tensor_term(env, da), tensor_term(env, db));
}
#undef OP

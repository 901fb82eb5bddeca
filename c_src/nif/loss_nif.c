/*
 * loss_nif.c: the loss NIFs (Mambex.Loss).
 *
 *   cross_entropy(logits, targets, weights | nil, reduction, ignore_index | nil,
 *                 scale, grad :: boolean) -> {loss, dlogits | nil}
 *   mse(pred, target, reduction, scale, grad :: boolean) -> {loss, dpred | nil}
 *
 * Shapes: logits (..., C) with C >= 1, the leading axes flattened into rows;
 * targets {:s, 32} with the leading shape of logits (rank - 1 axes: {} for a
 * single row); weights (C). pred and target share one shape (any rank). The
 * loss is a new rank-0 tensor of the param type; dlogits / dpred new tensors
 * shaped and typed like logits / pred. reduction is :mean or :sum; scale any
 * number; ignore_index an integer (int64 range) or nil.
 *
 * Types: on the CPU io is {:f, 32} or {:f, 64} and param == io; on CUDA io
 * is {:f, 32} or {:bf, 16} and param is {:f, 32} (weights are param).
 *
 * Invariants (those of mambex_nif.c): every argument is checked before
 * anything is allocated or any backend is called, and every failure raises
 * ArgumentError naming the op and the argument; storage references taken are
 * released on every path; the op moves to a dirty scheduler (CPU-bound for
 * large host calls, IO-bound for CUDA enqueues) before allocating, and is
 * parsed again there. Out-of-range targets cannot be checked here (the
 * targets may live on a GPU): the backend turns them into NaN.
 */
#include <string.h>

#include "nif_common.h"

static void release3(mx_storage *a, mx_storage *b, mx_storage *c) {
  mx_storage_release(a);
  mx_storage_release(b);
  mx_storage_release(c);
}

static int get_reduction(ERL_NIF_TERM term, int *mean) {
  if (enif_is_identical(term, A_MEAN)) {
    *mean = 1;
    return 1;
  }
  if (enif_is_identical(term, A_SUM)) {
    *mean = 0;
    return 1;
  }
  return 0;
}

static int get_bool(ERL_NIF_TERM term, int *out) {
  if (enif_is_identical(term, A_TRUE)) *out = 1;
  else if (enif_is_identical(term, A_FALSE)) *out = 0;
  else return 0;
  return 1;
}

/* The io types a device takes, for messages. */
static const char *io_types(int slot) {
  return slot == MX_CPU_SLOT ? "{:f, 32} or {:f, 64} on the CPU" : "{:f, 32} or {:bf, 16} on CUDA";
}

/* A dtype as Elixir writes it. */
static const char *type_name(int dt) {
  static const char *const names[MX_NUM_DTYPES] = {"{:f, 32}", "{:f, 64}", "{:bf, 16}",
                                                   "{:f, 16}", "{:s, 32}", "{:s, 64}", "{:u, 8}"};
  return dt >= 0 && dt < MX_NUM_DTYPES ? names[dt] : "?";
}

static int io_ok(int slot, int dt) {
  return slot == MX_CPU_SLOT ? (dt == MX_F32 || dt == MX_F64) : (dt == MX_F32 || dt == MX_BF16);
}

static ERL_NIF_TERM no_kernel(ErlNifEnv *env, const char *op, int slot) {
  mx_err e = {MX_E_RUNTIME, {0}};
  snprintf(e.msg, sizeof e.msg, "the %s backend has no %s kernel", mx_backend_for(slot)->name, op);
  return raise_err(env, op, &e);
}

/* Raise after releasing the call's storages. */
#define XENT_FAIL(...)                          \
  do {                                          \
    release3(ls, ts, ws);                       \
    return raise_arg(env, OP, __VA_ARGS__);     \
  } while (0)

#define OP "cross_entropy"
ERL_NIF_TERM nif_cross_entropy(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  mx_tensor *lt = NULL, *tt = NULL, *wt = NULL;
  mx_storage *ls = NULL, *ts = NULL, *ws = NULL;
  if (!get_tensor_any(env, argv[0], &lt))
    return raise_arg(env, OP, "logits must be a Mambex.Tensor, got: %.200T", argv[0]);
  if (!(ls = mx_tensor_acquire(lt))) return raise_arg(env, OP, "logits was freed and cannot be used");
  if (!get_tensor_any(env, argv[1], &tt))
    XENT_FAIL("targets must be a Mambex.Tensor, got: %.200T", argv[1]);
  if (!(ts = mx_tensor_acquire(tt))) XENT_FAIL("targets was freed and cannot be used");
  if (!enif_is_identical(argv[2], A_NIL)) {
    if (!get_tensor_any(env, argv[2], &wt))
      XENT_FAIL("weights must be a Mambex.Tensor or nil, got: %.200T", argv[2]);
    if (!(ws = mx_tensor_acquire(wt))) XENT_FAIL("weights was freed and cannot be used");
  }
  int mean, grad, has_ignore = 0;
  ErlNifSInt64 ignore = 0;
  double scale;
  if (!get_reduction(argv[3], &mean))
    XENT_FAIL("reduction must be :mean or :sum, got: %.200T", argv[3]);
  if (!enif_is_identical(argv[4], A_NIL)) {
    if (!enif_get_int64(env, argv[4], &ignore))
      XENT_FAIL("ignore_index must be an integer (64-bit) or nil, got: %.200T", argv[4]);
    has_ignore = 1;
  }
  if (!get_number(env, argv[5], &scale))
    XENT_FAIL("scale must be a number, got: %.200T", argv[5]);
  if (!get_bool(argv[6], &grad)) XENT_FAIL("grad must be true or false, got: %.200T", argv[6]);

  const int slot = lt->slot;
  if (tt->slot != slot)
    XENT_FAIL("targets is on %T but logits is on %T (all tensors must be on one device)",
              device_term(env, tt->slot), device_term(env, slot));
  if (wt && wt->slot != slot)
    XENT_FAIL("weights is on %T but logits is on %T (all tensors must be on one device)",
              device_term(env, wt->slot), device_term(env, slot));
  const int io = lt->dtype;
  if (!io_ok(slot, io))
    XENT_FAIL("logits must have type %s, got: %s", io_types(slot), type_name(io));
  const int param = slot == MX_CPU_SLOT ? io : MX_F32;
  if (tt->dtype != MX_S32)
    XENT_FAIL("targets must have type {:s, 32}, got: %s", type_name(tt->dtype));
  if (wt && wt->dtype != param)
    XENT_FAIL("weights must have type %s (the parameter type), got: %s", type_name(param),
              type_name(wt->dtype));

  if (lt->rank < 1)
    XENT_FAIL("logits must have at least one axis (..., classes), got: %T",
              shape_term(env, lt->shape, lt->rank));
  const int64_t C = lt->shape[lt->rank - 1];
  if (C < 1) XENT_FAIL("logits must have at least one class (last axis), got: %T",
                       shape_term(env, lt->shape, lt->rank));
  int same = tt->rank == lt->rank - 1;
  for (int i = 0; same && i < tt->rank; i++) same = tt->shape[i] == lt->shape[i];
  if (!same)
    XENT_FAIL("targets must have the leading shape of logits, %T, got: %T",
              shape_term(env, lt->shape, lt->rank - 1), shape_term(env, tt->shape, tt->rank));
  if (wt && (wt->rank != 1 || wt->shape[0] != C))
    XENT_FAIL("weights must have shape {%ld} (the classes), got: %T", (long)C,
              shape_term(env, wt->shape, wt->rank));

  const mx_backend *be = mx_backend_for(slot);
  if (!be->cross_entropy) {
    release3(ls, ts, ws);
    return no_kernel(env, OP, slot);
  }
  MAYBE_RESCHEDULE(nif_cross_entropy, slot, 2 * lt->nbytes, ls, ts, ws);

  ERL_NIF_TERM raised = 0;
  mx_tensor *loss = output_new(env, OP, slot, param, NULL, 0, &raised, NULL);
  mx_tensor *dl = NULL;
  if (loss && grad) {
    dl = output_new(env, OP, slot, io, lt->shape, lt->rank, &raised, NULL);
    if (!dl) {
      output_drop(loss);
      loss = NULL;
    }
  }
  if (!loss) {
    release3(ls, ts, ws);
    return raised;
  }
  mx_xent_args a;
  memset(&a, 0, sizeof a);
  a.classes = C;
  a.rows = (int64_t)(tensor_numel(lt) / (size_t)C);
  a.io = io;
  a.param = param;
  a.logits = mx_data(ls, lt);
  a.targets = (const int32_t *)mx_data(ts, tt);
  a.weights = wt ? mx_data(ws, wt) : NULL;
  a.has_ignore = has_ignore;
  a.ignore_index = ignore;
  a.mean = mean;
  a.scale = scale;
  mx_err err = {0, {0}};
  int rc = be->cross_entropy(mx_backend_dev(slot), &a, mx_data(loss->storage, loss),
                             dl ? mx_data(dl->storage, dl) : NULL, &err);
  release3(ls, ts, ws);
  if (rc != MX_OK) {
    output_drop(loss);
    output_drop(dl);
    return raise_err(env, OP, &err);
  }
  return enif_make_tuple2(env, tensor_term(env, loss), dl ? tensor_term(env, dl) : A_NIL);
}
#undef OP
#undef XENT_FAIL

#define MSE_FAIL(...)                           \
  do {                                          \
    release3(ps, ys, NULL);                     \
    return raise_arg(env, OP, __VA_ARGS__);     \
  } while (0)

#define OP "mse"
ERL_NIF_TERM nif_mse(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  mx_tensor *pt = NULL, *yt = NULL;
  mx_storage *ps = NULL, *ys = NULL;
  if (!get_tensor_any(env, argv[0], &pt))
    return raise_arg(env, OP, "pred must be a Mambex.Tensor, got: %.200T", argv[0]);
  if (!(ps = mx_tensor_acquire(pt))) return raise_arg(env, OP, "pred was freed and cannot be used");
  if (!get_tensor_any(env, argv[1], &yt))
    MSE_FAIL("target must be a Mambex.Tensor, got: %.200T", argv[1]);
  if (!(ys = mx_tensor_acquire(yt))) MSE_FAIL("target was freed and cannot be used");
  int mean, grad;
  double scale;
  if (!get_reduction(argv[2], &mean))
    MSE_FAIL("reduction must be :mean or :sum, got: %.200T", argv[2]);
  if (!get_number(env, argv[3], &scale)) MSE_FAIL("scale must be a number, got: %.200T", argv[3]);
  if (!get_bool(argv[4], &grad)) MSE_FAIL("grad must be true or false, got: %.200T", argv[4]);

  const int slot = pt->slot;
  if (yt->slot != slot)
    MSE_FAIL("target is on %T but pred is on %T (all tensors must be on one device)",
             device_term(env, yt->slot), device_term(env, slot));
  const int io = pt->dtype;
  if (!io_ok(slot, io))
    MSE_FAIL("pred must have type %s, got: %s", io_types(slot), type_name(io));
  if (yt->dtype != io)
    MSE_FAIL("target must have type %s (the type of pred), got: %s", type_name(io),
             type_name(yt->dtype));
  int same = yt->rank == pt->rank;
  for (int i = 0; same && i < pt->rank; i++) same = yt->shape[i] == pt->shape[i];
  if (!same)
    MSE_FAIL("target must have the shape of pred, %T, got: %T",
             shape_term(env, pt->shape, pt->rank), shape_term(env, yt->shape, yt->rank));
  const int param = slot == MX_CPU_SLOT ? io : MX_F32;

  const mx_backend *be = mx_backend_for(slot);
  if (!be->mse) {
    release3(ps, ys, NULL);
    return no_kernel(env, OP, slot);
  }
  MAYBE_RESCHEDULE(nif_mse, slot, 2 * pt->nbytes, ps, ys);

  ERL_NIF_TERM raised = 0;
  mx_tensor *loss = output_new(env, OP, slot, param, NULL, 0, &raised, NULL);
  mx_tensor *dp = NULL;
  if (loss && grad) {
    dp = output_new(env, OP, slot, io, pt->shape, pt->rank, &raised, NULL);
    if (!dp) {
      output_drop(loss);
      loss = NULL;
    }
  }
  if (!loss) {
    release3(ps, ys, NULL);
    return raised;
  }
  mx_err err = {0, {0}};
  int rc = be->mse(mx_backend_dev(slot), io, param, mx_data(ps, pt), mx_data(ys, yt),
                   tensor_numel(pt), mean, scale, mx_data(loss->storage, loss),
                   dp ? mx_data(dp->storage, dp) : NULL, &err);
  release3(ps, ys, NULL);
  if (rc != MX_OK) {
    output_drop(loss);
    output_drop(dp);
    return raise_err(env, OP, &err);
  }
  return enif_make_tuple2(env, tensor_term(env, loss), dp ? tensor_term(env, dp) : A_NIL);
}
#undef OP
#undef MSE_FAIL

/*
 * scan_nif.c: the selective scan NIFs (Mambex.Scan).
 *
 *   scan_forward(u, delta, a, b, c, d | nil, z | nil, delta_bias | nil,
 *                softplus, initial_state | nil, reset | nil, checkpoints :: boolean)
 *     -> {out, final_state, checkpoints | nil}
 *   scan_backward(<the same 11>, d_out, d_final_state | nil, checkpoints | nil)
 *     -> %{u: du, delta: ddelta, a: dA, b: dB, c: dC, [d: dD], [z: dz],
 *          [delta_bias: ddelta_bias], [initial_state: dh0]}
 *
 * Checkpoints: when asked and the backend takes them (scan_ckpt_elems > 0),
 * the forward also returns a param-typed vector of states in the backend's
 * layout, and the backward given it skips re-running the forward. Its size
 * is checked against the call; its contents are the caller's (Mambex.Scan
 * keeps it in the context beside the inputs it came from).
 *
 * Shapes: u, delta, z, d_out (B, L, D); a (D, N) with 1 <= N <= 256; b and c
 * (B, L, N) or (B, L, G, N) (one shape for both, D % G == 0); d and
 * delta_bias (D); initial_state, d_final_state and the final state (B, D, N);
 * reset {:u, 8} (B, L). Types: "io" tensors (u, delta, z, b, c, d_out, out
 * and their gradients) share one type; "param" tensors (a, d, delta_bias,
 * the states and their gradients) have the param type. On the CPU io is f32
 * or f64 and param == io; on CUDA io is f32, bf16 or f16 and param is f32.
 * B = 0, L = 0 and D = 0 are accepted: outputs are empty, the final state
 * is the initial state (or zeros), and with L = 0 the gradient of the
 * initial state is d_final_state (or zeros) and dA, dD, ddelta_bias are 0.
 *
 * Invariants (those of mambex_nif.c): every argument is checked here before
 * anything is allocated or any backend is called, and every failure raises
 * ArgumentError naming the op and the argument; storage references taken
 * are released on every path; the op moves to a dirty scheduler (CPU for
 * host scans, IO for CUDA enqueues) before allocating, and is parsed again
 * there. The result map's keys are atoms made from constant names (never
 * from user data).
 */
#include <string.h>

#include "nif_common.h"

enum {
  S_U, S_DELTA, S_A, S_B, S_C, S_D, S_Z, S_BIAS, S_H0, S_RESET, S_DOUT, S_DHL, S_COUNT
};

/* Argument names as the Elixir API spells them; argv index of each. */
static const char *const ARG_NAME[S_COUNT] = {
    "u", "delta", "a", "b", "c", "d", "z", "delta_bias", "initial_state", "reset",
    "d_out", "d_final_state"};
static const int ARG_INDEX[S_COUNT] = {0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12};
static const int ARG_OPTIONAL[S_COUNT] = {0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 1};
#define SOFTPLUS_INDEX 8
#define MAX_STATE 256

typedef struct {
  mx_tensor *t[S_COUNT];
  mx_storage *s[S_COUNT];
  int slot, io, param, softplus;
  int64_t B, L, D, N, G;
} scan_call;

static void scan_release(scan_call *c) {
  for (int i = 0; i < S_COUNT; i++) {
    mx_storage_release(c->s[i]);
    c->s[i] = NULL;
  }
}

static const void *scan_ptr(const scan_call *c, int i) {
  return c->t[i] ? mx_data(c->s[i], c->t[i]) : NULL;
}

/* Raise ArgumentError after releasing the call's storages. */
#define SCAN_FAIL(...)                \
  do {                                \
    scan_release(c);                  \
    *ok = 0;                          \
    return raise_arg(env, op, __VA_ARGS__); \
  } while (0)

/* Decodes and checks the arguments of either NIF (n_args tensors: S_DOUT
 * and S_DHL only for the backward). On success *ok = 1 and every given
 * tensor holds a storage reference in c->s; otherwise the return value is
 * the raised exception and nothing is held. */
static ERL_NIF_TERM scan_parse(ErlNifEnv *env, const char *op, const ERL_NIF_TERM argv[],
                               int n_args, scan_call *c, int *ok) {
  memset(c, 0, sizeof *c);
  *ok = 1;
  for (int i = 0; i < n_args; i++) {
    ERL_NIF_TERM term = argv[ARG_INDEX[i]];
    if (ARG_OPTIONAL[i] && enif_is_identical(term, A_NIL)) continue;
    if (!get_tensor_any(env, term, &c->t[i]))
      SCAN_FAIL("%s must be a Mambex.Tensor%s, got: %.200T", ARG_NAME[i],
                ARG_OPTIONAL[i] ? " or nil" : "", term);
    c->s[i] = mx_tensor_acquire(c->t[i]);
    if (!c->s[i]) SCAN_FAIL("%s was freed and cannot be used", ARG_NAME[i]);
  }
  ERL_NIF_TERM sp = argv[SOFTPLUS_INDEX];
  if (enif_is_identical(sp, A_TRUE)) c->softplus = 1;
  else if (enif_is_identical(sp, A_FALSE)) c->softplus = 0;
  else SCAN_FAIL("softplus must be true or false, got: %.200T", sp);

  /* One device. */
  const mx_tensor *u = c->t[S_U];
  c->slot = u->slot;
  for (int i = 1; i < n_args; i++)
    if (c->t[i] && c->t[i]->slot != c->slot)
      SCAN_FAIL("%s is on %T but u is on %T (all tensors must be on one device)", ARG_NAME[i],
                device_term(env, c->t[i]->slot), device_term(env, c->slot));

  /* Types. */
  c->io = u->dtype;
  if (c->slot == MX_CPU_SLOT) {
    if (c->io != MX_F32 && c->io != MX_F64)
      SCAN_FAIL("u must have type {:f, 32} or {:f, 64} on the CPU, got: %T",
                dtype_term(env, c->io));
    c->param = c->io;
  } else {
    if (c->io != MX_F32 && c->io != MX_BF16 && c->io != MX_F16)
      SCAN_FAIL("u must have type {:f, 32}, {:bf, 16} or {:f, 16} on CUDA, got: %T",
                dtype_term(env, c->io));
    c->param = MX_F32;
  }
  static const int IS_IO[S_COUNT] = {1, 1, 0, 1, 1, 0, 1, 0, 0, 0, 1, 0};
  for (int i = 1; i < n_args; i++) {
    if (!c->t[i]) continue;
    int want = i == S_RESET ? MX_U8 : IS_IO[i] ? c->io : c->param;
    if (c->t[i]->dtype != want)
      SCAN_FAIL("%s must have type %T%s, got: %T", ARG_NAME[i], dtype_term(env, want),
                i == S_RESET ? "" : IS_IO[i] ? " (the type of u)" : " (the parameter type)",
                dtype_term(env, c->t[i]->dtype));
  }

  /* Shapes. */
  if (u->rank != 3)
    SCAN_FAIL("u must have shape {batch, length, channels}, got: %T",
              shape_term(env, u->shape, u->rank));
  c->B = u->shape[0];
  c->L = u->shape[1];
  c->D = u->shape[2];
  const int64_t bld[3] = {c->B, c->L, c->D};
  const int io3[3] = {S_DELTA, S_Z, S_DOUT};
  for (int k = 0; k < 3; k++) {
    const mx_tensor *t = c->t[io3[k]];
    if (t && !tensor_has_shape(t, 3, bld))
      SCAN_FAIL("%s must have the shape of u, %T, got: %T", ARG_NAME[io3[k]],
                shape_term(env, bld, 3), shape_term(env, t->shape, t->rank));
  }
  const mx_tensor *A = c->t[S_A];
  if (A->rank != 2 || A->shape[0] != c->D)
    SCAN_FAIL("a must have shape {channels, states} = {%ld, N}, got: %T", (long)c->D,
              shape_term(env, A->shape, A->rank));
  c->N = A->shape[1];
  if (c->N < 1 || c->N > MAX_STATE)
    SCAN_FAIL("a: the number of states N (a's second axis) must be in 1..%d, got: %ld",
              MAX_STATE, (long)c->N);
  const mx_tensor *Bm = c->t[S_B], *Cm = c->t[S_C];
  if (Bm->rank == 3 && Bm->shape[0] == c->B && Bm->shape[1] == c->L && Bm->shape[2] == c->N) {
    c->G = 1;
  } else if (Bm->rank == 4 && Bm->shape[0] == c->B && Bm->shape[1] == c->L &&
             Bm->shape[3] == c->N) {
    c->G = Bm->shape[2];
    if (c->G < 1) SCAN_FAIL("b: the number of groups must be at least 1, got: 0");
  } else {
    const int64_t want3[3] = {c->B, c->L, c->N};
    SCAN_FAIL("b must have shape %T or {batch, length, groups, states}, got: %T",
              shape_term(env, want3, 3), shape_term(env, Bm->shape, Bm->rank));
  }
  if (!tensor_has_shape(Cm, Bm->rank, Bm->shape))
    SCAN_FAIL("c must have the shape of b, %T, got: %T", shape_term(env, Bm->shape, Bm->rank),
              shape_term(env, Cm->shape, Cm->rank));
  if (c->D % c->G != 0)
    SCAN_FAIL("b: the channels (%ld) must be divisible by the groups (%ld)", (long)c->D,
              (long)c->G);
  const int vecs[2] = {S_D, S_BIAS};
  for (int k = 0; k < 2; k++) {
    const mx_tensor *t = c->t[vecs[k]];
    if (t && !tensor_has_shape(t, 1, &c->D))
      SCAN_FAIL("%s must have shape {%ld}, got: %T", ARG_NAME[vecs[k]], (long)c->D,
                shape_term(env, t->shape, t->rank));
  }
  const int64_t bdn[3] = {c->B, c->D, c->N};
  const int states[2] = {S_H0, S_DHL};
  for (int k = 0; k < 2; k++) {
    const mx_tensor *t = c->t[states[k]];
    if (t && !tensor_has_shape(t, 3, bdn))
      SCAN_FAIL("%s must have shape {batch, channels, states} = %T, got: %T",
                ARG_NAME[states[k]], shape_term(env, bdn, 3), shape_term(env, t->shape, t->rank));
  }
  const mx_tensor *R = c->t[S_RESET];
  if (R && !tensor_has_shape(R, 2, bld))
    SCAN_FAIL("reset must have shape {batch, length} = %T, got: %T", shape_term(env, bld, 2),
              shape_term(env, R->shape, R->rank));
  return 0;
}
#undef SCAN_FAIL

static mx_scan_args scan_args(const scan_call *c) {
  mx_scan_args a;
  memset(&a, 0, sizeof a);
  a.batch = c->B;
  a.len = c->L;
  a.dim = c->D;
  a.dstate = c->N;
  a.groups = c->G;
  a.io = c->io;
  a.param = c->param;
  a.softplus = c->softplus;
  a.u = scan_ptr(c, S_U);
  a.delta = scan_ptr(c, S_DELTA);
  a.A = scan_ptr(c, S_A);
  a.Bm = scan_ptr(c, S_B);
  a.Cm = scan_ptr(c, S_C);
  a.Dskip = scan_ptr(c, S_D);
  a.z = scan_ptr(c, S_Z);
  a.delta_bias = scan_ptr(c, S_BIAS);
  a.h0 = scan_ptr(c, S_H0);
  a.reset = scan_ptr(c, S_RESET);
  return a;
}

/* Work estimate that picks the scheduler: the (b, t, d, n) elements of the
 * recurrence, counted as 4 bytes each (16 for f64, whose exp is a libm call),
 * saturating. Below MX_INLINE_BYTES (65536 f32 elements, ~0.1 ms) a CPU
 * scan runs on the calling normal scheduler. */
static size_t scan_work(const scan_call *c) {
  double w = (c->io == MX_F64 ? 16.0 : 4.0) * (double)c->B * (double)c->L * (double)c->D *
             (double)c->N;
  return w >= 1e18 ? (size_t)1 << 60 : (size_t)w;
}

static ERL_NIF_TERM no_kernel(ErlNifEnv *env, const char *op, const scan_call *c) {
  mx_err e = {MX_E_RUNTIME, {0}};
  snprintf(e.msg, sizeof e.msg, "the %s backend has no %s kernel", mx_backend_for(c->slot)->name,
           op);
  return raise_err(env, op, &e);
}

#define OP "scan_forward"
ERL_NIF_TERM nif_scan_forward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  scan_call call, *c = &call;
  int ok;
  ERL_NIF_TERM raised = scan_parse(env, OP, argv, S_RESET + 1, c, &ok);
  if (!ok) return raised;
  const int want_ck = enif_is_identical(argv[11], enif_make_atom(env, "true"));
  if (!want_ck && !enif_is_identical(argv[11], enif_make_atom(env, "false"))) {
    scan_release(c);
    return raise_arg(env, OP, "checkpoints must be true or false, got: %.200T", argv[11]);
  }
  const mx_backend *be = mx_backend_for(c->slot);
  if (!be->scan_forward) {
    scan_release(c);
    return no_kernel(env, OP, c);
  }
  MAYBE_RESCHEDULE(nif_scan_forward, c->slot, scan_work(c), c->s[0], c->s[1], c->s[2], c->s[3],
                   c->s[4], c->s[5], c->s[6], c->s[7], c->s[8], c->s[9]);
  const int64_t bld[3] = {c->B, c->L, c->D}, bdn[3] = {c->B, c->D, c->N};
  mx_tensor *out = output_new(env, OP, c->slot, c->io, bld, 3, &raised, &ok);
  mx_tensor *hl = ok ? output_new(env, OP, c->slot, c->param, bdn, 3, &raised, &ok) : NULL;
  if (!ok) {
    output_drop(out);
    scan_release(c);
    return raised;
  }
  mx_err err = {0, {0}};
  const int dev = mx_backend_dev(c->slot);
  int rc = MX_OK;
  mx_tensor *ck = NULL;
  if (c->B * c->L * c->D > 0) {
    mx_scan_args a = scan_args(c);
    int64_t ck_elems = want_ck && be->scan_ckpt_elems ? be->scan_ckpt_elems(dev, &a) : 0;
    if (ck_elems > 0) {
      ck = output_new(env, OP, c->slot, c->param, &ck_elems, 1, &raised, &ok);
      if (!ok) {
        output_drop(out);
        output_drop(hl);
        scan_release(c);
        return raised;
      }
      a.ckpt = mx_data(ck->storage, ck);
    }
    rc = be->scan_forward(dev, &a, mx_data(out->storage, out), mx_data(hl->storage, hl), &err);
  } else if (c->B * c->D * c->N > 0) { /* L = 0: the final state is the initial one */
    void *dst = mx_data(hl->storage, hl);
    size_t bytes = hl->nbytes;
    rc = c->t[S_H0] ? be->copy2d(dev, dst, bytes, scan_ptr(c, S_H0), bytes, bytes, 1, &err)
                    : be->fill(dev, c->param, dst, tensor_numel(hl), MX_ZERO, &err);
  }
  scan_release(c);
  if (rc != MX_OK) {
    output_drop(out);
    output_drop(hl);
    output_drop(ck);
    return raise_err(env, OP, &err);
  }
  return enif_make_tuple3(env, tensor_term(env, out), tensor_term(env, hl),
                          ck ? tensor_term(env, ck) : enif_make_atom(env, "nil"));
}
#undef OP

/* Gradient outputs in map order: the key and the input it is the gradient of. */
static const struct {
  const char *key;
  int arg;
} GRADS[] = {{"u", S_U},         {"delta", S_DELTA}, {"a", S_A},
             {"b", S_B},         {"c", S_C},         {"d", S_D},
             {"z", S_Z},         {"delta_bias", S_BIAS}, {"initial_state", S_H0}};
#define N_GRADS (sizeof GRADS / sizeof GRADS[0])

#define OP "scan_backward"
ERL_NIF_TERM nif_scan_backward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  scan_call call, *c = &call;
  int ok;
  ERL_NIF_TERM raised = scan_parse(env, OP, argv, S_COUNT, c, &ok);
  if (!ok) return raised;
  const mx_backend *be = mx_backend_for(c->slot);
  if (!be->scan_backward) {
    scan_release(c);
    return no_kernel(env, OP, c);
  }
  MAYBE_RESCHEDULE(nif_scan_backward, c->slot, 3 * scan_work(c), c->s[0], c->s[1], c->s[2],
                   c->s[3], c->s[4], c->s[5], c->s[6], c->s[7], c->s[8], c->s[9], c->s[10],
                   c->s[11]);
  /* One output per given input, shaped and typed like it. */
  mx_tensor *grad[N_GRADS] = {NULL};
  ok = 1;
  for (size_t i = 0; i < N_GRADS && ok; i++) {
    const mx_tensor *in = c->t[GRADS[i].arg];
    if (in) grad[i] = output_new(env, OP, c->slot, in->dtype, in->shape, in->rank, &raised, &ok);
  }
  if (!ok) {
    for (size_t i = 0; i < N_GRADS; i++) output_drop(grad[i]);
    scan_release(c);
    return raised;
  }
  void *gp[N_GRADS];
  for (size_t i = 0; i < N_GRADS; i++) gp[i] = grad[i] ? mx_data(grad[i]->storage, grad[i]) : NULL;
  mx_err err = {0, {0}};
  const int dev = mx_backend_dev(c->slot);
  int rc = MX_OK;
  mx_storage *cks = NULL;
  if (!enif_is_identical(argv[13], enif_make_atom(env, "nil"))) {
    mx_scan_args probe = scan_args(c);
    int64_t want = be->scan_ckpt_elems ? be->scan_ckpt_elems(dev, &probe) : 0;
    mx_tensor *ckt = NULL;
    const char *bad = !get_tensor_any(env, argv[13], &ckt) ? "must be a Mambex.Tensor or nil"
                      : !(cks = mx_tensor_acquire(ckt)) ? "was freed"
                      : (ckt->slot != c->slot || ckt->dtype != c->param || ckt->rank != 1 ||
                         ckt->shape[0] != want || want == 0)
                          ? "do not belong to this call (give the ones its forward returned)"
                          : NULL;
    if (bad) {
      mx_storage_release(cks);
      for (size_t i = 0; i < N_GRADS; i++) output_drop(grad[i]);
      scan_release(c);
      return raise_arg(env, OP, "checkpoints %s", bad);
    }
  }
  if (c->B * c->L * c->D > 0) {
    mx_scan_args a = scan_args(c);
    a.ckpt = cks ? cks->ptr : NULL;
    mx_scan_grads g = {.du = gp[0], .ddelta = gp[1], .dA = gp[2], .dB = gp[3], .dC = gp[4],
                       .dD = gp[5], .dz = gp[6], .ddelta_bias = gp[7], .dh0 = gp[8]};
    rc = be->scan_backward(dev, &a, scan_ptr(c, S_DOUT), scan_ptr(c, S_DHL), &g, &err);
    mx_storage_release(cks);
    cks = NULL;
  } else {
    mx_storage_release(cks);
    cks = NULL;
    /* Empty: the sums over batch and time are 0 and, with L = 0, the
     * gradient of the initial state is d_final_state (or 0). */
    const int zero_params[4] = {2, 5, 7, 8};
    for (int k = 0; k < 4 && rc == MX_OK; k++) {
      mx_tensor *t = grad[zero_params[k]];
      if (!t || tensor_numel(t) == 0) continue;
      void *dst = mx_data(t->storage, t);
      if (zero_params[k] == 8 && c->t[S_DHL])
        rc = be->copy2d(dev, dst, t->nbytes, scan_ptr(c, S_DHL), t->nbytes, t->nbytes, 1, &err);
      else
        rc = be->fill(dev, c->param, dst, tensor_numel(t), MX_ZERO, &err);
    }
  }
  scan_release(c);
  if (rc != MX_OK) {
    for (size_t i = 0; i < N_GRADS; i++) output_drop(grad[i]);
    return raise_err(env, OP, &err);
  }
  ERL_NIF_TERM keys[N_GRADS], vals[N_GRADS], map;
  unsigned n = 0;
  for (size_t i = 0; i < N_GRADS; i++) {
    if (!grad[i]) continue;
    keys[n] = enif_make_atom(env, GRADS[i].key);
    vals[n] = tensor_term(env, grad[i]);
    n++;
  }
  enif_make_map_from_arrays(env, keys, vals, n, &map);
  return map;
}
#undef OP

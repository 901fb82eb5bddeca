/*
 * infer_nif.c: the fused-inference NIFs (Mambex.Model's fused path and
 * Mambex.Stepper).
 *
 *   infer(cfg, top, layers, x, reset, states, in_place)
 *     -> out                                  when in_place is true
 *     -> {out, [{conv, ssm}, ...]}            when in_place is false
 *   infer_plan_new(cfg, top, layers, states)  -> plan reference
 *   infer_plan_step(plan, frames, resets)     -> logits binary
 *   infer_plan_info(plan)                     -> {batch, graphed, device_bytes, live, kernel}
 *   infer_plan_free(plan)                     -> :ok
 *
 * cfg = {features, d_model, d_inner, d_state, d_conv, dt_rank, outputs, eps,
 * blocks, step_channels} (blocks > 0: the general kernel with that many
 * blocks; step_channels > 0: the step kernel with that many channels a
 * block, -1: never the step kernel; 0, 0: the backend's choice); kernel
 * is :step or :general; top = [in_w, in_b, norm_f_w, head_w, head_b]; layers = one list
 * per layer of [norm_w, in_x_w, in_z_w, conv_w, conv_b, x_proj_w, dt_w,
 * dt_b, a_log, d, out_w] (shapes in backend.h, mx_infer_layer); x
 * {B, L, features}; reset nil or {B, L} {:u, 8}; states nil (zeros; not
 * with in_place) or one {conv {B, d_inner, d_conv - 1}, ssm {B, d_inner,
 * d_state}} per layer. Every tensor {:f, 32} on one CUDA device.
 * infer_plan_step takes the frames as a binary of B * features native f32
 * and the resets as nil or a binary of B bytes, and returns B * outputs
 * native f32.
 *
 * Invariants (those of mambex_nif.c): every argument is checked before
 * anything is allocated or a backend is called; failures raise
 * ArgumentError naming the op and the argument (layers[1][4]); every
 * storage reference taken is released on every path. A plan holds a
 * storage reference to every tensor its graph points at (parameters and
 * states) until it is freed (infer_plan_free or its destructor), so the
 * memory a replay touches cannot be released under it; its device bytes
 * are counted in the device's live bytes while it lives. infer_plan_step
 * holds the plan's mutex for the whole run (a plan is one set of pinned
 * buffers); free waits for it too. infer and infer_plan_step follow the
 * executor: with Mambex.set_executor(:inline) they run on the calling
 * scheduler (a step waits only for its own frame's work), otherwise on a
 * dirty IO scheduler.
 */
#include <math.h>
#include <string.h>

#include "nif_common.h"

#define NTOP 5
#define NLAYER 11

static ErlNifResourceType *PLAN_RT;

typedef struct {
  ErlNifMutex *mu;
  int slot;
  void *plan;           /* backend plan, NULL once freed */
  void *host_in, *host_out;
  size_t frame_bytes, reset_bytes, out_bytes, device_bytes;
  int64_t batch;
  unsigned nstor;
  mx_storage **stor;    /* the references the plan holds */
} mx_plan_res;

static const char *const TOP_NAME[NTOP] = {"in.weight", "in.bias", "norm_f.weight", "head.weight",
                                           "head.bias"};
static const char *const LAYER_NAME[NLAYER] = {
    "norm.weight", "in_proj_x.weight", "in_proj_z.weight", "conv.weight", "conv.bias",
    "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "a_log", "d", "out_proj.weight"};

/* What one call holds while it runs. */
typedef struct {
  mx_infer_args a;
  int slot;
  unsigned nstor;
  mx_storage *stor[NTOP + MX_INFER_MAX_LAYERS * (NLAYER + 2) + 2];
  uintptr_t lo[NTOP + MX_INFER_MAX_LAYERS * (NLAYER + 2) + 2]; /* byte range of each */
  uintptr_t hi[NTOP + MX_INFER_MAX_LAYERS * (NLAYER + 2) + 2];
  char names[NTOP + MX_INFER_MAX_LAYERS * (NLAYER + 2) + 2][40];
} call_t;

static void call_release(call_t *c) {
  for (unsigned i = 0; i < c->nstor; i++) mx_storage_release(c->stor[i]);
  c->nstor = 0;
}

#define FAIL(...)                             \
  do {                                        \
    call_release(c);                          \
    *ok = 0;                                  \
    return raise_arg(env, op, __VA_ARGS__);   \
  } while (0)

/* Takes a tensor argument of the given shape; its device pointer into *ptr. */
static ERL_NIF_TERM take(ErlNifEnv *env, const char *op, call_t *c, ERL_NIF_TERM term,
                         const char *name, int dtype, int rank, const int64_t *shape,
                         const void **ptr, int *ok) {
  mx_tensor *t;
  if (!get_tensor_any(env, term, &t)) FAIL("%s must be a Mambex.Tensor, got: %.200T", name, term);
  mx_storage *s = mx_tensor_acquire(t);
  if (!s) FAIL("%s was freed and cannot be used", name);
  c->stor[c->nstor++] = s;
  if (c->slot < 0) {
    if (t->slot == MX_CPU_SLOT) FAIL("%s must be on a CUDA device (the fused path is CUDA only)", name);
    c->slot = t->slot;
  }
  if (t->slot != c->slot)
    FAIL("%s is on %T but in.weight is on %T (all tensors must be on one device)", name,
         device_term(env, t->slot), device_term(env, c->slot));
  if (t->dtype != dtype)
    FAIL("%s must have type %T, got: %T", name, dtype_term(env, dtype), dtype_term(env, t->dtype));
  if (!tensor_has_shape(t, rank, shape))
    FAIL("%s must have shape %T, got: %T", name, shape_term(env, shape, rank),
         shape_term(env, t->shape, t->rank));
  *ptr = (const char *)s->ptr + t->offset;
  const unsigned at = c->nstor - 1;
  c->lo[at] = (uintptr_t)*ptr;
  c->hi[at] = c->lo[at] + tensor_numel(t) * mx_dtype_size(t->dtype);
  snprintf(c->names[at], sizeof c->names[at], "%s", name);
  return A_OK;
}

/* The states (taken last, from `first` on) are written: none may share
 * memory with any other tensor of the call. */
static ERL_NIF_TERM check_overlap(ErlNifEnv *env, const char *op, call_t *c, unsigned first, int *ok) {
  for (unsigned i = first; i < c->nstor; i++) {
    if (c->hi[i] == c->lo[i]) continue;
    for (unsigned j = 0; j < c->nstor; j++) {
      if (j == i || c->hi[j] == c->lo[j]) continue;
      if (c->lo[i] < c->hi[j] && c->lo[j] < c->hi[i]) {
        char a[64], b[64];
        snprintf(a, sizeof a, "%s", c->names[i]);
        snprintf(b, sizeof b, "%s", c->names[j]);
        FAIL("%s shares memory with %s (states are updated in place)", a, b);
      }
    }
  }
  return A_OK;
}

#define TAKE(term, name, dtype, rank, ptr, ...)                                           \
  do {                                                                                    \
    const int64_t sh_[] = {__VA_ARGS__};                                                  \
    ERL_NIF_TERM r_ = take(env, op, c, term, name, dtype, rank, sh_, (const void **)(ptr), ok); \
    if (!*ok) return r_;                                                                  \
  } while (0)

/* cfg, top and layers into c->a (sizes, parameters). */
static ERL_NIF_TERM parse_model(ErlNifEnv *env, const char *op, const ERL_NIF_TERM argv[],
                                call_t *c, int *ok) {
  memset(c, 0, sizeof *c);
  c->slot = -1;
  *ok = 1;
  mx_infer_args *a = &c->a;
  const ERL_NIF_TERM *cf;
  int arity;
  if (!enif_get_tuple(env, argv[0], &arity, &cf) || arity != 10)
    FAIL("cfg must be {features, d_model, d_inner, d_state, d_conv, dt_rank, outputs, eps, blocks, "
         "step_channels}, got: %.200T", argv[0]);
  static const char *const CFG[7] = {"features", "d_model", "d_inner", "d_state",
                                     "d_conv", "dt_rank", "outputs"};
  static const int64_t MAXV[7] = {MX_INFER_MAX_K, MX_INFER_MAX_K, MX_INFER_MAX_K, 32, 8,
                                  MX_INFER_MAX_K, 1 << 20};
  int64_t v[7];
  for (int i = 0; i < 7; i++) {
    ErlNifSInt64 x;
    if (!enif_get_int64(env, cf[i], &x) || x < 1 || x > MAXV[i])
      FAIL("%s must be an integer in 1..%ld for the fused path, got: %.100T", CFG[i],
           (long)MAXV[i], cf[i]);
    v[i] = x;
  }
  a->features = v[0];
  a->d_model = v[1];
  a->d_inner = v[2];
  a->d_state = v[3];
  a->d_conv = v[4];
  a->dt_rank = v[5];
  a->outputs = v[6];
  if (a->dt_rank + 2 * a->d_state > MX_INFER_MAX_K)
    FAIL("dt_rank + 2 * d_state must be at most %d, got: %ld", MX_INFER_MAX_K,
         (long)(a->dt_rank + 2 * a->d_state));
  if (!get_number(env, cf[7], &a->eps) || !(a->eps >= 0.0) || !isfinite(a->eps))
    FAIL("eps must be a finite number >= 0, got: %.100T", cf[7]);
  int blocks;
  if (!enif_get_int(env, cf[8], &blocks) || blocks < 0 || blocks > 4096)
    FAIL("blocks must be an integer in 0..4096, got: %.100T", cf[8]);
  a->blocks = blocks;
  int step_channels;
  if (!enif_get_int(env, cf[9], &step_channels) || step_channels < -1 || step_channels > 64)
    FAIL("step_channels must be an integer in -1..64, got: %.100T", cf[9]);
  if (blocks > 0 && step_channels > 0)
    FAIL("blocks (%d) and step_channels (%d) choose different kernels: set one", blocks, step_channels);
  a->step_channels = step_channels;

  unsigned n;
  if (!enif_get_list_length(env, argv[1], &n) || n != NTOP)
    FAIL("top must be a list of %d tensors (in.weight, in.bias, norm_f.weight, head.weight, "
         "head.bias), got: %.200T", NTOP, argv[1]);
  const int64_t F = a->features, DM = a->d_model, DI = a->d_inner, N = a->d_state,
                W = a->d_conv, RK = a->dt_rank, O = a->outputs;
  ERL_NIF_TERM list = argv[1], h;
  const void **tops[NTOP] = {&a->in_w, &a->in_b, &a->norm_f_w, &a->head_w, &a->head_b};
  for (int i = 0; i < NTOP; i++) {
    enif_get_list_cell(env, list, &h, &list);
    switch (i) {
      case 0: TAKE(h, TOP_NAME[i], MX_F32, 2, tops[i], F, DM); break;
      case 1: TAKE(h, TOP_NAME[i], MX_F32, 1, tops[i], DM); break;
      case 2: TAKE(h, TOP_NAME[i], MX_F32, 1, tops[i], DM); break;
      case 3: TAKE(h, TOP_NAME[i], MX_F32, 2, tops[i], DM, O); break;
      default: TAKE(h, TOP_NAME[i], MX_F32, 1, tops[i], O); break;
    }
  }
  unsigned nl;
  if (!enif_get_list_length(env, argv[2], &nl) || nl < 1 || nl > MX_INFER_MAX_LAYERS)
    FAIL("layers must be a list of 1..%d layers, got: %.100T", MX_INFER_MAX_LAYERS, argv[2]);
  a->n_layers = (int)nl;
  list = argv[2];
  for (unsigned l = 0; l < nl; l++) {
    ERL_NIF_TERM lt, ll, e;
    enif_get_list_cell(env, list, &lt, &list);
    unsigned k;
    if (!enif_get_list_length(env, lt, &k) || k != NLAYER)
      FAIL("layers[%u] must be a list of %d tensors, got: %.200T", l, NLAYER, lt);
    mx_infer_layer *y = &a->layers[l];
    const void **ps[NLAYER] = {&y->norm_w, &y->in_x_w, &y->in_z_w, &y->conv_w, &y->conv_b,
                               &y->x_proj_w, &y->dt_w, &y->dt_b, &y->a_log, &y->d, &y->out_w};
    ll = lt;
    for (int i = 0; i < NLAYER; i++) {
      enif_get_list_cell(env, ll, &e, &ll);
      char name[64];
      snprintf(name, sizeof name, "layers[%u] %s", l, LAYER_NAME[i]);
      switch (i) {
        case 0: TAKE(e, name, MX_F32, 1, ps[i], DM); break;
        case 1: case 2: TAKE(e, name, MX_F32, 2, ps[i], DM, DI); break;
        case 3: TAKE(e, name, MX_F32, 2, ps[i], DI, W); break;
        case 4: case 7: case 9: TAKE(e, name, MX_F32, 1, ps[i], DI); break;
        case 5: TAKE(e, name, MX_F32, 2, ps[i], DI, RK + 2 * N); break;
        case 6: TAKE(e, name, MX_F32, 2, ps[i], RK, DI); break;
        case 8: TAKE(e, name, MX_F32, 2, ps[i], DI, N); break;
        default: TAKE(e, name, MX_F32, 2, ps[i], DI, DM); break;
      }
    }
  }
  return A_OK;
}

/* The states list (one {conv, ssm} per layer) for batch B into c->a. */
static ERL_NIF_TERM parse_states(ErlNifEnv *env, const char *op, ERL_NIF_TERM term, int64_t B,
                                 call_t *c, int *ok) {
  mx_infer_args *a = &c->a;
  unsigned nl;
  if (!enif_get_list_length(env, term, &nl) || (int)nl != a->n_layers)
    FAIL("states must be a list of %d {conv, ssm} tuples, got: %.200T", a->n_layers, term);
  ERL_NIF_TERM list = term, h;
  for (int l = 0; l < a->n_layers; l++) {
    enif_get_list_cell(env, list, &h, &list);
    const ERL_NIF_TERM *tp;
    int arity;
    if (!enif_get_tuple(env, h, &arity, &tp) || arity != 2)
      FAIL("states[%d] must be a {conv, ssm} tuple, got: %.200T", l, h);
    char name[48];
    snprintf(name, sizeof name, "states[%d] conv", l);
    TAKE(tp[0], name, MX_F32, 3, &a->layers[l].conv_in, B, a->d_inner, a->d_conv - 1);
    snprintf(name, sizeof name, "states[%d] ssm", l);
    TAKE(tp[1], name, MX_F32, 3, &a->layers[l].ssm_in, B, a->d_inner, a->d_state);
  }
  return A_OK;
}

ERL_NIF_TERM nif_infer(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  const char *op = "infer";
  call_t call, *c = &call;
  int okv, *ok = &okv;
  ERL_NIF_TERM r = parse_model(env, op, argv, c, ok);
  if (!okv) return r;
  mx_infer_args *a = &c->a;
  /* x */
  mx_tensor *xt;
  if (!get_tensor_any(env, argv[3], &xt) || xt->rank != 3)
    FAIL("x must be a {B, L, features} Mambex.Tensor, got: %.200T", argv[3]);
  const int64_t B = xt->shape[0], L = xt->shape[1];
  if (B < 1 || L < 1 || B * L > (1 << 24)) FAIL("x must have 1 to 2^24 rows of steps, got: %T",
                                                shape_term(env, xt->shape, xt->rank));
  a->batch = B;
  a->len = L;
  TAKE(argv[3], "x", MX_F32, 3, &a->x, B, L, a->features);
  if (!enif_is_identical(argv[4], A_NIL)) TAKE(argv[4], "reset", MX_U8, 2, &a->reset, B, L);
  const int in_place = enif_is_identical(argv[6], A_TRUE);
  if (!in_place && !enif_is_identical(argv[6], A_FALSE))
    FAIL("in_place must be true or false, got: %.100T", argv[6]);
  if (enif_is_identical(argv[5], A_NIL)) {
    if (in_place) FAIL("in_place needs states");
  } else {
    const unsigned first = c->nstor;
    r = parse_states(env, op, argv[5], B, c, ok);
    if (!okv) return r;
    if (in_place) {
      r = check_overlap(env, op, c, first, ok);
      if (!okv) return r;
    }
  }
  const mx_backend *be = mx_backend_for(c->slot);
  if (!be || !be->infer) FAIL("the backend of %T has no fused inference", device_term(env, c->slot));

  const int slot = c->slot;
  {
    int f = resched_flags_enqueue(slot, 0);
    if (f) {
      call_release(c);
      return enif_schedule_nif(env, op, f, nif_infer, argc, argv);
    }
  }

  /* outputs */
  ERL_NIF_TERM raised;
  const int64_t oshape[3] = {B, L, a->outputs};
  mx_tensor *out = output_new(env, op, slot, MX_F32, oshape, 3, &raised, NULL);
  if (!out) {
    call_release(c);
    return raised;
  }
  a->out = (char *)out->storage->ptr;
  mx_tensor *st[2 * MX_INFER_MAX_LAYERS] = {0};
  for (int l = 0; l < a->n_layers; l++) {
    mx_infer_layer *y = &a->layers[l];
    if (in_place) {
      y->conv_out = (void *)y->conv_in;
      y->ssm_out = (void *)y->ssm_in;
      continue;
    }
    const int64_t cs[3] = {B, a->d_inner, a->d_conv - 1}, ss[3] = {B, a->d_inner, a->d_state};
    st[2 * l] = output_new(env, op, slot, MX_F32, cs, 3, &raised, NULL);
    st[2 * l + 1] = st[2 * l] ? output_new(env, op, slot, MX_F32, ss, 3, &raised, NULL) : NULL;
    if (!st[2 * l + 1]) {
      for (int i = 0; i < 2 * a->n_layers; i++) output_drop(st[i]);
      output_drop(out);
      call_release(c);
      return raised;
    }
    y->conv_out = st[2 * l]->storage->ptr;
    y->ssm_out = st[2 * l + 1]->storage->ptr;
  }
  mx_err err = {0, {0}};
  const int rc = be->infer(mx_backend_dev(slot), a, &err);
  call_release(c);
  if (rc != MX_OK) {
    for (int i = 0; i < 2 * a->n_layers; i++) output_drop(st[i]);
    output_drop(out);
    return raise_err(env, op, &err);
  }
  ERL_NIF_TERM out_term = tensor_term(env, out);
  if (in_place) return out_term;
  ERL_NIF_TERM states = enif_make_list(env, 0);
  for (int l = a->n_layers - 1; l >= 0; l--) {
    ERL_NIF_TERM conv = tensor_term(env, st[2 * l]);
    ERL_NIF_TERM ssm = tensor_term(env, st[2 * l + 1]);
    states = enif_make_list_cell(env, enif_make_tuple2(env, conv, ssm), states);
  }
  return enif_make_tuple2(env, out_term, states);
}

/* ------------------------------------------------------------------ plans */

static void plan_free_locked(mx_plan_res *p) {
  if (!p->plan) return;
  const mx_backend *be = mx_backend_for(p->slot);
  if (be && be->infer_plan_free) be->infer_plan_free(mx_backend_dev(p->slot), p->plan);
  p->plan = NULL;
  atomic_fetch_sub(&mx_stats_for(p->slot)->live_bytes, (long long)p->device_bytes);
  for (unsigned i = 0; i < p->nstor; i++) mx_storage_release(p->stor[i]);
  enif_free(p->stor);
  p->stor = NULL;
  p->nstor = 0;
}

static void plan_dtor(ErlNifEnv *env, void *obj) {
  (void)env;
  mx_plan_res *p = obj;
  plan_free_locked(p);
  if (p->stor) enif_free(p->stor); /* a plan whose creation failed holds none */
  p->stor = NULL;
  if (p->mu) enif_mutex_destroy(p->mu);
}

int infer_nif_open_types(ErlNifEnv *env, ErlNifResourceFlags flags) {
  ErlNifResourceFlags tried;
  PLAN_RT = enif_open_resource_type(env, NULL, "mambex_infer_plan", plan_dtor, flags, &tried);
  return PLAN_RT ? 0 : -1;
}

ERL_NIF_TERM nif_infer_plan_new(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  const char *op = "infer_plan_new";
  call_t call, *c = &call;
  int okv, *ok = &okv;
  ERL_NIF_TERM r = parse_model(env, op, argv, c, ok);
  if (!okv) return r;
  mx_infer_args *a = &c->a;
  /* the batch comes from the first layer's conv state */
  ERL_NIF_TERM h, tl;
  const ERL_NIF_TERM *tp;
  int arity;
  mx_tensor *t0;
  if (!enif_get_list_cell(env, argv[3], &h, &tl) || !enif_get_tuple(env, h, &arity, &tp) ||
      arity != 2 || !get_tensor_any(env, tp[0], &t0) || t0->rank != 3 || t0->shape[0] < 1 ||
      t0->shape[0] > (1 << 20))
    FAIL("states must be a list of {conv {B, d_inner, d_conv - 1}, ssm} tuples with 1 <= B <= 2^20, "
         "got: %.200T", argv[3]);
  const int64_t B = t0->shape[0];
  const unsigned first = c->nstor;
  r = parse_states(env, op, argv[3], B, c, ok);
  if (!okv) return r;
  r = check_overlap(env, op, c, first, ok);
  if (!okv) return r;
  a->batch = B;
  a->len = 1;
  for (int l = 0; l < a->n_layers; l++) {
    a->layers[l].conv_out = (void *)a->layers[l].conv_in;
    a->layers[l].ssm_out = (void *)a->layers[l].ssm_in;
  }
  const mx_backend *be = mx_backend_for(c->slot);
  if (!be || !be->infer_plan_new) FAIL("the backend of %T has no fused inference", device_term(env, c->slot));
  {
    int f = resched_flags(c->slot, 0);
    if (f) {
      call_release(c);
      return enif_schedule_nif(env, op, f, nif_infer_plan_new, argc, argv);
    }
  }
  mx_plan_res *p = enif_alloc_resource(PLAN_RT, sizeof *p);
  memset(p, 0, sizeof *p);
  p->slot = c->slot;
  p->batch = B;
  p->frame_bytes = (size_t)B * (size_t)a->features * sizeof(float);
  p->reset_bytes = (size_t)B;
  p->out_bytes = (size_t)B * (size_t)a->outputs * sizeof(float);
  p->mu = enif_mutex_create("mambex_infer_plan");
  p->stor = enif_alloc(c->nstor * sizeof *p->stor);
  if (!p->mu || !p->stor) {
    call_release(c);
    enif_release_resource(p);
    return raise_arg(env, op, "out of host memory");
  }
  mx_err err = {0, {0}};
  const int rc = be->infer_plan_new(mx_backend_dev(c->slot), a, &p->plan, &p->host_in, &p->host_out,
                                    &p->device_bytes, &err);
  if (rc != MX_OK) {
    call_release(c);
    p->plan = NULL;
    enif_release_resource(p);
    return raise_err(env, op, &err);
  }
  /* the plan keeps the storage references of the call */
  memcpy(p->stor, c->stor, c->nstor * sizeof *p->stor);
  p->nstor = c->nstor;
  c->nstor = 0;
  mx_stats_add_live(p->slot, p->device_bytes);
  ERL_NIF_TERM term = enif_make_resource(env, p);
  enif_release_resource(p);
  return term;
}

static int get_plan(ErlNifEnv *env, ERL_NIF_TERM term, mx_plan_res **p) {
  return enif_get_resource(env, term, PLAN_RT, (void **)p);
}

ERL_NIF_TERM nif_infer_plan_step(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  const char *op = "infer_plan_step";
  mx_plan_res *p;
  if (!get_plan(env, argv[0], &p)) return raise_arg(env, op, "plan must be a plan reference, got: %.100T", argv[0]);
  ErlNifBinary frames, resets;
  if (!enif_inspect_binary(env, argv[1], &frames) || frames.size != p->frame_bytes)
    return raise_arg(env, op, "frames must be a binary of %lu bytes (%ld rows of f32 features), got: %.100T",
                     (unsigned long)p->frame_bytes, (long)p->batch, argv[1]);
  const int has_reset = !enif_is_identical(argv[2], A_NIL);
  if (has_reset && (!enif_inspect_binary(env, argv[2], &resets) || resets.size != p->reset_bytes))
    return raise_arg(env, op, "resets must be nil or a binary of %lu bytes, got: %.100T",
                     (unsigned long)p->reset_bytes, argv[2]);
  {
    int f = resched_flags_enqueue(p->slot, 0);
    if (f) return enif_schedule_nif(env, op, f, nif_infer_plan_step, argc, argv);
  }
  ERL_NIF_TERM out;
  unsigned char *dst = enif_make_new_binary(env, p->out_bytes, &out);
  if (!dst) return raise_arg(env, op, "out of host memory");
  enif_mutex_lock(p->mu);
  if (!p->plan) {
    enif_mutex_unlock(p->mu);
    return raise_arg(env, op, "the plan was freed");
  }
  memcpy(p->host_in, frames.data, p->frame_bytes);
  if (has_reset) memcpy((char *)p->host_in + p->frame_bytes, resets.data, p->reset_bytes);
  else memset((char *)p->host_in + p->frame_bytes, 0, p->reset_bytes);
  const mx_backend *be = mx_backend_for(p->slot);
  mx_err err = {0, {0}};
  const int rc = be->infer_plan_run(mx_backend_dev(p->slot), p->plan, &err);
  if (rc == MX_OK) memcpy(dst, p->host_out, p->out_bytes);
  enif_mutex_unlock(p->mu);
  if (rc != MX_OK) return raise_err(env, op, &err);
  return out;
}

ERL_NIF_TERM nif_infer_plan_info(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  (void)argc;
  mx_plan_res *p;
  if (!get_plan(env, argv[0], &p))
    return raise_arg(env, "infer_plan_info", "plan must be a plan reference, got: %.100T", argv[0]);
  enif_mutex_lock(p->mu);
  const mx_backend *be = mx_backend_for(p->slot);
  const int flags = p->plan && be && be->infer_plan_flags ? be->infer_plan_flags(p->plan) : 0;
  const int live = p->plan != NULL;
  const size_t bytes = live ? p->device_bytes : 0;
  enif_mutex_unlock(p->mu);
  return enif_make_tuple5(env, enif_make_int64(env, p->batch),
                          (flags & MX_PLAN_GRAPHED) ? A_TRUE : A_FALSE, enif_make_uint64(env, bytes),
                          live ? A_TRUE : A_FALSE,
                          enif_make_atom(env, (flags & MX_PLAN_CLUSTER_KERNEL) ? "cluster"
                                              : (flags & MX_PLAN_STEP_KERNEL)  ? "step"
                                                                               : "general"));
}

ERL_NIF_TERM nif_infer_plan_free(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  (void)argc;
  mx_plan_res *p;
  if (!get_plan(env, argv[0], &p))
    return raise_arg(env, "infer_plan_free", "plan must be a plan reference, got: %.100T", argv[0]);
  enif_mutex_lock(p->mu);
  plan_free_locked(p);
  enif_mutex_unlock(p->mu);
  return A_OK;
}

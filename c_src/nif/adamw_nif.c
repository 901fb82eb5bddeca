/*
 * adamw_nif.c: the AdamW optimiser NIF (Mambex.AdamW).
 *
 *   adamw_step(params, grads, ms, vs, decay, step, lr, want_norm,
 *              {beta1, beta2, eps, weight_decay, max_norm})
 *     -> grad_norm :: %Mambex.Tensor{} ({:f, 32}, shape {}) | nil
 *
 * params, grads, ms, vs: lists of one length (0 allowed) of {:f, 32}
 * tensors; grads[i], ms[i], vs[i] have the shape of params[i]. decay: a list
 * of booleans of that length (true: weight decay on params[i]). step: a
 * {:s, 32} tensor of one element (incremented on the device); lr: an
 * {:f, 32} tensor of one element (read on the device). want_norm: true
 * returns a new device scalar holding the global gradient norm; max_norm > 0
 * clips by it (max_norm <= 0: no clipping). 0 <= beta < 1, eps >= 0,
 * weight_decay >= 0, all finite.
 *
 * params, ms, vs and step are updated IN PLACE, in one queue position
 * (see backend.h, mx_adamw_args, for the formula); nothing is synchronised.
 *
 * Invariants (those of mambex_nif.c): every argument is checked before
 * anything is allocated or a backend is called, and every failure raises
 * ArgumentError naming the op and the argument (list arguments with their
 * index, e.g. "grads[3]"); every storage reference taken is released on
 * every path. The buffers the call writes (params, ms, vs, step) must not
 * share memory with each other or with any buffer it reads (grads, lr):
 * that is checked (a sort of the byte intervals). The op moves to a dirty
 * scheduler (CPU for host updates above MX_INLINE_BYTES of traffic, IO for
 * CUDA enqueues) before allocating, and is parsed again there.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "nif_common.h"

#define OP "adamw_step"
#define AW_LISTS 4
#define AW_MAX_TENSORS (1 << 24)

static const char *const LIST_NAME[AW_LISTS] = {"params", "grads", "ms", "vs"};

typedef struct {
  unsigned n;          /* tensors per list */
  mx_tensor **t;       /* (AW_LISTS * n + 2): lists in order, then step, lr */
  mx_storage **s;      /* the storage references taken (NULL where none) */
  int *decay;          /* (n) */
  int slot;
  double hyper[5];
  int want_norm;
} aw_call;

static void aw_release(aw_call *c) {
  if (c->s) {
    for (unsigned i = 0; i < AW_LISTS * c->n + 2; i++) mx_storage_release(c->s[i]);
  }
  enif_free(c->t);
  enif_free(c->s);
  enif_free(c->decay);
  c->t = NULL;
  c->s = NULL;
  c->decay = NULL;
}

#define AW_FAIL(...)                          \
  do {                                        \
    aw_release(c);                            \
    *ok = 0;                                  \
    return raise_arg(env, OP, __VA_ARGS__);   \
  } while (0)

/* A byte interval of one buffer the call touches. */
typedef struct {
  uintptr_t start, end;
  int writes;
  int list; /* 0..3, 4 = step, 5 = lr */
  unsigned index;
} aw_span;

static int span_cmp(const void *x, const void *y) {
  const aw_span *a = x, *b = y;
  return a->start < b->start ? -1 : a->start > b->start ? 1 : 0;
}

static void span_name(const aw_span *s, char *buf, size_t len) {
  if (s->list < AW_LISTS) snprintf(buf, len, "%s[%u]", LIST_NAME[s->list], s->index);
  else snprintf(buf, len, "%s", s->list == AW_LISTS ? "step" : "lr");
}

/* Decodes and checks every argument. On success *ok = 1 and c holds the
 * storage references; otherwise the return value is the raised exception
 * and nothing is held. */
static ERL_NIF_TERM aw_parse(ErlNifEnv *env, const ERL_NIF_TERM argv[], aw_call *c, int *ok) {
  memset(c, 0, sizeof *c);
  *ok = 1;
  unsigned len[AW_LISTS];
  for (int l = 0; l < AW_LISTS; l++)
    if (!enif_get_list_length(env, argv[l], &len[l]))
      AW_FAIL("%s must be a list of tensors, got: %.200T", LIST_NAME[l], argv[l]);
  for (int l = 1; l < AW_LISTS; l++)
    if (len[l] != len[0])
      AW_FAIL("%s has %u tensors but params has %u", LIST_NAME[l], len[l], len[0]);
  if (len[0] > AW_MAX_TENSORS) AW_FAIL("too many tensors (%u, at most %d)", len[0], AW_MAX_TENSORS);
  c->n = len[0];
  const unsigned total = AW_LISTS * c->n + 2;
  c->t = enif_alloc(total * sizeof *c->t);
  c->s = enif_alloc(total * sizeof *c->s);
  c->decay = enif_alloc((c->n ? c->n : 1) * sizeof *c->decay);
  if (!c->t || !c->s || !c->decay) AW_FAIL("out of host memory");
  memset(c->t, 0, total * sizeof *c->t);
  memset(c->s, 0, total * sizeof *c->s);

  /* step and lr first: they give the device. */
  const char *scalar_name[2] = {"step", "lr"};
  for (int k = 0; k < 2; k++) {
    const unsigned at = AW_LISTS * c->n + k;
    ERL_NIF_TERM term = argv[5 + k];
    if (!get_tensor_any(env, term, &c->t[at]))
      AW_FAIL("%s must be a Mambex.Tensor, got: %.200T", scalar_name[k], term);
    c->s[at] = mx_tensor_acquire(c->t[at]);
    if (!c->s[at]) AW_FAIL("%s was freed and cannot be used", scalar_name[k]);
  }
  const mx_tensor *step = c->t[AW_LISTS * c->n], *lr = c->t[AW_LISTS * c->n + 1];
  c->slot = step->slot;
  if (step->dtype != MX_S32 || tensor_numel(step) != 1)
    AW_FAIL("step must be an {:s, 32} tensor of one element, got: %T %T",
            dtype_term(env, step->dtype), shape_term(env, step->shape, step->rank));
  if (lr->dtype != MX_F32 || tensor_numel(lr) != 1)
    AW_FAIL("lr must be an {:f, 32} tensor of one element, got: %T %T",
            dtype_term(env, lr->dtype), shape_term(env, lr->shape, lr->rank));
  if (lr->slot != c->slot)
    AW_FAIL("lr is on %T but step is on %T (all tensors must be on one device)",
            device_term(env, lr->slot), device_term(env, c->slot));

  /* The lists. */
  for (int l = 0; l < AW_LISTS; l++) {
    ERL_NIF_TERM list = argv[l], head;
    for (unsigned i = 0; i < c->n; i++) {
      enif_get_list_cell(env, list, &head, &list);
      const unsigned at = l * c->n + i;
      if (!get_tensor_any(env, head, &c->t[at]))
        AW_FAIL("%s[%u] must be a Mambex.Tensor, got: %.200T", LIST_NAME[l], i, head);
      c->s[at] = mx_tensor_acquire(c->t[at]);
      if (!c->s[at]) AW_FAIL("%s[%u] was freed and cannot be used", LIST_NAME[l], i);
      const mx_tensor *t = c->t[at];
      if (t->slot != c->slot)
        AW_FAIL("%s[%u] is on %T but step is on %T (all tensors must be on one device)",
                LIST_NAME[l], i, device_term(env, t->slot), device_term(env, c->slot));
      if (t->dtype != MX_F32)
        AW_FAIL("%s[%u] must have type {:f, 32}, got: %T", LIST_NAME[l], i,
                dtype_term(env, t->dtype));
      if (l > 0 && !tensor_has_shape(t, c->t[i]->rank, c->t[i]->shape))
        AW_FAIL("%s[%u] must have the shape of params[%u], %T, got: %T", LIST_NAME[l], i, i,
                shape_term(env, c->t[i]->shape, c->t[i]->rank),
                shape_term(env, t->shape, t->rank));
    }
  }

  /* decay flags */
  unsigned dlen;
  if (!enif_get_list_length(env, argv[4], &dlen) || dlen != c->n)
    AW_FAIL("decay must be a list of %u booleans, got: %.200T", c->n, argv[4]);
  {
    ERL_NIF_TERM list = argv[4], head;
    for (unsigned i = 0; i < c->n; i++) {
      enif_get_list_cell(env, list, &head, &list);
      if (enif_is_identical(head, A_TRUE)) c->decay[i] = 1;
      else if (enif_is_identical(head, A_FALSE)) c->decay[i] = 0;
      else AW_FAIL("decay[%u] must be true or false, got: %.200T", i, head);
    }
  }

  /* want_norm and the hyper-parameters */
  if (enif_is_identical(argv[7], A_TRUE)) c->want_norm = 1;
  else if (enif_is_identical(argv[7], A_FALSE)) c->want_norm = 0;
  else AW_FAIL("want_norm must be true or false, got: %.200T", argv[7]);
  static const char *const HYPER[5] = {"beta1", "beta2", "eps", "weight_decay", "max_norm"};
  const ERL_NIF_TERM *hv;
  int arity;
  if (!enif_get_tuple(env, argv[8], &arity, &hv) || arity != 5)
    AW_FAIL("hyper-parameters must be {beta1, beta2, eps, weight_decay, max_norm}, got: %.200T",
            argv[8]);
  for (int k = 0; k < 5; k++) {
    double x;
    if (!get_number(env, hv[k], &x) || !isfinite(x))
      AW_FAIL("%s must be a finite number, got: %.200T", HYPER[k], hv[k]);
    c->hyper[k] = x;
  }
  for (int k = 0; k < 2; k++)
    if (!(c->hyper[k] >= 0.0 && c->hyper[k] < 1.0))
      AW_FAIL("%s must be in [0, 1), got: %g", HYPER[k], c->hyper[k]);
  for (int k = 2; k < 4; k++)
    if (!(c->hyper[k] >= 0.0)) AW_FAIL("%s must be >= 0, got: %g", HYPER[k], c->hyper[k]);

  /* No buffer written may share memory with another one touched. */
  aw_span *sp = enif_alloc(total * sizeof *sp);
  if (!sp) AW_FAIL("out of host memory");
  unsigned ns = 0;
  for (unsigned at = 0; at < total; at++) {
    const mx_tensor *t = c->t[at];
    const size_t bytes = tensor_numel(t) * mx_dtype_size(t->dtype);
    if (bytes == 0) continue;
    const int list = at < AW_LISTS * c->n ? (int)(at / c->n) : AW_LISTS + (int)(at - AW_LISTS * c->n);
    const uintptr_t start = (uintptr_t)mx_data(c->s[at], t);
    sp[ns++] = (aw_span){start, start + bytes, list != 1 && list != AW_LISTS + 1, list,
                         list < AW_LISTS ? at - (unsigned)list * c->n : 0};
  }
  qsort(sp, ns, sizeof *sp, span_cmp);
  uintptr_t end_any = 0, end_w = 0;
  unsigned who_any = 0, who_w = 0;
  for (unsigned i = 0; i < ns; i++) {
    int clash = -1;
    if (sp[i].writes && i > 0 && sp[i].start < end_any) clash = (int)who_any;
    else if (!sp[i].writes && end_w > 0 && sp[i].start < end_w) clash = (int)who_w;
    if (clash >= 0) {
      char a[48], b[48];
      span_name(&sp[clash], a, sizeof a);
      span_name(&sp[i], b, sizeof b);
      enif_free(sp);
      AW_FAIL("%s and %s share memory (the buffers updated in place must be distinct)", a, b);
    }
    if (sp[i].end > end_any) {
      end_any = sp[i].end;
      who_any = i;
    }
    if (sp[i].writes && sp[i].end > end_w) {
      end_w = sp[i].end;
      who_w = i;
    }
  }
  enif_free(sp);
  return 0;
}
#undef AW_FAIL

/* Bytes of memory traffic, saturating (picks the scheduler). */
static size_t aw_work(const aw_call *c) {
  double w = 0.0;
  for (unsigned i = 0; i < c->n; i++) w += 28.0 * (double)tensor_numel(c->t[i]);
  return w >= 1e18 ? (size_t)1 << 60 : (size_t)w;
}

ERL_NIF_TERM nif_adamw_step(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  aw_call call, *c = &call;
  int ok;
  ERL_NIF_TERM raised = aw_parse(env, argv, c, &ok);
  if (!ok) return raised;
  const mx_backend *be = mx_backend_for(c->slot);
  if (!be->adamw) {
    mx_err e = {MX_E_RUNTIME, {0}};
    snprintf(e.msg, sizeof e.msg, "the %s backend has no adamw kernel", be->name);
    aw_release(c);
    return raise_err(env, OP, &e);
  }
  int f = resched_flags(c->slot, aw_work(c));
  if (f) {
    aw_release(c);
    return enif_schedule_nif(env, OP, f, nif_adamw_step, argc, argv);
  }

  mx_tensor *norm = NULL;
  if (c->want_norm) {
    mx_storage *ns = NULL;
    mx_err e = {0, {0}};
    if (mx_storage_new(c->slot, sizeof(float), &ns, &e)) {
      aw_release(c);
      return raise_err(env, OP, &e);
    }
    norm = tensor_wrap(ns, MX_F32, NULL, 0);
  }
  mx_adamw_tensor *tab = enif_alloc((c->n ? c->n : 1) * sizeof *tab);
  if (!tab) {
    aw_release(c);
    mx_err e = {MX_E_OOM, "out of host memory"};
    if (norm) return finish(env, OP, MX_E_OOM, &e, norm);
    return raise_err(env, OP, &e);
  }
  for (unsigned i = 0; i < c->n; i++) {
    tab[i].param = mx_data(c->s[i], c->t[i]);
    tab[i].grad = mx_data(c->s[c->n + i], c->t[c->n + i]);
    tab[i].m = mx_data(c->s[2 * c->n + i], c->t[2 * c->n + i]);
    tab[i].v = mx_data(c->s[3 * c->n + i], c->t[3 * c->n + i]);
    tab[i].n = (int64_t)tensor_numel(c->t[i]);
    tab[i].decay = c->decay[i];
  }
  const unsigned at = AW_LISTS * c->n;
  mx_adamw_args a = {
      .ntensors = (int)c->n,
      .tensors = tab,
      .beta1 = c->hyper[0],
      .beta2 = c->hyper[1],
      .eps = c->hyper[2],
      .weight_decay = c->hyper[3],
      .max_norm = c->hyper[4],
      .lr = mx_data(c->s[at + 1], c->t[at + 1]),
      .step = mx_data(c->s[at], c->t[at]),
      .grad_norm = norm ? mx_data(norm->storage, norm) : NULL,
  };
  mx_err err = {0, {0}};
  int rc = be->adamw(mx_backend_dev(c->slot), &a, &err);
  enif_free(tab);
  aw_release(c);
  if (!norm) {
    if (rc != MX_OK) return raise_err(env, OP, &err);
    return A_NIL;
  }
  return finish(env, OP, rc, &err, norm);
}
#undef OP

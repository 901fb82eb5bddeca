/*
 * mambex_nif.c: the erl_nif glue. Term decoding, the tensor resource type,
 * the executor (which scheduler runs what), and error terms.
 *
 * Threading and lifetime invariants:
 *   - Every NIF is registered as a normal NIF. Metadata calls (reshape,
 *     memory_stats, backend_info) finish there. An op on a CUDA device
 *     reschedules itself once onto a dirty IO scheduler before it touches
 *     the device (enif_schedule_nif), where it validates, allocates,
 *     enqueues on the device stream and returns at once. An op on the CPU
 *     runs inline when it touches under MX_INLINE_BYTES and otherwise moves
 *     to a dirty CPU scheduler. Arguments are parsed again after the move;
 *     nothing is allocated before it.
 *   - The tensor resource destructor only drops a storage reference
 *     (mx_tensor_drop): O(1), non-blocking, stream-ordered frees.
 *   - Every argument is validated here before any backend call; a bad term
 *     raises ArgumentError naming the op and the argument. Backend failures
 *     raise Mambex.Error with the op, a kind atom and the backend's message.
 *   - Atoms are created once, in load; none are ever made from user data.
 *   - Memory statistics live in a block that an upgraded library instance
 *     takes over (see tensor.h), and the resource type is reopened with
 *     ERL_NIF_RT_TAKEOVER, so `recompile` in iex keeps live tensors valid.
 *   - NIF frames stay small (dirty schedulers have small stacks): no arrays
 *     bigger than a few hundred bytes on the stack.
 */
#include <dlfcn.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <erl_nif.h>

#include "../core/backend.h"
#include "../core/tensor.h"
#include "nif_common.h"


/* ---- atoms and global state ------------------------------------------- */

ErlNifResourceType *TENSOR_RT;
static ErlNifResourceType *EVENT_RT;

/* A recorded device event (benchmarks). Destroyed without blocking. */
typedef struct {
  int slot;
  void *event;
} mx_event;
static mx_shared *g_shared;
static char g_cuda_status[512] = "not loaded";
int g_cuda_devices;

ERL_NIF_TERM A_OK, A_NIL, A_TRUE, A_FALSE, A_CPU, A_CUDA, A_F, A_BF, A_S, A_U;
ERL_NIF_TERM A_STRUCT, A_EXCEPTION, A_MESSAGE, A_KIND, A_OP;
ERL_NIF_TERM A_REF, A_SHAPE, A_TYPE, A_DEVICE;
ERL_NIF_TERM A_TENSOR_MOD, A_ARG_ERROR_MOD, A_MX_ERROR_MOD;
ERL_NIF_TERM A_OOM, A_RUNTIME, A_LOST;
ERL_NIF_TERM A_UNIFORM, A_NORMAL;
ERL_NIF_TERM A_ADD, A_SUBTRACT, A_MULTIPLY, A_DIVIDE, A_MAXIMUM, A_MINIMUM;
ERL_NIF_TERM A_NEGATE, A_EXP, A_LOG, A_SQRT, A_SUM, A_MEAN, A_MAX;
ERL_NIF_TERM A_LIVE_BYTES, A_PEAK_BYTES, A_LIVE_HANDLES, A_TOTAL_ALLOCS;
ERL_NIF_TERM A_CUDA_DEVICES, A_CUDA_STATUS;

static void make_atoms(ErlNifEnv *env) {
#define ATOM(var, name) var = enif_make_atom(env, name)
  ATOM(A_OK, "ok"); ATOM(A_NIL, "nil"); ATOM(A_TRUE, "true"); ATOM(A_FALSE, "false");
  ATOM(A_CPU, "cpu"); ATOM(A_CUDA, "cuda");
  ATOM(A_F, "f"); ATOM(A_BF, "bf"); ATOM(A_S, "s"); ATOM(A_U, "u");
  ATOM(A_STRUCT, "__struct__"); ATOM(A_EXCEPTION, "__exception__");
  ATOM(A_MESSAGE, "message"); ATOM(A_KIND, "kind"); ATOM(A_OP, "op");
  ATOM(A_REF, "ref"); ATOM(A_SHAPE, "shape"); ATOM(A_TYPE, "type"); ATOM(A_DEVICE, "device");
  ATOM(A_TENSOR_MOD, "Elixir.Mambex.Tensor");
  ATOM(A_ARG_ERROR_MOD, "Elixir.ArgumentError");
  ATOM(A_MX_ERROR_MOD, "Elixir.Mambex.Error");
  ATOM(A_OOM, "out_of_memory"); ATOM(A_RUNTIME, "runtime"); ATOM(A_LOST, "device_lost");
  ATOM(A_UNIFORM, "uniform"); ATOM(A_NORMAL, "normal");
  ATOM(A_ADD, "add"); ATOM(A_SUBTRACT, "subtract"); ATOM(A_MULTIPLY, "multiply");
  ATOM(A_DIVIDE, "divide"); ATOM(A_MAXIMUM, "maximum"); ATOM(A_MINIMUM, "minimum");
  ATOM(A_NEGATE, "negate"); ATOM(A_EXP, "exp"); ATOM(A_LOG, "log"); ATOM(A_SQRT, "sqrt");
  ATOM(A_SUM, "sum"); ATOM(A_MEAN, "mean"); ATOM(A_MAX, "max");
  ATOM(A_LIVE_BYTES, "live_bytes"); ATOM(A_PEAK_BYTES, "peak_bytes");
  ATOM(A_LIVE_HANDLES, "live_handles"); ATOM(A_TOTAL_ALLOCS, "total_allocs");
  ATOM(A_CUDA_DEVICES, "cuda_devices"); ATOM(A_CUDA_STATUS, "cuda_status");
#undef ATOM
}

/* ---- errors ------------------------------------------------------------ */

ERL_NIF_TERM make_string(ErlNifEnv *env, const char *s) {
  size_t n = strlen(s);
  ERL_NIF_TERM bin;
  unsigned char *p = enif_make_new_binary(env, n, &bin);
  memcpy(p, s, n);
  return bin;
}

/* Raise ArgumentError("<op>: <message>"). The message may use %T. */
ERL_NIF_TERM raise_arg(ErlNifEnv *env, const char *op, const char *fmt, ...) {
  char msg[512];
  int k = snprintf(msg, sizeof msg, "%s: ", op);
  va_list ap;
  va_start(ap, fmt);
  enif_vsnprintf(msg + k, sizeof msg - (size_t)k, fmt, ap);
  va_end(ap);
  ERL_NIF_TERM keys[3] = {A_STRUCT, A_EXCEPTION, A_MESSAGE};
  ERL_NIF_TERM vals[3] = {A_ARG_ERROR_MOD, A_TRUE, make_string(env, msg)};
  ERL_NIF_TERM map;
  enif_make_map_from_arrays(env, keys, vals, 3, &map);
  return enif_raise_exception(env, map);
}

/* Raise for a backend failure: ArgumentError for MX_E_ARG, else Mambex.Error. */
ERL_NIF_TERM raise_err(ErlNifEnv *env, const char *op, const mx_err *err) {
  if (err->kind == MX_E_ARG) return raise_arg(env, op, "%s", err->msg);
  char msg[MX_ERR_LEN + 64];
  snprintf(msg, sizeof msg, "%s: %s", op, err->msg);
  ERL_NIF_TERM kind = err->kind == MX_E_OOM ? A_OOM : err->kind == MX_E_LOST ? A_LOST : A_RUNTIME;
  ERL_NIF_TERM keys[5] = {A_STRUCT, A_EXCEPTION, A_MESSAGE, A_KIND, A_OP};
  ERL_NIF_TERM vals[5] = {A_MX_ERROR_MOD, A_TRUE, make_string(env, msg), kind,
                          make_string(env, op)};
  ERL_NIF_TERM map;
  enif_make_map_from_arrays(env, keys, vals, 5, &map);
  return enif_raise_exception(env, map);
}

/* ---- term decoding ----------------------------------------------------- */

static const struct { int kind_is; int bits; } DTYPE_BITS[MX_NUM_DTYPES] = {
    {0, 32}, {0, 64}, {1, 16}, {0, 16}, {2, 32}, {2, 64}, {3, 8}};

ERL_NIF_TERM dtype_term(ErlNifEnv *env, int dt) {
  ERL_NIF_TERM k = DTYPE_BITS[dt].kind_is == 0 ? A_F : DTYPE_BITS[dt].kind_is == 1 ? A_BF
                   : DTYPE_BITS[dt].kind_is == 2 ? A_S : A_U;
  return enif_make_tuple2(env, k, enif_make_int(env, DTYPE_BITS[dt].bits));
}

int get_dtype(ErlNifEnv *env, ERL_NIF_TERM term, int *out) {
  int arity, bits;
  const ERL_NIF_TERM *el;
  if (!enif_get_tuple(env, term, &arity, &el) || arity != 2) return 0;
  if (!enif_get_int(env, el[1], &bits)) return 0;
  int kind = enif_is_identical(el[0], A_F) ? 0 : enif_is_identical(el[0], A_BF) ? 1
             : enif_is_identical(el[0], A_S) ? 2 : enif_is_identical(el[0], A_U) ? 3 : -1;
  for (int dt = 0; dt < MX_NUM_DTYPES; dt++) {
    if (DTYPE_BITS[dt].kind_is == kind && DTYPE_BITS[dt].bits == bits) {
      *out = dt;
      return 1;
    }
  }
  return 0;
}

ERL_NIF_TERM device_term(ErlNifEnv *env, int slot) {
  if (slot == MX_CPU_SLOT) return A_CPU;
  return enif_make_tuple2(env, A_CUDA, enif_make_int(env, slot - 1));
}

/* 1 on success; 0 = not a device term; -1 = a CUDA device that is absent. */
int get_device(ErlNifEnv *env, ERL_NIF_TERM term, int *slot) {
  if (enif_is_identical(term, A_CPU)) {
    *slot = MX_CPU_SLOT;
    return 1;
  }
  int arity, idx;
  const ERL_NIF_TERM *el;
  if (!enif_get_tuple(env, term, &arity, &el) || arity != 2) return 0;
  if (!enif_is_identical(el[0], A_CUDA) || !enif_get_int(env, el[1], &idx)) return 0;
  if (idx < 0 || idx >= g_cuda_devices) return -1;
  *slot = idx + 1;
  return 1;
}

int get_shape(ErlNifEnv *env, ERL_NIF_TERM term, int64_t *shape, int *rank) {
  int arity;
  const ERL_NIF_TERM *el;
  if (!enif_get_tuple(env, term, &arity, &el) || arity > MX_MAX_RANK) return 0;
  for (int i = 0; i < arity; i++) {
    ErlNifSInt64 v;
    if (!enif_get_int64(env, el[i], &v) || v < 0) return 0;
    shape[i] = v;
  }
  *rank = arity;
  return 1;
}

ERL_NIF_TERM shape_term(ErlNifEnv *env, const int64_t *shape, int rank) {
  ERL_NIF_TERM el[MX_MAX_RANK];
  for (int i = 0; i < rank; i++) el[i] = enif_make_int64(env, shape[i]);
  return enif_make_tuple_from_array(env, el, (unsigned)rank);
}

/* Accepts %Mambex.Tensor{ref: ref} or the bare resource reference. */
int get_tensor_any(ErlNifEnv *env, ERL_NIF_TERM term, mx_tensor **t) {
  ERL_NIF_TERM ref = term;
  if (enif_is_map(env, term) && !enif_get_map_value(env, term, A_REF, &ref)) return 0;
  return enif_get_resource(env, ref, TENSOR_RT, (void **)t);
}

int get_scalar(ErlNifEnv *env, ERL_NIF_TERM term, mx_scalar *out) {
  ErlNifSInt64 i;
  double f;
  if (enif_get_int64(env, term, &i)) {
    out->i = i;
    out->f = (double)i;
    return 1;
  }
  if (enif_get_double(env, term, &f)) {
    out->f = f;
    out->i = f != f ? 0 : f >= 9.2233720368547758e18 ? INT64_MAX
             : f <= -9.2233720368547758e18 ? INT64_MIN : (int64_t)f;
    return 1;
  }
  return 0;
}

int get_number(ErlNifEnv *env, ERL_NIF_TERM term, double *out) {
  ErlNifSInt64 i;
  if (enif_get_double(env, term, out)) return 1;
  if (enif_get_int64(env, term, &i)) {
    *out = (double)i;
    return 1;
  }
  return 0;
}

/* Decode a live tensor argument and take a storage reference, or raise. */


/* ---- executor ---------------------------------------------------------- */

/* The dirty flag an op must move to, or 0 to run here. */
int resched_flags(int slot, size_t work_bytes) {
  if (enif_thread_type() != ERL_NIF_THR_NORMAL_SCHEDULER) return 0;
  if (slot != MX_CPU_SLOT) return ERL_NIF_DIRTY_JOB_IO_BOUND; /* device ops enqueue there */
  return work_bytes > MX_INLINE_BYTES ? ERL_NIF_DIRTY_JOB_CPU_BOUND : 0;
}

/* The executor mode (Mambex.set_executor/1): 0 = every device op moves to a
 * dirty IO scheduler (the default); 1 = ops that only enqueue device work
 * run on the calling normal scheduler once the device is set up (an alloc
 * has succeeded on it, so the one-time set-up never runs there). Ops that
 * wait (downloads, uploads, sync, event timing) always move. */
static atomic_int g_inline_enqueue;

int resched_flags_enqueue(int slot, size_t work_bytes) {
  if (slot != MX_CPU_SLOT && atomic_load_explicit(&g_inline_enqueue, memory_order_relaxed) &&
      atomic_load_explicit(&mx_stats_for(slot)->total_allocs, memory_order_relaxed) > 0)
    return 0;
  return resched_flags(slot, work_bytes);
}

/* Move to the right scheduler before allocating anything. Releases the
 * named storages first. */

/* A new tensor resource wrapping storage (takes over the reference). */
mx_tensor *tensor_wrap(mx_storage *s, int dtype, const int64_t *shape, int rank) {
  mx_tensor *t = enif_alloc_resource(TENSOR_RT, sizeof *t);
  memset(t, 0, sizeof *t);
  t->storage = s;
  t->dtype = dtype;
  t->rank = rank;
  for (int i = 0; i < rank; i++) t->shape[i] = shape[i];
  t->offset = 0;
  t->nbytes = s->nbytes;
  t->slot = s->slot;
  atomic_fetch_add(&mx_stats_for(t->slot)->live_handles, 1);
  return t;
}

/* Whether t has exactly this rank and shape. */
int tensor_has_shape(const mx_tensor *t, int rank, const int64_t *shape) {
  if (t->rank != rank) return 0;
  for (int i = 0; i < rank; i++)
    if (t->shape[i] != shape[i]) return 0;
  return 1;
}

/* A new output tensor of `shape` on `slot`, or NULL with *raised set
 * (ArgumentError when the size overflows, Mambex.Error when the allocation
 * fails) and *ok = 0 when ok is given. */
mx_tensor *output_new(ErlNifEnv *env, const char *op, int slot, int dtype, const int64_t *shape,
                      int rank, ERL_NIF_TERM *raised, int *ok) {
  int64_t n = mx_numel_checked(shape, rank, mx_dtype_size(dtype));
  mx_err err = {0, {0}};
  mx_storage *s = NULL;
  if (n < 0) {
    if (ok) *ok = 0;
    *raised = raise_arg(env, op, "the output size overflows");
    return NULL;
  }
  if (mx_storage_new(slot, (size_t)n * mx_dtype_size(dtype), &s, &err)) {
    if (ok) *ok = 0;
    *raised = raise_err(env, op, &err);
    return NULL;
  }
  return tensor_wrap(s, dtype, shape, rank);
}

/* Releases an output that will not be returned (NULL is fine). */
void output_drop(mx_tensor *t) {
  if (!t) return;
  mx_tensor_drop(t);
  enif_release_resource(t);
}

/* %Mambex.Tensor{} for a resource; releases the local resource reference. */
ERL_NIF_TERM tensor_term(ErlNifEnv *env, mx_tensor *t) {
  ERL_NIF_TERM ref = enif_make_resource(env, t);
  enif_release_resource(t);
  ERL_NIF_TERM keys[5] = {A_STRUCT, A_REF, A_SHAPE, A_TYPE, A_DEVICE};
  ERL_NIF_TERM vals[5] = {A_TENSOR_MOD, ref, shape_term(env, t->shape, t->rank),
                          dtype_term(env, t->dtype), device_term(env, t->slot)};
  ERL_NIF_TERM map;
  enif_make_map_from_arrays(env, keys, vals, 5, &map);
  return map;
}

size_t tensor_numel(const mx_tensor *t) {
  size_t n = 1;
  for (int i = 0; i < t->rank; i++) n *= (size_t)t->shape[i];
  return n;
}

/* Allocate an output (storage + resource) or raise. */

/* After a backend call: on failure drop the output and raise. */
ERL_NIF_TERM finish(ErlNifEnv *env, const char *op, int rc, const mx_err *err,
                           mx_tensor *out) {
  if (rc != MX_OK) {
    mx_tensor_drop(out);
    enif_release_resource(out);
    return raise_err(env, op, err);
  }
  return tensor_term(env, out);
}

/* ---- runtime NIFs ------------------------------------------------------ */

static ERL_NIF_TERM nif_backend_info(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  (void)argc;
  (void)argv;
  ERL_NIF_TERM keys[2] = {A_CUDA_DEVICES, A_CUDA_STATUS};
  ERL_NIF_TERM vals[2] = {enif_make_int(env, g_cuda_devices), make_string(env, g_cuda_status)};
  ERL_NIF_TERM map;
  enif_make_map_from_arrays(env, keys, vals, 2, &map);
  return map;
}

static ERL_NIF_TERM nif_set_executor(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  (void)argc;
  if (enif_is_identical(argv[0], A_TRUE)) atomic_store(&g_inline_enqueue, 1);
  else if (enif_is_identical(argv[0], A_FALSE)) atomic_store(&g_inline_enqueue, 0);
  else return raise_arg(env, "set_executor", "inline must be true or false, got: %.200T", argv[0]);
  return A_OK;
}

static ERL_NIF_TERM nif_executor_inline(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  (void)env;
  (void)argc;
  (void)argv;
  return atomic_load(&g_inline_enqueue) ? A_TRUE : A_FALSE;
}

#define OP "device_name"
static ERL_NIF_TERM nif_device_name(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  (void)argc;
  GET_DEVICE(argv[0], slot, "device");
  char buf[256];
  mx_err err = {0, {0}};
  const mx_backend *be = mx_backend_for(slot);
  if (be->device_name(mx_backend_dev(slot), buf, sizeof buf, &err)) return raise_err(env, OP, &err);
  return make_string(env, buf);
}
#undef OP

#define OP "sync"
static ERL_NIF_TERM nif_sync(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  GET_DEVICE(argv[0], slot, "device");
  MAYBE_RESCHEDULE_WAITING(nif_sync, slot, 0, NULL);
  mx_err err = {0, {0}};
  if (mx_backend_for(slot)->sync(mx_backend_dev(slot), &err)) return raise_err(env, OP, &err);
  return A_OK;
}
#undef OP

#define OP "memory_stats"
static ERL_NIF_TERM nif_memory_stats(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  (void)argc;
  GET_DEVICE(argv[0], slot, "device");
  mx_mem_stats *st = mx_stats_for(slot);
  ERL_NIF_TERM keys[4] = {A_LIVE_BYTES, A_PEAK_BYTES, A_LIVE_HANDLES, A_TOTAL_ALLOCS};
  ERL_NIF_TERM vals[4] = {enif_make_int64(env, atomic_load(&st->live_bytes)),
                          enif_make_int64(env, atomic_load(&st->peak_bytes)),
                          enif_make_int64(env, atomic_load(&st->live_handles)),
                          enif_make_int64(env, atomic_load(&st->total_allocs))};
  ERL_NIF_TERM map;
  enif_make_map_from_arrays(env, keys, vals, 4, &map);
  return map;
}
#undef OP

#define OP "reset_peak"
static ERL_NIF_TERM nif_reset_peak(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  (void)argc;
  GET_DEVICE(argv[0], slot, "device");
  mx_mem_stats *st = mx_stats_for(slot);
  atomic_store(&st->peak_bytes, atomic_load(&st->live_bytes));
  return A_OK;
}
#undef OP

/* ---- transfer ---------------------------------------------------------- */

#define OP "from_binary"
/* from_binary(binary, type, shape, device) */
static ERL_NIF_TERM nif_from_binary(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  ErlNifBinary bin;
  int dtype, rank;
  int64_t shape[MX_MAX_RANK];
  if (!enif_inspect_binary(env, argv[0], &bin))
    return raise_arg(env, OP, "data must be a binary, got: %.200T", argv[0]);
  if (!get_dtype(env, argv[1], &dtype))
    return raise_arg(env, OP, "type must be one of {:f, 32} {:f, 64} {:bf, 16} {:f, 16} "
                     "{:s, 32} {:s, 64} {:u, 8}, got: %.200T", argv[1]);
  if (!get_shape(env, argv[2], shape, &rank))
    return raise_arg(env, OP, "shape must be a tuple of at most %d non-negative integers, "
                     "got: %.200T", MX_MAX_RANK, argv[2]);
  GET_DEVICE(argv[3], slot, "device");
  int64_t n = mx_numel_checked(shape, rank, mx_dtype_size(dtype));
  if (n < 0) return raise_arg(env, OP, "shape %T is too large", argv[2]);
  size_t want = (size_t)n * mx_dtype_size(dtype);
  if (bin.size != want)
    return raise_arg(env, OP, "data has %lu bytes but shape %T of type %T needs %lu",
                     (unsigned long)bin.size, argv[2], argv[1], (unsigned long)want);
  MAYBE_RESCHEDULE_WAITING(nif_from_binary, slot, want, NULL);
  NEW_OUTPUT(out, outs, slot, dtype, shape, rank, NULL);
  mx_err err = {0, {0}};
  const mx_backend *be = mx_backend_for(slot);
  int rc = be->upload(mx_backend_dev(slot), outs->ptr, bin.data, want, &err);
  return finish(env, OP, rc, &err, out);
}
#undef OP

#define OP "to_binary"
/* to_binary(tensor, max_bytes): the first min(nbytes, max_bytes) bytes,
 * rounded down to whole elements. Waits for the device. */
static ERL_NIF_TERM nif_to_binary(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  ErlNifUInt64 limit;
  if (!enif_get_uint64(env, argv[1], &limit))
    return raise_arg(env, OP, "limit must be a non-negative integer, got: %.200T", argv[1]);
  GET_TENSOR(argv[0], t, s, "tensor");
  size_t es = mx_dtype_size(t->dtype);
  size_t n = t->nbytes < limit ? t->nbytes : (size_t)limit;
  n -= n % es;
  MAYBE_RESCHEDULE_WAITING(nif_to_binary, t->slot, n, s);
  ERL_NIF_TERM bin;
  unsigned char *p = enif_make_new_binary(env, n, &bin);
  if (!p) {
    mx_storage_release(s);
    mx_err e = {MX_E_OOM, "enif_make_new_binary: out of host memory"};
    return raise_err(env, OP, &e);
  }
  mx_err err = {0, {0}};
  int rc = n ? mx_backend_for(t->slot)->download(mx_backend_dev(t->slot), p, mx_data(s, t), n, &err)
             : MX_OK;
  mx_storage_release(s);
  if (rc) return raise_err(env, OP, &err);
  return bin;
}
#undef OP

#define OP "to_device"
/* to_device(tensor, device): a copy on the device (the same tensor if it
 * already lives there). */
static ERL_NIF_TERM nif_to_device(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  GET_DEVICE(argv[1], slot, "device");
  GET_TENSOR(argv[0], t, s, "tensor");
  if (t->slot == slot) {
    mx_storage_release(s);
    return argv[0];
  }
  int any_dev = slot != MX_CPU_SLOT ? slot : t->slot;
  MAYBE_RESCHEDULE_WAITING(nif_to_device, any_dev, t->nbytes, s);
  NEW_OUTPUT(out, outs, slot, t->dtype, t->shape, t->rank, s);
  mx_err err = {0, {0}};
  int rc = MX_OK;
  void *src = mx_data(s, t);
  if (t->slot == MX_CPU_SLOT) {
    rc = mx_backend_for(slot)->upload(mx_backend_dev(slot), outs->ptr, src, t->nbytes, &err);
  } else if (slot == MX_CPU_SLOT) {
    rc = mx_backend_for(t->slot)->download(mx_backend_dev(t->slot), outs->ptr, src, t->nbytes,
                                           &err);
  } else { /* device to device through the host */
    void *tmp = malloc(t->nbytes ? t->nbytes : 1);
    if (!tmp) {
      err.kind = MX_E_OOM;
      snprintf(err.msg, sizeof err.msg, "out of host memory for a staging copy");
      rc = MX_E_OOM;
    } else {
      rc = mx_backend_for(t->slot)->download(mx_backend_dev(t->slot), tmp, src, t->nbytes, &err);
      if (!rc) rc = mx_backend_for(slot)->upload(mx_backend_dev(slot), outs->ptr, tmp, t->nbytes, &err);
      free(tmp);
    }
  }
  mx_storage_release(s);
  return finish(env, OP, rc, &err, out);
}
#undef OP

#define OP "free"
static ERL_NIF_TERM nif_free(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  (void)argc;
  mx_tensor *t;
  if (!get_tensor_any(env, argv[0], &t))
    return raise_arg(env, OP, "tensor must be a Mambex.Tensor, got: %.200T", argv[0]);
  mx_tensor_drop(t);
  return A_OK;
}
#undef OP

#define OP "live?"
static ERL_NIF_TERM nif_is_live(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  (void)argc;
  mx_tensor *t;
  if (!get_tensor_any(env, argv[0], &t))
    return raise_arg(env, OP, "tensor must be a Mambex.Tensor, got: %.200T", argv[0]);
  mx_storage *s = mx_tensor_acquire(t);
  mx_storage_release(s);
  return s ? A_TRUE : A_FALSE;
}
#undef OP

/* ---- creation ---------------------------------------------------------- */

/* Decodes (shape, type, device) at argv[0..2] for the creation NIFs. */
#define GET_CREATION_ARGS()                                                                \
  int dtype, rank;                                                                         \
  int64_t shape[MX_MAX_RANK];                                                              \
  if (!get_shape(env, argv[0], shape, &rank))                                              \
    return raise_arg(env, OP, "shape must be a tuple of at most %d non-negative integers, " \
                     "got: %.200T", MX_MAX_RANK, argv[0]);                                 \
  if (!get_dtype(env, argv[1], &dtype))                                                    \
    return raise_arg(env, OP, "type must be a Mambex type such as {:f, 32}, got: %.200T",   \
                     argv[1]);                                                             \
  GET_DEVICE(argv[2], slot, "device");                                                     \
  int64_t numel = mx_numel_checked(shape, rank, mx_dtype_size(dtype));                     \
  if (numel < 0) return raise_arg(env, OP, "shape %T is too large", argv[0]);              \
  size_t nbytes = (size_t)numel * mx_dtype_size(dtype);                                    \
  (void)nbytes

#define OP "fill"
/* fill(shape, type, device, value) */
static ERL_NIF_TERM nif_fill(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  GET_CREATION_ARGS();
  mx_scalar value;
  if (!get_scalar(env, argv[3], &value))
    return raise_arg(env, OP, "value must be a float or a 64-bit integer, got: %.200T", argv[3]);
  MAYBE_RESCHEDULE(nif_fill, slot, nbytes, NULL);
  NEW_OUTPUT(out, outs, slot, dtype, shape, rank, NULL);
  mx_err err = {0, {0}};
  int rc = mx_backend_for(slot)->fill(mx_backend_dev(slot), dtype, outs->ptr, (size_t)numel, value, &err);
  return finish(env, OP, rc, &err, out);
}
#undef OP

/* outer/dim/inner of an axis of a shape. */
void axis_split(const int64_t *shape, int rank, int axis, size_t *outer, size_t *dim,
                       size_t *inner) {
  *outer = 1;
  *inner = 1;
  for (int i = 0; i < axis; i++) *outer *= (size_t)shape[i];
  for (int i = axis + 1; i < rank; i++) *inner *= (size_t)shape[i];
  *dim = (size_t)shape[axis];
}

/* An axis argument: an integer in [-rank, rank), negative counting from the end. */
int get_axis(ErlNifEnv *env, ERL_NIF_TERM term, int rank, int *axis) {
  int a;
  if (!enif_get_int(env, term, &a)) return 0;
  if (a < 0) a += rank;
  if (a < 0 || a >= rank) return 0;
  *axis = a;
  return 1;
}

#define OP "iota"
/* iota(shape, type, device, axis | nil) */
static ERL_NIF_TERM nif_iota(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  GET_CREATION_ARGS();
  size_t outer = 1, dim = (size_t)numel, inner = 1;
  if (!enif_is_identical(argv[3], A_NIL)) {
    int axis;
    if (!get_axis(env, argv[3], rank, &axis))
      return raise_arg(env, OP, "axis must be nil or an integer axis of a rank-%d shape, "
                       "got: %.200T", rank, argv[3]);
    axis_split(shape, rank, axis, &outer, &dim, &inner);
  }
  MAYBE_RESCHEDULE(nif_iota, slot, nbytes, NULL);
  NEW_OUTPUT(out, outs, slot, dtype, shape, rank, NULL);
  mx_err err = {0, {0}};
  int rc = numel == 0 ? MX_OK
           : mx_backend_for(slot)->iota(mx_backend_dev(slot), dtype, outs->ptr, outer, dim, inner, &err);
  return finish(env, OP, rc, &err, out);
}
#undef OP

#define OP "random"
/* random(shape, type, device, seed, :uniform | :normal, a, b) */
static ERL_NIF_TERM nif_random(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  GET_CREATION_ARGS();
  ErlNifUInt64 seed;
  double a, b;
  if (!enif_get_uint64(env, argv[3], &seed))
    return raise_arg(env, OP, "seed must be an integer in 0..2^64-1, got: %.200T", argv[3]);
  int dist = enif_is_identical(argv[4], A_UNIFORM) ? MX_UNIFORM
             : enif_is_identical(argv[4], A_NORMAL) ? MX_NORMAL : -1;
  if (dist < 0)
    return raise_arg(env, OP, "distribution must be :uniform or :normal, got: %.200T", argv[4]);
  if (!get_number(env, argv[5], &a))
    return raise_arg(env, OP, "%s must be a number, got: %.200T",
                     dist == MX_UNIFORM ? "min" : "mean", argv[5]);
  if (!get_number(env, argv[6], &b))
    return raise_arg(env, OP, "%s must be a number, got: %.200T",
                     dist == MX_UNIFORM ? "max" : "standard deviation", argv[6]);
  if (dist == MX_NORMAL && !mx_dtype_is_float(dtype))
    return raise_arg(env, OP, "normal samples need a float type, got: %T", argv[1]);
  if (dist == MX_NORMAL && !(b >= 0))
    return raise_arg(env, OP, "standard deviation must be >= 0, got: %T", argv[6]);
  if (dist == MX_UNIFORM && !(a <= b))
    return raise_arg(env, OP, "min must not exceed max, got: %T > %T", argv[5], argv[6]);
  MAYBE_RESCHEDULE(nif_random, slot, nbytes * 8, NULL);
  NEW_OUTPUT(out, outs, slot, dtype, shape, rank, NULL);
  mx_err err = {0, {0}};
  int rc = numel == 0 ? MX_OK
           : mx_backend_for(slot)->random(mx_backend_dev(slot), dtype, outs->ptr, (size_t)numel,
                                          seed, dist, a, b, &err);
  return finish(env, OP, rc, &err, out);
}
#undef OP

/* ---- views and copies -------------------------------------------------- */

#define OP "reshape"
/* reshape(tensor, shape): a view sharing storage. */
static ERL_NIF_TERM nif_reshape(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  (void)argc;
  int rank;
  int64_t shape[MX_MAX_RANK];
  if (!get_shape(env, argv[1], shape, &rank))
    return raise_arg(env, OP, "shape must be a tuple of at most %d non-negative integers, "
                     "got: %.200T", MX_MAX_RANK, argv[1]);
  GET_TENSOR(argv[0], t, s, "tensor");
  int64_t n = mx_numel_checked(shape, rank, mx_dtype_size(t->dtype));
  if (n < 0 || (size_t)n != tensor_numel(t)) {
    mx_storage_release(s);
    return raise_arg(env, OP, "shape %T has %ld elements but the tensor has %lu", argv[1],
                     (long)n, (unsigned long)tensor_numel(t));
  }
  mx_tensor *v = tensor_wrap(s, t->dtype, shape, rank); /* takes the acquired reference */
  v->offset = t->offset;
  v->nbytes = t->nbytes;
  return tensor_term(env, v);
}
#undef OP

#define OP "slice"
/* slice(tensor, axis, start, length): a copy of [start, start+length) along axis. */
static ERL_NIF_TERM nif_slice(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  GET_TENSOR(argv[0], t, s, "tensor");
  int axis;
  ErlNifSInt64 start, len;
  if (t->rank == 0 || !get_axis(env, argv[1], t->rank, &axis)) {
    mx_storage_release(s);
    return raise_arg(env, OP, "axis must be an integer axis of a rank-%d tensor, got: %.200T",
                     t->rank, argv[1]);
  }
  if (!enif_get_int64(env, argv[2], &start) || !enif_get_int64(env, argv[3], &len) ||
      start < 0 || len < 0 || start > t->shape[axis] || len > t->shape[axis] - start) {
    mx_storage_release(s);
    return raise_arg(env, OP, "start %.100T and length %.100T must lie within axis %d of size %ld",
                     argv[2], argv[3], axis, (long)t->shape[axis]);
  }
  MAYBE_RESCHEDULE(nif_slice, t->slot, t->nbytes, s);
  int64_t shape[MX_MAX_RANK];
  memcpy(shape, t->shape, sizeof shape);
  shape[axis] = len;
  NEW_OUTPUT(out, outs, t->slot, t->dtype, shape, t->rank, s);
  size_t outer, dim, inner, es = mx_dtype_size(t->dtype);
  axis_split(t->shape, t->rank, axis, &outer, &dim, &inner);
  size_t width = (size_t)len * inner * es;
  mx_err err = {0, {0}};
  int rc = MX_OK;
  if (width && outer)
    rc = mx_backend_for(t->slot)->copy2d(mx_backend_dev(t->slot), outs->ptr, width,
                                         (char *)mx_data(s, t) + (size_t)start * inner * es,
                                         dim * inner * es, width, outer, &err);
  mx_storage_release(s);
  return finish(env, OP, rc, &err, out);
}
#undef OP

#define OP "concatenate"
#define MX_MAX_CONCAT 1024
/* concatenate([tensor], axis) */
static ERL_NIF_TERM nif_concatenate(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  unsigned count;
  if (!enif_get_list_length(env, argv[0], &count) || count == 0 || count > MX_MAX_CONCAT)
    return raise_arg(env, OP, "tensors must be a non-empty list of at most %d tensors, got: %.200T",
                     MX_MAX_CONCAT, argv[0]);
  mx_tensor **ts = calloc(count, sizeof *ts);
  mx_storage **ss = calloc(count, sizeof *ss);
  if (!ts || !ss) {
    free(ts);
    free(ss);
    mx_err e = {MX_E_OOM, "out of host memory"};
    return raise_err(env, OP, &e);
  }
  ERL_NIF_TERM list = argv[0], head;
  unsigned got = 0;
  const char *bad = NULL;
  int axis = 0;
  int64_t total = 0;
  size_t work = 0;
  while (enif_get_list_cell(env, list, &head, &list)) {
    if (!get_tensor_any(env, head, &ts[got])) { bad = "every element of tensors must be a Mambex.Tensor"; break; }
    ss[got] = mx_tensor_acquire(ts[got]);
    if (!ss[got]) { bad = "a tensor in the list was freed"; break; }
    got++;
  }
  if (!bad && (ts[0]->rank == 0 || !get_axis(env, argv[1], ts[0]->rank, &axis)))
    bad = "axis must be an integer axis of the tensors' rank";
  for (unsigned i = 0; !bad && i < got; i++) {
    if (ts[i]->dtype != ts[0]->dtype) bad = "all tensors must have the same type";
    else if (ts[i]->slot != ts[0]->slot) bad = "all tensors must be on the same device";
    else if (ts[i]->rank != ts[0]->rank) bad = "all tensors must have the same rank";
    for (int k = 0; !bad && k < ts[0]->rank; k++)
      if (k != axis && ts[i]->shape[k] != ts[0]->shape[k])
        bad = "shapes must agree on every axis but the concatenation axis";
    if (!bad && ts[i]->shape[axis] > ((int64_t)1 << 62) - total) bad = "the output size overflows";
    if (!bad) {
      total += ts[i]->shape[axis];
      work += ts[i]->nbytes;
    }
  }
  ERL_NIF_TERM result;
  if (bad) {
    result = raise_arg(env, OP, "%s (axis %.50T)", bad, argv[1]);
  } else {
    int f = resched_flags_enqueue(ts[0]->slot, work);
    if (f) {
      result = enif_schedule_nif(env, OP, f, nif_concatenate, argc, argv);
    } else {
      int64_t shape[MX_MAX_RANK];
      memcpy(shape, ts[0]->shape, sizeof shape);
      shape[axis] = total;
      int64_t n = mx_numel_checked(shape, ts[0]->rank, mx_dtype_size(ts[0]->dtype));
      mx_err err = {0, {0}};
      mx_storage *outs = NULL;
      if (n < 0) {
        result = raise_arg(env, OP, "the output size overflows");
      } else if (mx_storage_new(ts[0]->slot, (size_t)n * mx_dtype_size(ts[0]->dtype), &outs, &err)) {
        result = raise_err(env, OP, &err);
      } else {
        mx_tensor *out = tensor_wrap(outs, ts[0]->dtype, shape, ts[0]->rank);
        const mx_backend *be = mx_backend_for(ts[0]->slot);
        size_t es = mx_dtype_size(ts[0]->dtype), outer, dim, inner, off = 0;
        axis_split(shape, ts[0]->rank, axis, &outer, &dim, &inner);
        int rc = MX_OK;
        for (unsigned i = 0; i < got && rc == MX_OK; i++) {
          size_t width = (size_t)ts[i]->shape[axis] * inner * es;
          if (width && outer)
            rc = be->copy2d(mx_backend_dev(ts[0]->slot), (char *)outs->ptr + off, dim * inner * es,
                            mx_data(ss[i], ts[i]), width, width, outer, &err);
          off += width;
        }
        result = finish(env, OP, rc, &err, out);
      }
    }
  }
  for (unsigned i = 0; i < got; i++) mx_storage_release(ss[i]);
  free(ts);
  free(ss);
  return result;
}
#undef OP

#define OP "permute"
/* permute(tensor, perm): out axis k is input axis perm[k]. */
static ERL_NIF_TERM nif_permute(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  GET_TENSOR(argv[0], t, s, "tensor");
  int arity, perm[MX_MAX_RANK], seen[MX_MAX_RANK] = {0};
  const ERL_NIF_TERM *el;
  int ok = enif_get_tuple(env, argv[1], &arity, &el) && arity == t->rank;
  for (int k = 0; ok && k < arity; k++) {
    ok = enif_get_int(env, el[k], &perm[k]) && perm[k] >= 0 && perm[k] < t->rank && !seen[perm[k]];
    if (ok) seen[perm[k]] = 1;
  }
  if (!ok) {
    mx_storage_release(s);
    return raise_arg(env, OP, "axes must be a tuple permuting 0..%d, got: %.200T", t->rank - 1,
                     argv[1]);
  }
  MAYBE_RESCHEDULE(nif_permute, t->slot, t->nbytes * 2, s);
  int64_t shape[MX_MAX_RANK];
  for (int k = 0; k < t->rank; k++) shape[k] = t->shape[perm[k]];
  NEW_OUTPUT(out, outs, t->slot, t->dtype, shape, t->rank, s);
  mx_err err = {0, {0}};
  int rc = tensor_numel(t) == 0 ? MX_OK
           : mx_backend_for(t->slot)->permute(mx_backend_dev(t->slot), mx_dtype_size(t->dtype),
                                              mx_data(s, t), outs->ptr, t->rank, t->shape, perm, &err);
  mx_storage_release(s);
  return finish(env, OP, rc, &err, out);
}
#undef OP

/* ---- elementwise ------------------------------------------------------- */

#define OP "cast"
static ERL_NIF_TERM nif_cast(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  int dtype;
  if (!get_dtype(env, argv[1], &dtype))
    return raise_arg(env, OP, "type must be a Mambex type such as {:f, 32}, got: %.200T", argv[1]);
  GET_TENSOR(argv[0], t, s, "tensor");
  MAYBE_RESCHEDULE(nif_cast, t->slot, t->nbytes * 2, s);
  NEW_OUTPUT(out, outs, t->slot, dtype, t->shape, t->rank, s);
  mx_err err = {0, {0}};
  int rc = mx_backend_for(t->slot)->cast(mx_backend_dev(t->slot), t->dtype, mx_data(s, t), dtype,
                                         outs->ptr, tensor_numel(t), &err);
  mx_storage_release(s);
  return finish(env, OP, rc, &err, out);
}
#undef OP

#define OP "unary"
/* unary(op, tensor), op in :negate :exp :log :sqrt */
static ERL_NIF_TERM nif_unary(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  int op = enif_is_identical(argv[0], A_NEGATE) ? MX_NEG : enif_is_identical(argv[0], A_EXP) ? MX_EXP
           : enif_is_identical(argv[0], A_LOG) ? MX_LOG : enif_is_identical(argv[0], A_SQRT) ? MX_SQRT : -1;
  if (op < 0)
    return raise_arg(env, OP, "op must be :negate, :exp, :log or :sqrt, got: %.200T", argv[0]);
  static const char *names[4] = {"negate", "exp", "log", "sqrt"};
  const char *opn = names[op];
#undef OP
#define OP opn
  GET_TENSOR(argv[1], t, s, "tensor");
  if (op != MX_NEG && !mx_dtype_is_float(t->dtype)) {
    mx_storage_release(s);
    return raise_arg(env, OP, "%T needs a float tensor, got type %T", argv[0],
                     dtype_term(env, t->dtype));
  }
  MAYBE_RESCHEDULE(nif_unary, t->slot, t->nbytes * 2, s);
  NEW_OUTPUT(out, outs, t->slot, t->dtype, t->shape, t->rank, s);
  mx_err err = {0, {0}};
  int rc = mx_backend_for(t->slot)->unary(mx_backend_dev(t->slot), op, t->dtype, mx_data(s, t),
                                          outs->ptr, tensor_numel(t), &err);
  mx_storage_release(s);
  return finish(env, OP, rc, &err, out);
}
#undef OP

static int shape_is_suffix(const mx_tensor *small, const mx_tensor *big) {
  if (small->rank > big->rank) return 0;
  for (int i = 0; i < small->rank; i++)
    if (small->shape[small->rank - 1 - i] != big->shape[big->rank - 1 - i]) return 0;
  return 1;
}

static int same_shape(const mx_tensor *a, const mx_tensor *b) {
  return tensor_has_shape(a, b->rank, b->shape);
}

#define OP "binary"
/* binary(op, a, b): a and b are tensors or numbers (not both numbers). A
 * tensor operand whose shape is a suffix of the other's is broadcast. */
static ERL_NIF_TERM nif_binary(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  int op = enif_is_identical(argv[0], A_ADD) ? MX_ADD : enif_is_identical(argv[0], A_SUBTRACT) ? MX_SUB
           : enif_is_identical(argv[0], A_MULTIPLY) ? MX_MUL : enif_is_identical(argv[0], A_DIVIDE) ? MX_DIV
           : enif_is_identical(argv[0], A_MAXIMUM) ? MX_MAXIMUM
           : enif_is_identical(argv[0], A_MINIMUM) ? MX_MINIMUM : -1;
  if (op < 0)
    return raise_arg(env, OP, "op must be :add, :subtract, :multiply, :divide, :maximum or "
                     ":minimum, got: %.200T", argv[0]);
  static const char *names[8] = {"add", "subtract", "multiply", "divide", "", "", "maximum", "minimum"};
  const char *opn = names[op];
#undef OP
#define OP opn
  static const int reversed[8] = {MX_ADD, MX_RSUB, MX_MUL, MX_RDIV, MX_SUB, MX_DIV, MX_MAXIMUM, MX_MINIMUM};
  mx_tensor *ta = NULL, *tb = NULL;
  mx_scalar scalar = {0, 0};
  int a_is_t = get_tensor_any(env, argv[1], &ta), b_is_t = get_tensor_any(env, argv[2], &tb);
  if (!a_is_t && !get_scalar(env, argv[1], &scalar))
    return raise_arg(env, OP, "a must be a Mambex.Tensor, a float or a 64-bit integer, got: %.200T",
                     argv[1]);
  if (!b_is_t && !get_scalar(env, argv[2], &scalar))
    return raise_arg(env, OP, "b must be a Mambex.Tensor, a float or a 64-bit integer, got: %.200T",
                     argv[2]);
  if (!a_is_t && !b_is_t) return raise_arg(env, OP, "a or b must be a Mambex.Tensor");
  /* Normalise so that `big` is the tensor that gives the output shape. */
  mx_tensor *big = a_is_t ? ta : tb, *small = NULL;
  int bmode = MX_B_SCALAR;
  if (!a_is_t) op = reversed[op];
  if (a_is_t && b_is_t) {
    if (ta->dtype != tb->dtype)
      return raise_arg(env, OP, "a and b must have the same type, got %T and %T",
                       dtype_term(env, ta->dtype), dtype_term(env, tb->dtype));
    if (ta->slot != tb->slot)
      return raise_arg(env, OP, "a and b must be on the same device, got %T and %T",
                       device_term(env, ta->slot), device_term(env, tb->slot));
    if (same_shape(ta, tb)) {
      small = tb;
      bmode = MX_B_SAME;
    } else if (shape_is_suffix(tb, ta)) {
      small = tb;
      bmode = MX_B_TRAILING;
    } else if (shape_is_suffix(ta, tb)) {
      big = tb;
      small = ta;
      op = reversed[op];
      bmode = MX_B_TRAILING;
    } else {
      return raise_arg(env, OP, "shapes %T and %T do not broadcast (one must be a suffix of the "
                       "other)", shape_term(env, ta->shape, ta->rank), shape_term(env, tb->shape, tb->rank));
    }
  }
  mx_storage *sb = mx_tensor_acquire(big);
  if (!sb) return raise_arg(env, OP, "%s was freed and cannot be used", big == ta ? "a" : "b");
  mx_storage *ss = NULL;
  if (small) {
    ss = mx_tensor_acquire(small);
    if (!ss) {
      mx_storage_release(sb);
      return raise_arg(env, OP, "%s was freed and cannot be used", small == ta ? "a" : "b");
    }
  }
  MAYBE_RESCHEDULE(nif_binary, big->slot, big->nbytes * 3, sb, ss);
  NEW_OUTPUT(out, outs, big->slot, big->dtype, big->shape, big->rank, sb, ss);
  mx_err err = {0, {0}};
  size_t n = tensor_numel(big), bn = small ? tensor_numel(small) : 0;
  int rc = MX_OK;
  if (n && !(bmode == MX_B_TRAILING && bn == 0))
    rc = mx_backend_for(big->slot)->binary(mx_backend_dev(big->slot), op, big->dtype, mx_data(sb, big),
                                           small ? mx_data(ss, small) : NULL, scalar, bmode, n, bn,
                                           outs->ptr, &err);
  mx_storage_release(sb);
  mx_storage_release(ss);
  return finish(env, OP, rc, &err, out);
}
#undef OP

#define OP "axpy"
/* axpy(alpha, x, y) = alpha * x + y */
static ERL_NIF_TERM nif_axpy(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  mx_scalar alpha;
  if (!get_scalar(env, argv[0], &alpha))
    return raise_arg(env, OP, "alpha must be a float or a 64-bit integer, got: %.200T", argv[0]);
  GET_TENSOR(argv[1], tx, sx, "x");
  mx_tensor *ty;
  if (!get_tensor_any(env, argv[2], &ty)) {
    mx_storage_release(sx);
    return raise_arg(env, OP, "y must be a Mambex.Tensor, got: %.200T", argv[2]);
  }
  const char *bad = tx->dtype != ty->dtype ? "x and y must have the same type"
                    : tx->slot != ty->slot ? "x and y must be on the same device"
                    : !same_shape(tx, ty) ? "x and y must have the same shape" : NULL;
  if (bad) {
    mx_storage_release(sx);
    return raise_arg(env, OP, "%s", bad);
  }
  mx_storage *sy = mx_tensor_acquire(ty);
  if (!sy) {
    mx_storage_release(sx);
    return raise_arg(env, OP, "y was freed and cannot be used");
  }
  MAYBE_RESCHEDULE(nif_axpy, tx->slot, tx->nbytes * 3, sx, sy);
  NEW_OUTPUT(out, outs, tx->slot, tx->dtype, tx->shape, tx->rank, sx, sy);
  mx_err err = {0, {0}};
  size_t n = tensor_numel(tx);
  int rc = n ? mx_backend_for(tx->slot)->axpy(mx_backend_dev(tx->slot), tx->dtype, alpha, mx_data(sx, tx),
                                              mx_data(sy, ty), outs->ptr, n, &err)
             : MX_OK;
  mx_storage_release(sx);
  mx_storage_release(sy);
  return finish(env, OP, rc, &err, out);
}
#undef OP

/* ---- reductions -------------------------------------------------------- */

#define OP "reduce"
/* reduce(op, tensor, axis | nil), op in :sum :mean :max */
static ERL_NIF_TERM nif_reduce(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  int op = enif_is_identical(argv[0], A_SUM) ? MX_SUM : enif_is_identical(argv[0], A_MEAN) ? MX_MEAN
           : enif_is_identical(argv[0], A_MAX) ? MX_RMAX : -1;
  if (op < 0) return raise_arg(env, OP, "op must be :sum, :mean or :max, got: %.200T", argv[0]);
  static const char *names[3] = {"sum", "mean", "max"};
  const char *opn = names[op];
#undef OP
#define OP opn
  GET_TENSOR(argv[1], t, s, "tensor");
  size_t outer = 1, dim = tensor_numel(t), inner = 1;
  int64_t shape[MX_MAX_RANK];
  int rank = 0;
  if (!enif_is_identical(argv[2], A_NIL)) {
    int axis;
    if (!get_axis(env, argv[2], t->rank, &axis)) {
      mx_storage_release(s);
      return raise_arg(env, OP, "axis must be nil or an integer axis of a rank-%d tensor, got: %.200T",
                       t->rank, argv[2]);
    }
    axis_split(t->shape, t->rank, axis, &outer, &dim, &inner);
    for (int k = 0; k < t->rank; k++)
      if (k != axis) shape[rank++] = t->shape[k];
  }
  if (op == MX_MEAN && !mx_dtype_is_float(t->dtype)) {
    mx_storage_release(s);
    return raise_arg(env, OP, "mean needs a float tensor, got type %T", dtype_term(env, t->dtype));
  }
  if (dim == 0 && op == MX_RMAX && outer * inner > 0) {
    mx_storage_release(s);
    return raise_arg(env, OP, "max over an empty axis is undefined");
  }
  MAYBE_RESCHEDULE(nif_reduce, t->slot, t->nbytes, s);
  NEW_OUTPUT(out, outs, t->slot, t->dtype, shape, rank, s);
  mx_err err = {0, {0}};
  const mx_backend *be = mx_backend_for(t->slot);
  int dev = mx_backend_dev(t->slot), rc = MX_OK;
  if (outer * inner == 0) {
    rc = MX_OK;
  } else if (dim == 0) { /* empty sum is 0, empty mean is NaN */
    mx_scalar v = {op == MX_SUM ? 0.0 : (double)NAN, 0};
    rc = be->fill(dev, t->dtype, outs->ptr, outer * inner, v, &err);
  } else {
    rc = be->reduce(dev, op, t->dtype, mx_data(s, t), outs->ptr, outer, dim, inner, &err);
  }
  mx_storage_release(s);
  return finish(env, OP, rc, &err, out);
}
#undef OP

/* ---- timing events ----------------------------------------------------- */

#define OP "event_record"
/* event_record(device): records an event on the device queue. */
static ERL_NIF_TERM nif_event_record(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  GET_DEVICE(argv[0], slot, "device");
  MAYBE_RESCHEDULE(nif_event_record, slot, 0, NULL);
  mx_err err = {0, {0}};
  void *ev = NULL;
  if (mx_backend_for(slot)->event_record(mx_backend_dev(slot), &ev, &err))
    return raise_err(env, OP, &err);
  mx_event *e = enif_alloc_resource(EVENT_RT, sizeof *e);
  e->slot = slot;
  e->event = ev;
  ERL_NIF_TERM term = enif_make_resource(env, e);
  enif_release_resource(e);
  return term;
}
#undef OP

#define OP "spin"
/* spin(device, microseconds): keeps the device queue busy (benchmarks). */
static ERL_NIF_TERM nif_spin(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  GET_DEVICE(argv[0], slot, "device");
  double us;
  if (!get_number(env, argv[1], &us) || !(us >= 0 && us <= 1e7))
    return raise_arg(env, OP, "microseconds must be a number in 0..10_000_000, got: %.200T", argv[1]);
  MAYBE_RESCHEDULE(nif_spin, slot, 0, NULL);
  mx_err err = {0, {0}};
  if (mx_backend_for(slot)->spin(mx_backend_dev(slot), us, &err)) return raise_err(env, OP, &err);
  return A_OK;
}
#undef OP

#define OP "event_elapsed"
/* event_elapsed(start, end): microseconds between two events of one device. */
static ERL_NIF_TERM nif_event_elapsed(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
  mx_event *a, *b;
  if (!enif_get_resource(env, argv[0], EVENT_RT, (void **)&a))
    return raise_arg(env, OP, "start must be an event, got: %.200T", argv[0]);
  if (!enif_get_resource(env, argv[1], EVENT_RT, (void **)&b))
    return raise_arg(env, OP, "end must be an event, got: %.200T", argv[1]);
  if (a->slot != b->slot) return raise_arg(env, OP, "start and end must be on one device");
  MAYBE_RESCHEDULE_WAITING(nif_event_elapsed, a->slot, 0, NULL);
  mx_err err = {0, {0}};
  double us = 0;
  if (mx_backend_for(a->slot)->event_elapsed(mx_backend_dev(a->slot), a->event, b->event, &us, &err))
    return raise_err(env, OP, &err);
  return enif_make_double(env, us);
}
#undef OP

/* ---- load / upgrade / unload ------------------------------------------- */

static void tensor_dtor(ErlNifEnv *env, void *obj) {
  (void)env;
  mx_tensor_drop((mx_tensor *)obj);
}

/* Open priv/mambex_cuda.so when present and a device answers. */
static const mx_backend *open_cuda(ErlNifEnv *env, ERL_NIF_TERM load_info) {
  char dir[1024];
  ErlNifBinary b;
  const char *off = getenv("MAMBEX_CUDA");
  g_cuda_devices = 0;
  if (off && strcmp(off, "0") == 0) {
    snprintf(g_cuda_status, sizeof g_cuda_status, "disabled by MAMBEX_CUDA=0");
    return NULL;
  }
  if (!enif_inspect_binary(env, load_info, &b) || b.size == 0 || b.size >= sizeof dir - 32) {
    snprintf(g_cuda_status, sizeof g_cuda_status, "no priv directory given");
    return NULL;
  }
  memcpy(dir, b.data, b.size);
  dir[b.size] = 0;
  strcat(dir, "/mambex_cuda.so");
  void *h = dlopen(dir, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
  if (!h) {
    const char *e = dlerror();
    snprintf(g_cuda_status, sizeof g_cuda_status, "cannot open %s: %s", dir, e ? e : "?");
    return NULL;
  }
  /* The handle is never closed: storages on the device refer to it. */
  mx_backend_get_fn get = (mx_backend_get_fn)dlsym(h, "mx_cuda_backend_get");
  const mx_backend *be = get ? get(MX_BACKEND_ABI) : NULL;
  if (!be) {
    snprintf(g_cuda_status, sizeof g_cuda_status, "%s has a different backend ABI", dir);
    return NULL;
  }
  mx_err err = {0, {0}};
  int n = be->device_count(&err);
  if (n <= 0) {
    snprintf(g_cuda_status, sizeof g_cuda_status, "no CUDA device answers%s%s",
             err.msg[0] ? ": " : "", err.msg);
    return NULL;
  }
  g_cuda_devices = n > MX_MAX_CUDA_DEVICES ? MX_MAX_CUDA_DEVICES : n;
  snprintf(g_cuda_status, sizeof g_cuda_status, "%d CUDA device(s)", g_cuda_devices);
  return be;
}

static void event_dtor(ErlNifEnv *env, void *obj) {
  (void)env;
  mx_event *e = obj;
  const mx_backend *be = mx_backend_for(e->slot);
  if (be && e->event) be->event_destroy(mx_backend_dev(e->slot), e->event);
}

static int open_types(ErlNifEnv *env, ErlNifResourceFlags flags) {
  ErlNifResourceFlags tried;
  TENSOR_RT = enif_open_resource_type(env, NULL, "mambex_tensor", tensor_dtor, flags, &tried);
  EVENT_RT = enif_open_resource_type(env, NULL, "mambex_event", event_dtor, flags, &tried);
  if (infer_nif_open_types(env, flags)) return -1;
  return TENSOR_RT && EVENT_RT ? 0 : -1;
}

static int load(ErlNifEnv *env, void **priv, ERL_NIF_TERM load_info) {
  make_atoms(env);
  if (open_types(env, ERL_NIF_RT_CREATE)) return -1;
  g_shared = calloc(1, sizeof *g_shared);
  if (!g_shared) return -1;
  atomic_init(&g_shared->instances, 1);
  const mx_backend *cuda = open_cuda(env, load_info);
  mx_core_init(g_shared, cuda, g_cuda_devices);
  *priv = g_shared;
  return 0;
}

static int upgrade(ErlNifEnv *env, void **priv, void **old_priv, ERL_NIF_TERM load_info) {
  make_atoms(env);
  if (open_types(env, ERL_NIF_RT_CREATE | ERL_NIF_RT_TAKEOVER)) return -1;
  g_shared = *old_priv; /* keep the statistics of tensors made by the old instance */
  atomic_fetch_add(&g_shared->instances, 1);
  const mx_backend *cuda = open_cuda(env, load_info);
  mx_core_init(g_shared, cuda, g_cuda_devices);
  *priv = g_shared;
  return 0;
}

static void unload(ErlNifEnv *env, void *priv) {
  (void)env;
  /* The shared block is kept even by the last instance: resources taken over
   * by a newer instance, or destroyed late, still account into it. */
  atomic_fetch_sub(&((mx_shared *)priv)->instances, 1);
}

/* Every NIF is registered plain: each op moves itself to a dirty scheduler
 * (IO for device enqueues, CPU for long host work) with enif_schedule_nif. */
static ErlNifFunc nif_funcs[] = {
    {"backend_info", 0, nif_backend_info, 0},
    {"set_executor", 1, nif_set_executor, 0},
    {"executor_inline?", 0, nif_executor_inline, 0},
    {"device_name", 1, nif_device_name, 0},
    {"sync", 1, nif_sync, 0},
    {"memory_stats", 1, nif_memory_stats, 0},
    {"reset_peak", 1, nif_reset_peak, 0},
    {"from_binary", 4, nif_from_binary, 0},
    {"to_binary", 2, nif_to_binary, 0},
    {"to_device", 2, nif_to_device, 0},
    {"free", 1, nif_free, 0},
    {"live?", 1, nif_is_live, 0},
    {"fill", 4, nif_fill, 0},
    {"iota", 4, nif_iota, 0},
    {"random", 7, nif_random, 0},
    {"reshape", 2, nif_reshape, 0},
    {"slice", 4, nif_slice, 0},
    {"concatenate", 2, nif_concatenate, 0},
    {"permute", 2, nif_permute, 0},
    {"cast", 2, nif_cast, 0},
    {"unary", 2, nif_unary, 0},
    {"binary", 3, nif_binary, 0},
    {"axpy", 3, nif_axpy, 0},
    {"reduce", 3, nif_reduce, 0},
    {"event_record", 1, nif_event_record, 0},
    {"event_elapsed", 2, nif_event_elapsed, 0},
    {"spin", 2, nif_spin, 0},
    {"scan_forward", 12, nif_scan_forward, 0},
    {"scan_backward", 14, nif_scan_backward, 0},
    /* normal scheduler: moves itself to a dirty one (CPU for large host
     * updates, IO for CUDA enqueues) after checking its arguments */
    {"adamw_step", 9, nif_adamw_step, 0},
    {"infer", 7, nif_infer, 0},
    {"infer_plan_new", 4, nif_infer_plan_new, 0},
    {"infer_plan_step", 3, nif_infer_plan_step, 0},
    {"infer_plan_info", 1, nif_infer_plan_info, 0},
    {"infer_plan_free", 1, nif_infer_plan_free, 0},
    {"conv1d_forward", 5, nif_conv1d_forward, 0},
    {"conv1d_backward", 10, nif_conv1d_backward, 0},
    {"norm_forward", 6, nif_norm_forward, 0},
    {"norm_backward", 10, nif_norm_backward, 0},
    {"act_forward", 2, nif_act_forward, 0},
    {"act_backward", 3, nif_act_backward, 0},
    {"swiglu_forward", 2, nif_swiglu_forward, 0},
    {"swiglu_backward", 3, nif_swiglu_backward, 0},
    /* losses (loss_nif.c): they reschedule themselves (dirty CPU for large host calls, dirty IO for CUDA enqueues) */
    {"cross_entropy", 7, nif_cross_entropy, 0},
    {"mse", 5, nif_mse, 0},
    {"linear_forward", 4, nif_linear_forward, 0},
    {"linear_backward", 9, nif_linear_backward, 0},
    {"matmul", 8, nif_matmul, 0},
};

ERL_NIF_INIT(Elixir.Mambex.NIF, nif_funcs, load, NULL, upgrade, unload)

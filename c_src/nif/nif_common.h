/*
 * nif_common.h: what the NIF source files share: the tensor resource type,
 * atoms, term decoding, error raising and the executor macros. Defined in
 * mambex_nif.c; see its header comment for the threading and lifetime
 * invariants every NIF keeps.
 */
#ifndef MAMBEX_NIF_COMMON_H
#define MAMBEX_NIF_COMMON_H

#include <erl_nif.h>
#include <stdio.h>

#include "../core/backend.h"
#include "../core/tensor.h"

extern ErlNifResourceType *TENSOR_RT;
extern int g_cuda_devices;
extern ERL_NIF_TERM A_OK, A_NIL, A_TRUE, A_FALSE, A_CPU, A_CUDA, A_F, A_BF, A_S, A_U;
extern ERL_NIF_TERM A_STRUCT, A_EXCEPTION, A_MESSAGE, A_KIND, A_OP;
extern ERL_NIF_TERM A_REF, A_SHAPE, A_TYPE, A_DEVICE;
extern ERL_NIF_TERM A_TENSOR_MOD, A_ARG_ERROR_MOD, A_MX_ERROR_MOD;
extern ERL_NIF_TERM A_OOM, A_RUNTIME, A_LOST;
extern ERL_NIF_TERM A_UNIFORM, A_NORMAL;
extern ERL_NIF_TERM A_ADD, A_SUBTRACT, A_MULTIPLY, A_DIVIDE, A_MAXIMUM, A_MINIMUM;
extern ERL_NIF_TERM A_NEGATE, A_EXP, A_LOG, A_SQRT, A_SUM, A_MEAN, A_MAX;
extern ERL_NIF_TERM A_LIVE_BYTES, A_PEAK_BYTES, A_LIVE_HANDLES, A_TOTAL_ALLOCS;
extern ERL_NIF_TERM A_CUDA_DEVICES, A_CUDA_STATUS;

ERL_NIF_TERM make_string(ErlNifEnv *env, const char *s);
/* Raise ArgumentError("<op>: <message>"); the message may use %T. */
ERL_NIF_TERM raise_arg(ErlNifEnv *env, const char *op, const char *fmt, ...);
/* Raise for a backend failure: ArgumentError for MX_E_ARG, else Mambex.Error. */
ERL_NIF_TERM raise_err(ErlNifEnv *env, const char *op, const mx_err *err);
ERL_NIF_TERM dtype_term(ErlNifEnv *env, int dt);
int get_dtype(ErlNifEnv *env, ERL_NIF_TERM term, int *out);
ERL_NIF_TERM device_term(ErlNifEnv *env, int slot);
/* 1 on success; 0 = not a device term; -1 = a CUDA device that is absent. */
int get_device(ErlNifEnv *env, ERL_NIF_TERM term, int *slot);
int get_shape(ErlNifEnv *env, ERL_NIF_TERM term, int64_t *shape, int *rank);
ERL_NIF_TERM shape_term(ErlNifEnv *env, const int64_t *shape, int rank);
/* Accepts %Mambex.Tensor{ref: ref} or the bare resource reference. */
int get_tensor_any(ErlNifEnv *env, ERL_NIF_TERM term, mx_tensor **t);
int get_number(ErlNifEnv *env, ERL_NIF_TERM term, double *out);
/* A number as an mx_scalar: integers exact (int64 range), floats truncated
 * toward zero (saturating) for the integer part. */
int get_scalar(ErlNifEnv *env, ERL_NIF_TERM term, mx_scalar *out);
/* The dirty flag an op must move to, or 0 to run where it is. */
int resched_flags(int slot, size_t work_bytes);
/* The same for an op that only enqueues device work: with the inline
 * executor (Mambex.set_executor(:inline)) such an op runs on the calling
 * normal scheduler once its device is set up. */
int resched_flags_enqueue(int slot, size_t work_bytes);
/* A new tensor resource wrapping storage (takes over the reference). */
mx_tensor *tensor_wrap(mx_storage *s, int dtype, const int64_t *shape, int rank);
/* Whether t has exactly this rank and shape. */
int tensor_has_shape(const mx_tensor *t, int rank, const int64_t *shape);
/* A new output tensor, or NULL with *raised set (and *ok = 0 when ok is
 * not NULL): ArgumentError on size overflow, Mambex.Error on allocation
 * failure. output_drop releases one that will not be returned (NULL-safe). */
mx_tensor *output_new(ErlNifEnv *env, const char *op, int slot, int dtype, const int64_t *shape,
                      int rank, ERL_NIF_TERM *raised, int *ok);
void output_drop(mx_tensor *t);
/* %Mambex.Tensor{} for a resource; releases the local resource reference. */
ERL_NIF_TERM tensor_term(ErlNifEnv *env, mx_tensor *t);
size_t tensor_numel(const mx_tensor *t);
/* After a backend call: on failure drop the output and raise. */
ERL_NIF_TERM finish(ErlNifEnv *env, const char *op, int rc, const mx_err *err, mx_tensor *out);
void axis_split(const int64_t *shape, int rank, int axis, size_t *outer, size_t *dim, size_t *inner);
int get_axis(ErlNifEnv *env, ERL_NIF_TERM term, int rank, int *axis);

/* The selective scan NIFs (scan_nif.c), registered in mambex_nif.c. */
ERL_NIF_TERM nif_scan_forward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);
ERL_NIF_TERM nif_scan_backward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);

/* The AdamW NIF (adamw_nif.c), registered in mambex_nif.c. */
ERL_NIF_TERM nif_adamw_step(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);
/* The causal depthwise conv1d NIFs (conv1d_nif.c). */
ERL_NIF_TERM nif_conv1d_forward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);
ERL_NIF_TERM nif_conv1d_backward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);
/* The norm NIFs (norm_nif.c) and activation NIFs (activation_nif.c). */
ERL_NIF_TERM nif_norm_forward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);
ERL_NIF_TERM nif_norm_backward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);
ERL_NIF_TERM nif_act_forward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);
ERL_NIF_TERM nif_act_backward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);
ERL_NIF_TERM nif_swiglu_forward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);
ERL_NIF_TERM nif_swiglu_backward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);
/* The loss NIFs (loss_nif.c), registered in mambex_nif.c. */
ERL_NIF_TERM nif_cross_entropy(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);
ERL_NIF_TERM nif_mse(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);
/* The fused-inference NIFs and the plan resource type (infer_nif.c). */
ERL_NIF_TERM nif_infer(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);
ERL_NIF_TERM nif_infer_plan_new(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);
ERL_NIF_TERM nif_infer_plan_step(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);
ERL_NIF_TERM nif_infer_plan_info(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);
ERL_NIF_TERM nif_infer_plan_free(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);
int infer_nif_open_types(ErlNifEnv *env, ErlNifResourceFlags flags);
/* The linear-layer NIFs (linear_nif.c), registered in mambex_nif.c. */
ERL_NIF_TERM nif_linear_forward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);
ERL_NIF_TERM nif_linear_backward(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);
ERL_NIF_TERM nif_matmul(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);

#define MX_INLINE_BYTES ((size_t)1 << 18)

#define GET_TENSOR(term, t, s, argname)                                                   \
  mx_tensor *t;                                                                           \
  mx_storage *s;                                                                          \
  do {                                                                                    \
    if (!get_tensor_any(env, term, &t))                                                   \
      return raise_arg(env, OP, "%s must be a Mambex.Tensor, got: %.200T", argname, term); \
    s = mx_tensor_acquire(t);                                                             \
    if (!s) return raise_arg(env, OP, "%s was freed and cannot be used", argname);        \
  } while (0)

#define GET_DEVICE(term, slot, argname)                                                  \
  int slot;                                                                              \
  do {                                                                                   \
    int rc_ = get_device(env, term, &slot);                                              \
    if (rc_ == 0)                                                                        \
      return raise_arg(env, OP, "%s must be :cpu or {:cuda, index}, got: %.200T", argname, \
                       term);                                                            \
    if (rc_ < 0)                                                                         \
      return raise_arg(env, OP, "%s %T is not available (%d CUDA devices)", argname, term, \
                       g_cuda_devices);                                                  \
  } while (0)

/* Move the running NIF to the scheduler `flags_fn(slot, work_bytes)` names,
 * releasing the given storages first; nothing happens when it says 0. */
#define MAYBE_RESCHEDULE_BY(flags_fn, fn, slot, work_bytes, ...)                 \
  do {                                                                           \
    int f_ = flags_fn(slot, work_bytes);                                         \
    if (f_) {                                                                    \
      mx_storage *rel_[] = {NULL, __VA_ARGS__};                                  \
      for (size_t i_ = 1; i_ < sizeof rel_ / sizeof rel_[0]; i_++)               \
        mx_storage_release(rel_[i_]);                                            \
      return enif_schedule_nif(env, OP, f_, fn, argc, argv);                     \
    }                                                                            \
  } while (0)

/* For ops that only enqueue device work (or run on the CPU). */
#define MAYBE_RESCHEDULE(fn, slot, work_bytes, ...) \
  MAYBE_RESCHEDULE_BY(resched_flags_enqueue, fn, slot, work_bytes, __VA_ARGS__)

/* For ops that wait for the device (copies to or from the host, sync). */
#define MAYBE_RESCHEDULE_WAITING(fn, slot, work_bytes, ...) \
  MAYBE_RESCHEDULE_BY(resched_flags, fn, slot, work_bytes, __VA_ARGS__)

#define NEW_OUTPUT(out, outs, slot, dtype, shape, rank, ...)                    \
  mx_tensor *out;                                                               \
  mx_storage *outs;                                                             \
  do {                                                                          \
    int64_t n_ = mx_numel_checked(shape, rank, mx_dtype_size(dtype));           \
    mx_err e_ = {0, {0}};                                                       \
    if (n_ < 0) {                                                               \
      mx_storage *rel_[] = {NULL, __VA_ARGS__};                                 \
      for (size_t i_ = 1; i_ < sizeof rel_ / sizeof rel_[0]; i_++)              \
        mx_storage_release(rel_[i_]);                                           \
      return raise_arg(env, OP, "the output size overflows");                   \
    }                                                                           \
    if (mx_storage_new(slot, (size_t)n_ * mx_dtype_size(dtype), &outs, &e_)) {  \
      mx_storage *rel_[] = {NULL, __VA_ARGS__};                                 \
      for (size_t i_ = 1; i_ < sizeof rel_ / sizeof rel_[0]; i_++)              \
        mx_storage_release(rel_[i_]);                                           \
      return raise_err(env, OP, &e_);                                           \
    }                                                                           \
    out = tensor_wrap(outs, dtype, shape, rank);                                \
  } while (0)

#endif /* MAMBEX_NIF_COMMON_H */

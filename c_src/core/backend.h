/*
 * backend.h: the contract between the backend-neutral core and a compute
 * backend (the C11 CPU backend in c_src/cpu, the CUDA backend in c_src/cuda).
 *
 * A backend sees raw pointers, element counts and dtype codes only: shapes,
 * resources and Erlang terms stay in the core. The CUDA backend is a separate
 * shared object (priv/mambex_cuda.so) that exports one symbol,
 * `mx_cuda_backend_get`, returning a pointer to a static `mx_backend` table;
 * the NIF opens it with dlopen, so this header is the whole ABI between the
 * two objects. Bump MX_BACKEND_ABI whenever the table or an enum changes.
 *
 * Invariants every backend keeps:
 *   - Every function but `free_async` reports failure through its return
 *     value (an mx_errkind) and fills `err` with a message naming the call.
 *     No backend function aborts, exits or prints.
 *   - Ops are enqueued in call order on one ordered queue per device (the
 *     CPU backend runs them at once; the CUDA backend enqueues them on the
 *     device's stream). Only `download` and `sync` wait for the queue.
 *   - `free_async` is O(1) and never blocks: memory is released after every
 *     op enqueued before it has finished.
 *   - Floating-point math is done in fp32 for f32/bf16/f16 and in fp64 for
 *     f64; reductions accumulate in a fixed order, so results are
 *     bit-identical from run to run on one device.
 *   - Sizes are size_t; index arithmetic is 64-bit throughout.
 */
#ifndef MAMBEX_BACKEND_H
#define MAMBEX_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MX_BACKEND_ABI 4
#define MX_MAX_RANK 8
#define MX_MAX_CUDA_DEVICES 16
#define MX_ERR_LEN 256

/* Conversions from double (fill values, float scalars, casts, random
 * samples) round to nearest even, f64 -> bf16/f16 correctly (through a
 * round-to-odd f32). Integer scalars are exact (mx_scalar.i). Uniform
 * samples of float types are < max after rounding. Integer division
 * truncates, gives 0 for a zero divisor, and MIN / -1 wraps to MIN. */

/* Element types; the order is fixed (it indexes the dtype table). */
typedef enum {
  MX_F32 = 0,
  MX_F64 = 1,
  MX_BF16 = 2,
  MX_F16 = 3,
  MX_S32 = 4,
  MX_S64 = 5,
  MX_U8 = 6,
  MX_NUM_DTYPES = 7
} mx_dtype;

static inline size_t mx_dtype_size(int dt) {
  static const size_t sizes[MX_NUM_DTYPES] = {4, 8, 2, 2, 4, 8, 1};
  return (dt >= 0 && dt < MX_NUM_DTYPES) ? sizes[dt] : 0;
}

static inline int mx_dtype_is_float(int dt) {
  return dt == MX_F32 || dt == MX_F64 || dt == MX_BF16 || dt == MX_F16;
}

typedef enum {
  MX_OK = 0,
  MX_E_ARG = 1,    /* misuse the core should have caught: ArgumentError */
  MX_E_OOM = 2,    /* out of memory: Mambex.Error, kind :out_of_memory */
  MX_E_RUNTIME = 3,/* CUDA or system failure: Mambex.Error, kind :runtime */
  MX_E_LOST = 4    /* sticky device error: the device is lost for good */
} mx_errkind;

typedef struct {
  int kind;              /* mx_errkind */
  char msg[MX_ERR_LEN];  /* "cudaMallocAsync: out of memory (cuda_backend.cu:120)" */
} mx_err;

/* A scalar operand: `f` for float types, `i` (exact) for integer types. */
typedef struct {
  double f;
  int64_t i;
} mx_scalar;

#define MX_ZERO ((mx_scalar){0.0, 0})

typedef enum { MX_NEG = 0, MX_EXP = 1, MX_LOG = 2, MX_SQRT = 3 } mx_unary_op;

/* RSUB and RDIV compute b - a and b / a: the core uses them to put a
 * broadcast or scalar operand on the left. MAX and MIN are elementwise. */
typedef enum {
  MX_ADD = 0, MX_SUB = 1, MX_MUL = 2, MX_DIV = 3,
  MX_RSUB = 4, MX_RDIV = 5, MX_MAXIMUM = 6, MX_MINIMUM = 7
} mx_binary_op;

/* How operand b of a binary op is read for output element i:
 * SAME: b[i] (n elements); SCALAR: the double `scalar` (b is NULL);
 * TRAILING: b[i % bn] (b holds the trailing dims of a). */
typedef enum { MX_B_SAME = 0, MX_B_SCALAR = 1, MX_B_TRAILING = 2 } mx_bmode;

typedef enum { MX_SUM = 0, MX_MEAN = 1, MX_RMAX = 2 } mx_reduce_op;

typedef enum { MX_UNIFORM = 0, MX_NORMAL = 1 } mx_dist;

/* The Mamba-1 selective scan (see Mambex.Scan for the semantics).
 * Shapes: B batch, L length, D channels, N states, G groups (D % G == 0,
 * channel d reads group d / (D / G)). `io` is the dtype of u, delta, z, B, C,
 * out and their gradients; `param` the dtype of A, D, delta_bias, the states
 * and their gradients. The CPU backend takes io == param in {f32, f64}; the
 * CUDA backend takes param f32 and io in {f32, bf16, f16}. */
typedef struct {
  int64_t batch, len, dim, dstate, groups;
  int io, param;
  int softplus;
  const void *u;          /* (B, L, D) io */
  const void *delta;      /* (B, L, D) io */
  const void *A;          /* (D, N) param */
  const void *Bm;         /* (B, L, G, N) io */
  const void *Cm;         /* (B, L, G, N) io */
  const void *Dskip;      /* (D) param, or NULL */
  const void *z;          /* (B, L, D) io, or NULL */
  const void *delta_bias; /* (D) param, or NULL */
  const void *h0;         /* (B, D, N) param, or NULL: the state entering t = 0 */
  const uint8_t *reset;   /* (B, L) u8, or NULL: 1 zeroes the state entering t */
  /* Checkpoints: scan_ckpt_elems(a) param elements of states in the
   * backend's own layout. A forward given them writes them; a backward given
   * them reads them instead of re-running the forward. NULL: none. */
  void *ckpt;
} mx_scan_args;

/* Gradient outputs; NULL for each one not wanted (the core passes NULL for
 * inputs that were not given). Every non-NULL buffer is fully written. */
typedef struct {
  void *du, *ddelta, *dz;  /* (B, L, D) io */
  void *dB, *dC;           /* (B, L, G, N) io */
  void *dA;                /* (D, N) param */
  void *dD, *ddelta_bias;  /* (D) param */
  void *dh0;               /* (B, D, N) param */
} mx_scan_grads;

typedef struct mx_backend {
  int abi;               /* MX_BACKEND_ABI */
  const char *name;      /* "cpu" or "cuda" */

  /* Number of usable devices (0 when no driver or device answers). */
  int (*device_count)(mx_err *err);
  /* Human-readable device name, e.g. "NVIDIA H200". */
  int (*device_name)(int dev, char *buf, size_t len, mx_err *err);

  /* Memory. alloc of 0 bytes returns a valid unique pointer. */
  int (*alloc)(int dev, size_t nbytes, void **out, mx_err *err);
  void (*free_async)(int dev, void *ptr);

  /* Host <-> device. `upload` may return before the copy has finished only
   * when it no longer reads `src`; `download` waits for all earlier ops. */
  int (*upload)(int dev, void *dst, const void *src, size_t nbytes, mx_err *err);
  int (*download)(int dev, void *dst, const void *src, size_t nbytes, mx_err *err);
  /* Device-to-device 2-D copy: `height` rows of `width` bytes. */
  int (*copy2d)(int dev, void *dst, size_t dpitch, const void *src, size_t spitch,
                size_t width, size_t height, mx_err *err);
  /* Wait for every op enqueued on the device. */
  int (*sync)(int dev, mx_err *err);

  /* Creation. iota writes (i / inner) % dim for flat index i, so that
   * outer * dim * inner elements count along one axis. random draws from a
   * counter-based generator: element i depends only on (seed, i), so the same
   * seed gives the same values whatever the launch configuration. UNIFORM
   * is in [a, b); NORMAL has mean a and standard deviation b. */
  int (*fill)(int dev, int dtype, void *dst, size_t n, mx_scalar value, mx_err *err);
  int (*iota)(int dev, int dtype, void *dst, size_t outer, size_t dim, size_t inner,
              mx_err *err);
  int (*random)(int dev, int dtype, void *dst, size_t n, uint64_t seed, int dist,
                double a, double b, mx_err *err);

  /* Elementwise. */
  int (*cast)(int dev, int src_dtype, const void *src, int dst_dtype, void *dst,
              size_t n, mx_err *err);
  int (*unary)(int dev, int op, int dtype, const void *x, void *y, size_t n, mx_err *err);
  int (*binary)(int dev, int op, int dtype, const void *a, const void *b, mx_scalar scalar,
                int bmode, size_t n, size_t bn, void *out, mx_err *err);
  /* out = alpha * x + y */
  int (*axpy)(int dev, int dtype, mx_scalar alpha, const void *x, const void *y, void *out,
              size_t n, mx_err *err);

  /* Reduce x viewed as (outer, dim, inner) over dim into out (outer, inner).
   * dim >= 1. Accumulates in fp32 (fp64 for f64, s64 for integers). */
  int (*reduce)(int dev, int op, int dtype, const void *x, void *out, size_t outer,
                size_t dim, size_t inner, mx_err *err);

  /* out = x permuted: out's axis k is x's axis perm[k]. */
  int (*permute)(int dev, size_t elsize, const void *x, void *out, int rank,
                 const int64_t *x_shape, const int *perm, mx_err *err);

  /* Timing with device events, for benchmarks: event_record enqueues an
   * event on the device queue; event_elapsed waits for `end` and gives the
   * microseconds between two recorded events; event_destroy never blocks.
   * The CPU backend records the host clock. */
  int (*event_record)(int dev, void **event, mx_err *err);
  int (*event_elapsed)(int dev, void *start, void *end, double *us, mx_err *err);
  void (*event_destroy)(int dev, void *event);
  /* Keep the device queue busy for `us` microseconds (a spinning kernel; a
   * no-op on the CPU): benchmarks enqueue it before a timed region so that
   * the region's events measure device time, not host enqueue time. */
  int (*spin)(int dev, double us, mx_err *err);

  /* Selective scan. forward writes out (B, L, D) io and h_last (B, D, N)
   * param. backward takes d_out (B, L, D) io and dh_last (B, D, N) param or
   * NULL, recomputes the states, and writes the wanted gradients. */
  int (*scan_forward)(int dev, const mx_scan_args *a, void *out, void *h_last, mx_err *err);
  int (*scan_backward)(int dev, const mx_scan_args *a, const void *d_out, const void *dh_last,
                       const mx_scan_grads *g, mx_err *err);
  /* Elements of the checkpoint buffer for these arguments; 0 (or a NULL
   * entry) when the backend takes none. */
  int64_t (*scan_ckpt_elems)(int dev, const mx_scan_args *a);
} mx_backend;

/* The one symbol the CUDA shared object exports. NULL on ABI mismatch. */
typedef const mx_backend *(*mx_backend_get_fn)(int abi);
const mx_backend *mx_cuda_backend_get(int abi);

/* The CPU backend, linked into the NIF. */
const mx_backend *mx_cpu_backend(void);

#ifdef __cplusplus
}
#endif

#endif /* MAMBEX_BACKEND_H */

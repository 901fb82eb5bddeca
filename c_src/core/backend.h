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

#define MX_BACKEND_ABI 7
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


/* ---- Training building blocks (ABI 5) ---------------------------------
 *
 * Types: "io" is the dtype of activations (inputs, outputs and their
 * gradients), "param" that of weights, statistics and their gradients. The
 * CPU backend takes io == param in {f32, f64}; the CUDA backend takes param
 * f32 and io f32 or bf16 (only where the family says so; f32 otherwise).
 *
 * Gradient accumulation: a backward's `accumulate` = 1 adds the parameter
 * gradients (weights, biases, initial states) into their buffers instead of
 * overwriting them; input gradients (dx) are always written. Every gradient
 * buffer that is non-NULL is fully written (or added to). Reductions over
 * rows happen in a fixed order (no float atomics): bit-identical reruns.
 *
 * Scratch: a backend allocates any scratch it needs itself, stream-ordered,
 * and reports MX_E_OOM when it cannot.
 *
 * Device scalars (losses, the AdamW step and learning rate, the gradient
 * norm) are single-element buffers in device memory: written by a kernel,
 * read by later kernels, never synchronised on.
 */

typedef enum { MX_PREC_FP32 = 0, MX_PREC_TF32 = 1 } mx_precision;

/* Row-major GEMM: C (m, n) = alpha * op(A) * op(B) + beta * C, then + bias
 * on every row. op(A) is (m, k): A is (m, k) with lda >= k, or with trans_a
 * A is (k, m) with lda >= m. op(B) is (k, n): B is (k, n) with ldb >= n, or
 * with trans_b (n, k) with ldb >= k. ldc >= n. beta == 0: C is not read (it
 * may hold NaN). bias: (n) or NULL, same dtype. m, n or k may be 0 (k = 0
 * gives beta * C + bias). dtype: io (A, B, C and bias share it).
 * precision: MX_PREC_TF32 lets the CUDA backend use TF32 tensor cores; the
 * CPU ignores it. */
typedef struct {
  int dtype;
  int precision;
  int trans_a, trans_b;
  int64_t m, n, k;
  const void *a;
  int64_t lda;
  const void *b;
  int64_t ldb;
  void *c;
  int64_t ldc;
  double alpha, beta;
  const void *bias;
} mx_gemm_args;

/* Causal depthwise conv1d along L: for channel c and step t,
 *   pre[b,t,c] = bias[c] + sum_{j<W} weight[c,j] * xpad[b, t + j - (W-1), c]
 * where xpad at steps < 0 reads the initial state h0[b, c, W-1 + (t+j-(W-1))]
 * (h0 holds the W-1 inputs before t = 0, oldest first; zeros when NULL);
 * out = silu(pre) when `silu`, else pre. The final state (B, C, W-1) holds
 * the last W-1 inputs of the padded sequence (so h0 when L = 0).
 * 1 <= W <= 8. io: x, out, d_out, dx; param: weight, bias, states. */
typedef struct {
  int64_t batch, len, channels, width;
  int io, param;
  int silu;
  const void *x;      /* (B, L, C) io */
  const void *weight; /* (C, W) param */
  const void *bias;   /* (C) param, or NULL */
  const void *h0;     /* (B, C, W-1) param, or NULL */
} mx_conv1d_args;

typedef enum { MX_RMSNORM = 0, MX_LAYERNORM = 1 } mx_norm_kind;

/* RMSNorm / LayerNorm over the last axis of (rows, dim), optionally of the
 * sum s = x + residual:
 *   RMSNorm:   y = s * rstd * weight,            rstd = 1/sqrt(mean(s^2) + eps)
 *   LayerNorm: y = (s - mean) * rstd * weight + bias, rstd = 1/sqrt(var(s) + eps)
 * Forward writes y, the sum s (when residual is given), and the per-row
 * statistics (mean for LayerNorm only, rstd always; param dtype). The
 * backward reads s (x when there was no residual), the statistics, dy and
 * optionally ds (the gradient reaching s along the residual stream), and
 * writes dx = ds + d(norm)/ds (which is also the residual's gradient). */
typedef struct {
  int kind;
  int64_t rows, dim;
  int io, param;
  double eps;
  const void *x;        /* (rows, dim) io: x, or s in the backward */
  const void *residual; /* (rows, dim) io, or NULL (forward only) */
  const void *weight;   /* (dim) param */
  const void *bias;     /* (dim) param, or NULL (LayerNorm only) */
} mx_norm_args;

/* Pointwise activations; softplus(x) = x where x > 20. */
typedef enum {
  MX_ACT_SILU = 0, MX_ACT_GELU_TANH = 1, MX_ACT_SOFTPLUS = 2, MX_ACT_SIGMOID = 3
} mx_act;

/* Softmax cross-entropy over the last axis of logits (rows, classes) with
 * s32 targets (rows). A target equal to ignore_index (when has_ignore)
 * contributes nothing; any other target outside [0, classes) makes the loss
 * and that row's gradient NaN (never a crash: targets stay on the device).
 * Row loss l_r = w[t_r] * (logsumexp(x_r) - x_r[t_r]) (w = 1 without
 * weights). loss = scale * sum_r l_r / den, den = sum of w[t_r] over rows not
 * ignored when `mean` (then 0/0 = 0), else 1. dlogits = d loss / d logits
 * (same scale), written when non-NULL. io: logits, dlogits; param: weights
 * (classes) and the loss scalar. */
typedef struct {
  int64_t rows, classes;
  int io, param;
  const void *logits;     /* (rows, classes) io */
  const int32_t *targets; /* (rows) s32 */
  const void *weights;    /* (classes) param, or NULL */
  int has_ignore;
  int64_t ignore_index;
  int mean;
  double scale;
} mx_xent_args;

/* One parameter tensor of an AdamW update: n elements of param dtype f32. */
typedef struct {
  void *param;
  const void *grad;
  void *m, *v;
  int64_t n;
  int decay; /* 1: apply weight decay to this tensor */
} mx_adamw_tensor;

/* AdamW over many tensors, in one queue position:
 *   norm = sqrt(sum of grad^2 over every tensor); written to grad_norm when
 *          non-NULL; clip = min(1, max_norm / (norm + 1e-6)) when max_norm > 0
 *   t = *step + 1; *step = t
 *   g = clip * grad; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2
 *   p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + lr * wd * p  (wd if decay)
 * lr and step live on the device (f32 and s32 single-element buffers). The
 * `tensors` array is the caller's host memory, read during the call only. */
typedef struct {
  int ntensors;
  const mx_adamw_tensor *tensors;
  double beta1, beta2, eps, weight_decay, max_norm;
  const float *lr;   /* device scalar */
  int32_t *step;     /* device scalar, incremented */
  float *grad_norm;  /* device scalar, or NULL */
} mx_adamw_args;

/* Fused inference of a whole Mambex.Model (input projection, n_layers x
 * [RMSNorm -> Mamba block -> residual], final RMSNorm, head) over x
 * (batch, len, features), in one queue position (CUDA: one persistent
 * kernel). The semantics are those of the model's forward: scan with
 * softplus, D and the z gate; conv with SiLU; states carried in and out.
 * All f32. Limits: n_layers <= MX_INFER_MAX_LAYERS, d_state <= 32,
 * d_conv <= 8, features, d_model, d_inner <= MX_INFER_MAX_K,
 * dt_rank + 2 d_state <= MX_INFER_MAX_K. */
#define MX_INFER_MAX_LAYERS 16
#define MX_INFER_MAX_K 2048
enum { MX_PLAN_GRAPHED = 1, MX_PLAN_STEP_KERNEL = 2, MX_PLAN_CLUSTER_KERNEL = 4 };

typedef struct {
  const void *norm_w;   /* (DM) */
  const void *in_x_w;   /* (DM, DI) */
  const void *in_z_w;   /* (DM, DI) */
  const void *conv_w;   /* (DI, W) */
  const void *conv_b;   /* (DI) */
  const void *x_proj_w; /* (DI, R + 2N) */
  const void *dt_w;     /* (R, DI) */
  const void *dt_b;     /* (DI) */
  const void *a_log;    /* (DI, N); A = -exp(a_log) */
  const void *d;        /* (DI) */
  const void *out_w;    /* (DI, DM) */
  const void *conv_in;  /* (B, DI, W-1) state entering (oldest first), or NULL = zeros */
  const void *ssm_in;   /* (B, DI, N), or NULL = zeros */
  void *conv_out;       /* (B, DI, W-1) state after the last step; may equal conv_in */
  void *ssm_out;        /* (B, DI, N); may equal ssm_in */
} mx_infer_layer;

typedef struct {
  int64_t batch, len, features, d_model, d_inner, d_state, d_conv, dt_rank, outputs;
  int n_layers;
  int blocks;           /* CUDA: the general kernel with this many persistent blocks (0: the
                         * backend's choice) */
  int step_channels;    /* CUDA: the step kernel (len 1, batch <= 8) with this many channels
                         * per block; 0: the backend's choice (the cluster kernel for one
                         * row, else the step kernel when it fits), -1: the general kernel */
  double eps;
  const void *in_w;     /* (F, DM) */
  const void *in_b;     /* (DM) */
  const void *norm_f_w; /* (DM) */
  const void *head_w;   /* (DM, O) */
  const void *head_b;   /* (O) */
  mx_infer_layer layers[MX_INFER_MAX_LAYERS];
  const void *x;        /* (B, L, F) */
  const uint8_t *reset; /* (B, L): where non-zero the row starts afresh at that step; or NULL */
  void *out;            /* (B, L, O) */
} mx_infer_args;

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

  /* ---- training building blocks (see the structs above) ---- */
  /* linear: GEMM with optional bias; sum_rows: out (cols) = [out +] column
   * sums of x (rows, cols) in dtype (the bias gradient). */
  int (*gemm)(int dev, const mx_gemm_args *a, mx_err *err);
  int (*sum_rows)(int dev, int dtype, const void *x, int64_t rows, int64_t cols, void *out,
                  int accumulate, mx_err *err);

  /* conv1d: forward writes out (B, L, C) and h_last (B, C, W-1) when
   * non-NULL; backward takes d_out and dh_last (or NULL) and writes the
   * wanted gradients (NULL: not wanted). */
  int (*conv1d_forward)(int dev, const mx_conv1d_args *a, void *out, void *h_last, mx_err *err);
  int (*conv1d_backward)(int dev, const mx_conv1d_args *a, const void *d_out,
                         const void *dh_last, void *dx, void *dweight, void *dbias, void *dh0,
                         int accumulate, mx_err *err);

  /* norms: forward writes y (rows, dim), sum (rows, dim) when residual is
   * given, mean (rows) for LayerNorm and rstd (rows). */
  int (*norm_forward)(int dev, const mx_norm_args *a, void *y, void *sum, void *mean,
                      void *rstd, mx_err *err);
  int (*norm_backward)(int dev, const mx_norm_args *a, const void *mean, const void *rstd,
                       const void *dy, const void *dsum, void *dx, void *dweight, void *dbias,
                       int accumulate, mx_err *err);

  /* activations (io dtype): y = f(x); dx = dy * f'(x); swiglu out = silu(a) * b. */
  int (*act_forward)(int dev, int act, int dtype, const void *x, void *y, size_t n, mx_err *err);
  int (*act_backward)(int dev, int act, int dtype, const void *x, const void *dy, void *dx,
                      size_t n, mx_err *err);
  int (*swiglu_forward)(int dev, int dtype, const void *a, const void *b, void *out, size_t n,
                        mx_err *err);
  int (*swiglu_backward)(int dev, int dtype, const void *a, const void *b, const void *dout,
                         void *da, void *db, size_t n, mx_err *err);

  /* losses: loss is a device scalar (param dtype); the gradient is written
   * when non-NULL. mse: loss = scale * sum (pred - target)^2 [/ n when mean]. */
  int (*cross_entropy)(int dev, const mx_xent_args *a, void *loss, void *dlogits, mx_err *err);
  int (*mse)(int dev, int io, int param, const void *pred, const void *target, size_t n,
             int mean, double scale, void *loss, void *dpred, mx_err *err);

  /* optimiser */
  int (*adamw)(int dev, const mx_adamw_args *a, mx_err *err);

  /* fused inference (NULL where the backend has none) */
  int (*infer)(int dev, const mx_infer_args *a, mx_err *err);
  /* A captured inference plan for len = 1: the fused step recorded once
   * (a CUDA graph where the driver allows) and replayed by infer_plan_run,
   * which waits for it. a->x, a->out and a->reset are ignored: the plan
   * owns pinned host buffers that the step reads and writes directly, *host_in = frames (B * F f32) followed by B reset bytes, and
   * *host_out = logits (B * O f32). The states are updated in place
   * (conv_out == conv_in, ssm_out == ssm_in, both non-NULL). infer_plan_run
   * must not be called for one plan from two threads at once;
   * infer_plan_free waits for the plan's last run. *device_bytes: the
   * device memory the plan holds (for the memory statistics).
   * infer_plan_flags: MX_PLAN_GRAPHED when runs replay a CUDA graph (else
   * they launch directly), MX_PLAN_STEP_KERNEL when the step kernel runs,
   * MX_PLAN_CLUSTER_KERNEL when the cluster kernel runs. */
  int (*infer_plan_new)(int dev, const mx_infer_args *a, void **plan, void **host_in,
                        void **host_out, size_t *device_bytes, mx_err *err);
  int (*infer_plan_run)(int dev, void *plan, mx_err *err);
  void (*infer_plan_free)(int dev, void *plan);
  int (*infer_plan_flags)(const void *plan);
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

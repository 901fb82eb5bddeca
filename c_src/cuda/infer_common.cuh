/*
 * infer_common.cuh: what the two fused-inference kernels share: the kernel
 * parameters, the grid barrier and small math helpers. infer.cu has the
 * general kernel (any rows) and the host side (dispatch, plans);
 * infer_step.cu the step kernel (len 1, a few rows); infer_cluster.cu the
 * cluster kernel (len 1, one row).
 *
 * Invariants of the grid barrier: every block of the grid is co-resident
 * (cooperative launch); bar = {arrivals, exits} in device memory, zero
 * whenever no fused kernel runs (the last block out of a kernel zeroes
 * both); only one fused kernel runs at a time per device (they are all on
 * its one stream).
 */
#ifndef MAMBEX_INFER_COMMON_CUH
#define MAMBEX_INFER_COMMON_CUH

#include <math.h>
#include <stdint.h>

#include "cuda_ops.h"

#define IF_THREADS 256 /* threads of a block, both kernels */
#define IF_MAX_N 32    /* d_state limit of the fused path */
#define IF_MAX_W 8     /* d_conv limit */

typedef struct {
  const float *norm_w, *in_x_w, *in_z_w, *conv_w, *conv_b, *x_proj_w, *dt_w, *dt_b, *a_log, *d,
      *out_w;
  const float *conv_in, *ssm_in;
  float *conv_out, *ssm_out;
} if_layer;

/* Shared-memory layout of the step kernel, offsets in floats: per layer
 * slot (a group's slice of one layer's weights), then the slices of the
 * input projection and head, then the activations. */
typedef struct {
  /* within a slot */
  int w_in, w_x, w_dt, w_out, conv_w, conv_b, dt_b, a_log, d, norm_w, slot;
  /* after nslots slots */
  int nslots, w_inp, w_head, norm_f, s, act, xz, xc, dbc, delta, y, cst, rstd, rst, red, total;
} is_layout;

/* One product of the cluster kernel, out[j] = sum_r v[r] w[r][j] for
 * j < ncols: thread t takes column t % ncols and rows [s rps, (s+1) rps) of
 * slice s = t / ncols < S; the S slice sums are added in order. */
typedef struct {
  int ncols, S, rps;
} ic_geo;

/* Shared-memory layout of the cluster kernel, offsets in floats: two slots
 * of a block's small per-layer weights, then the partial sums other blocks
 * push, then the activations. */
typedef struct {
  /* within a slot */
  int norm_w, conv_w, conv_b, x_w, dt_w, dt_b, a_log, d, slot;
  /* after the two slots */
  int recv_s, recv_x, s, sn, xs, xc, z, y, dbc, red, wsum, total;
  ic_geo g_inp, g_in, g_x, g_out, g_head; /* input projection, in_proj, x_proj, out_proj, head */
  int cs;                                 /* blocks of the cluster (the grid) */
} ic_layout;

typedef struct {
  int B, L, F, DM, DI, N, W, RK, O, NL;
  int lp;   /* lanes per scan channel (power of two >= N, <= 32) */
  int tt;   /* scan steps staged per chunk (fits IF_SMEM_FLOATS) */
  float eps;
  const float *in_w, *in_b, *norm_f_w, *head_w, *head_b;
  const float *x;
  const uint8_t *reset;
  float *out;
  /* scratch (R rows each) */
  float *s, *xi, *z, *xc, *dbc, *y;
  unsigned *bar;
  if_layer layer[MX_INFER_MAX_LAYERS];
  /* the step kernel (infer_step.cu) and the cluster kernel (infer_cluster.cu) */
  int cpb;      /* channels per group (block) */
  int groups;   /* ceil(DI / cpb) = the grid */
  int fpg;      /* input features per group (the input projection's K split) */
  int cpo;      /* head outputs per group */
  int vec;      /* 1: weights staged in 16-byte chunks (sizes and pointers allow it) */
  is_layout sl; /* its shared-memory layout */
  float *part_s, *part_x; /* per-group partial sums: (groups, B, DM), (groups, B, RK + 2N) */
  ic_layout cl; /* the cluster kernel's layout */
} if_params;

/* ---------------------------------------------------------------- barrier */

static __device__ __forceinline__ unsigned ld_acquire(const unsigned *p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

/* All blocks of the grid meet here. bar[0] counts arrivals and only grows
 * during a kernel: the block that gets arrival number a waits until the
 * count reaches the end of a's round, (a / nblocks + 1) * nblocks (every
 * kernel starts from 0, so rounds are whole). One atomic and one poll per
 * barrier; the last arriver does not wait at all. */
static __device__ __forceinline__ void grid_barrier(unsigned *bar) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned nb = gridDim.x;
    __threadfence();
    const unsigned a = atomicAdd(&bar[0], 1u);
    const unsigned target = (a / nb + 1) * nb;
    if (a + 1 != target) {
      while (ld_acquire(&bar[0]) < target) {
      }
    }
  }
  __syncthreads();
}

/* At the end of the kernel: the last block out (every block has left every
 * barrier by then) zeroes the counters for the next kernel on the stream. */
static __device__ __forceinline__ void grid_exit(unsigned *bar) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned a = atomicAdd(&bar[1], 1u);
    if (a + 1 == gridDim.x) {
      atomicExch(&bar[0], 0u);
      atomicExch(&bar[1], 0u);
    }
  }
}

/* ----------------------------------------------------------------- helpers */

static __device__ __forceinline__ float silu_f(float x) { return x / (1.0f + expf(-x)); }

static __device__ __forceinline__ float softplus_f(float x) {
  return x > 20.0f ? x : log1pf(expf(x));
}

/* ------------------------------------------------------------------ host */

/* Launches a fused kernel cooperatively (all `grid` blocks co-resident, as
 * the grid barrier needs) on `stream`. */
static inline int infer_coop_launch(mx_cuda_dev *d, void (*fn)(if_params), unsigned grid, size_t smem,
                                    cudaStream_t stream, const if_params *p, mx_err *err) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(IF_THREADS);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1] = {};
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return MX_CUDA_CALL(d, err, cudaLaunchKernelEx(&cfg, fn, *p));
}

/* ------------------------------------------------------ the step kernel */

#define IS_MAX_ROWS 8 /* rows (batch) the step kernel takes */

/* Fills p's step fields (p's sizes already set) for `channels` per group
 * (0: the choice of infer_step.cu) within `max_blocks` co-resident blocks
 * and `max_smem` bytes of shared memory a block; 0 when the step kernel can
 * run, else 1 (it does not apply or fit; *why says why). */
int infer_step_configure(if_params *p, int channels, int max_blocks, size_t max_smem, const char **why);
/* Scratch floats the step kernel needs after the general scratch. */
size_t infer_step_scratch_floats(const if_params *p);
/* Launches the step kernel on `stream` (cooperative, p->groups blocks). */
int infer_step_launch(mx_cuda_dev *d, const if_params *p, cudaStream_t stream, mx_err *err);
/* The step kernel's attribute set-up under d->mu (for `rows` rows); its
 * co-resident limit for `smem` bytes into *max_blocks. */
int infer_step_setup(mx_cuda_dev *d, int rows, size_t smem, int *max_blocks, mx_err *err);

/* ---------------------------------------------------- the cluster kernel */

/* Fills p's cluster fields (p's sizes already set); 1 when the cluster
 * kernel (one step of one row) applies, fits in the device's shared memory
 * and one cluster of its size can be resident, else 0 (a driver's refusal
 * included: it is a "no", not an error). Under d->mu. */
int infer_cluster_configure(mx_cuda_dev *d, if_params *p);
/* Launches the cluster kernel on `stream` (one cluster of p->cl.cs blocks). */
int infer_cluster_launch(mx_cuda_dev *d, const if_params *p, cudaStream_t stream, mx_err *err);

#endif

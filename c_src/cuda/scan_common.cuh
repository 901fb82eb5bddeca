/*
 * scan_common.cuh: what the selective-scan kernels share (scan.cu, the
 * 4-lanes-a-channel and generic kernels and the launchers; scan_lps.cu, the
 * lane-per-state kernels): the launch parameters, the fast special functions
 * and the shared-memory staging helpers. Device code only; everything is
 * static or inline, so each translation unit has its own copy.
 */
#ifndef MAMBEX_SCAN_COMMON_CUH
#define MAMBEX_SCAN_COMMON_CUH

#include <stdint.h>

#include <cuda_pipeline.h>

#include "cuda_dtypes.cuh"
#include "cuda_ops.h"

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

typedef struct {
  int B, L, D, N, G;
  int CH, LPC, TC;       /* channels per block, lanes per channel, steps per chunk */
  int softplus;
  int split;             /* time-split lane-per-state kernels: segments a chunk (0: not split) */
  const void *u, *delta, *Bm, *Cm, *z;
  const float *A, *Dskip, *dbias, *h0;
  const uint8_t *reset;
  /* forward */
  void *out;
  float *h_last;
  /* backward */
  const void *dout;
  const float *dh_last;
  float *ck;              /* (B, nchunks, D, N) state at each chunk start */
  int ck_given;           /* backward16: ck came from the forward (skip pass 1) */
  void *du, *ddelta, *dz;
  float *dA_part;         /* (B, D, N) */
  float *dD_part, *ddb_part; /* (B, D) */
  float *dB_part, *dC_part;  /* (B, D / CH, L, N) */
  float *dh0;             /* (B, D, N) */
} scan_params;

static __device__ __forceinline__ float softplus_f(float x) {
  return x > 20.0f ? x : log1pf(expf(x));
}

static __device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

template <class T>
static __device__ __forceinline__ void cp16(void *dst, const void *src) {
  __pipeline_memcpy_async(dst, src, 16);
}

template <class IO>
static __device__ __forceinline__ float4 load4(const typename IO::T *p) {
  if constexpr (sizeof(typename IO::T) == 4) {
    return *(const float4 *)p;
  } else {
    uint2 r = *(const uint2 *)p;
    return make_float4(IO::load((uint16_t)(r.x & 0xffffu)), IO::load((uint16_t)(r.x >> 16)),
                       IO::load((uint16_t)(r.y & 0xffffu)), IO::load((uint16_t)(r.y >> 16)));
  }
}

/* log1p(y) for y in [0, 1]: y times a degree-8 fit of log1p(y)/y (relative
 * error 1.9e-7 evaluated in fp32). */
static __device__ __forceinline__ float log1p_unit(float y) {
  float q = 5.253457930e-03f;
  q = fmaf(q, y, -2.958850749e-02f);
  q = fmaf(q, y, 7.836166769e-02f);
  q = fmaf(q, y, -1.367477030e-01f);
  q = fmaf(q, y, 1.911143064e-01f);
  q = fmaf(q, y, -2.484436929e-01f);
  q = fmaf(q, y, 3.331927061e-01f);
  q = fmaf(q, y, -4.999950230e-01f);
  q = fmaf(q, y, 1.0f);
  return y * q;
}

/* softplus(x) = max(x, 0) + log1p(exp(-|x|)) (x above 20: x) with the
 * special-function exp: relative error about 3e-7 (1e-6 near |x| = 20,
 * where the term is below 2e-9). The fast kernels use it and the next one. */
static __device__ __forceinline__ float softplus_fast(float x) {
  if (x > 20.0f) return x;
  return fmaxf(x, 0.0f) + log1p_unit(__expf(-fabsf(x)));
}

static __device__ __forceinline__ float sigmoid_fast(float x) {
  return __fdividef(1.0f, 1.0f + __expf(-x));
}

/* The per-(t, d) terms of the backward: Δ and dΔ/dδ from the biased delta,
 * and dL/dy from dL/dout and z (silu gate); FAST picks the approximations
 * of the fast kernels. */
template <bool FAST>
static __device__ __forceinline__ void delta_terms(float dl, int softplus, float *dt, float *fac) {
  if (softplus) {
    *dt = FAST ? softplus_fast(dl) : softplus_f(dl);
    *fac = dl > 20.0f ? 1.0f : (FAST ? sigmoid_fast(dl) : sigmoid_f(dl));
  } else {
    *dt = dl;
    *fac = 1.0f;
  }
}

template <bool FAST>
static __device__ __forceinline__ float dy_term(float go, float zz, bool has_z) {
  if (!has_z) return go;
  return go * zz * (FAST ? sigmoid_fast(zz) : sigmoid_f(zz));
}

/* Steps between checkpoints of the N = 16 kernels (the forward writes them
 * when asked; the backward's pieces are this long). */
#define B16_SUB 8

/* Start cp.async copies of `rows` rows of ROW_BYTES (a multiple of 16) from
 * `src`, rows `stride` bytes apart, into `dst` packed, spread over the block. */
template <int ROW_BYTES>
static __device__ __forceinline__ void stage_rows(void *dst, const void *src, int64_t stride,
                                                  int rows) {
  constexpr int R = ROW_BYTES / 16;
  for (int i = threadIdx.x; i < rows * R; i += blockDim.x) {
    const int r = i / R, q = i % R;
    __pipeline_memcpy_async((char *)dst + (size_t)r * ROW_BYTES + q * 16,
                            (const char *)src + r * stride + q * 16, 16);
  }
}

/* Store one (t, d) of the backward's outputs du, dδ and, with z,
 * dz = dout·y·silu'(z) (y before the gate). */
template <class IO, bool FAST>
static __device__ __forceinline__ void store_grads_td(const scan_params &p, int64_t gi, float du,
                                                      float dd, float yp, float go, float zz) {
  typedef typename IO::T T;
  if (p.du) ((T *)p.du)[gi] = IO::store(du);
  if (p.ddelta) ((T *)p.ddelta)[gi] = IO::store(dd);
  if (p.dz) {
    const float sg = FAST ? sigmoid_fast(zz) : sigmoid_f(zz);
    ((T *)p.dz)[gi] = IO::store(go * yp * sg * (1.0f + zz * (1.0f - sg)));
  }
}

/* exp2 on the special-function unit, denormal results flushed to zero. */
static __device__ __forceinline__ float ex2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

/* The lane-per-state kernels for N = 16 (scan_lps.cu). scan_lps_wanted:
 * whether they take a call of this batch and width: 0 (no: the 4-lane
 * kernels of scan.cu), 1 (lane per state), 2 (lane per state, time split;
 * the launchers read p.split); MAMBEX_SCAN_KERNEL = lane4 / lps / split
 * overrides the rule, for tests and benchmarks;
 * scan_lps_channels: the channels a block (p.CH) for the forward or the
 * backward. The launchers are called with the device's enqueue mutex held
 * and only enqueue. p.ck as for the fast forward (the state entering every
 * B16_SUB-th step); the backward needs it (p.ck_given, or made here by a
 * checkpoint-only forward into p.ck) and writes the same partials as the
 * fast backward, with p.CH channels a block. */
MX_CUDA_HIDDEN int scan_lps_wanted(const scan_params &p, int io, const mx_cuda_dev *d);
/* the segments a chunk (p.split) when the time-split kernels are wanted */
MX_CUDA_HIDDEN int scan_lps_split(const scan_params &p);
MX_CUDA_HIDDEN int scan_lps_channels(const scan_params &p, int io, int backward, int sm_count);
MX_CUDA_HIDDEN int scan_lps_forward(const scan_params &p, int io, mx_cuda_dev *d, mx_err *err);
MX_CUDA_HIDDEN int scan_lps_backward(const scan_params &p, int io, mx_cuda_dev *d, mx_err *err);

#endif

/*
 * activation.cu: pointwise activations (SiLU, GELU tanh form, softplus,
 * sigmoid) and SwiGLU, forward and backward, on CUDA; io f32 or bf16, math in
 * fp32. Formulas and their evaluation (sigmoid and 1 - sigmoid from one
 * exp(-|x|); GELU as x sigmoid(2u)) as in c_src/cpu/activation_cpu.c:
 *
 *   sigmoid(x) = 1 / (1 + exp(-x))
 *   silu(x) = x sigmoid(x);  silu' = s (1 + x (1 - s))
 *   softplus(x) = log1p(exp(x)), x where x > 20;  softplus' = sigmoid, 1 above 20
 *   gelu(x) = x (1 + tanh(k (x + c x^3))) / 2;    gelu' = (1 + t) / 2 + x (1 - t^2) k (1 + 3 c x^2) / 2
 *   swiglu(a, b) = silu(a) b;  da = dout b silu'(a);  db = dout silu(a)
 *
 * One grid-stride kernel per call over n elements (64-bit indices, at most
 * one wave of blocks). When every pointer is aligned (16 bytes for f32, 8 for
 * bf16) each thread moves 4 elements per load; the n % 4 tail is done by the
 * first threads. Otherwise one element at a time.
 */
#include "cuda_dtypes.cuh"
#include "cuda_ops.h"
#include "cuda_runtime_state.h"

#define GELU_K 0.7978845608028654f /* sqrt(2 / pi) */
#define GELU_C 0.044715f

/* What a kernel computes: KIND 0 act forward (x -> y), 1 act backward
 * (x, dy -> dx), 2 swiglu forward (a, b -> out), 3 swiglu backward
 * (a, b, dout -> da, db). */
enum { K_FWD = 0, K_BWD = 1, K_SWIGLU = 2, K_SWIGLU_BWD = 3 };

/* sigmoid(x) and 1 - sigmoid(x) from one e = exp(-|x|), without
 * cancellation. */
MX_DEV void sig2(float x, float &s, float &sm) {
  const float e = expf(-fabsf(x));
  const float r = 1.0f / (1.0f + e);
  s = x >= 0.0f ? r : e * r;
  sm = x >= 0.0f ? e * r : r;
}

MX_DEV float sigm(float x) {
  float s, sm;
  sig2(x, s, sm);
  return s;
}

/* GELU as x sigmoid(2u), 2u = 2k (x + c x^3): 1 + tanh(u) = 2 sigmoid(2u). */
template <int ACT>
MX_DEV float act_f(float x) {
  if constexpr (ACT == MX_ACT_SILU) {
    return x * sigm(x);
  } else if constexpr (ACT == MX_ACT_GELU_TANH) {
    return x * sigm(2.0f * GELU_K * (x + GELU_C * x * x * x));
  } else if constexpr (ACT == MX_ACT_SOFTPLUS) {
    return x > 20.0f ? x : log1pf(expf(x));
  } else {
    return sigm(x);
  }
}

template <int ACT>
MX_DEV float act_df(float x) {
  float s, sm;
  if constexpr (ACT == MX_ACT_SILU) {
    sig2(x, s, sm);
    return s * (1.0f + x * sm);
  } else if constexpr (ACT == MX_ACT_GELU_TANH) {
    const float x2 = x * x;
    sig2(2.0f * GELU_K * (x + GELU_C * x2 * x), s, sm);
    return s + 2.0f * GELU_K * x * s * sm * (1.0f + 3.0f * GELU_C * x2);
  } else if constexpr (ACT == MX_ACT_SOFTPLUS) {
    return x > 20.0f ? 1.0f : sigm(x);
  } else {
    sig2(x, s, sm);
    return s * sm;
  }
}

/* One element: inputs p0, p1, p2 -> outputs o0, o1. */
template <int KIND, int ACT>
MX_DEV void elem(float p0, float p1, float p2, float &o0, float &o1) {
  if constexpr (KIND == K_FWD) {
    o0 = act_f<ACT>(p0);
  } else if constexpr (KIND == K_BWD) {
    o0 = p1 * act_df<ACT>(p0);
  } else if constexpr (KIND == K_SWIGLU) {
    o0 = p0 * sigm(p0) * p1;
  } else {
    float s, sm;
    sig2(p0, s, sm);
    o0 = p2 * p1 * (s * (1.0f + p0 * sm));
    o1 = p2 * (p0 * s);
  }
  (void)p1;
  (void)p2;
  (void)o1;
}

template <class D>
MX_DEV void ld4(const typename D::T *p, float v[4]) {
  if constexpr (sizeof(typename D::T) == 4) {
    float4 t = *reinterpret_cast<const float4 *>(p);
    v[0] = t.x;
    v[1] = t.y;
    v[2] = t.z;
    v[3] = t.w;
  } else {
    uint2 t = *reinterpret_cast<const uint2 *>(p);
    v[0] = D::load((uint16_t)(t.x & 0xffffu));
    v[1] = D::load((uint16_t)(t.x >> 16));
    v[2] = D::load((uint16_t)(t.y & 0xffffu));
    v[3] = D::load((uint16_t)(t.y >> 16));
  }
}

template <class D>
MX_DEV void st4(typename D::T *p, const float v[4]) {
  if constexpr (sizeof(typename D::T) == 4) {
    *reinterpret_cast<float4 *>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    uint2 t;
    t.x = (uint32_t)D::store(v[0]) | ((uint32_t)D::store(v[1]) << 16);
    t.y = (uint32_t)D::store(v[2]) | ((uint32_t)D::store(v[3]) << 16);
    *reinterpret_cast<uint2 *>(p) = t;
  }
}

/* Inputs in0 (n), in1 (n) for KIND >= 1, in2 (n) for KIND 3; outputs out0
 * (n), out1 (n) for KIND 3. VEC: 4 elements per step (aligned pointers). */
template <class D, int KIND, int ACT, bool VEC>
static __global__ void __launch_bounds__(MX_BLOCK)
    act_kernel(const typename D::T *__restrict__ in0, const typename D::T *__restrict__ in1,
               const typename D::T *__restrict__ in2, typename D::T *__restrict__ out0,
               typename D::T *__restrict__ out1, uint64_t n) {
  constexpr int NIN = KIND == K_FWD ? 1 : KIND == K_SWIGLU_BWD ? 3 : 2;
  const uint64_t tid = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  uint64_t done = 0;
  if constexpr (VEC) {
    const uint64_t n4 = n / 4;
    for (uint64_t i = tid; i < n4; i += stride) {
      float a[4], b[4] = {0, 0, 0, 0}, c[4] = {0, 0, 0, 0}, o[4], p[4];
      ld4<D>(in0 + 4 * i, a);
      if (NIN >= 2) ld4<D>(in1 + 4 * i, b);
      if (NIN >= 3) ld4<D>(in2 + 4 * i, c);
#pragma unroll
      for (int k = 0; k < 4; k++) elem<KIND, ACT>(a[k], b[k], c[k], o[k], p[k]);
      st4<D>(out0 + 4 * i, o);
      if (KIND == K_SWIGLU_BWD) st4<D>(out1 + 4 * i, p);
    }
    done = n4 * 4;
  }
  for (uint64_t i = done + tid; i < n; i += stride) {
    float o = 0.0f, p = 0.0f;
    const float a = D::load(in0[i]);
    const float b = NIN >= 2 ? D::load(in1[i]) : 0.0f;
    const float c = NIN >= 3 ? D::load(in2[i]) : 0.0f;
    elem<KIND, ACT>(a, b, c, o, p);
    out0[i] = D::store(o);
    if (KIND == K_SWIGLU_BWD) out1[i] = D::store(p);
  }
}

namespace {

struct act_launch {
  mx_cuda_dev *d;
  int kind, act;
  const void *in0, *in1, *in2;
  void *out0, *out1;
  uint64_t n;
  mx_err *err;

  bool vec_ok(unsigned bytes) const {
    const void *ps[5] = {in0, in1, in2, out0, out1};
    for (int i = 0; i < 5; i++)
      if (ps[i] && ((uintptr_t)ps[i] % bytes) != 0) return false;
    return n >= 4;
  }

  template <class D, int KIND, int ACT>
  int go() {
    typedef typename D::T T;
    const bool vec = vec_ok(sizeof(T) * 4);
    const unsigned grid = mx_cuda_grid(d, vec ? n / 4 : n);
    if (vec)
      act_kernel<D, KIND, ACT, true><<<grid, MX_BLOCK, 0, d->stream>>>(
          (const T *)in0, (const T *)in1, (const T *)in2, (T *)out0, (T *)out1, n);
    else
      act_kernel<D, KIND, ACT, false><<<grid, MX_BLOCK, 0, d->stream>>>(
          (const T *)in0, (const T *)in1, (const T *)in2, (T *)out0, (T *)out1, n);
    MX_CUDA_LAUNCHED(d, err, "act_kernel");
    return MX_OK;
  }

  template <class D, int KIND>
  int by_act() {
    switch (act) {
      case MX_ACT_SILU: return go<D, KIND, MX_ACT_SILU>();
      case MX_ACT_GELU_TANH: return go<D, KIND, MX_ACT_GELU_TANH>();
      case MX_ACT_SOFTPLUS: return go<D, KIND, MX_ACT_SOFTPLUS>();
      default: return go<D, KIND, MX_ACT_SIGMOID>();
    }
  }

  template <class D>
  int run() {
    switch (kind) {
      case K_FWD: return by_act<D, K_FWD>();
      case K_BWD: return by_act<D, K_BWD>();
      case K_SWIGLU: return go<D, K_SWIGLU, MX_ACT_SILU>();
      default: return go<D, K_SWIGLU_BWD, MX_ACT_SILU>();
    }
  }
};

int act_enqueue(int dev, int dtype, act_launch &fn, const char *op, mx_err *err) {
  if (dtype != MX_F32 && dtype != MX_BF16)
    return mx_cuda_fail(err, MX_E_ARG, "%s: dtype must be f32 or bf16, got %d", op, dtype);
  if ((fn.kind == K_FWD || fn.kind == K_BWD) &&
      (fn.act < MX_ACT_SILU || fn.act > MX_ACT_SIGMOID))
    return mx_cuda_fail(err, MX_E_ARG, "%s: unknown activation %d", op, fn.act);
  mx_cuda_dev *d = NULL;
  int rc = mx_cuda_open(dev, err, &d);
  if (rc != MX_OK) return rc;
  if (fn.n == 0) return MX_OK;
  if (!fn.in0 || !fn.out0 || (fn.kind != K_FWD && !fn.in1) ||
      (fn.kind == K_SWIGLU_BWD && (!fn.in2 || !fn.out1)))
    return mx_cuda_fail(err, MX_E_ARG, "%s: NULL pointer", op);
  fn.d = d;
  fn.err = err;
  pthread_mutex_lock(&d->mu);
  rc = dtype == MX_F32 ? fn.run<mx_t_f32>() : fn.run<mx_t_bf16>();
  mx_cuda_unlock(d);
  return rc;
}

} // namespace

int mx_cuda_act_forward(int dev, int act, int dtype, const void *x, void *y, size_t n,
                        mx_err *err) {
  act_launch fn = {NULL, K_FWD, act, x, NULL, NULL, y, NULL, n, err};
  return act_enqueue(dev, dtype, fn, "act_forward", err);
}

int mx_cuda_act_backward(int dev, int act, int dtype, const void *x, const void *dy, void *dx,
                         size_t n, mx_err *err) {
  act_launch fn = {NULL, K_BWD, act, x, dy, NULL, dx, NULL, n, err};
  return act_enqueue(dev, dtype, fn, "act_backward", err);
}

int mx_cuda_swiglu_forward(int dev, int dtype, const void *a, const void *b, void *out, size_t n,
                           mx_err *err) {
  act_launch fn = {NULL, K_SWIGLU, MX_ACT_SILU, a, b, NULL, out, NULL, n, err};
  return act_enqueue(dev, dtype, fn, "swiglu_forward", err);
}

int mx_cuda_swiglu_backward(int dev, int dtype, const void *a, const void *b, const void *dout,
                            void *da, void *db, size_t n, mx_err *err) {
  act_launch fn = {NULL, K_SWIGLU_BWD, MX_ACT_SILU, a, b, dout, da, db, n, err};
  return act_enqueue(dev, dtype, fn, "swiglu_backward", err);
}

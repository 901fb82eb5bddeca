/*
 * infer_cluster.cu: the cluster kernel of fused inference: one time step
 * (len 1) of a whole Mambex.Model for ONE row (an agent acting frame by
 * frame), run by one thread-block cluster of cs blocks (16 when the device
 * can hold such a cluster: one block per SM).
 *
 * Why a third kernel: the step kernel (infer_step.cu) exchanges its partial
 * sums through L2 behind grid barriers (~1 us each, five for two layers)
 * and copies every weight slice into shared memory with cp.async, which
 * costs several us of issue per layer. Here the blocks of one cluster push
 * their partial sums straight into each other's shared memory and meet at
 * the hardware cluster barrier, and the big weights travel into registers
 * one phase before they are used:
 *
 *   block g owns channels [g C, (g + 1) C) of d_inner in every layer, the
 *   features [g fpg, ...) of the input and the outputs [g cpo, ...) of the
 *   head.
 *
 *   in     partial of x . in_w over own features -> recv_s[g] of every block
 *   per layer:
 *   A      s (+)= sum_g recv_s[g] (same order in every block: all hold the
 *          same s); xi | z = rmsnorm(s) . in_w[:, own channels]; the conv
 *          and its state; partial of xc . x_proj_w -> recv_x[g] everywhere
 *   B      dbc = sum_g recv_x[g]; delta; the scan and its state; the gate;
 *          partial of y . out_w over own channels -> recv_s[g] everywhere
 *   head   s += sum_g recv_s[g]; out = rmsnorm(s) . head_w[:, own] + head_b
 *
 * Weights: in_proj's and out_proj's slices (the big ones) are loaded into
 * registers (coalesced rows, one phase ahead: in_proj of layer l + 1 during
 * layer l, out_proj of layer l at the start of layer l); the small ones
 * (norm, conv, x_proj, dt_proj, A, D) go into one of two shared-memory
 * slots by cp.async, one layer ahead.
 *
 * Invariants:
 *   - The grid is exactly one cluster (blockIdx.x is the rank in it), so
 *     all blocks are co-resident. No block writes another's shared memory
 *     before every block has arrived at the first cluster barrier (the
 *     arrive is the kernel's first act, the wait comes before the first
 *     push), and none writes after the last barrier before the head, so no
 *     block exits while another may still write into it.
 *   - recv_s and recv_x are each written (pushed) between two consecutive
 *     cluster barriers and read only after the second, and every block has
 *     finished reading them before it arrives at the barrier that lets the
 *     next pushes start (the x barrier for recv_s, the s barrier for
 *     recv_x): one buffer of each suffices.
 *   - Sums over blocks run in rank order, slice sums in slice order: every
 *     block computes the same s, and reruns are bit-identical.
 *   - Block g alone reads and writes the conv and ssm states of its
 *     channels, each read before it is written: in place is safe.
 *   - A weight slot is refilled (layer l + 1's copies, issued in layer l's
 *     phase A) only after the cluster barriers that follow its last reads
 *     (layer l - 1's phase B); each thread waits for its copies before it
 *     arrives at the next cluster barrier, so after that barrier the slot is
 *     complete for every thread.
 */
#include <stdlib.h>
#include <string.h>

#include "infer_common.cuh"

#define IC_THREADS 512 /* threads of a block */
#define IC_PW_IN 32    /* in_proj weights a thread holds (rows of its slice) */
#define IC_PW 16       /* the same for the input projection, out_proj, the head */
#define IC_SMAX 16     /* slices of a product, at most */
#define IC_PAIRS 2     /* scan (channel, state) pairs a thread takes, at most */
#define IC_SIZES 5     /* cluster sizes tried: 16, 8, 4, 2, 1 */

/* ---------------------------------------------------------------- trace */

/* Built with -DMX_INFER_TRACE (bench/gpu/infer_probe.sh only): thread 0 of
 * every block stamps the SM clock at each phase edge into
 * g_ctrace[block][event]; mx_infer_cluster_trace copies them out. */
#ifdef MX_INFER_TRACE
#define IC_TRACE_EVENTS 64
static __device__ long long g_ctrace[16][IC_TRACE_EVENTS];
#define TRACE(ev)                                                         \
  do {                                                                    \
    if (threadIdx.x == 0 && (ev) < IC_TRACE_EVENTS && blockIdx.x < 16)    \
      g_ctrace[blockIdx.x][(ev)] = clock64();                             \
  } while (0)
extern "C" __attribute__((visibility("default"))) int mx_infer_cluster_trace(long long *host, int blocks) {
  return cudaMemcpyFromSymbol(host, g_ctrace, sizeof(long long) * IC_TRACE_EVENTS * blocks) != cudaSuccess;
}
#else
#define TRACE(ev) ((void)0)
#endif

/* -------------------------------------------------------------- cluster */

/* The first arrive: no ordering needed, only "this block is running". */
static __device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
}

static __device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

/* Every thread of every block: writes before (pushes included) are seen
 * by reads after. */
static __device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
  cluster_wait();
}

/* The address of `local` (this block's shared memory) in block `rank`. */
static __device__ __forceinline__ unsigned cluster_addr(const float *local, int rank) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(local);
  unsigned r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(a), "r"(rank));
  return r;
}

static __device__ __forceinline__ void st_cluster(unsigned addr, float v) {
  asm volatile("st.shared::cluster.f32 [%0], %1;\n" ::"r"(addr), "f"(v) : "memory");
}

static __device__ __forceinline__ void st_cluster4(unsigned addr, float4 v) {
  asm volatile("st.shared::cluster.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "f"(v.x), "f"(v.y),
               "f"(v.z), "f"(v.w)
               : "memory");
}

/* ------------------------------------------------------------- cp.async */

static __device__ __forceinline__ void cp4(float *dst, const float *src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"((unsigned)__cvta_generic_to_shared(dst)),
               "l"(src)
               : "memory");
}

static __device__ __forceinline__ void cp_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

/* Layer ly's small weights for block g into `slot`: one loop over the
 * pieces laid end to end (one copy of the code, no calls: a call here would
 * spill the weights the registers hold). */
static __device__ __forceinline__ void stage_small(const if_params &p, const if_layer *ly, int g, float *slot) {
  const ic_layout &L = p.cl;
  const int C = p.cpb, c0 = g * C, NX = p.RK + 2 * p.N, DM = p.DM;
  const int e0 = DM, e1 = e0 + C * p.W, e2 = e1 + C, e3 = e2 + C * NX, e4 = e3 + p.RK * C, e5 = e4 + C,
            e6 = e5 + C * p.N, e7 = e6 + C;
  for (int i = threadIdx.x; i < e7; i += IC_THREADS) {
    float *dst;
    const float *src;
    if (i < e0) dst = slot + L.norm_w + i, src = ly->norm_w + i;
    else if (i < e1) dst = slot + L.conv_w + (i - e0), src = ly->conv_w + (size_t)c0 * p.W + (i - e0);
    else if (i < e2) dst = slot + L.conv_b + (i - e1), src = ly->conv_b + c0 + (i - e1);
    else if (i < e3) dst = slot + L.x_w + (i - e2), src = ly->x_proj_w + (size_t)c0 * NX + (i - e2); /* [c][j] */
    else if (i < e4) {
      const int k = (i - e3) / C, c = (i - e3) - k * C; /* [k][c] */
      dst = slot + L.dt_w + (i - e3), src = ly->dt_w + (size_t)k * p.DI + c0 + c;
    } else if (i < e5) dst = slot + L.dt_b + (i - e4), src = ly->dt_b + c0 + (i - e4);
    else if (i < e6) dst = slot + L.a_log + (i - e5), src = ly->a_log + (size_t)c0 * p.N + (i - e5);
    else dst = slot + L.d + (i - e6), src = ly->d + c0 + (i - e6);
    cp4(dst, src);
  }
}

/* ------------------------------------------------------------- products */

/* The thread's weights of a product (see ic_geo): rows [s rps, s rps + PW)
 * of column j, row r at src0[r ld + j] for j < split, else at
 * src1[r ld + j - split]; zeros past the slice, past nrows, past vcols and
 * off the slices. Every load runs (at a clamped address inside the matrix,
 * src0[0] for threads off the product) and zeros are selected: no branches,
 * so the unrolled loads stay one straight run of code. */
template <int PW>
static __device__ __forceinline__ void panel_load(float (&w)[PW], const ic_geo q, const float *src0,
                                                  const float *src1, int split, int ld, int nrows,
                                                  int vcols) {
  const int t = threadIdx.x, s = t / q.ncols, j = t - s * q.ncols, r0 = s * q.rps;
  const int on = s < q.S && j < vcols;
  /* rows the thread loads: n; the others read row 0 of its column (or src0[0]) */
  int n = on ? min(q.rps, nrows - r0) : 0;
  const float *base = n <= 0 ? src0 : (j < split ? src0 + j : src1 + (j - split)) + (size_t)r0 * ld;
#pragma unroll
  for (int i = 0; i < PW; i++) {
    const float v = __ldg(base + (i < n ? i * ld : 0));
    w[i] = i < n ? v : 0.0f;
  }
}

/* red[s][j] = sum over the thread's rows of v[r] w[r]; v holds S rps + PW
 * entries, zeros past the rows (w is zero past the slice). */
template <int PW>
static __device__ __forceinline__ void panel_apply(const float (&w)[PW], const ic_geo q, const float *v,
                                                   float *red) {
  const int t = threadIdx.x, s = t / q.ncols, j = t - s * q.ncols;
  if (s >= q.S) return;
  const float *vr = v + s * q.rps;
  float acc = 0.0f;
#pragma unroll
  for (int i = 0; i < PW; i++) acc += vr[i] * w[i];
  red[s * q.ncols + j] = acc;
}

/* Column j's total over the slices, in slice order (after a barrier). */
static __device__ __forceinline__ float panel_total(const ic_geo q, const float *red, int j) {
  float a = 0.0f;
#pragma unroll 2
  for (int s = 0; s < q.S; s++) a += red[s * q.ncols + j];
  return a;
}

/* The DM column totals of a product, pushed into `dst` (this block's row
 * of recv_s) in every block of the cluster. */
static __device__ void push_s(const if_params &p, const ic_geo q, const float *red, float *dst) {
  const int cs = p.cl.cs, DM = p.DM;
  if ((DM & 3) == 0) {
    for (int e = threadIdx.x; e < DM / 4; e += IC_THREADS) {
      float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 2
      for (int s = 0; s < q.S; s++) { /* panel_total of four columns */
        const float4 a = *(const float4 *)(red + s * q.ncols + 4 * e);
        v.x += a.x;
        v.y += a.y;
        v.z += a.z;
        v.w += a.w;
      }
      for (int r = 0; r < cs; r++) st_cluster4(cluster_addr(dst + 4 * e, r), v);
    }
  } else {
    for (int e = threadIdx.x; e < DM; e += IC_THREADS) {
      const float v = panel_total(q, red, e);
      for (int r = 0; r < cs; r++) st_cluster(cluster_addr(dst + e, r), v);
    }
  }
}

static __device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/* s (+)= the pushed partials (rank order; first: onto `bias`); sn = s * nw;
 * returns rsqrt(mean(s^2) + eps) to every thread. Ends with a barrier. */
static __device__ float gather_norm(const if_params &p, float *sm, float bias, float nw, int first) {
  const ic_layout &L = p.cl;
  const int tid = threadIdx.x, DM = p.DM, cs = L.cs;
  float sq = 0.0f;
  if (tid < DM) {
    float sum = 0.0f;
    for (int r = 0; r < cs; r++) sum += sm[L.recv_s + r * DM + tid];
    const float v = (first ? bias : sm[L.s + tid]) + sum;
    sm[L.s + tid] = v;
    sm[L.sn + tid] = v * nw;
    sq = v * v;
  }
  sq = warp_sum(sq);
  if ((tid & 31) == 0) sm[L.wsum + (tid >> 5)] = sq;
  __syncthreads();
  float t = 0.0f;
  for (int w = 0; w < IC_THREADS / 32; w++) t += sm[L.wsum + w];
  return rsqrtf(t / (float)DM + p.eps);
}

/* ---------------------------------------------------------------- kernel */

static __global__ void __launch_bounds__(IC_THREADS, 1) infer_cluster_kernel(if_params p) {
  extern __shared__ __align__(16) float sm[];
  const ic_layout &L = p.cl;
  const int tid = threadIdx.x, g = blockIdx.x, cs = L.cs;
  const int C = p.cpb, c0 = g * C, DM = p.DM, DI = p.DI, N = p.N, RK = p.RK, NX = RK + 2 * N;
  const int W1 = p.W - 1, lp = p.lp, f0 = g * p.fpg, o0 = g * p.cpo;
  const int vf = p.F - f0 < p.fpg ? (p.F - f0 > 0 ? p.F - f0 : 0) : p.fpg;
  const int vo = p.O - o0 < p.cpo ? (p.O - o0 > 0 ? p.O - o0 : 0) : p.cpo;
  float *slot0 = sm, *slot1 = sm + L.slot, *red = sm + L.red;
  TRACE(0);
  cluster_arrive_relaxed(); /* this block runs: the others may push once all have */

  /* the frame slice and the reset flag first (in plans: mapped host memory) */
  for (int i = tid; i < L.g_inp.S * L.g_inp.rps + IC_PW; i += IC_THREADS)
    sm[L.xs + i] = i < vf ? __ldcg(p.x + f0 + i) : 0.0f;
  const int rst = p.reset ? p.reset[0] != 0 : 0;
  const float in_b = tid < DM ? __ldg(p.in_b + tid) : 0.0f;
  const float norm_f = tid < DM ? __ldg(p.norm_f_w + tid) : 0.0f;
  const float head_b = tid < vo ? __ldg(p.head_b + o0 + tid) : 0.0f;
  /* the activations past their rows read as zeros in the products */
  for (int i = L.s + tid; i < L.red; i += IC_THREADS)
    if (i < L.xs || i >= L.xs + L.g_inp.S * L.g_inp.rps + IC_PW) sm[i] = 0.0f;

  float wi[IC_PW], w_in[IC_PW_IN], w_out[IC_PW], h[IC_PAIRS];
  TRACE(32);
  panel_load(wi, L.g_inp, p.in_w + (size_t)(vf > 0 ? f0 : 0) * DM, NULL, DM, DM, vf, DM);
  TRACE(33);
  stage_small(p, &p.layer[0], g, slot0);
  TRACE(34);
  panel_load(w_in, L.g_in, p.layer[0].in_x_w + c0, p.layer[0].in_z_w + c0, C, DI, DM, 2 * C);
  TRACE(35);
  __syncthreads();
  TRACE(36);
  panel_apply(wi, L.g_inp, sm + L.xs, red);
  __syncthreads();
  TRACE(1);
  cluster_wait(); /* every block runs */
  push_s(p, L.g_inp, red, sm + L.recv_s + g * DM);
  cp_wait_all(); /* layer 0's slot, before the barrier publishes it */
  cluster_sync();
  TRACE(2);

  for (int l = 0; l < p.NL; l++) {
    const if_layer *ly = &p.layer[l];
    const float *slot = (l & 1) ? slot1 : slot0;
    float *next = (l & 1) ? slot0 : slot1;
    /* phase A. First what phase B and the conv need from memory. */
    panel_load(w_out, L.g_out, ly->out_w + (size_t)c0 * DM, NULL, DM, DM, C, DM);
    if (l < 2) TRACE(40 + 8 * l);
#pragma unroll
    for (int q = 0; q < IC_PAIRS; q++) {
      const int t = tid + q * IC_THREADS, c = t / lp, n = t - c * lp;
      h[q] = (c < C && n < N && ly->ssm_in) ? __ldcg(ly->ssm_in + (size_t)(c0 + c) * N + n) : 0.0f;
    }
    float cst[IF_MAX_W - 1];
#pragma unroll
    for (int i = 0; i < IF_MAX_W - 1; i++)
      cst[i] = (tid < C && i < W1 && ly->conv_in) ? __ldcg(ly->conv_in + (size_t)(c0 + tid) * W1 + i) : 0.0f;

    if (l < 2) TRACE(41 + 8 * l);
    const float rstd = gather_norm(p, sm, in_b, tid < DM ? slot[L.norm_w + tid] : 0.0f, l == 0);
    TRACE(3 + 6 * l);

    /* xi | z for own channels; the conv, its new state */
    panel_apply(w_in, L.g_in, sm + L.sn, red);
    __syncthreads();
    if (tid < 2 * C) {
      const float v = rstd * panel_total(L.g_in, red, tid);
      if (tid < C) {
        const float *cw = slot + L.conv_w + tid * p.W;
        float acc = slot[L.conv_b + tid];
#pragma unroll
        for (int i = 0; i < IF_MAX_W - 1; i++)
          if (i < W1) acc += cw[i] * (rst ? 0.0f : cst[i]);
        acc += cw[W1] * v;
        sm[L.xc + tid] = silu_f(acc);
        if (ly->conv_out && W1 > 0) {
          float *dst = ly->conv_out + (size_t)(c0 + tid) * W1;
#pragma unroll
          for (int i = 0; i < IF_MAX_W - 2; i++)
            if (i + 1 < W1) dst[i] = rst ? 0.0f : cst[i + 1];
          dst[W1 - 1] = v;
        }
      } else {
        sm[L.z + tid - C] = v;
      }
    }
    __syncthreads();
    TRACE(4 + 6 * l);

    /* layer l + 1's weights start moving */
    if (l + 1 < p.NL) {
      const if_layer *nx = &p.layer[l + 1];
      panel_load(w_in, L.g_in, nx->in_x_w + c0, nx->in_z_w + c0, C, DI, DM, 2 * C);
      if (l < 2) TRACE(42 + 8 * l);
      stage_small(p, nx, g, next);
    }
    if (l < 2) TRACE(43 + 8 * l);

    /* partial x_proj over own channels -> recv_x[g] of every block */
    {
      const ic_geo q = L.g_x;
      const int s = tid / q.ncols, j = tid - s * q.ncols;
      if (s < q.S) {
        const float *xw = slot + L.x_w + j, *xc = sm + L.xc;
        float acc = 0.0f;
        for (int i = 0, r = s * q.rps; i < q.rps && r < C; i++, r++) acc += xc[r] * xw[r * NX];
        red[s * q.ncols + j] = acc;
      }
      __syncthreads();
      if (l < 2) TRACE(44 + 8 * l);
      for (int j2 = tid; j2 < NX; j2 += IC_THREADS) {
        const float v = panel_total(q, red, j2);
        for (int r = 0; r < cs; r++) st_cluster(cluster_addr(sm + L.recv_x + g * NX + j2, r), v);
      }
    }
    TRACE(5 + 6 * l);
    cluster_sync();
    TRACE(6 + 6 * l);

    /* phase B: dbc = sum of the partials */
    for (int j = tid; j < NX; j += IC_THREADS) {
      float a = 0.0f;
      for (int r = 0; r < cs; r++) a += sm[L.recv_x + r * NX + j];
      sm[L.dbc + j] = a;
    }
    __syncthreads();
    if (l < 2) TRACE(45 + 8 * l);
    /* delta (each of a channel's lanes computes it), the scan, the gate */
    {
      const float *dbc = sm + L.dbc;
#pragma unroll
      for (int q = 0; q < IC_PAIRS; q++) {
        if (q * IC_THREADS >= C * lp) break; /* uniform */
        const int t = tid + q * IC_THREADS, c = t / lp, n = t - c * lp;
        const int live = c < C && n < N, cc = c < C ? c : C - 1, nn = n < N ? n : N - 1;
        float dt = slot[L.dt_b + cc];
        for (int k = 0; k < RK; k++) dt += dbc[k] * slot[L.dt_w + k * C + cc];
        dt = softplus_f(dt);
        const float u = sm[L.xc + cc];
        const float a = -expf(slot[L.a_log + cc * N + nn]);
        const float hq = live ? (rst ? 0.0f : h[q]) * expf(dt * a) + dt * dbc[RK + nn] * u : 0.0f;
        float part = live ? dbc[RK + N + nn] * hq : 0.0f;
        for (int o = lp >> 1; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o, lp);
        if (n == 0 && c < C) sm[L.y + c] = (part + slot[L.d + c] * u) * silu_f(sm[L.z + c]);
        if (live && ly->ssm_out) ly->ssm_out[(size_t)(c0 + c) * N + n] = hq;
      }
    }
    __syncthreads();
    TRACE(7 + 6 * l);

    /* partial out_proj over own channels -> recv_s[g] of every block */
    panel_apply(w_out, L.g_out, sm + L.y, red);
    __syncthreads();
    if (l < 2) TRACE(46 + 8 * l);
    if (l + 1 == p.NL) /* the head's slice, into the registers out_proj freed */
      panel_load(w_out, L.g_head, p.head_w + (vo > 0 ? o0 : 0), NULL, p.cpo, p.O, DM, vo);
    push_s(p, L.g_out, red, sm + L.recv_s + g * DM);
    if (l < 2) TRACE(47 + 8 * l);
    cp_wait_all(); /* layer l + 1's slot */
    cluster_sync();
    TRACE(8 + 6 * l);
  }

  /* the head: own outputs of rmsnorm(s) . head_w + head_b */
  const float rstd = gather_norm(p, sm, 0.0f, norm_f, 0);
  panel_apply(w_out, L.g_head, sm + L.sn, red);
  __syncthreads();
  if (tid < vo) p.out[o0 + tid] = rstd * panel_total(L.g_head, red, tid) + head_b;
  TRACE(3 + 6 * p.NL);
}

/* ------------------------------------------------------------------ host */

/* per device and cluster size: the shared-memory attribute set so far, and
 * the last residency answer with the size it was for */
static int g_cl_smem[MX_MAX_CUDA_DEVICES];
static size_t g_cl_occ_smem[MX_MAX_CUDA_DEVICES][IC_SIZES];
static int g_cl_occ[MX_MAX_CUDA_DEVICES][IC_SIZES];

static int take(int *o, int n) {
  const int at = *o;
  *o += (n + 3) & ~3;
  return at;
}

/* A product of ncols columns over nrows rows; non-zero when a thread's
 * rows exceed pw (its register array) or the columns exceed the block. */
static int geo(ic_geo *q, int ncols, int nrows, int pw) {
  if (ncols < 1 || ncols > IC_THREADS) return 1;
  int S = IC_THREADS / ncols;
  if (S > IC_SMAX) S = IC_SMAX;
  q->ncols = ncols;
  q->S = S;
  q->rps = (nrows + S - 1) / S;
  return q->rps > pw;
}

static int imax(int a, int b) { return a > b ? a : b; }

/* p's cluster fields for a cluster of cs blocks; 0 when the sizes allow it. */
static int layout_for(if_params *p, int cs) {
  if (p->DI % cs) return 1;
  const int C = p->DI / cs, NX = p->RK + 2 * p->N, DM = p->DM;
  if (DM > IC_THREADS || NX > IC_THREADS || C * p->lp > IC_PAIRS * IC_THREADS) return 1;
  p->cpb = C;
  p->groups = cs;
  p->fpg = (p->F + cs - 1) / cs;
  p->cpo = (p->O + cs - 1) / cs;
  ic_layout *L = &p->cl;
  memset(L, 0, sizeof *L);
  L->cs = cs;
  if (geo(&L->g_inp, DM, p->fpg, IC_PW) || geo(&L->g_in, 2 * C, DM, IC_PW_IN) || geo(&L->g_x, NX, C, 1 << 20) ||
      geo(&L->g_out, DM, C, IC_PW) || geo(&L->g_head, p->cpo, DM, IC_PW))
    return 1;
  int o = 0;
  L->norm_w = take(&o, DM);
  L->conv_w = take(&o, C * p->W);
  L->conv_b = take(&o, C);
  L->x_w = take(&o, C * NX);
  L->dt_w = take(&o, p->RK * C);
  L->dt_b = take(&o, C);
  L->a_log = take(&o, C * p->N);
  L->d = take(&o, C);
  L->slot = o;
  o = 2 * L->slot;
  L->recv_s = take(&o, cs * DM);
  L->recv_x = take(&o, cs * NX);
  /* from s on: zeroed at the start (the products' v past their rows) */
  L->s = take(&o, DM);
  /* the products' v: S rps + PW entries (panel_apply reads a whole PW) */
  L->sn = take(&o, imax(DM, imax(L->g_in.S * L->g_in.rps + IC_PW_IN, L->g_head.S * L->g_head.rps + IC_PW)));
  L->xs = take(&o, L->g_inp.S * L->g_inp.rps + IC_PW);
  L->xc = take(&o, imax(C, L->g_x.S * L->g_x.rps));
  L->z = take(&o, C);
  L->y = take(&o, imax(C, L->g_out.S * L->g_out.rps + IC_PW));
  L->dbc = take(&o, NX);
  L->red = take(&o, IC_THREADS);
  L->wsum = take(&o, IC_THREADS / 32);
  L->total = o;
  return 0;
}

static void config_for(cudaLaunchConfig_t *cfg, cudaLaunchAttribute *attr, int cs, size_t smem,
                       cudaStream_t stream) {
  *cfg = cudaLaunchConfig_t{};
  cfg->gridDim = dim3((unsigned)cs);
  cfg->blockDim = dim3(IC_THREADS);
  cfg->dynamicSmemBytes = smem;
  cfg->stream = stream;
  *attr = cudaLaunchAttribute{};
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = (unsigned)cs;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cfg->attrs = attr;
  cfg->numAttrs = 1;
}

/* Whether one cluster of cs blocks with `smem` bytes each can be resident
 * (the answer is kept per size). A refusal by the driver (an older GPU, a
 * size it does not allow) is a "no", not an error. */
static int cluster_fits(mx_cuda_dev *d, int k, int cs, size_t smem) {
  const int i = d->index;
  if (g_cl_smem[i] < (int)smem) {
    if (cudaFuncSetAttribute(infer_cluster_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) !=
            cudaSuccess ||
        cudaFuncSetAttribute(infer_cluster_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) !=
            cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    g_cl_smem[i] = (int)smem;
  }
  if (g_cl_occ_smem[i][k] != smem) {
    cudaLaunchConfig_t cfg;
    cudaLaunchAttribute attr;
    config_for(&cfg, &attr, cs, smem, NULL);
    int n = 0;
    if (cudaOccupancyMaxActiveClusters(&n, infer_cluster_kernel, &cfg) != cudaSuccess) {
      cudaGetLastError();
      n = 0;
    }
    g_cl_occ_smem[i][k] = smem;
    g_cl_occ[i][k] = n;
  }
  return g_cl_occ[i][k] >= 1;
}

/* The largest cluster (16, 8, ... blocks) whose layout applies and fits. */
int infer_cluster_configure(mx_cuda_dev *d, if_params *p) {
  static const int sizes[IC_SIZES] = {16, 8, 4, 2, 1};
  if (p->B != 1 || p->L != 1 || d->cc_major < 9) return 0;
  for (int k = 0; k < IC_SIZES; k++) {
    if (layout_for(p, sizes[k])) continue;
    const size_t smem = (size_t)p->cl.total * sizeof(float);
    if (smem <= (size_t)d->smem_optin && cluster_fits(d, k, sizes[k], smem)) return 1;
  }
  return 0;
}

int infer_cluster_launch(mx_cuda_dev *d, const if_params *p, cudaStream_t stream, mx_err *err) {
  cudaLaunchConfig_t cfg;
  cudaLaunchAttribute attr;
  config_for(&cfg, &attr, p->cl.cs, (size_t)p->cl.total * sizeof(float), stream);
  return MX_CUDA_CALL(d, err, cudaLaunchKernelEx(&cfg, infer_cluster_kernel, *p));
}

/*
 * gemm_cpu_impl.h: the body of the CPU GEMM for one (real type, vector
 * width) pair. gemm_cpu.c includes it once per variant with these macros:
 *
 *   REAL  float or double: the type of every operand and of all math
 *   VB    bytes of one vector register (16 SSE, 32 AVX2, 64 AVX-512)
 *   MR    rows of the register tile (a multiple of nothing in particular)
 *   SFX   suffix of the generated names (f32_avx2, f64_sse, ...)
 *
 * and, for the FMA variants, inside `#pragma GCC target(...)` plus
 * `optimize("fp-contract=fast")`, so that `acc += a * b` below becomes one
 * fused multiply-add. The register tile is MR x NR with NR = 2 vectors: MR
 * broadcasts of A and 2 vector loads of B feed 2 * MR independent
 * accumulators per k step (12 for MR = 6, 24 for MR = 12: enough to hide the
 * FMA latency, few enough to stay in registers).
 *
 * Packed layouts (gemm_cpu.c describes the blocking):
 *   B panel   Bp + k0 * Np + (j0 / NR) * kc * NR: kc rows of NR contiguous
 *             values, columns past n zero
 *   A block   ap + (i / MR) * kc * MR: kc columns of MR contiguous values,
 *             rows past the block zero
 * so the micro-kernel streams both with unit stride.
 */

#define GC_CAT2(a, b) a##_##b
#define GC_CAT(a, b) GC_CAT2(a, b)
#define FN(name) GC_CAT(name, SFX)

#define VL ((int)(VB / sizeof(REAL)))
#define NR (2 * VL)

typedef REAL FN(vec) __attribute__((vector_size(VB)));

/* ct (MR, NR) = sum over p < kc of ap[p, :] (outer) bp[p, :], p in order. */
static void FN(micro)(int64_t kc, const REAL *restrict ap, const REAL *restrict bp,
                      REAL *restrict ct) {
  typedef FN(vec) V;
  V acc[MR][2];
  for (int i = 0; i < MR; i++) {
    acc[i][0] = (V){0};
    acc[i][1] = (V){0};
  }
  for (int64_t p = 0; p < kc; p++) {
    const V b0 = *(const V *)(bp + p * NR);
    const V b1 = *(const V *)(bp + p * NR + VL);
    const REAL *a = ap + p * MR;
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++) {
      acc[i][0] += a[i] * b0; /* the scalar is broadcast */
      acc[i][1] += a[i] * b1;
    }
  }
  for (int i = 0; i < MR; i++) {
    *(V *)(ct + i * NR) = acc[i][0];
    *(V *)(ct + i * NR + VL) = acc[i][1];
  }
}

/* Pack rows [i0, i0 + mc) x columns [k0, k0 + kc) of op(A) into MR-row
 * slivers (rows past mc are zero). op(A)[i, k] is a[i * lda + k], or
 * a[k * lda + i] with trans_a. */
static void FN(pack_a)(const mx_gemm_args *g, int64_t i0, int64_t mc, int64_t k0, int64_t kc,
                       REAL *restrict ap) {
  const REAL *a = (const REAL *)g->a;
  const int64_t lda = g->lda;
  for (int64_t is = 0; is < mc; is += MR) {
    const int64_t rows = mc - is < MR ? mc - is : MR;
    REAL *dst = ap + is * kc;
    if (g->trans_a) {
      for (int64_t p = 0; p < kc; p++) {
        const REAL *src = a + (k0 + p) * lda + i0 + is;
        int r = 0;
        for (; r < rows; r++) dst[p * MR + r] = src[r];
        for (; r < MR; r++) dst[p * MR + r] = 0;
      }
    } else {
      for (int r = 0; r < MR; r++) {
        if (r < rows) {
          const REAL *src = a + (i0 + is + r) * lda + k0;
          for (int64_t p = 0; p < kc; p++) dst[p * MR + r] = src[p];
        } else {
          for (int64_t p = 0; p < kc; p++) dst[p * MR + r] = 0;
        }
      }
    }
  }
}

/* Pack NR-column panels [jp0, jp1) of op(B) for every k block. op(B)[k, j]
 * is b[k * ldb + j], or b[j * ldb + k] with trans_b. */
static void FN(pack_b)(const mx_gemm_args *g, int64_t jp0, int64_t jp1, int64_t kcb, int64_t np,
                       REAL *restrict bp) {
  const REAL *b = (const REAL *)g->b;
  const int64_t ldb = g->ldb, n = g->n, k = g->k;
  for (int64_t k0 = 0; k0 < k; k0 += kcb) {
    const int64_t kc = k - k0 < kcb ? k - k0 : kcb;
    for (int64_t jp = jp0; jp < jp1; jp++) {
      const int64_t j0 = jp * NR, cols = n - j0 < NR ? n - j0 : NR;
      REAL *dst = bp + k0 * np + j0 * kc;
      if (g->trans_b) {
        for (int c = 0; c < NR; c++) {
          if (c < cols) {
            const REAL *src = b + (j0 + c) * ldb + k0;
            for (int64_t p = 0; p < kc; p++) dst[p * NR + c] = src[p];
          } else {
            for (int64_t p = 0; p < kc; p++) dst[p * NR + c] = 0;
          }
        }
      } else {
        for (int64_t p = 0; p < kc; p++) {
          const REAL *src = b + (k0 + p) * ldb + j0;
          int c = 0;
          for (; c < cols; c++) dst[p * NR + c] = src[c];
          for (; c < NR; c++) dst[p * NR + c] = 0;
        }
      }
    }
  }
}

/* C tile (rows x cols at c) from the register tile ct:
 *   first k block: c = alpha * ct + beta * c + bias   (beta == 0: c not read)
 *   later blocks:  c = c + alpha * ct                                        */
static void FN(store)(const gemm_ctx *x, REAL *restrict c, const REAL *restrict ct, int rows,
                      int cols, int first, const REAL *restrict bias) {
  const int64_t ldc = x->g->ldc;
  const REAL alpha = (REAL)x->g->alpha, beta = (REAL)x->g->beta;
  if (!first) {
    for (int i = 0; i < rows; i++)
      for (int j = 0; j < cols; j++) c[i * ldc + j] = c[i * ldc + j] + alpha * ct[i * NR + j];
    return;
  }
  for (int i = 0; i < rows; i++) {
    REAL *ci = c + i * ldc;
    const REAL *ti = ct + i * NR;
    if (x->beta_zero) {
      if (bias)
        for (int j = 0; j < cols; j++) ci[j] = alpha * ti[j] + bias[j];
      else
        for (int j = 0; j < cols; j++) ci[j] = alpha * ti[j];
    } else {
      if (bias)
        for (int j = 0; j < cols; j++) ci[j] = (alpha * ti[j] + beta * ci[j]) + bias[j];
      else
        for (int j = 0; j < cols; j++) ci[j] = alpha * ti[j] + beta * ci[j];
    }
  }
}

/* One work item: the C block of rows [i0, i0 + MC) and NR-panels
 * [jp0, jp0 + NCP), over every k block in order. */
static void FN(item)(void *vctx, int64_t item, int worker) {
  const gemm_ctx *x = (const gemm_ctx *)vctx;
  const mx_gemm_args *g = x->g;
  const int64_t ib = item / x->jblocks, jb = item % x->jblocks;
  const int64_t i0 = ib * x->mc, mc = g->m - i0 < x->mc ? g->m - i0 : x->mc;
  const int64_t jp0 = jb * x->ncp;
  const int64_t jp1 = jp0 + x->ncp < x->npanels ? jp0 + x->ncp : x->npanels;
  REAL *ap = (REAL *)(x->ascratch + (size_t)worker * x->astride);
  REAL ct[MR * NR] __attribute__((aligned(64)));
  REAL *c = (REAL *)g->c;
  const REAL *bias = (const REAL *)g->bias;
  for (int64_t k0 = 0; k0 < g->k; k0 += x->kc) {
    const int64_t kc = g->k - k0 < x->kc ? g->k - k0 : x->kc;
    FN(pack_a)(g, i0, mc, k0, kc, ap);
    const REAL *bk = (const REAL *)x->bpack + k0 * x->np;
    for (int64_t jp = jp0; jp < jp1; jp++) {
      const int64_t j0 = jp * NR;
      const int cols = (int)(g->n - j0 < NR ? g->n - j0 : NR);
      const REAL *bpanel = bk + j0 * kc;
      for (int64_t is = 0; is < mc; is += MR) {
        const int rows = (int)(mc - is < MR ? mc - is : MR);
        FN(micro)(kc, ap + is * kc, bpanel, ct);
        FN(store)(x, c + (i0 + is) * g->ldc + j0, ct, rows, cols, k0 == 0,
                  bias ? bias + j0 : NULL);
      }
    }
  }
}

static void FN(pack_b_item)(void *vctx, int64_t item, int worker) {
  (void)worker;
  const gemm_ctx *x = (const gemm_ctx *)vctx;
  const int64_t jp0 = item * GEMM_PACK_PANELS;
  const int64_t jp1 = jp0 + GEMM_PACK_PANELS < x->npanels ? jp0 + GEMM_PACK_PANELS : x->npanels;
  FN(pack_b)(x->g, jp0, jp1, x->kc, x->np, (REAL *)x->bpack);
}

static const gemm_variant FN(variant) = {
    .mr = MR, .nr = NR, .elsize = sizeof(REAL), .item = FN(item), .pack_b = FN(pack_b_item)};

#undef VL
#undef NR
#undef FN
#undef GC_CAT
#undef GC_CAT2

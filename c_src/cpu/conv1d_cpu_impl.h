/*
 * conv1d_cpu_impl.h: the body of the CPU causal depthwise conv1d for one real
 * type. conv1d_cpu.c includes it once per type with these macros defined:
 *
 *   REAL        float or double: the type of every tensor and of all math
 *   SFX         the suffix of the generated names (f32, f64)
 *   CV_EXP(x)   exp in REAL
 *
 * See conv1d_cpu.c for the math, the work split and the determinism rules.
 * Every inner loop runs over the channels of one (b, t) row (contiguous),
 * so the compiler vectorises it; rows before t = 0 are read from a per-worker
 * copy of the initial state transposed to rows ("H", (W-1, C)), rows outside
 * [0, L) of the gradient buffer are zeros.
 */

#define CV_CAT2(a, b) a##_##b
#define CV_CAT(a, b) CV_CAT2(a, b)
#define FN(name) CV_CAT(name, SFX)

static inline REAL FN(sigmoid)(REAL p) { return (REAL)1 / ((REAL)1 + CV_EXP(-p)); }

/* H[k][c] = h0[b, c, k] (k < W-1), zeros without h0: the padded rows
 * t = k - (W-1) of sequence b. */
static void FN(gather_h0)(REAL *restrict H, const REAL *restrict h0, int64_t b, int64_t C,
                          int64_t W) {
  const int64_t K = W - 1;
  if (K == 0) return;
  if (!h0) {
    memset(H, 0, (size_t)(K * C) * sizeof(REAL));
    return;
  }
  const REAL *src = h0 + b * C * K;
  for (int64_t c = 0; c < C; c++)
    for (int64_t k = 0; k < K; k++) H[k * C + c] = src[c * K + k];
}

/* Row s (-(W-1) <= s < L) of the padded input of sequence b. */
static inline const REAL *FN(xpad_row)(const cv_ctx *cx, const REAL *H, int64_t b, int64_t s) {
  const int64_t C = cx->a->channels, W = cx->a->width;
  if (s >= 0) return (const REAL *)cx->a->x + (b * cx->a->len + s) * C;
  return H + (W - 1 + s) * C;
}

/* pre[c] = bias[c] + sum_j wT[j][c] xpad[t + j - (W-1)][c], j in order. */
static void FN(pre_row)(const cv_ctx *cx, const REAL *H, int64_t b, int64_t t,
                        REAL *restrict pre) {
  const int64_t C = cx->a->channels, W = cx->a->width;
  const REAL *bias = (const REAL *)cx->a->bias;
  const REAL *wT = (const REAL *)cx->wT;
  if (bias) memcpy(pre, bias, (size_t)C * sizeof(REAL));
  else memset(pre, 0, (size_t)C * sizeof(REAL));
  for (int64_t j = 0; j < W; j++) {
    const REAL *restrict xr = FN(xpad_row)(cx, H, b, t + j - (W - 1));
    const REAL *restrict wj = wT + j * C;
    for (int64_t c = 0; c < C; c++) pre[c] += wj[c] * xr[c];
  }
}

/* Forward work item: the steps [t0, t1) of sequence b (one unit). */
static void FN(fwd_item)(void *ctx, int64_t item, int worker) {
  const cv_ctx *cx = ctx;
  const mx_conv1d_args *a = cx->a;
  const int64_t L = a->len, C = a->channels, W = a->width, K = W - 1;
  const int64_t b = item / cx->nchunks, ch = item % cx->nchunks;
  const int64_t t0 = ch * cx->tchunk, t1 = t0 + cx->tchunk < L ? t0 + cx->tchunk : L;
  REAL *H = (REAL *)(cx->scratch + (size_t)worker * cx->scratch_stride);
  FN(gather_h0)(H, (const REAL *)a->h0, b, C, W);
  for (int64_t t = t0; t < t1; t++) {
    REAL *restrict o = (REAL *)cx->out + (b * L + t) * C;
    FN(pre_row)(cx, H, b, t, o);
    if (a->silu)
      for (int64_t c = 0; c < C; c++) o[c] = o[c] * FN(sigmoid)(o[c]);
  }
  /* The last unit of a sequence writes its final state: padded rows
   * L-(W-1) .. L-1. */
  if (ch == cx->nchunks - 1 && cx->h_last && K > 0) {
    REAL *hl = (REAL *)cx->h_last + b * C * K;
    for (int64_t k = 0; k < K; k++) {
      const REAL *r = FN(xpad_row)(cx, H, b, L - K + k);
      for (int64_t c = 0; c < C; c++) hl[c * K + k] = r[c];
    }
  }
}

/* Backward work item: the units [u_lo, u_hi) one after another, each in
 * sub-chunks of CV_SUB steps; the item's dweight/dbias partial sums (in
 * order of units, sub-chunks and steps) go to part[item]. */
static void FN(bwd_item)(void *ctx, int64_t item, int worker) {
  const cv_ctx *cx = ctx;
  const mx_conv1d_args *a = cx->a;
  const int64_t L = a->len, C = a->channels, W = a->width, K = W - 1;
  const int64_t units = a->batch * cx->nchunks;
  const int64_t u_lo = item * units / cx->items, u_hi = (item + 1) * units / cx->items;
  const REAL *wT = (const REAL *)cx->wT;
  const REAL *dhl = (const REAL *)cx->dh_last;
  char *base = cx->scratch + (size_t)worker * cx->scratch_stride;
  REAL *H = (REAL *)base;                   /* (W-1, C) */
  REAL *Gb = H + K * C;                     /* (CV_SUB + 2(W-1), C) */
  REAL *row = Gb + (CV_SUB + 2 * K) * C;    /* (C) */
  REAL *pw = (REAL *)cx->part + item * (W + 1) * C; /* (W, C) partial dweight */
  REAL *pb = pw + W * C;                            /* (C) partial dbias */
  memset(pw, 0, (size_t)((W + 1) * C) * sizeof(REAL));

  for (int64_t u = u_lo; u < u_hi; u++) {
    const int64_t b = u / cx->nchunks, ch = u % cx->nchunks;
    const int64_t t0 = ch * cx->tchunk, t1 = t0 + cx->tchunk < L ? t0 + cx->tchunk : L;
    FN(gather_h0)(H, (const REAL *)a->h0, b, C, W);
    for (int64_t s0 = t0; s0 < t1; s0 += CV_SUB) {
      const int64_t s1 = s0 + CV_SUB < t1 ? s0 + CV_SUB : t1;
      /* gradient rows at positions [p0, s1 + W-1): g = d_out * silu'(pre)
       * inside [0, L), zero outside */
      const int64_t ts = s0 == 0 ? -K : s0; /* first dxpad row (dh0 rows when < 0) */
      const int64_t p0 = ts, p1 = s1 + K;
      for (int64_t p = p0; p < p1; p++) {
        REAL *restrict g = Gb + (p - p0) * C;
        if (p < 0 || p >= L) {
          memset(g, 0, (size_t)C * sizeof(REAL));
          continue;
        }
        const REAL *restrict dout = (const REAL *)cx->d_out + (b * L + p) * C;
        if (a->silu) {
          FN(pre_row)(cx, H, b, p, g);
          for (int64_t c = 0; c < C; c++) {
            const REAL sg = FN(sigmoid)(g[c]);
            g[c] = dout[c] * (sg * ((REAL)1 + g[c] * ((REAL)1 - sg)));
          }
        } else {
          memcpy(g, dout, (size_t)C * sizeof(REAL));
        }
      }
      /* dxpad[t] = sum_j w[j] g[t + W-1 - j] (+ dh_last[t - L + W-1]) */
      for (int64_t t = ts; t < s1; t++) {
        memset(row, 0, (size_t)C * sizeof(REAL));
        for (int64_t j = 0; j < W; j++) {
          const REAL *restrict g = Gb + (t + K - j - p0) * C;
          const REAL *restrict wj = wT + j * C;
          for (int64_t c = 0; c < C; c++) row[c] += wj[c] * g[c];
        }
        if (dhl && t >= L - K) {
          const REAL *d = dhl + b * C * K + (t - L + K);
          for (int64_t c = 0; c < C; c++) row[c] += d[c * K];
        }
        if (t >= 0) {
          if (cx->dx) memcpy((REAL *)cx->dx + (b * L + t) * C, row, (size_t)C * sizeof(REAL));
        } else if (cx->dh0) {
          REAL *d = (REAL *)cx->dh0 + b * C * K + (t + K);
          if (cx->accumulate)
            for (int64_t c = 0; c < C; c++) d[c * K] = d[c * K] + row[c];
          else
            for (int64_t c = 0; c < C; c++) d[c * K] = row[c];
        }
      }
      /* partial parameter gradients over the steps [s0, s1) */
      for (int64_t t = s0; t < s1; t++) {
        const REAL *restrict g = Gb + (t - p0) * C;
        for (int64_t j = 0; j < W; j++) {
          const REAL *restrict xr = FN(xpad_row)(cx, H, b, t + j - K);
          REAL *restrict pj = pw + j * C;
          for (int64_t c = 0; c < C; c++) pj[c] += g[c] * xr[c];
        }
        for (int64_t c = 0; c < C; c++) pb[c] += g[c];
      }
    }
  }
}

/* Final parameter-gradient reduce for channels [64 i, 64 i + 64): the
 * items' partials summed in item order, then added to the outputs when
 * accumulating. */
static void FN(reduce_item)(void *ctx, int64_t item, int worker) {
  const cv_ctx *cx = ctx;
  const int64_t C = cx->a->channels, W = cx->a->width;
  const int64_t c0 = item * 64, c1 = c0 + 64 < C ? c0 + 64 : C;
  const REAL *part = (const REAL *)cx->part;
  (void)worker;
  const int64_t n = cx->items;
  REAL *dw = (REAL *)cx->dweight, *db = (REAL *)cx->dbias;
  REAL sum[64];
  for (int64_t j = 0; j <= W; j++) {
    if (j < W ? !dw : !db) continue;
    /* items in order, channels innermost (contiguous) */
    for (int64_t c = c0; c < c1; c++) sum[c - c0] = part[j * C + c];
    for (int64_t i = 1; i < n; i++) {
      const REAL *restrict pi = part + (i * (W + 1) + j) * C;
      for (int64_t c = c0; c < c1; c++) sum[c - c0] += pi[c];
    }
    for (int64_t c = c0; c < c1; c++) {
      REAL *dst = j < W ? dw + c * W + j : db + c;
      *dst = cx->accumulate ? *dst + sum[c - c0] : sum[c - c0];
    }
  }
}

#undef FN
#undef CV_CAT
#undef CV_CAT2

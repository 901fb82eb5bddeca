/*
 * scan_cpu_impl.h: the body of the CPU selective scan for one real type.
 * scan_cpu.c includes it once per type with these macros defined:
 *
 *   REAL            float or double: the type of every tensor and of all math
 *   SFX             the suffix of the generated names (f32, f64)
 *   SC_KSCALE       a constant the recurrence multiplies A by, once per block
 *   SC_EXPK(x)      exp(x / SC_KSCALE): a = SC_EXPK(dt (A SC_KSCALE)) = exp(dt A)
 *   SC_SOFTPLUS(x)  x > 20 ? x : log1p(exp(x))
 *   SC_SIGMOID(x)   1 / (1 + exp(-x))
 *
 * See scan_cpu.c for the math, the work split and the gradient conventions.
 * Channels are processed LANES at a time (a "block", never straddling a
 * group): every inner loop runs over the LANES channels of a block with a
 * compile-time trip count, so the compiler vectorises it; lanes past the end
 * of a group are padded with zeros, which keeps them at exactly zero through
 * the recurrence (A = 0, u = 0, d_out = 0) and never stored.
 */

#define SC_CAT2(a, b) a##_##b
#define SC_CAT(a, b) SC_CAT2(a, b)
#define FN(name) SC_CAT(name, SFX)

/* ---- lane helpers ------------------------------------------------------ */

/* dst[w] = src[w] for w < W, 0 for the padding lanes (src may be NULL). */
static inline void FN(load_lanes)(REAL *restrict dst, const REAL *restrict src, int W) {
  for (int w = 0; w < LANES; w++) dst[w] = (src && w < W) ? src[w] : (REAL)0;
}

/* A (B, D, N) state slab at channel d0 into the block layout [n][w]. */
static void FN(load_state)(REAL *restrict dst, const REAL *restrict src, int64_t N, int W) {
  memset(dst, 0, (size_t)N * LANES * sizeof(REAL));
  if (!src) return;
  for (int w = 0; w < W; w++)
    for (int64_t n = 0; n < N; n++) dst[n * LANES + w] = src[(int64_t)w * N + n];
}

static void FN(store_state)(REAL *restrict dst, const REAL *restrict src, int64_t N, int W) {
  for (int w = 0; w < W; w++)
    for (int64_t n = 0; n < N; n++) dst[(int64_t)w * N + n] = src[n * LANES + w];
}

/* Asks for the block's row of a (B, L, D) tensor SC_AHEAD steps away: rows
 * are D apart, a stride the hardware prefetcher does not follow in time. */
static inline void FN(prefetch_row)(const void *base, int64_t row, int write) {
  if (base) {
    if (write) __builtin_prefetch((const REAL *)base + row, 1);
    else __builtin_prefetch((const REAL *)base + row, 0);
  }
}

/* The same for `count` rows from `row`, `step` apart (step = +-D): the
 * first rows of a loop, before its own prefetches SC_AHEAD steps on start. */
static inline void FN(prefetch_rows)(const void *base, int64_t row, int64_t step, int64_t count,
                                     int write) {
  for (int64_t k = 0; k < count; k++) FN(prefetch_row)(base, row + k * step, write);
}

/* A (D, N) at channel d0 into the block layout [n][w]: Ak = A SC_KSCALE for
 * the recurrence and, when At is not NULL, At = A itself. */
static void FN(load_A)(REAL *restrict Ak, REAL *restrict At, const void *A, int64_t d0,
                       int64_t N, int W) {
  const REAL *Am = (const REAL *)A + d0 * N;
  for (int w = 0; w < LANES; w++)
    for (int64_t n = 0; n < N; n++) {
      REAL v = w < W ? Am[w * N + n] : (REAL)0;
      Ak[n * LANES + w] = v * (REAL)SC_KSCALE;
      if (At) At[n * LANES + w] = v;
    }
}

/* Sum of 16 lanes in a fixed tree order. */
static inline REAL FN(sum_lanes)(const REAL *restrict v) {
  REAL a8[8], a4[4];
  for (int i = 0; i < 8; i++) a8[i] = v[i] + v[i + 8];
  for (int i = 0; i < 4; i++) a4[i] = a8[i] + a8[i + 4];
  return (a4[0] + a4[2]) + (a4[1] + a4[3]);
}

/* The per-step channel quantities of a block at (b, t): x = delta + bias,
 * dt = softplus(x) or x, uu = u, du = dt * u. */
static inline void FN(step_inputs)(const mx_scan_args *a, int64_t row, int W,
                                   const REAL *restrict bias, REAL *restrict x,
                                   REAL *restrict dt, REAL *restrict uu, REAL *restrict du) {
  const REAL *u = (const REAL *)a->u + row, *dl = (const REAL *)a->delta + row;
  REAL dlv[LANES];
  FN(load_lanes)(uu, u, W);
  FN(load_lanes)(dlv, dl, W);
  if (a->softplus) {
    for (int w = 0; w < LANES; w++) {
      x[w] = dlv[w] + bias[w];
      dt[w] = SC_SOFTPLUS(x[w]);
      du[w] = dt[w] * uu[w];
    }
  } else {
    for (int w = 0; w < LANES; w++) {
      x[w] = dlv[w] + bias[w];
      dt[w] = x[w];
      du[w] = dt[w] * uu[w];
    }
  }
}

/* One step of the recurrence for a block, from state `prev` to `hnew`
 * (which may be the same array): a = exp(dt A), hnew = a prev + du B, and
 * y += C hnew over n in order. Ak is A SC_KSCALE in the block layout;
 * `aout` (may be NULL) receives a. */
static inline void FN(state_step)(int64_t N, const REAL *restrict Ak, const REAL *restrict dt,
                                  const REAL *restrict du, const REAL *restrict Bt,
                                  const REAL *restrict Ct, const REAL *prev, REAL *hnew,
                                  REAL *restrict aout, REAL *restrict y) {
  for (int64_t n = 0; n < N; n++) {
    const REAL bn = Bt[n], cn = Ct[n];
    const REAL *An = Ak + n * LANES, *pn = prev + n * LANES;
    REAL *hn = hnew + n * LANES;
    if (aout) {
      REAL *restrict an = aout + n * LANES;
      for (int w = 0; w < LANES; w++) {
        REAL av = SC_EXPK(dt[w] * An[w]);
        REAL hv = av * pn[w] + du[w] * bn;
        an[w] = av;
        hn[w] = hv;
        y[w] += cn * hv;
      }
    } else {
      for (int w = 0; w < LANES; w++) {
        REAL av = SC_EXPK(dt[w] * An[w]);
        REAL hv = av * pn[w] + du[w] * bn;
        hn[w] = hv;
        y[w] += cn * hv;
      }
    }
  }
}

/* One step of the reverse recurrence for a block (see scan_cpu.c for the
 * formulas). In: dh = c_t (the gradient reaching h_t from h_{t+1}), dy_t,
 * the state p_t entering the step (`prev`, zeros after a reset), a_t (`as`),
 * h_t (`hs`). Out: dh = a_t dh_t (the caller zeroes it after a reset),
 * ddt += sum_n ga A, sdb = sum_n dh_t B, dA += ga dt, and per lane the dB and
 * dC terms tb = dh_t dt u, tc = dy h_t (summed over lanes by the caller). */
static inline void FN(reverse_step)(int64_t N, const REAL *restrict At,
                                    const REAL *restrict prev, const REAL *restrict as,
                                    const REAL *restrict hs, const REAL *restrict Bt,
                                    const REAL *restrict Ct, const REAL *restrict dy,
                                    const REAL *restrict dt, const REAL *restrict du,
                                    REAL *restrict dh, REAL *restrict dA, REAL *restrict ddt,
                                    REAL *restrict sdb, REAL *restrict tb, REAL *restrict tc) {
  for (int64_t n = 0; n < N; n++) {
    const REAL bn = Bt[n], cn = Ct[n];
    const int64_t o = n * LANES;
    for (int w = 0; w < LANES; w++) {
      REAL dhv = dh[o + w] + dy[w] * cn;     /* dL/dh_t */
      REAL ga = dhv * prev[o + w] * as[o + w]; /* dL/da_t * a_t */
      ddt[w] += ga * At[o + w];
      dA[o + w] += ga * dt[w];
      sdb[w] += dhv * bn;
      tb[o + w] = dhv * du[w];
      tc[o + w] = dy[w] * hs[o + w];
      dh[o + w] = dhv * as[o + w]; /* into h_{t-1} */
    }
  }
}

/* ---- forward ------------------------------------------------------------ */

/* Work item (b, g, k): channel block k of group g of batch b. */
static void FN(fwd_item)(void *vctx, int64_t item, int worker) {
  const scan_ctx *c = vctx;
  const mx_scan_args *a = c->a;
  const int64_t L = a->len, D = a->dim, N = a->dstate, G = a->groups, Dg = D / G;
  const int64_t k = item % c->nsub, g = (item / c->nsub) % G, b = item / (c->nsub * G);
  const int64_t d0 = g * Dg + k * LANES;
  const int W = (int)(Dg - k * LANES < LANES ? Dg - k * LANES : LANES);
  REAL *h = (REAL *)(c->scratch + (size_t)worker * c->scratch_stride);
  REAL *Ak = h + N * LANES;
  REAL bias[LANES], Dv[LANES], x[LANES], dt[LANES], uu[LANES], du[LANES], zz[LANES], y[LANES];

  FN(load_A)(Ak, NULL, a->A, d0, N, W);
  FN(load_lanes)(bias, a->delta_bias ? (const REAL *)a->delta_bias + d0 : NULL, W);
  FN(load_lanes)(Dv, a->Dskip ? (const REAL *)a->Dskip + d0 : NULL, W);
  FN(load_state)(h, a->h0 ? (const REAL *)a->h0 + (b * D + d0) * N : NULL, N, W);

  const int64_t first = L < SC_AHEAD ? L : SC_AHEAD;
  FN(prefetch_rows)(a->u, b * L * D + d0, D, first, 0);
  FN(prefetch_rows)(a->delta, b * L * D + d0, D, first, 0);
  FN(prefetch_rows)(a->z, b * L * D + d0, D, first, 0);
  FN(prefetch_rows)(c->out, b * L * D + d0, D, first, 1);
  for (int64_t t = 0; t < L; t++) {
    const int64_t row = (b * L + t) * D + d0;
    const int64_t brow = ((b * L + t) * G + g) * N;
    if (t + SC_AHEAD < L) {
      const int64_t ahead = row + SC_AHEAD * D;
      FN(prefetch_row)(a->u, ahead, 0);
      FN(prefetch_row)(a->delta, ahead, 0);
      FN(prefetch_row)(a->z, ahead, 0);
      FN(prefetch_row)(c->out, ahead, 1);
    }
    FN(step_inputs)(a, row, W, bias, x, dt, uu, du);
    for (int w = 0; w < LANES; w++) y[w] = Dv[w] * uu[w];
    if (a->reset && a->reset[b * L + t]) memset(h, 0, (size_t)N * LANES * sizeof(REAL));
    FN(state_step)(N, Ak, dt, du, (const REAL *)a->Bm + brow, (const REAL *)a->Cm + brow, h, h,
                   NULL, y);
    if (a->z) {
      FN(load_lanes)(zz, (const REAL *)a->z + row, W);
      for (int w = 0; w < LANES; w++) y[w] = y[w] * (zz[w] * SC_SIGMOID(zz[w]));
    }
    REAL *o = (REAL *)c->out + row;
    for (int w = 0; w < W; w++) o[w] = y[w];
  }
  FN(store_state)((REAL *)c->h_last + (b * D + d0) * N, h, N, W);
}

/* ---- backward ----------------------------------------------------------- */

/* Work item (bs, g, p): part p of group g of the slab's batch bs; the part
 * covers channel blocks [nsub p / P, nsub (p + 1) / P) and runs them one
 * after another, so its dB/dC sums over those channels in a fixed order. */
static void FN(bwd_item)(void *vctx, int64_t item, int worker) {
  const scan_ctx *c = vctx;
  const mx_scan_args *a = c->a;
  const mx_scan_grads *gr = c->g;
  const int64_t L = a->len, D = a->dim, N = a->dstate, G = a->groups, Dg = D / G;
  const int64_t P = c->parts, S = c->chunk, NC = c->nchunks, NL = N * LANES;
  const int64_t p = item % P, g = (item / P) % G, bs = item / (P * G), b = c->b0 + bs;
  const int64_t k0 = c->nsub * p / P, k1 = c->nsub * (p + 1) / P;

  REAL *At = (REAL *)(c->scratch + (size_t)worker * c->scratch_stride);
  REAL *Ak = At + NL, *dh = Ak + NL, *dA = dh + NL, *zeros = dA + NL, *ck = zeros + NL;
  REAL *tb = ck + (NC > 0 ? NC : 1) * NL, *tc = tb + NL;
  REAL *abuf = tc + NL, *hbuf = abuf + S * NL;
  REAL *xbuf = hbuf + S * NL, *dtbuf = xbuf + S * LANES, *ybuf = dtbuf + S * LANES;
  REAL bias[LANES], Dv[LANES], x[LANES], dt[LANES], uu[LANES], du[LANES], y[LANES];
  REAL gg[LANES], zz[LANES], dy[LANES], dz[LANES], ddt[LANES], sdb[LANES];
  REAL dD[LANES], dbias[LANES];

  /* dB/dC rows of this item: the output itself when one item covers the
   * group (P == 1), else this item's partial (summed over p afterwards). */
  REAL *dBacc, *dCacc;
  int64_t stride;
  if (P == 1) {
    dBacc = gr->dB ? (REAL *)gr->dB + (b * L * G + g) * N : NULL;
    dCacc = gr->dC ? (REAL *)gr->dC + (b * L * G + g) * N : NULL;
    stride = G * N;
  } else {
    REAL *part = (REAL *)c->bc_part + ((bs * G + g) * P + p) * 2 * L * N;
    dBacc = gr->dB ? part : NULL;
    dCacc = gr->dC ? part + L * N : NULL;
    stride = N;
  }
  for (int64_t t = 0; t < L; t++) {
    if (dBacc) memset(dBacc + t * stride, 0, (size_t)N * sizeof(REAL));
    if (dCacc) memset(dCacc + t * stride, 0, (size_t)N * sizeof(REAL));
  }
  memset(zeros, 0, (size_t)NL * sizeof(REAL));

  for (int64_t k = k0; k < k1; k++) {
    const int64_t d0 = g * Dg + k * LANES;
    const int W = (int)(Dg - k * LANES < LANES ? Dg - k * LANES : LANES);
    FN(load_A)(Ak, At, a->A, d0, N, W);
    FN(load_lanes)(bias, a->delta_bias ? (const REAL *)a->delta_bias + d0 : NULL, W);
    FN(load_lanes)(Dv, a->Dskip ? (const REAL *)a->Dskip + d0 : NULL, W);
    memset(dA, 0, (size_t)NL * sizeof(REAL));
    for (int w = 0; w < LANES; w++) dD[w] = dbias[w] = 0;

    /* Pass 1: the state entering each chunk (ck[0] is h0). */
    FN(load_state)(ck, a->h0 ? (const REAL *)a->h0 + (b * D + d0) * N : NULL, N, W);
    for (int w = 0; w < LANES; w++) y[w] = 0; /* unused here */
    for (int64_t ci = 0; ci + 1 < NC; ci++) {
      REAL *h = ck + (ci + 1) * NL;
      memcpy(h, ck + ci * NL, (size_t)NL * sizeof(REAL));
      if (ci == 0) {
        FN(prefetch_rows)(a->u, b * L * D + d0, D, SC_AHEAD < S ? SC_AHEAD : S, 0);
        FN(prefetch_rows)(a->delta, b * L * D + d0, D, SC_AHEAD < S ? SC_AHEAD : S, 0);
      }
      for (int64_t t = ci * S; t < (ci + 1) * S; t++) {
        const int64_t row = (b * L + t) * D + d0, brow = ((b * L + t) * G + g) * N;
        if (t + SC_AHEAD < L) {
          FN(prefetch_row)(a->u, row + SC_AHEAD * D, 0);
          FN(prefetch_row)(a->delta, row + SC_AHEAD * D, 0);
        }
        FN(step_inputs)(a, row, W, bias, x, dt, uu, du);
        if (a->reset && a->reset[b * L + t]) memset(h, 0, (size_t)NL * sizeof(REAL));
        FN(state_step)(N, Ak, dt, du, (const REAL *)a->Bm + brow, (const REAL *)a->Cm + brow, h,
                       h, NULL, y);
      }
    }

    /* Pass 2: chunks from last to first; recompute, then run backwards. */
    FN(load_state)(dh, c->dh_last ? (const REAL *)c->dh_last + (b * D + d0) * N : NULL, N, W);
    for (int64_t ci = NC - 1; ci >= 0; ci--) {
      const int64_t t0 = ci * S, len = (L - t0 < S) ? L - t0 : S;
      const int64_t first = len < SC_AHEAD ? len : SC_AHEAD;
      const int64_t row0 = (b * L + t0) * D + d0, rowl = row0 + (len - 1) * D;
      FN(prefetch_rows)(a->u, row0, D, first, 0);
      FN(prefetch_rows)(a->delta, row0, D, first, 0);
      FN(prefetch_rows)(c->d_out, rowl, -D, first, 0);
      FN(prefetch_rows)(a->z, rowl, -D, first, 0);
      for (int64_t s = 0; s < len; s++) {
        const int64_t t = t0 + s;
        const int64_t row = (b * L + t) * D + d0, brow = ((b * L + t) * G + g) * N;
        REAL *xs = xbuf + s * LANES, *dts = dtbuf + s * LANES;
        if (t + SC_AHEAD < L) {
          FN(prefetch_row)(a->u, row + SC_AHEAD * D, 0);
          FN(prefetch_row)(a->delta, row + SC_AHEAD * D, 0);
        }
        FN(step_inputs)(a, row, W, bias, xs, dts, uu, du);
        for (int w = 0; w < LANES; w++) y[w] = Dv[w] * uu[w];
        const int rst = a->reset && a->reset[b * L + t];
        const REAL *prev = rst ? zeros : s == 0 ? ck + ci * NL : hbuf + (s - 1) * NL;
        FN(state_step)(N, Ak, dts, du, (const REAL *)a->Bm + brow, (const REAL *)a->Cm + brow,
                       prev, hbuf + s * NL, abuf + s * NL, y);
        memcpy(ybuf + s * LANES, y, sizeof y);
      }
      for (int64_t s = len - 1; s >= 0; s--) {
        const int64_t t = t0 + s;
        const int64_t row = (b * L + t) * D + d0, brow = ((b * L + t) * G + g) * N;
        const REAL *xs = xbuf + s * LANES, *dts = dtbuf + s * LANES, *ys = ybuf + s * LANES;
        const REAL *Bt = (const REAL *)a->Bm + brow, *Ct = (const REAL *)a->Cm + brow;
        const int rst = a->reset && a->reset[b * L + t];
        const REAL *prev = rst ? zeros : s == 0 ? ck + ci * NL : hbuf + (s - 1) * NL;
        const REAL *as = abuf + s * NL, *hs = hbuf + s * NL;
        if (t >= SC_AHEAD) {
          const int64_t back = row - SC_AHEAD * D;
          FN(prefetch_row)(c->d_out, back, 0);
          FN(prefetch_row)(a->z, back, 0);
          FN(prefetch_row)(gr->du, back, 1);
          FN(prefetch_row)(gr->ddelta, back, 1);
          FN(prefetch_row)(gr->dz, back, 1);
        }
        FN(load_lanes)(gg, (const REAL *)c->d_out + row, W);
        FN(load_lanes)(uu, (const REAL *)a->u + row, W);
        if (a->z) {
          FN(load_lanes)(zz, (const REAL *)a->z + row, W);
          for (int w = 0; w < LANES; w++) {
            REAL sg = SC_SIGMOID(zz[w]);
            dy[w] = gg[w] * (zz[w] * sg);
            dz[w] = gg[w] * ys[w] * (sg * (1 + zz[w] * (1 - sg)));
          }
        } else {
          for (int w = 0; w < LANES; w++) dy[w] = gg[w];
        }
        for (int w = 0; w < LANES; w++) {
          du[w] = dts[w] * uu[w];
          ddt[w] = 0;
          sdb[w] = 0;
        }
        FN(reverse_step)(N, At, prev, as, hs, Bt, Ct, dy, dts, du, dh, dA, ddt, sdb, tb, tc);
        if (dBacc)
          for (int64_t n = 0; n < N; n++) dBacc[t * stride + n] += FN(sum_lanes)(tb + n * LANES);
        if (dCacc)
          for (int64_t n = 0; n < N; n++) dCacc[t * stride + n] += FN(sum_lanes)(tc + n * LANES);
        if (rst) memset(dh, 0, (size_t)NL * sizeof(REAL));
        for (int w = 0; w < LANES; w++) {
          REAL ddu = dts[w] * sdb[w] + dy[w] * Dv[w];
          REAL dd = ddt[w] + uu[w] * sdb[w];
          if (a->softplus) dd = xs[w] <= (REAL)20 ? dd * SC_SIGMOID(xs[w]) : dd;
          du[w] = ddu;
          ddt[w] = dd;
          dD[w] += dy[w] * uu[w];
          dbias[w] += dd;
        }
        if (gr->du) memcpy((REAL *)gr->du + row, du, (size_t)W * sizeof(REAL));
        if (gr->ddelta) memcpy((REAL *)gr->ddelta + row, ddt, (size_t)W * sizeof(REAL));
        if (gr->dz && a->z) memcpy((REAL *)gr->dz + row, dz, (size_t)W * sizeof(REAL));
      }
    }
    if (gr->dh0) FN(store_state)((REAL *)gr->dh0 + (b * D + d0) * N, dh, N, W);
    FN(store_state)((REAL *)c->dA_part + (bs * D + d0) * N, dA, N, W);
    memcpy((REAL *)c->dD_part + bs * D + d0, dD, (size_t)W * sizeof(REAL));
    memcpy((REAL *)c->dbias_part + bs * D + d0, dbias, (size_t)W * sizeof(REAL));
  }
}

/* dB/dC of batch bs of the slab: the sum over parts p = 0, 1, ... in order. */
static void FN(reduce_bc_item)(void *vctx, int64_t item, int worker) {
  (void)worker;
  const scan_ctx *c = vctx;
  const mx_scan_args *a = c->a;
  const int64_t L = a->len, N = a->dstate, G = a->groups, P = c->parts;
  const int64_t g = item % G, bs = item / G, b = c->b0 + bs;
  for (int which = 0; which < 2; which++) {
    REAL *out = (REAL *)(which ? c->g->dC : c->g->dB);
    if (!out) continue;
    const REAL *part = (const REAL *)c->bc_part + ((bs * G + g) * P) * 2 * L * N + which * L * N;
    for (int64_t t = 0; t < L; t++) {
      REAL *o = out + ((b * L + t) * G + g) * N;
      for (int64_t n = 0; n < N; n++) {
        REAL acc = part[t * N + n];
        for (int64_t q = 1; q < P; q++) acc += part[q * 2 * L * N + t * N + n];
        o[n] = acc;
      }
    }
  }
}

/* dA, dD, ddelta_bias for channels [64 i, 64 i + 64): the running total of
 * the earlier slabs plus this slab's batches in order. */
static void FN(reduce_param_item)(void *vctx, int64_t item, int worker) {
  (void)worker;
  const scan_ctx *c = vctx;
  const mx_scan_args *a = c->a;
  const int64_t D = a->dim, N = a->dstate, nb = c->slab_len;
  const int64_t d0 = item * 64, d1 = d0 + 64 < D ? d0 + 64 : D;
  const int first = c->b0 == 0;
  if (c->g->dA) {
    REAL *o = c->g->dA;
    const REAL *part = c->dA_part;
    for (int64_t i = d0 * N; i < d1 * N; i++) {
      REAL acc = first ? (REAL)0 : o[i];
      for (int64_t bs = 0; bs < nb; bs++) acc += part[bs * D * N + i];
      o[i] = acc;
    }
  }
  for (int which = 0; which < 2; which++) {
    REAL *o = (REAL *)(which ? c->g->ddelta_bias : c->g->dD);
    if (!o) continue;
    const REAL *part = (const REAL *)(which ? c->dbias_part : c->dD_part);
    for (int64_t d = d0; d < d1; d++) {
      REAL acc = first ? (REAL)0 : o[d];
      for (int64_t bs = 0; bs < nb; bs++) acc += part[bs * D + d];
      o[d] = acc;
    }
  }
}

#undef FN
#undef SC_CAT
#undef SC_CAT2

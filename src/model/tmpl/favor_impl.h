// FAVOR+ attention (softmax kernel), forward and backward, written once for a
// floating type `real` and included by favor.c (float) and favor_f64.c
// (double, for finite-difference tests); see layers_impl.h for the macros.
//
// The feature projections u = c·x·Pᵀ of all heads and tokens of a micro-batch
// are one matrix product: x viewed as (T·H, E) rows times Pᵀ gives (T·H, M),
// i.e. features stored (T, H, M). The per-cell, per-head products (ctx, the
// numerator and their gradients) use strided views into that layout.
void FN(favor_cache_bind)(FAVOR_CACHE *c, const FavorDims *d, size_t T, size_t n_cells, real *mem,
                          void *imem) {
    size_t THM = T * d->H * d->M;
    c->phi_q = mem;
    c->phi_k = c->phi_q + THM;
    c->den = c->phi_k + THM;
    c->krow = c->den + T * d->H;
    c->ktot = c->krow + T * d->H;
    c->ksum = c->ktot + n_cells;
    c->ctx = c->ksum + n_cells * d->H * d->M;
    c->kmax = imem;
    c->qmax = (int32_t *)(c->kmax + n_cells);
}

// Row feature maps in place. u holds c·x·Pᵀ for `rows` rows of M features; x
// the matching rows of q or k (rows of E values, row stride `xs`).
static void FN(features_query)(real *u, int32_t *argmax, const real *x, size_t xs, size_t rows,
                           size_t M, size_t E, real c, real r) {
    const real half_c2 = (real)0.5 * c * c;
    for (size_t i = 0; i < rows; i++) {
        real *row = u + i * M;
        const real *xi = x + i * xs;
        real nrm = (real)0;
        for (size_t e = 0; e < E; e++) nrm += xi[e] * xi[e];
        size_t am = 0;
        real mx = row[0];
        for (size_t m = 1; m < M; m++) {
            if (row[m] > mx) {
                mx = row[m];
                am = m;
            }
        }
        real shift = nrm * half_c2 + mx;
        for (size_t m = 0; m < M; m++) row[m] = r * (EXP(row[m] - shift) + (real)FAVOR_EPS);
        argmax[i] = (int32_t)am;
    }
}

static void FN(features_key)(real *u, const real *x, size_t xs, size_t rows, size_t M, size_t E,
                         real c, real r, real mx) {
    const real half_c2 = (real)0.5 * c * c;
    for (size_t i = 0; i < rows; i++) {
        real *row = u + i * M;
        const real *xi = x + i * xs;
        real nrm = (real)0;
        for (size_t e = 0; e < E; e++) nrm += xi[e] * xi[e];
        real shift = nrm * half_c2 + mx;
        for (size_t m = 0; m < M; m++) row[m] = r * (EXP(row[m] - shift) + (real)FAVOR_EPS);
    }
}

void FN(favor_forward)(real *out, FAVOR_CACHE *cache, const real *q, const real *k, const real *v,
                   const real *proj, const int64_t *offset, size_t n_cells, const FavorDims *d) {
    const size_t H = d->H, E = d->E, M = d->M, HE = H * E, HM = H * M;
    const size_t T = (size_t)offset[n_cells];
    const real c = POW((real)E, (real)-0.25), r = (real)1 / SQRT((real)M);

    // u for all rows of all heads: (T·H, E) · (M, E)ᵀ
    GEMM(0, 1, T * H, M, E, c, q, E, proj, E, (real)0, cache->phi_q, M);
    GEMM(0, 1, T * H, M, E, c, k, E, proj, E, (real)0, cache->phi_k, M);
    FN(features_query)(cache->phi_q, cache->qmax, q, E, T * H, M, E, c, r);

    for (size_t b = 0; b < n_cells; b++) {
        const size_t t0 = (size_t)offset[b], n = (size_t)offset[b + 1] - t0;
        if (n == 0) continue;
        real *uk = cache->phi_k + t0 * HM;
        // The key maximum over the whole cell (all heads, tokens, features).
        size_t am = 0;
        real mx = uk[0];
        for (size_t i = 1; i < n * HM; i++) {
            if (uk[i] > mx) {
                mx = uk[i];
                am = i;
            }
        }
        cache->kmax[b] = (int64_t)am;
        FN(features_key)(uk, k + t0 * HE, E, n * H, M, E, c, r, mx);

        for (size_t h = 0; h < H; h++) {
            const real *pq = cache->phi_q + t0 * HM + h * M; // rows stride HM
            const real *pk = uk + h * M;
            real *S = cache->ksum + (b * H + h) * M;
            real *ctx = cache->ctx + (b * H + h) * M * E;
            memset(S, 0, M * sizeof *S);
            for (size_t t = 0; t < n; t++) {
                const real *row = pk + t * HM;
                for (size_t m = 0; m < M; m++) S[m] += row[m];
            }
            // ctx (M, E) = φkᵀ · v
            GEMM(1, 0, M, E, n, (real)1, pk, HM, v + t0 * HE + h * E, HE, (real)0, ctx, E);
            // out (n, E) = φq · ctx, then divided by den = φq · S
            real *o = out + t0 * HE + h * E;
            GEMM(0, 0, n, E, M, (real)1, pq, HM, ctx, E, (real)0, o, HE);
            real *den = cache->den + t0 * H + h;
            for (size_t t = 0; t < n; t++) {
                const real *row = pq + t * HM;
                real s = (real)0;
                for (size_t m = 0; m < M; m++) s += row[m] * S[m];
                den[t * H] = s;
                real inv = (real)1 / s;
                real *ot = o + t * HE;
                for (size_t e = 0; e < E; e++) ot[e] *= inv;
            }
        }
    }
}

void FN(favor_backward)(real *dq, real *dk, real *dv, FAVOR_CACHE *cache, const real *dout,
                    const real *out, const real *q, const real *k, const real *v,
                    const real *proj, const int64_t *offset, size_t n_cells, const FavorDims *d,
                    real *scratch) {
    const size_t H = d->H, E = d->E, M = d->M, HE = H * E, HM = H * M;
    const size_t T = (size_t)offset[n_cells];
    const real c = POW((real)E, (real)-0.25), r = (real)1 / SQRT((real)M);
    const real reps = r * (real)FAVOR_EPS;

    size_t n_max = 0;
    for (size_t b = 0; b < n_cells; b++) {
        size_t n = (size_t)(offset[b + 1] - offset[b]);
        if (n > n_max) n_max = n;
    }
    real *dnum = scratch;          // (n, E)
    real *dA = dnum + n_max * E;   // (n, M) gradient of φ(q)
    real *dB = dA + n_max * M;     // (n, M) gradient of φ(k), without the dS term
    real *dden = dB + n_max * M;   // (n)
    real *dctx = dden + 2 * n_max; // (M, E)
    real *dS = dctx + M * E;       // (M)

    // Per cell and head: gradients of φ(q) and φ(k), turned into the gradients
    // ds of the exponent (ds = dφ ⊙ r·exp(.) = dφ ⊙ (φ − r·eps)) and stored over
    // φ, which is not needed afterwards.
    for (size_t b = 0; b < n_cells; b++) {
        const size_t t0 = (size_t)offset[b], n = (size_t)offset[b + 1] - t0;
        double ktotal = 0.0;
        for (size_t h = 0; h < H && n > 0; h++) {
            real *pq = cache->phi_q + t0 * HM + h * M; // rows of stride HM
            real *pk = cache->phi_k + t0 * HM + h * M;
            const real *S = cache->ksum + (b * H + h) * M;
            const real *ctx = cache->ctx + (b * H + h) * M * E;
            real *den = cache->den + t0 * H + h;   // stride H
            real *krow = cache->krow + t0 * H + h; // stride H
            const real *go = dout + t0 * HE + h * E;
            const real *o = out + t0 * HE + h * E;
            const real *vh = v + t0 * HE + h * E;
            // out = num / den: dnum = dout / den, dden = −Σ_e dout·out / den
            for (size_t t = 0; t < n; t++) {
                real inv = (real)1 / den[t * H];
                const real *gt = go + t * HE, *ot = o + t * HE;
                real acc = (real)0;
                for (size_t e = 0; e < E; e++) {
                    dnum[t * E + e] = gt[e] * inv;
                    acc += gt[e] * ot[e];
                }
                dden[t] = -acc * inv;
            }
            // num = φq·ctx, den = φq·S: dA = dnum·ctxᵀ + dden ⊗ S,
            // dctx = φqᵀ·dnum, dS = φqᵀ·dden
            GEMM(0, 1, n, M, E, (real)1, dnum, E, ctx, E, (real)0, dA, M);
            GEMM(1, 0, M, E, n, (real)1, pq, HM, dnum, E, (real)0, dctx, E);
            memset(dS, 0, M * sizeof *dS);
            for (size_t t = 0; t < n; t++) {
                const real *row = pq + t * HM;
                real g = dden[t];
                real *ra = dA + t * M;
                for (size_t m = 0; m < M; m++) {
                    ra[m] += g * S[m];
                    dS[m] += g * row[m];
                }
            }
            // ctx = φkᵀ·v, S = Σ φk: dφk = v·dctxᵀ + 1 ⊗ dS, dv = φk·dctx
            GEMM(0, 1, n, M, E, (real)1, vh, HE, dctx, E, (real)0, dB, M);
            GEMM(0, 0, n, E, M, (real)1, pk, HM, dctx, E, (real)0, dv + t0 * HE + h * E, HE);
            for (size_t t = 0; t < n; t++) {
                real *rq = pq + t * HM, *rk = pk + t * HM;
                const real *ga = dA + t * M, *gb = dB + t * M;
                real sq = (real)0, sk = (real)0;
                for (size_t m = 0; m < M; m++) {
                    real a = ga[m] * (rq[m] - reps);
                    real bk = (gb[m] + dS[m]) * (rk[m] - reps);
                    rq[m] = a;
                    rk[m] = bk;
                    sq += a;
                    sk += bk;
                }
                den[t * H] = sq;
                krow[t * H] = sk;
                ktotal += sk;
            }
        }
        cache->ktot[b] = (real)ktotal;
    }

    // u = c·x·Pᵀ for all rows at once: dx = c·ds·P, then the diagonal terms
    // (diag = c²|x|²/2 enters with −1) and the maximum terms (the maximum enters
    // with −1 through the one element that attains it).
    GEMM(0, 0, T * H, E, M, c, cache->phi_q, M, proj, E, (real)0, dq, E);
    GEMM(0, 0, T * H, E, M, c, cache->phi_k, M, proj, E, (real)0, dk, E);
    const real c2 = c * c;
    for (size_t i = 0; i < T * H; i++) {
        real sq = cache->den[i], sk = cache->krow[i];
        const real *pm = proj + (size_t)cache->qmax[i] * E;
        const real *qi = q + i * E, *ki = k + i * E;
        real *dqi = dq + i * E, *dki = dk + i * E;
        for (size_t e = 0; e < E; e++) {
            dqi[e] -= sq * (c * pm[e] + c2 * qi[e]);
            dki[e] -= sk * c2 * ki[e];
        }
    }
    for (size_t b = 0; b < n_cells; b++) {
        if (offset[b + 1] == offset[b]) continue;
        size_t flat = (size_t)cache->kmax[b];
        size_t row = (size_t)offset[b] * H + flat / M, m = flat % M;
        real g = cache->ktot[b] * c;
        for (size_t e = 0; e < E; e++) dk[row * E + e] -= g * proj[m * E + e];
    }
}

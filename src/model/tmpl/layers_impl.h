// Embedding, LayerNorm, linear, GELU and dropout, forward and backward,
// written once for a floating type `real` and included by layers.c (float,
// the production kernels) and layers_f64.c (double, for finite-difference
// tests). FN(name) gives the function name, GEMM the matrix product, EXP and
// ERF the scalar functions for `real`.

// ---------------------------------------------------------------------------
// Embedding

void FN(embedding_forward)(real *out, const int32_t *token, const int32_t *gene,
                       const real *token_emb, const real *gene_emb, size_t T, size_t C) {
    for (size_t t = 0; t < T; t++) {
        const real *a = token_emb + (size_t)token[t] * C;
        const real *g = gene_emb + (size_t)gene[t] * C;
        real *o = out + t * C;
        for (size_t c = 0; c < C; c++) o[c] = a[c] + g[c];
    }
}

void FN(embedding_backward)(real *dtoken_emb, real *dgene_emb, const real *dout,
                        const int32_t *token, const int32_t *gene, size_t T, size_t C,
                        size_t zero_row) {
    for (size_t t = 0; t < T; t++) {
        const real *d = dout + t * C;
        if (dtoken_emb) {
            real *a = dtoken_emb + (size_t)token[t] * C;
            for (size_t c = 0; c < C; c++) a[c] += d[c];
        }
        if (dgene_emb && (size_t)gene[t] != zero_row) {
            real *g = dgene_emb + (size_t)gene[t] * C;
            for (size_t c = 0; c < C; c++) g[c] += d[c];
        }
    }
}

// ---------------------------------------------------------------------------
// LayerNorm (statistics in double: C is small and T large, so this is cheap)

void FN(layernorm_forward)(real *out, real *mean, real *rstd, const real *inp, const real *w,
                       const real *b, size_t T, size_t C) {
    for (size_t t = 0; t < T; t++) {
        const real *x = inp + t * C;
        double m = 0.0;
        for (size_t c = 0; c < C; c++) m += x[c];
        m /= (double)C;
        double v = 0.0;
        for (size_t c = 0; c < C; c++) {
            double d = x[c] - m;
            v += d * d;
        }
        v /= (double)C;
        real s = (real)(1.0 / sqrt(v + (double)LAYERNORM_EPS));
        real mf = (real)m;
        real *o = out + t * C;
        for (size_t c = 0; c < C; c++) o[c] = (x[c] - mf) * s * w[c] + b[c];
        mean[t] = mf;
        rstd[t] = s;
    }
}

void FN(layernorm_backward)(real *dinp, real *dw, real *db, const real *dout, const real *inp,
                        const real *w, const real *mean, const real *rstd, size_t T, size_t C) {
    for (size_t t = 0; t < T; t++) {
        const real *d = dout + t * C;
        const real *x = inp + t * C;
        real m = mean[t], s = rstd[t];
        // dnorm = dout * w; dx = s * (dnorm - mean(dnorm) - xhat * mean(dnorm * xhat))
        double sum_d = 0.0, sum_dx = 0.0;
        for (size_t c = 0; c < C; c++) {
            real xhat = (x[c] - m) * s;
            real dn = d[c] * w[c];
            sum_d += dn;
            sum_dx += (double)dn * xhat;
            if (dw) {
                dw[c] += d[c] * xhat;
                db[c] += d[c];
            }
        }
        real md = (real)(sum_d / (double)C), mdx = (real)(sum_dx / (double)C);
        real *di = dinp + t * C;
        for (size_t c = 0; c < C; c++) {
            real xhat = (x[c] - m) * s;
            di[c] += s * (d[c] * w[c] - md - xhat * mdx);
        }
    }
}

// ---------------------------------------------------------------------------
// Linear

void FN(linear_forward)(real *out, const real *inp, const real *w, const real *b, size_t T,
                    size_t C, size_t OC) {
    GEMM(0, 1, T, OC, C, (real)1, inp, C, w, C, (real)0, out, OC);
    if (b) {
        for (size_t t = 0; t < T; t++) {
            real *o = out + t * OC;
            for (size_t j = 0; j < OC; j++) o[j] += b[j];
        }
    }
}

void FN(linear_backward)(real *dinp, real *dw, real *db, const real *dout, const real *inp,
                     const real *w, size_t T, size_t C, size_t OC) {
    if (dinp) GEMM(0, 0, T, C, OC, (real)1, dout, OC, w, C, (real)0, dinp, C);
    if (dw) GEMM(1, 0, OC, C, T, (real)1, dout, OC, inp, C, (real)1, dw, C);
    if (db) {
        for (size_t t = 0; t < T; t++) {
            const real *d = dout + t * OC;
            for (size_t j = 0; j < OC; j++) db[j] += d[j];
        }
    }
}

// ---------------------------------------------------------------------------
// GELU (erf form, as torch.nn.functional.gelu)

void FN(gelu_forward)(real *out, const real *inp, size_t n) {
    for (size_t i = 0; i < n; i++) {
        real x = inp[i];
        out[i] = (real)0.5 * x * ((real)1 + ERF(x * (real)M_SQRT1_2));
    }
}

void FN(gelu_backward)(real *dinp, const real *dout, const real *inp, size_t n) {
    const real inv_sqrt_2pi = (real)0.3989422804014327;
    for (size_t i = 0; i < n; i++) {
        real x = inp[i];
        real cdf = (real)0.5 * ((real)1 + ERF(x * (real)M_SQRT1_2));
        real pdf = inv_sqrt_2pi * EXP(-(real)0.5 * x * x);
        dinp[i] = dout[i] * (cdf + x * pdf);
    }
}

// ---------------------------------------------------------------------------
// Dropout

void FN(dropout_apply)(real *x, size_t n, real rate, const Rng *key) {
    if (rate <= (real)0) return;
    // Keep element i when its 32-bit word is >= rate * 2^32.
    uint32_t threshold = (uint32_t)((double)rate * 4294967296.0);
    real scale = (real)1 / ((real)1 - rate);
    for (size_t i = 0; i < n; i += 4) {
        uint32_t w[4];
        rng_block_at(key, i / 4, w);
        size_t lim = n - i < 4 ? n - i : 4;
        for (size_t j = 0; j < lim; j++) x[i + j] = w[j] >= threshold ? x[i + j] * scale : (real)0;
    }
}

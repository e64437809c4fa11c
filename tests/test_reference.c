// The whole model against the PyTorch reference (tools/perfcell_torch.py):
// a dump from tools/make_reference.py holds the configuration, every
// parameter under its scBERT name, the packed input and the reference's
// logits, final hidden states, loss and every gradient (float64).
//
//   test_reference DUMP.h5
//
// Tolerances (relative L2 norm ||c - r|| / ||r|| per tensor): logits, hidden
// states and the loss within 1e-5, every gradient within 1e-4. The C model
// computes in float32 (unit roundoff 6e-8) through a few dozen dependent
// operations per value, so rounding alone stays near 1e-6; a wrong formula
// anywhere gives errors of 1e-2 or more.
#include "perfcell/error.h"
#include "perfcell/h5util.h"
#include "perfcell/mlm.h"
#include "perfcell/model.h"
#include "testlib.h"

#include <hdf5.h>
#include <string.h>

static long attr_long(hid_t f, const char *name) {
    hid_t a = H5Aopen(f, name, H5P_DEFAULT);
    long v = 0;
    if (a < 0 || H5Aread(a, H5T_NATIVE_LONG, &v) < 0) {
        fprintf(stderr, "dump: cannot read attribute %s\n", name);
        exit(2);
    }
    H5Aclose(a);
    return v;
}

static double *read_f64(hid_t f, const char *path, size_t *n) {
    int64_t count = 0;
    if (h5_dataset_size(f, path, "dump", &count, NULL) != 0) {
        fprintf(stderr, "%s\n", error_last());
        exit(2);
    }
    double *x = malloc((size_t)(count ? count : 1) * sizeof *x);
    if (h5_read_all(f, path, "dump", H5T_NATIVE_DOUBLE, x) != 0) {
        fprintf(stderr, "%s\n", error_last());
        exit(2);
    }
    if (n) *n = (size_t)count;
    return x;
}

static void *read_int(hid_t f, const char *path, hid_t type, size_t elem, size_t *n) {
    int64_t count = 0;
    if (h5_dataset_size(f, path, "dump", &count, NULL) != 0) exit(2);
    void *x = malloc((size_t)(count ? count : 1) * elem);
    if (h5_read_all(f, path, "dump", type, x) != 0) exit(2);
    if (n) *n = (size_t)count;
    return x;
}

static double rel_err(const float *c, const double *r, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)c[i] - r[i];
        num += d * d;
        den += r[i] * r[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: test_reference DUMP.h5\n");
        return 2;
    }
    error_h5_quiet();
    hid_t f = H5Fopen(argv[1], H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0) {
        fprintf(stderr, "cannot open %s\n", argv[1]);
        return 2;
    }
    ModelConfig mc = {0};
    char mode[32];
    h5_attr_read_string(f, "mode", mode, sizeof mode);
    mc.mode = strcmp(mode, "nonzero") == 0 ? SEQ_NONZERO : SEQ_FULL;
    mc.n_genes = (size_t)attr_long(f, "n_genes");
    mc.dim = (size_t)attr_long(f, "dim");
    mc.depth = (size_t)attr_long(f, "depth");
    mc.heads = (size_t)attr_long(f, "heads");
    mc.dim_head = (size_t)attr_long(f, "dim_head");
    mc.n_features = (size_t)attr_long(f, "nb_features");
    mc.ff_dim = (size_t)attr_long(f, "ff_dim");
    mc.bins = (int)attr_long(f, "bins");
    char ge[32];
    h5_attr_read_string(f, "gene_emb", ge, sizeof ge);
    mc.gene_emb_frozen = strcmp(ge, "frozen") == 0;

    size_t T = 0, B1 = 0;
    TokenBatch tb;
    tokenbatch_init(&tb);
    int32_t *tok = read_int(f, "input/tokens", H5T_NATIVE_INT32, 4, &T);
    int32_t *gene = read_int(f, "input/genes", H5T_NATIVE_INT32, 4, NULL);
    int32_t *target = read_int(f, "input/target", H5T_NATIVE_INT32, 4, NULL);
    int64_t *off = read_int(f, "input/offsets", H5T_NATIVE_INT64, 8, &B1);
    size_t B = B1 - 1, max_cell = 0;
    tokenbatch_reserve(&tb, B, T);
    memcpy(tb.token, tok, T * 4);
    memcpy(tb.gene, gene, T * 4);
    memcpy(tb.target, target, T * 4);
    memcpy(tb.offset, off, B1 * 8);
    for (size_t b = 0; b < B; b++) {
        tb.cell_id[b] = (int64_t)b;
        tb.label[b] = -1;
        size_t n = (size_t)(off[b + 1] - off[b]);
        if (n > max_cell) max_cell = n;
    }
    tb.n_cells = B;
    tb.n_tokens = T;
    double *n_norm = read_f64(f, "input/n_norm", NULL);

    ParamTable table;
    param_table_init(&table);
    model_table_add_encoder(&table, &mc);
    mlm_head_add(&table, &mc);
    Model m;
    if (model_alloc(&m, &mc, &table, T, B, max_cell) != 0) {
        fprintf(stderr, "%s\n", error_last());
        return 2;
    }
    // Parameters and projection matrices by name.
    for (size_t i = 0; i < m.table.n; i++) {
        const ParamEntry *e = &m.table.e[i];
        char path[256];
        snprintf(path, sizeof path, "params/%s", e->name);
        size_t n = 0;
        double *x = read_f64(f, path, &n);
        T_CHECK(n == e->size, "%s: %zu values in the dump, %zu in the model", e->name, n, e->size);
        for (size_t j = 0; j < e->size && j < n; j++) m.params[e->offset + j] = (float)x[j];
        free(x);
    }
    for (size_t l = 0; l < mc.depth; l++) {
        char path[256];
        snprintf(path, sizeof path, "params/performer.net.layers.%zu.0.fn.fast_attention.projection_matrix", l);
        size_t n = 0;
        double *x = read_f64(f, path, &n);
        T_CHECK(n == mc.n_features * mc.dim_head, "projection %zu size", l);
        for (size_t j = 0; j < n; j++) m.proj[l * mc.n_features * mc.dim_head + j] = (float)x[j];
        free(x);
    }

    // Forward, loss, backward.
    const size_t V = (size_t)mc.bins + 2, C = mc.dim;
    float *logits = floats_alloc(T * V), *dlogits = floats_alloc(T * V), *dhidden = floats_alloc(T * C);
    PassCtx ctx = {0, 0, 0, 1};
    model_zero_grad(&m);
    model_forward(&m, &tb, &ctx);
    const ParamEntry *ew = param_table_find(&m.table, "to_out.weight");
    const ParamEntry *eb = param_table_find(&m.table, "to_out.bias");
    mlm_logits(logits, m.hidden, m.params + ew->offset, m.params + eb->offset, T, C, V);
    double loss = mlm_loss(dlogits, logits, tb.target, T, V, *n_norm, NULL);
    mlm_backward(dhidden, m.grads + ew->offset, m.grads + eb->offset, dlogits, m.hidden,
                 m.params + ew->offset, T, C, V);
    model_backward(&m, &tb, &ctx, dhidden);

    double *ref_logits = read_f64(f, "output/logits", NULL);
    double *ref_hidden = read_f64(f, "output/hidden", NULL);
    double *ref_loss = read_f64(f, "output/loss", NULL);
    double el = rel_err(logits, ref_logits, T * V), eh = rel_err(m.hidden, ref_hidden, T * C);
    double eloss = fabs(loss - *ref_loss) / fabs(*ref_loss);
    printf("%s: %s mode, %zu cells, %zu tokens\n", argv[1], mode, B, T);
    printf("  logits  rel L2 %.2e\n  hidden  rel L2 %.2e\n  loss    rel    %.2e (%.8f vs %.8f)\n", el,
           eh, eloss, loss, *ref_loss);
    T_CHECK(el < 1e-5, "logits differ: %.2e", el);
    T_CHECK(eh < 1e-5, "hidden states differ: %.2e", eh);
    T_CHECK(eloss < 1e-5, "loss differs: %.2e", eloss);
    double worst = 0;
    const char *worst_name = "";
    size_t compared = 0;
    for (size_t i = 0; i < m.table.n; i++) {
        const ParamEntry *e = &m.table.e[i];
        char path[256];
        snprintf(path, sizeof path, "grad/%s", e->name);
        if (!h5_exists(f, path)) {
            T_CHECK(!e->trainable, "the dump has no gradient for trainable %s", e->name);
            continue;
        }
        double *g = read_f64(f, path, NULL);
        double err = rel_err(m.grads + e->offset, g, e->size);
        T_CHECK(err < 1e-4, "gradient of %s differs: %.2e", e->name, err);
        if (err > worst) worst = err, worst_name = e->name;
        compared++;
        free(g);
    }
    printf("  gradients: %zu tensors, worst rel L2 %.2e (%s)\n", compared, worst, worst_name);
    T_CHECK(compared > 0, "no gradient compared");
    H5Fclose(f);
    free(tok), free(gene), free(target), free(off), free(n_norm), free(logits), free(dlogits),
        free(dhidden), free(ref_logits), free(ref_hidden), free(ref_loss);
    model_free(&m);
    tokenbatch_free(&tb);
    return t_finish("test_reference");
}

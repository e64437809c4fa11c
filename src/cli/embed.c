// `perfcell embed`: cell embeddings as an .h5ad (obsm['X_perfcell']).
#include "perfcell/error.h"
#include "perfcell/h5util.h"
#include "perfcell/infer.h"
#include "perfcell/log.h"
#include "perfcell/pretrain.h"
#include "perfcell/tokens.h"
#include "perfcell/util.h"

#include <errno.h>
#include <mpi.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char USAGE[] =
    "usage: perfcell embed --checkpoint CKPT --input PATH --out cells.h5ad\n"
    "                      [--pooling last|mean] [--batch N] [--label-key COL]\n"
    "                      [--layer NAME | --use-raw] [--force]\n"
    "\n"
    "Writes one vector per cell of PATH (a shard folder, or an .h5ad / 10x input\n"
    "aligned to the model's vocabulary) to an .h5ad: obsm['X_perfcell'] holds the\n"
    "final hidden state at the last position (scBERT's cell position, default)\n"
    "or its mean over the cell's positions; obs holds the cell names, cell ids\n"
    "and labels (when the input has them) and, for shard folders, the split\n"
    "(train / validation) the checkpoint's pretraining held out. Any pretraining or fine-tuning\n"
    "checkpoint works. Open it with anndata.read_h5ad.\n"
    "\n"
    "The output is written to a temporary file next to it and renamed into place, so\n"
    "a failed run leaves no partial file. An existing --out is refused unless --force\n"
    "(replace it); --out is never allowed to be the input or the checkpoint.\n";

// An AnnData categorical column: codes (int16/int32) and categories.
static int write_categorical(hid_t obs, const char *name, const int32_t *codes, size_t n,
                             char *const *cats, size_t n_cats) {
    hid_t g = H5Gcreate2(obs, name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (g < 0) return error_set_h5("cannot create obs/%s", name);
    int rc = h5_set_encoding(g, "categorical", "0.2.0");
    if (rc == 0) rc = h5_attr_write_bool(g, "ordered", 0);
    if (rc == 0) rc = h5_write_strings(g, "categories", (const char *const *)cats, n_cats);
    if (rc == 0) {
        hid_t cd = H5Dopen2(g, "categories", H5P_DEFAULT);
        rc = h5_set_encoding(cd, "string-array", "0.2.0");
        H5Dclose(cd);
    }
    if (rc == 0) {
        hsize_t dim = n;
        hid_t s = H5Screate_simple(1, &dim, NULL);
        hid_t d = H5Dcreate2(g, "codes", H5T_STD_I32LE, s, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        if (d < 0 || (n && H5Dwrite(d, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, codes) < 0))
            rc = error_set_h5("cannot write obs/%s/codes", name);
        if (d >= 0) {
            if (rc == 0) rc = h5_set_encoding(d, "array", "0.2.0");
            H5Dclose(d);
        }
        H5Sclose(s);
    }
    H5Gclose(g);
    return rc;
}

static int write_array(hid_t loc, const char *name, hid_t ftype, hid_t mtype, int rank,
                       const hsize_t *dims, const void *buf) {
    hid_t s = H5Screate_simple(rank, dims, NULL);
    hid_t d = H5Dcreate2(loc, name, ftype, s, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    int rc = 0;
    if (d < 0 || H5Dwrite(d, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0)
        rc = error_set_h5("cannot write %s", name);
    if (rc == 0) rc = h5_set_encoding(d, "array", "0.2.0");
    if (d >= 0) H5Dclose(d);
    H5Sclose(s);
    return rc;
}

static hid_t dict(hid_t loc, const char *name) {
    hid_t g = H5Gcreate2(loc, name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (g >= 0 && h5_set_encoding(g, "dict", "0.1.0") != 0) {
        H5Gclose(g);
        return -1;
    }
    return g;
}

static int write_h5ad(const char *path, const CellSource *src, const float *emb, size_t n, size_t C,
                      const char *ckpt, const char *pooling, const int32_t *split) {
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS), f = H5I_INVALID_HID;
    if (fapl >= 0 && H5Pset_libver_bounds(fapl, H5F_LIBVER_V18, H5F_LIBVER_V18) >= 0)
        f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    if (fapl >= 0) H5Pclose(fapl);
    if (f < 0) return error_set_h5("cannot create '%s'", path);
    int rc = h5_set_encoding(f, "anndata", "0.1.0");
    // obs: cell names (index), cell ids, labels
    hid_t obs = rc == 0 ? H5Gcreate2(f, "obs", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT) : -1;
    if (obs < 0 && rc == 0) rc = error_set_h5("%s: cannot create obs", path);
    if (rc == 0) rc = h5_set_encoding(obs, "dataframe", "0.2.0");
    if (rc == 0) rc = h5_attr_write_string(obs, "_index", "cell");
    const char *cols[3];
    size_t ncols = 0;
    cols[ncols++] = "cell_id";
    if (src->labels) cols[ncols++] = "label";
    if (split) cols[ncols++] = "split";
    if (rc == 0) rc = h5_attr_write_strings(obs, "column-order", cols, ncols);
    if (rc == 0) rc = h5_write_strings(obs, "cell", (const char *const *)src->names, n);
    if (rc == 0) {
        hid_t d = H5Dopen2(obs, "cell", H5P_DEFAULT);
        rc = h5_set_encoding(d, "string-array", "0.2.0");
        H5Dclose(d);
    }
    int64_t *ids = xmalloc((n ? n : 1) * sizeof *ids);
    for (size_t i = 0; i < n; i++) ids[i] = (int64_t)i;
    hsize_t dn = n;
    if (rc == 0) rc = write_array(obs, "cell_id", H5T_STD_I64LE, H5T_NATIVE_INT64, 1, &dn, ids);
    free(ids);
    if (rc == 0 && src->labels)
        rc = write_categorical(obs, "label", src->labels, n, src->label_names, src->n_label_names);
    char *split_names[2] = {"train", "validation"};
    if (rc == 0 && split) rc = write_categorical(obs, "split", split, n, split_names, 2);
    if (obs >= 0) H5Gclose(obs);
    // var: no genes (the embedding is not per gene)
    hid_t var = rc == 0 ? H5Gcreate2(f, "var", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT) : -1;
    if (var < 0 && rc == 0) rc = error_set_h5("%s: cannot create var", path);
    if (rc == 0) rc = h5_set_encoding(var, "dataframe", "0.2.0");
    if (rc == 0) rc = h5_attr_write_string(var, "_index", "gene");
    if (rc == 0) rc = h5_attr_write_strings(var, "column-order", NULL, 0);
    if (rc == 0) rc = h5_write_strings(var, "gene", NULL, 0);
    if (rc == 0) {
        hid_t d = H5Dopen2(var, "gene", H5P_DEFAULT);
        rc = h5_set_encoding(d, "string-array", "0.2.0");
        H5Dclose(d);
    }
    if (var >= 0) H5Gclose(var);
    // obsm/X_perfcell, uns/perfcell, empty dicts
    hid_t obsm = rc == 0 ? dict(f, "obsm") : -1;
    if (obsm < 0 && rc == 0) rc = error_set_h5("%s: cannot create obsm", path);
    hsize_t dims[2] = {n, C};
    if (rc == 0) rc = write_array(obsm, "X_perfcell", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, 2, dims, emb);
    if (obsm >= 0) H5Gclose(obsm);
    hid_t uns = rc == 0 ? dict(f, "uns") : -1;
    hid_t pc = uns >= 0 ? dict(uns, "perfcell") : -1;
    if ((uns < 0 || pc < 0) && rc == 0) rc = error_set_h5("%s: cannot create uns", path);
    const char *keys[2] = {"checkpoint", "pooling"}, *vals[2] = {ckpt, pooling};
    for (int i = 0; i < 2 && rc == 0; i++) {
        rc = h5_write_string_scalar(pc, keys[i], vals[i]);
        if (rc == 0) {
            hid_t d = H5Dopen2(pc, keys[i], H5P_DEFAULT);
            rc = h5_set_encoding(d, "string", "0.2.0");
            H5Dclose(d);
        }
    }
    if (pc >= 0) H5Gclose(pc);
    if (uns >= 0) H5Gclose(uns);
    const char *empty[] = {"layers", "varm", "obsp", "varp"};
    for (int i = 0; i < 4 && rc == 0; i++) {
        hid_t g = dict(f, empty[i]);
        if (g < 0) rc = error_set_h5("%s: cannot create %s", path, empty[i]);
        else H5Gclose(g);
    }
    if (H5Fclose(f) < 0 && rc == 0) rc = error_set_h5("cannot close '%s'", path);
    return rc;
}

int cmd_embed(int argc, char **argv) {
    InferArgs ia = {.batch = 16};
    const char *pooling = "last";
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (infer_args_take(&ia, argc, argv, &i, "embed")) continue;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(USAGE, stdout);
            return 0;
        } else if (strcmp(a, "--pooling") == 0) {
            const char *v = i + 1 < argc ? argv[++i] : "";
            if (strcmp(v, "last") != 0 && strcmp(v, "mean") != 0)
                DIE_HINT("--pooling last or --pooling mean", "--pooling '%s' is not last or mean", v);
            pooling = v;
        } else {
            DIE_HINT("see `perfcell embed --help`", "unknown argument '%s'", a);
        }
    }
    infer_args_require(&ia, "embed");
    const char *out = ia.out;
    int size = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size > 1) DIE_HINT("run `perfcell embed` as one process", "embed runs on one rank, not %d", size);

    InferModel im;
    CHECK_OK_USER(infer_model_open(&im, ia.checkpoint, 0));
    CellSource src;
    CHECK_OK_USER(cell_source_open(&src, ia.input, &im.vocab, im.ck.vocab_hash, ia.label_key, ia.layer,
                                   ia.use_raw));
    CHECK_OK_USER(infer_model_alloc(&im, (size_t)ia.batch, (size_t)src.max_cell_nnz));
    const size_t C = im.mc.dim, n_cells = (size_t)src.n_cells;
    const int mean = strcmp(pooling, "mean") == 0;
    float *emb = floats_alloc(n_cells * C);
    CellBatch cb;
    TokenBatch tb;
    cellbatch_init(&cb);
    tokenbatch_init(&tb);
    PassCtx ctx = {0, 0, 0, 0};
    int64_t first = 0, n;
    double t0 = time_now();
    while ((n = cell_source_next(&src, (size_t)ia.batch, &cb, &first)) > 0) {
        tokens_from_cells(&tb, &cb, &im.mc, 0, 0);
        model_forward(&im.model, &tb, &ctx);
        for (int64_t c = 0; c < n; c++) {
            size_t t0c = (size_t)tb.offset[c], t1c = (size_t)tb.offset[c + 1];
            float *e = emb + (size_t)(first + c) * C;
            if (!mean) {
                memcpy(e, im.model.hidden + (t1c - 1) * C, C * sizeof *e);
                continue;
            }
            for (size_t t = t0c; t < t1c; t++)
                for (size_t k = 0; k < C; k++) e[k] += im.model.hidden[t * C + k];
            for (size_t k = 0; k < C; k++) e[k] /= (float)(t1c - t0c);
        }
    }
    if (n < 0) DIE("%s", error_last());
    size_t plen = strlen(out) + 32;
    char *tmp = xmalloc(plen);
    snprintf(tmp, plen, "%s.tmp.%ld", out, (long)getpid());
    error_cleanup_add(tmp);
    // For shard folders, the pretraining split of each cell (the same stable
    // hash of the cell id the stream uses): embeddings of held-out cells.
    int32_t *split = NULL;
    if (src.is_shards) {
        split = xmalloc((n_cells ? n_cells : 1) * sizeof *split);
        double vf = config_float(im.cfg, "data.val_fraction");
        uint64_t ss = (uint64_t)config_int(im.cfg, "data.split_seed");
        for (size_t c = 0; c < n_cells; c++) split[c] = stream_is_validation(ss, vf, (int64_t)c);
    }
    if (write_h5ad(tmp, &src, emb, n_cells, C, im.path, pooling, split) != 0)
        DIE_HINT("check that the folder of --out is writable and has space; an existing --out is "
                 "left as it was",
                 "cannot write '%s' (temporary %s): %s", out, tmp, error_last());
    if (path_fsync(tmp) != 0 || rename(tmp, out) != 0)
        DIE("cannot move '%s' to '%s': %s", tmp, out, strerror(errno));
    error_cleanup_remove(tmp);
    double dt = time_now() - t0;
    log_info("embedded %zu cells (%zu dimensions, %s pooling) in %.1fs; wrote %s", n_cells, C, pooling, dt, out);
    free(emb);
    free(split);
    free(tmp);
    cellbatch_free(&cb);
    tokenbatch_free(&tb);
    cell_source_close(&src);
    infer_model_close(&im);
    return 0;
}

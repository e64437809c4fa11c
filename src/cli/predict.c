// `perfcell predict`: annotate cells with a fine-tuned checkpoint.
#include "perfcell/error.h"
#include "perfcell/infer.h"
#include "perfcell/log.h"
#include "perfcell/pretrain.h"
#include "perfcell/report.h"
#include "perfcell/tokens.h"
#include "perfcell/util.h"

#include <errno.h>
#include <mpi.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char USAGE[] =
    "usage: perfcell predict --checkpoint CKPT|RUN_DIR/best --input PATH --out pred.tsv\n"
    "                        [--threshold P] [--batch N] [--probabilities]\n"
    "                        [--label-key COL] [--layer NAME | --use-raw] [--report PREFIX]\n"
    "                        [--force]\n"
    "\n"
    "Annotates every cell of PATH (a shard folder, or an .h5ad / 10x HDF5 / 10x\n"
    "MatrixMarket input aligned to the model's vocabulary on the fly) with the\n"
    "fine-tuned model. Writes a TSV: cell, cell_id, prediction, probability (and\n"
    "one column per class with --probabilities); cells whose top probability is\n"
    "below the threshold (default 0.5, as scBERT) are 'Unassigned'. When the\n"
    "input has labels (shards with labels, or --label-key for an .h5ad), prints\n"
    "accuracy and macro-F1 and, with --report PREFIX, writes PREFIX.tsv and\n"
    "PREFIX.svg (confusion matrix).\n"
    "\n"
    "Each output is written to a temporary file next to it and renamed into place, so\n"
    "a failed run leaves no partial file. An existing --out (or report) is refused\n"
    "unless --force (replace it); no output may be the input or the checkpoint.\n";

// The model class matching an input label name, or -1.
static int class_of(const InferModel *im, const char *name) {
    for (size_t k = 0; k < im->ck.n_labels; k++)
        if (strcmp(im->ck.labels[k], name) == 0) return (int)k;
    return -1;
}

int cmd_predict(int argc, char **argv) {
    InferArgs ia = {.batch = 16};
    const char *report = NULL;
    double threshold = 0.5;
    int probs = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (infer_args_take(&ia, argc, argv, &i, "predict")) continue;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(USAGE, stdout);
            return 0;
        } else if (strcmp(a, "--probabilities") == 0) {
            probs = 1;
        } else if ((strcmp(a, "--report") == 0 || strcmp(a, "--threshold") == 0) && i + 1 >= argc) {
            DIE_HINT("see `perfcell predict --help`", "%s needs a value", a);
        } else if (strcmp(a, "--report") == 0) {
            report = argv[++i];
        } else if (strcmp(a, "--threshold") == 0) {
            const char *v = argv[++i];
            if (str_to_double(v, &threshold) != 0 || threshold < 0 || threshold > 1)
                DIE_HINT("a probability in [0, 1]", "--threshold '%s' is not a probability", v);
        } else {
            DIE_HINT("see `perfcell predict --help`", "unknown argument '%s'", a);
        }
    }
    infer_args_require(&ia, "predict");
    const char *out = ia.out;
    const long batch = ia.batch;
    if (report) {
        size_t rl = strlen(report);
        const char *ext[2] = {".tsv", ".svg"};
        for (int e = 0; e < 2; e++)
            if (strncmp(out, report, rl) == 0 && strcmp(out + rl, ext[e]) == 0)
                DIE_HINT("choose another --report PREFIX", "--report %s would overwrite --out %s", report, out);
        // The report files are outputs too: the same checks as --out.
        const char *inputs[2] = {ia.input, ia.checkpoint};
        char *rp = xmalloc(rl + 8);
        for (int e = 0; e < 2; e++) {
            snprintf(rp, rl + 8, "%s%s", report, ext[e]);
            CHECK_OK_USER(path_out_check(rp, ia.force, inputs, 2));
        }
        free(rp);
    }
    int size = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size > 1) DIE_HINT("run `perfcell predict` as one process", "predict runs on one rank, not %d", size);

    InferModel im;
    CHECK_OK_USER(infer_model_open(&im, ia.checkpoint, 1));
    CellSource src;
    CHECK_OK_USER(cell_source_open(&src, ia.input, &im.vocab, im.ck.vocab_hash, ia.label_key, ia.layer,
                                   ia.use_raw));
    CHECK_OK_USER(infer_model_alloc(&im, (size_t)batch, (size_t)src.max_cell_nnz));
    const size_t K = im.ck.n_labels;
    // Input label codes -> model classes (by name).
    int *to_class = NULL;
    if (src.labels) {
        to_class = xmalloc((src.n_label_names ? src.n_label_names : 1) * sizeof *to_class);
        size_t unknown = 0;
        for (size_t i = 0; i < src.n_label_names; i++) {
            to_class[i] = class_of(&im, src.label_names[i]);
            unknown += to_class[i] < 0;
        }
        if (unknown)
            log_warn("%zu of the input's %zu labels are not classes of the model; their cells are left "
                     "out of the scores", unknown, src.n_label_names);
    }

    size_t plen = strlen(out) + 32;
    char *tmp = xmalloc(plen);
    snprintf(tmp, plen, "%s.tmp.%ld", out, (long)getpid());
    error_cleanup_add(tmp);
    FILE *f = fopen(tmp, "w");
    if (!f) DIE_HINT("check that the folder of --out exists and is writable", "cannot write '%s': %s", tmp, strerror(errno));
    fprintf(f, "cell\tcell_id\tprediction\tprobability");
    if (src.labels) fprintf(f, "\tlabel");
    if (probs)
        for (size_t k = 0; k < K; k++) fprintf(f, "\tp_%s", im.ck.labels[k]);
    fputc('\n', f);

    Confusion conf;
    confusion_init(&conf, K, im.ck.labels);
    CellBatch cb;
    TokenBatch tb;
    cellbatch_init(&cb);
    tokenbatch_init(&tb);
    float *logits = floats_alloc((size_t)batch * K);
    PassCtx ctx = {0, 0, 0, 0};
    int64_t first = 0, n, done = 0, unassigned = 0;
    double t0 = time_now();
    while ((n = cell_source_next(&src, (size_t)batch, &cb, &first)) > 0) {
        tokens_from_cells(&tb, &cb, &im.mc, 0, 0);
        model_forward(&im.model, &tb, &ctx);
        classifier_forward(&im.cls, &im.model, &tb, logits);
        classifier_softmax(logits, (size_t)n, K);
        for (int64_t c = 0; c < n; c++) {
            const float *p = logits + (size_t)c * K;
            size_t am = 0;
            for (size_t k = 1; k < K; k++)
                if (p[k] > p[am]) am = k;
            int assigned = p[am] >= threshold;
            unassigned += !assigned;
            int64_t id = first + c;
            fprintf(f, "%s\t%lld\t%s\t%.6f", src.names[id], (long long)cb.cell_id[c],
                    assigned ? im.ck.labels[am] : "Unassigned", (double)p[am]);
            if (src.labels) {
                int code = src.labels[id];
                fprintf(f, "\t%s", code >= 0 ? src.label_names[code] : "");
                if (code >= 0 && to_class[code] >= 0) confusion_add(&conf, to_class[code], assigned ? (int)am : -1);
            }
            if (probs)
                for (size_t k = 0; k < K; k++) fprintf(f, "\t%.6f", (double)p[k]);
            fputc('\n', f);
        }
        done += n;
    }
    if (n < 0) DIE("%s", error_last());
    if (fflush(f) != 0 || ferror(f) || fsync(fileno(f)) != 0 || fclose(f) != 0)
        DIE_HINT("check that the folder of --out has space; an existing --out is left as it was",
                 "cannot write '%s' (temporary %s): %s", out, tmp, strerror(errno));
    if (rename(tmp, out) != 0) DIE("cannot rename '%s' to '%s': %s", tmp, out, strerror(errno));
    error_cleanup_remove(tmp);
    double dt = time_now() - t0;
    log_info("predicted %lld cells in %.1fs (%.0f cells/s): %lld Unassigned (probability < %.2f); wrote %s",
             (long long)done, dt, (double)done / (dt > 0 ? dt : 1), (long long)unassigned, threshold, out);
    if (conf.n > 0) {
        confusion_print(&conf, stdout, "labelled cells");
        if (report) {
            if (confusion_write(&conf, report, "perfcell predict") != 0) DIE("%s", error_last());
            log_info("wrote %s.tsv and %s.svg", report, report);
        }
    }
    confusion_free(&conf);
    free(logits);
    free(to_class);
    free(tmp);
    cellbatch_free(&cb);
    tokenbatch_free(&tb);
    cell_source_close(&src);
    infer_model_close(&im);
    return 0;
}

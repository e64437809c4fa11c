// perfcell-shard: build a gene vocabulary from atlases (`vocab`) and write
// shard folders from them (`build`, in parallel under mpirun).
#include "perfcell/error.h"
#include "perfcell/input.h"
#include "perfcell/log.h"
#include "perfcell/manifest.h"
#include "perfcell/mpienv.h"
#include "perfcell/runlock.h"
#include "perfcell/shard_writer.h"
#include "perfcell/util.h"
#include "perfcell/vocab.h"

#include <libgen.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *USAGE =
    "usage: perfcell-shard COMMAND [options]\n"
    "\n"
    "Preprocess single-cell atlases into shard folders for perfcell.\n"
    "\n"
    "commands:\n"
    "  vocab IN... --out vocab.tsv          gene vocabulary from the inputs' genes\n"
    "  build IN... --vocab V --out DIR      write a shard folder (run under mpirun -np N)\n"
    "\n"
    "Inputs: AnnData .h5ad files, 10x Genomics HDF5 files (CellRanger v2 or v3) and 10x\n"
    "MatrixMarket folders (matrix.mtx, barcodes.tsv, features.tsv or genes.tsv; gzip or not).\n"
    "`perfcell-shard COMMAND --help` lists the options of a command.\n";

static const char *VOCAB_USAGE =
    "usage: perfcell-shard vocab IN... --out vocab.tsv [options]\n"
    "\n"
    "Write the union of the inputs' genes, in first-seen order, as a vocabulary: one gene\n"
    "per line, 'symbol' or 'symbol<TAB>ensembl_id'. Genes are the same when their Ensembl\n"
    "ids agree, or, when one side has no id, their symbols.\n"
    "\n"
    "options:\n"
    "  --out FILE          the vocabulary to write (required)\n"
    "  --min-cells N       keep only genes with counts in at least N cells (reads the counts)\n"
    "  --use-raw           .h5ad: genes of raw/var (the genes of raw/X)\n"
    "  --layer NAME        .h5ad: read layers/NAME (with --min-cells)\n"
    "  --genome NAME|all   10x HDF5: genes of one genome, or of all of them\n"
    "  --force             replace an existing vocabulary file\n"
    "  --quiet             print nothing but errors\n";

static const char *BUILD_USAGE =
    "usage: mpirun -np N perfcell-shard build IN... --vocab V --out DIR [options]\n"
    "\n"
    "Write the inputs' cells (inputs in order, cells in input order) as a shard folder:\n"
    "shard-NNNNN.h5ad files (AnnData, raw counts in vocabulary order, Zstandard-compressed),\n"
    "vocab.tsv and manifest.tsv. The result does not depend on N. The folder is written\n"
    "as DIR.partial and renamed into place; while a build runs, DIR.lock names its host\n"
    "and pid, and a second build into the same DIR is refused.\n"
    "\n"
    "options:\n"
    "  --vocab FILE        the gene vocabulary (required; make one with `perfcell-shard vocab`)\n"
    "  --out DIR           the shard folder to create (required)\n"
    "  --force             replace an existing shard folder\n"
    "  --shard-cells N     cells per shard (default 131072)\n"
    "  --label-key COL     labels from obs column COL (.h5ad), or column COL of --labels\n"
    "  --labels FILE       labels from a barcode<TAB>label file (optional header line)\n"
    "  --layer NAME        .h5ad: counts in layers/NAME instead of X\n"
    "  --use-raw           .h5ad: counts in raw/X (genes from raw/var)\n"
    "  --genome NAME|all   10x HDF5: one genome, or all of them (CellRanger v2 files with\n"
    "                      several genomes need it)\n"
    "  --dataset-name NAME name of an input in the shards (once per input, in order;\n"
    "                      default: from the file or folder name)\n"
    "  --chunk-elems N     HDF5 chunk of X/data and X/indices, in values (default 65536)\n"
    "  --level L           Zstandard level 1..22 (default 9)\n"
    "  --piece-cells N     cells each rank reads and writes at a time (default 8192;\n"
    "                      lower it to use less memory)\n"
    "  --quiet             print nothing but errors\n"
    "\n"
    "Input that is not raw counts (negative, non-integer, NaN values) is refused; point at\n"
    "the counts with --layer or --use-raw.\n";

typedef struct {
    const char *name;
    int takes_value;
    int vocab, build; // accepted by the subcommand
} OptSpec;

static const OptSpec OPTS[] = {
    {"--out", 1, 1, 1},        {"--vocab", 1, 0, 1},     {"--force", 0, 1, 1},
    {"--shard-cells", 1, 0, 1}, {"--label-key", 1, 0, 1}, {"--labels", 1, 0, 1},
    {"--layer", 1, 1, 1},      {"--use-raw", 0, 1, 1},   {"--genome", 1, 1, 1},
    {"--dataset-name", 1, 0, 1}, {"--chunk-elems", 1, 0, 1}, {"--level", 1, 0, 1},
    {"--piece-cells", 1, 0, 1}, {"--min-cells", 1, 1, 0}, {"--quiet", 0, 1, 1},
    {"--help", 0, 1, 1},
};
#define N_OPTS (sizeof OPTS / sizeof *OPTS)

typedef struct {
    int is_build;
    const char **inputs;
    size_t n_inputs;
    const char **names;
    size_t n_names;
    const char *out, *vocab, *label_key, *labels, *layer, *genome;
    int use_raw, force, quiet;
    long shard_cells, chunk, level, piece, min_cells;
} Args;

static long parse_count(const char *opt, const char *v, long lo, long hi) {
    long x;
    if (str_to_long(v, &x) != 0 || x < lo || x > hi) {
        char hint[128];
        snprintf(hint, sizeof hint, "%s takes a whole number from %ld to %ld", opt, lo, hi);
        DIE_HINT(hint, "bad value '%s' for %s", v, opt);
    }
    return x;
}

static void parse(int argc, char **argv, Args *a) {
    const char *usage = a->is_build ? BUILD_USAGE : VOCAB_USAGE;
    a->inputs = xcalloc((size_t)argc, sizeof *a->inputs);
    a->names = xcalloc((size_t)argc, sizeof *a->names);
    a->shard_cells = SHARD_DEFAULT_CELLS;
    a->chunk = SHARD_DEFAULT_CHUNK;
    a->level = SHARD_DEFAULT_LEVEL;
    a->piece = SHARD_DEFAULT_PIECE;
    for (int i = 2; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "--", 2) != 0 || strcmp(arg, "--") == 0) {
            a->inputs[a->n_inputs++] = arg;
            continue;
        }
        const OptSpec *o = NULL;
        for (size_t k = 0; k < N_OPTS; k++)
            if (strcmp(OPTS[k].name, arg) == 0) o = &OPTS[k];
        if (!o || !(a->is_build ? o->build : o->vocab)) {
            const char *best = NULL;
            size_t best_d = 4;
            for (size_t k = 0; k < N_OPTS; k++) {
                if (!(a->is_build ? OPTS[k].build : OPTS[k].vocab)) continue;
                size_t d = str_edit_distance(arg, OPTS[k].name);
                if (d < best_d) {
                    best_d = d;
                    best = OPTS[k].name;
                }
            }
            char hint[256];
            if (best)
                snprintf(hint, sizeof hint, "did you mean %s? (perfcell-shard %s --help lists the options)",
                         best, argv[1]);
            else
                snprintf(hint, sizeof hint, "perfcell-shard %s --help lists the options", argv[1]);
            DIE_HINT(hint, "unknown option '%s' for perfcell-shard %s", arg, argv[1]);
        }
        if (strcmp(arg, "--help") == 0) {
            if (mpienv_rank() == 0) fputs(usage, stdout);
            mpienv_finalize();
            exit(0);
        }
        const char *v = NULL;
        if (o->takes_value) {
            if (i + 1 >= argc) {
                char hint[128];
                snprintf(hint, sizeof hint, "write %s VALUE", arg);
                DIE_HINT(hint, "option %s needs a value", arg);
            }
            v = argv[++i];
        }
        if (strcmp(arg, "--out") == 0) a->out = v;
        else if (strcmp(arg, "--vocab") == 0) a->vocab = v;
        else if (strcmp(arg, "--force") == 0) a->force = 1;
        else if (strcmp(arg, "--quiet") == 0) a->quiet = 1;
        else if (strcmp(arg, "--use-raw") == 0) a->use_raw = 1;
        else if (strcmp(arg, "--label-key") == 0) a->label_key = v;
        else if (strcmp(arg, "--labels") == 0) a->labels = v;
        else if (strcmp(arg, "--layer") == 0) a->layer = v;
        else if (strcmp(arg, "--genome") == 0) a->genome = v;
        else if (strcmp(arg, "--dataset-name") == 0) a->names[a->n_names++] = v;
        else if (strcmp(arg, "--shard-cells") == 0) a->shard_cells = parse_count(arg, v, 1, 1L << 30);
        else if (strcmp(arg, "--chunk-elems") == 0) a->chunk = parse_count(arg, v, 256, 1L << 26);
        else if (strcmp(arg, "--level") == 0) a->level = parse_count(arg, v, 1, 22);
        else if (strcmp(arg, "--piece-cells") == 0) a->piece = parse_count(arg, v, 1, 1L << 24);
        else if (strcmp(arg, "--min-cells") == 0) a->min_cells = parse_count(arg, v, 0, 1L << 40);
    }
    if (a->n_inputs == 0) DIE_HINT(usage, "no inputs given");
    if (!a->out) DIE_HINT(usage, "--out is required");
    if (a->is_build && !a->vocab)
        DIE_HINT("make a vocabulary with `perfcell-shard vocab IN... --out vocab.tsv` and pass "
                 "--vocab vocab.tsv",
                 "--vocab is required");
    if (a->use_raw && a->layer) DIE_HINT("pass one of them", "--use-raw and --layer both name the matrix to read");
    if (a->n_names && a->n_names != a->n_inputs) {
        char hint[128];
        snprintf(hint, sizeof hint, "give --dataset-name once per input (%zu inputs)", a->n_inputs);
        DIE_HINT(hint, "%zu --dataset-name for %zu inputs", a->n_names, a->n_inputs);
    }
    if (a->labels && !a->is_build) DIE("--labels applies to build only");
}

// Every rank failed the same way (agreed): rank 0 reports and ends the job.
static _Noreturn void die_agreed(void) {
    if (mpienv_rank() == 0) error_die(__FILE__, __LINE__, error_last_hint(), "%s", error_last());
    // Rank 0's MPI_Abort ends this process.
    MPI_Barrier(MPI_COMM_WORLD);
    for (;;) pause();
}

static Input **open_inputs(const Args *a) {
    InputOptions io = {.layer = a->layer,
                       .use_raw = a->use_raw,
                       .genome = a->genome,
                       .label_key = a->label_key,
                       .labels_tsv = a->labels};
    Input **in = xcalloc(a->n_inputs, sizeof *in);
    int rc = 0;
    for (size_t i = 0; i < a->n_inputs && rc == 0; i++) {
        in[i] = input_open(a->inputs[i], &io);
        if (!in[i]) rc = -1;
    }
    if (shard_agree(rc, MPI_COMM_WORLD) != 0) die_agreed();
    // Options that some formats do not use.
    int any_h5ad = 0, any_10x = 0;
    for (size_t i = 0; i < a->n_inputs; i++) {
        any_h5ad |= in[i]->format == INPUT_H5AD;
        any_10x |= in[i]->format == INPUT_10X_H5;
    }
    if (mpienv_rank() == 0) {
        if ((a->layer || a->use_raw) && !any_h5ad)
            log_warn("%s applies to .h5ad inputs only; ignored", a->layer ? "--layer" : "--use-raw");
        if (a->genome && !any_10x) log_warn("--genome applies to 10x HDF5 inputs only; ignored");
    }
    for (size_t i = 0; i < a->n_inputs; i++) {
        const Input *x = in[i];
        log_info("input %zu: %s: %s, %zu cells x %zu genes%s%s", i, x->path, input_describe(x),
                 x->n_cells, x->n_genes, x->genomes ? ", genome " : "", x->genomes ? x->genomes : "");
        if (x->n_skipped)
            log_info("  left out %zu features that are not genes of the genome(s) read (%s)",
                     x->n_skipped, x->skipped_what ? x->skipped_what : "");
        if (x->label_key) {
            size_t labelled = 0;
            for (size_t k = 0; k < x->n_cells; k++) labelled += x->label_codes[k] >= 0;
            log_info("  labels '%s' from %s: %zu categories, %zu cells labelled, %zu unlabelled",
                     x->label_key, x->label_source, x->n_label_names, labelled,
                     x->n_cells - labelled);
            if (x->tsv_unmatched)
                log_info("  %zu rows of %s name no cell of this input", x->tsv_unmatched,
                         x->label_source);
        }
    }
    return in;
}

static void close_inputs(Input **in, size_t n) {
    for (size_t i = 0; i < n; i++) input_close(in[i]);
    free(in);
}

static int cmd_vocab(const Args *a) {
    int rank = mpienv_rank();
    int rc = 0;
    if (rank == 0 && path_exists(a->out) && !a->force) {
        error_set("vocabulary '%s' already exists", a->out);
        rc = error_set_hint("pass --force to replace it, or choose another --out");
    }
    if (shard_agree(rc, MPI_COMM_WORLD) != 0) die_agreed();
    Input **in = open_inputs(a);
    Vocab v;
    size_t n_union = 0;
    if (shard_vocab_build(&v, in, a->n_inputs, a->min_cells, MPI_COMM_WORLD, &n_union) != 0)
        die_agreed();
    if (v.n == 0) {
        error_set("the vocabulary would be empty (%zu genes in the inputs, none in %ld cells or more)",
                  n_union, a->min_cells);
        error_set_hint("lower --min-cells");
        die_agreed();
    }
    rc = rank == 0 ? vocab_save(&v, a->out) : 0;
    if (shard_agree(rc, MPI_COMM_WORLD) != 0) die_agreed();
    char hash[17];
    vocab_hash_format(vocab_hash(&v), hash);
    if (a->min_cells > 0)
        log_info("vocabulary: %zu genes of the %zu of the inputs have counts in >= %ld cells", v.n,
                 n_union, a->min_cells);
    log_info("wrote %s: %zu genes, hash %s", a->out, v.n, hash);
    vocab_free(&v);
    close_inputs(in, a->n_inputs);
    return 0;
}

// One build per --out: rank 0 locks OUT.lock, next to the folder, before
// anything is written (the folder above OUT is created when missing, and
// removed again if the build is refused before it starts writing).
static int out_lock(RunLock *lock, const char *out) {
    size_t n = strlen(out);
    while (n > 1 && out[n - 1] == '/') n--;
    char *path = xmalloc(n + 8);
    memcpy(path, out, n);
    strcpy(path + n, ".lock");
    char *copy = xstrdup(path);
    char *parent = dirname(copy);
    char *top = path_first_missing(parent);
    int rc = path_mkdir_p(parent);
    if (rc == 0) rc = runlock_acquire(lock, path, out);
    if (rc == 0) runlock_own_folder(lock, parent, top);
    free(top);
    free(copy);
    free(path);
    return rc;
}

static int cmd_build(const Args *a) {
    RunLock lock;
    runlock_init(&lock);
    int rc = mpienv_rank() == 0 ? out_lock(&lock, a->out) : 0;
    if (shard_agree(rc, MPI_COMM_WORLD) != 0) die_agreed();
    rc = mpienv_rank() == 0 ? shard_out_check(a->out, a->force) : 0;
    if (shard_agree(rc, MPI_COMM_WORLD) != 0) die_agreed();
    Vocab v;
    rc = vocab_load(&v, a->vocab);
    if (shard_agree(rc, MPI_COMM_WORLD) != 0) die_agreed();
    char hash[17];
    vocab_hash_format(vocab_hash(&v), hash);
    log_info("vocabulary %s: %zu genes, hash %s", a->vocab, v.n, hash);
    Input **in = open_inputs(a);
    ShardBuildOptions o;
    shard_build_options_default(&o);
    o.out = a->out;
    o.force = a->force;
    o.shard_cells = (size_t)a->shard_cells;
    o.chunk_elems = (size_t)a->chunk;
    o.level = (int)a->level;
    o.piece_cells = (size_t)a->piece;
    o.dataset_names = a->n_names ? a->names : NULL;
    ShardBuildReport rep;
    runlock_keep_folder(&lock);
    if (shard_build(&o, in, a->n_inputs, &v, MPI_COMM_WORLD, &rep) != 0) die_agreed();
    if (mpienv_rank() == 0 && !a->quiet) {
        shard_build_report_print(&rep, stdout);
        printf("shard folder: %s\n", a->out);
        fflush(stdout);
    }
    shard_build_report_free(&rep);
    close_inputs(in, a->n_inputs);
    vocab_free(&v);
    // Every rank is done with the folder before the lock goes.
    MPI_Barrier(MPI_COMM_WORLD);
    runlock_release(&lock);
    return 0;
}

int main(int argc, char **argv) {
    // Before MPI starts: a size limit met while it sets up must fail a write, not kill.
    shard_signals_install();
    mpienv_init(&argc, &argv);
    // A file-size limit (ulimit -f) must fail a write with EFBIG and a message
    // (the partial folder removed), not kill the process.
    signal(SIGXFSZ, SIG_IGN);
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        if (mpienv_rank() == 0) fputs(USAGE, argc < 2 ? stderr : stdout);
        mpienv_finalize();
        return argc < 2 ? 2 : 0;
    }
    Args a;
    memset(&a, 0, sizeof a);
    if (strcmp(argv[1], "build") == 0)
        a.is_build = 1;
    else if (strcmp(argv[1], "vocab") != 0)
        DIE_HINT("the commands are `vocab` and `build`; perfcell-shard --help says more",
                 "unknown command '%s'", argv[1]);
    parse(argc, argv, &a);
    if (a.quiet) log_set_level(LOG_QUIET);
    int rc = a.is_build ? cmd_build(&a) : cmd_vocab(&a);
    free(a.inputs);
    free(a.names);
    mpienv_finalize();
    return rc;
}

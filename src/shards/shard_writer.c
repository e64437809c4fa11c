// Writing shard folders in parallel (see include/perfcell/shard_writer.h).
#include "perfcell/shard_writer.h"

#include "perfcell/error.h"
#include "perfcell/h5util.h"
#include "perfcell/log.h"
#include "perfcell/manifest.h"
#include "perfcell/util.h"
#include "perfcell/zstd_filter.h"

#include <dirent.h>
#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

// Values per read when checksumming a shard.
#define CRC_PIECE ((size_t)1 << 20)

void shard_build_options_default(ShardBuildOptions *o) {
    memset(o, 0, sizeof *o);
    o->shard_cells = SHARD_DEFAULT_CELLS;
    o->chunk_elems = SHARD_DEFAULT_CHUNK;
    o->level = SHARD_DEFAULT_LEVEL;
    o->piece_cells = SHARD_DEFAULT_PIECE;
}

// ---------------------------------------------------------------------------
// Agreement between ranks

#define AGREE_LEN 1024

static volatile sig_atomic_t g_stop_signal = 0;

static void on_stop_signal(int sig) { g_stop_signal = sig; }

void shard_signals_install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGXFSZ, SIG_IGN);
}

// `stoppable`: a stop signal fails the agreement (not once the output is published).
static int agree(int rc, MPI_Comm comm, int stoppable) {
    int rank = 0, mine, first = INT_MAX;
    CHECK_MPI(MPI_Comm_rank(comm, &rank));
    int sig = stoppable ? g_stop_signal : 0;
    if (rc == 0 && sig) {
        error_set("stopped by %s", sig == SIGINT ? "SIGINT" : "SIGTERM");
        rc = -1;
    }
    mine = rc != 0 ? rank : INT_MAX;
    CHECK_MPI(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm));
    if (first == INT_MAX) return 0;
    char buf[2 * AGREE_LEN];
    memset(buf, 0, sizeof buf);
    if (rank == first) {
        snprintf(buf, AGREE_LEN, "%s", error_last());
        const char *h = error_last_hint();
        snprintf(buf + AGREE_LEN, AGREE_LEN, "%s", h ? h : "");
    }
    CHECK_MPI(MPI_Bcast(buf, (int)sizeof buf, MPI_CHAR, first, comm));
    error_set("%s", buf);
    if (buf[AGREE_LEN]) error_set_hint("%s", buf + AGREE_LEN);
    return -1;
}

int shard_agree(int rc, MPI_Comm comm) { return agree(rc, comm, 1); }

// ---------------------------------------------------------------------------
// The output folder

// Files a build writes in a shard folder (and the temporary files of atomic writes).
static int shard_file_name(const char *name) {
    return strcmp(name, SHARD_MANIFEST_FILE) == 0 || strcmp(name, SHARD_VOCAB_FILE) == 0 ||
           (strncmp(name, "shard-", 6) == 0 && str_ends_with(name, ".h5ad")) ||
           strstr(name, ".tmp.") != NULL;
}

// The first member of `dir` that a build does not write, or "" (buf).
static int foreign_member(const char *dir, char *buf, size_t len) {
    buf[0] = '\0';
    DIR *d = opendir(dir);
    if (!d) return error_set("cannot list folder '%s': %s", dir, strerror(errno));
    for (struct dirent *e = readdir(d); e; e = readdir(d)) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        char *p = path_join(dir, e->d_name);
        int is_dir = path_is_dir(p);
        free(p);
        if (is_dir || !shard_file_name(e->d_name)) {
            snprintf(buf, len, "%s", e->d_name);
            break;
        }
    }
    closedir(d);
    return 0;
}

// Remove a folder holding only files a build writes.
static int remove_shard_folder(const char *dir) {
    char foreign[256];
    if (foreign_member(dir, foreign, sizeof foreign) != 0) return -1;
    if (foreign[0])
        return error_set("'%s' holds '%s', which a shard build does not write; not removing it",
                         dir, foreign);
    DIR *d = opendir(dir);
    if (!d) return error_set("cannot list folder '%s': %s", dir, strerror(errno));
    int rc = 0;
    for (struct dirent *e = readdir(d); e; e = readdir(d)) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        char *p = path_join(dir, e->d_name);
        if (unlink(p) != 0) rc = error_set("cannot remove '%s': %s", p, strerror(errno));
        free(p);
    }
    closedir(d);
    if (rc == 0 && rmdir(dir) != 0) rc = error_set("cannot remove folder '%s': %s", dir, strerror(errno));
    return rc;
}

int shard_out_check(const char *out, int force) {
    if (!path_exists(out)) return 0;
    if (!path_is_dir(out)) {
        error_set("output '%s' exists and is not a folder", out);
        return error_set_hint("choose another --out");
    }
    if (!force) {
        error_set("output folder '%s' already exists", out);
        return error_set_hint("pass --force to replace it, or choose another --out");
    }
    char foreign[256];
    if (foreign_member(out, foreign, sizeof foreign) != 0) return -1;
    if (foreign[0]) {
        error_set("output folder '%s' holds '%s', which is not part of a shard folder; not "
                  "replacing it, even with --force",
                  out, foreign);
        return error_set_hint("choose another --out, or empty the folder yourself");
    }
    return 0;
}

// ---------------------------------------------------------------------------
// The build context

typedef struct {
    const ShardBuildOptions *opt;
    Input *const *in;
    size_t n_in;
    const Vocab *vocab;
    MPI_Comm comm;
    int rank, size;
    char hash[17];
    int64_t n_cells;
    int64_t *start;        // (n_in + 1) global id of each input's first cell
    char **names;          // (n_in) dataset names
    VocabMap *maps;        // (n_in)
    const char *label_key; // NULL: no labels
    size_t n_labels;
    char **labels;         // (n_labels) global categories, sorted
    int64_t *label_counts; // (n_labels)
    int32_t **label_xl;    // (n_in) input code -> global code
    int64_t *empty;        // (n_in) empty cells read by this rank
    CountsCheck *checks;   // (n_in) what this rank read
    char *tmp;             // <out>.partial
} Ctx;

// Dataset names from the paths: file or folder name without extension; 10x
// default names ("filtered_feature_bc_matrix") take the name of the folder
// above (skipping CellRanger's "outs").
static char *name_from_path(const char *path) {
    char *p = xstrdup(path);
    size_t n = strlen(p);
    while (n > 1 && p[n - 1] == '/') p[--n] = '\0';
    char *base = strrchr(p, '/');
    char *stem = xstrdup(base ? base + 1 : p);
    static const char *exts[] = {".h5ad", ".h5", ".hdf5", ".mtx.gz", ".mtx"};
    for (size_t i = 0; i < sizeof exts / sizeof *exts; i++) {
        if (str_ends_with(stem, exts[i]) && strlen(stem) > strlen(exts[i])) {
            stem[strlen(stem) - strlen(exts[i])] = '\0';
            break;
        }
    }
    int generic = (strncmp(stem, "filtered_", 9) == 0 || strncmp(stem, "raw_", 4) == 0 ||
                   strcmp(stem, "matrix") == 0) &&
                  (strstr(stem, "bc_matri") || strcmp(stem, "matrix") == 0);
    // A matrix.mtx file names its folder.
    if (strcmp(stem, "matrix") == 0 || generic) {
        for (int up = 0; up < 3 && base; up++) {
            *base = '\0';
            base = strrchr(p, '/');
            const char *parent = base ? base + 1 : p;
            if (!parent[0] || strcmp(parent, ".") == 0 || strcmp(parent, "..") == 0) break;
            int skip = strcmp(parent, "outs") == 0 || strstr(parent, "bc_matri") != NULL;
            if (!skip) {
                free(stem);
                stem = xstrdup(parent);
                break;
            }
        }
    }
    free(p);
    return stem;
}

static int has_control(const char *s) {
    for (; *s; s++)
        if (*s == '\t' || *s == '\n' || *s == '\r') return 1;
    return 0;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int ctx_init(Ctx *c) {
    const ShardBuildOptions *o = c->opt;
    if (o->shard_cells == 0 || o->chunk_elems == 0 || o->piece_cells == 0 || o->level < 1 ||
        o->level > 22)
        return error_set("bad build options (shard cells %zu, chunk %zu, piece %zu, level %d)",
                         o->shard_cells, o->chunk_elems, o->piece_cells, o->level);
    vocab_hash_format(vocab_hash(c->vocab), c->hash);
    c->start = xcalloc(c->n_in + 1, sizeof *c->start);
    for (size_t i = 0; i < c->n_in; i++) c->start[i + 1] = c->start[i] + (int64_t)c->in[i]->n_cells;
    c->n_cells = c->start[c->n_in];
    if (c->n_cells == 0) {
        error_set("the inputs hold no cells");
        return error_set_hint("check the inputs");
    }

    // Dataset names: given, or from the paths; unique, without tabs.
    c->names = xcalloc(c->n_in, sizeof *c->names);
    StrSet seen = {0};
    for (size_t i = 0; i < c->n_in; i++) {
        if (o->dataset_names) {
            c->names[i] = xstrdup(o->dataset_names[i]);
        } else {
            char *base = name_from_path(c->in[i]->path);
            c->names[i] = xstrdup(base);
            for (int k = 2; str_set_find(&seen, c->names[i]) >= 0; k++) {
                free(c->names[i]);
                c->names[i] = xmalloc(strlen(base) + 16);
                sprintf(c->names[i], "%s_%d", base, k);
            }
            free(base);
        }
        if (!c->names[i][0] || has_control(c->names[i])) {
            str_set_free(&seen);
            error_set("dataset name '%s' is empty or holds a tab or newline", c->names[i]);
            return error_set_hint("pass --dataset-name with a plain name for every input");
        }
        if (str_set_find(&seen, c->names[i]) >= 0) {
            str_set_free(&seen);
            error_set("dataset name '%s' is given twice", c->names[i]);
            return error_set_hint("give every input its own --dataset-name");
        }
        str_set_add(&seen, c->names[i]);
        if (has_control(c->in[i]->path)) {
            str_set_free(&seen);
            return error_set("input path '%s' holds a tab or newline", c->in[i]->path);
        }
    }
    str_set_free(&seen);

    // Vocabulary maps.
    c->maps = xcalloc(c->n_in, sizeof *c->maps);
    for (size_t i = 0; i < c->n_in; i++)
        vocab_map_build(&c->maps[i], c->vocab, c->in[i]->symbols, c->in[i]->ids, c->in[i]->n_genes);

    // Labels: one key, and the union of the used categories, sorted, so that
    // codes agree in every shard whatever the number of ranks.
    c->label_key = c->in[0]->label_key;
    for (size_t i = 0; i < c->n_in; i++) {
        if ((c->in[i]->label_key != NULL) != (c->label_key != NULL) ||
            (c->label_key && strcmp(c->in[i]->label_key, c->label_key) != 0))
            return error_set("inputs disagree on the label column ('%s' and '%s')",
                             c->label_key ? c->label_key : "-",
                             c->in[i]->label_key ? c->in[i]->label_key : "-");
    }
    if (c->label_key) {
        static const char *reserved[] = {"cell", "cell_id", "total_counts", "dataset"};
        for (size_t k = 0; k < 4; k++) {
            if (strcmp(c->label_key, reserved[k]) == 0) {
                error_set("label column '%s' has the name of a column shards always have", c->label_key);
                return error_set_hint("labels cannot be stored as obs/cell, cell_id, total_counts "
                                      "or dataset; rename the column (or the TSV header)");
            }
        }
        if (!c->label_key[0] || has_control(c->label_key) || strchr(c->label_key, '/'))
            return error_set("label column name '%s' is empty or holds a tab, newline or '/'",
                             c->label_key);
        StrSet all = {0};
        for (size_t i = 0; i < c->n_in; i++) {
            const Input *in = c->in[i];
            unsigned char *used = xcalloc(in->n_label_names + 1, 1);
            for (size_t k = 0; k < in->n_cells; k++)
                if (in->label_codes[k] >= 0) used[in->label_codes[k]] = 1;
            for (size_t k = 0; k < in->n_label_names; k++)
                if (used[k]) str_set_add(&all, in->label_names[k]);
            free(used);
        }
        c->labels = str_set_take(&all, &c->n_labels);
        qsort(c->labels, c->n_labels, sizeof *c->labels, cmp_str);
        for (size_t k = 0; k < c->n_labels; k++) {
            if (has_control(c->labels[k])) {
                error_set("label '%s' holds a tab or newline", c->labels[k]);
                return error_set_hint("the manifest lists labels one per line; clean the labels");
            }
        }
        StrIndex idx;
        str_index_build(&idx, c->labels, c->n_labels);
        c->label_counts = xcalloc(c->n_labels + 1, sizeof *c->label_counts);
        c->label_xl = xcalloc(c->n_in, sizeof *c->label_xl);
        for (size_t i = 0; i < c->n_in; i++) {
            const Input *in = c->in[i];
            c->label_xl[i] = xmalloc((in->n_label_names + 1) * sizeof **c->label_xl);
            for (size_t k = 0; k < in->n_label_names; k++)
                c->label_xl[i][k] = str_index_find(&idx, in->label_names[k]);
            for (size_t k = 0; k < in->n_cells; k++)
                if (in->label_codes[k] >= 0) c->label_counts[c->label_xl[i][in->label_codes[k]]]++;
        }
        str_index_free(&idx);
    }
    c->empty = xcalloc(c->n_in, sizeof *c->empty);
    c->checks = xmalloc(c->n_in * sizeof *c->checks);
    for (size_t i = 0; i < c->n_in; i++) counts_check_init(&c->checks[i]);
    return 0;
}

static void ctx_free(Ctx *c) {
    for (size_t i = 0; i < c->n_in; i++) {
        if (c->names) free(c->names[i]);
        if (c->maps) vocab_map_free(&c->maps[i]);
        if (c->label_xl) free(c->label_xl[i]);
    }
    free(c->names);
    free(c->maps);
    free(c->label_xl);
    h5_free_strings(c->labels, c->n_labels);
    free(c->label_counts);
    free(c->start);
    free(c->empty);
    free(c->checks);
    free(c->tmp);
}

// ---------------------------------------------------------------------------
// Counts check over ranks

// Collective: add up the checks of every rank.
static void counts_check_allreduce(CountsCheck *c, MPI_Comm comm) {
    int64_t sums[5] = {c->n_values, c->n_negative, c->n_nonfinite, c->n_fraction, c->n_large};
    CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, sums, 5, MPI_INT64_T, MPI_SUM, comm));
    double mx = c->max_value;
    CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, &mx, 1, MPI_DOUBLE, MPI_MAX, comm));
    int size = 1;
    CHECK_MPI(MPI_Comm_size(comm, &size));
    double mine[3] = {(double)c->bad_cell, (double)c->bad_gene, c->bad_value};
    double *all = xmalloc((size_t)size * 3 * sizeof *all);
    CHECK_MPI(MPI_Allgather(mine, 3, MPI_DOUBLE, all, 3, MPI_DOUBLE, comm));
    CountsCheck r;
    counts_check_init(&r);
    r.n_values = sums[0];
    r.n_negative = sums[1];
    r.n_nonfinite = sums[2];
    r.n_fraction = sums[3];
    r.n_large = sums[4];
    r.max_value = mx;
    for (int k = 0; k < size; k++) {
        int64_t cell = (int64_t)all[3 * k];
        if (cell >= 0 && (r.bad_cell < 0 || cell < r.bad_cell)) {
            r.bad_cell = cell;
            r.bad_gene = (int64_t)all[3 * k + 1];
            r.bad_value = all[3 * k + 2];
        }
    }
    free(all);
    *c = r;
}

// Collective: check every value of input i (ranks share the cells) and fail
// with the full account. Called once values that are not counts were seen.
static int counts_refuse(Ctx *c, size_t i) {
    Input *in = c->in[i];
    size_t n = in->n_cells;
    size_t a = n * (size_t)c->rank / (size_t)c->size, b = n * (size_t)(c->rank + 1) / (size_t)c->size;
    CountsCheck total;
    counts_check_init(&total);
    InputRows rows;
    input_rows_init(&rows);
    int rc = 0;
    for (size_t x = a; x < b && rc == 0; x += c->opt->piece_cells) {
        size_t y = x + c->opt->piece_cells < b ? x + c->opt->piece_cells : b;
        rc = input_read_rows(in, x, y, &rows);
        if (rc == 0) counts_check_merge(&total, &rows.check);
    }
    input_rows_free(&rows);
    if (shard_agree(rc, c->comm) != 0) return -1;
    counts_check_allreduce(&total, c->comm);
    if (input_counts_verdict(in, &total) == 0)
        return error_set("%s: internal: values that are not counts were seen, then not found",
                         in->path);
    return -1;
}

// ---------------------------------------------------------------------------
// Reading a piece of cells

typedef struct {
    size_t n, cap;          // cells
    int64_t *ends;          // (n) end of each cell in gene/count
    int64_t *cell_id;       // (n)
    int64_t *total;         // (n)
    int32_t *dataset;       // (n)
    int32_t *label;         // (n)
    size_t nnz, cap_nnz;
    int32_t *gene, *count;  // (nnz) vocabulary order
    InputRows rows;
} Piece;

static void piece_free(Piece *p) {
    free(p->ends);
    free(p->cell_id);
    free(p->total);
    free(p->dataset);
    free(p->label);
    free(p->gene);
    free(p->count);
    input_rows_free(&p->rows);
    memset(p, 0, sizeof *p);
}

// Read and map global cells [a, b) of this rank.
static int piece_read(Ctx *c, int64_t a, int64_t b, Piece *p) {
    size_t n = (size_t)(b - a);
    if (n > p->cap) {
        p->cap = n;
        p->ends = xrealloc(p->ends, n * sizeof *p->ends);
        p->cell_id = xrealloc(p->cell_id, n * sizeof *p->cell_id);
        p->total = xrealloc(p->total, n * sizeof *p->total);
        p->dataset = xrealloc(p->dataset, n * sizeof *p->dataset);
        p->label = xrealloc(p->label, n * sizeof *p->label);
    }
    p->n = 0;
    p->nnz = 0;
    for (size_t i = 0; i < c->n_in && a < b; i++) {
        int64_t lo = a > c->start[i] ? a : c->start[i];
        int64_t hi = b < c->start[i + 1] ? b : c->start[i + 1];
        if (lo >= hi) continue;
        Input *in = c->in[i];
        size_t c0 = (size_t)(lo - c->start[i]), c1 = (size_t)(hi - c->start[i]);
        if (input_read_rows(in, c0, c1, &p->rows) != 0) return -1;
        counts_check_merge(&c->checks[i], &p->rows.check);
        if (p->nnz + p->rows.nnz > p->cap_nnz) {
            size_t cap = p->cap_nnz ? p->cap_nnz : 65536;
            while (cap < p->nnz + p->rows.nnz) cap *= 2;
            p->gene = xrealloc(p->gene, cap * sizeof *p->gene);
            p->count = xrealloc(p->count, cap * sizeof *p->count);
            p->cap_nnz = cap;
        }
        for (size_t k = 0; k < c1 - c0; k++) {
            const InputRows *r = &p->rows;
            int64_t got = vocab_map_row(&c->maps[i], r->gene + r->indptr[k], r->count + r->indptr[k],
                                        (size_t)(r->indptr[k + 1] - r->indptr[k]),
                                        p->gene + p->nnz, p->count + p->nnz);
            if (got < 0) {
                char msg[900];
                snprintf(msg, sizeof msg, "%s", error_last());
                return error_set("%s: cell %zu: %s", in->path, c0 + k, msg);
            }
            if (got == 0) c->empty[i]++;
            p->nnz += (size_t)got;
            size_t at = p->n++;
            p->ends[at] = (int64_t)p->nnz;
            p->cell_id[at] = c->start[i] + (int64_t)(c0 + k);
            p->total[at] = r->total[k];
            p->dataset[at] = (int32_t)i;
            int32_t code = in->label_codes ? in->label_codes[c0 + k] : -1;
            p->label[at] = code >= 0 ? c->label_xl[i][code] : -1;
        }
    }
    return 0;
}

// ---------------------------------------------------------------------------
// Phase 1: the numbers of a shard, written collectively

typedef struct {
    hid_t file, dxpl;
    hid_t data, indices, indptr, cell_id, total, dataset, label;
} ShardFile;

// A write into shard `path` failed on this rank (`err`: errno right after it).
// See shard_writer.h: no agreement, the sink ends every rank.
static _Noreturn void shard_write_die(const char *path, const char *what, int err) {
    char cause[320];
    path_write_cause(path, err, cause, sizeof cause);
    if (!cause[0]) {
        error_set_h5("%s", "HDF5");
        snprintf(cause, sizeof cause, "%s", error_last());
    }
    error_die(__FILE__, __LINE__,
              "make room on the output's file system (or raise the file size limit) and run the "
              "build again; the partial output is removed",
              "cannot write shard '%s' (%s): %s", path, what, cause);
}

// Collective (closing flushes the chunk and metadata caches): a failed flush
// ends the job (shard_write_die).
static void shard_file_close(ShardFile *f, const char *path) {
    hid_t *ids[] = {&f->data, &f->indices, &f->indptr, &f->cell_id, &f->total, &f->dataset, &f->label};
    errno = 0;
    for (size_t i = 0; i < sizeof ids / sizeof *ids; i++) {
        if (*ids[i] >= 0 && H5Dclose(*ids[i]) < 0) shard_write_die(path, "closing a dataset", errno);
        *ids[i] = H5I_INVALID_HID;
    }
    if (f->dxpl >= 0) H5Pclose(f->dxpl);
    if (f->file >= 0 && H5Fclose(f->file) < 0) shard_write_die(path, "closing the file", errno);
    f->dxpl = f->file = H5I_INVALID_HID;
}

static hid_t create_filtered(hid_t loc, const char *name, size_t chunk, int level) {
    hsize_t dim = 0, maxd = H5S_UNLIMITED, ch = chunk;
    unsigned cd = (unsigned)level;
    hid_t sp = H5Screate_simple(1, &dim, &maxd), dcpl = H5Pcreate(H5P_DATASET_CREATE), d = H5I_INVALID_HID;
    if (sp >= 0 && dcpl >= 0 && H5Pset_chunk(dcpl, 1, &ch) >= 0 && H5Pset_shuffle(dcpl) >= 0 &&
        H5Pset_filter(dcpl, ZSTD_FILTER_ID, H5Z_FLAG_MANDATORY, 1, &cd) >= 0 &&
        H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER) >= 0)
        d = H5Dcreate2(loc, name, H5T_STD_I32LE, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    if (dcpl >= 0) H5Pclose(dcpl);
    if (sp >= 0) H5Sclose(sp);
    return d;
}

static hid_t create_plain(hid_t loc, const char *name, hid_t type, size_t n) {
    hsize_t dim = n;
    hid_t sp = H5Screate_simple(1, &dim, NULL), dcpl = H5Pcreate(H5P_DATASET_CREATE), d = H5I_INVALID_HID;
    if (sp >= 0 && dcpl >= 0 && H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER) >= 0)
        d = H5Dcreate2(loc, name, type, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    if (dcpl >= 0) H5Pclose(dcpl);
    if (sp >= 0) H5Sclose(sp);
    return d;
}

static int shard_file_create(Ctx *c, const char *path, size_t n, ShardFile *f) {
    memset(f, 0xff, sizeof *f); // every id H5I_INVALID_HID (-1)
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS), g = H5I_INVALID_HID;
    int rc = -1;
    // The HDF5 1.8 file format: object headers (and so every attribute) carry
    // checksums that HDF5 verifies before using them.
    if (fapl < 0 || H5Pset_fapl_mpio(fapl, c->comm, MPI_INFO_NULL) < 0 ||
        H5Pset_libver_bounds(fapl, H5F_LIBVER_V18, H5F_LIBVER_V18) < 0 ||
        H5Pset_all_coll_metadata_ops(fapl, 1) < 0 || H5Pset_coll_metadata_write(fapl, 1) < 0) {
        error_set_h5("%s: cannot set up parallel HDF5", path);
        goto cleanup;
    }
    if ((f->file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, fapl)) < 0) {
        error_set_h5("cannot create shard '%s'", path);
        goto cleanup;
    }
    f->dxpl = H5Pcreate(H5P_DATASET_XFER);
    if (f->dxpl < 0 || H5Pset_dxpl_mpio(f->dxpl, H5FD_MPIO_COLLECTIVE) < 0) {
        error_set_h5("%s: cannot set collective transfers", path);
        goto cleanup;
    }
    const char *groups[] = {"X", "obs", "obs/dataset", c->label_key};
    for (size_t i = 0; i < 4; i++) {
        if (!groups[i]) continue;
        char name[1100];
        snprintf(name, sizeof name, "%s%s", i == 3 ? "obs/" : "", groups[i]);
        if ((g = H5Gcreate2(f->file, name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT)) < 0) {
            error_set_h5("%s: cannot create group %s", path, name);
            goto cleanup;
        }
        H5Gclose(g);
        g = H5I_INVALID_HID;
    }
    f->data = create_filtered(f->file, "X/data", c->opt->chunk_elems, c->opt->level);
    f->indices = create_filtered(f->file, "X/indices", c->opt->chunk_elems, c->opt->level);
    f->indptr = create_plain(f->file, "X/indptr", H5T_STD_I64LE, n + 1);
    f->cell_id = create_plain(f->file, "obs/cell_id", H5T_STD_I64LE, n);
    f->total = create_plain(f->file, "obs/total_counts", H5T_STD_I64LE, n);
    f->dataset = create_plain(f->file, "obs/dataset/codes", H5T_STD_I32LE, n);
    if (c->label_key) {
        char name[1100];
        snprintf(name, sizeof name, "obs/%s/codes", c->label_key);
        f->label = create_plain(f->file, name, H5T_STD_I32LE, n);
    }
    if (f->data < 0 || f->indices < 0 || f->indptr < 0 || f->cell_id < 0 || f->total < 0 ||
        f->dataset < 0 || (c->label_key && f->label < 0)) {
        error_set_h5("%s: cannot create the datasets", path);
        goto cleanup;
    }
    rc = 0;
cleanup:
    if (fapl >= 0) H5Pclose(fapl);
    return rc;
}

// Collective write of `count` values at `start` (count 0: an empty selection).
// A failed write ends the job (shard_write_die).
static int write_part(hid_t d, hid_t dxpl, hid_t memtype, int64_t start, size_t count,
                      const void *buf, const char *what, const char *path) {
    hsize_t st = (hsize_t)start, cn = count, one = 1;
    hid_t fs = H5Dget_space(d), ms = H5Screate_simple(1, count ? &cn : &one, NULL);
    int64_t dummy = 0;
    int rc = 0;
    if (fs < 0 || ms < 0) {
        rc = error_set_h5("cannot write %s", what);
    } else if (count) {
        if (H5Sselect_hyperslab(fs, H5S_SELECT_SET, &st, NULL, &cn, NULL) < 0)
            rc = error_set_h5("cannot select values of %s", what);
    } else if (H5Sselect_none(fs) < 0 || H5Sselect_none(ms) < 0) {
        rc = error_set_h5("cannot select nothing in %s", what);
    }
    errno = 0;
    if (rc == 0 && H5Dwrite(d, memtype, ms, fs, dxpl, count ? buf : (const void *)&dummy) < 0)
        shard_write_die(path, what, errno);
    if (ms >= 0) H5Sclose(ms);
    if (fs >= 0) H5Sclose(fs);
    return rc;
}

static int write_shard_numbers(Ctx *c, size_t s, const char *path, Piece *p) {
    int64_t s0 = (int64_t)(s * c->opt->shard_cells);
    int64_t s1 = s0 + (int64_t)c->opt->shard_cells < c->n_cells ? s0 + (int64_t)c->opt->shard_cells
                                                                : c->n_cells;
    size_t n = (size_t)(s1 - s0);
    ShardFile f;
    int rc = shard_file_create(c, path, n, &f);
    if ((rc = shard_agree(rc, c->comm)) != 0) goto cleanup;
    int64_t written = 0, per_round = (int64_t)(c->opt->piece_cells * (size_t)c->size);
    int64_t *ptr = NULL;
    size_t ptr_cap = 0;
    for (int64_t p0 = s0; p0 < s1; p0 += per_round) {
        int64_t p1 = p0 + per_round < s1 ? p0 + per_round : s1, len = p1 - p0;
        int64_t a = p0 + len * c->rank / c->size, b = p0 + len * (c->rank + 1) / c->size;
        rc = piece_read(c, a, b, p);
        if ((rc = shard_agree(rc, c->comm)) != 0) break;
        // Values that are not counts: refuse now, with the whole input's account.
        int bad = INT_MAX;
        for (size_t i = 0; i < c->n_in && bad == INT_MAX; i++)
            if (counts_check_bad(&c->checks[i]) > 0) bad = (int)i;
        CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, &bad, 1, MPI_INT, MPI_MIN, c->comm));
        if (bad != INT_MAX) {
            rc = counts_refuse(c, (size_t)bad);
            break;
        }
        int64_t nnz = (int64_t)p->nnz, off = 0, round_nnz = 0;
        CHECK_MPI(MPI_Exscan(&nnz, &off, 1, MPI_INT64_T, MPI_SUM, c->comm));
        if (c->rank == 0) off = 0;
        CHECK_MPI(MPI_Allreduce(&nnz, &round_nnz, 1, MPI_INT64_T, MPI_SUM, c->comm));
        hsize_t ext = (hsize_t)(written + round_nnz);
        errno = 0;
        if (H5Dset_extent(f.data, &ext) < 0) shard_write_die(path, "extending X/data", errno);
        if (H5Dset_extent(f.indices, &ext) < 0) shard_write_die(path, "extending X/indices", errno);
        // indptr: this rank's cell ends; the leading 0 comes with rank 0's first part.
        int lead = p0 == s0 && c->rank == 0;
        if (p->n + 1 > ptr_cap) {
            ptr_cap = p->n + 1;
            ptr = xrealloc(ptr, ptr_cap * sizeof *ptr);
        }
        if (lead) ptr[0] = 0;
        for (size_t k = 0; k < p->n; k++) ptr[lead + k] = written + off + p->ends[k];
        // Collective calls: every rank makes each of them, whatever failed before.
        int64_t at = a - s0;
        rc = 0;
        rc |= write_part(f.data, f.dxpl, H5T_NATIVE_INT32, written + off, p->nnz, p->count, "X/data", path);
        rc |= write_part(f.indices, f.dxpl, H5T_NATIVE_INT32, written + off, p->nnz, p->gene,
                         "X/indices", path);
        rc |= write_part(f.indptr, f.dxpl, H5T_NATIVE_INT64, lead ? 0 : at + 1, p->n + (size_t)lead,
                         ptr, "X/indptr", path);
        rc |= write_part(f.cell_id, f.dxpl, H5T_NATIVE_INT64, at, p->n, p->cell_id, "obs/cell_id", path);
        rc |= write_part(f.total, f.dxpl, H5T_NATIVE_INT64, at, p->n, p->total, "obs/total_counts", path);
        rc |= write_part(f.dataset, f.dxpl, H5T_NATIVE_INT32, at, p->n, p->dataset,
                         "obs/dataset/codes", path);
        if (c->label_key)
            rc |= write_part(f.label, f.dxpl, H5T_NATIVE_INT32, at, p->n, p->label, "labels", path);
        if ((rc = shard_agree(rc, c->comm)) != 0) break;
        written += round_nnz;
    }
    free(ptr);
cleanup:
    shard_file_close(&f, path);
    return rc != 0 ? -1 : 0;
}

// ---------------------------------------------------------------------------
// Phase 2: strings, attributes and checksums of a shard, by one rank

static int mark(hid_t loc, const char *name, const char *type, const char *version) {
    hid_t o = H5Oopen(loc, name, H5P_DEFAULT);
    if (o < 0) return error_set_h5("cannot open %s", name);
    int rc = h5_set_encoding(o, type, version);
    H5Oclose(o);
    return rc;
}

// Strings as fixed-width UTF-8 (width of the longest), chunked and compressed
// when there are many: variable-length strings live uncompressed in the HDF5
// heap at some 40 bytes of overhead each. h5py's asstr() (anndata) reads both.
static int write_string_array(hid_t loc, const char *name, const char *const *v, size_t n,
                              int level) {
    size_t w;
    char *buf = h5_pack_strings(v, n, &w);
    hsize_t dim = n, chunk = n < 16384 ? n : 16384;
    unsigned cd = (unsigned)level;
    hid_t t = H5Tcopy(H5T_C_S1), sp = H5Screate_simple(1, &dim, NULL);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE), d = H5I_INVALID_HID;
    int rc = 0;
    if (t < 0 || sp < 0 || dcpl < 0 || H5Tset_size(t, w) < 0 || H5Tset_cset(t, H5T_CSET_UTF8) < 0 ||
        H5Tset_strpad(t, H5T_STR_NULLPAD) < 0)
        rc = error_set_h5("cannot make the string type of %s", name);
    // Small arrays stay contiguous (a chunk would cost more than it saves).
    if (rc == 0 && n * w > 4096 &&
        (H5Pset_chunk(dcpl, 1, &chunk) < 0 ||
         H5Pset_filter(dcpl, ZSTD_FILTER_ID, H5Z_FLAG_MANDATORY, 1, &cd) < 0))
        rc = error_set_h5("cannot set the filters of %s", name);
    if (rc == 0 && (d = H5Dcreate2(loc, name, t, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT)) < 0)
        rc = error_set_h5("cannot create %s", name);
    if (rc == 0 && n > 0 && H5Dwrite(d, t, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0)
        rc = error_set_h5("cannot write %s", name);
    if (rc == 0) rc = h5_set_encoding(d, "string-array", "0.2.0");
    if (d >= 0) H5Dclose(d);
    if (dcpl >= 0) H5Pclose(dcpl);
    if (sp >= 0) H5Sclose(sp);
    if (t >= 0) H5Tclose(t);
    free(buf);
    return rc;
}

static int write_group(hid_t loc, const char *name, const char *type, const char *version) {
    hid_t g = H5Gcreate2(loc, name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (g < 0) return error_set_h5("cannot create group %s", name);
    int rc = h5_set_encoding(g, type, version);
    H5Gclose(g);
    return rc;
}

// AnnData's `ordered` attribute: numpy's bool as h5py writes it (an enum).
static int write_ordered_false(hid_t obj) {
    hid_t t = H5Tenum_create(H5T_NATIVE_INT8), s = H5Screate(H5S_SCALAR), a = H5I_INVALID_HID;
    int8_t no = 0, yes = 1;
    int rc = 0;
    if (t < 0 || s < 0 || H5Tenum_insert(t, "FALSE", &no) < 0 || H5Tenum_insert(t, "TRUE", &yes) < 0 ||
        (a = H5Acreate2(obj, "ordered", t, s, H5P_DEFAULT, H5P_DEFAULT)) < 0 ||
        H5Awrite(a, t, &no) < 0)
        rc = error_set_h5("cannot write attribute 'ordered'");
    if (a >= 0) H5Aclose(a);
    if (s >= 0) H5Sclose(s);
    if (t >= 0) H5Tclose(t);
    return rc;
}

static int write_categorical(hid_t file, const char *group, const char *const *cats, size_t n,
                             int level) {
    hid_t g = H5Gopen2(file, group, H5P_DEFAULT);
    if (g < 0) return error_set_h5("cannot open %s", group);
    int rc = h5_set_encoding(g, "categorical", "0.2.0");
    if (rc == 0) rc = write_ordered_false(g);
    if (rc == 0) rc = write_string_array(g, "categories", cats, n, level);
    if (rc == 0) rc = mark(g, "codes", "array", "0.2.0");
    H5Gclose(g);
    return rc;
}

static int write_scalar(hid_t g, const char *name, const int64_t *num, const char *str) {
    int rc = 0;
    if (str) {
        rc = h5_write_string_scalar(g, name, str);
    } else {
        hid_t s = H5Screate(H5S_SCALAR);
        hid_t d = H5Dcreate2(g, name, H5T_STD_I64LE, s, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        if (d < 0 || H5Dwrite(d, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, num) < 0)
            rc = error_set_h5("cannot write %s", name);
        if (d >= 0) H5Dclose(d);
        H5Sclose(s);
    }
    if (rc == 0) {
        hid_t d = H5Dopen2(g, name, H5P_DEFAULT);
        rc = d >= 0 ? h5_set_encoding(d, str ? "string" : "numeric-scalar", "0.2.0")
                    : error_set_h5("cannot reopen %s", name);
        if (d >= 0) H5Dclose(d);
    }
    return rc;
}

static int crc_dataset(hid_t file, const char *name, hid_t memtype, size_t elem, uint32_t *crc,
                       const char *path) {
    hid_t d = H5Dopen2(file, name, H5P_DEFAULT);
    if (d < 0) return error_set_h5("%s: cannot open %s", path, name);
    hid_t fs = H5Dget_space(d);
    hssize_t n = fs >= 0 ? H5Sget_simple_extent_npoints(fs) : -1;
    int rc = n < 0 ? error_set_h5("%s: cannot read the size of %s", path, name) : 0;
    void *buf = xmalloc(CRC_PIECE * elem);
    for (hsize_t at = 0; rc == 0 && at < (hsize_t)n; at += CRC_PIECE) {
        hsize_t cn = (hsize_t)n - at < CRC_PIECE ? (hsize_t)n - at : CRC_PIECE;
        hid_t ms = H5Screate_simple(1, &cn, NULL);
        if (ms < 0 || H5Sselect_hyperslab(fs, H5S_SELECT_SET, &at, NULL, &cn, NULL) < 0 ||
            H5Dread(d, memtype, ms, fs, H5P_DEFAULT, buf) < 0)
            rc = error_set_h5("%s: cannot read back %s", path, name);
        else
            *crc = hash_crc32(*crc, buf, (size_t)cn * elem);
        if (ms >= 0) H5Sclose(ms);
    }
    free(buf);
    if (fs >= 0) H5Sclose(fs);
    H5Dclose(d);
    return rc;
}

static int crc_file(const char *path, uint32_t *crc, int64_t *bytes) {
    FILE *f = fopen(path, "rb");
    if (!f) return error_set("cannot open '%s' to checksum it: %s", path, strerror(errno));
    char *buf = xmalloc(1 << 20);
    uint32_t c = 0;
    int64_t total = 0;
    size_t got;
    while ((got = fread(buf, 1, 1 << 20, f)) > 0) {
        c = hash_crc32(c, buf, got);
        total += (int64_t)got;
    }
    int bad = ferror(f);
    fclose(f);
    free(buf);
    if (bad) return error_set("cannot read '%s' to checksum it", path);
    *crc = c;
    *bytes = total;
    return 0;
}

// Shard results gathered on every rank (int64 each).
enum { E_NNZ, E_CONTENT, E_BYTES, E_FILE, E_XSTORED, E_FIELDS };

static int finish_shard(Ctx *c, size_t s, const char *path, int64_t *e) {
    int64_t s0 = (int64_t)(s * c->opt->shard_cells);
    int64_t s1 = s0 + (int64_t)c->opt->shard_cells < c->n_cells ? s0 + (int64_t)c->opt->shard_cells
                                                                : c->n_cells;
    size_t n = (size_t)(s1 - s0);
    const Vocab *v = c->vocab;
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS), file = H5I_INVALID_HID, g = H5I_INVALID_HID;
    if (fapl >= 0 && H5Pset_libver_bounds(fapl, H5F_LIBVER_V18, H5F_LIBVER_V18) >= 0)
        file = H5Fopen(path, H5F_ACC_RDWR, fapl);
    if (fapl >= 0) H5Pclose(fapl);
    if (file < 0) return error_set_h5("cannot reopen shard '%s'", path);
    const char **cells = xmalloc((n ? n : 1) * sizeof *cells);
    size_t i = 0;
    for (int64_t id = s0; id < s1; id++) {
        while (c->start[i + 1] <= id) i++;
        cells[id - s0] = c->in[i]->cells[id - c->start[i]];
    }
    int64_t shape[2] = {(int64_t)n, (int64_t)v->n};
    const char *cols[] = {"cell_id", "total_counts", "dataset", c->label_key};
    const char *var_cols[] = {"gene_ids"};
    int64_t meta[3] = {SHARD_FORMAT_VERSION, (int64_t)s, s0};
    int lvl = c->opt->level;
    int rc = h5_set_encoding(file, "anndata", "0.1.0");
    if (rc == 0 && (g = H5Gopen2(file, "X", H5P_DEFAULT)) < 0) rc = error_set_h5("cannot open X");
    if (rc == 0) rc = h5_set_encoding(g, "csr_matrix", "0.1.0");
    if (rc == 0) rc = h5_attr_write_i64s(g, "shape", shape, 2);
    if (g >= 0) H5Gclose(g);
    g = H5I_INVALID_HID;
    // obs
    if (rc == 0 && (g = H5Gopen2(file, "obs", H5P_DEFAULT)) < 0) rc = error_set_h5("cannot open obs");
    if (rc == 0) rc = h5_set_encoding(g, "dataframe", "0.2.0");
    if (rc == 0) rc = h5_attr_write_string(g, "_index", "cell");
    if (rc == 0) rc = h5_attr_write_strings(g, "column-order", cols, c->label_key ? 4 : 3);
    if (rc == 0) rc = write_string_array(g, "cell", cells, n, lvl);
    if (rc == 0) rc = mark(g, "cell_id", "array", "0.2.0");
    if (rc == 0) rc = mark(g, "total_counts", "array", "0.2.0");
    if (g >= 0) H5Gclose(g);
    g = H5I_INVALID_HID;
    if (rc == 0) rc = write_categorical(file, "obs/dataset", (const char *const *)c->names, c->n_in, lvl);
    if (rc == 0 && c->label_key) {
        char name[1100];
        snprintf(name, sizeof name, "obs/%s", c->label_key);
        rc = write_categorical(file, name, (const char *const *)c->labels, c->n_labels, lvl);
    }
    // var
    if (rc == 0) rc = write_group(file, "var", "dataframe", "0.2.0");
    if (rc == 0 && (g = H5Gopen2(file, "var", H5P_DEFAULT)) < 0) rc = error_set_h5("cannot open var");
    if (rc == 0) rc = h5_attr_write_string(g, "_index", "gene");
    if (rc == 0) rc = h5_attr_write_strings(g, "column-order", var_cols, 1);
    if (rc == 0) rc = write_string_array(g, "gene", (const char *const *)v->symbols, v->n, lvl);
    if (rc == 0) rc = write_string_array(g, "gene_ids", (const char *const *)v->ids, v->n, lvl);
    if (g >= 0) H5Gclose(g);
    g = H5I_INVALID_HID;
    // uns and the empty dicts
    if (rc == 0) rc = write_group(file, "uns", "dict", "0.1.0");
    if (rc == 0) rc = write_group(file, "uns/perfcell", "dict", "0.1.0");
    if (rc == 0 && (g = H5Gopen2(file, "uns/perfcell", H5P_DEFAULT)) < 0)
        rc = error_set_h5("cannot open uns/perfcell");
    if (rc == 0) rc = write_scalar(g, "format_version", &meta[0], NULL);
    if (rc == 0) rc = write_scalar(g, "vocab_hash", NULL, c->hash);
    if (rc == 0) rc = write_scalar(g, "shard_index", &meta[1], NULL);
    if (rc == 0) rc = write_scalar(g, "first_cell", &meta[2], NULL);
    if (rc == 0) rc = write_scalar(g, "label_key", NULL, c->label_key ? c->label_key : "");
    if (g >= 0) H5Gclose(g);
    g = H5I_INVALID_HID;
    static const char *dicts[] = {"layers", "obsm", "varm", "obsp", "varp"};
    for (size_t k = 0; k < 5 && rc == 0; k++) rc = write_group(file, dicts[k], "dict", "0.1.0");
    if (rc == 0) {
        hid_t d = H5Dopen2(file, "X/data", H5P_DEFAULT), x = H5Dopen2(file, "X/indices", H5P_DEFAULT);
        e[E_XSTORED] = (d >= 0 ? (int64_t)H5Dget_storage_size(d) : 0) +
                       (x >= 0 ? (int64_t)H5Dget_storage_size(x) : 0);
        int64_t nnz = 0;
        if (h5_dataset_size(file, "X/data", path, &nnz, NULL) != 0) rc = -1;
        e[E_NNZ] = nnz;
        if (d >= 0) H5Dclose(d);
        if (x >= 0) H5Dclose(x);
    }
    free(cells);
    if (rc != 0) {
        char msg[900];
        snprintf(msg, sizeof msg, "%s", error_last());
        error_set("%s: %s", path, msg);
    }
    if (H5Fclose(file) < 0 && rc == 0) rc = error_set_h5("%s: cannot close the shard", path);
    if (rc != 0) {
        // A full disk or a size limit: say so (HDF5's own message does not).
        char msg[900], cause[320];
        snprintf(msg, sizeof msg, "%s", error_last());
        if (path_write_cause(path, errno, cause, sizeof cause)[0]) error_set("%s: %s", msg, cause);
        return -1;
    }
    // Checksums, from what reads back (shards/README.md: content_crc32).
    if ((file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT)) < 0)
        return error_set_h5("cannot reopen shard '%s'", path);
    uint32_t crc = 0;
    rc = crc_dataset(file, "X/indptr", H5T_STD_I64LE, 8, &crc, path);
    if (rc == 0) rc = crc_dataset(file, "X/indices", H5T_STD_I32LE, 4, &crc, path);
    if (rc == 0) rc = crc_dataset(file, "X/data", H5T_STD_I32LE, 4, &crc, path);
    if (rc == 0) rc = crc_dataset(file, "obs/cell_id", H5T_STD_I64LE, 8, &crc, path);
    if (rc == 0 && c->label_key) {
        char name[1100];
        snprintf(name, sizeof name, "obs/%s/codes", c->label_key);
        rc = crc_dataset(file, name, H5T_STD_I32LE, 4, &crc, path);
    }
    H5Fclose(file);
    if (rc != 0) return -1;
    e[E_CONTENT] = crc;
    uint32_t fcrc = 0;
    if (crc_file(path, &fcrc, &e[E_BYTES]) != 0) return -1;
    e[E_FILE] = fcrc;
    return 0;
}

// ---------------------------------------------------------------------------
// The build

static int64_t input_size(const char *path) {
    if (!path_is_dir(path)) return path_file_size(path);
    DIR *d = opendir(path);
    if (!d) return 0;
    int64_t total = 0;
    for (struct dirent *e = readdir(d); e; e = readdir(d)) {
        char *p = path_join(path, e->d_name);
        if (!path_is_dir(p)) {
            int64_t s = path_file_size(p);
            if (s > 0) total += s;
        }
        free(p);
    }
    closedir(d);
    return total;
}

static char *shard_name(size_t s) {
    char buf[64];
    snprintf(buf, sizeof buf, "shard-%05zu.h5ad", s);
    return xstrdup(buf);
}

// Rank 0: vocab.tsv, the manifest (last), then the folder into place.
static int publish(Ctx *c, size_t n_shards, const int64_t *e) {
    Manifest m;
    memset(&m, 0, sizeof m);
    m.version = SHARD_FORMAT_VERSION;
    vocab_hash_parse(c->hash, &m.vocab_hash);
    m.n_genes = (int64_t)c->vocab->n;
    m.n_cells = c->n_cells;
    m.label_key = (char *)(c->label_key ? c->label_key : "");
    m.n_labels = c->n_labels;
    m.labels = c->labels;
    m.label_counts = c->label_counts;
    m.n_datasets = c->n_in;
    m.datasets = c->names;
    m.dataset_paths = xmalloc(c->n_in * sizeof *m.dataset_paths);
    m.dataset_cells = xmalloc(c->n_in * sizeof *m.dataset_cells);
    for (size_t i = 0; i < c->n_in; i++) {
        char *real = realpath(c->in[i]->path, NULL);
        m.dataset_paths[i] = real && !has_control(real) ? real : xstrdup(c->in[i]->path);
        if (real && m.dataset_paths[i] != real) free(real);
        m.dataset_cells[i] = (int64_t)c->in[i]->n_cells;
    }
    m.n_shards = n_shards;
    m.shards = xcalloc(n_shards, sizeof *m.shards);
    for (size_t s = 0; s < n_shards; s++) {
        ShardEntry *x = &m.shards[s];
        const int64_t *r = e + s * E_FIELDS;
        int64_t s0 = (int64_t)(s * c->opt->shard_cells);
        x->file = shard_name(s);
        x->first_cell = s0;
        x->n_cells = (s0 + (int64_t)c->opt->shard_cells < c->n_cells ? s0 + (int64_t)c->opt->shard_cells
                                                                     : c->n_cells) - s0;
        x->nnz = r[E_NNZ];
        x->content_crc = (uint32_t)r[E_CONTENT];
        x->bytes = r[E_BYTES];
        x->file_crc = (uint32_t)r[E_FILE];
        m.nnz += x->nnz;
    }
    char *vpath = path_join(c->tmp, SHARD_VOCAB_FILE);
    int rc = vocab_save(c->vocab, vpath);
    free(vpath);
    if (rc == 0) rc = manifest_write(&m, c->tmp);
    for (size_t s = 0; s < n_shards; s++) free(m.shards[s].file);
    free(m.shards);
    for (size_t i = 0; i < c->n_in; i++) free(m.dataset_paths[i]);
    free(m.dataset_paths);
    free(m.dataset_cells);
    if (rc != 0) return -1;
    // Into place: an older folder (--force) is moved aside, then removed.
    const char *out = c->opt->out;
    char *old = NULL;
    if (path_exists(out)) {
        old = xmalloc(strlen(out) + 16);
        sprintf(old, "%s.old", out);
        if (path_exists(old) && remove_shard_folder(old) != 0) {
            free(old);
            return -1;
        }
        if (rename(out, old) != 0) {
            rc = error_set("cannot move the old '%s' aside: %s", out, strerror(errno));
            free(old);
            return rc;
        }
    }
    if (rename(c->tmp, out) != 0) {
        rc = error_set("cannot rename '%s' to '%s': %s", c->tmp, out, strerror(errno));
        if (old) rename(old, out);
        free(old);
        return rc;
    }
    error_cleanup_remove(c->tmp);
    if (old) {
        rc = remove_shard_folder(old);
        free(old);
        if (rc != 0) return -1;
    }
    char *dir = xstrdup(out);
    path_fsync(dirname(dir));
    free(dir);
    return 0;
}

int shard_build(const ShardBuildOptions *opt, Input *const *inputs, size_t n_inputs,
                const Vocab *vocab, MPI_Comm comm, ShardBuildReport *rep) {
    double t0 = MPI_Wtime();
    memset(rep, 0, sizeof *rep);
    Ctx c;
    memset(&c, 0, sizeof c);
    c.opt = opt;
    c.in = inputs;
    c.n_in = n_inputs;
    c.vocab = vocab;
    c.comm = comm;
    CHECK_MPI(MPI_Comm_rank(comm, &c.rank));
    CHECK_MPI(MPI_Comm_size(comm, &c.size));
    int rc = n_inputs == 0 ? error_set("no inputs") : vocab->n == 0 ? error_set("empty vocabulary") : 0;
    if (rc == 0) rc = zstd_filter_register();
    if (rc == 0) rc = ctx_init(&c);
    if (shard_agree(rc, comm) != 0) {
        ctx_free(&c);
        return -1;
    }

    // The folder: <out>.partial, registered for removal until it is published.
    size_t ol = strlen(opt->out);
    while (ol > 1 && opt->out[ol - 1] == '/') ol--;
    c.tmp = xmalloc(ol + 16);
    memcpy(c.tmp, opt->out, ol);
    strcpy(c.tmp + ol, ".partial");
    rc = 0;
    if (c.rank == 0) {
        rc = shard_out_check(opt->out, opt->force);
        if (rc == 0 && path_exists(c.tmp)) rc = remove_shard_folder(c.tmp);
        if (rc == 0) rc = path_mkdir_p(c.tmp);
    }
    if (shard_agree(rc, comm) != 0) {
        ctx_free(&c);
        return -1;
    }
    error_cleanup_add(c.tmp);

    size_t n_shards = (size_t)((c.n_cells + (int64_t)opt->shard_cells - 1) / (int64_t)opt->shard_cells);
    int64_t *e = xcalloc(n_shards * E_FIELDS, sizeof *e);
    Piece piece;
    memset(&piece, 0, sizeof piece);
    input_rows_init(&piece.rows);
    for (size_t s = 0; s < n_shards && rc == 0; s++) {
        char *name = shard_name(s), *path = path_join(c.tmp, name);
        rc = write_shard_numbers(&c, s, path, &piece);
        free(name);
        free(path);
    }
    piece_free(&piece);
    if (rc == 0) {
        for (size_t s = (size_t)c.rank; s < n_shards && rc == 0 && !g_stop_signal; s += (size_t)c.size) {
            char *name = shard_name(s), *path = path_join(c.tmp, name);
            rc = finish_shard(&c, s, path, e + s * E_FIELDS);
            free(name);
            free(path);
        }
        rc = shard_agree(rc, comm);
    }
    if (rc == 0) {
        CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, e, (int)(n_shards * E_FIELDS), MPI_INT64_T, MPI_SUM, comm));
        if (c.rank == 0) rc = publish(&c, n_shards, e);
        // A signal during publish() comes too late: the folder is in place.
        rc = agree(rc, comm, 0);
    }
    if (rc == 0) {
        CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, c.empty, (int)c.n_in, MPI_INT64_T, MPI_SUM, comm));
        rep->n_inputs = n_inputs;
        rep->inputs = xcalloc(n_inputs, sizeof *rep->inputs);
        for (size_t i = 0; i < n_inputs; i++) {
            ShardInputReport *r = &rep->inputs[i];
            r->name = xstrdup(c.names[i]);
            r->n_cells = (int64_t)inputs[i]->n_cells;
            r->empty_cells = c.empty[i];
            for (size_t k = 0; inputs[i]->label_codes && k < inputs[i]->n_cells; k++)
                r->labelled += inputs[i]->label_codes[k] >= 0;
            r->matched = c.maps[i].matched;
            r->missing = c.maps[i].missing;
            r->dropped = c.maps[i].dropped;
            r->duplicates = c.maps[i].duplicates;
            rep->input_bytes += input_size(inputs[i]->path);
        }
        rep->label_key = c.label_key ? xstrdup(c.label_key) : NULL;
        rep->n_labels = c.n_labels;
        rep->n_shards = n_shards;
        rep->n_cells = c.n_cells;
        for (size_t s = 0; s < n_shards; s++) {
            rep->nnz += e[s * E_FIELDS + E_NNZ];
            rep->bytes += e[s * E_FIELDS + E_BYTES];
            rep->x_stored_bytes += e[s * E_FIELDS + E_XSTORED];
        }
        rep->x_raw_bytes = rep->nnz * 8;
        rep->n_ranks = c.size;
        rep->seconds = MPI_Wtime() - t0;
    } else {
        // Keep the message across the cleanup; no folder is left at <out>.
        char msg[AGREE_LEN], hint[AGREE_LEN];
        snprintf(msg, sizeof msg, "%s", error_last());
        const char *h = error_last_hint();
        snprintf(hint, sizeof hint, "%s", h ? h : "");
        MPI_Barrier(comm);
        int removed = c.rank == 0 && remove_shard_folder(c.tmp) == 0;
        MPI_Barrier(comm);
        error_cleanup_remove(c.tmp);
        if (removed)
            error_set("%s; removed the partial output '%s'", msg, c.tmp);
        else
            error_set("%s", msg);
        if (hint[0]) error_set_hint("%s", hint);
    }
    free(e);
    ctx_free(&c);
    return rc;
}

void shard_build_report_print(const ShardBuildReport *r, FILE *f) {
    char b1[32], b2[32], b3[32], b4[32];
    for (size_t i = 0; i < r->n_inputs; i++) {
        const ShardInputReport *x = &r->inputs[i];
        fprintf(f, "input %zu '%s': %lld cells (%lld empty in the vocabulary); genes: %zu matched, "
                   "%zu missing, %zu dropped, %zu duplicates",
                i, x->name, (long long)x->n_cells, (long long)x->empty_cells, x->matched,
                x->missing, x->dropped, x->duplicates);
        if (r->label_key)
            fprintf(f, "; labels: %lld labelled, %lld unlabelled", (long long)x->labelled,
                    (long long)(x->n_cells - x->labelled));
        fputc('\n', f);
    }
    if (r->label_key) fprintf(f, "labels '%s': %zu categories\n", r->label_key, r->n_labels);
    double ratio = r->x_stored_bytes > 0 ? (double)r->x_raw_bytes / (double)r->x_stored_bytes : 0;
    fprintf(f, "wrote %zu shard(s): %lld cells, %lld values, %lld bytes (%s; inputs %s)\n",
            r->n_shards, (long long)r->n_cells, (long long)r->nnz, (long long)r->bytes,
            fmt_bytes((double)r->bytes, b1), fmt_bytes((double)r->input_bytes, b2));
    fprintf(f, "X compressed: %s as int32 -> %s stored, ratio %.2f\n",
            fmt_bytes((double)r->x_raw_bytes, b3), fmt_bytes((double)r->x_stored_bytes, b4), ratio);
    fprintf(f, "time %.2f s on %d rank(s), %.0f cells/s\n", r->seconds, r->n_ranks,
            r->seconds > 0 ? (double)r->n_cells / r->seconds : 0.0);
}

void shard_build_report_free(ShardBuildReport *r) {
    for (size_t i = 0; i < r->n_inputs; i++) free(r->inputs[i].name);
    free(r->inputs);
    free(r->label_key);
    memset(r, 0, sizeof *r);
}

// ---------------------------------------------------------------------------
// Vocabulary from inputs

int shard_vocab_build(Vocab *v, Input *const *in, size_t n_in, int64_t min_cells, MPI_Comm comm,
                      size_t *n_union) {
    int rank = 0, size = 1;
    CHECK_MPI(MPI_Comm_rank(comm, &rank));
    CHECK_MPI(MPI_Comm_size(comm, &size));
    Vocab u;
    vocab_init(&u);
    int rc = 0;
    for (size_t i = 0; i < n_in && rc == 0; i++) {
        for (size_t g = 0; g < in[i]->n_genes && rc == 0; g++) {
            if (vocab_match(&u, in[i]->symbols[g], in[i]->ids[g]) >= 0) continue;
            if (vocab_add(&u, in[i]->symbols[g], in[i]->ids[g]) < 0) {
                char msg[900];
                snprintf(msg, sizeof msg, "%s", error_last());
                rc = error_set("%s: gene %zu: %s", in[i]->path, g, msg);
            }
        }
    }
    if (n_union) *n_union = u.n;
    if (rc != 0 || min_cells <= 0) {
        *v = u;
        if (rc != 0) vocab_free(v);
        return shard_agree(rc, comm);
    }
    int64_t *cells = xcalloc(u.n ? u.n : 1, sizeof *cells);
    InputRows rows;
    input_rows_init(&rows);
    int32_t *g_out = NULL, *c_out = NULL;
    size_t cap = 0;
    for (size_t i = 0; i < n_in && rc == 0; i++) {
        VocabMap map;
        vocab_map_build(&map, &u, in[i]->symbols, in[i]->ids, in[i]->n_genes);
        size_t n = in[i]->n_cells;
        size_t a = n * (size_t)rank / (size_t)size, b = n * (size_t)(rank + 1) / (size_t)size;
        CountsCheck check;
        counts_check_init(&check);
        for (size_t x = a; x < b && rc == 0; x += SHARD_DEFAULT_PIECE) {
            size_t y = x + SHARD_DEFAULT_PIECE < b ? x + SHARD_DEFAULT_PIECE : b;
            if ((rc = input_read_rows(in[i], x, y, &rows)) != 0) break;
            counts_check_merge(&check, &rows.check);
            if (rows.nnz > cap) {
                cap = rows.nnz;
                g_out = xrealloc(g_out, cap * sizeof *g_out);
                c_out = xrealloc(c_out, cap * sizeof *c_out);
            }
            for (size_t k = 0; k < y - x && rc == 0; k++) {
                int64_t got = vocab_map_row(&map, rows.gene + rows.indptr[k], rows.count + rows.indptr[k],
                                            (size_t)(rows.indptr[k + 1] - rows.indptr[k]), g_out, c_out);
                if (got < 0) {
                    rc = -1;
                    break;
                }
                for (int64_t j = 0; j < got; j++) cells[g_out[j]]++;
            }
        }
        vocab_map_free(&map);
        rc = shard_agree(rc, comm);
        if (rc == 0) {
            counts_check_allreduce(&check, comm);
            rc = input_counts_verdict(in[i], &check);
        }
    }
    input_rows_free(&rows);
    free(g_out);
    free(c_out);
    if (rc == 0) {
        CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, cells, (int)u.n, MPI_INT64_T, MPI_SUM, comm));
        vocab_init(v);
        for (size_t g = 0; g < u.n; g++)
            if (cells[g] >= min_cells) vocab_add(v, u.symbols[g], u.ids[g]);
    }
    free(cells);
    vocab_free(&u);
    return rc;
}

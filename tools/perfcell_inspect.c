// perfcell-inspect: summarise and verify shard folders and shard files.
//
// Each kind of PATH is one entry of KINDS (detect, summary, verify): shard
// folders, shard files and checkpoints.
#include "perfcell/checkpoint.h"
#include "perfcell/error.h"
#include "perfcell/h5util.h"
#include "perfcell/manifest.h"
#include "perfcell/shard_reader.h"
#include "perfcell/util.h"
#include "perfcell/vocab.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

static const char USAGE[] =
    "usage: perfcell-inspect PATH [--verify] [--cells N]\n"
    "\n"
    "Summarise a shard folder (a folder with manifest.tsv), one shard file (.h5ad)\n"
    "or a checkpoint (ckpt-*.h5; --verify checks every tensor's CRC-32).\n"
    "\n"
    "  --verify    re-read everything and check it: the vocabulary hash of vocab.tsv,\n"
    "              each shard's size and file CRC-32, its structure, every cell\n"
    "              (genes inside the vocabulary and ascending, counts > 0) and its\n"
    "              content CRC-32, all against manifest.tsv; every fault is named\n"
    "              with its file, and the exit status is 1 if there is any\n"
    "  --cells N   also print the first N cells (id, label, total, top genes)\n"
    "  --help      this text\n";

typedef struct {
    int verify;
    long cells;
} Options;

// ===========================================================================
// Printing

// Integer with thousands separators.
static const char *fmt_count(int64_t v, char buf[32]) {
    char raw[32];
    snprintf(raw, sizeof raw, "%lld", (long long)(v < 0 ? -v : v));
    size_t n = strlen(raw), o = 0;
    if (v < 0) buf[o++] = '-';
    for (size_t i = 0; i < n; i++) {
        if (i > 0 && (n - i) % 3 == 0) buf[o++] = ',';
        buf[o++] = raw[i];
    }
    buf[o] = '\0';
    return buf;
}

// Sizes, density and compression of a CSR of n cells x g genes.
static void print_matrix(int64_t cells, int64_t genes, int64_t nnz, uint64_t hash, int64_t disk) {
    char a[32], b[32], h[17];
    vocab_hash_format(hash, h);
    printf("  cells        %s\n", fmt_count(cells, a));
    printf("  genes        %s (vocabulary hash %s)\n", fmt_count(genes, a), h);
    printf("  non-zeros    %s (density %.2f %%, %.0f genes per cell)\n", fmt_count(nnz, a),
           100.0 * (double)nnz / ((double)cells * (double)genes), (double)nnz / (double)cells);
    // Uncompressed: int32 data and indices, int64 indptr, as the shards store them.
    double csr = 8.0 * (double)nnz + 8.0 * (double)(cells + 1);
    printf("  on disk      %s; uncompressed int32 CSR %s; compression %.2fx\n",
           fmt_bytes((double)disk, a), fmt_bytes(csr, b), disk > 0 ? csr / (double)disk : 0.0);
}

static void print_categories(const char *title, char *const *names, const int64_t *counts, size_t n,
                             int64_t missing) {
    char a[32];
    printf("  %-12s %zu\n", title, n);
    for (size_t i = 0; i < n; i++)
        printf("    %6zu  %-28s %10s\n", i, names[i], fmt_count(counts[i], a));
    if (missing > 0) printf("    %6s  %-28s %10s\n", "-1", "(none)", fmt_count(missing, a));
}

// One cell: id, label, total, non-zeros and its five largest counts.
static void print_cell(const CellBatch *b, size_t i, char *const *labels, size_t n_labels,
                       char *const *genes) {
    int64_t e0 = b->offset[i], e1 = b->offset[i + 1];
    int64_t top[5];
    size_t nt = 0;
    for (int64_t e = e0; e < e1; e++) {
        if (nt < 5)
            top[nt++] = e;
        else if (b->count[e] > b->count[top[4]])
            top[4] = e;
        else
            continue;
        for (size_t k = nt - 1; k > 0 && b->count[top[k]] > b->count[top[k - 1]]; k--) {
            int64_t t = top[k];
            top[k] = top[k - 1];
            top[k - 1] = t;
        }
    }
    int32_t l = b->label[i];
    printf("    %8lld  %-20s %8.0f %6lld  ", (long long)b->cell_id[i],
           l >= 0 && (size_t)l < n_labels ? labels[l] : "-", b->total[i], (long long)(e1 - e0));
    for (size_t k = 0; k < nt; k++) printf(" %s=%.0f", genes[b->gene[top[k]]], b->count[top[k]]);
    printf("\n");
}

static void print_cells_header(void) {
    printf("    %8s  %-20s %8s %6s   %s\n", "cell_id", "label", "total", "genes", "largest counts");
}

// ===========================================================================
// Shard folders

static int is_shard_folder(const char *path) {
    char *m = path_join(path, SHARD_MANIFEST_FILE);
    int yes = path_is_dir(path) && path_exists(m);
    free(m);
    return yes;
}

static void folder_summary(const Manifest *m) {
    char a[32];
    int64_t disk = 0;
    for (size_t i = 0; i < m->n_shards; i++) disk += m->shards[i].bytes;
    printf("shard folder %s (format %d)\n", m->folder, m->version);
    print_matrix(m->n_cells, m->n_genes, m->nnz, m->vocab_hash, disk);
    if (m->label_key[0]) {
        int64_t labelled = 0;
        for (size_t i = 0; i < m->n_labels; i++) labelled += m->label_counts[i];
        printf("  label key    %s\n", m->label_key);
        print_categories("labels", m->labels, m->label_counts, m->n_labels, m->n_cells - labelled);
    } else {
        printf("  labels       none\n");
    }
    printf("  datasets     %zu\n", m->n_datasets);
    for (size_t i = 0; i < m->n_datasets; i++)
        printf("    %6zu  %-28s %10s  %s\n", i, m->datasets[i], fmt_count(m->dataset_cells[i], a),
               m->dataset_paths[i]);
    printf("  shards       %zu files\n", m->n_shards);
    printf("    %-20s %10s %12s %12s %12s %10s %10s\n", "file", "cells", "first_cell", "nnz",
           "bytes", "content", "file_crc");
    for (size_t i = 0; i < m->n_shards; i++) {
        const ShardEntry *e = &m->shards[i];
        char c1[32], c2[32], c3[32], c4[32];
        printf("    %-20s %10s %12s %12s %12s   %08x   %08x\n", e->file, fmt_count(e->n_cells, c1),
               fmt_count(e->first_cell, c2), fmt_count(e->nnz, c3), fmt_count(e->bytes, c4),
               e->content_crc, e->file_crc);
    }
}

static int folder_cells(const Manifest *m, long n) {
    Vocab v;
    vocab_init(&v);
    char *vp = path_join(m->folder, SHARD_VOCAB_FILE);
    int rc = vocab_load(&v, vp);
    free(vp);
    if (rc != 0 || (int64_t)v.n != m->n_genes) {
        fprintf(stderr, "perfcell-inspect: cannot show cells: %s\n",
                rc != 0 ? error_last() : "vocab.tsv does not match the manifest's gene count");
        vocab_free(&v);
        return 1;
    }
    ShardReader *r = shard_reader_open_manifest(m, 0);
    CellBatch b;
    cellbatch_init(&b);
    int64_t end = n < m->n_cells ? (int64_t)n : m->n_cells;
    rc = shard_reader_read(r, 0, end, &b);
    if (rc == 0) {
        printf("  first %lld cells\n", (long long)end);
        print_cells_header();
        for (size_t i = 0; i < b.n; i++) print_cell(&b, i, m->labels, m->n_labels, v.symbols);
    } else {
        fprintf(stderr, "perfcell-inspect: %s\n", error_last());
    }
    cellbatch_free(&b);
    shard_reader_close(r);
    vocab_free(&v);
    return rc != 0;
}

// Count one fault: print it, naming the file.
static int fault(int *faults, const char *fmt, ...) PC_PRINTF(2, 3);
static int fault(int *faults, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("FAULT  ", stdout);
    vprintf(fmt, ap);
    fputc('\n', stdout);
    va_end(ap);
    fflush(stdout);
    return ++*faults;
}

static int folder_verify(const Manifest *m) {
    int faults = 0;
    char h[17], hv[17];
    printf("verifying %s\n", m->folder);
    Vocab v;
    vocab_init(&v);
    char *vp = path_join(m->folder, SHARD_VOCAB_FILE);
    if (vocab_load(&v, vp) != 0) {
        fault(&faults, "%s", error_last());
    } else if (vocab_hash(&v) != m->vocab_hash || (int64_t)v.n != m->n_genes) {
        vocab_hash_format(vocab_hash(&v), hv);
        vocab_hash_format(m->vocab_hash, h);
        fault(&faults, "%s: %zu genes with hash %s, the manifest says %lld genes with hash %s", vp,
              v.n, hv, (long long)m->n_genes, h);
    } else {
        printf("ok     %s (%zu genes, hash matches)\n", vp, v.n);
    }
    vocab_free(&v);
    free(vp);

    int64_t *labels = xcalloc(m->n_labels + 1, sizeof *labels);
    int all_read = 1;
    for (size_t i = 0; i < m->n_shards; i++) {
        const ShardEntry *e = &m->shards[i];
        char *path = manifest_shard_path(m, i);
        uint32_t crc = 0, content = 0;
        int64_t bytes = 0;
        ShardFile f;
        if (shard_file_crc(path, &crc, &bytes) != 0) {
            fault(&faults, "%s", error_last());
            all_read = 0;
        } else if (bytes != e->bytes || crc != e->file_crc) {
            // A corrupt file is not handed to the HDF5 parser.
            fault(&faults,
                  "%s: %lld bytes with CRC-32 %08x, the manifest says %lld bytes with %08x (%s)",
                  path, (long long)bytes, crc, (long long)e->bytes, e->file_crc,
                  bytes != e->bytes ? "truncated or rewritten" : "corrupt");
            all_read = 0;
        } else if (shard_file_open(&f, path, m, i, 0) != 0) {
            fault(&faults, "%s", error_last());
            all_read = 0;
        } else {
            if (shard_file_content_crc(&f, &content) != 0) {
                fault(&faults, "%s", error_last());
                all_read = 0;
            } else if (content != e->content_crc) {
                fault(&faults, "%s: content CRC-32 %08x, the manifest says %08x", path, content,
                      e->content_crc);
            } else {
                printf("ok     %s (%lld cells, file and content CRC-32 match)\n", path,
                       (long long)f.n_cells);
            }
            for (int64_t c = 0; c < f.n_cells; c++) labels[f.label[c] + 1]++;
            shard_file_close(&f);
        }
        free(path);
    }
    if (all_read && m->n_labels > 0) {
        for (size_t l = 0; l < m->n_labels; l++)
            if (labels[l + 1] != m->label_counts[l])
                fault(&faults,
                      "%s/%s: label '%s' has %lld cells in the shards, the manifest says %lld",
                      m->folder, SHARD_MANIFEST_FILE, m->labels[l], (long long)labels[l + 1],
                      (long long)m->label_counts[l]);
    }
    free(labels);
    if (faults)
        printf("%d fault%s in %s\n", faults, faults > 1 ? "s" : "", m->folder);
    else
        printf("all %zu shards verified\n", m->n_shards);
    return faults > 0;
}

static int inspect_folder(const char *path, const Options *o) {
    Manifest m;
    if (manifest_load(&m, path) != 0) {
        printf("FAULT  %s\n", error_last());
        return 1;
    }
    folder_summary(&m);
    int rc = 0;
    if (o->cells > 0) rc |= folder_cells(&m, o->cells);
    if (o->verify) rc |= folder_verify(&m);
    manifest_free(&m);
    return rc;
}

// ===========================================================================
// One shard file

static int is_shard_file(const char *path) {
    if (path_is_dir(path) || !path_exists(path)) return 0;
    h5_lock();
    htri_t yes = H5Fis_hdf5(path);
    h5_unlock();
    return yes > 0;
}

// The manifest of the folder holding `path`, and the file's row in it.
static int sibling_manifest(const char *path, Manifest *m, size_t *index) {
    char *dir = xstrdup(path);
    char *slash = strrchr(dir, '/');
    const char *name = slash ? slash + 1 : path;
    if (slash)
        *slash = '\0';
    else
        snprintf(dir, strlen(dir) + 1, ".");
    int found = 0;
    if (is_shard_folder(dir) && manifest_load(m, dir) == 0) {
        for (size_t i = 0; i < m->n_shards && !found; i++)
            if (strcmp(m->shards[i].file, name) == 0) {
                *index = i;
                found = 1;
            }
        if (!found) manifest_free(m);
    }
    free(dir);
    return found;
}

static int inspect_file(const char *path, const Options *o) {
    ShardFile f;
    if (shard_file_open(&f, path, NULL, 0, 0) != 0) {
        printf("FAULT  %s\n", error_last());
        return 1;
    }
    printf("shard file %s (shard %lld, cells %lld..%lld)\n", path, (long long)f.shard_index,
           (long long)f.first_cell, (long long)(f.first_cell + f.n_cells - 1));
    print_matrix(f.n_cells, f.n_genes, f.nnz, f.vocab_hash, f.bytes);
    int64_t *counts = xcalloc(f.n_labels + f.n_datasets + 1, sizeof *counts);
    int64_t none = 0;
    for (int64_t c = 0; c < f.n_cells; c++) {
        if (f.label[c] >= 0)
            counts[f.label[c]]++;
        else
            none++;
    }
    if (f.label_key[0]) {
        printf("  label key    %s\n", f.label_key);
        print_categories("labels", f.labels, counts, f.n_labels, none);
    } else {
        printf("  labels       none\n");
    }
    int64_t *ds = counts + f.n_labels;
    for (int64_t c = 0; c < f.n_cells; c++) ds[f.dataset[c]]++;
    print_categories("datasets", f.datasets, ds, f.n_datasets, 0);
    free(counts);

    int rc = 0;
    if (o->cells > 0) {
        char **genes = NULL;
        CellBatch b;
        cellbatch_init(&b);
        int64_t end = o->cells < f.n_cells ? (int64_t)o->cells : f.n_cells;
        if (shard_file_strings(&f, "var/gene", (size_t)f.n_genes, &genes) != 0 ||
            shard_file_read(&f, 0, end, &b) != 0) {
            printf("FAULT  %s\n", error_last());
            rc = 1;
        } else {
            printf("  first %lld cells\n", (long long)end);
            print_cells_header();
            for (size_t i = 0; i < b.n; i++) print_cell(&b, i, f.labels, f.n_labels, genes);
        }
        h5_free_strings(genes, genes ? (size_t)f.n_genes : 0);
        cellbatch_free(&b);
    }
    if (o->verify) {
        int faults = 0;
        uint32_t content = 0, crc = 0;
        int64_t bytes = 0;
        Manifest m;
        size_t index = 0;
        int listed = sibling_manifest(path, &m, &index);
        if (shard_file_content_crc(&f, &content) != 0) {
            fault(&faults, "%s", error_last());
        } else {
            printf("ok     %s: every cell decodes and is valid (content CRC-32 %08x)\n", path,
                   content);
        }
        if (listed) {
            const ShardEntry *e = &m.shards[index];
            if (shard_file_crc(path, &crc, &bytes) != 0)
                fault(&faults, "%s", error_last());
            else if (bytes != e->bytes || crc != e->file_crc)
                fault(&faults,
                      "%s: %lld bytes with CRC-32 %08x, the manifest says %lld bytes with %08x",
                      path, (long long)bytes, crc, (long long)e->bytes, e->file_crc);
            if (faults == 0 && content != e->content_crc)
                fault(&faults, "%s: content CRC-32 %08x, the manifest says %08x", path, content,
                      e->content_crc);
            ShardFile g;
            if (faults == 0 && shard_file_open(&g, path, &m, index, 0) != 0)
                fault(&faults, "%s", error_last());
            if (faults == 0) {
                shard_file_close(&g);
                printf("ok     %s agrees with %s/%s\n", path, m.folder, SHARD_MANIFEST_FILE);
            }
            manifest_free(&m);
        } else {
            printf("note   no manifest.tsv beside the file lists it: checksums not compared\n");
        }
        rc |= faults > 0;
    }
    shard_file_close(&f);
    return rc;
}

// ===========================================================================

// ===========================================================================
// Checkpoints

// An HDF5 file whose root says format = perfcell-checkpoint; or one named
// like a checkpoint (ckpt-*.h5) or that is not an .h5ad file, whose root
// cannot be read or holds a damaged 'format' attribute: a damaged
// checkpoint, which the checkpoint reader describes better than the shard
// reader would.
static int is_checkpoint(const char *path) {
    if (path_is_dir(path) || !path_exists(path)) return 0;
    const char *slash = strrchr(path, '/');
    const char *base = slash ? slash + 1 : path;
    int named = strncmp(base, "ckpt-", 5) == 0 && str_ends_with(base, ".h5");
    h5_lock();
    int yes = 0;
    if (H5Fis_hdf5(path) > 0) {
        hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
        if (f >= 0) {
            char fmt[64];
            // H5Aexists fails when the root's object header is damaged.
            htri_t has_format = H5Aexists(f, "format"), has_encoding = H5Aexists(f, "encoding-type");
            int is_ckpt = has_format > 0 && h5_attr_read_string(f, "format", fmt, sizeof fmt) == 0 &&
                          strcmp(fmt, CKPT_FORMAT) == 0;
            int unreadable = has_format < 0 || has_encoding < 0;
            yes = is_ckpt || (has_encoding <= 0 && (named || has_format > 0)) ||
                  (unreadable && !str_ends_with(base, ".h5ad"));
            H5Fclose(f);
        } else {
            yes = named || !str_ends_with(base, ".h5ad");
        }
    } else {
        yes = named;
    }
    h5_unlock();
    return yes;
}

static int inspect_checkpoint(const char *path, const Options *o) {
    if (ckpt_summary(path, stdout) != 0) {
        fprintf(stderr, "%s\n", error_last());
        return 1;
    }
    if (!o->verify) return 0;
    CkptState s;
    if (ckpt_read(path, &s) != 0) {
        fprintf(stderr, "FAULT: %s\n", error_last());
        return 1;
    }
    int sealed = s.sealed;
    ckpt_state_free(&s);
    if (!sealed)
        printf("note: %s has no root checksum (written before perfcell had them): its step, cursor and "
               "other attributes cannot be checked\n",
               path);
    printf("verify: every tensor's shape, CRC-32 and finite values%s checked: OK\n",
           sealed ? ", and the root checksum" : "");
    return 0;
}

typedef struct {
    const char *name;
    int (*detect)(const char *path);
    int (*inspect)(const char *path, const Options *o);
} PathKind;

static const PathKind KINDS[] = {
    {"shard folder", is_shard_folder, inspect_folder},
    {"checkpoint", is_checkpoint, inspect_checkpoint},
    {"shard file", is_shard_file, inspect_file},
};

int main(int argc, char **argv) {
    Options o = {0};
    const char *path = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(USAGE, stdout);
            return 0;
        } else if (strcmp(argv[i], "--verify") == 0) {
            o.verify = 1;
        } else if (strcmp(argv[i], "--cells") == 0) {
            if (i + 1 >= argc || str_to_long(argv[i + 1], &o.cells) != 0 || o.cells < 0)
                DIE_HINT("give a number of cells, e.g. --cells 10", "--cells needs a count >= 0");
            i++;
        } else if (argv[i][0] == '-') {
            DIE_HINT("run perfcell-inspect --help for the options", "unknown option '%s'", argv[i]);
        } else if (path) {
            DIE_HINT("give one PATH", "more than one PATH ('%s' and '%s')", path, argv[i]);
        } else {
            path = argv[i];
        }
    }
    if (!path) DIE_HINT("usage: perfcell-inspect PATH [--verify] [--cells N]", "no PATH given");
    error_h5_quiet();
    for (size_t k = 0; k < sizeof KINDS / sizeof *KINDS; k++)
        if (KINDS[k].detect(path)) return KINDS[k].inspect(path, &o);
    if (!path_exists(path))
        DIE_HINT("give a shard folder (with manifest.tsv) or a shard .h5ad file",
                 "'%s' does not exist", path);
    if (path_is_dir(path))
        DIE_HINT("a shard folder holds manifest.tsv; build one with perfcell-shard build",
                 "'%s' is a folder without %s", path, SHARD_MANIFEST_FILE);
    DIE_HINT("give a shard folder (with manifest.tsv) or a shard .h5ad file",
             "'%s' is not an HDF5 file", path);
}

// Unit tests of the vocabulary (file, hash, matching rules, row mapping) and
// of the input readers: the same pbmc3k cells read from .h5ad, 10x HDF5 and
// MatrixMarket agree cell by cell; range reads; labels from obs and from a
// TSV; the counts check; malformed MatrixMarket files, labels files and
// damaged HDF5 files are refused with a message, never a crash.
#include "perfcell/error.h"
#include "perfcell/input.h"
#include "perfcell/util.h"
#include "perfcell/vocab.h"
#include "testlib.h"

#include <string.h>
#include <zlib.h>

static char g_data[1024];

static char *data_path(const char *rel) { return path_join(g_data, rel); }

static char *write_tmp(const char *name, const char *text) {
    char *p = path_join(t_tmpdir(), name);
    FILE *f = xfopen(p, "w");
    fputs(text, f);
    fclose(f);
    return p;
}

// ---------------------------------------------------------------------------
// Vocabulary

static void test_vocab_rules(void) {
    Vocab v;
    vocab_init(&v);
    T_CHECK(vocab_add(&v, "CD3D", "") == 0, "add");
    T_CHECK(vocab_add(&v, "MS4A1", "ENSG00000156738") == 1, "add with id");
    T_CHECK(vocab_add(&v, "TBCE", "ENSG00000284770") == 2, "add");
    T_CHECK(vocab_add(&v, "TBCE", "ENSG00000285053") == 3, "same symbol, other id: another gene");
    // Duplicates.
    T_CHECK(vocab_add(&v, "CD3D", "") < 0 && strstr(error_last(), "line 1"), "%s", error_last());
    T_CHECK(vocab_add(&v, "CD3D", "ENSG00000167286") < 0, "symbol without id on one side");
    T_CHECK(vocab_add(&v, "OTHER", "ENSG00000156738.9") < 0, "same id with a version suffix");
    T_CHECK(vocab_add(&v, "TBCE", "") < 0, "symbol of genes with ids, no id");
    T_CHECK(vocab_add(&v, "", "") < 0 && strstr(error_last(), "empty"), "empty symbol");
    T_CHECK(vocab_add(&v, "A\tB", "") < 0, "tab in a symbol");
    T_CHECK(v.n == 4, "n %zu", v.n);
    // Matching.
    T_CHECK(vocab_match(&v, "CD3D", NULL) == 0, "symbol");
    T_CHECK(vocab_match(&v, "CD3D", "ENSG00000167286") == 0, "input id, vocabulary gene without id");
    T_CHECK(vocab_match(&v, "renamed", "ENSG00000156738") == 1, "by id despite the symbol");
    T_CHECK(vocab_match(&v, "MS4A1", "ENSG00000156738.12") == 1, "id version ignored");
    T_CHECK(vocab_match(&v, "MS4A1", "ENSG99999999999") == -1, "different ids: different genes");
    T_CHECK(vocab_match(&v, "MS4A1", NULL) == 1, "no input id: by symbol");
    T_CHECK(vocab_match(&v, "TBCE", "ENSG00000285053") == 3, "second TBCE by id");
    T_CHECK(vocab_match(&v, "TBCE", "") == 2, "no id: the first TBCE");
    T_CHECK(vocab_match(&v, "NOPE", "") == -1, "unknown");
    vocab_free(&v);

    // Hash of the canonical text "CD3D\t\nMS4A1\tENSG00000156738\n" (FNV-1a,
    // computed independently with Python).
    vocab_init(&v);
    vocab_add(&v, "CD3D", NULL);
    vocab_add(&v, "MS4A1", "ENSG00000156738");
    T_CHECK(vocab_hash(&v) == 0xc2ccd758307facd6ull, "hash %016llx", (unsigned long long)vocab_hash(&v));
    char *p = path_join(t_tmpdir(), "v.tsv");
    T_CHECK(vocab_save(&v, p) == 0, "save: %s", error_last());
    size_t len = 0;
    char *text = file_read_all(p, &len);
    T_CHECK(text && strcmp(text, "CD3D\nMS4A1\tENSG00000156738\n") == 0, "saved text '%s'", text);
    free(text);
    Vocab w;
    T_CHECK(vocab_load(&w, p) == 0 && w.n == 2 && vocab_hash(&w) == vocab_hash(&v), "round trip");
    vocab_free(&w);
    free(p);
    vocab_free(&v);

    // Many genes (the tables grow).
    vocab_init(&v);
    for (int i = 0; i < 50000; i++) {
        char s[32];
        snprintf(s, sizeof s, "G%d", i);
        if (vocab_add(&v, s, NULL) != i) break;
    }
    T_CHECK(v.n == 50000 && vocab_match(&v, "G31337", NULL) == 31337, "50000 genes");
    vocab_free(&v);
}

static void test_vocab_files(void) {
    struct {
        const char *name, *text, *expect;
    } bad[] = {
        {"blank.tsv", "A\n\nB\n", ":2: blank line"},
        {"comment.tsv", "#genes\nA\n", ":1: comment lines"},
        {"three.tsv", "A\tENSG1\textra\n", ":1: more than two fields"},
        {"dup.tsv", "A\nB\nA\n", ":3: duplicate gene 'A'"},
        {"empty_symbol.tsv", "A\n\tENSG2\n", ":2: empty gene symbol"},
        {"empty.tsv", "", "is empty"},
        {"binary.tsv", "A\nB\0C\n", "binary"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        char *p = path_join(t_tmpdir(), bad[i].name);
        FILE *f = xfopen(p, "wb");
        fwrite(bad[i].text, 1, strlen(bad[i].text) + (strcmp(bad[i].name, "binary.tsv") == 0 ? 4 : 0), f);
        fclose(f);
        Vocab v;
        T_CHECK(vocab_load(&v, p) < 0, "%s accepted", bad[i].name);
        T_CHECK(strstr(error_last(), bad[i].expect) != NULL, "%s: '%s'", bad[i].name, error_last());
        T_CHECK(error_last_hint() != NULL, "%s: no hint", bad[i].name);
        free(p);
    }
    Vocab v;
    char *h5 = data_path("pbmc3k/pbmc3k_counts.h5ad");
    T_CHECK(vocab_load(&v, h5) < 0 && strstr(error_last(), "HDF5 file"), "%s", error_last());
    free(h5);
    char *crlf = write_tmp("crlf.tsv", "A\r\nB\tENSG3\r\n");
    T_CHECK(vocab_load(&v, crlf) == 0 && v.n == 2 && strcmp(v.ids[1], "ENSG3") == 0, "CRLF lines");
    vocab_free(&v);
    free(crlf);
}

static void test_map_row(void) {
    Vocab v;
    vocab_init(&v);
    const char *genes[] = {"A", "B", "C", "D"};
    for (int i = 0; i < 4; i++) vocab_add(&v, genes[i], NULL);
    // Input genes: C, A, X (dropped), A (duplicate), D
    char *sym[] = {"C", "A", "X", "A", "D"};
    VocabMap m;
    vocab_map_build(&m, &v, sym, NULL, 5);
    T_CHECK(m.matched == 3 && m.missing == 1 && m.dropped == 1 && m.duplicates == 1 && !m.monotone,
            "stats %zu %zu %zu %zu", m.matched, m.missing, m.dropped, m.duplicates);
    int32_t g[] = {0, 1, 2, 3, 4}, c[] = {5, 7, 9, 11, 0}, og[5], oc[5];
    int64_t n = vocab_map_row(&m, g, c, 5, og, oc);
    // A = 7 + 11, C = 5, D's zero dropped; X dropped.
    T_CHECK(n == 2 && og[0] == 0 && oc[0] == 18 && og[1] == 2 && oc[1] == 5, "row n=%lld", (long long)n);
    int32_t big[] = {INT32_MAX, 1};
    int32_t gg[] = {1, 3};
    T_CHECK(vocab_map_row(&m, gg, big, 2, og, oc) < 0 && strstr(error_last(), "2^31"), "overflow");
    int32_t out_of_range[] = {7};
    T_CHECK(vocab_map_row(&m, out_of_range, c, 1, og, oc) < 0, "gene out of range");
    vocab_map_free(&m);
    // Monotone map, unsorted row: falls back to sorting.
    char *sym2[] = {"A", "B", "D"};
    vocab_map_build(&m, &v, sym2, NULL, 3);
    T_CHECK(m.monotone && m.matched == 3 && m.missing == 1, "monotone");
    int32_t g2[] = {2, 0}, c2[] = {3, 4};
    n = vocab_map_row(&m, g2, c2, 2, og, oc);
    T_CHECK(n == 2 && og[0] == 0 && oc[0] == 4 && og[1] == 3 && oc[1] == 3, "sorted");
    vocab_map_free(&m);
    vocab_free(&v);
}

// ---------------------------------------------------------------------------
// Inputs

static Input *open_or_fail(const char *rel, const InputOptions *o) {
    char *p = data_path(rel);
    Input *in = input_open(p, o);
    T_CHECK(in != NULL, "open %s: %s", p, error_last());
    free(p);
    return in;
}

// The same cells in three formats: identical rows once genes are matched by symbol.
static void test_formats_agree(void) {
    InputOptions o = {.label_key = "celltype"};
    Input *a = open_or_fail("pbmc3k/pbmc3k_counts.h5ad", &o);
    char *tsv = data_path("pbmc3k/labels.tsv");
    InputOptions ot = {.labels_tsv = tsv};
    Input *b = open_or_fail("pbmc3k/filtered_feature_bc_matrix.h5", &ot);
    Input *c = open_or_fail("pbmc3k/filtered_feature_bc_matrix", &ot);
    if (!a || !b || !c) goto done;
    T_CHECK(a->n_cells == 2638 && a->n_genes == 13714, "h5ad %zu x %zu", a->n_cells, a->n_genes);
    T_CHECK(b->n_cells == a->n_cells && c->n_cells == a->n_cells, "cells");
    T_CHECK(strcmp(a->layout, "CSR") == 0 && strcmp(a->matrix, "X") == 0, "layout");
    T_CHECK(b->ids[0][0] == '\0', "10x ids equal to the symbols are no ids");
    for (size_t i = 0; i < a->n_cells; i++) {
        if (strcmp(a->cells[i], b->cells[i]) || strcmp(a->cells[i], c->cells[i])) {
            T_CHECK(0, "barcode %zu", i);
            break;
        }
    }
    // Labels: obs column and TSV agree.
    T_CHECK(strcmp(a->label_key, "celltype") == 0 && strcmp(b->label_key, "celltype") == 0,
            "label keys %s %s", a->label_key, b->label_key);
    size_t differ = 0;
    for (size_t i = 0; i < a->n_cells; i++) {
        const char *la = a->label_codes[i] >= 0 ? a->label_names[a->label_codes[i]] : "";
        const char *lb = b->label_codes[i] >= 0 ? b->label_names[b->label_codes[i]] : "";
        differ += strcmp(la, lb) != 0;
    }
    T_CHECK(differ == 0, "%zu labels differ between obs and labels.tsv", differ);
    // Counts, in a common vocabulary (the h5ad's genes).
    Vocab v;
    vocab_init(&v);
    for (size_t g = 0; g < a->n_genes; g++) vocab_add(&v, a->symbols[g], a->ids[g]);
    Input *all[3] = {a, b, c};
    VocabMap maps[3];
    InputRows rows[3];
    for (int k = 0; k < 3; k++) {
        vocab_map_build(&maps[k], &v, all[k]->symbols, all[k]->ids, all[k]->n_genes);
        T_CHECK(maps[k].matched == 13714 && maps[k].dropped == 0, "format %d matched %zu", k,
                maps[k].matched);
        input_rows_init(&rows[k]);
        T_CHECK(input_read_rows(all[k], 0, all[k]->n_cells, &rows[k]) == 0, "read: %s", error_last());
        T_CHECK(counts_check_bad(&rows[k].check) == 0, "format %d: not counts", k);
    }
    T_CHECK(rows[0].nnz == 2238732 && rows[1].nnz == rows[0].nnz && rows[2].nnz == rows[0].nnz,
            "nnz %zu %zu %zu", rows[0].nnz, rows[1].nnz, rows[2].nnz);
    int32_t *g0 = xmalloc(14000 * sizeof *g0), *c0 = xmalloc(14000 * sizeof *c0);
    int32_t *g1 = xmalloc(14000 * sizeof *g1), *c1 = xmalloc(14000 * sizeof *c1);
    size_t bad_cells = 0;
    for (size_t i = 0; i < a->n_cells; i++) {
        size_t n0 = (size_t)(rows[0].indptr[i + 1] - rows[0].indptr[i]);
        int64_t m0 = vocab_map_row(&maps[0], rows[0].gene + rows[0].indptr[i],
                                   rows[0].count + rows[0].indptr[i], n0, g0, c0);
        for (int k = 1; k < 3; k++) {
            size_t nk = (size_t)(rows[k].indptr[i + 1] - rows[k].indptr[i]);
            int64_t mk = vocab_map_row(&maps[k], rows[k].gene + rows[k].indptr[i],
                                       rows[k].count + rows[k].indptr[i], nk, g1, c1);
            if (mk != m0 || memcmp(g0, g1, (size_t)m0 * 4) || memcmp(c0, c1, (size_t)m0 * 4) ||
                rows[k].total[i] != rows[0].total[i])
                bad_cells++;
        }
    }
    T_CHECK(bad_cells == 0, "%zu cells differ between formats", bad_cells);
    // Range reads in pieces give the same rows.
    InputRows part;
    input_rows_init(&part);
    size_t at = 0, bad_pieces = 0;
    for (size_t c0r = 0; c0r < a->n_cells; c0r += 977) {
        size_t c1r = c0r + 977 < a->n_cells ? c0r + 977 : a->n_cells;
        if (input_read_rows(b, c0r, c1r, &part) != 0) {
            bad_pieces++;
            break;
        }
        int64_t base = rows[1].indptr[c0r];
        for (size_t i = 0; i <= c1r - c0r; i++) bad_pieces += part.indptr[i] + base != rows[1].indptr[c0r + i];
        bad_pieces += memcmp(part.count, rows[1].count + base, part.nnz * 4) != 0;
        at = c1r;
    }
    T_CHECK(bad_pieces == 0 && at == a->n_cells, "range reads differ");
    T_CHECK(input_read_rows(b, 5, 4, &part) < 0 && input_read_rows(b, 0, 99999, &part) < 0, "bad ranges");
    input_rows_free(&part);
    free(g0);
    free(c0);
    free(g1);
    free(c1);
    for (int k = 0; k < 3; k++) {
        vocab_map_free(&maps[k]);
        input_rows_free(&rows[k]);
    }
    vocab_free(&v);
done:
    input_close(a);
    input_close(b);
    input_close(c);
    free(tsv);
}

static void test_counts_check(void) {
    Input *in = open_or_fail("other/pbmc68k_reduced_lognorm.h5ad", NULL);
    if (!in) return;
    InputRows r;
    input_rows_init(&r);
    T_CHECK(input_read_rows(in, 0, in->n_cells, &r) == 0, "read: %s", error_last());
    T_CHECK(r.check.n_values == 700 * 765 && r.check.n_negative > 0, "dense X values %lld",
            (long long)r.check.n_values);
    T_CHECK(input_counts_verdict(in, &r.check) < 0, "scaled X accepted");
    T_CHECK(strstr(error_last(), "X does not hold raw counts") && strstr(error_last(), "scaled"),
            "%s", error_last());
    T_CHECK(error_last_hint() && strstr(error_last_hint(), "--use-raw"), "hint %s", error_last_hint());
    input_close(in);
    InputOptions o = {.use_raw = 1};
    in = open_or_fail("other/pbmc68k_reduced_lognorm.h5ad", &o);
    if (in) {
        T_CHECK(input_read_rows(in, 100, 300, &r) == 0, "read raw");
        T_CHECK(r.check.n_fraction > 0 && r.check.bad_cell >= 100, "raw/X non-integers, cell %lld",
                (long long)r.check.bad_cell);
        T_CHECK(input_counts_verdict(in, &r.check) < 0 && strstr(error_last(), "log-normalised"),
                "%s", error_last());
        input_close(in);
    }
    input_rows_free(&r);
    // Merging keeps the lowest cell's example.
    CountsCheck a, b;
    counts_check_init(&a);
    counts_check_init(&b);
    a.n_fraction = 2, a.bad_cell = 9, a.bad_gene = 1, a.bad_value = 0.5;
    b.n_negative = 1, b.bad_cell = 3, b.bad_gene = 2, b.bad_value = -1;
    counts_check_merge(&a, &b);
    T_CHECK(counts_check_bad(&a) == 3 && a.bad_cell == 3 && a.bad_value == -1, "merge");
}

static void test_10x_genomes(void) {
    char *p = data_path("10x_formats/1.2.0/multiple_genomes.h5");
    Input *in = input_open(p, NULL);
    T_CHECK(!in && strstr(error_last(), "2 genomes") && error_last_hint(), "%s", error_last());
    InputOptions o = {.genome = "all"};
    in = input_open(p, &o);
    T_CHECK(in && in->n_genes == 686 && in->n_cells == 12, "all genomes");
    if (in) {
        T_CHECK(strcmp(in->symbols[0], "gene_0") == 0 && strcmp(in->symbols[343], "DSCAM") == 0,
                "genomes concatenated in name order: %s %s", in->symbols[0], in->symbols[343]);
        InputRows r;
        input_rows_init(&r);
        T_CHECK(input_read_rows(in, 0, 12, &r) == 0 && r.nnz == 24, "nnz %zu", r.nnz);
        input_rows_free(&r);
        input_close(in);
    }
    o.genome = "hg19_chr21";
    in = input_open(p, &o);
    T_CHECK(in && in->n_genes == 343 && strcmp(in->matrix, "hg19_chr21") == 0, "one genome");
    input_close(in);
    free(p);
    p = data_path("10x_formats/3.0.0/filtered_feature_bc_matrix.h5");
    o.genome = "GRCh38_chr21";
    in = input_open(p, &o);
    T_CHECK(in && in->n_genes == 507 && in->n_cells == 1107, "v3 genome filter");
    T_CHECK(in && strcmp(in->ids[0], "ENSG00000279493") == 0 && strcmp(in->symbols[0], "CH507-9B2.2") == 0,
            "v3 ids and names");
    input_close(in);
    o.genome = "mm10";
    in = input_open(p, &o);
    T_CHECK(!in && strstr(error_last(), "no genome 'mm10' (genomes: GRCh38_chr21)"), "%s", error_last());
    free(p);
}

// A small MatrixMarket folder written here: cells x genes orientation, a
// feature that is not a gene, gzip barcodes, duplicate and unsorted entries.
static void test_mtx_small(void) {
    char *dir = path_join(t_tmpdir(), "mtx_small");
    path_mkdir_p(dir);
    char *stale = path_join(dir, "matrix.mtx.gz");
    unlink(stale);
    free(stale);
    char *f = path_join(dir, "features.tsv");
    FILE *fh = xfopen(f, "w");
    fputs("ENSG1\tGA\tGene Expression\nAB1\tCD4-ab\tAntibody Capture\nENSG3\tGC\tGene Expression\n", fh);
    fclose(fh);
    char *bpath = path_join(dir, "barcodes.tsv.gz");
    gzFile gz = gzopen(bpath, "wb");
    gzputs(gz, "c1\nc2\n");
    gzclose(gz);
    char *m = path_join(dir, "matrix.mtx");
    fh = xfopen(m, "w");
    // 2 cells x 3 features (transposed); cell 1: GC 4, GA 1, GA 2 (duplicate), antibody 9.
    fputs("%%MatrixMarket matrix coordinate integer general\n% comment\n2 3 5\n"
          "1 3 4\n1 1 1\n1 2 9\n1 1 2\n2 3 7\n", fh);
    fclose(fh);
    Input *in = input_open(dir, NULL);
    T_CHECK(in != NULL, "open: %s", error_last());
    if (in) {
        T_CHECK(in->n_genes == 2 && in->n_skipped == 1 && strstr(in->skipped_what, "Antibody Capture"),
                "features %zu skipped %zu", in->n_genes, in->n_skipped);
        T_CHECK(strcmp(in->layout, "cells x genes") == 0, "orientation %s", in->layout);
        InputRows r;
        input_rows_init(&r);
        T_CHECK(input_read_rows(in, 0, 2, &r) == 0, "read: %s", error_last());
        // Cell 0: GA 1, GA 2, GC 4 (genes ascending; duplicates kept for the mapping to sum).
        T_CHECK(r.nnz == 4 && r.indptr[1] == 3 && r.gene[0] == 0 && r.gene[1] == 0 && r.gene[2] == 1 &&
                    r.count[2] == 4 && r.total[0] == 7 && r.total[1] == 7,
                "rows nnz %zu", r.nnz);
        input_rows_free(&r);
        input_close(in);
    }
    // Damaged versions of the matrix.
    struct {
        const char *text, *expect;
    } bad[] = {
        {"%%MatrixMarket matrix coordinate integer general\n2 3 5\n1 3 4\n", "truncated"},
        {"%%MatrixMarket matrix coordinate integer general\n2 3 1\n1 3 4\n2 1 1\n", "more entries"},
        {"%%MatrixMarket matrix coordinate integer general\n2 3 1\n3 1 4\n", "outside the 2 x 3"},
        {"%%MatrixMarket matrix coordinate integer general\n2 3 1\n0 1 4\n", "outside"},
        {"%%MatrixMarket matrix coordinate integer general\n2 3 1\n1 1 4 5\n", "bad entry"},
        {"%%MatrixMarket matrix coordinate integer general\n2 3 1\n1 1 abc\n", "bad entry"},
        {"%%MatrixMarket matrix array real general\n2 3\n", "'array'"},
        {"%%MatrixMarket matrix coordinate integer symmetric\n2 3 1\n", "'symmetric'"},
        {"%%MatrixMarket matrix coordinate integer general\n2 3\n", "bad size line"},
        {"%%MatrixMarket matrix coordinate integer general\n99999999999 3 1\n", "impossible sizes"},
        {"%%MatrixMarket matrix coordinate integer general\n4 3 1\n", "folder lists 3 features"},
        {"%%MatrixMarket matrix coordinate integer general\n", "no size line"},
        {"hello\n", "not a MatrixMarket file"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        fh = xfopen(m, "w");
        fputs(bad[i].text, fh);
        fclose(fh);
        in = input_open(dir, NULL);
        int rc = -1;
        if (in) {
            InputRows r;
            input_rows_init(&r);
            rc = input_read_rows(in, 0, in->n_cells, &r);
            input_rows_free(&r);
            input_close(in);
        }
        T_CHECK(rc < 0 && strstr(error_last(), bad[i].expect), "case %zu: '%s'", i, error_last());
    }
    // A corrupt gzip stream.
    unlink(m);
    char *mz = path_join(dir, "matrix.mtx.gz");
    gz = gzopen(mz, "wb");
    gzputs(gz, "%%MatrixMarket matrix coordinate integer general\n2 3 2\n1 3 4\n");
    for (int i = 0; i < 20000; i++) gzputs(gz, "% padding so that the stream is long\n");
    gzputs(gz, "2 1 1\n");
    gzclose(gz);
    int64_t size = path_file_size(mz);
    T_CHECK(truncate(mz, size / 2) == 0, "truncate");
    in = input_open(dir, NULL);
    int rc = -1;
    if (in) {
        InputRows r;
        input_rows_init(&r);
        rc = input_read_rows(in, 0, in->n_cells, &r);
        input_rows_free(&r);
        input_close(in);
    }
    T_CHECK(rc < 0 && (strstr(error_last(), "truncated") || strstr(error_last(), "corrupt")),
            "truncated gzip: %s", error_last());
    unlink(mz);
    free(mz);
    free(m);
    free(bpath);
    free(f);
    free(dir);
}

static void test_labels_tsv(void) {
    char *p = data_path("10x_formats/1.2.0/filtered_gene_bc_matrices_h5.h5");
    // No header; one barcode unknown; one cell without a label.
    char *t = write_tmp("labels1.tsv", "AACACGTGTACGCTGC-1\tT\nAAGGAGCTCCGATATG-1\tB\nNOPE-1\tT\n");
    InputOptions o = {.labels_tsv = t};
    Input *in = input_open(p, &o);
    T_CHECK(in != NULL, "open: %s", error_last());
    if (in) {
        T_CHECK(strcmp(in->label_key, "label") == 0 && in->n_label_names == 2 && in->tsv_unmatched == 1,
                "key %s names %zu unmatched %zu", in->label_key, in->n_label_names, in->tsv_unmatched);
        T_CHECK(in->label_codes[0] == 0 && in->label_codes[1] == 1 && in->label_codes[2] == -1, "codes");
        input_close(in);
    }
    free(t);
    // A header, and --label-key picking a column.
    t = write_tmp("labels2.tsv", "barcode\tcoarse\tfine\nAACACGTGTACGCTGC-1\tT\tCD8 T\n");
    o.labels_tsv = t;
    o.label_key = "fine";
    in = input_open(p, &o);
    T_CHECK(in && strcmp(in->label_key, "fine") == 0 && strcmp(in->label_names[0], "CD8 T") == 0,
            "column by name");
    input_close(in);
    o.label_key = "medium";
    in = input_open(p, &o);
    T_CHECK(!in && strstr(error_last(), "no column 'medium'") && strstr(error_last(), "'fine'"), "%s",
            error_last());
    free(t);
    // Conflicting labels for one barcode.
    t = write_tmp("labels3.tsv", "AACACGTGTACGCTGC-1\tT\nAACACGTGTACGCTGC-1\tB\n");
    o.labels_tsv = t;
    o.label_key = NULL;
    in = input_open(p, &o);
    T_CHECK(!in && strstr(error_last(), "labelled twice"), "%s", error_last());
    free(t);
    free(p);
}

static void test_detect(void) {
    char *t = write_tmp("notes.txt", "hello\n");
    InputFormat f;
    T_CHECK(input_detect(t, &f) < 0 && strstr(error_last(), "unknown format") && error_last_hint(),
            "%s", error_last());
    free(t);
    T_CHECK(input_detect("/nonexistent/x.h5ad", &f) < 0 && strstr(error_last(), "does not exist"), "missing");
    char *p = data_path("other/mouse_bladder_top2000.h5ad");
    InputOptions o = {.label_key = "cell_type"};
    Input *in = input_open(p, &o);
    T_CHECK(!in && strstr(error_last(), "no obs column 'cell_type'") && strstr(error_last(), "'celltype'"),
            "%s", error_last());
    o.label_key = NULL;
    o.layer = "counts";
    in = input_open(p, &o);
    T_CHECK(!in && strstr(error_last(), "no layers/counts"), "%s", error_last());
    free(p);
}

// Damaged HDF5 files: cut short, or with bytes changed inside the compressed
// data. Opening and reading may fail, with a message; they must not crash.
static void test_damaged_h5(void) {
    const char *files[] = {"10x_formats/1.2.0/filtered_gene_bc_matrices_h5.h5",
                           "10x_formats/3.0.0/filtered_feature_bc_matrix.h5",
                           "other/mouse_bladder_top2000.h5ad"};
    size_t refused = 0, cases = 0;
    for (size_t k = 0; k < 3; k++) {
        char *src = data_path(files[k]);
        size_t len = 0;
        char *bytes = file_read_all(src, &len);
        T_CHECK(bytes != NULL, "read %s", src);
        if (!bytes) continue;
        for (int m = 0; m < 8; m++) {
            char name[64];
            snprintf(name, sizeof name, "damaged_%zu_%d.h5", k, m);
            char *p = path_join(t_tmpdir(), name);
            FILE *f = xfopen(p, "wb");
            size_t n = len;
            if (m < 4) {
                n = len * (size_t)(m + 4) / 8; // cut short
                fwrite(bytes, 1, n, f);
            } else {
                // Flip bytes in the last third (data chunks, past the metadata).
                char *copy = xmalloc(len);
                memcpy(copy, bytes, len);
                for (size_t j = 0; j < 64; j++) copy[len - len / 3 + (j * 977 * (size_t)m) % (len / 3)] ^= 0x5a;
                fwrite(copy, 1, len, f);
                free(copy);
            }
            fclose(f);
            cases++;
            Input *in = input_open(p, NULL);
            int rc = -1;
            if (in) {
                InputRows r;
                input_rows_init(&r);
                rc = input_read_rows(in, 0, in->n_cells, &r);
                if (rc == 0) rc = input_counts_verdict(in, &r.check);
                input_rows_free(&r);
                input_close(in);
            }
            if (rc != 0) {
                refused++;
                T_CHECK(strlen(error_last()) > 10, "message for %s", name);
            }
            unlink(p);
            free(p);
        }
        free(bytes);
        free(src);
    }
    T_CHECK(refused >= cases / 2, "only %zu of %zu damaged files refused", refused, cases);
}

int main(void) {
    error_h5_quiet();
    const char *d = getenv("DATA");
    snprintf(g_data, sizeof g_data, "%s", d && *d ? d : "../shared/data");
    test_vocab_rules();
    test_vocab_files();
    test_map_row();
    test_formats_agree();
    test_counts_check();
    test_10x_genomes();
    test_mtx_small();
    test_labels_tsv();
    test_detect();
    test_damaged_h5();
    return t_finish("test_inputs");
}

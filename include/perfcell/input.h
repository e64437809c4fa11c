// Reading users' atlases: AnnData .h5ad, 10x Genomics HDF5 (CellRanger v2 and
// v3) and 10x MatrixMarket folders (v2 genes.tsv, v3 features.tsv.gz, gzip or
// not). An Input gives the metadata (cells, genes, labels) at open time and
// the counts of any range of cells as sparse rows in the input's gene order.
//
// What a range read costs, by layout:
//   CSR .h5ad, 10x HDF5     the rows of the range only (indptr, then the data
//                           and indices of those rows), so under MPI each rank
//                           reads its own share;
//   dense .h5ad             the rows of the range, in blocks of about 32 MiB;
//   CSC .h5ad, MatrixMarket the whole matrix is read once (on the first range
//                           read) and kept in memory as rows, 12 bytes per
//                           stored value, on every process that reads it;
//                           convert very large ones to CSR .h5ad or 10x HDF5.
//
// Counts: a range read also checks that the stored values are raw counts
// (finite, non-negative integers below 2^31) and counts the offenders
// (CountsCheck), so that a caller reading in pieces, or several ranks, can add
// the checks up and refuse the whole matrix with one message
// (input_counts_verdict).
//
// Every function that reads a file returns 0, or -1 with error_set() naming the
// file and the fault; none aborts on bad input, and allocations are bounded by
// sizes checked against the file's actual content.
#ifndef PERFCELL_INPUT_H
#define PERFCELL_INPUT_H

#include <hdf5.h>
#include <stddef.h>
#include <stdint.h>
#include <zlib.h>

typedef enum { INPUT_H5AD = 1, INPUT_10X_H5 = 2, INPUT_10X_MTX = 3 } InputFormat;

typedef struct {
    const char *layer;      // .h5ad: read layers/<layer> instead of X (NULL: X)
    int use_raw;            // .h5ad: read raw/X, with the genes of raw/var
    const char *genome;     // 10x: the genome to read, "all" for every one (NULL: see below)
    const char *label_key;  // .h5ad: obs column of the labels; with labels_tsv: its column
    const char *labels_tsv; // barcode<TAB>label file (NULL: labels from obs, if label_key)
} InputOptions;
// Without `genome`, a CellRanger v2 file must hold a single genome and a v3
// file gives the genes of every genome.

// Stored values of a matrix that are not raw counts.
typedef struct {
    int64_t n_values;    // values examined (stored values; every value of a dense matrix)
    int64_t n_negative;  // < 0
    int64_t n_nonfinite; // NaN or infinite
    int64_t n_fraction;  // finite, >= 0, not an integer
    int64_t n_large;     // integers >= 2^31
    double max_value;    // largest finite value examined
    int64_t bad_cell;    // the first offending value (in cell order): its cell, -1 if none
    int64_t bad_gene;    // its input gene
    double bad_value;
} CountsCheck;

void counts_check_init(CountsCheck *c);
// Add `b` into `a` (the example kept is the one of the lowest cell).
void counts_check_merge(CountsCheck *a, const CountsCheck *b);
int64_t counts_check_bad(const CountsCheck *c);

// Rows of cells as read: counts > 0, genes in the input's order (ascending
// within a row except where the input stores them otherwise).
typedef struct {
    size_t n_cells, nnz;
    int64_t *indptr; // (n_cells + 1) start of each cell in gene/count
    int32_t *gene;   // (nnz) input gene index
    int32_t *count;  // (nnz) count, > 0
    int64_t *total;  // (n_cells) total counts of the cell over all input genes
    size_t cap_cells, cap_nnz;
    CountsCheck check; // values of this read that are not counts (their count is dropped)
} InputRows;

void input_rows_init(InputRows *r);
void input_rows_free(InputRows *r);

// Raw stored values, as the format back ends deliver them.
typedef struct {
    size_t n_cells, nnz;
    int64_t *indptr;    // (n_cells + 1)
    int32_t *gene;      // (nnz) input gene index
    double *value;      // (nnz) stored value
    int64_t n_implicit; // zeros examined but not listed (dense matrices)
    size_t cap_cells, cap_nnz;
} RawRows;

typedef struct Input Input;
struct Input {
    char *path;
    InputFormat format;
    char *matrix;      // the matrix read, for messages: "X", "raw/X", "layers/counts",
                       // "matrix", "hg19_chr21", "matrix.mtx.gz"
    const char *layout; // how it is stored: "CSR", "CSC", "dense", "CellRanger v2" or "v3",
                        // "genes x cells" or "cells x genes" (MatrixMarket)
    int dense;         // every value is stored (the counts check counts zeros too)
    char *others;      // the file's other matrices and the options that read them:
                       // "raw/X (--use-raw), layers/counts (--layer counts)"; "" if none
    size_t n_cells;    // cells, in input order
    size_t n_genes;    // genes, in input order
    char **cells;      // (n_cells) barcodes / cell names
    char **symbols;    // (n_genes) gene symbols
    char **ids;        // (n_genes) Ensembl ids, "" when none (an id equal to the symbol is none)
    char *genomes;     // 10x: the genome(s) read, NULL otherwise
    size_t n_skipped;  // features left out (input_feature_is_gene; 10x: other genomes)
    char *skipped_what; // what they were, for the report ("32 Antibody Capture"), NULL if none
    int32_t *feature_gene; // (features of the matrix) -> gene, -1 left out; NULL: the same
                           // (back ends that leave features out themselves, or none)

    // Labels (label_key non-NULL when the input has labels).
    char *label_key;      // the label column ("celltype")
    char *label_source;   // where they came from ("obs/celltype", a TSV path)
    size_t n_label_names;
    char **label_names;   // (n_label_names) the input's label categories
    int32_t *label_codes; // (n_cells) index into label_names, -1 when unlabelled
    size_t tsv_unmatched; // labels TSV rows whose barcode is not a cell of this input

    // Format back end.
    int (*read_raw)(Input *in, size_t c0, size_t c1, RawRows *out);
    void (*close_impl)(Input *in);
    void *impl;
    RawRows scratch;
};

// The one rule for which features are genes, in every format: a feature with no
// type or of type 'Gene Expression' (10x feature_type, the third column of
// features.tsv, an .h5ad var column feature_types); others (Antibody Capture,
// CRISPR Guide Capture, Custom) are left out with a note in the report.
int input_feature_is_gene(const char *type);
// "32 Antibody Capture, 5 of other genomes": the features of `types` (n) that
// `map` leaves out (-1) for their type, and `other_genome` more. A new string.
char *input_skipped_what(char *const *types, const int32_t *map, size_t n, size_t other_genome);

// Which format `path` is (a folder is a MatrixMarket folder). Returns 0, or -1
// with error_set() and a hint listing the formats read.
int input_detect(const char *path, InputFormat *format);
const char *input_format_name(InputFormat f);

// Open an input and read its metadata. Returns NULL with error_set() (and a
// hint where the user can fix it) on any problem.
Input *input_open(const char *path, const InputOptions *opt);
void input_close(Input *in);

// Read cells [c0, c1) (input order) into `rows` (replacing its content).
int input_read_rows(Input *in, size_t c0, size_t c1, InputRows *rows);

// 0 when `c` (the added checks of every value of the matrix, or of those read
// so far) found only counts; else -1 with error_set() naming the file, the
// matrix and what was found, and a hint naming the options that read the
// file's other matrices.
int input_counts_verdict(const Input *in, const CountsCheck *c);

// Short description for reports: "h5ad X (CSR)", "10x HDF5 v3", ...
const char *input_describe(const Input *in);

// ---------------------------------------------------------------------------
// Helpers shared by the format back ends (input_h5ad.c, input_10x.c,
// input_mtx.c) and the shard writer.

// A table from strings to indices (the strings stay owned by the caller).
typedef struct {
    size_t cap;
    int32_t *slot;      // (cap) index, -1 empty
    int32_t *next;      // (n) next index with the same string, -1 none
    char *const *strs;  // the strings indexed
    size_t n;
} StrIndex;
void str_index_build(StrIndex *t, char *const *strs, size_t n);
// First index of `s`, or -1; str_index_next() walks the others.
int32_t str_index_find(const StrIndex *t, const char *s);
int32_t str_index_next(const StrIndex *t, int32_t i);
void str_index_free(StrIndex *t);

// A growing set of distinct strings it owns, each with its code (insertion order).
typedef struct {
    size_t n, cap;
    char **names;  // (n) the strings, by code
    int32_t *slot; // (cap) code, -1 empty
} StrSet;
// The code of `s`, added if new.
int32_t str_set_add(StrSet *t, const char *s);
int32_t str_set_find(const StrSet *t, const char *s);
// Hand the names array over to the caller (the set is left empty).
char **str_set_take(StrSet *t, size_t *n);
void str_set_free(StrSet *t);

// RawRows storage.
void raw_rows_clear(RawRows *r);
void raw_rows_reserve(RawRows *r, size_t n_cells, size_t nnz);
void raw_rows_free(RawRows *r);

// Refuse a dataset that declares far more data than the file stores (a
// corrupt or hostile size), before anything is allocated for it.
int input_h5_check_storage(hid_t dset, const char *where, const char *name);
// Strings of the 1-D dataset `path`, storage checked; when expect >= 0 the
// number of values must be `expect`.
int input_h5_read_strings(hid_t file, const char *path, const char *where, int64_t expect,
                          char ***out, size_t *n);

// A cells-by-genes sparse matrix in HDF5 stored row per cell: CSR .h5ad, or a
// 10x matrix (CSC of genes x cells). `col_map` maps stored columns to input
// genes (-1: leave out), NULL for the identity.
typedef struct {
    hid_t data, indices, indptr;
    int64_t n_rows, n_cols, nnz;
    const int32_t *col_map; // (n_cols) or NULL
    int32_t gene_offset;    // added to every gene (concatenated genomes)
    char *where;            // "FILE: X", for messages
} H5RowMatrix;
// Open `group`/{data,indices,indptr} and check their sizes against n_rows,
// n_cols and each other.
int h5_row_matrix_open(H5RowMatrix *m, hid_t file, const char *group, const char *where,
                       int64_t n_rows, int64_t n_cols);
// Append rows [c0, c1) to `out`.
int h5_row_matrix_read(const H5RowMatrix *m, size_t c0, size_t c1, RawRows *out);
void h5_row_matrix_close(H5RowMatrix *m);

// One line of a gzip or plain text file into *buf (grown as needed), without
// the line end. Returns its length, -1 at the end of the file, -2 on a read
// error (a corrupt gzip stream, a line over 64 MiB).
int64_t input_gz_line(gzFile f, char **buf, size_t *cap);

// Format back ends: fill the metadata of `in` (path set) and its read_raw /
// close_impl. Labels from a TSV are added by input_open afterwards.
int input_h5ad_open(Input *in, const InputOptions *opt);
int input_10x_h5_open(Input *in, const InputOptions *opt);
int input_mtx_open(Input *in, const InputOptions *opt);

// Labels of `in` from a barcode<TAB>label file (see input_open).
int input_labels_from_tsv(Input *in, const char *tsv, const char *label_key);

// Gene ids equal to their symbol carry no information: make them "".
void input_ids_normalise(Input *in);

#endif

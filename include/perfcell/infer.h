// Inference from a checkpoint: the model rebuilt from the checkpoint's own
// configuration and vocabulary, and the cells of an input — a shard folder, or
// any atlas perfcell-shard reads (.h5ad, 10x HDF5, MatrixMarket), aligned to
// the model's vocabulary on the fly.
#ifndef PERFCELL_INFER_H
#define PERFCELL_INFER_H

#include "perfcell/checkpoint.h"
#include "perfcell/classifier.h"
#include "perfcell/config.h"
#include "perfcell/input.h"
#include "perfcell/model.h"
#include "perfcell/shard_reader.h"
#include "perfcell/stream.h"
#include "perfcell/vocab.h"

typedef struct {
    char *path;          // the checkpoint file
    CkptState ck;
    Config *cfg;         // the checkpoint's configuration
    ModelConfig mc;
    Vocab vocab;
    Model model;
    int has_classifier;  // finetune checkpoints
    ClsConfig cls_cfg;
    Classifier cls;
} InferModel;

// `spec`: a checkpoint file or a folder (its newest checkpoint). `need_cls`:
// the checkpoint must hold a classification head. Reads the checkpoint, its
// configuration and vocabulary. Returns 0 or -1 with error_set().
int infer_model_open(InferModel *im, const char *spec, int need_cls);
// Build the model for passes of at most max_cells cells of at most
// max_cell_nnz stored genes, with the checkpoint's parameters.
int infer_model_alloc(InferModel *im, size_t max_cells, size_t max_cell_nnz);
void infer_model_close(InferModel *im);

// The options predict and embed share.
typedef struct {
    const char *checkpoint, *input, *out, *label_key, *layer;
    int use_raw;
    int force;  // replace an existing --out
    long batch; // cells per forward pass (default 16)
} InferArgs;

// If argv[*i] is one of the shared options (--checkpoint, --input, --out,
// --label-key, --layer, --use-raw, --force, --batch), take it (and its value, moving
// *i past it) and return 1; return 0 for any other argument. Dies with a
// hint naming `command` on a missing or bad value.
int infer_args_take(InferArgs *a, int argc, char **argv, int *i, const char *command);
// Dies unless --checkpoint, --input and --out were given, and unless --out can
// be written without harm (path_out_check(): its folder exists, it is neither
// the input nor the checkpoint, it does not exist yet or --force was given).
void infer_args_require(const InferArgs *a, const char *command);

// The cells of an input, in order, in batches.
typedef struct {
    int is_shards;
    ShardReader *reader;   // shard folder
    Input *input;          // any other input
    VocabMap map;
    InputRows rows;
    CountsCheck check;
    int64_t n_cells, next;
    char **names;          // (n_cells) cell names
    char **label_names;    // the input's label categories (borrowed), or NULL
    size_t n_label_names;
    int32_t *labels;       // (n_cells) input label codes, -1 none; NULL without labels
    int64_t max_cell_nnz;  // stored genes of the largest cell (after mapping)
    int32_t *tmp_gene, *tmp_count;
} CellSource;

// Open `path` for the model's vocabulary (hash checked for shard folders;
// genes matched for other inputs, with a report on stdout). `label_key`:
// labels of an .h5ad obs column (NULL: none; shard folders bring theirs).
int cell_source_open(CellSource *s, const char *path, const Vocab *v, uint64_t vocab_hash,
                     const char *label_key, const char *layer, int use_raw);
// Next batch of at most n cells into cb (cell ids are input positions). Sets
// *first to the input index of its first cell. Returns the number of cells
// read (0 at the end) or -1 with error_set().
int64_t cell_source_next(CellSource *s, size_t n, CellBatch *cb, int64_t *first);
void cell_source_close(CellSource *s);

#endif

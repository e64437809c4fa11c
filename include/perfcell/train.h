// Shared pieces of the training programs (pretrain, finetune): the config
// schema, the model built from a config, the optimizer step, checkpoints
// written by the coordinator and broadcast on resume, signals, the run folder
// and its metrics file.
#ifndef PERFCELL_TRAIN_H
#define PERFCELL_TRAIN_H

#include "perfcell/allreduce.h"
#include "perfcell/checkpoint.h"
#include "perfcell/config.h"
#include "perfcell/model.h"
#include "perfcell/optim.h"
#include "perfcell/runlock.h"
#include "perfcell/stream.h"

#include <mpi.h>
#include <stdint.h>
#include <stdio.h>

// The configuration keys every training program understands.
extern const ConfigKey TRAIN_SCHEMA[];
extern const size_t TRAIN_SCHEMA_LEN;

// Model, optimizer and schedule settings from a config.
int train_model_config(const Config *c, size_t n_genes, ModelConfig *out);
void train_adam_config(const Config *c, AdamConfig *out);
SchedConfig train_sched_config(const Config *c);

// Everything a training run holds.
typedef struct Trainer_ {
    Config *cfg;
    char *config_ini;      // resolved text (for checkpoints and comparisons)
    int rank, size;
    uint64_t seed;
    char *run_dir, *ckpt_dir;
    Manifest manifest;
    char *vocab_tsv;       // text of the shard folder's vocab.tsv
    uint64_t vocab_hash;
    Model model;
    float *exp_avg, *exp_avg_sq; // (table.total)
    AdamConfig adam;
    SchedConfig sched;
    GradSync sync;
    Stream *stream;
    int64_t step;          // optimizer steps done
    int64_t cells_seen, tokens_seen;
    double train_seconds;  // wall time in the step loop over all sessions
    int metrics_fd;        // rank 0: run_dir/metrics.jsonl (append), -1 when not open
    int64_t metrics_end;   // bytes of whole lines in it
    char *metrics_error;   // rank 0: why a metrics write failed, or NULL
    char kind[16];         // "pretrain" or "finetune"
    // Runs without a stream (finetune) keep their own data cursor here.
    int64_t cursor[4];
    size_t cursor_len;
    char **labels;         // class names stored with checkpoints (finetune)
    size_t n_labels;
    RunLock lock;          // rank 0: run_dir/perfcell.lock, held until trainer_free()
    RunLock ckpt_lock;     // rank 0: the same in a checkpoint.dir of its own
} Trainer;

// Parse a training program's command line: --config FILE, key=value overrides,
// --resume auto|PATH; collective (every rank parses the same arguments).
typedef struct {
    const char *config_path;
    const char *resume; // NULL: fresh start
    const char *init;   // finetune: checkpoint to start from
    int print_config;   // --print-config: print the resolved configuration, run nothing
    const char **overrides;
    size_t n_overrides;
} TrainArgs;
int train_args_parse(int argc, char **argv, TrainArgs *a, const char *usage);

// Load the config (dies with a clear message on a bad one), check that every
// rank holds the same configuration, create the run folder and lock it (rank
// 0; a second command on the same folder is refused with the holder's host and
// pid). Nothing is written into the folder yet. Collective.
void trainer_config(Trainer *t, const TrainArgs *a, const ConfigKey *schema, size_t n_schema,
                    const char *kind);
// Open the shard folder named by data.shards; check the vocabulary (hash of
// vocab.tsv against the manifest). Collective (same on every rank).
void trainer_open_data(Trainer *t);
// Largest number of stored genes of any cell in the shards (for arena sizes).
int64_t trainer_max_cell_nnz(const Trainer *t);
// Allocate the model from `table` (moved in) and the optimizer moments;
// initialise parameters and random features from the seed; check that every
// rank holds the same number of parameters. Collective.
void trainer_build_model(Trainer *t, const ModelConfig *mc, ParamTable *table, size_t max_tokens,
                         size_t max_cells, size_t max_cell_tokens);
// Load the gene embedding from a gene2vec-format text file (SYMBOL v1 .. vd)
// given by model.gene2vec, matched to the vocabulary by symbol. Collective
// (every rank reads the file).
void trainer_load_gene2vec(Trainer *t);

// Write a checkpoint of the current state (rank 0 writes; collective: every
// rank calls it). Dies with a clear message when the write fails, leaving the
// previous checkpoints intact.
void trainer_checkpoint(Trainer *t, const CkptScalar *extra, size_t n_extra);
// Resume from `spec` ("auto" or a path): rank 0 reads and checks the
// checkpoint (vocabulary, model shape, config compatibility) and broadcasts
// parameters, moments, features, step and stream cursor. Collective. Returns
// 1 if resumed, 0 if spec is "auto" and there is no checkpoint yet.
int trainer_resume(Trainer *t, const char *spec, CkptState *loaded_scalars_out);
// Redraw the random features when the schedule says so (at step boundaries).
void trainer_maybe_redraw(Trainer *t);

// After the gradients of a step are summed: NaN/Inf check (the tensor and the
// ranks are named), clipping, the learning rate and the Adam update. Returns
// the gradient norm before clipping, or -1 when the step was skipped under
// run.nan_policy = skip (dies under stop). Collective.
double trainer_optimizer_step(Trainer *t, int local_nonfinite_tensor, double *lr_out);
// Index of the first tensor with a non-finite gradient on this rank (-1 none),
// to be checked before the all-reduce so the rank at fault is known.
int trainer_local_nonfinite(Trainer *t);

// Stop requests: SIGTERM / SIGUSR1 (cluster pre-emption) set a flag; the
// flag, the time-based checkpoint and the wall-time budget are agreed on by
// all ranks at step boundaries. Collective.
void trainer_install_signals(void);
typedef struct {
    int stop;       // a signal arrived on some rank, or run.max_minutes passed
    int checkpoint; // checkpoint.every_minutes passed (rank 0's clock)
} StepFlags;
StepFlags trainer_step_flags(Trainer *t, double *last_ckpt_time, double start_time);

// The start is accepted: called after every check that can refuse it, this
// is the first write into the run folder (checkpoint folder, config.ini,
// metrics.jsonl). A start refused before it leaves the folder as it was (a
// folder made for the run is removed again). Collective.
void trainer_begin(Trainer *t, int resumed);
// Metrics (rank 0): one JSON object per line in run_dir/metrics.jsonl, opened
// by trainer_begin() (an open that fails stops every rank). On resume, lines
// after the resumed step are dropped. Each line goes out in one checked
// write(); a write that fails (ENOSPC, EFBIG, EIO...) is cut back to the
// previous line's end, so the file never holds half a line, and the run stops
// with the error at its next collective point (trainer_step_flags,
// trainer_checkpoint, trainer_free) before any further checkpoint: exit 1,
// the last checkpoint's metrics all on disk, --resume auto continues.
void trainer_metrics_write(Trainer *t, const char *json_fields);

// Collective: a metrics write that failed since the last check ends the run
// here (see above).
void trainer_free(Trainer *t);

// Format seconds as "1h02m", "3m20s" or "12s".
const char *fmt_duration(double s, char buf[32]);

#endif

// CellLM's divide-and-conquer contrastive learning.
//
// Positive pair: two dropout views (PassCtx.view 0 and 1) of the same cell.
// Cell vector: the final hidden state pooled (last position or mean over the
// cell's positions) -> projection MLP (Linear, ReLU, Linear) -> L2-normalised
// z. Loss: InfoNCE over all N cells of the global batch (every rank), with
// temperature tau, optionally symmetric. N is decoupled from memory:
//   1. pass 1 keeps no activations: each rank encodes its cells sub-batch by
//      sub-batch, both views, keeping only z;
//   2. the coordinator (rank 0) gathers every z (MPI_Gatherv), computes the
//      loss and G = dL/dz (similarities by blocks of rows with gemm, stable
//      log-sum-exp), and scatters each rank's rows of G (MPI_Scatterv);
//   3. pass 2 re-encodes each sub-batch with activations (the same keyed
//      dropout gives bitwise the same z) and back-propagates <z, G> plus the
//      sub-batch's MLM loss; the sub-batch encoded last in pass 1 goes first,
//      its second view from the activations pass 1 left;
//   4. the caller all-reduces the gradients and steps the optimizer.
// With P the row softmax of a·bᵀ/tau:
//   dL/da_i = 1/(N tau) Σ_j (P_ij - δ_ij) b_j,  dL/db_j = 1/(N tau) Σ_i (P_ij - δ_ij) a_i
// and through the normalisation dL/dh = (g - z (zᵀg)) / |h|.
#ifndef PERFCELL_CONTRASTIVE_H
#define PERFCELL_CONTRASTIVE_H

#include "perfcell/config.h"
#include "perfcell/mlm.h"
#include "perfcell/model.h"

#include <mpi.h>

struct Trainer_;

typedef struct {
    double weight;      // 0: off
    double temperature; // tau
    int symmetric;
    int pool_mean;      // 1: mean over the cell's positions, 0: last position
    size_t proj_dim, proj_hidden;
    size_t sub_batch;   // cells per encoder pass (0: the micro-batch)
    double dropout;     // dropout of the views when the model config has none
    double label_weight; // supervised cell-type discrimination (0: off)
    size_t n_labels;
} ContrastiveConfig;

void contrastive_config(const Config *c, ContrastiveConfig *out);
// The projection MLP (contrastive.proj.0.*, contrastive.proj.2.*) and, with
// label_weight > 0, the label head (contrastive.label_head.*).
void contrastive_head_add(ParamTable *t, const ModelConfig *mc, const ContrastiveConfig *cc);

// The loss over N pairs (a_i, b_i) of unit vectors (N, D), computed by blocks
// of rows: returns L and writes ga, gb (N, D) = dL/da, dL/db (each may be NULL
// for the loss alone). Also the mean positive and negative similarities.
double contrastive_loss(const float *a, const float *b, size_t N, size_t D, double tau,
                        int symmetric, float *ga, float *gb, double *pos_sim, double *neg_sim);

typedef struct {
    ContrastiveConfig cfg;
    MPI_Comm comm;
    int rank, size;
    size_t cap_cells;          // local cells per step at most
    float *za, *zb;            // (cap_cells, D) this rank's z of both views
    float *ga, *gb;            // (cap_cells, D) this rank's rows of G
    float *all_a, *all_b, *all_ga, *all_gb; // rank 0: (N_max, D)
    size_t cap_global;
    int *counts, *displs;      // (size) Gatherv / Scatterv geometry, in floats
    size_t sub_cap_cells, sub_cap_tokens; // a sub-batch at most (the model's arena)
    TokenBatch sub;            // the current sub-batch
    float *pooled, *pre, *hid, *zraw, *z; // (sub cells, C / Hh / Hh / D / D) forward
    float *dz, *dpooled, *dpre;           // (sub cells, D / C / Hh) backward
    float *logits, *dlogits, *dhidden;    // (sub tokens, V / V / C)
    int64_t z_mismatch;        // pass-2 z that differed from pass 1 (must stay 0)
    // Statistics of the last step (rank 0, broadcast).
    double loss, pos_sim, neg_sim, label_loss;
    double coord_seconds;      // cumulative: gather, loss and scatter on the coordinator
} Contrastive;

// `cap_cells`: local cells per step at most; `cap_global`: cells in the
// global batch at most (rank 0 holds that many z). Sub-batches are at most
// the model's arena (m->max_cells cells, m->max_tokens tokens). Collective.
void contrastive_init(Contrastive *c, const Model *m, const ContrastiveConfig *cfg,
                      size_t cap_cells, size_t cap_global, MPI_Comm comm);
void contrastive_free(Contrastive *c);

// The head on m->hidden after a model_forward of tb: pooled states and unit
// z (c->z, (cells, D)).
void contrastive_head_forward(Contrastive *c, Model *m, const TokenBatch *tb);
// From dL/dz (cells, D): head gradients into m->grads, the pooling's gradient
// added into dhidden (T, C). Follows contrastive_head_forward() of tb.
void contrastive_head_backward(Contrastive *c, Model *m, const TokenBatch *tb, const float *dz,
                               float *dhidden);
// z of the cells of tb for one view (no activations kept beyond this call).
void contrastive_encode(Contrastive *c, Model *m, const TokenBatch *tb, const PassCtx *ctx, float *z);

// Where a step's local cells come from: get(ctx, i, pass) returns micro-batch
// i (0 <= i < n_mb) tokenised and masked, for pass 1 or pass 2 (the same
// cells, tokens and masks both times). Each pass asks for i = 0, 1, ... once,
// in order, and uses a batch only until the next call, so a source can read
// the cells anew in pass 2 rather than keep the step in memory. NULL with
// error_set() when the cells cannot be read.
typedef struct {
    const TokenBatch *(*get)(void *ctx, size_t i, int pass);
    void *ctx;
    size_t n_mb;
    const size_t *n_cells; // (n_mb) cells of each micro-batch (zero allowed)
} StepCells;

// One step's loss and gradients (accumulated into m->grads) for this rank's
// cells: both passes, the coordinator's loss, and the MLM loss (weight
// mlm_weight, normalised by n_norm, or by the global count of masked
// positions when n_norm <= 0) in pass 2. Sub-batches of cfg.sub_batch cells
// may span micro-batches. *loss receives the contrastive loss (the same on
// every rank). Returns 0; when a rank's source failed, -1 on that rank
// (error_set() names the fault) and -2 on the others. Collective.
int contrastive_step_cells(Contrastive *c, Model *m, const StepCells *cells, uint64_t seed,
                           int64_t step, double mlm_weight, double n_norm, MlmStats *st,
                           double *loss);
// The same over micro-batches in memory, for tests: local cells are the
// cells of mbs (any number, zero allowed). Returns the contrastive loss.
double contrastive_step_keys(Contrastive *c, Model *m, const TokenBatch *mbs, size_t n_mb,
                             uint64_t seed, int64_t step, double mlm_weight, double n_norm,
                             MlmStats *st);
// Validation: contrastive loss, mean positive / negative similarity,
// alignment and uniformity (Wang & Isola) on held-out cells; logged and
// written to the metrics by rank 0. Collective.
void contrastive_validate(Contrastive *c, struct Trainer_ *t, const ModelConfig *mc, TokenBatch *tb);

#endif

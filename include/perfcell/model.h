// scBERT's Performer encoder: configuration, parameters (scBERT state_dict
// names), activation arena, forward and backward on packed cells.
//
// Letters: B cells, T tokens (packed over the cells of a micro-batch), C model
// width, H heads, E head width, M random features, F feed-forward width,
// G vocabulary genes, V token classes (bins + 2).
#ifndef PERFCELL_MODEL_H
#define PERFCELL_MODEL_H

#include "perfcell/favor.h"
#include "perfcell/params.h"

#include <stddef.h>
#include <stdint.h>

typedef enum { SEQ_FULL = 0, SEQ_NONZERO = 1 } SeqMode;

typedef struct {
    SeqMode mode;
    size_t n_genes;     // G
    size_t dim;         // C
    size_t depth;       // L
    size_t heads;       // H
    size_t dim_head;    // E
    size_t n_features;  // M
    size_t ff_dim;      // F
    int bins;           // tokens 0..bins are expression bins, bins + 1 is MASK / PAD
    int gene_emb_frozen;
    float dropout_emb, dropout_attn, dropout_ff;
    size_t max_tokens;  // nonzero mode: genes kept per cell at most (0: all)
    int recompute;      // recompute each layer's activations in backward
    int64_t feature_redraw_interval; // optimizer steps between feature redraws (0: never)
} ModelConfig;

// Packed cells as the model consumes them.
typedef struct {
    size_t n_cells, n_tokens; // B, T
    int64_t *offset;          // (B + 1) token range of each cell
    int32_t *token;           // (T) expression token (masked where MLM chose so)
    int32_t *gene;            // (T) gene-embedding row; G for each cell's last position
    int32_t *target;          // (T) MLM target class, -1 where no loss is taken
    int64_t *cell_id;         // (B) global cell id (keys of dropout and masking)
    int32_t *label;           // (B) label code or -1
    size_t cap_cells, cap_tokens;
} TokenBatch;

void tokenbatch_init(TokenBatch *tb);
void tokenbatch_free(TokenBatch *tb);
void tokenbatch_reserve(TokenBatch *tb, size_t n_cells, size_t n_tokens);

// Keys for the randomness of one pass (dropout). train = 0 turns dropout off.
typedef struct {
    uint64_t seed;
    int64_t step;
    int view;
    int train;
} PassCtx;

typedef struct {
    float *ln1_w, *ln1_b;     // (C)
    float *wq, *wk, *wv;      // (H·E, C)
    float *wo, *bo;           // (C, H·E), (C)
    float *ln2_w, *ln2_b;     // (C)
    float *w1, *b1;           // (F, C), (F)
    float *w2, *b2;           // (C, F), (C)
} LayerWeights;

typedef struct {
    float *ln1, *ln1_mean, *ln1_rstd; // (T, C), (T), (T)
    float *q, *k, *v;                 // (T, H·E)
    float *attn;                      // (T, H·E) attention output before to_out
    float *res1;                      // (T, C) residual stream after attention
    float *ln2, *ln2_mean, *ln2_rstd; // (T, C), (T), (T)
    float *ff_pre;                    // (T, F) before GELU
    float *ff_act;                    // (T, F) after GELU and dropout
    FavorCache favor;
} LayerActs;

// Where the time of forward and backward goes (filled when Model.profile is
// set; used by benchmarks).
typedef enum {
    PROF_EMBED,      // embedding (and its backward)
    PROF_NORM,       // LayerNorms
    PROF_QKV,        // q, k, v projections
    PROF_FAVOR,      // FAVOR+ attention
    PROF_OUT,        // attention output projection
    PROF_FFN,        // feed-forward (w1, GELU, w2)
    PROF_DROPOUT,    // dropout masks
    PROF_N
} ProfPart;
extern const char *const PROF_NAMES[PROF_N];

typedef struct {
    ModelConfig cfg;
    ParamTable table;
    int profile;           // accumulate section times into prof_fwd / prof_bwd
    int forward_only;      // allocated by model_alloc_inference(): no gradients, no backward
    double prof_fwd[PROF_N], prof_bwd[PROF_N];
    float *params, *grads; // (table.total) flat buffers in table order
    // Pointers into params / grads.
    float *token_emb, *gene_emb, *norm_w, *norm_b;
    float *dtoken_emb, *dgene_emb, *dnorm_w, *dnorm_b;
    LayerWeights *w, *dw; // (L)
    // What backward must produce, from the table's trainable flags: frozen
    // blocks get no weight gradients, and backward stops below the lowest
    // trainable block when the embeddings are frozen too.
    int *layer_trainable; // (L)
    int emb_trainable, norm_trainable, any_trainable;
    float *proj;          // (L, M, E) random features of each layer
    int64_t redraw_index; // which redraw the features come from
    uint64_t feature_seed;

    // Arena, sized at model_alloc() for at most max_tokens tokens in at most
    // max_cells cells of at most max_cell_tokens tokens each.
    size_t max_tokens, max_cells, max_cell_tokens;
    float *arena;
    void *iarena;
    size_t arena_bytes;
    float **x;        // (L + 1) residual stream: x[0] embeddings, x[l + 1] block l output
    float *hidden;    // (T, C) after the final LayerNorm
    float *fin_mean, *fin_rstd;
    LayerActs *acts;  // (L), or (1) with recompute
    float *dx, *dtmp, *dln, *dq, *dk, *dv, *dattn, *dff, *favor_scratch;
} Model;

// Add the encoder's tensors to a parameter table, with scBERT's names:
// token_emb.weight, pos_emb.emb.weight, performer.net.layers.{i}.0.norm.*,
// ...0.fn.to_q/to_k/to_v.weight, ...0.fn.to_out.*, ...1.norm.*,
// ...1.fn.fn.w1.*, ...1.fn.fn.w2.*, norm.*. Heads add theirs after.
void model_table_add_encoder(ParamTable *t, const ModelConfig *cfg);

// Check a configuration; returns 0 or -1 with error_set().
int model_config_check(const ModelConfig *cfg);

// Take the table (moved into the model), allocate parameters, gradients and
// the activation arena. Returns 0 or -1 with error_set() (sizes).
int model_alloc(Model *m, const ModelConfig *cfg, ParamTable *table, size_t max_tokens,
                size_t max_cells, size_t max_cell_tokens);
// The same for inference: parameters and the forward pass only (no gradient
// buffer, one block's activations, no backward scratch). model_backward()
// must not be called.
int model_alloc_inference(Model *m, const ModelConfig *cfg, ParamTable *table, size_t max_tokens,
                          size_t max_cells, size_t max_cell_tokens);
void model_free(Model *m);
// Bytes the arena would take for these sizes (for planning and reports).
size_t model_arena_bytes(const ModelConfig *cfg, size_t max_tokens, size_t max_cells,
                         size_t max_cell_tokens);

// Keyed initialisation of every parameter; the gene embedding's last row is 0.
void model_init_params(Model *m, uint64_t seed);
// Draw the orthogonal random features of every layer for redraw `index`,
// keyed by (seed, layer, index): every rank holds the same matrices.
void model_draw_features(Model *m, uint64_t seed, int64_t index);
// Orthogonal random features (M, E): blocks of rows of Qᵀ from QR of E×E
// Gaussians, each row scaled by the norm of an independent Gaussian E-vector.
void favor_features_draw(float *proj, size_t M, size_t E, uint64_t seed, uint32_t layer,
                         int64_t index);

// Forward: m->hidden (T, C) for the packed cells of tb.
void model_forward(Model *m, const TokenBatch *tb, const PassCtx *ctx);
// Backward from dhidden (T, C) (consumed), accumulating into m->grads.
// Must follow the model_forward() of the same batch and ctx.
void model_backward(Model *m, const TokenBatch *tb, const PassCtx *ctx, float *dhidden);

// Zero the gradients.
void model_zero_grad(Model *m);

// Floating-point operations of one forward (matrix products only) of a cell
// of n tokens; backward is about twice that.
double model_forward_flops_cell(const ModelConfig *cfg, size_t n);

#endif

// Cell-type classification heads on the encoder's final hidden states.
//
// scBERT's head: Conv2d(1, 1, (1, C)) over each position (a dot product with a
// C-vector plus a bias) -> ReLU -> Linear(T, 512) -> ReLU -> Linear(512,
// hidden) -> ReLU -> Linear(hidden, classes), T = G + 1 gene slots. Tensor
// names follow scBERT (to_out.conv1.*, to_out.fc1.*, to_out.fc2.*,
// to_out.fc3.*); to_out.conv1.weight is stored (1, C) (torch: (1, 1, 1, C)).
// In full mode this is scBERT's head exactly; in nonzero mode each position
// goes to its gene's slot and the slots of absent genes are 0.
//
// Linear head (any mode): the same per-position projection at gene slots and
// ReLU, then one Linear(G + 1, classes) (tensors cls.slot.*, cls.fc.*): a
// logistic regression over learned per-gene features, which regularises well
// on small labelled sets. `perfcell finetune` starts the projection as the
// least-squares readout of each position's expression token from its hidden
// state, so that the slots begin as the cells' expression levels.
//
// Pooled head (any mode): mean or last-position pooling -> Linear(C, hidden)
// -> ReLU -> Linear(hidden, classes), tensors cls.fc1.*, cls.fc2.*.
#ifndef PERFCELL_CLASSIFIER_H
#define PERFCELL_CLASSIFIER_H

#include "perfcell/model.h"

typedef enum { CLS_SCBERT = 0, CLS_POOLED = 1, CLS_LINEAR = 2 } ClsKind;

typedef struct {
    ClsKind kind;
    size_t n_classes;
    size_t hidden;  // scBERT: 128
    int pool_mean;  // pooled head: mean (1) or last position (0)
} ClsConfig;

#define CLS_SCBERT_FC1 512

void classifier_head_add(ParamTable *t, const ModelConfig *mc, const ClsConfig *cc);
// The head of a finetune.head value: "scbert", "linear", "pooled", or "auto"
// (scBERT's in full mode, linear in nonzero mode).
ClsKind cls_kind_of(const char *name, SeqMode mode);
// Number of tensors of a head.
size_t cls_tensor_count(ClsKind kind);

typedef struct {
    ClsConfig cfg;
    size_t C, T_cell, max_cells;
    const float *w[8];  // parameters in order of the head's tensors
    float *dw[8];
    float *x0;          // (B, T_cell) scBERT conv output (pre-ReLU) or (B, C) pooled
    float *a1, *a2;     // (B, 512 / hidden) pre-activations of the hidden layers
    float *h1, *h2;     // post-ReLU
    float *d1, *d2, *dx0; // backward scratch
} Classifier;

// Bind to the model's parameters (the head's tensors must be in m->table).
void classifier_init(Classifier *c, const Model *m, const ClsConfig *cfg);
void classifier_free(Classifier *c);
// logits (B, classes) for the cells of tb from m->hidden.
void classifier_forward(Classifier *c, const Model *m, const TokenBatch *tb, float *logits);
// From dlogits (B, classes): head gradients accumulate into m->grads;
// dhidden (T, C) is overwritten.
void classifier_backward(Classifier *c, Model *m, const TokenBatch *tb, const float *dlogits,
                         float *dhidden);
// Linear head: the ReLU slot value of each of tb's positions (T) from
// m->hidden, as classifier_forward computes it before placing it at the
// position's gene slot (logits = fc(slots)). With the slot projection and the
// encoder fixed these are the head's fixed features.
void classifier_slot_values(const Classifier *c, const Model *m, const TokenBatch *tb, float *s);

// Cross-entropy of logits (B, K) against labels (-1 ignored) with optional
// class weights (NULL: 1); dlogits = d(Σ w_y CE) / norm. Adds to *correct the
// arg-max hits. Returns Σ w_y CE / norm.
double classifier_loss(float *dlogits, const float *logits, const int32_t *label, size_t B,
                       size_t K, const double *class_weight, double norm, int64_t *correct);
// Softmax probabilities (B, K) in place.
void classifier_softmax(float *p, size_t B, size_t K);

#endif

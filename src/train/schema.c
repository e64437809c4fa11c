// The configuration keys of the training programs.
#include "perfcell/error.h"
#include "perfcell/train.h"

#include <string.h>

#define NOR 1, 0 // no range check

// clang-format off
const ConfigKey TRAIN_SCHEMA[] = {
    {"run.dir", CFG_STRING, "runs/pretrain", NOR, NULL, "run folder: resolved config, metrics, checkpoints"},
    {"run.seed", CFG_INT, "42", 0, 4294967295.0, NULL, "seed of every random choice (init, masking, dropout, order)"},
    {"run.max_steps", CFG_INT, "1000", 1, 1e12, NULL, "optimizer steps of the whole run"},
    {"run.log_every", CFG_INT, "10", 1, 1e9, NULL, "steps between progress lines"},
    {"run.val_every", CFG_INT, "100", 0, 1e9, NULL, "steps between validation passes (0: only at the end)"},
    {"run.val_cells", CFG_INT, "512", 0, 1e12, NULL, "validation cells per pass at most (0: all)"},
    {"run.nan_policy", CFG_CHOICE, "stop", NOR, "stop|skip", "on NaN/Inf gradients: stop the run, or skip the step"},
    {"run.max_minutes", CFG_FLOAT, "0", 0, 1e9, NULL, "wall-time budget: checkpoint and exit 0 after it (0: none)"},

    {"data.shards", CFG_STRING, "", NOR, NULL, "shard folder (from perfcell-shard build)"},
    {"data.mode", CFG_CHOICE, "full", NOR, "full|nonzero", "sequence: all genes (scBERT) or the cell's nonzero genes"},
    {"data.max_tokens", CFG_INT, "0", 0, 1e9, NULL, "nonzero mode: genes kept per cell at most (0: all)"},
    {"data.val_fraction", CFG_FLOAT, "0.05", 0, 0.9, NULL, "share of cells held out for validation"},
    {"data.split_seed", CFG_INT, "0", 0, 4294967295.0, NULL, "key of the validation split (stable across runs)"},
    {"data.block_cells", CFG_INT, "256", 1, 1e7, NULL, "cells per read block of the stream"},
    {"data.prefetch", CFG_INT, "4", 0, 1024, NULL, "micro-batches read ahead by the prefetch thread"},

    {"model.dim", CFG_INT, "200", 1, 1e5, NULL, "model width"},
    {"model.depth", CFG_INT, "6", 1, 1000, NULL, "Performer blocks"},
    {"model.heads", CFG_INT, "10", 1, 1000, NULL, "attention heads"},
    {"model.dim_head", CFG_INT, "64", 1, 4096, NULL, "width of each head"},
    {"model.nb_features", CFG_INT, "266", 1, 1e5, NULL, "FAVOR+ random features"},
    {"model.ff_dim", CFG_INT, "800", 1, 1e6, NULL, "feed-forward width"},
    {"model.bins", CFG_INT, "5", 1, 1000, NULL, "expression bins (tokens 0..bins; bins+1 is MASK)"},
    {"model.gene_emb", CFG_CHOICE, "learned", NOR, "learned|frozen", "gene embedding: learned, or frozen (gene2vec)"},
    {"model.gene2vec", CFG_STRING, "", NOR, NULL, "gene2vec text file (SYMBOL v1 .. vd) for the gene embedding"},
    {"model.dropout_emb", CFG_FLOAT, "0", 0, 0.99, NULL, "dropout after the embedding"},
    {"model.dropout_attn", CFG_FLOAT, "0", 0, 0.99, NULL, "dropout on the attention output"},
    {"model.dropout_ff", CFG_FLOAT, "0", 0, 0.99, NULL, "dropout after GELU"},
    {"model.feature_redraw_interval", CFG_INT, "1000", 0, 1e12, NULL, "optimizer steps between random-feature redraws (0: never)"},
    {"model.recompute", CFG_BOOL, "false", NOR, NULL, "recompute each block in backward (less memory)"},

    {"mlm.mask_prob", CFG_FLOAT, "0.15", 0, 1, NULL, "share of nonzero-bin positions chosen per cell"},
    {"mlm.replace_prob", CFG_FLOAT, "0.9", 0, 1, NULL, "share of chosen positions replaced by MASK"},
    {"mlm.weight", CFG_FLOAT, "1", 0, 1e6, NULL, "weight of the MLM loss"},

    {"contrastive.weight", CFG_FLOAT, "0", 0, 1e6, NULL, "weight of the contrastive loss (0: MLM only)"},
    {"contrastive.temperature", CFG_FLOAT, "0.05", 1e-4, 100, NULL, "InfoNCE temperature"},
    {"contrastive.symmetric", CFG_BOOL, "false", NOR, NULL, "InfoNCE in both directions"},
    {"contrastive.pooling", CFG_CHOICE, "last", NOR, "last|mean", "cell vector: last position or mean over tokens"},
    {"contrastive.proj_dim", CFG_INT, "128", 1, 1e5, NULL, "projection output width"},
    {"contrastive.proj_hidden", CFG_INT, "256", 1, 1e5, NULL, "projection hidden width"},
    {"contrastive.sub_batch", CFG_INT, "0", 0, 1e9, NULL, "cells per encoder pass (0: the micro-batch)"},
    {"contrastive.dropout", CFG_FLOAT, "0.1", 0, 0.99, NULL, "dropout of both views (overrides model.dropout_* when contrastive)"},
    {"contrastive.label_weight", CFG_FLOAT, "0", 0, 1e6, NULL, "weight of supervised cell-type discrimination (needs labels)"},

    {"optim.kind", CFG_CHOICE, "adam", NOR, "adam|adamw", "optimizer (scBERT: adam)"},
    {"optim.lr", CFG_FLOAT, "1e-4", 0, 10, NULL, "peak learning rate"},
    {"optim.beta1", CFG_FLOAT, "0.9", 0, 0.999999, NULL, "Adam beta1"},
    {"optim.beta2", CFG_FLOAT, "0.999", 0, 0.99999999, NULL, "Adam beta2"},
    {"optim.eps", CFG_FLOAT, "1e-8", 0, 1, NULL, "Adam epsilon"},
    {"optim.weight_decay", CFG_FLOAT, "0", 0, 10, NULL, "weight decay of weight matrices"},
    {"optim.clip_norm", CFG_FLOAT, "100", 0, 1e12, NULL, "global gradient-norm clip (0: none; scBERT: 100)"},

    {"schedule.kind", CFG_CHOICE, "cosine", NOR, "constant|cosine|cosine_restarts", "learning-rate schedule"},
    {"schedule.warmup_steps", CFG_INT, "0", 0, 1e12, NULL, "linear warmup steps"},
    {"schedule.min_lr", CFG_FLOAT, "1e-6", 0, 10, NULL, "floor of the cosine"},
    {"schedule.cycle_steps", CFG_INT, "15", 1, 1e12, NULL, "cosine_restarts: first cycle length"},
    {"schedule.cycle_mult", CFG_FLOAT, "2", 1, 100, NULL, "cosine_restarts: cycle length growth"},
    {"schedule.gamma", CFG_FLOAT, "0.9", 0, 1, NULL, "cosine_restarts: peak decay per cycle"},

    {"batch.micro_batch", CFG_INT, "1", 1, 1e6, NULL, "cells per micro-batch"},
    {"batch.global_batch", CFG_INT, "0", 0, 1e9, NULL, "cells per optimizer step (0: micro_batch x accumulation x ranks)"},
    {"batch.accumulation", CFG_INT, "1", 1, 1e6, NULL, "micro-batches per rank per step when global_batch is 0"},

    {"checkpoint.dir", CFG_STRING, "", NOR, NULL, "checkpoint folder (default: RUN_DIR/checkpoints)"},
    {"checkpoint.every_steps", CFG_INT, "500", 0, 1e12, NULL, "steps between checkpoints (0: none)"},
    {"checkpoint.every_minutes", CFG_FLOAT, "0", 0, 1e9, NULL, "minutes between checkpoints (0: none)"},
    {"checkpoint.keep", CFG_INT, "3", 0, 1e6, NULL, "checkpoints kept (0: all)"},

    {"dist.bucket_mb", CFG_FLOAT, "16", 0.001, 1e5, NULL, "all-reduce bucket size in MiB"},
    {"dist.overlap", CFG_BOOL, "false", NOR, NULL, "start all-reduce buckets non-blocking (MPI_Iallreduce)"},

    {"finetune.label_key", CFG_STRING, "", NOR, NULL, "finetune: label column (default: the shards' label key)"},
    {"finetune.head", CFG_CHOICE, "auto", NOR, "auto|scbert|linear|pooled", "finetune: scBERT's head, a linear readout of gene slots, or a pooled MLP (auto: scbert in full mode, linear in nonzero mode)"},
    {"finetune.pooling", CFG_CHOICE, "mean", NOR, "mean|last", "finetune: pooling of the pooled head"},
    {"finetune.hidden", CFG_INT, "128", 1, 1e5, NULL, "finetune: hidden width of the pooled head"},
    {"finetune.freeze", CFG_CHOICE, "scbert", NOR, "scbert|none|embeddings|all", "finetune: scBERT's policy, train all (none), all but the embeddings, or the head only (all)"},
    {"finetune.val_fraction", CFG_FLOAT, "0.2", 0.01, 0.9, NULL, "finetune: stratified validation share"},
    {"finetune.epochs", CFG_INT, "10", 1, 1e6, NULL, "finetune: epochs at most"},
    {"finetune.patience", CFG_INT, "3", 0, 1e6, NULL, "finetune: epochs without a better validation macro-F1 before stopping (0: none)"},
    {"finetune.class_weights", CFG_BOOL, "false", NOR, NULL, "finetune: weight the loss by inverse class frequency"},
    {"finetune.test_fraction", CFG_FLOAT, "0", 0, 0.9, NULL, "finetune: stratified test share held out entirely"},
    {"finetune.split_seed", CFG_INT, "2021", 0, 4294967295.0, NULL, "finetune: key of the stratified splits"},
    {"finetune.split_file", CFG_STRING, "", NOR, NULL, "finetune: TSV of cell name and train|val|test (overrides the fractions)"},
    {"finetune.solver", CFG_CHOICE, "minibatch", NOR, "minibatch|lbfgs", "finetune: minibatch ([optim], [schedule], [batch]) or lbfgs: the linear head's readout by full-batch L-BFGS on the cached frozen encoder, slot projection fixed at its expression readout, L2 penalty optim.weight_decay/2 |W|^2 (a logistic regression on the slots)"},
    {"finetune.lbfgs_iters", CFG_INT, "100", 1, 1e6, NULL, "finetune: L-BFGS iterations per epoch (each epoch starts a fresh history)"},
    {"finetune.cache_mib", CFG_INT, "4096", 0, 1e7, NULL, "finetune: with a frozen encoder (freeze = all, no dropout, no feature redraws, fixed tokens), its hidden states of the training and validation cells are kept in memory up to this size per rank, so that epochs train the head alone (0: never)"},
};
// clang-format on
const size_t TRAIN_SCHEMA_LEN = sizeof TRAIN_SCHEMA / sizeof TRAIN_SCHEMA[0];

int train_model_config(const Config *c, size_t n_genes, ModelConfig *m) {
    memset(m, 0, sizeof *m);
    m->mode = strcmp(config_str(c, "data.mode"), "nonzero") == 0 ? SEQ_NONZERO : SEQ_FULL;
    m->n_genes = n_genes;
    m->dim = (size_t)config_int(c, "model.dim");
    m->depth = (size_t)config_int(c, "model.depth");
    m->heads = (size_t)config_int(c, "model.heads");
    m->dim_head = (size_t)config_int(c, "model.dim_head");
    m->n_features = (size_t)config_int(c, "model.nb_features");
    m->ff_dim = (size_t)config_int(c, "model.ff_dim");
    m->bins = (int)config_int(c, "model.bins");
    m->gene_emb_frozen = strcmp(config_str(c, "model.gene_emb"), "frozen") == 0;
    m->dropout_emb = (float)config_float(c, "model.dropout_emb");
    m->dropout_attn = (float)config_float(c, "model.dropout_attn");
    m->dropout_ff = (float)config_float(c, "model.dropout_ff");
    m->max_tokens = (size_t)config_int(c, "data.max_tokens");
    m->recompute = config_bool(c, "model.recompute");
    m->feature_redraw_interval = config_int(c, "model.feature_redraw_interval");
    return model_config_check(m);
}

void train_adam_config(const Config *c, AdamConfig *a) {
    a->decoupled = strcmp(config_str(c, "optim.kind"), "adamw") == 0;
    a->beta1 = (float)config_float(c, "optim.beta1");
    a->beta2 = (float)config_float(c, "optim.beta2");
    a->eps = (float)config_float(c, "optim.eps");
    a->weight_decay = (float)config_float(c, "optim.weight_decay");
}

SchedConfig train_sched_config(const Config *c) {
    SchedConfig s;
    const char *k = config_str(c, "schedule.kind");
    s.kind = strcmp(k, "constant") == 0 ? SCHED_CONSTANT
             : strcmp(k, "cosine") == 0 ? SCHED_COSINE
                                        : SCHED_COSINE_RESTARTS;
    s.lr = config_float(c, "optim.lr");
    s.min_lr = config_float(c, "schedule.min_lr");
    s.warmup = config_int(c, "schedule.warmup_steps");
    s.total = config_int(c, "run.max_steps");
    s.cycle_steps = config_int(c, "schedule.cycle_steps");
    s.cycle_mult = config_float(c, "schedule.cycle_mult");
    s.gamma = config_float(c, "schedule.gamma");
    return s;
}

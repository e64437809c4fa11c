// The parameter table: every tensor's name (scBERT's state_dict names), shape
// and offset in one contiguous buffer. Parameters, gradients and each optimizer
// moment are separate buffers with this same layout, so the all-reduce and the
// optimizer are flat loops.
#ifndef PERFCELL_PARAMS_H
#define PERFCELL_PARAMS_H

#include <stddef.h>
#include <stdint.h>

#define PARAM_NAME_MAX 96

typedef enum {
    INIT_ZEROS,
    INIT_ONES,
    INIT_NORMAL,  // N(0, scale²)
    INIT_UNIFORM, // U(-scale, scale)
} ParamInit;

typedef struct {
    char name[PARAM_NAME_MAX];
    int ndim;          // 1 or 2
    size_t shape[2];   // torch shape (Linear weight: (out, in))
    size_t offset;     // in floats, into the flat buffers
    size_t size;       // number of floats
    int trainable;     // 0: frozen (no gradient, no optimizer update)
    int decay;         // 1: weight decay applies (matrices), 0: biases, norms, embeddings
    ParamInit init;
    float init_scale;
} ParamEntry;

typedef struct {
    ParamEntry *e;
    size_t n, cap;
    size_t total; // floats in all tensors
} ParamTable;

void param_table_init(ParamTable *t);
void param_table_free(ParamTable *t);
// Append a tensor; offsets are assigned in order (aligned to 16 floats so that
// every tensor starts on a 64-byte boundary). Returns its index.
size_t param_table_add(ParamTable *t, const char *name, int ndim, size_t d0, size_t d1,
                       int trainable, int decay, ParamInit init, float init_scale);
// NULL if absent.
const ParamEntry *param_table_find(const ParamTable *t, const char *name);
// Fill `params` with the keyed initialisation of every tensor (RNG_INIT keyed
// by seed and tensor index; independent of anything else).
void param_table_init_values(const ParamTable *t, float *params, uint64_t seed);
// Number of trainable floats.
size_t param_table_trainable(const ParamTable *t);

// A 64-byte aligned, zeroed float buffer of n floats (free with free()).
float *floats_alloc(size_t n);

#endif

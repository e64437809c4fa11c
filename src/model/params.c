// The parameter table and flat buffers.
#include "perfcell/params.h"

#include "perfcell/error.h"
#include "perfcell/rng.h"

#include <stdlib.h>
#include <string.h>

void param_table_init(ParamTable *t) { memset(t, 0, sizeof *t); }

void param_table_free(ParamTable *t) {
    free(t->e);
    memset(t, 0, sizeof *t);
}

size_t param_table_add(ParamTable *t, const char *name, int ndim, size_t d0, size_t d1,
                       int trainable, int decay, ParamInit init, float init_scale) {
    CHECK(strlen(name) < PARAM_NAME_MAX, "internal: parameter name too long: %s", name);
    CHECK(!param_table_find(t, name), "internal: duplicate parameter %s", name);
    if (t->n == t->cap) {
        t->cap = t->cap ? 2 * t->cap : 64;
        t->e = xrealloc(t->e, t->cap * sizeof *t->e);
    }
    ParamEntry *p = &t->e[t->n];
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "%s", name);
    p->ndim = ndim;
    p->shape[0] = d0;
    p->shape[1] = ndim == 2 ? d1 : 1;
    p->size = d0 * p->shape[1];
    p->offset = (t->total + 15) / 16 * 16;
    p->trainable = trainable;
    p->decay = decay;
    p->init = init;
    p->init_scale = init_scale;
    t->total = p->offset + p->size;
    return t->n++;
}

const ParamEntry *param_table_find(const ParamTable *t, const char *name) {
    for (size_t i = 0; i < t->n; i++)
        if (strcmp(t->e[i].name, name) == 0) return &t->e[i];
    return NULL;
}

void param_table_init_values(const ParamTable *t, float *params, uint64_t seed) {
    for (size_t i = 0; i < t->n; i++) {
        const ParamEntry *p = &t->e[i];
        float *x = params + p->offset;
        Rng r = rng_init(seed, RNG_INIT, 0, i, 0);
        for (size_t j = 0; j < p->size; j++) {
            switch (p->init) {
            case INIT_ZEROS: x[j] = 0.0f; break;
            case INIT_ONES: x[j] = 1.0f; break;
            case INIT_NORMAL: x[j] = (float)(rng_normal(&r) * p->init_scale); break;
            case INIT_UNIFORM: x[j] = (2.0f * rng_uniform(&r) - 1.0f) * p->init_scale; break;
            }
        }
    }
}

size_t param_table_trainable(const ParamTable *t) {
    size_t n = 0;
    for (size_t i = 0; i < t->n; i++)
        if (t->e[i].trainable) n += t->e[i].size;
    return n;
}

float *floats_alloc(size_t n) {
    void *p = NULL;
    size_t bytes = (n ? n : 1) * sizeof(float);
    bytes = (bytes + 63) / 64 * 64;
    if (posix_memalign(&p, 64, bytes) != 0 || !p)
        DIE("out of memory allocating %zu floats (%.1f MiB)", n, (double)bytes / 1048576.0);
    memset(p, 0, bytes);
    return p;
}

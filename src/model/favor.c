// FAVOR+ attention kernels for float (see tmpl/favor_impl.h).
#include "perfcell/favor.h"

#include "perfcell/linalg.h"

#include <math.h>
#include <string.h>

size_t favor_cache_floats(const FavorDims *d, size_t T, size_t n_cells) {
    size_t THM = T * d->H * d->M;
    return 2 * THM + 2 * T * d->H + n_cells + n_cells * d->H * d->M * (1 + d->E);
}

size_t favor_cache_ints_bytes(const FavorDims *d, size_t T, size_t n_cells) {
    return n_cells * sizeof(int64_t) + T * d->H * sizeof(int32_t);
}

size_t favor_scratch_floats(const FavorDims *d, size_t n_max) {
    // dnum (n, E), dA and dB (n, M), dden and a spare row (n), dctx (M, E), dS (M)
    return n_max * d->E + 2 * n_max * d->M + 2 * n_max + d->M * d->E + d->M;
}

#define real float
#define FN(name) name
#define FAVOR_CACHE FavorCache
#define GEMM gemm
#define EXP fast_expf
#define POW powf
#define SQRT sqrtf
#include "tmpl/favor_impl.h"

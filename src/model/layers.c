// Layer kernels for float (see tmpl/layers_impl.h).
#include "perfcell/layers.h"

#include "perfcell/linalg.h"

#include <math.h>
#include <string.h>

#define real float
#define FN(name) name
#define GEMM gemm
#define EXP fast_expf
#define ERF fast_erff
#include "tmpl/layers_impl.h"

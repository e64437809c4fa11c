// Fuzz the AnnData .h5ad reader: the input is one .h5ad file, opened and read
// with the options a user can give (labels from obs, raw/X, a layer).
//
// Seeds: tests/fuzz/corpus/h5ad/ (pbmc3k cells as CSR, CSC, dense and with
// layers/counts and raw/X; scanpy's reduced PBMC 68k, which is not counts).
#define FUZZ_HDF5
#include "fuzz_input.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int ready;
    static char path[4200];
    if (!ready) {
        fuzz_h5_init();
        fuzz_path(path, sizeof path, "cells.h5ad");
        ready = 1;
    }
    if (!fuzz_hdf5_input(data, size, path)) return 0;
    const InputOptions opts[] = {
        {0},
        {.label_key = "celltype"},
        {.use_raw = 1, .label_key = "bulk_labels"},
        {.layer = "counts"},
    };
    for (size_t i = 0; i < sizeof opts / sizeof *opts; i++) {
        fuzz_input_read(path, &opts[i]);
        fuzz_h5_done("the .h5ad reader");
    }
    return 0;
}

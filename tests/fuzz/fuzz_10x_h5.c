// Fuzz the 10x Genomics HDF5 reader (CellRanger v2 and v3 layouts): the input
// is one .h5 file, read with the default genome choice and with every genome.
//
// Seeds: tests/fuzz/corpus/10x_h5/ (scanpy's CellRanger 1.2.0 chr21 file, and
// the first cells of its CellRanger 3.0.0 file).
#define FUZZ_HDF5
#include "fuzz_input.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int ready;
    static char path[4200];
    if (!ready) {
        fuzz_h5_init();
        fuzz_path(path, sizeof path, "filtered_feature_bc_matrix.h5");
        ready = 1;
    }
    if (!fuzz_hdf5_input(data, size, path)) return 0;
    const InputOptions opts[] = {{0}, {.genome = "all"}, {.genome = "hg19_chr21"}};
    for (size_t i = 0; i < sizeof opts / sizeof *opts; i++) {
        fuzz_input_read(path, &opts[i]);
        fuzz_h5_done("the 10x HDF5 reader");
    }
    return 0;
}

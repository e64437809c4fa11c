// HDF5 filter 32015 (Zstandard), registered in-process around libzstd. The
// same filter code is built into lib/hdf5-plugin/libh5zstd.so so that h5py,
// anndata and h5dump read shards with HDF5_PLUGIN_PATH pointing there.
//
// cd_values[0], when present, is the compression level (default 3). The
// stored chunk is one Zstandard frame with its content size and a content
// checksum recorded.
#ifndef PERFCELL_ZSTD_FILTER_H
#define PERFCELL_ZSTD_FILTER_H

#include <H5PLextern.h>
#include <hdf5.h>

#define ZSTD_FILTER_ID 32015

// The filter class (no HDF5 calls inside: the plugin links only to libzstd).
extern const H5Z_class2_t zstd_filter_class;

// Register the filter with the HDF5 library of this process (idempotent).
// Returns 0, or -1 with error_set().
int zstd_filter_register(void);

#endif

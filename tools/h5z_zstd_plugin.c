// HDF5 dynamic plugin entry points for the Zstandard filter (id 32015).
// Build: make lib/hdf5-plugin/libh5zstd.so; use: HDF5_PLUGIN_PATH=lib/hdf5-plugin.
#include "perfcell/zstd_filter.h"

H5PL_type_t H5PLget_plugin_type(void) { return H5PL_TYPE_FILTER; }
const void *H5PLget_plugin_info(void) { return &zstd_filter_class; }

// In-process registration of the Zstandard filter.
#include "perfcell/error.h"
#include "perfcell/zstd_filter.h"

int zstd_filter_register(void) {
    htri_t have = H5Zfilter_avail(ZSTD_FILTER_ID);
    if (have > 0) return 0;
    if (H5Zregister(&zstd_filter_class) < 0)
        return error_set_h5("cannot register the Zstandard HDF5 filter (id %d)", ZSTD_FILTER_ID);
    return 0;
}

// The Zstandard HDF5 filter (id 32015). This file must not call HDF5 functions:
// it is also linked, alone with libzstd, into the HDF5 plugin library.
#include "perfcell/zstd_filter.h"

#include <stdlib.h>
#include <zstd.h>

// Decompressed chunks larger than this are treated as corrupt frames rather
// than allocated (perfcell writes chunks of at most a few MiB).
#define ZSTD_FILTER_MAX_CHUNK ((unsigned long long)1 << 31)

static size_t zstd_filter_apply(unsigned int flags, size_t cd_nelmts, const unsigned int cd_values[],
                                size_t nbytes, size_t *buf_size, void **buf) {
    void *out = NULL;
    if (flags & H5Z_FLAG_REVERSE) {
        unsigned long long n = ZSTD_getFrameContentSize(*buf, nbytes);
        if (n == ZSTD_CONTENTSIZE_ERROR || n == ZSTD_CONTENTSIZE_UNKNOWN ||
            n > ZSTD_FILTER_MAX_CHUNK)
            return 0;
        out = malloc(n ? (size_t)n : 1);
        if (!out) return 0;
        size_t got = ZSTD_decompress(out, (size_t)n, *buf, nbytes);
        if (ZSTD_isError(got) || got != n) {
            free(out);
            return 0;
        }
        free(*buf);
        *buf = out;
        *buf_size = (size_t)n;
        return got;
    }
    int level = cd_nelmts > 0 ? (int)cd_values[0] : 3;
    if (level < 1 || level > ZSTD_maxCLevel()) level = 3;
    size_t bound = ZSTD_compressBound(nbytes);
    out = malloc(bound);
    ZSTD_CCtx *cctx = ZSTD_createCCtx();
    if (!out || !cctx) {
        free(out);
        ZSTD_freeCCtx(cctx);
        return 0;
    }
    // Each frame carries its content size and a checksum of the content, so a
    // damaged chunk fails to decompress instead of decoding into wrong values
    // (any Zstandard reader, the plugin and hdf5plugin included, checks it).
    size_t got = ZSTD_isError(ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, level)) ||
                         ZSTD_isError(ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 1))
                     ? (size_t)-1
                     : ZSTD_compress2(cctx, out, bound, *buf, nbytes);
    ZSTD_freeCCtx(cctx);
    if (ZSTD_isError(got)) {
        free(out);
        return 0;
    }
    free(*buf);
    *buf = out;
    *buf_size = bound;
    return got;
}

const H5Z_class2_t zstd_filter_class = {
    .version = H5Z_CLASS_T_VERS,
    .id = ZSTD_FILTER_ID,
    .encoder_present = 1,
    .decoder_present = 1,
    .name = "Zstandard compression: http://www.zstd.net",
    .can_apply = NULL,
    .set_local = NULL,
    .filter = zstd_filter_apply,
};

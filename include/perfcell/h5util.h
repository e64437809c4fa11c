// HDF5 helpers shared by the input readers, the shard format and checkpoints.
// All return 0 (or a valid id) on success and -1 with error_set() on failure;
// `what` arguments name the file for the message.
#ifndef PERFCELL_H5UTIL_H
#define PERFCELL_H5UTIL_H

#include <hdf5.h>
#include <stddef.h>
#include <stdint.h>

// Whether `path` (possibly nested, "a/b/c") exists below `loc`.
int h5_exists(hid_t loc, const char *path);
// Object type of `path` below `loc`: H5O_TYPE_GROUP, H5O_TYPE_DATASET, or -1.
int h5_object_type(hid_t loc, const char *path);

// Read a 1-D dataset of strings (fixed-length or variable-length, any
// character set) into a NULL-free array of malloc'ed strings.
int h5_read_strings(hid_t loc, const char *name, const char *what, char ***out, size_t *n);
void h5_free_strings(char **s, size_t n);

// Number of elements of a dataset (product of its dimensions); rank out optional.
int h5_dataset_size(hid_t loc, const char *name, const char *what, int64_t *n, int *rank);

// Read a whole numeric dataset converted to the given memory type.
int h5_read_all(hid_t loc, const char *name, const char *what, hid_t memtype, void *buf);

// Attributes.
int h5_attr_exists(hid_t obj, const char *name);
int h5_attr_read_string(hid_t obj, const char *name, char *buf, size_t len);
int h5_attr_read_i64s(hid_t obj, const char *name, int64_t *v, size_t n);
int h5_attr_write_string(hid_t obj, const char *name, const char *value);
int h5_attr_write_strings(hid_t obj, const char *name, const char *const *v, size_t n);
int h5_attr_write_i64s(hid_t obj, const char *name, const int64_t *v, size_t n);
// A boolean attribute as h5py and AnnData write numpy bools (int8 enum).
int h5_attr_write_bool(hid_t obj, const char *name, int value);

// Strings are written fixed-length UTF-8 (never in HDF5's global heap, which
// has no checksums): attributes above, a 1-D string dataset, a scalar one.
int h5_write_strings(hid_t loc, const char *name, const char *const *v, size_t n);
int h5_write_string_scalar(hid_t loc, const char *name, const char *value);
// Whether attribute `name` exists and is a fixed-length string (readers of
// perfcell's own files refuse variable-length ones before touching them).
int h5_is_fixed_string_attr(hid_t obj, const char *name);
// AnnData element encoding attributes ("encoding-type", "encoding-version").
int h5_set_encoding(hid_t obj, const char *type, const char *version);

// The HDF5 library here is not thread-safe: every thread that calls HDF5 while
// another thread may do so (the stream's prefetch thread, checkpoint writes
// from the main thread) holds this process-wide lock around its calls.
// n strings packed into one zero-padded buffer of n x width bytes, width the
// longest length (at least 1), for fixed-width string datasets (free()).
char *h5_pack_strings(const char *const *v, size_t n, size_t *width);

// HDF5 metadata checksum (Jenkins lookup3), exposed for the tests.
uint32_t h5_checksum_lookup3(const void *data, size_t n);
// Makes an image from H5Fget_file_image() of a file still open for writing
// into the image of a closed file: superblock status flags cleared and, for
// superblock versions >= 2, its checksum recomputed (HDF5 1.10 clears the flags
// in the image without updating the checksum, so the image does not open).
int h5_image_seal(void *image, size_t n);

void h5_lock(void);
void h5_unlock(void);

#endif

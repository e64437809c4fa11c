// Fuzz the shard folder manifest parser: the input is manifest.tsv. A
// manifest that loads must be consistent (contiguous cell ranges from 0,
// totals) and survive a round trip: written by manifest_write and loaded
// again, it is the same manifest.
//
// Seeds: tests/fuzz/corpus/manifest/ (manifests of shard folders built from
// pbmc3k and from 10x chr21 data by perfcell-shard).
#include "fuzz_common.h"

#include "perfcell/manifest.h"

static int same_manifest(const Manifest *a, const Manifest *b) {
    if (a->version != b->version || a->vocab_hash != b->vocab_hash || a->n_genes != b->n_genes ||
        a->n_cells != b->n_cells || a->nnz != b->nnz || strcmp(a->label_key, b->label_key) != 0 ||
        a->n_labels != b->n_labels || a->n_datasets != b->n_datasets || a->n_shards != b->n_shards)
        return 0;
    for (size_t i = 0; i < a->n_labels; i++)
        if (strcmp(a->labels[i], b->labels[i]) != 0 || a->label_counts[i] != b->label_counts[i]) return 0;
    for (size_t i = 0; i < a->n_datasets; i++)
        if (strcmp(a->datasets[i], b->datasets[i]) != 0 || strcmp(a->dataset_paths[i], b->dataset_paths[i]) != 0 ||
            a->dataset_cells[i] != b->dataset_cells[i])
            return 0;
    for (size_t i = 0; i < a->n_shards; i++) {
        const ShardEntry *x = &a->shards[i], *y = &b->shards[i];
        if (strcmp(x->file, y->file) != 0 || x->n_cells != y->n_cells || x->first_cell != y->first_cell ||
            x->nnz != y->nnz || x->content_crc != y->content_crc || x->bytes != y->bytes ||
            x->file_crc != y->file_crc)
            return 0;
    }
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int ready;
    static char dir[4200], dir2[4200], path[4300];
    if (!ready) {
        fuzz_path(dir, sizeof dir, "shards");
        fuzz_path(dir2, sizeof dir2, "written");
        FUZZ_REQUIRE(mkdir(dir, 0700) == 0 && mkdir(dir2, 0700) == 0, "cannot create folders: %s", strerror(errno));
        snprintf(path, sizeof path, "%s/%s", dir, SHARD_MANIFEST_FILE);
        ready = 1;
    }
    if (size > (1u << 20)) return 0;
    fuzz_write(path, data, size);
    Manifest m;
    fuzz_clear_error();
    if (manifest_load(&m, dir) != 0) {
        fuzz_expect_message("manifest_load");
        return 0;
    }
    int64_t next = 0;
    for (size_t i = 0; i < m.n_shards; i++) {
        FUZZ_REQUIRE(m.shards[i].first_cell == next && m.shards[i].n_cells > 0, "shard %zu range", i);
        next += m.shards[i].n_cells;
        char *p = manifest_shard_path(&m, i);
        free(p);
        FUZZ_REQUIRE(manifest_shard_of(&m, m.shards[i].first_cell) == i, "shard_of(first cell of %zu)", i);
        FUZZ_REQUIRE(manifest_shard_of(&m, next - 1) == i, "shard_of(last cell of %zu)", i);
    }
    FUZZ_REQUIRE(next == m.n_cells, "cells add up to %lld, manifest says %lld", (long long)next,
                 (long long)m.n_cells);
    FUZZ_REQUIRE(manifest_write(&m, dir2) == 0, "manifest_write failed: %s", error_last());
    Manifest m2;
    FUZZ_REQUIRE(manifest_load(&m2, dir2) == 0, "a written manifest does not load back: %s", error_last());
    FUZZ_REQUIRE(same_manifest(&m, &m2), "the manifest changes on a round trip");
    manifest_free(&m2);
    manifest_free(&m);
    return 0;
}

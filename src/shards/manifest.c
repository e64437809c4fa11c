// The shard folder manifest: a small TSV file (format: shards/README.md).
#include "perfcell/manifest.h"

#include "perfcell/error.h"
#include "perfcell/util.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

void vocab_hash_format(uint64_t h, char out[17]) { snprintf(out, 17, "%016" PRIx64, h); }

int vocab_hash_parse(const char *s, uint64_t *h) {
    if (strlen(s) != 16) return -1;
    uint64_t v = 0;
    for (int i = 0; i < 16; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (d < 0) return -1;
        v = v << 4 | (uint64_t)d;
    }
    *h = v;
    return 0;
}

void manifest_free(Manifest *m) {
    if (!m) return;
    free(m->folder);
    free(m->label_key);
    for (size_t i = 0; i < m->n_labels; i++) free(m->labels[i]);
    free(m->labels);
    free(m->label_counts);
    for (size_t i = 0; i < m->n_datasets; i++) {
        free(m->datasets[i]);
        free(m->dataset_paths[i]);
    }
    free(m->datasets);
    free(m->dataset_paths);
    free(m->dataset_cells);
    for (size_t i = 0; i < m->n_shards; i++) free(m->shards[i].file);
    free(m->shards);
    memset(m, 0, sizeof *m);
}

char *manifest_shard_path(const Manifest *m, size_t i) { return path_join(m->folder, m->shards[i].file); }

size_t manifest_shard_of(const Manifest *m, int64_t cell) {
    size_t lo = 0, hi = m->n_shards;
    while (hi - lo > 1) {
        size_t mid = (lo + hi) / 2;
        if (m->shards[mid].first_cell <= cell)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

// Split a line in place on tabs; returns the number of fields (at most max).
static size_t split_tabs(char *line, char **f, size_t max) {
    size_t n = 0;
    char *p = line;
    while (n < max) {
        f[n++] = p;
        char *t = strchr(p, '\t');
        if (!t) break;
        *t = '\0';
        p = t + 1;
    }
    return n;
}

static int parse_i64(const char *s, int64_t *v) {
    long x;
    if (str_to_long(s, &x) != 0 || x < 0) return -1;
    *v = (int64_t)x;
    return 0;
}

static int parse_crc(const char *s, uint32_t *v) {
    if (strlen(s) != 8) return -1;
    char *end;
    unsigned long x = strtoul(s, &end, 16);
    if (*end) return -1;
    *v = (uint32_t)x;
    return 0;
}

int manifest_load(Manifest *m, const char *folder) {
    memset(m, 0, sizeof *m);
    char *path = path_join(folder, SHARD_MANIFEST_FILE);
    size_t len = 0;
    char *text = NULL;
    int rc = -1, line_no = 0, seen_format = 0, seen_table = 0;
    size_t cap_l = 0, cap_d = 0, cap_s = 0;
    if (!path_is_dir(folder)) {
        error_set("'%s' is not a shard folder (no such folder)", folder);
        goto done;
    }
    if (!(text = file_read_all(path, &len))) {
        error_set("'%s' is not a shard folder: cannot read %s", folder, SHARD_MANIFEST_FILE);
        goto done;
    }
    if (strlen(text) != len) {
        error_set("%s: binary data in the manifest", path);
        goto done;
    }
    m->folder = xstrdup(folder);
    m->label_key = xstrdup("");
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        line_no++;
        size_t ll = strlen(line);
        if (ll && line[ll - 1] == '\r') line[--ll] = '\0';
        char *f[8] = {0};
        size_t nf = split_tabs(line, f, 8);
        if (line_no == 1 && (nf != 3 || strcmp(f[0], "#format") != 0)) {
            error_set("%s:1: not a perfcell shard manifest (expected '#format\t%s\t%d')", path,
                      SHARD_FORMAT_NAME, SHARD_FORMAT_VERSION);
            goto done;
        }
        if (f[0][0] == '#') {
            const char *key = f[0] + 1;
            if (strcmp(key, "format") == 0) {
                long v;
                if (nf != 3 || strcmp(f[1], SHARD_FORMAT_NAME) != 0 || str_to_long(f[2], &v) != 0) {
                    error_set("%s:%d: bad #format line", path, line_no);
                    goto done;
                }
                if (v != SHARD_FORMAT_VERSION) {
                    error_set("%s: shard format version %ld, this perfcell reads version %d", path,
                              v, SHARD_FORMAT_VERSION);
                    goto done;
                }
                m->version = (int)v;
                seen_format = 1;
            } else if (strcmp(key, "vocab_hash") == 0) {
                if (nf != 2 || vocab_hash_parse(f[1], &m->vocab_hash) != 0) {
                    error_set("%s:%d: bad vocabulary hash", path, line_no);
                    goto done;
                }
            } else if (strcmp(key, "n_genes") == 0 || strcmp(key, "n_cells") == 0 ||
                       strcmp(key, "nnz") == 0) {
                int64_t *dst = key[2] == 'g' ? &m->n_genes : key[2] == 'c' ? &m->n_cells : &m->nnz;
                if (nf != 2 || parse_i64(f[1], dst) != 0) {
                    error_set("%s:%d: bad #%s value", path, line_no, key);
                    goto done;
                }
            } else if (strcmp(key, "label_key") == 0) {
                if (nf != 2) {
                    error_set("%s:%d: bad #label_key line", path, line_no);
                    goto done;
                }
                free(m->label_key);
                m->label_key = xstrdup(strcmp(f[1], "-") == 0 ? "" : f[1]);
            } else if (strcmp(key, "label") == 0) {
                int64_t code, count;
                if (nf != 4 || parse_i64(f[1], &code) != 0 || parse_i64(f[3], &count) != 0 ||
                    code != (int64_t)m->n_labels) {
                    error_set("%s:%d: bad #label line (expected code %zu, name, count)", path,
                              line_no, m->n_labels);
                    goto done;
                }
                if (m->n_labels == cap_l) {
                    cap_l = cap_l ? 2 * cap_l : 16;
                    m->labels = xrealloc(m->labels, cap_l * sizeof *m->labels);
                    m->label_counts = xrealloc(m->label_counts, cap_l * sizeof *m->label_counts);
                }
                m->labels[m->n_labels] = xstrdup(f[2]);
                m->label_counts[m->n_labels++] = count;
            } else if (strcmp(key, "dataset") == 0) {
                int64_t code, cells;
                if (nf != 5 || parse_i64(f[1], &code) != 0 || parse_i64(f[4], &cells) != 0 ||
                    code != (int64_t)m->n_datasets) {
                    error_set("%s:%d: bad #dataset line (expected code %zu, name, path, cells)",
                              path, line_no, m->n_datasets);
                    goto done;
                }
                if (m->n_datasets == cap_d) {
                    cap_d = cap_d ? 2 * cap_d : 8;
                    m->datasets = xrealloc(m->datasets, cap_d * sizeof *m->datasets);
                    m->dataset_paths = xrealloc(m->dataset_paths, cap_d * sizeof *m->dataset_paths);
                    m->dataset_cells = xrealloc(m->dataset_cells, cap_d * sizeof *m->dataset_cells);
                }
                m->datasets[m->n_datasets] = xstrdup(f[2]);
                m->dataset_paths[m->n_datasets] = xstrdup(f[3]);
                m->dataset_cells[m->n_datasets++] = cells;
            } else {
                error_set("%s:%d: unknown manifest key '#%s'", path, line_no, key);
                goto done;
            }
            continue;
        }
        if (!seen_table) {
            if (nf != 7 || strcmp(f[0], "file") != 0) {
                error_set("%s:%d: expected the shard table header", path, line_no);
                goto done;
            }
            seen_table = 1;
            continue;
        }
        ShardEntry e = {0};
        if (nf != 7 || parse_i64(f[1], &e.n_cells) != 0 || parse_i64(f[2], &e.first_cell) != 0 ||
            parse_i64(f[3], &e.nnz) != 0 || parse_crc(f[4], &e.content_crc) != 0 ||
            parse_i64(f[5], &e.bytes) != 0 || parse_crc(f[6], &e.file_crc) != 0 ||
            strchr(f[0], '/') || !f[0][0]) {
            error_set("%s:%d: bad shard row", path, line_no);
            goto done;
        }
        if (m->n_shards == cap_s) {
            cap_s = cap_s ? 2 * cap_s : 16;
            m->shards = xrealloc(m->shards, cap_s * sizeof *m->shards);
        }
        e.file = xstrdup(f[0]);
        m->shards[m->n_shards++] = e;
    }
    if (!seen_format || !seen_table) {
        error_set("%s: incomplete manifest (missing %s)", path, !seen_format ? "#format" : "table");
        goto done;
    }
    if (m->n_shards == 0) {
        error_set("%s: the manifest lists no shards (an empty shard folder: no cells to read)", path);
        goto done;
    }
    // Consistency: contiguous ranges from 0, totals. Every number is >= 0 and
    // the sums are checked against INT64_MAX as they grow.
    int64_t next = 0, nnz = 0, labelled = 0;
    for (size_t i = 0; i < m->n_shards; i++) {
        if (m->shards[i].first_cell != next || m->shards[i].n_cells <= 0) {
            error_set("%s: shard %s covers cells from %lld, expected %lld", path, m->shards[i].file,
                      (long long)m->shards[i].first_cell, (long long)next);
            goto done;
        }
        if (m->shards[i].n_cells > INT64_MAX - next || m->shards[i].nnz > INT64_MAX - nnz) {
            error_set("%s: shard %s: cell or non-zero counts too large", path, m->shards[i].file);
            goto done;
        }
        next += m->shards[i].n_cells;
        nnz += m->shards[i].nnz;
    }
    for (size_t i = 0; i < m->n_labels; i++) {
        if (m->label_counts[i] > m->n_cells - labelled) {
            error_set("%s: the #label lines count more cells than the manifest's %lld", path,
                      (long long)m->n_cells);
            goto done;
        }
        labelled += m->label_counts[i];
    }
    int64_t ds_cells = 0;
    for (size_t i = 0; i < m->n_datasets; i++) {
        if (m->dataset_cells[i] > m->n_cells - ds_cells) {
            error_set("%s: the #dataset lines count more cells than the manifest's %lld", path,
                      (long long)m->n_cells);
            goto done;
        }
        ds_cells += m->dataset_cells[i];
    }
    if (m->n_genes <= 0) {
        error_set("%s: #n_genes is missing or 0 (a shard folder needs a vocabulary of at least one gene)", path);
        goto done;
    }
    if (m->n_datasets && ds_cells != m->n_cells) {
        error_set("%s: the #dataset lines count %lld cells, the manifest holds %lld", path, (long long)ds_cells,
                  (long long)m->n_cells);
        goto done;
    }
    if (next != m->n_cells || nnz != m->nnz) {
        error_set("%s: totals disagree (n_cells %lld, shards hold %lld; nnz %lld vs %lld)", path,
                  (long long)m->n_cells, (long long)next, (long long)m->nnz, (long long)nnz);
        goto done;
    }
    if (m->label_key[0] == '\0' && m->n_labels > 0) {
        error_set("%s: label categories without a #label_key", path);
        goto done;
    }
    rc = 0;
done:
    if (rc != 0) manifest_free(m);
    free(text);
    free(path);
    return rc;
}

int manifest_write(const Manifest *m, const char *folder) {
    size_t cap = 1 << 16, n = 0;
    char *buf = xmalloc(cap);
    char hash[17];
    vocab_hash_format(m->vocab_hash, hash);
#define EMIT(...)                                                                                  \
    do {                                                                                           \
        int k_;                                                                                    \
        while ((k_ = snprintf(buf + n, cap - n, __VA_ARGS__)) >= 0 && (size_t)k_ >= cap - n)       \
            buf = xrealloc(buf, cap *= 2);                                                         \
        n += (size_t)k_;                                                                           \
    } while (0)
    EMIT("#format\t%s\t%d\n", SHARD_FORMAT_NAME, SHARD_FORMAT_VERSION);
    EMIT("#vocab_hash\t%s\n", hash);
    EMIT("#n_genes\t%lld\n#n_cells\t%lld\n#nnz\t%lld\n", (long long)m->n_genes,
         (long long)m->n_cells, (long long)m->nnz);
    EMIT("#label_key\t%s\n", m->label_key && m->label_key[0] ? m->label_key : "-");
    for (size_t i = 0; i < m->n_labels; i++)
        EMIT("#label\t%zu\t%s\t%lld\n", i, m->labels[i], (long long)m->label_counts[i]);
    for (size_t i = 0; i < m->n_datasets; i++)
        EMIT("#dataset\t%zu\t%s\t%s\t%lld\n", i, m->datasets[i], m->dataset_paths[i],
             (long long)m->dataset_cells[i]);
    EMIT("file\tn_cells\tfirst_cell\tnnz\tcontent_crc32\tbytes\tfile_crc32\n");
    for (size_t i = 0; i < m->n_shards; i++) {
        const ShardEntry *e = &m->shards[i];
        EMIT("%s\t%lld\t%lld\t%lld\t%08x\t%lld\t%08x\n", e->file, (long long)e->n_cells,
             (long long)e->first_cell, (long long)e->nnz, e->content_crc, (long long)e->bytes,
             e->file_crc);
    }
#undef EMIT
    char *path = path_join(folder, SHARD_MANIFEST_FILE);
    int rc = file_write_atomic(path, buf, n);
    free(path);
    free(buf);
    return rc;
}

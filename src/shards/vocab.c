// The gene vocabulary: vocab.tsv, its hash, and matching input genes to it.
#include "perfcell/vocab.h"

#include "perfcell/error.h"
#include "perfcell/util.h"

#include <stdlib.h>
#include <string.h>

// ---------------------------------------------------------------------------
// Keys and lookup tables

// Length of an id without an Ensembl version suffix ("ENSG...123.4" -> "ENSG...123").
static size_t id_key_len(const char *id) {
    size_t n = strlen(id);
    if (strncmp(id, "ENS", 3) != 0) return n;
    const char *dot = strrchr(id, '.');
    if (!dot || dot[1] == '\0') return n;
    for (const char *p = dot + 1; *p; p++)
        if (*p < '0' || *p > '9') return n;
    return (size_t)(dot - id);
}

static uint64_t key_hash(const char *s, size_t n) { return hash_fnv64(HASH_FNV_INIT, s, n); }

static int key_equal(const char *a, size_t na, const char *b, size_t nb) {
    return na == nb && memcmp(a, b, na) == 0;
}

// Slot of `key` in a table of `cap` slots: the slot holding it or the empty
// slot where it would go. `strs` are the strings the table indexes.
static size_t table_slot(const int32_t *table, size_t cap, char *const *strs, int is_id,
                         const char *key, size_t klen) {
    size_t mask = cap - 1, i = (size_t)key_hash(key, klen) & mask;
    for (;;) {
        int32_t g = table[i];
        if (g < 0) return i;
        const char *s = strs[g];
        size_t sl = is_id ? id_key_len(s) : strlen(s);
        if (key_equal(s, sl, key, klen)) return i;
        i = (i + 1) & mask;
    }
}

static void table_insert(Vocab *v, int is_id, int32_t g) {
    int32_t *table = is_id ? v->by_id : v->by_symbol;
    char *const *strs = is_id ? v->ids : v->symbols;
    const char *s = strs[g];
    size_t sl = is_id ? id_key_len(s) : strlen(s);
    size_t slot = table_slot(table, v->cap, strs, is_id, s, sl);
    if (table[slot] < 0) table[slot] = g; // keep the first gene of a symbol
}

static void tables_rebuild(Vocab *v, size_t cap) {
    free(v->by_symbol);
    free(v->by_id);
    v->cap = cap;
    v->by_symbol = xmalloc(cap * sizeof *v->by_symbol);
    v->by_id = xmalloc(cap * sizeof *v->by_id);
    memset(v->by_symbol, 0xff, cap * sizeof *v->by_symbol);
    memset(v->by_id, 0xff, cap * sizeof *v->by_id);
    for (size_t g = 0; g < v->n; g++) {
        table_insert(v, 0, (int32_t)g);
        if (v->ids[g][0]) table_insert(v, 1, (int32_t)g);
    }
}

static int64_t find_symbol(const Vocab *v, const char *symbol) {
    if (v->cap == 0) return -1;
    size_t slot = table_slot(v->by_symbol, v->cap, v->symbols, 0, symbol, strlen(symbol));
    return v->by_symbol[slot];
}

static int64_t find_id(const Vocab *v, const char *id) {
    if (v->cap == 0 || !id || !id[0]) return -1;
    size_t slot = table_slot(v->by_id, v->cap, v->ids, 1, id, id_key_len(id));
    return v->by_id[slot];
}

// ---------------------------------------------------------------------------
// Building

void vocab_init(Vocab *v) { memset(v, 0, sizeof *v); }

void vocab_free(Vocab *v) {
    if (!v) return;
    for (size_t i = 0; i < v->n; i++) {
        free(v->symbols[i]);
        free(v->ids[i]);
    }
    free(v->symbols);
    free(v->ids);
    free(v->by_symbol);
    free(v->by_id);
    memset(v, 0, sizeof *v);
}

static int has_control(const char *s) {
    for (; *s; s++)
        if (*s == '\t' || *s == '\n' || *s == '\r') return 1;
    return 0;
}

int64_t vocab_match(const Vocab *v, const char *symbol, const char *id) {
    int have_id = id && id[0];
    if (have_id) {
        int64_t g = find_id(v, id);
        if (g >= 0) return g;
    }
    int64_t g = find_symbol(v, symbol);
    if (g < 0) return -1;
    // An input gene with an id only matches a symbol whose gene has no id: two
    // different ids are two different genes even when they share a symbol.
    if (have_id && v->ids[g][0]) return -1;
    return g;
}

int64_t vocab_add(Vocab *v, const char *symbol, const char *id) {
    if (!id) id = "";
    if (!symbol[0]) {
        error_set("empty gene symbol");
        return -1;
    }
    if (has_control(symbol) || has_control(id)) {
        error_set("gene '%s' holds a tab or a newline", symbol);
        return -1;
    }
    if (INT32_MAX - 1 <= (int64_t)v->n) {
        error_set("too many genes (more than %d)", INT32_MAX - 1);
        return -1;
    }
    int64_t same = id[0] ? find_id(v, id) : -1;
    if (same < 0) {
        int64_t s = find_symbol(v, symbol);
        if (s >= 0 && (!id[0] || !v->ids[s][0])) same = s;
    }
    if (same >= 0) {
        error_set("duplicate gene '%s'%s%s%s: the same gene as line %lld ('%s'%s%s)", symbol,
                  id[0] ? " (" : "", id, id[0] ? ")" : "", (long long)same + 1, v->symbols[same],
                  v->ids[same][0] ? ", " : "", v->ids[same]);
        return -1;
    }
    if (v->n == v->n_alloc) {
        v->n_alloc = v->n_alloc ? 2 * v->n_alloc : 1024;
        v->symbols = xrealloc(v->symbols, v->n_alloc * sizeof *v->symbols);
        v->ids = xrealloc(v->ids, v->n_alloc * sizeof *v->ids);
    }
    size_t g = v->n++;
    v->symbols[g] = xstrdup(symbol);
    v->ids[g] = xstrdup(id);
    if (2 * v->n > v->cap) {
        tables_rebuild(v, v->cap ? 2 * v->cap : 2048);
    } else {
        table_insert(v, 0, (int32_t)g);
        if (id[0]) table_insert(v, 1, (int32_t)g);
    }
    return (int64_t)g;
}

// ---------------------------------------------------------------------------
// vocab.tsv

static const char *VOCAB_HINT =
    "a vocabulary is a text file with one gene per line, 'symbol' or 'symbol<TAB>ensembl_id', "
    "no header; make one with `perfcell-shard vocab IN... --out vocab.tsv`";

int vocab_load(Vocab *v, const char *path) {
    vocab_init(v);
    size_t len = 0;
    char *text = file_read_all(path, &len);
    if (!text) return error_set_hint("%s", VOCAB_HINT);
    int rc = -1;
    if (len >= 8 && memcmp(text, "\x89HDF\r\n\x1a\n", 8) == 0) {
        error_set("'%s' is not a vocabulary: it is an HDF5 file", path);
        error_set_hint("%s", VOCAB_HINT);
        goto done;
    }
    if (strlen(text) != len) {
        error_set("'%s' is not a vocabulary: it holds binary data", path);
        error_set_hint("%s", VOCAB_HINT);
        goto done;
    }
    if (len == 0) {
        error_set("%s: the vocabulary is empty", path);
        error_set_hint("%s", VOCAB_HINT);
        goto done;
    }
    size_t line_no = 0;
    char *p = text;
    while (*p) {
        line_no++;
        char *end = strchr(p, '\n');
        char *next = end ? end + 1 : p + strlen(p);
        if (end) *end = '\0';
        size_t ll = strlen(p);
        if (ll && p[ll - 1] == '\r') p[--ll] = '\0';
        if (ll == 0) {
            error_set("%s:%zu: blank line (a vocabulary has one gene on every line)", path, line_no);
            error_set_hint("%s", VOCAB_HINT);
            goto done;
        }
        if (p[0] == '#') {
            error_set("%s:%zu: comment lines are not allowed in a vocabulary", path, line_no);
            error_set_hint("%s", VOCAB_HINT);
            goto done;
        }
        char *tab = strchr(p, '\t');
        const char *id = "";
        if (tab) {
            *tab = '\0';
            id = tab + 1;
            if (strchr(id, '\t')) {
                error_set("%s:%zu: more than two fields (expected 'symbol' or "
                          "'symbol<TAB>ensembl_id')",
                          path, line_no);
                error_set_hint("%s", VOCAB_HINT);
                goto done;
            }
        }
        if (vocab_add(v, p, id) < 0) {
            char msg[1024];
            snprintf(msg, sizeof msg, "%s", error_last());
            error_set("%s:%zu: %s", path, line_no, msg);
            error_set_hint("each gene must appear once in a vocabulary; remove line %zu or "
                           "rebuild the vocabulary with `perfcell-shard vocab`",
                           line_no);
            goto done;
        }
        p = next;
    }
    rc = 0;
done:
    free(text);
    if (rc != 0) vocab_free(v);
    return rc;
}

char *vocab_to_text(const Vocab *v, size_t *len) {
    size_t n = 0;
    for (size_t g = 0; g < v->n; g++) n += strlen(v->symbols[g]) + strlen(v->ids[g]) + 2;
    char *s = xmalloc(n + 1), *p = s;
    for (size_t g = 0; g < v->n; g++) {
        size_t a = strlen(v->symbols[g]), b = strlen(v->ids[g]);
        memcpy(p, v->symbols[g], a);
        p += a;
        *p++ = '\t';
        memcpy(p, v->ids[g], b);
        p += b;
        *p++ = '\n';
    }
    *p = '\0';
    if (len) *len = n;
    return s;
}

uint64_t vocab_hash(const Vocab *v) {
    size_t n = 0;
    char *text = vocab_to_text(v, &n);
    uint64_t h = hash_fnv64(HASH_FNV_INIT, text, n);
    free(text);
    return h;
}

int vocab_save(const Vocab *v, const char *path) {
    size_t n = 0;
    for (size_t g = 0; g < v->n; g++) n += strlen(v->symbols[g]) + strlen(v->ids[g]) + 2;
    char *s = xmalloc(n + 1), *p = s;
    for (size_t g = 0; g < v->n; g++) {
        size_t a = strlen(v->symbols[g]), b = strlen(v->ids[g]);
        memcpy(p, v->symbols[g], a);
        p += a;
        if (b) {
            *p++ = '\t';
            memcpy(p, v->ids[g], b);
            p += b;
        }
        *p++ = '\n';
    }
    int rc = file_write_atomic(path, s, (size_t)(p - s));
    free(s);
    return rc;
}

// ---------------------------------------------------------------------------
// Mapping an input's genes

void vocab_map_build(VocabMap *m, const Vocab *v, char *const *symbols, char *const *ids,
                     size_t n_input) {
    memset(m, 0, sizeof *m);
    m->n_input = n_input;
    m->n_vocab = v->n;
    m->to_vocab = xmalloc((n_input ? n_input : 1) * sizeof *m->to_vocab);
    unsigned char *seen = xcalloc(v->n ? v->n : 1, 1);
    int64_t last = -1;
    m->monotone = 1;
    for (size_t i = 0; i < n_input; i++) {
        int64_t g = vocab_match(v, symbols[i], ids ? ids[i] : NULL);
        m->to_vocab[i] = (int32_t)g;
        if (g < 0) {
            m->dropped++;
            continue;
        }
        if (seen[g]) {
            m->duplicates++;
        } else {
            seen[g] = 1;
            m->matched++;
        }
        if (g <= last) m->monotone = 0;
        last = g;
    }
    m->missing = v->n - m->matched;
    free(seen);
}

void vocab_map_free(VocabMap *m) {
    if (!m) return;
    free(m->to_vocab);
    free(m->scratch);
    memset(m, 0, sizeof *m);
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int64_t vocab_map_row(VocabMap *m, const int32_t *gene, const int32_t *count, size_t nnz,
                      int32_t *out_gene, int32_t *out_count) {
    // Fast path: mapped genes keep vocabulary order and the row is ascending.
    if (m->monotone) {
        size_t k = 0;
        int64_t prev = -1, prev_in = -1;
        int ok = 1;
        for (size_t j = 0; j < nnz; j++) {
            int32_t g = gene[j];
            if (g < 0 || (size_t)g >= m->n_input)
                return error_set("input gene index %d out of range [0, %zu)", g, m->n_input);
            if (count[j] < 0) return error_set("negative count %d", count[j]);
            if (g <= prev_in) {
                ok = 0;
                break;
            }
            prev_in = g;
            int32_t t = m->to_vocab[g];
            if (t < 0 || count[j] == 0) continue;
            if (t <= prev) {
                ok = 0;
                break;
            }
            prev = t;
            out_gene[k] = t;
            out_count[k++] = count[j];
        }
        if (ok) return (int64_t)k;
    }
    // General path: sort (vocabulary index, count) keys, then sum equal genes.
    if (m->scratch_cap < nnz) {
        free(m->scratch);
        m->scratch_cap = nnz;
        m->scratch = xmalloc(nnz * sizeof *m->scratch);
    }
    uint64_t *key = m->scratch;
    size_t k = 0;
    for (size_t j = 0; j < nnz; j++) {
        int32_t g = gene[j];
        if (g < 0 || (size_t)g >= m->n_input)
            return error_set("input gene index %d out of range [0, %zu)", g, m->n_input);
        if (count[j] < 0) return error_set("negative count %d", count[j]);
        int32_t t = m->to_vocab[g];
        if (t < 0 || count[j] == 0) continue;
        key[k++] = (uint64_t)(uint32_t)t << 32 | (uint32_t)count[j];
    }
    qsort(key, k, sizeof *key, cmp_u64);
    size_t w = 0;
    for (size_t j = 0; j < k; j++) {
        int32_t t = (int32_t)(key[j] >> 32);
        int64_t c = (int64_t)(key[j] & 0xffffffffu);
        if (w > 0 && out_gene[w - 1] == t) {
            c += out_count[w - 1];
            if (c > INT32_MAX)
                return error_set("the summed counts of duplicate genes of vocabulary gene %d "
                                 "reach 2^31",
                                 t);
            out_count[w - 1] = (int32_t)c;
        } else {
            out_gene[w] = t;
            out_count[w++] = (int32_t)c;
        }
    }
    return (int64_t)w;
}

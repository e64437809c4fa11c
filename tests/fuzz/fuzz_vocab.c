// Fuzz the vocabulary reader: the input is vocab.tsv. A vocabulary that loads
// must survive a round trip through its canonical text (same genes, same
// hash), and every gene must match itself.
//
// Seeds: tests/fuzz/corpus/vocab/ (vocabularies written by perfcell-shard
// vocab from pbmc3k and from 10x chr21 data, with Ensembl ids).
#include "fuzz_common.h"

#include "perfcell/vocab.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int ready;
    static char path[4200], again[4200];
    if (!ready) {
        fuzz_path(path, sizeof path, "vocab.tsv");
        fuzz_path(again, sizeof again, "canonical.tsv");
        ready = 1;
    }
    if (size > (1u << 20)) return 0;
    fuzz_write(path, data, size);
    Vocab v;
    vocab_init(&v);
    fuzz_clear_error();
    if (vocab_load(&v, path) != 0) {
        fuzz_expect_message("vocab_load");
        vocab_free(&v);
        return 0;
    }
    for (size_t g = 0; g < v.n; g++) {
        FUZZ_REQUIRE(v.symbols[g][0], "gene %zu has an empty symbol", g);
        int64_t m = vocab_match(&v, v.symbols[g], v.ids[g]);
        FUZZ_REQUIRE(m == (int64_t)g, "gene %zu (%s, %s) matches %lld", g, v.symbols[g], v.ids[g], (long long)m);
    }
    size_t len = 0;
    char *text = vocab_to_text(&v, &len);
    fuzz_write(again, text, len);
    Vocab w;
    vocab_init(&w);
    FUZZ_REQUIRE(vocab_load(&w, again) == 0, "the canonical text does not load back: %s", error_last());
    FUZZ_REQUIRE(w.n == v.n && vocab_hash(&w) == vocab_hash(&v), "the vocabulary changes on a round trip");
    vocab_free(&w);
    free(text);
    vocab_free(&v);
    return 0;
}

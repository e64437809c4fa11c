// Fuzz the configuration parser with the real training schema (TRAIN_SCHEMA).
// The input is an INI file, optionally followed by a NUL byte and override
// lines ("section.key=value", one per line). A config that loads must give a
// value for every key through its typed getter, build a model config without
// dying, and survive a round trip: its resolved INI text loads back to the
// same text.
//
// Seeds: tests/fuzz/corpus/config/ (the project's configs/*.ini).
#include "fuzz_common.h"

#include "perfcell/config.h"
#include "perfcell/model.h"
#include "perfcell/train.h"

#define MAX_OVERRIDES 16

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int ready;
    static char path[4200], again[4200];
    if (!ready) {
        fuzz_path(path, sizeof path, "run.ini");
        fuzz_path(again, sizeof again, "resolved.ini");
        ready = 1;
    }
    if (size > (1u << 16)) return 0;
    const uint8_t *nul = memchr(data, 0, size);
    size_t file_len = nul ? (size_t)(nul - data) : size;
    fuzz_write(path, data, file_len);

    // Overrides: the lines after the NUL byte (copied: they must be strings).
    char *text = NULL;
    const char *ov[MAX_OVERRIDES];
    size_t n_ov = 0;
    if (nul) {
        size_t n = size - file_len - 1;
        text = malloc(n + 1);
        memcpy(text, nul + 1, n);
        text[n] = '\0';
        for (char *save = NULL, *line = strtok_r(text, "\n", &save); line && n_ov < MAX_OVERRIDES;
             line = strtok_r(NULL, "\n", &save))
            ov[n_ov++] = line;
    }

    fuzz_clear_error();
    Config *c = config_load(path, TRAIN_SCHEMA, TRAIN_SCHEMA_LEN, ov, n_ov);
    if (!c) {
        fuzz_expect_message("config_load");
    } else {
        for (size_t i = 0; i < TRAIN_SCHEMA_LEN; i++) {
            const ConfigKey *k = &TRAIN_SCHEMA[i];
            switch (k->type) {
            case CFG_INT: (void)config_int(c, k->name); break;
            case CFG_FLOAT: (void)config_float(c, k->name); break;
            case CFG_BOOL: (void)config_bool(c, k->name); break;
            case CFG_STRING:
            case CFG_CHOICE: FUZZ_REQUIRE(config_str(c, k->name), "%s has no value", k->name); break;
            }
            (void)config_is_set(c, k->name);
        }
        ModelConfig mc;
        fuzz_clear_error();
        if (train_model_config(c, 100, &mc) != 0) fuzz_expect_message("train_model_config");
        AdamConfig ac;
        train_adam_config(c, &ac);
        (void)train_sched_config(c);
        (void)config_hash(c);

        char *ini = config_to_ini(c);
        fuzz_write(again, ini, strlen(ini));
        Config *c2 = config_load(again, TRAIN_SCHEMA, TRAIN_SCHEMA_LEN, NULL, 0);
        FUZZ_REQUIRE(c2, "the resolved config does not load back: %s\n--- resolved text:\n%s", error_last(), ini);
        char *ini2 = config_to_ini(c2);
        FUZZ_REQUIRE(strcmp(ini, ini2) == 0, "the resolved config changes on a round trip:\n%s\n---\n%s", ini, ini2);
        free(ini2);
        config_free(c2);
        free(ini);
        config_free(c);
    }
    free(text);
    return 0;
}

// Unit tests of the common modules: config, keyed RNG, util, error messages.
#include "perfcell/config.h"
#include "perfcell/error.h"
#include "perfcell/h5util.h"
#include "perfcell/rng.h"
#include "perfcell/util.h"
#include "testlib.h"

#include <string.h>

static const ConfigKey SCHEMA[] = {
    {"model.depth", CFG_INT, "6", 1, 64, NULL, "number of blocks"},
    {"model.dim", CFG_INT, "200", 1, 1e6, NULL, "model width"},
    {"optim.lr", CFG_FLOAT, "1e-4", 0, 1, NULL, "learning rate"},
    {"optim.kind", CFG_CHOICE, "adam", 1, 0, "adam|adamw", "optimizer"},
    {"data.shards", CFG_STRING, "", 1, 0, NULL, "shard folders"},
    {"run.resume_ok", CFG_BOOL, "false", 1, 0, NULL, "flag"},
};
#define NS (sizeof SCHEMA / sizeof *SCHEMA)

static char *write_tmp(const char *name, const char *text) {
    char *p = path_join(t_tmpdir(), name);
    FILE *f = xfopen(p, "w");
    fputs(text, f);
    fclose(f);
    return p;
}

static void test_config(void) {
    char *p = write_tmp("ok.ini", "[model]\ndepth = 2\n\n[optim]\nlr = 0.01 ; comment\nkind=adamw\n"
                                  "[data]\nshards = a,b\n");
    const char *ov[] = {"model.dim=64", "run.resume_ok=yes"};
    Config *c = config_load(p, SCHEMA, NS, ov, 2);
    T_CHECK(c != NULL, "load failed: %s", error_last());
    if (c) {
        T_CHECK(config_int(c, "model.depth") == 2, "depth");
        T_CHECK(config_int(c, "model.dim") == 64, "override");
        T_CHECK(fabs(config_float(c, "optim.lr") - 0.01) < 1e-12, "lr");
        T_CHECK(strcmp(config_str(c, "optim.kind"), "adamw") == 0, "choice");
        T_CHECK(strcmp(config_str(c, "data.shards"), "a,b") == 0, "string");
        T_CHECK(config_bool(c, "run.resume_ok") == 1, "bool");
        T_CHECK(config_is_set(c, "model.depth"), "is_set");
        char *ini = config_to_ini(c);
        T_CHECK(strstr(ini, "[model]\ndepth = 2\ndim = 64\n") != NULL, "ini text: %s", ini);
        // The resolved text loads back to the same configuration.
        char *p2 = write_tmp("roundtrip.ini", ini);
        Config *c2 = config_load(p2, SCHEMA, NS, NULL, 0);
        T_CHECK(c2 && config_hash(c2) == config_hash(c), "round trip hash");
        config_free(c2);
        free(p2);
        free(ini);
        config_free(c);
    }
    free(p);

    // Unknown key with a suggestion, and the line number.
    p = write_tmp("typo.ini", "[model]\ndepth = 2\ndpeth = 3\n");
    c = config_load(p, SCHEMA, NS, NULL, 0);
    T_CHECK(c == NULL, "typo accepted");
    T_CHECK(strstr(error_last(), "unknown key 'model.dpeth'") != NULL, "%s", error_last());
    T_CHECK(strstr(error_last(), "did you mean 'model.depth'") != NULL, "%s", error_last());
    T_CHECK(strstr(error_last(), "typo.ini:3") != NULL, "line number: %s", error_last());
    free(p);

    // Key in the wrong section suggests the right one.
    p = write_tmp("section.ini", "[model]\nlr = 0.1\n");
    c = config_load(p, SCHEMA, NS, NULL, 0);
    T_CHECK(c == NULL && strstr(error_last(), "optim.lr") != NULL, "%s", error_last());
    free(p);

    // Bad values: type, range, choice.
    const char *bad[] = {"[model]\ndepth = two\n", "[model]\ndepth = 0\n", "[optim]\nkind = sgd\n",
                         "[optim]\nlr = nan\n", "[run]\nresume_ok = maybe\n", "depth = 3\n"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        p = write_tmp("bad.ini", bad[i]);
        c = config_load(p, SCHEMA, NS, NULL, 0);
        T_CHECK(c == NULL, "bad config %zu accepted", i);
        T_CHECK(strstr(error_last(), "bad.ini") != NULL, "message names the file: %s", error_last());
        config_free(c);
        free(p);
    }

    // Syntax error, missing file, bad override.
    p = write_tmp("syntax.ini", "[model]\nthis is not ini\n");
    c = config_load(p, SCHEMA, NS, NULL, 0);
    T_CHECK(c == NULL && strstr(error_last(), "not a valid INI") != NULL, "%s", error_last());
    free(p);
    c = config_load("/nonexistent/x.ini", SCHEMA, NS, NULL, 0);
    T_CHECK(c == NULL && strstr(error_last(), "/nonexistent/x.ini") != NULL, "%s", error_last());
    const char *ov2[] = {"model.deth=3"};
    c = config_load(NULL, SCHEMA, NS, ov2, 1);
    T_CHECK(c == NULL && strstr(error_last(), "did you mean 'model.depth'") != NULL, "%s",
            error_last());
    const char *ov3[] = {"novalue"};
    c = config_load(NULL, SCHEMA, NS, ov3, 1);
    T_CHECK(c == NULL, "override without '=' accepted");
}

static void test_rng(void) {
    // Same key and counter: same numbers; streaming equals random access.
    Rng a = rng_init(42, RNG_TEST, 1, 7, 3), b = rng_init(42, RNG_TEST, 1, 7, 3);
    Rng ref = a;
    int same = 1, agree = 1;
    for (int i = 0; i < 1000; i++) {
        uint32_t x = rng_u32(&a);
        same &= x == rng_u32(&b);
        agree &= x == rng_word_at(&ref, (uint64_t)i);
    }
    T_CHECK(same, "same key gives different numbers");
    T_CHECK(agree, "rng_word_at disagrees with the stream");
    // Any field changes the stream.
    Rng c[5] = {rng_init(43, RNG_TEST, 1, 7, 3), rng_init(42, RNG_MASK, 1, 7, 3),
                rng_init(42, RNG_TEST, 2, 7, 3), rng_init(42, RNG_TEST, 1, 8, 3),
                rng_init(42, RNG_TEST, 1, 7, 4)};
    Rng base = rng_init(42, RNG_TEST, 1, 7, 3);
    uint32_t x0 = rng_u32(&base);
    for (int i = 0; i < 5; i++) T_CHECK(rng_u32(&c[i]) != x0, "field %d does not change the stream", i);

    // Moments: uniform mean 1/2 and variance 1/12; normal mean 0, variance 1.
    // With n = 1e6 the standard errors are 3e-4 (uniform mean) and 1e-3 (normal),
    // so 6 sigma bounds fail only on a real bias.
    Rng r = rng_init(1, RNG_TEST, 0, 0, 0);
    const int n = 1000000;
    double s = 0, s2 = 0, ns = 0, ns2 = 0;
    for (int i = 0; i < n; i++) {
        double u = rng_uniform(&r);
        T_CHECK(u >= 0.0 && u < 1.0, "uniform out of range");
        s += u;
        s2 += u * u;
        double g = rng_normal(&r);
        ns += g;
        ns2 += g * g;
    }
    double mean = s / n, var = s2 / n - mean * mean;
    T_CHECK(fabs(mean - 0.5) < 6 * 2.9e-4, "uniform mean %g", mean);
    T_CHECK(fabs(var - 1.0 / 12) < 1e-3, "uniform variance %g", var);
    T_CHECK(fabs(ns / n) < 6e-3, "normal mean %g", ns / n);
    T_CHECK(fabs(ns2 / n - 1.0) < 1e-2, "normal variance %g", ns2 / n);

    // rng_below is in range and roughly uniform over 10 bins (chi-square, 9 dof;
    // 99.99th percentile is about 33).
    int bins[10] = {0};
    for (int i = 0; i < 100000; i++) {
        uint64_t k = rng_below(&r, 10);
        T_CHECK(k < 10, "rng_below out of range");
        bins[k]++;
    }
    double chi = 0;
    for (int i = 0; i < 10; i++) chi += (bins[i] - 1e4) * (bins[i] - 1e4) / 1e4;
    T_CHECK(chi < 33, "rng_below chi-square %g", chi);

    // Shuffle is a permutation.
    uint32_t perm[100];
    for (uint32_t i = 0; i < 100; i++) perm[i] = i;
    rng_shuffle_u32(&r, perm, 100);
    int seen[100] = {0}, moved = 0;
    for (int i = 0; i < 100; i++) {
        seen[perm[i]]++;
        moved += perm[i] != (uint32_t)i;
    }
    int ok = 1;
    for (int i = 0; i < 100; i++) ok &= seen[i] == 1;
    T_CHECK(ok && moved > 50, "shuffle is not a permutation");
}

static void test_util(void) {
    T_CHECK(str_edit_distance("kitten", "sitting") == 3, "edit distance");
    T_CHECK(str_edit_distance("", "abc") == 3, "edit distance empty");
    long v;
    double d;
    T_CHECK(str_to_long("123", &v) == 0 && v == 123, "str_to_long");
    T_CHECK(str_to_long("12x", &v) != 0, "str_to_long accepts junk");
    T_CHECK(str_to_double("1e-3", &d) == 0 && d == 1e-3, "str_to_double");
    T_CHECK(str_to_double("", &d) != 0, "str_to_double accepts empty");
    char *p = path_join(t_tmpdir(), "atomic.txt");
    T_CHECK(file_write_atomic(p, "hello", 5) == 0, "atomic write: %s", error_last());
    size_t n = 0;
    char *txt = file_read_all(p, &n);
    T_CHECK(txt && n == 5 && strcmp(txt, "hello") == 0, "read back");
    free(txt);
    free(p);
    char *deep = path_join(t_tmpdir(), "a/b/c");
    T_CHECK(path_mkdir_p(deep) == 0 && path_is_dir(deep), "mkdir -p");
    free(deep);
    T_CHECK(hash_crc32(0, "123456789", 9) == 0xCBF43926u, "crc32 check value");
    T_CHECK(hash_fnv64(HASH_FNV_INIT, "a", 1) == 0xaf63dc4c8601ec8cull, "fnv64 check value");
    // lookup3's own test vectors (hashlittle with initval 0).
    T_CHECK(h5_checksum_lookup3("", 0) == 0xdeadbeefu, "lookup3 of nothing");
    T_CHECK(h5_checksum_lookup3("Four score and seven years ago", 30) == 0x17770551u, "lookup3 check value");
    unsigned char sb[48] = {0x89, 'H', 'D', 'F', '\r', '\n', 0x1a, '\n', 2, 8, 8, 1};
    T_CHECK(h5_image_seal(sb, sizeof sb) == 0 && sb[11] == 0, "seal clears the status flags");
    uint32_t sum = (uint32_t)sb[44] | (uint32_t)sb[45] << 8 | (uint32_t)sb[46] << 16 | (uint32_t)sb[47] << 24;
    T_CHECK(sum == h5_checksum_lookup3(sb, 44), "seal stores the superblock checksum");
    T_CHECK(h5_image_seal("not hdf5 at all", 15) != 0, "seal accepts a non-HDF5 image");
    char *missing = path_join(t_tmpdir(), "no-such-dir/f.bin");
    T_CHECK(file_write_synced(missing, "x", 1) != 0 && strstr(error_last(), "no-such-dir/f.bin") &&
                strstr(error_last(), "No such file"),
            "synced write into a missing folder: %s", error_last());
    free(missing);
}

int main(void) {
    test_config();
    test_rng();
    test_util();
    return t_finish("test_common");
}

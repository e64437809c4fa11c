// Keyed Philox streams.
#include "perfcell/rng.h"

#include <Random123/philox.h>
#include <math.h>

uint64_t rng_mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

Rng rng_init(uint64_t seed, uint32_t purpose, uint32_t sub, uint64_t a, uint32_t b) {
    Rng r;
    uint64_t k = rng_mix64(rng_mix64(seed) ^ ((uint64_t)purpose << 32 | sub));
    r.key[0] = (uint32_t)k;
    r.key[1] = (uint32_t)(k >> 32);
    r.ctr[0] = (uint32_t)a;
    r.ctr[1] = (uint32_t)(a >> 32);
    r.ctr[2] = b;
    r.ctr[3] = 0;
    r.left = 0;
    return r;
}

static void block_at(const Rng *r, uint32_t idx, uint32_t out[4]) {
    philox4x32_ctr_t c = {{r->ctr[0], r->ctr[1], r->ctr[2], idx}};
    philox4x32_key_t k = {{r->key[0], r->key[1]}};
    philox4x32_ctr_t v = philox4x32(c, k);
    for (int i = 0; i < 4; i++) out[i] = v.v[i];
}

uint32_t rng_u32(Rng *r) {
    if (r->left == 0) {
        block_at(r, r->ctr[3], r->buf);
        r->ctr[3]++;
        r->left = 4;
    }
    return r->buf[4 - r->left--];
}

uint64_t rng_u64(Rng *r) {
    uint64_t hi = rng_u32(r);
    return hi << 32 | rng_u32(r);
}

float rng_uniform(Rng *r) { return (float)(rng_u32(r) >> 8) * (1.0f / 16777216.0f); }

double rng_uniform_double(Rng *r) { return (double)(rng_u64(r) >> 11) * (1.0 / 9007199254740992.0); }

double rng_normal(Rng *r) {
    // Box-Muller with u1 in (0, 1] so that log() is finite.
    double u1 = 1.0 - rng_uniform_double(r);
    double u2 = rng_uniform_double(r);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

uint64_t rng_below(Rng *r, uint64_t n) {
    // Lemire's multiply-shift with rejection, 64-bit.
    for (;;) {
        uint64_t x = rng_u64(r);
        __uint128_t m = (__uint128_t)x * n;
        uint64_t lo = (uint64_t)m;
        if (lo >= n || lo >= (-n) % n) return (uint64_t)(m >> 64);
    }
}

void rng_shuffle_u32(Rng *r, uint32_t *x, size_t n) {
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)rng_below(r, i);
        uint32_t t = x[i - 1];
        x[i - 1] = x[j];
        x[j] = t;
    }
}

void rng_block_at(const Rng *r, uint64_t i, uint32_t out[4]) { block_at(r, (uint32_t)i, out); }

uint32_t rng_word_at(const Rng *r, uint64_t i) {
    uint32_t v[4];
    block_at(r, (uint32_t)(i >> 2), v);
    return v[i & 3];
}

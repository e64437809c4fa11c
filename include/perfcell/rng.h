// Keyed counter-based randomness (Philox4x32-10 from Random123).
//
// Every random choice in perfcell is a pure function of
//   (seed, purpose, sub, a, b, draw index)
// where `purpose` says what the numbers are for (masking, dropout, ...), `sub`
// a small qualifier (layer, view, dropout site), `a` usually a global cell id
// and `b` usually an optimizer step. Nothing depends on the number of ranks,
// the micro-batch size or the order of work, so runs are reproducible across
// rank counts and exactly resumable.
//
// The 64-bit Philox key is a mix of (seed, purpose, sub); the 128-bit counter
// is (a lo, a hi, b, draw index), so each stream can yield 2^32 blocks of four
// 32-bit numbers.
#ifndef PERFCELL_RNG_H
#define PERFCELL_RNG_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    RNG_INIT = 1,     // parameter initialisation (a = parameter index)
    RNG_MASK = 2,     // MLM masking (a = cell id, b = step)
    RNG_DROPOUT = 3,  // dropout masks (sub = layer/site/view, a = cell id, b = step)
    RNG_SUBSET = 4,   // token subsets under max_tokens (a = cell id, b = step)
    RNG_FEATURES = 5, // FAVOR+ random features (sub = layer, a = redraw index)
    RNG_SPLIT = 6,    // train/validation split (a = cell id)
    RNG_SHUFFLE = 7,  // block permutation and in-block shuffles (a = epoch, b = block)
    RNG_TEST = 8,     // tests and benchmarks
    RNG_FINETUNE = 9, // fine-tuning splits and shuffles
} RngPurpose;

typedef struct {
    uint32_t key[2];
    uint32_t ctr[4];
    uint32_t buf[4];
    int left; // unread words in buf
} Rng;

Rng rng_init(uint64_t seed, uint32_t purpose, uint32_t sub, uint64_t a, uint32_t b);

uint32_t rng_u32(Rng *r);
uint64_t rng_u64(Rng *r);
float rng_uniform(Rng *r);            // [0, 1), 24 random bits
double rng_uniform_double(Rng *r);    // [0, 1), 53 random bits
double rng_normal(Rng *r);            // standard normal (Box-Muller)
uint64_t rng_below(Rng *r, uint64_t n); // uniform in [0, n), unbiased; n > 0
void rng_shuffle_u32(Rng *r, uint32_t *x, size_t n); // Fisher-Yates

// Stateless access: the i-th 32-bit word of the stream (random access, used
// for dropout masks so that any element's value is independent of how the
// work is split).
uint32_t rng_word_at(const Rng *r, uint64_t i);
// Words 4i .. 4i+3 of the stream at once.
void rng_block_at(const Rng *r, uint64_t i, uint32_t out[4]);

uint64_t rng_mix64(uint64_t x); // splitmix64 finaliser

#endif

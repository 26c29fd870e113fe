/* Tiny test harness shared by the CPU tests: checks that count instead of abort, a seeded
 * random generator (the seed is printed so a failure can be replayed: FP4MOE_TEST_SEED=N), and
 * the relative L2 error. Each test program ends with testing_finish(), which prints the
 * "N passed, N failed" line CTest logs and returns the exit code. */
#ifndef FP4MOE_TESTING_H
#define FP4MOE_TESTING_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

typedef struct testing_state {
    int passed;
    int failed;
} testing_state;

#define CHECK(state, cond, ...)                                                             \
    do {                                                                                    \
        if (cond) {                                                                         \
            (state)->passed++;                                                              \
        } else {                                                                            \
            (state)->failed++;                                                              \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond);       \
            fprintf(stderr, __VA_ARGS__);                                                   \
            fprintf(stderr, "\n");                                                          \
        }                                                                                   \
    } while (0)

static inline int testing_finish(const testing_state *state, const char *name)
{
    printf("%s: %d passed, %d failed\n", name, state->passed, state->failed);
    return state->failed == 0 ? 0 : 1;
}

/* xorshift64* generator; state never 0. */
typedef struct testing_rng {
    uint64_t s;
} testing_rng;

static inline uint64_t time_seed(void)
{
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (uint64_t)ts.tv_sec * 1000000007ull + (uint64_t)ts.tv_nsec;
}

static inline testing_rng testing_rng_from_env(const char *test_name)
{
    const char *env = getenv("FP4MOE_TEST_SEED");
    uint64_t seed = env ? strtoull(env, NULL, 10) : 0x9E3779B97F4A7C15ull ^ (uint64_t)time_seed();
    if (seed == 0) seed = 1;
    printf("%s: seed %llu (replay with FP4MOE_TEST_SEED=%llu)\n", test_name,
           (unsigned long long)seed, (unsigned long long)seed);
    testing_rng r = {seed};
    return r;
}

static inline uint64_t testing_next(testing_rng *r)
{
    r->s ^= r->s >> 12;
    r->s ^= r->s << 25;
    r->s ^= r->s >> 27;
    return r->s * 2685821657736338717ull;
}

/* An independent generator for item `index` of a list (splitmix64 of the seed and the index):
 * an item's draws then depend on the seed and its index only, not on which items ran before
 * (filters and shards do not change them). */
static inline testing_rng testing_rng_split(const testing_rng *base, uint64_t index)
{
    uint64_t z = base->s + (index + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    testing_rng r = {z != 0 ? z : 1};
    return r;
}

/* Uniform in [0, 1). */
static inline double testing_uniform(testing_rng *r)
{
    return (double)(testing_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

/* Standard normal (Box-Muller). */
static inline double testing_normal(testing_rng *r)
{
    double u1 = testing_uniform(r), u2 = testing_uniform(r);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

static inline int64_t testing_int(testing_rng *r, int64_t lo, int64_t hi_inclusive)
{
    return lo + (int64_t)(testing_next(r) % (uint64_t)(hi_inclusive - lo + 1));
}

/* ||a - b|| / ||b||; NaN anywhere gives +inf so it never passes. */
static inline double testing_rel_l2_f32_f64(const float *a, const double *b, int64_t n)
{
    double num = 0.0, den = 0.0;
    for (int64_t i = 0; i < n; i++) {
        if (isnan(a[i]) || isnan(b[i])) return INFINITY;
        double d = (double)a[i] - b[i];
        num += d * d;
        den += b[i] * b[i];
    }
    return den > 0.0 ? sqrt(num / den) : sqrt(num);
}

static inline double testing_rel_l2_f32(const float *a, const float *b, int64_t n)
{
    double num = 0.0, den = 0.0;
    for (int64_t i = 0; i < n; i++) {
        if (isnan(a[i]) || isnan(b[i])) return INFINITY;
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * (double)b[i];
    }
    return den > 0.0 ? sqrt(num / den) : sqrt(num);
}

#endif

/* The CUDA routing warp's ranking key (src/cuda/cuda_rank_key.h), checked on the host against
 * the ranking rule of src/route/route.c: for special values (NaN, +-inf, +-0, subnormals, the
 * extremes), every index up to the largest expert count and both tiers, key order must be the
 * rule's order and the index must come back; then random pairs. Runs in CI without a GPU. */
#include <float.h>
#include <math.h>

#include "cuda/cuda_rank_key.h"
#include "testing.h"

#define MAX_INDEX ((1 << 20) - 1) /* MAX_EXPERTS - 1 (src/core/config.c) */

/* route.c's ranks_before, with the DeepSeek-V3 tier in front (cuda_front.cu's `better`) */
static int rule_before(float a, int ia, int ta, float b, int ib, int tb)
{
    if (ta != tb) return ta > tb;
    if (isnan(a)) return isnan(b) && ia < ib;
    if (isnan(b)) return 1;
    if (a != b) return a > b;
    return ia < ib;
}

static void check_pair(testing_state *st, float a, int ia, int ta, float b, int ib, int tb)
{
    const uint64_t ka = rank_key(a, ia, ta), kb = rank_key(b, ib, tb);
    const int want = rule_before(a, ia, ta, b, ib, tb), got = ka > kb;
    CHECK(st, want == got, "(%a, %d, tier %d) before (%a, %d, tier %d): rule %d, key %d", a, ia,
          ta, b, ib, tb, want, got);
}

int main(void)
{
    testing_state st = {0, 0};
    testing_rng rng = testing_rng_from_env("test_rank_key");
    const float values[] = {NAN, -INFINITY, -FLT_MAX, -1.5f, -1.0f, -FLT_MIN, -0x1p-149f, -0.0f,
                            0.0f, 0x1p-149f, FLT_MIN, 1.0f, 1.5f, 2.0f, FLT_MAX, INFINITY};
    const int indices[] = {0, 1, 2, 255, 65535, 65536, MAX_INDEX - 1, MAX_INDEX};
    const int nv = sizeof values / sizeof values[0], ni = sizeof indices / sizeof indices[0];
    for (int va = 0; va < nv; va++)
        for (int xa = 0; xa < ni; xa++)
            for (int ta = 0; ta < 2; ta++) {
                const uint64_t key = rank_key(values[va], indices[xa], ta);
                CHECK(&st, key != 0 && rank_key_index(key) == indices[xa],
                      "(%a, %d, tier %d): key %llx gives index %d", values[va], indices[xa], ta,
                      (unsigned long long)key, rank_key_index(key));
                for (int vb = 0; vb < nv; vb++)
                    for (int xb = 0; xb < ni; xb++)
                        for (int tb = 0; tb < 2; tb++)
                            check_pair(&st, values[va], indices[xa], ta, values[vb], indices[xb], tb);
            }
    CHECK(&st, rank_key_index(0) == -1, "the empty key gives index %d", rank_key_index(0));
    /* random values near each other (ties included) and random indices */
    for (int i = 0; i < 200000; i++) {
        const float a = (float)testing_int(&rng, -32, 31) * 0.125f;
        const float b = testing_uniform(&rng) < 0.5 ? a : (float)testing_normal(&rng);
        const int ia = (int)testing_int(&rng, 0, MAX_INDEX), ib = (int)testing_int(&rng, 0, MAX_INDEX);
        const int ta = (int)testing_int(&rng, 0, 1), tb = (int)testing_int(&rng, 0, 1);
        check_pair(&st, a, ia, ta, b, ib, tb);
    }
    return testing_finish(&st, "test_rank_key");
}

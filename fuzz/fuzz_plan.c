/* libFuzzer target: fp4moe_plan_deserialize on arbitrary bytes. The harness re-seals each input
 * (size field and CRC trailer made consistent) so the fuzzer explores the field parser and the
 * plan validation behind the checksum, not only the checksum itself; every tenth input is passed
 * unsealed so the outer checks are exercised too. An accepted plan must serialise back to the
 * exact bytes it came from. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "fp4moe.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void put_le(uint8_t *p, uint64_t v, int bytes)
{
    for (int i = 0; i < bytes; i++) p[i] = (uint8_t)(v >> (8 * i));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > (1u << 20)) return 0;
    uint8_t *blob = malloc(size ? size : 1);
    if (blob == NULL) return 0;
    memcpy(blob, data, size);
    if (size >= 40 && data[0] % 10 != 0) {
        put_le(blob + 16, size, 8);
        put_le(blob + size - 4, (uint32_t)crc32_z(0L, blob, size - 4), 4);
    }
    fp4moe_context_options opt;
    fp4moe_context_options_init(&opt);
    opt.backend = FP4MOE_BACKEND_CPU;
    opt.num_threads = 1;
    fp4moe_context *ctx = NULL;
    if (fp4moe_context_create(&opt, &ctx) != FP4MOE_SUCCESS) abort();
    fp4moe_plan *plan = NULL;
    fp4moe_status st = fp4moe_plan_deserialize(ctx, blob, size, &plan);
    if (st == FP4MOE_SUCCESS) {
        size_t n = 0;
        if (plan == NULL || fp4moe_plan_serialized_size(plan, &n) != FP4MOE_SUCCESS || n != size)
            abort();
        uint8_t *again = malloc(n);
        if (again == NULL || fp4moe_plan_serialize(plan, again, n, NULL) != FP4MOE_SUCCESS ||
            memcmp(again, blob, n) != 0)
            abort();
        free(again);
    } else if (plan != NULL || fp4moe_last_error(ctx)[0] == '\0') {
        abort(); /* a failure leaves no plan and always says why */
    }
    fp4moe_plan_destroy(plan);
    fp4moe_context_destroy(ctx);
    free(blob);
    return 0;
}

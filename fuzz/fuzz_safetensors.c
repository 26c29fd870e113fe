/* libFuzzer target: st_parse on arbitrary bytes. Beyond the sanitizers' checks, an accepted file
 * must describe tensors that lie inside the input, have unique names st_find returns, and sizes
 * that agree with their shapes. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "io/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    st_file *f = NULL;
    char err[256];
    if (st_parse(data, size, &f, err, sizeof err) != 0) {
        if (f != NULL || memchr(err, '\0', sizeof err) == NULL) abort();
        return 0;
    }
    unsigned checksum = 0;
    for (int i = 0; i < st_count(f); i++) {
        const st_tensor *t = st_get(f, i);
        const uint8_t *p = t->data;
        if (t->ndim < 0 || t->ndim > ST_MAX_NDIM) abort();
        if (p < data || p > data + size || t->bytes > (size_t)(data + size - p)) abort();
        if (st_find(f, t->name) != t) abort();
        if (t->bytes > 0) checksum += p[0] + p[t->bytes - 1]; /* ASan checks both ends */
        uint64_t elements = 1;
        for (int d = 0; d < t->ndim; d++) {
            if (t->shape[d] < 0) abort();
            elements *= (uint64_t)t->shape[d];
        }
        if (t->dtype_known && elements * st_dtype_size(t->dtype) != t->bytes) abort();
        char message[128];
        if (t->dtype_known && st_expect(t, t->dtype, t->ndim, t->shape, message, sizeof message) != 0)
            abort();
        int64_t other[ST_MAX_NDIM] = {0};
        if (st_expect(t, FP4MOE_DTYPE_U8, ST_MAX_NDIM, other, message, sizeof message) == 0 &&
            !(t->dtype_known && t->dtype == FP4MOE_DTYPE_U8))
            abort();
    }
    (void)st_metadata(f, "format");
    (void)checksum;
    st_close(f);
    return 0;
}

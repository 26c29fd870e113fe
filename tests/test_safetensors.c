/* Safetensors: writer -> reader round trips for every dtype, and one hand-built malformed file per
 * validation rule, each of which must fail with a message naming the problem. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/safetensors.h"
#include "testing.h"

static testing_state state;

/* 8-byte length + header + data_bytes of non-zero filler. length_override < 0: the true length. */
static unsigned char *build_file(const char *header, long long length_override, size_t data_bytes,
                                 size_t *size)
{
    size_t header_bytes = strlen(header);
    *size = 8 + header_bytes + data_bytes;
    unsigned char *bytes = malloc(*size);
    if (bytes == NULL) abort();
    uint64_t n = length_override < 0 ? (uint64_t)header_bytes : (uint64_t)length_override;
    for (int i = 0; i < 8; i++) bytes[i] = (unsigned char)(n >> (8 * i));
    memcpy(bytes + 8, header, header_bytes);
    memset(bytes + 8 + header_bytes, 0x5a, data_bytes);
    return bytes;
}

/* Parses a malformed file; it must fail with a message containing want. */
static void expect_rejected(const char *what, const char *header, long long length_override,
                            size_t data_bytes, const char *want)
{
    size_t size;
    unsigned char *bytes = build_file(header, length_override, data_bytes, &size);
    st_file *f = (st_file *)1;
    char err[512] = "";
    int rc = st_parse(bytes, size, &f, err, sizeof err);
    CHECK(&state, rc != 0 && f == NULL, "%s: accepted (rc %d)", what, rc);
    CHECK(&state, strstr(err, want) != NULL, "%s: message '%s' lacks '%s'", what, err, want);
    st_close(rc == 0 ? f : NULL);
    free(bytes);
}

static st_file *expect_accepted(const char *what, const char *header, size_t data_bytes,
                                unsigned char **keep)
{
    size_t size;
    unsigned char *bytes = build_file(header, -1, data_bytes, &size);
    st_file *f = NULL;
    char err[512] = "";
    int rc = st_parse(bytes, size, &f, err, sizeof err);
    CHECK(&state, rc == 0 && f != NULL, "%s: rejected: %s", what, err);
    *keep = bytes;
    return f;
}

#define T(name, dtype, shape, offsets) \
    "\"" name "\":{\"dtype\":\"" dtype "\",\"shape\":" shape ",\"data_offsets\":" offsets "}"

static void test_malformed(void)
{
    /* Framing */
    {
        unsigned char five[5] = {1, 0, 0, 0, 0};
        st_file *f = NULL;
        char err[256] = "";
        CHECK(&state, st_parse(five, 5, &f, err, sizeof err) != 0 && strstr(err, "truncated"),
              "5-byte file: %s", err);
        CHECK(&state, st_parse(five, 0, &f, err, sizeof err) != 0 && strstr(err, "truncated"),
              "0-byte file: %s", err);
    }
    expect_rejected("header length beyond file", "{}", 100, 0, "exceeds");
    expect_rejected("header length 2^63", "{}", (long long)(UINT64_MAX >> 1), 0, "exceeds");
    expect_rejected("header length 0", "", 0, 4, "cannot hold");
    expect_rejected("bad JSON", "{\"a\":{\"dtype\":\"F32\",", -1, 0, "not valid JSON");
    expect_rejected("bad JSON 2", "{\"a\" 1}", -1, 0, "not valid JSON");
    expect_rejected("JSON array", "[1,2,3]", -1, 0, "not an object");
    expect_rejected("junk after JSON", "{}  x", -1, 0, "after the JSON");
    {
        unsigned char nul[8 + 8] = {8, 0, 0, 0, 0, 0, 0, 0, '{', '}', 0, ' ', ' ', ' ', ' ', ' '};
        st_file *f = NULL;
        char err[256] = "";
        CHECK(&state, st_parse(nul, sizeof nul, &f, err, sizeof err) != 0 && strstr(err, "NUL"),
              "NUL in header: %s", err);
    }

    {
        /* Too many JSON values: refused before cJSON builds a tree 50 times the header's size. */
        size_t zeros = (size_t)ST_MAX_HEADER_VALUES, n = 0;
        char *many = malloc(2 * zeros + 16);
        if (many == NULL) abort();
        n += (size_t)sprintf(many, "{\"a\":[");
        for (size_t i = 0; i < zeros; i++, n += 2) memcpy(many + n, "0,", 2);
        memcpy(many + n, "0]}", 4);
        expect_rejected("too many values", many, -1, 0, "JSON values, more than the limit");
        free(many);
    }

    /* Offsets and sizes */
    expect_rejected("offsets beyond buffer", "{" T("w", "F32", "[4]", "[0,16]") "}", -1, 8,
                    "tensor 'w': data_offsets [0, 16] outside the 8-byte data buffer");
    expect_rejected("end before begin", "{" T("w", "F32", "[0]", "[8,4]") "}", -1, 8,
                    "tensor 'w': data_offsets [8, 4] end before begin");
    expect_rejected("overlap",
                    "{" T("a", "F32", "[2]", "[0,8]") "," T("b", "F32", "[2]", "[4,12]") "}", -1,
                    16, "tensor 'b': data_offsets [4, 12] overlap tensor 'a'");
    expect_rejected("overlap, same range",
                    "{" T("b", "U8", "[4]", "[0,4]") "," T("a", "U8", "[4]", "[0,4]") "}", -1, 4,
                    "overlap");
    expect_rejected("size mismatch", "{" T("w", "F32", "[3]", "[0,8]") "}", -1, 16,
                    "tensor 'w': data_offsets span 8 bytes, shape and dtype F32 need 12");
    expect_rejected("element count overflow",
                    "{" T("w", "F32", "[4294967296,4294967296,16]", "[0,8]") "}", -1, 8,
                    "tensor 'w': shape's element count overflows");
    expect_rejected("bytes overflow", "{" T("w", "F64", "[4294967296,4294967296]", "[0,8]") "}",
                    -1, 8, "overflows");
    expect_rejected("dim beyond 2^53", "{" T("w", "U8", "[1e300]", "[0,8]") "}", -1, 8,
                    "dimension 0 is not an integer");
    expect_rejected("offset beyond 2^53", "{" T("w", "U8", "[0]", "[1e20,1e20]") "}", -1, 8,
                    "data_offsets are not integers");
    expect_rejected("half-byte F4", "{" T("w", "F4", "[3]", "[0,1]") "}", -1, 8,
                    "do not fill whole bytes");

    /* Names and shapes */
    expect_rejected("duplicate names",
                    "{" T("a", "U8", "[1]", "[0,1]") "," T("a", "U8", "[1]", "[1,2]") "}", -1, 2,
                    "tensor 'a': duplicate name");
    expect_rejected("ndim 9", "{" T("w", "U8", "[1,1,1,1,1,1,1,1,1]", "[0,1]") "}", -1, 1,
                    "tensor 'w': 9 dimensions, at most 8");
    expect_rejected("negative dim", "{" T("w", "U8", "[2,-1]", "[0,0]") "}", -1, 1,
                    "tensor 'w': negative dimension 1");
    expect_rejected("fractional dim", "{" T("w", "U8", "[1.5]", "[0,1]") "}", -1, 1,
                    "tensor 'w': dimension 0 is not an integer");

    /* Wrong types and fields */
    expect_rejected("entry not object", "{\"w\":[1,2]}", -1, 0, "tensor 'w': entry is not an object");
    expect_rejected("dtype number", "{\"w\":{\"dtype\":5,\"shape\":[],\"data_offsets\":[0,4]}}",
                    -1, 4, "tensor 'w': dtype is not a string");
    expect_rejected("unknown dtype", "{" T("w", "F128", "[1]", "[0,16]") "}", -1, 16,
                    "tensor 'w': unknown dtype 'F128'");
    expect_rejected("shape string", "{\"w\":{\"dtype\":\"U8\",\"shape\":\"4\",\"data_offsets\":[0,4]}}",
                    -1, 4, "tensor 'w': shape is not an array");
    expect_rejected("dim string", "{" T("w", "U8", "[\"4\"]", "[0,4]") "}", -1, 4,
                    "dimension 0 is not an integer");
    expect_rejected("offsets one", "{" T("w", "U8", "[4]", "[4]") "}", -1, 4,
                    "data_offsets is not an array of 2");
    expect_rejected("offsets three", "{" T("w", "U8", "[4]", "[0,4,4]") "}", -1, 4,
                    "data_offsets is not an array of 2");
    expect_rejected("offsets strings", "{" T("w", "U8", "[4]", "[\"0\",4]") "}", -1, 4,
                    "data_offsets are not integers");
    expect_rejected("offsets negative", "{" T("w", "U8", "[4]", "[-4,0]") "}", -1, 4,
                    "data_offsets are not integers");
    expect_rejected("missing field", "{\"w\":{\"dtype\":\"U8\",\"shape\":[4]}}", -1, 4,
                    "tensor 'w': missing field 'data_offsets'");
    expect_rejected("unknown field",
                    "{\"w\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4],\"x\":1}}", -1,
                    4, "tensor 'w': unknown field 'x'");
    expect_rejected("duplicate field",
                    "{\"w\":{\"dtype\":\"U8\",\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}}",
                    -1, 4, "tensor 'w': duplicate field 'dtype'");
    expect_rejected("metadata not object", "{\"__metadata__\":[1]}", -1, 0,
                    "__metadata__ is not an object");
    expect_rejected("metadata value number", "{\"__metadata__\":{\"format\":1}}", -1, 0,
                    "__metadata__ 'format': value is not a string");
    expect_rejected("metadata twice", "{\"__metadata__\":{},\"__metadata__\":{}}", -1, 0,
                    "duplicate __metadata__");

    /* Allowed edge cases: empty tensors overlap nothing, a zero dim beside a huge one, unknown
     * but valid dtypes, holes, trailing spaces, an empty header object. */
    unsigned char *keep = NULL;
    const char *edge_header = "{" T("empty1", "F32", "[0,9007199254740992]", "[4,4]") ","
                              T("empty2", "BF16", "[0]", "[4,4]") ","
                              T("wide", "I64", "[1]", "[8,16]") ","
                              T("nibbles", "F4", "[2,3]", "[0,3]") "}   ";
    st_file *f = expect_accepted("edge cases", edge_header, 20, &keep);
    if (f != NULL) {
        CHECK(&state, st_count(f) == 4, "count %d", st_count(f));
        const st_tensor *wide = st_find(f, "wide");
        const unsigned char *buffer = keep + 8 + strlen(edge_header);
        CHECK(&state, wide != NULL && !wide->dtype_known && strcmp(wide->dtype_name, "I64") == 0 &&
                          wide->bytes == 8 && (const unsigned char *)wide->data == buffer + 8,
              "I64 tensor");
        const st_tensor *e1 = st_find(f, "empty1");
        CHECK(&state, e1 != NULL && e1->bytes == 0 && e1->shape[1] == 9007199254740992LL, "empty1");
        CHECK(&state, st_find(f, "absent") == NULL, "absent tensor found");
        CHECK(&state, st_get(f, 4) == NULL && st_get(f, -1) == NULL, "st_get range");
        CHECK(&state, st_metadata(f, "format") == NULL, "metadata absent");
    }
    st_close(f);
    free(keep);
    f = expect_accepted("empty header", "{}      ", 0, &keep);
    CHECK(&state, f != NULL && st_count(f) == 0 && st_find(f, "x") == NULL, "empty file");
    st_close(f);
    free(keep);
}

static void test_round_trip(testing_rng *rng, const char *dir)
{
    const fp4moe_dtype dtypes[] = {FP4MOE_DTYPE_F32, FP4MOE_DTYPE_F16, FP4MOE_DTYPE_BF16,
                                   FP4MOE_DTYPE_I32, FP4MOE_DTYPE_U8, FP4MOE_DTYPE_E4M3};
    const char *names[] = {"F32", "F16", "BF16", "I32", "U8", "F8_E4M3"};
    enum { COUNT = 6 + 2 };
    unsigned char *data[COUNT];
    int64_t shapes[COUNT][ST_MAX_NDIM];
    int ndims[COUNT];
    char tensor_names[COUNT][48];
    st_writer *w = st_writer_create();
    CHECK(&state, w != NULL, "writer");
    if (w == NULL) return;
    for (int i = 0; i < COUNT; i++) {
        fp4moe_dtype dtype = dtypes[i % 6];
        /* Entries 6 and 7: a scalar and an 8-d tensor; names with characters JSON escapes. */
        ndims[i] = i == 6 ? 0 : i == 7 ? 8 : (int)testing_int(rng, 1, 4);
        size_t elements = 1;
        for (int d = 0; d < ndims[i]; d++) {
            shapes[i][d] = i == 7 ? testing_int(rng, 1, 2) : testing_int(rng, 1, 7);
            elements *= (size_t)shapes[i][d];
        }
        size_t bytes = elements * st_dtype_size(dtype);
        data[i] = malloc(bytes);
        if (data[i] == NULL) abort();
        for (size_t b = 0; b < bytes; b++) data[i][b] = (unsigned char)(1 + testing_next(rng) % 255);
        if (i < 6) snprintf(tensor_names[i], sizeof tensor_names[i], "layers.%d.%s", i, names[i]);
        else snprintf(tensor_names[i], sizeof tensor_names[i], i == 6 ? "quote\"back\\slash" : "ctl\x01\ttab");
        CHECK(&state, st_writer_add(w, tensor_names[i], dtype, ndims[i], shapes[i], data[i]) == 0,
              "add %s", tensor_names[i]);
    }
    CHECK(&state, st_writer_add_metadata(w, "format", "pt") == 0, "metadata");
    CHECK(&state, st_writer_add_metadata(w, "note", "first") == 0, "metadata");
    CHECK(&state, st_writer_add_metadata(w, "note", "\"replaced\"") == 0, "metadata replace");

    /* Rejected additions */
    int64_t negative[2] = {2, -1}, huge[3] = {INT64_MAX, INT64_MAX, 2};
    CHECK(&state, st_writer_add(w, tensor_names[0], FP4MOE_DTYPE_U8, 1, shapes[0], data[0]) != 0,
          "duplicate name accepted");
    CHECK(&state, st_writer_add(w, "n", FP4MOE_DTYPE_U8, 2, negative, data[0]) != 0, "negative dim");
    CHECK(&state, st_writer_add(w, "h", FP4MOE_DTYPE_U8, 3, huge, data[0]) != 0, "overflow");
    CHECK(&state, st_writer_add(w, "9", FP4MOE_DTYPE_U8, 9, shapes[7], data[0]) != 0, "ndim 9");
    CHECK(&state, st_writer_add(w, "", FP4MOE_DTYPE_U8, 1, shapes[0], data[0]) != 0, "empty name");
    CHECK(&state, st_writer_add(w, "__metadata__", FP4MOE_DTYPE_U8, 1, shapes[0], data[0]) != 0,
          "reserved name");
    CHECK(&state, st_writer_add(w, "null", FP4MOE_DTYPE_U8, 1, shapes[0], NULL) != 0, "NULL data");
    CHECK(&state, st_writer_add(w, "dtype", (fp4moe_dtype)77, 1, shapes[0], data[0]) != 0, "dtype 77");

    char path[512];
    snprintf(path, sizeof path, "%s/round_trip.safetensors", dir);
    char err[512] = "";
    CHECK(&state, st_writer_write(w, path, err, sizeof err) == 0, "write: %s", err);
    st_writer_destroy(w);

    st_file *f = NULL;
    CHECK(&state, st_open(path, &f, err, sizeof err) == 0, "open: %s", err);
    if (f != NULL) {
        CHECK(&state, st_count(f) == COUNT, "count %d", st_count(f));
        CHECK(&state, st_metadata(f, "format") && strcmp(st_metadata(f, "format"), "pt") == 0, "format");
        CHECK(&state, st_metadata(f, "note") && strcmp(st_metadata(f, "note"), "\"replaced\"") == 0,
              "note");
        for (int i = 0; i < COUNT && i < st_count(f); i++) {
            const st_tensor *t = st_get(f, i);
            size_t bytes = st_dtype_size(dtypes[i % 6]);
            for (int d = 0; d < ndims[i]; d++) bytes *= (size_t)shapes[i][d];
            CHECK(&state, strcmp(t->name, tensor_names[i]) == 0, "order: %d is %s", i, t->name);
            CHECK(&state, st_find(f, tensor_names[i]) == t, "find %s", tensor_names[i]);
            CHECK(&state, t->dtype_known && t->dtype == dtypes[i % 6] &&
                           strcmp(t->dtype_name, names[i % 6]) == 0, "dtype of %s", t->name);
            CHECK(&state, st_expect(t, dtypes[i % 6], ndims[i], shapes[i], err, sizeof err) == 0,
                  "shape of %s: %s", t->name, err);
            CHECK(&state, t->bytes == bytes && memcmp(t->data, data[i], bytes) == 0, "data of %s",
                  t->name);
        }
    }
    st_close(f);

    /* The header is padded with spaces to a multiple of 8; the same bytes parse from memory. */
    FILE *file = fopen(path, "rb");
    unsigned char *image = NULL;
    long size = 0;
    if (file != NULL && fseek(file, 0, SEEK_END) == 0 && (size = ftell(file)) > 8) {
        rewind(file);
        image = malloc((size_t)size);
        if (image != NULL && fread(image, 1, (size_t)size, file) != (size_t)size) size = 0;
    }
    if (file != NULL) fclose(file);
    CHECK(&state, image != NULL && size > 8, "read back %s", path);
    if (image != NULL && size > 8) {
        uint64_t n = 0;
        for (int i = 7; i >= 0; i--) n = n << 8 | image[i];
        CHECK(&state, n % 8 == 0 && n + 8 <= (uint64_t)size, "header length %llu", (unsigned long long)n);
        CHECK(&state, image[8] == '{' && (image[8 + n - 1] == ' ' || image[8 + n - 1] == '}'),
              "padding");
        f = NULL;
        CHECK(&state, st_parse(image, (size_t)size, &f, err, sizeof err) == 0, "parse: %s", err);
        const st_tensor *t = st_get(f, 0);
        CHECK(&state, t != NULL && (const unsigned char *)t->data == image + 8 + n, "data in place");
        st_close(f);
        /* Every truncation of a valid file is rejected cleanly. */
        int truncations_rejected = 1;
        for (long cut = 0; cut < size; cut++) {
            f = NULL;
            if (st_parse(image, (size_t)cut, &f, err, sizeof err) == 0) {
                truncations_rejected = 0;
                st_close(f);
            }
        }
        CHECK(&state, truncations_rejected, "a truncated file was accepted");
    }
    free(image);
    unlink(path);

    /* An empty writer gives a valid empty file. */
    w = st_writer_create();
    snprintf(path, sizeof path, "%s/empty.safetensors", dir);
    CHECK(&state, w != NULL && st_writer_write(w, path, err, sizeof err) == 0, "empty write: %s", err);
    st_writer_destroy(w);
    f = NULL;
    CHECK(&state, st_open(path, &f, err, sizeof err) == 0 && st_count(f) == 0, "empty read: %s", err);
    st_close(f);
    unlink(path);
    for (int i = 0; i < COUNT; i++) free(data[i]);
}

static void test_expect_messages(void)
{
    unsigned char *keep = NULL;
    st_file *f = expect_accepted("w1", "{" T("w1", "U8", "[4,64,16]", "[0,4096]") ","
                                      T("s", "F32", "[]", "[4096,4100]") ","
                                      T("d", "F64", "[2]", "[4100,4116]") "}", 4116, &keep);
    char err[256] = "";
    int64_t want[3] = {4, 64, 32};
    CHECK(&state, st_expect(st_find(f, "w1"), FP4MOE_DTYPE_U8, 3, want, err, sizeof err) != 0 &&
                   strcmp(err, "tensor 'w1': expected shape [4,64,32] U8, got [4,64,16] U8") == 0,
          "message: %s", err);
    int64_t right[3] = {4, 64, 16};
    CHECK(&state, st_expect(st_find(f, "w1"), FP4MOE_DTYPE_E4M3, 3, right, err, sizeof err) != 0 &&
                   strcmp(err, "tensor 'w1': expected shape [4,64,16] F8_E4M3, got [4,64,16] U8") == 0,
          "message: %s", err);
    CHECK(&state, st_expect(st_find(f, "w1"), FP4MOE_DTYPE_U8, 2, right, err, sizeof err) != 0 &&
                   strcmp(err, "tensor 'w1': expected shape [4,64] U8, got [4,64,16] U8") == 0,
          "message: %s", err);
    CHECK(&state, st_expect(st_find(f, "s"), FP4MOE_DTYPE_F32, 0, NULL, err, sizeof err) == 0, "scalar");
    int64_t two = 2;
    CHECK(&state, st_expect(st_find(f, "d"), FP4MOE_DTYPE_F32, 1, &two, err, sizeof err) != 0 &&
                   strcmp(err, "tensor 'd': expected shape [2] F32, got [2] F64") == 0,
          "message: %s", err);
    /* A tiny buffer still ends up terminated. */
    char tiny[8];
    CHECK(&state, st_expect(st_find(f, "w1"), FP4MOE_DTYPE_U8, 3, want, tiny, sizeof tiny) != 0 &&
                   strlen(tiny) == 7, "tiny buffer");
    st_close(f);
    free(keep);

    f = NULL;
    CHECK(&state, st_open("/nonexistent/x.safetensors", &f, err, sizeof err) != 0 && f == NULL &&
                   strstr(err, "/nonexistent/x.safetensors") != NULL, "missing file: %s", err);
}

int main(void)
{
    testing_rng rng = testing_rng_from_env("test_safetensors");
    char dir[] = "/tmp/test_safetensors_XXXXXX";
    if (mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    test_malformed();
    test_round_trip(&rng, dir);
    test_expect_messages();
    rmdir(dir);
    return testing_finish(&state, "test_safetensors");
}

/* Safetensors reader and writer; see safetensors.h for the format and the guarantees. */
#include "io/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include "io/io_error.h"

/* Names are cut to this many bytes in messages, so a hostile name cannot hide the problem. */
#define NAME_IN_MESSAGE 120
/* Integers above 2^53 do not survive cJSON's doubles exactly, so they are refused. */
#define JSON_MAX_EXACT_INTEGER 9007199254740992.0

typedef struct dtype_info {
    const char *name;
    unsigned bits;  /* per element; sub-byte types (F4, F6) pack densely */
    int known;      /* maps to an fp4moe_dtype */
    fp4moe_dtype dtype;
} dtype_info;

/* Every dtype the official package knows, so that files with other tensors still open. */
static const dtype_info DTYPES[] = {
    {"F32", 32, 1, FP4MOE_DTYPE_F32},  {"F16", 16, 1, FP4MOE_DTYPE_F16},
    {"BF16", 16, 1, FP4MOE_DTYPE_BF16}, {"I32", 32, 1, FP4MOE_DTYPE_I32},
    {"U8", 8, 1, FP4MOE_DTYPE_U8},     {"F8_E4M3", 8, 1, FP4MOE_DTYPE_E4M3},
    {"BOOL", 8, 0, FP4MOE_DTYPE_F32},  {"I8", 8, 0, FP4MOE_DTYPE_F32},
    {"F8_E5M2", 8, 0, FP4MOE_DTYPE_F32}, {"F8_E8M0", 8, 0, FP4MOE_DTYPE_F32},
    {"I16", 16, 0, FP4MOE_DTYPE_F32},  {"U16", 16, 0, FP4MOE_DTYPE_F32},
    {"U32", 32, 0, FP4MOE_DTYPE_F32},  {"I64", 64, 0, FP4MOE_DTYPE_F32},
    {"U64", 64, 0, FP4MOE_DTYPE_F32},  {"F64", 64, 0, FP4MOE_DTYPE_F32},
    {"C64", 64, 0, FP4MOE_DTYPE_F32},  {"F4", 4, 0, FP4MOE_DTYPE_F32},
    {"F6_E2M3", 6, 0, FP4MOE_DTYPE_F32}, {"F6_E3M2", 6, 0, FP4MOE_DTYPE_F32},
};
#define DTYPE_COUNT ((int)(sizeof(DTYPES) / sizeof(DTYPES[0])))

typedef struct metadata_entry {
    char *key;
    char *value;
} metadata_entry;

typedef struct name_index {
    const char *name;
    int index;
} name_index;

struct st_file {
    st_tensor *tensors;
    int count;
    name_index *sorted; /* by name, for st_find and the duplicate check */
    metadata_entry *metadata;
    int metadata_count;
    void *mapping; /* st_open only */
    size_t mapping_bytes;
};

const char *st_dtype_name(fp4moe_dtype dtype)
{
    for (int i = 0; i < DTYPE_COUNT; i++)
        if (DTYPES[i].known && DTYPES[i].dtype == dtype) return DTYPES[i].name;
    return NULL;
}

size_t st_dtype_size(fp4moe_dtype dtype)
{
    for (int i = 0; i < DTYPE_COUNT; i++)
        if (DTYPES[i].known && DTYPES[i].dtype == dtype) return DTYPES[i].bits / 8;
    return 0;
}

static const dtype_info *dtype_by_name(const char *name)
{
    for (int i = 0; i < DTYPE_COUNT; i++)
        if (strcmp(DTYPES[i].name, name) == 0) return &DTYPES[i];
    return NULL;
}

static char *copy_string(const char *s)
{
    size_t n = strlen(s) + 1;
    char *c = malloc(n);
    if (c != NULL) memcpy(c, s, n);
    return c;
}

/* ------------------------------------------------------------------------------------------ */
/* Reader                                                                                     */
/* ------------------------------------------------------------------------------------------ */
void st_close(st_file *f)
{
    if (f == NULL) return;
    if (f->tensors != NULL)
        for (int i = 0; i < f->count; i++) free((char *)f->tensors[i].name);
    if (f->metadata != NULL)
        for (int i = 0; i < f->metadata_count; i++) {
            free(f->metadata[i].key);
            free(f->metadata[i].value);
        }
    free(f->tensors);
    free(f->sorted);
    free(f->metadata);
    if (f->mapping != NULL) munmap(f->mapping, f->mapping_bytes);
    free(f);
}

static int json_exact_u64(const cJSON *item, uint64_t *out)
{
    if (!cJSON_IsNumber(item)) return 0;
    double v = item->valuedouble;
    if (!(v >= 0.0) || v > JSON_MAX_EXACT_INTEGER) return 0;
    uint64_t u = (uint64_t)v;
    if ((double)u != v) return 0;
    *out = u;
    return 1;
}

static int compare_names(const void *a, const void *b)
{
    return strcmp(((const name_index *)a)->name, ((const name_index *)b)->name);
}

typedef struct byte_range {
    uint64_t begin;
    uint64_t end;
    int index;
} byte_range;

static int compare_ranges(const void *a, const void *b)
{
    const byte_range *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return x->index - y->index;
}

static int parse_metadata(st_file *f, const cJSON *object, char *err, size_t err_bytes)
{
    if (!cJSON_IsObject(object)) return io_fail(1, err, err_bytes, "__metadata__ is not an object");
    int n = cJSON_GetArraySize(object);
    if (n == 0) return 0;
    f->metadata = calloc((size_t)n, sizeof(metadata_entry));
    if (f->metadata == NULL) return io_fail(1, err, err_bytes, "out of memory");
    for (const cJSON *item = object->child; item != NULL; item = item->next) {
        if (!cJSON_IsString(item))
            return io_fail(1, err, err_bytes, "__metadata__ '%.*s': value is not a string",
                        NAME_IN_MESSAGE, item->string);
        for (int i = 0; i < f->metadata_count; i++)
            if (strcmp(f->metadata[i].key, item->string) == 0)
                return io_fail(1, err, err_bytes, "__metadata__ '%.*s': duplicate key",
                            NAME_IN_MESSAGE, item->string);
        metadata_entry *e = &f->metadata[f->metadata_count];
        e->key = copy_string(item->string);
        e->value = copy_string(item->valuestring);
        f->metadata_count++; /* counted before the check so st_close frees a partial entry */
        if (e->key == NULL || e->value == NULL) return io_fail(1, err, err_bytes, "out of memory");
    }
    return 0;
}

/* Fills t (except data) and its byte range from one header entry. */
static int parse_tensor(const cJSON *entry, st_tensor *t, byte_range *range, uint64_t buffer_bytes,
                        char *err, size_t err_bytes)
{
    const char *name = t->name;
    if (!cJSON_IsObject(entry))
        return io_fail(1, err, err_bytes, "tensor '%.*s': entry is not an object", NAME_IN_MESSAGE, name);
    const cJSON *dtype = NULL, *shape = NULL, *offsets = NULL;
    for (const cJSON *field = entry->child; field != NULL; field = field->next) {
        const cJSON **slot = strcmp(field->string, "dtype") == 0          ? &dtype
                             : strcmp(field->string, "shape") == 0        ? &shape
                             : strcmp(field->string, "data_offsets") == 0 ? &offsets
                                                                          : NULL;
        if (slot == NULL)
            return io_fail(1, err, err_bytes, "tensor '%.*s': unknown field '%.*s'", NAME_IN_MESSAGE,
                        name, NAME_IN_MESSAGE, field->string);
        if (*slot != NULL)
            return io_fail(1, err, err_bytes, "tensor '%.*s': duplicate field '%s'", NAME_IN_MESSAGE,
                        name, field->string);
        *slot = field;
    }
    if (dtype == NULL || shape == NULL || offsets == NULL)
        return io_fail(1, err, err_bytes, "tensor '%.*s': missing field '%s'", NAME_IN_MESSAGE, name,
                    dtype == NULL ? "dtype" : shape == NULL ? "shape" : "data_offsets");

    if (!cJSON_IsString(dtype))
        return io_fail(1, err, err_bytes, "tensor '%.*s': dtype is not a string", NAME_IN_MESSAGE, name);
    const dtype_info *info = dtype_by_name(dtype->valuestring);
    if (info == NULL)
        return io_fail(1, err, err_bytes, "tensor '%.*s': unknown dtype '%.*s'", NAME_IN_MESSAGE, name,
                    NAME_IN_MESSAGE, dtype->valuestring);
    t->dtype_name = info->name; /* the static copy, so the string outlives the JSON tree */
    t->dtype_known = info->known;
    t->dtype = info->dtype;

    if (!cJSON_IsArray(shape))
        return io_fail(1, err, err_bytes, "tensor '%.*s': shape is not an array", NAME_IN_MESSAGE, name);
    int ndim = cJSON_GetArraySize(shape);
    if (ndim > ST_MAX_NDIM)
        return io_fail(1, err, err_bytes, "tensor '%.*s': %d dimensions, at most %d are supported",
                    NAME_IN_MESSAGE, name, ndim, ST_MAX_NDIM);
    t->ndim = ndim;
    uint64_t elements = 1;
    int overflow = 0, d = 0;
    for (const cJSON *dim = shape->child; dim != NULL; dim = dim->next, d++) {
        uint64_t v;
        if (cJSON_IsNumber(dim) && dim->valuedouble < 0)
            return io_fail(1, err, err_bytes, "tensor '%.*s': negative dimension %d (%.0f)",
                        NAME_IN_MESSAGE, name, d, dim->valuedouble);
        if (!json_exact_u64(dim, &v))
            return io_fail(1, err, err_bytes, "tensor '%.*s': dimension %d is not an integer in [0, 2^53]",
                        NAME_IN_MESSAGE, name, d);
        t->shape[d] = (int64_t)v;
        if (v == 0) elements = 0;
        else if (elements != 0 && elements > UINT64_MAX / v) overflow = 1;
        else elements *= v;
    }
    /* A zero dimension makes the tensor empty however large the others are. */
    if (elements != 0 && (overflow || elements > UINT64_MAX / info->bits))
        return io_fail(1, err, err_bytes, "tensor '%.*s': shape's element count overflows",
                    NAME_IN_MESSAGE, name);
    uint64_t bits = elements * info->bits;
    if (bits % 8 != 0)
        return io_fail(1, err, err_bytes, "tensor '%.*s': %llu %s elements do not fill whole bytes",
                    NAME_IN_MESSAGE, name, (unsigned long long)elements, info->name);

    if (!cJSON_IsArray(offsets) || cJSON_GetArraySize(offsets) != 2)
        return io_fail(1, err, err_bytes, "tensor '%.*s': data_offsets is not an array of 2 integers",
                    NAME_IN_MESSAGE, name);
    uint64_t begin, end;
    if (!json_exact_u64(offsets->child, &begin) || !json_exact_u64(offsets->child->next, &end))
        return io_fail(1, err, err_bytes,
                    "tensor '%.*s': data_offsets are not integers in [0, 2^53]", NAME_IN_MESSAGE,
                    name);
    if (end < begin)
        return io_fail(1, err, err_bytes, "tensor '%.*s': data_offsets [%llu, %llu] end before begin",
                    NAME_IN_MESSAGE, name, (unsigned long long)begin, (unsigned long long)end);
    if (end > buffer_bytes)
        return io_fail(1, err, err_bytes,
                    "tensor '%.*s': data_offsets [%llu, %llu] outside the %llu-byte data buffer",
                    NAME_IN_MESSAGE, name, (unsigned long long)begin, (unsigned long long)end,
                    (unsigned long long)buffer_bytes);
    if (end - begin != bits / 8)
        return io_fail(1, err, err_bytes,
                    "tensor '%.*s': data_offsets span %llu bytes, shape and dtype %s need %llu",
                    NAME_IN_MESSAGE, name, (unsigned long long)(end - begin), info->name,
                    (unsigned long long)(bits / 8));
    range->begin = begin;
    range->end = end;
    t->bytes = (size_t)(end - begin);
    return 0;
}

static int check_names_and_ranges(st_file *f, byte_range *ranges, char *err, size_t err_bytes)
{
    for (int i = 0; i < f->count; i++) {
        f->sorted[i].name = f->tensors[i].name;
        f->sorted[i].index = i;
    }
    qsort(f->sorted, (size_t)f->count, sizeof(name_index), compare_names);
    for (int i = 1; i < f->count; i++)
        if (strcmp(f->sorted[i - 1].name, f->sorted[i].name) == 0)
            return io_fail(1, err, err_bytes, "tensor '%.*s': duplicate name", NAME_IN_MESSAGE,
                        f->sorted[i].name);

    qsort(ranges, (size_t)f->count, sizeof(byte_range), compare_ranges);
    /* Empty tensors occupy no bytes and so overlap nothing. */
    const byte_range *previous = NULL;
    for (int i = 0; i < f->count; i++) {
        if (ranges[i].begin == ranges[i].end) continue;
        if (previous != NULL && ranges[i].begin < previous->end)
            return io_fail(1, err, err_bytes, "tensor '%.*s': data_offsets [%llu, %llu] overlap tensor "
                        "'%.*s' [%llu, %llu]", NAME_IN_MESSAGE, f->tensors[ranges[i].index].name,
                        (unsigned long long)ranges[i].begin, (unsigned long long)ranges[i].end,
                        NAME_IN_MESSAGE, f->tensors[previous->index].name,
                        (unsigned long long)previous->begin, (unsigned long long)previous->end);
        previous = &ranges[i];
    }
    return 0;
}

static int parse_header(st_file *f, const cJSON *root, const unsigned char *buffer,
                        uint64_t buffer_bytes, char *err, size_t err_bytes)
{
    if (!cJSON_IsObject(root)) return io_fail(1, err, err_bytes, "header JSON is not an object");
    int tensors = 0, metadata_seen = 0;
    for (const cJSON *item = root->child; item != NULL; item = item->next) {
        if (strcmp(item->string, "__metadata__") != 0) tensors++;
        else if (metadata_seen++) return io_fail(1, err, err_bytes, "duplicate __metadata__");
        else if (parse_metadata(f, item, err, err_bytes) != 0) return 1;
    }
    if (tensors == 0) return 0;
    f->tensors = calloc((size_t)tensors, sizeof(st_tensor));
    f->sorted = calloc((size_t)tensors, sizeof(name_index));
    byte_range *ranges = calloc((size_t)tensors, sizeof(byte_range));
    if (f->tensors == NULL || f->sorted == NULL || ranges == NULL) {
        free(ranges);
        return io_fail(1, err, err_bytes, "out of memory for %d tensors", tensors);
    }
    int status = 0;
    for (const cJSON *item = root->child; item != NULL && status == 0; item = item->next) {
        if (strcmp(item->string, "__metadata__") == 0) continue;
        st_tensor *t = &f->tensors[f->count];
        t->name = copy_string(item->string);
        if (t->name == NULL) {
            status = io_fail(1, err, err_bytes, "out of memory");
            break;
        }
        ranges[f->count].index = f->count;
        f->count++; /* before parsing, so st_close frees the name on failure */
        status = parse_tensor(item, t, &ranges[f->count - 1], buffer_bytes, err, err_bytes);
        if (status == 0) t->data = buffer + ranges[f->count - 1].begin;
    }
    if (status == 0) status = check_names_and_ranges(f, ranges, err, err_bytes);
    free(ranges);
    return status;
}

static int is_json_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* An upper bound on the number of values in a JSON text (every value opens the text, follows
 * '[', '{' or ','), counted outside strings. cJSON spends ~100 bytes per value, 50 times a
 * header of "0,0,0,...", so the bound is checked before any tree is built. */
static uint64_t json_value_bound(const char *text, size_t bytes)
{
    uint64_t count = 1;
    int in_string = 0;
    for (size_t i = 0; i < bytes; i++) {
        char c = text[i];
        if (in_string) {
            if (c == '\\') i++;
            else if (c == '"') in_string = 0;
        } else if (c == '"') {
            in_string = 1;
        } else if (c == '[' || c == '{' || c == ',') {
            count++;
        }
    }
    return count;
}

int st_parse(const void *bytes, size_t size, st_file **out, char *err, size_t err_bytes)
{
    if (out == NULL) return io_fail(1, err, err_bytes, "out is NULL");
    *out = NULL;
    if (bytes == NULL && size != 0) return io_fail(1, err, err_bytes, "bytes is NULL");
    if (size < 8)
        return io_fail(1, err, err_bytes, "truncated: %zu bytes, the header length alone needs 8", size);
    const unsigned char *p = bytes;
    uint64_t header_bytes = 0;
    for (int i = 7; i >= 0; i--) header_bytes = header_bytes << 8 | p[i];
    if (header_bytes > size - 8)
        return io_fail(1, err, err_bytes, "header length %llu exceeds the %zu bytes after it",
                    (unsigned long long)header_bytes, size - 8);
    if (header_bytes > ST_MAX_HEADER_BYTES)
        return io_fail(1, err, err_bytes, "header length %llu exceeds the limit of %llu bytes",
                    (unsigned long long)header_bytes, (unsigned long long)ST_MAX_HEADER_BYTES);
    if (header_bytes < 2) return io_fail(1, err, err_bytes, "header of %llu bytes cannot hold a JSON object",
                                      (unsigned long long)header_bytes);
    const char *header = (const char *)p + 8;
    if (memchr(header, '\0', (size_t)header_bytes) != NULL)
        return io_fail(1, err, err_bytes, "header contains a NUL byte");

    uint64_t values = json_value_bound(header, (size_t)header_bytes);
    if (values > ST_MAX_HEADER_VALUES)
        return io_fail(1, err, err_bytes, "header holds %llu JSON values, more than the limit of %llu",
                    (unsigned long long)values, (unsigned long long)ST_MAX_HEADER_VALUES);

    const char *json_end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(header, (size_t)header_bytes, &json_end, 0);
    if (root == NULL) {
        /* cJSON reports the failure position through json_end (its global error pointer is not
         * safe across threads). */
        long offset = json_end != NULL && json_end >= header && json_end <= header + header_bytes
                          ? (long)(json_end - header) : -1;
        return io_fail(1, err, err_bytes, "header is not valid JSON (near byte %ld)", offset);
    }
    /* The official writer pads the header with spaces; anything else after the object is junk. */
    for (const char *c = json_end; c < header + header_bytes; c++)
        if (!is_json_space((unsigned char)*c)) {
            cJSON_Delete(root);
            return io_fail(1, err, err_bytes, "header has data after the JSON object (byte %ld)",
                        (long)(c - header));
        }

    st_file *f = calloc(1, sizeof(st_file));
    if (f == NULL) {
        cJSON_Delete(root);
        return io_fail(1, err, err_bytes, "out of memory");
    }
    const unsigned char *buffer = p + 8 + header_bytes;
    int status = parse_header(f, root, buffer, size - 8 - header_bytes, err, err_bytes);
    cJSON_Delete(root);
    if (status != 0) {
        st_close(f);
        return status;
    }
    *out = f;
    return 0;
}

int st_open(const char *path, st_file **out, char *err, size_t err_bytes)
{
    if (out == NULL || path == NULL) return io_fail(1, err, err_bytes, "path or out is NULL");
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return io_fail(1, err, err_bytes, "%s: cannot open: %s", path, strerror(errno));
    struct stat info;
    if (fstat(fd, &info) != 0 || !S_ISREG(info.st_mode)) {
        close(fd);
        return io_fail(1, err, err_bytes, "%s: not a regular file", path);
    }
    size_t size = (size_t)info.st_size;
    if (size < 8) {
        close(fd);
        return io_fail(1, err, err_bytes, "%s: truncated: %zu bytes, the header length alone needs 8",
                    path, size);
    }
    void *mapping = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (mapping == MAP_FAILED) return io_fail(1, err, err_bytes, "%s: cannot map: %s", path, strerror(errno));
    char message[512];
    st_file *f = NULL;
    if (st_parse(mapping, size, &f, message, sizeof message) != 0) {
        munmap(mapping, size);
        return io_fail(1, err, err_bytes, "%s: %s", path, message);
    }
    f->mapping = mapping;
    f->mapping_bytes = size;
    *out = f;
    return 0;
}

int st_count(const st_file *f)
{
    return f != NULL ? f->count : 0;
}

const st_tensor *st_get(const st_file *f, int index)
{
    if (f == NULL || index < 0 || index >= f->count) return NULL;
    return &f->tensors[index];
}

const st_tensor *st_find(const st_file *f, const char *name)
{
    if (f == NULL || name == NULL || f->count == 0) return NULL;
    name_index key = {name, 0};
    const name_index *hit = bsearch(&key, f->sorted, (size_t)f->count, sizeof(name_index),
                                    compare_names);
    return hit != NULL ? &f->tensors[hit->index] : NULL;
}

const char *st_metadata(const st_file *f, const char *key)
{
    if (f == NULL || key == NULL) return NULL;
    for (int i = 0; i < f->metadata_count; i++)
        if (strcmp(f->metadata[i].key, key) == 0) return f->metadata[i].value;
    return NULL;
}

/* "[4,64,32]" into buf (cut short, still terminated, when it does not fit). */
static void format_shape(char *buf, size_t bytes, int ndim, const int64_t *shape)
{
    size_t used = 0;
    int n = snprintf(buf, bytes, "[");
    for (int d = 0; d < ndim && n >= 0; d++) {
        used += (size_t)n;
        if (used >= bytes) return;
        n = snprintf(buf + used, bytes - used, "%s%lld", d ? "," : "", (long long)shape[d]);
    }
    if (n < 0) return;
    used += (size_t)n;
    if (used < bytes) snprintf(buf + used, bytes - used, "]");
}

int st_expect(const st_tensor *t, fp4moe_dtype dtype, int ndim, const int64_t *shape, char *err,
              size_t err_bytes)
{
    const char *want_dtype = st_dtype_name(dtype);
    if (t == NULL || want_dtype == NULL || ndim < 0 || ndim > ST_MAX_NDIM ||
        (shape == NULL && ndim > 0))
        return io_fail(1, err, err_bytes, "st_expect: invalid arguments");
    int match = t->dtype_known && t->dtype == dtype && t->ndim == ndim;
    for (int d = 0; match && d < ndim; d++) match = t->shape[d] == shape[d];
    if (match) return 0;
    char want[200], got[200];
    format_shape(want, sizeof want, ndim, shape);
    format_shape(got, sizeof got, t->ndim, t->shape);
    return io_fail(1, err, err_bytes, "tensor '%.*s': expected shape %s %s, got %s %s", NAME_IN_MESSAGE,
                t->name, want, want_dtype, got, t->dtype_name);
}

/* ------------------------------------------------------------------------------------------ */
/* Writer                                                                                     */
/* ------------------------------------------------------------------------------------------ */
typedef struct writer_entry {
    char *name;
    fp4moe_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_NDIM];
    const void *data;
    size_t bytes;
} writer_entry;

struct st_writer {
    writer_entry *entries;
    int count, capacity;
    metadata_entry *metadata;
    int metadata_count, metadata_capacity;
};

st_writer *st_writer_create(void)
{
    return calloc(1, sizeof(st_writer));
}

void st_writer_destroy(st_writer *w)
{
    if (w == NULL) return;
    for (int i = 0; i < w->count; i++) free(w->entries[i].name);
    for (int i = 0; i < w->metadata_count; i++) {
        free(w->metadata[i].key);
        free(w->metadata[i].value);
    }
    free(w->entries);
    free(w->metadata);
    free(w);
}

/* Doubles *capacity until index fits; 0 on success. */
static int grow(void **array, int *capacity, int needed, size_t element_bytes)
{
    if (needed <= *capacity) return 0;
    if (*capacity > INT_MAX / 2) return 1;
    int c = *capacity ? *capacity * 2 : 16;
    void *p = realloc(*array, (size_t)c * element_bytes);
    if (p == NULL) return 1;
    *array = p;
    *capacity = c;
    return 0;
}

int st_writer_add(st_writer *w, const char *name, fp4moe_dtype dtype, int ndim,
                  const int64_t *shape, const void *data)
{
    if (w == NULL || name == NULL || name[0] == '\0' || strcmp(name, "__metadata__") == 0) return 1;
    size_t element_bytes = st_dtype_size(dtype);
    if (element_bytes == 0 || ndim < 0 || ndim > ST_MAX_NDIM || (ndim > 0 && shape == NULL)) return 1;
    uint64_t elements = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0) return 1;
        uint64_t v = (uint64_t)shape[d];
        if (v != 0 && elements > UINT64_MAX / v) return 1;
        elements *= v;
    }
    if (elements > (SIZE_MAX >> 4) / element_bytes) return 1;
    size_t bytes = (size_t)elements * element_bytes;
    if (bytes > 0 && data == NULL) return 1;
    for (int i = 0; i < w->count; i++)
        if (strcmp(w->entries[i].name, name) == 0) return 1;
    if (grow((void **)&w->entries, &w->capacity, w->count + 1, sizeof(writer_entry)) != 0) return 1;
    writer_entry *e = &w->entries[w->count];
    memset(e, 0, sizeof *e);
    e->name = copy_string(name);
    if (e->name == NULL) return 1;
    e->dtype = dtype;
    e->ndim = ndim;
    for (int d = 0; d < ndim; d++) e->shape[d] = shape[d];
    e->data = data;
    e->bytes = bytes;
    w->count++;
    return 0;
}

int st_writer_add_metadata(st_writer *w, const char *key, const char *value)
{
    if (w == NULL || key == NULL || value == NULL) return 1;
    char *v = copy_string(value);
    if (v == NULL) return 1;
    for (int i = 0; i < w->metadata_count; i++)
        if (strcmp(w->metadata[i].key, key) == 0) {
            free(w->metadata[i].value);
            w->metadata[i].value = v;
            return 0;
        }
    char *k = copy_string(key);
    if (k == NULL ||
        grow((void **)&w->metadata, &w->metadata_capacity, w->metadata_count + 1,
             sizeof(metadata_entry)) != 0) {
        free(k);
        free(v);
        return 1;
    }
    w->metadata[w->metadata_count].key = k;
    w->metadata[w->metadata_count].value = v;
    w->metadata_count++;
    return 0;
}

/* A growing string for the header. */
typedef struct text_buffer {
    char *data;
    size_t used, capacity;
    int failed;
} text_buffer;

static void text_append(text_buffer *b, const char *s, size_t n)
{
    if (b->failed) return;
    if (b->used + n + 1 > b->capacity) {
        size_t c = b->capacity ? b->capacity : 256;
        while (c < b->used + n + 1) c *= 2;
        char *p = realloc(b->data, c);
        if (p == NULL) {
            b->failed = 1;
            return;
        }
        b->data = p;
        b->capacity = c;
    }
    memcpy(b->data + b->used, s, n);
    b->used += n;
    b->data[b->used] = '\0';
}

static void text_printf(text_buffer *b, const char *format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

static void text_printf(text_buffer *b, const char *format, ...)
{
    char piece[128];
    va_list args;
    va_start(args, format);
    int n = vsnprintf(piece, sizeof piece, format, args);
    va_end(args);
    if (n < 0 || (size_t)n >= sizeof piece) b->failed = 1;
    else text_append(b, piece, (size_t)n);
}

static void text_json_string(text_buffer *b, const char *s)
{
    text_append(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            char escaped[2] = {'\\', (char)c};
            text_append(b, escaped, 2);
        } else if (c < 0x20) {
            text_printf(b, "\\u%04x", c);
        } else {
            text_append(b, (const char *)&c, 1);
        }
    }
    text_append(b, "\"", 1);
}

static int write_all(FILE *file, const void *data, size_t bytes)
{
    return bytes == 0 || fwrite(data, 1, bytes, file) == bytes;
}

int st_writer_write(st_writer *w, const char *path, char *err, size_t err_bytes)
{
    if (w == NULL || path == NULL) return io_fail(1, err, err_bytes, "writer or path is NULL");
    text_buffer header = {0};
    text_append(&header, "{", 1);
    if (w->metadata_count > 0) {
        text_append(&header, "\"__metadata__\":{", 16);
        for (int i = 0; i < w->metadata_count; i++) {
            if (i) text_append(&header, ",", 1);
            text_json_string(&header, w->metadata[i].key);
            text_append(&header, ":", 1);
            text_json_string(&header, w->metadata[i].value);
        }
        text_append(&header, "}", 1);
    }
    uint64_t offset = 0;
    for (int i = 0; i < w->count; i++) {
        const writer_entry *e = &w->entries[i];
        if (i || w->metadata_count > 0) text_append(&header, ",", 1);
        text_json_string(&header, e->name);
        text_printf(&header, ":{\"dtype\":\"%s\",\"shape\":[", st_dtype_name(e->dtype));
        for (int d = 0; d < e->ndim; d++) text_printf(&header, "%s%lld", d ? "," : "", (long long)e->shape[d]);
        text_printf(&header, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)offset,
                    (unsigned long long)(offset + e->bytes));
        offset += e->bytes;
    }
    text_append(&header, "}", 1);
    while (!header.failed && header.used % 8 != 0) text_append(&header, " ", 1);
    if (header.failed) {
        free(header.data);
        return io_fail(1, err, err_bytes, "out of memory building the header");
    }

    size_t path_bytes = strlen(path);
    char *temporary = malloc(path_bytes + 8);
    if (temporary == NULL) {
        free(header.data);
        return io_fail(1, err, err_bytes, "out of memory");
    }
    memcpy(temporary, path, path_bytes);
    memcpy(temporary + path_bytes, ".XXXXXX", 8);
    int fd = mkstemp(temporary);
    FILE *file = fd >= 0 ? fdopen(fd, "wb") : NULL;
    if (file == NULL) {
        int saved = errno;
        if (fd >= 0) {
            close(fd);
            unlink(temporary);
        }
        free(temporary);
        free(header.data);
        return io_fail(1, err, err_bytes, "%s: cannot create: %s", path, strerror(saved));
    }
    fchmod(fd, 0644); /* mkstemp's 0600 would surprise whoever reads the result */
    unsigned char length[8];
    for (int i = 0; i < 8; i++) length[i] = (unsigned char)((uint64_t)header.used >> (8 * i));
    int ok = write_all(file, length, 8) && write_all(file, header.data, header.used);
    for (int i = 0; ok && i < w->count; i++) ok = write_all(file, w->entries[i].data, w->entries[i].bytes);
    int saved = errno;
    if (fclose(file) != 0 && ok) {
        ok = 0;
        saved = errno;
    }
    if (ok && rename(temporary, path) != 0) {
        ok = 0;
        saved = errno;
    }
    if (!ok) unlink(temporary);
    free(temporary);
    free(header.data);
    if (!ok) return io_fail(1, err, err_bytes, "%s: cannot write: %s", path, strerror(saved));
    return 0;
}

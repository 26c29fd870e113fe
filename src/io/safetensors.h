/* Safetensors files: a strict reader (from a file, mmapped, or from memory) and a writer.
 *
 * Format: an 8-byte little-endian header length N, N bytes of JSON
 *   {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
 *    "__metadata__": {"key": "value", ...}}          (metadata optional)
 * then the data buffer; offsets are relative to its start.
 *
 * The reader trusts nothing: every field's type, the header length against the file, shape
 * products against the byte ranges (without overflow), ranges inside the buffer, overlaps and
 * duplicate names are checked, and errors name the tensor and the problem. The header is capped
 * at ST_MAX_HEADER_BYTES and ST_MAX_HEADER_VALUES, which bounds the memory parsing takes. */
#ifndef FP4MOE_IO_SAFETENSORS_H
#define FP4MOE_IO_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "fp4moe.h"

#define ST_MAX_NDIM 8
/* Larger headers are refused (the official library's limit is also 100 MB). */
#define ST_MAX_HEADER_BYTES ((uint64_t)100 * 1000 * 1000)
/* Headers with more JSON values are refused before parsing, bounding the parser's memory to a
 * few hundred MB (a tensor takes about 7 + ndim values; real checkpoints have < 100k tensors). */
#define ST_MAX_HEADER_VALUES ((uint64_t)2 * 1000 * 1000)

typedef struct st_tensor {
    const char *name;       /* owned by the file */
    const char *dtype_name; /* as in the file: "F32","F16","BF16","I32","U8","F8_E4M3","I64","F64",... */
    int dtype_known;        /* 1 when dtype maps to an fp4moe_dtype */
    fp4moe_dtype dtype;     /* valid when dtype_known */
    int ndim;               /* 0..8 */
    int64_t shape[ST_MAX_NDIM];
    const void *data;       /* points into the mapping; may be unaligned: copy before typed access */
    size_t bytes;
} st_tensor;

typedef struct st_file st_file;

/* Maps and parses a file. 0 on success; otherwise nonzero, *out = NULL and err holds why. */
int st_open(const char *path, st_file **out, char *err, size_t err_bytes);
/* Parses a file image in memory; the tensors' data point into bytes, which must outlive *out. */
int st_parse(const void *bytes, size_t size, st_file **out, char *err, size_t err_bytes);
void st_close(st_file *f); /* NULL is a no-op */

/* Tensors in header order. */
int st_count(const st_file *f);
const st_tensor *st_get(const st_file *f, int index); /* NULL when out of range */
const st_tensor *st_find(const st_file *f, const char *name); /* NULL when absent */
const char *st_metadata(const st_file *f, const char *key);   /* NULL when absent */

/* Checks a tensor's dtype and shape; 0 when they match. On mismatch writes e.g.
 * "tensor 'w1': expected shape [4,64,32] U8, got [4,64,16] U8". */
int st_expect(const st_tensor *t, fp4moe_dtype dtype, int ndim, const int64_t *shape, char *err,
              size_t err_bytes);

/* The safetensors name of a dtype ("F32", "F8_E4M3", ...); NULL for an invalid value. */
const char *st_dtype_name(fp4moe_dtype dtype);
/* Bytes of one element of dtype; 0 for an invalid value. */
size_t st_dtype_size(fp4moe_dtype dtype);

/* The writer: tensors are laid out in the order added, contiguously, after a header padded with
 * spaces to a multiple of 8 bytes (as the official package writes). */
typedef struct st_writer st_writer;
st_writer *st_writer_create(void); /* NULL when out of memory */
/* Copies the name and shape, not the data: data must live until st_writer_write. 0 on success;
 * nonzero for an empty/duplicate/reserved name, ndim outside 0..8, a negative dim, an invalid
 * dtype, NULL data with nonzero size, or when out of memory. */
int st_writer_add(st_writer *w, const char *name, fp4moe_dtype dtype, int ndim,
                  const int64_t *shape, const void *data);
/* Adds a "__metadata__" entry (both strings copied); a repeated key replaces the value. */
int st_writer_add_metadata(st_writer *w, const char *key, const char *value);
/* Writes the file (through a temporary file renamed into place). 0 on success. */
int st_writer_write(st_writer *w, const char *path, char *err, size_t err_bytes);
void st_writer_destroy(st_writer *w); /* NULL is a no-op */

#endif

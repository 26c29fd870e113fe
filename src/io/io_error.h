/* Error messages of the file-format code: a caller-provided buffer, never global state. */
#ifndef FP4MOE_IO_ERROR_H
#define FP4MOE_IO_ERROR_H

#include <stddef.h>

/* Formats a message into err (when err is not NULL and err_bytes > 0) and returns ret, so a
 * check reads `return io_fail(-1, err, err_bytes, "tensor '%s': ...", name);`. */
int io_fail(int ret, char *err, size_t err_bytes, const char *format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

#endif

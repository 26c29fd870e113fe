#include "io_error.h"

#include <stdarg.h>
#include <stdio.h>

int io_fail(int ret, char *err, size_t err_bytes, const char *format, ...)
{
    if (err != NULL && err_bytes > 0) {
        va_list args;
        va_start(args, format);
        vsnprintf(err, err_bytes, format, args);
        va_end(args);
    }
    return ret;
}

/* backend.c — the CPU kernel table. */
#include "cpu.h"

#include <string.h>

static int cpu_host_copy(void *dst, const void *src, size_t nbytes, int device_index) {
  (void)device_index;
  memcpy(dst, src, nbytes);
  return TS_OK;
}

static int cpu_synchronize(int device_index) {
  (void)device_index;
  return TS_OK;
}

const ts_backend ts_cpu_backend = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .free = cpu_free,
    .copy_from_host = cpu_host_copy,
    .copy_to_host = cpu_host_copy,
    .compute_dtype = cpu_compute_dtype,
    .copy = cpu_copy,
    .fill = cpu_fill,
    .arange = cpu_arange,
    .unary = cpu_unary,
    .binary = cpu_binary,
    .where = cpu_where,
    .clamp = cpu_clamp,
    .reduce = NULL,
    .var = NULL,
    .norm = NULL,
    .arg_reduce = NULL,
    .bmm = NULL,
    .index_select = NULL,
    .gather = NULL,
    .scatter = NULL,
    .masked_fill = NULL,
    .nonzero = NULL,
    .index = NULL,
    .index_put = NULL,
    .sort = NULL,
    .topk = NULL,
    .random = NULL,
    .synchronize = cpu_synchronize,
};

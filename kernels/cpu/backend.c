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
    .unary_backward = cpu_unary_backward,
    .reduce = cpu_reduce,
    .var = cpu_var,
    .norm = cpu_norm,
    .arg_reduce = cpu_arg_reduce,
    .bmm = cpu_bmm,
    .index_select = cpu_index_select,
    .gather = cpu_gather,
    .scatter = cpu_scatter,
    .masked_fill = cpu_masked_fill,
    .nonzero = cpu_nonzero,
    .index = cpu_index,
    .index_put = cpu_index_put,
    .sort = cpu_sort,
    .topk = cpu_topk,
    .random = cpu_random,
    /* @nn-linear-norm-softmax-loss (entries below this line) */
    /* @nn-spatial (entries below this line) */
    /* @nn-attention (entries below this line) */
    /* @optim (entries below this line) */
    .synchronize = cpu_synchronize,
};

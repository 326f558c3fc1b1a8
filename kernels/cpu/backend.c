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
    .cached_bytes = cpu_cached_bytes,
    .empty_cache = cpu_empty_cache,
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
    .uniform_compact = cpu_uniform_compact,
    .uniform_compact_backward = cpu_uniform_compact_backward,
    .group_mask = cpu_group_mask,
    /* linear layers, normalization, softmax, dropout, losses */
    .linear = cpu_linear,
    .linear_backward = cpu_linear_backward,
    .layer_norm = cpu_layer_norm,
    .layer_norm_backward = cpu_layer_norm_backward,
    .batch_norm_stats = cpu_batch_norm_stats,
    .batch_norm_apply = cpu_batch_norm_apply,
    .batch_norm_backward = cpu_batch_norm_backward,
    .group_norm = cpu_group_norm,
    .group_norm_backward = cpu_group_norm_backward,
    .softmax = cpu_softmax,
    .softmax_backward = cpu_softmax_backward,
    .masked_scale = cpu_masked_scale,
    .cross_entropy = cpu_cross_entropy,
    .cross_entropy_backward = cpu_cross_entropy_backward,
    .pointwise_loss = cpu_pointwise_loss,
    .pointwise_loss_backward = cpu_pointwise_loss_backward,

    /* convolution, pooling, resampling */
    .conv2d = cpu_conv2d,
    .conv2d_backward = cpu_conv2d_backward,
    .avg_pool2d = cpu_avg_pool2d,
    .avg_pool2d_backward = cpu_avg_pool2d_backward,
    .max_pool2d = cpu_max_pool2d,
    .max_pool2d_backward = cpu_max_pool2d_backward,
    .adaptive_avg_pool2d = cpu_adaptive_avg_pool2d,
    .adaptive_avg_pool2d_backward = cpu_adaptive_avg_pool2d_backward,
    .interpolate = cpu_interpolate,
    .interpolate_backward = cpu_interpolate_backward,
    /* attention and the relative position bias */
    .attention = cpu_attention,
    .attention_backward = cpu_attention_backward,
    .attention_views = cpu_attention, /* one kernel for both layouts: it reads the operands' rank */
    .attention_views_backward = cpu_attention_backward,
    .position_bias = cpu_position_bias,
    .position_bias_backward = cpu_position_bias_backward,
    /* optimizers */
    .adamw = cpu_adamw,
    .sgd = cpu_sgd,
    .multi_norm = cpu_multi_norm,
    .multi_scale = cpu_multi_scale,
    .synchronize = cpu_synchronize,
};

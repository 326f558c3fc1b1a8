/* cpu.h — the CPU kernels behind ts_cpu_backend, and the strided loop they share. */
#ifndef TESSERA_CPU_H
#define TESSERA_CPU_H

#include "../../runtime/backend.h"

/* Below this many elements a kernel runs on the calling thread: waking the pool costs more. */
enum { CPU_PARALLEL_GRAIN = 32768 };
/* Items per ts_parallel_for task when each item is `per_item` elements of work: about
   CPU_PARALLEL_GRAIN elements a task, at least one item. */
static inline int64_t cpu_grain(int64_t per_item) {
  return per_item >= CPU_PARALLEL_GRAIN ? 1 : CPU_PARALLEL_GRAIN / (per_item > 0 ? per_item : 1);
}

/* Calls fn over runs of elements of equally shaped operands (ops[0] is usually the output):
   ptrs[k] points at run element 0 of operand k, strides[k] is its byte stride within the run.
   Dims are coalesced where every operand allows it; the work is split across the thread pool. */
typedef void (*cpu_loop_fn)(int64_t n, char **ptrs, const int64_t *strides, void *ctx);
enum { CPU_MAX_OPERANDS = 4 };
void cpu_foreach(int nops, const ts_tensor *const *ops, cpu_loop_fn fn, void *ctx);

/* The dtype CPU kernels compute in for values stored as `dtype`: float32 for every narrower
   float, float64, and int64 for every integer and bool. */
int cpu_compute_dtype(int dtype);

/* Value conversions for kernels that read or write arbitrary dtypes. */
double cpu_load_f64(int dtype, const char *p);
void cpu_store_f64(int dtype, char *p, double v);
int64_t cpu_load_i64(int dtype, const char *p);
void cpu_store_i64(int dtype, char *p, int64_t v);
/* Float to int64 without undefined behaviour: NaN becomes 0, out-of-range values saturate. */
int64_t cpu_saturate_i64(double v);

/* copy.c */
void *cpu_alloc(size_t nbytes, int device_index);
void cpu_free(void *ptr, size_t nbytes, int device_index);
int64_t cpu_cached_bytes(int device_index);
void cpu_empty_cache(int device_index);
int cpu_copy(ts_tensor *dst, const ts_tensor *src);
int cpu_fill(ts_tensor *dst, double value);
int cpu_arange(ts_tensor *out, double start, double step);

/* elementwise.c */
int cpu_unary(int op, ts_tensor *out, const ts_tensor *a);
int cpu_binary(int op, ts_tensor *out, const ts_tensor *a, const ts_tensor *b);
int cpu_where(ts_tensor *out, const ts_tensor *cond, const ts_tensor *a, const ts_tensor *b);
int cpu_clamp(ts_tensor *out, const ts_tensor *a, double lo, double hi, int has_lo, int has_hi);
int cpu_unary_backward(int op, ts_tensor *gx, const ts_tensor *g, const ts_tensor *x, const ts_tensor *y);

/* reduce.c */
int cpu_reduce(int op, ts_tensor *out, const ts_tensor *a, int nred);
int cpu_var(ts_tensor *out, const ts_tensor *a, int nred, int64_t correction, int take_sqrt);
int cpu_norm(ts_tensor *out, const ts_tensor *a, int nred, double p);
int cpu_arg_reduce(ts_tensor *values, ts_tensor *indices, const ts_tensor *a, int largest);

/* linalg.c */
int cpu_bmm(ts_tensor *out, const ts_tensor *a, const ts_tensor *b);

/* indexing.c */
int cpu_index_select(ts_tensor *out, const ts_tensor *a, int dim, const ts_tensor *index);
int cpu_gather(ts_tensor *out, const ts_tensor *a, int dim, const ts_tensor *index);
int cpu_scatter(ts_tensor *a, int dim, const ts_tensor *index, const ts_tensor *src, int mode);
int cpu_masked_fill(ts_tensor *a, const ts_tensor *mask, double value);
ts_tensor *cpu_nonzero(const ts_tensor *a);
int cpu_index(ts_tensor *out, const ts_tensor *a, int n, ts_tensor *const *indices);
int cpu_index_put(ts_tensor *a, int n, ts_tensor *const *indices, const ts_tensor *values, int accumulate);

/* sort.c */
int cpu_sort(ts_tensor *values, ts_tensor *indices, const ts_tensor *a, int descending, int stable);
int cpu_topk(ts_tensor *values, ts_tensor *indices, const ts_tensor *a, int64_t k, int largest, int sorted);

/* random.c */
int cpu_random(ts_tensor *out, int kind, double a, double b, uint64_t seed, uint64_t offset);

/* masks.c */
int cpu_uniform_compact(ts_tensor *out, const ts_tensor *x, const ts_tensor *kept, int64_t patch_tokens);
int cpu_uniform_compact_backward(ts_tensor *gx, const ts_tensor *g, const ts_tensor *kept, int64_t patch_tokens);
int cpu_group_mask(ts_tensor *out, const ts_tensor *draw, int64_t h, int64_t w, int64_t per_position);

/* linear layers, normalization, softmax, dropout, losses */
/* nn.c */
int cpu_linear(ts_tensor *out, const ts_tensor *x, const ts_tensor *w, const ts_tensor *b);
int cpu_linear_backward(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g, const ts_tensor *x,
                        const ts_tensor *w);
int cpu_softmax(ts_tensor *out, const ts_tensor *x, int log);
int cpu_softmax_backward(ts_tensor *gx, const ts_tensor *g, const ts_tensor *y, int log);
int cpu_masked_scale(ts_tensor *out, const ts_tensor *x, const ts_tensor *mask, double scale);
/* Splits `rows` rows of `cols` elements into a number of chunks that depends on the sizes only, so
   that partial sums combined in chunk order give the same result whatever the thread count. */
int64_t cpu_row_chunks(int64_t rows, int64_t cols);
/* dst[j] (float64 when f64, else float32) = the sum over chunks of partial[chunk * stride + offset + j],
   in chunk order, for j < n. */
void cpu_combine_chunks(void *dst, int f64, const double *partial, int64_t chunks, int64_t stride, int64_t offset,
                        int64_t n);
/* norm.c */
int cpu_layer_norm(ts_tensor *out, ts_tensor *mean, ts_tensor *rstd, const ts_tensor *x, const ts_tensor *w,
                   const ts_tensor *b, double eps);
int cpu_layer_norm_backward(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g, const ts_tensor *x,
                            const ts_tensor *w, const ts_tensor *mean, const ts_tensor *rstd);
int cpu_batch_norm_stats(ts_tensor *mean, ts_tensor *var, const ts_tensor *x);
int cpu_batch_norm_apply(ts_tensor *out, const ts_tensor *x, const ts_tensor *mean, const ts_tensor *rstd,
                         const ts_tensor *w, const ts_tensor *b);
int cpu_batch_norm_backward(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g, const ts_tensor *x,
                            const ts_tensor *w, const ts_tensor *mean, const ts_tensor *rstd, int training);
int cpu_group_norm(ts_tensor *out, ts_tensor *mean, ts_tensor *rstd, const ts_tensor *x, const ts_tensor *w,
                   const ts_tensor *b, double eps);
int cpu_group_norm_backward(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g, const ts_tensor *x,
                            const ts_tensor *w, const ts_tensor *mean, const ts_tensor *rstd);
/* loss.c */
int cpu_cross_entropy(ts_tensor *loss, ts_tensor *lse, ts_tensor *tw, const ts_tensor *logits, const ts_tensor *target,
                      const ts_tensor *weight, int64_t ignore_index, double smoothing);
int cpu_cross_entropy_backward(ts_tensor *glogits, ts_tensor *gtarget, const ts_tensor *g, const ts_tensor *logits,
                               const ts_tensor *lse, const ts_tensor *target, const ts_tensor *weight,
                               int64_t ignore_index, double smoothing);
int cpu_pointwise_loss(int kind, ts_tensor *out, const ts_tensor *a, const ts_tensor *b, double beta);
int cpu_pointwise_loss_backward(int kind, ts_tensor *ga, const ts_tensor *g, const ts_tensor *a, const ts_tensor *b,
                                double beta, double scale);

/* convolution, pooling, resampling, padding, rolling, pixel shuffle */
/* conv.c, pool.c, resample.c */
int cpu_conv2d(ts_tensor *out, const ts_tensor *x, const ts_tensor *w, const ts_tensor *b, const int64_t stride[2],
               const int64_t padding[2], const int64_t dilation[2], int64_t groups);
int cpu_conv2d_backward(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g, const ts_tensor *x,
                        const ts_tensor *w, const int64_t stride[2], const int64_t padding[2],
                        const int64_t dilation[2], int64_t groups);
int cpu_avg_pool2d(ts_tensor *out, const ts_tensor *x, const int64_t kernel[2], const int64_t stride[2],
                   const int64_t padding[2], int count_include_pad);
int cpu_avg_pool2d_backward(ts_tensor *gx, const ts_tensor *g, const int64_t kernel[2], const int64_t stride[2],
                            const int64_t padding[2], int count_include_pad);
int cpu_max_pool2d(ts_tensor *out, ts_tensor *indices, const ts_tensor *x, const int64_t kernel[2],
                   const int64_t stride[2], const int64_t padding[2], const int64_t dilation[2]);
int cpu_max_pool2d_backward(ts_tensor *gx, const ts_tensor *g, const ts_tensor *indices);
int cpu_adaptive_avg_pool2d(ts_tensor *out, const ts_tensor *x);
int cpu_adaptive_avg_pool2d_backward(ts_tensor *gx, const ts_tensor *g);
int cpu_interpolate(ts_tensor *out, const ts_tensor *x, int mode, int align_corners, const double scale[2]);
int cpu_interpolate_backward(ts_tensor *gx, const ts_tensor *g, int mode, int align_corners, const double scale[2]);
/* attention and Swin's relative position bias */
/* attention.c: both take contiguous [BH, rows, cols] blocks (attention) or, given 4-D tensors, strided
   head views [B, H, rows, cols] (attention_views) */
int cpu_attention(ts_tensor *out, ts_tensor *lse, const ts_tensor *q, const ts_tensor *k, const ts_tensor *v,
                  const ts_tensor *bias, double scale);
int cpu_attention_backward(ts_tensor *dq, ts_tensor *dk, ts_tensor *dv, ts_tensor *dbias, const ts_tensor *dout,
                           const ts_tensor *q, const ts_tensor *k, const ts_tensor *v, const ts_tensor *bias,
                           const ts_tensor *out, const ts_tensor *lse, double scale);
/* position_bias.c */
int cpu_position_bias(ts_tensor *out, const ts_tensor *pos, const ts_tensor *w1, const ts_tensor *b1,
                      const ts_tensor *w2, const ts_tensor *b2);
int cpu_position_bias_backward(ts_tensor *gpos, ts_tensor *gw1, ts_tensor *gb1, ts_tensor *gw2, ts_tensor *gb2,
                               const ts_tensor *g, const ts_tensor *pos, const ts_tensor *w1, const ts_tensor *b1,
                               const ts_tensor *w2);
/* optimizers */
/* optim.c */
int cpu_adamw(int n, ts_tensor *const *params, ts_tensor *const *grads, ts_tensor *const *exp_avg,
              ts_tensor *const *exp_avg_sq, const double *lr, const double *weight_decay, double beta1, double beta2,
              double eps, const int64_t *step);
int cpu_sgd(int n, ts_tensor *const *params, ts_tensor *const *grads, ts_tensor *const *momentum_buffers,
            const double *lr, const double *weight_decay, double momentum, double dampening, int nesterov,
            const int *first_step);
int cpu_multi_norm(int n, ts_tensor *const *tensors, double p, double *out);
int cpu_multi_scale(int n, ts_tensor *const *tensors, double factor);

#endif

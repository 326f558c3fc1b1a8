/* cuda.h — the CUDA kernels behind ts_cuda_backend, and the device plumbing they share.
 *
 * Included from plain C (backend.c) and from CUDA C++ (*.cu): every declaration here has C
 * linkage, so the .cu files implement them as extern "C" and may use templates inside. */
#ifndef TESSERA_CUDA_H
#define TESSERA_CUDA_H

/* The C headers backend.h pulls in, first, so that they are not wrapped in extern "C" below. */
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "../../runtime/backend.h"

/* Devices beyond this many are not used (the runtime keeps memory statistics for 16). */
enum { CUDA_MAX_DEVICES = 16 };

/* device.cu — lazy initialization, one stream per device, the caching allocator, transfers. */
int ts_cuda_available_devices(void); /* called by runtime/dispatch.c; 0 without a GPU or driver */
/* Device memory for use on the device's stream. Blocks are cached: memory freed on the stream is
   reused by later allocations without synchronization, so a buffer may be freed as soon as the
   last kernel that uses it is enqueued. cuda_free never calls CUDA (it may run in a finalizer). */
void *cuda_alloc(size_t nbytes, int device_index);
void cuda_free(void *ptr, size_t nbytes, int device_index);
int64_t cuda_cached_bytes(int device_index);
void cuda_empty_cache(int device_index);
int cuda_copy_from_host(void *dst, const void *src, size_t nbytes, int device_index);
int cuda_copy_to_host(void *dst, const void *src, size_t nbytes, int device_index);
int cuda_synchronize(int device_index);

/* copy.cu */
int cuda_copy(ts_tensor *dst, const ts_tensor *src);
int cuda_fill(ts_tensor *dst, double value);
int cuda_arange(ts_tensor *out, double start, double step);

/* elementwise.cu */
/* float16 and bfloat16 compute natively (loaded as float, stored back rounded), the rest as on
   the CPU: float32, float64, int64 for every integer and bool. */
int cuda_compute_dtype(int dtype);
int cuda_unary(int op, ts_tensor *out, const ts_tensor *a);
int cuda_binary(int op, ts_tensor *out, const ts_tensor *a, const ts_tensor *b);
int cuda_where(ts_tensor *out, const ts_tensor *cond, const ts_tensor *a, const ts_tensor *b);
int cuda_clamp(ts_tensor *out, const ts_tensor *a, double lo, double hi, int has_lo, int has_hi);
/* gx = g * f'(x) in the compute dtype (the CPU's formulas, float16/bfloat16 in float). */
int cuda_unary_backward(int op, ts_tensor *gx, const ts_tensor *g, const ts_tensor *x, const ts_tensor *y);

/* reduce.cu — tree reductions in double (floats) or int64, deterministic (no atomics). */
int cuda_reduce(int op, ts_tensor *out, const ts_tensor *a, int nred);
int cuda_var(ts_tensor *out, const ts_tensor *a, int nred, int64_t correction, int take_sqrt);
int cuda_norm(ts_tensor *out, const ts_tensor *a, int nred, double p);
int cuda_arg_reduce(ts_tensor *values, ts_tensor *indices, const ts_tensor *a, int largest);

/* indexing.cu — replacing writes keep the CPU's last-writer order, accumulating ones its sums. */
int cuda_index_select(ts_tensor *out, const ts_tensor *a, int dim, const ts_tensor *index);
int cuda_gather(ts_tensor *out, const ts_tensor *a, int dim, const ts_tensor *index);
int cuda_scatter(ts_tensor *a, int dim, const ts_tensor *index, const ts_tensor *src, int mode);
int cuda_masked_fill(ts_tensor *a, const ts_tensor *mask, double value);
ts_tensor *cuda_nonzero(const ts_tensor *a);
int cuda_index(ts_tensor *out, const ts_tensor *a, int n, ts_tensor *const *indices);
int cuda_index_put(ts_tensor *a, int n, ts_tensor *const *indices, const ts_tensor *values, int accumulate);

/* sort.cu — stable radix sorts (CUB). cuda_sort_pairs_u64 sorts n (key, value) pairs by the low
   `bits` key bits, stably, on the device's stream; `op` names errors. */
int cuda_sort(ts_tensor *values, ts_tensor *indices, const ts_tensor *a, int descending, int stable);
int cuda_topk(ts_tensor *values, ts_tensor *indices, const ts_tensor *a, int64_t k, int largest, int sorted);
int cuda_sort_pairs_u64(const uint64_t *keys_in, uint64_t *keys_out, const uint64_t *values_in, uint64_t *values_out,
                        int64_t n, int bits, int device_index, const char *op);

/* random.cu — the CPU's Philox stream, element for element. */
int cuda_random(ts_tensor *out, int kind, double a, double b, uint64_t seed, uint64_t offset);

/* masks.cu — UM-MAE compaction and the grid-wise and uniform mask kernel. */
int cuda_uniform_compact(ts_tensor *out, const ts_tensor *x, const ts_tensor *kept, int64_t patch_tokens);
int cuda_uniform_compact_backward(ts_tensor *gx, const ts_tensor *g, const ts_tensor *kept, int64_t patch_tokens);
int cuda_group_mask(ts_tensor *out, const ts_tensor *draw, int64_t h, int64_t w, int64_t per_position);

/* linalg.cu — products through cuBLASLt (float32: TF32 only when ts_cuda_set_allow_tf32 allows;
   float16/bfloat16 accumulate in float32) and cuBLAS (float64); plans cached per shape. */
int cuda_bmm(ts_tensor *out, const ts_tensor *a, const ts_tensor *b);

/* nn.cu — linear (bias fused as a cuBLASLt epilogue), softmax, dropout's masked scaling. */
int cuda_linear(ts_tensor *out, const ts_tensor *x, const ts_tensor *w, const ts_tensor *b);
int cuda_linear_backward(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g, const ts_tensor *x,
                         const ts_tensor *w);
int cuda_softmax(ts_tensor *out, const ts_tensor *x, int log);
int cuda_softmax_backward(ts_tensor *gx, const ts_tensor *g, const ts_tensor *y, int log);
int cuda_masked_scale(ts_tensor *out, const ts_tensor *x, const ts_tensor *mask, double scale);

/* norm.cu — layer, batch and group norm; sums across rows deterministic (fixed chunks, in order). */
int cuda_layer_norm(ts_tensor *out, ts_tensor *mean, ts_tensor *rstd, const ts_tensor *x, const ts_tensor *w,
                    const ts_tensor *b, double eps);
int cuda_layer_norm_backward(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g, const ts_tensor *x,
                             const ts_tensor *w, const ts_tensor *mean, const ts_tensor *rstd);
int cuda_batch_norm_stats(ts_tensor *mean, ts_tensor *var, const ts_tensor *x);
int cuda_batch_norm_apply(ts_tensor *out, const ts_tensor *x, const ts_tensor *mean, const ts_tensor *rstd,
                          const ts_tensor *w, const ts_tensor *b);
int cuda_batch_norm_backward(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g, const ts_tensor *x,
                             const ts_tensor *w, const ts_tensor *mean, const ts_tensor *rstd, int training);
int cuda_group_norm(ts_tensor *out, ts_tensor *mean, ts_tensor *rstd, const ts_tensor *x, const ts_tensor *w,
                    const ts_tensor *b, double eps);
int cuda_group_norm_backward(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g, const ts_tensor *x,
                             const ts_tensor *w, const ts_tensor *mean, const ts_tensor *rstd);

/* loss.cu — cross entropy (one warp per position) and the elementwise losses (in double). */
int cuda_cross_entropy(ts_tensor *loss, ts_tensor *lse, ts_tensor *tw, const ts_tensor *logits,
                       const ts_tensor *target, const ts_tensor *weight, int64_t ignore_index, double smoothing);
int cuda_cross_entropy_backward(ts_tensor *glogits, ts_tensor *gtarget, const ts_tensor *g, const ts_tensor *logits,
                                const ts_tensor *lse, const ts_tensor *target, const ts_tensor *weight,
                                int64_t ignore_index, double smoothing);
int cuda_pointwise_loss(int kind, ts_tensor *out, const ts_tensor *a, const ts_tensor *b, double beta);
int cuda_pointwise_loss_backward(int kind, ts_tensor *ga, const ts_tensor *g, const ts_tensor *a, const ts_tensor *b,
                                 double beta, double scale);

/* conv.cu — conv2d through cuDNN (descriptors and algorithms cached per shape). */
int cuda_conv2d(ts_tensor *out, const ts_tensor *x, const ts_tensor *w, const ts_tensor *b, const int64_t stride[2],
                const int64_t padding[2], const int64_t dilation[2], int64_t groups);
int cuda_conv2d_backward(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g, const ts_tensor *x,
                         const ts_tensor *w, const int64_t stride[2], const int64_t padding[2],
                         const int64_t dilation[2], int64_t groups);

/* pool.cu */
int cuda_avg_pool2d(ts_tensor *out, const ts_tensor *x, const int64_t kernel[2], const int64_t stride[2],
                    const int64_t padding[2], int count_include_pad);
int cuda_avg_pool2d_backward(ts_tensor *gx, const ts_tensor *g, const int64_t kernel[2], const int64_t stride[2],
                             const int64_t padding[2], int count_include_pad);
int cuda_max_pool2d(ts_tensor *out, ts_tensor *indices, const ts_tensor *x, const int64_t kernel[2],
                    const int64_t stride[2], const int64_t padding[2], const int64_t dilation[2]);
int cuda_max_pool2d_backward(ts_tensor *gx, const ts_tensor *g, const ts_tensor *indices);
int cuda_adaptive_avg_pool2d(ts_tensor *out, const ts_tensor *x);
int cuda_adaptive_avg_pool2d_backward(ts_tensor *gx, const ts_tensor *g);

/* resample.cu */
int cuda_interpolate(ts_tensor *out, const ts_tensor *x, int mode, int align_corners, const double scale[2]);
int cuda_interpolate_backward(ts_tensor *gx, const ts_tensor *g, int mode, int align_corners, const double scale[2]);

/* attention.cu — fused flash-style attention on CUDA cores, head dims up to 128; the same two entries
   serve attention_views (they read the operands' rank). */
int cuda_attention(ts_tensor *out, ts_tensor *lse, const ts_tensor *q, const ts_tensor *k, const ts_tensor *v,
                   const ts_tensor *bias, double scale);
int cuda_attention_backward(ts_tensor *dq, ts_tensor *dk, ts_tensor *dv, ts_tensor *dbias, const ts_tensor *dout,
                            const ts_tensor *q, const ts_tensor *k, const ts_tensor *v, const ts_tensor *bias,
                            const ts_tensor *out, const ts_tensor *lse, double scale);

/* position_bias.cu — Swin's continuous relative position bias (the fused posmlp), forward and
   backward; weight gradients summed without atomics (fixed blocks combined in order). */
int cuda_position_bias(ts_tensor *out, const ts_tensor *pos, const ts_tensor *w1, const ts_tensor *b1,
                       const ts_tensor *w2, const ts_tensor *b2);
int cuda_position_bias_backward(ts_tensor *gpos, ts_tensor *gw1, ts_tensor *gb1, ts_tensor *gw2, ts_tensor *gb2,
                                const ts_tensor *g, const ts_tensor *pos, const ts_tensor *w1, const ts_tensor *b1,
                                const ts_tensor *w2);

/* optim.cu — multi-tensor AdamW / SGD (bit-identical to the CPU), total norm, scaling. */
int cuda_adamw(int n, ts_tensor *const *params, ts_tensor *const *grads, ts_tensor *const *exp_avg,
               ts_tensor *const *exp_avg_sq, const double *lr, const double *weight_decay, double beta1, double beta2,
               double eps, const int64_t *step);
int cuda_sgd(int n, ts_tensor *const *params, ts_tensor *const *grads, ts_tensor *const *momentum_buffers,
             const double *lr, const double *weight_decay, double momentum, double dampening, int nesterov,
             const int *first_step);
int cuda_multi_norm(int n, ts_tensor *const *tensors, double p, double *out);
int cuda_multi_scale(int n, ts_tensor *const *tensors, double factor);

#ifdef __cplusplus
}
#endif

#endif

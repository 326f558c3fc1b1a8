/* backend.h — the kernel table each device implements (kernels/cpu/, kernels/cuda/).
 *
 * The runtime validates arguments, works out result shapes and dtypes, allocates outputs and
 * converts inputs to a dtype the backend computes in (compute_dtype); a backend entry only does
 * the math. Outputs handed to a backend are freshly allocated contiguous tensors unless the entry
 * says otherwise; inputs may have any strides, including 0 (broadcast). Every entry returns TS_OK
 * or sets an error. A NULL entry means "not implemented on this device" and the runtime says so.
 */
#ifndef TESSERA_BACKEND_H
#define TESSERA_BACKEND_H

#include "internal.h"

#include <stddef.h>

typedef enum ts_random_kind { TS_RAND_UNIFORM = 0, TS_RAND_NORMAL, TS_RAND_BERNOULLI, TS_RAND_RANDINT } ts_random_kind;

typedef struct ts_backend {
  const char *name;

  /* memory: device allocations and host<->device transfers of contiguous bytes */
  void *(*alloc)(size_t nbytes, int device_index);
  void (*free)(void *ptr, size_t nbytes, int device_index);
  int (*copy_from_host)(void *dst, const void *src, size_t nbytes, int device_index);
  int (*copy_to_host)(void *dst, const void *src, size_t nbytes, int device_index);
  /* Bytes the allocator holds for reuse beyond the live ones, and giving them back. */
  int64_t (*cached_bytes)(int device_index);
  void (*empty_cache)(int device_index);

  /* The dtype elementwise/reduction kernels take for values stored as `dtype`. */
  int (*compute_dtype)(int dtype);

  /* dst[i] = convert(src[i]); same shape, any dtypes and strides (dst may be a view). */
  int (*copy)(ts_tensor *dst, const ts_tensor *src);
  int (*fill)(ts_tensor *dst, double value);                       /* dst may be a view */
  int (*arange)(ts_tensor *out, double start, double step);        /* out[i] = start + i*step */

  /* out = op(a); a has compute dtype, out the result dtype (bool for predicates). */
  int (*unary)(int op, ts_tensor *out, const ts_tensor *a);
  /* out = a op b; a, b share the compute dtype and out's shape (broadcast views). */
  int (*binary)(int op, ts_tensor *out, const ts_tensor *a, const ts_tensor *b);
  int (*where)(ts_tensor *out, const ts_tensor *cond, const ts_tensor *a, const ts_tensor *b);
  int (*clamp)(ts_tensor *out, const ts_tensor *a, double lo, double hi, int has_lo, int has_hi);
  /* gx = g * d op(x)/dx given x and y = op(x); all share the compute dtype and shape. */
  int (*unary_backward)(int op, ts_tensor *gx, const ts_tensor *g, const ts_tensor *x, const ts_tensor *y);

  /* Reductions over the last `nred` dims of `a`; out holds the leading dims, contiguous. */
  int (*reduce)(int op, ts_tensor *out, const ts_tensor *a, int nred);
  int (*var)(ts_tensor *out, const ts_tensor *a, int nred, int64_t correction, int take_sqrt);
  int (*norm)(ts_tensor *out, const ts_tensor *a, int nred, double p);
  /* Extreme along the last dim: values (may be NULL) and int64 indices. */
  int (*arg_reduce)(ts_tensor *values, ts_tensor *indices, const ts_tensor *a, int largest);

  /* out[b] = a[b] @ b[b] for 3-D operands (batch stride may be 0); f32 and f64. */
  int (*bmm)(ts_tensor *out, const ts_tensor *a, const ts_tensor *b);

  /* Indexing; index tensors are int64 and already range-checked and wrapped by the runtime. */
  int (*index_select)(ts_tensor *out, const ts_tensor *a, int dim, const ts_tensor *index);
  int (*gather)(ts_tensor *out, const ts_tensor *a, int dim, const ts_tensor *index);
  /* a is written in place (a contiguous tensor owned by the runtime). */
  int (*scatter)(ts_tensor *a, int dim, const ts_tensor *index, const ts_tensor *src, int mode);
  int (*masked_fill)(ts_tensor *a, const ts_tensor *mask, double value);  /* mask broadcast to a */
  ts_tensor *(*nonzero)(const ts_tensor *a);
  /* out = a[idx...] over the leading n dims, indices broadcast to one shape, int64, wrapped. */
  int (*index)(ts_tensor *out, const ts_tensor *a, int n, ts_tensor *const *indices);
  int (*index_put)(ts_tensor *a, int n, ts_tensor *const *indices, const ts_tensor *values, int accumulate);

  /* Sort along the last dim of a (values and int64 indices, both contiguous, same shape). */
  int (*sort)(ts_tensor *values, ts_tensor *indices, const ts_tensor *a, int descending, int stable);
  int (*topk)(ts_tensor *values, ts_tensor *indices, const ts_tensor *a, int64_t k, int largest, int sorted);

  /* Fills out (contiguous) from the Philox stream at (seed, offset); see tessera.h. */
  int (*random)(ts_tensor *out, int kind, double a, double b, uint64_t seed, uint64_t offset);

  /* UM-MAE compaction (runtime/masks.c). x [N,H,W,C] and out [N,H/2,W/2,C] contiguous, any
     dtype (elements are copied, never converted); kept int64 [N,G] contiguous: for each group g
     (row-major on the (H/2p) x (W/2p) group grid) the index of its visible patch on the
     (H/p) x (W/p) patch grid, already checked. out's p x p block of group g = x's tokens of patch
     kept[n,g]. The backward writes all of gx [N,H,W,C]: g's block at kept patches, zeros elsewhere. */
  int (*uniform_compact)(ts_tensor *out, const ts_tensor *x, const ts_tensor *kept, int64_t patch_tokens);
  int (*uniform_compact_backward)(ts_tensor *gx, const ts_tensor *g, const ts_tensor *kept, int64_t patch_tokens);
  /* Grid-wise and uniform masks (runtime/masks.c), written whole: out uint8 [N, h*w] contiguous, h
     and w even; draw int64 [N, D] contiguous on out's device. per_position = 0 (grid-wise; an empty
     grid reads nothing): D = 1, every group of image i keeps position draw[i] in [0, 4). per_position > 0
     (uniform): D = G raw 32-bit lanes, and group g takes its position from image i's pool of
     per_position of each, as TS_MASK_UNIFORM in tessera.h defines. Position v of group (gy, gx) is
     patch (2gy + v/2, 2gx + v%2); kept patches get 0, the others 1. */
  int (*group_mask)(ts_tensor *out, const ts_tensor *draw, int64_t h, int64_t w, int64_t per_position);

  /* linear layers, normalization, softmax, dropout, losses */
  /* Linear layers on 2-D operands, each with a unit stride in one of its dims (BLAS layout):
     out [M,N] = x [M,K] @ w[N,K]^T + b[N] (b may be NULL). The backward writes the gradients that
     are not NULL: gx [M,K] = g @ w, gw [N,K] = g^T @ x, gb [N] = sum of g over rows; g contiguous. */
  int (*linear)(ts_tensor *out, const ts_tensor *x, const ts_tensor *w, const ts_tensor *b);
  int (*linear_backward)(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g, const ts_tensor *x,
                         const ts_tensor *w);
  /* Normalization; all tensors contiguous, w and b may be NULL, gradient outputs that are NULL are
     not wanted. rstd = 1/sqrt(biased variance + eps). Statistics: layer and group norm's in float32
     (float64 for float64 tensors) whatever the compute dtype, so that float16/bfloat16 computed
     natively keep them unrounded; batch norm's in the compute dtype.
     layer norm: rows of x [M,N]; mean, rstd [M]; w, b [N]. */
  int (*layer_norm)(ts_tensor *out, ts_tensor *mean, ts_tensor *rstd, const ts_tensor *x, const ts_tensor *w,
                    const ts_tensor *b, double eps);
  int (*layer_norm_backward)(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g, const ts_tensor *x,
                             const ts_tensor *w, const ts_tensor *mean, const ts_tensor *rstd);
  /* batch norm: x [N,C,S]; per-channel mean and biased var [C]; out = (x - mean) rstd w + b.
     The backward differentiates through the batch statistics when `training`, else treats mean
     and rstd as constants. */
  int (*batch_norm_stats)(ts_tensor *mean, ts_tensor *var, const ts_tensor *x);
  int (*batch_norm_apply)(ts_tensor *out, const ts_tensor *x, const ts_tensor *mean, const ts_tensor *rstd,
                          const ts_tensor *w, const ts_tensor *b);
  int (*batch_norm_backward)(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g, const ts_tensor *x,
                             const ts_tensor *w, const ts_tensor *mean, const ts_tensor *rstd, int training);
  /* group norm: x [N,C,S]; mean, rstd [N,G] (G groups of C/G channels); w, b [C]. */
  int (*group_norm)(ts_tensor *out, ts_tensor *mean, ts_tensor *rstd, const ts_tensor *x, const ts_tensor *w,
                    const ts_tensor *b, double eps);
  int (*group_norm_backward)(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g, const ts_tensor *x,
                             const ts_tensor *w, const ts_tensor *mean, const ts_tensor *rstd);
  /* softmax (log_softmax when `log`) over dim 1 of contiguous [A,D,B] tensors; the backward takes
     the forward's output y. */
  int (*softmax)(ts_tensor *out, const ts_tensor *x, int log);
  int (*softmax_backward)(ts_tensor *gx, const ts_tensor *g, const ts_tensor *y, int log);
  /* out = x * mask * scale: dropout's forward and backward. mask is bool, broadcast to x's shape. */
  int (*masked_scale)(ts_tensor *out, const ts_tensor *x, const ts_tensor *mask, double scale);
  /* Cross entropy with a fused log-softmax over dim 1 of logits [N,C,S] (contiguous). target: int64
     [N,S] class indices (range-checked; ignore_index allowed) or probabilities [N,C,S]; weight [C]
     or NULL. Writes loss and lse (log-sum-exp of the logits) [N,S], and tw [N,S] when not NULL:
     the weight a class-index target carries (0 where ignored). The backward scales position (n,s)
     by g[n,s] (a [N,S] view, any strides) and writes glogits and, for probabilities, gtarget. */
  int (*cross_entropy)(ts_tensor *loss, ts_tensor *lse, ts_tensor *tw, const ts_tensor *logits,
                       const ts_tensor *target, const ts_tensor *weight, int64_t ignore_index, double smoothing);
  int (*cross_entropy_backward)(ts_tensor *glogits, ts_tensor *gtarget, const ts_tensor *g, const ts_tensor *logits,
                                const ts_tensor *lse, const ts_tensor *target, const ts_tensor *weight,
                                int64_t ignore_index, double smoothing);
  /* Elementwise losses (kind: ts_pointwise_loss in runtime/nn.h) of a and b, same shape. out has
     their shape (reduction none: any strides for a and b) or is 0-d and receives the sum (a and b
     contiguous). The backward: ga = scale * g * d loss / d a, g broadcast to a's shape. */
  int (*pointwise_loss)(int kind, ts_tensor *out, const ts_tensor *a, const ts_tensor *b, double beta);
  int (*pointwise_loss_backward)(int kind, ts_tensor *ga, const ts_tensor *g, const ts_tensor *a, const ts_tensor *b,
                                 double beta, double scale);

  /* convolution, pooling, resampling */
  /* Spatial ops on images [N, C, H, W] (pools and interpolate: [planes, H, W] with any leading
     dims). Inputs are contiguous in the compute dtype (float32 or float64); outputs and gradients
     are fresh contiguous tensors of that dtype, filled entirely by the entry; their shapes give
     the output sizes. Pairs are (h, w). */
  int (*conv2d)(ts_tensor *out, const ts_tensor *x, const ts_tensor *w, const ts_tensor *b, const int64_t stride[2],
                const int64_t padding[2], const int64_t dilation[2], int64_t groups);  /* b may be NULL */
  /* Writes those of gx, gw, gb that are not NULL, from g shaped like conv2d's output. The values
     of x are read only for gw and those of w only for gx; otherwise they may be broadcast
     stand-ins that only carry the shape. */
  int (*conv2d_backward)(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g, const ts_tensor *x,
                         const ts_tensor *w, const int64_t stride[2], const int64_t padding[2],
                         const int64_t dilation[2], int64_t groups);
  int (*avg_pool2d)(ts_tensor *out, const ts_tensor *x, const int64_t kernel[2], const int64_t stride[2],
                    const int64_t padding[2], int count_include_pad);
  int (*avg_pool2d_backward)(ts_tensor *gx, const ts_tensor *g, const int64_t kernel[2], const int64_t stride[2],
                             const int64_t padding[2], int count_include_pad);
  /* indices (int64, out's shape): the flat h * W + w of each maximum within its plane, -1 where a
     dilated window covers no input pixel (its output is -inf). */
  int (*max_pool2d)(ts_tensor *out, ts_tensor *indices, const ts_tensor *x, const int64_t kernel[2],
                    const int64_t stride[2], const int64_t padding[2], const int64_t dilation[2]);
  int (*max_pool2d_backward)(ts_tensor *gx, const ts_tensor *g, const ts_tensor *indices);
  int (*adaptive_avg_pool2d)(ts_tensor *out, const ts_tensor *x);
  int (*adaptive_avg_pool2d_backward)(ts_tensor *gx, const ts_tensor *g);
  /* scale: the caller's scale factors, <= 0 where none (see ts_interpolate). */
  int (*interpolate)(ts_tensor *out, const ts_tensor *x, int mode, int align_corners, const double scale[2]);
  int (*interpolate_backward)(ts_tensor *gx, const ts_tensor *g, int mode, int align_corners, const double scale[2]);
  /* attention and the relative position bias */
  /* Scaled dot-product attention over (batch·head) blocks in the compute dtype: q [BH,Nq,D], k [BH,Nk,D],
     v [BH,Nk,Dv] and out [BH,Nq,Dv] are contiguous; lse [BH,Nq] (float32, float64 for float64 blocks)
     receives each row's log-sum-exp of the scores (-inf for a row masked entirely, whose output is zeros). bias: NULL or a view [E..., Nq, Nk]
     (any strides, 0 where broadcast) whose leading dims E enumerate the BH blocks row-major. */
  int (*attention)(ts_tensor *out, ts_tensor *lse, const ts_tensor *q, const ts_tensor *k, const ts_tensor *v,
                   const ts_tensor *bias, double scale);
  /* Its gradients given dout [BH,Nq,Dv] and the forward's out and lse; dq, dk, dv (shaped as q, k, v)
     and dbias may each be NULL when not wanted. dbias is contiguous [E'..., Nq, Nk], E'[d] either
     E[d] or 1: it receives dS summed over the blocks that share each bias block. */
  int (*attention_backward)(ts_tensor *dq, ts_tensor *dk, ts_tensor *dv, ts_tensor *dbias, const ts_tensor *dout,
                            const ts_tensor *q, const ts_tensor *k, const ts_tensor *v, const ts_tensor *bias,
                            const ts_tensor *out, const ts_tensor *lse, double scale);
  /* The same on strided head views (ts_attention_packed): q [B, H, Nq, D], k [B, H, Nk, D],
     v [B, H, Nk, Dv] and out [B, H, Nq, Dv] in the compute dtype, each with contiguous rows (unit
     last stride) and any other strides, so that they can be column ranges of packed projections
     [B, N, 3·H·D]; lse [B·H, Nq] contiguous; the bias as above with E enumerating the B·H heads
     row-major. The backward's dq, dk, dv (NULL when not wanted) and dout are views laid out like q,
     k, v and out; dq, dk and dv may be disjoint column ranges of one tensor. */
  int (*attention_views)(ts_tensor *out, ts_tensor *lse, const ts_tensor *q, const ts_tensor *k, const ts_tensor *v,
                         const ts_tensor *bias, double scale);
  int (*attention_views_backward)(ts_tensor *dq, ts_tensor *dk, ts_tensor *dv, ts_tensor *dbias,
                                  const ts_tensor *dout, const ts_tensor *q, const ts_tensor *k, const ts_tensor *v,
                                  const ts_tensor *bias, const ts_tensor *out, const ts_tensor *lse, double scale);
  /* Continuous relative position bias (ts_relative_position_bias) in the compute dtype, every tensor
     contiguous: pos [W, C, N], w1 [P, C], b1 [P], w2 [H, P], b2 [H] (b1, b2 may be NULL), out
     [W, H, N, N], W·N > 0. The backward recomputes the hidden layer from pos and writes those of
     gpos [W, C, N], gw1, gb1, gw2 and gb2 (shaped as their inputs) that are not NULL from g [W, H, N, N]. */
  int (*position_bias)(ts_tensor *out, const ts_tensor *pos, const ts_tensor *w1, const ts_tensor *b1,
                       const ts_tensor *w2, const ts_tensor *b2);
  int (*position_bias_backward)(ts_tensor *gpos, ts_tensor *gw1, ts_tensor *gb1, ts_tensor *gw2, ts_tensor *gb2,
                                const ts_tensor *g, const ts_tensor *pos, const ts_tensor *w1, const ts_tensor *b1,
                                const ts_tensor *w2);
  /* optimizers */
  /* Multi-tensor updates and reductions over n tensors (see ts_adamw_step and friends in
     tessera.h). The runtime has validated everything, dropped skipped tensors and hands over
     contiguous tensors only; parameters and optimizer state are written in place. */
  int (*adamw)(int n, ts_tensor *const *params, ts_tensor *const *grads, ts_tensor *const *exp_avg,
               ts_tensor *const *exp_avg_sq, const double *lr, const double *weight_decay, double beta1,
               double beta2, double eps, const int64_t *step);
  int (*sgd)(int n, ts_tensor *const *params, ts_tensor *const *grads, ts_tensor *const *momentum_buffers,
             const double *lr, const double *weight_decay, double momentum, double dampening, int nesterov,
             const int *first_step);
  /* The p-norm (p > 0 finite, or INFINITY) of all elements of all tensors together, in double. */
  int (*multi_norm)(int n, ts_tensor *const *tensors, double p, double *out);
  int (*multi_scale)(int n, ts_tensor *const *tensors, double factor);  /* x *= factor */

  int (*synchronize)(int device_index);
} ts_backend;

extern const ts_backend ts_cpu_backend;
#ifdef TESSERA_HAVE_CUDA
extern const ts_backend ts_cuda_backend;
#endif

/* The backend for a device, or NULL with an error set (no CUDA build, no GPU, bad index). */
const ts_backend *ts_backend_for(ts_device dev);

/* Sets "<op>: not implemented on <device>" and returns TS_ERR_UNSUPPORTED. */
int ts_not_implemented(const char *op, ts_device dev);
/* Looks up a backend entry, failing with "<op>: not implemented on <device>" when it is NULL. */
#define TS_BACKEND_FN(be, field, opname, dev) ((be)->field ? 0 : ts_not_implemented((opname), (dev)))
/* The backend for dev when it implements `field`, else NULL with the error set. */
const ts_backend *ts_backend_with(ts_device dev, size_t entry_offset, const char *op);
#define TS_BACKEND(dev, field, op) ts_backend_with((dev), offsetof(ts_backend, field), (op))

#endif

/* tessera.h — the one public C ABI of libtessera.
 *
 * Plain C declarations only: the Lua binding's ffi.cdef text is generated from this file at build
 * time (preprocessed with TESSERA_FFI defined), so everything here must be understood by LuaJIT's
 * C parser: no macros for constants (use enums), no inline functions.
 *
 * Conventions
 *   - Handles are opaque. A function returning ts_tensor* returns a new reference (release it with
 *     ts_release) or NULL on error. A function returning int returns TS_OK (0) or a ts_status.
 *   - On error, ts_last_error() holds a message naming the op and the offending shapes/dtypes;
 *     it is thread-local and stays until the next error or ts_clear_error().
 *   - Dims are 0-based; negative dims count from the end (-1 is the last), as in PyTorch.
 *   - Ops accept any strides (views, broadcast, transposed) and return contiguous results.
 */
#ifndef TESSERA_H
#define TESSERA_H

#ifndef TESSERA_FFI
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif
#endif

/* Bumped whenever a declaration below changes meaning or layout. */
enum { TESSERA_ABI_VERSION = 2, TS_MAX_DIMS = 8 };
int tessera_abi_version(void);
const char *ts_version_string(void);

/* ---- errors ---------------------------------------------------------------------------------- */
typedef enum ts_status {
  TS_OK = 0,
  TS_ERR_ARG,         /* bad argument value */
  TS_ERR_SHAPE,       /* incompatible or invalid shapes */
  TS_ERR_DTYPE,       /* unsupported or mismatched dtype */
  TS_ERR_INDEX,       /* index out of range */
  TS_ERR_MEMORY,      /* allocation failed or size absurd */
  TS_ERR_DEVICE,      /* device unavailable or mixed devices */
  TS_ERR_IO,          /* file or format error */
  TS_ERR_UNSUPPORTED  /* combination not implemented for this device/dtype */
} ts_status;

const char *ts_last_error(void);
int ts_last_status(void);
void ts_clear_error(void);

/* ---- dtypes and devices ---------------------------------------------------------------------- */
typedef enum ts_dtype {
  TS_F32 = 0, TS_F64, TS_F16, TS_BF16, TS_I64, TS_I32, TS_U8, TS_BOOL, TS_NUM_DTYPES
} ts_dtype;

const char *ts_dtype_name(int dtype);     /* "float32", ... ; "invalid" for bad values */
int ts_dtype_size(int dtype);             /* bytes per element; 0 for bad values */
int ts_dtype_is_floating(int dtype);
int ts_promote_types(int a, int b);       /* PyTorch's promotion lattice, see README */

typedef enum ts_device_type { TS_CPU = 0, TS_CUDA = 1 } ts_device_type;
typedef struct ts_device { int32_t type; int32_t index; } ts_device;

/* ---- tensor handles -------------------------------------------------------------------------- */
typedef struct ts_tensor ts_tensor;

void ts_retain(ts_tensor *t);
void ts_release(ts_tensor *t);            /* NULL is ignored; never fails */

int ts_ndim(const ts_tensor *t);
const int64_t *ts_shape(const ts_tensor *t);
const int64_t *ts_strides(const ts_tensor *t);   /* in elements */
int64_t ts_offset(const ts_tensor *t);           /* in elements, into the storage */
int64_t ts_numel(const ts_tensor *t);
int ts_dtype_of(const ts_tensor *t);
ts_device ts_device_of(const ts_tensor *t);
int ts_is_contiguous(const ts_tensor *t);
int ts_shares_storage(const ts_tensor *a, const ts_tensor *b);
void *ts_data_ptr(const ts_tensor *t);    /* address of element 0 (a CPU or device address) */
int64_t ts_storage_refcount(const ts_tensor *t);

/* ---- factories ------------------------------------------------------------------------------- */
ts_tensor *ts_empty(int ndim, const int64_t *shape, int dtype, ts_device dev);
ts_tensor *ts_full(int ndim, const int64_t *shape, double value, int dtype, ts_device dev);
ts_tensor *ts_arange(double start, double end, double step, int dtype, ts_device dev);
ts_tensor *ts_linspace(double start, double end, int64_t steps, int dtype, ts_device dev);
ts_tensor *ts_eye(int64_t n, int64_t m, int dtype, ts_device dev);
/* Copies numel elements of `dtype` from host memory into a new contiguous tensor on dev. */
ts_tensor *ts_from_host(int ndim, const int64_t *shape, int dtype, const void *data, ts_device dev);
/* Copies the tensor's elements, in logical (row-major) order, to host memory of numel*size bytes. */
int ts_to_host(const ts_tensor *t, void *dst, size_t nbytes);
int ts_item(const ts_tensor *t, double *out);   /* the single element of a one-element tensor */

/* ---- views (share storage, no copy) ---------------------------------------------------------- */
ts_tensor *ts_view(ts_tensor *t, int ndim, const int64_t *shape);     /* one -1 allowed */
ts_tensor *ts_reshape(ts_tensor *t, int ndim, const int64_t *shape);  /* view if possible, else copy */
ts_tensor *ts_permute(ts_tensor *t, int ndim, const int *dims);
ts_tensor *ts_transpose(ts_tensor *t, int dim0, int dim1);
ts_tensor *ts_slice(ts_tensor *t, int dim, int64_t start, int64_t stop, int64_t step); /* [start, stop) clamped */
ts_tensor *ts_narrow(ts_tensor *t, int dim, int64_t start, int64_t length);
ts_tensor *ts_select(ts_tensor *t, int dim, int64_t index);
ts_tensor *ts_expand(ts_tensor *t, int ndim, const int64_t *shape);   /* -1 keeps a size */
ts_tensor *ts_squeeze(ts_tensor *t, int dim);
ts_tensor *ts_squeeze_all(ts_tensor *t);
ts_tensor *ts_unsqueeze(ts_tensor *t, int dim);
ts_tensor *ts_flatten(ts_tensor *t, int start_dim, int end_dim);
ts_tensor *ts_as_strided(ts_tensor *t, int ndim, const int64_t *shape, const int64_t *strides, int64_t offset);

/* ---- copies and conversions ------------------------------------------------------------------ */
ts_tensor *ts_contiguous(ts_tensor *t);   /* a new reference to t itself when already contiguous */
ts_tensor *ts_clone(const ts_tensor *t);
ts_tensor *ts_to_dtype(ts_tensor *t, int dtype);     /* t itself (new ref) when already that dtype */
ts_tensor *ts_to_device(ts_tensor *t, ts_device dev);
int ts_copy_(ts_tensor *dst, const ts_tensor *src);  /* src broadcast to dst; dtype/device converted */
int ts_fill_(ts_tensor *t, double value);

/* ---- elementwise ----------------------------------------------------------------------------- */
typedef enum ts_unary_op {
  TS_NEG = 0, TS_ABS, TS_SIGN, TS_EXP, TS_EXPM1, TS_LOG, TS_LOG1P, TS_SQRT, TS_RSQRT, TS_TANH,
  TS_SIGMOID, TS_ERF, TS_RELU, TS_GELU, TS_SILU, TS_SIN, TS_COS, TS_FLOOR, TS_CEIL, TS_ROUND,
  TS_TRUNC, TS_RECIPROCAL, TS_SQUARE, TS_LOGICAL_NOT, TS_ISNAN, TS_ISINF, TS_ISFINITE,
  TS_NUM_UNARY_OPS
} ts_unary_op;

typedef enum ts_binary_op {
  TS_ADD = 0, TS_SUB, TS_MUL, TS_DIV, TS_POW, TS_MAXIMUM, TS_MINIMUM, TS_REMAINDER, TS_FLOOR_DIVIDE,
  TS_ATAN2, TS_EQ, TS_NE, TS_LT, TS_LE, TS_GT, TS_GE, TS_LOGICAL_AND, TS_LOGICAL_OR, TS_LOGICAL_XOR,
  TS_NUM_BINARY_OPS
} ts_binary_op;

const char *ts_unary_op_name(int op);
const char *ts_binary_op_name(int op);

ts_tensor *ts_unary(int op, ts_tensor *a);
int ts_unary_(int op, ts_tensor *a);
ts_tensor *ts_binary(int op, ts_tensor *a, ts_tensor *b);
int ts_binary_(int op, ts_tensor *a, ts_tensor *b);       /* a = a op b; b broadcasts to a */
/* A Lua/C number is a weakly typed scalar (it does not raise a tensor's float dtype);
   reverse != 0 computes `s op a`. */
ts_tensor *ts_binary_scalar(int op, ts_tensor *a, double s, int reverse);
int ts_binary_scalar_(int op, ts_tensor *a, double s);
ts_tensor *ts_where(ts_tensor *cond, ts_tensor *a, ts_tensor *b);
/* Bounds are optional: pass has_min/has_max = 0 to leave that side open. */
ts_tensor *ts_clamp(ts_tensor *a, double min, double max, int has_min, int has_max);
int ts_clamp_(ts_tensor *a, double min, double max, int has_min, int has_max);

/* ---- reductions ------------------------------------------------------------------------------ */
typedef enum ts_reduce_op {
  TS_SUM = 0, TS_MEAN, TS_PROD, TS_AMAX, TS_AMIN, TS_ALL, TS_ANY, TS_NUM_REDUCE_OPS
} ts_reduce_op;

/* ndims = 0 reduces over every dim. */
ts_tensor *ts_reduce(int op, ts_tensor *a, int ndims, const int *dims, int keepdim);
/* var/std with Bessel-style correction (1 = unbiased, 0 = population). */
ts_tensor *ts_var(ts_tensor *a, int ndims, const int *dims, int64_t correction, int keepdim, int take_sqrt);
/* p-norm; p = INFINITY for max-abs, p = 0 counts nonzeros. */
ts_tensor *ts_norm(ts_tensor *a, double p, int ndims, const int *dims, int keepdim);
/* max/min along one dim with int64 indices of the first extreme (largest = 1 for max). */
int ts_max_dim(ts_tensor *a, int dim, int keepdim, int largest, ts_tensor **values, ts_tensor **indices);
/* argmax/argmin; dim_given = 0 uses the flattened tensor. */
ts_tensor *ts_argmax(ts_tensor *a, int dim, int dim_given, int keepdim, int largest);

/* ---- linear algebra -------------------------------------------------------------------------- */
ts_tensor *ts_matmul(ts_tensor *a, ts_tensor *b);     /* numpy matmul semantics, broadcast batch */
ts_tensor *ts_bmm(ts_tensor *a, ts_tensor *b);        /* strictly [B,n,k] x [B,k,m] */

/* ---- joining, indexing, sorting -------------------------------------------------------------- */
ts_tensor *ts_cat(int n, ts_tensor *const *tensors, int dim);
ts_tensor *ts_stack(int n, ts_tensor *const *tensors, int dim);
ts_tensor *ts_index_select(ts_tensor *a, int dim, ts_tensor *index);
ts_tensor *ts_gather(ts_tensor *a, int dim, ts_tensor *index);
typedef enum ts_scatter_mode { TS_SCATTER_REPLACE = 0, TS_SCATTER_ADD } ts_scatter_mode;
ts_tensor *ts_scatter(ts_tensor *a, int dim, ts_tensor *index, ts_tensor *src, int mode);
int ts_scatter_(ts_tensor *a, int dim, ts_tensor *index, ts_tensor *src, int mode);
ts_tensor *ts_masked_fill(ts_tensor *a, ts_tensor *mask, double value);
int ts_masked_fill_(ts_tensor *a, ts_tensor *mask, double value);
ts_tensor *ts_masked_select(ts_tensor *a, ts_tensor *mask);
ts_tensor *ts_nonzero(ts_tensor *a);                   /* [nnz, ndim] int64 */
/* a[indices[0], ..., indices[n-1]] = values (or += with accumulate); indices are int64/bool. */
int ts_index_put_(ts_tensor *a, int n, ts_tensor *const *indices, ts_tensor *values, int accumulate);
/* a[indices[0], ..., indices[n-1]]: advanced indexing on the leading n dims. */
ts_tensor *ts_index(ts_tensor *a, int n, ts_tensor *const *indices);
int ts_sort(ts_tensor *a, int dim, int descending, int stable, ts_tensor **values, ts_tensor **indices);
int ts_topk(ts_tensor *a, int64_t k, int dim, int largest, int sorted, ts_tensor **values, ts_tensor **indices);

/* ---- random numbers: counter-based Philox4x32-10 --------------------------------------------- */
/* Element i of a draw uses the Philox block (seed, offset + i/4), lane i%4; a draw of n elements
   advances the generator's offset by ceil(n/4). A GPU kernel computes the same stream. A call
   that fails leaves its generator where it was (unless another thread drew from it or set it
   meanwhile, or the call made over 64 draws), so a call retried after running out of memory draws
   the same numbers. */
typedef struct ts_generator ts_generator;
ts_generator *ts_generator_new(uint64_t seed);
void ts_generator_free(ts_generator *g);
ts_generator *ts_default_generator(void);
void ts_generator_set_state(ts_generator *g, uint64_t seed, uint64_t offset);
void ts_generator_get_state(const ts_generator *g, uint64_t *seed, uint64_t *offset);
void ts_philox4x32(uint64_t seed, uint64_t counter_lo, uint64_t counter_hi, uint32_t *out4);
/* g = NULL uses the default generator. */
int ts_uniform_(ts_tensor *t, double low, double high, ts_generator *g);
int ts_normal_(ts_tensor *t, double mean, double std, ts_generator *g);
int ts_bernoulli_(ts_tensor *t, double p, ts_generator *g);
int ts_randint_(ts_tensor *t, int64_t low, int64_t high, ts_generator *g);
ts_tensor *ts_randperm(int64_t n, int dtype, ts_generator *g, ts_device dev);

/* ---- threads and memory ---------------------------------------------------------------------- */
/* Sets the CPU kernel threads and OpenBLAS's threads together (n <= 0: every core). */
void ts_set_num_threads(int n);
int ts_get_num_threads(void);

typedef struct ts_memory_stats {
  int64_t live_bytes;      /* bytes held by live tensors */
  int64_t peak_bytes;      /* maximum of live_bytes since start or the last reset */
  int64_t reserved_bytes;  /* bytes held from the system (>= live with a caching allocator) */
  int64_t num_allocs;      /* allocations so far */
} ts_memory_stats;
int ts_memory_stats_get(ts_device dev, ts_memory_stats *out);
void ts_memory_reset_peak(ts_device dev);
/* Caps the bytes live tensors may hold on a device (0: no cap; the default): an allocation past it
   fails with TS_ERR_MEMORY as if the device were full. */
int ts_memory_set_limit(ts_device dev, int64_t bytes);
/* Returns the allocator's cached blocks to the system (reserved_bytes drops to live_bytes). */
int ts_memory_empty_cache(ts_device dev);
/* Bytes allocated on every device since start, and bytes live now: the Lua binding steps its GC
   by the growth of the first, because LuaJIT sees a tensor of any size as a few bytes. */
int64_t ts_bytes_allocated_total(void);
int64_t ts_bytes_live_total(void);

/* ---- autograd -------------------------------------------------------------------------------- */
/* Ops record a tape when an input requires grad and grad mode (thread-local, on by default) is on. */
int ts_set_grad_enabled(int enabled);     /* returns the previous mode */
int ts_is_grad_enabled(void);
int ts_requires_grad(const ts_tensor *t);
int ts_set_requires_grad(ts_tensor *t, int requires);  /* leaves only; floating dtypes only */
int ts_is_leaf(const ts_tensor *t);
const char *ts_grad_fn_name(const ts_tensor *t);       /* "" for leaves */
ts_tensor *ts_grad(const ts_tensor *t);   /* new reference, or NULL (and no error) when there is none */
int ts_set_grad(ts_tensor *t, ts_tensor *g);           /* NULL clears */
ts_tensor *ts_detach(ts_tensor *t);       /* shares storage, no autograd history */
/* Accumulates d(root)/d(leaf) into every leaf's grad. grad = NULL means ones (one-element roots
   only). Saved tensors are freed as they are used unless retain_graph. */
int ts_backward(ts_tensor *root, ts_tensor *grad, int retain_graph);

/* ---- neural-network ops: forward in C, backward recorded on the tape ----------------------------- */
/* Layout conventions as PyTorch: images are [N, C, H, W]; linear weights [out, in]. */
/* linear layers, normalization, softmax, dropout, losses */
/* How a loss combines its per-element values: as PyTorch's reduction='none' | 'mean' | 'sum'. */
typedef enum ts_reduction { TS_REDUCTION_NONE = 0, TS_REDUCTION_MEAN, TS_REDUCTION_SUM } ts_reduction;
/* y = x @ w^T + b: x [..., in], w [out, in], b [out] or NULL; one dtype (float). */
ts_tensor *ts_linear(ts_tensor *x, ts_tensor *w, ts_tensor *b);
/* Normalizes over the last nnorm dims of x; w and b have those dims' shape, or are NULL. */
ts_tensor *ts_layer_norm(ts_tensor *x, int nnorm, ts_tensor *w, ts_tensor *b, double eps);
/* x [N, C, ...]; w, b, running_mean, running_var [C] or NULL. Training normalizes with the batch
   statistics and, when running stats are given, updates them in place:
   running = (1 - momentum) running + momentum batch (the variance unbiased). Evaluation (training
   = 0) normalizes with the running statistics, which it then requires. */
ts_tensor *ts_batch_norm(ts_tensor *x, ts_tensor *running_mean, ts_tensor *running_var, ts_tensor *w, ts_tensor *b,
                         int training, double momentum, double eps);
/* x [N, C, ...] normalized per sample over each of `groups` channel groups; w, b [C] or NULL. */
ts_tensor *ts_group_norm(ts_tensor *x, int64_t groups, ts_tensor *w, ts_tensor *b, double eps);
ts_tensor *ts_softmax(ts_tensor *x, int dim);
ts_tensor *ts_log_softmax(ts_tensor *x, int dim);
/* Inverted dropout: zeroes elements with probability p and scales the rest by 1/(1-p), drawing the
   keep mask as ts_bernoulli_(mask, 1 - p, g) does. p = 0 or training = 0 return x itself (a new
   reference). g = NULL uses the default generator. */
ts_tensor *ts_dropout(ts_tensor *x, double p, int training, ts_generator *g);
/* Stochastic depth (timm's drop_path): whole samples (dim 0) are dropped with probability p; the
   kept ones are scaled by 1/(1-p) when scale_by_keep. p = 0 or training = 0 return x itself. */
ts_tensor *ts_drop_path(ts_tensor *x, double p, int training, int scale_by_keep, ts_generator *g);
/* logits [N, C, d1, ...] or [N, C] or [C]. target: int64 class indices [N, d1, ...] (entries equal
   to ignore_index contribute nothing; 'mean' divides by the total weight of the others), or
   floating class probabilities of the logits' shape. weight [C] or NULL. label_smoothing in [0, 1]
   mixes the target with the uniform distribution, as PyTorch. */
ts_tensor *ts_cross_entropy(ts_tensor *logits, ts_tensor *target, ts_tensor *weight, int64_t ignore_index,
                            double label_smoothing, int reduction);
/* Elementwise losses of a against b (broadcast): (a-b)^2, |a-b|, and Huber-like smooth L1 with
   threshold beta (0.5 d^2 / beta where |d| < beta, else |d| - 0.5 beta). */
ts_tensor *ts_mse_loss(ts_tensor *a, ts_tensor *b, int reduction);
ts_tensor *ts_l1_loss(ts_tensor *a, ts_tensor *b, int reduction);
ts_tensor *ts_smooth_l1_loss(ts_tensor *a, ts_tensor *b, double beta, int reduction);

/* convolution, pooling, resampling, padding, rolling, pixel shuffle */
/* conv2d as torch.nn.functional.conv2d: x [N, C, H, W] (or unbatched [C, H, W]), w [O, C/groups,
   kh, kw], b [O] or NULL; out [N, O, OH, OW], OH = (H + 2 pad_h - dil_h (kh - 1) - 1) / stride_h + 1. */
ts_tensor *ts_conv2d(ts_tensor *x, ts_tensor *w, ts_tensor *b, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                     int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups);
/* Pooling over [N, C, H, W] or [C, H, W] as torch: zero padding of at most half the (dilated)
   kernel; ceil_mode rounds the output size up but drops a last window starting in the padding. */
ts_tensor *ts_avg_pool2d(ts_tensor *x, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                         int ceil_mode, int count_include_pad);
ts_tensor *ts_max_pool2d(ts_tensor *x, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                         int64_t dh, int64_t dw, int ceil_mode);
/* Output cell (i, j) averages rows [floor(i H / out_h), ceil((i + 1) H / out_h)), columns likewise. */
ts_tensor *ts_adaptive_avg_pool2d(ts_tensor *x, int64_t out_h, int64_t out_w);
/* Resizes [N, C, H, W] to [N, C, out_h, out_w] with F.interpolate's source coordinates. scale_h and
   scale_w > 0 are the caller's scale factors, which torch uses (as 1/scale) in place of in/out
   to map output to input coordinates; pass 0 to map with in/out (F.interpolate given a size).
   align_corners applies to bilinear only (0 for nearest). */
typedef enum ts_interp_mode { TS_INTERP_NEAREST = 0, TS_INTERP_BILINEAR } ts_interp_mode;
ts_tensor *ts_interpolate(ts_tensor *x, int64_t out_h, int64_t out_w, int mode, int align_corners, double scale_h,
                          double scale_w);
/* Constant padding in F.pad order: (pad[0], pad[1]) before and after the last dim, (pad[2], pad[3])
   the dim before, ...; npad even and at most 2 ndim; negative amounts crop. Any dtype. */
ts_tensor *ts_pad(ts_tensor *x, int npad, const int64_t *pad, double value);
/* torch.roll: element i along dims[k] moves to (i + shifts[k]) mod size. dims = NULL rolls the
   flattened tensor by shifts[0] (nshifts 1) and keeps the shape. Any dtype. */
ts_tensor *ts_roll(ts_tensor *x, int nshifts, const int64_t *shifts, const int *dims);
/* [*, C r^2, H, W] <-> [*, C, H r, W r]: output (c, h r + i, w r + j) is input (c r^2 + i r + j, h, w). */
ts_tensor *ts_pixel_shuffle(ts_tensor *x, int64_t r);
ts_tensor *ts_pixel_unshuffle(ts_tensor *x, int64_t r);
/* attention and Swin's relative position bias */
/* Scaled dot-product attention, as PyTorch's scaled_dot_product_attention with a float mask:
   out = softmax(q kᵀ · scale + bias) v for q [..., Nq, D], k [..., Nk, D], v [..., Nk, Dv] of one
   floating dtype; the leading (batch) dims of q, k, v broadcast; out is [..., Nq, Dv] in that dtype.
   scale: NaN means 1/sqrt(D). bias: NULL or a floating tensor broadcastable to the scores
   [..., Nq, Nk] by the usual rules (dims aligned from the right, each equal or 1), added before the
   softmax (-inf or a large negative value masks a key; a row masked entirely gives zeros, not NaN).
   One autograd node; q, k, v and bias (reduced over its broadcast dims) get gradients. */
ts_tensor *ts_attention(ts_tensor *q, ts_tensor *k, ts_tensor *v, ts_tensor *bias, double scale);
/* Multi-head attention on packed projections, the heads split and merged inside: qkv [..., N, 3·D]
   (kv NULL) holds q, k and v side by side, as timm's qkv Linear makes them (D = heads·hd; head h
   owns columns h·hd .. h·hd + hd - 1 of each part); or q is [..., Nq, D] and kv [..., Nk, 2·D] (k
   then v) with q's leading dims. out [..., Nq, D] holds head h's softmax(q_h k_hᵀ·scale + bias) v_h
   in its columns: the same as splitting the heads with views, ts_attention on [..., heads, N, hd]
   and merging them back, but without copying either way, and the gradient of qkv (or q and kv) is
   written in its packed layout. bias broadcasts to the scores [..., heads, Nq, Nk]; scale NaN means
   1/sqrt(hd). One autograd node. */
ts_tensor *ts_attention_packed(ts_tensor *q, ts_tensor *kv, int64_t heads, ts_tensor *bias, double scale);
/* Swin's continuous relative position bias (UM-MAE's WindowAttention.posmlp) as one op:
     out[w, h, i, j] = b2[h] + Σ_p w2[h, p] relu(b1[p] + Σ_c w1[p, c] f(pos[w, c, j] - pos[w, c, i]))
   with f(d) = sign(d) log(1 + |d|), for the positions pos [W, C, N] (C coordinates of the N tokens
   of each of W windows, any strides), w1 [P, C] or [P, C, 1, 1], b1 [P], w2 [H, P] or [H, P, 1, 1],
   b2 [H] (b1 and b2 may be NULL), all of one floating dtype; out is [W, H, N, N]. It equals
   Conv1x1(C→P), ReLU, Conv1x1(P→H) on the [W, C, N, N] features without materializing the
   [W, P, N, N] hidden layer (the backward recomputes it). One autograd node; every input gets a
   gradient. */
ts_tensor *ts_relative_position_bias(ts_tensor *pos, ts_tensor *w1, ts_tensor *b1, ts_tensor *w2, ts_tensor *b2);
/* optimizers */
/* ---- optimizers: fused multi-tensor updates, as torch.optim ------------------------------------ */
/* One call updates every tensor of one or more parameter groups. Entry k of each array belongs to
   parameter k; a NULL grads[k] skips parameter k (its state may then be NULL too). Parameters are
   floating leaves, updated in place under no-grad semantics (no autograd error for requires_grad
   leaves; their versions are bumped). grads[k] has the parameter's shape, dtype and device;
   optimizer state tensors have its shape and are float64 for float64 parameters, float32
   otherwise (float16/bfloat16 parameters update in float32 and are rounded back once per step).
   Any strides are accepted. */

/* AdamW (Loshchilov & Hutter), PyTorch's semantics: with lr = lr[k], wd = weight_decay[k],
   t = step[k] (this update's count, 1 on the first):
     p -= lr*wd*p;  m = beta1*m + (1-beta1)*g;  v = beta2*v + (1-beta2)*g*g;
     p -= lr/(1 - beta1^t) * m / (sqrt(v)/sqrt(1 - beta2^t) + eps). */
int ts_adamw_step(int n, ts_tensor *const *params, ts_tensor *const *grads, ts_tensor *const *exp_avg,
                  ts_tensor *const *exp_avg_sq, const double *lr, const double *weight_decay, double beta1,
                  double beta2, double eps, const int64_t *step);
/* torch.optim.SGD: d = g + wd*p; with momentum != 0, buf = d where first_step[k] != 0 (the buffer's
   old contents are ignored), else buf = momentum*buf + (1-dampening)*d, and d = buf (or
   d + momentum*buf with nesterov); then p -= lr*d. momentum_buffers and first_step may be NULL
   when momentum is 0. */
int ts_sgd_step(int n, ts_tensor *const *params, ts_tensor *const *grads, ts_tensor *const *momentum_buffers,
                const double *lr, const double *weight_decay, double momentum, double dampening, int nesterov,
                const int *first_step);
/* The norm_type-norm of all elements of all tensors together (NULL entries skipped), accumulated in
   double: torch.nn.utils.clip_grad_norm_'s total norm. norm_type > 0, or INFINITY for max-abs. */
int ts_grad_norm(int n, ts_tensor *const *grads, double norm_type, double *out);
/* tensors[k] *= factor in place for every non-NULL entry (no-grad semantics, like the steps). */
int ts_scale_(int n, ts_tensor *const *tensors, double factor);

/* ---- safetensors files ------------------------------------------------------------------------ */
/* ts_st_open maps the file (private, copy-on-write: writing to a loaded tensor never changes the
   file) and validates its header; errors name the file and the problem. Tensors from
   ts_st_tensor point into the mapping (a copy only when the data is misaligned for its dtype),
   stay valid after ts_st_close, and are not counted in the host memory statistics (they are the
   file's page-cache pages). Each call for one index returns a new reference over the same
   storage. Dtypes: F32, F64, F16, BF16, I64, I32, U8, BOOL. */
typedef struct ts_st_file ts_st_file;
ts_st_file *ts_st_open(const char *path);
int ts_st_count(const ts_st_file *f);                  /* -1 for a NULL handle */
const char *ts_st_name(const ts_st_file *f, int i);    /* valid until ts_st_close */
ts_tensor *ts_st_tensor(ts_st_file *f, int i);
/* The "__metadata__" object as compact JSON text ("{}" when absent); valid until ts_st_close. */
const char *ts_st_metadata(const ts_st_file *f);
void ts_st_close(ts_st_file *f);                       /* NULL is ignored */
/* Writes n tensors (any strides, dtypes and devices; names unique, valid UTF-8) and metadata_json
   (a JSON object of string values, or NULL) atomically: through `path.tmp.<pid>`, synced, then
   renamed over path; on failure path is untouched and no temporary file is left. */
int ts_st_save(const char *path, int n, const char *const *names, ts_tensor *const *tensors,
               const char *metadata_json);

/* ---- masks for masked image modeling (MAE, UM-MAE, SimMIM) ------------------------------------ */
/* A mask is a uint8 [N, h*w] tensor over an h x w grid of patches numbered row-major: 1 = removed,
   0 = visible. Masks are drawn on dev from a generator's Philox stream (g = NULL: the default
   generator), so one (seed, offset) gives the same masks on every device:
     TS_MASK_RANDOM   MAE's random sampling: keys = a draw of N*h*w raw 32-bit lanes (randint over
                      [0, 2^32); element i*L + l belongs to patch l of image i); each image keeps
                      visible the int(L * (1 - ratio)) patches with the smallest keys (ties: lower
                      index first), as MAE's argsort of its noise. ratio in [0, 1].
     TS_MASK_GRID     grid-wise sampling: a draw of N values v in [0, 4) (randint); image i keeps patch
                      (2gy + v/2, 2gx + v%2) of every 2x2 group (gy, gx).
     TS_MASK_UNIFORM  uniform sampling (UM-MAE, as its official generator): group g (row-major on
                      the group grid, G = (h/2)*(w/2) groups) of image i keeps its patch
                      (2gy + v/2, 2gx + v%2), the v drawn without replacement from a pool of
                      K = ceil(h*w/8) of each v in [0, 4) (the official code shuffles that pool and
                      takes its first G). Draw: N*G raw 32-bit lanes (randint over [0, 2^32));
                      lane i*G + g picks, of the R entries left in image i's pool (ordered by v),
                      entry floor(lane * R / 2^32).
   The group strategies need even h and w; they remove 75% by construction and reject other ratios. */
typedef enum ts_mask_kind { TS_MASK_RANDOM = 0, TS_MASK_GRID, TS_MASK_UNIFORM } ts_mask_kind;
ts_tensor *ts_mask_generate(int kind, int64_t n, int64_t h, int64_t w, double ratio, ts_generator *g,
                            ts_device dev);
/* MAE's random_masking from given noise [N, L] (any real dtype): in each row the int(L * (1 - ratio))
   patches with the smallest noise stay visible (ties: lower index first). The mask is made on the
   noise's device. */
ts_tensor *ts_mask_from_noise(ts_tensor *noise, double ratio);
/* SimMIM's MaskGenerator: a grid of (input_size/mask_patch_size)^2 mask patches of which
   ceil(count * ratio) are removed: those with the smallest keys of a draw of N*count raw lanes (the
   first entries of a random permutation, as ts_randperm orders keys); each mask patch then covers
   (mask_patch_size/model_patch_size)^2 model patches. Result [N, (input_size/model_patch_size)^2]
   on dev. */
ts_tensor *ts_mask_simmim(int64_t n, int64_t input_size, int64_t mask_patch_size, int64_t model_patch_size,
                          double ratio, ts_generator *g, ts_device dev);
/* UM-MAE's secondary masking: a share `ratio` of the visible patches is replaced by a learnable token.
   mask [N, L] uint8/bool with the same number V of visible patches in every image;
   K = int(V * (1 - ratio)).
     TS_SECONDARY_SWIN  (models_mae_swin.py / models_mae_pvt.py) noise [N, L] in [0, 1) over all
                        patches: sorting the patches by mask + noise, the first K stay visible, i.e.
                        the K visible patches with the smallest noise (ties: lower index first).
     TS_SECONDARY_VIT   (models_mae.py) noise [N, V] over the visible patches in raster order: with
                        P the stable ascending argsort of a noise row, visible patch j is replaced
                        iff P[j] >= K.
   noise = NULL draws it from g as float32 uniform [0, 1) (ts_uniform_). Writes *new_mask
   (uint8 [N, L]: 1 = removed or replaced) and, when vis_mask is not NULL, *vis_mask (uint8 [N, V]:
   1 = replaced, over the visible patches in raster order), both on mask's device; both NULL on
   error. The work is done on the host, where the mask is read and checked. */
typedef enum ts_secondary_formula { TS_SECONDARY_SWIN = 0, TS_SECONDARY_VIT } ts_secondary_formula;
int ts_mask_secondary(ts_tensor *mask, ts_tensor *noise, double ratio, int formula, ts_generator *g,
                      ts_tensor **new_mask, ts_tensor **vis_mask);
/* UM-MAE's compaction: x [N, H, W, C] (a channels-last token grid, any dtype), mask [N, (H/p)*(W/p)]
   uint8/bool over patches of p x p tokens (p = patch_tokens) with exactly one visible patch in every
   2x2 group of patches, on the CPU or on x's device (it is read and checked on the host). Returns
   [N, H/2, W/2, C] whose p x p block (gy, gx) holds the tokens of group (gy, gx)'s visible patch.
   Differentiable in x (the gradient is scattered back, zeros elsewhere). */
ts_tensor *ts_uniform_compact(ts_tensor *x, ts_tensor *mask, int64_t patch_tokens);

/* ---- PNG images (libpng) ----------------------------------------------------------------------- */
/* Reads a PNG into a new uint8 [H, W, C] CPU tensor, C as stored but always 8-bit: 1 for grayscale,
   3 for RGB, 4 for RGBA. Grayscale with an alpha channel or a transparent colour (tRNS) becomes
   RGBA (the gray value in R, G and B); palette images become RGB, or RGBA when the palette has
   transparency; 1/2/4-bit grayscale is scaled to 0..255; 16-bit samples are scaled to 8 bits
   (v * 255 / 65535, rounded); interlaced images are de-interlaced. A missing, non-PNG, truncated or
   corrupt file fails with TS_ERR_IO and a message naming it. */
ts_tensor *ts_png_read(const char *path);
/* Writes an 8-bit PNG from uint8 [H, W, C] (C = 1, 3 or 4; [H, W] is grayscale), or from a floating
   tensor of that shape with values in [0, 1] (clamped, times 255, rounded to nearest; NaN as 0).
   Any strides and devices. Atomic: written to a temporary next to path and renamed over it. */
int ts_png_write(const char *path, ts_tensor *img);

/* ---- data loading for image pre-training (MAE / UM-MAE's main_pretrain.py pipeline) ----------- */
/* Datasets: TS_DATA_IMAGE_FOLDER (path_a = root; the files ending .jpg, .jpeg or .png under
   root/<class>, searched recursively like torchvision's ImageFolder: classes are the
   sub-directories sorted by name, label = position, files ordered by directory path then name;
   extensions case-insensitive),
   TS_DATA_FILE_LIST (path_a = root, path_b = a list file of `relative/path label` lines, paths
   relative to root, '#' comments and blank lines ignored; classes "0".."max label"), TS_DATA_IDX
   (path_a = images, path_b = labels: IDX files of unsigned bytes, gzipped or not, as MNIST and
   Fashion-MNIST ship them, magics 0x00000803 and 0x00000801 with equal counts; loaded into memory;
   classes "0".."max label"). Images are decoded by content (JPEG through libjpeg-turbo, PNG through
   ts_png_read), whatever the extension, and always become 8-bit RGB: grayscale is replicated, an
   alpha channel dropped, CMYK converted as PIL does. A dataset is reference-counted: loaders keep
   it alive after ts_data_close. */
typedef enum ts_data_kind { TS_DATA_IMAGE_FOLDER = 0, TS_DATA_FILE_LIST, TS_DATA_IDX } ts_data_kind;
typedef struct ts_data_dataset ts_data_dataset;
ts_data_dataset *ts_data_open(int kind, const char *path_a, const char *path_b);
void ts_data_close(ts_data_dataset *d);                          /* NULL is ignored */
int64_t ts_data_size(const ts_data_dataset *d);                  /* -1 for NULL */
int64_t ts_data_num_classes(const ts_data_dataset *d);
const char *ts_data_class_name(const ts_data_dataset *d, int64_t i);   /* NULL when out of range */
int64_t ts_data_label(const ts_data_dataset *d, int64_t i);      /* -1 when out of range */
const char *ts_data_path(const ts_data_dataset *d, int64_t i);   /* "" for IDX samples */
/* Sample i decoded: uint8 [H, W, 3]. */
ts_tensor *ts_data_image(const ts_data_dataset *d, int64_t i);

/* The random part of one sample's augmentation, in pixels of the full-size image. */
typedef struct ts_data_crop { int64_t top, left, height, width; int32_t flip; } ts_data_crop;
/* torchvision's RandomResizedCrop.get_params and RandomHorizontalFlip for sample `index` of
   `epoch`, drawn from the Philox stream keyed by seed (see ts_data_loader_options). scale and ratio
   are [lo, hi] pairs. */
int ts_data_crop_params(uint64_t seed, int64_t epoch, int64_t index, int64_t height, int64_t width,
                        const double *scale, const double *ratio, double hflip, ts_data_crop *out);
/* The crop of img (uint8 [H, W, C], C = 1, 3 or 4, or [H, W]; any strides) resized to out_h x out_w
   with PIL's antialiased bicubic (as torchvision's F.resized_crop on a PIL image), mirrored when
   crop->flip, then ToTensor (v / 255) and, when normalize, (x - mean[c]) / std[c] in float32:
   float32 [3, out_h, out_w]. mean and std may be NULL without normalize. */
ts_tensor *ts_data_resized_crop(ts_tensor *img, const ts_data_crop *crop, int64_t out_h, int64_t out_w,
                                int normalize, const double *mean, const double *std);
/* Decodes a JPEG or PNG file (by content) to uint8 [H, W, 3]. */
ts_tensor *ts_data_decode(const char *path);
/* Writes a baseline JPEG (4:2:0 chroma for RGB) from uint8 [H, W, C] (C = 1 or 3, or [H, W]) or a
   floating tensor of that shape in [0, 1] (clamped, times 255, rounded); quality 1..100. Atomic:
   written to a temporary next to path and renamed over it. */
int ts_jpeg_write(const char *path, ts_tensor *img, int quality);

/* A loader: decode workers (pthreads of their own, not the compute pool) prepare up to `prefetch`
   batches ahead of ts_data_loader_next. Every random decision of a sample comes from the Philox
   stream keyed by (seed, epoch, dataset index), so batches are identical whatever num_workers.
   Each epoch shuffles the dataset (a permutation from (seed, epoch); shuffle = 0 keeps the order),
   pads it by wrapping to a multiple of world_size and gives rank r positions r, r + world_size, ...
   (torch's DistributedSampler); the rank's share is cut into batches, the last one dropped when
   incomplete and drop_last. A file that cannot be read or decoded is skipped with one line on
   stderr (once per file per loader) and counted; its batch slot takes the next sample of the rank's
   epoch order (cyclically) that decodes, augmented with the skipped sample's random stream, so
   batches keep their size. num_workers = 0 decodes in the caller's thread. */
typedef struct ts_data_loader_options {
  int64_t batch_size;
  int64_t image_size;      /* output images are image_size x image_size */
  double scale[2];         /* RandomResizedCrop's scale range (share of the image area) */
  double ratio[2];         /* its aspect-ratio range (width / height) */
  double hflip;            /* probability of a horizontal flip */
  int32_t normalize;       /* 1: (x - mean) / std after ToTensor; 0: x = v / 255 */
  double mean[3], std[3];
  uint64_t seed;
  int32_t num_workers, prefetch;
  int64_t rank, world_size;
  int32_t drop_last, shuffle;
  int32_t dct_scaling;     /* 1: decode JPEGs at 1/2, 1/4 or 1/8 scale when the crop stays at least
                              image_size there (faster; 0 reproduces full-size decoding exactly) */
} ts_data_loader_options;
/* MAE's pre-training defaults: batch 64, 224, scale (0.2, 1), ratio (3/4, 4/3), flip 0.5,
   ImageNet mean/std, seed 0, 2 workers, prefetch 2, rank 0 of 1, drop_last, shuffle, dct_scaling. */
void ts_data_loader_default_options(ts_data_loader_options *o);
typedef struct ts_data_loader ts_data_loader;
typedef struct ts_data_loader_state { int64_t epoch, batch; uint64_t seed; } ts_data_loader_state;
ts_data_loader *ts_data_loader_new(ts_data_dataset *d, const ts_data_loader_options *o);
void ts_data_loader_close(ts_data_loader *l);                    /* NULL is ignored */
int ts_data_loader_options_get(const ts_data_loader *l, ts_data_loader_options *out);
int64_t ts_data_loader_num_batches(const ts_data_loader *l);     /* per epoch, for this rank */
int64_t ts_data_loader_num_samples(const ts_data_loader *l);     /* this rank's share of an epoch */
/* Starts epoch `epoch` (>= 0) at batch 0; a no-op when that epoch has started and not moved yet. */
int ts_data_loader_set_epoch(ts_data_loader *l, int64_t epoch);
/* The next batch: images float32 [B, 3, S, S], labels int64 [B], indices int64 [B] (the dataset
   index of each image); returns 1 with a batch (new references), 0 at the end of the epoch (the
   outputs NULL), -1 on error. */
int ts_data_loader_next(ts_data_loader *l, ts_tensor **images, ts_tensor **labels, ts_tensor **indices);
/* (epoch, next batch, seed): setting a state read earlier continues exactly where it was. */
int ts_data_loader_get_state(const ts_data_loader *l, ts_data_loader_state *out);
int ts_data_loader_set_state(ts_data_loader *l, const ts_data_loader_state *s);
/* Files skipped in the batches of the current epoch delivered so far. */
int64_t ts_data_loader_skipped(const ts_data_loader *l);

/* Whether float32 matrix products (matmul, bmm, linear) and convolutions (cuDNN) on
   CUDA devices may use TF32 tensor cores (10-bit mantissa inputs, float32 accumulation): off by
   default. Returns the previous setting; kept in every build. */
int ts_cuda_set_allow_tf32(int allow);
int ts_cuda_get_allow_tf32(void);

/* ---- mixed precision: autocast (thread-local, off by default) ------------------------------------ */
/* While autocast is on (dtype TS_BF16 or TS_F16) and an op's tensors live on a CUDA device:
     - matmul, bmm, linear, conv2d, attention and packed attention cast their float32 (and other
       16-bit) inputs, weights and biases to that dtype with ts_to_dtype, which autograd records,
       so gradients reach float32 leaves in float32; the CUDA kernels accumulate in float32 and
       return results in the 16-bit dtype;
     - layer_norm, group_norm, batch_norm, softmax, log_softmax, cross_entropy and the pointwise
       losses (mse, l1, smooth_l1) cast 16-bit inputs up to float32 and return float32;
     - everything else runs in its inputs' dtypes (the optimizer steps float32 master weights).
   float64 tensors are never cast. On the CPU autocast changes nothing (its kernels compute in
   float32 or float64), so code written for it runs anywhere. Backward runs with autocast off (as
   PyTorch), so gradients come out the same wherever backward is called. ts_set_autocast(-1) or
   ts_set_autocast(TS_F32) turns it off. Returns the previous setting (-1 when it was off), or -2
   with an error for any other dtype. */
int ts_set_autocast(int dtype_or_minus1);
int ts_get_autocast(void);                 /* -1 when off */

/* ---- CUDA (always declared; answers "not available" without a GPU or a CUDA build) ----------- */
int ts_cuda_compiled(void);
int ts_cuda_device_count(void);           /* 0 without a GPU or driver; never fails */
int ts_cuda_synchronize(int device);

#ifndef TESSERA_FFI
#ifdef __cplusplus
}
#endif
#endif
#endif /* TESSERA_H */

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
enum { TESSERA_ABI_VERSION = 1, TS_MAX_DIMS = 8 };
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
   advances the generator's offset by ceil(n/4). A GPU kernel computes the same stream. */
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
/* Bytes allocated on the host since start; the Lua binding steps its GC by the growth of this. */
int64_t ts_host_bytes_allocated_total(void);

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
/* @nn-linear-norm-softmax-loss (declarations below this line) */
/* @nn-spatial (declarations below this line) */
/* @nn-attention (declarations below this line) */
/* @optim (declarations below this line) */

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

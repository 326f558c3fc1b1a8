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

typedef enum ts_random_kind { TS_RAND_UNIFORM = 0, TS_RAND_NORMAL, TS_RAND_BERNOULLI, TS_RAND_RANDINT } ts_random_kind;

typedef struct ts_backend {
  const char *name;

  /* memory: device allocations and host<->device transfers of contiguous bytes */
  void *(*alloc)(size_t nbytes, int device_index);
  void (*free)(void *ptr, size_t nbytes, int device_index);
  int (*copy_from_host)(void *dst, const void *src, size_t nbytes, int device_index);
  int (*copy_to_host)(void *dst, const void *src, size_t nbytes, int device_index);

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

  /* @nn-linear-norm-softmax-loss (entries below this line) */
  /* @nn-spatial (entries below this line) */
  /* @nn-attention (entries below this line) */
  /* @optim (entries below this line) */

  int (*synchronize)(int device_index);
} ts_backend;

extern const ts_backend ts_cpu_backend;
#ifdef TESSERA_HAVE_CUDA
extern const ts_backend ts_cuda_backend;
#endif

/* The backend for a device, or NULL with an error set (no CUDA build, no GPU, bad index). */
const ts_backend *ts_backend_for(ts_device dev);

/* Looks up a backend entry, failing with "<op>: not implemented on <device>" when it is NULL. */
#define TS_BACKEND_FN(be, field, opname, dev)                                                      \
  ((be)->field ? 0                                                                                 \
               : ts_set_error(TS_ERR_UNSUPPORTED, "%s: not implemented on %s", (opname),           \
                              ts_device_str(dev)))

#endif

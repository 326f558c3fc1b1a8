/* internal.h — what the runtime and the kernels share and the public ABI hides:
 * the tensor and storage structs, error helpers, shape helpers, threads. */
#ifndef TESSERA_INTERNAL_H
#define TESSERA_INTERNAL_H

#include "tessera.h"
#include <stdarg.h>
#include <stdio.h>

/* Storage: one refcounted allocation on one device. Views share it. */
typedef struct ts_storage {
  int64_t refcount;
  void *data;
  size_t nbytes;
  ts_device device;
  /* Who owns `data`: NULL means the device allocator; otherwise this releases it (mmap, ...). */
  void (*release)(struct ts_storage *s);
  void *release_ctx;
  uint32_t version;  /* bumped by every in-place write; autograd checks saved tensors against it */
  int64_t graph_views; /* live views recorded by autograd: in-place writes would bypass their history */
} ts_storage;

struct ts_tensor {
  int64_t refcount;
  ts_storage *storage;
  int64_t offset;                 /* elements */
  int64_t shape[TS_MAX_DIMS];
  int64_t stride[TS_MAX_DIMS];    /* elements; 0 for broadcast dims */
  int ndim;
  int dtype;
  ts_device device;
  /* autograd (see autograd.h): a leaf that requires grad has no grad_fn */
  int requires_grad;
  ts_tensor *grad;            /* accumulated gradient of a leaf */
  struct ts_node *grad_fn;    /* the op that made this tensor, when it requires grad */
  int is_view;                /* made by a view op: shares another tensor's storage */
  int graph_view;             /* a view recorded by autograd, counted in its storage's graph_views */
};

/* ---- errors: set the thread-local message, return the status (or NULL) ---------------------- */
int ts_set_error(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* How many errors this thread has set: tells whether a call set one of its own, whatever was set before. */
uint64_t ts_error_count(void);
#define TS_FAIL_NULL(status, ...) (ts_set_error((status), __VA_ARGS__), (ts_tensor *)NULL)
/* Formats a shape as "[2,3]" into one of a few rotating thread-local buffers, so that several
   may appear in one error message. */
const char *ts_shape_str(int ndim, const int64_t *shape);
const char *ts_tshape(const ts_tensor *t);
const char *ts_device_str(ts_device dev);

/* ---- helpers used across the runtime --------------------------------------------------------- */
int ts_wrap_dim(const char *op, int dim, int ndim, int *out);    /* negative dims; errors name op */
int64_t ts_shape_numel(int ndim, const int64_t *shape);
/* Whether shape (ndim dims) is exactly want (want_ndim dims). */
static inline int ts_shape_equal(int ndim, const int64_t *shape, int want_ndim, const int64_t *want) {
  if (ndim != want_ndim) return 0;
  for (int d = 0; d < ndim; d++)
    if (shape[d] != want[d]) return 0;
  return 1;
}
/* Allocation sizes: malloc(0) may return NULL, which would read as out of memory. */
static inline size_t ts_at_least_one(int64_t count) { return count > 0 ? (size_t)count : 1; }
int ts_check_shape(const char *op, int ndim, const int64_t *shape); /* rank, negatives, overflow */
int ts_broadcast_shapes(const char *op, const ts_tensor *a, const ts_tensor *b, int *ndim, int64_t *shape);
int ts_same_device(const char *op, const ts_tensor *a, const ts_tensor *b);
int ts_device_equal(ts_device a, ts_device b);
static inline ts_device ts_cpu(void) { ts_device d = {TS_CPU, 0}; return d; }
static inline char *ts_elem_ptr(const ts_tensor *t) {
  return (char *)t->storage->data + t->offset * (int64_t)ts_dtype_size(t->dtype);
}

/* A tensor header over existing storage (takes a storage reference). */
ts_tensor *ts_tensor_over(ts_storage *s, int ndim, const int64_t *shape, const int64_t *stride,
                          int64_t offset, int dtype);
ts_tensor *ts_empty_like_shape(const ts_tensor *like, int ndim, const int64_t *shape, int dtype);
ts_storage *ts_storage_new(size_t nbytes, ts_device dev);
void ts_storage_release(ts_storage *s);
void ts_contiguous_strides(int ndim, const int64_t *shape, int64_t *stride);
int ts_has_internal_overlap(const ts_tensor *t);  /* a written tensor must not have stride-0 dims */
/* src itself (a new reference), or a private copy when it shares dst's storage with another layout:
   an op writing dst must not read what it is overwriting (x.copy_(x.t()), y.add_(y.t())). */
ts_tensor *ts_unaliased(ts_tensor *src, const ts_tensor *dst);

/* ---- random draws (random.c) ------------------------------------------------------------------ */
/* Where a generator stood when a call began. A call that draws and then fails rewinds it (the
   binding retries a call that ran out of memory, and the retry must draw the same numbers): the
   generator goes back unless another thread drew from it or set it meanwhile. */
typedef struct { ts_generator *g; uint64_t offset, changes, own_changes; } ts_draw_mark;
ts_draw_mark ts_draw_mark_of(ts_generator *g); /* g = NULL: the default generator */
void ts_draw_rewind(const ts_draw_mark *m);

/* ---- writing image files (image.c; PNG and JPEG alike) ---------------------------------------- */
/* img as `count` 8-bit samples on the host (caller frees): uint8 copied, floats clamped to [0, 1]
   (NaN as 0), times 255, rounded to nearest. */
uint8_t *ts_image_samples(const char *op, ts_tensor *img, int64_t count);
/* A file is written as a temporary next to its path and renamed over it once complete. */
char *ts_temporary_name(const char *path); /* caller frees; NULL when out of memory */
/* Ends such a write: flushes, syncs and closes f (the open temporary tmp), then renames tmp over path;
   when st (the status so far) or any of these fails, tmp is removed instead. Returns the status. */
int ts_commit_file(const char *op, FILE *f, const char *tmp, const char *path, int st);

/* ---- host allocator statistics (device allocators report through the same counters) ---------- */
void ts_stats_on_alloc(ts_device dev, int64_t bytes);
void ts_stats_on_free(ts_device dev, int64_t bytes);

/* ---- threads --------------------------------------------------------------------------------- */
/* Runs fn over [0, n) split into contiguous chunks of at least `grain` items across the pool.
   Calls from inside a parallel region run serially. */
typedef void (*ts_range_fn)(int64_t begin, int64_t end, void *ctx);
void ts_parallel_for(int64_t n, int64_t grain, ts_range_fn fn, void *ctx);

/* ---- half precision conversions (round to nearest even) -------------------------------------- */
float ts_half_to_float(uint16_t h);
uint16_t ts_float_to_half(float f);
float ts_bf16_to_float(uint16_t h);
uint16_t ts_float_to_bf16(float f);

/* ---- elementwise result types (shared by the runtime and the autograd layer) ----------------- */
int ts_unary_result_dtype(int op, int in_dtype);
int ts_binary_result_dtype(int op, int a_dtype, int b_dtype);

#endif

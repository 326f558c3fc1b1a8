/* tensor.c — storage and tensor lifecycle, accessors, shape helpers, memory statistics. */
#include "autograd.h"
#include "backend.h"

#include <stdlib.h>
#include <string.h>

/* ---- memory statistics: one slot for the host, one per CUDA device --------------------------- */
enum { MAX_CUDA_DEVICES = 16 };
typedef struct { int64_t live, peak, count, limit; } mem_counters; /* limit 0: none */
static mem_counters host_stats, cuda_stats[MAX_CUDA_DEVICES];
static int64_t allocated_total, live_total; /* over every device: the Lua GC steps by these */

static mem_counters *stats_for(ts_device dev) {
  if (dev.type == TS_CPU) return &host_stats;
  if (dev.type == TS_CUDA && dev.index >= 0 && dev.index < MAX_CUDA_DEVICES) return &cuda_stats[dev.index];
  return NULL;
}

void ts_stats_on_alloc(ts_device dev, int64_t bytes) {
  mem_counters *s = stats_for(dev);
  if (!s) return;
  int64_t live = __atomic_add_fetch(&s->live, bytes, __ATOMIC_RELAXED);
  __atomic_add_fetch(&s->count, 1, __ATOMIC_RELAXED);
  __atomic_add_fetch(&allocated_total, bytes, __ATOMIC_RELAXED);
  __atomic_add_fetch(&live_total, bytes, __ATOMIC_RELAXED);
  int64_t peak = __atomic_load_n(&s->peak, __ATOMIC_RELAXED);
  while (live > peak && !__atomic_compare_exchange_n(&s->peak, &peak, live, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
}

void ts_stats_on_free(ts_device dev, int64_t bytes) {
  mem_counters *s = stats_for(dev);
  if (!s) return;
  __atomic_sub_fetch(&s->live, bytes, __ATOMIC_RELAXED);
  __atomic_sub_fetch(&live_total, bytes, __ATOMIC_RELAXED);
}

int ts_memory_stats_get(ts_device dev, ts_memory_stats *out) {
  mem_counters *s = stats_for(dev);
  if (!s || !out) return ts_set_error(TS_ERR_DEVICE, "memory_stats: no such device %s", ts_device_str(dev));
  out->live_bytes = __atomic_load_n(&s->live, __ATOMIC_RELAXED);
  out->peak_bytes = __atomic_load_n(&s->peak, __ATOMIC_RELAXED);
  out->num_allocs = __atomic_load_n(&s->count, __ATOMIC_RELAXED);
  /* a device that never allocated has nothing cached, and asking its backend would start it */
  const ts_backend *be = dev.type == TS_CPU || out->num_allocs ? ts_backend_for(dev) : NULL;
  int64_t cached = be && be->cached_bytes ? be->cached_bytes(dev.index) : 0;
  out->reserved_bytes = out->live_bytes + cached;
  return TS_OK;
}

int ts_memory_set_limit(ts_device dev, int64_t bytes) {
  mem_counters *s = stats_for(dev);
  if (!s) return ts_set_error(TS_ERR_DEVICE, "set_memory_limit: no such device %s", ts_device_str(dev));
  if (bytes < 0) return ts_set_error(TS_ERR_ARG, "set_memory_limit: the limit must be >= 0 (0: none), got %lld", (long long)bytes);
  __atomic_store_n(&s->limit, bytes, __ATOMIC_RELAXED);
  return TS_OK;
}

/* Whether nbytes more fit under the device's limit; sets the out-of-memory error when not. */
static int within_limit(ts_device dev, size_t nbytes) {
  mem_counters *s = stats_for(dev);
  int64_t limit = s ? __atomic_load_n(&s->limit, __ATOMIC_RELAXED) : 0;
  int64_t live = s ? __atomic_load_n(&s->live, __ATOMIC_RELAXED) : 0;
  if (!limit || live + (int64_t)nbytes <= limit) return 1;
  ts_set_error(TS_ERR_MEMORY, "%s: out of memory: allocating %zu bytes would exceed the limit of %lld bytes set with "
               "set_memory_limit (%lld bytes live)", ts_device_str(dev), nbytes, (long long)limit, (long long)live);
  return 0;
}

void ts_memory_reset_peak(ts_device dev) {
  mem_counters *s = stats_for(dev);
  if (s) __atomic_store_n(&s->peak, __atomic_load_n(&s->live, __ATOMIC_RELAXED), __ATOMIC_RELAXED);
}

int64_t ts_bytes_allocated_total(void) { return __atomic_load_n(&allocated_total, __ATOMIC_RELAXED); }
int64_t ts_bytes_live_total(void) { return __atomic_load_n(&live_total, __ATOMIC_RELAXED); }

/* ---- storage --------------------------------------------------------------------------------- */
/* Allocations above this are refused up front with a clear message rather than attempted. */
static const size_t ABSURD_BYTES = (size_t)1 << 46; /* 64 TiB */

ts_storage *ts_storage_new(size_t nbytes, ts_device dev) {
  const ts_backend *be = ts_backend_for(dev);
  if (!be) return NULL;
  if (nbytes > ABSURD_BYTES) {
    ts_set_error(TS_ERR_MEMORY, "cannot allocate %zu bytes on %s: size is absurd", nbytes, ts_device_str(dev));
    return NULL;
  }
  if (!within_limit(dev, nbytes)) return NULL;
  ts_storage *s = calloc(1, sizeof *s);
  if (!s) {
    ts_set_error(TS_ERR_MEMORY, "out of host memory allocating a storage header");
    return NULL;
  }
  /* A backend that fails may set its own, more precise, error; one that does not gets ours, even when
     an older error is still set (the binding retries on TS_ERR_MEMORY only). The older error itself
     stays: callers that allocate after a failed step report it afterwards. */
  uint64_t errors = ts_error_count();
  s->data = be->alloc(nbytes ? nbytes : 1, dev.index);
  if (!s->data) {
    free(s);
    if (ts_error_count() == errors)
      ts_set_error(TS_ERR_MEMORY, "out of memory allocating %zu bytes on %s", nbytes, ts_device_str(dev));
    return NULL;
  }
  s->refcount = 1;
  s->nbytes = nbytes;
  s->device = dev;
  ts_stats_on_alloc(dev, (int64_t)nbytes);
  return s;
}

void ts_storage_release(ts_storage *s) {
  if (!s || __atomic_sub_fetch(&s->refcount, 1, __ATOMIC_ACQ_REL) != 0) return;
  if (s->release) {
    s->release(s);
  } else {
    ts_stats_on_free(s->device, (int64_t)s->nbytes);
    const ts_backend *be = ts_backend_for(s->device);
    if (be) be->free(s->data, s->nbytes, s->device.index);
  }
  free(s);
}

/* ---- tensors --------------------------------------------------------------------------------- */
void ts_contiguous_strides(int ndim, const int64_t *shape, int64_t *stride) {
  int64_t st = 1;
  for (int d = ndim - 1; d >= 0; d--) {
    stride[d] = st;
    st *= shape[d] > 1 ? shape[d] : 1;
  }
}

ts_tensor *ts_tensor_over(ts_storage *s, int ndim, const int64_t *shape, const int64_t *stride,
                          int64_t offset, int dtype) {
  ts_tensor *t = calloc(1, sizeof *t);
  if (!t) return TS_FAIL_NULL(TS_ERR_MEMORY, "out of host memory allocating a tensor header");
  __atomic_add_fetch(&s->refcount, 1, __ATOMIC_RELAXED);
  t->refcount = 1;
  t->storage = s;
  t->offset = offset;
  t->ndim = ndim;
  t->dtype = dtype;
  t->device = s->device;
  for (int d = 0; d < ndim; d++) {
    t->shape[d] = shape[d];
    t->stride[d] = stride[d];
  }
  return t;
}

int64_t ts_shape_numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int d = 0; d < ndim; d++) n *= shape[d];
  return n;
}

int ts_check_shape(const char *op, int ndim, const int64_t *shape) {
  if (ndim < 0 || ndim > TS_MAX_DIMS)
    return ts_set_error(TS_ERR_SHAPE, "%s: %d dims requested, tensors have at most %d", op, ndim, TS_MAX_DIMS);
  if (ndim > 0 && !shape) return ts_set_error(TS_ERR_ARG, "%s: shape is NULL", op);
  int64_t n = 1;
  for (int d = 0; d < ndim; d++) {
    if (shape[d] < 0)
      return ts_set_error(TS_ERR_SHAPE, "%s: negative size %lld in shape %s", op, (long long)shape[d],
                          ts_shape_str(ndim, shape));
    if (shape[d] && n > INT64_MAX / 16 / shape[d])
      return ts_set_error(TS_ERR_MEMORY, "%s: shape %s has too many elements", op, ts_shape_str(ndim, shape));
    n *= shape[d];
  }
  return TS_OK;
}

ts_tensor *ts_empty(int ndim, const int64_t *shape, int dtype, ts_device dev) {
  if (ts_check_shape("empty", ndim, shape)) return NULL;
  if (dtype < 0 || dtype >= TS_NUM_DTYPES) return TS_FAIL_NULL(TS_ERR_DTYPE, "empty: invalid dtype %d", dtype);
  int64_t stride[TS_MAX_DIMS];
  ts_contiguous_strides(ndim, shape, stride);
  ts_storage *s = ts_storage_new((size_t)ts_shape_numel(ndim, shape) * (size_t)ts_dtype_size(dtype), dev);
  if (!s) return NULL;
  ts_tensor *t = ts_tensor_over(s, ndim, shape, stride, 0, dtype);
  ts_storage_release(s);
  return t;
}

ts_tensor *ts_empty_like_shape(const ts_tensor *like, int ndim, const int64_t *shape, int dtype) {
  return ts_empty(ndim, shape, dtype, like->device);
}

void ts_retain(ts_tensor *t) {
  if (t) __atomic_add_fetch(&t->refcount, 1, __ATOMIC_RELAXED);
}

void ts_release(ts_tensor *t) {
  if (!t || __atomic_sub_fetch(&t->refcount, 1, __ATOMIC_ACQ_REL) != 0) return;
  ts_release(t->grad);
  if (t->graph_view) __atomic_sub_fetch(&t->storage->graph_views, 1, __ATOMIC_RELAXED);
  ts_node_release(t->grad_fn);
  ts_storage_release(t->storage);
  free(t);
}

int ts_ndim(const ts_tensor *t) { return t->ndim; }
const int64_t *ts_shape(const ts_tensor *t) { return t->shape; }
const int64_t *ts_strides(const ts_tensor *t) { return t->stride; }
int64_t ts_offset(const ts_tensor *t) { return t->offset; }
int64_t ts_numel(const ts_tensor *t) { return ts_shape_numel(t->ndim, t->shape); }
int ts_dtype_of(const ts_tensor *t) { return t->dtype; }
ts_device ts_device_of(const ts_tensor *t) { return t->device; }
void *ts_data_ptr(const ts_tensor *t) { return ts_elem_ptr(t); }
int64_t ts_storage_refcount(const ts_tensor *t) { return __atomic_load_n(&t->storage->refcount, __ATOMIC_RELAXED); }
int ts_shares_storage(const ts_tensor *a, const ts_tensor *b) { return a->storage == b->storage; }

int ts_is_contiguous(const ts_tensor *t) {
  if (ts_numel(t) == 0) return 1; /* no element to lay out, as PyTorch */
  int64_t expected = 1;
  for (int d = t->ndim - 1; d >= 0; d--) {
    if (t->shape[d] == 1) continue;
    if (t->stride[d] != expected) return 0;
    expected *= t->shape[d];
  }
  return 1;
}

int ts_has_internal_overlap(const ts_tensor *t) {
  for (int d = 0; d < t->ndim; d++)
    if (t->stride[d] == 0 && t->shape[d] > 1) return 1;
  return 0;
}

int ts_wrap_dim(const char *op, int dim, int ndim, int *out) {
  int n = ndim > 0 ? ndim : 1; /* a 0-d tensor accepts dim 0 and -1, as in PyTorch */
  if (dim < -n || dim >= n)
    return ts_set_error(TS_ERR_INDEX, "%s: dim %d out of range for a tensor with %d dims", op, dim, ndim);
  *out = dim < 0 ? dim + n : dim;
  return TS_OK;
}

int ts_device_equal(ts_device a, ts_device b) { return a.type == b.type && (a.type == TS_CPU || a.index == b.index); }

int ts_same_device(const char *op, const ts_tensor *a, const ts_tensor *b) {
  if (ts_device_equal(a->device, b->device)) return TS_OK;
  return ts_set_error(TS_ERR_DEVICE, "%s: tensors are on different devices (%s and %s)", op,
                      ts_device_str(a->device), ts_device_str(b->device));
}

int ts_broadcast_shapes(const char *op, const ts_tensor *a, const ts_tensor *b, int *ndim, int64_t *shape) {
  int n = a->ndim > b->ndim ? a->ndim : b->ndim;
  for (int i = 0; i < n; i++) {
    int da = a->ndim - n + i, db = b->ndim - n + i;
    int64_t sa = da >= 0 ? a->shape[da] : 1, sb = db >= 0 ? b->shape[db] : 1;
    if (sa != sb && sa != 1 && sb != 1)
      return ts_set_error(TS_ERR_SHAPE, "%s: shapes %s and %s cannot be broadcast (dim %d: %lld vs %lld)", op,
                          ts_tshape(a), ts_tshape(b), i - n, (long long)sa, (long long)sb);
    shape[i] = sa == 1 ? sb : sa;
  }
  *ndim = n;
  return TS_OK;
}

int ts_memory_empty_cache(ts_device dev) {
  const ts_backend *be = ts_backend_for(dev);
  if (!be) return ts_last_status();
  if (be->empty_cache) be->empty_cache(dev.index);
  return TS_OK;
}

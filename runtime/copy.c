/* copy.c — copies between layouts, dtypes and devices; host transfers; factories. */
#include "autograd.h"
#include "backend.h"

#include <math.h>
#include <string.h>

static int check_writable(const char *op, const ts_tensor *t) {
  if (ts_has_internal_overlap(t))
    return ts_set_error(TS_ERR_ARG, "%s: the destination %s is a broadcast (expanded) view; "
                        "several of its elements share one memory location", op, ts_tshape(t));
  return TS_OK;
}

/* A contiguous tensor on `dev` holding src's values in `dtype`, src expanded to `shape`. */
static ts_tensor *staged(const ts_tensor *src, int ndim, const int64_t *shape, int dtype) {
  ts_tensor *view = ts_expand((ts_tensor *)src, ndim, shape);
  if (!view) return NULL;
  ts_tensor *out = ts_empty(ndim, shape, dtype, src->device);
  const ts_backend *be = out ? ts_backend_for(src->device) : NULL;
  if (!be || be->copy(out, view)) {
    ts_release(out);
    out = NULL;
  }
  ts_release(view);
  return out;
}

/* Moves the bytes of a contiguous tensor into a contiguous tensor of the same size elsewhere. */
static int transfer(ts_tensor *dst, const ts_tensor *src) {
  size_t nbytes = (size_t)ts_numel(src) * (size_t)ts_dtype_size(src->dtype);
  if (src->device.type == TS_CPU && dst->device.type == TS_CPU) {
    memcpy(ts_elem_ptr(dst), ts_elem_ptr(src), nbytes);
    return TS_OK;
  }
  if (src->device.type == TS_CPU) {
    const ts_backend *be = ts_backend_for(dst->device);
    return be ? be->copy_from_host(ts_elem_ptr(dst), ts_elem_ptr(src), nbytes, dst->device.index) : ts_last_status();
  }
  if (dst->device.type == TS_CPU) {
    const ts_backend *be = ts_backend_for(src->device);
    return be ? be->copy_to_host(ts_elem_ptr(dst), ts_elem_ptr(src), nbytes, src->device.index) : ts_last_status();
  }
  /* device to device across devices: through the host */
  ts_tensor *host = ts_empty(src->ndim, src->shape, src->dtype, ts_cpu());
  int st = host ? transfer(host, src) : ts_last_status();
  if (!st) st = transfer(dst, host);
  ts_release(host);
  return st;
}

ts_tensor *ts_unaliased(ts_tensor *src, const ts_tensor *dst) {
  int same_layout = src->storage != dst->storage ||
                    (src->offset == dst->offset && src->ndim == dst->ndim &&
                     !memcmp(src->shape, dst->shape, (size_t)src->ndim * sizeof(int64_t)) &&
                     !memcmp(src->stride, dst->stride, (size_t)src->ndim * sizeof(int64_t)));
  if (same_layout) {
    ts_retain(src);
    return src;
  }
  int previous = ts_set_grad_enabled(0); /* a private copy, not a step of the graph */
  ts_tensor *c = ts_clone(src);
  ts_set_grad_enabled(previous);
  return c;
}

static int copy_impl(ts_tensor *dst, const ts_tensor *src) {
  if (check_writable("copy_", dst)) return ts_last_status();
  if (ts_device_equal(dst->device, src->device)) {
    const ts_backend *be = ts_backend_for(dst->device);
    if (!be) return ts_last_status();
    ts_tensor *source = ts_unaliased((ts_tensor *)src, dst); /* x.copy_(x.t()) reads what it writes */
    ts_tensor *view = source ? ts_expand(source, dst->ndim, dst->shape) : NULL;
    ts_release(source);
    if (!view) return ts_set_error(TS_ERR_SHAPE, "copy_: source %s cannot be broadcast to destination %s",
                                   ts_tshape(src), ts_tshape(dst));
    int st = be->copy(dst, view);
    ts_release(view);
    return st;
  }
  ts_tensor *stage = staged(src, dst->ndim, dst->shape, dst->dtype);
  if (!stage) return ts_last_status();
  int st;
  if (ts_is_contiguous(dst)) {
    st = transfer(dst, stage);
  } else {
    ts_tensor *landing = ts_empty(dst->ndim, dst->shape, dst->dtype, dst->device);
    st = landing ? transfer(landing, stage) : ts_last_status();
    if (!st) st = copy_impl(dst, landing);
    ts_release(landing);
  }
  ts_release(stage);
  return st;
}

/* ---- autograd for copies --------------------------------------------------------------------- */
/* The gradient of a copy or conversion is the output gradient, brought back to the input's
   shape (a copy_ source may have been broadcast), dtype and device. */
static int conversion_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  const ts_edge *e = ts_node_input(n, 0);
  ts_tensor *here = ts_to_device(g, e->device);
  if (!here) return ts_last_status();
  int st = ts_set_input_grad(n, 0, here, grads);
  ts_release(here);
  return st;
}

static ts_tensor *record_conversion(ts_tensor *t, ts_tensor *out, const char *name) {
  if (!out) return NULL;
  return ts_node_finish(ts_grad_node(name, conversion_backward, 1, &t), out);
}

/* A new tensor holding t's values in dtype on dev. */
static ts_tensor *converted(const ts_tensor *t, int dtype, ts_device dev) {
  ts_tensor *out = ts_empty(t->ndim, t->shape, dtype, dev);
  if (out && copy_impl(out, t)) {
    ts_release(out);
    return NULL;
  }
  return out;
}

/* After an in-place write that does not depend on the old value: the tensor's history ends. */
static void become_constant(ts_tensor *t) {
  ts_bump_version(t);
  if (ts_grad_mode() && t->grad_fn) {
    ts_node_release(t->grad_fn);
    t->grad_fn = NULL;
    t->requires_grad = 0;
  }
}

int ts_copy_(ts_tensor *dst, const ts_tensor *src) {
  if (!dst || !src) return ts_set_error(TS_ERR_ARG, "copy_: NULL tensor");
  if (ts_check_inplace("copy_", dst)) return ts_last_status();
  if (ts_any_requires_grad(1, (ts_tensor *const *)&src) && ts_check_view_write("copy_", dst)) return ts_last_status();
  int st = copy_impl(dst, src);
  if (st) return st;
  become_constant(dst);
  ts_node *n = ts_grad_node("copy_", conversion_backward, 1, (ts_tensor *const *)&src);
  if (n) {
    ts_node_release(dst->grad_fn);
    dst->grad_fn = NULL;
    ts_node_finish(n, dst);
  }
  return TS_OK;
}

int ts_fill_(ts_tensor *t, double value) {
  if (!t) return ts_set_error(TS_ERR_ARG, "fill_: NULL tensor");
  if (check_writable("fill_", t) || ts_check_inplace("fill_", t)) return ts_last_status();
  const ts_backend *be = ts_backend_for(t->device);
  int st = be ? be->fill(t, value) : ts_last_status();
  if (!st) become_constant(t);
  return st;
}

ts_tensor *ts_clone(const ts_tensor *t) {
  ts_tensor *out = converted(t, t->dtype, t->device);
  return record_conversion((ts_tensor *)t, out, "clone");
}

ts_tensor *ts_contiguous(ts_tensor *t) {
  if (ts_is_contiguous(t)) {
    ts_retain(t);
    return t;
  }
  return ts_clone(t);
}

ts_tensor *ts_to_dtype(ts_tensor *t, int dtype) {
  if (dtype < 0 || dtype >= TS_NUM_DTYPES) return TS_FAIL_NULL(TS_ERR_DTYPE, "to: invalid dtype %d", dtype);
  if (t->dtype == dtype) {
    ts_retain(t);
    return t;
  }
  return record_conversion(t, converted(t, dtype, t->device), "to");
}

ts_tensor *ts_to_device(ts_tensor *t, ts_device dev) {
  if (ts_device_equal(t->device, dev)) {
    ts_retain(t);
    return t;
  }
  return record_conversion(t, converted(t, t->dtype, dev), "to");
}

ts_tensor *ts_from_host(int ndim, const int64_t *shape, int dtype, const void *data, ts_device dev) {
  ts_tensor *host = ts_empty(ndim, shape, dtype, ts_cpu());
  if (!host) return NULL;
  size_t nbytes = (size_t)ts_numel(host) * (size_t)ts_dtype_size(dtype);
  if (nbytes && !data) {
    ts_release(host);
    return TS_FAIL_NULL(TS_ERR_ARG, "from_host: data is NULL");
  }
  if (nbytes) memcpy(host->storage->data, data, nbytes);
  if (dev.type == TS_CPU) return host;
  ts_tensor *out = ts_to_device(host, dev);
  ts_release(host);
  return out;
}

int ts_to_host(const ts_tensor *t, void *dst, size_t nbytes) {
  size_t need = (size_t)ts_numel(t) * (size_t)ts_dtype_size(t->dtype);
  if (nbytes < need)
    return ts_set_error(TS_ERR_ARG, "to_host: buffer of %zu bytes is too small for %s %s (%zu bytes)", nbytes,
                        ts_dtype_name(t->dtype), ts_tshape(t), need);
  int64_t stride[TS_MAX_DIMS];
  ts_contiguous_strides(t->ndim, t->shape, stride);
  ts_storage wrapper = {.refcount = 1, .data = dst, .nbytes = need, .device = {TS_CPU, 0}};
  ts_tensor host = {.refcount = 1, .storage = &wrapper, .ndim = t->ndim, .dtype = t->dtype, .device = {TS_CPU, 0}};
  memcpy(host.shape, t->shape, sizeof host.shape);
  memcpy(host.stride, stride, sizeof host.stride);
  return copy_impl(&host, t);
}

int ts_item(const ts_tensor *t, double *out) {
  if (ts_numel(t) != 1)
    return ts_set_error(TS_ERR_SHAPE, "item: a tensor with %lld elements %s cannot be converted to a number",
                        (long long)ts_numel(t), ts_tshape(t));
  double v;
  ts_storage wrapper = {.refcount = 1, .data = &v, .nbytes = sizeof v, .device = {TS_CPU, 0}};
  ts_tensor host = {.refcount = 1, .storage = &wrapper, .ndim = t->ndim, .dtype = TS_F64, .device = {TS_CPU, 0}};
  memcpy(host.shape, t->shape, sizeof host.shape); /* all ones; any strides address element 0 */
  int st = copy_impl(&host, t);
  if (!st) *out = v;
  return st;
}

/* ---- factories ------------------------------------------------------------------------------- */
ts_tensor *ts_full(int ndim, const int64_t *shape, double value, int dtype, ts_device dev) {
  ts_tensor *t = ts_empty(ndim, shape, dtype, dev);
  if (t && ts_fill_(t, value)) {
    ts_release(t);
    return NULL;
  }
  return t;
}

static ts_tensor *arange_n(int64_t n, double start, double step, int dtype, ts_device dev) {
  ts_tensor *t = ts_empty(1, &n, dtype, dev);
  const ts_backend *be = t ? ts_backend_for(dev) : NULL;
  if (!be || be->arange(t, start, step)) {
    ts_release(t);
    return NULL;
  }
  return t;
}

ts_tensor *ts_arange(double start, double end, double step, int dtype, ts_device dev) {
  if (step == 0 || !isfinite(start) || !isfinite(end) || !isfinite(step))
    return TS_FAIL_NULL(TS_ERR_ARG, "arange: invalid range start=%g end=%g step=%g", start, end, step);
  double count = ceil((end - start) / step);
  if (count > 1e15) return TS_FAIL_NULL(TS_ERR_MEMORY, "arange: %g elements is absurd", count);
  return arange_n(count > 0 ? (int64_t)count : 0, start, step, dtype, dev);
}

ts_tensor *ts_linspace(double start, double end, int64_t steps, int dtype, ts_device dev) {
  if (steps < 0) return TS_FAIL_NULL(TS_ERR_ARG, "linspace: steps must be non-negative, got %lld", (long long)steps);
  double step = steps > 1 ? (end - start) / (double)(steps - 1) : 0;
  ts_tensor *t = arange_n(steps, start, step, dtype, dev);
  if (t && steps > 1) { /* the last point is exactly `end`, whatever the rounding on the way */
    ts_tensor *last = ts_select(t, 0, steps - 1);
    int st = last ? ts_fill_(last, end) : 1;
    ts_release(last);
    if (st) {
      ts_release(t);
      return NULL;
    }
  }
  return t;
}

ts_tensor *ts_eye(int64_t n, int64_t m, int dtype, ts_device dev) {
  if (m < 0) m = n;
  int64_t shape[2] = {n, m};
  ts_tensor *t = ts_full(2, shape, 0, dtype, dev);
  if (!t || n == 0 || m == 0) return t;
  int64_t diag = n < m ? n : m, stride = m + 1;
  ts_tensor *d = ts_as_strided(t, 1, &diag, &stride, 0);
  int st = d ? ts_fill_(d, 1) : 1;
  ts_release(d);
  if (st) {
    ts_release(t);
    return NULL;
  }
  return t;
}

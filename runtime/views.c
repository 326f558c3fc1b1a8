/* views.c — tensors that share their input's storage: no element is copied here. */
#include "autograd.h"

static ts_tensor *view_of(ts_tensor *t, int ndim, const int64_t *shape, const int64_t *stride, int64_t offset) {
  ts_tensor *v = ts_tensor_over(t->storage, ndim, shape, stride, offset, t->dtype);
  if (v) v->is_view = 1;
  return v;
}

/* ---- autograd: a view's gradient is the output gradient laid back onto the input's shape ---- */
enum { VIEW_RESHAPE, VIEW_PERMUTE, VIEW_EXPAND, VIEW_SLICE, VIEW_SELECT };

/* The input-shaped zeros with g written into the part this view took. */
static ts_tensor *scatter_into_zeros(const ts_node *n, const ts_edge *e, ts_tensor *g) {
  ts_tensor *gx = ts_full(e->ndim, e->shape, 0, g->dtype, g->device);
  if (!gx) return NULL;
  ts_tensor *part = n->i[0] == VIEW_SLICE
                        ? ts_slice(gx, (int)n->i[1], n->i[2], n->i[2] + g->shape[n->i[1]] * n->i[3], n->i[3])
                        : ts_select(gx, (int)n->i[1], n->i[2]);
  int st = part ? ts_copy_(part, g) : ts_last_status();
  ts_release(part);
  if (st) {
    ts_release(gx);
    return NULL;
  }
  return gx;
}

static int view_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  const ts_edge *e = ts_node_input(n, 0);
  ts_tensor *gx = NULL;
  switch (n->i[0]) {
  case VIEW_RESHAPE: gx = ts_reshape(g, e->ndim, e->shape); break;
  case VIEW_PERMUTE: {
    int inverse[TS_MAX_DIMS];
    for (int d = 0; d < e->ndim; d++) inverse[n->i[1 + d]] = d;
    gx = ts_permute(g, e->ndim, inverse);
    break;
  }
  case VIEW_EXPAND: gx = ts_sum_to(g, e->ndim, e->shape); break;
  default: gx = scatter_into_zeros(n, e, g); break;
  }
  grads[0] = gx;
  return gx ? TS_OK : ts_last_status();
}

/* Records view `out` of t (kind + up to TS_MAX_DIMS parameters); returns out. */
static ts_tensor *record_view(ts_tensor *t, ts_tensor *out, const char *name, int kind, int nparams,
                              const int64_t *params) {
  if (!out) return NULL;
  ts_node *n = ts_grad_node(name, view_backward, 1, &t);
  if (!n) return out;
  n->is_view = 1;
  /* while this view lives, in-place writes to the storage would bypass its history (ts_check_inplace);
     ts_release takes it off the count */
  out->graph_view = 1;
  __atomic_add_fetch(&t->storage->graph_views, 1, __ATOMIC_RELAXED);
  n->i[0] = kind;
  for (int k = 0; k < nparams; k++) n->i[1 + k] = params[k];
  return ts_node_finish(n, out);
}

/* Resolves one -1 in a requested shape against numel. */
static int infer_shape(const char *op, const ts_tensor *t, int ndim, const int64_t *req, int64_t *shape) {
  if (ndim < 0 || ndim > TS_MAX_DIMS)
    return ts_set_error(TS_ERR_SHAPE, "%s: %d dims requested, tensors have at most %d", op, ndim, TS_MAX_DIMS);
  int infer = -1;
  int64_t known = 1;
  for (int d = 0; d < ndim; d++) {
    shape[d] = req[d];
    if (req[d] == -1) {
      if (infer >= 0) return ts_set_error(TS_ERR_SHAPE, "%s: only one dimension can be -1 in %s", op, ts_shape_str(ndim, req));
      infer = d;
    } else if (req[d] < 0) {
      return ts_set_error(TS_ERR_SHAPE, "%s: invalid size %lld in %s", op, (long long)req[d], ts_shape_str(ndim, req));
    } else {
      known *= req[d];
    }
  }
  int64_t numel = ts_numel(t);
  if (infer >= 0) {
    if (known == 0 || numel % known)
      return ts_set_error(TS_ERR_SHAPE, "%s: shape %s is invalid for input %s of %lld elements", op,
                          ts_shape_str(ndim, req), ts_tshape(t), (long long)numel);
    shape[infer] = numel / known;
  } else if (known != numel) {
    return ts_set_error(TS_ERR_SHAPE, "%s: shape %s is invalid for input %s of %lld elements", op,
                        ts_shape_str(ndim, req), ts_tshape(t), (long long)numel);
  }
  return TS_OK;
}

/* Strides for viewing t with a new shape without copying, as torch's computeStride: each run of
   old dims that is contiguous within itself can be split or merged. Returns 0 if impossible. */
static int view_strides(const ts_tensor *t, int ndim, const int64_t *shape, int64_t *stride) {
  if (ts_numel(t) == 0 || t->ndim == 0) {
    ts_contiguous_strides(ndim, shape, stride);
    return 1;
  }
  int view_d = ndim - 1;
  int64_t chunk_base_stride = t->stride[t->ndim - 1], tensor_numel = 1, view_numel = 1;
  for (int d = t->ndim - 1; d >= 0; d--) {
    tensor_numel *= t->shape[d];
    if (d == 0 || (t->shape[d - 1] != 1 && t->stride[d - 1] != tensor_numel * chunk_base_stride)) {
      while (view_d >= 0 && (view_numel < tensor_numel || shape[view_d] == 1)) {
        stride[view_d] = view_numel * chunk_base_stride;
        view_numel *= shape[view_d];
        view_d--;
      }
      if (view_numel != tensor_numel) return 0;
      if (d > 0) {
        chunk_base_stride = t->stride[d - 1];
        tensor_numel = 1;
        view_numel = 1;
      }
    }
  }
  return view_d == -1;
}

ts_tensor *ts_view(ts_tensor *t, int ndim, const int64_t *req) {
  int64_t shape[TS_MAX_DIMS], stride[TS_MAX_DIMS];
  if (infer_shape("view", t, ndim, req, shape)) return NULL;
  if (!view_strides(t, ndim, shape, stride))
    return TS_FAIL_NULL(TS_ERR_SHAPE,
                        "view: shape %s is not compatible with the input's strides (input %s); use reshape, which copies",
                        ts_shape_str(ndim, shape), ts_tshape(t));
  return record_view(t, view_of(t, ndim, shape, stride, t->offset), "view", VIEW_RESHAPE, 0, NULL);
}

ts_tensor *ts_reshape(ts_tensor *t, int ndim, const int64_t *req) {
  int64_t shape[TS_MAX_DIMS], stride[TS_MAX_DIMS];
  if (infer_shape("reshape", t, ndim, req, shape)) return NULL;
  if (view_strides(t, ndim, shape, stride))
    return record_view(t, view_of(t, ndim, shape, stride, t->offset), "reshape", VIEW_RESHAPE, 0, NULL);
  ts_tensor *c = ts_contiguous(t);
  if (!c) return NULL;
  ts_tensor *v = ts_view(c, ndim, shape);
  ts_release(c);
  return v;
}

ts_tensor *ts_permute(ts_tensor *t, int ndim, const int *dims) {
  if (ndim != t->ndim)
    return TS_FAIL_NULL(TS_ERR_SHAPE, "permute: %d dims given for a tensor of %d dims %s", ndim, t->ndim, ts_tshape(t));
  int64_t shape[TS_MAX_DIMS], stride[TS_MAX_DIMS];
  int seen[TS_MAX_DIMS] = {0};
  for (int d = 0; d < ndim; d++) {
    int src;
    if (ts_wrap_dim("permute", dims[d], ndim, &src)) return NULL;
    if (seen[src]++) return TS_FAIL_NULL(TS_ERR_ARG, "permute: dim %d repeated", src);
    shape[d] = t->shape[src];
    stride[d] = t->stride[src];
  }
  int64_t order[TS_MAX_DIMS];
  for (int d = 0; d < ndim; d++) order[d] = dims[d] < 0 ? dims[d] + ndim : dims[d];
  return record_view(t, view_of(t, ndim, shape, stride, t->offset), "permute", VIEW_PERMUTE, ndim, order);
}

ts_tensor *ts_transpose(ts_tensor *t, int d0, int d1) {
  if (t->ndim == 0) return ts_permute(t, 0, NULL);
  int a, b, dims[TS_MAX_DIMS];
  if (ts_wrap_dim("transpose", d0, t->ndim, &a) || ts_wrap_dim("transpose", d1, t->ndim, &b)) return NULL;
  for (int d = 0; d < t->ndim; d++) dims[d] = d;
  dims[a] = b;
  dims[b] = a;
  return ts_permute(t, t->ndim, dims);
}

ts_tensor *ts_slice(ts_tensor *t, int dim, int64_t start, int64_t stop, int64_t step) {
  int d;
  if (t->ndim == 0) return TS_FAIL_NULL(TS_ERR_SHAPE, "slice: cannot slice a 0-d tensor");
  if (ts_wrap_dim("slice", dim, t->ndim, &d)) return NULL;
  if (step <= 0) return TS_FAIL_NULL(TS_ERR_ARG, "slice: step must be positive, got %lld", (long long)step);
  int64_t n = t->shape[d];
  if (start < 0) start += n;
  if (stop < 0) stop += n;
  start = start < 0 ? 0 : start > n ? n : start;
  stop = stop < start ? start : stop > n ? n : stop;
  int64_t shape[TS_MAX_DIMS], stride[TS_MAX_DIMS];
  for (int i = 0; i < t->ndim; i++) {
    shape[i] = t->shape[i];
    stride[i] = t->stride[i];
  }
  shape[d] = stop > start ? 1 + (stop - start - 1) / step : 0; /* no overflow for huge steps */
  stride[d] = t->stride[d] * step;
  int64_t params[3] = {d, start, step};
  return record_view(t, view_of(t, t->ndim, shape, stride, t->offset + start * t->stride[d]), "slice", VIEW_SLICE, 3, params);
}

ts_tensor *ts_narrow(ts_tensor *t, int dim, int64_t start, int64_t length) {
  int d;
  if (t->ndim == 0) return TS_FAIL_NULL(TS_ERR_SHAPE, "narrow: cannot narrow a 0-d tensor");
  if (ts_wrap_dim("narrow", dim, t->ndim, &d)) return NULL;
  int64_t n = t->shape[d];
  if (start < 0) start += n;
  if (start < 0 || length < 0 || start + length > n)
    return TS_FAIL_NULL(TS_ERR_INDEX, "narrow: start %lld, length %lld out of range for dim %d of size %lld",
                        (long long)start, (long long)length, d, (long long)n);
  return ts_slice(t, d, start, start + length, 1);
}

ts_tensor *ts_select(ts_tensor *t, int dim, int64_t index) {
  int d;
  if (t->ndim == 0) return TS_FAIL_NULL(TS_ERR_SHAPE, "select: cannot index a 0-d tensor");
  if (ts_wrap_dim("select", dim, t->ndim, &d)) return NULL;
  int64_t n = t->shape[d];
  if (index < -n || index >= n)
    return TS_FAIL_NULL(TS_ERR_INDEX, "select: index %lld out of range for dim %d of size %lld (shape %s)",
                        (long long)index, d, (long long)n, ts_tshape(t));
  if (index < 0) index += n;
  int64_t shape[TS_MAX_DIMS], stride[TS_MAX_DIMS];
  int k = 0;
  for (int i = 0; i < t->ndim; i++) {
    if (i == d) continue;
    shape[k] = t->shape[i];
    stride[k++] = t->stride[i];
  }
  int64_t params[2] = {d, index};
  return record_view(t, view_of(t, t->ndim - 1, shape, stride, t->offset + index * t->stride[d]), "select", VIEW_SELECT, 2, params);
}

ts_tensor *ts_expand(ts_tensor *t, int ndim, const int64_t *req) {
  if (ndim < t->ndim || ndim > TS_MAX_DIMS)
    return TS_FAIL_NULL(TS_ERR_SHAPE, "expand: cannot expand %s to %s", ts_tshape(t), ts_shape_str(ndim, req));
  int64_t shape[TS_MAX_DIMS], stride[TS_MAX_DIMS];
  for (int i = 0; i < ndim; i++) {
    int src = i - (ndim - t->ndim);
    int64_t have = src >= 0 ? t->shape[src] : 1;
    int64_t want = req[i] == -1 && src >= 0 ? have : req[i];
    if (want < 0 || (have != want && have != 1))
      return TS_FAIL_NULL(TS_ERR_SHAPE, "expand: cannot expand %s to %s (dim %d: %lld to %lld)", ts_tshape(t),
                          ts_shape_str(ndim, req), i, (long long)have, (long long)req[i]);
    shape[i] = want;
    stride[i] = src >= 0 && have == want ? t->stride[src] : 0;
  }
  return record_view(t, view_of(t, ndim, shape, stride, t->offset), "expand", VIEW_EXPAND, 0, NULL);
}

static ts_tensor *drop_dims(ts_tensor *t, const int *drop, const char *name) {
  int64_t shape[TS_MAX_DIMS], stride[TS_MAX_DIMS];
  int k = 0;
  for (int i = 0; i < t->ndim; i++) {
    if (drop[i]) continue;
    shape[k] = t->shape[i];
    stride[k++] = t->stride[i];
  }
  return record_view(t, view_of(t, k, shape, stride, t->offset), name, VIEW_RESHAPE, 0, NULL);
}

ts_tensor *ts_squeeze(ts_tensor *t, int dim) {
  int d, drop[TS_MAX_DIMS] = {0};
  if (ts_wrap_dim("squeeze", dim, t->ndim, &d)) return NULL;
  if (t->ndim > 0) drop[d] = t->shape[d] == 1; /* a dim of another size stays, as in PyTorch */
  return drop_dims(t, drop, "squeeze");
}

ts_tensor *ts_squeeze_all(ts_tensor *t) {
  int drop[TS_MAX_DIMS] = {0};
  for (int i = 0; i < t->ndim; i++) drop[i] = t->shape[i] == 1;
  return drop_dims(t, drop, "squeeze");
}

ts_tensor *ts_unsqueeze(ts_tensor *t, int dim) {
  int d;
  if (t->ndim >= TS_MAX_DIMS) return TS_FAIL_NULL(TS_ERR_SHAPE, "unsqueeze: tensor already has %d dims", TS_MAX_DIMS);
  if (ts_wrap_dim("unsqueeze", dim, t->ndim + 1, &d)) return NULL;
  int64_t shape[TS_MAX_DIMS], stride[TS_MAX_DIMS];
  for (int i = 0, k = 0; i <= t->ndim; i++) {
    if (i == d) {
      shape[i] = 1;
      stride[i] = k < t->ndim ? t->stride[k] * t->shape[k] : 1;
    } else {
      shape[i] = t->shape[k];
      stride[i] = t->stride[k++];
    }
  }
  return record_view(t, view_of(t, t->ndim + 1, shape, stride, t->offset), "unsqueeze", VIEW_RESHAPE, 0, NULL);
}

ts_tensor *ts_flatten(ts_tensor *t, int start_dim, int end_dim) {
  if (t->ndim == 0) return ts_reshape(t, 1, (int64_t[]){1});
  int s, e;
  if (ts_wrap_dim("flatten", start_dim, t->ndim, &s) || ts_wrap_dim("flatten", end_dim, t->ndim, &e)) return NULL;
  if (s > e) return TS_FAIL_NULL(TS_ERR_ARG, "flatten: start_dim %d comes after end_dim %d", s, e);
  int64_t shape[TS_MAX_DIMS];
  int k = 0;
  for (int i = 0; i < s; i++) shape[k++] = t->shape[i];
  shape[k] = 1;
  for (int i = s; i <= e; i++) shape[k] *= t->shape[i];
  k++;
  for (int i = e + 1; i < t->ndim; i++) shape[k++] = t->shape[i];
  return ts_reshape(t, k, shape);
}

ts_tensor *ts_as_strided(ts_tensor *t, int ndim, const int64_t *shape, const int64_t *stride, int64_t offset) {
  if (ts_any_requires_grad(1, &t))
    return TS_FAIL_NULL(TS_ERR_ARG, "as_strided: not differentiable; detach() the input or use view, slice, expand");
  if (ts_check_shape("as_strided", ndim, shape)) return NULL;
  if (offset < 0) return TS_FAIL_NULL(TS_ERR_ARG, "as_strided: negative offset %lld", (long long)offset);
  int64_t last = offset, span;
  for (int d = 0; d < ndim; d++) {
    if (stride[d] < 0) return TS_FAIL_NULL(TS_ERR_ARG, "as_strided: negative stride %lld", (long long)stride[d]);
    if (shape[d] == 0) last = -1;
    else if (last >= 0 && (__builtin_mul_overflow(shape[d] - 1, stride[d], &span) || __builtin_add_overflow(last, span, &last)))
      return TS_FAIL_NULL(TS_ERR_INDEX, "as_strided: view %s with strides %s reaches past any storage (the offsets overflow)",
                          ts_shape_str(ndim, shape), ts_shape_str(ndim, stride));
  }
  int64_t capacity = (int64_t)(t->storage->nbytes / (size_t)ts_dtype_size(t->dtype));
  if (last >= capacity)
    return TS_FAIL_NULL(TS_ERR_INDEX, "as_strided: view %s reaches element %lld of a storage of %lld elements",
                        ts_shape_str(ndim, shape), (long long)last, (long long)capacity);
  return view_of(t, ndim, shape, stride, offset);
}

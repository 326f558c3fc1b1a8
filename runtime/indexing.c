/* indexing.c — joining (cat, stack), gathering and scattering along a dim, masks, and advanced
 * indexing by index tensors.
 *
 * Every index is checked here, on the host, against the size of the dim it indexes: an error
 * names the offending value, the dim and its size. The backend then receives int64 indices with
 * negative values already wrapped, so its kernels never check bounds. Index tensors may be int64
 * or int32; a bool index tensor (advanced indexing) stands for the coordinates of its true
 * elements.
 *
 * Autograd, as PyTorch: every op is differentiable in its floating inputs (never in its indices
 * or masks). Each backward moves g back to where the forward took its elements from: the pieces
 * of a cat, an accumulating put for index_select and advanced indexing (duplicate indices add
 * up), scatter_add for gather, zeros where masked_fill and a replacing scatter or index_put_
 * overwrote the input. In-place forms on tensors in the graph compute out of place, record, and
 * hand the history to the tensor (ts_rebase_inplace); every in-place write bumps the version. */
#include "autograd.h"
#include "backend.h"

#include <stdlib.h>

/* PyTorch refuses writes that would lose a value's kind (float into int, int into bool). */
static int can_cast(int from, int to) {
  if (ts_dtype_is_floating(from) && !ts_dtype_is_floating(to)) return 0;
  if (from != TS_BOOL && to == TS_BOOL) return 0;
  return 1;
}

static int check_writable(const char *op, const ts_tensor *t) {
  if (ts_has_internal_overlap(t))
    return ts_set_error(TS_ERR_ARG, "%s: the tensor %s is a broadcast (expanded) view; write to a copy", op,
                        ts_tshape(t));
  return TS_OK;
}

/* A broadcast shape that is exactly the target's (ts_shape_equal): what was broadcast against it (a
   mask, values) fits in it without growing it. */

static int is_index_dtype(int dtype) { return dtype == TS_I64 || dtype == TS_I32; }

static int check_index_dtype(const char *op, const ts_tensor *index) {
  if (!is_index_dtype(index->dtype))
    return ts_set_error(TS_ERR_DTYPE, "%s: index tensors must be int64 or int32, got %s", op,
                        ts_dtype_name(index->dtype));
  return TS_OK;
}

/* The size a dim of `t` indexes: a 0-d tensor is indexed as if it had one dim of size 1. */
static int64_t dim_size(const ts_tensor *t, int dim) { return t->ndim ? t->shape[dim] : 1; }

/* A new contiguous int64 copy of `index` on its own device, every value checked against a dim of
   `size` elements and wrapped into [0, size). The check reads the values on the host. */
static ts_tensor *checked_index(const char *op, ts_tensor *index, int dim, int64_t size) {
  if (check_index_dtype(op, index)) return NULL;
  ts_tensor *host = ts_empty(index->ndim, index->shape, TS_I64, ts_cpu());
  if (!host) return NULL;
  if (ts_copy_(host, index)) goto fail;
  int64_t *v = (int64_t *)ts_elem_ptr(host), n = ts_numel(host);
  for (int64_t i = 0; i < n; i++) {
    if (v[i] < -size || v[i] >= size) {
      ts_set_error(TS_ERR_INDEX, "%s: index %lld out of range for dim %d of size %lld", op, (long long)v[i], dim,
                   (long long)size);
      goto fail;
    }
    if (v[i] < 0) v[i] += size;
  }
  if (index->device.type == TS_CPU) return host;
  ts_tensor *moved = ts_to_device(host, index->device);
  ts_release(host);
  return moved;
fail:
  ts_release(host);
  return NULL;
}

/* A copy of `src` in `dtype` that the kernel may read while it writes `dst`: a source sharing
   dst's storage (t:scatter_(0, i, t)) is cloned first, so reads see the values before the op. */
static ts_tensor *source_operand(ts_tensor *src, const ts_tensor *dst, int dtype) {
  if (src->dtype != dtype || !ts_shares_storage(src, dst)) return ts_to_dtype(src, dtype);
  return ts_clone(src);
}

/* The contiguous tensor a kernel writes in place of `a`: a itself when it already is one in
   `dtype`, else a fresh copy, which finish_in_place copies back. */
static ts_tensor *in_place_target(ts_tensor *a, int dtype) {
  if (a->dtype == dtype && ts_is_contiguous(a)) {
    ts_retain(a);
    return a;
  }
  ts_tensor *work = ts_empty(a->ndim, a->shape, dtype, a->device);
  if (work && ts_copy_(work, a)) {
    ts_release(work);
    return NULL;
  }
  return work;
}

static int finish_in_place(ts_tensor *a, ts_tensor *work, int status) {
  if (!status && work != a) status = ts_copy_(a, work);
  ts_release(work);
  return status;
}

/* ---- autograd helpers ------------------------------------------------------------------------ */
/* A differentiable op runs its forward plumbing (views, copies, conversions) with grad mode off,
   then records one node of its own. */

/* Zeros of input k's shape in g's dtype: what a backward scatters or puts g into. */
static ts_tensor *zeros_like_input(const ts_node *n, int k, const ts_tensor *g) {
  const ts_edge *e = ts_node_input(n, k);
  return ts_full(e->ndim, e->shape, 0, g->dtype, g->device);
}

/* Before an in-place write: no broadcast dims to write through, and autograd allows it. */
static int check_in_place(const char *op, ts_tensor *t) {
  if (check_writable(op, t) || ts_check_inplace(op, t)) return ts_last_status();
  return TS_OK;
}

/* After an in-place write done without autograd: tensors saved for a backward notice it. */
static int wrote(ts_tensor *t, int status) {
  if (!status) ts_bump_version(t);
  return status;
}

/* ---- cat and stack --------------------------------------------------------------------------- */
/* PyTorch still accepts 1-D empty tensors next to tensors of any shape, and skips them. */
static int is_legacy_empty(const ts_tensor *t) { return t->ndim == 1 && t->shape[0] == 0; }

static int check_tensor_list(const char *op, int n, ts_tensor *const *tensors) {
  if (n <= 0 || !tensors) return ts_set_error(TS_ERR_ARG, "%s: expects a non-empty list of tensors", op);
  for (int i = 0; i < n; i++) {
    if (!tensors[i]) return ts_set_error(TS_ERR_ARG, "%s: tensor %d is NULL", op, i);
    if (ts_same_device(op, tensors[0], tensors[i])) return ts_last_status();
  }
  return TS_OK;
}

/* The first tensor that is not a skipped 1-D empty one (tensors[0] when all are). */
static const ts_tensor *cat_reference(int n, ts_tensor *const *tensors) {
  for (int i = 0; i < n; i++)
    if (!is_legacy_empty(tensors[i])) return tensors[i];
  return tensors[0];
}

/* The shape of the result into `shape`, after checking every input against the reference. */
static int cat_shape(int n, ts_tensor *const *tensors, const ts_tensor *ref, int dim, int64_t *shape) {
  for (int d = 0; d < ref->ndim; d++) shape[d] = ref->shape[d];
  shape[dim] = 0;
  for (int i = 0; i < n; i++) {
    const ts_tensor *t = tensors[i];
    if (t != ref && is_legacy_empty(t)) continue;
    if (t->ndim != ref->ndim)
      return ts_set_error(TS_ERR_SHAPE, "cat: tensors must have the same number of dims: tensor %d %s has %d, "
                          "expected %d like %s", i, ts_tshape(t), t->ndim, ref->ndim, ts_tshape(ref));
    for (int d = 0; d < ref->ndim; d++)
      if (d != dim && t->shape[d] != ref->shape[d])
        return ts_set_error(TS_ERR_SHAPE,
                            "cat: sizes must match except in dim %d: tensor %d %s differs from %s in dim %d", dim, i,
                            ts_tshape(t), ts_tshape(ref), d);
    shape[dim] += t->shape[dim];
  }
  return TS_OK;
}

static ts_tensor *cat_forward(int n, ts_tensor *const *tensors, int dim, int *wrapped) {
  if (check_tensor_list("cat", n, tensors)) return NULL;
  int dtype = tensors[0]->dtype;
  for (int i = 0; i < n; i++) {
    if (tensors[i]->ndim == 0)
      return TS_FAIL_NULL(TS_ERR_SHAPE, "cat: zero-dimensional tensor (at position %d) cannot be concatenated", i);
    dtype = ts_promote_types(dtype, tensors[i]->dtype);
  }
  const ts_tensor *ref = cat_reference(n, tensors);
  int d;
  int64_t shape[TS_MAX_DIMS];
  if (ts_wrap_dim("cat", dim, ref->ndim, &d) || cat_shape(n, tensors, ref, d, shape)) return NULL;
  ts_tensor *out = ts_empty(ref->ndim, shape, dtype, ref->device);
  int64_t pos = 0;
  for (int i = 0; out && i < n; i++) {
    ts_tensor *t = tensors[i];
    if ((t != ref && is_legacy_empty(t)) || t->shape[d] == 0) continue;
    ts_tensor *slot = ts_narrow(out, d, pos, t->shape[d]);
    int st = slot ? ts_copy_(slot, t) : ts_last_status();
    ts_release(slot);
    if (st) {
      ts_release(out);
      return NULL;
    }
    pos += t->shape[d];
  }
  *wrapped = d;
  return out;
}

/* Each input's gradient is its piece of g, in its own dtype: n->ivec[k] is where input k starts
   along dim n->i[0], -1 for a skipped 1-D empty input (whose gradient is empty). */
static int cat_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  int dim = (int)n->i[0], st = TS_OK;
  for (int k = 0; k < n->n_inputs && !st; k++) {
    if (!ts_node_needs_grad(n, k)) continue;
    const ts_edge *e = ts_node_input(n, k);
    ts_tensor *piece = n->ivec[k] < 0 ? zeros_like_input(n, k, g) : ts_narrow(g, dim, n->ivec[k], e->shape[dim]);
    st = piece ? ts_set_input_grad(n, k, piece, grads) : ts_last_status();
    ts_release(piece);
  }
  return st;
}

static ts_tensor *record_cat(int n, ts_tensor *const *tensors, int dim, ts_tensor *out) {
  ts_node *node = ts_grad_node("cat", cat_backward, n, tensors);
  if (!node) return out;
  node->ivec = malloc((size_t)n * sizeof *node->ivec);
  if (!node->ivec) {
    ts_node_release(node);
    ts_release(out);
    return TS_FAIL_NULL(TS_ERR_MEMORY, "cat: out of host memory recording %d inputs for autograd", n);
  }
  const ts_tensor *ref = cat_reference(n, tensors);
  int64_t pos = 0;
  for (int k = 0; k < n; k++) {
    const ts_tensor *t = tensors[k];
    int skipped = t != ref && is_legacy_empty(t);
    node->ivec[k] = skipped ? -1 : pos;
    if (!skipped) pos += t->shape[dim];
  }
  node->i[0] = dim;
  return ts_node_finish(node, out);
}

ts_tensor *ts_cat(int n, ts_tensor *const *tensors, int dim) {
  int d = 0, previous = ts_set_grad_enabled(0);
  ts_tensor *out = cat_forward(n, tensors, dim, &d);
  ts_set_grad_enabled(previous);
  return out ? record_cat(n, tensors, d, out) : NULL;
}

static ts_tensor *stack_forward(int n, ts_tensor *const *tensors, int dim, int *wrapped) {
  if (check_tensor_list("stack", n, tensors)) return NULL;
  const ts_tensor *first = tensors[0];
  for (int i = 1; i < n; i++) {
    const ts_tensor *t = tensors[i];
    int same = t->ndim == first->ndim;
    for (int d = 0; same && d < t->ndim; d++) same = t->shape[d] == first->shape[d];
    if (!same)
      return TS_FAIL_NULL(TS_ERR_SHAPE, "stack: expects tensors of equal shape, got %s at entry 0 and %s at entry %d",
                          ts_tshape(first), ts_tshape(t), i);
  }
  int d;
  if (ts_wrap_dim("stack", dim, first->ndim + 1, &d)) return NULL;
  ts_tensor **views = calloc((size_t)n, sizeof *views);
  if (!views) return TS_FAIL_NULL(TS_ERR_MEMORY, "stack: out of host memory for %d tensors", n);
  ts_tensor *out = NULL;
  int i = 0;
  for (; i < n; i++)
    if (!(views[i] = ts_unsqueeze(tensors[i], d))) break;
  int cat_dim;
  if (i == n) out = cat_forward(n, views, d, &cat_dim);
  for (int k = 0; k < n; k++) ts_release(views[k]);
  free(views);
  *wrapped = d;
  return out;
}

/* Input k's gradient is g's slice k along the new dim. */
static int stack_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  int st = TS_OK;
  for (int k = 0; k < n->n_inputs && !st; k++) {
    if (!ts_node_needs_grad(n, k)) continue;
    ts_tensor *slice = ts_select(g, (int)n->i[0], k);
    st = slice ? ts_set_input_grad(n, k, slice, grads) : ts_last_status();
    ts_release(slice);
  }
  return st;
}

ts_tensor *ts_stack(int n, ts_tensor *const *tensors, int dim) {
  int d = 0, previous = ts_set_grad_enabled(0);
  ts_tensor *out = stack_forward(n, tensors, dim, &d);
  ts_set_grad_enabled(previous);
  if (!out) return NULL;
  ts_node *node = ts_grad_node("stack", stack_backward, n, tensors);
  if (node) node->i[0] = d;
  return ts_node_finish(node, out);
}

/* ---- index_select and gather ----------------------------------------------------------------- */
static ts_tensor *index_select_forward(ts_tensor *a, int dim, ts_tensor *index, int *wrapped) {
  int d;
  if (ts_same_device("index_select", a, index) || ts_wrap_dim("index_select", dim, a->ndim, &d)) return NULL;
  if (check_index_dtype("index_select", index)) return NULL;
  if (index->ndim > 1)
    return TS_FAIL_NULL(TS_ERR_SHAPE, "index_select: index must be 0-d or 1-D, got shape %s", ts_tshape(index));
  if (a->ndim == 0 && ts_numel(index) != 1)
    return TS_FAIL_NULL(TS_ERR_SHAPE, "index_select: a 0-d tensor takes exactly one index, got %lld",
                        (long long)ts_numel(index));
  const ts_backend *be = TS_BACKEND(a->device, index_select, "index_select");
  if (!be) return NULL;
  int64_t n = ts_numel(index), shape[TS_MAX_DIMS];
  ts_tensor *flat = ts_reshape(index, 1, &n);
  ts_tensor *idx = flat ? checked_index("index_select", flat, d, dim_size(a, d)) : NULL;
  ts_release(flat);
  if (!idx) return NULL;
  for (int k = 0; k < a->ndim; k++) shape[k] = k == d ? n : a->shape[k];
  ts_tensor *out = ts_empty(a->ndim, shape, a->dtype, a->device);
  if (out && be->index_select(out, a, d, idx)) {
    ts_release(out);
    out = NULL;
  }
  ts_release(idx);
  *wrapped = d;
  return out;
}

/* index_add of g into zeros: the rows g came from get it back, repeated indices adding up. It is
   an accumulating put along the first dim, so dim is moved there. */
static int index_select_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  ts_tensor *index = ts_node_saved(n, 0);
  if (!index) return ts_last_status();
  if (ts_node_input(n, 0)->ndim == 0) return ts_set_input_grad(n, 0, g, grads); /* its one element, once */
  int dim = (int)n->i[0];
  int64_t count = ts_numel(index);
  ts_scope s = {0};
  ts_tensor *gx = ts_scope_keep(&s, zeros_like_input(n, 0, g));
  ts_tensor *flat = ts_scope_keep(&s, ts_reshape(index, 1, &count));
  ts_tensor *rows = gx ? ts_scope_keep(&s, ts_transpose(gx, dim, 0)) : NULL;
  ts_tensor *g_rows = ts_scope_keep(&s, ts_transpose(g, dim, 0));
  if (!s.failed && ts_index_put_(rows, 1, &flat, g_rows, 1)) s.failed = 1;
  if (!s.failed && ts_set_input_grad(n, 0, gx, grads)) s.failed = 1;
  return ts_scope_close(&s);
}

ts_tensor *ts_index_select(ts_tensor *a, int dim, ts_tensor *index) {
  int d = 0, previous = ts_set_grad_enabled(0);
  ts_tensor *out = index_select_forward(a, dim, index, &d);
  ts_set_grad_enabled(previous);
  if (!out) return NULL;
  ts_node *n = ts_grad_node("index_select", index_select_backward, 1, &a);
  if (n) n->i[0] = d;
  return ts_node_finish_saving(n, out, 1, &index);
}

/* gather and scatter: index has as many dims as a, and fits in a except along dim. */
static int check_index_fits(const char *op, const ts_tensor *a, int dim, const ts_tensor *index) {
  if (index->ndim != a->ndim)
    return ts_set_error(TS_ERR_SHAPE, "%s: index %s must have as many dims as the tensor %s", op, ts_tshape(index),
                        ts_tshape(a));
  for (int d = 0; d < a->ndim; d++)
    if (d != dim && index->shape[d] > a->shape[d])
      return ts_set_error(TS_ERR_SHAPE, "%s: index %s is larger than the tensor %s in dim %d", op, ts_tshape(index),
                          ts_tshape(a), d);
  return TS_OK;
}

static ts_tensor *gather_forward(ts_tensor *a, int dim, ts_tensor *index, int *wrapped) {
  int d;
  if (ts_same_device("gather", a, index) || ts_wrap_dim("gather", dim, a->ndim, &d)) return NULL;
  if (check_index_dtype("gather", index) || check_index_fits("gather", a, d, index)) return NULL;
  const ts_backend *be = TS_BACKEND(a->device, gather, "gather");
  if (!be) return NULL;
  ts_tensor *idx = checked_index("gather", index, d, dim_size(a, d));
  if (!idx) return NULL;
  ts_tensor *out = ts_empty(index->ndim, index->shape, a->dtype, a->device);
  if (out && be->gather(out, a, d, idx)) {
    ts_release(out);
    out = NULL;
  }
  ts_release(idx);
  *wrapped = d;
  return out;
}

/* scatter_add of g into zeros: every element g came from gets it back, repeats adding up. */
static int gather_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  ts_tensor *index = ts_node_saved(n, 0);
  if (!index) return ts_last_status();
  ts_scope s = {0};
  ts_tensor *gx = ts_scope_keep(&s, zeros_like_input(n, 0, g));
  if (gx && ts_scatter_(gx, (int)n->i[0], index, g, TS_SCATTER_ADD)) s.failed = 1;
  if (!s.failed && ts_set_input_grad(n, 0, gx, grads)) s.failed = 1;
  return ts_scope_close(&s);
}

ts_tensor *ts_gather(ts_tensor *a, int dim, ts_tensor *index) {
  int d = 0, previous = ts_set_grad_enabled(0);
  ts_tensor *out = gather_forward(a, dim, index, &d);
  ts_set_grad_enabled(previous);
  if (!out) return NULL;
  ts_node *n = ts_grad_node("gather", gather_backward, 1, &a);
  if (n) n->i[0] = d;
  return ts_node_finish_saving(n, out, 1, &index);
}

/* ---- scatter --------------------------------------------------------------------------------- */
static const char *scatter_name(int mode, int in_place) {
  static const char *const names[2][2] = {{"scatter", "scatter_"}, {"scatter_add", "scatter_add_"}};
  return names[mode == TS_SCATTER_ADD][in_place != 0];
}

static int check_scatter(const char *op, ts_tensor *a, int dim, ts_tensor *index, ts_tensor *src, int mode, int *d) {
  if (mode != TS_SCATTER_REPLACE && mode != TS_SCATTER_ADD)
    return ts_set_error(TS_ERR_ARG, "%s: invalid mode %d", op, mode);
  if (ts_same_device(op, a, index) || ts_same_device(op, a, src) || ts_wrap_dim(op, dim, a->ndim, d))
    return ts_last_status();
  if (check_index_dtype(op, index) || check_index_fits(op, a, *d, index)) return ts_last_status();
  if (src->ndim != a->ndim)
    return ts_set_error(TS_ERR_SHAPE, "%s: src %s must have as many dims as the tensor %s", op, ts_tshape(src),
                        ts_tshape(a));
  for (int k = 0; k < a->ndim; k++)
    if (index->shape[k] > src->shape[k])
      return ts_set_error(TS_ERR_SHAPE, "%s: index %s is larger than src %s in dim %d", op, ts_tshape(index),
                          ts_tshape(src), k);
  if (!can_cast(src->dtype, a->dtype))
    return ts_set_error(TS_ERR_DTYPE, "%s: src of dtype %s can't be cast to the tensor's dtype %s", op,
                        ts_dtype_name(src->dtype), ts_dtype_name(a->dtype));
  return TS_OK;
}

/* Replacing only moves values, in a's own dtype; adding runs in the backend's compute dtype. */
static int scatter_into(const char *op, ts_tensor *a, int dim, ts_tensor *index, ts_tensor *src, int mode) {
  int d;
  if (check_scatter(op, a, dim, index, src, mode, &d)) return ts_last_status();
  const ts_backend *be = TS_BACKEND(a->device, scatter, op);
  if (!be) return ts_last_status();
  ts_tensor *idx = checked_index(op, index, d, dim_size(a, d));
  if (!idx) return ts_last_status();
  int dtype = mode == TS_SCATTER_ADD ? be->compute_dtype(a->dtype) : a->dtype;
  ts_tensor *work = in_place_target(a, dtype);
  ts_tensor *values = work ? source_operand(src, work, dtype) : NULL;
  int st = values ? be->scatter(work, d, idx, values, mode) : ts_last_status();
  ts_release(values);
  ts_release(idx);
  return work ? finish_in_place(a, work, st) : st;
}

/* The gradient of src is gather(g): what each src element was written to. Where src is larger
   than index its other elements were not used and get 0. */
static ts_tensor *src_grad(ts_scope *s, ts_node *n, ts_tensor *g, int dim, ts_tensor *index) {
  const ts_edge *e = ts_node_input(n, 1);
  ts_tensor *picked = ts_scope_keep(s, ts_gather(g, dim, index));
  if (!picked || ts_shape_equal(e->ndim, e->shape, index->ndim, index->shape)) return picked;
  ts_tensor *full = ts_scope_keep(s, zeros_like_input(n, 1, g)), *used = full;
  if (used) ts_retain(used);
  for (int d = 0; used && d < e->ndim; d++) {
    ts_tensor *narrower = ts_narrow(used, d, 0, index->shape[d]);
    ts_release(used);
    used = narrower;
  }
  if (!used || ts_copy_(used, picked)) s->failed = 1;
  ts_release(used);
  return s->failed ? NULL : full;
}

/* REPLACE: a's elements that were overwritten get no gradient (g with zeros scattered there), src
   gets gather(g). ADD: a gets g, src gets gather(g). */
static int scatter_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  ts_tensor *index = ts_node_saved(n, 0);
  if (!index) return ts_last_status();
  int dim = (int)n->i[0], mode = (int)n->i[1];
  ts_scope s = {0};
  ts_tensor *ga = NULL, *gsrc = NULL;
  if (ts_node_needs_grad(n, 0) && mode == TS_SCATTER_ADD) ga = g;
  if (ts_node_needs_grad(n, 0) && mode == TS_SCATTER_REPLACE) {
    ts_tensor *zero = ts_scope_keep(&s, ts_full(0, NULL, 0, g->dtype, g->device));
    ts_tensor *zeros = zero ? ts_scope_keep(&s, ts_expand(zero, index->ndim, index->shape)) : NULL;
    ga = zeros ? ts_scope_keep(&s, ts_scatter(g, dim, index, zeros, TS_SCATTER_REPLACE)) : NULL;
  }
  if (ts_node_needs_grad(n, 1)) gsrc = src_grad(&s, n, g, dim, index);
  if (!s.failed && (ts_set_input_grad(n, 0, ga, grads) || ts_set_input_grad(n, 1, gsrc, grads))) s.failed = 1;
  return ts_scope_close(&s);
}

/* scatter out of place, recorded; `op` names the caller in errors. */
static ts_tensor *scatter_recorded(const char *op, ts_tensor *a, int dim, ts_tensor *index, ts_tensor *src, int mode) {
  int previous = ts_set_grad_enabled(0);
  ts_tensor *out = ts_clone(a);
  if (out && scatter_into(op, out, dim, index, src, mode)) {
    ts_release(out);
    out = NULL;
  }
  ts_set_grad_enabled(previous);
  if (!out) return NULL;
  ts_tensor *inputs[2] = {a, src};
  ts_node *n = ts_grad_node(scatter_name(mode, 0), scatter_backward, 2, inputs);
  if (!n) return out;
  int d = 0;
  ts_wrap_dim(op, dim, a->ndim, &d); /* checked by the forward */
  n->i[0] = d;
  n->i[1] = mode;
  return ts_node_finish_saving(n, out, 1, &index);
}

int ts_scatter_(ts_tensor *a, int dim, ts_tensor *index, ts_tensor *src, int mode) {
  const char *op = scatter_name(mode, 1);
  if (check_in_place(op, a)) return ts_last_status();
  if (ts_any_requires_grad(2, (ts_tensor *[]){a, src}))
    return ts_rebase_inplace(a, scatter_recorded(op, a, dim, index, src, mode));
  int previous = ts_set_grad_enabled(0);
  int st = scatter_into(op, a, dim, index, src, mode);
  ts_set_grad_enabled(previous);
  return wrote(a, st);
}

ts_tensor *ts_scatter(ts_tensor *a, int dim, ts_tensor *index, ts_tensor *src, int mode) {
  return scatter_recorded(scatter_name(mode, 0), a, dim, index, src, mode);
}

/* ---- masks ----------------------------------------------------------------------------------- */
static int check_mask(const char *op, const ts_tensor *a, const ts_tensor *mask) {
  if (ts_same_device(op, a, mask)) return ts_last_status();
  if (mask->dtype != TS_BOOL)
    return ts_set_error(TS_ERR_DTYPE, "%s: mask must be a bool tensor, got %s", op, ts_dtype_name(mask->dtype));
  return TS_OK;
}

/* The in-place form writes a as it is: the mask must broadcast to a's shape. */
static int check_mask_fits(const char *op, const ts_tensor *a, const ts_tensor *mask) {
  if (check_mask(op, a, mask)) return ts_last_status();
  int ndim;
  int64_t shape[TS_MAX_DIMS];
  if (ts_broadcast_shapes(op, a, mask, &ndim, shape)) return ts_last_status();
  if (!ts_shape_equal(ndim, shape, a->ndim, a->shape))
    return ts_set_error(TS_ERR_SHAPE, "%s: mask %s cannot be broadcast to the tensor's shape %s", op, ts_tshape(mask),
                        ts_tshape(a));
  return TS_OK;
}

static int fill_masked(const char *op, ts_tensor *a, ts_tensor *mask, double value) {
  const ts_backend *be = TS_BACKEND(a->device, masked_fill, op);
  if (!be) return ts_last_status();
  ts_tensor *m = ts_expand(mask, a->ndim, a->shape);
  int st = m ? be->masked_fill(a, m, value) : ts_last_status();
  ts_release(m);
  return st;
}

/* The filled elements do not depend on the input: g passes everywhere else. */
static int masked_fill_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  ts_tensor *mask = ts_node_saved(n, 0);
  if (!mask) return ts_last_status();
  ts_scope s = {0};
  ts_tensor *zero = ts_scope_keep(&s, ts_full(0, NULL, 0, g->dtype, g->device));
  ts_tensor *gx = ts_s_where(&s, mask, zero, g);
  if (!s.failed && ts_set_input_grad(n, 0, gx, grads)) s.failed = 1;
  return ts_scope_close(&s);
}

/* The out-of-place form broadcasts the tensor and the mask together, as PyTorch does. */
static ts_tensor *masked_fill_recorded(const char *op, ts_tensor *a, ts_tensor *mask, double value) {
  if (check_mask(op, a, mask)) return NULL;
  int ndim;
  int64_t shape[TS_MAX_DIMS];
  if (ts_broadcast_shapes(op, a, mask, &ndim, shape)) return NULL;
  int previous = ts_set_grad_enabled(0);
  ts_tensor *view = ts_expand(a, ndim, shape);
  ts_tensor *out = view ? ts_clone(view) : NULL;
  ts_release(view);
  if (out && fill_masked(op, out, mask, value)) {
    ts_release(out);
    out = NULL;
  }
  ts_set_grad_enabled(previous);
  if (!out) return NULL;
  return ts_node_finish_saving(ts_grad_node("masked_fill", masked_fill_backward, 1, &a), out, 1, &mask);
}

ts_tensor *ts_masked_fill(ts_tensor *a, ts_tensor *mask, double value) {
  return masked_fill_recorded("masked_fill", a, mask, value);
}

int ts_masked_fill_(ts_tensor *a, ts_tensor *mask, double value) {
  const char *op = "masked_fill_";
  if (check_in_place(op, a) || check_mask_fits(op, a, mask)) return ts_last_status();
  if (ts_any_requires_grad(1, &a)) return ts_rebase_inplace(a, masked_fill_recorded(op, a, mask, value));
  return wrote(a, fill_masked(op, a, mask, value));
}

ts_tensor *ts_nonzero(ts_tensor *a) {
  const ts_backend *be = TS_BACKEND(a->device, nonzero, "nonzero");
  if (!be) return NULL;
  return be->nonzero(a);
}

/* g goes back to the selected positions of the broadcast shape (n->i[0] dims n->i[1...]), then
   is summed over the dims a was broadcast in. */
static int masked_select_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  ts_tensor *mask = ts_node_saved(n, 0);
  if (!mask) return ts_last_status();
  int ndim = (int)n->i[0];
  const int64_t *shape = &n->i[1];
  ts_scope s = {0};
  ts_tensor *gx = ts_scope_keep(&s, ts_full(ndim, shape, 0, g->dtype, g->device));
  ts_tensor *m = ts_scope_keep(&s, ts_expand(mask, ndim, shape));
  if (!s.failed && ts_index_put_(gx, 1, &m, g, 0)) s.failed = 1;
  if (!s.failed && ts_set_input_grad(n, 0, gx, grads)) s.failed = 1;
  return ts_scope_close(&s);
}

/* a and mask broadcast together, then indexed by the mask: the selected elements, 1-D. */
ts_tensor *ts_masked_select(ts_tensor *a, ts_tensor *mask) {
  if (check_mask("masked_select", a, mask)) return NULL;
  int ndim;
  int64_t shape[TS_MAX_DIMS];
  if (ts_broadcast_shapes("masked_select", a, mask, &ndim, shape)) return NULL;
  int previous = ts_set_grad_enabled(0);
  ts_tensor *av = ts_expand(a, ndim, shape), *mv = ts_expand(mask, ndim, shape);
  ts_tensor *out = av && mv ? ts_index(av, 1, &mv) : NULL;
  ts_release(av);
  ts_release(mv);
  ts_set_grad_enabled(previous);
  if (!out) return NULL;
  ts_node *n = ts_grad_node("masked_select", masked_select_backward, 1, &a);
  if (n) {
    n->i[0] = ndim;
    for (int d = 0; d < ndim; d++) n->i[1 + d] = shape[d];
  }
  return ts_node_finish_saving(n, out, 1, &mask);
}

/* ---- advanced indexing ----------------------------------------------------------------------- */
/* The checked int64 indices of one advanced-indexing call, broadcast to one shape, and the view of
   the tensor they index (a itself, or a with a new dim where a 0-d bool index stood). */
typedef struct {
  ts_tensor *view;
  int count;                       /* indexed leading dims of view */
  ts_tensor *idx[TS_MAX_DIMS];     /* expanded to shape */
  int ndim;
  int64_t shape[TS_MAX_DIMS];
  int n_inserted;                  /* dims added to a for 0-d bool indices, in order of insertion */
  int inserted[TS_MAX_DIMS];
} index_plan;

static void release_plan(index_plan *p) {
  ts_release(p->view);
  for (int i = 0; i < p->count; i++) ts_release(p->idx[i]);
}

static int add_index(const char *op, index_plan *p, ts_tensor *index) {
  int dim = p->count;
  if (dim >= p->view->ndim)
    return ts_set_error(TS_ERR_INDEX, "%s: too many indices for a tensor of %d dims %s", op, p->view->ndim,
                        ts_tshape(p->view));
  ts_tensor *idx = checked_index(op, index, dim, p->view->shape[dim]);
  if (!idx) return ts_last_status();
  p->idx[p->count++] = idx;
  return TS_OK;
}

/* A 0-d bool index adds a dim of size 1 (true) or 0 (false) at its place, as in PyTorch:
   index a view with a new dim of size 1 by the mask seen as 1-D. */
static ts_tensor *mask_as_1d(index_plan *p, ts_tensor *mask) {
  ts_tensor *wider = ts_unsqueeze(p->view, p->count);
  if (!wider) return NULL;
  ts_release(p->view);
  p->view = wider;
  p->inserted[p->n_inserted++] = p->count;
  int64_t one = 1;
  return ts_reshape(mask, 1, &one);
}

/* A bool mask covering the next mask->ndim dims becomes one int64 index per dim: the columns of
   its nonzero coordinates. */
static int add_mask(const char *op, index_plan *p, ts_tensor *mask) {
  ts_tensor *m = mask->ndim == 0 ? mask_as_1d(p, mask) : (ts_retain(mask), mask);
  if (!m) return ts_last_status();
  int first = p->count, st = TS_OK;
  const ts_tensor *v = p->view;
  if (first + m->ndim > v->ndim) {
    st = ts_set_error(TS_ERR_INDEX, "%s: a mask of %d dims %s indexes past the %d dims of the tensor %s", op, m->ndim,
                      ts_tshape(m), v->ndim, ts_tshape(v));
  } else {
    for (int d = 0; d < m->ndim && !st; d++)
      if (m->shape[d] != v->shape[first + d])
        st = ts_set_error(TS_ERR_SHAPE, "%s: the mask %s does not match the tensor %s at dim %d (%lld vs %lld)", op,
                          ts_tshape(m), ts_tshape(v), first + d, (long long)m->shape[d],
                          (long long)v->shape[first + d]);
  }
  ts_tensor *coords = st ? NULL : ts_nonzero(m);
  if (!st && !coords) st = ts_last_status();
  for (int d = 0; d < m->ndim && !st; d++) {
    ts_tensor *column = ts_select(coords, 1, d);
    st = column ? add_index(op, p, column) : ts_last_status();
    ts_release(column);
  }
  ts_release(coords);
  ts_release(m);
  return st;
}

/* Broadcasts the indices to one shape and checks that the result fits in TS_MAX_DIMS dims. */
static int broadcast_indices(const char *op, index_plan *p) {
  p->ndim = 0;
  for (int i = 0; i < p->count; i++) {
    ts_tensor probe = *p->idx[i];
    probe.ndim = p->ndim;
    for (int d = 0; d < p->ndim; d++) probe.shape[d] = p->shape[d];
    if (ts_broadcast_shapes(op, &probe, p->idx[i], &p->ndim, p->shape)) return ts_last_status();
  }
  if (p->ndim + p->view->ndim - p->count > TS_MAX_DIMS)
    return ts_set_error(TS_ERR_SHAPE, "%s: the result would have %d dims, tensors have at most %d", op,
                        p->ndim + p->view->ndim - p->count, TS_MAX_DIMS);
  for (int i = 0; i < p->count; i++) {
    ts_tensor *e = ts_expand(p->idx[i], p->ndim, p->shape);
    if (!e) return ts_last_status();
    ts_release(p->idx[i]);
    p->idx[i] = e;
  }
  return TS_OK;
}

static int plan_indices(const char *op, ts_tensor *a, int n, ts_tensor *const *indices, index_plan *p) {
  p->view = a;
  ts_retain(a);
  p->count = p->n_inserted = 0;
  if (n < 0 || (n > 0 && !indices)) return ts_set_error(TS_ERR_ARG, "%s: invalid list of %d indices", op, n);
  for (int i = 0; i < n; i++) {
    ts_tensor *index = indices[i];
    if (!index) return ts_set_error(TS_ERR_ARG, "%s: index %d is NULL", op, i);
    if (ts_same_device(op, a, index)) return ts_last_status();
    if (index->dtype == TS_BOOL) {
      if (add_mask(op, p, index)) return ts_last_status();
    } else if (is_index_dtype(index->dtype)) {
      if (add_index(op, p, index)) return ts_last_status();
    } else {
      return ts_set_error(TS_ERR_DTYPE, "%s: index tensors must be int64, int32 or bool, got %s (index %d)", op,
                          ts_dtype_name(index->dtype), i);
    }
  }
  return broadcast_indices(op, p);
}

/* The indexed shape: the broadcast index shape followed by the dims no index covers. */
static int indexed_shape(const index_plan *p, int64_t *shape) {
  int ndim = 0;
  for (int d = 0; d < p->ndim; d++) shape[ndim++] = p->shape[d];
  for (int d = p->count; d < p->view->ndim; d++) shape[ndim++] = p->view->shape[d];
  return ndim;
}


static ts_tensor *index_planned(const ts_backend *be, const index_plan *p) {
  int64_t shape[TS_MAX_DIMS];
  int ndim = indexed_shape(p, shape);
  ts_tensor *out = ts_empty(ndim, shape, p->view->dtype, p->view->device);
  if (out && be->index(out, p->view, p->count, p->idx)) {
    ts_release(out);
    out = NULL;
  }
  return out;
}

/* values converted to `dtype` and broadcast to the indexed shape. */
/* values converted to `dtype` and broadcast to the indexed shape. */
static ts_tensor *put_values(const index_plan *p, ts_tensor *values, const ts_tensor *work, int dtype) {
  int64_t shape[TS_MAX_DIMS];
  int ndim = indexed_shape(p, shape);
  ts_tensor probe = *values;
  probe.ndim = ndim;
  for (int d = 0; d < ndim; d++) probe.shape[d] = shape[d];
  int bn;
  int64_t bshape[TS_MAX_DIMS];
  if (ts_broadcast_shapes("index_put_", &probe, values, &bn, bshape) || !ts_shape_equal(bn, bshape, ndim, shape))
    return TS_FAIL_NULL(TS_ERR_SHAPE, "index_put_: values of shape %s cannot be broadcast to the indexed shape %s",
                        ts_tshape(values), ts_shape_str(ndim, shape));
  ts_tensor *conv = source_operand(values, work, dtype);
  ts_tensor *out = conv ? ts_expand(conv, ndim, shape) : NULL;
  ts_release(conv);
  return out;
}

/* Replacing moves values in the view's dtype; accumulating adds in the backend's compute dtype. */
static int index_put_planned(const ts_backend *be, const index_plan *p, ts_tensor *values, int accumulate) {
  int dtype = accumulate ? be->compute_dtype(p->view->dtype) : p->view->dtype;
  ts_tensor *work = in_place_target(p->view, dtype);
  ts_tensor *vals = work ? put_values(p, values, work, dtype) : NULL;
  int st = vals ? be->index_put(work, p->count, p->idx, vals, accumulate != 0) : ts_last_status();
  ts_release(vals);
  return work ? finish_in_place(p->view, work, st) : st;
}

/* ---- autograd for advanced indexing ---------------------------------------------------------- */
/* A node saves the plan's checked indices (private int64 tensors, so later writes to the caller's
   index tensors cannot change the gradient), one per slot, or stacked into one tensor when there
   are more than a node's slots; n->i says how to rebuild the plan over another tensor. */
enum { P_COUNT = 0, P_STACKED, P_NINSERTED, P_ACCUMULATE, P_INSERTED /* TS_MAX_DIMS entries */ };

static int save_plan(ts_node *n, const index_plan *p) {
  n->i[P_COUNT] = p->count;
  n->i[P_NINSERTED] = p->n_inserted;
  for (int k = 0; k < p->n_inserted; k++) n->i[P_INSERTED + k] = p->inserted[k];
  n->i[P_STACKED] = p->count > TS_NODE_MAX_SAVED;
  if (!n->i[P_STACKED]) {
    for (int k = 0; k < p->count; k++)
      if (ts_node_save(n, p->idx[k])) return ts_last_status();
    return TS_OK;
  }
  ts_tensor *all = ts_stack(p->count, p->idx, 0);
  int st = all ? ts_node_save(n, all) : ts_last_status();
  ts_release(all);
  return st;
}

/* The plan of n's forward over `target` (a tensor of the forward input's shape). */
static int saved_plan(ts_node *n, ts_tensor *target, index_plan *p) {
  *p = (index_plan){.view = target};
  ts_retain(target);
  for (int k = 0; k < n->i[P_NINSERTED]; k++) {
    ts_tensor *wider = ts_unsqueeze(p->view, (int)n->i[P_INSERTED + k]);
    if (!wider) return ts_last_status();
    ts_release(p->view);
    p->view = wider;
  }
  ts_tensor *all = NULL;
  if (n->i[P_STACKED] && !(all = ts_node_saved(n, 0))) return ts_last_status();
  for (int k = 0; k < n->i[P_COUNT]; k++) {
    ts_tensor *idx = all ? ts_select(all, 0, k) : ts_node_saved(n, k);
    if (!idx) return ts_last_status();
    if (!all) ts_retain(idx);
    p->idx[p->count++] = idx;
  }
  if (p->count) {
    p->ndim = p->idx[0]->ndim;
    for (int d = 0; d < p->ndim; d++) p->shape[d] = p->idx[0]->shape[d];
  }
  return TS_OK;
}

/* An accumulating put of g into zeros: every element g came from gets it, repeats adding up. */
static int index_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  const ts_backend *be = ts_backend_for(g->device);
  if (!be) return ts_last_status();
  ts_tensor *gx = zeros_like_input(n, 0, g);
  if (!gx) return ts_last_status();
  index_plan p;
  int st = saved_plan(n, gx, &p);
  if (!st) st = index_put_planned(be, &p, g, 1);
  release_plan(&p);
  if (!st) st = ts_set_input_grad(n, 0, gx, grads);
  ts_release(gx);
  return st;
}

static ts_tensor *record_index(ts_tensor *a, const index_plan *p, ts_tensor *out) {
  ts_node *n = ts_grad_node("index", index_backward, 1, &a);
  if (n && save_plan(n, p)) {
    ts_node_release(n);
    ts_release(out);
    return NULL;
  }
  return ts_node_finish(n, out);
}

/* a (replacing): g with zeros where the put overwrote a; a (accumulating): g. values: g at the
   positions they went to, summed over the dims they were broadcast in. */
static int index_put_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  const ts_backend *be = ts_backend_for(g->device);
  if (!be) return ts_last_status();
  ts_tensor *ga = NULL, *gv = NULL, *zero = NULL;
  index_plan p;
  int st = TS_OK;
  if (ts_node_needs_grad(n, 0) && n->i[P_ACCUMULATE]) {
    ts_retain(g);
    ga = g;
  } else if (ts_node_needs_grad(n, 0)) {
    ga = ts_clone(g);
    zero = ga ? ts_full(0, NULL, 0, g->dtype, g->device) : NULL;
    st = zero ? saved_plan(n, ga, &p) : ts_last_status();
    if (zero && !st) st = index_put_planned(be, &p, zero, 0);
    if (zero) release_plan(&p);
  }
  if (!st && ts_node_needs_grad(n, 1)) {
    st = saved_plan(n, g, &p);
    if (!st && !(gv = index_planned(be, &p))) st = ts_last_status();
    release_plan(&p);
  }
  if (!st) st = ts_set_input_grad(n, 0, ga, grads);
  if (!st) st = ts_set_input_grad(n, 1, gv, grads);
  ts_release(zero);
  ts_release(ga);
  ts_release(gv);
  return st;
}

/* ---- index and index_put_ -------------------------------------------------------------------- */
ts_tensor *ts_index(ts_tensor *a, int n, ts_tensor *const *indices) {
  const ts_backend *be = TS_BACKEND(a->device, index, "index");
  if (!be) return NULL;
  index_plan p;
  int previous = ts_set_grad_enabled(0);
  ts_tensor *out = plan_indices("index", a, n, indices, &p) ? NULL : index_planned(be, &p);
  ts_set_grad_enabled(previous);
  if (out && ts_any_requires_grad(1, &a)) out = record_index(a, &p, out);
  release_plan(&p);
  return out;
}

static int check_put(const char *op, ts_tensor *a, ts_tensor *values) {
  if (check_in_place(op, a) || ts_same_device(op, a, values)) return ts_last_status();
  if (!can_cast(values->dtype, a->dtype))
    return ts_set_error(TS_ERR_DTYPE, "%s: values of dtype %s can't be cast to the tensor's dtype %s", op,
                        ts_dtype_name(values->dtype), ts_dtype_name(a->dtype));
  return TS_OK;
}

/* index_put_ computed on a copy of a and recorded: the result a takes over. */
static ts_tensor *index_put_recorded(const ts_backend *be, ts_tensor *a, int n, ts_tensor *const *indices,
                                     ts_tensor *values, int accumulate) {
  index_plan p = {0};
  int previous = ts_set_grad_enabled(0);
  ts_tensor *out = ts_clone(a);
  int st = out ? plan_indices("index_put_", out, n, indices, &p) : ts_last_status();
  if (!st) st = index_put_planned(be, &p, values, accumulate);
  ts_set_grad_enabled(previous);
  ts_node *node = st ? NULL : ts_grad_node("index_put", index_put_backward, 2, (ts_tensor *[]){a, values});
  if (node) {
    node->i[P_ACCUMULATE] = accumulate != 0;
    st = save_plan(node, &p);
  }
  release_plan(&p);
  if (st) {
    ts_node_release(node);
    ts_release(out);
    return NULL;
  }
  return ts_node_finish(node, out);
}

int ts_index_put_(ts_tensor *a, int n, ts_tensor *const *indices, ts_tensor *values, int accumulate) {
  if (!values) return ts_set_error(TS_ERR_ARG, "index_put_: values is NULL");
  if (check_put("index_put_", a, values)) return ts_last_status();
  const ts_backend *be = TS_BACKEND(a->device, index_put, "index_put_");
  if (!be) return ts_last_status();
  if (ts_any_requires_grad(2, (ts_tensor *[]){a, values}))
    return ts_rebase_inplace(a, index_put_recorded(be, a, n, indices, values, accumulate));
  index_plan p;
  int previous = ts_set_grad_enabled(0);
  int st = plan_indices("index_put_", a, n, indices, &p);
  if (!st) st = index_put_planned(be, &p, values, accumulate);
  ts_set_grad_enabled(previous);
  release_plan(&p);
  return wrote(a, st);
}

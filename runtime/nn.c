/* nn.c — linear, softmax / log_softmax, dropout and drop_path, and the helpers the nn runtime files
 * (nn.c, norm.c, loss.c) share.
 *
 * Every op here is one fused kernel forward and one backward, recorded as one autograd node: the
 * forward runs with grad mode off (its internal conversions and views must not record anything)
 * and the node is attached to the result afterwards. Kernels compute in the backend's compute
 * dtype (float32 for float16/bfloat16); results and gradients are converted back to the inputs'
 * dtypes. */
#include "autocast.h"
#include "nn.h"

#include <string.h>

/* ---- helpers shared by the nn runtime files -------------------------------------------------- */
ts_tensor *ts_nn_dense(ts_tensor *t, int dtype) {
  ts_tensor *converted = ts_to_dtype(t, dtype);
  if (!converted) return NULL;
  ts_tensor *dense = ts_contiguous(converted);
  ts_release(converted);
  return dense;
}

int ts_nn_check_param(const char *op, const char *what, const ts_tensor *x, const ts_tensor *p, int ndim,
                      const int64_t *shape) {
  if (!p) return TS_OK;
  if (!ts_dtype_is_floating(p->dtype))
    return ts_set_error(TS_ERR_DTYPE, "%s: %s must be a floating-point tensor, got %s", op, what,
                        ts_dtype_name(p->dtype));
  if (ts_same_device(op, x, p)) return ts_last_status();
  if (!ts_shape_equal(p->ndim, p->shape, ndim, shape))
    return ts_set_error(TS_ERR_SHAPE, "%s: %s has shape %s, expected %s for the input %s", op, what, ts_tshape(p),
                        ts_shape_str(ndim, shape), ts_tshape(x));
  return TS_OK;
}

ts_tensor *ts_nn_result(ts_tensor *computed, int dtype, int ndim, const int64_t *shape) {
  if (!computed) return NULL;
  ts_tensor *converted = ts_to_dtype(computed, dtype);
  ts_release(computed);
  if (!converted) return NULL;
  ts_tensor *v = ts_view(converted, ndim, shape);
  ts_release(converted);
  return v;
}

ts_tensor *ts_nn_dense_as(ts_tensor *t, int dtype, int ndim, const int64_t *shape) {
  ts_tensor *dense = ts_nn_dense(t, dtype);
  if (!dense) return NULL;
  ts_tensor *v = ts_view(dense, ndim, shape);
  ts_release(dense);
  return v;
}

int ts_nn_check_floating(const char *op, const char *what, const ts_tensor *t) {
  if (!t) return ts_set_error(TS_ERR_ARG, "%s: %s is NULL", op, what);
  if (!ts_dtype_is_floating(t->dtype))
    return ts_set_error(TS_ERR_DTYPE, "%s: expected a floating-point %s, got %s", op, what, ts_dtype_name(t->dtype));
  return TS_OK;
}

/* ---- linear ---------------------------------------------------------------------------------- */
static int check_linear(const ts_tensor *x, const ts_tensor *w, const ts_tensor *b) {
  const char *op = "linear";
  if (ts_nn_check_floating(op, "input", x) || ts_nn_check_floating(op, "weight", w)) return ts_last_status();
  if (w->dtype != x->dtype || (b && b->dtype != x->dtype))
    return ts_set_error(TS_ERR_DTYPE, "linear: input, weight and bias must share one dtype, got %s, %s and %s",
                        ts_dtype_name(x->dtype), ts_dtype_name(w->dtype), b ? ts_dtype_name(b->dtype) : "no bias");
  if (ts_same_device(op, x, w) || (b && ts_same_device(op, x, b))) return ts_last_status();
  if (x->ndim < 1) return ts_set_error(TS_ERR_SHAPE, "linear: the input must have at least 1 dim, got a 0-d tensor");
  if (w->ndim != 2)
    return ts_set_error(TS_ERR_SHAPE, "linear: weight must be 2-D [out_features, in_features], got %s", ts_tshape(w));
  if (x->shape[x->ndim - 1] != w->shape[1])
    return ts_set_error(TS_ERR_SHAPE, "linear: input %s has %lld features in its last dim, weight %s expects %lld",
                        ts_tshape(x), (long long)x->shape[x->ndim - 1], ts_tshape(w), (long long)w->shape[1]);
  if (b && (b->ndim != 1 || b->shape[0] != w->shape[0]))
    return ts_set_error(TS_ERR_SHAPE, "linear: bias %s must be [%lld], the out_features of weight %s", ts_tshape(b),
                        (long long)w->shape[0], ts_tshape(w));
  return TS_OK;
}

/* t as a [rows, cols] matrix in `dtype` that BLAS reads without a copy: one unit stride and a
   leading dimension that covers the other. A view when t already is one, else a copy. */
static ts_tensor *blas_matrix(ts_tensor *t, int dtype, int64_t rows, int64_t cols) {
  ts_tensor *converted = ts_to_dtype(t, dtype);
  if (!converted) return NULL;
  int64_t shape[2] = {rows, cols};
  ts_tensor *m = ts_reshape(converted, 2, shape);
  ts_release(converted);
  if (!m) return NULL;
  int row_major = m->stride[1] == 1 && m->stride[0] >= cols;
  int col_major = m->stride[0] == 1 && m->stride[1] >= rows;
  if (row_major || col_major) return m;
  ts_tensor *dense = ts_clone(m);
  ts_release(m);
  return dense;
}

static int64_t leading_rows(const ts_tensor *x) { return ts_shape_numel(x->ndim - 1, x->shape); }

static ts_tensor *linear_forward(const ts_backend *be, ts_tensor *x, ts_tensor *w, ts_tensor *b) {
  int compute = be->compute_dtype(x->dtype);
  int64_t m = leading_rows(x), k = w->shape[1], n = w->shape[0];
  ts_tensor *xm = blas_matrix(x, compute, m, k), *wm = blas_matrix(w, compute, n, k);
  ts_tensor *bc = b ? ts_nn_dense(b, compute) : NULL;
  int64_t shape[2] = {m, n};
  ts_tensor *out = xm && wm && (bc || !b) ? ts_empty(2, shape, compute, x->device) : NULL;
  if (out && m * n > 0 && be->linear(out, xm, wm, bc)) {
    ts_release(out);
    out = NULL;
  }
  ts_release(xm);
  ts_release(wm);
  ts_release(bc);
  int64_t out_shape[TS_MAX_DIMS];
  memcpy(out_shape, x->shape, sizeof out_shape);
  out_shape[x->ndim - 1] = n;
  return ts_nn_result(out, x->dtype, x->ndim, out_shape);
}

/* Saved: x (slot 0) when w needs a gradient, w (slot 1) when x does. */
static int linear_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  const ts_edge *ex = ts_node_input(n, 0), *ew = ts_node_input(n, 1);
  int need_x = ts_node_needs_grad(n, 0), need_w = ts_node_needs_grad(n, 1), need_b = ts_node_needs_grad(n, 2);
  ts_tensor *x = need_w ? ts_node_saved(n, 0) : NULL, *w = need_x ? ts_node_saved(n, 1) : NULL;
  if ((need_w && !x) || (need_x && !w)) return ts_last_status();
  const ts_backend *be = TS_NN_BACKEND(g, linear_backward, "linear backward");
  if (!be) return ts_last_status();
  int compute = be->compute_dtype(ex->dtype);
  int64_t m = ts_shape_numel(ex->ndim - 1, ex->shape), k = ew->shape[1], nout = ew->shape[0];
  int64_t g_shape[2] = {m, nout}, x_shape[2] = {m, k};
  ts_tensor *gm = ts_nn_dense_as(g, compute, 2, g_shape);
  ts_tensor *xm = x ? blas_matrix(x, compute, m, k) : NULL, *wm = w ? blas_matrix(w, compute, nout, k) : NULL;
  ts_tensor *gx = need_x ? ts_empty(2, x_shape, compute, g->device) : NULL;
  ts_tensor *gw = need_w ? ts_empty(2, ew->shape, compute, g->device) : NULL;
  ts_tensor *gb = need_b ? ts_empty(1, &nout, compute, g->device) : NULL;
  int st = gm && (xm || !x) && (wm || !w) && (gx || !need_x) && (gw || !need_w) && (gb || !need_b)
               ? be->linear_backward(gx, gw, gb, gm, xm, wm)
               : ts_last_status();
  if (!st) st = ts_set_input_grad_as(n, 0, gx, ex->ndim, ex->shape, grads);
  if (!st) st = ts_set_input_grad(n, 1, gw, grads);
  if (!st) st = ts_set_input_grad(n, 2, gb, grads);
  ts_tensor *temps[] = {gm, xm, wm, gx, gw, gb};
  for (size_t i = 0; i < sizeof temps / sizeof *temps; i++) ts_release(temps[i]);
  return st;
}

ts_tensor *ts_linear(ts_tensor *x, ts_tensor *w, ts_tensor *b) {
  ts_tensor *in[3] = {x, w, b}, *cast[3];
  if (ts_autocast_needed(TS_AUTOCAST_LOW, 3, in)) { /* mixed precision: one 16-bit GEMM */
    if (ts_autocast_cast(TS_AUTOCAST_LOW, 3, in, cast)) return NULL;
    ts_tensor *out = ts_linear(cast[0], cast[1], cast[2]);
    ts_autocast_release(3, cast);
    return out;
  }
  if (check_linear(x, w, b)) return NULL;
  const ts_backend *be = TS_NN_BACKEND(x, linear, "linear");
  if (!be) return NULL;
  int previous = ts_set_grad_enabled(0);
  ts_tensor *out = linear_forward(be, x, w, b);
  ts_set_grad_enabled(previous);
  if (!out) return NULL;
  ts_node *n = ts_grad_node("linear", linear_backward, 3, (ts_tensor *[]){x, w, b});
  if (!n) return out;
  ts_tensor *save[2] = {ts_node_needs_grad(n, 1) ? x : NULL, ts_node_needs_grad(n, 0) ? w : NULL};
  return ts_node_finish_saving(n, out, 2, save);
}

/* ---- softmax and log_softmax ----------------------------------------------------------------- */
/* The [A, D, B] split of x around dim: A = dims before, D = dim, B = dims after. */
static void split_at(const ts_tensor *x, int dim, int64_t *a, int64_t *d, int64_t *b) {
  *a = ts_shape_numel(dim, x->shape);
  *d = x->ndim ? x->shape[dim] : 1;
  *b = x->ndim ? ts_shape_numel(x->ndim - dim - 1, x->shape + dim + 1) : 1;
}

enum { SM_A, SM_D, SM_B, SM_LOG }; /* node parameters */

static int softmax_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  ts_tensor *y = ts_node_saved(n, 0);
  if (!y) return ts_last_status();
  const ts_backend *be = TS_NN_BACKEND(y, softmax_backward, n->name);
  if (!be) return ts_last_status();
  int compute = be->compute_dtype(y->dtype);
  int64_t shape[3] = {n->i[SM_A], n->i[SM_D], n->i[SM_B]};
  ts_tensor *gc = ts_nn_dense_as(g, compute, 3, shape), *yc = ts_nn_dense_as(y, compute, 3, shape);
  ts_tensor *gx = gc && yc ? ts_empty(3, shape, compute, y->device) : NULL;
  int st = gx ? be->softmax_backward(gx, gc, yc, (int)n->i[SM_LOG]) : ts_last_status();
  ts_tensor *shaped = st ? NULL : ts_view(gx, y->ndim, y->shape);
  if (!st) st = shaped ? ts_set_input_grad(n, 0, shaped, grads) : ts_last_status();
  ts_release(gc);
  ts_release(yc);
  ts_release(gx);
  ts_release(shaped);
  return st;
}

static ts_tensor *softmax_forward(const ts_backend *be, ts_tensor *x, const int64_t *shape, int log) {
  int compute = be->compute_dtype(x->dtype);
  ts_tensor *xc = ts_nn_dense_as(x, compute, 3, shape);
  ts_tensor *out = xc ? ts_empty(3, shape, compute, x->device) : NULL;
  if (out && ts_numel(out) > 0 && be->softmax(out, xc, log)) {
    ts_release(out);
    out = NULL;
  }
  ts_release(xc);
  return ts_nn_result(out, x->dtype, x->ndim, x->shape);
}

static ts_tensor *softmax_op(const char *op, ts_tensor *x, int dim, int log) {
  if (ts_autocast_needed(TS_AUTOCAST_FLOAT32, 1, &x)) { /* mixed precision: in float32 */
    ts_tensor *up;
    if (ts_autocast_cast(TS_AUTOCAST_FLOAT32, 1, &x, &up)) return NULL;
    ts_tensor *out = softmax_op(op, up, dim, log);
    ts_autocast_release(1, &up);
    return out;
  }
  if (ts_nn_check_floating(op, "input", x)) return NULL;
  int d;
  if (ts_wrap_dim(op, dim, x->ndim, &d)) return NULL;
  const ts_backend *be = TS_NN_BACKEND(x, softmax, op);
  if (!be) return NULL;
  int64_t shape[3];
  split_at(x, d, &shape[0], &shape[1], &shape[2]);
  int previous = ts_set_grad_enabled(0);
  ts_tensor *out = softmax_forward(be, x, shape, log);
  ts_set_grad_enabled(previous);
  if (!out) return NULL;
  ts_node *n = ts_grad_node(op, softmax_backward, 1, &x);
  if (!n) return out;
  n->i[SM_A] = shape[0];
  n->i[SM_D] = shape[1];
  n->i[SM_B] = shape[2];
  n->i[SM_LOG] = log;
  return ts_node_finish_saving(n, out, 1, &out); /* both derivatives are written with the output alone */
}

ts_tensor *ts_softmax(ts_tensor *x, int dim) { return softmax_op("softmax", x, dim, 0); }
ts_tensor *ts_log_softmax(ts_tensor *x, int dim) { return softmax_op("log_softmax", x, dim, 1); }

/* ---- dropout and drop_path ------------------------------------------------------------------- */
/* x * mask * scale in x's dtype, the bool mask broadcast to x's shape. */
static ts_tensor *masked_scale(const ts_backend *be, ts_tensor *x, ts_tensor *mask, double scale) {
  int compute = be->compute_dtype(x->dtype);
  ts_tensor *xc = ts_to_dtype(x, compute), *m = ts_expand(mask, x->ndim, x->shape);
  ts_tensor *out = xc && m ? ts_empty(x->ndim, x->shape, compute, x->device) : NULL;
  if (out && ts_numel(out) > 0 && be->masked_scale(out, xc, m, scale)) {
    ts_release(out);
    out = NULL;
  }
  ts_release(xc);
  ts_release(m);
  return ts_nn_result(out, x->dtype, x->ndim, x->shape);
}

static int masked_scale_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  ts_tensor *mask = ts_node_saved(n, 0);
  if (!mask) return ts_last_status();
  const ts_backend *be = TS_NN_BACKEND(g, masked_scale, n->name);
  if (!be) return ts_last_status();
  ts_tensor *gx = masked_scale(be, g, mask, n->d[0]);
  int st = gx ? ts_set_input_grad(n, 0, gx, grads) : ts_last_status();
  ts_release(gx);
  return st;
}

static int check_drop(const char *op, const ts_tensor *x, double p) {
  if (ts_nn_check_floating(op, "input", x)) return ts_last_status();
  if (!(p >= 0 && p <= 1)) return ts_set_error(TS_ERR_ARG, "%s: p must be in [0, 1], got %g", op, p);
  return TS_OK;
}

/* Draws a keep mask of mask_shape (1 with probability 1 - p) and returns x * mask * scale,
   recorded as `op` with the mask saved. */
static ts_tensor *drop(const char *op, ts_tensor *x, int ndim, const int64_t *mask_shape, double p, double scale,
                       ts_generator *g) {
  const ts_backend *be = TS_NN_BACKEND(x, masked_scale, op);
  if (!be) return NULL;
  int previous = ts_set_grad_enabled(0);
  ts_draw_mark mark = ts_draw_mark_of(g);
  ts_tensor *mask = ts_empty(ndim, mask_shape, TS_BOOL, x->device), *out = NULL;
  if (mask && ts_bernoulli_(mask, 1.0 - p, g) == TS_OK) out = masked_scale(be, x, mask, scale);
  ts_set_grad_enabled(previous);
  ts_node *n = out ? ts_grad_node(op, masked_scale_backward, 1, &x) : NULL;
  if (n) n->d[0] = scale;
  out = ts_node_finish_saving(n, out, 1, &mask);
  ts_release(mask);
  if (!out) ts_draw_rewind(&mark);
  return out;
}

ts_tensor *ts_dropout(ts_tensor *x, double p, int training, ts_generator *g) {
  if (check_drop("dropout", x, p)) return NULL;
  if (p == 0 || !training) {
    ts_retain(x);
    return x;
  }
  return drop("dropout", x, x->ndim, x->shape, p, p < 1 ? 1.0 / (1.0 - p) : 0.0, g);
}

ts_tensor *ts_drop_path(ts_tensor *x, double p, int training, int scale_by_keep, ts_generator *g) {
  if (check_drop("drop_path", x, p)) return NULL;
  if (x->ndim < 1)
    return TS_FAIL_NULL(TS_ERR_SHAPE, "drop_path: expected a batch of samples along dim 0, got a 0-d tensor");
  if (p == 0 || !training) {
    ts_retain(x);
    return x;
  }
  int64_t mask_shape[TS_MAX_DIMS];
  for (int d = 0; d < x->ndim; d++) mask_shape[d] = d == 0 ? x->shape[0] : 1;
  double keep = 1.0 - p;
  return drop("drop_path", x, x->ndim, mask_shape, p, scale_by_keep && keep > 0 ? 1.0 / keep : 1.0, g);
}

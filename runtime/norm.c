/* norm.c — layer_norm, batch_norm and group_norm: argument checks, the kernel layouts, running
 * statistics, and one autograd node per call with a fused backward kernel.
 *
 * Layouts the kernels see (contiguous, compute dtype):
 *   layer norm  [M, N]     M rows (the leading dims) of N normalized values (the trailing dims)
 *   batch norm  [N, C, S]  statistics per channel over N and S (S: the spatial dims, 1 if none)
 *   group norm  [N, C, S]  statistics per sample and group of C/G channels
 * Layer and group norm keep their statistics in float32 (float64 for float64 inputs), also where
 * the backend computes float16/bfloat16 natively (CUDA): rounding mean and rstd to 16 bits would
 * shift every normalized value of a row. Batch norm keeps them in the compute dtype. They are saved
 * for the backward, which differentiates x, w and b in one pass (two for batch norm in training: the
 * per-channel sums must be complete before any input gradient). */
#include "autocast.h"
#include "nn.h"

#include <math.h>
#include <string.h>

typedef enum { NORM_LAYER, NORM_BATCH, NORM_GROUP } norm_kind;
enum { P_KIND, P_NDIM, P_D0, P_D1, P_D2, P_HAS_W, P_TRAINING }; /* node parameters */

static const char *const norm_names[] = {"layer_norm", "batch_norm", "group_norm"};

static int check_eps(const char *op, double eps) {
  if (!(eps >= 0) || !isfinite(eps))
    return ts_set_error(TS_ERR_ARG, "%s: eps must be a non-negative finite number, got %g", op, eps);
  return TS_OK;
}

/* Checks x [N, C, ...] and returns C, or -1 with the error set. */
static int64_t channels_of(const char *op, const ts_tensor *x) {
  if (ts_nn_check_floating(op, "input", x)) return -1;
  if (x->ndim < 2) {
    ts_set_error(TS_ERR_SHAPE, "%s: expected an input [N, C, ...] with at least 2 dims, got %s", op, ts_tshape(x));
    return -1;
  }
  return x->shape[1];
}

static void channel_layout(const ts_tensor *x, int64_t *layout) {
  layout[0] = x->shape[0];
  layout[1] = x->shape[1];
  layout[2] = ts_shape_numel(x->ndim - 2, x->shape + 2);
}

/* ---- backward, shared ------------------------------------------------------------------------ */
static const ts_backend *backward_backend(const ts_tensor *t, int kind) {
  switch (kind) {
  case NORM_LAYER: return TS_NN_BACKEND(t, layer_norm_backward, "layer_norm backward");
  case NORM_BATCH: return TS_NN_BACKEND(t, batch_norm_backward, "batch_norm backward");
  default: return TS_NN_BACKEND(t, group_norm_backward, "group_norm backward");
  }
}

static int run_backward(const ts_backend *be, const ts_node *n, ts_tensor *gx, ts_tensor *gw, ts_tensor *gb,
                        ts_tensor *g, ts_tensor *x, ts_tensor *w, ts_tensor *mean, ts_tensor *rstd) {
  switch (n->i[P_KIND]) {
  case NORM_LAYER: return be->layer_norm_backward(gx, gw, gb, g, x, w, mean, rstd);
  case NORM_BATCH: return be->batch_norm_backward(gx, gw, gb, g, x, w, mean, rstd, (int)n->i[P_TRAINING]);
  default: return be->group_norm_backward(gx, gw, gb, g, x, w, mean, rstd);
  }
}

/* An empty compute-dtype tensor shaped like input k of n when it needs a gradient, else NULL. */
static ts_tensor *grad_buffer(ts_node *n, int k, int ndim, const int64_t *shape, int dtype, int *failed) {
  if (!ts_node_needs_grad(n, k)) return NULL;
  ts_tensor *t = ts_empty(ndim, shape, dtype, ts_node_input(n, k)->device);
  if (!t) *failed = 1;
  return t;
}

/* Saved: x, w (NULL when absent), mean, rstd. */
static int norm_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  int has_w = (int)n->i[P_HAS_W];
  ts_tensor *x = ts_node_saved(n, 0), *w = has_w ? ts_node_saved(n, 1) : NULL;
  ts_tensor *mean = ts_node_saved(n, 2), *rstd = ts_node_saved(n, 3);
  if (!x || !mean || !rstd || (has_w && !w)) return ts_last_status();
  const ts_backend *be = backward_backend(x, (int)n->i[P_KIND]);
  if (!be) return ts_last_status();
  int compute = be->compute_dtype(x->dtype), nd = (int)n->i[P_NDIM], failed = 0;
  const int64_t layout[3] = {n->i[P_D0], n->i[P_D1], n->i[P_D2]};
  const ts_edge *ex = ts_node_input(n, 0), *ew = ts_node_input(n, 1), *eb = ts_node_input(n, 2);
  ts_tensor *xc = ts_nn_dense_as(x, compute, nd, layout), *gc = ts_nn_dense_as(g, compute, nd, layout);
  ts_tensor *wc = w ? ts_nn_dense(w, compute) : NULL;
  ts_tensor *gx = grad_buffer(n, 0, nd, layout, compute, &failed);
  ts_tensor *gw = grad_buffer(n, 1, ew->ndim, ew->shape, compute, &failed);
  ts_tensor *gb = grad_buffer(n, 2, eb->ndim, eb->shape, compute, &failed);
  int ready = xc && gc && (wc || !w) && !failed;
  int st = ready ? run_backward(be, n, gx, gw, gb, gc, xc, wc, mean, rstd) : ts_last_status();
  if (!st) st = ts_set_input_grad_as(n, 0, gx, ex->ndim, ex->shape, grads);
  if (!st) st = ts_set_input_grad(n, 1, gw, grads);
  if (!st) st = ts_set_input_grad(n, 2, gb, grads);
  ts_tensor *temps[] = {xc, gc, wc, gx, gw, gb};
  for (size_t i = 0; i < sizeof temps / sizeof *temps; i++) ts_release(temps[i]);
  return st;
}

/* Records the node for out and drops the caller's references to mean and rstd. */
static ts_tensor *record_norm(int kind, ts_tensor *x, ts_tensor *w, ts_tensor *b, ts_tensor *out, ts_tensor *mean,
                              ts_tensor *rstd, int nd, const int64_t *layout, int training) {
  ts_node *n = out ? ts_grad_node(norm_names[kind], norm_backward, 3, (ts_tensor *[]){x, w, b}) : NULL;
  if (n) {
    n->i[P_KIND] = kind;
    n->i[P_NDIM] = nd;
    for (int d = 0; d < 3; d++) n->i[P_D0 + d] = d < nd ? layout[d] : 1;
    n->i[P_HAS_W] = w != NULL;
    n->i[P_TRAINING] = training;
  }
  ts_tensor *save[4] = {x, w, mean, rstd};
  out = ts_node_finish_saving(n, out, 4, save);
  ts_release(mean);
  ts_release(rstd);
  return out;
}

/* ---- layer norm and group norm: one kernel computes statistics and output -------------------- */
typedef struct {
  int kind, nd, stats_nd;
  int64_t layout[3], stats_shape[2];
} norm_plan;

/* The dtype of layer and group norm statistics for a compute dtype: the kernels' accumulation type. */
static int stats_dtype(int compute) { return compute == TS_F64 ? TS_F64 : TS_F32; }

/* Runs the forward kernel of plan; on success *mean and *rstd hold the statistics. */
static ts_tensor *normalize(const ts_backend *be, const norm_plan *p, ts_tensor *x, ts_tensor *w, ts_tensor *b,
                            double eps, ts_tensor **mean, ts_tensor **rstd) {
  int compute = be->compute_dtype(x->dtype), stats = stats_dtype(compute);
  ts_tensor *xc = ts_nn_dense_as(x, compute, p->nd, p->layout);
  ts_tensor *wc = w ? ts_nn_dense(w, compute) : NULL, *bc = b ? ts_nn_dense(b, compute) : NULL;
  ts_tensor *out = ts_empty(p->nd, p->layout, compute, x->device);
  *mean = ts_empty(p->stats_nd, p->stats_shape, stats, x->device);
  *rstd = ts_empty(p->stats_nd, p->stats_shape, stats, x->device);
  int st = xc && (wc || !w) && (bc || !b) && out && *mean && *rstd ? TS_OK : ts_last_status();
  if (!st)
    st = p->kind == NORM_LAYER ? be->layer_norm(out, *mean, *rstd, xc, wc, bc, eps)
                               : be->group_norm(out, *mean, *rstd, xc, wc, bc, eps);
  ts_release(xc);
  ts_release(wc);
  ts_release(bc);
  if (st) {
    ts_release(out);
    ts_release(*mean);
    ts_release(*rstd);
    *mean = *rstd = NULL;
    return NULL;
  }
  return ts_nn_result(out, x->dtype, x->ndim, x->shape);
}

static ts_tensor *normalize_recorded(const ts_backend *be, const norm_plan *p, ts_tensor *x, ts_tensor *w,
                                     ts_tensor *b, double eps) {
  ts_tensor *mean = NULL, *rstd = NULL;
  int previous = ts_set_grad_enabled(0);
  ts_tensor *out = normalize(be, p, x, w, b, eps, &mean, &rstd);
  ts_set_grad_enabled(previous);
  return record_norm(p->kind, x, w, b, out, mean, rstd, p->nd, p->layout, 0);
}

ts_tensor *ts_layer_norm(ts_tensor *x, int nnorm, ts_tensor *w, ts_tensor *b, double eps) {
  ts_tensor *in[3] = {x, w, b}, *cast[3];
  if (ts_autocast_needed(TS_AUTOCAST_FLOAT32, 3, in)) { /* mixed precision: in float32 */
    if (ts_autocast_cast(TS_AUTOCAST_FLOAT32, 3, in, cast)) return NULL;
    ts_tensor *out = ts_layer_norm(cast[0], nnorm, cast[1], cast[2], eps);
    ts_autocast_release(3, cast);
    return out;
  }
  const char *op = "layer_norm";
  if (ts_nn_check_floating(op, "input", x)) return NULL;
  if (nnorm < 1 || nnorm > x->ndim)
    return TS_FAIL_NULL(TS_ERR_SHAPE, "layer_norm: normalized_shape must cover 1 to %d trailing dims of the input %s, "
                        "got %d dims", x->ndim, ts_tshape(x), nnorm);
  int lead = x->ndim - nnorm;
  if (ts_nn_check_param(op, "weight", x, w, nnorm, x->shape + lead) ||
      ts_nn_check_param(op, "bias", x, b, nnorm, x->shape + lead) || check_eps(op, eps))
    return NULL;
  const ts_backend *be = TS_NN_BACKEND(x, layer_norm, op);
  if (!be) return NULL;
  int64_t rows = ts_shape_numel(lead, x->shape);
  norm_plan p = {NORM_LAYER, 2, 1, {rows, ts_shape_numel(nnorm, x->shape + lead), 1}, {rows, 1}};
  return normalize_recorded(be, &p, x, w, b, eps);
}

ts_tensor *ts_group_norm(ts_tensor *x, int64_t groups, ts_tensor *w, ts_tensor *b, double eps) {
  ts_tensor *in[3] = {x, w, b}, *cast[3];
  if (ts_autocast_needed(TS_AUTOCAST_FLOAT32, 3, in)) { /* mixed precision: in float32 */
    if (ts_autocast_cast(TS_AUTOCAST_FLOAT32, 3, in, cast)) return NULL;
    ts_tensor *out = ts_group_norm(cast[0], groups, cast[1], cast[2], eps);
    ts_autocast_release(3, cast);
    return out;
  }
  const char *op = "group_norm";
  int64_t c = channels_of(op, x);
  if (c < 0) return NULL;
  if (groups <= 0 || c % groups != 0)
    return TS_FAIL_NULL(TS_ERR_ARG, "group_norm: the %lld channels of the input %s cannot be split into %lld groups",
                        (long long)c, ts_tshape(x), (long long)groups);
  if (ts_nn_check_param(op, "weight", x, w, 1, &c) || ts_nn_check_param(op, "bias", x, b, 1, &c) || check_eps(op, eps))
    return NULL;
  const ts_backend *be = TS_NN_BACKEND(x, group_norm, op);
  if (!be) return NULL;
  norm_plan p = {NORM_GROUP, 3, 2, {0}, {x->shape[0], groups}};
  channel_layout(x, p.layout);
  return normalize_recorded(be, &p, x, w, b, eps);
}

/* ---- batch norm ------------------------------------------------------------------------------ */
/* running = (1 - momentum) running + momentum * factor * stat, in place in the buffer's dtype. */
static int update_running(ts_tensor *running, ts_tensor *stat, double momentum, double factor) {
  ts_tensor *step = ts_binary_scalar(TS_MUL, stat, momentum * factor, 0);
  int st = step ? ts_binary_scalar_(TS_MUL, running, 1.0 - momentum) : ts_last_status();
  if (!st) st = ts_binary_(TS_ADD, running, step);
  ts_release(step);
  return st;
}

/* A private compute-dtype copy of a running statistic: the buffer itself may change in place
   (the next training step) before this call's backward reads what it saved. */
static ts_tensor *snapshot(ts_tensor *running, int dtype) {
  ts_tensor *dense = ts_nn_dense(running, dtype);
  if (!dense || !ts_shares_storage(dense, running)) return dense;
  ts_tensor *copy = ts_clone(dense);
  ts_release(dense);
  return copy;
}

/* The statistics to normalize with: the batch's (updating the running ones) or the running ones. */
static int batch_statistics(const ts_backend *be, ts_tensor *xc, ts_tensor *rm, ts_tensor *rv, int training,
                            double momentum, ts_tensor **mean, ts_tensor **var) {
  int64_t c = xc->shape[1];
  if (!training) {
    *mean = snapshot(rm, xc->dtype);
    *var = *mean ? snapshot(rv, xc->dtype) : NULL;
    return *var ? TS_OK : ts_last_status();
  }
  *mean = ts_empty(1, &c, xc->dtype, xc->device);
  *var = *mean ? ts_empty(1, &c, xc->dtype, xc->device) : NULL;
  int st = *var ? be->batch_norm_stats(*mean, *var, xc) : ts_last_status();
  if (!st && rm) {
    double count = (double)(xc->shape[0] * xc->shape[2]);
    st = update_running(rm, *mean, momentum, 1.0);
    if (!st) st = update_running(rv, *var, momentum, count / (count - 1)); /* the unbiased variance */
  }
  return st;
}

static ts_tensor *batch_normalize(const ts_backend *be, ts_tensor *x, ts_tensor *rm, ts_tensor *rv, ts_tensor *w,
                                  ts_tensor *b, int training, double momentum, double eps, const int64_t *layout,
                                  ts_tensor **mean, ts_tensor **rstd) {
  int compute = be->compute_dtype(x->dtype);
  ts_tensor *xc = ts_nn_dense_as(x, compute, 3, layout), *var = NULL, *shifted = NULL, *out = NULL;
  ts_tensor *wc = w ? ts_nn_dense(w, compute) : NULL, *bc = b ? ts_nn_dense(b, compute) : NULL;
  int st = xc && (wc || !w) && (bc || !b) ? batch_statistics(be, xc, rm, rv, training, momentum, mean, &var)
                                          : ts_last_status();
  if (!st) shifted = ts_binary_scalar(TS_ADD, var, eps, 0);
  if (shifted) *rstd = ts_unary(TS_RSQRT, shifted);
  if (*rstd) out = ts_empty(3, layout, compute, x->device);
  st = out ? be->batch_norm_apply(out, xc, *mean, *rstd, wc, bc) : ts_last_status();
  ts_tensor *temps[] = {xc, var, shifted, wc, bc};
  for (size_t i = 0; i < sizeof temps / sizeof *temps; i++) ts_release(temps[i]);
  if (st) {
    ts_release(out);
    ts_release(*mean);
    ts_release(*rstd);
    *mean = *rstd = NULL;
    return NULL;
  }
  return ts_nn_result(out, x->dtype, x->ndim, x->shape);
}

static int check_batch_norm(const ts_tensor *x, int64_t c, ts_tensor *rm, ts_tensor *rv, const ts_tensor *w,
                            const ts_tensor *b, int training, double momentum, double eps) {
  const char *op = "batch_norm";
  if (ts_nn_check_param(op, "weight", x, w, 1, &c) || ts_nn_check_param(op, "bias", x, b, 1, &c) ||
      ts_nn_check_param(op, "running_mean", x, rm, 1, &c) || ts_nn_check_param(op, "running_var", x, rv, 1, &c) ||
      check_eps(op, eps))
    return ts_last_status();
  if (!rm != !rv) return ts_set_error(TS_ERR_ARG, "batch_norm: running_mean and running_var must be given together");
  if (!training && !rm)
    return ts_set_error(TS_ERR_ARG, "batch_norm: evaluation (training = false) normalizes with running_mean and "
                        "running_var, which were not given");
  if (!training) return TS_OK;
  if (ts_numel(x) / (c > 0 ? c : 1) <= 1)
    return ts_set_error(TS_ERR_ARG, "batch_norm: expected more than 1 value per channel when training, got input %s",
                        ts_tshape(x));
  if (!isfinite(momentum)) return ts_set_error(TS_ERR_ARG, "batch_norm: momentum must be finite, got %g", momentum);
  if (rm && (ts_check_inplace(op, rm) || ts_check_inplace(op, rv))) return ts_last_status();
  if (rm && (ts_has_internal_overlap(rm) || ts_has_internal_overlap(rv)))
    return ts_set_error(TS_ERR_ARG, "batch_norm: the running statistics are broadcast views; they must be writable");
  return TS_OK;
}

ts_tensor *ts_batch_norm(ts_tensor *x, ts_tensor *running_mean, ts_tensor *running_var, ts_tensor *w, ts_tensor *b,
                         int training, double momentum, double eps) {
  /* mixed precision: x, w and b in float32; the running statistics, updated in place, keep theirs */
  ts_tensor *in[3] = {x, w, b}, *cast[3];
  if (ts_autocast_needed(TS_AUTOCAST_FLOAT32, 3, in)) {
    if (ts_autocast_cast(TS_AUTOCAST_FLOAT32, 3, in, cast)) return NULL;
    ts_tensor *out = ts_batch_norm(cast[0], running_mean, running_var, cast[1], cast[2], training, momentum, eps);
    ts_autocast_release(3, cast);
    return out;
  }
  const char *op = "batch_norm";
  int64_t c = channels_of(op, x);
  if (c < 0 || check_batch_norm(x, c, running_mean, running_var, w, b, training, momentum, eps)) return NULL;
  const ts_backend *be = TS_NN_BACKEND(x, batch_norm_apply, op);
  if (!be || (training && !TS_NN_BACKEND(x, batch_norm_stats, op))) return NULL;
  int64_t layout[3];
  channel_layout(x, layout);
  ts_tensor *mean = NULL, *rstd = NULL;
  int previous = ts_set_grad_enabled(0);
  ts_tensor *out = batch_normalize(be, x, running_mean, running_var, w, b, training != 0, momentum, eps, layout, &mean,
                                   &rstd);
  ts_set_grad_enabled(previous);
  return record_norm(NORM_BATCH, x, w, b, out, mean, rstd, 3, layout, training != 0);
}

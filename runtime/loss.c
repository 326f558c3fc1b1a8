/* loss.c — cross_entropy and the elementwise regression losses (mse, l1, smooth_l1): argument
 * checks, reductions and autograd, each a fused forward kernel and a fused backward kernel.
 *
 * cross_entropy follows torch.nn.functional.cross_entropy: logits [N, C, d1, ...] ([N, C], or [C]
 * for one sample) and either int64 class indices [N, d1, ...] or class probabilities shaped like
 * the logits. The kernel sees logits as [N, C, S] (S = d1 * ...), computes the log-softmax and the
 * loss per position in one pass, and saves only the log-sum-exp per position: the backward
 * recomputes the softmax from the logits (llm.c style), so no [N, C, S] intermediate is kept. */
#include "autocast.h"
#include "nn.h"

#include <math.h>
#include <string.h>

static int check_reduction(const char *op, int reduction) {
  if (reduction < TS_REDUCTION_NONE || reduction > TS_REDUCTION_SUM)
    return ts_set_error(TS_ERR_ARG, "%s: invalid reduction %d (TS_REDUCTION_NONE, _MEAN or _SUM)", op, reduction);
  return TS_OK;
}

/* loss (compute dtype) reduced as asked: a 0-d sum or sum / divisor, or as is. Consumes loss. */
static ts_tensor *reduce_loss(ts_tensor *loss, int reduction, double divisor) {
  if (!loss || reduction == TS_REDUCTION_NONE) return loss;
  ts_tensor *sum = ts_reduce(TS_SUM, loss, 0, NULL, 0);
  ts_release(loss);
  if (!sum || reduction == TS_REDUCTION_SUM) return sum;
  ts_tensor *mean = ts_binary_scalar(TS_DIV, sum, divisor, 0); /* 0 / 0 = nan, as PyTorch's empty mean */
  ts_release(sum);
  return mean;
}

/* The backward's gradient per element of `shape`: g itself (reduction none), or the 0-d g (divided
   by divisor for mean) broadcast as a stride-0 view. In `dtype`. */
static ts_tensor *spread_grad(ts_tensor *g, int reduction, double divisor, int dtype, int ndim, const int64_t *shape) {
  if (reduction == TS_REDUCTION_NONE) return ts_nn_dense_as(g, dtype, ndim, shape);
  ts_tensor *scalar = ts_to_dtype(g, dtype);
  if (scalar && reduction == TS_REDUCTION_MEAN) {
    ts_tensor *scaled = ts_binary_scalar(TS_DIV, scalar, divisor, 0);
    ts_release(scalar);
    scalar = scaled;
  }
  if (!scalar) return NULL;
  int64_t ones[TS_MAX_DIMS] = {1, 1, 1, 1, 1, 1, 1, 1};
  ts_tensor *v = ts_view(scalar, ndim, ones);
  ts_release(scalar);
  ts_tensor *spread = v ? ts_expand(v, ndim, shape) : NULL;
  ts_release(v);
  return spread;
}

/* ---- cross entropy --------------------------------------------------------------------------- */
enum { CE_N, CE_C, CE_S, CE_IGNORE, CE_REDUCTION, CE_SOFT, CE_HAS_WEIGHT }; /* node parameters */
enum { CE_SMOOTHING, CE_DIVISOR };

typedef struct {
  int64_t n, c, s;
  int soft;
  int out_ndim;                    /* reduction none: the loss has the class-index target's shape */
  int64_t out_shape[TS_MAX_DIMS];
} ce_layout;

static int ce_shapes(const ts_tensor *logits, const ts_tensor *target, ce_layout *l) {
  int batched = logits->ndim >= 2;
  l->c = batched ? logits->shape[1] : logits->shape[0];
  l->n = batched ? logits->shape[0] : 1;
  l->s = batched ? ts_shape_numel(logits->ndim - 2, logits->shape + 2) : 1;
  l->out_ndim = logits->ndim - 1;
  for (int d = 0, k = 0; d < logits->ndim; d++)
    if (d != (batched ? 1 : 0)) l->out_shape[k++] = logits->shape[d];
  if (l->soft ? ts_shape_equal(target->ndim, target->shape, logits->ndim, logits->shape)
              : ts_shape_equal(target->ndim, target->shape, l->out_ndim, l->out_shape))
    return TS_OK;
  return ts_set_error(TS_ERR_SHAPE, "cross_entropy: %s target %s does not match the logits %s (expected %s)",
                      l->soft ? "a probability" : "a class-index", ts_tshape(target), ts_tshape(logits),
                      l->soft ? ts_tshape(logits) : ts_shape_str(l->out_ndim, l->out_shape));
}

static int check_cross_entropy(const ts_tensor *logits, const ts_tensor *target, const ts_tensor *weight,
                               double smoothing, int reduction, ce_layout *l) {
  const char *op = "cross_entropy";
  if (ts_nn_check_floating(op, "input (logits)", logits) || check_reduction(op, reduction)) return ts_last_status();
  if (!target) return ts_set_error(TS_ERR_ARG, "cross_entropy: target is NULL");
  if (logits->ndim < 1)
    return ts_set_error(TS_ERR_SHAPE, "cross_entropy: logits must have a class dim, got a 0-d tensor");
  if (target->dtype != TS_I64 && !ts_dtype_is_floating(target->dtype))
    return ts_set_error(TS_ERR_DTYPE, "cross_entropy: target must be int64 class indices or floating-point class "
                        "probabilities, got %s", ts_dtype_name(target->dtype));
  if (ts_same_device(op, logits, target)) return ts_last_status();
  if (!(smoothing >= 0 && smoothing <= 1))
    return ts_set_error(TS_ERR_ARG, "cross_entropy: label_smoothing must be in [0, 1], got %g", smoothing);
  l->soft = target->dtype != TS_I64;
  if (ce_shapes(logits, target, l)) return ts_last_status();
  return ts_nn_check_param(op, "weight", logits, weight, 1, &l->c);
}

/* Every class index is in [0, C) or equals ignore_index; otherwise names the first that is not. */
static int check_class_indices(ts_tensor *target, int64_t c, int64_t ignore_index) {
  if (ts_numel(target) == 0) return TS_OK;
  ts_tensor *valid = ts_binary_scalar(TS_NE, target, (double)ignore_index, 0);
  ts_tensor *low = ts_binary_scalar(TS_LT, target, 0, 0), *high = ts_binary_scalar(TS_GE, target, (double)c, 0);
  ts_tensor *outside = low && high ? ts_binary(TS_LOGICAL_OR, low, high) : NULL;
  ts_tensor *bad = valid && outside ? ts_binary(TS_LOGICAL_AND, valid, outside) : NULL;
  ts_tensor *offenders = bad ? ts_masked_select(target, bad) : NULL;
  int st = offenders ? TS_OK : ts_last_status();
  if (!st && ts_numel(offenders) > 0) {
    int64_t first = 0;
    ts_tensor *head = ts_narrow(offenders, 0, 0, 1);
    st = head ? ts_to_host(head, &first, sizeof first) : ts_last_status();
    ts_release(head);
    if (!st)
      st = ts_set_error(TS_ERR_INDEX, "cross_entropy: target %lld is out of bounds for %lld classes (valid: 0 to %lld, "
                        "or ignore_index %lld)", (long long)first, (long long)c, (long long)c - 1,
                        (long long)ignore_index);
  }
  ts_tensor *temps[] = {valid, low, high, outside, bad, offenders};
  for (size_t i = 0; i < sizeof temps / sizeof *temps; i++) ts_release(temps[i]);
  return st;
}

/* The kernel's operands: logits [N,C,S], target [N,S] (int64) or [N,C,S], weight [C]. */
typedef struct { ts_tensor *logits, *target, *weight; } ce_operands;

static int ce_prepare(const ce_layout *l, int compute, ts_tensor *logits, ts_tensor *target, ts_tensor *weight,
                      ce_operands *o) {
  int64_t full[3] = {l->n, l->c, l->s}, positions[2] = {l->n, l->s};
  o->logits = ts_nn_dense_as(logits, compute, 3, full);
  o->target = l->soft ? ts_nn_dense_as(target, compute, 3, full) : ts_nn_dense_as(target, TS_I64, 2, positions);
  o->weight = weight ? ts_nn_dense(weight, compute) : NULL;
  return o->logits && o->target && (o->weight || !weight) ? TS_OK : ts_last_status();
}

static void ce_release(ce_operands *o) {
  ts_release(o->logits);
  ts_release(o->target);
  ts_release(o->weight);
}

/* The divisor of reduction mean: the total weight of the class-index targets (tw, per position),
   or the number of positions for probabilities. */
static int mean_divisor(const ce_layout *l, ts_tensor *tw, double *divisor) {
  if (!tw) {
    *divisor = (double)(l->n * l->s);
    return TS_OK;
  }
  ts_tensor *total = ts_reduce(TS_SUM, tw, 0, NULL, 0);
  int st = total ? ts_item(total, divisor) : ts_last_status();
  ts_release(total);
  return st;
}

static ts_tensor *ce_forward(const ts_backend *be, const ce_layout *l, ts_tensor *logits, ts_tensor *target,
                             ts_tensor *weight, int64_t ignore_index, double smoothing, int reduction,
                             ts_tensor **lse, double *divisor) {
  int compute = be->compute_dtype(logits->dtype);
  int64_t positions[2] = {l->n, l->s};
  ce_operands o;
  int st = ce_prepare(l, compute, logits, target, weight, &o);
  ts_tensor *loss = st ? NULL : ts_empty(2, positions, compute, logits->device);
  *lse = loss ? ts_empty(2, positions, compute, logits->device) : NULL;
  int want_tw = !l->soft && reduction == TS_REDUCTION_MEAN;
  ts_tensor *tw = *lse && want_tw ? ts_empty(2, positions, compute, logits->device) : NULL;
  if (*lse && (tw || !want_tw))
    st = be->cross_entropy(loss, *lse, tw, o.logits, o.target, o.weight, ignore_index, smoothing);
  else if (!st)
    st = ts_last_status();
  if (!st) st = mean_divisor(l, tw, divisor);
  ce_release(&o);
  ts_release(tw);
  if (st) {
    ts_release(loss);
    ts_release(*lse);
    *lse = NULL;
    return NULL;
  }
  if (reduction == TS_REDUCTION_NONE) return ts_nn_result(loss, logits->dtype, l->out_ndim, l->out_shape);
  return ts_nn_result(reduce_loss(loss, reduction, *divisor), logits->dtype, 0, NULL);
}

/* Saved: logits, target, weight (NULL when absent), lse. */
static int ce_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  ts_tensor *logits = ts_node_saved(n, 0), *target = ts_node_saved(n, 1);
  ts_tensor *weight = n->i[CE_HAS_WEIGHT] ? ts_node_saved(n, 2) : NULL, *lse = ts_node_saved(n, 3);
  if (!logits || !target || !lse || (n->i[CE_HAS_WEIGHT] && !weight)) return ts_last_status();
  const ts_backend *be = TS_NN_BACKEND(logits, cross_entropy_backward, "cross_entropy backward");
  if (!be) return ts_last_status();
  ce_layout l = {n->i[CE_N], n->i[CE_C], n->i[CE_S], (int)n->i[CE_SOFT], 0, {0}};
  int compute = lse->dtype;
  int64_t full[3] = {l.n, l.c, l.s}, positions[2] = {l.n, l.s};
  ce_operands o;
  int st = ce_prepare(&l, compute, logits, target, weight, &o);
  ts_tensor *gpos = st ? NULL : spread_grad(g, (int)n->i[CE_REDUCTION], n->d[CE_DIVISOR], compute, 2, positions);
  int need_logits = ts_node_needs_grad(n, 0), need_target = l.soft && ts_node_needs_grad(n, 1);
  ts_tensor *gl = gpos && need_logits ? ts_empty(3, full, compute, logits->device) : NULL;
  ts_tensor *gt = gpos && need_target ? ts_empty(3, full, compute, logits->device) : NULL;
  if (!st && gpos && (gl || !need_logits) && (gt || !need_target))
    st = be->cross_entropy_backward(gl, gt, gpos, o.logits, lse, o.target, o.weight, n->i[CE_IGNORE],
                                    n->d[CE_SMOOTHING]);
  else if (!st)
    st = ts_last_status();
  const ts_edge *el = ts_node_input(n, 0), *et = ts_node_input(n, 1);
  ts_tensor *gl_shaped = !st && gl ? ts_view(gl, el->ndim, el->shape) : NULL;
  ts_tensor *gt_shaped = !st && gt ? ts_view(gt, et->ndim, et->shape) : NULL;
  if (!st && ((gl && !gl_shaped) || (gt && !gt_shaped))) st = ts_last_status();
  if (!st) st = ts_set_input_grad(n, 0, gl_shaped, grads);
  if (!st) st = ts_set_input_grad(n, 1, gt_shaped, grads);
  ce_release(&o);
  ts_tensor *temps[] = {gpos, gl, gt, gl_shaped, gt_shaped};
  for (size_t i = 0; i < sizeof temps / sizeof *temps; i++) ts_release(temps[i]);
  return st;
}

ts_tensor *ts_cross_entropy(ts_tensor *logits, ts_tensor *target, ts_tensor *weight, int64_t ignore_index,
                            double label_smoothing, int reduction) {
  ts_tensor *in[3] = {logits, target, weight}, *cast[3];
  if (ts_autocast_needed(TS_AUTOCAST_FLOAT32, 3, in)) { /* mixed precision: in float32 */
    if (ts_autocast_cast(TS_AUTOCAST_FLOAT32, 3, in, cast)) return NULL;
    ts_tensor *out = ts_cross_entropy(cast[0], cast[1], cast[2], ignore_index, label_smoothing, reduction);
    ts_autocast_release(3, cast);
    return out;
  }
  ce_layout l;
  if (check_cross_entropy(logits, target, weight, label_smoothing, reduction, &l)) return NULL;
  const ts_backend *be = TS_NN_BACKEND(logits, cross_entropy, "cross_entropy");
  if (!be) return NULL;
  int previous = ts_set_grad_enabled(0);
  ts_tensor *lse = NULL, *out = NULL;
  double divisor = 1;
  if (l.soft || !check_class_indices(target, l.c, ignore_index))
    out = ce_forward(be, &l, logits, target, weight, ignore_index, label_smoothing, reduction, &lse, &divisor);
  ts_set_grad_enabled(previous);
  /* weight gets no gradient (as PyTorch); probabilities do */
  ts_tensor *inputs[2] = {logits, l.soft ? target : NULL};
  ts_node *n = out ? ts_grad_node("cross_entropy", ce_backward, 2, inputs) : NULL;
  if (n) {
    int64_t params[] = {l.n, l.c, l.s, ignore_index, reduction, l.soft, weight != NULL};
    memcpy(n->i, params, sizeof params);
    n->d[CE_SMOOTHING] = label_smoothing;
    n->d[CE_DIVISOR] = divisor;
  }
  ts_tensor *save[4] = {logits, target, weight, lse};
  out = ts_node_finish_saving(n, out, 4, save);
  ts_release(lse);
  return out;
}

/* ---- mse, l1, smooth l1 ---------------------------------------------------------------------- */
enum { PL_KIND, PL_REDUCTION };
static const char *const pointwise_names[] = {"mse_loss", "l1_loss", "smooth_l1_loss"};

/* t converted to dtype and broadcast to shape: a view, or contiguous when `dense`. */
static ts_tensor *operand(ts_tensor *t, int dtype, int ndim, const int64_t *shape, int dense) {
  ts_tensor *converted = ts_to_dtype(t, dtype);
  ts_tensor *view = converted ? ts_expand(converted, ndim, shape) : NULL;
  ts_release(converted);
  if (!view || !dense) return view;
  ts_tensor *d = ts_contiguous(view);
  ts_release(view);
  return d;
}

/* Saved: a, b. */
static int pointwise_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  ts_tensor *a = ts_node_saved(n, 0), *b = ts_node_saved(n, 1);
  if (!a || !b) return ts_last_status();
  const ts_backend *be = TS_NN_BACKEND(a, pointwise_loss_backward, n->name);
  if (!be) return ts_last_status();
  int ndim, reduction = (int)n->i[PL_REDUCTION];
  int64_t shape[TS_MAX_DIMS];
  if (ts_broadcast_shapes(n->name, a, b, &ndim, shape)) return ts_last_status();
  int compute = be->compute_dtype(ts_promote_types(a->dtype, b->dtype));
  double count = (double)ts_shape_numel(ndim, shape);
  ts_tensor *ac = operand(a, compute, ndim, shape, 0), *bc = operand(b, compute, ndim, shape, 0);
  /* the mean's 1 / count is applied by the kernel (scale), so g spreads as a sum's would */
  int spread_as = reduction == TS_REDUCTION_NONE ? reduction : TS_REDUCTION_SUM;
  ts_tensor *gs = spread_grad(g, spread_as, 1.0, compute, ndim, shape);
  ts_tensor *ga = ac && bc && gs ? ts_empty(ndim, shape, compute, a->device) : NULL;
  double scale = reduction == TS_REDUCTION_MEAN ? 1.0 / count : 1.0;
  int st = ga ? be->pointwise_loss_backward((int)n->i[PL_KIND], ga, gs, ac, bc, n->d[0], scale) : ts_last_status();
  ts_tensor *gb = !st && ts_node_needs_grad(n, 1) ? ts_unary(TS_NEG, ga) : NULL;
  if (!st && ts_node_needs_grad(n, 1) && !gb) st = ts_last_status();
  if (!st) st = ts_set_input_grad(n, 0, ga, grads);
  if (!st) st = ts_set_input_grad(n, 1, gb, grads);
  ts_tensor *temps[] = {ac, bc, gs, ga, gb};
  for (size_t i = 0; i < sizeof temps / sizeof *temps; i++) ts_release(temps[i]);
  return st;
}

static ts_tensor *pointwise_forward(const ts_backend *be, int kind, ts_tensor *a, ts_tensor *b, double beta,
                                    int reduction, int ndim, const int64_t *shape) {
  int dtype = ts_promote_types(a->dtype, b->dtype), compute = be->compute_dtype(dtype);
  int reduce = reduction != TS_REDUCTION_NONE;
  ts_tensor *ac = operand(a, compute, ndim, shape, reduce), *bc = operand(b, compute, ndim, shape, reduce);
  ts_tensor *out = ac && bc ? ts_empty(reduce ? 0 : ndim, shape, compute, a->device) : NULL;
  if (out && be->pointwise_loss(kind, out, ac, bc, beta)) {
    ts_release(out);
    out = NULL;
  }
  ts_release(ac);
  ts_release(bc);
  if (reduce && reduction == TS_REDUCTION_MEAN && out) {
    ts_tensor *mean = ts_binary_scalar(TS_DIV, out, (double)ts_shape_numel(ndim, shape), 0);
    ts_release(out);
    out = mean;
  }
  return ts_nn_result(out, dtype, reduce ? 0 : ndim, shape);
}

static ts_tensor *pointwise_loss(int kind, ts_tensor *a, ts_tensor *b, double beta, int reduction) {
  ts_tensor *in[2] = {a, b}, *cast[2];
  if (ts_autocast_needed(TS_AUTOCAST_FLOAT32, 2, in)) { /* mixed precision: in float32 */
    if (ts_autocast_cast(TS_AUTOCAST_FLOAT32, 2, in, cast)) return NULL;
    ts_tensor *out = pointwise_loss(kind, cast[0], cast[1], beta, reduction);
    ts_autocast_release(2, cast);
    return out;
  }
  const char *op = pointwise_names[kind];
  if (ts_nn_check_floating(op, "input", a) || ts_nn_check_floating(op, "target", b) || check_reduction(op, reduction) ||
      ts_same_device(op, a, b))
    return NULL;
  int ndim;
  int64_t shape[TS_MAX_DIMS];
  if (ts_broadcast_shapes(op, a, b, &ndim, shape)) return NULL;
  const ts_backend *be = TS_NN_BACKEND(a, pointwise_loss, op);
  if (!be) return NULL;
  int previous = ts_set_grad_enabled(0);
  ts_tensor *out = pointwise_forward(be, kind, a, b, beta, reduction, ndim, shape);
  ts_set_grad_enabled(previous);
  ts_node *n = out ? ts_grad_node(op, pointwise_backward, 2, (ts_tensor *[]){a, b}) : NULL;
  if (n) {
    n->i[PL_KIND] = kind;
    n->i[PL_REDUCTION] = reduction;
    n->d[0] = beta;
  }
  ts_tensor *save[2] = {a, b};
  return ts_node_finish_saving(n, out, 2, save);
}

ts_tensor *ts_mse_loss(ts_tensor *a, ts_tensor *b, int reduction) {
  return pointwise_loss(TS_LOSS_MSE, a, b, 0, reduction);
}

ts_tensor *ts_l1_loss(ts_tensor *a, ts_tensor *b, int reduction) {
  return pointwise_loss(TS_LOSS_L1, a, b, 0, reduction);
}

ts_tensor *ts_smooth_l1_loss(ts_tensor *a, ts_tensor *b, double beta, int reduction) {
  if (!(beta >= 0) || !isfinite(beta))
    return TS_FAIL_NULL(TS_ERR_ARG, "smooth_l1_loss: beta must be a non-negative finite number, got %g", beta);
  return pointwise_loss(TS_LOSS_SMOOTH_L1, a, b, beta, reduction);
}

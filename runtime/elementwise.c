/* elementwise.c — result dtypes, broadcasting and dispatch for unary, binary, where and clamp.
 *
 * Type promotion follows PyTorch: ts_promote_types for tensor operands; a plain number is a weak
 * scalar that never widens a floating tensor (float16 * 0.5 stays float16) and turns an integer
 * tensor into float32 only when it is not integral. Division and transcendental functions of
 * integers give float32; comparisons and logical ops give bool. */
#include "autograd.h"
#include "backend.h"

#include <math.h>
#include <string.h>

static const char *const unary_names[TS_NUM_UNARY_OPS] = {
    "neg", "abs", "sign", "exp", "expm1", "log", "log1p", "sqrt", "rsqrt", "tanh", "sigmoid", "erf", "relu",
    "gelu", "silu", "sin", "cos", "floor", "ceil", "round", "trunc", "reciprocal", "square", "logical_not",
    "isnan", "isinf", "isfinite"};
static const char *const binary_names[TS_NUM_BINARY_OPS] = {
    "add", "sub", "mul", "div", "pow", "maximum", "minimum", "remainder", "floor_divide", "atan2",
    "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_xor"};

const char *ts_unary_op_name(int op) { return op >= 0 && op < TS_NUM_UNARY_OPS ? unary_names[op] : "invalid"; }
const char *ts_binary_op_name(int op) { return op >= 0 && op < TS_NUM_BINARY_OPS ? binary_names[op] : "invalid"; }

static int unary_is_predicate(int op) { return op >= TS_LOGICAL_NOT; }
static int unary_is_transcendental(int op) {
  switch (op) {
  case TS_EXP: case TS_EXPM1: case TS_LOG: case TS_LOG1P: case TS_SQRT: case TS_RSQRT: case TS_TANH:
  case TS_SIGMOID: case TS_ERF: case TS_GELU: case TS_SILU: case TS_SIN: case TS_COS: case TS_RECIPROCAL:
    return 1;
  default:
    return 0;
  }
}
static int binary_is_predicate(int op) { return op >= TS_EQ; }

int ts_unary_result_dtype(int op, int dtype) {
  if (unary_is_predicate(op)) return TS_BOOL;
  if (unary_is_transcendental(op) && !ts_dtype_is_floating(dtype)) return TS_F32;
  return dtype;
}

int ts_binary_result_dtype(int op, int a, int b) {
  if (binary_is_predicate(op)) return TS_BOOL;
  int r = ts_promote_types(a, b);
  if ((op == TS_DIV || op == TS_ATAN2) && !ts_dtype_is_floating(r)) return TS_F32;
  return r;
}

/* The dtype whose values the kernel computes on: the result's, except for predicates, which
   compare in the promoted input type. */
static int binary_domain(int op, int a, int b) {
  return binary_is_predicate(op) ? ts_promote_types(a, b) : ts_binary_result_dtype(op, a, b);
}

/* PyTorch refuses in-place ops whose result would lose its kind (float into int, int into bool). */
static int can_cast(int from, int to) {
  if (ts_dtype_is_floating(from) && !ts_dtype_is_floating(to)) return 0;
  if (from != TS_BOOL && to == TS_BOOL) return 0;
  return 1;
}

static int check_op(const char *kind, int op, int count) {
  if (op < 0 || op >= count) return ts_set_error(TS_ERR_ARG, "%s: invalid op %d", kind, op);
  return TS_OK;
}

/* Runs a kernel that writes `kernel_dtype` values of `shape` into `target` (new when NULL),
   through a temporary when target has another dtype. Returns the target (new ref) or NULL. */
typedef int (*kernel_call)(const ts_backend *be, ts_tensor *out, void *args);

static ts_tensor *run_into(ts_tensor *target, const ts_backend *be, ts_device dev, int ndim,
                           const int64_t *shape, int result_dtype, int kernel_dtype, kernel_call call, void *args) {
  ts_tensor *out = target;
  if (!out) {
    out = ts_empty(ndim, shape, result_dtype, dev);
    if (!out) return NULL;
  } else {
    ts_retain(out);
  }
  if (out->dtype == kernel_dtype) {
    if (call(be, out, args)) goto fail;
    return out;
  }
  ts_tensor *tmp = ts_empty(ndim, shape, kernel_dtype, dev);
  if (!tmp) goto fail;
  int st = call(be, tmp, args);
  if (!st) st = ts_copy_(out, tmp);
  ts_release(tmp);
  if (st) goto fail;
  return out;
fail:
  ts_release(out);
  return NULL;
}

/* A view of t converted to dtype (a new tensor when it differs) and expanded to shape. */
static ts_tensor *as_operand(ts_tensor *t, int dtype, int ndim, const int64_t *shape) {
  ts_tensor *conv = ts_to_dtype(t, dtype);
  if (!conv) return NULL;
  if (ts_shape_equal(conv->ndim, conv->shape, ndim, shape)) return conv; /* no view needed */
  ts_tensor *view = ts_expand(conv, ndim, shape);
  ts_release(conv);
  return view;
}

/* ---- in-place writes and autograd ------------------------------------------------------------ */
static int check_writable(const char *op, ts_tensor *a) {
  if (ts_has_internal_overlap(a))
    return ts_set_error(TS_ERR_ARG, "%s_: the tensor %s is a broadcast view; write to a copy", op, ts_tshape(a));
  return ts_check_inplace(op, a);
}

static int done_inplace(ts_tensor *a, const ts_tensor *result) {
  if (!result) return ts_last_status();
  ts_bump_version(a);
  return TS_OK;
}

static ts_tensor *unary_impl(int op, ts_tensor *a, ts_tensor *target);

/* Ops whose derivative is written with the output y alone (they stay differentiable in place). */
static int derivative_uses_output(int op) {
  switch (op) {
  case TS_NEG: case TS_SIGN: case TS_FLOOR: case TS_CEIL: case TS_ROUND: case TS_TRUNC: case TS_EXP: case TS_EXPM1:
  case TS_SQRT: case TS_RSQRT: case TS_TANH: case TS_SIGMOID: case TS_RELU: case TS_RECIPROCAL:
    return 1;
  default:
    return 0;
  }
}

static int unary_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  int op = (int)n->i[0];
  ts_tensor *v = ts_node_saved(n, 0); /* x or y, see derivative_uses_output */
  if (!v) return ts_last_status();
  const ts_backend *be = TS_BACKEND(v->device, unary_backward, n->name);
  if (!be) return ts_last_status();
  int compute = be->compute_dtype(v->dtype);
  ts_scope s = {0};
  ts_tensor *gk = ts_scope_keep(&s, ts_to_dtype(g, compute)), *vk = ts_scope_keep(&s, ts_to_dtype(v, compute));
  ts_tensor *gx = s.failed ? NULL : ts_scope_keep(&s, ts_empty(v->ndim, v->shape, compute, v->device));
  if (gx && be->unary_backward(op, gx, gk, vk, vk)) s.failed = 1;
  if (!s.failed && ts_set_input_grad(n, 0, gx, grads)) s.failed = 1;
  return ts_scope_close(&s);
}

static ts_tensor *unary_recorded(int op, ts_tensor *a) {
  ts_tensor *out = unary_impl(op, a, NULL);
  if (!out || unary_is_predicate(op)) return out;
  ts_node *n = ts_grad_node(unary_names[op], unary_backward, 1, &a);
  if (!n) return out;
  n->i[0] = op;
  ts_tensor *keep = derivative_uses_output(op) ? out : a;
  return ts_node_finish_saving(n, out, 1, &keep);
}

/* d(a op b): saved are a, b and the result y (slots 0, 1, 2) where the formula needs them. */
static int binary_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  int op = (int)n->i[0];
  ts_scope s = {0};
  ts_tensor *v[3] = {NULL, NULL, NULL};
  for (int k = 0; k < n->n_saved; k++)
    if (n->saved[k] && !(v[k] = ts_node_saved(n, k))) return ts_last_status();
  ts_tensor *a = v[0], *b = v[1], *y = v[2];
  int need_a = ts_node_needs_grad(n, 0), need_b = ts_node_needs_grad(n, 1);
  ts_tensor *ga = NULL, *gb = NULL;
  switch (op) {
  case TS_ADD: ga = gb = g; break;
  case TS_SUB: ga = g; gb = need_b ? ts_s_unary(&s, TS_NEG, g) : NULL; break;
  case TS_MUL:
    ga = need_a ? ts_s_binary(&s, TS_MUL, g, b) : NULL;
    gb = need_b ? ts_s_binary(&s, TS_MUL, g, a) : NULL;
    break;
  case TS_DIV:
    ga = ts_s_binary(&s, TS_DIV, g, b);
    gb = need_b ? ts_s_unary(&s, TS_NEG, ts_s_binary(&s, TS_MUL, ga, y)) : NULL;
    break;
  case TS_POW: /* b * a^(b-1), and y * log(a) where a > 0 (0 elsewhere, as PyTorch) */
    if (need_a) ga = ts_s_binary(&s, TS_MUL, g, ts_s_binary(&s, TS_MUL, b, ts_s_binary(&s, TS_POW, a, ts_s_scalar(&s, TS_SUB, b, 1))));
    if (need_b) {
      ts_tensor *loga = ts_s_unary(&s, TS_LOG, a), *pos = ts_s_scalar(&s, TS_GT, a, 0);
      ts_tensor *zero = ts_scope_keep(&s, ts_full(0, NULL, 0, g->dtype, g->device));
      ts_tensor *safe = ts_s_where(&s, pos, loga, zero);
      gb = ts_s_binary(&s, TS_MUL, g, ts_s_binary(&s, TS_MUL, y, safe));
    }
    break;
  case TS_MAXIMUM: case TS_MINIMUM: { /* ties share the gradient equally, as PyTorch */
    ts_tensor *wins = ts_s_cast(&s, ts_s_binary(&s, op == TS_MAXIMUM ? TS_GT : TS_LT, a, b), g->dtype);
    ts_tensor *ties = ts_s_cast(&s, ts_s_binary(&s, TS_EQ, a, b), g->dtype);
    ts_tensor *w = ts_s_binary(&s, TS_ADD, wins, ts_s_scalar(&s, TS_MUL, ties, 0.5));
    ga = ts_s_binary(&s, TS_MUL, g, w);
    gb = ts_s_binary(&s, TS_SUB, g, ga);
    break;
  }
  case TS_REMAINDER:
    ga = g;
    gb = ts_s_unary(&s, TS_NEG, ts_s_binary(&s, TS_MUL, g, ts_s_binary(&s, TS_FLOOR_DIVIDE, a, b)));
    break;
  case TS_ATAN2: {
    ts_tensor *den = ts_s_binary(&s, TS_ADD, ts_s_binary(&s, TS_MUL, a, a), ts_s_binary(&s, TS_MUL, b, b));
    ga = ts_s_binary(&s, TS_MUL, g, ts_s_binary(&s, TS_DIV, b, den));
    gb = ts_s_unary(&s, TS_NEG, ts_s_binary(&s, TS_MUL, g, ts_s_binary(&s, TS_DIV, a, den)));
    break;
  }
  default: break; /* floor_divide: zero gradient */
  }
  if (!s.failed && (ts_set_input_grad(n, 0, ga, grads) || ts_set_input_grad(n, 1, gb, grads))) s.failed = 1;
  return ts_scope_close(&s);
}

/* Which of a, b and the result y the backward reads, given which inputs need a gradient. Saving
   no more than that keeps x.mul_(2) and friends differentiable after the in-place write. */
static void binary_uses(int op, int need_ga, int need_gb, int use[3]) {
  use[0] = use[1] = use[2] = 0;
  switch (op) {
  case TS_ADD: case TS_SUB: case TS_FLOOR_DIVIDE: break;
  case TS_MUL: use[0] = need_gb; use[1] = need_ga; break;
  case TS_DIV: use[1] = 1; use[2] = need_gb; break;
  case TS_POW: use[0] = 1; use[1] = need_ga; use[2] = need_gb; break;
  default: use[0] = use[1] = 1; break;
  }
}

static ts_tensor *binary_impl(int op, ts_tensor *a, int a_dtype, ts_tensor *b, int b_dtype, ts_tensor *target);

static ts_tensor *binary_recorded(int op, ts_tensor *a, int a_dtype, ts_tensor *b, int b_dtype) {
  ts_tensor *out = binary_impl(op, a, a_dtype, b, b_dtype, NULL);
  if (!out || binary_is_predicate(op)) return out;
  ts_tensor *inputs[2] = {a, b};
  ts_node *n = ts_grad_node(binary_names[op], binary_backward, 2, inputs);
  if (!n) return out;
  n->i[0] = op;
  int use[3];
  binary_uses(op, ts_node_needs_grad(n, 0), ts_node_needs_grad(n, 1), use);
  ts_tensor *save[3] = {use[0] ? a : NULL, use[1] ? b : NULL, use[2] ? out : NULL};
  return ts_node_finish_saving(n, out, 3, save);
}

/* ---- unary ----------------------------------------------------------------------------------- */
typedef struct { int op; ts_tensor *a; } unary_args;
static int call_unary(const ts_backend *be, ts_tensor *out, void *p) {
  unary_args *u = p;
  return be->unary(u->op, out, u->a);
}

static ts_tensor *unary_impl(int op, ts_tensor *a, ts_tensor *target) {
  const char *name = ts_unary_op_name(op);
  if (check_op("unary", op, TS_NUM_UNARY_OPS)) return NULL;
  if (a->dtype == TS_BOOL && (op == TS_NEG || op == TS_SIGN || op == TS_SQUARE))
    return TS_FAIL_NULL(TS_ERR_DTYPE, "%s: not defined for bool tensors; use logical_not", name);
  const ts_backend *be = TS_BACKEND(a->device, unary, name);
  if (!be) return NULL;
  int result = ts_unary_result_dtype(op, a->dtype);
  if (target && !can_cast(result, target->dtype))
    return TS_FAIL_NULL(TS_ERR_DTYPE, "%s_: result type %s can't be cast to the tensor's dtype %s", name,
                        ts_dtype_name(result), ts_dtype_name(target->dtype));
  int compute = be->compute_dtype(unary_is_predicate(op) ? a->dtype : result);
  int kernel_out = unary_is_predicate(op) ? TS_BOOL : compute;
  unary_args args = {op, ts_to_dtype(a, compute)};
  if (!args.a) return NULL;
  ts_tensor *out = run_into(target, be, a->device, a->ndim, a->shape, result, kernel_out, call_unary, &args);
  ts_release(args.a);
  return out;
}

ts_tensor *ts_unary(int op, ts_tensor *a) { return unary_recorded(op, a); }

int ts_unary_(int op, ts_tensor *a) {
  if (check_writable(ts_unary_op_name(op), a)) return ts_last_status();
  if (ts_any_requires_grad(1, &a)) {
    if (unary_is_predicate(op))
      return ts_set_error(TS_ERR_ARG, "%s_: a predicate written in place into a tensor that requires grad cannot be "
                          "differentiated; use %s() out of place", ts_unary_op_name(op), ts_unary_op_name(op));
    return ts_rebase_inplace(a, unary_recorded(op, a));
  }
  ts_tensor *r = unary_impl(op, a, a);
  ts_release(r);
  return done_inplace(a, r);
}

/* ---- binary ---------------------------------------------------------------------------------- */
typedef struct { int op; ts_tensor *a, *b; } binary_args;
static int call_binary(const ts_backend *be, ts_tensor *out, void *p) {
  binary_args *x = p;
  return be->binary(x->op, out, x->a, x->b);
}

/* a_dtype and b_dtype are the dtypes promotion sees: a weak scalar arrives as a tensor in the
   compute dtype but promotes as its weak dtype. */
static ts_tensor *binary_impl(int op, ts_tensor *a, int a_dtype, ts_tensor *b, int b_dtype, ts_tensor *target) {
  const char *name = ts_binary_op_name(op);
  if (check_op("binary", op, TS_NUM_BINARY_OPS)) return NULL;
  if (ts_same_device(name, a, b)) return NULL;
  int ndim;
  int64_t shape[TS_MAX_DIMS];
  if (ts_broadcast_shapes(name, a, b, &ndim, shape)) return NULL;
  if (target && (ndim != target->ndim || ts_shape_numel(ndim, shape) != ts_numel(target)))
    return TS_FAIL_NULL(TS_ERR_SHAPE, "%s_: the result %s of broadcasting %s and %s does not fit the in-place tensor %s",
                        name, ts_shape_str(ndim, shape), ts_tshape(a), ts_tshape(b), ts_tshape(target));
  const ts_backend *be = TS_BACKEND(a->device, binary, name);
  if (!be) return NULL;
  int result = ts_binary_result_dtype(op, a_dtype, b_dtype);
  if (target && !can_cast(result, target->dtype))
    return TS_FAIL_NULL(TS_ERR_DTYPE, "%s_: result type %s can't be cast to the tensor's dtype %s", name,
                        ts_dtype_name(result), ts_dtype_name(target->dtype));
  int compute = be->compute_dtype(binary_domain(op, a_dtype, b_dtype));
  /* writing into a, b must not be a differently laid out view of a (y.add_(y.t())) */
  ts_tensor *b_read = target ? ts_unaliased(b, target) : (ts_retain(b), b);
  if (!b_read) return NULL;
  binary_args args = {op, as_operand(a, compute, ndim, shape), as_operand(b_read, compute, ndim, shape)};
  ts_release(b_read);
  ts_tensor *out = NULL;
  if (args.a && args.b)
    out = run_into(target, be, a->device, ndim, shape, result, binary_is_predicate(op) ? TS_BOOL : compute,
                   call_binary, &args);
  ts_release(args.a);
  ts_release(args.b);
  return out;
}

ts_tensor *ts_binary(int op, ts_tensor *a, ts_tensor *b) { return binary_recorded(op, a, a->dtype, b, b->dtype); }

/* The checks an in-place op on a graph tensor needs before it computes out of place and rebases:
   the ones binary_impl makes when it writes its target itself. */
static int check_recorded_inplace(int op, ts_tensor *a, ts_tensor *b, int b_dtype) {
  const char *name = ts_binary_op_name(op);
  if (binary_is_predicate(op))
    return ts_set_error(TS_ERR_ARG, "%s_: a comparison written in place into a tensor that requires grad cannot be "
                        "differentiated; use %s() out of place", name, name);
  int result = ts_binary_result_dtype(op, a->dtype, b_dtype), ndim;
  if (!can_cast(result, a->dtype))
    return ts_set_error(TS_ERR_DTYPE, "%s_: result type %s can't be cast to the tensor's dtype %s", name,
                        ts_dtype_name(result), ts_dtype_name(a->dtype));
  int64_t shape[TS_MAX_DIMS];
  if (ts_broadcast_shapes(name, a, b, &ndim, shape)) return ts_last_status();
  if (!ts_shape_equal(ndim, shape, a->ndim, a->shape))
    return ts_set_error(TS_ERR_SHAPE, "%s_: the result %s of broadcasting %s and %s does not fit the in-place tensor %s",
                        name, ts_shape_str(ndim, shape), ts_tshape(a), ts_tshape(b), ts_tshape(a));
  return TS_OK;
}

int ts_binary_(int op, ts_tensor *a, ts_tensor *b) {
  if (check_writable(ts_binary_op_name(op), a)) return ts_last_status();
  if (ts_any_requires_grad(2, (ts_tensor *[]){a, b})) {
    if (check_recorded_inplace(op, a, b, b->dtype)) return ts_last_status();
    return ts_rebase_inplace(a, binary_recorded(op, a, a->dtype, b, b->dtype));
  }
  ts_tensor *r = binary_impl(op, a, a->dtype, b, b->dtype, a);
  ts_release(r);
  return done_inplace(a, r);
}

/* The weak dtype of a number next to tensor dtype `t`: see the comment at the top. */
static int scalar_dtype(int t, double s) {
  if (ts_dtype_is_floating(t)) return t;
  int integral = isfinite(s) && s == floor(s) && fabs(s) < 9.2e18;
  if (!integral) return TS_F32;
  return t == TS_BOOL ? TS_I64 : t;
}

/* A 0-d tensor holding s in the dtype the kernel will compute in, so no precision is lost. */
static ts_tensor *scalar_operand(int op, ts_tensor *a, double s, int weak) {
  const ts_backend *be = ts_backend_for(a->device);
  if (!be) return NULL;
  return ts_full(0, NULL, s, be->compute_dtype(binary_domain(op, a->dtype, weak)), a->device);
}

ts_tensor *ts_binary_scalar(int op, ts_tensor *a, double s, int reverse) {
  int weak = scalar_dtype(a->dtype, s);
  ts_tensor *b = scalar_operand(op, a, s, weak);
  if (!b) return NULL;
  ts_tensor *out = reverse ? binary_recorded(op, b, weak, a, a->dtype) : binary_recorded(op, a, a->dtype, b, weak);
  ts_release(b);
  return out;
}

int ts_binary_scalar_(int op, ts_tensor *a, double s) {
  if (check_writable(ts_binary_op_name(op), a)) return ts_last_status();
  int weak = scalar_dtype(a->dtype, s);
  ts_tensor *b = scalar_operand(op, a, s, weak);
  if (!b) return ts_last_status();
  ts_tensor *r;
  int st;
  if (ts_any_requires_grad(1, &a)) {
    st = check_recorded_inplace(op, a, b, weak);
    if (!st) st = ts_rebase_inplace(a, binary_recorded(op, a, a->dtype, b, weak));
  } else {
    r = binary_impl(op, a, a->dtype, b, weak, a);
    ts_release(r);
    st = done_inplace(a, r);
  }
  ts_release(b);
  return st;
}

/* ---- where and clamp ------------------------------------------------------------------------- */
typedef struct { ts_tensor *cond, *a, *b; } where_args;
static int call_where(const ts_backend *be, ts_tensor *out, void *p) {
  where_args *w = p;
  return be->where(out, w->cond, w->a, w->b);
}

static ts_tensor *where_impl(ts_tensor *cond, ts_tensor *a, ts_tensor *b) {
  if (ts_same_device("where", cond, a) || ts_same_device("where", a, b)) return NULL;
  int ndim;
  int64_t shape[TS_MAX_DIMS];
  if (ts_broadcast_shapes("where", a, b, &ndim, shape)) return NULL;
  ts_tensor probe = *a; /* broadcast the condition too: a header with the joint shape */
  probe.ndim = ndim;
  for (int d = 0; d < ndim; d++) probe.shape[d] = shape[d];
  if (ts_broadcast_shapes("where", &probe, cond, &ndim, shape)) return NULL;
  const ts_backend *be = TS_BACKEND(a->device, where, "where");
  if (!be) return NULL;
  int result = ts_promote_types(a->dtype, b->dtype), compute = be->compute_dtype(result);
  where_args args = {as_operand(cond, TS_BOOL, ndim, shape), as_operand(a, compute, ndim, shape),
                     as_operand(b, compute, ndim, shape)};
  ts_tensor *out = NULL;
  if (args.cond && args.a && args.b)
    out = run_into(NULL, be, a->device, ndim, shape, result, compute, call_where, &args);
  ts_release(args.cond);
  ts_release(args.a);
  ts_release(args.b);
  return out;
}

typedef struct { ts_tensor *a; double lo, hi; int has_lo, has_hi; } clamp_args;
static int call_clamp(const ts_backend *be, ts_tensor *out, void *p) {
  clamp_args *c = p;
  return be->clamp(out, c->a, c->lo, c->hi, c->has_lo, c->has_hi);
}

static ts_tensor *clamp_impl(ts_tensor *a, double lo, double hi, int has_lo, int has_hi, ts_tensor *target) {
  if (!has_lo && !has_hi) return TS_FAIL_NULL(TS_ERR_ARG, "clamp: at least one of min and max must be given");
  if (a->dtype == TS_BOOL) return TS_FAIL_NULL(TS_ERR_DTYPE, "clamp: not defined for bool tensors");
  const ts_backend *be = TS_BACKEND(a->device, clamp, "clamp");
  if (!be) return NULL;
  int compute = be->compute_dtype(a->dtype);
  clamp_args args = {ts_to_dtype(a, compute), lo, hi, has_lo, has_hi};
  if (!args.a) return NULL;
  ts_tensor *out = run_into(target, be, a->device, a->ndim, a->shape, a->dtype, compute, call_clamp, &args);
  ts_release(args.a);
  return out;
}


static int where_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  ts_tensor *cond = ts_node_saved(n, 0);
  if (!cond) return ts_last_status();
  ts_scope s = {0};
  ts_tensor *zero = ts_scope_keep(&s, ts_full(0, NULL, 0, g->dtype, g->device));
  ts_tensor *ga = ts_node_needs_grad(n, 1) ? ts_s_where(&s, cond, g, zero) : NULL;
  ts_tensor *gb = ts_node_needs_grad(n, 2) ? ts_s_where(&s, cond, zero, g) : NULL;
  if (!s.failed && (ts_set_input_grad(n, 1, ga, grads) || ts_set_input_grad(n, 2, gb, grads))) s.failed = 1;
  return ts_scope_close(&s);
}

ts_tensor *ts_where(ts_tensor *cond, ts_tensor *a, ts_tensor *b) {
  ts_tensor *out = where_impl(cond, a, b);
  if (!out) return NULL;
  ts_tensor *inputs[3] = {cond, a, b};
  ts_node *n = ts_grad_node("where", where_backward, 3, inputs);
  return ts_node_finish_saving(n, out, 1, &cond);
}

/* The gradient passes where lo <= x <= hi, as PyTorch. */
static int clamp_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  ts_tensor *x = ts_node_saved(n, 0);
  if (!x) return ts_last_status();
  ts_scope s = {0};
  ts_tensor *pass = NULL;
  if (n->i[0]) pass = ts_s_scalar(&s, TS_GE, x, n->d[0]);
  if (n->i[1]) {
    ts_tensor *below = ts_s_scalar(&s, TS_LE, x, n->d[1]);
    pass = pass ? ts_s_binary(&s, TS_LOGICAL_AND, pass, below) : below;
  }
  ts_tensor *gx = ts_s_binary(&s, TS_MUL, g, ts_s_cast(&s, pass, g->dtype));
  if (!s.failed && ts_set_input_grad(n, 0, gx, grads)) s.failed = 1;
  return ts_scope_close(&s);
}

static ts_tensor *clamp_recorded(ts_tensor *a, double lo, double hi, int has_lo, int has_hi) {
  ts_tensor *out = clamp_impl(a, lo, hi, has_lo, has_hi, NULL);
  if (!out) return NULL;
  ts_node *n = ts_grad_node("clamp", clamp_backward, 1, &a);
  if (!n) return out;
  n->i[0] = has_lo;
  n->i[1] = has_hi;
  n->d[0] = lo;
  n->d[1] = hi;
  return ts_node_finish_saving(n, out, 1, &a);
}

ts_tensor *ts_clamp(ts_tensor *a, double lo, double hi, int has_lo, int has_hi) {
  return clamp_recorded(a, lo, hi, has_lo, has_hi);
}

int ts_clamp_(ts_tensor *a, double lo, double hi, int has_lo, int has_hi) {
  if (check_writable("clamp", a)) return ts_last_status();
  if (ts_any_requires_grad(1, &a)) return ts_rebase_inplace(a, clamp_recorded(a, lo, hi, has_lo, has_hi));
  ts_tensor *r = clamp_impl(a, lo, hi, has_lo, has_hi, a);
  ts_release(r);
  return done_inplace(a, r);
}

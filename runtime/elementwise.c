/* elementwise.c — result dtypes, broadcasting and dispatch for unary, binary, where and clamp.
 *
 * Type promotion follows PyTorch: ts_promote_types for tensor operands; a plain number is a weak
 * scalar that never widens a floating tensor (float16 * 0.5 stays float16) and turns an integer
 * tensor into float32 only when it is not integral. Division and transcendental functions of
 * integers give float32; comparisons and logical ops give bool. */
#include "backend.h"

#include <math.h>

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
  ts_tensor *view = ts_expand(conv, ndim, shape);
  ts_release(conv);
  return view;
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
  const ts_backend *be = ts_backend_for(a->device);
  if (!be || TS_BACKEND_FN(be, unary, name, a->device)) return NULL;
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

ts_tensor *ts_unary(int op, ts_tensor *a) { return unary_impl(op, a, NULL); }

int ts_unary_(int op, ts_tensor *a) {
  if (ts_has_internal_overlap(a))
    return ts_set_error(TS_ERR_ARG, "%s_: the tensor %s is a broadcast view; write to a copy", ts_unary_op_name(op), ts_tshape(a));
  ts_tensor *r = unary_impl(op, a, a);
  ts_release(r);
  return r ? TS_OK : ts_last_status();
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
  const ts_backend *be = ts_backend_for(a->device);
  if (!be || TS_BACKEND_FN(be, binary, name, a->device)) return NULL;
  int result = ts_binary_result_dtype(op, a_dtype, b_dtype);
  if (target && !can_cast(result, target->dtype))
    return TS_FAIL_NULL(TS_ERR_DTYPE, "%s_: result type %s can't be cast to the tensor's dtype %s", name,
                        ts_dtype_name(result), ts_dtype_name(target->dtype));
  int compute = be->compute_dtype(binary_domain(op, a_dtype, b_dtype));
  binary_args args = {op, as_operand(a, compute, ndim, shape), as_operand(b, compute, ndim, shape)};
  ts_tensor *out = NULL;
  if (args.a && args.b)
    out = run_into(target, be, a->device, ndim, shape, result, binary_is_predicate(op) ? TS_BOOL : compute,
                   call_binary, &args);
  ts_release(args.a);
  ts_release(args.b);
  return out;
}

ts_tensor *ts_binary(int op, ts_tensor *a, ts_tensor *b) { return binary_impl(op, a, a->dtype, b, b->dtype, NULL); }

int ts_binary_(int op, ts_tensor *a, ts_tensor *b) {
  if (ts_has_internal_overlap(a))
    return ts_set_error(TS_ERR_ARG, "%s_: the tensor %s is a broadcast view; write to a copy", ts_binary_op_name(op), ts_tshape(a));
  ts_tensor *r = binary_impl(op, a, a->dtype, b, b->dtype, a);
  ts_release(r);
  return r ? TS_OK : ts_last_status();
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
  ts_tensor *out = reverse ? binary_impl(op, b, weak, a, a->dtype, NULL) : binary_impl(op, a, a->dtype, b, weak, NULL);
  ts_release(b);
  return out;
}

int ts_binary_scalar_(int op, ts_tensor *a, double s) {
  if (ts_has_internal_overlap(a))
    return ts_set_error(TS_ERR_ARG, "%s_: the tensor %s is a broadcast view; write to a copy", ts_binary_op_name(op), ts_tshape(a));
  int weak = scalar_dtype(a->dtype, s);
  ts_tensor *b = scalar_operand(op, a, s, weak);
  if (!b) return ts_last_status();
  ts_tensor *r = binary_impl(op, a, a->dtype, b, weak, a);
  ts_release(b);
  ts_release(r);
  return r ? TS_OK : ts_last_status();
}

/* ---- where and clamp ------------------------------------------------------------------------- */
typedef struct { ts_tensor *cond, *a, *b; } where_args;
static int call_where(const ts_backend *be, ts_tensor *out, void *p) {
  where_args *w = p;
  return be->where(out, w->cond, w->a, w->b);
}

ts_tensor *ts_where(ts_tensor *cond, ts_tensor *a, ts_tensor *b) {
  if (ts_same_device("where", cond, a) || ts_same_device("where", a, b)) return NULL;
  int ndim;
  int64_t shape[TS_MAX_DIMS];
  if (ts_broadcast_shapes("where", a, b, &ndim, shape)) return NULL;
  ts_tensor probe = *a; /* broadcast the condition too: a header with the joint shape */
  probe.ndim = ndim;
  for (int d = 0; d < ndim; d++) probe.shape[d] = shape[d];
  if (ts_broadcast_shapes("where", &probe, cond, &ndim, shape)) return NULL;
  const ts_backend *be = ts_backend_for(a->device);
  if (!be || TS_BACKEND_FN(be, where, "where", a->device)) return NULL;
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
  const ts_backend *be = ts_backend_for(a->device);
  if (!be || TS_BACKEND_FN(be, clamp, "clamp", a->device)) return NULL;
  int compute = be->compute_dtype(a->dtype);
  clamp_args args = {ts_to_dtype(a, compute), lo, hi, has_lo, has_hi};
  if (!args.a) return NULL;
  ts_tensor *out = run_into(target, be, a->device, a->ndim, a->shape, a->dtype, compute, call_clamp, &args);
  ts_release(args.a);
  return out;
}

ts_tensor *ts_clamp(ts_tensor *a, double lo, double hi, int has_lo, int has_hi) {
  return clamp_impl(a, lo, hi, has_lo, has_hi, NULL);
}

int ts_clamp_(ts_tensor *a, double lo, double hi, int has_lo, int has_hi) {
  if (ts_has_internal_overlap(a))
    return ts_set_error(TS_ERR_ARG, "clamp_: the tensor %s is a broadcast view; write to a copy", ts_tshape(a));
  ts_tensor *r = clamp_impl(a, lo, hi, has_lo, has_hi, a);
  ts_release(r);
  return r ? TS_OK : ts_last_status();
}

/* reduce.c — reductions: sum, mean, prod, amax, amin, all, any, var/std, norm, max/min along a dim
 * and argmax/argmin. Arguments, result dtypes and shapes here; the math in the backends.
 *
 * Every reduction runs the same way: the input is permuted (a view, no copy) so the reduced dims
 * come last, converted to the dtype the backend computes in, and handed to the backend with fresh
 * contiguous outputs over the kept dims; keepdim then views the result with size-1 dims put back.
 *
 * Result dtypes follow PyTorch: sum and prod of integers or bools give int64; mean, var, std and
 * norm need a floating input; amax/amin/max/min keep the dtype; all/any give bool; indices are
 * int64. Reducing over an empty dim gives the op's identity (sum 0, prod 1, all true, any false,
 * mean and var NaN); ops without an identity (amax, amin, max, min, argmax, argmin, the inf and
 * negative norms) refuse it. */
#include "autograd.h"
#include "backend.h"

#include <math.h>
#include <stdio.h>

static const char *const reduce_names[TS_NUM_REDUCE_OPS] = {"sum", "mean", "prod", "amax", "amin", "all", "any"};

/* A validated request: which dims of `a` are reduced and how the result is shaped. */
typedef struct {
  const char *op;
  ts_tensor *a;
  int reduced[TS_MAX_DIMS]; /* 1 for each reduced dim of a */
  int nred;
  int keepdim;
} reduction;

/* Marks the reduced dims; ndims = 0 means every dim. A 0-d tensor accepts dim 0 and -1, which
   reduce nothing, as in PyTorch. */
static int setup(reduction *rd, const char *op, ts_tensor *a, int ndims, const int *dims, int keepdim) {
  if (!a) return ts_set_error(TS_ERR_ARG, "%s: the input tensor is NULL", op);
  if (ndims < 0) return ts_set_error(TS_ERR_ARG, "%s: the number of dims must be non-negative, got %d", op, ndims);
  if (ndims > 0 && !dims) return ts_set_error(TS_ERR_ARG, "%s: %d dims announced but the dims array is NULL", op, ndims);
  rd->op = op;
  rd->a = a;
  rd->keepdim = keepdim != 0;
  int seen[TS_MAX_DIMS] = {0};
  for (int d = 0; d < TS_MAX_DIMS; d++) rd->reduced[d] = ndims == 0 && d < a->ndim;
  for (int i = 0; i < ndims; i++) {
    int d;
    if (ts_wrap_dim(op, dims[i], a->ndim, &d)) return ts_last_status();
    if (seen[d]++)
      return ts_set_error(TS_ERR_ARG, "%s: dim %d appears multiple times in the list of dims", op, d);
    if (a->ndim > 0) rd->reduced[d] = 1;
  }
  rd->nred = 0;
  for (int d = 0; d < a->ndim; d++) rd->nred += rd->reduced[d];
  return TS_OK;
}

/* Refuses a reduction over an empty dim for ops that have no identity to give. */
static int reject_empty(const reduction *rd, const char *what) {
  const ts_tensor *a = rd->a;
  for (int d = 0; d < a->ndim; d++) {
    if (!rd->reduced[d] || a->shape[d] != 0) continue;
    if (rd->nred == a->ndim && a->ndim > 1)
      return ts_set_error(TS_ERR_SHAPE, "%s: cannot reduce the empty tensor %s: %s of no elements is undefined",
                          rd->op, ts_tshape(a), what);
    return ts_set_error(TS_ERR_SHAPE, "%s: cannot reduce over dim %d of size 0 (input %s): %s of no elements is undefined",
                        rd->op, d, ts_tshape(a), what);
  }
  return TS_OK;
}

static int require_floating(const reduction *rd) {
  if (ts_dtype_is_floating(rd->a->dtype)) return TS_OK;
  return ts_set_error(TS_ERR_DTYPE, "%s: could not infer output dtype: the input must be floating point, got %s "
                      "(convert it first, e.g. to float32)", rd->op, ts_dtype_name(rd->a->dtype));
}

/* ---- running a kernel ------------------------------------------------------------------------ */
typedef int (*kernel_call)(const ts_backend *be, ts_tensor *values, ts_tensor *indices, const ts_tensor *in,
                           int nred, void *args);

typedef struct {
  int in_dtype;     /* the dtype the kernel reads */
  int value_dtype;  /* the dtype it writes values in; -1 when it writes none */
  int result_dtype; /* the values' dtype handed back */
  int indices;      /* whether it writes int64 indices */
} kernel_types;

/* The kernel's output converted to the result dtype and, with keepdim, viewed with the reduced
   dims back as size 1. Consumes `out`. */
static ts_tensor *shape_result(const reduction *rd, ts_tensor *out, int dtype) {
  if (!out) return NULL;
  ts_tensor *conv = ts_to_dtype(out, dtype);
  ts_release(out);
  if (!conv || !rd->keepdim) return conv;
  int64_t shape[TS_MAX_DIMS];
  for (int d = 0; d < rd->a->ndim; d++) shape[d] = rd->reduced[d] ? 1 : rd->a->shape[d];
  ts_tensor *view = ts_view(conv, rd->a->ndim, shape);
  ts_release(conv);
  return view;
}

static int run_kernel_body(const reduction *rd, const ts_backend *be, kernel_types kt, kernel_call call, void *args,
                           ts_tensor **values, ts_tensor **indices) {
  ts_tensor *a = rd->a;
  int order[TS_MAX_DIMS], nkept = 0;
  int64_t kept[TS_MAX_DIMS];
  for (int d = 0; d < a->ndim; d++)
    if (!rd->reduced[d]) {
      kept[nkept] = a->shape[d];
      order[nkept++] = d;
    }
  for (int d = 0, k = nkept; d < a->ndim; d++)
    if (rd->reduced[d]) order[k++] = d;
  /* permute first: a conversion then copies in the order the kernel reads */
  ts_tensor *view = ts_permute(a, a->ndim, order);
  ts_tensor *in = view ? ts_to_dtype(view, kt.in_dtype) : NULL;
  ts_release(view);
  ts_tensor *vals = NULL, *idx = NULL;
  int st = in ? TS_OK : ts_last_status();
  if (!st && kt.value_dtype >= 0 && !(vals = ts_empty(nkept, kept, kt.value_dtype, a->device))) st = ts_last_status();
  if (!st && kt.indices && !(idx = ts_empty(nkept, kept, TS_I64, a->device))) st = ts_last_status();
  if (!st) st = call(be, vals, idx, in, rd->nred, args);
  ts_release(in);
  if (st) {
    ts_release(vals);
    ts_release(idx);
    return st;
  }
  if (vals && !(vals = shape_result(rd, vals, kt.result_dtype))) st = ts_last_status();
  if (idx && !(idx = shape_result(rd, idx, TS_I64))) st = ts_last_status();
  if (st) {
    ts_release(vals);
    ts_release(idx);
    return st;
  }
  if (values) *values = vals;
  if (indices) *indices = idx;
  return TS_OK;
}

/* The permutes and conversions inside are plumbing, not part of the graph: the public entry points
   record one node for the whole reduction. */
static int run_kernel(const reduction *rd, const ts_backend *be, kernel_types kt, kernel_call call, void *args,
                      ts_tensor **values, ts_tensor **indices) {
  int previous = ts_set_grad_enabled(0);
  int st = run_kernel_body(rd, be, kt, call, args, values, indices);
  ts_set_grad_enabled(previous);
  return st;
}

static const ts_backend *backend_of(const reduction *rd) { return ts_backend_for(rd->a->device); }

/* ---- sum, mean, prod, amax, amin, all, any --------------------------------------------------- */
static int call_reduce(const ts_backend *be, ts_tensor *values, ts_tensor *indices, const ts_tensor *in, int nred,
                       void *args) {
  (void)indices;
  return be->reduce(*(const int *)args, values, in, nred);
}

static ts_tensor *reduce_forward(int op, ts_tensor *a, int ndims, const int *dims, int keepdim) {
  if (op < 0 || op >= TS_NUM_REDUCE_OPS) return TS_FAIL_NULL(TS_ERR_ARG, "reduce: invalid op %d", op);
  reduction rd;
  if (setup(&rd, reduce_names[op], a, ndims, dims, keepdim)) return NULL;
  const ts_backend *be = backend_of(&rd);
  if (!be || TS_BACKEND_FN(be, reduce, rd.op, a->device)) return NULL;
  int floating = ts_dtype_is_floating(a->dtype);
  kernel_types kt = {be->compute_dtype(a->dtype), be->compute_dtype(a->dtype), a->dtype, 0};
  switch (op) {
  case TS_MEAN:
    if (require_floating(&rd)) return NULL;
    break;
  case TS_SUM: case TS_PROD:
    if (!floating) kt.value_dtype = kt.result_dtype = TS_I64;
    break;
  case TS_AMAX: case TS_AMIN:
    if (reject_empty(&rd, rd.op)) return NULL;
    break;
  default: /* all, any: bool and uint8 are read as stored, since a byte test needs no conversion */
    if (a->dtype == TS_BOOL || a->dtype == TS_U8) kt.in_dtype = a->dtype;
    kt.value_dtype = kt.result_dtype = TS_BOOL;
    break;
  }
  ts_tensor *out = NULL;
  return run_kernel(&rd, be, kt, call_reduce, &op, &out, NULL) ? NULL : out;
}

/* ---- var, std -------------------------------------------------------------------------------- */
typedef struct { int64_t correction; int take_sqrt; } var_args;

static int call_var(const ts_backend *be, ts_tensor *values, ts_tensor *indices, const ts_tensor *in, int nred,
                    void *args) {
  (void)indices;
  const var_args *v = args;
  return be->var(values, in, nred, v->correction, v->take_sqrt);
}

static ts_tensor *var_forward(ts_tensor *a, int ndims, const int *dims, int64_t correction, int keepdim, int take_sqrt) {
  reduction rd;
  if (setup(&rd, take_sqrt ? "std" : "var", a, ndims, dims, keepdim) || require_floating(&rd)) return NULL;
  const ts_backend *be = backend_of(&rd);
  if (!be || TS_BACKEND_FN(be, var, rd.op, a->device)) return NULL;
  int compute = be->compute_dtype(a->dtype);
  kernel_types kt = {compute, compute, a->dtype, 0};
  var_args args = {correction, take_sqrt != 0};
  ts_tensor *out = NULL;
  return run_kernel(&rd, be, kt, call_var, &args, &out, NULL) ? NULL : out;
}

/* ---- norm ------------------------------------------------------------------------------------ */
static int call_norm(const ts_backend *be, ts_tensor *values, ts_tensor *indices, const ts_tensor *in, int nred,
                     void *args) {
  (void)indices;
  return be->norm(values, in, nred, *(const double *)args);
}

static ts_tensor *norm_forward(ts_tensor *a, double p, int ndims, const int *dims, int keepdim) {
  reduction rd;
  if (setup(&rd, "norm", a, ndims, dims, keepdim) || require_floating(&rd)) return NULL;
  if (isnan(p)) return TS_FAIL_NULL(TS_ERR_ARG, "norm: the order p must be a number, got nan");
  /* max-abs and the negative orders have no value for no elements */
  if (p < 0 || p == INFINITY) {
    char what[48];
    snprintf(what, sizeof what, p == INFINITY ? "the inf-norm" : p == -INFINITY ? "the -inf-norm" : "the %g-norm", p);
    if (reject_empty(&rd, what)) return NULL;
  }
  const ts_backend *be = backend_of(&rd);
  if (!be || TS_BACKEND_FN(be, norm, rd.op, a->device)) return NULL;
  int compute = be->compute_dtype(a->dtype);
  kernel_types kt = {compute, compute, a->dtype, 0};
  ts_tensor *out = NULL;
  return run_kernel(&rd, be, kt, call_norm, &p, &out, NULL) ? NULL : out;
}

/* ---- max/min along a dim, argmax/argmin ------------------------------------------------------ */
static int call_arg(const ts_backend *be, ts_tensor *values, ts_tensor *indices, const ts_tensor *in, int nred,
                    void *args) {
  (void)nred; /* always 1: the backend reduces the last dim */
  return be->arg_reduce(values, indices, in, *(const int *)args);
}

/* Extreme of `a` along `dim`, which becomes the single reduced dim. A 0-d tensor is viewed as [1],
   whose reduction gives a 0-d result, which is also its keepdim shape. */
static int arg_reduce(const char *op, ts_tensor *a, int dim, int keepdim, int largest, int with_values,
                      ts_tensor **values, ts_tensor **indices) {
  if (!a) return ts_set_error(TS_ERR_ARG, "%s: the input tensor is NULL", op);
  int d = dim; /* a 0-d tensor takes dim 0 or -1 (wrapped to 0 here) and is viewed as [1] */
  if (a->ndim == 0 && ts_wrap_dim(op, dim, 0, &d)) return ts_last_status();
  int64_t one = 1;
  ts_tensor *src = a->ndim == 0 ? ts_view(a, 1, &one) : a;
  if (!src) return ts_last_status();
  reduction rd;
  int st = setup(&rd, op, src, 1, &d, a->ndim == 0 ? 0 : keepdim);
  if (!st) st = reject_empty(&rd, op);
  const ts_backend *be = st ? NULL : backend_of(&rd);
  if (!st && (!be || TS_BACKEND_FN(be, arg_reduce, op, a->device))) st = ts_last_status();
  if (!st) {
    int compute = be->compute_dtype(a->dtype);
    kernel_types kt = {compute, with_values ? compute : -1, a->dtype, 1};
    st = run_kernel(&rd, be, kt, call_arg, &largest, values, indices);
  }
  if (src != a) ts_release(src);
  return st;
}

static int max_dim_forward(ts_tensor *a, int dim, int keepdim, int largest, ts_tensor **values, ts_tensor **indices) {
  const char *op = largest ? "max" : "min";
  if (!values || !indices) return ts_set_error(TS_ERR_ARG, "%s: the values and indices out-pointers must not be NULL", op);
  *values = *indices = NULL;
  return arg_reduce(op, a, dim, keepdim, largest != 0, 1, values, indices);
}

ts_tensor *ts_argmax(ts_tensor *a, int dim, int dim_given, int keepdim, int largest) {
  const char *op = largest ? "argmax" : "argmin";
  ts_tensor *idx = NULL;
  if (dim_given) return arg_reduce(op, a, dim, keepdim, largest != 0, 0, NULL, &idx) ? NULL : idx;
  /* over the flattened tensor: the index counts elements in row-major order */
  if (!a) return TS_FAIL_NULL(TS_ERR_ARG, "%s: the input tensor is NULL", op);
  int64_t n = ts_numel(a);
  if (n == 0)
    return TS_FAIL_NULL(TS_ERR_SHAPE, "%s: cannot take the %s of the empty tensor %s; give a dim to reduce over",
                        op, op, ts_tshape(a));
  ts_tensor *flat = ts_reshape(a, 1, &n);
  if (!flat) return NULL;
  int st = arg_reduce(op, flat, 0, 0, largest != 0, 0, NULL, &idx);
  ts_release(flat);
  if (st || !keepdim) return st ? NULL : idx;
  int64_t ones[TS_MAX_DIMS];
  for (int d = 0; d < a->ndim; d++) ones[d] = 1;
  ts_tensor *view = ts_view(idx, a->ndim, ones);
  ts_release(idx);
  return view;
}

/* ---- autograd -------------------------------------------------------------------------------- */
/* The node keeps which input dims were reduced (i[0..7]) so an output-shaped tensor can be viewed
   with those dims as size 1 and expanded back over the input. */
enum { P_OP = TS_MAX_DIMS, P_CORRECTION, P_SQRT };

static ts_tensor *spread(ts_scope *s, ts_node *n, ts_tensor *t) {
  const ts_edge *e = ts_node_input(n, 0);
  int64_t kept[TS_MAX_DIMS];
  for (int d = 0; d < e->ndim; d++) kept[d] = n->i[d] ? 1 : e->shape[d];
  if (s->failed || !t) return ts_scope_keep(s, NULL);
  ts_tensor *v = ts_scope_keep(s, ts_reshape(t, e->ndim, kept));
  return v ? ts_scope_keep(s, ts_expand(v, e->ndim, e->shape)) : NULL;
}

static int64_t reduced_count(ts_node *n) {
  const ts_edge *e = ts_node_input(n, 0);
  int64_t count = 1;
  for (int d = 0; d < e->ndim; d++) count *= n->i[d] ? e->shape[d] : 1;
  return count;
}

/* Reduces t over the node's reduced dims, keeping them as size 1. */
static ts_tensor *reduce_like(ts_scope *s, ts_node *n, int op, ts_tensor *t) {
  const ts_edge *e = ts_node_input(n, 0);
  int dims[TS_MAX_DIMS], nd = 0;
  for (int d = 0; d < e->ndim; d++)
    if (n->i[d]) dims[nd++] = d;
  if (s->failed || !t) return ts_scope_keep(s, NULL);
  if (nd == 0) return ts_scope_keep(s, (ts_retain(t), t));
  return ts_scope_keep(s, reduce_forward(op, t, nd, dims, 1));
}

/* d prod / d x_i = product of the others: out / x_i where x_i != 0; where x_i is the only zero of
   its slice, the product of the non-zeros; 0 where there are more zeros. */
static ts_tensor *prod_grad(ts_scope *s, ts_node *n, ts_tensor *x, ts_tensor *out) {
  ts_tensor *zero = ts_s_scalar(s, TS_EQ, x, 0);
  ts_tensor *one = ts_scope_keep(s, ts_full(0, NULL, 1, x->dtype, x->device));
  ts_tensor *x_nz = ts_s_where(s, zero, one, x);
  ts_tensor *others_nz = spread(s, n, reduce_like(s, n, TS_PROD, x_nz));
  ts_tensor *zeros_here = spread(s, n, reduce_like(s, n, TS_SUM, ts_s_cast(s, zero, x->dtype)));
  ts_tensor *lone = ts_s_binary(s, TS_LOGICAL_AND, zero, ts_s_scalar(s, TS_EQ, zeros_here, 1));
  ts_tensor *plain = ts_s_binary(s, TS_DIV, spread(s, n, out), x_nz);
  ts_tensor *at_zero = ts_s_binary(s, TS_MUL, others_nz, ts_s_cast(s, lone, x->dtype));
  return ts_s_where(s, zero, at_zero, plain);
}

/* Gradient of max/min-like reductions: shared equally among the elements equal to the result. */
static ts_tensor *extreme_grad(ts_scope *s, ts_node *n, ts_tensor *g, ts_tensor *x, ts_tensor *out) {
  ts_tensor *hit = ts_s_cast(s, ts_s_binary(s, TS_EQ, x, spread(s, n, out)), g->dtype);
  ts_tensor *count = spread(s, n, reduce_like(s, n, TS_SUM, hit));
  return ts_s_binary(s, TS_MUL, spread(s, n, g), ts_s_binary(s, TS_DIV, hit, count));
}

static int reduce_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  int op = (int)n->i[P_OP];
  ts_scope s = {0};
  ts_tensor *x = n->n_saved > 0 ? ts_node_saved(n, 0) : NULL, *out = n->n_saved > 1 ? ts_node_saved(n, 1) : NULL;
  if (n->n_saved > 0 && (!x || !out)) return ts_last_status();
  ts_tensor *gx = NULL;
  switch (op) {
  case TS_SUM: gx = spread(&s, n, g); break;
  case TS_MEAN: gx = spread(&s, n, ts_s_scalar(&s, TS_DIV, g, (double)reduced_count(n))); break;
  case TS_PROD: gx = ts_s_binary(&s, TS_MUL, spread(&s, n, g), prod_grad(&s, n, x, out)); break;
  default: gx = extreme_grad(&s, n, g, x, out); break; /* amax, amin */
  }
  if (!s.failed && ts_set_input_grad(n, 0, gx, grads)) s.failed = 1;
  return ts_scope_close(&s);
}

/* A node for a reduction of `a` over dims, saving `save` (count of them). */
static ts_tensor *record_reduction(const char *name, ts_backward_fn backward, ts_tensor *a, int ndims,
                                   const int *dims, ts_tensor *out, int nsave, ts_tensor *const *save) {
  if (!out) return NULL;
  ts_node *n = ts_grad_node(name, backward, 1, &a);
  if (!n) return out;
  reduction rd;
  setup(&rd, name, a, ndims, dims, 0); /* validated by the forward already */
  for (int d = 0; d < TS_MAX_DIMS; d++) n->i[d] = d < a->ndim && rd.reduced[d];
  return ts_node_finish_saving(n, out, nsave, save);
}

ts_tensor *ts_reduce(int op, ts_tensor *a, int ndims, const int *dims, int keepdim) {
  ts_tensor *out = reduce_forward(op, a, ndims, dims, keepdim);
  if (!out || op == TS_ALL || op == TS_ANY || !ts_any_requires_grad(1, &a)) return out;
  ts_tensor *save[2] = {a, out};
  int nsave = op == TS_SUM || op == TS_MEAN ? 0 : 2;
  out = record_reduction(reduce_names[op], reduce_backward, a, ndims, dims, out, nsave, save);
  if (out) out->grad_fn->i[P_OP] = op;
  return out;
}

/* var: 2 (x - mean) / (N - correction); std: (x - mean) / ((N - correction) std). */
static int var_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  ts_tensor *x = ts_node_saved(n, 0), *out = ts_node_saved(n, 1);
  if (!x || !out) return ts_last_status();
  ts_scope s = {0};
  double divisor = (double)reduced_count(n) - (double)n->i[P_CORRECTION];
  if (divisor < 0) divisor = 0;
  ts_tensor *centered = ts_s_binary(&s, TS_SUB, x, spread(&s, n, reduce_like(&s, n, TS_MEAN, x)));
  ts_tensor *scale = n->i[P_SQRT] ? ts_s_binary(&s, TS_DIV, spread(&s, n, g), ts_s_scalar(&s, TS_MUL, spread(&s, n, out), divisor))
                                  : ts_s_scalar(&s, TS_MUL, spread(&s, n, g), 2.0 / divisor);
  ts_tensor *gx = ts_s_binary(&s, TS_MUL, centered, scale);
  if (!s.failed && ts_set_input_grad(n, 0, gx, grads)) s.failed = 1;
  return ts_scope_close(&s);
}

ts_tensor *ts_var(ts_tensor *a, int ndims, const int *dims, int64_t correction, int keepdim, int take_sqrt) {
  ts_tensor *out = var_forward(a, ndims, dims, correction, keepdim, take_sqrt);
  if (!out || !ts_any_requires_grad(1, &a)) return out;
  ts_tensor *save[2] = {a, out};
  out = record_reduction(take_sqrt ? "std" : "var", var_backward, a, ndims, dims, out, 2, save);
  if (out) {
    out->grad_fn->i[P_CORRECTION] = correction;
    out->grad_fn->i[P_SQRT] = take_sqrt != 0;
  }
  return out;
}

/* d |x|_p = sign(x) |x|^(p-1) / |x|_p^(p-1); the inf-norm shares like max; p = 0 has none.
   Where the norm is 0 the gradient is 0 (PyTorch's subgradient choice). */
static int norm_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  ts_tensor *x = ts_node_saved(n, 0), *out = ts_node_saved(n, 1);
  if (!x || !out) return ts_last_status();
  double p = n->d[0];
  if (p == 0) return TS_OK;
  ts_scope s = {0};
  ts_tensor *sign = ts_s_unary(&s, TS_SIGN, x), *gx;
  if (isinf(p)) {
    gx = ts_s_binary(&s, TS_MUL, sign, extreme_grad(&s, n, g, ts_s_unary(&s, TS_ABS, x), out));
  } else {
    ts_tensor *ratio = sign;
    if (p != 1) {
      ts_tensor *zero = ts_scope_keep(&s, ts_full(0, NULL, 0, x->dtype, x->device));
      ts_tensor *num = ts_s_binary(&s, TS_MUL, sign, ts_s_scalar(&s, TS_POW, ts_s_unary(&s, TS_ABS, x), p - 1));
      /* for p < 1, |0|^(p-1) is inf and sign(0) * inf is NaN: zero elements get 0, as PyTorch */
      if (p < 1) num = ts_s_where(&s, ts_s_scalar(&s, TS_EQ, x, 0), zero, num);
      ts_tensor *den = spread(&s, n, ts_s_scalar(&s, TS_POW, out, p - 1));
      /* 0/0 where the whole slice is zero: the gradient is 0 there */
      ratio = ts_s_where(&s, ts_s_scalar(&s, TS_EQ, den, 0), zero, ts_s_binary(&s, TS_DIV, num, den));
    }
    gx = ts_s_binary(&s, TS_MUL, spread(&s, n, g), ratio);
  }
  if (!s.failed && ts_set_input_grad(n, 0, gx, grads)) s.failed = 1;
  return ts_scope_close(&s);
}

ts_tensor *ts_norm(ts_tensor *a, double p, int ndims, const int *dims, int keepdim) {
  ts_tensor *out = norm_forward(a, p, ndims, dims, keepdim);
  if (!out || !ts_any_requires_grad(1, &a)) return out;
  ts_tensor *save[2] = {a, out};
  out = record_reduction("norm", norm_backward, a, ndims, dims, out, 2, save);
  if (out) out->grad_fn->d[0] = p;
  return out;
}

/* max/min along a dim: the gradient goes to the element each index picked. */
static int max_dim_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  ts_tensor *idx = ts_node_saved(n, 0);
  if (!idx) return ts_last_status();
  const ts_edge *e = ts_node_input(n, 0);
  int dim = (int)n->i[0];
  ts_scope s = {0};
  ts_tensor *gk = g, *ik = idx;
  if (!n->i[1] && e->ndim > 0) {
    gk = ts_scope_keep(&s, ts_unsqueeze(g, dim));
    ik = ts_scope_keep(&s, ts_unsqueeze(idx, dim));
  }
  ts_tensor *zeros = ts_scope_keep(&s, ts_full(e->ndim, e->shape, 0, g->dtype, g->device));
  ts_tensor *gx = s.failed ? NULL : ts_scope_keep(&s, e->ndim ? ts_scatter(zeros, dim, ik, gk, TS_SCATTER_ADD) : (ts_retain(g), g));
  if (!s.failed && ts_set_input_grad(n, 0, gx, grads)) s.failed = 1;
  return ts_scope_close(&s);
}

int ts_max_dim(ts_tensor *a, int dim, int keepdim, int largest, ts_tensor **values, ts_tensor **indices) {
  int st = max_dim_forward(a, dim, keepdim, largest, values, indices);
  if (st || !ts_any_requires_grad(1, &a)) return st;
  ts_node *n = ts_grad_node(largest ? "max" : "min", max_dim_backward, 1, &a);
  if (!n) return TS_OK;
  int d = 0;
  ts_wrap_dim("max", dim, a->ndim, &d);
  n->i[0] = d;
  n->i[1] = keepdim != 0;
  return ts_node_finish_with_indices(n, values, indices);
}

/* linalg.c — matmul and bmm: operand checks, NumPy's matmul shape rules, batch broadcasting.
 *
 * matmul follows numpy.matmul and torch.matmul: 1-D @ 1-D is a dot product (a 0-d result); a 1-D
 * left operand acts as a row [1,k] and a 1-D right operand as a column [k,1], and the added dim
 * is removed from the result; the dims before the last two are batch dims and broadcast.
 *
 * The backend's bmm multiplies 3-D views [B,n,k] x [B,k,m]. A broadcast batch is never copied: it
 * reaches the backend as batch stride 0. Batch dims that cannot merge into one strided dim are
 * looped over here, one bmm per outer index. When the right operand has no batch of its own (a
 * linear layer: [..., n, k] @ [k, m]) the batch folds into the rows: one [B*n, k] x [k, m] product
 * is one large BLAS call instead of B small ones.
 *
 * Both are differentiable (autograd section at the end): the gradients are products again, and an
 * operand broadcast over batch dims gets its gradient summed over them inside one product.
 *
 * Operands are float32, float64, float16 or bfloat16 (both of one dtype). A backend whose compute
 * dtype for 16-bit values is the dtype itself (CUDA: cuBLASLt with float32 accumulation) multiplies
 * them natively; the CPU converts them to float32, runs one float32 product and rounds the result
 * back (float32 accumulation, one rounding at the end). Under autocast (autocast.h) products on CUDA
 * devices run in the autocast dtype. */
#include "autocast.h"
#include "autograd.h"
#include "backend.h"

#include <stdio.h>

/* A matrix operand: its two trailing dims (a 1-D operand seen as a row or a column). */
typedef struct {
  int64_t rows, cols;
  int64_t rs, cs;  /* element strides */
} matrix_dims;

static matrix_dims left_matrix(const ts_tensor *a) {
  int nd = a->ndim;
  if (nd == 1) return (matrix_dims){1, a->shape[0], a->shape[0] * a->stride[0], a->stride[0]};
  return (matrix_dims){a->shape[nd - 2], a->shape[nd - 1], a->stride[nd - 2], a->stride[nd - 1]};
}

static matrix_dims right_matrix(const ts_tensor *b) {
  int nd = b->ndim;
  if (nd == 1) return (matrix_dims){b->shape[0], 1, b->stride[0], 1};
  return (matrix_dims){b->shape[nd - 2], b->shape[nd - 1], b->stride[nd - 2], b->stride[nd - 1]};
}

static int check_operands(const char *op, const ts_tensor *a, const ts_tensor *b) {
  if (!a || !b) return ts_set_error(TS_ERR_ARG, "%s: NULL tensor", op);
  if (a->dtype != b->dtype || !ts_dtype_is_floating(a->dtype))
    return ts_set_error(TS_ERR_DTYPE, "%s: expected floating operands (float32, float64, float16 or bfloat16) of the "
                        "same dtype, got %s and %s", op, ts_dtype_name(a->dtype), ts_dtype_name(b->dtype));
  return ts_same_device(op, a, b);
}

static int incompatible(const char *op, const ts_tensor *a, const ts_tensor *b, const char *why) {
  return ts_set_error(TS_ERR_SHAPE, "%s: shapes %s and %s are not compatible%s", op, ts_tshape(a), ts_tshape(b), why);
}

/* A 3-D [batch, rows, cols] header over t's storage. */
static ts_tensor *view3(const ts_tensor *t, int64_t batch, int64_t batch_stride, matrix_dims m, int64_t offset) {
  int64_t shape[3] = {batch, m.rows, m.cols}, stride[3] = {batch_stride, m.rs, m.cs};
  return ts_tensor_over(t->storage, 3, shape, stride, offset, t->dtype);
}

static int run_bmm(const ts_backend *be, ts_tensor *out, ts_tensor *a, ts_tensor *b) {
  int st = out && a && b ? be->bmm(out, a, b) : ts_last_status();
  ts_release(out);
  ts_release(a);
  ts_release(b);
  return st;
}

/* ---- batch dims ------------------------------------------------------------------------------ */
typedef struct {
  int ndim;
  int64_t size[TS_MAX_DIMS];
  int64_t a[TS_MAX_DIMS], b[TS_MAX_DIMS], out[TS_MAX_DIMS]; /* element strides, 0 where broadcast */
} batch_plan;

static int batch_dims(const ts_tensor *t) { return t->ndim > 2 ? t->ndim - 2 : 0; }

/* Broadcasts the batch dims of a and b; out is contiguous with matrices of `per_matrix` elements. */
static int plan_batch(const ts_tensor *a, const ts_tensor *b, int64_t per_matrix, batch_plan *p, int64_t *shape) {
  int na = batch_dims(a), nb = batch_dims(b), n = na > nb ? na : nb;
  p->ndim = n;
  for (int i = 0; i < n; i++) {
    int da = i - (n - na), db = i - (n - nb);
    int64_t sa = da >= 0 ? a->shape[da] : 1, sb = db >= 0 ? b->shape[db] : 1;
    if (sa != sb && sa != 1 && sb != 1) {
      char why[160];
      snprintf(why, sizeof why, ": batch dims %s and %s do not broadcast", ts_shape_str(na, a->shape),
               ts_shape_str(nb, b->shape));
      return incompatible("matmul", a, b, why);
    }
    shape[i] = p->size[i] = sa == 1 ? sb : sa;
    p->a[i] = da >= 0 && sa == p->size[i] ? a->stride[da] : 0;
    p->b[i] = db >= 0 && sb == p->size[i] ? b->stride[db] : 0;
  }
  int64_t step = per_matrix;
  for (int i = n - 1; i >= 0; i--) {
    p->out[i] = step;
    step *= p->size[i];
  }
  return TS_OK;
}

/* Drops size-1 batch dims and merges neighbours that step through memory as one dim in a, b and
   out alike; afterwards only the innermost dim goes to the backend, the rest are looped over. */
static void coalesce(batch_plan *p) {
  int k = 0;
  for (int i = 0; i < p->ndim; i++) {
    if (p->size[i] == 1) continue;
    if (k > 0 && p->a[k - 1] == p->size[i] * p->a[i] && p->b[k - 1] == p->size[i] * p->b[i] &&
        p->out[k - 1] == p->size[i] * p->out[i]) {
      p->size[k - 1] *= p->size[i];
    } else {
      p->size[k] = p->size[i];
      k++;
    }
    p->a[k - 1] = p->a[i];
    p->b[k - 1] = p->b[i];
    p->out[k - 1] = p->out[i];
  }
  p->ndim = k;
}

/* [..., n, k] @ [k, m] with the batch and row dims of a forming one strided dim: one product of
   B*n rows. Returns 1 when it applied (the product ran, status in *st). */
static int try_fold_rows(const ts_backend *be, ts_tensor *out, ts_tensor *a, matrix_dims ma, ts_tensor *b,
                         matrix_dims mb, const batch_plan *p, int *st) {
  if (p->ndim != 1 || p->b[0] != 0 || p->a[0] == 0) return 0;
  if (ma.rows != 1 && p->a[0] != ma.rows * ma.rs) return 0;
  matrix_dims rows = {p->size[0] * ma.rows, ma.cols, ma.rows == 1 ? p->a[0] : ma.rs, ma.cs};
  matrix_dims result = {rows.rows, mb.cols, mb.cols, 1};
  *st = run_bmm(be, view3(out, 1, 0, result, out->offset), view3(a, 1, 0, rows, a->offset),
                view3(b, 1, 0, mb, b->offset));
  return 1;
}

/* One bmm over the innermost batch dim for every index of the outer ones. */
static int run_batches(const ts_backend *be, ts_tensor *out, ts_tensor *a, matrix_dims ma, ts_tensor *b,
                       matrix_dims mb, const batch_plan *p) {
  int inner = p->ndim - 1, outer = p->ndim > 0 ? p->ndim - 1 : 0;
  int64_t batch = p->ndim > 0 ? p->size[inner] : 1;
  int64_t sa = p->ndim > 0 ? p->a[inner] : 0, sb = p->ndim > 0 ? p->b[inner] : 0, so = p->ndim > 0 ? p->out[inner] : 0;
  matrix_dims mo = {ma.rows, mb.cols, mb.cols, 1};
  int64_t idx[TS_MAX_DIMS] = {0};
  for (;;) {
    int64_t oa = a->offset, ob = b->offset, oo = out->offset;
    for (int d = 0; d < outer; d++) {
      oa += idx[d] * p->a[d];
      ob += idx[d] * p->b[d];
      oo += idx[d] * p->out[d];
    }
    int st = run_bmm(be, view3(out, batch, so, mo, oo), view3(a, batch, sa, ma, oa), view3(b, batch, sb, mb, ob));
    if (st) return st;
    int d = outer - 1;
    while (d >= 0 && ++idx[d] == p->size[d]) idx[d--] = 0;
    if (d < 0) return TS_OK;
  }
}

/* forward(a, b) for 16-bit operands on a backend that computes them in float32: the operands
   converted, the product, the result rounded back (grad mode off: no nodes for the conversions). */
static ts_tensor *via_compute_dtype(ts_tensor *(*forward)(ts_tensor *, ts_tensor *), ts_tensor *a, ts_tensor *b,
                                    int compute) {
  int previous = ts_set_grad_enabled(0);
  ts_tensor *ac = ts_to_dtype(a, compute), *bc = ac ? ts_to_dtype(b, compute) : NULL;
  ts_tensor *wide = bc ? forward(ac, bc) : NULL, *out = wide ? ts_to_dtype(wide, a->dtype) : NULL;
  ts_release(ac);
  ts_release(bc);
  ts_release(wide);
  ts_set_grad_enabled(previous);
  return out;
}

/* The backend's compute dtype for the operands (they passed check_operands), or -1 on error. */
static int product_dtype(const ts_tensor *a) {
  const ts_backend *be = ts_backend_for(a->device);
  return be ? be->compute_dtype(a->dtype) : -1;
}

static ts_tensor *matmul_forward(ts_tensor *a, ts_tensor *b) {
  if (check_operands("matmul", a, b)) return NULL;
  int compute = product_dtype(a);
  if (compute < 0) return NULL;
  if (compute != a->dtype) return via_compute_dtype(matmul_forward, a, b, compute);
  if (a->ndim == 0 || b->ndim == 0)
    return incompatible("matmul", a, b, ": both operands need at least 1 dim"), (ts_tensor *)NULL;
  matrix_dims ma = left_matrix(a), mb = right_matrix(b);
  if (ma.cols != mb.rows) return incompatible("matmul", a, b, ""), (ts_tensor *)NULL;
  const ts_backend *be = TS_BACKEND(a->device, bmm, "matmul");
  if (!be) return NULL;

  batch_plan plan;
  int64_t shape[TS_MAX_DIMS];
  if (plan_batch(a, b, ma.rows * mb.cols, &plan, shape)) return NULL;
  int nd = plan.ndim;
  if (a->ndim > 1) shape[nd++] = ma.rows;
  if (b->ndim > 1) shape[nd++] = mb.cols;
  ts_tensor *out = ts_empty(nd, shape, a->dtype, a->device);
  if (!out || ts_numel(out) == 0) return out;

  coalesce(&plan);
  int st;
  if (!try_fold_rows(be, out, a, ma, b, mb, &plan, &st)) st = run_batches(be, out, a, ma, b, mb, &plan);
  if (st) {
    ts_release(out);
    return NULL;
  }
  return out;
}

static ts_tensor *bmm_forward(ts_tensor *a, ts_tensor *b) {
  if (check_operands("bmm", a, b)) return NULL;
  if (a->ndim != 3 || b->ndim != 3)
    return TS_FAIL_NULL(TS_ERR_SHAPE, "bmm: expected 3-D tensors [B,n,k] and [B,k,m], got shapes %s and %s",
                        ts_tshape(a), ts_tshape(b));
  if (a->shape[0] != b->shape[0] || a->shape[2] != b->shape[1])
    return incompatible("bmm", a, b, ""), (ts_tensor *)NULL;
  int compute = product_dtype(a);
  if (compute < 0) return NULL;
  if (compute != a->dtype) return via_compute_dtype(bmm_forward, a, b, compute);
  const ts_backend *be = TS_BACKEND(a->device, bmm, "bmm");
  if (!be) return NULL;
  int64_t shape[3] = {a->shape[0], a->shape[1], b->shape[2]};
  ts_tensor *out = ts_empty(3, shape, a->dtype, a->device);
  if (out && ts_numel(out) > 0 && be->bmm(out, a, b)) {
    ts_release(out);
    return NULL;
  }
  return out;
}

/* ---- autograd -------------------------------------------------------------------------------- */
/* For out = a @ b: ga = g @ b^T and gb = a^T @ g, with matmul's 1-D operands seen as the row [1,k]
   and the column [k,1] and g given back the dims matmul dropped. An operand broadcast over batch
   dims of the result gets the sum of its per-batch gradients there; that sum is folded into the
   contraction of one product (see contract), so neither the broadcast operand nor a stack of
   per-batch gradients is ever materialized. */
enum { SAVED_A = 0, SAVED_B = 1 };

static ts_tensor *keep_matrix_T(ts_scope *s, ts_tensor *t) {
  return s->failed || !t ? ts_scope_keep(s, NULL) : ts_scope_keep(s, ts_transpose(t, -2, -1));
}

/* A 1-D operand as a matrix: [1,k] on the left, [k,1] on the right. */
static ts_tensor *keep_as_matrix(ts_scope *s, ts_tensor *t, int left) {
  if (s->failed || !t) return ts_scope_keep(s, NULL);
  if (t->ndim != 1) return ts_scope_keep(s, (ts_retain(t), t));
  return ts_scope_keep(s, ts_unsqueeze(t, left ? 0 : 1));
}

/* g with the row dim (1-D a) and the column dim (1-D b) that matmul removed put back. */
static ts_tensor *keep_grad_as_matrix(ts_scope *s, ts_tensor *g, int a_ndim, int b_ndim) {
  ts_tensor *r = ts_scope_keep(s, (ts_retain(g), g));
  if (r && b_ndim == 1) r = ts_scope_keep(s, ts_unsqueeze(r, r->ndim));
  if (r && a_ndim == 1) r = ts_scope_keep(s, ts_unsqueeze(r, r->ndim - 1));
  return r;
}

/* Marks the result's batch dims (nb of `batch`) that an operand of shape e->shape was broadcast
   over: it has size 1 there or lacks the dim. Returns how many there are. */
static int broadcast_batch_dims(const ts_edge *e, int nb, const int64_t *batch, int *summed) {
  int own = e->ndim > 2 ? e->ndim - 2 : 0, count = 0;
  for (int i = 0; i < nb; i++) {
    int d = i - (nb - own);
    summed[i] = batch[i] != 1 && (d < 0 || e->shape[d] == 1);
    count += summed[i];
  }
  return count;
}

/* sum over the batch dims marked in `summed` of x[i]^T @ y[i], for x [S..., p, q] and y
   [S..., p, r] (either may be broadcast in S, of nb dims `batch`). The summed dims are moved next
   to the rows and merged with them: one product of depth |summed| * p, batched over the other dims,
   does the sum. The result is [S without the summed dims..., q, r], contiguous. */
static ts_tensor *contract(ts_tensor *x, ts_tensor *y, int nb, const int64_t *batch, const int *summed) {
  ts_scope s = {0};
  int order[TS_MAX_DIMS], kept = 0;
  int64_t xfull[TS_MAX_DIMS], yfull[TS_MAX_DIMS], xs[TS_MAX_DIMS], ys[TS_MAX_DIMS], depth = x->shape[x->ndim - 2];
  for (int i = 0; i < nb; i++) {
    xfull[i] = yfull[i] = batch[i];
    if (!summed[i]) {
      order[kept] = i;
      xs[kept] = ys[kept] = batch[i];
      kept++;
    }
  }
  for (int i = 0, k = kept; i < nb; i++)
    if (summed[i]) {
      order[k++] = i;
      depth *= batch[i];
    }
  order[nb] = nb;
  order[nb + 1] = nb + 1;
  xfull[nb] = x->shape[x->ndim - 2], xfull[nb + 1] = x->shape[x->ndim - 1];
  yfull[nb] = y->shape[y->ndim - 2], yfull[nb + 1] = y->shape[y->ndim - 1];
  xs[kept] = ys[kept] = depth;
  xs[kept + 1] = xfull[nb + 1];
  ys[kept + 1] = yfull[nb + 1];
  ts_tensor *xe = ts_scope_keep(&s, ts_expand(x, nb + 2, xfull));
  ts_tensor *ye = ts_scope_keep(&s, ts_expand(y, nb + 2, yfull));
  ts_tensor *xp = xe ? ts_scope_keep(&s, ts_permute(xe, nb + 2, order)) : NULL;
  ts_tensor *yp = ye ? ts_scope_keep(&s, ts_permute(ye, nb + 2, order)) : NULL;
  ts_tensor *xm = xp ? ts_scope_keep(&s, ts_reshape(xp, kept + 2, xs)) : NULL;
  ts_tensor *ym = yp ? ts_scope_keep(&s, ts_reshape(yp, kept + 2, ys)) : NULL;
  ts_tensor *xt = keep_matrix_T(&s, xm);
  ts_tensor *r = xt && ym ? ts_matmul(xt, ym) : NULL;
  if (!r) s.failed = 1;
  if (ts_scope_close(&s)) {
    ts_release(r);
    return NULL;
  }
  return r;
}

/* The gradient x^T @ y of the operand with edge e, summed over the batch dims it was broadcast
   over and shaped like it. x and y are batched like the result, of batch dims those of g2. */
static ts_tensor *operand_grad(ts_scope *s, ts_tensor *x, ts_tensor *y, ts_tensor *g2, const ts_edge *e) {
  if (s->failed || !x || !y) return ts_scope_keep(s, NULL);
  int summed[TS_MAX_DIMS], nb = g2->ndim - 2;
  ts_tensor *full;
  if (broadcast_batch_dims(e, nb, g2->shape, summed)) {
    full = ts_scope_keep(s, contract(x, y, nb, g2->shape, summed));
  } else { /* the operand has every batch dim of the result: a plain (broadcasting) product */
    ts_tensor *xt = keep_matrix_T(s, x);
    full = xt ? ts_scope_keep(s, ts_matmul(xt, y)) : NULL;
  }
  return full ? ts_scope_keep(s, ts_reshape(full, e->ndim, e->shape)) : NULL;
}

static int matmul_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  const ts_edge *ea = ts_node_input(n, 0), *eb = ts_node_input(n, 1);
  int need_a = ts_node_needs_grad(n, 0), need_b = ts_node_needs_grad(n, 1);
  ts_tensor *a = need_b ? ts_node_saved(n, SAVED_A) : NULL, *b = need_a ? ts_node_saved(n, SAVED_B) : NULL;
  if ((need_b && !a) || (need_a && !b)) return ts_last_status();
  ts_scope s = {0};
  ts_tensor *g2 = keep_grad_as_matrix(&s, g, ea->ndim, eb->ndim), *ga = NULL, *gb = NULL;
  if (need_a) /* g @ b^T = (g^T)^T @ b^T */
    ga = operand_grad(&s, keep_matrix_T(&s, g2), keep_matrix_T(&s, keep_as_matrix(&s, b, 0)), g2, ea);
  if (need_b) gb = operand_grad(&s, keep_as_matrix(&s, a, 1), g2, g2, eb);
  if (!s.failed && (ts_set_input_grad(n, 0, ga, grads) || ts_set_input_grad(n, 1, gb, grads))) s.failed = 1;
  return ts_scope_close(&s);
}

static int bmm_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  int need_a = ts_node_needs_grad(n, 0), need_b = ts_node_needs_grad(n, 1);
  ts_tensor *a = need_b ? ts_node_saved(n, SAVED_A) : NULL, *b = need_a ? ts_node_saved(n, SAVED_B) : NULL;
  if ((need_b && !a) || (need_a && !b)) return ts_last_status();
  ts_scope s = {0};
  ts_tensor *ga = need_a ? ts_scope_keep(&s, ts_bmm(g, keep_matrix_T(&s, b))) : NULL;
  ts_tensor *gb = need_b ? ts_scope_keep(&s, ts_bmm(keep_matrix_T(&s, a), g)) : NULL;
  if (!s.failed && (ts_set_input_grad(n, 0, ga, grads) || ts_set_input_grad(n, 1, gb, grads))) s.failed = 1;
  return ts_scope_close(&s);
}

/* Records out = a @ b; each operand's gradient needs only the other operand, so only those the
   backward will read are saved. */
static ts_tensor *record_product(const char *name, ts_backward_fn backward, ts_tensor *a, ts_tensor *b, ts_tensor *out) {
  if (!out) return NULL;
  ts_tensor *inputs[2] = {a, b};
  ts_node *n = ts_grad_node(name, backward, 2, inputs);
  if (!n) return out;
  ts_tensor *save[2] = {ts_node_needs_grad(n, 1) ? a : NULL, ts_node_needs_grad(n, 0) ? b : NULL};
  return ts_node_finish_saving(n, out, 2, save);
}

/* Under autocast, the product of the operands cast to its dtype (recorded casts, then product). */
static ts_tensor *autocast_product(ts_tensor *(*product)(ts_tensor *, ts_tensor *), ts_tensor *a, ts_tensor *b) {
  ts_tensor *in[2] = {a, b}, *cast[2];
  if (ts_autocast_cast(TS_AUTOCAST_LOW, 2, in, cast)) return NULL;
  ts_tensor *out = product(cast[0], cast[1]);
  ts_autocast_release(2, cast);
  return out;
}

ts_tensor *ts_matmul(ts_tensor *a, ts_tensor *b) {
  if (ts_autocast_needed(TS_AUTOCAST_LOW, 2, (ts_tensor *[]){a, b})) return autocast_product(ts_matmul, a, b);
  return record_product("matmul", matmul_backward, a, b, matmul_forward(a, b));
}

ts_tensor *ts_bmm(ts_tensor *a, ts_tensor *b) {
  if (ts_autocast_needed(TS_AUTOCAST_LOW, 2, (ts_tensor *[]){a, b})) return autocast_product(ts_bmm, a, b);
  return record_product("bmm", bmm_backward, a, b, bmm_forward(a, b));
}

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
 * is one large BLAS call instead of B small ones. */
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
  if (a->dtype != b->dtype || (a->dtype != TS_F32 && a->dtype != TS_F64))
    return ts_set_error(TS_ERR_DTYPE, "%s: expected float32 or float64 operands of the same dtype, got %s and %s", op,
                        ts_dtype_name(a->dtype), ts_dtype_name(b->dtype));
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

ts_tensor *ts_matmul(ts_tensor *a, ts_tensor *b) {
  if (check_operands("matmul", a, b)) return NULL;
  if (a->ndim == 0 || b->ndim == 0)
    return incompatible("matmul", a, b, ": both operands need at least 1 dim"), (ts_tensor *)NULL;
  matrix_dims ma = left_matrix(a), mb = right_matrix(b);
  if (ma.cols != mb.rows) return incompatible("matmul", a, b, ""), (ts_tensor *)NULL;
  const ts_backend *be = ts_backend_for(a->device);
  if (!be || TS_BACKEND_FN(be, bmm, "matmul", a->device)) return NULL;

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

ts_tensor *ts_bmm(ts_tensor *a, ts_tensor *b) {
  if (check_operands("bmm", a, b)) return NULL;
  if (a->ndim != 3 || b->ndim != 3)
    return TS_FAIL_NULL(TS_ERR_SHAPE, "bmm: expected 3-D tensors [B,n,k] and [B,k,m], got shapes %s and %s",
                        ts_tshape(a), ts_tshape(b));
  if (a->shape[0] != b->shape[0] || a->shape[2] != b->shape[1])
    return incompatible("bmm", a, b, ""), (ts_tensor *)NULL;
  const ts_backend *be = ts_backend_for(a->device);
  if (!be || TS_BACKEND_FN(be, bmm, "bmm", a->device)) return NULL;
  int64_t shape[3] = {a->shape[0], a->shape[1], b->shape[2]};
  ts_tensor *out = ts_empty(3, shape, a->dtype, a->device);
  if (out && ts_numel(out) > 0 && be->bmm(out, a, b)) {
    ts_release(out);
    return NULL;
  }
  return out;
}

/* sort.c — sort and topk along any dim.
 *
 * The backend works on rows of the last dim: the runtime moves `dim` last with a transpose view,
 * converts the values to the backend's compute dtype (an exact widening, so the order is kept),
 * and moves the results back into contiguous tensors of the input's dtype and int64 indices.
 * NaN ranks above every number, as in PyTorch; the sort is always stable, so `stable` only
 * documents the caller's intent.
 *
 * The values are differentiable (the indices are not): each element's gradient goes back to the
 * position its index names, as PyTorch's sort and topk. */
#include "autograd.h"
#include "backend.h"

typedef int (*row_kernel)(const ts_backend *be, ts_tensor *values, ts_tensor *indices, const ts_tensor *rows,
                          const void *args);

/* A contiguous tensor of `dtype` holding t with its last dim moved back to `dim`. */
static ts_tensor *move_back(ts_tensor *t, int dim, int dtype) {
  ts_tensor *view = ts_transpose(t, dim, -1);
  if (!view) return NULL;
  ts_tensor *out = NULL;
  if (view->dtype == dtype && ts_is_contiguous(view)) {
    ts_retain(view);
    out = view;
  } else if ((out = ts_empty(view->ndim, view->shape, dtype, view->device)) && ts_copy_(out, view)) {
    ts_release(out);
    out = NULL;
  }
  ts_release(view);
  return out;
}

/* Runs `kernel` on the rows of `a` along `dim` (a 0-d tensor is one row of one element) and
   returns results whose `dim` has `out_len` elements. */
static int run_rows(ts_tensor *a, int dim, int64_t out_len, row_kernel kernel, const void *args,
                    ts_tensor **values, ts_tensor **indices) {
  const ts_backend *be = ts_backend_for(a->device);
  if (!be) return ts_last_status();
  int64_t one = 1;
  ts_tensor *moved = a->ndim ? ts_transpose(a, dim, -1) : ts_reshape(a, 1, &one);
  ts_tensor *rows = moved ? ts_to_dtype(moved, be->compute_dtype(a->dtype)) : NULL;
  ts_release(moved);
  if (!rows) return ts_last_status();
  int64_t shape[TS_MAX_DIMS];
  for (int d = 0; d < rows->ndim; d++) shape[d] = rows->shape[d];
  shape[rows->ndim - 1] = out_len;
  ts_tensor *v = ts_empty(rows->ndim, shape, rows->dtype, a->device);
  ts_tensor *ix = v ? ts_empty(rows->ndim, shape, TS_I64, a->device) : NULL;
  int st = ix ? kernel(be, v, ix, rows, args) : ts_last_status();
  ts_release(rows);
  ts_tensor *rv = NULL, *ri = NULL;
  if (!st) {
    int last = a->ndim ? dim : 0;
    rv = move_back(v, last, a->dtype);
    ri = rv ? move_back(ix, last, TS_I64) : NULL;
  }
  ts_release(v);
  ts_release(ix);
  if (rv && ri && a->ndim == 0 && out_len == 1) { /* a 0-d input gives 0-d results */
    ts_tensor *v0 = ts_reshape(rv, 0, NULL), *i0 = ts_reshape(ri, 0, NULL);
    ts_release(rv);
    ts_release(ri);
    rv = v0;
    ri = i0;
  }
  if (!st && (!rv || !ri)) st = ts_last_status();
  if (st) {
    ts_release(rv);
    ts_release(ri);
    return st;
  }
  *values = rv;
  *indices = ri;
  return TS_OK;
}

static int check_outputs(const char *op, ts_tensor **values, ts_tensor **indices) {
  if (!values || !indices) return ts_set_error(TS_ERR_ARG, "%s: values and indices must not be NULL", op);
  *values = *indices = NULL;
  return TS_OK;
}

/* ---- autograd -------------------------------------------------------------------------------- */
/* g scattered into zeros at the indices along dim n->i[0]; the indices of one row are distinct. */
static int values_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  ts_tensor *indices = ts_node_saved(n, 0);
  if (!indices) return ts_last_status();
  const ts_edge *e = ts_node_input(n, 0);
  if (e->ndim == 0) return ts_set_input_grad(n, 0, g, grads); /* its one element, unmoved */
  ts_tensor *gx = ts_full(e->ndim, e->shape, 0, g->dtype, g->device);
  int st = gx ? ts_scatter_(gx, (int)n->i[0], indices, g, TS_SCATTER_REPLACE) : ts_last_status();
  if (!st) st = ts_set_input_grad(n, 0, gx, grads);
  ts_release(gx);
  return st;
}

/* Runs the rows with grad mode off, then records one node on the values. */
static int run_rows_recorded(const char *name, ts_tensor *a, int dim, int64_t out_len, row_kernel kernel,
                             const void *args, ts_tensor **values, ts_tensor **indices) {
  int previous = ts_set_grad_enabled(0);
  int st = run_rows(a, dim, out_len, kernel, args, values, indices);
  ts_set_grad_enabled(previous);
  if (st) return st;
  ts_node *n = ts_grad_node(name, values_backward, 1, &a);
  if (!n) return TS_OK;
  n->i[0] = dim;
  return ts_node_finish_with_indices(n, values, indices);
}

/* ---- sort and topk --------------------------------------------------------------------------- */
typedef struct { int descending, stable; } sort_args;
static int call_sort(const ts_backend *be, ts_tensor *values, ts_tensor *indices, const ts_tensor *rows,
                     const void *p) {
  const sort_args *s = p;
  return be->sort(values, indices, rows, s->descending, s->stable);
}

int ts_sort(ts_tensor *a, int dim, int descending, int stable, ts_tensor **values, ts_tensor **indices) {
  int d;
  if (check_outputs("sort", values, indices) || ts_wrap_dim("sort", dim, a->ndim, &d)) return ts_last_status();
  const ts_backend *be = TS_BACKEND(a->device, sort, "sort");
  if (!be) return ts_last_status();
  int64_t n = a->ndim ? a->shape[d] : 1;
  sort_args args = {descending != 0, stable != 0};
  return run_rows_recorded("sort", a, d, n, call_sort, &args, values, indices);
}

typedef struct { int64_t k; int largest, sorted; } topk_args;
static int call_topk(const ts_backend *be, ts_tensor *values, ts_tensor *indices, const ts_tensor *rows,
                     const void *p) {
  const topk_args *t = p;
  return be->topk(values, indices, rows, t->k, t->largest, t->sorted);
}

int ts_topk(ts_tensor *a, int64_t k, int dim, int largest, int sorted, ts_tensor **values, ts_tensor **indices) {
  int d;
  if (check_outputs("topk", values, indices) || ts_wrap_dim("topk", dim, a->ndim, &d)) return ts_last_status();
  int64_t n = a->ndim ? a->shape[d] : 1;
  if (k < 0 || k > n)
    return ts_set_error(TS_ERR_INDEX, "topk: k %lld out of range for dim %d of size %lld (shape %s)", (long long)k, d,
                        (long long)n, ts_tshape(a));
  const ts_backend *be = TS_BACKEND(a->device, topk, "topk");
  if (!be) return ts_last_status();
  topk_args args = {k, largest != 0, sorted != 0};
  return run_rows_recorded("topk", a, d, k, call_topk, &args, values, indices);
}

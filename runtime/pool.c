/* pool.c — avg_pool2d, max_pool2d and adaptive_avg_pool2d: PyTorch's checks and output sizes,
 * the dtype plumbing around the backend's kernels, and their autograd nodes.
 *
 * Inputs are [N, C, H, W] or unbatched [C, H, W]; the kernels see [planes, H, W], so both go
 * through unchanged. Output size per spatial dim (torch's pooling_output_shape):
 *     out = floor((in + 2 pad - dilation (k - 1) - 1 + (ceil_mode ? stride - 1 : 0)) / stride) + 1,
 * minus one when ceil_mode would start the last window inside the right padding. max_pool2d keeps
 * its argmax indices for the backward, which scatters the gradient onto them. */
#include "autograd.h"
#include "nn.h"

typedef struct {
  int64_t kernel[2], stride[2], padding[2], dilation[2];
  int ceil_mode, count_include_pad;
} pool_params;

/* ---- checks and sizes ------------------------------------------------------------------------ */
static int check_input(const char *op, const ts_tensor *x) {
  if (!x) return ts_set_error(TS_ERR_ARG, "%s: NULL input", op);
  if (x->ndim != 3 && x->ndim != 4)
    return ts_set_error(TS_ERR_SHAPE, "%s: expected a 3-D [C, H, W] or 4-D [N, C, H, W] input, got %s", op, ts_tshape(x));
  for (int d = x->ndim - 3; d < x->ndim; d++)
    if (x->shape[d] == 0)
      return ts_set_error(TS_ERR_SHAPE, "%s: expected non-zero channels, height and width, got input %s", op, ts_tshape(x));
  if (!ts_dtype_is_floating(x->dtype))
    return ts_set_error(TS_ERR_DTYPE, "%s: expected a floating point input, got %s", op, ts_dtype_name(x->dtype));
  return TS_OK;
}

/* torch's limits: positive kernel, stride and dilation; padding at most half the (dilated) kernel. */
static int check_window(const char *op, const pool_params *p, int dilated) {
  for (int k = 0; k < 2; k++) {
    if (p->kernel[k] <= 0 || p->stride[k] <= 0 || p->dilation[k] <= 0)
      return ts_set_error(TS_ERR_ARG, "%s: kernel size (%lld, %lld), stride (%lld, %lld) and dilation (%lld, %lld) "
                          "must be positive", op, (long long)p->kernel[0], (long long)p->kernel[1],
                          (long long)p->stride[0], (long long)p->stride[1], (long long)p->dilation[0],
                          (long long)p->dilation[1]);
    int64_t span = dilated ? (p->kernel[k] - 1) * p->dilation[k] + 1 : p->kernel[k];
    if (p->padding[k] < 0 || p->padding[k] > span / 2)
      return ts_set_error(TS_ERR_ARG, "%s: padding should be non-negative and at most half of the %skernel size, "
                          "but got padding (%lld, %lld) for kernel size (%lld, %lld)%s", op, dilated ? "effective " : "",
                          (long long)p->padding[0], (long long)p->padding[1], (long long)p->kernel[0],
                          (long long)p->kernel[1], dilated ? " and its dilation" : "");
  }
  return TS_OK;
}

static int64_t floor_div(int64_t a, int64_t b) { return a / b - (a % b != 0 && (a < 0) != (b < 0)); }

static int64_t pooled_size(int64_t in, int64_t k, int64_t pad, int64_t stride, int64_t dil, int ceil_mode) {
  int64_t out = floor_div(in + 2 * pad - dil * (k - 1) - 1 + (ceil_mode ? stride - 1 : 0), stride) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) out--;
  return out;
}

static int output_shape(const char *op, const ts_tensor *x, const pool_params *p, int64_t *shape) {
  int nd = x->ndim;
  for (int d = 0; d < nd - 2; d++) shape[d] = x->shape[d];
  for (int k = 0; k < 2; k++)
    shape[nd - 2 + k] = pooled_size(x->shape[nd - 2 + k], p->kernel[k], p->padding[k], p->stride[k], p->dilation[k],
                                    p->ceil_mode);
  if (shape[nd - 2] < 1 || shape[nd - 1] < 1)
    return ts_set_error(TS_ERR_SHAPE, "%s: input %s gives an output size of %lld x %lld, which is too small", op,
                        ts_tshape(x), (long long)shape[nd - 2], (long long)shape[nd - 1]);
  return TS_OK;
}

/* ---- plumbing -------------------------------------------------------------------------------- */
/* The result in the caller's dtype: `out` itself or a rounded copy. Consumes out. */
static ts_tensor *in_dtype(ts_tensor *out, int dtype) {
  if (!out || out->dtype == dtype) return out;
  ts_tensor *r = ts_to_dtype(out, dtype);
  ts_release(out);
  return r;
}

static void store_params(ts_node *n, const pool_params *p) {
  for (int k = 0; k < 2; k++) {
    n->i[k] = p->kernel[k];
    n->i[2 + k] = p->stride[k];
    n->i[4 + k] = p->padding[k];
    n->i[6 + k] = p->dilation[k];
  }
  n->i[8] = p->count_include_pad;
}

static pool_params params_of(const ts_node *n) {
  pool_params p = {{n->i[0], n->i[1]}, {n->i[2], n->i[3]}, {n->i[4], n->i[5]}, {n->i[6], n->i[7]}, 0, (int)n->i[8]};
  return p;
}

/* The input gradient of node n in the compute dtype: a fresh tensor for the kernel to fill. */
static ts_tensor *input_grad(ts_scope *s, ts_node *n, int dtype) {
  const ts_edge *e = ts_node_input(n, 0);
  return s->failed ? NULL : ts_scope_keep(s, ts_empty(e->ndim, e->shape, dtype, e->device));
}

typedef enum { POOL_AVG, POOL_MAX, POOL_ADAPTIVE } pool_kind;

static int pool_backward(ts_node *n, ts_tensor *g, ts_tensor **grads, pool_kind kind) {
  const ts_backend *be = ts_backend_for(g->device);
  if (!be) return ts_last_status();
  pool_params p = params_of(n);
  ts_tensor *indices = kind == POOL_MAX ? ts_node_saved(n, 0) : NULL;
  if (kind == POOL_MAX && !indices) return ts_last_status();
  int compute = be->compute_dtype(g->dtype), st;
  ts_scope s = {0};
  ts_tensor *gc = ts_scope_keep(&s, ts_nn_dense(g, compute)), *gx = input_grad(&s, n, compute);
  if (s.failed) return ts_scope_close(&s);
  switch (kind) {
  case POOL_AVG:
    st = TS_BACKEND_FN(be, avg_pool2d_backward, n->name, g->device) ||
         be->avg_pool2d_backward(gx, gc, p.kernel, p.stride, p.padding, p.count_include_pad);
    break;
  case POOL_MAX:
    st = TS_BACKEND_FN(be, max_pool2d_backward, n->name, g->device) || be->max_pool2d_backward(gx, gc, indices);
    break;
  default:
    st = TS_BACKEND_FN(be, adaptive_avg_pool2d_backward, n->name, g->device) ||
         be->adaptive_avg_pool2d_backward(gx, gc);
    break;
  }
  if (st || ts_set_input_grad(n, 0, gx, grads)) s.failed = 1;
  return ts_scope_close(&s);
}

static int avg_pool2d_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) { return pool_backward(n, g, grads, POOL_AVG); }
static int max_pool2d_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) { return pool_backward(n, g, grads, POOL_MAX); }
static int adaptive_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) { return pool_backward(n, g, grads, POOL_ADAPTIVE); }

/* Records a pooling node for out (saving `saved` when not NULL); releases out on failure. */
static ts_tensor *record(const char *name, ts_backward_fn backward, ts_tensor *x, const pool_params *p,
                         ts_tensor *saved, ts_tensor *out) {
  ts_node *n = out ? ts_grad_node(name, backward, 1, &x) : NULL;
  if (!n) return out;
  store_params(n, p);
  if (saved && ts_node_save(n, saved)) {
    ts_node_release(n);
    ts_release(out);
    return NULL;
  }
  return ts_node_finish(n, out);
}

/* Runs one pooling forward: out (and for max pooling, indices) of `shape` from x in the compute
   dtype, then out in x's dtype. Grad mode is off around the plumbing. */
static ts_tensor *pool_forward(const ts_backend *be, pool_kind kind, ts_tensor *x, const pool_params *p,
                               const int64_t *shape, ts_tensor **indices) {
  int previous = ts_set_grad_enabled(0), compute = be->compute_dtype(x->dtype);
  ts_tensor *xc = ts_nn_dense(x, compute);
  ts_tensor *out = xc ? ts_empty(x->ndim, shape, compute, x->device) : NULL;
  if (out && kind == POOL_MAX && !(*indices = ts_empty(x->ndim, shape, TS_I64, x->device))) {
    ts_release(out);
    out = NULL;
  }
  if (out && ts_numel(out) > 0) {
    int st = kind == POOL_AVG ? be->avg_pool2d(out, xc, p->kernel, p->stride, p->padding, p->count_include_pad)
             : kind == POOL_MAX ? be->max_pool2d(out, *indices, xc, p->kernel, p->stride, p->padding, p->dilation)
                                : be->adaptive_avg_pool2d(out, xc);
    if (st) {
      ts_release(out);
      out = NULL;
    }
  }
  ts_release(xc);
  out = in_dtype(out, x->dtype);
  ts_set_grad_enabled(previous);
  return out;
}

/* ---- the ops --------------------------------------------------------------------------------- */
ts_tensor *ts_avg_pool2d(ts_tensor *x, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                         int ceil_mode, int count_include_pad) {
  pool_params p = {{kh, kw}, {sh, sw}, {ph, pw}, {1, 1}, ceil_mode != 0, count_include_pad != 0};
  int64_t shape[4];
  if (check_input("avg_pool2d", x) || check_window("avg_pool2d", &p, 0) || output_shape("avg_pool2d", x, &p, shape))
    return NULL;
  const ts_backend *be = TS_BACKEND(x->device, avg_pool2d, "avg_pool2d");
  if (!be) return NULL;
  ts_tensor *out = pool_forward(be, POOL_AVG, x, &p, shape, NULL);
  return record("avg_pool2d", avg_pool2d_backward, x, &p, NULL, out);
}

ts_tensor *ts_max_pool2d(ts_tensor *x, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                         int64_t dh, int64_t dw, int ceil_mode) {
  pool_params p = {{kh, kw}, {sh, sw}, {ph, pw}, {dh, dw}, ceil_mode != 0, 0};
  int64_t shape[4];
  if (check_input("max_pool2d", x) || check_window("max_pool2d", &p, 1) || output_shape("max_pool2d", x, &p, shape))
    return NULL;
  const ts_backend *be = TS_BACKEND(x->device, max_pool2d, "max_pool2d");
  if (!be) return NULL;
  ts_tensor *indices = NULL;
  ts_tensor *out = pool_forward(be, POOL_MAX, x, &p, shape, &indices);
  out = record("max_pool2d", max_pool2d_backward, x, &p, indices, out);
  ts_release(indices);
  return out;
}

ts_tensor *ts_adaptive_avg_pool2d(ts_tensor *x, int64_t out_h, int64_t out_w) {
  if (check_input("adaptive_avg_pool2d", x)) return NULL;
  if (out_h <= 0 || out_w <= 0)
    return TS_FAIL_NULL(TS_ERR_ARG, "adaptive_avg_pool2d: output size must be positive, got (%lld, %lld)",
                        (long long)out_h, (long long)out_w);
  const ts_backend *be = TS_BACKEND(x->device, adaptive_avg_pool2d, "adaptive_avg_pool2d");
  if (!be) return NULL;
  int nd = x->ndim;
  int64_t shape[4] = {x->shape[0], x->shape[1], x->shape[2], x->shape[3]};
  shape[nd - 2] = out_h;
  shape[nd - 1] = out_w;
  pool_params p = {{0, 0}, {0, 0}, {0, 0}, {1, 1}, 0, 0};
  ts_tensor *out = pool_forward(be, POOL_ADAPTIVE, x, &p, shape, NULL);
  return record("adaptive_avg_pool2d", adaptive_backward, x, &p, NULL, out);
}

/* conv.c — conv2d: PyTorch's argument checks and output size, the dtype plumbing around the
 * backend's kernel, and its autograd node (one fused backward kernel for gx, gw and gb).
 *
 * Unbatched [C, H, W] inputs are viewed as a batch of one (unsqueeze/squeeze record their own
 * views). float16 and bfloat16 compute in the backend's compute dtype (float32) and are rounded
 * back; the backend sees contiguous operands only. Under autocast (autocast.h) convolutions on CUDA
 * devices run in the autocast dtype. */
#include "autocast.h"
#include "autograd.h"
#include "nn.h"

typedef struct {
  int64_t stride[2], padding[2], dilation[2], groups;
} conv_params;

/* ---- checks ---------------------------------------------------------------------------------- */
static int check_params(const conv_params *p) {
  for (int k = 0; k < 2; k++) {
    if (p->stride[k] <= 0)
      return ts_set_error(TS_ERR_ARG, "conv2d: non-positive stride is not supported, got stride (%lld, %lld)",
                          (long long)p->stride[0], (long long)p->stride[1]);
    if (p->padding[k] < 0)
      return ts_set_error(TS_ERR_ARG, "conv2d: negative padding is not supported, got padding (%lld, %lld)",
                          (long long)p->padding[0], (long long)p->padding[1]);
    if (p->dilation[k] <= 0)
      return ts_set_error(TS_ERR_ARG, "conv2d: dilation should be greater than zero, got dilation (%lld, %lld)",
                          (long long)p->dilation[0], (long long)p->dilation[1]);
  }
  if (p->groups <= 0)
    return ts_set_error(TS_ERR_ARG, "conv2d: non-positive groups is not supported, got groups %lld", (long long)p->groups);
  return TS_OK;
}

static int check_dtypes(const ts_tensor *x, const ts_tensor *w, const ts_tensor *b) {
  if (!ts_dtype_is_floating(x->dtype))
    return ts_set_error(TS_ERR_DTYPE, "conv2d: expected a floating point input, got %s", ts_dtype_name(x->dtype));
  if (w->dtype != x->dtype || (b && b->dtype != x->dtype))
    return ts_set_error(TS_ERR_DTYPE, "conv2d: input (%s), weight (%s) and bias (%s) should have the same dtype",
                        ts_dtype_name(x->dtype), ts_dtype_name(w->dtype), b ? ts_dtype_name(b->dtype) : "none");
  if (ts_same_device("conv2d", x, w) || (b && ts_same_device("conv2d", x, b))) return ts_last_status();
  return TS_OK;
}

static int check_shapes(const ts_tensor *x, const ts_tensor *w, const ts_tensor *b, const conv_params *p) {
  if (w->ndim != 4)
    return ts_set_error(TS_ERR_SHAPE, "conv2d: expected a 4-D weight [out_channels, in_channels/groups, kh, kw], got %s",
                        ts_tshape(w));
  if (x->ndim != 4)
    return ts_set_error(TS_ERR_SHAPE, "conv2d: expected a 3-D (unbatched) or 4-D (batched) input, got %s", ts_tshape(x));
  int64_t O = w->shape[0], C = x->shape[1];
  if (O % p->groups)
    return ts_set_error(TS_ERR_SHAPE, "conv2d: given groups=%lld, expected weight to be divisible by %lld at dim 0, "
                        "but got weight of size %s", (long long)p->groups, (long long)p->groups, ts_tshape(w));
  if (C != w->shape[1] * p->groups)
    return ts_set_error(TS_ERR_SHAPE, "conv2d: expected input with C = %lld channels for weight %s and groups %lld, "
                        "got %lld", (long long)(w->shape[1] * p->groups), ts_tshape(w), (long long)p->groups,
                        (long long)C);
  if (b && (b->ndim != 1 || b->shape[0] != O))
    return ts_set_error(TS_ERR_SHAPE, "conv2d: expected a bias of shape [%lld] for weight %s, got %s", (long long)O,
                        ts_tshape(w), ts_tshape(b));
  return TS_OK;
}

/* Output [N, O, OH, OW]; fails when the dilated kernel is larger than the padded input. */
static int output_shape(const ts_tensor *x, const ts_tensor *w, const conv_params *p, int64_t *shape) {
  shape[0] = x->shape[0];
  shape[1] = w->shape[0];
  for (int k = 0; k < 2; k++) {
    int64_t padded = x->shape[2 + k] + 2 * p->padding[k], span = p->dilation[k] * (w->shape[2 + k] - 1) + 1;
    if (padded < span || w->shape[2 + k] == 0)
      return ts_set_error(TS_ERR_SHAPE, "conv2d: padded input size per channel (%lld x %lld) is smaller than the "
                          "dilated kernel (%lld x %lld) of weight %s; input %s",
                          (long long)(x->shape[2] + 2 * p->padding[0]), (long long)(x->shape[3] + 2 * p->padding[1]),
                          (long long)(p->dilation[0] * (w->shape[2] - 1) + 1),
                          (long long)(p->dilation[1] * (w->shape[3] - 1) + 1), ts_tshape(w), ts_tshape(x));
    shape[2 + k] = (padded - span) / p->stride[k] + 1;
  }
  return TS_OK;
}

/* ---- plumbing -------------------------------------------------------------------------------- */
/* t as a contiguous tensor of the compute dtype (t itself when it already is one). */
static ts_tensor *compute_operand(ts_scope *s, ts_tensor *t, int dtype) {
  if (!t || s->failed) return NULL;
  return ts_scope_keep(s, ts_nn_dense(t, dtype));
}

/* The result in the caller's dtype: `out` itself or a rounded copy. Consumes out. */
static ts_tensor *in_dtype(ts_tensor *out, int dtype) {
  if (!out || out->dtype == dtype) return out;
  ts_tensor *r = ts_to_dtype(out, dtype);
  ts_release(out);
  return r;
}

static ts_tensor *conv_forward(const ts_backend *be, ts_tensor *x, ts_tensor *w, ts_tensor *b, const conv_params *p,
                               const int64_t *shape) {
  int compute = be->compute_dtype(x->dtype);
  ts_scope s = {0};
  ts_tensor *xc = compute_operand(&s, x, compute), *wc = compute_operand(&s, w, compute);
  ts_tensor *bc = b ? compute_operand(&s, b, compute) : NULL;
  ts_tensor *out = s.failed ? NULL : ts_empty(4, shape, compute, x->device);
  if (out && ts_numel(out) > 0 && be->conv2d(out, xc, wc, bc, p->stride, p->padding, p->dilation, p->groups)) {
    ts_release(out);
    out = NULL;
  }
  ts_scope_close(&s);
  return in_dtype(out, x->dtype);
}

/* ---- autograd -------------------------------------------------------------------------------- */
/* Saved: x (slot 0, only when w needs a gradient) and w (slot 1, only when x needs one). */
static conv_params params_of(const ts_node *n) {
  conv_params p = {{n->i[0], n->i[1]}, {n->i[2], n->i[3]}, {n->i[4], n->i[5]}, n->i[6]};
  return p;
}

static ts_tensor *empty_grad(ts_scope *s, ts_node *n, int input, int dtype) {
  if (!ts_node_needs_grad(n, input) || s->failed) return NULL;
  const ts_edge *e = ts_node_input(n, input);
  return ts_scope_keep(s, ts_empty(e->ndim, e->shape, dtype, e->device));
}

/* A stand-in of an input's shape whose values the kernel will not read: one element broadcast. */
static ts_tensor *shape_only(ts_scope *s, ts_node *n, int input, int dtype) {
  const ts_edge *e = ts_node_input(n, input);
  int64_t ones[TS_MAX_DIMS] = {1, 1, 1, 1, 1, 1, 1, 1};
  ts_tensor *one = s->failed ? NULL : ts_scope_keep(s, ts_empty(e->ndim, ones, dtype, e->device));
  return one ? ts_scope_keep(s, ts_expand(one, e->ndim, e->shape)) : NULL;
}

static int conv2d_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  int need_x = ts_node_needs_grad(n, 0), need_w = ts_node_needs_grad(n, 1);
  ts_tensor *x = need_w ? ts_node_saved(n, 0) : NULL, *w = need_x ? ts_node_saved(n, 1) : NULL;
  if ((need_w && !x) || (need_x && !w)) return ts_last_status();
  const ts_backend *be = TS_BACKEND(g->device, conv2d_backward, "conv2d backward");
  if (!be) return ts_last_status();
  conv_params p = params_of(n);
  int compute = be->compute_dtype(g->dtype);
  ts_scope s = {0};
  ts_tensor *xc = x ? compute_operand(&s, x, compute) : shape_only(&s, n, 0, compute);
  ts_tensor *wc = w ? compute_operand(&s, w, compute) : shape_only(&s, n, 1, compute);
  ts_tensor *gc = compute_operand(&s, g, compute);
  ts_tensor *gx = empty_grad(&s, n, 0, compute), *gw = empty_grad(&s, n, 1, compute), *gb = empty_grad(&s, n, 2, compute);
  if (!s.failed && be->conv2d_backward(gx, gw, gb, gc, xc, wc, p.stride, p.padding, p.dilation, p.groups)) s.failed = 1;
  if (!s.failed && (ts_set_input_grad(n, 0, gx, grads) || ts_set_input_grad(n, 1, gw, grads) ||
                    ts_set_input_grad(n, 2, gb, grads)))
    s.failed = 1;
  return ts_scope_close(&s);
}

static ts_tensor *record(ts_tensor *x, ts_tensor *w, ts_tensor *b, const conv_params *p, ts_tensor *out) {
  ts_tensor *inputs[3] = {x, w, b};
  ts_node *n = out ? ts_grad_node("conv2d", conv2d_backward, 3, inputs) : NULL;
  if (!n) return out;
  int64_t params[7] = {p->stride[0], p->stride[1], p->padding[0], p->padding[1], p->dilation[0], p->dilation[1], p->groups};
  for (int k = 0; k < 7; k++) n->i[k] = params[k];
  /* x is needed only for gw, w only for gx: a frozen layer keeps no activations alive */
  ts_tensor *save[2] = {ts_node_needs_grad(n, 1) ? x : NULL, ts_node_needs_grad(n, 0) ? w : NULL};
  return ts_node_finish_saving(n, out, 2, save);
}

static ts_tensor *conv2d_batched(ts_tensor *x, ts_tensor *w, ts_tensor *b, const conv_params *p) {
  int64_t shape[4];
  if (check_shapes(x, w, b, p) || output_shape(x, w, p, shape)) return NULL;
  const ts_backend *be = TS_BACKEND(x->device, conv2d, "conv2d");
  if (!be) return NULL;
  int previous = ts_set_grad_enabled(0);
  ts_tensor *out = conv_forward(be, x, w, b, p, shape);
  ts_set_grad_enabled(previous);
  return record(x, w, b, p, out);
}

ts_tensor *ts_conv2d(ts_tensor *x, ts_tensor *w, ts_tensor *b, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                     int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups) {
  if (!x || !w) return TS_FAIL_NULL(TS_ERR_ARG, "conv2d: NULL %s", x ? "weight" : "input");
  ts_tensor *in[3] = {x, w, b}, *cast[3];
  if (ts_autocast_needed(TS_AUTOCAST_LOW, 3, in)) { /* mixed precision: cuDNN in 16 bits */
    if (ts_autocast_cast(TS_AUTOCAST_LOW, 3, in, cast)) return NULL;
    ts_tensor *out = ts_conv2d(cast[0], cast[1], cast[2], stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups);
    ts_autocast_release(3, cast);
    return out;
  }
  conv_params p = {{stride_h, stride_w}, {pad_h, pad_w}, {dil_h, dil_w}, groups};
  if (check_params(&p) || check_dtypes(x, w, b)) return NULL;
  if (x->ndim != 3) return conv2d_batched(x, w, b, &p);
  ts_tensor *batch = ts_unsqueeze(x, 0);
  ts_tensor *out = batch ? conv2d_batched(batch, w, b, &p) : NULL;
  ts_release(batch);
  ts_tensor *single = out ? ts_squeeze(out, 0) : NULL;
  ts_release(out);
  return single;
}

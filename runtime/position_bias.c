/* position_bias.c — Swin's continuous relative position bias as one op (ts_relative_position_bias).
 *
 * UM-MAE's WindowAttention.posmlp is Conv1x1(C→P), ReLU, Conv1x1(P→H) applied to the features
 * sign(d) log(1 + |d|) of the pairwise position differences d of a window's tokens. Run as separate
 * ops it materializes [windows, P, N, N] hidden activations (67 MB per stage-1 block of UM-MAE
 * Swin-T at batch 8) and their gradients; here the kernel computes each query row's hidden layer
 * in scratch and the backward recomputes it. One autograd node; pos, w1, b1, w2 and b2 all get
 * gradients. A device without the fused kernel gets the same result from public ops. */
#include "nn.h"

#include <string.h>

static const char *const OP = "relative_position_bias";

typedef struct { int64_t windows, channels, tokens, hidden, heads; } pb_shape;

/* A 1x1-convolution weight [out, in, 1, 1] or a matrix [out, in]. */
static int check_weight(const char *what, const ts_tensor *w, int64_t in, const ts_tensor *pos) {
  int conv = w->ndim == 4 && w->shape[2] == 1 && w->shape[3] == 1;
  if ((w->ndim != 2 && !conv) || w->shape[1] != in)
    return ts_set_error(TS_ERR_SHAPE, "%s: %s must be [out, %lld] or a 1x1 convolution weight [out, %lld, 1, 1] for "
                        "positions %s, got %s", OP, what, (long long)in, (long long)in, ts_tshape(pos), ts_tshape(w));
  return TS_OK;
}

static int check_bias(const char *what, const ts_tensor *b, int64_t size, const ts_tensor *w) {
  if (b && (b->ndim != 1 || b->shape[0] != size))
    return ts_set_error(TS_ERR_SHAPE, "%s: %s must be [%lld], the output channels of its weight %s, got %s", OP, what,
                        (long long)size, ts_tshape(w), ts_tshape(b));
  return TS_OK;
}

static int check_inputs(pb_shape *s, const ts_tensor *pos, const ts_tensor *w1, const ts_tensor *b1,
                        const ts_tensor *w2, const ts_tensor *b2) {
  if (ts_nn_check_floating(OP, "pos", pos) || ts_nn_check_floating(OP, "w1", w1) ||
      ts_nn_check_floating(OP, "w2", w2))
    return ts_last_status();
  const ts_tensor *all[5] = {pos, w1, b1, w2, b2};
  for (int k = 1; k < 5; k++) {
    if (!all[k]) continue;
    if (all[k]->dtype != pos->dtype)
      return ts_set_error(TS_ERR_DTYPE, "%s: positions and weights must share one floating dtype, got %s and %s", OP,
                          ts_dtype_name(pos->dtype), ts_dtype_name(all[k]->dtype));
    if (ts_same_device(OP, pos, all[k])) return ts_last_status();
  }
  if (pos->ndim != 3)
    return ts_set_error(TS_ERR_SHAPE, "%s: pos must be [windows, coordinates, tokens], got %s", OP, ts_tshape(pos));
  s->windows = pos->shape[0];
  s->channels = pos->shape[1];
  s->tokens = pos->shape[2];
  if (check_weight("w1", w1, s->channels, pos)) return ts_last_status();
  s->hidden = w1->shape[0];
  if (check_weight("w2", w2, s->hidden, pos)) return ts_last_status();
  s->heads = w2->shape[0];
  return check_bias("b1", b1, s->hidden, w1) || check_bias("b2", b2, s->heads, w2) ? ts_last_status() : TS_OK;
}

/* ---- operands in the compute dtype (grad mode is off) ----------------------------------------- */
typedef struct { ts_tensor *pos, *w1, *b1, *w2, *b2; } pb_operands;

static void release_operands(pb_operands *o) {
  ts_tensor *all[5] = {o->pos, o->w1, o->b1, o->w2, o->b2};
  for (int k = 0; k < 5; k++) ts_release(all[k]);
}

static int prepare(const pb_shape *s, int dtype, ts_tensor *pos, ts_tensor *w1, ts_tensor *b1, ts_tensor *w2,
                   ts_tensor *b2, pb_operands *o) {
  int64_t w1_shape[2] = {s->hidden, s->channels}, w2_shape[2] = {s->heads, s->hidden};
  if (!(o->pos = ts_nn_dense(pos, dtype)) || !(o->w1 = ts_nn_dense_as(w1, dtype, 2, w1_shape)) ||
      (b1 && !(o->b1 = ts_nn_dense(b1, dtype))) || !(o->w2 = ts_nn_dense_as(w2, dtype, 2, w2_shape)) ||
      (b2 && !(o->b2 = ts_nn_dense(b2, dtype))))
    return ts_last_status();
  return TS_OK;
}

/* ---- autograd ---------------------------------------------------------------------------------- */
/* Hands gradient t to input `input`, viewed as that input's own shape (a weight may be 4-D). */
static int give_grad(ts_node *n, int input, ts_tensor *t, ts_tensor **grads) {
  const ts_edge *e = ts_node_input(n, input);
  return ts_set_input_grad_as(n, input, t, e->ndim, e->shape, grads);
}

static int position_bias_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  ts_tensor *pos = ts_node_saved(n, 0), *w1 = ts_node_saved(n, 1), *w2 = ts_node_saved(n, 3);
  ts_tensor *b1 = n->saved[2] ? ts_node_saved(n, 2) : NULL;
  if (!pos || !w1 || !w2 || (n->saved[2] && !b1)) return ts_last_status();
  const ts_backend *be = TS_NN_BACKEND(pos, position_bias_backward, OP);
  if (!be) return ts_last_status();
  ts_scope sc = {0};
  ts_tensor *dense = ts_scope_keep(&sc, ts_nn_dense(g, pos->dtype));
  int64_t b_shape[1] = {w2->shape[0]};
  ts_tensor *gpos = ts_s_grad_buffer(&sc, n, 0, pos), *gw1 = ts_s_grad_buffer(&sc, n, 1, w1), *gb1 = ts_s_grad_buffer(&sc, n, 2, b1);
  ts_tensor *gw2 = ts_s_grad_buffer(&sc, n, 3, w2), *gb2 = NULL;
  if (!sc.failed && ts_node_needs_grad(n, 4)) gb2 = ts_scope_keep(&sc, ts_empty(1, b_shape, pos->dtype, pos->device));
  if (!sc.failed && ts_numel(dense) > 0 &&
      be->position_bias_backward(gpos, gw1, gb1, gw2, gb2, dense, pos, w1, b1, w2))
    sc.failed = 1;
  if (!sc.failed && ts_numel(dense) == 0) { /* no rows: every gradient is zero */
    ts_tensor *bufs[5] = {gpos, gw1, gb1, gw2, gb2};
    for (int k = 0; k < 5; k++)
      if (bufs[k] && be->fill(bufs[k], 0.0)) sc.failed = 1;
  }
  ts_tensor *bufs[5] = {gpos, gw1, gb1, gw2, gb2};
  for (int k = 0; k < 5 && !sc.failed; k++)
    if (give_grad(n, k, bufs[k], grads)) sc.failed = 1;
  return ts_scope_close(&sc);
}

/* ---- the composite, for devices without the fused kernel ---------------------------------------- */
/* The same result from public ops (each records its own autograd): the features [W, C, N, N], then
   conv1x1 → relu → conv1x1. Memory-hungry (it stores the hidden layer) but correct everywhere. */
static ts_tensor *as_conv_weight(ts_scope *sc, ts_tensor *w) {
  int64_t shape[4] = {w->shape[0], w->shape[1], 1, 1};
  return ts_scope_keep(sc, ts_reshape(w, 4, shape));
}

static ts_tensor *composite(ts_tensor *pos, ts_tensor *w1, ts_tensor *b1, ts_tensor *w2, ts_tensor *b2) {
  ts_scope sc = {0};
  ts_tensor *keys = ts_scope_keep(&sc, ts_unsqueeze(pos, 2)), *queries = ts_scope_keep(&sc, ts_unsqueeze(pos, 3));
  ts_tensor *d = ts_s_binary(&sc, TS_SUB, keys, queries); /* d[w, c, i, j] = pos[w, c, j] - pos[w, c, i] */
  ts_tensor *magnitude = ts_s_unary(&sc, TS_LOG1P, ts_s_unary(&sc, TS_ABS, d));
  ts_tensor *f = ts_s_binary(&sc, TS_MUL, ts_s_unary(&sc, TS_SIGN, d), magnitude);
  ts_tensor *k1 = sc.failed ? NULL : as_conv_weight(&sc, w1), *k2 = sc.failed ? NULL : as_conv_weight(&sc, w2);
  ts_tensor *a = sc.failed ? NULL : ts_scope_keep(&sc, ts_conv2d(f, k1, b1, 1, 1, 0, 0, 1, 1, 1));
  ts_tensor *hidden = ts_s_unary(&sc, TS_RELU, a);
  ts_tensor *out = sc.failed ? NULL : ts_conv2d(hidden, k2, b2, 1, 1, 0, 0, 1, 1, 1);
  if (ts_scope_close(&sc)) {
    ts_release(out);
    return NULL;
  }
  return out;
}

/* ---- the entry point --------------------------------------------------------------------------- */
ts_tensor *ts_relative_position_bias(ts_tensor *pos, ts_tensor *w1, ts_tensor *b1, ts_tensor *w2, ts_tensor *b2) {
  pb_shape s = {0};
  if (check_inputs(&s, pos, w1, b1, w2, b2)) return NULL;
  const ts_backend *be = ts_backend_for(pos->device);
  if (!be) return NULL;
  if (!be->position_bias || !be->position_bias_backward) return composite(pos, w1, b1, w2, b2);
  int compute = be->compute_dtype(pos->dtype);
  int64_t shape[4] = {s.windows, s.heads, s.tokens, s.tokens};
  int previous = ts_set_grad_enabled(0);
  pb_operands o = {0};
  ts_tensor *out = NULL;
  if (!prepare(&s, compute, pos, w1, b1, w2, b2, &o) && (out = ts_empty(4, shape, compute, pos->device)) &&
      ts_numel(out) > 0 && be->position_bias(out, o.pos, o.w1, o.b1, o.w2, o.b2)) {
    ts_release(out);
    out = NULL;
  }
  out = ts_nn_result(out, pos->dtype, 4, shape);
  ts_set_grad_enabled(previous);
  ts_tensor *inputs[5] = {pos, w1, b1, w2, b2};
  ts_tensor *save[4] = {o.pos, o.w1, o.b1, o.w2};
  if (out) out = ts_node_finish_saving(ts_grad_node(OP, position_bias_backward, 5, inputs), out, 4, save);
  release_operands(&o);
  return out;
}

/* attention.c — scaled dot-product attention: argument checks, the bias layout, autograd.
 *
 * The backend sees every operand as (batch·head) blocks: q, k, v converted to the compute dtype,
 * broadcast over the joint leading dims and made contiguous [BH, rows, cols]. The bias is not
 * copied: it reaches the kernel as a strided view [E..., Nq, Nk] whose leading dims E are those of
 * the scores (they enumerate the BH blocks row-major), with stride 0 along the dims the bias
 * broadcasts over.
 *
 * One node records the whole op. It saves the prepared blocks, the bias view, the output and the
 * per-row log-sum-exp; backward recomputes the probabilities from them (no [Nq, Nk] matrix is kept
 * between forward and backward). The log-sum-exp is kept in float32 (float64 for float64 inputs)
 * also where the backend computes float16/bfloat16 natively (CUDA): rounded to 16 bits it would put
 * every recomputed probability a rounding step off. Under autocast (autocast.h) attention on CUDA
 * devices runs in the autocast dtype. */
#include "autocast.h"
#include "nn.h"

#include <math.h>
#include <string.h>

static const char *const OP = "scaled_dot_product_attention";

typedef struct {
  int nlead; /* leading dims of the scores: q, k and v's broadcast */
  int64_t lead[TS_MAX_DIMS];
  int64_t heads; /* their product: the number of blocks */
  int64_t nq, nk, d, dv;
  /* the bias against E (the scores' leading dims): its dim along each E dim, -1 where it
     broadcasts (there its gradient is summed over E's dim; elsewhere each index has a bias block
     of its own) */
  int nblock;
  int64_t block[TS_MAX_DIMS];
  int bias_dim[TS_MAX_DIMS];
} attn_shape;

/* ---- checks ----------------------------------------------------------------------------------- */
static int check_tensor(const ts_tensor *t, const char *name, int min_dims) {
  if (!t) return ts_set_error(TS_ERR_ARG, "%s: %s is NULL", OP, name);
  if (t->ndim < min_dims)
    return ts_set_error(TS_ERR_SHAPE, "%s: %s must have at least %d dims [..., N, features], got %s", OP, name, min_dims,
                        ts_tshape(t));
  return TS_OK;
}

static int check_dtypes(const ts_tensor *q, const ts_tensor *k, const ts_tensor *v, const ts_tensor *bias) {
  if (!ts_dtype_is_floating(q->dtype) || q->dtype != k->dtype || q->dtype != v->dtype)
    return ts_set_error(TS_ERR_DTYPE, "%s: q, k and v must share one floating dtype, got %s, %s and %s", OP,
                        ts_dtype_name(q->dtype), ts_dtype_name(k->dtype), ts_dtype_name(v->dtype));
  if (bias && !ts_dtype_is_floating(bias->dtype))
    return ts_set_error(TS_ERR_DTYPE, "%s: the bias is added to the scores and must be floating, got %s (turn a boolean "
                        "keep-mask into 0 / -inf first, as the Lua attn_mask option does)", OP, ts_dtype_name(bias->dtype));
  if (ts_same_device(OP, q, k) || ts_same_device(OP, q, v)) return ts_last_status();
  return bias ? ts_same_device(OP, q, bias) : TS_OK;
}

/* Broadcasts the leading dims of q, k and v into s->lead. */
static int broadcast_leading(attn_shape *s, const ts_tensor *q, const ts_tensor *k, const ts_tensor *v) {
  const ts_tensor *ops[3] = {q, k, v};
  int n = 0;
  for (int i = 0; i < 3; i++) n = ops[i]->ndim - 2 > n ? ops[i]->ndim - 2 : n;
  s->nlead = n;
  s->heads = 1;
  for (int d = 0; d < n; d++) {
    int64_t size = 1;
    for (int i = 0; i < 3; i++) {
      int src = d - (n - (ops[i]->ndim - 2));
      int64_t have = src >= 0 ? ops[i]->shape[src] : 1;
      if (have != 1 && size != 1 && have != size)
        return ts_set_error(TS_ERR_SHAPE, "%s: the batch dims of q %s, k %s and v %s do not broadcast", OP,
                            ts_tshape(q), ts_tshape(k), ts_tshape(v));
      if (have != 1) size = have;
    }
    s->lead[d] = size;
    s->heads *= size;
  }
  return TS_OK;
}

static int check_sizes(attn_shape *s, const ts_tensor *q, const ts_tensor *k, const ts_tensor *v) {
  s->nq = q->shape[q->ndim - 2];
  s->d = q->shape[q->ndim - 1];
  s->nk = k->shape[k->ndim - 2];
  s->dv = v->shape[v->ndim - 1];
  if (k->shape[k->ndim - 1] != s->d)
    return ts_set_error(TS_ERR_SHAPE, "%s: q %s and k %s must have the same last dim (the embedding size D), got %lld and "
                        "%lld", OP, ts_tshape(q), ts_tshape(k), (long long)s->d, (long long)k->shape[k->ndim - 1]);
  if (v->shape[v->ndim - 2] != s->nk)
    return ts_set_error(TS_ERR_SHAPE, "%s: k %s and v %s must have the same number of keys (dim -2), got %lld and %lld",
                        OP, ts_tshape(k), ts_tshape(v), (long long)s->nk, (long long)v->shape[v->ndim - 2]);
  return broadcast_leading(s, q, k, v);
}

static int bias_mismatch(const attn_shape *s, const ts_tensor *bias, const char *why) {
  int64_t scores[TS_MAX_DIMS + 2];
  for (int d = 0; d < s->nlead; d++) scores[d] = s->lead[d];
  scores[s->nlead] = s->nq;
  scores[s->nlead + 1] = s->nk;
  return ts_set_error(TS_ERR_SHAPE, "%s: the bias %s is not broadcastable to the attention scores %s: %s", OP,
                      ts_tshape(bias), ts_shape_str(s->nlead + 2, scores), why);
}

/* Aligns the bias's leading dims with the scores' from the right, by the usual broadcasting rules:
   each dim equals the scores' or is 1 (then its stride is 0 and its gradient is summed over that
   dim); missing dims count as 1. */
static int align_bias(attn_shape *s, const ts_tensor *bias) {
  int nb = bias->ndim, nblead = nb > 2 ? nb - 2 : 0;
  if (nb >= 1 && bias->shape[nb - 1] != 1 && bias->shape[nb - 1] != s->nk)
    return bias_mismatch(s, bias, "its last dim must be the number of keys or 1");
  if (nb >= 2 && bias->shape[nb - 2] != 1 && bias->shape[nb - 2] != s->nq)
    return bias_mismatch(s, bias, "its dim -2 must be the number of queries or 1");
  int j = nblead - 1;
  for (int i = s->nlead - 1; i >= 0; i--, j--) {
    int64_t a = s->lead[i], b = j >= 0 ? bias->shape[j] : 1;
    if (b != a && b != 1) return bias_mismatch(s, bias, "each batch dim must equal the scores' dim or be 1");
    s->block[i] = a;
    s->bias_dim[i] = b == a && a != 1 ? j : -1;
  }
  for (; j >= 0; j--)
    if (bias->shape[j] != 1) return bias_mismatch(s, bias, "it has more batch dims than the scores");
  s->nblock = s->nlead;
  return TS_OK;
}

/* ---- operands as the backend takes them (grad mode is off) ------------------------------------ */
/* t in the compute dtype, broadcast over the leading dims, as contiguous blocks [heads, rows, cols]. */
static ts_tensor *as_blocks(ts_tensor *t, int dtype, const attn_shape *s, int64_t rows, int64_t cols) {
  int64_t full[TS_MAX_DIMS], blocks[3] = {s->heads, rows, cols};
  for (int d = 0; d < s->nlead; d++) full[d] = s->lead[d];
  full[s->nlead] = rows;
  full[s->nlead + 1] = cols;
  ts_tensor *wide = ts_expand(t, s->nlead + 2, full);
  ts_tensor *conv = wide ? ts_to_dtype(wide, dtype) : NULL;
  ts_release(wide);
  ts_tensor *dense = conv ? ts_contiguous(conv) : NULL;
  ts_release(conv);
  ts_tensor *view = dense ? ts_view(dense, 3, blocks) : NULL;
  ts_release(dense);
  return view;
}

/* The bias in the compute dtype as a strided view [E..., Nq, Nk] (no copy beyond the conversion). */
static ts_tensor *bias_view(ts_tensor *bias, int dtype, const attn_shape *s) {
  ts_tensor *conv = ts_to_dtype(bias, dtype);
  if (!conv) return NULL;
  int nb = conv->ndim, n = s->nblock;
  int64_t shape[TS_MAX_DIMS], stride[TS_MAX_DIMS];
  for (int d = 0; d < n; d++) {
    shape[d] = s->block[d];
    stride[d] = s->bias_dim[d] >= 0 ? conv->stride[s->bias_dim[d]] : 0;
  }
  shape[n] = s->nq;
  stride[n] = nb >= 2 && conv->shape[nb - 2] != 1 ? conv->stride[nb - 2] : 0;
  shape[n + 1] = s->nk;
  stride[n + 1] = nb >= 1 && conv->shape[nb - 1] != 1 ? conv->stride[nb - 1] : 0;
  ts_tensor *view = ts_tensor_over(conv->storage, n + 2, shape, stride, conv->offset, dtype);
  ts_release(conv);
  return view;
}

/* What the forward computed and the backward reads. */
typedef struct { ts_tensor *q, *k, *v, *bias, *out, *lse; } attn_blocks;

static void release_blocks(attn_blocks *b) {
  ts_tensor *all[6] = {b->q, b->k, b->v, b->bias, b->out, b->lse};
  for (int i = 0; i < 6; i++) ts_release(all[i]);
}

/* The dtype of the saved log-sum-exp for a compute dtype: the kernels' accumulation type. */
static int lse_dtype(int compute) { return compute == TS_F64 ? TS_F64 : TS_F32; }

static int run_forward(const attn_shape *s, const ts_backend *be, int compute, ts_tensor *q, ts_tensor *k, ts_tensor *v,
                       ts_tensor *bias, double scale, attn_blocks *b) {
  int64_t out_shape[3] = {s->heads, s->nq, s->dv}, lse_shape[2] = {s->heads, s->nq};
  if (!(b->q = as_blocks(q, compute, s, s->nq, s->d)) || !(b->k = as_blocks(k, compute, s, s->nk, s->d)) ||
      !(b->v = as_blocks(v, compute, s, s->nk, s->dv)) || (bias && !(b->bias = bias_view(bias, compute, s))) ||
      !(b->out = ts_empty(3, out_shape, compute, q->device)) ||
      !(b->lse = ts_empty(2, lse_shape, lse_dtype(compute), q->device)))
    return ts_last_status();
  if (s->heads * s->nq == 0) return TS_OK;
  return be->attention(b->out, b->lse, b->q, b->k, b->v, b->bias, scale);
}

/* [heads, Nq, Dv] blocks as the user's [..., Nq, Dv] in the inputs' dtype. */
static ts_tensor *result_of(const attn_shape *s, ts_tensor *blocks, int dtype) {
  int64_t shape[TS_MAX_DIMS];
  for (int d = 0; d < s->nlead; d++) shape[d] = s->lead[d];
  shape[s->nlead] = s->nq;
  shape[s->nlead + 1] = s->dv;
  ts_tensor *view = ts_view(blocks, s->nlead + 2, shape);
  ts_tensor *out = view ? ts_to_dtype(view, dtype) : NULL;
  ts_release(view);
  return out;
}

/* ---- autograd --------------------------------------------------------------------------------- */
/* Node parameters: i[0] = number of leading dims, i[1..] their sizes; i[KEPT + d] = whether the
   bias has its own block along E dim d; d[0] = the scale. */
enum { KEPT = 1 + TS_MAX_DIMS };


/* A [heads, rows, cols] gradient handed back as [lead..., rows, cols]. */
static int give_block_grad(ts_node *n, int input, ts_tensor *t, ts_tensor **grads) {
  if (!t) return TS_OK;
  int nlead = (int)n->i[0];
  int64_t shape[TS_MAX_DIMS];
  for (int d = 0; d < nlead; d++) shape[d] = n->i[1 + d];
  shape[nlead] = t->shape[1];
  shape[nlead + 1] = t->shape[2];
  return ts_set_input_grad_as(n, input, t, nlead + 2, shape, grads);
}

/* The bias gradient [E'..., Nq, Nk] handed back to input `input` with the bias's own leading dims. */
static int give_bias_grad(ts_node *n, int input, ts_tensor *t, ts_tensor **grads) {
  if (!t) return TS_OK;
  const ts_edge *e = ts_node_input(n, input);
  int nlead = e->ndim > 2 ? e->ndim - 2 : 0;
  int64_t shape[TS_MAX_DIMS];
  for (int d = 0; d < nlead; d++) shape[d] = e->shape[d];
  shape[nlead] = t->shape[t->ndim - 2];
  shape[nlead + 1] = t->shape[t->ndim - 1];
  return ts_set_input_grad_as(n, input, t, nlead + 2, shape, grads);
}

/* The bias gradient buffer [E'..., Nq, Nk] when input `input` (the bias) needs one. */
static ts_tensor *bias_grad_buffer(ts_scope *s, ts_node *n, int input, const ts_tensor *bias) {
  if (s->failed || !bias || !ts_node_needs_grad(n, input)) return NULL;
  int nblock = bias->ndim - 2;
  int64_t shape[TS_MAX_DIMS];
  for (int d = 0; d < nblock; d++) shape[d] = n->i[KEPT + d] ? bias->shape[d] : 1;
  shape[nblock] = bias->shape[nblock];
  shape[nblock + 1] = bias->shape[nblock + 1];
  return ts_scope_keep(s, ts_empty(bias->ndim, shape, bias->dtype, bias->device));
}

static int attention_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  ts_tensor *b[6] = {NULL};
  for (int i = 0; i < 6; i++)
    if (n->saved[i] && !(b[i] = ts_node_saved(n, i))) return ts_last_status();
  ts_tensor *q = b[0], *k = b[1], *v = b[2], *bias = b[3], *out = b[4], *lse = b[5];
  if (!q || !k || !v || !out || !lse) return ts_set_error(TS_ERR_ARG, "%s backward: saved tensors are missing", OP);
  const ts_backend *be = TS_BACKEND(q->device, attention_backward, OP);
  if (!be) return ts_last_status();
  ts_scope s = {0};
  ts_tensor *cast = ts_s_cast(&s, g, q->dtype);
  ts_tensor *dense = s.failed ? NULL : ts_scope_keep(&s, ts_contiguous(cast));
  ts_tensor *dout = s.failed ? NULL : ts_scope_keep(&s, ts_view(dense, 3, out->shape));
  ts_tensor *dq = ts_s_grad_buffer(&s, n, 0, q), *dk = ts_s_grad_buffer(&s, n, 1, k), *dv = ts_s_grad_buffer(&s, n, 2, v);
  ts_tensor *dbias = bias_grad_buffer(&s, n, 3, bias);
  if (!s.failed && q->shape[0] > 0 &&
      be->attention_backward(dq, dk, dv, dbias, dout, q, k, v, bias, out, lse, n->d[0]))
    s.failed = 1;
  if (!s.failed && (give_block_grad(n, 0, dq, grads) || give_block_grad(n, 1, dk, grads) ||
                    give_block_grad(n, 2, dv, grads) || give_bias_grad(n, 3, dbias, grads)))
    s.failed = 1;
  return ts_scope_close(&s);
}

static ts_tensor *record(const attn_shape *s, ts_tensor *out, ts_tensor *const inputs[4], double scale,
                         const attn_blocks *b) {
  ts_node *n = ts_grad_node(OP, attention_backward, 4, inputs);
  if (!n) return out;
  n->d[0] = scale;
  n->i[0] = s->nlead;
  for (int d = 0; d < s->nlead; d++) n->i[1 + d] = s->lead[d];
  for (int d = 0; d < s->nblock; d++) n->i[KEPT + d] = s->bias_dim[d] >= 0;
  ts_tensor *save[6] = {b->q, b->k, b->v, b->bias, b->out, b->lse};
  return ts_node_finish_saving(n, out, 6, save);
}

/* ---- the entry point -------------------------------------------------------------------------- */
ts_tensor *ts_attention(ts_tensor *q, ts_tensor *k, ts_tensor *v, ts_tensor *bias, double scale) {
  ts_tensor *in[4] = {q, k, v, bias}, *cast[4];
  if (ts_autocast_needed(TS_AUTOCAST_LOW, 4, in)) { /* mixed precision: the kernel in 16 bits */
    if (ts_autocast_cast(TS_AUTOCAST_LOW, 4, in, cast)) return NULL;
    ts_tensor *out = ts_attention(cast[0], cast[1], cast[2], cast[3], scale);
    ts_autocast_release(4, cast);
    return out;
  }
  attn_shape s = {0};
  if (check_tensor(q, "q", 2) || check_tensor(k, "k", 2) || check_tensor(v, "v", 2)) return NULL;
  if (check_dtypes(q, k, v, bias) || check_sizes(&s, q, k, v) || (bias && align_bias(&s, bias))) return NULL;
  if (isnan(scale)) scale = s.d > 0 ? 1.0 / sqrt((double)s.d) : 1.0; /* D = 0: the scores are 0, not 0·inf */
  const ts_backend *be = TS_BACKEND(q->device, attention, OP);
  if (!be) return NULL;
  int compute = be->compute_dtype(q->dtype);
  int previous = ts_set_grad_enabled(0);
  attn_blocks b = {0};
  ts_tensor *out = run_forward(&s, be, compute, q, k, v, bias, scale, &b) ? NULL : result_of(&s, b.out, q->dtype);
  ts_set_grad_enabled(previous);
  ts_tensor *inputs[4] = {q, k, v, bias};
  if (out) out = record(&s, out, inputs, scale, &b);
  release_blocks(&b);
  return out;
}

/* ---- attention on packed projections ---------------------------------------------------------- */
/* ts_attention_packed reads the heads straight out of the projection that made them: q, k and v of
 * head h are column ranges [h·hd, h·hd + hd) of the D-wide parts of qkv [..., N, 3·D] (or of q
 * [..., Nq, D] and kv [..., Nk, 2·D]), the output is written with its heads merged [..., Nq, D],
 * and the backward writes the gradient of qkv (or q and kv) in that packed layout. The split into
 * heads (a select per part, each of which back-propagates by filling an input-sized tensor with
 * zeros) and the merge (a copy each way) disappear. The backend sees strided head views
 * [B, H, N, hd], B the product of the leading dims (attention_views); without that entry the op is
 * computed from views and ts_attention. */
static const char *const PACKED = "packed_attention";

typedef struct {
  attn_shape s;        /* lead = the leading dims of q, then the heads */
  int nbatch;          /* leading dims of q */
  int64_t batch;       /* their product B */
  int64_t heads, width; /* H and D = H·hd */
  int packed_qkv;      /* kv is NULL: q holds q, k and v */
} packed_shape;

static int check_packed(packed_shape *ps, const ts_tensor *q, const ts_tensor *kv, int64_t heads,
                        const ts_tensor *bias) {
  if (!q) return ts_set_error(TS_ERR_ARG, "%s: q is NULL", PACKED);
  if (q->ndim < 2 || q->ndim > TS_MAX_DIMS - 1)
    return ts_set_error(TS_ERR_SHAPE, "%s: q must have 2 to %d dims [..., N, features], got %s", PACKED,
                        TS_MAX_DIMS - 1, ts_tshape(q));
  if (heads < 1) return ts_set_error(TS_ERR_ARG, "%s: num_heads must be positive, got %lld", PACKED, (long long)heads);
  if (!ts_dtype_is_floating(q->dtype) || (kv && kv->dtype != q->dtype))
    return ts_set_error(TS_ERR_DTYPE, "%s: q and kv must share one floating dtype, got %s and %s", PACKED,
                        ts_dtype_name(q->dtype), kv ? ts_dtype_name(kv->dtype) : "none");
  if (bias && !ts_dtype_is_floating(bias->dtype))
    return ts_set_error(TS_ERR_DTYPE, "%s: the bias is added to the scores and must be floating, got %s", PACKED,
                        ts_dtype_name(bias->dtype));
  if ((kv && ts_same_device(PACKED, q, kv)) || (bias && ts_same_device(PACKED, q, bias))) return ts_last_status();
  int64_t w = q->shape[q->ndim - 1], parts = kv ? 1 : 3;
  if (w % (parts * heads))
    return ts_set_error(TS_ERR_SHAPE, "%s: the last dim of %s %s must be %s num_heads (%lld) times the head size",
                        PACKED, kv ? "q" : "qkv", ts_tshape(q), kv ? "" : "3 x", (long long)heads);
  ps->packed_qkv = !kv;
  ps->heads = heads;
  ps->width = w / parts;
  ps->nbatch = q->ndim - 2;
  attn_shape *s = &ps->s;
  s->nq = q->shape[q->ndim - 2];
  s->nk = s->nq;
  s->d = s->dv = ps->width / heads;
  if (kv) {
    if (kv->ndim != q->ndim || memcmp(kv->shape, q->shape, (size_t)ps->nbatch * sizeof(int64_t)) ||
        kv->shape[kv->ndim - 1] != 2 * ps->width)
      return ts_set_error(TS_ERR_SHAPE, "%s: kv must be [..., Nk, %lld] with q's leading dims for q %s, got %s", PACKED,
                          (long long)(2 * ps->width), ts_tshape(q), ts_tshape(kv));
    s->nk = kv->shape[kv->ndim - 2];
  }
  ps->batch = 1;
  for (int d = 0; d < ps->nbatch; d++) {
    s->lead[d] = q->shape[d];
    ps->batch *= q->shape[d];
  }
  s->lead[ps->nbatch] = heads;
  s->nlead = ps->nbatch + 1;
  s->heads = ps->batch * heads;
  return bias ? align_bias(s, bias) : TS_OK;
}

/* Head `part` (0 q, 1 k, 2 v) of a dense packed tensor t [..., N, W] as a view [B, H, N, hd] that
   starts `col` columns in. */
static ts_tensor *head_view(const packed_shape *ps, ts_tensor *t, int64_t col) {
  int64_t n = t->shape[t->ndim - 2], w = t->shape[t->ndim - 1], hd = ps->width / ps->heads;
  int64_t shape[4] = {ps->batch, ps->heads, n, hd}, stride[4] = {n * w, hd, w, 1};
  return ts_tensor_over(t->storage, 4, shape, stride, t->offset + col, t->dtype);
}

typedef struct { ts_tensor *q, *k, *v; } head_views;

static void release_views(head_views *v) {
  ts_release(v->q);
  ts_release(v->k);
  ts_release(v->v);
}

/* The q, k and v head views of the dense packed inputs (qd, and kvd unless qkv is packed). */
static int views_of(const packed_shape *ps, ts_tensor *qd, ts_tensor *kvd, head_views *v) {
  ts_tensor *src = ps->packed_qkv ? qd : kvd;
  int64_t k0 = ps->packed_qkv ? ps->width : 0;
  if (!(v->q = head_view(ps, qd, 0)) || !(v->k = head_view(ps, src, k0)) ||
      !(v->v = head_view(ps, src, k0 + ps->width)))
    return ts_last_status();
  return TS_OK;
}

/* The [B, H, N, hd] view of a dense [..., N, D] tensor whose heads are merged. */
static ts_tensor *merged_view(const packed_shape *ps, ts_tensor *t) { return head_view(ps, t, 0); }

/* What the packed forward keeps for the backward. */
typedef struct { ts_tensor *q, *kv, *bias, *out, *lse; } packed_saved;

static void release_saved(packed_saved *b) {
  ts_tensor *all[5] = {b->q, b->kv, b->bias, b->out, b->lse};
  for (int i = 0; i < 5; i++) ts_release(all[i]);
}

static int packed_forward(const packed_shape *ps, const ts_backend *be, int compute, ts_tensor *q, ts_tensor *kv,
                          ts_tensor *bias, double scale, packed_saved *b) {
  const attn_shape *s = &ps->s;
  int64_t out_shape[TS_MAX_DIMS], lse_shape[2] = {s->heads, s->nq};
  memcpy(out_shape, q->shape, (size_t)q->ndim * sizeof(int64_t));
  out_shape[q->ndim - 1] = ps->width;
  if (!(b->q = ts_nn_dense(q, compute)) || (kv && !(b->kv = ts_nn_dense(kv, compute))) ||
      (bias && !(b->bias = bias_view(bias, compute, s))) || !(b->out = ts_empty(q->ndim, out_shape, compute, q->device)) ||
      !(b->lse = ts_empty(2, lse_shape, lse_dtype(compute), q->device)))
    return ts_last_status();
  if (s->heads * s->nq == 0) return TS_OK;
  head_views v = {0};
  ts_tensor *out = NULL;
  int st = views_of(ps, b->q, b->kv, &v);
  if (!st) st = (out = merged_view(ps, b->out)) ? be->attention_views(out, b->lse, v.q, v.k, v.v, b->bias, scale)
                                                : ts_last_status();
  ts_release(out);
  release_views(&v);
  return st;
}

/* Node parameters as ts_attention's (i[0], i[1..], i[KEPT..], d[0]); i[KEPT + TS_MAX_DIMS] = heads. */
enum { PACKED_HEADS = KEPT + TS_MAX_DIMS };

/* Rebuilds the shape from a node: only what the backward needs. */
static void shape_of_node(const ts_node *n, const ts_tensor *q, const ts_tensor *kv, packed_shape *ps) {
  memset(ps, 0, sizeof *ps);
  ps->packed_qkv = !kv;
  ps->heads = n->i[PACKED_HEADS];
  ps->width = q->shape[q->ndim - 1] / (kv ? 1 : 3);
  ps->nbatch = q->ndim - 2;
  ps->batch = 1;
  for (int d = 0; d < ps->nbatch; d++) ps->batch *= q->shape[d];
}

static int packed_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  ts_tensor *b[5] = {NULL};
  for (int i = 0; i < 5; i++)
    if (n->saved[i] && !(b[i] = ts_node_saved(n, i))) return ts_last_status();
  ts_tensor *q = b[0], *kv = b[1], *bias = b[2], *out = b[3], *lse = b[4];
  if (!q || !out || !lse) return ts_set_error(TS_ERR_ARG, "%s backward: saved tensors are missing", PACKED);
  const ts_backend *be = TS_BACKEND(q->device, attention_views_backward, PACKED);
  if (!be) return ts_last_status();
  packed_shape ps;
  shape_of_node(n, q, kv, &ps);
  ts_scope s = {0};
  ts_tensor *dense = ts_scope_keep(&s, ts_nn_dense(g, q->dtype));
  /* the packed gradients: dq (all of dqkv when packed) and dkv */
  ts_tensor *dq = ts_s_grad_buffer(&s, n, 0, q), *dkv = ts_s_grad_buffer(&s, n, 1, kv);
  ts_tensor *dbias = bias_grad_buffer(&s, n, 2, bias);
  head_views v = {0}, dv = {0};
  ts_tensor *o4 = NULL, *do4 = NULL;
  if (!s.failed && lse->shape[0] * lse->shape[1] > 0) {
    int st = views_of(&ps, q, kv, &v);
    if (!st && dq) st = (dv.q = head_view(&ps, dq, 0)) ? TS_OK : ts_last_status();
    ts_tensor *dsrc = ps.packed_qkv ? dq : dkv;
    int64_t k0 = ps.packed_qkv ? ps.width : 0;
    if (!st && dsrc && (!(dv.k = head_view(&ps, dsrc, k0)) || !(dv.v = head_view(&ps, dsrc, k0 + ps.width))))
      st = ts_last_status();
    if (!st && (!(o4 = merged_view(&ps, out)) || !(do4 = merged_view(&ps, dense)))) st = ts_last_status();
    if (!st) st = be->attention_views_backward(dv.q, dv.k, dv.v, dbias, do4, v.q, v.k, v.v, bias, o4, lse, n->d[0]);
    if (st) s.failed = 1;
  } else if (!s.failed) { /* no rows or no keys: the packed gradients are zero */
    ts_tensor *bufs[3] = {dq, dkv, dbias};
    for (int k = 0; k < 3; k++)
      if (bufs[k] && be->fill(bufs[k], 0.0)) s.failed = 1;
  }
  ts_release(o4);
  ts_release(do4);
  release_views(&v);
  release_views(&dv);
  if (!s.failed && ((dq && ts_set_input_grad(n, 0, dq, grads)) || (dkv && ts_set_input_grad(n, 1, dkv, grads)) ||
                    give_bias_grad(n, 2, dbias, grads)))
    s.failed = 1;
  return ts_scope_close(&s);
}

static ts_tensor *packed_record(const packed_shape *ps, ts_tensor *out, ts_tensor *const inputs[3], double scale,
                                const packed_saved *b) {
  ts_node *n = ts_grad_node(PACKED, packed_backward, 3, inputs);
  if (!n) return out;
  const attn_shape *s = &ps->s;
  n->d[0] = scale;
  n->i[0] = s->nlead;
  for (int d = 0; d < s->nlead; d++) n->i[1 + d] = s->lead[d];
  for (int d = 0; d < s->nblock; d++) n->i[KEPT + d] = s->bias_dim[d] >= 0;
  n->i[PACKED_HEADS] = ps->heads;
  ts_tensor *save[5] = {b->q, b->kv, b->bias, b->out, b->lse};
  return ts_node_finish_saving(n, out, 5, save);
}

/* For a device without attention_views: split the heads with views, ts_attention, merge them. */
static ts_tensor *packed_composite(const packed_shape *ps, ts_tensor *q, ts_tensor *kv, ts_tensor *bias, double scale) {
  int nb = ps->nbatch;
  int64_t hd = ps->width / ps->heads, shape[TS_MAX_DIMS + 1];
  int perm[TS_MAX_DIMS + 1];
  ts_scope sc = {0};
  ts_tensor *parts[3] = {NULL};
  ts_tensor *sources[2] = {q, ps->packed_qkv ? q : kv};
  for (int src = 0; src < (ps->packed_qkv ? 1 : 2); src++) {
    ts_tensor *t = sources[src];
    int count = ps->packed_qkv ? 3 : src == 0 ? 1 : 2;
    /* [..., N, count, H, hd] → [count, ..., H, N, hd] */
    memcpy(shape, t->shape, (size_t)(nb + 1) * sizeof(int64_t));
    shape[nb + 1] = count;
    shape[nb + 2] = ps->heads;
    shape[nb + 3] = hd;
    perm[0] = nb + 1;
    for (int d = 0; d < nb; d++) perm[1 + d] = d;
    perm[nb + 1] = nb + 2;
    perm[nb + 2] = nb;
    perm[nb + 3] = nb + 3;
    ts_tensor *split = sc.failed ? NULL : ts_scope_keep(&sc, ts_reshape(t, nb + 4, shape));
    ts_tensor *moved = sc.failed ? NULL : ts_scope_keep(&sc, ts_permute(split, nb + 4, perm));
    for (int k = 0; k < count && !sc.failed; k++)
      parts[ps->packed_qkv ? k : src + k] = ts_scope_keep(&sc, ts_select(moved, 0, k));
  }
  ts_tensor *o = sc.failed ? NULL : ts_scope_keep(&sc, ts_attention(parts[0], parts[1], parts[2], bias, scale));
  /* [..., H, Nq, hd] → [..., Nq, H, hd] → [..., Nq, D] */
  ts_tensor *back = sc.failed ? NULL : ts_scope_keep(&sc, ts_transpose(o, nb, nb + 1));
  memcpy(shape, q->shape, (size_t)(nb + 1) * sizeof(int64_t));
  shape[nb + 1] = ps->width;
  ts_tensor *out = sc.failed ? NULL : ts_reshape(back, nb + 2, shape);
  if (ts_scope_close(&sc)) {
    ts_release(out);
    return NULL;
  }
  return out;
}

ts_tensor *ts_attention_packed(ts_tensor *q, ts_tensor *kv, int64_t heads, ts_tensor *bias, double scale) {
  ts_tensor *in[3] = {q, kv, bias}, *cast[3];
  if (ts_autocast_needed(TS_AUTOCAST_LOW, 3, in)) { /* mixed precision: the kernel in 16 bits */
    if (ts_autocast_cast(TS_AUTOCAST_LOW, 3, in, cast)) return NULL;
    ts_tensor *out = ts_attention_packed(cast[0], cast[1], heads, cast[2], scale);
    ts_autocast_release(3, cast);
    return out;
  }
  packed_shape ps;
  memset(&ps, 0, sizeof ps);
  if (check_packed(&ps, q, kv, heads, bias)) return NULL;
  if (isnan(scale)) scale = ps.s.d > 0 ? 1.0 / sqrt((double)ps.s.d) : 1.0;
  const ts_backend *be = ts_backend_for(q->device);
  if (!be) return NULL;
  if (!be->attention_views || !be->attention_views_backward) return packed_composite(&ps, q, kv, bias, scale);
  int compute = be->compute_dtype(q->dtype);
  int previous = ts_set_grad_enabled(0);
  packed_saved b = {0};
  ts_tensor *out = packed_forward(&ps, be, compute, q, kv, bias, scale, &b) ? NULL : ts_to_dtype(b.out, q->dtype);
  ts_set_grad_enabled(previous);
  ts_tensor *inputs[3] = {q, kv, bias};
  if (out) out = packed_record(&ps, out, inputs, scale, &b);
  release_saved(&b);
  return out;
}

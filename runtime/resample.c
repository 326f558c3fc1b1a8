/* resample.c — interpolate, pad, roll, pixel_shuffle and pixel_unshuffle.
 *
 * interpolate runs the backend's kernels (nearest and bilinear, forward and backward). pad and
 * roll are pure data movement: they are built from the backend's fill and strided copy on views,
 * so they work for every dtype and device; their gradients are the same op with negated amounts
 * (pad by -pad crops what was added and zero-fills what was cropped; roll by -shifts undoes the
 * roll). pixel_shuffle and pixel_unshuffle are reshape / permute / reshape of public view ops, so
 * the tape records them step by step and needs no node of its own. */
#include "autograd.h"
#include "nn.h"

#include <math.h>

/* ---- interpolate ----------------------------------------------------------------------------- */
static const char *mode_name(int mode) { return mode == TS_INTERP_NEAREST ? "nearest" : "bilinear"; }

static int check_interpolate(const ts_tensor *x, int64_t out_h, int64_t out_w, int mode, int align_corners,
                             const double scale[2]) {
  if (!x) return ts_set_error(TS_ERR_ARG, "interpolate: NULL input");
  if (mode != TS_INTERP_NEAREST && mode != TS_INTERP_BILINEAR)
    return ts_set_error(TS_ERR_ARG, "interpolate: unknown mode %d (TS_INTERP_NEAREST or TS_INTERP_BILINEAR)", mode);
  if (x->ndim != 4)
    return ts_set_error(TS_ERR_SHAPE, "interpolate: %s mode expects a 4-D input [N, C, H, W], got %s", mode_name(mode),
                        ts_tshape(x));
  if (!ts_dtype_is_floating(x->dtype))
    return ts_set_error(TS_ERR_DTYPE, "interpolate: expected a floating point input, got %s", ts_dtype_name(x->dtype));
  if (x->shape[2] <= 0 || x->shape[3] <= 0 || out_h <= 0 || out_w <= 0)
    return ts_set_error(TS_ERR_SHAPE, "interpolate: input and output sizes should be greater than 0, but got input "
                        "(H: %lld, W: %lld) output (H: %lld, W: %lld)", (long long)x->shape[2], (long long)x->shape[3],
                        (long long)out_h, (long long)out_w);
  if (align_corners && mode != TS_INTERP_BILINEAR)
    return ts_set_error(TS_ERR_ARG, "interpolate: align_corners can only be set with the bilinear mode, not %s",
                        mode_name(mode));
  if (!isfinite(scale[0]) || !isfinite(scale[1]))
    return ts_set_error(TS_ERR_ARG, "interpolate: scale factors must be finite, got (%g, %g)", scale[0], scale[1]);
  return TS_OK;
}

static int interpolate_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  const ts_backend *be = TS_BACKEND(g->device, interpolate_backward, "interpolate backward");
  if (!be) return ts_last_status();
  const ts_edge *e = ts_node_input(n, 0);
  int compute = be->compute_dtype(g->dtype);
  double scale[2] = {n->d[0], n->d[1]};
  ts_scope s = {0};
  ts_tensor *gc = ts_scope_keep(&s, ts_nn_dense(g, compute));
  ts_tensor *gx = s.failed ? NULL : ts_scope_keep(&s, ts_empty(e->ndim, e->shape, compute, e->device));
  if (gx && ts_numel(gx) > 0 && be->interpolate_backward(gx, gc, (int)n->i[0], (int)n->i[1], scale)) s.failed = 1;
  if (!s.failed && ts_set_input_grad(n, 0, gx, grads)) s.failed = 1;
  return ts_scope_close(&s);
}

ts_tensor *ts_interpolate(ts_tensor *x, int64_t out_h, int64_t out_w, int mode, int align_corners, double scale_h,
                          double scale_w) {
  double scale[2] = {scale_h > 0 ? scale_h : 0, scale_w > 0 ? scale_w : 0};
  if (check_interpolate(x, out_h, out_w, mode, align_corners, scale)) return NULL;
  const ts_backend *be = TS_BACKEND(x->device, interpolate, "interpolate");
  if (!be) return NULL;
  int previous = ts_set_grad_enabled(0), compute = be->compute_dtype(x->dtype);
  int64_t shape[4] = {x->shape[0], x->shape[1], out_h, out_w};
  ts_tensor *xc = ts_nn_dense(x, compute);
  ts_tensor *out = xc ? ts_empty(4, shape, compute, x->device) : NULL;
  if (out && ts_numel(out) > 0 && be->interpolate(out, xc, mode, align_corners != 0, scale)) {
    ts_release(out);
    out = NULL;
  }
  ts_release(xc);
  if (out && out->dtype != x->dtype) {
    ts_tensor *rounded = ts_to_dtype(out, x->dtype);
    ts_release(out);
    out = rounded;
  }
  ts_set_grad_enabled(previous);
  ts_node *n = out ? ts_grad_node("interpolate", interpolate_backward, 1, &x) : NULL;
  if (!n) return out;
  n->i[0] = mode;
  n->i[1] = align_corners != 0;
  n->d[0] = scale[0];
  n->d[1] = scale[1];
  return ts_node_finish(n, out);
}

/* ---- region copies shared by pad and roll ---------------------------------------------------- */
/* dst[dst_start[d] : +len[d]] = src[src_start[d] : +len[d]] over every dim (nothing when a length
   is 0). Grad mode is off in the callers. */
static int copy_region(ts_tensor *dst, const int64_t *dst_start, ts_tensor *src, const int64_t *src_start,
                       const int64_t *len) {
  int nd = src->ndim;
  for (int d = 0; d < nd; d++)
    if (len[d] == 0) return TS_OK;
  ts_tensor *to = dst, *from = src;
  ts_retain(to);
  ts_retain(from);
  for (int d = 0; d < nd && to && from; d++) {
    ts_tensor *a = ts_narrow(to, d, dst_start[d], len[d]), *b = ts_narrow(from, d, src_start[d], len[d]);
    ts_release(to);
    ts_release(from);
    to = a;
    from = b;
  }
  int st = to && from ? ts_copy_(to, from) : ts_last_status();
  ts_release(to);
  ts_release(from);
  return st;
}

/* ---- pad ------------------------------------------------------------------------------------- */
/* Per dim: how much is added before/after (>= 0) and cropped before/after (>= 0). */
typedef struct { int64_t add[2], crop[2]; } pad_amounts;

static int plan_pad(const ts_tensor *x, int npad, const int64_t *pad, pad_amounts *amounts, int64_t *shape) {
  int nd = x->ndim;
  if (npad < 0 || npad % 2)
    return ts_set_error(TS_ERR_ARG, "pad: padding length must be divisible by 2, got %d", npad);
  if (npad / 2 > nd)
    return ts_set_error(TS_ERR_ARG, "pad: padding length %d is too large for the %d-D input %s (at most 2 per dim)", npad,
                        nd, ts_tshape(x));
  for (int d = 0; d < nd; d++) {
    pad_amounts *a = &amounts[d];
    int k = nd - 1 - d; /* pairs start from the last dim */
    int64_t before = k < npad / 2 ? pad[2 * k] : 0, after = k < npad / 2 ? pad[2 * k + 1] : 0;
    *a = (pad_amounts){{before > 0 ? before : 0, after > 0 ? after : 0}, {before < 0 ? -before : 0, after < 0 ? -after : 0}};
    if (a->crop[0] + a->crop[1] > x->shape[d])
      return ts_set_error(TS_ERR_SHAPE, "pad: padding (%lld, %lld) crops more than the %lld elements of dim %d of input %s",
                          (long long)before, (long long)after, (long long)x->shape[d], d, ts_tshape(x));
    shape[d] = x->shape[d] + before + after;
  }
  return TS_OK;
}

static ts_tensor *pad_impl(ts_tensor *x, int npad, const int64_t *pad, double value) {
  pad_amounts amounts[TS_MAX_DIMS];
  int64_t shape[TS_MAX_DIMS], dst_start[TS_MAX_DIMS], src_start[TS_MAX_DIMS], len[TS_MAX_DIMS];
  if (plan_pad(x, npad, pad, amounts, shape)) return NULL;
  ts_tensor *out = ts_full(x->ndim, shape, value, x->dtype, x->device);
  if (!out) return NULL;
  for (int d = 0; d < x->ndim; d++) {
    dst_start[d] = amounts[d].add[0];
    src_start[d] = amounts[d].crop[0];
    len[d] = x->shape[d] - amounts[d].crop[0] - amounts[d].crop[1];
  }
  if (copy_region(out, dst_start, x, src_start, len)) {
    ts_release(out);
    return NULL;
  }
  return out;
}

static int pad_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  int npad = (int)n->i[0];
  int64_t negated[2 * TS_MAX_DIMS];
  for (int k = 0; k < npad; k++) negated[k] = -n->i[1 + k];
  ts_tensor *gx = pad_impl(g, npad, negated, 0);
  if (!gx) return ts_last_status();
  int st = ts_set_input_grad(n, 0, gx, grads);
  ts_release(gx);
  return st;
}

ts_tensor *ts_pad(ts_tensor *x, int npad, const int64_t *pad, double value) {
  if (!x) return TS_FAIL_NULL(TS_ERR_ARG, "pad: NULL input");
  if (npad > 0 && !pad) return TS_FAIL_NULL(TS_ERR_ARG, "pad: NULL padding for length %d", npad);
  int previous = ts_set_grad_enabled(0);
  ts_tensor *out = pad_impl(x, npad, pad, value);
  ts_set_grad_enabled(previous);
  ts_node *n = out ? ts_grad_node("pad", pad_backward, 1, &x) : NULL;
  if (!n) return out;
  n->i[0] = npad;
  for (int k = 0; k < npad; k++) n->i[1 + k] = pad[k];
  return ts_node_finish(n, out);
}

/* ---- roll ------------------------------------------------------------------------------------ */
/* Rolls every dim d of x by shift[d] (0 <= shift[d] < size): out[(i + s) mod n] = x[i], done as
   two region copies per rolled dim, 2^k copies for k rolled dims. */
static ts_tensor *roll_dims(ts_tensor *x, const int64_t *shift) {
  int nd = x->ndim, rolled[TS_MAX_DIMS], k = 0;
  for (int d = 0; d < nd; d++)
    if (shift[d]) rolled[k++] = d;
  ts_tensor *out = ts_empty(nd, x->shape, x->dtype, x->device);
  if (!out || ts_numel(out) == 0) return out;
  if (k == 0) {
    if (!ts_copy_(out, x)) return out;
    ts_release(out);
    return NULL;
  }
  int64_t dst_start[TS_MAX_DIMS] = {0}, src_start[TS_MAX_DIMS] = {0}, len[TS_MAX_DIMS];
  for (int d = 0; d < nd; d++) len[d] = x->shape[d];
  for (int64_t combo = 0; combo < ((int64_t)1 << k); combo++) {
    for (int j = 0; j < k; j++) {
      int d = rolled[j];
      int64_t n = x->shape[d], s = shift[d], wraps = combo >> j & 1;
      /* the head x[0, n - s) lands at [s, n); the tail x[n - s, n) wraps to [0, s) */
      dst_start[d] = wraps ? 0 : s;
      src_start[d] = wraps ? n - s : 0;
      len[d] = wraps ? s : n - s;
    }
    if (copy_region(out, dst_start, x, src_start, len)) {
      ts_release(out);
      return NULL;
    }
  }
  return out;
}

/* The flattened roll: a 1-D roll of x's elements in row-major order, in x's shape. */
static ts_tensor *roll_flat(ts_tensor *x, int64_t shift) {
  int64_t numel = ts_numel(x);
  ts_tensor *flat = ts_reshape(x, 1, &numel);
  int64_t s = numel > 0 ? ((shift % numel) + numel) % numel : 0;
  ts_tensor *rolled = flat ? roll_dims(flat, &s) : NULL;
  ts_release(flat);
  ts_tensor *out = rolled ? ts_view(rolled, x->ndim, x->shape) : NULL;
  ts_release(rolled);
  return out;
}

/* Node parameters: i[d] the total shift of dim d; flattened rolls: i[TS_MAX_DIMS] = 1, shift in i[0]. */
static int roll_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  const ts_edge *e = ts_node_input(n, 0);
  int64_t negated[TS_MAX_DIMS];
  ts_tensor *gx;
  if (n->i[TS_MAX_DIMS]) {
    gx = roll_flat(g, -n->i[0]);
  } else {
    for (int d = 0; d < e->ndim; d++) negated[d] = e->shape[d] > 0 ? (e->shape[d] - n->i[d]) % e->shape[d] : 0;
    gx = roll_dims(g, negated);
  }
  if (!gx) return ts_last_status();
  int st = ts_set_input_grad(n, 0, gx, grads);
  ts_release(gx);
  return st;
}

/* Sums the shifts of each dim, reduced modulo its size. */
static int total_shifts(const ts_tensor *x, int nshifts, const int64_t *shifts, const int *dims, int64_t *total) {
  for (int d = 0; d < x->ndim; d++) total[d] = 0;
  for (int k = 0; k < nshifts; k++) {
    int d;
    if (ts_wrap_dim("roll", dims[k], x->ndim, &d)) return ts_last_status();
    int64_t n = x->shape[d];
    if (n > 0) total[d] = ((total[d] + shifts[k] % n) % n + n) % n;
  }
  return TS_OK;
}

ts_tensor *ts_roll(ts_tensor *x, int nshifts, const int64_t *shifts, const int *dims) {
  if (!x) return TS_FAIL_NULL(TS_ERR_ARG, "roll: NULL input");
  if (nshifts <= 0 || !shifts) return TS_FAIL_NULL(TS_ERR_ARG, "roll: expected at least one shift, got %d", nshifts);
  if (!dims && nshifts != 1)
    return TS_FAIL_NULL(TS_ERR_ARG, "roll: without dims the flattened tensor is rolled by one shift, got %d shifts",
                        nshifts);
  if (dims && x->ndim == 0) return TS_FAIL_NULL(TS_ERR_ARG, "roll: a 0-d tensor has no dims to roll; roll without dims");
  int64_t total[TS_MAX_DIMS];
  if (dims && total_shifts(x, nshifts, shifts, dims, total)) return NULL;
  int previous = ts_set_grad_enabled(0);
  ts_tensor *out = dims ? roll_dims(x, total) : roll_flat(x, shifts[0]);
  ts_set_grad_enabled(previous);
  ts_node *n = out ? ts_grad_node("roll", roll_backward, 1, &x) : NULL;
  if (!n) return out;
  if (dims) {
    for (int d = 0; d < x->ndim; d++) n->i[d] = total[d];
  } else {
    n->i[0] = shifts[0];
    n->i[TS_MAX_DIMS] = 1;
  }
  return ts_node_finish(n, out);
}

/* ---- pixel_shuffle / pixel_unshuffle --------------------------------------------------------- */
/* x [*, C, H, W] as 6 dims [B, a, b, c, d, e] (B the leading dims together), permuted by `order`
   and reshaped to [*, C', H', W']. Every step is a public, recorded view op (the last one copies). */
static ts_tensor *regroup(ts_tensor *x, const int64_t *six, const int *order, const int64_t *last3) {
  int nd = x->ndim;
  int64_t final[TS_MAX_DIMS];
  for (int d = 0; d < nd - 3; d++) final[d] = x->shape[d];
  for (int k = 0; k < 3; k++) final[nd - 3 + k] = last3[k];
  ts_tensor *v = ts_reshape(x, 6, six);
  ts_tensor *p = v ? ts_permute(v, 6, order) : NULL;
  ts_tensor *out = p ? ts_reshape(p, nd, final) : NULL;
  ts_release(v);
  ts_release(p);
  return out;
}

static int check_shuffle(const char *op, const char *factor, const ts_tensor *x, int64_t r) {
  if (!x) return ts_set_error(TS_ERR_ARG, "%s: NULL input", op);
  if (x->ndim < 3)
    return ts_set_error(TS_ERR_SHAPE, "%s: expected an input [*, C, H, W] of at least 3 dims, got %s", op, ts_tshape(x));
  if (r <= 0) return ts_set_error(TS_ERR_ARG, "%s: %s must be positive, got %lld", op, factor, (long long)r);
  return TS_OK;
}

static int64_t leading(const ts_tensor *x) {
  int64_t b = 1;
  for (int d = 0; d < x->ndim - 3; d++) b *= x->shape[d];
  return b;
}

ts_tensor *ts_pixel_shuffle(ts_tensor *x, int64_t r) {
  if (check_shuffle("pixel_shuffle", "upscale_factor", x, r)) return NULL;
  int nd = x->ndim;
  int64_t C = x->shape[nd - 3], H = x->shape[nd - 2], W = x->shape[nd - 1];
  if (C % (r * r))
    return TS_FAIL_NULL(TS_ERR_SHAPE, "pixel_shuffle: the channels (%lld) of input %s must be divisible by "
                        "upscale_factor^2 = %lld", (long long)C, ts_tshape(x), (long long)(r * r));
  int64_t six[6] = {leading(x), C / (r * r), r, r, H, W}, last3[3] = {C / (r * r), H * r, W * r};
  int order[6] = {0, 1, 4, 2, 5, 3}; /* [B, c, i, j, h, w] -> [B, c, h, i, w, j] */
  return regroup(x, six, order, last3);
}

ts_tensor *ts_pixel_unshuffle(ts_tensor *x, int64_t r) {
  if (check_shuffle("pixel_unshuffle", "downscale_factor", x, r)) return NULL;
  int nd = x->ndim;
  int64_t C = x->shape[nd - 3], H = x->shape[nd - 2], W = x->shape[nd - 1];
  if (H % r || W % r)
    return TS_FAIL_NULL(TS_ERR_SHAPE, "pixel_unshuffle: the height (%lld) and width (%lld) of input %s must be "
                        "divisible by downscale_factor %lld", (long long)H, (long long)W, ts_tshape(x), (long long)r);
  int64_t six[6] = {leading(x), C, H / r, r, W / r, r}, last3[3] = {C * r * r, H / r, W / r};
  int order[6] = {0, 1, 3, 5, 2, 4}; /* [B, c, h, i, w, j] -> [B, c, i, j, h, w] */
  return regroup(x, six, order, last3);
}

/* norm.c — CPU kernels for layer norm, batch norm and group norm, forward and backward.
 *
 * Statistics are computed in double with two passes over data that is in cache (mean, then the
 * squared deviations), which stays exact where the one-pass formula E[x^2] - E[x]^2 cancels.
 * Sums across rows that threads compute separately (weight and bias gradients, batch statistics)
 * go through partial results per fixed chunk, combined in order: the result does not depend on
 * the number of threads. Tensors are contiguous, float32 or float64; see backend.h. */
#include "cpu.h"

#include <math.h>
#include <stdlib.h>

#include "values.h"

/* An optional per-element parameter (weight or bias): `absent` where the tensor is NULL. */
ALWAYS_INLINE double param(const void *p, int64_t i, double absent, int f64) { return p ? load(p, i, f64) : absent; }

static const void *data_or_null(const ts_tensor *t) { return t ? ts_elem_ptr(t) : NULL; }
static void *out_or_null(ts_tensor *t) { return t ? ts_elem_ptr(t) : NULL; }
static int64_t grain_for(int64_t per_item) { return CPU_PARALLEL_GRAIN / (per_item > 0 ? per_item : 1) + 1; }

static double *alloc_doubles(const char *op, int64_t n) {
  double *p = calloc((size_t)(n > 0 ? n : 1), sizeof(double));
  if (!p) ts_set_error(TS_ERR_MEMORY, "%s: out of host memory", op);
  return p;
}

/* Mean and sum of squared deviations of n values, two passes in double, each summed in LANES
   independent chains (the adds overlap instead of waiting on one another). */
enum { LANES = 4 };
ALWAYS_INLINE void row_moments(const void *x, int64_t base, int64_t n, double *mean, double *m2, int f64) {
  double s[LANES] = {0}, q[LANES] = {0};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int l = 0; l < LANES; l++) s[l] += load(x, base + i + l, f64);
  for (; i < n; i++) s[0] += load(x, base + i, f64);
  double mu = n > 0 ? (s[0] + s[1] + s[2] + s[3]) / (double)n : 0;
  for (i = 0; i + LANES <= n; i += LANES)
    for (int l = 0; l < LANES; l++) {
      double d = load(x, base + i + l, f64) - mu;
      q[l] += d * d;
    }
  for (; i < n; i++) {
    double d = load(x, base + i, f64) - mu;
    q[0] += d * d;
  }
  *mean = mu;
  *m2 = q[0] + q[1] + q[2] + q[3];
}

/* ---- layer norm ------------------------------------------------------------------------------ */
typedef struct {
  const void *x, *w, *b, *g, *mean_in, *rstd_in;
  void *out, *mean, *rstd, *gx;
  double *partial; /* backward: per chunk, gw partials [n] then gb partials [n] */
  int64_t m, n, chunks;
  double eps;
  int want_gw, want_gb;
} layer_norm_ctx;

ALWAYS_INLINE void layer_norm_row(const layer_norm_ctx *c, int64_t r, int f64) {
  int64_t base = r * c->n;
  double mu, m2;
  row_moments(c->x, base, c->n, &mu, &m2, f64);
  double rstd = 1.0 / sqrt(m2 / (double)c->n + c->eps);
  store(c->mean, r, mu, f64);
  store(c->rstd, r, rstd, f64);
  for (int64_t j = 0; j < c->n; j++) {
    double xhat = (load(c->x, base + j, f64) - mu) * rstd;
    store(c->out, base + j, xhat * param(c->w, j, 1, f64) + param(c->b, j, 0, f64), f64);
  }
}

static void layer_norm_f32(int64_t begin, int64_t end, void *arg) {
  for (int64_t r = begin; r < end; r++) layer_norm_row(arg, r, 0);
}
static void layer_norm_f64(int64_t begin, int64_t end, void *arg) {
  for (int64_t r = begin; r < end; r++) layer_norm_row(arg, r, 1);
}

int cpu_layer_norm(ts_tensor *out, ts_tensor *mean, ts_tensor *rstd, const ts_tensor *x, const ts_tensor *w,
                   const ts_tensor *b, double eps) {
  layer_norm_ctx c = {.x = ts_elem_ptr(x), .w = data_or_null(w), .b = data_or_null(b), .out = ts_elem_ptr(out),
                      .mean = ts_elem_ptr(mean), .rstd = ts_elem_ptr(rstd), .m = x->shape[0], .n = x->shape[1],
                      .eps = eps};
  ts_parallel_for(c.m, grain_for(c.n), out->dtype == TS_F64 ? layer_norm_f64 : layer_norm_f32, &c);
  return TS_OK;
}

/* Σ dy and Σ dy xhat over a row, in LANES independent chains (has_w a constant at each call, so
   that the loop has no branch and vectorizes). */
ALWAYS_INLINE void layer_norm_grad_sums(const layer_norm_ctx *c, int64_t base, double mu, double rstd, int f64,
                                        int has_w, double *sum_dy, double *sum_dy_xhat) {
  double s_dy[LANES] = {0}, s_dyx[LANES] = {0};
  int64_t j = 0, n = c->n;
  for (; j + LANES <= n; j += LANES)
    for (int l = 0; l < LANES; l++) {
      double xhat = (load(c->x, base + j + l, f64) - mu) * rstd;
      double dy = load(c->g, base + j + l, f64) * (has_w ? load(c->w, j + l, f64) : 1.0);
      s_dy[l] += dy;
      s_dyx[l] += dy * xhat;
    }
  for (; j < n; j++) {
    double xhat = (load(c->x, base + j, f64) - mu) * rstd;
    double dy = load(c->g, base + j, f64) * (has_w ? load(c->w, j, f64) : 1.0);
    s_dy[0] += dy;
    s_dyx[0] += dy * xhat;
  }
  *sum_dy = (s_dy[0] + s_dy[1]) + (s_dy[2] + s_dy[3]);
  *sum_dy_xhat = (s_dyx[0] + s_dyx[1]) + (s_dyx[2] + s_dyx[3]);
}

/* With xhat = (x - mean) rstd and dy = g w:
     gx = rstd (dy - mean(dy) - xhat mean(dy xhat)),  gw += g xhat,  gb += g. */
ALWAYS_INLINE void layer_norm_backward_chunk(const layer_norm_ctx *c, int64_t chunk, int f64) {
  int64_t r0 = chunk * c->m / c->chunks, r1 = (chunk + 1) * c->m / c->chunks, n = c->n;
  double *pgw = c->partial ? c->partial + chunk * 2 * n : NULL, *pgb = pgw ? pgw + n : NULL;
  for (int64_t r = r0; r < r1; r++) {
    int64_t base = r * n;
    double mu = load(c->mean_in, r, f64), rstd = load(c->rstd_in, r, f64);
    double sum_dy, sum_dy_xhat;
    if (c->w)
      layer_norm_grad_sums(c, base, mu, rstd, f64, 1, &sum_dy, &sum_dy_xhat);
    else
      layer_norm_grad_sums(c, base, mu, rstd, f64, 0, &sum_dy, &sum_dy_xhat);
    int64_t j;
    if (c->want_gw)
      for (j = 0; j < n; j++) pgw[j] += load(c->g, base + j, f64) * ((load(c->x, base + j, f64) - mu) * rstd);
    if (c->want_gb)
      for (j = 0; j < n; j++) pgb[j] += load(c->g, base + j, f64);
    if (!c->gx) continue;
    double mean_dy = sum_dy / (double)n, mean_dy_xhat = sum_dy_xhat / (double)n;
    for (int64_t j = 0; j < n; j++) {
      double xhat = (load(c->x, base + j, f64) - mu) * rstd;
      double dy = load(c->g, base + j, f64) * param(c->w, j, 1, f64);
      store(c->gx, base + j, rstd * (dy - mean_dy - xhat * mean_dy_xhat), f64);
    }
  }
}

static void layer_norm_backward_f32(int64_t begin, int64_t end, void *arg) {
  for (int64_t k = begin; k < end; k++) layer_norm_backward_chunk(arg, k, 0);
}
static void layer_norm_backward_f64(int64_t begin, int64_t end, void *arg) {
  for (int64_t k = begin; k < end; k++) layer_norm_backward_chunk(arg, k, 1);
}

int cpu_layer_norm_backward(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g, const ts_tensor *x,
                            const ts_tensor *w, const ts_tensor *mean, const ts_tensor *rstd) {
  int f64 = g->dtype == TS_F64;
  layer_norm_ctx c = {.x = ts_elem_ptr(x), .w = data_or_null(w), .g = ts_elem_ptr(g), .mean_in = ts_elem_ptr(mean),
                      .rstd_in = ts_elem_ptr(rstd), .gx = out_or_null(gx), .m = x->shape[0], .n = x->shape[1],
                      .want_gw = gw != NULL, .want_gb = gb != NULL};
  c.chunks = cpu_row_chunks(c.m, c.n);
  if (gw || gb) {
    c.partial = alloc_doubles("layer_norm backward", c.chunks * 2 * c.n);
    if (!c.partial) return ts_last_status();
  }
  ts_parallel_for(c.chunks, 1, f64 ? layer_norm_backward_f64 : layer_norm_backward_f32, &c);
  if (gw) cpu_combine_chunks(ts_elem_ptr(gw), f64, c.partial, c.chunks, 2 * c.n, 0, c.n);
  if (gb) cpu_combine_chunks(ts_elem_ptr(gb), f64, c.partial, c.chunks, 2 * c.n, c.n, c.n);
  free(c.partial);
  return TS_OK;
}

/* ---- batch norm ------------------------------------------------------------------------------ */
/* x [N, C, S]: plane (n, c) is the S contiguous values of sample n in channel c. */
typedef struct {
  const void *x, *w, *b, *g, *mean, *rstd;
  void *out, *gx;
  double *p1, *p2; /* per plane: stats (mean, m2) or backward sums (g, g xhat) */
  int64_t n, c, s;
  int training;
} batch_norm_ctx;

/* The two per-plane buffers p1 and p2; on failure neither is held and the error is set. */
static int alloc_plane_sums(const char *op, batch_norm_ctx *c) {
  c->p1 = alloc_doubles(op, c->n * c->c);
  c->p2 = c->p1 ? alloc_doubles(op, c->n * c->c) : NULL;
  if (c->p2) return TS_OK;
  free(c->p1);
  return ts_last_status();
}

ALWAYS_INLINE void plane_moments(const batch_norm_ctx *c, int64_t plane, int f64) {
  row_moments(c->x, plane * c->s, c->s, &c->p1[plane], &c->p2[plane], f64);
}

ALWAYS_INLINE void plane_apply(const batch_norm_ctx *c, int64_t plane, int f64) {
  int64_t ch = plane % c->c, base = plane * c->s;
  double mu = load(c->mean, ch, f64), scale = load(c->rstd, ch, f64) * param(c->w, ch, 1, f64);
  double shift = param(c->b, ch, 0, f64);
  for (int64_t i = 0; i < c->s; i++) store(c->out, base + i, (load(c->x, base + i, f64) - mu) * scale + shift, f64);
}

ALWAYS_INLINE void plane_grad_sums(const batch_norm_ctx *c, int64_t plane, int f64) {
  int64_t ch = plane % c->c, base = plane * c->s;
  double mu = load(c->mean, ch, f64), rstd = load(c->rstd, ch, f64), sg = 0, sgx = 0;
  for (int64_t i = 0; i < c->s; i++) {
    double gv = load(c->g, base + i, f64);
    sg += gv;
    sgx += gv * (load(c->x, base + i, f64) - mu) * rstd;
  }
  c->p1[plane] = sg;
  c->p2[plane] = sgx;
}

/* training: gx = w rstd (g - sum(g)/count - xhat sum(g xhat)/count), the sums per channel (in
   p1, p2 after the combine); evaluation: gx = g w rstd. */
ALWAYS_INLINE void plane_grad_input(const batch_norm_ctx *c, int64_t plane, int f64) {
  int64_t ch = plane % c->c, base = plane * c->s;
  double mu = load(c->mean, ch, f64), rstd = load(c->rstd, ch, f64), scale = rstd * param(c->w, ch, 1, f64);
  double count = (double)(c->n * c->s);
  double mean_g = c->training ? c->p1[ch] / count : 0, mean_gx = c->training ? c->p2[ch] / count : 0;
  for (int64_t i = 0; i < c->s; i++) {
    double xhat = (load(c->x, base + i, f64) - mu) * rstd;
    store(c->gx, base + i, scale * (load(c->g, base + i, f64) - mean_g - xhat * mean_gx), f64);
  }
}

#define PLANE_RANGE(NAME, BODY)                                                                    \
  static void NAME##_f32(int64_t begin, int64_t end, void *arg) {                                  \
    for (int64_t p = begin; p < end; p++) BODY(arg, p, 0);                                         \
  }                                                                                                \
  static void NAME##_f64(int64_t begin, int64_t end, void *arg) {                                  \
    for (int64_t p = begin; p < end; p++) BODY(arg, p, 1);                                         \
  }
PLANE_RANGE(moments, plane_moments)
PLANE_RANGE(apply, plane_apply)
PLANE_RANGE(grad_sums, plane_grad_sums)
PLANE_RANGE(grad_input, plane_grad_input)

static void run_planes(const batch_norm_ctx *c, int f64, ts_range_fn f32_fn, ts_range_fn f64_fn) {
  ts_parallel_for(c->n * c->c, grain_for(c->s), f64 ? f64_fn : f32_fn, (void *)c);
}

int cpu_batch_norm_stats(ts_tensor *mean, ts_tensor *var, const ts_tensor *x) {
  int f64 = x->dtype == TS_F64;
  batch_norm_ctx c = {.x = ts_elem_ptr(x), .n = x->shape[0], .c = x->shape[1], .s = x->shape[2]};
  if (alloc_plane_sums("batch_norm", &c)) return ts_last_status();
  run_planes(&c, f64, moments_f32, moments_f64);
  /* the planes of a channel merged in sample order (Chan, Golub and LeVeque) */
  for (int64_t ch = 0; ch < c.c; ch++) {
    double mu = 0, m2 = 0, count = 0, s = (double)c.s;
    for (int64_t i = 0; i < c.n; i++) {
      double pm = c.p1[i * c.c + ch], total = count + s, delta = pm - mu;
      mu += delta * (s / total);
      m2 += c.p2[i * c.c + ch] + delta * delta * (count * s / total);
      count = total;
    }
    store(ts_elem_ptr(mean), ch, count > 0 ? mu : NAN, f64);
    store(ts_elem_ptr(var), ch, count > 0 ? m2 / count : NAN, f64);
  }
  free(c.p1);
  free(c.p2);
  return TS_OK;
}

int cpu_batch_norm_apply(ts_tensor *out, const ts_tensor *x, const ts_tensor *mean, const ts_tensor *rstd,
                         const ts_tensor *w, const ts_tensor *b) {
  batch_norm_ctx c = {.x = ts_elem_ptr(x), .w = data_or_null(w), .b = data_or_null(b), .mean = ts_elem_ptr(mean),
                      .rstd = ts_elem_ptr(rstd), .out = ts_elem_ptr(out), .n = x->shape[0], .c = x->shape[1],
                      .s = x->shape[2]};
  run_planes(&c, out->dtype == TS_F64, apply_f32, apply_f64);
  return TS_OK;
}

int cpu_batch_norm_backward(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g, const ts_tensor *x,
                            const ts_tensor *w, const ts_tensor *mean, const ts_tensor *rstd, int training) {
  int f64 = g->dtype == TS_F64;
  batch_norm_ctx c = {.x = ts_elem_ptr(x), .w = data_or_null(w), .g = ts_elem_ptr(g), .mean = ts_elem_ptr(mean),
                      .rstd = ts_elem_ptr(rstd), .gx = out_or_null(gx), .n = x->shape[0], .c = x->shape[1],
                      .s = x->shape[2], .training = training};
  int need_sums = gw || gb || (gx && training);
  if (need_sums) {
    if (alloc_plane_sums("batch_norm backward", &c)) return ts_last_status();
    run_planes(&c, f64, grad_sums_f32, grad_sums_f64);
    /* per-channel totals, in sample order, into the first C entries */
    for (int64_t ch = 0; ch < c.c; ch++) {
      double sg = 0, sgx = 0;
      for (int64_t i = 0; i < c.n; i++) sg += c.p1[i * c.c + ch], sgx += c.p2[i * c.c + ch];
      c.p1[ch] = sg;
      c.p2[ch] = sgx;
    }
    if (gw) cpu_combine_chunks(ts_elem_ptr(gw), f64, c.p2, 1, 0, 0, c.c);
    if (gb) cpu_combine_chunks(ts_elem_ptr(gb), f64, c.p1, 1, 0, 0, c.c);
  }
  if (gx) run_planes(&c, f64, grad_input_f32, grad_input_f64);
  free(c.p1);
  free(c.p2);
  return TS_OK;
}

/* ---- group norm ------------------------------------------------------------------------------ */
/* x [N, C, S] with G groups: row (n, grp) is the contiguous (C/G) * S values of C/G channels. */
typedef struct {
  const void *x, *w, *b, *g, *mean_in, *rstd_in;
  void *out, *mean, *rstd, *gx;
  double *pg, *pgx; /* backward: per (n, c) sums of g and g xhat */
  int64_t n, c, s, groups, per_group;
  double eps;
} group_norm_ctx;

ALWAYS_INLINE void group_norm_row(const group_norm_ctx *c, int64_t row, int f64) {
  int64_t len = c->per_group * c->s, base = row * len, c0 = (row % c->groups) * c->per_group;
  double mu, m2;
  row_moments(c->x, base, len, &mu, &m2, f64);
  double rstd = 1.0 / sqrt(m2 / (double)len + c->eps);
  store(c->mean, row, mu, f64);
  store(c->rstd, row, rstd, f64);
  for (int64_t k = 0; k < c->per_group; k++) {
    double scale = rstd * param(c->w, c0 + k, 1, f64), shift = param(c->b, c0 + k, 0, f64);
    int64_t at = base + k * c->s;
    for (int64_t i = 0; i < c->s; i++) store(c->out, at + i, (load(c->x, at + i, f64) - mu) * scale + shift, f64);
  }
}

/* As layer norm's, per row, with dy = g w[c]; the (n, c) sums of g and g xhat feed gw and gb. */
ALWAYS_INLINE void group_norm_backward_row(const group_norm_ctx *c, int64_t row, int f64) {
  int64_t len = c->per_group * c->s, base = row * len, c0 = (row % c->groups) * c->per_group;
  int64_t plane0 = (row / c->groups) * c->c + c0;
  double mu = load(c->mean_in, row, f64), rstd = load(c->rstd_in, row, f64), sum_dy = 0, sum_dy_xhat = 0;
  for (int64_t k = 0; k < c->per_group; k++) {
    double wk = param(c->w, c0 + k, 1, f64), sg = 0, sgx = 0;
    int64_t at = base + k * c->s;
    for (int64_t i = 0; i < c->s; i++) {
      double gv = load(c->g, at + i, f64), xhat = (load(c->x, at + i, f64) - mu) * rstd;
      sg += gv;
      sgx += gv * xhat;
    }
    sum_dy += wk * sg;
    sum_dy_xhat += wk * sgx;
    if (c->pg) c->pg[plane0 + k] = sg, c->pgx[plane0 + k] = sgx;
  }
  if (!c->gx) return;
  double mean_dy = sum_dy / (double)len, mean_dy_xhat = sum_dy_xhat / (double)len;
  for (int64_t k = 0; k < c->per_group; k++) {
    double wk = param(c->w, c0 + k, 1, f64);
    int64_t at = base + k * c->s;
    for (int64_t i = 0; i < c->s; i++) {
      double xhat = (load(c->x, at + i, f64) - mu) * rstd;
      store(c->gx, at + i, rstd * (load(c->g, at + i, f64) * wk - mean_dy - xhat * mean_dy_xhat), f64);
    }
  }
}

PLANE_RANGE(group_rows, group_norm_row)
PLANE_RANGE(group_backward_rows, group_norm_backward_row)

int cpu_group_norm(ts_tensor *out, ts_tensor *mean, ts_tensor *rstd, const ts_tensor *x, const ts_tensor *w,
                   const ts_tensor *b, double eps) {
  group_norm_ctx c = {.x = ts_elem_ptr(x), .w = data_or_null(w), .b = data_or_null(b), .out = ts_elem_ptr(out),
                      .mean = ts_elem_ptr(mean), .rstd = ts_elem_ptr(rstd), .n = x->shape[0], .c = x->shape[1],
                      .s = x->shape[2], .groups = mean->shape[1], .eps = eps};
  c.per_group = c.c / c.groups;
  ts_range_fn rows = out->dtype == TS_F64 ? group_rows_f64 : group_rows_f32;
  ts_parallel_for(c.n * c.groups, grain_for(c.per_group * c.s), rows, &c);
  return TS_OK;
}

int cpu_group_norm_backward(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g, const ts_tensor *x,
                            const ts_tensor *w, const ts_tensor *mean, const ts_tensor *rstd) {
  int f64 = g->dtype == TS_F64;
  group_norm_ctx c = {.x = ts_elem_ptr(x), .w = data_or_null(w), .g = ts_elem_ptr(g), .mean_in = ts_elem_ptr(mean),
                      .rstd_in = ts_elem_ptr(rstd), .gx = out_or_null(gx), .n = x->shape[0], .c = x->shape[1],
                      .s = x->shape[2], .groups = mean->shape[1]};
  c.per_group = c.c / c.groups;
  if (gw || gb) {
    c.pg = alloc_doubles("group_norm backward", c.n * c.c);
    c.pgx = c.pg ? alloc_doubles("group_norm backward", c.n * c.c) : NULL;
    if (!c.pgx) {
      free(c.pg);
      return ts_last_status();
    }
  }
  ts_parallel_for(c.n * c.groups, grain_for(c.per_group * c.s), f64 ? group_backward_rows_f64 : group_backward_rows_f32,
                  &c);
  /* gw, gb: the (n, c) sums over samples, in sample order */
  if (gw) cpu_combine_chunks(ts_elem_ptr(gw), f64, c.pgx, c.n, c.c, 0, c.c);
  if (gb) cpu_combine_chunks(ts_elem_ptr(gb), f64, c.pg, c.n, c.c, 0, c.c);
  free(c.pg);
  free(c.pgx);
  return TS_OK;
}

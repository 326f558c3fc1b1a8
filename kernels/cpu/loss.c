/* loss.c — CPU kernels for cross entropy (with its log-softmax fused in) and the elementwise
 * regression losses (MSE, L1, smooth L1), forward and backward.
 *
 * Cross entropy, at each position (n, s) of logits [N, C, S], with lse = log sum_c exp(z_c),
 * eps the label smoothing and w the class weights (1 without):
 *   class index t:   q_c = (1 - eps) w_t [c = t] + (eps / C) w_c
 *   probabilities t: q_c = ((1 - eps) t_c + eps / C) w_c
 *   loss = sum_c q_c (lse - z_c),   d loss / d z_c = softmax(z)_c sum(q) - q_c,
 *   d loss / d t_c = (1 - eps) w_c (z_c - lse) * -1 (probabilities only).
 * This is PyTorch's definition: the smoothing term of a class-index target is weighted per class
 * and masked where the target is ignore_index. */
#include "cpu.h"
#include "../../runtime/nn.h"

#include <math.h>
#include <stdlib.h>

#include "values.h"

/* ---- cross entropy --------------------------------------------------------------------------- */
typedef struct {
  const void *z, *target, *weight, *lse_in, *g;
  void *loss, *lse, *tw, *gz, *gt;
  int64_t n, c, s;
  int64_t g_stride_n, g_stride_s; /* backward: g is a [N, S] view */
  int64_t ignore_index;
  double smoothing, weight_sum;
  int soft;
} ce_ctx;

ALWAYS_INLINE double class_weight(const ce_ctx *c, int64_t k, int f64) {
  return c->weight ? load(c->weight, k, f64) : 1.0;
}

/* log sum_c exp(z_c) over the C logits at base, S apart, shifted by their max. */
ALWAYS_INLINE double log_sum_exp(const ce_ctx *c, int64_t base, int f64) {
  double mx = -INFINITY, sum = 0;
  for (int64_t k = 0; k < c->c; k++) {
    double v = load(c->z, base + k * c->s, f64);
    mx = v > mx ? v : mx;
  }
  if (mx == -INFINITY) return mx; /* every logit -inf (or no classes): nothing to normalize */
  for (int64_t k = 0; k < c->c; k++) sum += exp_of(load(c->z, base + k * c->s, f64) - mx, f64);
  return mx + log(sum);
}

/* The target's (unsmoothed) weight q_c / (1 - eps) contributes; eps / C w_c is the uniform part. */
ALWAYS_INLINE double target_mass(const ce_ctx *c, int64_t base, int64_t k, int64_t t, int f64) {
  if (c->soft) return load(c->target, base + k * c->s, f64) * class_weight(c, k, f64);
  return k == t ? class_weight(c, k, f64) : 0.0;
}

ALWAYS_INLINE void ce_position(const ce_ctx *c, int64_t pos, int f64) {
  int64_t nn = pos / c->s, ss = pos % c->s, base = nn * c->c * c->s + ss;
  double lse = log_sum_exp(c, base, f64);
  store(c->lse, pos, lse, f64);
  int64_t t = c->soft ? -1 : ((const int64_t *)c->target)[pos];
  if (!c->soft && t == c->ignore_index) {
    store(c->loss, pos, 0, f64);
    if (c->tw) store(c->tw, pos, 0, f64);
    return;
  }
  double eps = c->smoothing, uniform = eps / (double)c->c, loss = 0;
  if (!c->soft && eps == 0) {
    loss = class_weight(c, t, f64) * (lse - load(c->z, base + t * c->s, f64));
  } else {
    for (int64_t k = 0; k < c->c; k++) {
      double q = (1 - eps) * target_mass(c, base, k, t, f64) + uniform * class_weight(c, k, f64);
      if (q != 0) loss += q * (lse - load(c->z, base + k * c->s, f64)); /* q = 0 skips 0 * inf */
    }
  }
  store(c->loss, pos, loss, f64);
  if (c->tw) store(c->tw, pos, class_weight(c, t, f64), f64);
}

ALWAYS_INLINE void ce_backward_position(const ce_ctx *c, int64_t pos, int f64) {
  int64_t nn = pos / c->s, ss = pos % c->s, base = nn * c->c * c->s + ss;
  double gi = load(c->g, nn * c->g_stride_n + ss * c->g_stride_s, f64), lse = load(c->lse_in, pos, f64);
  int64_t t = c->soft ? -1 : ((const int64_t *)c->target)[pos];
  double eps = c->smoothing, uniform = eps / (double)c->c;
  if (!c->soft && t == c->ignore_index) { /* an ignored position passes no gradient */
    for (int64_t k = 0; c->gz && k < c->c; k++) store(c->gz, base + k * c->s, 0, f64);
    return;
  }
  double sum_q = uniform * c->weight_sum;
  if (c->soft) {
    for (int64_t k = 0; k < c->c; k++) sum_q += (1 - eps) * target_mass(c, base, k, t, f64);
  } else {
    sum_q += (1 - eps) * class_weight(c, t, f64);
  }
  for (int64_t k = 0; k < c->c; k++) {
    int64_t at = base + k * c->s;
    double zk = load(c->z, at, f64), wk = class_weight(c, k, f64);
    double q = (1 - eps) * target_mass(c, base, k, t, f64) + uniform * wk;
    if (c->gz) store(c->gz, at, gi * (exp_of(zk - lse, f64) * sum_q - q), f64);
    if (c->gt) store(c->gt, at, -gi * (1 - eps) * wk * (zk - lse), f64);
  }
}

static void ce_forward_f32(int64_t begin, int64_t end, void *arg) {
  for (int64_t p = begin; p < end; p++) ce_position(arg, p, 0);
}
static void ce_forward_f64(int64_t begin, int64_t end, void *arg) {
  for (int64_t p = begin; p < end; p++) ce_position(arg, p, 1);
}
static void ce_backward_f32(int64_t begin, int64_t end, void *arg) {
  for (int64_t p = begin; p < end; p++) ce_backward_position(arg, p, 0);
}
static void ce_backward_f64(int64_t begin, int64_t end, void *arg) {
  for (int64_t p = begin; p < end; p++) ce_backward_position(arg, p, 1);
}

static int64_t positions_grain(int64_t classes) { return CPU_PARALLEL_GRAIN / (classes > 0 ? classes : 1) + 1; }

int cpu_cross_entropy(ts_tensor *loss, ts_tensor *lse, ts_tensor *tw, const ts_tensor *logits, const ts_tensor *target,
                      const ts_tensor *weight, int64_t ignore_index, double smoothing) {
  ce_ctx c = {.z = ts_elem_ptr(logits), .target = ts_elem_ptr(target), .weight = weight ? ts_elem_ptr(weight) : NULL,
              .loss = ts_elem_ptr(loss), .lse = ts_elem_ptr(lse), .tw = tw ? ts_elem_ptr(tw) : NULL,
              .n = logits->shape[0], .c = logits->shape[1], .s = logits->shape[2], .ignore_index = ignore_index,
              .smoothing = smoothing, .soft = target->dtype != TS_I64};
  ts_parallel_for(c.n * c.s, positions_grain(c.c), logits->dtype == TS_F64 ? ce_forward_f64 : ce_forward_f32, &c);
  return TS_OK;
}

int cpu_cross_entropy_backward(ts_tensor *glogits, ts_tensor *gtarget, const ts_tensor *g, const ts_tensor *logits,
                               const ts_tensor *lse, const ts_tensor *target, const ts_tensor *weight,
                               int64_t ignore_index, double smoothing) {
  int f64 = logits->dtype == TS_F64;
  ce_ctx c = {.z = ts_elem_ptr(logits), .target = ts_elem_ptr(target), .weight = weight ? ts_elem_ptr(weight) : NULL,
              .lse_in = ts_elem_ptr(lse), .g = ts_elem_ptr(g), .gz = glogits ? ts_elem_ptr(glogits) : NULL,
              .gt = gtarget ? ts_elem_ptr(gtarget) : NULL, .n = logits->shape[0], .c = logits->shape[1],
              .s = logits->shape[2], .g_stride_n = g->stride[0], .g_stride_s = g->stride[1],
              .ignore_index = ignore_index, .smoothing = smoothing, .soft = target->dtype != TS_I64};
  c.weight_sum = (double)c.c;
  if (weight) {
    c.weight_sum = 0;
    for (int64_t k = 0; k < c.c; k++) c.weight_sum += load(c.weight, k, f64);
  }
  ts_parallel_for(c.n * c.s, positions_grain(c.c), f64 ? ce_backward_f64 : ce_backward_f32, &c);
  return TS_OK;
}

/* ---- elementwise losses ---------------------------------------------------------------------- */
typedef struct {
  int kind;
  double beta, scale;
  const void *a, *b;
  int64_t n, chunk;
  double *partial;
  int f64;
} pointwise_ctx;

ALWAYS_INLINE double loss_of(int kind, double d, double beta) {
  double ad = fabs(d);
  switch (kind) {
  case TS_LOSS_MSE: return d * d;
  case TS_LOSS_L1: return ad;
  default: return ad < beta ? 0.5 * d * d / beta : ad - 0.5 * beta;
  }
}

/* d loss / d a; 0 at d = 0 for L1 (PyTorch's sign). */
ALWAYS_INLINE double slope_of(int kind, double d, double beta) {
  double sign = (d > 0) - (d < 0);
  switch (kind) {
  case TS_LOSS_MSE: return 2 * d;
  case TS_LOSS_L1: return sign;
  default: return fabs(d) < beta ? d / beta : sign;
  }
}

#define POINTWISE_LOOP(T)                                                                          \
  for (int64_t i = 0; i < n; i++) {                                                                \
    double d = (double)*(const T *)(ptrs[1] + i * strides[1]) - (double)*(const T *)(ptrs[2] + i * strides[2]); \
    *(T *)(ptrs[0] + i * strides[0]) = (T)loss_of(c->kind, d, c->beta);                            \
  }
static void pointwise_f32(int64_t n, char **ptrs, const int64_t *strides, void *ctx) {
  const pointwise_ctx *c = ctx;
  POINTWISE_LOOP(float)
}
static void pointwise_f64(int64_t n, char **ptrs, const int64_t *strides, void *ctx) {
  const pointwise_ctx *c = ctx;
  POINTWISE_LOOP(double)
}

/* ga = scale * g * slope(a - b); operands ga, g, a, b. */
#define POINTWISE_BACKWARD_LOOP(T)                                                                 \
  for (int64_t i = 0; i < n; i++) {                                                                \
    double d = (double)*(const T *)(ptrs[2] + i * strides[2]) - (double)*(const T *)(ptrs[3] + i * strides[3]); \
    double gv = (double)*(const T *)(ptrs[1] + i * strides[1]);                                    \
    *(T *)(ptrs[0] + i * strides[0]) = (T)(c->scale * gv * slope_of(c->kind, d, c->beta));         \
  }
static void pointwise_backward_f32(int64_t n, char **ptrs, const int64_t *strides, void *ctx) {
  const pointwise_ctx *c = ctx;
  POINTWISE_BACKWARD_LOOP(float)
}
static void pointwise_backward_f64(int64_t n, char **ptrs, const int64_t *strides, void *ctx) {
  const pointwise_ctx *c = ctx;
  POINTWISE_BACKWARD_LOOP(double)
}

/* The sum of the losses of contiguous a and b: per fixed chunk in 8 lanes (their own rounding
   paths, and room for the CPU to overlap adds), chunks combined in order. */
enum { SUM_CHUNK = 32768, LANES = 8 };

ALWAYS_INLINE void pointwise_sum_chunk(const pointwise_ctx *c, int64_t chunk, int f64) {
  int64_t i0 = chunk * c->chunk, i1 = i0 + c->chunk < c->n ? i0 + c->chunk : c->n;
  double lane[LANES] = {0};
  int64_t i = i0;
  for (; i + LANES <= i1; i += LANES)
    for (int l = 0; l < LANES; l++)
      lane[l] += loss_of(c->kind, load(c->a, i + l, f64) - load(c->b, i + l, f64), c->beta);
  for (; i < i1; i++) lane[0] += loss_of(c->kind, load(c->a, i, f64) - load(c->b, i, f64), c->beta);
  double s = 0;
  for (int l = 0; l < LANES; l++) s += lane[l];
  c->partial[chunk] = s;
}

static void pointwise_sum_f32(int64_t begin, int64_t end, void *arg) {
  for (int64_t k = begin; k < end; k++) pointwise_sum_chunk(arg, k, 0);
}
static void pointwise_sum_f64(int64_t begin, int64_t end, void *arg) {
  for (int64_t k = begin; k < end; k++) pointwise_sum_chunk(arg, k, 1);
}

static int same_shape(const ts_tensor *a, const ts_tensor *b) {
  if (a->ndim != b->ndim) return 0;
  for (int d = 0; d < a->ndim; d++)
    if (a->shape[d] != b->shape[d]) return 0;
  return 1;
}

int cpu_pointwise_loss(int kind, ts_tensor *out, const ts_tensor *a, const ts_tensor *b, double beta) {
  int f64 = out->dtype == TS_F64;
  pointwise_ctx c = {.kind = kind, .beta = beta, .a = ts_elem_ptr(a), .b = ts_elem_ptr(b), .n = ts_numel(a),
                     .chunk = SUM_CHUNK, .f64 = f64};
  if (same_shape(out, a)) { /* reduction 'none' (or a single element, whose loss is the sum) */
    const ts_tensor *ops[3] = {out, a, b};
    cpu_foreach(3, ops, f64 ? pointwise_f64 : pointwise_f32, &c);
    return TS_OK;
  }
  int64_t chunks = (c.n + SUM_CHUNK - 1) / SUM_CHUNK;
  c.partial = malloc((size_t)(chunks > 0 ? chunks : 1) * sizeof(double));
  if (!c.partial) return ts_set_error(TS_ERR_MEMORY, "loss: out of host memory");
  ts_parallel_for(chunks, 1, f64 ? pointwise_sum_f64 : pointwise_sum_f32, &c);
  double s = 0;
  for (int64_t k = 0; k < chunks; k++) s += c.partial[k];
  free(c.partial);
  store(ts_elem_ptr(out), 0, s, f64);
  return TS_OK;
}

int cpu_pointwise_loss_backward(int kind, ts_tensor *ga, const ts_tensor *g, const ts_tensor *a, const ts_tensor *b,
                                double beta, double scale) {
  pointwise_ctx c = {.kind = kind, .beta = beta, .scale = scale};
  const ts_tensor *ops[4] = {ga, g, a, b};
  cpu_foreach(4, ops, ga->dtype == TS_F64 ? pointwise_backward_f64 : pointwise_backward_f32, &c);
  return TS_OK;
}

/* optim.c — multi-tensor optimizer kernels on the CPU: AdamW and SGD updates, the total norm of
 * a list of gradients, and scaling a list in place.
 *
 * One call covers every tensor of a parameter group (or of several groups): the tensors are laid
 * end to end as one flat range of elements and that range is split across the thread pool, so a
 * model of many small tensors (biases, norms) keeps every core busy as well as one big matrix
 * does. The runtime hands over contiguous tensors only (see backend.h).
 *
 * Precision follows PyTorch's CPU kernels: float32 parameters update in float32, float64 in
 * float64; float16/bfloat16 parameters are read into float32, updated against float32 optimizer
 * state and rounded back once per step. Scalar coefficients are computed in double first and
 * converted once, as PyTorch computes them as Python floats. */
#include "cpu.h"

#include <stdlib.h>
#include <tgmath.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

/* ---- the flat range over several tensors ----------------------------------------------------- */
/* Handles elements [lo, hi) of tensor k. */
typedef void (*segment_fn)(int k, int64_t lo, int64_t hi, void *ctx);

typedef struct {
  int n;
  int64_t *start; /* start[k]: flat position of tensor k's element 0; start[n]: the total */
  segment_fn segment;
  void *ctx;
} flat_range;

static int flat_range_init(flat_range *r, const char *op, int n, ts_tensor *const *tensors) {
  r->n = n;
  r->start = malloc(((size_t)n + 1) * sizeof *r->start);
  if (!r->start) return ts_set_error(TS_ERR_MEMORY, "%s: out of memory laying out %d tensors", op, n);
  r->start[0] = 0;
  for (int k = 0; k < n; k++) r->start[k + 1] = r->start[k] + ts_numel(tensors[k]);
  return TS_OK;
}

/* The tensor holding flat position pos: the last k with start[k] <= pos. */
static int tensor_at(const flat_range *r, int64_t pos) {
  int lo = 0, hi = r->n - 1;
  while (lo < hi) {
    int mid = lo + (hi - lo + 1) / 2;
    if (r->start[mid] <= pos) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/* Calls the segment function for every tensor piece of the flat positions [begin, end). */
static void visit_segments(const flat_range *r, int64_t begin, int64_t end) {
  for (int k = tensor_at(r, begin); begin < end && k < r->n; k++) {
    int64_t hi = r->start[k + 1] < end ? r->start[k + 1] : end;
    if (hi > begin) r->segment(k, begin - r->start[k], hi - r->start[k], r->ctx);
    begin = hi;
  }
}

static void run_flat_chunk(int64_t begin, int64_t end, void *arg) { visit_segments(arg, begin, end); }

static int for_each_segment(const char *op, int n, ts_tensor *const *tensors, segment_fn fn, void *ctx) {
  if (n <= 0) return TS_OK;
  flat_range r = {.segment = fn, .ctx = ctx};
  if (flat_range_init(&r, op, n, tensors)) return ts_last_status();
  ts_parallel_for(r.start[n], CPU_PARALLEL_GRAIN, run_flat_chunk, &r);
  free(r.start);
  return TS_OK;
}

/* ---- half precision storage ------------------------------------------------------------------ */
static inline float load_half(int dtype, uint16_t bits) {
  return dtype == TS_F16 ? ts_half_to_float(bits) : ts_bf16_to_float(bits);
}
static inline uint16_t store_half(int dtype, float v) {
  return dtype == TS_F16 ? ts_float_to_half(v) : ts_float_to_bf16(v);
}

/* torch.lerp's two-sided formula (exact at both ends): start + w * (end - start). */
static inline float lerp_f32(float start, float end, float w) {
  return w < 0.5f ? start + w * (end - start) : end - (end - start) * (1.0f - w);
}
static inline double lerp_f64(double start, double end, double w) {
  return w < 0.5 ? start + w * (end - start) : end - (end - start) * (1.0 - w);
}

/* ---- AdamW ----------------------------------------------------------------------------------- */
/* Per tensor, from its lr, weight decay and step (PyTorch's _single_tensor_adamw):
     p = p * (1 - lr*wd);  m = lerp(m, g, 1 - beta1);  v = v*beta2 + (1 - beta2)*g*g
     p = p - lr/(1 - beta1^step) * m / (sqrt(v)/sqrt(1 - beta2^step) + eps)
   Every parameter is visited once per step, so the update is memory bound if it vectorizes. A
   sqrt call in the loop stops that: under the default -fmath-errno GCC guards each call with an
   errno branch. So a segment goes in blocks of ADAMW_BLOCK elements, three passes each: the
   moments (vectorized), the square roots of the block (SIMD sqrt, the same correctly rounded
   operation as sqrtf), then the parameters (vectorized); the block stays in L1 between passes. */
enum { ADAMW_BLOCK = 512 };

typedef struct { double decay, w1, beta2, w2, bc2_sqrt, eps, step_size; } adamw_coef;

typedef struct {
  ts_tensor *const *params, *const *grads, *const *exp_avg, *const *exp_avg_sq;
  const adamw_coef *coef;
} adamw_ctx;

/* x[i] = sqrt(x[i]) with SIMD instructions where the target has them. */
static void sqrt_f32(float *x, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, _mm512_sqrt_ps(_mm512_loadu_ps(x + i)));
#elif defined(__AVX__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_sqrt_ps(_mm256_loadu_ps(x + i)));
#elif defined(__SSE2__)
  for (; i + 4 <= n; i += 4) _mm_storeu_ps(x + i, _mm_sqrt_ps(_mm_loadu_ps(x + i)));
#endif
  for (; i < n; i++) x[i] = sqrtf(x[i]);
}

static void sqrt_f64(double *x, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 8 <= n; i += 8) _mm512_storeu_pd(x + i, _mm512_sqrt_pd(_mm512_loadu_pd(x + i)));
#elif defined(__AVX__)
  for (; i + 4 <= n; i += 4) _mm256_storeu_pd(x + i, _mm256_sqrt_pd(_mm256_loadu_pd(x + i)));
#elif defined(__SSE2__)
  for (; i + 2 <= n; i += 2) _mm_storeu_pd(x + i, _mm_sqrt_pd(_mm_loadu_pd(x + i)));
#endif
  for (; i < n; i++) x[i] = sqrt(x[i]);
}

/* One block of n elements in three passes. pin/gin: the parameters and gradients read as T (for
   half storage, already converted); pout receives the new parameters. */
#define DEFINE_ADAMW(T, SUFFIX)                                                                   \
  typedef struct { T decay, w1, beta2, w2, bc2_sqrt, eps, step_size; } adamw_##SUFFIX;             \
  static inline adamw_##SUFFIX adamw_consts_##SUFFIX(const adamw_coef *c) {                        \
    adamw_##SUFFIX k = {(T)c->decay, (T)c->w1, (T)c->beta2, (T)c->w2, (T)c->bc2_sqrt, (T)c->eps,   \
                        (T)c->step_size};                                                           \
    return k;                                                                                      \
  }                                                                                                \
  static void adamw_block_##SUFFIX(T *pout, const T *pin, const T *restrict g, T *restrict m, \
                                   T *restrict v, int64_t n, const adamw_##SUFFIX *c) {            \
    T decayed[ADAMW_BLOCK], root[ADAMW_BLOCK];                                                     \
    for (int64_t i = 0; i < n; i++) {                                                              \
      decayed[i] = pin[i] * c->decay;                                                              \
      m[i] = lerp_##SUFFIX(m[i], g[i], c->w1);                                                     \
      v[i] = v[i] * c->beta2 + c->w2 * g[i] * g[i];                                                \
      root[i] = v[i];                                                                              \
    }                                                                                              \
    sqrt_##SUFFIX(root, n);                                                                        \
    for (int64_t i = 0; i < n; i++) pout[i] = decayed[i] - c->step_size * (m[i] / (root[i] / c->bc2_sqrt + c->eps)); \
  }

DEFINE_ADAMW(float, f32)
DEFINE_ADAMW(double, f64)

static int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

static void adamw_segment(int k, int64_t lo, int64_t hi, void *arg) {
  const adamw_ctx *a = arg;
  const ts_tensor *pt = a->params[k];
  char *p = ts_elem_ptr(pt), *g = ts_elem_ptr(a->grads[k]);
  char *m = ts_elem_ptr(a->exp_avg[k]), *v = ts_elem_ptr(a->exp_avg_sq[k]);
  if (pt->dtype == TS_F64) {
    adamw_f64 c = adamw_consts_f64(&a->coef[k]);
    double *pp = (double *)p, *mm = (double *)m, *vv = (double *)v;
    const double *gg = (const double *)g;
    for (int64_t i = lo; i < hi; i += ADAMW_BLOCK)
      adamw_block_f64(pp + i, pp + i, gg + i, mm + i, vv + i, min_i64(ADAMW_BLOCK, hi - i), &c);
    return;
  }
  adamw_f32 c = adamw_consts_f32(&a->coef[k]);
  float *mm = (float *)m, *vv = (float *)v;
  if (pt->dtype == TS_F32) {
    float *pp = (float *)p;
    const float *gg = (const float *)g;
    for (int64_t i = lo; i < hi; i += ADAMW_BLOCK)
      adamw_block_f32(pp + i, pp + i, gg + i, mm + i, vv + i, min_i64(ADAMW_BLOCK, hi - i), &c);
    return;
  }
  uint16_t *pp = (uint16_t *)p;
  const uint16_t *gg = (const uint16_t *)g;
  int dt = pt->dtype;
  float pin[ADAMW_BLOCK], gin[ADAMW_BLOCK], pout[ADAMW_BLOCK];
  for (int64_t i = lo; i < hi; i += ADAMW_BLOCK) {
    int64_t n = min_i64(ADAMW_BLOCK, hi - i);
    for (int64_t e = 0; e < n; e++) {
      pin[e] = load_half(dt, pp[i + e]);
      gin[e] = load_half(dt, gg[i + e]);
    }
    adamw_block_f32(pout, pin, gin, mm + i, vv + i, n, &c);
    for (int64_t e = 0; e < n; e++) pp[i + e] = store_half(dt, pout[e]);
  }
}

int cpu_adamw(int n, ts_tensor *const *params, ts_tensor *const *grads, ts_tensor *const *exp_avg,
              ts_tensor *const *exp_avg_sq, const double *lr, const double *weight_decay, double beta1, double beta2,
              double eps, const int64_t *step) {
  if (n <= 0) return TS_OK;
  adamw_coef *coef = malloc((size_t)n * sizeof *coef);
  if (!coef) return ts_set_error(TS_ERR_MEMORY, "adamw_step: out of memory");
  for (int k = 0; k < n; k++) {
    double bc1 = 1.0 - pow(beta1, (double)step[k]), bc2 = 1.0 - pow(beta2, (double)step[k]);
    coef[k] = (adamw_coef){.decay = 1.0 - lr[k] * weight_decay[k], .w1 = 1.0 - beta1, .beta2 = beta2,
                           .w2 = 1.0 - beta2, .bc2_sqrt = sqrt(bc2), .eps = eps, .step_size = lr[k] / bc1};
  }
  adamw_ctx ctx = {params, grads, exp_avg, exp_avg_sq, coef};
  int st = for_each_segment("adamw_step", n, params, adamw_segment, &ctx);
  free(coef);
  return st;
}

/* ---- SGD ------------------------------------------------------------------------------------- */
/* torch.optim.SGD: d = g + wd*p; with momentum, buf = d on the first step, else
   buf = momentum*buf + (1 - dampening)*d, and d = nesterov ? d + momentum*buf : buf; p -= lr*d. */
typedef struct {
  ts_tensor *const *params, *const *grads, *const *bufs;
  const double *lr, *wd;
  const int *first_step;
  double momentum, dampening;
  int nesterov;
} sgd_ctx;

#define DEFINE_SGD(T, SUFFIX)                                                                     \
  typedef struct { T lr, wd, momentum, keep; int use_wd, use_momentum, nesterov, first; } sgd_##SUFFIX; \
  static inline sgd_##SUFFIX sgd_consts_##SUFFIX(const sgd_ctx *a, int k) {                       \
    sgd_##SUFFIX c = {(T)a->lr[k], (T)a->wd[k], (T)a->momentum, (T)(1.0 - a->dampening), a->wd[k] != 0, \
                      a->momentum != 0, a->nesterov, a->first_step ? a->first_step[k] != 0 : 0};  \
    return c;                                                                                      \
  }                                                                                                \
  static inline T sgd_update_##SUFFIX(T p, T g, T *buf, const sgd_##SUFFIX *c) {                  \
    T d = c->use_wd ? g + c->wd * p : g;                                                           \
    if (c->use_momentum) {                                                                         \
      T b = c->first ? d : *buf * c->momentum + c->keep * d;                                       \
      *buf = b;                                                                                    \
      d = c->nesterov ? d + c->momentum * b : b;                                                   \
    }                                                                                              \
    return p - c->lr * d;                                                                          \
  }

DEFINE_SGD(float, f32)
DEFINE_SGD(double, f64)

static void sgd_segment(int k, int64_t lo, int64_t hi, void *arg) {
  const sgd_ctx *a = arg;
  const ts_tensor *pt = a->params[k];
  char *p = ts_elem_ptr(pt), *g = ts_elem_ptr(a->grads[k]);
  char *b = a->bufs && a->bufs[k] ? ts_elem_ptr(a->bufs[k]) : NULL;
  if (pt->dtype == TS_F64) {
    sgd_f64 c = sgd_consts_f64(a, k);
    double *pp = (double *)p, *bb = (double *)b, unused = 0;
    const double *gg = (const double *)g;
    for (int64_t i = lo; i < hi; i++) pp[i] = sgd_update_f64(pp[i], gg[i], bb ? &bb[i] : &unused, &c);
    return;
  }
  sgd_f32 c = sgd_consts_f32(a, k);
  float *bb = (float *)b, unused = 0;
  if (pt->dtype == TS_F32) {
    float *pp = (float *)p;
    const float *gg = (const float *)g;
    for (int64_t i = lo; i < hi; i++) pp[i] = sgd_update_f32(pp[i], gg[i], bb ? &bb[i] : &unused, &c);
    return;
  }
  uint16_t *pp = (uint16_t *)p;
  const uint16_t *gg = (const uint16_t *)g;
  int dt = pt->dtype;
  for (int64_t i = lo; i < hi; i++)
    pp[i] = store_half(dt, sgd_update_f32(load_half(dt, pp[i]), load_half(dt, gg[i]), bb ? &bb[i] : &unused, &c));
}

int cpu_sgd(int n, ts_tensor *const *params, ts_tensor *const *grads, ts_tensor *const *momentum_buffers,
            const double *lr, const double *weight_decay, double momentum, double dampening, int nesterov,
            const int *first_step) {
  sgd_ctx ctx = {params, grads, momentum_buffers, lr, weight_decay, first_step, momentum, dampening, nesterov};
  return for_each_segment("sgd_step", n, params, sgd_segment, &ctx);
}

/* ---- total norm ------------------------------------------------------------------------------ */
/* The flat range is cut into fixed blocks whose partial results are combined in block order, so
   the norm does not depend on the number of threads. */
enum { NORM_BLOCK = 8192 };

typedef enum { NORM_L1, NORM_L2, NORM_INF, NORM_POW } norm_kind;

typedef struct {
  flat_range range;
  ts_tensor *const *tensors;
  norm_kind kind;
  double p;
  double *partial; /* one per block */
  int64_t block;   /* the block being folded */
} norm_ctx;

static inline double fold_abs(norm_kind kind, double p, double acc, double x) {
  double a = fabs(x);
  switch (kind) {
  case NORM_L1: return acc + a;
  case NORM_L2: return acc + a * a;
  case NORM_INF: return a > acc || a != a ? a : acc; /* NaN wins and stays */
  default: return acc + pow(a, p);
  }
}

static void norm_segment(int k, int64_t lo, int64_t hi, void *arg) {
  norm_ctx *c = arg;
  const ts_tensor *t = c->tensors[k];
  const char *base = ts_elem_ptr(t);
  double acc = c->partial[c->block];
  switch (t->dtype) {
  case TS_F32:
    for (int64_t i = lo; i < hi; i++) acc = fold_abs(c->kind, c->p, acc, ((const float *)base)[i]);
    break;
  case TS_F64:
    for (int64_t i = lo; i < hi; i++) acc = fold_abs(c->kind, c->p, acc, ((const double *)base)[i]);
    break;
  default:
    for (int64_t i = lo; i < hi; i++)
      acc = fold_abs(c->kind, c->p, acc, load_half(t->dtype, ((const uint16_t *)base)[i]));
    break;
  }
  c->partial[c->block] = acc;
}

static void norm_blocks(int64_t b0, int64_t b1, void *arg) {
  norm_ctx local = *(const norm_ctx *)arg; /* each thread folds its own blocks */
  local.range.ctx = &local;
  int64_t total = local.range.start[local.range.n];
  for (int64_t b = b0; b < b1; b++) {
    local.block = b;
    int64_t end = (b + 1) * NORM_BLOCK < total ? (b + 1) * NORM_BLOCK : total;
    visit_segments(&local.range, b * NORM_BLOCK, end);
  }
}

int cpu_multi_norm(int n, ts_tensor *const *tensors, double p, double *out) {
  *out = 0;
  if (n <= 0) return TS_OK;
  norm_ctx c = {.range = {.segment = norm_segment}, .tensors = tensors, .p = p};
  c.kind = isinf(p) ? NORM_INF : p == 1 ? NORM_L1 : p == 2 ? NORM_L2 : NORM_POW;
  if (flat_range_init(&c.range, "grad_norm", n, tensors)) return ts_last_status();
  int64_t total = c.range.start[n], blocks = (total + NORM_BLOCK - 1) / NORM_BLOCK;
  c.partial = calloc(blocks > 0 ? (size_t)blocks : 1, sizeof *c.partial);
  if (!c.partial) {
    free(c.range.start);
    return ts_set_error(TS_ERR_MEMORY, "grad_norm: out of memory");
  }
  ts_parallel_for(blocks, CPU_PARALLEL_GRAIN / NORM_BLOCK, norm_blocks, &c);
  double acc = 0;
  for (int64_t b = 0; b < blocks; b++)
    acc = c.kind == NORM_INF ? fold_abs(NORM_INF, p, acc, c.partial[b]) : acc + c.partial[b];
  *out = c.kind == NORM_INF || c.kind == NORM_L1 ? acc : c.kind == NORM_L2 ? sqrt(acc) : pow(acc, 1.0 / p);
  free(c.partial);
  free(c.range.start);
  return TS_OK;
}

/* ---- scaling in place ------------------------------------------------------------------------ */
typedef struct { ts_tensor *const *tensors; double factor; } scale_ctx;

static void scale_segment(int k, int64_t lo, int64_t hi, void *arg) {
  const scale_ctx *c = arg;
  const ts_tensor *t = c->tensors[k];
  char *base = ts_elem_ptr(t);
  switch (t->dtype) {
  case TS_F32: {
    float *x = (float *)base, f = (float)c->factor;
    for (int64_t i = lo; i < hi; i++) x[i] *= f;
    break;
  }
  case TS_F64: {
    double *x = (double *)base;
    for (int64_t i = lo; i < hi; i++) x[i] *= c->factor;
    break;
  }
  default: {
    uint16_t *x = (uint16_t *)base;
    float f = (float)c->factor;
    for (int64_t i = lo; i < hi; i++) x[i] = store_half(t->dtype, load_half(t->dtype, x[i]) * f);
    break;
  }
  }
}

int cpu_multi_scale(int n, ts_tensor *const *tensors, double factor) {
  scale_ctx c = {tensors, factor};
  return for_each_segment("scale_", n, tensors, scale_segment, &c);
}

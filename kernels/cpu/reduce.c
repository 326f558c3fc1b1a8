/* reduce.c — reductions on the CPU: sum, mean, prod, amax, amin, all, any, var/std, p-norms and
 * the arg reductions behind max/min/argmax/argmin.
 *
 * The runtime hands over `a` with the reduced dims last (a permuted view) and a contiguous `out`
 * over the leading dims. One engine does the iteration for every op; a `reducer` says what to do
 * with the elements:
 *   fold    folds a run of elements (contiguous or strided) into one accumulator;
 *   across  folds one element into each of several accumulators (outputs next to each other);
 *   combine merges two accumulators (partial results of a split reduction, in input order);
 *   finish  writes an accumulator as the output value (and index).
 * Floats accumulate in double (sums pairwise, so float64 sums stay accurate too), integers in
 * int64 with two's-complement wrap-around as in PyTorch.
 *
 * Three ways through the engine, chosen per call:
 *   - per output: each output folds its reduced elements as runs along the innermost reduced dim;
 *   - tiled: when neighbouring outputs are closer in memory than neighbouring reduced elements
 *     (summing over dim 0 of a row-major matrix), a tile of outputs advances through the reduced
 *     elements together, so every cache line read serves the whole tile;
 *   - split: few outputs but many elements each (a full reduction): the reduced range is cut into
 *     fixed parts reduced in parallel and combined in order, so every core helps. */
#include "cpu.h"

#include <math.h>
#include <stdlib.h>

/* ---- accumulators and reducers --------------------------------------------------------------- */
typedef struct {
  double f;  /* float accumulator: sum, product, extreme, or the running mean (var) */
  double m2; /* var: sum of squared deviations from the mean */
  int64_t i; /* integer accumulator: sum, product, extreme, or the all/any flag */
  int64_t n; /* var: elements seen; arg reductions: index of the extreme (-1 before any) */
} acc;

typedef enum {
  K_SUM = TS_SUM, K_MEAN = TS_MEAN, K_PROD = TS_PROD, K_MAX = TS_AMAX, K_MIN = TS_AMIN, K_ALL = TS_ALL,
  K_ANY = TS_ANY,
  K_VAR,
  K_NORM_COUNT, /* p = 0: number of nonzeros */
  K_NORM_ABS,   /* p = 1 */
  K_NORM_SQ,    /* p = 2 */
  K_NORM_MAX,   /* p = inf */
  K_NORM_MIN,   /* p = -inf */
  K_NORM_POW,   /* any other p */
  K_ARGMAX,
  K_ARGMIN,
  K_NUM_KINDS
} reduce_kind;

typedef struct reducer reducer;
/* Folds n elements at p, `stride` bytes apart; `pos` is the reduced-range position of the first
   (only arg reductions use it: they reduce one dim, so positions are indices along it). */
typedef void (*fold_fn)(const reducer *r, acc *s, const char *p, int64_t n, int64_t stride, int64_t pos);

struct reducer {
  reduce_kind kind;
  fold_fn fold, across;
  acc identity;
  int in_dtype, out_dtype;
  int64_t count;      /* elements per output: the mean's divisor */
  double p;           /* K_NORM_POW */
  int64_t correction; /* K_VAR */
  int take_sqrt;      /* K_VAR: std */
};

/* ---- element steps: how one value x at position `pos` enters accumulator v ------------------- */
static int64_t wrap_add(int64_t x, int64_t y) { return (int64_t)((uint64_t)x + (uint64_t)y); }
static int64_t wrap_mul(int64_t x, int64_t y) { return (int64_t)((uint64_t)x * (uint64_t)y); }
/* NaN wins, and stays: the comparisons are false against a NaN accumulator. */
static double nan_max(double m, double x) { return x > m || x != x ? x : m; }
static double nan_min(double m, double x) { return x < m || x != x ? x : m; }

/* Merges a block of n elements with the given mean and m2 into s (Chan, Golub and LeVeque). */
static void welford_merge(acc *s, int64_t n, double mean, double m2) {
  if (n == 0) return;
  if (s->n == 0) {
    s->n = n;
    s->f = mean;
    s->m2 = m2;
    return;
  }
  int64_t total = s->n + n;
  double delta = mean - s->f;
  s->f += delta * ((double)n / (double)total);
  s->m2 += m2 + delta * delta * ((double)s->n * (double)n / (double)total);
  s->n = total;
}

#define STEP_SUM_F(v, x, pos) ((v).f += (double)(x))
#define STEP_SUM_I(v, x, pos) ((v).i = wrap_add((v).i, (int64_t)(x)))
#define STEP_PROD_F(v, x, pos) ((v).f *= (double)(x))
#define STEP_PROD_I(v, x, pos) ((v).i = wrap_mul((v).i, (int64_t)(x)))
#define STEP_MAX_F(v, x, pos) ((v).f = nan_max((v).f, (double)(x)))
#define STEP_MIN_F(v, x, pos) ((v).f = nan_min((v).f, (double)(x)))
#define STEP_MAX_I(v, x, pos) ((v).i = (int64_t)(x) > (v).i ? (int64_t)(x) : (v).i)
#define STEP_MIN_I(v, x, pos) ((v).i = (int64_t)(x) < (v).i ? (int64_t)(x) : (v).i)
#define STEP_ALL(v, x, pos) ((v).i &= (x) != 0)
#define STEP_ANY(v, x, pos) ((v).i |= (x) != 0)
#define STEP_VAR(v, x, pos) welford_merge(&(v), 1, (double)(x), 0.0)
#define STEP_NORM_COUNT(v, x, pos) ((v).f += (x) != 0)
#define STEP_NORM_ABS(v, x, pos) ((v).f += fabs((double)(x)))
#define STEP_NORM_SQ(v, x, pos) ((v).f += (double)(x) * (double)(x))
#define STEP_NORM_MAX(v, x, pos) ((v).f = nan_max((v).f, fabs((double)(x))))
#define STEP_NORM_MIN(v, x, pos) ((v).f = nan_min((v).f, fabs((double)(x))))
#define STEP_NORM_POW(v, x, pos) ((v).f += pow(fabs((double)(x)), r->p))
/* The first extreme wins ties; the first NaN beats every number. */
#define STEP_ARGMAX_F(v, x, pos)                                                                   \
  do {                                                                                             \
    double x_ = (double)(x);                                                                       \
    if ((v).n < 0 || x_ > (v).f || (x_ != x_ && (v).f == (v).f)) { (v).f = x_; (v).n = (pos); }    \
  } while (0)
#define STEP_ARGMIN_F(v, x, pos)                                                                   \
  do {                                                                                             \
    double x_ = (double)(x);                                                                       \
    if ((v).n < 0 || x_ < (v).f || (x_ != x_ && (v).f == (v).f)) { (v).f = x_; (v).n = (pos); }    \
  } while (0)
#define STEP_ARGMAX_I(v, x, pos)                                                                   \
  do {                                                                                             \
    if ((v).n < 0 || (x) > (v).i) { (v).i = (x); (v).n = (pos); }                                  \
  } while (0)
#define STEP_ARGMIN_I(v, x, pos)                                                                   \
  do {                                                                                             \
    if ((v).n < 0 || (x) < (v).i) { (v).i = (x); (v).n = (pos); }                                  \
  } while (0)

/* Fold and across functions from an element step. The fold keeps the accumulator in a local copy
   (registers) and has a tight loop for contiguous runs. */
#define DEFINE_FOLD(NAME, T, STEP)                                                                 \
  static void NAME##_fold(const reducer *r, acc *s, const char *p, int64_t n, int64_t stride, int64_t pos) { \
    (void)r;                                                                                       \
    (void)pos;                                                                                     \
    acc v = *s;                                                                                    \
    if (stride == (int64_t)sizeof(T)) {                                                            \
      const T *x = (const T *)p;                                                                   \
      for (int64_t i = 0; i < n; i++) STEP(v, x[i], pos + i);                                      \
    } else {                                                                                       \
      for (int64_t i = 0; i < n; i++) STEP(v, *(const T *)(p + i * stride), pos + i);              \
    }                                                                                              \
    *s = v;                                                                                        \
  }
#define DEFINE_ACROSS(NAME, T, STEP)                                                               \
  static void NAME##_across(const reducer *r, acc *s, const char *p, int64_t n, int64_t stride, int64_t pos) { \
    (void)r;                                                                                       \
    (void)pos;                                                                                     \
    for (int64_t j = 0; j < n; j++) STEP(s[j], *(const T *)(p + j * stride), pos);                 \
  }
#define DEFINE_FOLDS(NAME, T, STEP) DEFINE_FOLD(NAME, T, STEP) DEFINE_ACROSS(NAME, T, STEP)

/* Pairwise summation of F(x) in double: leaves of CASCADE_LEAF elements summed in 8 lanes, then
   halves added. The error grows with log(n) instead of n, and the lanes let the CPU overlap adds. */
enum { CASCADE_LEAF = 128 };
#define DEFINE_CASCADE(NAME, T, F)                                                                 \
  static double NAME(const char *p, int64_t n, int64_t stride) {                                   \
    if (n > CASCADE_LEAF) {                                                                        \
      int64_t half = (n / 2 + 7) & ~(int64_t)7;                                                    \
      return NAME(p, half, stride) + NAME(p + half * stride, n - half, stride);                    \
    }                                                                                              \
    double lane[8] = {0};                                                                          \
    int64_t i = 0;                                                                                 \
    if (stride == (int64_t)sizeof(T)) {                                                            \
      const T *x = (const T *)p;                                                                   \
      for (; i + 8 <= n; i += 8)                                                                   \
        for (int k = 0; k < 8; k++) lane[k] += F(x[i + k]);                                        \
      for (; i < n; i++) lane[i & 7] += F(x[i]);                                                   \
    } else {                                                                                       \
      for (; i < n; i++) lane[i & 7] += F(*(const T *)(p + i * stride));                           \
    }                                                                                              \
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7])); \
  }
#define F_IDENTITY(x) ((double)(x))
#define F_ABS(x) fabs((double)(x))
#define F_SQUARE(x) ((double)(x) * (double)(x))

/* Sums and the 1- and 2-norms of runs go through the pairwise cascade instead of the plain step. */
#define DEFINE_CASCADE_FOLD(NAME, T, F)                                                            \
  DEFINE_CASCADE(NAME##_cascade, T, F)                                                             \
  static void NAME(const reducer *r, acc *s, const char *p, int64_t n, int64_t stride, int64_t pos) { \
    (void)r;                                                                                       \
    (void)pos;                                                                                     \
    s->f += NAME##_cascade(p, n, stride);                                                          \
  }

/* Variance of a run: blocks small enough to stay in cache, each by the corrected two-pass formula
   (pairwise mean first, then squared deviations in 4 lanes), merged into the accumulator. */
enum { VAR_BLOCK = 4096 };
#define DEFINE_VAR_FOLD(NAME, T, SUM)                                                              \
  static void NAME(const reducer *r, acc *s, const char *p, int64_t n, int64_t stride, int64_t pos) { \
    (void)r;                                                                                       \
    (void)pos;                                                                                     \
    for (int64_t b = 0; b < n; b += VAR_BLOCK) {                                                   \
      int64_t m = n - b < VAR_BLOCK ? n - b : VAR_BLOCK;                                           \
      const char *q = p + b * stride;                                                              \
      double mean = SUM(q, m, stride) / (double)m, dev[4] = {0}, sq[4] = {0};                      \
      int64_t i = 0;                                                                               \
      for (; i + 4 <= m; i += 4)                                                                   \
        for (int k = 0; k < 4; k++) {                                                              \
          double d = *(const T *)(q + (i + k) * stride) - mean;                                    \
          dev[k] += d;                                                                             \
          sq[k] += d * d;                                                                          \
        }                                                                                          \
      for (; i < m; i++) {                                                                         \
        double d = *(const T *)(q + i * stride) - mean;                                            \
        dev[0] += d;                                                                               \
        sq[0] += d * d;                                                                            \
      }                                                                                            \
      double dev_sum = (dev[0] + dev[1]) + (dev[2] + dev[3]), sq_sum = (sq[0] + sq[1]) + (sq[2] + sq[3]); \
      welford_merge(s, m, mean, sq_sum - dev_sum * dev_sum / (double)m);                           \
    }                                                                                              \
  }

/* Max/min of a run in 8 independent lanes plus a NaN flag, so that no chain of dependent compares
   limits the speed. F maps the element first (|x| for the inf-norms); BETTER(x, m) is x > m for a
   max, x < m for a min. Floats merge into s->f (ON_NAN makes it NaN if one was seen), integers
   into s->i. */
#define DEFINE_EXTREME_FOLD(NAME, T, F, BETTER, FIELD, ON_NAN)                                             \
  static void NAME(const reducer *r, acc *s, const char *p, int64_t n, int64_t stride, int64_t pos) { \
    (void)r;                                                                                       \
    (void)pos;                                                                                     \
    if (n <= 0) return;                                                                            \
    T first = F(*(const T *)p), lane[8];                                                           \
    int nan = 0;                                                                                   \
    for (int k = 0; k < 8; k++) lane[k] = first;                                                   \
    int64_t i = 0;                                                                                 \
    if (stride == (int64_t)sizeof(T)) {                                                            \
      const T *q = (const T *)p;                                                                   \
      for (; i + 8 <= n; i += 8)                                                                   \
        for (int k = 0; k < 8; k++) {                                                              \
          T x = F(q[i + k]);                                                                       \
          lane[k] = BETTER(x, lane[k]) ? x : lane[k];                                              \
          nan |= x != x;                                                                           \
        }                                                                                          \
    }                                                                                              \
    for (; i < n; i++) {                                                                           \
      T x = F(*(const T *)(p + i * stride));                                                       \
      lane[i & 7] = BETTER(x, lane[i & 7]) ? x : lane[i & 7];                                      \
      nan |= x != x;                                                                               \
    }                                                                                              \
    T m = lane[0];                                                                                 \
    for (int k = 1; k < 8; k++) m = BETTER(lane[k], m) ? lane[k] : m;                              \
    if (nan) ON_NAN(s);                                                                            \
    else if (BETTER(m, s->FIELD)) s->FIELD = m;                                                    \
  }
#define GREATER(x, m) ((x) > (m))
#define LESS(x, m) ((x) < (m))
#define ABS_F32(x) fabsf(x)
#define ABS_F64(x) fabs(x)
#define AS_IS(x) (x)
#define SET_NAN(s) ((s)->f = NAN)
#define NO_NAN(s) ((void)0)

/* Every (kind, dtype) kernel. Kinds whose runs fold another way (pairwise sums, two-pass variance)
   take only the across function from their step. */
#define FLOAT_FAMILY(KIND, STEP) DEFINE_FOLDS(KIND##_f32, float, STEP) DEFINE_FOLDS(KIND##_f64, double, STEP)
#define FLOAT_ACROSS(KIND, STEP) DEFINE_ACROSS(KIND##_f32, float, STEP) DEFINE_ACROSS(KIND##_f64, double, STEP)

FLOAT_ACROSS(sum, STEP_SUM_F)
DEFINE_CASCADE_FOLD(sum_pairwise_f32, float, F_IDENTITY)
DEFINE_CASCADE_FOLD(sum_pairwise_f64, double, F_IDENTITY)
DEFINE_FOLDS(sum_i64, int64_t, STEP_SUM_I)
FLOAT_FAMILY(prod, STEP_PROD_F)
DEFINE_FOLDS(prod_i64, int64_t, STEP_PROD_I)
FLOAT_ACROSS(max, STEP_MAX_F)
DEFINE_ACROSS(max_i64, int64_t, STEP_MAX_I)
DEFINE_EXTREME_FOLD(max_lanes_f32, float, AS_IS, GREATER, f, SET_NAN)
DEFINE_EXTREME_FOLD(max_lanes_f64, double, AS_IS, GREATER, f, SET_NAN)
DEFINE_EXTREME_FOLD(max_lanes_i64, int64_t, AS_IS, GREATER, i, NO_NAN)
FLOAT_ACROSS(min, STEP_MIN_F)
DEFINE_ACROSS(min_i64, int64_t, STEP_MIN_I)
DEFINE_EXTREME_FOLD(min_lanes_f32, float, AS_IS, LESS, f, SET_NAN)
DEFINE_EXTREME_FOLD(min_lanes_f64, double, AS_IS, LESS, f, SET_NAN)
DEFINE_EXTREME_FOLD(min_lanes_i64, int64_t, AS_IS, LESS, i, NO_NAN)
FLOAT_FAMILY(all, STEP_ALL)
DEFINE_FOLDS(all_i64, int64_t, STEP_ALL)
DEFINE_FOLDS(all_b8, uint8_t, STEP_ALL)
FLOAT_FAMILY(any, STEP_ANY)
DEFINE_FOLDS(any_i64, int64_t, STEP_ANY)
DEFINE_FOLDS(any_b8, uint8_t, STEP_ANY)
FLOAT_ACROSS(var, STEP_VAR)
DEFINE_VAR_FOLD(var_twopass_f32, float, sum_pairwise_f32_cascade)
DEFINE_VAR_FOLD(var_twopass_f64, double, sum_pairwise_f64_cascade)
FLOAT_FAMILY(norm_count, STEP_NORM_COUNT)
FLOAT_ACROSS(norm_abs, STEP_NORM_ABS)
DEFINE_CASCADE_FOLD(abs_pairwise_f32, float, F_ABS)
DEFINE_CASCADE_FOLD(abs_pairwise_f64, double, F_ABS)
FLOAT_ACROSS(norm_sq, STEP_NORM_SQ)
DEFINE_CASCADE_FOLD(sq_pairwise_f32, float, F_SQUARE)
DEFINE_CASCADE_FOLD(sq_pairwise_f64, double, F_SQUARE)
FLOAT_ACROSS(norm_max, STEP_NORM_MAX)
DEFINE_EXTREME_FOLD(absmax_lanes_f32, float, ABS_F32, GREATER, f, SET_NAN)
DEFINE_EXTREME_FOLD(absmax_lanes_f64, double, ABS_F64, GREATER, f, SET_NAN)
FLOAT_ACROSS(norm_min, STEP_NORM_MIN)
DEFINE_EXTREME_FOLD(absmin_lanes_f32, float, ABS_F32, LESS, f, SET_NAN)
DEFINE_EXTREME_FOLD(absmin_lanes_f64, double, ABS_F64, LESS, f, SET_NAN)
FLOAT_FAMILY(norm_pow, STEP_NORM_POW)
DEFINE_FOLDS(argmax_f32, float, STEP_ARGMAX_F)
DEFINE_FOLDS(argmax_f64, double, STEP_ARGMAX_F)
DEFINE_FOLDS(argmax_i64, int64_t, STEP_ARGMAX_I)
DEFINE_FOLDS(argmin_f32, float, STEP_ARGMIN_F)
DEFINE_FOLDS(argmin_f64, double, STEP_ARGMIN_F)
DEFINE_FOLDS(argmin_i64, int64_t, STEP_ARGMIN_I)

typedef struct { fold_fn fold, across; } fold_pair;
/* Dtype slots: float32, float64, int64, and bool/uint8 bytes (all/any read those as stored). */
enum { SLOT_F32, SLOT_F64, SLOT_I64, SLOT_BYTE, NUM_SLOTS };

#define PAIR(FOLD, ACROSS) {FOLD, ACROSS}
#define STD_PAIR(NAME) {NAME##_fold, NAME##_across}
static const fold_pair fold_table[K_NUM_KINDS][NUM_SLOTS] = {
    [K_SUM] = {PAIR(sum_pairwise_f32, sum_f32_across), PAIR(sum_pairwise_f64, sum_f64_across), STD_PAIR(sum_i64)},
    [K_MEAN] = {PAIR(sum_pairwise_f32, sum_f32_across), PAIR(sum_pairwise_f64, sum_f64_across)},
    [K_PROD] = {STD_PAIR(prod_f32), STD_PAIR(prod_f64), STD_PAIR(prod_i64)},
    [K_MAX] = {PAIR(max_lanes_f32, max_f32_across), PAIR(max_lanes_f64, max_f64_across), PAIR(max_lanes_i64, max_i64_across)},
    [K_MIN] = {PAIR(min_lanes_f32, min_f32_across), PAIR(min_lanes_f64, min_f64_across), PAIR(min_lanes_i64, min_i64_across)},
    [K_ALL] = {STD_PAIR(all_f32), STD_PAIR(all_f64), STD_PAIR(all_i64), STD_PAIR(all_b8)},
    [K_ANY] = {STD_PAIR(any_f32), STD_PAIR(any_f64), STD_PAIR(any_i64), STD_PAIR(any_b8)},
    [K_VAR] = {PAIR(var_twopass_f32, var_f32_across), PAIR(var_twopass_f64, var_f64_across)},
    [K_NORM_COUNT] = {STD_PAIR(norm_count_f32), STD_PAIR(norm_count_f64)},
    [K_NORM_ABS] = {PAIR(abs_pairwise_f32, norm_abs_f32_across), PAIR(abs_pairwise_f64, norm_abs_f64_across)},
    [K_NORM_SQ] = {PAIR(sq_pairwise_f32, norm_sq_f32_across), PAIR(sq_pairwise_f64, norm_sq_f64_across)},
    [K_NORM_MAX] = {PAIR(absmax_lanes_f32, norm_max_f32_across), PAIR(absmax_lanes_f64, norm_max_f64_across)},
    [K_NORM_MIN] = {PAIR(absmin_lanes_f32, norm_min_f32_across), PAIR(absmin_lanes_f64, norm_min_f64_across)},
    [K_NORM_POW] = {STD_PAIR(norm_pow_f32), STD_PAIR(norm_pow_f64)},
    [K_ARGMAX] = {STD_PAIR(argmax_f32), STD_PAIR(argmax_f64), STD_PAIR(argmax_i64)},
    [K_ARGMIN] = {STD_PAIR(argmin_f32), STD_PAIR(argmin_f64), STD_PAIR(argmin_i64)},
};

static int dtype_slot(int dtype) {
  switch (dtype) {
  case TS_F32: return SLOT_F32;
  case TS_F64: return SLOT_F64;
  case TS_I64: return SLOT_I64;
  case TS_BOOL: case TS_U8: return SLOT_BYTE;
  default: return -1;
  }
}

static acc identity_of(reduce_kind kind) {
  acc s = {0, 0, 0, 0};
  switch (kind) {
  case K_PROD: s.f = 1; s.i = 1; break;
  case K_MAX: s.f = -INFINITY; s.i = INT64_MIN; break;
  case K_MIN: case K_NORM_MIN: s.f = INFINITY; s.i = INT64_MAX; break;
  case K_ALL: s.i = 1; break;
  case K_ARGMAX: case K_ARGMIN: s.n = -1; break;
  default: break; /* sums, counts, var, norm_max (|x| >= 0), any: zero */
  }
  return s;
}

static int make_reducer(reducer *r, const char *op, reduce_kind kind, int in_dtype, int out_dtype) {
  int slot = dtype_slot(in_dtype);
  const fold_pair *pair = slot >= 0 ? &fold_table[kind][slot] : NULL;
  if (!pair || !pair->fold)
    return ts_set_error(TS_ERR_DTYPE, "%s: the cpu kernel does not take %s input", op, ts_dtype_name(in_dtype));
  *r = (reducer){.kind = kind, .fold = pair->fold, .across = pair->across, .identity = identity_of(kind),
                 .in_dtype = in_dtype, .out_dtype = out_dtype};
  return TS_OK;
}

/* Merges `from` into `into`; `from` holds elements that come after `into`'s. Both fields of a
   float/integer pair are merged: the unused one holds the identity and stays harmless. */
static void combine(const reducer *r, acc *into, const acc *from) {
  switch (r->kind) {
  case K_SUM: case K_MEAN: case K_NORM_COUNT: case K_NORM_ABS: case K_NORM_SQ: case K_NORM_POW:
    into->f += from->f;
    into->i = wrap_add(into->i, from->i);
    break;
  case K_PROD:
    into->f *= from->f;
    into->i = wrap_mul(into->i, from->i);
    break;
  case K_MAX: case K_NORM_MAX:
    into->f = nan_max(into->f, from->f);
    into->i = from->i > into->i ? from->i : into->i;
    break;
  case K_MIN: case K_NORM_MIN:
    into->f = nan_min(into->f, from->f);
    into->i = from->i < into->i ? from->i : into->i;
    break;
  case K_ALL: into->i &= from->i; break;
  case K_ANY: into->i |= from->i; break;
  case K_VAR: welford_merge(into, from->n, from->f, from->m2); break;
  case K_ARGMAX: case K_ARGMIN: {
    if (from->n < 0) break;
    int take; /* strictly better only: on ties the earlier index stays */
    if (r->in_dtype == TS_I64) {
      take = r->kind == K_ARGMAX ? from->i > into->i : from->i < into->i;
    } else {
      double x = from->f, m = into->f;
      take = (r->kind == K_ARGMAX ? x > m : x < m) || (x != x && m == m);
    }
    if (into->n < 0 || take) *into = *from;
    break;
  }
  default: break;
  }
}

static void store(int dtype, char *p, double f, int64_t i) {
  switch (dtype) {
  case TS_F32: *(float *)p = (float)f; break;
  case TS_F64: *(double *)p = f; break;
  case TS_I64: *(int64_t *)p = i; break;
  default: *(uint8_t *)p = i != 0; break; /* bool */
  }
}

/* Writes the output of accumulator s: the value (when value is not NULL) and the index. */
static void finish(const reducer *r, const acc *s, char *value, int64_t *index) {
  double f = s->f;
  switch (r->kind) {
  case K_MEAN: f = s->f / (double)r->count; break;
  case K_VAR: {
    /* PyTorch's divisor: max(0, n - correction); 0/0 gives NaN, x/0 gives inf */
    double divisor = s->n - r->correction > 0 ? (double)(s->n - r->correction) : 0.0;
    f = s->m2 / divisor;
    if (r->take_sqrt) f = sqrt(f);
    break;
  }
  case K_NORM_SQ: f = sqrt(s->f); break;
  case K_NORM_POW: f = pow(s->f, 1.0 / r->p); break;
  default: break;
  }
  if (value) store(r->out_dtype, value, f, s->i);
  if (index) *index = s->n;
}

/* ---- the iteration engine -------------------------------------------------------------------- */
typedef struct {
  int ndim;
  const int64_t *shape, *stride; /* bytes */
  int64_t idx[TS_MAX_DIMS];
  int64_t off;
} cursor;

static void cursor_seek(cursor *c, int ndim, const int64_t *shape, const int64_t *stride, int64_t pos) {
  c->ndim = ndim;
  c->shape = shape;
  c->stride = stride;
  c->off = 0;
  for (int d = ndim - 1; d >= 0; d--) {
    c->idx[d] = pos % shape[d];
    pos /= shape[d];
    c->off += c->idx[d] * stride[d];
  }
}

/* Moves k elements along the innermost dim; a step never goes past the end of the current row. */
static void cursor_step(cursor *c, int64_t k) {
  int d = c->ndim - 1;
  c->idx[d] += k;
  c->off += k * c->stride[d];
  for (; d > 0 && c->idx[d] >= c->shape[d]; d--) {
    c->off += c->stride[d - 1] - c->idx[d] * c->stride[d];
    c->idx[d] = 0;
    c->idx[d - 1]++;
  }
}

typedef struct {
  const reducer *r;
  const char *base;
  int outer_ndim, inner_ndim; /* at least 1 each */
  int64_t outer_shape[TS_MAX_DIMS], outer_stride[TS_MAX_DIMS];
  int64_t inner_shape[TS_MAX_DIMS], inner_stride[TS_MAX_DIMS];
  int64_t outer_count, inner_count;
  int tiled;
  char *values;        /* contiguous outputs, or NULL */
  int64_t value_size;
  int64_t *indices;    /* arg reductions: contiguous int64 outputs, or NULL */
  acc *partials;       /* split path: num_parts blocks of outer_count accumulators */
  int64_t num_parts;
} plan;

/* Drops size-1 dims and merges neighbours that step through memory as one; at least one dim. */
static int coalesce(int ndim, const int64_t *shape, const int64_t *stride, int64_t *out_shape, int64_t *out_stride) {
  int k = 0;
  for (int d = 0; d < ndim; d++) {
    if (shape[d] == 1) continue;
    if (k > 0 && out_stride[k - 1] == stride[d] * shape[d]) {
      out_shape[k - 1] *= shape[d];
      out_stride[k - 1] = stride[d];
    } else {
      out_shape[k] = shape[d];
      out_stride[k] = stride[d];
      k++;
    }
  }
  if (k == 0) {
    out_shape[0] = 1;
    out_stride[0] = 0;
    k = 1;
  }
  return k;
}

static int64_t abs64(int64_t x) { return x < 0 ? -x : x; }

/* Outputs are the leading dims of a, in order (out is contiguous over them). The reduced dims may
   be visited in any order, so they are sorted by decreasing stride: a transposed input then
   reduces along memory, and dims that tile memory merge into one run. Arg reductions reduce a
   single dim, so their positions stay indices along it. */
static void make_plan(plan *pl, const reducer *r, const ts_tensor *a, int nred) {
  int nout = a->ndim - nred;
  int64_t esz = ts_dtype_size(a->dtype), shape[TS_MAX_DIMS], stride[TS_MAX_DIMS];
  for (int d = 0; d < a->ndim; d++) {
    shape[d] = a->shape[d];
    stride[d] = a->stride[d] * esz;
  }
  for (int i = nout + 1; i < a->ndim; i++) /* insertion sort of the reduced dims */
    for (int j = i; j > nout && abs64(stride[j]) > abs64(stride[j - 1]); j--) {
      int64_t sh = shape[j], st = stride[j];
      shape[j] = shape[j - 1];
      stride[j] = stride[j - 1];
      shape[j - 1] = sh;
      stride[j - 1] = st;
    }
  pl->r = r;
  pl->base = ts_elem_ptr(a);
  pl->outer_ndim = coalesce(nout, shape, stride, pl->outer_shape, pl->outer_stride);
  pl->inner_ndim = coalesce(nred, shape + nout, stride + nout, pl->inner_shape, pl->inner_stride);
  pl->outer_count = ts_shape_numel(nout, shape);
  pl->inner_count = ts_shape_numel(nred, shape + nout);
  int lo = pl->outer_ndim - 1, li = pl->inner_ndim - 1;
  pl->tiled = pl->outer_shape[lo] > 1 && pl->inner_count > 1 &&
              abs64(pl->outer_stride[lo]) < abs64(pl->inner_stride[li]);
}

/* Folds reduced positions [begin, end) of the output whose elements start at origin. */
static void fold_range(const plan *pl, acc *s, const char *origin, int64_t begin, int64_t end) {
  const reducer *r = pl->r;
  int last = pl->inner_ndim - 1;
  cursor c;
  cursor_seek(&c, pl->inner_ndim, pl->inner_shape, pl->inner_stride, begin);
  for (int64_t pos = begin; pos < end;) {
    int64_t run = pl->inner_shape[last] - c.idx[last];
    if (run > end - pos) run = end - pos;
    r->fold(r, s, origin + c.off, run, pl->inner_stride[last], pos);
    cursor_step(&c, run);
    pos += run;
  }
}

enum { TILE = 64, OUT_BLOCK = 256, MAX_PARTS = 64 };

/* Folds reduced positions [ib, ie) of outputs [ob, oe) into s[0 .. oe-ob). */
static void reduce_block(const plan *pl, acc *s, int64_t ob, int64_t oe, int64_t ib, int64_t ie) {
  if (ib >= ie) return;
  const reducer *r = pl->r;
  int lo = pl->outer_ndim - 1;
  cursor oc;
  cursor_seek(&oc, pl->outer_ndim, pl->outer_shape, pl->outer_stride, ob);
  if (!pl->tiled) {
    for (int64_t o = ob; o < oe; o++) {
      fold_range(pl, s + (o - ob), pl->base + oc.off, ib, ie);
      cursor_step(&oc, 1);
    }
    return;
  }
  for (int64_t o = ob; o < oe;) {
    int64_t tile = pl->outer_shape[lo] - oc.idx[lo];
    if (tile > oe - o) tile = oe - o;
    if (tile > TILE) tile = TILE;
    cursor ic;
    cursor_seek(&ic, pl->inner_ndim, pl->inner_shape, pl->inner_stride, ib);
    for (int64_t q = ib; q < ie; q++) {
      r->across(r, s + (o - ob), pl->base + oc.off + ic.off, tile, pl->outer_stride[lo], q);
      cursor_step(&ic, 1);
    }
    cursor_step(&oc, tile);
    o += tile;
  }
}

static void finish_output(const plan *pl, const acc *s, int64_t o) {
  finish(pl->r, s, pl->values ? pl->values + o * pl->value_size : NULL, pl->indices ? pl->indices + o : NULL);
}

/* Parallel over outputs: each thread reduces whole outputs, OUT_BLOCK at a time. */
static void outputs_range(int64_t begin, int64_t end, void *arg) {
  const plan *pl = arg;
  acc s[OUT_BLOCK];
  for (int64_t ob = begin; ob < end; ob += OUT_BLOCK) {
    int64_t oe = end - ob < OUT_BLOCK ? end : ob + OUT_BLOCK;
    for (int64_t o = ob; o < oe; o++) s[o - ob] = pl->r->identity;
    reduce_block(pl, s, ob, oe, 0, pl->inner_count);
    for (int64_t o = ob; o < oe; o++) finish_output(pl, &s[o - ob], o);
  }
}

/* Start of part c when n positions are cut into `parts` near-equal parts (no overflow). */
static int64_t part_start(int64_t n, int64_t parts, int64_t c) {
  return n / parts * c + n % parts * c / parts;
}

/* Split path: part c reduces its slice of the reduced range for every output. */
static void parts_range(int64_t begin, int64_t end, void *arg) {
  const plan *pl = arg;
  int64_t m = pl->outer_count, n = pl->inner_count;
  for (int64_t c = begin; c < end; c++) {
    acc *s = pl->partials + c * m;
    for (int64_t o = 0; o < m; o++) s[o] = pl->r->identity;
    reduce_block(pl, s, 0, m, part_start(n, pl->num_parts, c), part_start(n, pl->num_parts, c + 1));
  }
}

/* The parts depend on the size only, not on the thread count, so results are reproducible. */
static int run_split(plan *pl) {
  int64_t m = pl->outer_count;
  pl->num_parts = pl->inner_count / CPU_PARALLEL_GRAIN;
  if (pl->num_parts > MAX_PARTS) pl->num_parts = MAX_PARTS;
  pl->partials = malloc((size_t)(pl->num_parts * m) * sizeof(acc));
  if (!pl->partials)
    return ts_set_error(TS_ERR_MEMORY, "reduce: out of memory for %lld partial results", (long long)(pl->num_parts * m));
  ts_parallel_for(pl->num_parts, 1, parts_range, pl);
  for (int64_t o = 0; o < m; o++) {
    acc s = pl->partials[o];
    for (int64_t c = 1; c < pl->num_parts; c++) combine(pl->r, &s, &pl->partials[c * m + o]);
    finish_output(pl, &s, o);
  }
  free(pl->partials);
  return TS_OK;
}

/* Reduces the last nred dims of a into the outputs: values (contiguous, r->out_dtype) and/or
   indices (contiguous int64). */
static int run_reduction(reducer *r, const ts_tensor *a, int nred, ts_tensor *values, ts_tensor *indices) {
  plan pl = {0};
  make_plan(&pl, r, a, nred);
  pl.values = values ? ts_elem_ptr(values) : NULL;
  pl.value_size = values ? ts_dtype_size(values->dtype) : 0;
  pl.indices = indices ? (int64_t *)ts_elem_ptr(indices) : NULL;
  r->count = pl.inner_count;
  if (pl.outer_count == 0) return TS_OK;
  int64_t threads = ts_get_num_threads();
  /* Too few outputs to keep every thread busy, but plenty of work in each: split the range. */
  if (threads > 1 && pl.inner_count >= 2 * CPU_PARALLEL_GRAIN && pl.outer_count < 4 * threads)
    return run_split(&pl);
  int64_t per_output = pl.inner_count > 1 ? pl.inner_count : 1;
  int64_t grain = CPU_PARALLEL_GRAIN / per_output > 1 ? CPU_PARALLEL_GRAIN / per_output : 1;
  ts_parallel_for(pl.outer_count, grain, outputs_range, &pl);
  return TS_OK;
}

/* ---- backend entries ------------------------------------------------------------------------- */
int cpu_reduce(int op, ts_tensor *out, const ts_tensor *a, int nred) {
  static const char *const names[TS_NUM_REDUCE_OPS] = {"sum", "mean", "prod", "amax", "amin", "all", "any"};
  reducer r;
  if (op < 0 || op >= TS_NUM_REDUCE_OPS) return ts_set_error(TS_ERR_ARG, "reduce: invalid op %d", op);
  if (make_reducer(&r, names[op], (reduce_kind)op, a->dtype, out->dtype)) return ts_last_status();
  return run_reduction(&r, a, nred, out, NULL);
}

int cpu_var(ts_tensor *out, const ts_tensor *a, int nred, int64_t correction, int take_sqrt) {
  reducer r;
  if (make_reducer(&r, take_sqrt ? "std" : "var", K_VAR, a->dtype, out->dtype)) return ts_last_status();
  r.correction = correction;
  r.take_sqrt = take_sqrt;
  return run_reduction(&r, a, nred, out, NULL);
}

static reduce_kind norm_kind(double p) {
  if (p == 0) return K_NORM_COUNT;
  if (p == 1) return K_NORM_ABS;
  if (p == 2) return K_NORM_SQ;
  if (p == INFINITY) return K_NORM_MAX;
  if (p == -INFINITY) return K_NORM_MIN;
  return K_NORM_POW;
}

int cpu_norm(ts_tensor *out, const ts_tensor *a, int nred, double p) {
  reducer r;
  if (make_reducer(&r, "norm", norm_kind(p), a->dtype, out->dtype)) return ts_last_status();
  r.p = p;
  return run_reduction(&r, a, nred, out, NULL);
}

int cpu_arg_reduce(ts_tensor *values, ts_tensor *indices, const ts_tensor *a, int largest) {
  reducer r;
  const char *op = largest ? "argmax" : "argmin";
  if (make_reducer(&r, op, largest ? K_ARGMAX : K_ARGMIN, a->dtype, values ? values->dtype : a->dtype))
    return ts_last_status();
  return run_reduction(&r, a, a->ndim > 0 ? 1 : 0, values, indices);
}

/* elementwise.c — unary, binary, where and clamp on the CPU.
 *
 * Kernels compute in float32, float64 or int64 (see cpu_compute_dtype); the runtime converts
 * operands first. The float32 and float64 loops are one body instantiated twice through
 * <tgmath.h>, whose math functions pick the precision from their argument type. */
#include "cpu.h"
#include "fastmath.h"

#include <stdbool.h>
#include <string.h>
#include <tgmath.h>

/* One pass over a run: a tight loop when every operand is contiguous (the compiler vectorises
   it), a strided one otherwise. X (and Y, C) name the current input values inside EXPR. */
#define RUN1(TI, TO, EXPR)                                                                          \
  do {                                                                                             \
    if (s[0] == (int64_t)sizeof(TO) && s[1] == (int64_t)sizeof(TI)) {                              \
      TO *o = (TO *)p[0];                                                                          \
      const TI *a = (const TI *)p[1];                                                              \
      for (int64_t i = 0; i < n; i++) { TI X = a[i]; o[i] = (TO)(EXPR); }                          \
    } else {                                                                                       \
      for (int64_t i = 0; i < n; i++) {                                                            \
        TI X = *(const TI *)(p[1] + i * s[1]);                                                     \
        *(TO *)(p[0] + i * s[0]) = (TO)(EXPR);                                                     \
      }                                                                                            \
    }                                                                                              \
  } while (0)

#define RUN2(TI, TO, EXPR)                                                                          \
  do {                                                                                             \
    if (s[0] == (int64_t)sizeof(TO) && s[1] == (int64_t)sizeof(TI) && s[2] == (int64_t)sizeof(TI)) { \
      TO *o = (TO *)p[0];                                                                          \
      const TI *a = (const TI *)p[1], *b = (const TI *)p[2];                                       \
      for (int64_t i = 0; i < n; i++) { TI X = a[i], Y = b[i]; o[i] = (TO)(EXPR); }                \
    } else if (s[0] == (int64_t)sizeof(TO) && s[1] == (int64_t)sizeof(TI) && s[2] == 0) {          \
      TO *o = (TO *)p[0];                                                                          \
      const TI *a = (const TI *)p[1];                                                              \
      const TI Y = *(const TI *)p[2];                                                              \
      for (int64_t i = 0; i < n; i++) { TI X = a[i]; o[i] = (TO)(EXPR); }                          \
    } else {                                                                                       \
      for (int64_t i = 0; i < n; i++) {                                                            \
        TI X = *(const TI *)(p[1] + i * s[1]), Y = *(const TI *)(p[2] + i * s[2]);                 \
        *(TO *)(p[0] + i * s[0]) = (TO)(EXPR);                                                     \
      }                                                                                            \
    }                                                                                              \
  } while (0)

typedef struct { int op; int error; } op_ctx;

/* float32 erf and exp are fastmath.h's vectorizable polynomials (libm's erff/expf are calls that
   keep GELU and its backward from vectorizing; within a few ulp of them); float64 keeps libm. */
static inline double erf_f64(double x) { return erf(x); }
static inline double exp_f64(double x) { return exp(x); }

/* ---- float32 / float64 ----------------------------------------------------------------------- */
#define FLOAT_KERNELS(T, SUFFIX, SQRT1_2)                                                           \
  static void unary_##SUFFIX(int64_t n, char **p, const int64_t *s, void *arg) {                    \
    switch (((op_ctx *)arg)->op) {                                                                 \
    case TS_NEG: RUN1(T, T, -X); break;                                                            \
    case TS_ABS: RUN1(T, T, fabs(X)); break;                                                       \
    case TS_SIGN: RUN1(T, T, X != X ? X : (T)((X > 0) - (X < 0))); break;                          \
    case TS_EXP: RUN1(T, T, exp(X)); break;                                                        \
    case TS_EXPM1: RUN1(T, T, expm1(X)); break;                                                    \
    case TS_LOG: RUN1(T, T, log(X)); break;                                                        \
    case TS_LOG1P: RUN1(T, T, log1p(X)); break;                                                    \
    case TS_SQRT: RUN1(T, T, sqrt(X)); break;                                                      \
    case TS_RSQRT: RUN1(T, T, (T)1 / sqrt(X)); break;                                              \
    case TS_TANH: RUN1(T, T, tanh(X)); break;                                                      \
    case TS_SIGMOID: RUN1(T, T, (T)1 / ((T)1 + exp(-X))); break;                                   \
    case TS_ERF: RUN1(T, T, erf_##SUFFIX(X)); break;                                                        \
    case TS_RELU: RUN1(T, T, X > 0 ? X : (X != X ? X : (T)0)); break;                              \
    case TS_GELU: RUN1(T, T, (T)0.5 * X * ((T)1 + erf_##SUFFIX(X * (T)SQRT1_2))); break;                    \
    case TS_SILU: RUN1(T, T, X / ((T)1 + exp(-X))); break;                                         \
    case TS_SIN: RUN1(T, T, sin(X)); break;                                                        \
    case TS_COS: RUN1(T, T, cos(X)); break;                                                        \
    case TS_FLOOR: RUN1(T, T, floor(X)); break;                                                    \
    case TS_CEIL: RUN1(T, T, ceil(X)); break;                                                      \
    case TS_ROUND: RUN1(T, T, nearbyint(X)); break;                                                \
    case TS_TRUNC: RUN1(T, T, trunc(X)); break;                                                    \
    case TS_RECIPROCAL: RUN1(T, T, (T)1 / X); break;                                               \
    case TS_SQUARE: RUN1(T, T, X * X); break;                                                      \
    case TS_LOGICAL_NOT: RUN1(T, bool, X == 0); break;                                             \
    case TS_ISNAN: RUN1(T, bool, X != X); break;                                                   \
    case TS_ISINF: RUN1(T, bool, isinf(X)); break;                                                 \
    case TS_ISFINITE: RUN1(T, bool, isfinite(X)); break;                                           \
    }                                                                                              \
  }                                                                                                \
  static T floor_mod_##SUFFIX(T x, T y) {                                                          \
    T r = fmod(x, y);                                                                              \
    return r != 0 && ((r < 0) != (y < 0)) ? r + y : r;                                            \
  }                                                                                                \
  static T max_##SUFFIX(T x, T y) { return x != x || y != y ? x + y : x > y ? x : y; }             \
  static T min_##SUFFIX(T x, T y) { return x != x || y != y ? x + y : x < y ? x : y; }             \
  static void binary_##SUFFIX(int64_t n, char **p, const int64_t *s, void *arg) {                   \
    switch (((op_ctx *)arg)->op) {                                                                 \
    case TS_ADD: RUN2(T, T, X + Y); break;                                                         \
    case TS_SUB: RUN2(T, T, X - Y); break;                                                         \
    case TS_MUL: RUN2(T, T, X * Y); break;                                                         \
    case TS_DIV: RUN2(T, T, X / Y); break;                                                         \
    case TS_POW: RUN2(T, T, pow(X, Y)); break;                                                     \
    case TS_MAXIMUM: RUN2(T, T, max_##SUFFIX(X, Y)); break;                                        \
    case TS_MINIMUM: RUN2(T, T, min_##SUFFIX(X, Y)); break;                                        \
    case TS_REMAINDER: RUN2(T, T, floor_mod_##SUFFIX(X, Y)); break;                                \
    case TS_FLOOR_DIVIDE: RUN2(T, T, floor(X / Y)); break;                                         \
    case TS_ATAN2: RUN2(T, T, atan2(X, Y)); break;                                                 \
    case TS_EQ: RUN2(T, bool, X == Y); break;                                                      \
    case TS_NE: RUN2(T, bool, X != Y); break;                                                      \
    case TS_LT: RUN2(T, bool, X < Y); break;                                                       \
    case TS_LE: RUN2(T, bool, X <= Y); break;                                                      \
    case TS_GT: RUN2(T, bool, X > Y); break;                                                       \
    case TS_GE: RUN2(T, bool, X >= Y); break;                                                      \
    case TS_LOGICAL_AND: RUN2(T, bool, X != 0 && Y != 0); break;                                   \
    case TS_LOGICAL_OR: RUN2(T, bool, X != 0 || Y != 0); break;                                    \
    case TS_LOGICAL_XOR: RUN2(T, bool, (X != 0) != (Y != 0)); break;                               \
    }                                                                                              \
  }

FLOAT_KERNELS(float, f32, 0.70710678118654752440f)
FLOAT_KERNELS(double, f64, 0.70710678118654752440)

/* ---- int64 (every integer and bool dtype computes here) -------------------------------------- */
static int64_t ipow(int64_t base, int64_t e) {
  if (e < 0) return base == 1 ? 1 : base == -1 ? (e % 2 ? -1 : 1) : 0;
  uint64_t r = 1, b = (uint64_t)base; /* unsigned: overflow wraps instead of being undefined */
  for (; e; e >>= 1, b *= b)
    if (e & 1) r *= b;
  return (int64_t)r;
}
static int64_t floor_div_i64(int64_t x, int64_t y, int *error) {
  if (y == 0) { __atomic_store_n(error, 1, __ATOMIC_RELAXED); return 0; }
  if (x == INT64_MIN && y == -1) return INT64_MIN;
  int64_t q = x / y;
  return (x % y != 0 && ((x < 0) != (y < 0))) ? q - 1 : q;
}
static int64_t floor_mod_i64(int64_t x, int64_t y, int *error) {
  if (y == 0) { __atomic_store_n(error, 1, __ATOMIC_RELAXED); return 0; }
  if (y == -1) return 0;
  int64_t r = x % y;
  return r != 0 && ((r < 0) != (y < 0)) ? r + y : r;
}
static int64_t wrap_add(int64_t x, int64_t y) { return (int64_t)((uint64_t)x + (uint64_t)y); }
static int64_t wrap_sub(int64_t x, int64_t y) { return (int64_t)((uint64_t)x - (uint64_t)y); }
static int64_t wrap_mul(int64_t x, int64_t y) { return (int64_t)((uint64_t)x * (uint64_t)y); }
static int64_t wrap_neg(int64_t x) { return (int64_t)(0 - (uint64_t)x); }

static void unary_i64(int64_t n, char **p, const int64_t *s, void *arg) {
  switch (((op_ctx *)arg)->op) {
  case TS_NEG: RUN1(int64_t, int64_t, wrap_neg(X)); break;
  case TS_ABS: RUN1(int64_t, int64_t, X < 0 ? wrap_neg(X) : X); break;
  case TS_SIGN: RUN1(int64_t, int64_t, (X > 0) - (X < 0)); break;
  case TS_RELU: RUN1(int64_t, int64_t, X > 0 ? X : 0); break;
  case TS_SQUARE: RUN1(int64_t, int64_t, wrap_mul(X, X)); break;
  case TS_FLOOR: case TS_CEIL: case TS_ROUND: case TS_TRUNC: RUN1(int64_t, int64_t, X); break;
  case TS_LOGICAL_NOT: RUN1(int64_t, bool, X == 0); break;
  case TS_ISNAN: case TS_ISINF: RUN1(int64_t, bool, X != X); break;
  case TS_ISFINITE: RUN1(int64_t, bool, X == X); break;
  default: __atomic_store_n(&((op_ctx *)arg)->error, 2, __ATOMIC_RELAXED); break; /* float-only op: the runtime converts first */
  }
}

static void binary_i64(int64_t n, char **p, const int64_t *s, void *arg) {
  int *error = &((op_ctx *)arg)->error;
  switch (((op_ctx *)arg)->op) {
  case TS_ADD: RUN2(int64_t, int64_t, wrap_add(X, Y)); break;
  case TS_SUB: RUN2(int64_t, int64_t, wrap_sub(X, Y)); break;
  case TS_MUL: RUN2(int64_t, int64_t, wrap_mul(X, Y)); break;
  case TS_POW: RUN2(int64_t, int64_t, ipow(X, Y)); break;
  case TS_MAXIMUM: RUN2(int64_t, int64_t, X > Y ? X : Y); break;
  case TS_MINIMUM: RUN2(int64_t, int64_t, X < Y ? X : Y); break;
  case TS_REMAINDER: RUN2(int64_t, int64_t, floor_mod_i64(X, Y, error)); break;
  case TS_FLOOR_DIVIDE: RUN2(int64_t, int64_t, floor_div_i64(X, Y, error)); break;
  case TS_EQ: RUN2(int64_t, bool, X == Y); break;
  case TS_NE: RUN2(int64_t, bool, X != Y); break;
  case TS_LT: RUN2(int64_t, bool, X < Y); break;
  case TS_LE: RUN2(int64_t, bool, X <= Y); break;
  case TS_GT: RUN2(int64_t, bool, X > Y); break;
  case TS_GE: RUN2(int64_t, bool, X >= Y); break;
  case TS_LOGICAL_AND: RUN2(int64_t, bool, X != 0 && Y != 0); break;
  case TS_LOGICAL_OR: RUN2(int64_t, bool, X != 0 || Y != 0); break;
  case TS_LOGICAL_XOR: RUN2(int64_t, bool, (X != 0) != (Y != 0)); break;
  default: __atomic_store_n(error, 2, __ATOMIC_RELAXED); break;
  }
}

static int finish(const char *op, const op_ctx *c, int dtype) {
  if (c->error == 1) return ts_set_error(TS_ERR_ARG, "%s: integer division by zero", op);
  if (c->error == 2) return ts_set_error(TS_ERR_DTYPE, "%s: not defined for %s", op, ts_dtype_name(dtype));
  return TS_OK;
}

int cpu_unary(int op, ts_tensor *out, const ts_tensor *a) {
  op_ctx c = {op, 0};
  const ts_tensor *ops[2] = {out, a};
  cpu_foreach(2, ops, a->dtype == TS_F32 ? unary_f32 : a->dtype == TS_F64 ? unary_f64 : unary_i64, &c);
  return finish(ts_unary_op_name(op), &c, a->dtype);
}

int cpu_binary(int op, ts_tensor *out, const ts_tensor *a, const ts_tensor *b) {
  op_ctx c = {op, 0};
  const ts_tensor *ops[3] = {out, a, b};
  cpu_foreach(3, ops, a->dtype == TS_F32 ? binary_f32 : a->dtype == TS_F64 ? binary_f64 : binary_i64, &c);
  return finish(ts_binary_op_name(op), &c, a->dtype);
}

/* where and clamp move values without arithmetic, so one byte-generic loop per element size. */
static void where_run(int64_t n, char **p, const int64_t *s, void *arg) {
  size_t esz = *(const size_t *)arg;
  for (int64_t i = 0; i < n; i++) {
    const char *src = *(const bool *)(p[1] + i * s[1]) ? p[2] + i * s[2] : p[3] + i * s[3];
    memcpy(p[0] + i * s[0], src, esz);
  }
}

int cpu_where(ts_tensor *out, const ts_tensor *cond, const ts_tensor *a, const ts_tensor *b) {
  size_t esz = (size_t)ts_dtype_size(out->dtype);
  const ts_tensor *ops[4] = {out, cond, a, b};
  cpu_foreach(4, ops, where_run, &esz);
  return TS_OK;
}

typedef struct { double lo, hi; int has_lo, has_hi; } clamp_ctx;

#define CLAMP_RUN(T)                                                                               \
  static void clamp_##T(int64_t n, char **p, const int64_t *s, void *arg) {                        \
    const clamp_ctx *c = arg;                                                                      \
    T lo = (T)c->lo, hi = (T)c->hi;                                                                \
    int has_lo = c->has_lo, has_hi = c->has_hi;                                                    \
    RUN1(T, T, X != X ? X : has_lo && X < lo ? lo : has_hi && X > hi ? hi : X);                    \
  }
CLAMP_RUN(float)
CLAMP_RUN(double)

static void clamp_int64_t(int64_t n, char **p, const int64_t *s, void *arg) {
  const clamp_ctx *c = arg;
  /* integer bounds: round inward so that clamp(x, 0.5) keeps x >= 1 */
  int64_t lo = c->has_lo ? cpu_saturate_i64(ceil(c->lo)) : 0, hi = c->has_hi ? cpu_saturate_i64(floor(c->hi)) : 0;
  int has_lo = c->has_lo, has_hi = c->has_hi;
  RUN1(int64_t, int64_t, has_lo && X < lo ? lo : has_hi && X > hi ? hi : X);
}

int cpu_clamp(ts_tensor *out, const ts_tensor *a, double lo, double hi, int has_lo, int has_hi) {
  clamp_ctx c = {lo, hi, has_lo, has_hi};
  const ts_tensor *ops[2] = {out, a};
  cpu_foreach(2, ops, a->dtype == TS_F32 ? clamp_float : a->dtype == TS_F64 ? clamp_double : clamp_int64_t, &c);
  return TS_OK;
}

/* ---- unary backward: gx = g * f'(x), written with x and y = f(x) --------------------------- */
#define RUN3(T, EXPR)                                                                               \
  do {                                                                                             \
    const int64_t e = (int64_t)sizeof(T);                                                          \
    if (s[0] == e && s[1] == e && s[2] == e && s[3] == e) { /* contiguous: vectorizable */         \
      T *restrict o = (T *)p[0];                                                                   \
      const T *restrict g = (const T *)p[1], *restrict x = (const T *)p[2], *restrict y = (const T *)p[3]; \
      for (int64_t i = 0; i < n; i++) {                                                            \
        T G = g[i], X = x[i], Y = y[i];                                                            \
        (void)G;                                                                                   \
        (void)X;                                                                                   \
        (void)Y;                                                                                   \
        o[i] = (T)(EXPR);                                                                          \
      }                                                                                            \
      break;                                                                                       \
    }                                                                                              \
    for (int64_t i = 0; i < n; i++) {                                                              \
      T G = *(const T *)(p[1] + i * s[1]), X = *(const T *)(p[2] + i * s[2]),                      \
        Y = *(const T *)(p[3] + i * s[3]);                                                         \
      (void)G;                                                                                     \
      (void)X;                                                                                     \
      (void)Y;                                                                                     \
      *(T *)(p[0] + i * s[0]) = (T)(EXPR);                                                         \
    }                                                                                              \
  } while (0)

#define FLOAT_UNARY_BACKWARD(T, SUFFIX, TWO_OVER_SQRT_PI, INV_SQRT_2PI, SQRT1_2)                    \
  static void unary_backward_##SUFFIX(int64_t n, char **p, const int64_t *s, void *arg) {           \
    switch (((op_ctx *)arg)->op) {                                                                 \
    case TS_NEG: RUN3(T, -G); break;                                                               \
    case TS_ABS: RUN3(T, X > 0 ? G : X < 0 ? -G : (T)0); break;                                    \
    case TS_SIGN: case TS_FLOOR: case TS_CEIL: case TS_ROUND: case TS_TRUNC: RUN3(T, 0); break;    \
    case TS_EXP: RUN3(T, G * Y); break;                                                            \
    case TS_EXPM1: RUN3(T, G * (Y + 1)); break;                                                    \
    case TS_LOG: RUN3(T, G / X); break;                                                            \
    case TS_LOG1P: RUN3(T, G / (X + 1)); break;                                                    \
    case TS_SQRT: RUN3(T, G / (2 * Y)); break;                                                     \
    case TS_RSQRT: RUN3(T, (T)-0.5 * G * Y * Y * Y); break;                                        \
    case TS_TANH: RUN3(T, G * (1 - Y * Y)); break;                                                 \
    case TS_SIGMOID: RUN3(T, G * Y * (1 - Y)); break;                                              \
    case TS_ERF: RUN3(T, G * (T)TWO_OVER_SQRT_PI * exp(-X * X)); break;                            \
    case TS_RELU: RUN3(T, Y > 0 ? G : (T)0); break;                                                \
    case TS_GELU:                                                                                  \
      RUN3(T, G * ((T)0.5 * (1 + erf_##SUFFIX(X * (T)SQRT1_2)) + X * (T)INV_SQRT_2PI * exp_##SUFFIX((T)-0.5 * X * X))); \
      break;                                                                                       \
    case TS_SILU: {                                                                                \
      RUN3(T, G * (1 / (1 + exp(-X))) * (1 + X * (1 - 1 / (1 + exp(-X)))));                        \
      break;                                                                                       \
    }                                                                                              \
    case TS_SIN: RUN3(T, G * cos(X)); break;                                                       \
    case TS_COS: RUN3(T, -G * sin(X)); break;                                                      \
    case TS_RECIPROCAL: RUN3(T, -G * Y * Y); break;                                                \
    case TS_SQUARE: RUN3(T, 2 * G * X); break;                                                     \
    default: __atomic_store_n(&((op_ctx *)arg)->error, 2, __ATOMIC_RELAXED); break;                \
    }                                                                                              \
  }

FLOAT_UNARY_BACKWARD(float, f32, 1.12837916709551257390f, 0.39894228040143267794f, 0.70710678118654752440f)
FLOAT_UNARY_BACKWARD(double, f64, 1.12837916709551257390, 0.39894228040143267794, 0.70710678118654752440)

int cpu_unary_backward(int op, ts_tensor *gx, const ts_tensor *g, const ts_tensor *x, const ts_tensor *y) {
  if (x->dtype != TS_F32 && x->dtype != TS_F64)
    return ts_set_error(TS_ERR_DTYPE, "%s backward: not defined for %s", ts_unary_op_name(op), ts_dtype_name(x->dtype));
  op_ctx c = {op, 0};
  const ts_tensor *ops[4] = {gx, g, x, y};
  cpu_foreach(4, ops, x->dtype == TS_F32 ? unary_backward_f32 : unary_backward_f64, &c);
  if (c.error) return ts_set_error(TS_ERR_ARG, "%s: not differentiable", ts_unary_op_name(op));
  return TS_OK;
}

/* random.c — uniform, normal, bernoulli and randint fills from the Philox4x32-10 stream.
 *
 * Every element is a pure function of (seed, offset, its index): the draw splits across threads at
 * any block boundary, and a GPU kernel written from the same definitions (runtime/random.c, top
 * comment) reproduces it. The runtime has validated the parameters; `out` is contiguous. */
#include "cpu.h"

#include <math.h>
#include <string.h>

enum {
  LANES = 4,          /* one Philox block gives four 32-bit lanes: four consecutive elements */
  CHUNK_BLOCKS = 64   /* blocks turned into doubles on the stack, then stored in one dtype loop */
};

static const double TWO_POW_M32 = 0x1p-32, TWO_POW_M24 = 0x1p-24, TWO_PI = 6.283185307179586476925286766559;

typedef struct {
  int kind, dtype;
  double a, b;           /* low/high, mean/std, p (a), low/high */
  double below_high;     /* uniform: the largest value of dtype below high */
  uint64_t seed, offset;
  int64_t n;
  char *data;
} random_ctx;

/* ---- values of the dtype --------------------------------------------------------------------- */
/* v rounded to the nearest value of a floating dtype, the way cpu_store_f64 will store it. */
static double round_to(int dtype, double v) {
  switch (dtype) {
  case TS_F32: return (float)v;
  case TS_F16: return ts_half_to_float(ts_float_to_half((float)v));
  case TS_BF16: return ts_bf16_to_float(ts_float_to_bf16((float)v));
  default: return v;
  }
}

/* The next 16-bit float (half or bfloat16: same sign-magnitude layout) towards -infinity. */
static uint16_t step_down16(uint16_t bits) {
  if ((bits & 0x7fff) == 0) return 0x8001;  /* ±0: the smallest negative subnormal */
  return (bits & 0x8000) ? (uint16_t)(bits + 1) : (uint16_t)(bits - 1);
}

/* The largest value of a floating dtype strictly below `high` (finite, checked by the runtime). */
static double largest_below(int dtype, double high) {
  if (dtype == TS_F64) return nextafter(high, -INFINITY);
  float f = (float)high;
  while ((double)f >= high) f = nextafterf(f, -INFINITY);
  if (dtype == TS_F32) return f;
  int half = dtype == TS_F16;
  uint16_t bits = half ? ts_float_to_half(f) : ts_float_to_bf16(f);
  for (;;) {
    double v = half ? ts_half_to_float(bits) : ts_bf16_to_float(bits);
    if (v < high) return v;
    bits = step_down16(bits);
  }
}

/* Stores count doubles, each exactly representable in dtype, as dtype elements. */
static void store_values(int dtype, char *dst, const double *v, int64_t count) {
  switch (dtype) {
  case TS_F32:
    for (int64_t i = 0; i < count; i++) ((float *)dst)[i] = (float)v[i];
    break;
  case TS_F64: memcpy(dst, v, (size_t)count * sizeof(double)); break;
  case TS_I64:
    for (int64_t i = 0; i < count; i++) ((int64_t *)dst)[i] = (int64_t)v[i];
    break;
  default: {
    int64_t esz = ts_dtype_size(dtype);
    for (int64_t i = 0; i < count; i++) cpu_store_f64(dtype, dst + i * esz, v[i]);
  }
  }
}

/* ---- one block of four values per distribution ----------------------------------------------- */
static void uniform_block(const random_ctx *c, const uint32_t *x, double *out) {
  double range = c->b - c->a;
  for (int l = 0; l < LANES; l++) {
    /* float64 gets all 32 bits; narrower floats the top 24, as many as a float32 mantissa holds */
    double u = c->dtype == TS_F64 ? x[l] * TWO_POW_M32 : (x[l] >> 8) * TWO_POW_M24;
    double v = round_to(c->dtype, c->a + range * u);
    out[l] = v >= c->b && c->a < c->b ? c->below_high : v; /* rounding must not reach high */
  }
}

static void normal_block(const random_ctx *c, const uint32_t *x, double *out) {
  for (int l = 0; l < LANES; l += 2) {
    double u1 = ((double)x[l] + 1.0) * TWO_POW_M32; /* (0, 1]: log never sees 0 */
    double u2 = x[l + 1] * TWO_POW_M32;
    double r = sqrt(-2.0 * log(u1)), s, co;
    sincos(TWO_PI * u2, &s, &co); /* glibc: both at the cost of one */
    out[l] = round_to(c->dtype, c->a + c->b * r * co);
    out[l + 1] = round_to(c->dtype, c->a + c->b * r * s);
  }
}

static void bernoulli_block(const random_ctx *c, const uint32_t *x, double *out) {
  for (int l = 0; l < LANES; l++) out[l] = x[l] * TWO_POW_M32 < c->a ? 1.0 : 0.0;
}

static void randint_block(const random_ctx *c, const uint32_t *x, double *out) {
  /* low and high are integers within ±2^53 with high - low <= 2^32: every step here is exact */
  uint64_t range = (uint64_t)(c->b - c->a);
  for (int l = 0; l < LANES; l++) out[l] = c->a + (double)(((uint64_t)x[l] * range) >> 32);
}

typedef void (*block_fn)(const random_ctx *c, const uint32_t *x, double *out);

static block_fn block_for(int kind) {
  switch (kind) {
  case TS_RAND_UNIFORM: return uniform_block;
  case TS_RAND_NORMAL: return normal_block;
  case TS_RAND_BERNOULLI: return bernoulli_block;
  default: return randint_block;
  }
}

/* Blocks [begin, end) of the draw: block j holds elements 4j .. 4j+3 and uses counter offset + j. */
static void random_range(int64_t begin, int64_t end, void *arg) {
  const random_ctx *c = arg;
  block_fn fn = block_for(c->kind);
  int64_t esz = ts_dtype_size(c->dtype);
  double values[CHUNK_BLOCKS * LANES];
  uint32_t x[LANES];
  for (int64_t first = begin; first < end; first += CHUNK_BLOCKS) {
    int64_t last = first + CHUNK_BLOCKS < end ? first + CHUNK_BLOCKS : end;
    for (int64_t j = first; j < last; j++) {
      uint64_t lo = c->offset + (uint64_t)j, hi = lo < c->offset; /* 128-bit counter: carry */
      ts_philox4x32(c->seed, lo, hi, x);
      fn(c, x, values + (j - first) * LANES);
    }
    int64_t elem = first * LANES, count = last * LANES < c->n ? last * LANES - elem : c->n - elem;
    store_values(c->dtype, c->data + elem * esz, values, count);
  }
}

int cpu_random(ts_tensor *out, int kind, double a, double b, uint64_t seed, uint64_t offset) {
  random_ctx c = {kind, out->dtype, a, b, 0, seed, offset, ts_numel(out), ts_elem_ptr(out)};
  if (kind == TS_RAND_UNIFORM && a < b) c.below_high = largest_below(out->dtype, b);
  int64_t blocks = (c.n + LANES - 1) / LANES;
  ts_parallel_for(blocks, CPU_PARALLEL_GRAIN / LANES, random_range, &c);
  return TS_OK;
}

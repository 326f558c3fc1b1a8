/* random.c — generators and random fills over the counter-based Philox4x32-10 stream.
 *
 * The stream, identical on every backend:
 *   Philox4x32-10 as in Random123 (Salmon et al., SC 2011). The key is the 64-bit seed (word 0 its
 *   low 32 bits); the 128-bit counter is (counter_lo, counter_hi), words 0,1 the low and high half
 *   of counter_lo, words 2,3 those of counter_hi. Element i of a draw uses the block at counter
 *   offset + i/4 (a 128-bit sum), lane i%4; a draw of n elements advances the offset by ceil(n/4),
 *   so consecutive draws never share a block.
 * From a lane's 32-bit value x (all arithmetic in double, then rounded to the tensor's dtype):
 *   uniform    float64: u = x * 2^-32; float32, float16, bfloat16: u = (x >> 8) * 2^-24.
 *              value = low + (high - low) * u; a value that rounds up to high becomes the largest
 *              value of the dtype below high, so every result lies in [low, high).
 *   normal     Box-Muller within a block, lanes (0,1) give normals 0,1 and lanes (2,3) normals 2,3:
 *              u1 = (x0 + 1) * 2^-32 in (0, 1] (log never sees 0), u2 = x1 * 2^-32,
 *              r = sqrt(-2 ln u1), z0 = r cos(2 pi u2), z1 = r sin(2 pi u2); value = mean + std * z.
 *   bernoulli  1 when x * 2^-32 < p, else 0 (p = 0 never, p = 1 always).
 *   randint    low + ((uint64)x * (high - low) >> 32) for high - low <= 2^32.
 *   randperm   n keys drawn as randint over [0, 2^32), i.e. the raw lanes; the permutation is the
 *              order of a stable ascending sort of the keys (equal keys keep index order).
 * The uniform, bernoulli, randint and randperm streams are bit-identical across devices; normals
 * agree up to the last-place rounding of log/cos/sin on each device.
 *
 * The default generator starts at seed 67280421310721 (PyTorch's default), offset 0. */
#include "autograd.h"
#include "backend.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>

/* ---- Philox4x32-10 --------------------------------------------------------------------------- */
enum { PHILOX_ROUNDS = 10 };
static const uint32_t PHILOX_M0 = 0xD2511F53u, PHILOX_M1 = 0xCD9E8D57u; /* round multipliers */
static const uint32_t PHILOX_W0 = 0x9E3779B9u, PHILOX_W1 = 0xBB67AE85u; /* key schedule (golden ratio, sqrt 3) */

void ts_philox4x32(uint64_t seed, uint64_t counter_lo, uint64_t counter_hi, uint32_t *out4) {
  uint32_t c0 = (uint32_t)counter_lo, c1 = (uint32_t)(counter_lo >> 32);
  uint32_t c2 = (uint32_t)counter_hi, c3 = (uint32_t)(counter_hi >> 32);
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  for (int r = 0; r < PHILOX_ROUNDS; r++) {
    uint64_t p0 = (uint64_t)PHILOX_M0 * c0, p1 = (uint64_t)PHILOX_M1 * c2;
    uint32_t next0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, next2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
    c0 = next0;
    c1 = (uint32_t)p1;
    c2 = next2;
    c3 = (uint32_t)p0;
    k0 += PHILOX_W0;
    k1 += PHILOX_W1;
  }
  out4[0] = c0;
  out4[1] = c1;
  out4[2] = c2;
  out4[3] = c3;
}

/* ---- generators ------------------------------------------------------------------------------ */
/* The lock makes (seed, offset) one value: a draw reserves its blocks atomically, and a state read
   or written concurrently with draws is always a state some sequence of draws passed through.
   `changes` counts draws, rewinds and set_state calls, so that a rewind can tell whether it would
   undo another thread's (see ts_draw_rewind). */
struct ts_generator {
  pthread_mutex_t lock;
  uint64_t seed, offset, changes;
};

#define DEFAULT_SEED 67280421310721ull
static ts_generator default_generator = {PTHREAD_MUTEX_INITIALIZER, DEFAULT_SEED, 0, 0};

/* This thread's latest changes to generators (draws and rewinds): entry i of the log is
   own_log[i % OWN_LOG], own_changes entries in all. */
enum { OWN_LOG = 64 };
static _Thread_local ts_generator *own_log[OWN_LOG];
static _Thread_local uint64_t own_changes;

static void log_own_change(ts_generator *g) { own_log[own_changes++ % OWN_LOG] = g; }

ts_generator *ts_default_generator(void) { return &default_generator; }

ts_generator *ts_generator_new(uint64_t seed) {
  ts_generator *g = malloc(sizeof *g);
  if (!g) {
    ts_set_error(TS_ERR_MEMORY, "generator: out of host memory");
    return NULL;
  }
  pthread_mutex_init(&g->lock, NULL);
  g->seed = seed;
  g->offset = 0;
  g->changes = 0;
  return g;
}

void ts_generator_free(ts_generator *g) {
  if (!g || g == &default_generator) return; /* the default generator lives as long as the library */
  pthread_mutex_destroy(&g->lock);
  free(g);
}

void ts_generator_set_state(ts_generator *g, uint64_t seed, uint64_t offset) {
  if (!g) g = &default_generator;
  pthread_mutex_lock(&g->lock);
  g->seed = seed;
  g->offset = offset;
  g->changes++;
  pthread_mutex_unlock(&g->lock);
}

void ts_generator_get_state(const ts_generator *g, uint64_t *seed, uint64_t *offset) {
  ts_generator *m = g ? (ts_generator *)g : &default_generator;
  pthread_mutex_lock(&m->lock);
  if (seed) *seed = m->seed;
  if (offset) *offset = m->offset;
  pthread_mutex_unlock(&m->lock);
}

/* Takes the blocks of a draw of n elements; returns the offset the draw starts at. */
static uint64_t reserve_blocks(ts_generator *g, int64_t n, uint64_t *seed) {
  if (!g) g = &default_generator;
  pthread_mutex_lock(&g->lock);
  uint64_t start = g->offset;
  *seed = g->seed;
  g->offset += ((uint64_t)n + 3) / 4;
  g->changes++;
  log_own_change(g);
  pthread_mutex_unlock(&g->lock);
  return start;
}

ts_draw_mark ts_draw_mark_of(ts_generator *g) {
  if (!g) g = &default_generator;
  pthread_mutex_lock(&g->lock);
  ts_draw_mark m = {g, g->offset, g->changes, own_changes};
  pthread_mutex_unlock(&g->lock);
  return m;
}

/* This thread's changes to g since log entry `since`; -1 when the log no longer reaches back. */
static int64_t own_changes_since(const ts_generator *g, uint64_t since) {
  if (own_changes - since > OWN_LOG) return -1;
  int64_t n = 0;
  for (uint64_t i = since; i < own_changes; i++) n += own_log[i % OWN_LOG] == g;
  return n;
}

/* Back to the mark only when every change to g since was this thread's (its draws, and rewinds of
   calls nested in this one). */
void ts_draw_rewind(const ts_draw_mark *m) {
  ts_generator *g = m->g;
  pthread_mutex_lock(&g->lock);
  int64_t own = own_changes_since(g, m->own_changes);
  if (own > 0 && g->changes - m->changes == (uint64_t)own) {
    g->offset = m->offset;
    g->changes++;
    log_own_change(g);
  }
  pthread_mutex_unlock(&g->lock);
}

/* ---- drawing into tensors -------------------------------------------------------------------- */
static int check_target(const char *op, ts_tensor *t) {
  if (!t) return ts_set_error(TS_ERR_ARG, "%s: NULL tensor", op);
  if (ts_has_internal_overlap(t))
    return ts_set_error(TS_ERR_ARG, "%s: the tensor %s is a broadcast view; write to a copy", op, ts_tshape(t));
  return ts_check_inplace(op, t);
}

/* As after fill_: the new values do not depend on the old ones, so the tensor's history ends and
   tensors saved for a backward pass notice the write. */
static void after_write(ts_tensor *t) {
  ts_bump_version(t);
  if (ts_grad_mode() && t->grad_fn) {
    ts_node_release(t->grad_fn);
    t->grad_fn = NULL;
    t->requires_grad = 0;
  }
}

static int check_floating(const char *op, const ts_tensor *t) {
  if (ts_dtype_is_floating(t->dtype)) return TS_OK;
  return ts_set_error(TS_ERR_DTYPE, "%s: expected a floating-point tensor, got %s", op, ts_dtype_name(t->dtype));
}

/* Fills t from the generator's stream: directly when contiguous, else through a contiguous
   temporary, so that element i of the draw is always t's i-th element in row-major order. The
   temporary comes first: a call that fails for memory (and is retried) has not moved the stream. */
static int draw(const char *op, ts_tensor *t, int kind, double a, double b, ts_generator *g) {
  const ts_backend *be = TS_BACKEND(t->device, random, op);
  if (!be) return ts_last_status();
  int64_t n = ts_numel(t);
  if (n == 0) return TS_OK;
  ts_tensor *tmp = NULL;
  if (!ts_is_contiguous(t) && !(tmp = ts_empty(t->ndim, t->shape, t->dtype, t->device))) return ts_last_status();
  ts_draw_mark mark = ts_draw_mark_of(g);
  uint64_t seed, offset = reserve_blocks(g, n, &seed);
  int st = be->random(tmp ? tmp : t, kind, a, b, seed, offset);
  if (!st && tmp) st = ts_copy_(t, tmp);
  ts_release(tmp);
  if (st) ts_draw_rewind(&mark);
  else after_write(t);
  return st;
}

/* The largest finite magnitude of a floating dtype. */
static double float_max(int dtype) {
  switch (dtype) {
  case TS_F16: return 65504.0;
  case TS_F32: case TS_BF16: return 3.4028234663852886e38; /* bfloat16 shares float32's exponent */
  default: return INFINITY;
  }
}

int ts_uniform_(ts_tensor *t, double low, double high, ts_generator *g) {
  const char *op = "uniform_";
  if (check_target(op, t) || check_floating(op, t)) return ts_last_status();
  if (!isfinite(low) || !isfinite(high) || !isfinite(high - low))
    return ts_set_error(TS_ERR_ARG, "%s: low and high must be finite with a finite difference, got low=%g high=%g", op, low, high);
  if (low > high) return ts_set_error(TS_ERR_ARG, "%s: low (%g) must not exceed high (%g)", op, low, high);
  double lim = float_max(t->dtype);
  if (fabs(low) > lim || fabs(high) > lim)
    return ts_set_error(TS_ERR_ARG, "%s: [%g, %g) is outside the range of %s", op, low, high, ts_dtype_name(t->dtype));
  return draw(op, t, TS_RAND_UNIFORM, low, high, g);
}

int ts_normal_(ts_tensor *t, double mean, double std, ts_generator *g) {
  const char *op = "normal_";
  if (check_target(op, t) || check_floating(op, t)) return ts_last_status();
  if (!isfinite(mean)) return ts_set_error(TS_ERR_ARG, "%s: mean must be finite, got %g", op, mean);
  if (!(std >= 0) || !isfinite(std))
    return ts_set_error(TS_ERR_ARG, "%s: std must be a non-negative finite number, got %g", op, std);
  return draw(op, t, TS_RAND_NORMAL, mean, std, g);
}

int ts_bernoulli_(ts_tensor *t, double p, ts_generator *g) {
  const char *op = "bernoulli_";
  if (check_target(op, t)) return ts_last_status();
  if (!(p >= 0 && p <= 1)) return ts_set_error(TS_ERR_ARG, "%s: p must be in [0, 1], got %g", op, p);
  return draw(op, t, TS_RAND_BERNOULLI, p, 0, g);
}

/* Bounds travel to the backend as doubles, so they are kept to where doubles count exactly. */
static const int64_t EXACT_LIMIT = (int64_t)1 << 53;

/* The consecutive integers every value of dtype in [lo, hi] can hold exactly. */
static void integer_range(int dtype, int64_t *lo, int64_t *hi) {
  switch (dtype) {
  case TS_F16: *lo = -2048, *hi = 2048; break;
  case TS_BF16: *lo = -256, *hi = 256; break;
  case TS_F32: *lo = -(1 << 24), *hi = 1 << 24; break;
  case TS_I32: *lo = INT32_MIN, *hi = INT32_MAX; break;
  case TS_U8: *lo = 0, *hi = 255; break;
  case TS_BOOL: *lo = 0, *hi = 1; break;
  default: *lo = -EXACT_LIMIT, *hi = EXACT_LIMIT; break; /* float64, int64 */
  }
}

int ts_randint_(ts_tensor *t, int64_t low, int64_t high, ts_generator *g) {
  const char *op = "randint";
  if (check_target(op, t)) return ts_last_status();
  if (low >= high)
    return ts_set_error(TS_ERR_ARG, "%s: low (%lld) must be less than high (%lld)", op, (long long)low, (long long)high);
  if (low < -EXACT_LIMIT || high > EXACT_LIMIT)
    return ts_set_error(TS_ERR_ARG, "%s: bounds [%lld, %lld) reach beyond +-2^53, which is not supported", op,
                        (long long)low, (long long)high);
  if (high - low > ((int64_t)1 << 32))
    return ts_set_error(TS_ERR_ARG, "%s: the range [%lld, %lld) has %lld values; at most 2^32 are supported", op,
                        (long long)low, (long long)high, (long long)(high - low));
  int64_t lo, hi;
  integer_range(t->dtype, &lo, &hi);
  if (low < lo || high - 1 > hi)
    return ts_set_error(TS_ERR_ARG, "%s: values in [%lld, %lld) do not fit %s (it holds the integers %lld to %lld)", op,
                        (long long)low, (long long)high, ts_dtype_name(t->dtype), (long long)lo, (long long)hi);
  return draw(op, t, TS_RAND_RANDINT, (double)low, (double)high, g);
}

ts_tensor *ts_randperm(int64_t n, int dtype, ts_generator *g, ts_device dev) {
  const char *op = "randperm";
  if (n < 0) return TS_FAIL_NULL(TS_ERR_ARG, "%s: n must be non-negative, got %lld", op, (long long)n);
  if (dtype < 0 || dtype >= TS_NUM_DTYPES) return TS_FAIL_NULL(TS_ERR_DTYPE, "%s: invalid dtype %d", op, dtype);
  int64_t lo, hi;
  integer_range(dtype, &lo, &hi);
  if (n - 1 > hi)
    return TS_FAIL_NULL(TS_ERR_ARG, "%s: n = %lld does not fit %s (it holds the integers up to %lld)", op,
                        (long long)n, ts_dtype_name(dtype), (long long)hi);
  if (n == 0) return ts_empty(1, &n, dtype, dev);
  ts_tensor *keys = ts_empty(1, &n, TS_I64, dev);
  if (!keys) return NULL;
  ts_tensor *values = NULL, *order = NULL, *out = NULL;
  ts_draw_mark mark = ts_draw_mark_of(g);
  if (draw(op, keys, TS_RAND_RANDINT, 0, 4294967296.0, g) == TS_OK &&
      ts_sort(keys, 0, 0, 1, &values, &order) == TS_OK)
    out = ts_to_dtype(order, dtype);
  if (!out) ts_draw_rewind(&mark);
  ts_release(keys);
  ts_release(values);
  ts_release(order);
  return out;
}

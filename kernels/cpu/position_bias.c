/* position_bias.c — Swin's continuous relative position bias on the CPU (ts_relative_position_bias).
 *
 * For every window and query token i, one pass over the keys j computes the features
 * f[c][j] = sign(d) log(1 + |d|) of d = pos[c][j] - pos[c][i], the hidden layer
 * relu(b1 + w1 f) [P][N] and the output row out[h][i][:] = b2 + w2 hidden. The hidden layer lives
 * in a per-task scratch of P x N values and is never stored: the backward recomputes it row by row.
 *
 * Rows are cut into blocks of LANES keys and every inner loop runs over one block with the partial
 * sums in a LANES-wide local array, which the compiler keeps in vector registers (the sums over
 * the P hidden units and the H heads never go through memory). Scratch rows are padded to whole
 * blocks: padded keys have zero features and zero output gradient, so they contribute nothing.
 *
 * Work is split over windows. The weight gradients are sums over every (window, i, j): a task keeps
 * them per lane in the compute dtype and folds them into float64 after each window (a lane then sums
 * at most N²/LANES terms). The windows are cut into chunks that depend on the sizes only, each with
 * its own float64 sums, added up in chunk order: the gradients do not depend on the thread count. */
#include "cpu.h"
#include "fastmath.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { LANES = 16 };

/* One block of LANES values as a GCC vector: the block loops below are written on whole vectors,
   because GCC fully unrolls a 16-iteration loop over a local array before it would vectorize it
   and then leaves the sums carried across the outer loop in scalar registers. */
typedef float vec_f32 __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t mask_f32 __attribute__((vector_size(LANES * sizeof(float))));
typedef double vec_f64 __attribute__((vector_size(LANES * sizeof(double))));
typedef int64_t mask_f64 __attribute__((vector_size(LANES * sizeof(double))));

#define VECTOR_HELPERS(T, SUF)                                                                                   \
  static inline vec_##SUF load_##SUF(const T *p) {                                                            \
    vec_##SUF v;                                                                                              \
    memcpy(&v, p, sizeof v);                                                                                  \
    return v;                                                                                                 \
  }                                                                                                           \
  static inline void store_##SUF(T *p, vec_##SUF v) { memcpy(p, &v, sizeof v); }                             \
  static inline vec_##SUF splat_##SUF(T x) { return (vec_##SUF){0} + x; }                                    \
  /* v where keep > 0, else 0 */                                                                              \
  static inline vec_##SUF where_positive_##SUF(vec_##SUF keep, vec_##SUF v) {                                 \
    return (vec_##SUF)((mask_##SUF)v & (keep > (vec_##SUF){0}));                                              \
  }
VECTOR_HELPERS(float, f32)
VECTOR_HELPERS(double, f64)

typedef struct {
  int64_t windows, channels, tokens, hidden, heads; /* W, C, N, P, H */
  int64_t padded;                                   /* N rounded up to whole blocks of LANES */
  const char *pos, *w1, *b1, *w2, *b2, *g;          /* b1, b2 may be NULL */
  char *out;
  /* backward: gpos (NULL when not wanted) and the weight gradients' float64 sums of each of `chunks`
     chunks of windows (per chunk w1 [P][C], b1 [P], w2 [H][P], b2 [H], one after the other; NULL
     when none is wanted), added up in chunk order so that the result does not depend on threads */
  char *gpos;
  double *partial;
  int64_t chunks;
  int failed;
} pb_plan;

static int64_t sums_count(const pb_plan *p) {
  return p->hidden * p->channels + p->hidden + p->heads * p->hidden + p->heads;
}

/* Scratch values of one task: f [C][Np], a [P][Np], dh [P][Np], G [H][Np], df [Np] and the lane
   sums [sums_count][LANES]. */
static size_t scratch_count(const pb_plan *p) {
  return (size_t)((p->channels + 2 * p->hidden + p->heads + 1) * p->padded + sums_count(p) * LANES);
}

static void mark_failed(pb_plan *p) { __atomic_store_n(&p->failed, 1, __ATOMIC_RELAXED); }

/* feature(d) = sign(d) log1p(|d|), NaN kept; its derivative is 1 / (1 + |d|), 0 at d = 0 (as the
   product sign(d) · log1p(|d|) differentiates: sign'(d) = 0). */
static inline float feature_f32(float d) { return select_f32(d != d, d, copysignf(log1p_f32(fabsf(d)), d)); }
static inline double feature_f64(double d) { return d != d ? d : copysign(log1p(fabs(d)), d); }
static inline float feature_grad_f32(float d) { return select_f32(d == 0.0f, 0.0f, 1.0f / (1.0f + fabsf(d))); }
static inline double feature_grad_f64(double d) { return d == 0.0 ? 0.0 : 1.0 / (1.0 + fabs(d)); }

#define POSITION_BIAS_KERNELS(T, SUF)                                                                            \
  /* f [C][Np] (zero past N) for query i of window pos [C][N], and the hidden pre-activations a [P][Np]. */    \
  static void features_##SUF(const pb_plan *p, const T *pos, int64_t i, T *f, T *a) {                         \
    int64_t C = p->channels, N = p->tokens, Np = p->padded, P = p->hidden;                                    \
    const T *w1 = (const T *)p->w1, *b1 = (const T *)p->b1;                                                   \
    for (int64_t c = 0; c < C; c++) {                                                                         \
      const T *restrict row = pos + c * N;                                                                    \
      T *restrict fc = f + c * Np, origin = row[i];                                                           \
      for (int64_t j = 0; j < N; j++) fc[j] = feature_##SUF(row[j] - origin);                                 \
      for (int64_t j = N; j < Np; j++) fc[j] = 0;                                                             \
    }                                                                                                         \
    for (int64_t j0 = 0; j0 < Np; j0 += LANES)                                                                \
      for (int64_t q = 0; q < P; q++) {                                                                       \
        vec_##SUF acc = splat_##SUF(b1 ? b1[q] : (T)0);                                                       \
        for (int64_t c = 0; c < C; c++) acc += w1[q * C + c] * load_##SUF(f + c * Np + j0);                   \
        store_##SUF(a + q * Np + j0, acc);                                                                    \
      }                                                                                                       \
  }                                                                                                           \
  static void relu_##SUF(T *a, int64_t n) { /* n: whole blocks */                                             \
    for (int64_t k = 0; k < n; k += LANES) {                                                                  \
      vec_##SUF v = load_##SUF(a + k);                                                                        \
      store_##SUF(a + k, where_positive_##SUF(v, v));                                                         \
    }                                                                                                         \
  }                                                                                                           \
  static void forward_window_##SUF(const pb_plan *p, int64_t w, T *f, T *hid) {                               \
    int64_t C = p->channels, N = p->tokens, Np = p->padded, P = p->hidden, H = p->heads;                      \
    const T *pos = (const T *)p->pos + w * C * N, *w2 = (const T *)p->w2, *b2 = (const T *)p->b2;             \
    T *out = (T *)p->out + w * H * N * N;                                                                     \
    for (int64_t i = 0; i < N; i++) {                                                                         \
      features_##SUF(p, pos, i, f, hid);                                                                      \
      relu_##SUF(hid, P * Np);                                                                                \
      for (int64_t h = 0; h < H; h++)                                                                         \
        for (int64_t j0 = 0; j0 < Np; j0 += LANES) {                                                          \
          vec_##SUF acc = splat_##SUF(b2 ? b2[h] : (T)0);                                                     \
          for (int64_t q = 0; q < P; q++) acc += w2[h * P + q] * load_##SUF(hid + q * Np + j0);               \
          int64_t len = N - j0 < LANES ? N - j0 : LANES;                                                      \
          memcpy(out + (h * N + i) * N + j0, &acc, (size_t)len * sizeof(T));                                 \
        }                                                                                                     \
    }                                                                                                         \
  }                                                                                                           \
  /* lanes[:] += the blocks of a row a (lane_sum) or of a ∘ b (lane_dot). */                                  \
  static void lane_sum_##SUF(T *lanes, const T *a, int64_t Np) {                                              \
    vec_##SUF acc = load_##SUF(lanes);                                                                        \
    for (int64_t j0 = 0; j0 < Np; j0 += LANES) acc += load_##SUF(a + j0);                                    \
    store_##SUF(lanes, acc);                                                                                  \
  }                                                                                                           \
  static void lane_dot_##SUF(T *lanes, const T *a, const T *b, int64_t Np) {                                  \
    vec_##SUF acc = load_##SUF(lanes);                                                                        \
    for (int64_t j0 = 0; j0 < Np; j0 += LANES) acc += load_##SUF(a + j0) * load_##SUF(b + j0);               \
    store_##SUF(lanes, acc);                                                                                  \
  }                                                                                                           \
  /* dh [P][Np] = (a > 0) · w2ᵀ G for the row's output gradient G [H][Np]. */                                 \
  static void hidden_grad_##SUF(const pb_plan *p, const T *G, const T *a, T *dh) {                            \
    int64_t Np = p->padded, P = p->hidden, H = p->heads;                                                      \
    const T *w2 = (const T *)p->w2;                                                                           \
    for (int64_t j0 = 0; j0 < Np; j0 += LANES)                                                                \
      for (int64_t q = 0; q < P; q++) {                                                                       \
        vec_##SUF acc = {0};                                                                                  \
        for (int64_t h = 0; h < H; h++) acc += w2[h * P + q] * load_##SUF(G + h * Np + j0);                   \
        store_##SUF(dh + q * Np + j0, where_positive_##SUF(load_##SUF(a + q * Np + j0), acc));                \
      }                                                                                                       \
  }                                                                                                           \
  /* gpos[c][j] += df[j] f'(d) and gpos[c][i] -= Σ_j df[j] f'(d), with df = w1ᵀ dh per coordinate. */       \
  static void position_grad_##SUF(const pb_plan *p, const T *pos, int64_t i, const T *dh, T *df, T *gpos) {   \
    int64_t C = p->channels, N = p->tokens, Np = p->padded, P = p->hidden;                                    \
    const T *w1 = (const T *)p->w1;                                                                           \
    for (int64_t c = 0; c < C; c++) {                                                                         \
      for (int64_t j0 = 0; j0 < Np; j0 += LANES) {                                                            \
        vec_##SUF acc = {0};                                                                                  \
        for (int64_t q = 0; q < P; q++) acc += w1[q * C + c] * load_##SUF(dh + q * Np + j0);                  \
        store_##SUF(df + j0, acc);                                                                            \
      }                                                                                                       \
      const T *row = pos + c * N;                                                                             \
      T origin = row[i], total = 0;                                                                           \
      for (int64_t j = 0; j < N; j++) {                                                                       \
        T gd = df[j] * feature_grad_##SUF(row[j] - origin);                                                   \
        gpos[c * N + j] += gd;                                                                                \
        total += gd;                                                                                          \
      }                                                                                                       \
      gpos[c * N + i] -= total;                                                                               \
    }                                                                                                         \
  }                                                                                                           \
  /* Window w's gradients: gpos rows, and the weight gradients into the lane sums (lanes, laid out as       \
     the plan's sums, LANES each; NULL when not wanted). */                                                   \
  static void backward_window_##SUF(const pb_plan *p, int64_t w, T *scratch, T *lanes) {                      \
    int64_t C = p->channels, N = p->tokens, Np = p->padded, P = p->hidden, H = p->heads;                      \
    T *f = scratch, *a = f + C * Np, *dh = a + P * Np, *G = dh + P * Np, *df = G + H * Np;                    \
    T *l_w1 = lanes, *l_b1 = l_w1 + P * C * LANES, *l_w2 = l_b1 + P * LANES, *l_b2 = l_w2 + H * P * LANES;    \
    const T *pos = (const T *)p->pos + w * C * N, *g = (const T *)p->g + w * H * N * N;                       \
    T *gpos = p->gpos ? (T *)p->gpos + w * C * N : NULL;                                                      \
    for (int64_t i = 0; i < N; i++) {                                                                         \
      for (int64_t h = 0; h < H; h++) {                                                                       \
        memcpy(G + h * Np, g + (h * N + i) * N, (size_t)N * sizeof(T));                                       \
        for (int64_t j = N; j < Np; j++) G[h * Np + j] = 0;                                                   \
      }                                                                                                       \
      features_##SUF(p, pos, i, f, a);                                                                        \
      hidden_grad_##SUF(p, G, a, dh);                                                                         \
      if (gpos) position_grad_##SUF(p, pos, i, dh, df, gpos);                                                 \
      if (!lanes) continue;                                                                                   \
      for (int64_t q = 0; q < P; q++) {                                                                       \
        lane_sum_##SUF(l_b1 + q * LANES, dh + q * Np, Np);                                              \
        for (int64_t c = 0; c < C; c++) lane_dot_##SUF(l_w1 + (q * C + c) * LANES, dh + q * Np, f + c * Np, Np); \
      }                                                                                                       \
      relu_##SUF(a, P * Np); /* now the hidden layer */                                                       \
      for (int64_t h = 0; h < H; h++) {                                                                       \
        lane_sum_##SUF(l_b2 + h * LANES, G + h * Np, Np);                                               \
        for (int64_t q = 0; q < P; q++) lane_dot_##SUF(l_w2 + (h * P + q) * LANES, G + h * Np, a + q * Np, Np); \
      }                                                                                                       \
    }                                                                                                         \
  }                                                                                                           \
  /* Adds the lane sums into the float64 sums and clears them. */                                             \
  static void fold_lanes_##SUF(T *lanes, double *sums, int64_t count) {                                       \
    for (int64_t k = 0; k < count; k++) {                                                                     \
      double s = 0;                                                                                           \
      for (int l = 0; l < LANES; l++) s += lanes[k * LANES + l];                                              \
      sums[k] += s;                                                                                           \
    }                                                                                                         \
    memset(lanes, 0, (size_t)(count * LANES) * sizeof(T));                                                    \
  }

POSITION_BIAS_KERNELS(float, f32)
POSITION_BIAS_KERNELS(double, f64)

/* ---- tasks ------------------------------------------------------------------------------------- */
typedef struct { pb_plan *plan; int dtype; } pb_task;

static void forward_range(int64_t begin, int64_t end, void *arg) {
  pb_task *t = arg;
  pb_plan *p = t->plan;
  size_t esz = (size_t)ts_dtype_size(t->dtype);
  char *scratch = malloc(scratch_count(p) * esz);
  if (!scratch) {
    mark_failed(p);
    return;
  }
  int64_t hid = p->channels * p->padded;
  for (int64_t w = begin; w < end; w++) {
    if (t->dtype == TS_F32)
      forward_window_f32(p, w, (float *)scratch, (float *)scratch + hid);
    else
      forward_window_f64(p, w, (double *)scratch, (double *)scratch + hid);
  }
  free(scratch);
}

/* Chunks [begin, end): each chunk's windows in order, their weight sums into the chunk's partial. */
static void backward_chunks(int64_t begin, int64_t end, void *arg) {
  pb_task *t = arg;
  pb_plan *p = t->plan;
  size_t esz = (size_t)ts_dtype_size(t->dtype);
  int64_t count = sums_count(p), rows = (p->channels + 2 * p->hidden + p->heads + 1) * p->padded;
  char *scratch = calloc(scratch_count(p), esz); /* the lane sums start at zero */
  if (!scratch) {
    mark_failed(p);
    return;
  }
  for (int64_t k = begin; k < end; k++) {
    double *sums = p->partial ? p->partial + k * count : NULL;
    for (int64_t w = p->windows * k / p->chunks; w < p->windows * (k + 1) / p->chunks; w++) {
      if (t->dtype == TS_F32) {
        float *lanes = sums ? (float *)scratch + rows : NULL;
        backward_window_f32(p, w, (float *)scratch, lanes);
        if (lanes) fold_lanes_f32(lanes, sums, count);
      } else {
        double *lanes = sums ? (double *)scratch + rows : NULL;
        backward_window_f64(p, w, (double *)scratch, lanes);
        if (lanes) fold_lanes_f64(lanes, sums, count);
      }
    }
  }
  free(scratch);
}

/* ---- entry points ------------------------------------------------------------------------------ */
static void plan_init(pb_plan *p, const ts_tensor *pos, const ts_tensor *w1, const ts_tensor *b1,
                      const ts_tensor *w2) {
  memset(p, 0, sizeof *p);
  p->windows = pos->shape[0];
  p->channels = pos->shape[1];
  p->tokens = pos->shape[2];
  p->padded = (p->tokens + LANES - 1) / LANES * LANES;
  p->hidden = w1->shape[0];
  p->heads = w2->shape[0];
  p->pos = ts_elem_ptr(pos);
  p->w1 = ts_elem_ptr(w1);
  p->b1 = b1 ? ts_elem_ptr(b1) : NULL;
  p->w2 = ts_elem_ptr(w2);
}

/* Multiply-adds of one window (the hidden layer and the output layer). */
static int64_t window_work(const pb_plan *p) {
  return p->tokens * p->padded * p->hidden * (p->channels + p->heads + 1);
}

/* Windows per task: at least about 2^18 multiply-adds. */
static int64_t window_grain(const pb_plan *p) {
  double work = (double)window_work(p);
  return work >= (1 << 18) ? 1 : (int64_t)((1 << 18) / (work > 1 ? work : 1));
}

static int check_dtype(const ts_tensor *pos, const char *op) {
  if (pos->dtype == TS_F32 || pos->dtype == TS_F64) return TS_OK;
  return ts_set_error(TS_ERR_DTYPE, "%s: the CPU kernel computes in float32 or float64, got %s", op,
                      ts_dtype_name(pos->dtype));
}

int cpu_position_bias(ts_tensor *out, const ts_tensor *pos, const ts_tensor *w1, const ts_tensor *b1,
                      const ts_tensor *w2, const ts_tensor *b2) {
  if (check_dtype(pos, "relative_position_bias")) return ts_last_status();
  pb_plan p;
  plan_init(&p, pos, w1, b1, w2);
  p.b2 = b2 ? ts_elem_ptr(b2) : NULL;
  p.out = ts_elem_ptr(out);
  pb_task t = {&p, pos->dtype};
  ts_parallel_for(p.windows, window_grain(&p), forward_range, &t);
  if (p.failed) return ts_set_error(TS_ERR_MEMORY, "relative_position_bias: out of memory for a worker's scratch rows");
  return TS_OK;
}

/* Writes the chunks' float64 sums, added in chunk order, into the weight gradients that are wanted
   (w1, b1, w2, b2 in turn). */
static void store_sums(const pb_plan *p, ts_tensor *const outs[4], const int64_t counts[4]) {
  int64_t first = 0;
  for (int k = 0; k < 4; first += counts[k], k++)
    if (outs[k])
      cpu_combine_chunks(ts_elem_ptr(outs[k]), outs[k]->dtype == TS_F64, p->partial, p->chunks, sums_count(p), first,
                         counts[k]);
}

int cpu_position_bias_backward(ts_tensor *gpos, ts_tensor *gw1, ts_tensor *gb1, ts_tensor *gw2, ts_tensor *gb2,
                               const ts_tensor *g, const ts_tensor *pos, const ts_tensor *w1, const ts_tensor *b1,
                               const ts_tensor *w2) {
  const char *op = "relative_position_bias backward";
  if (check_dtype(pos, op)) return ts_last_status();
  pb_plan p;
  plan_init(&p, pos, w1, b1, w2);
  p.g = ts_elem_ptr(g);
  p.gpos = gpos ? ts_elem_ptr(gpos) : NULL;
  if (gpos) memset(p.gpos, 0, (size_t)ts_numel(gpos) * (size_t)ts_dtype_size(gpos->dtype));
  p.chunks = cpu_row_chunks(p.windows, window_work(&p));
  if ((gw1 || gb1 || gw2 || gb2) && !(p.partial = calloc((size_t)(p.chunks * sums_count(&p)), sizeof(double))))
    return ts_set_error(TS_ERR_MEMORY, "%s: out of memory for the weight gradients", op);
  pb_task t = {&p, pos->dtype};
  ts_parallel_for(p.chunks, 1, backward_chunks, &t);
  if (!p.failed && p.partial) {
    ts_tensor *outs[4] = {gw1, gb1, gw2, gb2};
    int64_t counts[4] = {p.hidden * p.channels, p.hidden, p.heads * p.hidden, p.heads};
    store_sums(&p, outs, counts);
  }
  free(p.partial);
  if (p.failed) return ts_set_error(TS_ERR_MEMORY, "%s: out of memory for a worker's scratch rows", op);
  return TS_OK;
}

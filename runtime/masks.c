/* masks.c — patch masks for masked image modeling and UM-MAE's compaction of masked token grids.
 *
 * Masks are small uint8 tables [N, L] made on the host: 1 = removed, 0 = visible, patches numbered
 * row-major on an h x w grid. Their randomness is a draw from a generator's Philox stream (the
 * public ts_randint_/ts_uniform_, so the definitions in tessera.h hold on every device); the rest
 * is selection over those numbers, done here per image.
 *
 * ts_uniform_compact gathers, for every 2x2 group of patches, the single visible patch's block of
 * tokens into a half-side map (the official code's all-ones dilated depthwise convolution sums one
 * kept block with three zero blocks, so a plain gather is bit-identical). The runtime reads the
 * mask once, checks it and hands the backend a table of kept patch indices. */
#include "autograd.h"
#include "backend.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Allocation sizes: malloc(0) may return NULL, which would read as out of memory. */
static size_t at_least_one(int64_t count) { return count > 0 ? (size_t)count : 1; }

/* Every mask here is one byte per patch on the CPU. */
static ts_tensor *new_mask_tensor(int64_t n, int64_t l, double fill) {
  int64_t shape[2] = {n, l};
  return ts_full(2, shape, fill, TS_U8, ts_cpu());
}

static uint8_t *bytes_of(ts_tensor *t) { return (uint8_t *)ts_data_ptr(t); }

static int check_count(const char *op, const char *what, int64_t v) {
  if (v < 0) return ts_set_error(TS_ERR_ARG, "%s: %s must be non-negative, got %lld", op, what, (long long)v);
  return TS_OK;
}

static int check_ratio(const char *op, double ratio) {
  if (!(ratio >= 0 && ratio <= 1)) return ts_set_error(TS_ERR_ARG, "%s: ratio must be in [0, 1], got %g", op, ratio);
  return TS_OK;
}

/* ---- drawing --------------------------------------------------------------------------------- */
/* An int64 [rows, cols] draw of randint over [0, range) from g (range 2^32: the raw lanes). */
static ts_tensor *draw_integers(int64_t rows, int64_t cols, int64_t range, ts_generator *g) {
  int64_t shape[2] = {rows, cols};
  ts_tensor *t = ts_empty(2, shape, TS_I64, ts_cpu());
  if (t && ts_randint_(t, 0, range, g)) {
    ts_release(t);
    return NULL;
  }
  return t;
}

static const int64_t LANE_RANGE = (int64_t)1 << 32;

/* ---- selecting the smallest keys of each row ------------------------------------------------- */
typedef struct { double key; int64_t index; } keyed;

static int by_key_then_index(const void *pa, const void *pb) {
  const keyed *a = pa, *b = pb;
  if (a->key != b->key) return a->key < b->key ? -1 : 1;
  return (a->index > b->index) - (a->index < b->index);
}

/* Row r of out [rows, cols] gets `chosen` at the `count` entries with the smallest keys (ties:
   the lower index first, as a stable sort) and 1 - chosen elsewhere. keys: [rows, cols] doubles. */
typedef struct {
  const double *keys;
  uint8_t *out;
  int64_t cols, count;
  uint8_t chosen;
  int failed;
} select_ctx;

static void select_rows(int64_t begin, int64_t end, void *arg) {
  select_ctx *c = arg;
  keyed *order = malloc(at_least_one(c->cols) * sizeof *order);
  if (!order) {
    __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
    return;
  }
  for (int64_t r = begin; r < end; r++) {
    const double *k = c->keys + r * c->cols;
    uint8_t *o = c->out + r * c->cols;
    for (int64_t j = 0; j < c->cols; j++) order[j] = (keyed){k[j], j};
    qsort(order, (size_t)c->cols, sizeof *order, by_key_then_index);
    memset(o, 1 - c->chosen, (size_t)c->cols);
    for (int64_t j = 0; j < c->count; j++) o[order[j].index] = c->chosen;
  }
  free(order);
}

static ts_tensor *select_smallest(const char *op, const double *keys, int64_t rows, int64_t cols, int64_t count,
                                  uint8_t chosen) {
  ts_tensor *out = new_mask_tensor(rows, cols, 0);
  if (!out) return NULL;
  select_ctx c = {keys, bytes_of(out), cols, count, chosen, 0};
  ts_parallel_for(rows, cols > 0 ? 1 + 4096 / cols : 4096, select_rows, &c);
  if (c.failed) {
    ts_release(out);
    return TS_FAIL_NULL(TS_ERR_MEMORY, "%s: out of host memory sorting %lld keys per image", op, (long long)cols);
  }
  return out;
}

/* A host copy of t's values as doubles, in row-major order (caller frees). */
static double *host_doubles(const char *op, ts_tensor *t) {
  int64_t n = ts_numel(t);
  double *buf = malloc(at_least_one(n) * sizeof(double));
  if (!buf) {
    ts_set_error(TS_ERR_MEMORY, "%s: out of host memory for %lld values", op, (long long)n);
    return NULL;
  }
  ts_tensor *f = ts_to_dtype(t, TS_F64);
  int st = f ? ts_to_host(f, buf, (size_t)n * sizeof(double)) : ts_last_status();
  ts_release(f);
  if (st) {
    free(buf);
    return NULL;
  }
  return buf;
}

/* ---- random sampling (MAE) ------------------------------------------------------------------- */
static ts_tensor *random_from_keys(const char *op, const double *keys, int64_t n, int64_t l, double ratio) {
  int64_t keep = (int64_t)((double)l * (1.0 - ratio)); /* Python's int(L * (1 - ratio)) */
  return select_smallest(op, keys, n, l, keep, 0);
}

ts_tensor *ts_mask_from_noise(ts_tensor *noise, double ratio) {
  const char *op = "mask_from_noise";
  if (!noise) return TS_FAIL_NULL(TS_ERR_ARG, "%s: noise is NULL", op);
  if (check_ratio(op, ratio)) return NULL;
  if (noise->ndim != 2)
    return TS_FAIL_NULL(TS_ERR_SHAPE, "%s: noise must be 2-D [N, L], got %s", op, ts_tshape(noise));
  if (noise->dtype == TS_BOOL)
    return TS_FAIL_NULL(TS_ERR_DTYPE, "%s: noise must hold numbers, got a bool tensor", op);
  int previous = ts_set_grad_enabled(0);
  double *keys = host_doubles(op, noise);
  ts_tensor *out = NULL;
  if (keys) {
    int64_t n = noise->shape[0], l = noise->shape[1], bad = -1;
    for (int64_t i = 0; i < n * l && bad < 0; i++)
      if (isnan(keys[i])) bad = i;
    if (bad >= 0)
      ts_set_error(TS_ERR_ARG, "%s: noise %s holds NaN (image %lld, patch %lld)", op, ts_tshape(noise),
                   (long long)(bad / l), (long long)(bad % l));
    else
      out = random_from_keys(op, keys, n, l, ratio);
  }
  free(keys);
  ts_set_grad_enabled(previous);
  return out;
}

static ts_tensor *random_mask(int64_t n, int64_t h, int64_t w, double ratio, ts_generator *g) {
  const char *op = "mask_generate(random)";
  if (check_ratio(op, ratio)) return NULL;
  ts_tensor *lanes = draw_integers(n, h * w, LANE_RANGE, g);
  if (!lanes) return NULL;
  double *keys = host_doubles(op, lanes);
  ts_release(lanes);
  ts_tensor *out = keys ? random_from_keys(op, keys, n, h * w, ratio) : NULL;
  free(keys);
  return out;
}

/* ---- grid-wise and uniform sampling: one kept position per 2x2 group ------------------------- */
/* pos: per image (per_group = 0) or per group (per_group = 1) a value v in [0, 4); the group keeps
   its patch (2gy + v/2, 2gx + v%2). */
static ts_tensor *mask_from_positions(const int64_t *pos, int64_t n, int64_t h, int64_t w, int per_group) {
  ts_tensor *out = new_mask_tensor(n, h * w, 1);
  if (!out) return NULL;
  uint8_t *m = bytes_of(out);
  int64_t gh = h / 2, gw = w / 2;
  for (int64_t i = 0; i < n; i++)
    for (int64_t gy = 0; gy < gh; gy++)
      for (int64_t gx = 0; gx < gw; gx++) {
        int64_t v = per_group ? pos[(i * gh + gy) * gw + gx] : pos[i];
        m[i * h * w + (2 * gy + v / 2) * w + 2 * gx + v % 2] = 0;
      }
  return out;
}

/* Uniform sampling as the official generator does it: each image's groups take their kept positions
   without replacement from a pool holding `per_position` of each of the four (the official code
   shuffles such a pool and keeps its first G entries), so every image keeps nearly as many patches
   at each position. Group g takes the r-th entry still in the pool (entries ordered by position),
   r = floor(lane * remaining / 2^32) from its raw 32-bit lane; lanes becomes the positions. */
static void draw_from_pool(int64_t *lanes, int64_t n, int64_t groups, int64_t per_position) {
  for (int64_t i = 0; i < n; i++) {
    int64_t left[4] = {per_position, per_position, per_position, per_position}, remaining = 4 * per_position;
    for (int64_t k = 0; k < groups; k++, remaining--) {
      int64_t *v = &lanes[i * groups + k];
      int64_t r = (int64_t)(((uint64_t)*v * (uint64_t)remaining) >> 32), p = 0;
      while (r >= left[p]) r -= left[p++];
      left[p]--;
      *v = p;
    }
  }
}

static ts_tensor *group_mask(int kind, int64_t n, int64_t h, int64_t w, double ratio, ts_generator *g) {
  const char *op = kind == TS_MASK_GRID ? "mask_generate(grid)" : "mask_generate(uniform)";
  if (ratio != 0.75)
    return TS_FAIL_NULL(TS_ERR_ARG, "%s: keeps one patch of every 2x2 group, so its ratio is 0.75; got %g", op, ratio);
  if (h % 2 || w % 2)
    return TS_FAIL_NULL(TS_ERR_SHAPE, "%s: the %lld x %lld patch grid must have even sides to split into 2x2 groups",
                        op, (long long)h, (long long)w);
  int per_group = kind == TS_MASK_UNIFORM;
  /* the official pool: four candidates at a time until it holds at least two per group */
  int64_t groups = (h / 2) * (w / 2), per_position = h * w / 8 + (h * w % 8 != 0);
  if (per_group && 4 * per_position > (int64_t)UINT32_MAX)
    return TS_FAIL_NULL(TS_ERR_SHAPE, "%s: a %lld x %lld grid is too large", op, (long long)h, (long long)w);
  ts_tensor *draw = per_group ? draw_integers(n, groups, LANE_RANGE, g) : draw_integers(n, 1, 4, g);
  if (!draw) return NULL;
  if (per_group) draw_from_pool(ts_data_ptr(draw), n, groups, per_position);
  ts_tensor *out = mask_from_positions(ts_data_ptr(draw), n, h, w, per_group);
  ts_release(draw);
  return out;
}

ts_tensor *ts_mask_generate(int kind, int64_t n, int64_t h, int64_t w, double ratio, ts_generator *g) {
  const char *op = "mask_generate";
  if (check_count(op, "n", n) || check_count(op, "h", h) || check_count(op, "w", w)) return NULL;
  if (h && w > INT64_MAX / h) return TS_FAIL_NULL(TS_ERR_SHAPE, "%s: a %lld x %lld grid is too large", op, (long long)h, (long long)w);
  int previous = ts_set_grad_enabled(0);
  ts_tensor *out = NULL;
  switch (kind) {
  case TS_MASK_RANDOM: out = random_mask(n, h, w, ratio, g); break;
  case TS_MASK_GRID:
  case TS_MASK_UNIFORM: out = group_mask(kind, n, h, w, ratio, g); break;
  default: ts_set_error(TS_ERR_ARG, "%s: unknown mask kind %d (TS_MASK_RANDOM, TS_MASK_GRID, TS_MASK_UNIFORM)", op, kind);
  }
  ts_set_grad_enabled(previous);
  return out;
}

/* ---- SimMIM ---------------------------------------------------------------------------------- */
static int check_simmim(int64_t n, int64_t input_size, int64_t mask_patch, int64_t model_patch, double ratio) {
  const char *op = "mask_simmim";
  if (check_count(op, "n", n) || check_ratio(op, ratio)) return ts_last_status();
  if (input_size <= 0 || mask_patch <= 0 || model_patch <= 0)
    return ts_set_error(TS_ERR_ARG, "%s: input_size (%lld), mask_patch_size (%lld) and model_patch_size (%lld) must be positive",
                        op, (long long)input_size, (long long)mask_patch, (long long)model_patch);
  if (input_size % mask_patch)
    return ts_set_error(TS_ERR_ARG, "%s: input_size %lld is not a multiple of mask_patch_size %lld", op,
                        (long long)input_size, (long long)mask_patch);
  if (mask_patch % model_patch)
    return ts_set_error(TS_ERR_ARG, "%s: mask_patch_size %lld is not a multiple of model_patch_size %lld", op,
                        (long long)mask_patch, (long long)model_patch);
  if (input_size / model_patch > (int64_t)1 << 24)
    return ts_set_error(TS_ERR_ARG, "%s: a %lld-patch side is too large", op, (long long)(input_size / model_patch));
  return TS_OK;
}

ts_tensor *ts_mask_simmim(int64_t n, int64_t input_size, int64_t mask_patch_size, int64_t model_patch_size, double ratio,
                          ts_generator *g) {
  const char *op = "mask_simmim";
  if (check_simmim(n, input_size, mask_patch_size, model_patch_size, ratio)) return NULL;
  int64_t rand_size = input_size / mask_patch_size, scale = mask_patch_size / model_patch_size;
  int64_t count = rand_size * rand_size, masked = (int64_t)ceil((double)count * ratio); /* np.ceil */
  int previous = ts_set_grad_enabled(0);
  ts_tensor *lanes = draw_integers(n, count, LANE_RANGE, g), *coarse = NULL, *out = NULL;
  double *keys = lanes ? host_doubles(op, lanes) : NULL;
  /* the first `masked` entries of a random permutation: the smallest keys, as randperm orders them */
  if (keys) coarse = select_smallest(op, keys, n, count, masked, 1);
  int64_t side = rand_size * scale;
  if (coarse) out = new_mask_tensor(n, side * side, 0);
  if (out) {
    const uint8_t *c = bytes_of(coarse);
    uint8_t *m = bytes_of(out);
    for (int64_t i = 0; i < n; i++)
      for (int64_t y = 0; y < side; y++)
        for (int64_t x = 0; x < side; x++)
          m[(i * side + y) * side + x] = c[(i * rand_size + y / scale) * rand_size + x / scale];
  }
  free(keys);
  ts_release(lanes);
  ts_release(coarse);
  ts_set_grad_enabled(previous);
  return out;
}

/* ---- secondary masking (UM-MAE) -------------------------------------------------------------- */
/* The primary mask as host bytes with its per-image visible count, which must be the same in
   every image (the official code takes it from image 0 for the whole batch). */
static uint8_t *read_primary(const char *op, ts_tensor *mask, int64_t *visible) {
  if (!mask) return (void)ts_set_error(TS_ERR_ARG, "%s: mask is NULL", op), NULL;
  if (mask->ndim != 2) return (void)ts_set_error(TS_ERR_SHAPE, "%s: mask must be 2-D [N, L], got %s", op, ts_tshape(mask)), NULL;
  if (ts_dtype_is_floating(mask->dtype))
    return (void)ts_set_error(TS_ERR_DTYPE, "%s: mask must be uint8 or bool (1 = removed), got %s", op,
                              ts_dtype_name(mask->dtype)), NULL;
  int64_t n = mask->shape[0], l = mask->shape[1];
  double *v = host_doubles(op, mask);
  uint8_t *m = v ? malloc(at_least_one(n * l)) : NULL;
  if (v && !m) ts_set_error(TS_ERR_MEMORY, "%s: out of host memory", op);
  for (int64_t i = 0; m && i < n; i++) {
    int64_t vis = 0;
    for (int64_t j = 0; j < l; j++) {
      double x = v[i * l + j];
      if (x != 0 && x != 1) {
        ts_set_error(TS_ERR_ARG, "%s: mask values must be 0 (visible) or 1 (removed); image %lld, patch %lld holds %g",
                     op, (long long)i, (long long)j, x);
        goto fail;
      }
      m[i * l + j] = (uint8_t)x;
      vis += x == 0;
    }
    if (i == 0) *visible = vis;
    if (vis != *visible) {
      ts_set_error(TS_ERR_ARG, "%s: every image must have the same number of visible patches; image 0 has %lld, "
                   "image %lld has %lld", op, (long long)*visible, (long long)i, (long long)vis);
      goto fail;
    }
  }
  if (n == 0) *visible = l;
  free(v);
  return m;
fail:
  free(v);
  free(m);
  return NULL;
}

/* The noise as host doubles: given ([N, cols], floating, in [0, 1) when `unit`), or drawn as
   float32 uniform [0, 1) from g. */
static double *secondary_noise(const char *op, ts_tensor *noise, int64_t n, int64_t cols, int unit, ts_generator *g) {
  if (!noise) {
    int64_t shape[2] = {n, cols};
    ts_tensor *drawn = ts_empty(2, shape, TS_F32, ts_cpu());
    double *v = drawn && !ts_uniform_(drawn, 0, 1, g) ? host_doubles(op, drawn) : NULL;
    ts_release(drawn);
    return v;
  }
  if (!ts_dtype_is_floating(noise->dtype))
    return (void)ts_set_error(TS_ERR_DTYPE, "%s: noise must be floating point, got %s", op, ts_dtype_name(noise->dtype)), NULL;
  if (noise->ndim != 2 || noise->shape[0] != n || noise->shape[1] != cols)
    return (void)ts_set_error(TS_ERR_SHAPE, "%s: noise must be [%lld, %lld] (%s), got %s", op, (long long)n, (long long)cols,
                              unit ? "one value per patch" : "one value per visible patch", ts_tshape(noise)), NULL;
  double *v = host_doubles(op, noise);
  for (int64_t i = 0; v && i < n * cols; i++)
    if (isnan(v[i]) || (unit && !(v[i] >= 0 && v[i] < 1))) {
      ts_set_error(TS_ERR_ARG, "%s: noise values must be %s; image %lld, entry %lld holds %g", op,
                   unit ? "in [0, 1)" : "numbers (not NaN)", (long long)(i / cols), (long long)(i % cols), v[i]);
      free(v);
      return NULL;
    }
  return v;
}

/* Swin/PVT: sort all patches by mask + noise; the first K have new_mask 0. With noise in [0, 1),
   that is: the K visible patches with the smallest noise stay. */
static ts_tensor *secondary_swin(const char *op, const uint8_t *m, const double *noise, int64_t n, int64_t l, int64_t keep) {
  double *keys = malloc(at_least_one(n * l) * sizeof(double));
  if (!keys) return TS_FAIL_NULL(TS_ERR_MEMORY, "%s: out of host memory", op);
  for (int64_t i = 0; i < n * l; i++) keys[i] = m[i] + noise[i];
  ts_tensor *out = select_smallest(op, keys, n, l, keep, 0);
  free(keys);
  return out;
}

/* ViT: with P the stable ascending argsort of a noise row, visible token j is replaced iff P[j] >= K
   (the official gather of [0]*K + [1]*(V-K) at ids = argsort(noise)). */
static ts_tensor *secondary_vit(const char *op, const uint8_t *m, const double *noise, int64_t n, int64_t l, int64_t v,
                                int64_t keep) {
  ts_tensor *out = new_mask_tensor(n, l, 1);
  keyed *order = out ? malloc(at_least_one(v) * sizeof *order) : NULL;
  if (out && !order) ts_set_error(TS_ERR_MEMORY, "%s: out of host memory", op);
  if (!order) {
    ts_release(out);
    return NULL;
  }
  uint8_t *o = bytes_of(out);
  for (int64_t i = 0; i < n; i++) {
    for (int64_t j = 0; j < v; j++) order[j] = (keyed){noise[i * v + j], j};
    qsort(order, (size_t)v, sizeof *order, by_key_then_index);
    int64_t j = 0; /* j-th visible patch in raster order gets P[j] = order[j].index */
    for (int64_t p = 0; p < l; p++)
      if (!m[i * l + p]) o[i * l + p] = order[j++].index >= keep;
  }
  free(order);
  return out;
}

/* vis_mask [N, V]: new_mask at the visible patches of the primary mask, in raster order. */
static ts_tensor *visible_part(const uint8_t *m, ts_tensor *new_mask, int64_t n, int64_t l, int64_t v) {
  ts_tensor *out = new_mask_tensor(n, v, 0);
  if (!out) return NULL;
  const uint8_t *nm = bytes_of(new_mask);
  uint8_t *o = bytes_of(out);
  for (int64_t i = 0; i < n; i++)
    for (int64_t p = 0, j = 0; p < l; p++)
      if (!m[i * l + p]) o[i * v + j++] = nm[i * l + p];
  return out;
}

int ts_mask_secondary(ts_tensor *mask, ts_tensor *noise, double ratio, int formula, ts_generator *g,
                      ts_tensor **new_mask, ts_tensor **vis_mask) {
  const char *op = formula == TS_SECONDARY_VIT ? "mask_secondary(vit)" : "mask_secondary(swin)";
  if (!new_mask) return ts_set_error(TS_ERR_ARG, "%s: the new_mask out-pointer must not be NULL", op);
  *new_mask = NULL;
  if (vis_mask) *vis_mask = NULL;
  if (formula != TS_SECONDARY_SWIN && formula != TS_SECONDARY_VIT)
    return ts_set_error(TS_ERR_ARG, "mask_secondary: unknown formula %d (TS_SECONDARY_SWIN, TS_SECONDARY_VIT)", formula);
  if (check_ratio(op, ratio)) return ts_last_status();
  int previous = ts_set_grad_enabled(0);
  int64_t v = 0;
  uint8_t *m = read_primary(op, mask, &v);
  double *z = NULL;
  if (m) {
    int64_t n = mask->shape[0], l = mask->shape[1];
    int64_t keep = (int64_t)((double)v * (1.0 - ratio)); /* Python's int(V * (1 - ratio)) */
    int vit = formula == TS_SECONDARY_VIT;
    z = secondary_noise(op, noise, n, vit ? v : l, !vit, g);
    if (z) *new_mask = vit ? secondary_vit(op, m, z, n, l, v, keep) : secondary_swin(op, m, z, n, l, keep);
    if (*new_mask && vis_mask && !(*vis_mask = visible_part(m, *new_mask, n, l, v))) {
      ts_release(*new_mask);
      *new_mask = NULL;
    }
  }
  free(m);
  free(z);
  ts_set_grad_enabled(previous);
  return *new_mask ? TS_OK : ts_last_status();
}

/* ---- uniform compaction ---------------------------------------------------------------------- */
static int check_compact(const char *op, const ts_tensor *x, const ts_tensor *mask, int64_t p) {
  if (!x || !mask) return ts_set_error(TS_ERR_ARG, "%s: %s is NULL", op, x ? "mask" : "x");
  if (x->ndim != 4)
    return ts_set_error(TS_ERR_SHAPE, "%s: x must be a channels-last token grid [N, H, W, C], got %s", op, ts_tshape(x));
  if (ts_dtype_is_floating(mask->dtype))
    return ts_set_error(TS_ERR_DTYPE, "%s: mask must be uint8 or bool (1 = removed), got %s", op, ts_dtype_name(mask->dtype));
  /* masks are made on the host: a CPU mask serves x on any device (it is read on the host anyway) */
  if (mask->device.type != TS_CPU && ts_same_device(op, x, mask)) return ts_last_status();
  if (p < 1) return ts_set_error(TS_ERR_ARG, "%s: patch_tokens must be positive, got %lld", op, (long long)p);
  int64_t h = x->shape[1], w = x->shape[2];
  if (h % (2 * p) || w % (2 * p))
    return ts_set_error(TS_ERR_SHAPE, "%s: the %lld x %lld token grid of x %s does not split into 2x2 groups of "
                        "%lld x %lld-token patches (both sides must be multiples of %lld)", op, (long long)h, (long long)w,
                        ts_tshape(x), (long long)p, (long long)p, (long long)(2 * p));
  int64_t patches = (h / p) * (w / p);
  if (mask->ndim != 2 || mask->shape[0] != x->shape[0] || mask->shape[1] != patches)
    return ts_set_error(TS_ERR_SHAPE, "%s: mask must be [%lld, %lld] for x %s (a %lld x %lld patch grid), got %s", op,
                        (long long)x->shape[0], (long long)patches, ts_tshape(x), (long long)(h / p), (long long)(w / p),
                        ts_tshape(mask));
  return TS_OK;
}

/* src [N, G] int64 on x's device: the visible patch of every group, checked to be exactly one. */
static ts_tensor *kept_patches(const char *op, ts_tensor *mask, int64_t hp, int64_t wp, ts_device dev) {
  int64_t n = mask->shape[0], gw = wp / 2, groups = (hp / 2) * gw;
  double *v = host_doubles(op, mask);
  int64_t *src = v ? malloc(at_least_one(n * groups) * sizeof(int64_t)) : NULL;
  if (v && !src) ts_set_error(TS_ERR_MEMORY, "%s: out of host memory", op);
  for (int64_t i = 0; src && i < n; i++)
    for (int64_t g = 0; g < groups; g++) {
      int64_t gy = g / gw, gx = g % gw, visible = 0, kept = -1;
      for (int d = 0; d < 4; d++) {
        int64_t patch = (2 * gy + d / 2) * wp + 2 * gx + d % 2;
        if (v[i * hp * wp + patch] == 0) visible++, kept = patch;
      }
      if (visible != 1) {
        ts_set_error(TS_ERR_ARG, "%s: image %lld, group (%lld, %lld) (patches %lld, %lld, %lld, %lld) has %lld visible "
                     "patches; uniform masking keeps exactly one per 2x2 group", op, (long long)i, (long long)gy,
                     (long long)gx, (long long)((2 * gy) * wp + 2 * gx), (long long)((2 * gy) * wp + 2 * gx + 1),
                     (long long)((2 * gy + 1) * wp + 2 * gx), (long long)((2 * gy + 1) * wp + 2 * gx + 1), (long long)visible);
        free(src);
        src = NULL;
        break;
      }
      src[i * groups + g] = kept;
    }
  int64_t shape[2] = {n, groups};
  ts_tensor *out = src ? ts_from_host(2, shape, TS_I64, src, dev) : NULL;
  free(v);
  free(src);
  return out;
}

static int compact_backward(ts_node *n, ts_tensor *g, ts_tensor **grads) {
  ts_tensor *src = ts_node_saved(n, 0);
  if (!src) return ts_last_status();
  const ts_edge *e = ts_node_input(n, 0);
  const ts_backend *be = ts_backend_for(g->device);
  if (!be || TS_BACKEND_FN(be, uniform_compact_backward, "uniform_compact backward", g->device)) return ts_last_status();
  ts_scope s = {0};
  ts_tensor *cast = ts_s_cast(&s, g, e->dtype);
  ts_tensor *gc = s.failed ? NULL : ts_scope_keep(&s, ts_contiguous(cast));
  ts_tensor *gx = s.failed ? NULL : ts_scope_keep(&s, ts_empty(e->ndim, e->shape, e->dtype, g->device));
  if (gx && be->uniform_compact_backward(gx, gc, src, n->i[0])) s.failed = 1;
  if (!s.failed && ts_set_input_grad(n, 0, gx, grads)) s.failed = 1;
  return ts_scope_close(&s);
}

ts_tensor *ts_uniform_compact(ts_tensor *x, ts_tensor *mask, int64_t patch_tokens) {
  const char *op = "uniform_compact";
  if (check_compact(op, x, mask, patch_tokens)) return NULL;
  const ts_backend *be = ts_backend_for(x->device);
  if (!be || TS_BACKEND_FN(be, uniform_compact, op, x->device)) return NULL;
  int64_t p = patch_tokens, shape[4] = {x->shape[0], x->shape[1] / 2, x->shape[2] / 2, x->shape[3]};
  int previous = ts_set_grad_enabled(0);
  ts_tensor *src = kept_patches(op, mask, x->shape[1] / p, x->shape[2] / p, x->device);
  ts_tensor *xc = src ? ts_contiguous(x) : NULL;
  ts_tensor *out = xc ? ts_empty(4, shape, x->dtype, x->device) : NULL;
  if (out && be->uniform_compact(out, xc, src, p)) {
    ts_release(out);
    out = NULL;
  }
  ts_release(xc);
  ts_set_grad_enabled(previous);
  ts_node *n = out ? ts_grad_node(op, compact_backward, 1, &x) : NULL;
  if (n) n->i[0] = p;
  out = ts_node_finish_saving(n, out, 1, &src);
  ts_release(src);
  return out;
}

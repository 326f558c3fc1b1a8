/* masks.c — patch masks for masked image modeling and UM-MAE's compaction of masked token grids.
 *
 * Masks are small uint8 tables [N, L]: 1 = removed, 0 = visible, patches numbered row-major on an
 * h x w grid. Their randomness is a draw from a generator's Philox stream (the public ts_randint_/
 * ts_uniform_, whose definitions in tessera.h hold on every device); the rest is selection over
 * those numbers. Generated masks are made on the device asked for, from device-generic ops (a
 * stable sort and a scatter pick each row's smallest keys) and the backend's group_mask kernel, so
 * one generator state gives the same bytes on the CPU and on a GPU. Secondary masking and
 * compaction read their primary mask on the host, where it is checked.
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

/* Every mask here is one byte per patch. */
static ts_tensor *new_mask_tensor(int64_t n, int64_t l, double fill, ts_device dev) {
  int64_t shape[2] = {n, l};
  return ts_full(2, shape, fill, TS_U8, dev);
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
/* An int64 [rows, cols] draw of randint over [0, range) from g on dev (range 2^32: the raw lanes). */
static ts_tensor *draw_integers(int64_t rows, int64_t cols, int64_t range, ts_generator *g, ts_device dev) {
  int64_t shape[2] = {rows, cols};
  ts_tensor *t = ts_empty(2, shape, TS_I64, dev);
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

/* uint8 [rows, cols] on keys' device: `chosen` at the `count` smallest keys of each row (ties: the
   lower index first, as a stable sort orders them) and 1 - chosen elsewhere. keys: real [rows, cols]. */
static ts_tensor *select_smallest(ts_tensor *keys, int64_t count, uint8_t chosen) {
  int64_t rows = keys->shape[0], cols = keys->shape[1], marked[2] = {rows, count};
  ts_tensor *sorted = NULL, *order = NULL;
  if (ts_sort(keys, 1, 0, 1, &sorted, &order)) return NULL;
  ts_release(sorted);
  ts_scope s = {0};
  ts_tensor *first = ts_scope_keep(&s, ts_narrow(order, 1, 0, count));
  ts_tensor *marks = s.failed ? NULL : ts_scope_keep(&s, ts_full(2, marked, chosen, TS_U8, keys->device));
  ts_tensor *out = s.failed ? NULL : new_mask_tensor(rows, cols, 1 - chosen, keys->device);
  if (out && ts_scatter_(out, 1, first, marks, TS_SCATTER_REPLACE)) {
    ts_release(out);
    out = NULL;
  }
  ts_release(order);
  ts_scope_close(&s);
  return out;
}

/* A host copy of t's values as doubles, in row-major order (caller frees). */
static double *host_doubles(const char *op, ts_tensor *t) {
  int64_t n = ts_numel(t);
  double *buf = malloc(ts_at_least_one(n) * sizeof(double));
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
/* Python's int(L * (1 - ratio)) */
static int64_t random_keep(int64_t l, double ratio) { return (int64_t)((double)l * (1.0 - ratio)); }

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
      out = select_smallest(noise, random_keep(l, ratio), 0);
  }
  free(keys);
  ts_set_grad_enabled(previous);
  return out;
}

static ts_tensor *random_mask(int64_t n, int64_t h, int64_t w, double ratio, ts_generator *g, ts_device dev) {
  if (check_ratio("mask_generate(random)", ratio)) return NULL;
  ts_tensor *lanes = draw_integers(n, h * w, LANE_RANGE, g, dev);
  ts_tensor *out = lanes ? select_smallest(lanes, random_keep(h * w, ratio), 0) : NULL;
  ts_release(lanes);
  return out;
}

/* ---- grid-wise and uniform sampling: one kept position per 2x2 group ------------------------- */
static ts_tensor *group_mask(int kind, int64_t n, int64_t h, int64_t w, double ratio, ts_generator *g, ts_device dev) {
  const char *op = kind == TS_MASK_GRID ? "mask_generate(grid)" : "mask_generate(uniform)";
  if (ratio != 0.75)
    return TS_FAIL_NULL(TS_ERR_ARG, "%s: keeps one patch of every 2x2 group, so its ratio is 0.75; got %g", op, ratio);
  if (h % 2 || w % 2)
    return TS_FAIL_NULL(TS_ERR_SHAPE, "%s: the %lld x %lld patch grid must have even sides to split into 2x2 groups",
                        op, (long long)h, (long long)w);
  const ts_backend *be = TS_BACKEND(dev, group_mask, op);
  if (!be) return NULL;
  int per_group = kind == TS_MASK_UNIFORM;
  /* the official pool: four candidates at a time until it holds at least two per group */
  int64_t groups = (h / 2) * (w / 2), per_position = per_group ? h * w / 8 + (h * w % 8 != 0) : 0;
  if (4 * per_position > (int64_t)UINT32_MAX)
    return TS_FAIL_NULL(TS_ERR_SHAPE, "%s: a %lld x %lld grid is too large", op, (long long)h, (long long)w);
  ts_tensor *draw = per_group ? draw_integers(n, groups, LANE_RANGE, g, dev) : draw_integers(n, 1, 4, g, dev);
  int64_t shape[2] = {n, h * w};
  ts_tensor *out = draw ? ts_empty(2, shape, TS_U8, dev) : NULL;
  if (out && be->group_mask(out, draw, h, w, per_position)) {
    ts_release(out);
    out = NULL;
  }
  ts_release(draw);
  return out;
}

ts_tensor *ts_mask_generate(int kind, int64_t n, int64_t h, int64_t w, double ratio, ts_generator *g, ts_device dev) {
  const char *op = "mask_generate";
  if (check_count(op, "n", n) || check_count(op, "h", h) || check_count(op, "w", w)) return NULL;
  if (h && w > INT64_MAX / h) return TS_FAIL_NULL(TS_ERR_SHAPE, "%s: a %lld x %lld grid is too large", op, (long long)h, (long long)w);
  int previous = ts_set_grad_enabled(0);
  ts_draw_mark mark = ts_draw_mark_of(g);
  ts_tensor *out = NULL;
  switch (kind) {
  case TS_MASK_RANDOM: out = random_mask(n, h, w, ratio, g, dev); break;
  case TS_MASK_GRID:
  case TS_MASK_UNIFORM: out = group_mask(kind, n, h, w, ratio, g, dev); break;
  default: ts_set_error(TS_ERR_ARG, "%s: unknown mask kind %d (TS_MASK_RANDOM, TS_MASK_GRID, TS_MASK_UNIFORM)", op, kind);
  }
  if (!out) ts_draw_rewind(&mark);
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
                          ts_generator *g, ts_device dev) {
  if (check_simmim(n, input_size, mask_patch_size, model_patch_size, ratio)) return NULL;
  int64_t rand_size = input_size / mask_patch_size, scale = mask_patch_size / model_patch_size, side = rand_size * scale;
  int64_t count = rand_size * rand_size, masked = (int64_t)ceil((double)count * ratio); /* np.ceil */
  int64_t blocks[5] = {n, rand_size, 1, rand_size, 1}, spread[5] = {n, rand_size, scale, rand_size, scale};
  int64_t flat[2] = {n, side * side};
  int previous = ts_set_grad_enabled(0);
  ts_draw_mark mark = ts_draw_mark_of(g);
  ts_scope s = {0};
  ts_tensor *lanes = ts_scope_keep(&s, draw_integers(n, count, LANE_RANGE, g, dev));
  /* the first `masked` entries of a random permutation: the smallest keys, as randperm orders them */
  ts_tensor *coarse = s.failed ? NULL : ts_scope_keep(&s, select_smallest(lanes, masked, 1));
  /* each mask patch covers scale x scale model patches */
  ts_tensor *view = s.failed ? NULL : ts_scope_keep(&s, ts_view(coarse, 5, blocks));
  ts_tensor *wide = s.failed ? NULL : ts_scope_keep(&s, ts_expand(view, 5, spread));
  ts_tensor *out = s.failed ? NULL : ts_reshape(wide, 2, flat);
  ts_scope_close(&s);
  if (!out) ts_draw_rewind(&mark);
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
  uint8_t *m = v ? malloc(ts_at_least_one(n * l)) : NULL;
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
  double *keys = malloc(ts_at_least_one(n * l) * sizeof(double));
  if (!keys) return TS_FAIL_NULL(TS_ERR_MEMORY, "%s: out of host memory", op);
  for (int64_t i = 0; i < n * l; i++) keys[i] = m[i] + noise[i];
  int64_t shape[2] = {n, l};
  ts_tensor *keys_t = ts_from_host(2, shape, TS_F64, keys, ts_cpu());
  free(keys);
  ts_tensor *out = keys_t ? select_smallest(keys_t, keep, 0) : NULL;
  ts_release(keys_t);
  return out;
}

/* ViT: with P the stable ascending argsort of a noise row, visible token j is replaced iff P[j] >= K
   (the official gather of [0]*K + [1]*(V-K) at ids = argsort(noise)). */
static ts_tensor *secondary_vit(const char *op, const uint8_t *m, const double *noise, int64_t n, int64_t l, int64_t v,
                                int64_t keep) {
  ts_tensor *out = new_mask_tensor(n, l, 1, ts_cpu());
  keyed *order = out ? malloc(ts_at_least_one(v) * sizeof *order) : NULL;
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
  ts_tensor *out = new_mask_tensor(n, v, 0, ts_cpu());
  if (!out) return NULL;
  const uint8_t *nm = bytes_of(new_mask);
  uint8_t *o = bytes_of(out);
  for (int64_t i = 0; i < n; i++)
    for (int64_t p = 0, j = 0; p < l; p++)
      if (!m[i * l + p]) o[i * v + j++] = nm[i * l + p];
  return out;
}

/* Replaces *t (made on the host) by its copy on dev; on failure *t stays and an error is set. */
static int move_to_device(ts_tensor **t, ts_device dev) {
  if (dev.type == TS_CPU) return TS_OK;
  ts_tensor *moved = ts_to_device(*t, dev);
  if (!moved) return ts_last_status();
  ts_release(*t);
  *t = moved;
  return TS_OK;
}

/* Computed on the host, where the primary mask is read and checked; the results go to its device. */
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
  ts_draw_mark mark = ts_draw_mark_of(g);
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
  if (*new_mask && (move_to_device(new_mask, mask->device) || (vis_mask && move_to_device(vis_mask, mask->device)))) {
    ts_release(*new_mask);
    *new_mask = NULL;
    if (vis_mask) {
      ts_release(*vis_mask);
      *vis_mask = NULL;
    }
  }
  if (!*new_mask) ts_draw_rewind(&mark);
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
  /* the mask is read on the host anyway, so a CPU mask serves x on any device */
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
  int64_t *src = v ? malloc(ts_at_least_one(n * groups) * sizeof(int64_t)) : NULL;
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
  const ts_backend *be = TS_BACKEND(g->device, uniform_compact_backward, "uniform_compact backward");
  if (!be) return ts_last_status();
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
  const ts_backend *be = TS_BACKEND(x->device, uniform_compact, op);
  if (!be) return NULL;
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

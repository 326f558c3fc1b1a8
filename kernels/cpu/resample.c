/* resample.c — interpolate (nearest, bilinear) on the CPU, forward and backward.
 *
 * Tensors are contiguous [planes, H, W] in float32 or float64. Source coordinates follow
 * PyTorch's upsample kernels (aten/src/ATen/native/UpSample.h):
 *   nearest   src = min(floor(dst * scale), in - 1) in float arithmetic, scale = 1 / scale_factor
 *             when one was given, else in / out (and the identity and 2x cases exactly);
 *   bilinear  align_corners: src = dst (in - 1) / (out - 1); otherwise
 *             src = max(scale (dst + 0.5) - 0.5, 0), scale as for nearest;
 *             then the two neighbours floor(src) and floor(src) + 1 (clamped to the last pixel)
 *             with weights 1 - frac and frac.
 * Each output axis is tabulated once per call; forward passes split output rows across the pool,
 * backward passes scatter into the input gradient plane by plane. */
#include "cpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Where output position o reads along one axis: i0 and i0 + step with weights w0 and w1
   (nearest: step 0, w0 = 1, w1 = 0). */
typedef struct {
  int64_t *i0, *step;
  double *w0, *w1;
} axis_table;

typedef struct {
  int dtype;
  int64_t planes, H, W, OH, OW;
  axis_table rows, cols;
  const char *src;  /* x (forward) or g (backward) */
  char *dst;        /* out (forward) or gx (backward) */
} resample_run;

static int64_t nearest_source(int64_t o, int64_t in, int64_t out, double scale_factor) {
  if (out == in) return o;
  if (out == 2 * in) return o >> 1;
  float scale = scale_factor > 0 ? (float)(1.0 / scale_factor) : (float)in / (float)out;
  int64_t i = (int64_t)floorf((float)o * scale);
  return i < in - 1 ? i : in - 1;
}

static double linear_source(int64_t o, int64_t in, int64_t out, int align_corners, double scale_factor) {
  if (align_corners) return out > 1 ? (double)o * (double)(in - 1) / (double)(out - 1) : 0.0;
  double scale = scale_factor > 0 ? 1.0 / scale_factor : (double)in / (double)out;
  double src = scale * ((double)o + 0.5) - 0.5;
  return src < 0 ? 0 : src;
}

static void free_table(axis_table *t) {
  free(t->i0);
  free(t->step);
  free(t->w0);
  free(t->w1);
}

static int fill_table(axis_table *t, int64_t in, int64_t out, int mode, int align_corners, double scale_factor) {
  t->i0 = malloc((size_t)out * sizeof(int64_t));
  t->step = malloc((size_t)out * sizeof(int64_t));
  t->w0 = malloc((size_t)out * sizeof(double));
  t->w1 = malloc((size_t)out * sizeof(double));
  if (!t->i0 || !t->step || !t->w0 || !t->w1) {
    free_table(t);
    return ts_set_error(TS_ERR_MEMORY, "interpolate: out of memory for the coordinate tables");
  }
  for (int64_t o = 0; o < out; o++) {
    if (mode == TS_INTERP_NEAREST) {
      t->i0[o] = nearest_source(o, in, out, scale_factor);
      t->step[o] = 0;
      t->w0[o] = 1;
      t->w1[o] = 0;
      continue;
    }
    double src = linear_source(o, in, out, align_corners, scale_factor);
    int64_t i = (int64_t)floor(src);
    if (i > in - 1) i = in - 1;
    double frac = src - (double)i;
    frac = frac < 0 ? 0 : frac > 1 ? 1 : frac;
    t->i0[o] = i;
    t->step[o] = i < in - 1 ? 1 : 0;
    t->w0[o] = 1 - frac;
    t->w1[o] = frac;
  }
  return TS_OK;
}

static int plan(resample_run *r, const ts_tensor *x, const ts_tensor *y, int mode, int align_corners,
                const double scale[2]) {
  int nd = x->ndim;
  *r = (resample_run){.dtype = x->dtype, .H = x->shape[nd - 2], .W = x->shape[nd - 1], .OH = y->shape[nd - 2],
                      .OW = y->shape[nd - 1]};
  r->planes = ts_numel(x) / (r->H * r->W);
  if (fill_table(&r->rows, r->H, r->OH, mode, align_corners, scale[0])) return ts_last_status();
  if (fill_table(&r->cols, r->W, r->OW, mode, align_corners, scale[1])) {
    free_table(&r->rows);
    return ts_last_status();
  }
  return TS_OK;
}

static void release(resample_run *r) {
  free_table(&r->rows);
  free_table(&r->cols);
}

/* Nearest is bilinear with weights (1, 0) and step 0; the separate loops only skip the zero terms. */
#define RESAMPLE_KERNELS(T)                                                                          \
  static void forward_rows_##T(int64_t begin, int64_t end, void *arg) {                             \
    const resample_run *r = arg;                                                                     \
    const axis_table *R = &r->rows, *Cl = &r->cols;                                                  \
    for (int64_t row = begin; row < end; row++) {                                                    \
      int64_t oh = row % r->OH;                                                                      \
      const T *top = (const T *)r->src + (row / r->OH * r->H + R->i0[oh]) * r->W;                    \
      const T *bottom = top + R->step[oh] * r->W;                                                    \
      T *out = (T *)r->dst + row * r->OW;                                                            \
      T hw0 = (T)R->w0[oh], hw1 = (T)R->w1[oh];                                                      \
      for (int64_t ow = 0; ow < r->OW; ow++) {                                                       \
        int64_t a = Cl->i0[ow], b = a + Cl->step[ow];                                                \
        T ww0 = (T)Cl->w0[ow], ww1 = (T)Cl->w1[ow];                                                  \
        out[ow] = hw0 * (ww0 * top[a] + ww1 * top[b]) + hw1 * (ww0 * bottom[a] + ww1 * bottom[b]);   \
      }                                                                                              \
    }                                                                                                \
  }                                                                                                  \
  static void nearest_rows_##T(int64_t begin, int64_t end, void *arg) {                             \
    const resample_run *r = arg;                                                                     \
    for (int64_t row = begin; row < end; row++) {                                                    \
      const T *src = (const T *)r->src + (row / r->OH * r->H + r->rows.i0[row % r->OH]) * r->W;      \
      T *out = (T *)r->dst + row * r->OW;                                                            \
      for (int64_t ow = 0; ow < r->OW; ow++) out[ow] = src[r->cols.i0[ow]];                          \
    }                                                                                                \
  }                                                                                                  \
  static void backward_planes_##T(int64_t begin, int64_t end, void *arg) {                          \
    const resample_run *r = arg;                                                                     \
    const axis_table *R = &r->rows, *Cl = &r->cols;                                                  \
    for (int64_t c = begin; c < end; c++) {                                                          \
      const T *g = (const T *)r->src + c * r->OH * r->OW;                                            \
      T *gx = (T *)r->dst + c * r->H * r->W;                                                         \
      memset(gx, 0, (size_t)(r->H * r->W) * sizeof(T));                                              \
      for (int64_t oh = 0; oh < r->OH; oh++, g += r->OW) {                                           \
        T *top = gx + R->i0[oh] * r->W, *bottom = top + R->step[oh] * r->W;                          \
        T hw0 = (T)R->w0[oh], hw1 = (T)R->w1[oh];                                                    \
        for (int64_t ow = 0; ow < r->OW; ow++) {                                                     \
          int64_t a = Cl->i0[ow], b = a + Cl->step[ow];                                              \
          T ww0 = (T)Cl->w0[ow], ww1 = (T)Cl->w1[ow], v = g[ow];                                     \
          top[a] += hw0 * ww0 * v;                                                                   \
          top[b] += hw0 * ww1 * v;                                                                   \
          bottom[a] += hw1 * ww0 * v;                                                                \
          bottom[b] += hw1 * ww1 * v;                                                                \
        }                                                                                            \
      }                                                                                              \
    }                                                                                                \
  }                                                                                                  \
  static void nearest_backward_planes_##T(int64_t begin, int64_t end, void *arg) {                  \
    const resample_run *r = arg;                                                                     \
    for (int64_t c = begin; c < end; c++) {                                                          \
      const T *g = (const T *)r->src + c * r->OH * r->OW;                                            \
      T *gx = (T *)r->dst + c * r->H * r->W;                                                         \
      memset(gx, 0, (size_t)(r->H * r->W) * sizeof(T));                                              \
      for (int64_t oh = 0; oh < r->OH; oh++, g += r->OW) {                                           \
        T *row = gx + r->rows.i0[oh] * r->W;                                                         \
        for (int64_t ow = 0; ow < r->OW; ow++) row[r->cols.i0[ow]] += g[ow];                         \
      }                                                                                              \
    }                                                                                                \
  }
RESAMPLE_KERNELS(float)
RESAMPLE_KERNELS(double)

int cpu_interpolate(ts_tensor *out, const ts_tensor *x, int mode, int align_corners, const double scale[2]) {
  resample_run r;
  if (plan(&r, x, out, mode, align_corners, scale)) return ts_last_status();
  r.src = ts_elem_ptr(x);
  r.dst = ts_elem_ptr(out);
  int f32 = x->dtype == TS_F32;
  ts_range_fn fn = mode == TS_INTERP_NEAREST ? (f32 ? nearest_rows_float : nearest_rows_double)
                                             : (f32 ? forward_rows_float : forward_rows_double);
  ts_parallel_for(r.planes * r.OH, cpu_grain(r.OW * (mode == TS_INTERP_NEAREST ? 1 : 4)), fn, &r);
  release(&r);
  return TS_OK;
}

int cpu_interpolate_backward(ts_tensor *gx, const ts_tensor *g, int mode, int align_corners, const double scale[2]) {
  resample_run r;
  if (plan(&r, gx, g, mode, align_corners, scale)) return ts_last_status();
  r.src = ts_elem_ptr(g);
  r.dst = ts_elem_ptr(gx);
  int f32 = gx->dtype == TS_F32;
  ts_range_fn fn = mode == TS_INTERP_NEAREST ? (f32 ? nearest_backward_planes_float : nearest_backward_planes_double)
                                             : (f32 ? backward_planes_float : backward_planes_double);
  ts_parallel_for(r.planes, cpu_grain(r.H * r.W + r.OH * r.OW * (mode == TS_INTERP_NEAREST ? 1 : 4)), fn, &r);
  release(&r);
  return TS_OK;
}

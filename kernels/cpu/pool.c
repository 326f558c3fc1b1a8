/* pool.c — avg_pool2d, max_pool2d and adaptive_avg_pool2d on the CPU, forward and backward.
 *
 * Tensors are contiguous [planes, H, W] in float32 or float64 (planes = N C). Windows follow
 * PyTorch's CPU kernels exactly (which cells, which divisor, which argmax on ties and NaN), so
 * results match torch to rounding. Forward passes split output rows across the pool; backward
 * passes scatter into the input gradient and split by plane, so no two threads add into one
 * element. Sums accumulate in double. */
#include "cpu.h"

#include <math.h>
#include <string.h>

typedef struct {
  int dtype;
  int64_t planes, H, W, OH, OW;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int count_include_pad;
  const char *src;  /* x (forward) or g (backward) */
  char *dst;        /* out (forward) or gx (backward) */
  int64_t *indices; /* max pool argmax, flat within the plane */
} pool_run;

/* The geometry of x [..., H, W] pooled into y [..., OH, OW]; window parameters may be NULL (adaptive
   pooling, max_pool2d backward). The runtime guarantees non-empty planes. */
static pool_run make_run(const ts_tensor *x, const ts_tensor *y, const int64_t kernel[2], const int64_t stride[2],
                         const int64_t padding[2], const int64_t dilation[2]) {
  int nd = x->ndim;
  pool_run p = {.dtype = x->dtype, .H = x->shape[nd - 2], .W = x->shape[nd - 1], .OH = y->shape[nd - 2],
                .OW = y->shape[nd - 1], .sh = 1, .sw = 1, .dh = 1, .dw = 1};
  p.planes = ts_numel(x) / (p.H * p.W);
  if (kernel) {
    p.kh = kernel[0], p.kw = kernel[1];
    p.sh = stride[0], p.sw = stride[1];
    p.ph = padding[0], p.pw = padding[1];
  }
  if (dilation) p.dh = dilation[0], p.dw = dilation[1];
  return p;
}

/* Splits `count` items of `per_item` work each over the pool. */
static void split(int64_t count, int64_t per_item, ts_range_fn fn, void *ctx) {
  ts_parallel_for(count, cpu_grain(per_item), fn, ctx);
}

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* ---- avg_pool2d ------------------------------------------------------------------------------ */
/* PyTorch's window: clipped to the padded input for the count_include_pad divisor, then to the
   input for the cells; a window entirely in the padding (ceil_mode) averages nothing: 0. */
typedef struct { int64_t h0, h1, w0, w1; double divisor; } avg_window;

static avg_window avg_window_at(const pool_run *p, int64_t oh, int64_t ow) {
  int64_t h0 = oh * p->sh - p->ph, w0 = ow * p->sw - p->pw;
  int64_t h1 = min64(h0 + p->kh, p->H + p->ph), w1 = min64(w0 + p->kw, p->W + p->pw);
  int64_t padded = (h1 - h0) * (w1 - w0);
  avg_window a = {max64(h0, 0), min64(h1, p->H), max64(w0, 0), min64(w1, p->W), 0};
  a.divisor = (double)(p->count_include_pad ? padded : (a.h1 - a.h0) * (a.w1 - a.w0));
  return a;
}

#define AVG_POOL_KERNELS(T)                                                                          \
  static void avg_rows_##T(int64_t begin, int64_t end, void *arg) {                                 \
    const pool_run *p = arg;                                                                         \
    for (int64_t row = begin; row < end; row++) {                                                    \
      const T *plane = (const T *)p->src + row / p->OH * p->H * p->W;                                \
      T *out = (T *)p->dst + row * p->OW;                                                            \
      for (int64_t ow = 0; ow < p->OW; ow++) {                                                       \
        avg_window a = avg_window_at(p, row % p->OH, ow);                                            \
        if (a.h0 >= a.h1 || a.w0 >= a.w1) {                                                         \
          out[ow] = 0;                                                                               \
          continue;                                                                                  \
        }                                                                                            \
        double sum = 0;                                                                              \
        for (int64_t h = a.h0; h < a.h1; h++)                                                        \
          for (int64_t w = a.w0; w < a.w1; w++) sum += plane[h * p->W + w];                          \
        out[ow] = (T)(sum / a.divisor);                                                              \
      }                                                                                              \
    }                                                                                                \
  }                                                                                                  \
  static void avg_backward_planes_##T(int64_t begin, int64_t end, void *arg) {                      \
    const pool_run *p = arg;                                                                         \
    for (int64_t c = begin; c < end; c++) {                                                          \
      const T *g = (const T *)p->src + c * p->OH * p->OW;                                            \
      T *gx = (T *)p->dst + c * p->H * p->W;                                                         \
      memset(gx, 0, (size_t)(p->H * p->W) * sizeof(T));                                              \
      for (int64_t oh = 0; oh < p->OH; oh++)                                                         \
        for (int64_t ow = 0; ow < p->OW; ow++) {                                                     \
          avg_window a = avg_window_at(p, oh, ow);                                                   \
          if (a.h0 >= a.h1 || a.w0 >= a.w1) continue;                                               \
          T share = (T)(g[oh * p->OW + ow] / a.divisor);                                             \
          for (int64_t h = a.h0; h < a.h1; h++)                                                      \
            for (int64_t w = a.w0; w < a.w1; w++) gx[h * p->W + w] += share;                         \
        }                                                                                            \
    }                                                                                                \
  }
AVG_POOL_KERNELS(float)
AVG_POOL_KERNELS(double)

int cpu_avg_pool2d(ts_tensor *out, const ts_tensor *x, const int64_t kernel[2], const int64_t stride[2],
                   const int64_t padding[2], int count_include_pad) {
  pool_run p = make_run(x, out, kernel, stride, padding, NULL);
  p.count_include_pad = count_include_pad;
  p.src = ts_elem_ptr(x);
  p.dst = ts_elem_ptr(out);
  split(p.planes * p.OH, p.OW * p.kh * p.kw, x->dtype == TS_F32 ? avg_rows_float : avg_rows_double, &p);
  return TS_OK;
}

int cpu_avg_pool2d_backward(ts_tensor *gx, const ts_tensor *g, const int64_t kernel[2], const int64_t stride[2],
                            const int64_t padding[2], int count_include_pad) {
  pool_run p = make_run(gx, g, kernel, stride, padding, NULL);
  p.count_include_pad = count_include_pad;
  p.src = ts_elem_ptr(g);
  p.dst = ts_elem_ptr(gx);
  split(p.planes, p.OH * p.OW * p.kh * p.kw, gx->dtype == TS_F32 ? avg_backward_planes_float : avg_backward_planes_double,
        &p);
  return TS_OK;
}

/* ---- max_pool2d ------------------------------------------------------------------------------ */
/* PyTorch's scan: taps from the first in-bounds one, dilation apart; the first maximum wins, a
   NaN always wins (so NaN propagates). A dilated window can fall between the pixels of a tiny
   input and cover none: -inf, index -1, no gradient. */
#define MAX_POOL_KERNELS(T)                                                                          \
  static void max_rows_##T(int64_t begin, int64_t end, void *arg) {                                 \
    const pool_run *p = arg;                                                                         \
    for (int64_t row = begin; row < end; row++) {                                                    \
      const T *plane = (const T *)p->src + row / p->OH * p->H * p->W;                                \
      int64_t oh = row % p->OH, h0 = oh * p->sh - p->ph;                                             \
      int64_t h1 = min64(h0 + (p->kh - 1) * p->dh + 1, p->H);                                        \
      if (h0 < 0) h0 += (-h0 + p->dh - 1) / p->dh * p->dh;                                           \
      T *out = (T *)p->dst + row * p->OW;                                                            \
      int64_t *idx = p->indices + row * p->OW;                                                       \
      for (int64_t ow = 0; ow < p->OW; ow++) {                                                       \
        int64_t w0 = ow * p->sw - p->pw, w1 = min64(w0 + (p->kw - 1) * p->dw + 1, p->W);             \
        if (w0 < 0) w0 += (-w0 + p->dw - 1) / p->dw * p->dw;                                         \
        int64_t best_at = -1;                                                                        \
        T best = -(T)INFINITY;                                                                       \
        for (int64_t h = h0; h < h1; h += p->dh)                                                     \
          for (int64_t w = w0; w < w1; w += p->dw) {                                                 \
            T v = plane[h * p->W + w];                                                               \
            if (v > best || isnan(v)) {                                                              \
              best = v;                                                                              \
              best_at = h * p->W + w;                                                                \
            }                                                                                        \
          }                                                                                          \
        out[ow] = best;                                                                              \
        idx[ow] = best_at;                                                                           \
      }                                                                                              \
    }                                                                                                \
  }                                                                                                  \
  static void max_backward_planes_##T(int64_t begin, int64_t end, void *arg) {                      \
    const pool_run *p = arg;                                                                         \
    for (int64_t c = begin; c < end; c++) {                                                          \
      const T *g = (const T *)p->src + c * p->OH * p->OW;                                            \
      const int64_t *idx = p->indices + c * p->OH * p->OW;                                           \
      T *gx = (T *)p->dst + c * p->H * p->W;                                                         \
      memset(gx, 0, (size_t)(p->H * p->W) * sizeof(T));                                              \
      for (int64_t k = 0; k < p->OH * p->OW; k++)                                                    \
        if (idx[k] >= 0) gx[idx[k]] += g[k];                                                         \
    }                                                                                                \
  }
MAX_POOL_KERNELS(float)
MAX_POOL_KERNELS(double)

int cpu_max_pool2d(ts_tensor *out, ts_tensor *indices, const ts_tensor *x, const int64_t kernel[2],
                   const int64_t stride[2], const int64_t padding[2], const int64_t dilation[2]) {
  pool_run p = make_run(x, out, kernel, stride, padding, dilation);
  p.src = ts_elem_ptr(x);
  p.dst = ts_elem_ptr(out);
  p.indices = (int64_t *)ts_elem_ptr(indices);
  split(p.planes * p.OH, p.OW * p.kh * p.kw, x->dtype == TS_F32 ? max_rows_float : max_rows_double, &p);
  return TS_OK;
}

int cpu_max_pool2d_backward(ts_tensor *gx, const ts_tensor *g, const ts_tensor *indices) {
  pool_run p = make_run(gx, g, NULL, NULL, NULL, NULL);
  p.src = ts_elem_ptr(g);
  p.dst = ts_elem_ptr(gx);
  p.indices = (int64_t *)ts_elem_ptr(indices);
  split(p.planes, p.H * p.W + p.OH * p.OW, gx->dtype == TS_F32 ? max_backward_planes_float : max_backward_planes_double,
        &p);
  return TS_OK;
}

/* ---- adaptive_avg_pool2d --------------------------------------------------------------------- */
/* Output cell o of `out` covers input [floor(o in / out), ceil((o + 1) in / out)). */
static int64_t start_index(int64_t o, int64_t out, int64_t in) { return o * in / out; }
static int64_t end_index(int64_t o, int64_t out, int64_t in) { return ((o + 1) * in + out - 1) / out; }

#define ADAPTIVE_KERNELS(T)                                                                          \
  static void adaptive_rows_##T(int64_t begin, int64_t end, void *arg) {                            \
    const pool_run *p = arg;                                                                         \
    for (int64_t row = begin; row < end; row++) {                                                    \
      const T *plane = (const T *)p->src + row / p->OH * p->H * p->W;                                \
      int64_t oh = row % p->OH, h0 = start_index(oh, p->OH, p->H), h1 = end_index(oh, p->OH, p->H);  \
      T *out = (T *)p->dst + row * p->OW;                                                            \
      for (int64_t ow = 0; ow < p->OW; ow++) {                                                       \
        int64_t w0 = start_index(ow, p->OW, p->W), w1 = end_index(ow, p->OW, p->W);                  \
        double sum = 0;                                                                              \
        for (int64_t h = h0; h < h1; h++)                                                            \
          for (int64_t w = w0; w < w1; w++) sum += plane[h * p->W + w];                              \
        out[ow] = (T)(sum / (double)((h1 - h0) * (w1 - w0)));                                        \
      }                                                                                              \
    }                                                                                                \
  }                                                                                                  \
  static void adaptive_backward_planes_##T(int64_t begin, int64_t end, void *arg) {                 \
    const pool_run *p = arg;                                                                         \
    for (int64_t c = begin; c < end; c++) {                                                          \
      const T *g = (const T *)p->src + c * p->OH * p->OW;                                            \
      T *gx = (T *)p->dst + c * p->H * p->W;                                                         \
      memset(gx, 0, (size_t)(p->H * p->W) * sizeof(T));                                              \
      for (int64_t oh = 0; oh < p->OH; oh++) {                                                       \
        int64_t h0 = start_index(oh, p->OH, p->H), h1 = end_index(oh, p->OH, p->H);                  \
        for (int64_t ow = 0; ow < p->OW; ow++) {                                                     \
          int64_t w0 = start_index(ow, p->OW, p->W), w1 = end_index(ow, p->OW, p->W);                \
          T share = (T)(g[oh * p->OW + ow] / (double)((h1 - h0) * (w1 - w0)));                       \
          for (int64_t h = h0; h < h1; h++)                                                          \
            for (int64_t w = w0; w < w1; w++) gx[h * p->W + w] += share;                             \
        }                                                                                            \
      }                                                                                              \
    }                                                                                                \
  }
ADAPTIVE_KERNELS(float)
ADAPTIVE_KERNELS(double)

/* Work per output cell: the largest window has at most ceil(in / out) + 1 cells per dim. */
static int64_t adaptive_window(const pool_run *p) { return (p->H / p->OH + 2) * (p->W / p->OW + 2); }

int cpu_adaptive_avg_pool2d(ts_tensor *out, const ts_tensor *x) {
  pool_run p = make_run(x, out, NULL, NULL, NULL, NULL);
  p.src = ts_elem_ptr(x);
  p.dst = ts_elem_ptr(out);
  split(p.planes * p.OH, p.OW * adaptive_window(&p), x->dtype == TS_F32 ? adaptive_rows_float : adaptive_rows_double, &p);
  return TS_OK;
}

int cpu_adaptive_avg_pool2d_backward(ts_tensor *gx, const ts_tensor *g) {
  pool_run p = make_run(gx, g, NULL, NULL, NULL, NULL);
  p.src = ts_elem_ptr(g);
  p.dst = ts_elem_ptr(gx);
  split(p.planes, p.OH * p.OW * adaptive_window(&p),
        gx->dtype == TS_F32 ? adaptive_backward_planes_float : adaptive_backward_planes_double, &p);
  return TS_OK;
}

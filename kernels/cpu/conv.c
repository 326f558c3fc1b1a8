/* conv.c — conv2d forward and backward on the CPU: input patches times the weight, through BLAS.
 *
 * For one sample and one group the convolution is a single matrix product
 *     out[Og, L] = W_g[Og, K] @ cols[K, L]      K = Cg kh kw taps, L = OH OW output pixels,
 * where cols[(c, i, j), (oh, ow)] is the input value tap (c, i, j) reads for output pixel (oh, ow)
 * (0 in the padding). There are three ways to get cols:
 *   - direct: a 1x1 kernel with stride 1 and no padding reads every pixel once, in place: cols is
 *     the input sample itself and nothing is copied;
 *   - patches: kernel == stride without padding or dilation and one group (the patch embedding of
 *     ViT, Swin, PVT): every input pixel belongs to exactly one patch; the patches are copied as
 *     rows [L, K] made of contiguous kw-element runs, and the product takes them transposed;
 *   - im2col: anything else; cols is built in a buffer, [K, L] per sample and group.
 * Depthwise convs (one input channel per group) skip all of this: their products are too thin for
 * BLAS, and direct loops over the input rows do the work without copying (see below).
 * The backward runs the same products transposed: gW_g += g[Og, L] @ cols^T, gcols = W_g^T @ g;
 * then gcols goes back onto the input pixels: col2im adds overlapping taps; for direct convs gcols
 * is gx itself; patches do not overlap, so they are copied back.
 *
 * Threading follows linalg.c: packing and unpacking (im2col, col2im, patches) run on our pool;
 * products big enough for OpenBLAS to thread run one after another from the calling thread;
 * smaller ones are spread over our pool, each worker calling single-threaded BLAS. The two pools
 * never run at once. Samples go through in chunks whose cols fit COLS_BUDGET bytes (at least one
 * sample per chunk), so memory stays bounded for large batches. */
#include "cpu.h"

#include <cblas.h>
#include <limits.h>
#include <string.h>

/* As linalg.c: OpenBLAS threads a gemm above this much work; a chunk of our pool's work should
   hold at least MIN_CHUNK_WORK multiply-adds. */
static const double GEMM_SINGLE_THREAD_WORK = 65536.0 * 4, MIN_CHUNK_WORK = 1 << 20;
static const int64_t COLS_BUDGET = (int64_t)32 << 20;

typedef enum { COLS_DIRECT, COLS_PATCHES, COLS_IM2COL } cols_kind;

typedef struct {
  int dtype;
  int64_t esz;
  int64_t N, C, H, W, O, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw, groups;
  int64_t Cg, Og, K, L;
  cols_kind kind;
  int depthwise;  /* Cg = 1 with several groups: the loops below, no cols and no BLAS */
} conv_geom;

/* Everything a pass over one chunk of samples needs; the range functions below receive it. */
typedef struct {
  conv_geom q;
  const char *x, *w, *b, *g;  /* input, weight, bias (may be NULL), output gradient */
  char *out, *gx, *gw, *gb;
  char *buf;                  /* cols of the chunk (im2col or patches) */
  int64_t n0, nb;             /* the chunk: samples [n0, n0 + nb) */
} conv_run;

/* cols of one (chunk sample, group) as a BLAS operand: [K, L] with leading dim L, or stored
   transposed as [L, K] with leading dim K (patches). */
typedef struct {
  const char *ptr;
  int64_t ld;
  int transposed;
} cols_view;

static conv_geom make_geom(const ts_tensor *x, const ts_tensor *w, const ts_tensor *y, const int64_t stride[2],
                           const int64_t padding[2], const int64_t dilation[2], int64_t groups) {
  conv_geom q = {x->dtype, ts_dtype_size(x->dtype), x->shape[0], x->shape[1], x->shape[2], x->shape[3],
                 w->shape[0], y->shape[2], y->shape[3], w->shape[2], w->shape[3], stride[0], stride[1],
                 padding[0], padding[1], dilation[0], dilation[1], groups, 0, 0, 0, 0, COLS_IM2COL, 0};
  q.Cg = q.C / groups;
  q.Og = q.O / groups;
  q.K = q.Cg * q.kh * q.kw;
  q.L = q.OH * q.OW;
  q.depthwise = q.Cg == 1 && groups > 1;
  int unpadded = q.ph == 0 && q.pw == 0;
  if (q.kh == 1 && q.kw == 1 && q.sh == 1 && q.sw == 1 && unpadded)
    q.kind = COLS_DIRECT;
  else if (groups == 1 && q.kh == q.sh && q.kw == q.sw && unpadded && (q.dh == 1 || q.kh == 1) && (q.dw == 1 || q.kw == 1))
    q.kind = COLS_PATCHES;
  return q;
}

static int check_blas_sizes(const conv_geom *q) {
  int64_t sizes[4] = {q->O, q->K, q->L, q->C * q->H * q->W};
  for (int i = 0; i < 4; i++)
    if (sizes[i] > INT_MAX)
      return ts_set_error(TS_ERR_UNSUPPORTED, "conv2d: a matrix size of %lld exceeds what BLAS accepts (%d)",
                          (long long)sizes[i], INT_MAX);
  return TS_OK;
}

/* Samples per chunk: as many as fit the cols budget, at least one. */
static int64_t chunk_samples(const conv_geom *q) {
  if (q->kind == COLS_DIRECT || q->N == 0) return q->N > 0 ? q->N : 1;
  int64_t per_sample = q->C * q->kh * q->kw * q->L * q->esz;
  int64_t nb = per_sample > 0 ? COLS_BUDGET / per_sample : q->N;
  return nb < 1 ? 1 : nb > q->N ? q->N : nb;
}

/* The cols buffer for chunks of nb samples, in r->buf (none when the products read x directly). */
static int column_buffer(conv_run *r, int64_t nb, ts_device device, ts_tensor **buf) {
  *buf = NULL;
  if (r->q.kind == COLS_DIRECT) return TS_OK;
  int64_t n = nb * r->q.C * r->q.kh * r->q.kw * r->q.L;
  if (!(*buf = ts_empty(1, &n, r->q.dtype, device))) return ts_last_status();
  r->buf = ts_elem_ptr(*buf);
  return TS_OK;
}

static const char *at(const char *base, int64_t elems, int64_t esz) { return base + elems * esz; }
static char *at_mut(char *base, int64_t elems, int64_t esz) { return base + elems * esz; }

/* ---- BLAS ------------------------------------------------------------------------------------ */
static void gemm(const conv_geom *q, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int64_t m, int64_t n, int64_t k,
                 const char *a, int64_t lda, const char *b, int64_t ldb, double beta, char *c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) { /* an empty sum; BLAS rejects the leading dims of empty operands */
    if (beta == 0)
      for (int64_t r = 0; r < m; r++) memset(c + r * ldc * q->esz, 0, (size_t)(n * q->esz));
    return;
  }
  if (q->dtype == TS_F32)
    cblas_sgemm(CblasRowMajor, ta, tb, (int)m, (int)n, (int)k, 1.0f, (const float *)a, (int)lda, (const float *)b,
                (int)ldb, (float)beta, (float *)c, (int)ldc);
  else
    cblas_dgemm(CblasRowMajor, ta, tb, (int)m, (int)n, (int)k, 1.0, (const double *)a, (int)lda, (const double *)b,
                (int)ldb, beta, (double *)c, (int)ldc);
}

/* Runs fn over `count` products of `work` multiply-adds each: from the calling thread when
   OpenBLAS threads each one itself, else spread over our pool. */
static void run_products(int64_t count, double work, ts_range_fn fn, void *ctx) {
  if (work > GEMM_SINGLE_THREAD_WORK) {
    fn(0, count, ctx);
  } else {
    int64_t grain = work >= MIN_CHUNK_WORK || work <= 0 ? 1 : (int64_t)(MIN_CHUNK_WORK / work);
    ts_parallel_for(count, grain, fn, ctx);
  }
}

static double product_work(const conv_geom *q) { return (double)q->Og * (double)q->K * (double)q->L; }

static cols_view cols_of(const conv_run *r, int64_t m, int64_t g) {
  const conv_geom *q = &r->q;
  switch (q->kind) {
  case COLS_DIRECT: return (cols_view){at(r->x, ((r->n0 + m) * q->C + g * q->Cg) * q->L, q->esz), q->L, 0};
  case COLS_PATCHES: return (cols_view){at(r->buf, m * q->L * q->K, q->esz), q->K, 1};
  default: return (cols_view){at(r->buf, (m * q->C * q->kh * q->kw + g * q->K) * q->L, q->esz), q->L, 0};
  }
}

/* ---- packing: im2col and patches ------------------------------------------------------------- */
/* The outputs o in [0, out) whose input coordinate o * s + off lies in [0, in): [*lo, *hi). */
static void valid_outputs(int64_t off, int64_t s, int64_t in, int64_t out, int64_t *lo, int64_t *hi) {
  int64_t a = off < 0 ? (-off + s - 1) / s : 0;
  int64_t b = in - off <= 0 ? 0 : (in - off - 1) / s + 1;
  if (b > out) b = out;
  if (a > b) a = b;
  *lo = a;
  *hi = b;
}

static void copy_strided(char *dst, const char *src, int64_t n, int64_t step, int64_t esz) {
  if (step == 1) {
    memcpy(dst, src, (size_t)(n * esz));
  } else if (esz == 4) {
    for (int64_t i = 0; i < n; i++) ((float *)dst)[i] = ((const float *)src)[i * step];
  } else {
    for (int64_t i = 0; i < n; i++) ((double *)dst)[i] = ((const double *)src)[i * step];
  }
}

/* One cols row per (chunk sample, channel, tap): rows [begin, end) of the chunk's buffer. */
static void im2col_rows(int64_t begin, int64_t end, void *arg) {
  const conv_run *r = arg;
  const conv_geom *q = &r->q;
  int64_t taps = q->kh * q->kw, esz = q->esz;
  for (int64_t row = begin; row < end; row++) {
    int64_t plane = row / taps, i = row % taps / q->kw, j = row % q->kw;
    const char *src = at(r->x, (r->n0 * q->C + plane) * q->H * q->W, esz);
    char *dst = at_mut(r->buf, row * q->L, esz);
    int64_t off_w = j * q->dw - q->pw, lo, hi;
    valid_outputs(off_w, q->sw, q->W, q->OW, &lo, &hi);
    for (int64_t oh = 0; oh < q->OH; oh++, dst += q->OW * esz) {
      int64_t ih = oh * q->sh - q->ph + i * q->dh;
      if (ih < 0 || ih >= q->H || lo == hi) {
        memset(dst, 0, (size_t)(q->OW * esz));
        continue;
      }
      memset(dst, 0, (size_t)(lo * esz));
      copy_strided(dst + lo * esz, at(src, ih * q->W + lo * q->sw + off_w, esz), hi - lo, q->sw, esz);
      memset(dst + hi * esz, 0, (size_t)((q->OW - hi) * esz));
    }
  }
}

/* One patch row [K] per (chunk sample, output pixel): runs of kw pixels, (c, i) major. */
static void patch_rows(int64_t begin, int64_t end, void *arg) {
  const conv_run *r = arg;
  const conv_geom *q = &r->q;
  int64_t esz = q->esz, run = q->kw * esz;
  for (int64_t row = begin; row < end; row++) {
    int64_t m = row / q->L, oh = row % q->L / q->OW, ow = row % q->OW;
    const char *src = at(r->x, (r->n0 + m) * q->C * q->H * q->W + oh * q->kh * q->W + ow * q->kw, esz);
    char *dst = at_mut(r->buf, row * q->K, esz);
    for (int64_t c = 0; c < q->C; c++)
      for (int64_t i = 0; i < q->kh; i++, dst += run) memcpy(dst, at(src, (c * q->H + i) * q->W, esz), (size_t)run);
  }
}

static void pack_chunk(conv_run *r) {
  const conv_geom *q = &r->q;
  if (q->kind == COLS_IM2COL)
    ts_parallel_for(r->nb * q->C * q->kh * q->kw, cpu_grain(q->L), im2col_rows, r);
  else if (q->kind == COLS_PATCHES)
    ts_parallel_for(r->nb * q->L, cpu_grain(q->K), patch_rows, r);
}

/* ---- unpacking: col2im and patches back ------------------------------------------------------ */
#define COL2IM_PLANE(T)                                                                              \
  static void col2im_plane_##T(const conv_run *r, int64_t plane_in_chunk) {                         \
    const conv_geom *q = &r->q;                                                                      \
    T *img = (T *)r->gx + (r->n0 * q->C + plane_in_chunk) * q->H * q->W;                             \
    const T *rows = (const T *)r->buf + plane_in_chunk * q->kh * q->kw * q->L;                       \
    memset(img, 0, (size_t)(q->H * q->W) * sizeof(T));                                               \
    for (int64_t i = 0; i < q->kh; i++)                                                              \
      for (int64_t j = 0; j < q->kw; j++, rows += q->L) {                                            \
        int64_t off_w = j * q->dw - q->pw, lo, hi;                                                   \
        valid_outputs(off_w, q->sw, q->W, q->OW, &lo, &hi);                                          \
        for (int64_t oh = 0; oh < q->OH; oh++) {                                                     \
          int64_t ih = oh * q->sh - q->ph + i * q->dh;                                               \
          if (ih < 0 || ih >= q->H) continue;                                                        \
          T *dst = img + ih * q->W + off_w;                                                          \
          const T *src = rows + oh * q->OW;                                                          \
          for (int64_t ow = lo; ow < hi; ow++) dst[ow * q->sw] += src[ow];                           \
        }                                                                                            \
      }                                                                                              \
  }
COL2IM_PLANE(float)
COL2IM_PLANE(double)

/* Each input plane gathers the taps that read it, so planes are independent. */
static void col2im_planes(int64_t begin, int64_t end, void *arg) {
  const conv_run *r = arg;
  for (int64_t p = begin; p < end; p++) {
    if (r->q.dtype == TS_F32)
      col2im_plane_float(r, p);
    else
      col2im_plane_double(r, p);
  }
}

static void unpatch_rows(int64_t begin, int64_t end, void *arg) {
  const conv_run *r = arg;
  const conv_geom *q = &r->q;
  int64_t esz = q->esz, run = q->kw * esz;
  for (int64_t row = begin; row < end; row++) {
    int64_t m = row / q->L, oh = row % q->L / q->OW, ow = row % q->OW;
    char *dst = at_mut(r->gx, (r->n0 + m) * q->C * q->H * q->W + oh * q->kh * q->W + ow * q->kw, esz);
    const char *src = at(r->buf, row * q->K, esz);
    for (int64_t c = 0; c < q->C; c++)
      for (int64_t i = 0; i < q->kh; i++, src += run) memcpy(at_mut(dst, (c * q->H + i) * q->W, esz), src, (size_t)run);
  }
}

static void unpack_chunk(conv_run *r) {
  const conv_geom *q = &r->q;
  if (q->kind == COLS_IM2COL) {
    ts_parallel_for(r->nb * q->C, cpu_grain(q->kh * q->kw * q->L), col2im_planes, r);
  } else if (q->kind == COLS_PATCHES) {
    /* pixels past the last whole patch (H or W not a multiple of the kernel) get no gradient */
    if (q->OH * q->kh != q->H || q->OW * q->kw != q->W)
      memset(at_mut(r->gx, r->n0 * q->C * q->H * q->W, q->esz), 0, (size_t)(r->nb * q->C * q->H * q->W * q->esz));
    ts_parallel_for(r->nb * q->L, cpu_grain(q->K), unpatch_rows, r);
  }
}

/* ---- depthwise: one input channel per group ---------------------------------------------------- */
/* With Cg = 1 (depthwise and channel-multiplier convs: ConvNeXt, MobileNet, PVT's FFN) a product
   is Og x L x kh kw: too thin for BLAS, and im2col would copy every pixel kh kw times. These loops
   read the input in place instead: each tap adds a weighted input row segment to an output row. */
/* y += a x and the dot product x . y over n contiguous elements, in blocks of 8 that the compiler
   turns into vector instructions at -O2 (restrict: the operands never overlap). */
#define VECTOR_HELPERS(T)                                                                            \
  static inline void axpy_##T(int64_t n, T a, const T *restrict x, T *restrict y) {                 \
    int64_t i = 0;                                                                                   \
    for (; i + 8 <= n; i += 8)                                                                       \
      for (int k = 0; k < 8; k++) y[i + k] += a * x[i + k];                                          \
    for (; i < n; i++) y[i] += a * x[i];                                                             \
  }                                                                                                  \
  static inline T dot_##T(int64_t n, const T *restrict x, const T *restrict y) {                    \
    T part[8] = {0};                                                                                 \
    int64_t i = 0;                                                                                   \
    for (; i + 8 <= n; i += 8)                                                                       \
      for (int k = 0; k < 8; k++) part[k] += x[i + k] * y[i + k];                                    \
    T sum = 0;                                                                                       \
    for (; i < n; i++) sum += x[i] * y[i];                                                           \
    for (int k = 0; k < 8; k++) sum += part[k];                                                      \
    return sum;                                                                                      \
  }
VECTOR_HELPERS(float)
VECTOR_HELPERS(double)

#define DEPTHWISE_KERNELS(T)                                                                         \
  /* rows (n, oc, oh) */                                                                             \
  static void depthwise_rows_##T(int64_t begin, int64_t end, void *arg) {                           \
    const conv_run *r = arg;                                                                         \
    const conv_geom *q = &r->q;                                                                      \
    for (int64_t row = begin; row < end; row++) {                                                    \
      int64_t oh = row % q->OH, oc = row / q->OH % q->O, n = row / (q->OH * q->O);                   \
      const T *plane = (const T *)r->x + (n * q->C + oc / q->Og) * q->H * q->W;                      \
      const T *wk = (const T *)r->w + oc * q->kh * q->kw;                                            \
      T *out = (T *)r->out + row * q->OW, init = r->b ? ((const T *)r->b)[oc] : 0;                   \
      for (int64_t ow = 0; ow < q->OW; ow++) out[ow] = init;                                         \
      for (int64_t i = 0; i < q->kh; i++) {                                                          \
        int64_t ih = oh * q->sh - q->ph + i * q->dh;                                                 \
        if (ih < 0 || ih >= q->H) continue;                                                          \
        for (int64_t j = 0; j < q->kw; j++) {                                                        \
          int64_t off = j * q->dw - q->pw, lo, hi;                                                   \
          valid_outputs(off, q->sw, q->W, q->OW, &lo, &hi);                                          \
          const T *src = plane + ih * q->W + off, wv = wk[i * q->kw + j];                            \
          if (q->sw == 1)                                                                            \
            axpy_##T(hi - lo, wv, src + lo, out + lo);                                               \
          else                                                                                       \
            for (int64_t ow = lo; ow < hi; ow++) out[ow] += wv * src[ow * q->sw];                    \
        }                                                                                            \
      }                                                                                              \
    }                                                                                                \
  }                                                                                                  \
  /* input gradient planes (n, c): every tap of the channel's Og filters scatters back */            \
  static void depthwise_input_grad_##T(int64_t begin, int64_t end, void *arg) {                     \
    const conv_run *r = arg;                                                                         \
    const conv_geom *q = &r->q;                                                                      \
    for (int64_t p = begin; p < end; p++) {                                                          \
      int64_t n = p / q->C, c = p % q->C;                                                            \
      T *gx = (T *)r->gx + p * q->H * q->W;                                                          \
      memset(gx, 0, (size_t)(q->H * q->W) * sizeof(T));                                              \
      for (int64_t oc = c * q->Og; oc < (c + 1) * q->Og; oc++) {                                     \
        const T *g = (const T *)r->g + (n * q->O + oc) * q->L, *wk = (const T *)r->w + oc * q->kh * q->kw; \
        for (int64_t oh = 0; oh < q->OH; oh++, g += q->OW)                                           \
          for (int64_t i = 0; i < q->kh; i++) {                                                      \
            int64_t ih = oh * q->sh - q->ph + i * q->dh;                                             \
            if (ih < 0 || ih >= q->H) continue;                                                      \
            for (int64_t j = 0; j < q->kw; j++) {                                                    \
              int64_t off = j * q->dw - q->pw, lo, hi;                                               \
              valid_outputs(off, q->sw, q->W, q->OW, &lo, &hi);                                      \
              T *dst = gx + ih * q->W + off, wv = wk[i * q->kw + j];                                 \
              if (q->sw == 1)                                                                        \
                axpy_##T(hi - lo, wv, g + lo, dst + lo);                                             \
              else                                                                                   \
                for (int64_t ow = lo; ow < hi; ow++) dst[ow * q->sw] += wv * g[ow];                  \
            }                                                                                        \
          }                                                                                          \
      }                                                                                              \
    }                                                                                                \
  }                                                                                                  \
  /* weight gradient of filters oc: one dot product of g with the tap's input per row */             \
  static void depthwise_weight_grad_##T(int64_t begin, int64_t end, void *arg) {                    \
    const conv_run *r = arg;                                                                         \
    const conv_geom *q = &r->q;                                                                      \
    for (int64_t oc = begin; oc < end; oc++)                                                         \
      for (int64_t i = 0; i < q->kh; i++)                                                            \
        for (int64_t j = 0; j < q->kw; j++) {                                                        \
          int64_t off = j * q->dw - q->pw, lo, hi;                                                   \
          valid_outputs(off, q->sw, q->W, q->OW, &lo, &hi);                                          \
          double sum = 0;                                                                            \
          for (int64_t n = 0; n < q->N; n++) {                                                       \
            const T *plane = (const T *)r->x + (n * q->C + oc / q->Og) * q->H * q->W;                \
            const T *g = (const T *)r->g + (n * q->O + oc) * q->L;                                   \
            for (int64_t oh = 0; oh < q->OH; oh++, g += q->OW) {                                     \
              int64_t ih = oh * q->sh - q->ph + i * q->dh;                                           \
              if (ih < 0 || ih >= q->H) continue;                                                    \
              const T *src = plane + ih * q->W + off;                                                \
              if (q->sw == 1) {                                                                      \
                sum += dot_##T(hi - lo, g + lo, src + lo);                                           \
                continue;                                                                            \
              }                                                                                      \
              T dot = 0;                                                                             \
              for (int64_t ow = lo; ow < hi; ow++) dot += g[ow] * src[ow * q->sw];                   \
              sum += dot;                                                                            \
            }                                                                                        \
          }                                                                                          \
          ((T *)r->gw)[(oc * q->kh + i) * q->kw + j] = (T)sum;                                       \
        }                                                                                            \
  }
DEPTHWISE_KERNELS(float)
DEPTHWISE_KERNELS(double)

static void depthwise_forward(conv_run *r) {
  const conv_geom *q = &r->q;
  ts_parallel_for(q->N * q->O * q->OH, cpu_grain(q->OW * q->kh * q->kw),
                  q->dtype == TS_F32 ? depthwise_rows_float : depthwise_rows_double, r);
}

static void depthwise_backward(conv_run *r) {
  const conv_geom *q = &r->q;
  int64_t work = q->L * q->kh * q->kw;
  if (r->gx)
    ts_parallel_for(q->N * q->C, cpu_grain(q->Og * work),
                    q->dtype == TS_F32 ? depthwise_input_grad_float : depthwise_input_grad_double, r);
  if (r->gw)
    ts_parallel_for(q->O, cpu_grain(q->N * work),
                    q->dtype == TS_F32 ? depthwise_weight_grad_float : depthwise_weight_grad_double, r);
}

/* ---- forward --------------------------------------------------------------------------------- */
static void fill_bias(const conv_run *r, char *out, int64_t g) {
  const conv_geom *q = &r->q;
  for (int64_t o = 0; o < q->Og; o++) {
    int64_t oc = g * q->Og + o;
    if (q->dtype == TS_F32) {
      float v = ((const float *)r->b)[oc], *dst = (float *)out + o * q->L;
      for (int64_t l = 0; l < q->L; l++) dst[l] = v;
    } else {
      double v = ((const double *)r->b)[oc], *dst = (double *)out + o * q->L;
      for (int64_t l = 0; l < q->L; l++) dst[l] = v;
    }
  }
}

/* out[n, group g] = (bias) + W_g @ cols, for products p = (chunk sample, group). */
static void forward_products(int64_t begin, int64_t end, void *arg) {
  const conv_run *r = arg;
  const conv_geom *q = &r->q;
  for (int64_t p = begin; p < end; p++) {
    int64_t m = p / q->groups, g = p % q->groups;
    char *out = at_mut(r->out, ((r->n0 + m) * q->O + g * q->Og) * q->L, q->esz);
    if (r->b) fill_bias(r, out, g);
    cols_view c = cols_of(r, m, g);
    gemm(q, CblasNoTrans, c.transposed ? CblasTrans : CblasNoTrans, q->Og, q->L, q->K,
         at(r->w, g * q->Og * q->K, q->esz), q->K, c.ptr, c.ld, r->b ? 1.0 : 0.0, out, q->L);
  }
}

int cpu_conv2d(ts_tensor *out, const ts_tensor *x, const ts_tensor *w, const ts_tensor *b, const int64_t stride[2],
               const int64_t padding[2], const int64_t dilation[2], int64_t groups) {
  conv_run r = {make_geom(x, w, out, stride, padding, dilation, groups), ts_elem_ptr(x), ts_elem_ptr(w),
                b ? ts_elem_ptr(b) : NULL, NULL, ts_elem_ptr(out), NULL, NULL, NULL, NULL, 0, 0};
  if (r.q.depthwise) {
    depthwise_forward(&r);
    return TS_OK;
  }
  if (check_blas_sizes(&r.q)) return ts_last_status();
  int64_t nb = chunk_samples(&r.q);
  ts_tensor *buf = NULL;
  if (column_buffer(&r, nb, out->device, &buf)) return ts_last_status();
  for (r.n0 = 0; r.n0 < r.q.N; r.n0 += nb) {
    r.nb = r.q.N - r.n0 < nb ? r.q.N - r.n0 : nb;
    pack_chunk(&r);
    run_products(r.nb * r.q.groups, product_work(&r.q), forward_products, &r);
  }
  ts_release(buf);
  return TS_OK;
}

/* ---- backward -------------------------------------------------------------------------------- */
/* gW_g += g[n, group g] @ cols^T over the chunk's samples, for groups [begin, end): a group's
   weight gradient is written by one thread only. */
static void weight_grad_groups(int64_t begin, int64_t end, void *arg) {
  const conv_run *r = arg;
  const conv_geom *q = &r->q;
  for (int64_t g = begin; g < end; g++)
    for (int64_t m = 0; m < r->nb; m++) {
      cols_view c = cols_of(r, m, g);
      gemm(q, CblasNoTrans, c.transposed ? CblasNoTrans : CblasTrans, q->Og, q->K, q->L,
           at(r->g, ((r->n0 + m) * q->O + g * q->Og) * q->L, q->esz), q->L, c.ptr, c.ld, 1.0,
           at_mut(r->gw, g * q->Og * q->K, q->esz), q->K);
    }
}

/* gcols = W_g^T @ g[n, group g] ([K, L]), or for patches g_n^T @ W ([L, K]); written straight
   into gx for direct convs. */
static void input_grad_products(int64_t begin, int64_t end, void *arg) {
  const conv_run *r = arg;
  const conv_geom *q = &r->q;
  for (int64_t p = begin; p < end; p++) {
    int64_t m = p / q->groups, g = p % q->groups;
    const char *gout = at(r->g, ((r->n0 + m) * q->O + g * q->Og) * q->L, q->esz);
    if (q->kind == COLS_PATCHES) {
      gemm(q, CblasTrans, CblasNoTrans, q->L, q->K, q->O, gout, q->L, r->w, q->K, 0.0,
           at_mut(r->buf, m * q->L * q->K, q->esz), q->K);
      continue;
    }
    char *gcols = q->kind == COLS_DIRECT ? at_mut(r->gx, ((r->n0 + m) * q->C + g * q->Cg) * q->L, q->esz)
                                         : at_mut(r->buf, (m * q->C * q->kh * q->kw + g * q->K) * q->L, q->esz);
    gemm(q, CblasTrans, CblasNoTrans, q->K, q->L, q->Og, at(r->w, g * q->Og * q->K, q->esz), q->K, gout, q->L, 0.0,
         gcols, q->L);
  }
}

/* gb[o] = sum of g over samples and pixels. */
static void bias_grad_channels(int64_t begin, int64_t end, void *arg) {
  const conv_run *r = arg;
  const conv_geom *q = &r->q;
  for (int64_t o = begin; o < end; o++) {
    double sum = 0;
    for (int64_t n = 0; n < q->N; n++) {
      int64_t base = (n * q->O + o) * q->L;
      if (q->dtype == TS_F32)
        for (int64_t l = 0; l < q->L; l++) sum += ((const float *)r->g)[base + l];
      else
        for (int64_t l = 0; l < q->L; l++) sum += ((const double *)r->g)[base + l];
    }
    if (q->dtype == TS_F32)
      ((float *)r->gb)[o] = (float)sum;
    else
      ((double *)r->gb)[o] = sum;
  }
}

static void backward_chunk(conv_run *r) {
  const conv_geom *q = &r->q;
  if (r->gw) {
    pack_chunk(r);
    if (product_work(q) > GEMM_SINGLE_THREAD_WORK || q->groups == 1)
      weight_grad_groups(0, q->groups, r);
    else
      ts_parallel_for(q->groups, 1, weight_grad_groups, r);
  }
  if (r->gx) {
    run_products(r->nb * q->groups, product_work(q), input_grad_products, r);
    unpack_chunk(r);
  }
}

int cpu_conv2d_backward(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g, const ts_tensor *x,
                        const ts_tensor *w, const int64_t stride[2], const int64_t padding[2],
                        const int64_t dilation[2], int64_t groups) {
  conv_run r = {make_geom(x, w, g, stride, padding, dilation, groups), ts_elem_ptr(x), ts_elem_ptr(w), NULL,
                ts_elem_ptr(g), NULL, NULL, NULL, NULL, NULL, 0, 0};
  if (!r.q.depthwise && check_blas_sizes(&r.q)) return ts_last_status();
  if (gb) {
    r.gb = ts_elem_ptr(gb);
    ts_parallel_for(r.q.O, cpu_grain(r.q.N * r.q.L), bias_grad_channels, &r);
  }
  if (!gx && !gw) return TS_OK;
  r.gx = gx ? ts_elem_ptr(gx) : NULL;
  r.gw = gw ? ts_elem_ptr(gw) : NULL;
  if (r.q.depthwise) {
    depthwise_backward(&r);
    return TS_OK;
  }
  if (gw) memset(r.gw, 0, (size_t)(ts_numel(gw) * r.q.esz));
  int64_t nb = chunk_samples(&r.q);
  ts_tensor *buf = NULL;
  if (column_buffer(&r, nb, x->device, &buf)) return ts_last_status();
  for (r.n0 = 0; r.n0 < r.q.N; r.n0 += nb) {
    r.nb = r.q.N - r.n0 < nb ? r.q.N - r.n0 : nb;
    backward_chunk(&r);
  }
  ts_release(buf);
  return TS_OK;
}

/* nn.c — CPU kernels for linear layers (OpenBLAS), softmax / log_softmax and dropout's masked
 * scaling, and the row chunking the nn kernels use for deterministic parallel sums.
 *
 * Kernels take float32 or float64 tensors (the compute dtypes). Each body is written once for both,
 * as an always-inline function of a constant `f64` flag, so the compiler emits one specialised
 * loop per dtype. Sums accumulate in double. */
#include "cpu.h"

#include <cblas.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "values.h"

/* ---- row chunks ------------------------------------------------------------------------------ */
enum { CHUNK_WORK = 16384, MAX_CHUNKS = 64 };

int64_t cpu_row_chunks(int64_t rows, int64_t cols) {
  double work = (double)rows * (double)(cols > 0 ? cols : 1);
  int64_t chunks = (int64_t)(work / CHUNK_WORK);
  if (chunks > MAX_CHUNKS) chunks = MAX_CHUNKS;
  if (chunks > rows) chunks = rows;
  return chunks < 1 ? 1 : chunks;
}

void cpu_combine_chunks(void *dst, int f64, const double *partial, int64_t chunks, int64_t stride, int64_t offset,
                        int64_t n) {
  for (int64_t j = 0; j < n; j++) {
    double s = 0;
    for (int64_t k = 0; k < chunks; k++) s += partial[k * stride + offset + j];
    store(dst, j, s, f64);
  }
}

/* ---- linear ---------------------------------------------------------------------------------- */
/* A [rows, cols] operand as BLAS reads it (the runtime guarantees one of the two layouts). */
typedef struct {
  CBLAS_TRANSPOSE trans; /* NoTrans: stored row-major; Trans: stored as its transpose, row-major */
  int ld;
  const void *data;
} blas_matrix;

static blas_matrix blas_view(const ts_tensor *t) {
  int64_t cols = t->shape[1];
  if (t->stride[1] == 1 && t->stride[0] >= cols) return (blas_matrix){CblasNoTrans, (int)t->stride[0], ts_elem_ptr(t)};
  return (blas_matrix){CblasTrans, (int)t->stride[1], ts_elem_ptr(t)};
}

static CBLAS_TRANSPOSE flip(CBLAS_TRANSPOSE t) { return t == CblasNoTrans ? CblasTrans : CblasNoTrans; }

/* c (m x n, row-major, ldc) = op(a) @ op(b) + beta c. */
static void gemm(int dtype, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int64_t m, int64_t n, int64_t k, const void *a,
                 int lda, const void *b, int ldb, double beta, void *c, int64_t ldc) {
  if (dtype == TS_F64)
    cblas_dgemm(CblasRowMajor, ta, tb, (int)m, (int)n, (int)k, 1.0, a, lda, b, ldb, beta, c, (int)ldc);
  else
    cblas_sgemm(CblasRowMajor, ta, tb, (int)m, (int)n, (int)k, 1.0f, a, lda, b, ldb, (float)beta, c, (int)ldc);
}

static int check_int_sizes(const char *op, int count, const int64_t *sizes) {
  for (int i = 0; i < count; i++)
    if (sizes[i] > INT_MAX)
      return ts_set_error(TS_ERR_UNSUPPORTED, "%s: a dim or stride of %lld exceeds what BLAS accepts (%d)", op,
                          (long long)sizes[i], INT_MAX);
  return TS_OK;
}

static int check_blas_operands(const char *op, const ts_tensor *a, const ts_tensor *b, int64_t extra) {
  int64_t sizes[8] = {a->shape[0], a->shape[1], a->stride[0], a->stride[1],
                      b->shape[0], b->stride[0], b->stride[1], extra};
  return check_int_sizes(op, 8, sizes);
}

/* Rows [begin, end) of out set to the bias row: a pass over the whole output, worth both cores. */
typedef struct { char *out; const char *bias; size_t row_bytes; } bias_rows_ctx;

static void bias_rows_range(int64_t begin, int64_t end, void *arg) {
  const bias_rows_ctx *c = arg;
  for (int64_t r = begin; r < end; r++) memcpy(c->out + r * (int64_t)c->row_bytes, c->bias, c->row_bytes);
}

int cpu_linear(ts_tensor *out, const ts_tensor *x, const ts_tensor *w, const ts_tensor *b) {
  int64_t m = x->shape[0], k = x->shape[1], n = w->shape[0];
  int64_t esz = ts_dtype_size(out->dtype);
  char *o = ts_elem_ptr(out);
  if (b) { /* rows start as the bias; the product adds to them (beta = 1) */
    bias_rows_ctx c = {o, ts_elem_ptr(b), (size_t)(n * esz)};
    ts_parallel_for(m, CPU_PARALLEL_GRAIN / (n > 0 ? n : 1) + 1, bias_rows_range, &c);
  }
  if (k == 0) return b ? TS_OK : cpu_fill(out, 0);
  if (check_blas_operands("linear", x, w, n)) return ts_last_status();
  blas_matrix xm = blas_view(x), wm = blas_view(w);
  /* op(B) must be w^T (k x n): w stored row-major [n, k] is transposed by BLAS, w stored
     column-major already is w^T row-major. */
  gemm(out->dtype, xm.trans, flip(wm.trans), m, n, k, xm.data, xm.ld, wm.data, wm.ld, b ? 1.0 : 0.0, o, n);
  return TS_OK;
}

/* gb[j] = sum over rows of g[r, j]: per-chunk partial sums in double, combined in chunk order. */
typedef struct {
  const void *g;
  int64_t rows, cols, chunks;
  double *partial;
  int f64;
} column_sum_ctx;

ALWAYS_INLINE void column_sum_body(const column_sum_ctx *c, int64_t chunk, int f64) {
  double *acc = c->partial + chunk * c->cols;
  int64_t r0 = chunk * c->rows / c->chunks, r1 = (chunk + 1) * c->rows / c->chunks;
  for (int64_t j = 0; j < c->cols; j++) acc[j] = 0;
  for (int64_t r = r0; r < r1; r++)
    for (int64_t j = 0; j < c->cols; j++) acc[j] += load(c->g, r * c->cols + j, f64);
}

static void column_sum_range(int64_t begin, int64_t end, void *arg) {
  const column_sum_ctx *c = arg;
  for (int64_t chunk = begin; chunk < end; chunk++) {
    if (c->f64) column_sum_body(c, chunk, 1);
    else column_sum_body(c, chunk, 0);
  }
}

static int column_sums(ts_tensor *gb, const ts_tensor *g) {
  column_sum_ctx c = {ts_elem_ptr(g), g->shape[0], g->shape[1], cpu_row_chunks(g->shape[0], g->shape[1]), NULL,
                      g->dtype == TS_F64};
  c.partial = malloc((size_t)(c.chunks * c.cols) * sizeof(double) + 1);
  if (!c.partial) return ts_set_error(TS_ERR_MEMORY, "linear backward: out of host memory");
  ts_parallel_for(c.chunks, 1, column_sum_range, &c);
  cpu_combine_chunks(ts_elem_ptr(gb), c.f64, c.partial, c.chunks, c.cols, 0, c.cols);
  free(c.partial);
  return TS_OK;
}

int cpu_linear_backward(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g, const ts_tensor *x,
                        const ts_tensor *w) {
  int64_t m = g->shape[0], n = g->shape[1];
  int dtype = g->dtype;
  if (gx && ts_numel(gx) > 0) {
    int64_t k = gx->shape[1];
    if (n == 0) {
      cpu_fill(gx, 0);
    } else {
      if (check_blas_operands("linear backward", g, w, k)) return ts_last_status();
      blas_matrix wm = blas_view(w); /* gx [m, k] = g [m, n] @ w [n, k] */
      gemm(dtype, CblasNoTrans, wm.trans, m, k, n, ts_elem_ptr(g), (int)n, wm.data, wm.ld, 0.0, ts_elem_ptr(gx), k);
    }
  }
  if (gw && ts_numel(gw) > 0) {
    int64_t k = gw->shape[1];
    if (m == 0) {
      cpu_fill(gw, 0);
    } else {
      if (check_blas_operands("linear backward", g, x, k)) return ts_last_status();
      blas_matrix xm = blas_view(x); /* gw [n, k] = g^T [n, m] @ x [m, k] */
      gemm(dtype, CblasTrans, xm.trans, n, k, m, ts_elem_ptr(g), (int)n, xm.data, xm.ld, 0.0, ts_elem_ptr(gw), k);
    }
  }
  if (gb && ts_numel(gb) > 0) return column_sums(gb, g);
  return TS_OK;
}

/* ---- softmax --------------------------------------------------------------------------------- */
/* [A, D, B] tensors, softmax over D. With B = 1 each of the A rows is contiguous; otherwise a task
   takes a block of up to BLOCK neighbouring columns (b values) of one a, so that every pass over D
   reads whole cache lines and the inner loop runs along contiguous memory. */
enum { BLOCK = 64 };

typedef struct {
  const void *x, *y, *g; /* forward: x; backward: y and g */
  void *out;             /* y (forward) or gx (backward) */
  int64_t a, d, b, blocks_per_a;
  int log;
} softmax_ctx;

ALWAYS_INLINE void softmax_row(const softmax_ctx *c, int64_t row, int f64) {
  const int64_t d = c->d, base = row * d;
  double mx = -INFINITY, sum = 0;
  for (int64_t i = 0; i < d; i++) {
    double v = load(c->x, base + i, f64);
    mx = v > mx ? v : mx;
  }
  for (int64_t i = 0; i < d; i++) {
    double e = exp_of(load(c->x, base + i, f64) - mx, f64);
    sum += e;
    if (!c->log) store(c->out, base + i, e, f64);
  }
  if (c->log) {
    double shift = mx + log(sum);
    for (int64_t i = 0; i < d; i++) store(c->out, base + i, load(c->x, base + i, f64) - shift, f64);
  } else {
    double inv = 1.0 / sum;
    for (int64_t i = 0; i < d; i++) store(c->out, base + i, load(c->out, base + i, f64) * inv, f64);
  }
}

ALWAYS_INLINE void softmax_block(const softmax_ctx *c, int64_t task, int f64) {
  int64_t a = task / c->blocks_per_a, b0 = (task % c->blocks_per_a) * BLOCK;
  int64_t len = c->b - b0 < BLOCK ? c->b - b0 : BLOCK, base = a * c->d * c->b + b0;
  double mx[BLOCK], sum[BLOCK];
  for (int64_t j = 0; j < len; j++) mx[j] = -INFINITY, sum[j] = 0;
  for (int64_t i = 0; i < c->d; i++)
    for (int64_t j = 0; j < len; j++) {
      double v = load(c->x, base + i * c->b + j, f64);
      mx[j] = v > mx[j] ? v : mx[j];
    }
  for (int64_t i = 0; i < c->d; i++)
    for (int64_t j = 0; j < len; j++) {
      int64_t at = base + i * c->b + j;
      double e = exp_of(load(c->x, at, f64) - mx[j], f64);
      sum[j] += e;
      if (!c->log) store(c->out, at, e, f64);
    }
  for (int64_t j = 0; j < len; j++) sum[j] = c->log ? mx[j] + log(sum[j]) : 1.0 / sum[j];
  for (int64_t i = 0; i < c->d; i++)
    for (int64_t j = 0; j < len; j++) {
      int64_t at = base + i * c->b + j;
      store(c->out, at, c->log ? load(c->x, at, f64) - sum[j] : load(c->out, at, f64) * sum[j], f64);
    }
}

/* softmax: gx = y (g - sum(g y)); log_softmax: gx = g - exp(y) sum(g). */
ALWAYS_INLINE void softmax_backward_row(const softmax_ctx *c, int64_t row, int f64) {
  const int64_t d = c->d, base = row * d;
  double dot = 0;
  for (int64_t i = 0; i < d; i++) {
    double gv = load(c->g, base + i, f64);
    dot += c->log ? gv : gv * load(c->y, base + i, f64);
  }
  for (int64_t i = 0; i < d; i++) {
    double gv = load(c->g, base + i, f64), yv = load(c->y, base + i, f64);
    store(c->out, base + i, c->log ? gv - exp_of(yv, f64) * dot : yv * (gv - dot), f64);
  }
}

ALWAYS_INLINE void softmax_backward_block(const softmax_ctx *c, int64_t task, int f64) {
  int64_t a = task / c->blocks_per_a, b0 = (task % c->blocks_per_a) * BLOCK;
  int64_t len = c->b - b0 < BLOCK ? c->b - b0 : BLOCK, base = a * c->d * c->b + b0;
  double dot[BLOCK];
  for (int64_t j = 0; j < len; j++) dot[j] = 0;
  for (int64_t i = 0; i < c->d; i++)
    for (int64_t j = 0; j < len; j++) {
      int64_t at = base + i * c->b + j;
      double gv = load(c->g, at, f64);
      dot[j] += c->log ? gv : gv * load(c->y, at, f64);
    }
  for (int64_t i = 0; i < c->d; i++)
    for (int64_t j = 0; j < len; j++) {
      int64_t at = base + i * c->b + j;
      double gv = load(c->g, at, f64), yv = load(c->y, at, f64);
      store(c->out, at, c->log ? gv - exp_of(yv, f64) * dot[j] : yv * (gv - dot[j]), f64);
    }
}

static int is_f64(const ts_tensor *t) { return t->dtype == TS_F64; }

static void softmax_rows_f32(int64_t begin, int64_t end, void *arg) {
  for (int64_t r = begin; r < end; r++) softmax_row(arg, r, 0);
}
static void softmax_rows_f64(int64_t begin, int64_t end, void *arg) {
  for (int64_t r = begin; r < end; r++) softmax_row(arg, r, 1);
}
static void softmax_blocks_f32(int64_t begin, int64_t end, void *arg) {
  for (int64_t t = begin; t < end; t++) softmax_block(arg, t, 0);
}
static void softmax_blocks_f64(int64_t begin, int64_t end, void *arg) {
  for (int64_t t = begin; t < end; t++) softmax_block(arg, t, 1);
}
static void backward_rows_f32(int64_t begin, int64_t end, void *arg) {
  for (int64_t r = begin; r < end; r++) softmax_backward_row(arg, r, 0);
}
static void backward_rows_f64(int64_t begin, int64_t end, void *arg) {
  for (int64_t r = begin; r < end; r++) softmax_backward_row(arg, r, 1);
}
static void backward_blocks_f32(int64_t begin, int64_t end, void *arg) {
  for (int64_t t = begin; t < end; t++) softmax_backward_block(arg, t, 0);
}
static void backward_blocks_f64(int64_t begin, int64_t end, void *arg) {
  for (int64_t t = begin; t < end; t++) softmax_backward_block(arg, t, 1);
}

/* Runs rows (B = 1) or column blocks over the pool; a task holds D (times BLOCK) elements. */
static void run_softmax(softmax_ctx *c, int f64, ts_range_fn rows[2], ts_range_fn blocks[2]) {
  int64_t per_task = c->d > 0 ? c->d : 1;
  if (c->b == 1) {
    ts_parallel_for(c->a, CPU_PARALLEL_GRAIN / per_task + 1, rows[f64], c);
  } else {
    c->blocks_per_a = (c->b + BLOCK - 1) / BLOCK;
    ts_parallel_for(c->a * c->blocks_per_a, CPU_PARALLEL_GRAIN / (per_task * BLOCK) + 1, blocks[f64], c);
  }
}

int cpu_softmax(ts_tensor *out, const ts_tensor *x, int log) {
  softmax_ctx c = {ts_elem_ptr(x), NULL, NULL, ts_elem_ptr(out), x->shape[0], x->shape[1], x->shape[2], 0, log};
  ts_range_fn rows[2] = {softmax_rows_f32, softmax_rows_f64}, blocks[2] = {softmax_blocks_f32, softmax_blocks_f64};
  run_softmax(&c, is_f64(out), rows, blocks);
  return TS_OK;
}

int cpu_softmax_backward(ts_tensor *gx, const ts_tensor *g, const ts_tensor *y, int log) {
  softmax_ctx c = {NULL, ts_elem_ptr(y), ts_elem_ptr(g), ts_elem_ptr(gx),
                   y->shape[0], y->shape[1], y->shape[2], 0, log};
  ts_range_fn rows[2] = {backward_rows_f32, backward_rows_f64}, blocks[2] = {backward_blocks_f32, backward_blocks_f64};
  run_softmax(&c, is_f64(gx), rows, blocks);
  return TS_OK;
}

/* ---- dropout: out = x * mask * scale --------------------------------------------------------- */
typedef struct { double scale; } masked_scale_ctx;

/* x * 0 where dropped (not a plain 0), so that an inf or NaN input stays visible, as in PyTorch. */
#define MASKED_SCALE_LOOP(T)                                                                       \
  if (strides[0] == (int64_t)sizeof(T) && strides[1] == (int64_t)sizeof(T) && strides[2] == 1) { \
    T *o = (T *)ptrs[0];                                                                           \
    const T *v = (const T *)ptrs[1];                                                               \
    const uint8_t *m = (const uint8_t *)ptrs[2];                                                   \
    for (int64_t i = 0; i < n; i++) o[i] = v[i] * (m[i] ? (T)scale : (T)0);                       \
    return;                                                                                        \
  }                                                                                                \
  for (int64_t i = 0; i < n; i++) {                                                                \
    T *o = (T *)(ptrs[0] + i * strides[0]);                                                        \
    T v = *(const T *)(ptrs[1] + i * strides[1]);                                                  \
    *o = v * (T)(*(const uint8_t *)(ptrs[2] + i * strides[2]) ? scale : 0.0);                      \
  }

static void masked_scale_f32(int64_t n, char **ptrs, const int64_t *strides, void *ctx) {
  double scale = ((masked_scale_ctx *)ctx)->scale;
  MASKED_SCALE_LOOP(float)
}
static void masked_scale_f64(int64_t n, char **ptrs, const int64_t *strides, void *ctx) {
  double scale = ((masked_scale_ctx *)ctx)->scale;
  MASKED_SCALE_LOOP(double)
}

int cpu_masked_scale(ts_tensor *out, const ts_tensor *x, const ts_tensor *mask, double scale) {
  masked_scale_ctx c = {scale};
  const ts_tensor *ops[3] = {out, x, mask};
  cpu_foreach(3, ops, is_f64(out) ? masked_scale_f64 : masked_scale_f32, &c);
  return TS_OK;
}

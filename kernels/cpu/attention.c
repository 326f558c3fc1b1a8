/* attention.c — scaled dot-product attention on the CPU, flash-attention style.
 *
 * One kernel serves both backend contracts: contiguous [BH, rows, cols] blocks (attention) and
 * strided head views [B, H, rows, cols] with contiguous rows (attention_views), which read the
 * heads straight out of packed projections such as timm's qkv Linear output and write outputs and
 * gradients straight into packed layouts (see head_layout).
 *
 * The work is cut into tiles of query rows of one (batch·head) block. A forward tile computes its
 * scores S = scale q kᵀ + bias, exponentiates them in place (the row max subtracted first, so exp
 * never overflows), multiplies them by v and divides each output row by its row's sum. Only each
 * row's log-sum-exp is kept; backward recomputes P = exp(S - lse) tile by tile and forms
 *     dV += Pᵀ dO,   dP = dO Vᵀ,   dS = P ∘ (dP − rowsum(dO ∘ O)),
 *     dQ = scale dS K,   dK += scale dSᵀ Q,   dBias += dS.
 * A task holds at most one tile of scores in forward (two in backward: P and dP); no [Nq, Nk]
 * matrix is ever stored per (batch, head).
 *
 * A row whose scores are all -inf (masked entirely) has no softmax. It is defined as zeros, with
 * lse = -inf, and gets zero gradients: no NaN comes out of a fully masked window.
 *
 * Products go to OpenBLAS from our worker threads. That is safe and fast only while OpenBLAS runs
 * each call on the calling thread, which it does when m·n·k stays within its threading threshold
 * (see linalg.c); every product here is cut into pieces below it, so the two thread pools never
 * run at the same time. Compute is float32 (float16/bfloat16 arrive converted) or float64. */
#include "cpu.h"
#include "fastmath.h"

#include <cblas.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* OpenBLAS 0.3 runs a gemm on the calling thread when m*n*k <= 65536 * 4 (see linalg.c). */
static const int64_t GEMM_SINGLE_THREAD_WORK = 65536 * 4;
/* Query rows per tile at least this many when the sizes allow: BLAS is slow on thin products. */
static const int64_t MIN_TILE_ROWS = 16;
/* Multiply-adds a chunk of work should hold before it is worth handing to another thread. */
static const double MIN_CHUNK_WORK = 1 << 20;

/* ---- exp over a row (exp_f32 from fastmath.h: inlined and vectorized it is about 3x faster than a
   libm expf call per element, which otherwise costs as much as a tile's two products) ---------- */
enum { LANES = 8 }; /* independent accumulators: fixed-length inner loops the compiler vectorizes */

/* s[j] = exp(s[j] - shift), returning the sum; shift is finite and no s[j] is NaN. */
static float exp_shifted_f32(float *s, int64_t n, float shift) {
  float acc[LANES] = {0}, sum = 0;
  int64_t j = 0;
  for (; j + LANES <= n; j += LANES)
    for (int l = 0; l < LANES; l++) {
      float y = exp_f32(s[j + l] - shift);
      s[j + l] = y;
      acc[l] += y;
    }
  for (; j < n; j++) {
    s[j] = exp_f32(s[j] - shift);
    sum += s[j];
  }
  for (int l = 0; l < LANES; l++) sum += acc[l];
  return sum;
}

static double exp_shifted_f64(double *s, int64_t n, double shift) {
  double sum = 0;
  for (int64_t j = 0; j < n; j++) {
    s[j] = exp(s[j] - shift);
    sum += s[j];
  }
  return sum;
}

/* ---- typed row kernels ------------------------------------------------------------------------ */
typedef struct {
  void (*gemm)(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k, double alpha, const void *a, int lda,
               const void *b, int ldb, double beta, void *c, int ldc);
  /* s[i, j] += bias[i * rs + j * cs] */
  void (*add_bias)(void *s, int64_t rows, int64_t cols, const void *bias, int64_t rs, int64_t cs);
  /* rows of scores → exp(s - max) in place, not yet normalized: lse[i] = log Σ_j exp s[i, j] and
     inv[i] = 1 / Σ_j exp(s[i, j] - max), 0 for a row masked entirely (it holds zeros) */
  void (*exp_rows)(void *s, int64_t rows, int64_t cols, void *lse, void *inv);
  /* x[i, :] *= inv[i] for rows ld apart */
  void (*scale_rows)(void *x, int64_t rows, int64_t cols, int64_t ld, const void *inv);
  /* rows of scores → exp(s - lse) in place */
  void (*probs_from_lse)(void *s, int64_t rows, int64_t cols, const void *lse);
  /* out[i] = Σ_j a[i, j] b[i, j]; rows lda and ldb elements apart */
  void (*row_dots)(void *out, const void *a, int64_t lda, const void *b, int64_t ldb, int64_t rows, int64_t cols);
  /* dp[i, j] = p[i, j] (dp[i, j] - delta[i]) */
  void (*softmax_grad)(void *dp, const void *p, int64_t rows, int64_t cols, const void *delta);
  void (*accumulate)(void *dst, const void *src, int64_t n); /* dst += src */
  void (*scale)(void *c, int64_t n, double beta);            /* c *= beta; beta = 0 writes zeros */
} real_ops;

/* Special rows, decided by the row max m: m = -inf means every key is masked (or there is none):
   zeros, lse = -inf. A NaN anywhere, or m = +inf (inf - inf), gives NaN, as a softmax would. */
#define ROW_KERNELS(T, SUF, LOG)                                                                       \
  static void add_bias_##SUF(void *sv, int64_t rows, int64_t cols, const void *bv, int64_t rs, int64_t cs) { \
    T *restrict s = sv;                                                                                \
    const T *restrict b = bv;                                                                          \
    for (int64_t i = 0; i < rows; i++, s += cols, b += rs) {                                           \
      if (cs != 1) {                                                                                   \
        for (int64_t j = 0; j < cols; j++) s[j] += b[j * cs];                                          \
        continue;                                                                                      \
      }                                                                                                \
      int64_t j = 0;                                                                                   \
      for (; j + LANES <= cols; j += LANES)                                                            \
        for (int l = 0; l < LANES; l++) s[j + l] += b[j + l];                                          \
      for (; j < cols; j++) s[j] += b[j];                                                              \
    }                                                                                                  \
  }                                                                                                    \
  /* The max of a row, or NaN when it holds one. */                                                   \
  static T row_max_##SUF(const T *s, int64_t n) {                                                      \
    T m[LANES];                                                                                        \
    int nan[LANES] = {0};                                                                              \
    for (int l = 0; l < LANES; l++) m[l] = -INFINITY;                                                  \
    int64_t j = 0;                                                                                     \
    for (; j + LANES <= n; j += LANES)                                                                 \
      for (int l = 0; l < LANES; l++) {                                                                \
        T x = s[j + l];                                                                                \
        m[l] = x > m[l] ? x : m[l];                                                                    \
        nan[l] |= x != x;                                                                              \
      }                                                                                                \
    for (; j < n; j++) {                                                                               \
      m[0] = s[j] > m[0] ? s[j] : m[0];                                                                \
      nan[0] |= s[j] != s[j];                                                                          \
    }                                                                                                  \
    T best = m[0];                                                                                     \
    for (int l = 0; l < LANES; l++) {                                                                  \
      if (nan[l]) return NAN;                                                                          \
      best = m[l] > best ? m[l] : best;                                                                \
    }                                                                                                  \
    return best;                                                                                       \
  }                                                                                                    \
  /* Fills a special row (see above); returns its lse, or 0 for an ordinary row. */                   \
  static int special_row_##SUF(T *s, int64_t n, T m, T *lse) {                                         \
    if (m == -INFINITY) {                                                                              \
      memset(s, 0, (size_t)n * sizeof(T));                                                             \
      *lse = -INFINITY;                                                                                \
      return 1;                                                                                        \
    }                                                                                                  \
    if (m != m || m == INFINITY) {                                                                     \
      for (int64_t j = 0; j < n; j++) s[j] = NAN;                                                      \
      *lse = NAN;                                                                                      \
      return 1;                                                                                        \
    }                                                                                                  \
    return 0;                                                                                          \
  }                                                                                                    \
  static void exp_rows_##SUF(void *sv, int64_t rows, int64_t cols, void *lv, void *iv) {              \
    T *s = sv, *lse = lv, *inv = iv;                                                                   \
    for (int64_t i = 0; i < rows; i++, s += cols) {                                                    \
      T m = row_max_##SUF(s, cols);                                                                    \
      if (special_row_##SUF(s, cols, m, &lse[i])) {                                                    \
        inv[i] = lse[i] == -INFINITY ? (T)0 : (T)NAN;                                                  \
        continue;                                                                                      \
      }                                                                                                \
      T sum = exp_shifted_##SUF(s, cols, m);                                                           \
      inv[i] = 1 / sum;                                                                                \
      lse[i] = m + LOG(sum);                                                                           \
    }                                                                                                  \
  }                                                                                                    \
  static void scale_rows_##SUF(void *xv, int64_t rows, int64_t cols, int64_t ld, const void *iv) {     \
    const T *inv = iv;                                                                                 \
    for (int64_t i = 0; i < rows; i++) {                                                               \
      T *restrict x = (T *)xv + i * ld, f = inv[i];                                                    \
      for (int64_t j = 0; j < cols; j++) x[j] *= f;                                                    \
    }                                                                                                  \
  }                                                                                                    \
  static void probs_from_lse_##SUF(void *sv, int64_t rows, int64_t cols, const void *lv) {             \
    T *s = sv, ignored;                                                                                \
    const T *lse = lv;                                                                                 \
    for (int64_t i = 0; i < rows; i++, s += cols)                                                      \
      if (!special_row_##SUF(s, cols, lse[i], &ignored)) exp_shifted_##SUF(s, cols, lse[i]);           \
  }                                                                                                    \
  static void row_dots_##SUF(void *ov, const void *av, int64_t lda, const void *bv, int64_t ldb, int64_t rows, \
                             int64_t cols) {                                                           \
    T *out = ov;                                                                                       \
    const T *restrict a = av, *restrict b = bv;                                                        \
    for (int64_t i = 0; i < rows; i++, a += lda, b += ldb) {                                           \
      T acc[LANES] = {0}, sum = 0;                                                                     \
      int64_t j = 0;                                                                                   \
      for (; j + LANES <= cols; j += LANES)                                                            \
        for (int l = 0; l < LANES; l++) acc[l] += a[j + l] * b[j + l];                                 \
      for (; j < cols; j++) sum += a[j] * b[j];                                                        \
      for (int l = 0; l < LANES; l++) sum += acc[l];                                                   \
      out[i] = sum;                                                                                    \
    }                                                                                                  \
  }                                                                                                    \
  static void softmax_grad_##SUF(void *dv, const void *pv, int64_t rows, int64_t cols, const void *ev) {  \
    T *restrict dp = dv;                                                                               \
    const T *restrict p = pv, *delta = ev;                                                             \
    for (int64_t i = 0; i < rows; i++, dp += cols, p += cols) {                                        \
      T di = delta[i];                                                                                 \
      int64_t j = 0;                                                                                   \
      for (; j + LANES <= cols; j += LANES)                                                            \
        for (int l = 0; l < LANES; l++) dp[j + l] = p[j + l] * (dp[j + l] - di);                       \
      for (; j < cols; j++) dp[j] = p[j] * (dp[j] - di);                                               \
    }                                                                                                  \
  }                                                                                                    \
  static void accumulate_##SUF(void *dv, const void *sv, int64_t n) {                                  \
    T *restrict d = dv;                                                                                \
    const T *restrict s = sv;                                                                          \
    int64_t j = 0;                                                                                     \
    for (; j + LANES <= n; j += LANES)                                                                 \
      for (int l = 0; l < LANES; l++) d[j + l] += s[j + l];                                            \
    for (; j < n; j++) d[j] += s[j];                                                                   \
  }                                                                                                    \
  static void scale_##SUF(void *cv, int64_t n, double beta) {                                          \
    T *c = cv;                                                                                         \
    if (beta == 0)                                                                                     \
      memset(c, 0, (size_t)n * sizeof(T));                                                             \
    else                                                                                               \
      for (int64_t i = 0; i < n; i++) c[i] *= (T)beta;                                                 \
  }

ROW_KERNELS(float, f32, logf)
ROW_KERNELS(double, f64, log)

static void gemm_f32(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k, double alpha, const void *a, int lda,
                     const void *b, int ldb, double beta, void *c, int ldc) {
  cblas_sgemm(CblasRowMajor, ta, tb, m, n, k, (float)alpha, a, lda, b, ldb, (float)beta, c, ldc);
}

static void gemm_f64(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k, double alpha, const void *a, int lda,
                     const void *b, int ldb, double beta, void *c, int ldc) {
  cblas_dgemm(CblasRowMajor, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

static const real_ops OPS_F32 = {gemm_f32, add_bias_f32, exp_rows_f32, scale_rows_f32, probs_from_lse_f32,
                                 row_dots_f32, softmax_grad_f32, accumulate_f32, scale_f32};
static const real_ops OPS_F64 = {gemm_f64, add_bias_f64, exp_rows_f64, scale_rows_f64, probs_from_lse_f64,
                                 row_dots_f64, softmax_grad_f64, accumulate_f64, scale_f64};

/* ---- products small enough for OpenBLAS to run on the calling thread -------------------------- */
static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* A row-major operand: element (i, j) of op(X) is at base + (i*ld + j) or (j*ld + i) elements. */
typedef struct { const char *base; CBLAS_TRANSPOSE trans; int64_t ld; } operand;

static const char *at(operand x, int64_t i, int64_t j, size_t esz) {
  int64_t off = x.trans == CblasNoTrans ? i * x.ld + j : j * x.ld + i;
  return x.base + off * (int64_t)esz;
}

/* C (m x n, row stride ldc) = alpha op(A) op(B) + beta C, op(A) m x k, op(B) k x n, as pieces of at
   most GEMM_SINGLE_THREAD_WORK multiply-adds each. */
static void small_gemm(const real_ops *o, size_t esz, int64_t m, int64_t n, int64_t k, double alpha, operand a,
                       operand b, double beta, char *c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) { /* an empty sum: BLAS would reject the leading dims */
    for (int64_t i = 0; i < m; i++) o->scale(c + i * ldc * (int64_t)esz, n, beta);
    return;
  }
  int64_t tk = min64(k, 256);
  int64_t tm = min64(m, max64(1, GEMM_SINGLE_THREAD_WORK / (tk * min64(n, 64))));
  int64_t tn = min64(n, max64(1, GEMM_SINGLE_THREAD_WORK / (tm * tk)));
  for (int64_t i = 0; i < m; i += tm)
    for (int64_t j = 0; j < n; j += tn)
      for (int64_t p = 0; p < k; p += tk) {
        int mm = (int)min64(tm, m - i), nn = (int)min64(tn, n - j), kk = (int)min64(tk, k - p);
        o->gemm(a.trans, b.trans, mm, nn, kk, alpha, at(a, i, p, esz), (int)a.ld, at(b, p, j, esz), (int)b.ld,
                p == 0 ? beta : 1.0, c + (i * ldc + j) * (int64_t)esz, (int)ldc);
      }
}

static operand plain(const void *base, int64_t ld) { return (operand){base, CblasNoTrans, ld}; }
static operand transposed(const void *base, int64_t ld) { return (operand){base, CblasTrans, ld}; }

/* ---- the plan shared by all tasks ------------------------------------------------------------- */
/* Where the matrix of head h of an operand is: heads h = b·H + j (H = `inner` heads per image,
   whatever layout the operand has) start at base + b·outer + j·inner elements, rows ld apart, and
   every row is contiguous. Contiguous [BH, rows, cols] blocks are H = 1, outer = rows·cols;
   [B, N, 3·H·hd] packed projections are outer = N·3·H·hd, inner = hd, ld = 3·H·hd. */
typedef struct { const char *base; int64_t outer, inner, ld; } head_layout;

typedef struct {
  const real_ops *ops;
  size_t esz;
  int64_t heads, inner, nq, nk; /* heads = B·inner (batch·head) blocks */
  int64_t dim_qk, dim_v;        /* q [heads, nq, dim_qk], k [heads, nk, dim_qk], v [heads, nk, dim_v] */
  int64_t tile, tiles;          /* query rows per tile, tiles per head */
  double scale;
  head_layout q, k, v, out, dout; /* out: written by forward, read by backward */
  head_layout grad_q, grad_k, grad_v; /* backward outputs, base NULL when not wanted */
  const char *lse;              /* [heads, nq] contiguous, read by backward */
  char *lse_w;                  /* written by forward */
  /* bias: leading dims E enumerate the heads row-major; element strides, 0 where broadcast */
  const char *bias;
  int nlead;
  int64_t lead_size[TS_MAX_DIMS], lead_stride[TS_MAX_DIMS], head_stride[TS_MAX_DIMS];
  int64_t bias_rs, bias_cs;
  /* bias gradient: heads sharing one bias block form a group; each group's members are split
     into `parts`, each summing into its own buffer, so that no two tasks write one block */
  int kept[TS_MAX_DIMS];
  int64_t groups, members, parts;
  char *dbias_acc; /* [parts][groups][nq * nk] */
  int failed;      /* a worker could not allocate its scratch */
} plan;

/* Row r of head h of an operand. */
static char *row_of(const plan *p, head_layout x, int64_t h, int64_t r) {
  int64_t off = (h / p->inner) * x.outer + (h % p->inner) * x.inner + r * x.ld;
  return (char *)x.base + off * (int64_t)p->esz;
}

static int64_t bias_offset(const plan *p, int64_t h) {
  int64_t off = 0;
  for (int d = p->nlead - 1; d >= 0; d--) {
    off += (h % p->lead_size[d]) * p->lead_stride[d];
    h /= p->lead_size[d];
  }
  return off;
}

/* Scores of query rows [r0, r0 + rows) of head h into s (rows x nk). */
static void scores(const plan *p, int64_t h, int64_t r0, int64_t rows, char *s) {
  const real_ops *o = p->ops;
  size_t e = p->esz;
  small_gemm(o, e, rows, p->nk, p->dim_qk, p->scale, plain(row_of(p, p->q, h, r0), p->q.ld),
             transposed(row_of(p, p->k, h, 0), p->k.ld), 0.0, s, p->nk);
  if (p->bias)
    o->add_bias(s, rows, p->nk, p->bias + (bias_offset(p, h) + r0 * p->bias_rs) * (int64_t)e, p->bias_rs, p->bias_cs);
}

static void mark_failed(plan *p) { __atomic_store_n(&p->failed, 1, __ATOMIC_RELAXED); }

/* ---- forward ---------------------------------------------------------------------------------- */
/* The probabilities are left unnormalized: out = (exp(S - max) V) / sum scales the Dv columns of out
   instead of the Nk columns of the scores. */
static void forward_tile(const plan *p, int64_t h, int64_t t, char *s, char *inv) {
  const real_ops *o = p->ops;
  size_t e = p->esz;
  int64_t r0 = t * p->tile, rows = min64(p->tile, p->nq - r0);
  scores(p, h, r0, rows, s);
  o->exp_rows(s, rows, p->nk, p->lse_w + (h * p->nq + r0) * (int64_t)e, inv);
  char *out = row_of(p, p->out, h, r0);
  small_gemm(o, e, rows, p->dim_v, p->nk, 1.0, plain(s, p->nk), plain(row_of(p, p->v, h, 0), p->v.ld), 0.0, out,
             p->out.ld);
  o->scale_rows(out, rows, p->dim_v, p->out.ld, inv);
}

static void forward_range(int64_t begin, int64_t end, void *arg) {
  plan *p = arg;
  char *s = malloc((size_t)max64(1, p->tile * (p->nk + 1)) * p->esz); /* scores, then the rows' 1/sum */
  if (!s) {
    mark_failed(p);
    return;
  }
  for (int64_t item = begin; item < end; item++)
    forward_tile(p, item / p->tiles, item % p->tiles, s, s + p->tile * p->nk * (int64_t)p->esz);
  free(s);
}

/* ---- backward --------------------------------------------------------------------------------- */
/* Scratch of one task: P and dP tiles and the tile's row dots. */
static size_t backward_scratch_size(const plan *p) { return (size_t)max64(1, p->tile * (2 * p->nk + 1)) * p->esz; }

/* Zeros rows x cols of head h of x (a gradient summed over the query tiles). */
static void zero_head(const plan *p, head_layout x, int64_t h, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; r++) p->ops->scale(row_of(p, x, h, r), cols, 0.0);
}

/* The gradients of head h; dS is also added into acc ([nq, nk]) when the bias needs a gradient. */
static void backward_head(const plan *p, int64_t h, char *acc, char *scratch) {
  const real_ops *o = p->ops;
  int64_t e = (int64_t)p->esz, nq = p->nq, nk = p->nk, dqk = p->dim_qk, dv = p->dim_v;
  char *P = scratch, *dP = P + p->tile * nk * e, *delta = dP + p->tile * nk * e;
  const char *k = row_of(p, p->k, h, 0), *v = row_of(p, p->v, h, 0);
  char *grad_k = p->grad_k.base ? row_of(p, p->grad_k, h, 0) : NULL;
  char *grad_v = p->grad_v.base ? row_of(p, p->grad_v, h, 0) : NULL;
  if (grad_k) zero_head(p, p->grad_k, h, nk, dqk); /* both sum over the query tiles */
  if (grad_v) zero_head(p, p->grad_v, h, nk, dv);
  int need_ds = p->grad_q.base || grad_k || acc;
  for (int64_t r0 = 0; r0 < nq; r0 += p->tile) {
    int64_t rows = min64(p->tile, nq - r0), row = h * nq + r0;
    const char *q = row_of(p, p->q, h, r0), *dout = row_of(p, p->dout, h, r0);
    scores(p, h, r0, rows, P);
    o->probs_from_lse(P, rows, nk, p->lse + row * e);
    if (grad_v)
      small_gemm(o, p->esz, nk, dv, rows, 1.0, transposed(P, nk), plain(dout, p->dout.ld), 1.0, grad_v, p->grad_v.ld);
    if (!need_ds) continue;
    small_gemm(o, p->esz, rows, nk, dv, 1.0, plain(dout, p->dout.ld), transposed(v, p->v.ld), 0.0, dP, nk);
    o->row_dots(delta, dout, p->dout.ld, row_of(p, p->out, h, r0), p->out.ld, rows, dv);
    o->softmax_grad(dP, P, rows, nk, delta); /* dP now holds dS */
    if (acc) o->accumulate(acc + r0 * nk * e, dP, rows * nk);
    if (p->grad_q.base)
      small_gemm(o, p->esz, rows, dqk, nk, p->scale, plain(dP, nk), plain(k, p->k.ld), 0.0,
                 row_of(p, p->grad_q, h, r0), p->grad_q.ld);
    if (grad_k)
      small_gemm(o, p->esz, nk, dqk, rows, p->scale, transposed(dP, nk), plain(q, p->q.ld), 1.0, grad_k, p->grad_k.ld);
  }
}

static void backward_heads_range(int64_t begin, int64_t end, void *arg) {
  plan *p = arg;
  char *scratch = malloc(backward_scratch_size(p));
  if (!scratch) {
    mark_failed(p);
    return;
  }
  for (int64_t h = begin; h < end; h++) backward_head(p, h, NULL, scratch);
  free(scratch);
}

/* The head that is member g of the group of heads sharing bias block j. */
static int64_t head_of(const plan *p, int64_t j, int64_t g) {
  int64_t h = 0;
  for (int d = p->nlead - 1; d >= 0; d--) {
    int64_t *which = p->kept[d] ? &j : &g;
    h += (*which % p->lead_size[d]) * p->head_stride[d];
    *which /= p->lead_size[d];
  }
  return h;
}

/* Item = (group j, part): the part's members of group j, their dS summed into the part's block. */
static void backward_groups_range(int64_t begin, int64_t end, void *arg) {
  plan *p = arg;
  char *scratch = malloc(backward_scratch_size(p));
  if (!scratch) {
    mark_failed(p);
    return;
  }
  int64_t block_elems = p->nq * p->nk;
  for (int64_t item = begin; item < end; item++) {
    int64_t j = item / p->parts, part = item % p->parts;
    char *acc = p->dbias_acc + (part * p->groups + j) * block_elems * (int64_t)p->esz;
    int64_t first = part * p->members / p->parts, last = (part + 1) * p->members / p->parts;
    for (int64_t g = first; g < last; g++) backward_head(p, head_of(p, j, g), acc, scratch);
  }
  free(scratch);
}

/* ---- layouts ---------------------------------------------------------------------------------- */
/* A contiguous [BH, rows, cols] tensor, or NULL. */
static head_layout blocks_layout(const ts_tensor *t) {
  if (!t) return (head_layout){0};
  return (head_layout){ts_elem_ptr(t), t->shape[1] * t->shape[2], 0, t->shape[2]};
}

/* A view [B, H, rows, cols] with unit column stride, or NULL. */
static head_layout view_layout(const ts_tensor *t) {
  if (!t) return (head_layout){0};
  return (head_layout){ts_elem_ptr(t), t->stride[0], t->stride[1], t->stride[2]};
}

/* ---- entry points ----------------------------------------------------------------------------- */
/* q, k, v: their layouts are set by the caller; shapes (heads, rows, cols) from the last three of
   the given dims. */
static int setup_plan(plan *p, const ts_tensor *q, const ts_tensor *k, const ts_tensor *v, const ts_tensor *bias,
                      double scale) {
  memset(p, 0, sizeof *p);
  int nd = q->ndim;
  if (q->dtype != TS_F32 && q->dtype != TS_F64)
    return ts_set_error(TS_ERR_DTYPE, "scaled_dot_product_attention: the CPU kernel computes in float32 or float64, "
                        "got %s", ts_dtype_name(q->dtype));
  if (k->shape[nd - 2] > INT_MAX || q->shape[nd - 1] > INT_MAX || v->shape[nd - 1] > INT_MAX ||
      q->stride[nd - 2] > INT_MAX || k->stride[nd - 2] > INT_MAX || v->stride[nd - 2] > INT_MAX)
    return ts_set_error(TS_ERR_UNSUPPORTED, "scaled_dot_product_attention: %lld keys of widths %lld and %lld exceed "
                        "what BLAS accepts (%d)", (long long)k->shape[nd - 2], (long long)q->shape[nd - 1],
                        (long long)v->shape[nd - 1], INT_MAX);
  p->ops = q->dtype == TS_F32 ? &OPS_F32 : &OPS_F64;
  p->esz = (size_t)ts_dtype_size(q->dtype);
  p->inner = nd == 4 ? q->shape[1] : 1;
  p->heads = nd == 4 ? q->shape[0] * q->shape[1] : q->shape[0];
  p->nq = q->shape[nd - 2];
  p->dim_qk = q->shape[nd - 1];
  p->nk = k->shape[nd - 2];
  p->dim_v = v->shape[nd - 1];
  p->scale = scale;
  head_layout (*layout)(const ts_tensor *) = nd == 4 ? view_layout : blocks_layout;
  p->q = layout(q);
  p->k = layout(k);
  p->v = layout(v);
  int64_t width = max64(1, max64(p->dim_qk, p->dim_v));
  int64_t fit = GEMM_SINGLE_THREAD_WORK / max64(1, p->nk * width);
  p->tile = max64(1, min64(p->nq, max64(MIN_TILE_ROWS, fit)));
  p->tiles = (p->nq + p->tile - 1) / p->tile;
  if (bias) {
    p->bias = ts_elem_ptr(bias);
    p->nlead = bias->ndim - 2;
    int64_t step = 1;
    for (int d = p->nlead - 1; d >= 0; d--) {
      p->lead_size[d] = bias->shape[d];
      p->lead_stride[d] = bias->stride[d];
      p->head_stride[d] = step;
      step *= bias->shape[d];
    }
    p->bias_rs = bias->stride[p->nlead];
    p->bias_cs = bias->stride[p->nlead + 1];
  }
  return TS_OK;
}

static int64_t grain_for(double work_per_item) {
  return work_per_item >= MIN_CHUNK_WORK ? 1 : (int64_t)(MIN_CHUNK_WORK / (work_per_item > 1 ? work_per_item : 1));
}

static int finish(const plan *p, const char *op) {
  if (p->failed) return ts_set_error(TS_ERR_MEMORY, "%s: out of memory for a worker's scratch tile", op);
  return TS_OK;
}

static int run_forward(plan *p, const ts_tensor *out, const ts_tensor *lse) {
  p->out = out->ndim == 4 ? view_layout(out) : blocks_layout(out);
  p->lse_w = ts_elem_ptr(lse);
  double work = (double)p->tile * (double)p->nk * (double)(p->dim_qk + p->dim_v);
  ts_parallel_for(p->heads * p->tiles, grain_for(work), forward_range, p);
  return finish(p, "scaled_dot_product_attention");
}

int cpu_attention(ts_tensor *out, ts_tensor *lse, const ts_tensor *q, const ts_tensor *k, const ts_tensor *v,
                  const ts_tensor *bias, double scale) {
  plan p;
  if (setup_plan(&p, q, k, v, bias, scale)) return ts_last_status();
  return run_forward(&p, out, lse);
}

/* Sets up the bias-gradient groups: parts per group so that there are a few tasks per thread. */
static int plan_bias_groups(plan *p, ts_tensor *dbias) {
  p->groups = 1;
  for (int d = 0; d < p->nlead; d++) {
    p->kept[d] = dbias->shape[d] > 1;
    if (p->kept[d]) p->groups *= p->lead_size[d];
  }
  p->members = p->groups ? p->heads / p->groups : 0;
  int64_t wanted = 4 * (int64_t)ts_get_num_threads();
  p->parts = p->groups >= wanted ? 1 : max64(1, min64(p->members, (wanted + p->groups - 1) / p->groups));
  int64_t block_elems = p->nq * p->nk;
  if (p->parts == 1) {
    p->dbias_acc = ts_elem_ptr(dbias);
    p->ops->scale(p->dbias_acc, p->groups * block_elems, 0.0);
    return TS_OK;
  }
  p->dbias_acc = calloc((size_t)max64(1, p->parts * p->groups * block_elems), p->esz);
  if (!p->dbias_acc)
    return ts_set_error(TS_ERR_MEMORY, "scaled_dot_product_attention backward: out of memory for %lld partial bias "
                        "gradients", (long long)p->parts);
  return TS_OK;
}

/* Adds the parts' partial bias gradients into dbias. */
static void sum_parts(const plan *p, ts_tensor *dbias) {
  int64_t n = p->groups * p->nq * p->nk;
  char *dst = ts_elem_ptr(dbias);
  memcpy(dst, p->dbias_acc, (size_t)n * p->esz);
  for (int64_t part = 1; part < p->parts; part++) p->ops->accumulate(dst, p->dbias_acc + part * n * (int64_t)p->esz, n);
}

int cpu_attention_backward(ts_tensor *dq, ts_tensor *dk, ts_tensor *dv, ts_tensor *dbias, const ts_tensor *dout,
                           const ts_tensor *q, const ts_tensor *k, const ts_tensor *v, const ts_tensor *bias,
                           const ts_tensor *out, const ts_tensor *lse, double scale) {
  plan p;
  if (setup_plan(&p, q, k, v, bias, scale)) return ts_last_status();
  head_layout (*layout)(const ts_tensor *) = q->ndim == 4 ? view_layout : blocks_layout;
  p.out = layout(out);
  p.dout = layout(dout);
  p.lse = ts_elem_ptr(lse);
  p.grad_q = layout(dq);
  p.grad_k = layout(dk);
  p.grad_v = layout(dv);
  double work = (double)p.nq * (double)p.nk * (double)(2 * p.dim_qk + 3 * p.dim_v);
  if (!dbias) {
    ts_parallel_for(p.heads, grain_for(work), backward_heads_range, &p);
    return finish(&p, "scaled_dot_product_attention backward");
  }
  if (plan_bias_groups(&p, dbias)) return ts_last_status();
  ts_parallel_for(p.groups * p.parts, 1, backward_groups_range, &p);
  if (p.parts > 1) {
    if (!p.failed) sum_parts(&p, dbias);
    free(p.dbias_acc);
  }
  return finish(&p, "scaled_dot_product_attention backward");
}

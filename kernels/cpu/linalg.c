/* linalg.c — batched matrix products on the CPU through OpenBLAS.
 *
 * Operands reach BLAS without a copy whenever one of their two matrix strides is 1: a row-major
 * matrix is passed as is (NoTrans, ld = row stride), a column-major one (a transposed view) as
 * its transpose (Trans, ld = column stride). Only a matrix strided in both dims is copied first.
 * Products with a single row or column go to gemv, which is faster than a gemm of width 1.
 *
 * Threading policy. Our thread pool and OpenBLAS's must never run at the same time: on a machine
 * with few cores two pools fighting over them is much slower than either alone.
 *   - When one product is big enough that OpenBLAS threads it (see blas_threads_itself), the
 *     batch loops on the calling thread and each product gets every core through OpenBLAS.
 *   - Below that size OpenBLAS computes a product on the calling thread, so many small products
 *     are spread over the batch with ts_parallel_for: each of our workers runs single-threaded
 *     BLAS calls while OpenBLAS's own threads sleep. */
#include "cpu.h"

#include <cblas.h>
#include <limits.h>

/* OpenBLAS 0.3 (interface/gemm.c, interface/gemv.c) runs a gemm on the calling thread when
   m*n*k <= 65536 * GEMM_MULTITHREAD_THRESHOLD (4 by default), a gemv when m*n < 2304 * 4. */
static const double GEMM_SINGLE_THREAD_WORK = 65536.0 * 4, GEMV_SINGLE_THREAD_WORK = 2304.0 * 4;
/* Multiply-adds a batch chunk should hold before it is worth handing to another thread. */
static const double MIN_CHUNK_WORK = 1 << 20;

/* One 3-D operand as BLAS reads it: matrix i starts at base + i * batch_stride (bytes). */
typedef struct {
  const char *base;
  int64_t batch_stride;
  CBLAS_TRANSPOSE trans;  /* NoTrans: rows are contiguous; Trans: columns are */
  int64_t ld;             /* elements between consecutive rows (NoTrans) or columns (Trans) */
  ts_tensor *copy;        /* the contiguous copy read instead of the operand, when one was made */
} blas_operand;

/* The BLAS view of a rows x cols matrix with element strides (rs, cs); 0 when it has none.
   A dim of size 1 has no meaningful stride, so it never stands in the way. */
static int blas_layout(int64_t rows, int64_t cols, int64_t rs, int64_t cs, CBLAS_TRANSPOSE *trans, int64_t *ld) {
  int64_t row_len = cols > 1 ? cols : 1, col_len = rows > 1 ? rows : 1;
  if ((cols == 1 || cs == 1) && (rows == 1 || rs >= row_len)) {
    *trans = CblasNoTrans;
    *ld = rows == 1 ? row_len : rs;
    return 1;
  }
  if ((rows == 1 || rs == 1) && (cols == 1 || cs >= col_len)) {
    *trans = CblasTrans;
    *ld = cols == 1 ? col_len : cs;
    return 1;
  }
  return 0;
}

/* Prepares t ([B, rows, cols], any strides) for BLAS, copying it to contiguous memory only when
   its matrices are strided in both dims. A broadcast batch (stride 0) is copied once. */
static int prepare_operand(const ts_tensor *t, blas_operand *op) {
  int64_t esz = ts_dtype_size(t->dtype), rows = t->shape[1], cols = t->shape[2];
  op->copy = NULL;
  op->base = ts_elem_ptr(t);
  op->batch_stride = t->stride[0] * esz;
  if (blas_layout(rows, cols, t->stride[1], t->stride[2], &op->trans, &op->ld)) return TS_OK;
  int64_t shape[3] = {t->stride[0] == 0 ? 1 : t->shape[0], rows, cols};
  ts_tensor *src = ts_tensor_over(t->storage, 3, shape, t->stride, t->offset, t->dtype);
  op->copy = src ? ts_empty(3, shape, t->dtype, t->device) : NULL;
  if (op->copy) cpu_copy(op->copy, src);
  ts_release(src);
  if (!op->copy) return ts_last_status();
  op->base = ts_elem_ptr(op->copy);
  op->batch_stride = t->stride[0] == 0 ? 0 : rows * cols * esz;
  op->trans = CblasNoTrans;
  op->ld = cols > 1 ? cols : 1;
  return TS_OK;
}

typedef struct {
  int dtype;
  int64_t n, m, k;        /* out[i] (n x m) = a[i] (n x k) @ b[i] (k x m) */
  blas_operand a, b;
  char *out;
  int64_t out_stride;     /* bytes between output matrices */
} bmm_plan;

/* The step between consecutive elements of a single-row or single-column operand. */
static int64_t vector_step(const blas_operand *op, int along_rows) {
  return (op->trans == CblasNoTrans) == along_rows ? op->ld : 1;
}

/* out (1 x m) = a (1 x k) @ b (k x m): y = b^T x, with b as BLAS stores it. */
static void row_times_matrix(const bmm_plan *p, const char *a, const char *b, char *y) {
  CBLAS_TRANSPOSE t = p->b.trans == CblasNoTrans ? CblasTrans : CblasNoTrans;
  int rows = (int)(p->b.trans == CblasNoTrans ? p->k : p->m), cols = (int)(p->b.trans == CblasNoTrans ? p->m : p->k);
  int incx = (int)vector_step(&p->a, 0);
  if (p->dtype == TS_F32)
    cblas_sgemv(CblasRowMajor, t, rows, cols, 1.0f, (const float *)b, (int)p->b.ld, (const float *)a, incx, 0.0f, (float *)y, 1);
  else
    cblas_dgemv(CblasRowMajor, t, rows, cols, 1.0, (const double *)b, (int)p->b.ld, (const double *)a, incx, 0.0, (double *)y, 1);
}

/* out (n x 1) = a (n x k) @ b (k x 1): y = a x, with a as BLAS stores it. */
static void matrix_times_column(const bmm_plan *p, const char *a, const char *b, char *y) {
  int rows = (int)(p->a.trans == CblasNoTrans ? p->n : p->k), cols = (int)(p->a.trans == CblasNoTrans ? p->k : p->n);
  int incx = (int)vector_step(&p->b, 1);
  if (p->dtype == TS_F32)
    cblas_sgemv(CblasRowMajor, p->a.trans, rows, cols, 1.0f, (const float *)a, (int)p->a.ld, (const float *)b, incx, 0.0f, (float *)y, 1);
  else
    cblas_dgemv(CblasRowMajor, p->a.trans, rows, cols, 1.0, (const double *)a, (int)p->a.ld, (const double *)b, incx, 0.0, (double *)y, 1);
}

static void product(const bmm_plan *p, int64_t i) {
  const char *a = p->a.base + i * p->a.batch_stride, *b = p->b.base + i * p->b.batch_stride;
  char *c = p->out + i * p->out_stride;
  if (p->m == 1) {
    matrix_times_column(p, a, b, c);
  } else if (p->n == 1) {
    row_times_matrix(p, a, b, c);
  } else if (p->dtype == TS_F32) {
    cblas_sgemm(CblasRowMajor, p->a.trans, p->b.trans, (int)p->n, (int)p->m, (int)p->k, 1.0f, (const float *)a,
                (int)p->a.ld, (const float *)b, (int)p->b.ld, 0.0f, (float *)c, (int)p->m);
  } else {
    cblas_dgemm(CblasRowMajor, p->a.trans, p->b.trans, (int)p->n, (int)p->m, (int)p->k, 1.0, (const double *)a,
                (int)p->a.ld, (const double *)b, (int)p->b.ld, 0.0, (double *)c, (int)p->m);
  }
}

static void product_range(int64_t begin, int64_t end, void *arg) {
  for (int64_t i = begin; i < end; i++) product(arg, i);
}

static int blas_threads_itself(const bmm_plan *p) {
  double work = (double)p->n * (double)p->m * (double)p->k;
  return p->n == 1 || p->m == 1 ? work >= GEMV_SINGLE_THREAD_WORK : work > GEMM_SINGLE_THREAD_WORK;
}

/* BLAS takes int sizes: every size and leading dimension must fit. */
static int check_blas_sizes(const bmm_plan *p) {
  int64_t sizes[5] = {p->n, p->m, p->k, p->a.ld, p->b.ld};
  for (int i = 0; i < 5; i++)
    if (sizes[i] > INT_MAX)
      return ts_set_error(TS_ERR_UNSUPPORTED, "matmul: a matrix dim or stride of %lld exceeds what BLAS accepts (%d)",
                          (long long)sizes[i], INT_MAX);
  return TS_OK;
}

int cpu_bmm(ts_tensor *out, const ts_tensor *a, const ts_tensor *b) {
  int64_t batch = out->shape[0];
  bmm_plan p = {out->dtype, out->shape[1], out->shape[2], a->shape[2], {0}, {0}, ts_elem_ptr(out),
                out->stride[0] * ts_dtype_size(out->dtype)};
  if (batch == 0 || p.n == 0 || p.m == 0) return TS_OK;
  if (p.k == 0) return cpu_fill(out, 0); /* an empty sum; BLAS would reject the leading dims */
  int st = prepare_operand(a, &p.a);
  if (!st) st = prepare_operand(b, &p.b);
  if (!st) st = check_blas_sizes(&p);
  if (!st) {
    if (blas_threads_itself(&p)) {
      for (int64_t i = 0; i < batch; i++) product(&p, i);
    } else {
      double work = (double)p.n * (double)p.m * (double)(p.k > 0 ? p.k : 1);
      int64_t grain = work >= MIN_CHUNK_WORK ? 1 : (int64_t)(MIN_CHUNK_WORK / work);
      ts_parallel_for(batch, grain, product_range, &p);
    }
  }
  ts_release(p.a.copy);
  ts_release(p.b.copy);
  return st;
}

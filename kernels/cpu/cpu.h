/* cpu.h — the CPU kernels behind ts_cpu_backend, and the strided loop they share. */
#ifndef TESSERA_CPU_H
#define TESSERA_CPU_H

#include "../../runtime/backend.h"

/* Below this many elements a kernel runs on the calling thread: waking the pool costs more. */
enum { CPU_PARALLEL_GRAIN = 32768 };

/* Calls fn over runs of elements of equally shaped operands (ops[0] is usually the output):
   ptrs[k] points at run element 0 of operand k, strides[k] is its byte stride within the run.
   Dims are coalesced where every operand allows it; the work is split across the thread pool. */
typedef void (*cpu_loop_fn)(int64_t n, char **ptrs, const int64_t *strides, void *ctx);
enum { CPU_MAX_OPERANDS = 4 };
void cpu_foreach(int nops, const ts_tensor *const *ops, cpu_loop_fn fn, void *ctx);

/* The dtype CPU kernels compute in for values stored as `dtype`: float32 for every narrower
   float, float64, and int64 for every integer and bool. */
int cpu_compute_dtype(int dtype);

/* Value conversions for kernels that read or write arbitrary dtypes. */
double cpu_load_f64(int dtype, const char *p);
void cpu_store_f64(int dtype, char *p, double v);
int64_t cpu_load_i64(int dtype, const char *p);
void cpu_store_i64(int dtype, char *p, int64_t v);

/* copy.c */
void *cpu_alloc(size_t nbytes, int device_index);
void cpu_free(void *ptr, size_t nbytes, int device_index);
int cpu_copy(ts_tensor *dst, const ts_tensor *src);
int cpu_fill(ts_tensor *dst, double value);
int cpu_arange(ts_tensor *out, double start, double step);

/* elementwise.c */
int cpu_unary(int op, ts_tensor *out, const ts_tensor *a);
int cpu_binary(int op, ts_tensor *out, const ts_tensor *a, const ts_tensor *b);
int cpu_where(ts_tensor *out, const ts_tensor *cond, const ts_tensor *a, const ts_tensor *b);
int cpu_clamp(ts_tensor *out, const ts_tensor *a, double lo, double hi, int has_lo, int has_hi);
int cpu_unary_backward(int op, ts_tensor *gx, const ts_tensor *g, const ts_tensor *x, const ts_tensor *y);

/* reduce.c */
int cpu_reduce(int op, ts_tensor *out, const ts_tensor *a, int nred);
int cpu_var(ts_tensor *out, const ts_tensor *a, int nred, int64_t correction, int take_sqrt);
int cpu_norm(ts_tensor *out, const ts_tensor *a, int nred, double p);
int cpu_arg_reduce(ts_tensor *values, ts_tensor *indices, const ts_tensor *a, int largest);

/* linalg.c */
int cpu_bmm(ts_tensor *out, const ts_tensor *a, const ts_tensor *b);

/* indexing.c */
int cpu_index_select(ts_tensor *out, const ts_tensor *a, int dim, const ts_tensor *index);
int cpu_gather(ts_tensor *out, const ts_tensor *a, int dim, const ts_tensor *index);
int cpu_scatter(ts_tensor *a, int dim, const ts_tensor *index, const ts_tensor *src, int mode);
int cpu_masked_fill(ts_tensor *a, const ts_tensor *mask, double value);
ts_tensor *cpu_nonzero(const ts_tensor *a);
int cpu_index(ts_tensor *out, const ts_tensor *a, int n, ts_tensor *const *indices);
int cpu_index_put(ts_tensor *a, int n, ts_tensor *const *indices, const ts_tensor *values, int accumulate);

/* sort.c */
int cpu_sort(ts_tensor *values, ts_tensor *indices, const ts_tensor *a, int descending, int stable);
int cpu_topk(ts_tensor *values, ts_tensor *indices, const ts_tensor *a, int64_t k, int largest, int sorted);

/* random.c */
int cpu_random(ts_tensor *out, int kind, double a, double b, uint64_t seed, uint64_t offset);

/* @nn-linear-norm-softmax-loss (declarations below this line) */
/* @nn-spatial (declarations below this line) */
/* @nn-attention (declarations below this line) */
/* @optim (declarations below this line) */

#endif

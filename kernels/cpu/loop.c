/* loop.c — the strided N-d loop every CPU elementwise kernel runs on (cf. NumPy's nditer and
 * PyTorch's TensorIterator, reduced to what tessera needs). */
#include "cpu.h"

#include <string.h>

typedef struct {
  int nops, ndim;                          /* after coalescing; dim ndim-1 is the innermost */
  int64_t shape[TS_MAX_DIMS];
  int64_t stride[CPU_MAX_OPERANDS][TS_MAX_DIMS]; /* bytes */
  char *base[CPU_MAX_OPERANDS];
  cpu_loop_fn fn;
  void *ctx;
} loop_plan;

/* Drops size-1 dims and merges neighbours that step through memory as one dim for every operand. */
static void plan_loop(loop_plan *p, int nops, const ts_tensor *const *ops) {
  const ts_tensor *ref = ops[0];
  p->nops = nops;
  p->ndim = 0;
  for (int k = 0; k < nops; k++) p->base[k] = ts_elem_ptr(ops[k]);
  for (int d = 0; d < ref->ndim; d++) {
    if (ref->shape[d] == 1) continue;
    int merge = p->ndim > 0;
    for (int k = 0; k < nops && merge; k++) {
      int64_t esz = ts_dtype_size(ops[k]->dtype);
      merge = p->stride[k][p->ndim - 1] == ops[k]->stride[d] * esz * ref->shape[d];
    }
    if (merge) {
      p->shape[p->ndim - 1] *= ref->shape[d];
      for (int k = 0; k < nops; k++) p->stride[k][p->ndim - 1] = ops[k]->stride[d] * ts_dtype_size(ops[k]->dtype);
    } else {
      p->shape[p->ndim] = ref->shape[d];
      for (int k = 0; k < nops; k++) p->stride[k][p->ndim] = ops[k]->stride[d] * ts_dtype_size(ops[k]->dtype);
      p->ndim++;
    }
  }
  if (p->ndim == 0) { /* a single element */
    p->ndim = 1;
    p->shape[0] = 1;
    for (int k = 0; k < nops; k++) p->stride[k][0] = 0;
  }
}

/* Runs the elements with linear (row-major) indices [begin, end) as inner-dim runs. */
static void run_range(int64_t begin, int64_t end, void *arg) {
  const loop_plan *p = arg;
  int inner = p->ndim - 1;
  int64_t idx[TS_MAX_DIMS], rem = begin;
  for (int d = inner; d >= 0; d--) {
    idx[d] = rem % p->shape[d];
    rem /= p->shape[d];
  }
  char *ptrs[CPU_MAX_OPERANDS];
  int64_t inner_strides[CPU_MAX_OPERANDS];
  for (int k = 0; k < p->nops; k++) inner_strides[k] = p->stride[k][inner];
  int64_t pos = begin;
  while (pos < end) {
    int64_t run = p->shape[inner] - idx[inner];
    if (run > end - pos) run = end - pos;
    for (int k = 0; k < p->nops; k++) {
      char *q = p->base[k];
      for (int d = 0; d <= inner; d++) q += idx[d] * p->stride[k][d];
      ptrs[k] = q;
    }
    p->fn(run, ptrs, inner_strides, p->ctx);
    pos += run;
    idx[inner] += run;
    for (int d = inner; d > 0 && idx[d] >= p->shape[d]; d--) {
      idx[d] = 0;
      idx[d - 1]++;
    }
  }
}

void cpu_foreach(int nops, const ts_tensor *const *ops, cpu_loop_fn fn, void *ctx) {
  int64_t n = ts_numel(ops[0]);
  if (n == 0) return;
  loop_plan p;
  memset(&p, 0, sizeof p);
  p.fn = fn;
  p.ctx = ctx;
  plan_loop(&p, nops, ops);
  ts_parallel_for(n, CPU_PARALLEL_GRAIN, run_range, &p);
}

int cpu_compute_dtype(int dtype) {
  switch (dtype) {
  case TS_F64: return TS_F64;
  case TS_F32: case TS_F16: case TS_BF16: return TS_F32;
  default: return TS_I64;
  }
}

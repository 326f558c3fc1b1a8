/* indexing.c — index_select, gather, scatter, masked_fill, nonzero and advanced indexing on the
 * CPU.
 *
 * Indices arrive as int64, range-checked and wrapped by the runtime, so nothing here checks
 * bounds. Kernels that only move values work for every dtype by element size; the two that add
 * (scatter add, index_put accumulate) get tensors in the compute dtype (float32, float64, int64).
 * Work that may write one element from several places (scatter, index_put with duplicate
 * indices) is split between threads only where no two threads can reach the same element. */
#include "cpu.h"

#include <stdlib.h>
#include <string.h>

/* Constant-size memcpy compiles to one load and one store. */
static inline void move_elem(char *dst, const char *src, int64_t esz) {
  switch (esz) {
  case 1: *dst = *src; break;
  case 2: memcpy(dst, src, 2); break;
  case 4: memcpy(dst, src, 4); break;
  case 8: memcpy(dst, src, 8); break;
  default: memcpy(dst, src, (size_t)esz); break;
  }
}

/* *dst += *src in a compute dtype; int64 wraps around instead of overflowing into UB. */
static inline void add_elem(int dtype, char *dst, const char *src) {
  switch (dtype) {
  case TS_F32: *(float *)dst += *(const float *)src; break;
  case TS_F64: *(double *)dst += *(const double *)src; break;
  default: {
    uint64_t sum = (uint64_t)*(const int64_t *)dst + (uint64_t)*(const int64_t *)src;
    *(int64_t *)dst = (int64_t)sum;
    break;
  }
  }
}

static int64_t esize(const ts_tensor *t) { return ts_dtype_size(t->dtype); }

/* ---- blocks: the same strided sub-tensor at two addresses ------------------------------------- */
/* index_select and advanced indexing move whole blocks (the dims after the indexed ones) between
   an address in a and one in the other operand. */
typedef struct {
  int ndim;                            /* coalesced dims; 0 means a single element */
  int64_t shape[TS_MAX_DIMS];
  int64_t stride[2][TS_MAX_DIMS];      /* bytes: [0] the written operand, [1] the read one */
  int64_t numel;
} block_plan;

/* Drops size-1 dims and merges neighbours that step through memory as one for both operands. */
static void plan_block(block_plan *b, int ndim, const int64_t *shape, const int64_t *s0, int64_t esz0,
                       const int64_t *s1, int64_t esz1) {
  b->ndim = 0;
  b->numel = 1;
  for (int d = 0; d < ndim; d++) {
    b->numel *= shape[d];
    if (shape[d] == 1) continue;
    int64_t t0 = s0[d] * esz0, t1 = s1[d] * esz1;
    int k = b->ndim - 1;
    if (k >= 0 && b->stride[0][k] == t0 * shape[d] && b->stride[1][k] == t1 * shape[d]) {
      b->shape[k] *= shape[d];
      b->stride[0][k] = t0;
      b->stride[1][k] = t1;
    } else {
      b->shape[b->ndim] = shape[d];
      b->stride[0][b->ndim] = t0;
      b->stride[1][b->ndim++] = t1;
    }
  }
}

/* One inner run of a block: n elements from src to dst with the given byte steps. */
typedef struct { int dtype; int64_t esz; int accumulate; } elem_op;

static void run_op(const elem_op *op, int64_t n, char *dst, int64_t ds, const char *src, int64_t ss) {
  if (op->accumulate) {
    for (int64_t i = 0; i < n; i++) add_elem(op->dtype, dst + i * ds, src + i * ss);
  } else if (ds == op->esz && ss == op->esz) {
    memcpy(dst, src, (size_t)(n * op->esz));
  } else {
    for (int64_t i = 0; i < n; i++) move_elem(dst + i * ds, src + i * ss, op->esz);
  }
}

/* Applies op to the block elements with row-major numbers [begin, end). */
static void block_apply(const block_plan *b, const elem_op *op, int64_t begin, int64_t end, char *dst,
                        const char *src) {
  if (b->ndim == 0) {
    if (begin < end) run_op(op, 1, dst, 0, src, 0);
    return;
  }
  int inner = b->ndim - 1;
  int64_t idx[TS_MAX_DIMS], rem = begin, pos = begin;
  for (int d = inner; d >= 0; d--) {
    idx[d] = rem % b->shape[d];
    rem /= b->shape[d];
  }
  while (pos < end) {
    int64_t run = b->shape[inner] - idx[inner];
    if (run > end - pos) run = end - pos;
    int64_t o0 = 0, o1 = 0;
    for (int d = 0; d <= inner; d++) {
      o0 += idx[d] * b->stride[0][d];
      o1 += idx[d] * b->stride[1][d];
    }
    run_op(op, run, dst + o0, b->stride[0][inner], src + o1, b->stride[1][inner]);
    pos += run;
    idx[inner] += run;
    for (int d = inner; d > 0 && idx[d] >= b->shape[d]; d--) {
      idx[d] = 0;
      idx[d - 1]++;
    }
  }
}

/* ---- index_select and gather: out[i] = a[i with dim replaced by index[i]] --------------------- */
/* Both run as one strided loop over (out, row, index): `row` is a header over a with out's shape
   and a zero stride along dim, so it points at the start of each element's line through a. */
typedef struct { int64_t esz, dim_stride; } pick_ctx; /* dim_stride in bytes */

static void pick_run(int64_t n, char **p, const int64_t *s, void *arg) {
  const pick_ctx *c = arg;
  for (int64_t i = 0; i < n; i++) {
    int64_t k = *(const int64_t *)(p[2] + i * s[2]);
    move_elem(p[0] + i * s[0], p[1] + i * s[1] + k * c->dim_stride, c->esz);
  }
}

static ts_tensor line_starts(const ts_tensor *a, int dim, const ts_tensor *like) {
  ts_tensor row = *a;
  row.ndim = like->ndim;
  for (int d = 0; d < like->ndim; d++) row.shape[d] = like->shape[d];
  if (row.ndim > 0) row.stride[dim] = 0;
  return row;
}

static void pick(ts_tensor *out, const ts_tensor *a, int dim, const ts_tensor *index) {
  ts_tensor row = line_starts(a, dim, out);
  pick_ctx c = {esize(a), a->ndim ? a->stride[dim] * esize(a) : 0};
  const ts_tensor *ops[3] = {out, &row, index};
  cpu_foreach(3, ops, pick_run, &c);
}

/* index_select by blocks: position q = (o, j) over the dims before dim and the index copies the
   block a[o, index[j], ...] to out[o, j, ...]. */
typedef struct {
  const ts_tensor *a, *out, *index;
  int dim;
  block_plan block;
  elem_op op;
} select_ctx;

static void select_positions(int64_t begin, int64_t end, void *arg) {
  const select_ctx *c = arg;
  const ts_tensor *a = c->a;
  int64_t n = c->index->shape[0], esz = esize(a);
  for (int64_t q = begin; q < end; q++) {
    int64_t o = q / n, j = q % n;
    int64_t k = *(const int64_t *)(ts_elem_ptr(c->index) + j * c->index->stride[0] * esize(c->index));
    const char *src = ts_elem_ptr(a) + k * a->stride[c->dim] * esz;
    for (int d = c->dim - 1; d >= 0; d--) {
      src += (o % a->shape[d]) * a->stride[d] * esz;
      o /= a->shape[d];
    }
    block_apply(&c->block, &c->op, 0, c->block.numel, ts_elem_ptr(c->out) + q * c->block.numel * esz, src);
  }
}

/* Below this many elements per block, one strided loop over every element is faster. */
enum { SELECT_MIN_BLOCK = 16 };

int cpu_index_select(ts_tensor *out, const ts_tensor *a, int dim, const ts_tensor *index) {
  if (a->ndim > 0 && ts_numel(out) > 0) {
    select_ctx c = {a, out, index, dim, {0}, {a->dtype, esize(a), 0}};
    int rest = a->ndim - dim - 1;
    plan_block(&c.block, rest, a->shape + dim + 1, out->stride + dim + 1, esize(out), a->stride + dim + 1, esize(a));
    if (c.block.numel >= SELECT_MIN_BLOCK) {
      ts_parallel_for(ts_numel(out) / c.block.numel, CPU_PARALLEL_GRAIN / c.block.numel + 1, select_positions, &c);
      return TS_OK;
    }
  }
  ts_tensor idx = *index; /* the 1-D index seen with out's shape, varying along dim only */
  idx.ndim = out->ndim;
  for (int d = 0; d < out->ndim; d++) {
    idx.shape[d] = out->shape[d];
    idx.stride[d] = d == dim ? index->stride[0] : 0;
  }
  pick(out, a, dim, &idx);
  return TS_OK;
}

int cpu_gather(ts_tensor *out, const ts_tensor *a, int dim, const ts_tensor *index) {
  pick(out, a, dim, index);
  return TS_OK;
}

/* ---- scatter: a[i with dim replaced by index[i]] = (or +=) src[i] ----------------------------- */
/* Writes from one line of index (all coordinates but dim fixed) only reach the same line of a, so
   the loop runs over lines, in parallel, and walks each line on one thread. */
typedef struct { int64_t len, esz, idx_step, src_step, dim_stride; int dtype, mode; } scatter_ctx;

static void scatter_run(int64_t n, char **p, const int64_t *s, void *arg) {
  const scatter_ctx *c = arg;
  for (int64_t i = 0; i < n; i++) {
    const char *idx = p[0] + i * s[0], *src = p[1] + i * s[1];
    char *line = p[2] + i * s[2];
    for (int64_t j = 0; j < c->len; j++) {
      char *dst = line + *(const int64_t *)(idx + j * c->idx_step) * c->dim_stride;
      if (c->mode == TS_SCATTER_ADD) add_elem(c->dtype, dst, src + j * c->src_step);
      else move_elem(dst, src + j * c->src_step, c->esz);
    }
  }
}

/* A header over t's elements at index shape `like`, without dim: one element per line. */
static ts_tensor without_dim(const ts_tensor *t, int dim, const ts_tensor *like) {
  ts_tensor h = *t;
  h.ndim = 0;
  for (int d = 0; d < like->ndim; d++) {
    if (d == dim) continue;
    h.shape[h.ndim] = like->shape[d];
    h.stride[h.ndim++] = t->stride[d];
  }
  return h;
}

int cpu_scatter(ts_tensor *a, int dim, const ts_tensor *index, const ts_tensor *src, int mode) {
  int has_dim = a->ndim > 0;
  scatter_ctx c = {has_dim ? index->shape[dim] : 1, esize(a), has_dim ? index->stride[dim] * esize(index) : 0,
                   has_dim ? src->stride[dim] * esize(src) : 0, has_dim ? a->stride[dim] * esize(a) : 0,
                   a->dtype, mode};
  ts_tensor lines[3] = {without_dim(index, dim, index), without_dim(src, dim, index), without_dim(a, dim, index)};
  const ts_tensor *ops[3] = {&lines[0], &lines[1], &lines[2]};
  if (c.len > 0) cpu_foreach(3, ops, scatter_run, &c);
  return TS_OK;
}

/* ---- masked_fill ----------------------------------------------------------------------------- */
typedef struct { int64_t esz; char value[8]; } masked_fill_ctx;

/* A select rather than a branch: masks are often random, and mispredictions would dominate. */
#define MASKED_FILL(TYPE)                                                                          \
  do {                                                                                             \
    TYPE v;                                                                                        \
    memcpy(&v, c->value, sizeof v);                                                                \
    for (int64_t i = 0; i < n; i++) {                                                              \
      TYPE *o = (TYPE *)(p[0] + i * s[0]);                                                         \
      *o = *(const uint8_t *)(p[1] + i * s[1]) ? v : *o;                                           \
    }                                                                                              \
  } while (0)

static void masked_fill_run(int64_t n, char **p, const int64_t *s, void *arg) {
  const masked_fill_ctx *c = arg;
  switch (c->esz) {
  case 1: MASKED_FILL(uint8_t); break;
  case 2: MASKED_FILL(uint16_t); break;
  case 4: MASKED_FILL(uint32_t); break;
  default: MASKED_FILL(uint64_t); break;
  }
}

int cpu_masked_fill(ts_tensor *a, const ts_tensor *mask, double value) {
  masked_fill_ctx c = {esize(a), {0}};
  cpu_store_f64(a->dtype, c.value, value);
  const ts_tensor *ops[2] = {a, mask};
  cpu_foreach(2, ops, masked_fill_run, &c);
  return TS_OK;
}

/* ---- nonzero --------------------------------------------------------------------------------- */
/* Floats compare without their sign bit, so -0.0 counts as zero and NaN as nonzero. */
static inline int is_nonzero(int dtype, const char *p) {
  switch (dtype) {
  case TS_F64: case TS_I64: {
    uint64_t v;
    memcpy(&v, p, 8);
    return (dtype == TS_F64 ? v << 1 : v) != 0;
  }
  case TS_F32: case TS_I32: {
    uint32_t v;
    memcpy(&v, p, 4);
    return (dtype == TS_F32 ? v << 1 : v) != 0;
  }
  case TS_F16: case TS_BF16: {
    uint16_t v;
    memcpy(&v, p, 2);
    return (v & 0x7fff) != 0;
  }
  default: return *(const uint8_t *)p != 0;
  }
}

/* The coordinates and address of the element with row-major number `linear`. */
static const char *locate(const ts_tensor *t, int64_t linear, int64_t *coord) {
  const char *p = ts_elem_ptr(t);
  for (int d = t->ndim - 1; d >= 0; d--) {
    coord[d] = linear % t->shape[d];
    linear /= t->shape[d];
    p += coord[d] * t->stride[d] * esize(t);
  }
  return p;
}

/* Counts the nonzeros among n elements along the last dim from p, or (out != NULL) also writes
   their coordinates, `coord` being those of the first. Counting is branch-free. */
static int64_t nonzero_run(const ts_tensor *a, const char *p, int64_t n, const int64_t *coord, int64_t *out) {
  int nd = a->ndim;
  int64_t step = nd ? a->stride[nd - 1] * esize(a) : 0, count = 0;
  if (!out) {
    for (int64_t j = 0; j < n; j++) count += is_nonzero(a->dtype, p + j * step);
    return count;
  }
  for (int64_t j = 0; j < n; j++) {
    if (!is_nonzero(a->dtype, p + j * step)) continue;
    int64_t *row = out + count++ * nd;
    for (int d = 0; d < nd - 1; d++) row[d] = coord[d];
    row[nd - 1] = coord[nd - 1] + j;
  }
  return count;
}

/* Two passes over fixed blocks of elements: count each block's nonzeros (in parallel), turn the
   counts into starting rows, then let each block write its coordinates from there. */
enum { NONZERO_BLOCK = 16384 };
typedef struct {
  const ts_tensor *a;
  int64_t n;
  int64_t *starts; /* per block: its count, then its first output row */
  int64_t *out;    /* NULL during the counting pass */
} nonzero_ctx;

static void nonzero_blocks(int64_t begin, int64_t end, void *arg) {
  nonzero_ctx *c = arg;
  const ts_tensor *a = c->a;
  for (int64_t b = begin; b < end; b++) {
    int64_t first = b * NONZERO_BLOCK, last = first + NONZERO_BLOCK < c->n ? first + NONZERO_BLOCK : c->n;
    int64_t count = 0, inner = a->ndim ? a->shape[a->ndim - 1] : 1;
    int64_t *out = c->out ? c->out + c->starts[b] * a->ndim : NULL;
    for (int64_t i = first; i < last;) { /* one run along the last dim at a time */
      int64_t coord[TS_MAX_DIMS];
      const char *p = locate(a, i, coord);
      int64_t run = a->ndim ? inner - coord[a->ndim - 1] : 1;
      if (run > last - i) run = last - i;
      count += nonzero_run(a, p, run, coord, out ? out + count * a->ndim : NULL);
      i += run;
    }
    if (!c->out) c->starts[b] = count;
  }
}

ts_tensor *cpu_nonzero(const ts_tensor *a) {
  int64_t n = ts_numel(a), nblocks = (n + NONZERO_BLOCK - 1) / NONZERO_BLOCK;
  int64_t *starts = malloc((size_t)(nblocks > 0 ? nblocks : 1) * sizeof *starts);
  if (!starts) return TS_FAIL_NULL(TS_ERR_MEMORY, "nonzero: out of host memory for %lld blocks", (long long)nblocks);
  nonzero_ctx c = {a, n, starts, NULL};
  int64_t grain = CPU_PARALLEL_GRAIN / NONZERO_BLOCK;
  ts_parallel_for(nblocks, grain, nonzero_blocks, &c);
  int64_t total = 0;
  for (int64_t b = 0; b < nblocks; b++) {
    int64_t count = starts[b];
    starts[b] = total;
    total += count;
  }
  int64_t shape[2] = {total, a->ndim};
  ts_tensor *out = ts_empty(2, shape, TS_I64, a->device);
  if (out && total > 0 && a->ndim > 0) {
    c.out = (int64_t *)ts_elem_ptr(out);
    ts_parallel_for(nblocks, grain, nonzero_blocks, &c);
  }
  free(starts);
  return out;
}

/* ---- advanced indexing ----------------------------------------------------------------------- */
/* The indexed positions are the elements of the broadcast index shape; each selects one element
   of the leading indexed dims of a, and with it a block over the remaining dims. */
typedef struct {
  const ts_tensor *a;          /* the indexed tensor (read by index, written by index_put) */
  int n;
  ts_tensor *const *indices;   /* int64, all of the broadcast index shape */
  const ts_tensor *other;      /* out (index) or values (index_put), leading dims = index shape */
  block_plan block;
  elem_op op;
} advanced_ctx;

/* Byte addresses of position p: in a (through the indices) and in `other`. */
static void position(const advanced_ctx *c, int64_t p, char **in_a, char **in_other) {
  const ts_tensor *shape_ref = c->n ? c->indices[0] : NULL;
  int nd = shape_ref ? shape_ref->ndim : 0;
  int64_t coord[TS_MAX_DIMS];
  for (int d = nd - 1; d >= 0; d--) {
    coord[d] = p % shape_ref->shape[d];
    p /= shape_ref->shape[d];
  }
  char *pa = ts_elem_ptr(c->a), *po = ts_elem_ptr(c->other);
  for (int k = 0; k < c->n; k++) {
    const ts_tensor *ix = c->indices[k];
    const char *q = ts_elem_ptr(ix);
    for (int d = 0; d < nd; d++) q += coord[d] * ix->stride[d] * esize(ix);
    pa += *(const int64_t *)q * c->a->stride[k] * esize(c->a);
  }
  for (int d = 0; d < nd; d++) po += coord[d] * c->other->stride[d] * esize(c->other);
  *in_a = pa;
  *in_other = po;
}

static int64_t num_positions(const advanced_ctx *c) { return c->n ? ts_numel(c->indices[0]) : 1; }

/* The block of each position, over the dims of a after the indexed ones (and the same trailing
   dims of `other`). [0] is the written operand: other for index, a for index_put. */
static void plan_advanced(advanced_ctx *c, int write_a) {
  const ts_tensor *a = c->a, *o = c->other;
  int rest = a->ndim - c->n;
  const int64_t *sa = a->stride + c->n, *so = o->stride + (o->ndim - rest);
  if (write_a) plan_block(&c->block, rest, a->shape + c->n, sa, esize(a), so, esize(o));
  else plan_block(&c->block, rest, a->shape + c->n, so, esize(o), sa, esize(a));
}

static void index_positions(int64_t begin, int64_t end, void *arg) {
  const advanced_ctx *c = arg;
  for (int64_t p = begin; p < end; p++) {
    char *in_a, *in_out;
    position(c, p, &in_a, &in_out);
    block_apply(&c->block, &c->op, 0, c->block.numel, in_out, in_a);
  }
}

int cpu_index(ts_tensor *out, const ts_tensor *a, int n, ts_tensor *const *indices) {
  advanced_ctx c = {a, n, indices, out, {0}, {a->dtype, esize(a), 0}};
  plan_advanced(&c, 0);
  int64_t per = c.block.numel > 0 ? c.block.numel : 1;
  if (ts_numel(out) > 0) ts_parallel_for(num_positions(&c), CPU_PARALLEL_GRAIN / per + 1, index_positions, &c);
  return TS_OK;
}

/* index_put: positions may repeat, so every thread walks all positions in order (the last write
   wins, accumulation sees every duplicate) and threads split the block elements instead. */
static void put_block_range(int64_t begin, int64_t end, void *arg) {
  const advanced_ctx *c = arg;
  int64_t np = num_positions(c);
  for (int64_t p = 0; p < np; p++) {
    char *in_a, *in_values;
    position(c, p, &in_a, &in_values);
    block_apply(&c->block, &c->op, begin, end, in_a, in_values);
  }
}

/* Splitting blocks smaller than this would recompute every position's address per thread for
   little work each: such puts run on one thread. */
enum { PUT_MIN_BLOCK_PER_THREAD = 256 };

int cpu_index_put(ts_tensor *a, int n, ts_tensor *const *indices, const ts_tensor *values, int accumulate) {
  advanced_ctx c = {a, n, indices, values, {0}, {a->dtype, esize(a), accumulate}};
  plan_advanced(&c, 1);
  int64_t np = num_positions(&c), total = np * c.block.numel;
  if (total == 0) return TS_OK;
  int64_t grain = c.block.numel;
  if (total >= CPU_PARALLEL_GRAIN) {
    grain = CPU_PARALLEL_GRAIN / np;
    if (grain < PUT_MIN_BLOCK_PER_THREAD) grain = PUT_MIN_BLOCK_PER_THREAD;
  }
  ts_parallel_for(c.block.numel, grain, put_block_range, &c);
  return TS_OK;
}

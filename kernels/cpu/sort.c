/* sort.c — sort and topk along the last dim on the CPU, rows in parallel.
 *
 * Each value becomes an unsigned integer key whose order is the order we want: floats map
 * monotonically onto integers (the radix-sort bit trick) after NaN becomes one positive NaN, which
 * lands above +inf, and -0.0 becomes 0.0, so the two zeros tie as they compare equal; descending
 * order flips every bit. A row is then a list of (key, index) pairs ordered by key, then index:
 * equal values keep their original order (the sort is stable) and topk returns exactly the leading
 * k of that sort. Sorting is a bottom-up merge sort over insertion-sorted runs; topk selects its k
 * pairs first (quickselect, average linear time) and sorts only those. The values written out are
 * read back from the row by index, so they keep every bit (the sign of zero, NaN payloads). */
#include "cpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct { uint64_t key; int64_t index; } pair;

static uint64_t key_f32(const char *p) {
  float f;
  memcpy(&f, p, 4);
  if (f != f) f = NAN;
  else if (f == 0) f = 0.0f;
  uint32_t u;
  memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static uint64_t key_f64(const char *p) {
  double f;
  memcpy(&f, p, 8);
  if (f != f) f = NAN;
  else if (f == 0) f = 0.0;
  uint64_t u;
  memcpy(&u, &f, 8);
  return (u & 0x8000000000000000u) ? ~u : (u | 0x8000000000000000u);
}

static uint64_t key_i64(const char *p) {
  uint64_t u;
  memcpy(&u, p, 8);
  return u ^ 0x8000000000000000u;
}

/* x comes before y: smaller key, or the same key and a lower index. */
static inline int before(const pair *x, const pair *y) {
  return x->key < y->key || (x->key == y->key && x->index < y->index);
}

enum { INSERTION_RUN = 16 };

static void insertion_sort(pair *a, int64_t n) {
  for (int64_t i = 1; i < n; i++) {
    pair x = a[i];
    int64_t j = i;
    for (; j > 0 && before(&x, &a[j - 1]); j--) a[j] = a[j - 1];
    a[j] = x;
  }
}

static void merge(const pair *l, int64_t nl, const pair *r, int64_t nr, pair *out) {
  int64_t i = 0, j = 0, k = 0;
  while (i < nl && j < nr) out[k++] = before(&r[j], &l[i]) ? r[j++] : l[i++];
  while (i < nl) out[k++] = l[i++];
  while (j < nr) out[k++] = r[j++];
}

/* Sorts a[0..n) with tmp[0..n) as scratch. */
static void merge_sort(pair *a, pair *tmp, int64_t n) {
  for (int64_t lo = 0; lo < n; lo += INSERTION_RUN)
    insertion_sort(a + lo, n - lo < INSERTION_RUN ? n - lo : INSERTION_RUN);
  pair *src = a, *dst = tmp;
  for (int64_t width = INSERTION_RUN; width < n; width *= 2) {
    for (int64_t lo = 0; lo < n; lo += 2 * width) {
      int64_t mid = lo + width < n ? lo + width : n, hi = lo + 2 * width < n ? lo + 2 * width : n;
      merge(src + lo, mid - lo, src + mid, hi - mid, dst + lo);
    }
    pair *t = src;
    src = dst;
    dst = t;
  }
  if (src != a) memcpy(a, src, (size_t)n * sizeof *a);
}

static inline void swap_pairs(pair *a, int64_t i, int64_t j) {
  pair t = a[i];
  a[i] = a[j];
  a[j] = t;
}

/* Quickselect: afterwards a[0..k) holds the k pairs that come first (k < n), in no order. Keys
   with their index are all distinct, so equal values cannot unbalance the partitions. */
static void select_first(pair *a, int64_t n, int64_t k) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    int64_t mid = lo + (hi - lo) / 2;
    /* the median of three as the pivot, at hi: sorted input stays linear */
    if (before(&a[mid], &a[lo])) swap_pairs(a, lo, mid);
    if (before(&a[hi], &a[lo])) swap_pairs(a, lo, hi);
    if (before(&a[mid], &a[hi])) swap_pairs(a, mid, hi);
    pair pivot = a[hi];
    int64_t store = lo;
    for (int64_t i = lo; i < hi; i++)
      if (before(&a[i], &pivot)) swap_pairs(a, i, store++);
    swap_pairs(a, store, hi);
    if (store == k) return;
    if (store < k) lo = store + 1;
    else hi = store - 1;
  }
}

typedef struct {
  const ts_tensor *a;
  ts_tensor *values, *indices;  /* contiguous, rows of out_len */
  int64_t n, out_len;
  uint64_t (*key)(const char *p);
  uint64_t flip;                /* all ones for descending order */
  int select, sorted;           /* topk: select out_len pairs, then sort them if `sorted` */
  int failed;                   /* set by a thread that could not allocate its buffers */
} rows_ctx;

/* Address of element 0 of row r of a (all dims but the last enumerate the rows). */
static const char *row_start(const ts_tensor *a, int64_t r) {
  const char *p = ts_elem_ptr(a);
  int64_t esz = ts_dtype_size(a->dtype);
  for (int d = a->ndim - 2; d >= 0; d--) {
    p += (r % a->shape[d]) * a->stride[d] * esz;
    r /= a->shape[d];
  }
  return p;
}

static void order_row(const rows_ctx *c, pair *buf, pair *tmp, int64_t r) {
  const char *src = row_start(c->a, r);
  int64_t esz = ts_dtype_size(c->a->dtype), step = c->a->ndim ? c->a->stride[c->a->ndim - 1] * esz : 0;
  for (int64_t j = 0; j < c->n; j++) {
    buf[j].key = c->key(src + j * step) ^ c->flip;
    buf[j].index = j;
  }
  int64_t keep = c->out_len;
  if (c->select && keep < c->n) {
    select_first(buf, c->n, keep);
    if (c->sorted) merge_sort(buf, tmp, keep);
  } else {
    merge_sort(buf, tmp, c->n);
  }
  char *values = (char *)ts_elem_ptr(c->values) + r * keep * esz;
  int64_t *indices = (int64_t *)ts_elem_ptr(c->indices) + r * keep;
  for (int64_t j = 0; j < keep; j++) {
    memcpy(values + j * esz, src + buf[j].index * step, (size_t)esz);
    indices[j] = buf[j].index;
  }
}

static void order_rows(int64_t begin, int64_t end, void *arg) {
  rows_ctx *c = arg;
  pair *buf = malloc(2 * (size_t)c->n * sizeof *buf);
  if (!buf) {
    __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
    return;
  }
  for (int64_t r = begin; r < end; r++) order_row(c, buf, buf + c->n, r);
  free(buf);
}

/* Orders every row of c->a, rows split between threads. */
static int run_rows(const char *op, rows_ctx *c, int descending) {
  switch (c->a->dtype) {
  case TS_F32: c->key = key_f32; break;
  case TS_F64: c->key = key_f64; break;
  case TS_I64: c->key = key_i64; break;
  default:
    return ts_set_error(TS_ERR_DTYPE, "%s: the CPU kernel expects float32, float64 or int64 rows, got %s", op,
                        ts_dtype_name(c->a->dtype));
  }
  c->flip = descending ? ~(uint64_t)0 : 0;
  int64_t rows = c->n ? ts_numel(c->a) / c->n : 0;
  if (rows == 0 || c->out_len == 0) return TS_OK;
  ts_parallel_for(rows, CPU_PARALLEL_GRAIN / c->n + 1, order_rows, c);
  if (c->failed)
    return ts_set_error(TS_ERR_MEMORY, "%s: out of host memory for rows of %lld elements", op, (long long)c->n);
  return TS_OK;
}

static int64_t row_length(const ts_tensor *a) { return a->ndim ? a->shape[a->ndim - 1] : 1; }

int cpu_sort(ts_tensor *values, ts_tensor *indices, const ts_tensor *a, int descending, int stable) {
  (void)stable; /* always stable */
  rows_ctx c = {a, values, indices, row_length(a), row_length(a), NULL, 0, 0, 1, 0};
  return run_rows("sort", &c, descending);
}

int cpu_topk(ts_tensor *values, ts_tensor *indices, const ts_tensor *a, int64_t k, int largest, int sorted) {
  rows_ctx c = {a, values, indices, row_length(a), k, NULL, 0, 1, sorted, 0};
  return run_rows("topk", &c, largest);
}

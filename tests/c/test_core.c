/* test_core.c — the C ABI used directly, as another language's binding would: lifetimes and
 * refcounts, views, error statuses and messages, host transfers. Runs under the sanitizer build
 * with leak checking, so every reference taken here is released. */
#include "tessera.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static int failures;
#define CHECK(cond)                                                                                \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__, __LINE__, #cond,     \
              ts_last_error());                                                                    \
      failures++;                                                                                  \
    }                                                                                              \
  } while (0)

static const ts_device CPU = {TS_CPU, 0};

static void test_lifetime_and_views(void) {
  int64_t shape[2] = {3, 4};
  ts_tensor *a = ts_full(2, shape, 2.0, TS_F32, CPU);
  CHECK(a && ts_numel(a) == 12 && ts_is_contiguous(a));
  ts_tensor *t = ts_transpose(a, 0, 1);
  CHECK(t && ts_shares_storage(a, t) && !ts_is_contiguous(t));
  CHECK(ts_storage_refcount(a) == 2);
  ts_tensor *row = ts_select(a, 0, 1);
  CHECK(ts_fill_(row, 5.0) == TS_OK);
  float host[12];
  CHECK(ts_to_host(t, host, sizeof host) == TS_OK);
  CHECK(host[1] == 5.0f && host[0] == 2.0f); /* t[0][1] = a[1][0] */
  ts_release(a);                               /* views keep the storage alive */
  double v = 0;
  ts_tensor *elem = ts_select(row, 0, 0);
  CHECK(elem && ts_item(elem, &v) == TS_OK && v == 5.0);
  ts_release(elem);
  ts_release(row);
  ts_release(t);
}

static void test_errors(void) {
  int64_t s23[2] = {2, 3}, s45[2] = {4, 5};
  ts_tensor *a = ts_empty(2, s23, TS_F32, CPU), *b = ts_empty(2, s45, TS_F32, CPU);
  ts_tensor *c = ts_binary(TS_ADD, a, b);
  CHECK(c == NULL && ts_last_status() == TS_ERR_SHAPE);
  CHECK(strstr(ts_last_error(), "add") && strstr(ts_last_error(), "[2,3]") && strstr(ts_last_error(), "[4,5]"));
  ts_clear_error();
  CHECK(ts_last_status() == TS_OK && ts_last_error()[0] == '\0');
  int64_t huge[2] = {(int64_t)1 << 40, (int64_t)1 << 30};
  CHECK(ts_empty(2, huge, TS_F32, CPU) == NULL && ts_last_status() == TS_ERR_MEMORY);
  CHECK(ts_empty(2, s23, 99, CPU) == NULL && ts_last_status() == TS_ERR_DTYPE);
  ts_device gpu = {TS_CUDA, 0};
  CHECK(ts_empty(2, s23, TS_F32, gpu) == NULL && ts_last_status() == TS_ERR_DEVICE);
  CHECK(strstr(ts_last_error(), "cuda"));
  CHECK(ts_select(a, 0, 2) == NULL && ts_last_status() == TS_ERR_INDEX);
  double v;
  CHECK(ts_item(a, &v) == TS_ERR_SHAPE);
  ts_release(a);
  ts_release(b);
  ts_release(NULL);
}

static void test_transfers_and_math(void) {
  double in[6] = {1, -2, 3, -4, 5, -6}, out[6];
  int64_t shape[2] = {2, 3};
  ts_tensor *a = ts_from_host(2, shape, TS_F64, in, CPU);
  ts_tensor *r = ts_unary(TS_ABS, a);
  ts_tensor *s = ts_binary_scalar(TS_MUL, r, 0.5, 0);
  CHECK(s && ts_to_host(s, out, sizeof out) == TS_OK);
  for (int i = 0; i < 6; i++) CHECK(out[i] == fabs(in[i]) * 0.5);
  CHECK(ts_to_host(s, out, 8) == TS_ERR_ARG); /* buffer too small */
  ts_release(s);
  ts_release(r);
  ts_release(a);
  CHECK(tessera_abi_version() == TESSERA_ABI_VERSION);
  CHECK(ts_promote_types(TS_F16, TS_BF16) == TS_F32);
  CHECK(ts_cuda_device_count() == 0);
}

int main(void) {
  test_lifetime_and_views();
  test_errors();
  test_transfers_and_math();
  if (failures) {
    fprintf(stderr, "test_core: %d checks failed\n", failures);
    return 1;
  }
  printf("test_core: all checks passed\n");
  return 0;
}

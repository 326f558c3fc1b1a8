/* copy.c — host memory, dtype conversion copies, fill and arange on the CPU. */
#include "cpu.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* ---- host memory -------------------------------------------------------------------------------
 * Large blocks are kept after free and handed out again for the same rounded size. A fresh large
 * malloc is new pages from the kernel, which must fault and zero them: an elementwise op on 64 MB
 * spent most of its time there. The cache holds at most `limit` bytes (oldest blocks go first) and
 * T.empty_cache() returns it all. */
enum { CACHE_MIN_BYTES = 1 << 20, CACHE_GRAIN = 1 << 21, CACHE_SLOTS = 64 };

static struct {
  pthread_mutex_t lock;
  struct { void *ptr; size_t bytes; } slot[CACHE_SLOTS]; /* oldest first */
  int count;
  size_t bytes, limit;
} host_cache = {.lock = PTHREAD_MUTEX_INITIALIZER, .limit = (size_t)1 << 29};

/* 64-byte alignment: whole cache lines and aligned vector loads. */
static size_t host_rounded(size_t nbytes) {
  if (nbytes < CACHE_MIN_BYTES) return (nbytes + 63) & ~(size_t)63;
  return (nbytes + CACHE_GRAIN - 1) & ~(size_t)(CACHE_GRAIN - 1);
}

static void drop_oldest(void) {
  free(host_cache.slot[0].ptr);
  host_cache.bytes -= host_cache.slot[0].bytes;
  memmove(host_cache.slot, host_cache.slot + 1, (size_t)(--host_cache.count) * sizeof host_cache.slot[0]);
}

void *cpu_alloc(size_t nbytes, int device_index) {
  (void)device_index;
  size_t bytes = host_rounded(nbytes);
  if (bytes >= CACHE_MIN_BYTES) {
    pthread_mutex_lock(&host_cache.lock);
    for (int k = host_cache.count - 1; k >= 0; k--) {
      if (host_cache.slot[k].bytes != bytes) continue;
      void *ptr = host_cache.slot[k].ptr;
      host_cache.bytes -= bytes;
      memmove(host_cache.slot + k, host_cache.slot + k + 1, (size_t)(--host_cache.count - k) * sizeof host_cache.slot[0]);
      pthread_mutex_unlock(&host_cache.lock);
      return ptr;
    }
    pthread_mutex_unlock(&host_cache.lock);
  }
  return aligned_alloc(64, bytes);
}

void cpu_free(void *ptr, size_t nbytes, int device_index) {
  (void)device_index;
  size_t bytes = host_rounded(nbytes);
  if (bytes < CACHE_MIN_BYTES || bytes > host_cache.limit) {
    free(ptr);
    return;
  }
  pthread_mutex_lock(&host_cache.lock);
  while (host_cache.count && (host_cache.count == CACHE_SLOTS || host_cache.bytes + bytes > host_cache.limit)) drop_oldest();
  host_cache.slot[host_cache.count].ptr = ptr;
  host_cache.slot[host_cache.count++].bytes = bytes;
  host_cache.bytes += bytes;
  pthread_mutex_unlock(&host_cache.lock);
}

int64_t cpu_cached_bytes(int device_index) {
  (void)device_index;
  pthread_mutex_lock(&host_cache.lock);
  int64_t bytes = (int64_t)host_cache.bytes;
  pthread_mutex_unlock(&host_cache.lock);
  return bytes;
}

void cpu_empty_cache(int device_index) {
  (void)device_index;
  pthread_mutex_lock(&host_cache.lock);
  while (host_cache.count) drop_oldest();
  pthread_mutex_unlock(&host_cache.lock);
}

int64_t cpu_saturate_i64(double v) {
  if (v != v) return 0;
  if (v >= 9223372036854775807.0) return INT64_MAX;
  if (v <= -9223372036854775808.0) return INT64_MIN;
  return (int64_t)v;
}

double cpu_load_f64(int dtype, const char *p) {
  switch (dtype) {
  case TS_F32: return *(const float *)p;
  case TS_F64: return *(const double *)p;
  case TS_F16: return ts_half_to_float(*(const uint16_t *)p);
  case TS_BF16: return ts_bf16_to_float(*(const uint16_t *)p);
  case TS_I64: return (double)*(const int64_t *)p;
  case TS_I32: return *(const int32_t *)p;
  case TS_U8: return *(const uint8_t *)p;
  default: return *(const uint8_t *)p != 0;
  }
}

void cpu_store_f64(int dtype, char *p, double v) {
  switch (dtype) {
  case TS_F32: *(float *)p = (float)v; break;
  case TS_F64: *(double *)p = v; break;
  case TS_F16: *(uint16_t *)p = ts_float_to_half((float)v); break;
  case TS_BF16: *(uint16_t *)p = ts_float_to_bf16((float)v); break;
  case TS_I64: *(int64_t *)p = cpu_saturate_i64(v); break;
  case TS_I32: *(int32_t *)p = (int32_t)cpu_saturate_i64(v); break; /* wraps like a C cast of int64 */
  case TS_U8: *(uint8_t *)p = (uint8_t)cpu_saturate_i64(v); break;
  default: *(uint8_t *)p = v != 0; break;
  }
}

int64_t cpu_load_i64(int dtype, const char *p) {
  switch (dtype) {
  case TS_I64: return *(const int64_t *)p;
  case TS_I32: return *(const int32_t *)p;
  case TS_U8: return *(const uint8_t *)p;
  case TS_BOOL: return *(const uint8_t *)p != 0;
  default: return cpu_saturate_i64(cpu_load_f64(dtype, p));
  }
}

void cpu_store_i64(int dtype, char *p, int64_t v) {
  switch (dtype) {
  case TS_I64: *(int64_t *)p = v; break;
  case TS_I32: *(int32_t *)p = (int32_t)(uint32_t)v; break;
  case TS_U8: *(uint8_t *)p = (uint8_t)v; break;
  case TS_BOOL: *(uint8_t *)p = v != 0; break;
  default: cpu_store_f64(dtype, p, (double)v); break;
  }
}

typedef struct { int src, dst; } copy_ctx;

/* The common conversions get a tight loop; the rest go element by element through double (or
   int64 between integer types, which keeps every int64 exact). */
static void copy_run(int64_t n, char **p, const int64_t *s, void *arg) {
  const copy_ctx *c = arg;
  char *dst = p[0];
  const char *src = p[1];
  int64_t sd = s[0], ss = s[1];
  if (c->src == c->dst) {
    int64_t esz = ts_dtype_size(c->src);
    if (sd == esz && ss == esz) {
      memcpy(dst, src, (size_t)(n * esz));
    } else {
      for (int64_t i = 0; i < n; i++) memcpy(dst + i * sd, src + i * ss, (size_t)esz);
    }
  } else if (c->src == TS_F32 && c->dst == TS_F64) {
    for (int64_t i = 0; i < n; i++) *(double *)(dst + i * sd) = *(const float *)(src + i * ss);
  } else if (c->src == TS_F64 && c->dst == TS_F32) {
    for (int64_t i = 0; i < n; i++) *(float *)(dst + i * sd) = (float)*(const double *)(src + i * ss);
  } else if (!ts_dtype_is_floating(c->src) && !ts_dtype_is_floating(c->dst)) {
    for (int64_t i = 0; i < n; i++) cpu_store_i64(c->dst, dst + i * sd, cpu_load_i64(c->src, src + i * ss));
  } else {
    for (int64_t i = 0; i < n; i++) cpu_store_f64(c->dst, dst + i * sd, cpu_load_f64(c->src, src + i * ss));
  }
}

int cpu_copy(ts_tensor *dst, const ts_tensor *src) {
  copy_ctx c = {src->dtype, dst->dtype};
  const ts_tensor *ops[2] = {dst, src};
  cpu_foreach(2, ops, copy_run, &c);
  return TS_OK;
}

typedef struct { int dtype; _Alignas(8) char value[8]; } fill_ctx;

static void fill_run(int64_t n, char **p, const int64_t *s, void *arg) {
  const fill_ctx *f = arg;
  int64_t esz = ts_dtype_size(f->dtype);
  if (esz == 4 && s[0] == 4) {
    uint32_t v;
    memcpy(&v, f->value, 4);
    for (int64_t i = 0; i < n; i++) ((uint32_t *)p[0])[i] = v;
  } else {
    for (int64_t i = 0; i < n; i++) memcpy(p[0] + i * s[0], f->value, (size_t)esz);
  }
}

int cpu_fill(ts_tensor *dst, double value) {
  fill_ctx f = {dst->dtype, {0}};
  cpu_store_f64(dst->dtype, f.value, value);
  const ts_tensor *ops[1] = {dst};
  cpu_foreach(1, ops, fill_run, &f);
  return TS_OK;
}

int cpu_arange(ts_tensor *out, double start, double step) {
  int64_t n = ts_numel(out), esz = ts_dtype_size(out->dtype);
  char *p = ts_elem_ptr(out);
  for (int64_t i = 0; i < n; i++) cpu_store_f64(out->dtype, p + i * out->stride[0] * esz, start + (double)i * step);
  return TS_OK;
}

/* copy.c — host memory, dtype conversion copies, fill and arange on the CPU. */
#include "cpu.h"

#include <malloc.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* ---- host memory -------------------------------------------------------------------------------
 * A fresh block from the kernel must be faulted in and zeroed page by page; in a training loop that
 * allocates the same activations every step this cost a sixth of the step. So blocks of at least
 * CACHE_MIN_BYTES are kept after free, sorted into size classes (eight per power of two, so a block
 * serves requests up to 12.5% smaller than itself), and handed out again most recently freed first
 * (its pages are the likeliest to still be in the caches). They come straight from mmap, so giving
 * one back really returns its memory.
 *
 * The cache holds at most the larger of CACHE_FLOOR_BYTES and the most memory ever held by live
 * blocks: enough for a loop to find every block of its next iteration in the cache, never more than
 * the program has shown it needs. Beyond that the least recently freed blocks go first;
 * T.empty_cache() returns everything. Smaller blocks come from malloc, which mallopt tells to keep
 * freed memory instead of trimming it back to the kernel.
 *
 * A free cached block stores its bookkeeping in its own first bytes (cache_node), so the cache
 * needs no memory of its own. */
enum {
  CACHE_MIN_SHIFT = 17,                     /* 128 KiB: glibc's default mmap threshold */
  CLASS_SPLITS_SHIFT = 3,                   /* 2^3 classes per power of two */
  CLASS_SPLITS = 1 << CLASS_SPLITS_SHIFT,
  MAX_SHIFT = 62,
  NUM_CLASSES = (MAX_SHIFT - CACHE_MIN_SHIFT + 1) * CLASS_SPLITS + 1,
};
static const size_t CACHE_MIN_BYTES = (size_t)1 << CACHE_MIN_SHIFT;
static const size_t CACHE_FLOOR_BYTES = (size_t)1 << 29;
/* malloc serves requests below MALLOC_MMAP_BYTES from its heap and keeps up to MALLOC_TRIM_BYTES
   of free memory at the top of it rather than trimming it back to the kernel. */
static const int MALLOC_MMAP_BYTES = 1 << 25, MALLOC_TRIM_BYTES = 1 << 28;

typedef struct cache_node {
  struct cache_node *older, *newer;          /* all cached blocks, in the order they were freed */
  struct cache_node *below, *above;          /* the blocks of one class, a stack */
  size_t bytes;
  int cls;
} cache_node;

static struct {
  pthread_mutex_t lock;
  cache_node *top[NUM_CLASSES];     /* most recently freed block of each class */
  cache_node *oldest, *newest;
  size_t cached;                    /* bytes of the cached blocks */
  size_t held;                      /* bytes of the live blocks from the cache's classes */
  size_t held_peak;
  int64_t slack;                    /* live blocks' class size minus the size asked for */
} host = {.lock = PTHREAD_MUTEX_INITIALIZER};

static pthread_once_t malloc_tuned = PTHREAD_ONCE_INIT;

/* glibc trims the top of its heap (above 128 KiB by default, adapting upwards) and serves requests
   above a threshold from fresh mmaps; either way memory that a loop frees and asks for again (small
   tensors, kernels' scratch buffers) is faulted in anew. Fixed thresholds keep it. */
static void tune_malloc(void) {
  mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_BYTES);
  mallopt(M_TRIM_THRESHOLD, MALLOC_TRIM_BYTES);
}

/* The size class of a large request and its size in bytes (a multiple of the page size). */
static int size_class(size_t nbytes, size_t *class_bytes) {
  int shift = 63 - __builtin_clzll((unsigned long long)nbytes);
  size_t step = (size_t)1 << (shift - CLASS_SPLITS_SHIFT);
  size_t steps = (nbytes + step - 1) / step; /* CLASS_SPLITS .. 2 * CLASS_SPLITS */
  *class_bytes = steps * step;
  return (shift - CACHE_MIN_SHIFT) * CLASS_SPLITS + (int)(steps - CLASS_SPLITS);
}

static void unlink_node(cache_node *b) {
  if (b->older) b->older->newer = b->newer; else host.oldest = b->newer;
  if (b->newer) b->newer->older = b->older; else host.newest = b->older;
  if (b->above) b->above->below = b->below; else host.top[b->cls] = b->below;
  if (b->below) b->below->above = b->above;
  host.cached -= b->bytes;
}

static void push_node(cache_node *b) {
  b->older = host.newest;
  b->newer = NULL;
  if (host.newest) host.newest->newer = b; else host.oldest = b;
  host.newest = b;
  b->below = host.top[b->cls];
  b->above = NULL;
  if (b->below) b->below->above = b;
  host.top[b->cls] = b;
  host.cached += b->bytes;
}

static void drop_oldest(void) {
  cache_node *b = host.oldest;
  unlink_node(b);
  munmap(b, b->bytes);
}

static size_t cache_limit(void) { return host.held_peak > CACHE_FLOOR_BYTES ? host.held_peak : CACHE_FLOOR_BYTES; }

static void *map_block(size_t bytes) {
  void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? NULL : p;
}

static void *alloc_large(size_t nbytes) {
  size_t bytes;
  int cls = size_class(nbytes, &bytes);
  pthread_mutex_lock(&host.lock);
  cache_node *b = host.top[cls];
  if (b) unlink_node(b);
  pthread_mutex_unlock(&host.lock);
  void *p = b;
  if (!p) p = map_block(bytes);
  if (!p) { /* the cache's other classes may be what stands in the way */
    cpu_empty_cache(0);
    p = map_block(bytes);
  }
  if (!p) return NULL;
  pthread_mutex_lock(&host.lock);
  host.held += bytes;
  if (host.held > host.held_peak) host.held_peak = host.held;
  host.slack += (int64_t)(bytes - nbytes);
  pthread_mutex_unlock(&host.lock);
  return p;
}

static void free_large(void *ptr, size_t nbytes) {
  size_t bytes;
  int cls = size_class(nbytes, &bytes);
  cache_node *b = ptr;
  b->bytes = bytes;
  b->cls = cls;
  pthread_mutex_lock(&host.lock);
  host.held -= bytes;
  host.slack -= (int64_t)(bytes - nbytes);
  size_t limit = cache_limit();
  if (bytes > limit) {
    pthread_mutex_unlock(&host.lock);
    munmap(ptr, bytes);
    return;
  }
  while (host.cached + bytes > limit) drop_oldest();
  push_node(b);
  pthread_mutex_unlock(&host.lock);
}

void *cpu_alloc(size_t nbytes, int device_index) {
  (void)device_index;
  pthread_once(&malloc_tuned, tune_malloc);
  if (nbytes >= CACHE_MIN_BYTES) return alloc_large(nbytes);
  return aligned_alloc(64, (nbytes + 63) & ~(size_t)63); /* whole cache lines, aligned vector loads */
}

void cpu_free(void *ptr, size_t nbytes, int device_index) {
  (void)device_index;
  if (nbytes >= CACHE_MIN_BYTES)
    free_large(ptr, nbytes);
  else
    free(ptr);
}

/* What the allocator holds beyond the bytes live tensors asked for: the cached blocks and the
   rounding of live blocks up to their class, so that live + this is the memory really held. */
int64_t cpu_cached_bytes(int device_index) {
  (void)device_index;
  pthread_mutex_lock(&host.lock);
  int64_t bytes = (int64_t)host.cached + host.slack;
  pthread_mutex_unlock(&host.lock);
  return bytes;
}

void cpu_empty_cache(int device_index) {
  (void)device_index;
  pthread_mutex_lock(&host.lock);
  while (host.oldest) drop_oldest();
  pthread_mutex_unlock(&host.lock);
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

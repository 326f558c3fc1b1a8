// device.cu — CUDA devices for tessera: lazy initialization, one stream per device, errors, the
// caching device allocator and host<->device transfers.
//
// Nothing here runs until a CUDA tensor is asked for (runtime/dispatch.c calls
// ts_cuda_available_devices on the first one), so libtessera loads and its CPU side works on
// machines without a GPU or a driver. Only the runtime API is used: linking the driver library
// would make the library unloadable there.
//
// Every kernel and copy of a device goes to that device's one non-blocking stream, which orders
// them without host synchronization; the host waits only where it must see results (transfers
// to the host, error flags, ts_cuda_synchronize).
#include "loop.cuh"

#include <atomic>
#include <mutex>
#include <new>
#include <set>
#include <stdio.h>
#include <stdlib.h>
#include <unordered_map>

int cuda_check(cudaError_t err, const char *op) {
  if (err == cudaSuccess) return TS_OK;
  (void)cudaGetLastError(); // clear a non-sticky error so that the next call does not report it again
  int status = err == cudaErrorMemoryAllocation ? TS_ERR_MEMORY : TS_ERR_DEVICE;
  return ts_set_error(status, "%s: CUDA error %s: %s", op, cudaGetErrorName(err), cudaGetErrorString(err));
}

// ---- devices and streams -----------------------------------------------------------------------
static int query_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) { // no driver, no GPU, or a broken install: no devices
    (void)cudaGetLastError();
    return 0;
  }
  return n < CUDA_MAX_DEVICES ? n : CUDA_MAX_DEVICES;
}

extern "C" int ts_cuda_available_devices(void) {
  static const int count = query_device_count(); // initialized once, thread-safely (C++11 statics)
  return count;
}

namespace {
struct device_state {
  std::once_flag once;
  cudaError_t init_error;  // why the stream could not be made; reported by every later use
  cudaStream_t stream;
};
device_state devices[CUDA_MAX_DEVICES];

void init_device(device_state *s, int device) {
  cudaError_t err = cudaSetDevice(device);
  if (err == cudaSuccess) err = cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking);
  s->init_error = err;
}
} // namespace

int cuda_stream_for(const char *op, int device, cudaStream_t *stream) {
  int count = ts_cuda_available_devices();
  if (device < 0 || device >= count)
    return ts_set_error(TS_ERR_DEVICE, "%s: cuda:%d requested, this machine has %d CUDA device(s)", op, device, count);
  device_state *s = &devices[device];
  std::call_once(s->once, init_device, s, device);
  if (s->init_error != cudaSuccess) return cuda_check(s->init_error, op);
  if (cuda_check(cudaSetDevice(device), op)) return ts_last_status();
  *stream = s->stream;
  return TS_OK;
}

// ---- the caching allocator -----------------------------------------------------------------------
// Device memory comes from cudaMalloc in segments and is never handed back on the hot path: a
// freed block returns to its device's pools and serves the next request that fits.
//   small requests (< 1 MiB) round up to a multiple of 512 bytes and are carved out of 2 MiB
//   segments; large ones round up to a multiple of 2 MiB and get a segment of their own.
//   A request takes the best-fitting free block of its pool (the smallest that is large enough,
//   then the lowest address) and splits off the rest; a freed block merges with free neighbours
//   of its segment.
// Blocks are stream-aware: a block serves only requests on the stream it was allocated on, so
// reuse needs no synchronization (the stream runs the old user's kernels before the new one's).
// With one stream per device that is every request of the device; the pools are keyed by stream
// so that a second stream cannot silently break it.
//
// Freeing may happen at any moment, from a LuaJIT finalizer in the middle of some other call into
// the allocator: cuda_free only pushes the pointer onto the device's lock-free list of deferred
// frees. The list is drained, under the allocator's lock and without any CUDA call, at the safe
// points: every allocation on the device, cuda_synchronize, cached_bytes and empty_cache.
//
// Out of memory, the allocator gives its cached segments back to the driver and retries; if that
// is not enough it calls the runtime's out-of-memory hook (the Lua binding's full garbage
// collection, which frees tensors only unreachable Lua values still hold), gives back what that
// freed and retries once more before failing with the sizes involved.
namespace {
constexpr size_t MIN_BLOCK = 512;              // every block size is a multiple of this
constexpr size_t SMALL_LIMIT = (size_t)1 << 20; // requests below this are small
constexpr size_t SMALL_SEGMENT = (size_t)2 << 20;
constexpr size_t LARGE_ROUND = (size_t)2 << 20;

struct block {
  char *ptr;
  size_t size;          // bytes, rounded
  size_t requested;     // bytes asked for while allocated
  cudaStream_t stream;  // the stream it serves
  bool small;           // its pool
  bool allocated;
  block *prev, *next;   // address-order neighbours within its segment (NULL at the ends)
};

// Pool order: stream, then size (best fit is the first block not smaller), then address.
struct block_order {
  bool operator()(const block *a, const block *b) const {
    if (a->stream != b->stream) return (uintptr_t)a->stream < (uintptr_t)b->stream;
    if (a->size != b->size) return a->size < b->size;
    return (uintptr_t)a->ptr < (uintptr_t)b->ptr;
  }
};
using pool = std::set<block *, block_order>;

struct deferred_free {
  void *ptr;
  deferred_free *next;
};

struct allocator {
  std::mutex lock;
  pool small_free, large_free;
  std::unordered_map<void *, block *> live;
  size_t reserved = 0;        // bytes held from the driver (all segments)
  size_t requested_live = 0;  // bytes asked for by the live blocks
  std::atomic<deferred_free *> deferred{nullptr};
};
allocator allocators[CUDA_MAX_DEVICES];

size_t round_size(size_t nbytes) {
  if (nbytes < MIN_BLOCK) return MIN_BLOCK;
  if (nbytes < SMALL_LIMIT) return (nbytes + MIN_BLOCK - 1) / MIN_BLOCK * MIN_BLOCK;
  return (nbytes + LARGE_ROUND - 1) / LARGE_ROUND * LARGE_ROUND;
}

pool &pool_of(allocator &al, const block *b) { return b->small ? al.small_free : al.large_free; }

// Returns an allocated block to its pool, merged with the free neighbours of its segment.
// Pool insertions may throw std::bad_alloc (the callers catch it).
void release_block(allocator &al, block *b) {
  pool &p = pool_of(al, b);
  b->allocated = false;
  b->requested = 0;
  if (b->prev && !b->prev->allocated) {
    block *prev = b->prev;
    p.erase(prev); // before its size changes: the size is part of the pool's key
    prev->size += b->size;
    prev->next = b->next;
    if (b->next) b->next->prev = prev;
    delete b;
    b = prev;
  }
  if (b->next && !b->next->allocated) {
    block *next = b->next;
    p.erase(next);
    b->size += next->size;
    b->next = next->next;
    if (next->next) next->next->prev = b;
    delete next;
  }
  p.insert(b);
}

void release_pointer(allocator &al, void *ptr) {
  auto it = al.live.find(ptr);
  if (it == al.live.end()) return; // not ours (never happens): nothing to give back
  block *b = it->second;
  al.live.erase(it);
  al.requested_live -= b->requested;
  release_block(al, b);
}

// Moves every deferred free into the pools. Caller holds al.lock.
void drain_deferred(allocator &al) {
  deferred_free *d = al.deferred.exchange(nullptr, std::memory_order_acquire);
  while (d) {
    deferred_free *next = d->next;
    try {
      release_pointer(al, d->ptr);
    } catch (const std::bad_alloc &) {
      // no host memory to file the block under: it stays out of the pools (leaked to the cache)
    }
    free(d);
    d = next;
  }
}

// Takes the best-fitting free block of at least `size` bytes on `stream`, or NULL.
block *take_free_block(pool &p, size_t size, cudaStream_t stream) {
  block key = {nullptr, size, 0, stream, false, false, nullptr, nullptr};
  auto it = p.lower_bound(&key);
  if (it == p.end() || (*it)->stream != stream) return nullptr;
  block *b = *it;
  p.erase(it);
  return b;
}

// Splits b to `size` bytes; the rest becomes a free block of the same pool.
void split_block(allocator &al, block *b, size_t size) {
  if (b->size == size) return;
  block *rest = new block{b->ptr + size, b->size - size, 0, b->stream, b->small, false, b, b->next};
  if (b->next) b->next->prev = rest;
  b->next = rest;
  b->size = size;
  pool_of(al, rest).insert(rest);
}

// A block of `nbytes` on `stream` from the pools or a new segment; NULL with *err set when the
// driver has no memory left (or fails otherwise). Caller holds al.lock.
block *allocate_block(allocator &al, size_t nbytes, cudaStream_t stream, cudaError_t *err) {
  size_t size = round_size(nbytes);
  bool small = size < SMALL_LIMIT;
  block *b = take_free_block(small ? al.small_free : al.large_free, size, stream);
  if (!b) {
    size_t segment = small ? SMALL_SEGMENT : size;
    void *ptr = nullptr;
    *err = cudaMalloc(&ptr, segment);
    if (*err != cudaSuccess) {
      (void)cudaGetLastError();
      return nullptr;
    }
    b = new block{(char *)ptr, segment, 0, stream, small, false, nullptr, nullptr};
    al.reserved += segment;
  }
  split_block(al, b, size);
  b->allocated = true;
  b->requested = nbytes;
  al.live[b->ptr] = b;
  al.requested_live += nbytes;
  *err = cudaSuccess;
  return b;
}

// Gives every entirely free segment back to the driver. The stream is drained first: a free
// block's last user may still be queued on it. Caller holds al.lock.
void release_cached(allocator &al, cudaStream_t stream) {
  (void)cudaStreamSynchronize(stream);
  for (pool *p : {&al.small_free, &al.large_free}) {
    for (auto it = p->begin(); it != p->end();) {
      block *b = *it;
      if (b->prev || b->next) { // part of a segment that is still in use
        ++it;
        continue;
      }
      (void)cudaFree(b->ptr);
      al.reserved -= b->size;
      it = p->erase(it);
      delete b;
    }
  }
  (void)cudaGetLastError();
}

// Out of memory: give the cached segments back to the driver and try once more. (The Lua binding
// then runs a full collection and retries the whole op once: see core.lua.)
block *allocate_after_oom(allocator &al, size_t nbytes, cudaStream_t stream, cudaError_t *err) {
  release_cached(al, stream);
  return allocate_block(al, nbytes, stream, err);
}

int out_of_memory(allocator &al, size_t nbytes, int device) {
  size_t free_bytes = 0, total_bytes = 0;
  if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) (void)cudaGetLastError();
  return ts_set_error(TS_ERR_MEMORY,
                      "cuda alloc: out of memory on cuda:%d allocating %zu bytes (%.2f GiB): tensors hold %zu bytes, "
                      "the caching allocator reserves %zu bytes, the device has %zu of %zu bytes free",
                      device, nbytes, (double)nbytes / (1 << 30), al.requested_live, al.reserved, free_bytes,
                      total_bytes);
}
} // namespace

extern "C" void *cuda_alloc(size_t nbytes, int device_index) {
  cudaStream_t stream;
  if (cuda_stream_for("cuda alloc", device_index, &stream)) return NULL;
  allocator &al = allocators[device_index];
  try {
    std::lock_guard<std::mutex> held(al.lock);
    drain_deferred(al);
    cudaError_t err;
    block *b = allocate_block(al, nbytes, stream, &err);
    if (!b && err == cudaErrorMemoryAllocation) b = allocate_after_oom(al, nbytes, stream, &err);
    if (b) return b->ptr;
    if (err == cudaErrorMemoryAllocation) out_of_memory(al, nbytes, device_index);
    else ts_set_error(TS_ERR_DEVICE, "cuda alloc: cannot allocate %zu bytes on cuda:%d: %s", nbytes, device_index,
                      cudaGetErrorString(err));
  } catch (const std::bad_alloc &) {
    ts_set_error(TS_ERR_MEMORY, "cuda alloc: out of host memory for the allocator's bookkeeping (cuda:%d)",
                 device_index);
  }
  return NULL;
}

// Never fails and never calls CUDA (it may run inside a LuaJIT finalizer): the block waits on the
// deferred list for the next safe point.
extern "C" void cuda_free(void *ptr, size_t nbytes, int device_index) {
  (void)nbytes;
  if (!ptr || device_index < 0 || device_index >= CUDA_MAX_DEVICES) return;
  allocator &al = allocators[device_index];
  deferred_free *d = (deferred_free *)malloc(sizeof *d);
  if (!d) { // no host memory for a list node: file the block directly (no CUDA call either)
    std::lock_guard<std::mutex> held(al.lock);
    try {
      release_pointer(al, ptr);
    } catch (const std::bad_alloc &) {
    }
    return;
  }
  d->ptr = ptr;
  d->next = al.deferred.load(std::memory_order_relaxed);
  while (!al.deferred.compare_exchange_weak(d->next, d, std::memory_order_release, std::memory_order_relaxed)) {
  }
}

// Bytes held from the driver beyond those the live blocks asked for.
extern "C" int64_t cuda_cached_bytes(int device_index) {
  if (device_index < 0 || device_index >= CUDA_MAX_DEVICES) return 0;
  allocator &al = allocators[device_index];
  std::lock_guard<std::mutex> held(al.lock);
  drain_deferred(al);
  return (int64_t)(al.reserved - al.requested_live);
}

extern "C" void cuda_empty_cache(int device_index) {
  if (device_index < 0 || device_index >= CUDA_MAX_DEVICES) return;
  allocator &al = allocators[device_index];
  std::lock_guard<std::mutex> held(al.lock);
  drain_deferred(al);
  cudaStream_t stream;
  if (al.reserved == 0 || cuda_stream_for("empty_cache", device_index, &stream)) return; // nothing held
  release_cached(al, stream);
}

extern "C" int cuda_synchronize(int device_index) {
  cudaStream_t stream;
  if (cuda_stream_for("cuda.synchronize", device_index, &stream)) return ts_last_status();
  int st = cuda_check(cudaDeviceSynchronize(), "cuda.synchronize"); // every stream, as torch.cuda.synchronize
  allocator &al = allocators[device_index];
  std::lock_guard<std::mutex> held(al.lock);
  drain_deferred(al);
  return st;
}

// ---- transfers -----------------------------------------------------------------------------------
// Both directions wait for the copy: the caller reads the host buffer next, or may free it at once
// (an asynchronous copy from pinned memory would still be reading it).
static int transfer(void *dst, const void *src, size_t nbytes, cudaMemcpyKind kind, int device, const char *op) {
  cudaStream_t stream;
  if (cuda_stream_for(op, device, &stream)) return ts_last_status();
  if (nbytes == 0) return TS_OK;
  if (cuda_check(cudaMemcpyAsync(dst, src, nbytes, kind, stream), op)) return ts_last_status();
  return cuda_check(cudaStreamSynchronize(stream), op);
}

extern "C" int cuda_copy_from_host(void *dst, const void *src, size_t nbytes, int device_index) {
  return transfer(dst, src, nbytes, cudaMemcpyHostToDevice, device_index, "copy to cuda");
}

extern "C" int cuda_copy_to_host(void *dst, const void *src, size_t nbytes, int device_index) {
  return transfer(dst, src, nbytes, cudaMemcpyDeviceToHost, device_index, "copy from cuda");
}

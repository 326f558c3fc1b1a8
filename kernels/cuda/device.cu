// device.cu — CUDA devices for tessera: lazy initialization, one stream per device, errors,
// device memory and host<->device transfers.
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

#include <mutex>

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
  bool pooled;             // cudaMallocAsync is supported: allocations are ordered on the stream
};
device_state devices[CUDA_MAX_DEVICES];

// Keeps freed blocks in the device's default pool instead of handing them back to the driver at
// every synchronization (the pool's default), which would make each allocation a driver call.
cudaError_t keep_pool_memory(int device) {
  cudaMemPool_t pool;
  cudaError_t err = cudaDeviceGetDefaultMemPool(&pool, device);
  uint64_t threshold = UINT64_MAX;
  if (err == cudaSuccess) err = cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold);
  return err;
}

void init_device(device_state *s, int device) {
  int pools = 0;
  cudaError_t err = cudaSetDevice(device);
  if (err == cudaSuccess) err = cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device);
  if (err == cudaSuccess && pools) err = keep_pool_memory(device);
  s->pooled = pools != 0;
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

extern "C" int cuda_synchronize(int device_index) {
  cudaStream_t stream;
  if (cuda_stream_for("cuda.synchronize", device_index, &stream)) return ts_last_status();
  return cuda_check(cudaDeviceSynchronize(), "cuda.synchronize"); // every stream, as torch.cuda.synchronize
}

// ---- memory --------------------------------------------------------------------------------------
// Allocation and release are the two entry points a caching allocator replaces later.
static cudaError_t allocate(void **ptr, size_t nbytes, int device, cudaStream_t stream) {
  if (!devices[device].pooled) return cudaMalloc(ptr, nbytes);
  cudaError_t err = cudaMallocAsync(ptr, nbytes, stream);
  if (err != cudaErrorMemoryAllocation) return err;
  // Out of memory: blocks freed on the stream may still sit in the pool; wait, trim, retry once.
  (void)cudaGetLastError();
  cudaMemPool_t pool;
  if (cudaStreamSynchronize(stream) == cudaSuccess && cudaDeviceGetDefaultMemPool(&pool, device) == cudaSuccess &&
      cudaMemPoolTrimTo(pool, 0) == cudaSuccess)
    err = cudaMallocAsync(ptr, nbytes, stream);
  return err;
}

extern "C" void *cuda_alloc(size_t nbytes, int device_index) {
  cudaStream_t stream;
  if (cuda_stream_for("cuda alloc", device_index, &stream)) return NULL;
  void *ptr = NULL;
  cudaError_t err = allocate(&ptr, nbytes, device_index, stream);
  if (err == cudaSuccess) return ptr;
  (void)cudaGetLastError();
  ts_set_error(err == cudaErrorMemoryAllocation ? TS_ERR_MEMORY : TS_ERR_DEVICE,
               "cuda alloc: cannot allocate %zu bytes on cuda:%d: %s", nbytes, device_index, cudaGetErrorString(err));
  return NULL;
}

// Never fails (tensor release never does): a device already in an error state keeps its memory.
extern "C" void cuda_free(void *ptr, size_t nbytes, int device_index) {
  (void)nbytes;
  cudaStream_t stream;
  if (!ptr || cuda_stream_for("cuda free", device_index, &stream)) return;
  cudaError_t err = devices[device_index].pooled ? cudaFreeAsync(ptr, stream) : cudaFree(ptr);
  if (err != cudaSuccess) (void)cudaGetLastError();
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

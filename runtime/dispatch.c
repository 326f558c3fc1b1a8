/* dispatch.c — picks the kernel table for a device. CUDA is looked up lazily: nothing touches the
 * driver until a CUDA tensor is asked for, so the library loads and runs on machines without one. */
#include "backend.h"

#ifdef TESSERA_HAVE_CUDA
int ts_cuda_available_devices(void); /* kernels/cuda/device.cu: device count, 0 without a driver */
#endif

int ts_not_implemented(const char *op, ts_device dev) {
  return ts_set_error(TS_ERR_UNSUPPORTED, "%s: not implemented on %s", op, ts_device_str(dev));
}

const ts_backend *ts_backend_with(ts_device dev, size_t entry_offset, const char *op) {
  const ts_backend *be = ts_backend_for(dev);
  if (be && !*(void *const *)((const char *)be + entry_offset)) {
    ts_not_implemented(op, dev);
    return NULL;
  }
  return be;
}

const ts_backend *ts_backend_for(ts_device dev) {
  if (dev.type == TS_CPU) return &ts_cpu_backend;
  if (dev.type != TS_CUDA) {
    ts_set_error(TS_ERR_DEVICE, "unknown device type %d", dev.type);
    return NULL;
  }
#ifdef TESSERA_HAVE_CUDA
  int count = ts_cuda_available_devices();
  if (count == 0) {
    ts_set_error(TS_ERR_DEVICE, "cuda: no CUDA device is available on this machine (no GPU or no driver)");
    return NULL;
  }
  if (dev.index < 0 || dev.index >= count) {
    ts_set_error(TS_ERR_DEVICE, "cuda: device %d requested, this machine has %d", dev.index, count);
    return NULL;
  }
  return &ts_cuda_backend;
#else
  ts_set_error(TS_ERR_DEVICE, "cuda: this libtessera was built without CUDA (configure with -DTESSERA_CUDA=ON)");
  return NULL;
#endif
}

int ts_cuda_compiled(void) {
#ifdef TESSERA_HAVE_CUDA
  return 1;
#else
  return 0;
#endif
}

int ts_cuda_device_count(void) {
#ifdef TESSERA_HAVE_CUDA
  return ts_cuda_available_devices();
#else
  return 0;
#endif
}

int ts_cuda_synchronize(int device) {
  ts_device dev = {TS_CUDA, device};
  const ts_backend *be = ts_backend_for(dev);
  if (!be) return ts_last_status();
  return be->synchronize(device);
}

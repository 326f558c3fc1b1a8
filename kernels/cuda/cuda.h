/* cuda.h — the CUDA kernels behind ts_cuda_backend, and the device plumbing they share.
 *
 * Included from plain C (backend.c) and from CUDA C++ (*.cu): every declaration here has C
 * linkage, so the .cu files implement them as extern "C" and may use templates inside. */
#ifndef TESSERA_CUDA_H
#define TESSERA_CUDA_H

/* The C headers backend.h pulls in, first, so that they are not wrapped in extern "C" below. */
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "../../runtime/backend.h"

/* Devices beyond this many are not used (the runtime keeps memory statistics for 16). */
enum { CUDA_MAX_DEVICES = 16 };

/* device.cu — lazy initialization, one stream per device, memory, transfers. */
int ts_cuda_available_devices(void); /* called by runtime/dispatch.c; 0 without a GPU or driver */
void *cuda_alloc(size_t nbytes, int device_index);
void cuda_free(void *ptr, size_t nbytes, int device_index);
int cuda_copy_from_host(void *dst, const void *src, size_t nbytes, int device_index);
int cuda_copy_to_host(void *dst, const void *src, size_t nbytes, int device_index);
int cuda_synchronize(int device_index);

/* copy.cu */
int cuda_copy(ts_tensor *dst, const ts_tensor *src);
int cuda_fill(ts_tensor *dst, double value);
int cuda_arange(ts_tensor *out, double start, double step);

/* elementwise.cu */
/* float16 and bfloat16 compute natively (loaded as float, stored back rounded), the rest as on
   the CPU: float32, float64, int64 for every integer and bool. */
int cuda_compute_dtype(int dtype);
int cuda_unary(int op, ts_tensor *out, const ts_tensor *a);
int cuda_binary(int op, ts_tensor *out, const ts_tensor *a, const ts_tensor *b);
int cuda_where(ts_tensor *out, const ts_tensor *cond, const ts_tensor *a, const ts_tensor *b);
int cuda_clamp(ts_tensor *out, const ts_tensor *a, double lo, double hi, int has_lo, int has_hi);

#ifdef __cplusplus
}
#endif

#endif

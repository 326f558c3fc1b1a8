// copy.cu — dtype conversion copies, fill and arange on CUDA devices; conversions are value for
// value those of kernels/cpu/copy.c (NaN -> 0 and saturation into integers, bool = v != 0,
// float16/bfloat16 rounded to nearest even through float32).
#include "loop.cuh"

extern "C" {
#include "../cpu/cpu.h" // cpu_store_f64: a fill value's bytes are worked out on the host, as the CPU does
}

#include <string.h>

// Functors and kernels have internal linkage: another .cu may reuse a name.
namespace {
template <typename T> struct raw_copy_op {
  T *dst;
  const T *src;
  __host__ __device__ void operator()(const int64_t (&off)[2]) const { dst[off[0]] = src[off[1]]; }
};

template <int D, int S> struct convert_op {
  cuda_storage_t<D> *dst;
  const cuda_storage_t<S> *src;
  __host__ __device__ void operator()(const int64_t (&off)[2]) const { dst[off[0]] = cuda_convert<D, S>(src[off[1]]); }
};
} // namespace

static int same_dtype_copy(ts_tensor *dst, const ts_tensor *src) {
  if (ts_is_contiguous(dst) && ts_is_contiguous(src)) {
    cudaStream_t stream;
    if (cuda_stream_for("copy", dst->device.index, &stream)) return ts_last_status();
    size_t nbytes = (size_t)ts_numel(dst) * (size_t)ts_dtype_size(dst->dtype);
    return cuda_check(cudaMemcpyAsync(ts_elem_ptr(dst), ts_elem_ptr(src), nbytes, cudaMemcpyDeviceToDevice, stream),
                      "copy");
  }
  const ts_tensor *ops[2] = {dst, src};
  return cuda_dispatch_size(dst->dtype, [&](auto e) {
    using T = typename decltype(e)::type;
    return cuda_foreach("copy", ops, raw_copy_op<T>{(T *)ts_elem_ptr(dst), (const T *)ts_elem_ptr(src)});
  });
}

extern "C" int cuda_copy(ts_tensor *dst, const ts_tensor *src) {
  if (dst->dtype == src->dtype) return same_dtype_copy(dst, src);
  const ts_tensor *ops[2] = {dst, src};
  return cuda_dispatch_dtype("copy", src->dtype, [&](auto s) {
    return cuda_dispatch_dtype("copy", dst->dtype, [&](auto d) {
      constexpr int S = decltype(s)::value, D = decltype(d)::value;
      return cuda_foreach("copy", ops, convert_op<D, S>{cuda_data<D>(dst), cuda_data<S>(src)});
    });
  });
}

// ---- fill ----------------------------------------------------------------------------------------
namespace {
template <typename T> struct fill_op {
  T *dst;
  T value;
  __host__ __device__ void operator()(const int64_t (&off)[1]) const { dst[off[0]] = value; }
};
} // namespace

extern "C" int cuda_fill(ts_tensor *dst, double value) {
  char bytes[8] = {0};
  cpu_store_f64(dst->dtype, bytes, value);
  static const char zeros[8] = {0};
  if (ts_is_contiguous(dst) && memcmp(bytes, zeros, sizeof bytes) == 0) { // zeros: a memset
    cudaStream_t stream;
    if (cuda_stream_for("fill_", dst->device.index, &stream)) return ts_last_status();
    size_t nbytes = (size_t)ts_numel(dst) * (size_t)ts_dtype_size(dst->dtype);
    return cuda_check(cudaMemsetAsync(ts_elem_ptr(dst), 0, nbytes, stream), "fill_");
  }
  const ts_tensor *ops[1] = {dst};
  return cuda_dispatch_size(dst->dtype, [&](auto e) {
    using T = typename decltype(e)::type;
    T raw;
    memcpy(&raw, bytes, sizeof raw);
    return cuda_foreach("fill_", ops, fill_op<T>{(T *)ts_elem_ptr(dst), raw});
  });
}

// ---- arange --------------------------------------------------------------------------------------
// out is 1-d (any stride): a kernel of its own, since the value depends on the index itself.
template <int D>
static __global__ void arange_kernel(int64_t n, cuda_storage_t<D> *out, int64_t stride, double start, double step) {
  CUDA_GRID_STRIDE(i, n)
    // explicit roundings: a fused multiply-add would differ from the CPU's start + i*step
    out[i * stride] = cuda_store_f64<D>(__dadd_rn(start, __dmul_rn((double)i, step)));
}

extern "C" int cuda_arange(ts_tensor *out, double start, double step) {
  int64_t n = ts_numel(out);
  cudaStream_t stream;
  if (n == 0) return TS_OK;
  if (cuda_stream_for("arange", out->device.index, &stream)) return ts_last_status();
  return cuda_dispatch_dtype("arange", out->dtype, [&](auto d) {
    constexpr int D = decltype(d)::value;
    arange_kernel<D><<<cuda_blocks(n), CUDA_THREADS, 0, stream>>>(n, cuda_data<D>(out), out->stride[0], start, step);
    return cuda_check(cudaGetLastError(), "arange");
  });
}

// sort.cu — sort and topk along the last dim on CUDA devices, with the order of kernels/cpu/sort.c:
// each value becomes an unsigned key whose order is the wanted one (floats by the radix-sort bit
// trick after NaN becomes one positive NaN, above +inf, and -0.0 becomes 0.0; descending order
// flips every bit), equal keys keep their original order (stable), and the values written out
// are read back from the input by index, so they keep every bit.
//
// All rows sort together with CUB's device-wide radix sort, which is stable: first every element
// by key (its row-major number riding along), then, when there are several rows, by row number
// over the row bits only. The second sort keeps the first one's order within each row, so every
// row ends up sorted by key, ties in index order. topk takes the first k of each sorted row.
#include "loop.cuh"

#include <cub/device/device_radix_sort.cuh>
#include <string.h>

namespace {
// ---- keys ----------------------------------------------------------------------------------------
template <int D> struct key_of;
template <> struct key_of<TS_F32> {
  using type = uint32_t;
  __device__ static type get(float f) {
    uint32_t u = f != f ? 0x7fc00000u : f == 0 ? 0u : __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
};
template <> struct key_of<TS_F64> {
  using type = uint64_t;
  __device__ static type get(double f) {
    uint64_t u = f != f ? 0x7ff8000000000000ull : f == 0 ? 0ull : (uint64_t)__double_as_longlong(f);
    return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
  }
};
template <> struct key_of<TS_I64> {
  using type = uint64_t;
  __device__ static type get(int64_t v) { return (uint64_t)v ^ 0x8000000000000000ull; }
};
// float16 and bfloat16 order like the float32 they widen to: the same trick on their 16 bits.
__device__ __forceinline__ uint16_t key16(uint16_t bits, uint16_t exponent_mask, uint16_t quiet_nan) {
  uint16_t magnitude = bits & 0x7fff;
  uint16_t u = magnitude > exponent_mask ? quiet_nan : magnitude == 0 ? 0 : bits;
  return (u & 0x8000) ? (uint16_t)~u : (uint16_t)(u | 0x8000);
}
template <> struct key_of<TS_F16> {
  using type = uint16_t;
  __device__ static type get(__half h) { return key16(__half_as_ushort(h), 0x7c00, 0x7e00); }
};
template <> struct key_of<TS_BF16> {
  using type = uint16_t;
  __device__ static type get(__nv_bfloat16 h) { return key16(__bfloat16_as_ushort(h), 0x7f80, 0x7fc0); }
};

template <int D> struct key_fn {
  using K = typename key_of<D>::type;
  K *keys;
  uint64_t *numbers;
  const cuda_storage_t<D> *a;
  K flip;
  __device__ void operator()(const int64_t (&off)[2]) const {
    keys[off[0]] = key_of<D>::get(a[off[1]]) ^ flip;
    numbers[off[0]] = (uint64_t)off[0];
  }
};

__global__ void row_of_kernel(int64_t n, int64_t row_length, const uint64_t *numbers, uint64_t *rows) {
  CUDA_GRID_STRIDE(i, n) rows[i] = numbers[i] / (uint64_t)row_length;
}

// Element offsets of a (any strides) by row-major number.
struct source_geom {
  int ndim;
  int64_t shape[TS_MAX_DIMS], stride[TS_MAX_DIMS];
  __device__ int64_t offset(int64_t i) const {
    int64_t off = 0;
#pragma unroll
    for (int d = TS_MAX_DIMS - 1; d >= 0; d--) {
      if (d >= ndim) continue;
      off += (i % shape[d]) * stride[d];
      i /= shape[d];
    }
    return off;
  }
};

// The first out_len entries of every sorted row: values read from a by number, indices in the row.
template <typename T>
__global__ void take_sorted_kernel(int64_t total, int64_t out_len, int64_t row_length, const uint64_t *sorted,
                                   source_geom g, const T *a, T *values, int64_t *indices) {
  CUDA_GRID_STRIDE(q, total) {
    int64_t r = q / out_len, j = q % out_len;
    int64_t number = (int64_t)sorted[r * row_length + j];
    values[q] = a[g.offset(number)];
    indices[q] = number - r * row_length;
  }
}

// Stable ascending radix sort of (key, value) pairs by the low `bits` bits of the keys.
template <typename K>
int sort_pairs(const K *keys_in, K *keys_out, const uint64_t *values_in, uint64_t *values_out, int64_t n, int bits,
               int device, const char *op) {
  cudaStream_t stream;
  if (cuda_stream_for(op, device, &stream)) return ts_last_status();
  size_t temp_bytes = 0;
  int st = cuda_check(cub::DeviceRadixSort::SortPairs(NULL, temp_bytes, keys_in, keys_out, values_in, values_out, n, 0,
                                                      bits, stream), op);
  void *temp = NULL;
  if (!st && !(temp = cuda_alloc(temp_bytes ? temp_bytes : 1, device))) st = ts_last_status();
  if (!st)
    st = cuda_check(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, values_in, values_out, n, 0,
                                                    bits, stream), op);
  cuda_free(temp, temp_bytes, device); // stream-ordered: reused only after the sort
  return st;
}

// Orders the rows of a (last dim; any strides) and writes the first out_len of each.
template <int D>
int order_rows(const char *op, ts_tensor *values, ts_tensor *indices, const ts_tensor *a, int64_t out_len, bool descending) {
  using K = typename key_of<D>::type;
  int64_t n = ts_numel(a), row_length = a->ndim ? a->shape[a->ndim - 1] : 1;
  if (n == 0 || out_len == 0) return TS_OK;
  int64_t rows = n / row_length;
  int device = a->device.index;
  cudaStream_t stream;
  if (cuda_stream_for(op, device, &stream)) return ts_last_status();
  // keys, sorted keys, numbers, sorted numbers (then row numbers and the final order in the
  // first two u64 slots when several rows need the second sort)
  size_t key_bytes = ((size_t)n * sizeof(K) + 15) / 16 * 16, u64_bytes = (size_t)n * sizeof(uint64_t);
  size_t total = 2 * key_bytes + 4 * u64_bytes;
  char *buf = (char *)cuda_alloc(total, device);
  if (!buf) return ts_last_status();
  K *keys = (K *)buf, *sorted_keys = (K *)(buf + key_bytes);
  uint64_t *numbers = (uint64_t *)(buf + 2 * key_bytes), *order = numbers + n, *row_ids = numbers + 2 * n,
           *sorted_rows = numbers + 3 * n;
  ts_tensor flat = *a; // only the shape and contiguous strides matter: the plan of the key buffers
  ts_contiguous_strides(a->ndim, a->shape, flat.stride);
  const ts_tensor *ops[2] = {&flat, a};
  int st = cuda_foreach(op, ops, key_fn<D>{keys, numbers, cuda_data<D>(a), descending ? (K)~(K)0 : (K)0});
  if (!st) st = sort_pairs<K>(keys, sorted_keys, numbers, order, n, (int)(8 * sizeof(K)), device, op);
  uint64_t *final_order = order;
  if (!st && rows > 1) {
    row_of_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, stream>>>(n, row_length, order, row_ids);
    st = cuda_check(cudaGetLastError(), op);
    if (!st) st = sort_pairs<uint64_t>(row_ids, sorted_rows, order, numbers, n, cuda_bit_width((uint64_t)(rows - 1)), device, op);
    final_order = numbers;
  }
  if (!st) {
    source_geom g;
    memset(&g, 0, sizeof g);
    g.ndim = a->ndim;
    for (int d = 0; d < a->ndim; d++) {
      g.shape[d] = a->shape[d];
      g.stride[d] = a->stride[d];
    }
    int64_t out_total = rows * out_len;
    using T = cuda_storage_t<D>;
    take_sorted_kernel<T><<<cuda_blocks(out_total), CUDA_THREADS, 0, stream>>>(
        out_total, out_len, row_length, final_order, g, cuda_data<D>(a), cuda_data<D>(values),
        (int64_t *)ts_elem_ptr(indices));
    st = cuda_check(cudaGetLastError(), op);
  }
  cuda_free(buf, total, device);
  return st;
}

int run_rows(const char *op, ts_tensor *values, ts_tensor *indices, const ts_tensor *a, int64_t out_len, bool descending) {
  if (values->dtype != a->dtype || indices->dtype != TS_I64)
    return ts_set_error(TS_ERR_DTYPE, "%s: the cuda kernel writes values of the input's dtype %s and int64 indices, got "
                        "%s and %s", op, ts_dtype_name(a->dtype), ts_dtype_name(values->dtype),
                        ts_dtype_name(indices->dtype));
  switch (a->dtype) {
  case TS_F32: return order_rows<TS_F32>(op, values, indices, a, out_len, descending);
  case TS_F64: return order_rows<TS_F64>(op, values, indices, a, out_len, descending);
  case TS_F16: return order_rows<TS_F16>(op, values, indices, a, out_len, descending);
  case TS_BF16: return order_rows<TS_BF16>(op, values, indices, a, out_len, descending);
  case TS_I64: return order_rows<TS_I64>(op, values, indices, a, out_len, descending);
  default:
    return ts_set_error(TS_ERR_DTYPE, "%s: the cuda kernel expects float or int64 rows, got %s", op,
                        ts_dtype_name(a->dtype));
  }
}
} // namespace

extern "C" int cuda_sort_pairs_u64(const uint64_t *keys_in, uint64_t *keys_out, const uint64_t *values_in,
                                   uint64_t *values_out, int64_t n, int bits, int device_index, const char *op) {
  return sort_pairs<uint64_t>(keys_in, keys_out, values_in, values_out, n, bits, device_index, op);
}

extern "C" int cuda_sort(ts_tensor *values, ts_tensor *indices, const ts_tensor *a, int descending, int stable) {
  (void)stable; // always stable
  return run_rows("sort", values, indices, a, a->ndim ? a->shape[a->ndim - 1] : 1, descending != 0);
}

// The first k of the full sort: sorted whether or not `sorted` asks for it.
extern "C" int cuda_topk(ts_tensor *values, ts_tensor *indices, const ts_tensor *a, int64_t k, int largest, int sorted) {
  (void)sorted;
  return run_rows("topk", values, indices, a, k, largest != 0);
}

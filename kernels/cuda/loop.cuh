// loop.cuh — what the CUDA kernels share (C++ only): error and stream helpers from device.cu, the
// dtype <-> C++ type table with the CPU's exact value conversions, and the strided N-d elementwise
// launcher every kernel runs on (the GPU twin of kernels/cpu/loop.c).
#ifndef TESSERA_CUDA_LOOP_CUH
#define TESSERA_CUDA_LOOP_CUH

#include "cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// ---- device.cu: errors and streams -------------------------------------------------------------
// TS_OK, or sets "<op>: CUDA error <name>: <description>" (TS_ERR_MEMORY for out of memory).
int cuda_check(cudaError_t err, const char *op);
// Makes `device` current on this thread and gives its stream (created on first use).
int cuda_stream_for(const char *op, int device, cudaStream_t *stream);

// ---- dtypes --------------------------------------------------------------------------------------
// The C++ type a dtype is stored as. uint8 and bool share uint8_t; the dtype, not the type, picks
// the conversion.
template <int DT> struct cuda_dtype { };
template <> struct cuda_dtype<TS_F32> { using storage = float; using compute = float; };
template <> struct cuda_dtype<TS_F64> { using storage = double; using compute = double; };
template <> struct cuda_dtype<TS_F16> { using storage = __half; using compute = float; };
template <> struct cuda_dtype<TS_BF16> { using storage = __nv_bfloat16; using compute = float; };
template <> struct cuda_dtype<TS_I64> { using storage = int64_t; using compute = int64_t; };
template <> struct cuda_dtype<TS_I32> { using storage = int32_t; using compute = int64_t; };
template <> struct cuda_dtype<TS_U8> { using storage = uint8_t; using compute = int64_t; };
template <> struct cuda_dtype<TS_BOOL> { using storage = uint8_t; using compute = bool; };
template <int DT> using cuda_storage_t = typename cuda_dtype<DT>::storage;
template <int DT> using cuda_compute_t = typename cuda_dtype<DT>::compute;

template <int DT> struct cuda_dtype_tag { static constexpr int value = DT; };

// Calls f(cuda_dtype_tag<dtype>{}) so that one generic lambda covers every dtype.
template <typename F> int cuda_dispatch_dtype(const char *op, int dtype, F &&f) {
  switch (dtype) {
  case TS_F32: return f(cuda_dtype_tag<TS_F32>{});
  case TS_F64: return f(cuda_dtype_tag<TS_F64>{});
  case TS_F16: return f(cuda_dtype_tag<TS_F16>{});
  case TS_BF16: return f(cuda_dtype_tag<TS_BF16>{});
  case TS_I64: return f(cuda_dtype_tag<TS_I64>{});
  case TS_I32: return f(cuda_dtype_tag<TS_I32>{});
  case TS_U8: return f(cuda_dtype_tag<TS_U8>{});
  case TS_BOOL: return f(cuda_dtype_tag<TS_BOOL>{});
  default: return ts_set_error(TS_ERR_DTYPE, "%s: invalid dtype %d", op, dtype);
  }
}

// Moves that do not convert (same-dtype copies, fills, gathers) handle elements as raw unsigned
// integers of their size, NaN payloads kept: cuda_dispatch_size calls f(cuda_raw_element<size>{}).
template <int SIZE> struct cuda_raw_element;
template <> struct cuda_raw_element<1> { using type = uint8_t; };
template <> struct cuda_raw_element<2> { using type = uint16_t; };
template <> struct cuda_raw_element<4> { using type = uint32_t; };
template <> struct cuda_raw_element<8> { using type = uint64_t; };

template <typename F> int cuda_dispatch_size(int dtype, F &&f) {
  switch (ts_dtype_size(dtype)) {
  case 1: return f(cuda_raw_element<1>{});
  case 2: return f(cuda_raw_element<2>{});
  case 4: return f(cuda_raw_element<4>{});
  default: return f(cuda_raw_element<8>{});
  }
}

// The number of bits v needs (0 for 0): the key width a radix sort of values up to v must cover.
static inline int cuda_bit_width(uint64_t v) {
  int bits = 0;
  for (; v; v >>= 1) bits++;
  return bits;
}

__host__ __device__ constexpr bool cuda_is_floating(int dt) { return dt == TS_F32 || dt == TS_F64 || dt == TS_F16 || dt == TS_BF16; }

// Explicitly rounded arithmetic: the compiler never contracts these into fused multiply-adds, so a
// kernel that uses them rounds each step as the CPU reference does.
__device__ __forceinline__ float cuda_add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double cuda_add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float cuda_sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double cuda_sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float cuda_mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double cuda_mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float cuda_div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double cuda_div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float cuda_sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double cuda_sqrt_rn(double a) { return __dsqrt_rn(a); }

// Compute values <-> storage: float16/bfloat16 widen exactly and narrow with round to nearest even
// (like ts_float_to_half / ts_float_to_bf16); bool stores 0 or 1.
template <int DT> __host__ __device__ __forceinline__ cuda_compute_t<DT> cuda_to_compute(cuda_storage_t<DT> v) {
  if constexpr (DT == TS_F16) return __half2float(v);
  else if constexpr (DT == TS_BF16) return __bfloat162float(v);
  else if constexpr (DT == TS_BOOL) return v != 0;
  else return v;
}
template <int DT> __host__ __device__ __forceinline__ cuda_storage_t<DT> cuda_from_compute(cuda_compute_t<DT> v) {
  if constexpr (DT == TS_F16) return __float2half_rn(v);
  else if constexpr (DT == TS_BF16) return __float2bfloat16_rn(v);
  else if constexpr (DT == TS_BOOL) return v ? 1 : 0;
  else return (cuda_storage_t<DT>)v;
}

// The conversions of kernels/cpu/copy.c (cpu_load_f64, cpu_store_f64, cpu_load_i64,
// cpu_store_i64), value for value.
__host__ __device__ __forceinline__ int64_t cuda_saturate_i64(double v) {
  if (v != v) return 0;
  if (v >= 9223372036854775807.0) return INT64_MAX;
  if (v <= -9223372036854775808.0) return INT64_MIN;
  return (int64_t)v;
}

template <int DT> __host__ __device__ __forceinline__ double cuda_load_f64(cuda_storage_t<DT> v) {
  if constexpr (DT == TS_F16 || DT == TS_BF16) return (double)cuda_to_compute<DT>(v);
  else if constexpr (DT == TS_BOOL) return v != 0;
  else return (double)v;
}
template <int DT> __host__ __device__ __forceinline__ cuda_storage_t<DT> cuda_store_f64(double v) {
  if constexpr (DT == TS_F32) return (float)v;
  else if constexpr (DT == TS_F64) return v;
  else if constexpr (DT == TS_F16) return __float2half_rn((float)v); // through float, as the CPU
  else if constexpr (DT == TS_BF16) return __float2bfloat16_rn((float)v);
  else if constexpr (DT == TS_BOOL) return v != 0;
  else return (cuda_storage_t<DT>)(uint64_t)cuda_saturate_i64(v); // i32/u8 wrap like a C cast
}
template <int DT> __host__ __device__ __forceinline__ int64_t cuda_load_i64(cuda_storage_t<DT> v) {
  if constexpr (DT == TS_BOOL) return v != 0;
  else if constexpr (cuda_is_floating(DT)) return cuda_saturate_i64(cuda_load_f64<DT>(v));
  else return (int64_t)v;
}
template <int DT> __host__ __device__ __forceinline__ cuda_storage_t<DT> cuda_store_i64(int64_t v) {
  if constexpr (DT == TS_BOOL) return v != 0;
  else if constexpr (cuda_is_floating(DT)) return cuda_store_f64<DT>((double)v);
  else return (cuda_storage_t<DT>)(uint64_t)v;
}

// dst = src converted from dtype S to dtype D exactly as cpu_copy does it: float32 <-> float64
// directly, integer/bool pairs through int64 (exact), everything else through double.
template <int D, int S> __host__ __device__ __forceinline__ cuda_storage_t<D> cuda_convert(cuda_storage_t<S> v) {
  if constexpr (D == S) return v;
  else if constexpr ((S == TS_F32 && D == TS_F64) || (S == TS_F64 && D == TS_F32)) return (cuda_storage_t<D>)v;
  else if constexpr (!cuda_is_floating(S) && !cuda_is_floating(D)) return cuda_store_i64<D>(cuda_load_i64<S>(v));
  else return cuda_store_f64<D>(cuda_load_f64<S>(v));
}

// ---- the strided elementwise loop ---------------------------------------------------------------
constexpr int CUDA_THREADS = 256;
constexpr int64_t CUDA_MAX_BLOCKS = 1 << 20;

// K equally shaped operands (ops[0] is usually the output) after dropping size-1 dims and merging
// neighbours that step through memory as one dim for every operand. Passed to kernels by value.
template <int K> struct cuda_plan {
  int ndim;          // >= 1; dim ndim-1 is the innermost
  bool contiguous;   // one dim and unit strides: element i of every operand is at offset i
  bool narrow;       // numel < 2^32: index arithmetic in 32 bits, much cheaper than 64-bit division
  int64_t shape[TS_MAX_DIMS];
  int64_t stride[K][TS_MAX_DIMS]; // elements
};

template <int K> cuda_plan<K> cuda_make_plan(const ts_tensor *const (&ops)[K]) {
  cuda_plan<K> p = {};
  const ts_tensor *ref = ops[0];
  for (int d = 0; d < ref->ndim; d++) {
    if (ref->shape[d] == 1) continue;
    bool merge = p.ndim > 0;
    for (int k = 0; k < K && merge; k++) merge = p.stride[k][p.ndim - 1] == ops[k]->stride[d] * ref->shape[d];
    if (merge) {
      p.shape[p.ndim - 1] *= ref->shape[d];
      for (int k = 0; k < K; k++) p.stride[k][p.ndim - 1] = ops[k]->stride[d];
    } else {
      p.shape[p.ndim] = ref->shape[d];
      for (int k = 0; k < K; k++) p.stride[k][p.ndim] = ops[k]->stride[d];
      p.ndim++;
    }
  }
  if (p.ndim == 0) { // a single element
    p.ndim = 1;
    p.shape[0] = 1;
    for (int k = 0; k < K; k++) p.stride[k][0] = 1;
  }
  p.contiguous = p.ndim == 1;
  for (int k = 0; k < K; k++) p.contiguous = p.contiguous && p.stride[k][0] == 1;
  p.narrow = ts_numel(ref) <= (int64_t)UINT32_MAX;
  return p;
}

// The K operand offsets (in elements) of the element with row-major index i. Dims are peeled off
// innermost first; the outermost needs no division.
template <int K, typename I>
__host__ __device__ __forceinline__ void cuda_offsets_as(const cuda_plan<K> &p, I i, int64_t (&off)[K]) {
  for (int k = 0; k < K; k++) off[k] = 0;
  for (int d = p.ndim - 1; d > 0; d--) {
    I size = (I)p.shape[d], idx = i % size;
    i /= size;
    for (int k = 0; k < K; k++) off[k] += (int64_t)idx * p.stride[k][d];
  }
  for (int k = 0; k < K; k++) off[k] += (int64_t)i * p.stride[k][0];
}

template <int K> __host__ __device__ __forceinline__ void cuda_offsets(const cuda_plan<K> &p, int64_t i, int64_t (&off)[K]) {
  if (p.contiguous) {
    for (int k = 0; k < K; k++) off[k] = i;
  } else if (p.narrow) {
    cuda_offsets_as<K, uint32_t>(p, (uint32_t)i, off);
  } else {
    cuda_offsets_as<K, int64_t>(p, i, off);
  }
}

// f(off) handles one element given its K operand offsets.
template <int K, typename F> __global__ void cuda_elementwise_kernel(int64_t n, cuda_plan<K> p, F f) {
  int64_t step = (int64_t)gridDim.x * blockDim.x;
  int64_t off[K];
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    cuda_offsets(p, i, off);
    f(off);
  }
}

// Blocks for a grid-stride loop over n elements (beyond the cap, each thread takes several).
static inline unsigned cuda_blocks(int64_t n) {
  int64_t blocks = (n + CUDA_THREADS - 1) / CUDA_THREADS;
  return (unsigned)(blocks < CUDA_MAX_BLOCKS ? blocks : CUDA_MAX_BLOCKS);
}

// Inside a kernel: i runs over [0, n) in steps of the whole grid, each thread from its own index.
#define CUDA_GRID_STRIDE(i, n) \
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

// Runs f over every element of ops[0]'s shape on its device's stream; `op` names errors.
template <int K, typename F> int cuda_foreach(const char *op, const ts_tensor *const (&ops)[K], const F &f) {
  int64_t n = ts_numel(ops[0]);
  if (n == 0) return TS_OK;
  cudaStream_t stream;
  if (cuda_stream_for(op, ops[0]->device.index, &stream)) return ts_last_status();
  cuda_elementwise_kernel<K, F><<<cuda_blocks(n), CUDA_THREADS, 0, stream>>>(n, cuda_make_plan<K>(ops), f);
  return cuda_check(cudaGetLastError(), op);
}

// Typed element 0 of a tensor (its device address).
template <int DT> cuda_storage_t<DT> *cuda_data(const ts_tensor *t) { return (cuda_storage_t<DT> *)ts_elem_ptr(t); }
// The same for an optional tensor: NULL when t is.
template <int DT> cuda_storage_t<DT> *cuda_data_or_null(const ts_tensor *t) { return t ? cuda_data<DT>(t) : NULL; }

#endif

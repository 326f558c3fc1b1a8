// nn.cuh — what the CUDA nn kernels share (C++ only): accumulation types, warp and block
// reductions with a fixed combining order, device scratch memory, the GEMM behind bmm, linear
// and friends (linalg.cu), and the TF32 switch.
//
// Determinism: every sum here combines its terms in an order fixed by the shapes alone (no
// atomics on floating values), so a kernel gives bit-identical results run after run.
#ifndef TESSERA_CUDA_NN_CUH
#define TESSERA_CUDA_NN_CUH

#include "loop.cuh"

#include <type_traits>

// ---- types ----------------------------------------------------------------------------------------
// Kernels over floating tensors accumulate in float (float32, float16, bfloat16) or double.
template <int DT> using cuda_acc_t = cuda_compute_t<DT>;

// Calls f(cuda_dtype_tag<dtype>{}) for the four floating dtypes; anything else is refused naming op.
template <typename F> int cuda_dispatch_floating(const char *op, int dtype, F &&f) {
  switch (dtype) {
  case TS_F32: return f(cuda_dtype_tag<TS_F32>{});
  case TS_F64: return f(cuda_dtype_tag<TS_F64>{});
  case TS_F16: return f(cuda_dtype_tag<TS_F16>{});
  case TS_BF16: return f(cuda_dtype_tag<TS_BF16>{});
  default:
    return ts_set_error(TS_ERR_DTYPE, "%s: the cuda kernel takes float32, float64, float16 or bfloat16, got %s", op,
                        ts_dtype_name(dtype));
  }
}

template <int DT> __device__ __forceinline__ cuda_acc_t<DT> cuda_load(const cuda_storage_t<DT> *p, int64_t i) {
  return cuda_to_compute<DT>(p[i]);
}
template <int DT> __device__ __forceinline__ void cuda_store(cuda_storage_t<DT> *p, int64_t i, cuda_acc_t<DT> v) {
  p[i] = cuda_from_compute<DT>(v);
}
// An optional per-element parameter (weight, bias): `absent` where the pointer is NULL.
template <int DT>
__device__ __forceinline__ cuda_acc_t<DT> cuda_param(const cuda_storage_t<DT> *p, int64_t i, cuda_acc_t<DT> absent) {
  return p ? cuda_to_compute<DT>(p[i]) : absent;
}

// exp and log in the accumulation precision (full-precision expf, as the CPU's expf).
__device__ __forceinline__ float cuda_exp(float x) { return expf(x); }
__device__ __forceinline__ double cuda_exp(double x) { return exp(x); }
__device__ __forceinline__ float cuda_log(float x) { return logf(x); }
__device__ __forceinline__ double cuda_log(double x) { return log(x); }

// ---- dtype checks -----------------------------------------------------------------------------------
// Every tensor given (NULL entries, optional parameters, are skipped) shares the floating dtype of the
// first; anything else is refused naming op.
static inline int cuda_check_floating_alike(const char *op, const ts_tensor *const *ts, int count) {
  int dt = ts[0]->dtype;
  for (int i = 0; i < count; i++)
    if (ts[i] && (ts[i]->dtype != dt || !cuda_is_floating(dt)))
      return ts_set_error(TS_ERR_DTYPE, "%s: the cuda kernel takes floating tensors of one dtype, got %s and %s", op,
                          ts_dtype_name(dt), ts_dtype_name(ts[i]->dtype));
  return TS_OK;
}
static inline int cuda_check_floating_alike(const char *op, const ts_tensor *a, const ts_tensor *b) {
  const ts_tensor *pair[] = {a, b};
  return cuda_check_floating_alike(op, pair, 2);
}

// ---- reductions -----------------------------------------------------------------------------------
template <typename A> __device__ __forceinline__ A cuda_warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// The max of the lanes' values, ignoring NaN like the CPU's `v > m ? v : m` scans do.
template <typename A> __device__ __forceinline__ A cuda_warp_max(A v) {
  for (int o = 16; o > 0; o >>= 1) {
    A other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other > v ? other : v;
  }
  return v;
}

// The sum over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
// `scratch` holds 32 values; the block may reuse it as soon as this returns.
template <typename A> __device__ A cuda_block_sum(A v, A *scratch) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = cuda_warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? scratch[lane] : (A)0;
    v = cuda_warp_sum(v);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  v = scratch[0];
  __syncthreads();
  return v;
}

template <typename A> __device__ A cuda_block_max(A v, A *scratch) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = cuda_warp_max(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? scratch[lane] : (A)-INFINITY;
    v = cuda_warp_max(v);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  v = scratch[0];
  __syncthreads();
  return v;
}

// ---- launch helpers -------------------------------------------------------------------------------
static inline unsigned cuda_grid_for(int64_t items, int per_block) {
  int64_t blocks = (items + per_block - 1) / per_block;
  return (unsigned)(blocks < 1 ? 1 : blocks < CUDA_MAX_BLOCKS ? blocks : CUDA_MAX_BLOCKS);
}

// A kernel launch's error (bad configuration, missing kernel image) as a tessera error naming op.
static inline int cuda_launched(const char *op) { return cuda_check(cudaGetLastError(), op); }

// Raises a kernel's dynamic shared-memory limit past the default 48 KB when `bytes` need it; fails
// naming `what` needs them when the device cannot give that much.
template <typename Kernel> int cuda_allow_shared(const char *op, Kernel kernel, size_t bytes, int device, const char *what) {
  if (bytes <= 48 * 1024) return TS_OK;
  int limit = 0;
  if (cuda_check(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), op))
    return ts_last_status();
  if (bytes > (size_t)limit)
    return ts_set_error(TS_ERR_UNSUPPORTED, "%s: %s need %zu bytes of shared memory per block, the device offers %d", op,
                        what, bytes, limit);
  return cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes), op);
}

// ---- device scratch memory ------------------------------------------------------------------------
// Temporary device memory from the tessera allocator, released at scope exit. Allocation and
// release are ordered on the device's stream, so releasing right after enqueueing the kernels that
// use it is safe.
struct cuda_scratch {
  void *ptr = nullptr;
  size_t bytes = 0;
  int device = 0;
  cuda_scratch() = default;
  cuda_scratch(const cuda_scratch &) = delete;
  cuda_scratch &operator=(const cuda_scratch &) = delete;
  ~cuda_scratch() {
    if (ptr) cuda_free(ptr, bytes, device);
  }
  // TS_OK, or the allocator's out-of-memory error. Zero bytes allocate nothing.
  int allocate(int dev, size_t nbytes) {
    device = dev;
    bytes = nbytes;
    if (nbytes == 0) return TS_OK;
    ptr = cuda_alloc(nbytes, dev);
    return ptr ? TS_OK : ts_last_status();
  }
  template <typename T> T *as() const { return (T *)ptr; }
};

// ---- column sums ----------------------------------------------------------------------------------
// K sums per column j of a [rows, cols] layout: s[k] = sum over r of the k-th term of (r, j).
// Rows go in fixed chunks (one block row of the grid each), each chunk's sum is written to a
// scratch row, and the chunks are combined in order: no atomics, the same bits on every run.
// Term: `void operator()(int64_t r, int64_t j, A (&t)[K]) const` (device);
// Store: `void operator()(int64_t j, const A (&s)[K]) const` (device).
constexpr int CUDA_COLSUM_X = 32, CUDA_COLSUM_Y = 8;

template <typename A, int K, typename Term>
__global__ void __launch_bounds__(CUDA_COLSUM_X *CUDA_COLSUM_Y)
    cuda_column_partials_kernel(int64_t rows, int64_t cols, int64_t chunk_rows, Term term, A *partial) {
  __shared__ A tile[K][CUDA_COLSUM_Y][CUDA_COLSUM_X + 1];
  int64_t j = (int64_t)blockIdx.x * CUDA_COLSUM_X + threadIdx.x;
  int64_t r0 = (int64_t)blockIdx.y * chunk_rows, r1 = r0 + chunk_rows < rows ? r0 + chunk_rows : rows;
  A acc[K];
  for (int k = 0; k < K; k++) acc[k] = 0;
  if (j < cols)
    for (int64_t r = r0 + threadIdx.y; r < r1; r += CUDA_COLSUM_Y) {
      A t[K];
      term(r, j, t);
      for (int k = 0; k < K; k++) acc[k] += t[k];
    }
  for (int k = 0; k < K; k++) tile[k][threadIdx.y][threadIdx.x] = acc[k];
  __syncthreads();
  if (threadIdx.y != 0 || j >= cols) return;
  for (int k = 0; k < K; k++) {
    A s = 0;
    for (int y = 0; y < CUDA_COLSUM_Y; y++) s += tile[k][y][threadIdx.x];
    partial[((int64_t)blockIdx.y * K + k) * cols + j] = s;
  }
}

template <typename A, int K, typename Store>
__global__ void cuda_column_combine_kernel(int64_t cols, int64_t chunks, const A *partial, Store store) {
  CUDA_GRID_STRIDE(j, cols) {
    A s[K];
    for (int k = 0; k < K; k++) s[k] = 0;
    for (int64_t c = 0; c < chunks; c++)
      for (int k = 0; k < K; k++) s[k] += partial[(c * K + k) * cols + j];
    store(j, s);
  }
}

template <typename A, int K, typename Term, typename Store>
int cuda_column_sums(const char *op, int device, cudaStream_t stream, int64_t rows, int64_t cols, const Term &term,
                     const Store &store) {
  if (cols <= 0) return TS_OK;
  int64_t chunks = (rows + 63) / 64;
  chunks = chunks < 1 ? 1 : chunks > 512 ? 512 : chunks;
  int64_t chunk_rows = (rows + chunks - 1) / chunks;
  if (chunk_rows < 1) chunk_rows = 1;
  cuda_scratch partial;
  if (partial.allocate(device, (size_t)(chunks * K * cols) * sizeof(A))) return ts_last_status();
  dim3 grid((unsigned)((cols + CUDA_COLSUM_X - 1) / CUDA_COLSUM_X), (unsigned)chunks);
  cuda_column_partials_kernel<A, K, Term>
      <<<grid, dim3(CUDA_COLSUM_X, CUDA_COLSUM_Y), 0, stream>>>(rows, cols, chunk_rows, term, partial.as<A>());
  if (cuda_launched(op)) return ts_last_status();
  cuda_column_combine_kernel<A, K, Store><<<cuda_blocks(cols), CUDA_THREADS, 0, stream>>>(cols, chunks, partial.as<A>(), store);
  return cuda_launched(op);
}

// ---- GEMM (linalg.cu) -----------------------------------------------------------------------------
// A row-major view of one operand: element (i, j) of op(X) is data[i * ld + j], or data[j * ld + i]
// when `trans` (the matrix is stored transposed, e.g. a transposed view). Matrix b of a batch
// starts batch_stride elements after matrix b - 1 (0: one matrix for the whole batch).
struct cuda_matrix {
  const void *data;
  bool trans;
  int64_t ld;
  int64_t batch_stride;
};

// c[b] (n x m, row-major with row stride ldc) = op(a[b]) (n x k) @ op(b[b]) (k x m) + beta * c[b]
// (+ bias[j] in every row when bias is not NULL), for b < batch; on the device's stream, through
// cuBLASLt (float32 with TF32 only when allowed, float16/bfloat16 with float32 accumulation) or
// cuBLAS (float64). beta is 0 or 1. k = 0 writes beta * c (+ bias).
int cuda_gemm(const char *op, int device, int dtype, int64_t batch, int64_t n, int64_t m, int64_t k,
              const cuda_matrix &a, const cuda_matrix &b, void *c, int64_t ldc, int64_t c_batch_stride, double beta,
              const void *bias);

// Whether float32 products and convolutions may use TF32 tensor cores (ts_cuda_set_allow_tf32).
bool cuda_tf32_allowed();

#endif

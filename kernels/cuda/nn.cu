// nn.cu — linear layers, softmax / log_softmax and dropout's masked scaling on CUDA devices, with
// the semantics of kernels/cpu/nn.c.
//
// Linear products go through cuda_gemm (linalg.cu): cuBLASLt with the bias added by its epilogue
// where it has an algorithm for it. The bias gradient is a deterministic column sum. Softmax runs
// one warp per row for rows of up to 1024 values, one block per row beyond, and one thread per
// column when the softmax dim is not the innermost one (reads then stay coalesced across the
// columns). float16/bfloat16 compute in float32 registers and are stored rounded once.
#include "nn.cuh"

#include <math.h>

// ---- linear ---------------------------------------------------------------------------------------
// A [rows, cols] operand that has a unit stride in one of its dims, as the CPU's blas_view.
static cuda_matrix matrix_of(const ts_tensor *t) {
  int64_t cols = t->shape[1];
  if (t->stride[1] == 1 && t->stride[0] >= cols) return {ts_elem_ptr(t), false, t->stride[0], 0};
  return {ts_elem_ptr(t), true, t->stride[1], 0};
}

// The transpose of a matrix view.
static cuda_matrix transposed(cuda_matrix m) {
  m.trans = !m.trans;
  return m;
}

extern "C" int cuda_linear(ts_tensor *out, const ts_tensor *x, const ts_tensor *w, const ts_tensor *b) {
  const char *op = "linear";
  int64_t m = x->shape[0], k = x->shape[1], n = w->shape[0];
  if (cuda_check_floating_alike(op, out, x)) return ts_last_status();
  // out [m, n] = x [m, k] @ w^T [k, n] (+ b in every row)
  return cuda_gemm(op, out->device.index, out->dtype, 1, m, n, k, matrix_of(x), transposed(matrix_of(w)),
                   ts_elem_ptr(out), n, 0, 0.0, b ? ts_elem_ptr(b) : NULL);
}

namespace {
template <int DT> struct column_of_g {
  const cuda_storage_t<DT> *g;
  int64_t cols;
  __device__ void operator()(int64_t r, int64_t j, cuda_acc_t<DT> (&t)[1]) const { t[0] = cuda_load<DT>(g, r * cols + j); }
};
template <int DT> struct store_vector {
  cuda_storage_t<DT> *out;
  __device__ void operator()(int64_t j, const cuda_acc_t<DT> (&s)[1]) const { cuda_store<DT>(out, j, s[0]); }
};
} // namespace

// gb[j] = sum over the rows of g[r, j] (g contiguous [rows, cols]).
static int bias_grad(const char *op, ts_tensor *gb, const ts_tensor *g) {
  cudaStream_t stream;
  if (cuda_stream_for(op, g->device.index, &stream)) return ts_last_status();
  return cuda_dispatch_floating(op, g->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    int64_t rows = g->shape[0], cols = g->shape[1];
    return cuda_column_sums<cuda_acc_t<DT>, 1>(op, g->device.index, stream, rows, cols,
                                               column_of_g<DT>{cuda_data<DT>(g), cols}, store_vector<DT>{cuda_data<DT>(gb)});
  });
}

extern "C" int cuda_linear_backward(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g, const ts_tensor *x,
                                    const ts_tensor *w) {
  const char *op = "linear backward";
  int64_t m = g->shape[0], n = g->shape[1];
  int device = g->device.index, dtype = g->dtype;
  const ts_tensor *all[6] = {g, gx, gw, gb, x, w};
  if (cuda_check_floating_alike(op, all, 6)) return ts_last_status();
  cuda_matrix gm = {ts_elem_ptr(g), false, n > 0 ? n : 1, 0};
  if (gx && ts_numel(gx) > 0) { // gx [m, k] = g [m, n] @ w [n, k]
    int64_t k = gx->shape[1];
    if (cuda_gemm(op, device, dtype, 1, m, k, n, gm, matrix_of(w), ts_elem_ptr(gx), k, 0, 0.0, NULL))
      return ts_last_status();
  }
  if (gw && ts_numel(gw) > 0) { // gw [n, k] = g^T [n, m] @ x [m, k]
    int64_t k = gw->shape[1];
    if (cuda_gemm(op, device, dtype, 1, n, k, m, transposed(gm), matrix_of(x), ts_elem_ptr(gw), k, 0, 0.0, NULL))
      return ts_last_status();
  }
  if (gb && ts_numel(gb) > 0) return bias_grad(op, gb, g);
  return TS_OK;
}

// ---- softmax --------------------------------------------------------------------------------------
// Tensors are contiguous [A, D, B]; softmax over D. Rows (B = 1) of up to WARP_ROW_LIMIT values
// take one warp each, longer rows one block; with B > 1 a thread takes one (a, b) column.
constexpr int64_t WARP_ROW_LIMIT = 1024;
constexpr int ROW_BLOCK = 256;

namespace {
// What one row (or column) of the forward computes: y = softmax(x) or log_softmax(x).
template <int DT, bool LOG> struct softmax_finish {
  using A = cuda_acc_t<DT>;
  __device__ static A value(A x, A mx, A post) { return LOG ? x - post : cuda_exp(x - mx) * post; }
  // post: log_softmax subtracts mx + log(sum), softmax multiplies by 1 / sum
  __device__ static A post_of(A mx, A sum) { return LOG ? mx + cuda_log(sum) : (A)1 / sum; }
};

// What the backward computes from the row's dot: softmax gx = y (g - sum(g y)),
// log_softmax gx = g - exp(y) sum(g).
template <int DT, bool LOG> struct softmax_grad {
  using A = cuda_acc_t<DT>;
  __device__ static A term(A g, A y) { return LOG ? g : g * y; }
  __device__ static A value(A g, A y, A dot) { return LOG ? g - cuda_exp(y) * dot : y * (g - dot); }
};
} // namespace

template <int DT, bool LOG>
static __global__ void softmax_warp_kernel(int64_t rows, int64_t d, const cuda_storage_t<DT> *x, cuda_storage_t<DT> *y) {
  using A = cuda_acc_t<DT>;
  using F = softmax_finish<DT, LOG>;
  int lane = threadIdx.x & 31;
  int64_t step = (int64_t)gridDim.x * (blockDim.x >> 5);
  for (int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); row < rows; row += step) {
    const cuda_storage_t<DT> *xr = x + row * d;
    cuda_storage_t<DT> *yr = y + row * d;
    A mx = -INFINITY, sum = 0;
    for (int64_t j = lane; j < d; j += 32) {
      A v = cuda_load<DT>(xr, j);
      mx = v > mx ? v : mx;
    }
    mx = cuda_warp_max(mx);
    for (int64_t j = lane; j < d; j += 32) sum += cuda_exp(cuda_load<DT>(xr, j) - mx);
    A post = F::post_of(mx, cuda_warp_sum(sum));
    for (int64_t j = lane; j < d; j += 32) cuda_store<DT>(yr, j, F::value(cuda_load<DT>(xr, j), mx, post));
  }
}

template <int DT, bool LOG>
static __global__ void __launch_bounds__(ROW_BLOCK)
    softmax_block_kernel(int64_t rows, int64_t d, const cuda_storage_t<DT> *x, cuda_storage_t<DT> *y) {
  using A = cuda_acc_t<DT>;
  using F = softmax_finish<DT, LOG>;
  __shared__ A scratch[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const cuda_storage_t<DT> *xr = x + row * d;
    cuda_storage_t<DT> *yr = y + row * d;
    A mx = -INFINITY, sum = 0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      A v = cuda_load<DT>(xr, j);
      mx = v > mx ? v : mx;
    }
    mx = cuda_block_max(mx, scratch);
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) sum += cuda_exp(cuda_load<DT>(xr, j) - mx);
    A post = F::post_of(mx, cuda_block_sum(sum, scratch));
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) cuda_store<DT>(yr, j, F::value(cuda_load<DT>(xr, j), mx, post));
  }
}

template <int DT, bool LOG>
static __global__ void softmax_column_kernel(int64_t a, int64_t d, int64_t b, const cuda_storage_t<DT> *x,
                                             cuda_storage_t<DT> *y) {
  using A = cuda_acc_t<DT>;
  using F = softmax_finish<DT, LOG>;
  int64_t columns = a * b;
  CUDA_GRID_STRIDE(c, columns) {
    int64_t base = c / b * d * b + c % b;
    A mx = -INFINITY, sum = 0;
    for (int64_t i = 0; i < d; i++) {
      A v = cuda_load<DT>(x, base + i * b);
      mx = v > mx ? v : mx;
    }
    for (int64_t i = 0; i < d; i++) sum += cuda_exp(cuda_load<DT>(x, base + i * b) - mx);
    A post = F::post_of(mx, sum);
    for (int64_t i = 0; i < d; i++) cuda_store<DT>(y, base + i * b, F::value(cuda_load<DT>(x, base + i * b), mx, post));
  }
}

template <int DT, bool LOG>
static __global__ void softmax_backward_warp_kernel(int64_t rows, int64_t d, const cuda_storage_t<DT> *g,
                                                    const cuda_storage_t<DT> *y, cuda_storage_t<DT> *gx) {
  using A = cuda_acc_t<DT>;
  using F = softmax_grad<DT, LOG>;
  int lane = threadIdx.x & 31;
  int64_t step = (int64_t)gridDim.x * (blockDim.x >> 5);
  for (int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); row < rows; row += step) {
    int64_t base = row * d;
    A dot = 0;
    for (int64_t j = lane; j < d; j += 32) dot += F::term(cuda_load<DT>(g, base + j), cuda_load<DT>(y, base + j));
    dot = cuda_warp_sum(dot);
    for (int64_t j = lane; j < d; j += 32)
      cuda_store<DT>(gx, base + j, F::value(cuda_load<DT>(g, base + j), cuda_load<DT>(y, base + j), dot));
  }
}

template <int DT, bool LOG>
static __global__ void __launch_bounds__(ROW_BLOCK)
    softmax_backward_block_kernel(int64_t rows, int64_t d, const cuda_storage_t<DT> *g, const cuda_storage_t<DT> *y,
                                  cuda_storage_t<DT> *gx) {
  using A = cuda_acc_t<DT>;
  using F = softmax_grad<DT, LOG>;
  __shared__ A scratch[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    int64_t base = row * d;
    A dot = 0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x)
      dot += F::term(cuda_load<DT>(g, base + j), cuda_load<DT>(y, base + j));
    dot = cuda_block_sum(dot, scratch);
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x)
      cuda_store<DT>(gx, base + j, F::value(cuda_load<DT>(g, base + j), cuda_load<DT>(y, base + j), dot));
  }
}

template <int DT, bool LOG>
static __global__ void softmax_backward_column_kernel(int64_t a, int64_t d, int64_t b, const cuda_storage_t<DT> *g,
                                                      const cuda_storage_t<DT> *y, cuda_storage_t<DT> *gx) {
  using A = cuda_acc_t<DT>;
  using F = softmax_grad<DT, LOG>;
  int64_t columns = a * b;
  CUDA_GRID_STRIDE(c, columns) {
    int64_t base = c / b * d * b + c % b;
    A dot = 0;
    for (int64_t i = 0; i < d; i++) dot += F::term(cuda_load<DT>(g, base + i * b), cuda_load<DT>(y, base + i * b));
    for (int64_t i = 0; i < d; i++)
      cuda_store<DT>(gx, base + i * b, F::value(cuda_load<DT>(g, base + i * b), cuda_load<DT>(y, base + i * b), dot));
  }
}

// Picks the layout's kernel; `rows`/`block`/`column` launch the three variants.
template <typename Rows, typename Block, typename Column>
static int launch_softmax(const char *op, const ts_tensor *t, Rows rows, Block block, Column column) {
  int64_t a = t->shape[0], d = t->shape[1], b = t->shape[2];
  cudaStream_t stream;
  if (ts_numel(t) == 0) return TS_OK;
  if (cuda_stream_for(op, t->device.index, &stream)) return ts_last_status();
  if (b != 1) {
    column(cuda_blocks(a * b), CUDA_THREADS, stream);
  } else if (d <= WARP_ROW_LIMIT) {
    rows(cuda_grid_for(a, CUDA_THREADS / 32), CUDA_THREADS, stream);
  } else {
    block(cuda_grid_for(a, 1), ROW_BLOCK, stream);
  }
  return cuda_launched(op);
}

extern "C" int cuda_softmax(ts_tensor *out, const ts_tensor *x, int log) {
  const char *op = log ? "log_softmax" : "softmax";
  if (cuda_check_floating_alike(op, out, x)) return ts_last_status();
  int64_t a = x->shape[0], d = x->shape[1], b = x->shape[2];
  return cuda_dispatch_floating(op, x->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    const cuda_storage_t<DT> *xp = cuda_data<DT>(x);
    cuda_storage_t<DT> *yp = cuda_data<DT>(out);
    auto rows = [&](unsigned grid, int threads, cudaStream_t s) {
      if (log) softmax_warp_kernel<DT, true><<<grid, threads, 0, s>>>(a, d, xp, yp);
      else softmax_warp_kernel<DT, false><<<grid, threads, 0, s>>>(a, d, xp, yp);
    };
    auto block = [&](unsigned grid, int threads, cudaStream_t s) {
      if (log) softmax_block_kernel<DT, true><<<grid, threads, 0, s>>>(a, d, xp, yp);
      else softmax_block_kernel<DT, false><<<grid, threads, 0, s>>>(a, d, xp, yp);
    };
    auto column = [&](unsigned grid, int threads, cudaStream_t s) {
      if (log) softmax_column_kernel<DT, true><<<grid, threads, 0, s>>>(a, d, b, xp, yp);
      else softmax_column_kernel<DT, false><<<grid, threads, 0, s>>>(a, d, b, xp, yp);
    };
    return launch_softmax(op, x, rows, block, column);
  });
}

extern "C" int cuda_softmax_backward(ts_tensor *gx, const ts_tensor *g, const ts_tensor *y, int log) {
  const char *op = log ? "log_softmax backward" : "softmax backward";
  if (cuda_check_floating_alike(op, gx, g) || cuda_check_floating_alike(op, gx, y)) return ts_last_status();
  int64_t a = y->shape[0], d = y->shape[1], b = y->shape[2];
  return cuda_dispatch_floating(op, y->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    const cuda_storage_t<DT> *gp = cuda_data<DT>(g), *yp = cuda_data<DT>(y);
    cuda_storage_t<DT> *out = cuda_data<DT>(gx);
    auto rows = [&](unsigned grid, int threads, cudaStream_t s) {
      if (log) softmax_backward_warp_kernel<DT, true><<<grid, threads, 0, s>>>(a, d, gp, yp, out);
      else softmax_backward_warp_kernel<DT, false><<<grid, threads, 0, s>>>(a, d, gp, yp, out);
    };
    auto block = [&](unsigned grid, int threads, cudaStream_t s) {
      if (log) softmax_backward_block_kernel<DT, true><<<grid, threads, 0, s>>>(a, d, gp, yp, out);
      else softmax_backward_block_kernel<DT, false><<<grid, threads, 0, s>>>(a, d, gp, yp, out);
    };
    auto column = [&](unsigned grid, int threads, cudaStream_t s) {
      if (log) softmax_backward_column_kernel<DT, true><<<grid, threads, 0, s>>>(a, d, b, gp, yp, out);
      else softmax_backward_column_kernel<DT, false><<<grid, threads, 0, s>>>(a, d, b, gp, yp, out);
    };
    return launch_softmax(op, y, rows, block, column);
  });
}

// ---- dropout: out = x * mask * scale ----------------------------------------------------------------
namespace {
// x * 0 where dropped (not a plain 0), so that an inf or NaN input stays visible, as on the CPU.
template <int DT> struct masked_scale_fn {
  cuda_storage_t<DT> *out;
  const cuda_storage_t<DT> *x;
  const uint8_t *mask;
  cuda_acc_t<DT> scale;
  __device__ void operator()(const int64_t (&off)[3]) const {
    cuda_acc_t<DT> v = cuda_to_compute<DT>(x[off[1]]);
    out[off[0]] = cuda_from_compute<DT>(v * (mask[off[2]] ? scale : (cuda_acc_t<DT>)0));
  }
};
} // namespace

extern "C" int cuda_masked_scale(ts_tensor *out, const ts_tensor *x, const ts_tensor *mask, double scale) {
  const char *op = "dropout";
  if (cuda_check_floating_alike(op, out, x)) return ts_last_status();
  if (mask->dtype != TS_BOOL && mask->dtype != TS_U8)
    return ts_set_error(TS_ERR_DTYPE, "%s: the mask must be bool, got %s", op, ts_dtype_name(mask->dtype));
  const ts_tensor *ops[3] = {out, x, mask};
  return cuda_dispatch_floating(op, out->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    masked_scale_fn<DT> f = {cuda_data<DT>(out), cuda_data<DT>(x), (const uint8_t *)ts_elem_ptr(mask),
                             (cuda_acc_t<DT>)scale};
    return cuda_foreach(op, ops, f);
  });
}

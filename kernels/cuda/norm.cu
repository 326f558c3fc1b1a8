// norm.cu — layer norm, batch norm and group norm on CUDA devices, forward and backward, with the
// semantics of kernels/cpu/norm.c.
//
// Statistics take two passes (the mean, then the squared deviations), as on the CPU, so that they
// stay exact where E[x^2] - E[x]^2 would cancel. Layer norm rows of up to 1024 values are held in
// the registers of one warp (one read of x, one write of out); longer rows and group norm rows
// take one block each and re-read their row from cache. Sums across rows (weight and bias
// gradients, batch statistics) go through fixed chunks combined in order: no floating atomics,
// the same bits on every run. Everything accumulates in float (float32/float16/bfloat16) or
// double. Batch norm's statistics are stored in the tensors' dtype (the runtime's compute dtype);
// layer and group norm keep theirs in the accumulation type (float32 for float16/bfloat16).
#include "nn.cuh"

#include <math.h>

constexpr int ROW_BLOCK = 256;    // threads of a block-per-row kernel
constexpr int WARP_ROWS = 4;      // rows (warps) per block of a warp-per-row kernel
constexpr int64_t WARP_ROW_LIMIT = 1024;

// Layer and group norm: the tensors share x's dtype, the statistics are in its accumulation type
// (float32, or float64 for float64), as the runtime allocates them.
static int check_norm_dtypes(const char *op, const ts_tensor *const *ts, int count, const ts_tensor *mean,
                             const ts_tensor *rstd) {
  if (cuda_check_floating_alike(op, ts, count)) return ts_last_status();
  int want = ts[0]->dtype == TS_F64 ? TS_F64 : TS_F32;
  if (mean->dtype != want || rstd->dtype != want)
    return ts_set_error(TS_ERR_DTYPE, "%s: the cuda kernel keeps the statistics of %s input in %s, got %s and %s", op,
                        ts_dtype_name(ts[0]->dtype), ts_dtype_name(want), ts_dtype_name(mean->dtype),
                        ts_dtype_name(rstd->dtype));
  return TS_OK;
}

// The statistics of a layer or group norm (checked by check_norm_dtypes).
template <int DT> static cuda_acc_t<DT> *cuda_stats(const ts_tensor *t) { return (cuda_acc_t<DT> *)ts_elem_ptr(t); }

// ---- layer norm -------------------------------------------------------------------------------------
template <int DT> struct row_args {
  using T = cuda_storage_t<DT>;
  using A = cuda_acc_t<DT>;
  int64_t m, n;
  const T *x, *w, *b, *g;
  const A *mean_in, *rstd_in;
  T *out, *gx;
  A *mean, *rstd;
  A eps;
};

// One warp per row; lane l holds elements l, l + 32, ... (VPT of them) in registers.
template <int DT, int VPT>
static __global__ void __launch_bounds__(WARP_ROWS * 32) layer_norm_warp_kernel(row_args<DT> p) {
  using A = cuda_acc_t<DT>;
  int lane = threadIdx.x & 31;
  int64_t step = (int64_t)gridDim.x * WARP_ROWS;
  for (int64_t row = (int64_t)blockIdx.x * WARP_ROWS + (threadIdx.x >> 5); row < p.m; row += step) {
    const cuda_storage_t<DT> *xr = p.x + row * p.n;
    A v[VPT], s = 0, q = 0;
#pragma unroll
    for (int i = 0; i < VPT; i++) {
      int64_t j = lane + 32 * i;
      v[i] = j < p.n ? cuda_load<DT>(xr, j) : (A)0;
      s += v[i];
    }
    A mu = p.n > 0 ? cuda_warp_sum(s) / (A)p.n : cuda_warp_sum(s); // an empty row: 0, as the CPU
#pragma unroll
    for (int i = 0; i < VPT; i++)
      if (lane + 32 * i < p.n) {
        A d = v[i] - mu;
        q += d * d;
      }
    A r = (A)1 / sqrt(cuda_warp_sum(q) / (A)p.n + p.eps);
    if (lane == 0) {
      p.mean[row] = mu;
      p.rstd[row] = r;
    }
    cuda_storage_t<DT> *o = p.out + row * p.n;
#pragma unroll
    for (int i = 0; i < VPT; i++) {
      int64_t j = lane + 32 * i;
      if (j < p.n) cuda_store<DT>(o, j, (v[i] - mu) * r * cuda_param<DT>(p.w, j, 1) + cuda_param<DT>(p.b, j, 0));
    }
  }
}

template <int DT>
static __global__ void __launch_bounds__(ROW_BLOCK) layer_norm_block_kernel(row_args<DT> p) {
  using A = cuda_acc_t<DT>;
  __shared__ A scratch[32];
  for (int64_t row = blockIdx.x; row < p.m; row += gridDim.x) {
    const cuda_storage_t<DT> *xr = p.x + row * p.n;
    A s = 0, q = 0;
    for (int64_t j = threadIdx.x; j < p.n; j += blockDim.x) s += cuda_load<DT>(xr, j);
    A mu = p.n > 0 ? cuda_block_sum(s, scratch) / (A)p.n : cuda_block_sum(s, scratch);
    for (int64_t j = threadIdx.x; j < p.n; j += blockDim.x) {
      A d = cuda_load<DT>(xr, j) - mu;
      q += d * d;
    }
    A r = (A)1 / sqrt(cuda_block_sum(q, scratch) / (A)p.n + p.eps);
    if (threadIdx.x == 0) {
      p.mean[row] = mu;
      p.rstd[row] = r;
    }
    cuda_storage_t<DT> *o = p.out + row * p.n;
    for (int64_t j = threadIdx.x; j < p.n; j += blockDim.x)
      cuda_store<DT>(o, j, (cuda_load<DT>(xr, j) - mu) * r * cuda_param<DT>(p.w, j, 1) + cuda_param<DT>(p.b, j, 0));
  }
}

// With xhat = (x - mean) rstd and dy = g w: gx = rstd (dy - mean(dy) - xhat mean(dy xhat)).
template <int DT, int VPT>
static __global__ void __launch_bounds__(WARP_ROWS * 32) layer_norm_backward_warp_kernel(row_args<DT> p) {
  using A = cuda_acc_t<DT>;
  int lane = threadIdx.x & 31;
  int64_t step = (int64_t)gridDim.x * WARP_ROWS;
  for (int64_t row = (int64_t)blockIdx.x * WARP_ROWS + (threadIdx.x >> 5); row < p.m; row += step) {
    int64_t base = row * p.n;
    A mu = p.mean_in[row], r = p.rstd_in[row];
    A xh[VPT], dy[VPT], s1 = 0, s2 = 0;
#pragma unroll
    for (int i = 0; i < VPT; i++) {
      int64_t j = lane + 32 * i;
      xh[i] = dy[i] = 0;
      if (j < p.n) {
        xh[i] = (cuda_load<DT>(p.x, base + j) - mu) * r;
        dy[i] = cuda_load<DT>(p.g, base + j) * cuda_param<DT>(p.w, j, 1);
      }
      s1 += dy[i];
      s2 += dy[i] * xh[i];
    }
    A mean_dy = cuda_warp_sum(s1) / (A)p.n, mean_dy_xhat = cuda_warp_sum(s2) / (A)p.n;
#pragma unroll
    for (int i = 0; i < VPT; i++) {
      int64_t j = lane + 32 * i;
      if (j < p.n) cuda_store<DT>(p.gx, base + j, r * (dy[i] - mean_dy - xh[i] * mean_dy_xhat));
    }
  }
}

template <int DT>
static __global__ void __launch_bounds__(ROW_BLOCK) layer_norm_backward_block_kernel(row_args<DT> p) {
  using A = cuda_acc_t<DT>;
  __shared__ A scratch[32];
  for (int64_t row = blockIdx.x; row < p.m; row += gridDim.x) {
    int64_t base = row * p.n;
    A mu = p.mean_in[row], r = p.rstd_in[row], s1 = 0, s2 = 0;
    for (int64_t j = threadIdx.x; j < p.n; j += blockDim.x) {
      A xh = (cuda_load<DT>(p.x, base + j) - mu) * r, dy = cuda_load<DT>(p.g, base + j) * cuda_param<DT>(p.w, j, 1);
      s1 += dy;
      s2 += dy * xh;
    }
    A mean_dy = cuda_block_sum(s1, scratch) / (A)p.n, mean_dy_xhat = cuda_block_sum(s2, scratch) / (A)p.n;
    for (int64_t j = threadIdx.x; j < p.n; j += blockDim.x) {
      A xh = (cuda_load<DT>(p.x, base + j) - mu) * r, dy = cuda_load<DT>(p.g, base + j) * cuda_param<DT>(p.w, j, 1);
      cuda_store<DT>(p.gx, base + j, r * (dy - mean_dy - xh * mean_dy_xhat));
    }
  }
}

// Launches the warp kernel with the smallest register row that holds n, or the block kernel.
template <int DT, template <int, int> class Warp, typename Block>
static void launch_rows(const row_args<DT> &p, cudaStream_t stream, Block block) {
  unsigned warp_grid = cuda_grid_for(p.m, WARP_ROWS), threads = WARP_ROWS * 32;
  if (p.n <= 32) Warp<DT, 1>::launch(warp_grid, threads, stream, p);
  else if (p.n <= 64) Warp<DT, 2>::launch(warp_grid, threads, stream, p);
  else if (p.n <= 128) Warp<DT, 4>::launch(warp_grid, threads, stream, p);
  else if (p.n <= 256) Warp<DT, 8>::launch(warp_grid, threads, stream, p);
  else if (p.n <= 512) Warp<DT, 16>::launch(warp_grid, threads, stream, p);
  else if (p.n <= WARP_ROW_LIMIT) Warp<DT, 32>::launch(warp_grid, threads, stream, p);
  else block(cuda_grid_for(p.m, 1), ROW_BLOCK, stream, p);
}

namespace {
template <int DT, int VPT> struct forward_warp {
  static void launch(unsigned grid, unsigned threads, cudaStream_t s, const row_args<DT> &p) {
    layer_norm_warp_kernel<DT, VPT><<<grid, threads, 0, s>>>(p);
  }
};
template <int DT, int VPT> struct backward_warp {
  static void launch(unsigned grid, unsigned threads, cudaStream_t s, const row_args<DT> &p) {
    layer_norm_backward_warp_kernel<DT, VPT><<<grid, threads, 0, s>>>(p);
  }
};

// gw[j] = sum over rows of g xhat, gb[j] = sum over rows of g.
template <int DT> struct layer_norm_param_terms {
  row_args<DT> p;
  __device__ void operator()(int64_t r, int64_t j, cuda_acc_t<DT> (&t)[2]) const {
    cuda_acc_t<DT> gv = cuda_load<DT>(p.g, r * p.n + j);
    t[0] = gv * ((cuda_load<DT>(p.x, r * p.n + j) - p.mean_in[r]) * p.rstd_in[r]);
    t[1] = gv;
  }
};
template <int DT> struct store_param_grads {
  cuda_storage_t<DT> *gw, *gb;
  __device__ void operator()(int64_t j, const cuda_acc_t<DT> (&s)[2]) const {
    if (gw) cuda_store<DT>(gw, j, s[0]);
    if (gb) cuda_store<DT>(gb, j, s[1]);
  }
};
} // namespace

template <int DT> static row_args<DT> layer_norm_args(const ts_tensor *x, const ts_tensor *w) {
  using T = cuda_storage_t<DT>;
  row_args<DT> p = {};
  p.m = x->shape[0];
  p.n = x->shape[1];
  p.x = (const T *)ts_elem_ptr(x);
  p.w = cuda_data_or_null<DT>(w);
  return p;
}

extern "C" int cuda_layer_norm(ts_tensor *out, ts_tensor *mean, ts_tensor *rstd, const ts_tensor *x, const ts_tensor *w,
                               const ts_tensor *b, double eps) {
  const char *op = "layer_norm";
  const ts_tensor *all[4] = {x, out, w, b};
  if (check_norm_dtypes(op, all, 4, mean, rstd)) return ts_last_status();
  cudaStream_t stream;
  if (x->shape[0] == 0) return TS_OK;
  if (cuda_stream_for(op, x->device.index, &stream)) return ts_last_status();
  return cuda_dispatch_floating(op, x->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    using T = cuda_storage_t<DT>;
    row_args<DT> p = layer_norm_args<DT>(x, w);
    p.b = cuda_data_or_null<DT>(b);
    p.out = cuda_data<DT>(out);
    p.mean = cuda_stats<DT>(mean);
    p.rstd = cuda_stats<DT>(rstd);
    p.eps = (cuda_acc_t<DT>)eps;
    launch_rows<DT, forward_warp>(p, stream, [](unsigned grid, unsigned threads, cudaStream_t s, const row_args<DT> &a) {
      layer_norm_block_kernel<DT><<<grid, threads, 0, s>>>(a);
    });
    return cuda_launched(op);
  });
}

extern "C" int cuda_layer_norm_backward(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g,
                                        const ts_tensor *x, const ts_tensor *w, const ts_tensor *mean,
                                        const ts_tensor *rstd) {
  const char *op = "layer_norm backward";
  const ts_tensor *all[6] = {x, g, w, gx, gw, gb};
  if (check_norm_dtypes(op, all, 6, mean, rstd)) return ts_last_status();
  cudaStream_t stream;
  if (cuda_stream_for(op, x->device.index, &stream)) return ts_last_status();
  return cuda_dispatch_floating(op, x->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    using T = cuda_storage_t<DT>;
    row_args<DT> p = layer_norm_args<DT>(x, w);
    p.g = cuda_data<DT>(g);
    p.mean_in = cuda_stats<DT>(mean);
    p.rstd_in = cuda_stats<DT>(rstd);
    if (gx && p.m > 0 && p.n > 0) {
      p.gx = cuda_data<DT>(gx);
      launch_rows<DT, backward_warp>(p, stream, [](unsigned grid, unsigned threads, cudaStream_t s, const row_args<DT> &a) {
        layer_norm_backward_block_kernel<DT><<<grid, threads, 0, s>>>(a);
      });
      if (cuda_launched(op)) return ts_last_status();
    }
    if (!gw && !gb) return TS_OK;
    store_param_grads<DT> store = {gw ? cuda_data<DT>(gw) : (T *)NULL, gb ? cuda_data<DT>(gb) : (T *)NULL};
    return cuda_column_sums<cuda_acc_t<DT>, 2>(op, x->device.index, stream, p.m, p.n, layer_norm_param_terms<DT>{p},
                                               store);
  });
}

// ---- batch norm -------------------------------------------------------------------------------------
// x [N, C, S]. Per-channel reductions run over (chunk of samples, channel) blocks whose results are
// combined per channel in sample order.
template <int DT> struct channel_args {
  using T = cuda_storage_t<DT>;
  int64_t n, c, s, chunk_n; // chunk_n samples per chunk
  const T *x, *g, *w, *b, *mean, *rstd;
  T *out, *gx;
  int training;
};

// Chunks of whole samples holding about 4096 values each, at most 1024 of them.
static int64_t samples_per_chunk(int64_t n, int64_t s) {
  int64_t per = s > 0 ? (4096 + s - 1) / s : n;
  if (per < 1) per = 1;
  if ((n + per - 1) / per > 1024) per = (n + 1023) / 1024;
  return per;
}

static int64_t chunks_of(int64_t n, int64_t per) { return n > 0 ? (n + per - 1) / per : 1; }

// Mean and squared deviations of channel blockIdx.x over chunk blockIdx.y: partial[(chunk C + c) 3
// + {0, 1, 2}] = count, mean, m2.
template <int DT>
static __global__ void __launch_bounds__(ROW_BLOCK) batch_moments_kernel(channel_args<DT> p, cuda_acc_t<DT> *partial) {
  using A = cuda_acc_t<DT>;
  __shared__ A scratch[32];
  int64_t c = blockIdx.x, chunk = blockIdx.y, n0 = chunk * p.chunk_n;
  int64_t n1 = n0 + p.chunk_n < p.n ? n0 + p.chunk_n : p.n, len = n1 > n0 ? (n1 - n0) * p.s : 0;
  A s = 0, q = 0;
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) s += cuda_load<DT>(p.x, ((n0 + i / p.s) * p.c + c) * p.s + i % p.s);
  s = cuda_block_sum(s, scratch);
  A mu = len > 0 ? s / (A)len : (A)0;
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
    A d = cuda_load<DT>(p.x, ((n0 + i / p.s) * p.c + c) * p.s + i % p.s) - mu;
    q += d * d;
  }
  q = cuda_block_sum(q, scratch);
  if (threadIdx.x == 0) {
    A *out = partial + (chunk * p.c + c) * 3;
    out[0] = (A)len;
    out[1] = mu;
    out[2] = q;
  }
}

// The chunks of each channel merged in order (Chan, Golub and LeVeque), as the CPU merges samples.
template <int DT>
static __global__ void batch_merge_kernel(int64_t channels, int64_t chunks, const cuda_acc_t<DT> *partial,
                                          cuda_storage_t<DT> *mean, cuda_storage_t<DT> *var) {
  using A = cuda_acc_t<DT>;
  CUDA_GRID_STRIDE(c, channels) {
    A mu = 0, m2 = 0, count = 0;
    for (int64_t k = 0; k < chunks; k++) {
      const A *pk = partial + (k * channels + c) * 3;
      if (pk[0] == 0) continue;
      A total = count + pk[0], delta = pk[1] - mu;
      mu += delta * (pk[0] / total);
      m2 += pk[2] + delta * delta * (count * pk[0] / total);
      count = total;
    }
    cuda_store<DT>(mean, c, count > 0 ? mu : (A)NAN);
    cuda_store<DT>(var, c, count > 0 ? m2 / count : (A)NAN);
  }
}

template <int DT> static channel_args<DT> channel_layout(const ts_tensor *x) {
  channel_args<DT> p = {};
  p.n = x->shape[0];
  p.c = x->shape[1];
  p.s = x->shape[2];
  p.chunk_n = samples_per_chunk(p.n, p.s);
  p.x = cuda_data<DT>(x);
  return p;
}

extern "C" int cuda_batch_norm_stats(ts_tensor *mean, ts_tensor *var, const ts_tensor *x) {
  const char *op = "batch_norm";
  const ts_tensor *all[3] = {x, mean, var};
  if (cuda_check_floating_alike(op, all, 3)) return ts_last_status();
  cudaStream_t stream;
  if (x->shape[1] == 0) return TS_OK;
  if (cuda_stream_for(op, x->device.index, &stream)) return ts_last_status();
  return cuda_dispatch_floating(op, x->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    using A = cuda_acc_t<DT>;
    channel_args<DT> p = channel_layout<DT>(x);
    int64_t chunks = chunks_of(p.n, p.chunk_n);
    cuda_scratch partial;
    if (partial.allocate(x->device.index, (size_t)(chunks * p.c * 3) * sizeof(A))) return ts_last_status();
    batch_moments_kernel<DT><<<dim3((unsigned)p.c, (unsigned)chunks), ROW_BLOCK, 0, stream>>>(p, partial.as<A>());
    if (cuda_launched(op)) return ts_last_status();
    batch_merge_kernel<DT><<<cuda_blocks(p.c), CUDA_THREADS, 0, stream>>>(p.c, chunks, partial.as<A>(),
                                                                         cuda_data<DT>(mean), cuda_data<DT>(var));
    return cuda_launched(op);
  });
}

// out = (x - mean) rstd w + b, channel c = (i / S) mod C; I: the index type (32 bits when it fits).
template <int DT, typename I>
static __global__ void batch_apply_kernel(I total, channel_args<DT> p) {
  using A = cuda_acc_t<DT>;
  // the loop counts in 64 bits even when I is 32: i + step would wrap past 2^32 (total near
  // UINT32_MAX) and never end; i itself fits I, which keeps the divisions cheap
  CUDA_GRID_STRIDE(e, (int64_t)total) {
    I i = (I)e;
    I c = i / (I)p.s % (I)p.c;
    A scale = cuda_load<DT>(p.rstd, c) * cuda_param<DT>(p.w, c, 1);
    cuda_store<DT>(p.out, i, (cuda_load<DT>(p.x, i) - cuda_load<DT>(p.mean, c)) * scale + cuda_param<DT>(p.b, c, 0));
  }
}

extern "C" int cuda_batch_norm_apply(ts_tensor *out, const ts_tensor *x, const ts_tensor *mean, const ts_tensor *rstd,
                                     const ts_tensor *w, const ts_tensor *b) {
  const char *op = "batch_norm";
  const ts_tensor *all[6] = {x, out, mean, rstd, w, b};
  if (cuda_check_floating_alike(op, all, 6)) return ts_last_status();
  int64_t total = ts_numel(x);
  cudaStream_t stream;
  if (total == 0) return TS_OK;
  if (cuda_stream_for(op, x->device.index, &stream)) return ts_last_status();
  return cuda_dispatch_floating(op, x->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    using T = cuda_storage_t<DT>;
    channel_args<DT> p = channel_layout<DT>(x);
    p.mean = cuda_data<DT>(mean);
    p.rstd = cuda_data<DT>(rstd);
    p.w = cuda_data_or_null<DT>(w);
    p.b = cuda_data_or_null<DT>(b);
    p.out = cuda_data<DT>(out);
    if (total <= (int64_t)UINT32_MAX)
      batch_apply_kernel<DT, uint32_t><<<cuda_blocks(total), CUDA_THREADS, 0, stream>>>((uint32_t)total, p);
    else
      batch_apply_kernel<DT, int64_t><<<cuda_blocks(total), CUDA_THREADS, 0, stream>>>(total, p);
    return cuda_launched(op);
  });
}

// Per (chunk, channel): the sums of g and g xhat; partial[(chunk C + c) 2 + {0, 1}].
template <int DT>
static __global__ void __launch_bounds__(ROW_BLOCK) batch_grad_sums_kernel(channel_args<DT> p, cuda_acc_t<DT> *partial) {
  using A = cuda_acc_t<DT>;
  __shared__ A scratch[32];
  int64_t c = blockIdx.x, chunk = blockIdx.y, n0 = chunk * p.chunk_n;
  int64_t n1 = n0 + p.chunk_n < p.n ? n0 + p.chunk_n : p.n, len = n1 > n0 ? (n1 - n0) * p.s : 0;
  A mu = cuda_load<DT>(p.mean, c), r = cuda_load<DT>(p.rstd, c), sg = 0, sgx = 0;
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
    int64_t at = ((n0 + i / p.s) * p.c + c) * p.s + i % p.s;
    A gv = cuda_load<DT>(p.g, at);
    sg += gv;
    sgx += gv * (cuda_load<DT>(p.x, at) - mu) * r;
  }
  sg = cuda_block_sum(sg, scratch);
  sgx = cuda_block_sum(sgx, scratch);
  if (threadIdx.x == 0) {
    partial[(chunk * p.c + c) * 2] = sg;
    partial[(chunk * p.c + c) * 2 + 1] = sgx;
  }
}

// totals[2c + {0, 1}] = the chunk sums in order; gw = sum(g xhat), gb = sum(g) where wanted.
template <int DT>
static __global__ void batch_grad_totals_kernel(int64_t channels, int64_t chunks, const cuda_acc_t<DT> *partial,
                                                cuda_acc_t<DT> *totals, cuda_storage_t<DT> *gw, cuda_storage_t<DT> *gb) {
  using A = cuda_acc_t<DT>;
  CUDA_GRID_STRIDE(c, channels) {
    A sg = 0, sgx = 0;
    for (int64_t k = 0; k < chunks; k++) {
      sg += partial[(k * channels + c) * 2];
      sgx += partial[(k * channels + c) * 2 + 1];
    }
    totals[2 * c] = sg;
    totals[2 * c + 1] = sgx;
    if (gw) cuda_store<DT>(gw, c, sgx);
    if (gb) cuda_store<DT>(gb, c, sg);
  }
}

// training: gx = w rstd (g - sum(g)/count - xhat sum(g xhat)/count); evaluation: gx = g w rstd.
template <int DT, typename I>
static __global__ void batch_grad_input_kernel(I total, channel_args<DT> p, const cuda_acc_t<DT> *totals) {
  using A = cuda_acc_t<DT>;
  A count = (A)(p.n * p.s);
  // 64-bit loop counter: see batch_apply_kernel
  CUDA_GRID_STRIDE(e, (int64_t)total) {
    I i = (I)e;
    I c = i / (I)p.s % (I)p.c;
    A mu = cuda_load<DT>(p.mean, c), r = cuda_load<DT>(p.rstd, c), scale = r * cuda_param<DT>(p.w, c, 1);
    A mean_g = p.training ? totals[2 * c] / count : (A)0, mean_gx = p.training ? totals[2 * c + 1] / count : (A)0;
    A xhat = (cuda_load<DT>(p.x, i) - mu) * r;
    cuda_store<DT>(p.gx, i, scale * (cuda_load<DT>(p.g, i) - mean_g - xhat * mean_gx));
  }
}

extern "C" int cuda_batch_norm_backward(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g,
                                        const ts_tensor *x, const ts_tensor *w, const ts_tensor *mean,
                                        const ts_tensor *rstd, int training) {
  const char *op = "batch_norm backward";
  const ts_tensor *all[8] = {x, g, w, mean, rstd, gx, gw, gb};
  if (cuda_check_floating_alike(op, all, 8)) return ts_last_status();
  cudaStream_t stream;
  if (x->shape[1] == 0) return TS_OK;
  if (cuda_stream_for(op, x->device.index, &stream)) return ts_last_status();
  return cuda_dispatch_floating(op, x->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    using A = cuda_acc_t<DT>;
    using T = cuda_storage_t<DT>;
    channel_args<DT> p = channel_layout<DT>(x);
    p.g = cuda_data<DT>(g);
    p.w = cuda_data_or_null<DT>(w);
    p.mean = cuda_data<DT>(mean);
    p.rstd = cuda_data<DT>(rstd);
    p.training = training;
    int64_t chunks = chunks_of(p.n, p.chunk_n), total = ts_numel(x);
    bool need_sums = gw || gb || (gx && training);
    cuda_scratch partial, totals;
    if (need_sums) {
      if (partial.allocate(x->device.index, (size_t)(chunks * p.c * 2) * sizeof(A)) ||
          totals.allocate(x->device.index, (size_t)(p.c * 2) * sizeof(A)))
        return ts_last_status();
      batch_grad_sums_kernel<DT><<<dim3((unsigned)p.c, (unsigned)chunks), ROW_BLOCK, 0, stream>>>(p, partial.as<A>());
      if (cuda_launched(op)) return ts_last_status();
      batch_grad_totals_kernel<DT><<<cuda_blocks(p.c), CUDA_THREADS, 0, stream>>>(
          p.c, chunks, partial.as<A>(), totals.as<A>(), gw ? cuda_data<DT>(gw) : (T *)NULL,
          gb ? cuda_data<DT>(gb) : (T *)NULL);
      if (cuda_launched(op)) return ts_last_status();
    }
    if (!gx || total == 0) return TS_OK;
    p.gx = cuda_data<DT>(gx);
    if (total <= (int64_t)UINT32_MAX)
      batch_grad_input_kernel<DT, uint32_t><<<cuda_blocks(total), CUDA_THREADS, 0, stream>>>((uint32_t)total, p, totals.as<A>());
    else
      batch_grad_input_kernel<DT, int64_t><<<cuda_blocks(total), CUDA_THREADS, 0, stream>>>(total, p, totals.as<A>());
    return cuda_launched(op);
  });
}

// ---- group norm -------------------------------------------------------------------------------------
// x [N, C, S] with G groups: row (n, grp) is the contiguous (C/G) S values of C/G channels.
template <int DT> struct group_args {
  using T = cuda_storage_t<DT>;
  using A = cuda_acc_t<DT>;
  int64_t n, c, s, groups, per_group, len; // len = per_group * s, the values of a row
  const T *x, *w, *b, *g;
  const A *mean_in, *rstd_in;
  T *out, *gx;
  A *mean, *rstd;
  A eps;
};

template <int DT>
static __global__ void __launch_bounds__(ROW_BLOCK) group_norm_kernel(group_args<DT> p) {
  using A = cuda_acc_t<DT>;
  __shared__ A scratch[32];
  int64_t rows = p.n * p.groups;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    int64_t base = row * p.len, c0 = row % p.groups * p.per_group;
    A s = 0, q = 0;
    for (int64_t j = threadIdx.x; j < p.len; j += blockDim.x) s += cuda_load<DT>(p.x, base + j);
    A mu = p.len > 0 ? cuda_block_sum(s, scratch) / (A)p.len : cuda_block_sum(s, scratch);
    for (int64_t j = threadIdx.x; j < p.len; j += blockDim.x) {
      A d = cuda_load<DT>(p.x, base + j) - mu;
      q += d * d;
    }
    A r = (A)1 / sqrt(cuda_block_sum(q, scratch) / (A)p.len + p.eps);
    if (threadIdx.x == 0) {
      p.mean[row] = mu;
      p.rstd[row] = r;
    }
    for (int64_t j = threadIdx.x; j < p.len; j += blockDim.x) {
      int64_t c = c0 + j / p.s;
      A scale = r * cuda_param<DT>(p.w, c, 1);
      cuda_store<DT>(p.out, base + j, (cuda_load<DT>(p.x, base + j) - mu) * scale + cuda_param<DT>(p.b, c, 0));
    }
  }
}

template <int DT> static group_args<DT> group_layout(const ts_tensor *x, const ts_tensor *mean, const ts_tensor *w) {
  using T = cuda_storage_t<DT>;
  group_args<DT> p = {};
  p.n = x->shape[0];
  p.c = x->shape[1];
  p.s = x->shape[2];
  p.groups = mean->shape[1];
  p.per_group = p.c / p.groups;
  p.len = p.per_group * p.s;
  p.x = cuda_data<DT>(x);
  p.w = cuda_data_or_null<DT>(w);
  return p;
}

extern "C" int cuda_group_norm(ts_tensor *out, ts_tensor *mean, ts_tensor *rstd, const ts_tensor *x, const ts_tensor *w,
                               const ts_tensor *b, double eps) {
  const char *op = "group_norm";
  const ts_tensor *all[4] = {x, out, w, b};
  if (check_norm_dtypes(op, all, 4, mean, rstd)) return ts_last_status();
  cudaStream_t stream;
  if (ts_numel(mean) == 0) return TS_OK;
  if (cuda_stream_for(op, x->device.index, &stream)) return ts_last_status();
  return cuda_dispatch_floating(op, x->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    using T = cuda_storage_t<DT>;
    group_args<DT> p = group_layout<DT>(x, mean, w);
    p.b = cuda_data_or_null<DT>(b);
    p.out = cuda_data<DT>(out);
    p.mean = cuda_stats<DT>(mean);
    p.rstd = cuda_stats<DT>(rstd);
    p.eps = (cuda_acc_t<DT>)eps;
    group_norm_kernel<DT><<<cuda_grid_for(p.n * p.groups, 1), ROW_BLOCK, 0, stream>>>(p);
    return cuda_launched(op);
  });
}

// Per plane (n, c): sg = sum of g, sgx = sum of g xhat over its S values, with its row's statistics.
template <int DT>
static __global__ void __launch_bounds__(CUDA_THREADS) group_plane_sums_kernel(group_args<DT> p, cuda_acc_t<DT> *sums) {
  using A = cuda_acc_t<DT>;
  __shared__ A scratch[32];
  int64_t planes = p.n * p.c;
  for (int64_t plane = blockIdx.x; plane < planes; plane += gridDim.x) {
    int64_t row = plane / p.c * p.groups + plane % p.c / p.per_group, base = plane * p.s;
    A mu = p.mean_in[row], r = p.rstd_in[row], sg = 0, sgx = 0;
    for (int64_t i = threadIdx.x; i < p.s; i += blockDim.x) {
      A gv = cuda_load<DT>(p.g, base + i);
      sg += gv;
      sgx += gv * ((cuda_load<DT>(p.x, base + i) - mu) * r);
    }
    sg = cuda_block_sum(sg, scratch);
    sgx = cuda_block_sum(sgx, scratch);
    if (threadIdx.x == 0) {
      sums[2 * plane] = sg;
      sums[2 * plane + 1] = sgx;
    }
  }
}

// Per row (n, grp): coef = (mean(dy), mean(dy xhat)) with dy = g w[c], from the plane sums in
// channel order (as the CPU adds them).
template <int DT>
static __global__ void group_row_coef_kernel(group_args<DT> p, const cuda_acc_t<DT> *sums, cuda_acc_t<DT> *coef) {
  using A = cuda_acc_t<DT>;
  int64_t rows = p.n * p.groups;
  CUDA_GRID_STRIDE(row, rows) {
    int64_t c0 = row % p.groups * p.per_group, plane0 = row / p.groups * p.c + c0;
    A sum_dy = 0, sum_dy_xhat = 0;
    for (int64_t k = 0; k < p.per_group; k++) {
      A wk = cuda_param<DT>(p.w, c0 + k, 1);
      sum_dy += wk * sums[2 * (plane0 + k)];
      sum_dy_xhat += wk * sums[2 * (plane0 + k) + 1];
    }
    coef[2 * row] = sum_dy / (A)p.len;
    coef[2 * row + 1] = sum_dy_xhat / (A)p.len;
  }
}

template <int DT, typename I>
static __global__ void group_grad_input_kernel(I total, group_args<DT> p, const cuda_acc_t<DT> *coef) {
  using A = cuda_acc_t<DT>;
  // 64-bit loop counter: see batch_apply_kernel
  CUDA_GRID_STRIDE(e, (int64_t)total) {
    I i = (I)e;
    I plane = i / (I)p.s, c = plane % (I)p.c, row = plane / (I)p.c * (I)p.groups + c / (I)p.per_group;
    A mu = p.mean_in[row], r = p.rstd_in[row];
    A xhat = (cuda_load<DT>(p.x, i) - mu) * r;
    A dy = cuda_load<DT>(p.g, i) * cuda_param<DT>(p.w, c, 1);
    cuda_store<DT>(p.gx, i, r * (dy - coef[2 * row] - xhat * coef[2 * row + 1]));
  }
}

// gw[c] = sum over samples of sgx[n, c], gb[c] of sg[n, c], in sample order.
template <int DT>
static __global__ void group_param_grads_kernel(group_args<DT> p, const cuda_acc_t<DT> *sums, cuda_storage_t<DT> *gw,
                                                cuda_storage_t<DT> *gb) {
  using A = cuda_acc_t<DT>;
  CUDA_GRID_STRIDE(c, p.c) {
    A sg = 0, sgx = 0;
    for (int64_t n = 0; n < p.n; n++) {
      sg += sums[2 * (n * p.c + c)];
      sgx += sums[2 * (n * p.c + c) + 1];
    }
    if (gw) cuda_store<DT>(gw, c, sgx);
    if (gb) cuda_store<DT>(gb, c, sg);
  }
}

extern "C" int cuda_group_norm_backward(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g,
                                        const ts_tensor *x, const ts_tensor *w, const ts_tensor *mean,
                                        const ts_tensor *rstd) {
  const char *op = "group_norm backward";
  const ts_tensor *all[6] = {x, g, w, gx, gw, gb};
  if (check_norm_dtypes(op, all, 6, mean, rstd)) return ts_last_status();
  cudaStream_t stream;
  if (x->shape[1] == 0) return TS_OK;
  if (cuda_stream_for(op, x->device.index, &stream)) return ts_last_status();
  return cuda_dispatch_floating(op, x->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    using A = cuda_acc_t<DT>;
    using T = cuda_storage_t<DT>;
    group_args<DT> p = group_layout<DT>(x, mean, w);
    p.g = cuda_data<DT>(g);
    p.mean_in = cuda_stats<DT>(mean);
    p.rstd_in = cuda_stats<DT>(rstd);
    int64_t planes = p.n * p.c, rows = p.n * p.groups, total = ts_numel(x);
    cuda_scratch sums, coef;
    if (sums.allocate(x->device.index, (size_t)(2 * planes) * sizeof(A)) ||
        coef.allocate(x->device.index, (size_t)(2 * rows) * sizeof(A)))
      return ts_last_status();
    if (planes > 0) {
      group_plane_sums_kernel<DT><<<cuda_grid_for(planes, 1), CUDA_THREADS, 0, stream>>>(p, sums.as<A>());
      if (cuda_launched(op)) return ts_last_status();
    }
    if (gx && total > 0) {
      p.gx = cuda_data<DT>(gx);
      group_row_coef_kernel<DT><<<cuda_blocks(rows), CUDA_THREADS, 0, stream>>>(p, sums.as<A>(), coef.as<A>());
      if (cuda_launched(op)) return ts_last_status();
      if (total <= (int64_t)UINT32_MAX)
        group_grad_input_kernel<DT, uint32_t><<<cuda_blocks(total), CUDA_THREADS, 0, stream>>>((uint32_t)total, p, coef.as<A>());
      else
        group_grad_input_kernel<DT, int64_t><<<cuda_blocks(total), CUDA_THREADS, 0, stream>>>(total, p, coef.as<A>());
      if (cuda_launched(op)) return ts_last_status();
    }
    if (!gw && !gb) return TS_OK;
    group_param_grads_kernel<DT><<<cuda_blocks(p.c), CUDA_THREADS, 0, stream>>>(
        p, sums.as<A>(), gw ? cuda_data<DT>(gw) : (T *)NULL, gb ? cuda_data<DT>(gb) : (T *)NULL);
    return cuda_launched(op);
  });
}

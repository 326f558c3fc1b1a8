// position_bias.cu — Swin's continuous relative position bias on CUDA devices, forward and backward,
// with the semantics of kernels/cpu/position_bias.c:
//   out[w, h, i, j] = b2[h] + Σ_p w2[h, p] relu(b1[p] + Σ_c w1[p, c] f(pos[w, c, j] - pos[w, c, i]))
// with f(d) = sign(d) log(1 + |d|) (NaN kept), f'(d) = 1 / (1 + |d|) and 0 at d = 0.
//
// One thread per (w, i, j) element; the weights sit in shared memory (every thread reads the same
// entry at once: broadcasts), and each thread's features and hidden layer in its own column of a
// shared [values][threads] array (consecutive threads, consecutive words: no bank conflicts). The
// [W, P, N, N] hidden layer is never stored; the backward recomputes it.
//
// Weight gradients are sums over all W·N·N elements, done without atomics: a block takes tiles of
// blockDim elements (tile b, b + grid, ... for block b); each thread stages its element's features,
// hidden layer, hidden gradient and output gradient in a shared row, then the block's threads
// switch roles and each adds, for the weight-gradient entries it owns, the tile's terms (in float32
// for float32/float16/bfloat16, as the CPU's lanes) into a float64 accumulator. The blocks'
// float64 sums are combined in block order: the same bits on every run. The position gradient
// goes through a [W, C, N, N] scratch of per-element terms, summed per token in a fixed order.
#include "nn.cuh"

#include <math.h>

namespace {
constexpr const char *OP = "relative_position_bias";
constexpr const char *OP_BACKWARD = "relative_position_bias backward";
constexpr int THREADS = 128;            // forward threads per block
constexpr int64_t MAX_GRAD_BLOCKS = 1024; // blocks of the weight-gradient pass (fixed: deterministic sums)

__device__ __forceinline__ float feature(float d) { return d != d ? d : copysignf(log1pf(fabsf(d)), d); }
__device__ __forceinline__ double feature(double d) { return d != d ? d : copysign(log1p(fabs(d)), d); }
__device__ __forceinline__ float feature_grad(float d) { return d == 0.0f ? 0.0f : 1.0f / (1.0f + fabsf(d)); }
__device__ __forceinline__ double feature_grad(double d) { return d == 0.0 ? 0.0 : 1.0 / (1.0 + fabs(d)); }

template <int DT> struct pb_args {
  using T = cuda_storage_t<DT>;
  using A = cuda_acc_t<DT>;
  int64_t windows, channels, tokens, hidden, heads; // W, C, N, P, H
  int64_t total;                                    // W N N elements
  const T *pos, *w1, *b1, *w2, *b2;                 // b1, b2 may be NULL
  T *out;
  // backward
  const T *g;
  A *gd;            // [W, C, N, N] per-element position-difference gradients, NULL when gpos is not wanted
  bool weights;     // whether the weight gradients are wanted
  int64_t row;      // staged values per element (odd: conflict-free rows)
  double *partial;  // [blocks][K] the blocks' weight-gradient sums
};

// K: the values of w1 [P C], b1 [P], w2 [H P] and b2 [H], one after the other, in shared memory as
// in the weight-gradient sums.
template <int DT> __host__ __device__ int64_t weight_count(const pb_args<DT> &p) {
  return p.hidden * p.channels + p.hidden + p.heads * p.hidden + p.heads;
}

// Byte offset of the float64 accumulators in the backward's shared memory: after the weights and
// the rows in the accumulation type, rounded up to 8 bytes.
template <int DT> __host__ __device__ size_t accumulator_offset(const pb_args<DT> &p, int64_t threads) {
  size_t values = (size_t)(weight_count(p) + p.row * threads) * sizeof(cuda_acc_t<DT>);
  return (values + 7) / 8 * 8;
}

// The weights as the accumulation type in shared memory: w1 [P C], b1 [P], w2 [H P], b2 [H] (absent
// biases as zeros). Ends with a barrier.
template <int DT> struct shared_weights {
  cuda_acc_t<DT> *w1, *b1, *w2, *b2;
};

template <int DT> __device__ shared_weights<DT> load_weights(const pb_args<DT> &p, cuda_acc_t<DT> *s) {
  using A = cuda_acc_t<DT>;
  int64_t C = p.channels, P = p.hidden, H = p.heads;
  shared_weights<DT> w = {s, s + P * C, s + P * C + P, s + P * C + P + H * P};
  for (int64_t k = threadIdx.x; k < P * C; k += blockDim.x) w.w1[k] = cuda_load<DT>(p.w1, k);
  for (int64_t k = threadIdx.x; k < P; k += blockDim.x) w.b1[k] = cuda_param<DT>(p.b1, k, (A)0);
  for (int64_t k = threadIdx.x; k < H * P; k += blockDim.x) w.w2[k] = cuda_load<DT>(p.w2, k);
  for (int64_t k = threadIdx.x; k < H; k += blockDim.x) w.b2[k] = cuda_param<DT>(p.b2, k, (A)0);
  __syncthreads();
  return w;
}

// Element e = (w, i, j) of the [W, N, N] grid.
struct element {
  int64_t w, i, j;
};
__device__ __forceinline__ element element_of(int64_t e, int64_t n) { return {e / (n * n), e / n % n, e % n}; }

// d = pos[w, c, j] - pos[w, c, i]
template <int DT> __device__ __forceinline__ cuda_acc_t<DT> difference(const pb_args<DT> &p, element el, int64_t c) {
  const cuda_storage_t<DT> *row = p.pos + (el.w * p.channels + c) * p.tokens;
  return cuda_load<DT>(row, el.j) - cuda_load<DT>(row, el.i);
}

// ---- forward ------------------------------------------------------------------------------------------
// Shared: the weights, then f [C][threads] and the hidden layer [P][threads].
template <int DT> __global__ void __launch_bounds__(THREADS) position_bias_forward_kernel(pb_args<DT> p) {
  using A = cuda_acc_t<DT>;
  extern __shared__ __align__(16) unsigned char smem[];
  A *s = (A *)smem;
  shared_weights<DT> wt = load_weights<DT>(p, s);
  int64_t C = p.channels, P = p.hidden, H = p.heads, N = p.tokens, bd = blockDim.x, t = threadIdx.x;
  A *f = s + weight_count(p), *hid = f + C * bd;
  for (int64_t e = (int64_t)blockIdx.x * bd + t; e < p.total; e += (int64_t)gridDim.x * bd) {
    element el = element_of(e, N);
    for (int64_t c = 0; c < C; c++) f[c * bd + t] = feature(difference<DT>(p, el, c));
    for (int64_t q = 0; q < P; q++) {
      A a = wt.b1[q];
      for (int64_t c = 0; c < C; c++) a += wt.w1[q * C + c] * f[c * bd + t];
      hid[q * bd + t] = a > (A)0 ? a : (A)0;
    }
    cuda_storage_t<DT> *o = p.out + (el.w * H * N + el.i) * N + el.j;
    for (int64_t h = 0; h < H; h++) {
      A acc = wt.b2[h];
      for (int64_t q = 0; q < P; q++) acc += wt.w2[h * P + q] * hid[q * bd + t];
      cuda_store<DT>(o, h * N * N, acc);
    }
  }
}

// ---- backward -----------------------------------------------------------------------------------------
// Shared: the weights, the staged rows [threads][row] (f [C], hidden [P], dh [P], G [H], padding) and
// the float64 accumulators [K].
template <int DT> __global__ void position_bias_backward_kernel(pb_args<DT> p) {
  using A = cuda_acc_t<DT>;
  extern __shared__ __align__(16) unsigned char smem[];
  A *s = (A *)smem;
  shared_weights<DT> wt = load_weights<DT>(p, s);
  int64_t C = p.channels, P = p.hidden, H = p.heads, N = p.tokens, bd = blockDim.x, t = threadIdx.x;
  int64_t K = weight_count(p);
  A *rows = s + K;
  double *acc = (double *)(smem + accumulator_offset(p, bd));
  A *mine = rows + t * p.row, *f = mine, *hid = f + C, *dh = hid + P, *G = dh + P;
  for (int64_t k = t; k < K; k += bd) acc[k] = 0;
  int64_t tiles = (p.total + bd - 1) / bd;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    int64_t e = tile * bd + t;
    if (e < p.total) {
      element el = element_of(e, N);
      const cuda_storage_t<DT> *g = p.g + (el.w * H * N + el.i) * N + el.j;
      for (int64_t h = 0; h < H; h++) G[h] = cuda_load<DT>(g, h * N * N);
      for (int64_t c = 0; c < C; c++) f[c] = feature(difference<DT>(p, el, c));
      for (int64_t q = 0; q < P; q++) {
        A a = wt.b1[q], back = 0;
        for (int64_t c = 0; c < C; c++) a += wt.w1[q * C + c] * f[c];
        for (int64_t h = 0; h < H; h++) back += wt.w2[h * P + q] * G[h];
        hid[q] = a > (A)0 ? a : (A)0;
        dh[q] = a > (A)0 ? back : (A)0;
      }
      if (p.gd)
        for (int64_t c = 0; c < C; c++) {
          A df = 0;
          for (int64_t q = 0; q < P; q++) df += wt.w1[q * C + c] * dh[q];
          p.gd[(el.w * C + c) * N * N + el.i * N + el.j] = df * feature_grad(difference<DT>(p, el, c));
        }
    } else { // past the end: a zero row adds nothing to the sums
      for (int64_t k = 0; k < p.row; k++) mine[k] = 0;
    }
    if (!p.weights) continue; // uniform across the block: no barrier is skipped by some threads only
    __syncthreads();          // the tile's rows are staged
    for (int64_t k = t; k < K; k += bd) {
      A sum = 0;
      int64_t x = k;
      if (x < P * C) { // gw1[q, c] = Σ dh[q] f[c]
        for (int64_t r = 0; r < bd; r++) sum += rows[r * p.row + C + P + x / C] * rows[r * p.row + x % C];
      } else if ((x -= P * C) < P) { // gb1[q] = Σ dh[q]
        for (int64_t r = 0; r < bd; r++) sum += rows[r * p.row + C + P + x];
      } else if ((x -= P) < H * P) { // gw2[h, q] = Σ G[h] hidden[q]
        for (int64_t r = 0; r < bd; r++) sum += rows[r * p.row + C + 2 * P + x / P] * rows[r * p.row + C + x % P];
      } else { // gb2[h] = Σ G[h]
        x -= H * P;
        for (int64_t r = 0; r < bd; r++) sum += rows[r * p.row + C + 2 * P + x];
      }
      acc[k] += (double)sum;
    }
    __syncthreads(); // the rows are read before the next tile overwrites them
  }
  if (p.weights)
    for (int64_t k = t; k < K; k += bd) p.partial[(int64_t)blockIdx.x * K + k] = acc[k];
}

// The blocks' sums in block order, stored into those of gw1, gb1, gw2, gb2 that are wanted.
template <int DT> struct weight_grads {
  cuda_storage_t<DT> *out[4];
  int64_t count[4];
};

template <int DT>
__global__ void position_bias_combine_kernel(int64_t K, int64_t blocks, const double *partial, weight_grads<DT> grads) {
  CUDA_GRID_STRIDE(k, K) {
    double s = 0;
    for (int64_t b = 0; b < blocks; b++) s += partial[b * K + k];
    int64_t x = k;
    for (int part = 0; part < 4; part++) {
      if (x < grads.count[part]) {
        if (grads.out[part]) cuda_store<DT>(grads.out[part], x, (cuda_acc_t<DT>)s);
        break;
      }
      x -= grads.count[part];
    }
  }
}

// gpos[w, c, t] = Σ_i gd[w, c, i, t] - Σ_j gd[w, c, t, j]: token t as a key, then as the query.
template <int DT>
__global__ void position_grad_kernel(int64_t planes, int64_t n, const cuda_acc_t<DT> *gd, cuda_storage_t<DT> *gpos) {
  using A = cuda_acc_t<DT>;
  int64_t total = planes * n;
  CUDA_GRID_STRIDE(q, total) {
    int64_t plane = q / n, tok = q % n;
    const A *m = gd + plane * n * n;
    A as_key = 0, as_query = 0;
    for (int64_t i = 0; i < n; i++) as_key += m[i * n + tok];
    for (int64_t j = 0; j < n; j++) as_query += m[tok * n + j];
    cuda_store<DT>(gpos, q, as_key - as_query);
  }
}

// ---- launching ------------------------------------------------------------------------------------------
template <int DT>
pb_args<DT> args_of(const ts_tensor *pos, const ts_tensor *w1, const ts_tensor *b1, const ts_tensor *w2,
                    const ts_tensor *b2) {
  using T = cuda_storage_t<DT>;
  pb_args<DT> p = {};
  p.windows = pos->shape[0];
  p.channels = pos->shape[1];
  p.tokens = pos->shape[2];
  p.hidden = w1->shape[0];
  p.heads = w2->shape[0];
  p.total = p.windows * p.tokens * p.tokens;
  p.pos = cuda_data<DT>(pos);
  p.w1 = cuda_data<DT>(w1);
  p.b1 = b1 ? cuda_data<DT>(b1) : (const T *)NULL;
  p.w2 = cuda_data<DT>(w2);
  p.b2 = b2 ? cuda_data<DT>(b2) : (const T *)NULL;
  p.row = (p.channels + 2 * p.hidden + p.heads) | 1;
  return p;
}

// The sizes that set a kernel's shared memory, named when the device cannot give it.
const char *const SHARED_USER = "these sizes (hidden units and heads)";

template <int DT> size_t forward_shared_bytes(const pb_args<DT> &p, int threads) {
  return (size_t)(weight_count(p) + (p.channels + p.hidden) * threads) * sizeof(cuda_acc_t<DT>);
}

// The weights and rows in the accumulation type, then the float64 accumulators.
template <int DT> size_t backward_shared_bytes(const pb_args<DT> &p, int threads) {
  return accumulator_offset(p, threads) + (size_t)weight_count(p) * sizeof(double);
}

// The largest of 256, 128, 64 or 32 threads whose shared memory fits the device (at least 32).
template <int DT> int backward_threads(const pb_args<DT> &p, int device, int *limit) {
  if (cuda_check(cudaDeviceGetAttribute(limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), OP_BACKWARD))
    return -1;
  int threads = 256;
  while (threads > 32 && backward_shared_bytes(p, threads) > (size_t)*limit) threads /= 2;
  return threads;
}
} // namespace

extern "C" int cuda_position_bias(ts_tensor *out, const ts_tensor *pos, const ts_tensor *w1, const ts_tensor *b1,
                                  const ts_tensor *w2, const ts_tensor *b2) {
  const ts_tensor *all[6] = {pos, out, w1, b1, w2, b2};
  if (cuda_check_floating_alike(OP, all, 6)) return ts_last_status();
  if (ts_numel(out) == 0) return TS_OK;
  int device = pos->device.index;
  cudaStream_t stream;
  if (cuda_stream_for(OP, device, &stream)) return ts_last_status();
  return cuda_dispatch_floating(OP, pos->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    pb_args<DT> p = args_of<DT>(pos, w1, b1, w2, b2);
    p.out = cuda_data<DT>(out);
    size_t bytes = forward_shared_bytes(p, THREADS);
    if (cuda_allow_shared(OP, position_bias_forward_kernel<DT>, bytes, device, SHARED_USER)) return ts_last_status();
    position_bias_forward_kernel<DT><<<cuda_grid_for(p.total, THREADS), THREADS, bytes, stream>>>(p);
    return cuda_launched(OP);
  });
}

extern "C" int cuda_position_bias_backward(ts_tensor *gpos, ts_tensor *gw1, ts_tensor *gb1, ts_tensor *gw2,
                                           ts_tensor *gb2, const ts_tensor *g, const ts_tensor *pos,
                                           const ts_tensor *w1, const ts_tensor *b1, const ts_tensor *w2) {
  const char *op = OP_BACKWARD;
  const ts_tensor *all[10] = {pos, g, w1, b1, w2, gpos, gw1, gb1, gw2, gb2};
  if (cuda_check_floating_alike(op, all, 10)) return ts_last_status();
  int device = pos->device.index;
  cudaStream_t stream;
  if (cuda_stream_for(op, device, &stream)) return ts_last_status();
  return cuda_dispatch_floating(op, pos->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    using A = cuda_acc_t<DT>;
    pb_args<DT> p = args_of<DT>(pos, w1, b1, w2, NULL);
    p.g = cuda_data<DT>(g);
    p.weights = gw1 || gb1 || gw2 || gb2;
    if (!p.weights && !gpos) return TS_OK;
    if (p.total == 0) { // no elements: every gradient is zero
      ts_tensor *outs[5] = {gpos, gw1, gb1, gw2, gb2};
      for (int k = 0; k < 5; k++)
        if (outs[k] && cuda_fill(outs[k], 0.0)) return ts_last_status();
      return TS_OK;
    }
    cuda_scratch gd, partial;
    if (gpos && gd.allocate(device, (size_t)(p.total * p.channels) * sizeof(A))) return ts_last_status();
    p.gd = gpos ? gd.as<A>() : NULL;
    int limit = 0, threads = backward_threads(p, device, &limit);
    if (threads < 0) return ts_last_status();
    size_t bytes = backward_shared_bytes(p, threads);
    if (cuda_allow_shared(op, position_bias_backward_kernel<DT>, bytes, device, SHARED_USER)) return ts_last_status();
    // with weight gradients, a fixed number of blocks (their sums are combined in order)
    int64_t tiles = (p.total + threads - 1) / threads, K = weight_count(p);
    int64_t cap = p.weights ? MAX_GRAD_BLOCKS : CUDA_MAX_BLOCKS, blocks = tiles < cap ? tiles : cap;
    if (p.weights && partial.allocate(device, (size_t)(blocks * K) * sizeof(double))) return ts_last_status();
    p.partial = partial.as<double>();
    position_bias_backward_kernel<DT><<<(unsigned)blocks, threads, bytes, stream>>>(p);
    if (cuda_launched(op)) return ts_last_status();
    if (p.weights && K > 0) {
      weight_grads<DT> grads = {{cuda_data_or_null<DT>(gw1), cuda_data_or_null<DT>(gb1), cuda_data_or_null<DT>(gw2),
                                 cuda_data_or_null<DT>(gb2)},
                                {p.hidden * p.channels, p.hidden, p.heads * p.hidden, p.heads}};
      position_bias_combine_kernel<DT><<<cuda_blocks(K), CUDA_THREADS, 0, stream>>>(K, blocks, p.partial, grads);
      if (cuda_launched(op)) return ts_last_status();
    }
    int64_t planes = p.windows * p.channels;
    if (!gpos || planes == 0) return TS_OK;
    position_grad_kernel<DT><<<cuda_blocks(planes * p.tokens), CUDA_THREADS, 0, stream>>>(planes, p.tokens, p.gd,
                                                                                        cuda_data<DT>(gpos));
    return cuda_launched(op);
  });
}

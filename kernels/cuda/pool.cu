// pool.cu — avg_pool2d, max_pool2d and adaptive_avg_pool2d on CUDA devices, forward and backward,
// with the windows of kernels/cpu/pool.c (PyTorch's: which cells, which divisor, which argmax on
// ties and NaN).
//
// Tensors are contiguous [planes, H, W] (planes = every leading dim). Forward passes take one
// thread per output cell. The avg and adaptive backward passes take one thread per input cell and
// gather from the output cells whose windows cover it: no atomics, the same bits on every run.
// max_pool2d's backward only knows the chosen cells and scatters into them (see there).
#include "nn.cuh"

#include <math.h>

namespace {
struct pool_geom {
  int64_t planes, H, W, OH, OW;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int count_include_pad;
};
} // namespace

// x [..., H, W] pooled into y [..., OH, OW]; window parameters may be NULL (adaptive, max backward).
static pool_geom make_geom(const ts_tensor *x, const ts_tensor *y, const int64_t kernel[2], const int64_t stride[2],
                           const int64_t padding[2], const int64_t dilation[2]) {
  int nd = x->ndim;
  pool_geom q = {};
  q.H = x->shape[nd - 2];
  q.W = x->shape[nd - 1];
  q.OH = y->shape[nd - 2];
  q.OW = y->shape[nd - 1];
  q.planes = q.H * q.W > 0 ? ts_numel(x) / (q.H * q.W) : 0;
  q.sh = q.sw = q.dh = q.dw = 1;
  if (kernel) {
    q.kh = kernel[0], q.kw = kernel[1];
    q.sh = stride[0], q.sw = stride[1];
    q.ph = padding[0], q.pw = padding[1];
  }
  if (dilation) q.dh = dilation[0], q.dw = dilation[1];
  return q;
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Runs launch(stream) for a non-empty job on the tensor's device; `op` names errors.
template <typename F> static int launch_on(const char *op, const ts_tensor *t, int64_t total, F launch) {
  cudaStream_t stream;
  if (total <= 0) return TS_OK;
  if (cuda_stream_for(op, t->device.index, &stream)) return ts_last_status();
  launch(stream);
  return cuda_launched(op);
}

// ---- avg_pool2d -------------------------------------------------------------------------------------
// PyTorch's window: clipped to the padded input for the count_include_pad divisor, then to the
// input for the cells; a window entirely in the padding averages nothing: 0.
namespace {
struct avg_window {
  int64_t h0, h1, w0, w1;
  int64_t divisor;
};
} // namespace

__device__ __forceinline__ avg_window avg_window_at(const pool_geom &q, int64_t oh, int64_t ow) {
  int64_t h0 = oh * q.sh - q.ph, w0 = ow * q.sw - q.pw;
  int64_t h1 = min64(h0 + q.kh, q.H + q.ph), w1 = min64(w0 + q.kw, q.W + q.pw);
  int64_t padded = (h1 - h0) * (w1 - w0);
  avg_window a = {max64(h0, 0), min64(h1, q.H), max64(w0, 0), min64(w1, q.W), 0};
  a.divisor = q.count_include_pad ? padded : (a.h1 - a.h0) * (a.w1 - a.w0);
  return a;
}

template <int DT>
static __global__ void avg_pool_kernel(pool_geom q, const cuda_storage_t<DT> *x, cuda_storage_t<DT> *out) {
  using A = cuda_acc_t<DT>;
  CUDA_GRID_STRIDE(i, q.planes * q.OH * q.OW) {
    int64_t ow = i % q.OW, oh = i / q.OW % q.OH, plane = i / (q.OW * q.OH);
    avg_window a = avg_window_at(q, oh, ow);
    if (a.h0 >= a.h1 || a.w0 >= a.w1) {
      cuda_store<DT>(out, i, 0);
      continue;
    }
    const cuda_storage_t<DT> *src = x + plane * q.H * q.W;
    A sum = 0;
    for (int64_t h = a.h0; h < a.h1; h++)
      for (int64_t w = a.w0; w < a.w1; w++) sum += cuda_load<DT>(src, h * q.W + w);
    cuda_store<DT>(out, i, sum / (A)a.divisor);
  }
}

// The outputs o whose window [o s - p, o s - p + k) covers input cell c: [*lo, *hi] within [0, out).
__device__ __forceinline__ void covering(int64_t c, int64_t k, int64_t s, int64_t p, int64_t out, int64_t *lo, int64_t *hi) {
  int64_t first = c + p - k + 1; // o s >= first
  *lo = first <= 0 ? 0 : (first + s - 1) / s;
  *hi = min64((c + p) / s, out - 1);
}

template <int DT>
static __global__ void avg_pool_backward_kernel(pool_geom q, const cuda_storage_t<DT> *g, cuda_storage_t<DT> *gx) {
  using A = cuda_acc_t<DT>;
  CUDA_GRID_STRIDE(i, q.planes * q.H * q.W) {
    int64_t w = i % q.W, h = i / q.W % q.H, plane = i / (q.W * q.H);
    int64_t oh0, oh1, ow0, ow1;
    covering(h, q.kh, q.sh, q.ph, q.OH, &oh0, &oh1);
    covering(w, q.kw, q.sw, q.pw, q.OW, &ow0, &ow1);
    const cuda_storage_t<DT> *gp = g + plane * q.OH * q.OW;
    A sum = 0;
    for (int64_t oh = oh0; oh <= oh1; oh++)
      for (int64_t ow = ow0; ow <= ow1; ow++) {
        avg_window a = avg_window_at(q, oh, ow);
        if (a.h0 >= a.h1 || a.w0 >= a.w1) continue;
        sum += cuda_load<DT>(gp, oh * q.OW + ow) / (A)a.divisor;
      }
    cuda_store<DT>(gx, i, sum);
  }
}

extern "C" int cuda_avg_pool2d(ts_tensor *out, const ts_tensor *x, const int64_t kernel[2], const int64_t stride[2],
                               const int64_t padding[2], int count_include_pad) {
  const char *op = "avg_pool2d";
  if (cuda_check_floating_alike(op, out, x)) return ts_last_status();
  pool_geom q = make_geom(x, out, kernel, stride, padding, NULL);
  q.count_include_pad = count_include_pad;
  int64_t total = ts_numel(out);
  return cuda_dispatch_floating(op, x->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    return launch_on(op, x, total, [&](cudaStream_t s) {
      avg_pool_kernel<DT><<<cuda_blocks(total), CUDA_THREADS, 0, s>>>(q, cuda_data<DT>(x), cuda_data<DT>(out));
    });
  });
}

extern "C" int cuda_avg_pool2d_backward(ts_tensor *gx, const ts_tensor *g, const int64_t kernel[2],
                                        const int64_t stride[2], const int64_t padding[2], int count_include_pad) {
  const char *op = "avg_pool2d backward";
  if (cuda_check_floating_alike(op, gx, g)) return ts_last_status();
  pool_geom q = make_geom(gx, g, kernel, stride, padding, NULL);
  q.count_include_pad = count_include_pad;
  int64_t total = ts_numel(gx);
  return cuda_dispatch_floating(op, gx->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    return launch_on(op, gx, total, [&](cudaStream_t s) {
      avg_pool_backward_kernel<DT><<<cuda_blocks(total), CUDA_THREADS, 0, s>>>(q, cuda_data<DT>(g), cuda_data<DT>(gx));
    });
  });
}

// ---- max_pool2d -------------------------------------------------------------------------------------
// PyTorch's scan: taps from the first in-bounds one, dilation apart; the first maximum wins, a NaN
// always wins (so NaN propagates). A dilated window can fall between the pixels of a tiny input
// and cover none: -inf, index -1, no gradient.
template <int DT>
static __global__ void max_pool_kernel(pool_geom q, const cuda_storage_t<DT> *x, cuda_storage_t<DT> *out,
                                       int64_t *indices) {
  using A = cuda_acc_t<DT>;
  CUDA_GRID_STRIDE(i, q.planes * q.OH * q.OW) {
    int64_t ow = i % q.OW, oh = i / q.OW % q.OH, plane = i / (q.OW * q.OH);
    int64_t h0 = oh * q.sh - q.ph, h1 = min64(h0 + (q.kh - 1) * q.dh + 1, q.H);
    int64_t w0 = ow * q.sw - q.pw, w1 = min64(w0 + (q.kw - 1) * q.dw + 1, q.W);
    if (h0 < 0) h0 += (-h0 + q.dh - 1) / q.dh * q.dh;
    if (w0 < 0) w0 += (-w0 + q.dw - 1) / q.dw * q.dw;
    const cuda_storage_t<DT> *src = x + plane * q.H * q.W;
    A best = -INFINITY;
    int64_t best_at = -1;
    for (int64_t h = h0; h < h1; h += q.dh)
      for (int64_t w = w0; w < w1; w += q.dw) {
        A v = cuda_load<DT>(src, h * q.W + w);
        if (v > best || v != v) {
          best = v;
          best_at = h * q.W + w;
        }
      }
    cuda_store<DT>(out, i, best);
    indices[i] = best_at;
  }
}

// The backward receives no window geometry, only the chosen cells: each output cell adds its
// gradient into the input cell it chose. Windows that overlap can choose one cell together, so the
// adds are atomic, in the accumulation type (float32 scratch for float16/bfloat16); where two
// gradients meet, the order of their float additions is not fixed.
template <typename A, int DT>
static __global__ void max_pool_backward_kernel(int64_t outs, int64_t plane_out, int64_t plane_in,
                                                const cuda_storage_t<DT> *g, const int64_t *indices, A *acc) {
  CUDA_GRID_STRIDE(k, outs) {
    int64_t at = indices[k];
    if (at >= 0) atomicAdd(acc + k / plane_out * plane_in + at, cuda_to_compute<DT>(g[k]));
  }
}

template <int DT> static __global__ void store_accumulated_kernel(int64_t n, const float *acc, cuda_storage_t<DT> *gx) {
  CUDA_GRID_STRIDE(i, n) gx[i] = cuda_from_compute<DT>(acc[i]);
}

extern "C" int cuda_max_pool2d(ts_tensor *out, ts_tensor *indices, const ts_tensor *x, const int64_t kernel[2],
                               const int64_t stride[2], const int64_t padding[2], const int64_t dilation[2]) {
  const char *op = "max_pool2d";
  if (cuda_check_floating_alike(op, out, x)) return ts_last_status();
  pool_geom q = make_geom(x, out, kernel, stride, padding, dilation);
  int64_t total = ts_numel(out);
  return cuda_dispatch_floating(op, x->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    return launch_on(op, x, total, [&](cudaStream_t s) {
      max_pool_kernel<DT><<<cuda_blocks(total), CUDA_THREADS, 0, s>>>(q, cuda_data<DT>(x), cuda_data<DT>(out),
                                                                     (int64_t *)ts_elem_ptr(indices));
    });
  });
}

extern "C" int cuda_max_pool2d_backward(ts_tensor *gx, const ts_tensor *g, const ts_tensor *indices) {
  const char *op = "max_pool2d backward";
  if (cuda_check_floating_alike(op, gx, g)) return ts_last_status();
  pool_geom q = make_geom(gx, g, NULL, NULL, NULL, NULL);
  int64_t total = ts_numel(gx), outs = ts_numel(g), device = gx->device.index;
  if (total == 0) return TS_OK;
  cudaStream_t stream;
  if (cuda_stream_for(op, (int)device, &stream)) return ts_last_status();
  return cuda_dispatch_floating(op, gx->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    using A = cuda_acc_t<DT>;
    constexpr bool in_place = DT == TS_F32 || DT == TS_F64; // accumulate straight into gx
    cuda_scratch scratch;
    A *acc = in_place ? (A *)ts_elem_ptr(gx) : NULL;
    if (!in_place) {
      if (scratch.allocate((int)device, (size_t)total * sizeof(A))) return ts_last_status();
      acc = scratch.as<A>();
    }
    if (cuda_check(cudaMemsetAsync(acc, 0, (size_t)total * sizeof(A), stream), op)) return ts_last_status();
    if (outs > 0) {
      max_pool_backward_kernel<A, DT><<<cuda_blocks(outs), CUDA_THREADS, 0, stream>>>(
          outs, q.OH * q.OW, q.H * q.W, cuda_data<DT>(g), (const int64_t *)ts_elem_ptr(indices), acc);
      if (cuda_launched(op)) return ts_last_status();
    }
    if (in_place) return TS_OK;
    store_accumulated_kernel<DT><<<cuda_blocks(total), CUDA_THREADS, 0, stream>>>(total, (const float *)acc,
                                                                                 cuda_data<DT>(gx));
    return cuda_launched(op);
  });
}

// ---- adaptive_avg_pool2d ----------------------------------------------------------------------------
// Output cell o of `out` covers input [floor(o in / out), ceil((o + 1) in / out)).
__device__ __forceinline__ int64_t start_index(int64_t o, int64_t out, int64_t in) { return o * in / out; }
__device__ __forceinline__ int64_t end_index(int64_t o, int64_t out, int64_t in) { return ((o + 1) * in + out - 1) / out; }

template <int DT>
static __global__ void adaptive_kernel(pool_geom q, const cuda_storage_t<DT> *x, cuda_storage_t<DT> *out) {
  using A = cuda_acc_t<DT>;
  CUDA_GRID_STRIDE(i, q.planes * q.OH * q.OW) {
    int64_t ow = i % q.OW, oh = i / q.OW % q.OH, plane = i / (q.OW * q.OH);
    int64_t h0 = start_index(oh, q.OH, q.H), h1 = end_index(oh, q.OH, q.H);
    int64_t w0 = start_index(ow, q.OW, q.W), w1 = end_index(ow, q.OW, q.W);
    const cuda_storage_t<DT> *src = x + plane * q.H * q.W;
    A sum = 0;
    for (int64_t h = h0; h < h1; h++)
      for (int64_t w = w0; w < w1; w++) sum += cuda_load<DT>(src, h * q.W + w);
    cuda_store<DT>(out, i, sum / (A)((h1 - h0) * (w1 - w0)));
  }
}

// The outputs whose adaptive window covers input c: o in [floor(c out / in), ceil((c + 1) out / in)).
__device__ __forceinline__ void adaptive_covering(int64_t c, int64_t in, int64_t out, int64_t *lo, int64_t *hi) {
  *lo = c * out / in;
  *hi = min64(((c + 1) * out + in - 1) / in, out); // exclusive
}

template <int DT>
static __global__ void adaptive_backward_kernel(pool_geom q, const cuda_storage_t<DT> *g, cuda_storage_t<DT> *gx) {
  using A = cuda_acc_t<DT>;
  CUDA_GRID_STRIDE(i, q.planes * q.H * q.W) {
    int64_t w = i % q.W, h = i / q.W % q.H, plane = i / (q.W * q.H);
    int64_t oh0, oh1, ow0, ow1;
    adaptive_covering(h, q.H, q.OH, &oh0, &oh1);
    adaptive_covering(w, q.W, q.OW, &ow0, &ow1);
    const cuda_storage_t<DT> *gp = g + plane * q.OH * q.OW;
    A sum = 0;
    for (int64_t oh = oh0; oh < oh1; oh++) {
      int64_t h0 = start_index(oh, q.OH, q.H), h1 = end_index(oh, q.OH, q.H);
      if (h < h0 || h >= h1) continue;
      for (int64_t ow = ow0; ow < ow1; ow++) {
        int64_t w0 = start_index(ow, q.OW, q.W), w1 = end_index(ow, q.OW, q.W);
        if (w < w0 || w >= w1) continue;
        sum += cuda_load<DT>(gp, oh * q.OW + ow) / (A)((h1 - h0) * (w1 - w0));
      }
    }
    cuda_store<DT>(gx, i, sum);
  }
}

extern "C" int cuda_adaptive_avg_pool2d(ts_tensor *out, const ts_tensor *x) {
  const char *op = "adaptive_avg_pool2d";
  if (cuda_check_floating_alike(op, out, x)) return ts_last_status();
  pool_geom q = make_geom(x, out, NULL, NULL, NULL, NULL);
  int64_t total = ts_numel(out);
  return cuda_dispatch_floating(op, x->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    return launch_on(op, x, total, [&](cudaStream_t s) {
      adaptive_kernel<DT><<<cuda_blocks(total), CUDA_THREADS, 0, s>>>(q, cuda_data<DT>(x), cuda_data<DT>(out));
    });
  });
}

extern "C" int cuda_adaptive_avg_pool2d_backward(ts_tensor *gx, const ts_tensor *g) {
  const char *op = "adaptive_avg_pool2d backward";
  if (cuda_check_floating_alike(op, gx, g)) return ts_last_status();
  pool_geom q = make_geom(gx, g, NULL, NULL, NULL, NULL);
  int64_t total = ts_numel(gx);
  return cuda_dispatch_floating(op, gx->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    return launch_on(op, gx, total, [&](cudaStream_t s) {
      adaptive_backward_kernel<DT><<<cuda_blocks(total), CUDA_THREADS, 0, s>>>(q, cuda_data<DT>(g), cuda_data<DT>(gx));
    });
  });
}

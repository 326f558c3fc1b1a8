// resample.cu — interpolate (nearest, bilinear) on CUDA devices, forward and backward, with the
// source coordinates of kernels/cpu/resample.c (PyTorch's upsample kernels; see the formulas
// there).
//
// Tensors are contiguous [planes, H, W]. Every thread works out its source coordinates with the
// CPU's exact arithmetic (explicitly rounded operations, no fused multiply-adds), so the forward
// matches the CPU to the last bit in float32 and float64. The backward takes one thread per input
// cell and gathers from the output cells that read it: along each axis the source index never
// decreases with the output index, so those cells form a range, found by binary search. No atomics:
// the same bits on every run.
#include "nn.cuh"

#include <math.h>

namespace {
struct resample_geom {
  int64_t planes, H, W, OH, OW;
  int mode, align_corners;
  double scale_h, scale_w; // the caller's scale factors, <= 0 where none
};

// Where output position o reads along one axis: i0 and i0 + step with weights w0 and w1
// (nearest: step 0, w0 = 1, w1 = 0).
struct source {
  int64_t i0, step;
  double w0, w1;
};
} // namespace

__device__ int64_t nearest_source(int64_t o, int64_t in, int64_t out, double scale_factor) {
  if (out == in) return o;
  if (out == 2 * in) return o >> 1;
  float scale = scale_factor > 0 ? (float)(1.0 / scale_factor) : __fdiv_rn((float)in, (float)out);
  int64_t i = (int64_t)floorf(__fmul_rn((float)o, scale));
  return i < in - 1 ? i : in - 1;
}

__device__ double linear_source(int64_t o, int64_t in, int64_t out, int align_corners, double scale_factor) {
  if (align_corners) return out > 1 ? __ddiv_rn(__dmul_rn((double)o, (double)(in - 1)), (double)(out - 1)) : 0.0;
  double scale = scale_factor > 0 ? 1.0 / scale_factor : __ddiv_rn((double)in, (double)out);
  double src = __dsub_rn(__dmul_rn(scale, __dadd_rn((double)o, 0.5)), 0.5);
  return src < 0 ? 0 : src;
}

__device__ source source_of(int64_t o, int64_t in, int64_t out, int mode, int align_corners, double scale_factor) {
  if (mode == TS_INTERP_NEAREST) return {nearest_source(o, in, out, scale_factor), 0, 1.0, 0.0};
  double src = linear_source(o, in, out, align_corners, scale_factor);
  int64_t i = (int64_t)floor(src);
  if (i > in - 1) i = in - 1;
  double frac = __dsub_rn(src, (double)i);
  frac = frac < 0 ? 0 : frac > 1 ? 1 : frac;
  return {i, i < in - 1 ? 1 : 0, __dsub_rn(1.0, frac), frac};
}

// The weight with which output position o (source s) reads input position c along one axis.
__device__ __forceinline__ double weight_on(const source &s, int64_t c) {
  return (s.i0 == c ? s.w0 : 0.0) + (s.i0 + s.step == c ? s.w1 : 0.0);
}

// The output positions that read input position c: [*lo, *hi) (empty when lo >= hi). Both i0 and
// i0 + step are non-decreasing in o, so: lo = the first o with i0 + step >= c, hi = the first o
// with i0 > c.
__device__ void readers_of(int64_t c, int64_t in, int64_t out, int mode, int align_corners, double scale_factor,
                           int64_t *lo, int64_t *hi) {
  int64_t a = 0, b = out;
  while (a < b) {
    int64_t mid = a + (b - a) / 2;
    source s = source_of(mid, in, out, mode, align_corners, scale_factor);
    if (s.i0 + s.step >= c) b = mid;
    else a = mid + 1;
  }
  *lo = a;
  b = out;
  while (a < b) {
    int64_t mid = a + (b - a) / 2;
    if (source_of(mid, in, out, mode, align_corners, scale_factor).i0 > c) b = mid;
    else a = mid + 1;
  }
  *hi = a;
}

// out = hw0 (ww0 top[a] + ww1 top[b]) + hw1 (ww0 bottom[a] + ww1 bottom[b]) in the CPU's order and
// precision (float32 for float16/bfloat16, as the CPU computes them after converting).
template <int DT> static __global__ void interpolate_kernel(resample_geom q, const cuda_storage_t<DT> *x, cuda_storage_t<DT> *out) {
  using A = cuda_acc_t<DT>;
  CUDA_GRID_STRIDE(i, q.planes * q.OH * q.OW) {
    int64_t ow = i % q.OW, oh = i / q.OW % q.OH, plane = i / (q.OW * q.OH);
    source r = source_of(oh, q.H, q.OH, q.mode, q.align_corners, q.scale_h);
    source c = source_of(ow, q.W, q.OW, q.mode, q.align_corners, q.scale_w);
    const cuda_storage_t<DT> *top = x + (plane * q.H + r.i0) * q.W, *bottom = top + r.step * q.W;
    if (q.mode == TS_INTERP_NEAREST) {
      out[i] = top[c.i0];
      continue;
    }
    int64_t a = c.i0, b = c.i0 + c.step;
    A hw0 = (A)r.w0, hw1 = (A)r.w1, ww0 = (A)c.w0, ww1 = (A)c.w1;
    A t = cuda_to_compute<DT>(top[a]), tb = cuda_to_compute<DT>(top[b]);
    A u = cuda_to_compute<DT>(bottom[a]), ub = cuda_to_compute<DT>(bottom[b]);
    A upper, lower;
    if constexpr (DT == TS_F64) {
      upper = __dadd_rn(__dmul_rn(ww0, t), __dmul_rn(ww1, tb));
      lower = __dadd_rn(__dmul_rn(ww0, u), __dmul_rn(ww1, ub));
      out[i] = __dadd_rn(__dmul_rn(hw0, upper), __dmul_rn(hw1, lower));
    } else {
      upper = __fadd_rn(__fmul_rn(ww0, t), __fmul_rn(ww1, tb));
      lower = __fadd_rn(__fmul_rn(ww0, u), __fmul_rn(ww1, ub));
      out[i] = cuda_from_compute<DT>(__fadd_rn(__fmul_rn(hw0, upper), __fmul_rn(hw1, lower)));
    }
  }
}

template <int DT>
static __global__ void interpolate_backward_kernel(resample_geom q, const cuda_storage_t<DT> *g, cuda_storage_t<DT> *gx) {
  using A = cuda_acc_t<DT>;
  CUDA_GRID_STRIDE(i, q.planes * q.H * q.W) {
    int64_t w = i % q.W, h = i / q.W % q.H, plane = i / (q.W * q.H);
    int64_t oh0, oh1, ow0, ow1;
    readers_of(h, q.H, q.OH, q.mode, q.align_corners, q.scale_h, &oh0, &oh1);
    readers_of(w, q.W, q.OW, q.mode, q.align_corners, q.scale_w, &ow0, &ow1);
    const cuda_storage_t<DT> *gp = g + plane * q.OH * q.OW;
    A sum = 0;
    for (int64_t oh = oh0; oh < oh1; oh++) {
      A rw = (A)weight_on(source_of(oh, q.H, q.OH, q.mode, q.align_corners, q.scale_h), h);
      if (rw == 0) continue;
      for (int64_t ow = ow0; ow < ow1; ow++) {
        A cw = (A)weight_on(source_of(ow, q.W, q.OW, q.mode, q.align_corners, q.scale_w), w);
        sum += rw * cw * cuda_load<DT>(gp, oh * q.OW + ow);
      }
    }
    cuda_store<DT>(gx, i, sum);
  }
}

static resample_geom make_geom(const ts_tensor *x, const ts_tensor *y, int mode, int align_corners, const double scale[2]) {
  int nd = x->ndim;
  resample_geom q = {};
  q.H = x->shape[nd - 2];
  q.W = x->shape[nd - 1];
  q.OH = y->shape[nd - 2];
  q.OW = y->shape[nd - 1];
  q.planes = q.H * q.W > 0 ? ts_numel(x) / (q.H * q.W) : 0;
  q.mode = mode;
  q.align_corners = align_corners;
  q.scale_h = scale[0];
  q.scale_w = scale[1];
  return q;
}

extern "C" int cuda_interpolate(ts_tensor *out, const ts_tensor *x, int mode, int align_corners, const double scale[2]) {
  const char *op = "interpolate";
  if (cuda_check_floating_alike(op, out, x)) return ts_last_status();
  resample_geom q = make_geom(x, out, mode, align_corners, scale);
  int64_t total = ts_numel(out);
  cudaStream_t stream;
  if (total == 0 || q.planes == 0) return TS_OK;
  if (cuda_stream_for(op, x->device.index, &stream)) return ts_last_status();
  return cuda_dispatch_floating(op, x->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    interpolate_kernel<DT><<<cuda_blocks(total), CUDA_THREADS, 0, stream>>>(q, cuda_data<DT>(x), cuda_data<DT>(out));
    return cuda_launched(op);
  });
}

extern "C" int cuda_interpolate_backward(ts_tensor *gx, const ts_tensor *g, int mode, int align_corners,
                                         const double scale[2]) {
  const char *op = "interpolate backward";
  if (cuda_check_floating_alike(op, gx, g)) return ts_last_status();
  resample_geom q = make_geom(gx, g, mode, align_corners, scale);
  int64_t total = ts_numel(gx);
  cudaStream_t stream;
  if (total == 0) return TS_OK;
  if (cuda_stream_for(op, gx->device.index, &stream)) return ts_last_status();
  return cuda_dispatch_floating(op, gx->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    interpolate_backward_kernel<DT><<<cuda_blocks(total), CUDA_THREADS, 0, stream>>>(q, cuda_data<DT>(g),
                                                                                     cuda_data<DT>(gx));
    return cuda_launched(op);
  });
}

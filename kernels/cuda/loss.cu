// loss.cu — cross entropy (with its log-softmax fused in) and the elementwise regression losses
// (MSE, L1, smooth L1) on CUDA devices, forward and backward, with the semantics of
// kernels/cpu/loss.c (see the formulas there: PyTorch's label smoothing, class weights and
// ignore_index).
//
// Cross entropy takes one warp per position (n, s); its lanes split the C classes, which lie S
// apart in logits [N, C, S]. The backward recomputes the log-sum-exp for float16/bfloat16 instead
// of reading the forward's, which was stored rounded to the 16-bit dtype. The elementwise losses
// compute in double, as the CPU does, so unreduced results match it to the last bit; their sum
// is a two-pass deterministic reduction.
#include "nn.cuh"
#include "../../runtime/nn.h"

#include <math.h>

constexpr int WARPS_PER_BLOCK = 8;

// ---- cross entropy ----------------------------------------------------------------------------------
template <int DT> struct ce_args {
  using T = cuda_storage_t<DT>;
  int64_t n, c, s;
  const T *z, *weight, *lse_in, *g;
  const T *soft_target;   // probabilities [N, C, S], or NULL
  const int64_t *classes; // class indices [N, S], or NULL
  T *loss, *lse, *tw, *gz, *gt;
  int64_t g_stride_n, g_stride_s;
  int64_t ignore_index;
  cuda_acc_t<DT> smoothing;
  const cuda_acc_t<DT> *weight_sum; // backward: the sum of the class weights (NULL: C)
  bool recompute_lse;               // backward: the saved lse was rounded (16-bit dtypes)
};

template <int DT> __device__ __forceinline__ cuda_acc_t<DT> class_weight(const ce_args<DT> &p, int64_t k) {
  return cuda_param<DT>(p.weight, k, 1);
}

// The target's unsmoothed weight of class k: q_k / (1 - eps) less the uniform part.
template <int DT>
__device__ __forceinline__ cuda_acc_t<DT> target_mass(const ce_args<DT> &p, int64_t base, int64_t k, int64_t t) {
  if (p.soft_target) return cuda_load<DT>(p.soft_target, base + k * p.s) * class_weight(p, k);
  return k == t ? class_weight(p, k) : (cuda_acc_t<DT>)0;
}

// log sum_k exp(z_k) over the classes at base (all lanes of the warp get it); -inf when every
// logit is -inf (or there are no classes).
template <int DT> __device__ cuda_acc_t<DT> warp_log_sum_exp(const ce_args<DT> &p, int64_t base, int lane) {
  using A = cuda_acc_t<DT>;
  A mx = -INFINITY, sum = 0;
  for (int64_t k = lane; k < p.c; k += 32) {
    A v = cuda_load<DT>(p.z, base + k * p.s);
    mx = v > mx ? v : mx;
  }
  mx = cuda_warp_max(mx);
  if (mx == -INFINITY) return mx;
  for (int64_t k = lane; k < p.c; k += 32) sum += cuda_exp(cuda_load<DT>(p.z, base + k * p.s) - mx);
  return mx + cuda_log(cuda_warp_sum(sum));
}

template <int DT> static __global__ void __launch_bounds__(WARPS_PER_BLOCK * 32) cross_entropy_kernel(ce_args<DT> p) {
  using A = cuda_acc_t<DT>;
  int lane = threadIdx.x & 31;
  int64_t positions = p.n * p.s, step = (int64_t)gridDim.x * WARPS_PER_BLOCK;
  for (int64_t pos = (int64_t)blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5); pos < positions; pos += step) {
    int64_t base = pos / p.s * p.c * p.s + pos % p.s;
    A lse = warp_log_sum_exp(p, base, lane);
    int64_t t = p.classes ? p.classes[pos] : -1;
    if (p.classes && t == p.ignore_index) {
      if (lane == 0) {
        cuda_store<DT>(p.lse, pos, lse);
        cuda_store<DT>(p.loss, pos, 0);
        if (p.tw) cuda_store<DT>(p.tw, pos, 0);
      }
      continue;
    }
    A eps = p.smoothing, uniform = eps / (A)p.c, loss = 0;
    if (p.classes && eps == 0) {
      loss = class_weight(p, t) * (lse - cuda_load<DT>(p.z, base + t * p.s));
    } else {
      for (int64_t k = lane; k < p.c; k += 32) {
        A q = (1 - eps) * target_mass(p, base, k, t) + uniform * class_weight(p, k);
        if (q != 0) loss += q * (lse - cuda_load<DT>(p.z, base + k * p.s)); // q = 0 skips 0 * inf
      }
      loss = cuda_warp_sum(loss);
    }
    if (lane == 0) {
      cuda_store<DT>(p.lse, pos, lse);
      cuda_store<DT>(p.loss, pos, loss);
      if (p.tw) cuda_store<DT>(p.tw, pos, class_weight(p, t));
    }
  }
}

// d loss / d z_k = g (softmax(z)_k sum(q) - q_k); d loss / d t_k = -g (1 - eps) w_k (z_k - lse).
template <int DT>
static __global__ void __launch_bounds__(WARPS_PER_BLOCK * 32) cross_entropy_backward_kernel(ce_args<DT> p) {
  using A = cuda_acc_t<DT>;
  int lane = threadIdx.x & 31;
  int64_t positions = p.n * p.s, step = (int64_t)gridDim.x * WARPS_PER_BLOCK;
  A eps = p.smoothing, uniform = eps / (A)p.c, weight_sum = p.weight_sum ? *p.weight_sum : (A)p.c;
  for (int64_t pos = (int64_t)blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5); pos < positions; pos += step) {
    int64_t nn = pos / p.s, ss = pos % p.s, base = nn * p.c * p.s + ss;
    int64_t t = p.classes ? p.classes[pos] : -1;
    if (p.classes && t == p.ignore_index) { // an ignored position passes no gradient
      for (int64_t k = lane; p.gz && k < p.c; k += 32) cuda_store<DT>(p.gz, base + k * p.s, 0);
      continue;
    }
    A gi = cuda_load<DT>(p.g, nn * p.g_stride_n + ss * p.g_stride_s);
    A lse = p.recompute_lse ? warp_log_sum_exp(p, base, lane) : cuda_load<DT>(p.lse_in, pos);
    A sum_q;
    if (p.soft_target) {
      A mass = 0;
      for (int64_t k = lane; k < p.c; k += 32) mass += (1 - eps) * target_mass(p, base, k, t);
      sum_q = uniform * weight_sum + cuda_warp_sum(mass);
    } else {
      sum_q = uniform * weight_sum + (1 - eps) * class_weight(p, t);
    }
    for (int64_t k = lane; k < p.c; k += 32) {
      int64_t at = base + k * p.s;
      A zk = cuda_load<DT>(p.z, at), wk = class_weight(p, k);
      A q = (1 - eps) * target_mass(p, base, k, t) + uniform * wk;
      if (p.gz) cuda_store<DT>(p.gz, at, gi * (cuda_exp(zk - lse) * sum_q - q));
      if (p.gt) cuda_store<DT>(p.gt, at, -gi * (1 - eps) * wk * (zk - lse));
    }
  }
}

// *sum = the sum of the C class weights, by one block in a fixed order.
template <int DT>
static __global__ void __launch_bounds__(CUDA_THREADS) weight_sum_kernel(int64_t c, const cuda_storage_t<DT> *w,
                                                                          cuda_acc_t<DT> *sum) {
  using A = cuda_acc_t<DT>;
  __shared__ A scratch[32];
  A s = 0;
  for (int64_t k = threadIdx.x; k < c; k += blockDim.x) s += cuda_load<DT>(w, k);
  s = cuda_block_sum(s, scratch);
  if (threadIdx.x == 0) *sum = s;
}

template <int DT> static ce_args<DT> ce_layout(const ts_tensor *logits, const ts_tensor *target, const ts_tensor *weight) {
  using T = cuda_storage_t<DT>;
  ce_args<DT> p = {};
  p.n = logits->shape[0];
  p.c = logits->shape[1];
  p.s = logits->shape[2];
  p.z = cuda_data<DT>(logits);
  p.weight = weight ? cuda_data<DT>(weight) : (const T *)NULL;
  if (target->dtype == TS_I64) p.classes = (const int64_t *)ts_elem_ptr(target);
  else p.soft_target = cuda_data<DT>(target);
  return p;
}

static int check_cross_entropy(const char *op, const ts_tensor *logits, const ts_tensor *target,
                               const ts_tensor *const *floats, int count) {
  if (cuda_check_floating_alike(op, floats, count)) return ts_last_status();
  if (target->dtype != TS_I64 && target->dtype != logits->dtype)
    return ts_set_error(TS_ERR_DTYPE, "%s: the cuda kernel takes int64 class indices or %s probabilities, got %s", op,
                        ts_dtype_name(logits->dtype), ts_dtype_name(target->dtype));
  return TS_OK;
}

extern "C" int cuda_cross_entropy(ts_tensor *loss, ts_tensor *lse, ts_tensor *tw, const ts_tensor *logits,
                                  const ts_tensor *target, const ts_tensor *weight, int64_t ignore_index,
                                  double smoothing) {
  const char *op = "cross_entropy";
  const ts_tensor *floats[5] = {logits, loss, lse, tw, weight};
  if (check_cross_entropy(op, logits, target, floats, 5)) return ts_last_status();
  int64_t positions = logits->shape[0] * logits->shape[2];
  cudaStream_t stream;
  if (positions == 0) return TS_OK;
  if (cuda_stream_for(op, logits->device.index, &stream)) return ts_last_status();
  return cuda_dispatch_floating(op, logits->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    using T = cuda_storage_t<DT>;
    ce_args<DT> p = ce_layout<DT>(logits, target, weight);
    p.loss = cuda_data<DT>(loss);
    p.lse = cuda_data<DT>(lse);
    p.tw = tw ? cuda_data<DT>(tw) : (T *)NULL;
    p.ignore_index = ignore_index;
    p.smoothing = (cuda_acc_t<DT>)smoothing;
    cross_entropy_kernel<DT><<<cuda_grid_for(positions, WARPS_PER_BLOCK), WARPS_PER_BLOCK * 32, 0, stream>>>(p);
    return cuda_launched(op);
  });
}

extern "C" int cuda_cross_entropy_backward(ts_tensor *glogits, ts_tensor *gtarget, const ts_tensor *g,
                                           const ts_tensor *logits, const ts_tensor *lse, const ts_tensor *target,
                                           const ts_tensor *weight, int64_t ignore_index, double smoothing) {
  const char *op = "cross_entropy backward";
  const ts_tensor *floats[6] = {logits, g, lse, weight, glogits, gtarget};
  if (check_cross_entropy(op, logits, target, floats, 6)) return ts_last_status();
  int64_t positions = logits->shape[0] * logits->shape[2];
  cudaStream_t stream;
  if (positions == 0 || (!glogits && !gtarget)) return TS_OK;
  if (cuda_stream_for(op, logits->device.index, &stream)) return ts_last_status();
  return cuda_dispatch_floating(op, logits->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    using A = cuda_acc_t<DT>;
    using T = cuda_storage_t<DT>;
    ce_args<DT> p = ce_layout<DT>(logits, target, weight);
    p.lse_in = cuda_data<DT>(lse);
    p.g = cuda_data<DT>(g);
    p.g_stride_n = g->stride[0];
    p.g_stride_s = g->stride[1];
    p.gz = glogits ? cuda_data<DT>(glogits) : (T *)NULL;
    p.gt = gtarget ? cuda_data<DT>(gtarget) : (T *)NULL;
    p.ignore_index = ignore_index;
    p.smoothing = (cuda_acc_t<DT>)smoothing;
    p.recompute_lse = DT == TS_F16 || DT == TS_BF16;
    cuda_scratch weight_sum;
    if (weight) {
      if (weight_sum.allocate(logits->device.index, sizeof(A))) return ts_last_status();
      weight_sum_kernel<DT><<<1, CUDA_THREADS, 0, stream>>>(p.c, p.weight, weight_sum.as<A>());
      if (cuda_launched(op)) return ts_last_status();
      p.weight_sum = weight_sum.as<A>();
    }
    cross_entropy_backward_kernel<DT><<<cuda_grid_for(positions, WARPS_PER_BLOCK), WARPS_PER_BLOCK * 32, 0, stream>>>(p);
    return cuda_launched(op);
  });
}

// ---- elementwise losses -----------------------------------------------------------------------------
__device__ __forceinline__ double loss_of(int kind, double d, double beta) {
  double ad = fabs(d);
  switch (kind) {
  case TS_LOSS_MSE: return d * d;
  case TS_LOSS_L1: return ad;
  default: return ad < beta ? 0.5 * d * d / beta : ad - 0.5 * beta;
  }
}

// d loss / d a; 0 at d = 0 for L1 (PyTorch's sign).
__device__ __forceinline__ double slope_of(int kind, double d, double beta) {
  double sign = (d > 0) - (d < 0);
  switch (kind) {
  case TS_LOSS_MSE: return 2 * d;
  case TS_LOSS_L1: return sign;
  default: return fabs(d) < beta ? d / beta : sign;
  }
}

namespace {
template <int DT> struct pointwise_fn {
  cuda_storage_t<DT> *out;
  const cuda_storage_t<DT> *a, *b;
  int kind;
  double beta;
  __device__ void operator()(const int64_t (&off)[3]) const {
    double d = cuda_load_f64<DT>(a[off[1]]) - cuda_load_f64<DT>(b[off[2]]);
    out[off[0]] = cuda_store_f64<DT>(loss_of(kind, d, beta));
  }
};

template <int DT> struct pointwise_backward_fn {
  cuda_storage_t<DT> *ga;
  const cuda_storage_t<DT> *g, *a, *b;
  int kind;
  double beta, scale;
  __device__ void operator()(const int64_t (&off)[4]) const {
    double d = cuda_load_f64<DT>(a[off[2]]) - cuda_load_f64<DT>(b[off[3]]);
    ga[off[0]] = cuda_store_f64<DT>(scale * cuda_load_f64<DT>(g[off[1]]) * slope_of(kind, d, beta));
  }
};
} // namespace

// The sum of the losses of contiguous a and b: fixed chunks summed per block, then the chunk sums
// in order by one block.
constexpr int SUM_CHUNK = 8192;

template <int DT>
static __global__ void __launch_bounds__(CUDA_THREADS)
    loss_chunk_sums_kernel(int64_t n, int kind, double beta, const cuda_storage_t<DT> *a, const cuda_storage_t<DT> *b,
                           double *partial) {
  __shared__ double scratch[32];
  int64_t i0 = (int64_t)blockIdx.x * SUM_CHUNK, i1 = i0 + SUM_CHUNK < n ? i0 + SUM_CHUNK : n;
  double s = 0;
  for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x)
    s += loss_of(kind, cuda_load_f64<DT>(a[i]) - cuda_load_f64<DT>(b[i]), beta);
  s = cuda_block_sum(s, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

template <int DT>
static __global__ void __launch_bounds__(1024) loss_total_kernel(int64_t chunks, const double *partial,
                                                                 cuda_storage_t<DT> *out) {
  __shared__ double scratch[32];
  double s = 0;
  for (int64_t k = threadIdx.x; k < chunks; k += blockDim.x) s += partial[k];
  s = cuda_block_sum(s, scratch);
  if (threadIdx.x == 0) out[0] = cuda_store_f64<DT>(s);
}

static bool same_shape(const ts_tensor *a, const ts_tensor *b) {
  if (a->ndim != b->ndim) return false;
  for (int d = 0; d < a->ndim; d++)
    if (a->shape[d] != b->shape[d]) return false;
  return true;
}

extern "C" int cuda_pointwise_loss(int kind, ts_tensor *out, const ts_tensor *a, const ts_tensor *b, double beta) {
  const char *op = kind == TS_LOSS_MSE ? "mse_loss" : kind == TS_LOSS_L1 ? "l1_loss" : "smooth_l1_loss";
  const ts_tensor *floats[3] = {out, a, b};
  if (cuda_check_floating_alike(op, floats, 3)) return ts_last_status();
  return cuda_dispatch_floating(op, out->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    if (same_shape(out, a)) { // reduction 'none' (or a single element, whose loss is the sum)
      const ts_tensor *ops[3] = {out, a, b};
      return cuda_foreach(op, ops, pointwise_fn<DT>{cuda_data<DT>(out), cuda_data<DT>(a), cuda_data<DT>(b), kind, beta});
    }
    int64_t n = ts_numel(a), chunks = n > 0 ? (n + SUM_CHUNK - 1) / SUM_CHUNK : 0;
    cudaStream_t stream;
    if (cuda_stream_for(op, out->device.index, &stream)) return ts_last_status();
    cuda_scratch partial;
    if (partial.allocate(out->device.index, (size_t)(chunks > 0 ? chunks : 1) * sizeof(double))) return ts_last_status();
    if (chunks > 0) {
      loss_chunk_sums_kernel<DT><<<(unsigned)chunks, CUDA_THREADS, 0, stream>>>(n, kind, beta, cuda_data<DT>(a),
                                                                                cuda_data<DT>(b), partial.as<double>());
      if (cuda_launched(op)) return ts_last_status();
    }
    loss_total_kernel<DT><<<1, 1024, 0, stream>>>(chunks, partial.as<double>(), cuda_data<DT>(out));
    return cuda_launched(op);
  });
}

extern "C" int cuda_pointwise_loss_backward(int kind, ts_tensor *ga, const ts_tensor *g, const ts_tensor *a,
                                            const ts_tensor *b, double beta, double scale) {
  const char *op = kind == TS_LOSS_MSE ? "mse_loss backward" : kind == TS_LOSS_L1 ? "l1_loss backward"
                                                                                   : "smooth_l1_loss backward";
  const ts_tensor *ops[4] = {ga, g, a, b};
  if (cuda_check_floating_alike(op, ops, 4)) return ts_last_status();
  return cuda_dispatch_floating(op, ga->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    return cuda_foreach(op, ops, pointwise_backward_fn<DT>{cuda_data<DT>(ga), cuda_data<DT>(g), cuda_data<DT>(a),
                                                           cuda_data<DT>(b), kind, beta, scale});
  });
}

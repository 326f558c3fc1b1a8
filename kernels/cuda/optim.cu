// optim.cu — multi-tensor optimizer kernels on CUDA devices: AdamW and SGD updates, the total norm
// of a list of tensors and scaling a list in place, with the semantics of kernels/cpu/optim.c.
//
// One launch covers up to LIST_MAX tensors of one dtype: their addresses, sizes and per-tensor
// coefficients travel in the kernel's arguments (a struct passed by value, under 2 KB), and every
// block updates one CHUNK-element piece of one tensor. A model's hundreds of small tensors thus
// take a handful of launches instead of one each.
//
// Precision follows the CPU kernels: float32 parameters update in float32, float64 in float64,
// float16/bfloat16 are read into float32, updated against float32 state and rounded back once;
// scalar coefficients are worked out in double on the host and converted once. The update
// formulas are written with explicitly rounded operations (no fused multiply-add), so results
// are bit-identical to the CPU's. The norm is a deterministic two-pass reduction in double.
#include "nn.cuh"

#include <math.h>

constexpr int LIST_MAX = 24;        // tensors per launch
constexpr int64_t CHUNK = 16384;    // elements per block
constexpr int LIST_THREADS = 512;

// ---- the tensor lists -------------------------------------------------------------------------------
template <int NPTR> struct tensor_list {
  int count;
  void *ptr[NPTR][LIST_MAX];
  int64_t numel[LIST_MAX];
  int64_t block_start[LIST_MAX + 1]; // the first block of each tensor; [count]: the launch's blocks
  double coef[3][LIST_MAX];          // per-tensor coefficients, meaning per kernel
};

// The list slot of the tensor that block `block` works on, and its element range [*lo, *hi).
template <int NPTR> __device__ int list_slot(const tensor_list<NPTR> &l, int64_t block, int64_t *lo, int64_t *hi) {
  int k = 0;
  while (k + 1 < l.count && l.block_start[k + 1] <= block) k++;
  *lo = (block - l.block_start[k]) * CHUNK;
  *hi = *lo + CHUNK < l.numel[k] ? *lo + CHUNK : l.numel[k];
  return k;
}

// Packs the non-empty floating tensors into lists of one dtype and calls launch(dtype, list,
// first_block) for each; fill(list, slot, k) adds tensor k's pointers and coefficients.
template <int NPTR, typename Fill, typename Launch>
static int run_lists(int n, ts_tensor *const *tensors, const Fill &fill, const Launch &launch) {
  const int dtypes[4] = {TS_F32, TS_F64, TS_F16, TS_BF16};
  int64_t first_block = 0;
  for (int dt : dtypes) {
    tensor_list<NPTR> l = {};
    for (int k = 0; k < n; k++) {
      int64_t numel = ts_numel(tensors[k]);
      if (tensors[k]->dtype != dt || numel == 0) continue;
      int slot = l.count++;
      l.numel[slot] = numel;
      l.block_start[slot + 1] = l.block_start[slot] + (numel + CHUNK - 1) / CHUNK;
      fill(l, slot, k);
      if (l.count == LIST_MAX) {
        if (launch(dt, l, first_block)) return ts_last_status();
        first_block += l.block_start[l.count];
        l = {};
      }
    }
    if (l.count > 0) {
      if (launch(dt, l, first_block)) return ts_last_status();
      first_block += l.block_start[l.count];
    }
  }
  return TS_OK;
}

static int check_floating_list(const char *op, int n, ts_tensor *const *tensors, const char *what) {
  for (int k = 0; k < n; k++)
    if (!cuda_is_floating(tensors[k]->dtype))
      return ts_set_error(TS_ERR_DTYPE, "%s: %s %d is %s; the cuda kernel takes floating tensors", op, what, k,
                          ts_dtype_name(tensors[k]->dtype));
  return TS_OK;
}

// torch.lerp's two-sided formula (exact at both ends): start + w (end - start).
template <typename A> __device__ __forceinline__ A lerp_rn(A start, A end, A w) {
  return w < (A)0.5 ? cuda_add_rn(start, cuda_mul_rn(w, cuda_sub_rn(end, start))) : cuda_sub_rn(end, cuda_mul_rn(cuda_sub_rn(end, start), cuda_sub_rn((A)1, w)));
}

// ---- AdamW ----------------------------------------------------------------------------------------
// Per tensor (coef): 1 - lr wd, sqrt(1 - beta2^step), lr / (1 - beta1^step). Shared: below.
struct adamw_shared {
  double w1, beta2, w2, eps; // 1 - beta1, beta2, 1 - beta2, eps
};

// p = p (1 - lr wd); m = lerp(m, g, 1 - beta1); v = v beta2 + (1 - beta2) g g;
// p = p - step_size m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
template <int DT>
static __global__ void __launch_bounds__(LIST_THREADS) adamw_kernel(tensor_list<4> l, adamw_shared c) {
  using A = cuda_acc_t<DT>;
  using T = cuda_storage_t<DT>;
  int64_t lo, hi;
  int k = list_slot(l, blockIdx.x, &lo, &hi);
  T *p = (T *)l.ptr[0][k];
  const T *g = (const T *)l.ptr[1][k];
  A *m = (A *)l.ptr[2][k], *v = (A *)l.ptr[3][k];
  A decay = (A)l.coef[0][k], bc2_sqrt = (A)l.coef[1][k], step_size = (A)l.coef[2][k];
  A w1 = (A)c.w1, beta2 = (A)c.beta2, w2 = (A)c.w2, eps = (A)c.eps;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    A pv = cuda_mul_rn(cuda_load<DT>(p, i), decay), gv = cuda_load<DT>(g, i);
    A mi = lerp_rn(m[i], gv, w1);
    A vi = cuda_add_rn(cuda_mul_rn(v[i], beta2), cuda_mul_rn(cuda_mul_rn(w2, gv), gv));
    m[i] = mi;
    v[i] = vi;
    A denom = cuda_add_rn(cuda_div_rn(cuda_sqrt_rn(vi), bc2_sqrt), eps);
    cuda_store<DT>(p, i, cuda_sub_rn(pv, cuda_mul_rn(step_size, cuda_div_rn(mi, denom))));
  }
}

extern "C" int cuda_adamw(int n, ts_tensor *const *params, ts_tensor *const *grads, ts_tensor *const *exp_avg,
                          ts_tensor *const *exp_avg_sq, const double *lr, const double *weight_decay, double beta1,
                          double beta2, double eps, const int64_t *step) {
  const char *op = "adamw_step";
  if (n <= 0) return TS_OK;
  if (check_floating_list(op, n, params, "param")) return ts_last_status();
  cudaStream_t stream;
  if (cuda_stream_for(op, params[0]->device.index, &stream)) return ts_last_status();
  adamw_shared shared = {1.0 - beta1, beta2, 1.0 - beta2, eps};
  auto fill = [&](tensor_list<4> &l, int slot, int k) {
    double bc1 = 1.0 - pow(beta1, (double)step[k]), bc2 = 1.0 - pow(beta2, (double)step[k]);
    l.ptr[0][slot] = ts_elem_ptr(params[k]);
    l.ptr[1][slot] = ts_elem_ptr(grads[k]);
    l.ptr[2][slot] = ts_elem_ptr(exp_avg[k]);
    l.ptr[3][slot] = ts_elem_ptr(exp_avg_sq[k]);
    l.coef[0][slot] = 1.0 - lr[k] * weight_decay[k];
    l.coef[1][slot] = sqrt(bc2);
    l.coef[2][slot] = lr[k] / bc1;
  };
  auto launch = [&](int dtype, const tensor_list<4> &l, int64_t) -> int {
    return cuda_dispatch_floating(op, dtype, [&](auto tag) -> int {
      constexpr int DT = decltype(tag)::value;
      adamw_kernel<DT><<<(unsigned)l.block_start[l.count], LIST_THREADS, 0, stream>>>(l, shared);
      return cuda_launched(op);
    });
  };
  return run_lists<4>(n, params, fill, launch);
}

// ---- SGD ------------------------------------------------------------------------------------------
// Per tensor (coef): lr, weight decay, first step (1: the momentum buffer starts as d).
struct sgd_shared {
  double momentum, keep; // momentum, 1 - dampening
  int nesterov;
};

// d = g + wd p; with momentum, buf = first ? d : momentum buf + (1 - dampening) d, and
// d = nesterov ? d + momentum buf : buf; p = p - lr d.
template <int DT>
static __global__ void __launch_bounds__(LIST_THREADS) sgd_kernel(tensor_list<3> l, sgd_shared c) {
  using A = cuda_acc_t<DT>;
  using T = cuda_storage_t<DT>;
  int64_t lo, hi;
  int k = list_slot(l, blockIdx.x, &lo, &hi);
  T *p = (T *)l.ptr[0][k];
  const T *g = (const T *)l.ptr[1][k];
  A *buf = (A *)l.ptr[2][k];
  A lr = (A)l.coef[0][k], wd = (A)l.coef[1][k], momentum = (A)c.momentum, keep = (A)c.keep;
  bool use_wd = l.coef[1][k] != 0, use_momentum = c.momentum != 0, first = l.coef[2][k] != 0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    A pv = cuda_load<DT>(p, i), gv = cuda_load<DT>(g, i);
    A d = use_wd ? cuda_add_rn(gv, cuda_mul_rn(wd, pv)) : gv;
    if (use_momentum) {
      A b = first || !buf ? d : cuda_add_rn(cuda_mul_rn(buf[i], momentum), cuda_mul_rn(keep, d));
      if (buf) buf[i] = b;
      d = c.nesterov ? cuda_add_rn(d, cuda_mul_rn(momentum, b)) : b;
    }
    cuda_store<DT>(p, i, cuda_sub_rn(pv, cuda_mul_rn(lr, d)));
  }
}

extern "C" int cuda_sgd(int n, ts_tensor *const *params, ts_tensor *const *grads, ts_tensor *const *momentum_buffers,
                        const double *lr, const double *weight_decay, double momentum, double dampening, int nesterov,
                        const int *first_step) {
  const char *op = "sgd_step";
  if (n <= 0) return TS_OK;
  if (check_floating_list(op, n, params, "param")) return ts_last_status();
  cudaStream_t stream;
  if (cuda_stream_for(op, params[0]->device.index, &stream)) return ts_last_status();
  sgd_shared shared = {momentum, 1.0 - dampening, nesterov != 0};
  auto fill = [&](tensor_list<3> &l, int slot, int k) {
    l.ptr[0][slot] = ts_elem_ptr(params[k]);
    l.ptr[1][slot] = ts_elem_ptr(grads[k]);
    l.ptr[2][slot] = momentum_buffers && momentum_buffers[k] ? ts_elem_ptr(momentum_buffers[k]) : NULL;
    l.coef[0][slot] = lr[k];
    l.coef[1][slot] = weight_decay[k];
    l.coef[2][slot] = first_step && first_step[k] ? 1.0 : 0.0;
  };
  auto launch = [&](int dtype, const tensor_list<3> &l, int64_t) -> int {
    return cuda_dispatch_floating(op, dtype, [&](auto tag) -> int {
      constexpr int DT = decltype(tag)::value;
      sgd_kernel<DT><<<(unsigned)l.block_start[l.count], LIST_THREADS, 0, stream>>>(l, shared);
      return cuda_launched(op);
    });
  };
  return run_lists<3>(n, params, fill, launch);
}

// ---- total norm -----------------------------------------------------------------------------------
enum norm_kind { NORM_L1, NORM_L2, NORM_INF, NORM_POW };

// acc folded with |x| (a partial result when `partial`): sums for the p-norms, the max for
// infinity where a NaN wins and stays.
__device__ __forceinline__ double fold_abs(int kind, double p, double acc, double x) {
  double a = fabs(x);
  switch (kind) {
  case NORM_L1: return acc + a;
  case NORM_L2: return acc + a * a;
  case NORM_INF: return a > acc || a != a ? a : acc;
  default: return acc + pow(a, p);
  }
}

__device__ __forceinline__ double combine(int kind, double acc, double part) {
  return kind == NORM_INF ? (part > acc || part != part ? part : acc) : acc + part;
}

// A block's combine over its threads in a fixed tree order.
__device__ double block_combine(int kind, double v, double *scratch) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v = combine(kind, v, __shfl_xor_sync(0xffffffffu, v, o));
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? scratch[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) v = combine(kind, v, __shfl_xor_sync(0xffffffffu, v, o));
  }
  return v; // valid in thread 0
}

template <int DT>
static __global__ void __launch_bounds__(LIST_THREADS)
    norm_chunks_kernel(tensor_list<1> l, int kind, double p, double *partial) {
  __shared__ double scratch[32];
  int64_t lo, hi;
  int k = list_slot(l, blockIdx.x, &lo, &hi);
  const cuda_storage_t<DT> *x = (const cuda_storage_t<DT> *)l.ptr[0][k];
  double acc = 0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) acc = fold_abs(kind, p, acc, cuda_load_f64<DT>(x[i]));
  acc = block_combine(kind, acc, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

static __global__ void __launch_bounds__(1024) norm_total_kernel(int64_t count, int kind, const double *partial, double *out) {
  __shared__ double scratch[32];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) acc = combine(kind, acc, partial[i]);
  acc = block_combine(kind, acc, scratch);
  if (threadIdx.x == 0) *out = acc;
}

extern "C" int cuda_multi_norm(int n, ts_tensor *const *tensors, double p, double *out) {
  const char *op = "grad_norm";
  *out = 0;
  if (n <= 0) return TS_OK;
  if (check_floating_list(op, n, tensors, "tensor")) return ts_last_status();
  int kind = isinf(p) ? NORM_INF : p == 1 ? NORM_L1 : p == 2 ? NORM_L2 : NORM_POW;
  int64_t blocks = 0;
  for (int k = 0; k < n; k++) blocks += (ts_numel(tensors[k]) + CHUNK - 1) / CHUNK;
  if (blocks == 0) return TS_OK;
  int device = tensors[0]->device.index;
  cudaStream_t stream;
  if (cuda_stream_for(op, device, &stream)) return ts_last_status();
  cuda_scratch partial;
  if (partial.allocate(device, (size_t)(blocks + 1) * sizeof(double))) return ts_last_status();
  double *parts = partial.as<double>(), *total = parts + blocks;
  auto fill = [&](tensor_list<1> &l, int slot, int k) { l.ptr[0][slot] = ts_elem_ptr(tensors[k]); };
  auto launch = [&](int dtype, const tensor_list<1> &l, int64_t first_block) -> int {
    return cuda_dispatch_floating(op, dtype, [&](auto tag) -> int {
      constexpr int DT = decltype(tag)::value;
      norm_chunks_kernel<DT><<<(unsigned)l.block_start[l.count], LIST_THREADS, 0, stream>>>(l, kind, p, parts + first_block);
      return cuda_launched(op);
    });
  };
  if (run_lists<1>(n, tensors, fill, launch)) return ts_last_status();
  norm_total_kernel<<<1, 1024, 0, stream>>>(blocks, kind, parts, total);
  if (cuda_launched(op)) return ts_last_status();
  double acc = 0;
  if (cuda_copy_to_host(&acc, total, sizeof acc, device)) return ts_last_status();
  *out = kind == NORM_INF || kind == NORM_L1 ? acc : kind == NORM_L2 ? sqrt(acc) : pow(acc, 1.0 / p);
  return TS_OK;
}

// ---- scaling in place -------------------------------------------------------------------------------
template <int DT> static __global__ void __launch_bounds__(LIST_THREADS) scale_kernel(tensor_list<1> l, double factor) {
  using A = cuda_acc_t<DT>;
  int64_t lo, hi;
  int k = list_slot(l, blockIdx.x, &lo, &hi);
  cuda_storage_t<DT> *x = (cuda_storage_t<DT> *)l.ptr[0][k];
  A f = (A)factor;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) cuda_store<DT>(x, i, cuda_mul_rn(cuda_load<DT>(x, i), f));
}

extern "C" int cuda_multi_scale(int n, ts_tensor *const *tensors, double factor) {
  const char *op = "scale_";
  if (n <= 0) return TS_OK;
  if (check_floating_list(op, n, tensors, "tensor")) return ts_last_status();
  cudaStream_t stream;
  if (cuda_stream_for(op, tensors[0]->device.index, &stream)) return ts_last_status();
  auto fill = [&](tensor_list<1> &l, int slot, int k) { l.ptr[0][slot] = ts_elem_ptr(tensors[k]); };
  auto launch = [&](int dtype, const tensor_list<1> &l, int64_t) -> int {
    return cuda_dispatch_floating(op, dtype, [&](auto tag) -> int {
      constexpr int DT = decltype(tag)::value;
      scale_kernel<DT><<<(unsigned)l.block_start[l.count], LIST_THREADS, 0, stream>>>(l, factor);
      return cuda_launched(op);
    });
  };
  return run_lists<1>(n, tensors, fill, launch);
}

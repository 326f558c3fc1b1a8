// conv.cu — conv2d forward and backward on CUDA devices through cuDNN, with the semantics of
// kernels/cpu/conv.c (cross-correlation, any stride, padding, dilation and groups, optional bias).
//
// One cuDNN handle per device, created on first use and bound to the device's stream. As in
// cudnn.torch, the descriptors of a shape and the algorithm of each direction (forward, backward
// data, backward filter) are chosen once and cached: the algorithm is the first of cuDNN's
// heuristic ranking (cudnnGet*_v7) that is supported, fits MAX_WORKSPACE and uses an allowed math
// type. float32 is held to FMA kernels unless ts_cuda_set_allow_tf32 allows TF32 tensor cores;
// float16/bfloat16 may use tensor cores and accumulate in float32; float64 runs in float64.
// Workspaces come from the tessera allocator, ordered on the stream.
//
// cuDNN's 4-d descriptors count elements in int: a batch whose tensors exceed that goes through in
// chunks of samples (the weight gradient accumulates over the chunks). The bias is added, and its
// gradient summed (deterministically, in fixed chunks), by the kernels below rather than by cuDNN.
#include "nn.cuh"

#include <cudnn.h>

#include <array>
#include <climits>
#include <map>
#include <mutex>

constexpr size_t MAX_WORKSPACE = (size_t)1 << 30;

// ---- handles ------------------------------------------------------------------------------------
namespace {
struct dnn_device {
  std::once_flag once;
  cudnnStatus_t error;
  const char *failed_call;
  cudnnHandle_t handle;
};
dnn_device dnn_devices[CUDA_MAX_DEVICES];

void create_dnn(dnn_device *d, cudaStream_t stream) {
  d->failed_call = "cudnnCreate";
  d->error = cudnnCreate(&d->handle);
  if (d->error != CUDNN_STATUS_SUCCESS) return;
  d->failed_call = "cudnnSetStream";
  d->error = cudnnSetStream(d->handle, stream);
}
} // namespace

static int dnn_check(cudnnStatus_t st, const char *op, const char *call) {
  if (st == CUDNN_STATUS_SUCCESS) return TS_OK;
  return ts_set_error(st == CUDNN_STATUS_ALLOC_FAILED ? TS_ERR_MEMORY : TS_ERR_DEVICE, "%s: %s failed: %s", op, call,
                      cudnnGetErrorString(st));
}

static int dnn_for(const char *op, int device, cudaStream_t *stream, cudnnHandle_t *handle) {
  if (cuda_stream_for(op, device, stream)) return ts_last_status();
  dnn_device *d = &dnn_devices[device];
  std::call_once(d->once, create_dnn, d, *stream);
  if (d->error != CUDNN_STATUS_SUCCESS) return dnn_check(d->error, op, d->failed_call);
  *handle = d->handle;
  return TS_OK;
}

// ---- geometry -------------------------------------------------------------------------------------
namespace {
struct conv_geom {
  int dtype, device;
  int64_t n, c, h, w, o, cg, kh, kw, oh, ow;
  int64_t sh, sw, ph, pw, dh, dw, groups;
};
} // namespace

static conv_geom geometry_of(const ts_tensor *x, const ts_tensor *w, const ts_tensor *y, const int64_t stride[2],
                             const int64_t padding[2], const int64_t dilation[2], int64_t groups) {
  conv_geom q = {x->dtype, x->device.index, x->shape[0], x->shape[1], x->shape[2], x->shape[3], w->shape[0],
                 w->shape[1], w->shape[2], w->shape[3], y->shape[2], y->shape[3], stride[0], stride[1],
                 padding[0], padding[1], dilation[0], dilation[1], groups};
  return q;
}

// Samples per cuDNN call: as many as keep both activations within int, at least one.
static int chunk_samples(const char *op, const conv_geom &q, int64_t *chunk) {
  int64_t per_sample = q.c * q.h * q.w > q.o * q.oh * q.ow ? q.c * q.h * q.w : q.o * q.oh * q.ow;
  int64_t sizes[11] = {q.c, q.h, q.w, q.o, q.kh, q.kw, q.sh, q.sw, q.ph, q.pw, per_sample};
  for (int i = 0; i < 11; i++)
    if (sizes[i] > INT_MAX)
      return ts_set_error(TS_ERR_UNSUPPORTED, "%s: a size of %lld (per sample or per dim) exceeds what cuDNN accepts (%d)",
                          op, (long long)sizes[i], INT_MAX);
  if (q.o * q.cg * q.kh * q.kw > INT_MAX)
    return ts_set_error(TS_ERR_UNSUPPORTED, "%s: the weight has %lld elements, more than cuDNN accepts (%d)", op,
                        (long long)(q.o * q.cg * q.kh * q.kw), INT_MAX);
  int64_t fit = per_sample > 0 ? INT_MAX / per_sample : q.n;
  *chunk = fit < 1 ? 1 : fit < q.n ? fit : q.n;
  if (*chunk < 1) *chunk = 1;
  return TS_OK;
}

static cudnnDataType_t dnn_type(int dtype) {
  switch (dtype) {
  case TS_F64: return CUDNN_DATA_DOUBLE;
  case TS_F16: return CUDNN_DATA_HALF;
  case TS_BF16: return CUDNN_DATA_BFLOAT16;
  default: return CUDNN_DATA_FLOAT;
  }
}

// alpha and beta as cuDNN reads them: double for float64, float otherwise.
namespace {
struct dnn_scalars {
  float f[2] = {0.0f, 1.0f};
  double d[2] = {0.0, 1.0};
  bool f64;
  explicit dnn_scalars(int dtype) : f64(dtype == TS_F64) {}
  const void *zero() const { return f64 ? (const void *)&d[0] : (const void *)&f[0]; }
  const void *one() const { return f64 ? (const void *)&d[1] : (const void *)&f[1]; }
};
} // namespace

// ---- plans: descriptors and algorithms per shape -----------------------------------------------------
namespace {
enum direction { FORWARD, BACKWARD_DATA, BACKWARD_FILTER, DIRECTIONS };

struct conv_plan {
  cudnnTensorDescriptor_t x, y;
  cudnnFilterDescriptor_t w;
  cudnnConvolutionDescriptor_t conv[DIRECTIONS]; // one per direction: each keeps its algorithm's math type
  bool chosen[DIRECTIONS];
  int algo[DIRECTIONS];
  size_t workspace[DIRECTIONS];
};

using plan_key = std::array<int64_t, 18>;
std::mutex conv_mutex; // guards the cache; held for a whole call (a plan's descriptors are shared)
std::map<plan_key, conv_plan> conv_plans;

cudnnMathType_t requested_math(int dtype, bool tf32) {
  if (dtype == TS_F16 || dtype == TS_BF16) return CUDNN_TENSOR_OP_MATH;
  if (dtype == TS_F32 && !tf32) return CUDNN_FMA_MATH;
  return CUDNN_DEFAULT_MATH;
}

// float32 without TF32 accepts FMA kernels only; everything else what the descriptor allowed.
bool math_allowed(int dtype, bool tf32, cudnnMathType_t m) { return dtype != TS_F32 || tf32 || m == CUDNN_FMA_MATH; }
} // namespace

static int build_plan(const char *op, const conv_geom &q, int64_t n, bool tf32, conv_plan *p) {
  cudnnDataType_t type = dnn_type(q.dtype), compute = q.dtype == TS_F64 ? CUDNN_DATA_DOUBLE : CUDNN_DATA_FLOAT;
  *p = {};
  cudnnStatus_t st = cudnnCreateTensorDescriptor(&p->x);
  if (!st) st = cudnnCreateTensorDescriptor(&p->y);
  if (!st) st = cudnnCreateFilterDescriptor(&p->w);
  if (!st) st = cudnnSetTensor4dDescriptor(p->x, CUDNN_TENSOR_NCHW, type, (int)n, (int)q.c, (int)q.h, (int)q.w);
  if (!st) st = cudnnSetTensor4dDescriptor(p->y, CUDNN_TENSOR_NCHW, type, (int)n, (int)q.o, (int)q.oh, (int)q.ow);
  if (!st) st = cudnnSetFilter4dDescriptor(p->w, type, CUDNN_TENSOR_NCHW, (int)q.o, (int)q.cg, (int)q.kh, (int)q.kw);
  for (int d = 0; d < DIRECTIONS && !st; d++) {
    st = cudnnCreateConvolutionDescriptor(&p->conv[d]);
    if (!st)
      st = cudnnSetConvolution2dDescriptor(p->conv[d], (int)q.ph, (int)q.pw, (int)q.sh, (int)q.sw, (int)q.dh, (int)q.dw,
                                           CUDNN_CROSS_CORRELATION, compute);
    if (!st) st = cudnnSetConvolutionGroupCount(p->conv[d], (int)q.groups);
    if (!st) st = cudnnSetConvolutionMathType(p->conv[d], requested_math(q.dtype, tf32));
  }
  return dnn_check(st, op, "cuDNN descriptor setup");
}

// Picks the first supported, deterministic algorithm of the heuristic's ranking that fits and uses
// allowed math; `fallback` when none does. Sets the descriptor's math type to the algorithm's.
// Deterministic, so that a training step repeats bit for bit as on the CPU: cuDNN's other backward
// algorithms add partial sums with atomics, in an order that changes from run to run.
template <typename Perf, typename Rank, typename Size>
static int choose(const char *op, const conv_geom &q, bool tf32, conv_plan *p, int d, int fallback, Rank rank, Size size) {
  Perf perf[16];
  int returned = 0;
  if (dnn_check(rank(perf, 16, &returned), op, "cuDNN algorithm heuristic")) return ts_last_status();
  for (int i = 0; i < returned; i++) {
    if (perf[i].status != CUDNN_STATUS_SUCCESS || perf[i].determinism != CUDNN_DETERMINISTIC ||
        perf[i].memory > MAX_WORKSPACE || !math_allowed(q.dtype, tf32, perf[i].mathType))
      continue;
    p->algo[d] = (int)perf[i].algo;
    p->workspace[d] = perf[i].memory;
    p->chosen[d] = true;
    return dnn_check(cudnnSetConvolutionMathType(p->conv[d], perf[i].mathType), op, "cudnnSetConvolutionMathType");
  }
  p->algo[d] = fallback;
  if (dnn_check(size(fallback, &p->workspace[d]), op, "cuDNN workspace query")) return ts_last_status();
  p->chosen[d] = true;
  return TS_OK;
}

static int choose_algorithm(const char *op, cudnnHandle_t h, const conv_geom &q, bool tf32, conv_plan *p, int d) {
  if (p->chosen[d]) return TS_OK;
  cudnnConvolutionDescriptor_t conv = p->conv[d];
  switch (d) {
  case FORWARD:
    return choose<cudnnConvolutionFwdAlgoPerf_t>(
        op, q, tf32, p, d, CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        [&](cudnnConvolutionFwdAlgoPerf_t *perf, int count, int *returned) {
          return cudnnGetConvolutionForwardAlgorithm_v7(h, p->x, p->w, conv, p->y, count, returned, perf);
        },
        [&](int algo, size_t *bytes) {
          return cudnnGetConvolutionForwardWorkspaceSize(h, p->x, p->w, conv, p->y, (cudnnConvolutionFwdAlgo_t)algo, bytes);
        });
  case BACKWARD_DATA:
    return choose<cudnnConvolutionBwdDataAlgoPerf_t>(
        op, q, tf32, p, d, CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
        [&](cudnnConvolutionBwdDataAlgoPerf_t *perf, int count, int *returned) {
          return cudnnGetConvolutionBackwardDataAlgorithm_v7(h, p->w, p->y, conv, p->x, count, returned, perf);
        },
        [&](int algo, size_t *bytes) {
          return cudnnGetConvolutionBackwardDataWorkspaceSize(h, p->w, p->y, conv, p->x,
                                                              (cudnnConvolutionBwdDataAlgo_t)algo, bytes);
        });
  default:
    return choose<cudnnConvolutionBwdFilterAlgoPerf_t>(
        op, q, tf32, p, d, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
        [&](cudnnConvolutionBwdFilterAlgoPerf_t *perf, int count, int *returned) {
          return cudnnGetConvolutionBackwardFilterAlgorithm_v7(h, p->x, p->y, conv, p->w, count, returned, perf);
        },
        [&](int algo, size_t *bytes) {
          return cudnnGetConvolutionBackwardFilterWorkspaceSize(h, p->x, p->y, conv, p->w,
                                                                (cudnnConvolutionBwdFilterAlgo_t)algo, bytes);
        });
  }
}

// The plan of a chunk of n samples (made on first use); call with conv_mutex held.
static conv_plan *plan_for(const char *op, const conv_geom &q, int64_t n, bool tf32) {
  plan_key key = {q.device, q.dtype, tf32, n, q.c, q.h, q.w, q.o, q.cg, q.kh, q.kw, q.sh, q.sw, q.ph, q.pw, q.dh, q.dw,
                  q.groups};
  auto found = conv_plans.find(key);
  if (found != conv_plans.end()) return &found->second;
  conv_plan p;
  if (build_plan(op, q, n, tf32, &p)) return NULL;
  return &conv_plans.emplace(key, p).first->second;
}

// ---- the bias -----------------------------------------------------------------------------------
// Added and differentiated here rather than by cuDNN (whose bias routines do not take every dtype):
// out[n, o, :] (+)= b[o], and gb[o] = the sum of g [N, O, S] over samples and pixels.

// out = b per channel (add: out += b), in the accumulation type; out without b: zeros.
template <int DT>
static __global__ void bias_planes_kernel(int64_t total, int64_t plane, int64_t channels, const cuda_storage_t<DT> *b,
                                          cuda_storage_t<DT> *out, bool add) {
  using A = cuda_acc_t<DT>;
  CUDA_GRID_STRIDE(i, total) {
    A v = b ? cuda_load<DT>(b, i / plane % channels) : (A)0;
    cuda_store<DT>(out, i, add ? cuda_load<DT>(out, i) + v : v);
  }
}

static int bias_planes(const char *op, ts_tensor *out, const ts_tensor *b, bool add, cudaStream_t stream) {
  int64_t total = ts_numel(out);
  if (total == 0) return TS_OK;
  return cuda_dispatch_floating(op, out->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    bias_planes_kernel<DT><<<cuda_blocks(total), CUDA_THREADS, 0, stream>>>(
        total, out->shape[2] * out->shape[3], out->shape[1], cuda_data_or_null<DT>(b), cuda_data<DT>(out), add);
    return cuda_launched(op);
  });
}

// Channel blockIdx.x over the samples of chunk blockIdx.y: partial[chunk O + o]. Chunks of whole
// samples holding about 4096 values, at most 1024 chunks; combined per channel in order below.
constexpr int BIAS_BLOCK = 256;

template <int DT>
static __global__ void __launch_bounds__(BIAS_BLOCK)
    bias_grad_chunks_kernel(int64_t n, int64_t channels, int64_t plane, int64_t chunk_n, const cuda_storage_t<DT> *g,
                            cuda_acc_t<DT> *partial) {
  using A = cuda_acc_t<DT>;
  __shared__ A scratch[32];
  int64_t c = blockIdx.x, n0 = blockIdx.y * chunk_n, n1 = n0 + chunk_n < n ? n0 + chunk_n : n;
  int64_t len = n1 > n0 ? (n1 - n0) * plane : 0;
  A s = 0;
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) s += cuda_load<DT>(g, ((n0 + i / plane) * channels + c) * plane + i % plane);
  s = cuda_block_sum(s, scratch);
  if (threadIdx.x == 0) partial[blockIdx.y * channels + c] = s;
}

template <int DT>
static __global__ void bias_grad_total_kernel(int64_t channels, int64_t chunks, const cuda_acc_t<DT> *partial,
                                              cuda_storage_t<DT> *gb) {
  CUDA_GRID_STRIDE(c, channels) {
    cuda_acc_t<DT> s = 0;
    for (int64_t k = 0; k < chunks; k++) s += partial[k * channels + c];
    cuda_store<DT>(gb, c, s);
  }
}

static int bias_grad(const char *op, ts_tensor *gb, const ts_tensor *g, cudaStream_t stream) {
  int64_t n = g->shape[0], channels = g->shape[1], plane = g->shape[2] * g->shape[3];
  int64_t per = plane > 0 ? (4096 + plane - 1) / plane : (n > 0 ? n : 1);
  if (per < 1) per = 1;
  if ((n + per - 1) / per > 1024) per = (n + 1023) / 1024;
  int64_t chunks = n > 0 ? (n + per - 1) / per : 1;
  return cuda_dispatch_floating(op, g->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    using A = cuda_acc_t<DT>;
    cuda_scratch partial;
    if (partial.allocate(g->device.index, (size_t)(chunks * channels) * sizeof(A))) return ts_last_status();
    bias_grad_chunks_kernel<DT><<<dim3((unsigned)channels, (unsigned)chunks), BIAS_BLOCK, 0, stream>>>(
        n, channels, plane, per, cuda_data<DT>(g), partial.as<A>());
    if (cuda_launched(op)) return ts_last_status();
    bias_grad_total_kernel<DT><<<cuda_blocks(channels), CUDA_THREADS, 0, stream>>>(channels, chunks, partial.as<A>(),
                                                                                  cuda_data<DT>(gb));
    return cuda_launched(op);
  });
}

static int zero_if_wanted(ts_tensor *t) { return t && ts_numel(t) > 0 ? cuda_fill(t, 0) : TS_OK; }

// ---- entries ----------------------------------------------------------------------------------------
static char *sample_ptr(const ts_tensor *t, int64_t n0) {
  return ts_elem_ptr(t) + n0 * (t->stride[0] * (int64_t)ts_dtype_size(t->dtype));
}

extern "C" int cuda_conv2d(ts_tensor *out, const ts_tensor *x, const ts_tensor *w, const ts_tensor *b,
                           const int64_t stride[2], const int64_t padding[2], const int64_t dilation[2],
                           int64_t groups) {
  const char *op = "conv2d";
  const ts_tensor *all[4] = {x, out, w, b};
  if (cuda_check_floating_alike(op, all, 4)) return ts_last_status();
  conv_geom q = geometry_of(x, w, out, stride, padding, dilation, groups);
  cudaStream_t stream;
  cudnnHandle_t h;
  if (ts_numel(out) == 0) return TS_OK;
  if (dnn_for(op, q.device, &stream, &h)) return ts_last_status();
  if (q.cg == 0) return bias_planes(op, out, b, false, stream); // no input channels: an empty sum
  int64_t chunk;
  if (chunk_samples(op, q, &chunk)) return ts_last_status();
  bool tf32 = cuda_tf32_allowed();
  dnn_scalars s(q.dtype);
  std::lock_guard<std::mutex> lock(conv_mutex);
  for (int64_t n0 = 0; n0 < q.n; n0 += chunk) {
    int64_t nb = q.n - n0 < chunk ? q.n - n0 : chunk;
    conv_plan *p = plan_for(op, q, nb, tf32);
    if (!p || choose_algorithm(op, h, q, tf32, p, FORWARD)) return ts_last_status();
    cuda_scratch workspace;
    if (workspace.allocate(q.device, p->workspace[FORWARD])) return ts_last_status();
    if (dnn_check(cudnnConvolutionForward(h, s.one(), p->x, sample_ptr(x, n0), p->w, ts_elem_ptr(w), p->conv[FORWARD],
                                          (cudnnConvolutionFwdAlgo_t)p->algo[FORWARD], workspace.ptr,
                                          p->workspace[FORWARD], s.zero(), p->y, sample_ptr(out, n0)),
                  op, "cudnnConvolutionForward"))
      return ts_last_status();
  }
  return b ? bias_planes(op, out, b, true, stream) : TS_OK;
}

extern "C" int cuda_conv2d_backward(ts_tensor *gx, ts_tensor *gw, ts_tensor *gb, const ts_tensor *g, const ts_tensor *x,
                                    const ts_tensor *w, const int64_t stride[2], const int64_t padding[2],
                                    const int64_t dilation[2], int64_t groups) {
  const char *op = "conv2d backward";
  const ts_tensor *all[6] = {g, x, w, gx, gw, gb};
  if (cuda_check_floating_alike(op, all, 6)) return ts_last_status();
  conv_geom q = geometry_of(x, w, g, stride, padding, dilation, groups);
  if (ts_numel(g) == 0) { // no output: every gradient is an empty sum
    if (zero_if_wanted(gx) || zero_if_wanted(gw) || zero_if_wanted(gb)) return ts_last_status();
    return TS_OK;
  }
  cudaStream_t stream;
  cudnnHandle_t h;
  if (dnn_for(op, q.device, &stream, &h)) return ts_last_status();
  if (gb && ts_numel(gb) > 0 && bias_grad(op, gb, g, stream)) return ts_last_status();
  if (q.cg == 0) return TS_OK; // no input channels: gx and gw are empty
  int64_t chunk;
  if (chunk_samples(op, q, &chunk)) return ts_last_status();
  bool tf32 = cuda_tf32_allowed(), want_x = gx && ts_numel(gx) > 0, want_w = gw && ts_numel(gw) > 0;
  dnn_scalars s(q.dtype);
  std::lock_guard<std::mutex> lock(conv_mutex);
  for (int64_t n0 = 0; n0 < q.n; n0 += chunk) {
    int64_t nb = q.n - n0 < chunk ? q.n - n0 : chunk;
    const void *beta = n0 == 0 ? s.zero() : s.one(); // the weight gradient sums over the chunks
    conv_plan *p = plan_for(op, q, nb, tf32);
    if (!p) return ts_last_status();
    if (want_x) {
      cuda_scratch workspace;
      if (choose_algorithm(op, h, q, tf32, p, BACKWARD_DATA) ||
          workspace.allocate(q.device, p->workspace[BACKWARD_DATA]) ||
          dnn_check(cudnnConvolutionBackwardData(h, s.one(), p->w, ts_elem_ptr(w), p->y, sample_ptr(g, n0),
                                                 p->conv[BACKWARD_DATA], (cudnnConvolutionBwdDataAlgo_t)p->algo[BACKWARD_DATA],
                                                 workspace.ptr, p->workspace[BACKWARD_DATA], s.zero(), p->x,
                                                 sample_ptr(gx, n0)),
                    op, "cudnnConvolutionBackwardData"))
        return ts_last_status();
    }
    if (want_w) {
      cuda_scratch workspace;
      if (choose_algorithm(op, h, q, tf32, p, BACKWARD_FILTER) ||
          workspace.allocate(q.device, p->workspace[BACKWARD_FILTER]) ||
          dnn_check(cudnnConvolutionBackwardFilter(h, s.one(), p->x, sample_ptr(x, n0), p->y, sample_ptr(g, n0),
                                                   p->conv[BACKWARD_FILTER],
                                                   (cudnnConvolutionBwdFilterAlgo_t)p->algo[BACKWARD_FILTER],
                                                   workspace.ptr, p->workspace[BACKWARD_FILTER], beta, p->w,
                                                   ts_elem_ptr(gw)),
                    op, "cudnnConvolutionBackwardFilter"))
        return ts_last_status();
    }
  }
  return TS_OK;
}

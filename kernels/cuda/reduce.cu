// reduce.cu — reductions on CUDA devices: sum, mean, prod, amax, amin, all, any, var/std, p-norms
// and the arg reductions behind max/min/argmax/argmin, with the semantics of kernels/cpu/reduce.c:
// NaN propagates through max/min and the inf-norms, arg reductions take the first index on ties
// and a NaN over every number, integer sums and products wrap around, all/any read bool and uint8
// as stored. The runtime permutes the reduced dims last, converts to the compute dtype and hands a
// fresh contiguous output over the kept dims (empty reduced dims give the op's identity here;
// the runtime refuses them for ops that have none).
//
// Floats accumulate in double, whatever their storage (float16 and bfloat16 are read as stored),
// integers in int64. Every output's elements are folded by a group of threads:
//   rows     when the reduced elements of an output lie closer together in memory than
//            neighbouring outputs (the usual case: reduce along the last dim), lanes of a group
//            read consecutive elements; a group is a part of a warp (combined with warp shuffles)
//            or a whole block (shuffles, then one value per warp through shared memory);
//   columns  otherwise (sum over dim 0 of a row-major matrix): the 32 threads of a warp take 32
//            neighbouring outputs and up to 8 warps split each output's elements, combined
//            through shared memory.
// When a few outputs each have many elements (a full reduction), the reduced range is also cut
// into slices that separate blocks reduce into partial accumulators, which a second kernel
// combines per output in slice order: two passes, no atomics. Group sizes and slice counts depend
// only on the shapes, so a result is the same bits from run to run.
#include "loop.cuh"

#include <math.h>
#include <string.h>
#include <type_traits>

namespace {

// ---- geometry: which elements each output folds --------------------------------------------------
struct reduce_geom {
  int outer_ndim, inner_ndim; // >= 1 each, after coalescing
  bool outer_narrow, inner_narrow; // position arithmetic fits 32 bits
  int64_t outer_shape[TS_MAX_DIMS], outer_stride[TS_MAX_DIMS]; // elements
  int64_t inner_shape[TS_MAX_DIMS], inner_stride[TS_MAX_DIMS];
  int64_t outputs, count; // number of outputs, elements per output
};

int coalesce(int ndim, const int64_t *shape, const int64_t *stride, int64_t *out_shape, int64_t *out_stride) {
  int k = 0;
  for (int d = 0; d < ndim; d++) {
    if (shape[d] == 1) continue;
    if (k > 0 && out_stride[k - 1] == stride[d] * shape[d]) {
      out_shape[k - 1] *= shape[d];
      out_stride[k - 1] = stride[d];
    } else {
      out_shape[k] = shape[d];
      out_stride[k] = stride[d];
      k++;
    }
  }
  if (k == 0) {
    out_shape[0] = 1;
    out_stride[0] = 0;
    k = 1;
  }
  return k;
}

int64_t abs64(int64_t x) { return x < 0 ? -x : x; }

// The last nred dims of a are reduced. Their order does not matter to a reduction over all of
// them, so they are sorted by decreasing stride (a transposed input then reads along memory);
// arg reductions have one reduced dim, whose positions are the indices they report.
reduce_geom make_geom(const ts_tensor *a, int nred) {
  reduce_geom g;
  memset(&g, 0, sizeof g);
  int nout = a->ndim - nred;
  int64_t shape[TS_MAX_DIMS], stride[TS_MAX_DIMS];
  for (int d = 0; d < a->ndim; d++) {
    shape[d] = a->shape[d];
    stride[d] = a->stride[d];
  }
  for (int i = nout + 1; i < a->ndim; i++)
    for (int j = i; j > nout && abs64(stride[j]) > abs64(stride[j - 1]); j--) {
      int64_t sh = shape[j], st = stride[j];
      shape[j] = shape[j - 1];
      stride[j] = stride[j - 1];
      shape[j - 1] = sh;
      stride[j - 1] = st;
    }
  g.outer_ndim = coalesce(nout, shape, stride, g.outer_shape, g.outer_stride);
  g.inner_ndim = coalesce(nred, shape + nout, stride + nout, g.inner_shape, g.inner_stride);
  g.outputs = ts_shape_numel(nout, shape);
  g.count = ts_shape_numel(nred, shape + nout);
  g.outer_narrow = g.outputs <= (int64_t)UINT32_MAX;
  g.inner_narrow = g.count <= (int64_t)UINT32_MAX;
  return g;
}

// Offset (elements) of position i over dims given innermost last; I is the index arithmetic type.
template <typename I>
__device__ __forceinline__ int64_t dims_offset(int ndim, const int64_t *shape, const int64_t *stride, I i) {
  int64_t off = 0;
  for (int d = ndim - 1; d > 0; d--) {
    I size = (I)shape[d];
    off += (int64_t)(i % size) * stride[d];
    i /= size;
  }
  return off + (int64_t)i * stride[0];
}

__device__ __forceinline__ int64_t outer_offset(const reduce_geom &g, int64_t o) {
  if (g.outer_ndim == 1) return o * g.outer_stride[0];
  return g.outer_narrow ? dims_offset<uint32_t>(g.outer_ndim, g.outer_shape, g.outer_stride, (uint32_t)o)
                        : dims_offset<int64_t>(g.outer_ndim, g.outer_shape, g.outer_stride, o);
}

__device__ __forceinline__ int64_t inner_offset(const reduce_geom &g, int64_t k) {
  if (g.inner_ndim == 1) return k * g.inner_stride[0];
  return g.inner_narrow ? dims_offset<uint32_t>(g.inner_ndim, g.inner_shape, g.inner_stride, (uint32_t)k)
                        : dims_offset<int64_t>(g.inner_ndim, g.inner_shape, g.inner_stride, k);
}

// Start of slice s when n positions are cut into `parts` near-equal slices (no overflow).
__host__ __device__ __forceinline__ int64_t slice_start(int64_t n, int64_t parts, int64_t s) {
  return n / parts * s + n % parts * s / parts;
}

// ---- values: floats are read as double, integers and bytes as int64 ------------------------------
template <int DI> using value_t = typename std::conditional<cuda_is_floating(DI), double, int64_t>::type;

template <int DI> __device__ __forceinline__ value_t<DI> load_value(cuda_storage_t<DI> v) {
  if constexpr (cuda_is_floating(DI)) return cuda_load_f64<DI>(v);
  else return (int64_t)v; // int64, or a bool/uint8 byte (only all/any read those)
}

__device__ __forceinline__ double nan_max(double m, double x) { return x > m || x != x ? x : m; }
__device__ __forceinline__ double nan_min(double m, double x) { return x < m || x != x ? x : m; }
__device__ __forceinline__ int64_t wrap_add(int64_t x, int64_t y) { return (int64_t)((uint64_t)x + (uint64_t)y); }
__device__ __forceinline__ int64_t wrap_mul(int64_t x, int64_t y) { return (int64_t)((uint64_t)x * (uint64_t)y); }

// ---- reducers ------------------------------------------------------------------------------------
// acc: the accumulator; identity(); step(acc, value, position) folds one element; combine(a, b)
// merges two accumulators (the same result in either order, up to rounding); finish writes output
// o: its value into `values` (which may be NULL for arg reductions) and index into `indices`.
template <typename V> struct sum_op {
  using acc = V;
  __device__ acc identity() const { return 0; }
  __device__ acc step(acc a, V x, int64_t) const { return combine(a, x); }
  __device__ acc combine(acc a, acc b) const {
    if constexpr (std::is_same<V, double>::value) return a + b;
    else return wrap_add(a, b);
  }
  template <int DO> __device__ void finish(acc a, cuda_storage_t<DO> *values, int64_t *, int64_t o) const {
    if constexpr (std::is_same<V, double>::value) values[o] = cuda_store_f64<DO>(a);
    else values[o] = cuda_store_i64<DO>(a);
  }
};

struct mean_op : sum_op<double> {
  double count;
  template <int DO> __device__ void finish(acc a, cuda_storage_t<DO> *values, int64_t *, int64_t o) const {
    values[o] = cuda_store_f64<DO>(a / count);
  }
};

template <typename V> struct prod_op {
  using acc = V;
  __device__ acc identity() const { return 1; }
  __device__ acc step(acc a, V x, int64_t) const { return combine(a, x); }
  __device__ acc combine(acc a, acc b) const {
    if constexpr (std::is_same<V, double>::value) return a * b;
    else return wrap_mul(a, b);
  }
  template <int DO> __device__ void finish(acc a, cuda_storage_t<DO> *values, int64_t *, int64_t o) const {
    if constexpr (std::is_same<V, double>::value) values[o] = cuda_store_f64<DO>(a);
    else values[o] = cuda_store_i64<DO>(a);
  }
};

// amax (largest) and amin: NaN wins and stays.
template <typename V, bool LARGEST> struct extreme_op {
  using acc = V;
  __device__ acc identity() const {
    if constexpr (std::is_same<V, double>::value) return LARGEST ? -INFINITY : INFINITY;
    else return LARGEST ? INT64_MIN : INT64_MAX;
  }
  __device__ acc step(acc a, V x, int64_t) const { return combine(a, x); }
  __device__ acc combine(acc a, acc b) const {
    if constexpr (std::is_same<V, double>::value) return LARGEST ? nan_max(a, b) : nan_min(a, b);
    else return LARGEST ? (b > a ? b : a) : (b < a ? b : a);
  }
  template <int DO> __device__ void finish(acc a, cuda_storage_t<DO> *values, int64_t *, int64_t o) const {
    if constexpr (std::is_same<V, double>::value) values[o] = cuda_store_f64<DO>(a);
    else values[o] = cuda_store_i64<DO>(a);
  }
};

// all (ALL = true) and any: a flag; the output is bool.
template <typename V, bool ALL> struct logical_op {
  using acc = int;
  __device__ acc identity() const { return ALL ? 1 : 0; }
  __device__ acc step(acc a, V x, int64_t) const { return ALL ? a & (x != 0) : a | (x != 0); }
  __device__ acc combine(acc a, acc b) const { return ALL ? a & b : a | b; }
  template <int DO> __device__ void finish(acc a, cuda_storage_t<DO> *values, int64_t *, int64_t o) const {
    values[o] = a != 0;
  }
};

// var/std: Welford's running mean and sum of squared deviations, merged by Chan et al.'s formula.
struct var_acc {
  double mean, m2;
  int64_t n;
};
struct var_op {
  using acc = var_acc;
  int64_t correction;
  bool take_sqrt;
  __device__ acc identity() const { return {0, 0, 0}; }
  __device__ acc step(acc a, double x, int64_t) const {
    a.n += 1;
    double delta = x - a.mean;
    a.mean += delta / (double)a.n;
    a.m2 += delta * (x - a.mean);
    return a;
  }
  __device__ acc combine(acc a, acc b) const {
    if (b.n == 0) return a;
    if (a.n == 0) return b;
    int64_t n = a.n + b.n;
    double delta = b.mean - a.mean;
    acc r;
    r.n = n;
    r.mean = a.mean + delta * ((double)b.n / (double)n);
    r.m2 = a.m2 + b.m2 + delta * delta * ((double)a.n * (double)b.n / (double)n);
    return r;
  }
  template <int DO> __device__ void finish(acc a, cuda_storage_t<DO> *values, int64_t *, int64_t o) const {
    // PyTorch's divisor: max(0, n - correction); 0/0 gives NaN, x/0 gives inf
    double divisor = a.n - correction > 0 ? (double)(a.n - correction) : 0.0;
    double f = a.m2 / divisor;
    values[o] = cuda_store_f64<DO>(take_sqrt ? sqrt(f) : f);
  }
};

// p-norms, one reducer per family of p, as on the CPU.
enum norm_kind { NORM_COUNT, NORM_ABS, NORM_SQ, NORM_MAX, NORM_MIN, NORM_POW };
template <norm_kind KIND> struct norm_op {
  using acc = double;
  double p;
  __device__ acc identity() const { return KIND == NORM_MIN ? INFINITY : 0.0; }
  __device__ acc step(acc a, double x, int64_t) const {
    switch (KIND) {
    case NORM_COUNT: return a + (x != 0);
    case NORM_ABS: return a + fabs(x);
    case NORM_SQ: return a + x * x;
    case NORM_MAX: return nan_max(a, fabs(x));
    case NORM_MIN: return nan_min(a, fabs(x));
    default: return a + pow(fabs(x), p);
    }
  }
  __device__ acc combine(acc a, acc b) const {
    if (KIND == NORM_MAX) return nan_max(a, b);
    if (KIND == NORM_MIN) return nan_min(a, b);
    return a + b;
  }
  template <int DO> __device__ void finish(acc a, cuda_storage_t<DO> *values, int64_t *, int64_t o) const {
    double f = KIND == NORM_SQ ? sqrt(a) : KIND == NORM_POW ? pow(a, 1.0 / p) : a;
    values[o] = cuda_store_f64<DO>(f);
  }
};

// argmax (LARGEST) and argmin: the extreme and its position; ties go to the lower position and a
// NaN beats every number, so the first extreme (the first NaN) wins whatever the combining order.
template <typename V> struct arg_acc {
  V v;
  int64_t i; // -1 before any element
};
template <typename V, bool LARGEST> struct arg_op {
  using acc = arg_acc<V>;
  __device__ acc identity() const { return {V(0), -1}; }
  __device__ acc step(acc a, V x, int64_t k) const { return combine(a, acc{x, k}); }
  __device__ acc combine(acc a, acc b) const {
    if (b.i < 0) return a;
    if (a.i < 0) return b;
    if constexpr (std::is_same<V, double>::value) {
      bool a_nan = a.v != a.v, b_nan = b.v != b.v;
      if (a_nan || b_nan) return a_nan && b_nan ? (a.i < b.i ? a : b) : (a_nan ? a : b);
    }
    if (LARGEST ? b.v > a.v : b.v < a.v) return b;
    if (LARGEST ? a.v > b.v : a.v < b.v) return a;
    return a.i < b.i ? a : b;
  }
  template <int DO> __device__ void finish(acc a, cuda_storage_t<DO> *values, int64_t *indices, int64_t o) const {
    if (values) {
      if constexpr (std::is_same<V, double>::value) values[o] = cuda_store_f64<DO>(a.v);
      else values[o] = cuda_store_i64<DO>(a.v);
    }
    indices[o] = a.i;
  }
};

// ---- combining within a group of threads -----------------------------------------------------------
// Any accumulator moves through a shuffle as 32-bit words.
template <typename T> __device__ __forceinline__ T shfl_down(T v, int offset, int width) {
  static_assert(sizeof(T) % 4 == 0, "accumulators are made of 32-bit words");
  constexpr int W = sizeof(T) / 4;
  uint32_t w[W];
  memcpy(w, &v, sizeof v);
#pragma unroll
  for (int i = 0; i < W; i++) w[i] = __shfl_down_sync(0xffffffffu, w[i], offset, width);
  memcpy(&v, w, sizeof v);
  return v;
}

// Tree over `width` consecutive lanes (a power of two <= 32); lane 0 of each group gets the result.
// Every lane of the warp must call it.
template <typename Op> __device__ typename Op::acc warp_combine(const Op &op, typename Op::acc a, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) a = op.combine(a, shfl_down(a, offset, width));
  return a;
}

// Tree over the whole block; thread 0 gets the result. Every thread must call it.
template <typename Op> __device__ typename Op::acc block_combine(const Op &op, typename Op::acc a) {
  using acc = typename Op::acc;
  __shared__ alignas(16) unsigned char raw[32 * sizeof(acc)];
  acc *per_warp = reinterpret_cast<acc *>(raw);
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  a = warp_combine(op, a, 32);
  if (lane == 0) per_warp[warp] = a;
  __syncthreads();
  if (warp == 0) a = warp_combine(op, lane < warps ? per_warp[lane] : op.identity(), 32);
  __syncthreads(); // per_warp is reused by the block's next tile
  return a;
}

// Writes output o's accumulator: finished, or as slice s's partial when the range is sliced.
template <int DO, typename Op> struct emitter {
  cuda_storage_t<DO> *values;
  int64_t *indices;
  typename Op::acc *partials; // NULL: one slice, finish directly
  int64_t outputs;
  __device__ void operator()(const Op &op, typename Op::acc a, int64_t o, int64_t s) const {
    if (partials) partials[s * outputs + o] = a;
    else op.template finish<DO>(a, values, indices, o);
  }
};

// ---- kernels -----------------------------------------------------------------------------------------
// Rows: groups of `group` lanes (a power of two up to 32, or the whole block) fold one output
// each, lanes reading every group-th element of the output's slice blockIdx.y.
template <int DI, int DO, typename Op>
__global__ void reduce_rows_kernel(reduce_geom g, const cuda_storage_t<DI> *in, Op op, int group,
                                   emitter<DO, Op> emit) {
  int lane = threadIdx.x % group, slot = threadIdx.x / group, per_block = blockDim.x / group;
  int64_t s = blockIdx.y, slices = gridDim.y;
  int64_t begin = slice_start(g.count, slices, s), end = slice_start(g.count, slices, s + 1);
  for (int64_t tile = blockIdx.x; tile * per_block < g.outputs; tile += gridDim.x) { // uniform per block
    int64_t o = tile * per_block + slot;
    typename Op::acc a = op.identity();
    if (o < g.outputs) {
      const cuda_storage_t<DI> *base = in + outer_offset(g, o);
      for (int64_t k = begin + lane; k < end; k += group) a = op.step(a, load_value<DI>(base[inner_offset(g, k)]), k);
    }
    a = group <= 32 ? warp_combine(op, a, group) : block_combine(op, a);
    if (lane == 0 && o < g.outputs) emit(op, a, o, s);
  }
}

// Columns: blockDim (32, lanes): threadIdx.x picks one of 32 neighbouring outputs, threadIdx.y
// one of `lanes` interleaved parts of its slice; the parts meet in shared memory.
constexpr int COLUMN_TILE = 32, MAX_COLUMN_LANES = 8;

template <int DI, int DO, typename Op>
__global__ void reduce_columns_kernel(reduce_geom g, const cuda_storage_t<DI> *in, Op op, emitter<DO, Op> emit) {
  using acc = typename Op::acc;
  __shared__ alignas(16) unsigned char raw[COLUMN_TILE * MAX_COLUMN_LANES * sizeof(acc)];
  acc *parts = reinterpret_cast<acc *>(raw);
  int tx = threadIdx.x, ty = threadIdx.y, lanes = blockDim.y;
  int64_t s = blockIdx.y, slices = gridDim.y;
  int64_t begin = slice_start(g.count, slices, s), end = slice_start(g.count, slices, s + 1);
  for (int64_t tile = blockIdx.x; tile * COLUMN_TILE < g.outputs; tile += gridDim.x) { // uniform per block
    int64_t o = tile * COLUMN_TILE + tx;
    acc a = op.identity();
    if (o < g.outputs) {
      const cuda_storage_t<DI> *base = in + outer_offset(g, o);
      for (int64_t k = begin + ty; k < end; k += lanes) a = op.step(a, load_value<DI>(base[inner_offset(g, k)]), k);
    }
    if (lanes > 1) {
      parts[ty * COLUMN_TILE + tx] = a;
      __syncthreads();
      if (ty == 0)
        for (int r = 1; r < lanes; r++) a = op.combine(a, parts[r * COLUMN_TILE + tx]);
      __syncthreads();
    }
    if (ty == 0 && o < g.outputs) emit(op, a, o, s);
  }
}

// Second pass of a sliced reduction: each output combines its slices in order and finishes.
template <int DO, typename Op>
__global__ void reduce_partials_kernel(int64_t outputs, int64_t slices, const typename Op::acc *partials, Op op,
                                       cuda_storage_t<DO> *values, int64_t *indices) {
  CUDA_GRID_STRIDE(o, outputs) {
    typename Op::acc a = partials[o];
    for (int64_t s = 1; s < slices; s++) a = op.combine(a, partials[s * outputs + o]);
    op.template finish<DO>(a, values, indices, o);
  }
}

// ---- launching ---------------------------------------------------------------------------------------
struct launch_plan {
  bool columns;
  int group;       // rows: lanes per output (1..32, or CUDA_THREADS for a whole block)
  int lanes;       // columns: parts per output (1..8)
  int64_t tiles;   // groups of outputs (rows: per block; columns: 32 per block)
  int64_t slices;  // parts of the reduced range reduced by separate blocks
};

int64_t next_pow2(int64_t n) {
  int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Shapes alone decide, so that the same reduction always combines in the same order.
launch_plan plan_launch(const reduce_geom &g) {
  launch_plan p = {};
  int64_t m = g.outputs, k = g.count;
  p.slices = 1;
  p.columns = m > 1 && k > 1 && abs64(g.outer_stride[g.outer_ndim - 1]) < abs64(g.inner_stride[g.inner_ndim - 1]);
  if (p.columns) {
    p.lanes = (int)(k < MAX_COLUMN_LANES ? next_pow2(k) : MAX_COLUMN_LANES);
    p.tiles = ceil_div(m, COLUMN_TILE);
    if (p.tiles < 512 && k >= 4096) { // too few blocks to fill the device: slice the range too
      p.slices = ceil_div(512, p.tiles);
      if (p.slices > k / 2048) p.slices = k / 2048;
    }
    return p;
  }
  if (k <= 32) {
    p.group = (int)next_pow2(k > 0 ? k : 1);
  } else if (k >= 1024 && m <= 4096) { // a block per output, and slices when there are few outputs
    p.group = CUDA_THREADS;
    if (m < 1024 && k >= 16384) {
      p.slices = ceil_div(1024, m);
      if (p.slices > k / 8192) p.slices = k / 8192;
    }
  } else {
    p.group = 32;
  }
  p.tiles = ceil_div(m, CUDA_THREADS / p.group);
  return p;
}

template <int DI, int DO, typename Op>
int launch_reduction(const char *name, ts_tensor *values, ts_tensor *indices, const ts_tensor *a, int nred, Op op) {
  using acc = typename Op::acc;
  reduce_geom g = make_geom(a, nred);
  if (g.outputs == 0) return TS_OK;
  cudaStream_t stream;
  int device = a->device.index;
  if (cuda_stream_for(name, device, &stream)) return ts_last_status();
  launch_plan p = plan_launch(g);
  acc *partials = NULL;
  if (p.slices > 1 && !(partials = (acc *)cuda_alloc((size_t)(p.slices * g.outputs) * sizeof(acc), device)))
    return ts_last_status();
  emitter<DO, Op> emit = {cuda_data_or_null<DO>(values), indices ? (int64_t *)ts_elem_ptr(indices) : NULL,
                          partials, g.outputs};
  const cuda_storage_t<DI> *in = cuda_data<DI>(a);
  dim3 grid((unsigned)(p.tiles < CUDA_MAX_BLOCKS ? p.tiles : CUDA_MAX_BLOCKS), (unsigned)p.slices);
  if (p.columns) reduce_columns_kernel<DI, DO, Op><<<grid, dim3(COLUMN_TILE, p.lanes), 0, stream>>>(g, in, op, emit);
  else reduce_rows_kernel<DI, DO, Op><<<grid, CUDA_THREADS, 0, stream>>>(g, in, op, p.group, emit);
  int st = cuda_check(cudaGetLastError(), name);
  if (!st && partials) {
    reduce_partials_kernel<DO, Op><<<cuda_blocks(g.outputs), CUDA_THREADS, 0, stream>>>(g.outputs, p.slices, partials, op,
                                                                                       emit.values, emit.indices);
    st = cuda_check(cudaGetLastError(), name);
  }
  cuda_free(partials, 0, device); // stream-ordered: the next user of the block runs after these kernels
  return st;
}

// ---- dtype checks and dispatch -----------------------------------------------------------------------
int wrong_dtypes(const char *name, const ts_tensor *out, const ts_tensor *a) {
  return ts_set_error(TS_ERR_DTYPE, "%s: the cuda kernel does not take %s input into a %s output", name,
                      ts_dtype_name(a->dtype), out ? ts_dtype_name(out->dtype) : "(no)");
}

// Calls f(tag) for a floating input dtype, or for int64 too when `integers`.
template <typename F> int dispatch_input(const char *name, const ts_tensor *out, const ts_tensor *a, bool integers, F &&f) {
  switch (a->dtype) {
  case TS_F32: return f(cuda_dtype_tag<TS_F32>{});
  case TS_F64: return f(cuda_dtype_tag<TS_F64>{});
  case TS_F16: return f(cuda_dtype_tag<TS_F16>{});
  case TS_BF16: return f(cuda_dtype_tag<TS_BF16>{});
  case TS_I64:
    if (integers) return f(cuda_dtype_tag<TS_I64>{});
    return wrong_dtypes(name, out, a);
  default: return wrong_dtypes(name, out, a);
  }
}

template <bool ALL> int run_logical(const char *name, ts_tensor *out, const ts_tensor *a, int nred) {
  if (out->dtype != TS_BOOL) return wrong_dtypes(name, out, a);
  auto run = [&](auto tag) {
    constexpr int DI = decltype(tag)::value;
    return launch_reduction<DI, TS_BOOL>(name, out, NULL, a, nred, logical_op<value_t<DI>, ALL>{});
  };
  switch (a->dtype) { // bool and uint8 are read as stored, like the CPU's byte kernels
  case TS_BOOL: return run(cuda_dtype_tag<TS_BOOL>{});
  case TS_U8: return run(cuda_dtype_tag<TS_U8>{});
  default: return dispatch_input(name, out, a, true, run);
  }
}
} // namespace

extern "C" int cuda_reduce(int op, ts_tensor *out, const ts_tensor *a, int nred) {
  static const char *const names[TS_NUM_REDUCE_OPS] = {"sum", "mean", "prod", "amax", "amin", "all", "any"};
  if (op < 0 || op >= TS_NUM_REDUCE_OPS) return ts_set_error(TS_ERR_ARG, "reduce: invalid op %d", op);
  const char *name = names[op];
  if (op == TS_ALL) return run_logical<true>(name, out, a, nred);
  if (op == TS_ANY) return run_logical<false>(name, out, a, nred);
  if (out->dtype != a->dtype) return wrong_dtypes(name, out, a);
  int64_t count = ts_shape_numel(nred, a->shape + a->ndim - nred);
  return dispatch_input(name, out, a, op != TS_MEAN, [&](auto tag) {
    constexpr int D = decltype(tag)::value;
    using V = value_t<D>;
    switch (op) {
    case TS_SUM: return launch_reduction<D, D>(name, out, NULL, a, nred, sum_op<V>{});
    case TS_PROD: return launch_reduction<D, D>(name, out, NULL, a, nred, prod_op<V>{});
    case TS_AMAX: return launch_reduction<D, D>(name, out, NULL, a, nred, extreme_op<V, true>{});
    case TS_AMIN: return launch_reduction<D, D>(name, out, NULL, a, nred, extreme_op<V, false>{});
    default: // TS_MEAN: floating only (dispatch_input refused int64)
      if constexpr (std::is_same<V, double>::value) {
        mean_op m;
        m.count = (double)count;
        return launch_reduction<D, D>(name, out, NULL, a, nred, m);
      } else {
        return wrong_dtypes(name, out, a);
      }
    }
  });
}

extern "C" int cuda_var(ts_tensor *out, const ts_tensor *a, int nred, int64_t correction, int take_sqrt) {
  const char *name = take_sqrt ? "std" : "var";
  if (out->dtype != a->dtype) return wrong_dtypes(name, out, a);
  return dispatch_input(name, out, a, false, [&](auto tag) {
    constexpr int D = decltype(tag)::value;
    return launch_reduction<D, D>(name, out, NULL, a, nred, var_op{correction, take_sqrt != 0});
  });
}

extern "C" int cuda_norm(ts_tensor *out, const ts_tensor *a, int nred, double p) {
  if (out->dtype != a->dtype) return wrong_dtypes("norm", out, a);
  return dispatch_input("norm", out, a, false, [&](auto tag) {
    constexpr int D = decltype(tag)::value;
    if (p == 0) return launch_reduction<D, D>("norm", out, NULL, a, nred, norm_op<NORM_COUNT>{p});
    if (p == 1) return launch_reduction<D, D>("norm", out, NULL, a, nred, norm_op<NORM_ABS>{p});
    if (p == 2) return launch_reduction<D, D>("norm", out, NULL, a, nred, norm_op<NORM_SQ>{p});
    if (p == INFINITY) return launch_reduction<D, D>("norm", out, NULL, a, nred, norm_op<NORM_MAX>{p});
    if (p == -INFINITY) return launch_reduction<D, D>("norm", out, NULL, a, nred, norm_op<NORM_MIN>{p});
    return launch_reduction<D, D>("norm", out, NULL, a, nred, norm_op<NORM_POW>{p});
  });
}

extern "C" int cuda_arg_reduce(ts_tensor *values, ts_tensor *indices, const ts_tensor *a, int largest) {
  const char *name = largest ? "argmax" : "argmin";
  if ((values && values->dtype != a->dtype) || indices->dtype != TS_I64) return wrong_dtypes(name, values, a);
  int nred = a->ndim > 0 ? 1 : 0;
  return dispatch_input(name, values, a, true, [&](auto tag) {
    constexpr int D = decltype(tag)::value;
    using V = value_t<D>;
    if (largest) return launch_reduction<D, D>(name, values, indices, a, nred, arg_op<V, true>{});
    return launch_reduction<D, D>(name, values, indices, a, nred, arg_op<V, false>{});
  });
}

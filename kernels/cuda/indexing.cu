// indexing.cu — index_select, gather, scatter, masked_fill, nonzero and advanced indexing (index,
// index_put) on CUDA devices, with the semantics of kernels/cpu/indexing.c.
//
// Indices arrive as int64, range-checked and wrapped by the runtime. Kernels that only move
// values work for every dtype by element size; the accumulating ones (scatter add, index_put with
// accumulate) get the compute dtype (float16/bfloat16 add in float, as the CPU's float32 compute).
//
// Writes that may reach one element from several places follow the CPU's sequential order
// exactly, so results are deterministic and equal to the CPU's:
//   replace     the last write in row-major order wins: every write claims its target with an
//               atomic max of its row-major number, then only the winner stores;
//   accumulate  the (target, write number) pairs are radix-sorted by target (stably, so each
//               target's writes stay in row-major order) and one thread per target adds them in
//               that order, starting from the target's old value: the CPU's sums, bit for bit.
//               No floating-point atomics; a target that receives very many writes is summed by
//               one thread.
#include "loop.cuh"

extern "C" {
#include "../cpu/cpu.h" // cpu_store_f64: the fill value's bytes are worked out on the host, as the CPU does
}

#include <cub/device/device_select.cuh>
#include <string.h>
#include <thrust/iterator/counting_iterator.h>

namespace {

// ---- where each write or read goes ---------------------------------------------------------------
// Both geometries number their items row-major over a shape of at most TS_MAX_DIMS dims and give
// each item two element offsets: `ta` in the indexed tensor a and `to` in the other operand (the
// output of a read, the source of a write). Loops over dims run to the compile-time maximum so
// that every per-dim value stays in registers.

// Along one dim (index_select, gather, scatter): the item at coordinates c reaches a at c with
// dim replaced by index[c] (index_select sees its 1-D index through strides that are 0 except
// along dim).
struct dim_geom {
  int ndim;
  bool narrow; // item numbers fit 32 bits: cheaper division
  int64_t shape[TS_MAX_DIMS];
  int64_t a_stride[TS_MAX_DIMS];     // 0 at dim
  int64_t other_stride[TS_MAX_DIMS];
  int64_t index_stride[TS_MAX_DIMS];
  int64_t a_dim_stride;              // a's stride along dim (0 for a 0-d a)
  const int64_t *index;

  template <typename I> __device__ void locate_as(I q, int64_t &ta, int64_t &to) const {
    int64_t oa = 0, oo = 0, oi = 0;
#pragma unroll
    for (int d = TS_MAX_DIMS - 1; d >= 0; d--) {
      if (d >= ndim) continue;
      I size = (I)shape[d], c = q % size;
      q /= size;
      oa += (int64_t)c * a_stride[d];
      oo += (int64_t)c * other_stride[d];
      oi += (int64_t)c * index_stride[d];
    }
    ta = oa + index[oi] * a_dim_stride;
    to = oo;
  }
  __device__ void locate(int64_t q, int64_t &ta, int64_t &to) const {
    if (narrow) locate_as<uint32_t>((uint32_t)q, ta, to);
    else locate_as<int64_t>(q, ta, to);
  }
};

// Advanced indexing: items run over the indexed shape, the broadcast index shape (nd dims) then
// the dims of a no index covers. Index k picks a's coordinate along dim k.
struct advanced_geom {
  int n, nd, ndim;
  bool narrow;
  int64_t shape[TS_MAX_DIMS];
  int64_t other_stride[TS_MAX_DIMS];
  int64_t rest_stride[TS_MAX_DIMS];               // a's strides for dims >= nd of the shape, else 0
  int64_t a_index_stride[TS_MAX_DIMS];            // a's stride along indexed dim k
  int64_t idx_stride[TS_MAX_DIMS][TS_MAX_DIMS];   // index k's strides over the shape (0 beyond nd)
  const int64_t *idx[TS_MAX_DIMS];

  template <typename I> __device__ void locate_as(I q, int64_t &ta, int64_t &to) const {
    int64_t oa = 0, oo = 0, oi[TS_MAX_DIMS] = {0};
#pragma unroll
    for (int d = TS_MAX_DIMS - 1; d >= 0; d--) {
      if (d >= ndim) continue;
      I size = (I)shape[d], c = q % size;
      q /= size;
      oo += (int64_t)c * other_stride[d];
      oa += (int64_t)c * rest_stride[d];
#pragma unroll
      for (int k = 0; k < TS_MAX_DIMS; k++) oi[k] += (int64_t)c * idx_stride[k][d];
    }
#pragma unroll
    for (int k = 0; k < TS_MAX_DIMS; k++)
      if (k < n) oa += idx[k][oi[k]] * a_index_stride[k];
    ta = oa;
    to = oo;
  }
  __device__ void locate(int64_t q, int64_t &ta, int64_t &to) const {
    if (narrow) locate_as<uint32_t>((uint32_t)q, ta, to);
    else locate_as<int64_t>(q, ta, to);
  }
};

// ---- kernels -------------------------------------------------------------------------------------
// Reads: other[to] = a[ta].
template <typename T, typename G> __global__ void read_kernel(int64_t n, G g, const T *a, T *other) {
  CUDA_GRID_STRIDE(q, n) {
    int64_t ta, to;
    g.locate(q, ta, to);
    other[to] = a[ta];
  }
}

// Replacing writes, pass 1: each target keeps the largest item number (+1) that writes it.
template <typename K, typename G> __global__ void claim_kernel(int64_t n, G g, K *winner) {
  CUDA_GRID_STRIDE(q, n) {
    int64_t ta, to;
    g.locate(q, ta, to);
    atomicMax(&winner[ta], (K)(q + 1));
  }
}

// Pass 2: only the last write of each target stores.
template <typename T, typename K, typename G>
__global__ void store_winners_kernel(int64_t n, G g, const K *winner, T *a, const T *src) {
  CUDA_GRID_STRIDE(q, n) {
    int64_t ta, to;
    g.locate(q, ta, to);
    if (winner[ta] == (K)(q + 1)) a[ta] = src[to];
  }
}

// Accumulating writes, pass 1: (target, item) pairs in item order.
template <typename G> __global__ void pair_kernel(int64_t n, G g, uint64_t *targets, uint64_t *items) {
  CUDA_GRID_STRIDE(q, n) {
    int64_t ta, to;
    g.locate(q, ta, to);
    targets[q] = (uint64_t)ta;
    items[q] = (uint64_t)q;
  }
}

template <int D> __device__ __forceinline__ cuda_compute_t<D> add_values(cuda_compute_t<D> x, cuda_compute_t<D> y) {
  if constexpr (D == TS_I64) return (int64_t)((uint64_t)x + (uint64_t)y); // wraps, as the CPU
  else return x + y;
}

// Pass 3 (after the sort): the first pair of each target's run adds the run in item order.
template <int D, typename G>
__global__ void accumulate_runs_kernel(int64_t n, G g, const uint64_t *targets, const uint64_t *items,
                                       cuda_storage_t<D> *a, const cuda_storage_t<D> *src) {
  CUDA_GRID_STRIDE(i, n) {
    uint64_t t = targets[i];
    if (i > 0 && targets[i - 1] == t) continue;
    cuda_compute_t<D> sum = cuda_to_compute<D>(a[t]);
    for (int64_t j = i; j < n && targets[j] == t; j++) {
      int64_t ta, to;
      g.locate((int64_t)items[j], ta, to);
      sum = add_values<D>(sum, cuda_to_compute<D>(src[to]));
    }
    a[t] = cuda_from_compute<D>(sum);
  }
}

// ---- runners ---------------------------------------------------------------------------------------
template <typename G> int run_read(const char *op, int64_t n, const G &g, const ts_tensor *a, ts_tensor *other) {
  if (n == 0) return TS_OK;
  cudaStream_t stream;
  if (cuda_stream_for(op, a->device.index, &stream)) return ts_last_status();
  return cuda_dispatch_size(a->dtype, [&](auto e) {
    using T = typename decltype(e)::type;
    read_kernel<T, G><<<cuda_blocks(n), CUDA_THREADS, 0, stream>>>(n, g, (const T *)ts_elem_ptr(a),
                                                                   (T *)ts_elem_ptr(other));
    return cuda_check(cudaGetLastError(), op);
  });
}

// n writes into a (contiguous), the last of each target winning.
template <typename K, typename G>
int replace_with(const char *op, int64_t n, const G &g, ts_tensor *a, const ts_tensor *src, cudaStream_t stream) {
  int device = a->device.index;
  size_t bytes = (size_t)ts_numel(a) * sizeof(K);
  K *winner = (K *)cuda_alloc(bytes, device);
  if (!winner) return ts_last_status();
  int st = cuda_check(cudaMemsetAsync(winner, 0, bytes, stream), op);
  if (!st) {
    claim_kernel<K, G><<<cuda_blocks(n), CUDA_THREADS, 0, stream>>>(n, g, winner);
    st = cuda_check(cudaGetLastError(), op);
  }
  if (!st)
    st = cuda_dispatch_size(a->dtype, [&](auto e) {
      using T = typename decltype(e)::type;
      store_winners_kernel<T, K, G><<<cuda_blocks(n), CUDA_THREADS, 0, stream>>>(
          n, g, winner, (T *)ts_elem_ptr(a), (const T *)ts_elem_ptr(src));
      return cuda_check(cudaGetLastError(), op);
    });
  cuda_free(winner, bytes, device); // stream-ordered: reused only after these kernels
  return st;
}

template <typename G> int run_replace(const char *op, int64_t n, const G &g, ts_tensor *a, const ts_tensor *src) {
  if (n == 0) return TS_OK;
  cudaStream_t stream;
  if (cuda_stream_for(op, a->device.index, &stream)) return ts_last_status();
  if (n < (int64_t)UINT32_MAX) return replace_with<unsigned int>(op, n, g, a, src, stream);
  return replace_with<unsigned long long>(op, n, g, a, src, stream);
}

// n writes added into a (contiguous, a compute dtype), each target's in item order.
template <typename G> int run_accumulate(const char *op, int64_t n, const G &g, ts_tensor *a, const ts_tensor *src) {
  if (n == 0) return TS_OK;
  int device = a->device.index;
  cudaStream_t stream;
  if (cuda_stream_for(op, device, &stream)) return ts_last_status();
  size_t bytes = (size_t)n * sizeof(uint64_t);
  uint64_t *buf = (uint64_t *)cuda_alloc(4 * bytes, device);
  if (!buf) return ts_last_status();
  uint64_t *targets = buf, *items = buf + n, *sorted_targets = buf + 2 * n, *sorted_items = buf + 3 * n;
  pair_kernel<G><<<cuda_blocks(n), CUDA_THREADS, 0, stream>>>(n, g, targets, items);
  int st = cuda_check(cudaGetLastError(), op);
  int bits = cuda_bit_width((uint64_t)(ts_numel(a) - 1));
  if (!st) st = cuda_sort_pairs_u64(targets, sorted_targets, items, sorted_items, n, bits > 0 ? bits : 1, device, op);
  if (!st)
    st = cuda_dispatch_dtype(op, a->dtype, [&](auto tag) {
      constexpr int D = decltype(tag)::value;
      if constexpr (cuda_is_floating(D) || D == TS_I64) {
        accumulate_runs_kernel<D, G><<<cuda_blocks(n), CUDA_THREADS, 0, stream>>>(
            n, g, sorted_targets, sorted_items, cuda_data<D>(a), cuda_data<D>(src));
        return cuda_check(cudaGetLastError(), op);
      } else {
        return ts_set_error(TS_ERR_DTYPE, "%s: accumulation takes a compute dtype, got %s", op, ts_dtype_name(D));
      }
    });
  cuda_free(buf, 4 * bytes, device);
  return st;
}

int same_dtype(const char *op, const ts_tensor *a, const ts_tensor *b, const char *what) {
  if (a->dtype == b->dtype) return TS_OK;
  return ts_set_error(TS_ERR_DTYPE, "%s: the cuda kernel takes %s of the tensor's dtype %s, got %s", op, what,
                      ts_dtype_name(a->dtype), ts_dtype_name(b->dtype));
}

// The geometry over `shape_of`'s shape; a_stride/a_dim_stride come from a, other strides from
// `other` (read at the same coordinates), index strides as given.
dim_geom make_dim_geom(const ts_tensor *shape_of, const ts_tensor *a, int dim, const ts_tensor *other,
                       const int64_t *index_stride, const ts_tensor *index) {
  dim_geom g;
  memset(&g, 0, sizeof g);
  g.ndim = shape_of->ndim;
  g.narrow = ts_numel(shape_of) <= (int64_t)UINT32_MAX;
  for (int d = 0; d < g.ndim; d++) {
    g.shape[d] = shape_of->shape[d];
    g.a_stride[d] = d == dim ? 0 : a->stride[d];
    g.other_stride[d] = other->stride[d];
    g.index_stride[d] = index_stride[d];
  }
  g.a_dim_stride = a->ndim ? a->stride[dim] : 0;
  g.index = (const int64_t *)ts_elem_ptr(index);
  return g;
}

// The geometry of advanced indexing of a by n indices (all of one broadcast shape) against
// `other`, whose shape is the indexed shape.
advanced_geom make_advanced_geom(const ts_tensor *a, int n, ts_tensor *const *indices, const ts_tensor *other) {
  advanced_geom g;
  memset(&g, 0, sizeof g);
  g.n = n;
  g.nd = n ? indices[0]->ndim : 0;
  g.ndim = other->ndim;
  g.narrow = ts_numel(other) <= (int64_t)UINT32_MAX;
  for (int d = 0; d < g.ndim; d++) {
    g.shape[d] = other->shape[d];
    g.other_stride[d] = other->stride[d];
    g.rest_stride[d] = d >= g.nd ? a->stride[n + d - g.nd] : 0;
  }
  for (int k = 0; k < n; k++) {
    g.idx[k] = (const int64_t *)ts_elem_ptr(indices[k]);
    g.a_index_stride[k] = a->stride[k];
    for (int d = 0; d < g.nd; d++) g.idx_stride[k][d] = indices[k]->stride[d];
  }
  return g;
}

int check_index_dtype(const char *op, const ts_tensor *index) {
  if (index->dtype == TS_I64) return TS_OK;
  return ts_set_error(TS_ERR_DTYPE, "%s: the cuda kernel takes int64 indices, got %s", op, ts_dtype_name(index->dtype));
}

int check_index_dtypes(const char *op, int n, ts_tensor *const *indices) {
  for (int k = 0; k < n; k++)
    if (check_index_dtype(op, indices[k])) return ts_last_status();
  return TS_OK;
}
} // namespace

// ---- entries -----------------------------------------------------------------------------------------
extern "C" int cuda_index_select(ts_tensor *out, const ts_tensor *a, int dim, const ts_tensor *index) {
  if (same_dtype("index_select", a, out, "an output") || check_index_dtype("index_select", index))
    return ts_last_status();
  int64_t index_stride[TS_MAX_DIMS] = {0}; // the 1-D index, seen with out's shape, varies along dim only
  if (out->ndim > 0) index_stride[dim] = index->ndim ? index->stride[0] : 0;
  dim_geom g = make_dim_geom(out, a, dim, out, index_stride, index);
  return run_read("index_select", ts_numel(out), g, a, out);
}

extern "C" int cuda_gather(ts_tensor *out, const ts_tensor *a, int dim, const ts_tensor *index) {
  if (same_dtype("gather", a, out, "an output") || check_index_dtype("gather", index))
    return ts_last_status();
  dim_geom g = make_dim_geom(index, a, dim, out, index->stride, index);
  return run_read("gather", ts_numel(index), g, a, out);
}

extern "C" int cuda_scatter(ts_tensor *a, int dim, const ts_tensor *index, const ts_tensor *src, int mode) {
  const char *op = mode == TS_SCATTER_ADD ? "scatter_add" : "scatter";
  if (same_dtype(op, a, src, "src") || check_index_dtype(op, index)) return ts_last_status();
  dim_geom g = make_dim_geom(index, a, dim, src, index->stride, index);
  int64_t n = ts_numel(index);
  return mode == TS_SCATTER_ADD ? run_accumulate(op, n, g, a, src) : run_replace(op, n, g, a, src);
}

extern "C" int cuda_index(ts_tensor *out, const ts_tensor *a, int n, ts_tensor *const *indices) {
  if (same_dtype("index", a, out, "an output") || check_index_dtypes("index", n, indices)) return ts_last_status();
  advanced_geom g = make_advanced_geom(a, n, indices, out);
  return run_read("index", ts_numel(out), g, a, out);
}

extern "C" int cuda_index_put(ts_tensor *a, int n, ts_tensor *const *indices, const ts_tensor *values, int accumulate) {
  const char *op = "index_put_";
  if (same_dtype(op, a, values, "values") || check_index_dtypes(op, n, indices)) return ts_last_status();
  advanced_geom g = make_advanced_geom(a, n, indices, values);
  int64_t items = ts_numel(values);
  return accumulate ? run_accumulate(op, items, g, a, values) : run_replace(op, items, g, a, values);
}

// ---- masked_fill ---------------------------------------------------------------------------------------
namespace {
template <typename T> struct masked_fill_op {
  T *a;
  const uint8_t *mask;
  T value;
  __device__ void operator()(const int64_t (&off)[2]) const {
    if (mask[off[1]]) a[off[0]] = value;
  }
};
} // namespace

extern "C" int cuda_masked_fill(ts_tensor *a, const ts_tensor *mask, double value) {
  if (mask->dtype != TS_BOOL)
    return ts_set_error(TS_ERR_DTYPE, "masked_fill: the cuda kernel takes a bool mask, got %s", ts_dtype_name(mask->dtype));
  char bytes[8] = {0};
  cpu_store_f64(a->dtype, bytes, value);
  const ts_tensor *ops[2] = {a, mask};
  return cuda_dispatch_size(a->dtype, [&](auto e) {
    using T = typename decltype(e)::type;
    T v;
    memcpy(&v, bytes, sizeof v);
    return cuda_foreach("masked_fill", ops, masked_fill_op<T>{(T *)ts_elem_ptr(a), (const uint8_t *)ts_elem_ptr(mask), v});
  });
}

// ---- nonzero ----------------------------------------------------------------------------------------------
// Flags in row-major order, the numbers of the flagged elements by a device-wide select, then
// their coordinates. Floats compare without their sign bit, as on the CPU: -0.0 is zero, NaN is not.
namespace {
template <int D> __device__ __forceinline__ uint8_t is_nonzero(cuda_storage_t<D> v) {
  if constexpr (D == TS_F64) return (__double_as_longlong(v) << 1) != 0;
  else if constexpr (D == TS_F32) return (__float_as_uint(v) << 1) != 0;
  else if constexpr (D == TS_F16) return (__half_as_ushort(v) & 0x7fff) != 0;
  else if constexpr (D == TS_BF16) return (__bfloat16_as_ushort(v) & 0x7fff) != 0;
  else return v != 0;
}

template <int D> struct flag_op {
  uint8_t *flags;
  const cuda_storage_t<D> *a;
  __device__ void operator()(const int64_t (&off)[2]) const { flags[off[0]] = is_nonzero<D>(a[off[1]]); }
};

struct coords_geom {
  int ndim;
  int64_t shape[TS_MAX_DIMS];
};

__global__ void coords_kernel(int64_t count, coords_geom g, const int64_t *linear, int64_t *out) {
  CUDA_GRID_STRIDE(r, count) {
    int64_t i = linear[r];
#pragma unroll
    for (int d = TS_MAX_DIMS - 1; d >= 0; d--) { // to the compile-time maximum: shape stays in registers
      if (d >= g.ndim) continue;
      out[r * g.ndim + d] = i % g.shape[d];
      i /= g.shape[d];
    }
  }
}

// Writes the flagged element numbers to `selected` and their count to the host.
int select_flagged(const uint8_t *flags, int64_t n, int64_t *selected, int64_t *count, int device, cudaStream_t stream) {
  thrust::counting_iterator<int64_t> numbers(0);
  int64_t *d_count = (int64_t *)cuda_alloc(sizeof(int64_t), device);
  if (!d_count) return ts_last_status();
  size_t temp_bytes = 0;
  void *temp = NULL;
  int st = cuda_check(cub::DeviceSelect::Flagged(NULL, temp_bytes, numbers, flags, selected, d_count, n, stream),
                      "nonzero");
  if (!st && !(temp = cuda_alloc(temp_bytes, device))) st = ts_last_status();
  if (!st)
    st = cuda_check(cub::DeviceSelect::Flagged(temp, temp_bytes, numbers, flags, selected, d_count, n, stream), "nonzero");
  if (!st) st = cuda_copy_to_host(count, d_count, sizeof *count, device);
  cuda_free(temp, temp_bytes, device);
  cuda_free(d_count, sizeof(int64_t), device);
  return st;
}
} // namespace

extern "C" ts_tensor *cuda_nonzero(const ts_tensor *a) {
  int device = a->device.index;
  int64_t n = ts_numel(a), count = 0;
  cudaStream_t stream;
  if (cuda_stream_for("nonzero", device, &stream)) return NULL;
  uint8_t *flags = NULL;
  int64_t *selected = NULL;
  int st = TS_OK;
  if (n) {
    flags = (uint8_t *)cuda_alloc((size_t)n, device);
    selected = flags ? (int64_t *)cuda_alloc((size_t)n * sizeof(int64_t), device) : NULL;
    if (!selected) st = ts_last_status();
  }
  if (!st && n) {
    ts_tensor flat = *a; // only its shape and contiguous strides matter: the plan of the flags
    ts_contiguous_strides(a->ndim, a->shape, flat.stride);
    const ts_tensor *ops[2] = {&flat, a};
    st = cuda_dispatch_dtype("nonzero", a->dtype, [&](auto tag) {
      constexpr int D = decltype(tag)::value;
      return cuda_foreach("nonzero", ops, flag_op<D>{flags, cuda_data<D>(a)});
    });
    if (!st) st = select_flagged(flags, n, selected, &count, device, stream);
  }
  int64_t shape[2] = {count, a->ndim};
  ts_tensor *out = st ? NULL : ts_empty(2, shape, TS_I64, a->device);
  if (out && count > 0 && a->ndim > 0) {
    coords_geom g;
    memset(&g, 0, sizeof g);
    g.ndim = a->ndim;
    for (int d = 0; d < a->ndim; d++) g.shape[d] = a->shape[d];
    coords_kernel<<<cuda_blocks(count), CUDA_THREADS, 0, stream>>>(count, g, selected, (int64_t *)ts_elem_ptr(out));
    if (cuda_check(cudaGetLastError(), "nonzero")) {
      ts_release(out);
      out = NULL;
    }
  }
  cuda_free(selected, 0, device);
  cuda_free(flags, 0, device);
  return out;
}

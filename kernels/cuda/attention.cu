// attention.cu — fused scaled dot-product attention on CUDA devices, forward and backward, with
// the semantics of kernels/cpu/attention.c: scores S = scale q kᵀ + bias (the bias a strided view
// whose leading dims enumerate the (batch·head) blocks), each row's log-sum-exp kept, a row masked
// entirely (all scores -inf) giving zeros with lse = -inf and zero gradients, a NaN or +inf score
// making its row NaN.
//
// Flash-attention style, on CUDA cores (no tensor-core MMA): no [Nq, Nk] matrix is ever stored.
//   forward   one thread per query row, ROWS rows per block; key/value tiles of KT keys in shared
//             memory; online softmax in float32 (float64 for float64 inputs): the row's running max
//             and sum rescale its output accumulator in registers once per tile.
//   backward  P = exp(S - lse) is recomputed tile by tile, as on the CPU, in two kernels:
//             dK, dV: one thread per key row, looping over query tiles (dV += P dO, dK += scale dS Q);
//             dQ and the bias gradient: one thread per query row, looping over key tiles
//             (dQ += scale dS K); dS = P (dO Vᵀ - rowsum(dO O)).
//   The bias gradient sums dS over the heads that share a bias block: the heads of a group are
//   split into parts, each part accumulates its heads in order into its own buffer, and the parts
//   are added in order: no atomics, the same bits on every run.
// float16/bfloat16 load into float32 and round once on store; every row's log-sum-exp is kept in
// the accumulation type (float32, float64 for float64), as the runtime allocates it.
// Head dims up to 128 (q/k and v alike) are supported. The same kernels serve contiguous blocks
// (attention) and strided head views of packed projections (attention_views).
#include "nn.cuh"

#include <math.h>

constexpr int KT = 32;     // keys per tile (forward, dQ)
constexpr int QT = 32;     // queries per tile (dK, dV)
constexpr int64_t MAX_HEAD_DIM = 128;
constexpr int64_t TARGET_BLOCKS = 256; // bias-gradient parts aim at this many blocks

// Rows (or key rows) per block: 64, or 32 where float64 rows of 128 would not fit shared memory.
template <typename A, int DMAX> __host__ __device__ constexpr int rows_per_block() { return sizeof(A) == 8 && DMAX >= 128 ? 32 : 64; }

// ---- operand layouts ----------------------------------------------------------------------------
// Head h = b H + hh of an operand: row i starts at base + b sb + hh sh + i sr (elements), its
// columns contiguous. Contiguous blocks [BH, rows, cols] are (sb = rows cols, sh = 0, sr = cols)
// with H = 1; strided head views [B, H, rows, cols] (attention_views) bring their own strides, so
// heads are read straight out of packed projections and written straight into packed gradients.
template <typename T> struct head_rows {
  T *base;
  int64_t sb, sh, sr;
};

template <typename T> __device__ __forceinline__ T *row_of(const head_rows<T> &l, int64_t inner, int64_t h, int64_t i) {
  return l.base + h / inner * l.sb + h % inner * l.sh + i * l.sr;
}

// ---- parameters ---------------------------------------------------------------------------------
template <int DT> struct attn_params {
  using T = cuda_storage_t<DT>;
  using A = cuda_acc_t<DT>;
  int64_t heads, nq, nk, d, dv;
  int d_pad, dv_pad, d_own, dv_own; // shared-memory row strides (see pad_shared, pad_own)
  A scale;
  int64_t inner; // heads per batch entry of 4-d views (1 for [BH, rows, cols] blocks)
  head_rows<const T> q, k, v, out, dout;
  head_rows<T> out_w; // forward output
  A *lse_w;              // forward lse, contiguous [BH, Nq]
  const A *lse, *delta; // backward: lse and rowsum(dO O) per query row
  head_rows<T> dq, dk, dv_out;
  // bias [E..., Nq, Nk]: E enumerates the heads row-major; element strides, 0 where broadcast
  const T *bias;
  int nlead;
  int64_t lead_size[TS_MAX_DIMS], lead_stride[TS_MAX_DIMS], head_stride[TS_MAX_DIMS];
  int64_t bias_rs, bias_cs;
  // the bias gradient: `groups` bias blocks, each shared by `members` heads split into `parts`
  bool want_dbias;
  int kept[TS_MAX_DIMS];
  int64_t groups, members, parts;
  A *dbias_acc; // [parts][groups][Nq Nk]
};

// A row stride for rows read whole by one thread each: a multiple of 16 bytes, an odd number of
// 16-byte units, so that the 8 threads of a quarter warp hit distinct banks.
template <typename A> static int pad_own(int64_t n) {
  constexpr int V = 16 / sizeof(A);
  int r = (int)((n > 0 ? n : 1) + V - 1) / V * V;
  return (r / V) % 2 ? r : r + V;
}
// A row stride for rows every thread reads alike (broadcast): a multiple of 16 bytes.
template <typename A> static int pad_shared(int64_t n) {
  constexpr int V = 16 / sizeof(A);
  return (int)(n + V - 1) / V * V;
}

// ---- shared-memory helpers ----------------------------------------------------------------------
template <typename A> __device__ __forceinline__ void load16(const A *p, A (&out)[16 / sizeof(A)]) {
  if constexpr (sizeof(A) == 4) {
    float4 t = *reinterpret_cast<const float4 *>(p);
    out[0] = t.x, out[1] = t.y, out[2] = t.z, out[3] = t.w;
  } else {
    double2 t = *reinterpret_cast<const double2 *>(p);
    out[0] = t.x, out[1] = t.y;
  }
}

// The dot product of two shared-memory rows of n values (n a multiple of 16 bytes, zero padded).
template <typename A> __device__ __forceinline__ A dot_rows(const A *a, const A *b, int n) {
  constexpr int V = 16 / sizeof(A);
  A s = 0;
  for (int d = 0; d < n; d += V) {
    A x[V], y[V];
    load16(a + d, x);
    load16(b + d, y);
#pragma unroll
    for (int t = 0; t < V; t++) s += x[t] * y[t];
  }
  return s;
}

// acc[0 .. n) += alpha x[0 .. n) (n a multiple of 16 bytes, at most DMAX).
template <typename A, int DMAX> __device__ __forceinline__ void axpy_row(A (&acc)[DMAX], A alpha, const A *x, int n) {
  constexpr int V = 16 / sizeof(A);
#pragma unroll
  for (int c = 0; c < DMAX; c += V)
    if (c < n) {
      A y[V];
      load16(x + c, y);
#pragma unroll
      for (int t = 0; t < V; t++) acc[c + t] += alpha * y[t];
    }
}

template <int DT, int DMAX>
__device__ __forceinline__ void store_row(cuda_storage_t<DT> *dst, const cuda_acc_t<DT> (&acc)[DMAX], int64_t n,
                                          cuda_acc_t<DT> factor) {
#pragma unroll
  for (int c = 0; c < DMAX; c++)
    if (c < n) cuda_store<DT>(dst, c, acc[c] * factor);
}

// rows x cols values of global rows `src_stride` elements apart into shared rows of stride
// `pitch`, converted to A; zeros beyond (valid_rows, cols) up to (rows, pitch).
template <int DT>
__device__ void stage_rows(cuda_acc_t<DT> *dst, int pitch, int rows, const cuda_storage_t<DT> *src, int64_t src_stride,
                           int64_t valid_rows, int64_t cols) {
  for (int idx = threadIdx.x; idx < rows * pitch; idx += blockDim.x) {
    int r = idx / pitch, c = idx % pitch;
    dst[idx] = r < valid_rows && c < cols ? cuda_load<DT>(src, (int64_t)r * src_stride + c) : (cuda_acc_t<DT>)0;
  }
}

template <int DT> __device__ int64_t bias_offset(const attn_params<DT> &p, int64_t h) {
  int64_t off = 0;
  for (int d = p.nlead - 1; d >= 0; d--) {
    off += h % p.lead_size[d] * p.lead_stride[d];
    h /= p.lead_size[d];
  }
  return off;
}

// The bias of rows [r0, r0 + rows) x keys [c0, c0 + cols) of head h into shared [rows][cols + 1].
template <int DT>
__device__ void stage_bias(const attn_params<DT> &p, cuda_acc_t<DT> *dst, int rows, int cols, int64_t h, int64_t r0,
                           int64_t c0) {
  const cuda_storage_t<DT> *b = p.bias + bias_offset(p, h);
  for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) {
    int r = idx / cols, c = idx % cols;
    bool in = r0 + r < p.nq && c0 + c < p.nk;
    dst[r * (cols + 1) + c] = in ? cuda_load<DT>(b, (r0 + r) * p.bias_rs + (c0 + c) * p.bias_cs) : (cuda_acc_t<DT>)0;
  }
}

// P of a score given its row's lse (the CPU's probs_from_lse): a row masked entirely (lse = -inf)
// has zero probabilities, a NaN row NaN ones.
template <typename A> __device__ __forceinline__ A prob_of(A s, A lse) {
  if (lse == -(A)INFINITY) return 0;
  if (lse != lse || lse == (A)INFINITY) return (A)NAN;
  return cuda_exp(s - lse);
}

// ---- forward ------------------------------------------------------------------------------------
template <int DT, int DMAX>
static __global__ void __launch_bounds__(rows_per_block<cuda_acc_t<DT>, DMAX>()) attention_forward_kernel(attn_params<DT> p) {
  using A = cuda_acc_t<DT>;
  constexpr int ROWS = rows_per_block<A, DMAX>();
  extern __shared__ __align__(16) unsigned char smem[];
  A *q_s = (A *)smem, *k_s = q_s + ROWS * p.d_own, *v_s = k_s + KT * p.d_pad, *bias_s = v_s + KT * p.dv_pad;
  int64_t tiles = (p.nq + ROWS - 1) / ROWS, h = blockIdx.x / tiles, r0 = blockIdx.x % tiles * ROWS;
  int row = threadIdx.x;
  int64_t i = r0 + row;
  stage_rows<DT>(q_s, p.d_own, ROWS, row_of(p.q, p.inner, h, r0), p.q.sr, p.nq - r0, p.d);
  A o[DMAX];
#pragma unroll
  for (int c = 0; c < DMAX; c++) o[c] = 0;
  A m = -INFINITY, l = 0;
  bool bad = false; // a NaN or +inf score: the row's softmax is NaN
  for (int64_t c0 = 0; c0 < p.nk; c0 += KT) {
    __syncthreads(); // the previous tile is consumed
    int64_t kn = p.nk - c0 < KT ? p.nk - c0 : KT;
    stage_rows<DT>(k_s, p.d_pad, KT, row_of(p.k, p.inner, h, c0), p.k.sr, kn, p.d);
    stage_rows<DT>(v_s, p.dv_pad, KT, row_of(p.v, p.inner, h, c0), p.v.sr, kn, p.dv);
    if (p.bias) stage_bias<DT>(p, bias_s, ROWS, KT, h, r0, c0);
    __syncthreads();
    if (i >= p.nq) continue;
    A sc[KT], tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < KT; j++) {
      sc[j] = -INFINITY;
      if (j < kn) {
        A s = dot_rows(q_s + row * p.d_own, k_s + j * p.d_pad, p.d_pad) * p.scale;
        if (p.bias) s += bias_s[row * (KT + 1) + j];
        bad |= s != s || s == (A)INFINITY;
        sc[j] = s;
        tile_max = s > tile_max ? s : tile_max;
      }
    }
    A m_new = tile_max > m ? tile_max : m;
    if (m_new == -(A)INFINITY) continue; // every key so far masked: nothing to add
    A corr = cuda_exp(m - m_new);         // exp(-inf) = 0 on the first contributing tile
    l *= corr;
#pragma unroll
    for (int c = 0; c < DMAX; c++) o[c] *= corr;
#pragma unroll
    for (int j = 0; j < KT; j++)
      if (j < kn) {
        A pj = cuda_exp(sc[j] - m_new);
        l += pj;
        axpy_row(o, pj, v_s + j * p.dv_pad, p.dv_pad);
      }
    m = m_new;
  }
  if (i >= p.nq) return;
  A lse = bad ? (A)NAN : m == -(A)INFINITY ? m : m + cuda_log(l);
  p.lse_w[h * p.nq + i] = lse;
  // masked entirely: zeros; NaN: NaN everywhere (0 * NaN)
  A factor = bad ? (A)NAN : m == -(A)INFINITY ? (A)0 : (A)1 / l;
  if (m == -(A)INFINITY && !bad) {
#pragma unroll
    for (int c = 0; c < DMAX; c++) o[c] = 0;
  }
  store_row<DT, DMAX>(row_of(p.out_w, p.inner, h, i), o, p.dv, factor);
}

// ---- backward: rowsum(dO O) ------------------------------------------------------------------------
template <int DT> static __global__ void attention_delta_kernel(attn_params<DT> p, cuda_acc_t<DT> *delta) {
  using A = cuda_acc_t<DT>;
  int lane = threadIdx.x & 31;
  int64_t rows = p.heads * p.nq, step = (int64_t)gridDim.x * (blockDim.x >> 5);
  for (int64_t r = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += step) {
    const cuda_storage_t<DT> *dout = row_of(p.dout, p.inner, r / p.nq, r % p.nq);
    const cuda_storage_t<DT> *out = row_of(p.out, p.inner, r / p.nq, r % p.nq);
    A s = 0;
    for (int64_t c = lane; c < p.dv; c += 32) s += cuda_load<DT>(dout, c) * cuda_load<DT>(out, c);
    s = cuda_warp_sum(s);
    if (lane == 0) delta[r] = s;
  }
}

// ---- backward: dK and dV, one thread per key row ------------------------------------------------------
template <int DT, int DMAX, bool DK, bool DV>
static __global__ void __launch_bounds__(rows_per_block<cuda_acc_t<DT>, DMAX>()) attention_dkv_kernel(attn_params<DT> p) {
  using A = cuda_acc_t<DT>;
  constexpr int KR = rows_per_block<A, DMAX>();
  extern __shared__ __align__(16) unsigned char smem[];
  A *k_s = (A *)smem, *v_s = k_s + KR * p.d_own, *q_s = v_s + KR * p.dv_own, *do_s = q_s + QT * p.d_pad;
  A *lse_s = do_s + QT * p.dv_pad, *delta_s = lse_s + QT, *bias_s = delta_s + QT;
  int64_t tiles = (p.nk + KR - 1) / KR, h = blockIdx.x / tiles, c0 = blockIdx.x % tiles * KR;
  int jr = threadIdx.x;
  int64_t j = c0 + jr;
  stage_rows<DT>(k_s, p.d_own, KR, row_of(p.k, p.inner, h, c0), p.k.sr, p.nk - c0, p.d);
  if (DK) stage_rows<DT>(v_s, p.dv_own, KR, row_of(p.v, p.inner, h, c0), p.v.sr, p.nk - c0, p.dv);
  A dk[DMAX], dv[DMAX];
#pragma unroll
  for (int c = 0; c < DMAX; c++) dk[c] = dv[c] = 0;
  for (int64_t r0 = 0; r0 < p.nq; r0 += QT) {
    __syncthreads();
    int64_t qn = p.nq - r0 < QT ? p.nq - r0 : QT;
    stage_rows<DT>(q_s, p.d_pad, QT, row_of(p.q, p.inner, h, r0), p.q.sr, qn, p.d);
    stage_rows<DT>(do_s, p.dv_pad, QT, row_of(p.dout, p.inner, h, r0), p.dout.sr, qn, p.dv);
    for (int t = threadIdx.x; t < QT; t += blockDim.x) {
      lse_s[t] = t < qn ? p.lse[h * p.nq + r0 + t] : (A)0;
      delta_s[t] = t < qn ? p.delta[h * p.nq + r0 + t] : (A)0;
    }
    if (p.bias) stage_bias<DT>(p, bias_s, QT, KR, h, r0, c0);
    __syncthreads();
    if (j >= p.nk) continue;
    for (int ii = 0; ii < qn; ii++) {
      A s = dot_rows(q_s + ii * p.d_pad, k_s + jr * p.d_own, p.d_pad) * p.scale;
      if (p.bias) s += bias_s[ii * (KR + 1) + jr];
      A pv = prob_of(s, lse_s[ii]);
      if (DV) axpy_row(dv, pv, do_s + ii * p.dv_pad, p.dv_pad);
      if (DK) {
        A dp = dot_rows(do_s + ii * p.dv_pad, v_s + jr * p.dv_own, p.dv_pad);
        axpy_row(dk, p.scale * (pv * (dp - delta_s[ii])), q_s + ii * p.d_pad, p.d_pad);
      }
    }
  }
  if (j >= p.nk) return;
  if (DK) store_row<DT, DMAX>(row_of(p.dk, p.inner, h, j), dk, p.d, 1);
  if (DV) store_row<DT, DMAX>(row_of(p.dv_out, p.inner, h, j), dv, p.dv, 1);
}

// ---- backward: dQ and the bias gradient, one thread per query row -----------------------------------
// The head that is member g of the group of heads sharing bias block `group` (as the CPU's head_of).
template <int DT> __device__ int64_t head_of(const attn_params<DT> &p, int64_t group, int64_t g) {
  int64_t h = 0;
  for (int d = p.nlead - 1; d >= 0; d--) {
    if (p.kept[d]) {
      h += group % p.lead_size[d] * p.head_stride[d];
      group /= p.lead_size[d];
    } else {
      h += g % p.lead_size[d] * p.head_stride[d];
      g /= p.lead_size[d];
    }
  }
  return h;
}

template <int DT, int DMAX, bool DQ>
static __global__ void __launch_bounds__(rows_per_block<cuda_acc_t<DT>, DMAX>()) attention_dq_kernel(attn_params<DT> p) {
  using A = cuda_acc_t<DT>;
  constexpr int ROWS = rows_per_block<A, DMAX>();
  extern __shared__ __align__(16) unsigned char smem[];
  A *q_s = (A *)smem, *do_s = q_s + ROWS * p.d_own, *k_s = do_s + ROWS * p.dv_own, *v_s = k_s + KT * p.d_pad;
  A *bias_s = v_s + KT * p.dv_pad, *ds_s = bias_s + (p.bias ? ROWS * (KT + 1) : 0);
  int64_t tiles = (p.nq + ROWS - 1) / ROWS, b = blockIdx.x, r0 = b % tiles * ROWS;
  b /= tiles;
  int64_t part = b % p.parts, group = b / p.parts;
  int64_t first = part * p.members / p.parts, last = (part + 1) * p.members / p.parts;
  int row = threadIdx.x;
  int64_t i = r0 + row;
  A *acc = p.want_dbias ? p.dbias_acc + (part * p.groups + group) * p.nq * p.nk : NULL;
  for (int64_t g = first; g < last; g++) {
    int64_t h = p.want_dbias ? head_of(p, group, g) : group;
    __syncthreads(); // the previous head's tiles are consumed
    stage_rows<DT>(q_s, p.d_own, ROWS, row_of(p.q, p.inner, h, r0), p.q.sr, p.nq - r0, p.d);
    stage_rows<DT>(do_s, p.dv_own, ROWS, row_of(p.dout, p.inner, h, r0), p.dout.sr, p.nq - r0, p.dv);
    A lse = i < p.nq ? p.lse[h * p.nq + i] : (A)0, delta = i < p.nq ? p.delta[h * p.nq + i] : (A)0;
    A dq[DMAX];
#pragma unroll
    for (int c = 0; c < DMAX; c++) dq[c] = 0;
    for (int64_t c0 = 0; c0 < p.nk; c0 += KT) {
      __syncthreads();
      int64_t kn = p.nk - c0 < KT ? p.nk - c0 : KT;
      stage_rows<DT>(k_s, p.d_pad, KT, row_of(p.k, p.inner, h, c0), p.k.sr, kn, p.d);
      stage_rows<DT>(v_s, p.dv_pad, KT, row_of(p.v, p.inner, h, c0), p.v.sr, kn, p.dv);
      if (p.bias) stage_bias<DT>(p, bias_s, ROWS, KT, h, r0, c0);
      __syncthreads();
      if (i < p.nq) {
        for (int jj = 0; jj < kn; jj++) {
          A s = dot_rows(q_s + row * p.d_own, k_s + jj * p.d_pad, p.d_pad) * p.scale;
          if (p.bias) s += bias_s[row * (KT + 1) + jj];
          A dp = dot_rows(do_s + row * p.dv_own, v_s + jj * p.dv_pad, p.dv_pad);
          A ds = prob_of(s, lse) * (dp - delta);
          if (DQ) axpy_row(dq, p.scale * ds, k_s + jj * p.d_pad, p.d_pad);
          if (acc) ds_s[row * (KT + 1) + jj] = ds;
        }
      }
      if (!acc) continue;
      __syncthreads(); // dS of the tile complete: add it to the part's rows, coalesced along keys
      for (int idx = threadIdx.x; idx < ROWS * kn; idx += blockDim.x) {
        int rr = idx / (int)kn, jj = idx % (int)kn;
        if (r0 + rr >= p.nq) continue;
        A *dst = acc + (r0 + rr) * p.nk + c0 + jj;
        A v = ds_s[rr * (KT + 1) + jj];
        *dst = g == first ? v : *dst + v;
      }
    }
    if (DQ && i < p.nq) store_row<DT, DMAX>(row_of(p.dq, p.inner, h, i), dq, p.d, 1);
  }
}

// dbias[e] = the parts' sums in order.
template <int DT>
static __global__ void attention_dbias_kernel(int64_t n, int64_t parts, const cuda_acc_t<DT> *acc, cuda_storage_t<DT> *dbias) {
  using A = cuda_acc_t<DT>;
  CUDA_GRID_STRIDE(e, n) {
    A s = 0;
    for (int64_t part = 0; part < parts; part++) s += acc[part * n + e];
    cuda_store<DT>(dbias, e, s);
  }
}

// ---- host side ----------------------------------------------------------------------------------
static const char *const OP = "scaled_dot_product_attention";
static const char *const OP_BACKWARD = "scaled_dot_product_attention backward";

// The rows of t: a contiguous block [BH, rows, cols], or a head view [B, H, rows, cols] with unit
// column stride (attention_views); all-zero for NULL.
template <typename T> static head_rows<T> rows_of(const ts_tensor *t) {
  if (!t) return {NULL, 0, 0, 0};
  if (t->ndim == 4) return {(T *)ts_elem_ptr(t), t->stride[0], t->stride[1], t->stride[2]};
  return {(T *)ts_elem_ptr(t), t->shape[1] * t->shape[2], 0, t->shape[2]};
}

// q, k and v are [BH, rows, cols] blocks (attention) or [B, H, rows, cols] views (attention_views).
template <int DT>
static int setup(const char *op, attn_params<DT> *p, const ts_tensor *q, const ts_tensor *k, const ts_tensor *v,
                 const ts_tensor *bias, double scale) {
  using A = cuda_acc_t<DT>;
  using T = cuda_storage_t<DT>;
  int nd = q->ndim;
  *p = {};
  p->inner = nd == 4 ? q->shape[1] : 1;
  p->heads = nd == 4 ? q->shape[0] * q->shape[1] : q->shape[0];
  p->nq = q->shape[nd - 2];
  p->d = q->shape[nd - 1];
  p->nk = k->shape[nd - 2];
  p->dv = v->shape[nd - 1];
  if (p->inner < 1) p->inner = 1; // no heads: nothing is addressed
  if (p->d > MAX_HEAD_DIM || p->dv > MAX_HEAD_DIM)
    return ts_set_error(TS_ERR_UNSUPPORTED, "%s: head dims above %lld are not implemented on cuda (q/k dim %lld, v dim %lld)",
                        op, (long long)MAX_HEAD_DIM, (long long)p->d, (long long)p->dv);
  p->d_pad = pad_shared<A>(p->d);
  p->dv_pad = pad_shared<A>(p->dv);
  p->d_own = pad_own<A>(p->d);
  p->dv_own = pad_own<A>(p->dv);
  p->scale = (A)scale;
  p->q = rows_of<const T>(q);
  p->k = rows_of<const T>(k);
  p->v = rows_of<const T>(v);
  if (!bias) return TS_OK;
  p->bias = cuda_data<DT>(bias);
  p->nlead = bias->ndim - 2;
  int64_t step = 1;
  for (int d = p->nlead - 1; d >= 0; d--) {
    p->lead_size[d] = bias->shape[d];
    p->lead_stride[d] = bias->stride[d];
    p->head_stride[d] = step;
    step *= bias->shape[d];
  }
  p->bias_rs = bias->stride[p->nlead];
  p->bias_cs = bias->stride[p->nlead + 1];
  return TS_OK;
}

static int head_dim_bucket(int64_t d, int64_t dv) {
  int64_t widest = d > dv ? d : dv;
  return widest <= 32 ? 32 : widest <= 64 ? 64 : 128;
}

// Launches kernel with `bytes` of dynamic shared memory, raising the kernel's limit past 48 KB.
template <typename Kernel, typename Params>
static int launch(const char *op, Kernel kernel, int64_t blocks, int threads, size_t bytes, cudaStream_t stream,
                  int device, const Params &p) {
  if (blocks <= 0) return TS_OK;
  if (blocks > INT32_MAX)
    return ts_set_error(TS_ERR_UNSUPPORTED, "%s: %lld blocks of work exceed one launch", op, (long long)blocks);
  if (cuda_allow_shared(op, kernel, bytes, device, "these head dims")) return ts_last_status();
  kernel<<<(unsigned)blocks, threads, bytes, stream>>>(p);
  return cuda_launched(op);
}

template <int DT, int DMAX>
static int run_forward(const char *op, const attn_params<DT> &p, cudaStream_t stream, int device) {
  using A = cuda_acc_t<DT>;
  constexpr int ROWS = rows_per_block<A, DMAX>();
  size_t elems = (size_t)ROWS * p.d_own + (size_t)KT * p.d_pad + (size_t)KT * p.dv_pad + (p.bias ? ROWS * (KT + 1) : 0);
  int64_t blocks = p.heads * ((p.nq + ROWS - 1) / ROWS);
  return launch(op, attention_forward_kernel<DT, DMAX>, blocks, ROWS, elems * sizeof(A), stream, device, p);
}

template <int DT, typename F> static int with_head_dims(const attn_params<DT> &p, F f) {
  switch (head_dim_bucket(p.d, p.dv)) {
  case 32: return f(std::integral_constant<int, 32>{});
  case 64: return f(std::integral_constant<int, 64>{});
  default: return f(std::integral_constant<int, 128>{});
  }
}

// Every tensor shares q's floating dtype; lse is in its accumulation type (float32, float64 for float64).
static int check_dtypes(const char *op, const ts_tensor *const *ts, int count, const ts_tensor *lse) {
  if (cuda_check_floating_alike(op, ts, count)) return ts_last_status();
  int dt = ts[0]->dtype;
  int want = dt == TS_F64 ? TS_F64 : TS_F32;
  if (lse->dtype != want)
    return ts_set_error(TS_ERR_DTYPE, "%s: the cuda kernel keeps the log-sum-exp of %s blocks in %s, got %s", op,
                        ts_dtype_name(dt), ts_dtype_name(want), ts_dtype_name(lse->dtype));
  return TS_OK;
}

extern "C" int cuda_attention(ts_tensor *out, ts_tensor *lse, const ts_tensor *q, const ts_tensor *k, const ts_tensor *v,
                              const ts_tensor *bias, double scale) {
  const ts_tensor *all[5] = {q, k, v, bias, out};
  if (check_dtypes(OP, all, 5, lse)) return ts_last_status();
  int device = q->device.index;
  cudaStream_t stream;
  if (cuda_stream_for(OP, device, &stream)) return ts_last_status();
  return cuda_dispatch_floating(OP, q->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    attn_params<DT> p;
    if (setup<DT>(OP, &p, q, k, v, bias, scale)) return ts_last_status();
    p.out_w = rows_of<cuda_storage_t<DT>>(out);
    p.lse_w = (cuda_acc_t<DT> *)ts_elem_ptr(lse);
    return with_head_dims(p, [&](auto dmax) -> int { return run_forward<DT, decltype(dmax)::value>(OP, p, stream, device); });
  });
}

// The bias-gradient grouping (as the CPU's plan_bias_groups): bias blocks of dbias's kept dims,
// each member list split into parts so that the launch has about TARGET_BLOCKS blocks.
template <int DT, int ROWS> static void plan_groups(attn_params<DT> *p, const ts_tensor *dbias) {
  if (!dbias) {
    p->groups = p->heads;
    p->members = p->parts = 1;
    return;
  }
  p->want_dbias = true;
  p->groups = 1;
  for (int d = 0; d < p->nlead; d++) {
    p->kept[d] = dbias->shape[d] > 1;
    if (p->kept[d]) p->groups *= p->lead_size[d];
  }
  p->members = p->groups ? p->heads / p->groups : 0;
  int64_t tiles = (p->nq + ROWS - 1) / ROWS, have = p->groups * tiles;
  int64_t parts = have >= TARGET_BLOCKS ? 1 : (TARGET_BLOCKS + have - 1) / have;
  p->parts = parts < 1 ? 1 : parts > p->members ? (p->members > 0 ? p->members : 1) : parts;
}

template <int DT, int DMAX>
static int run_backward(attn_params<DT> &p, ts_tensor *dq, ts_tensor *dk, ts_tensor *dv, ts_tensor *dbias,
                        cudaStream_t stream, int device) {
  using A = cuda_acc_t<DT>;
  constexpr int ROWS = rows_per_block<A, DMAX>();
  const char *op = OP_BACKWARD;
  // dK and dV: together while their accumulators fit in registers, else one launch each
  if (dk || dv) {
    size_t elems = (size_t)ROWS * (p.d_own + p.dv_own) + (size_t)QT * (p.d_pad + p.dv_pad) + 2 * QT +
                   (p.bias ? QT * (ROWS + 1) : 0);
    int64_t blocks = p.heads * ((p.nk + ROWS - 1) / ROWS);
    size_t bytes = elems * sizeof(A);
    int st = TS_OK;
    if constexpr (DMAX <= 64) {
      if (dk && dv) st = launch(op, attention_dkv_kernel<DT, DMAX, true, true>, blocks, ROWS, bytes, stream, device, p);
    }
    if (!(dk && dv && DMAX <= 64)) {
      st = dk ? launch(op, attention_dkv_kernel<DT, DMAX, true, false>, blocks, ROWS, bytes, stream, device, p) : TS_OK;
      if (!st && dv) st = launch(op, attention_dkv_kernel<DT, DMAX, false, true>, blocks, ROWS, bytes, stream, device, p);
    }
    if (st) return st;
  }
  if (!dq && !dbias) return TS_OK;
  plan_groups<DT, ROWS>(&p, dbias);
  int64_t block_elems = p.nq * p.nk;
  bool direct = dbias && p.parts == 1 && (DT == TS_F32 || DT == TS_F64); // accumulate into dbias itself
  cuda_scratch partial;
  if (dbias) {
    if (direct) p.dbias_acc = (A *)ts_elem_ptr(dbias);
    else if (partial.allocate(device, (size_t)(p.parts * p.groups * block_elems) * sizeof(A))) return ts_last_status();
    else p.dbias_acc = partial.as<A>();
  }
  size_t elems = (size_t)ROWS * (p.d_own + p.dv_own) + (size_t)KT * (p.d_pad + p.dv_pad) +
                 (p.bias ? ROWS * (KT + 1) : 0) + (dbias ? ROWS * (KT + 1) : 0);
  int64_t blocks = p.groups * p.parts * ((p.nq + ROWS - 1) / ROWS);
  int st = dq ? launch(op, attention_dq_kernel<DT, DMAX, true>, blocks, ROWS, elems * sizeof(A), stream, device, p)
              : launch(op, attention_dq_kernel<DT, DMAX, false>, blocks, ROWS, elems * sizeof(A), stream, device, p);
  if (st || !dbias || direct) return st;
  int64_t n = p.groups * block_elems;
  attention_dbias_kernel<DT><<<cuda_blocks(n), CUDA_THREADS, 0, stream>>>(n, p.parts, p.dbias_acc, cuda_data<DT>(dbias));
  return cuda_launched(op);
}

extern "C" int cuda_attention_backward(ts_tensor *dq, ts_tensor *dk, ts_tensor *dv, ts_tensor *dbias,
                                       const ts_tensor *dout, const ts_tensor *q, const ts_tensor *k,
                                       const ts_tensor *v, const ts_tensor *bias, const ts_tensor *out,
                                       const ts_tensor *lse, double scale) {
  const ts_tensor *all[10] = {q, k, v, bias, out, dout, dq, dk, dv, dbias};
  if (check_dtypes(OP_BACKWARD, all, 10, lse)) return ts_last_status();
  int device = q->device.index;
  cudaStream_t stream;
  if (cuda_stream_for(OP_BACKWARD, device, &stream)) return ts_last_status();
  if (!dbias || ts_numel(dbias) == 0) dbias = NULL;
  return cuda_dispatch_floating(OP_BACKWARD, q->dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    using A = cuda_acc_t<DT>;
    attn_params<DT> p;
    if (setup<DT>(OP_BACKWARD, &p, q, k, v, bias, scale)) return ts_last_status();
    p.out = rows_of<const cuda_storage_t<DT>>(out);
    p.dout = rows_of<const cuda_storage_t<DT>>(dout);
    p.dq = rows_of<cuda_storage_t<DT>>(dq);
    p.dk = rows_of<cuda_storage_t<DT>>(dk);
    p.dv_out = rows_of<cuda_storage_t<DT>>(dv);
    int64_t rows = p.heads * p.nq;
    cuda_scratch delta;
    if (delta.allocate(device, (size_t)(rows > 0 ? rows : 1) * sizeof(A))) return ts_last_status();
    p.delta = delta.as<A>();
    if (rows > 0) {
      attention_delta_kernel<DT><<<cuda_grid_for(rows, CUDA_THREADS / 32), CUDA_THREADS, 0, stream>>>(p, delta.as<A>());
      if (cuda_launched(OP_BACKWARD)) return ts_last_status();
    }
    p.lse = (const A *)ts_elem_ptr(lse); // the accumulation type (checked above)
    return with_head_dims(p, [&](auto dmax) -> int {
      return run_backward<DT, decltype(dmax)::value>(p, dq, dk, dv, dbias, stream, device);
    });
  });
}

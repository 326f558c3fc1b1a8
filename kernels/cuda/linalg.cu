// linalg.cu — matrix products on CUDA devices: the GEMM every product kernel goes through
// (cuda_gemm, declared in nn.cuh) and the backend's bmm.
//
// float32, float16 and bfloat16 go to cuBLASLt: float16/bfloat16 operands accumulate in float32,
// float32 runs in full float32 unless ts_cuda_set_allow_tf32 allows TF32 tensor cores. Like
// cudnn.torch, the matmul descriptor, the three layouts and the heuristic's algorithm are made
// once per shape (sizes, strides, transposes, pointer alignments, dtype, TF32 switch) and cached;
// the workspace comes from the tessera allocator, ordered on the device's stream. Shapes for which
// cuBLASLt offers no algorithm fall back to cublasGemmStridedBatchedEx. float64 runs through
// cublasDgemmStridedBatched. Handles are created per device on first use, bound to its stream.
//
// Row-major products map to the column-major libraries without copies: C = op(A) op(B) row-major
// is C^T = op(B)^T op(A)^T column-major, and a row-major matrix is its transpose column-major.
// Operands with a unit stride in one of their two matrix dims (transposed views included) are
// read in place; a batch stride of 0 reuses one matrix for the whole batch.
#include "nn.cuh"

#include <cublasLt.h>
#include <cublas_v2.h>

#include <array>
#include <climits>
#include <map>
#include <mutex>

bool cuda_tf32_allowed() { return ts_cuda_get_allow_tf32() != 0; }

// ---- handles ------------------------------------------------------------------------------------
namespace {
struct blas_device {
  std::once_flag once;
  cublasStatus_t error;
  const char *failed_call; // which creation step failed, for the message
  cublasLtHandle_t lt;
  cublasHandle_t blas;
};
blas_device blas_devices[CUDA_MAX_DEVICES];

void create_handles(blas_device *h, cudaStream_t stream) {
  h->failed_call = "cublasLtCreate";
  h->error = cublasLtCreate(&h->lt);
  if (h->error != CUBLAS_STATUS_SUCCESS) return;
  h->failed_call = "cublasCreate";
  h->error = cublasCreate(&h->blas);
  if (h->error != CUBLAS_STATUS_SUCCESS) return;
  h->failed_call = "cublasSetStream";
  h->error = cublasSetStream(h->blas, stream);
}
} // namespace

static int blas_check(cublasStatus_t st, const char *op, const char *call) {
  if (st == CUBLAS_STATUS_SUCCESS) return TS_OK;
  return ts_set_error(st == CUBLAS_STATUS_ALLOC_FAILED ? TS_ERR_MEMORY : TS_ERR_DEVICE, "%s: %s failed: %s (%s)", op,
                      call, cublasGetStatusName(st), cublasGetStatusString(st));
}

// The device's stream and library handles (created on first use with the device current).
static int blas_for(const char *op, int device, cudaStream_t *stream, blas_device **out) {
  if (cuda_stream_for(op, device, stream)) return ts_last_status();
  blas_device *h = &blas_devices[device];
  std::call_once(h->once, create_handles, h, *stream);
  if (h->error != CUBLAS_STATUS_SUCCESS) return blas_check(h->error, op, h->failed_call);
  *out = h;
  return TS_OK;
}

// ---- one operand as the column-major libraries see it -------------------------------------------
// The library operand X with op(X) = op(x)^T (op(x) is rows x cols): a row-major x is that
// transpose stored column-major (no transpose), a transposed x is op(x) itself (transpose).
namespace {
struct lib_operand {
  cublasOperation_t op;
  int64_t rows, cols, ld; // the matrix as stored, column-major
  int64_t batch_stride;
  const void *data;
};
} // namespace

static lib_operand library_view(const cuda_matrix &x, int64_t rows, int64_t cols) {
  lib_operand l = {x.trans ? CUBLAS_OP_T : CUBLAS_OP_N, x.trans ? rows : cols, x.trans ? cols : rows, x.ld,
                   x.batch_stride, x.data};
  // A single stored column never steps by ld, but the libraries still want ld >= rows >= 1.
  if (l.cols <= 1 && l.ld < l.rows) l.ld = l.rows;
  if (l.ld < 1) l.ld = 1;
  return l;
}

static cudaDataType library_type(int dtype) {
  switch (dtype) {
  case TS_F64: return CUDA_R_64F;
  case TS_F16: return CUDA_R_16F;
  case TS_BF16: return CUDA_R_16BF;
  default: return CUDA_R_32F;
  }
}

// The largest power of two (at most 256) dividing the address and every byte step of an operand:
// cuBLASLt picks algorithms by the alignment they may assume.
static int64_t alignment_of(const void *p, int64_t esz, int64_t ld, int64_t batch_stride) {
  uint64_t bits = (uint64_t)(uintptr_t)p | (uint64_t)(ld * esz) | (uint64_t)(batch_stride * esz) | 256;
  return (int64_t)(bits & (~bits + 1));
}

// ---- cuBLASLt plans, cached per shape ------------------------------------------------------------
namespace {
using plan_key = std::array<int64_t, 22>;

struct lt_plan {
  bool usable = false; // false: cuBLASLt has no algorithm for this shape; cuBLAS runs it instead
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo;
  size_t workspace = 0;
};

std::mutex lt_mutex; // guards the cache and the per-call bias pointer in a cached descriptor
std::map<plan_key, lt_plan> lt_plans;

constexpr uint64_t LT_MAX_WORKSPACE = (uint64_t)32 << 20;

struct gemm_call {
  int device, dtype;
  int64_t batch, n, m, k;
  lib_operand la, lb; // library A = our b, library B = our a
  void *c;
  int64_t ldc, c_batch_stride;
  double beta;
  const void *bias;
};

cublasStatus_t set_layout_batch(cublasLtMatrixLayout_t l, int64_t batch, int64_t stride) {
  if (batch <= 1) return CUBLAS_STATUS_SUCCESS;
  int32_t count = (int32_t)batch;
  cublasStatus_t st = cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof count);
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof stride);
  return st;
}

cublasStatus_t make_layout(cublasLtMatrixLayout_t *l, cudaDataType type, int64_t rows, int64_t cols, int64_t ld,
                           int64_t batch, int64_t stride) {
  cublasStatus_t st = cublasLtMatrixLayoutCreate(l, type, (uint64_t)rows, (uint64_t)cols, ld);
  return st == CUBLAS_STATUS_SUCCESS ? set_layout_batch(*l, batch, stride) : st;
}

cublasStatus_t set_desc(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr, const void *v, size_t size) {
  return cublasLtMatmulDescSetAttribute(d, attr, v, size);
}

// Builds the descriptors of a call and asks the heuristic for an algorithm; plan.usable says
// whether one was found. Only a failure to build descriptors is an error.
int build_plan(const char *op, cublasLtHandle_t lt, const gemm_call &g, bool tf32, lt_plan *plan) {
  cudaDataType type = library_type(g.dtype);
  cublasComputeType_t compute = g.dtype == TS_F32 && tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  cublasStatus_t st = cublasLtMatmulDescCreate(&plan->desc, compute, CUDA_R_32F);
  if (st == CUBLAS_STATUS_SUCCESS) st = set_desc(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &g.la.op, sizeof g.la.op);
  if (st == CUBLAS_STATUS_SUCCESS) st = set_desc(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &g.lb.op, sizeof g.lb.op);
  if (st == CUBLAS_STATUS_SUCCESS && g.bias) {
    cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    int32_t bias_type = (int32_t)type;
    st = set_desc(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof epilogue);
    if (st == CUBLAS_STATUS_SUCCESS) st = set_desc(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof bias_type);
    if (st == CUBLAS_STATUS_SUCCESS) st = set_desc(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof g.bias);
  }
  if (st == CUBLAS_STATUS_SUCCESS)
    st = make_layout(&plan->a, type, g.la.rows, g.la.cols, g.la.ld, g.batch, g.la.batch_stride);
  if (st == CUBLAS_STATUS_SUCCESS)
    st = make_layout(&plan->b, type, g.lb.rows, g.lb.cols, g.lb.ld, g.batch, g.lb.batch_stride);
  if (st == CUBLAS_STATUS_SUCCESS) st = make_layout(&plan->c, type, g.m, g.n, g.ldc, g.batch, g.c_batch_stride);
  if (st != CUBLAS_STATUS_SUCCESS) return blas_check(st, op, "cuBLASLt descriptor setup");

  cublasLtMatmulPreference_t pref;
  st = cublasLtMatmulPreferenceCreate(&pref);
  if (st != CUBLAS_STATUS_SUCCESS) return blas_check(st, op, "cublasLtMatmulPreferenceCreate");
  int64_t esz = ts_dtype_size(g.dtype);
  uint32_t align[4] = {(uint32_t)alignment_of(g.la.data, esz, g.la.ld, g.la.batch_stride),
                       (uint32_t)alignment_of(g.lb.data, esz, g.lb.ld, g.lb.batch_stride),
                       (uint32_t)alignment_of(g.c, esz, g.ldc, g.c_batch_stride), 0};
  align[3] = align[2];
  const cublasLtMatmulPreferenceAttributes_t align_attr[4] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &LT_MAX_WORKSPACE,
                                            sizeof LT_MAX_WORKSPACE);
  for (int i = 0; i < 4 && st == CUBLAS_STATUS_SUCCESS; i++)
    st = cublasLtMatmulPreferenceSetAttribute(pref, align_attr[i], &align[i], sizeof align[i]);
  cublasLtMatmulHeuristicResult_t result = {};
  int returned = 0;
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulAlgoGetHeuristic(lt, plan->desc, plan->a, plan->b, plan->c, plan->c, pref, 1, &result, &returned);
  cublasLtMatmulPreferenceDestroy(pref);
  // NOT_SUPPORTED and an empty answer both mean "no algorithm": the cuBLAS path takes over
  plan->usable = st == CUBLAS_STATUS_SUCCESS && returned > 0 && result.state == CUBLAS_STATUS_SUCCESS;
  if (plan->usable) {
    plan->algo = result.algo;
    plan->workspace = result.workspaceSize;
  }
  return TS_OK;
}

plan_key key_of(const gemm_call &g, bool tf32) {
  int64_t esz = ts_dtype_size(g.dtype);
  return {g.device, g.dtype, tf32, g.batch, g.n, g.m, g.k, g.la.op, g.la.ld, g.la.batch_stride, g.lb.op, g.lb.ld,
          g.lb.batch_stride, g.ldc, g.c_batch_stride, g.bias != nullptr,
          alignment_of(g.la.data, esz, g.la.ld, g.la.batch_stride),
          alignment_of(g.lb.data, esz, g.lb.ld, g.lb.batch_stride), alignment_of(g.c, esz, g.ldc, g.c_batch_stride),
          g.bias ? alignment_of(g.bias, esz, 0, 0) : 0, g.la.rows, g.lb.rows};
}
} // namespace

// Runs the call through cuBLASLt when it has an algorithm for it; *ran says whether it did.
static int lt_matmul(const char *op, blas_device *h, cudaStream_t stream, const gemm_call &g, bool *ran) {
  bool tf32 = cuda_tf32_allowed();
  std::lock_guard<std::mutex> lock(lt_mutex);
  plan_key key = key_of(g, tf32);
  auto found = lt_plans.find(key);
  if (found == lt_plans.end()) {
    lt_plan plan;
    if (build_plan(op, h->lt, g, tf32, &plan)) return ts_last_status();
    found = lt_plans.emplace(key, plan).first;
  }
  const lt_plan &plan = found->second;
  *ran = plan.usable;
  if (!plan.usable) return TS_OK;
  if (g.bias && blas_check(set_desc(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof g.bias), op,
                           "cublasLtMatmulDescSetAttribute"))
    return ts_last_status();
  cuda_scratch workspace;
  if (workspace.allocate(g.device, plan.workspace)) return ts_last_status();
  float alpha = 1.0f, beta = (float)g.beta;
  return blas_check(cublasLtMatmul(h->lt, plan.desc, &alpha, g.la.data, plan.a, g.lb.data, plan.b, &beta, g.c, plan.c,
                                   g.c, plan.c, &plan.algo, workspace.ptr, plan.workspace, stream),
                    op, "cublasLtMatmul");
}

// ---- cuBLAS: float64 and what cuBLASLt does not take --------------------------------------------
static int blas_matmul(const char *op, blas_device *h, const gemm_call &g) {
  const lib_operand &A = g.la, &B = g.lb;
  if (g.dtype == TS_F64) {
    double alpha = 1.0, beta = g.beta;
    return blas_check(cublasDgemmStridedBatched(h->blas, A.op, B.op, (int)g.m, (int)g.n, (int)g.k, &alpha,
                                                (const double *)A.data, (int)A.ld, A.batch_stride,
                                                (const double *)B.data, (int)B.ld, B.batch_stride, &beta,
                                                (double *)g.c, (int)g.ldc, g.c_batch_stride, (int)g.batch),
                      op, "cublasDgemmStridedBatched");
  }
  cudaDataType type = library_type(g.dtype);
  cublasComputeType_t compute = g.dtype == TS_F32 && cuda_tf32_allowed() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  float alpha = 1.0f, beta = (float)g.beta;
  return blas_check(cublasGemmStridedBatchedEx(h->blas, A.op, B.op, (int)g.m, (int)g.n, (int)g.k, &alpha, A.data,
                                               type, (int)A.ld, A.batch_stride, B.data, type, (int)B.ld,
                                               B.batch_stride, &beta, g.c, type, (int)g.ldc, g.c_batch_stride,
                                               (int)g.batch, compute, CUBLAS_GEMM_DEFAULT),
                    op, "cublasGemmStridedBatchedEx");
}

// ---- rows of C: beta * C + bias -----------------------------------------------------------------
// Where the library cannot add the bias itself (and for k = 0) the rows are prepared here.
template <int DT>
static __global__ void prepare_rows_kernel(int64_t total, int64_t n, int64_t m, cuda_storage_t<DT> *c, int64_t ldc,
                                           int64_t c_batch_stride, const cuda_storage_t<DT> *bias, bool keep) {
  using A = cuda_acc_t<DT>;
  CUDA_GRID_STRIDE(i, total) {
    int64_t j = i % m, r = i / m % n, b = i / (m * n), at = b * c_batch_stride + r * ldc + j;
    A v = keep ? cuda_load<DT>(c, at) : (A)0;
    if (bias) v += cuda_load<DT>(bias, j);
    cuda_store<DT>(c, at, v);
  }
}

static int prepare_rows(const char *op, cudaStream_t stream, const gemm_call &g, bool keep) {
  int64_t total = g.batch * g.n * g.m;
  return cuda_dispatch_floating(op, g.dtype, [&](auto tag) -> int {
    constexpr int DT = decltype(tag)::value;
    using T = cuda_storage_t<DT>;
    prepare_rows_kernel<DT><<<cuda_blocks(total), CUDA_THREADS, 0, stream>>>(
        total, g.n, g.m, (T *)g.c, g.ldc, g.c_batch_stride, (const T *)g.bias, keep);
    return cuda_launched(op);
  });
}

static int check_int_sizes(const char *op, const gemm_call &g) {
  int64_t sizes[7] = {g.batch, g.n, g.m, g.k, g.la.ld, g.lb.ld, g.ldc};
  for (int i = 0; i < 7; i++)
    if (sizes[i] > INT_MAX)
      return ts_set_error(TS_ERR_UNSUPPORTED, "%s: a matrix dim or stride of %lld exceeds what cuBLAS accepts (%d)", op,
                          (long long)sizes[i], INT_MAX);
  return TS_OK;
}

int cuda_gemm(const char *op, int device, int dtype, int64_t batch, int64_t n, int64_t m, int64_t k,
              const cuda_matrix &a, const cuda_matrix &b, void *c, int64_t ldc, int64_t c_batch_stride, double beta,
              const void *bias) {
  if (batch <= 0 || n <= 0 || m <= 0) return TS_OK;
  cudaStream_t stream;
  blas_device *h = nullptr;
  if (blas_for(op, device, &stream, &h)) return ts_last_status();
  gemm_call g = {device, dtype, batch, n, m, k, library_view(b, k, m), library_view(a, n, k), c,
                 ldc < m ? m : ldc, batch > 1 ? c_batch_stride : 0, beta, bias};
  if (batch <= 1) g.la.batch_stride = g.lb.batch_stride = 0;
  if (k <= 0) return prepare_rows(op, stream, g, beta != 0);
  if (check_int_sizes(op, g)) return ts_last_status();
  if (dtype != TS_F64) {
    bool ran = false;
    if (lt_matmul(op, h, stream, g, &ran)) return ts_last_status();
    if (ran) return TS_OK;
  }
  if (bias) { // the rows start as beta * C + bias, the product adds to them
    if (prepare_rows(op, stream, g, beta != 0)) return ts_last_status();
    g.beta = 1.0;
    g.bias = nullptr;
  }
  return blas_matmul(op, h, g);
}

// ---- bmm ----------------------------------------------------------------------------------------
// The row-major view of a rows x cols matrix with element strides (rs, cs), as the CPU's
// blas_layout: false when it is strided in both dims. A dim of size 1 never stands in the way.
static bool matrix_layout(int64_t rows, int64_t cols, int64_t rs, int64_t cs, bool *trans, int64_t *ld) {
  int64_t row_len = cols > 1 ? cols : 1, col_len = rows > 1 ? rows : 1;
  if ((cols == 1 || cs == 1) && (rows == 1 || rs >= row_len)) {
    *trans = false;
    *ld = rows == 1 ? row_len : rs;
    return true;
  }
  if ((rows == 1 || rs == 1) && (cols == 1 || cs >= col_len)) {
    *trans = true;
    *ld = cols == 1 ? col_len : cs;
    return true;
  }
  return false;
}

// t ([B, rows, cols], any strides) as a GEMM operand, copied to contiguous memory (*copy) only
// when its matrices are strided in both dims; a broadcast batch is copied once.
static int prepare_operand(const ts_tensor *t, cuda_matrix *mat, ts_tensor **copy) {
  int64_t rows = t->shape[1], cols = t->shape[2];
  *copy = NULL;
  *mat = {ts_elem_ptr(t), false, 0, t->stride[0]};
  if (matrix_layout(rows, cols, t->stride[1], t->stride[2], &mat->trans, &mat->ld)) return TS_OK;
  int64_t shape[3] = {t->stride[0] == 0 ? 1 : t->shape[0], rows, cols};
  ts_tensor *src = ts_tensor_over(t->storage, 3, shape, t->stride, t->offset, t->dtype);
  *copy = src ? ts_empty(3, shape, t->dtype, t->device) : NULL;
  int st = *copy ? cuda_copy(*copy, src) : ts_last_status();
  ts_release(src);
  if (st) return st;
  *mat = {ts_elem_ptr(*copy), false, cols > 1 ? cols : 1, t->stride[0] == 0 ? 0 : rows * cols};
  return TS_OK;
}

// out's matrices as a GEMM destination: rows with unit element stride; false when it has none.
static bool output_layout(const ts_tensor *out, int64_t *ldc) {
  int64_t n = out->shape[1], m = out->shape[2];
  if (m > 1 && out->stride[2] != 1) return false;
  *ldc = n > 1 ? out->stride[1] : m;
  return *ldc >= m && (out->shape[0] <= 1 || out->stride[0] != 0);
}

extern "C" int cuda_bmm(ts_tensor *out, const ts_tensor *a, const ts_tensor *b) {
  const char *op = "matmul";
  int64_t batch = out->shape[0], n = out->shape[1], m = out->shape[2], k = a->shape[2];
  if (batch == 0 || n == 0 || m == 0) return TS_OK;
  if (a->dtype != out->dtype || b->dtype != out->dtype || !cuda_is_floating(out->dtype))
    return ts_set_error(TS_ERR_DTYPE, "%s: the cuda kernel takes floating operands of one dtype, got %s @ %s into %s", op,
                        ts_dtype_name(a->dtype), ts_dtype_name(b->dtype), ts_dtype_name(out->dtype));
  if (k == 0) return cuda_fill(out, 0); // an empty sum
  cuda_matrix am, bm;
  ts_tensor *a_copy = NULL, *b_copy = NULL, *dst = NULL;
  int st = prepare_operand(a, &am, &a_copy);
  if (!st) st = prepare_operand(b, &bm, &b_copy);
  int64_t ldc = m, c_stride = n * m;
  if (!st && output_layout(out, &ldc)) {
    c_stride = out->stride[0];
  } else if (!st) { // an output strided in both dims: computed contiguous, then copied in
    ldc = m;
    dst = ts_empty(3, out->shape, out->dtype, out->device);
    if (!dst) st = ts_last_status();
  }
  if (!st)
    st = cuda_gemm(op, out->device.index, out->dtype, batch, n, m, k, am, bm, ts_elem_ptr(dst ? dst : out), ldc,
                   c_stride, 0.0, NULL);
  if (!st && dst) st = cuda_copy(out, dst);
  ts_release(a_copy);
  ts_release(b_copy);
  ts_release(dst);
  return st;
}

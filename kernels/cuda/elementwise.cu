// elementwise.cu — unary, binary, where and clamp on CUDA devices, with the semantics of
// kernels/cpu/elementwise.c op for op (floor-mod, NaN-propagating maximum/minimum, integer
// floor division by zero is an error, predicates write bool).
//
// Kernels compute in float32, float64 or int64 like the CPU's, except that float16 and bfloat16
// stay in their storage type end to end: each element is widened to float, computed in float and
// rounded back once, which is what the CPU's convert-compute-convert gives, without the two
// extra passes over memory. Each op is a functor; a kernel is one (op, dtype) instance of the
// strided loop in loop.cuh.
#include "loop.cuh"

#include <math.h>
#include <type_traits>

extern "C" int cuda_compute_dtype(int dtype) {
  switch (dtype) {
  case TS_F32: case TS_F64: case TS_F16: case TS_BF16: return dtype;
  default: return TS_I64;
  }
}

// Op functors and kernel bodies have internal linkage: another .cu may reuse a name.
namespace {

// ---- floating ops: templates over float and double ---------------------------------------------
// No expression below multiplies and then adds, so no fused multiply-add can make the GPU round
// differently from the CPU; the math functions themselves differ from glibc by an ulp or two.
#define FLOAT_OP1(NAME, EXPR) \
  struct NAME { template <typename T> __host__ __device__ T operator()(T x) const { return EXPR; } };
#define FLOAT_PRED1(NAME, EXPR) \
  struct NAME { template <typename T> __host__ __device__ bool operator()(T x) const { return EXPR; } };
#define FLOAT_OP2(NAME, EXPR) \
  struct NAME { template <typename T> __host__ __device__ T operator()(T x, T y) const { return EXPR; } };
#define ANY_PRED2(NAME, EXPR) \
  struct NAME { template <typename T> __host__ __device__ bool operator()(T x, T y) const { return EXPR; } };

FLOAT_OP1(f_neg, -x)
FLOAT_OP1(f_abs, fabs(x))
FLOAT_OP1(f_sign, x != x ? x : (T)((x > 0) - (x < 0)))
FLOAT_OP1(f_exp, exp(x))
FLOAT_OP1(f_expm1, expm1(x))
FLOAT_OP1(f_log, log(x))
FLOAT_OP1(f_log1p, log1p(x))
FLOAT_OP1(f_sqrt, sqrt(x))
FLOAT_OP1(f_rsqrt, (T)1 / sqrt(x)) // not rsqrt(): that one is 2 ulp off the CPU's 1/sqrt
FLOAT_OP1(f_tanh, tanh(x))
FLOAT_OP1(f_sigmoid, (T)1 / ((T)1 + exp(-x)))
FLOAT_OP1(f_erf, erf(x))
FLOAT_OP1(f_relu, x > 0 ? x : (x != x ? x : (T)0))
FLOAT_OP1(f_gelu, (T)0.5 * x * ((T)1 + erf(x * (T)0.70710678118654752440)))
FLOAT_OP1(f_silu, x / ((T)1 + exp(-x)))
FLOAT_OP1(f_sin, sin(x))
FLOAT_OP1(f_cos, cos(x))
FLOAT_OP1(f_floor, floor(x))
FLOAT_OP1(f_ceil, ceil(x))
FLOAT_OP1(f_round, rint(x)) // half to even, as nearbyint
FLOAT_OP1(f_trunc, trunc(x))
FLOAT_OP1(f_reciprocal, (T)1 / x)
FLOAT_OP1(f_square, x * x)
FLOAT_PRED1(f_logical_not, x == 0)
FLOAT_PRED1(f_isnan, x != x)
FLOAT_PRED1(f_isinf, fabs(x) == (T)INFINITY)
FLOAT_PRED1(f_isfinite, fabs(x) < (T)INFINITY)

template <typename T> __host__ __device__ T floor_mod(T x, T y) {
  T r = fmod(x, y);
  return r != 0 && ((r < 0) != (y < 0)) ? r + y : r;
}
FLOAT_OP2(f_add, x + y)
FLOAT_OP2(f_sub, x - y)
FLOAT_OP2(f_mul, x * y)
FLOAT_OP2(f_div, x / y)
FLOAT_OP2(f_pow, pow(x, y))
FLOAT_OP2(f_maximum, x != x || y != y ? x + y : x > y ? x : y) // x + y: the NaN
FLOAT_OP2(f_minimum, x != x || y != y ? x + y : x < y ? x : y)
FLOAT_OP2(f_remainder, floor_mod(x, y))
FLOAT_OP2(f_floor_divide, floor(x / y))
FLOAT_OP2(f_atan2, atan2(x, y))
// comparisons and logical ops: one template serves the floating and the int64 kernels
ANY_PRED2(p_eq, x == y)
ANY_PRED2(p_ne, x != y)
ANY_PRED2(p_lt, x < y)
ANY_PRED2(p_le, x <= y)
ANY_PRED2(p_gt, x > y)
ANY_PRED2(p_ge, x >= y)
ANY_PRED2(p_logical_and, x != 0 && y != 0)
ANY_PRED2(p_logical_or, x != 0 || y != 0)
ANY_PRED2(p_logical_xor, (x != 0) != (y != 0))

// ---- int64 ops: every integer and bool dtype computes here; overflow wraps ----------------------
__host__ __device__ int64_t wrap_add(int64_t x, int64_t y) { return (int64_t)((uint64_t)x + (uint64_t)y); }
__host__ __device__ int64_t wrap_sub(int64_t x, int64_t y) { return (int64_t)((uint64_t)x - (uint64_t)y); }
__host__ __device__ int64_t wrap_mul(int64_t x, int64_t y) { return (int64_t)((uint64_t)x * (uint64_t)y); }
__host__ __device__ int64_t wrap_neg(int64_t x) { return (int64_t)(0 - (uint64_t)x); }

#define INT_OP1(NAME, EXPR) struct NAME { __host__ __device__ int64_t operator()(int64_t x) const { return EXPR; } };
#define INT_PRED1(NAME, EXPR) struct NAME { __host__ __device__ bool operator()(int64_t x) const { return EXPR; } };
#define INT_OP2(NAME, EXPR) struct NAME { __host__ __device__ int64_t operator()(int64_t x, int64_t y) const { return EXPR; } };

INT_OP1(i_neg, wrap_neg(x))
INT_OP1(i_abs, x < 0 ? wrap_neg(x) : x)
INT_OP1(i_sign, (x > 0) - (x < 0))
INT_OP1(i_relu, x > 0 ? x : 0)
INT_OP1(i_square, wrap_mul(x, x))
INT_OP1(i_identity, x) // floor, ceil, round and trunc of an integer
INT_PRED1(i_logical_not, x == 0)
struct i_false { __host__ __device__ bool operator()(int64_t) const { return false; } }; // isnan, isinf
struct i_true { __host__ __device__ bool operator()(int64_t) const { return true; } };   // isfinite

INT_OP2(i_add, wrap_add(x, y))
INT_OP2(i_sub, wrap_sub(x, y))
INT_OP2(i_mul, wrap_mul(x, y))
INT_OP2(i_maximum, x > y ? x : y)
INT_OP2(i_minimum, x < y ? x : y)

struct i_pow {
  __host__ __device__ int64_t operator()(int64_t base, int64_t e) const {
    if (e < 0) return base == 1 ? 1 : base == -1 ? (e % 2 ? -1 : 1) : 0;
    uint64_t r = 1, b = (uint64_t)base;
    for (; e; e >>= 1, b *= b)
      if (e & 1) r *= b;
    return (int64_t)r;
  }
};

// A division by zero cannot stop a kernel: it raises *zero_division, which the host reads back.
struct i_floor_divide {
  int *zero_division;
  __host__ __device__ int64_t operator()(int64_t x, int64_t y) const {
    if (y == 0) { *zero_division = 1; return 0; }
    if (x == INT64_MIN && y == -1) return INT64_MIN;
    int64_t q = x / y;
    return (x % y != 0 && ((x < 0) != (y < 0))) ? q - 1 : q;
  }
};
struct i_remainder {
  int *zero_division;
  __host__ __device__ int64_t operator()(int64_t x, int64_t y) const {
    if (y == 0) { *zero_division = 1; return 0; }
    if (y == -1) return 0;
    int64_t r = x % y;
    return r != 0 && ((r < 0) != (y < 0)) ? r + y : r;
  }
};

// ---- the kernels: load as the compute type, apply, store as the output dtype --------------------
template <int DO, int DA, typename Op> struct unary_fn {
  cuda_storage_t<DO> *out;
  const cuda_storage_t<DA> *a;
  Op op;
  __host__ __device__ void operator()(const int64_t (&off)[2]) const {
    out[off[0]] = cuda_from_compute<DO>(op(cuda_to_compute<DA>(a[off[1]])));
  }
};

template <int DO, int DA, typename Op> struct binary_fn {
  cuda_storage_t<DO> *out;
  const cuda_storage_t<DA> *a, *b;
  Op op;
  __host__ __device__ void operator()(const int64_t (&off)[3]) const {
    out[off[0]] = cuda_from_compute<DO>(op(cuda_to_compute<DA>(a[off[1]]), cuda_to_compute<DA>(b[off[2]])));
  }
};
} // namespace

template <int DO, int DA, typename Op>
static int run_unary(const char *name, ts_tensor *out, const ts_tensor *a, Op op) {
  const ts_tensor *ops[2] = {out, a};
  return cuda_foreach(name, ops, unary_fn<DO, DA, Op>{cuda_data<DO>(out), cuda_data<DA>(a), op});
}

template <int DO, int DA, typename Op>
static int run_binary(const char *name, ts_tensor *out, const ts_tensor *a, const ts_tensor *b, Op op) {
  const ts_tensor *ops[3] = {out, a, b};
  return cuda_foreach(name, ops, binary_fn<DO, DA, Op>{cuda_data<DO>(out), cuda_data<DA>(a), cuda_data<DA>(b), op});
}

static int not_defined(const char *name, int dtype) {
  return ts_set_error(TS_ERR_DTYPE, "%s: not defined for %s on cuda", name, ts_dtype_name(dtype));
}

// The runtime hands kernels their compute dtype (bool out for predicates): anything else is a bug
// upstream, and a wrong element size on a GPU corrupts memory silently, so it is refused.
static int check_dtypes(const char *name, const ts_tensor *out, const ts_tensor *a, bool predicate) {
  int want = predicate ? TS_BOOL : a->dtype;
  if (cuda_compute_dtype(a->dtype) != a->dtype || out->dtype != want)
    return ts_set_error(TS_ERR_DTYPE, "%s: the cuda kernel takes a compute dtype into %s, got %s into %s", name,
                        predicate ? "bool" : "the same dtype", ts_dtype_name(a->dtype), ts_dtype_name(out->dtype));
  return TS_OK;
}

// ---- unary ---------------------------------------------------------------------------------------
static bool unary_is_predicate(int op) { return op >= TS_LOGICAL_NOT; }

template <int DA> static int unary_float(int op, ts_tensor *out, const ts_tensor *a) {
  const char *name = ts_unary_op_name(op);
#define OP(CODE, FN) case CODE: return run_unary<DA, DA>(name, out, a, FN{})
#define PRED(CODE, FN) case CODE: return run_unary<TS_BOOL, DA>(name, out, a, FN{})
  switch (op) {
  OP(TS_NEG, f_neg); OP(TS_ABS, f_abs); OP(TS_SIGN, f_sign); OP(TS_EXP, f_exp); OP(TS_EXPM1, f_expm1);
  OP(TS_LOG, f_log); OP(TS_LOG1P, f_log1p); OP(TS_SQRT, f_sqrt); OP(TS_RSQRT, f_rsqrt); OP(TS_TANH, f_tanh);
  OP(TS_SIGMOID, f_sigmoid); OP(TS_ERF, f_erf); OP(TS_RELU, f_relu); OP(TS_GELU, f_gelu); OP(TS_SILU, f_silu);
  OP(TS_SIN, f_sin); OP(TS_COS, f_cos); OP(TS_FLOOR, f_floor); OP(TS_CEIL, f_ceil); OP(TS_ROUND, f_round);
  OP(TS_TRUNC, f_trunc); OP(TS_RECIPROCAL, f_reciprocal); OP(TS_SQUARE, f_square);
  PRED(TS_LOGICAL_NOT, f_logical_not); PRED(TS_ISNAN, f_isnan); PRED(TS_ISINF, f_isinf);
  PRED(TS_ISFINITE, f_isfinite);
  default: return ts_set_error(TS_ERR_ARG, "unary: invalid op %d", op);
  }
#undef OP
#undef PRED
}

static int unary_int(int op, ts_tensor *out, const ts_tensor *a) {
  const char *name = ts_unary_op_name(op);
#define OP(CODE, FN) case CODE: return run_unary<TS_I64, TS_I64>(name, out, a, FN{})
#define PRED(CODE, FN) case CODE: return run_unary<TS_BOOL, TS_I64>(name, out, a, FN{})
  switch (op) {
  OP(TS_NEG, i_neg); OP(TS_ABS, i_abs); OP(TS_SIGN, i_sign); OP(TS_RELU, i_relu); OP(TS_SQUARE, i_square);
  OP(TS_FLOOR, i_identity); OP(TS_CEIL, i_identity); OP(TS_ROUND, i_identity); OP(TS_TRUNC, i_identity);
  PRED(TS_LOGICAL_NOT, i_logical_not); PRED(TS_ISNAN, i_false); PRED(TS_ISINF, i_false); PRED(TS_ISFINITE, i_true);
  default: return not_defined(name, TS_I64); // float-only ops: the runtime converts to float first
  }
#undef OP
#undef PRED
}

extern "C" int cuda_unary(int op, ts_tensor *out, const ts_tensor *a) {
  if (check_dtypes(ts_unary_op_name(op), out, a, unary_is_predicate(op))) return ts_last_status();
  switch (a->dtype) {
  case TS_F32: return unary_float<TS_F32>(op, out, a);
  case TS_F64: return unary_float<TS_F64>(op, out, a);
  case TS_F16: return unary_float<TS_F16>(op, out, a);
  case TS_BF16: return unary_float<TS_BF16>(op, out, a);
  default: return unary_int(op, out, a);
  }
}

// ---- binary --------------------------------------------------------------------------------------
static bool binary_is_predicate(int op) { return op >= TS_EQ; }

template <int DA> static int binary_predicate(int op, ts_tensor *out, const ts_tensor *a, const ts_tensor *b) {
  const char *name = ts_binary_op_name(op);
#define PRED(CODE, FN) case CODE: return run_binary<TS_BOOL, DA>(name, out, a, b, FN{})
  switch (op) {
  PRED(TS_EQ, p_eq); PRED(TS_NE, p_ne); PRED(TS_LT, p_lt); PRED(TS_LE, p_le); PRED(TS_GT, p_gt); PRED(TS_GE, p_ge);
  PRED(TS_LOGICAL_AND, p_logical_and); PRED(TS_LOGICAL_OR, p_logical_or); PRED(TS_LOGICAL_XOR, p_logical_xor);
  default: return ts_set_error(TS_ERR_ARG, "binary: invalid op %d", op);
  }
#undef PRED
}

template <int DA> static int binary_float(int op, ts_tensor *out, const ts_tensor *a, const ts_tensor *b) {
  const char *name = ts_binary_op_name(op);
#define OP(CODE, FN) case CODE: return run_binary<DA, DA>(name, out, a, b, FN{})
  switch (op) {
  OP(TS_ADD, f_add); OP(TS_SUB, f_sub); OP(TS_MUL, f_mul); OP(TS_DIV, f_div); OP(TS_POW, f_pow);
  OP(TS_MAXIMUM, f_maximum); OP(TS_MINIMUM, f_minimum); OP(TS_REMAINDER, f_remainder);
  OP(TS_FLOOR_DIVIDE, f_floor_divide); OP(TS_ATAN2, f_atan2);
  default: return binary_predicate<DA>(op, out, a, b);
  }
#undef OP
}

// Integer floor division and remainder: the kernel flags a zero divisor, the host waits to read it.
template <typename Op> static int binary_int_dividing(const char *name, ts_tensor *out, const ts_tensor *a, const ts_tensor *b) {
  int device = out->device.index, raised = 0;
  cudaStream_t stream;
  int *flag = (int *)cuda_alloc(sizeof(int), device);
  if (!flag) return ts_last_status();
  int st = cuda_stream_for(name, device, &stream);
  if (!st) st = cuda_check(cudaMemsetAsync(flag, 0, sizeof(int), stream), name);
  if (!st) st = run_binary<TS_I64, TS_I64>(name, out, a, b, Op{flag});
  if (!st) st = cuda_copy_to_host(&raised, flag, sizeof raised, device);
  cuda_free(flag, sizeof(int), device);
  if (!st && raised) st = ts_set_error(TS_ERR_ARG, "%s: integer division by zero", name);
  return st;
}

static int binary_int(int op, ts_tensor *out, const ts_tensor *a, const ts_tensor *b) {
  const char *name = ts_binary_op_name(op);
#define OP(CODE, FN) case CODE: return run_binary<TS_I64, TS_I64>(name, out, a, b, FN{})
  switch (op) {
  OP(TS_ADD, i_add); OP(TS_SUB, i_sub); OP(TS_MUL, i_mul); OP(TS_POW, i_pow);
  OP(TS_MAXIMUM, i_maximum); OP(TS_MINIMUM, i_minimum);
  case TS_REMAINDER: return binary_int_dividing<i_remainder>(name, out, a, b);
  case TS_FLOOR_DIVIDE: return binary_int_dividing<i_floor_divide>(name, out, a, b);
  case TS_DIV: case TS_ATAN2: return not_defined(name, TS_I64); // the runtime converts to float first
  default: return binary_predicate<TS_I64>(op, out, a, b);
  }
#undef OP
}

extern "C" int cuda_binary(int op, ts_tensor *out, const ts_tensor *a, const ts_tensor *b) {
  const char *name = ts_binary_op_name(op);
  if (check_dtypes(name, out, a, binary_is_predicate(op))) return ts_last_status();
  if (b->dtype != a->dtype)
    return ts_set_error(TS_ERR_DTYPE, "%s: the cuda kernel takes operands of one dtype, got %s and %s", name,
                        ts_dtype_name(a->dtype), ts_dtype_name(b->dtype));
  switch (a->dtype) {
  case TS_F32: return binary_float<TS_F32>(op, out, a, b);
  case TS_F64: return binary_float<TS_F64>(op, out, a, b);
  case TS_F16: return binary_float<TS_F16>(op, out, a, b);
  case TS_BF16: return binary_float<TS_BF16>(op, out, a, b);
  default: return binary_int(op, out, a, b);
  }
}

// ---- where: moves values without arithmetic, so one kernel per element size ---------------------
namespace {
template <typename T> struct where_fn {
  T *out;
  const uint8_t *cond;
  const T *a, *b;
  __host__ __device__ void operator()(const int64_t (&off)[4]) const { out[off[0]] = cond[off[1]] ? a[off[2]] : b[off[3]]; }
};
} // namespace

template <typename T> static int run_where(ts_tensor *out, const ts_tensor *cond, const ts_tensor *a, const ts_tensor *b) {
  const ts_tensor *ops[4] = {out, cond, a, b};
  return cuda_foreach("where", ops, where_fn<T>{(T *)ts_elem_ptr(out), (const uint8_t *)ts_elem_ptr(cond),
                                                (const T *)ts_elem_ptr(a), (const T *)ts_elem_ptr(b)});
}

extern "C" int cuda_where(ts_tensor *out, const ts_tensor *cond, const ts_tensor *a, const ts_tensor *b) {
  if (cond->dtype != TS_BOOL || a->dtype != out->dtype || b->dtype != out->dtype)
    return ts_set_error(TS_ERR_DTYPE, "where: the cuda kernel takes a bool condition and values of the output's "
                        "dtype %s, got %s, %s and %s", ts_dtype_name(out->dtype), ts_dtype_name(cond->dtype),
                        ts_dtype_name(a->dtype), ts_dtype_name(b->dtype));
  return cuda_dispatch_size(out->dtype,
                            [&](auto e) { return run_where<typename decltype(e)::type>(out, cond, a, b); });
}

// ---- clamp ---------------------------------------------------------------------------------------
namespace {
template <typename T> struct clamp_op {
  T lo, hi;
  bool has_lo, has_hi;
  __host__ __device__ T operator()(T x) const {
    if constexpr (std::is_integral<T>::value) { // int64: no NaN to pass through
      return has_lo && x < lo ? lo : has_hi && x > hi ? hi : x;
    } else {
      return x != x ? x : has_lo && x < lo ? lo : has_hi && x > hi ? hi : x;
    }
  }
};
} // namespace

extern "C" int cuda_clamp(ts_tensor *out, const ts_tensor *a, double lo, double hi, int has_lo, int has_hi) {
  if (check_dtypes("clamp", out, a, false)) return ts_last_status();
  return cuda_dispatch_dtype("clamp", a->dtype, [&](auto tag) {
    constexpr int D = decltype(tag)::value;
    if constexpr (D == TS_I64) {
      // integer bounds round inward (clamp(x, 0.5) keeps x >= 1) and saturate instead of overflowing
      clamp_op<int64_t> op = {cuda_saturate_i64(ceil(lo)), cuda_saturate_i64(floor(hi)), has_lo != 0, has_hi != 0};
      return run_unary<D, D>("clamp", out, a, op);
    } else if constexpr (cuda_is_floating(D)) {
      using T = cuda_compute_t<D>;
      return run_unary<D, D>("clamp", out, a, clamp_op<T>{(T)lo, (T)hi, has_lo != 0, has_hi != 0});
    } else {
      return not_defined("clamp", D); // check_dtypes lets only compute dtypes through
    }
  });
}

// ---- unary backward: gx = g * f'(x), written with x and y = f(x) --------------------------------
// The formulas of kernels/cpu/elementwise.c, evaluated in the same order. Every product that feeds
// a sum goes through the explicitly rounded intrinsics, which the compiler never fuses into a
// multiply-add, so the GPU rounds each step as the CPU does; float16 and bfloat16 compute in float
// (the CPU's compute dtype for them) and round once when stored.
namespace {
// The CPU's float erf (a rational function on [-4, 4], kernels/cpu/elementwise.c); double uses erf.
__device__ __forceinline__ float cpu_erf(float x) {
  x = x < -4.f ? -4.f : x > 4.f ? 4.f : x;
  float x2 = __fmul_rn(x, x);
  float p = __fadd_rn(__fmul_rn(x2, -2.72614225801306e-10f), 2.77068142495902e-08f);
  p = __fadd_rn(__fmul_rn(x2, p), -2.10102402082508e-06f);
  p = __fadd_rn(__fmul_rn(x2, p), -5.69250639462346e-05f);
  p = __fadd_rn(__fmul_rn(x2, p), -7.34990630326855e-04f);
  p = __fadd_rn(__fmul_rn(x2, p), -2.95459980854025e-03f);
  p = __fadd_rn(__fmul_rn(x2, p), -1.60960333262415e-02f);
  float q = __fadd_rn(__fmul_rn(x2, -1.45660718464996e-05f), -2.13374055278905e-04f);
  q = __fadd_rn(__fmul_rn(x2, q), -1.68282697438203e-03f);
  q = __fadd_rn(__fmul_rn(x2, q), -7.37332916720468e-03f);
  q = __fadd_rn(__fmul_rn(x2, q), -1.42647390514189e-02f);
  return __fmul_rn(x, p) / q;
}
__device__ __forceinline__ double cpu_erf(double x) { return erf(x); }

template <typename T> __device__ T unary_derivative(int op, T g, T x, T y) {
  const T one = 1, zero = 0;
  switch (op) {
  case TS_NEG: return -g;
  case TS_ABS: return x > 0 ? g : x < 0 ? -g : zero;
  case TS_EXP: return cuda_mul_rn(g, y);
  case TS_EXPM1: return cuda_mul_rn(g, cuda_add_rn(y, one));
  case TS_LOG: return g / x;
  case TS_LOG1P: return g / cuda_add_rn(x, one);
  case TS_SQRT: return g / cuda_mul_rn((T)2, y);
  case TS_RSQRT: return cuda_mul_rn(cuda_mul_rn(cuda_mul_rn(cuda_mul_rn((T)-0.5, g), y), y), y);
  case TS_TANH: return cuda_mul_rn(g, cuda_sub_rn(one, cuda_mul_rn(y, y)));
  case TS_SIGMOID: return cuda_mul_rn(cuda_mul_rn(g, y), cuda_sub_rn(one, y));
  case TS_ERF: return cuda_mul_rn(cuda_mul_rn(g, (T)1.12837916709551257390), exp(cuda_mul_rn(-x, x)));
  case TS_RELU: return y > 0 ? g : zero;
  case TS_GELU: {
    T cdf = cuda_mul_rn((T)0.5, cuda_add_rn(one, cpu_erf(cuda_mul_rn(x, (T)0.70710678118654752440))));
    T pdf = cuda_mul_rn(cuda_mul_rn(x, (T)0.39894228040143267794), exp(cuda_mul_rn(cuda_mul_rn((T)-0.5, x), x)));
    return cuda_mul_rn(g, cuda_add_rn(cdf, pdf));
  }
  case TS_SILU: {
    T s = one / cuda_add_rn(one, exp(-x));
    return cuda_mul_rn(cuda_mul_rn(g, s), cuda_add_rn(one, cuda_mul_rn(x, cuda_sub_rn(one, s))));
  }
  case TS_SIN: return cuda_mul_rn(g, cos(x));
  case TS_COS: return cuda_mul_rn(-g, sin(x));
  case TS_RECIPROCAL: return cuda_mul_rn(cuda_mul_rn(-g, y), y);
  case TS_SQUARE: return cuda_mul_rn(cuda_mul_rn((T)2, g), x);
  default: return zero; // sign, floor, ceil, round, trunc: flat almost everywhere
  }
}

template <int D> struct unary_backward_fn {
  cuda_storage_t<D> *gx;
  const cuda_storage_t<D> *g, *x, *y;
  int op;
  __device__ void operator()(const int64_t (&off)[4]) const {
    using T = cuda_compute_t<D>;
    T v = unary_derivative<T>(op, cuda_to_compute<D>(g[off[1]]), cuda_to_compute<D>(x[off[2]]),
                              cuda_to_compute<D>(y[off[3]]));
    gx[off[0]] = cuda_from_compute<D>(v);
  }
};

bool unary_has_derivative(int op) { return op >= TS_NEG && op <= TS_SQUARE; }
} // namespace

extern "C" int cuda_unary_backward(int op, ts_tensor *gx, const ts_tensor *g, const ts_tensor *x, const ts_tensor *y) {
  const char *name = ts_unary_op_name(op);
  if (!unary_has_derivative(op)) return ts_set_error(TS_ERR_ARG, "%s: not differentiable", name);
  if (!cuda_is_floating(x->dtype) || gx->dtype != x->dtype || g->dtype != x->dtype || y->dtype != x->dtype)
    return ts_set_error(TS_ERR_DTYPE, "%s backward: the cuda kernel takes one floating dtype, got gx %s, g %s, x %s, y %s",
                        name, ts_dtype_name(gx->dtype), ts_dtype_name(g->dtype), ts_dtype_name(x->dtype),
                        ts_dtype_name(y->dtype));
  const ts_tensor *ops[4] = {gx, g, x, y};
  return cuda_dispatch_dtype(name, x->dtype, [&](auto tag) {
    constexpr int D = decltype(tag)::value;
    if constexpr (cuda_is_floating(D)) {
      return cuda_foreach(name, ops, unary_backward_fn<D>{cuda_data<D>(gx), cuda_data<D>(g), cuda_data<D>(x),
                                                          cuda_data<D>(y), op});
    } else {
      return not_defined(name, D);
    }
  });
}

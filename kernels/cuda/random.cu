// random.cu — uniform, normal, bernoulli and randint fills from the Philox4x32-10 stream on CUDA
// devices, element for element the stream of kernels/cpu/random.c (definitions: runtime/random.c,
// top comment). Each thread computes one Philox block at counter offset + j (a 128-bit sum) and
// the four elements 4j .. 4j+3 it gives, so any element depends only on (seed, offset, its index).
//
// The conversions are the CPU's, step by step in double: products that feed a sum use explicitly
// rounded operations, which the compiler never fuses into a multiply-add, so uniform, bernoulli
// and randint are bit-identical to the CPU; normals differ only where CUDA's log, sin and cos
// round differently from glibc's (the last place of a float64, rarely a float32).
#include "loop.cuh"

#include <math.h>

namespace {
constexpr int LANES = 4;
constexpr double TWO_POW_M32 = 0x1p-32, TWO_POW_M24 = 0x1p-24, TWO_PI = 6.283185307179586476925286766559;

__device__ __forceinline__ void philox4x32(uint64_t seed, uint64_t counter_lo, uint64_t counter_hi, uint32_t (&out)[4]) {
  uint32_t c0 = (uint32_t)counter_lo, c1 = (uint32_t)(counter_lo >> 32);
  uint32_t c2 = (uint32_t)counter_hi, c3 = (uint32_t)(counter_hi >> 32);
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#pragma unroll
  for (int r = 0; r < 10; r++) {
    uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    uint32_t next0 = hi1 ^ c1 ^ k0, next2 = hi0 ^ c3 ^ k1;
    c0 = next0;
    c1 = lo1;
    c2 = next2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// v rounded to the nearest value of a floating dtype, as the CPU's round_to (through float).
template <int D> __device__ __forceinline__ double round_to(double v) {
  if constexpr (D == TS_F32) return (double)(float)v;
  else if constexpr (D == TS_F16) return (double)__half2float(__float2half_rn((float)v));
  else if constexpr (D == TS_BF16) return (double)__bfloat162float(__float2bfloat16_rn((float)v));
  else return v;
}

struct draw_params {
  int kind;
  double a, b;        // low/high, mean/std, p (a), low/high
  double below_high;  // uniform: the largest value of the dtype below high
  uint64_t seed, offset;
  int64_t n;
};

// The four values of block x, as doubles exactly representable in D.
template <int D> __device__ void block_values(const draw_params &p, const uint32_t (&x)[4], double (&out)[4]) {
  switch (p.kind) {
  case TS_RAND_UNIFORM: {
    double range = p.b - p.a;
#pragma unroll
    for (int l = 0; l < LANES; l++) {
      // float64 gets all 32 bits; narrower floats the top 24, as many as a float32 mantissa holds
      double u = D == TS_F64 ? x[l] * TWO_POW_M32 : (x[l] >> 8) * TWO_POW_M24;
      double v = round_to<D>(__dadd_rn(p.a, __dmul_rn(range, u)));
      out[l] = v >= p.b && p.a < p.b ? p.below_high : v; // rounding must not reach high
    }
    break;
  }
  case TS_RAND_NORMAL:
#pragma unroll
    for (int l = 0; l < LANES; l += 2) {
      double u1 = ((double)x[l] + 1.0) * TWO_POW_M32; // (0, 1]: log never sees 0
      double u2 = x[l + 1] * TWO_POW_M32;
      double r = sqrt(-2.0 * log(u1)), s, c;
      sincos(TWO_PI * u2, &s, &c);
      double scale = __dmul_rn(p.b, r);
      out[l] = round_to<D>(__dadd_rn(p.a, __dmul_rn(scale, c)));
      out[l + 1] = round_to<D>(__dadd_rn(p.a, __dmul_rn(scale, s)));
    }
    break;
  case TS_RAND_BERNOULLI:
#pragma unroll
    for (int l = 0; l < LANES; l++) out[l] = x[l] * TWO_POW_M32 < p.a ? 1.0 : 0.0;
    break;
  default: { // randint: low and high within +-2^53, high - low <= 2^32: every step is exact
    uint64_t range = (uint64_t)(p.b - p.a);
#pragma unroll
    for (int l = 0; l < LANES; l++) out[l] = p.a + (double)(((uint64_t)x[l] * range) >> 32);
  }
  }
}

// Stores a value computed above (exactly representable) as the CPU's store_values does.
template <int D> __device__ __forceinline__ cuda_storage_t<D> store_value(double v) {
  if constexpr (D == TS_I64) return (int64_t)v;
  else return cuda_store_f64<D>(v);
}

template <int D> __global__ void random_kernel(draw_params p, cuda_storage_t<D> *out) {
  int64_t blocks = (p.n + LANES - 1) / LANES;
  CUDA_GRID_STRIDE(j, blocks) {
    uint64_t lo = p.offset + (uint64_t)j, hi = lo < p.offset; // 128-bit counter: carry
    uint32_t x[4];
    philox4x32(p.seed, lo, hi, x);
    double v[4];
    block_values<D>(p, x, v);
    int64_t first = j * LANES;
#pragma unroll
    for (int l = 0; l < LANES; l++)
      if (first + l < p.n) out[first + l] = store_value<D>(v[l]);
  }
}

// ---- host: the largest value of a floating dtype below high (the CPU's largest_below) -------------
uint16_t step_down16(uint16_t bits) {
  if ((bits & 0x7fff) == 0) return 0x8001; // +-0: the smallest negative subnormal
  return (bits & 0x8000) ? (uint16_t)(bits + 1) : (uint16_t)(bits - 1);
}

double largest_below(int dtype, double high) {
  if (dtype == TS_F64) return nextafter(high, -INFINITY);
  float f = (float)high;
  while ((double)f >= high) f = nextafterf(f, -INFINITY);
  if (dtype == TS_F32) return f;
  bool half = dtype == TS_F16;
  uint16_t bits = half ? ts_float_to_half(f) : ts_float_to_bf16(f);
  for (;;) {
    double v = half ? ts_half_to_float(bits) : ts_bf16_to_float(bits);
    if (v < high) return v;
    bits = step_down16(bits);
  }
}
} // namespace

extern "C" int cuda_random(ts_tensor *out, int kind, double a, double b, uint64_t seed, uint64_t offset) {
  draw_params p = {kind, a, b, 0, seed, offset, ts_numel(out)};
  if (p.n == 0) return TS_OK;
  if (kind == TS_RAND_UNIFORM && a < b) p.below_high = largest_below(out->dtype, b);
  cudaStream_t stream;
  if (cuda_stream_for("random", out->device.index, &stream)) return ts_last_status();
  int64_t blocks = (p.n + LANES - 1) / LANES;
  return cuda_dispatch_dtype("random", out->dtype, [&](auto tag) {
    constexpr int D = decltype(tag)::value;
    random_kernel<D><<<cuda_blocks(blocks), CUDA_THREADS, 0, stream>>>(p, cuda_data<D>(out));
    return cuda_check(cudaGetLastError(), "random");
  });
}

/* fastmath.h — float32 exp, log, log1p and erf that GCC vectorizes.
 *
 * libm's expf/logf/erff are calls the compiler cannot vectorize; in elementwise loops (GELU and its
 * backward, softmax, the position-bias MLP) they cost several times the memory traffic. These are
 * branch-free polynomial versions (Cephes' coefficients), accurate to a few ulp over the float
 * range: inlined into a plain loop over contiguous data they become SIMD code at -O3. Special
 * values: exp_f32 is exactly 0 below the float range and saturates above it (callers never pass
 * NaN); log_f32 expects a finite x > 0; log1p_f32 handles x >= 0. */
#ifndef TESSERA_CPU_FASTMATH_H
#define TESSERA_CPU_FASTMATH_H

#include <stdint.h>
#include <string.h>

static inline float fm_bits_to_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline uint32_t fm_f32_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

/* c ? a : b on the bits, so that loops stay free of branches and GCC vectorizes them at -O2 (it
   does not if-convert the equivalent ?: there). */
static inline float select_f32(int c, float a, float b) {
  uint32_t mask = -(uint32_t)c;
  return fm_bits_to_f32((fm_f32_to_bits(a) & mask) | (fm_f32_to_bits(b) & ~mask));
}

/* exp(x) for x that is not NaN: x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-6 polynomial
   (within 1e-7 relative), 2^n put straight into the exponent bits; exactly 0 below the float
   range, so a masked attention key contributes nothing. */
static inline float exp_f32(float x) {
  const float lo = -87.33654f, hi = 88.0f, round = 12582912.0f; /* 1.5 * 2^23: adding it rounds */
  int below = x < lo;
  float xc = select_f32(below, lo, select_f32(x > hi, hi, x));
  float n = (xc * 1.44269504088896341f + round) - round;
  float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  float scale = fm_bits_to_f32((uint32_t)((int32_t)n + 127) << 23);
  return select_f32(below, 0.0f, p * scale);
}

/* log(x) for finite x > 0 (normal numbers): x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(m) by
   Cephes' degree-9 polynomial in m - 1. */
static inline float log_f32(float x) {
  uint32_t bits = fm_f32_to_bits(x);
  /* k = floor(log2(x / sqrt(1/2))): the bits of x past those of sqrt(1/2), in exponent units */
  int32_t k = (int32_t)(bits - 0x3f3504f3u) >> 23;
  float m = fm_bits_to_f32(bits - ((uint32_t)k << 23)) - 1.0f;
  float fk = (float)k;
  float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * fk;
  y += -0.5f * z;
  return m + y + 0.693359375f * fk;
}

/* log(1 + x) for finite x >= 0, accurate for tiny x too: with u = 1 + x rounded, log(u) x / (u - 1)
   cancels the rounding of u (Goldberg's trick); u = 1 means x is below half an ulp of 1. */
static inline float log1p_f32(float x) {
  float u = 1.0f + x, d = u - 1.0f;
  int tiny = d == 0.0f;
  return select_f32(tiny, x, log_f32(u) * (x / select_f32(tiny, 1.0f, d)));
}

/* erf as a rational function (clamped to [-4, 4], where erf is 1 to float precision): within a
   few ulp of libm's erff. */
static inline float erf_f32(float x) {
  x = x < -4.f ? -4.f : x > 4.f ? 4.f : x;
  float x2 = x * x;
  float p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  p = x2 * p + -2.10102402082508e-06f;
  p = x2 * p + -5.69250639462346e-05f;
  p = x2 * p + -7.34990630326855e-04f;
  p = x2 * p + -2.95459980854025e-03f;
  p = x2 * p + -1.60960333262415e-02f;
  float q = x2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
  q = x2 * q + -1.68282697438203e-03f;
  q = x2 * q + -7.37332916720468e-03f;
  q = x2 * q + -1.42647390514189e-02f;
  return x * p / q;
}

#endif

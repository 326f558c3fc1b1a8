/* dtype.c — dtype table, PyTorch's type promotion, and half/bfloat16 conversions. */
#include "internal.h"

#include <string.h>

static const struct {
  const char *name;
  int size;
  int floating;
} dtype_info[TS_NUM_DTYPES] = {
    [TS_F32] = {"float32", 4, 1}, [TS_F64] = {"float64", 8, 1}, [TS_F16] = {"float16", 2, 1},
    [TS_BF16] = {"bfloat16", 2, 1}, [TS_I64] = {"int64", 8, 0}, [TS_I32] = {"int32", 4, 0},
    [TS_U8] = {"uint8", 1, 0},      [TS_BOOL] = {"bool", 1, 0},
};

static int valid(int dtype) { return dtype >= 0 && dtype < TS_NUM_DTYPES; }
const char *ts_dtype_name(int dtype) { return valid(dtype) ? dtype_info[dtype].name : "invalid"; }
int ts_dtype_size(int dtype) { return valid(dtype) ? dtype_info[dtype].size : 0; }
int ts_dtype_is_floating(int dtype) { return valid(dtype) && dtype_info[dtype].floating; }

/* Category order bool < integer < floating; within a category the wider type wins.
   uint8 with a signed integer gives the signed one if wider (int32/int64); float16 with bfloat16
   gives float32 (neither holds the other), exactly as torch.promote_types. */
static int rank(int dtype) {
  switch (dtype) {
  case TS_BOOL: return 0;
  case TS_U8: return 1;
  case TS_I32: return 2;
  case TS_I64: return 3;
  case TS_F16: case TS_BF16: return 4;
  case TS_F32: return 5;
  default: return 6; /* f64 */
  }
}

int ts_promote_types(int a, int b) {
  if (!valid(a) || !valid(b)) return -1;
  if (a == b) return a;
  if ((a == TS_F16 && b == TS_BF16) || (a == TS_BF16 && b == TS_F16)) return TS_F32;
  return rank(a) >= rank(b) ? a : b;
}

/* IEEE binary16 <-> binary32, round to nearest even, with subnormals, inf and NaN. */
float ts_half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else { /* subnormal: normalize */
      int e = -1;
      do { man <<= 1; e++; } while (!(man & 0x400));
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
    }
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

uint16_t ts_float_to_half(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
  uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) /* inf or nan (keep a quiet nan) */
    return sign | 0x7c00 | (absx > 0x7f800000u ? 0x200 : 0);
  if (absx >= 0x477ff000u) return sign | 0x7c00; /* rounds to >= 65520: overflow to inf */
  if (absx < 0x38800000u) {                      /* below the smallest normal half: subnormal */
    if (absx < 0x33000000u) return sign;         /* rounds to zero */
    uint32_t e = absx >> 23, man = (absx & 0x7fffff) | 0x800000;
    uint32_t shift = 126 - e; /* 14 + (113 - e) */
    uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) half++;
    return sign | (uint16_t)half;
  }
  uint32_t half = ((absx >> 13) - (112u << 10)), rem = absx & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) half++;
  return sign | (uint16_t)half;
}

float ts_bf16_to_float(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

uint16_t ts_float_to_bf16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40); /* quiet nan */
  x += 0x7fff + ((x >> 16) & 1);
  return (uint16_t)(x >> 16);
}

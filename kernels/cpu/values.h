/* values.h — reading and writing float32/float64 buffers through double, for the kernels whose one
 * body serves both dtypes (nn.c, norm.c, loss.c): `f64` picks the element type at run time, and
 * the always-inline accessors let the compiler split the loops per dtype. */
#ifndef TESSERA_CPU_VALUES_H
#define TESSERA_CPU_VALUES_H

#include <math.h>
#include <stdint.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE double load(const void *p, int64_t i, int f64) {
  return f64 ? ((const double *)p)[i] : (double)((const float *)p)[i];
}
ALWAYS_INLINE void store(void *p, int64_t i, double v, int f64) {
  if (f64) ((double *)p)[i] = v;
  else ((float *)p)[i] = (float)v;
}
/* exp in the dtype's precision: expf is several times faster than exp and exact enough for float32. */
ALWAYS_INLINE double exp_of(double v, int f64) { return f64 ? exp(v) : (double)expf((float)v); }

#endif

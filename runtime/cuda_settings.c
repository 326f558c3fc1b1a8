/* cuda_settings.c — process-wide switches of the CUDA kernels. They exist in every build (a
 * CPU-only build keeps and reports them too), so that a script setting them runs anywhere. */
#include "internal.h"

/* TF32 tensor cores for float32 matrix products and convolutions: off unless asked for, so that
   float32 results on a GPU stay within float32 rounding of the CPU's. */
static int allow_tf32 = 0;

int ts_cuda_set_allow_tf32(int allow) { return __atomic_exchange_n(&allow_tf32, allow != 0, __ATOMIC_RELAXED); }

int ts_cuda_get_allow_tf32(void) { return __atomic_load_n(&allow_tf32, __ATOMIC_RELAXED); }

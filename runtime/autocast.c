/* autocast.c — the thread-local autocast setting and the casts of autocast's op lists
 * (see tessera.h and autocast.h). Only CUDA devices are affected: the CPU kernels compute in
 * float32 or float64 whatever the storage dtype, so casting there would only lose precision. */
#include "autocast.h"

static _Thread_local int autocast_dtype = -1; /* -1: off */

int ts_set_autocast(int dtype) {
  if (dtype == TS_F32) dtype = -1;
  if (dtype != -1 && dtype != TS_BF16 && dtype != TS_F16) {
    ts_set_error(TS_ERR_ARG, "autocast: expected bfloat16, float16 or float32 (off), got %s",
                 ts_dtype_name(dtype));
    return -2;
  }
  int previous = autocast_dtype;
  autocast_dtype = dtype;
  return previous;
}

int ts_get_autocast(void) { return autocast_dtype; }

/* The dtype a tensor of dtype `dtype` takes under the policy: itself when it is left alone. */
static int policy_dtype(int policy, int dtype) {
  if (dtype != TS_F32 && dtype != TS_F16 && dtype != TS_BF16) return dtype; /* float64, integers */
  if (policy == TS_AUTOCAST_FLOAT32) return TS_F32;
  return autocast_dtype;
}

static const ts_tensor *first_tensor(int n, ts_tensor *const *ts) {
  for (int k = 0; k < n; k++)
    if (ts[k]) return ts[k];
  return NULL;
}

int ts_autocast_needed(int policy, int n, ts_tensor *const *ts) {
  if (autocast_dtype < 0) return 0;
  const ts_tensor *first = first_tensor(n, ts);
  if (!first || first->device.type != TS_CUDA) return 0;
  for (int k = 0; k < n; k++)
    if (ts[k] && policy_dtype(policy, ts[k]->dtype) != ts[k]->dtype) return 1;
  return 0;
}

void ts_autocast_release(int n, ts_tensor **ts) {
  for (int k = 0; k < n; k++) {
    ts_release(ts[k]);
    ts[k] = NULL;
  }
}

int ts_autocast_cast(int policy, int n, ts_tensor *const *ts, ts_tensor **out) {
  for (int k = 0; k < n; k++) out[k] = NULL;
  for (int k = 0; k < n; k++) {
    if (!ts[k]) continue;
    out[k] = ts_to_dtype(ts[k], policy_dtype(policy, ts[k]->dtype));
    if (!out[k]) {
      ts_autocast_release(n, out);
      return ts_last_status();
    }
  }
  return TS_OK;
}

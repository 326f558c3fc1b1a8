/* autocast.h — mixed precision (ts_set_autocast): the casts the ops in autocast's lists make.
 *
 * An op on autocast's lists starts like this (ts_linear):
 *
 *   ts_tensor *in[3] = {x, w, b}, *cast[3];
 *   if (ts_autocast_needed(TS_AUTOCAST_LOW, 3, in)) {
 *     if (ts_autocast_cast(TS_AUTOCAST_LOW, 3, in, cast)) return NULL;
 *     ts_tensor *out = ts_linear(cast[0], cast[1], cast[2]);
 *     ts_autocast_release(3, cast);
 *     return out;
 *   }
 *
 * The casts are ordinary ts_to_dtype calls, recorded by autograd like any other, so gradients
 * flow back to the original tensors in their own dtypes; the second call finds nothing left to
 * cast. NULL entries (optional arguments) are skipped and stay NULL. */
#ifndef TESSERA_AUTOCAST_H
#define TESSERA_AUTOCAST_H

#include "internal.h"

typedef enum ts_autocast_policy {
  TS_AUTOCAST_LOW = 0,  /* products: float32/16-bit inputs go to the autocast dtype */
  TS_AUTOCAST_FLOAT32   /* statistics (norms, softmax, losses): 16-bit inputs go up to float32 */
} ts_autocast_policy;

/* Whether autocast is on and would change the dtype of one of the n tensors (all on one device;
   the first non-NULL one decides) for an op of that policy. Never fails. */
int ts_autocast_needed(int policy, int n, ts_tensor *const *ts);
/* out[k] = ts[k] in the policy's dtype (a new reference; ts[k] itself when it keeps its dtype;
   NULL for NULL). On failure every out[k] is NULL and the error is set. */
int ts_autocast_cast(int policy, int n, ts_tensor *const *ts, ts_tensor **out);
void ts_autocast_release(int n, ts_tensor **ts);

#endif

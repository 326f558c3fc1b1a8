/* nn.h — what the nn runtime files (nn.c, norm.c, loss.c, conv.c, pool.c, resample.c) and their
   kernels share beyond backend.h. */
#ifndef TESSERA_NN_H
#define TESSERA_NN_H

#include "autograd.h"
#include "backend.h"

/* The backend of t's device when it implements `field` (TS_BACKEND). */
#define TS_NN_BACKEND(t, field, op) TS_BACKEND((t)->device, field, (op))
/* Fails unless t is a floating-point tensor (what names it: "input", "weight", ...). */
int ts_nn_check_floating(const char *op, const char *what, const ts_tensor *t);

/* The elementwise losses behind the backend's pointwise_loss entries. */
typedef enum ts_pointwise_loss { TS_LOSS_MSE = 0, TS_LOSS_L1, TS_LOSS_SMOOTH_L1 } ts_pointwise_loss;

/* t in `dtype` with contiguous storage: t itself (a new reference) when it already is. */
ts_tensor *ts_nn_dense(ts_tensor *t, int dtype);
/* Checks an optional tensor (w, b, running stats; `what` names it): floating, on x's device, of
   the given shape. NULL passes. */
int ts_nn_check_param(const char *op, const char *what, const ts_tensor *x, const ts_tensor *p, int ndim,
                      const int64_t *shape);
/* The output of a kernel that ran in the compute dtype, as `dtype` and shape (ndim, shape);
   consumes `computed`. */
ts_tensor *ts_nn_result(ts_tensor *computed, int dtype, int ndim, const int64_t *shape);
/* t converted to dtype, contiguous, viewed as ndim/shape (which has t's number of elements). */
ts_tensor *ts_nn_dense_as(ts_tensor *t, int dtype, int ndim, const int64_t *shape);

#endif

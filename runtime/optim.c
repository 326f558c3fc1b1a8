/* optim.c — the fused multi-tensor optimizer steps (AdamW, SGD) and the gradient-clipping pair
 * (total norm, scale in place): argument checks here, the math in the backends.
 *
 * Every entry point runs the same way: validate every tensor first (so a bad entry fails the call
 * before anything is written), gather the tensors that take part (those with a gradient) into one
 * batch with contiguous stand-ins for strided ones, run one backend call over the whole batch,
 * copy the stand-ins of written tensors back and bump the versions of everything written.
 *
 * These are optimizer updates, not differentiable ops: they write parameters that require grad
 * in place without the autograd error an ordinary in-place op would raise (PyTorch runs them
 * under no_grad), and record nothing. Version bumps still make a later backward through a graph
 * that saved an old parameter value fail loudly instead of computing a wrong gradient. */
#include "autograd.h"
#include "backend.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- argument checks ------------------------------------------------------------------------- */
static int state_dtype(int param_dtype) { return param_dtype == TS_F64 ? TS_F64 : TS_F32; }

static int check_count(const char *op, int n, const void *first_array, const char *array_name) {
  if (n < 0) return ts_set_error(TS_ERR_ARG, "%s: the number of tensors must be non-negative, got %d", op, n);
  if (n > 0 && !first_array) return ts_set_error(TS_ERR_ARG, "%s: %d tensors announced but %s is NULL", op, n, array_name);
  return TS_OK;
}

static int require_array(const char *op, const void *array, const char *name) {
  if (!array) return ts_set_error(TS_ERR_ARG, "%s: %s is NULL", op, name);
  return TS_OK;
}

/* A written tensor: floating, and no two of its elements in one memory location. */
static int check_writable_float(const char *op, const char *what, int k, const ts_tensor *t) {
  if (!ts_dtype_is_floating(t->dtype))
    return ts_set_error(TS_ERR_DTYPE, "%s: %s %d must be floating point, got %s", op, what, k, ts_dtype_name(t->dtype));
  if (ts_has_internal_overlap(t))
    return ts_set_error(TS_ERR_ARG, "%s: %s %d %s is a broadcast (expanded) view and cannot be updated in place",
                        op, what, k, ts_tshape(t));
  return TS_OK;
}

static int check_param(const char *op, int k, const ts_tensor *p) {
  if (!p) return ts_set_error(TS_ERR_ARG, "%s: param %d is NULL but has a gradient", op, k);
  if (p->grad_fn)
    return ts_set_error(TS_ERR_ARG, "%s: param %d %s is not a leaf (it was made by %s); optimizers update leaf "
                        "tensors only", op, k, ts_tshape(p), p->grad_fn->name);
  return check_writable_float(op, "param", k, p);
}

/* t must match param k in shape and device, and have `dtype`. */
static int check_companion(const char *op, const char *what, int k, const ts_tensor *t, const ts_tensor *p, int dtype) {
  if (!t) return ts_set_error(TS_ERR_ARG, "%s: %s %d is NULL", op, what, k);
  if (!ts_shape_equal(t->ndim, t->shape, p->ndim, p->shape))
    return ts_set_error(TS_ERR_SHAPE, "%s: %s %d has shape %s but param %d has shape %s", op, what, k, ts_tshape(t),
                        k, ts_tshape(p));
  if (t->dtype != dtype)
    return ts_set_error(TS_ERR_DTYPE, "%s: %s %d is %s, expected %s for a %s param", op, what, k,
                        ts_dtype_name(t->dtype), ts_dtype_name(dtype), ts_dtype_name(p->dtype));
  if (!ts_device_equal(t->device, p->device))
    return ts_set_error(TS_ERR_DEVICE, "%s: %s %d is on %s but param %d is on %s", op, what, k,
                        ts_device_str(t->device), k, ts_device_str(p->device));
  return TS_OK;
}

/* A finite, non-negative hyper-parameter (NaN fails the test too). */
static int check_nonnegative(const char *op, const char *name, int k, double v) {
  if (v >= 0 && isfinite(v)) return TS_OK;
  if (k < 0) return ts_set_error(TS_ERR_ARG, "%s: %s must be a finite number >= 0, got %g", op, name, v);
  return ts_set_error(TS_ERR_ARG, "%s: %s[%d] must be a finite number >= 0, got %g", op, name, k, v);
}

static int check_beta(const char *op, const char *name, double beta) {
  if (beta >= 0 && beta < 1) return TS_OK;
  return ts_set_error(TS_ERR_ARG, "%s: %s must be in [0, 1), got %g", op, name, beta);
}

/* ---- batches: the tensors of one backend call ------------------------------------------------ */
enum { MAX_ROLES = 4 };

/* Row i of a batch is one tensor of the caller's lists, with one tensor per role (param, grad,
   state...) and its per-tensor scalars. */
typedef struct {
  const char *op;
  int nroles, count;
  int writes[MAX_ROLES];         /* role r is written in place */
  ts_tensor **given[MAX_ROLES];  /* the caller's tensors (borrowed) */
  ts_tensor **work[MAX_ROLES];   /* what the backend gets: given[r][i] or a contiguous copy (owned) */
  double *lr, *wd;
  int64_t *step;
  int *first;
  ts_device device;
} batch;

static int batch_open(batch *b, const char *op, int nroles, const int *writes, int n) {
  memset(b, 0, sizeof *b);
  b->op = op;
  b->nroles = nroles;
  size_t rows = n > 0 ? (size_t)n : 1;
  int ok = 1;
  for (int r = 0; r < nroles; r++) {
    b->writes[r] = writes[r];
    ok &= (b->given[r] = calloc(rows, sizeof(ts_tensor *))) != NULL;
    ok &= (b->work[r] = calloc(rows, sizeof(ts_tensor *))) != NULL;
  }
  ok &= (b->lr = calloc(rows, sizeof(double))) != NULL;
  ok &= (b->wd = calloc(rows, sizeof(double))) != NULL;
  ok &= (b->step = calloc(rows, sizeof(int64_t))) != NULL;
  ok &= (b->first = calloc(rows, sizeof(int))) != NULL;
  return ok ? TS_OK : ts_set_error(TS_ERR_MEMORY, "%s: out of memory for %d tensors", op, n);
}

static void drop_row(batch *b, int i) {
  for (int r = 0; r < b->nroles; r++) {
    ts_release(b->work[r][i]);
    b->work[r][i] = NULL;
  }
}

/* Appends one row (row[r] may be NULL for an unused role); returns its index or -1. */
static int batch_add(batch *b, ts_tensor *const *row) {
  int i = b->count;
  for (int r = 0; r < b->nroles; r++) {
    b->given[r][i] = row[r];
    if (!row[r]) continue;
    if (i == 0 && r == 0) b->device = row[r]->device;
    if (!ts_device_equal(row[r]->device, b->device)) {
      ts_set_error(TS_ERR_DEVICE, "%s: all tensors must be on one device, found %s and %s", b->op,
                   ts_device_str(b->device), ts_device_str(row[r]->device));
      drop_row(b, i);
      return -1;
    }
    b->work[r][i] = ts_contiguous(row[r]);
    if (!b->work[r][i]) {
      drop_row(b, i);
      return -1;
    }
  }
  b->count++;
  return i;
}

/* Writes the contiguous copies back into strided originals (after a successful kernel), bumps
   the versions of written tensors, releases the batch; returns status. */
static int batch_close(batch *b, int status) {
  const ts_backend *be = b->count ? ts_backend_for(b->device) : NULL;
  for (int r = 0; r < b->nroles; r++) {
    for (int i = 0; i < b->count; i++) {
      ts_tensor *given = b->given[r][i], *work = b->work[r][i];
      if (!status && b->writes[r] && given && work) {
        if (work != given) status = be ? be->copy(given, work) : ts_last_status();
        ts_bump_version(given);
      }
      ts_release(work);
    }
    free(b->given[r]);
    free(b->work[r]);
  }
  free(b->lr);
  free(b->wd);
  free(b->step);
  free(b->first);
  return status;
}

/* The backend of the batch's device when it implements `field`, else NULL with an error set. */
#define BATCH_BACKEND(be, b, field) ((be) = TS_BACKEND((b)->device, field, (b)->op))

/* ---- AdamW ----------------------------------------------------------------------------------- */
static int check_adamw_entry(const char *op, int k, ts_tensor *const *params, ts_tensor *const *grads,
                             ts_tensor *const *exp_avg, ts_tensor *const *exp_avg_sq, const double *lr,
                             const double *weight_decay, const int64_t *step) {
  const ts_tensor *p = params[k];
  if (check_param(op, k, p) || check_companion(op, "grad", k, grads[k], p, p->dtype) ||
      check_companion(op, "exp_avg", k, exp_avg[k], p, state_dtype(p->dtype)) ||
      check_companion(op, "exp_avg_sq", k, exp_avg_sq[k], p, state_dtype(p->dtype)) ||
      check_writable_float(op, "exp_avg", k, exp_avg[k]) || check_writable_float(op, "exp_avg_sq", k, exp_avg_sq[k]) ||
      check_nonnegative(op, "lr", k, lr[k]) || check_nonnegative(op, "weight_decay", k, weight_decay[k]))
    return ts_last_status();
  if (step[k] < 1) return ts_set_error(TS_ERR_ARG, "%s: step[%d] must be >= 1 (the count of this update), got %lld", op, k,
                                       (long long)step[k]);
  return TS_OK;
}

static int run_adamw(batch *b, double beta1, double beta2, double eps) {
  const ts_backend *be;
  if (!BATCH_BACKEND(be, b, adamw)) return ts_last_status();
  return be->adamw(b->count, b->work[0], b->work[1], b->work[2], b->work[3], b->lr, b->wd, beta1, beta2, eps, b->step);
}

int ts_adamw_step(int n, ts_tensor *const *params, ts_tensor *const *grads, ts_tensor *const *exp_avg,
                  ts_tensor *const *exp_avg_sq, const double *lr, const double *weight_decay, double beta1,
                  double beta2, double eps, const int64_t *step) {
  static const char op[] = "adamw_step";
  if (check_count(op, n, params, "params") || check_beta(op, "beta1", beta1) || check_beta(op, "beta2", beta2) ||
      check_nonnegative(op, "eps", -1, eps))
    return ts_last_status();
  if (n == 0) return TS_OK;
  if (require_array(op, grads, "grads") || require_array(op, exp_avg, "exp_avg") ||
      require_array(op, exp_avg_sq, "exp_avg_sq") || require_array(op, lr, "lr") ||
      require_array(op, weight_decay, "weight_decay") || require_array(op, step, "step"))
    return ts_last_status();
  for (int k = 0; k < n; k++)
    if (grads[k] && check_adamw_entry(op, k, params, grads, exp_avg, exp_avg_sq, lr, weight_decay, step))
      return ts_last_status();

  static const int writes[4] = {1, 0, 1, 1};
  batch b;
  int previous = ts_set_grad_enabled(0);
  int st = batch_open(&b, op, 4, writes, n);
  for (int k = 0; k < n && !st; k++) {
    if (!grads[k]) continue;
    ts_tensor *row[4] = {params[k], grads[k], exp_avg[k], exp_avg_sq[k]};
    int i = batch_add(&b, row);
    if (i < 0) st = ts_last_status();
    else b.lr[i] = lr[k], b.wd[i] = weight_decay[k], b.step[i] = step[k];
  }
  if (!st && b.count) st = run_adamw(&b, beta1, beta2, eps);
  st = batch_close(&b, st);
  ts_set_grad_enabled(previous);
  return st;
}

/* ---- SGD ------------------------------------------------------------------------------------- */
static int check_sgd_entry(const char *op, int k, ts_tensor *const *params, ts_tensor *const *grads,
                           ts_tensor *const *bufs, const double *lr, const double *weight_decay, double momentum) {
  const ts_tensor *p = params[k];
  if (check_param(op, k, p) || check_companion(op, "grad", k, grads[k], p, p->dtype) ||
      check_nonnegative(op, "lr", k, lr[k]) || check_nonnegative(op, "weight_decay", k, weight_decay[k]))
    return ts_last_status();
  if (momentum == 0) return TS_OK;
  if (check_companion(op, "momentum_buffer", k, bufs[k], p, state_dtype(p->dtype)) ||
      check_writable_float(op, "momentum_buffer", k, bufs[k]))
    return ts_last_status();
  return TS_OK;
}

static int check_sgd_options(const char *op, double momentum, double dampening, int nesterov) {
  if (check_nonnegative(op, "momentum", -1, momentum)) return ts_last_status();
  if (!isfinite(dampening)) return ts_set_error(TS_ERR_ARG, "%s: dampening must be finite, got %g", op, dampening);
  if (nesterov && (momentum <= 0 || dampening != 0))
    return ts_set_error(TS_ERR_ARG, "%s: Nesterov momentum requires a momentum > 0 and zero dampening (got momentum "
                        "%g, dampening %g)", op, momentum, dampening);
  return TS_OK;
}

int ts_sgd_step(int n, ts_tensor *const *params, ts_tensor *const *grads, ts_tensor *const *momentum_buffers,
                const double *lr, const double *weight_decay, double momentum, double dampening, int nesterov,
                const int *first_step) {
  static const char op[] = "sgd_step";
  if (check_count(op, n, params, "params") || check_sgd_options(op, momentum, dampening, nesterov))
    return ts_last_status();
  if (n == 0) return TS_OK;
  if (require_array(op, grads, "grads") || require_array(op, lr, "lr") || require_array(op, weight_decay, "weight_decay") ||
      (momentum != 0 && require_array(op, momentum_buffers, "momentum_buffers (needed when momentum != 0)")))
    return ts_last_status();
  for (int k = 0; k < n; k++)
    if (grads[k] && check_sgd_entry(op, k, params, grads, momentum_buffers, lr, weight_decay, momentum))
      return ts_last_status();

  static const int writes[3] = {1, 0, 1};
  batch b;
  int previous = ts_set_grad_enabled(0);
  int st = batch_open(&b, op, 3, writes, n);
  for (int k = 0; k < n && !st; k++) {
    if (!grads[k]) continue;
    ts_tensor *row[3] = {params[k], grads[k], momentum != 0 ? momentum_buffers[k] : NULL};
    int i = batch_add(&b, row);
    if (i < 0) st = ts_last_status();
    else b.lr[i] = lr[k], b.wd[i] = weight_decay[k], b.first[i] = first_step ? first_step[k] != 0 : 0;
  }
  if (!st && b.count) {
    const ts_backend *be;
    ts_tensor *const *bufs = momentum != 0 ? b.work[2] : NULL;
    st = BATCH_BACKEND(be, &b, sgd)
             ? be->sgd(b.count, b.work[0], b.work[1], bufs, b.lr, b.wd, momentum, dampening, nesterov != 0, b.first)
             : ts_last_status();
  }
  st = batch_close(&b, st);
  ts_set_grad_enabled(previous);
  return st;
}

/* ---- gradient clipping: total norm and scaling ----------------------------------------------- */
/* Gathers the non-NULL tensors of a list (floating; written ones also free of broadcast dims). */
static int gather_list(batch *b, const char *op, int n, ts_tensor *const *tensors, int written) {
  int st = batch_open(b, op, 1, &written, n);
  for (int k = 0; k < n && !st; k++) {
    const ts_tensor *t = tensors[k];
    if (!t) continue;
    if (written) st = check_writable_float(op, "tensor", k, t);
    else if (!ts_dtype_is_floating(t->dtype))
      st = ts_set_error(TS_ERR_DTYPE, "%s: tensor %d must be floating point, got %s", op, k, ts_dtype_name(t->dtype));
  }
  for (int k = 0; k < n && !st; k++)
    if (tensors[k] && batch_add(b, &tensors[k]) < 0) st = ts_last_status();
  return st;
}

int ts_grad_norm(int n, ts_tensor *const *grads, double norm_type, double *out) {
  static const char op[] = "grad_norm";
  if (check_count(op, n, grads, "grads") || require_array(op, out, "out")) return ts_last_status();
  if (!(norm_type > 0))
    return ts_set_error(TS_ERR_ARG, "%s: norm_type must be > 0 or inf, got %g", op, norm_type);
  *out = 0;
  batch b;
  int previous = ts_set_grad_enabled(0);
  int st = gather_list(&b, op, n, grads, 0);
  if (!st && b.count) {
    const ts_backend *be;
    st = BATCH_BACKEND(be, &b, multi_norm) ? be->multi_norm(b.count, b.work[0], norm_type, out) : ts_last_status();
  }
  st = batch_close(&b, st);
  ts_set_grad_enabled(previous);
  return st;
}

int ts_scale_(int n, ts_tensor *const *tensors, double factor) {
  static const char op[] = "scale_";
  if (check_count(op, n, tensors, "tensors")) return ts_last_status();
  batch b;
  int previous = ts_set_grad_enabled(0);
  int st = gather_list(&b, op, n, tensors, 1);
  if (!st && b.count) {
    const ts_backend *be;
    st = BATCH_BACKEND(be, &b, multi_scale) ? be->multi_scale(b.count, b.work[0], factor) : ts_last_status();
  }
  st = batch_close(&b, st);
  ts_set_grad_enabled(previous);
  return st;
}

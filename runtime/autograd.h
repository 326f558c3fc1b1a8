/* autograd.h — the tape: nodes that differentiable ops record, and what an op needs to record one.
 *
 * An op whose inputs require grad (and grad mode is on) creates a node naming its backward
 * function, with one edge per input: to the input's own grad_fn, or to the input itself when it
 * is a leaf. Tensors the backward needs are saved as detached headers (no grad_fn, so no cycles)
 * along with their storage version; using one after an in-place write is an error, not a wrong
 * gradient. Every node has exactly one differentiable output.
 *
 * Recording, in an op's entry point:
 *     ts_node *n = ts_grad_node("mul", mul_backward, 2, inputs);  // NULL: no grad needed
 *     if (n && (ts_node_save(n, a) || ts_node_save(n, b))) ...    // error
 *     return ts_node_finish(n, out);                              // out gets grad_fn = n
 */
#ifndef TESSERA_AUTOGRAD_H
#define TESSERA_AUTOGRAD_H

#include "internal.h"

typedef struct ts_node ts_node;

/* Computes grad_inputs[i] (new references, NULL for "no gradient") from the output gradient g.
   Runs with grad mode off. Only inputs with ts_node_needs_grad(n, i) need a gradient. */
typedef int (*ts_backward_fn)(ts_node *n, ts_tensor *g, ts_tensor **grad_inputs);

typedef struct ts_edge {
  ts_node *node;     /* the input's grad_fn, or NULL */
  ts_tensor *leaf;   /* the input itself when it is a leaf that requires grad */
  int needs_grad;
  int ndim, dtype;   /* the input's metadata: gradients are checked against it */
  int64_t shape[TS_MAX_DIMS];
  ts_device device;
} ts_edge;

enum { TS_NODE_MAX_SAVED = 6, TS_NODE_MAX_PARAMS = 24 };

struct ts_node {
  int64_t refcount;
  const char *name;
  ts_backward_fn backward;
  int n_inputs;
  ts_edge *edges;
  int n_saved;
  ts_tensor *saved[TS_NODE_MAX_SAVED];
  uint32_t saved_version[TS_NODE_MAX_SAVED];
  int released;                        /* saved tensors already freed by a backward pass */
  int is_view;                         /* the output shares the input's storage */
  int64_t i[TS_NODE_MAX_PARAMS];       /* op parameters (dims, sizes, flags) */
  double d[4];
  int64_t *ivec;                       /* variable-length parameters (owned) */
  /* engine scratch during one backward pass */
  int64_t pending;
  ts_tensor *grad;
};

int ts_grad_mode(void);
/* Whether any input requires grad while grad mode is on. */
int ts_any_requires_grad(int n, ts_tensor *const *inputs);
/* A new node when grad is needed, else NULL with no error (check ts_last_status on NULL only if
   you need to tell "not needed" from "out of memory": both leave the forward result valid). */
ts_node *ts_grad_node(const char *name, ts_backward_fn backward, int n_inputs, ts_tensor *const *inputs);
int ts_node_save(ts_node *n, ts_tensor *t);   /* appends (NULL: an unused slot); returns a status */
ts_tensor *ts_node_saved(ts_node *n, int slot);            /* borrowed; NULL + error if modified */
int ts_node_needs_grad(const ts_node *n, int input);
const ts_edge *ts_node_input(const ts_node *n, int input);
/* Attaches n as out's grad_fn and drops the creator's reference; returns out. NULL n: returns out.
   On a NULL out the node is released. */
ts_tensor *ts_node_finish(ts_node *n, ts_tensor *out);
/* ts_node_finish after saving `count` tensors (NULL entries: unused slots); a failed save releases
   n and out and returns NULL. */
ts_tensor *ts_node_finish_saving(ts_node *n, ts_tensor *out, int count, ts_tensor *const *save);
/* For an op with two results (sort, max along a dim): finishes n on *values with *indices saved. On
   failure both results are released and set to NULL; returns a status. */
int ts_node_finish_with_indices(ts_node *n, ts_tensor **values, ts_tensor **indices);
void ts_node_release(ts_node *n);
/* A fresh header over t's storage with no autograd state. */
ts_tensor *ts_detached(ts_tensor *t);
/* For in-place ops, before writing: refuses leaves that require grad and views of tensors that
   require grad. After writing, the op calls ts_bump_version so saved copies notice. */
int ts_check_inplace(const char *op, ts_tensor *t);
/* Before an in-place write whose value requires grad: refuses views of tensors outside the graph. */
int ts_check_view_write(const char *op, const ts_tensor *dst);
void ts_bump_version(ts_tensor *t);
/* In-place ops on tensors in the graph: r is the op's result computed out of place (and recorded);
   it is written into a, a takes over r's history (PyTorch's "rebase") and r is released. */
int ts_rebase_inplace(ts_tensor *a, ts_tensor *r);

/* Gradient helpers backward functions share (grad mode is off while they run). */
ts_tensor *ts_sum_to(ts_tensor *g, int ndim, const int64_t *shape);   /* undo broadcasting */
ts_tensor *ts_grad_for_input(ts_node *n, int input, ts_tensor *g);     /* sum_to + dtype of input */

/* A scope for backward formulas: intermediate tensors are kept here and released together, and a
   failed step makes every later step a no-op returning NULL, so formulas read as math:
       ts_scope s = {0};
       ts_tensor *ga = ts_s_binary(&s, TS_MUL, g, b);
       ...; int st = ts_scope_close(&s);   (TS_OK, or the first error) */
enum { TS_SCOPE_MAX = 32 };
typedef struct ts_scope { ts_tensor *held[TS_SCOPE_MAX]; int n; int failed; } ts_scope;
ts_tensor *ts_scope_keep(ts_scope *s, ts_tensor *t);
int ts_scope_close(ts_scope *s);
ts_tensor *ts_s_unary(ts_scope *s, int op, ts_tensor *a);
ts_tensor *ts_s_binary(ts_scope *s, int op, ts_tensor *a, ts_tensor *b);
ts_tensor *ts_s_scalar(ts_scope *s, int op, ts_tensor *a, double v);   /* a op v */
ts_tensor *ts_s_cast(ts_scope *s, ts_tensor *a, int dtype);
ts_tensor *ts_s_where(ts_scope *s, ts_tensor *cond, ts_tensor *a, ts_tensor *b);
/* Sets grads[input] to the gradient g reduced to that input's shape and dtype, if it needs one. */
int ts_set_input_grad(ts_node *n, int input, ts_tensor *g, ts_tensor **grads);
/* The same for g viewed as `shape` first (a kernel's flat or blocked buffer); g = NULL: nothing. */
int ts_set_input_grad_as(ts_node *n, int input, ts_tensor *g, int ndim, const int64_t *shape, ts_tensor **grads);
/* In a scope: an uninitialised gradient buffer shaped like `like` when input `input` needs one
   (NULL when it does not, when like is NULL, or after a failed step). */
ts_tensor *ts_s_grad_buffer(ts_scope *s, ts_node *n, int input, const ts_tensor *like);

#endif

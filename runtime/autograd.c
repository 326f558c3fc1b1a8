/* autograd.c — recording nodes and the reverse pass over them (see autograd.h). */
#include "autograd.h"

#include <stdlib.h>
#include <string.h>

static _Thread_local int grad_disabled; /* 0 = grad mode on, the default */

int ts_grad_mode(void) { return !grad_disabled; }

int ts_set_grad_enabled(int enabled) {
  int previous = !grad_disabled;
  grad_disabled = !enabled;
  return previous;
}

int ts_is_grad_enabled(void) { return !grad_disabled; }

int ts_any_requires_grad(int n, ts_tensor *const *inputs) {
  if (grad_disabled) return 0;
  for (int i = 0; i < n; i++)
    if (inputs[i] && inputs[i]->requires_grad) return 1;
  return 0;
}

/* ---- nodes ----------------------------------------------------------------------------------- */
ts_node *ts_grad_node(const char *name, ts_backward_fn backward, int n_inputs, ts_tensor *const *inputs) {
  if (!ts_any_requires_grad(n_inputs, inputs)) return NULL;
  ts_node *n = calloc(1, sizeof *n + (size_t)n_inputs * sizeof(ts_edge));
  if (!n) {
    ts_set_error(TS_ERR_MEMORY, "%s: out of memory recording the autograd graph", name);
    return NULL;
  }
  n->refcount = 1;
  n->name = name;
  n->backward = backward;
  n->n_inputs = n_inputs;
  n->edges = (ts_edge *)(n + 1);
  for (int k = 0; k < n_inputs; k++) {
    ts_tensor *in = inputs[k];
    ts_edge *e = &n->edges[k];
    if (!in) continue;
    e->ndim = in->ndim;
    e->dtype = in->dtype;
    e->device = in->device;
    memcpy(e->shape, in->shape, sizeof e->shape);
    if (!in->requires_grad) continue;
    e->needs_grad = 1;
    if (in->grad_fn) {
      e->node = in->grad_fn;
      __atomic_add_fetch(&e->node->refcount, 1, __ATOMIC_RELAXED);
    } else {
      e->leaf = in;
      ts_retain(in);
    }
  }
  return n;
}

static void free_saved(ts_node *n) {
  for (int k = 0; k < n->n_saved; k++) {
    ts_release(n->saved[k]);
    n->saved[k] = NULL;
  }
}

/* Nodes form long chains (one per layer op); releasing them recursively could overflow the C
   stack, so the chain is walked with an explicit worklist. */
void ts_node_release(ts_node *n) {
  ts_node *stack_small[64], **stack = stack_small;
  size_t cap = 64, top = 0;
  if (n) stack[top++] = n;
  while (top) {
    ts_node *cur = stack[--top];
    if (__atomic_sub_fetch(&cur->refcount, 1, __ATOMIC_ACQ_REL) != 0) continue;
    free_saved(cur);
    ts_release(cur->grad);
    for (int k = 0; k < cur->n_inputs; k++) {
      ts_release(cur->edges[k].leaf);
      ts_node *next = cur->edges[k].node;
      if (!next) continue;
      if (top == cap) {
        ts_node **bigger = malloc(2 * cap * sizeof *bigger);
        if (!bigger) { /* cannot grow: release this one recursively rather than leak it */
          ts_node_release(next);
          continue;
        }
        memcpy(bigger, stack, top * sizeof *stack);
        if (stack != stack_small) free(stack);
        stack = bigger;
        cap *= 2;
      }
      stack[top++] = next;
    }
    free(cur->ivec);
    free(cur);
  }
  if (stack != stack_small) free(stack);
}

ts_tensor *ts_detached(ts_tensor *t) {
  return ts_tensor_over(t->storage, t->ndim, t->shape, t->stride, t->offset, t->dtype);
}

int ts_node_save(ts_node *n, ts_tensor *t) {
  if (n->n_saved == TS_NODE_MAX_SAVED)
    return ts_set_error(TS_ERR_ARG, "%s: too many tensors saved for backward", n->name);
  if (!t) { /* a slot the backward will not read */
    n->saved[n->n_saved++] = NULL;
    return TS_OK;
  }
  ts_tensor *d = ts_detached(t);
  if (!d) return ts_last_status();
  n->saved_version[n->n_saved] = t->storage->version;
  n->saved[n->n_saved++] = d;
  return TS_OK;
}

ts_tensor *ts_node_saved(ts_node *n, int slot) {
  ts_tensor *t = n->saved[slot];
  if (!t) return TS_FAIL_NULL(TS_ERR_ARG, "%s: saved tensors were already freed", n->name);
  if (t->storage->version != n->saved_version[slot])
    return TS_FAIL_NULL(TS_ERR_ARG,
                        "%s backward: a tensor %s it saved was modified by an in-place operation after "
                        "it was used (version %u, expected %u); use an out-of-place op instead",
                        n->name, ts_tshape(t), t->storage->version, n->saved_version[slot]);
  return t;
}

int ts_node_needs_grad(const ts_node *n, int input) { return n->edges[input].needs_grad; }
const ts_edge *ts_node_input(const ts_node *n, int input) { return &n->edges[input]; }

ts_tensor *ts_node_finish(ts_node *n, ts_tensor *out) {
  if (!n) return out;
  if (!out) {
    ts_node_release(n);
    return NULL;
  }
  if (out->grad_fn) ts_node_release(out->grad_fn);
  out->grad_fn = n; /* the creator's reference moves to out */
  out->requires_grad = 1;
  return out;
}

ts_tensor *ts_node_finish_saving(ts_node *n, ts_tensor *out, int count, ts_tensor *const *save) {
  for (int k = 0; n && out && k < count; k++)
    if (ts_node_save(n, save[k])) {
      ts_node_release(n);
      ts_release(out);
      return NULL;
    }
  return ts_node_finish(n, out);
}

int ts_node_finish_with_indices(ts_node *n, ts_tensor **values, ts_tensor **indices) {
  if (ts_node_finish_saving(n, *values, 1, indices)) return TS_OK;
  ts_release(*indices); /* the failed save released the values */
  *values = *indices = NULL;
  return ts_last_status();
}

void ts_bump_version(ts_tensor *t) { __atomic_add_fetch(&t->storage->version, 1, __ATOMIC_RELAXED); }

int ts_check_inplace(const char *op, ts_tensor *t) {
  if (!grad_disabled && t->requires_grad && !t->grad_fn)
    return ts_set_error(TS_ERR_ARG, "%s: a leaf tensor that requires grad cannot be modified in place "
                        "(wrap the update in no_grad, or use an out-of-place op)", op);
  if (!grad_disabled && t->grad_fn && t->grad_fn->is_view)
    return ts_set_error(TS_ERR_ARG, "%s: in-place writes to a view (%s) of a tensor that requires grad are not "
                        "supported; build the result out of place (cat, where, index_put)", op, t->grad_fn->name);
  if (!grad_disabled && t->requires_grad && __atomic_load_n(&t->storage->graph_views, __ATOMIC_RELAXED) > 0)
    return ts_set_error(TS_ERR_ARG, "%s: %s %s is viewed by tensors in the autograd graph (view, slice, select, ...); "
                        "writing it in place would leave their gradients wrong: clone() it first or build the "
                        "result out of place", op, ts_dtype_name(t->dtype), ts_tshape(t));
  return TS_OK;
}

/* A write that records a gradient into a view of a tensor outside the graph: the base would never
   learn of it, so its gradient would be lost (PyTorch rebases the base; tessera refuses). */
int ts_check_view_write(const char *op, const ts_tensor *dst) {
  if (!grad_disabled && dst->is_view && !dst->requires_grad)
    return ts_set_error(TS_ERR_ARG, "%s: writing a tensor that requires grad into a view %s of a tensor that does not "
                        "would lose the gradient; build the result out of place (cat, where, index_put) or call "
                        "requires_grad_() on the base first", op, ts_tshape(dst));
  return TS_OK;
}

/* ---- public accessors ------------------------------------------------------------------------ */
int ts_requires_grad(const ts_tensor *t) { return t->requires_grad; }
int ts_is_leaf(const ts_tensor *t) { return t->grad_fn == NULL; }
const char *ts_grad_fn_name(const ts_tensor *t) { return t->grad_fn ? t->grad_fn->name : ""; }

int ts_set_requires_grad(ts_tensor *t, int requires) {
  if (t->grad_fn && !requires)
    return ts_set_error(TS_ERR_ARG, "requires_grad_: a non-leaf tensor (made by %s) always requires grad; "
                        "use detach()", t->grad_fn->name);
  if (requires && !ts_dtype_is_floating(t->dtype))
    return ts_set_error(TS_ERR_DTYPE, "requires_grad_: only floating point tensors can require gradients, got %s",
                        ts_dtype_name(t->dtype));
  t->requires_grad = requires != 0;
  return TS_OK;
}

ts_tensor *ts_grad(const ts_tensor *t) {
  if (t->grad) ts_retain(t->grad);
  return t->grad;
}

int ts_set_grad(ts_tensor *t, ts_tensor *g) {
  if (g && (!ts_shape_equal(g->ndim, g->shape, t->ndim, t->shape) ||
            g->dtype != t->dtype || !ts_device_equal(g->device, t->device)))
    return ts_set_error(TS_ERR_SHAPE, "set grad: gradient %s %s does not match the tensor %s %s", ts_dtype_name(g->dtype),
                        ts_tshape(g), ts_dtype_name(t->dtype), ts_tshape(t));
  if (g) ts_retain(g);
  ts_release(t->grad);
  t->grad = g;
  return TS_OK;
}

ts_tensor *ts_detach(ts_tensor *t) { return ts_detached(t); }

/* ---- gradient helpers ------------------------------------------------------------------------ */
ts_tensor *ts_sum_to(ts_tensor *g, int ndim, const int64_t *shape) {
  int dims[TS_MAX_DIMS], nd = 0, lead = g->ndim - ndim;
  for (int d = 0; d < g->ndim; d++)
    if (d < lead || (shape[d - lead] == 1 && g->shape[d] != 1)) dims[nd++] = d;
  if (nd == 0) {
    ts_retain(g);
    return g;
  }
  ts_tensor *s = ts_reduce(TS_SUM, g, nd, dims, 1);
  if (!s) return NULL;
  ts_tensor *r = ts_reshape(s, ndim, shape);
  ts_release(s);
  return r;
}

ts_tensor *ts_grad_for_input(ts_node *n, int input, ts_tensor *g) {
  const ts_edge *e = &n->edges[input];
  ts_tensor *s = ts_sum_to(g, e->ndim, e->shape);
  if (!s || s->dtype == e->dtype) return s;
  ts_tensor *c = ts_to_dtype(s, e->dtype);
  ts_release(s);
  return c;
}

/* ---- the reverse pass ------------------------------------------------------------------------ */
typedef struct { ts_node **items; size_t len, cap; } node_list;

static int push(node_list *l, ts_node *n) {
  if (l->len == l->cap) {
    size_t cap = l->cap ? 2 * l->cap : 64;
    ts_node **items = realloc(l->items, cap * sizeof *items);
    if (!items) return ts_set_error(TS_ERR_MEMORY, "backward: out of memory walking the graph");
    l->items = items;
    l->cap = cap;
  }
  l->items[l->len++] = n;
  return TS_OK;
}

/* Counts, for every node reachable from root, how many edges point at it. */
static int count_dependencies(ts_node *root, node_list *all) {
  node_list stack = {0};
  int st = push(&stack, root);
  root->pending = 0;
  if (!st) st = push(all, root);
  while (!st && stack.len) {
    ts_node *n = stack.items[--stack.len];
    for (int k = 0; k < n->n_inputs && !st; k++) {
      ts_node *next = n->edges[k].node;
      if (!next) continue;
      if (next->pending++ == 0 && !(st = push(all, next))) st = push(&stack, next);
    }
  }
  free(stack.items);
  return st;
}

/* Adds g into *slot; the first gradient is kept as is unless others may still see it. */
static int accumulate(ts_tensor **slot, ts_tensor *g, int steal) {
  if (!*slot) {
    if (steal) {
      ts_retain(g);
      *slot = g;
    } else {
      *slot = ts_clone(g);
    }
    return *slot ? TS_OK : ts_last_status();
  }
  ts_tensor *sum = ts_binary(TS_ADD, *slot, g);
  if (!sum) return ts_last_status();
  ts_release(*slot);
  *slot = sum;
  return TS_OK;
}

static int check_grad_shape(const ts_node *n, int k, const ts_tensor *g) {
  const ts_edge *e = &n->edges[k];
  if (!ts_shape_equal(g->ndim, g->shape, e->ndim, e->shape))
    return ts_set_error(TS_ERR_SHAPE, "%s backward: gradient %s for input %d of shape %s", n->name, ts_tshape(g), k,
                        ts_shape_str(e->ndim, e->shape));
  /* a leaf would silently get its .grad on another device (PyTorch's validate_outputs refuses too) */
  if (!ts_device_equal(g->device, e->device))
    return ts_set_error(TS_ERR_DEVICE, "%s backward: gradient on %s for input %d on %s", n->name,
                        ts_device_str(g->device), k, ts_device_str(e->device));
  return TS_OK;
}

static int accumulate_leaf(ts_tensor *leaf, ts_tensor *g) {
  if (leaf->grad) return ts_binary_(TS_ADD, leaf->grad, g); /* in place, as PyTorch: .grad stays one tensor */
  ts_tensor *owned;
  if (g->dtype != leaf->dtype) {
    owned = ts_to_dtype(g, leaf->dtype);
  } else if (g->refcount == 1 && g->storage->refcount == 1 && ts_is_contiguous(g)) {
    ts_retain(g); /* nobody else holds this gradient: it becomes .grad without a copy */
    owned = g;
  } else {
    owned = ts_clone(g);
  }
  if (!owned) return ts_last_status();
  leaf->grad = owned;
  return TS_OK;
}

static int run_node(ts_node *n, int retain_graph, node_list *ready) {
  if (n->released)
    return ts_set_error(TS_ERR_ARG, "backward: trying to go through the graph a second time (at %s); its saved "
                        "tensors were freed. Pass retain_graph = true to the first backward", n->name);
  ts_tensor *g = n->grad;
  n->grad = NULL;
  ts_tensor *grads_small[8] = {0}, **grads = n->n_inputs <= 8 ? grads_small : calloc((size_t)n->n_inputs, sizeof *grads);
  if (!grads) {
    ts_release(g);
    return ts_set_error(TS_ERR_MEMORY, "backward: out of memory");
  }
  int st = n->backward(n, g, grads);
  ts_release(g);
  if (!retain_graph) {
    free_saved(n);
    n->released = 1;
  }
  for (int k = 0; k < n->n_inputs; k++) {
    ts_edge *e = &n->edges[k];
    ts_tensor *gk = grads[k];
    if (!st && gk && e->needs_grad) {
      st = check_grad_shape(n, k, gk);
      if (!st && e->node) st = accumulate(&e->node->grad, gk, 1);
      else if (!st && e->leaf) st = accumulate_leaf(e->leaf, gk);
    }
    ts_release(gk);
    if (e->node && --e->node->pending == 0 && !st) st = push(ready, e->node);
  }
  if (grads != grads_small) free(grads);
  return st;
}

int ts_backward(ts_tensor *root, ts_tensor *grad, int retain_graph) {
  if (!root->requires_grad)
    return ts_set_error(TS_ERR_ARG, "backward: the tensor %s does not require grad and has no grad_fn", ts_tshape(root));
  ts_tensor *g = grad;
  if (g) {
    if (!ts_shape_equal(g->ndim, g->shape, root->ndim, root->shape))
      return ts_set_error(TS_ERR_SHAPE, "backward: gradient %s does not match the tensor %s", ts_tshape(g), ts_tshape(root));
    if (!ts_device_equal(g->device, root->device)) /* a leaf root would keep it as its .grad */
      return ts_set_error(TS_ERR_DEVICE, "backward: the gradient is on %s but the tensor is on %s",
                          ts_device_str(g->device), ts_device_str(root->device));
    ts_retain(g);
  } else {
    if (ts_numel(root) != 1)
      return ts_set_error(TS_ERR_ARG, "backward: a gradient can be implied only for one-element outputs, this one is %s; "
                          "pass the gradient", ts_tshape(root));
    g = ts_full(root->ndim, root->shape, 1.0, root->dtype, root->device);
    if (!g) return ts_last_status();
  }
  int previous = ts_set_grad_enabled(0);
  /* gradients are computed in the dtypes the forward recorded, whatever autocast says now */
  int autocast = ts_set_autocast(-1);
  int st;
  if (!root->grad_fn) {
    st = accumulate_leaf(root, g);
  } else {
    node_list all = {0}, ready = {0};
    st = count_dependencies(root->grad_fn, &all);
    if (!st) st = accumulate(&root->grad_fn->grad, g, 0);
    if (!st) st = push(&ready, root->grad_fn);
    while (!st && ready.len) st = run_node(ready.items[--ready.len], retain_graph, &ready);
    for (size_t k = 0; k < all.len; k++) { /* after an error, leave no half-accumulated state */
      ts_release(all.items[k]->grad);
      all.items[k]->grad = NULL;
      all.items[k]->pending = 0;
    }
    free(all.items);
    free(ready.items);
  }
  ts_release(g);
  ts_set_autocast(autocast);
  ts_set_grad_enabled(previous);
  return st;
}

/* ---- scopes for backward formulas ------------------------------------------------------------ */
ts_tensor *ts_scope_keep(ts_scope *s, ts_tensor *t) {
  if (!t) {
    s->failed = 1;
    return NULL;
  }
  if (s->n == TS_SCOPE_MAX) { /* a formula this long is a bug in the formula */
    ts_release(t);
    ts_set_error(TS_ERR_ARG, "backward: too many temporaries in one formula");
    s->failed = 1;
    return NULL;
  }
  s->held[s->n++] = t;
  return t;
}

int ts_scope_close(ts_scope *s) {
  for (int k = 0; k < s->n; k++) ts_release(s->held[k]);
  s->n = 0;
  if (!s->failed) return TS_OK;
  return ts_last_status() ? ts_last_status() : ts_set_error(TS_ERR_ARG, "backward: a step of the formula failed without a message");
}

ts_tensor *ts_s_unary(ts_scope *s, int op, ts_tensor *a) {
  if (s->failed || !a) return ts_scope_keep(s, NULL);
  return ts_scope_keep(s, ts_unary(op, a));
}

ts_tensor *ts_s_binary(ts_scope *s, int op, ts_tensor *a, ts_tensor *b) {
  if (s->failed || !a || !b) return ts_scope_keep(s, NULL);
  return ts_scope_keep(s, ts_binary(op, a, b));
}

ts_tensor *ts_s_scalar(ts_scope *s, int op, ts_tensor *a, double v) {
  if (s->failed || !a) return ts_scope_keep(s, NULL);
  return ts_scope_keep(s, ts_binary_scalar(op, a, v, 0));
}

int ts_set_input_grad(ts_node *n, int input, ts_tensor *g, ts_tensor **grads) {
  if (!n->edges[input].needs_grad || !g) return TS_OK;
  grads[input] = ts_grad_for_input(n, input, g);
  return grads[input] ? TS_OK : ts_last_status();
}

int ts_set_input_grad_as(ts_node *n, int input, ts_tensor *g, int ndim, const int64_t *shape, ts_tensor **grads) {
  if (!g) return TS_OK;
  ts_tensor *view = ts_view(g, ndim, shape);
  if (!view) return ts_last_status();
  int st = ts_set_input_grad(n, input, view, grads);
  ts_release(view);
  return st;
}

ts_tensor *ts_s_grad_buffer(ts_scope *s, ts_node *n, int input, const ts_tensor *like) {
  if (s->failed || !like || !ts_node_needs_grad(n, input)) return NULL;
  return ts_scope_keep(s, ts_empty(like->ndim, like->shape, like->dtype, like->device));
}

ts_tensor *ts_s_cast(ts_scope *s, ts_tensor *a, int dtype) {
  if (s->failed || !a) return ts_scope_keep(s, NULL);
  return ts_scope_keep(s, ts_to_dtype(a, dtype));
}

ts_tensor *ts_s_where(ts_scope *s, ts_tensor *cond, ts_tensor *a, ts_tensor *b) {
  if (s->failed || !cond || !a || !b) return ts_scope_keep(s, NULL);
  return ts_scope_keep(s, ts_where(cond, a, b));
}

int ts_rebase_inplace(ts_tensor *a, ts_tensor *r) {
  if (!r) return ts_last_status();
  if (r->requires_grad && ts_check_view_write("in-place op", a)) {
    ts_release(r);
    return ts_last_status();
  }
  int previous = ts_set_grad_enabled(0);
  int st = ts_copy_(a, r);
  ts_set_grad_enabled(previous);
  if (!st) {
    ts_bump_version(a);
    ts_node_release(a->grad_fn);
    a->grad_fn = r->grad_fn;
    a->requires_grad = r->requires_grad;
    r->grad_fn = NULL;
  }
  ts_release(r);
  return st;
}

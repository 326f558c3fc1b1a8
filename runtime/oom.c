/* oom.c — the hook a device allocator calls when it runs out of memory (ts_set_oom_callback).
 *
 * The Lua binding registers a full garbage collection here: device memory may be held by tensors
 * that only unreachable Lua values still reference, and a collection releases them. The hook is
 * called only on the thread that registered it (for LuaJIT, the thread that runs the Lua state,
 * which must not be entered from another thread) and never re-entered: an allocation that fails
 * inside the hook just fails. */
#include "internal.h"

#include <pthread.h>

static pthread_mutex_t hook_lock = PTHREAD_MUTEX_INITIALIZER;
static void (*hook)(void);
static pthread_t hook_thread;
static _Thread_local int in_hook;

void ts_set_oom_callback(void (*fn)(void)) {
  pthread_mutex_lock(&hook_lock);
  hook = fn;
  hook_thread = pthread_self();
  pthread_mutex_unlock(&hook_lock);
}

/* Declared in kernels/cuda/cuda.h, the allocator that calls it: 1 when the hook ran. */
int ts_run_oom_callback(void);

int ts_run_oom_callback(void) {
  pthread_mutex_lock(&hook_lock);
  void (*fn)(void) = hook;
  int mine = fn && pthread_equal(hook_thread, pthread_self());
  pthread_mutex_unlock(&hook_lock);
  if (!mine || in_hook) return 0;
  in_hook = 1;
  fn();
  in_hook = 0;
  return 1;
}

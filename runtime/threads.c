/* threads.c — the CPU thread pool behind ts_parallel_for, and its pact with OpenBLAS.
 *
 * The pool and OpenBLAS are sized together by ts_set_num_threads. We never call BLAS from inside a
 * parallel region with more than one thread busy, and our workers sleep on a condition variable
 * between jobs, so the two pools take turns on the cores instead of fighting over them. */
#include "internal.h"

#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

void openblas_set_num_threads(int num_threads);

enum { MAX_THREADS = 256 };

typedef struct job {
  ts_range_fn fn;
  void *ctx;
  int64_t n, chunk;
  int64_t next_chunk; /* atomic: next chunk index to take */
  int64_t num_chunks;
  int pending;        /* the workers taking part that are still running (guarded by pool.lock) */
} job;

static struct {
  pthread_mutex_t lock;
  pthread_mutex_t busy; /* held by the one caller whose job is running */
  pthread_cond_t wake, done;
  pthread_t threads[MAX_THREADS];
  int num_workers;  /* threads besides the caller */
  int wanted;       /* total threads requested, caller included */
  uint64_t generation;
  job *current;     /* the running job; dangles once it is done, so only its workers may read it */
  int active;       /* the workers with an id below this take part in the current generation */
  int started;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .busy = PTHREAD_MUTEX_INITIALIZER,
        .wake = PTHREAD_COND_INITIALIZER, .done = PTHREAD_COND_INITIALIZER};

static _Thread_local int inside_parallel;

static void run_chunks(job *j) {
  for (;;) {
    int64_t c = __atomic_fetch_add(&j->next_chunk, 1, __ATOMIC_RELAXED);
    if (c >= j->num_chunks) return;
    int64_t begin = c * j->chunk, end = begin + j->chunk < j->n ? begin + j->chunk : j->n;
    j->fn(begin, end, j->ctx);
  }
}

static void *worker_main(void *arg) {
  int id = (int)(intptr_t)arg;
  inside_parallel = 1;
  uint64_t seen = 0;
  pthread_mutex_lock(&pool.lock);
  for (;;) {
    while (pool.generation == seen) pthread_cond_wait(&pool.wake, &pool.lock);
    seen = pool.generation;
    /* fewer threads wanted than exist: sit this one out (without touching pool.current: the job
       may be over and its caller gone, since callers wait only for the workers taking part) */
    if (id >= pool.active) continue;
    job *j = pool.current;
    pthread_mutex_unlock(&pool.lock);
    run_chunks(j);
    pthread_mutex_lock(&pool.lock);
    if (--j->pending == 0) pthread_cond_signal(&pool.done);
  }
  return NULL;
}

static int default_threads(void) {
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : (int)n;
}

/* Workers are started on first use and only ever added; extra ones idle when fewer are wanted. They
   are never joined: they sleep on pool.wake until the process exits, which is why the library is
   linked with -z nodelete (CMakeLists.txt): a dlclose that unmapped `pool` under them would make a
   worker's restarted futex wait fail with EFAULT and glibc abort the process. */
static void ensure_workers(int total) {
  while (pool.num_workers < total - 1) {
    if (pthread_create(&pool.threads[pool.num_workers], NULL, worker_main,
                       (void *)(intptr_t)pool.num_workers) != 0) break;
    pool.num_workers++;
  }
}

void ts_set_num_threads(int n) {
  if (n <= 0) n = default_threads();
  if (n > MAX_THREADS) n = MAX_THREADS;
  pthread_mutex_lock(&pool.lock);
  pool.wanted = n;
  pool.started = 1;
  pthread_mutex_unlock(&pool.lock);
  openblas_set_num_threads(n);
}

int ts_get_num_threads(void) {
  if (!pool.started) ts_set_num_threads(0);
  return pool.wanted;
}

void ts_parallel_for(int64_t n, int64_t grain, ts_range_fn fn, void *ctx) {
  if (n <= 0) return;
  int threads = ts_get_num_threads();
  if (grain < 1) grain = 1;
  int64_t max_chunks = (n + grain - 1) / grain;
  /* Nested calls, and calls from other threads while a job runs, go serial. */
  if (threads <= 1 || max_chunks <= 1 || inside_parallel || pthread_mutex_trylock(&pool.busy) != 0) {
    fn(0, n, ctx);
    return;
  }
  /* A few chunks per thread evens out uneven work without much scheduling overhead. */
  int64_t num_chunks = max_chunks < 4 * (int64_t)threads ? max_chunks : 4 * (int64_t)threads;
  int64_t chunk = (n + num_chunks - 1) / num_chunks;
  job j = {fn, ctx, n, chunk, 0, (n + chunk - 1) / chunk, 0};

  pthread_mutex_lock(&pool.lock);
  ensure_workers(threads);
  int helpers = threads - 1 < pool.num_workers ? threads - 1 : pool.num_workers;
  if (helpers <= 0) {
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool.busy);
    fn(0, n, ctx);
    return;
  }
  j.pending = pool.active = helpers;
  pool.current = &j;
  pool.generation++;
  pthread_cond_broadcast(&pool.wake);
  pthread_mutex_unlock(&pool.lock);

  inside_parallel = 1;
  run_chunks(&j);
  inside_parallel = 0;

  pthread_mutex_lock(&pool.lock);
  while (j.pending > 0) pthread_cond_wait(&pool.done, &pool.lock);
  pthread_mutex_unlock(&pool.lock);
  pthread_mutex_unlock(&pool.busy);
}

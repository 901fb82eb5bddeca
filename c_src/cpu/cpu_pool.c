/*
 * cpu_pool.c: the persistent thread pool of the CPU kernels. See cpu_pool.h
 * for the invariants.
 *
 * A job is published under `lock` by bumping `generation`; each worker runs
 * items (claimed one at a time from the atomic `next`) until none are left,
 * then reports done. The caller works as worker 0 and waits until every
 * worker has reported, so the job's context outlives every use of it.
 * `owner` is held by the caller for the whole job: a second caller that
 * cannot take it runs its items inline instead of waiting.
 */
#include "cpu_pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#define MX_POOL_MAX 256
#define MX_POOL_STACK ((size_t)1 << 20)

static struct {
  pthread_mutex_t lock;       /* guards every field below but `next` */
  pthread_cond_t start_cv;    /* workers wait here for a new generation */
  pthread_cond_t done_cv;     /* the caller waits here for pending == 0 */
  pthread_mutex_t owner;      /* held by the caller running a job */
  pthread_t threads[MX_POOL_MAX];
  int nthreads;               /* threads started (workers 1..nthreads) */
  int stop;                   /* set by the destructor */
  uint64_t generation;        /* bumped for each job */
  int pending;                /* workers that have not finished the job */
  mx_pool_fn fn;
  void *ctx;
  int64_t count;
  atomic_llong next;          /* next unclaimed item */
} P = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .start_cv = PTHREAD_COND_INITIALIZER,
    .done_cv = PTHREAD_COND_INITIALIZER,
    .owner = PTHREAD_MUTEX_INITIALIZER,
};

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;

static void run_items(mx_pool_fn fn, void *ctx, int64_t count, int worker) {
  for (;;) {
    int64_t i = atomic_fetch_add_explicit(&P.next, 1, memory_order_relaxed);
    if (i >= count) return;
    fn(ctx, i, worker);
  }
}

static void *worker_main(void *arg) {
  int worker = (int)(intptr_t)arg;
  uint64_t seen = 0;
  pthread_mutex_lock(&P.lock);
  for (;;) {
    while (!P.stop && P.generation == seen) pthread_cond_wait(&P.start_cv, &P.lock);
    if (P.generation == seen) break; /* stopped, and no job left to finish */
    seen = P.generation;
    mx_pool_fn fn = P.fn;
    void *ctx = P.ctx;
    int64_t count = P.count;
    pthread_mutex_unlock(&P.lock);
    run_items(fn, ctx, count, worker);
    pthread_mutex_lock(&P.lock);
    if (--P.pending == 0) pthread_cond_signal(&P.done_cv);
  }
  pthread_mutex_unlock(&P.lock);
  return NULL;
}

static void pool_start(void) {
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  if (n < 1) n = 1;
  if (n > MX_POOL_MAX) n = MX_POOL_MAX;
  pthread_attr_t attr;
  int have_attr = pthread_attr_init(&attr) == 0;
  if (have_attr) {
    pthread_attr_setstacksize(&attr, MX_POOL_STACK);
    /* Workers may run on any CPU the process may use (the main thread's
     * set), not only on the CPU the creating scheduler thread is bound to. */
    cpu_set_t cpus;
    if (sched_getaffinity(getpid(), sizeof cpus, &cpus) == 0)
      pthread_attr_setaffinity_np(&attr, sizeof cpus, &cpus);
  }
  pthread_mutex_lock(&P.lock);
  for (long i = 1; i < n && !P.stop; i++) {
    if (pthread_create(&P.threads[P.nthreads], have_attr ? &attr : NULL, worker_main,
                       (void *)(intptr_t)i) != 0)
      break;
    P.nthreads++;
  }
  pthread_mutex_unlock(&P.lock);
  if (have_attr) pthread_attr_destroy(&attr);
}

int mx_pool_size(void) {
  pthread_once(&pool_once, pool_start);
  return P.nthreads + 1;
}

void mx_pool_for(int64_t count, mx_pool_fn fn, void *ctx) {
  if (count <= 0) return;
  int size = mx_pool_size();
  int pooled = 0;
  if (size > 1 && count > 1 && pthread_mutex_trylock(&P.owner) == 0) {
    pthread_mutex_lock(&P.lock);
    if (!P.stop) {
      P.fn = fn;
      P.ctx = ctx;
      P.count = count;
      atomic_store_explicit(&P.next, 0, memory_order_relaxed);
      P.pending = P.nthreads;
      P.generation++;
      pthread_cond_broadcast(&P.start_cv);
      pooled = 1;
    }
    pthread_mutex_unlock(&P.lock);
    if (!pooled) pthread_mutex_unlock(&P.owner);
  }
  if (!pooled) { /* inline, in order, as worker 0 */
    for (int64_t i = 0; i < count; i++) fn(ctx, i, 0);
    return;
  }
  run_items(fn, ctx, count, 0);
  pthread_mutex_lock(&P.lock);
  while (P.pending > 0) pthread_cond_wait(&P.done_cv, &P.lock);
  pthread_mutex_unlock(&P.lock);
  pthread_mutex_unlock(&P.owner);
}

/* Runs when the library is unloaded (dlclose after a NIF upgrade) or at
 * exit: stop the workers and wait for them, while their code is mapped. */
__attribute__((destructor)) static void pool_stop(void) {
  pthread_mutex_lock(&P.lock);
  P.stop = 1;
  int n = P.nthreads;
  pthread_cond_broadcast(&P.start_cv);
  pthread_mutex_unlock(&P.lock);
  for (int i = 0; i < n; i++) pthread_join(P.threads[i], NULL);
}

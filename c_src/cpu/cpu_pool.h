/*
 * cpu_pool.h: a small persistent thread pool for the CPU kernels, with one
 * primitive: a parallel for over work items 0..count-1.
 *
 * Invariants:
 *   - The pool is created lazily, on the first parallel call (pthread_once).
 *     It has mx_pool_size() workers, the number of online CPUs: the calling
 *     thread is worker 0 and size - 1 threads are started (fewer if the
 *     system refuses some; never more). The threads may run on every CPU
 *     the process may use, whatever the binding of the thread that created
 *     them (a BEAM scheduler may be bound to one CPU).
 *   - One parallel for owns the pool at a time. A caller that finds the pool
 *     busy (another dirty scheduler is running a kernel on it) does not wait:
 *     it runs its items itself, in order, as worker 0. So does a call of one
 *     item, or any call once the pool has been stopped.
 *   - mx_pool_for returns only after every item has finished. Items run in
 *     any order, on any worker, any number of them per worker: a caller keeps
 *     its results independent of that (and so of the number of threads) by
 *     having each item write only outputs that belong to it, and by using
 *     per-worker scratch (indexed by the `worker` argument, 0 <= worker <
 *     mx_pool_size()) only within one item, after initialising it. Scratch
 *     belongs to the call, never to the pool.
 *   - Workers block only on the pool's own mutex and condition variables;
 *     they never call into the BEAM (no enif_* calls, no Erlang terms).
 *   - The threads live until the library is unloaded or the process exits: a
 *     destructor stops and joins them, so no pool thread is left running
 *     code of an unmapped library after a NIF upgrade unloads the old one.
 *   - Item functions must not call mx_pool_for themselves (it would run
 *     inline, which is correct but serial).
 */
#ifndef MAMBEX_CPU_POOL_H
#define MAMBEX_CPU_POOL_H

#include <stdint.h>

typedef void (*mx_pool_fn)(void *ctx, int64_t item, int worker);

/* Number of workers a parallel for may use (>= 1); creates the pool. */
int mx_pool_size(void);

/* Runs fn(ctx, i, worker) for every i in [0, count), spread over the pool.
 * Returns when all have finished. */
void mx_pool_for(int64_t count, mx_pool_fn fn, void *ctx);

#endif /* MAMBEX_CPU_POOL_H */

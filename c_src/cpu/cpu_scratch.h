/*
 * cpu_scratch.h: a kept scratch block for CPU kernels that need large
 * temporary buffers on every call (the GEMM's packed panels, the scan's
 * per-worker states).
 *
 * Invariants: one block (at most `limit` bytes) is kept between calls, so a
 * run of calls does not fault in fresh pages every time. One call at a time
 * takes it (under the mutex); a call that finds it taken or too small
 * allocates its own. Giving back keeps the larger of the two blocks and
 * frees the other. Blocks are 64-byte aligned. The owner releases the kept
 * block at unload (mx_keep_release from a destructor).
 */
#ifndef MAMBEX_CPU_SCRATCH_H
#define MAMBEX_CPU_SCRATCH_H

#include <pthread.h>
#include <stddef.h>

typedef struct {
  pthread_mutex_t lock;
  void *ptr;
  size_t size;
  size_t limit; /* blocks above this are never kept */
} mx_keep;

#define MX_KEEP_INIT(limit) {PTHREAD_MUTEX_INITIALIZER, NULL, 0, (limit)}

/* At least `bytes` (rounded up to 64); *size gets the block's real size, to
 * pass back to mx_keep_give. NULL when out of memory. */
void *mx_keep_take(mx_keep *k, size_t bytes, size_t *size);
void mx_keep_give(mx_keep *k, void *p, size_t size);
void mx_keep_release(mx_keep *k);

#endif /* MAMBEX_CPU_SCRATCH_H */

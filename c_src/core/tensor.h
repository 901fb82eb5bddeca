/*
 * tensor.h: the backend-neutral tensor descriptor, reference-counted storage
 * and per-device memory accounting.
 *
 * Lifetimes and threading (the invariants the rest of the NIF relies on):
 *   - A tensor (mx_tensor, the BEAM resource object) owns one reference to
 *     its storage until it is freed (Mambex.Tensor.free/1) or its resource
 *     is destroyed, whichever comes first. Views (reshape) are new tensors
 *     holding another reference to the same storage.
 *   - An op never reads `tensor->storage` directly: it calls
 *     mx_tensor_acquire, which takes a storage reference under a striped
 *     lock, so a concurrent free/1 on another scheduler cannot release the
 *     memory while the op is enqueueing work on it. The op drops its
 *     references with mx_storage_release after enqueueing.
 *   - When the last reference goes, the storage is handed to its backend's
 *     free_async, which is O(1) and stream-ordered (safe from a destructor
 *     on a normal scheduler: every op that used the memory was enqueued
 *     before the reference was dropped).
 *   - Memory statistics live in one block (mx_shared) that survives a NIF
 *     upgrade, so live bytes stay exact across `recompile`.
 */
#ifndef MAMBEX_TENSOR_H
#define MAMBEX_TENSOR_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"

/* Device slots: 0 is the CPU, 1 + i is CUDA device i. */
#define MX_CPU_SLOT 0
#define MX_NUM_SLOTS (1 + MX_MAX_CUDA_DEVICES)

typedef struct {
  atomic_llong live_bytes;
  atomic_llong peak_bytes;
  atomic_llong live_handles;
  atomic_llong total_allocs;
} mx_mem_stats;

/* State shared by every loaded instance of the NIF library. */
typedef struct {
  atomic_int instances;
  mx_mem_stats stats[MX_NUM_SLOTS];
} mx_shared;

typedef struct {
  atomic_long refs;
  int slot;        /* device slot */
  void *ptr;       /* host or device pointer */
  size_t nbytes;
} mx_storage;

typedef struct {
  mx_storage *storage; /* NULL once freed; guarded by the stripe lock */
  int dtype;
  int rank;
  int64_t shape[MX_MAX_RANK];
  size_t offset;       /* bytes into storage (0 for now; views along axis 0 later) */
  size_t nbytes;
  int slot;
} mx_tensor;

/* Set by the NIF at load/upgrade. */
void mx_core_init(mx_shared *shared, const mx_backend *cuda, int cuda_devices);
const mx_backend *mx_backend_for(int slot);
int mx_backend_dev(int slot);
int mx_cuda_device_count(void);
mx_mem_stats *mx_stats_for(int slot);

/* Number of elements; returns -1 on overflow past 2^62 bytes at elsize. */
int64_t mx_numel_checked(const int64_t *shape, int rank, size_t elsize);

/* Allocate storage of nbytes on a slot (refs = 1). */
int mx_storage_new(int slot, size_t nbytes, mx_storage **out, mx_err *err);
/* Counts nbytes more live on a slot (raising the peak): storage does it
 * itself; other holders of device memory (inference plans) call it and
 * subtract from live_bytes when they let go. */
void mx_stats_add_live(int slot, size_t nbytes);
void mx_storage_retain(mx_storage *s);
void mx_storage_release(mx_storage *s);

/* Take a storage reference from a live tensor; NULL if it was freed. */
mx_storage *mx_tensor_acquire(mx_tensor *t);
/* Drop the tensor's own reference (free/1 and the destructor). Returns 1 if
 * the tensor was live. */
int mx_tensor_drop(mx_tensor *t);

static inline void *mx_data(mx_storage *s, const mx_tensor *t) {
  return (char *)s->ptr + t->offset;
}

#endif /* MAMBEX_TENSOR_H */

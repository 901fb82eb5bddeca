/*
 * tensor.c: storage reference counting, the striped lock that makes
 * acquire-versus-free safe, and memory accounting. See tensor.h for the
 * lifetime invariants.
 */
#include "tensor.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

static mx_shared *g_shared;
static const mx_backend *g_cuda;
static int g_cuda_devices;

/* Striped locks guarding tensor->storage against a concurrent free/1. */
#define MX_STRIPES 64
static pthread_mutex_t g_stripes[MX_STRIPES] = {
#define MX_M PTHREAD_MUTEX_INITIALIZER
    MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M,
    MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M,
    MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M,
    MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M,
    MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M, MX_M
#undef MX_M
};

static pthread_mutex_t *stripe_for(const void *p) {
  uintptr_t h = (uintptr_t)p;
  h ^= h >> 17;
  h *= 0x9e3779b97f4a7c15ULL;
  return &g_stripes[(h >> 58) & (MX_STRIPES - 1)];
}

void mx_core_init(mx_shared *shared, const mx_backend *cuda, int cuda_devices) {
  g_shared = shared;
  g_cuda = cuda;
  g_cuda_devices = cuda ? cuda_devices : 0;
}

const mx_backend *mx_backend_for(int slot) {
  if (slot == MX_CPU_SLOT) return mx_cpu_backend();
  if (slot >= 1 && slot <= g_cuda_devices) return g_cuda;
  return NULL;
}

int mx_backend_dev(int slot) { return slot == MX_CPU_SLOT ? 0 : slot - 1; }

int mx_cuda_device_count(void) { return g_cuda_devices; }

mx_mem_stats *mx_stats_for(int slot) { return &g_shared->stats[slot]; }

int64_t mx_numel_checked(const int64_t *shape, int rank, size_t elsize) {
  const int64_t limit = (int64_t)1 << 62;
  int64_t n = 1;
  for (int i = 0; i < rank; i++) {
    if (shape[i] < 0) return -1;
    if (shape[i] != 0 && n > limit / shape[i]) return -1;
    n *= shape[i];
  }
  if (elsize != 0 && n > limit / (int64_t)elsize) return -1;
  return n;
}

int mx_storage_new(int slot, size_t nbytes, mx_storage **out, mx_err *err) {
  const mx_backend *be = mx_backend_for(slot);
  if (!be) {
    err->kind = MX_E_ARG;
    snprintf(err->msg, sizeof err->msg, "device slot %d is not available", slot);
    return err->kind;
  }
  mx_storage *s = malloc(sizeof *s);
  if (!s) {
    err->kind = MX_E_OOM;
    snprintf(err->msg, sizeof err->msg, "out of host memory for a storage record");
    return err->kind;
  }
  void *ptr = NULL;
  int rc = be->alloc(mx_backend_dev(slot), nbytes, &ptr, err);
  if (rc != MX_OK) {
    free(s);
    return rc;
  }
  atomic_init(&s->refs, 1);
  s->slot = slot;
  s->ptr = ptr;
  s->nbytes = nbytes;
  atomic_fetch_add(&mx_stats_for(slot)->total_allocs, 1);
  mx_stats_add_live(slot, nbytes);
  *out = s;
  return MX_OK;
}

void mx_stats_add_live(int slot, size_t nbytes) {
  mx_mem_stats *st = mx_stats_for(slot);
  long long live = atomic_fetch_add(&st->live_bytes, (long long)nbytes) + (long long)nbytes;
  long long peak = atomic_load(&st->peak_bytes);
  while (live > peak && !atomic_compare_exchange_weak(&st->peak_bytes, &peak, live)) {
  }
}

void mx_storage_retain(mx_storage *s) { atomic_fetch_add(&s->refs, 1); }

void mx_storage_release(mx_storage *s) {
  if (!s) return;
  if (atomic_fetch_sub(&s->refs, 1) != 1) return;
  const mx_backend *be = mx_backend_for(s->slot);
  if (be) be->free_async(mx_backend_dev(s->slot), s->ptr);
  atomic_fetch_sub(&mx_stats_for(s->slot)->live_bytes, (long long)s->nbytes);
  free(s);
}

mx_storage *mx_tensor_acquire(mx_tensor *t) {
  pthread_mutex_t *m = stripe_for(t);
  pthread_mutex_lock(m);
  mx_storage *s = t->storage;
  if (s) mx_storage_retain(s);
  pthread_mutex_unlock(m);
  return s;
}

int mx_tensor_drop(mx_tensor *t) {
  pthread_mutex_t *m = stripe_for(t);
  pthread_mutex_lock(m);
  mx_storage *s = t->storage;
  t->storage = NULL;
  pthread_mutex_unlock(m);
  if (!s) return 0;
  mx_storage_release(s);
  atomic_fetch_sub(&mx_stats_for(t->slot)->live_handles, 1);
  return 1;
}

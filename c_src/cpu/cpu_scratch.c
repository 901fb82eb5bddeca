/*
 * cpu_scratch.c: the kept scratch block (see cpu_scratch.h for the
 * invariants).
 */
#include <stdlib.h>

#include "cpu_scratch.h"

void *mx_keep_take(mx_keep *k, size_t bytes, size_t *size) {
  void *p = NULL;
  bytes = (bytes + 63) & ~(size_t)63;
  if (!bytes) bytes = 64;
  pthread_mutex_lock(&k->lock);
  if (k->ptr && k->size >= bytes) {
    p = k->ptr;
    *size = k->size;
    k->ptr = NULL;
  }
  pthread_mutex_unlock(&k->lock);
  if (!p) {
    p = aligned_alloc(64, bytes);
    *size = bytes;
  }
  return p;
}

void mx_keep_give(mx_keep *k, void *p, size_t size) {
  if (p && size <= k->limit) {
    pthread_mutex_lock(&k->lock);
    if (!k->ptr || k->size < size) {
      void *old = k->ptr;
      k->ptr = p;
      k->size = size;
      p = old;
    }
    pthread_mutex_unlock(&k->lock);
  }
  free(p);
}

void mx_keep_release(mx_keep *k) {
  free(k->ptr);
  k->ptr = NULL;
  k->size = 0;
}

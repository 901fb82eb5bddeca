/*
 * cuda_runtime_state.h: per-device state of the CUDA backend and the one
 * error-checking path every CUDA call goes through.
 *
 * Devices. Each device index below MX_MAX_CUDA_DEVICES has one mx_cuda_dev,
 * set up lazily by the first call that needs it (mx_cuda_open): cudaSetDevice,
 * one non-blocking stream, the device's default memory pool with its release
 * threshold at UINT64_MAX (freed memory stays in the pool), and the mutexes.
 * Set-up runs under one global mutex and is published with a release store
 * of `ready`, so any thread may be the first; a failed set-up is retried by
 * the next call. Nothing is ever torn down: the state lives as long as the
 * process (the shared object must not be dlclose'd, cudart registers exit
 * handlers).
 *
 * Threads. Any thread may call any entry point. The CUDA current device is
 * per thread, so every entry point calls cudaSetDevice (cheap) first.
 *   - `mu` is held only while enqueueing work on the stream (microseconds):
 *     it makes an op's launches contiguous and gives one call order per device.
 *   - `stage_mu` guards the pinned staging buffers of upload/download; it is
 *     held for the whole copy (which may wait on events) and taken BEFORE
 *     `mu`, never the other way round. `mu` is taken per chunk inside it.
 *   - free_async and event_destroy take no mutex at all (CUDA calls are
 *     thread-safe and the caller guarantees no op using the pointer is still
 *     being enqueued), so resource destructors on normal schedulers never wait.
 *   - sync, event_elapsed and large downloads (download_direct) wait on the
 *     stream without holding any mutex.
 *
 * Streams. One stream per device carries every op in call order; download,
 * sync and event_elapsed wait for it. upload waits only to reuse a staging
 * slot whose earlier copy is still queued (stream-ordered, so behind earlier
 * work): a run of small uploads rotates through 16 slots, an upload above
 * 64 MiB waits for its own third chunk's slot. Memory comes from
 * cudaMallocAsync / cudaFreeAsync on the same stream, so a free is ordered
 * after every op enqueued before it.
 *
 * cuBLASLt (linear.cu). Each device also owns one cuBLASLt handle, one
 * workspace of MX_LT_WORKSPACE_BYTES (stream-ordered memory of the device's
 * pool) and a small cache of per-shape matmul plans (descriptors, layouts
 * and the chosen algorithm). All three are created by the first GEMM on the
 * device, under `mu`, and only ever touched under `mu`; like the stream they
 * are never torn down. GEMMs enqueue on the device's one stream, so the one
 * workspace is never used by two GEMMs at a time.
 *
 * Errors. Every CUDA call goes through MX_CUDA_CALL / MX_CUDA_TRY, which
 * writes "cudaMallocAsync: out of memory (cuda_runtime.cu:120)" into the
 * mx_err and maps the error: cudaErrorMemoryAllocation -> MX_E_OOM; sticky
 * errors (illegal address, launch failure, ...) mark the device lost and give
 * MX_E_LOST; anything else MX_E_RUNTIME. A lost device answers MX_E_LOST to
 * every later call with the first error's text. Every kernel launch is
 * followed by MX_CUDA_LAUNCHED (cudaGetLastError through the same path).
 */
#ifndef MAMBEX_CUDA_RUNTIME_STATE_H
#define MAMBEX_CUDA_RUNTIME_STATE_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime.h>

#include "../core/backend.h"

/* Everything but mx_cuda_backend_get stays out of the dynamic symbol table. */
#define MX_CUDA_HIDDEN __attribute__((visibility("hidden")))

/* Pinned staging for host copies: two big buffers used in turn for large
 * copies (chunked, double-buffered), and a ring of small slots so that a run
 * of small uploads does not wait for the GPU. */
#define MX_STAGE_BIG_BYTES ((size_t)32 << 20)
#define MX_STAGE_BIG_COUNT 2
#define MX_STAGE_SMALL_BYTES ((size_t)64 << 10)
#define MX_STAGE_SMALL_COUNT 16
/* Downloads from this size on skip the staging (see download_direct). */
#define MX_DOWNLOAD_DIRECT_BYTES ((size_t)4 << 20)

/* The cuBLASLt workspace of each device (linear.cu). */
#define MX_LT_WORKSPACE_BYTES ((size_t)32 << 20)

/* Threads per block of every kernel. */
#define MX_BLOCK 256

typedef struct {
  void *host;        /* pinned, `cap` bytes */
  size_t cap;
  cudaEvent_t ev;    /* recorded after the last copy that used `host` */
} mx_stage_slot;

typedef struct {
  int ready;                 /* 1 once set up (atomic, release/acquire) */
  int lost;                  /* 1 once a sticky error was seen (atomic) */
  char lost_msg[MX_ERR_LEN]; /* the first sticky error's text (g_lost_mu) */
  int index;
  int sm_count;
  int cc_major, cc_minor;    /* compute capability */
  int smem_optin;            /* shared memory a block may opt into, bytes */
  cudaStream_t stream;
  cudaMemPool_t pool;
  pthread_mutex_t mu;        /* held while enqueueing */

  /* cuBLASLt state of linear.cu, created lazily under `mu` (see above). */
  void *lt_handle;           /* cublasLtHandle_t, or NULL */
  void *lt_workspace;        /* MX_LT_WORKSPACE_BYTES of device memory, or NULL */
  void *lt_plans;            /* linear.cu's plan cache, or NULL */

  pthread_mutex_t stage_mu;  /* held while using the staging slots */
  int big_ready, small_ready;
  unsigned small_next;
  void *small_block;         /* one pinned block carved into small slots */
  mx_stage_slot big[MX_STAGE_BIG_COUNT];
  mx_stage_slot small[MX_STAGE_SMALL_COUNT];
} mx_cuda_dev;

#ifdef __cplusplus
extern "C" {
#endif

/* Map `e` to an mx_errkind and, when it is not cudaSuccess, fill `err`
 * ("<call>: <cuda error string> (<file>:<line>)"), clear the thread's last
 * CUDA error and, for a sticky error, mark device `dev` (>= 0) lost. */
MX_CUDA_HIDDEN int mx_cuda_check(cudaError_t e, int dev, mx_err *err, const char *call,
                                 const char *file, int line);

/* Fill `err` with a formatted message of kind `kind` and return `kind`. */
MX_CUDA_HIDDEN int mx_cuda_fail(mx_err *err, int kind, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Validate `dev`, refuse a lost device, set it up if needed and make it the
 * calling thread's current device. Takes no mutex. */
MX_CUDA_HIDDEN int mx_cuda_open(int dev, mx_err *err, mx_cuda_dev **out);

/* mx_cuda_open, then take the device's enqueue mutex (release with
 * mx_cuda_unlock). On failure no mutex is held. */
MX_CUDA_HIDDEN int mx_cuda_begin(int dev, mx_err *err, mx_cuda_dev **out);
MX_CUDA_HIDDEN void mx_cuda_unlock(mx_cuda_dev *d);

/* Grid size of a grid-stride loop over `n` items: one full wave at most. */
MX_CUDA_HIDDEN unsigned mx_cuda_grid(const mx_cuda_dev *d, uint64_t n);

#ifdef __cplusplus
}
#endif

/* `rc = MX_CUDA_CALL(d, err, cudaFoo(...))`: 0 or the mx_errkind. */
#define MX_CUDA_CALL(d, err, call) \
  mx_cuda_check((call), (d)->index, (err), #call, __FILE__, __LINE__)

/* Return the mx_errkind from the enclosing function when `call` fails. */
#define MX_CUDA_TRY(d, err, call)                                  \
  do {                                                             \
    int mx_rc_ = mx_cuda_check((call), (d)->index, (err), #call,   \
                               __FILE__, __LINE__);                \
    if (mx_rc_ != MX_OK) return mx_rc_;                            \
  } while (0)

/* After every kernel launch: a launch error, reported under the kernel's
 * name. `rc = MX_CUDA_LAUNCH_RC(...)` gives the kind; MX_CUDA_LAUNCHED
 * returns it from the enclosing function. */
#define MX_CUDA_LAUNCH_RC(d, err, kernel_name)                       \
  mx_cuda_check(cudaGetLastError(), (d)->index, (err), kernel_name " launch", \
                __FILE__, __LINE__)

#define MX_CUDA_LAUNCHED(d, err, kernel_name)                        \
  do {                                                               \
    int mx_rc_ = MX_CUDA_LAUNCH_RC(d, err, kernel_name);             \
    if (mx_rc_ != MX_OK) return mx_rc_;                              \
  } while (0)

#endif /* MAMBEX_CUDA_RUNTIME_STATE_H */

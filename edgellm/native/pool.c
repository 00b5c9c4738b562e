/* The library's thread pool: see pool.h for why and how. */
#include "pool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#define POOL_PAUSE() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define POOL_PAUSE() __asm__ volatile("yield")
#else
#define POOL_PAUSE() ((void)0)
#endif

#define POOL_MAX_HELPERS 63
#define POOL_SPIN_NS 200000 /* a helper spins this long after its last job before it sleeps */

/* A job's items are split into one contiguous range per thread. A thread runs its own range
 * from the front and, when that is empty, takes items from the back of the others' ranges. So
 * each thread streams through adjacent tiles of a weight (what the prefetchers and the kernel's
 * prefetch-ahead expect; interleaved claims had two threads fetching each other's next tile), each
 * claim touches the claimer's own cache line, and a helper that has not started by the end
 * finds its range taken by the others.
 *
 * A range is one word, (generation, first, end): a claim is a compare-and-swap on it, and the
 * generation (the job's, 24 bits) makes a claim of a late thread that still holds a word of an
 * older job fail. Items per job are at most 2^20 (a 40k-row LM head is 1.3k tiles). */
#define POOL_ITEM_BITS 20
#define POOL_ITEM_MASK ((1ull << POOL_ITEM_BITS) - 1)
#define POOL_GEN_MASK ((1ull << (64 - 2 * POOL_ITEM_BITS)) - 1)

typedef struct {
    _Alignas(64) _Atomic uint64_t span; /* (generation << 40) | (first << 20) | end */
} pool_range;

typedef struct {
    pool_fn fn;
    void *ctx;
    int64_t num_threads; /* ranges (the caller's and num_threads - 1 helpers') */
} pool_job;

static struct {
    pthread_mutex_t busy; /* held by the thread running a job */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    pthread_once_t once;
    int num_started;
    _Atomic uint64_t generation; /* the current job's; a new value publishes a job */
    _Atomic int64_t num_done; /* items of the current job finished by helpers */
    _Atomic int num_sleeping;
    pool_job jobs[2]; /* generation g's job is jobs[g & 1]: a late helper reading g-1 reads a finished job */
    pool_range ranges[POOL_MAX_HELPERS + 1];
} pool = {.busy = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER,
          .once = PTHREAD_ONCE_INIT};

static int64_t pool_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline uint64_t span_of(uint64_t generation, uint64_t first, uint64_t end) {
    return ((generation & POOL_GEN_MASK) << (2 * POOL_ITEM_BITS)) | (first << POOL_ITEM_BITS) | end;
}

/* Claim one item of range r for generation g: its first (from_front) or its last. -1: none left. */
static int64_t pool_claim(int64_t r, uint64_t generation, int from_front) {
    _Atomic uint64_t *span = &pool.ranges[r].span;
    uint64_t word = atomic_load(span);
    for (;;) {
        const uint64_t first = (word >> POOL_ITEM_BITS) & POOL_ITEM_MASK, end = word & POOL_ITEM_MASK;
        if ((word >> (2 * POOL_ITEM_BITS)) != (generation & POOL_GEN_MASK) || first >= end) return -1;
        const uint64_t next = from_front ? span_of(generation, first + 1, end) : span_of(generation, first, end - 1);
        if (atomic_compare_exchange_weak(span, &word, next)) return (int64_t)(from_front ? first : end - 1);
    }
}

/* Run items of job `generation` as thread `self` (0: the caller): its own range, then the
 * others' from the back. Returns how many items this thread ran. */
static int64_t pool_work(uint64_t generation, int64_t self) {
    const pool_job *job = &pool.jobs[generation & 1];
    int64_t ran = 0, item;
    while ((item = pool_claim(self, generation, 1)) >= 0) {
        job->fn(job->ctx, item);
        ran++;
    }
    for (int64_t k = 1; k < job->num_threads; k++) {
        const int64_t other = (self + k) % job->num_threads;
        while ((item = pool_claim(other, generation, 0)) >= 0) {
            job->fn(job->ctx, item);
            ran++;
        }
    }
    return ran;
}

static void *pool_helper(void *arg) {
    const int64_t id = (int64_t)(intptr_t)arg; /* owns range id + 1 */
    uint64_t seen = atomic_load(&pool.generation);
    for (;;) {
        const int64_t spin_until = pool_now_ns() + POOL_SPIN_NS;
        uint64_t generation = atomic_load(&pool.generation);
        for (int i = 0; generation == seen; i++) {
            POOL_PAUSE();
            if ((i & 255) == 255 && pool_now_ns() > spin_until) {
                pthread_mutex_lock(&pool.lock);
                atomic_fetch_add(&pool.num_sleeping, 1);
                while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
                atomic_fetch_sub(&pool.num_sleeping, 1);
                pthread_mutex_unlock(&pool.lock);
            }
            generation = atomic_load(&pool.generation);
        }
        seen = generation;
        if (id + 1 < pool.jobs[generation & 1].num_threads) {
            const int64_t ran = pool_work(generation, id + 1);
            if (ran) atomic_fetch_add(&pool.num_done, ran);
        }
    }
    return NULL;
}

static void pool_after_fork(void) { /* the child has none of the parent's helpers */
    pthread_mutex_init(&pool.busy, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.num_started = 0;
    atomic_store(&pool.num_sleeping, 0);
}

static void pool_init(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

void pool_run(pool_fn fn, void *ctx, int64_t n, int64_t num_threads) {
    int64_t num_helpers = num_threads - 1 < n - 1 ? num_threads - 1 : n - 1;
    if (num_helpers > POOL_MAX_HELPERS) num_helpers = POOL_MAX_HELPERS;
    if (num_helpers > 0) pthread_once(&pool.once, pool_init);
    if (num_helpers <= 0 || n > (int64_t)POOL_ITEM_MASK || pthread_mutex_trylock(&pool.busy) != 0) {
        for (int64_t i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    while (pool.num_started < num_helpers) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, pool_helper, (void *)(intptr_t)pool.num_started) != 0) break;
        pthread_detach(thread);
        pool.num_started++;
    }
    const int64_t parts = num_helpers + 1;
    const uint64_t generation = atomic_load(&pool.generation) + 1;
    pool.jobs[generation & 1] = (pool_job){fn, ctx, parts};
    for (int64_t r = 0; r < parts; r++)
        atomic_store(&pool.ranges[r].span, span_of(generation, (uint64_t)(r * n / parts), (uint64_t)((r + 1) * n / parts)));
    atomic_store(&pool.num_done, 0);
    atomic_store(&pool.generation, generation); /* publishes the job */
    if (atomic_load(&pool.num_sleeping)) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    const int64_t ran = pool_work(generation, 0);
    while (atomic_load(&pool.num_done) < n - ran) POOL_PAUSE(); /* only items a helper claimed */
    pthread_mutex_unlock(&pool.busy);
}

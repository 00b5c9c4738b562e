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

typedef struct {
    pool_fn fn;
    void *ctx;
    int64_t n;
    int64_t num_helpers; /* helpers that may join this job (num_threads - 1) */
} pool_job;

static struct {
    pthread_mutex_t busy; /* held by the thread running a job */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    pthread_once_t once;
    int num_started;
    /* (job generation << 32) | next item: one word, so a claim (compare-and-swap) can only take an
     * item of the job its claimer read */
    _Atomic uint64_t ticket;
    _Atomic int64_t num_done; /* items of the current job finished by helpers */
    _Atomic int num_sleeping;
    pool_job jobs[2]; /* generation g's job is jobs[g & 1]: a late helper reading g-1 reads a finished job */
} pool = {.busy = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER,
          .once = PTHREAD_ONCE_INIT};

static int64_t pool_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Claim and run items of the job whose ticket this is, until none are left or a newer job
 * starts. Returns how many items this thread ran. */
static int64_t pool_work(uint64_t ticket) {
    const uint64_t generation = ticket >> 32;
    const pool_job *job = &pool.jobs[generation & 1];
    int64_t ran = 0;
    while ((ticket >> 32) == generation && (int64_t)(ticket & 0xffffffffu) < job->n) {
        if (atomic_compare_exchange_weak(&pool.ticket, &ticket, ticket + 1)) { /* claimed item (ticket & mask) */
            job->fn(job->ctx, (int64_t)(ticket & 0xffffffffu));
            ran++;
            ticket = atomic_load(&pool.ticket);
        } /* else ticket now holds the current value: the loop checks it again */
    }
    return ran;
}

static void *pool_helper(void *arg) {
    const int64_t id = (int64_t)(intptr_t)arg;
    uint64_t seen = atomic_load(&pool.ticket) >> 32;
    for (;;) {
        const int64_t spin_until = pool_now_ns() + POOL_SPIN_NS;
        uint64_t ticket = atomic_load(&pool.ticket);
        for (int i = 0; (ticket >> 32) == seen; i++) {
            POOL_PAUSE();
            if ((i & 255) == 255 && pool_now_ns() > spin_until) {
                pthread_mutex_lock(&pool.lock);
                atomic_fetch_add(&pool.num_sleeping, 1);
                while ((atomic_load(&pool.ticket) >> 32) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
                atomic_fetch_sub(&pool.num_sleeping, 1);
                pthread_mutex_unlock(&pool.lock);
            }
            ticket = atomic_load(&pool.ticket);
        }
        seen = ticket >> 32;
        if (id < pool.jobs[seen & 1].num_helpers) {
            const int64_t ran = pool_work(ticket);
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
    if (num_helpers <= 0 || pthread_mutex_trylock(&pool.busy) != 0) {
        for (int64_t i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    while (pool.num_started < num_helpers) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, pool_helper, (void *)(intptr_t)pool.num_started) != 0) break;
        pthread_detach(thread);
        pool.num_started++;
    }
    const uint64_t generation = (atomic_load(&pool.ticket) >> 32) + 1;
    pool.jobs[generation & 1] = (pool_job){fn, ctx, n, num_helpers};
    atomic_store(&pool.num_done, 0);
    atomic_store(&pool.ticket, generation << 32); /* publishes the job */
    if (atomic_load(&pool.num_sleeping)) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    const int64_t ran = pool_work(generation << 32);
    while (atomic_load(&pool.num_done) < n - ran) POOL_PAUSE(); /* only items a helper claimed */
    pthread_mutex_unlock(&pool.busy);
}

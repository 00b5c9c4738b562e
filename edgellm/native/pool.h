/* A parallel-for for our C files whose caller never waits for a helper thread that has not
 * started: pool_run(fn, ctx, n, num_threads) runs fn(ctx, i) for i in [0, n).
 *
 * Why not OpenMP: an OpenMP region ends at a barrier that waits for every thread of the team.
 * On this project's machines (2-8 cores, shared with the service's gRPC and asyncio threads,
 * with prefill, with other processes) a helper is often not running when a region starts, and
 * the caller then waits for the scheduler to run it, a timeslice of milliseconds, in each of
 * the ~150 regions of a decode step: two threads were slower than one.
 * Here each thread owns a contiguous range of a job's items and, its own range done, takes items
 * from the back of the others' (pool.c); the caller waits only for items a helper has claimed and
 * is running, so a helper that wakes late finds its range taken. Helpers spin briefly after a job (a decode step's jobs come tens of microseconds apart),
 * then sleep on a condition variable, so an idle engine leaves its cores alone.
 *
 * One pool for every C file of the library (native/__init__.py builds them into one shared
 * object), so the INT4 kernel and the decode ops never have two sets of helpers competing;
 * helpers start on first use and live as long as the process. After fork() the child starts
 * without helpers, and its first multi-threaded call starts new ones.
 */
#ifndef EDGELLM_POOL_H
#define EDGELLM_POOL_H
#include <stdint.h>

typedef void (*pool_fn)(void *ctx, int64_t item);

/* fn(ctx, i) for every i in [0, n), on up to num_threads threads (the caller's included). While
 * another thread's job runs (two engines in one process), the caller runs its items alone. */
void pool_run(pool_fn fn, void *ctx, int64_t n, int64_t num_threads);

#endif

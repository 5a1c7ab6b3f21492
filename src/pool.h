/* pool.h: a few threads that run slow disk work and hand the results back to a libev loop. */
#ifndef RESOURCED_POOL_H
#define RESOURCED_POOL_H

#include <ev.h>
#include <stddef.h>

struct pool_job {
	void (*work)(struct pool_job *job);   /* runs on a pool thread */
	void (*done)(struct pool_job *job);   /* runs on the loop afterwards */
	struct pool_job *next;
};

struct pool;

/* At most half of the threads (at least one) run slow jobs at once. */
struct pool *pool_create(struct ev_loop *loop, int threads);
/* Queues job; it must stay valid until its done callback has run. */
void pool_submit(struct pool *p, struct pool_job *job);
/* The same for work that may block for long (an fsync of a whole file and its directory): such jobs
 * take at most half of the threads, so short jobs never wait behind them all. Slow jobs run in order
 * among themselves; a thread allowed one takes it before short jobs, so they are not starved. */
void pool_submit_slow(struct pool *p, struct pool_job *job);
/* Queues job as if a thread had just run its work (the loop did it, without blocking): its done
 * callback runs from the loop's next iteration, never inside this call. */
void pool_complete(struct pool *p, struct pool_job *job);
size_t pool_queued(struct pool *p);
/* Waits for queued work and stops the threads (done callbacks of unfinished jobs do not run). */
void pool_destroy(struct pool *p);

#endif

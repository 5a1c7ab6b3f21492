/* offthread.c: runs one blocking call on a thread of its own; the loop gets its result, or gives up on it after a timeout without waiting. */
#include "config.h"
#include "offthread.h"

#include <pthread.h>
#include <signal.h>
#include <stdlib.h>

struct offthread {
	struct ev_loop *loop;
	ev_async returned_async;      /* the thread says work returned */
	ev_timer deadline;
	void (*work)(void *arg);
	void (*release)(void *arg);
	void *arg;
	void (*done)(void *ctx, void *arg);
	void *ctx;
	/* Who frees this and arg is decided under lock: the loop once work returned in time, the
	 * thread once the loop gave up on it. */
	pthread_mutex_t lock;
	int returned;
	int abandoned;
	pthread_t tid;
};

/* A thread whose work returned in time is joined, not left to exit on its own: the master forks
 * right after, and a child forked while the thread was still exiting (freeing, under the
 * allocator's locks) inherited those locks held: under AddressSanitizer a new worker hung at its
 * first allocation (test_ops, a reload). One the loop gave up on is detached and not waited for. */
static void offthread_let_go(pthread_t tid, int returned)
{
	if (returned)
		pthread_join(tid, NULL);
	else
		pthread_detach(tid);
}

static void offthread_free(struct offthread *t)
{
	pthread_mutex_destroy(&t->lock);
	free(t);
}

static void *offthread_main(void *p)
{
	struct offthread *t = p;
	t->work(t->arg);
	pthread_mutex_lock(&t->lock);
	int abandoned = t->abandoned;
	if (!abandoned) {
		t->returned = 1;
		ev_async_send(t->loop, &t->returned_async);   /* under lock: the loop frees t only after */
	}
	pthread_mutex_unlock(&t->lock);
	if (abandoned) {
		/* The loop stopped watching and forgot t: nothing else refers to it. */
		t->release(t->arg);
		offthread_free(t);
	}
	return NULL;
}

/* On the loop, lock held: 1 when work has returned (t and arg are the loop's), else gives t to
 * the thread. Either way the loop's watchers stop. */
static int offthread_settle(struct offthread *t)
{
	ev_async_stop(t->loop, &t->returned_async);
	ev_timer_stop(t->loop, &t->deadline);
	if (t->returned)
		return 1;
	t->abandoned = 1;
	return 0;
}

/* Work returned (the async), or the deadline passed: done runs with arg, or NULL. */
static void offthread_finish(struct offthread *t)
{
	void (*done)(void *ctx, void *arg) = t->done;
	void *ctx = t->ctx, *arg = t->arg;
	pthread_mutex_lock(&t->lock);
	int returned = offthread_settle(t);
	pthread_t tid = t->tid;
	pthread_mutex_unlock(&t->lock);   /* from here on, an abandoned t is the thread's */
	offthread_let_go(tid, returned);
	if (returned)
		offthread_free(t);
	done(ctx, returned ? arg : NULL);
}

static void offthread_on_returned(struct ev_loop *loop, ev_async *w, int revents)
{
	(void)loop;
	(void)revents;
	offthread_finish(w->data);
}

static void offthread_on_deadline(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop;
	(void)revents;
	offthread_finish(w->data);   /* work may have returned meanwhile: then it counts as in time */
}

struct offthread *offthread_start(struct ev_loop *loop, double timeout, void (*work)(void *arg),
    void (*release)(void *arg), void *arg, void (*done)(void *ctx, void *arg), void *ctx)
{
	struct offthread *t = calloc(1, sizeof(*t));
	if (t == NULL)
		return NULL;
	t->loop = loop;
	t->work = work;
	t->release = release;
	t->arg = arg;
	t->done = done;
	t->ctx = ctx;
	pthread_mutex_init(&t->lock, NULL);
	ev_async_init(&t->returned_async, offthread_on_returned);
	t->returned_async.data = t;
	ev_async_start(loop, &t->returned_async);
	ev_timer_init(&t->deadline, offthread_on_deadline, timeout, 0.);
	t->deadline.data = t;
	ev_timer_start(loop, &t->deadline);

	/* The thread takes no signals (the loop's thread handles them all). */
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	int err = pthread_create(&t->tid, NULL, offthread_main, t);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (err != 0) {
		ev_async_stop(loop, &t->returned_async);
		ev_timer_stop(loop, &t->deadline);
		offthread_free(t);
		return NULL;
	}
	return t;
}

void offthread_abandon(struct offthread *t)
{
	void (*release)(void *arg) = t->release;
	void *arg = t->arg;
	pthread_mutex_lock(&t->lock);
	int returned = offthread_settle(t);
	pthread_t tid = t->tid;
	pthread_mutex_unlock(&t->lock);
	offthread_let_go(tid, returned);
	if (returned) {
		offthread_free(t);
		release(arg);
	}
}

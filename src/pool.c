/* pool.c: a fixed set of worker threads fed from two queues (short and slow jobs); completions wake the loop via ev_async. */
#include "config.h"
#include "pool.h"
#include "log.h"

#include <pthread.h>
#include <signal.h>
#include <stdlib.h>

/* Jobs in the order they came, linked through their next. */
struct job_fifo {
	struct pool_job *head, *tail;
};

static void fifo_push(struct job_fifo *q, struct pool_job *job)
{
	job->next = NULL;
	if (q->tail)
		q->tail->next = job;
	else
		q->head = job;
	q->tail = job;
}

static struct pool_job *fifo_pop(struct job_fifo *q)
{
	struct pool_job *job = q->head;
	if (job && (q->head = job->next) == NULL)
		q->tail = NULL;
	return job;
}

struct pool {
	struct ev_loop *loop;
	ev_async wakeup;
	pthread_mutex_t lock;
	pthread_cond_t work_ready;
	struct job_fifo todo;                     /* waiting for a thread */
	struct job_fifo slow;                     /* the same, slow jobs (pool_submit_slow) */
	int slow_running;                         /* threads running a slow job */
	int slow_max;                             /* at most this many at once */
	struct job_fifo done;                     /* waiting for the loop */
	size_t queued;                            /* submitted, done callback not yet run */
	int stopping;
	int nthreads;
	pthread_t threads[];
};

/* 1 when a slow job waits and a thread may take it now. Called with the lock held. */
static int slow_allowed(const struct pool *p)
{
	return p->slow.head != NULL && p->slow_running < p->slow_max;
}

static void *pool_thread(void *arg)
{
	struct pool *p = arg;
	pthread_mutex_lock(&p->lock);
	for (;;) {
		while (p->todo.head == NULL && !slow_allowed(p) && !p->stopping)
			pthread_cond_wait(&p->work_ready, &p->lock);
		struct pool_job *job;
		int slow = slow_allowed(p);
		if (slow) {
			job = fifo_pop(&p->slow);
			p->slow_running++;
		} else if (p->todo.head != NULL) {
			job = fifo_pop(&p->todo);
		} else {
			break;   /* stopping: the threads running slow jobs take the rest of them */
		}
		pthread_mutex_unlock(&p->lock);

		job->work(job);

		pthread_mutex_lock(&p->lock);
		if (slow)
			p->slow_running--;   /* this thread looks at the slow queue first when it loops */
		fifo_push(&p->done, job);
		/* Woken outside the lock: the loop takes it at once, and would sleep on it otherwise. */
		pthread_mutex_unlock(&p->lock);
		ev_async_send(p->loop, &p->wakeup);
		pthread_mutex_lock(&p->lock);
	}
	pthread_mutex_unlock(&p->lock);
	return NULL;
}

static void pool_on_wakeup(struct ev_loop *loop, ev_async *w, int revents)
{
	(void)loop;
	(void)revents;
	struct pool *p = w->data;
	pthread_mutex_lock(&p->lock);
	struct pool_job *job = p->done.head;
	p->done = (struct job_fifo){ NULL, NULL };
	pthread_mutex_unlock(&p->lock);
	while (job) {
		struct pool_job *next = job->next;
		p->queued--;
		job->done(job);   /* may free job */
		job = next;
	}
}

struct pool *pool_create(struct ev_loop *loop, int threads)
{
	struct pool *p = calloc(1, sizeof(*p) + (size_t)threads * sizeof(pthread_t));
	if (p == NULL)
		return NULL;
	p->loop = loop;
	p->slow_max = threads / 2 > 0 ? threads / 2 : 1;
	pthread_mutex_init(&p->lock, NULL);
	pthread_cond_init(&p->work_ready, NULL);
	ev_async_init(&p->wakeup, pool_on_wakeup);
	p->wakeup.data = p;
	ev_async_start(loop, &p->wakeup);

	/* Threads take no signals: the loop thread handles them all. */
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	for (int i = 0; i < threads; i++) {
		if (pthread_create(&p->threads[i], NULL, pool_thread, p) != 0) {
			log_warnx("pthread_create() failed for disk thread %d", i);
			break;
		}
		p->nthreads++;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (p->nthreads == 0) {
		ev_async_stop(loop, &p->wakeup);
		free(p);
		return NULL;
	}
	return p;
}

void pool_submit(struct pool *p, struct pool_job *job)
{
	p->queued++;
	pthread_mutex_lock(&p->lock);
	fifo_push(&p->todo, job);
	pthread_mutex_unlock(&p->lock);
	/* Signalled after unlocking: the woken thread does not sleep again on the lock we held. */
	pthread_cond_signal(&p->work_ready);
}

void pool_submit_slow(struct pool *p, struct pool_job *job)
{
	p->queued++;
	pthread_mutex_lock(&p->lock);
	fifo_push(&p->slow, job);
	int wake = p->slow_running < p->slow_max;
	pthread_mutex_unlock(&p->lock);
	if (wake)
		pthread_cond_signal(&p->work_ready);
}

void pool_complete(struct pool *p, struct pool_job *job)
{
	p->queued++;
	pthread_mutex_lock(&p->lock);
	fifo_push(&p->done, job);
	pthread_mutex_unlock(&p->lock);
	ev_async_send(p->loop, &p->wakeup);
}

size_t pool_queued(struct pool *p)
{
	return p->queued;
}

void pool_destroy(struct pool *p)
{
	if (p == NULL)
		return;
	pthread_mutex_lock(&p->lock);
	p->stopping = 1;
	pthread_cond_broadcast(&p->work_ready);
	pthread_mutex_unlock(&p->lock);
	for (int i = 0; i < p->nthreads; i++)
		pthread_join(p->threads[i], NULL);
	ev_async_stop(p->loop, &p->wakeup);
	pthread_mutex_destroy(&p->lock);
	pthread_cond_destroy(&p->work_ready);
	free(p);
}

/* test_pool.c: unit tests of the disk pool (pool.c): short jobs still run while slow jobs hold threads. */
#include "config.h"
#include "unit.h"

#include <ev.h>
#include <pthread.h>
#include <time.h>

#include "pool.h"

#define WAIT_SECONDS 30   /* generous: the machine may be loaded; nothing here waits that long when it works */

/* A gate the slow jobs wait at, and what the jobs saw, shared with the pool's threads. */
struct gate {
	pthread_mutex_t lock;
	pthread_cond_t changed;
	int open;
	int slow_started;
	int slow_order[16];   /* which slow job started n-th */
	int short_ran;
};

struct test_job {
	struct pool_job job;
	struct gate *g;
	int index;
	int done;             /* set by the done callback, on the loop */
};

static struct gate gate;

static void gate_init(struct gate *g)
{
	memset(g, 0, sizeof(*g));
	pthread_mutex_init(&g->lock, NULL);
	pthread_cond_init(&g->changed, NULL);
}

static void gate_open(struct gate *g)
{
	pthread_mutex_lock(&g->lock);
	g->open = 1;
	pthread_cond_broadcast(&g->changed);
	pthread_mutex_unlock(&g->lock);
}

/* A slow job: counts itself started, then blocks until the gate opens (an fsync that takes long). */
static void slow_work(struct pool_job *job)
{
	struct test_job *t = (struct test_job *)job;
	struct gate *g = t->g;
	pthread_mutex_lock(&g->lock);
	if (g->slow_started < 16)
		g->slow_order[g->slow_started] = t->index;
	g->slow_started++;
	pthread_cond_broadcast(&g->changed);
	while (!g->open)
		pthread_cond_wait(&g->changed, &g->lock);
	pthread_mutex_unlock(&g->lock);
}

static void short_work(struct pool_job *job)
{
	struct test_job *t = (struct test_job *)job;
	pthread_mutex_lock(&t->g->lock);
	t->g->short_ran++;
	pthread_mutex_unlock(&t->g->lock);
}

static void job_done(struct pool_job *job)
{
	((struct test_job *)job)->done = 1;
}

/* Waits on the pool's threads until at least n slow jobs started; returns how many did. */
static int wait_slow_started(struct gate *g, int n)
{
	struct timespec until;
	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_sec += WAIT_SECONDS;
	pthread_mutex_lock(&g->lock);
	while (g->slow_started < n && pthread_cond_timedwait(&g->changed, &g->lock, &until) == 0)
		;
	int started = g->slow_started;
	pthread_mutex_unlock(&g->lock);
	return started;
}

static void on_deadline(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)t;
	(void)revents;
	ev_break(loop, EVBREAK_ALL);
}

/* Runs the loop (done callbacks) until every job of jobs[0..n) is done, or the deadline. */
static int run_until_done(struct ev_loop *loop, struct test_job *jobs, int n)
{
	ev_timer deadline;
	ev_timer_init(&deadline, on_deadline, WAIT_SECONDS, 0.);
	ev_timer_start(loop, &deadline);
	for (;;) {
		int all = 1;
		for (int i = 0; i < n; i++)
			all &= jobs[i].done;
		if (all || !ev_is_active(&deadline))
			break;
		ev_run(loop, EVRUN_ONCE);
	}
	ev_timer_stop(loop, &deadline);
	int done = 0;
	for (int i = 0; i < n; i++)
		done += jobs[i].done;
	return done;
}

START_TEST(test_short_job_runs_while_slow_jobs_wait)
{
	gate_init(&gate);
	struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
	struct pool *p = pool_create(loop, 4);
	ck_assert_ptr_nonnull(p);
	struct test_job slow[4], fast[3];
	for (int i = 0; i < 4; i++) {
		slow[i] = (struct test_job){ .job = { .work = slow_work, .done = job_done }, .g = &gate, .index = i };
		pool_submit_slow(p, &slow[i].job);
	}
	/* Half of the 4 threads take slow jobs, in order; the other two stay free. */
	ck_assert_int_eq(wait_slow_started(&gate, 2), 2);
	for (int i = 0; i < 3; i++) {
		fast[i] = (struct test_job){ .job = { .work = short_work, .done = job_done }, .g = &gate, .index = i };
		pool_submit(p, &fast[i].job);
	}
	/* Every short job is done while the first two slow jobs still block their threads. */
	ck_assert_int_eq(run_until_done(loop, fast, 3), 3);
	pthread_mutex_lock(&gate.lock);
	ck_assert_int_eq(gate.slow_started, 2);
	ck_assert_int_eq(gate.short_ran, 3);
	ck_assert_int_eq(gate.slow_order[0], 0);
	ck_assert_int_eq(gate.slow_order[1], 1);
	pthread_mutex_unlock(&gate.lock);
	for (int i = 0; i < 4; i++)
		ck_assert_int_eq(slow[i].done, 0);
	/* Released, the rest of the slow jobs run too, still in order. */
	gate_open(&gate);
	ck_assert_int_eq(run_until_done(loop, slow, 4), 4);
	ck_assert_int_eq(gate.slow_order[2], 2);
	ck_assert_int_eq(gate.slow_order[3], 3);
	ck_assert_uint_eq(pool_queued(p), 0);
	pool_destroy(p);
	ev_loop_destroy(loop);
}
END_TEST

START_TEST(test_one_thread_runs_both_kinds)
{
	gate_init(&gate);
	gate_open(&gate);
	struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
	struct pool *p = pool_create(loop, 1);
	ck_assert_ptr_nonnull(p);
	struct test_job jobs[6];
	for (int i = 0; i < 6; i++) {
		jobs[i] = (struct test_job){ .job = { .work = i % 2 ? slow_work : short_work, .done = job_done },
			.g = &gate, .index = i };
		if (i % 2)
			pool_submit_slow(p, &jobs[i].job);
		else
			pool_submit(p, &jobs[i].job);
	}
	ck_assert_int_eq(run_until_done(loop, jobs, 6), 6);
	ck_assert_int_eq(gate.slow_started, 3);
	ck_assert_int_eq(gate.short_ran, 3);
	pool_destroy(p);
	ev_loop_destroy(loop);
}
END_TEST

START_TEST(test_destroy_runs_queued_slow_jobs)
{
	gate_init(&gate);
	struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
	struct pool *p = pool_create(loop, 2);
	ck_assert_ptr_nonnull(p);
	struct test_job slow[3];
	for (int i = 0; i < 3; i++) {
		slow[i] = (struct test_job){ .job = { .work = slow_work, .done = job_done }, .g = &gate, .index = i };
		pool_submit_slow(p, &slow[i].job);
	}
	/* One of the two threads may run a slow job; the other must not take a second one. */
	ck_assert_int_eq(wait_slow_started(&gate, 1), 1);
	gate_open(&gate);
	pool_destroy(p);   /* waits for queued work: the thread running slow jobs takes the rest */
	ck_assert_int_eq(gate.slow_started, 3);
	ck_assert_int_eq(gate.slow_order[2], 2);
	ev_loop_destroy(loop);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("pool");
	TCase *tc = tcase_create("lanes");
	tcase_add_test(tc, test_short_job_runs_while_slow_jobs_wait);
	tcase_add_test(tc, test_one_thread_runs_both_kinds);
	tcase_add_test(tc, test_destroy_runs_queued_slow_jobs);
	suite_add_tcase(s, tc);
	return unit_run(s);
}

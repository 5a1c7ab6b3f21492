/* test_offthread.c: unit tests of offthread.c: a call that hangs is given up after its timeout, and its thread is never waited for. */
#include "config.h"
#include "unit.h"

#include <ev.h>
#include <pthread.h>
#include <time.h>

#include "offthread.h"

#define WAIT_SECONDS 30   /* generous: the machine may be loaded; nothing here waits that long when it works */

/* The call's state, shared with its thread: a gate it waits at (a storage root that hangs until
 * the gate opens), whether it returned, whether it was released, and what done was given. */
struct call {
	pthread_mutex_t lock;
	pthread_cond_t changed;
	int gated;                   /* work waits for open */
	int open;
	int returned;
	int released;
	int done_calls;              /* on the loop */
	void *done_arg;
};

static void call_init(struct call *c, int gated)
{
	memset(c, 0, sizeof(*c));
	pthread_mutex_init(&c->lock, NULL);
	pthread_cond_init(&c->changed, NULL);
	c->gated = gated;
}

static void work(void *arg)
{
	struct call *c = arg;
	pthread_mutex_lock(&c->lock);
	while (c->gated && !c->open)
		pthread_cond_wait(&c->changed, &c->lock);
	c->returned = 1;
	pthread_cond_broadcast(&c->changed);
	pthread_mutex_unlock(&c->lock);
}

static void release(void *arg)
{
	struct call *c = arg;
	pthread_mutex_lock(&c->lock);
	c->released++;
	pthread_cond_broadcast(&c->changed);
	pthread_mutex_unlock(&c->lock);
}

static void done(void *ctx, void *arg)
{
	struct call *c = ctx;
	c->done_calls++;
	c->done_arg = arg;
}

static void gate_open(struct call *c)
{
	pthread_mutex_lock(&c->lock);
	c->open = 1;
	pthread_cond_broadcast(&c->changed);
	pthread_mutex_unlock(&c->lock);
}

/* Waits until *field (under c->lock) is non-zero; returns it. */
static int wait_set(struct call *c, const int *field)
{
	struct timespec until;
	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_sec += WAIT_SECONDS;
	pthread_mutex_lock(&c->lock);
	while (*field == 0 && pthread_cond_timedwait(&c->changed, &c->lock, &until) == 0)
		;
	int v = *field;
	pthread_mutex_unlock(&c->lock);
	return v;
}

static int locked_get(struct call *c, const int *field)
{
	pthread_mutex_lock(&c->lock);
	int v = *field;
	pthread_mutex_unlock(&c->lock);
	return v;
}

START_TEST(test_answer_in_time)
{
	struct call c;
	call_init(&c, 0);
	struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
	ck_assert_ptr_nonnull(offthread_start(loop, WAIT_SECONDS, work, release, &c, done, &c));
	ev_run(loop, 0);   /* returns once done ran: no watcher is left */
	ck_assert_int_eq(c.done_calls, 1);
	ck_assert_ptr_eq(c.done_arg, &c);
	ck_assert_int_eq(c.returned, 1);
	ck_assert_int_eq(c.released, 0);   /* arg is the caller's again */
	ev_loop_destroy(loop);
}
END_TEST

START_TEST(test_hung_call_times_out_and_is_released_later)
{
	struct call c;
	call_init(&c, 1);
	struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
	ck_assert_ptr_nonnull(offthread_start(loop, 0.05, work, release, &c, done, &c));
	ev_run(loop, 0);   /* returns after the timeout although work still hangs */
	ck_assert_int_eq(c.done_calls, 1);
	ck_assert_ptr_null(c.done_arg);
	ck_assert_int_eq(locked_get(&c, &c.returned), 0);
	/* The loop is gone before the call returns: the thread must not need it. */
	ev_loop_destroy(loop);
	gate_open(&c);
	ck_assert_int_eq(wait_set(&c, &c.released), 1);
	ck_assert_int_eq(c.done_calls, 1);
}
END_TEST

START_TEST(test_abandoned_call_never_answers)
{
	struct call c;
	call_init(&c, 1);
	struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
	struct offthread *t = offthread_start(loop, WAIT_SECONDS, work, release, &c, done, &c);
	ck_assert_ptr_nonnull(t);
	offthread_abandon(t);
	ev_run(loop, 0);   /* nothing left to wait for: returns at once, not after WAIT_SECONDS */
	ev_loop_destroy(loop);
	ck_assert_int_eq(locked_get(&c, &c.released), 0);
	gate_open(&c);
	ck_assert_int_eq(wait_set(&c, &c.released), 1);
	ck_assert_int_eq(c.done_calls, 0);
}
END_TEST

START_TEST(test_abandoned_after_return_is_released_once)
{
	struct call c;
	call_init(&c, 0);
	struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
	struct offthread *t = offthread_start(loop, WAIT_SECONDS, work, release, &c, done, &c);
	ck_assert_ptr_nonnull(t);
	/* work returned; the thread may or may not have told the loop yet: released once either way
	 * (by abandon, or by the thread), and no answer. */
	ck_assert_int_eq(wait_set(&c, &c.returned), 1);
	offthread_abandon(t);
	ck_assert_int_eq(wait_set(&c, &c.released), 1);
	ev_run(loop, EVRUN_NOWAIT);
	ck_assert_int_eq(c.done_calls, 0);
	ev_loop_destroy(loop);
	ck_assert_int_eq(locked_get(&c, &c.released), 1);
}
END_TEST

START_TEST(test_deadline_racing_the_return_settles_once)
{
	struct call c;
	call_init(&c, 0);
	struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
	ck_assert_ptr_nonnull(offthread_start(loop, 0., work, release, &c, done, &c));
	ck_assert_int_eq(wait_set(&c, &c.returned), 1);
	/* The deadline is due at once and work has returned: the thread's word may or may not be in.
	 * Exactly one of two things happens: done gets arg back, or done gets NULL and the thread
	 * releases arg. */
	ev_run(loop, 0);
	ck_assert_int_eq(c.done_calls, 1);
	if (c.done_arg == NULL)
		ck_assert_int_eq(wait_set(&c, &c.released), 1);
	else
		ck_assert_ptr_eq(c.done_arg, &c);
	ev_loop_destroy(loop);
	ck_assert_int_eq(locked_get(&c, &c.released), c.done_arg == NULL);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("offthread");
	TCase *tc = tcase_create("timeout");
	tcase_add_test(tc, test_answer_in_time);
	tcase_add_test(tc, test_hung_call_times_out_and_is_released_later);
	tcase_add_test(tc, test_abandoned_call_never_answers);
	tcase_add_test(tc, test_abandoned_after_return_is_released_once);
	tcase_add_test(tc, test_deadline_racing_the_return_settles_once);
	suite_add_tcase(s, tc);
	return unit_run(s);
}

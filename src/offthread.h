/* offthread.h: one blocking call (a stat of a root that may hang) on a thread of its own, answered on a libev loop or given up after a timeout. */
#ifndef RESOURCED_OFFTHREAD_H
#define RESOURCED_OFFTHREAD_H

#include <ev.h>

struct offthread;

/*
 * Runs work(arg) on a new thread. Exactly once, on loop, done(ctx, arg) follows: arg when work
 * returned within timeout seconds (it is the caller's again, and the thread has ended), NULL when it
 * did not. Then the thread is not waited for: it keeps arg and calls release(arg) when work returns,
 * if it ever does.
 * So work, release and arg must not need the loop or anything the caller frees. Returns NULL, and
 * runs nothing, when no thread can be started.
 */
struct offthread *offthread_start(struct ev_loop *loop, double timeout, void (*work)(void *arg),
    void (*release)(void *arg), void *arg, void (*done)(void *ctx, void *arg), void *ctx);

/* Gives up before done has run (the loop is going away): done never runs, and arg is released
 * (now, or by the thread when work returns). */
void offthread_abandon(struct offthread *t);

#endif

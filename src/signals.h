/* signals.h: each process role lists the signals it handles in one table, started and stopped here. */
#ifndef RESOURCED_SIGNALS_H
#define RESOURCED_SIGNALS_H

#include <ev.h>
#include <stddef.h>

/* One signal of a role: watched on the loop with cb, or ignored when cb is NULL. */
struct signal_action {
	int signum;
	void (*cb)(struct ev_loop *loop, ev_signal *w, int revents);
};

#define SIGNALS_COUNT(table) (sizeof(table) / sizeof((table)[0]))

/* Starts a watcher in watchers[i] (its data set to owner) for each entry with a callback and
 * ignores the signals of the others. watchers has one slot per entry. */
void signals_watch(struct ev_loop *loop, const struct signal_action *table, size_t n, ev_signal *watchers,
    void *owner);
/* The SIGUSR1 callback of the worker and storage processes: reopens the log files (the master
 * reopens its own, then sends SIGUSR1 to every child). */
void signals_reopen_logs(struct ev_loop *loop, ev_signal *w, int revents);

/* Stops the watchers signals_watch started. */
void signals_unwatch(struct ev_loop *loop, const struct signal_action *table, size_t n, ev_signal *watchers);

#endif

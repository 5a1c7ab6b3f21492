/* signals.c: starts and stops the signal watchers of a role's table. */
#include "config.h"
#include "signals.h"
#include "log.h"

#include <signal.h>

void signals_watch(struct ev_loop *loop, const struct signal_action *table, size_t n, ev_signal *watchers,
    void *owner)
{
	for (size_t i = 0; i < n; i++) {
		if (table[i].cb == NULL) {
			signal(table[i].signum, SIG_IGN);
			continue;
		}
		ev_signal_init(&watchers[i], table[i].cb, table[i].signum);
		watchers[i].data = owner;
		ev_signal_start(loop, &watchers[i]);
	}
}

void signals_unwatch(struct ev_loop *loop, const struct signal_action *table, size_t n, ev_signal *watchers)
{
	for (size_t i = 0; i < n; i++)
		if (table[i].cb != NULL)
			ev_signal_stop(loop, &watchers[i]);
}

void signals_reopen_logs(struct ev_loop *loop, ev_signal *w, int revents)
{
	(void)loop;
	(void)w;
	(void)revents;
	if (log_reopen() < 0)
		log_warn("cannot reopen the log files");
}

/* backend_probe.h: pings a storage backend on a pool thread and says whether it answers, for the agent-check. */
#ifndef RESOURCED_BACKEND_PROBE_H
#define RESOURCED_BACKEND_PROBE_H

#include <ev.h>

#include "backend.h"
#include "pool.h"

/*
 * The storage process pings its backend, and each worker pings its own backend client (downloads
 * go through it); the agent-check answers down while any of them does not answer (control.c). A
 * ping runs on the owner's pool, behind its other disk work, so a pool stuck on the backend shows.
 */
struct backend_probe {
	struct pool_job job;          /* first: the pool hands this back */
	struct backend *backend;
	struct pool *pool;
	struct ev_loop *loop;
	double timeout;               /* a ping running longer counts as unreachable */
	const char *who;              /* NULL for the storage process, "this worker" in a worker's log lines */
	int busy, err;
	int unreachable;              /* as last published to the stats slot */
	ev_tstamp started, last;
};

void backend_probe_init(struct backend_probe *p, struct ev_loop *loop, struct pool *pool, struct backend *backend,
    double timeout, const char *who);
/* Called about once a second: starts a ping every BACKEND_PROBE_INTERVAL seconds and counts one
 * still running after the timeout as unreachable. Does nothing for a backend without a ping. */
void backend_probe_tick(struct backend_probe *p);

#endif

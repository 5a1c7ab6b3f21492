/* backend_probe.c: pings a storage backend on a pool thread and publishes whether it answers in the stats slot. */
#include "backend_probe.h"

#include <stdatomic.h>
#include <string.h>

#include "log.h"
#include "stats.h"

#define BACKEND_PROBE_INTERVAL 2.0   /* seconds between pings */

void backend_probe_init(struct backend_probe *p, struct ev_loop *loop, struct pool *pool, struct backend *backend,
    double timeout, const char *who)
{
	memset(p, 0, sizeof(*p));
	p->loop = loop;
	p->pool = pool;
	p->backend = backend;
	p->timeout = timeout;
	p->who = who;
}

static void probe_publish(struct backend_probe *p, int unreachable, const char *why)
{
	if (unreachable == p->unreachable)
		return;
	p->unreachable = unreachable;
	if (stats_self)
		atomic_store(&stats_self->backend_unreachable, (uint32_t)unreachable);
	const char *name = p->backend->ops->name;
	if (unreachable)
		log_warnx("storage backend %s unreachable%s%s (%s): the agent-check answers down", name,
		    p->who ? " from " : "", p->who ? p->who : "", why);
	else
		log_info("storage backend %s answers %s%sagain", name, p->who ? p->who : "", p->who ? " " : "");
}

static void probe_work(struct pool_job *job)
{
	struct backend_probe *p = (struct backend_probe *)job;
	p->err = p->backend->ops->ping(p->backend);
}

static void probe_done(struct pool_job *job)
{
	struct backend_probe *p = (struct backend_probe *)job;
	p->busy = 0;
	p->last = ev_now(p->loop);
	probe_publish(p, p->err != 0, strerror(p->err));
}

void backend_probe_tick(struct backend_probe *p)
{
	if (p->backend->ops->ping == NULL)
		return;   /* reachable whenever the process runs */
	ev_tstamp now = ev_now(p->loop);
	if (p->busy) {
		if (now - p->started > p->timeout)
			probe_publish(p, 1, "no answer within storage_timeout");
		return;
	}
	if (now - p->last < BACKEND_PROBE_INTERVAL)
		return;
	p->busy = 1;
	p->started = now;
	p->job.work = probe_work;
	p->job.done = probe_done;
	pool_submit(p->pool, &p->job);
}

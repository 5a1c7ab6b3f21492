/* rds.h: one async hiredis connection on a libev loop that logs in, selects its db, drops a server that stops answering and reconnects (to the master Sentinel names, when configured). */
#ifndef RESOURCED_RDS_H
#define RESOURCED_RDS_H

#include <ev.h>
#include <hiredis/async.h>

struct conf;
struct sentinel;

struct rds {
	struct ev_loop *loop;
	const struct conf *conf;
	redisAsyncContext *ctx;
	int ready;                  /* takes commands: connected (with sentinels: ROLE said master) */
	int closing;                /* rds_close() in progress: no reconnect */
	ev_timer retry;             /* reconnect back-off */
	double retry_delay;
	void (*on_ready)(struct rds *r);   /* after every (re)connect; may be NULL */
	void (*on_away)(struct rds *r);    /* an attempt failed or the connection was lost; set after rds_init */
	void *data;
	unsigned long errors;       /* failed connects and lost connections */
	struct sentinel *sentinel;  /* [redis] sentinels set: the master is asked for, not configured */
	char master_host[256];      /* with sentinels: the address being used */
	int master_port;
	unsigned long not_master;   /* servers ROLE refused since the last ready connection */
	/* [redis] timeout: a server that accepts connections but answers nothing (stopped, hung,
	 * behind a dead link) is dropped like a lost connection, so requests fail instead of waiting. */
	ev_timer watch;
	unsigned long generation;   /* of ctx: replies of an older connection are not counted */
	unsigned long sent, answered;   /* commands sent on ctx, and replies (or failures) back */
	ev_tstamp connect_started;  /* when ctx was created */
	ev_tstamp last_progress;    /* the last reply, or the send that made one wait when none did */
	unsigned long dropped;      /* connections dropped by the watch since the last ready one */
};

void rds_init(struct rds *r, struct ev_loop *loop, const struct conf *conf,
    void (*on_ready)(struct rds *r), void *data);
/* Sends a command; -1 (and no callback) when Redis is not connected. */
int rds_command(struct rds *r, redisCallbackFn *cb, void *privdata, const char *fmt, ...);
int rds_command_argv(struct rds *r, redisCallbackFn *cb, void *privdata, int argc,
    const char **argv, const size_t *argvlen);
/* 1 while no connection is made or being made: the last attempt failed, the next waits its back-off. */
int rds_away(const struct rds *r);
void rds_close(struct rds *r);

#endif

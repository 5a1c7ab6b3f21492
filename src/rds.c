/* rds.c: keeps an async Redis connection up: connect (to the master Sentinel names, when configured), AUTH, SELECT, and reconnect with back-off. */
#include "config.h"
#include "rds.h"
#include "conf.h"
#include "log.h"
#include "sentinel.h"
#include "stats.h"

#include <hiredis/adapters/libev.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RDS_RETRY_MIN 0.1
#define RDS_RETRY_MAX 2.0

static void rds_connect(struct rds *r);
static void rds_on_role(redisAsyncContext *c, void *reply, void *privdata);

static void rds_schedule_retry(struct rds *r)
{
	ev_timer_stop(r->loop, &r->retry);
	ev_timer_set(&r->retry, r->retry_delay, 0.);
	ev_timer_start(r->loop, &r->retry);
	r->retry_delay = r->retry_delay * 2 > RDS_RETRY_MAX ? RDS_RETRY_MAX : r->retry_delay * 2;
}

static void rds_on_retry(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop;
	(void)revents;
	rds_connect(w->data);
}

static void rds_on_setup_reply(redisAsyncContext *c, void *reply, void *privdata)
{
	(void)c;
	(void)privdata;
	redisReply *rep = reply;
	if (rep && rep->type == REDIS_REPLY_ERROR)
		log_warnx("redis: AUTH/SELECT failed: %s", rep->str);
}

static void rds_set_ready(struct rds *r)
{
	r->ready = 1;
	STAT_SET(redis_up, 1);
	r->retry_delay = RDS_RETRY_MIN;
	r->not_master = 0;
	if (r->sentinel)
		log_info("redis: connected to the master %s:%d", r->master_host, r->master_port);
	else
		log_info("redis: connected");
	if (r->on_ready)
		r->on_ready(r);
}

static void rds_on_role(redisAsyncContext *c, void *reply, void *privdata)
{
	struct rds *r = privdata;
	redisReply *rep = reply;
	if (rep == NULL || r->ctx != c || r->closing)
		return;   /* the connection is gone: its disconnect callback retries */
	if (rep->type == REDIS_REPLY_ARRAY && rep->elements >= 1 && rep->element[0]->type == REDIS_REPLY_STRING &&
	    strcmp(rep->element[0]->str, "master") == 0) {
		rds_set_ready(r);
		return;
	}
	STAT_INC(redis_errors);
	r->errors++;
	if (r->not_master++ % 50 == 0)
		log_warnx("redis: %s:%d is not a master (%s): asking the sentinels again", r->master_host, r->master_port,
		    rep->type == REDIS_REPLY_ARRAY && rep->elements >= 1 && rep->element[0]->type == REDIS_REPLY_STRING
		    ? rep->element[0]->str : rep->type == REDIS_REPLY_ERROR ? rep->str : "no ROLE answer");
	redisAsyncDisconnect(c);
}

static void rds_on_connect(const redisAsyncContext *c, int status)
{
	struct rds *r = c->data;
	if (status != REDIS_OK) {
		STAT_INC(redis_errors);
		if (r->errors++ % 50 == 0)
			log_warnx("redis: cannot connect: %s", c->errstr);
		r->ctx = NULL;   /* hiredis frees the context */
		rds_schedule_retry(r);
		return;
	}
	const struct conf *conf = r->conf;
	/* Pipelined ahead of every other command, so they run logged in and in the right db. */
	if (conf->redis_password[0])
		redisAsyncCommand(r->ctx, rds_on_setup_reply, NULL, "AUTH %s", conf->redis_password);
	if (conf->redis_db)
		redisAsyncCommand(r->ctx, rds_on_setup_reply, NULL, "SELECT %d", conf->redis_db);
	if (r->sentinel) {
		/* A sentinel's answer may be stale (a failover under way): only a master will do. */
		redisAsyncCommand(r->ctx, rds_on_role, r, "ROLE");
		return;
	}
	rds_set_ready(r);
}

static void rds_on_disconnect(const redisAsyncContext *c, int status)
{
	struct rds *r = c->data;
	r->ready = 0;
	r->ctx = NULL;
	STAT_SET(redis_up, 0);
	if (r->closing)
		return;
	if (status != REDIS_OK) {
		STAT_INC(redis_errors);
		r->errors++;
		log_warnx("redis: connection lost: %s", c->errstr);
	}
	rds_schedule_retry(r);
}

/* Connects to the configured server, or to the master the sentinels named. */
static void rds_connect_now(struct rds *r)
{
	const struct conf *conf = r->conf;
	redisAsyncContext *c = r->sentinel ? redisAsyncConnect(r->master_host, r->master_port)
	    : conf->redis_socket[0] ? redisAsyncConnectUnix(conf->redis_socket)
	    : redisAsyncConnect(conf->redis_host, conf->redis_port);
	if (c == NULL || c->err) {
		if (r->errors++ % 50 == 0)
			log_warnx("redis: cannot connect: %s", c ? c->errstr : "out of memory");
		if (c)
			redisAsyncFree(c);
		rds_schedule_retry(r);
		return;
	}
	c->data = r;
	r->ctx = c;
	redisLibevAttach(r->loop, c);
	redisAsyncSetConnectCallback(c, rds_on_connect);
	redisAsyncSetDisconnectCallback(c, rds_on_disconnect);
}

static void rds_connect(struct rds *r)
{
	if (r->sentinel)
		sentinel_discover(r->sentinel);   /* rds_on_master connects */
	else
		rds_connect_now(r);
}

static void rds_on_master(void *data, const char *host, int port)
{
	struct rds *r = data;
	if (r->closing || r->ctx != NULL)
		return;
	if (host == NULL) {
		STAT_INC(redis_errors);
		if (r->errors++ % 50 == 0)
			log_warnx("redis: no sentinel of [redis] sentinels names the master %s", r->conf->redis_master_name);
		rds_schedule_retry(r);
		return;
	}
	snprintf(r->master_host, sizeof(r->master_host), "%s", host);
	r->master_port = port;
	rds_connect_now(r);
}

/* A sentinel announced a new master: leave the old one now rather than at its first failed write. */
static void rds_on_switch(void *data, const char *host, int port)
{
	struct rds *r = data;
	if (r->closing)
		return;
	r->retry_delay = RDS_RETRY_MIN;
	if (r->ctx != NULL) {
		if ((r->ctx->c.flags & REDIS_CONNECTED) &&
		    (strcmp(host, r->master_host) != 0 || port != r->master_port))
			redisAsyncDisconnect(r->ctx);   /* rds_on_disconnect asks the sentinels again */
		return;   /* a connection under way is checked with ROLE */
	}
	ev_timer_stop(r->loop, &r->retry);
	rds_connect(r);
}

/* With sentinels, every reply passes here first: READONLY means this server became a replica. */
struct rds_call {
	struct rds *r;
	redisCallbackFn *cb;
	void *privdata;
};

static void rds_on_checked_reply(redisAsyncContext *c, void *reply, void *privdata)
{
	struct rds_call *call = privdata;
	struct rds *r = call->r;
	redisReply *rep = reply;
	if (rep && rep->type == REDIS_REPLY_ERROR && strncmp(rep->str, "READONLY", 8) == 0 && r->ctx == c &&
	    r->ready && !r->closing) {
		log_warnx("redis: %s:%d became read-only (a failover): asking the sentinels again", r->master_host,
		    r->master_port);
		r->ready = 0;   /* refuse new commands until the new master answers */
		STAT_SET(redis_up, 0);
		redisAsyncDisconnect(c);
	}
	if (call->cb)
		call->cb(c, reply, call->privdata);
	free(call);
}

static struct rds_call *rds_wrap(struct rds *r, redisCallbackFn **cb, void **privdata)
{
	if (r->sentinel == NULL)
		return NULL;
	struct rds_call *call = malloc(sizeof(*call));
	if (call == NULL)
		return NULL;   /* the command goes unchecked: a later one will notice */
	call->r = r;
	call->cb = *cb;
	call->privdata = *privdata;
	*cb = rds_on_checked_reply;
	*privdata = call;
	return call;
}

void rds_init(struct rds *r, struct ev_loop *loop, const struct conf *conf,
    void (*on_ready)(struct rds *r), void *data)
{
	r->loop = loop;
	r->conf = conf;
	r->ctx = NULL;
	r->ready = 0;
	r->closing = 0;
	r->on_ready = on_ready;
	r->data = data;
	r->errors = 0;
	r->retry_delay = RDS_RETRY_MIN;
	ev_timer_init(&r->retry, rds_on_retry, 0., 0.);
	r->retry.data = r;
	struct sentinel_ops ops = { rds_on_master, rds_on_switch, r };
	r->sentinel = sentinel_create(loop, conf, &ops);
	r->master_host[0] = '\0';
	r->master_port = 0;
	r->not_master = 0;
	rds_connect(r);
}

int rds_command(struct rds *r, redisCallbackFn *cb, void *privdata, const char *fmt, ...)
{
	if (!r->ready || r->ctx == NULL)
		return -1;
	struct rds_call *call = rds_wrap(r, &cb, &privdata);
	va_list ap;
	va_start(ap, fmt);
	int rc = redisvAsyncCommand(r->ctx, cb, privdata, fmt, ap);
	va_end(ap);
	if (rc != REDIS_OK)
		free(call);
	return rc == REDIS_OK ? 0 : -1;
}

int rds_command_argv(struct rds *r, redisCallbackFn *cb, void *privdata, int argc,
    const char **argv, const size_t *argvlen)
{
	if (!r->ready || r->ctx == NULL)
		return -1;
	struct rds_call *call = rds_wrap(r, &cb, &privdata);
	if (redisAsyncCommandArgv(r->ctx, cb, privdata, argc, argv, argvlen) == REDIS_OK)
		return 0;
	free(call);
	return -1;
}

void rds_close(struct rds *r)
{
	ev_timer_stop(r->loop, &r->retry);
	r->on_ready = NULL;
	r->closing = 1;
	sentinel_destroy(r->sentinel);
	r->sentinel = NULL;
	if (r->ctx) {
		redisAsyncContext *c = r->ctx;
		r->ctx = NULL;
		r->ready = 0;
		c->data = r;
		redisAsyncFree(c);
	}
}

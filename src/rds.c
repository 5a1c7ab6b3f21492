/* rds.c: keeps an async Redis connection up: connect (to the master Sentinel names, when configured), AUTH, SELECT, a PING before Redis counts as up, a timeout on answers, and reconnect with back-off. */
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
static void rds_on_ping(redisAsyncContext *c, void *reply, void *privdata);
static int rds_send(struct rds *r, redisCallbackFn *cb, void *privdata, const char *fmt, ...);

static void rds_schedule_retry(struct rds *r)
{
	ev_timer_stop(r->loop, &r->retry);
	ev_timer_set(&r->retry, r->retry_delay, 0.);
	ev_timer_start(r->loop, &r->retry);
	r->retry_delay = r->retry_delay * 2 > RDS_RETRY_MAX ? RDS_RETRY_MAX : r->retry_delay * 2;
	if (r->on_away)
		r->on_away(r);
}

int rds_away(const struct rds *r)
{
	return ev_is_active(&r->retry);
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
	struct rds *r = privdata;
	redisReply *rep = reply;
	if (rep == NULL || rep->type != REDIS_REPLY_ERROR)
		return;
	STAT_INC(redis_errors);
	if (r->errors++ % 50 == 0)   /* a wrong password is refused at every reconnection */
		log_warnx("redis: AUTH/SELECT failed: %s", rep->str);
}

/* The server answered (PING, or ROLE with sentinels): the process counts Redis as up. */
static void rds_set_up(struct rds *r)
{
	STAT_SET(redis_up, 1);
	r->dropped = 0;
	r->retry_delay = RDS_RETRY_MIN;   /* only an answer ends the back-off: a refusal keeps it growing */
	if (r->sentinel)
		log_info("redis: connected to the master %s:%d", r->master_host, r->master_port);
	else
		log_info("redis: connected");
}

/* Commands are taken from here on: queued behind the connection's first PING, they wait for it
 * (a restarted storage process answers its resent requests without a round trip of delay), and
 * fail with it, after [redis] timeout, if the server never answers. */
static void rds_set_ready(struct rds *r)
{
	r->ready = 1;
	r->not_master = 0;
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
		rds_set_up(r);
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
		rds_send(r, rds_on_setup_reply, r, "AUTH %s", conf->redis_password);
	if (conf->redis_db)
		rds_send(r, rds_on_setup_reply, r, "SELECT %d", conf->redis_db);
	/* Up only once the server answers: the kernel accepts connections for a stopped server. A
	 * sentinel's answer may be stale (a failover under way): only a master takes commands. */
	if (r->sentinel) {
		rds_send(r, rds_on_role, r, "ROLE");
		return;
	}
	rds_send(r, rds_on_ping, r, "PING");
	rds_set_ready(r);
}

static void rds_on_ping(redisAsyncContext *c, void *reply, void *privdata)
{
	struct rds *r = privdata;
	redisReply *rep = reply;
	if (rep == NULL || r->ctx != c || r->closing)
		return;   /* the connection is gone: its disconnect callback retries */
	if (rep->type == REDIS_REPLY_STATUS && strcmp(rep->str, "PONG") == 0) {
		rds_set_up(r);
		return;
	}
	/* Refused (NOAUTH, LOADING...): the commands behind it fail the same way; try again later. */
	STAT_INC(redis_errors);
	if (r->errors++ % 50 == 0)
		log_warnx("redis: PING answered %s: connecting again",
		    rep->type == REDIS_REPLY_ERROR ? rep->str : "something else than PONG");
	r->ready = 0;
	redisAsyncDisconnect(c);
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
	r->generation++;
	r->sent = r->answered = 0;
	r->connect_started = r->last_progress = ev_now(r->loop);
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

/* Every reply passes here first: it counts as the server's progress for [redis] timeout, and with
 * sentinels READONLY means this server became a replica. */
struct rds_call {
	struct rds *r;
	unsigned long generation;   /* of the connection it was sent on */
	redisCallbackFn *cb;
	void *privdata;
};

static void rds_on_reply(redisAsyncContext *c, void *reply, void *privdata)
{
	struct rds_call *call = privdata;
	struct rds *r = call->r;
	redisReply *rep = reply;
	if (call->generation == r->generation) {
		r->answered++;
		r->last_progress = ev_now(r->loop);
	}
	if (r->sentinel && rep && rep->type == REDIS_REPLY_ERROR && strncmp(rep->str, "READONLY", 8) == 0 &&
	    r->ctx == c && r->ready && !r->closing) {
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

static struct rds_call *rds_call_new(struct rds *r, redisCallbackFn *cb, void *privdata)
{
	struct rds_call *call = malloc(sizeof(*call));
	if (call == NULL)
		return NULL;
	*call = (struct rds_call){ r, r->generation, cb, privdata };
	return call;
}

/* Counts a command just handed to hiredis: the first to wait starts the clock. */
static void rds_sent(struct rds *r)
{
	if (r->sent++ == r->answered)
		r->last_progress = ev_now(r->loop);
}

static int rds_vsend(struct rds *r, redisCallbackFn *cb, void *privdata, const char *fmt, va_list ap)
{
	struct rds_call *call = rds_call_new(r, cb, privdata);
	if (call == NULL)
		return -1;
	if (redisvAsyncCommand(r->ctx, rds_on_reply, call, fmt, ap) != REDIS_OK) {
		free(call);
		return -1;
	}
	rds_sent(r);
	return 0;
}

static int rds_send(struct rds *r, redisCallbackFn *cb, void *privdata, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int rc = rds_vsend(r, cb, privdata, fmt, ap);
	va_end(ap);
	return rc;
}

/* Drops a connection whose server stopped answering (or never finished connecting): its waiting
 * commands fail now, as if the connection were lost, and a new one is tried after the back-off. */
static void rds_drop(struct rds *r, const char *why)
{
	redisAsyncContext *c = r->ctx;
	int connected = (c->c.flags & REDIS_CONNECTED) != 0;
	STAT_INC(redis_errors);
	r->errors++;
	if (r->dropped++ % 50 == 0)   /* a server that stays stopped is dropped again at every retry */
		log_warnx("redis: %s for %d s: dropping the connection", why, r->conf->redis_timeout);
	r->ready = 0;   /* the failed commands' callbacks may send again: refused at once */
	STAT_SET(redis_up, 0);
	redisAsyncFree(c);   /* fails the waiting commands; rds_on_disconnect retries when it was connected */
	if (!connected) {
		r->ctx = NULL;
		rds_schedule_retry(r);
	}
}

/* Every quarter of [redis] timeout: a connection that has waited that long for any answer is
 * dropped; an idle one is sent a PING, so that a server that hangs is noticed (and the agent
 * check says down) before a request meets it. */
static void rds_on_watch(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)revents;
	struct rds *r = w->data;
	if (r->closing || r->ctx == NULL)
		return;
	ev_tstamp now = ev_now(loop), limit = r->conf->redis_timeout;
	if (!(r->ctx->c.flags & REDIS_CONNECTED)) {
		if (now - r->connect_started >= limit)
			rds_drop(r, "connecting took too long");
	} else if (r->sent != r->answered && now - r->last_progress >= limit) {
		/* A loop that was itself held up (a loaded host) may find the answers waiting in the
		 * socket: read them first, so that only a silent server is dropped. */
		redisAsyncHandleRead(r->ctx);
		if (r->ctx != NULL && r->sent != r->answered && now - r->last_progress >= limit)
			rds_drop(r, "no answer");
	} else if (r->ready && now - r->last_progress >= limit / 2.0) {
		rds_send(r, NULL, NULL, "PING");
	}
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
	r->on_away = NULL;
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
	r->generation = 0;
	r->sent = r->answered = 0;
	r->dropped = 0;
	double every = conf->redis_timeout / 4.0;
	ev_timer_init(&r->watch, rds_on_watch, every, every);
	r->watch.data = r;
	ev_timer_start(loop, &r->watch);
	rds_connect(r);
}

int rds_command(struct rds *r, redisCallbackFn *cb, void *privdata, const char *fmt, ...)
{
	if (!r->ready || r->ctx == NULL)
		return -1;
	va_list ap;
	va_start(ap, fmt);
	int rc = rds_vsend(r, cb, privdata, fmt, ap);
	va_end(ap);
	return rc;
}

int rds_command_argv(struct rds *r, redisCallbackFn *cb, void *privdata, int argc,
    const char **argv, const size_t *argvlen)
{
	if (!r->ready || r->ctx == NULL)
		return -1;
	struct rds_call *call = rds_call_new(r, cb, privdata);
	if (call == NULL)
		return -1;
	if (redisAsyncCommandArgv(r->ctx, rds_on_reply, call, argc, argv, argvlen) != REDIS_OK) {
		free(call);
		return -1;
	}
	rds_sent(r);
	return 0;
}

void rds_close(struct rds *r)
{
	ev_timer_stop(r->loop, &r->retry);
	ev_timer_stop(r->loop, &r->watch);
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

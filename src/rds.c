/* rds.c: keeps an async Redis connection up: connect, AUTH, SELECT, and reconnect with back-off. */
#include "config.h"
#include "rds.h"
#include "conf.h"
#include "log.h"
#include "stats.h"

#include <hiredis/adapters/libev.h>
#include <stdarg.h>
#include <stdio.h>

#define RDS_RETRY_MIN 0.1
#define RDS_RETRY_MAX 2.0

static void rds_connect(struct rds *r);

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
	r->ready = 1;
	STAT_SET(redis_up, 1);
	r->retry_delay = RDS_RETRY_MIN;
	log_info("redis: connected");
	if (r->on_ready)
		r->on_ready(r);
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

static void rds_connect(struct rds *r)
{
	const struct conf *conf = r->conf;
	redisAsyncContext *c = conf->redis_socket[0]
	    ? redisAsyncConnectUnix(conf->redis_socket)
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
	rds_connect(r);
}

int rds_command(struct rds *r, redisCallbackFn *cb, void *privdata, const char *fmt, ...)
{
	if (!r->ready || r->ctx == NULL)
		return -1;
	va_list ap;
	va_start(ap, fmt);
	int rc = redisvAsyncCommand(r->ctx, cb, privdata, fmt, ap);
	va_end(ap);
	return rc == REDIS_OK ? 0 : -1;
}

int rds_command_argv(struct rds *r, redisCallbackFn *cb, void *privdata, int argc,
    const char **argv, const size_t *argvlen)
{
	if (!r->ready || r->ctx == NULL)
		return -1;
	return redisAsyncCommandArgv(r->ctx, cb, privdata, argc, argv, argvlen) == REDIS_OK ? 0 : -1;
}

void rds_close(struct rds *r)
{
	ev_timer_stop(r->loop, &r->retry);
	r->on_ready = NULL;
	r->closing = 1;
	if (r->ctx) {
		redisAsyncContext *c = r->ctx;
		r->ctx = NULL;
		r->ready = 0;
		c->data = r;
		redisAsyncFree(c);
	}
}

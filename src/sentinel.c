/* sentinel.c: asks Redis sentinels for the master's address and watches them for +switch-master, all async on libev. */
#include "config.h"
#include "sentinel.h"
#include "conf.h"
#include "log.h"

#include <hiredis/adapters/libev.h>
#include <hiredis/async.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define QUERY_TIMEOUT 2.0     /* a sentinel that does not answer in time is skipped */
#define WATCH_RETRY 1.0       /* reconnect delay of the +switch-master subscription */

struct sentinel {
	struct ev_loop *loop;
	const struct conf *conf;
	struct sentinel_ops ops;
	struct conf_hostport addrs[CONF_MAX_SENTINELS];
	int naddrs;
	int next;                     /* the sentinel asked first: the last one that answered */
	int tried;                    /* sentinels asked in the current round */
	redisAsyncContext *query;     /* the discovery in flight, or NULL */
	ev_timer query_timer;
	redisAsyncContext *watch;     /* subscribed to +switch-master, or NULL */
	int watch_at;
	ev_timer watch_timer;
	unsigned long failures;
};

static void query_next(struct sentinel *s);
static void watch_start(struct sentinel *s);

static void auth_on_reply(redisAsyncContext *c, void *reply, void *privdata)
{
	(void)c;
	(void)privdata;
	redisReply *rep = reply;
	if (rep && rep->type == REDIS_REPLY_ERROR)
		log_warnx("redis sentinel: AUTH failed: %s", rep->str);
}

/* A hiredis connection to sentinel i with AUTH pipelined; NULL on an immediate failure. */
static redisAsyncContext *sentinel_connect(struct sentinel *s, int i,
    void (*on_connect)(const redisAsyncContext *, int), void (*on_disconnect)(const redisAsyncContext *, int))
{
	redisAsyncContext *c = redisAsyncConnect(s->addrs[i].host, s->addrs[i].port);
	if (c == NULL || c->err) {
		if (c)
			redisAsyncFree(c);
		return NULL;
	}
	c->data = s;
	redisLibevAttach(s->loop, c);
	redisAsyncSetConnectCallback(c, on_connect);
	redisAsyncSetDisconnectCallback(c, on_disconnect);
	if (s->conf->redis_sentinel_password[0])
		redisAsyncCommand(c, auth_on_reply, NULL, "AUTH %s", s->conf->redis_sentinel_password);
	return c;
}

/* ---------------------------------------------------------------- discovery */

/* The sentinel being asked failed: drop it (when still ours) and ask the next. */
static void query_failed(struct sentinel *s, const char *why)
{
	const struct conf_hostport *a = &s->addrs[s->next];
	if (s->failures++ % 20 == 0)
		log_warnx("redis sentinel %s:%d: %s", a->host, a->port, why);
	ev_timer_stop(s->loop, &s->query_timer);
	s->next = (s->next + 1) % s->naddrs;
	query_next(s);
}

static void query_on_connect(const redisAsyncContext *c, int status)
{
	struct sentinel *s = c->data;
	if (status == REDIS_OK || s->query != c)
		return;
	s->query = NULL;   /* hiredis frees it */
	query_failed(s, c->errstr[0] ? c->errstr : "cannot connect");
}

static void query_on_disconnect(const redisAsyncContext *c, int status)
{
	(void)status;
	struct sentinel *s = c->data;
	if (s->query != c)
		return;   /* we closed it after its answer, or gave up on it */
	s->query = NULL;
	query_failed(s, "connection lost before the answer");
}

static void query_on_reply(redisAsyncContext *c, void *reply, void *privdata)
{
	struct sentinel *s = privdata;
	if (s->query != c)
		return;
	redisReply *rep = reply;
	s->query = NULL;
	ev_timer_stop(s->loop, &s->query_timer);
	redisAsyncDisconnect(c);
	if (rep == NULL || rep->type != REDIS_REPLY_ARRAY || rep->elements != 2 ||
	    rep->element[0]->type != REDIS_REPLY_STRING || rep->element[1]->type != REDIS_REPLY_STRING) {
		query_failed(s, rep && rep->type == REDIS_REPLY_ERROR ? rep->str
		    : "does not know the master (check master_name)");
		return;
	}
	int port = atoi(rep->element[1]->str);
	if (port < 1 || port > 65535) {
		query_failed(s, "answered a bad port");
		return;
	}
	s->tried = 0;
	s->failures = 0;
	if (s->watch == NULL && !ev_is_active(&s->watch_timer)) {
		s->watch_at = s->next;
		watch_start(s);
	}
	s->ops.on_master(s->ops.data, rep->element[0]->str, port);
}

static void query_on_timeout(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)loop;
	(void)revents;
	struct sentinel *s = t->data;
	redisAsyncContext *c = s->query;
	if (c == NULL)
		return;
	s->query = NULL;   /* its callbacks, run by the free, now ignore it */
	redisAsyncFree(c);
	query_failed(s, "no answer in time");
}

/* Asks the next sentinel of the round, or reports failure once every one was asked. */
static void query_next(struct sentinel *s)
{
	while (s->tried < s->naddrs) {
		s->tried++;
		redisAsyncContext *c = sentinel_connect(s, s->next, query_on_connect, query_on_disconnect);
		if (c == NULL) {
			s->next = (s->next + 1) % s->naddrs;
			continue;
		}
		s->query = c;
		redisAsyncCommand(c, query_on_reply, s, "SENTINEL get-master-addr-by-name %s", s->conf->redis_master_name);
		ev_timer_set(&s->query_timer, QUERY_TIMEOUT, 0.);
		ev_timer_start(s->loop, &s->query_timer);
		return;
	}
	s->tried = 0;
	s->ops.on_master(s->ops.data, NULL, 0);
}

void sentinel_discover(struct sentinel *s)
{
	if (s->query != NULL)
		return;
	s->tried = 0;
	query_next(s);
}

/* ---------------------------------------------------------------- failover watch */

static void watch_retry_later(struct sentinel *s)
{
	s->watch_at = (s->watch_at + 1) % s->naddrs;
	ev_timer_set(&s->watch_timer, WATCH_RETRY, 0.);
	ev_timer_start(s->loop, &s->watch_timer);
}

static void watch_on_connect(const redisAsyncContext *c, int status)
{
	struct sentinel *s = c->data;
	if (status == REDIS_OK || s->watch != c)
		return;
	s->watch = NULL;
	watch_retry_later(s);
}

static void watch_on_disconnect(const redisAsyncContext *c, int status)
{
	(void)status;
	struct sentinel *s = c->data;
	if (s->watch != c)
		return;
	s->watch = NULL;
	watch_retry_later(s);
}

/* "message" "+switch-master" "<name> <old-ip> <old-port> <new-ip> <new-port>" */
static void watch_on_message(redisAsyncContext *c, void *reply, void *privdata)
{
	struct sentinel *s = privdata;
	redisReply *rep = reply;
	if (s->watch != c || rep == NULL || rep->type != REDIS_REPLY_ARRAY || rep->elements != 3 ||
	    rep->element[0]->type != REDIS_REPLY_STRING || strcmp(rep->element[0]->str, "message") != 0 ||
	    rep->element[2]->type != REDIS_REPLY_STRING)
		return;
	char name[128], old_host[256], new_host[256];
	int old_port, new_port;
	if (sscanf(rep->element[2]->str, "%127s %255s %d %255s %d", name, old_host, &old_port, new_host,
	    &new_port) != 5 || strcmp(name, s->conf->redis_master_name) != 0)
		return;
	log_info("redis sentinel: failover of %s: %s:%d -> %s:%d", name, old_host, old_port, new_host, new_port);
	s->ops.on_switch(s->ops.data, new_host, new_port);
}

static void watch_start(struct sentinel *s)
{
	redisAsyncContext *c = sentinel_connect(s, s->watch_at, watch_on_connect, watch_on_disconnect);
	if (c == NULL) {
		watch_retry_later(s);
		return;
	}
	s->watch = c;
	redisAsyncCommand(c, watch_on_message, s, "SUBSCRIBE +switch-master");
}

static void watch_on_timer(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)loop;
	(void)revents;
	struct sentinel *s = t->data;
	if (s->watch == NULL)
		watch_start(s);
}

/* ---------------------------------------------------------------- life */

struct sentinel *sentinel_create(struct ev_loop *loop, const struct conf *conf, const struct sentinel_ops *ops)
{
	if (conf->redis_sentinels[0] == '\0')
		return NULL;
	struct sentinel *s = calloc(1, sizeof(*s));
	if (s == NULL)
		fatalx("out of memory");
	s->loop = loop;
	s->conf = conf;
	s->ops = *ops;
	s->naddrs = conf_parse_hostports(conf->redis_sentinels, s->addrs, CONF_MAX_SENTINELS);
	if (s->naddrs <= 0)
		fatalx("[redis] sentinels: bad list %s", conf->redis_sentinels);   /* conf_load checked it */
	ev_timer_init(&s->query_timer, query_on_timeout, 0., 0.);
	s->query_timer.data = s;
	ev_timer_init(&s->watch_timer, watch_on_timer, 0., 0.);
	s->watch_timer.data = s;
	return s;
}

void sentinel_destroy(struct sentinel *s)
{
	if (s == NULL)
		return;
	ev_timer_stop(s->loop, &s->query_timer);
	ev_timer_stop(s->loop, &s->watch_timer);
	redisAsyncContext *q = s->query, *w = s->watch;
	s->query = s->watch = NULL;   /* the callbacks the frees run ignore them */
	if (q)
		redisAsyncFree(q);
	if (w)
		redisAsyncFree(w);
	free(s);
}

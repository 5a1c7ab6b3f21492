/* lease.c: upload leases in Redis, taken, renewed and released by small atomic Lua scripts. */
#include "config.h"
#include "lease.h"
#include "rds.h"

#include <hiredis/hiredis.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Each script compares the whole value, so only the holding that wrote it can extend or drop it. */
static const char acquire_script[] =
	"local v = redis.call('GET', KEYS[1]) "
	"if v == false or v == ARGV[1] then "
	"  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end "
	"return {v, redis.call('PTTL', KEYS[1])}";
static const char renew_script[] =
	"local v = redis.call('GET', KEYS[1]) "
	"if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end "
	"if v == false then return 0 end "
	"return {v, redis.call('PTTL', KEYS[1])}";
static const char release_script[] =
	"if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end return 1";

struct lease_call {
	lease_cb *cb;
	void *data;
};

void lease_value_new(char value[LEASE_VALUE_MAX], const char *node)
{
	unsigned char token[LEASE_TOKEN_HEX / 2];
	char hex[LEASE_TOKEN_HEX + 1];
	randombytes_buf(token, sizeof(token));
	sodium_bin2hex(hex, sizeof(hex), token, sizeof(token));
	snprintf(value, LEASE_VALUE_MAX, "%s %.64s %ld", hex, node[0] ? node : "-", (long)getpid());
}

static void lease_on_reply(redisAsyncContext *c, void *reply, void *privdata)
{
	(void)c;
	struct lease_call *call = privdata;
	redisReply *rep = reply;
	enum lease_status status = LEASE_ERROR;
	const char *holder = NULL;
	long remaining = -1;
	if (rep == NULL || rep->type == REDIS_REPLY_ERROR) {
		status = LEASE_ERROR;
	} else if (rep->type == REDIS_REPLY_INTEGER) {
		status = rep->integer == 1 ? LEASE_HELD : LEASE_BUSY;
	} else if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 2 &&
	    rep->element[0]->type == REDIS_REPLY_STRING && rep->element[1]->type == REDIS_REPLY_INTEGER) {
		status = LEASE_BUSY;
		holder = rep->element[0]->str;
		remaining = (long)rep->element[1]->integer;
	}
	if (call->cb)
		call->cb(call->data, status, holder, remaining);
	free(call);
}

static int lease_eval(struct rds *r, const char *script, const char *key, const char *value, long ttl_ms,
    lease_cb *cb, void *data)
{
	struct lease_call *call = malloc(sizeof(*call));
	if (call == NULL)
		return -1;
	call->cb = cb;
	call->data = data;
	char ttl[24];
	snprintf(ttl, sizeof(ttl), "%ld", ttl_ms);
	const char *argv[] = { "EVAL", script, "1", key, value, ttl };
	size_t argvlen[] = { 4, strlen(script), 1, strlen(key), strlen(value), strlen(ttl) };
	if (rds_command_argv(r, lease_on_reply, call, 6, argv, argvlen) < 0) {
		free(call);
		return -1;
	}
	return 0;
}

int lease_acquire(struct rds *r, const char *key, const char *value, long ttl_ms, lease_cb *cb, void *data)
{
	return lease_eval(r, acquire_script, key, value, ttl_ms, cb, data);
}

int lease_renew(struct rds *r, const char *key, const char *value, long ttl_ms, lease_cb *cb, void *data)
{
	return lease_eval(r, renew_script, key, value, ttl_ms, cb, data);
}

int lease_release(struct rds *r, const char *key, const char *value, lease_cb *cb, void *data)
{
	return lease_eval(r, release_script, key, value, 0, cb, data);
}

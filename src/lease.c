/* lease.c: upload leases in Redis, taken, renewed and released by small atomic Lua scripts. */
#include "config.h"
#include "lease.h"
#include "log.h"
#include "rds.h"

#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char owner[LEASE_OWNER_MAX];

/*
 * A lease is a hash {owner, fence, last} with a TTL. Every script compares the owner, so
 * only the holding that took the lease can extend it, release it or write under it. The
 * fence is the Redis server's clock when a holding began: holdings of one upload follow
 * each other (the next waits for the previous one to be released or to expire), so their
 * fences increase without a counter that a Redis restart could reset. A released lease
 * keeps its fence and last owner for a while: the same owner taking it back first gets
 * the same fence, which tells it that nobody else changed the upload meanwhile.
 */
/* ARGV[3] is a floor: a holder that found a higher fence recorded with the staging entry than the
 * one Redis gave it knows Redis lost writes (a failover, a restart from a snapshot) and asks for a
 * fence above that one, so that whoever wrote it is fenced out from now on. */
static const char acquire_script[] =
	"local o = redis.call('HGET', KEYS[1], 'owner') "
	"if o and o ~= '' and o ~= ARGV[1] then return {0, o, redis.call('PTTL', KEYS[1])} end "
	"local f "
	"if o == ARGV[1] or (o == '' and redis.call('HGET', KEYS[1], 'last') == ARGV[1]) then "
	"  f = redis.call('HGET', KEYS[1], 'fence') end "
	"if not f or tonumber(f) <= tonumber(ARGV[3]) then "
	"  local t = redis.call('TIME') "
	"  f = t[1] .. string.format('%06d', tonumber(t[2])) "
	"  if tonumber(f) <= tonumber(ARGV[3]) then f = string.format('%.0f', tonumber(ARGV[3]) + 1) end end "
	"redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'last', ARGV[1], 'fence', f) "
	"redis.call('PEXPIRE', KEYS[1], ARGV[2]) "
	"return {1, f}";
/* Taking back, after Redis reconnected, a lease this owner had given back: only if nobody took it
 * since (it is still free, last held by this owner with ARGV[3] as its fence) or if Redis lost it
 * (no key at all); then with that same fence, which the caller checks against the staging entry. */
static const char reclaim_script[] =
	"local o = redis.call('HGET', KEYS[1], 'owner') "
	"if not o or (o == '' and redis.call('HGET', KEYS[1], 'last') == ARGV[1] and "
	"    redis.call('HGET', KEYS[1], 'fence') == ARGV[3]) then "
	"  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'last', ARGV[1], 'fence', ARGV[3]) "
	"  redis.call('PEXPIRE', KEYS[1], ARGV[2]) "
	"  return {1, ARGV[3]} end "
	"return {0, o, redis.call('PTTL', KEYS[1])}";
static const char renew_script[] =
	"local o = redis.call('HGET', KEYS[1], 'owner') "
	"if o == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) "
	"  return {1, redis.call('HGET', KEYS[1], 'fence')} end "
	"if o and o ~= '' then return {0, o, redis.call('PTTL', KEYS[1])} end "
	"return {0, '', -2}";
/* Released with ARGV[2] > 0: free for anyone, but remembered for that long, so that the same owner
 * taking it again before anyone else gets the same fence back (nothing changed in between). */
static const char release_script[] =
	"if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then "
	"  if tonumber(ARGV[2]) > 0 then redis.call('HSET', KEYS[1], 'owner', '') "
	"    redis.call('PEXPIRE', KEYS[1], ARGV[2]) "
	"  else redis.call('DEL', KEYS[1]) end end "
	"return {1, '0'}";
/* ARGV[1] owner, ARGV[2] the command's name, ARGV[3..] its arguments. */
static const char fenced_script[] =
	"local o = redis.call('HGET', KEYS[1], 'owner') "
	"if o ~= ARGV[1] then return {0, o or '', redis.call('PTTL', KEYS[1])} end "
	"redis.call(unpack(ARGV, 2)) "
	"return {1, '0'}";

struct lease_call {
	lease_cb *cb;
	void *data;
};

void lease_owner_init(const char *node)
{
	unsigned char token[16];
	char hex[sizeof(token) * 2 + 1];
	randombytes_buf(token, sizeof(token));
	sodium_bin2hex(hex, sizeof(hex), token, sizeof(token));
	snprintf(owner, sizeof(owner), "%s %.64s %ld", hex, node[0] ? node : "-", (long)getpid());
}

const char *lease_owner(void)
{
	return owner;
}

static void lease_on_reply(redisAsyncContext *c, void *reply, void *privdata)
{
	(void)c;
	struct lease_call *call = privdata;
	redisReply *rep = reply;
	enum lease_status status = LEASE_ERROR;
	uint64_t fence = 0;
	const char *holder = NULL;
	long remaining = -1;
	if (rep && rep->type == REDIS_REPLY_ARRAY && rep->elements >= 2 && rep->element[0]->type == REDIS_REPLY_INTEGER &&
	    rep->element[1]->type == REDIS_REPLY_STRING) {
		if (rep->element[0]->integer == 1) {
			status = LEASE_HELD;
			fence = strtoull(rep->element[1]->str, NULL, 10);
		} else {
			status = LEASE_BUSY;
			holder = rep->element[1]->str;
			if (rep->elements >= 3 && rep->element[2]->type == REDIS_REPLY_INTEGER)
				remaining = (long)rep->element[2]->integer;
		}
	} else if (rep && rep->type == REDIS_REPLY_ERROR) {
		log_warnx("redis: lease script failed: %s", rep->str);
	}
	if (call->cb)
		call->cb(call->data, status, fence, holder, remaining);
	free(call);
}

/* EVAL script 1 key owner extra... */
static int lease_eval(struct rds *r, const char *script, const char *key, int extra_argc, const char **extra,
    const size_t *extra_len, lease_cb *cb, void *data)
{
	enum { FIXED = 5, MAX_EXTRA = 8 };
	if (extra_argc > MAX_EXTRA)
		return -1;
	struct lease_call *call = malloc(sizeof(*call));
	if (call == NULL)
		return -1;
	call->cb = cb;
	call->data = data;
	const char *argv[FIXED + MAX_EXTRA] = { "EVAL", script, "1", key, owner };
	size_t argvlen[FIXED + MAX_EXTRA] = { 4, strlen(script), 1, strlen(key), strlen(owner) };
	for (int i = 0; i < extra_argc; i++) {
		argv[FIXED + i] = extra[i];
		argvlen[FIXED + i] = extra_len[i];
	}
	if (rds_command_argv(r, lease_on_reply, call, FIXED + extra_argc, argv, argvlen) < 0) {
		free(call);
		return -1;
	}
	return 0;
}

static int lease_eval_ttl(struct rds *r, const char *script, const char *key, long ttl_ms, lease_cb *cb, void *data)
{
	char ttl[24];
	snprintf(ttl, sizeof(ttl), "%ld", ttl_ms);
	const char *extra[] = { ttl };
	size_t extra_len[] = { strlen(ttl) };
	return lease_eval(r, script, key, 1, extra, extra_len, cb, data);
}

int lease_acquire(struct rds *r, const char *key, long ttl_ms, uint64_t floor, lease_cb *cb, void *data)
{
	char ttl[24], above[24];
	snprintf(ttl, sizeof(ttl), "%ld", ttl_ms);
	/* Fences are Redis clocks in microseconds (16 digits): a floor beyond what Lua's numbers hold
	 * exactly cannot have come from one, and is not followed. */
	snprintf(above, sizeof(above), "%" PRIu64, floor < LEASE_FENCE_EXACT ? floor : 0);
	const char *extra[] = { ttl, above };
	size_t extra_len[] = { strlen(ttl), strlen(above) };
	return lease_eval(r, acquire_script, key, 2, extra, extra_len, cb, data);
}

int lease_reclaim(struct rds *r, const char *key, long ttl_ms, uint64_t fence, lease_cb *cb, void *data)
{
	char ttl[24], ours[24];
	snprintf(ttl, sizeof(ttl), "%ld", ttl_ms);
	snprintf(ours, sizeof(ours), "%" PRIu64, fence);
	const char *extra[] = { ttl, ours };
	size_t extra_len[] = { strlen(ttl), strlen(ours) };
	return lease_eval(r, reclaim_script, key, 2, extra, extra_len, cb, data);
}

int lease_renew(struct rds *r, const char *key, long ttl_ms, lease_cb *cb, void *data)
{
	return lease_eval_ttl(r, renew_script, key, ttl_ms, cb, data);
}

int lease_release(struct rds *r, const char *key, long keep_ms, lease_cb *cb, void *data)
{
	return lease_eval_ttl(r, release_script, key, keep_ms, cb, data);
}

int lease_fenced_command(struct rds *r, const char *key, int argc, const char **argv, const size_t *argvlen,
    lease_cb *cb, void *data)
{
	return lease_eval(r, fenced_script, key, argc, argv, argvlen, cb, data);
}

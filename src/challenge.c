/* challenge.c: the proof of possession of an instant upload in Redis, read and changed only under the upload's lease. */
#include "config.h"
#include "challenge.h"
#include "log.h"
#include "rds.h"

#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/*
 * The proof is a hash {chunk_len, draw, next, failed} with the TTL it got when it was drawn
 * (upload_ttl). Both scripts first compare the lease's owner, like every record write
 * (lease.c), so a node that lost the upload can neither read a proof to go on with nor change
 * it. The draw is never replaced while the key lives: a client that starts over, on this node
 * or another, gets the chunks it was asked for before, so resets give it nothing new to guess.
 * A chunk 1 that did not match (ARGV[6] '1') draws or uses a draw all the same and marks it
 * failed: both outcomes run this one script, so neither the answer nor its time tells them
 * apart, and a chunk 1 guessed wrong costs the account its instant upload of (uid, md5).
 */
static const char get_script[] =
	"local o = redis.call('HGET', KEYS[1], 'owner') "
	"if o ~= ARGV[1] then return {0, o or '', redis.call('PTTL', KEYS[1])} end "
	"local c = redis.call('HMGET', KEYS[2], 'chunk_len', 'draw', 'next', 'failed') "
	"if not c[1] then "
	"  if ARGV[3] == '' then return {1, '', '', '0', '0'} end "
	"  redis.call('HSET', KEYS[2], 'chunk_len', ARGV[3], 'draw', ARGV[4], 'next', '0', 'failed', ARGV[6]) "
	"  redis.call('PEXPIRE', KEYS[2], ARGV[2]) "
	"  return {1, ARGV[3], ARGV[4], '0', ARGV[6]} end "
	"if ARGV[5] == '1' and c[3] ~= '0' then redis.call('HSET', KEYS[2], 'next', '0') c[3] = '0' end "
	"if ARGV[6] == '1' then redis.call('HSET', KEYS[2], 'failed', '1') c[4] = '1' end "
	"return {1, c[1], c[2] or '', c[3] or '0', c[4] or '0'}";
/* ARGV[2] next, ARGV[3] failed; an expired proof is not brought back (it would have no TTL). */
static const char update_script[] =
	"local o = redis.call('HGET', KEYS[1], 'owner') "
	"if o ~= ARGV[1] then return {0, o or '', redis.call('PTTL', KEYS[1])} end "
	"if redis.call('EXISTS', KEYS[2]) == 0 then return {1, '', '', '0', '0'} end "
	"redis.call('HSET', KEYS[2], 'next', ARGV[2]) "
	"if ARGV[3] == '1' then redis.call('HSET', KEYS[2], 'failed', '1') end "
	"local c = redis.call('HMGET', KEYS[2], 'chunk_len', 'draw', 'next', 'failed') "
	"return {1, c[1] or '', c[2] or '', c[3] or '0', c[4] or '0'}";

struct challenge_call {
	challenge_cb *cb;
	void *data;
};

static int reply_str(const redisReply *rep, size_t i, const char **out)
{
	if (i >= rep->elements || rep->element[i]->type != REDIS_REPLY_STRING)
		return -1;
	*out = rep->element[i]->str;
	return 0;
}

/* "k1,k2" of chunk numbers from 2; anything else is no draw (never trusted blindly: Redis is
 * shared, so a value that does not parse ends the proof instead of asking for odd offsets). */
static int parse_draw(const char *s, struct challenge *c)
{
	c->count = 0;
	while (*s && c->count < CHALLENGE_CHUNKS) {
		char *end;
		unsigned long long k = strtoull(s, &end, 10);
		if (end == s || k < 2)
			return -1;
		c->chunk[c->count++] = k;
		s = *end == ',' ? end + 1 : end;
		if (*end != ',' && *end != '\0')
			return -1;
	}
	return *s == '\0' && c->count > 0 ? 0 : -1;
}

static void challenge_on_reply(redisAsyncContext *ctx, void *reply, void *privdata)
{
	(void)ctx;
	struct challenge_call *call = privdata;
	redisReply *rep = reply;
	enum lease_status status = LEASE_ERROR;
	struct challenge c;
	memset(&c, 0, sizeof(c));
	if (rep && rep->type == REDIS_REPLY_ARRAY && rep->elements >= 2 && rep->element[0]->type == REDIS_REPLY_INTEGER) {
		const char *len, *draw, *next, *failed;
		if (rep->element[0]->integer != 1) {
			status = LEASE_BUSY;
		} else if (reply_str(rep, 1, &len) == 0 && reply_str(rep, 2, &draw) == 0 && reply_str(rep, 3, &next) == 0 &&
		    reply_str(rep, 4, &failed) == 0) {
			status = LEASE_HELD;
			if (len[0]) {
				c.present = 1;
				c.chunk_len = strtoull(len, NULL, 10);
				c.next = atoi(next);
				c.failed = strcmp(failed, "0") != 0;
				if (c.chunk_len == 0 || parse_draw(draw, &c) < 0 || c.next < 0 || c.next > c.count) {
					log_warnx("redis: an instant-upload proof does not parse: it counts as failed");
					c.failed = 1;
				}
			}
		}
	} else if (rep && rep->type == REDIS_REPLY_ERROR) {
		log_warnx("redis: instant-upload proof script failed: %s", rep->str);
	}
	if (call->cb)
		call->cb(call->data, status, &c);
	free(call);
}

static int challenge_eval(struct rds *r, const char *script, const char *lease_key, const char *key, int argc,
    const char **extra, challenge_cb *cb, void *data)
{
	enum { FIXED = 6, MAX_EXTRA = 5 };
	struct challenge_call *call = malloc(sizeof(*call));
	if (call == NULL || argc > MAX_EXTRA) {
		free(call);
		return -1;
	}
	call->cb = cb;
	call->data = data;
	const char *argv[FIXED + MAX_EXTRA] = { "EVAL", script, "2", lease_key, key, lease_owner() };
	size_t argvlen[FIXED + MAX_EXTRA];
	for (int i = 0; i < argc; i++)
		argv[FIXED + i] = extra[i];
	for (int i = 0; i < FIXED + argc; i++)
		argvlen[i] = strlen(argv[i]);
	if (rds_command_argv(r, challenge_on_reply, call, FIXED + argc, argv, argvlen) < 0) {
		free(call);
		return -1;
	}
	return 0;
}

int challenge_get(struct rds *r, const char *lease_key, const char *key, long ttl_ms,
    const struct challenge *proposal, int restart, int mismatch, challenge_cb *cb, void *data)
{
	char ttl[24], len[24] = "", draw[CHALLENGE_CHUNKS * 21 + 1] = "";
	snprintf(ttl, sizeof(ttl), "%ld", ttl_ms);
	if (proposal) {
		snprintf(len, sizeof(len), "%" PRIu64, proposal->chunk_len);
		size_t n = 0;
		for (int i = 0; i < proposal->count; i++)
			n += (size_t)snprintf(draw + n, sizeof(draw) - n, "%s%" PRIu64, i ? "," : "", proposal->chunk[i]);
	}
	const char *extra[] = { ttl, len, draw, restart ? "1" : "0", mismatch ? "1" : "0" };
	return challenge_eval(r, get_script, lease_key, key, 5, extra, cb, data);
}

int challenge_update(struct rds *r, const char *lease_key, const char *key, int next, int failed,
    challenge_cb *cb, void *data)
{
	char n[16];
	snprintf(n, sizeof(n), "%d", next);
	const char *extra[] = { n, failed ? "1" : "0" };
	return challenge_eval(r, update_script, lease_key, key, 2, extra, cb, data);
}

/* storage_record.c: an upload's records in Redis: progress while uploading, published afterwards, read back for a resent final chunk. */
#include "config.h"
#include "storage.h"
#include "storage_int.h"
#include "backend.h"
#include "buf.h"
#include "conf.h"
#include "digest.h"
#include "ipc.h"
#include "json.h"
#include "lease.h"
#include "link.h"
#include "log.h"
#include "escape.h"
#include "pg.h"
#include "pool.h"
#include "proto.h"
#include "rds.h"
#include "signals.h"
#include "stats.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <sodium.h>
#include <uthash.h>

/* ---------------------------------------------------------------- progress records */

void record_key(const struct storage *st, const struct upload_key *k, char *out, size_t outlen)
{
	snprintf(out, outlen, "%sfile_upload_%" PRIu64 "_%s", st->conf->redis_prefix, k->uid, k->md5);
}

void lease_key(const struct storage *st, const struct upload_key *k, char *out, size_t outlen)
{
	snprintf(out, outlen, "%sfile_lease_%" PRIu64 "_%s", st->conf->redis_prefix, k->uid, k->md5);
}

void challenge_key(const struct storage *st, const struct upload_key *k, char *out, size_t outlen)
{
	snprintf(out, outlen, "%sfile_challenge_%" PRIu64 "_%s", st->conf->redis_prefix, k->uid, k->md5);
}

/* The record is written only while this node holds the lease (lease_fenced_command). */
static void record_on_reply(void *data, enum lease_status status, uint64_t fence, const char *holder,
    long remaining_ms)
{
	(void)fence;
	(void)remaining_ms;
	struct upload *up = data;
	up->record_inflight = 0;
	int ok = status == LEASE_HELD;
	if (status == LEASE_ERROR)
		up->record_dirty = 1;   /* written again when Redis is back */
	struct op *op = up->head;
	/* seq 1 is answered only once its record is stored. */
	if (up->awaiting_record && !up->retired) {
		up->awaiting_record = 0;
		up->running = 0;
		up->head = op->next;
		if (up->head == NULL)
			up->tail = NULL;
		if (ok)
			op_answer(op, ERR_OK, NULL, up);
		else
			op_answer(op, ERR_BUSY, "server busy: cannot record the upload, retry", NULL);
	}
	if (status == LEASE_BUSY && !up->retired)
		upload_lost(up, holder);
	if (up->record_dirty && ok && !up->retired)
		record_write_soon(up);
	int retired = up->retired;
	upload_unpin(up);
	if (!retired)
		upload_run(up);
}

/* The fields every upload record has (protocol.md, Redis keys), in the storage's JSON writer. */
static void record_fields(struct upload *up, const char *state)
{
	struct storage *st = up->st;
	struct json_writer *jw = &st->jw;
	json_begin(jw);
	json_put_str(jw, "name", up->name, up->name_len);
	json_put_str(jw, "kind", up->kind == UPLOAD_AVATAR ? "avatar" : "file", up->kind == UPLOAD_AVATAR ? 6 : 4);
	json_put_int(jw, "uid", (int64_t)up->key.uid);
	json_put_str(jw, "md5", up->key.md5, PROTO_MD5_HEX);
	json_put_int(jw, "seq", (int64_t)up->seq);
	json_put_int(jw, "total_size", (int64_t)up->total_size);
	json_put_int(jw, "trans_size", (int64_t)up->committed);
	json_put_str(jw, "node", st->conf->node, strlen(st->conf->node));
	json_put_int(jw, "updated", (int64_t)time(NULL));
	json_put_str(jw, "state", state, strlen(state));
}

/* Stores the newest progress; at most one write per upload is in flight. */
void record_write(struct upload *up)
{
	struct storage *st = up->st;
	if (!up->exists || up->retired)
		return;
	if (up->record_inflight || !st->redis.ready) {
		up->record_dirty = 1;
		return;
	}
	char key[RECORD_KEY_MAX];
	record_key(st, &up->key, key, sizeof(key));
	struct json_writer *jw = &st->jw;
	const uint8_t *body;
	size_t len;
	record_fields(up, "uploading");
	json_end(jw, &body, &len);
	char lkey[LEASE_KEY_MAX], ttl[16];
	lease_key(st, &up->key, lkey, sizeof(lkey));
	snprintf(ttl, sizeof(ttl), "%d", st->conf->upload_ttl);
	const char *argv[] = { "SETEX", key, ttl, (const char *)body };
	size_t argvlen[] = { 5, strlen(key), strlen(ttl), len };
	if (up->lease != UL_OURS ||
	    lease_fenced_command(&st->redis, lkey, 4, argv, argvlen, record_on_reply, up) < 0) {
		up->record_dirty = 1;
		return;
	}
	up->record_dirty = 0;
	up->record_inflight = 1;
	up->record_sent = ev_now(st->loop);
	up->pins++;
}

/* Progress after a chunk trails its answer by at most RECORD_INTERVAL seconds (protocol.md §8
 * allows a trailing record): one SETEX and one Redis reply waking the loop per interval, not one
 * per chunk. The newest state is still what ends up written. */
#define RECORD_INTERVAL 0.1

static void record_on_timer(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)loop;
	(void)revents;
	struct upload *up = t->data;
	if (up->record_dirty && !up->record_inflight)
		record_write(up);
}

void record_timer_init(struct upload *up)
{
	ev_timer_init(&up->record_timer, record_on_timer, 0., 0.);
	up->record_timer.data = up;
}

void record_timer_stop(struct upload *up)
{
	ev_timer_stop(up->st->loop, &up->record_timer);
}

/* record_write, held back until RECORD_INTERVAL after the last write. */
void record_write_soon(struct upload *up)
{
	struct storage *st = up->st;
	if (!up->exists || up->retired)
		return;
	ev_tstamp wait = up->record_sent + RECORD_INTERVAL - ev_now(st->loop);
	if (up->record_inflight || !st->redis.ready || wait <= 0.) {
		record_write(up);   /* in flight or away: marked dirty, written after the reply or reconnect */
		return;
	}
	up->record_dirty = 1;
	if (!ev_is_active(&up->record_timer)) {
		ev_timer_set(&up->record_timer, wait, 0.);
		ev_timer_start(st->loop, &up->record_timer);
	}
}

/* After publishing, the record stays for upload_ttl as "published" with the file's version (as the
 * backend names it), so that a final chunk resent by a client that lost the answer
 * is answered 0 by any node sharing this Redis, as long as the name still holds that file. */
void record_published(struct upload *up)
{
	struct storage *st = up->st;
	char key[RECORD_KEY_MAX];
	record_key(st, &up->key, key, sizeof(key));
	struct json_writer *jw = &st->jw;
	const uint8_t *body;
	size_t len;
	record_fields(up, "published");
	json_put_str(jw, "version", up->pub_version, strlen(up->pub_version));
	json_end(jw, &body, &len);
	if (rds_command(&st->redis, NULL, NULL, "SETEX %s %d %b", key, st->conf->upload_ttl, body, len) < 0)
		rds_command(&st->redis, NULL, NULL, "DEL %s", key);   /* never leave the in-progress record */
}

/* The published record for a final chunk found published by its MD5 (the upload itself is gone
 * from memory, so its fields come from the request). */
void record_published_op(struct upload *up, const struct op *op)
{
	memcpy(up->name, op->name, op->name_len);
	up->name_len = op->name_len;
	up->kind = op->kind;
	up->total_size = up->committed = op->total_size;
	up->seq = op->seq;
	up->pub_size = op->total_size;
	record_published(up);
	up->pub_by_digest = 0;
}

void record_delete(struct upload *up)
{
	char key[RECORD_KEY_MAX];
	record_key(up->st, &up->key, key, sizeof(key));
	rds_command(&up->st->redis, NULL, NULL, "DEL %s", key);
}

/* The upload cannot be resumed any more (its staging entry is gone): its "uploading" record goes
 * too, while this node holds the lease, so that nothing is asked of it again. */
void record_forget(struct upload *up)
{
	struct storage *st = up->st;
	if (up->lease != UL_OURS)
		return;
	char key[RECORD_KEY_MAX], lkey[LEASE_KEY_MAX];
	record_key(st, &up->key, key, sizeof(key));
	lease_key(st, &up->key, lkey, sizeof(lkey));
	const char *argv[] = { "DEL", key };
	size_t argvlen[] = { 3, strlen(key) };
	lease_fenced_command(&st->redis, lkey, 2, argv, argvlen, NULL, NULL);
}

/* Redis (re)connected: it may have come back empty, without the records or the leases, or be a
 * replica promoted before it saw the latest writes. Every upload this node is driving takes its
 * lease again: the same fence means nothing changed and the record is written again; another fence
 * means it is read back from the staging entry first. A parked upload (lease given back, nothing
 * queued) is only taken back if this node was its last holder (upload_lease_reclaim): after a
 * failover every node that ever served a hopping upload would otherwise race for its lease and
 * keep it, making the node its client comes back to wait. */
void storage_on_redis_ready(struct rds *r)
{
	struct storage *st = r->data;
	struct upload *up, *tmp;
	HASH_ITER(hh, st->uploads, up, tmp) {
		if (!up->exists || !up->loaded || up->retired)
			continue;
		if (up->parked && up->lease == UL_NONE && !up->head && !up->running && !up->loading) {
			upload_lease_reclaim(up);
			continue;
		}
		up->reload_now = 1;
		if (up->lease != UL_ASKING && !up->running && !up->loading)
			upload_lease_ask(up);
	}
}

/* ---------------------------------------------------------------- final chunk resent after publishing */

/* Does the Redis record say this upload was published under the op's name, size and kind? */
static int published_match(struct upload *up, const struct op *op, const char *text, size_t len)
{
	char err[64];
	yajl_val v = json_parse_object((const uint8_t *)text, len, err, sizeof(err));
	if (v == NULL)
		return 0;
	const char *state, *name, *kind, *version;
	size_t state_len, name_len, kind_len, version_len;
	uint64_t total;
	const char *want_kind = op->kind == UPLOAD_AVATAR ? "avatar" : "file";
	int same = json_get_str(v, "state", &state, &state_len) == JSON_FIELD_OK &&
	    json_get_str(v, "name", &name, &name_len) == JSON_FIELD_OK && name_len == op->name_len &&
	    memcmp(name, op->name, name_len) == 0 &&
	    json_get_str(v, "kind", &kind, &kind_len) == JSON_FIELD_OK && kind_len == strlen(want_kind) &&
	    memcmp(kind, want_kind, kind_len) == 0 &&
	    json_get_u64(v, "total_size", UINT64_MAX, &total) == JSON_FIELD_OK && total == op->total_size;
	int ok = 0;
	up->pub_by_digest = 0;
	if (same && state_len == 9 && memcmp(state, "published", 9) == 0 &&
	    json_get_str(v, "version", &version, &version_len) == JSON_FIELD_OK && version_len > 0 &&
	    version_len < BACKEND_VERSION_MAX) {
		up->pub_size = total;
		memcpy(up->pub_version, version, version_len);
		up->pub_version[version_len] = '\0';
		ok = 1;
	} else if (same && state_len == 9 && memcmp(state, "uploading", 9) == 0) {
		/* The staging entry is gone but the record says the upload was live: a storage process
		 * died between publishing and recording it. Only the file's own MD5 can tell. */
		up->pub_size = total;
		up->pub_version[0] = '\0';
		up->pub_by_digest = 1;
		ok = 1;
	}
	yajl_tree_free(v);
	return ok;
}

static void published_on_reply(redisAsyncContext *c, void *reply, void *privdata)
{
	(void)c;
	struct upload *up = privdata;
	redisReply *rep = reply;
	struct op *op = up->head;
	if (up->retired || up->st->stopping) {
		upload_unpin(up);
		return;
	}
	if (rep && rep->type == REDIS_REPLY_STRING && published_match(up, op, rep->str, rep->len)) {
		upload_start_work(up, WORK_VERIFY);   /* the file itself is looked at on a disk thread */
		upload_unpin(up);
		return;
	}
	upload_pop(up);
	if (rep == NULL || rep->type == REDIS_REPLY_ERROR)   /* no answer is not "never published" */
		op_answer(op, ERR_BUSY, "server busy: progress store unavailable, retry", NULL);
	else
		op_answer(op, ERR_FILE_NOT_EXISTS, "no upload in progress: start at seq 1", NULL);
	upload_unpin(up);
	upload_run(up);
}

/* A chunk that ends the file arrived for no upload in progress: maybe the client lost the answer to
 * the final chunk. The record (any node's) tells whether that file was published. */
int published_lookup(struct upload *up)
{
	char key[RECORD_KEY_MAX];
	record_key(up->st, &up->key, key, sizeof(key));
	if (rds_command(&up->st->redis, published_on_reply, up, "GET %s", key) < 0)
		return -1;
	up->running = 1;
	up->pins++;
	return 0;
}

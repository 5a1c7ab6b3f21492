/* storage.c: the storage process: writes upload chunks in order per file, records progress, publishes. */
#include "config.h"
#include "storage.h"
#include "backend.h"
#include "buf.h"
#include "conf.h"
#include "digest.h"
#include "ipc.h"
#include "json.h"
#include "lease.h"
#include "log.h"
#include "escape.h"
#include "pg.h"
#include "pool.h"
#include "proto.h"
#include "rds.h"
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
#include <time.h>
#include <unistd.h>
#include <sodium.h>
#include <uthash.h>

#define PENDING_DIR ".pending"
#define READ_CHUNK (256 * 1024)
#define HASH_BLOCK (1024 * 1024)
#define ACCEPT_PAUSE 0.5        /* seconds without accepting after EMFILE/ENFILE */
#define SPACE_INTERVAL 2.0      /* seconds between statvfs of the root */

/* A worker connected over the Unix socket. */
struct client {
	struct storage *st;
	int fd;
	ev_io io;
	struct buf in, out;
	int dead;          /* the link is closed; answers are dropped */
	int refs;          /* ops still holding this client */
	struct client *next;
	/* A chunk message being received straight into its own block, which becomes
	 * the op's data: the chunk is not copied again in user space. NULL when none. */
	uint8_t *block;
	struct ipc_header block_header;
	size_t block_got;
};

enum op_type { OP_CHUNK, OP_SYNC, OP_SWEEP };   /* OP_SWEEP: the janitor, no client */

/* One request from a worker, queued on its upload. */
struct op {
	enum op_type type;
	struct client *client;
	uint64_t reqid;
	uint64_t seq, trans_size, total_size, offset;
	int last, kind;
	char name[PROTO_NAME_MAX + 1];
	uint16_t name_len;
	uint32_t data_len;
	const uint8_t *data;          /* the chunk, inside block */
	uint8_t *block;               /* the received message payload, freed with the op */
	int retried;                  /* run again once after the upload was read back */
	struct op *next;
};

struct upload_key {
	uint64_t uid;
	char md5[PROTO_MD5_HEX + 1];
};

enum disk_work { WORK_START, WORK_WRITE, WORK_HASH, WORK_COMPLETE, WORK_DISCARD, WORK_VERIFY, WORK_LOAD,
	WORK_CHECK, WORK_CHALLENGE, WORK_LINK };

/* Chunks asked for at random offsets before an upload is published from stored content: with
 * chunk 1, at most three chunks are answered (design.md, "Instant upload"). */
#define DEDUP_CHALLENGES 2

/* Where this node stands with an upload's lease (lease.h). */
enum upload_lease { UL_NONE, UL_ASKING, UL_OURS };

/* An upload of (uid, md5): its staging file, its progress and its queue of requests. */
struct upload {
	UT_hash_handle hh;
	struct upload_key key;
	struct storage *st;
	int exists;                   /* seq 1 was written: a staging file and meta exist */
	char name[PROTO_NAME_MAX + 1];
	uint16_t name_len;
	int kind;
	uint64_t total_size;
	uint64_t committed;           /* bytes in the staging file, contiguous from 0 */
	uint64_t seq;                 /* the chunk that last advanced committed */
	uint64_t chunk_len;           /* length of chunk 1, to rebuild seq after a restart */
	time_t touched;
	struct backend_staging *stg;  /* staging entry: created by seq 1 or attached by recovery */
	struct md5 md5;               /* incremental hash of [0, hashed) */
	uint64_t hashed;
	int hash_dirty;               /* hashed bytes were overwritten with other data: re-read at the end */
	struct op *head, *tail;       /* requests in arrival order; head is the one running */
	int running;                  /* head is on a disk thread or waiting for Redis */
	int pins;                     /* async work (disk, Redis) still referring to this upload */
	int retired;                  /* out of the table; freed when pins reach 0 */
	int record_inflight, record_dirty;
	int awaiting_record;          /* the running seq 1 is answered when its record is stored */
	int published;                /* moved to its final path: the staging file is gone */
	int xfer;                     /* entry in the stats transfer table, -1 if none */
	/* Chunk n starts at anchor_offset + (n - anchor_seq) * chunk_len; the anchor moves only when
	 * a client resumes at a committed size that is not on a chunk boundary (after a restart). */
	uint64_t anchor_seq, anchor_offset;
	int counted;                  /* counted in the limits of uploads in progress */
	uint64_t left_accounted;      /* its share of storage.announced_left */
	/* The published file a resent final chunk is checked against (from the Redis record). */
	uint64_t pub_size;
	char pub_version[BACKEND_VERSION_MAX];
	/* The record still said uploading: the file at the name is hashed instead (a crash between
	 * publishing and recording it). */
	int pub_by_digest;
	/* The disk job of the running op. */
	struct pool_job job;
	enum disk_work work;
	int work_errno;
	int work_error;               /* proto error set by the job */
	/* Several nodes share the storage: the lease in Redis makes this node the upload's one
	 * writer, and its fence goes with every staging change (design.md, "Several nodes"). */
	int lease;                    /* enum upload_lease */
	uint64_t fence;               /* of the lease held */
	ev_tstamp lease_until;        /* no staging change starts after this unless renewed */
	ev_tstamp lease_asked, renew_asked;
	ev_tstamp wait_since;         /* since when the lease is held elsewhere; 0 when not waiting */
	int renewing;                 /* a renew is in flight */
	ev_timer lease_timer;         /* renews while held; asks again while held elsewhere */
	int loaded;                   /* progress is the shared truth: started here or read back */
	int loading;                  /* WORK_LOAD is reading the staging entry back */
	int release_wanted;           /* the client that drove it left, or the janitor looked at it */
	int reload_now;               /* Redis came back: take the lease again and record (or read back) at once */
	int parked;                   /* its lease was given back while what is in memory stayed */
	int check_hold;               /* taken back with the same fence: confirm with the storage first */
	ev_tstamp active;             /* last request: an idle upload lets its lease go */
	struct backend_entry load;    /* what WORK_LOAD found */
	/* Instant upload: chunk 1 matched content already stored; the chunks challenge[] (numbers
	 * from 2, chosen at random) are asked for next, compared with that content and not stored.
	 * In memory only: on another node the upload simply goes on as a normal one. */
	int dd_match;                 /* set by WORK_START / WORK_CHALLENGE: the bytes matched */
	int dd_challenging;           /* answers ask for challenge[dd_next] instead of committed */
	int dd_count, dd_next;
	uint64_t challenge[DEDUP_CHALLENGES];
	uint64_t dd_received;         /* file bytes the client sent for this proof */
	int dd_linked;                /* published from stored content */
};

/* Uploads in progress of one uid, for max_uploads_per_user. */
struct user_count {
	UT_hash_handle hh;
	uint64_t uid;
	unsigned n;
};

/* statvfs of the root, run on a pool thread so the loop never waits for the file system. */
struct space_probe {
	struct pool_job job;
	struct storage *st;
	int busy;
	uint64_t avail;
	int ok;
};

/* The backend's ping, on a pool thread (the agent-check answers down while it fails or hangs). */
struct health_probe {
	struct pool_job job;
	struct storage *st;
	int busy;
	ev_tstamp started, last;
	int err;
	int unreachable;              /* as last published to the stats slot */
};

struct sweep;

struct storage {
	struct ev_loop *loop;
	const struct conf *conf;
	int listen_fd;
	ev_io accept_io;
	ev_signal sig_term, sig_int, sig_quit, sig_usr1;
	ev_timer janitor;
	ev_timer accept_pause;        /* accepts stopped for a moment after EMFILE/ENFILE */
	ev_timer space_timer;
	struct space_probe space;
	ev_timer health_timer;
	struct health_probe health;
	struct sweep *sweep;          /* the janitor's listing of old staging entries */
	uint64_t free_bytes;          /* available to us on the root's file system, as last measured */
	int free_known;
	uint64_t announced_left;      /* bytes still to come of every upload in progress */
	unsigned uploads_counted;
	struct user_count *users;
	struct client *clients;
	struct upload *uploads;       /* uthash table by key */
	struct rds redis;
	struct pg *pg;
	struct pool *pool;
	struct json_writer jw;
	struct backend backend;       /* staging and published files */
	char pending[600];
	int stopping;                 /* the loop has ended: start no new work */
};

static void upload_run(struct upload *up);
static void upload_uncount(struct upload *up);
static void op_dispatch(struct storage *st, struct op *op, const struct upload_key *key);

/* ---------------------------------------------------------------- paths and errors */

static int errno_to_error(int err)
{
	switch (err) {
	case ENOSPC:
	case EDQUOT:
	case EFBIG:
		return ERR_STORAGE_FULL;
	case EACCES:
	case EPERM:
	case EROFS:
		return ERR_WRITE_PERMISSION;
	case ESTALE:
		return ERR_BUSY;   /* fenced out: another writer holds the upload now */
	case ETIMEDOUT:
		return ERR_BUSY;   /* a storage cluster that did not answer in time (RADOS): retry */
	default:
		return ERR_WRITE_PERMISSION;
	}
}

/* ---------------------------------------------------------------- answers */

static void client_release(struct client *cl);

static void client_flush(struct client *cl)
{
	while (buf_len(&cl->out) > 0) {
		ssize_t n = send(cl->fd, buf_head(&cl->out), buf_len(&cl->out), MSG_NOSIGNAL);
		if (n > 0)
			buf_consume(&cl->out, (size_t)n);
		else if (n < 0 && errno == EINTR)
			continue;
		else
			break;   /* EAGAIN: the write watcher goes on; errors: the read side closes */
	}
	int events = EV_READ | (buf_len(&cl->out) ? EV_WRITE : 0);
	if ((cl->io.events & (EV_READ | EV_WRITE)) != events) {
		ev_io_stop(cl->st->loop, &cl->io);
		ev_io_set(&cl->io, cl->fd, events);
		ev_io_start(cl->st->loop, &cl->io);
	}
}

/* Sends the result of op to its worker; the op itself stays until op_free. */
static void op_reply(struct op *op, int error, const char *message, const struct upload *up)
{
	struct client *cl = op->client;
	if (error && op->type == OP_CHUNK && error != ERR_USER_UPLOADS && error != ERR_SERVER_UPLOADS)
		STAT_INC(uploads_failed);
	if (cl && !cl->dead) {
		struct ipc_result r = { .error = (uint32_t)error };
		if (up && up->exists && up->dd_challenging && error == ERR_OK && op->type == OP_CHUNK) {
			/* (A sync answers what is held: 1006 never claims bytes that are not stored.) */
			/* Ask for chunk k: the client seeks to (k - 1) * chunk and sends seq k. */
			uint64_t k = up->challenge[up->dd_next];
			r.seq = k - 1;
			r.trans_size = (k - 1) * up->chunk_len;
			r.total_size = up->total_size;
			r.name = up->name;
			r.name_len = up->name_len;
		} else if (up && up->exists) {
			r.seq = up->seq;
			r.trans_size = up->committed;
			r.total_size = up->total_size;
			r.name = up->name;
			r.name_len = up->name_len;
		} else {
			r.total_size = op->total_size;
			r.seq = op->seq;
		}
		if (message) {
			r.message = message;
			r.message_len = (uint16_t)strlen(message);
		}
		if (ipc_encode_result(&cl->out, op->reqid, &r) == 0)
			client_flush(cl);
	}
}

static void op_free(struct op *op)
{
	STAT_DEC(storage_queue);
	if (op->client)
		client_release(op->client);
	free(op->block);
	free(op);
}

static void op_answer(struct op *op, int error, const char *message, const struct upload *up)
{
	op_reply(op, error, message, up);
	op_free(op);
}

/* ---------------------------------------------------------------- progress records in Redis */

/* <prefix>file_upload_<uid>_<md5>: sized for the longest prefix and uid, never cut. */
#define RECORD_KEY_MAX (sizeof(((struct conf *)0)->redis_prefix) + sizeof("file_upload__") + 20 + PROTO_MD5_HEX)

static void record_key(const struct storage *st, const struct upload_key *k, char *out, size_t outlen)
{
	snprintf(out, outlen, "%sfile_upload_%" PRIu64 "_%s", st->conf->redis_prefix, k->uid, k->md5);
}

#define LEASE_KEY_MAX (sizeof(((struct conf *)0)->redis_prefix) + sizeof("file_lease__") + 20 + PROTO_MD5_HEX)

static void lease_key(const struct storage *st, const struct upload_key *k, char *out, size_t outlen)
{
	snprintf(out, outlen, "%sfile_lease_%" PRIu64 "_%s", st->conf->redis_prefix, k->uid, k->md5);
}

static void upload_unpin(struct upload *up)
{
	if (--up->pins == 0 && up->retired) {
		up->st->backend.ops->staging_close(up->stg);
		md5_free(&up->md5);
		free(up);
	}
}

static void record_write(struct upload *up);

static void upload_lost(struct upload *up, const char *holder);

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
		record_write(up);
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
static void record_write(struct upload *up)
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
	up->pins++;
}

/* After publishing, the record stays for upload_ttl as "published" with the file's version (as the
 * backend names it), so that a final chunk resent by a client that lost the answer
 * is answered 0 by any node sharing this Redis, as long as the name still holds that file. */
static void record_published(struct upload *up)
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
static void record_published_op(struct upload *up, const struct op *op)
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

static void record_delete(struct upload *up)
{
	char key[RECORD_KEY_MAX];
	record_key(up->st, &up->key, key, sizeof(key));
	rds_command(&up->st->redis, NULL, NULL, "DEL %s", key);
}

static void upload_lease_ask(struct upload *up);

/* Redis (re)connected: it may have come back empty, without the records or the leases. Every upload
 * this node knows takes its lease again: the same fence means nothing changed and the record is
 * written again; another fence means it is read back from the staging entry first. */
static void storage_on_redis_ready(struct rds *r)
{
	struct storage *st = r->data;
	struct upload *up, *tmp;
	HASH_ITER(hh, st->uploads, up, tmp) {
		if (up->exists && up->loaded && !up->retired) {
			up->reload_now = 1;
			if (up->lease != UL_ASKING && !up->running && !up->loading)
				upload_lease_ask(up);
		}
	}
}

/* ---------------------------------------------------------------- disk work (pool threads) */

/* Before a chunk overwrites bytes already hashed: if they differ, the running MD5 is stale
 * and the whole file is read again at the end. */
static void check_rewrite(struct upload *up, const struct op *op)
{
	if (up->hash_dirty || op->offset >= up->hashed || op->data_len == 0)
		return;
	uint64_t end = op->offset + op->data_len;
	size_t n = (size_t)((end < up->hashed ? end : up->hashed) - op->offset);
	uint8_t *old = malloc(n);
	size_t got = 0;
	if (old == NULL || up->st->backend.ops->staging_read(up->stg, old, n, op->offset, &got) != 0 || got != n ||
	    memcmp(old, op->data, n) != 0)
		up->hash_dirty = 1;
	free(old);
}

/* Feeds the incremental MD5 with the part of a written chunk beyond what is hashed. */
static void hash_chunk(struct upload *up, const struct op *op)
{
	uint64_t end = op->offset + op->data_len;
	if (up->hash_dirty || end <= up->hashed)
		return;
	if (up->md5.ctx == NULL) {
		up->hash_dirty = 1;   /* no running hash (never started): read the file at the end */
		return;
	}
	if (op->offset > up->hashed) {
		up->hash_dirty = 1;   /* cannot happen: gaps are refused */
		return;
	}
	uint64_t skip = up->hashed - op->offset;   /* equal to what is hashed: check_rewrite said so */
	md5_update(&up->md5, op->data + skip, (size_t)(op->data_len - skip));
	up->hashed = end;
}

static int hash_staging(const struct backend *be, struct backend_staging *stg, uint64_t size,
    char out[PROTO_MD5_HEX + 1])
{
	struct md5 ctx = { NULL };
	uint8_t *block = malloc(HASH_BLOCK);
	if (block == NULL || md5_init(&ctx) < 0) {
		free(block);
		md5_free(&ctx);
		return ENOMEM;
	}
	uint64_t off = 0;
	while (off < size) {
		size_t want = size - off < HASH_BLOCK ? (size_t)(size - off) : HASH_BLOCK;
		size_t got = 0;
		int err = be->ops->staging_read(stg, block, want, off, &got);
		if (err || got == 0) {
			free(block);
			md5_free(&ctx);
			return err ? err : EIO;
		}
		md5_update(&ctx, block, got);
		off += got;
	}
	free(block);
	md5_final_hex(&ctx, out);
	md5_free(&ctx);
	return 0;
}

/* The version of the file published under name (empty when it cannot be opened): a resent final
 * chunk is answered 0 only while the name still holds that version. */
static void published_identity(const struct backend *be, uint64_t uid, const char *name, size_t name_len,
    uint64_t *size, char version[BACKEND_VERSION_MAX])
{
	struct backend_file *f = NULL;
	version[0] = '\0';
	*size = 0;
	if (be->ops->file_open(be, uid, name, name_len, &f, size, version) != 0)
		version[0] = '\0';
	be->ops->file_close(f);
}

/* Is the file published under name exactly size bytes with this MD5? Its version goes to version.
 * 0 when it is; an errno (or EILSEQ for other bytes) when not. */
static int hash_published(const struct backend *be, uint64_t uid, const char *name, size_t name_len,
    uint64_t size, const char *md5_hex, char version[BACKEND_VERSION_MAX])
{
	struct backend_file *f = NULL;
	uint64_t have = 0;
	int err = be->ops->file_open(be, uid, name, name_len, &f, &have, version);
	if (err)
		return err;
	struct md5 ctx = { NULL };
	uint8_t *block = have == size ? malloc(HASH_BLOCK) : NULL;
	if (block == NULL || md5_init(&ctx) < 0)
		err = have == size ? ENOMEM : EILSEQ;
	for (uint64_t off = 0; err == 0 && off < size;) {
		size_t want = size - off < HASH_BLOCK ? (size_t)(size - off) : HASH_BLOCK, got = 0;
		err = be->ops->file_read(f, block, want, off, &got);
		if (err == 0 && got == 0)
			err = EIO;
		if (err == 0)
			md5_update(&ctx, block, got);
		off += got;
	}
	char hex[PROTO_MD5_HEX + 1];
	if (err == 0) {
		md5_final_hex(&ctx, hex);
		if (strcasecmp(hex, md5_hex) != 0)
			err = EILSEQ;
	}
	md5_free(&ctx);
	free(block);
	be->ops->file_close(f);
	if (err)
		version[0] = '\0';
	return err;
}

/* ---------------------------------------------------------------- instant upload (disk side) */

static int dedup_enabled(const struct storage *st)
{
	return st->conf->dedup != DEDUP_OFF && st->backend.ops->content_open != NULL &&
	    st->backend.ops->publish_from_content != NULL;
}

static void content_key(const struct upload *up, uint64_t total_size, struct backend_content_key *key)
{
	memset(key, 0, sizeof(*key));
	key->per_user = up->st->conf->dedup == DEDUP_USER;
	key->owner = up->key.uid;
	key->size = total_size;
	memcpy(key->md5, up->key.md5, sizeof(key->md5));
}

/* Do len bytes of the stored content of key at offset equal data? 0 when there is no such content. */
static int content_equals(const struct upload *up, uint64_t total_size, uint64_t offset, const uint8_t *data,
    size_t len)
{
	const struct backend *be = &up->st->backend;
	struct backend_content_key key;
	content_key(up, total_size, &key);
	struct backend_file *f = NULL;
	uint64_t size;
	if (be->ops->content_open(be, &key, &f, &size) != 0)
		return 0;
	uint8_t *buf = malloc(len ? len : 1);
	size_t got = 0;
	int same = buf && size == total_size && offset <= size && len <= size - offset &&
	    be->ops->file_read(f, buf, len, offset, &got) == 0 && got == len &&
	    sodium_memcmp(buf, data, len) == 0;
	free(buf);
	be->ops->file_close(f);
	return same;
}

/* Publishes the upload's name from the stored content instead of its staging entry (which goes). */
static int work_link(struct upload *up)
{
	struct storage *st = up->st;
	const struct backend *be = &st->backend;
	struct backend_content_key key;
	content_key(up, up->total_size, &key);
	int flags = 0;
	int err = be->ops->publish_from_content(up->stg, &key, up->fence, &flags);
	if (flags & BACKEND_PUBLISHED)
		up->published = 1;
	if (err) {
		up->work_errno = err;
		if (flags & BACKEND_PATH_FAILED)
			up->work_error = ERR_CREATE_PATH;
		else if (flags & BACKEND_PUBLISHED)
			up->work_error = ERR_WRITE_PERMISSION;
		return -1;
	}
	up->dd_linked = 1;
	published_identity(be, up->key.uid, up->name, up->name_len, &up->pub_size, up->pub_version);
	if (up->kind == UPLOAD_AVATAR) {
		err = pg_pending_write(st->pending, up->key.uid, up->name, up->name_len);
		if (err) {
			up->work_errno = err;
			up->work_error = ERR_WRITE_PERMISSION;
		}
	}
	return 0;
}

/* A file of one chunk arrived whole: if the same bytes are stored, its name shares them. */
static int single_chunk_linked(struct upload *up)
{
	const struct backend *be = &up->st->backend;
	if (!dedup_enabled(up->st) || up->total_size != up->chunk_len || up->total_size == 0)
		return 0;
	uint8_t *data = malloc((size_t)up->total_size);
	size_t got = 0;
	int same = data && be->ops->staging_read(up->stg, data, (size_t)up->total_size, 0, &got) == 0 &&
	    got == up->total_size && content_equals(up, up->total_size, 0, data, (size_t)up->total_size);
	free(data);
	if (!same)
		return 0;
	if (work_link(up) == 0 || up->published)
		return 1;
	up->work_errno = 0;   /* not published: the staging entry is published as usual */
	up->work_error = 0;
	return 0;
}

static void work_complete(struct upload *up)
{
	struct storage *st = up->st;
	const struct backend *be = &st->backend;
	if ((up->work_errno = be->ops->staging_sync(up->stg, BACKEND_SYNC_PUBLISH)) != 0)
		return;
	char digest[PROTO_MD5_HEX + 1];
	if (up->hash_dirty || up->hashed != up->total_size || up->md5.ctx == NULL) {
		up->work_errno = hash_staging(be, up->stg, up->total_size, digest);
		if (up->work_errno)
			return;
	} else {
		md5_final_hex(&up->md5, digest);
	}
	/* The running hash is used up: should publishing fail below, a resent last chunk re-reads the file. */
	up->hash_dirty = 1;
	if (strcmp(digest, up->key.md5) != 0) {
		up->work_error = ERR_CHECKSUM;
		be->ops->staging_discard(up->stg, up->fence);
		return;
	}
	if (single_chunk_linked(up))
		return;
	int flags = 0;
	int err;
	if (st->conf->dedup != DEDUP_OFF && be->ops->publish_indexed) {
		struct backend_content_key key;
		content_key(up, up->total_size, &key);
		err = be->ops->publish_indexed(up->stg, &key, up->fence, &flags);
	} else {
		err = be->ops->publish(up->stg, up->fence, &flags);
	}
	if (flags & BACKEND_PUBLISHED)
		up->published = 1;
	if (err) {
		up->work_errno = err;
		if (flags & BACKEND_PATH_FAILED)
			up->work_error = ERR_CREATE_PATH;
		else if (flags & BACKEND_PUBLISHED)
			up->work_error = ERR_WRITE_PERMISSION;   /* in place, but may not survive a power cut */
		return;
	}
	published_identity(be, up->key.uid, up->name, up->name_len, &up->pub_size, up->pub_version);
	if (up->kind == UPLOAD_AVATAR) {
		/* The icon queue stays on the local disk whatever the backend (design.md). */
		err = pg_pending_write(st->pending, up->key.uid, up->name, up->name_len);
		if (err) {
			/* The client hears of it: an icon update that is not on disk could be lost. */
			up->work_errno = err;
			up->work_error = ERR_WRITE_PERMISSION;
		}
	}
}

static void upload_work(struct pool_job *job)
{
	struct upload *up = (struct upload *)((char *)job - offsetof(struct upload, job));
	const struct backend *be = &up->st->backend;
	struct op *op = up->head;
	up->work_errno = 0;
	up->work_error = 0;
	switch (up->work) {
	case WORK_START: {
		struct backend_meta meta = { .uid = up->key.uid, .kind = op->kind, .total_size = op->total_size,
			.chunk_len = op->data_len, .name_len = op->name_len };
		memcpy(meta.md5, up->key.md5, sizeof(meta.md5));
		memcpy(meta.name, op->name, op->name_len + 1u);
		be->ops->staging_close(up->stg);
		up->stg = NULL;
		if ((up->work_errno = be->ops->staging_begin(&up->st->backend, &meta, up->fence, &up->stg)) != 0)
			return;
		if (md5_init(&up->md5) < 0) {
			up->work_errno = ENOMEM;
			return;
		}
		up->hashed = 0;
		up->hash_dirty = 0;
		/* Chunk 1 is written like any other. */
	}
		/* FALLTHROUGH */
	case WORK_WRITE:
		if (up->stg == NULL) {
			up->work_errno = ENOENT;   /* cannot happen: an upload that exists has its entry */
			return;
		}
		check_rewrite(up, op);
		if ((up->work_errno = be->ops->staging_write(up->stg, op->data, op->data_len, op->offset,
		    up->fence)) != 0)
			return;
		if ((up->work_errno = be->ops->staging_sync(up->stg, BACKEND_SYNC_CHUNK)) != 0)
			return;
		/* Other chunks are hashed after their answer went out (WORK_HASH), off the round trip. */
		if (up->work == WORK_START || op->offset + op->data_len == up->total_size ||
		    op->offset + op->data_len == op->total_size)
			hash_chunk(up, op);
		/* Instant upload: chunk 1 of a file of several chunks is compared with stored content. */
		up->dd_match = up->work == WORK_START && dedup_enabled(up->st) && op->data_len > 0 &&
		    op->data_len < op->total_size && content_equals(up, op->total_size, 0, op->data, op->data_len);
		return;
	case WORK_CHALLENGE:
		up->dd_match = content_equals(up, up->total_size, op->offset, op->data, op->data_len);
		return;
	case WORK_LINK:
		work_link(up);
		return;
	case WORK_HASH:
		hash_chunk(up, op);
		return;
	case WORK_COMPLETE:
		work_complete(up);
		return;
	case WORK_VERIFY: {
		/* Is the file the record says we published still at its name? */
		uint64_t size;
		char version[BACKEND_VERSION_MAX];
		if (up->pub_by_digest) {
			if (hash_published(be, up->key.uid, op->name, op->name_len, op->total_size, up->key.md5,
			    up->pub_version) != 0)
				up->work_error = ERR_FILE_NOT_EXISTS;
			else if (op->kind == UPLOAD_AVATAR &&
			    pg_pending_write(up->st->pending, up->key.uid, op->name, op->name_len) != 0)
				up->work_error = ERR_FILE_NOT_EXISTS;   /* the icon update may never have been queued */
			return;
		}
		published_identity(be, up->key.uid, op->name, op->name_len, &size, version);
		if (version[0] == '\0' || strcmp(version, up->pub_version) != 0 || size != up->pub_size ||
		    size != op->total_size)
			up->work_error = ERR_FILE_NOT_EXISTS;
		return;
	}
	case WORK_DISCARD:
		if (up->stg)
			be->ops->staging_discard(up->stg, up->fence);
		return;
	case WORK_CHECK: {
		uint64_t recorded = 0, size = 0;
		up->work_errno = up->stg ? be->ops->staging_fence(up->stg, &recorded) : ENOENT;
		if (up->work_errno == 0)
			up->work_errno = be->ops->staging_size(up->stg, &size);
		if (up->work_errno == 0 && (recorded != up->fence || size < up->committed))
			up->work_errno = ESTALE;   /* changed by another holder while Redis said otherwise */
		return;
	}
	case WORK_LOAD: {
		be->ops->staging_close(up->stg);
		up->stg = NULL;
		up->work_errno = be->ops->staging_find(&up->st->backend, up->key.uid, up->key.md5, &up->load, &up->stg);
		uint64_t total = up->load.meta.total_size;
		if (up->work_errno == 0 && total > 0 && up->load.size >= total) {
			/* Complete but never published: its last chunk was not acknowledged. Hold back one
			 * byte, and the resent last chunk completes it under this node's fence. */
			up->work_errno = be->ops->staging_truncate(up->stg, total - 1, up->fence);
			up->load.size = total - 1;
		}
		return;
	}
	}
}

/* ---------------------------------------------------------------- the upload state machine (loop) */

static struct upload *upload_find(struct storage *st, const struct upload_key *key)
{
	struct upload *up;
	HASH_FIND(hh, st->uploads, key, sizeof(*key), up);
	return up;
}

static void upload_on_lease_timer(struct ev_loop *loop, ev_timer *t, int revents);

static struct upload *upload_new(struct storage *st, const struct upload_key *key)
{
	struct upload *up = calloc(1, sizeof(*up));
	if (up == NULL)
		return NULL;
	up->key = *key;
	up->st = st;
	up->xfer = -1;
	ev_timer_init(&up->lease_timer, upload_on_lease_timer, 0., 0.);
	up->lease_timer.data = up;
	HASH_ADD(hh, st->uploads, key, sizeof(up->key), up);
	return up;
}

/* Takes the upload out of the table; requests queued behind start over on a fresh one. */
static void upload_retire(struct upload *up)
{
	struct storage *st = up->st;
	HASH_DEL(st->uploads, up);
	up->retired = 1;
	ev_timer_stop(st->loop, &up->lease_timer);
	if (up->lease == UL_OURS) {
		/* The next holder, on any node, may start at once instead of waiting for the expiry. */
		char key[LEASE_KEY_MAX];
		lease_key(st, &up->key, key, sizeof(key));
		lease_release(&st->redis, key, 0, NULL, NULL);
		up->lease = UL_NONE;
	}
	upload_uncount(up);
	stats_transfer_close(up->xfer);
	up->xfer = -1;
	struct op *rest = up->head;
	up->head = up->tail = NULL;
	struct upload_key key = up->key;
	if (up->pins == 0) {
		st->backend.ops->staging_close(up->stg);
		md5_free(&up->md5);
		free(up);
	}
	while (rest) {
		struct op *next = rest->next;
		rest->next = NULL;
		op_dispatch(st, rest, &key);
		rest = next;
	}
}

static int upload_expired(const struct upload *up)
{
	return up->exists && time(NULL) - up->touched >= up->st->conf->upload_ttl;
}

static void upload_pop(struct upload *up)
{
	struct op *op = up->head;
	up->head = op->next;
	if (up->head == NULL)
		up->tail = NULL;
	up->running = 0;
}

static void upload_work_done(struct pool_job *job);

/* Runs one step of the head request on a disk thread; the upload is busy until it is done. */
static void upload_start_work(struct upload *up, enum disk_work work)
{
	up->work = work;
	up->running = 1;
	up->pins++;
	up->job.work = upload_work;
	up->job.done = upload_work_done;
	pool_submit(up->st->pool, &up->job);
}


/* ---------------------------------------------------------------- limits on uploads in progress */

static uint64_t kib(uint64_t bytes)
{
	return bytes / 1024 + (bytes % 1024 != 0);
}

/* Sets the upload's share of the bytes announced but not yet stored. Kept in KiB (rounded up) so the
 * sum over max_uploads uploads of max_file_size each cannot overflow. */
static void space_set(struct upload *up, uint64_t left_bytes)
{
	struct storage *st = up->st;
	st->announced_left -= up->left_accounted;
	up->left_accounted = kib(left_bytes);
	st->announced_left += up->left_accounted;
}

static void space_update(struct upload *up)
{
	if (up->counted)
		space_set(up, up->exists && up->total_size > up->committed ? up->total_size - up->committed : 0);
}

static struct user_count *user_find(struct storage *st, uint64_t uid)
{
	struct user_count *u;
	HASH_FIND(hh, st->users, &uid, sizeof(uid), u);
	return u;
}

/* Counts the upload in the limits; -1 when out of memory. */
static int upload_count(struct upload *up)
{
	struct storage *st = up->st;
	if (up->counted)
		return 0;
	struct user_count *u = user_find(st, up->key.uid);
	if (u == NULL) {
		if ((u = calloc(1, sizeof(*u))) == NULL)
			return -1;
		u->uid = up->key.uid;
		HASH_ADD(hh, st->users, uid, sizeof(u->uid), u);
	}
	u->n++;
	st->uploads_counted++;
	up->counted = 1;
	STAT_SET(uploads_in_progress, st->uploads_counted);
	return 0;
}

static void upload_uncount(struct upload *up)
{
	struct storage *st = up->st;
	if (!up->counted)
		return;
	space_set(up, 0);
	struct user_count *u = user_find(st, up->key.uid);
	if (u && --u->n == 0) {
		HASH_DEL(st->users, u);
		free(u);
	}
	st->uploads_counted--;
	up->counted = 0;
	STAT_SET(uploads_in_progress, st->uploads_counted);
}

/* Chunk 1 starts (or restarts) an upload: within the limits of uploads in progress, and only if free
 * space covers what every upload in progress still announces plus min_free_space. ERR_OK or a code. */
static int upload_admit(struct upload *up, const struct op *op, char *msg, size_t msglen)
{
	struct storage *st = up->st;
	const struct conf *conf = st->conf;
	if (!up->counted) {
		const struct user_count *u = user_find(st, up->key.uid);
		if (u && u->n >= (unsigned)conf->max_uploads_per_user) {
			snprintf(msg, msglen, "too many uploads in progress for this user (%d): finish or abandon one",
			    conf->max_uploads_per_user);
			return ERR_USER_UPLOADS;
		}
		if (st->uploads_counted >= (unsigned)conf->max_uploads) {
			snprintf(msg, msglen, "server busy: too many uploads in progress (%d), retry later", conf->max_uploads);
			return ERR_SERVER_UPLOADS;
		}
	}
	if (st->free_known) {
		uint64_t others = st->announced_left - up->left_accounted;
		uint64_t need = others + kib(op->total_size) + kib((uint64_t)conf->min_free_space);
		if (need > st->free_bytes / 1024) {
			snprintf(msg, msglen, "storage full: %" PRIu64 " KiB free, uploads in progress announce %" PRIu64
			    " KiB more and this one %" PRIu64 " KiB", st->free_bytes / 1024, others, kib(op->total_size));
			return ERR_STORAGE_FULL;
		}
	}
	if (upload_count(up) < 0) {
		snprintf(msg, msglen, "server busy: out of memory");
		return ERR_BUSY;
	}
	space_set(up, op->total_size);
	return ERR_OK;
}

static void space_probe_work(struct pool_job *job)
{
	struct space_probe *p = (struct space_probe *)job;
	struct statvfs sv;
	p->ok = statvfs(p->st->conf->root, &sv) == 0;
	if (p->ok)
		p->avail = (uint64_t)sv.f_bavail * (uint64_t)sv.f_frsize;
}

static void space_probe_done(struct pool_job *job)
{
	struct space_probe *p = (struct space_probe *)job;
	p->busy = 0;
	p->st->free_known = p->ok;
	p->st->free_bytes = p->avail;
}

static void storage_on_space_timer(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)loop;
	(void)revents;
	struct storage *st = t->data;
	if (st->space.busy)
		return;
	st->space.busy = 1;
	st->space.st = st;
	st->space.job.work = space_probe_work;
	st->space.job.done = space_probe_done;
	pool_submit(st->pool, &st->space.job);
}

/* ---------------------------------------------------------------- health (the agent-check) */

#define HEALTH_INTERVAL 1.0     /* seconds between heartbeats of the loop */
#define PING_INTERVAL 2.0       /* seconds between pings of the backend */

static void health_publish(struct storage *st, int unreachable, const char *why)
{
	struct health_probe *h = &st->health;
	if (unreachable == h->unreachable)
		return;
	h->unreachable = unreachable;
	if (stats_self)
		atomic_store(&stats_self->backend_unreachable, (uint32_t)unreachable);
	if (unreachable)
		log_warnx("storage backend %s unreachable (%s): the agent-check answers down",
		    st->backend.ops->name, why);
	else
		log_info("storage backend %s answers again", st->backend.ops->name);
}

static void health_ping_work(struct pool_job *job)
{
	struct health_probe *h = (struct health_probe *)job;
	h->err = h->st->backend.ops->ping(&h->st->backend);
}

static void health_ping_done(struct pool_job *job)
{
	struct health_probe *h = (struct health_probe *)job;
	struct storage *st = h->st;
	h->busy = 0;
	h->last = ev_now(st->loop);
	health_publish(st, h->err != 0, strerror(h->err));
}

/* The loop's heartbeat, and the backend pinged on a pool thread: a ping still running after
 * storage_timeout counts as unreachable (every pool thread may be stuck on the backend). */
static void storage_on_health_timer(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)revents;
	struct storage *st = t->data;
	struct health_probe *h = &st->health;
	if (stats_self)
		atomic_store(&stats_self->alive_ms, stats_mono_ms());
	ev_tstamp now = ev_now(loop);
	if (st->backend.ops->ping == NULL)
		return;
	if (h->busy) {
		if (now - h->started > st->conf->storage_timeout)
			health_publish(st, 1, "no answer within storage_timeout");
		return;
	}
	if (now - h->last < PING_INTERVAL)
		return;
	h->busy = 1;
	h->st = st;
	h->started = now;
	h->job.work = health_ping_work;
	h->job.done = health_ping_done;
	pool_submit(st->pool, &h->job);
}

/* ---------------------------------------------------------------- the upload lease (several nodes) */

/*
 * Every node sharing the storage may be handed any chunk of any upload. Before it touches an
 * upload's staging entry (or answers how far it got) a node takes the upload's lease in Redis,
 * reads the entry back unless it started or holds it already, and keeps the lease while the
 * upload is active. Every staging change carries the lease's fence, so a node that lost the
 * lease without noticing can no longer change anything (backend.h, "Fencing"). The lease goes
 * back when the upload is published or abandoned, when the client connection that drove it
 * closes, or after lease_ttl * 2 without a request; a node that dies loses it after lease_ttl.
 */

static int upload_lease_valid(const struct upload *up)
{
	return up->lease == UL_OURS && ev_now(up->st->loop) < up->lease_until;
}

/* Answers every queued request that has not started with error (sweeps just go). */
static void upload_fail_queue(struct upload *up, int error, const char *message)
{
	while (up->head && !up->running) {
		struct op *op = up->head;
		upload_pop(up);
		if (op->type == OP_SWEEP)
			op_free(op);
		else
			op_answer(op, error, message, NULL);
	}
}

/* Another node took the upload over (or Redis lost the lease): what this node knew is stale. */
static void upload_lost(struct upload *up, const char *holder)
{
	struct storage *st = up->st;
	if (up->lease == UL_OURS && up->loaded)
		log_info("upload %" PRIu64 "/%s: lease lost%s%s; reading it back before the next request",
		    up->key.uid, up->key.md5, holder && holder[0] ? " to " : "", holder && holder[0] ? holder : "");
	up->lease = UL_NONE;
	up->loaded = 0;
	up->exists = 0;
	up->parked = 0;
	up->check_hold = 0;
	up->dd_challenging = 0;   /* the proof is kept in memory only: elsewhere it is a normal upload */
	ev_timer_stop(st->loop, &up->lease_timer);
	upload_uncount(up);
	stats_transfer_close(up->xfer);
	up->xfer = -1;
}

static void upload_on_lease(void *data, enum lease_status status, uint64_t fence, const char *holder,
    long remaining_ms)
{
	struct upload *up = data;
	struct storage *st = up->st;
	if (up->retired || st->stopping) {
		if (status == LEASE_HELD && up->retired && !st->stopping) {
			char key[LEASE_KEY_MAX];
			lease_key(st, &up->key, key, sizeof(key));
			lease_release(&st->redis, key, 0, NULL, NULL);
		}
		upload_unpin(up);
		return;
	}
	ev_tstamp now = ev_now(st->loop);
	double ttl = st->conf->lease_ttl;
	up->lease = UL_NONE;
	if (status == LEASE_HELD) {
		if (up->loaded && fence != up->fence) {
			upload_lost(up, NULL);   /* someone else may have changed it in between */
		} else if (up->loaded && up->parked) {
			/* The same fence: nobody took it meanwhile, says Redis. A Redis that lost writes
			 * (a failover, a restart from a snapshot) could say so wrongly: the fence recorded
			 * with the staging entry decides before memory is trusted again (WORK_CHECK). */
			up->check_hold = 1;
		}
		if (up->loaded && up->reload_now) {
			up->reload_now = 0;   /* Redis came back with our lease: the record may be gone */
			up->record_dirty = 1;
		}
		up->lease = UL_OURS;
		up->fence = fence;
		/* A quarter of the lease is kept back for clock drift and a slow Redis answer. */
		up->lease_until = up->lease_asked + ttl * 0.75;
		up->wait_since = 0;
		ev_timer_stop(st->loop, &up->lease_timer);
		ev_timer_set(&up->lease_timer, ttl / 3, ttl / 3);
		ev_timer_start(st->loop, &up->lease_timer);
		if (up->record_dirty && up->exists)
			record_write(up);
	} else if (status == LEASE_BUSY) {
		up->reload_now = 0;
		while (up->head && up->head->type == OP_SWEEP) {   /* in use elsewhere: not the janitor's */
			struct op *op = up->head;
			upload_pop(up);
			op_free(op);
		}
		if (up->loaded)
			upload_lost(up, holder);   /* its holder may change it: what this node knew is stale */
		if (up->wait_since == 0)
			up->wait_since = now;
		/* Wait for it (its holder releases it when its client leaves, or it expires) as long as the
		 * worker waits for us, less a second for the answer to travel. */
		double limit = st->conf->storage_timeout > 2 ? st->conf->storage_timeout - 1.0 : 0.5;
		if (now - up->wait_since >= limit) {
			up->wait_since = 0;
			log_info("upload %" PRIu64 "/%s: still written by %s after %.0f s: answering busy", up->key.uid,
			    up->key.md5, holder ? holder : "another node", limit);
			upload_fail_queue(up, ERR_BUSY, "server busy: another node is writing this upload, retry");
		} else if (up->head) {
			double retry = remaining_ms > 0 && remaining_ms < 200 ? remaining_ms / 1000.0 : 0.2;
			ev_timer_stop(st->loop, &up->lease_timer);
			ev_timer_set(&up->lease_timer, retry, 0.);
			ev_timer_start(st->loop, &up->lease_timer);
		}
	} else {
		up->reload_now = 0;
		upload_fail_queue(up, ERR_BUSY, "server busy: progress store unavailable, retry");
	}
	upload_unpin(up);
	upload_run(up);
}

static void upload_lease_ask(struct upload *up)
{
	struct storage *st = up->st;
	char key[LEASE_KEY_MAX];
	lease_key(st, &up->key, key, sizeof(key));
	up->lease_asked = ev_now(st->loop);
	if (lease_acquire(&st->redis, key, st->conf->lease_ttl * 1000L, upload_on_lease, up) < 0) {
		upload_fail_queue(up, ERR_BUSY, "server busy: progress store unavailable, retry");
		return;
	}
	up->lease = UL_ASKING;
	up->pins++;
}

static void upload_on_renew(void *data, enum lease_status status, uint64_t fence, const char *holder,
    long remaining_ms)
{
	(void)remaining_ms;
	struct upload *up = data;
	up->renewing = 0;
	if (!up->retired && !up->st->stopping && up->lease == UL_OURS) {
		if (status == LEASE_HELD && fence == up->fence)
			up->lease_until = up->renew_asked + up->st->conf->lease_ttl * 0.75;
		else if (status != LEASE_ERROR)
			upload_lost(up, holder);
		/* LEASE_ERROR: Redis is away; the next tick tries again, and lease_until stops writes meanwhile. */
	}
	int retired = up->retired;
	upload_unpin(up);
	if (!retired)
		upload_run(up);
}

/* Gives the lease back once nothing is queued, running or unrecorded (the next holder, on any
 * node, reads the progress back from the staging entry). The upload stays here, parked: counted
 * in the limits and listed in the transfers until it expires; if this node takes it back before
 * anyone else, the lease comes back with the same fence and what is in memory still holds.
 * Returns 1 when the lease was given back. */
static int upload_release(struct upload *up)
{
	struct storage *st = up->st;
	if (up->retired || up->head || up->running || up->awaiting_record || up->loading || up->lease == UL_ASKING)
		return 0;
	if (up->lease != UL_OURS) {
		up->release_wanted = 0;
		return 1;
	}
	if (st->redis.ready && (up->record_dirty || up->record_inflight)) {
		if (!up->record_inflight)
			record_write(up);
		if (up->record_inflight)
			return 0;   /* record_on_reply runs upload_run, which comes back here */
	}
	char key[LEASE_KEY_MAX];
	lease_key(st, &up->key, key, sizeof(key));
	lease_release(&st->redis, key, st->conf->upload_ttl * 1000L, NULL, NULL);
	up->lease = UL_NONE;
	up->release_wanted = 0;
	up->parked = 1;
	ev_timer_stop(st->loop, &up->lease_timer);
	return 1;
}

static void upload_on_lease_timer(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)revents;
	struct upload *up = t->data;
	struct storage *st = up->st;
	if (up->lease != UL_OURS) {
		upload_run(up);   /* the lease was held elsewhere: ask again */
		return;
	}
	if (!up->head && !up->running && ev_now(loop) - up->active >= st->conf->lease_ttl * 2.0)
		up->release_wanted = 1;   /* idle: another node may be waiting for it */
	if (up->release_wanted && upload_release(up))
		return;
	if (up->renewing)
		return;
	char key[LEASE_KEY_MAX];
	lease_key(st, &up->key, key, sizeof(key));
	up->renew_asked = ev_now(loop);
	if (lease_renew(&st->redis, key, st->conf->lease_ttl * 1000L, upload_on_renew, up) == 0) {
		up->renewing = 1;
		up->pins++;
	}
}

/* Reads the staging entry back: this node did not start the upload, or lost it for a while. */
static void upload_load(struct upload *up)
{
	up->loading = 1;
	upload_start_work(up, WORK_LOAD);
}

/* The entry as WORK_LOAD found it becomes the upload's state (on the loop). */
static void upload_loaded(struct upload *up)
{
	int err = up->work_errno;
	up->loading = 0;
	if (err == ENOENT || err == EINVAL) {
		up->exists = 0;   /* nothing to resume (EINVAL: broken; seq 1 replaces it, the janitor removes it) */
		up->loaded = 1;
		return;
	}
	if (err) {
		char msg[160];
		snprintf(msg, sizeof(msg), "server busy: cannot read the upload back (%s), retry", strerror(err));
		log_warnx("upload %" PRIu64 "/%s: %s", up->key.uid, up->key.md5, msg);
		if (err == ESTALE)
			upload_lost(up, NULL);
		upload_fail_queue(up, ERR_BUSY, msg);
		return;
	}
	const struct backend_meta *m = &up->load.meta;
	up->exists = 1;
	up->loaded = 1;
	up->parked = 0;
	memcpy(up->name, m->name, m->name_len + 1u);
	up->name_len = m->name_len;
	up->kind = m->kind;
	up->total_size = m->total_size;
	up->chunk_len = m->chunk_len;
	/* Chunks are written in order with no gaps under one fence at a time, so the entry is a prefix
	 * of the upload: every byte in it counts, acknowledged or not. (WORK_LOAD held back the last
	 * byte of an entry that was complete but never published.) */
	up->committed = up->load.size;
	up->seq = up->chunk_len ? up->committed / up->chunk_len : 0;
	if (up->seq == 0)
		up->seq = 1;
	up->anchor_seq = 1;
	up->anchor_offset = 0;
	up->touched = up->load.mtime;
	up->hash_dirty = 1;   /* other writers wrote it: the MD5 is computed from the entry at the end */
	up->dd_challenging = 0;
	up->hashed = 0;
	if (upload_count(up) < 0)
		log_warnx("upload %" PRIu64 "/%s: out of memory counting it", up->key.uid, up->key.md5);
	space_update(up);
	stats_transfer_close(up->xfer);
	up->xfer = stats_transfer_open(up->kind == UPLOAD_AVATAR ? 'A' : 'U', up->key.uid, up->name, up->name_len,
	    up->total_size);
	stats_transfer_update(up->xfer, up->committed);
	up->record_dirty = 1;   /* the record names this node now, with the progress read back */
	record_write(up);
}

/* ---------------------------------------------------------------- what seq means */

/* Chunk n of an upload whose chunk 1 held L bytes starts at (n - 1) * L: the Qt client sends chunks of
 * one size, numbered from 1 (the instant-upload extension keeps seq * L = trans_size). After a restart
 * the committed size need not be on a chunk boundary; a client resumes there with the answered seq + 1,
 * and the chunks after it follow from that anchor. Anything else contradicts the numbering: 1017. */
static int seq_on_line(const struct upload *up, uint64_t seq, uint64_t offset)
{
	if (seq < up->anchor_seq)
		return 0;
	uint64_t k = seq - up->anchor_seq;
	if (up->chunk_len == 0)
		return k == 0 && offset == up->anchor_offset;
	if (k > (UINT64_MAX - up->anchor_offset) / up->chunk_len)
		return 0;
	return offset == up->anchor_offset + k * up->chunk_len;
}

static int seq_fits(struct upload *up, const struct op *op)
{
	if (seq_on_line(up, op->seq, op->offset))
		return 1;
	if (op->seq == up->seq + 1 && op->offset == up->committed) {
		up->anchor_seq = op->seq;
		up->anchor_offset = op->offset;
		return 1;
	}
	return 0;
}

/* ---------------------------------------------------------------- final chunk resent after publishing */

static void published_answer(struct op *op)
{
	struct client *cl = op->client;
	if (!cl->dead) {
		struct ipc_result r = { .error = ERR_OK, .seq = op->seq, .trans_size = op->total_size,
		    .total_size = op->total_size, .name = op->name, .name_len = op->name_len };
		if (ipc_encode_result(&cl->out, op->reqid, &r) == 0)
			client_flush(cl);
	}
	op_free(op);
}

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
	op_answer(op, ERR_FILE_NOT_EXISTS, "no upload in progress: start at seq 1", NULL);
	upload_unpin(up);
	upload_run(up);
}

/* A chunk that ends the file arrived for no upload in progress: maybe the client lost the answer to
 * the final chunk. The record (any node's) tells whether that file was published. */
static int published_lookup(struct upload *up)
{
	char key[RECORD_KEY_MAX];
	record_key(up->st, &up->key, key, sizeof(key));
	if (rds_command(&up->st->redis, published_on_reply, up, "GET %s", key) < 0)
		return -1;
	up->running = 1;
	up->pins++;
	return 0;
}

/* ---------------------------------------------------------------- instant upload (loop side) */

/* Chunk 1 matched stored content: pick the chunks the client must show, at random offsets. */
static void dedup_challenge_begin(struct upload *up)
{
	uint64_t chunks = up->total_size / up->chunk_len + (up->total_size % up->chunk_len != 0);
	uint64_t range = chunks - 1;   /* chunks 2..chunks; chunk 1 was compared already */
	up->dd_count = range < DEDUP_CHALLENGES ? (int)range : DEDUP_CHALLENGES;
	for (int i = 0; i < up->dd_count; i++) {
		int again;
		do {
			uint64_t r;
			randombytes_buf(&r, sizeof(r));   /* the modulo bias is below range / 2^64 */
			up->challenge[i] = 2 + r % range;
			again = 0;
			for (int j = 0; j < i; j++)
				again |= up->challenge[j] == up->challenge[i];
		} while (again);
	}
	up->dd_next = 0;
	up->dd_challenging = up->dd_count > 0;
}

/* The proof failed or was interrupted: the upload goes on as a normal one from what is staged. */
static void dedup_fallback(struct upload *up, const char *why)
{
	if (!up->dd_challenging)
		return;
	up->dd_challenging = 0;
	STAT_INC(instant_fallbacks);
	log_info("upload %" PRIu64 "/%s: instant upload refused (%s): uploading in full", up->key.uid, up->key.md5,
	    why);
}

static void upload_work_done(struct pool_job *job)
{
	struct upload *up = (struct upload *)((char *)job - offsetof(struct upload, job));
	struct op *op = up->head;
	up->pins--;
	char msg[256];
	if (up->work == WORK_CHALLENGE) {
		up->running = 0;
		up->dd_received += op->data_len;
		up->touched = time(NULL);
		if (!up->dd_match) {
			dedup_fallback(up, "a challenged chunk differs from the stored content");
		} else if (++up->dd_next == up->dd_count) {
			upload_start_work(up, WORK_LINK);   /* proven: the op stays at the head until published */
			return;
		}
		upload_pop(up);
		op_answer(op, ERR_OK, NULL, up);   /* the next challenge, or where a normal upload goes on */
		upload_run(up);
		return;
	}
	if (up->work == WORK_LINK) {
		up->dd_challenging = 0;
		if ((up->work_errno || up->work_error) && !up->published && up->work_errno != ESTALE) {
			up->dd_challenging = 1;
			dedup_fallback(up, up->work_errno ? strerror(up->work_errno) : "cannot publish from the stored content");
			upload_pop(up);
			op_answer(op, ERR_OK, NULL, up);
			upload_run(up);
			return;
		}
		if (up->dd_linked) {
			up->committed = up->total_size;
			up->seq = up->total_size / up->chunk_len + (up->total_size % up->chunk_len != 0);
			space_update(up);
			stats_transfer_update(up->xfer, up->committed);
		}
		/* Errors after publishing go the way of a completion's; success ends it like one. */
	}
	if (up->work == WORK_DISCARD) {
		up->running = 0;
		upload_retire(up);
		return;
	}
	if (up->work == WORK_LOAD) {
		up->running = 0;
		upload_loaded(up);
		upload_run(up);
		return;
	}
	if (up->work == WORK_CHECK) {
		up->running = 0;
		up->check_hold = 0;
		if (up->work_errno) {
			log_info("upload %" PRIu64 "/%s: changed elsewhere while parked here (%s): reading it back",
			    up->key.uid, up->key.md5, strerror(up->work_errno));
			upload_lost(up, NULL);
		} else {
			up->parked = 0;
		}
		upload_run(up);
		return;
	}
	if (up->work == WORK_HASH) {
		upload_pop(up);
		op_free(op);
		upload_run(up);
		return;
	}
	if (up->work == WORK_VERIFY) {
		upload_pop(up);
		if (up->work_error) {
			op_answer(op, ERR_FILE_NOT_EXISTS, "no upload in progress: start at seq 1", NULL);
		} else {
			if (up->pub_by_digest) {
				record_published_op(up, op);   /* the record said uploading: now it says published */
				if (op->kind == UPLOAD_AVATAR)
					pg_icon_queue(up->st->pg, up->key.uid);
			}
			published_answer(op);
		}
		upload_run(up);
		return;
	}
	if (up->work_errno || up->work_error) {
		int error = up->work_error ? up->work_error : errno_to_error(up->work_errno);
		if (error == ERR_CHECKSUM) {
			snprintf(msg, sizeof(msg), "md5: the file received does not match; start again at seq 1");
			log_info("upload %" PRIu64 "/%s: checksum mismatch, reset", up->key.uid, up->key.md5);
			record_delete(up);
			upload_pop(up);
			op_answer(op, error, msg, NULL);
			up->exists = 0;
			upload_retire(up);
			return;
		}
		snprintf(msg, sizeof(msg), "%s: %s", error == ERR_STORAGE_FULL ? "storage full" :
		    up->published ? "file stored but not made durable, or its icon update not queued; upload it again" :
		    "cannot store the file", strerror(up->work_errno));
		if (up->published) {
			log_warnx("upload %" PRIu64 "/%s: %s", up->key.uid, up->key.md5, msg);
			record_delete(up);
			upload_pop(up);
			op_answer(op, error, msg, NULL);
			upload_retire(up);
			return;
		}
		log_warnx("upload %" PRIu64 "/%s seq %" PRIu64 ": %s", up->key.uid, up->key.md5, op->seq, msg);
		if (up->work_errno == ESTALE ||
		    (up->work_errno == ENOENT && (up->work == WORK_WRITE || up->work == WORK_COMPLETE))) {
			/* Fenced out, or the entry is gone: another holder changed the upload. This node
			 * forgets what it knew and runs the request once more on what it reads back (a final
			 * chunk whose file another node published is then answered 0); a second time, busy. */
			if (!op->retried && (up->work == WORK_WRITE || up->work == WORK_COMPLETE)) {
				op->retried = 1;
				up->running = 0;
				upload_lost(up, NULL);
				upload_run(up);
				return;
			}
			upload_pop(up);
			op_answer(op, ERR_BUSY, "server busy: another node took this upload over, retry", NULL);
			upload_lost(up, NULL);
			upload_run(up);
			return;
		}
		if (up->work == WORK_START) {
			up->exists = 0;   /* a failed start leaves nothing to resume */
			upload_uncount(up);
		}
		upload_pop(up);
		op_answer(op, error, msg, up->exists ? up : NULL);
		upload_run(up);
		return;
	}
	if (up->work == WORK_START || up->work == WORK_WRITE) {
		if (up->work == WORK_START) {
			up->exists = 1;
			/* Started here under the lease held: what memory says is the truth, nothing to read
			 * back (without this, the next chunk re-read the entry and dropped the running MD5). */
			up->loaded = 1;
			memcpy(up->name, op->name, op->name_len + 1u);
			up->name_len = op->name_len;
			up->kind = op->kind;
			up->total_size = op->total_size;
			up->chunk_len = op->data_len;
			up->committed = 0;
			up->anchor_seq = 1;
			up->anchor_offset = 0;
			up->dd_received = op->data_len;
			up->dd_challenging = 0;
			if (up->dd_match && op->data_len < op->total_size)
				dedup_challenge_begin(up);
			STAT_INC(uploads_started);
			stats_transfer_close(up->xfer);
			up->xfer = stats_transfer_open(up->kind == UPLOAD_AVATAR ? 'A' : 'U', up->key.uid, up->name,
			    up->name_len, up->total_size);
		}
		STAT_ADD(upload_bytes, op->data_len);
		uint64_t end = op->offset + op->data_len;
		if (end >= up->committed) {
			up->committed = end;
			up->seq = op->seq;
			stats_transfer_update(up->xfer, up->committed);
		}
		space_update(up);
		up->touched = time(NULL);
		if (up->committed == up->total_size) {
			upload_start_work(up, WORK_COMPLETE);
			return;
		}
		if (up->work == WORK_START) {
			/* Answered from record_on_reply once Redis has the record. */
			record_write(up);
			if (up->record_inflight) {
				up->awaiting_record = 1;
				return;
			}
			upload_pop(up);
			op_answer(op, ERR_BUSY, "server busy: cannot record the upload, retry", NULL);
			upload_run(up);
			return;
		}
		record_write(up);
		op_reply(op, ERR_OK, NULL, up);
		upload_start_work(up, WORK_HASH);
		return;
	}
	/* WORK_COMPLETE or WORK_LINK: published. */
	char name[ESCAPE_SIZE(PROTO_NAME_MAX)];
	escape_quoted(name, sizeof(name), up->name, up->name_len);
	uint64_t saved = up->total_size > up->dd_received ? up->total_size - up->dd_received : 0;
	if (up->dd_linked) {
		/* The worker marks the access log from this message; clients ignore it. */
		snprintf(msg, sizeof(msg), "instant upload: published from content already stored, %" PRIu64
		    " bytes not sent", saved);
		STAT_INC(uploads_instant);
		STAT_ADD(instant_bytes_saved, saved);
	}
	log_info("upload %" PRIu64 "/%s complete: \"%s\", %" PRIu64 " bytes%s", up->key.uid, up->key.md5,
	    name, up->total_size, up->dd_linked ? " (instant: from stored content)" : "");
	record_published(up);
	STAT_INC(uploads_completed);
	if (up->kind == UPLOAD_AVATAR)
		pg_icon_queue(up->st->pg, up->key.uid);
	upload_pop(up);
	op_answer(op, ERR_OK, up->dd_linked ? msg : NULL, up);
	upload_retire(up);
}

/* Starts the request at the head of the queue unless one is already running. */
static void upload_run(struct upload *up)
{
	char msg[256];
	if (up->st->stopping)
		return;
	if (up->reload_now && !up->running && !up->loading && up->lease != UL_ASKING) {
		if (upload_lease_valid(up) && !up->loaded) {
			up->reload_now = 0;
			upload_load(up);   /* another fence came back: read it back, then record it */
			return;
		}
		if (up->lease == UL_OURS || !ev_is_active(&up->lease_timer)) {
			upload_lease_ask(up);   /* the answer says whether anything changed */
			if (up->lease == UL_ASKING)
				return;
			up->reload_now = 0;   /* Redis is away again: the next reconnection comes back here */
		}
	}
	while (!up->running && up->head) {
		struct op *op = up->head;
		up->active = ev_now(up->st->loop);
		if (up->lease == UL_ASKING || up->loading)
			return;   /* its callback runs this again */
		if (!upload_lease_valid(up)) {
			if (up->lease != UL_OURS && ev_is_active(&up->lease_timer))
				return;   /* held elsewhere: the timer asks again */
			upload_lease_ask(up);
			continue;   /* asking, or the queue was answered busy */
		}
		if (!up->loaded && !(op->type == OP_CHUNK && op->seq == 1)) {
			upload_load(up);
			return;
		}
		if (up->check_hold) {
			upload_start_work(up, WORK_CHECK);
			return;
		}
		if (op->type == OP_SWEEP) {
			/* The janitor: an entry untouched for upload_ttl whose lease was free is abandoned. */
			if (upload_expired(up)) {
				char name[ESCAPE_SIZE(PROTO_NAME_MAX)];
				escape_quoted(name, sizeof(name), up->name, up->name_len);
				log_info("removing abandoned upload %" PRIu64 "/%s (\"%s\", %" PRIu64 " of %" PRIu64 " bytes)",
				    up->key.uid, up->key.md5, name, up->committed, up->total_size);
				upload_pop(up);
				op_free(op);
				up->exists = 0;
				upload_start_work(up, WORK_DISCARD);
				return;
			}
			upload_pop(up);
			op_free(op);
			continue;
		}
		if (upload_expired(up)) {
			/* Abandoned for upload_ttl: the janitor's job, but nothing may resume it now. */
			up->exists = 0;
			upload_start_work(up, WORK_DISCARD);
			return;
		}
		if (op->type == OP_SYNC) {
			upload_pop(up);
			if (up->exists)
				op_answer(op, ERR_OK, NULL, up);
			else
				op_answer(op, ERR_FILE_NOT_EXISTS, "no upload in progress: start at seq 1", NULL);
			continue;
		}
		if (op->seq == 1) {
			if (!up->st->redis.ready) {
				upload_pop(up);
				op_answer(op, ERR_BUSY, "server busy: progress store unavailable, retry", NULL);
				continue;
			}
			int refused = upload_admit(up, op, msg, sizeof(msg));
			if (refused != ERR_OK) {
				STAT_INC(uploads_refused);
				upload_pop(up);
				op_answer(op, refused, msg, up->exists ? up : NULL);
				continue;
			}
			up->dd_challenging = 0;
			upload_start_work(up, WORK_START);
			return;
		}
		if (!up->exists) {
			if (op->trans_size == op->total_size && up->st->redis.ready && published_lookup(up) == 0)
				return;
			upload_pop(up);
			op_answer(op, ERR_FILE_NOT_EXISTS, "no upload in progress: start at seq 1", NULL);
			continue;
		}
		if (op->total_size != up->total_size || op->name_len != up->name_len ||
		    memcmp(op->name, up->name, up->name_len) != 0 || op->kind != up->kind) {
			upload_pop(up);
			snprintf(msg, sizeof(msg), "name, total_size or kind differ from chunk 1 of this upload");
			op_answer(op, ERR_UPLOAD_MISMATCH, msg, up);
			continue;
		}
		if (up->dd_challenging) {
			/* Only the chunk asked for proves anything; any other chunk means a normal upload. */
			uint64_t k = up->challenge[up->dd_next];
			uint64_t at = (k - 1) * up->chunk_len;
			uint64_t len = up->total_size - at < up->chunk_len ? up->total_size - at : up->chunk_len;
			if (op->type == OP_CHUNK && op->seq == k && op->offset == at && op->data_len == len) {
				upload_start_work(up, WORK_CHALLENGE);
				return;
			}
			dedup_fallback(up, "the client sent another chunk than the one asked for");
		}
		if (op->offset > up->committed) {
			upload_pop(up);
			snprintf(msg, sizeof(msg), "trans_size: chunk starts at %" PRIu64 " but only %" PRIu64
			    " bytes are stored; resume from there", op->offset, up->committed);
			op_answer(op, ERR_OFFSET_INVALID, msg, up);
			continue;
		}
		if (!seq_fits(up, op)) {
			upload_pop(up);
			snprintf(msg, sizeof(msg), "seq: chunk %" PRIu64 " cannot start at offset %" PRIu64 " (chunk 1 held %"
			    PRIu64 " bytes; %" PRIu64 " bytes are stored, by chunk %" PRIu64 ")", op->seq, op->offset,
			    up->chunk_len, up->committed, up->seq);
			op_answer(op, ERR_SEQ_INVALID, msg, up);
			continue;
		}
		upload_start_work(up, WORK_WRITE);
		return;
	}
	if (up->running || up->head || up->retired || up->loading || up->lease == UL_ASKING || up->reload_now)
		return;
	if (!up->exists)
		upload_retire(up);   /* nothing in progress: a placeholder, or a sync answered 1012 */
	else if (up->release_wanted)
		upload_release(up);
}

static void op_dispatch(struct storage *st, struct op *op, const struct upload_key *key)
{
	struct upload *up = upload_find(st, key);
	if (up == NULL && (up = upload_new(st, key)) == NULL) {
		op_answer(op, ERR_BUSY, "server busy: out of memory", NULL);
		return;
	}
	op->next = NULL;
	STAT_INC(storage_queue);
	if (up->tail)
		up->tail->next = op;
	else
		up->head = op;
	up->tail = op;
	upload_run(up);
}

/* ---------------------------------------------------------------- recovery and janitor */

/* Staging entries untouched for upload_ttl, listed on a pool thread for the janitor. */
#define SWEEP_MAX 256

struct sweep {
	struct pool_job job;
	struct storage *st;
	int busy;
	time_t now;
	size_t n;
	struct upload_key keys[SWEEP_MAX];
};

static int sweep_entry(const struct backend_entry *e, void *arg)
{
	struct sweep *sw = arg;
	if (sw->now - e->mtime < sw->st->conf->upload_ttl)
		return 0;
	struct upload_key *k = &sw->keys[sw->n++];
	memset(k, 0, sizeof(*k));   /* the table hashes the whole struct, padding included */
	k->uid = e->meta.uid;
	memcpy(k->md5, e->meta.md5, sizeof(k->md5));
	return sw->n == SWEEP_MAX;   /* the rest waits for the next round */
}

static void sweep_work(struct pool_job *job)
{
	struct sweep *sw = (struct sweep *)job;
	size_t dropped = 0;
	sw->n = 0;
	sw->now = time(NULL);
	int err = sw->st->backend.ops->staging_list(&sw->st->backend, sweep_entry, sw, &dropped);
	if (err)
		log_warnx("janitor: cannot list the staging entries: %s", strerror(err));
	else if (dropped)
		log_info("janitor: dropped %zu broken staging files", dropped);
	/* Stored content that no published name uses any more (instant upload). */
	struct backend *be = &sw->st->backend;
	size_t freed = 0;
	uint64_t freed_bytes = 0;
	if (be->ops->content_collect) {
		err = be->ops->content_collect(be, &freed, &freed_bytes);
		if (err)
			log_warnx("janitor: cannot collect unused content: %s", strerror(err));
		else if (freed)
			log_info("janitor: freed %zu unused stored files, %" PRIu64 " bytes", freed, freed_bytes);
		STAT_ADD(content_freed_bytes, freed_bytes);
	}
}

/* Each old entry not in memory gets a sweep request: it takes the lease (or leaves the entry
 * alone when another node holds it), reads the entry back and removes it if still untouched. */
static void sweep_done(struct pool_job *job)
{
	struct sweep *sw = (struct sweep *)job;
	struct storage *st = sw->st;
	sw->busy = 0;
	if (st->stopping || !st->redis.ready)
		return;
	for (size_t i = 0; i < sw->n; i++) {
		if (upload_find(st, &sw->keys[i]) != NULL)
			continue;   /* in use here: the loop below looks after it */
		struct op *op = calloc(1, sizeof(*op));
		struct upload *up = op ? upload_new(st, &sw->keys[i]) : NULL;
		if (up == NULL) {
			free(op);
			return;
		}
		op->type = OP_SWEEP;
		up->release_wanted = 1;
		op_dispatch(st, op, &sw->keys[i]);
	}
}

/* A parked upload another node took since (its lease's last owner is not this node, or the lease is
 * gone: published, discarded or expired there) no longer counts here. */
static void parked_on_reply(redisAsyncContext *c, void *reply, void *privdata)
{
	(void)c;
	struct upload *up = privdata;
	redisReply *rep = reply;
	if (!up->retired && !up->st->stopping && up->parked && up->lease == UL_NONE && !up->head && !up->running &&
	    rep != NULL && (rep->type == REDIS_REPLY_NIL ||
	    (rep->type == REDIS_REPLY_STRING && strcmp(rep->str, lease_owner()) != 0))) {
		upload_lost(up, NULL);
		upload_retire(up);
	}
	upload_unpin(up);
}

static void storage_on_janitor(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)loop;
	(void)revents;
	struct storage *st = t->data;
	struct upload *up, *tmp;
	struct upload_key parked[SWEEP_MAX];
	size_t nparked = 0;
	HASH_ITER(hh, st->uploads, up, tmp) {
		if (!up->running && up->head == NULL && up->lease == UL_NONE && upload_expired(up) && nparked < SWEEP_MAX)
			parked[nparked++] = up->key;   /* its lease was given back: a sweep takes it first */
		else if (up->parked && up->lease == UL_NONE && !up->running && up->head == NULL) {
			char key[LEASE_KEY_MAX];
			lease_key(st, &up->key, key, sizeof(key));
			if (rds_command(&st->redis, parked_on_reply, up, "HGET %s last", key) == 0)
				up->pins++;
		}
		if (!up->running && up->head == NULL && up->lease == UL_OURS && upload_expired(up)) {
			char name[ESCAPE_SIZE(PROTO_NAME_MAX)];
			escape_quoted(name, sizeof(name), up->name, up->name_len);
			log_info("removing abandoned upload %" PRIu64 "/%s (\"%s\", %" PRIu64 " of %" PRIu64 " bytes)",
			    up->key.uid, up->key.md5, name, up->committed, up->total_size);
			up->exists = 0;
			upload_start_work(up, WORK_DISCARD);
		}
	}
	for (size_t i = 0; i < nparked && st->redis.ready; i++) {
		struct op *op = calloc(1, sizeof(*op));
		if (op == NULL)
			break;
		struct upload *u = upload_find(st, &parked[i]);
		if (u)
			u->release_wanted = 1;
		op->type = OP_SWEEP;
		op_dispatch(st, op, &parked[i]);
	}
	if (st->sweep && !st->sweep->busy) {
		st->sweep->busy = 1;
		st->sweep->st = st;
		st->sweep->job.work = sweep_work;
		st->sweep->job.done = sweep_done;
		pool_submit(st->pool, &st->sweep->job);
	}
}

/* ---------------------------------------------------------------- worker links */

static void client_release(struct client *cl)
{
	if (--cl->refs == 0 && cl->dead) {
		buf_free(&cl->in);
		buf_free(&cl->out);
		free(cl->block);
		free(cl);
	}
}

static void client_close(struct client *cl)
{
	struct storage *st = cl->st;
	ev_io_stop(st->loop, &cl->io);
	close(cl->fd);
	cl->dead = 1;
	struct client **pp = &st->clients;
	while (*pp && *pp != cl)
		pp = &(*pp)->next;
	if (*pp)
		*pp = cl->next;
	client_release(cl);   /* the link's own reference; queued ops hold theirs */
}

/* Handles one message. block, when not NULL, is payload in its own allocation,
 * which a chunk op takes over (it is freed here otherwise). */
static void client_on_message(struct client *cl, const struct ipc_header *h, const uint8_t *payload,
    uint8_t *block)
{
	struct storage *st = cl->st;
	if (h->type == IPC_WORKER_STORAGE_PING) {
		free(block);
		if (ipc_encode_ping(&cl->out, h->reqid, 1) == 0)
			client_flush(cl);
		return;
	}
	struct upload_key key;
	memset(&key, 0, sizeof(key));
	struct op *op;
	if (h->type == IPC_WORKER_STORAGE_CHUNK) {
		struct ipc_chunk c;
		if (ipc_decode_chunk(payload, h->len, &c) < 0) {
			log_warnx("malformed chunk message from a worker: dropped");
			free(block);
			return;
		}
		if (block == NULL && (block = malloc(c.data_len ? c.data_len : 1)) != NULL) {
			memcpy(block, c.data, c.data_len);   /* it came in the link's buffer */
			c.data = block;
		}
		op = block ? calloc(1, sizeof(*op)) : NULL;
		if (op == NULL) {
			free(block);
			return;
		}
		op->type = OP_CHUNK;
		op->seq = c.seq;
		op->trans_size = c.trans_size;
		op->total_size = c.total_size;
		op->offset = c.trans_size - c.data_len;
		op->last = c.last;
		op->kind = c.kind;
		memcpy(op->name, c.name, c.name_len);
		op->name[c.name_len] = '\0';
		op->name_len = c.name_len;
		op->data_len = c.data_len;
		op->data = c.data;
		op->block = block;
		key.uid = c.uid;
		memcpy(key.md5, c.md5, sizeof(key.md5));
	} else if (h->type == IPC_WORKER_STORAGE_RELEASE) {
		free(block);
		struct ipc_sync s;
		if (ipc_decode_sync(payload, h->len, &s) < 0) {
			log_warnx("malformed release message from a worker: dropped");
			return;
		}
		key.uid = s.uid;
		memcpy(key.md5, s.md5, sizeof(key.md5));
		struct upload *up = upload_find(st, &key);
		if (up != NULL) {
			/* Its client left: once idle, the lease goes back so another node can take over at once. */
			up->release_wanted = 1;
			upload_run(up);
		}
		return;
	} else if (h->type == IPC_WORKER_STORAGE_SYNC) {
		free(block);
		struct ipc_sync s;
		if (ipc_decode_sync(payload, h->len, &s) < 0) {
			log_warnx("malformed sync message from a worker: dropped");
			return;
		}
		op = calloc(1, sizeof(*op));
		if (op == NULL)
			return;
		op->type = OP_SYNC;
		key.uid = s.uid;
		memcpy(key.md5, s.md5, sizeof(key.md5));
	} else {
		free(block);
		log_warnx("unexpected message type %u from a worker", h->type);
		return;
	}
	op->client = cl;
	op->reqid = h->reqid;
	cl->refs++;
	op_dispatch(st, op, &key);
}

/* Receives the rest of a chunk message into its block and, in the same call, the
 * header of the next message into the link's buffer. 1: go on reading, 0: no more
 * data now, -1: the link was closed. */
static int client_read_block(struct client *cl)
{
	uint8_t *next = buf_reserve(&cl->in, IPC_HEADER_LEN);
	if (next == NULL) {
		client_close(cl);
		return -1;
	}
	struct iovec iov[2] = {
		{ cl->block + cl->block_got, cl->block_header.len - cl->block_got },
		{ next, IPC_HEADER_LEN },
	};
	ssize_t n = readv(cl->fd, iov, 2);
	if (n <= 0) {
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			return 0;
		client_close(cl);
		return -1;
	}
	size_t into_block = (size_t)n < iov[0].iov_len ? (size_t)n : iov[0].iov_len;
	cl->block_got += into_block;
	buf_commit(&cl->in, (size_t)n - into_block);
	if (cl->block_got < cl->block_header.len)
		return 0;
	uint8_t *block = cl->block;
	cl->block = NULL;
	client_on_message(cl, &cl->block_header, block, block);
	return cl->dead ? -1 : 1;
}

static void client_on_io(struct ev_loop *loop, ev_io *io, int revents)
{
	(void)loop;
	struct client *cl = io->data;
	if (revents & EV_WRITE)
		client_flush(cl);
	if (!(revents & EV_READ))
		return;
	cl->refs++;   /* answers inside the loops below must not free cl */
	for (int reads = 0; reads < 64 && !cl->dead; reads++) {
		if (cl->block != NULL) {
			if (client_read_block(cl) <= 0)
				break;
		} else {
			/* Small reads: at most what completes the message at the head, so that a
			 * chunk's payload is never read into this buffer but into its own block. */
			size_t want = IPC_HEADER_LEN;
			struct ipc_header h;
			const uint8_t *payload;
			enum ipc_status st = ipc_decode_header(buf_head(&cl->in), buf_len(&cl->in), &h, &payload);
			if (st == IPC_NEED_MORE && buf_len(&cl->in) >= IPC_HEADER_LEN)
				want = IPC_HEADER_LEN + h.len;
			if (st == IPC_NEED_MORE) {
				want -= buf_len(&cl->in);
				uint8_t *p = buf_reserve(&cl->in, want);
				if (p == NULL) {
					client_close(cl);
					break;
				}
				ssize_t n = recv(cl->fd, p, want, 0);
				if (n <= 0) {
					if (!(n < 0 && (errno == EAGAIN || errno == EINTR)))
						client_close(cl);
					break;
				}
				buf_commit(&cl->in, (size_t)n);
			}
		}
		/* Messages complete in the buffer, and the start of a chunk's block. */
		for (;;) {
			struct ipc_header h;
			const uint8_t *payload;
			enum ipc_status s = ipc_decode_header(buf_head(&cl->in), buf_len(&cl->in), &h, &payload);
			if (s == IPC_NEED_MORE && buf_len(&cl->in) >= IPC_HEADER_LEN && h.type == IPC_WORKER_STORAGE_CHUNK &&
			    cl->block == NULL) {
				/* Whatever of the payload is here already moves to the block (only
				 * bytes read before the header was known, at most a header's worth). */
				size_t have = buf_len(&cl->in) - IPC_HEADER_LEN;
				cl->block = malloc(h.len ? h.len : 1);
				if (cl->block == NULL) {
					client_close(cl);
					break;
				}
				cl->block_header = h;
				memcpy(cl->block, buf_head(&cl->in) + IPC_HEADER_LEN, have);
				cl->block_got = have;
				buf_consume(&cl->in, IPC_HEADER_LEN + have);
				break;
			}
			if (s == IPC_NEED_MORE)
				break;
			if (s == IPC_BAD) {
				log_warnx("bad message header from a worker: closing its link");
				client_close(cl);
				break;
			}
			client_on_message(cl, &h, payload, NULL);
			if (cl->dead)
				break;
			buf_consume(&cl->in, IPC_HEADER_LEN + h.len);
		}
	}
	client_release(cl);
}

static void storage_on_accept(struct ev_loop *loop, ev_io *io, int revents)
{
	(void)revents;
	struct storage *st = io->data;
	for (;;) {
		int fd = accept4(st->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			/* Out of descriptors: the socket stays readable, so waiting on it would spin. */
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
				log_warn("accept4() on the storage socket failed: pausing accepts for %.1f s", ACCEPT_PAUSE);
				ev_io_stop(loop, &st->accept_io);
				ev_timer_set(&st->accept_pause, ACCEPT_PAUSE, 0.);
				ev_timer_start(loop, &st->accept_pause);
			}
			return;
		}
		struct client *cl = calloc(1, sizeof(*cl));
		if (cl == NULL) {
			close(fd);
			continue;
		}
		cl->st = st;
		cl->fd = fd;
		cl->refs = 1;   /* the link itself */
		cl->next = st->clients;
		st->clients = cl;
		ev_io_init(&cl->io, client_on_io, fd, EV_READ);
		cl->io.data = cl;
		ev_io_start(loop, &cl->io);
	}
}

static void storage_on_accept_pause(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)revents;
	struct storage *st = t->data;
	ev_io_start(loop, &st->accept_io);
}

/* ---------------------------------------------------------------- lifecycle */

static void storage_on_stop(struct ev_loop *loop, ev_signal *s, int revents)
{
	(void)s;
	(void)revents;
	ev_break(loop, EVBREAK_ALL);
}

static void storage_on_usr1(struct ev_loop *loop, ev_signal *s, int revents)
{
	(void)loop;
	(void)s;
	(void)revents;
	if (log_reopen() < 0)
		log_warn("cannot reopen the log file");
}

/* At exit: what is on disk stays; memory goes back, so leak checkers see real leaks only. */
static void storage_free_all(struct storage *st)
{
	struct upload *up, *tmp;
	HASH_ITER(hh, st->uploads, up, tmp) {
		HASH_DEL(st->uploads, up);
		while (up->head) {
			struct op *op = up->head;
			up->head = op->next;
			op_free(op);
		}
		st->backend.ops->staging_close(up->stg);
		md5_free(&up->md5);
		free(up);
	}
	while (st->clients)
		client_close(st->clients);
	struct user_count *u, *utmp;
	HASH_ITER(hh, st->users, u, utmp) {
		HASH_DEL(st->users, u);
		free(u);
	}
}

static void make_dir(const char *path)
{
	if (mkdir(path, 0750) < 0 && errno != EEXIST)
		fatal("mkdir(%s) failed", path);
}

int storage_main(const struct conf *conf, int listen_fd)
{
	struct storage sto, *st = &sto;
	memset(st, 0, sizeof(*st));
	prctl(PR_SET_PDEATHSIG, SIGTERM);
	if (getppid() == 1)
		return 0;
	/* RLIMIT_FSIZE must turn into EFBIG (answered 1028), not a signal. */
	signal(SIGXFSZ, SIG_IGN);
	signal(SIGPIPE, SIG_IGN);
	st->conf = conf;
	st->listen_fd = listen_fd;
	st->loop = ev_loop_new(EVFLAG_AUTO);
	if (st->loop == NULL || json_writer_init(&st->jw) < 0)
		fatalx("cannot start the storage loop");
	char err[512];
	if (backend_open(&st->backend, conf, BACKEND_WRITER, err, sizeof(err)) < 0)
		fatalx("storage backend: %s", err);
	if (conf->dedup != DEDUP_OFF && !dedup_enabled(st))
		log_info("[storage] dedup: instant upload is unavailable with the %s backend (no content index): "
		    "every upload sends every byte", st->backend.ops->name);
	/* The icon retry queue stays on the local disk whatever the backend. */
	make_dir(conf->root);
	int n = snprintf(st->pending, sizeof(st->pending), "%s/" PENDING_DIR, conf->root);
	if (n < 0 || (size_t)n >= sizeof(st->pending))
		fatalx("[storage] root is too long");
	make_dir(st->pending);
	/* Nothing is read back at start: an upload is read back when a request for it comes, under its
	 * lease (another node sharing the storage may be writing it now), and the janitor removes what
	 * was abandoned. */
	if ((st->sweep = calloc(1, sizeof(*st->sweep))) == NULL)
		fatalx("out of memory");
	if (lease_owner()[0] == '\0')
		lease_owner_init(conf->node);
	struct rlimit nofile;
	if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur != RLIM_INFINITY &&
	    nofile.rlim_cur < (rlim_t)conf->max_uploads + 64)
		log_warnx("the file limit (%llu) is below max_uploads (%d) + 64: uploads may fail with 1015 "
		    "before max_uploads refuses them; raise LimitNOFILE or lower max_uploads",
		    (unsigned long long)nofile.rlim_cur, conf->max_uploads);

	st->pool = pool_create(st->loop, conf->io_threads);
	if (st->pool == NULL)
		fatalx("cannot start disk threads");
	rds_init(&st->redis, st->loop, conf, storage_on_redis_ready, st);
	st->pg = pg_create(st->loop, conf, &st->redis, st->pending);
	if (st->pg == NULL)
		fatalx("cannot start the postgres client");

	ev_signal_init(&st->sig_term, storage_on_stop, SIGTERM);
	ev_signal_start(st->loop, &st->sig_term);
	ev_signal_init(&st->sig_int, storage_on_stop, SIGINT);
	ev_signal_start(st->loop, &st->sig_int);
	ev_signal_init(&st->sig_quit, storage_on_stop, SIGQUIT);
	ev_signal_start(st->loop, &st->sig_quit);
	ev_signal_init(&st->sig_usr1, storage_on_usr1, SIGUSR1);
	ev_signal_start(st->loop, &st->sig_usr1);
	signal(SIGHUP, SIG_IGN);
	ev_timer_init(&st->janitor, storage_on_janitor, conf->janitor_interval, conf->janitor_interval);
	st->janitor.data = st;
	ev_timer_start(st->loop, &st->janitor);
	ev_io_init(&st->accept_io, storage_on_accept, listen_fd, EV_READ);
	st->accept_io.data = st;
	ev_io_start(st->loop, &st->accept_io);
	ev_timer_init(&st->accept_pause, storage_on_accept_pause, ACCEPT_PAUSE, 0.);
	st->accept_pause.data = st;
	/* Free space is measured once now, then on a disk thread: statvfs can block. */
	struct statvfs sv;
	if (statvfs(conf->root, &sv) == 0) {
		st->free_bytes = (uint64_t)sv.f_bavail * (uint64_t)sv.f_frsize;
		st->free_known = 1;
	}
	ev_timer_init(&st->space_timer, storage_on_space_timer, SPACE_INTERVAL, SPACE_INTERVAL);
	st->space_timer.data = st;
	ev_timer_start(st->loop, &st->space_timer);
	/* Alive from now on, as far as the agent-check can tell. */
	if (stats_self)
		atomic_store(&stats_self->alive_ms, stats_mono_ms());
	ev_timer_init(&st->health_timer, storage_on_health_timer, 0., HEALTH_INTERVAL);
	st->health_timer.data = st;
	ev_timer_start(st->loop, &st->health_timer);

	log_info("serving workers on %s/%s", conf->run_dir, IPC_SOCKET_NAME);
	ev_run(st->loop, 0);
	log_info("stopping");
	st->stopping = 1;
	/* Disk work in flight finishes first: every acknowledged byte is already written. */
	pool_destroy(st->pool);
	pg_destroy(st->pg);
	rds_close(&st->redis);
	storage_free_all(st);
	free(st->sweep);
	backend_close(&st->backend);
	json_writer_free(&st->jw);
	ev_loop_destroy(st->loop);
	return 0;
}

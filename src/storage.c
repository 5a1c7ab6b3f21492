/* storage.c: the storage process: writes upload chunks in order per file, records progress, publishes. */
#include "config.h"
#include "storage.h"
#include "backend.h"
#include "buf.h"
#include "conf.h"
#include "ipc.h"
#include "json.h"
#include "log.h"
#include "pg.h"
#include "pool.h"
#include "proto.h"
#include "rds.h"
#include "stats.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <md5.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <uthash.h>

#define PENDING_DIR ".pending"
#define READ_CHUNK (256 * 1024)
#define HASH_BLOCK (1024 * 1024)

/* A worker connected over the Unix socket. */
struct client {
	struct storage *st;
	int fd;
	ev_io io;
	struct buf in, out;
	int dead;          /* the link is closed; answers are dropped */
	int refs;          /* ops still holding this client */
	struct client *next;
};

enum op_type { OP_CHUNK, OP_SYNC };

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
	struct op *next;
	uint8_t data[];
};

struct upload_key {
	uint64_t uid;
	char md5[PROTO_MD5_HEX + 1];
};

enum disk_work { WORK_START, WORK_WRITE, WORK_HASH, WORK_COMPLETE, WORK_DISCARD };

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
	MD5_CTX md5;                  /* incremental hash of [0, hashed) */
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
	/* The disk job of the running op. */
	struct pool_job job;
	enum disk_work work;
	int work_errno;
	int work_error;               /* proto error set by the job */
};

struct storage {
	struct ev_loop *loop;
	const struct conf *conf;
	int listen_fd;
	ev_io accept_io;
	ev_signal sig_term, sig_int, sig_quit, sig_usr1;
	ev_timer janitor;
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
	if (error && op->type == OP_CHUNK)
		STAT_INC(uploads_failed);
	if (!cl->dead) {
		struct ipc_result r = { .error = (uint32_t)error };
		if (up && up->exists) {
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
	client_release(op->client);
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

static void upload_unpin(struct upload *up)
{
	if (--up->pins == 0 && up->retired) {
		up->st->backend.ops->staging_close(up->stg);
		free(up);
	}
}

static void record_write(struct upload *up);

static void record_on_reply(redisAsyncContext *c, void *reply, void *privdata)
{
	(void)c;
	struct upload *up = privdata;
	redisReply *rep = reply;
	up->record_inflight = 0;
	int ok = rep && rep->type != REDIS_REPLY_ERROR;
	if (!ok)
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
	if (up->record_dirty && ok && !up->retired)
		record_write(up);
	int retired = up->retired;
	upload_unpin(up);
	if (!retired)
		upload_run(up);
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
	json_end(jw, &body, &len);
	if (rds_command(&st->redis, record_on_reply, up, "SETEX %s %d %b", key, st->conf->upload_ttl,
	    body, len) < 0) {
		up->record_dirty = 1;
		return;
	}
	up->record_dirty = 0;
	up->record_inflight = 1;
	up->pins++;
}

static void record_delete(struct upload *up)
{
	char key[RECORD_KEY_MAX];
	record_key(up->st, &up->key, key, sizeof(key));
	rds_command(&up->st->redis, NULL, NULL, "DEL %s", key);
}

/* Redis (re)connected: it may have come back empty, so record every upload again. */
static void storage_on_redis_ready(struct rds *r)
{
	struct storage *st = r->data;
	struct upload *up, *tmp;
	HASH_ITER(hh, st->uploads, up, tmp) {
		if (up->exists) {
			up->record_dirty = 1;
			record_write(up);
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
	if (op->offset > up->hashed) {
		up->hash_dirty = 1;   /* cannot happen: gaps are refused */
		return;
	}
	uint64_t skip = up->hashed - op->offset;   /* equal to what is hashed: check_rewrite said so */
	MD5Update(&up->md5, op->data + skip, (size_t)(op->data_len - skip));
	up->hashed = end;
}

static int hash_staging(const struct backend *be, struct backend_staging *stg, uint64_t size,
    char out[PROTO_MD5_HEX + 1])
{
	MD5_CTX ctx;
	MD5Init(&ctx);
	uint8_t *block = malloc(HASH_BLOCK);
	if (block == NULL)
		return ENOMEM;
	uint64_t off = 0;
	while (off < size) {
		size_t want = size - off < HASH_BLOCK ? (size_t)(size - off) : HASH_BLOCK;
		size_t got = 0;
		int err = be->ops->staging_read(stg, block, want, off, &got);
		if (err || got == 0) {
			free(block);
			return err ? err : EIO;
		}
		MD5Update(&ctx, block, got);
		off += got;
	}
	free(block);
	MD5End(&ctx, out);
	return 0;
}

static void work_complete(struct upload *up)
{
	struct storage *st = up->st;
	const struct backend *be = &st->backend;
	if ((up->work_errno = be->ops->staging_sync(up->stg, BACKEND_SYNC_PUBLISH)) != 0)
		return;
	char digest[PROTO_MD5_HEX + 1];
	if (up->hash_dirty || up->hashed != up->total_size) {
		up->work_errno = hash_staging(be, up->stg, up->total_size, digest);
		if (up->work_errno)
			return;
	} else {
		MD5End(&up->md5, digest);
	}
	/* The running hash is used up: should publishing fail below, a resent last chunk re-reads the file. */
	up->hash_dirty = 1;
	if (strcmp(digest, up->key.md5) != 0) {
		up->work_error = ERR_CHECKSUM;
		be->ops->staging_discard(up->stg, BACKEND_NO_FENCE);
		return;
	}
	int flags = 0;
	int err = be->ops->publish(up->stg, BACKEND_NO_FENCE, &flags);
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
		if ((up->work_errno = be->ops->staging_begin(&up->st->backend, &meta, BACKEND_NO_FENCE, &up->stg)) != 0)
			return;
		MD5Init(&up->md5);
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
		    BACKEND_NO_FENCE)) != 0)
			return;
		if ((up->work_errno = be->ops->staging_sync(up->stg, BACKEND_SYNC_CHUNK)) != 0)
			return;
		/* Other chunks are hashed after their answer went out (WORK_HASH), off the round trip. */
		if (up->work == WORK_START || op->offset + op->data_len == up->total_size ||
		    op->offset + op->data_len == op->total_size)
			hash_chunk(up, op);
		return;
	case WORK_HASH:
		hash_chunk(up, op);
		return;
	case WORK_COMPLETE:
		work_complete(up);
		return;
	case WORK_DISCARD:
		if (up->stg)
			be->ops->staging_discard(up->stg, BACKEND_NO_FENCE);
		return;
	}
}

/* ---------------------------------------------------------------- the upload state machine (loop) */

static struct upload *upload_find(struct storage *st, const struct upload_key *key)
{
	struct upload *up;
	HASH_FIND(hh, st->uploads, key, sizeof(*key), up);
	return up;
}

static struct upload *upload_new(struct storage *st, const struct upload_key *key)
{
	struct upload *up = calloc(1, sizeof(*up));
	if (up == NULL)
		return NULL;
	up->key = *key;
	up->st = st;
	up->xfer = -1;
	HASH_ADD(hh, st->uploads, key, sizeof(up->key), up);
	return up;
}

/* Takes the upload out of the table; requests queued behind start over on a fresh one. */
static void upload_retire(struct upload *up)
{
	struct storage *st = up->st;
	HASH_DEL(st->uploads, up);
	up->retired = 1;
	stats_transfer_close(up->xfer);
	up->xfer = -1;
	struct op *rest = up->head;
	up->head = up->tail = NULL;
	struct upload_key key = up->key;
	if (up->pins == 0) {
		st->backend.ops->staging_close(up->stg);
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

static void upload_work_done(struct pool_job *job)
{
	struct upload *up = (struct upload *)((char *)job - offsetof(struct upload, job));
	struct op *op = up->head;
	up->pins--;
	char msg[256];
	if (up->work == WORK_DISCARD) {
		up->running = 0;
		upload_retire(up);
		return;
	}
	if (up->work == WORK_HASH) {
		upload_pop(up);
		op_free(op);
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
		if (up->work == WORK_START)
			up->exists = 0;   /* a failed start leaves nothing to resume */
		upload_pop(up);
		op_answer(op, error, msg, up->exists ? up : NULL);
		upload_run(up);
		return;
	}
	if (up->work == WORK_START || up->work == WORK_WRITE) {
		if (up->work == WORK_START) {
			up->exists = 1;
			memcpy(up->name, op->name, op->name_len + 1u);
			up->name_len = op->name_len;
			up->kind = op->kind;
			up->total_size = op->total_size;
			up->chunk_len = op->data_len;
			up->committed = 0;
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
	/* WORK_COMPLETE: published. */
	log_info("upload %" PRIu64 "/%s complete: %.*s, %" PRIu64 " bytes", up->key.uid, up->key.md5,
	    (int)up->name_len, up->name, up->total_size);
	record_delete(up);
	STAT_INC(uploads_completed);
	if (up->kind == UPLOAD_AVATAR)
		pg_icon_queue(up->st->pg, up->key.uid);
	upload_pop(up);
	op_answer(op, ERR_OK, NULL, up);
	upload_retire(up);
}

/* Starts the request at the head of the queue unless one is already running. */
static void upload_run(struct upload *up)
{
	char msg[256];
	if (up->st->stopping)
		return;
	while (!up->running && up->head) {
		struct op *op = up->head;
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
			upload_start_work(up, WORK_START);
			return;
		}
		if (!up->exists) {
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
		if (op->offset > up->committed) {
			upload_pop(up);
			snprintf(msg, sizeof(msg), "trans_size: chunk starts at %" PRIu64 " but only %" PRIu64
			    " bytes are stored; resume from there", op->offset, up->committed);
			op_answer(op, ERR_OFFSET_INVALID, msg, up);
			continue;
		}
		upload_start_work(up, WORK_WRITE);
		return;
	}
	if (!up->running && up->head == NULL && !up->exists && !up->retired)
		upload_retire(up);   /* a placeholder that never started */
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

struct recover_ctx {
	struct storage *st;
	size_t loaded;
};

/* One staging entry found at start-up becomes an upload that can be resumed. */
static int recover_entry(const struct backend_entry *e, void *arg)
{
	struct recover_ctx *rc = arg;
	struct storage *st = rc->st;
	const struct backend_meta *m = &e->meta;
	struct upload_key key;
	memset(&key, 0, sizeof(key));   /* the table hashes the whole struct, padding included */
	key.uid = m->uid;
	memcpy(key.md5, m->md5, sizeof(key.md5));
	if (upload_find(st, &key) != NULL)
		return 0;   /* listed twice: the first one stands */
	struct upload *up = upload_new(st, &key);
	if (up == NULL)
		fatalx("out of memory recovering uploads");
	int err = st->backend.ops->staging_attach(&st->backend, m, &up->stg);
	if (err)
		fatalx("cannot recover upload %" PRIu64 "/%s: %s", m->uid, m->md5, strerror(err));
	up->exists = 1;
	memcpy(up->name, m->name, m->name_len + 1u);
	up->name_len = m->name_len;
	up->kind = m->kind;
	up->total_size = m->total_size;
	up->chunk_len = m->chunk_len;
	/* Chunks are written in order with no gaps, so the entry is a prefix of the upload:
	 * every byte in it counts, acknowledged or not (a torn write leaves a shorter prefix).
	 * A complete entry was not published, so its last chunk was never acknowledged:
	 * hold back one byte, and the resent last chunk completes it. */
	uint64_t size = e->size, total = m->total_size;
	up->committed = size < total ? size : (total > 0 ? total - 1 : 0);
	up->seq = m->chunk_len ? up->committed / m->chunk_len : 0;
	if (up->seq == 0)
		up->seq = 1;
	if (up->committed < size && st->backend.ops->staging_truncate(up->stg, up->committed,
	    BACKEND_NO_FENCE) != 0)
		log_warnx("upload %" PRIu64 "/%s: cannot cut the staging entry to %" PRIu64 " bytes", up->key.uid,
		    up->key.md5, up->committed);
	up->touched = e->mtime;
	up->hash_dirty = 1;
	rc->loaded++;
	return 0;
}

/* Rebuilds the uploads that were in progress from the backend's staging entries
 * (at start-up, before the loop runs: blocking here holds up nothing). */
static void storage_recover(struct storage *st)
{
	struct recover_ctx rc = { .st = st };
	size_t dropped = 0;
	int err = st->backend.ops->staging_list(&st->backend, recover_entry, &rc, &dropped);
	if (err)
		fatalx("cannot list the staging entries: %s", strerror(err));
	if (rc.loaded || dropped)
		log_info("recovered %zu uploads in progress, dropped %zu broken staging files", rc.loaded, dropped);
}

static void storage_on_janitor(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)loop;
	(void)revents;
	struct storage *st = t->data;
	struct upload *up, *tmp;
	HASH_ITER(hh, st->uploads, up, tmp) {
		if (!up->running && up->head == NULL && upload_expired(up)) {
			log_info("removing abandoned upload %" PRIu64 "/%s (%.*s, %" PRIu64 " of %" PRIu64 " bytes)",
			    up->key.uid, up->key.md5, (int)up->name_len, up->name, up->committed, up->total_size);
			up->exists = 0;
			upload_start_work(up, WORK_DISCARD);
		}
	}
}

/* ---------------------------------------------------------------- worker links */

static void client_release(struct client *cl)
{
	if (--cl->refs == 0 && cl->dead) {
		buf_free(&cl->in);
		buf_free(&cl->out);
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

static void client_on_message(struct client *cl, const struct ipc_header *h, const uint8_t *payload)
{
	struct storage *st = cl->st;
	if (h->type == IPC_WORKER_STORAGE_PING) {
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
			return;
		}
		op = malloc(sizeof(*op) + c.data_len);
		if (op == NULL)
			return;
		memset(op, 0, sizeof(*op));
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
		memcpy(op->data, c.data, c.data_len);
		key.uid = c.uid;
		memcpy(key.md5, c.md5, sizeof(key.md5));
	} else if (h->type == IPC_WORKER_STORAGE_SYNC) {
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
		log_warnx("unexpected message type %u from a worker", h->type);
		return;
	}
	op->client = cl;
	op->reqid = h->reqid;
	cl->refs++;
	op_dispatch(st, op, &key);
}

static void client_on_io(struct ev_loop *loop, ev_io *io, int revents)
{
	(void)loop;
	struct client *cl = io->data;
	if (revents & EV_WRITE)
		client_flush(cl);
	if (!(revents & EV_READ))
		return;
	uint8_t *p = buf_reserve(&cl->in, READ_CHUNK);
	if (p == NULL) {
		client_close(cl);
		return;
	}
	ssize_t n = recv(cl->fd, p, READ_CHUNK, 0);
	if (n <= 0) {
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			return;
		client_close(cl);
		return;
	}
	buf_commit(&cl->in, (size_t)n);
	cl->refs++;   /* answers inside the loop below must not free cl */
	for (;;) {
		struct ipc_header h;
		const uint8_t *payload;
		enum ipc_status s = ipc_decode_header(buf_head(&cl->in), buf_len(&cl->in), &h, &payload);
		if (s == IPC_NEED_MORE)
			break;
		if (s == IPC_BAD) {
			log_warnx("bad message header from a worker: closing its link");
			client_close(cl);
			break;
		}
		client_on_message(cl, &h, payload);
		buf_consume(&cl->in, IPC_HEADER_LEN + h.len);
	}
	client_release(cl);
}

static void storage_on_accept(struct ev_loop *loop, ev_io *io, int revents)
{
	(void)revents;
	struct storage *st = io->data;
	for (;;) {
		int fd = accept4(st->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0)
			return;
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
		free(up);
	}
	while (st->clients)
		client_close(st->clients);
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
	/* The icon retry queue stays on the local disk whatever the backend. */
	make_dir(conf->root);
	int n = snprintf(st->pending, sizeof(st->pending), "%s/" PENDING_DIR, conf->root);
	if (n < 0 || (size_t)n >= sizeof(st->pending))
		fatalx("[storage] root is too long");
	make_dir(st->pending);
	storage_recover(st);

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

	log_info("serving workers on %s/%s", conf->run_dir, IPC_SOCKET_NAME);
	ev_run(st->loop, 0);
	log_info("stopping");
	st->stopping = 1;
	/* Disk work in flight finishes first: every acknowledged byte is already written. */
	pool_destroy(st->pool);
	pg_destroy(st->pg);
	rds_close(&st->redis);
	storage_free_all(st);
	backend_close(&st->backend);
	json_writer_free(&st->jw);
	ev_loop_destroy(st->loop);
	return 0;
}

/* storage.c: the state machine of each upload in the storage process: chunks written in order, hashed, leased, published. */
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
#include "challenge.h"
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

static void upload_uncount(struct upload *up);

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

/* ---------------------------------------------------------------- upload memory */

/* Async work (disk, Redis) is over: a retired upload is freed by the last. */
void upload_unpin(struct upload *up)
{
	if (--up->pins == 0 && up->retired) {
		up->st->backend.ops->staging_close(up->stg);
		md5_free(&up->md5);
		free(up);
	}
}

/* ---------------------------------------------------------------- disk work (pool threads) */

/* A middle chunk smaller than this with nothing queued behind it (a stop-and-wait client: the JSON
 * path) is answered by its disk thread (job_submit), and then hashed by that thread, when the hash
 * stage is idle: its MD5 (about 50 us for 32 KiB) overlaps the answer's way back to the client,
 * where a batch of HASH_BATCH on another thread took a core for 0.4 ms every eight chunks and held
 * up the round trip of the chunk that started it (twice the others' at the median). Large chunks
 * and windows of chunks (the binary path) are answered by the loop, which sends the answers of
 * several completions at once, and hashed by the hash stage, so a window of them is written while
 * the last ones are hashed. */
#define DIRECT_MAX (128u << 10)

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

static void dedup_challenge_read(struct upload *up);

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

/* Is an upload whose chunk 1 holds chunk_len bytes of total_size one that may be instant? Chunk 1
 * must not be smaller than min(total_size, DEDUP_MIN_PROOF): the client chooses the chunk size,
 * and the challenged chunks are that size, so tiny chunks would make the proof a guess. A file of
 * one chunk is compared whole at completion instead. */
static int dedup_eligible(const struct storage *st, uint64_t chunk_len, uint64_t total_size)
{
	uint64_t floor = total_size < DEDUP_MIN_PROOF ? total_size : DEDUP_MIN_PROOF;
	return dedup_enabled(st) && chunk_len > 0 && chunk_len < total_size && chunk_len >= floor;
}

/* Could a client that does not hold the file guess these challenged bytes? Too short, one byte
 * value or a short pattern repeated, or the start of chunk 1 again (the client sent it): such a
 * chunk is compared but counts for nothing in the proof. Reads chunk 1 back (bounded: one chunk). */
static int dedup_chunk_weak(const struct upload *up, const uint8_t *data, size_t len)
{
	if (len < DEDUP_WEAK_LEN)
		return 1;
	/* The smallest period up to DEDUP_WEAK_PERIOD of the first 2 * DEDUP_WEAK_PERIOD bytes is the
	 * only one to try on the whole chunk (by Fine and Wilf, a window that long with two periods
	 * p <= q <= DEDUP_WEAK_PERIOD has period gcd(p, q)): linear, however the chunk is crafted. */
	size_t window = len < 2 * DEDUP_WEAK_PERIOD ? len : 2 * DEDUP_WEAK_PERIOD;
	for (size_t p = 1; p <= DEDUP_WEAK_PERIOD && p < window; p++)
		if (memcmp(data, data + p, window - p) == 0) {
			if (memcmp(data, data + p, len - p) == 0)
				return 1;
			break;
		}
	const struct backend *be = &up->st->backend;
	uint8_t *first = up->stg && len <= up->chunk_len ? malloc(len) : NULL;
	size_t got = 0;
	int same = first && be->ops->staging_read(up->stg, first, len, 0, &got) == 0 && got == len &&
	    memcmp(first, data, len) == 0;
	free(first);
	return same;
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

/* Notes what a backend's publish did (its error and BACKEND_* flags) in the upload; -1 if it failed. */
static int publish_outcome(struct upload *up, int err, int flags)
{
	if (flags & BACKEND_PUBLISHED)
		up->published = 1;
	if (err == 0)
		return 0;
	up->work_errno = err;
	if (flags & BACKEND_PATH_FAILED)
		up->work_error = ERR_CREATE_PATH;
	else if (flags & BACKEND_PUBLISHED)
		up->work_error = ERR_WRITE_PERMISSION;   /* in place, but may not survive a power cut */
	return -1;
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
	if (publish_outcome(up, err, flags) != 0)
		return -1;
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

/* The file's bytes made durable, checked against the MD5 and published under its name. */
static void work_publish(struct upload *up, struct storage *st, const struct backend *be)
{
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
	if (publish_outcome(up, err, flags) != 0)
		return;
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

static void work_complete(struct upload *up)
{
	struct storage *st = up->st;
	up->publish_started_us = stats_mono_us();
	work_publish(up, st, &st->backend);
	up->publish_ended_us = stats_mono_us();
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
		/* Beside the hash job the MD5 state is its own; the chunk starts past every byte hashed
		 * or queued to be (upload_start_work), so there is nothing to compare either. */
		if (!up->job_beside_hash)
			check_rewrite(up, op);
		if ((up->work_errno = be->ops->staging_write(up->stg, op->data, op->data_len, op->offset,
		    up->fence)) != 0)
			return;
		if ((up->work_errno = be->ops->staging_sync(up->stg, BACKEND_SYNC_CHUNK)) != 0)
			return;
		if (up->direct) {
			/* Written (and synced by policy): what the loop would answer is known, so the worker
			 * gets it now, and the loop takes the completion off the round trip. */
			struct ipc_result r = { .error = ERR_OK, .seq = up->direct_seq, .trans_size = up->direct_committed,
			    .total_size = up->total_size, .kind = (uint8_t)up->kind, .name = up->name, .name_len = up->name_len };
			up->direct_sent = op_reply_direct(op, &r) == 0;
		}
		/* Other chunks are hashed after their answer went out: one answered here right now, while
		 * the worker and the client take the answer (DIRECT_MAX; the hash stage is idle unless this
		 * job runs beside it), the others by the hash stage, so the next write need not wait. */
		if (!up->job_beside_hash && (up->work == WORK_START || op->offset + op->data_len == up->total_size ||
		    op->offset + op->data_len == op->total_size || up->direct_sent))
			hash_chunk(up, op);
		/* Instant upload: chunk 1 of a file of several chunks is compared with stored content. */
		up->dd_match = up->work == WORK_START && dedup_eligible(up->st, op->data_len, op->total_size) &&
		    content_equals(up, op->total_size, 0, op->data, op->data_len);
		return;
	case WORK_CHALLENGE:
		/* Compared even for a decoy (no content, or chunk 1 differed): the same work either way. */
		up->dd_match = content_equals(up, up->total_size, op->offset, op->data, op->data_len);
		up->dd_weak = dedup_chunk_weak(up, op->data, op->data_len);
		return;
	case WORK_LINK:
		work_link(up);
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
		up->load_fence = 0;
		if (up->work_errno == 0 && be->ops->staging_fence(up->stg, &up->load_fence) != 0)
			up->load_fence = 0;
		uint64_t total = up->load.meta.total_size;
		if (up->work_errno == 0 && total > 0 && up->load.size >= total && up->load_fence <= up->fence) {
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

struct upload *upload_find(struct storage *st, const struct upload_key *key)
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
	record_timer_init(up);
	HASH_ADD(hh, st->uploads, key, sizeof(up->key), up);
	return up;
}

/* Takes the upload out of the table; requests queued behind start over on a fresh one. */
static void hash_drop_queue(struct upload *up);

static void upload_retire(struct upload *up)
{
	struct storage *st = up->st;
	HASH_DEL(st->uploads, up);
	up->retired = 1;
	ev_timer_stop(st->loop, &up->lease_timer);
	record_timer_stop(up);
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
	if (!up->hash_running)
		hash_drop_queue(up);   /* nobody will publish it (hash_done drops it otherwise) */
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

void upload_pop(struct upload *up)
{
	struct op *op = up->head;
	up->head = op->next;
	if (up->head == NULL)
		up->tail = NULL;
	up->running = 0;
}

static void upload_work_done(struct pool_job *job);

/* ---------------------------------------------------------------- the hash stage */

/* Chunks written past the first are fed to the MD5 by a job of their own, in write order, while
 * the next chunks are written: an upload's chunks no longer wait for the hash of the one before.
 * A write runs beside that job only if it starts at or past everything hashed or queued (so it
 * rewrites nothing hashed and check_rewrite has nothing to do) and is not the final chunk (which
 * is hashed inline, then completion reads the MD5); every other disk job of the upload waits for
 * the stage to be idle. HASH_BACKLOG bounds the bytes written but not yet hashed. */
#define HASH_BACKLOG (8u << 20)

/* Written chunks wait in the hash queue until this many bytes are there (or a job needs the stage
 * idle, or the upload goes idle: the lease timer), so that small stop-and-wait chunks wake a disk
 * thread and the loop for their MD5 once per batch instead of once per chunk. Small beside the
 * ring (a slot is held until its chunk is hashed) and beside HASH_BACKLOG. */
#define HASH_BATCH (256u << 10)

/* Chunks are queued to be hashed or being hashed: the MD5 state belongs to the hash stage. */
static int hash_busy(const struct upload *up)
{
	return up->hash_running || up->hq_head != NULL;
}

static int write_beside_hash(const struct upload *up)
{
	const struct op *op = up->head;
	if (up->work != WORK_WRITE || op == NULL || op->type != OP_CHUNK || up->hash_pending >= HASH_BACKLOG)
		return 0;
	uint64_t end = op->offset + op->data_len;
	return op->offset >= up->hash_frontier && end < up->total_size && end < op->total_size;
}

static void hash_work(struct pool_job *job)
{
	struct upload *up = (struct upload *)((char *)job - offsetof(struct upload, hash_job));
	for (const struct op *op = up->hash_batch; op; op = op->next)
		hash_chunk(up, op);
}

static void hash_done(struct pool_job *job);
static void job_submit(struct upload *up);

static void hash_submit(struct upload *up)
{
	up->hash_batch = up->hq_head;
	up->hq_head = up->hq_tail = NULL;
	up->hash_running = 1;
	up->pins++;
	up->hash_job.work = hash_work;
	up->hash_job.done = hash_done;
	pool_submit(up->st->pool, &up->hash_job);
}

static void hash_free_ops(struct upload *up, struct op *op)
{
	while (op) {
		struct op *next = op->next;
		up->hash_pending -= op->data_len;
		op_free(op);
		op = next;
	}
}

static void hash_drop_queue(struct upload *up)
{
	hash_free_ops(up, up->hq_head);
	up->hq_head = up->hq_tail = NULL;
}

static void hash_done(struct pool_job *job)
{
	struct upload *up = (struct upload *)((char *)job - offsetof(struct upload, hash_job));
	hash_free_ops(up, up->hash_batch);
	up->hash_batch = NULL;
	up->hash_running = 0;
	if (up->retired) {
		hash_drop_queue(up);   /* nobody will publish it */
	} else if (up->hq_head && (up->hash_pending >= HASH_BATCH || (up->work_deferred && !write_beside_hash(up)))) {
		hash_submit(up);
	}
	if (up->work_deferred && (!hash_busy(up) || write_beside_hash(up))) {
		up->work_deferred = 0;
		up->job_beside_hash = hash_busy(up);
		job_submit(up);
	}
	upload_unpin(up);   /* may free a retired upload: last */
}

/* A written and answered chunk goes to the hash stage (the op keeps its bytes until hashed). */
static void hash_push(struct upload *up, struct op *op)
{
	uint64_t end = op->offset + op->data_len;
	if (!hash_busy(up)) {
		if (up->hash_dirty || end <= up->hashed) {
			op_free(op);   /* hash_chunk would do nothing with it */
			return;
		}
		up->hash_frontier = up->hashed;
	}
	if (end > up->hash_frontier)
		up->hash_frontier = end;
	op->next = NULL;
	if (up->hq_tail)
		up->hq_tail->next = op;
	else
		up->hq_head = op;
	up->hq_tail = op;
	up->hash_pending += op->data_len;
	if (!up->hash_running && up->hash_pending >= HASH_BATCH)
		hash_submit(up);
}

/* Hands the upload's step to a disk thread. A WORK_WRITE of a middle chunk is answered by its disk
 * thread (design.md, "The direct answer"): nothing the loop decides after the write changes that
 * answer (only the first chunk waits for its record, only the last completes, a proof asks for
 * another chunk), so the loop decides it here, from what it owns, and the thread only sends it.
 * Publishing fsyncs a whole file and its directory (tens of milliseconds, and the fsyncs of several
 * files wait for one journal commit): on the pool's slow lane, so that every thread is never in an
 * fsync at once while the chunk writes of other uploads wait. */
static void job_submit(struct upload *up)
{
	const struct op *op = up->head;
	up->direct_sent = 0;
	up->direct = up->work == WORK_WRITE && op != NULL && op->type == OP_CHUNK && op->wl != NULL &&
	    op->next == NULL && op->data_len < DIRECT_MAX && up->exists && !up->dd_challenging &&
	    op->offset + op->data_len < up->total_size && up->committed < up->total_size;
	if (up->direct) {
		uint64_t end = op->offset + op->data_len;
		up->direct_committed = end >= up->committed ? end : up->committed;   /* as work_done_written */
		up->direct_seq = end >= up->committed ? op->seq : up->seq;
	}
	if (up->work == WORK_COMPLETE)
		up->publish_queued_us = stats_mono_us();
	if (up->work == WORK_COMPLETE || up->work == WORK_LINK)
		pool_submit_slow(up->st->pool, &up->job);
	else
		pool_submit(up->st->pool, &up->job);
}

/* Hands what waits in the hash queue to the hash job now (the upload is idle, or a job needs the
 * stage idle). */
static void hash_flush(struct upload *up)
{
	if (!up->hash_running && up->hq_head && !up->retired)
		hash_submit(up);
}

/* Runs one step of the head request on a disk thread; the upload is busy until it is done. A job
 * that may not run beside the hash stage waits for it (hash_done submits it). */
void upload_start_work(struct upload *up, enum disk_work work)
{
	up->work = work;
	up->running = 1;
	up->pins++;
	up->job.work = upload_work;
	up->job.done = upload_work_done;
	if (hash_busy(up) && !write_beside_hash(up)) {
		hash_flush(up);
		up->work_deferred = 1;
		return;
	}
	up->job_beside_hash = hash_busy(up);
	job_submit(up);
}

/* ---------------------------------------------------------------- limits on uploads in progress */

static uint64_t kib(uint64_t bytes)
{
	return bytes / 1024 + (bytes % 1024 != 0);
}

/* Sets the upload's share of the bytes announced but not yet stored. Kept in KiB (rounded up) so the
 * sum over max_uploads uploads of max_file_size each cannot overflow. */
static struct user_count *user_find(struct storage *st, uint64_t uid);

static void space_set(struct upload *up, uint64_t left_bytes)
{
	struct storage *st = up->st;
	uint64_t before = up->left_accounted;
	st->announced_left -= before;
	up->left_accounted = kib(left_bytes);
	st->announced_left += up->left_accounted;
	struct user_count *u = before != up->left_accounted ? user_find(st, up->key.uid) : NULL;
	if (u != NULL)
		u->left = u->left - before + up->left_accounted;
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
		/* One uid may not announce more than half of the room above min_free_space with uploads
		 * in progress besides its first: a few bytes of chunk 1 under a large total_size each would
		 * otherwise let one user refuse every other user's uploads with 1028 (protocol.md §10a). */
		const struct user_count *u = user_find(st, up->key.uid);
		uint64_t mine = u ? u->left - (u->left >= up->left_accounted ? up->left_accounted : u->left) : 0;
		unsigned others_mine = u ? u->n - (up->counted ? 1u : 0u) : 0;
		uint64_t room = st->free_bytes / 1024 > kib((uint64_t)conf->min_free_space) ?
		    st->free_bytes / 1024 - kib((uint64_t)conf->min_free_space) : 0;
		if (others_mine > 0 && mine + kib(op->total_size) > room / 2) {
			snprintf(msg, msglen, "storage full for this user: its uploads in progress announce %" PRIu64
			    " KiB more and this one %" PRIu64 " KiB, over half of the %" PRIu64 " KiB available: "
			    "finish or abandon one", mine, kib(op->total_size), room);
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

void storage_on_space_timer(struct ev_loop *loop, ev_timer *t, int revents)
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
void upload_lost(struct upload *up, const char *holder)
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
	hash_flush(up);   /* no lease timer flushes it any more; read back, it is hashed anew anyway */
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
		if (fence > up->fence_floor)
			up->fence_floor = 0;
		/* A quarter of the lease is kept back for clock drift and a slow Redis answer. */
		up->lease_until = up->lease_asked + ttl * 0.75;
		up->wait_since = 0;
		ev_timer_stop(st->loop, &up->lease_timer);
		ev_timer_set(&up->lease_timer, ttl / 3, ttl / 3);
		ev_timer_start(st->loop, &up->lease_timer);
		if (up->record_dirty && up->exists && !up->check_hold)
			record_write(up);   /* (held back until WORK_CHECK confirmed what is in memory) */
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

void upload_lease_ask(struct upload *up)
{
	struct storage *st = up->st;
	char key[LEASE_KEY_MAX];
	lease_key(st, &up->key, key, sizeof(key));
	up->lease_asked = ev_now(st->loop);
	if (lease_acquire(&st->redis, key, st->conf->lease_ttl * 1000L, up->fence_floor, upload_on_lease, up) < 0) {
		upload_fail_queue(up, ERR_BUSY, "server busy: progress store unavailable, retry");
		return;
	}
	up->lease = UL_ASKING;
	up->pins++;
}

/* Redis reconnected while this upload was parked here: its record may be gone. The lease is taken
 * back only if nobody took it since (or Redis lost it), with the fence this node had; the entry is
 * checked against that fence before the record is written again, and the lease goes back at once.
 * A node that was not the last holder leaves it alone (its client is elsewhere, or will be). */
void upload_lease_reclaim(struct upload *up)
{
	struct storage *st = up->st;
	char key[LEASE_KEY_MAX];
	lease_key(st, &up->key, key, sizeof(key));
	up->lease_asked = ev_now(st->loop);
	if (lease_reclaim(&st->redis, key, st->conf->lease_ttl * 1000L, up->fence, upload_on_lease, up) < 0)
		return;   /* Redis is away again: the next reconnection comes back here */
	up->lease = UL_ASKING;
	up->reload_now = 1;
	up->release_wanted = 1;
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
	hash_flush(up);   /* parked: no lease timer flushes it any more */
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
	if (!up->head && !up->running)
		hash_flush(up);   /* idle: hash what waits for a batch, and let its ring slots go */
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
	if (up->load_fence > up->fence) {
		/* Redis says this node holds the lease with a fence lower than one a writer recorded: Redis
		 * lost writes (a failover promoted a replica that had not seen a later holding). Writing
		 * under the old fence would be refused forever; a fence above the recorded one fences that
		 * writer out instead. */
		log_info("upload %" PRIu64 "/%s: the entry carries fence %" PRIu64 ", above this lease's %" PRIu64
		    " (Redis lost writes): taking a higher one", up->key.uid, up->key.md5, up->load_fence, up->fence);
		up->fence_floor = up->load_fence;
		upload_lost(up, NULL);
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
	dedup_challenge_read(up);
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

/* ---------------------------------------------------------------- instant upload (loop side) */

static void upload_started_record(struct upload *up);

static uint64_t upload_chunks(const struct upload *up)
{
	return up->total_size / up->chunk_len + (up->total_size % up->chunk_len != 0);
}

/* With dedup = global, the answers before the end of a proof do not tell whether chunk 1 or a
 * challenged chunk matched: a failed draw goes on asking its chunks as decoys (design.md). */
static int dedup_hides(const struct upload *up)
{
	return up->st->conf->dedup == DEDUP_GLOBAL;
}

/* The proof Redis holds becomes this upload's: asked for from challenge[next] on, unless it was
 * drawn for other chunks (another chunk size), or (dedup = user) a wrong answer was given already.
 * A failed draw under dedup = global is asked as decoys and can only end in a normal upload. */
static void dedup_challenge_take(struct upload *up, const struct challenge *c, const char *where)
{
	up->dd_challenging = 0;
	up->dd_proving = 0;
	if (!c->present)
		return;
	const char *why = c->failed && !dedup_hides(up) ? "a challenged chunk was answered wrong before" :
	    c->chunk_len != up->chunk_len ? "its chunks were drawn for another chunk size" : NULL;
	for (int i = 0; why == NULL && i < c->count; i++)
		if (c->chunk[i] < 2 || c->chunk[i] > upload_chunks(up))
			why = "its chunks are past the end of the file";
	if (why) {
		log_info("upload %" PRIu64 "/%s: no instant upload (%s): uploading in full", up->key.uid, up->key.md5, why);
		return;
	}
	up->dd_count = c->count;
	memcpy(up->challenge, c->chunk, sizeof(up->challenge));
	up->dd_next = c->next;
	up->dd_proving = !c->failed;
	up->dd_strong = 0;   /* read back mid-proof: the chunks answered elsewhere are not counted */
	up->dd_challenging = up->dd_next < up->dd_count;
	if (up->dd_challenging && where)
		log_info("upload %" PRIu64 "/%s: instant-upload proof goes on here from chunk %" PRIu64, up->key.uid,
		    up->key.md5, up->challenge[up->dd_next]);
}

static void dedup_on_draw(void *data, enum lease_status status, const struct challenge *c)
{
	struct upload *up = data;
	if (!up->retired && !up->st->stopping) {
		if (status == LEASE_HELD)
			dedup_challenge_take(up, c, NULL);
		else
			up->dd_challenging = 0;   /* the record write below finds out what happened to the lease */
		upload_started_record(up);
	}
	upload_unpin(up);
}

/* Chunk 1 matched stored content (or, with dedup = global, any chunk 1 of a proof's size): the
 * chunks the client must show, at random offsets independent of the content, drawn once per
 * upload_ttl (Redis keeps the first draw: a client starting over gets the same chunks). A chunk 1
 * that did not match marks the draw failed in the same script. 0 when dedup_on_draw goes on. */
static int dedup_challenge_begin(struct upload *up)
{
	struct storage *st = up->st;
	/* Chunks from 2 (chunk 1 was compared already); from 3 when at least two remain to draw from:
	 * chunk 2 is what a client that does not wait for answers sends next, and a chunk asked for is
	 * compared, not stored, so asking for it cost such a client a 1018 and a resume. Every upload
	 * under dedup = global is asked now (decoys), so that case is no longer rare. */
	uint64_t first = upload_chunks(up) > DEDUP_CHALLENGES + 1 ? 3 : 2;
	uint64_t range = upload_chunks(up) - first + 1;
	struct challenge draw = { .present = 1, .chunk_len = up->chunk_len };
	draw.count = range < DEDUP_CHALLENGES ? (int)range : DEDUP_CHALLENGES;
	for (int i = 0; i < draw.count; i++) {
		int again;
		do {
			uint64_t r;
			randombytes_buf(&r, sizeof(r));   /* the modulo bias is below range / 2^64 */
			draw.chunk[i] = first + r % range;
			again = 0;
			for (int j = 0; j < i; j++)
				again |= draw.chunk[j] == draw.chunk[i];
		} while (again);
	}
	up->dd_next = 0;
	up->dd_challenging = 0;
	up->dd_proving = 0;
	up->dd_strong = 0;
	if (draw.count == 0)
		return -1;
	char lkey[LEASE_KEY_MAX], ckey[CHALLENGE_KEY_MAX];
	lease_key(st, &up->key, lkey, sizeof(lkey));
	challenge_key(st, &up->key, ckey, sizeof(ckey));
	if (up->lease != UL_OURS || challenge_get(&st->redis, lkey, ckey, st->conf->upload_ttl * 1000L, &draw, 1,
	    !up->dd_match, dedup_on_draw, up) < 0)
		return -1;   /* Redis away: a normal upload (no proof without a draw that is kept) */
	up->pins++;
	return 0;
}

/* Tells Redis how far the proof got (or that it failed) before the answer goes out. The write is
 * queued on the connection that later releases the lease, so the next holder reads it. */
static void dedup_challenge_store(struct upload *up, int failed)
{
	struct storage *st = up->st;
	char lkey[LEASE_KEY_MAX], ckey[CHALLENGE_KEY_MAX];
	lease_key(st, &up->key, lkey, sizeof(lkey));
	challenge_key(st, &up->key, ckey, sizeof(ckey));
	if (up->lease == UL_OURS)
		challenge_update(&st->redis, lkey, ckey, up->dd_next, failed, NULL, NULL);
}

static void dedup_on_read(void *data, enum lease_status status, const struct challenge *c)
{
	struct upload *up = data;
	up->loading = 0;
	if (!up->retired && !up->st->stopping) {
		if (status == LEASE_HELD)
			dedup_challenge_take(up, c, "read back");
		upload_run(up);
	}
	upload_unpin(up);
}

/* Read back with chunk 1 only: a proof begun on another node may be under way. */
static void dedup_challenge_read(struct upload *up)
{
	struct storage *st = up->st;
	if (!dedup_enabled(st) || up->committed != up->chunk_len || up->committed >= up->total_size ||
	    up->lease != UL_OURS)
		return;
	char lkey[LEASE_KEY_MAX], ckey[CHALLENGE_KEY_MAX];
	lease_key(st, &up->key, lkey, sizeof(lkey));
	challenge_key(st, &up->key, ckey, sizeof(ckey));
	if (challenge_get(&st->redis, lkey, ckey, 0, NULL, 0, 0, dedup_on_read, up) == 0) {
		up->loading = 1;   /* requests wait for the proof as for the entry */
		up->pins++;
	}
}

/* The proof failed or was interrupted: the upload goes on as a normal one from what is staged. A
 * decoy (chunk 1 never matched) is a normal upload all along: neither counted nor logged. */
static void dedup_fallback(struct upload *up, const char *why)
{
	if (!up->dd_challenging)
		return;
	up->dd_challenging = 0;
	if (!up->dd_proving && dedup_hides(up) && !up->dd_match_seen)
		return;
	STAT_INC(instant_fallbacks);
	log_info("upload %" PRIu64 "/%s: instant upload refused (%s): uploading in full", up->key.uid, up->key.md5,
	    why);
}

/* ---------------------------------------------------------------- disk work done, by outcome */

/* A challenged chunk was compared with the stored content. */
static void work_done_challenge(struct upload *up, struct op *op)
{
	up->running = 0;
	up->dd_received += op->data_len;
	up->touched = time(NULL);
	int right = up->dd_match && up->dd_proving;
	if (right && !up->dd_weak)
		up->dd_strong += op->data_len;
	if (!right && up->dd_proving)
		up->dd_proving = 0;
	uint64_t rest = up->total_size - up->chunk_len;
	if (!right && !dedup_hides(up)) {
		dedup_challenge_store(up, 1);   /* no second guess at these chunks, on any node */
		dedup_fallback(up, "a challenged chunk differs from the stored content");
	} else if (++up->dd_next < up->dd_count) {
		/* The next chunk is asked whatever this one was (dedup = global): a wrong answer shows
		 * only at the end, like a chunk 1 that did not match. */
		dedup_challenge_store(up, !up->dd_proving);
	} else if (up->dd_proving && up->dd_strong >= (rest < DEDUP_MIN_PROOF ? rest : DEDUP_MIN_PROOF)) {
		upload_start_work(up, WORK_LINK);   /* proven: the op stays at the head until published */
		return;
	} else {
		dedup_challenge_store(up, 1);
		dedup_fallback(up, up->dd_proving ? "the chunks asked for carry too little to prove possession" :
		    "a challenged chunk differs from the stored content");
	}
	upload_pop(up);
	op_answer(op, ERR_OK, NULL, up);   /* the next challenge, or where a normal upload goes on */
	upload_run(up);
}

/* Publishing from stored content ended. Returns 1 when it fell back to a normal upload or was
 * answered busy (answered here), 0 when the outcome is a completion's: published, or an error after
 * publishing. */
static int work_done_link(struct upload *up, struct op *op)
{
	up->dd_challenging = 0;
	if (up->work_errno == ETIMEDOUT && !up->published) {
		/* The storage did not answer: the entry may be left closed for the link (RADOS: "linked"),
		 * refusing writes. Busy; the next request reads the upload back, which reopens it, and
		 * the proof goes on from Redis. */
		log_warnx("upload %" PRIu64 "/%s: cannot publish from the stored content (%s): answering busy, "
		    "reading it back", up->key.uid, up->key.md5, strerror(up->work_errno));
		upload_pop(up);
		op_answer(op, ERR_BUSY, "server busy: the storage did not answer, retry", NULL);
		upload_lost(up, NULL);
		upload_run(up);
		return 1;
	}
	if ((up->work_errno || up->work_error) && !up->published && up->work_errno != ESTALE) {
		up->dd_challenging = 1;
		dedup_fallback(up, up->work_errno ? strerror(up->work_errno) : "cannot publish from the stored content");
		upload_pop(up);
		op_answer(op, ERR_OK, NULL, up);
		upload_run(up);
		return 1;
	}
	if (up->dd_linked) {
		up->committed = up->total_size;
		up->seq = up->total_size / up->chunk_len + (up->total_size % up->chunk_len != 0);
		space_update(up);
		stats_transfer_update(up->xfer, up->committed);
	}
	return 0;
}

/* A parked upload taken back with the same fence was confirmed against the storage, or not. */
static void work_done_check(struct upload *up)
{
	up->running = 0;
	up->check_hold = 0;
	if (up->work_errno) {
		log_info("upload %" PRIu64 "/%s: changed elsewhere while parked here (%s): reading it back",
		    up->key.uid, up->key.md5, strerror(up->work_errno));
		if (up->head == NULL && up->lease == UL_OURS) {
			/* Taken back idle after a reconnection: nothing here needs it, and its holder may be waiting. */
			char key[LEASE_KEY_MAX];
			lease_key(up->st, &up->key, key, sizeof(key));
			lease_release(&up->st->redis, key, 0, NULL, NULL);
		}
		upload_lost(up, NULL);
	} else {
		up->parked = 0;
	}
	upload_run(up);
}

/* A final chunk resent after publishing was checked against the published file. */
static void work_done_verify(struct upload *up, struct op *op)
{
	upload_pop(up);
	if (up->work_error) {
		/* A record left uploading whose name does not hold its bytes: the upload is lost, and
		 * its record must not make every later final chunk read the whole file again. */
		if (up->pub_by_digest)
			record_forget(up);
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
}

/* A start, write, completion or publish from stored content failed. */
static void work_done_failed(struct upload *up, struct op *op)
{
	char msg[256];
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
}

/* Chunk 1 started the staging entry, or a later chunk was written. */
static void work_done_written(struct upload *up, struct op *op)
{
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
		/* dedup = global asks a chunk 1 that did not match for decoys too: the answer to chunk 1
		 * never tells whether stored content begins with it. */
		up->dd_match_seen = up->dd_match;
		if (dedup_eligible(up->st, up->chunk_len, up->total_size) && (up->dd_match || dedup_hides(up)) &&
		    dedup_challenge_begin(up) == 0)
			return;   /* dedup_on_draw records and answers */
		upload_started_record(up);
		return;
	}
	record_write_soon(up);
	if (up->direct_sent) {
		STAT_INC(chunks_answered_direct);
		op_reply_direct_flush(op);   /* answered by the disk thread; what the socket left goes now */
	} else {
		op_reply(op, ERR_OK, NULL, up);
	}
	upload_pop(up);
	hash_push(up, op);   /* the next chunk may be written meanwhile */
	upload_run(up);
}

/* A started upload is answered from record_on_reply once Redis has its record. */
static void upload_started_record(struct upload *up)
{
	struct op *op = up->head;
	record_write(up);
	if (up->record_inflight) {
		up->awaiting_record = 1;
		return;
	}
	upload_pop(up);
	op_answer(op, ERR_BUSY, "server busy: cannot record the upload, retry", NULL);
	upload_run(up);
}

/* WORK_COMPLETE or WORK_LINK: published. */
static void work_done_published(struct upload *up, struct op *op)
{
	char msg[256];
	char name[ESCAPE_SIZE(PROTO_NAME_MAX)];
	escape_quoted(name, sizeof(name), up->name, up->name_len);
	uint64_t saved = up->total_size > up->dd_received ? up->total_size - up->dd_received : 0;
	if (up->dd_linked) {
		/* The worker marks the access log from this message; clients ignore it. */
		snprintf(msg, sizeof(msg), IPC_INSTANT_PREFIX "published from content already stored, %" PRIu64
		    " bytes not sent", saved);
		STAT_INC(uploads_instant);
		STAT_ADD(instant_bytes_saved, saved);
	}
	if (dedup_enabled(up->st)) {
		/* Proven, by the chunks asked or by every byte: the next upload of it may be asked other
		 * chunks (a failed draw, or the decoys of a first upload, would refuse it otherwise). */
		char ckey[CHALLENGE_KEY_MAX];
		challenge_key(up->st, &up->key, ckey, sizeof(ckey));
		rds_command(&up->st->redis, NULL, NULL, "DEL %s", ckey);
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

/* The running op's disk job is over (on the loop): one outcome each. */
static void upload_work_done(struct pool_job *job)
{
	struct upload *up = (struct upload *)((char *)job - offsetof(struct upload, job));
	struct op *op = up->head;
	up->pins--;
	switch (up->work) {
	case WORK_CHALLENGE:
		work_done_challenge(up, op);
		return;
	case WORK_LINK:
		if (work_done_link(up, op))
			return;
		break;   /* errors after publishing go the way of a completion's; success ends it like one */
	case WORK_DISCARD:
		up->running = 0;
		record_forget(up);   /* abandoned: no record may promise what is no longer staged */
		upload_retire(up);
		return;
	case WORK_LOAD:
		up->running = 0;
		upload_loaded(up);
		upload_run(up);
		return;
	case WORK_CHECK:
		work_done_check(up);
		return;
	case WORK_VERIFY:
		work_done_verify(up, op);
		return;
	case WORK_COMPLETE:
		/* The wait shows a publishing lane that cannot keep up (docs/performance.md). */
		if (up->publish_queued_us > 0 && up->publish_started_us >= up->publish_queued_us &&
		    up->publish_ended_us >= up->publish_started_us) {
			STAT_ADD(publish_wait_us, up->publish_started_us - up->publish_queued_us);
			STAT_ADD(publish_us, up->publish_ended_us - up->publish_started_us);
		}
		break;
	case WORK_START:
	case WORK_WRITE:
		break;
	}
	if (up->work_errno || up->work_error)
		work_done_failed(up, op);
	else if (up->work == WORK_START || up->work == WORK_WRITE)
		work_done_written(up, op);
	else
		work_done_published(up, op);
}

/* Starts the request at the head of the queue unless one is already running. */
void upload_run(struct upload *up)
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
			int final = op->trans_size == op->total_size;
			if (final && published_lookup(up) == 0)
				return;
			upload_pop(up);
			/* A final chunk whose published record cannot be read now may be a lost answer: retry. */
			if (final)
				op_answer(op, ERR_BUSY, "server busy: progress store unavailable, retry", NULL);
			else
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
	if (up->check_hold && up->exists && upload_lease_valid(up)) {
		upload_start_work(up, WORK_CHECK);   /* taken back idle: confirm memory before recording it */
		return;
	}
	if (!up->exists)
		upload_retire(up);   /* nothing in progress: a placeholder, or a sync answered 1012 */
	else if (up->release_wanted)
		upload_release(up);
}

void op_dispatch(struct storage *st, struct op *op, const struct upload_key *key)
{
	struct upload *up = upload_find(st, key);
	if (up == NULL && (up = upload_new(st, key)) == NULL) {
		op_answer(op, ERR_BUSY, "server busy: out of memory", NULL);
		return;
	}
	op->next = NULL;
	if (op->wl)
		up->driver = op->wl;
	STAT_INC(storage_queue);
	if (up->tail)
		up->tail->next = op;
	else
		up->head = op;
	up->tail = op;
	upload_run(up);
}

/* ---------------------------------------------------------------- recovery and janitor */

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

void storage_on_janitor(struct ev_loop *loop, ev_timer *t, int revents)
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
		/* Not on the slow lane: with io_threads of 3 or less that lane is one thread, and every
		 * publish would wait behind a scan of the whole staging area. */
		pool_submit(st->pool, &st->sweep->job);
	}
}


/* worker.c: accepts clients, frames and checks their requests, and answers them in order. */
#include "config.h"
#include "worker.h"
#include "backend.h"
#include "buf.h"
#include "conf.h"
#include "frame.h"
#include "ipc.h"
#include "json.h"
#include "log.h"
#include "pool.h"
#include "proto.h"
#include "proxy.h"
#include "rds.h"
#include "stats.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define READ_CHUNK 65536
#define ACCEPT_BURST 64
#define STORAGE_RETRY_MIN 0.05
#define STORAGE_RETRY_MAX 1.0

/* Where the request in progress is waiting. */
enum req_stage {
	STAGE_NONE = 0,
	STAGE_AUTH,        /* GET utoken_<uid> in flight */
	STAGE_STORAGE,     /* chunk or sync sent to the storage process */
	STAGE_DISK,        /* download read on a disk thread */
	STAGE_DLCHECK,     /* download read from a freshly opened file; GET of its download record in flight */
};

struct download_job;

/* The one request a connection is working on; later frames wait in the read buffer. */
struct request {
	uint16_t id;
	enum req_stage stage;
	uint64_t reqid;               /* matches the async answer to this request */
	yajl_val tree;                /* the parsed body; the structs below point into it */
	union {
		struct proto_chunk chunk;
		struct proto_sync sync;
		struct proto_download download;
	} u;
	struct proto_credentials *cred;
	struct download_job *job;     /* STAGE_DISK */
	struct download_job *checking;   /* STAGE_DLCHECK: read, waiting for the version check */
	ev_tstamp since;              /* when it started waiting */
};

struct conn {
	struct worker *w;
	int fd;
	uint32_t slot;                /* index in the worker's connection table */
	ev_io io;
	ev_timer timer;               /* idle, frame and dependency timeouts */
	struct buf in, out;
	ev_tstamp last_frame;         /* accept or last complete frame */
	ev_tstamp frame_start;        /* first byte of an incomplete frame, 0 when none */
	int busy;                     /* req is waiting for Redis, storage or the disk */
	int closing;                  /* send what is queued, then close */
	int eof;                      /* the client closed its side */
	int awaiting_proxy;           /* a PROXY header must come first */
	/* Credentials trusted on this connection. */
	int auth_valid;
	uint64_t auth_uid;
	uint8_t auth_token_hash[crypto_generichash_BYTES];
	ev_tstamp auth_until;
	/* Published files being downloaded, kept open so that a replacement mid-download is not mixed in. */
	struct dl_file *dl;           /* DL_CACHE entries, allocated by the first download */
	uint32_t dl_tick;
	struct request req;
	int xfer;                     /* download entry in the stats transfer table, -1 if none */
	char xfer_md5[PROTO_MD5_HEX + 1];   /* the upload whose duration is being timed */
	ev_tstamp xfer_start;
	char peer[64];
};

/* A file a connection is downloading: later chunks read the version chunk 1 opened. */
#define DL_CACHE 4
struct dl_file {
	struct backend_file *file;    /* NULL: free */
	uint64_t uid;
	uint64_t size;
	uint32_t used;                /* conn->dl_tick when last read: the oldest goes first */
	char name[PROTO_NAME_MAX + 1];
	char version[BACKEND_VERSION_MAX];
};

struct storage_link {
	int fd;
	int connected;                /* the socket is connected */
	int ready;                    /* the storage process answered our ping: requests may go */
	ev_io io;
	ev_timer retry;
	double retry_delay;
	struct buf in, out;
};

struct worker {
	struct ev_loop *loop;
	const struct conf *conf;
	int slot;
	int listen_fd;
	ev_io accept_io;
	ev_timer accept_pause;        /* after EMFILE */
	ev_signal sig_term, sig_int, sig_quit, sig_usr1, sig_usr2;
	int draining;                 /* 1: not accepting (retiring or stopping); 2: closing connections too */
	ev_timer drain_timer;
	struct conn **conns;          /* table indexed by conn->slot */
	uint32_t conns_cap;
	uint32_t *free_slots;
	uint32_t nfree;
	uint32_t nconns;
	uint32_t op_seq;              /* tags every async step; with the slot it forms a reqid */
	struct storage_link storage;
	struct rds redis;
	struct pool *pool;            /* reads of published files */
	struct backend backend;       /* where published files are read from */
	struct json_writer jw;
	struct proto_limits limits;
	uint8_t *scratch;             /* decoded chunk data, max_frame bytes */
	size_t scratch_cap;
	char *b64;                    /* encoded download data */
	size_t b64_cap;
};

struct download_job {
	struct pool_job job;
	struct worker *w;
	uint64_t reqid;
	const struct backend *backend;
	struct backend_file *file;    /* the file to read; NULL: open uid/name */
	struct backend_file *borrowed;   /* lent by the connection's cache, NULL if none (loop-owned) */
	int opened;                   /* file was opened by this job */
	int orphaned;                 /* the connection went away: close the file when done */
	uint64_t uid;
	char name[PROTO_NAME_MAX + 1];
	size_t name_len;
	char version[BACKEND_VERSION_MAX];
	uint64_t offset;
	size_t want;
	uint64_t size;                /* file size */
	int error;                    /* proto error, 0 on success */
	int saved_errno;
	size_t got;
	uint8_t data[];
};

static void conn_close(struct conn *c, const char *why);
static void conn_process(struct conn *c);
static void conn_update_io(struct conn *c);
static void request_continue(struct conn *c);
static void storage_connect(struct worker *w);

/* ---------------------------------------------------------------- responses */

/* Sends what it can; returns -1 when the connection was closed (c is gone). */
static int conn_flush(struct conn *c)
{
	while (buf_len(&c->out) > 0) {
		ssize_t n = send(c->fd, buf_head(&c->out), buf_len(&c->out), MSG_NOSIGNAL);
		if (n > 0) {
			buf_consume(&c->out, (size_t)n);
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		conn_close(c, "write failed");
		return -1;
	}
	if (buf_len(&c->out) == 0 && c->closing && !c->busy) {
		conn_close(c, NULL);
		return -1;
	}
	conn_update_io(c);
	return 0;
}

/* Queues one response frame with the writer's current JSON as body. */
static void conn_send_json(struct conn *c, uint16_t id, int error)
{
	const uint8_t *body;
	size_t len;
	json_end(&c->w->jw, &body, &len);
	STAT_INC(frames_out);
	STAT_ADD(bytes_out, FRAME_HEADER_LEN + len);
	if (error) {
		stats_count_error(error);
		if (error == ERR_TOKEN_INVALID || error == ERR_UID_INVALID)
			STAT_INC(auth_failures);
	}
	uint8_t header[FRAME_HEADER_LEN];
	frame_put_header(header, id, (uint32_t)len);
	if (buf_append(&c->out, header, sizeof(header)) < 0 || buf_append(&c->out, body, len) < 0) {
		log_warnx("%s: out of memory queueing a response: closing", c->peer);
		c->closing = 1;   /* conn_flush closes it; callers still hold c */
	}
}

/* A response that carries only error, message and what the request id needs. */
static void respond_error(struct conn *c, uint16_t req_id, int error, const char *message)
{
	struct json_writer *jw = &c->w->jw;
	json_begin(jw);
	json_put_int(jw, "error", error);
	if (message)
		json_put_str(jw, "message", message, strlen(message));
	conn_send_json(c, (uint16_t)(req_id + 1), error);
}

/* Finishes the current request: frees its tree and lets the next frame in. */
static void download_job_free(struct worker *w, struct download_job *j);

static void request_finish(struct conn *c)
{
	if (c->req.checking)
		download_job_free(c->w, c->req.checking);
	if (c->req.tree)
		yajl_tree_free(c->req.tree);
	memset(&c->req, 0, sizeof(c->req));
	c->busy = 0;
}

static void respond_chunk(struct conn *c, int error, const char *message, uint64_t seq,
    uint64_t trans_size, uint64_t total_size)
{
	struct json_writer *jw = &c->w->jw;
	const struct proto_chunk *ch = &c->req.u.chunk;
	json_begin(jw);
	json_put_int(jw, "error", error);
	json_put_int(jw, "total_size", (int64_t)total_size);
	json_put_int(jw, "seq", (int64_t)seq);
	json_put_str(jw, "name", ch->name, ch->name_len);
	json_put_int(jw, "trans_size", (int64_t)trans_size);
	json_put_int(jw, "last", ch->last);
	json_put_str(jw, "md5", ch->md5, strlen(ch->md5));   /* empty when md5 itself was refused */
	json_put_int(jw, "uid", (int64_t)ch->cred.uid);
	if (c->req.id == MSG_AVATAR)
		json_put_int(jw, "last_seq", (int64_t)ch->last_seq);
	if (message)
		json_put_str(jw, "message", message, strlen(message));
	conn_send_json(c, (uint16_t)(c->req.id + 1), error);
}

/* The request failed before reaching storage or disk: answer with its own fields. */
static void respond_request_error(struct conn *c, int error, const char *message)
{
	switch (c->req.id) {
	case MSG_UPLOAD:
	case MSG_AVATAR: {
		const struct proto_chunk *ch = &c->req.u.chunk;
		respond_chunk(c, error, message, ch->seq, ch->offset, ch->total_size);
		break;
	}
	default:
		respond_error(c, c->req.id, error, message);
		break;
	}
	request_finish(c);
}

/* ---------------------------------------------------------------- connection table */

static uint64_t conn_next_reqid(struct conn *c)
{
	/* Worker-wide, not per connection: a slot reused by a new connection must never
	 * receive an answer (a token check above all) owed to the one before it. */
	c->req.reqid = (uint64_t)++c->w->op_seq << 32 | c->slot;
	return c->req.reqid;
}

/* The connection still waiting for the answer tagged reqid, or NULL. */
static struct conn *conn_by_reqid(struct worker *w, uint64_t reqid)
{
	uint32_t slot = (uint32_t)reqid;
	if (slot >= w->conns_cap)
		return NULL;
	struct conn *c = w->conns[slot];
	if (c == NULL || !c->busy || c->req.reqid != reqid)
		return NULL;
	return c;
}

static int conn_table_add(struct worker *w, struct conn *c)
{
	if (w->nfree == 0) {
		uint32_t cap = w->conns_cap ? w->conns_cap * 2 : 256;
		struct conn **conns = realloc(w->conns, cap * sizeof(*conns));
		if (conns == NULL)
			return -1;
		w->conns = conns;
		uint32_t *free_slots = realloc(w->free_slots, cap * sizeof(*free_slots));
		if (free_slots == NULL)
			return -1;
		w->free_slots = free_slots;
		for (uint32_t i = cap; i > w->conns_cap; i--) {
			w->conns[i - 1] = NULL;
			w->free_slots[w->nfree++] = i - 1;
		}
		w->conns_cap = cap;
	}
	c->slot = w->free_slots[--w->nfree];
	w->conns[c->slot] = c;
	w->nconns++;
	return 0;
}

static void conn_table_remove(struct worker *w, struct conn *c)
{
	w->conns[c->slot] = NULL;
	w->free_slots[w->nfree++] = c->slot;
	w->nconns--;
}

/* ---------------------------------------------------------------- connection I/O */

static struct dl_file *dl_find(struct conn *c, uint64_t uid, const char *name, size_t name_len)
{
	for (int i = 0; c->dl && i < DL_CACHE; i++) {
		struct dl_file *f = &c->dl[i];
		if (f->file && f->uid == uid && strlen(f->name) == name_len && memcmp(f->name, name, name_len) == 0)
			return f;
	}
	return NULL;
}

/* Keeps file open for (uid, name), replacing an older view of that name or the least recently read file. */
static void dl_remember(struct conn *c, struct backend_file *file, uint64_t uid, const char *name, size_t name_len,
    uint64_t size, const char *version)
{
	const struct backend_ops *ops = c->w->backend.ops;
	if (c->dl == NULL) {
		c->dl = calloc(DL_CACHE, sizeof(*c->dl));
		if (c->dl == NULL) {
			ops->file_close(file);
			return;
		}
	}
	struct dl_file *f = dl_find(c, uid, name, name_len);   /* a newer view of the same name */
	for (int i = 0; f == NULL && i < DL_CACHE; i++)
		if (c->dl[i].file == NULL)
			f = &c->dl[i];
	if (f == NULL) {
		f = &c->dl[0];
		for (int i = 1; i < DL_CACHE; i++)
			if (c->dl[i].used < f->used)
				f = &c->dl[i];
	}
	ops->file_close(f->file);
	f->file = file;
	f->uid = uid;
	f->size = size;
	f->used = ++c->dl_tick;
	memcpy(f->name, name, name_len);
	f->name[name_len] = '\0';
	memcpy(f->version, version, sizeof(f->version));
}

/* Closes every kept file except keep (a disk thread may still be reading that one). */
static void conn_close_download(struct conn *c, struct backend_file *keep)
{
	for (int i = 0; c->dl && i < DL_CACHE; i++)
		if (c->dl[i].file && c->dl[i].file != keep)
			c->w->backend.ops->file_close(c->dl[i].file);
	free(c->dl);
	c->dl = NULL;
}

static void conn_close(struct conn *c, const char *why)
{
	struct worker *w = c->w;
	if (why)
		log_debug("%s: closed: %s", c->peer, why);
	ev_io_stop(w->loop, &c->io);
	ev_timer_stop(w->loop, &c->timer);
	struct backend_file *job_file = NULL;
	if (c->req.job) {
		/* A disk thread may be reading its file: the job closes it when it is done. */
		c->req.job->orphaned = 1;
		job_file = c->req.job->borrowed;
	}
	conn_close_download(c, job_file);
	request_finish(c);
	stats_transfer_close(c->xfer);
	close(c->fd);
	buf_free(&c->in);
	buf_free(&c->out);
	conn_table_remove(w, c);
	free(c);
	STAT_DEC(conn_current);
	if (w->draining && w->nconns == 0)
		ev_break(w->loop, EVBREAK_ALL);
}

/* Reads while there is no request in progress and the client reads its answers. */
static void conn_update_io(struct conn *c)
{
	struct worker *w = c->w;
	int events = 0;
	/* Reading on while a request waits saves epoll churn; one frame of
	 * read-ahead bounds what a pipelining client can park here. */
	if (!c->closing && !c->eof && buf_len(&c->out) < (size_t)w->conf->output_cap &&
	    buf_len(&c->in) < (size_t)w->conf->max_frame + FRAME_HEADER_LEN)
		events |= EV_READ;
	if (buf_len(&c->out) > 0)
		events |= EV_WRITE;
	if (events == (c->io.events & (EV_READ | EV_WRITE)) && ev_is_active(&c->io))
		return;
	ev_io_stop(w->loop, &c->io);
	if (events) {
		ev_io_set(&c->io, c->fd, events);
		ev_io_start(w->loop, &c->io);
	}
}

/* One timer per connection, re-armed lazily: activity only moves timestamps. */
static void conn_arm_timer(struct conn *c)
{
	struct worker *w = c->w;
	ev_tstamp now = ev_now(w->loop), deadline;
	if (c->busy)
		deadline = c->req.since + w->conf->storage_timeout;
	else {
		deadline = c->last_frame + w->conf->idle_timeout;
		if (c->frame_start > 0 && c->frame_start + w->conf->frame_timeout < deadline)
			deadline = c->frame_start + w->conf->frame_timeout;
	}
	double after = deadline - now;
	ev_timer_stop(w->loop, &c->timer);
	ev_timer_set(&c->timer, after > 0 ? after : 0.001, 0.);
	ev_timer_start(w->loop, &c->timer);
}

static void conn_on_timer(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)revents;
	struct conn *c = t->data;
	struct worker *w = c->w;
	ev_tstamp now = ev_now(loop);
	if (c->busy) {
		if (now - c->req.since >= w->conf->storage_timeout) {
			log_warnx("%s: request %u timed out waiting for %s", c->peer, c->req.id,
			    c->req.stage == STAGE_AUTH || c->req.stage == STAGE_DLCHECK ? "redis" :
			    c->req.stage == STAGE_DISK ? "the disk" : "storage");
			if (c->req.job) {
				conn_close(c, "disk read timed out");   /* the job may still hold the fd */
				return;
			}
			respond_request_error(c, ERR_BUSY, "server busy: a dependency did not answer in time");
			conn_process(c);
			return;
		}
	} else if (c->frame_start > 0 && now - c->frame_start >= w->conf->frame_timeout) {
		log_info("%s: frame not completed within %d s: closing", c->peer, w->conf->frame_timeout);
		conn_close(c, NULL);
		return;
	} else if (now - c->last_frame >= w->conf->idle_timeout) {
		log_debug("%s: idle for %d s: closing", c->peer, w->conf->idle_timeout);
		conn_close(c, NULL);
		return;
	}
	conn_arm_timer(c);
}

static void conn_on_io(struct ev_loop *loop, ev_io *io, int revents)
{
	(void)loop;
	struct conn *c = io->data;
	if (revents & EV_WRITE) {
		/* Frames that waited for the client to read its answers go on now. */
		if (conn_flush(c) == 0 && !c->busy && buf_len(&c->in) > 0 &&
		    buf_len(&c->out) < (size_t)c->w->conf->output_cap)
			conn_process(c);
		return;   /* a readable socket fires again */
	}
	if (!(revents & EV_READ))
		return;
	uint8_t *p = buf_reserve(&c->in, READ_CHUNK);
	if (p == NULL) {
		conn_close(c, "out of memory");
		return;
	}
	ssize_t n = recv(c->fd, p, READ_CHUNK, 0);
	if (n == 0) {
		c->eof = 1;
		/* Answer what is already complete, then close. */
		c->closing = 1;
		conn_process(c);
		return;
	}
	if (n < 0) {
		if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
			return;
		conn_close(c, "read failed");
		return;
	}
	buf_commit(&c->in, (size_t)n);
	STAT_ADD(bytes_in, n);
	if (c->busy)
		conn_update_io(c);   /* the read-ahead bound may be reached */
	else
		conn_process(c);
}

/* ---------------------------------------------------------------- credentials */

static void token_hash(uint8_t out[crypto_generichash_BYTES], const void *token, size_t len)
{
	crypto_generichash(out, crypto_generichash_BYTES, token, len, NULL, 0);
}

/* 1 when this connection already proved these credentials recently. */
static int auth_cached(struct conn *c, const struct proto_credentials *cred)
{
	if (!c->auth_valid || c->auth_uid != cred->uid || ev_now(c->w->loop) >= c->auth_until)
		return 0;
	uint8_t h[crypto_generichash_BYTES];
	token_hash(h, cred->token, cred->token_len);
	return sodium_memcmp(h, c->auth_token_hash, sizeof(h)) == 0;
}

static void auth_on_reply(redisAsyncContext *ctx, void *reply, void *privdata)
{
	(void)ctx;
	struct rds *r = ctx->data;
	struct worker *w = r->data;
	struct conn *c = conn_by_reqid(w, (uint64_t)(uintptr_t)privdata);
	if (c == NULL || c->req.stage != STAGE_AUTH)
		return;
	redisReply *rep = reply;
	const struct proto_credentials *cred = c->req.cred;
	if (rep == NULL || rep->type == REDIS_REPLY_ERROR) {
		respond_request_error(c, ERR_BUSY, "server busy: cannot read credentials");
	} else if (rep->type != REDIS_REPLY_STRING) {
		respond_request_error(c, ERR_UID_INVALID, "uid: no token for this user");
	} else {
		uint8_t want[crypto_generichash_BYTES], got[crypto_generichash_BYTES];
		token_hash(want, rep->str, rep->len);
		token_hash(got, cred->token, cred->token_len);
		if (sodium_memcmp(want, got, sizeof(want)) != 0) {
			log_info("%s: bad token for uid %" PRIu64, c->peer, cred->uid);
			respond_request_error(c, ERR_TOKEN_INVALID, "token: does not match");
		} else {
			c->auth_valid = 1;
			c->auth_uid = cred->uid;
			memcpy(c->auth_token_hash, got, sizeof(got));
			c->auth_until = ev_now(w->loop) + w->conf->auth_cache_ttl;
			c->req.stage = STAGE_NONE;
			c->busy = 0;
			/* It may be answered at once (storage down, a bad chunk): conn_process flushes that. */
			request_continue(c);
		}
	}
	conn_process(c);
}

/* Checks the request's credentials; returns 1 when it may go on now, 0 when
 * an answer will come (or has been queued). */
static int auth_check(struct conn *c)
{
	const struct proto_credentials *cred = c->req.cred;
	if (cred->anonymous || auth_cached(c, cred))
		return 1;
	struct worker *w = c->w;
	char key[64];
	snprintf(key, sizeof(key), "utoken_%" PRIu64, cred->uid);
	uint64_t reqid = conn_next_reqid(c);
	if (rds_command(&w->redis, auth_on_reply, (void *)(uintptr_t)reqid, "GET %s", key) < 0) {
		respond_request_error(c, ERR_BUSY, "server busy: credentials store unavailable");
		return 0;
	}
	c->busy = 1;
	c->req.stage = STAGE_AUTH;
	c->req.since = ev_now(w->loop);
	return 0;
}

/* ---------------------------------------------------------------- storage link */

static void storage_fail_waiting(struct worker *w)
{
	for (uint32_t i = 0; i < w->conns_cap; i++) {
		struct conn *c = w->conns[i];
		if (c && c->busy && c->req.stage == STAGE_STORAGE) {
			respond_request_error(c, ERR_BUSY, "server busy: storage unavailable, retry");
			conn_process(c);
		}
	}
}

static void storage_down(struct worker *w, const char *why)
{
	struct storage_link *s = &w->storage;
	if (s->fd >= 0) {
		log_warnx("storage link lost: %s", why);
		ev_io_stop(w->loop, &s->io);
		close(s->fd);
	}
	s->fd = -1;
	s->connected = 0;
	s->ready = 0;
	STAT_SET(storage_up, 0);
	buf_free(&s->in);
	buf_free(&s->out);
	storage_fail_waiting(w);
	ev_timer_stop(w->loop, &s->retry);
	ev_timer_set(&s->retry, s->retry_delay, 0.);
	ev_timer_start(w->loop, &s->retry);
	s->retry_delay = s->retry_delay * 2 > STORAGE_RETRY_MAX ? STORAGE_RETRY_MAX : s->retry_delay * 2;
}

static void storage_update_io(struct worker *w)
{
	struct storage_link *s = &w->storage;
	int events = EV_READ | (buf_len(&s->out) > 0 ? EV_WRITE : 0);
	if (ev_is_active(&s->io) && (s->io.events & (EV_READ | EV_WRITE)) == events)
		return;
	ev_io_stop(w->loop, &s->io);
	ev_io_set(&s->io, s->fd, events);
	ev_io_start(w->loop, &s->io);
}

static int storage_flush(struct worker *w)
{
	struct storage_link *s = &w->storage;
	while (buf_len(&s->out) > 0) {
		ssize_t n = send(s->fd, buf_head(&s->out), buf_len(&s->out), MSG_NOSIGNAL);
		if (n > 0) {
			buf_consume(&s->out, (size_t)n);
		} else if (n < 0 && errno == EINTR) {
			continue;
		} else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			break;
		} else {
			/* Callers may be deep in a connection's request: the read side sees
			 * the broken link on its own and tears it down from the loop. */
			log_warn("storage link: send() failed");
			buf_free(&s->out);
			break;
		}
	}
	storage_update_io(w);
	return 0;
}

/* Logs a finished upload: published, or refused for its checksum. */
static void upload_log_finish(struct conn *c, const struct ipc_result *r)
{
	const struct proto_chunk *ch = &c->req.u.chunk;
	if (strcmp(c->xfer_md5, ch->md5) != 0) {
		/* Timed from the first chunk this connection carried. */
		memcpy(c->xfer_md5, ch->md5, sizeof(c->xfer_md5));
		c->xfer_start = c->req.since;
	}
	int done = r->error == ERR_OK && r->trans_size == r->total_size;
	if (!done && r->error != ERR_CHECKSUM)
		return;
	access_log("%s uid=%" PRIu64 " %s name=\"%.*s\" bytes=%" PRIu64 " duration=%.3f result=%u", c->peer,
	    ch->cred.uid, c->req.id == MSG_AVATAR ? "avatar" : "upload", (int)ch->name_len, ch->name,
	    r->total_size, ev_now(c->w->loop) - c->xfer_start, r->error);
	c->xfer_md5[0] = '\0';
}

static void storage_on_result(struct worker *w, const struct ipc_header *h, const uint8_t *payload)
{
	struct conn *c = conn_by_reqid(w, h->reqid);
	if (c == NULL || c->req.stage != STAGE_STORAGE)
		return;   /* the client went away or timed out */
	struct ipc_result r;
	if (ipc_decode_result(payload, h->len, &r) < 0) {
		log_warnx("storage: malformed result for request %" PRIu64, h->reqid);
		respond_request_error(c, ERR_BUSY, "server busy: bad answer from storage");
	} else {
		char message[256] = "";
		if (r.message_len)
			snprintf(message, sizeof(message), "%.*s", (int)r.message_len, r.message);
		const char *msg = r.message_len ? message : NULL;
		if (c->req.id == MSG_SYNC) {
			struct json_writer *jw = &w->jw;
			json_begin(jw);
			json_put_int(jw, "error", r.error);
			json_put_int(jw, "total_size", (int64_t)r.total_size);
			json_put_int(jw, "seq", (int64_t)r.seq);
			json_put_str(jw, "name", r.name ? r.name : "", r.name_len);
			json_put_int(jw, "trans_size", (int64_t)r.trans_size);
			json_put_str(jw, "md5", c->req.u.sync.md5, PROTO_MD5_HEX);
			json_put_int(jw, "uid", (int64_t)c->req.u.sync.cred.uid);
			if (msg)
				json_put_str(jw, "message", msg, strlen(msg));
			conn_send_json(c, MSG_SYNC + 1, (int)r.error);
		} else {
			respond_chunk(c, (int)r.error, msg, r.seq, r.trans_size, r.total_size);
			upload_log_finish(c, &r);
		}
		request_finish(c);
	}
	conn_process(c);
}

static void storage_on_io(struct ev_loop *loop, ev_io *io, int revents)
{
	(void)loop;
	struct worker *w = io->data;
	struct storage_link *s = &w->storage;
	if ((revents & EV_WRITE) && storage_flush(w) < 0)
		return;
	if (!(revents & EV_READ))
		return;
	uint8_t *p = buf_reserve(&s->in, READ_CHUNK);
	if (p == NULL) {
		storage_down(w, "out of memory");
		return;
	}
	ssize_t n = recv(s->fd, p, READ_CHUNK, 0);
	if (n <= 0) {
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			return;
		storage_down(w, n == 0 ? "storage process closed the link" : strerror(errno));
		return;
	}
	buf_commit(&s->in, (size_t)n);
	for (;;) {
		struct ipc_header h;
		const uint8_t *payload;
		enum ipc_status st = ipc_decode_header(buf_head(&s->in), buf_len(&s->in), &h, &payload);
		if (st == IPC_NEED_MORE)
			break;
		if (st == IPC_BAD) {
			storage_down(w, "bad message header");
			return;
		}
		if (h.type == IPC_STORAGE_WORKER_RESULT) {
			storage_on_result(w, &h, payload);
		} else if (h.type == IPC_STORAGE_WORKER_PONG && !s->ready) {
			s->ready = 1;
			s->retry_delay = STORAGE_RETRY_MIN;
			STAT_SET(storage_up, 1);
			log_info("storage link up");
		} else {
			log_warnx("storage: unexpected message type %u", h.type);
		}
		if (s->fd < 0)
			return;   /* a callback brought the link down */
		buf_consume(&s->in, IPC_HEADER_LEN + h.len);
	}
}

static void storage_on_retry(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)loop;
	(void)revents;
	storage_connect(t->data);
}

static void storage_connect(struct worker *w)
{
	struct storage_link *s = &w->storage;
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	if (snprintf(sun.sun_path, sizeof(sun.sun_path), "%s/%s", w->conf->run_dir, IPC_SOCKET_NAME) >=
	    (int)sizeof(sun.sun_path))
		fatalx("run_dir %s is too long for a Unix socket path", w->conf->run_dir);
	s->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (s->fd < 0) {
		storage_down(w, strerror(errno));
		return;
	}
	s->connected = 0;
	s->ready = 0;
	/* A Unix socket connects at once or not at all (EAGAIN: backlog full, try again). */
	if (connect(s->fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
		int err = errno;
		close(s->fd);
		s->fd = -1;
		storage_down(w, strerror(err));
		return;
	}
	s->connected = 1;
	/* The socket outlives storage processes (the master holds it), so a connect may
	 * only reach the backlog: the link is reported up once a storage process answers a ping. */
	ev_io_init(&s->io, storage_on_io, s->fd, EV_READ);
	s->io.data = w;
	ev_io_start(w->loop, &s->io);
	if (ipc_encode_ping(&s->out, 0, 0) == 0)
		storage_flush(w);
}

/* Sends the current request to the storage process; the answer resumes the connection. */
static void storage_forward(struct conn *c)
{
	struct worker *w = c->w;
	struct storage_link *s = &w->storage;
	/* Connected but not yet ready (the ping is unanswered): the request queues behind
	 * the ping, and storage_timeout answers 1027 if no storage process takes it. */
	if (s->fd < 0 || !s->connected) {
		respond_request_error(c, ERR_BUSY, "server busy: storage unavailable, retry");
		return;
	}
	uint64_t reqid = conn_next_reqid(c);
	int rc;
	if (c->req.id == MSG_SYNC) {
		struct ipc_sync msg = { .uid = c->req.u.sync.cred.uid };
		memcpy(msg.md5, c->req.u.sync.md5, sizeof(msg.md5));
		rc = ipc_encode_sync(&s->out, reqid, &msg);
	} else {
		const struct proto_chunk *ch = &c->req.u.chunk;
		struct ipc_chunk msg = {
			.uid = ch->cred.uid, .seq = ch->seq, .trans_size = ch->trans_size,
			.total_size = ch->total_size, .last = (uint8_t)ch->last,
			.kind = c->req.id == MSG_AVATAR ? UPLOAD_AVATAR : UPLOAD_FILE,
			.name = ch->name, .name_len = (uint16_t)ch->name_len,
			.data = w->scratch, .data_len = (uint32_t)ch->data_len,
		};
		memcpy(msg.md5, ch->md5, sizeof(msg.md5));
		rc = ipc_encode_chunk(&s->out, reqid, &msg);
	}
	if (rc < 0) {
		respond_request_error(c, ERR_BUSY, "server busy: out of memory");
		return;
	}
	c->busy = 1;
	c->req.stage = STAGE_STORAGE;
	c->req.since = ev_now(w->loop);
	storage_flush(w);
}

/* ---------------------------------------------------------------- downloads */

static void download_work(struct pool_job *job)
{
	struct download_job *j = (struct download_job *)job;
	const struct backend_ops *ops = j->backend->ops;
	if (j->file == NULL) {
		int err = ops->file_open(j->backend, j->uid, j->name, j->name_len, &j->file, &j->size, j->version);
		if (err) {
			j->file = NULL;
			j->saved_errno = err;
			j->error = err == ENOENT || err == ENOTDIR || err == ELOOP ? ERR_FILE_NOT_EXISTS
			    : err == EACCES || err == EPERM ? ERR_READ_PERMISSION
			    : err == ETIMEDOUT ? ERR_BUSY : ERR_READ_FAILED;   /* a storage cluster away: retry */
			return;
		}
		j->opened = 1;
	}
	if (j->offset >= j->size && !(j->offset == 0 && j->size == 0)) {
		j->error = ERR_OFFSET_INVALID;
		return;
	}
	size_t want = j->size - j->offset < j->want ? (size_t)(j->size - j->offset) : j->want;
	int err = ops->file_read(j->file, j->data, want, j->offset, &j->got);
	if (err || j->got < want) {
		j->saved_errno = err ? err : EIO;   /* shorter than its size: cut under us */
		j->error = err == ETIMEDOUT ? ERR_BUSY : ERR_READ_FAILED;
	}
}

/* The name of the file_download_ record; 0, or -1 if it does not fit (it always does: sizes are bounded). */
static int download_record_key(const struct worker *w, const struct proto_download *d, char *key, size_t keylen)
{
	int n = snprintf(key, keylen, "%sfile_download_%" PRIu64 "_%.*s", w->conf->redis_prefix,
	    d->cred.uid, (int)d->name_len, d->name);
	return n < 0 || (size_t)n >= keylen ? -1 : 0;
}

static void download_job_free(struct worker *w, struct download_job *j)
{
	if (j->opened)
		w->backend.ops->file_close(j->file);
	free(j);
}

static void download_record_progress(struct worker *w, const struct proto_download *d,
    uint64_t current, uint64_t total, int last, const char *version)
{
	char key[sizeof(w->conf->redis_prefix) + 64 + PROTO_NAME_MAX];
	if (download_record_key(w, d, key, sizeof(key)) < 0)
		return;
	if (last) {
		rds_command(&w->redis, NULL, NULL, "DEL %s", key);
		return;
	}
	struct json_writer *jw = &w->jw;
	const uint8_t *body;
	size_t len;
	json_begin(jw);
	json_put_str(jw, "name", d->name, d->name_len);
	json_put_int(jw, "seq", (int64_t)d->seq);
	json_put_int(jw, "total_size", (int64_t)total);
	json_put_int(jw, "trans_size", (int64_t)current);
	/* What the download started from: a later chunk that opens another version answers 1029. */
	json_put_str(jw, "version", version, strlen(version));
	json_end(jw, &body, &len);
	rds_command(&w->redis, NULL, NULL, "SETEX %s %d %b", key, w->conf->upload_ttl, body, len);
}

/* Counts a download chunk, shows it in the transfer table and logs the end of the file. */
static void download_account(struct conn *c, const struct proto_download *d, const struct download_job *j,
    uint64_t current, int is_last)
{
	STAT_ADD(download_bytes, j->got);
	if (d->seq == 1) {
		STAT_INC(downloads_started);
		stats_transfer_close(c->xfer);
		c->xfer = stats_transfer_open('D', d->cred.uid, d->name, d->name_len, j->size);
		c->xfer_start = c->req.since;
	}
	stats_transfer_update(c->xfer, current);
	if (is_last) {
		STAT_INC(downloads_completed);
		stats_transfer_close(c->xfer);
		c->xfer = -1;
		access_log("%s uid=%" PRIu64 " download name=\"%.*s\" bytes=%" PRIu64 " duration=%.3f result=0", c->peer,
		    d->cred.uid, (int)d->name_len, d->name, j->size, ev_now(c->w->loop) - c->xfer_start);
	}
}

/* Answers a download chunk from a finished job (data or error) and moves on to the next request. */
static void download_reply(struct conn *c, struct download_job *j)
{
	struct worker *w = c->w;
	const struct proto_download *d = &c->req.u.download;
	if (j->error) {
		char msg[128];
		snprintf(msg, sizeof(msg), j->error == ERR_FILE_NOT_EXISTS ? "name: no such file" :
		    j->error == ERR_OFFSET_INVALID ? "seq: past the end of the file" : "cannot read the file (%s)",
		    strerror(j->saved_errno));
		if (j->error == ERR_READ_FAILED || j->error == ERR_READ_PERMISSION)
			log_warnx("download of a file of uid %" PRIu64 ": %s", d->cred.uid, strerror(j->saved_errno));
		respond_error(c, MSG_DOWNLOAD, j->error, msg);
	} else {
		size_t need = sodium_base64_ENCODED_LEN(j->got, sodium_base64_VARIANT_ORIGINAL);
		if (need > w->b64_cap) {
			free(w->b64);
			w->b64 = malloc(need);
			w->b64_cap = w->b64 ? need : 0;
		}
		if (w->b64 == NULL) {
			respond_error(c, MSG_DOWNLOAD, ERR_BUSY, "server busy: out of memory");
		} else {
			sodium_bin2base64(w->b64, need, j->data, j->got, sodium_base64_VARIANT_ORIGINAL);
			uint64_t current = j->offset + j->got;
			int is_last = current >= j->size;
			struct json_writer *jw = &w->jw;
			json_begin(jw);
			json_put_int(jw, "error", 0);
			json_put_str(jw, "data", w->b64, need - 1);
			json_put_int(jw, "seq", (int64_t)d->seq);
			json_put_u64_str(jw, "total_size", j->size);
			json_put_u64_str(jw, "current_size", current);
			json_put_bool(jw, "is_last", is_last);
			json_put_str(jw, "name", d->name, d->name_len);
			json_put_str(jw, "client_path", d->client_path ? d->client_path : "", d->client_path_len);
			conn_send_json(c, MSG_DOWNLOAD + 1, 0);
			download_record_progress(w, d, current, j->size, is_last, j->version);
			download_account(c, d, j, current, is_last);
		}
	}
	download_job_free(w, j);
	request_finish(c);
	conn_process(c);
}

/* The download record's answer for a later chunk read from a freshly opened file: the same version
 * the download started from (or nothing to compare with) serves it; another version answers 1029. */
static void download_on_record(redisAsyncContext *ctx, void *reply, void *privdata)
{
	struct rds *r = ctx->data;
	struct worker *w = r->data;
	struct conn *c = conn_by_reqid(w, (uint64_t)(uintptr_t)privdata);
	if (c == NULL || c->req.stage != STAGE_DLCHECK)
		return;   /* closed or timed out: request_finish freed the job */
	struct download_job *j = c->req.checking;
	c->req.checking = NULL;
	const struct proto_download *d = &c->req.u.download;
	redisReply *rep = reply;
	int changed = 0;
	if (rep == NULL || rep->type == REDIS_REPLY_ERROR) {
		download_job_free(w, j);
		respond_request_error(c, ERR_BUSY, "server busy: cannot check the download record, retry");
		conn_process(c);
		return;
	}
	if (rep->type == REDIS_REPLY_STRING) {
		char err[64];
		yajl_val rec = json_parse_object((const uint8_t *)rep->str, rep->len, err, sizeof(err));
		const char *version;
		size_t version_len;
		if (rec && json_get_str(rec, "version", &version, &version_len) == JSON_FIELD_OK)
			changed = version_len != strlen(j->version) || memcmp(version, j->version, version_len) != 0;
		if (rec)
			yajl_tree_free(rec);
	}
	if (changed) {
		download_job_free(w, j);
		respond_request_error(c, ERR_FILE_CHANGED,
		    "name: the file was replaced since this download started; download it again from seq 1");
		conn_process(c);
		return;
	}
	dl_remember(c, j->file, d->cred.uid, d->name, d->name_len, j->size, j->version);
	j->opened = 0;   /* the connection keeps it now */
	download_reply(c, j);
}

static void download_done(struct pool_job *job)
{
	struct download_job *j = (struct download_job *)job;
	struct worker *w = j->w;
	struct conn *c = j->orphaned ? NULL : conn_by_reqid(w, j->reqid);
	if (c == NULL) {
		if (j->orphaned && !j->opened)
			w->backend.ops->file_close(j->file);   /* borrowed from a cache that is gone */
		download_job_free(w, j);
		return;
	}
	c->req.job = NULL;
	const struct proto_download *d = &c->req.u.download;
	if (j->opened && !j->error && d->seq > 1) {
		/* A later chunk from a file this connection did not hold: is it still the version
		 * the download started from? */
		char key[sizeof(w->conf->redis_prefix) + 64 + PROTO_NAME_MAX];
		uint64_t reqid = conn_next_reqid(c);
		if (download_record_key(w, d, key, sizeof(key)) < 0 ||
		    rds_command(&w->redis, download_on_record, (void *)(uintptr_t)reqid, "GET %s", key) < 0) {
			download_job_free(w, j);
			respond_request_error(c, ERR_BUSY, "server busy: cannot check the download record, retry");
			conn_process(c);
			return;
		}
		c->req.checking = j;
		c->req.stage = STAGE_DLCHECK;
		c->req.since = ev_now(w->loop);
		return;
	}
	if (j->opened && !j->error) {
		dl_remember(c, j->file, d->cred.uid, d->name, d->name_len, j->size, j->version);
		j->opened = 0;   /* the connection keeps it now */
	}
	download_reply(c, j);
}

static void download_start(struct conn *c)
{
	struct worker *w = c->w;
	const struct proto_download *d = &c->req.u.download;
	size_t chunk = (size_t)w->conf->download_chunk;
	struct download_job *j = malloc(sizeof(*j) + chunk);
	if (j == NULL) {
		respond_request_error(c, ERR_BUSY, "server busy: out of memory");
		return;
	}
	memset(j, 0, sizeof(*j));
	j->job.work = download_work;
	j->job.done = download_done;
	j->w = w;
	j->want = chunk;
	j->offset = (d->seq - 1) * (uint64_t)chunk;
	j->backend = &w->backend;
	j->uid = d->cred.uid;
	memcpy(j->name, d->name, d->name_len);   /* the job may outlive the request (orphaned) */
	j->name[d->name_len] = '\0';
	j->name_len = d->name_len;
	/* Later chunks of a file read the version its first chunk opened; chunk 1 looks afresh. */
	struct dl_file *f = d->seq > 1 ? dl_find(c, d->cred.uid, d->name, d->name_len) : NULL;
	if (f != NULL) {
		j->file = j->borrowed = f->file;
		j->size = f->size;
		memcpy(j->version, f->version, sizeof(j->version));
		f->used = ++c->dl_tick;
	}
	j->reqid = conn_next_reqid(c);
	c->req.job = j;
	c->busy = 1;
	c->req.stage = STAGE_DISK;
	c->req.since = ev_now(w->loop);
	pool_submit(w->pool, &j->job);
}

/* ---------------------------------------------------------------- requests */

/* After the credentials are known good: hand the request to whoever does the work. */
static void request_continue(struct conn *c)
{
	struct worker *w = c->w;
	if (c->req.id == MSG_UPLOAD || c->req.id == MSG_AVATAR) {
		/* The scratch buffer may hold another connection's chunk by now: decode again. */
		char msg[256];
		int kind = c->req.id == MSG_AVATAR ? UPLOAD_AVATAR : UPLOAD_FILE;
		int rc = proto_parse_chunk(c->req.tree, kind, &w->limits, w->scratch, w->scratch_cap,
		    &c->req.u.chunk, msg, sizeof(msg));
		if (rc != ERR_OK) {
			respond_request_error(c, rc, msg);
			return;
		}
		if (c->req.u.chunk.cred.anonymous)
			c->req.u.chunk.cred.uid = 0;
		storage_forward(c);
	} else if (c->req.id == MSG_SYNC) {
		storage_forward(c);
	} else if (c->req.id == MSG_DOWNLOAD) {
		download_start(c);
	}
}

static void handle_test(struct conn *c, yajl_val tree)
{
	struct json_writer *jw = &c->w->jw;
	json_begin(jw);
	json_put_int(jw, "error", 0);
	yajl_val data = json_member(tree, "data");
	if (data)
		json_put_value(jw, "data", data);
	else
		json_put_str(jw, "data", "", 0);
	conn_send_json(c, MSG_TEST + 1, 0);
}

/* Handles one complete frame. */
static void handle_frame(struct conn *c, uint16_t id, const uint8_t *body, uint32_t len)
{
	struct worker *w = c->w;
	char msg[256];
	if (id != MSG_TEST && id != MSG_UPLOAD && id != MSG_SYNC && id != MSG_AVATAR && id != MSG_DOWNLOAD) {
		snprintf(msg, sizeof(msg), "unknown message id %u", id);
		respond_error(c, id, ERR_MSG_ID, msg);
		return;
	}
	/* 1001 echoes its data: it must come back unchanged or be refused. */
	yajl_val tree = id == MSG_TEST ? json_parse_object(body, len, msg, sizeof(msg))
	    : json_parse_request(body, len, msg, sizeof(msg));
	if (tree == NULL) {
		respond_error(c, id, ERR_JSON, msg);
		return;
	}
	if (id == MSG_TEST) {
		handle_test(c, tree);
		yajl_tree_free(tree);
		return;
	}
	c->req.id = id;
	c->req.tree = tree;
	int rc;
	switch (id) {
	case MSG_UPLOAD:
	case MSG_AVATAR:
		rc = proto_parse_chunk(tree, id == MSG_AVATAR ? UPLOAD_AVATAR : UPLOAD_FILE, &w->limits,
		    w->scratch, w->scratch_cap, &c->req.u.chunk, msg, sizeof(msg));
		c->req.cred = &c->req.u.chunk.cred;
		break;
	case MSG_SYNC:
		rc = proto_parse_sync(tree, &w->limits, &c->req.u.sync, msg, sizeof(msg));
		c->req.cred = &c->req.u.sync.cred;
		break;
	default:
		rc = proto_parse_download(tree, &w->limits, &c->req.u.download, msg, sizeof(msg));
		c->req.cred = &c->req.u.download.cred;
		break;
	}
	if (rc != ERR_OK) {
		respond_request_error(c, rc, msg);
		return;
	}
	if (!auth_check(c))
		return;
	if (c->req.id == MSG_UPLOAD || c->req.id == MSG_AVATAR) {
		/* Credentials were cached: the scratch buffer still holds this chunk. */
		if (c->req.u.chunk.cred.anonymous)
			c->req.u.chunk.cred.uid = 0;
		storage_forward(c);
	} else {
		request_continue(c);
	}
}

/* Handles complete frames until one needs to wait, then decides what to watch. */
static void conn_process(struct conn *c)
{
	struct worker *w = c->w;
	if (c->awaiting_proxy && buf_len(&c->in) > 0) {
		struct proxy_result pr;
		size_t used;
		enum proxy_status ps = proxy_parse(buf_head(&c->in), buf_len(&c->in), &used, &pr);
		if (ps == PROXY_BAD) {
			log_info("%s: no valid PROXY protocol header: closing", c->peer);
			conn_close(c, NULL);
			return;
		}
		if (ps == PROXY_OK) {
			c->awaiting_proxy = 0;
			if (pr.has_address)
				snprintf(c->peer, sizeof(c->peer), "%s", pr.address);
			buf_consume(&c->in, used);
		} else if (c->frame_start == 0) {
			c->frame_start = ev_now(w->loop);   /* the header must arrive within frame_timeout */
			conn_arm_timer(c);
		}
	}
	while (!c->busy && !c->awaiting_proxy && buf_len(&c->in) > 0 &&
	    buf_len(&c->out) < (size_t)w->conf->output_cap) {
		uint16_t id;
		const uint8_t *body;
		uint32_t len;
		size_t used;
		enum frame_status st = frame_decode(buf_head(&c->in), buf_len(&c->in),
		    (uint32_t)w->conf->max_frame, &id, &body, &len, &used);
		if (st == FRAME_OVERSIZE) {
			STAT_INC(frames_oversize);
			log_warnx("%s: frame header announces more than max_frame (%" PRId64 "): closing",
			    c->peer, w->conf->max_frame);
			conn_close(c, NULL);
			return;
		}
		if (st == FRAME_NEED_MORE) {
			if (c->frame_start == 0) {
				c->frame_start = ev_now(w->loop);
				conn_arm_timer(c);   /* the frame deadline may come before the idle one */
			}
			break;
		}
		c->frame_start = 0;
		c->last_frame = ev_now(w->loop);
		STAT_INC(frames_in);
		handle_frame(c, id, body, len);
		buf_consume(&c->in, used);
	}
	if (buf_len(&c->in) == 0)
		c->frame_start = 0;
	if (!ev_is_active(&c->timer) || c->busy)
		conn_arm_timer(c);
	conn_flush(c);
}

/* ---------------------------------------------------------------- accepting */

static void worker_on_accept_pause(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)revents;
	struct worker *w = t->data;
	ev_io_start(loop, &w->accept_io);
}

static void worker_accept_one(struct worker *w, int fd, const struct sockaddr_storage *ss)
{
	if (w->nconns >= (uint32_t)w->conf->max_connections) {
		STAT_INC(conn_rejected);
		close(fd);
		return;
	}
	struct conn *c = calloc(1, sizeof(*c));
	if (c == NULL || conn_table_add(w, c) < 0) {
		free(c);
		close(fd);
		return;
	}
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	c->w = w;
	c->fd = fd;
	c->xfer = -1;
	c->awaiting_proxy = w->conf->proxy_protocol;
	STAT_INC(conn_total);
	STAT_INC(conn_current);
	c->last_frame = ev_now(w->loop);
	char addr[INET6_ADDRSTRLEN] = "?";
	int port = 0;
	if (ss->ss_family == AF_INET) {
		const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
		inet_ntop(AF_INET, &sin->sin_addr, addr, sizeof(addr));
		port = ntohs(sin->sin_port);
	} else if (ss->ss_family == AF_INET6) {
		const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
		inet_ntop(AF_INET6, &sin6->sin6_addr, addr, sizeof(addr));
		port = ntohs(sin6->sin6_port);
	}
	snprintf(c->peer, sizeof(c->peer), "%s:%d", addr, port);
	ev_io_init(&c->io, conn_on_io, fd, EV_READ);
	c->io.data = c;
	ev_io_start(w->loop, &c->io);
	ev_timer_init(&c->timer, conn_on_timer, w->conf->idle_timeout, 0.);
	c->timer.data = c;
	ev_timer_start(w->loop, &c->timer);
}

static void worker_on_accept(struct ev_loop *loop, ev_io *io, int revents)
{
	(void)revents;
	struct worker *w = io->data;
	for (int i = 0; i < ACCEPT_BURST; i++) {
		struct sockaddr_storage ss;
		socklen_t sslen = sizeof(ss);
		int fd = accept4(w->listen_fd, (struct sockaddr *)&ss, &sslen, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
				log_warn("accept4() failed: pausing accepts for 1 s");
				ev_io_stop(loop, &w->accept_io);
				ev_timer_set(&w->accept_pause, 1., 0.);
				ev_timer_start(loop, &w->accept_pause);
			}
			return;
		}
		worker_accept_one(w, fd, &ss);
	}
}

/* ---------------------------------------------------------------- lifecycle */

static void worker_on_stop(struct ev_loop *loop, ev_signal *s, int revents)
{
	(void)revents;
	(void)s;
	ev_break(loop, EVBREAK_ALL);
}

static void worker_on_drain_timeout(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)t;
	(void)revents;
	log_warnx("graceful stop: connections still open after shutdown_timeout: closing them");
	ev_break(loop, EVBREAK_ALL);
}

/* Stops accepting; the loop ends once the last connection closes. */
static void worker_stop_accepting(struct worker *w)
{
	w->draining = 1;
	ev_io_stop(w->loop, &w->accept_io);
	ev_timer_stop(w->loop, &w->accept_pause);
	close(w->listen_fd);
}

/* Closes idle connections now and the others right after the answer they wait for. */
static void worker_close_connections(struct worker *w, double grace)
{
	ev_timer_stop(w->loop, &w->drain_timer);
	ev_timer_init(&w->drain_timer, worker_on_drain_timeout, grace, 0.);
	ev_timer_start(w->loop, &w->drain_timer);
	if (w->nconns == 0) {
		ev_break(w->loop, EVBREAK_ALL);
		return;
	}
	for (uint32_t i = 0; i < w->conns_cap; i++) {
		struct conn *c = w->conns[i];
		if (c == NULL)
			continue;
		c->closing = 1;
		if (!c->busy && buf_len(&c->out) == 0)
			conn_close(c, "graceful stop");
		else
			conn_update_io(c);
	}
}

/* QUIT: stop accepting, close idle connections, let the rest finish their request. */
static void worker_on_quit(struct ev_loop *loop, ev_signal *s, int revents)
{
	(void)loop;
	(void)revents;
	struct worker *w = s->data;
	if (w->draining == 2)
		return;
	log_info("graceful stop: %u connections open", w->nconns);
	if (!w->draining)
		worker_stop_accepting(w);
	w->draining = 2;
	worker_close_connections(w, w->conf->shutdown_timeout);
}

static void worker_on_retire_timeout(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)loop;
	(void)revents;
	struct worker *w = t->data;
	log_info("retiring: %u clients still connected after shutdown_timeout: closing them", w->nconns);
	w->draining = 2;
	worker_close_connections(w, 5.0);
}

/* USR2 (a reload replaced this worker): no new connections, but the open ones are
 * served until their clients leave, so no request fails; shutdown_timeout bounds it. */
static void worker_on_retire(struct ev_loop *loop, ev_signal *s, int revents)
{
	(void)revents;
	struct worker *w = s->data;
	if (w->draining)
		return;
	log_info("retiring: %u connections open", w->nconns);
	worker_stop_accepting(w);
	if (w->nconns == 0) {
		ev_break(loop, EVBREAK_ALL);
		return;
	}
	ev_timer_init(&w->drain_timer, worker_on_retire_timeout, w->conf->shutdown_timeout, 0.);
	w->drain_timer.data = w;
	ev_timer_start(loop, &w->drain_timer);
}

static void worker_on_usr1(struct ev_loop *loop, ev_signal *s, int revents)
{
	(void)loop;
	(void)s;
	(void)revents;
	if (log_reopen() < 0)
		log_warn("cannot reopen the log files");
}

static void worker_shutdown(struct worker *w)
{
	for (uint32_t i = 0; i < w->conns_cap; i++)
		if (w->conns[i])
			conn_close(w->conns[i], NULL);
	rds_close(&w->redis);
	pool_destroy(w->pool);
	backend_close(&w->backend);
	if (w->storage.fd >= 0)
		close(w->storage.fd);
	buf_free(&w->storage.in);
	buf_free(&w->storage.out);
	json_writer_free(&w->jw);
	free(w->conns);
	free(w->free_slots);
	free(w->scratch);
	free(w->b64);
}

int worker_main(const struct conf *conf, int slot, int listen_fd)
{
	struct worker wk, *w = &wk;
	memset(w, 0, sizeof(*w));
	/* If the master is killed, do not outlive it. */
	prctl(PR_SET_PDEATHSIG, SIGTERM);
	if (getppid() == 1)
		return 0;
	w->loop = ev_loop_new(EVFLAG_AUTO);
	if (w->loop == NULL)
		fatalx("ev_loop_new() failed in worker %d", slot);
	w->conf = conf;
	w->slot = slot;
	w->listen_fd = listen_fd;
	w->limits.max_file_size = (uint64_t)conf->max_file_size;
	w->limits.anonymous = conf->anonymous;
	w->scratch_cap = proto_b64_decoded_max((size_t)conf->max_frame);
	w->scratch = malloc(w->scratch_cap);
	if (w->scratch == NULL || json_writer_init(&w->jw) < 0)
		fatalx("out of memory starting worker %d", slot);
	w->pool = pool_create(w->loop, 2);
	if (w->pool == NULL)
		fatalx("cannot start disk threads in worker %d", slot);
	char err[512];
	if (backend_open(&w->backend, conf, BACKEND_READER, err, sizeof(err)) < 0)
		fatalx("worker %d: storage backend: %s", slot, err);
	w->storage.fd = -1;
	w->storage.retry_delay = STORAGE_RETRY_MIN;
	ev_timer_init(&w->storage.retry, storage_on_retry, 0., 0.);
	w->storage.retry.data = w;

	ev_signal_init(&w->sig_term, worker_on_stop, SIGTERM);
	ev_signal_start(w->loop, &w->sig_term);
	ev_signal_init(&w->sig_int, worker_on_stop, SIGINT);
	ev_signal_start(w->loop, &w->sig_int);
	ev_signal_init(&w->sig_quit, worker_on_quit, SIGQUIT);
	w->sig_quit.data = w;
	ev_signal_start(w->loop, &w->sig_quit);
	ev_signal_init(&w->sig_usr2, worker_on_retire, SIGUSR2);
	w->sig_usr2.data = w;
	ev_signal_start(w->loop, &w->sig_usr2);
	ev_signal_init(&w->sig_usr1, worker_on_usr1, SIGUSR1);
	ev_signal_start(w->loop, &w->sig_usr1);
	signal(SIGPIPE, SIG_IGN);
	signal(SIGHUP, SIG_IGN);   /* reloads are the master's business */

	rds_init(&w->redis, w->loop, conf, NULL, w);
	storage_connect(w);
	ev_io_init(&w->accept_io, worker_on_accept, listen_fd, EV_READ);
	w->accept_io.data = w;
	ev_io_start(w->loop, &w->accept_io);
	ev_timer_init(&w->accept_pause, worker_on_accept_pause, 1., 0.);
	w->accept_pause.data = w;

	log_info("accepting connections");
	ev_run(w->loop, 0);
	log_info("stopping");
	worker_shutdown(w);
	ev_loop_destroy(w->loop);
	return 0;
}

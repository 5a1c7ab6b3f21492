/* worker.c: accepts clients, frames and checks their requests, and answers them in order. */
#include "config.h"
#include "worker.h"
#include "addrlimit.h"
#include "b64.h"
#include "binproto.h"
#include "backend.h"
#include "buf.h"
#include "conf.h"
#include "frame.h"
#include "ipc.h"
#include "json.h"
#include "link.h"
#include "backend_probe.h"
#include "log.h"
#include "escape.h"
#include "pool.h"
#include "proto.h"
#include "proxy.h"
#include "rds.h"
#include "shmring.h"
#include "signals.h"
#include "stats.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <inttypes.h>
#include <malloc.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define READ_CHUNK 65536
#define WORKER_MMAP_THRESHOLD (1 << 20)   /* buffers below this come from the heap */
#define WORKER_HEAP_KEEP (4 << 20)         /* free heap kept instead of given back */
#define ACCEPT_BURST 64
#define STORAGE_RETRY_MIN 0.05
#define STORAGE_RETRY_MAX 1.0
#define STOP_FRESH_WAIT 1.0       /* a graceful stop waits this long for the first request of a new connection */
/* While a worker's connections hold more than output_budget of unsent answers together, one is
 * read no more once this much of its own answers wait (instead of output_cap): otherwise
 * max_connections clients that pipeline pings and never read would each hold output_cap. */
#define OUTPUT_TIGHT_CAP (64u << 10)

/* Where the request in progress is waiting. */
enum req_stage {
	STAGE_NONE = 0,
	STAGE_AUTH,        /* GET utoken_<uid> in flight */
	STAGE_STORAGE,     /* chunk or sync sent to the storage process */
	STAGE_DISK,        /* download read on a disk thread */
	STAGE_DLCHECK,     /* download read from a freshly opened file; its versions script in flight */
	STAGE_BINOPEN,     /* binary download: the file is being opened on a disk thread */
};

struct download_job;

/* The one request a connection is working on; later frames wait in the read buffer. */
struct request {
	uint16_t id;
	enum req_stage stage;
	uint64_t reqid;               /* matches the async answer to this request */
	/* The request's frame stays at the head of conn->in until request_finish, and the
	 * structs below point into it (no copy of the body is made); while it is there the
	 * buffer is never moved. 0 when no frame is held. */
	size_t frame_used;
	union {
		struct proto_chunk chunk;
		struct proto_sync sync;
		struct proto_download download;
		struct proto_credentials hello;                                   /* 1041 */
		struct { struct proto_credentials cred; struct bin_open open; } bopen;   /* 1043 */
		struct { struct proto_credentials cred; struct bin_download dl; } bdl;   /* 1047 */
	} u;
	struct proto_credentials *cred;
	struct download_job *job;     /* STAGE_DISK */
	struct download_job *checking;   /* STAGE_DLCHECK: read, waiting for the version check */
	/* STAGE_STORAGE: not on the storage link, which is down or was lost before the answer came;
	 * the request is (re)sent from its frame once a link is up, within storage_timeout. */
	int unsent;
	ev_tstamp since;              /* when it started waiting */
};

struct conn {
	struct worker *w;
	int fd;
	int addr_bucket;              /* counted there for max_connections_per_address; -1: not counted */
	uint32_t slot;                /* index in the worker's connection table */
	ev_io io;
	ev_timer timer;               /* idle, frame and dependency timeouts */
	struct buf in, out;
	size_t out_counted;           /* buf_len(&out) as last added to the worker's output_held */
	size_t in_counted;            /* input_charge() as last added to the worker's input_held */
	size_t in_admitted;           /* the buffer the large frame being received was admitted with */
	size_t in_want;               /* while input_waiting: the buffer it waits to take */
	int input_waiting;            /* unread until input_budget has room (input_wake) */
	struct conn *input_next, *input_prev;
	ev_tstamp last_frame;         /* accept or last complete frame */
	ev_tstamp frame_start;        /* first byte of an incomplete frame, 0 when none */
	int busy;                     /* req is waiting for Redis, storage or the disk */
	int closing;                  /* send what is queued, then close */
	int eof;                      /* the client closed its side */
	int awaiting_proxy;           /* a PROXY header must come first */
	/* The last answer left a transfer open: an upload chunk that was not the last one, a
	 * download chunk before is_last, or a sync (the client goes on with a chunk). A graceful
	 * stop lets such a connection carry on until its transfer ends. */
	int in_transfer;
	int fresh;                    /* no complete frame yet (last_frame is the accept time) */
	/* Credentials trusted on this connection. */
	int auth_valid;
	uint64_t auth_uid;
	uint8_t auth_token_hash[crypto_generichash_BYTES];
	ev_tstamp auth_until;
	/* Published files being downloaded, kept open so that a replacement mid-download is not mixed in. */
	struct dl_file *dl;           /* DL_CACHE entries, allocated by the first download */
	uint32_t dl_tick;
	/* The version each name this connection downloads was opened at, kept past its handle (up to
	 * DL_SEEN_MAX, grown on demand): a resume after the handle was closed to make room is this
	 * connection's own, not a stranger's (issue 12 item 4, design.md). */
	struct dl_seen *seen;
	uint32_t nseen, seen_cap;
	struct request req;
	int xfer;                     /* download entry in the stats transfer table, -1 if none */
	char xfer_md5[PROTO_MD5_HEX + 1];   /* the upload whose duration is being timed */
	/* Uploads this connection sent to storage: their leases are released when it closes,
	 * so a client that reconnects to another node is taken over at once (design.md). */
	struct ipc_sync drove[2];
	unsigned ndrove;
	ev_tstamp xfer_start;
	struct bin_conn *bin;         /* the binary fast path, once a 1041 hello succeeded; NULL before */
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

/* A name a connection is downloading, remembered whether or not its file is still open: which version
 * its view of the name is (the one its seq 1, or the resume it was served, opened) and, when its seq 1
 * was served here, the token its completion is counted with. Hashes keep it small (88 bytes). */
#define DL_SEEN_MAX 64
#define DL_SEEN_HASH 16
struct dl_seen {
	uint8_t key[DL_SEEN_HASH];    /* hash of uid and name */
	uint8_t version[DL_SEEN_HASH];   /* hash of the version */
	uint32_t used;                /* conn->dl_tick when last read: the oldest is forgotten first */
	ev_tstamp versions_at;        /* when its version was last recorded in file_dlversions_ */
	char born[40];                /* seq 1 was served on this connection: the token its completion
	                               * is counted with (file_dlversions_); "" when not, or once counted */
};

/* The worker's link up to the storage process, which it connects again whenever it is lost. */
struct uplink {
	struct link link;             /* link.fd -1: no link */
	int connected;                /* the socket is connected */
	int ready;                    /* the storage process answered our ping: requests may go */
	int bye;                      /* the storage process said goodbye: its close is routine */
	ev_timer retry;
	double retry_delay;
	/* Shared with the storage process for chunk bytes (shmring.h), one per link; ring_ready once
	 * storage mapped it. Without it (link_ring = 0, refused, or full) chunks are copied over the link. */
	struct shmring ring;
	int ring_ready;
};

struct worker {
	struct ev_loop *loop;
	const struct conf *conf;
	int slot;
	int listen_fd;
	ev_io accept_io;
	ev_timer accept_pause;        /* after EMFILE */
	ev_timer accept_hold;         /* bounds the wait for Redis before the first accept */
	int accepting;                /* accept_io was started once (worker_accept_start) */
	ev_signal sigs[7];            /* worker_signals[] */
	int draining;                 /* 1: not accepting (retiring or stopping); 2: closing connections too */
	ev_timer drain_timer;
	ev_timer fresh_timer;         /* graceful stop: looks again at new connections that sent nothing */
	struct conn **conns;          /* table indexed by conn->slot */
	uint32_t conns_cap;
	uint32_t *free_slots;
	uint32_t nfree;
	uint32_t nconns;
	uint32_t op_seq;              /* tags every async step; with the slot it forms a reqid */
	struct uplink uplink;         /* to the storage process */
	struct rds redis;
	struct pool *pool;            /* reads of published files */
	struct backend backend;       /* where published files are read from */
	struct backend_probe probe;   /* this worker's own backend client, pinged for the agent-check */
	ev_timer probe_timer;
	struct json_writer jw;
	struct proto_limits limits;
	uint32_t bin_link_waiters;    /* fast-path connections waiting for the storage link to drain */
	/* Fast-path chunk bytes sent to storage and not answered, all connections together, and the
	 * connections waiting for that to fall under bin_cap (oldest first). */
	uint64_t bin_unanswered, bin_cap;
	size_t output_held;           /* unsent answers of all connections, as last counted (conn_output_cap) */
	size_t input_held;            /* large input buffers of all connections (input_recount) */
	size_t input_waiters_held;    /* the part of input_held that waiting connections hold */
	struct conn *input_head, *input_tail;   /* waiting for room in input_budget, oldest first */
	ev_tstamp addr_refused_logged;   /* the last max_connections_per_address refusal logged */
	struct conn *cap_head, *cap_tail;
	/* While the oldest waiter waits for room in the shared ring (ring_want), which the storage
	 * process frees as it hashes, without telling: bin_cap_wake looks again this often. */
	ev_timer ring_retry;
	/* Until then nobody waits for the ring: a wait ran out while the ring was pinned (a client
	 * stopped in the middle of a chunk holds the oldest slot, and the ring cannot be reused past
	 * it), so chunks take the copy path. */
	ev_tstamp ring_wait_off_until;
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
	int own;                      /* reopened at the version the connection remembers (dl_seen) */
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
static void uplink_update_io(struct worker *w);
static void conn_process(struct conn *c);
static void conn_update_io(struct conn *c);
static void request_continue(struct conn *c);
static void uplink_connect(struct worker *w);
static void uplink_resend_unsent(struct worker *w);
/* The binary fast path (its own section below). */
struct bin_conn;
static void bin_handle_frame(struct conn *c, uint16_t id, uint8_t *body, uint32_t len);
static int bin_ready_for(struct conn *c, uint16_t id, uint32_t len);
static void bin_link_drained(struct worker *w);
static int bin_holds_output(const struct conn *c);
static int bin_chunks_in_flight(const struct conn *c);
static int bin_server_holds(const struct conn *c, ev_tstamp now);
static int bin_wants_write(const struct conn *c);
static size_t bin_out_limit(const struct conn *c);
static void bin_out_sent(struct conn *c, size_t n);
static int bin_send_file(struct conn *c);
static int bin_conn_free(struct conn *c);
static void bin_request_continue(struct conn *c);
static void bin_respond_request_error(struct conn *c, int error, const char *message);
static int bin_on_result(struct worker *w, const struct ipc_header *h, const uint8_t *payload);
static void bin_on_open_result(struct conn *c, const struct ipc_result *r);
static void bin_fail_inflight(struct conn *c);
static uint32_t conn_max_body(const struct conn *c);
static size_t bin_read_room(const struct conn *c);
static int bin_receiving(const struct conn *c);
static int bin_direct_start(struct conn *c);
static int bin_direct_read(struct conn *c);
static void bin_direct_undo_all(struct worker *w);
static void bin_cap_wake(struct worker *w);
static void input_unlink(struct conn *c);
static void input_wake(struct worker *w);
static void input_recount(struct conn *c);
static void input_frame_done(struct conn *c, int keep);

/* ---------------------------------------------------------------- responses */

/* Sends what it can; returns -1 when the connection was closed (c is gone). */
static int conn_flush(struct conn *c)
{
	while (buf_len(&c->out) > 0) {
		/* A binary range in progress: what was queued before its file bytes goes first, the rest after. */
		size_t len = bin_out_limit(c);
		if (len == 0)
			break;
		ssize_t n = send(c->fd, buf_head(&c->out), len, MSG_NOSIGNAL);
		if (n > 0) {
			buf_consume(&c->out, (size_t)n);
			bin_out_sent(c, (size_t)n);
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		conn_close(c, "write failed");
		return -1;
	}
	if (bin_holds_output(c) && bin_send_file(c) < 0)
		return -1;
	if (buf_len(&c->out) == 0 && c->closing && !c->busy && !bin_holds_output(c) && !bin_chunks_in_flight(c)) {
		conn_close(c, NULL);
		return -1;
	}
	conn_update_io(c);
	return 0;
}

/* Queues one response frame with the writer's current JSON as body. */
/* Queues one response frame with body; counts it, and its error if any. */
static void conn_queue_frame(struct conn *c, uint16_t id, const uint8_t *body, size_t len, int error)
{
	STAT_INC(frames_out);
	STAT_ADD(bytes_out, FRAME_HEADER_LEN + len);
	if (error) {
		stats_count_answer(id, error);
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

static void conn_send_json(struct conn *c, uint16_t id, int error)
{
	const uint8_t *body;
	size_t len;
	json_end(&c->w->jw, &body, &len);
	conn_queue_frame(c, id, body, len, error);
}

/* A response that carries only error, message and what the request id needs. */
static void respond_error(struct conn *c, uint16_t req_id, int error, const char *message)
{
	struct json_writer *jw = &c->w->jw;
	if (req_id != MSG_TEST)
		c->in_transfer = 0;   /* the client gives up on an error */
	json_begin(jw);
	json_put_int(jw, "error", error);
	if (message)
		json_put_str(jw, "message", message, strlen(message));
	conn_send_json(c, (uint16_t)(req_id + 1), error);
}

/* A 1034 error answer: error and message, and the request's seq, name and client_path as far as
 * they were read (0 or "" otherwise), so a client can tell which request it answers. */
static void respond_download_error(struct conn *c, int error, const char *message)
{
	struct json_writer *jw = &c->w->jw;
	const struct proto_download *d = &c->req.u.download;
	c->in_transfer = 0;   /* the client gives up on an error */
	json_begin(jw);
	json_put_int(jw, "error", error);
	json_put_int(jw, "seq", (int64_t)d->seq);
	json_put_str(jw, "name", d->name ? d->name : "", d->name_len);
	json_put_str(jw, "client_path", d->client_path ? d->client_path : "", d->client_path_len);
	if (message)
		json_put_str(jw, "message", message, strlen(message));
	conn_send_json(c, MSG_DOWNLOAD + 1, error);
}

/* Finishes the current request: drops its frame and lets the next one in. */
static void download_job_free(struct worker *w, struct download_job *j);

static void request_finish(struct conn *c)
{
	if (c->req.checking)
		download_job_free(c->w, c->req.checking);
	size_t used = c->req.frame_used;
	memset(&c->req, 0, sizeof(c->req));
	c->busy = 0;
	if (used) {
		buf_consume(&c->in, used);
		input_frame_done(c, 0);
	}
}

static void respond_chunk(struct conn *c, int error, const char *message, uint64_t seq,
    uint64_t trans_size, uint64_t total_size)
{
	struct json_writer *jw = &c->w->jw;
	const struct proto_chunk *ch = &c->req.u.chunk;
	c->in_transfer = error == ERR_OK && trans_size < total_size;
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
	case MSG_DOWNLOAD:
		respond_download_error(c, error, message);
		break;
	case MSG_BIN_HELLO:
	case MSG_BIN_UPLOAD_OPEN:
	case MSG_BIN_DOWNLOAD:
		bin_respond_request_error(c, error, message);
		break;
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

/* The connection in that slot of the table now (it may not be the one an answer was meant for:
 * callers compare the request id), or NULL. */
static struct conn *conn_in_slot(struct worker *w, uint32_t slot)
{
	return slot < w->conns_cap ? w->conns[slot] : NULL;
}

/* The connection still waiting for the answer tagged reqid, or NULL. */
static struct conn *conn_by_reqid(struct worker *w, uint64_t reqid)
{
	struct conn *c = conn_in_slot(w, (uint32_t)reqid);
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

static void dl_seen_hash(uint8_t out[DL_SEEN_HASH], uint64_t uid, const char *name, size_t name_len)
{
	crypto_generichash_state st;
	crypto_generichash_init(&st, NULL, 0, DL_SEEN_HASH);
	crypto_generichash_update(&st, (const uint8_t *)&uid, sizeof(uid));
	crypto_generichash_update(&st, (const uint8_t *)name, name_len);
	crypto_generichash_final(&st, out, DL_SEEN_HASH);
}

static void dl_version_hash(uint8_t out[DL_SEEN_HASH], const char *version)
{
	crypto_generichash(out, DL_SEEN_HASH, (const uint8_t *)version, strlen(version), NULL, 0);
}

/* The version this connection remembers for (uid, name), NULL when none (never downloaded here, or
 * forgotten for DL_SEEN_MAX more recent names). */
static struct dl_seen *dl_seen_find(struct conn *c, uint64_t uid, const char *name, size_t name_len)
{
	uint8_t key[DL_SEEN_HASH];
	dl_seen_hash(key, uid, name, name_len);
	for (uint32_t i = 0; i < c->nseen; i++)
		if (memcmp(c->seen[i].key, key, DL_SEEN_HASH) == 0)
			return &c->seen[i];
	return NULL;
}

/* 1 when s remembers version. */
static int dl_seen_is(const struct dl_seen *s, const char *version)
{
	uint8_t h[DL_SEEN_HASH];
	dl_version_hash(h, version);
	return memcmp(s->version, h, DL_SEEN_HASH) == 0;
}

/* Remembers that the connection's view of (uid, name) is version. born: the token of a download started
 * here (seq 1), "" for none, NULL to keep what is remembered of the same version (a reopened own
 * download). The least recently read name is forgotten beyond DL_SEEN_MAX; out of memory, nothing is
 * remembered (a later resume is then checked as a stranger's). */
static void dl_seen_remember(struct conn *c, uint64_t uid, const char *name, size_t name_len, const char *version,
    const char *born)
{
	struct dl_seen *s = dl_seen_find(c, uid, name, name_len);
	if (s != NULL && born == NULL && dl_seen_is(s, version)) {
		s->used = c->dl_tick;
		return;
	}
	if (s == NULL && c->nseen < c->seen_cap) {
		s = &c->seen[c->nseen++];
	} else if (s == NULL && c->seen_cap < DL_SEEN_MAX) {
		uint32_t cap = c->seen_cap ? c->seen_cap * 2 : 4;
		struct dl_seen *grown = realloc(c->seen, cap * sizeof(*grown));
		if (grown == NULL)
			return;
		c->seen = grown;
		c->seen_cap = cap;
		s = &c->seen[c->nseen++];
	} else if (s == NULL) {
		s = &c->seen[0];
		for (uint32_t i = 1; i < c->nseen; i++)
			if (c->seen[i].used < s->used)
				s = &c->seen[i];
	}
	dl_seen_hash(s->key, uid, name, name_len);
	dl_version_hash(s->version, version);
	s->used = c->dl_tick;
	s->versions_at = ev_now(c->w->loop);   /* every view is remembered after the versions script recorded it */
	snprintf(s->born, sizeof(s->born), "%s", born ? born : "");
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

/* A download served to its end lets go of its file: a later seq > 1 of the name on this connection
 * reopens it and is checked against the version remembered (dl_seen), so a file replaced since is
 * 1029, never the old bytes kept open here (which a resume of the new file would have been given). */
static void dl_drop(struct conn *c, uint64_t uid, const char *name, size_t name_len)
{
	struct dl_file *f = dl_find(c, uid, name, name_len);
	if (f == NULL)
		return;
	c->w->backend.ops->file_close(f->file);
	f->file = NULL;
}

/* Closes every kept file except keep (a disk thread may still be reading that one). */
static void conn_close_download(struct conn *c, struct backend_file *keep)
{
	for (int i = 0; c->dl && i < DL_CACHE; i++)
		if (c->dl[i].file && c->dl[i].file != keep)
			c->w->backend.ops->file_close(c->dl[i].file);
	free(c->dl);
	c->dl = NULL;
	free(c->seen);
	c->seen = NULL;
	c->nseen = c->seen_cap = 0;
}

/* Remembers an upload this connection drove (the two most recent: clients drive one at a time). */
static void conn_drove(struct conn *c, uint64_t uid, const char *md5)
{
	for (unsigned i = 0; i < c->ndrove; i++)
		if (c->drove[i].uid == uid && memcmp(c->drove[i].md5, md5, PROTO_MD5_HEX) == 0)
			return;
	if (c->ndrove == 2) {
		c->drove[0] = c->drove[1];
		c->ndrove = 1;
	}
	struct ipc_sync *d = &c->drove[c->ndrove++];
	d->uid = uid;
	memcpy(d->md5, md5, PROTO_MD5_HEX);
	d->md5[PROTO_MD5_HEX] = '\0';
}

/* Tells storage the uploads this connection drove have lost their client (it releases their leases). */
static void conn_release_uploads(struct conn *c)
{
	struct uplink *s = &c->w->uplink;
	if (c->ndrove == 0 || s->link.fd < 0 || !s->connected)
		return;
	for (unsigned i = 0; i < c->ndrove; i++)
		ipc_encode_release(&s->link.out, &c->drove[i]);
	c->ndrove = 0;
	uplink_update_io(c->w);
}

static void conn_close(struct conn *c, const char *why)
{
	struct worker *w = c->w;
	if (why)
		log_debug("%s: closed: %s", c->peer, why);
	ev_io_stop(w->loop, &c->io);
	ev_timer_stop(w->loop, &c->timer);
	input_unlink(c);   /* first: room that request_finish gives back must not wake c, about to be freed */
	struct backend_file *job_file = NULL;
	if (c->req.job) {
		/* A disk thread may be reading its file: the job closes it when it is done. */
		c->req.job->orphaned = 1;
		job_file = c->req.job->borrowed;
	}
	conn_close_download(c, job_file);
	conn_release_uploads(c);
	request_finish(c);
	stats_transfer_close(c->xfer);
	if (c->addr_bucket >= 0)
		addrlimit_release(c->addr_bucket);
	if (!bin_conn_free(c))   /* 1: a disk thread is still sending on the socket and closes it */
		close(c->fd);
	buf_free(&c->in);
	buf_free(&c->out);
	w->output_held -= c->out_counted;
	c->in_admitted = 0;
	input_recount(c);   /* its room goes back to the worker, and waiters read on */
	conn_table_remove(w, c);
	free(c);
	STAT_DEC(conn_current);
	if (w->draining && w->nconns == 0)
		ev_break(w->loop, EVBREAK_ALL);
}

/* A graceful stop may close this connection once its answers are out: no request running
 * or partly received, and no transfer left open by the last answer. */
static int conn_done_for_stop(const struct conn *c)
{
	/* A connection accepted just now has a request on its way, not yet read: it is served. */
	int arriving = c->fresh && ev_now(c->w->loop) - c->last_frame < STOP_FRESH_WAIT;
	return !c->busy && !c->in_transfer && !arriving && buf_len(&c->in) == 0 && !bin_receiving(c);
}

/* How much of its answers may wait unsent before a connection is read no more: output_cap, or
 * OUTPUT_TIGHT_CAP while the worker's connections together hold more than output_budget. Counts
 * the connection's answers in the worker's sum first. */
static size_t conn_output_cap(struct conn *c)
{
	struct worker *w = c->w;
	size_t now = buf_len(&c->out);
	w->output_held = w->output_held - c->out_counted + now;
	c->out_counted = now;
	size_t cap = (size_t)w->conf->output_cap;
	return w->output_held > (size_t)w->conf->output_budget && cap > OUTPUT_TIGHT_CAP ? OUTPUT_TIGHT_CAP : cap;
}

/* ---------------------------------------------------------------- input_budget */

/* Input buffers up to this size are not counted against input_budget: the ordinary read-ahead,
 * and frames of the Qt client's size (a 32 KiB chunk is a 44 KB frame). */
#define INPUT_FREE (256u << 10)

/* The size of the frame at the head of c's input (header and body), 0 while its header is not in. */
static size_t frame_total_at(const struct conn *c)
{
	if (buf_len(&c->in) < FRAME_HEADER_LEN)
		return 0;
	return FRAME_HEADER_LEN + (size_t)frame_body_len(buf_head(&c->in));
}

/* What c's input buffer holds against input_budget: its memory past INPUT_FREE, or the buffer its
 * frame being received was admitted with, whichever is larger. */
static size_t input_charge(const struct conn *c)
{
	size_t held = c->in.cap > INPUT_FREE ? c->in.cap : 0;
	return held > c->in_admitted ? held : c->in_admitted;
}

/* Counts c's input buffer in the worker's sum again; room given back lets waiters read on. */
static void input_recount(struct conn *c)
{
	struct worker *w = c->w;
	size_t now = input_charge(c);
	int freed = now < c->in_counted;
	w->input_held = w->input_held - c->in_counted + now;
	if (c->input_waiting)
		w->input_waiters_held = w->input_waiters_held - c->in_counted + now;
	c->in_counted = now;
	STAT_SET(input_held, w->input_held);
	if (freed && w->input_head != NULL)
		input_wake(w);
}

/* The frame c was admitted for is consumed: its room goes back, and a buffer grown for it is given
 * back too, unless an upload streams on through it (keep: the next chunk fits as it is, and the
 * buffer stays counted). */
static void input_frame_done(struct conn *c, int keep)
{
	c->in_admitted = 0;
	if (!keep)
		(void)buf_shrink(&c->in, INPUT_FREE);   /* out of memory: kept, and still counted */
	input_recount(c);
}

static void input_unlink(struct conn *c)
{
	struct worker *w = c->w;
	if (!c->input_waiting)
		return;
	if (c->input_prev)
		c->input_prev->input_next = c->input_next;
	else
		w->input_head = c->input_next;
	if (c->input_next)
		c->input_next->input_prev = c->input_prev;
	else
		w->input_tail = c->input_prev;
	w->input_waiters_held -= c->in_counted;
	c->input_waiting = 0;
	c->input_next = c->input_prev = NULL;
}

/* Before a read that would grow c's input buffer past INPUT_FREE. The buffer for the whole frame
 * (once its header is in) is taken from input_budget at once, so that an admitted frame never
 * waits half read: clients each holding half a frame and waiting for the others' room would all
 * wait for frame_timeout. 0: read on; -1: c waits, unread, until input_wake. It waits only for room
 * that connections reading hold, which comes back: a waiter may hold room too (the start of its
 * next frame, read behind the last one), and waiters waiting for each other's would wait forever,
 * timers held. (Alone, or beside waiters only, a frame larger than the budget goes: max_frame
 * bounds it.) */
static int input_admit(struct conn *c, size_t room)
{
	struct worker *w = c->w;
	size_t want = buf_reserve_cap(&c->in, room), have = buf_len(&c->in);
	size_t frame = c->awaiting_proxy ? 0 : frame_total_at(c);
	if (frame > have && frame <= (size_t)conn_max_body(c) + FRAME_HEADER_LEN) {
		size_t whole = buf_reserve_cap(&c->in, frame - have);
		if (whole > want)
			want = whole;
	}
	if (want <= INPUT_FREE || want <= input_charge(c))
		return 0;
	size_t others = w->input_held - c->in_counted;
	size_t others_reading = others - (w->input_waiters_held - (c->input_waiting ? c->in_counted : 0));
	if (others_reading > 0 && others + want > (size_t)w->conf->input_budget) {
		if (!c->input_waiting) {
			c->input_waiting = 1;
			w->input_waiters_held += c->in_counted;
			c->input_prev = w->input_tail;
			if (w->input_tail)
				w->input_tail->input_next = c;
			else
				w->input_head = c;
			w->input_tail = c;
			STAT_INC(input_waits);
		}
		c->in_want = want;
		return -1;
	}
	c->in_admitted = want;
	input_recount(c);
	return 0;
}

/* Room was given back: waiting connections read on, oldest first, while what each waits for fits
 * beside what is held (each takes its room when it reads: input_admit), or when only waiters hold
 * room, which none of them would give back. */
static void input_wake(struct worker *w)
{
	size_t budget = (size_t)w->conf->input_budget, held = w->input_held;
	size_t reading = w->input_held - w->input_waiters_held;
	while (w->input_head != NULL) {
		struct conn *c = w->input_head;
		if (reading > 0 && held - c->in_counted + c->in_want > budget)
			break;
		held += c->in_want;
		reading += c->in_want;
		input_unlink(c);
		conn_update_io(c);
	}
}

/* Reads while there is no request in progress and the client reads its answers. */
static void conn_update_io(struct conn *c)
{
	struct worker *w = c->w;
	int events = 0;
	/* Reading on while a request waits saves epoll churn; one frame of
	 * read-ahead bounds what a pipelining client can park here. */
	if (!c->closing && !c->eof && !c->input_waiting && buf_len(&c->out) < conn_output_cap(c) &&
	    buf_len(&c->in) < (size_t)conn_max_body(c) + FRAME_HEADER_LEN &&
	    !(c->req.frame_used && c->in.end == c->in.cap) &&   /* a held frame's buffer is full */
	    bin_read_room(c) > 0)
		events |= EV_READ;
	if (bin_wants_write(c))
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
			    c->req.stage == STAGE_DISK || c->req.stage == STAGE_BINOPEN ? "the disk" : "storage");
			if (c->req.job) {
				conn_close(c, "disk read timed out");   /* the job may still hold the fd */
				return;
			}
			respond_request_error(c, ERR_BUSY, "server busy: a dependency did not answer in time");
			conn_process(c);
			return;
		}
	} else if (bin_server_holds(c, now) || c->input_waiting) {
		/* The server stopped reading this connection (its chunks wait for storage's answers, or
		 * for room under the worker's cap or in the link): the client is not the one stalling. */
		if (c->frame_start > 0)
			c->frame_start = now;
		c->last_frame = now;
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
		if (conn_flush(c) == 0 && !c->busy && buf_len(&c->in) > 0 && !bin_holds_output(c) &&
		    buf_len(&c->out) < conn_output_cap(c))
			conn_process(c);
		return;   /* a readable socket fires again */
	}
	if (!(revents & EV_READ))
		return;
	if (bin_receiving(c)) {
		if (bin_direct_read(c) == 0)
			conn_process(c);   /* the chunk is complete and handled: frames behind it go on */
		return;
	}
	uint8_t *p;
	size_t room = READ_CHUNK;
	if (c->req.frame_used) {
		/* The request in progress points into its frame: read ahead only into the room
		 * the buffer already has, so that it does not move. */
		room = c->in.cap - c->in.end < READ_CHUNK ? c->in.cap - c->in.end : READ_CHUNK;
		if (room == 0) {
			conn_update_io(c);
			return;
		}
		p = c->in.data + c->in.end;
	} else if ((room = bin_read_room(c)) == 0) {
		conn_update_io(c);   /* a chunk waits for its window before its data is read */
		return;
	} else if (input_admit(c, room) < 0) {
		conn_update_io(c);   /* its frame waits for room in input_budget */
		return;
	} else if ((p = buf_reserve(&c->in, room)) == NULL) {
		conn_close(c, "out of memory");
		return;
	}
	ssize_t n = recv(c->fd, p, room, 0);
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
	input_recount(c);
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

/* What Redis's answer to GET utoken_<uid> says of the token a client presented: ERR_OK (the token's
 * hash in got), or the code of the refusal (auth_refusal says why). */
static int auth_verdict(const struct conn *c, const redisReply *rep, uint64_t uid, const char *token,
    size_t token_len, uint8_t got[crypto_generichash_BYTES])
{
	if (rep == NULL || rep->type == REDIS_REPLY_ERROR)
		return ERR_BUSY;
	if (rep->type != REDIS_REPLY_STRING)
		return ERR_UID_INVALID;
	uint8_t want[crypto_generichash_BYTES];
	token_hash(want, rep->str, rep->len);
	token_hash(got, token, token_len);
	if (sodium_memcmp(want, got, crypto_generichash_BYTES) != 0) {
		log_info("%s: bad token for uid %" PRIu64, c->peer, uid);
		return ERR_TOKEN_INVALID;
	}
	return ERR_OK;
}

/* The message of an auth_verdict refusal. */
static const char *auth_refusal(int error)
{
	return error == ERR_TOKEN_INVALID ? "token: does not match" :
	    error == ERR_UID_INVALID ? "uid: no token for this user" : "server busy: cannot read credentials";
}

static void auth_on_reply(redisAsyncContext *ctx, void *reply, void *privdata)
{
	struct rds *r = ctx->data;
	struct worker *w = r->data;
	struct conn *c = conn_by_reqid(w, (uint64_t)(uintptr_t)privdata);
	if (c == NULL || c->req.stage != STAGE_AUTH)
		return;
	const struct proto_credentials *cred = c->req.cred;
	uint8_t got[crypto_generichash_BYTES];
	int verdict = auth_verdict(c, reply, cred->uid, cred->token, cred->token_len, got);
	if (verdict != ERR_OK) {
		respond_request_error(c, verdict, auth_refusal(verdict));
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

/* The link died: requests it carried may never be answered. Each keeps its frame, so it is
 * sent again, exactly as it was, once a new link is up (uplink_resend_unsent), and
 * storage_timeout (from when it first went) still bounds the wait. Sending it again is safe:
 * the storage process treats a chunk at or below what it has committed as a rewrite of the
 * same bytes, and a final chunk of an upload it already published as done. A resent seq 1
 * cannot reset an upload that went on, because this connection sends nothing else of the
 * upload until this request is answered (one request at a time), and a client drives an
 * upload on one connection. */
static void uplink_hold_waiting(struct worker *w)
{
	unsigned held = 0;
	for (uint32_t i = 0; i < w->conns_cap; i++) {
		struct conn *c = w->conns[i];
		if (c && c->busy && c->req.stage == STAGE_STORAGE && !c->req.unsent) {
			c->req.unsent = 1;
			held++;
		} else if (c && c->bin) {
			/* Binary chunks in flight are not held: the client resends from the committed size. */
			bin_fail_inflight(c);
		}
	}
	bin_cap_wake(w);   /* nothing is on its way any more */
	if (held)
		log_info("storage link lost with %u requests unanswered: they are sent again on the next link", held);
}

static void uplink_down(struct worker *w, const char *why)
{
	struct uplink *s = &w->uplink;
	if (s->link.fd >= 0 && s->bye)
		log_info("storage link closed: the storage process stopped in order (a reload or a stop)");
	else if (s->link.fd >= 0)
		log_warnx("storage link lost: %s", why);
	link_close(&s->link);
	s->connected = 0;
	s->ready = 0;
	s->bye = 0;
	/* Storage keeps its own mapping while it still reads slots; this end starts afresh. Chunks
	 * being received into the ring go back to their connections' buffers first. */
	s->ring_ready = 0;
	bin_direct_undo_all(w);
	shmring_destroy(&s->ring);
	STAT_SET(storage_up, 0);
	uplink_hold_waiting(w);
	ev_timer_stop(w->loop, &s->retry);
	ev_timer_set(&s->retry, s->retry_delay, 0.);
	ev_timer_start(w->loop, &s->retry);
	s->retry_delay = s->retry_delay * 2 > STORAGE_RETRY_MAX ? STORAGE_RETRY_MAX : s->retry_delay * 2;
}

static void uplink_update_io(struct worker *w)
{
	/* Fast-path connections waiting for the link to drain are woken from its writability. */
	w->uplink.link.want_write = w->bin_link_waiters > 0;
	link_update_io(&w->uplink.link);
}

static int uplink_flush(struct worker *w)
{
	w->uplink.link.want_write = w->bin_link_waiters > 0;
	if (link_flush(&w->uplink.link) < 0 && !w->uplink.bye)
		log_warn("storage link: send() failed");
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
	char name[ESCAPE_SIZE(PROTO_NAME_MAX)];
	escape_quoted(name, sizeof(name), ch->name, ch->name_len);
	/* Storage says "instant upload: ..." when it published from content already stored. */
	int instant = done && r->message_len >= 7 && memcmp(r->message, "instant", 7) == 0;
	access_log("%s uid=%" PRIu64 " %s name=\"%s\" bytes=%" PRIu64 " duration=%.3f result=%u%s", c->peer,
	    ch->cred.uid, c->req.id == MSG_AVATAR ? "avatar" : "upload", name,
	    r->total_size, ev_now(c->w->loop) - c->xfer_start, r->error, instant ? " instant=1" : "");
	c->xfer_md5[0] = '\0';
}

static void uplink_on_result(struct worker *w, const struct ipc_header *h, const uint8_t *payload)
{
	if (bin_on_result(w, h, payload)) {
		bin_cap_wake(w);
		return;   /* a binary chunk's acknowledgement */
	}
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
		if (c->req.id == MSG_BIN_UPLOAD_OPEN) {
			bin_on_open_result(c, &r);
		} else if (c->req.id == MSG_SYNC) {
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
			/* A sync opens a transfer: the client resumes, or starts at seq 1 after 1012. */
			c->in_transfer = r.error == ERR_OK || r.error == ERR_FILE_NOT_EXISTS;
		} else {
			respond_chunk(c, (int)r.error, msg, r.seq, r.trans_size, r.total_size);
			upload_log_finish(c, &r);
		}
		request_finish(c);
	}
	conn_process(c);
}

static void uplink_on_io(struct ev_loop *loop, ev_io *io, int revents)
{
	(void)loop;
	struct worker *w = io->data;
	struct uplink *s = &w->uplink;
	if ((revents & EV_WRITE) && uplink_flush(w) < 0)
		return;
	if (revents & EV_WRITE)
		bin_link_drained(w);
	if (!(revents & EV_READ))
		return;
	ssize_t n = link_read(&s->link, READ_CHUNK);
	if (n == LINK_AGAIN)
		return;
	if (n < 0) {
		uplink_down(w, n == LINK_EOF ? "storage process closed the link" : strerror(errno));
		return;
	}
	for (;;) {
		struct ipc_header h;
		const uint8_t *payload;
		enum ipc_status st = link_next(&s->link, &h, &payload);
		if (st == IPC_NEED_MORE)
			break;
		if (st == IPC_BAD) {
			uplink_down(w, "bad message header");
			return;
		}
		if (h.type == IPC_STORAGE_WORKER_RESULT) {
			uplink_on_result(w, &h, payload);
		} else if (h.type == IPC_STORAGE_WORKER_RING) {
			uint32_t error;
			if (ipc_decode_ring_answer(payload, h.len, &error) == 0 && error == 0 && s->ring.map != NULL) {
				s->ring_ready = 1;
			} else {
				log_warnx("storage refused the shared ring: chunks are copied over the link");
				shmring_destroy(&s->ring);
			}
		} else if (h.type == IPC_STORAGE_WORKER_BYE) {
			s->bye = 1;   /* the close follows: uplink_down logs it as routine */
		} else if (h.type == IPC_STORAGE_WORKER_PONG && !s->ready) {
			s->ready = 1;
			s->retry_delay = STORAGE_RETRY_MIN;
			STAT_SET(storage_up, 1);
			log_info("storage link up");
		} else {
			log_warnx("storage: unexpected message type %u", h.type);
		}
		if (s->link.fd < 0)
			return;   /* a callback brought the link down */
		link_consume(&s->link, &h);
	}
}

static void uplink_on_retry(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)loop;
	(void)revents;
	uplink_connect(t->data);
}

/* A new link: a new ring, offered to storage before anything else (its descriptor rides on the
 * first byte). Chunks use it once storage answers that it mapped it. */
static void uplink_offer_ring(struct worker *w)
{
	struct uplink *s = &w->uplink;
	if (w->conf->link_ring == 0)
		return;
	if (shmring_create(&s->ring, (size_t)w->conf->link_ring) < 0) {
		log_warn("cannot create the shared ring of %" PRId64 " bytes: chunks are copied over the link",
		    w->conf->link_ring);
		return;
	}
	struct buf msg = { 0 };
	if (ipc_encode_ring(&msg, s->ring.size) < 0 || link_send_fd(&s->link, buf_head(&msg), buf_len(&msg), s->ring.fd) < 0) {
		log_warn("cannot offer the shared ring to storage: chunks are copied over the link");
		shmring_destroy(&s->ring);
	}
	buf_free(&msg);
}

static void uplink_connect(struct worker *w)
{
	struct uplink *s = &w->uplink;
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	if (link_socket_path(w->conf->run_dir, sun.sun_path, sizeof(sun.sun_path)) < 0)
		fatalx("run_dir %s is too long for a Unix socket path", w->conf->run_dir);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		uplink_down(w, strerror(errno));
		return;
	}
	s->connected = 0;
	s->ready = 0;
	s->bye = 0;
	/* A Unix socket connects at once or not at all (EAGAIN: backlog full, try again). */
	if (connect(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
		int err = errno;
		close(fd);
		uplink_down(w, strerror(err));
		return;
	}
	s->connected = 1;
	/* The socket outlives storage processes (the master holds it), so a connect may
	 * only reach the backlog: the link is reported up once a storage process answers a ping. */
	link_open(&s->link, w->loop, fd, uplink_on_io, w);
	uplink_offer_ring(w);
	if (ipc_encode_ping(&s->link.out, 0, 0) == 0) {
		uplink_resend_unsent(w);
		uplink_flush(w);
	}
}

/* Queues the current request on the storage link under a new request id. Returns 0, or -1
 * when it was answered instead (bad data, out of memory). */
static int uplink_send(struct conn *c)
{
	struct worker *w = c->w;
	struct uplink *s = &w->uplink;
	uint64_t reqid = conn_next_reqid(c);
	int rc;
	if (c->req.id == MSG_SYNC) {
		struct ipc_sync msg = { .uid = c->req.u.sync.cred.uid };
		memcpy(msg.md5, c->req.u.sync.md5, sizeof(msg.md5));
		rc = ipc_encode_sync(&s->link.out, reqid, &msg);
	} else {
		const struct proto_chunk *ch = &c->req.u.chunk;
		struct ipc_chunk msg = {
			.uid = ch->cred.anonymous ? 0 : ch->cred.uid, .seq = ch->seq, .trans_size = ch->trans_size,
			.total_size = ch->total_size, .last = (uint8_t)ch->last,
			.kind = c->req.id == MSG_AVATAR ? UPLOAD_AVATAR : UPLOAD_FILE,
			.name = ch->name, .name_len = (uint16_t)ch->name_len,
			.data_len = (uint32_t)ch->data_len,
		};
		memcpy(msg.md5, ch->md5, sizeof(msg.md5));
		/* The chunk is decoded straight from its frame into the shared ring, or else into the
		 * message queued for the storage process (again from the same frame if the link is lost
		 * before the answer). */
		size_t room = b64_decode_room(ch->data_b64_len);
		uint32_t slot = 0;
		uint64_t at = 0;
		uint8_t *data = s->ring_ready ? shmring_reserve(&s->ring, room, &slot, &at) : NULL;
		int in_ring = data != NULL;
		if (!in_ring)
			data = ipc_reserve_chunk(&s->link.out, &msg, room);
		rc = data ? 0 : -1;
		if (data != NULL) {
			char why[128];
			if (proto_decode_chunk(ch, data, room, why, sizeof(why)) != ERR_OK) {
				if (in_ring)
					shmring_cancel(&s->ring, slot);
				respond_request_error(c, ERR_JSON, why);
				return -1;
			}
			if (in_ring) {
				shmring_trim(&s->ring, slot, msg.data_len);
				if ((rc = ipc_encode_chunk_ref(&s->link.out, reqid, &msg, slot, at)) < 0)
					shmring_cancel(&s->ring, slot);
				else
					STAT_ADD(chunks_by_ring, 1);
			} else {
				ipc_commit_chunk(&s->link.out, reqid, &msg);
				STAT_ADD(chunks_copied, 1);
			}
		}
	}
	if (rc < 0) {
		respond_request_error(c, ERR_BUSY, "server busy: out of memory");
		return -1;
	}
	c->req.unsent = 0;
	return 0;
}

/* While no link is up, a chunk waits for one: its data is checked now, so that bad base64 is
 * answered 1001 at once, not 1027 later. Returns 0, or -1 when it was answered. */
static int chunk_data_check(struct conn *c)
{
	const struct proto_chunk *ch = &c->req.u.chunk;
	size_t room = b64_decode_room(ch->data_b64_len);
	uint8_t *scratch = malloc(room);
	if (scratch == NULL) {
		respond_request_error(c, ERR_BUSY, "server busy: out of memory");
		return -1;
	}
	char why[128];
	int rc = proto_decode_chunk(ch, scratch, room, why, sizeof(why));
	free(scratch);
	if (rc != ERR_OK) {
		respond_request_error(c, ERR_JSON, why);
		return -1;
	}
	return 0;
}

/* Hands the current request to the storage process; the answer resumes the connection. While
 * the link is down (a storage process restarting after a reload or a crash) the request waits
 * for the next link, at most storage_timeout, so a restart of storage is invisible to clients. */
static void uplink_forward(struct conn *c)
{
	struct worker *w = c->w;
	struct uplink *s = &w->uplink;
	/* Connected but not yet ready (the ping is unanswered): the request queues behind
	 * the ping, and storage_timeout answers 1027 if no storage process takes it. */
	int link = s->link.fd >= 0 && s->connected;
	if (link) {
		if (uplink_send(c) < 0)
			return;
	} else {
		if (c->req.id != MSG_SYNC && chunk_data_check(c) < 0)
			return;
		conn_next_reqid(c);   /* nothing owed to an earlier step may match it */
		c->req.unsent = 1;
	}
	if (c->req.id == MSG_SYNC)
		conn_drove(c, c->req.u.sync.cred.uid, c->req.u.sync.md5);
	else
		conn_drove(c, c->req.u.chunk.cred.anonymous ? 0 : c->req.u.chunk.cred.uid, c->req.u.chunk.md5);
	c->busy = 1;
	c->req.stage = STAGE_STORAGE;
	c->req.since = ev_now(w->loop);
	if (link)
		uplink_flush(w);
}

/* A new link is connected: the requests held while there was none go on it, behind the ping. */
static void uplink_resend_unsent(struct worker *w)
{
	unsigned sent = 0;
	for (uint32_t i = 0; i < w->conns_cap; i++) {
		struct conn *c = w->conns[i];
		if (c == NULL || !c->busy || c->req.stage != STAGE_STORAGE || !c->req.unsent)
			continue;
		if (uplink_send(c) < 0)
			conn_process(c);   /* answered: the connection moves on (or closes) */
		else
			sent++;
	}
	if (sent)
		log_info("storage link: %u held requests sent", sent);
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
	json_put_str(jw, "version", version, strlen(version));
	json_end(jw, &body, &len);
	rds_command(&w->redis, NULL, NULL, "SETEX %s %d %b", key, w->conf->upload_ttl, body, len);
}

/* The versions of a name that downloads may still be resumed from (docs/protocol.md §8,
 * file_dlversions_). Several downloads of one name may run at once (one user, several devices), and
 * a request does not say which version it started from, so a seq > 1 read from a freshly opened
 * file ("check") is served only when no other version is live, else 0: 1029. Each version's field
 * is "time started completed born": the Redis time of its last chunk, the seq 1s served from it
 * ("start", which answers born, a token of the field's lifetime), and the downloads that reached
 * their last chunk on the connection that served their seq 1 ("done" with that born: each start
 * pairs with at most one completion, so a resent last chunk never hides another device's download).
 * A version is live while started > completed and its last chunk is younger than ttl; a field that is
 * not live is removed. "keep" and "check" refresh the time of a version already there, "peek" (a
 * seq past the end of the current file) only checks. More than 16 fold the oldest into "*", which
 * keeps their downloads in progress and matches no version. ARGV: mode, version, ttl, born. */
static const char download_versions_script[] =
    "local tm = redis.call('TIME')\n"
    "local now = tonumber(tm[1])\n"
    "local mode, v, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])\n"
    "local blind = mode == 'start' or mode == 'keep' or mode == 'done'\n"
    "local all = redis.call('HGETALL', KEYS[1])\n"
    "local e, n = {}, 0\n"
    "for i = 1, #all, 2 do\n"
    "  local o = all[i]\n"
    "  local t, s, c, b = string.match(all[i + 1], '^(%d+) (%d+) (%d+) (%S+)$')\n"
    "  if t then t, s, c = tonumber(t), tonumber(s), tonumber(c)\n"
    "  else t, s, c, b = tonumber(all[i + 1]) or 0, 1, 0, '-' end\n"
    "  if now - t >= ttl or s <= c then redis.call('HDEL', KEYS[1], o)\n"
    "  elseif o ~= v and not blind then return 0\n"
    "  else e[o] = {t, s, c, b}; n = n + 1 end\n"
    "end\n"
    "if mode == 'peek' then return 1 end\n"
    "local x = e[v]\n"
    "if mode == 'start' then\n"
    "  if not x then x = {now, 0, 0, tm[1] .. '.' .. tm[2]}; e[v] = x; n = n + 1 end\n"
    "  x[2] = x[2] + 1\n"
    "elseif not x then return 1\n"
    "elseif mode == 'done' then\n"
    "  if x[4] ~= ARGV[4] then return 1 end\n"
    "  x[3] = x[3] + 1\n"
    "end\n"
    "x[1] = now\n"
    "if x[2] <= x[3] then redis.call('HDEL', KEYS[1], v); return 1 end\n"
    "redis.call('HSET', KEYS[1], v, string.format('%d %d %d %s', x[1], x[2], x[3], x[4]))\n"
    "while n > 16 do\n"
    "  local old, at = nil, now\n"
    "  for o, y in pairs(e) do if o ~= v and o ~= '*' and y[1] <= at then old, at = o, y[1] end end\n"
    "  local y, star = e[old], e['*']\n"
    "  e[old] = nil\n"
    "  redis.call('HDEL', KEYS[1], old)\n"
    "  if star then n = n - 1 else star = {at, 0, 0, '*'}; e['*'] = star end\n"
    "  star[1], star[2] = math.max(star[1], at), star[2] + y[2] - y[3]\n"
    "  redis.call('HSET', KEYS[1], '*', string.format('%d %d %d %s', star[1], star[2], star[3], star[4]))\n"
    "end\n"
    "redis.call('EXPIRE', KEYS[1], ttl)\n"
    "if mode == 'start' then return x[4] end\n"
    "return 1\n";

/* Runs the versions script for the version a chunk was read from (born: "" unless mode is "done");
 * -1 when Redis is not there. */
static int download_versions(struct worker *w, uint64_t uid, const char *name, size_t name_len, const char *mode,
    const char *version, const char *born, redisCallbackFn *cb, void *privdata)
{
	char key[sizeof(w->conf->redis_prefix) + 64 + PROTO_NAME_MAX], ttl[24];
	int n = snprintf(key, sizeof(key), "%sfile_dlversions_%" PRIu64 "_%.*s", w->conf->redis_prefix, uid,
	    (int)name_len, name);
	if (n < 0 || (size_t)n >= sizeof(key))
		return -1;
	snprintf(ttl, sizeof(ttl), "%d", w->conf->upload_ttl);
	const char *argv[] = { "EVAL", download_versions_script, "1", key, mode, version, ttl, born };
	size_t len[] = { 4, strlen(download_versions_script), 1, strlen(key), strlen(mode), strlen(version),
	    strlen(ttl), strlen(born) };
	return rds_command_argv(&w->redis, cb, privdata, (int)(sizeof(argv) / sizeof(argv[0])), argv, len);
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
		char name[ESCAPE_SIZE(PROTO_NAME_MAX)];
		escape_quoted(name, sizeof(name), d->name, d->name_len);
		access_log("%s uid=%" PRIu64 " download name=\"%s\" bytes=%" PRIu64 " duration=%.3f result=0", c->peer,
		    d->cred.uid, name, j->size, ev_now(c->w->loop) - c->xfer_start);
	}
}

/* Queues a 1034 answer with the chunk's base64 encoded once, straight into the output
 * buffer: the other fields come from the JSON writer, data goes last (base64 needs no
 * JSON escaping). Returns -1 when out of memory (nothing queued). */
static int download_send_chunk(struct conn *c, const struct proto_download *d, const struct download_job *j,
    uint64_t current, int is_last)
{
	struct json_writer *jw = &c->w->jw;
	json_begin(jw);
	json_put_int(jw, "error", 0);
	json_put_int(jw, "seq", (int64_t)d->seq);
	json_put_u64_str(jw, "total_size", j->size);
	json_put_u64_str(jw, "current_size", current);
	json_put_bool(jw, "is_last", is_last);
	json_put_str(jw, "name", d->name, d->name_len);
	json_put_str(jw, "client_path", d->client_path ? d->client_path : "", d->client_path_len);
	const uint8_t *fields;
	size_t fields_len;
	json_open_fields(jw, &fields, &fields_len);   /* "{...": the object left open */
	static const char data_key[] = ",\"data\":\"", close[] = "\"}";
	size_t text_len = b64_encoded_len(j->got);
	size_t body_len = fields_len + strlen(data_key) + text_len + strlen(close);
	if (body_len > UINT32_MAX)
		return -1;
	uint8_t *p = buf_reserve(&c->out, FRAME_HEADER_LEN + body_len + 1);   /* + the NUL modp_b64 writes */
	if (p == NULL)
		return -1;
	frame_put_header(p, MSG_DOWNLOAD + 1, (uint32_t)body_len);
	p += FRAME_HEADER_LEN;
	memcpy(p, fields, fields_len);
	p += fields_len;
	memcpy(p, data_key, strlen(data_key));
	p += strlen(data_key);
	p += b64_encode((char *)p, j->data, j->got);
	memcpy(p, close, strlen(close));
	buf_commit(&c->out, FRAME_HEADER_LEN + body_len);
	STAT_INC(frames_out);
	STAT_ADD(bytes_out, FRAME_HEADER_LEN + body_len);
	return 0;
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
		respond_download_error(c, j->error, msg);
	} else {
		uint64_t current = j->offset + j->got;
		int is_last = current >= j->size;
		if (download_send_chunk(c, d, j, current, is_last) < 0) {
			respond_download_error(c, ERR_BUSY, "server busy: out of memory");
		} else {
			c->in_transfer = !is_last;
			download_record_progress(w, d, current, j->size, is_last, j->version);
			/* A connection reading its own view of a name (a kept file, or one reopened at the
			 * version it remembers) keeps that version live (now and then: the time only matters
			 * at upload_ttl's scale), so that its own resume elsewhere hears 1029; its last chunk,
			 * when the download began here at seq 1, counts it complete, once. */
			struct dl_seen *s = j->borrowed || j->own ? dl_seen_find(c, d->cred.uid, d->name, d->name_len) : NULL;
			double every = w->conf->upload_ttl / 4.0 < 60 ? w->conf->upload_ttl / 4.0 : 60;
			if (s && !dl_seen_is(s, j->version))
				s = NULL;
			if (s)
				s->used = c->dl_tick;
			if (s && is_last && s->born[0] != '\0') {
				if (download_versions(w, d->cred.uid, d->name, d->name_len, "done", j->version, s->born, NULL,
				    NULL) == 0)
					s->versions_at = ev_now(w->loop);
				s->born[0] = '\0';   /* once: a resent last chunk is not another completion */
			} else if (s && ev_now(w->loop) - s->versions_at >= every &&
			    download_versions(w, d->cred.uid, d->name, d->name_len, "keep", j->version, "", NULL, NULL) == 0) {
				s->versions_at = ev_now(w->loop);
			}
			download_account(c, d, j, current, is_last);
			if (is_last && !j->opened)
				dl_drop(c, d->cred.uid, d->name, d->name_len);   /* the chunk is in the output buffer */
		}
	}
	download_job_free(w, j);
	request_finish(c);
	conn_process(c);
}

/* The versions script's answer for a chunk read from a freshly opened file: 1 serves it, a string
 * serves seq 1 (its start is counted; the string is the token its completion is counted with), 0
 * answers 1029 (another version of the name is live), anything else 1027 (never a guess). */
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
	int started = rep && rep->type == REDIS_REPLY_STRING && rep->len > 0 && rep->len < sizeof(c->seen->born);
	if (rep == NULL || (rep->type != REDIS_REPLY_INTEGER && !started)) {
		if (rep && rep->type == REDIS_REPLY_ERROR)
			log_warnx("redis: download versions script failed: %s", rep->str);
		download_job_free(w, j);
		respond_request_error(c, ERR_BUSY, "server busy: cannot check the download versions, retry");
		conn_process(c);
		return;
	}
	if (!started && rep->integer != 1) {
		download_job_free(w, j);
		respond_request_error(c, ERR_FILE_CHANGED,
		    "name: the file was replaced since this download started; download it again from seq 1");
		conn_process(c);
		return;
	}
	if (!j->error) {
		char born[sizeof(c->seen->born)] = "";
		if (started) {
			memcpy(born, rep->str, rep->len);
			born[rep->len] = '\0';
		}
		dl_remember(c, j->file, d->cred.uid, d->name, d->name_len, j->size, j->version);
		j->opened = 0;   /* the connection keeps it now */
		/* Seq 1 starts this connection's view of the name; a stranger's resume, served because no
		 * other version is live, becomes its view too (a kept file would go on serving it). */
		dl_seen_remember(c, d->cred.uid, d->name, d->name_len, j->version, born);
	}
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
	int past_end = j->error == ERR_OFFSET_INVALID && d->seq > 1;
	int whole = d->seq == 1 && !j->error && j->offset + j->got >= j->size;   /* a download of one chunk */
	struct dl_seen *seen = j->opened && d->seq > 1 && (!j->error || past_end) ?
	    dl_seen_find(c, d->cred.uid, d->name, d->name_len) : NULL;
	if (seen != NULL && !dl_seen_is(seen, j->version)) {
		/* This connection's download of the name began at another version, whose file was closed
		 * to make room: the current file would be a mix. */
		download_job_free(w, j);
		respond_request_error(c, ERR_FILE_CHANGED,
		    "name: the file was replaced since this download started; download it again from seq 1");
		conn_process(c);
		return;
	}
	if (seen != NULL) {
		/* Its own download, reopened at the version it began at: served as from a kept file (past
		 * the end is 1018), and its last chunk completes it (download_reply). */
		j->own = 1;
		if (!j->error) {
			dl_remember(c, j->file, d->cred.uid, d->name, d->name_len, j->size, j->version);
			j->opened = 0;   /* the connection keeps it now */
		}
		download_reply(c, j);
		return;
	}
	if (j->opened && (!j->error || past_end) && !whole) {
		/* Read from a freshly opened file. Seq 1 counts its download started before it is answered,
		 * so a resume anywhere finds its version live; a later seq is served only if no other version
		 * is live (and past the end of the current file is 1029 too if the download may have started
		 * on a longer one). A seq 1 that is also the last chunk starts and completes at once: nothing
		 * can be resumed, nothing to count. */
		uint64_t reqid = conn_next_reqid(c);
		const char *mode = past_end ? "peek" : d->seq > 1 ? "check" : "start";
		if (download_versions(w, d->cred.uid, d->name, d->name_len, mode, j->version, "", download_on_record,
		    (void *)(uintptr_t)reqid) < 0) {
			download_job_free(w, j);
			respond_request_error(c, ERR_BUSY, "server busy: cannot check the download versions, retry");
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
		dl_seen_remember(c, d->cred.uid, d->name, d->name_len, j->version, "");   /* one chunk: nothing to count */
	}
	download_reply(c, j);
}

/* A later chunk of a file the connection keeps open: read on the loop when the page cache holds
 * all of it (RWF_NOWAIT never waits for the disk). Returns 1 when j holds the chunk. */
static int download_read_cached(struct worker *w, struct download_job *j)
{
	int fd = w->backend.ops->file_fd ? w->backend.ops->file_fd(j->file) : -1;
	if (fd < 0 || j->offset >= j->size)
		return 0;   /* no descriptor, or past the end: the disk thread answers as always */
	size_t want = j->size - j->offset < j->want ? (size_t)(j->size - j->offset) : j->want;
	struct iovec iov = { j->data, want };
	ssize_t n = preadv2(fd, &iov, 1, (off_t)j->offset, RWF_NOWAIT);
	if (n < 0 || (size_t)n != want)
		return 0;   /* EAGAIN (not cached), short, or no RWF_NOWAIT here: a disk thread reads it all */
	j->got = want;
	return 1;
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
	j->offset = d->offset;   /* proto checked it cannot overflow */
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
	/* With the disk threads idle, waking one costs more than the copy; with work queued, they
	 * read beside the loop (on 64 connections reading on the loop was a third slower). */
	if (f != NULL && pool_queued(w->pool) == 0 && download_read_cached(w, j))
		pool_complete(w->pool, &j->job);   /* read already: no disk thread woken for it */
	else
		pool_submit(w->pool, &j->job);
}

/* ---------------------------------------------------------------- binary fast path (1041-1048) */

/* A chunk on its way to storage, acknowledged in the order sent. */
struct bin_inflight {
	uint64_t reqid;
	uint64_t offset;
	uint32_t length;
};

/* A range being sent with sendfile() by a disk thread (the descriptor may block on a cold page cache). */
struct bin_send_job {
	struct pool_job job;
	struct worker *w;
	uint32_t slot;
	int sock;                     /* the connection's socket */
	int fd;                       /* the published file, or -1: the backend has no descriptor (file_fd) */
	struct backend_file *source;  /* read through the backend when fd is -1 */
	uint64_t offset, left;
	int saved_errno;              /* 0, EAGAIN (socket full: wait for it) or the failure */
	int orphaned;                 /* the connection went away: close sock and file when done */
	struct backend_file *file;    /* set only when orphaned: closed when done */
};

/* Opens a published file for 1047 on a disk thread. */
struct bin_open_job {
	struct pool_job job;
	struct worker *w;
	uint64_t reqid;
	uint64_t uid;
	char name[PROTO_NAME_MAX + 1];
	size_t name_len;
	struct backend_file *file;
	uint64_t size;
	char version[BACKEND_VERSION_MAX];
	int saved_errno;
};

/* What a connection that said 1041 holds: its credentials, its open upload, its open file. */
struct bin_conn {
	uint64_t uid;
	char token[PROTO_TOKEN_MAX];
	size_t token_len;
	/* The upload 1043 opened. */
	int up_open;
	int up_broken;                /* a chunk failed: later ones are refused until a new 1043 */
	/* The credentials are trusted until then (auth_cache_ttl after their last check); a chunk
	 * after it waits while they are checked again in Redis (auth_pending), as a JSON chunk's
	 * are, and a refusal (auth_error) answers that chunk and breaks the upload. */
	ev_tstamp trusted_until;
	int auth_checked;             /* a check just said yes: the chunk that waited for it goes on
	                               * (with auth_cache_ttl = 0, trusted_until is already past) */
	int auth_pending;
	int auth_error;
	uint64_t auth_reqid;
	/* When the server's hold on the next frame last moved: a chunk taken or acknowledged, or a
	 * wait for the cap or the link begun (bin_server_holds). */
	ev_tstamp held_since;
	uint8_t kind;
	char md5[PROTO_MD5_HEX + 1];
	char name[PROTO_NAME_MAX + 1];
	size_t name_len;
	uint64_t total;
	uint64_t cursor;              /* where the next chunk must start */
	uint64_t next_seq;            /* the seq storage is given for it */
	uint64_t committed;           /* the last acknowledged committed size */
	/* Opened with BIN_OPEN_INSTANT at 0: until an answer is neither a challenge nor the end, each
	 * chunk goes alone and answers may send the client elsewhere (to a chunk asked for). */
	int instant;
	struct bin_inflight ring[BIN_MAX_INFLIGHT];
	unsigned head, count;
	uint64_t inflight_bytes;
	/* The file of the last 1047, kept open: a range asked with its version reads that very file. */
	struct backend_file *file;
	uint64_t file_size;
	char file_name[PROTO_NAME_MAX + 1];
	size_t file_name_len;
	char file_version[BACKEND_VERSION_MAX];
	/* A range being sent: sf_before bytes of conn->out go first, then sf_left bytes of the file. */
	int sf_pending;
	size_t sf_before;
	uint64_t sf_offset, sf_left;
	struct bin_send_job *sf_job;
	int link_waiting;             /* counted in worker->bin_link_waiters */
	/* A 1045 whose data is being received straight from the socket into a slot of the shared
	 * ring (its frame and chunk headers kept here): the worker copies none of its bytes. */
	int cap_waiting;              /* in the worker's cap_head list, for a chunk of cap_want bytes */
	int ring_want;                /* ... and for that much room in the shared ring, since ring_since */
	ev_tstamp ring_since;
	uint32_t cap_want;
	struct conn *cap_next, *cap_prev;
	int direct;
	/* The headers of a large chunk wait for room in the window: its data stays in the socket (no
	 * reading) until then, and goes straight into the ring instead of through c->in. */
	int direct_held;
	uint8_t direct_hdr[FRAME_HEADER_LEN + BIN_CHUNK_LEN];
	uint8_t *direct_data;
	uint32_t direct_slot, direct_len, direct_got;
	uint64_t direct_at;
};

#define BIN_REQID_TAG 0x80000000u   /* in a reqid's slot half: the answer is a binary chunk's */
#define BIN_SEND_BURST (16u << 20)  /* bytes one send job moves at most before the loop sees it */
#define BIN_LINK_BACKLOG (16u << 20) /* chunk bytes queued for the storage link before chunks wait */
#define BIN_DIRECT_MIN (64u << 10)   /* smaller chunks are read with their frame, as before */
#define BIN_RING_RETRY 0.001          /* seconds between looks for room in a full ring */
#define BIN_RING_WAIT_MAX 0.05        /* a wait this long while the ring is pinned: its client stopped */
#define BIN_RING_WAIT_OFF 1.0         /* seconds chunks then take the copy path instead of waiting */

static uint32_t conn_max_body(const struct conn *c)
{
	uint32_t max = (uint32_t)c->w->conf->max_frame;
	if (c->bin && max < BIN_MAX_CHUNK + BIN_CHUNK_LEN)
		max = BIN_MAX_CHUNK + BIN_CHUNK_LEN;
	return max;
}

/* How much one read asks for: the rest of a large binary frame at once, else READ_CHUNK. */
static size_t bin_read_room(const struct conn *c)
{
	size_t have = buf_len(&c->in);
	const struct bin_conn *b = c->bin;
	if (b != NULL && b->direct_held && !b->direct)
		return 0;
	/* While an upload streams into the shared ring, the headers of the next chunk first, alone:
	 * its data is then read straight into its slot, not into this buffer. */
	if (b != NULL && b->up_open && !b->up_broken && c->w->uplink.ring_ready &&
	    have < FRAME_HEADER_LEN + BIN_CHUNK_LEN)
		return FRAME_HEADER_LEN + BIN_CHUNK_LEN - have;
	if (c->bin == NULL || have < FRAME_HEADER_LEN)
		return READ_CHUNK;
	size_t frame = frame_total_at(c);
	if (frame > (size_t)conn_max_body(c) + FRAME_HEADER_LEN || frame <= have + READ_CHUNK)
		return READ_CHUNK;
	return frame - have;
}

static int bin_holds_output(const struct conn *c)
{
	return c->bin && c->bin->sf_pending;
}

static int bin_chunks_in_flight(const struct conn *c)
{
	return c->bin && c->bin->count > 0;
}

/* The server holds this connection's next frame back: chunks in flight (storage answers each, or
 * the link breaks), or a chunk waiting for the worker's cap, the link's backlog or the window (which
 * is full only with chunks in flight). For storage_timeout after the hold last moved at most: a
 * storage process that stopped answering while its link stays up must not keep a connection, and
 * its memory, forever. (Not a chunk waiting for Redis to check the credentials again, nor
 * direct_held alone, which stays set while the client does not read its answers: nothing bounds
 * those waits but the connection's own clocks.) */
static int bin_server_holds(const struct conn *c, ev_tstamp now)
{
	const struct bin_conn *b = c->bin;
	return b != NULL && (b->count > 0 || b->cap_waiting || b->link_waiting) &&
	    now - b->held_since < c->w->conf->storage_timeout;
}

static size_t bin_out_limit(const struct conn *c)
{
	if (!bin_holds_output(c))
		return buf_len(&c->out);
	return c->bin->sf_before;
}

static void bin_out_sent(struct conn *c, size_t n)
{
	if (bin_holds_output(c))
		c->bin->sf_before -= n < c->bin->sf_before ? n : c->bin->sf_before;
}

static int bin_wants_write(const struct conn *c)
{
	if (!bin_holds_output(c))
		return buf_len(&c->out) > 0;
	if (c->bin->sf_job)
		return 0;   /* the disk thread is writing the socket; its done callback looks again */
	return 1;
}

/* 1 when a chunk of want bytes may go to storage now under the worker's cap on unanswered bytes
 * (a chunk larger than the cap goes once nothing else is unanswered). */
static int bin_cap_fits(const struct worker *w, uint64_t want)
{
	return w->bin_unanswered == 0 || w->bin_unanswered + want <= w->bin_cap;
}

/* Queues c behind the connections already waiting for the worker's unanswered bytes to fall. */
static void bin_cap_wait(struct conn *c, uint32_t want)
{
	struct worker *w = c->w;
	struct bin_conn *b = c->bin;
	b->cap_want = want;
	if (b->cap_waiting)
		return;
	b->cap_waiting = 1;
	b->held_since = ev_now(w->loop);
	b->cap_next = NULL;
	b->cap_prev = w->cap_tail;
	if (w->cap_tail)
		w->cap_tail->bin->cap_next = c;
	else
		w->cap_head = c;
	w->cap_tail = c;
}

static void bin_cap_unlink(struct conn *c)
{
	struct worker *w = c->w;
	struct bin_conn *b = c->bin;
	if (!b->cap_waiting)
		return;
	if (b->cap_prev)
		b->cap_prev->bin->cap_next = b->cap_next;
	else
		w->cap_head = b->cap_next;
	if (b->cap_next)
		b->cap_next->bin->cap_prev = b->cap_prev;
	else
		w->cap_tail = b->cap_prev;
	b->cap_waiting = 0;
	b->ring_want = 0;
	b->cap_next = b->cap_prev = NULL;
}

/* Answers came back: connections that waited for the worker's cap go on, oldest first, while the
 * chunk each waits with fits. (One that goes on and waits again is queued last, its chunk not
 * fitting any more: the loop ends once the head's chunk does not fit.) */
static void bin_cap_wake(struct worker *w)
{
	struct uplink *s = &w->uplink;
	ev_tstamp now = ev_now(w->loop);
	const struct bin_conn *head = w->cap_head ? w->cap_head->bin : NULL;
	if (head && head->ring_want && s->ring_ready && now - head->ring_since >= BIN_RING_WAIT_MAX &&
	    shmring_pinned(&s->ring) && !shmring_fits(&s->ring, head->cap_want))
		w->ring_wait_off_until = now + BIN_RING_WAIT_OFF;   /* pinned: everyone takes the copy path a while */
	while (w->cap_head != NULL && bin_cap_fits(w, w->cap_head->bin->cap_want) &&
	    (!w->cap_head->bin->ring_want || !s->ring_ready || now < w->ring_wait_off_until ||
	    shmring_fits(&s->ring, w->cap_head->bin->cap_want))) {
		struct conn *c = w->cap_head;
		bin_cap_unlink(c);
		conn_process(c);   /* may close c, or queue it again at the end */
	}
	/* Nothing tells the worker that the storage process freed ring room: the head that waits only
	 * for room looks again every BIN_RING_RETRY. One the cap holds as well is woken by the answers
	 * it waits for (this function runs on each), so no timer runs for it. */
	const struct conn *h = w->cap_head;
	if (h != NULL && h->bin->ring_want && bin_cap_fits(w, h->bin->cap_want)) {
		if (!ev_is_active(&w->ring_retry))
			ev_timer_start(w->loop, &w->ring_retry);
	} else {
		ev_timer_stop(w->loop, &w->ring_retry);
	}
}

static void bin_on_ring_retry(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)loop;
	(void)revents;
	bin_cap_wake(t->data);
}

/* Redis's answer to a chunk's check of the hello's credentials (bin_auth_start). */
static void bin_auth_on_reply(redisAsyncContext *ctx, void *reply, void *privdata)
{
	struct rds *r = ctx->data;
	struct worker *w = r->data;
	uint64_t reqid = (uint64_t)(uintptr_t)privdata;
	struct conn *c = conn_in_slot(w, (uint32_t)reqid);
	if (c == NULL || c->bin == NULL || !c->bin->auth_pending || c->bin->auth_reqid != reqid)
		return;   /* the connection went away */
	struct bin_conn *b = c->bin;
	b->auth_pending = 0;
	uint8_t got[crypto_generichash_BYTES];
	b->auth_error = auth_verdict(c, reply, b->uid, b->token, b->token_len, got);
	if (b->auth_error == ERR_OK) {
		b->trusted_until = ev_now(w->loop) + w->conf->auth_cache_ttl;
		b->auth_checked = 1;
	}
	conn_process(c);
}

/* The trust in the hello's credentials ran out: the next chunk waits for Redis. Returns 1 when
 * it may be handled at once (Redis unreachable: the chunk is refused with 1027). */
static int bin_auth_start(struct conn *c)
{
	struct bin_conn *b = c->bin;
	char key[64];
	snprintf(key, sizeof(key), "utoken_%" PRIu64, b->uid);
	uint64_t reqid = (uint64_t)++c->w->op_seq << 32 | c->slot;
	if (rds_command(&c->w->redis, bin_auth_on_reply, (void *)(uintptr_t)reqid, "GET %s", key) < 0) {
		b->auth_error = ERR_BUSY;
		return 1;
	}
	b->auth_pending = 1;
	b->auth_reqid = reqid;
	return 0;
}

/* Whether the frame id may be handled now: a chunk waits while the window is full, and an
 * open or hello waits for the chunks in flight (their answers belong to the upload before). */
static int bin_ready_for(struct conn *c, uint16_t id, uint32_t len)
{
	struct bin_conn *b = c->bin;
	if (b == NULL)
		return 1;
	if (id == MSG_BIN_CHUNK) {
		if (b->auth_pending)
			return 0;   /* bin_auth_on_reply brings it back */
		if (b->up_open && !b->up_broken && b->auth_error == 0 && !b->auth_checked &&
		    ev_now(c->w->loop) >= b->trusted_until)
			return bin_auth_start(c);
		/* Bound what waits in the storage link: the windows of many connections would
		 * otherwise pile up there (and every append could move that backlog). */
		if (buf_len(&c->w->uplink.link.out) >= BIN_LINK_BACKLOG) {
			if (!b->link_waiting) {
				b->link_waiting = 1;
				b->held_since = ev_now(c->w->loop);
				c->w->bin_link_waiters++;
				uplink_update_io(c->w);
			}
			return 0;
		}
		uint32_t data_len = len > BIN_CHUNK_LEN ? len - BIN_CHUNK_LEN : 0;
		/* Bound what all connections have on their way to storage together: with a window of
		 * 8 MiB each, 64 connections kept 512 MiB in the storage process, written long after
		 * it was received (out of every cache) and past the shared ring. */
		struct worker *w = c->w;
		if (!bin_cap_fits(w, data_len)) {
			bin_cap_wait(c, data_len);
			return 0;
		}
		return b->count == 0 || (b->count < BIN_MAX_INFLIGHT && b->inflight_bytes + data_len <= BIN_WINDOW);
	}
	if (id == MSG_BIN_UPLOAD_OPEN || id == MSG_BIN_HELLO)
		return b->count == 0;
	return 1;
}


static void bin_send_ack(struct conn *c, int error, uint64_t offset, uint32_t length, uint64_t committed,
    uint64_t total, const char *msg)
{
	uint8_t body[BIN_ACK_LEN + BIN_MSG_MAX];
	size_t n = bin_put_ack(body, (uint32_t)error, offset, length, committed, total, msg);
	conn_queue_frame(c, MSG_BIN_CHUNK + 1, body, n, error);
}

static void bin_send_open_answer(struct conn *c, int error, uint64_t committed, uint64_t total, const char *msg)
{
	uint8_t body[BIN_OPEN_ANSWER_LEN + BIN_MSG_MAX];
	size_t n = bin_put_open_answer(body, (uint32_t)error, committed, total, msg);
	conn_queue_frame(c, MSG_BIN_UPLOAD_OPEN + 1, body, n, error);
}

static void bin_send_range_error(struct conn *c, int error, const char *msg)
{
	uint8_t body[BIN_RANGE_LEN + BIN_VERSION_MAX + 2 + BIN_MSG_MAX];
	size_t n = bin_put_range(body, (uint32_t)error, 0, 0, 0, NULL, msg);
	conn_queue_frame(c, MSG_BIN_DOWNLOAD + 1, body, n, error);
}

/* A request that failed before its work started: the answer its id needs. */
static void bin_respond_request_error(struct conn *c, int error, const char *message)
{
	if (c->req.id == MSG_BIN_UPLOAD_OPEN)
		bin_send_open_answer(c, error, 0, c->req.u.bopen.open.total_size, message);
	else if (c->req.id == MSG_BIN_DOWNLOAD)
		bin_send_range_error(c, error, message);
	else
		respond_error(c, c->req.id, error, message);
}

/* The hello's credentials are good: the connection speaks the fast path from now on. */
static void bin_hello_finish(struct conn *c)
{
	const struct proto_credentials *cred = &c->req.u.hello;
	struct bin_conn *b = c->bin;
	if (b == NULL && (b = c->bin = calloc(1, sizeof(*b))) == NULL) {
		respond_request_error(c, ERR_BUSY, "server busy: out of memory");
		return;
	}
	if (b->uid != cred->uid) {
		/* Another user: nothing of the one before stays reachable. */
		b->up_open = 0;
		if (b->file && !b->sf_pending) {
			c->w->backend.ops->file_close(b->file);
			b->file = NULL;
		}
	}
	b->uid = cred->uid;
	memcpy(b->token, cred->token, cred->token_len);
	b->token_len = cred->token_len;
	b->trusted_until = c->auth_until;   /* just checked, or trusted from the cache until then */
	b->auth_error = 0;
	struct json_writer *jw = &c->w->jw;
	json_begin(jw);
	json_put_int(jw, "error", 0);
	json_put_int(jw, "version", BIN_VERSION);
	json_put_int(jw, "window", BIN_WINDOW);
	json_put_int(jw, "max_inflight", BIN_MAX_INFLIGHT);
	json_put_int(jw, "max_chunk", BIN_MAX_CHUNK);
	json_put_int(jw, "max_range", BIN_MAX_RANGE);
	json_put_int(jw, "max_file_size", (int64_t)c->w->conf->max_file_size);
	conn_send_json(c, MSG_BIN_HELLO + 1, 0);
	request_finish(c);
}

/* 1043 once its credentials are good: asks storage how far the upload is. */
static void bin_open_start(struct conn *c)
{
	struct worker *w = c->w;
	struct uplink *s = &w->uplink;
	if (s->link.fd < 0 || !s->connected) {
		respond_request_error(c, ERR_BUSY, "server busy: storage unavailable, retry");
		return;
	}
	struct ipc_sync msg = { .uid = c->bin->uid };
	memcpy(msg.md5, c->req.u.bopen.open.md5, sizeof(msg.md5));
	if (ipc_encode_sync(&s->link.out, conn_next_reqid(c), &msg) < 0) {
		respond_request_error(c, ERR_BUSY, "server busy: out of memory");
		return;
	}
	conn_drove(c, msg.uid, msg.md5);
	c->busy = 1;
	c->req.stage = STAGE_STORAGE;
	c->req.since = ev_now(w->loop);
	uplink_flush(w);
}

/* Storage's answer to the open's sync: resume where it stands, or start at 0. */
static void bin_on_open_result(struct conn *c, const struct ipc_result *r)
{
	struct bin_conn *b = c->bin;
	const struct bin_open *o = &c->req.u.bopen.open;
	int fresh;
	if (r->error == ERR_FILE_NOT_EXISTS || (r->error == ERR_OK && (o->flags & BIN_OPEN_RESTART))) {
		fresh = 1;
	} else if (r->error == ERR_OK) {
		/* The kind too: chunks of the other kind would all be refused 1026 (storage's step 19)
		 * after an open that said resume, and opening again would say the same. */
		if (r->total_size != o->total_size || r->name_len != o->name_len ||
		    memcmp(r->name, o->name, o->name_len) != 0 ||
		    r->kind != (o->flags & BIN_OPEN_AVATAR ? UPLOAD_AVATAR : UPLOAD_FILE)) {
			bin_send_open_answer(c, ERR_UPLOAD_MISMATCH, r->trans_size, r->total_size,
			    "an upload of this md5 is in progress with another name, total_size or kind: open it "
			    "with those, or with the restart flag to start over");
			return;
		}
		fresh = 0;
	} else {
		char msg[256];
		snprintf(msg, sizeof(msg), "%.*s", (int)r->message_len, r->message ? r->message : "");
		bin_send_open_answer(c, (int)r->error, 0, o->total_size, msg);
		return;
	}
	b->up_open = 1;
	b->up_broken = 0;
	b->trusted_until = c->auth_until;   /* the 1043's own check */
	b->auth_error = 0;   /* a check's refusal that came after the upload broke is not this one's */
	b->kind = o->flags & BIN_OPEN_AVATAR ? UPLOAD_AVATAR : UPLOAD_FILE;
	memcpy(b->md5, o->md5, sizeof(b->md5));
	memcpy(b->name, o->name, o->name_len);
	b->name[o->name_len] = '\0';
	b->name_len = o->name_len;
	b->total = o->total_size;
	/* Chunks go in order, each right after the one before, numbered on from storage's seq: each
	 * starts at the committed size with the committed seq + 1 when storage runs it, which is
	 * what a JSON client resuming does, so the upload can change paths at any chunk. */
	b->cursor = fresh ? 0 : r->trans_size;
	b->next_seq = fresh ? 1 : r->seq + 1;
	b->committed = b->cursor;
	b->instant = b->cursor == 0 && (o->flags & BIN_OPEN_INSTANT);
	memcpy(c->xfer_md5, b->md5, sizeof(c->xfer_md5));
	c->xfer_start = ev_now(c->w->loop);
	bin_send_open_answer(c, ERR_OK, b->cursor, b->total, NULL);
}

/* 1045: checks the chunk against the open upload and queues its bytes for storage (one copy). */
/* Handles a 1045 whose data is at ch.data, or already in ring slot *in_ring (received there
 * straight from the socket). Returns 0 when the chunk went to storage, -1 when it was answered
 * (the slot, if any, was not sent: the caller gives it back). */
static int bin_handle_chunk_data(struct conn *c, const uint8_t *body, uint32_t len, const uint8_t *data,
    const uint32_t *in_ring, uint64_t ring_at)
{
	struct worker *w = c->w;
	struct bin_conn *b = c->bin;
	struct bin_chunk ch;
	char msg[160];
	b->auth_checked = 0;   /* the next chunk after trusted_until is checked again */
	int rc = bin_parse_chunk(body, len, &ch, msg, sizeof(msg));
	if (rc != ERR_OK) {
		bin_send_ack(c, rc, ch.offset, ch.length, b->committed, b->total, msg);
		return -1;
	}
	if (data != NULL)
		ch.data = data;
	uint64_t end = ch.offset + ch.length;
	if (!b->up_open) {
		bin_send_ack(c, ERR_FILE_NOT_EXISTS, ch.offset, ch.length, 0, 0,
		    "no upload open on this connection: send 1043 first");
		return -1;
	}
	if (b->auth_error != 0 && !b->up_broken) {
		/* The credentials' new check failed: this chunk says why, the ones behind it get 1018, and
		 * a 1043 (checked on its own) or another 1041 is needed to go on. */
		int e = b->auth_error;
		b->auth_error = 0;
		b->up_broken = 1;
		bin_send_ack(c, e, ch.offset, ch.length, b->committed, b->total, auth_refusal(e));
		return -1;
	}
	if (b->up_broken) {
		bin_send_ack(c, ERR_OFFSET_INVALID, ch.offset, ch.length, b->committed, b->total,
		    "an earlier chunk of this upload failed: open it again (1043) to learn where it stands");
		return -1;
	}
	if (ch.offset != b->cursor) {
		snprintf(msg, sizeof(msg), "offset: expected %" PRIu64 " (right after the previous chunk)", b->cursor);
		bin_send_ack(c, ERR_OFFSET_INVALID, ch.offset, ch.length, b->committed, b->total, msg);
		return -1;
	}
	if (end > b->total) {
		bin_send_ack(c, ERR_JSON, ch.offset, ch.length, b->committed, b->total, "length: past total_size");
		return -1;
	}
	if (!!(ch.flags & BIN_CHUNK_LAST) != (end == b->total)) {
		bin_send_ack(c, ERR_JSON, ch.offset, ch.length, b->committed, b->total,
		    "flags: the last flag must be set exactly on the chunk that ends the file");
		return -1;
	}
	if (ch.length == 0 && end != b->total) {
		bin_send_ack(c, ERR_JSON, ch.offset, ch.length, b->committed, b->total,
		    "length: an empty chunk may only end the file");
		return -1;
	}
	struct uplink *s = &w->uplink;
	if (s->link.fd < 0 || !s->connected) {
		bin_send_ack(c, ERR_BUSY, ch.offset, ch.length, b->committed, b->total,
		    "server busy: storage unavailable, retry");
		return -1;
	}
	struct ipc_chunk msgc = {
		.uid = b->uid, .seq = b->next_seq, .trans_size = end, .total_size = b->total,
		.kind = b->kind, .last = end == b->total, .name = b->name, .name_len = (uint16_t)b->name_len,
		.data_len = ch.length,
	};
	memcpy(msgc.md5, b->md5, sizeof(msgc.md5));
	uint64_t reqid = (uint64_t)++w->op_seq << 32 | BIN_REQID_TAG | c->slot;
	uint32_t slot;
	uint64_t at;
	uint8_t *to;
	if (in_ring != NULL) {
		/* Already in the shared ring: the link carries only where the bytes are. */
		to = ipc_encode_chunk_ref(&s->link.out, reqid, &msgc, *in_ring, ring_at) == 0 ? (uint8_t *)"" : NULL;
		if (to != NULL)
			STAT_ADD(chunks_by_ring, 1);
	} else if (s->ring_ready && (to = shmring_reserve(&s->ring, ch.length, &slot, &at)) != NULL) {
		memcpy(to, ch.data, ch.length);
		if (ipc_encode_chunk_ref(&s->link.out, reqid, &msgc, slot, at) < 0) {
			shmring_cancel(&s->ring, slot);
			to = NULL;
		} else {
			STAT_ADD(chunks_by_ring, 1);
		}
	} else if ((to = ipc_reserve_chunk(&s->link.out, &msgc, ch.length)) != NULL) {
		memcpy(to, ch.data, ch.length);
		ipc_commit_chunk(&s->link.out, reqid, &msgc);
		STAT_ADD(chunks_copied, 1);
	}
	if (to == NULL) {
		bin_send_ack(c, ERR_BUSY, ch.offset, ch.length, b->committed, b->total, "server busy: out of memory");
		return -1;
	}
	struct bin_inflight *f = &b->ring[(b->head + b->count++) % BIN_MAX_INFLIGHT];
	f->reqid = reqid;
	f->offset = ch.offset;
	f->length = ch.length;
	b->inflight_bytes += ch.length;
	w->bin_unanswered += ch.length;
	b->cursor = end;
	b->next_seq++;
	b->held_since = ev_now(w->loop);
	uplink_flush(w);
	return 0;
}

static void bin_handle_chunk(struct conn *c, const uint8_t *body, uint32_t len)
{
	bin_handle_chunk_data(c, body, len, NULL, NULL, 0);
}

static int bin_receiving(const struct conn *c)
{
	return c->bin != NULL && c->bin->direct;
}

/* At the start of an incomplete 1045 in c->in: when its data is large, fits the window and the
 * ring has room, the data goes on straight into a ring slot (what is buffered already moves there,
 * the rest is read into it by bin_direct_read). Returns 1 when it started. */
static int bin_direct_start(struct conn *c)
{
	struct bin_conn *b = c->bin;
	struct uplink *s = &c->w->uplink;
	size_t have = buf_len(&c->in);
	if (b != NULL)
		b->direct_held = 0;
	if (b == NULL || b->direct || c->busy || !s->ring_ready || !b->up_open || b->up_broken ||
	    have < FRAME_HEADER_LEN + BIN_CHUNK_LEN)
		return 0;
	const uint8_t *h = buf_head(&c->in);
	uint16_t id = bin_get_u16(h);
	uint32_t body_len = bin_get_u32(h + 2);
	uint32_t length = bin_get_u32(h + FRAME_HEADER_LEN + 8);
	/* Anything unusual is left to the ordinary path, which answers it. */
	if (id != MSG_BIN_CHUNK || length < BIN_DIRECT_MIN || length > BIN_MAX_CHUNK ||
	    body_len != BIN_CHUNK_LEN + length || have >= FRAME_HEADER_LEN + (size_t)body_len)
		return 0;
	if (!bin_ready_for(c, id, body_len)) {
		/* Read on only once it can go straight into the ring: the window's acknowledgements, the
		 * cap's or the link's wake-up bring the connection back here (conn_process). */
		b->direct_held = 1;
		return 0;
	}
	uint8_t *slot_data = shmring_reserve(&s->ring, length, &b->direct_slot, &b->direct_at);
	if (slot_data == NULL) {
		/* The ring is full: the data waits in the socket until the storage process has freed
		 * room (bin_cap_wake looks), rather than crossing the buffer, the link and a heap copy.
		 * (A chunk larger than the ring, or the slots all taken, cannot wait for that.) */
		if (length > s->ring.size || ev_now(c->w->loop) < c->w->ring_wait_off_until)
			return 0;
		b->direct_held = 1;
		if (!b->ring_want) {
			bin_cap_wait(c, length);
			b->ring_want = 1;
			b->ring_since = ev_now(c->w->loop);
			STAT_ADD(chunks_ring_waits, 1);
		}
		if (!ev_is_active(&c->w->ring_retry))
			ev_timer_start(c->w->loop, &c->w->ring_retry);
		return 0;
	}
	shmring_receiving(&s->ring, b->direct_slot, 1);
	bin_cap_unlink(c);   /* its own answer may have brought it here while it waited for room */
	size_t got = have - (FRAME_HEADER_LEN + BIN_CHUNK_LEN);
	memcpy(b->direct_hdr, h, sizeof(b->direct_hdr));
	memcpy(slot_data, h + sizeof(b->direct_hdr), got);   /* at most one read's worth */
	buf_consume_keep(&c->in, have);
	input_frame_done(c, 0);
	b->direct = 1;
	b->direct_data = slot_data;
	b->direct_len = length;
	b->direct_got = (uint32_t)got;
	return 1;
}

/* Reads more of a direct chunk; when it is complete, hands it to storage. Returns 0 when the chunk
 * is complete (and answered or sent), 1 when more is to come, -1 when the connection was closed. */
static int bin_direct_read(struct conn *c)
{
	struct bin_conn *b = c->bin;
	ssize_t n = recv(c->fd, b->direct_data + b->direct_got, b->direct_len - b->direct_got, 0);
	if (n == 0) {
		conn_close(c, "closed in the middle of a chunk");
		return -1;
	}
	if (n < 0) {
		if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
			return 1;
		conn_close(c, "read failed");
		return -1;
	}
	STAT_ADD(bytes_in, n);
	b->direct_got += (uint32_t)n;
	if (b->direct_got < b->direct_len)
		return 1;
	b->direct = 0;
	shmring_receiving(&c->w->uplink.ring, b->direct_slot, 0);
	c->frame_start = 0;
	c->last_frame = ev_now(c->w->loop);
	c->fresh = 0;
	STAT_INC(frames_in);
	uint32_t slot = b->direct_slot;
	if (bin_handle_chunk_data(c, b->direct_hdr + FRAME_HEADER_LEN, BIN_CHUNK_LEN + b->direct_len,
	    b->direct_data, &slot, b->direct_at) < 0)
		shmring_abandon(&c->w->uplink.ring, slot);
	return 0;
}

/* The ring is going (the link was lost): what each direct chunk received so far goes back to the
 * front of its connection's buffer, headers first, and is handled from there as an ordinary frame. */
static void bin_direct_undo_all(struct worker *w)
{
	for (uint32_t i = 0; i < w->conns_cap; i++) {
		struct conn *c = w->conns[i];
		if (c != NULL && c->bin != NULL && c->bin->direct_held) {
			c->bin->direct_held = 0;   /* no ring to wait for: its data is read as an ordinary frame */
			conn_update_io(c);
		}
		if (c == NULL || !bin_receiving(c))
			continue;
		struct bin_conn *b = c->bin;
		b->direct = 0;
		/* c->in is empty while a chunk is received directly (only its rest was being read). */
		if (buf_append(&c->in, b->direct_hdr, sizeof(b->direct_hdr)) < 0 ||
		    buf_append(&c->in, b->direct_data, b->direct_got) < 0) {
			conn_close(c, "out of memory");
			continue;
		}
		input_recount(c);
	}
}

/* Answers every chunk in flight with 1027 (the storage link broke); the client opens again. */
static void bin_fail_inflight(struct conn *c)
{
	struct bin_conn *b = c->bin;
	if (b->count == 0)
		return;
	while (b->count) {
		struct bin_inflight *f = &b->ring[b->head];
		bin_send_ack(c, ERR_BUSY, f->offset, f->length, b->committed, b->total,
		    "server busy: storage unavailable; open the upload again (1043) and go on from its answer");
		b->head = (b->head + 1) % BIN_MAX_INFLIGHT;
		b->count--;
	}
	c->w->bin_unanswered -= b->inflight_bytes;
	b->inflight_bytes = 0;
	b->up_broken = 1;
	conn_process(c);
}

/* Storage's answer to a binary chunk; 0 when reqid is not one (the JSON path's). */
static int bin_on_result(struct worker *w, const struct ipc_header *h, const uint8_t *payload)
{
	if (!((uint32_t)h->reqid & BIN_REQID_TAG))
		return 0;
	struct conn *c = conn_in_slot(w, (uint32_t)h->reqid & ~BIN_REQID_TAG);
	struct bin_conn *b = c ? c->bin : NULL;
	if (b == NULL || b->count == 0 || b->ring[b->head].reqid != h->reqid)
		return 1;   /* the connection went away (or was failed when the link broke) */
	struct bin_inflight f = b->ring[b->head];
	b->head = (b->head + 1) % BIN_MAX_INFLIGHT;
	b->count--;
	b->inflight_bytes -= f.length;
	w->bin_unanswered -= f.length;
	b->held_since = ev_now(w->loop);
	if (c->frame_start > 0)
		c->frame_start = ev_now(w->loop);   /* a frame held behind the window: its time starts now */
	struct ipc_result r;
	if (ipc_decode_result(payload, h->len, &r) < 0) {
		log_warnx("storage: malformed result for request %" PRIu64, h->reqid);
		memset(&r, 0, sizeof(r));
		r.error = ERR_BUSY;
		r.trans_size = b->committed;
		r.total_size = b->total;
	}
	char msg[256] = "";
	if (r.message_len)
		snprintf(msg, sizeof(msg), "%.*s", (int)r.message_len, r.message);
	int challenge = r.error == ERR_OK && r.message_len >= sizeof(IPC_CHALLENGE_PREFIX) - 1 &&
	    memcmp(r.message, IPC_CHALLENGE_PREFIX, sizeof(IPC_CHALLENGE_PREFIX) - 1) == 0;
	if (challenge && b->instant && b->count == 0) {
		/* Instant upload: storage asks for chunk seq + 1 at trans_size; the client sends it alone
		 * (protocol.md §13, 1049). Nothing new is committed. */
		b->cursor = r.trans_size;
		b->next_seq = r.seq + 1;
		bin_send_ack(c, ERR_CHALLENGE, f.offset, f.length, r.trans_size, r.total_size, msg);
		conn_process(c);
		return 1;
	}
	if (challenge) {
		/* Not in a proof (chunks in flight, or no INSTANT flag): an acknowledgement of what is
		 * stored, which is chunk 1 only (a chunk taken as an answer is compared, not stored). */
		r.trans_size = f.offset == 0 ? f.length : b->committed;
		r.message_len = 0;
	} else if (r.error == ERR_OK && b->instant && b->count == 0) {
		/* The proof is over (or never began): go on from what is stored, wherever that is. */
		b->cursor = r.trans_size;
		b->next_seq = r.seq + 1;
	}
	b->instant = 0;
	if (r.error == ERR_OK) {
		b->committed = r.trans_size;
	} else {
		b->up_broken = 1;   /* the chunks behind it fail too; the client opens again */
	}
	bin_send_ack(c, (int)r.error, f.offset, f.length, r.trans_size, r.total_size, r.message_len ? msg : NULL);
	if ((r.error == ERR_OK && r.trans_size == r.total_size) || r.error == ERR_CHECKSUM) {
		if (b->up_open && b->count == 0) {
			char name[ESCAPE_SIZE(PROTO_NAME_MAX)];
			escape_quoted(name, sizeof(name), b->name, b->name_len);
			int instant = r.error == ERR_OK && r.message_len >= sizeof(IPC_INSTANT_PREFIX) - 1 &&
			    memcmp(r.message, IPC_INSTANT_PREFIX, sizeof(IPC_INSTANT_PREFIX) - 1) == 0;
			access_log("%s uid=%" PRIu64 " %s name=\"%s\" bytes=%" PRIu64 " duration=%.3f result=%u binary=1%s",
			    c->peer, b->uid, b->kind == UPLOAD_AVATAR ? "avatar" : "upload", name, b->total,
			    ev_now(w->loop) - c->xfer_start, r.error, instant ? " instant=1" : "");
		}
		if (b->count == 0)
			b->up_open = 0;   /* published (or refused): a new upload needs a new 1043 */
	}
	conn_process(c);
	return 1;
}

/* ---- downloads */

static void bin_open_work(struct pool_job *job)
{
	struct bin_open_job *j = (struct bin_open_job *)job;
	const struct backend *be = &j->w->backend;
	j->saved_errno = be->ops->file_open(be, j->uid, j->name, j->name_len, &j->file, &j->size, j->version);
	if (j->saved_errno)
		j->file = NULL;
}

/* Without a descriptor to sendfile from (RADOS): the range read through the backend in pieces and
 * sent; a piece the socket takes only in part is read again from where it stopped. */
#define BIN_READ_PIECE (256u << 10)
static void bin_send_read(struct bin_send_job *j)
{
	uint8_t *buf = malloc(BIN_READ_PIECE);
	if (buf == NULL) {
		j->saved_errno = ENOMEM;
		return;
	}
	uint64_t burst = 0;
	while (j->left > 0 && burst < BIN_SEND_BURST) {
		size_t want = j->left < BIN_READ_PIECE ? (size_t)j->left : BIN_READ_PIECE, got = 0;
		int err = j->w->backend.ops->file_read(j->source, buf, want, j->offset, &got);
		if (err || got == 0) {
			j->saved_errno = err ? err : EIO;   /* 0 bytes: shorter than it was when opened */
			break;
		}
		ssize_t n = send(j->sock, buf, got, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			j->saved_errno = errno == EWOULDBLOCK ? EAGAIN : errno;
			break;
		}
		j->offset += (uint64_t)n;
		j->left -= (uint64_t)n;
		burst += (uint64_t)n;
	}
	free(buf);
}

static void bin_send_work(struct pool_job *job)
{
	struct bin_send_job *j = (struct bin_send_job *)job;
	uint64_t burst = 0;
	j->saved_errno = 0;
	if (j->fd < 0) {
		bin_send_read(j);
		return;
	}
	while (j->left > 0 && burst < BIN_SEND_BURST) {
		off_t off = (off_t)j->offset;
		size_t want = j->left < (4u << 20) ? (size_t)j->left : (4u << 20);
		ssize_t n = sendfile(j->sock, j->fd, &off, want);
		if (n > 0) {
			j->offset += (uint64_t)n;
			j->left -= (uint64_t)n;
			burst += (uint64_t)n;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		j->saved_errno = n == 0 ? EIO : errno;   /* 0: the file is shorter than it was when opened */
		break;
	}
	if (j->saved_errno == EWOULDBLOCK)
		j->saved_errno = EAGAIN;
}

static void bin_send_done(struct pool_job *job)
{
	struct bin_send_job *j = (struct bin_send_job *)job;
	struct worker *w = j->w;
	if (j->orphaned) {
		close(j->sock);
		w->backend.ops->file_close(j->file);
		free(j);
		return;
	}
	struct conn *c = w->conns[j->slot];
	struct bin_conn *b = c->bin;
	uint64_t sent = b->sf_left - j->left;
	b->sf_offset = j->offset;
	b->sf_left = j->left;
	b->sf_job = NULL;
	STAT_ADD(download_bytes, sent);
	STAT_ADD(bytes_out, sent);
	int err = j->saved_errno;
	free(j);
	if (err && err != EAGAIN) {
		/* The frame is cut: the stream cannot go on. */
		log_info("%s: sending a file range failed: %s", c->peer, strerror(err));
		conn_close(c, NULL);
		return;
	}
	if (b->sf_left == 0) {
		b->sf_pending = 0;
		conn_process(c);
		return;
	}
	conn_update_io(c);   /* EAGAIN, or a full burst: the socket's writability resumes it */
}

/* The socket is writable and everything before the range has gone: a disk thread sends the next part. */
static int bin_send_file(struct conn *c)
{
	struct bin_conn *b = c->bin;
	if (!b->sf_pending || b->sf_job || b->sf_before > 0)
		return 0;
	struct bin_send_job *j = calloc(1, sizeof(*j));
	if (j == NULL) {
		conn_close(c, "out of memory");
		return -1;
	}
	j->job.work = bin_send_work;
	j->job.done = bin_send_done;
	j->w = c->w;
	j->slot = c->slot;
	j->sock = c->fd;
	j->fd = c->w->backend.ops->file_fd ? c->w->backend.ops->file_fd(b->file) : -1;
	j->source = b->file;
	j->offset = b->sf_offset;
	j->left = b->sf_left;
	b->sf_job = j;
	pool_submit(c->w->pool, &j->job);
	conn_update_io(c);
	return 0;
}

/* Queues the 1048 header of the range asked and lets the file's bytes follow it. */
static void bin_range_start(struct conn *c)
{
	struct bin_conn *b = c->bin;
	const struct bin_download *d = &c->req.u.bdl.dl;
	if (d->offset > b->file_size) {
		respond_request_error(c, ERR_OFFSET_INVALID, "offset: past the end of the file");
		return;
	}
	uint64_t length = b->file_size - d->offset;
	if (d->length && d->length < length)
		length = d->length;
	if (length > BIN_MAX_RANGE)
		length = BIN_MAX_RANGE;
	uint8_t body[BIN_RANGE_LEN + BIN_VERSION_MAX + 2];
	size_t n = bin_put_range(body, 0, b->file_size, d->offset, length, b->file_version, NULL);
	uint8_t header[FRAME_HEADER_LEN];
	frame_put_header(header, MSG_BIN_DOWNLOAD + 1, (uint32_t)(n + length));
	if (buf_append(&c->out, header, sizeof(header)) < 0 || buf_append(&c->out, body, n) < 0) {
		conn_close(c, "out of memory");   /* a header may be half queued */
		return;
	}
	STAT_INC(frames_out);
	STAT_ADD(bytes_out, FRAME_HEADER_LEN + n);
	if (d->offset == 0)
		STAT_INC(downloads_started);
	if (d->offset + length == b->file_size) {
		STAT_INC(downloads_completed);
		char name[ESCAPE_SIZE(PROTO_NAME_MAX)];
		escape_quoted(name, sizeof(name), b->file_name, b->file_name_len);
		access_log("%s uid=%" PRIu64 " download name=\"%s\" bytes=%" PRIu64 " offset=%" PRIu64
		    " result=0 binary=1", c->peer, b->uid, name, length, d->offset);
	}
	if (length > 0) {
		b->sf_pending = 1;
		b->sf_before = buf_len(&c->out);
		b->sf_offset = d->offset;
		b->sf_left = length;
	}
	request_finish(c);   /* the caller runs conn_process, which sends the header and then the file */
}

static void bin_open_done(struct pool_job *job)
{
	struct bin_open_job *j = (struct bin_open_job *)job;
	struct worker *w = j->w;
	struct conn *c = conn_by_reqid(w, j->reqid);
	if (c == NULL || c->req.stage != STAGE_BINOPEN) {
		w->backend.ops->file_close(j->file);   /* closed or timed out meanwhile */
		free(j);
		return;
	}
	struct bin_conn *b = c->bin;
	const struct bin_download *d = &c->req.u.bdl.dl;
	c->busy = 0;
	c->req.stage = STAGE_NONE;
	int err = j->saved_errno;
	if (err) {
		int code = err == ENOENT || err == ENOTDIR || err == ELOOP ? ERR_FILE_NOT_EXISTS
		    : err == EACCES || err == EPERM ? ERR_READ_PERMISSION : ERR_READ_FAILED;
		if (code != ERR_FILE_NOT_EXISTS)
			log_warnx("download of a file of uid %" PRIu64 ": %s", b->uid, strerror(err));
		free(j);
		respond_request_error(c, code, code == ERR_FILE_NOT_EXISTS ? "name: no such file" : "cannot read the file");
		conn_process(c);
		return;
	}
	if (d->version_len && (strlen(j->version) != d->version_len || memcmp(j->version, d->version, d->version_len))) {
		w->backend.ops->file_close(j->file);
		free(j);
		respond_request_error(c, ERR_FILE_CHANGED,
		    "version: the file was replaced since this download started; download it again from offset 0");
		conn_process(c);
		return;
	}
	w->backend.ops->file_close(b->file);   /* never in use here: ranges go one at a time */
	b->file = j->file;
	b->file_size = j->size;
	memcpy(b->file_name, j->name, j->name_len + 1);
	b->file_name_len = j->name_len;
	memcpy(b->file_version, j->version, sizeof(b->file_version));
	free(j);
	bin_range_start(c);
	conn_process(c);
}

/* 1047 once its credentials are good: the kept file when the client names its version, else a fresh open. */
static void bin_download_start(struct conn *c)
{
	struct worker *w = c->w;
	struct bin_conn *b = c->bin;
	const struct bin_download *d = &c->req.u.bdl.dl;
	if (b->file && d->version_len && b->file_name_len == d->name_len &&
	    memcmp(b->file_name, d->name, d->name_len) == 0 && strlen(b->file_version) == d->version_len &&
	    memcmp(b->file_version, d->version, d->version_len) == 0) {
		bin_range_start(c);
		return;
	}
	struct bin_open_job *j = calloc(1, sizeof(*j));
	if (j == NULL) {
		respond_request_error(c, ERR_BUSY, "server busy: out of memory");
		return;
	}
	j->job.work = bin_open_work;
	j->job.done = bin_open_done;
	j->w = w;
	j->uid = b->uid;
	memcpy(j->name, d->name, d->name_len);
	j->name_len = d->name_len;
	j->reqid = conn_next_reqid(c);
	c->busy = 1;
	c->req.stage = STAGE_BINOPEN;
	c->req.since = ev_now(w->loop);
	pool_submit(w->pool, &j->job);
}

static void bin_request_continue(struct conn *c)
{
	switch (c->req.id) {
	case MSG_BIN_HELLO:
		bin_hello_finish(c);
		break;
	case MSG_BIN_UPLOAD_OPEN:
		bin_open_start(c);
		break;
	case MSG_BIN_DOWNLOAD:
		bin_download_start(c);
		break;
	default:
		break;
	}
}

/* Every frame with an id of the fast path's range. */
static void bin_handle_frame(struct conn *c, uint16_t id, uint8_t *body, uint32_t len)
{
	struct worker *w = c->w;
	char msg[256];
	if (id == MSG_BIN_HELLO) {
		struct proto_fields f;
		if (proto_read_request(body, len, &f, msg, sizeof(msg)) != ERR_OK) {
			respond_error(c, id, ERR_JSON, msg);
			return;
		}
		c->req.id = id;
		c->req.cred = &c->req.u.hello;
		int rc = proto_parse_hello(&f, &w->limits, &c->req.u.hello, msg, sizeof(msg));
		if (rc != ERR_OK) {
			respond_request_error(c, rc, msg);
			return;
		}
		if (auth_check(c))
			bin_hello_finish(c);
		return;
	}
	if (c->bin == NULL || (id != MSG_BIN_UPLOAD_OPEN && id != MSG_BIN_CHUNK && id != MSG_BIN_DOWNLOAD)) {
		snprintf(msg, sizeof(msg), c->bin ? "unknown message id %u" :
		    "message id %u needs the binary fast path: send a 1041 hello first", id);
		respond_error(c, id, ERR_MSG_ID, msg);
		return;
	}
	if (id == MSG_BIN_CHUNK) {
		bin_handle_chunk(c, body, len);
		return;
	}
	c->req.id = id;
	struct proto_credentials *cred = id == MSG_BIN_UPLOAD_OPEN ? &c->req.u.bopen.cred : &c->req.u.bdl.cred;
	int rc = id == MSG_BIN_UPLOAD_OPEN
	    ? bin_parse_open(body, len, (uint64_t)w->conf->max_file_size, &c->req.u.bopen.open, msg, sizeof(msg))
	    : bin_parse_download(body, len, &c->req.u.bdl.dl, msg, sizeof(msg));
	if (rc != ERR_OK) {
		respond_request_error(c, rc, msg);
		return;
	}
	/* The hello's credentials, checked again once auth_cache_ttl has passed, as the JSON path does. */
	cred->uid = c->bin->uid;
	cred->token = c->bin->token;
	cred->token_len = c->bin->token_len;
	c->req.cred = cred;
	if (auth_check(c))
		bin_request_continue(c);
}

/* The storage link has room again: the connections whose chunks waited for it go on. */
static void bin_link_drained(struct worker *w)
{
	if (w->bin_link_waiters == 0 || buf_len(&w->uplink.link.out) >= BIN_LINK_BACKLOG / 2)
		return;
	for (uint32_t i = 0; i < w->conns_cap && w->bin_link_waiters > 0; i++) {
		struct conn *c = w->conns[i];
		if (c == NULL || c->bin == NULL || !c->bin->link_waiting)
			continue;
		c->bin->link_waiting = 0;
		w->bin_link_waiters--;
		conn_process(c);   /* may close c; the table slot is simply empty then */
		if (buf_len(&w->uplink.link.out) >= BIN_LINK_BACKLOG)
			break;   /* full again: the rest wait on */
	}
	uplink_update_io(w);
}

/* Frees the connection's fast-path state; 1 when a disk thread still sends on its socket (it closes it). */
static int bin_conn_free(struct conn *c)
{
	struct bin_conn *b = c->bin;
	if (b == NULL)
		return 0;
	if (b->link_waiting)
		c->w->bin_link_waiters--;
	if (b->direct) {
		shmring_abandon(&c->w->uplink.ring, b->direct_slot);   /* never sent: storage will not free it */
		shmring_receiving(&c->w->uplink.ring, b->direct_slot, 0);
	}
	bin_cap_unlink(c);
	c->w->bin_unanswered -= b->inflight_bytes;   /* their answers will find no connection */
	int handed = 0;
	if (b->sf_job) {
		b->sf_job->orphaned = 1;
		b->sf_job->file = b->file;
		b->file = NULL;
		handed = 1;
	}
	c->w->backend.ops->file_close(b->file);
	free(b);
	c->bin = NULL;
	return handed;
}

/* ---------------------------------------------------------------- requests */

/* After the credentials are known good: hand the request to whoever does the work. */
static void request_continue(struct conn *c)
{
	if (c->req.id == MSG_UPLOAD || c->req.id == MSG_AVATAR || c->req.id == MSG_SYNC)
		uplink_forward(c);   /* decodes a chunk's data on the way */
	else if (c->req.id == MSG_DOWNLOAD)
		download_start(c);
	else
		bin_request_continue(c);
}

static void handle_test(struct conn *c, const struct proto_fields *f)
{
	struct json_writer *jw = &c->w->jw;
	const struct json_scalar *data = &f->v[PF_DATA];
	json_begin(jw);
	json_put_int(jw, "error", 0);
	if (data->kind == JSON_RAW) {
		/* An array or object goes back as the text it came as (checked by the reader). */
		const uint8_t *fields;
		size_t fields_len;
		json_open_fields(jw, &fields, &fields_len);
		static const char key[] = ",\"data\":";
		size_t body_len = fields_len + strlen(key) + data->len + 1;
		uint8_t *p = buf_reserve(&c->out, FRAME_HEADER_LEN + body_len);
		if (p == NULL) {
			log_warnx("%s: out of memory queueing a response: closing", c->peer);
			c->closing = 1;
			return;
		}
		frame_put_header(p, MSG_TEST + 1, (uint32_t)body_len);
		p += FRAME_HEADER_LEN;
		memcpy(p, fields, fields_len);
		memcpy(p + fields_len, key, strlen(key));
		memcpy(p + fields_len + strlen(key), data->s, data->len);
		p[body_len - 1] = '}';
		buf_commit(&c->out, FRAME_HEADER_LEN + body_len);
		STAT_INC(frames_out);
		STAT_ADD(bytes_out, FRAME_HEADER_LEN + body_len);
		return;
	}
	if (data->kind != JSON_NONE)
		json_put_scalar(jw, "data", data);
	else
		json_put_str(jw, "data", "", 0);
	conn_send_json(c, MSG_TEST + 1, 0);
}

/* Handles one complete frame. */
static void handle_frame(struct conn *c, uint16_t id, uint8_t *body, uint32_t len)
{
	struct worker *w = c->w;
	char msg[256];
	if (id >= MSG_BIN_HELLO && id <= 1059) {
		bin_handle_frame(c, id, body, len);
		return;
	}
	if (id != MSG_TEST && id != MSG_UPLOAD && id != MSG_SYNC && id != MSG_AVATAR && id != MSG_DOWNLOAD) {
		snprintf(msg, sizeof(msg), "unknown message id %u", id);
		respond_error(c, id, ERR_MSG_ID, msg);
		return;
	}
	/* Every request is a flat object of scalars, read without a tree (1001's data may
	 * also be a bounded array or object, echoed as its text): what a client can make
	 * the worker do before any token check is linear in the frame's length, with no
	 * allocation per value. The strings point into the frame, which the request holds. */
	struct proto_fields f;
	int read = id == MSG_TEST ? proto_read_test(body, len, &f, msg, sizeof(msg))
	    : proto_read_request(body, len, &f, msg, sizeof(msg));
	if (read != ERR_OK) {
		respond_error(c, id, ERR_JSON, msg);
		return;
	}
	if (id == MSG_TEST) {
		handle_test(c, &f);
		return;
	}
	c->req.id = id;
	int rc;
	switch (id) {
	case MSG_UPLOAD:
	case MSG_AVATAR:
		rc = proto_parse_chunk(&f, id == MSG_AVATAR ? UPLOAD_AVATAR : UPLOAD_FILE, &w->limits,
		    &c->req.u.chunk, msg, sizeof(msg));
		c->req.cred = &c->req.u.chunk.cred;
		break;
	case MSG_SYNC:
		rc = proto_parse_sync(&f, &w->limits, &c->req.u.sync, msg, sizeof(msg));
		c->req.cred = &c->req.u.sync.cred;
		break;
	default:
		rc = proto_parse_download(&f, &w->limits, &c->req.u.download, msg, sizeof(msg));
		c->req.cred = &c->req.u.download.cred;
		break;
	}
	if (rc != ERR_OK) {
		respond_request_error(c, rc, msg);
		return;
	}
	if (auth_check(c))
		request_continue(c);
}

/* Counts the connection under its client's address (sa, or the PROXY header's text form), or
 * closes it at once when the node has max_connections_per_address connections from there
 * already. Returns -1 when closed. Without a limit nothing is hashed. */
static int conn_count_address(struct conn *c, const struct sockaddr *sa, const char *text)
{
	struct worker *w = c->w;
	unsigned limit = (unsigned)w->conf->max_connections_per_address;
	if (limit == 0)
		return 0;
	int bucket = sa ? addrlimit_bucket(sa) : addrlimit_bucket_text(text);
	if (bucket < 0)
		return 0;
	if (addrlimit_take(bucket, limit) == 0) {
		c->addr_bucket = bucket;
		return 0;
	}
	STAT_INC(conn_rejected);
	if (ev_now(w->loop) - w->addr_refused_logged >= 1.0) {   /* one line a second, not one per attempt */
		w->addr_refused_logged = ev_now(w->loop);
		log_info("%s: closed at once: the node has %u connections from this address already "
		    "([server] max_connections_per_address)", c->peer, limit);
	}
	conn_close(c, NULL);
	return -1;
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
			if (pr.has_address) {
				snprintf(c->peer, sizeof(c->peer), "%s", pr.address);
				if (conn_count_address(c, NULL, pr.address) < 0)
					return;
			}
			buf_consume(&c->in, used);
		} else if (c->frame_start == 0) {
			c->frame_start = ev_now(w->loop);   /* the header must arrive within frame_timeout */
			conn_arm_timer(c);
		}
	}
	while (!c->busy && !c->awaiting_proxy && buf_len(&c->in) > 0 && !bin_holds_output(c) &&
	    buf_len(&c->out) < conn_output_cap(c)) {
		uint16_t id;
		const uint8_t *body;
		uint32_t len;
		size_t used;
		enum frame_status st = frame_decode(buf_head(&c->in), buf_len(&c->in),
		    conn_max_body(c), &id, &body, &len, &used);
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
			bin_direct_start(c);   /* a large chunk's data: straight into the shared ring */
			break;
		}
		if (!bin_ready_for(c, id, len))
			break;   /* its window is full: the acknowledgements bring it back here */
		c->frame_start = 0;
		c->last_frame = ev_now(w->loop);
		c->fresh = 0;
		STAT_INC(frames_in);
		c->req.frame_used = used;   /* request_finish drops it, or the lines below */
		handle_frame(c, id, (uint8_t *)body, len);
		if (!c->busy && c->req.frame_used) {
			int keep = bin_chunks_in_flight(c);   /* an upload streams on: the next chunk fits as it is */
			if (keep)
				buf_consume_keep(&c->in, c->req.frame_used);
			else
				buf_consume(&c->in, c->req.frame_used);
			c->req.frame_used = 0;
			input_frame_done(c, keep);
		}
	}
	if (buf_len(&c->in) == 0 && !bin_receiving(c))
		c->frame_start = 0;
	/* No chunk in flight any more: the buffer kept for an upload's next chunk goes back (an idle
	 * connection would keep it, counted against input_budget, until idle_timeout). */
	if (c->in.cap > INPUT_FREE && !c->req.frame_used && c->in_admitted == 0 && !bin_chunks_in_flight(c))
		input_frame_done(c, 0);
	if (w->draining == 2 && conn_done_for_stop(c))
		c->closing = 1;   /* a graceful stop: closed once its answers are sent */
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

/* A new worker takes connections once its Redis connection is made: until then the master's
 * socket keeps them in its backlog, where accepted at once their requests were answered 1027
 * (a worker restarted after a crash, or started by a reload, meets clients within milliseconds).
 * Not longer than [redis] timeout, nor once an attempt failed: with Redis away the worker
 * accepts, to answer what needs no Redis and to say 1027 to the rest. */
static void worker_accept_start(struct worker *w, const char *why)
{
	ev_timer_stop(w->loop, &w->accept_hold);
	if (w->accepting || w->draining)
		return;
	w->accepting = 1;
	ev_io_start(w->loop, &w->accept_io);
	log_info("accepting connections%s", why);
}

static void worker_on_redis_ready(struct rds *r)
{
	worker_accept_start(r->data, "");
}

static void worker_on_redis_away(struct rds *r)
{
	worker_accept_start(r->data, " (Redis is not reachable: requests that need it are answered 1027)");
}

static void worker_on_accept_hold(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)loop;
	(void)revents;
	worker_accept_start(t->data, " (Redis did not answer yet: requests that need it are answered 1027)");
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
	c->addr_bucket = -1;
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	c->w = w;
	c->fd = fd;
	c->xfer = -1;
	c->fresh = 1;
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
	/* Behind a load balancer the client's address comes with the PROXY header (conn_process). */
	if (!w->conf->proxy_protocol)
		conn_count_address(c, (const struct sockaddr *)ss, NULL);
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

/* Stops accepting; the loop ends once the last connection closes. Connections the kernel
 * has already completed are taken first and served: closing the socket would reset them. */
static void worker_stop_accepting(struct worker *w)
{
	w->draining = 1;
	ev_io_stop(w->loop, &w->accept_io);
	ev_timer_stop(w->loop, &w->accept_pause);
	ev_timer_stop(w->loop, &w->accept_hold);
	for (int i = 0; i < 4096; i++) {   /* the backlog's size */
		struct sockaddr_storage ss;
		socklen_t sslen = sizeof(ss);
		int fd = accept4(w->listen_fd, (struct sockaddr *)&ss, &sslen, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0)
			break;
		worker_accept_one(w, fd, &ss);
	}
	close(w->listen_fd);
}

/* Closes the connections with nothing in progress; returns how many carry on. */
static unsigned worker_close_done(struct worker *w)
{
	unsigned carry_on = 0;
	for (uint32_t i = 0; i < w->conns_cap; i++) {
		struct conn *c = w->conns[i];
		if (c == NULL)
			continue;
		if (!conn_done_for_stop(c)) {
			carry_on++;   /* a request or a transfer in progress: it goes on */
			continue;
		}
		c->closing = 1;
		if (buf_len(&c->out) == 0)
			conn_close(c, "graceful stop");
		else
			conn_update_io(c);
	}
	return carry_on;
}

/* New connections that have still sent nothing by now are idle ones. */
static void worker_on_fresh_timeout(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)loop;
	(void)revents;
	worker_close_done(t->data);
}

/* Closes the connections with nothing in progress now; the others once the transfer they are
 * in ends (conn_process), or at the latest after limit seconds. */
static void worker_close_connections(struct worker *w, double limit)
{
	ev_timer_stop(w->loop, &w->drain_timer);
	ev_timer_init(&w->drain_timer, worker_on_drain_timeout, limit, 0.);
	ev_timer_start(w->loop, &w->drain_timer);
	if (w->nconns == 0) {
		ev_break(w->loop, EVBREAK_ALL);
		return;
	}
	unsigned carry_on = worker_close_done(w);
	if (w->nconns > 0) {
		ev_timer_stop(w->loop, &w->fresh_timer);
		ev_timer_init(&w->fresh_timer, worker_on_fresh_timeout, STOP_FRESH_WAIT + 0.01, 0.);
		w->fresh_timer.data = w;
		ev_timer_start(w->loop, &w->fresh_timer);
	}
	log_info("graceful stop: %u connections with a request or transfer in progress carry on (at most %.1f s)",
	    carry_on, limit);
}

/* QUIT (sent by the master once the drain grace is over): stop accepting, close the connections
 * with nothing in progress, let every transfer in progress finish. The master's grace was part
 * of shutdown_timeout; the rest of it bounds the transfers. */
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
	worker_close_connections(w, w->conf->shutdown_timeout - conf_drain_grace(w->conf));
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

/* ---------------------------------------------------------------- the backend probe (agent-check) */

/*
 * Downloads read published files through this worker's own backend client (a librados connection
 * of its own with RADOS), which the storage process's ping does not cover. So the worker pings
 * its backend too (backend_probe.c), on its pool behind the downloads, and says in its stats slot
 * whether it answers; the agent-check answers down while any worker's does not (control.c).
 */
#define PROBE_TICK 1.0            /* seconds between looks at the probe */

static void worker_on_probe_timer(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)loop;
	(void)revents;
	struct worker *w = t->data;
	backend_probe_tick(&w->probe);
}

static void probe_start(struct worker *w)
{
	backend_probe_init(&w->probe, w->loop, w->pool, &w->backend, w->conf->storage_timeout, "this worker");
	if (w->backend.ops->ping == NULL)
		return;   /* reachable whenever the process runs */
	ev_timer_init(&w->probe_timer, worker_on_probe_timer, PROBE_TICK, PROBE_TICK);
	w->probe_timer.data = w;
	ev_timer_start(w->loop, &w->probe_timer);
	ev_unref(w->loop);   /* it never keeps a stopping worker's loop running */
}

static void worker_shutdown(struct worker *w)
{
	for (uint32_t i = 0; i < w->conns_cap; i++)
		if (w->conns[i])
			conn_close(w->conns[i], NULL);
	rds_close(&w->redis);
	pool_destroy(w->pool);
	backend_close(&w->backend);
	/* A goodbye, so the storage process takes the close as this worker stopping, not a loss; it
	 * goes after what is queued (as much as the socket takes now: a stopping worker waits for none). */
	if (w->uplink.link.fd >= 0 && ipc_encode_bye(&w->uplink.link.out, 0) == 0)
		link_flush(&w->uplink.link);
	link_close(&w->uplink.link);
	shmring_destroy(&w->uplink.ring);
	json_writer_free(&w->jw);
	free(w->conns);
	free(w->free_slots);
}

/* What a worker does with each signal (the master sends them; resourced(8), SIGNALS). */
static const struct signal_action worker_signals[] = {
	{ SIGTERM, worker_on_stop },
	{ SIGINT, worker_on_stop },
	{ SIGQUIT, worker_on_quit },      /* graceful stop */
	{ SIGUSR2, worker_on_retire },    /* a reload replaced this worker */
	{ SIGUSR1, signals_reopen_logs },      /* reopen the logs */
	{ SIGPIPE, NULL },
	{ SIGHUP, NULL },                 /* reloads are the master's business */
};
_Static_assert(SIGNALS_COUNT(worker_signals) == SIGNALS_COUNT(((struct worker *)0)->sigs), "one watcher per signal");

int worker_main(const struct conf *conf, int slot, int listen_fd)
{
	struct worker wk, *w = &wk;
	memset(w, 0, sizeof(*w));
	/* If the master is killed, do not outlive it. */
	prctl(PR_SET_PDEATHSIG, SIGTERM);
	if (getppid() == 1)
		return 0;
	/* A busy connection allocates a READ_CHUNK buffer per frame and frees it once answered;
	 * with glibc's defaults the heap was given back and grown again between them, and every
	 * chunk's recv took page faults on about half of its pages (perf: a fifth of a worker's
	 * time). A fixed threshold also stops large output buffers from moving it. */
	mallopt(M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD);
	mallopt(M_TRIM_THRESHOLD, WORKER_HEAP_KEEP);
	w->loop = ev_loop_new(EVFLAG_AUTO);
	if (w->loop == NULL)
		fatalx("ev_loop_new() failed in worker %d", slot);
	w->conf = conf;
	w->slot = slot;
	w->listen_fd = listen_fd;
	w->limits.max_file_size = (uint64_t)conf->max_file_size;
	w->limits.download_chunk = (uint64_t)conf->download_chunk;
	w->limits.anonymous = conf->anonymous;
	if (json_writer_init(&w->jw) < 0)
		fatalx("out of memory starting worker %d", slot);
	w->pool = pool_create(w->loop, 2);
	if (w->pool == NULL)
		fatalx("cannot start disk threads in worker %d", slot);
	char err[512];
	if (backend_open(&w->backend, conf, BACKEND_READER, err, sizeof(err)) < 0)
		fatalx("worker %d: storage backend: %s", slot, err);
	w->uplink.link.fd = -1;
	w->uplink.ring.fd = -1;
	/* Half the ring for chunks not yet answered leaves the other half to those answered but not
	 * yet hashed; without a ring, what the link backlog and the windows allow, as before. */
	w->bin_cap = conf->link_ring > 0 ? (uint64_t)conf->link_ring / 2 : UINT64_MAX;
	if (w->bin_cap < BIN_MAX_CHUNK)
		w->bin_cap = BIN_MAX_CHUNK;
	w->uplink.retry_delay = STORAGE_RETRY_MIN;
	ev_timer_init(&w->ring_retry, bin_on_ring_retry, BIN_RING_RETRY, BIN_RING_RETRY);
	w->ring_retry.data = w;
	ev_timer_init(&w->uplink.retry, uplink_on_retry, 0., 0.);
	w->uplink.retry.data = w;

	signals_watch(w->loop, worker_signals, SIGNALS_COUNT(worker_signals), w->sigs, w);

	ev_io_init(&w->accept_io, worker_on_accept, listen_fd, EV_READ);
	w->accept_io.data = w;
	ev_timer_init(&w->accept_pause, worker_on_accept_pause, 1., 0.);
	w->accept_pause.data = w;
	ev_timer_init(&w->accept_hold, worker_on_accept_hold, conf->redis_timeout, 0.);
	w->accept_hold.data = w;
	ev_timer_start(w->loop, &w->accept_hold);
	rds_init(&w->redis, w->loop, conf, worker_on_redis_ready, w);
	w->redis.on_away = worker_on_redis_away;
	if (rds_away(&w->redis))
		worker_on_redis_away(&w->redis);   /* refused at once: nothing to wait for */
	uplink_connect(w);
	probe_start(w);

	ev_run(w->loop, 0);
	log_info("stopping");
	worker_shutdown(w);
	ev_loop_destroy(w->loop);
	return 0;
}

/* storage_process.c: the storage process: its loop, signals and lifecycle, and its links to the workers (requests in, answers out). */
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
#include "backend_probe.h"
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
#include <malloc.h>
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

static void worker_link_release(struct worker_link *wl);

#define LINK_READ_BULK 4096   /* bytes a read of the link asks for at least (worker_link_on_io) */

/* ---------------------------------------------------------------- answers */

/* Answers go out once per loop iteration (storage_on_prepare): with many uploads, one wake-up of the
 * loop finishes several chunks, and their answers to a worker leave in one send instead of one each
 * (the worker is woken once for them too). EAGAIN: the write watcher goes on; errors: the read side
 * closes the link. On the loop, with the link's out_lock held (the disk threads append answers to
 * the same buffer, op_reply_direct). */
static void worker_link_flush(struct worker_link *wl)
{
	wl->flush_wanted = 1;
}

static void worker_link_flush_locked(struct worker_link *wl)
{
	pthread_mutex_lock(&wl->out_lock);
	link_flush(&wl->link);
	pthread_mutex_unlock(&wl->out_lock);
}

static void storage_on_prepare(struct ev_loop *loop, ev_prepare *w, int revents)
{
	(void)loop;
	(void)revents;
	struct storage *st = w->data;
	for (struct worker_link *wl = st->worker_links; wl; wl = wl->next) {
		if (wl->flush_wanted) {
			wl->flush_wanted = 0;
			worker_link_flush_locked(wl);
		}
	}
}

/* On a disk thread: the answer of a written middle chunk goes to its worker at once, without
 * waiting for the loop to take the job's completion (design.md, "The direct answer"). Appended
 * to the link's buffer under its lock, so it stays whole and after every answer queued before
 * it; sent here only when nothing was waiting (else the loop sends it with what waits: before it
 * sleeps, storage_on_prepare, or when the socket takes more, the write watcher).
 * What the socket does not take now the loop sends when it takes the completion
 * (op_reply_direct_flush). 0: queued or sent; -1: not (the link is gone, or no memory). */
int op_reply_direct(struct op *op, const struct ipc_result *r)
{
	struct worker_link *wl = op->wl;
	int rc = -1;
	pthread_mutex_lock(&wl->out_lock);
	if (!wl->dead) {
		size_t waiting = buf_len(&wl->link.out);
		if (ipc_encode_result(&wl->link.out, op->reqid, r) == 0) {
			rc = 0;
			while (waiting == 0 && buf_len(&wl->link.out) > 0) {
				ssize_t n = send(wl->link.fd, buf_head(&wl->link.out), buf_len(&wl->link.out),
				    MSG_NOSIGNAL | MSG_DONTWAIT);
				if (n > 0)
					buf_consume(&wl->link.out, (size_t)n);
				else if (n < 0 && errno == EINTR)
					continue;
				else
					break;   /* full, or broken: the loop's flush sees to it */
			}
		}
	}
	pthread_mutex_unlock(&wl->out_lock);
	return rc;
}

/* On the loop, taking the completion of a job that answered directly: whatever of the answer the
 * socket did not take goes out with the write watcher, as the loop's own answers do. */
void op_reply_direct_flush(struct op *op)
{
	struct worker_link *wl = op->wl;
	pthread_mutex_lock(&wl->out_lock);
	if (!wl->dead && buf_len(&wl->link.out) > 0)
		worker_link_flush(wl);
	pthread_mutex_unlock(&wl->out_lock);
}

/* Sends the result of op to its worker; the op itself stays until op_free. */
void op_reply(struct op *op, int error, const char *message, const struct upload *up)
{
	struct worker_link *wl = op->wl;
	char challenge_msg[160];
	if (error && op->type == OP_CHUNK && error != ERR_USER_UPLOADS && error != ERR_SERVER_UPLOADS)
		STAT_INC(uploads_failed);
	if (wl && !wl->dead) {
		struct ipc_result r = { .error = (uint32_t)error };
		if (up && up->exists && up->dd_challenging && error == ERR_OK && op->type == OP_CHUNK) {
			/* (A sync answers what is held: 1006 never claims bytes that are not stored.) */
			/* Ask for chunk k: the client seeks to (k - 1) * chunk and sends seq k. */
			uint64_t k = up->challenge[up->dd_next];
			r.seq = k - 1;
			r.trans_size = (k - 1) * up->chunk_len;
			r.total_size = up->total_size;
			r.kind = (uint8_t)up->kind;
			r.name = up->name;
			r.name_len = up->name_len;
			if (message == NULL) {
				/* The binary path tells a challenge from a normal answer by this prefix. */
				snprintf(challenge_msg, sizeof(challenge_msg), IPC_CHALLENGE_PREFIX "send chunk %" PRIu64
				    " (%" PRIu64 " bytes at %" PRIu64 ") to show you hold the file", k,
				    up->total_size - r.trans_size < up->chunk_len ? up->total_size - r.trans_size : up->chunk_len,
				    r.trans_size);
				message = challenge_msg;
			}
		} else if (up && up->exists) {
			r.seq = up->seq;
			r.trans_size = up->committed;
			r.total_size = up->total_size;
			r.kind = (uint8_t)up->kind;
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
		pthread_mutex_lock(&wl->out_lock);
		if (ipc_encode_result(&wl->link.out, op->reqid, &r) == 0)
			worker_link_flush(wl);
		pthread_mutex_unlock(&wl->out_lock);
	}
}

void op_free(struct op *op)
{
	STAT_DEC(storage_queue);
	if (op->in_ring && op->wl)
		shmring_view_done(&op->wl->ring, op->ring_slot);   /* the worker may reuse the bytes now */
	if (op->wl)
		worker_link_release(op->wl);
	free(op->block);
	free(op);
}

void op_answer(struct op *op, int error, const char *message, const struct upload *up)
{
	op_reply(op, error, message, up);
	op_free(op);
}

void published_answer(struct op *op)
{
	struct worker_link *wl = op->wl;
	if (!wl->dead) {
		struct ipc_result r = { .error = ERR_OK, .seq = op->seq, .trans_size = op->total_size,
		    .total_size = op->total_size, .kind = (uint8_t)op->kind, .name = op->name, .name_len = op->name_len };
		pthread_mutex_lock(&wl->out_lock);
		if (ipc_encode_result(&wl->link.out, op->reqid, &r) == 0)
			worker_link_flush(wl);
		pthread_mutex_unlock(&wl->out_lock);
	}
	op_free(op);
}

/* ---------------------------------------------------------------- worker links */

static void worker_link_release(struct worker_link *wl)
{
	if (--wl->refs == 0 && wl->dead) {
		free(wl->block);
		shmring_view_close(&wl->ring);
		if (wl->ring_fd >= 0)
			close(wl->ring_fd);
		pthread_mutex_destroy(&wl->out_lock);
		free(wl);
	}
}

static void worker_link_close(struct worker_link *wl)
{
	struct storage *st = wl->st;
	pthread_mutex_lock(&wl->out_lock);   /* no disk thread is sending on it while it closes */
	link_close(&wl->link);
	wl->dead = 1;
	pthread_mutex_unlock(&wl->out_lock);
	struct worker_link **pp = &st->worker_links;
	while (*pp && *pp != wl)
		pp = &(*pp)->next;
	if (*pp)
		*pp = wl->next;
	/* A worker that died sends no RELEASE for its connections: the uploads they drove give their
	 * leases back once idle, as for a client that left, instead of after lease_ttl * 2 idle, so a
	 * client that resumes on another node does not wait for them. */
	struct upload *up, *tmp;
	HASH_ITER(hh, st->uploads, up, tmp) {
		if (up->driver != wl)
			continue;
		up->driver = NULL;
		up->release_wanted = 1;
		upload_run(up);
	}
	worker_link_release(wl);   /* the link's own reference; queued ops hold theirs */
}

/* The worker's end closed (eof) or failed: routine after its goodbye, else a loss worth a warning
 * (the worker died: the master logs how). Closes the link. */
static void worker_link_ended(struct worker_link *wl, int eof)
{
	int err = errno;
	struct ucred peer = { 0 };
	socklen_t len = sizeof(peer);
	if (getsockopt(wl->link.fd, SOL_SOCKET, SO_PEERCRED, &peer, &len) < 0)
		peer.pid = 0;
	if (wl->bye)
		log_debug("link to worker pid %ld closed after its goodbye", (long)peer.pid);
	else
		log_warnx("link to worker pid %ld lost: %s", (long)peer.pid, eof ? "closed without a goodbye" : strerror(err));
	worker_link_close(wl);
}

/* Handles one message. block, when not NULL, is payload in its own allocation,
 * which a chunk op takes over (it is freed here otherwise). */
static void worker_link_on_message(struct worker_link *wl, const struct ipc_header *h, const uint8_t *payload,
    uint8_t *block)
{
	struct storage *st = wl->st;
	if (h->type == IPC_WORKER_STORAGE_BYE) {
		free(block);
		wl->bye = 1;   /* its close follows */
		return;
	}
	if (h->type == IPC_WORKER_STORAGE_PING) {
		free(block);
		pthread_mutex_lock(&wl->out_lock);
		if (ipc_encode_ping(&wl->link.out, h->reqid, 1) == 0)
			worker_link_flush(wl);
		pthread_mutex_unlock(&wl->out_lock);
		return;
	}
	if (h->type == IPC_WORKER_STORAGE_RING) {
		free(block);
		uint64_t size;
		uint32_t error = 1;
		int fd = wl->ring_fd;
		wl->ring_fd = -1;
		if (ipc_decode_ring(payload, h->len, &size) < 0 || fd < 0 || wl->ring.map != NULL) {
			log_warnx("malformed or repeated ring message from a worker: its chunks take the copy path");
			if (fd >= 0)
				close(fd);
		} else if (shmring_view_open(&wl->ring, fd, size) < 0) {
			log_warn("cannot map a worker's ring of %" PRIu64 " bytes: its chunks take the copy path", size);
		} else {
			error = 0;
		}
		pthread_mutex_lock(&wl->out_lock);
		if (ipc_encode_ring_answer(&wl->link.out, error) == 0)
			worker_link_flush(wl);
		pthread_mutex_unlock(&wl->out_lock);
		return;
	}
	struct upload_key key;
	memset(&key, 0, sizeof(key));
	struct op *op;
	if (h->type == IPC_WORKER_STORAGE_CHUNK || h->type == IPC_WORKER_STORAGE_CHUNK_REF) {
		struct ipc_chunk c;
		uint32_t slot = 0;
		uint64_t at = 0;
		int in_ring = h->type == IPC_WORKER_STORAGE_CHUNK_REF;
		int bad = in_ring ? ipc_decode_chunk_ref(payload, h->len, &c, &slot, &at) < 0
		    : ipc_decode_chunk(payload, h->len, &c) < 0;
		if (!bad && in_ring && (c.data = shmring_view_at(&wl->ring, slot, at, c.data_len)) == NULL) {
			/* A slot named in a well-formed message goes back; a garbled one's number is not trusted
			 * (its slot stays taken, and the worker's chunks take the copy path once the ring is full). */
			shmring_view_done(&wl->ring, slot);
			bad = 1;
		}
		if (bad) {
			log_warnx("malformed chunk message from a worker: dropped");
			free(block);
			return;
		}
		if (!in_ring && block == NULL && (block = malloc(c.data_len ? c.data_len : 1)) != NULL) {
			memcpy(block, c.data, c.data_len);   /* it came in the link's buffer */
			c.data = block;
		}
		op = block || in_ring ? calloc(1, sizeof(*op)) : NULL;
		if (op == NULL) {
			free(block);
			if (in_ring)
				shmring_view_done(&wl->ring, slot);
			return;
		}
		op->in_ring = in_ring;
		op->ring_slot = slot;
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
	op->wl = wl;
	op->reqid = h->reqid;
	wl->refs++;
	op_dispatch(st, op, &key);
}

/* Receives the rest of a chunk message into its block and, in the same call, the
 * header of the next message into the link's buffer. 1: go on reading, 0: no more
 * data now, -1: the link was closed. */
static int worker_link_read_block(struct worker_link *wl)
{
	uint8_t *next = buf_reserve(&wl->link.in, IPC_HEADER_LEN);
	if (next == NULL) {
		worker_link_close(wl);
		return -1;
	}
	struct iovec iov[2] = {
		{ wl->block + wl->block_got, wl->block_header.len - wl->block_got },
		{ next, IPC_HEADER_LEN },
	};
	ssize_t n = readv(wl->link.fd, iov, 2);
	if (n <= 0) {
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			return 0;
		worker_link_ended(wl, n == 0);
		return -1;
	}
	size_t into_block = (size_t)n < iov[0].iov_len ? (size_t)n : iov[0].iov_len;
	wl->block_got += into_block;
	buf_commit(&wl->link.in, (size_t)n - into_block);
	if (wl->block_got < wl->block_header.len)
		return 0;
	uint8_t *block = wl->block;
	wl->block = NULL;
	worker_link_on_message(wl, &wl->block_header, block, block);
	return wl->dead ? -1 : 1;
}

static void worker_link_on_io(struct ev_loop *loop, ev_io *io, int revents)
{
	(void)loop;
	struct worker_link *wl = io->data;
	if (revents & EV_WRITE)
		worker_link_flush_locked(wl);
	if (!(revents & EV_READ))
		return;
	wl->refs++;   /* answers inside the loops below must not free wl */
	for (int reads = 0; reads < 64 && !wl->dead; reads++) {
		if (wl->block != NULL) {
			if (worker_link_read_block(wl) <= 0)
				break;
		} else {
			/* Small reads: what completes the message at the head, or LINK_READ_BULK when that is
			 * less, so that the small messages of many uploads (CHUNK_REF, about 150 bytes) come in
			 * one read, not two each, and a chunk's payload is read into its own block, not into
			 * this buffer (at most LINK_READ_BULK of it that followed other messages is copied). */
			size_t want = IPC_HEADER_LEN;
			struct ipc_header h;
			const uint8_t *payload;
			enum ipc_status st = link_next(&wl->link, &h, &payload);
			if (st == IPC_NEED_MORE && buf_len(&wl->link.in) >= IPC_HEADER_LEN)
				want = IPC_HEADER_LEN + h.len;
			if (st == IPC_NEED_MORE) {
				size_t room = want - buf_len(&wl->link.in);
				ssize_t n = link_read_fd(&wl->link, room < LINK_READ_BULK ? LINK_READ_BULK : room, &wl->ring_fd);
				if (n <= 0) {
					if (n != LINK_AGAIN)
						worker_link_ended(wl, n == LINK_EOF);
					break;
				}
			}
		}
		/* Messages complete in the buffer, and the start of a chunk's block. */
		for (;;) {
			struct ipc_header h;
			const uint8_t *payload;
			enum ipc_status s = link_next(&wl->link, &h, &payload);
			if (s == IPC_NEED_MORE && buf_len(&wl->link.in) >= IPC_HEADER_LEN && h.type == IPC_WORKER_STORAGE_CHUNK &&
			    wl->block == NULL) {
				/* Whatever of the payload is here already moves to the block (only
				 * bytes read before the header was known, at most a header's worth). */
				size_t have = buf_len(&wl->link.in) - IPC_HEADER_LEN;
				wl->block = malloc(h.len ? h.len : 1);
				if (wl->block == NULL) {
					worker_link_close(wl);
					break;
				}
				wl->block_header = h;
				memcpy(wl->block, buf_head(&wl->link.in) + IPC_HEADER_LEN, have);
				wl->block_got = have;
				buf_consume(&wl->link.in, IPC_HEADER_LEN + have);
				break;
			}
			if (s == IPC_NEED_MORE)
				break;
			if (s == IPC_BAD) {
				log_warnx("bad message header from a worker: closing its link");
				worker_link_close(wl);
				break;
			}
			worker_link_on_message(wl, &h, payload, NULL);
			if (wl->dead)
				break;
			link_consume(&wl->link, &h);
		}
	}
	worker_link_release(wl);
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
		struct worker_link *wl = calloc(1, sizeof(*wl));
		if (wl == NULL) {
			close(fd);
			continue;
		}
		wl->st = st;
		pthread_mutex_init(&wl->out_lock, NULL);
		wl->refs = 1;   /* the link itself */
		wl->ring_fd = -1;
		wl->next = st->worker_links;
		st->worker_links = wl;
		link_open(&wl->link, loop, fd, worker_link_on_io, wl);
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

/* At exit: what is on disk stays; memory goes back, so leak checkers see real leaks only. */
static void storage_free_all(struct storage *st)
{
	struct upload *up, *tmp;
	HASH_ITER(hh, st->uploads, up, tmp) {
		HASH_DEL(st->uploads, up);
		record_timer_stop(up);
		struct op *lists[] = { up->head, up->hq_head, up->hash_batch };   /* the hash stage's too */
		for (size_t i = 0; i < sizeof(lists) / sizeof(lists[0]); i++) {
			while (lists[i]) {
				struct op *op = lists[i];
				lists[i] = op->next;
				op_free(op);
			}
		}
		st->backend.ops->staging_close(up->stg);
		md5_free(&up->md5);
		free(up);
	}
	/* A goodbye on each link first, so the workers take the close as this process stopping in
	 * order (a reload restarting it, a stop) and not as a loss; as much as each socket takes now. */
	for (struct worker_link *wl = st->worker_links; wl; wl = wl->next) {
		pthread_mutex_lock(&wl->out_lock);
		if (!wl->dead && ipc_encode_bye(&wl->link.out, 1) == 0)
			link_flush(&wl->link);
		pthread_mutex_unlock(&wl->out_lock);
	}
	while (st->worker_links)
		worker_link_close(st->worker_links);
	struct user_count *u, *utmp;
	HASH_ITER(hh, st->users, u, utmp) {
		HASH_DEL(st->users, u);
		free(u);
	}
}

/* What the storage process does with each signal. SIGPIPE and SIGXFSZ are ignored before
 * anything else in storage_main. */
static const struct signal_action storage_signals[] = {
	{ SIGTERM, storage_on_stop },
	{ SIGINT, storage_on_stop },
	{ SIGQUIT, storage_on_stop },     /* the master stops storage last, once the workers are gone */
	{ SIGUSR1, signals_reopen_logs },     /* reopen the logs */
	{ SIGHUP, NULL },                 /* reloads are the master's business */
};
_Static_assert(SIGNALS_COUNT(storage_signals) == SIGNALS_COUNT(((struct storage *)0)->sigs), "one watcher per signal");

static void make_dir(const char *path)
{
	if (mkdir(path, 0750) < 0 && errno != EEXIST)
		fatal("mkdir(%s) failed", path);
}

/* ---------------------------------------------------------------- health (the agent-check) */

#define HEALTH_INTERVAL 1.0     /* seconds between heartbeats of the loop */

/* The loop's heartbeat, and the backend's ping (backend_probe.c: a ping still running after
 * storage_timeout counts as unreachable, since every pool thread may be stuck on the backend). */
static void storage_on_health_timer(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)loop;
	(void)revents;
	struct storage *st = t->data;
	if (stats_self)
		atomic_store(&stats_self->alive_ms, stats_mono_ms());
	backend_probe_tick(&st->health);
}

/* ---------------------------------------------------------------- the node name (several nodes) */

/* Every node holds a lease on its [server] node name in Redis (owner: lease_owner(), one per
 * master), renewed every third of lease_ttl, so two live nodes sharing one Redis under one name
 * are seen. The name only labels upload records and the holders named in logs (leases are told
 * apart by their owners' random part), so a clash is an error in the log, not a refused start:
 * a start does not wait for Redis, and the other node may start later. A name held elsewhere is a
 * live clash only once its holder renewed it past the expiry first seen: a holding that just
 * runs out is this node's previous instance (a restart) or a node that is gone. */
static void node_on_lease(void *data, enum lease_status status, uint64_t fence, const char *holder,
    long remaining_ms)
{
	(void)fence;
	struct storage *st = data;
	ev_tstamp now = ev_now(st->loop);
	if (status == LEASE_HELD) {
		if (st->node_clash_logged)
			log_info("[server] node %s: the other node of this name is gone: the name is this node's again",
			    st->conf->node);
		st->node_holder[0] = '\0';
		st->node_clash_logged = 0;
		return;
	}
	if (status != LEASE_BUSY || holder == NULL)
		return;   /* Redis unavailable: the next tick asks again */
	if (strcmp(holder, st->node_holder) != 0) {
		snprintf(st->node_holder, sizeof(st->node_holder), "%s", holder);
		st->node_busy_until = now + (remaining_ms >= 0 ? remaining_ms / 1000.0 : st->conf->lease_ttl);
		st->node_clash_logged = 0;
		return;
	}
	/* Half a second for the two clocks (Redis's and this loop's) and the round trips. */
	if (now > st->node_busy_until + 0.5 && !st->node_clash_logged) {
		char escaped[ESCAPE_SIZE(LEASE_OWNER_MAX)];
		escape_quoted(escaped, sizeof(escaped), holder, strlen(holder));
		log_error("[server] node %s: another live node uses this name in this Redis (its lease holder is \"%s\"): "
		    "give every node its own name; upload records and logs cannot tell them apart", st->conf->node,
		    escaped);
		st->node_clash_logged = 1;
	}
}

static void storage_on_node_timer(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)loop;
	(void)revents;
	struct storage *st = t->data;
	char key[sizeof(st->conf->redis_prefix) + sizeof(st->conf->node) + 8];
	snprintf(key, sizeof(key), "%snode_%s", st->conf->redis_prefix, st->conf->node);
	lease_acquire(&st->redis, key, st->conf->lease_ttl * 1000L, 0, node_on_lease, st);   /* -1: not connected */
}

#define STORAGE_MMAP_THRESHOLD (4 << 20)   /* chunk blocks below this come from the heap */
#define STORAGE_HEAP_KEEP (16 << 20)        /* free heap kept instead of given back */

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
	/* Each chunk is received into a block of its own (up to 1 MiB on the fast path, a window of
	 * them alive per upload): with glibc's defaults the heap was trimmed and grown again, or the
	 * block mapped afresh, for every chunk, and the storage process took page faults on every
	 * page of every chunk. Blocks come from a heap that keeps up to STORAGE_HEAP_KEEP free. */
	mallopt(M_MMAP_THRESHOLD, STORAGE_MMAP_THRESHOLD);
	mallopt(M_TRIM_THRESHOLD, STORAGE_HEAP_KEEP);
	st->conf = conf;
	st->listen_fd = listen_fd;
	st->loop = ev_loop_new(EVFLAG_AUTO);
	if (st->loop == NULL || json_writer_init(&st->jw) < 0)
		fatalx("cannot start the storage loop");
	char err[512];
	if (backend_open(&st->backend, conf, BACKEND_WRITER, err, sizeof(err)) < 0)
		fatalx("storage backend: %s", err);
	if (conf->dedup != DEDUP_OFF &&
	    (st->backend.ops->content_open == NULL || st->backend.ops->publish_from_content == NULL))
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
	st->pg = pg_create(st->loop, st->pool, conf, &st->redis, st->pending);
	if (st->pg == NULL)
		fatalx("cannot start the postgres client");

	signals_watch(st->loop, storage_signals, SIGNALS_COUNT(storage_signals), st->sigs, st);
	ev_prepare_init(&st->answer_flush, storage_on_prepare);
	st->answer_flush.data = st;
	ev_prepare_start(st->loop, &st->answer_flush);
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
	backend_probe_init(&st->health, st->loop, st->pool, &st->backend, conf->storage_timeout, NULL);
	ev_timer_init(&st->health_timer, storage_on_health_timer, 0., HEALTH_INTERVAL);
	st->health_timer.data = st;
	ev_timer_start(st->loop, &st->health_timer);
	ev_timer_init(&st->node_timer, storage_on_node_timer, 0., conf->lease_ttl / 3.0);
	st->node_timer.data = st;
	ev_timer_start(st->loop, &st->node_timer);

	char sock[sizeof(((struct sockaddr_un *)0)->sun_path)];
	link_socket_path(conf->run_dir, sock, sizeof(sock));
	log_info("serving workers on %s", sock);
	ev_run(st->loop, 0);
	storage_on_prepare(st->loop, &st->answer_flush, 0);   /* answers queued by the last callbacks */
	log_info("stopping");
	st->stopping = 1;
	/* Disk work in flight finishes first: every acknowledged byte is already written, and no job
	 * of pg's runs once its memory goes. */
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

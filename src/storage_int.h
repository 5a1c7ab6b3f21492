/* storage_int.h: what the storage process's three files share: its uploads, the requests queued on them and the links to the workers. */
#ifndef RESOURCED_STORAGE_INT_H
#define RESOURCED_STORAGE_INT_H

/* storage_process.c is the process and its links to the workers, storage.c the state machine
 * of each upload (disk work, lease, instant upload, janitor), storage_record.c the upload's
 * records in Redis. */

#include <ev.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>
#include <uthash.h>

#include "backend.h"
#include "backend_probe.h"
#include "challenge.h"
#include "conf.h"
#include "digest.h"
#include "ipc.h"
#include "lease.h"
#include "shmring.h"
#include "json.h"
#include "link.h"
#include "pool.h"
#include "proto.h"
#include "rds.h"

#define PENDING_DIR ".pending"
#define READ_CHUNK (256 * 1024)
#define HASH_BLOCK (1024 * 1024)
#define ACCEPT_PAUSE 0.5        /* seconds without accepting after EMFILE/ENFILE */
#define SPACE_INTERVAL 2.0      /* seconds between statvfs of the root */

/* A worker connected over the Unix socket (the storage end of its uplink). */
struct worker_link {
	struct storage *st;
	struct link link;
	int dead;          /* the link is closed; answers are dropped */
	int bye;           /* the worker said goodbye (it is stopping): its close is routine */
	int refs;          /* ops still holding this link */
	struct worker_link *next;
	/* A chunk message being received straight into its own block, which becomes
	 * the op's data: the chunk is not copied again in user space. NULL when none. */
	uint8_t *block;
	struct ipc_header block_header;
	size_t block_got;
	/* The worker's shared ring (shmring.h): CHUNK_REF data lies there. Unmapped with the last op. */
	struct shmring_view ring;
	int ring_fd;                  /* a descriptor received with RING, until that message is read; -1: none */
	int flush_wanted;             /* answers queued this loop iteration: sent together before it sleeps */
	/* The link's output buffer and its socket are shared with the disk threads, which send the
	 * answer of a written middle chunk themselves (op_reply_direct): every answer goes through
	 * link.out under this lock, so they stay whole and in order; only the loop closes the link,
	 * under it too. */
	pthread_mutex_t out_lock;
};

enum op_type { OP_CHUNK, OP_SYNC, OP_SWEEP };   /* OP_SWEEP: the janitor, no worker link */

/* One request from a worker, queued on its upload. */
struct op {
	enum op_type type;
	struct worker_link *wl;       /* the worker to answer; NULL for the janitor */
	uint64_t reqid;
	uint64_t seq, trans_size, total_size, offset;
	int last, kind;
	char name[PROTO_NAME_MAX + 1];
	uint16_t name_len;
	uint32_t data_len;
	const uint8_t *data;          /* the chunk, inside block */
	uint8_t *block;               /* the received message payload, freed with the op */
	int in_ring;                  /* data lies in the worker's ring at ring_slot: marked done with the op */
	uint32_t ring_slot;
	int retried;                  /* run again once after the upload was read back */
	struct op *next;
};

struct upload_key {
	uint64_t uid;
	char md5[PROTO_MD5_HEX + 1];
};

enum disk_work { WORK_START, WORK_WRITE, WORK_COMPLETE, WORK_DISCARD, WORK_VERIFY, WORK_LOAD,
	WORK_CHECK, WORK_CHALLENGE, WORK_LINK };

/* Chunks asked for at random offsets before an upload is published from stored content: with
 * chunk 1, at most three chunks are answered (design.md, "Instant upload"). */
#define DEDUP_CHALLENGES CHALLENGE_CHUNKS
/* The least proof a client cannot shrink (design.md, "Instant upload"): chunk 1 must hold at least
 * min(total_size, DEDUP_MIN_PROOF) bytes, else the upload is a normal one; and the challenged
 * chunks that matched must carry at least min(DEDUP_MIN_PROOF, total_size - chunk 1) bytes that
 * are not guessable (dedup_chunk_weak), else the proof fails. 16 KiB is half resctl's default
 * chunk and below any chunk size a file client uses, and 2^131072 is beyond any guessing. */
#define DEDUP_MIN_PROOF 16384
/* A challenged chunk shorter than this, or repeating itself with a period up to
 * DEDUP_WEAK_PERIOD bytes (one byte value, a short pattern), or equal to the start of chunk 1
 * (which the client sent), proves nothing. */
#define DEDUP_WEAK_LEN 16
#define DEDUP_WEAK_PERIOD 256

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
	/* The hash stage: chunks written and answered wait here to be fed to the MD5 in write order, on
	 * a disk thread of their own, so the write of the next chunk need not wait for the hash of this
	 * one (design.md, "Incremental MD5"). While it runs, md5, hashed and hash_dirty are its own. */
	struct op *hq_head, *hq_tail; /* written, not yet handed to the hash job */
	struct op *hash_batch;        /* what the running hash job feeds to the MD5 */
	int hash_running;
	uint64_t hash_pending;        /* chunk bytes in hq and hash_batch */
	uint64_t hash_frontier;       /* hashed plus what is queued: a write starting at or past it
	                               * rewrites nothing hashed, so it may run beside the hash job */
	struct pool_job hash_job;
	int work_deferred;            /* the job below waits for the hash stage (pinned, running set) */
	int job_beside_hash;          /* the job runs while the hash stage does: it leaves the MD5 alone */
	struct op *head, *tail;       /* requests in arrival order; head is the one running */
	int running;                  /* head is on a disk thread or waiting for Redis */
	int pins;                     /* async work (disk, Redis) still referring to this upload */
	int retired;                  /* out of the table; freed when pins reach 0 */
	int record_inflight, record_dirty;
	ev_tstamp record_sent;        /* when the last progress write went to Redis */
	ev_timer record_timer;        /* writes a progress record held back by record_write_soon */
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
	/* A written middle chunk is answered by its disk thread (design.md, "The direct answer"):
	 * the loop decides it and what the answer says when it submits the job (job_submit), the
	 * thread sets direct_sent once the answer is in the link. */
	int direct;
	uint64_t direct_seq, direct_committed;
	int direct_sent;
	enum disk_work work;
	int work_errno;
	int work_error;               /* proto error set by the job */
	/* Several nodes share the storage: the lease in Redis makes this node the upload's one
	 * writer, and its fence goes with every staging change (design.md, "Several nodes"). */
	int lease;                    /* enum upload_lease */
	uint64_t fence;               /* of the lease held */
	uint64_t fence_floor;         /* a fence found recorded above ours: the next lease must be higher */
	uint64_t load_fence;          /* the fence recorded with the entry WORK_LOAD read back */
	ev_tstamp lease_until;        /* no staging change starts after this unless renewed */
	ev_tstamp lease_asked, renew_asked;
	ev_tstamp wait_since;         /* since when the lease is held elsewhere; 0 when not waiting */
	int renewing;                 /* a renew is in flight */
	ev_timer lease_timer;         /* renews while held; asks again while held elsewhere */
	int loaded;                   /* progress is the shared truth: started here or read back */
	int loading;                  /* WORK_LOAD is reading the staging entry back */
	int release_wanted;           /* the client that drove it left, or the janitor looked at it */
	struct worker_link *driver;   /* the link its last request came by (not a reference: cleared
	                               * when that link closes, which counts as its client leaving) */
	int reload_now;               /* Redis came back: take the lease again and record (or read back) at once */
	int parked;                   /* its lease was given back while what is in memory stayed */
	int check_hold;               /* taken back with the same fence: confirm with the storage first */
	ev_tstamp active;             /* last request: an idle upload lets its lease go */
	struct backend_entry load;    /* what WORK_LOAD found */
	/* Instant upload: chunk 1 matched content already stored; the chunks challenge[] (numbers
	 * from 2, chosen at random) are asked for next, compared with that content and not stored.
	 * Redis holds the draw and the answers under the lease (challenge.h): any node goes on. */
	int dd_match;                 /* set by WORK_START / WORK_CHALLENGE: the bytes matched */
	int dd_weak;                  /* set by WORK_CHALLENGE: the chunk carries too little to prove */
	int dd_challenging;           /* answers ask for challenge[dd_next] instead of committed */
	int dd_proving;               /* every answer so far matched: not a decoy (dedup = global) */
	int dd_match_seen;            /* chunk 1 matched here: a fallback is counted and logged */
	uint64_t dd_strong;           /* bytes of matched challenged chunks that are not weak */
	int dd_count, dd_next;
	uint64_t challenge[DEDUP_CHALLENGES];
	uint64_t dd_received;         /* file bytes the client sent for this proof */
	int dd_linked;                /* published from stored content */
	/* A completion's timing (CLOCK_MONOTONIC µs): handed to the pool, started, ended on its thread. */
	uint64_t publish_queued_us, publish_started_us, publish_ended_us;
};

/* Uploads in progress of one uid, for max_uploads_per_user. */
struct user_count {
	UT_hash_handle hh;
	uint64_t uid;
	unsigned n;
	uint64_t left;   /* KiB its uploads in progress still announce (upload_admit caps it) */
};

/* statvfs of the root, run on a pool thread so the loop never waits for the file system. */
struct space_probe {
	struct pool_job job;
	struct storage *st;
	int busy;
	uint64_t avail;
	int ok;
};

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

struct storage {
	struct ev_loop *loop;
	const struct conf *conf;
	int listen_fd;
	ev_io accept_io;
	ev_signal sigs[5];            /* storage_signals[] */
	ev_timer janitor;
	ev_prepare answer_flush;      /* sends the answers queued while the loop ran, before it sleeps */
	ev_timer accept_pause;        /* accepts stopped for a moment after EMFILE/ENFILE */
	ev_timer space_timer;
	struct space_probe space;
	ev_timer health_timer;
	struct backend_probe health;  /* the backend's ping, for the agent-check */
	/* The lease on [server] node (storage_process.c, "the node name"): who else holds it, until
	 * when that holding ends unless renewed, and whether the clash was logged. */
	ev_timer node_timer;
	char node_holder[LEASE_OWNER_MAX];
	ev_tstamp node_busy_until;
	int node_clash_logged;
	struct sweep *sweep;          /* the janitor's listing of old staging entries */
	uint64_t free_bytes;          /* available to us on the root's file system, as last measured */
	int free_known;
	uint64_t announced_left;      /* bytes still to come of every upload in progress */
	unsigned uploads_counted;
	struct user_count *users;
	struct worker_link *worker_links;
	struct upload *uploads;       /* uthash table by key */
	struct rds redis;
	struct pg *pg;
	struct pool *pool;
	struct json_writer jw;
	struct backend backend;       /* staging and published files */
	char pending[600];
	int stopping;                 /* the loop has ended: start no new work */
};

/* <prefix>file_upload_<uid>_<md5>: sized for the longest prefix and uid, never cut. */
#define RECORD_KEY_MAX (sizeof(((struct conf *)0)->redis_prefix) + sizeof("file_upload__") + 20 + PROTO_MD5_HEX)

#define LEASE_KEY_MAX (sizeof(((struct conf *)0)->redis_prefix) + sizeof("file_lease__") + 20 + PROTO_MD5_HEX)

/* storage_process.c: answers to the workers. */
void op_reply(struct op *op, int error, const char *message, const struct upload *up);
void op_free(struct op *op);
void op_answer(struct op *op, int error, const char *message, const struct upload *up);
void published_answer(struct op *op);
int op_reply_direct(struct op *op, const struct ipc_result *r);
void op_reply_direct_flush(struct op *op);

/* storage_record.c: the records in Redis. */
void record_key(const struct storage *st, const struct upload_key *k, char *out, size_t outlen);
void lease_key(const struct storage *st, const struct upload_key *k, char *out, size_t outlen);
#define CHALLENGE_KEY_MAX (sizeof(((struct conf *)0)->redis_prefix) + sizeof("file_challenge__") + 20 + PROTO_MD5_HEX)
void challenge_key(const struct storage *st, const struct upload_key *k, char *out, size_t outlen);
void record_write(struct upload *up);
void record_write_soon(struct upload *up);
void record_timer_init(struct upload *up);
void record_timer_stop(struct upload *up);
void record_published(struct upload *up);
void record_published_op(struct upload *up, const struct op *op);
void record_delete(struct upload *up);
void record_forget(struct upload *up);
void storage_on_redis_ready(struct rds *r);
int published_lookup(struct upload *up);

/* storage.c: the uploads. */
struct upload *upload_find(struct storage *st, const struct upload_key *key);
void op_dispatch(struct storage *st, struct op *op, const struct upload_key *key);
void upload_run(struct upload *up);
void upload_unpin(struct upload *up);
void upload_lost(struct upload *up, const char *holder);
void upload_lease_ask(struct upload *up);
void upload_lease_reclaim(struct upload *up);
void upload_start_work(struct upload *up, enum disk_work work);
void upload_pop(struct upload *up);
void storage_on_janitor(struct ev_loop *loop, ev_timer *t, int revents);
void storage_on_space_timer(struct ev_loop *loop, ev_timer *t, int revents);

#endif

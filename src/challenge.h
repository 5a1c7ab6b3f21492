/* challenge.h: the proof of possession of an instant upload, kept in Redis beside the upload's lease so any node continues it. */
#ifndef RESOURCED_CHALLENGE_H
#define RESOURCED_CHALLENGE_H

#include <stddef.h>
#include <stdint.h>

#include "lease.h"

struct rds;

/* Chunks asked for after chunk 1 matched stored content (design.md, "Instant upload"). */
#define CHALLENGE_CHUNKS 2

/* The proof of one upload (uid, md5) as Redis holds it. The chunks are drawn once and kept for
 * upload_ttl whatever the client does: starting the upload over (seq 1 again, on any node) asks
 * for the same chunks, and one wrong answer ends instant upload for it until the key expires. */
struct challenge {
	int present;                  /* a draw exists (else the fields below are 0) */
	uint64_t chunk_len;           /* the chunk size the chunks are numbered in */
	int count;                    /* chunks drawn, at most CHALLENGE_CHUNKS */
	uint64_t chunk[CHALLENGE_CHUNKS];   /* chunk numbers, from 2 */
	int next;                     /* how many were answered (right, unless failed) */
	int failed;                   /* a wrong answer was given: no instant upload for this key */
};

/* status: LEASE_HELD when the script ran under this node's lease (c says what Redis holds),
 * LEASE_BUSY when the lease is not ours (nothing changed), LEASE_ERROR when Redis failed. */
typedef void challenge_cb(void *data, enum lease_status status, const struct challenge *c);

/* Under the lease lease_key: returns the draw of key, or stores proposal (count chunks of
 * chunk_len) for ttl_ms when there is none. restart: the client started over at chunk 1, so
 * the answers count again from the first chunk of the same draw. mismatch: chunk 1 differed from
 * the stored content (or there is none): the draw, new or kept, is marked failed. proposal NULL:
 * only read. */
int challenge_get(struct rds *r, const char *lease_key, const char *key, long ttl_ms,
    const struct challenge *proposal, int restart, int mismatch, challenge_cb *cb, void *data);
/* Under the lease: records how many chunks were answered right, or that one was wrong
 * (failed); nothing when the key expired meanwhile. cb may be NULL. */
int challenge_update(struct rds *r, const char *lease_key, const char *key, int next, int failed,
    challenge_cb *cb, void *data);

#endif

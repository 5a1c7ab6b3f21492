/* shmring.h: a shared-memory ring between a worker and the storage process, so chunk bytes cross once, by reference. */
#ifndef RESOURCED_SHMRING_H
#define RESOURCED_SHMRING_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

/* The worker creates the ring (a memfd) for each new storage link and hands its descriptor over
 * once (IPC_WORKER_STORAGE_RING, SCM_RIGHTS). It writes a chunk's bytes into a slot and sends only
 * where they are (IPC_WORKER_STORAGE_CHUNK_REF); the storage process writes and hashes them in place
 * and marks the slot done when its op is freed. The worker reuses space only behind slots marked
 * done, in the order it gave them out; when the ring has no room the chunk takes the copy path. */
#define SHMRING_SLOTS 1024            /* slots given out and not yet reclaimed, at most */
#define SHMRING_HEADER 4096           /* the done flags, before the data area */
#define SHMRING_MIN (1u << 20)
#define SHMRING_MAX (1u << 30)
/* A slot of a page or more starts on a page boundary (the data area starts on one), so that the
 * storage process can write a chunk to disk straight from the ring with O_DIRECT (backend_fs.c). */
#define SHMRING_ALIGN 4096u

struct shmring_shared {
	_Atomic uint32_t done[SHMRING_SLOTS];   /* storage: 1 once the slot's bytes are no longer read */
};
_Static_assert(sizeof(struct shmring_shared) <= SHMRING_HEADER, "the flags fit in the header");

/* The worker's end: the producer and the only one that allocates. */
struct shmring {
	int fd;                       /* -1: no ring */
	uint8_t *map;
	size_t size;                  /* bytes of the data area */
	struct shmring_shared *sh;
	uint8_t *data;
	uint64_t head, tail;          /* positions in a never-wrapping count of bytes: head - tail is in use */
	uint64_t end[SHMRING_SLOTS];  /* where each slot's allocation ends (tail moves there once it is done) */
	uint32_t first, count;        /* the slots in use, oldest first */
	uint64_t newest_start, newest_prev_head;   /* for shmring_trim and shmring_cancel */
	uint8_t receiving[SHMRING_SLOTS];   /* a client's bytes are still arriving into the slot (shmring_receiving) */
};

/* Creates a ring of size bytes of data (rounded down to SHMRING_ALIGN; SHMRING_MIN to SHMRING_MAX).
 * Returns 0 or -1 (errno). */
int shmring_create(struct shmring *r, size_t size);
/* Unmaps and closes (the storage process's mapping, if any, stays valid). Safe on a closed ring. */
void shmring_destroy(struct shmring *r);
/* Room for len bytes in one piece, or NULL when the ring has none now. *slot and *offset (from the
 * start of the data area) name it in the message; shmring_trim or shmring_cancel must follow before
 * the next reserve. */
uint8_t *shmring_reserve(struct shmring *r, size_t len, uint32_t *slot, uint64_t *offset);
/* 1 when shmring_reserve(r, len) would find room now (the storage process frees slots on its own:
 * a worker waiting for room asks again later). */
int shmring_fits(struct shmring *r, size_t len);
/* Marks a slot as being filled from a client's socket (on) or not any more (sent or given up). */
void shmring_receiving(struct shmring *r, uint32_t slot, int on);
/* 1 when the oldest slot in use is still being filled from a client: nothing behind it can be
 * reused until that client sends the rest, however long that takes. */
int shmring_pinned(struct shmring *r);
/* The newest slot holds only used bytes (used <= what was reserved): the rest goes back. */
void shmring_trim(struct shmring *r, uint32_t slot, size_t used);
/* The newest slot is not sent after all. */
void shmring_cancel(struct shmring *r, uint32_t slot);
/* Any slot that will not be sent after all (newer ones were given out since): reclaimed in turn. */
void shmring_abandon(struct shmring *r, uint32_t slot);

/* The storage process's end: a read-only view of the data and the done flags. */
struct shmring_view {
	uint8_t *map;                 /* NULL: no ring on this link */
	size_t map_len;
	size_t size;
	struct shmring_shared *sh;
	const uint8_t *data;
};

/* Maps the ring a worker sent (fd is closed in any case). Returns 0, or -1 when it is not one of size bytes. */
int shmring_view_open(struct shmring_view *v, int fd, uint64_t size);
void shmring_view_close(struct shmring_view *v);
/* The bytes of slot at offset, or NULL when they do not lie inside the ring. */
const uint8_t *shmring_view_at(const struct shmring_view *v, uint32_t slot, uint64_t offset, uint32_t len);
/* The slot may be reused by the worker. */
void shmring_view_done(struct shmring_view *v, uint32_t slot);

#endif

/* stats.h: counters in shared memory, one slot per process, written lock-free and summed by the master. */
#ifndef RESOURCED_STATS_H
#define RESOURCED_STATS_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define STATS_MAX_SLOTS 514        /* storage + two generations of 256 workers */
#define STATS_ERR_BASE 1000
#define STATS_ERR_COUNT 50         /* error codes 1000..1049 */
#define STATS_TRANSFERS 64         /* transfers shown per process */
#define STATS_NAME_MAX 64

/* Everything a process counts. Only the owning process writes its slot.
 * counter: only grows, summed over every process that ever ran;
 * gauge: a level, summed over the running processes;
 * state: 0 or 1 per process, never summed (shown per process). */
#define STATS_COUNTERS(X)                                                        \
	X(conn_current, "gauge", "Client connections open")                         \
	X(conn_total, "counter", "Client connections accepted")                     \
	X(conn_rejected, "counter", "Connections closed at once: max_connections or max_connections_per_address")  \
	X(frames_in, "counter", "Request frames received")                          \
	X(frames_out, "counter", "Response frames sent")                            \
	X(frames_oversize, "counter", "Connections closed for a frame over max_frame") \
	X(bytes_in, "counter", "Bytes received from clients")                       \
	X(bytes_out, "counter", "Bytes sent to clients")                            \
	X(uploads_started, "counter", "Uploads started (chunk 1 stored)")           \
	X(uploads_completed, "counter", "Uploads published")                        \
	X(uploads_failed, "counter", "Upload chunks answered with an error")        \
	X(upload_bytes, "counter", "Upload bytes stored")                           \
	X(chunks_by_ring, "counter", "Upload chunks handed to storage through the shared ring") \
	X(chunks_copied, "counter", "Upload chunks copied over the storage link instead (ring full or off)") \
	X(chunks_ring_waits, "counter", "Binary upload chunks that waited in the socket for room in a full ring") \
	X(input_waits, "counter", "Connections that waited, unread, for room in input_budget before a large frame") \
	X(input_held, "gauge", "Bytes of large input buffers counted against input_budget") \
	X(chunks_answered_direct, "counter", "Upload chunks answered by the disk thread that wrote them") \
	X(publish_wait_us, "counter", "Microseconds written files waited for a disk thread to publish them") \
	X(publish_us, "counter", "Microseconds spent publishing files (fsync, checksum, rename, directory fsync)") \
	X(uploads_instant, "counter", "Uploads published from content already stored (instant upload)") \
	X(instant_bytes_saved, "counter", "Upload bytes instant uploads did not need to transfer") \
	X(instant_fallbacks, "counter", "Instant uploads whose proof of possession failed: uploaded in full") \
	X(content_freed_bytes, "counter", "Bytes of stored content freed once no name used it") \
	X(orphans_swept, "counter", "RADOS data objects deleted because nothing named them (left by a crash)") \
	X(downloads_started, "counter", "Downloads started (chunk 1 sent)")         \
	X(downloads_completed, "counter", "Downloads finished (last chunk sent)")   \
	X(download_bytes, "counter", "Download bytes sent")                         \
	X(auth_failures, "counter", "Requests refused for credentials")             \
	X(redis_errors, "counter", "Redis connection failures and errors")          \
	X(pg_errors, "counter", "PostgreSQL connection failures and errors")        \
	X(storage_queue, "gauge", "Requests queued or running in the storage process") \
	X(retry_backlog, "gauge", "Avatar icon updates waiting for PostgreSQL")     \
	X(uploads_in_progress, "gauge", "Uploads in progress counted against max_uploads") \
	X(uploads_refused, "counter", "Chunks 1 refused: max_uploads_per_user, max_uploads or free space") \
	X(redis_up, "state", "1 when the process is connected to Redis")            \
	X(storage_up, "state", "1 when the worker is linked to the storage process")

struct stats_transfer {
	_Atomic uint32_t seq;          /* odd while being written (seqlock) */
	uint32_t in_use;
	char kind;                     /* 'U' upload, 'A' avatar, 'D' download */
	uint64_t uid;
	uint64_t bytes, total;
	double started;                /* CLOCK_REALTIME seconds */
	char name[STATS_NAME_MAX];
};

struct stats_proc {
#define STATS_FIELD(name, type, help) _Atomic uint64_t name;
	STATS_COUNTERS(STATS_FIELD)
#undef STATS_FIELD
	_Atomic uint64_t errors[STATS_ERR_COUNT];   /* responses by error code */
	_Atomic uint64_t expected[STATS_ERR_COUNT]; /* answers with a code that healthy traffic gets */
	/* The storage process's health, read by the agent-check (control.c): its loop writes
	 * alive_ms (CLOCK_MONOTONIC milliseconds) every second, and backend_unreachable while its
	 * backend's ping fails or hangs. */
	_Atomic uint64_t alive_ms;
	_Atomic uint32_t backend_unreachable;
	struct stats_transfer transfers[STATS_TRANSFERS];
} __attribute__((aligned(64)));

/* Buckets of client addresses for [server] max_connections_per_address (addrlimit.c). */
#define ADDR_BUCKETS 16384

struct stats_shm {
	struct stats_proc procs[STATS_MAX_SLOTS];
	/* Connections per address bucket, counted by each worker in its own slot's row; only the rows
	 * of live counting workers are summed, so a worker that dies takes its counts with it. */
	unsigned char addr_key[16];                    /* keys the address hash: buckets are unguessable */
	_Atomic int log_level;                         /* [log] level in force in every process (log.c) */
	_Atomic uint8_t addr_live[STATS_MAX_SLOTS];
	_Atomic uint16_t addr_conns[STATS_MAX_SLOTS][ADDR_BUCKETS];
};

/* The calling process's slot (NULL before stats_attach: counting is then a no-op), the page it is
 * in and its number. */
extern struct stats_proc *stats_self;
extern struct stats_shm *stats_shm_self;
extern int stats_slot;

/* Wall-clock seconds, the time base of transfers and process start times. */
double stats_wall_now(void);
/* CLOCK_MONOTONIC milliseconds and microseconds: the same clock in every process of the machine. */
uint64_t stats_mono_ms(void);
uint64_t stats_mono_us(void);

struct stats_shm *stats_create(void);        /* master, before forking */
void stats_attach(struct stats_shm *shm, int slot);
void stats_reset_gauges(struct stats_proc *p);

#define STAT_ADD(field, n) \
	do { if (stats_self) atomic_fetch_add_explicit(&stats_self->field, (uint64_t)(n), memory_order_relaxed); } while (0)
#define STAT_INC(field) STAT_ADD(field, 1)
#define STAT_DEC(field) \
	do { if (stats_self) atomic_fetch_sub_explicit(&stats_self->field, 1, memory_order_relaxed); } while (0)
#define STAT_SET(field, v) \
	do { if (stats_self) atomic_store_explicit(&stats_self->field, (uint64_t)(v), memory_order_relaxed); } while (0)
void stats_count_error(int code);
/* Counts the code of a response: as expected (a sync's 1012 before a fresh upload) or as an error. */
void stats_count_answer(int response_id, int code);

/* Transfer table of the calling process: returns a handle (>= 0) or -1 when full. */
int stats_transfer_open(char kind, uint64_t uid, const char *name, size_t name_len, uint64_t total);
void stats_transfer_update(int handle, uint64_t bytes);
void stats_transfer_close(int handle);
/* Consistent copy of one entry for readers; 0 if it was in use. */
int stats_transfer_read(const struct stats_transfer *t, struct stats_transfer *out);

#endif

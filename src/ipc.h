/* ipc.h: the framed binary messages between workers and the storage process. */
#ifndef RESOURCED_IPC_H
#define RESOURCED_IPC_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "proto.h"

/* Bump when a message type or layout changes: both ends check it. */
#define IPC_VERSION 4
#define IPC_HEADER_LEN 16
#define IPC_MAX_PAYLOAD (64u << 20)
#define IPC_SOCKET_NAME "storage.sock"

/* Names read sender_receiver_verb. */
enum ipc_type {
	IPC_WORKER_STORAGE_PING = 1,
	IPC_STORAGE_WORKER_PONG = 2,
	IPC_WORKER_STORAGE_CHUNK = 3,     /* write one upload chunk */
	IPC_WORKER_STORAGE_SYNC = 4,      /* ask how far an upload got */
	IPC_STORAGE_WORKER_RESULT = 5,    /* the answer to CHUNK or SYNC */
	IPC_WORKER_STORAGE_RELEASE = 6,   /* the client connection that drove an upload closed (no answer) */
	IPC_WORKER_STORAGE_RING = 7,      /* the worker's shared ring (shmring.h): its descriptor rides along */
	IPC_STORAGE_WORKER_RING = 8,      /* the answer: error u32, 0 when the ring is mapped */
	IPC_WORKER_STORAGE_CHUNK_REF = 9, /* CHUNK whose data lies in the ring: slot, offset, length */
	/* Goodbyes, no payload: the sender is stopping in order (a reload, a stop) and closes the link
	 * next. The other end logs the close as routine; a close without one is a loss, a warning. */
	IPC_STORAGE_WORKER_BYE = 10,
	IPC_WORKER_STORAGE_BYE = 11,
};

/* On the wire in host byte order (both ends are on one host). */
struct ipc_header {
	uint16_t type;
	uint16_t version;
	uint32_t len;        /* payload bytes after the header */
	uint64_t reqid;      /* chosen by the worker, echoed in the reply */
};

struct ipc_chunk {
	uint64_t uid, seq, trans_size, total_size;
	uint8_t kind;        /* enum upload_kind */
	uint8_t last;
	char md5[PROTO_MD5_HEX + 1];
	const char *name;    /* points into the payload when decoded */
	uint16_t name_len;
	const uint8_t *data;
	uint32_t data_len;
};

struct ipc_sync {
	uint64_t uid;
	char md5[PROTO_MD5_HEX + 1];
};

struct ipc_result {
	uint32_t error;      /* enum proto_error */
	uint64_t seq, trans_size, total_size;
	uint8_t kind;        /* the upload's enum upload_kind (a fast-path open compares it, as chunks do) */
	const char *name;    /* the upload's name (sync answers need it) */
	uint16_t name_len;
	const char *message;
	uint16_t message_len;
};

/* A result with error 0 whose message starts with this asks for a chunk of an instant upload's
 * proof (seq + 1 at trans_size) instead of acknowledging what is stored; one whose message starts
 * with IPC_INSTANT_PREFIX published the file from content already stored. */
#define IPC_CHALLENGE_PREFIX "challenge: "
#define IPC_INSTANT_PREFIX "instant upload: "

enum ipc_status { IPC_NEED_MORE = 0, IPC_OK = 1, IPC_BAD = -1 };

/* Finds one whole message at p; *payload points after the header. */
enum ipc_status ipc_decode_header(const uint8_t *p, size_t len, struct ipc_header *h,
    const uint8_t **payload);

int ipc_encode_ping(struct buf *out, uint64_t reqid, int pong);
int ipc_encode_bye(struct buf *out, int from_storage);
int ipc_encode_chunk(struct buf *out, uint64_t reqid, const struct ipc_chunk *c);
/* The same in two steps, so the data can be written straight into the queue:
 * ipc_reserve_chunk makes room for a message with up to data_room bytes of data
 * (c->data is not used) and returns where the data goes; ipc_commit_chunk then
 * queues it with c->data_len bytes written there. Nothing is queued until the commit,
 * and nothing else may be written to out in between. */
uint8_t *ipc_reserve_chunk(struct buf *out, const struct ipc_chunk *c, size_t data_room);
void ipc_commit_chunk(struct buf *out, uint64_t reqid, const struct ipc_chunk *c);
/* CHUNK_REF: c's fields as CHUNK, its data_len bytes at offset in the ring's data area, in slot. */
int ipc_encode_chunk_ref(struct buf *out, uint64_t reqid, const struct ipc_chunk *c, uint32_t slot, uint64_t offset);
/* RING carries the size of the ring's data area; its answer an error (0: in use). */
int ipc_encode_ring(struct buf *out, uint64_t size);
int ipc_encode_ring_answer(struct buf *out, uint32_t error);
int ipc_encode_sync(struct buf *out, uint64_t reqid, const struct ipc_sync *s);
/* RELEASE carries the same payload as SYNC: the upload's uid and md5. */
int ipc_encode_release(struct buf *out, const struct ipc_sync *s);
int ipc_encode_result(struct buf *out, uint64_t reqid, const struct ipc_result *r);

/* Each returns 0, or -1 if the payload is short, too long or malformed. */
int ipc_decode_chunk(const uint8_t *p, size_t len, struct ipc_chunk *c);
/* c->data is left NULL: the caller finds the bytes in its view of the ring. */
int ipc_decode_chunk_ref(const uint8_t *p, size_t len, struct ipc_chunk *c, uint32_t *slot, uint64_t *offset);
int ipc_decode_ring(const uint8_t *p, size_t len, uint64_t *size);
int ipc_decode_ring_answer(const uint8_t *p, size_t len, uint32_t *error);
int ipc_decode_sync(const uint8_t *p, size_t len, struct ipc_sync *s);
int ipc_decode_result(const uint8_t *p, size_t len, struct ipc_result *r);

#endif

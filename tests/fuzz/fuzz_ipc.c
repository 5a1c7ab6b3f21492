/* fuzz_ipc.c: libFuzzer target for the worker/storage messages (src/ipc.c).
 *
 * The input is what one end of the storage socket receives. It is read:
 *   - as one message: ipc_decode_header, then each payload decoder
 *     (ipc_decode_chunk, _chunk_ref, _ring, _ring_answer, _sync, _result) whatever the type says; a decoder that
 *     accepts must have checked what the storage process relies on, and
 *     re-encoding the result must give back the input bytes exactly;
 *   - as a payload alone, through each decoder the same way;
 *   - as a stream, through a struct buf fed in two steps (split at a point
 *     derived from the data), the way uplink_on_io()/worker_link_on_io() loop:
 *     decode a header, handle, consume, stop on NEED_MORE or BAD. The messages
 *     must be those of decoding the input in one piece.
 * Messages are in host byte order (both ends share a host), so the seeds are
 * little-endian. Every violated invariant is a __builtin_trap(). */
#include "config.h"

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "ipc.h"
#include "proto.h"

#include "fuzz_check.h"


#define MAX_INPUT (1u << 20)
#define MAX_MSGS (MAX_INPUT / IPC_HEADER_LEN + 1)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_md5(const char md5[PROTO_MD5_HEX + 1])
{
	for (size_t i = 0; i < PROTO_MD5_HEX; i++)
		CHECK((md5[i] >= '0' && md5[i] <= '9') || (md5[i] >= 'a' && md5[i] <= 'f'));
	CHECK(md5[PROTO_MD5_HEX] == '\0');
}

/* Compares a re-encoded message with the original header and payload. */
static void check_encoded(const struct buf *b, uint16_t type, uint64_t reqid, const uint8_t *payload, size_t len)
{
	CHECK(buf_len(b) == IPC_HEADER_LEN + len);
	struct ipc_header h;
	const uint8_t *p;
	CHECK(ipc_decode_header(buf_head(b), buf_len(b), &h, &p) == IPC_OK);
	CHECK(h.type == type && h.version == IPC_VERSION && h.len == len && h.reqid == reqid);
	CHECK(p == buf_head(b) + IPC_HEADER_LEN);
	CHECK(len == 0 || memcmp(p, payload, len) == 0);
}

/* Runs every payload decoder over p[0..len); reqid is echoed into the re-encoding. */
static void decode_payload(const uint8_t *p, size_t len, uint64_t reqid)
{
	struct buf b = { 0 };

	struct ipc_chunk c;
	memset(&c, 0xa5, sizeof(c));
	if (ipc_decode_chunk(p, len, &c) == 0) {
		/* What storage.c's client_on_message trusts without looking again. */
		CHECK(c.kind == UPLOAD_FILE || c.kind == UPLOAD_AVATAR);
		check_md5(c.md5);
		CHECK(c.name != NULL && c.name >= (const char *)p && c.name + c.name_len <= (const char *)p + len);
		CHECK(proto_name_valid(c.name, c.name_len));
		CHECK(c.name_len >= 1 && c.name_len <= PROTO_NAME_MAX);
		CHECK(memchr(c.name, '\0', c.name_len) == NULL);
		CHECK(c.data != NULL && c.data >= p && c.data + c.data_len <= p + len);
		CHECK(c.data_len <= c.trans_size && c.trans_size <= c.total_size);
		CHECK(c.trans_size - c.data_len <= c.total_size);   /* the offset */
		volatile uint8_t sink = 0;
		for (uint32_t i = 0; i < c.data_len; i++)
			sink ^= c.data[i];
		(void)sink;
		CHECK(ipc_encode_chunk(&b, reqid, &c) == 0);
		check_encoded(&b, IPC_WORKER_STORAGE_CHUNK, reqid, p, len);
		/* And the re-encoding decodes to the same fields. */
		struct ipc_chunk c2;
		CHECK(ipc_decode_chunk(buf_head(&b) + IPC_HEADER_LEN, len, &c2) == 0);
		CHECK(c2.uid == c.uid && c2.seq == c.seq && c2.trans_size == c.trans_size &&
		    c2.total_size == c.total_size && c2.kind == c.kind && c2.last == c.last &&
		    memcmp(c2.md5, c.md5, sizeof(c.md5)) == 0 && c2.name_len == c.name_len &&
		    memcmp(c2.name, c.name, c.name_len) == 0 && c2.data_len == c.data_len &&
		    (c.data_len == 0 || memcmp(c2.data, c.data, c.data_len) == 0));
		buf_free(&b);
	}

	/* CHUNK_REF: the same checks as CHUNK, data left for the ring's view to find. */
	uint32_t slot;
	uint64_t at;
	memset(&c, 0xa5, sizeof(c));
	if (ipc_decode_chunk_ref(p, len, &c, &slot, &at) == 0) {
		CHECK(c.kind == UPLOAD_FILE || c.kind == UPLOAD_AVATAR);
		check_md5(c.md5);
		CHECK(c.name != NULL && c.name >= (const char *)p && c.name + c.name_len <= (const char *)p + len);
		CHECK(proto_name_valid(c.name, c.name_len));
		CHECK(c.data == NULL);
		CHECK(c.data_len <= c.trans_size && c.trans_size <= c.total_size);
		CHECK(ipc_encode_chunk_ref(&b, reqid, &c, slot, at) == 0);
		check_encoded(&b, IPC_WORKER_STORAGE_CHUNK_REF, reqid, p, len);
		buf_free(&b);
	}

	uint64_t ring_size;
	if (ipc_decode_ring(p, len, &ring_size) == 0) {
		CHECK(len == 8);
		CHECK(ipc_encode_ring(&b, ring_size) == 0);
		check_encoded(&b, IPC_WORKER_STORAGE_RING, 0, p, len);
		buf_free(&b);
	}
	uint32_t ring_error;
	if (ipc_decode_ring_answer(p, len, &ring_error) == 0) {
		CHECK(len == 4);
		CHECK(ipc_encode_ring_answer(&b, ring_error) == 0);
		check_encoded(&b, IPC_STORAGE_WORKER_RING, 0, p, len);
		buf_free(&b);
	}

	struct ipc_sync s;
	memset(&s, 0xa5, sizeof(s));
	if (ipc_decode_sync(p, len, &s) == 0) {
		check_md5(s.md5);
		CHECK(len == 8 + PROTO_MD5_HEX);
		CHECK(ipc_encode_sync(&b, reqid, &s) == 0);
		check_encoded(&b, IPC_WORKER_STORAGE_SYNC, reqid, p, len);
		buf_free(&b);
	}

	struct ipc_result r;
	memset(&r, 0xa5, sizeof(r));
	if (ipc_decode_result(p, len, &r) == 0) {
		CHECK(r.name_len == 0 || (r.name >= (const char *)p && r.name + r.name_len <= (const char *)p + len));
		CHECK(r.message_len == 0 ||
		    (r.message >= (const char *)p && r.message + r.message_len <= (const char *)p + len));
		/* worker.c's uplink_on_result prints the message with %.*s and copies the name. */
		volatile char sink = 0;
		for (uint16_t i = 0; i < r.name_len; i++)
			sink ^= r.name[i];
		for (uint16_t i = 0; i < r.message_len; i++)
			sink ^= r.message[i];
		(void)sink;
		CHECK(ipc_encode_result(&b, reqid, &r) == 0);
		check_encoded(&b, IPC_STORAGE_WORKER_RESULT, reqid, p, len);
		buf_free(&b);
	}
}

struct msg_rec {
	size_t at;     /* header offset in the input */
	uint32_t len;
};

static struct msg_rec msgs[MAX_MSGS];
static size_t nmsgs;
static enum ipc_status one_shot_last;
static size_t one_shot_left;

/* Checks ipc_decode_header against the header bytes. */
static enum ipc_status header_checked(const uint8_t *p, size_t len, struct ipc_header *h, const uint8_t **payload)
{
	*payload = NULL;
	enum ipc_status st = ipc_decode_header(p, len, h, payload);
	if (len < IPC_HEADER_LEN) {
		CHECK(st == IPC_NEED_MORE);
		return st;
	}
	uint16_t version;
	uint32_t plen;
	memcpy(&version, p + 2, 2);
	memcpy(&plen, p + 4, 4);
	if (version != IPC_VERSION || plen > IPC_MAX_PAYLOAD) {
		CHECK(st == IPC_BAD);
		return st;
	}
	if ((uint64_t)len < (uint64_t)IPC_HEADER_LEN + plen) {
		CHECK(st == IPC_NEED_MORE);
		return st;
	}
	CHECK(st == IPC_OK);
	CHECK(h->len == plen && h->version == IPC_VERSION);
	CHECK(memcmp(&h->type, p, 2) == 0 && memcmp(&h->reqid, p + 8, 8) == 0);
	CHECK(*payload == p + IPC_HEADER_LEN);
	return st;
}

static void run_one_shot(const uint8_t *data, size_t size)
{
	size_t pos = 0;
	nmsgs = 0;
	for (;;) {
		struct ipc_header h;
		const uint8_t *payload;
		enum ipc_status st = header_checked(data + pos, size - pos, &h, &payload);
		if (st != IPC_OK) {
			one_shot_last = st;
			one_shot_left = size - pos;
			return;
		}
		CHECK(nmsgs < MAX_MSGS);
		msgs[nmsgs++] = (struct msg_rec){ pos, h.len };
		decode_payload(payload, h.len, h.reqid);
		pos += IPC_HEADER_LEN + (size_t)h.len;
		CHECK(pos <= size);
	}
}

/* One receive: append, then the decode loop of storage_on_io(). Returns -1 once the link is dropped. */
static int receive(struct buf *in, const uint8_t *p, size_t n, const uint8_t *data, size_t *seen,
    enum ipc_status *last)
{
	if (n == 0)
		return 0;
	uint8_t *w = buf_reserve(in, n);
	CHECK(w != NULL);
	memcpy(w, p, n);
	buf_commit(in, n);
	/* As storage_process.c worker_link_on_io() and worker.c uplink_on_io() loop: buf_head()
	 * of a buffer that buf_consume() has just emptied must be safe. */
	for (;;) {
		struct ipc_header h;
		const uint8_t *payload;
		enum ipc_status st = header_checked(buf_head(in), buf_len(in), &h, &payload);
		*last = st;
		if (st == IPC_NEED_MORE)
			break;
		if (st == IPC_BAD)
			return -1;
		CHECK(*seen < nmsgs);
		CHECK(h.len == msgs[*seen].len);
		CHECK(memcmp(buf_head(in), data + msgs[*seen].at, IPC_HEADER_LEN + (size_t)h.len) == 0);
		(*seen)++;
		buf_consume(in, IPC_HEADER_LEN + (size_t)h.len);
	}
	if (buf_len(in) == 0)
		*last = IPC_NEED_MORE;
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size > MAX_INPUT)
		return 0;

	/* The input as a payload on its own. */
	decode_payload(data, size, size);

	/* As a stream of messages in one piece. */
	run_one_shot(data, size);

	/* As a stream arriving in two receives. */
	size_t split = size ? ((size_t)data[size - 1] * 251u + (size_t)data[size / 3]) % (size + 1) : 0;
	struct buf in = { 0 };
	size_t seen = 0;
	enum ipc_status last = IPC_NEED_MORE;
	if (receive(&in, data, split, data, &seen, &last) == 0)
		receive(&in, data + split, size - split, data, &seen, &last);
	CHECK(seen == nmsgs);
	CHECK(last == one_shot_last);
	if (last == IPC_NEED_MORE)
		CHECK(buf_len(&in) == one_shot_left);
	buf_free(&in);
	return 0;
}

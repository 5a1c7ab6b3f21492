/* ipc.c: encodes and strictly decodes worker/storage messages; leftover bytes are an error. */
#include "config.h"
#include "ipc.h"

#include <string.h>

struct ipc_reader {
	const uint8_t *p;
	size_t left;
	int bad;
};

static void rd_bytes(struct ipc_reader *r, void *out, size_t n)
{
	if (r->bad || r->left < n) {
		r->bad = 1;
		memset(out, 0, n);
		return;
	}
	memcpy(out, r->p, n);
	r->p += n;
	r->left -= n;
}

static uint64_t rd_u64(struct ipc_reader *r) { uint64_t v; rd_bytes(r, &v, sizeof(v)); return v; }
static uint32_t rd_u32(struct ipc_reader *r) { uint32_t v; rd_bytes(r, &v, sizeof(v)); return v; }
static uint16_t rd_u16(struct ipc_reader *r) { uint16_t v; rd_bytes(r, &v, sizeof(v)); return v; }
static uint8_t rd_u8(struct ipc_reader *r) { uint8_t v; rd_bytes(r, &v, sizeof(v)); return v; }

/* A view of n bytes in place. */
static const uint8_t *rd_view(struct ipc_reader *r, size_t n)
{
	if (r->bad || r->left < n) {
		r->bad = 1;
		return NULL;
	}
	const uint8_t *v = r->p;
	r->p += n;
	r->left -= n;
	return v;
}

static int rd_end(const struct ipc_reader *r)
{
	return r->bad || r->left != 0 ? -1 : 0;
}

enum ipc_status ipc_decode_header(const uint8_t *p, size_t len, struct ipc_header *h,
    const uint8_t **payload)
{
	if (len < IPC_HEADER_LEN)
		return IPC_NEED_MORE;
	memcpy(&h->type, p, 2);
	memcpy(&h->version, p + 2, 2);
	memcpy(&h->len, p + 4, 4);
	memcpy(&h->reqid, p + 8, 8);
	if (h->version != IPC_VERSION || h->len > IPC_MAX_PAYLOAD)
		return IPC_BAD;
	if (len - IPC_HEADER_LEN < h->len)
		return IPC_NEED_MORE;
	*payload = p + IPC_HEADER_LEN;
	return IPC_OK;
}

/* Reserves header + payload in one go; the caller fills the payload at the returned pointer. */
static uint8_t *put_header(struct buf *out, uint16_t type, uint64_t reqid, uint32_t len)
{
	uint8_t *w = buf_reserve(out, IPC_HEADER_LEN + (size_t)len);
	if (w == NULL)
		return NULL;
	uint16_t version = IPC_VERSION;
	memcpy(w, &type, 2);
	memcpy(w + 2, &version, 2);
	memcpy(w + 4, &len, 4);
	memcpy(w + 8, &reqid, 8);
	buf_commit(out, IPC_HEADER_LEN + (size_t)len);
	return w + IPC_HEADER_LEN;
}

#define IPC_MAX_NUMBER ((UINT64_C(1) << 53) - 1)

#define PUT(w, v) do { memcpy((w), &(v), sizeof(v)); (w) += sizeof(v); } while (0)
#define PUT_BYTES(w, p, n) do { if (n) memcpy((w), (p), (n)); (w) += (n); } while (0)

int ipc_encode_ping(struct buf *out, uint64_t reqid, int pong)
{
	return put_header(out, pong ? IPC_STORAGE_WORKER_PONG : IPC_WORKER_STORAGE_PING, reqid, 0)
	    ? 0 : -1;
}

int ipc_encode_bye(struct buf *out, int from_storage)
{
	return put_header(out, from_storage ? IPC_STORAGE_WORKER_BYE : IPC_WORKER_STORAGE_BYE, 0, 0) ? 0 : -1;
}

/* Payload bytes of a chunk message before its data. */
static size_t chunk_prefix_len(const struct ipc_chunk *c)
{
	return 8 * 4 + 2 + PROTO_MD5_HEX + 2 + (size_t)c->name_len + 4;
}

uint8_t *ipc_reserve_chunk(struct buf *out, const struct ipc_chunk *c, size_t data_room)
{
	size_t prefix = IPC_HEADER_LEN + chunk_prefix_len(c);
	if (data_room > IPC_MAX_PAYLOAD)
		return NULL;
	uint8_t *w = buf_reserve(out, prefix + data_room);
	return w ? w + prefix : NULL;
}

/* The fields CHUNK and CHUNK_REF share (chunk_prefix_len bytes); returns where the next goes. */
static uint8_t *put_chunk_prefix(uint8_t *w, const struct ipc_chunk *c)
{
	PUT(w, c->uid);
	PUT(w, c->seq);
	PUT(w, c->trans_size);
	PUT(w, c->total_size);
	PUT(w, c->kind);
	PUT(w, c->last);
	PUT_BYTES(w, c->md5, PROTO_MD5_HEX);
	PUT(w, c->name_len);
	PUT_BYTES(w, c->name, c->name_len);
	PUT(w, c->data_len);
	return w;
}

void ipc_commit_chunk(struct buf *out, uint64_t reqid, const struct ipc_chunk *c)
{
	uint32_t len = (uint32_t)chunk_prefix_len(c) + c->data_len;
	uint8_t *w = put_header(out, IPC_WORKER_STORAGE_CHUNK, reqid, len);   /* inside the reserved room */
	if (w == NULL)
		return;   /* cannot happen: ipc_reserve_chunk made the room */
	put_chunk_prefix(w, c);
}

int ipc_encode_chunk(struct buf *out, uint64_t reqid, const struct ipc_chunk *c)
{
	uint8_t *data = ipc_reserve_chunk(out, c, c->data_len);
	if (data == NULL)
		return -1;
	if (c->data_len)
		memcpy(data, c->data, c->data_len);
	ipc_commit_chunk(out, reqid, c);
	return 0;
}

static int rd_md5(struct ipc_reader *r, char md5[PROTO_MD5_HEX + 1])
{
	rd_bytes(r, md5, PROTO_MD5_HEX);
	md5[PROTO_MD5_HEX] = '\0';
	return strspn(md5, "0123456789abcdef") == PROTO_MD5_HEX ? 0 : -1;
}

/* The fields CHUNK and CHUNK_REF share, up to the name. */
static int rd_chunk_head(struct ipc_reader *r, struct ipc_chunk *c)
{
	c->uid = rd_u64(r);
	c->seq = rd_u64(r);
	c->trans_size = rd_u64(r);
	c->total_size = rd_u64(r);
	c->kind = rd_u8(r);
	c->last = rd_u8(r);
	if (rd_md5(r, c->md5) < 0)
		return -1;
	c->name_len = rd_u16(r);
	c->name = (const char *)rd_view(r, c->name_len);
	return 0;
}

/* Workers send only checked numbers (at most 2^53 - 1); anything else would be a bug or an attack. */
static int chunk_fields_valid(const struct ipc_chunk *c)
{
	return !(c->kind > UPLOAD_AVATAR || c->seq == 0 || c->seq > IPC_MAX_NUMBER ||
	    c->total_size > IPC_MAX_NUMBER || c->data_len > c->trans_size ||
	    c->trans_size > c->total_size || !proto_name_valid(c->name, c->name_len));
}

int ipc_decode_chunk(const uint8_t *p, size_t len, struct ipc_chunk *c)
{
	struct ipc_reader r = { p, len, 0 };
	if (rd_chunk_head(&r, c) < 0)
		return -1;
	c->data_len = rd_u32(&r);
	c->data = rd_view(&r, c->data_len);
	return rd_end(&r) < 0 || !chunk_fields_valid(c) ? -1 : 0;
}

int ipc_encode_chunk_ref(struct buf *out, uint64_t reqid, const struct ipc_chunk *c, uint32_t slot, uint64_t offset)
{
	/* The same prefix as CHUNK (its data_len is the last field of it), then where the data is. */
	uint32_t len = (uint32_t)chunk_prefix_len(c) + 4 + 8;
	uint8_t *w = put_header(out, IPC_WORKER_STORAGE_CHUNK_REF, reqid, len);
	if (w == NULL)
		return -1;
	w = put_chunk_prefix(w, c);
	PUT(w, slot);
	PUT(w, offset);
	return 0;
}

int ipc_decode_chunk_ref(const uint8_t *p, size_t len, struct ipc_chunk *c, uint32_t *slot, uint64_t *offset)
{
	struct ipc_reader r = { p, len, 0 };
	if (rd_chunk_head(&r, c) < 0)
		return -1;
	c->data_len = rd_u32(&r);
	c->data = NULL;
	*slot = rd_u32(&r);
	*offset = rd_u64(&r);
	return rd_end(&r) < 0 || !chunk_fields_valid(c) ? -1 : 0;
}

int ipc_encode_ring(struct buf *out, uint64_t size)
{
	uint8_t *w = put_header(out, IPC_WORKER_STORAGE_RING, 0, 8);
	if (w == NULL)
		return -1;
	PUT(w, size);
	return 0;
}

int ipc_encode_ring_answer(struct buf *out, uint32_t error)
{
	uint8_t *w = put_header(out, IPC_STORAGE_WORKER_RING, 0, 4);
	if (w == NULL)
		return -1;
	PUT(w, error);
	return 0;
}

int ipc_decode_ring(const uint8_t *p, size_t len, uint64_t *size)
{
	struct ipc_reader r = { p, len, 0 };
	*size = rd_u64(&r);
	return rd_end(&r);
}

int ipc_decode_ring_answer(const uint8_t *p, size_t len, uint32_t *error)
{
	struct ipc_reader r = { p, len, 0 };
	*error = rd_u32(&r);
	return rd_end(&r);
}

static int encode_upload_key(struct buf *out, uint16_t type, uint64_t reqid, const struct ipc_sync *s)
{
	uint8_t *w = put_header(out, type, reqid, 8 + PROTO_MD5_HEX);
	if (w == NULL)
		return -1;
	PUT(w, s->uid);
	PUT_BYTES(w, s->md5, PROTO_MD5_HEX);
	return 0;
}

int ipc_encode_sync(struct buf *out, uint64_t reqid, const struct ipc_sync *s)
{
	return encode_upload_key(out, IPC_WORKER_STORAGE_SYNC, reqid, s);
}

int ipc_encode_release(struct buf *out, const struct ipc_sync *s)
{
	return encode_upload_key(out, IPC_WORKER_STORAGE_RELEASE, 0, s);
}

int ipc_decode_sync(const uint8_t *p, size_t len, struct ipc_sync *s)
{
	struct ipc_reader r = { p, len, 0 };
	s->uid = rd_u64(&r);
	if (rd_md5(&r, s->md5) < 0)
		return -1;
	return rd_end(&r);
}

int ipc_encode_result(struct buf *out, uint64_t reqid, const struct ipc_result *res)
{
	uint32_t len = 4 + 8 * 3 + 1 + 2 + res->name_len + 2 + res->message_len;
	uint8_t *w = put_header(out, IPC_STORAGE_WORKER_RESULT, reqid, len);
	if (w == NULL)
		return -1;
	PUT(w, res->error);
	PUT(w, res->seq);
	PUT(w, res->trans_size);
	PUT(w, res->total_size);
	PUT(w, res->kind);
	PUT(w, res->name_len);
	PUT_BYTES(w, res->name, res->name_len);
	PUT(w, res->message_len);
	PUT_BYTES(w, res->message, res->message_len);
	return 0;
}

int ipc_decode_result(const uint8_t *p, size_t len, struct ipc_result *res)
{
	struct ipc_reader r = { p, len, 0 };
	res->error = rd_u32(&r);
	res->seq = rd_u64(&r);
	res->trans_size = rd_u64(&r);
	res->total_size = rd_u64(&r);
	res->kind = rd_u8(&r);
	res->name_len = rd_u16(&r);
	res->name = (const char *)rd_view(&r, res->name_len);
	res->message_len = rd_u16(&r);
	res->message = (const char *)rd_view(&r, res->message_len);
	return rd_end(&r) < 0 || res->kind > UPLOAD_AVATAR ? -1 : 0;
}

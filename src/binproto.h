/* binproto.h: the binary fast path's messages (ids 1041-1048): fixed big-endian headers and raw data. */
#ifndef RESOURCED_BINPROTO_H
#define RESOURCED_BINPROTO_H

#include <stddef.h>
#include <stdint.h>

#include "proto.h"

enum bin_msg_id {
	MSG_BIN_HELLO = 1041,         /* JSON {uid, token, version} → 1042 JSON */
	MSG_BIN_UPLOAD_OPEN = 1043,   /* → 1044 */
	MSG_BIN_CHUNK = 1045,         /* → 1046, one acknowledgement per chunk, in chunk order */
	MSG_BIN_DOWNLOAD = 1047,      /* → 1048, header then the range's raw bytes */
};

#define BIN_VERSION 1
#define BIN_MAX_CHUNK (1u << 20)          /* raw bytes in one 1045 */
#define BIN_WINDOW (8u << 20)             /* chunk bytes a connection may have on their way to storage */
#define BIN_MAX_INFLIGHT 64               /* chunks a connection may have on their way to storage */
#define BIN_MAX_RANGE (1u << 30)          /* bytes one 1048 carries at most */
#define BIN_VERSION_MAX 63                /* bytes of a file version (backend.h: BACKEND_VERSION_MAX - 1) */

/* Fixed parts of the bodies (before names, messages and data). */
#define BIN_OPEN_LEN 43                   /* total_size u64, flags u8, md5 32, name_len u16 */
#define BIN_OPEN_ANSWER_LEN 22            /* error u32, committed u64, total_size u64, msg_len u16 */
#define BIN_CHUNK_LEN 16                  /* offset u64, length u32, flags u32 */
#define BIN_ACK_LEN 34                    /* error u32, offset u64, length u32, committed u64, total u64, msg_len u16 */
#define BIN_DOWNLOAD_LEN 19               /* offset u64, length u64, name_len u16, version_len u8 */
#define BIN_RANGE_LEN 29                  /* error u32, size u64, offset u64, length u64, version_len u8 */

#define BIN_OPEN_RESTART 0x01             /* start the upload over at offset 0 even if the server holds part of it */
#define BIN_OPEN_AVATAR 0x02              /* the upload is the user's avatar (as 1031) */
#define BIN_OPEN_INSTANT 0x04             /* the client holds the whole file: challenge it if the server does too */
#define BIN_CHUNK_LAST 0x01               /* the chunk ends the file */

static inline uint64_t bin_get_u64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = v << 8 | p[i];
	return v;
}
static inline uint32_t bin_get_u32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint16_t bin_get_u16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint8_t *bin_put_u64(uint8_t *p, uint64_t v)
{
	for (int i = 7; i >= 0; i--, v >>= 8)
		p[i] = (uint8_t)v;
	return p + 8;
}
static inline uint8_t *bin_put_u32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24), p[1] = (uint8_t)(v >> 16), p[2] = (uint8_t)(v >> 8), p[3] = (uint8_t)v;
	return p + 4;
}
static inline uint8_t *bin_put_u16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8), p[1] = (uint8_t)v;
	return p + 2;
}

/* A checked 1043; name points into the body. */
struct bin_open {
	uint64_t total_size;
	uint8_t flags;
	char md5[PROTO_MD5_HEX + 1];   /* lower case */
	const char *name;
	size_t name_len;
};

/* A checked 1045 header; data points into the body. */
struct bin_chunk {
	uint64_t offset;
	uint32_t length;
	uint32_t flags;
	const uint8_t *data;
};

/* A checked 1047; name and version point into the body. */
struct bin_download {
	uint64_t offset;
	uint64_t length;                /* 0: to the end of the file (capped by BIN_MAX_RANGE) */
	const char *name;
	size_t name_len;
	const char *version;            /* the version the client holds bytes of; empty: any */
	size_t version_len;
};

/* Each returns ERR_OK or a code (1001, 1023, 1025) with a message naming the field. */
int bin_parse_open(const uint8_t *body, size_t len, uint64_t max_file_size, struct bin_open *out,
    char *msg, size_t msglen);
int bin_parse_chunk(const uint8_t *body, size_t len, struct bin_chunk *out, char *msg, size_t msglen);
int bin_parse_download(const uint8_t *body, size_t len, struct bin_download *out, char *msg, size_t msglen);

/* Encoders write a whole body at out and return its length; out must hold the fixed
 * part plus the message (and version): msg_len is cut to 1024 bytes. */
#define BIN_MSG_MAX 1024
size_t bin_put_open_answer(uint8_t *out, uint32_t error, uint64_t committed, uint64_t total_size,
    const char *msg);
size_t bin_put_ack(uint8_t *out, uint32_t error, uint64_t offset, uint32_t length, uint64_t committed,
    uint64_t total_size, const char *msg);
/* The 1048 header: everything before the data (length bytes of it follow in the same frame). */
size_t bin_put_range(uint8_t *out, uint32_t error, uint64_t size, uint64_t offset, uint64_t length,
    const char *version, const char *msg);

#endif

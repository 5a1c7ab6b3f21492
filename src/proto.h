/* proto.h: message ids, error codes and the checked request structs of the client protocol. */
#ifndef RESOURCED_PROTO_H
#define RESOURCED_PROTO_H

#include <stddef.h>
#include <stdint.h>

#include "json.h"

enum msg_id {
	MSG_TEST = 1001,           /* → 1002 */
	MSG_UPLOAD = 1003,         /* → 1004 */
	MSG_SYNC = 1005,           /* → 1006 */
	MSG_AVATAR = 1031,         /* → 1032 */
	MSG_DOWNLOAD = 1033,       /* → 1034 */
};

enum proto_error {
	ERR_OK = 0,
	ERR_JSON = 1001,
	ERR_TOKEN_INVALID = 1010,
	ERR_UID_INVALID = 1011,
	ERR_FILE_NOT_EXISTS = 1012,
	ERR_REDIS_SAVE = 1013,
	ERR_CREATE_PATH = 1014,
	ERR_WRITE_PERMISSION = 1015,
	ERR_READ_PERMISSION = 1016,
	ERR_SEQ_INVALID = 1017,
	ERR_OFFSET_INVALID = 1018,
	ERR_READ_FAILED = 1019,
	ERR_REDIS_READ = 1020,
	ERR_MSG_ID = 1022,
	ERR_NAME_INVALID = 1023,
	ERR_CHECKSUM = 1024,
	ERR_TOO_LARGE = 1025,
	ERR_UPLOAD_MISMATCH = 1026,
	ERR_BUSY = 1027,
	ERR_STORAGE_FULL = 1028,
	ERR_FILE_CHANGED = 1029,   /* a download's file was replaced: start again at seq 1 */
	ERR_USER_UPLOADS = 1035,      /* this uid has max_uploads_per_user uploads in progress */
	ERR_SERVER_UPLOADS = 1036,    /* the node has max_uploads uploads in progress */
	ERR_CHALLENGE = 1049,         /* binary path, instant upload: send the chunk asked for to prove possession */
};

#define PROTO_NAME_MAX 255
#define PROTO_MD5_HEX 32
#define PROTO_TOKEN_MAX 512

enum upload_kind { UPLOAD_FILE = 0, UPLOAD_AVATAR = 1 };

/* Who a request claims to be. */
struct proto_credentials {
	uint64_t uid;
	const char *token;       /* NULL when absent (anonymous) */
	size_t token_len;
	int anonymous;           /* no uid was sent and anonymous mode took it as uid 0 */
};

/* The fields of every request, as read by proto_read_request. */
enum proto_field {
	PF_DATA, PF_MD5, PF_NAME, PF_SEQ, PF_TRANS_SIZE, PF_TOTAL_SIZE, PF_LAST, PF_LAST_SEQ,
	PF_UID, PF_TOKEN, PF_CLIENT_PATH, PF_COUNT
};
struct proto_fields {
	struct json_scalar v[PF_COUNT];
};

/* A checked 1003/1031 chunk; strings point into the request body. */
struct proto_chunk {
	struct proto_credentials cred;
	char md5[PROTO_MD5_HEX + 1];   /* lower case */
	const char *name;
	size_t name_len;
	uint64_t seq, trans_size, total_size, last_seq, offset;
	int last, has_last_seq;
	const char *data_b64;          /* the base64 text, decoded only once credentials are good */
	size_t data_b64_len;
	size_t data_len;               /* what it decodes to (checked by proto_decode_chunk) */
};

struct proto_sync {
	struct proto_credentials cred;
	char md5[PROTO_MD5_HEX + 1];
};

struct proto_download {
	struct proto_credentials cred;
	const char *name;
	size_t name_len;
	const char *client_path;
	size_t client_path_len;
	uint64_t seq;
	uint64_t offset;         /* (seq - 1) * download_chunk, checked not to overflow */
};

/* What the request checks need to know of the configuration. */
struct proto_limits {
	uint64_t max_file_size;
	uint64_t download_chunk;   /* bytes per download seq; 0 counts as 1 */
	int anonymous;
};

/* Reads a request body (a flat JSON object, see json_read_flat; the body is
 * modified in place) into f. Returns ERR_OK or ERR_JSON with the reason. */
int proto_read_request(uint8_t *body, size_t len, struct proto_fields *f, char *msg, size_t msglen);
/* The same for 1001, whose data may also be an array or object (bounded, see
 * json_read_flat_raw): it is then JSON_RAW, echoed as sent. */
int proto_read_test(uint8_t *body, size_t len, struct proto_fields *f, char *msg, size_t msglen);

/* Each parser returns ERR_OK or an error code with a message naming the field.
 * proto_parse_chunk checks everything but the base64 characters: the data is
 * decoded once, after the credentials are known good, by proto_decode_chunk. */
int proto_parse_chunk(const struct proto_fields *f, int kind, const struct proto_limits *lim,
    struct proto_chunk *out, char *msg, size_t msglen);
int proto_parse_sync(const struct proto_fields *f, const struct proto_limits *lim, struct proto_sync *out,
    char *msg, size_t msglen);
/* proto_parse_download keeps name, seq and client_path in out even when it fails, each that has
 * its form (a string, a number; else NULL or 0): a 1034 error answer echoes them. */
int proto_parse_download(const struct proto_fields *f, const struct proto_limits *lim,
    struct proto_download *out, char *msg, size_t msglen);
/* 1041 (binary fast path hello): uid and token, both required (no anonymous mode). */
int proto_parse_hello(const struct proto_fields *f, const struct proto_limits *lim, struct proto_credentials *out,
    char *msg, size_t msglen);

/* Decodes the chunk's data into dst (cap at least b64_decode_room(c->data_b64_len)).
 * Returns ERR_OK, or ERR_JSON when it is not strict base64. */
int proto_decode_chunk(const struct proto_chunk *c, uint8_t *dst, size_t cap, char *msg, size_t msglen);

/* 1 when name obeys the Names rules of PROTOCOL.md. */
int proto_name_valid(const char *name, size_t len);

/* Decoded size bound for a base64 text of len bytes. */
static inline size_t proto_b64_decoded_max(size_t len) { return len / 4 * 3 + 3; }

#endif

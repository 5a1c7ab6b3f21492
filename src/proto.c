/* proto.c: checks every field of client requests before anything acts on them. */
#include "config.h"
#include "proto.h"
#include "json.h"

#include <sodium.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static int field_error(char *msg, size_t msglen, const char *field, enum json_field why, const char *expected)
{
	snprintf(msg, msglen, "%s: %s (expected %s)", field,
	    why == JSON_FIELD_MISSING ? "missing" : "bad value", expected);
	return ERR_JSON;
}

static int get_u64(yajl_val obj, const char *field, uint64_t max, uint64_t *out, char *msg, size_t msglen)
{
	enum json_field r = json_get_u64(obj, field, max, out);
	if (r != JSON_FIELD_OK)
		return field_error(msg, msglen, field, r, "a non-negative integer, as a number or a decimal string");
	return ERR_OK;
}

int proto_name_valid(const char *name, size_t len)
{
	const uint8_t *p = (const uint8_t *)name;
	if (len == 0 || len > PROTO_NAME_MAX || p[0] == '.')   /* also rules out . and .. */
		return 0;
	for (size_t i = 0; i < len;) {
		if (p[i] < 0x20 || p[i] == 0x7f || p[i] == '/' || p[i] == '\\')
			return 0;
		size_t n = json_utf8_seq(p + i, len - i);
		if (n == 0)
			return 0;
		if (n == 2 && p[i] == 0xc2 && p[i + 1] < 0xa0)   /* C1 control characters */
			return 0;
		i += n;
	}
	return 1;
}

static int parse_credentials(yajl_val obj, const struct proto_limits *lim, int uid_required,
    struct proto_credentials *c, char *msg, size_t msglen)
{
	memset(c, 0, sizeof(*c));
	if (json_member(obj, "uid") == NULL && lim->anonymous && !uid_required) {
		c->anonymous = 1;
		return ERR_OK;
	}
	int rc = get_u64(obj, "uid", JSON_MAX_SAFE_INT, &c->uid, msg, msglen);
	if (rc != ERR_OK)
		return rc;
	enum json_field r = json_get_str(obj, "token", &c->token, &c->token_len);
	if (r != JSON_FIELD_OK || c->token_len == 0 || c->token_len > PROTO_TOKEN_MAX)
		return field_error(msg, msglen, "token", r == JSON_FIELD_OK ? JSON_FIELD_BAD : r,
		    "a string of 1 to 512 bytes");
	return ERR_OK;
}

static int parse_md5(yajl_val obj, char out[PROTO_MD5_HEX + 1], char *msg, size_t msglen)
{
	const char *s;
	size_t n;
	enum json_field r = json_get_str(obj, "md5", &s, &n);
	if (r != JSON_FIELD_OK || n != PROTO_MD5_HEX || strspn(s, "0123456789abcdefABCDEF") != n)
		return field_error(msg, msglen, "md5", r == JSON_FIELD_OK ? JSON_FIELD_BAD : r, "32 hex digits");
	for (size_t i = 0; i < n; i++)
		out[i] = (char)(s[i] >= 'A' && s[i] <= 'F' ? s[i] + ('a' - 'A') : s[i]);
	out[n] = '\0';
	return ERR_OK;
}

static int parse_name(yajl_val obj, const char **name, size_t *len, char *msg, size_t msglen)
{
	enum json_field r = json_get_str(obj, "name", name, len);
	if (r != JSON_FIELD_OK)
		return field_error(msg, msglen, "name", r, "a string");
	if (!proto_name_valid(*name, *len)) {
		snprintf(msg, msglen, "name: not allowed (1 to 255 bytes of UTF-8, no / \\ or control "
		    "characters, not starting with a dot)");
		return ERR_NAME_INVALID;
	}
	return ERR_OK;
}

/* libsodium 1.0.18 decodes a byte >= 0x80 as the digit '/' instead of refusing it (found by
 * fuzz_request): such bytes are never base64, so refuse them first. */
static int ascii_only(const char *s, size_t len)
{
	unsigned char high = 0;
	for (size_t i = 0; i < len; i++)
		high |= (unsigned char)s[i];
	return (high & 0x80) == 0;
}

int proto_parse_chunk(yajl_val obj, int kind, const struct proto_limits *lim,
    uint8_t *data, size_t data_cap, struct proto_chunk *out, char *msg, size_t msglen)
{
	int rc;
	memset(out, 0, sizeof(*out));
	if ((rc = parse_md5(obj, out->md5, msg, msglen)) != ERR_OK ||
	    (rc = parse_name(obj, &out->name, &out->name_len, msg, msglen)) != ERR_OK ||
	    (rc = get_u64(obj, "seq", JSON_MAX_SAFE_INT, &out->seq, msg, msglen)) != ERR_OK ||
	    (rc = get_u64(obj, "trans_size", JSON_MAX_SAFE_INT, &out->trans_size, msg, msglen)) != ERR_OK ||
	    (rc = get_u64(obj, "total_size", JSON_MAX_SAFE_INT, &out->total_size, msg, msglen)) != ERR_OK)
		return rc;
	enum json_field r = json_get_flag(obj, "last", &out->last);
	if (r != JSON_FIELD_OK)
		return field_error(msg, msglen, "last", r, "0 or 1");
	if (json_member(obj, "last_seq") != NULL) {
		if ((rc = get_u64(obj, "last_seq", JSON_MAX_SAFE_INT, &out->last_seq, msg, msglen)) != ERR_OK)
			return rc;
		out->has_last_seq = 1;
	}
	const char *b64;
	size_t b64_len;
	r = json_get_str(obj, "data", &b64, &b64_len);
	if (r != JSON_FIELD_OK)
		return field_error(msg, msglen, "data", r, "a base64 string");
	if (out->seq == 0) {
		snprintf(msg, msglen, "seq: chunks are numbered from 1");
		return ERR_SEQ_INVALID;
	}
	if (out->total_size > lim->max_file_size) {
		snprintf(msg, msglen, "total_size: %llu is over the limit of %llu bytes",
		    (unsigned long long)out->total_size, (unsigned long long)lim->max_file_size);
		return ERR_TOO_LARGE;
	}
	if (out->trans_size > out->total_size) {
		snprintf(msg, msglen, "trans_size: larger than total_size");
		return ERR_JSON;
	}
	if (out->last && out->trans_size != out->total_size) {
		snprintf(msg, msglen, "last: set but trans_size is short of total_size");
		return ERR_JSON;
	}
	if (proto_b64_decoded_max(b64_len) > data_cap || !ascii_only(b64, b64_len) ||
	    sodium_base642bin(data, data_cap, b64, b64_len, NULL, &out->data_len, NULL,
	        sodium_base64_VARIANT_ORIGINAL) != 0) {
		snprintf(msg, msglen, "data: not standard base64 with padding");
		return ERR_JSON;
	}
	if (out->data_len > out->trans_size) {
		snprintf(msg, msglen, "data: decodes to more bytes than trans_size covers");
		return ERR_JSON;
	}
	out->offset = out->trans_size - out->data_len;
	if (out->seq == 1 && out->offset != 0) {
		snprintf(msg, msglen, "seq: chunk 1 must start at offset 0");
		return ERR_SEQ_INVALID;
	}
	return parse_credentials(obj, lim, kind == UPLOAD_AVATAR, &out->cred, msg, msglen);
}

int proto_parse_sync(yajl_val obj, const struct proto_limits *lim, struct proto_sync *out,
    char *msg, size_t msglen)
{
	int rc;
	memset(out, 0, sizeof(*out));
	if ((rc = parse_md5(obj, out->md5, msg, msglen)) != ERR_OK)
		return rc;
	return parse_credentials(obj, lim, 0, &out->cred, msg, msglen);
}

int proto_parse_download(yajl_val obj, const struct proto_limits *lim, struct proto_download *out,
    char *msg, size_t msglen)
{
	int rc;
	memset(out, 0, sizeof(*out));
	if ((rc = parse_name(obj, &out->name, &out->name_len, msg, msglen)) != ERR_OK ||
	    (rc = get_u64(obj, "seq", JSON_MAX_SAFE_INT, &out->seq, msg, msglen)) != ERR_OK)
		return rc;
	if (out->seq == 0) {
		snprintf(msg, msglen, "seq: chunks are numbered from 1");
		return ERR_SEQ_INVALID;
	}
	/* No file is larger than an off_t can say: an offset beyond it is past the end of any file,
	 * and (seq - 1) * download_chunk must never wrap around to a small offset. */
	uint64_t chunk = lim->download_chunk ? lim->download_chunk : 1;
	if (out->seq - 1 > ((uint64_t)INT64_MAX - chunk) / chunk) {
		snprintf(msg, msglen, "seq: past the end of the file");
		return ERR_OFFSET_INVALID;
	}
	out->offset = (out->seq - 1) * chunk;
	if (json_member(obj, "client_path") != NULL &&
	    json_get_str(obj, "client_path", &out->client_path, &out->client_path_len) != JSON_FIELD_OK)
		return field_error(msg, msglen, "client_path", JSON_FIELD_BAD, "a string");
	return parse_credentials(obj, lim, 0, &out->cred, msg, msglen);
}

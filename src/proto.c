/* proto.c: checks every field of client requests before anything acts on them. */
#include "config.h"
#include "proto.h"
#include "b64.h"
#include "json.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

static const char *const field_names[PF_COUNT] = {
	[PF_DATA] = "data", [PF_MD5] = "md5", [PF_NAME] = "name", [PF_SEQ] = "seq",
	[PF_TRANS_SIZE] = "trans_size", [PF_TOTAL_SIZE] = "total_size", [PF_LAST] = "last",
	[PF_LAST_SEQ] = "last_seq", [PF_UID] = "uid", [PF_TOKEN] = "token", [PF_CLIENT_PATH] = "client_path",
};

int proto_read_request(uint8_t *body, size_t len, struct proto_fields *f, char *msg, size_t msglen)
{
	return json_read_flat(body, len, field_names, PF_COUNT, f->v, msg, msglen) == 0 ? ERR_OK : ERR_JSON;
}

int proto_read_test(uint8_t *body, size_t len, struct proto_fields *f, char *msg, size_t msglen)
{
	return json_read_flat_raw(body, len, field_names, PF_COUNT, f->v, PF_DATA, msg, msglen) == 0 ? ERR_OK : ERR_JSON;
}

static int field_error(char *msg, size_t msglen, const char *field, enum json_field why, const char *expected)
{
	snprintf(msg, msglen, "%s: %s (expected %s)", field,
	    why == JSON_FIELD_MISSING ? "missing" : "bad value", expected);
	return ERR_JSON;
}

static int get_u64(const struct proto_fields *f, enum proto_field field, uint64_t max, uint64_t *out,
    char *msg, size_t msglen)
{
	enum json_field r = json_scalar_u64(&f->v[field], max, out);
	if (r != JSON_FIELD_OK)
		return field_error(msg, msglen, field_names[field], r,
		    "a non-negative integer, as a number or a decimal string");
	return ERR_OK;
}

static int present(const struct proto_fields *f, enum proto_field field)
{
	return f->v[field].kind != JSON_NONE;
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

static int parse_credentials(const struct proto_fields *f, const struct proto_limits *lim, int uid_required,
    struct proto_credentials *c, char *msg, size_t msglen)
{
	memset(c, 0, sizeof(*c));
	if (!present(f, PF_UID) && lim->anonymous && !uid_required) {
		c->anonymous = 1;
		return ERR_OK;
	}
	int rc = get_u64(f, PF_UID, JSON_MAX_SAFE_INT, &c->uid, msg, msglen);
	if (rc != ERR_OK)
		return rc;
	enum json_field r = json_scalar_str(&f->v[PF_TOKEN], &c->token, &c->token_len);
	if (r != JSON_FIELD_OK || c->token_len == 0 || c->token_len > PROTO_TOKEN_MAX)
		return field_error(msg, msglen, "token", r == JSON_FIELD_OK ? JSON_FIELD_BAD : r,
		    "a string of 1 to 512 bytes");
	return ERR_OK;
}

static int parse_md5(const struct proto_fields *f, char out[PROTO_MD5_HEX + 1], char *msg, size_t msglen)
{
	const char *s;
	size_t n;
	enum json_field r = json_scalar_str(&f->v[PF_MD5], &s, &n);
	if (r == JSON_FIELD_OK && n == PROTO_MD5_HEX) {
		for (size_t i = 0; i < n; i++) {
			char c = s[i];
			if (c >= 'A' && c <= 'F')
				c = (char)(c + ('a' - 'A'));
			else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
				break;
			out[i] = c;
			if (i + 1 == n) {
				out[n] = '\0';
				return ERR_OK;
			}
		}
	}
	out[0] = '\0';
	return field_error(msg, msglen, "md5", r == JSON_FIELD_OK ? JSON_FIELD_BAD : r, "32 hex digits");
}

static int parse_name(const struct proto_fields *f, const char **name, size_t *len, char *msg, size_t msglen)
{
	enum json_field r = json_scalar_str(&f->v[PF_NAME], name, len);
	if (r != JSON_FIELD_OK)
		return field_error(msg, msglen, "name", r, "a string");
	if (!proto_name_valid(*name, *len)) {
		snprintf(msg, msglen, "name: not allowed (1 to 255 bytes of UTF-8, no / \\ or control "
		    "characters, not starting with a dot)");
		return ERR_NAME_INVALID;
	}
	return ERR_OK;
}

static int data_error(char *msg, size_t msglen)
{
	snprintf(msg, msglen, "data: not standard base64 with padding");
	return ERR_JSON;
}

int proto_parse_chunk(const struct proto_fields *f, int kind, const struct proto_limits *lim,
    struct proto_chunk *out, char *msg, size_t msglen)
{
	int rc;
	memset(out, 0, sizeof(*out));
	if ((rc = parse_md5(f, out->md5, msg, msglen)) != ERR_OK ||
	    (rc = parse_name(f, &out->name, &out->name_len, msg, msglen)) != ERR_OK ||
	    (rc = get_u64(f, PF_SEQ, JSON_MAX_SAFE_INT, &out->seq, msg, msglen)) != ERR_OK ||
	    (rc = get_u64(f, PF_TRANS_SIZE, JSON_MAX_SAFE_INT, &out->trans_size, msg, msglen)) != ERR_OK ||
	    (rc = get_u64(f, PF_TOTAL_SIZE, JSON_MAX_SAFE_INT, &out->total_size, msg, msglen)) != ERR_OK)
		return rc;
	enum json_field r = json_scalar_flag(&f->v[PF_LAST], &out->last);
	if (r != JSON_FIELD_OK)
		return field_error(msg, msglen, "last", r, "0 or 1");
	if (present(f, PF_LAST_SEQ)) {
		if ((rc = get_u64(f, PF_LAST_SEQ, JSON_MAX_SAFE_INT, &out->last_seq, msg, msglen)) != ERR_OK)
			return rc;
		out->has_last_seq = 1;
	}
	r = json_scalar_str(&f->v[PF_DATA], &out->data_b64, &out->data_b64_len);
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
	/* The decoded length follows from the text alone (proto_decode_chunk refuses a
	 * text whose characters say otherwise), so every size check is done before any
	 * work is spent on the data. */
	const char *b64 = out->data_b64;
	size_t n = out->data_b64_len;
	if (n % 4 != 0)
		return data_error(msg, msglen);
	out->data_len = n / 4 * 3 - (n >= 1 && b64[n - 1] == '=') - (n >= 2 && b64[n - 2] == '=');
	if (out->data_len > out->trans_size) {
		snprintf(msg, msglen, "data: decodes to more bytes than trans_size covers");
		return ERR_JSON;
	}
	out->offset = out->trans_size - out->data_len;
	if (out->seq == 1 && out->offset != 0) {
		snprintf(msg, msglen, "seq: chunk 1 must start at offset 0");
		return ERR_SEQ_INVALID;
	}
	return parse_credentials(f, lim, kind == UPLOAD_AVATAR, &out->cred, msg, msglen);
}

int proto_decode_chunk(const struct proto_chunk *c, uint8_t *dst, size_t cap, char *msg, size_t msglen)
{
	size_t got;
	if (b64_decode_strict(dst, cap, c->data_b64, c->data_b64_len, &got) != 0 || got != c->data_len)
		return data_error(msg, msglen);
	return ERR_OK;
}

int proto_parse_sync(const struct proto_fields *f, const struct proto_limits *lim, struct proto_sync *out,
    char *msg, size_t msglen)
{
	int rc;
	memset(out, 0, sizeof(*out));
	if ((rc = parse_md5(f, out->md5, msg, msglen)) != ERR_OK)
		return rc;
	return parse_credentials(f, lim, 0, &out->cred, msg, msglen);
}

int proto_parse_hello(const struct proto_fields *f, const struct proto_limits *lim, struct proto_credentials *out,
    char *msg, size_t msglen)
{
	return parse_credentials(f, lim, 1, out, msg, msglen);
}

int proto_parse_download(const struct proto_fields *f, const struct proto_limits *lim,
    struct proto_download *out, char *msg, size_t msglen)
{
	int rc;
	memset(out, 0, sizeof(*out));
	/* Error answers echo seq, name and client_path too (a client matches answers to requests by
	 * them): each is kept when it has its form (a number, a string), whichever check fails. */
	(void)json_scalar_str(&f->v[PF_NAME], &out->name, &out->name_len);
	(void)json_scalar_u64(&f->v[PF_SEQ], JSON_MAX_SAFE_INT, &out->seq);
	(void)json_scalar_str(&f->v[PF_CLIENT_PATH], &out->client_path, &out->client_path_len);
	if ((rc = parse_name(f, &out->name, &out->name_len, msg, msglen)) != ERR_OK ||
	    (rc = get_u64(f, PF_SEQ, JSON_MAX_SAFE_INT, &out->seq, msg, msglen)) != ERR_OK)
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
	if (present(f, PF_CLIENT_PATH) &&
	    json_scalar_str(&f->v[PF_CLIENT_PATH], &out->client_path, &out->client_path_len) != JSON_FIELD_OK)
		return field_error(msg, msglen, "client_path", JSON_FIELD_BAD, "a string");
	return parse_credentials(f, lim, 0, &out->cred, msg, msglen);
}

/* binproto.c: reads and writes the binary fast path's message bodies; every length is checked against the body. */
#include "config.h"
#include "binproto.h"

#include <stdio.h>
#include <string.h>

static int bad(char *msg, size_t msglen, int code, const char *what)
{
	snprintf(msg, msglen, "%s", what);
	return code;
}

int bin_parse_open(const uint8_t *body, size_t len, uint64_t max_file_size, struct bin_open *out,
    char *msg, size_t msglen)
{
	memset(out, 0, sizeof(*out));
	if (len < BIN_OPEN_LEN)
		return bad(msg, msglen, ERR_JSON, "1043: body shorter than its 43-byte header");
	size_t name_len = bin_get_u16(body + 41);
	if (len != BIN_OPEN_LEN + name_len)
		return bad(msg, msglen, ERR_JSON, "1043: body length does not match name_len");
	out->total_size = bin_get_u64(body);
	out->flags = body[8];
	if (out->flags & ~(BIN_OPEN_RESTART | BIN_OPEN_AVATAR | BIN_OPEN_INSTANT))
		return bad(msg, msglen, ERR_JSON, "flags: unknown bits set");
	for (int i = 0; i < PROTO_MD5_HEX; i++) {
		char c = (char)body[9 + i];
		if (c >= 'A' && c <= 'F')
			c = (char)(c + ('a' - 'A'));
		else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
			return bad(msg, msglen, ERR_JSON, "md5: expected 32 hex digits");
		out->md5[i] = c;
	}
	out->md5[PROTO_MD5_HEX] = '\0';
	out->name = (const char *)body + BIN_OPEN_LEN;
	out->name_len = name_len;
	if (!proto_name_valid(out->name, name_len))
		return bad(msg, msglen, ERR_NAME_INVALID, "name: not a valid file name");
	if (out->total_size > max_file_size)
		return bad(msg, msglen, ERR_TOO_LARGE, "total_size: larger than max_file_size");
	return ERR_OK;
}

int bin_parse_chunk(const uint8_t *body, size_t len, struct bin_chunk *out, char *msg, size_t msglen)
{
	memset(out, 0, sizeof(*out));
	if (len < BIN_CHUNK_LEN)
		return bad(msg, msglen, ERR_JSON, "1045: body shorter than its 16-byte header");
	out->offset = bin_get_u64(body);
	out->length = bin_get_u32(body + 8);
	out->flags = bin_get_u32(body + 12);
	out->data = body + BIN_CHUNK_LEN;
	if (len - BIN_CHUNK_LEN != out->length)
		return bad(msg, msglen, ERR_JSON, "length: does not match the bytes in the frame");
	if (out->length > BIN_MAX_CHUNK)
		return bad(msg, msglen, ERR_JSON, "length: more than max_chunk");
	if (out->flags & ~(uint32_t)BIN_CHUNK_LAST)
		return bad(msg, msglen, ERR_JSON, "flags: unknown bits set");
	if (out->offset > UINT64_MAX - out->length)
		return bad(msg, msglen, ERR_JSON, "offset: too large");
	return ERR_OK;
}

int bin_parse_download(const uint8_t *body, size_t len, struct bin_download *out, char *msg, size_t msglen)
{
	memset(out, 0, sizeof(*out));
	if (len < BIN_DOWNLOAD_LEN)
		return bad(msg, msglen, ERR_JSON, "1047: body shorter than its 19-byte header");
	out->offset = bin_get_u64(body);
	out->length = bin_get_u64(body + 8);
	out->name_len = bin_get_u16(body + 16);
	out->version_len = body[18];
	if (len != BIN_DOWNLOAD_LEN + out->name_len + out->version_len)
		return bad(msg, msglen, ERR_JSON, "1047: body length does not match name_len and version_len");
	if (out->version_len > BIN_VERSION_MAX)
		return bad(msg, msglen, ERR_JSON, "version: longer than 63 bytes");
	out->name = (const char *)body + BIN_DOWNLOAD_LEN;
	out->version = out->name + out->name_len;
	if (!proto_name_valid(out->name, out->name_len))
		return bad(msg, msglen, ERR_NAME_INVALID, "name: not a valid file name");
	for (size_t i = 0; i < out->version_len; i++)
		if ((unsigned char)out->version[i] < 0x21 || (unsigned char)out->version[i] > 0x7e)
			return bad(msg, msglen, ERR_JSON, "version: not printable ASCII");
	if (out->offset > INT64_MAX)
		return bad(msg, msglen, ERR_OFFSET_INVALID, "offset: past the end of any file");
	return ERR_OK;
}

static uint8_t *put_msg(uint8_t *p, const char *msg)
{
	size_t n = msg ? strlen(msg) : 0;
	if (n > BIN_MSG_MAX)
		n = BIN_MSG_MAX;
	p = bin_put_u16(p, (uint16_t)n);
	if (n)
		memcpy(p, msg, n);
	return p + n;
}

size_t bin_put_open_answer(uint8_t *out, uint32_t error, uint64_t committed, uint64_t total_size,
    const char *msg)
{
	uint8_t *p = bin_put_u32(out, error);
	p = bin_put_u64(p, committed);
	p = bin_put_u64(p, total_size);
	return (size_t)(put_msg(p, msg) - out);
}

size_t bin_put_ack(uint8_t *out, uint32_t error, uint64_t offset, uint32_t length, uint64_t committed,
    uint64_t total_size, const char *msg)
{
	uint8_t *p = bin_put_u32(out, error);
	p = bin_put_u64(p, offset);
	p = bin_put_u32(p, length);
	p = bin_put_u64(p, committed);
	p = bin_put_u64(p, total_size);
	return (size_t)(put_msg(p, msg) - out);
}

size_t bin_put_range(uint8_t *out, uint32_t error, uint64_t size, uint64_t offset, uint64_t length,
    const char *version, const char *msg)
{
	size_t vlen = version ? strlen(version) : 0;
	if (vlen > BIN_VERSION_MAX)
		vlen = BIN_VERSION_MAX;
	uint8_t *p = bin_put_u32(out, error);
	p = bin_put_u64(p, size);
	p = bin_put_u64(p, offset);
	p = bin_put_u64(p, length);
	*p++ = (uint8_t)vlen;
	if (vlen)
		memcpy(p, version, vlen);
	p += vlen;
	return (size_t)(put_msg(p, msg) - out);
}

/* test_proto.c: unit tests of the request checks in proto.c: file name rules and the 1003/1031, 1005 and 1033 request parsers with their error codes and messages. */
#include "config.h"
#include "unit.h"

#include "b64.h"
#include "json.h"
#include "proto.h"

#include <sodium.h>
#include <stdarg.h>

#define MAX_FILE 1000000u
#define HELLO_MD5 "5d41402abc4b2a76b9719d911017c592"

/* ---- name rules ---- */

/* proto_name_valid on an exact-size heap copy, so reading past len is caught by ASan. */
static int name_valid(const char *name, size_t len)
{
	char *copy = malloc(len ? len : 1);
	ck_assert_ptr_nonnull(copy);
	memcpy(copy, name, len);
	int r = proto_name_valid(copy, len);
	free(copy);
	return r;
}

static void expect_name(const char *name, size_t len, int want)
{
	char shown[400];
	ck_assert_msg(name_valid(name, len) == want, "name \"%s\" (%zu bytes): want %s",
	    unit_printable(name, len, shown), len, want ? "valid" : "invalid");
}

START_TEST(test_name_valid)
{
	static const char *const good[] = {
		"a", "file.txt", "a.", "a..b", "a.b.c", "hello world", "-dash_under~tilde+plus=",
		"\xe6\x96\x87\xe4\xbb\xb6.txt",          /* 文件.txt */
		"caf\xc3\xa9",                           /* café */
		"\xf0\x9f\x98\x80.png",                  /* emoji, 4 bytes */
		"\xc2\xa0",                              /* U+00A0, the first after the C1 block */
		"\xef\xbf\xbd",                          /* U+FFFD */
		"\xf4\x8f\xbf\xbf",                      /* U+10FFFF */
		"\xe0\xa0\x80",                          /* U+0800, shortest 3-byte */
		"\xf0\x90\x80\x80",                      /* U+10000, shortest 4-byte */
		"\xee\x80\x80",                          /* U+E000, just past the surrogates */
		"a:b", "a*b?", "CON", " lead", "trail ",
	};
	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
		expect_name(good[i], strlen(good[i]), 1);
}
END_TEST

START_TEST(test_name_dots_and_separators)
{
	static const char *const bad[] = {
		".", "..", "...", ".hidden", ".a.txt", "./a", "a/b", "/", "/abs", "a/", "../x",
		"a\\b", "\\", "..\\x", "\\\\server\\share",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		expect_name(bad[i], strlen(bad[i]), 0);
	expect_name("", 0, 0);
}
END_TEST

START_TEST(test_name_control_chars)
{
	/* Every C0 control, DEL and every C1 control, alone and inside a name. */
	for (int c = 0; c < 0x20; c++) {
		char n[3] = { 'a', (char)c, 'b' };
		expect_name(n, 3, 0);
		expect_name(n + 1, 1, 0);
	}
	expect_name("\x7f", 1, 0);
	expect_name("a\x7f", 2, 0);
	for (int c = 0x80; c < 0xa0; c++) {
		char n[3] = { 'x', (char)0xc2, (char)c };
		expect_name(n, 3, 0);
	}
	/* A NUL inside the given length. */
	expect_name("ab\0cd", 5, 0);
	expect_name("ab\0", 3, 0);
}
END_TEST

START_TEST(test_name_length)
{
	char n[300];
	memset(n, 'a', sizeof(n));
	expect_name(n, 1, 1);
	expect_name(n, 255, 1);
	expect_name(n, 256, 0);
	expect_name(n, 299, 0);
	/* Bytes, not characters: 85 three-byte characters are 255 bytes... */
	for (int i = 0; i < 85; i++)
		memcpy(n + 3 * i, "\xe6\x96\x87", 3);
	expect_name(n, 255, 1);
	/* ...and 253 'a' + "é" + 'b' = 256 bytes. */
	memset(n, 'a', 253);
	memcpy(n + 253, "\xc3\xa9" "b", 3);
	expect_name(n, 255, 1);
	expect_name(n, 256, 0);
	/* A length that cuts a character in two. */
	expect_name(n, 254, 0);
}
END_TEST

START_TEST(test_name_invalid_utf8)
{
	static const char *const bad[] = {
		"\xff", "\xfe", "a\x80", "\x80", "\xbf",  /* never valid / lone continuation */
		"\xc3", "a\xc3", "\xe2\x82", "\xf0\x9f\x98",  /* truncated */
		"\xc3(", "\xe2(\xa1", "\xe2\x82(",         /* bad continuation */
		"\xf8\x88\x80\x80\x80", "\xfc\x84\x80\x80\x80\x80",   /* 5 and 6 byte forms */
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		expect_name(bad[i], strlen(bad[i]), 0);
}
END_TEST

START_TEST(test_name_overlong_and_surrogates)
{
	static const char *const bad[] = {
		"\xc0\xaf", "\xc0\xae", "\xc1\xbf", "\xc0\x80",        /* overlong 2-byte ('/', '.', DEL, NUL) */
		"\xe0\x80\xaf", "\xe0\x9f\xbf",                        /* overlong 3-byte */
		"\xf0\x80\x80\xaf", "\xf0\x8f\xbf\xbf",                /* overlong 4-byte */
		"\xed\xa0\x80", "\xed\xad\xbf", "\xed\xae\x80", "\xed\xbf\xbf",   /* UTF-16 surrogates */
		"\xed\xa0\xbd\xed\xb8\x80",                            /* a surrogate pair, CESU-8 */
		"\xf4\x90\x80\x80", "\xf5\x80\x80\x80", "\xf7\xbf\xbf\xbf",   /* past U+10FFFF */
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		expect_name(bad[i], strlen(bad[i]), 0);
	/* The code points next to those are fine. */
	expect_name("\xed\x9f\xbf", 3, 1);   /* U+D7FF */
	expect_name("\xc2\xa1", 2, 1);       /* U+00A1 */
}
END_TEST

/* ---- request bodies ---- */

/* The body build() made last: the fields point into it. */
static char body[8192];
static struct proto_fields fields;

/* Builds {base with overrides} and reads it into fields: overrides are key, raw
 * JSON value pairs ending with NULL; a NULL value removes the key, an unknown key
 * is added. Returns proto_read_request's answer (msg says why on failure). */
static char msg[512];
static int build(const char *const base[][2], size_t nbase, va_list ap)
{
	const char *keys[32], *vals[32];
	size_t n = 0;
	for (size_t i = 0; i < nbase; i++) {
		keys[n] = base[i][0];
		vals[n++] = base[i][1];
	}
	for (;;) {
		const char *k = va_arg(ap, const char *);
		if (k == NULL)
			break;
		const char *v = va_arg(ap, const char *);
		size_t i;
		for (i = 0; i < n && strcmp(keys[i], k) != 0; i++)
			;
		if (i == n) {
			ck_assert_uint_lt(n, 32);
			keys[n++] = k;
		}
		vals[i] = v;
	}
	size_t len = 0;
	len += (size_t)snprintf(body + len, sizeof(body) - len, "{\n");
	for (size_t i = 0; i < n; i++)
		if (vals[i] != NULL)
			len += (size_t)snprintf(body + len, sizeof(body) - len, "    \"%s\": %s,\n", keys[i], vals[i]);
	ck_assert_uint_lt(len, sizeof(body) - 4);
	if (body[len - 2] == ',')
		len -= 2;
	len += (size_t)snprintf(body + len, sizeof(body) - len, "\n}\n");
	return proto_read_request((uint8_t *)body, len, &fields, msg, sizeof(msg));
}

static const char *const chunk_base[][2] = {
	{ "md5", "\"" HELLO_MD5 "\"" },
	{ "name", "\"hello.txt\"" },
	{ "seq", "1" },
	{ "trans_size", "5" },
	{ "total_size", "5" },
	{ "last", "1" },
	{ "last_seq", "1" },
	{ "data", "\"aGVsbG8=\"" },      /* "hello" */
	{ "uid", "42" },
	{ "token", "\"tok-42\"" },
};

static uint8_t chunk_data[1024];

/* What the worker does with a chunk: read, check, and (after the credentials) decode. */
static int chunk_fields(int kind, int anonymous, size_t data_cap, struct proto_chunk *out)
{
	struct proto_limits lim = { .max_file_size = MAX_FILE, .anonymous = anonymous };
	memset(chunk_data, 0xee, sizeof(chunk_data));
	int rc = proto_parse_chunk(&fields, kind, &lim, out, msg, sizeof(msg));
	if (rc == ERR_OK)
		rc = proto_decode_chunk(out, chunk_data, data_cap, msg, sizeof(msg));
	return rc;
}

/* proto_parse_chunk and proto_decode_chunk on chunk_base with overrides. */
static int chunk_k(int kind, int anonymous, size_t data_cap, struct proto_chunk *out, ...)
{
	va_list ap;
	va_start(ap, out);
	strcpy(msg, "(unset)");
	int rc = build(chunk_base, sizeof(chunk_base) / sizeof(chunk_base[0]), ap);
	va_end(ap);
	if (rc != ERR_OK) {
		memset(out, 0, sizeof(*out));
		return rc;
	}
	return chunk_fields(kind, anonymous, data_cap, out);
}

#define chunk(out, ...) chunk_k(UPLOAD_FILE, 0, sizeof(chunk_data), out, __VA_ARGS__)

/* The message of a field error starts with the field's name. */
#define assert_msg_names(field) \
	ck_assert_msg(strncmp(msg, field ": ", strlen(field ": ")) == 0, \
	    "message \"%s\" does not start with \"%s: \"", msg, field)

START_TEST(test_chunk_ok)
{
	struct proto_chunk c;
	int rc = chunk(&c, "md5", "\"5D41402ABC4B2A76B9719D911017C592\"", NULL);
	ck_assert_msg(rc == ERR_OK, "rc %d: %s", rc, msg);
	ck_assert_str_eq(c.md5, HELLO_MD5);   /* upper case normalised to lower */
	ck_assert_uint_eq(c.name_len, 9);
	ck_assert_uint_eq(c.seq, 1);
	ck_assert_uint_eq(c.trans_size, 5);
	ck_assert_uint_eq(c.total_size, 5);
	ck_assert_uint_eq(c.offset, 0);
	ck_assert_int_eq(c.last, 1);
	ck_assert_int_eq(c.has_last_seq, 1);
	ck_assert_uint_eq(c.last_seq, 1);
	ck_assert_uint_eq(c.data_len, 5);
	ck_assert_mem_eq(chunk_data, "hello", 5);
	ck_assert_uint_eq(c.cred.uid, 42);
	ck_assert_uint_eq(c.cred.token_len, 6);
	ck_assert_int_eq(c.cred.anonymous, 0);
	/* Mixed case too. */
	rc = chunk(&c, "md5", "\"5d41402ABC4b2a76B9719d911017C592\"", NULL);
	ck_assert_msg(rc == ERR_OK, "rc %d: %s", rc, msg);
	ck_assert_str_eq(c.md5, HELLO_MD5);
}
END_TEST

START_TEST(test_chunk_strings_point_into_body)
{
	static char text[] = "{\"md5\":\"" HELLO_MD5 "\",\"name\":\"\xe6\x96\x87.txt\",\"seq\":1,"
	    "\"trans_size\":5,\"total_size\":5,\"last\":1,\"data\":\"aGVsbG8=\",\"uid\":7,\"token\":\"secret\"}";
	ck_assert_int_eq(proto_read_request((uint8_t *)text, sizeof(text) - 1, &fields, msg, sizeof(msg)), ERR_OK);
	struct proto_limits lim = { .max_file_size = MAX_FILE, .anonymous = 0 };
	struct proto_chunk c;
	ck_assert_int_eq(proto_parse_chunk(&fields, UPLOAD_FILE, &lim, &c, msg, sizeof(msg)), ERR_OK);
	/* No copies: every string is a view of the body. */
	ck_assert(c.name > text && c.name + c.name_len < text + sizeof(text));
	ck_assert(c.cred.token > text && c.cred.token + c.cred.token_len < text + sizeof(text));
	ck_assert(c.data_b64 > text && c.data_b64 + c.data_b64_len < text + sizeof(text));
	ck_assert_uint_eq(c.data_len, 5);
	ck_assert_uint_eq(c.name_len, 7);
	ck_assert_mem_eq(c.name, "\xe6\x96\x87.txt", 7);
	ck_assert_uint_eq(c.cred.token_len, 6);
	ck_assert_mem_eq(c.cred.token, "secret", 6);
	ck_assert_uint_eq(c.cred.uid, 7);
	ck_assert_int_eq(c.has_last_seq, 0);   /* last_seq is optional */
}
END_TEST

START_TEST(test_chunk_offset)
{
	struct proto_chunk c;
	/* Chunk 3 of a 20-byte file, covering bytes 10..15. */
	int rc = chunk(&c, "seq", "3", "trans_size", "15", "total_size", "20", "last", "0", "last_seq", "4", NULL);
	ck_assert_msg(rc == ERR_OK, "rc %d: %s", rc, msg);
	ck_assert_uint_eq(c.offset, 10);
	ck_assert_uint_eq(c.data_len, 5);
	ck_assert_uint_eq(c.seq, 3);
	ck_assert_int_eq(c.last, 0);
	ck_assert_uint_eq(c.last_seq, 4);
	/* The last chunk: offset 15, trans_size == total_size. */
	rc = chunk(&c, "seq", "4", "trans_size", "20", "total_size", "20", "last", "1", NULL);
	ck_assert_msg(rc == ERR_OK, "rc %d: %s", rc, msg);
	ck_assert_uint_eq(c.offset, 15);
	/* A chunk whose data fills trans_size exactly starts at 0 (a resent seq 2 here). */
	rc = chunk(&c, "seq", "2", "trans_size", "5", "total_size", "20", "last", "0", NULL);
	ck_assert_msg(rc == ERR_OK, "rc %d: %s", rc, msg);
	ck_assert_uint_eq(c.offset, 0);
}
END_TEST

START_TEST(test_chunk_numbers_as_strings)
{
	struct proto_chunk c;
	int rc = chunk(&c, "seq", "\"3\"", "trans_size", "\"3000000005\"", "total_size", "\"4000000000\"",
	    "last", "\"0\"", "last_seq", "\"1000\"", "uid", "\"42\"", NULL);
	ck_assert_int_eq(rc, ERR_TOO_LARGE);   /* over MAX_FILE, but every field was read */
	struct proto_limits lim = { .max_file_size = UINT64_C(1) << 40, .anonymous = 0 };
	static char text[] = "{\"md5\":\"" HELLO_MD5 "\",\"name\":\"big.iso\",\"seq\":\"3\",\"trans_size\":\"3000000005\","
	    "\"total_size\":\"4000000000\",\"last\":\"0\",\"last_seq\":\"1000\",\"data\":\"aGVsbG8=\","
	    "\"uid\":\"42\",\"token\":\"t\"}";
	ck_assert_int_eq(proto_read_request((uint8_t *)text, strlen(text), &fields, msg, sizeof(msg)), ERR_OK);
	rc = proto_parse_chunk(&fields, UPLOAD_FILE, &lim, &c, msg, sizeof(msg));
	ck_assert_msg(rc == ERR_OK, "rc %d: %s", rc, msg);
	ck_assert_uint_eq(c.seq, 3);
	ck_assert_uint_eq(c.trans_size, UINT64_C(3000000005));
	ck_assert_uint_eq(c.total_size, UINT64_C(4000000000));
	ck_assert_uint_eq(c.offset, UINT64_C(3000000000));
	ck_assert_uint_eq(c.last_seq, 1000);
	ck_assert_uint_eq(c.cred.uid, 42);
	ck_assert_int_eq(c.last, 0);
}
END_TEST

START_TEST(test_chunk_seq)
{
	struct proto_chunk c;
	ck_assert_int_eq(chunk(&c, "seq", "0", NULL), ERR_SEQ_INVALID);
	assert_msg_names("seq");
	ck_assert_int_eq(chunk(&c, "seq", "\"0\"", NULL), ERR_SEQ_INVALID);
	assert_msg_names("seq");
	/* seq 1 must start at offset 0: here data covers 5..10. */
	ck_assert_int_eq(chunk(&c, "seq", "1", "trans_size", "10", "total_size", "10", NULL), ERR_SEQ_INVALID);
	assert_msg_names("seq");
	ck_assert_int_eq(chunk(&c, "seq", "1", "trans_size", "6", "total_size", "10", "last", "0", NULL),
	    ERR_SEQ_INVALID);
	assert_msg_names("seq");
	/* Not a number at all is a field error. */
	ck_assert_int_eq(chunk(&c, "seq", "-1", NULL), ERR_JSON);
	assert_msg_names("seq");
	ck_assert_int_eq(chunk(&c, "seq", "1.5", NULL), ERR_JSON);
	assert_msg_names("seq");
	ck_assert_int_eq(chunk(&c, "seq", NULL, NULL), ERR_JSON);
	assert_msg_names("seq");
	unit_assert_contains(msg, "missing");
}
END_TEST

START_TEST(test_chunk_sizes)
{
	struct proto_chunk c;
	/* trans_size past total_size. */
	ck_assert_int_eq(chunk(&c, "trans_size", "6", "total_size", "5", "last", "0", NULL), ERR_JSON);
	assert_msg_names("trans_size");
	/* total_size past the limit; at the limit is fine. */
	char big[32];
	snprintf(big, sizeof(big), "%u", MAX_FILE + 1);
	ck_assert_int_eq(chunk(&c, "total_size", big, "last", "0", NULL), ERR_TOO_LARGE);
	assert_msg_names("total_size");
	snprintf(big, sizeof(big), "\"%u\"", MAX_FILE + 1);
	ck_assert_int_eq(chunk(&c, "total_size", big, "last", "0", NULL), ERR_TOO_LARGE);
	snprintf(big, sizeof(big), "%u", MAX_FILE);
	ck_assert_msg(chunk(&c, "total_size", big, "last", "0", NULL) == ERR_OK, "%s", msg);
	ck_assert_uint_eq(c.total_size, MAX_FILE);
	/* Sizes past 2^53 - 1 are field errors. */
	ck_assert_int_eq(chunk(&c, "total_size", "9007199254740992", "last", "0", NULL), ERR_JSON);
	assert_msg_names("total_size");
	ck_assert_int_eq(chunk(&c, "trans_size", "\"9007199254740992\"", NULL), ERR_JSON);
	assert_msg_names("trans_size");
	ck_assert_int_eq(chunk(&c, "trans_size", "\"5 \"", NULL), ERR_JSON);
	assert_msg_names("trans_size");
	ck_assert_int_eq(chunk(&c, "total_size", NULL, NULL), ERR_JSON);
	assert_msg_names("total_size");
	ck_assert_int_eq(chunk(&c, "trans_size", "null", NULL), ERR_JSON);
	assert_msg_names("trans_size");
	/* An empty file: one chunk with no data. */
	ck_assert_msg(chunk(&c, "trans_size", "0", "total_size", "0", "data", "\"\"", NULL) == ERR_OK, "%s", msg);
	ck_assert_uint_eq(c.data_len, 0);
	ck_assert_uint_eq(c.offset, 0);
}
END_TEST

START_TEST(test_chunk_last)
{
	struct proto_chunk c;
	/* last = 1 before the end of the file. */
	ck_assert_int_eq(chunk(&c, "total_size", "10", NULL), ERR_JSON);
	assert_msg_names("last");
	ck_assert_int_eq(chunk(&c, "total_size", "10", "last", "true", NULL), ERR_JSON);
	assert_msg_names("last");
	static const char *const bad[] = { "2", "\"yes\"", "null", "-1", "\"\"", "1.0", "1e0" };
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		ck_assert_msg(chunk(&c, "last", bad[i], NULL) == ERR_JSON, "last = %s accepted", bad[i]);
		assert_msg_names("last");
	}
	ck_assert_int_eq(chunk(&c, "last", NULL, NULL), ERR_JSON);
	assert_msg_names("last");
	ck_assert_msg(chunk(&c, "last", "true", NULL) == ERR_OK, "%s", msg);
	ck_assert_int_eq(c.last, 1);
	ck_assert_msg(chunk(&c, "last", "\"1\"", NULL) == ERR_OK, "%s", msg);
	ck_assert_int_eq(c.last, 1);
	ck_assert_int_eq(chunk(&c, "last_seq", "\"many\"", NULL), ERR_JSON);
	assert_msg_names("last_seq");
}
END_TEST

START_TEST(test_chunk_base64)
{
	static const char *const bad[] = {
		"\"aGVsbG8\"",       /* padding missing */
		"\"aGVsbG8==\"",     /* too much padding */
		"\"aGVs bG8=\"",     /* space */
		"\"aGVs\\nbG8=\"",   /* newline */
		"\"aGVsbG8=x\"",     /* after the padding */
		"\"!!!!\"",
		"\"aGV-bG8_\"",      /* URL-safe alphabet */
		"\"aGVsbG9=\"",      /* non-zero padding bits */
		"\"a\"",
		"5", "null",
		"\"aGVs\xc2\x85" "bG8=\"",   /* U+0085: libsodium 1.0.18 reads bytes >= 0x80 as '/' (fuzz_request) */
		"\"aGVsbG\xc3\xa9=\"",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		struct proto_chunk c;
		/* The sizes are checked from the text's length before the characters are decoded:
		 * a trans_size that fits any of these leaves the characters as the only fault. */
		ck_assert_msg(chunk(&c, "data", bad[i], "seq", "2", "trans_size", "9", "total_size", "9", NULL) == ERR_JSON,
		    "data = %s accepted", bad[i]);
		assert_msg_names("data");
	}
	struct proto_chunk c;
	ck_assert_int_eq(chunk(&c, "data", NULL, NULL), ERR_JSON);
	assert_msg_names("data");
	unit_assert_contains(msg, "missing");
	/* Every byte value survives decoding ("AP8A/w==" is 00 ff 00 ff; "+/" used). */
	ck_assert_msg(chunk(&c, "data", "\"AP8A/w==\"", "trans_size", "4", "total_size", "4", NULL) == ERR_OK,
	    "%s", msg);
	ck_assert_uint_eq(c.data_len, 4);
	ck_assert_mem_eq(chunk_data, "\x00\xff\x00\xff", 4);
	ck_assert_msg(chunk(&c, "data", "\"+/+/\"", "trans_size", "3", "total_size", "3", NULL) == ERR_OK,
	    "%s", msg);
	ck_assert_mem_eq(chunk_data, "\xfb\xff\xbf", 3);
}
END_TEST

START_TEST(test_chunk_data_length)
{
	struct proto_chunk c;
	/* 5 bytes of data but trans_size 3: offset would be negative. */
	ck_assert_int_eq(chunk(&c, "trans_size", "3", "total_size", "3", NULL), ERR_JSON);
	assert_msg_names("data");
	ck_assert_int_eq(chunk(&c, "seq", "2", "trans_size", "4", "total_size", "10", "last", "0", NULL), ERR_JSON);
	assert_msg_names("data");
	/* More data than the caller's buffer holds. */
	ck_assert_int_eq(chunk_k(UPLOAD_FILE, 0, 4, &c, NULL), ERR_JSON);
	assert_msg_names("data");
	/* A buffer of exactly the decoded bound is enough. */
	ck_assert_msg(chunk_k(UPLOAD_FILE, 0, proto_b64_decoded_max(8), &c, NULL) == ERR_OK, "%s", msg);
	ck_assert_uint_eq(c.data_len, 5);
}
END_TEST

START_TEST(test_chunk_md5)
{
	struct proto_chunk c;
	ck_assert_msg(chunk(&c, "md5", "\"ABCDEF0123456789abcdef0123456789\"", NULL) == ERR_OK, "%s", msg);
	ck_assert_str_eq(c.md5, "abcdef0123456789abcdef0123456789");
	static const char *const bad[] = {
		"\"5d41402abc4b2a76b9719d911017c59\"",     /* 31 */
		"\"5d41402abc4b2a76b9719d911017c5922\"",   /* 33 */
		"\"5d41402abc4b2a76b9719d911017c59g\"",    /* not hex */
		"\"5d41402abc4b2a76b9719d911017c59 \"",
		"\"\"",
		"\"0x41402abc4b2a76b9719d911017c592\"",
		"12345678901234567890123456789012",
		"null",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		ck_assert_msg(chunk(&c, "md5", bad[i], NULL) == ERR_JSON, "md5 = %s accepted", bad[i]);
		assert_msg_names("md5");
	}
	ck_assert_int_eq(chunk(&c, "md5", NULL, NULL), ERR_JSON);
	assert_msg_names("md5");
	unit_assert_contains(msg, "missing");
}
END_TEST

START_TEST(test_chunk_name)
{
	struct proto_chunk c;
	static const char *const bad[] = {
		"\".hidden\"", "\".\"", "\"..\"", "\"a/b\"", "\"a\\\\b\"", "\"a\\nb\"", "\"a\\u007fb\"", "\"\"",
		"\"a\\u0080b\"", "\"a\\u0001\"",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		ck_assert_msg(chunk(&c, "name", bad[i], NULL) == ERR_NAME_INVALID, "name = %s accepted", bad[i]);
		assert_msg_names("name");
	}
	char longname[300];
	longname[0] = '"';
	memset(longname + 1, 'n', 256);
	memcpy(longname + 257, "\"", 2);
	ck_assert_int_eq(chunk(&c, "name", longname, NULL), ERR_NAME_INVALID);
	memcpy(longname + 256, "\"", 2);   /* 255 bytes */
	ck_assert_msg(chunk(&c, "name", longname, NULL) == ERR_OK, "%s", msg);
	ck_assert_uint_eq(c.name_len, 255);
	/* Not a string: a field error. */
	ck_assert_int_eq(chunk(&c, "name", "7", NULL), ERR_JSON);
	assert_msg_names("name");
	ck_assert_int_eq(chunk(&c, "name", NULL, NULL), ERR_JSON);
	assert_msg_names("name");
	/* Escapes are decoded before the check. */
	ck_assert_msg(chunk(&c, "name", "\"caf\\u00e9.txt\"", NULL) == ERR_OK, "%s", msg);
	ck_assert_uint_eq(c.name_len, 9);
}
END_TEST

START_TEST(test_chunk_name_escaped_nul)
{
	/* "a\u0000b.txt" holds a NUL, which Names forbid: the parser keeps it (the name is
	 * not taken as "a") and the name check refuses it. */
	static char text[] = "{\"md5\":\"" HELLO_MD5 "\",\"name\":\"a\\u0000b.txt\",\"seq\":1,"
	    "\"trans_size\":5,\"total_size\":5,\"last\":1,\"data\":\"aGVsbG8=\",\"uid\":7,\"token\":\"t\"}";
	ck_assert_int_eq(proto_read_request((uint8_t *)text, sizeof(text) - 1, &fields, msg, sizeof(msg)), ERR_OK);
	struct proto_limits lim = { .max_file_size = MAX_FILE, .anonymous = 0 };
	struct proto_chunk c;
	int rc = proto_parse_chunk(&fields, UPLOAD_FILE, &lim, &c, msg, sizeof(msg));
	ck_assert_msg(rc == ERR_NAME_INVALID, "rc %d, name_len %zu", rc, c.name_len);
}
END_TEST

START_TEST(test_chunk_credentials)
{
	struct proto_chunk c;
	ck_assert_int_eq(chunk(&c, "token", NULL, NULL), ERR_JSON);
	assert_msg_names("token");
	unit_assert_contains(msg, "missing");
	ck_assert_int_eq(chunk(&c, "token", "\"\"", NULL), ERR_JSON);
	assert_msg_names("token");
	ck_assert_int_eq(chunk(&c, "token", "12345", NULL), ERR_JSON);
	assert_msg_names("token");
	ck_assert_int_eq(chunk(&c, "token", "null", NULL), ERR_JSON);
	assert_msg_names("token");
	char tok[600];
	tok[0] = '"';
	memset(tok + 1, 't', 513);
	memcpy(tok + 514, "\"", 2);
	ck_assert_int_eq(chunk(&c, "token", tok, NULL), ERR_JSON);
	assert_msg_names("token");
	memcpy(tok + 513, "\"", 2);   /* 512 bytes */
	ck_assert_msg(chunk(&c, "token", tok, NULL) == ERR_OK, "%s", msg);
	ck_assert_uint_eq(c.cred.token_len, 512);

	ck_assert_int_eq(chunk(&c, "uid", NULL, NULL), ERR_JSON);
	assert_msg_names("uid");
	unit_assert_contains(msg, "missing");
	ck_assert_int_eq(chunk(&c, "uid", "-5", NULL), ERR_JSON);
	assert_msg_names("uid");
	ck_assert_int_eq(chunk(&c, "uid", "\"4x\"", NULL), ERR_JSON);
	assert_msg_names("uid");
	ck_assert_int_eq(chunk(&c, "uid", "9007199254740992", NULL), ERR_JSON);
	assert_msg_names("uid");
	ck_assert_msg(chunk(&c, "uid", "\"9007199254740991\"", NULL) == ERR_OK, "%s", msg);
	ck_assert_uint_eq(c.cred.uid, JSON_MAX_SAFE_INT);
	ck_assert_msg(chunk(&c, "uid", "0", NULL) == ERR_OK, "%s", msg);
	ck_assert_uint_eq(c.cred.uid, 0);
	ck_assert_int_eq(c.cred.anonymous, 0);
}
END_TEST

START_TEST(test_chunk_anonymous)
{
	struct proto_chunk c;
	/* Anonymous mode: no uid (and no token) is uid 0, anonymous. */
	int rc = chunk_k(UPLOAD_FILE, 1, sizeof(chunk_data), &c, "uid", NULL, "token", NULL, NULL);
	ck_assert_msg(rc == ERR_OK, "rc %d: %s", rc, msg);
	ck_assert_int_eq(c.cred.anonymous, 1);
	ck_assert_uint_eq(c.cred.uid, 0);
	ck_assert_ptr_null(c.cred.token);
	ck_assert_uint_eq(c.data_len, 5);
	/* A uid that is sent is still checked, with its token. */
	rc = chunk_k(UPLOAD_FILE, 1, sizeof(chunk_data), &c, "token", NULL, NULL);
	ck_assert_int_eq(rc, ERR_JSON);
	assert_msg_names("token");
	rc = chunk_k(UPLOAD_FILE, 1, sizeof(chunk_data), &c, NULL);
	ck_assert_msg(rc == ERR_OK, "rc %d: %s", rc, msg);
	ck_assert_int_eq(c.cred.anonymous, 0);
	ck_assert_uint_eq(c.cred.uid, 42);
	/* Off (the default): no uid is an error. */
	rc = chunk_k(UPLOAD_FILE, 0, sizeof(chunk_data), &c, "uid", NULL, "token", NULL, NULL);
	ck_assert_int_eq(rc, ERR_JSON);
	assert_msg_names("uid");
	/* Avatars always need uid and token, even in anonymous mode. */
	rc = chunk_k(UPLOAD_AVATAR, 1, sizeof(chunk_data), &c, "uid", NULL, "token", NULL, NULL);
	ck_assert_int_eq(rc, ERR_JSON);
	assert_msg_names("uid");
	rc = chunk_k(UPLOAD_AVATAR, 1, sizeof(chunk_data), &c, "token", NULL, NULL);
	ck_assert_int_eq(rc, ERR_JSON);
	assert_msg_names("token");
	rc = chunk_k(UPLOAD_AVATAR, 1, sizeof(chunk_data), &c, NULL);
	ck_assert_msg(rc == ERR_OK, "rc %d: %s", rc, msg);
	ck_assert_int_eq(c.cred.anonymous, 0);
	ck_assert_uint_eq(c.cred.uid, 42);
}
END_TEST

START_TEST(test_chunk_field_checks_first)
{
	/* Field errors come before seq/size checks, and name the first bad field. */
	struct proto_chunk c;
	ck_assert_int_eq(chunk(&c, "seq", "0", "md5", "\"xyz\"", NULL), ERR_JSON);
	assert_msg_names("md5");
	ck_assert_int_eq(chunk(&c, "seq", "0", "last", "7", NULL), ERR_JSON);
	assert_msg_names("last");
	/* Credentials are checked last: a bad chunk is reported as such without them. */
	ck_assert_int_eq(chunk(&c, "seq", "0", "uid", NULL, "token", NULL, NULL), ERR_SEQ_INVALID);
	/* Extra unknown fields are ignored (as long as they are scalars: see test_request_flat). */
	ck_assert_msg(chunk(&c, "extra", "\"x\"", "another", "null", NULL) == ERR_OK, "%s", msg);
}
END_TEST

/* ---- the request reader ---- */

static int read_text(const char *text)
{
	static char copy[8192];
	size_t n = strlen(text);
	ck_assert_uint_lt(n, sizeof(copy));
	memcpy(copy, text, n);
	return proto_read_request((uint8_t *)copy, n, &fields, msg, sizeof(msg));
}

/* Reads text with json_elide_min at elide_min into f; the body is a heap copy of exactly its
 * length (ASan sees a read past it), kept for the caller to compare pointers and free. Returns proto_read_request's or proto_read_test's code. */
static int read_with(const char *text, size_t n, size_t elide_min, int as_test, struct proto_fields *f,
    uint8_t **keep)
{
	uint8_t *copy = malloc(n ? n : 1);
	ck_assert_ptr_nonnull(copy);
	memcpy(copy, text, n);
	json_elide_min = elide_min;
	int rc = as_test ? proto_read_test(copy, n, f, msg, sizeof(msg)) : proto_read_request(copy, n, f, msg, sizeof(msg));
	json_elide_min = 512;
	*keep = copy;
	return rc;
}

START_TEST(test_request_plain_strings_past_yajl)
{
	/* json_read_flat hands the longest plain string to the callbacks from the body instead of
	 * through yajl's lexer: every body must read the same either way, field by field. */
	char b64[2000];
	for (size_t i = 0; i < sizeof(b64) - 1; i++)
		b64[i] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[i % 64];
	b64[sizeof(b64) - 1] = '\0';
	static const char *const forms[] = {
		"{\"data\":\"@\",\"name\":\"a\\u00e9\\n\",\"seq\":3}",           /* escapes after it */
		"{\"name\":\"a\\\"b\",\"data\":\"@\"}",                           /* escapes before it */
		"{\n    \"data\": \"@\",\n    \"md5\": \"5d41402abc4b2a76b9719d911017c592\"\n}\n",
		"{\"@\":1,\"seq\":2}",                                            /* a key */
		"{\"data\":\"@\",\"data\":\"second\"}",                           /* the first value counts */
		"{\"data\":\"second\",\"data\":\"@\"}",
		"{\"data\":\"@\"",                                                /* not closed */
		"{\"data\":\"@\" \"x\"}",                                         /* no comma */
		"{\"data\" \"@\"}",                                               /* no colon */
		"[\"@\"]",
		"\"@\"",
		"{\"data\":\"@\",\"x\":[1]}",                                    /* refused later */
		"{\"data\":\"@\",\"seq\":1} {}",                                  /* trailing value */
		"{\"data\":\"a\\/@\"}",                                           /* an escape inside */
		"{\"data\":\"@\x01\"}",                                          /* a control character */
		"{\"data\":\"@\xc3\xa9\"}",                                      /* UTF-8 inside */
		"{\"data\":\"@\",\"name\":\"@\"}",                               /* two long ones */
		"{\"data\":{\"k\":\"@\",\"e\":\"\\u0041\"},\"seq\":1}",          /* 1001's raw data */
	};
	for (size_t f = 0; f < sizeof(forms) / sizeof(forms[0]); f++) {
		for (size_t len = 0; len < sizeof(b64); len = len ? len * 3 : 1) {
			char text[2 * sizeof(b64) + 200];
			char one[sizeof(b64)];
			memcpy(one, b64, len);
			one[len] = '\0';
			size_t n = 0;   /* the form with each @ replaced by one */
			for (const char *c = forms[f]; *c; c++) {
				size_t add = *c == '@' ? len : 1;
				ck_assert_uint_lt(n + add, sizeof(text));
				memcpy(text + n, *c == '@' ? one : c, add);
				n += add;
			}
			for (int as_test = 0; as_test < 2; as_test++) {
				struct proto_fields yajl_read, past_read;
				uint8_t *a, *b;
				char yajl_msg[sizeof(msg)];
				int want = read_with(text, n, SIZE_MAX, as_test, &yajl_read, &a);
				snprintf(yajl_msg, sizeof(yajl_msg), "%s", msg);
				int got = read_with(text, n, 1, as_test, &past_read, &b);
				ck_assert_msg(got == want, "form %zu len %zu: %d (%s) against yajl's %d (%s)", f, len, got, msg,
				    want, yajl_msg);
				for (int k = 0; want == ERR_OK && k < PF_COUNT; k++) {
					const struct json_scalar *x = &yajl_read.v[k], *y = &past_read.v[k];
					ck_assert_msg(x->kind == y->kind && x->len == y->len &&
					    (x->len == 0 || memcmp(x->s, y->s, x->len) == 0) &&
					    (x->s == NULL) == (y->s == NULL) && (x->s == NULL || x->s - (const char *)a == y->s - (const char *)b),
					    "form %zu len %zu field %d differs", f, len, k);
				}
				free(a);
				free(b);
			}
		}
	}
}
END_TEST

START_TEST(test_request_flat)
{
	/* Arrays and objects are refused wherever they are, known field or not. */
	static const char *const bad[] = {
		"{\"data\":[]}", "{\"data\":[0,0,0]}", "{\"data\":{}}", "{\"extra\":{\"x\":1}}",
		"{\"name\":\"a\",\"extra\":[\"b\"]}", "[1,2,3]", "[]", "{\"a\":[[[[[[[[]]]]]]]]}",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		ck_assert_msg(read_text(bad[i]) == ERR_JSON, "%s accepted", bad[i]);
		unit_assert_contains(msg, "flat");
	}
	/* Bodies that are not one object. */
	static const char *const not_object[] = { "42", "\"x\"", "true", "null", "", "  ", "{} {}", "{\"a\":1} x", "{" };
	for (size_t i = 0; i < sizeof(not_object) / sizeof(not_object[0]); i++)
		ck_assert_msg(read_text(not_object[i]) == ERR_JSON, "%s accepted", not_object[i]);
	ck_assert_int_eq(read_text("{}"), ERR_OK);
	ck_assert_int_eq(fields.v[PF_DATA].kind, JSON_NONE);
	/* At most JSON_MAX_MEMBERS fields. */
	char text[4096];
	size_t n = 0;
	text[n++] = '{';
	for (int i = 0; i < JSON_MAX_MEMBERS; i++)
		n += (size_t)sprintf(text + n, "%s\"k%d\":%d", i ? "," : "", i, i);
	strcpy(text + n, "}");
	ck_assert_msg(read_text(text) == ERR_OK, "%s", msg);
	strcpy(text + n, ",\"one_more\":1}");
	ck_assert_int_eq(read_text(text), ERR_JSON);
	unit_assert_contains(msg, "fields");
	/* A repeated key: the first value counts (as the tree reader did). */
	ck_assert_int_eq(read_text("{\"seq\":1,\"seq\":2}"), ERR_OK);
	ck_assert_int_eq(fields.v[PF_SEQ].kind, JSON_NUMBER);
	ck_assert_mem_eq(fields.v[PF_SEQ].s, "1", 1);
}
END_TEST

START_TEST(test_request_escapes_decoded_in_place)
{
	/* Escaped strings are decoded over their own text; later strings stay intact. */
	ck_assert_int_eq(read_text("{\"name\":\"a\\u00e9\\n\\\"b\",\"n\\u0061me\":\"dup\","
	    "\"token\":\"t\\/k\",\"data\":\"QUJD\"}"), ERR_OK);
	ck_assert_uint_eq(fields.v[PF_NAME].len, 6);
	ck_assert_mem_eq(fields.v[PF_NAME].s, "a\xc3\xa9\n\"b", 6);
	ck_assert_uint_eq(fields.v[PF_TOKEN].len, 3);
	ck_assert_mem_eq(fields.v[PF_TOKEN].s, "t/k", 3);
	ck_assert_mem_eq(fields.v[PF_DATA].s, "QUJD", 4);
	/* \u0000 decodes to a NUL inside the counted string: the name check refuses it. */
	ck_assert_int_eq(read_text("{\"name\":\"a\\u0000b\"}"), ERR_OK);
	ck_assert_uint_eq(fields.v[PF_NAME].len, 3);
	ck_assert(!proto_name_valid(fields.v[PF_NAME].s, fields.v[PF_NAME].len));
	/* Raw NUL bytes, invalid UTF-8 and comments are refused as before. */
	ck_assert_int_eq(proto_read_request((uint8_t[]){ '{', '"', 'a', '"', ':', '"', 0, '"', '}' }, 9, &fields,
	    msg, sizeof(msg)), ERR_JSON);
	ck_assert_int_eq(read_text("{\"a\":\"\xff\"}"), ERR_JSON);
	ck_assert_int_eq(read_text("{\"a\":/* x */1}"), ERR_JSON);
	ck_assert_int_eq(read_text("{\"a\":\"\\ud800\"}"), ERR_JSON);
}
END_TEST

START_TEST(test_request_1001_raw_data)
{
	/* 1001's data may be an array or object: handed out as the text sent, undecoded. */
	static const char *const echoed[] = {
		"[1,2.5,null,true,\"x\"]", "{\"nested\":[1,{\"a\":\"\\u0000\\n\"}]}", "[]", "{}",
		"[ 1 ,\n  2 ]",
	};
	static char copy[8192];
	for (size_t i = 0; i < sizeof(echoed) / sizeof(echoed[0]); i++) {
		int n = snprintf(copy, sizeof(copy), "{\"data\":%s,\"x\":\"\\n\"}", echoed[i]);
		ck_assert_msg(proto_read_test((uint8_t *)copy, (size_t)n, &fields, msg, sizeof(msg)) == ERR_OK, "%s: %s",
		    echoed[i], msg);
		ck_assert_int_eq(fields.v[PF_DATA].kind, JSON_RAW);
		ck_assert_uint_eq(fields.v[PF_DATA].len, strlen(echoed[i]));
		ck_assert_mem_eq(fields.v[PF_DATA].s, echoed[i], strlen(echoed[i]));
	}
	/* Other requests still refuse the same bodies. */
	int n = snprintf(copy, sizeof(copy), "{\"data\":[1]}");
	ck_assert_int_eq(proto_read_request((uint8_t *)copy, (size_t)n, &fields, msg, sizeof(msg)), ERR_JSON);
	/* Nesting elsewhere, too deep, or too many values is refused. */
	static const char *const refused[] = {
		"{\"data\":1,\"other\":[1]}", "{\"other\":{}}",
		"{\"data\":[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]}",   /* 17 levels with the object */
	};
	for (size_t i = 0; i < sizeof(refused) / sizeof(refused[0]); i++) {
		n = snprintf(copy, sizeof(copy), "%s", refused[i]);
		ck_assert_msg(proto_read_test((uint8_t *)copy, (size_t)n, &fields, msg, sizeof(msg)) == ERR_JSON,
		    "%s accepted", refused[i]);
	}
	n = snprintf(copy, sizeof(copy), "{\"data\":[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]}");   /* 16 levels */
	ck_assert_msg(proto_read_test((uint8_t *)copy, (size_t)n, &fields, msg, sizeof(msg)) == ERR_OK, "%s", msg);
	size_t k = (size_t)sprintf(copy, "{\"data\":[");
	for (int i = 0; i < JSON_MAX_RAW_VALUES - 1; i++)
		k += (size_t)sprintf(copy + k, "%s0", i ? "," : "");
	strcpy(copy + k, "]}");
	ck_assert_msg(proto_read_test((uint8_t *)copy, k + 2, &fields, msg, sizeof(msg)) == ERR_OK, "%s", msg);
	strcpy(copy + k, ",0]}");
	ck_assert_int_eq(proto_read_test((uint8_t *)copy, k + 4, &fields, msg, sizeof(msg)), ERR_JSON);
	unit_assert_contains(msg, "values");
}
END_TEST

/* ---- strict base64 ---- */

static int b64_ok(const char *text, uint8_t *out, size_t *out_len)
{
	size_t n = strlen(text);
	uint8_t *copy = malloc(n ? n : 1);   /* exact size: ASan sees reads past the end */
	ck_assert_ptr_nonnull(copy);
	memcpy(copy, text, n);
	int r = b64_decode_strict(out, b64_decode_room(n), (const char *)copy, n, out_len);
	free(copy);
	return r == 0;
}

START_TEST(test_b64_edges)
{
	uint8_t out[64];
	size_t n;
	ck_assert(b64_ok("", out, &n) && n == 0);
	ck_assert(b64_ok("QQ==", out, &n) && n == 1 && out[0] == 'A');
	ck_assert(b64_ok("QUI=", out, &n) && n == 2 && memcmp(out, "AB", 2) == 0);
	ck_assert(b64_ok("QUJD", out, &n) && n == 3 && memcmp(out, "ABC", 3) == 0);
	ck_assert(b64_ok("AP8A/w==", out, &n) && n == 4 && memcmp(out, "\x00\xff\x00\xff", 4) == 0);
	static const char *const bad[] = {
		"Q", "QQ", "QQ=", "QUJ", "QUJDQ",                 /* lengths that are not a multiple of 4 */
		"QQ", "QUI", "QUJDQQ",                            /* padding missing */
		"Q===", "====", "QQ==QQ==", "QQ=A", "Q=Q=", "=QUJ", "QUJD====",   /* padding misplaced or extra */
		"QR==", "QUJ=", "AB==", "QUK=",                   /* unused bits not zero */
		"QU D", "QUJD\n", " QUJ", "QU\tD", "QUJ\r",       /* whitespace */
		"QU-D", "QU_D", "QU!D", "QU.D", "QU\x7f" "D",     /* outside the alphabet */
		"QU\x80" "D", "QU\xc3\xa9", "\xff\xff\xff\xff",  /* bytes >= 0x80 */
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		char shown[400];
		ck_assert_msg(!b64_ok(bad[i], out, &n), "\"%s\" accepted", unit_printable(bad[i], strlen(bad[i]), shown));
	}
	/* A buffer under b64_decode_room is refused before anything is written. */
	ck_assert_int_eq(b64_decode_strict(out, 2, "QUJD", 4, &n), -1);
}
END_TEST

START_TEST(test_b64_same_verdicts_as_libsodium)
{
	/* The decoder this replaces on the data path: every mutation of a valid text must
	 * get the same verdict and, when accepted, the same bytes (bytes >= 0x80 aside,
	 * which libsodium wrongly accepted and proto.c refused before calling it). */
	ck_assert_int_ge(sodium_init(), 0);
	static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/= \n-_!";
	uint8_t raw[48], a[80], b[80];
	char text[80];
	for (int round = 0; round < 20000; round++) {
		size_t len = (size_t)randombytes_uniform(sizeof(raw));
		randombytes_buf(raw, len);
		size_t tlen = b64_encode(text, raw, len);
		ck_assert_uint_eq(tlen, b64_encoded_len(len));
		int mutations = (int)randombytes_uniform(3);
		for (int m = 0; m < mutations && tlen > 0; m++) {
			uint32_t what = randombytes_uniform(3), at = randombytes_uniform((uint32_t)tlen);
			if (what == 0)
				text[at] = alphabet[randombytes_uniform(sizeof(alphabet) - 1)];
			else if (what == 1)
				tlen--;                       /* drop the last character */
			else if (tlen + 1 < sizeof(text))
				text[tlen++] = alphabet[randombytes_uniform(sizeof(alphabet) - 1)];
		}
		size_t na = 0, nb = 0;
		int ours = b64_decode_strict(a, sizeof(a), text, tlen, &na) == 0;
		int theirs = sodium_base642bin(b, sizeof(b), text, tlen, NULL, &nb, NULL,
		    sodium_base64_VARIANT_ORIGINAL) == 0;
		char shown[400];
		ck_assert_msg(ours == theirs, "\"%s\": strict %d, libsodium %d", unit_printable(text, tlen, shown), ours, theirs);
		if (ours)
			ck_assert(na == nb && memcmp(a, b, na) == 0);
	}
}
END_TEST

/* ---- 1005 sync ---- */

static const char *const sync_base[][2] = {
	{ "md5", "\"" HELLO_MD5 "\"" },
	{ "uid", "42" },
	{ "token", "\"tok-42\"" },
};

static int sync_k(int anonymous, struct proto_sync *out, ...)
{
	va_list ap;
	va_start(ap, out);
	strcpy(msg, "(unset)");
	int rc = build(sync_base, sizeof(sync_base) / sizeof(sync_base[0]), ap);
	va_end(ap);
	struct proto_limits lim = { .max_file_size = MAX_FILE, .anonymous = anonymous };
	if (rc != ERR_OK)
		return rc;
	return proto_parse_sync(&fields, &lim, out, msg, sizeof(msg));
}

START_TEST(test_sync)
{
	struct proto_sync s;
	ck_assert_msg(sync_k(0, &s, NULL) == ERR_OK, "%s", msg);
	ck_assert_str_eq(s.md5, HELLO_MD5);
	ck_assert_uint_eq(s.cred.uid, 42);
	ck_assert_uint_eq(s.cred.token_len, 6);
	ck_assert_msg(sync_k(0, &s, "md5", "\"5D41402ABC4B2A76B9719D911017C592\"", "uid", "\"42\"", NULL) == ERR_OK,
	    "%s", msg);
	ck_assert_str_eq(s.md5, HELLO_MD5);
	ck_assert_uint_eq(s.cred.uid, 42);
	ck_assert_int_eq(sync_k(0, &s, "md5", NULL, NULL), ERR_JSON);
	assert_msg_names("md5");
	ck_assert_int_eq(sync_k(0, &s, "md5", "\"abc\"", NULL), ERR_JSON);
	assert_msg_names("md5");
	ck_assert_int_eq(sync_k(0, &s, "token", NULL, NULL), ERR_JSON);
	assert_msg_names("token");
	ck_assert_int_eq(sync_k(0, &s, "uid", NULL, NULL), ERR_JSON);
	assert_msg_names("uid");
	ck_assert_int_eq(sync_k(0, &s, "uid", "true", NULL), ERR_JSON);
	assert_msg_names("uid");
}
END_TEST

START_TEST(test_sync_anonymous)
{
	struct proto_sync s;
	ck_assert_msg(sync_k(1, &s, "uid", NULL, "token", NULL, NULL) == ERR_OK, "%s", msg);
	ck_assert_int_eq(s.cred.anonymous, 1);
	ck_assert_uint_eq(s.cred.uid, 0);
	ck_assert_str_eq(s.md5, HELLO_MD5);
	ck_assert_int_eq(sync_k(0, &s, "uid", NULL, "token", NULL, NULL), ERR_JSON);
	assert_msg_names("uid");
	ck_assert_int_eq(sync_k(1, &s, "token", NULL, NULL), ERR_JSON);
	assert_msg_names("token");
}
END_TEST

/* ---- 1033 download ---- */

static const char *const download_base[][2] = {
	{ "name", "\"hello.txt\"" },
	{ "seq", "1" },
	{ "uid", "42" },
	{ "token", "\"tok-42\"" },
	{ "client_path", "\"C:/Users/me/Downloads/hello.txt\"" },
	{ "trans_size", "0" },
	{ "total_size", "5" },
};

static char dl_name[300], dl_client_path[300];

static int download_k(int anonymous, struct proto_download *out, ...)
{
	va_list ap;
	va_start(ap, out);
	strcpy(msg, "(unset)");
	int rc = build(download_base, sizeof(download_base) / sizeof(download_base[0]), ap);
	va_end(ap);
	struct proto_limits lim = { .max_file_size = MAX_FILE, .download_chunk = 32768, .anonymous = anonymous };
	if (rc != ERR_OK)
		return rc;
	rc = proto_parse_download(&fields, &lim, out, msg, sizeof(msg));
	/* Copy the strings out before the next body replaces them (kept on errors too: echoed). */
	dl_name[0] = dl_client_path[0] = '\0';
	if (out->name != NULL) {
		ck_assert_uint_lt(out->name_len, sizeof(dl_name));
		memcpy(dl_name, out->name, out->name_len);
		dl_name[out->name_len] = '\0';
	}
	if (out->client_path != NULL) {
		ck_assert_uint_lt(out->client_path_len, sizeof(dl_client_path));
		memcpy(dl_client_path, out->client_path, out->client_path_len);
		dl_client_path[out->client_path_len] = '\0';
	}
	return rc;
}

START_TEST(test_download)
{
	struct proto_download d;
	ck_assert_msg(download_k(0, &d, NULL) == ERR_OK, "%s", msg);
	ck_assert_str_eq(dl_name, "hello.txt");
	ck_assert_uint_eq(d.name_len, 9);
	ck_assert_uint_eq(d.seq, 1);
	ck_assert_uint_eq(d.cred.uid, 42);
	ck_assert_uint_eq(d.cred.token_len, 6);
	ck_assert_ptr_nonnull(d.client_path);
	ck_assert_str_eq(dl_client_path, "C:/Users/me/Downloads/hello.txt");
	ck_assert_uint_eq(d.client_path_len, strlen("C:/Users/me/Downloads/hello.txt"));
	/* seq as a string, a later chunk. */
	ck_assert_msg(download_k(0, &d, "seq", "\"12\"", NULL) == ERR_OK, "%s", msg);
	ck_assert_uint_eq(d.seq, 12);
	/* trans_size and total_size are ignored, whatever they hold. */
	ck_assert_msg(download_k(0, &d, "trans_size", "\"junk\"", "total_size", "true", NULL) == ERR_OK, "%s", msg);
	ck_assert_msg(download_k(0, &d, "trans_size", NULL, "total_size", NULL, NULL) == ERR_OK, "%s", msg);
}
END_TEST

START_TEST(test_download_client_path_optional)
{
	struct proto_download d;
	ck_assert_msg(download_k(0, &d, "client_path", NULL, NULL) == ERR_OK, "%s", msg);
	ck_assert_ptr_null(d.client_path);
	ck_assert_uint_eq(d.client_path_len, 0);
	ck_assert_msg(download_k(0, &d, "client_path", "\"\"", NULL) == ERR_OK, "%s", msg);
	ck_assert_ptr_nonnull(d.client_path);
	ck_assert_uint_eq(d.client_path_len, 0);
	/* Any string is echoed, slashes and all; only the type is checked. */
	ck_assert_msg(download_k(0, &d, "client_path", "\"/home/u/../x\\\\y\"", NULL) == ERR_OK, "%s", msg);
	ck_assert_str_eq(dl_client_path, "/home/u/../x\\y");
	ck_assert_int_eq(download_k(0, &d, "client_path", "42", NULL), ERR_JSON);
	assert_msg_names("client_path");
	ck_assert_int_eq(download_k(0, &d, "client_path", "null", NULL), ERR_JSON);
	assert_msg_names("client_path");
}
END_TEST

START_TEST(test_download_errors)
{
	struct proto_download d;
	ck_assert_int_eq(download_k(0, &d, "seq", "0", NULL), ERR_SEQ_INVALID);
	assert_msg_names("seq");
	ck_assert_int_eq(download_k(0, &d, "seq", "\"0\"", NULL), ERR_SEQ_INVALID);
	assert_msg_names("seq");
	ck_assert_int_eq(download_k(0, &d, "seq", NULL, NULL), ERR_JSON);
	assert_msg_names("seq");
	ck_assert_int_eq(download_k(0, &d, "seq", "\"1a\"", NULL), ERR_JSON);
	assert_msg_names("seq");
	ck_assert_int_eq(download_k(0, &d, "seq", "9007199254740992", NULL), ERR_JSON);
	assert_msg_names("seq");
	ck_assert_int_eq(download_k(0, &d, "name", "\"../etc/passwd\"", NULL), ERR_NAME_INVALID);
	assert_msg_names("name");
	ck_assert_int_eq(download_k(0, &d, "name", "\"a/b\"", NULL), ERR_NAME_INVALID);
	ck_assert_int_eq(download_k(0, &d, "name", NULL, NULL), ERR_JSON);
	assert_msg_names("name");
	ck_assert_int_eq(download_k(0, &d, "token", NULL, NULL), ERR_JSON);
	assert_msg_names("token");
	ck_assert_int_eq(download_k(0, &d, "uid", NULL, NULL), ERR_JSON);
	assert_msg_names("uid");
}
END_TEST

/* A 1034 error answer echoes seq, name and client_path: the parser keeps each that has its form,
 * whichever check fails, and nothing of a field that does not. */
START_TEST(test_download_errors_keep_echoed_fields)
{
	struct proto_download d;
	static const char path[] = "C:/Users/me/Downloads/hello.txt";
	/* Credentials fail last: everything was read. */
	ck_assert_int_eq(download_k(0, &d, "token", NULL, "seq", "7", NULL), ERR_JSON);
	ck_assert_str_eq(dl_name, "hello.txt");
	ck_assert_uint_eq(d.seq, 7);
	ck_assert_str_eq(dl_client_path, path);
	/* A seq past the end of any file (checked before client_path). */
	ck_assert_int_eq(download_k(0, &d, "seq", "9007199254740991", NULL), ERR_OFFSET_INVALID);
	ck_assert_uint_eq(d.seq, UINT64_C(9007199254740991));
	ck_assert_str_eq(dl_name, "hello.txt");
	ck_assert_str_eq(dl_client_path, path);
	/* seq 0 is echoed as sent. */
	ck_assert_int_eq(download_k(0, &d, "seq", "\"0\"", NULL), ERR_SEQ_INVALID);
	ck_assert_uint_eq(d.seq, 0);
	ck_assert_str_eq(dl_client_path, path);
	/* A name §5 refuses is still the request's name; seq and client_path come along. */
	ck_assert_int_eq(download_k(0, &d, "name", "\"a/b\"", "seq", "3", NULL), ERR_NAME_INVALID);
	ck_assert_str_eq(dl_name, "a/b");
	ck_assert_uint_eq(d.seq, 3);
	ck_assert_str_eq(dl_client_path, path);
	/* Fields of the wrong form are left out (NULL, 0), the others kept. */
	ck_assert_int_eq(download_k(0, &d, "name", "42", "seq", "5", NULL), ERR_JSON);
	ck_assert_ptr_null(d.name);
	ck_assert_uint_eq(d.name_len, 0);
	ck_assert_uint_eq(d.seq, 5);
	ck_assert_str_eq(dl_client_path, path);
	ck_assert_int_eq(download_k(0, &d, "seq", "\"1a\"", NULL), ERR_JSON);
	ck_assert_uint_eq(d.seq, 0);
	ck_assert_str_eq(dl_name, "hello.txt");
	ck_assert_int_eq(download_k(0, &d, "client_path", "42", "seq", "2", NULL), ERR_JSON);
	ck_assert_ptr_null(d.client_path);
	ck_assert_uint_eq(d.client_path_len, 0);
	ck_assert_uint_eq(d.seq, 2);
	ck_assert_str_eq(dl_name, "hello.txt");
}
END_TEST

/* (seq - 1) * download_chunk must never wrap around: 2^49 + 1 once read chunk 1 again. */
START_TEST(test_download_seq_overflow)
{
	struct proto_download d;
	static const struct { const char *seq; int want; uint64_t offset; } cases[] = {
		{ "1", ERR_OK, 0 },
		{ "2", ERR_OK, 32768 },
		{ "2147483648", ERR_OK, (UINT64_C(1) << 31) * 32768 - 32768 },
		{ "4294967296", ERR_OK, (UINT64_C(1) << 32) * 32768 - 32768 },
		{ "281474976710655", ERR_OK, (UINT64_C(1) << 48) * 32768 - 2 * 32768 },   /* 2^48 - 1 */
		{ "281474976710656", ERR_OFFSET_INVALID, 0 },                               /* 2^48: offset 2^63 - 2^15 */
		{ "562949953421313", ERR_OFFSET_INVALID, 0 },                               /* 2^49 + 1: wrapped to 0 */
		{ "562949953421314", ERR_OFFSET_INVALID, 0 },                               /* 2^49 + 2: wrapped to 1 chunk */
		{ "9007199254740991", ERR_OFFSET_INVALID, 0 },                              /* 2^53 - 1 */
		{ "9007199254740992", ERR_JSON, 0 },                                        /* 2^53 */
		{ "9223372036854775808", ERR_JSON, 0 },                                     /* 2^63 */
		{ "18446744073709551615", ERR_JSON, 0 },                                    /* 2^64 - 1 */
		{ "18446744073709551616", ERR_JSON, 0 },                                    /* 2^64 */
		{ "-1", ERR_JSON, 0 },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		for (int as_string = 0; as_string < 2; as_string++) {
			char v[64];
			snprintf(v, sizeof(v), as_string ? "\"%s\"" : "%s", cases[i].seq);
			int rc = download_k(0, &d, "seq", v, NULL);
			ck_assert_msg(rc == cases[i].want, "seq %s: got %d, want %d (%s)", v, rc, cases[i].want, msg);
			if (rc == ERR_OK)
				ck_assert_uint_eq(d.offset, cases[i].offset);
			else
				assert_msg_names("seq");
		}
	}
}
END_TEST

static Suite *proto_suite(void)
{
	Suite *s = suite_create("proto");
	TCase *tc = tcase_create("names");
	tcase_add_test(tc, test_name_valid);
	tcase_add_test(tc, test_name_dots_and_separators);
	tcase_add_test(tc, test_name_control_chars);
	tcase_add_test(tc, test_name_length);
	tcase_add_test(tc, test_name_invalid_utf8);
	tcase_add_test(tc, test_name_overlong_and_surrogates);
	suite_add_tcase(s, tc);
	tc = tcase_create("chunk");
	tcase_add_test(tc, test_chunk_ok);
	tcase_add_test(tc, test_chunk_strings_point_into_body);
	tcase_add_test(tc, test_chunk_offset);
	tcase_add_test(tc, test_chunk_numbers_as_strings);
	tcase_add_test(tc, test_chunk_seq);
	tcase_add_test(tc, test_chunk_sizes);
	tcase_add_test(tc, test_chunk_last);
	tcase_add_test(tc, test_chunk_base64);
	tcase_add_test(tc, test_chunk_data_length);
	tcase_add_test(tc, test_chunk_md5);
	tcase_add_test(tc, test_chunk_name);
	tcase_add_test(tc, test_chunk_name_escaped_nul);
	tcase_add_test(tc, test_chunk_credentials);
	tcase_add_test(tc, test_chunk_anonymous);
	tcase_add_test(tc, test_chunk_field_checks_first);
	suite_add_tcase(s, tc);
	tc = tcase_create("request");
	tcase_add_test(tc, test_request_flat);
	tcase_add_test(tc, test_request_plain_strings_past_yajl);
	tcase_add_test(tc, test_request_escapes_decoded_in_place);
	tcase_add_test(tc, test_request_1001_raw_data);
	suite_add_tcase(s, tc);
	tc = tcase_create("base64");
	tcase_add_test(tc, test_b64_edges);
	tcase_add_test(tc, test_b64_same_verdicts_as_libsodium);
	suite_add_tcase(s, tc);
	tc = tcase_create("sync");
	tcase_add_test(tc, test_sync);
	tcase_add_test(tc, test_sync_anonymous);
	suite_add_tcase(s, tc);
	tc = tcase_create("download");
	tcase_add_test(tc, test_download);
	tcase_add_test(tc, test_download_client_path_optional);
	tcase_add_test(tc, test_download_errors);
	tcase_add_test(tc, test_download_errors_keep_echoed_fields);
	tcase_add_test(tc, test_download_seq_overflow);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return unit_run(proto_suite());
}

/* test_binproto.c: unit tests of the binary fast path's body codec (binproto.c): layouts, byte order and every length check. */
#include "config.h"
#include "unit.h"

#include "binproto.h"

static const char MD5[] = "781E5E245D69B566979B86E28D23F2C7";

/* A 1043 body for name with total_size and flags; returns its length. */
static size_t make_open(uint8_t *out, uint64_t total, uint8_t flags, const char *md5, const char *name)
{
	uint8_t *p = bin_put_u64(out, total);
	*p++ = flags;
	memcpy(p, md5, PROTO_MD5_HEX);
	p = bin_put_u16(p + PROTO_MD5_HEX, (uint16_t)strlen(name));
	memcpy(p, name, strlen(name));
	return BIN_OPEN_LEN + strlen(name);
}

START_TEST(test_integers_big_endian)
{
	uint8_t b[8];
	bin_put_u64(b, 0x0102030405060708ull);
	ck_assert_uint_eq(b[0], 1);
	ck_assert_uint_eq(b[7], 8);
	ck_assert_uint_eq(bin_get_u64(b), 0x0102030405060708ull);
	bin_put_u32(b, 0xa1b2c3d4u);
	ck_assert_uint_eq(b[0], 0xa1);
	ck_assert_uint_eq(bin_get_u32(b), 0xa1b2c3d4u);
	bin_put_u16(b, 0x1234);
	ck_assert_uint_eq(b[0], 0x12);
	ck_assert_uint_eq(bin_get_u16(b), 0x1234);
}
END_TEST

START_TEST(test_open_good)
{
	uint8_t body[BIN_OPEN_LEN + 32];
	char msg[160];
	struct bin_open o;
	size_t n = make_open(body, 12345, BIN_OPEN_RESTART, MD5, "digits.txt");
	ck_assert_int_eq(bin_parse_open(body, n, 1u << 30, &o, msg, sizeof(msg)), ERR_OK);
	ck_assert_uint_eq(o.total_size, 12345);
	ck_assert_uint_eq(o.flags, BIN_OPEN_RESTART);
	ck_assert_str_eq(o.md5, "781e5e245d69b566979b86e28d23f2c7");   /* lower-cased */
	ck_assert_uint_eq(o.name_len, 10);
	ck_assert_int_eq(memcmp(o.name, "digits.txt", 10), 0);
}
END_TEST

START_TEST(test_open_refusals)
{
	uint8_t body[BIN_OPEN_LEN + 32];
	char msg[160];
	struct bin_open o;
	size_t n = make_open(body, 10, 0, MD5, "a.bin");
	ck_assert_int_eq(bin_parse_open(body, BIN_OPEN_LEN - 1, 1000, &o, msg, sizeof(msg)), ERR_JSON);
	ck_assert_int_eq(bin_parse_open(body, n - 1, 1000, &o, msg, sizeof(msg)), ERR_JSON);   /* name cut */
	unit_assert_contains(msg, "name_len");
	ck_assert_int_eq(bin_parse_open(body, n + 1, 1000, &o, msg, sizeof(msg)), ERR_JSON);   /* trailing byte */
	n = make_open(body, 10, 0x80, MD5, "a.bin");
	ck_assert_int_eq(bin_parse_open(body, n, 1000, &o, msg, sizeof(msg)), ERR_JSON);
	unit_assert_contains(msg, "flags");
	n = make_open(body, 10, 0x08, MD5, "a.bin");   /* the first bit past INSTANT */
	ck_assert_int_eq(bin_parse_open(body, n, 1000, &o, msg, sizeof(msg)), ERR_JSON);
	n = make_open(body, 10, BIN_OPEN_INSTANT | BIN_OPEN_RESTART, MD5, "a.bin");
	ck_assert_int_eq(bin_parse_open(body, n, 1000, &o, msg, sizeof(msg)), ERR_OK);
	ck_assert_uint_eq(o.flags, BIN_OPEN_INSTANT | BIN_OPEN_RESTART);
	n = make_open(body, 10, 0, "781e5e245d69b566979b86e28d23f2cZ", "a.bin");
	ck_assert_int_eq(bin_parse_open(body, n, 1000, &o, msg, sizeof(msg)), ERR_JSON);
	unit_assert_contains(msg, "md5");
	n = make_open(body, 10, 0, MD5, ".hidden");
	ck_assert_int_eq(bin_parse_open(body, n, 1000, &o, msg, sizeof(msg)), ERR_NAME_INVALID);
	n = make_open(body, 10, 0, MD5, "a/b");
	ck_assert_int_eq(bin_parse_open(body, n, 1000, &o, msg, sizeof(msg)), ERR_NAME_INVALID);
	n = make_open(body, 1001, 0, MD5, "a.bin");
	ck_assert_int_eq(bin_parse_open(body, n, 1000, &o, msg, sizeof(msg)), ERR_TOO_LARGE);
}
END_TEST

START_TEST(test_chunk)
{
	uint8_t body[BIN_CHUNK_LEN + 8];
	char msg[160];
	struct bin_chunk c;
	uint8_t *p = bin_put_u64(body, 1u << 20);
	p = bin_put_u32(p, 5);
	bin_put_u32(p, BIN_CHUNK_LAST);
	memcpy(body + BIN_CHUNK_LEN, "hello", 5);
	ck_assert_int_eq(bin_parse_chunk(body, BIN_CHUNK_LEN + 5, &c, msg, sizeof(msg)), ERR_OK);
	ck_assert_uint_eq(c.offset, 1u << 20);
	ck_assert_uint_eq(c.length, 5);
	ck_assert_uint_eq(c.flags, BIN_CHUNK_LAST);
	ck_assert_int_eq(memcmp(c.data, "hello", 5), 0);
	/* The length field must match the bytes in the frame, both ways. */
	ck_assert_int_eq(bin_parse_chunk(body, BIN_CHUNK_LEN + 4, &c, msg, sizeof(msg)), ERR_JSON);
	unit_assert_contains(msg, "length");
	ck_assert_int_eq(bin_parse_chunk(body, BIN_CHUNK_LEN + 6, &c, msg, sizeof(msg)), ERR_JSON);
	ck_assert_int_eq(bin_parse_chunk(body, BIN_CHUNK_LEN - 1, &c, msg, sizeof(msg)), ERR_JSON);
	bin_put_u32(body + 12, 2);
	ck_assert_int_eq(bin_parse_chunk(body, BIN_CHUNK_LEN + 5, &c, msg, sizeof(msg)), ERR_JSON);
	unit_assert_contains(msg, "flags");
	/* An offset whose end would wrap around. */
	bin_put_u32(body + 12, 0);
	bin_put_u64(body, UINT64_MAX - 2);
	ck_assert_int_eq(bin_parse_chunk(body, BIN_CHUNK_LEN + 5, &c, msg, sizeof(msg)), ERR_JSON);
}
END_TEST

START_TEST(test_chunk_too_long)
{
	static uint8_t body[BIN_CHUNK_LEN + BIN_MAX_CHUNK + 1];
	char msg[160];
	struct bin_chunk c;
	bin_put_u32(body + 8, BIN_MAX_CHUNK + 1);
	ck_assert_int_eq(bin_parse_chunk(body, sizeof(body), &c, msg, sizeof(msg)), ERR_JSON);
	bin_put_u32(body + 8, BIN_MAX_CHUNK);
	ck_assert_int_eq(bin_parse_chunk(body, sizeof(body) - 1, &c, msg, sizeof(msg)), ERR_OK);
}
END_TEST

static size_t make_download(uint8_t *out, uint64_t off, uint64_t len, const char *name, const char *version)
{
	uint8_t *p = bin_put_u64(out, off);
	p = bin_put_u64(p, len);
	p = bin_put_u16(p, (uint16_t)strlen(name));
	*p++ = (uint8_t)strlen(version);
	memcpy(p, name, strlen(name));
	memcpy(p + strlen(name), version, strlen(version));
	return BIN_DOWNLOAD_LEN + strlen(name) + strlen(version);
}

START_TEST(test_download)
{
	uint8_t body[BIN_DOWNLOAD_LEN + 400];
	char msg[160];
	struct bin_download d;
	size_t n = make_download(body, 7, 0, "f.bin", "1a.2b");
	ck_assert_int_eq(bin_parse_download(body, n, &d, msg, sizeof(msg)), ERR_OK);
	ck_assert_uint_eq(d.offset, 7);
	ck_assert_uint_eq(d.length, 0);
	ck_assert_uint_eq(d.name_len, 5);
	ck_assert_uint_eq(d.version_len, 5);
	ck_assert_int_eq(memcmp(d.version, "1a.2b", 5), 0);
	ck_assert_int_eq(bin_parse_download(body, n - 1, &d, msg, sizeof(msg)), ERR_JSON);
	ck_assert_int_eq(bin_parse_download(body, BIN_DOWNLOAD_LEN - 1, &d, msg, sizeof(msg)), ERR_JSON);
	n = make_download(body, 7, 0, "f.bin", "a b");
	ck_assert_int_eq(bin_parse_download(body, n, &d, msg, sizeof(msg)), ERR_JSON);
	n = make_download(body, 7, 0, "..", "");
	ck_assert_int_eq(bin_parse_download(body, n, &d, msg, sizeof(msg)), ERR_NAME_INVALID);
	char longv[80];
	memset(longv, 'v', 64);
	longv[64] = '\0';
	n = make_download(body, 7, 0, "f.bin", longv);
	ck_assert_int_eq(bin_parse_download(body, n, &d, msg, sizeof(msg)), ERR_JSON);
	n = make_download(body, (uint64_t)INT64_MAX + 1, 0, "f.bin", "");
	ck_assert_int_eq(bin_parse_download(body, n, &d, msg, sizeof(msg)), ERR_OFFSET_INVALID);
}
END_TEST

START_TEST(test_answers)
{
	uint8_t out[BIN_RANGE_LEN + BIN_VERSION_MAX + 2 + BIN_MSG_MAX];
	size_t n = bin_put_ack(out, 1018, 10, 20, 5, 100, "offset: expected 5");
	ck_assert_uint_eq(n, BIN_ACK_LEN + strlen("offset: expected 5"));
	ck_assert_uint_eq(bin_get_u32(out), 1018);
	ck_assert_uint_eq(bin_get_u64(out + 4), 10);
	ck_assert_uint_eq(bin_get_u32(out + 12), 20);
	ck_assert_uint_eq(bin_get_u64(out + 16), 5);
	ck_assert_uint_eq(bin_get_u64(out + 24), 100);
	ck_assert_uint_eq(bin_get_u16(out + 32), strlen("offset: expected 5"));
	n = bin_put_open_answer(out, 0, 65536, 100, NULL);
	ck_assert_uint_eq(n, BIN_OPEN_ANSWER_LEN);
	ck_assert_uint_eq(bin_get_u64(out + 4), 65536);
	n = bin_put_range(out, 0, 1000, 10, 990, "ver", NULL);
	ck_assert_uint_eq(n, BIN_RANGE_LEN + 3 + 2);
	ck_assert_uint_eq(bin_get_u64(out + 20), 990);
	ck_assert_uint_eq(out[28], 3);
	ck_assert_int_eq(memcmp(out + 29, "ver", 3), 0);
	ck_assert_uint_eq(bin_get_u16(out + 32), 0);
	/* A message longer than BIN_MSG_MAX is cut, never overflows. */
	char big[BIN_MSG_MAX + 100];
	memset(big, 'm', sizeof(big) - 1);
	big[sizeof(big) - 1] = '\0';
	n = bin_put_open_answer(out, 1027, 0, 0, big);
	ck_assert_uint_eq(n, BIN_OPEN_ANSWER_LEN + BIN_MSG_MAX);
}
END_TEST

static Suite *binproto_suite(void)
{
	Suite *s = suite_create("binproto");
	TCase *tc = tcase_create("binproto");
	tcase_add_test(tc, test_integers_big_endian);
	tcase_add_test(tc, test_open_good);
	tcase_add_test(tc, test_open_refusals);
	tcase_add_test(tc, test_chunk);
	tcase_add_test(tc, test_chunk_too_long);
	tcase_add_test(tc, test_download);
	tcase_add_test(tc, test_answers);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return unit_run(binproto_suite());
}

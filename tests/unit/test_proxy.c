/* test_proxy.c: unit tests of the PROXY protocol v1/v2 header parser (src/proxy.c). */
#include "config.h"
#include "proxy.h"
#include "unit.h"

static const uint8_t sig[12] = { 0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a };

static enum proxy_status parse_text(const char *s, size_t *used, struct proxy_result *r)
{
	return proxy_parse((const uint8_t *)s, strlen(s), used, r);
}

START_TEST(test_v1_tcp4)
{
	const char *h = "PROXY TCP4 10.1.2.3 10.0.0.1 4444 9090\r\n";
	char buf[128];
	snprintf(buf, sizeof(buf), "%s\x03\xe9", h);
	size_t used = 0;
	struct proxy_result r;
	ck_assert_int_eq(parse_text(buf, &used, &r), PROXY_OK);
	ck_assert_uint_eq(used, strlen(h));
	ck_assert_int_eq(r.has_address, 1);
	ck_assert_str_eq(r.address, "10.1.2.3:4444");
}
END_TEST

START_TEST(test_v1_tcp6_and_unknown)
{
	size_t used;
	struct proxy_result r;
	ck_assert_int_eq(parse_text("PROXY TCP6 2001:db8::1 ::1 1 2\r\n", &used, &r), PROXY_OK);
	ck_assert_str_eq(r.address, "[2001:db8::1]:1");
	ck_assert_int_eq(parse_text("PROXY UNKNOWN\r\n", &used, &r), PROXY_OK);
	ck_assert_int_eq(r.has_address, 0);
}
END_TEST

START_TEST(test_v1_partial_then_bad)
{
	size_t used;
	struct proxy_result r;
	ck_assert_int_eq(parse_text("PRO", &used, &r), PROXY_NEED_MORE);
	ck_assert_int_eq(parse_text("PROXY TCP4 1.2.3.4", &used, &r), PROXY_NEED_MORE);
	ck_assert_int_eq(parse_text("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", &used, &r), PROXY_BAD);     /* no CR */
	ck_assert_int_eq(parse_text("PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", &used, &r), PROXY_BAD);     /* bad address */
	ck_assert_int_eq(parse_text("PROXY TCP4 1.2.3.4 5.6.7.8 70000 2\r\n", &used, &r), PROXY_BAD);
	ck_assert_int_eq(parse_text("PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", &used, &r), PROXY_BAD);
	ck_assert_int_eq(parse_text("PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", &used, &r), PROXY_BAD);
	ck_assert_int_eq(parse_text("GET / HTTP/1.0\r\n", &used, &r), PROXY_BAD);
	char longline[200];
	memset(longline, 'A', sizeof(longline));
	memcpy(longline, "PROXY ", 6);
	ck_assert_int_eq(proxy_parse((uint8_t *)longline, sizeof(longline), &used, &r), PROXY_BAD);
}
END_TEST

static size_t v2_header(uint8_t *out, uint8_t ver_cmd, uint8_t fam, const uint8_t *addr, uint16_t addr_len)
{
	memcpy(out, sig, 12);
	out[12] = ver_cmd;
	out[13] = fam;
	out[14] = (uint8_t)(addr_len >> 8);
	out[15] = (uint8_t)addr_len;
	memcpy(out + 16, addr, addr_len);
	return 16u + addr_len;
}

START_TEST(test_v2_tcp4_split)
{
	uint8_t addr[12] = { 192, 0, 2, 7, 10, 0, 0, 1, 0x15, 0xb3, 0x23, 0x82 };
	uint8_t h[64];
	size_t n = v2_header(h, 0x21, 0x11, addr, sizeof(addr));
	size_t used;
	struct proxy_result r;
	for (size_t k = 1; k < n; k++)
		ck_assert_int_eq(proxy_parse(h, k, &used, &r), PROXY_NEED_MORE);
	ck_assert_int_eq(proxy_parse(h, n, &used, &r), PROXY_OK);
	ck_assert_uint_eq(used, n);
	ck_assert_str_eq(r.address, "192.0.2.7:5555");
}
END_TEST

START_TEST(test_v2_tcp6_local_and_bad)
{
	uint8_t addr[36] = { 0x20, 0x01, 0x0d, 0xb8 };
	addr[15] = 1;
	addr[32] = 0x00;
	addr[33] = 0x50;
	uint8_t h[80];
	size_t used;
	struct proxy_result r;
	size_t n = v2_header(h, 0x21, 0x21, addr, sizeof(addr));
	ck_assert_int_eq(proxy_parse(h, n, &used, &r), PROXY_OK);
	ck_assert_str_eq(r.address, "[2001:db8::1]:80");
	n = v2_header(h, 0x20, 0x00, addr, 0);   /* LOCAL */
	ck_assert_int_eq(proxy_parse(h, n, &used, &r), PROXY_OK);
	ck_assert_int_eq(r.has_address, 0);
	n = v2_header(h, 0x31, 0x11, addr, 12);  /* version 3 */
	ck_assert_int_eq(proxy_parse(h, n, &used, &r), PROXY_BAD);
	n = v2_header(h, 0x21, 0x11, addr, 8);   /* address block too short for TCP4 */
	ck_assert_int_eq(proxy_parse(h, n, &used, &r), PROXY_BAD);
	n = v2_header(h, 0x21, 0x12, addr, 12);  /* UDP */
	ck_assert_int_eq(proxy_parse(h, n, &used, &r), PROXY_BAD);
}
END_TEST

static Suite *proxy_suite(void)
{
	Suite *s = suite_create("proxy");
	TCase *tc = tcase_create("v1");
	tcase_add_test(tc, test_v1_tcp4);
	tcase_add_test(tc, test_v1_tcp6_and_unknown);
	tcase_add_test(tc, test_v1_partial_then_bad);
	suite_add_tcase(s, tc);
	tc = tcase_create("v2");
	tcase_add_test(tc, test_v2_tcp4_split);
	tcase_add_test(tc, test_v2_tcp6_local_and_bad);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return unit_run(proxy_suite());
}

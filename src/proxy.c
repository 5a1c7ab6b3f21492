/* proxy.c: strict parsing of PROXY protocol v1 and v2 headers (HAProxy's specification). */
#include "config.h"
#include "proxy.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const uint8_t v2_signature[12] = { 0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a };

static int parse_port(const char *s, unsigned *port)
{
	size_t n = strlen(s);
	if (n == 0 || n > 5 || strspn(s, "0123456789") != n || (n > 1 && s[0] == '0'))
		return -1;
	unsigned long v = strtoul(s, NULL, 10);
	if (v > 65535)
		return -1;
	*port = (unsigned)v;
	return 0;
}

static enum proxy_status parse_v1(const uint8_t *p, size_t len, size_t *consumed, struct proxy_result *out)
{
	const uint8_t *end = memchr(p, '\n', len < PROXY_V1_MAX ? len : PROXY_V1_MAX);
	if (end == NULL)
		return len >= PROXY_V1_MAX ? PROXY_BAD : PROXY_NEED_MORE;
	size_t linelen = (size_t)(end - p) + 1;
	if (linelen < 8 || p[linelen - 2] != '\r')
		return PROXY_BAD;
	char line[PROXY_V1_MAX + 1];
	memcpy(line, p, linelen - 2);
	line[linelen - 2] = '\0';
	char *fields[7];
	int n = 0;
	char *save = NULL;
	for (char *tok = strtok_r(line, " ", &save); tok && n < 7; tok = strtok_r(NULL, " ", &save))
		fields[n++] = tok;
	if (n < 2 || strcmp(fields[0], "PROXY") != 0)
		return PROXY_BAD;
	*consumed = linelen;
	if (strcmp(fields[1], "UNKNOWN") == 0) {
		out->has_address = 0;
		return PROXY_OK;
	}
	int family = strcmp(fields[1], "TCP4") == 0 ? AF_INET : strcmp(fields[1], "TCP6") == 0 ? AF_INET6 : 0;
	unsigned sport, dport;
	uint8_t addr[16];
	if (family == 0 || n != 6 || inet_pton(family, fields[2], addr) != 1 ||
	    inet_pton(family, fields[3], addr) != 1 || parse_port(fields[4], &sport) < 0 ||
	    parse_port(fields[5], &dport) < 0)
		return PROXY_BAD;
	out->has_address = 1;
	snprintf(out->address, sizeof(out->address), family == AF_INET ? "%s:%u" : "[%s]:%u", fields[2], sport);
	return PROXY_OK;
}

static enum proxy_status parse_v2(const uint8_t *p, size_t len, size_t *consumed, struct proxy_result *out)
{
	if (len < 16)
		return PROXY_NEED_MORE;
	uint8_t ver_cmd = p[12], fam = p[13];
	size_t addr_len = (size_t)p[14] << 8 | p[15];
	if ((ver_cmd & 0xf0) != 0x20 || (ver_cmd & 0x0f) > 1)
		return PROXY_BAD;
	if (len < 16 + addr_len)
		return PROXY_NEED_MORE;
	*consumed = 16 + addr_len;
	out->has_address = 0;
	if ((ver_cmd & 0x0f) == 0)   /* LOCAL: a health check by the balancer itself */
		return PROXY_OK;
	char text[INET6_ADDRSTRLEN];
	const uint8_t *a = p + 16;
	switch (fam) {
	case 0x11:   /* TCP over IPv4 */
		if (addr_len < 12)
			return PROXY_BAD;
		inet_ntop(AF_INET, a, text, sizeof(text));
		snprintf(out->address, sizeof(out->address), "%s:%u", text, (unsigned)(a[8] << 8 | a[9]));
		out->has_address = 1;
		return PROXY_OK;
	case 0x21:   /* TCP over IPv6 */
		if (addr_len < 36)
			return PROXY_BAD;
		inet_ntop(AF_INET6, a, text, sizeof(text));
		snprintf(out->address, sizeof(out->address), "[%s]:%u", text, (unsigned)(a[32] << 8 | a[33]));
		out->has_address = 1;
		return PROXY_OK;
	case 0x00:   /* UNSPEC */
		return PROXY_OK;
	default:
		return PROXY_BAD;   /* UDP or Unix sockets make no sense in front of this server */
	}
}

enum proxy_status proxy_parse(const uint8_t *p, size_t len, size_t *consumed, struct proxy_result *out)
{
	memset(out, 0, sizeof(*out));
	size_t sig = len < sizeof(v2_signature) ? len : sizeof(v2_signature);
	if (memcmp(p, v2_signature, sig) == 0)
		return sig < sizeof(v2_signature) ? PROXY_NEED_MORE : parse_v2(p, len, consumed, out);
	size_t pre = len < 6 ? len : 6;
	if (memcmp(p, "PROXY ", pre) == 0)
		return pre < 6 ? PROXY_NEED_MORE : parse_v1(p, len, consumed, out);
	return PROXY_BAD;
}

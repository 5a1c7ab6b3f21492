/* proxy.h: the PROXY protocol header (v1 text, v2 binary) a load balancer puts before client bytes. */
#ifndef RESOURCED_PROXY_H
#define RESOURCED_PROXY_H

#include <stddef.h>
#include <stdint.h>

#define PROXY_V1_MAX 107

enum proxy_status { PROXY_NEED_MORE = 0, PROXY_OK = 1, PROXY_BAD = -1 };

struct proxy_result {
	int has_address;      /* 0 for LOCAL / UNKNOWN: keep the connection's own peer */
	char address[64];     /* "1.2.3.4:5678" or "[::1]:5678" */
};

/* Parses the header at the start of p; on PROXY_OK *consumed bytes belong to it. */
enum proxy_status proxy_parse(const uint8_t *p, size_t len, size_t *consumed, struct proxy_result *out);

#endif

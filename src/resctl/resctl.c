/* resctl.c: the command-line client of resourced: ping, upload, sync and download over the compatible protocol. */
#include "config.h"
#include "resctl.h"
#include "b64.h"
#include "binproto.h"
#include "digest.h"
#include "frame.h"
#include "json.h"
#include "proto.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sodium.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* ================================================================ messages */

void resctl_error(const char *fmt, ...)
{
	va_list ap;
	fputs("resctl: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static const struct {
	int code;
	const char *name;
} error_names[] = {
	{ ERR_OK, "Success" },
	{ ERR_JSON, "JsonError" },
	{ ERR_TOKEN_INVALID, "TokenInvalid" },
	{ ERR_UID_INVALID, "UidInvalid" },
	{ ERR_FILE_NOT_EXISTS, "FileNotExists" },
	{ ERR_REDIS_SAVE, "FileSaveRedisFailed" },
	{ ERR_CREATE_PATH, "CreateFilePathFailed" },
	{ ERR_WRITE_PERMISSION, "FileWritePermissionFailed" },
	{ ERR_READ_PERMISSION, "FileReadPermissionFailed" },
	{ ERR_SEQ_INVALID, "FileSeqInvalid" },
	{ ERR_OFFSET_INVALID, "FileOffsetInvalid" },
	{ ERR_READ_FAILED, "FileReadFailed" },
	{ ERR_REDIS_READ, "RedisReadErr" },
	{ ERR_MSG_ID, "MsgIdErr" },
	{ ERR_NAME_INVALID, "FileNameInvalid" },
	{ ERR_CHECKSUM, "FileChecksumMismatch" },
	{ ERR_TOO_LARGE, "FileTooLarge" },
	{ ERR_UPLOAD_MISMATCH, "UploadMismatch" },
	{ ERR_BUSY, "ServerBusy" },
	{ ERR_STORAGE_FULL, "StorageFull" },
	{ ERR_USER_UPLOADS, "TooManyUserUploads" },
	{ ERR_SERVER_UPLOADS, "TooManyUploads" },
	{ ERR_CHALLENGE, "ProveYouHoldIt" },
};

/* What an error code means, for people; the ids and names are for --verbose. */
static const struct {
	int code;
	const char *text;
} error_texts[] = {
	{ ERR_JSON, "the server could not read the request" },
	{ ERR_TOKEN_INVALID, "the token is wrong or has expired (check --uid and the token)" },
	{ ERR_UID_INVALID, "the server does not know this user id" },
	{ ERR_FILE_NOT_EXISTS, "no such file on the server" },
	{ ERR_REDIS_SAVE, "the server could not record the upload" },
	{ ERR_CREATE_PATH, "the server could not create the file" },
	{ ERR_WRITE_PERMISSION, "the server may not write the file" },
	{ ERR_READ_PERMISSION, "the server may not read the file" },
	{ ERR_SEQ_INVALID, "chunk number out of order" },
	{ ERR_OFFSET_INVALID, "chunk at the wrong offset" },
	{ ERR_READ_FAILED, "the server could not read the file" },
	{ ERR_REDIS_READ, "the server could not read its upload records" },
	{ ERR_MSG_ID, "the server does not know this request" },
	{ ERR_NAME_INVALID, "the file name is not allowed" },
	{ ERR_CHECKSUM, "the uploaded bytes do not match their MD5" },
	{ ERR_TOO_LARGE, "the file is larger than the server accepts" },
	{ ERR_UPLOAD_MISMATCH, "an upload of these bytes is in progress under another name or size" },
	{ ERR_BUSY, "the server is busy" },
	{ ERR_STORAGE_FULL, "the server's storage is full" },
	{ ERR_FILE_CHANGED, "the file was replaced on the server while it was being downloaded" },
	{ ERR_USER_UPLOADS, "this user has too many uploads in progress (finish or abandon one first)" },
	{ ERR_SERVER_UPLOADS, "the server has too many uploads in progress (retry later)" },
};

static const char *error_text(int64_t code)
{
	for (size_t i = 0; i < sizeof(error_texts) / sizeof(error_texts[0]); i++)
		if (error_texts[i].code == code)
			return error_texts[i].text;
	return "the server refused the request";
}

static int verbose;     /* --verbose: message ids, error codes and raw fields as well */
static int proxy_v2;    /* --proxy-v2: a PROXY protocol v2 header opens every connection */

const char *resctl_error_name(int64_t code)
{
	for (size_t i = 0; i < sizeof(error_names) / sizeof(error_names[0]); i++)
		if (error_names[i].code == code)
			return error_names[i].name;
	return "unknown";
}

/* ================================================================ arguments */

int resctl_parse_endpoint(const char *arg, struct resctl_endpoint *ep)
{
	const char *host = arg, *host_end, *port;
	if (arg[0] == '[') {
		host = arg + 1;
		host_end = strchr(host, ']');
		if (host_end == NULL || host_end[1] != ':')
			return -1;
		port = host_end + 2;
	} else {
		host_end = strrchr(arg, ':');
		if (host_end == NULL || memchr(arg, ':', (size_t)(host_end - arg)) != NULL)
			return -1;   /* a bare IPv6 address needs brackets */
		port = host_end + 1;
	}
	size_t host_len = (size_t)(host_end - host);
	uint64_t port_num;
	if (host_len == 0 || host_len >= sizeof(ep->host) || resctl_parse_u64(port, 65535, &port_num) != 0 ||
	    port_num == 0 || strlen(arg) >= sizeof(ep->text))
		return -1;
	memcpy(ep->host, host, host_len);
	ep->host[host_len] = '\0';
	snprintf(ep->port, sizeof(ep->port), "%u", (unsigned)(uint16_t)port_num);
	snprintf(ep->text, sizeof(ep->text), "%s", arg);
	return 0;
}

int resctl_parse_u64(const char *s, uint64_t max, uint64_t *out)
{
	size_t n = strlen(s);
	if (n == 0 || n > 20 || strspn(s, "0123456789") != n)
		return -1;
	errno = 0;
	unsigned long long v = strtoull(s, NULL, 10);
	if (errno != 0 || v > max)
		return -1;
	*out = v;
	return 0;
}

int resctl_parse_size(const char *s, uint64_t max, uint64_t *out)
{
	size_t digits = strspn(s, "0123456789");
	if (digits == 0 || digits > 20)
		return -1;
	char number[21];
	memcpy(number, s, digits);
	number[digits] = '\0';
	uint64_t v;
	if (resctl_parse_u64(number, UINT64_MAX, &v) != 0)
		return -1;
	static const struct {
		const char *suffix;
		unsigned shift;
	} units[] = {
		{ "", 0 }, { "B", 0 },
		{ "K", 10 }, { "k", 10 }, { "KiB", 10 }, { "kiB", 10 },
		{ "M", 20 }, { "MiB", 20 },
		{ "G", 30 }, { "GiB", 30 },
	};
	const char *suffix = s + digits;
	for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
		if (strcmp(suffix, units[i].suffix) != 0)
			continue;
		if (v > (max >> units[i].shift))
			return -1;
		*out = v << units[i].shift;
		return 0;
	}
	return -1;
}

int resctl_parse_seconds_ms(const char *s, uint64_t max_ms, uint64_t *out_ms)
{
	char *end;
	errno = 0;
	double seconds = strtod(s, &end);
	if (errno != 0 || end == s || *end != '\0' || !isfinite(seconds) || seconds < 0 ||
	    seconds * 1000.0 > (double)max_ms)
		return -1;
	*out_ms = (uint64_t)llround(seconds * 1000.0);
	return 0;
}

void resctl_bad_option(const char *command, char *const argv[], int opt)
{
	const char *text = optind > 0 ? argv[optind - 1] : "?";
	if (opt == ':')
		resctl_error("%s: option %s needs a value (see resctl %s --help)", command, text, command);
	else if (optopt != 0 && optopt != '?')
		resctl_error("%s: unknown option -%c (see resctl %s --help)", command, optopt, command);
	else
		resctl_error("%s: unknown option %s (see resctl %s --help)", command, text, command);
}

/* ================================================================ network helpers */

int resctl_resolve(const struct resctl_endpoint *ep, struct addrinfo **out, char *err, size_t errlen)
{
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
	    .ai_flags = AI_ADDRCONFIG | AI_NUMERICSERV };
	int r = getaddrinfo(ep->host, ep->port, &hints, out);
	if (r != 0) {
		snprintf(err, errlen, "cannot resolve %s: %s", ep->host, gai_strerror(r));
		return -1;
	}
	return 0;
}

void resctl_peer_name(int fd, char *out, size_t outlen)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);
	char host[NI_MAXHOST], port[NI_MAXSERV];
	if (getpeername(fd, (struct sockaddr *)&ss, &len) != 0 ||
	    getnameinfo((struct sockaddr *)&ss, len, host, sizeof(host), port, sizeof(port),
	        NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
		snprintf(out, outlen, "?");
		return;
	}
	snprintf(out, outlen, ss.ss_family == AF_INET6 ? "[%s]:%s" : "%s:%s", host, port);
}

void resctl_tune_socket(int fd)
{
	int one = 1;
	(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

int64_t resctl_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void sleep_ms(unsigned ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000 };
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

/* ================================================================ receive buffer (a struct buf) */

int resctl_take_frame(struct buf *in, uint16_t *id, const uint8_t **body, uint32_t *len, size_t *need)
{
	const uint8_t *p = buf_head(in);
	size_t have = buf_len(in);
	size_t consumed;
	*need = 0;
	if (have >= FRAME_HEADER_LEN)
		*need = FRAME_HEADER_LEN + (size_t)frame_body_len(p);
	switch (frame_decode(p, have, RESCTL_MAX_RESPONSE, id, body, len, &consumed)) {
	case FRAME_OK:
		buf_consume_keep(in, consumed);
		return 1;
	case FRAME_NEED_MORE:
		return 0;
	default:
		return -1;
	}
}


/* ================================================================ progress */

void resctl_progress_init(struct resctl_progress *p, const char *label)
{
	*p = (struct resctl_progress){ .enabled = isatty(STDERR_FILENO), .start_ns = resctl_now_ns(), .label = label };
}

void resctl_progress_base(struct resctl_progress *p, uint64_t done)
{
	p->base = done;
	p->start_ns = resctl_now_ns();
}

void resctl_progress_text(struct resctl_progress *p, const char *text)
{
	if (!p->enabled)
		return;
	fprintf(stderr, "\r%s\033[K", text);
	fflush(stderr);
	p->drawn = 1;
}

void resctl_progress_update(struct resctl_progress *p, uint64_t done, uint64_t total)
{
	if (!p->enabled)
		return;
	int64_t now = resctl_now_ns();
	if (p->drawn && now - p->last_draw_ns < 100000000)
		return;
	p->last_draw_ns = now;
	double seconds = (double)(now - p->start_ns) / 1e9;
	uint64_t moved = done > p->base ? done - p->base : 0;
	double rate = seconds > 0 ? (double)moved / 1e6 / seconds : 0;
	char eta[32] = "";
	if (rate > 0 && total > done) {
		long left = (long)((double)(total - done) / 1e6 / rate + 0.5);
		if (left >= 3600)
			snprintf(eta, sizeof(eta), " ETA %ld:%02ld:%02ld", left / 3600, left / 60 % 60, left % 60);
		else
			snprintf(eta, sizeof(eta), " ETA %ld:%02ld", left / 60, left % 60);
	}
	char bar[31];
	double fraction = total ? (double)done / (double)total : 1.0;
	int filled = (int)(fraction * 30.0);
	for (int i = 0; i < 30; i++)
		bar[i] = i < filled ? '#' : '.';
	bar[30] = '\0';
	char line[256];
	snprintf(line, sizeof(line), "%.40s [%s] %3d%% %.1f/%.1f MB %.1f MB/s%s", p->label, bar,
	    (int)(fraction * 100.0), (double)done / 1e6, (double)total / 1e6, rate, eta);
	resctl_progress_text(p, line);
}

void resctl_progress_clear(struct resctl_progress *p)
{
	if (p->enabled && p->drawn) {
		fputs("\r\033[K", stderr);
		fflush(stderr);
	}
	p->drawn = 0;
}

/* ================================================================ blocking client */

/* One connection of a command; every wait is bounded by timeout_ms. */
struct client {
	int fd;                          /* -1 while not connected */
	int timeout_ms;
	const struct resctl_endpoint *ep;
	struct buf in;
	char peer[80];
	char err[512];                   /* why the last call failed */
};

enum call_result {
	CALL_OK = 0,
	CALL_DROPPED = -1,   /* network trouble (refused, closed, timed out): worth reconnecting */
	CALL_BROKEN = -2,    /* the peer broke the protocol: retrying will not help */
};

static void client_init(struct client *c, const struct resctl_endpoint *ep, int timeout_ms)
{
	*c = (struct client){ .fd = -1, .timeout_ms = timeout_ms, .ep = ep };
}

static void client_close(struct client *c)
{
	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
	buf_consume_keep(&c->in, buf_len(&c->in));   /* a late answer on the old connection must not be read */
}

/* 1 when fd is ready, 0 at the deadline, -1 on a poll error. */
static int wait_ready(int fd, short events, int64_t deadline_ns)
{
	for (;;) {
		int64_t left = deadline_ns - resctl_now_ns();
		if (left <= 0)
			return 0;
		struct pollfd pfd = { .fd = fd, .events = events };
		int r = poll(&pfd, 1, (int)((left + 999999) / 1000000));
		if (r > 0)
			return 1;
		if (r < 0 && errno != EINTR)
			return -1;
	}
}

/* The PROXY protocol v2 header HAProxy would send for this connection: PROXY command, TCP over
 * IPv4 or IPv6, this socket's own addresses as source and destination. */
static int send_proxy_v2(struct client *c)
{
	static const uint8_t signature[12] = { 0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a };
	struct sockaddr_storage src, dst;
	socklen_t slen = sizeof(src), dlen = sizeof(dst);
	uint8_t header[16 + 36];
	size_t addr_len;
	if (getsockname(c->fd, (struct sockaddr *)&src, &slen) != 0 || getpeername(c->fd, (struct sockaddr *)&dst, &dlen) != 0) {
		snprintf(c->err, sizeof(c->err), "--proxy-v2: %s", strerror(errno));
		return -1;
	}
	memcpy(header, signature, sizeof(signature));
	header[12] = 0x21;   /* version 2, PROXY */
	if (src.ss_family == AF_INET) {
		const struct sockaddr_in *s4 = (const struct sockaddr_in *)&src, *d4 = (const struct sockaddr_in *)&dst;
		header[13] = 0x11;   /* TCP over IPv4 */
		memcpy(header + 16, &s4->sin_addr, 4);
		memcpy(header + 20, &d4->sin_addr, 4);
		memcpy(header + 24, &s4->sin_port, 2);
		memcpy(header + 26, &d4->sin_port, 2);
		addr_len = 12;
	} else {
		const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)&src, *d6 = (const struct sockaddr_in6 *)&dst;
		header[13] = 0x21;   /* TCP over IPv6 */
		memcpy(header + 16, &s6->sin6_addr, 16);
		memcpy(header + 32, &d6->sin6_addr, 16);
		memcpy(header + 48, &s6->sin6_port, 2);
		memcpy(header + 50, &d6->sin6_port, 2);
		addr_len = 36;
	}
	header[14] = 0;
	header[15] = (uint8_t)addr_len;
	size_t len = 16 + addr_len, done = 0;
	int64_t deadline = resctl_now_ns() + (int64_t)c->timeout_ms * 1000000;
	while (done < len) {
		ssize_t n = send(c->fd, header + done, len - done, MSG_NOSIGNAL);
		if (n > 0) {
			done += (size_t)n;
		} else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
			if (errno == EAGAIN && wait_ready(c->fd, POLLOUT, deadline) <= 0) {
				snprintf(c->err, sizeof(c->err), "--proxy-v2: sending the header timed out");
				return -1;
			}
		} else {
			snprintf(c->err, sizeof(c->err), "--proxy-v2: %s", strerror(errno));
			return -1;
		}
	}
	return 0;
}

static int connect_one(struct client *c, const struct addrinfo *ai)
{
	int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
	if (fd < 0) {
		snprintf(c->err, sizeof(c->err), "socket(): %s", strerror(errno));
		return -1;
	}
	int r = connect(fd, ai->ai_addr, ai->ai_addrlen);
	if (r != 0 && errno == EINPROGRESS) {
		r = wait_ready(fd, POLLOUT, resctl_now_ns() + (int64_t)c->timeout_ms * 1000000);
		if (r == 0) {
			snprintf(c->err, sizeof(c->err), "cannot connect to %s: timed out", c->ep->text);
			close(fd);
			return -1;
		}
		int so_error = 0;
		socklen_t len = sizeof(so_error);
		if (r < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &so_error, &len) != 0)
			so_error = errno;
		errno = so_error;
		r = so_error ? -1 : 0;
	}
	if (r != 0) {
		snprintf(c->err, sizeof(c->err), "cannot connect to %s: %s", c->ep->text, strerror(errno));
		close(fd);
		return -1;
	}
	resctl_tune_socket(fd);
	c->fd = fd;
	resctl_peer_name(fd, c->peer, sizeof(c->peer));
	if (proxy_v2 && send_proxy_v2(c) != 0) {
		close(fd);
		c->fd = -1;
		return -1;
	}
	return 0;
}

static int client_connect(struct client *c)
{
	struct addrinfo *list;
	client_close(c);
	if (resctl_resolve(c->ep, &list, c->err, sizeof(c->err)) != 0)
		return CALL_DROPPED;
	for (struct addrinfo *ai = list; ai != NULL; ai = ai->ai_next)
		if (connect_one(c, ai) == 0)
			break;
	freeaddrinfo(list);
	return c->fd >= 0 ? CALL_OK : CALL_DROPPED;
}

static int client_send(struct client *c, uint16_t id, const void *body, size_t len)
{
	uint8_t header[FRAME_HEADER_LEN];
	frame_put_header(header, id, (uint32_t)len);
	struct iovec iov[2] = { { header, sizeof(header) }, { (void *)body, len } };
	size_t first = 0;
	int64_t deadline = resctl_now_ns() + (int64_t)c->timeout_ms * 1000000;
	while (first < 2) {
		struct msghdr msg = { .msg_iov = iov + first, .msg_iovlen = 2 - first };
		ssize_t n = sendmsg(c->fd, &msg, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK) {
				if (wait_ready(c->fd, POLLOUT, deadline) > 0)
					continue;
				snprintf(c->err, sizeof(c->err), "sending to %s: timed out", c->ep->text);
				return CALL_DROPPED;
			}
			snprintf(c->err, sizeof(c->err), "sending to %s: %s", c->ep->text, strerror(errno));
			return CALL_DROPPED;
		}
		size_t done = (size_t)n;
		while (first < 2 && done >= iov[first].iov_len)
			done -= iov[first++].iov_len;
		if (first < 2) {
			iov[first].iov_base = (uint8_t *)iov[first].iov_base + done;
			iov[first].iov_len -= done;
		}
	}
	return CALL_OK;
}

/* Says that the peer does not speak the protocol, showing how its answer starts (an HTTP
 * status line, an SSH banner...) in printable characters. */
static void not_resourced(struct client *c, const char *why)
{
	char start[41];
	size_t n = 0;
	const uint8_t *got = buf_head(&c->in);
	for (size_t i = 0; i < buf_len(&c->in) && n < sizeof(start) - 1; i++) {
		uint8_t ch = got[i];
		if (ch == '\r' || ch == '\n')
			break;
		start[n++] = ch >= 0x20 && ch < 0x7f ? (char)ch : '.';
	}
	start[n] = '\0';
	if (verbose || n == 0)
		snprintf(c->err, sizeof(c->err), "%s is not a resourced server: %s%s%s%s", c->ep->text, why,
		    n ? " (it sent \"" : "", start, n ? "\")" : "");
	else
		snprintf(c->err, sizeof(c->err), "%s is not a resourced server (it sent \"%s\")", c->ep->text, start);
}

static int client_recv(struct client *c, uint16_t *id, const uint8_t **body, uint32_t *len)
{
	int64_t deadline = resctl_now_ns() + (int64_t)c->timeout_ms * 1000000;
	for (;;) {
		size_t need;
		int r = resctl_take_frame(&c->in, id, body, len, &need);
		if (r > 0)
			return CALL_OK;
		if (r < 0) {
			not_resourced(c, "its answer does not frame like resourced's");
			return CALL_BROKEN;
		}
		size_t have = buf_len(&c->in);
		size_t want = need > have ? need - have : 0;
		if (want < 65536)
			want = 65536;
		uint8_t *p = buf_reserve(&c->in, want);
		if (p == NULL) {
			snprintf(c->err, sizeof(c->err), "out of memory");
			return CALL_BROKEN;
		}
		ssize_t n = recv(c->fd, p, c->in.cap - c->in.end, 0);
		if (n > 0) {
			buf_commit(&c->in, (size_t)n);
			continue;
		}
		if (n == 0) {
			snprintf(c->err, sizeof(c->err), "%s closed the connection", c->ep->text);
			return CALL_DROPPED;
		}
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN || errno == EWOULDBLOCK) {
			if (wait_ready(c->fd, POLLIN, deadline) > 0)
				continue;
			snprintf(c->err, sizeof(c->err), "no answer from %s within %d ms", c->ep->text, c->timeout_ms);
			return CALL_DROPPED;
		}
		snprintf(c->err, sizeof(c->err), "receiving from %s: %s", c->ep->text, strerror(errno));
		return CALL_DROPPED;
	}
}

/* Receives the answer to request id and parses it; free *out with yajl_tree_free. */
static int client_answer(struct client *c, uint16_t id, yajl_val *out)
{
	uint16_t rid;
	const uint8_t *body;
	uint32_t len;
	int r = client_recv(c, &rid, &body, &len);
	if (r != CALL_OK)
		return r;
	if (rid != id + 1) {
		char why[80];
		snprintf(why, sizeof(why), "it answered message %u with message %u", id, rid);
		not_resourced(c, why);
		return CALL_BROKEN;
	}
	char why[160];
	*out = json_parse_object(body, len, why, sizeof(why));
	if (*out == NULL) {
		char what[200];
		snprintf(what, sizeof(what), "its answer is not JSON: %s", why);
		not_resourced(c, what);
		return CALL_BROKEN;
	}
	return CALL_OK;
}

static int client_call(struct client *c, uint16_t id, const void *body, size_t len, yajl_val *out)
{
	int r = client_send(c, id, body, len);
	return r == CALL_OK ? client_answer(c, id, out) : r;
}

/* ================================================================ requests and answers */

/* Requests are written like Qt's QJsonDocument::toJson(): keys sorted, 4-space indent, newlines. */
static int qt_writer_init(struct json_writer *w)
{
	if (json_writer_init(w) != 0)
		return -1;
	yajl_gen_config(w->gen, yajl_gen_beautify, 1);
	yajl_gen_config(w->gen, yajl_gen_indent_string, "    ");
	return 0;
}

static void put_cstr(struct json_writer *w, const char *key, const char *s)
{
	json_put_str(w, key, s, strlen(s));
}

static void put_token(struct json_writer *w, const struct resctl_auth *auth)
{
	if (auth->token != NULL)
		put_cstr(w, "token", auth->token);
}

static void put_uid(struct json_writer *w, const struct resctl_auth *auth)
{
	if (auth->has_uid)
		json_put_int(w, "uid", (int64_t)auth->uid);
}

/* The error code of an answer, or -1 when it has none. */
static int64_t answer_error(yajl_val o)
{
	uint64_t code;
	return json_get_u64(o, "error", INT32_MAX, &code) == JSON_FIELD_OK ? (int64_t)code : -1;
}

/* A size or seq the server sends as a number or a string. */
static int answer_u64(yajl_val o, const char *key, uint64_t *out)
{
	return json_get_u64(o, key, UINT64_MAX, out) == JSON_FIELD_OK ? 0 : -1;
}

static const char *answer_str(yajl_val o, const char *key)
{
	const char *s;
	size_t len;
	return json_get_str(o, key, &s, &len) == JSON_FIELD_OK ? s : NULL;
}

/* An error answer of either protocol, for people: its meaning and the server's message, the code
 * with --verbose, and what to do when the cause is on this side. */
static void report_error(const char *command, int64_t code, const char *message)
{
	if (message && message[0] == '\0')
		message = NULL;
	if (verbose)
		resctl_error("%s: %s (error %" PRId64 " %s)%s%s", command, error_text(code), code, resctl_error_name(code),
		    message ? ": " : "", message ? message : "");
	else
		resctl_error("%s: %s%s%s", command, error_text(code), message ? ": " : "", message ? message : "");
	/* A server without anonymous access asks every request for a uid. */
	if (code == ERR_JSON && message && strncmp(message, "uid: missing", 12) == 0)
		resctl_error("%s: this server needs credentials: give --uid UID and --token TOKEN "
		    "(or --token-file FILE, or RESCTL_TOKEN)", command);
}

static void report_server_error(const char *command, yajl_val o)
{
	report_error(command, answer_error(o), answer_str(o, "message"));
}

/* Reconnect back-off: 100 ms doubling to 5 s, at most max_attempts in a row. */
struct backoff {
	uint64_t attempts;
	uint64_t max_attempts;
	unsigned delay_ms;
};

static void backoff_reset(struct backoff *b)
{
	b->attempts = 0;
	b->delay_ms = RESCTL_BACKOFF_FIRST_MS;
}

/* Sleeps before the next attempt, saying why and when on stderr (a frozen bar tells nothing);
 * -1 when the attempts are used up. lost: an established connection broke. */
static int backoff_wait(struct backoff *b, const char *command, struct resctl_progress *p, int lost, const char *why)
{
	if (b->attempts >= b->max_attempts)
		return -1;
	b->attempts++;
	resctl_progress_clear(p);
	resctl_error("%s: %s%s%s, retrying (%" PRIu64 "/%" PRIu64 ") in %.1f s", command, lost ? "connection lost (" : "",
	    why, lost ? ")" : "", b->attempts, b->max_attempts, b->delay_ms / 1000.0);
	sleep_ms(b->delay_ms);
	b->delay_ms = b->delay_ms * 2 > RESCTL_BACKOFF_MAX_MS ? RESCTL_BACKOFF_MAX_MS : b->delay_ms * 2;
	return 0;
}

/* Options every network command takes. */
enum common_option {
	OPT_HELP = 'h',
	OPT_TIMEOUT = 256,
	OPT_UID,
	OPT_TOKEN,
	OPT_COUNT,
	OPT_INTERVAL,
	OPT_JSON,
	OPT_NAME,
	OPT_AVATAR,
	OPT_CHUNK,
	OPT_RETRIES,
	OPT_DROP_AFTER,
	OPT_STOP_AFTER,
	OPT_FORCE,
	OPT_TOKEN_FILE,
	OPT_VERBOSE,
	OPT_PROXY_V2,
	OPT_COMPAT,
	OPT_PROTOCOL,
};

/* Handles --timeout, --uid and --token; 1 if opt was one of them, -1 on a bad value. */
static int common_option(const char *command, int opt, const char *arg, struct resctl_auth *auth, int *timeout_ms)
{
	uint64_t v;
	switch (opt) {
	case OPT_TIMEOUT:
		if (resctl_parse_seconds_ms(arg, 86400000, &v) != 0 || v == 0) {
			resctl_error("%s: --timeout wants seconds > 0, not '%s'", command, arg);
			return -1;
		}
		*timeout_ms = (int)v;
		return 1;
	case OPT_UID:
		if (resctl_parse_u64(arg, JSON_MAX_SAFE_INT, &auth->uid) != 0) {
			resctl_error("%s: --uid wants a non-negative integer, not '%s'", command, arg);
			return -1;
		}
		auth->has_uid = 1;
		return 1;
	case OPT_TOKEN:
		auth->token = arg;
		return 1;
	case OPT_TOKEN_FILE:
		auth->token_file = arg;
		return 1;
	case OPT_VERBOSE:
		verbose = 1;
		return 1;
	case OPT_PROXY_V2:
		proxy_v2 = 1;
		return 1;
	default:
		return 0;
	}
}

/* The token from --token, --token-file or RESCTL_TOKEN (in that order), checked against --uid
 * before anything is sent: the server would only say its JSON is wrong. */
static int auth_finish(const char *command, struct resctl_auth *auth)
{
	static char file_token[PROTO_TOKEN_MAX + 2];
	if (auth->token && auth->token_file) {
		resctl_error("%s: give --token or --token-file, not both", command);
		return -1;
	}
	if (auth->token_file) {
		FILE *f = fopen(auth->token_file, "re");
		if (f == NULL) {
			resctl_error("%s: --token-file %s: %s", command, auth->token_file, strerror(errno));
			return -1;
		}
		int got = fgets(file_token, sizeof(file_token), f) != NULL;
		fclose(f);
		size_t len = got ? strcspn(file_token, "\r\n") : 0;
		if (len == 0 || len > PROTO_TOKEN_MAX) {
			resctl_error("%s: --token-file %s: the first line should hold the token (1 to %d bytes)", command,
			    auth->token_file, PROTO_TOKEN_MAX);
			return -1;
		}
		file_token[len] = '\0';
		auth->token = file_token;
	}
	const char *env = getenv("RESCTL_TOKEN");
	if (auth->token == NULL && auth->has_uid && env != NULL && env[0] != '\0')
		auth->token = env;
	if (auth->has_uid && auth->token == NULL) {
		resctl_error("%s: --uid needs that user's token: --token T, --token-file FILE or RESCTL_TOKEN", command);
		return -1;
	}
	if (!auth->has_uid && auth->token != NULL) {
		resctl_error("%s: a token needs --uid (the user it belongs to)", command);
		return -1;
	}
	return 0;
}

#define COMMON_LONG_OPTIONS \
	{ "help", no_argument, NULL, OPT_HELP }, \
	{ "timeout", required_argument, NULL, OPT_TIMEOUT }, \
	{ "uid", required_argument, NULL, OPT_UID }, \
	{ "token", required_argument, NULL, OPT_TOKEN }, \
	{ "token-file", required_argument, NULL, OPT_TOKEN_FILE }, \
	{ "verbose", no_argument, NULL, OPT_VERBOSE }, \
	{ "proxy-v2", no_argument, NULL, OPT_PROXY_V2 }

#define COMMON_HELP \
	"  --uid U          user id sent with the request (left out when not given)\n" \
	"  --token T        that user's token (ps shows it: prefer the next two)\n" \
	"  --token-file F   read the token from the first line of F\n" \
	"  RESCTL_TOKEN     environment variable holding the token, used with --uid\n" \
	"  --timeout S      seconds to wait for each answer (default 30)\n" \
	"  --proxy-v2       send a PROXY protocol v2 header first, to talk to a node\n" \
	"                   with proxy_protocol = on directly (as HAProxy would)\n" \
	"  --verbose        show message ids, error codes and raw fields too\n" \
	"  -h, --help       this text\n"

int resctl_parse_options(const char *command, int argc, char **argv, const struct option *longopts,
    const char *usage, resctl_option_fn *fn, void *ctx)
{
	int opt;
	optind = 0;   /* glibc: full re-initialisation */
	opterr = 0;
	while ((opt = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		if (opt == OPT_HELP) {
			fputs(usage, stdout);
			exit(RESCTL_EXIT_OK);
		}
		if (opt == '?' || opt == ':') {
			resctl_bad_option(command, argv, opt);
			return -1;
		}
		if (fn(ctx, opt, optarg) != 0)
			return -1;
	}
	return argc - optind;
}

static int need_positionals(const char *command, int have, int want)
{
	if (have == want)
		return 0;
	resctl_error("%s: expected %d argument%s, got %d (see resctl %s --help)", command, want,
	    want == 1 ? "" : "s", have, command);
	return -1;
}

static int parse_endpoint_arg(const char *command, const char *arg, struct resctl_endpoint *ep)
{
	if (resctl_parse_endpoint(arg, ep) == 0)
		return 0;
	resctl_error("%s: '%s' is not HOST:PORT", command, arg);
	return -1;
}

/* ================================================================ ping */

struct ping_opts {
	struct resctl_auth auth;   /* unused by 1001, accepted for symmetry */
	int timeout_ms;
	uint64_t count;
	uint64_t interval_ms;
};

static int ping_option(void *ctx, int opt, const char *arg)
{
	struct ping_opts *o = ctx;
	int r = common_option("ping", opt, arg, &o->auth, &o->timeout_ms);
	if (r != 0)
		return r < 0 ? -1 : 0;
	if (opt == OPT_COUNT && resctl_parse_u64(arg, 1000000000, &o->count) == 0 && o->count > 0)
		return 0;
	if (opt == OPT_INTERVAL && resctl_parse_seconds_ms(arg, 3600000, &o->interval_ms) == 0)
		return 0;
	resctl_error("ping: bad value '%s' for %s", arg, opt == OPT_COUNT ? "--count" : "--interval");
	return -1;
}

static const char ping_usage[] =
	"usage: resctl ping HOST:PORT [--count N] [--interval S] [--timeout S]\n"
	"Sends test messages (the server echoes them) and prints each round trip.\n"
	"  --count N        messages to send (default 1)\n"
	"  --interval S     seconds between messages (default 1)\n"
	COMMON_HELP;

/* One 1001 exchange; returns the round trip in ns, or -1 after printing why it failed. */
static int64_t ping_once(struct client *c, struct json_writer *w, uint64_t n)
{
	char data[64];
	snprintf(data, sizeof(data), "resctl ping %" PRIu64 " %08" PRIx32, n, randombytes_random());
	json_begin(w);
	put_cstr(w, "data", data);
	const uint8_t *body;
	size_t len;
	json_end(w, &body, &len);
	int64_t start = resctl_now_ns();
	yajl_val answer;
	int r = client_call(c, MSG_TEST, body, len, &answer);
	int64_t rtt = resctl_now_ns() - start;
	if (r != CALL_OK) {
		resctl_error("ping: %s", c->err);
		client_close(c);
		return -1;
	}
	const char *echo = answer_str(answer, "data");
	int64_t code = answer_error(answer);
	if (code != 0) {
		report_server_error("ping", answer);
		rtt = -1;
	} else if (echo == NULL || strcmp(echo, data) != 0) {
		resctl_error("ping: %s did not echo the data", c->ep->text);
		rtt = -1;
	}
	yajl_tree_free(answer);
	return rtt;
}

static int cmd_ping(int argc, char **argv)
{
	static const struct option longopts[] = {
		COMMON_LONG_OPTIONS,
		{ "count", required_argument, NULL, OPT_COUNT },
		{ "interval", required_argument, NULL, OPT_INTERVAL },
		{ NULL, 0, NULL, 0 },
	};
	struct ping_opts o = { .timeout_ms = RESCTL_TIMEOUT_MS, .count = 1, .interval_ms = 1000 };
	struct resctl_endpoint ep;
	int n = resctl_parse_options("ping", argc, argv, longopts, ping_usage, ping_option, &o);
	if (n < 0 || need_positionals("ping", n, 1) != 0 || parse_endpoint_arg("ping", argv[optind], &ep) != 0)
		return RESCTL_EXIT_USAGE;

	struct client c;
	struct json_writer w;
	client_init(&c, &ep, o.timeout_ms);
	if (qt_writer_init(&w) != 0) {
		resctl_error("ping: out of memory");
		return RESCTL_EXIT_FAIL;
	}
	uint64_t received = 0;
	double min_ms = INFINITY, max_ms = 0, sum_ms = 0;
	for (uint64_t i = 1; i <= o.count; i++) {
		if (i > 1)
			sleep_ms((unsigned)o.interval_ms);
		if (c.fd < 0 && client_connect(&c) != CALL_OK) {
			resctl_error("ping: %s", c.err);
			continue;
		}
		int64_t rtt = ping_once(&c, &w, i);
		if (rtt < 0)
			continue;
		double ms = (double)rtt / 1e6;
		if (verbose)
			printf("%d from %s: time=%.3f ms\n", MSG_TEST + 1, c.peer, ms);
		else
			printf("reply from %s: time=%.3f ms\n", c.peer, ms);
		fflush(stdout);
		received++;
		sum_ms += ms;
		min_ms = ms < min_ms ? ms : min_ms;
		max_ms = ms > max_ms ? ms : max_ms;
	}
	if (o.count > 1) {
		printf("--- %s: %" PRIu64 " sent, %" PRIu64 " received", ep.text, o.count, received);
		if (received)
			printf(", time min/avg/max = %.3f/%.3f/%.3f ms", min_ms, sum_ms / (double)received, max_ms);
		printf("\n");
	}
	client_close(&c);
	buf_free(&c.in);
	json_writer_free(&w);
	return received == o.count ? RESCTL_EXIT_OK : RESCTL_EXIT_FAIL;
}

/* ================================================================ sync */

struct sync_opts {
	struct resctl_auth auth;
	int timeout_ms;
	int json;
};

static int sync_option(void *ctx, int opt, const char *arg)
{
	struct sync_opts *o = ctx;
	int r = common_option("sync", opt, arg, &o->auth, &o->timeout_ms);
	if (r != 0)
		return r < 0 ? -1 : 0;
	if (opt == OPT_JSON)
		o->json = 1;
	return 0;
}

static const char sync_usage[] =
	"usage: resctl sync HOST:PORT MD5 [--uid U --token T] [--json] [--timeout S]\n"
	"Asks the server how far the upload of the file with this MD5 got.\n"
	"Exits 0 when an upload is in progress, 1 otherwise (none, or an error).\n"
	"  --json           print the server's answer as it came\n"
	COMMON_HELP;

static int md5_hex_valid(const char *s)
{
	return strlen(s) == PROTO_MD5_HEX && strspn(s, "0123456789abcdefABCDEF") == PROTO_MD5_HEX;
}

/* Builds a 1005 request for md5 in w. */
static void build_sync(struct json_writer *w, const char *md5, const struct resctl_auth *auth,
    const uint8_t **body, size_t *len)
{
	json_begin(w);
	put_cstr(w, "md5", md5);
	put_token(w, auth);
	put_uid(w, auth);
	json_end(w, body, len);
}

/* The server's view of an upload, in words; the raw fields with --verbose. */
static void sync_print(yajl_val answer, const char *md5)
{
	uint64_t seq = 0, trans = 0, total = 0;
	int64_t code = answer_error(answer);
	const char *name = answer_str(answer, "name");
	const char *message = answer_str(answer, "message");
	answer_u64(answer, "seq", &seq);
	answer_u64(answer, "trans_size", &trans);
	answer_u64(answer, "total_size", &total);
	if (verbose)
		printf("error=%" PRId64 " (%s) name=%s seq=%" PRIu64 " trans_size=%" PRIu64 " total_size=%" PRIu64
		    "%s%s%s\n", code, resctl_error_name(code), name ? name : "", seq, trans, total,
		    message ? " message=\"" : "", message ? message : "", message ? "\"" : "");
	if (code == 0)
		printf("%s: upload in progress, %" PRIu64 " of %" PRIu64 " bytes received (%d%%) in %" PRIu64 " chunk%s\n",
		    name ? name : "?", trans, total, total ? (int)(100.0 * (double)trans / (double)total) : 0, seq,
		    seq == 1 ? "" : "s");
	else if (code == ERR_FILE_NOT_EXISTS)
		printf("no upload in progress with md5 %s (never started, finished, or expired)\n", md5);
	else
		report_server_error("sync", answer);
}

static int cmd_sync(int argc, char **argv)
{
	static const struct option longopts[] = {
		COMMON_LONG_OPTIONS,
		{ "json", no_argument, NULL, OPT_JSON },
		{ NULL, 0, NULL, 0 },
	};
	struct sync_opts o = { .timeout_ms = RESCTL_TIMEOUT_MS };
	struct resctl_endpoint ep;
	int n = resctl_parse_options("sync", argc, argv, longopts, sync_usage, sync_option, &o);
	if (n < 0 || need_positionals("sync", n, 2) != 0 || parse_endpoint_arg("sync", argv[optind], &ep) != 0 ||
	    auth_finish("sync", &o.auth) != 0)
		return RESCTL_EXIT_USAGE;
	const char *md5 = argv[optind + 1];
	if (!md5_hex_valid(md5)) {
		resctl_error("sync: '%s' is not an MD5 (32 hex digits)", md5);
		return RESCTL_EXIT_USAGE;
	}

	struct client c;
	struct json_writer w;
	client_init(&c, &ep, o.timeout_ms);
	if (qt_writer_init(&w) != 0)
		return RESCTL_EXIT_FAIL;
	const uint8_t *body;
	size_t len;
	build_sync(&w, md5, &o.auth, &body, &len);
	int status = RESCTL_EXIT_FAIL;
	yajl_val answer = NULL;
	if (client_connect(&c) != CALL_OK || client_send(&c, MSG_SYNC, body, len) != CALL_OK) {
		resctl_error("sync: %s", c.err);
		goto out;
	}
	/* --json prints the raw body, so take the frame before parsing it. */
	uint16_t rid;
	const uint8_t *rbody;
	uint32_t rlen;
	char why[160];
	if (client_recv(&c, &rid, &rbody, &rlen) != CALL_OK) {
		resctl_error("sync: %s", c.err);
		goto out;
	}
	if (rid != MSG_SYNC + 1 || (answer = json_parse_object(rbody, rlen, why, sizeof(why))) == NULL) {
		resctl_error("sync: bad answer %u from %s%s%s", rid, ep.text, rid == MSG_SYNC + 1 ? ": " : "",
		    rid == MSG_SYNC + 1 ? why : "");
		goto out;
	}
	if (o.json) {
		fwrite(rbody, 1, rlen, stdout);
		fputc('\n', stdout);
	} else {
		sync_print(answer, md5);
	}
	status = answer_error(answer) == 0 ? RESCTL_EXIT_OK : RESCTL_EXIT_FAIL;
out:
	if (answer)
		yajl_tree_free(answer);
	client_close(&c);
	buf_free(&c.in);
	json_writer_free(&w);
	return status;
}

/* ================================================================ upload */

struct upload_opts {
	struct resctl_endpoint ep;
	const char *path;
	const char *name;          /* default: basename of path */
	struct resctl_auth auth;
	int avatar;                /* 1031 instead of 1003 */
	uint64_t chunk;
	uint64_t retries;
	uint64_t drop_after;       /* testing: drop the connection once after sending this seq; 0 = never */
	uint64_t stop_after;       /* testing: exit 3 after this many acknowledged chunks; 0 = never */
	int timeout_ms;
	int compat;                /* --compat: the JSON messages (1003/1005) even when the server has the fast path */
	int chunk_given;           /* --chunk was given (the fast path otherwise uses the server's max_chunk) */
};

struct upload {
	const struct upload_opts *o;
	int fd;
	uint64_t total;
	char md5[MD5_HEX_LEN + 1];
	uint64_t offset;           /* where the next chunk starts */
	uint64_t seq;              /* its seq */
	uint64_t last_seq;         /* how many chunks the upload has, as the server is told */
	uint8_t *raw;              /* one chunk of the file */
	char *b64;                 /* and its base64 */
	size_t b64_cap;
	struct client c;
	struct json_writer w;
	struct backoff backoff;
	int dropped;               /* --drop-after has fired */
	uint64_t rewinds;          /* 1012/1018 answers that sent the upload back; bounded by --retries */
	unsigned resumes;          /* times the upload went on from a server-side record */
	uint64_t acked;            /* chunks acknowledged in this run */
	uint64_t sent_bytes;       /* file bytes acknowledged in this run */
	int gave_up;               /* the retries ran out: a rerun can resume */
	int instant;               /* the server had the content: published before every byte was sent */
	struct resctl_progress progress;
};

/* What the upload does next. */
enum upload_step {
	STEP_NEXT,        /* send the chunk at offset */
	STEP_DONE,        /* the last chunk is acknowledged */
	STEP_SYNC,        /* ask 1005 where to go on, on this connection */
	STEP_RECONNECT,   /* back off, reconnect, sync */
	STEP_STOPPED,     /* --stop-after reached */
	STEP_FAIL,        /* reported; exit 1 */
};

static int upload_option(void *ctx, int opt, const char *arg)
{
	struct upload_opts *o = ctx;
	int r = common_option("upload", opt, arg, &o->auth, &o->timeout_ms);
	if (r != 0)
		return r < 0 ? -1 : 0;
	const char *what = NULL;
	switch (opt) {
	case OPT_NAME:
		o->name = arg;
		return 0;
	case OPT_AVATAR:
		o->avatar = 1;
		return 0;
	case OPT_COMPAT:
		o->compat = 1;
		return 0;
	case OPT_CHUNK:
		o->chunk_given = 1;
		if (resctl_parse_size(arg, RESCTL_MAX_CHUNK, &o->chunk) == 0 && o->chunk > 0)
			return 0;
		what = "--chunk";
		break;
	case OPT_RETRIES:
		if (resctl_parse_u64(arg, 1000000, &o->retries) == 0)
			return 0;
		what = "--retries";
		break;
	case OPT_DROP_AFTER:
		if (resctl_parse_u64(arg, UINT32_MAX, &o->drop_after) == 0)
			return 0;
		what = "--drop-after";
		break;
	case OPT_STOP_AFTER:
		if (resctl_parse_u64(arg, UINT32_MAX, &o->stop_after) == 0)
			return 0;
		what = "--stop-after";
		break;
	default:
		return 0;
	}
	resctl_error("upload: bad value '%s' for %s", arg, what);
	return -1;
}

static const char upload_usage[] =
	"usage: resctl upload HOST:PORT FILE [--name N] [--uid U --token T] [--avatar]\n"
	"                     [--chunk BYTES] [--retries N] [--timeout S] [--compat]\n"
	"Uploads FILE over the binary fast path (raw chunks, many in flight) when\n"
	"the server has it and --uid is given; otherwise, or with --compat, chunk by\n"
	"chunk in JSON, one request at a time, like the Qt client.\n"
	"Resumes an upload the server already holds part of (it asks first), and\n"
	"reconnects with back-off when the connection drops or the server is busy.\n"
	"  --name N         name to store the file under (default: FILE's base name)\n"
	"  --avatar         upload as the user's avatar (needs --uid and a token)\n"
	"  --chunk BYTES    chunk size, K/M suffixes allowed (default 32768 in JSON,\n"
	"                   the server's max_chunk on the fast path)\n"
	"  --compat         use the JSON messages of the Qt client\n"
	"  --retries N      reconnect attempts in a row before giving up (default 10)\n"
	COMMON_HELP
	"Testing: --drop-after K drops the connection once after sending chunk K;\n"
	"--stop-after K exits with status 3 after K acknowledged chunks.\n";

/* Reads exactly len bytes at off; -1 on an error or a file that got shorter. */
static int pread_full(int fd, void *p, size_t len, uint64_t off)
{
	size_t done = 0;
	while (done < len) {
		ssize_t n = pread(fd, (uint8_t *)p + done, len - done, (off_t)(off + done));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			if (n == 0)
				errno = ENODATA;
			return -1;
		}
		done += (size_t)n;
	}
	return 0;
}

#define UPLOAD_READ_SIZE (1u << 20)   /* hashing reads */

/* MD5 of the whole file, before anything is sent (the server checks it at the end). */
static int upload_hash(struct upload *u)
{
	struct md5 ctx = { NULL };
	if (md5_init(&ctx) < 0) {
		resctl_error("upload: out of memory");
		return -1;
	}
	uint64_t done = 0;
	struct resctl_progress p;
	resctl_progress_init(&p, "hashing");
	while (done < u->total) {
		size_t len = u->total - done < UPLOAD_READ_SIZE ? (size_t)(u->total - done) : UPLOAD_READ_SIZE;
		if (pread_full(u->fd, u->raw, len, done) != 0) {
			resctl_progress_clear(&p);
			resctl_error("upload: reading %s: %s", u->o->path, errno == ENODATA ? "file got shorter" : strerror(errno));
			md5_free(&ctx);
			return -1;
		}
		md5_update(&ctx, u->raw, len);
		done += len;
		resctl_progress_update(&p, done, u->total);
	}
	resctl_progress_clear(&p);
	md5_final_hex(&ctx, u->md5);
	md5_free(&ctx);
	return 0;
}

static void upload_position(struct upload *u, uint64_t offset, uint64_t seq)
{
	uint64_t left = u->total - offset;
	u->offset = offset;
	u->seq = seq;
	u->last_seq = seq - 1 + (left ? (left + u->o->chunk - 1) / u->o->chunk : 1);
}

/* Where to go on from the server's record: trans_size committed, last committed chunk seq. */
static void upload_resume_at(struct upload *u, uint64_t trans, uint64_t seq)
{
	if (trans == 0 || trans > u->total || seq == 0) {
		upload_position(u, 0, 1);
		return;
	}
	if (trans == u->total) {
		/* Every byte is in but the upload was never completed: send the final chunk again. */
		uint64_t len = u->total < u->o->chunk ? u->total : u->o->chunk;
		upload_position(u, u->total - len, seq);
	} else {
		upload_position(u, trans, seq + 1);
	}
	u->resumes++;
	resctl_progress_clear(&u->progress);
	resctl_error("upload: resuming at %.1f MB (%d%%)", (double)u->offset / 1e6,
	    (int)(100.0 * (double)u->offset / (double)u->total));
	if (u->acked == 0)
		resctl_progress_base(&u->progress, u->offset);
}

static enum upload_step upload_sync(struct upload *u)
{
	const uint8_t *body;
	size_t len;
	yajl_val answer;
	build_sync(&u->w, u->md5, &u->o->auth, &body, &len);
	int r = client_call(&u->c, MSG_SYNC, body, len, &answer);
	if (r != CALL_OK) {
		if (r == CALL_DROPPED)
			return STEP_RECONNECT;
		resctl_error("upload: %s", u->c.err);
		return STEP_FAIL;
	}
	enum upload_step step = STEP_NEXT;
	int64_t code = answer_error(answer);
	uint64_t trans, total, seq;
	const char *name = answer_str(answer, "name");
	if (code == 0) {
		if (answer_u64(answer, "trans_size", &trans) == 0 && answer_u64(answer, "total_size", &total) == 0 &&
		    answer_u64(answer, "seq", &seq) == 0 && total == u->total && name != NULL &&
		    strcmp(name, u->o->name) == 0)
			upload_resume_at(u, trans, seq);
		else
			upload_position(u, 0, 1);   /* another upload of these bytes: seq 1 starts ours over */
	} else if (code == ERR_FILE_NOT_EXISTS || code == ERR_MSG_ID) {
		upload_position(u, 0, 1);       /* no record (or a server without 1005): from the start */
	} else if (code == ERR_BUSY) {
		step = STEP_RECONNECT;
	} else {
		report_server_error("upload", answer);
		step = STEP_FAIL;
	}
	yajl_tree_free(answer);
	return step;
}

static void upload_build_chunk(struct upload *u, size_t len, int last, const uint8_t **body, size_t *body_len)
{
	const struct upload_opts *o = u->o;
	b64_encode(u->b64, u->raw, len);
	json_begin(&u->w);
	put_cstr(&u->w, "data", u->b64);
	json_put_int(&u->w, "last", last);
	json_put_int(&u->w, "last_seq", (int64_t)u->last_seq);
	put_cstr(&u->w, "md5", u->md5);
	put_cstr(&u->w, "name", o->name);
	json_put_int(&u->w, "seq", (int64_t)u->seq);
	put_token(&u->w, &o->auth);
	json_put_int(&u->w, "total_size", (int64_t)u->total);
	json_put_int(&u->w, "trans_size", (int64_t)(u->offset + len));
	put_uid(&u->w, &o->auth);
	json_end(&u->w, body, body_len);
}

/* The server says the chunk was past what it holds: go back to its committed size. */
static enum upload_step upload_rewind(struct upload *u, yajl_val answer)
{
	uint64_t trans;
	if (answer_u64(answer, "trans_size", &trans) != 0 || trans > u->offset)
		return STEP_SYNC;
	if (trans == 0) {
		upload_position(u, 0, 1);
	} else {
		uint64_t back = (u->offset - trans + u->o->chunk - 1) / u->o->chunk;
		upload_position(u, trans, u->seq > back + 1 ? u->seq - back : 2);
	}
	return STEP_NEXT;
}

static enum upload_step upload_chunk(struct upload *u)
{
	const struct upload_opts *o = u->o;
	size_t len = u->total - u->offset < o->chunk ? (size_t)(u->total - u->offset) : (size_t)o->chunk;
	int last = u->offset + len == u->total;
	uint16_t id = o->avatar ? MSG_AVATAR : MSG_UPLOAD;
	if (pread_full(u->fd, u->raw, len, u->offset) != 0) {
		resctl_error("upload: reading %s: %s", o->path, errno == ENODATA ? "file got shorter" : strerror(errno));
		return STEP_FAIL;
	}
	const uint8_t *body;
	size_t body_len;
	upload_build_chunk(u, len, last, &body, &body_len);
	if (client_send(&u->c, id, body, body_len) != CALL_OK)
		return STEP_RECONNECT;
	if (o->drop_after && !u->dropped && u->seq == o->drop_after) {
		u->dropped = 1;
		snprintf(u->c.err, sizeof(u->c.err), "connection dropped on purpose (--drop-after)");
		client_close(&u->c);
		return STEP_RECONNECT;
	}

	yajl_val answer;
	int r = client_answer(&u->c, id, &answer);
	if (r != CALL_OK) {
		if (r == CALL_DROPPED)
			return STEP_RECONNECT;
		resctl_error("upload: %s", u->c.err);
		return STEP_FAIL;
	}
	enum upload_step step = STEP_NEXT;
	int64_t code = answer_error(answer);
	if (code == 0) {
		u->acked++;
		u->sent_bytes += len;
		backoff_reset(&u->backoff);
		/* Like the Qt client, go where the answer says: instant upload asks for chunks at other
		 * offsets (seq * chunk = trans_size) and ends with trans_size = total_size early. */
		uint64_t trans, aseq;
		int moved = answer_u64(answer, "trans_size", &trans) == 0 && answer_u64(answer, "seq", &aseq) == 0 &&
		    trans != u->offset + len && trans <= u->total && (trans == u->total || trans % o->chunk == 0);
		if (moved)
			last = trans == u->total;   /* a challenged last chunk may be answered with the next challenge */
		const char *message = answer_str(answer, "message");
		if (last && message && strncmp(message, "instant upload", 14) == 0)
			u->instant = 1;   /* published from content the server had (the last chunk may be a challenged one) */
		resctl_progress_update(&u->progress, moved ? trans : u->offset + len, u->total);
		if (last)
			step = STEP_DONE;
		else if (o->stop_after && u->acked == o->stop_after)
			step = STEP_STOPPED;
		if (moved && !last) {
			upload_position(u, trans, aseq + 1);
		} else {
			u->offset += len;
			u->seq++;
		}
	} else if (code == ERR_BUSY || code == ERR_SERVER_UPLOADS) {
		step = STEP_RECONNECT;   /* 1036: the node is full of uploads for now; back off and retry */
	} else if ((code == ERR_OFFSET_INVALID || (code == ERR_FILE_NOT_EXISTS && u->seq > 1)) &&
	    ++u->rewinds <= o->retries) {
		if (code == ERR_OFFSET_INVALID)
			step = upload_rewind(u, answer);
		else
			upload_position(u, 0, 1);   /* the record expired: start again */
	} else {
		report_server_error("upload", answer);
		step = STEP_FAIL;
	}
	yajl_tree_free(answer);
	return step;
}

#define JSON_FRAME_OVERHEAD 512    /* the fields of a 1003 around its base64 data, generously */

/* Backs off and reconnects; -1 once the retries are used up (reported). */
static int upload_reconnect(struct upload *u)
{
	int lost = strcmp(u->c.err, "server busy") != 0 && strncmp(u->c.err, "cannot connect", 14) != 0;
	for (;;) {
		client_close(&u->c);
		if (backoff_wait(&u->backoff, "upload", &u->progress, lost, u->c.err) != 0) {
			resctl_progress_clear(&u->progress);
			resctl_error("upload: giving up after %" PRIu64 " attempts: %s", u->backoff.attempts, u->c.err);
			/* A server closes a connection whose frame is over its max_frame, without an answer. */
			if (u->b64_cap + JSON_FRAME_OVERHEAD > FRAME_MAX_DEFAULT)
				resctl_error("upload: --chunk %" PRIu64 " makes JSON frames of about %zu bytes, more than "
				    "a server's default max_frame (%d), which closes such connections: try --chunk %dK",
				    u->o->chunk, u->b64_cap + JSON_FRAME_OVERHEAD, FRAME_MAX_DEFAULT,
				    FRAME_MAX_DEFAULT / 2 / 1024);   /* half of it: its base64 and the fields fit */
			u->gave_up = 1;
			return -1;
		}
		lost = 0;
		if (client_connect(&u->c) == CALL_OK)
			return 0;
	}
}

static enum upload_step upload_run(struct upload *u)
{
	enum upload_step step = STEP_SYNC;   /* always ask first: a previous run may have left a record */
	if (client_connect(&u->c) != CALL_OK) {
		resctl_error("upload: %s", u->c.err);
		return STEP_FAIL;
	}
	for (;;) {
		switch (step) {
		case STEP_RECONNECT:
			if (u->c.err[0] == '\0')
				snprintf(u->c.err, sizeof(u->c.err), "server busy");
			if (upload_reconnect(u) != 0)
				return STEP_FAIL;
			step = STEP_SYNC;
			break;
		case STEP_SYNC:
			u->c.err[0] = '\0';
			step = upload_sync(u);
			break;
		case STEP_NEXT:
			u->c.err[0] = '\0';
			step = upload_chunk(u);
			break;
		case STEP_STOPPED:
		case STEP_DONE:
		case STEP_FAIL:
			return step;
		}
	}
}

static int upload_open(struct upload *u, const struct upload_opts *o)
{
	struct stat st;
	u->fd = open(o->path, O_RDONLY | O_CLOEXEC);
	if (u->fd < 0 || fstat(u->fd, &st) != 0) {
		resctl_error("upload: %s: %s", o->path, strerror(errno));
		return -1;
	}
	if (!S_ISREG(st.st_mode)) {
		resctl_error("upload: %s: not a regular file", o->path);
		return -1;
	}
	u->total = (uint64_t)st.st_size;
	u->b64_cap = b64_encode_room(o->chunk);
	u->raw = malloc(o->chunk > UPLOAD_READ_SIZE ? o->chunk : UPLOAD_READ_SIZE);
	u->b64 = malloc(u->b64_cap);
	if (u->raw == NULL || u->b64 == NULL || qt_writer_init(&u->w) != 0) {
		resctl_error("upload: out of memory");
		return -1;
	}
	return 0;
}

static void upload_report(const struct upload *u, enum upload_step step, int64_t start_ns)
{
	double seconds = (double)(resctl_now_ns() - start_ns) / 1e9;
	double rate = seconds > 0 ? (double)u->sent_bytes / 1e6 / seconds : 0;
	if (step == STEP_STOPPED) {
		printf("stopped %s after %" PRIu64 " chunks: %" PRIu64 " of %" PRIu64 " bytes, md5 %s\n",
		    u->o->name, u->acked, u->offset, u->total, u->md5);
		return;
	}
	/* The rate is of what was sent: name the amount when it is not the file (resumed, instant). */
	printf("uploaded %s: %" PRIu64 " bytes in %.3f s", u->o->name, u->total, seconds);
	if (u->sent_bytes == u->total)
		printf(" (%.2f MB/s)", rate);
	else
		printf(" (sent %" PRIu64 " bytes at %.2f MB/s)", u->sent_bytes, rate);
	printf(", md5 %s", u->md5);
	if (u->resumes)
		printf(", resumed %u time%s", u->resumes, u->resumes == 1 ? "" : "s");
	printf("\n");
	if (u->instant)
		printf("already on the server: published without sending (%.1f MB saved)\n",
		    (double)(u->total > u->sent_bytes ? u->total - u->sent_bytes : 0) / 1e6);
}

static enum upload_step upload_binary(struct upload *u, int chunk_given);

static int cmd_upload(int argc, char **argv)
{
	static const struct option longopts[] = {
		COMMON_LONG_OPTIONS,
		{ "name", required_argument, NULL, OPT_NAME },
		{ "avatar", no_argument, NULL, OPT_AVATAR },
		{ "chunk", required_argument, NULL, OPT_CHUNK },
		{ "retries", required_argument, NULL, OPT_RETRIES },
		{ "drop-after", required_argument, NULL, OPT_DROP_AFTER },
		{ "stop-after", required_argument, NULL, OPT_STOP_AFTER },
		{ "compat", no_argument, NULL, OPT_COMPAT },
		{ NULL, 0, NULL, 0 },
	};
	struct upload_opts o = { .chunk = RESCTL_CHUNK, .retries = 10, .timeout_ms = RESCTL_TIMEOUT_MS };
	int n = resctl_parse_options("upload", argc, argv, longopts, upload_usage, upload_option, &o);
	if (n < 0 || need_positionals("upload", n, 2) != 0 || parse_endpoint_arg("upload", argv[optind], &o.ep) != 0 ||
	    auth_finish("upload", &o.auth) != 0)
		return RESCTL_EXIT_USAGE;
	o.path = argv[optind + 1];
	if (o.name == NULL) {
		const char *slash = strrchr(o.path, '/');
		o.name = slash ? slash + 1 : o.path;
	}
	if (!proto_name_valid(o.name, strlen(o.name))) {
		resctl_error("upload: '%s' is not a valid file name (1-255 bytes of UTF-8, no '/', no leading '.')", o.name);
		return RESCTL_EXIT_USAGE;
	}
	if (o.avatar && (!o.auth.has_uid || o.auth.token == NULL)) {
		resctl_error("upload: --avatar needs --uid and a token");
		return RESCTL_EXIT_USAGE;
	}

	struct upload u = { .o = &o, .fd = -1, .backoff = { .max_attempts = o.retries } };
	backoff_reset(&u.backoff);
	client_init(&u.c, &o.ep, o.timeout_ms);
	enum upload_step step = STEP_FAIL;
	if (upload_open(&u, &o) == 0 && upload_hash(&u) == 0) {
		int64_t start = resctl_now_ns();
		resctl_progress_init(&u.progress, o.name);
		/* The testing options count JSON chunks; without credentials there is no fast path. */
		int binary = !o.compat && o.auth.has_uid && !o.drop_after && !o.stop_after;
		step = binary ? upload_binary(&u, o.chunk_given) : STEP_SYNC;
		if (step == STEP_SYNC)
			step = upload_run(&u);
		resctl_progress_clear(&u.progress);
		if (step == STEP_DONE || step == STEP_STOPPED)
			upload_report(&u, step, start);
		else if (u.gave_up && u.offset > 0)
			resctl_error("upload: the server holds %.1f MB of %.1f MB: run the same command again to resume",
			    (double)u.offset / 1e6, (double)u.total / 1e6);
	}
	client_close(&u.c);
	buf_free(&u.c.in);
	json_writer_free(&u.w);
	free(u.raw);
	free(u.b64);
	if (u.fd >= 0)
		close(u.fd);
	return step == STEP_DONE ? RESCTL_EXIT_OK : step == STEP_STOPPED ? RESCTL_EXIT_STOPPED : RESCTL_EXIT_FAIL;
}

/* ================================================================ download */

#define DOWNLOAD_PART_SUFFIX ".resctl-part"
#define DOWNLOAD_STATE_SUFFIX ".resctl-state"
#define DOWNLOAD_STATE_MAGIC "resctl-download 1"

struct download_opts {
	struct resctl_endpoint ep;
	const char *name;
	const char *outfile;
	struct resctl_auth auth;
	uint64_t retries;
	uint64_t stop_after;       /* testing: exit 3 after this many chunks written; 0 = never */
	int force;                 /* replace an existing OUTFILE */
	int timeout_ms;
	int compat;                /* --compat: 1033 even when the server has the fast path */
};

/* One 1034 answer, data decoded into the download's buffer. */
struct download_chunk {
	uint64_t total;      /* total_size */
	uint64_t current;    /* current_size: offset + len */
	int is_last;
	size_t len;
};

/* What a partial download was: the server-side identity of its file, and how much of it is on disk. */
struct download_state {
	char name[PROTO_NAME_MAX + 1];
	char uid[24];              /* "-" without --uid */
	uint64_t total, chunk, received;
};

/* The data goes to OUTFILE.resctl-part, renamed to OUTFILE once complete; OUTFILE.resctl-state
 * says what the part file holds, so that only a partial download of the same file is resumed. */
struct download {
	const struct download_opts *o;
	char part[4096], state_path[4096];
	int fd;                    /* the part file */
	int state_fd;
	struct download_state saved;   /* read from the state file; total 0 when there was none */
	char uid[24];              /* this run's user, as the state file writes it */
	struct client c;
	struct json_writer w;
	struct backoff backoff;
	uint8_t *raw;
	size_t raw_cap;
	uint64_t have;             /* bytes of the part file that are right */
	uint64_t total;            /* 0 until the first answer */
	uint64_t received;         /* bytes received in this run */
	uint64_t written;          /* chunks written in this run (--stop-after) */
	int gave_up;               /* the retries ran out: a rerun can resume */
	struct md5 md5;
	struct resctl_progress progress;
};

static int download_option(void *ctx, int opt, const char *arg)
{
	struct download_opts *o = ctx;
	int r = common_option("download", opt, arg, &o->auth, &o->timeout_ms);
	if (r != 0)
		return r < 0 ? -1 : 0;
	if (opt == OPT_FORCE) {
		o->force = 1;
		return 0;
	}
	if (opt == OPT_COMPAT) {
		o->compat = 1;
		return 0;
	}
	if (opt == OPT_RETRIES && resctl_parse_u64(arg, 1000000, &o->retries) != 0) {
		resctl_error("download: bad value '%s' for --retries", arg);
		return -1;
	}
	if (opt == OPT_STOP_AFTER && resctl_parse_u64(arg, UINT32_MAX, &o->stop_after) != 0) {
		resctl_error("download: bad value '%s' for --stop-after", arg);
		return -1;
	}
	return 0;
}

static const char download_usage[] =
	"usage: resctl download HOST:PORT NAME OUTFILE [--uid U --token T] [--force]\n"
	"                       [--retries N] [--timeout S] [--compat]\n"
	"Downloads the file NAME into OUTFILE.resctl-part and renames it to OUTFILE once\n"
	"every byte is in. With --uid and a server that has the binary fast path, it\n"
	"asks for large ranges of one version of the file (sent with sendfile) and\n"
	"starts from byte 0 (a part left by an earlier run is resumed in JSON).\n"
	"Otherwise, or with --compat, it goes chunk by chunk in\n"
	"JSON, and OUTFILE.resctl-state records which file the part holds:\n"
	"running the same command again after a failure resumes it (only a part of the\n"
	"same file, checked against the server's bytes, is resumed).\n"
	"  --force          replace OUTFILE if it exists (refused otherwise)\n"
	"  --compat         use the JSON messages of the Qt client\n"
	"  --retries N      reconnect attempts in a row before giving up (default 10)\n"
	COMMON_HELP
	"Testing: --stop-after K exits with status 3 after K chunks, leaving the part.\n";

/* Reads a 1034 answer into ch; 0, or -1 with the reason in the client's err. */
static int download_parse(struct download *d, yajl_val answer, struct download_chunk *ch)
{
	const char *data;
	size_t data_len;
	if (json_get_str(answer, "data", &data, &data_len) != JSON_FIELD_OK ||
	    answer_u64(answer, "total_size", &ch->total) != 0) {
		snprintf(d->c.err, sizeof(d->c.err), "answer without data or total_size");
		return -1;
	}
	size_t cap = proto_b64_decoded_max(data_len);
	if (cap > d->raw_cap) {
		uint8_t *raw = realloc(d->raw, cap);
		if (raw == NULL) {
			snprintf(d->c.err, sizeof(d->c.err), "out of memory");
			return -1;
		}
		d->raw = raw;
		d->raw_cap = cap;
	}
	if (b64_decode_strict(d->raw, d->raw_cap, data, data_len, &ch->len) != 0) {
		snprintf(d->c.err, sizeof(d->c.err), "data is not valid base64");
		return -1;
	}
	if (answer_u64(answer, "current_size", &ch->current) != 0)
		ch->current = UINT64_MAX;   /* checked by the caller */
	if (json_get_flag(answer, "is_last", &ch->is_last) != JSON_FIELD_OK)
		ch->is_last = ch->current == ch->total;
	return 0;
}

/* Fetches chunk seq, reconnecting with back-off; 0, or -1 after printing why. */
static int download_fetch(struct download *d, uint64_t seq, struct download_chunk *ch)
{
	const struct download_opts *o = d->o;
	for (;;) {
		int lost = 0;
		if (d->c.fd < 0 && client_connect(&d->c) != CALL_OK)
			goto retry;
		json_begin(&d->w);
		put_cstr(&d->w, "client_path", o->outfile);
		put_cstr(&d->w, "name", o->name);
		json_put_int(&d->w, "seq", (int64_t)seq);
		put_token(&d->w, &o->auth);
		json_put_int(&d->w, "total_size", (int64_t)d->total);
		json_put_int(&d->w, "trans_size", (int64_t)d->have);
		put_uid(&d->w, &o->auth);
		const uint8_t *body;
		size_t len;
		json_end(&d->w, &body, &len);
		yajl_val answer;
		int r = client_call(&d->c, MSG_DOWNLOAD, body, len, &answer);
		if (r == CALL_BROKEN) {
			resctl_progress_clear(&d->progress);
			resctl_error("download: %s", d->c.err);
			return -1;
		}
		lost = r == CALL_DROPPED;
		if (r == CALL_OK) {
			int64_t code = answer_error(answer);
			if (code == 0) {
				r = download_parse(d, answer, ch);
				yajl_tree_free(answer);
				if (r != 0)
					resctl_error("download: answer to seq %" PRIu64 ": %s", seq, d->c.err);
				else
					backoff_reset(&d->backoff);
				return r;
			}
			if (code != ERR_BUSY) {
				resctl_progress_clear(&d->progress);
				report_server_error("download", answer);
				yajl_tree_free(answer);
				return -1;
			}
			snprintf(d->c.err, sizeof(d->c.err), "server busy");
			yajl_tree_free(answer);
		}
retry:
		client_close(&d->c);
		if (backoff_wait(&d->backoff, "download", &d->progress, lost, d->c.err) != 0) {
			resctl_progress_clear(&d->progress);
			resctl_error("download: giving up after %" PRIu64 " attempts: %s", d->backoff.attempts, d->c.err);
			d->gave_up = 1;
			return -1;
		}
	}
}

/* The received count sits at a fixed place at the end of the state file: one pwrite per chunk. */
#define STATE_RECEIVED_WIDTH 20

static int state_write(struct download *d, uint64_t chunk)
{
	char text[1024];
	int n = snprintf(text, sizeof(text), DOWNLOAD_STATE_MAGIC "\nname %s\nuid %s\ntotal_size %" PRIu64
	    "\nchunk %" PRIu64 "\nreceived %0*" PRIu64 "\n", d->o->name, d->uid, d->total, chunk,
	    STATE_RECEIVED_WIDTH, d->have);
	if (d->state_fd >= 0)
		close(d->state_fd);
	d->state_fd = open(d->state_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (d->state_fd < 0 || write(d->state_fd, text, (size_t)n) != n) {
		resctl_error("download: writing %s: %s", d->state_path, strerror(errno));
		return -1;
	}
	return 0;
}

static int state_update(struct download *d)
{
	char field[STATE_RECEIVED_WIDTH + 2];
	snprintf(field, sizeof(field), "%0*" PRIu64 "\n", STATE_RECEIVED_WIDTH, d->have);
	off_t end = lseek(d->state_fd, 0, SEEK_END);
	if (end < (off_t)sizeof(field) - 1 ||
	    pwrite(d->state_fd, field, sizeof(field) - 1, end - (off_t)(sizeof(field) - 1)) != (ssize_t)sizeof(field) - 1) {
		resctl_error("download: writing %s: %s", d->state_path, strerror(errno));
		return -1;
	}
	return 0;
}

/* Reads OUTFILE.resctl-state; 0 when it is there and whole. */
static int state_read(struct download *d, struct download_state *st)
{
	FILE *f = fopen(d->state_path, "re");
	if (f == NULL)
		return -1;
	char line[1024];
	int fields = 0, magic = 0;
	while (fgets(line, sizeof(line), f) != NULL) {
		line[strcspn(line, "\n")] = '\0';
		if (strcmp(line, DOWNLOAD_STATE_MAGIC) == 0)
			magic = 1;
		else if (strncmp(line, "name ", 5) == 0 && strlen(line + 5) < sizeof(st->name))
			fields += snprintf(st->name, sizeof(st->name), "%s", line + 5) >= 0;
		else if (strncmp(line, "uid ", 4) == 0 && strlen(line + 4) < sizeof(st->uid))
			fields += snprintf(st->uid, sizeof(st->uid), "%s", line + 4) >= 0;
		else if (strncmp(line, "total_size ", 11) == 0)
			fields += resctl_parse_u64(line + 11, UINT64_MAX, &st->total) == 0;
		else if (strncmp(line, "chunk ", 6) == 0)
			fields += resctl_parse_u64(line + 6, UINT64_MAX, &st->chunk) == 0;
		else if (strncmp(line, "received ", 9) == 0)
			fields += resctl_parse_u64(line + 9, UINT64_MAX, &st->received) == 0;
	}
	fclose(f);
	return magic && fields == 5 ? 0 : -1;
}

static int download_write(struct download *d, uint64_t offset, size_t len)
{
	size_t done = 0;
	while (done < len) {
		ssize_t n = pwrite(d->fd, d->raw + done, len - done, (off_t)(offset + done));
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			resctl_error("download: writing %s: %s", d->part, strerror(errno));
			return -1;
		}
		done += (size_t)n;
	}
	md5_update(&d->md5, d->raw, len);
	d->have = offset + len;
	d->received += len;
	d->written++;
	return state_update(d);
}

/* 1 when the part file holds exactly the len bytes of d->raw at offset. */
static int part_matches(struct download *d, uint64_t offset, size_t len)
{
	uint8_t *mine = malloc(len ? len : 1);
	int same = mine != NULL && pread_full(d->fd, mine, len, offset) == 0 && memcmp(mine, d->raw, len) == 0;
	free(mine);
	return same;
}

/* Where a partial download of the same file can go on from (whole chunks, and never the last one). */
static uint64_t download_resumable(struct download *d, uint64_t chunk, const struct download_chunk *first)
{
	const struct download_state *st = &d->saved;
	struct stat sb;
	if (first->is_last || st->total == 0 || fstat(d->fd, &sb) != 0)
		return 0;
	if (strcmp(st->name, d->o->name) != 0 || strcmp(st->uid, d->uid) != 0 || st->total != d->total ||
	    st->chunk != chunk) {
		resctl_error("download: %s holds a different file or version: starting over", d->part);
		return 0;
	}
	uint64_t on_disk = (uint64_t)sb.st_size < st->received ? (uint64_t)sb.st_size : st->received;
	uint64_t keep = on_disk / chunk * chunk;
	uint64_t last_start = (d->total - 1) / chunk * chunk;   /* fetch the last chunk again at least */
	if (keep > last_start)
		keep = last_start;
	/* The server's first chunk must be what the part starts with: same name and size is not enough. */
	if (keep > 0 && !part_matches(d, 0, first->len)) {
		resctl_error("download: the file changed on the server since %s was written: starting over", d->part);
		return 0;
	}
	return keep;
}

/* Truncates the part file to keep bytes and hashes them (the MD5 runs over the file in order). */
static int download_keep(struct download *d, uint64_t keep)
{
	if (ftruncate(d->fd, (off_t)keep) != 0) {
		resctl_error("download: truncating %s: %s", d->part, strerror(errno));
		return -1;
	}
	uint8_t *buf = malloc(1u << 20);
	if (buf == NULL) {
		resctl_error("download: out of memory");
		return -1;
	}
	for (uint64_t off = 0; off < keep;) {
		size_t len = keep - off < (1u << 20) ? (size_t)(keep - off) : (1u << 20);
		if (pread_full(d->fd, buf, len, off) != 0) {
			resctl_error("download: reading %s: %s", d->part, strerror(errno));
			free(buf);
			return -1;
		}
		md5_update(&d->md5, buf, len);
		off += len;
	}
	free(buf);
	d->have = keep;
	return 0;
}

static int download_finish(struct download *d);
static int download_binary(struct download *d);

/* 0 when every byte is in, 3 when --stop-after stopped it, -1 after saying why. */
static int download_run(struct download *d, uint64_t *resumed_from)
{
	struct download_chunk first, ch;
	if (client_connect(&d->c) != CALL_OK) {
		resctl_error("download: %s", d->c.err);
		d->gave_up = 1;
		return -1;
	}
	/* seq 1 tells the server's chunk size: its current_size. */
	if (download_fetch(d, 1, &first) != 0)
		return -1;
	d->total = first.total;
	uint64_t chunk = first.current != UINT64_MAX ? first.current : first.len;
	if (first.len != chunk || (!first.is_last && chunk == 0) || chunk > d->total) {
		resctl_error("download: inconsistent first answer (%zu bytes, current_size %" PRIu64 ", total_size %" PRIu64 ")",
		    first.len, chunk, d->total);
		return -1;
	}
	uint64_t keep = download_resumable(d, chunk, &first);
	if (keep > chunk) {
		/* The part's tail is what a crash leaves unwritten: its last kept chunk must be the server's too. */
		struct download_chunk overlap;
		if (download_fetch(d, keep / chunk, &overlap) != 0)
			return -1;
		if (overlap.len != chunk || !part_matches(d, keep - chunk, overlap.len)) {
			resctl_error("download: %s does not hold the server's bytes before %.1f MB: starting over", d->part,
			    (double)keep / 1e6);
			keep = 0;
			if (download_fetch(d, 1, &first) != 0)   /* its data is needed again */
				return -1;
		}
	}
	if (download_keep(d, keep) != 0 || state_write(d, chunk) != 0)
		return -1;
	*resumed_from = keep;
	uint64_t seq = 1;
	ch = first;
	if (keep == 0) {
		if (download_write(d, 0, first.len) != 0)
			return -1;
	} else {
		resctl_error("download: resuming at %.1f MB (%d%%)", (double)keep / 1e6,
		    (int)(100.0 * (double)keep / (double)d->total));
		resctl_progress_base(&d->progress, keep);
		ch.is_last = 0;   /* seq 1 is already on disk */
		seq = keep / chunk;
	}
	while (!ch.is_last) {
		if (d->o->stop_after && d->written >= d->o->stop_after)
			return 3;
		seq++;
		resctl_progress_update(&d->progress, d->have, d->total);
		if (download_fetch(d, seq, &ch) != 0)
			return -1;
		uint64_t offset = (seq - 1) * chunk;
		if (ch.total != d->total || (ch.current != UINT64_MAX && ch.current != offset + ch.len) ||
		    (ch.len == 0 && !ch.is_last) || offset + ch.len > d->total) {
			resctl_progress_clear(&d->progress);
			resctl_error("download: %s changed on the server or the answer to seq %" PRIu64 " is inconsistent",
			    d->o->name, seq);
			return -1;
		}
		if (download_write(d, offset, ch.len) != 0)
			return -1;
	}
	resctl_progress_clear(&d->progress);
	return download_finish(d);
}

/* Every byte is in the part file: checks its size, flushes it and only then names it OUTFILE. */
static int download_finish(struct download *d)
{
	struct stat st;
	if (fstat(d->fd, &st) != 0 || (uint64_t)st.st_size != d->total || d->have != d->total) {
		resctl_error("download: %s holds %jd bytes, the server announced %" PRIu64, d->part,
		    (intmax_t)st.st_size, d->total);
		return -1;
	}
	/* Complete and checked: only now does OUTFILE appear (or get replaced, with --force). A file
	 * that appeared there meanwhile is not replaced without --force either. */
	if (fsync(d->fd) != 0 ||
	    renameat2(AT_FDCWD, d->part, AT_FDCWD, d->o->outfile, d->o->force ? 0 : RENAME_NOREPLACE) != 0) {
		resctl_error("download: renaming %s to %s: %s%s", d->part, d->o->outfile, strerror(errno),
		    errno == EEXIST ? " (it appeared during the download; the data is complete in the part file)" : "");
		return -1;
	}
	unlink(d->state_path);
	return 0;
}

static int download_open(struct download *d)
{
	const char *path = d->o->outfile;
	struct stat st;
	if ((size_t)snprintf(d->part, sizeof(d->part), "%s" DOWNLOAD_PART_SUFFIX, path) >= sizeof(d->part) ||
	    (size_t)snprintf(d->state_path, sizeof(d->state_path), "%s" DOWNLOAD_STATE_SUFFIX, path) >= sizeof(d->state_path)) {
		resctl_error("download: %s: name too long", path);
		return -1;
	}
	if (lstat(path, &st) == 0) {
		if (S_ISDIR(st.st_mode)) {
			resctl_error("download: %s is a directory", path);
			return -1;
		}
		if (!d->o->force) {
			resctl_error("download: %s exists: not overwritten (use --force to replace it)", path);
			return -1;
		}
	}
	d->fd = open(d->part, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
	if (d->fd < 0 || fstat(d->fd, &st) != 0) {
		resctl_error("download: %s: %s", d->part, strerror(errno));
		return -1;
	}
	if (!S_ISREG(st.st_mode)) {
		resctl_error("download: %s: not a regular file", d->part);
		return -1;
	}
	/* A part without its state (or with a broken one) is not trusted: it starts over. */
	if (state_read(d, &d->saved) != 0)
		d->saved.total = 0;
	if (d->o->auth.has_uid)
		snprintf(d->uid, sizeof(d->uid), "%" PRIu64, d->o->auth.uid);
	else
		snprintf(d->uid, sizeof(d->uid), "-");
	d->raw_cap = 1u << 20;
	d->raw = malloc(d->raw_cap);
	if (d->raw == NULL || qt_writer_init(&d->w) != 0) {
		resctl_error("download: out of memory");
		return -1;
	}
	return 0;
}

static int cmd_download(int argc, char **argv)
{
	static const struct option longopts[] = {
		COMMON_LONG_OPTIONS,
		{ "retries", required_argument, NULL, OPT_RETRIES },
		{ "force", no_argument, NULL, OPT_FORCE },
		{ "stop-after", required_argument, NULL, OPT_STOP_AFTER },
		{ "compat", no_argument, NULL, OPT_COMPAT },
		{ NULL, 0, NULL, 0 },
	};
	struct download_opts o = { .retries = 10, .timeout_ms = RESCTL_TIMEOUT_MS };
	int n = resctl_parse_options("download", argc, argv, longopts, download_usage, download_option, &o);
	if (n < 0 || need_positionals("download", n, 3) != 0 ||
	    parse_endpoint_arg("download", argv[optind], &o.ep) != 0 || auth_finish("download", &o.auth) != 0)
		return RESCTL_EXIT_USAGE;
	o.name = argv[optind + 1];
	o.outfile = argv[optind + 2];
	if (!proto_name_valid(o.name, strlen(o.name))) {
		resctl_error("download: '%s' is not a valid file name", o.name);
		return RESCTL_EXIT_USAGE;
	}

	struct download d = { .o = &o, .fd = -1, .state_fd = -1, .backoff = { .max_attempts = o.retries } };
	backoff_reset(&d.backoff);
	client_init(&d.c, &o.ep, o.timeout_ms);
	if (md5_init(&d.md5) < 0) {
		resctl_error("download: out of memory");
		return RESCTL_EXIT_FAIL;
	}
	uint64_t resumed_from = 0;
	int r = -1;
	int64_t start = resctl_now_ns();
	if (download_open(&d) == 0) {
		resctl_progress_init(&d.progress, o.name);
		/* The fast path starts from byte 0 (its ranges are pinned to a version, not to chunks). */
		r = 1;
		/* A part with its state is resumed by the JSON path, which checks it against the server. */
		if (!o.compat && o.auth.has_uid && !o.stop_after && d.saved.total == 0 && download_keep(&d, 0) == 0) {
			r = download_binary(&d);
			if (r == 0)
				r = download_finish(&d);
			else if (r == 1 && d.have == 0)
				client_close(&d.c);
		}
		if (r == 1)
			r = download_run(&d, &resumed_from);
		resctl_progress_clear(&d.progress);
	}
	if (r == 0) {
		char md5[MD5_HEX_LEN + 1];
		double seconds = (double)(resctl_now_ns() - start) / 1e9;
		md5_final_hex(&d.md5, md5);
		printf("downloaded %s to %s: %" PRIu64 " bytes in %.3f s (%.2f MB/s), md5 %s", o.name, o.outfile,
		    d.total, seconds, seconds > 0 ? (double)d.received / 1e6 / seconds : 0, md5);
		if (resumed_from)
			printf(", resumed at %" PRIu64 ", received %" PRIu64, resumed_from, d.received);
		printf("\n");
	} else if (r == 3) {
		printf("stopped %s after %" PRIu64 " chunks: %" PRIu64 " of %" PRIu64 " bytes in %s\n", o.name, d.written,
		    d.have, d.total, d.part);
	} else if (d.fd >= 0) {
		struct stat st;
		uint64_t kept = fstat(d.fd, &st) == 0 ? (uint64_t)st.st_size : 0;
		if (kept == 0) {
			unlink(d.part);   /* nothing worth keeping */
			unlink(d.state_path);
		} else if (d.gave_up) {
			uint64_t total = d.total ? d.total : d.saved.total;
			resctl_error("download: %.1f MB of %.1f MB are kept in %s: run the same command again to resume",
			    (double)(d.have ? d.have : kept) / 1e6, (double)total / 1e6, d.part);
		}
	}
	if (d.fd >= 0)
		close(d.fd);
	if (d.state_fd >= 0)
		close(d.state_fd);
	client_close(&d.c);
	buf_free(&d.c.in);
	json_writer_free(&d.w);
	free(d.raw);
	md5_free(&d.md5);
	return r == 0 ? RESCTL_EXIT_OK : r == 3 ? RESCTL_EXIT_STOPPED : RESCTL_EXIT_FAIL;
}

/* ================================================================ binary fast path (1041-1048) */

/* What the server's 1042 allows; .ok = 0 when it does not speak the fast path (an older server). */
struct bin_limits {
	int ok;
	uint64_t window, max_inflight, max_chunk, max_range;
};

/* Whether a command's very first connection could not be made: said and ended at once, as on the
 * JSON path (a wrong address or a server that is not running is no dropped connection to retry). */
static int first_connect_failed(const struct client *c, int ever_connected)
{
	return !ever_connected && c->fd < 0 && strncmp(c->err, "cannot connect", 14) == 0;
}

/* Connects and says 1041; CALL_OK with lim->ok = 0 when the server answered 1022 (JSON only). */
static int bin_hello(struct client *c, struct json_writer *w, const struct resctl_auth *auth, struct bin_limits *lim,
    int64_t *code)
{
	memset(lim, 0, sizeof(*lim));
	*code = 0;
	int r = client_connect(c);
	if (r != CALL_OK)
		return r;
	const uint8_t *body;
	size_t len;
	json_begin(w);
	put_token(w, auth);
	put_uid(w, auth);
	json_end(w, &body, &len);
	yajl_val a;
	if ((r = client_call(c, MSG_BIN_HELLO, body, len, &a)) != CALL_OK)
		return r;
	*code = answer_error(a);
	if (*code == 0 && answer_u64(a, "window", &lim->window) == 0 && answer_u64(a, "max_chunk", &lim->max_chunk) == 0 &&
	    answer_u64(a, "max_inflight", &lim->max_inflight) == 0 && answer_u64(a, "max_range", &lim->max_range) == 0 &&
	    lim->max_chunk > 0 && lim->max_inflight > 0 && lim->max_range > 0) {
		lim->ok = 1;
		if (lim->max_chunk > RESCTL_MAX_CHUNK)   /* the client's buffer is sized for this */
			lim->max_chunk = RESCTL_MAX_CHUNK;
	}
	else if (*code == 0)
		*code = ERR_MSG_ID;   /* a 1042 without the limits: treat it as a server without the fast path */
	if (*code && *code != ERR_MSG_ID && *code != ERR_BUSY)
		report_server_error("hello", a);
	yajl_tree_free(a);
	return CALL_OK;
}

struct bin_answer {
	uint32_t error;
	uint64_t offset, committed, total;
	uint32_t length;
	char message[BIN_MSG_MAX + 1];
};

static void bin_message(struct bin_answer *a, const uint8_t *p, size_t have)
{
	size_t n = have >= 2 ? bin_get_u16(p) : 0;
	if (n > have - 2)
		n = have - 2;
	if (n > BIN_MSG_MAX)
		n = BIN_MSG_MAX;
	for (size_t i = 0; i < n; i++)   /* shown on a terminal: printable ASCII only */
		a->message[i] = p[2 + i] >= 0x20 && p[2 + i] < 0x7f ? (char)p[2 + i] : '?';
	a->message[n] = '\0';
}

/* Receives the answer to a binary request id (1044 or 1046). */
static int bin_recv(struct client *c, uint16_t id, struct bin_answer *a)
{
	uint16_t rid;
	const uint8_t *body;
	uint32_t len;
	int r = client_recv(c, &rid, &body, &len);
	if (r != CALL_OK)
		return r;
	memset(a, 0, sizeof(*a));
	if (rid == id + 1 && id == MSG_BIN_UPLOAD_OPEN && len >= BIN_OPEN_ANSWER_LEN) {
		a->error = bin_get_u32(body);
		a->committed = bin_get_u64(body + 4);
		a->total = bin_get_u64(body + 12);
		bin_message(a, body + 20, len - 20);
		return CALL_OK;
	}
	if (rid == id + 1 && id == MSG_BIN_CHUNK && len >= BIN_ACK_LEN) {
		a->error = bin_get_u32(body);
		a->offset = bin_get_u64(body + 4);
		a->length = bin_get_u32(body + 12);
		a->committed = bin_get_u64(body + 16);
		a->total = bin_get_u64(body + 24);
		bin_message(a, body + 32, len - 32);
		return CALL_OK;
	}
	char why[80];
	snprintf(why, sizeof(why), "it answered message %u with message %u of %u bytes", id, rid, len);
	not_resourced(c, why);
	return CALL_BROKEN;
}

static void bin_report(const char *command, const struct bin_answer *a)
{
	report_error(command, a->error, a->message);
}

/* The upload over the fast path: 1043, then chunks kept in flight up to the window. STEP_DONE,
 * STEP_FAIL, or STEP_SYNC when the server does not speak it (the caller goes on with JSON). */
/* The chunks of an instant upload's proof on the fast path (the first one and those asked for). */
#define BIN_PROBE_CHUNK 65536

static enum upload_step upload_binary(struct upload *u, int chunk_given)
{
	const struct upload_opts *o = u->o;
	struct bin_limits lim;
	uint8_t *frame = NULL;
	enum upload_step result = STEP_FAIL;
	for (int connected = 0;; connected = 1) {
		int64_t code;
		int r = bin_hello(&u->c, &u->w, &o->auth, &lim, &code);
		if (r != CALL_OK && first_connect_failed(&u->c, connected)) {
			resctl_error("upload: %s", u->c.err);
			break;
		}
		if (r == CALL_OK && !lim.ok && code == ERR_BUSY) {
			snprintf(u->c.err, sizeof(u->c.err), "server busy");
			r = CALL_DROPPED;
		} else if (r == CALL_OK && !lim.ok) {
			if (code == ERR_MSG_ID) {
				if (verbose)
					resctl_error("upload: the server has no binary fast path: using JSON");
				result = STEP_SYNC;
			}
			break;
		}
		struct bin_answer a;
		size_t chunk = 0;
		if (r == CALL_OK) {
			chunk = chunk_given && o->chunk < lim.max_chunk ? (size_t)o->chunk : (size_t)lim.max_chunk;
			if (frame == NULL && (frame = malloc(BIN_CHUNK_LEN + RESCTL_MAX_CHUNK)) == NULL) {
				resctl_error("upload: out of memory");
				break;
			}
			size_t nlen = strlen(o->name);
			uint8_t open[BIN_OPEN_LEN + PROTO_NAME_MAX];
			uint8_t *p = bin_put_u64(open, u->total);
			/* resctl holds the whole file: it can show any chunk the server asks for. */
			*p++ = (o->avatar ? BIN_OPEN_AVATAR : 0) | BIN_OPEN_INSTANT;
			memcpy(p, u->md5, PROTO_MD5_HEX);
			p = bin_put_u16(p + PROTO_MD5_HEX, (uint16_t)nlen);
			memcpy(p, o->name, nlen);
			if ((r = client_send(&u->c, MSG_BIN_UPLOAD_OPEN, open, BIN_OPEN_LEN + nlen)) == CALL_OK)
				r = bin_recv(&u->c, MSG_BIN_UPLOAD_OPEN, &a);
		}
		if (r == CALL_OK && a.error == ERR_UPLOAD_MISMATCH) {
			/* Another upload of these bytes (another name or size): ours starts over. */
			uint8_t open[BIN_OPEN_LEN + PROTO_NAME_MAX];
			size_t nlen = strlen(o->name);
			uint8_t *p = bin_put_u64(open, u->total);
			*p++ = (o->avatar ? BIN_OPEN_AVATAR : 0) | BIN_OPEN_RESTART | BIN_OPEN_INSTANT;
			memcpy(p, u->md5, PROTO_MD5_HEX);
			p = bin_put_u16(p + PROTO_MD5_HEX, (uint16_t)nlen);
			memcpy(p, o->name, nlen);
			if ((r = client_send(&u->c, MSG_BIN_UPLOAD_OPEN, open, BIN_OPEN_LEN + nlen)) == CALL_OK)
				r = bin_recv(&u->c, MSG_BIN_UPLOAD_OPEN, &a);
		}
		if (r == CALL_BROKEN) {
			resctl_error("upload: %s", u->c.err);
			break;
		}
		if (r == CALL_OK && a.error && a.error != ERR_BUSY && a.error != ERR_SERVER_UPLOADS) {
			bin_report("upload", &a);
			break;
		}
		uint64_t next = 0, acked_to = 0;
		unsigned inflight = 0;
		uint64_t inflight_bytes = 0, lens[256];
		if (r == CALL_OK && a.error == 0) {
			next = acked_to = a.committed;
			if (next > 0 && next <= u->total) {
				u->resumes++;
				resctl_progress_clear(&u->progress);
				resctl_error("upload: resuming at %.1f MB (%d%%)", (double)next / 1e6,
				    (int)(100.0 * (double)next / (double)u->total));
				if (u->acked == 0)
					resctl_progress_base(&u->progress, next);
			}
			if (lim.max_inflight > 256)
				lim.max_inflight = 256;
			int finished = 0;
			int all_sent = 0;
			/* A new upload of several chunks may be instant: chunk 1 goes alone, and while the
			 * server answers 1049 it asks for one more chunk (protocol.md §13, instant upload).
			 * Those chunks are small: the server compares them with content it holds, and the
			 * chunks after a proof that ends go on from the committed size at full length. */
			size_t probe = chunk < BIN_PROBE_CHUNK ? chunk : BIN_PROBE_CHUNK;
			int probing = next == 0 && u->total > probe;
			while (r == CALL_OK && !finished) {
				/* Fill the window, then read one acknowledgement. */
				while (!all_sent && inflight < lim.max_inflight && (!probing || inflight == 0) &&
				    (inflight == 0 || inflight_bytes + chunk <= lim.window)) {
					size_t want = probing ? probe : chunk;
					size_t len = u->total - next < want ? (size_t)(u->total - next) : want;
					int last = next + len == u->total;
					if (len && pread_full(u->fd, frame + BIN_CHUNK_LEN, len, next) != 0) {
						resctl_error("upload: reading %s: %s", o->path,
						    errno == ENODATA ? "file got shorter" : strerror(errno));
						goto out;
					}
					uint8_t *p = bin_put_u64(frame, next);
					p = bin_put_u32(p, (uint32_t)len);
					bin_put_u32(p, last ? BIN_CHUNK_LAST : 0);
					if ((r = client_send(&u->c, MSG_BIN_CHUNK, frame, BIN_CHUNK_LEN + len)) != CALL_OK)
						break;
					lens[(u->acked + inflight) % 256] = len;
					inflight++;
					inflight_bytes += len;
					next += len;
					all_sent = last;
				}
				if (r != CALL_OK)
					break;
				struct bin_answer ack;
				if ((r = bin_recv(&u->c, MSG_BIN_CHUNK, &ack)) != CALL_OK)
					break;
				inflight--;
				inflight_bytes -= lens[u->acked % 256];
				if (probing && ack.error == ERR_CHALLENGE && ack.committed < u->total &&
				    ack.committed % probe == 0) {
					u->acked++;
					u->sent_bytes += ack.length;
					next = ack.committed;   /* the chunk asked for; nothing new is stored */
					all_sent = 0;
					continue;
				}
				if (probing && ack.error == 0) {
					probing = 0;   /* the proof is over: from here on, a normal upload */
					if (ack.committed < u->total) {
						next = ack.committed;
						all_sent = 0;
					} else if (strncmp(ack.message, "instant upload", 14) == 0) {
						u->instant = 1;
					}
				}
				if (ack.error) {
					if ((ack.error == ERR_OFFSET_INVALID || ack.error == ERR_SEQ_INVALID ||
					    ack.error == ERR_FILE_NOT_EXISTS || ack.error == ERR_BUSY ||
					    ack.error == ERR_SERVER_UPLOADS) && ++u->rewinds <= o->retries) {
						snprintf(u->c.err, sizeof(u->c.err), "server said %u: %.200s", ack.error, ack.message);
						r = CALL_DROPPED;   /* open again: its answer says where to go on */
						break;
					}
					resctl_progress_clear(&u->progress);
					bin_report("upload", &ack);
					goto out;
				}
				u->acked++;
				u->sent_bytes += ack.length;
				acked_to = ack.committed;
				backoff_reset(&u->backoff);
				resctl_progress_update(&u->progress, acked_to, u->total);
				if (ack.committed == u->total && inflight == 0)
					finished = 1;
			}
			if (finished) {
				u->offset = u->total;
				result = STEP_DONE;
				break;
			}
		} else if (r == CALL_OK) {
			snprintf(u->c.err, sizeof(u->c.err), "server busy");
		}
		u->offset = acked_to;
		int lost = r != CALL_OK;
		client_close(&u->c);
		if (backoff_wait(&u->backoff, "upload", &u->progress, lost, u->c.err) != 0) {
			resctl_progress_clear(&u->progress);
			resctl_error("upload: giving up after %" PRIu64 " attempts: %s", u->backoff.attempts, u->c.err);
			u->gave_up = 1;
			break;
		}
	}
out:
	free(frame);
	return result;
}

/* Receives a 1048 header; its data is left in c->in, from *data for hdr->length bytes. */
struct bin_range {
	uint32_t error;
	uint64_t size, offset, length;
	char version[BIN_VERSION_MAX + 1];
	char message[BIN_MSG_MAX + 1];
	const uint8_t *data;
};

static int bin_recv_range(struct client *c, struct bin_range *rg)
{
	uint16_t rid;
	const uint8_t *body;
	uint32_t len;
	int r = client_recv(c, &rid, &body, &len);
	if (r != CALL_OK)
		return r;
	memset(rg, 0, sizeof(*rg));
	if (rid == MSG_BIN_DOWNLOAD + 1 && len >= BIN_RANGE_LEN + 2) {
		rg->error = bin_get_u32(body);
		rg->size = bin_get_u64(body + 4);
		rg->offset = bin_get_u64(body + 12);
		rg->length = bin_get_u64(body + 20);
		size_t vlen = body[28];
		if (vlen <= BIN_VERSION_MAX && len >= BIN_RANGE_LEN + vlen + 2) {
			memcpy(rg->version, body + BIN_RANGE_LEN, vlen);
			rg->version[vlen] = '\0';
			const uint8_t *m = body + BIN_RANGE_LEN + vlen;
			size_t mlen = bin_get_u16(m);
			size_t head = BIN_RANGE_LEN + vlen + 2 + mlen;
			if (head <= len && len - head == rg->length) {
				struct bin_answer tmp;
				bin_message(&tmp, m, 2 + mlen);
				memcpy(rg->message, tmp.message, sizeof(rg->message));
				rg->data = body + head;
				return CALL_OK;
			}
		}
	}
	char why[80];
	snprintf(why, sizeof(why), "it answered message %u with message %u of %u bytes", MSG_BIN_DOWNLOAD, rid, len);
	not_resourced(c, why);
	return CALL_BROKEN;
}

static int bin_send_range_request(struct client *c, const char *name, uint64_t offset, uint64_t length,
    const char *version)
{
	uint8_t req[BIN_DOWNLOAD_LEN + PROTO_NAME_MAX + BIN_VERSION_MAX];
	size_t nlen = strlen(name), vlen = strlen(version);
	uint8_t *p = bin_put_u64(req, offset);
	p = bin_put_u64(p, length);
	p = bin_put_u16(p, (uint16_t)nlen);
	*p++ = (uint8_t)vlen;
	memcpy(p, name, nlen);
	memcpy(p + nlen, version, vlen);
	return client_send(c, MSG_BIN_DOWNLOAD, req, BIN_DOWNLOAD_LEN + nlen + vlen);
}

#define BIN_DOWNLOAD_RANGE (16u << 20)   /* bytes asked per 1047; two are kept in flight */

/* The download over the fast path into the part file, ranges pinned to the version of the first
 * answer. 0 done, -1 failed (said), 1 the server has no fast path (the caller goes on with JSON). */
static int download_binary(struct download *d)
{
	struct bin_limits lim;
	char version[BIN_VERSION_MAX + 1] = "";
	for (int connected = 0;; connected = 1) {
		int64_t code;
		int r = bin_hello(&d->c, &d->w, &d->o->auth, &lim, &code);
		if (r != CALL_OK && first_connect_failed(&d->c, connected)) {
			resctl_error("download: %s", d->c.err);
			d->gave_up = 1;
			return -1;
		}
		if (r == CALL_OK && !lim.ok && code == ERR_BUSY) {
			snprintf(d->c.err, sizeof(d->c.err), "server busy");
			r = CALL_DROPPED;
		} else if (r == CALL_OK && !lim.ok) {
			return code == ERR_MSG_ID ? 1 : -1;
		}
		uint64_t range = lim.max_range < BIN_DOWNLOAD_RANGE ? lim.max_range : BIN_DOWNLOAD_RANGE;
		uint64_t asked = d->have;
		int pending = 0;
		while (r == CALL_OK) {
			/* Keep two ranges asked, so the server never waits for the client. */
			while (r == CALL_OK && pending < 2 && (d->total == 0 ? pending == 0 : asked < d->total)) {
				r = bin_send_range_request(&d->c, d->o->name, asked, range, version);
				pending++;
				asked += range;
			}
			if (r != CALL_OK)
				break;
			struct bin_range rg;
			if ((r = bin_recv_range(&d->c, &rg)) != CALL_OK)
				break;
			pending--;
			if (rg.error == ERR_FILE_CHANGED || (rg.error == 0 && version[0] && strcmp(version, rg.version) != 0)) {
				/* Replaced on the server: what the part file holds belongs to the old file. */
				resctl_progress_clear(&d->progress);
				resctl_error("download: %s was replaced on the server: starting over", d->o->name);
				version[0] = '\0';
				if (download_keep(d, 0) != 0)
					return -1;
				md5_free(&d->md5);
				if (md5_init(&d->md5) < 0)
					return -1;
				d->total = 0;
				r = CALL_DROPPED;
				snprintf(d->c.err, sizeof(d->c.err), "file replaced");
				break;
			}
			if (rg.error == ERR_BUSY) {
				snprintf(d->c.err, sizeof(d->c.err), "server busy");
				r = CALL_DROPPED;
				break;
			}
			if (rg.error) {
				resctl_progress_clear(&d->progress);
				report_error("download", rg.error, rg.message);
				return -1;
			}
			if (version[0] == '\0') {
				snprintf(version, sizeof(version), "%s", rg.version);
				d->total = rg.size;
				if (state_write(d, range) != 0)
					return -1;
			}
			if (rg.offset != d->have || rg.size != d->total || rg.offset + rg.length > d->total) {
				resctl_progress_clear(&d->progress);
				resctl_error("download: inconsistent answer (offset %" PRIu64 ", %" PRIu64 " bytes of %" PRIu64 ")",
				    rg.offset, rg.length, rg.size);
				return -1;
			}
			/* Straight from the receive buffer to the part file. */
			for (uint64_t done = 0; done < rg.length;) {
				ssize_t n = pwrite(d->fd, rg.data + done, (size_t)(rg.length - done), (off_t)(rg.offset + done));
				if (n < 0 && errno == EINTR)
					continue;
				if (n < 0) {
					resctl_error("download: writing %s: %s", d->part, strerror(errno));
					return -1;
				}
				done += (uint64_t)n;
			}
			md5_update(&d->md5, rg.data, (size_t)rg.length);
			d->have += rg.length;
			d->received += rg.length;
			d->written++;
			backoff_reset(&d->backoff);
			if (state_update(d) != 0)
				return -1;
			resctl_progress_update(&d->progress, d->have, d->total);
			if (d->have == d->total && pending == 0)
				return 0;
			if (rg.length == 0 && d->have < d->total) {
				resctl_error("download: the server sent an empty range before the end");
				return -1;
			}
		}
		if (r == CALL_BROKEN) {
			resctl_error("download: %s", d->c.err);
			return -1;
		}
		int lost = strcmp(d->c.err, "server busy") != 0;
		client_close(&d->c);
		if (backoff_wait(&d->backoff, "download", &d->progress, lost, d->c.err) != 0) {
			resctl_progress_clear(&d->progress);
			resctl_error("download: giving up after %" PRIu64 " attempts: %s", d->backoff.attempts, d->c.err);
			d->gave_up = 1;
			return -1;
		}
	}
}

/* ================================================================ dispatch */

struct command {
	const char *name;
	int (*run)(int argc, char **argv);
	const char *summary;
};

static const struct command commands[] = {
	{ "ping", cmd_ping, "check that a server answers, and how fast" },
	{ "upload", cmd_upload, "upload a file (or an avatar), resuming when possible" },
	{ "sync", cmd_sync, "show how far the server got with an upload" },
	{ "download", cmd_download, "download a file, resuming an interrupted download" },
	{ "bench", resctl_bench_main, "load generator: many connections uploading and downloading" },
	{ "stats", resctl_stats_main, "query or command a running server's stats socket" },
};

static void usage(FILE *out)
{
	fputs("usage: resctl COMMAND [ARGS...]   (resctl COMMAND --help for details)\n", out);
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		fprintf(out, "  %-9s %s\n", commands[i].name, commands[i].summary);
}

int main(int argc, char **argv)
{
	signal(SIGPIPE, SIG_IGN);   /* a peer that goes away is an error to report, not a signal */
	if (sodium_init() < 0) {
		resctl_error("libsodium failed to initialise");
		return RESCTL_EXIT_FAIL;
	}
	if (argc < 2) {
		usage(stderr);
		return RESCTL_EXIT_USAGE;
	}
	if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
		usage(stdout);
		return RESCTL_EXIT_OK;
	}
	if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-V") == 0) {
#ifdef PACKAGE_VERSION
		printf("resctl %s\n", PACKAGE_VERSION);
#else
		printf("resctl\n");
#endif
		return RESCTL_EXIT_OK;
	}
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		if (strcmp(argv[1], commands[i].name) == 0)
			return commands[i].run(argc - 1, argv + 1);
	resctl_error("unknown command '%s' (see resctl --help)", argv[1]);
	return RESCTL_EXIT_USAGE;
}

/* resctl.h: what the resctl commands share: argument parsing, addresses, receive buffers, progress and the bench entry point. */
#ifndef RESOURCED_RESCTL_H
#define RESOURCED_RESCTL_H

#include "buf.h"

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

/* ---------------------------------------------------------------- defaults */

#define RESCTL_TIMEOUT_MS 30000          /* per response: a client that hangs forever is a bug */
#define RESCTL_CHUNK 32768               /* the Qt client's upload chunk */
#define RESCTL_MAX_CHUNK (16u << 20)     /* a frame bigger than this is certainly refused */
#define RESCTL_MAX_RESPONSE (64u << 20)  /* responses larger than this are a broken peer */
#define RESCTL_BACKOFF_FIRST_MS 100      /* reconnect back-off: 100 ms doubling ... */
#define RESCTL_BACKOFF_MAX_MS 5000       /* ... up to 5 s */

/* Exit statuses of every command. */
enum resctl_exit {
	RESCTL_EXIT_OK = 0,
	RESCTL_EXIT_FAIL = 1,      /* the operation failed (network, server error, file) */
	RESCTL_EXIT_USAGE = 2,     /* bad command line */
	RESCTL_EXIT_STOPPED = 3,   /* upload --stop-after: stopped on purpose, resumable */
};

/* ---------------------------------------------------------------- messages */

/* "resctl: ..." on stderr, newline added. */
void resctl_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* The protocol's name of an error code ("ServerBusy"), or "unknown". */
const char *resctl_error_name(int64_t code);

/* ---------------------------------------------------------------- arguments */

/* HOST:PORT or [IPv6]:PORT as given on the command line. */
struct resctl_endpoint {
	char host[256];
	char port[8];
	char text[280];   /* as typed, for messages */
};
int resctl_parse_endpoint(const char *arg, struct resctl_endpoint *ep);

/* Decimal integer in [0, max]; 0 on success, -1 otherwise. */
int resctl_parse_u64(const char *s, uint64_t max, uint64_t *out);
/* Byte count with an optional K/M/G (or KiB/MiB/GiB) suffix, powers of 1024. */
int resctl_parse_size(const char *s, uint64_t max, uint64_t *out);
/* Non-negative seconds, fractions allowed, converted to milliseconds. */
int resctl_parse_seconds_ms(const char *s, uint64_t max_ms, uint64_t *out_ms);

/* Credentials given with --uid/--token; absent fields are left out of requests. */
struct resctl_auth {
	int has_uid;
	uint64_t uid;
	const char *token;   /* NULL when not given */
	const char *token_file;   /* --token-file: read by the command before it connects */
};

/* An option parser failure message for getopt_long's '?' or ':' return. */
void resctl_bad_option(const char *command, char *const argv[], int opt);

/* Runs getopt_long over a command's argv: --help/-h (longopts must map it to 'h') prints
 * usage and exits 0; every other option goes to fn, which returns 0 or -1 after saying why.
 * Returns the number of positional arguments, found at argv + optind, or -1. */
struct option;
int resctl_stats_main(int argc, char **argv);

typedef int resctl_option_fn(void *ctx, int opt, const char *arg);
int resctl_parse_options(const char *command, int argc, char **argv, const struct option *longopts,
    const char *usage, resctl_option_fn *fn, void *ctx);

/* ---------------------------------------------------------------- network */

/* Resolves the endpoint to a list of stream addresses; free with freeaddrinfo. */
struct addrinfo;
int resctl_resolve(const struct resctl_endpoint *ep, struct addrinfo **out, char *err, size_t errlen);
/* "1.2.3.4:80" or "[::1]:80" for a connected socket's peer. */
void resctl_peer_name(int fd, char *out, size_t outlen);
/* Sets TCP_NODELAY: stop-and-wait traffic must not wait for Nagle. */
void resctl_tune_socket(int fd);

/* Monotonic clock. */
int64_t resctl_now_ns(void);

/* ---------------------------------------------------------------- receive buffer */

/* Bytes received and not yet consumed are a struct buf (buf.h), whose memory is kept between
 * frames. Takes one whole frame off the front: 1 with the frame, 0 when more bytes are needed,
 * -1 when the header announces more than RESCTL_MAX_RESPONSE. *need says how many bytes the
 * whole frame has when it is known. The body stays valid until the next buf_reserve. */
int resctl_take_frame(struct buf *in, uint16_t *id, const uint8_t **body, uint32_t *len, size_t *need);

/* ---------------------------------------------------------------- progress */

/* A one-line progress bar on stderr, drawn only when stderr is a terminal. */
struct resctl_progress {
	int enabled;
	int drawn;
	int64_t start_ns;
	int64_t last_draw_ns;
	const char *label;
	uint64_t base;       /* bytes already there when this run started: not in the rate */
};
void resctl_progress_init(struct resctl_progress *p, const char *label);
/* Bytes a resumed transfer starts from; the rate and ETA count only what moves in this run. */
void resctl_progress_base(struct resctl_progress *p, uint64_t done);
/* Redraws at most ten times a second; total 0 means unknown. */
void resctl_progress_update(struct resctl_progress *p, uint64_t done, uint64_t total);
void resctl_progress_text(struct resctl_progress *p, const char *text);
void resctl_progress_clear(struct resctl_progress *p);

/* ---------------------------------------------------------------- commands */

/* Each command gets argv with argv[0] = its own name and returns an exit status. */
int resctl_bench_main(int argc, char **argv);

#endif

/* bench.c: the resctl load generator: connections on one libev loop uploading and downloading files, stop-and-wait (JSON) or with a sliding window (fast-path uploads). */
#include "config.h"
#include "resctl.h"
#include "b64.h"
#include "binproto.h"
#include "digest.h"
#include "frame.h"
#include "json.h"
#include "proto.h"

#include <errno.h>
#include <ev.h>
#include <getopt.h>
#include <inttypes.h>
#include <netdb.h>
#include <sodium.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>
#include <yajl/yajl_gen.h>
#include <yajl/yajl_parse.h>

/* ================================================================ options */

enum bench_mode { MODE_UPLOAD, MODE_DOWNLOAD, MODE_MIXED };
enum bench_role { ROLE_UPLOAD, ROLE_DOWNLOAD, ROLE_COUNT };

static const char *const mode_names[] = { "upload", "download", "mixed" };
static const char *const role_names[] = { "upload", "download" };

#define BENCH_MAX_CONNECTIONS 10000
#define BENCH_MAX_SIZE (UINT64_C(1) << 30)          /* its MD5 is computed before the run */
#define BENCH_PERIOD (UINT64_C(8) << 20)            /* a file's content repeats after about this much */
#define BENCH_DOWNLOAD_NAME "bench-dl"
#define BENCH_TAIL_MAX 8                            /* bytes varied per file */
#define BENCH_SETUP_TRIES 10                        /* failures in a row before the bench-dl upload gives up */
#define BENCH_WINDOW_MAX 16                         /* fast-path chunks a connection keeps unacknowledged, at most */

struct bench_opts {
	struct resctl_endpoint ep;
	uint64_t connections;
	uint64_t size;             /* bytes per file */
	uint64_t files;            /* stop after this many files; 0 = no limit */
	uint64_t chunk;            /* upload chunk */
	enum bench_mode mode;
	uint64_t duration_ms;      /* 0 = no limit */
	struct resctl_auth auth;
	int json;
	int timeout_ms;
	int binary;                /* --protocol binary: the fast path (1041-1048) */
	int chunk_given;
};

enum bench_option {
	BOPT_HELP = 'h',
	BOPT_CONNECTIONS = 256,
	BOPT_SIZE,
	BOPT_FILES,
	BOPT_CHUNK,
	BOPT_MODE,
	BOPT_DURATION,
	BOPT_UID,
	BOPT_TOKEN,
	BOPT_JSON,
	BOPT_TIMEOUT,
	BOPT_PROTOCOL,
};

static const char bench_usage[] =
	"usage: resctl bench HOST:PORT [--connections C] [--size BYTES] [--files N] [--chunk BYTES]\n"
	"                    [--mode upload|download|mixed] [--duration S] [--uid U --token T]\n"
	"                    [--json] [--timeout S] [--protocol json|binary]\n"
	"Load generator: C connections on one event loop, each stop-and-wait like the Qt client\n"
	"(JSON) or keeping a window of chunks in flight (binary uploads).\n"
	"upload: every connection uploads files of random bytes named bench-<conn>-<n>;\n"
	"download: uploads " BENCH_DOWNLOAD_NAME " once (untimed), then every connection downloads it\n"
	"over and over and checks the bytes; mixed: half the connections do each.\n"
	"  --connections C  connections (default 16)\n"
	"  --size BYTES     file size, K/M/G suffixes allowed (default 8M, at most 1G)\n"
	"  --files N        stop after N files in total (default: no limit)\n"
	"  --chunk BYTES    upload chunk size (default 32768 in JSON, 1M on the fast path;\n"
	"                   the server picks JSON download chunks)\n"
	"  --protocol P     json (default: 1003/1033, stop-and-wait) or binary (the fast path:\n"
	"                   needs --uid; uploads keep a window of raw chunks in flight, 8 MiB and\n"
	"                   at most 16 chunks: each acknowledgement sends the next chunk at once;\n"
	"                   downloads ask 16 MiB ranges sent with sendfile)\n"
	"  --mode M         upload, download or mixed (default upload)\n"
	"  --duration S     stop after S seconds, whichever of the limits comes first (default 10; 0 = none)\n"
	"  --uid U, --token T  credentials sent with every request (left out when not given)\n"
	"  --json           print the results as one JSON object\n"
	"  --timeout S      seconds to wait for each answer (default 30)\n"
	"Exits 0 when no request failed.\n";

static const struct option bench_longopts[] = {
	{ "help", no_argument, NULL, BOPT_HELP },
	{ "connections", required_argument, NULL, BOPT_CONNECTIONS },
	{ "size", required_argument, NULL, BOPT_SIZE },
	{ "files", required_argument, NULL, BOPT_FILES },
	{ "chunk", required_argument, NULL, BOPT_CHUNK },
	{ "mode", required_argument, NULL, BOPT_MODE },
	{ "duration", required_argument, NULL, BOPT_DURATION },
	{ "uid", required_argument, NULL, BOPT_UID },
	{ "token", required_argument, NULL, BOPT_TOKEN },
	{ "json", no_argument, NULL, BOPT_JSON },
	{ "timeout", required_argument, NULL, BOPT_TIMEOUT },
	{ "protocol", required_argument, NULL, BOPT_PROTOCOL },
	{ NULL, 0, NULL, 0 },
};

static const char *bench_option_name(int opt)
{
	for (const struct option *lo = bench_longopts; lo->name != NULL; lo++)
		if (lo->val == opt)
			return lo->name;
	return "?";
}

static int bench_parse_option(void *ctx, int opt, const char *arg)
{
	struct bench_opts *o = ctx;
	uint64_t v;
	switch (opt) {
	case BOPT_CONNECTIONS:
		if (resctl_parse_u64(arg, BENCH_MAX_CONNECTIONS, &o->connections) == 0 && o->connections > 0)
			return 0;
		break;
	case BOPT_SIZE:
		if (resctl_parse_size(arg, BENCH_MAX_SIZE, &o->size) == 0)
			return 0;
		break;
	case BOPT_FILES:
		if (resctl_parse_u64(arg, UINT64_MAX, &o->files) == 0)
			return 0;
		break;
	case BOPT_CHUNK:
		o->chunk_given = 1;
		if (resctl_parse_size(arg, RESCTL_MAX_CHUNK, &o->chunk) == 0 && o->chunk > 0)
			return 0;
		break;
	case BOPT_PROTOCOL:
		if (strcmp(arg, "json") == 0 || strcmp(arg, "binary") == 0) {
			o->binary = arg[0] == 'b';
			return 0;
		}
		break;
	case BOPT_MODE:
		for (int m = MODE_UPLOAD; m <= MODE_MIXED; m++) {
			if (strcmp(arg, mode_names[m]) == 0) {
				o->mode = (enum bench_mode)m;
				return 0;
			}
		}
		break;
	case BOPT_DURATION:
		if (resctl_parse_seconds_ms(arg, UINT64_C(1) << 40, &o->duration_ms) == 0)
			return 0;
		break;
	case BOPT_UID:
		if (resctl_parse_u64(arg, JSON_MAX_SAFE_INT, &o->auth.uid) == 0) {
			o->auth.has_uid = 1;
			return 0;
		}
		break;
	case BOPT_TOKEN:
		o->auth.token = arg;
		return 0;
	case BOPT_JSON:
		o->json = 1;
		return 0;
	case BOPT_TIMEOUT:
		if (resctl_parse_seconds_ms(arg, 86400000, &v) == 0 && v > 0) {
			o->timeout_ms = (int)v;
			return 0;
		}
		break;
	}
	resctl_error("bench: bad value '%s' for --%s (see resctl bench --help)", arg, bench_option_name(opt));
	return -1;
}

static int bench_parse_args(int argc, char **argv, struct bench_opts *o)
{
	*o = (struct bench_opts){ .connections = 16, .size = 8u << 20, .chunk = RESCTL_CHUNK,
		.mode = MODE_UPLOAD, .duration_ms = 10000, .timeout_ms = RESCTL_TIMEOUT_MS };
	int n = resctl_parse_options("bench", argc, argv, bench_longopts, bench_usage, bench_parse_option, o);
	if (n < 0)
		return -1;
	if (n != 1) {
		resctl_error("bench: expected HOST:PORT (see resctl bench --help)");
		return -1;
	}
	if (resctl_parse_endpoint(argv[optind], &o->ep) != 0) {
		resctl_error("bench: '%s' is not HOST:PORT", argv[optind]);
		return -1;
	}
	if (o->binary) {
		if (!o->auth.has_uid || o->auth.token == NULL) {
			resctl_error("bench: --protocol binary needs --uid and --token (the fast path has no anonymous mode)");
			return -1;
		}
		if (!o->chunk_given)
			o->chunk = BIN_MAX_CHUNK;
		if (o->chunk > BIN_MAX_CHUNK || o->chunk < 64) {
			resctl_error("bench: --chunk must be 64 bytes to %u on the fast path", BIN_MAX_CHUNK);
			return -1;
		}
	}
	return 0;
}

/* ================================================================ statistics */

/* Round trips in a log-linear histogram: 64 buckets per power of two (error < 1.6 %). */
#define HIST_SUB_BITS 6
#define HIST_SUB (1u << HIST_SUB_BITS)
#define HIST_BUCKETS ((64 - HIST_SUB_BITS + 1) * HIST_SUB)

struct histogram {
	uint64_t count;
	uint64_t max;
	uint64_t buckets[HIST_BUCKETS];
};

static unsigned hist_index(uint64_t v)
{
	if (v < HIST_SUB)
		return (unsigned)v;
	unsigned shift = 63 - (unsigned)__builtin_clzll(v) - HIST_SUB_BITS;
	return (shift + 1) * HIST_SUB + (unsigned)((v >> shift) - HIST_SUB);
}

static uint64_t hist_bucket_mid(unsigned index)
{
	if (index < HIST_SUB)
		return index;
	unsigned shift = index / HIST_SUB - 1;
	uint64_t low = (uint64_t)(index % HIST_SUB + HIST_SUB) << shift;
	return low + ((UINT64_C(1) << shift) >> 1);
}

static void hist_add(struct histogram *h, uint64_t v)
{
	h->buckets[hist_index(v)]++;
	h->count++;
	if (v > h->max)
		h->max = v;
}

static void hist_merge(struct histogram *into, const struct histogram *from)
{
	for (unsigned i = 0; i < HIST_BUCKETS; i++)
		into->buckets[i] += from->buckets[i];
	into->count += from->count;
	if (from->max > into->max)
		into->max = from->max;
}

/* The value below which a fraction p of the samples fall. */
static uint64_t hist_percentile(const struct histogram *h, double p)
{
	if (h->count == 0)
		return 0;
	uint64_t rank = (uint64_t)(p * (double)h->count + 0.999999);
	if (rank == 0)
		rank = 1;
	uint64_t seen = 0;
	for (unsigned i = 0; i < HIST_BUCKETS; i++) {
		seen += h->buckets[i];
		if (seen >= rank) {
			uint64_t v = hist_bucket_mid(i);
			return v > h->max ? h->max : v;
		}
	}
	return h->max;
}

/* Failures seen by the client itself, counted next to the server's error codes. */
enum client_failure {
	FAIL_CONNECT = -1,    /* connect() failed or timed out */
	FAIL_CLOSED = -2,     /* the server closed or reset the connection */
	FAIL_TIMEOUT = -3,    /* no answer within --timeout */
	FAIL_PROTOCOL = -4,   /* wrong answer id, bad JSON, no error field */
	FAIL_DATA = -5,       /* downloaded bytes or sizes differ from what was uploaded */
};

static const char *failure_name(int64_t code)
{
	switch (code) {
	case FAIL_CONNECT: return "connect";
	case FAIL_CLOSED: return "closed";
	case FAIL_TIMEOUT: return "timeout";
	case FAIL_PROTOCOL: return "protocol";
	case FAIL_DATA: return "data";
	default: return resctl_error_name(code);
	}
}

#define MAX_ERROR_KINDS 32

/* An upload chunk's place in its file (a one-chunk file's is first and last): a file's first chunk
 * starts it (lease, record, staging file), its last publishes it (fsync, rename). */
enum { PLACE_FIRST, PLACE_MIDDLE, PLACE_LAST, PLACE_COUNT };
static const char *const place_names[PLACE_COUNT] = { "first", "middle", "last" };

struct bench_stats {
	uint64_t files;            /* files completed */
	uint64_t bytes;            /* file bytes acknowledged or received */
	uint64_t chunks;           /* answered requests */
	struct histogram rtt;      /* request to answer, ns */
	struct histogram rtt_place[PLACE_COUNT];   /* upload chunks by their place in the file */
	uint64_t max_in_flight;    /* the most requests one connection had unanswered at once */
	uint64_t window_drains;    /* fast-path uploads: every chunk acknowledged before the last was sent */
	struct {
		int64_t code;
		uint64_t count;
	} errors[MAX_ERROR_KINDS];
	size_t error_kinds;
	uint64_t error_total;
};

static void stats_error(struct bench_stats *s, int64_t code)
{
	s->error_total++;
	for (size_t i = 0; i < s->error_kinds; i++) {
		if (s->errors[i].code == code) {
			s->errors[i].count++;
			return;
		}
	}
	if (s->error_kinds < MAX_ERROR_KINDS) {
		s->errors[s->error_kinds].code = code;
		s->errors[s->error_kinds++].count = 1;
	}
}

static void stats_merge(struct bench_stats *into, const struct bench_stats *from)
{
	into->files += from->files;
	into->bytes += from->bytes;
	into->chunks += from->chunks;
	if (from->max_in_flight > into->max_in_flight)
		into->max_in_flight = from->max_in_flight;
	into->window_drains += from->window_drains;
	hist_merge(&into->rtt, &from->rtt);
	for (int i = 0; i < PLACE_COUNT; i++)
		hist_merge(&into->rtt_place[i], &from->rtt_place[i]);
	for (size_t i = 0; i < from->error_kinds; i++) {
		for (uint64_t n = 0; n < from->errors[i].count; n++)
			stats_error(into, from->errors[i].code);
	}
}

/* Records the round trip of an upload chunk at off of a file of size bytes in chunks of chunk. */
static void upload_rtt(struct bench_stats *st, uint64_t off, uint64_t size, size_t chunk, int64_t ns)
{
	hist_add(&st->rtt, (uint64_t)ns);
	if (off == 0)
		hist_add(&st->rtt_place[PLACE_FIRST], (uint64_t)ns);
	if (size - off <= chunk)
		hist_add(&st->rtt_place[PLACE_LAST], (uint64_t)ns);
	else if (off > 0)
		hist_add(&st->rtt_place[PLACE_MIDDLE], (uint64_t)ns);
}

/* ================================================================ file content */

/* The base64 of a file's chunks, each encoded once: the chunks of one period of the content
 * (the same text recurs every period), then, when the varied bytes are known (bench-dl), the
 * chunks that hold them. */
struct chunk_table {
	char *text;         /* NULL: not made (the chunk size does not divide the period) */
	size_t stride;
	uint64_t chunk;
	uint64_t plain;     /* chunks before the varied bytes */
	uint64_t cycle;     /* chunks in a period */
	uint64_t plain_entries, entries;
};

/* One random buffer is every file's content; the last bytes vary per file so the
 * MD5s differ, which lets the MD5 of everything before them be computed once. A large
 * file repeats the buffer (BENCH_PERIOD, whole chunks): the bench then reads the same
 * few MiB over and over instead of memory it last touched seconds ago, which on a
 * virtual machine costs a host fault per page and made the load generator, not the
 * server, the limit of a one-connection upload of 256 MiB (README, Performance). */
struct bench_source {
	uint8_t *data;               /* byte off of a file is data[off % period]; a chunk more follows */
	uint64_t period;
	uint64_t run_end;            /* period and the copy of the first chunk after it */
	uint64_t size;
	size_t chunk;
	uint64_t chunks;             /* per file, at least 1 */
	uint64_t tail_start;         /* the varied bytes: [tail_start, size) */
	size_t tail_len;
	struct chunk_table b64;      /* base64 of the chunks before the varied bytes */
	struct md5 md5_prefix;       /* state after md5_prefix_len bytes */
	uint64_t md5_prefix_len;
	uint64_t nonce;              /* makes this run's files differ from other runs' */
};

#define MD5_BLOCK_BYTES 64   /* the prefix ends on a block: copying the state is then exact */

/* The plain bytes at off and how many of them, up to end, lie together in data. */
static const uint8_t *source_run(const struct bench_source *s, uint64_t off, uint64_t end, size_t *run)
{
	uint64_t at = off % s->period, n = s->run_end - at;
	*run = (size_t)(end - off < n ? end - off : n);
	return s->data + at;
}

static int chunk_table_make(struct chunk_table *t, const struct bench_source *s, uint64_t chunk, const uint8_t *tail);

static void source_md5_update(const struct bench_source *s, struct md5 *ctx, uint64_t off, uint64_t end)
{
	size_t n;
	for (; off < end; off += n) {
		const uint8_t *p = source_run(s, off, end, &n);
		md5_update(ctx, p, n);
	}
}

static int source_init(struct bench_source *s, uint64_t size, size_t chunk, int with_b64)
{
	*s = (struct bench_source){ .size = size, .chunk = chunk };
	s->chunks = size ? (size + chunk - 1) / chunk : 1;
	s->tail_len = size < BENCH_TAIL_MAX ? (size_t)size : BENCH_TAIL_MAX;
	s->tail_start = size - s->tail_len;
	uint64_t per_period = BENCH_PERIOD / chunk ? BENCH_PERIOD / chunk : 1;
	s->period = size > per_period * chunk ? per_period * chunk : size;
	if (s->period == 0)
		s->period = 1;
	/* A chunk at any offset, even one a resumed upload left unaligned, lies together in data. */
	s->run_end = s->period + (s->period < size ? chunk : 0);
	s->data = malloc((size_t)s->run_end);
	if (s->data == NULL)
		return -1;
	randombytes_buf(s->data, (size_t)s->period);
	memcpy(s->data + s->period, s->data, (size_t)(s->run_end - s->period));
	randombytes_buf(&s->nonce, sizeof(s->nonce));
	s->md5_prefix_len = s->tail_start / MD5_BLOCK_BYTES * MD5_BLOCK_BYTES;
	if (md5_init(&s->md5_prefix) < 0)
		return -1;
	source_md5_update(s, &s->md5_prefix, 0, s->md5_prefix_len);
	return with_b64 ? chunk_table_make(&s->b64, s, chunk, NULL) : 0;
}

static void source_free(struct bench_source *s)
{
	free(s->data);
	free(s->b64.text);
	md5_free(&s->md5_prefix);
}

static void source_tail(const struct bench_source *s, uint64_t file_id, uint8_t tail[BENCH_TAIL_MAX])
{
	uint64_t v = s->nonce ^ file_id;
	for (int i = 0; i < BENCH_TAIL_MAX; i++)
		tail[i] = (uint8_t)(v >> (8 * i));
}

static void source_md5(const struct bench_source *s, const uint8_t *tail, char out[MD5_HEX_LEN + 1])
{
	struct md5 ctx = { NULL };
	if (md5_copy(&ctx, &s->md5_prefix) < 0) {
		memset(out, '?', MD5_HEX_LEN);   /* out of memory: the server refuses the file (1024) */
		out[MD5_HEX_LEN] = '\0';
		return;
	}
	source_md5_update(s, &ctx, s->md5_prefix_len, s->tail_start);
	md5_update(&ctx, tail, s->tail_len);
	md5_final_hex(&ctx, out);
	md5_free(&ctx);
}

/* Copies [off, off + len) of the file with this tail into out. */
static void source_copy(const struct bench_source *s, const uint8_t *tail, uint64_t off, size_t len, uint8_t *out)
{
	uint64_t plain_end = off + len < s->tail_start ? off + len : s->tail_start;
	size_t n;
	for (uint64_t at = off; at < plain_end; at += n) {
		const uint8_t *p = source_run(s, at, plain_end, &n);
		memcpy(out + (at - off), p, n);
	}
	for (uint64_t i = off > s->tail_start ? off : s->tail_start; i < off + len; i++)
		out[i - off] = tail[i - s->tail_start];
}

/* 1 when p holds [off, off + len) of the file with this tail. */
static int source_matches(const struct bench_source *s, const uint8_t *tail, uint64_t off, const uint8_t *p, size_t len)
{
	if (off > s->size || len > s->size - off)
		return 0;
	uint64_t plain_end = off + len < s->tail_start ? off + len : s->tail_start;
	size_t n;
	for (uint64_t at = off; at < plain_end; at += n) {
		const uint8_t *want = source_run(s, at, plain_end, &n);
		if (memcmp(p + (at - off), want, n) != 0)
			return 0;
	}
	for (uint64_t i = off > s->tail_start ? off : s->tail_start; i < off + len; i++)
		if (p[i - off] != tail[i - s->tail_start])
			return 0;
	return 1;
}

/* Encodes the table of s in chunks of this size; tail NULL leaves the chunks with varied bytes out. */
static int chunk_table_make(struct chunk_table *t, const struct bench_source *s, uint64_t chunk, const uint8_t *tail)
{
	*t = (struct chunk_table){ .chunk = chunk, .stride = b64_encoded_len((size_t)chunk), .plain = s->tail_start / chunk };
	if (s->period % chunk == 0)
		t->cycle = s->period / chunk;
	else if (s->period == s->size)
		t->cycle = t->plain;   /* no repeat: every plain chunk is in data */
	else
		return 0;              /* answers get decoded instead */
	uint64_t chunks = s->size ? (s->size + chunk - 1) / chunk : 0;
	t->plain_entries = t->cycle < t->plain ? t->cycle : t->plain;
	t->entries = t->plain_entries + (tail != NULL ? chunks - t->plain : 0);
	if (t->entries == 0)
		return 0;
	t->text = malloc((size_t)(t->entries * t->stride) + 1);   /* + the last NUL */
	uint8_t *raw = malloc((size_t)chunk);
	if (t->text == NULL || raw == NULL) {
		free(raw);
		free(t->text);
		t->text = NULL;
		return -1;
	}
	/* Each NUL lands on the next entry's first byte until that is written. */
	for (uint64_t slot = 0; slot < t->entries; slot++) {
		uint64_t index = slot < t->plain_entries ? slot : t->plain + (slot - t->plain_entries);
		uint64_t off = index * chunk;
		size_t len = s->size - off < chunk ? (size_t)(s->size - off) : (size_t)chunk;
		source_copy(s, tail, off, len, raw);
		b64_encode(t->text + slot * t->stride, raw, len);
	}
	free(raw);
	return 0;
}

/* The base64 of chunk index, or NULL when the table does not hold it. */
static const char *chunk_table_get(const struct chunk_table *t, uint64_t index)
{
	if (t->text == NULL)
		return NULL;
	uint64_t slot = index < t->plain ? index % t->cycle : t->plain_entries + (index - t->plain);
	return slot < t->entries ? t->text + slot * t->stride : NULL;
}

/* ================================================================ answers */

/* The fields of an answer the bench looks at, filled by yajl callbacks without building a tree. */
enum answer_key { KEY_OTHER, KEY_ERROR, KEY_DATA, KEY_TRANS_SIZE, KEY_TOTAL_SIZE, KEY_CURRENT_SIZE, KEY_IS_LAST, KEY_MESSAGE };

enum answer_has {
	HAS_ERROR = 1 << 0,
	HAS_DATA = 1 << 1,
	HAS_TRANS_SIZE = 1 << 2,
	HAS_TOTAL_SIZE = 1 << 3,
	HAS_CURRENT_SIZE = 1 << 4,
	HAS_IS_LAST = 1 << 5,
};

struct bench_answer {
	int depth;
	int complete;              /* the top-level object closed */
	enum answer_key key;       /* what the next value at depth 1 is */
	unsigned has;              /* enum answer_has bits */
	int data_bad;              /* data was not valid base64 */
	int data_checked;          /* data equals the expected chunk (so it was not decoded) */
	int64_t error;
	uint64_t trans_size, total_size, current_size;
	int is_last;
	size_t data_len;           /* decoded into the connection's raw buffer */
	char message[160];
	struct bench_conn *conn;
};

struct bench;

enum conn_state {
	CONN_IDLE,
	CONN_CONNECTING,
	CONN_BUSY,        /* a request is out */
	CONN_BACKOFF,     /* waiting to reconnect (fd < 0) or to retry (fd >= 0) */
	CONN_DONE,
};

struct bench_conn {
	struct bench *bench;
	unsigned index;
	enum bench_role role;
	enum conn_state state;
	int setup;                 /* uploads bench-dl before the timed run */
	int fd;
	ev_io io_read;
	ev_io io_write;            /* connect, or a request that did not fit the socket buffer */
	ev_timer timer;            /* answer timeout, connect timeout, back-off */
	unsigned backoff_ms;
	unsigned failures;         /* in a row; only the setup upload gives up on them */
	int connected_once;        /* a setup upload that cannot connect at all fails at once */
	int restart_after_backoff; /* 1: start the file over; 0: send the same request again */

	/* the request being sent: header + JSON up to data, the data, the rest */
	uint8_t head[FRAME_HEADER_LEN + BIN_DOWNLOAD_LEN + PROTO_NAME_MAX + BIN_VERSION_MAX];   /* the longest fixed part */
	char *text;
	size_t text_cap;
	struct iovec iov[2 * BENCH_WINDOW_MAX];
	unsigned iov_first, iov_count;
	uint16_t request_id;
	int64_t sent_ns;

	/* the fast path */
	int bin_hello_done;
	char bin_version[BIN_VERSION_MAX + 1];   /* of bench-dl, pinned while one download runs */
	/* The upload's window: chunks sent and acknowledged since its 1043; chunk n uses slot
	 * n % BENCH_WINDOW_MAX until its acknowledgement (they come in chunk order). */
	uint64_t bin_sent, bin_acked;
	int bin_all_sent;                        /* the chunk with LAST is out */
	uint8_t bin_heads[BENCH_WINDOW_MAX][FRAME_HEADER_LEN + BIN_CHUNK_LEN];
	uint64_t bin_slot_offset[BENCH_WINDOW_MAX];
	int64_t bin_slot_sent_ns[BENCH_WINDOW_MAX];
	/* The 1048 being received: its bytes are checked as they arrive and dropped (rng_left > 0). */
	uint64_t rng_size, rng_length, rng_left;
	int rng_bad;

	/* answers */
	struct buf in;
	yajl_handle parser;
	struct bench_answer answer;

	/* the file in progress */
	int in_file;
	char name[64];
	char md5[MD5_HEX_LEN + 1];
	uint8_t tail[BENCH_TAIL_MAX];
	uint64_t files_made;       /* names bench-<index>-<files_made> */
	uint64_t seq;
	uint64_t offset;           /* of the chunk in flight; fast-path uploads: of the next chunk to send */
	size_t chunk_len;
	uint8_t *raw;              /* a chunk with varied bytes, or a decoded download chunk */
	size_t raw_cap;
	char *b64;                 /* base64 made on the fly */
	size_t b64_cap;
};

struct bench {
	const struct bench_opts *o;
	struct ev_loop *loop;
	struct sockaddr_storage addr;
	socklen_t addr_len;
	struct bench_source src;
	uint8_t dl_tail[BENCH_TAIL_MAX];   /* bench-dl's varied bytes */
	/* bench-dl as the server sends it: the base64 of each download chunk, made once the
	 * server's chunk size is known, so answers are checked by comparing text, not decoding. */
	uint64_t dl_chunk;                 /* 0 until known */
	int dl_table_tried;
	struct chunk_table dl;
	char *token_json;                  /* the token as a JSON string, quotes included */
	struct bench_conn *conns;
	size_t nconns;
	unsigned bin_window;               /* chunks in flight per fast-path upload: the server's window */
	struct bench_stats stats[ROLE_COUNT];
	uint64_t next_file_id;
	uint64_t files_started;
	uint64_t files_limit;              /* 0 = none */
	size_t active;                     /* connections not done */
	int64_t reported[MAX_ERROR_KINDS];  /* fatal codes already explained on stderr */
	size_t nreported;
	int setup_phase;
	int64_t start_ns;
	ev_timer duration_timer;
	ev_timer progress_timer;
	struct resctl_progress progress;
};

static int answer_map_key(void *ctx, const unsigned char *key, size_t len)
{
	static const struct {
		const char *name;
		enum answer_key key;
	} keys[] = {
		{ "error", KEY_ERROR }, { "data", KEY_DATA }, { "trans_size", KEY_TRANS_SIZE },
		{ "total_size", KEY_TOTAL_SIZE }, { "current_size", KEY_CURRENT_SIZE },
		{ "is_last", KEY_IS_LAST }, { "message", KEY_MESSAGE },
	};
	struct bench_answer *a = ctx;
	a->key = KEY_OTHER;
	if (a->depth != 1)
		return 1;
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
		if (strlen(keys[i].name) == len && memcmp(keys[i].name, key, len) == 0)
			a->key = keys[i].key;
	return 1;
}

static int answer_open(void *ctx)
{
	struct bench_answer *a = ctx;
	a->depth++;
	return 1;
}

static int answer_close(void *ctx)
{
	struct bench_answer *a = ctx;
	if (--a->depth == 0)
		a->complete = 1;
	return 1;
}

static void answer_number(struct bench_answer *a, uint64_t v)
{
	switch (a->key) {
	case KEY_ERROR: a->error = (int64_t)v; a->has |= HAS_ERROR; break;
	case KEY_TRANS_SIZE: a->trans_size = v; a->has |= HAS_TRANS_SIZE; break;
	case KEY_TOTAL_SIZE: a->total_size = v; a->has |= HAS_TOTAL_SIZE; break;
	case KEY_CURRENT_SIZE: a->current_size = v; a->has |= HAS_CURRENT_SIZE; break;
	case KEY_IS_LAST: a->is_last = v != 0; a->has |= HAS_IS_LAST; break;
	default: break;
	}
}

static int answer_integer(void *ctx, long long v)
{
	struct bench_answer *a = ctx;
	if (a->depth == 1 && v >= 0)
		answer_number(a, (uint64_t)v);
	return 1;
}

static int answer_boolean(void *ctx, int v)
{
	struct bench_answer *a = ctx;
	if (a->depth == 1 && a->key == KEY_IS_LAST) {
		a->is_last = v;
		a->has |= HAS_IS_LAST;
	}
	return 1;
}

/* 1 when s is the expected base64 of the chunk the connection asked for. */
static int answer_data_expected(struct bench_conn *c, const unsigned char *s, size_t len, size_t *data_len)
{
	const struct bench *b = c->bench;
	uint64_t size = b->src.size;
	if (c->role != ROLE_DOWNLOAD || b->dl_chunk == 0 || c->offset != (c->seq - 1) * b->dl_chunk)
		return 0;
	size_t want = size - c->offset < b->dl_chunk ? (size_t)(size - c->offset) : (size_t)b->dl_chunk;
	const char *expected = chunk_table_get(&b->dl, c->seq - 1);
	if (expected == NULL || len != b64_encoded_len(want) || memcmp(s, expected, len) != 0)
		return 0;
	*data_len = want;
	return 1;
}

static void answer_data(struct bench_answer *a, const unsigned char *s, size_t len)
{
	struct bench_conn *c = a->conn;
	if (answer_data_expected(c, s, len, &a->data_len)) {
		a->has |= HAS_DATA;
		a->data_checked = 1;
		return;
	}
	size_t need = proto_b64_decoded_max(len);
	if (need > c->raw_cap) {
		uint8_t *raw = realloc(c->raw, need);
		if (raw == NULL) {
			a->data_bad = 1;
			return;
		}
		c->raw = raw;
		c->raw_cap = need;
	}
	a->has |= HAS_DATA;
	if (b64_decode_strict(c->raw, c->raw_cap, (const char *)s, len, &a->data_len) != 0)
		a->data_bad = 1;
}

static int answer_string(void *ctx, const unsigned char *s, size_t len)
{
	struct bench_answer *a = ctx;
	if (a->depth != 1)
		return 1;
	if (a->key == KEY_DATA) {
		answer_data(a, s, len);
	} else if (a->key == KEY_MESSAGE) {
		size_t n = len < sizeof(a->message) - 1 ? len : sizeof(a->message) - 1;
		memcpy(a->message, s, n);
		a->message[n] = '\0';
	} else if (len > 0 && len <= 19 && a->key != KEY_OTHER) {
		/* Sizes may come as decimal strings (total_size and current_size of 1034 do). */
		uint64_t v = 0;
		for (size_t i = 0; i < len; i++) {
			if (s[i] < '0' || s[i] > '9')
				return 1;
			v = v * 10 + (uint64_t)(s[i] - '0');
		}
		answer_number(a, v);
	}
	return 1;
}

static int answer_double(void *ctx, double v)
{
	(void)ctx;
	(void)v;
	return 1;
}

static int answer_null(void *ctx)
{
	(void)ctx;
	return 1;
}

static const yajl_callbacks answer_callbacks = {
	.yajl_null = answer_null,
	.yajl_boolean = answer_boolean,
	.yajl_integer = answer_integer,
	.yajl_double = answer_double,
	.yajl_string = answer_string,
	.yajl_start_map = answer_open,
	.yajl_map_key = answer_map_key,
	.yajl_end_map = answer_close,
	.yajl_start_array = answer_open,
	.yajl_end_array = answer_close,
};

/* One parser per connection reads every answer: yajl takes them as a stream of values. */
static int conn_parser_reset(struct bench_conn *c)
{
	if (c->parser)
		yajl_free(c->parser);
	c->parser = yajl_alloc(&answer_callbacks, NULL, &c->answer);
	if (c->parser == NULL)
		return -1;
	yajl_config(c->parser, yajl_allow_multiple_values, 1);
	return 0;
}

/* Where the fields before the data end, when body ends with the expected data of the connection's
 * download chunk as the server writes it (the field last: ',"data":"<base64>"}'); 0 otherwise. The
 * expected base64 is compared here, byte for byte, so yajl need not lex the 44 KB string (half of
 * the load generator's time on 64 downloading connections went there). */
static size_t answer_fields_end(struct bench_conn *c, const uint8_t *body, size_t len, size_t *data_len)
{
	static const char key[] = "\"data\":\"";
	const struct bench *b = c->bench;
	uint64_t size = b->src.size;
	if (c->role != ROLE_DOWNLOAD || b->dl_chunk == 0 || c->offset != (c->seq - 1) * b->dl_chunk ||
	    c->offset >= size)
		return 0;
	size_t want = size - c->offset < b->dl_chunk ? (size_t)(size - c->offset) : (size_t)b->dl_chunk;
	size_t b64 = b64_encoded_len(want), tail = sizeof(key) - 1 + b64 + 2;
	if (len < tail + 2)
		return 0;
	const uint8_t *t = body + len - tail;
	const char *expected = chunk_table_get(&b->dl, c->seq - 1);
	if (expected == NULL || t[-1] != ',' || memcmp(t, key, sizeof(key) - 1) != 0 || t[tail - 2] != '"' ||
	    t[tail - 1] != '}' || memcmp(t + sizeof(key) - 1, expected, b64) != 0)
		return 0;
	*data_len = want;
	return len - tail - 1;   /* the comma before the field */
}

/* Parses one answer body into c->answer; -1 when it is not one JSON object with an error field. */
static int conn_parse_answer(struct bench_conn *c, const uint8_t *body, size_t len)
{
	struct bench_answer *a = &c->answer;
	*a = (struct bench_answer){ .conn = c };
	if (len == 0 || body[0] != '{')
		return -1;
	size_t data_len = 0, fields = answer_fields_end(c, body, len, &data_len);
	if (fields > 0) {
		/* The fields before the data, closed as the body closes them: yajl checks all of them. A body
		 * whose cut does not make one complete object is parsed whole below. */
		if (yajl_parse(c->parser, body, fields) == yajl_status_ok &&
		    yajl_parse(c->parser, (const unsigned char *)"}", 1) == yajl_status_ok && a->complete &&
		    !(a->has & HAS_DATA)) {
			a->has |= HAS_DATA;
			a->data_checked = 1;
			a->data_len = data_len;
			return (a->has & HAS_ERROR) ? 0 : -1;
		}
		if (conn_parser_reset(c) < 0)
			return -1;
		*a = (struct bench_answer){ .conn = c };
	}
	if (yajl_parse(c->parser, body, len) != yajl_status_ok || !a->complete) {
		conn_parser_reset(c);   /* the stream is out of step now */
		return -1;
	}
	return (a->has & HAS_ERROR) ? 0 : -1;
}

/* ================================================================ connections */

static void conn_send(struct bench_conn *c);
static void conn_start_file(struct bench_conn *c);
static void conn_next_file(struct bench_conn *c);

static struct bench_stats *conn_stats(struct bench_conn *c)
{
	return &c->bench->stats[c->role];
}

static void conn_close(struct bench_conn *c)
{
	struct ev_loop *loop = c->bench->loop;
	ev_io_stop(loop, &c->io_read);
	ev_io_stop(loop, &c->io_write);
	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
	buf_consume_keep(&c->in, buf_len(&c->in));
	c->bin_hello_done = 0;   /* a new connection says 1041 again; its upload is opened again (1043) */
}

/* The connection has nothing more to do in this phase. */
static void conn_finish(struct bench_conn *c)
{
	struct bench *b = c->bench;
	conn_close(c);
	ev_timer_stop(b->loop, &c->timer);
	if (c->state != CONN_DONE) {
		c->state = CONN_DONE;
		if (--b->active == 0)
			ev_break(b->loop, EVBREAK_ALL);
	}
}

static void conn_backoff(struct bench_conn *c, int restart)
{
	struct ev_loop *loop = c->bench->loop;
	if (c->bench->setup_phase && (++c->failures >= BENCH_SETUP_TRIES || !c->connected_once)) {
		conn_finish(c);
		return;
	}
	c->state = CONN_BACKOFF;
	c->restart_after_backoff = restart;
	ev_timer_stop(loop, &c->timer);
	ev_timer_set(&c->timer, c->backoff_ms / 1000.0, 0.0);
	ev_timer_start(loop, &c->timer);
	c->backoff_ms = c->backoff_ms * 2 > RESCTL_BACKOFF_MAX_MS ? RESCTL_BACKOFF_MAX_MS : c->backoff_ms * 2;
}

/* A network failure: count it, drop the connection, reconnect after a back-off and start the file over. */
static void conn_fail(struct bench_conn *c, enum client_failure why)
{
	stats_error(conn_stats(c), why);
	conn_close(c);
	conn_backoff(c, 1);
}

static void conn_connected(struct bench_conn *c)
{
	struct ev_loop *loop = c->bench->loop;
	ev_io_stop(loop, &c->io_write);
	ev_io_start(loop, &c->io_read);
	resctl_tune_socket(c->fd);
	c->state = CONN_IDLE;
	c->connected_once = 1;
	if (c->in_file)
		conn_start_file(c);
	else
		conn_next_file(c);
}

static void conn_connect(struct bench_conn *c)
{
	struct bench *b = c->bench;
	c->fd = socket(b->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (c->fd < 0) {
		conn_fail(c, FAIL_CONNECT);
		return;
	}
	ev_io_set(&c->io_read, c->fd, EV_READ);
	ev_io_set(&c->io_write, c->fd, EV_WRITE);
	if (connect(c->fd, (struct sockaddr *)&b->addr, b->addr_len) == 0) {
		conn_connected(c);
		return;
	}
	if (errno != EINPROGRESS) {
		conn_fail(c, FAIL_CONNECT);
		return;
	}
	c->state = CONN_CONNECTING;
	ev_io_start(b->loop, &c->io_write);
	c->timer.repeat = b->o->timeout_ms / 1000.0;
	ev_timer_again(b->loop, &c->timer);
}

/* Writes what the socket takes: 1 when the request is out, 0 when it must wait, -1 on an error. */
static int conn_flush(struct bench_conn *c)
{
	while (c->iov_first < c->iov_count) {
		struct msghdr msg = { .msg_iov = c->iov + c->iov_first, .msg_iovlen = c->iov_count - c->iov_first };
		ssize_t n = sendmsg(c->fd, &msg, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
		}
		size_t done = (size_t)n;
		while (c->iov_first < c->iov_count && done >= c->iov[c->iov_first].iov_len)
			done -= c->iov[c->iov_first++].iov_len;
		if (c->iov_first < c->iov_count) {
			c->iov[c->iov_first].iov_base = (uint8_t *)c->iov[c->iov_first].iov_base + done;
			c->iov[c->iov_first].iov_len -= done;
		}
	}
	return 1;
}

static void conn_write_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	(void)loop;
	(void)revents;
	struct bench_conn *c = w->data;
	if (c->state == CONN_CONNECTING) {
		int so_error = 0;
		socklen_t len = sizeof(so_error);
		if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &so_error, &len) != 0 || so_error != 0)
			conn_fail(c, FAIL_CONNECT);
		else
			conn_connected(c);
		return;
	}
	int r = conn_flush(c);
	if (r < 0)
		conn_fail(c, FAIL_CLOSED);
	else if (r > 0)
		ev_io_stop(c->bench->loop, &c->io_write);
}

/* ================================================================ requests */

/* Appends printf output to the connection's text buffer (sized for the longest request). */
static void text_add(struct bench_conn *c, size_t *len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void text_add(struct bench_conn *c, size_t *len, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(c->text + *len, c->text_cap - *len, fmt, ap);
	va_end(ap);
	if (n > 0)
		*len = *len + (size_t)n < c->text_cap ? *len + (size_t)n : c->text_cap - 1;
}

/* The fields after "data", keys in Qt's (sorted) order, indented like QJsonDocument::toJson(). */
static size_t build_upload_rest(struct bench_conn *c, int last)
{
	const struct bench *b = c->bench;
	const struct bench_source *s = &b->src;
	size_t len = 0;
	text_add(c, &len, "\",\n    \"last\": %d,\n    \"last_seq\": %" PRIu64 ",\n    \"md5\": \"%s\",\n"
	    "    \"name\": \"%s\",\n    \"seq\": %" PRIu64, last, s->chunks, c->md5, c->name, c->seq);
	if (b->token_json)
		text_add(c, &len, ",\n    \"token\": %s", b->token_json);
	text_add(c, &len, ",\n    \"total_size\": %" PRIu64 ",\n    \"trans_size\": %" PRIu64, s->size,
	    c->offset + c->chunk_len);
	if (b->o->auth.has_uid)
		text_add(c, &len, ",\n    \"uid\": %" PRIu64, b->o->auth.uid);
	text_add(c, &len, "\n}\n");
	return len;
}

static void upload_send_chunk(struct bench_conn *c)
{
	const struct bench_source *s = &c->bench->src;
	static const char data_open[] = "{\n    \"data\": \"";
	uint64_t index = c->offset / s->chunk;
	c->chunk_len = s->size - c->offset < s->chunk ? (size_t)(s->size - c->offset) : s->chunk;
	const char *data;
	size_t data_len = b64_encoded_len(c->chunk_len);
	const char *encoded = chunk_table_get(&s->b64, index);   /* shared, encoded once */
	if (encoded != NULL) {
		data = encoded;
	} else {
		source_copy(s, c->tail, c->offset, c->chunk_len, c->raw);
		b64_encode(c->b64, c->raw, c->chunk_len);
		data = c->b64;
	}
	int last = c->offset + c->chunk_len == s->size;
	size_t rest = build_upload_rest(c, last);
	size_t body = sizeof(data_open) - 1 + data_len + rest;
	frame_put_header(c->head, MSG_UPLOAD, (uint32_t)body);
	memcpy(c->head + FRAME_HEADER_LEN, data_open, sizeof(data_open) - 1);
	c->iov[0] = (struct iovec){ c->head, FRAME_HEADER_LEN + sizeof(data_open) - 1 };
	c->iov[1] = (struct iovec){ (void *)data, data_len };
	c->iov[2] = (struct iovec){ c->text, rest };
	c->iov_count = 3;
	c->request_id = MSG_UPLOAD;
	conn_send(c);
}

static void download_send_chunk(struct bench_conn *c)
{
	const struct bench *b = c->bench;
	size_t len = 0;
	text_add(c, &len, "{\n    \"client_path\": \"%s\",\n    \"name\": \"%s\",\n    \"seq\": %" PRIu64,
	    BENCH_DOWNLOAD_NAME, BENCH_DOWNLOAD_NAME, c->seq);
	if (b->token_json)
		text_add(c, &len, ",\n    \"token\": %s", b->token_json);
	text_add(c, &len, ",\n    \"total_size\": %" PRIu64 ",\n    \"trans_size\": %" PRIu64, b->src.size, c->offset);
	if (b->o->auth.has_uid)
		text_add(c, &len, ",\n    \"uid\": %" PRIu64, b->o->auth.uid);
	text_add(c, &len, "\n}\n");
	frame_put_header(c->head, MSG_DOWNLOAD, (uint32_t)len);
	c->iov[0] = (struct iovec){ c->head, FRAME_HEADER_LEN };
	c->iov[1] = (struct iovec){ c->text, len };
	c->iov_count = 2;
	c->request_id = MSG_DOWNLOAD;
	conn_send(c);
}

/* What is queued goes out now: the connection waits for answers, under its timeout. */
static void conn_go(struct bench_conn *c)
{
	struct bench *b = c->bench;
	c->state = CONN_BUSY;
	c->timer.repeat = b->o->timeout_ms / 1000.0;
	ev_timer_again(b->loop, &c->timer);
	int r = conn_flush(c);
	if (r < 0)
		conn_fail(c, FAIL_CLOSED);
	else if (r == 0)
		ev_io_start(b->loop, &c->io_write);
}

static void conn_send(struct bench_conn *c)
{
	c->iov_first = 0;
	c->sent_ns = resctl_now_ns();
	if (conn_stats(c)->max_in_flight == 0)
		conn_stats(c)->max_in_flight = 1;
	conn_go(c);
}

static void bin_frame(struct bench_conn *c, uint16_t id, const uint8_t *body, uint32_t len);
/* Sends the request of the current seq again (after a busy answer). */
static void bin_resend(struct bench_conn *c);

static void conn_resend(struct bench_conn *c)
{
	if (c->bench->o->binary) {
		bin_resend(c);
		return;
	}
	if (c->role == ROLE_UPLOAD)
		upload_send_chunk(c);
	else
		download_send_chunk(c);
}

/* Starts the current file (again) from seq 1. */
static void conn_start_file(struct bench_conn *c)
{
	c->in_file = 1;
	c->seq = 1;
	c->offset = 0;
	conn_resend(c);
}

static void conn_next_file(struct bench_conn *c)
{
	struct bench *b = c->bench;
	if (b->files_limit && b->files_started >= b->files_limit) {
		conn_finish(c);
		return;
	}
	b->files_started++;
	if (c->role == ROLE_UPLOAD) {
		uint64_t id = c->setup ? UINT64_MAX : b->next_file_id++;
		if (c->setup)
			snprintf(c->name, sizeof(c->name), "%s", BENCH_DOWNLOAD_NAME);
		else
			snprintf(c->name, sizeof(c->name), "bench-%u-%" PRIu64, c->index, c->files_made++);
		source_tail(&b->src, id, c->tail);
		source_md5(&b->src, c->tail, c->md5);
	}
	conn_start_file(c);
}

/* ================================================================ handling answers */

static void conn_file_done(struct bench_conn *c)
{
	conn_stats(c)->files++;
	c->in_file = 0;
	conn_next_file(c);
}

/* Says once per code why connections stop: the summary only counts. */
static void bench_explain(struct bench *b, int64_t code, const char *message)
{
	for (size_t i = 0; i < b->nreported; i++)
		if (b->reported[i] == code)
			return;
	if (b->nreported < MAX_ERROR_KINDS)
		b->reported[b->nreported++] = code;
	resctl_error("bench: server error %" PRId64 " (%s)%s%s; connections that get it stop", code,
	    resctl_error_name(code), message[0] ? ": " : "", message);
}

/* A non-zero error code: retry later, start the file over, or give up on this connection. */
static void conn_server_error(struct bench_conn *c, int64_t code)
{
	stats_error(conn_stats(c), code);
	switch (code) {
	case ERR_BUSY:
		conn_backoff(c, 0);
		break;
	case ERR_JSON:
	case ERR_TOKEN_INVALID:
	case ERR_UID_INVALID:
	case ERR_MSG_ID:
	case ERR_NAME_INVALID:
	case ERR_TOO_LARGE:
		/* Every further request would get the same answer. */
		bench_explain(c->bench, code, c->answer.message);
		conn_finish(c);
		break;
	default:
		conn_backoff(c, 1);
		break;
	}
}

static void upload_answer(struct bench_conn *c)
{
	struct bench_stats *st = conn_stats(c);
	st->bytes += c->chunk_len;
	if (c->offset + c->chunk_len == c->bench->src.size) {
		conn_file_done(c);
		return;
	}
	c->offset += c->chunk_len;
	c->seq++;
	upload_send_chunk(c);
}

/* Encodes bench-dl in the server's download chunks (see struct bench). */
static void bench_dl_table(struct bench *b, uint64_t chunk)
{
	b->dl_table_tried = 1;
	if (chunk_table_make(&b->dl, &b->src, chunk, b->dl_tail) == 0 && b->dl.text != NULL)
		b->dl_chunk = chunk;
}

static void download_answer(struct bench_conn *c)
{
	const struct bench_answer *a = &c->answer;
	struct bench *b = c->bench;
	const struct bench_source *s = &b->src;
	size_t len = a->data_len;
	int consistent = (a->has & HAS_DATA) && !a->data_bad &&
	    (!(a->has & HAS_TOTAL_SIZE) || a->total_size == s->size) &&
	    (!(a->has & HAS_CURRENT_SIZE) || a->current_size == c->offset + len) &&
	    (len > 0 || (c->offset == s->size && a->is_last)) &&
	    (a->data_checked || source_matches(s, b->dl_tail, c->offset, c->raw, len));
	int last = (a->has & HAS_IS_LAST) ? a->is_last : c->offset + len == s->size;
	if (!consistent || (last && c->offset + len != s->size)) {
		stats_error(conn_stats(c), FAIL_DATA);
		conn_backoff(c, 1);
		return;
	}
	conn_stats(c)->bytes += len;
	if (last) {
		conn_file_done(c);
		return;
	}
	if (c->seq == 1 && !b->dl_table_tried)
		bench_dl_table(c->bench, len);   /* seq 1's length is the server's chunk size */
	c->offset += len;
	c->seq++;
	download_send_chunk(c);
}

static void conn_frame(struct bench_conn *c, uint16_t id, const uint8_t *body, uint32_t len)
{
	if (c->bench->o->binary) {
		bin_frame(c, id, body, len);
		return;
	}
	if (c->state != CONN_BUSY || c->iov_first < c->iov_count || id != c->request_id + 1 ||
	    conn_parse_answer(c, body, len) != 0) {
		conn_fail(c, FAIL_PROTOCOL);
		return;
	}
	struct bench_stats *st = conn_stats(c);
	st->chunks++;
	if (c->role == ROLE_UPLOAD)
		upload_rtt(st, c->offset, c->bench->src.size, c->bench->src.chunk, resctl_now_ns() - c->sent_ns);
	else
		hist_add(&st->rtt, (uint64_t)(resctl_now_ns() - c->sent_ns));
	c->state = CONN_IDLE;
	if (c->answer.error != 0) {
		conn_server_error(c, c->answer.error);
		return;
	}
	c->backoff_ms = RESCTL_BACKOFF_FIRST_MS;
	c->failures = 0;
	if (c->role == ROLE_UPLOAD)
		upload_answer(c);
	else
		download_answer(c);
}

/* ================================================================ binary fast path (--protocol binary) */

/* One 1041 after connecting; its 1042 is read with the JSON answer parser. */
static void bin_send_hello(struct bench_conn *c)
{
	const struct bench *b = c->bench;
	size_t len = 0;
	text_add(c, &len, "{\"uid\":%" PRIu64 ",\"token\":%s}", b->o->auth.uid, b->token_json ? b->token_json : "\"\"");
	frame_put_header(c->head, MSG_BIN_HELLO, (uint32_t)len);
	c->iov[0] = (struct iovec){ c->head, FRAME_HEADER_LEN };
	c->iov[1] = (struct iovec){ c->text, len };
	c->iov_count = 2;
	c->request_id = MSG_BIN_HELLO;
	conn_send(c);
}

static void bin_send_open(struct bench_conn *c)
{
	const struct bench_source *s = &c->bench->src;
	size_t nlen = strlen(c->name);
	uint8_t *p = c->head;
	frame_put_header(p, MSG_BIN_UPLOAD_OPEN, (uint32_t)(BIN_OPEN_LEN + nlen));
	p = bin_put_u64(p + FRAME_HEADER_LEN, s->size);
	*p++ = 0;
	memcpy(p, c->md5, PROTO_MD5_HEX);
	bin_put_u16(p + PROTO_MD5_HEX, (uint16_t)nlen);
	c->iov[0] = (struct iovec){ c->head, FRAME_HEADER_LEN + BIN_OPEN_LEN };
	c->iov[1] = (struct iovec){ c->name, nlen };
	c->iov_count = 2;
	c->request_id = MSG_BIN_UPLOAD_OPEN;
	conn_send(c);
}

/* Keeps the upload's window full: chunks from c->offset go out until bin_window of them are
 * unacknowledged or the one with LAST is out. Each acknowledgement frees a slot and calls this again,
 * so the server always has the next chunks (waiting for a whole batch drained its pipeline once per
 * batch). Raw bytes come straight from the source; the two chunks the varied tail may touch (chunk
 * >= 64 bytes) are copied into c->raw, the last one at chunk, the one before it at 0. */
static void bin_fill_window(struct bench_conn *c)
{
	struct bench *b = c->bench;
	const struct bench_source *s = &b->src;
	if (c->bin_all_sent || c->bin_sent - c->bin_acked >= b->bin_window)
		return;
	/* What the socket has not taken yet of earlier chunks moves to the front; new chunks go behind it. */
	unsigned pending = c->iov_count - c->iov_first;
	memmove(c->iov, c->iov + c->iov_first, pending * sizeof(c->iov[0]));
	c->iov_first = 0;
	c->iov_count = pending;
	int64_t now = resctl_now_ns();
	do {
		unsigned slot = (unsigned)(c->bin_sent % BENCH_WINDOW_MAX);
		uint64_t off = c->offset;
		size_t len = s->size - off < s->chunk ? (size_t)(s->size - off) : s->chunk;
		int last = off + len == s->size;
		uint8_t *h = c->bin_heads[slot];
		frame_put_header(h, MSG_BIN_CHUNK, (uint32_t)(BIN_CHUNK_LEN + len));
		uint8_t *p = bin_put_u64(h + FRAME_HEADER_LEN, off);
		p = bin_put_u32(p, (uint32_t)len);
		bin_put_u32(p, last ? BIN_CHUNK_LAST : 0);
		size_t run;
		const uint8_t *data = source_run(s, off, off + len, &run);
		if (off + len > s->tail_start || run < len) {
			uint8_t *copy = c->raw + (last ? s->chunk : 0);
			source_copy(s, c->tail, off, len, copy);
			data = copy;
		}
		c->iov[c->iov_count++] = (struct iovec){ h, FRAME_HEADER_LEN + BIN_CHUNK_LEN };
		c->iov[c->iov_count++] = (struct iovec){ (void *)data, len };
		c->bin_slot_offset[slot] = off;
		c->bin_slot_sent_ns[slot] = now;
		c->bin_sent++;
		c->offset = off + len;
		c->bin_all_sent = last;
	} while (!c->bin_all_sent && c->bin_sent - c->bin_acked < b->bin_window);
	struct bench_stats *st = conn_stats(c);
	if (c->bin_sent - c->bin_acked > st->max_in_flight)
		st->max_in_flight = c->bin_sent - c->bin_acked;
	c->request_id = MSG_BIN_CHUNK;
	conn_go(c);
}

#define BENCH_RANGE (16u << 20)
#define BENCH_RANGE_PIECE (256u << 10)   /* read at a time of a range being checked */

static void bin_send_range(struct bench_conn *c)
{
	size_t vlen = strlen(c->bin_version), nlen = strlen(BENCH_DOWNLOAD_NAME);
	uint8_t *p = c->head;
	frame_put_header(p, MSG_BIN_DOWNLOAD, (uint32_t)(BIN_DOWNLOAD_LEN + nlen + vlen));
	p = bin_put_u64(p + FRAME_HEADER_LEN, c->offset);
	p = bin_put_u64(p, BENCH_RANGE);
	p = bin_put_u16(p, (uint16_t)nlen);
	*p++ = (uint8_t)vlen;
	memcpy(p, BENCH_DOWNLOAD_NAME, nlen);
	memcpy(p + nlen, c->bin_version, vlen);
	c->iov[0] = (struct iovec){ c->head, FRAME_HEADER_LEN + BIN_DOWNLOAD_LEN + nlen + vlen };
	c->iov_count = 1;
	c->request_id = MSG_BIN_DOWNLOAD;
	conn_send(c);
}

/* Where the connection goes on: hello first, then a range, or the upload opened (again: its answer
 * says where it stands, after an error or a busy answer too). */
static void bin_resend(struct bench_conn *c)
{
	if (!c->bin_hello_done)
		bin_send_hello(c);
	else if (c->role == ROLE_DOWNLOAD)
		bin_send_range(c);
	else
		bin_send_open(c);
}

static void bin_error(struct bench_conn *c, uint32_t code, const uint8_t *msg, size_t msg_len)
{
	size_t n = msg_len < sizeof(c->answer.message) - 1 ? msg_len : sizeof(c->answer.message) - 1;
	memcpy(c->answer.message, msg, n);
	c->answer.message[n] = '\0';
	c->bin_version[0] = '\0';
	c->state = CONN_IDLE;
	conn_server_error(c, code);
}

/* The version of bench-dl the first range named: later ranges of this download ask for it. */
static void bin_pin_version(struct bench_conn *c, const uint8_t *body, size_t vlen)
{
	if (c->bin_version[0] == '\0') {
		memcpy(c->bin_version, body + BIN_RANGE_LEN, vlen);
		c->bin_version[vlen] = '\0';
	}
}

/* A range whose header or bytes are not bench-dl's: counted, and the download starts again later. */
static void bin_range_wrong(struct bench_conn *c, struct bench_stats *st)
{
	stats_error(st, FAIL_DATA);
	c->state = CONN_IDLE;
	conn_backoff(c, 1);
}

/* A range of bench-dl checked whole: the next one, or the file is done. */
static void bin_range_done(struct bench_conn *c, uint64_t size, uint64_t length)
{
	c->state = CONN_IDLE;
	c->backoff_ms = RESCTL_BACKOFF_FIRST_MS;
	c->failures = 0;
	c->offset += length;
	if (c->offset == size) {
		c->bin_version[0] = '\0';
		conn_file_done(c);
		return;
	}
	bin_send_range(c);
}

static void bin_frame(struct bench_conn *c, uint16_t id, const uint8_t *body, uint32_t len)
{
	struct bench *b = c->bench;
	struct bench_stats *st = conn_stats(c);
	/* Acknowledgements may come while later chunks of the window are still being written. */
	if (c->state != CONN_BUSY || id != c->request_id + 1 ||
	    (c->request_id != MSG_BIN_CHUNK && c->iov_first < c->iov_count)) {
		conn_fail(c, FAIL_PROTOCOL);
		return;
	}
	if (id == MSG_BIN_HELLO + 1) {
		if (conn_parse_answer(c, body, len) != 0) {
			conn_fail(c, FAIL_PROTOCOL);
			return;
		}
		c->state = CONN_IDLE;
		if (c->answer.error) {
			conn_server_error(c, c->answer.error);
			return;
		}
		c->bin_hello_done = 1;
		bin_resend(c);
		return;
	}
	if (id == MSG_BIN_UPLOAD_OPEN + 1) {
		if (len < BIN_OPEN_ANSWER_LEN) {
			conn_fail(c, FAIL_PROTOCOL);
			return;
		}
		uint32_t error = bin_get_u32(body);
		if (error) {
			bin_error(c, error, body + BIN_OPEN_ANSWER_LEN, len - BIN_OPEN_ANSWER_LEN);
			return;
		}
		uint64_t committed = bin_get_u64(body + 4);
		if (committed > b->src.size) {
			conn_fail(c, FAIL_PROTOCOL);
			return;
		}
		c->offset = committed;
		c->bin_sent = c->bin_acked = 0;
		c->bin_all_sent = 0;
		bin_fill_window(c);
		return;
	}
	if (id == MSG_BIN_CHUNK + 1) {
		/* One acknowledgement per chunk, in the order they were sent (protocol.md §13): this is the
		 * oldest unacknowledged chunk's, timed from its own sending. */
		unsigned slot = (unsigned)(c->bin_acked % BENCH_WINDOW_MAX);
		if (len < BIN_ACK_LEN || c->bin_acked == c->bin_sent) {
			conn_fail(c, FAIL_PROTOCOL);
			return;
		}
		uint32_t error = bin_get_u32(body);
		st->chunks++;
		upload_rtt(st, c->bin_slot_offset[slot], c->bench->src.size, c->bench->src.chunk,
		    resctl_now_ns() - c->bin_slot_sent_ns[slot]);
		if (error) {
			/* The rest of the window fails behind it: drop the connection and open again. */
			stats_error(st, error);
			if (error != ERR_BUSY && error != ERR_OFFSET_INVALID && error != ERR_SEQ_INVALID) {
				bin_error(c, error, body + BIN_ACK_LEN, len - BIN_ACK_LEN);
				return;
			}
			conn_close(c);
			conn_backoff(c, 0);
			return;
		}
		if (bin_get_u64(body + 4) != c->bin_slot_offset[slot]) {
			conn_fail(c, FAIL_PROTOCOL);   /* not the acknowledgement of the chunk it must be */
			return;
		}
		c->bin_acked++;
		st->bytes += bin_get_u32(body + 12);
		uint64_t committed = bin_get_u64(body + 16);
		c->backoff_ms = RESCTL_BACKOFF_FIRST_MS;
		c->failures = 0;
		if (c->bin_acked == c->bin_sent && c->bin_all_sent) {
			if (committed != b->src.size) {
				conn_fail(c, FAIL_PROTOCOL);   /* the last chunk's success completes the file */
				return;
			}
			c->state = CONN_IDLE;
			conn_file_done(c);
			return;
		}
		if (c->bin_acked == c->bin_sent)
			st->window_drains++;   /* the server ran out of chunks before the file's end */
		bin_fill_window(c);
		return;
	}
	/* 1048: header, then the range's bytes, checked against the source. */
	uint64_t size = 0, offset = 0, length = 0;
	size_t vlen = len >= BIN_RANGE_LEN ? body[28] : 0, head = BIN_RANGE_LEN + vlen + 2;
	if (len < BIN_RANGE_LEN + 2 || vlen > BIN_VERSION_MAX || len < head || head + bin_get_u16(body + BIN_RANGE_LEN + vlen) > len) {
		conn_fail(c, FAIL_PROTOCOL);
		return;
	}
	head += bin_get_u16(body + BIN_RANGE_LEN + vlen);
	uint32_t error = bin_get_u32(body);
	st->chunks++;
	hist_add(&st->rtt, (uint64_t)(resctl_now_ns() - c->sent_ns));
	if (error) {
		bin_error(c, error, body + BIN_RANGE_LEN + vlen + 2, head - BIN_RANGE_LEN - vlen - 2);
		return;
	}
	size = bin_get_u64(body + 4);
	offset = bin_get_u64(body + 12);
	length = bin_get_u64(body + 20);
	if (size != b->src.size || offset != c->offset || length != len - head ||
	    (length == 0 && offset != size) || !source_matches(&b->src, b->dl_tail, offset, body + head, (size_t)length)) {
		bin_range_wrong(c, st);
		return;
	}
	bin_pin_version(c, body, vlen);
	st->bytes += length;
	bin_range_done(c, size, length);
}

/*
 * A 1048 with data is not held whole: once its header is in, its bytes are checked against the
 * source as they arrive and dropped (bin_range_take). Holding 16 MiB ranges for 256 connections
 * made the client's page faults (4 GiB touched), not the server, the thing a sweep measured.
 * Returns 1 when a range started streaming, 2 when its header is not all in yet (need says how
 * much is), 0 when the frame is read whole (not a range with data, an empty range, or an error:
 * small), -1 on a malformed header.
 */
static int bin_range_begin(struct bench_conn *c, size_t *need)
{
	const uint8_t *p = buf_head(&c->in);
	size_t have = buf_len(&c->in);
	*need = FRAME_HEADER_LEN + BIN_RANGE_LEN + 2;
	if (c->state != CONN_BUSY || c->request_id != MSG_BIN_DOWNLOAD)
		return 0;
	if (have < FRAME_HEADER_LEN)
		return 2;
	if (((uint16_t)(p[0] << 8 | p[1])) != MSG_BIN_DOWNLOAD + 1)
		return 0;
	uint32_t len = frame_body_len(p);
	const uint8_t *body = p + FRAME_HEADER_LEN;
	if (len < BIN_RANGE_LEN + 2)
		return 0;
	if (have < *need)
		return 2;
	size_t vlen = body[28];
	if (vlen > BIN_VERSION_MAX)
		return -1;
	*need += vlen;
	if (have < *need)
		return 2;
	size_t head = BIN_RANGE_LEN + vlen + 2 + bin_get_u16(body + BIN_RANGE_LEN + vlen);
	if (head > len || bin_get_u32(body) != 0)
		return 0;   /* an error (small) or malformed: the whole-frame path says which */
	*need = FRAME_HEADER_LEN + head;
	if (have < *need)
		return 2;
	struct bench *b = c->bench;
	uint64_t size = bin_get_u64(body + 4), offset = bin_get_u64(body + 12), length = bin_get_u64(body + 20);
	if (size != b->src.size || offset != c->offset || length != len - head || length == 0)
		return 0;   /* wrong data, counted by the whole-frame path; or nothing to stream (the end) */
	bin_pin_version(c, body, vlen);
	buf_consume_keep(&c->in, FRAME_HEADER_LEN + head);
	c->rng_size = size;
	c->rng_length = c->rng_left = length;
	c->rng_bad = 0;
	return 1;
}

/* Checks and drops what has come of the streaming range; at its end, goes on as bin_frame does. */
static void bin_range_take(struct bench_conn *c)
{
	struct bench *b = c->bench;
	struct bench_stats *st = conn_stats(c);
	size_t n = buf_len(&c->in) < c->rng_left ? buf_len(&c->in) : (size_t)c->rng_left;
	uint64_t at = c->offset + (c->rng_length - c->rng_left);
	if (!c->rng_bad && !source_matches(&b->src, b->dl_tail, at, buf_head(&c->in), n))
		c->rng_bad = 1;
	if (!c->rng_bad)
		st->bytes += n;
	buf_consume_keep(&c->in, n);
	c->rng_left -= n;
	if (c->rng_left > 0)
		return;
	st->chunks++;
	hist_add(&st->rtt, (uint64_t)(resctl_now_ns() - c->sent_ns));
	if (c->rng_bad) {
		bin_range_wrong(c, st);
		return;
	}
	bin_range_done(c, c->rng_size, c->rng_length);
}

static void conn_read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	(void)loop;
	(void)revents;
	struct bench_conn *c = w->data;
	for (;;) {
		uint16_t id;
		const uint8_t *body;
		uint32_t len;
		size_t need = 0;
		int r = 0;
		if (c->rng_left > 0) {
			if (buf_len(&c->in) > 0) {
				bin_range_take(c);
				if (c->fd < 0 || c->state != CONN_BUSY)
					return;
				continue;
			}
			need = BENCH_RANGE_PIECE;
		} else if (c->bench->o->binary && (r = bin_range_begin(c, &need)) != 0) {
			if (r < 0) {
				conn_fail(c, FAIL_PROTOCOL);
				return;
			}
			if (r == 1)
				continue;
			r = 0;   /* the range's header is not all in yet: only that much is needed */
		} else {
			r = resctl_take_frame(&c->in, &id, &body, &len, &need);
		}
		if (r > 0) {
			conn_frame(c, id, body, len);
			/* Closed, finished, backing off, or nothing buffered: the loop calls again when more comes. */
			if (c->fd < 0 || c->state != CONN_BUSY || buf_len(&c->in) == 0)
				return;
			continue;
		}
		if (r < 0) {
			conn_fail(c, FAIL_PROTOCOL);
			return;
		}
		size_t have = buf_len(&c->in);
		size_t want = need > have ? need - have : 0;
		uint8_t *p = buf_reserve(&c->in, want > 65536 ? want : 65536);
		if (p == NULL) {
			conn_fail(c, FAIL_PROTOCOL);
			return;
		}
		ssize_t n = recv(c->fd, p, c->in.cap - c->in.end, 0);
		if (n > 0) {
			buf_commit(&c->in, (size_t)n);
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		conn_fail(c, FAIL_CLOSED);
		return;
	}
}

static void conn_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)revents;
	struct bench_conn *c = w->data;
	ev_timer_stop(loop, w);
	switch (c->state) {
	case CONN_CONNECTING:
		conn_fail(c, FAIL_CONNECT);
		break;
	case CONN_BUSY:
		conn_fail(c, FAIL_TIMEOUT);
		break;
	case CONN_BACKOFF:
		if (c->fd < 0)
			conn_connect(c);
		else if (c->restart_after_backoff)
			conn_start_file(c);
		else
			conn_resend(c);
		break;
	default:
		break;
	}
}

/* ================================================================ running */

static int conn_init(struct bench *b, struct bench_conn *c, unsigned index, enum bench_role role)
{
	*c = (struct bench_conn){ .bench = b, .index = index, .role = role, .fd = -1,
		.backoff_ms = RESCTL_BACKOFF_FIRST_MS };
	ev_io_init(&c->io_read, conn_read_cb, -1, EV_READ);
	ev_io_init(&c->io_write, conn_write_cb, -1, EV_WRITE);
	ev_init(&c->timer, conn_timer_cb);
	c->io_read.data = c->io_write.data = c->timer.data = c;
	c->text_cap = 512 + (b->token_json ? strlen(b->token_json) : 0);
	c->raw_cap = b->src.chunk > 65536 ? b->src.chunk : 65536;
	if (b->o->binary)
		c->raw_cap = 2 * b->src.chunk;   /* the varied tail spans two chunks at most (chunk >= 64) */
	c->b64_cap = b64_encode_room(b->src.chunk);
	c->text = malloc(c->text_cap);
	c->raw = malloc(c->raw_cap);
	c->b64 = malloc(c->b64_cap);
	if (c->text == NULL || c->raw == NULL || c->b64 == NULL)
		return -1;
	return conn_parser_reset(c);
}

static void conn_free(struct bench_conn *c)
{
	conn_close(c);
	ev_timer_stop(c->bench->loop, &c->timer);
	if (c->parser)
		yajl_free(c->parser);
	buf_free(&c->in);
	free(c->text);
	free(c->raw);
	free(c->b64);
}

static void bench_stats_total(const struct bench *b, struct bench_stats *total)
{
	memset(total, 0, sizeof(*total));
	for (int r = 0; r < ROLE_COUNT; r++)
		stats_merge(total, &b->stats[r]);
}

static void progress_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop;
	(void)revents;
	struct bench *b = w->data;
	struct bench_stats total;
	bench_stats_total(b, &total);
	double seconds = (double)(resctl_now_ns() - b->start_ns) / 1e9;
	char line[200];
	if (b->setup_phase)
		snprintf(line, sizeof(line), "bench: uploading %s: %.1f of %.1f MB", BENCH_DOWNLOAD_NAME,
		    (double)total.bytes / 1e6, (double)b->src.size / 1e6);
	else
		snprintf(line, sizeof(line), "bench: %.1f s, %" PRIu64 " files, %.1f MB, %.1f MB/s, %" PRIu64 " errors",
		    seconds, total.files, (double)total.bytes / 1e6, seconds > 0 ? (double)total.bytes / 1e6 / seconds : 0,
		    total.error_total);
	resctl_progress_text(&b->progress, line);
}

static void duration_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)w;
	(void)revents;
	ev_break(loop, EVBREAK_ALL);
}

/* Runs the n connections at conns until they are done, the file limit is reached or the duration ends. */
static double bench_phase(struct bench *b, struct bench_conn *conns, size_t n, uint64_t files_limit, uint64_t duration_ms)
{
	memset(b->stats, 0, sizeof(b->stats));
	b->files_started = 0;
	b->files_limit = files_limit;
	b->active = n;
	ev_now_update(b->loop);
	b->start_ns = resctl_now_ns();
	if (duration_ms) {
		ev_timer_set(&b->duration_timer, (double)duration_ms / 1000.0, 0.0);
		ev_timer_start(b->loop, &b->duration_timer);
	}
	if (b->progress.enabled) {
		ev_timer_set(&b->progress_timer, 0.5, 0.5);
		ev_timer_start(b->loop, &b->progress_timer);
	}
	for (size_t i = 0; i < n; i++)
		conn_connect(&conns[i]);
	if (b->active > 0)
		ev_run(b->loop, 0);
	double seconds = (double)(resctl_now_ns() - b->start_ns) / 1e9;
	ev_timer_stop(b->loop, &b->duration_timer);
	ev_timer_stop(b->loop, &b->progress_timer);
	resctl_progress_clear(&b->progress);
	for (size_t i = 0; i < n; i++) {
		struct bench_conn *c = &conns[i];
		conn_close(c);
		ev_timer_stop(b->loop, &c->timer);
		c->state = CONN_IDLE;
		c->in_file = 0;
	}
	return seconds;
}

/* ================================================================ results */

static double ns_to_ms(uint64_t ns)
{
	return (double)ns / 1e6;
}

/* "none" or "1027 ServerBusy x3, closed x1". */
static void format_errors(char *out, size_t outlen, const struct bench_stats *s)
{
	size_t len = (size_t)snprintf(out, outlen, "%s", s->error_total ? "" : "none");
	for (size_t i = 0; i < s->error_kinds && len < outlen; i++) {
		int64_t code = s->errors[i].code;
		char number[24] = "";
		if (code > 0)
			snprintf(number, sizeof(number), "%" PRId64 " ", code);
		len += (size_t)snprintf(out + len, outlen - len, "%s%s%s x%" PRIu64, i ? ", " : "", number,
		    failure_name(code), s->errors[i].count);
	}
}

static void print_role_line(const char *label, const struct bench_stats *s, double seconds)
{
	const struct histogram *h = &s->rtt;
	printf("%s: %" PRIu64 " files, %" PRIu64 " bytes, %.2f MB/s, %" PRIu64 " chunks, round trip ms "
	       "p50 %.3f p90 %.3f p99 %.3f max %.3f\n",
	    label, s->files, s->bytes, seconds > 0 ? (double)s->bytes / 1e6 / seconds : 0, s->chunks,
	    ns_to_ms(hist_percentile(h, 0.50)), ns_to_ms(hist_percentile(h, 0.90)),
	    ns_to_ms(hist_percentile(h, 0.99)), ns_to_ms(h->max));
}

static void print_text(const struct bench *b, const struct bench_stats *total, double seconds)
{
	const struct bench_opts *o = b->o;
	printf("bench %s: %" PRIu64 " connections, %.2f s, %" PRIu64 " files of %" PRIu64 " bytes, "
	       "%" PRIu64 " bytes, %.2f MB/s\n",
	    mode_names[o->mode], o->connections, seconds, total->files, o->size, total->bytes,
	    seconds > 0 ? (double)total->bytes / 1e6 / seconds : 0);
	const struct histogram *h = &total->rtt;
	printf("chunk round trip ms: p50 %.3f p90 %.3f p99 %.3f max %.3f (%" PRIu64 " chunks)\n",
	    ns_to_ms(hist_percentile(h, 0.50)), ns_to_ms(hist_percentile(h, 0.90)),
	    ns_to_ms(hist_percentile(h, 0.99)), ns_to_ms(h->max), h->count);
	if (o->mode == MODE_MIXED)
		for (int r = 0; r < ROLE_COUNT; r++)
			print_role_line(role_names[r], &b->stats[r], seconds);
	if (o->mode != MODE_DOWNLOAD) {
		printf("upload chunk round trip ms by place in the file:");
		for (int i = 0; i < PLACE_COUNT; i++) {
			const struct histogram *p = &b->stats[ROLE_UPLOAD].rtt_place[i];
			printf("%s %s p50 %.3f p99 %.3f max %.3f (%" PRIu64 ")", i ? ";" : "", place_names[i],
			    ns_to_ms(hist_percentile(p, 0.50)), ns_to_ms(hist_percentile(p, 0.99)), ns_to_ms(p->max), p->count);
		}
		printf("\n");
	}
	if (o->binary && o->mode != MODE_DOWNLOAD)
		printf("upload window: %u chunks, at most %" PRIu64 " in flight, ran dry %" PRIu64 " times before a file's end\n",
		    b->bin_window, b->stats[ROLE_UPLOAD].max_in_flight, b->stats[ROLE_UPLOAD].window_drains);
	char errors[1024];
	format_errors(errors, sizeof(errors), total);
	printf("errors: %s\n", errors);
}

static void gen_key(yajl_gen g, const char *key)
{
	yajl_gen_string(g, (const unsigned char *)key, strlen(key));
}

static void gen_u64(yajl_gen g, const char *key, uint64_t v)
{
	char num[24];
	int n = snprintf(num, sizeof(num), "%" PRIu64, v);
	gen_key(g, key);
	yajl_gen_number(g, num, (size_t)n);
}

static void gen_fixed(yajl_gen g, const char *key, double v)
{
	char num[40];
	int n = snprintf(num, sizeof(num), "%.3f", v);
	gen_key(g, key);
	yajl_gen_number(g, num, (size_t)n);
}

static void gen_rtt(yajl_gen g, const char *key, const struct histogram *h)
{
	gen_key(g, key);
	yajl_gen_map_open(g);
	gen_fixed(g, "p50", ns_to_ms(hist_percentile(h, 0.50)));
	gen_fixed(g, "p90", ns_to_ms(hist_percentile(h, 0.90)));
	gen_fixed(g, "p99", ns_to_ms(hist_percentile(h, 0.99)));
	gen_fixed(g, "max", ns_to_ms(h->max));
	gen_u64(g, "count", h->count);
	yajl_gen_map_close(g);
}

static void gen_role(yajl_gen g, const struct bench_stats *s, double seconds)
{
	gen_u64(g, "files", s->files);
	gen_u64(g, "bytes", s->bytes);
	gen_fixed(g, "mb_per_s", seconds > 0 ? (double)s->bytes / 1e6 / seconds : 0);
	gen_u64(g, "chunks", s->chunks);
	gen_rtt(g, "rtt_ms", &s->rtt);
	if (s->rtt_place[PLACE_FIRST].count > 0) {
		gen_key(g, "upload_rtt_ms_by_place");
		yajl_gen_map_open(g);
		for (int i = 0; i < PLACE_COUNT; i++)
			gen_rtt(g, place_names[i], &s->rtt_place[i]);
		yajl_gen_map_close(g);
	}
	gen_u64(g, "max_in_flight", s->max_in_flight);
	gen_u64(g, "window_drains", s->window_drains);
	gen_u64(g, "errors_total", s->error_total);
	gen_key(g, "errors");
	yajl_gen_map_open(g);
	for (size_t i = 0; i < s->error_kinds; i++) {
		char key[24];
		if (s->errors[i].code > 0)
			snprintf(key, sizeof(key), "%" PRId64, s->errors[i].code);
		else
			snprintf(key, sizeof(key), "%s", failure_name(s->errors[i].code));
		gen_u64(g, key, s->errors[i].count);
	}
	yajl_gen_map_close(g);
}

static void print_json(const struct bench *b, const struct bench_stats *total, double seconds)
{
	const struct bench_opts *o = b->o;
	yajl_gen g = yajl_gen_alloc(NULL);
	if (g == NULL)
		return;
	yajl_gen_map_open(g);
	gen_key(g, "mode");
	yajl_gen_string(g, (const unsigned char *)mode_names[o->mode], strlen(mode_names[o->mode]));
	gen_u64(g, "connections", o->connections);
	gen_u64(g, "size", o->size);
	gen_u64(g, "chunk", o->chunk);
	gen_key(g, "protocol");
	yajl_gen_string(g, (const unsigned char *)(o->binary ? "binary" : "json"), o->binary ? 6 : 4);
	gen_fixed(g, "seconds", seconds);
	gen_role(g, total, seconds);
	if (o->mode == MODE_MIXED) {
		for (int r = 0; r < ROLE_COUNT; r++) {
			gen_key(g, role_names[r]);
			yajl_gen_map_open(g);
			gen_role(g, &b->stats[r], seconds);
			yajl_gen_map_close(g);
		}
	}
	yajl_gen_map_close(g);
	const unsigned char *out;
	size_t len;
	yajl_gen_get_buf(g, &out, &len);
	fwrite(out, 1, len, stdout);
	fputc('\n', stdout);
	yajl_gen_free(g);
}

/* ================================================================ setup */

static int bench_setup(struct bench *b, const struct bench_opts *o)
{
	char err[256];
	struct addrinfo *list;
	if (resctl_resolve(&o->ep, &list, err, sizeof(err)) != 0) {
		resctl_error("bench: %s", err);
		return -1;
	}
	memcpy(&b->addr, list->ai_addr, list->ai_addrlen);
	b->addr_len = list->ai_addrlen;
	freeaddrinfo(list);

	if (o->auth.token != NULL) {
		/* The token goes into every request as it is: escape it once. */
		yajl_gen g = yajl_gen_alloc(NULL);
		const unsigned char *out;
		size_t len;
		if (g == NULL)
			return -1;
		yajl_gen_string(g, (const unsigned char *)o->auth.token, strlen(o->auth.token));
		yajl_gen_get_buf(g, &out, &len);
		b->token_json = strndup((const char *)out, len);
		yajl_gen_free(g);
		if (b->token_json == NULL)
			return -1;
	}
	if (source_init(&b->src, o->size, (size_t)o->chunk, !o->binary) != 0) {
		resctl_error("bench: out of memory for a %" PRIu64 "-byte file", o->size);
		return -1;
	}
	/* Chunks are at most o->chunk bytes: this many in flight keep within the window's bytes too. */
	b->bin_window = BIN_WINDOW / (unsigned)o->chunk;
	if (b->bin_window > BENCH_WINDOW_MAX)
		b->bin_window = BENCH_WINDOW_MAX;
	if (b->bin_window == 0)
		b->bin_window = 1;
	source_tail(&b->src, UINT64_MAX, b->dl_tail);

	b->loop = ev_default_loop(EVFLAG_AUTO);
	if (b->loop == NULL) {
		resctl_error("bench: cannot start the event loop");
		return -1;
	}
	ev_init(&b->duration_timer, duration_cb);
	ev_init(&b->progress_timer, progress_cb);
	b->progress_timer.data = b;
	resctl_progress_init(&b->progress, "bench");

	/* One more slot than connections: the setup upload of bench-dl. */
	b->conns = calloc(o->connections + 1, sizeof(*b->conns));
	if (b->conns == NULL)
		return -1;
	for (size_t i = 0; i <= o->connections; i++) {
		enum bench_role role = o->mode == MODE_DOWNLOAD ? ROLE_DOWNLOAD : ROLE_UPLOAD;
		if (o->mode == MODE_MIXED)
			role = i < (o->connections + 1) / 2 ? ROLE_UPLOAD : ROLE_DOWNLOAD;
		if (conn_init(b, &b->conns[i], (unsigned)i, i == o->connections ? ROLE_UPLOAD : role) != 0) {
			resctl_error("bench: out of memory");
			return -1;
		}
		b->nconns = i + 1;
	}
	return 0;
}

/* Download modes read bench-dl: upload it first, outside the timed run, on the spare connection. */
static int bench_upload_download_file(struct bench *b)
{
	struct bench_conn *setup = &b->conns[b->o->connections];
	setup->setup = 1;
	b->setup_phase = 1;
	bench_phase(b, setup, 1, 1, 0);
	b->setup_phase = 0;
	struct bench_stats setup_stats = b->stats[ROLE_UPLOAD];
	if (setup_stats.files == 1)
		return 0;
	char errors[1024];
	format_errors(errors, sizeof(errors), &setup_stats);
	resctl_error("bench: could not upload %s for the download run (errors: %s)", BENCH_DOWNLOAD_NAME, errors);
	return -1;
}

int resctl_bench_main(int argc, char **argv)
{
	struct bench_opts o;
	if (bench_parse_args(argc, argv, &o) != 0)
		return RESCTL_EXIT_USAGE;
	struct bench b = { .o = &o };
	int status = RESCTL_EXIT_FAIL;
	if (bench_setup(&b, &o) != 0)
		goto out;
	if (o.mode != MODE_UPLOAD && bench_upload_download_file(&b) != 0)
		goto out;

	double seconds = bench_phase(&b, b.conns, (size_t)o.connections, o.files, o.duration_ms);
	struct bench_stats total;
	bench_stats_total(&b, &total);
	if (o.json)
		print_json(&b, &total, seconds);
	else
		print_text(&b, &total, seconds);
	status = total.error_total == 0 ? RESCTL_EXIT_OK : RESCTL_EXIT_FAIL;
out:
	for (size_t i = 0; i < b.nconns; i++)
		conn_free(&b.conns[i]);
	free(b.conns);
	free(b.token_json);
	free(b.dl.text);
	source_free(&b.src);
	return status;
}

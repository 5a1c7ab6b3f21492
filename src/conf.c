/* conf.c: one table drives every configuration key: its section, type, bounds and default. */
#include "config.h"
#include "conf.h"
#include "backend.h"
#include "frame.h"
#include "log.h"

#include <errno.h>
#include <ini.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

enum conf_type { T_INT, T_INT64, T_BOOL, T_STR, T_LISTEN, T_WORKERS, T_FSYNC, T_LOGLEVEL, T_BACKEND, T_SENTINELS, T_DEDUP };

struct conf_key {
	const char *section;
	const char *name;
	enum conf_type type;
	size_t offset;       /* into struct conf */
	size_t size;         /* for strings */
	int64_t min, max;    /* for numbers */
	const char *def;     /* default, parsed like a file value */
	int scope;           /* SCOPE_* bits: who reads it, and whether a reload can change it */
};

/* Who reads a key: the master and the workers, or the storage process too (a reload that changes
 * it restarts storage); SCOPE_START: applied once at start (bound, locked, switched to), so a
 * reload keeps the running value. */
enum { SCOPE_WORKERS = 0, SCOPE_STORAGE = 1, SCOPE_START = 2 };

#define S(f) offsetof(struct conf, f), sizeof(((struct conf *)0)->f)
#define N(f) offsetof(struct conf, f), sizeof(((struct conf *)0)->f)

static const struct conf_key conf_keys[] = {
	{ "server", "listen", T_LISTEN, 0, 0, 0, 0, "0.0.0.0:9090", SCOPE_WORKERS },
	{ "server", "workers", T_WORKERS, N(workers), 1, 256, "auto", SCOPE_WORKERS },
	{ "server", "run_dir", T_STR, S(run_dir), 0, 0, "/run/resourced", SCOPE_STORAGE | SCOPE_START },
	{ "server", "pid_file", T_STR, S(pid_file), 0, 0, "/run/resourced/resourced.pid", SCOPE_START },
	{ "server", "user", T_STR, S(user), 0, 0, "", SCOPE_START },
	{ "server", "group", T_STR, S(group), 0, 0, "", SCOPE_START },
	{ "server", "node", T_STR, S(node), 0, 0, "", SCOPE_STORAGE },
	{ "server", "max_frame", T_INT64, N(max_frame), 1024, 64 << 20, FRAME_MAX_DEFAULT_TEXT, SCOPE_WORKERS },
	{ "server", "output_cap", T_INT64, N(output_cap), 4096, 1 << 30, "1048576", SCOPE_WORKERS },
	{ "server", "output_budget", T_INT64, N(output_budget), 1 << 20, (int64_t)1 << 40, "268435456", SCOPE_WORKERS },
	{ "server", "input_budget", T_INT64, N(input_budget), 1 << 20, (int64_t)1 << 40, "268435456", SCOPE_WORKERS },
	{ "server", "idle_timeout", T_INT, N(idle_timeout), 1, 86400, "300", SCOPE_WORKERS },
	{ "server", "frame_timeout", T_INT, N(frame_timeout), 1, 3600, "30", SCOPE_WORKERS },
	{ "server", "max_connections", T_INT, N(max_connections), 1, 1000000, "10000", SCOPE_WORKERS },
	{ "server", "max_connections_per_address", T_INT, N(max_connections_per_address), 0, 60000, "0", SCOPE_WORKERS },
	{ "server", "auth_cache_ttl", T_INT, N(auth_cache_ttl), 0, 86400, "60", SCOPE_WORKERS },
	{ "server", "anonymous", T_BOOL, N(anonymous), 0, 1, "no", SCOPE_WORKERS },
	{ "server", "download_chunk", T_INT64, N(download_chunk), 1, 16 << 20, "32768", SCOPE_WORKERS },
	{ "server", "storage_timeout", T_INT, N(storage_timeout), 1, 3600, "30", SCOPE_WORKERS },
	{ "server", "shutdown_timeout", T_INT, N(shutdown_timeout), 1, 86400, "30", SCOPE_WORKERS },
	{ "server", "drain_grace", T_INT, N(drain_grace), 0, 3600, "3", SCOPE_WORKERS },
	{ "server", "stats_socket", T_STR, S(stats_socket), 0, 0, "", SCOPE_START },
	{ "server", "agent_listen", T_STR, S(agent_listen), 0, 0, "", SCOPE_START },
	{ "server", "http_listen", T_STR, S(http_listen), 0, 0, "", SCOPE_START },
	{ "server", "link_ring", T_INT64, N(link_ring), 0, 1 << 30, "33554432", SCOPE_WORKERS },
	{ "server", "proxy_protocol", T_BOOL, N(proxy_protocol), 0, 1, "off", SCOPE_WORKERS },
	{ "storage", "root", T_STR, S(root), 0, 0, "/var/lib/resourced", SCOPE_STORAGE },
	{ "storage", "backend", T_BACKEND, S(backend), 0, 0, "fs", SCOPE_STORAGE },
	{ "storage", "max_file_size", T_INT64, N(max_file_size), 0, INT64_C(1) << 50, "4294967296", SCOPE_STORAGE },
	{ "storage", "upload_ttl", T_INT, N(upload_ttl), 1, 30 * 86400, "3600", SCOPE_STORAGE },
	{ "storage", "fsync", T_FSYNC, N(fsync_policy), 0, 0, "complete", SCOPE_STORAGE },
	{ "storage", "direct_io_min", T_INT64, N(direct_io_min), 0, 1 << 30, "65536", SCOPE_STORAGE },
	{ "storage", "io_threads", T_INT, N(io_threads), 1, 64, "4", SCOPE_STORAGE },
	{ "storage", "janitor_interval", T_INT, N(janitor_interval), 1, 86400, "60", SCOPE_STORAGE },
	{ "storage", "max_uploads", T_INT, N(max_uploads), 1, 1000000, "10000", SCOPE_STORAGE },
	{ "storage", "max_uploads_per_user", T_INT, N(max_uploads_per_user), 1, 1000000, "100", SCOPE_STORAGE },
	{ "storage", "min_free_space", T_INT64, N(min_free_space), 0, INT64_C(1) << 60, "67108864", SCOPE_STORAGE },
	{ "storage", "lease_ttl", T_INT, N(lease_ttl), 2, 600, "6", SCOPE_STORAGE },
	{ "storage", "dedup", T_DEDUP, N(dedup), 0, 0, "user", SCOPE_STORAGE },
	{ "rados", "conf", T_STR, S(rados_conf), 0, 0, "/etc/ceph/ceph.conf", SCOPE_STORAGE },
	{ "rados", "user", T_STR, S(rados_user), 0, 0, "resourced", SCOPE_STORAGE },
	{ "rados", "pool", T_STR, S(rados_pool), 0, 0, "resourced", SCOPE_STORAGE },
	{ "rados", "namespace", T_STR, S(rados_namespace), 0, 0, "", SCOPE_STORAGE },
	{ "rados", "op_timeout", T_INT, N(rados_op_timeout), 0, 3600, "0", SCOPE_STORAGE },
	{ "rados", "object_size", T_INT64, N(rados_object_size), 65536, 1 << 30, "67108864", SCOPE_STORAGE },
	{ "rados", "gc_grace", T_INT, N(rados_gc_grace), 0, 30 * 86400, "3600", SCOPE_STORAGE },
	{ "redis", "host", T_STR, S(redis_host), 0, 0, "127.0.0.1", SCOPE_STORAGE },
	{ "redis", "port", T_INT, N(redis_port), 1, 65535, "6379", SCOPE_STORAGE },
	{ "redis", "socket", T_STR, S(redis_socket), 0, 0, "", SCOPE_STORAGE },
	{ "redis", "password", T_STR, S(redis_password), 0, 0, "", SCOPE_STORAGE },
	{ "redis", "db", T_INT, N(redis_db), 0, 65535, "0", SCOPE_STORAGE },
	{ "redis", "timeout", T_INT, N(redis_timeout), 1, 3600, "5", SCOPE_STORAGE },
	{ "redis", "prefix", T_STR, S(redis_prefix), 0, 0, "", SCOPE_STORAGE },
	{ "redis", "sentinels", T_SENTINELS, S(redis_sentinels), 0, 0, "", SCOPE_STORAGE },
	{ "redis", "master_name", T_STR, S(redis_master_name), 0, 0, "", SCOPE_STORAGE },
	{ "redis", "sentinel_password", T_STR, S(redis_sentinel_password), 0, 0, "", SCOPE_STORAGE },
	{ "postgres", "conninfo", T_STR, S(pg_conninfo), 0, 0, "", SCOPE_STORAGE },
	{ "postgres", "timeout", T_INT, N(pg_timeout), 1, 3600, "5", SCOPE_STORAGE },
	/* The storage process reads it too, but from the shared stats page (log_share_level): no restart. */
	{ "log", "level", T_LOGLEVEL, N(log_level), 0, 0, "info", SCOPE_WORKERS },
	{ "log", "file", T_STR, S(log_file), 0, 0, "", SCOPE_STORAGE },
	{ "log", "access_log", T_STR, S(access_log), 0, 0, "", SCOPE_WORKERS },
};

static int parse_int64(const char *value, int64_t *out)
{
	char *end;
	errno = 0;
	if (value[0] == '\0')
		return -1;
	long long v = strtoll(value, &end, 10);
	if (errno != 0 || *end != '\0')
		return -1;
	*out = v;
	return 0;
}

static int parse_bool(const char *value, int *out)
{
	static const char *const yes[] = { "yes", "on", "true", "1" };
	static const char *const no[] = { "no", "off", "false", "0" };
	for (size_t i = 0; i < 4; i++) {
		if (strcasecmp(value, yes[i]) == 0) { *out = 1; return 0; }
		if (strcasecmp(value, no[i]) == 0) { *out = 0; return 0; }
	}
	return -1;
}

/* host:port, [v6]:port or a bare port. */
static int parse_listen(struct conf *c, const char *value)
{
	const char *port;
	size_t hostlen;
	if (value[0] == '[') {
		const char *close = strchr(value, ']');
		if (close == NULL || close[1] != ':')
			return -1;
		hostlen = (size_t)(close - value - 1);
		value++;
		port = close + 2;
	} else {
		const char *colon = strrchr(value, ':');
		if (colon == NULL) {
			hostlen = 0;
			port = value;
		} else {
			hostlen = (size_t)(colon - value);
			port = colon + 1;
		}
	}
	int64_t p;
	if (hostlen >= sizeof(c->listen_host) || parse_int64(port, &p) < 0 || p < 1 || p > 65535)
		return -1;
	memcpy(c->listen_host, value, hostlen);
	c->listen_host[hostlen] = '\0';
	if (hostlen == 0)
		snprintf(c->listen_host, sizeof(c->listen_host), "0.0.0.0");
	snprintf(c->listen_port, sizeof(c->listen_port), "%d", (int)p);
	return 0;
}

static int set_key(struct conf *c, const struct conf_key *k, const char *value, char *why, size_t whylen)
{
	char *base = (char *)c;
	int64_t v;
	switch (k->type) {
	case T_INT:
	case T_INT64:
		if (parse_int64(value, &v) < 0 || v < k->min || v > k->max) {
			snprintf(why, whylen, "'%s' is not a whole number from %lld to %lld", value,
			    (long long)k->min, (long long)k->max);
			return -1;
		}
		if (k->type == T_INT)
			*(int *)(base + k->offset) = (int)v;
		else
			*(int64_t *)(base + k->offset) = v;
		return 0;
	case T_BOOL:
		if (parse_bool(value, (int *)(base + k->offset)) < 0) {
			snprintf(why, whylen, "'%s' is not yes or no", value);
			return -1;
		}
		return 0;
	case T_STR:
		if (strlen(value) >= k->size) {
			snprintf(why, whylen, "value is longer than %zu bytes", k->size - 1);
			return -1;
		}
		memcpy(base + k->offset, value, strlen(value) + 1);
		return 0;
	case T_LISTEN:
		if (parse_listen(c, value) < 0) {
			snprintf(why, whylen, "'%s' is not host:port with a port from 1 to 65535", value);
			return -1;
		}
		return 0;
	case T_WORKERS:
		if (strcmp(value, "auto") == 0) {
			long n = sysconf(_SC_NPROCESSORS_ONLN);
			c->workers = n < 1 ? 1 : (n > k->max ? (int)k->max : (int)n);
			return 0;
		}
		if (parse_int64(value, &v) < 0 || v < k->min || v > k->max) {
			snprintf(why, whylen, "'%s' is not auto or a number from %lld to %lld", value,
			    (long long)k->min, (long long)k->max);
			return -1;
		}
		c->workers = (int)v;
		return 0;
	case T_FSYNC:
		if (strcmp(value, "none") == 0)
			c->fsync_policy = FSYNC_NONE;
		else if (strcmp(value, "complete") == 0)
			c->fsync_policy = FSYNC_COMPLETE;
		else if (strcmp(value, "always") == 0)
			c->fsync_policy = FSYNC_ALWAYS;
		else {
			snprintf(why, whylen, "'%s' is not always, complete or none", value);
			return -1;
		}
		return 0;
	case T_DEDUP:
		if (strcmp(value, "off") == 0)
			c->dedup = DEDUP_OFF;
		else if (strcmp(value, "user") == 0)
			c->dedup = DEDUP_USER;
		else if (strcmp(value, "global") == 0)
			c->dedup = DEDUP_GLOBAL;
		else {
			snprintf(why, whylen, "'%.*s' is not off, user or global", 64, value);
			return -1;
		}
		return 0;
	case T_BACKEND:
		if (strlen(value) >= k->size || backend_find(value) == NULL) {
			if (strcmp(value, "rados") == 0)
				snprintf(why, whylen, "this build has no RADOS backend: install librados-dev and run configure "
				    "again (known: %s)", backend_names());
			else
				snprintf(why, whylen, "'%.*s' is not a storage backend (known: %s)", 64, value, backend_names());
			return -1;
		}
		memcpy(base + k->offset, value, strlen(value) + 1);
		return 0;
	case T_SENTINELS: {
		struct conf_hostport hp[CONF_MAX_SENTINELS];
		if (strlen(value) >= k->size) {
			snprintf(why, whylen, "value is longer than %zu bytes", k->size - 1);
			return -1;
		}
		if (value[0] && conf_parse_hostports(value, hp, CONF_MAX_SENTINELS) < 0) {
			snprintf(why, whylen, "'%s' is not host:port[,host:port...] (at most %d, ports 1-65535)", value,
			    CONF_MAX_SENTINELS);
			return -1;
		}
		memcpy(base + k->offset, value, strlen(value) + 1);
		return 0;
	}
	case T_LOGLEVEL: {
		int level = log_level_from_name(value);
		if (level < 0) {
			snprintf(why, whylen, "'%s' is not error, warn, info or debug", value);
			return -1;
		}
		c->log_level = level;
		return 0;
	}
	}
	return -1;
}

int conf_parse_hostports(const char *list, struct conf_hostport *out, int max)
{
	int n = 0;
	const char *p = list;
	for (;;) {
		while (*p == ' ' || *p == '\t')
			p++;
		size_t len = strcspn(p, ",");
		while (len > 0 && (p[len - 1] == ' ' || p[len - 1] == '\t'))
			len--;
		char item[300];
		if (len == 0 || len >= sizeof(item) || n >= max)
			return -1;
		memcpy(item, p, len);
		item[len] = '\0';
		const char *host = item, *port;
		char *colon;
		if (item[0] == '[') {
			char *close = strchr(item, ']');
			if (close == NULL || close[1] != ':')
				return -1;
			*close = '\0';
			host = item + 1;
			port = close + 2;
		} else {
			colon = strrchr(item, ':');
			if (colon == NULL)
				return -1;
			*colon = '\0';
			port = colon + 1;
		}
		int64_t v;
		if (host[0] == '\0' || strlen(host) >= sizeof(out[n].host) || parse_int64(port, &v) < 0 ||
		    v < 1 || v > 65535)
			return -1;
		snprintf(out[n].host, sizeof(out[n].host), "%s", host);
		out[n].port = (int)v;
		n++;
		p = strchr(p, ',');
		if (p == NULL)
			return n;
		p++;
	}
}

#define CONF_NKEYS (sizeof(conf_keys) / sizeof(conf_keys[0]))

/* Edits (insert, delete, replace, swap of neighbours) from a to b, counted up to 3. */
static int spelling_distance(const char *a, const char *b)
{
	size_t la = strlen(a), lb = strlen(b);
	if (la > 40 || lb > 40)
		return 3;
	int d[41][41];
	for (size_t i = 0; i <= la; i++)
		d[i][0] = (int)i;
	for (size_t j = 0; j <= lb; j++)
		d[0][j] = (int)j;
	for (size_t i = 1; i <= la; i++)
		for (size_t j = 1; j <= lb; j++) {
			int best = d[i - 1][j - 1] + (a[i - 1] != b[j - 1]);
			if (d[i - 1][j] + 1 < best)
				best = d[i - 1][j] + 1;
			if (d[i][j - 1] + 1 < best)
				best = d[i][j - 1] + 1;
			if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] && d[i - 2][j - 2] + 1 < best)
				best = d[i - 2][j - 2] + 1;
			d[i][j] = best;
		}
	return d[la][lb] < 3 ? d[la][lb] : 3;
}

static int section_known(const char *section)
{
	for (size_t i = 0; i < CONF_NKEYS; i++)
		if (strcmp(conf_keys[i].section, section) == 0)
			return 1;
	return 0;
}

/* What an unknown key most likely is, for its error message: a missing '=', a key of another
 * section, a section written in capitals, or a near spelling of a key. Empty when nothing fits. */
static void unknown_key_hint(const char *section, const char *name, char *hint, size_t len)
{
	hint[0] = '\0';
	if (strpbrk(name, " \t")) {
		snprintf(hint, len, " (a key has no spaces: is the '=' missing?)");
		return;
	}
	const struct conf_key *elsewhere = NULL, *near = NULL;
	int near_score = INT_MAX;
	for (size_t i = 0; i < CONF_NKEYS; i++) {
		const struct conf_key *k = &conf_keys[i];
		if (strcmp(k->name, name) == 0 && elsewhere == NULL)
			elsewhere = k;
		/* One edit for short names, two for longer ones ("port" must not suggest "pool"); the
		 * fewest edits win, and a key of this section wins a tie. */
		int distance = spelling_distance(name, k->name);
		int score = 2 * distance + (strcmp(k->section, section) != 0);
		if (distance <= (strlen(k->name) <= 5 ? 1 : 2) && score < near_score) {
			near = k;
			near_score = score;
		}
	}
	if (!section_known(section)) {
		for (size_t i = 0; i < CONF_NKEYS; i++)
			if (strcasecmp(conf_keys[i].section, section) == 0) {
				snprintf(hint, len, " (section names are lower case: [%s])", conf_keys[i].section);
				return;
			}
	}
	if (elsewhere)
		snprintf(hint, len, section[0] ? " (%s is a key of [%s])" : " (before any [section]: %s is a key of [%s])",
		    name, elsewhere->section);
	else if (near && strcmp(near->section, section) == 0)
		snprintf(hint, len, " (did you mean %s?)", near->name);
	else if (near)
		snprintf(hint, len, " (did you mean [%s] %s?)", near->section, near->name);
	else if (!section[0])
		snprintf(hint, len, " (before any [section] header)");
	else if (!section_known(section)) {
		/* The sections in the table's order, each once. */
		int n = snprintf(hint, len, " (no section [%s]; there are", section);
		for (size_t i = 0; i < CONF_NKEYS && n > 0 && (size_t)n < len; i++)
			if (i == 0 || strcmp(conf_keys[i].section, conf_keys[i - 1].section) != 0)
				n += snprintf(hint + n, len - (size_t)n, " [%s]", conf_keys[i].section);
		if (n > 0 && (size_t)n < len)
			snprintf(hint + n, len - (size_t)n, ")");
	}
}

/* What an unknown section header most likely is: capitals, or a near spelling of a section;
 * otherwise the list of sections. */
static void unknown_section_hint(const char *section, char *hint, size_t len)
{
	const char *near = NULL;
	int near_distance = INT_MAX;
	for (size_t i = 0; i < CONF_NKEYS; i++) {
		const char *known = conf_keys[i].section;
		if (strcasecmp(known, section) == 0) {
			snprintf(hint, len, " (section names are lower case: [%s])", known);
			return;
		}
		int distance = spelling_distance(section, known);
		if (distance <= (strlen(known) <= 5 ? 1 : 2) && distance < near_distance) {
			near = known;
			near_distance = distance;
		}
	}
	if (near) {
		snprintf(hint, len, " (did you mean [%s]?)", near);
		return;
	}
	int n = snprintf(hint, len, " (there are");
	for (size_t i = 0; i < CONF_NKEYS && n > 0 && (size_t)n < len; i++)
		if (i == 0 || strcmp(conf_keys[i].section, conf_keys[i - 1].section) != 0)
			n += snprintf(hint + n, len - (size_t)n, " [%s]", conf_keys[i].section);
	if (n > 0 && (size_t)n < len)
		snprintf(hint + n, len - (size_t)n, ")");
}

int conf_set(struct conf *c, const char *section, const char *name, const char *value,
    char *err, size_t errlen)
{
	for (size_t i = 0; i < sizeof(conf_keys) / sizeof(conf_keys[0]); i++) {
		const struct conf_key *k = &conf_keys[i];
		if (strcmp(k->section, section) != 0 || strcmp(k->name, name) != 0)
			continue;
		char why[256];
		if (set_key(c, k, value, why, sizeof(why)) < 0) {
			snprintf(err, errlen, "[%s] %s: %s", section, name, why);
			return -1;
		}
		return 0;
	}
	char hint[160];
	unknown_key_hint(section, name, hint, sizeof(hint));
	snprintf(err, errlen, "[%s] %s: unknown key%s", section, name, hint);
	return -1;
}

/* Appends ", [section] key" (no comma for the first) to out; a list that does not fit ends in "...". */
static void name_append(char *out, size_t outlen, size_t *used, int first_done, const struct conf_key *k)
{
	if (*used >= outlen)
		return;
	int n = snprintf(out + *used, outlen - *used, "%s[%s] %s", first_done ? ", " : "", k->section, k->name);
	if (n < 0 || (size_t)n >= outlen - *used) {
		if (outlen >= 4)
			snprintf(out + outlen - 4, 4, "...");
		*used = outlen;
	} else {
		*used += (size_t)n;
	}
}

int conf_keep_start_keys(const struct conf *running, struct conf *next, char *out, size_t outlen)
{
	int kept = 0;
	size_t used = 0;
	if (outlen)
		out[0] = '\0';
	for (size_t i = 0; i < CONF_NKEYS; i++) {
		const struct conf_key *k = &conf_keys[i];
		if (!(k->scope & SCOPE_START))
			continue;
		const char *was = (const char *)running + k->offset;
		char *now = (char *)next + k->offset;
		if (strcmp(was, now) == 0)   /* every SCOPE_START key is a string */
			continue;
		memcpy(now, was, k->size);
		name_append(out, outlen, &used, kept++, k);
	}
	return kept;
}

int conf_storage_changes(const struct conf *a, const struct conf *b, char *out, size_t outlen)
{
	int changed = 0;
	size_t used = 0;
	if (outlen)
		out[0] = '\0';
	for (size_t i = 0; i < CONF_NKEYS; i++) {
		const struct conf_key *k = &conf_keys[i];
		if (!(k->scope & SCOPE_STORAGE))
			continue;
		const char *x = (const char *)a + k->offset, *y = (const char *)b + k->offset;
		/* Strings are compared up to their NUL: a shorter value may leave an older one's tail. */
		int differ = k->type == T_STR || k->type == T_BACKEND || k->type == T_SENTINELS ? strcmp(x, y) != 0 :
		    memcmp(x, y, k->size) != 0;
		if (!differ)
			continue;
		name_append(out, outlen, &used, changed++, k);   /* names only: values may be passwords */
	}
	return changed;
}

int conf_storage_equal(const struct conf *a, const struct conf *b)
{
	return conf_storage_changes(a, b, NULL, 0) == 0;
}

double conf_drain_grace(const struct conf *c)
{
	/* The whole graceful stop stays within shutdown_timeout (service managers wait for
	 * that): the grace takes at most half of it, transfers in progress keep the rest. */
	double half = c->shutdown_timeout / 2.0;
	return c->drain_grace < half ? (double)c->drain_grace : half;
}

void conf_defaults(struct conf *c)
{
	char err[256];
	memset(c, 0, sizeof(*c));
	for (size_t i = 0; i < sizeof(conf_keys) / sizeof(conf_keys[0]); i++)
		if (conf_set(c, conf_keys[i].section, conf_keys[i].name, conf_keys[i].def, err,
		    sizeof(err)) < 0)
			fatalx("bad built-in default: %s", err);   /* a programming error */
}

struct load_ctx {
	struct conf *conf;
	FILE *file;
	int line;            /* lines handed to inih so far */
	int after_key;       /* a key line since the last section header (inih's continuation rule) */
	int err_line;        /* first line we found wrong, 0 if none */
	char err[400];
};

static void load_error(struct load_ctx *ctx, const char *err)
{
	if (ctx->err_line != 0)
		return;   /* the first error is the one reported */
	ctx->err_line = ctx->line;
	snprintf(ctx->err, sizeof(ctx->err), "%s", err);
}

/* Refuses a section header of no known section. inih calls the handler only for keys, so an
 * empty [section] would otherwise pass unseen; this reads each line as inih will: a line that
 * starts with '[' is a header, unless it is indented after a key (then it continues the value). */
static void conf_check_section_line(struct load_ctx *ctx, const char *line)
{
	const char *start = line;
	if (ctx->line == 1 && strncmp(start, "\xEF\xBB\xBF", 3) == 0)
		start += 3;   /* inih skips a UTF-8 byte order mark */
	start += strspn(start, " \t\r\n\f\v");
	if (*start == '\0' || *start == ';' || *start == '#')
		return;   /* blank or comment: inih keeps its continuation state */
	if (*start != '[' || (ctx->after_key && start > line)) {
		ctx->after_key = 1;
		return;
	}
	ctx->after_key = 0;
	const char *end = strchr(start + 1, ']');
	/* No ']', or an inline comment before it, is inih's syntax error, reported for this line. */
	if (end == NULL)
		return;
	for (const char *p = start + 1; p < end; p++)
		if (*p == ';' && strchr(" \t", p[-1]))
			return;
	char section[64];
	size_t len = (size_t)(end - start - 1);
	if (len >= sizeof(section))
		len = sizeof(section) - 1;   /* longer than any known section: unknown either way */
	memcpy(section, start + 1, len);
	section[len] = '\0';
	if (section_known(section))
		return;
	char err[sizeof(ctx->err)], hint[160];
	unknown_section_hint(section, hint, sizeof(hint));
	snprintf(err, sizeof(err), "unknown section [%s]%s", section, hint);
	load_error(ctx, err);
}

/* fgets for inih that counts lines and refuses lines inih would silently split. */
static char *conf_read_line(char *str, int num, void *stream)
{
	struct load_ctx *ctx = stream;
	char *r = fgets(str, num, ctx->file);
	if (r == NULL)
		return NULL;
	ctx->line++;
	size_t len = strlen(str);
	if (len == (size_t)num - 1 && str[len - 1] != '\n' && !feof(ctx->file)) {
		char why[64];
		snprintf(why, sizeof(why), "line longer than %d bytes", num - 2);
		load_error(ctx, why);
		int c;
		while ((c = fgetc(ctx->file)) != EOF && c != '\n')
			;
	}
	conf_check_section_line(ctx, str);
	return r;
}

static int conf_ini_handler(void *user, const char *section, const char *name, const char *value)
{
	struct load_ctx *ctx = user;
	char err[sizeof(ctx->err)];
	if (name == NULL)   /* a section header alone */
		return 1;
	if (conf_set(ctx->conf, section, name, value, err, sizeof(err)) == 0)
		return 1;
	load_error(ctx, err);
	return 0;
}

int conf_load(struct conf *c, const char *path, char *err, size_t errlen)
{
	struct load_ctx ctx = { .conf = c };
	ctx.file = fopen(path, "r");
	if (ctx.file == NULL) {
		snprintf(err, errlen, "%s: %s", path, strerror(errno));
		return -1;
	}
	int line = ini_parse_stream(conf_read_line, &ctx, conf_ini_handler, &ctx);
	fclose(ctx.file);
	if (line != 0 || ctx.err_line != 0) {
		/* inih names the first bad line; a syntax error there comes before ours. */
		if (ctx.err_line == 0 || (line != 0 && line < ctx.err_line))
			snprintf(err, errlen, "%s:%d: syntax error (expected [section] or key = value)", path, line);
		else
			snprintf(err, errlen, "%s:%d: %s", path, ctx.err_line, ctx.err);
		return -1;
	}
	/* Paths are absolute: a daemonized master runs from / (and a relative one would name another
	 * file for each directory it was started from). Empty turns the optional ones off. */
	const struct {
		const char *key, *value;
		int optional;
	} paths[] = {
		{ "[storage] root", c->root, 0 }, { "[server] run_dir", c->run_dir, 0 },
		{ "[server] pid_file", c->pid_file, 1 }, { "[server] stats_socket", c->stats_socket, 1 },
		{ "[log] file", strcmp(c->log_file, "syslog") == 0 ? "" : c->log_file, 1 },
		{ "[log] access_log", c->access_log, 1 }, { "[redis] socket", c->redis_socket, 1 },
		{ "[rados] conf", c->rados_conf, 1 },
	};
	for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++)
		if (paths[i].value[0] != '/' && !(paths[i].optional && paths[i].value[0] == '\0')) {
			snprintf(err, errlen, "%s: %s '%.200s' is not an absolute path (start it with '/')", path,
			    paths[i].key, paths[i].value);
			return -1;
		}
	if (c->redis_sentinels[0] && c->redis_master_name[0] == '\0') {
		snprintf(err, errlen, "%s: [redis] sentinels needs master_name (the name the sentinels monitor)", path);
		return -1;
	}
	if (c->link_ring != 0 && c->link_ring < (1 << 20)) {
		snprintf(err, errlen, "%s: [server] link_ring must be 0 (off) or at least 1048576 bytes", path);
		return -1;
	}
	if (c->node[0] == '\0' && gethostname(c->node, sizeof(c->node) - 1) < 0)
		snprintf(c->node, sizeof(c->node), "resourced");
	return 0;
}

/* preflight.c: checks, before start and for -t, that a configuration's paths, users and addresses can be used. */
#include "config.h"
#include "preflight.h"
#include "conf.h"
#include "control.h"
#include "instance.h"
#include "ipc.h"
#include "link.h"

#include <errno.h>
#include <grp.h>
#include <libpq-fe.h>
#include <netdb.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

struct preflight {
	FILE *report;        /* NULL: problems are only counted, and the first kept */
	int problems;
	char *first;         /* when not NULL, the first problem's line, without the prefix */
	size_t firstlen;
};

static void problem(struct preflight *p, const char *key, const char *value, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void problem(struct preflight *p, const char *key, const char *value, const char *fmt, ...)
{
	va_list ap;
	char why[400];
	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	if (p->report)
		fprintf(p->report, PREFLIGHT_PREFIX "%s %s: %s\n", key, value, why);
	if (p->first && p->problems == 0)
		snprintf(p->first, p->firstlen, "%s %s: %s", key, value, why);
	p->problems++;
}

/* The directory a path lives in ("." for a bare name). */
static void parent_of(const char *path, char *out, size_t outlen)
{
	const char *slash = strrchr(path, '/');
	if (slash == NULL)
		snprintf(out, outlen, ".");
	else if (slash == path)
		snprintf(out, outlen, "/");
	else
		snprintf(out, outlen, "%.*s", (int)(slash - path), path);
}

/* A directory start creates with mkdir (not mkdir -p): it exists, or its parent does and is writable.
 * pending names one directory start creates first (run_dir), so a path inside it is fine. */
static void check_dir(struct preflight *p, const char *key, const char *path, const char *pending)
{
	struct stat st;
	if (stat(path, &st) == 0) {
		if (!S_ISDIR(st.st_mode))
			problem(p, key, path, "exists and is not a directory");
		else if (access(path, W_OK | X_OK) < 0)
			problem(p, key, path, "directory is not writable: %s", strerror(errno));
		return;
	}
	if (errno != ENOENT) {
		problem(p, key, path, "%s", strerror(errno));
		return;
	}
	char parent[512];
	parent_of(path, parent, sizeof(parent));
	if (pending && strcmp(parent, pending) == 0)
		return;
	if (stat(parent, &st) < 0)
		problem(p, key, path, "parent directory %s does not exist (start creates only the last component)",
		    parent);
	else if (!S_ISDIR(st.st_mode))
		problem(p, key, path, "%s is not a directory", parent);
	else if (access(parent, W_OK | X_OK) < 0)
		problem(p, key, path, "cannot create it: %s is not writable", parent);
}

/* A file start creates or appends to; kind is "file" or "socket". */
static void check_file(struct preflight *p, const char *key, const char *path, const char *pending, int socket)
{
	struct stat st;
	if (stat(path, &st) == 0) {
		if (S_ISDIR(st.st_mode))
			problem(p, key, path, "is a directory");
		else if (socket && !S_ISSOCK(st.st_mode))
			problem(p, key, path, "exists and is not a socket (start would remove it)");
		else if (!socket && access(path, W_OK) < 0)
			problem(p, key, path, "is not writable: %s", strerror(errno));
		return;
	}
	char parent[512];
	parent_of(path, parent, sizeof(parent));
	if (pending && strcmp(parent, pending) == 0)
		return;
	if (stat(parent, &st) < 0)
		problem(p, key, path, "directory %s does not exist", parent);
	else if (!S_ISDIR(st.st_mode))
		problem(p, key, path, "%s is not a directory", parent);
	else if (access(parent, W_OK | X_OK) < 0)
		problem(p, key, path, "directory %s is not writable", parent);
}

static void check_socket_path(struct preflight *p, const char *key, const char *path)
{
	struct sockaddr_un sun;
	size_t len = strlen(path);
	if (len >= sizeof(sun.sun_path))
		problem(p, key, path, "%zu bytes: longer than a Unix socket path may be (%zu)", len,
		    sizeof(sun.sun_path) - 1);
}

static void check_address(struct preflight *p, const char *key, const char *value, const char *host,
    const char *port)
{
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
		.ai_flags = AI_PASSIVE | AI_NUMERICSERV };
	struct addrinfo *res;
	int rc = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
	if (rc != 0) {
		problem(p, key, value, "cannot resolve: %s", gai_strerror(rc));
		return;
	}
	freeaddrinfo(res);
}

/* agent_listen and http_listen as control.c's listen_tcp reads them (split_host_port). */
static void check_host_port(struct preflight *p, const char *key, const char *value)
{
	char host[256];
	const char *port = split_host_port(value, host, sizeof(host));
	if (port == NULL) {
		problem(p, key, value, "not host:port or [ipv6]:port");
		return;
	}
	check_address(p, key, value, host, port);
}

static void check_user(struct preflight *p, const struct conf *c)
{
	int as_root = geteuid() == 0;
	if (c->user[0] && getpwnam(c->user) == NULL) {
		if (as_root)
			problem(p, "[server] user", c->user, "no such user");
		else
			fprintf(p->report, PREFLIGHT_PREFIX "warning: [server] user %s: no such user "
			    "(ignored unless started as root)\n", c->user);
	}
	if (c->group[0] && getgrnam(c->group) == NULL) {
		if (as_root)
			problem(p, "[server] group", c->group, "no such group");
		else
			fprintf(p->report, PREFLIGHT_PREFIX "warning: [server] group %s: no such group "
			    "(ignored unless started as root)\n", c->group);
	}
}

/* libpq's reason without what it quotes, which is part of the conninfo (a password written without
 * "password=" before it, or a whole URI with its password): "..." instead, except for a quoted
 * single character ("=", "]"), which is libpq's own. The first line only. */
static void conninfo_reason(const char *why, char *out, size_t cap)
{
	size_t o = 0;
	for (const char *s = why; *s && *s != '\n';) {
		const char *close = *s == '"' ? strchr(s + 1, '"') : NULL;
		if (close == NULL || close - s == 2) {
			size_t n = close ? 3 : 1;   /* a quoted character goes whole, else one byte */
			if (o + n + 1 > cap)
				break;
			memcpy(out + o, s, n);
			o += n;
			s += n;
			continue;
		}
		if (o + 6 > cap)
			break;
		memcpy(out + o, "\"...\"", 5);
		o += 5;
		s = close + 1;
	}
	out[o] = '\0';
}

/* A conninfo libpq cannot parse would leave every avatar icon queued forever; the value itself is not
 * echoed (it may hold a password), nor what libpq's reason quotes of it. */
static void check_conninfo(struct preflight *p, const char *conninfo)
{
	char *why = NULL;
	PQconninfoOption *opts = PQconninfoParse(conninfo, &why);
	if (opts == NULL) {
		char reason[256];
		conninfo_reason(why ? why : "out of memory", reason, sizeof(reason));
		problem(p, "[postgres] conninfo", "(not shown)", "libpq cannot parse it: %s", reason);
	}
	PQconninfoFree(opts);
	PQfreemem(why);
}

/* What the storage process needs to come up: run_dir (its socket), the storage root, the conninfo. */
static void check_storage(struct preflight *p, const struct conf *c)
{
	check_dir(p, "[server] run_dir", c->run_dir, NULL);
	char storage_sock[600];
	link_socket_path(c->run_dir, storage_sock, sizeof(storage_sock));   /* its length is checked next */
	check_socket_path(p, "[server] run_dir (storage socket)", storage_sock);
	check_dir(p, "[storage] root", c->root, NULL);
	if (c->pg_conninfo[0])
		check_conninfo(p, c->pg_conninfo);
}

int preflight_reload_check(const struct conf *c, FILE *report)
{
	struct preflight p = { .report = report };
	check_storage(&p, c);
	return p.problems;
}

int preflight_check(const struct conf *c, FILE *report)
{
	struct preflight p = { .report = report };
	char listen[300];
	snprintf(listen, sizeof(listen), "%s:%s", c->listen_host, c->listen_port);
	check_address(&p, "[server] listen", listen, c->listen_host, c->listen_port);
	if (c->agent_listen[0])
		check_host_port(&p, "[server] agent_listen", c->agent_listen);
	if (c->http_listen[0])
		check_host_port(&p, "[server] http_listen", c->http_listen);

	/* Two listeners on one port: the second one's bind fails only once the daemon runs. */
	const char *const keys[] = { "[server] listen", "[server] agent_listen", "[server] http_listen" };
	char hosts[3][256], ports[3][16];
	int have[3] = { 1, 0, 0 };
	snprintf(hosts[0], sizeof(hosts[0]), "%s", c->listen_host);
	snprintf(ports[0], sizeof(ports[0]), "%s", c->listen_port);
	const char *const values[] = { listen, c->agent_listen, c->http_listen };
	for (int i = 1; i < 3; i++) {
		const char *port = values[i][0] ? split_host_port(values[i], hosts[i], sizeof(hosts[i])) : NULL;
		if (port && snprintf(ports[i], sizeof(ports[i]), "%s", port) < (int)sizeof(ports[i]))
			have[i] = 1;
	}
	for (int i = 0; i < 3; i++)
		for (int j = i + 1; j < 3; j++) {
			if (!have[i] || !have[j] || atoi(ports[i]) != atoi(ports[j]))
				continue;
			/* The same address, or an IPv4 one and the IPv4 wildcard (IPv6 only when equal). */
			int v4 = !strchr(hosts[i], ':') && !strchr(hosts[j], ':');
			int any = !hosts[i][0] || !hosts[j][0] || strcmp(hosts[i], "0.0.0.0") == 0 ||
			    strcmp(hosts[j], "0.0.0.0") == 0;
			if (strcmp(hosts[i], hosts[j]) == 0 || (v4 && any))
				problem(&p, keys[j], values[j], "the same port as %s %s: give each its own", keys[i], values[i]);
		}

	check_storage(&p, c);
	if (c->pid_file[0])
		check_file(&p, "[server] pid_file", c->pid_file, c->run_dir, 0);
	if (c->stats_socket[0]) {
		check_socket_path(&p, "[server] stats_socket", c->stats_socket);
		check_file(&p, "[server] stats_socket", c->stats_socket, c->run_dir, 1);
	}
	check_user(&p, c);

	if (c->log_file[0] && strcmp(c->log_file, "syslog") != 0)
		check_file(&p, "[log] file", c->log_file, NULL, 0);
	if (c->access_log[0])
		check_file(&p, "[log] access_log", c->access_log, NULL, 0);
	return p.problems;
}

const char *preflight_reason(const char *line)
{
	size_t n = strlen(PREFLIGHT_PREFIX);
	return strncmp(line, PREFLIGHT_PREFIX, n) == 0 ? line + n : line;
}

/* One address start will bind: free, or taken by whom. */
static void probe_address(struct preflight *p, const char *key, const char *value, const char *host,
    const char *port)
{
	char why[300];
	if (instance_probe_listen(host, port, why, sizeof(why)) < 0)
		problem(p, key, value, "%s", why);
}

/* Every address start binds: the TCP listeners, free to bind, and the stats socket, which no
 * live process answers on. */
static void probe_addresses(struct preflight *p, const struct conf *c)
{
	char listen[300];
	snprintf(listen, sizeof(listen), "%s:%s", c->listen_host, c->listen_port);
	probe_address(p, "[server] listen", listen, c->listen_host, c->listen_port);
	const char *const keys[] = { "[server] agent_listen", "[server] http_listen" };
	const char *const values[] = { c->agent_listen, c->http_listen };
	for (size_t i = 0; i < 2; i++) {
		char host[256];
		const char *port = values[i][0] ? split_host_port(values[i], host, sizeof(host)) : NULL;
		if (port)   /* one that does not parse was reported already */
			probe_address(p, keys[i], values[i], host, port);
	}
	if (c->stats_socket[0] && instance_unix_socket_live(c->stats_socket))
		problem(p, "[server] stats_socket", c->stats_socket, "a live process (another instance?) listens there");
}

int preflight_addresses_free(const struct conf *c, char *err, size_t errlen)
{
	struct preflight p = { .first = err, .firstlen = errlen };
	probe_addresses(&p, c);
	return p.problems ? -1 : 0;
}

int preflight_check_running(const struct conf *c, FILE *report)
{
	struct preflight p = { .report = report };
	long pid = instance_running(c);
	if (pid != 0) {
		/* Its own sockets hold the addresses: checking them would only find it. */
		if (pid > 0)
			fprintf(report, PREFLIGHT_PREFIX "note: resourced (pid %ld) runs with this run_dir; kill -HUP %ld "
			    "applies this file to it (its addresses were not probed)\n", pid, pid);
		else if (pid == -2)
			fprintf(report, PREFLIGHT_PREFIX "note: cannot read %s/%s to tell whether resourced runs (run -t as "
			    "the user it runs as, or root); its addresses were not probed\n", c->run_dir,
			    INSTANCE_LOCK_NAME);
		else
			fprintf(report, PREFLIGHT_PREFIX "note: a resourced is starting with this run_dir (its addresses "
			    "were not probed)\n");
		return 0;
	}
	probe_addresses(&p, c);
	return p.problems;
}

/* A conninfo with a password: "password=..." or a URI's "user:password@". */
static int conninfo_has_password(const char *conninfo)
{
	if (strstr(conninfo, "password"))
		return 1;
	const char *scheme = strstr(conninfo, "://");
	const char *at = scheme ? strchr(scheme + 3, '@') : NULL;
	return at && memchr(scheme + 3, ':', (size_t)(at - (scheme + 3))) != NULL;
}

void preflight_syslog(const struct conf *c, int foreground, int test_only, FILE *report)
{
	int to_syslog = strcmp(c->log_file, "syslog") == 0 || (c->log_file[0] == '\0' && (!foreground || test_only));
	if (!to_syslog || access("/dev/log", W_OK) == 0)
		return;
	fprintf(report, PREFLIGHT_PREFIX "warning: [log] file %s: logs go to syslog%s, but /dev/log does not exist "
	    "(no syslog daemon or journald here): they would be lost; set [log] file to a path, or run with -f\n",
	    c->log_file[0] ? c->log_file : "is empty", c->log_file[0] ? "" : " when started without -f");
}

void preflight_config_secrets(const struct conf *c, const char *path, FILE *report)
{
	const char *holds = c->redis_password[0] ? "[redis] password"
	    : c->redis_sentinel_password[0] ? "[redis] sentinel_password"
	    : conninfo_has_password(c->pg_conninfo) ? "[postgres] conninfo" : NULL;
	struct stat st;
	if (holds && stat(path, &st) == 0 && (st.st_mode & S_IROTH))
		fprintf(report, PREFLIGHT_PREFIX "warning: %s holds a password (%s) and every local user can read it "
		    "(mode %04o): chmod o-r %s\n", path, holds, (unsigned)(st.st_mode & 07777), path);
}

int preflight_config_path(const char *path, char *err, size_t errlen)
{
	struct stat st;
	if (stat(path, &st) < 0) {
		snprintf(err, errlen, "cannot read configuration file %s: %s", path, strerror(errno));
		return -1;
	}
	if (S_ISDIR(st.st_mode)) {
		snprintf(err, errlen, "configuration file %s is a directory", path);
		return -1;
	}
	return 0;
}

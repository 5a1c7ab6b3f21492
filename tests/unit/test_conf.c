/* test_conf.c: unit tests of the configuration loader (conf.c): defaults, every value type, and error messages naming file, line and key. */
#include "config.h"
#include "unit.h"

#include "backend.h"
#include "conf.h"
#include "frame.h"
#include "log.h"

#include <errno.h>
#include <unistd.h>

/* The name of the last file written; the file itself is gone once loaded. */
static char tmp_path[64];

/* Loads text, written to a fresh file under /tmp, over the defaults; returns
 * conf_load's result with its message in err. The file is removed at once. */
static int load(const char *text, struct conf *c, char *err, size_t errlen)
{
	snprintf(tmp_path, sizeof(tmp_path), "/tmp/resourced-unit-XXXXXX");
	int fd = mkstemp(tmp_path);
	ck_assert_int_ge(fd, 0);
	size_t n = strlen(text);
	ssize_t w = write(fd, text, n);
	close(fd);
	conf_defaults(c);
	err[0] = '\0';
	int rc = w == (ssize_t)n ? conf_load(c, tmp_path, err, errlen) : -2;
	unlink(tmp_path);
	ck_assert_int_ne(rc, -2);
	return rc;
}

/* Asserts that loading text fails with exactly "<path>:<line>: <rest>". */
static void expect_load_error(const char *text, int line, const char *rest)
{
	struct conf c;
	char err[512], want[512];
	ck_assert_int_eq(load(text, &c, err, sizeof(err)), -1);
	snprintf(want, sizeof(want), "%s:%d: %s", tmp_path, line, rest);
	ck_assert_str_eq(err, want);
}

static long expected_auto_workers(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);
	return n < 1 ? 1 : (n > 256 ? 256 : n);
}

START_TEST(test_defaults)
{
	struct conf c;
	memset(&c, 0xa5, sizeof(c));   /* nothing may be left over from before */
	conf_defaults(&c);
	ck_assert_str_eq(c.listen_host, "0.0.0.0");
	ck_assert_str_eq(c.listen_port, "9090");
	ck_assert_int_eq(c.workers, expected_auto_workers());
	ck_assert_str_eq(c.run_dir, "/run/resourced");
	ck_assert_str_eq(c.pid_file, "/run/resourced/resourced.pid");
	ck_assert_str_eq(c.user, "");
	ck_assert_str_eq(c.group, "");
	ck_assert_str_eq(c.node, "");
	/* One constant for the server's default and for what resctl assumes of a server (frame.h);
	 * its value is the documented one (resourced.conf(5)). */
	ck_assert_int_eq(c.max_frame, FRAME_MAX_DEFAULT);
	ck_assert_int_eq(FRAME_MAX_DEFAULT, 262144);
	ck_assert_str_eq(FRAME_MAX_DEFAULT_TEXT, "262144");
	ck_assert_int_eq(c.output_cap, 1048576);
	ck_assert_int_eq(c.idle_timeout, 300);
	ck_assert_int_eq(c.frame_timeout, 30);
	ck_assert_int_eq(c.max_connections, 10000);
	ck_assert_int_eq(c.auth_cache_ttl, 60);
	ck_assert_int_eq(c.anonymous, 0);
	ck_assert_int_eq(c.download_chunk, 32768);
	ck_assert_int_eq(c.storage_timeout, 30);
	ck_assert_str_eq(c.root, "/var/lib/resourced");
	ck_assert_int_eq(c.max_file_size, INT64_C(4294967296));
	ck_assert_int_eq(c.upload_ttl, 3600);
	ck_assert_int_eq(c.fsync_policy, FSYNC_COMPLETE);
	ck_assert_int_eq(c.io_threads, 4);
	ck_assert_int_eq(c.janitor_interval, 60);
	ck_assert_str_eq(c.redis_host, "127.0.0.1");
	ck_assert_int_eq(c.redis_port, 6379);
	ck_assert_str_eq(c.redis_socket, "");
	ck_assert_str_eq(c.redis_password, "");
	ck_assert_int_eq(c.redis_db, 0);
	ck_assert_str_eq(c.redis_prefix, "");
	ck_assert_str_eq(c.pg_conninfo, "");
	ck_assert_int_eq(c.pg_timeout, 5);
	ck_assert_int_eq(c.log_level, LOG_LEVEL_INFO);
	ck_assert_str_eq(c.log_file, "");
}
END_TEST

START_TEST(test_empty_file_keeps_defaults)
{
	struct conf c, d;
	char err[512];
	ck_assert_int_eq(load("; nothing but a comment\n\n# and another\n", &c, err, sizeof(err)), 0);
	conf_defaults(&d);
	ck_assert_str_eq(c.listen_port, d.listen_port);
	ck_assert_int_eq(c.max_frame, d.max_frame);
	ck_assert_str_eq(c.root, d.root);
	/* An unset node becomes the host name. */
	char host[64] = "";
	ck_assert_int_eq(gethostname(host, sizeof(host) - 1), 0);
	ck_assert_str_eq(c.node, host);
}
END_TEST

START_TEST(test_good_file)
{
	static const char text[] =
	    "; resourced test configuration\n"
	    "[server]\n"
	    "listen = 127.0.0.1:7070\n"
	    "workers = 3\n"
	    "run_dir = /tmp/rd\n"
	    "pid_file = /tmp/rd/pid\n"
	    "user = nobody\n"
	    "group = nogroup\n"
	    "node = node-a\n"
	    "max_frame = 1048576\n"
	    "output_cap = 4096\n"
	    "idle_timeout = 86400\n"
	    "frame_timeout = 1\n"
	    "max_connections = 1000000\n"
	    "auth_cache_ttl = 0\n"
	    "anonymous = yes\n"
	    "download_chunk = 65536\n"
	    "storage_timeout = 7\n"
	    "\n"
	    "[storage]\n"
	    "root = /srv/files\n"
	    "max_file_size = 1125899906842624\n"
	    "upload_ttl = 2592000\n"
	    "fsync = always\n"
	    "io_threads = 64\n"
	    "janitor_interval = 5\n"
	    "[redis]\n"
	    "host = redis.example\n"
	    "port = 6380\n"
	    "socket = /run/redis.sock\n"
	    "password = s3cret\n"
	    "db = 2\n"
	    "prefix = rs:\n"
	    "[postgres]\n"
	    "conninfo = host=db dbname=chat user=chat\n"
	    "timeout = 9\n"
	    "[log]\n"
	    "level = debug\n"
	    "file = /var/log/resourced.log\n";
	struct conf c;
	char err[512];
	ck_assert_msg(load(text, &c, err, sizeof(err)) == 0, "load failed: %s", err);
	ck_assert_str_eq(c.listen_host, "127.0.0.1");
	ck_assert_str_eq(c.listen_port, "7070");
	ck_assert_int_eq(c.workers, 3);
	ck_assert_str_eq(c.run_dir, "/tmp/rd");
	ck_assert_str_eq(c.pid_file, "/tmp/rd/pid");
	ck_assert_str_eq(c.user, "nobody");
	ck_assert_str_eq(c.group, "nogroup");
	ck_assert_str_eq(c.node, "node-a");
	ck_assert_int_eq(c.max_frame, 1048576);
	ck_assert_int_eq(c.output_cap, 4096);
	ck_assert_int_eq(c.idle_timeout, 86400);
	ck_assert_int_eq(c.frame_timeout, 1);
	ck_assert_int_eq(c.max_connections, 1000000);
	ck_assert_int_eq(c.auth_cache_ttl, 0);
	ck_assert_int_eq(c.anonymous, 1);
	ck_assert_int_eq(c.download_chunk, 65536);
	ck_assert_int_eq(c.storage_timeout, 7);
	ck_assert_str_eq(c.root, "/srv/files");
	ck_assert_int_eq(c.max_file_size, INT64_C(1) << 50);
	ck_assert_int_eq(c.upload_ttl, 2592000);
	ck_assert_int_eq(c.fsync_policy, FSYNC_ALWAYS);
	ck_assert_int_eq(c.io_threads, 64);
	ck_assert_int_eq(c.janitor_interval, 5);
	ck_assert_str_eq(c.redis_host, "redis.example");
	ck_assert_int_eq(c.redis_port, 6380);
	ck_assert_str_eq(c.redis_socket, "/run/redis.sock");
	ck_assert_str_eq(c.redis_password, "s3cret");
	ck_assert_int_eq(c.redis_db, 2);
	ck_assert_str_eq(c.redis_prefix, "rs:");
	ck_assert_str_eq(c.pg_conninfo, "host=db dbname=chat user=chat");
	ck_assert_int_eq(c.pg_timeout, 9);
	ck_assert_int_eq(c.log_level, LOG_LEVEL_DEBUG);
	ck_assert_str_eq(c.log_file, "/var/log/resourced.log");
}
END_TEST

START_TEST(test_whitespace_and_inline_comments)
{
	struct conf c;
	char err[512];
	ck_assert_msg(load("[server]\n   workers=5   ; five\nidle_timeout =   42\n", &c, err, sizeof(err)) == 0,
	    "load failed: %s", err);
	ck_assert_int_eq(c.workers, 5);
	ck_assert_int_eq(c.idle_timeout, 42);
}
END_TEST

START_TEST(test_workers)
{
	struct conf c;
	char err[256];
	conf_defaults(&c);
	ck_assert_int_eq(conf_set(&c, "server", "workers", "17", err, sizeof(err)), 0);
	ck_assert_int_eq(c.workers, 17);
	ck_assert_int_eq(conf_set(&c, "server", "workers", "auto", err, sizeof(err)), 0);
	ck_assert_int_eq(c.workers, expected_auto_workers());
	ck_assert_int_eq(conf_set(&c, "server", "workers", "1", err, sizeof(err)), 0);
	ck_assert_int_eq(c.workers, 1);
	ck_assert_int_eq(conf_set(&c, "server", "workers", "256", err, sizeof(err)), 0);
	ck_assert_int_eq(c.workers, 256);
	static const char *const bad[] = { "0", "257", "-1", "", "many", "4x", "auto4" };
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		ck_assert_msg(conf_set(&c, "server", "workers", bad[i], err, sizeof(err)) == -1,
		    "workers = '%s' was accepted", bad[i]);
		unit_assert_contains(err, "[server] workers: ");
		unit_assert_contains(err, "is not auto or a number from 1 to 256");
		ck_assert_int_eq(c.workers, 256);   /* unchanged */
	}
	/* And from a file. */
	ck_assert_int_eq(load("[server]\nworkers = auto\n", &c, err, sizeof(err)), 0);
	ck_assert_int_eq(c.workers, expected_auto_workers());
}
END_TEST

START_TEST(test_listen_good)
{
	static const struct { const char *value, *host, *port; } cases[] = {
		{ "127.0.0.1:8080", "127.0.0.1", "8080" },
		{ "example.com:1", "example.com", "1" },
		{ "[::1]:9090", "::1", "9090" },
		{ "[::]:65535", "::", "65535" },
		{ "[fe80::1%eth0]:443", "fe80::1%eth0", "443" },
		{ "9091", "0.0.0.0", "9091" },
		{ ":9092", "0.0.0.0", "9092" },
		{ "0.0.0.0:65535", "0.0.0.0", "65535" },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct conf c;
		char err[256];
		conf_defaults(&c);
		ck_assert_msg(conf_set(&c, "server", "listen", cases[i].value, err, sizeof(err)) == 0,
		    "listen = %s: %s", cases[i].value, err);
		ck_assert_str_eq(c.listen_host, cases[i].host);
		ck_assert_str_eq(c.listen_port, cases[i].port);
	}
	struct conf c;
	char err[512];
	ck_assert_msg(load("[server]\nlisten = [::1]:9090\n", &c, err, sizeof(err)) == 0, "%s", err);
	ck_assert_str_eq(c.listen_host, "::1");
	ck_assert_str_eq(c.listen_port, "9090");
}
END_TEST

/* Sets listen to a known value, then value, which must be rejected without changing it. */
static void expect_listen_rejected(const char *value, char *err, size_t errlen)
{
	struct conf c;
	conf_defaults(&c);
	ck_assert_int_eq(conf_set(&c, "server", "listen", "10.0.0.1:1234", err, errlen), 0);
	ck_assert_msg(conf_set(&c, "server", "listen", value, err, errlen) == -1,
	    "listen = '%s' was accepted", value);
	ck_assert_str_eq(c.listen_host, "10.0.0.1");
	ck_assert_str_eq(c.listen_port, "1234");
}

START_TEST(test_listen_bad)
{
	static const char *const bad[] = {
		"host:0", "host:65536", "host:abc", "0", "65536", "abc", "", "host:", ":",
		"[::1]", "[::1]:", "[::1]9090", "[::1:9090", "host:-1", "host:80x", "host:99999999999999999999",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		char err[512], want[512];
		expect_listen_rejected(bad[i], err, sizeof(err));
		snprintf(want, sizeof(want), "[server] listen: '%s' is not host:port with a port from 1 to 65535",
		    bad[i]);
		ck_assert_str_eq(err, want);
	}
	/* A host longer than the field. */
	char longhost[300], err[512];
	memset(longhost, 'h', 256);
	snprintf(longhost + 256, sizeof(longhost) - 256, ":80");
	expect_listen_rejected(longhost, err, sizeof(err));
	unit_assert_contains(err, "[server] listen: 'hhhh");
	expect_load_error("[server]\nlisten = localhost:0\n", 2,
	    "[server] listen: 'localhost:0' is not host:port with a port from 1 to 65535");
}
END_TEST

START_TEST(test_unknown_key)
{
	expect_load_error("[server]\nworkers = 2\nbogus = 1\nalso_bogus = 2\n", 3, "[server] bogus: unknown key");
	/* A key that exists, in the wrong section. */
	expect_load_error("[redis]\nhost = x\nroot = /srv\n", 3, "[redis] root: unknown key (root is a key of [storage])");
	/* Before any section. */
	expect_load_error("workers = 2\n", 1, "[] workers: unknown key (before any [section]: workers is a key of [server])");
	expect_load_error("colour = 2\n", 1, "[] colour: unknown key (before any [section] header)");
	/* conf_set says the same. */
	struct conf c;
	char err[256];
	conf_defaults(&c);
	ck_assert_int_eq(conf_set(&c, "log", "colour", "yes", err, sizeof(err)), -1);
	ck_assert_str_eq(err, "[log] colour: unknown key");
}
END_TEST

/* The likely mistake behind an unknown key is named: a near spelling (of this section's keys
 * first), a missing '=' (inih then splits at a ':' of the value), capitals in the section. */
START_TEST(test_unknown_key_hints)
{
	expect_load_error("[server]\nlisen = 127.0.0.1:9090\n", 2, "[server] lisen: unknown key (did you mean listen?)");
	expect_load_error("[redis]\npassowrd = x\n", 2, "[redis] passowrd: unknown key (did you mean password?)");
	expect_load_error("[redis]\nprot = 1\n", 2, "[redis] prot: unknown key (did you mean port?)");
	expect_load_error("[log]\naccesslog = /x\n", 2, "[log] accesslog: unknown key (did you mean access_log?)");
	expect_load_error("[server]\nmax_upload = 5\n", 2,
	    "[server] max_upload: unknown key (did you mean [storage] max_uploads?)");
	/* Too far from every key for a guess: the plain message. */
	expect_load_error("[server]\nstats = /x\n", 2, "[server] stats: unknown key");
	expect_load_error("[redis]\npoll = 1\n", 2, "[redis] poll: unknown key (did you mean [rados] pool?)");
	expect_load_error("[server]\nlisten 127.0.0.1:9090\n", 2,
	    "[server] listen 127.0.0.1: unknown key (a key has no spaces: is the '=' missing?)");
	expect_load_error("[Server]\nlisten = 127.0.0.1:9090\n", 1,
	    "unknown section [Server] (section names are lower case: [server])");
}
END_TEST

/* A relative root or run_dir names the key and the value. */
START_TEST(test_relative_paths)
{
	struct conf c;
	char err[512], want[512];
	ck_assert_int_eq(load("[storage]\nroot = files\n", &c, err, sizeof(err)), -1);
	snprintf(want, sizeof(want), "%s: [storage] root 'files' is not an absolute path (start it with '/')", tmp_path);
	ck_assert_str_eq(err, want);
	ck_assert_int_eq(load("[server]\nrun_dir = run\n", &c, err, sizeof(err)), -1);
	unit_assert_contains(err, "[server] run_dir 'run' is not an absolute path");
	/* Every path: the daemon runs from /. Empty ones (off) and syslog are fine. */
	static const char *const relative[][3] = {
		{ "server", "pid_file", "[server] pid_file 'r.pid'" }, { "server", "stats_socket", "[server] stats_socket 'r.pid'" },
		{ "log", "file", "[log] file 'r.pid'" }, { "log", "access_log", "[log] access_log 'r.pid'" },
		{ "redis", "socket", "[redis] socket 'r.pid'" }, { "rados", "conf", "[rados] conf 'r.pid'" },
	};
	for (size_t i = 0; i < sizeof(relative) / sizeof(relative[0]); i++) {
		char text[128];
		snprintf(text, sizeof(text), "[%s]\n%s = r.pid\n", relative[i][0], relative[i][1]);
		ck_assert_int_eq(load(text, &c, err, sizeof(err)), -1);
		unit_assert_contains(err, relative[i][2]);
	}
	ck_assert_int_eq(load("[server]\npid_file =\nstats_socket =\n[log]\nfile = syslog\n", &c, err, sizeof(err)), 0);
}
END_TEST

/* An unknown section header is refused at its own line, empty or not (inih calls the handler for
 * keys only, so an empty one once passed unseen), with the likely section named. */
START_TEST(test_unknown_section)
{
	expect_load_error("[server]\nworkers = 2\n\n[nosuch]\nlisten = 1.2.3.4:5\n", 4,
	    "unknown section [nosuch] (there are [server] [storage] [rados] [redis] [postgres] [log])");
	expect_load_error("[server]\nworkers = 2\n[nosuch]\n", 3,
	    "unknown section [nosuch] (there are [server] [storage] [rados] [redis] [postgres] [log])");
	expect_load_error("[nosuch]\n; nothing here\n\n[server]\nworkers = 2\n", 1,
	    "unknown section [nosuch] (there are [server] [storage] [rados] [redis] [postgres] [log])");
	expect_load_error("[server]\n[storgae]\n", 2, "unknown section [storgae] (did you mean [storage]?)");
	expect_load_error("[logs]\n", 1, "unknown section [logs] (did you mean [log]?)");
	expect_load_error("[ server ]\n", 1, "unknown section [ server ] (did you mean [server]?)");
	expect_load_error("[]\n", 1, "unknown section [] (there are [server] [storage] [rados] [redis] [postgres] [log])");
	expect_load_error("[LOG]\n", 1, "unknown section [LOG] (section names are lower case: [log])");
	/* After a byte order mark, and indented before any key: still a header, as for inih. */
	expect_load_error("\xEF\xBB\xBF[nosuch]\n", 1,
	    "unknown section [nosuch] (there are [server] [storage] [rados] [redis] [postgres] [log])");
	expect_load_error("[server]\n  [nosuch]\n", 2,
	    "unknown section [nosuch] (there are [server] [storage] [rados] [redis] [postgres] [log])");
	/* A key's first error still comes first; a bad header with no ']' is inih's syntax error. */
	expect_load_error("[server]\nbogus = 1\n[nosuch]\n", 2, "[server] bogus: unknown key");
	expect_load_error("[nosuch ; comment]\n", 1, "syntax error (expected [section] or key = value)");
	/* Known sections, empty, with trailing text or a BOM, load. */
	struct conf c;
	char err[512];
	ck_assert_int_eq(load("[rados]\n[postgres] ; unused\n\n[server]\nworkers = 3\n", &c, err,
	    sizeof(err)), 0);
	ck_assert_int_eq(load("\xEF\xBB\xBF[server]\nworkers = 3\n", &c, err, sizeof(err)), 0);
	ck_assert_int_eq(c.workers, 3);
}
END_TEST

START_TEST(test_bad_number)
{
	expect_load_error("[server]\nidle_timeout = 12x\n", 2,
	    "[server] idle_timeout: '12x' is not a whole number from 1 to 86400");
	static const char *const bad[] = { "", "x", "1.5", "1e3", "0x10", "12 13", "--1", "99999999999999999999" };
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		struct conf c;
		char err[256];
		conf_defaults(&c);
		ck_assert_msg(conf_set(&c, "server", "max_frame", bad[i], err, sizeof(err)) == -1,
		    "max_frame = '%s' was accepted", bad[i]);
		unit_assert_contains(err, "[server] max_frame: ");
		unit_assert_contains(err, "is not a whole number from 1024 to 67108864");
		ck_assert_int_eq(c.max_frame, 262144);
	}
}
END_TEST

START_TEST(test_out_of_range)
{
	static const struct { const char *section, *name, *low, *high, *below, *above; } cases[] = {
		{ "server", "max_frame", "1024", "67108864", "1023", "67108865" },
		{ "server", "output_cap", "4096", "1073741824", "4095", "1073741825" },
		{ "server", "idle_timeout", "1", "86400", "0", "86401" },
		{ "server", "max_connections", "1", "1000000", "0", "1000001" },
		{ "server", "auth_cache_ttl", "0", "86400", "-1", "86401" },
		{ "server", "download_chunk", "1", "16777216", "0", "16777217" },
		{ "storage", "max_file_size", "0", "1125899906842624", "-1", "1125899906842625" },
		{ "storage", "io_threads", "1", "64", "0", "65" },
		{ "redis", "port", "1", "65535", "0", "65536" },
		{ "redis", "db", "0", "65535", "-1", "65536" },
		{ "postgres", "timeout", "1", "3600", "0", "3601" },
		{ "server", "drain_grace", "0", "3600", "-1", "3601" },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct conf c;
		char err[256];
		conf_defaults(&c);
		ck_assert_msg(conf_set(&c, cases[i].section, cases[i].name, cases[i].low, err, sizeof(err)) == 0,
		    "%s = %s: %s", cases[i].name, cases[i].low, err);
		ck_assert_msg(conf_set(&c, cases[i].section, cases[i].name, cases[i].high, err, sizeof(err)) == 0,
		    "%s = %s: %s", cases[i].name, cases[i].high, err);
		char want[256];
		snprintf(want, sizeof(want), "[%s] %s: '%s' is not a whole number from %s to %s",
		    cases[i].section, cases[i].name, cases[i].below, cases[i].low, cases[i].high);
		ck_assert_int_eq(conf_set(&c, cases[i].section, cases[i].name, cases[i].below, err, sizeof(err)), -1);
		ck_assert_str_eq(err, want);
		snprintf(want, sizeof(want), "[%s] %s: '%s' is not a whole number from %s to %s",
		    cases[i].section, cases[i].name, cases[i].above, cases[i].low, cases[i].high);
		ck_assert_int_eq(conf_set(&c, cases[i].section, cases[i].name, cases[i].above, err, sizeof(err)), -1);
		ck_assert_str_eq(err, want);
	}
	/* The stored value is the last good one. */
	struct conf c;
	char err[256];
	conf_defaults(&c);
	ck_assert_int_eq(conf_set(&c, "storage", "io_threads", "64", err, sizeof(err)), 0);
	ck_assert_int_eq(conf_set(&c, "storage", "io_threads", "65", err, sizeof(err)), -1);
	ck_assert_int_eq(c.io_threads, 64);
	expect_load_error("[storage]\nio_threads = 65\n", 2,
	    "[storage] io_threads: '65' is not a whole number from 1 to 64");
}
END_TEST

/* The grace of a graceful stop is drain_grace, but never more than half of shutdown_timeout. */
START_TEST(test_drain_grace)
{
	struct conf c;
	char err[256];
	conf_defaults(&c);
	ck_assert_int_eq(c.drain_grace, 3);
	ck_assert(conf_drain_grace(&c) == 3.0);
	ck_assert_int_eq(conf_set(&c, "server", "shutdown_timeout", "4", err, sizeof(err)), 0);
	ck_assert(conf_drain_grace(&c) == 2.0);
	ck_assert_int_eq(conf_set(&c, "server", "shutdown_timeout", "1", err, sizeof(err)), 0);
	ck_assert(conf_drain_grace(&c) == 0.5);
	ck_assert_int_eq(conf_set(&c, "server", "drain_grace", "0", err, sizeof(err)), 0);
	ck_assert(conf_drain_grace(&c) == 0.0);
}
END_TEST

START_TEST(test_bool)
{
	static const char *const yes[] = { "yes", "on", "true", "1", "YES", "True", "On" };
	static const char *const no[] = { "no", "off", "false", "0", "NO", "False", "OFF" };
	struct conf c;
	char err[256];
	conf_defaults(&c);
	for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
		c.anonymous = 0;
		ck_assert_msg(conf_set(&c, "server", "anonymous", yes[i], err, sizeof(err)) == 0, "%s", yes[i]);
		ck_assert_int_eq(c.anonymous, 1);
	}
	for (size_t i = 0; i < sizeof(no) / sizeof(no[0]); i++) {
		c.anonymous = 1;
		ck_assert_msg(conf_set(&c, "server", "anonymous", no[i], err, sizeof(err)) == 0, "%s", no[i]);
		ck_assert_int_eq(c.anonymous, 0);
	}
	static const char *const bad[] = { "maybe", "", "2", "y", "n", "yess", "enabled" };
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		c.anonymous = 1;
		ck_assert_msg(conf_set(&c, "server", "anonymous", bad[i], err, sizeof(err)) == -1,
		    "anonymous = '%s' was accepted", bad[i]);
		char want[128];
		snprintf(want, sizeof(want), "[server] anonymous: '%s' is not yes or no", bad[i]);
		ck_assert_str_eq(err, want);
		ck_assert_int_eq(c.anonymous, 1);
	}
	expect_load_error("[server]\nanonymous = maybe\n", 2, "[server] anonymous: 'maybe' is not yes or no");
}
END_TEST

START_TEST(test_fsync)
{
	struct conf c;
	char err[256];
	conf_defaults(&c);
	ck_assert_int_eq(conf_set(&c, "storage", "fsync", "none", err, sizeof(err)), 0);
	ck_assert_int_eq(c.fsync_policy, FSYNC_NONE);
	ck_assert_int_eq(conf_set(&c, "storage", "fsync", "always", err, sizeof(err)), 0);
	ck_assert_int_eq(c.fsync_policy, FSYNC_ALWAYS);
	ck_assert_int_eq(conf_set(&c, "storage", "fsync", "complete", err, sizeof(err)), 0);
	ck_assert_int_eq(c.fsync_policy, FSYNC_COMPLETE);
	static const char *const bad[] = { "sometimes", "", "yes", "1" };
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		ck_assert_msg(conf_set(&c, "storage", "fsync", bad[i], err, sizeof(err)) == -1,
		    "fsync = '%s' was accepted", bad[i]);
		unit_assert_contains(err, "[storage] fsync: ");
		unit_assert_contains(err, "is not always, complete or none");
		ck_assert_int_eq(c.fsync_policy, FSYNC_COMPLETE);
	}
	expect_load_error("[storage]\nfsync = sometimes\n", 2,
	    "[storage] fsync: 'sometimes' is not always, complete or none");
}
END_TEST

START_TEST(test_backend)
{
	struct conf c;
	char err[256];
	conf_defaults(&c);
	ck_assert_str_eq(c.backend, "fs");
	ck_assert_int_eq(conf_set(&c, "storage", "backend", "fs", err, sizeof(err)), 0);
	static const char *const bad[] = { "rados2", "", "FS", "fs ", "a-name-much-longer-than-the-thirty-two-bytes-kept" };
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		ck_assert_msg(conf_set(&c, "storage", "backend", bad[i], err, sizeof(err)) == -1,
		    "backend = '%s' was accepted", bad[i]);
		unit_assert_contains(err, "[storage] backend: ");
		unit_assert_contains(err, "is not a storage backend (known: fs");
		ck_assert_str_eq(c.backend, "fs");
	}
	char known[160];
	snprintf(known, sizeof(known), "[storage] backend: 'nfs' is not a storage backend (known: %s)", backend_names());
	expect_load_error("[storage]\nbackend = nfs\n", 2, known);
#ifdef HAVE_RADOS
	ck_assert_int_eq(conf_set(&c, "storage", "backend", "rados", err, sizeof(err)), 0);
	ck_assert_str_eq(backend_names(), "fs, rados");
#else
	/* A build without librados says how to get the backend, not just that it is unknown. */
	ck_assert_int_eq(conf_set(&c, "storage", "backend", "rados", err, sizeof(err)), -1);
	unit_assert_contains(err, "install librados-dev");
#endif
}
END_TEST

START_TEST(test_log_level)
{
	static const struct { const char *name; int level; } levels[] = {
		{ "error", LOG_LEVEL_ERROR }, { "warn", LOG_LEVEL_WARN },
		{ "info", LOG_LEVEL_INFO }, { "debug", LOG_LEVEL_DEBUG },
	};
	struct conf c;
	char err[256];
	conf_defaults(&c);
	for (size_t i = 0; i < 4; i++) {
		ck_assert_int_eq(conf_set(&c, "log", "level", levels[i].name, err, sizeof(err)), 0);
		ck_assert_int_eq(c.log_level, levels[i].level);
	}
	ck_assert_int_eq(conf_set(&c, "log", "level", "verbose", err, sizeof(err)), -1);
	ck_assert_str_eq(err, "[log] level: 'verbose' is not error, warn, info or debug");
	ck_assert_int_eq(c.log_level, LOG_LEVEL_DEBUG);
}
END_TEST

START_TEST(test_string_length)
{
	struct conf c;
	char err[256], v[80];
	conf_defaults(&c);
	memset(v, 'u', 63);
	v[63] = '\0';
	ck_assert_int_eq(conf_set(&c, "server", "user", v, err, sizeof(err)), 0);
	ck_assert_str_eq(c.user, v);
	v[63] = 'u';
	v[64] = '\0';
	ck_assert_int_eq(conf_set(&c, "server", "user", v, err, sizeof(err)), -1);
	ck_assert_str_eq(err, "[server] user: value is longer than 63 bytes");
	ck_assert_uint_eq(strlen(c.user), 63);
	/* An empty string is a value. */
	ck_assert_int_eq(conf_set(&c, "server", "user", "", err, sizeof(err)), 0);
	ck_assert_str_eq(c.user, "");
}
END_TEST

START_TEST(test_relative_paths_rejected)
{
	struct conf c;
	char err[512];
	ck_assert_int_eq(load("[storage]\nroot = data/files\n", &c, err, sizeof(err)), -1);
	unit_assert_contains(err, tmp_path);
	unit_assert_contains(err, "[storage] root");
	unit_assert_contains(err, "absolute");
	ck_assert_int_eq(load("[server]\nrun_dir = run\n", &c, err, sizeof(err)), -1);
	unit_assert_contains(err, "[server] run_dir");
	ck_assert_int_eq(load("[storage]\nroot =\n", &c, err, sizeof(err)), -1);
	unit_assert_contains(err, "absolute");
	ck_assert_int_eq(load("[storage]\nroot = /abs\n[server]\nrun_dir = /run/x\n", &c, err, sizeof(err)), 0);
	ck_assert_str_eq(c.root, "/abs");
}
END_TEST

START_TEST(test_missing_file)
{
	struct conf c;
	char err[512], want[512];
	conf_defaults(&c);
	const char *path = "/tmp/resourced-unit-does-not-exist/resourced.conf";
	ck_assert_int_eq(conf_load(&c, path, err, sizeof(err)), -1);
	snprintf(want, sizeof(want), "%s: %s", path, strerror(ENOENT));
	ck_assert_str_eq(err, want);
}
END_TEST

START_TEST(test_syntax_error)
{
	expect_load_error("[server]\nworkers = 2\nthis line has no equals sign\n", 3,
	    "syntax error (expected [section] or key = value)");
	expect_load_error("[server\n", 1, "syntax error (expected [section] or key = value)");
}
END_TEST

START_TEST(test_error_format_first_error_wins)
{
	/* "<path>:<line>: [section] key: ...", for the first bad line. */
	expect_load_error("; header\n[server]\n\nworkers = 2\nmax_frame = 12\nbogus = 1\n", 5,
	    "[server] max_frame: '12' is not a whole number from 1024 to 67108864");
	expect_load_error("[redis]\nport = 6379\n[log]\nlevel = loud\n[storage]\nfsync = never\n", 4,
	    "[log] level: 'loud' is not error, warn, info or debug");
}
END_TEST

START_TEST(test_error_reason_matches_line)
{
	/* The reason must belong to the line reported: here line 2 is a syntax error
	 * and line 3 a bad key (a regression test: the message once gave the line of
	 * one error with the reason of the other). */
	expect_load_error("[server]\nno equals sign here\nbogus = 1\n", 2,
	    "syntax error (expected [section] or key = value)");
	expect_load_error("[server\nworkers = 2\n", 1, "syntax error (expected [section] or key = value)");
}
END_TEST

START_TEST(test_long_value_not_misread)
{
	/* conninfo holds up to 1023 bytes. A 300-byte one in the file must either
	 * load whole or be refused with the line it is on (2), although the system
	 * libinih reads at most INI_MAX_LINE = 200 bytes a line and would parse the
	 * rest as a separate line ("<path>:3: syntax error"). */
	char text[600], value[301];
	for (size_t i = 0; i < 300; i++)
		value[i] = (char)('a' + i % 26);
	value[300] = '\0';
	snprintf(text, sizeof(text), "[postgres]\nconninfo = %s\n[server]\nworkers = 2\n", value);
	struct conf c;
	char err[512], want[128];
	if (load(text, &c, err, sizeof(err)) == 0) {
		ck_assert_str_eq(c.pg_conninfo, value);
		ck_assert_int_eq(c.workers, 2);
		return;
	}
	snprintf(want, sizeof(want), "%s:2: ", tmp_path);
	ck_assert_msg(strncmp(err, want, strlen(want)) == 0, "error \"%s\" is not about line 2", err);
}
END_TEST

START_TEST(test_sentinels)
{
	struct conf c;
	char err[512];
	ck_assert_int_eq(load("[redis]\nsentinels = 10.0.0.1:26379, [::1]:26380,s3:1\nmaster_name = chat\n",
	    &c, err, sizeof(err)), 0);
	struct conf_hostport hp[CONF_MAX_SENTINELS];
	ck_assert_int_eq(conf_parse_hostports(c.redis_sentinels, hp, CONF_MAX_SENTINELS), 3);
	ck_assert_str_eq(hp[0].host, "10.0.0.1");
	ck_assert_int_eq(hp[0].port, 26379);
	ck_assert_str_eq(hp[1].host, "::1");
	ck_assert_int_eq(hp[1].port, 26380);
	ck_assert_str_eq(hp[2].host, "s3");
	ck_assert_int_eq(hp[2].port, 1);
	ck_assert_str_eq(c.redis_master_name, "chat");
	ck_assert_int_eq(conf_parse_hostports("a:1,,b:2", hp, CONF_MAX_SENTINELS), -1);
	ck_assert_int_eq(conf_parse_hostports("a:1,b:2", hp, 1), -1);
	expect_load_error("[redis]\nsentinels = host\n", 2,
	    "[redis] sentinels: 'host' is not host:port[,host:port...] (at most 16, ports 1-65535)");
	expect_load_error("[redis]\nsentinels = h:1,h:0\n", 2,
	    "[redis] sentinels: 'h:1,h:0' is not host:port[,host:port...] (at most 16, ports 1-65535)");
	/* Sentinels without the master's name cannot ask for anything. */
	ck_assert_int_eq(load("[redis]\nsentinels = h:1\n", &c, err, sizeof(err)), -1);
	ck_assert_ptr_nonnull(strstr(err, "master_name"));
}
END_TEST

START_TEST(test_storage_scope)
{
	/* A reload restarts the storage process exactly when a key it reads changes: the keys of
	 * [storage], [rados], [redis] and [postgres], run_dir, node and the error log's file; no other key
	 * (the storage process follows [log] level through the shared page, log_share_level). */
	static const char *const storage_keys[][3] = {
		{ "storage", "root", "/srv/other" }, { "storage", "backend", "fs" }, { "storage", "max_file_size", "7" },
		{ "storage", "upload_ttl", "9" }, { "storage", "fsync", "always" }, { "storage", "io_threads", "3" },
		{ "storage", "janitor_interval", "9" }, { "storage", "max_uploads", "9" },
		{ "storage", "max_uploads_per_user", "9" }, { "storage", "min_free_space", "9" },
		{ "storage", "lease_ttl", "9" }, { "storage", "dedup", "global" }, { "redis", "host", "10.0.0.1" },
		{ "redis", "port", "7000" }, { "redis", "socket", "/r.sock" }, { "redis", "password", "p" },
		{ "redis", "db", "3" }, { "redis", "prefix", "x:" }, { "redis", "sentinels", "h:1" },
		{ "redis", "master_name", "m" }, { "redis", "sentinel_password", "q" }, { "postgres", "conninfo", "x=1" },
		{ "postgres", "timeout", "9" }, { "server", "run_dir", "/run/other" }, { "server", "node", "n2" },
		{ "log", "file", "/var/log/other.log" },
		{ "rados", "conf", "/etc/ceph/other.conf" }, { "rados", "user", "other" }, { "rados", "pool", "other" },
		{ "rados", "namespace", "ns2" }, { "rados", "op_timeout", "9" }, { "rados", "object_size", "65536" },
		{ "rados", "gc_grace", "9" },
	};
	static const char *const other_keys[][3] = {
		{ "server", "listen", "9999" }, { "server", "workers", "3" }, { "server", "idle_timeout", "9" },
		{ "server", "max_frame", "4096" }, { "server", "stats_socket", "/s.sock" }, { "server", "anonymous", "yes" },
		{ "server", "download_chunk", "9" }, { "server", "storage_timeout", "9" }, { "log", "access_log", "/a.log" },
		{ "log", "level", "debug" },
	};
	struct conf a, b;
	char err[256];
	conf_defaults(&a);
	for (size_t i = 0; i < sizeof(storage_keys) / sizeof(storage_keys[0]); i++) {
		conf_defaults(&b);
		if (strcmp(storage_keys[i][1], "backend") == 0)
			snprintf(a.backend, sizeof(a.backend), "none");   /* fs is the only backend and the default */
		ck_assert_int_eq(conf_set(&b, storage_keys[i][0], storage_keys[i][1], storage_keys[i][2], err, sizeof(err)), 0);
		ck_assert_msg(!conf_storage_equal(&a, &b), "[%s] %s is not in the storage scope", storage_keys[i][0],
		    storage_keys[i][1]);
		conf_defaults(&a);
	}
	for (size_t i = 0; i < sizeof(other_keys) / sizeof(other_keys[0]); i++) {
		conf_defaults(&b);
		ck_assert_int_eq(conf_set(&b, other_keys[i][0], other_keys[i][1], other_keys[i][2], err, sizeof(err)), 0);
		ck_assert_msg(conf_storage_equal(&a, &b), "[%s] %s restarts storage", other_keys[i][0], other_keys[i][1]);
	}
	/* A string is compared up to its NUL, not the bytes an earlier longer value left behind. */
	conf_defaults(&b);
	ck_assert_int_eq(conf_set(&b, "storage", "root", "/var/lib/resourced-longer", err, sizeof(err)), 0);
	ck_assert_int_eq(conf_set(&b, "storage", "root", "/var/lib/resourced", err, sizeof(err)), 0);
	ck_assert(conf_storage_equal(&a, &b));
}
END_TEST

/* A reload's log line names the storage keys that changed, never their values (passwords). */
START_TEST(test_storage_changes_named)
{
	struct conf a, b;
	char err[256], out[64];
	conf_defaults(&a);
	conf_defaults(&b);
	ck_assert_int_eq(conf_storage_changes(&a, &b, out, sizeof(out)), 0);
	ck_assert_str_eq(out, "");
	ck_assert_int_eq(conf_set(&b, "log", "file", "/var/log/r.log", err, sizeof(err)), 0);
	ck_assert_int_eq(conf_set(&b, "redis", "password", "s3cret", err, sizeof(err)), 0);
	ck_assert_int_eq(conf_set(&b, "server", "workers", "7", err, sizeof(err)), 0);   /* not storage's */
	ck_assert_int_eq(conf_set(&b, "log", "level", "debug", err, sizeof(err)), 0);    /* nor this (shared page) */
	ck_assert_int_eq(conf_storage_changes(&a, &b, out, sizeof(out)), 2);
	ck_assert_str_eq(out, "[redis] password, [log] file");
	/* More than fits: cut with "...", still counted. */
	ck_assert_int_eq(conf_set(&b, "storage", "io_threads", "3", err, sizeof(err)), 0);
	ck_assert_int_eq(conf_set(&b, "storage", "upload_ttl", "9", err, sizeof(err)), 0);
	char small[24];
	ck_assert_int_eq(conf_storage_changes(&a, &b, small, sizeof(small)), 4);
	ck_assert_uint_eq(strlen(small), sizeof(small) - 1);
	ck_assert_str_eq(small + sizeof(small) - 4, "...");
	ck_assert_int_eq(conf_storage_changes(&a, &b, NULL, 0), 4);
}
END_TEST

static Suite *conf_suite(void)
{
	Suite *s = suite_create("conf");
	TCase *tc = tcase_create("conf");
	tcase_add_test(tc, test_defaults);
	tcase_add_test(tc, test_drain_grace);
	tcase_add_test(tc, test_sentinels);
	tcase_add_test(tc, test_empty_file_keeps_defaults);
	tcase_add_test(tc, test_good_file);
	tcase_add_test(tc, test_whitespace_and_inline_comments);
	tcase_add_test(tc, test_workers);
	tcase_add_test(tc, test_listen_good);
	tcase_add_test(tc, test_listen_bad);
	tcase_add_test(tc, test_unknown_key);
	tcase_add_test(tc, test_unknown_key_hints);
	tcase_add_test(tc, test_relative_paths);
	tcase_add_test(tc, test_storage_changes_named);
	tcase_add_test(tc, test_unknown_section);
	tcase_add_test(tc, test_bad_number);
	tcase_add_test(tc, test_out_of_range);
	tcase_add_test(tc, test_bool);
	tcase_add_test(tc, test_fsync);
	tcase_add_test(tc, test_backend);
	tcase_add_test(tc, test_log_level);
	tcase_add_test(tc, test_string_length);
	tcase_add_test(tc, test_relative_paths_rejected);
	tcase_add_test(tc, test_missing_file);
	tcase_add_test(tc, test_syntax_error);
	tcase_add_test(tc, test_error_format_first_error_wins);
	tcase_add_test(tc, test_error_reason_matches_line);
	tcase_add_test(tc, test_long_value_not_misread);
	tcase_add_test(tc, test_storage_scope);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return unit_run(conf_suite());
}

/* fuzz_config.c: libFuzzer target for the configuration loader (src/conf.c over inih).
 *
 * The input is written to a temporary file and loaded with conf_defaults +
 * conf_load, as `resourced -c FILE` does. On success every field must be within
 * the range its key allows and every string terminated inside its array; on
 * failure the message must name the file. Loading the same file twice must give
 * the same result. Every violated invariant is a __builtin_trap(). */
#include "config.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "conf.h"

#include "fuzz_check.h"

#define RANGE(v, lo, hi) CHECK((v) >= (lo) && (v) <= (hi))
#define TERMINATED(field) CHECK(memchr((field), '\0', sizeof(field)) != NULL)

static char path[4096];

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void remove_temp(void)
{
	if (path[0])
		unlink(path);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	const char *dir = getenv("TMPDIR");
	snprintf(path, sizeof(path), "%s/fuzz_config.XXXXXX", dir && dir[0] ? dir : "/tmp");
	int fd = mkstemp(path);
	if (fd < 0) {
		perror("fuzz_config: mkstemp");
		abort();
	}
	close(fd);
	atexit(remove_temp);
	return 0;
}

static void check_conf(const struct conf *c)
{
	TERMINATED(c->listen_host);
	TERMINATED(c->listen_port);
	TERMINATED(c->run_dir);
	TERMINATED(c->pid_file);
	TERMINATED(c->user);
	TERMINATED(c->group);
	TERMINATED(c->node);
	TERMINATED(c->stats_socket);
	TERMINATED(c->agent_listen);
	TERMINATED(c->root);
	TERMINATED(c->redis_host);
	TERMINATED(c->redis_socket);
	TERMINATED(c->redis_password);
	TERMINATED(c->redis_prefix);
	TERMINATED(c->pg_conninfo);
	TERMINATED(c->log_file);
	TERMINATED(c->access_log);

	CHECK(c->listen_host[0] != '\0');
	char *end;
	long port = strtol(c->listen_port, &end, 10);
	CHECK(c->listen_port[0] != '\0' && *end == '\0');
	RANGE(port, 1, 65535);

	RANGE(c->workers, 1, 256);
	RANGE(c->max_frame, 1024, 64 << 20);
	RANGE(c->output_cap, 4096, 1 << 30);
	RANGE(c->idle_timeout, 1, 86400);
	RANGE(c->frame_timeout, 1, 3600);
	RANGE(c->max_connections, 1, 1000000);
	RANGE(c->auth_cache_ttl, 0, 86400);
	RANGE(c->anonymous, 0, 1);
	RANGE(c->download_chunk, 1, 16 << 20);
	RANGE(c->storage_timeout, 1, 3600);
	RANGE(c->shutdown_timeout, 1, 86400);
	RANGE(c->proxy_protocol, 0, 1);
	RANGE(c->max_file_size, 0, INT64_C(1) << 50);
	RANGE(c->upload_ttl, 1, 30 * 86400);
	CHECK(c->fsync_policy == FSYNC_NONE || c->fsync_policy == FSYNC_COMPLETE ||
	    c->fsync_policy == FSYNC_ALWAYS);
	RANGE(c->io_threads, 1, 64);
	RANGE(c->janitor_interval, 1, 86400);
	RANGE(c->redis_port, 1, 65535);
	RANGE(c->redis_db, 0, 65535);
	RANGE(c->pg_timeout, 1, 3600);
	RANGE(c->log_level, 0, 3);
	/* conf_load insists on these. */
	CHECK(c->root[0] == '/' && c->run_dir[0] == '/');
	CHECK(c->node[0] != '\0');
	CHECK(conf_storage_equal(c, c));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	FILE *f = fopen(path, "wb");
	CHECK(f != NULL);
	CHECK(size == 0 || fwrite(data, 1, size, f) == size);
	CHECK(fclose(f) == 0);

	static struct conf c, again;
	char err[512], err2[512];
	memset(err, 0x55, sizeof(err));
	conf_defaults(&c);
	int rc = conf_load(&c, path, err, sizeof(err));
	CHECK(rc == 0 || rc == -1);
	if (rc == 0) {
		check_conf(&c);
	} else {
		CHECK(memchr(err, '\0', sizeof(err)) != NULL);
		CHECK(strncmp(err, path, strlen(path)) == 0);
	}

	conf_defaults(&again);
	int rc2 = conf_load(&again, path, err2, sizeof(err2));
	CHECK(rc2 == rc);
	if (rc == 0)
		CHECK(memcmp(&c, &again, sizeof(c)) == 0);
	else
		CHECK(strcmp(err, err2) == 0);
	return 0;
}

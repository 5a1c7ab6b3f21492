/* preflight.h: checks, before start (and for -t), that the paths, users and addresses of a configuration can be used. */
#ifndef RESOURCED_PREFLIGHT_H
#define RESOURCED_PREFLIGHT_H

#include <stdio.h>

struct conf;

/* What begins every line of a report, as the program's other messages on the terminal do (-t, a
 * refused start). A reload logs the lines without it: see preflight_reason. */
#define PREFLIGHT_PREFIX "resourced: "

/* Checks what start will need without changing anything: directories that must exist or be
 * creatable, Unix socket path lengths, users and groups, listen addresses. Writes one line per
 * problem (PREFLIGHT_PREFIX "[section] key VALUE: why") and per warning to report. Returns the number
 * of problems (warnings do not count). */
int preflight_check(const struct conf *conf, FILE *report);

/* For -t: when no instance holds conf's run_dir, that listen, agent_listen and
 * http_listen are free to bind and no live process answers on stats_socket (start
 * refuses an address another process holds); when one does, a note naming its pid
 * instead. Returns the problems reported. */
int preflight_check_running(const struct conf *conf, FILE *report);

/* For start, once it holds the instance lock: the same addresses as preflight_check_running.
 * 0 when all are free; else -1 with the first one taken in err ("[server] key VALUE: why"). */
int preflight_addresses_free(const struct conf *conf, char *err, size_t errlen);

/* The part of preflight_check a reload must pass before it replaces anything: what the storage
 * process needs to start (run_dir, [storage] root, a conninfo libpq can parse). Runs as the user
 * the master runs as by then, like the storage process it would start. Same report and result. */
int preflight_reload_check(const struct conf *conf, FILE *report);

/* A report line without PREFLIGHT_PREFIX ("[section] key VALUE: why"), for the log and the stats
 * socket; a line without the prefix is returned as it is. */
const char *preflight_reason(const char *line);

/* A warning on report when the log would go to syslog (file = syslog, or empty without -f; -t
 * assumes a start without -f) and nothing receives it: no /dev/log. */
void preflight_syslog(const struct conf *conf, int foreground, int test_only, FILE *report);

/* A warning on report when the file at path, loaded into conf, holds a password (Redis, Sentinel,
 * or one in the conninfo) and is readable by every local user. */
void preflight_config_secrets(const struct conf *conf, const char *path, FILE *report);

/* 0 when path can be read as a configuration file; else -1 with why in err. */
int preflight_config_path(const char *path, char *err, size_t errlen);

#endif

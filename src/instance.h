/* instance.h: one resourced instance per configuration: the instance lock, the listen probe and live-socket checks. */
#ifndef RESOURCED_INSTANCE_H
#define RESOURCED_INSTANCE_H

#include <stddef.h>

struct conf;

/* Name of the lock file in run_dir, locked whether or not a pid file is configured. */
#define INSTANCE_LOCK_NAME "resourced.lock"

/* Takes the instance locks (flock, held by the returned descriptors until the
 * last process of the instance exits): <run_dir>/resourced.lock, and the pid
 * file when one is configured. Returns 0, or -1 with a message naming the pid
 * of the instance that holds them. */
int instance_lock(const struct conf *conf, char *err, size_t errlen);

/* Writes the calling process's pid into the locked pid file (in place: the lock
 * stays on the same file). Returns 0 or -1 with errno set. */
int instance_write_pid(void);

/* Binds host:port once without SO_REUSEPORT: -1 and the reason (naming the pid of
 * another process that already listens there when it can be seen), or 0. */
int instance_probe_listen(const char *host, const char *port, char *why, size_t whylen);

/* Whether an instance holds the lock of conf's run_dir: its master's pid, -1 when
 * one holds it without a pid written yet, 0 when none does, -2 when the lock file
 * cannot be read to tell. Creates nothing, and leaves the lock as it found it. */
long instance_running(const struct conf *conf);

/* 1 when a process accepts connections on the Unix socket at path (it must not
 * be unlinked), 0 when nothing listens there (a stale file, or none). */
int instance_unix_socket_live(const char *path);

#endif

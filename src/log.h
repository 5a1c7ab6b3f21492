/* log.h: the one logging module; every line names the process that wrote it. */
#ifndef RESOURCED_LOG_H
#define RESOURCED_LOG_H

#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>

enum log_level { LOG_LEVEL_ERROR, LOG_LEVEL_WARN, LOG_LEVEL_INFO, LOG_LEVEL_DEBUG };

/* Where lines go: stderr (foreground), a file, or syslog. */
int log_open(const char *file, int level, int foreground, char *err, size_t errlen);
void log_set_process(const char *name);   /* "master", "worker 1", "storage" */
/* From now on the level is *shared (memory every process maps, set up before the children fork),
 * and log_open writes it there: a reload's [log] level reaches the running children, the storage
 * process included, without restarting them. */
void log_share_level(_Atomic int *shared);
int log_reopen(void);                     /* after logrotate (USR1) */
int log_level_from_name(const char *name);
int log_enabled(int level);
void log_close(void);

/* The access log: one line per finished transfer, its own file, reopened with log_reopen(). */
int access_log_open(const char *file, char *err, size_t errlen);
void access_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

void log_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));   /* adds strerror(errno) */
void log_warnx(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
_Noreturn void fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2)));  /* adds strerror */
_Noreturn void fatalx(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif

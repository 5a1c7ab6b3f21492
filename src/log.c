/* log.c: levelled log lines to stderr, a file or syslog, prefixed with the writing process. */
#include "config.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

static struct {
	int level;
	_Atomic int *shared_level;   /* when set, the level in force (log_share_level) */
	int fd;            /* stderr or the log file; -1 for syslog */
	char path[512];    /* empty unless logging to a file */
	char process[32];
} log_state = { LOG_LEVEL_INFO, NULL, STDERR_FILENO, "", "resourced" };

static struct {
	int fd;
	char path[512];
} access_state = { -1, "" };

static const char *const level_names[] = { "error", "warn", "info", "debug" };

int log_level_from_name(const char *name)
{
	for (size_t i = 0; i < sizeof(level_names) / sizeof(level_names[0]); i++)
		if (strcmp(name, level_names[i]) == 0)
			return (int)i;
	return -1;
}

int log_open(const char *file, int level, int foreground, char *err, size_t errlen)
{
	log_state.level = level;
	if (log_state.shared_level)
		atomic_store_explicit(log_state.shared_level, level, memory_order_relaxed);
	if (file == NULL || file[0] == '\0') {
		if (foreground) {
			log_state.fd = STDERR_FILENO;
		} else {
			openlog("resourced", LOG_PID | LOG_NDELAY, LOG_DAEMON);
			log_state.fd = -1;
		}
		log_state.path[0] = '\0';
		return 0;
	}
	if (strcmp(file, "syslog") == 0) {
		openlog("resourced", LOG_PID | LOG_NDELAY, LOG_DAEMON);
		log_state.fd = -1;
		return 0;
	}
	int fd = open(file, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
	if (fd < 0) {
		snprintf(err, errlen, "cannot open log file %s: %s", file, strerror(errno));
		return -1;
	}
	snprintf(log_state.path, sizeof(log_state.path), "%s", file);
	if (log_state.fd > STDERR_FILENO)
		close(log_state.fd);
	log_state.fd = fd;
	return 0;
}

void log_share_level(_Atomic int *shared)
{
	atomic_store_explicit(shared, log_state.level, memory_order_relaxed);
	log_state.shared_level = shared;
}

void log_set_process(const char *name)
{
	snprintf(log_state.process, sizeof(log_state.process), "%s", name);
}

int access_log_open(const char *file, char *err, size_t errlen)
{
	if (access_state.fd >= 0)
		close(access_state.fd);
	access_state.fd = -1;
	access_state.path[0] = '\0';
	if (file == NULL || file[0] == '\0')
		return 0;
	int fd = open(file, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
	if (fd < 0) {
		snprintf(err, errlen, "cannot open access log %s: %s", file, strerror(errno));
		return -1;
	}
	access_state.fd = fd;
	snprintf(access_state.path, sizeof(access_state.path), "%s", file);
	return 0;
}

void access_log(const char *fmt, ...)
{
	if (access_state.fd < 0)
		return;
	char line[2048];   /* room for a name of 255 bytes escaped to 4 bytes each */
	struct timespec ts;
	struct tm tm;
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	size_t n = strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%SZ ", &tm);
	va_list ap;
	va_start(ap, fmt);
	int m = vsnprintf(line + n, sizeof(line) - n - 1, fmt, ap);
	va_end(ap);
	if (m < 0)
		return;
	n += (size_t)m < sizeof(line) - n - 1 ? (size_t)m : sizeof(line) - n - 2;
	line[n++] = '\n';
	ssize_t w = write(access_state.fd, line, n);
	(void)w;
}

static int reopen_fd(int *fd, const char *path)
{
	if (path[0] == '\0')
		return 0;
	int nfd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
	if (nfd < 0)
		return -1;
	int old = *fd;
	*fd = nfd;
	if (old > STDERR_FILENO)
		close(old);
	return 0;
}

int log_reopen(void)
{
	int rc = reopen_fd(&access_state.fd, access_state.path);
	return reopen_fd(&log_state.fd, log_state.path) < 0 ? -1 : rc;
}

int log_enabled(int level)
{
	return level <= (log_state.shared_level ? atomic_load_explicit(log_state.shared_level, memory_order_relaxed)
	    : log_state.level);
}

void log_close(void)
{
	if (log_state.fd > STDERR_FILENO)
		close(log_state.fd);
	log_state.fd = STDERR_FILENO;
	log_state.path[0] = '\0';
}

static void log_write(int level, int with_errno, const char *fmt, va_list ap)
{
	int saved_errno = errno;
	if (!log_enabled(level))
		return;
	char msg[2048];
	int n = vsnprintf(msg, sizeof(msg), fmt, ap);
	if (n < 0)
		return;
	if (with_errno && (size_t)n < sizeof(msg))
		snprintf(msg + n, sizeof(msg) - (size_t)n, ": %s", strerror(saved_errno));

	if (log_state.fd < 0) {
		static const int prio[] = { LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG };
		syslog(prio[level], "%s: %s", log_state.process, msg);
		return;
	}
	char stamp[32];
	struct timespec ts;
	struct tm tm;
	clock_gettime(CLOCK_REALTIME, &ts);
	localtime_r(&ts.tv_sec, &tm);
	strftime(stamp, sizeof(stamp), "%Y-%m-%d %H:%M:%S", &tm);
	char line[2300];
	int len = snprintf(line, sizeof(line), "%s.%03ld [%d] %s %s: %s\n", stamp,
	    ts.tv_nsec / 1000000, (int)getpid(), log_state.process, level_names[level], msg);
	if (len > (int)sizeof(line) - 1)
		len = (int)sizeof(line) - 1;
	/* One write() per line keeps lines from different processes whole. */
	ssize_t w = write(log_state.fd, line, (size_t)len);
	(void)w;
	errno = saved_errno;
}

#define LOG_FN(name, level, with_errno)                 \
	void name(const char *fmt, ...)                     \
	{                                                   \
		va_list ap;                                     \
		va_start(ap, fmt);                              \
		log_write(level, with_errno, fmt, ap);          \
		va_end(ap);                                     \
	}
LOG_FN(log_warn, LOG_LEVEL_WARN, 1)
LOG_FN(log_warnx, LOG_LEVEL_WARN, 0)
LOG_FN(log_error, LOG_LEVEL_ERROR, 0)
LOG_FN(log_info, LOG_LEVEL_INFO, 0)
LOG_FN(log_debug, LOG_LEVEL_DEBUG, 0)

void fatal(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	log_write(LOG_LEVEL_ERROR, 1, fmt, ap);
	va_end(ap);
	exit(2);
}

void fatalx(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	log_write(LOG_LEVEL_ERROR, 0, fmt, ap);
	va_end(ap);
	exit(2);
}

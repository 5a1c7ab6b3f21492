/* instance.c: keeps a second resourced with the same configuration, address or sockets from starting over a live one. */
#include "config.h"
#include "instance.h"
#include "conf.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

/* Held for the life of the instance; children inherit them, so the lock lasts
 * until the last process of the instance (the storage process finishing its
 * writes after the master died, for one) is gone. Never closed. */
static int pid_fd = -1;
static int lock_fd = -1;

static long read_pid(int fd)
{
	char buf[32];
	ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);
	if (n <= 0)
		return 0;
	buf[n] = '\0';
	long pid = strtol(buf, NULL, 10);
	return pid > 0 ? pid : 0;
}

/* Opens and locks path; -1 with err set when another process holds it. */
static int lock_file(const char *path, const char *what, char *err, size_t errlen)
{
	int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
	if (fd < 0) {
		snprintf(err, errlen, "cannot open %s %s: %s", what, path, strerror(errno));
		return -1;
	}
	if (flock(fd, LOCK_EX | LOCK_NB) == 0)
		return fd;
	int saved = errno;
	if (saved == EWOULDBLOCK) {
		long pid = read_pid(fd);
		if (pid && kill((pid_t)pid, 0) < 0 && errno == ESRCH)
			snprintf(err, errlen, "the %s %s is still locked by processes of a resourced whose master (pid %ld) "
			    "is gone (its storage process finishing, or a stuck child: see fuser %s); refusing to start",
			    what, path, pid, path);
		else if (pid)
			snprintf(err, errlen, "another resourced (pid %ld) is running with this configuration: it holds "
			    "the %s %s; refusing to start", pid, what, path);
		else
			snprintf(err, errlen, "another resourced is starting with this configuration: it holds the %s %s; "
			    "refusing to start", what, path);
	} else {
		snprintf(err, errlen, "cannot lock %s %s: %s", what, path, strerror(saved));
	}
	close(fd);
	return -1;
}

int instance_lock(const struct conf *conf, char *err, size_t errlen)
{
	char path[600];
	if (conf->pid_file[0]) {
		pid_fd = lock_file(conf->pid_file, "pid file", err, errlen);
		if (pid_fd < 0)
			return -1;
	}
	/* run_dir holds the storage socket: two instances sharing it would take each
	 * other's, so it is locked even when the pid files differ or there is none. */
	if (snprintf(path, sizeof(path), "%s/%s", conf->run_dir, INSTANCE_LOCK_NAME) >= (int)sizeof(path)) {
		snprintf(err, errlen, "run_dir %s is too long", conf->run_dir);
		return -1;
	}
	lock_fd = lock_file(path, "run_dir lock", err, errlen);
	return lock_fd < 0 ? -1 : 0;
}

static int write_pid_to(int fd, const char *line, size_t len)
{
	if (fd < 0)
		return 0;
	if (ftruncate(fd, 0) < 0 || pwrite(fd, line, len, 0) != (ssize_t)len)
		return -1;
	return 0;
}

int instance_write_pid(void)
{
	char line[32];
	int n = snprintf(line, sizeof(line), "%ld\n", (long)getpid());
	if (write_pid_to(pid_fd, line, (size_t)n) < 0 || write_pid_to(lock_fd, line, (size_t)n) < 0)
		return -1;
	return 0;
}

/* The inode of a listening TCP socket on port from /proc/net/tcp{,6}, or 0. */
static unsigned long listening_inode(int port)
{
	static const char *const tables[] = { "/proc/net/tcp", "/proc/net/tcp6" };
	for (size_t t = 0; t < 2; t++) {
		FILE *f = fopen(tables[t], "r");
		if (f == NULL)
			continue;
		char line[512];
		unsigned long found = 0;
		while (found == 0 && fgets(line, sizeof(line), f)) {
			char local[128];
			unsigned state;
			unsigned long inode;
			/* sl local rem st tx:rx tr:when retrnsmt uid timeout inode */
			if (sscanf(line, "%*s %127s %*s %x %*s %*s %*s %*s %*s %lu", local, &state, &inode) != 3)
				continue;
			const char *colon = strrchr(local, ':');
			if (state == 0x0A && colon && strtol(colon + 1, NULL, 16) == port)
				found = inode;
		}
		fclose(f);
		if (found)
			return found;
	}
	return 0;
}

/* The pid of a process that has socket inode open, or 0 (unknown or not ours to see). */
static long socket_owner(unsigned long inode)
{
	char want[64];
	snprintf(want, sizeof(want), "socket:[%lu]", inode);
	DIR *proc = opendir("/proc");
	if (proc == NULL)
		return 0;
	long owner = 0;
	struct dirent *p;
	while (owner == 0 && (p = readdir(proc)) != NULL) {
		long pid = strtol(p->d_name, NULL, 10);
		if (pid <= 0)
			continue;
		char dir[300];
		snprintf(dir, sizeof(dir), "/proc/%ld/fd", pid);
		DIR *fds = opendir(dir);
		if (fds == NULL)
			continue;
		struct dirent *e;
		while (owner == 0 && (e = readdir(fds)) != NULL) {
			char link[600], target[80];
			snprintf(link, sizeof(link), "%s/%s", dir, e->d_name);
			ssize_t n = readlink(link, target, sizeof(target) - 1);
			if (n > 0) {
				target[n] = '\0';
				if (strcmp(target, want) == 0)
					owner = pid;
			}
		}
		closedir(fds);
	}
	closedir(proc);
	return owner;
}

int instance_probe_listen(const char *host, const char *port, char *why, size_t whylen)
{
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE };
	struct addrinfo *res;
	int rc = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
	if (rc != 0) {
		snprintf(why, whylen, "%s", gai_strerror(rc));
		return -1;
	}
	/* SO_REUSEADDR (TIME_WAIT leftovers are no instance) but not SO_REUSEPORT,
	 * which would let this bind succeed beside a live instance's sockets. */
	int one = 1;
	int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	int ok = fd >= 0 && setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == 0 &&
	    bind(fd, res->ai_addr, res->ai_addrlen) == 0;
	int saved = errno;
	if (fd >= 0)
		close(fd);
	freeaddrinfo(res);
	if (ok)
		return 0;
	if (saved == EADDRINUSE) {
		long pid = socket_owner(listening_inode(atoi(port)));
		if (pid)
			snprintf(why, whylen, "another process (pid %ld) already listens there", pid);
		else
			snprintf(why, whylen, "another process already listens there (ss -ltnp 'sport = :%s' names it)", port);
	} else if (saved == EACCES) {
		snprintf(why, whylen, "%s (ports below 1024 need root or CAP_NET_BIND_SERVICE)", strerror(saved));
	} else {
		snprintf(why, whylen, "%s", strerror(saved));
	}
	return -1;
}

long instance_running(const struct conf *conf)
{
	char path[600];
	if (snprintf(path, sizeof(path), "%s/%s", conf->run_dir, INSTANCE_LOCK_NAME) >= (int)sizeof(path))
		return 0;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT || errno == ENOTDIR ? 0 : -2;
	long pid = 0;
	if (flock(fd, LOCK_EX | LOCK_NB) < 0 && errno == EWOULDBLOCK) {
		pid = read_pid(fd);
		if (pid == 0)
			pid = -1;
	}
	close(fd);   /* releases the lock if it was taken here */
	return pid;
}

int instance_unix_socket_live(const char *path)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	if (snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", path) >= (int)sizeof(sun.sun_path))
		return 0;
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return 0;
	/* A full backlog (EAGAIN) still means someone listens. */
	int live = connect(fd, (struct sockaddr *)&sun, sizeof(sun)) == 0 || errno == EAGAIN || errno == EINPROGRESS;
	close(fd);
	return live;
}

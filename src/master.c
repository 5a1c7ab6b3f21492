/* master.c: binds the listening sockets, forks the storage process and the workers, and respawns them. */
#include "config.h"
#include "master.h"
#include "conf.h"
#include "ipc.h"
#include "log.h"
#include "storage.h"
#include "worker.h"

#include <bsd/unistd.h>
#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <grp.h>
#include <netdb.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define EXIT_FATAL 2              /* a child that exits with this is not respawned */
#define RESPAWN_MAX_DELAY 30.0
#define CRASH_WINDOW 2.0          /* dying sooner than this after start counts as a crash loop */
#define STOP_TIMEOUT 10.0         /* then SIGKILL */

enum role { ROLE_STORAGE, ROLE_WORKER };

/* One supervised child. */
struct proc {
	enum role role;
	int slot;                     /* worker number, 0 for storage */
	pid_t pid;                    /* 0 while not running */
	ev_tstamp started;
	double backoff;               /* delay before the next respawn */
	int restarts;
	ev_timer respawn;
	struct master *m;
};

struct master {
	struct ev_loop *loop;
	struct conf *conf;
	int *listen_fds;              /* one SO_REUSEPORT socket per worker slot */
	int storage_fd;               /* the storage process's Unix socket */
	struct proc *procs;           /* [0] is storage, [1..] workers */
	int nprocs;
	int stopping;
	ev_signal sig_term, sig_int, sig_quit, sig_chld, sig_usr1;
	ev_timer stop_timer;
};

void proc_set_title(const char *fmt, ...)
{
	char title[128];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(title, sizeof(title), fmt, ap);
	va_end(ap);
	setproctitle("-resourced: %s", title);
	log_set_process(title);
}

/* ---------------------------------------------------------------- sockets */

static int bind_listener(const struct conf *conf)
{
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE };
	struct addrinfo *res;
	int rc = getaddrinfo(conf->listen_host, conf->listen_port, &hints, &res);
	if (rc != 0)
		fatalx("listen %s:%s: %s", conf->listen_host, conf->listen_port, gai_strerror(rc));
	int fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		fatal("socket() failed");
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0)
		fatal("setsockopt(SO_REUSEPORT) failed");
	if (bind(fd, res->ai_addr, res->ai_addrlen) < 0)
		fatal("bind(%s:%s) failed", conf->listen_host, conf->listen_port);
	if (listen(fd, 4096) < 0)
		fatal("listen() failed");
	freeaddrinfo(res);
	return fd;
}

static int bind_storage_socket(const struct conf *conf)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	int n = snprintf(sun.sun_path, sizeof(sun.sun_path), "%s/%s", conf->run_dir, IPC_SOCKET_NAME);
	if (n >= (int)sizeof(sun.sun_path))
		fatalx("run_dir %s is too long for a Unix socket path", conf->run_dir);
	unlink(sun.sun_path);   /* stale from a previous run */
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		fatal("socket(AF_UNIX) failed");
	mode_t old = umask(0077);
	if (bind(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0)
		fatal("bind(%s) failed", sun.sun_path);
	umask(old);
	if (listen(fd, 1024) < 0)
		fatal("listen(%s) failed", sun.sun_path);
	return fd;
}

/* ---------------------------------------------------------------- privileges, pid file */

static void make_owned_dir(const char *path, uid_t uid, gid_t gid)
{
	if (mkdir(path, 0750) < 0 && errno != EEXIST)
		fatal("mkdir(%s) failed", path);
	if (uid != (uid_t)-1 && chown(path, uid, gid) < 0)
		fatal("chown(%s) failed", path);
}

/* Runs as the configured user from here on (only when started as root). */
static void drop_privileges(const struct conf *conf)
{
	if (geteuid() != 0 || conf->user[0] == '\0') {
		make_owned_dir(conf->root, (uid_t)-1, (gid_t)-1);
		return;
	}
	struct passwd *pw = getpwnam(conf->user);
	if (pw == NULL)
		fatalx("[server] user: no such user %s", conf->user);
	gid_t gid = pw->pw_gid;
	if (conf->group[0]) {
		struct group *gr = getgrnam(conf->group);
		if (gr == NULL)
			fatalx("[server] group: no such group %s", conf->group);
		gid = gr->gr_gid;
	}
	make_owned_dir(conf->root, pw->pw_uid, gid);
	if (chown(conf->run_dir, pw->pw_uid, gid) < 0)
		fatal("chown(%s) failed", conf->run_dir);
	if (setgid(gid) < 0 || initgroups(conf->user, gid) < 0 || setuid(pw->pw_uid) < 0)
		fatal("cannot switch to user %s", conf->user);
	log_info("running as %s", conf->user);
}

static void write_pid_file(const struct conf *conf)
{
	if (conf->pid_file[0] == '\0')
		return;
	char tmp[600];
	snprintf(tmp, sizeof(tmp), "%s.tmp", conf->pid_file);
	FILE *f = fopen(tmp, "w");
	if (f == NULL || fprintf(f, "%d\n", (int)getpid()) < 0 || fclose(f) != 0 || rename(tmp, conf->pid_file) < 0)
		fatal("cannot write pid file %s", conf->pid_file);
}

/* Forks into the background; the parent exits once the child writes to the returned fd. */
static int daemonize(void)
{
	int ready[2];
	if (pipe(ready) < 0)
		fatal("pipe() failed");
	pid_t pid = fork();
	if (pid < 0)
		fatal("fork() failed");
	if (pid > 0) {
		char c;
		close(ready[1]);
		_exit(read(ready[0], &c, 1) == 1 ? 0 : 1);
	}
	close(ready[0]);
	setsid();
	int null = open("/dev/null", O_RDWR);
	if (null >= 0) {
		dup2(null, STDIN_FILENO);
		dup2(null, STDOUT_FILENO);
		dup2(null, STDERR_FILENO);
		if (null > STDERR_FILENO)
			close(null);
	}
	fcntl(ready[1], F_SETFD, FD_CLOEXEC);
	return ready[1];
}

/* ---------------------------------------------------------------- children */

static void child_reset_signals(void)
{
	static const int sigs[] = { SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGCHLD, SIGUSR1, SIGUSR2, SIGPIPE };
	struct sigaction sa = { .sa_handler = SIG_DFL };
	sigemptyset(&sa.sa_mask);
	for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++)
		sigaction(sigs[i], &sa, NULL);
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
}

static void proc_spawn(struct proc *p)
{
	struct master *m = p->m;
	pid_t pid = fork();
	if (pid < 0) {
		log_warn("fork() failed while spawning %s", p->role == ROLE_STORAGE ? "storage" : "a worker");
		p->backoff = 1.0;
		ev_timer_set(&p->respawn, p->backoff, 0.);
		ev_timer_start(m->loop, &p->respawn);
		return;
	}
	if (pid == 0) {
		child_reset_signals();
		int rc;
		if (p->role == ROLE_STORAGE) {
			for (int i = 0; i < m->conf->workers; i++)
				close(m->listen_fds[i]);
			proc_set_title("storage");
			rc = storage_main(m->conf, m->storage_fd);
		} else {
			for (int i = 0; i < m->conf->workers; i++)
				if (i != p->slot - 1)
					close(m->listen_fds[i]);
			close(m->storage_fd);
			proc_set_title("worker %d", p->slot);
			rc = worker_main(m->conf, p->slot, m->listen_fds[p->slot - 1]);
		}
		log_close();
		_exit(rc);
	}
	p->pid = pid;
	p->started = ev_now(m->loop);
	log_info("started %s (pid %d)", p->role == ROLE_STORAGE ? "storage" : "worker", (int)pid);
}

static void proc_on_respawn(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)loop;
	(void)revents;
	struct proc *p = t->data;
	if (!p->m->stopping && p->pid == 0)
		proc_spawn(p);
}

static void master_on_child(struct ev_loop *loop, ev_signal *s, int revents)
{
	(void)s;
	(void)revents;
	struct master *m = s->data;
	int status;
	pid_t pid;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		struct proc *p = NULL;
		for (int i = 0; i < m->nprocs; i++)
			if (m->procs[i].pid == pid)
				p = &m->procs[i];
		if (p == NULL)
			continue;
		p->pid = 0;
		const char *name = p->role == ROLE_STORAGE ? "storage" : "worker";
		if (m->stopping)
			continue;
		if (WIFSIGNALED(status))
			log_warnx("%s %d (pid %d) killed by signal %d", name, p->slot, (int)pid, WTERMSIG(status));
		else
			log_warnx("%s %d (pid %d) exited with status %d", name, p->slot, (int)pid, WEXITSTATUS(status));
		if (WIFEXITED(status) && WEXITSTATUS(status) == EXIT_FATAL) {
			log_error("%s %d failed fatally: not respawning it", name, p->slot);
			continue;
		}
		/* Crash loops back off; a process that ran a while comes back at once. */
		if (ev_now(loop) - p->started < CRASH_WINDOW)
			p->backoff = p->backoff < 0.1 ? 0.1 : (p->backoff * 2 > RESPAWN_MAX_DELAY ? RESPAWN_MAX_DELAY : p->backoff * 2);
		else
			p->backoff = 0;
		p->restarts++;
		ev_timer_set(&p->respawn, p->backoff, 0.);
		ev_timer_start(loop, &p->respawn);
	}
	if (m->stopping) {
		int alive = 0;
		for (int i = 0; i < m->nprocs; i++)
			alive += m->procs[i].pid != 0;
		if (alive == 0)
			ev_break(loop, EVBREAK_ALL);
	}
}

static void master_signal_children(struct master *m, int sig)
{
	for (int i = 0; i < m->nprocs; i++)
		if (m->procs[i].pid > 0)
			kill(m->procs[i].pid, sig);
}

static void master_on_stop_timeout(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)loop;
	(void)revents;
	struct master *m = t->data;
	log_warnx("children did not stop within %.0f s: killing them", STOP_TIMEOUT);
	master_signal_children(m, SIGKILL);
}

static void master_on_stop(struct ev_loop *loop, ev_signal *s, int revents)
{
	(void)revents;
	struct master *m = s->data;
	if (m->stopping)
		return;
	log_info("signal %d: stopping", s->signum);
	m->stopping = 1;
	for (int i = 0; i < m->nprocs; i++)
		ev_timer_stop(loop, &m->procs[i].respawn);
	/* Workers first would be kinder, but each child finishes its own in-flight disk work. */
	master_signal_children(m, SIGTERM);
	ev_timer_init(&m->stop_timer, master_on_stop_timeout, STOP_TIMEOUT, 0.);
	m->stop_timer.data = m;
	ev_timer_start(loop, &m->stop_timer);
	int alive = 0;
	for (int i = 0; i < m->nprocs; i++)
		alive += m->procs[i].pid != 0;
	if (alive == 0)
		ev_break(loop, EVBREAK_ALL);
}

static void master_on_usr1(struct ev_loop *loop, ev_signal *s, int revents)
{
	(void)loop;
	(void)revents;
	struct master *m = s->data;
	if (log_reopen() < 0)
		log_warn("cannot reopen the log file");
	master_signal_children(m, SIGUSR1);
}

int master_run(struct conf *conf, const char *conf_path, int foreground)
{
	char err[256];
	if (log_open(conf->log_file, conf->log_level, foreground, err, sizeof(err)) < 0) {
		fprintf(stderr, "resourced: %s\n", err);
		return 1;
	}
	if (mkdir(conf->run_dir, 0750) < 0 && errno != EEXIST) {
		fprintf(stderr, "resourced: mkdir(%s): %s\n", conf->run_dir, strerror(errno));
		return 1;
	}
	static struct master m;
	m.conf = conf;
	m.listen_fds = calloc((size_t)conf->workers, sizeof(int));
	m.nprocs = conf->workers + 1;
	m.procs = calloc((size_t)m.nprocs, sizeof(struct proc));
	if (m.listen_fds == NULL || m.procs == NULL)
		fatalx("out of memory");
	for (int i = 0; i < conf->workers; i++)
		m.listen_fds[i] = bind_listener(conf);
	m.storage_fd = bind_storage_socket(conf);
	drop_privileges(conf);

	int ready_fd = foreground ? -1 : daemonize();
	write_pid_file(conf);
	if (ready_fd >= 0) {
		/* The pid file exists: init scripts may now read it. */
		ssize_t w = write(ready_fd, "", 1);
		(void)w;
		close(ready_fd);
	}
	proc_set_title("master");
	log_info("resourced %s started with %s: %d workers on %s:%s", PACKAGE_VERSION, conf_path,
	    conf->workers, conf->listen_host, conf->listen_port);

	m.loop = ev_default_loop(EVFLAG_AUTO);
	if (m.loop == NULL)
		fatalx("cannot start the event loop");
	signal(SIGPIPE, SIG_IGN);
	ev_signal_init(&m.sig_term, master_on_stop, SIGTERM);
	ev_signal_init(&m.sig_int, master_on_stop, SIGINT);
	ev_signal_init(&m.sig_quit, master_on_stop, SIGQUIT);
	ev_signal_init(&m.sig_chld, master_on_child, SIGCHLD);
	ev_signal_init(&m.sig_usr1, master_on_usr1, SIGUSR1);
	ev_signal *sigs[] = { &m.sig_term, &m.sig_int, &m.sig_quit, &m.sig_chld, &m.sig_usr1 };
	for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++) {
		sigs[i]->data = &m;
		ev_signal_start(m.loop, sigs[i]);
	}

	for (int i = 0; i < m.nprocs; i++) {
		struct proc *p = &m.procs[i];
		p->m = &m;
		p->role = i == 0 ? ROLE_STORAGE : ROLE_WORKER;
		p->slot = i;
		ev_timer_init(&p->respawn, proc_on_respawn, 0., 0.);
		p->respawn.data = p;
		proc_spawn(p);
	}

	ev_run(m.loop, 0);

	ev_timer_stop(m.loop, &m.stop_timer);
	char path[600];
	snprintf(path, sizeof(path), "%s/%s", conf->run_dir, IPC_SOCKET_NAME);
	unlink(path);
	if (conf->pid_file[0])
		unlink(conf->pid_file);
	log_info("stopped");
	return 0;
}

/* master.c: binds the listening sockets, forks the storage process and the workers, and supervises them. */
#include "config.h"
#include "master.h"
#include "addrlimit.h"
#include "conf.h"
#include "control.h"
#include "http.h"
#include "instance.h"
#include "ipc.h"
#include "link.h"
#include "log.h"
#include "offthread.h"
#include "preflight.h"
#include "signals.h"
#include "stats.h"
#include "storage.h"
#include "lease.h"
#include "worker.h"

#include <bsd/unistd.h>
#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <grp.h>
#include <netdb.h>
#include <pwd.h>
#include <signal.h>
#include <sodium.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#ifdef HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#else
#define sd_notify(unset, state) ((void)(unset), (void)(state), 0)
#endif

#define EXIT_FATAL 2              /* a child that exits with this is not respawned */
#define RESPAWN_MAX_DELAY 30.0
#define CRASH_WINDOW 2.0          /* dying sooner than this after start counts as a crash loop */
#define STOP_TIMEOUT 10.0         /* fast stop: then SIGKILL */

enum role { ROLE_STORAGE, ROLE_WORKER };
enum proc_state { PROC_FREE, PROC_RUNNING, PROC_RETIRING };

/* One supervised child; its index in the table is its stats slot. */
struct proc {
	enum proc_state state;
	enum role role;
	int number;                   /* worker number from 1; 0 for storage */
	int generation;               /* reloads bump it; only the current one is respawned */
	pid_t pid;                    /* 0 while not running */
	ev_tstamp started;            /* loop time of the current start */
	double started_wall;
	double backoff;               /* delay before the next respawn */
	int restarts;                 /* respawns after an exit the master did not ask for */
	int stop_asked;               /* the master stopped it to start it again (a reload) */
	ev_timer respawn;
	struct master *m;
};

struct master {
	struct ev_loop *loop;
	struct conf *conf;            /* the configuration new children get */
	const char *conf_path;
	int nlisten;                  /* listening sockets, one per worker number */
	int *listen_fds;
	int storage_fd;               /* the storage process's Unix socket */
	struct proc procs[STATS_MAX_SLOTS];   /* [0] is storage */
	int generation;
	int stopping;                 /* 1 fast, 2 graceful */
	int foreground;               /* -f: logs stay on stderr */
	struct stats_shm *shm;
	struct control *control;
	struct http *http;            /* [server] http_listen; NULL when off */
	ev_signal sigs[7];            /* master_signals[] */
	ev_child child_watcher;
	ev_timer stop_timer;
	ev_timer grace_timer;         /* graceful stop: the agent says drain, workers still accept */
	struct offthread *reload_check;   /* a reload's preflight runs on its thread; NULL when none */
	char reload_root[sizeof(((struct conf *)0)->root)];   /* what it checks, for the timeout's message */
};

static void proc_spawn(struct proc *p);
static void master_on_signal(struct ev_loop *loop, ev_signal *s, int revents);

/* What the master does with each signal (resourced(8), SIGNALS); master_on_signal tells them apart. */
static const struct signal_action master_signals[] = {
	{ SIGTERM, master_on_signal },    /* fast stop */
	{ SIGINT, master_on_signal },     /* fast stop */
	{ SIGQUIT, master_on_signal },    /* graceful stop */
	{ SIGHUP, master_on_signal },     /* reload */
	{ SIGUSR1, master_on_signal },    /* reopen the logs, here and in every child */
	{ SIGPIPE, NULL },
	{ SIGUSR2, NULL },                /* tells a worker to retire; meaningless to the master */
};
_Static_assert(SIGNALS_COUNT(master_signals) == SIGNALS_COUNT(((struct master *)0)->sigs), "one watcher per signal");

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

/* Returns a listening SO_REUSEPORT socket, or -1 with the reason in err. */
static int bind_listener(const struct conf *conf, char *err, size_t errlen)
{
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE };
	struct addrinfo *res;
	int rc = getaddrinfo(conf->listen_host, conf->listen_port, &hints, &res);
	if (rc != 0) {
		snprintf(err, errlen, "listen %s:%s: %s", conf->listen_host, conf->listen_port, gai_strerror(rc));
		return -1;
	}
	int one = 1;
	int fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
	    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0 ||
	    bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, 4096) < 0) {
		snprintf(err, errlen, "listen %s:%s: %s", conf->listen_host, conf->listen_port, strerror(errno));
		if (fd >= 0)
			close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	return fd;
}

static int bind_storage_socket(const struct conf *conf)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	if (link_socket_path(conf->run_dir, sun.sun_path, sizeof(sun.sun_path)) < 0)
		fatalx("run_dir %s is too long for a Unix socket path", conf->run_dir);
	/* A stale file from a dead instance goes; a live instance's socket never does
	 * (the run_dir lock keeps our own kind out; this guards against anything else). */
	if (instance_unix_socket_live(sun.sun_path))
		fatalx("%s: a live process listens there (another instance?): refusing to start", sun.sun_path);
	unlink(sun.sun_path);
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

/* Makes listen_fds fit conf: the same sockets when the address is unchanged, so a reload loses no queued connection. */
static int master_bind_all(struct master *m, const struct conf *conf, int same_address, char *err, size_t errlen)
{
	int *fds = calloc((size_t)conf->workers, sizeof(int));
	if (fds == NULL) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	for (int i = 0; i < conf->workers; i++) {
		if (same_address && i < m->nlisten) {
			fds[i] = m->listen_fds[i];
			m->listen_fds[i] = -1;
			continue;
		}
		fds[i] = bind_listener(conf, err, errlen);
		if (fds[i] < 0) {
			for (int j = 0; j < i; j++)
				if (!(same_address && j < m->nlisten))
					close(fds[j]);
				else
					m->listen_fds[j] = fds[j];
			free(fds);
			return -1;
		}
	}
	/* Sockets no longer used: the retiring workers hold their own copies. */
	for (int i = 0; i < m->nlisten; i++)
		if (m->listen_fds[i] >= 0)
			close(m->listen_fds[i]);
	free(m->listen_fds);
	m->listen_fds = fds;
	m->nlisten = conf->workers;
	return 0;
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
	/* Sockets bound as root must stay usable by the processes that now run as the user. */
	char sock[600];
	link_socket_path(conf->run_dir, sock, sizeof(sock));   /* bind_storage_socket checked its length */
	if (chown(sock, pw->pw_uid, gid) < 0)
		fatal("chown(%s) failed", sock);
	if (conf->stats_socket[0] && chown(conf->stats_socket, pw->pw_uid, gid) < 0)
		fatal("chown(%s) failed", conf->stats_socket);
	if (setgid(gid) < 0 || initgroups(conf->user, gid) < 0 || setuid(pw->pw_uid) < 0)
		fatal("cannot switch to user %s", conf->user);
	log_info("running as %s", conf->user);
}

static void write_pid_file(void)
{
	if (instance_write_pid() < 0)
		fatal("cannot write the pid file");
}

/* Forks into the background; the parent exits 0 once the child writes to the returned fd, or with
 * the child's own status when it exits before (1 for a signal), as a start with -f would. */
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
		if (read(ready[0], &c, 1) == 1)
			_exit(0);
		int status;
		_exit(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) != 0 ?
		    WEXITSTATUS(status) : 1);
	}
	close(ready[0]);
	setsid();
	/* A daemon holds no directory it was started from (it could not be unmounted); every path
	 * in the configuration is absolute, and so is the configuration's own (main.c). */
	if (chdir("/") < 0)
		fatal("chdir(/) failed");
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

static const char *role_name(enum role r)
{
	return r == ROLE_STORAGE ? "storage" : "worker";
}

static void child_reset_signals(struct master *m)
{
	/* libev keeps one global owner per signal: release the master's before the child's loop starts. */
	signals_unwatch(m->loop, master_signals, SIGNALS_COUNT(master_signals), m->sigs);
	ev_child_stop(m->loop, &m->child_watcher);
	static const int signums[] = { SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGCHLD, SIGUSR1, SIGUSR2, SIGPIPE };
	struct sigaction sa = { .sa_handler = SIG_DFL };
	sigemptyset(&sa.sa_mask);
	for (size_t i = 0; i < sizeof(signums) / sizeof(signums[0]); i++)
		sigaction(signums[i], &sa, NULL);
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
}

static void proc_spawn(struct proc *p)
{
	struct master *m = p->m;
	int slot = (int)(p - m->procs);
	stats_reset_gauges(&m->shm->procs[slot]);
	addrlimit_slot_start(m->shm, slot, p->role == ROLE_WORKER && m->conf->max_connections_per_address > 0);
	pid_t pid = fork();
	if (pid < 0) {
		log_warn("fork() failed while spawning %s %d", role_name(p->role), p->number);
		p->backoff = 1.0;
		ev_timer_set(&p->respawn, p->backoff, 0.);
		ev_timer_start(m->loop, &p->respawn);
		return;
	}
	if (pid == 0) {
		child_reset_signals(m);
		control_close_inherited(m->control);
		http_close_inherited(m->http);
		stats_attach(m->shm, slot);
		int rc;
		if (p->role == ROLE_STORAGE) {
			for (int i = 0; i < m->nlisten; i++)
				close(m->listen_fds[i]);
			proc_set_title("storage");
			rc = storage_main(m->conf, m->storage_fd);
		} else {
			for (int i = 0; i < m->nlisten; i++)
				if (i != p->number - 1)
					close(m->listen_fds[i]);
			close(m->storage_fd);
			proc_set_title("worker %d", p->number);
			rc = worker_main(m->conf, p->number, m->listen_fds[p->number - 1]);
		}
		log_close();
		exit(rc);   /* not _exit: leak checkers and atexit handlers of the child run */
	}
	p->pid = pid;
	p->started = ev_now(m->loop);
	p->started_wall = stats_wall_now();
	log_info("started %s %d (pid %d)", role_name(p->role), p->number, (int)pid);
}

static void proc_on_respawn(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)loop;
	(void)revents;
	struct proc *p = t->data;
	if (!p->m->stopping && p->pid == 0 && p->state == PROC_RUNNING)
		proc_spawn(p);
}

static struct proc *proc_new(struct master *m, enum role role, int number)
{
	int first = role == ROLE_STORAGE ? 0 : 1;
	int last = role == ROLE_STORAGE ? 1 : STATS_MAX_SLOTS;
	for (int i = first; i < last; i++) {
		struct proc *p = &m->procs[i];
		if (p->state != PROC_FREE)
			continue;
		memset(p, 0, sizeof(*p));
		p->state = PROC_RUNNING;
		p->role = role;
		p->number = number;
		p->generation = m->generation;
		p->m = m;
		ev_timer_init(&p->respawn, proc_on_respawn, 0., 0.);
		p->respawn.data = p;
		return p;
	}
	return NULL;
}

static int procs_alive(const struct master *m)
{
	int alive = 0;
	for (int i = 0; i < STATS_MAX_SLOTS; i++)
		alive += m->procs[i].pid != 0;
	return alive;
}

static int workers_alive(const struct master *m)
{
	int alive = 0;
	for (int i = 1; i < STATS_MAX_SLOTS; i++)
		alive += m->procs[i].pid != 0;
	return alive;
}

static void master_signal_role(struct master *m, int role_mask, int sig)
{
	for (int i = 0; i < STATS_MAX_SLOTS; i++)
		if (m->procs[i].pid > 0 && (role_mask & (1 << m->procs[i].role)))
			kill(m->procs[i].pid, sig);
}
#define ROLES_ALL ((1 << ROLE_STORAGE) | (1 << ROLE_WORKER))

static void master_on_child(struct ev_loop *loop, ev_child *w, int revents)
{
	(void)revents;
	struct master *m = w->data;
	pid_t pid = w->rpid;
	int status = w->rstatus;
	struct proc *p = NULL;
	for (int i = 0; i < STATS_MAX_SLOTS; i++)
		if (m->procs[i].pid == pid)
			p = &m->procs[i];
	if (p == NULL)
		return;
	p->pid = 0;
	addrlimit_slot_end(m->shm, (int)(p - m->procs));   /* the kernel closed its connections */
	const char *name = role_name(p->role);
	if (m->stopping || p->state == PROC_RETIRING) {
		log_info("%s %d (pid %d) exited", name, p->number, (int)pid);
		if (p->state == PROC_RETIRING)
			p->state = PROC_FREE;
	} else if (p->stop_asked && WIFEXITED(status) && WEXITSTATUS(status) == 0) {
		/* A restart the reload asked for: no incident, and not counted as one. */
		log_info("%s %d (pid %d) stopped for the reload; starting it again", name, p->number, (int)pid);
		p->stop_asked = 0;
		p->backoff = 0;
		ev_timer_set(&p->respawn, 0., 0.);
		ev_timer_start(loop, &p->respawn);
	} else {
		p->stop_asked = 0;
		if (WIFSIGNALED(status))
			log_warnx("%s %d (pid %d) killed by signal %d", name, p->number, (int)pid, WTERMSIG(status));
		else
			log_warnx("%s %d (pid %d) exited with status %d", name, p->number, (int)pid, WEXITSTATUS(status));
		if (WIFEXITED(status) && WEXITSTATUS(status) == EXIT_FATAL) {
			log_error("%s %d failed fatally: not respawning it", name, p->number);
		} else {
			/* Crash loops back off; a process that ran a while comes back at once. */
			if (ev_now(loop) - p->started < CRASH_WINDOW)
				p->backoff = p->backoff < 0.1 ? 0.1
				    : (p->backoff * 2 > RESPAWN_MAX_DELAY ? RESPAWN_MAX_DELAY : p->backoff * 2);
			else
				p->backoff = 0;
			p->restarts++;
			ev_timer_set(&p->respawn, p->backoff, 0.);
			ev_timer_start(loop, &p->respawn);
		}
	}
	if (m->stopping == 2 && !ev_is_active(&m->grace_timer) && workers_alive(m) == 0 && m->procs[0].pid > 0)
		kill(m->procs[0].pid, SIGTERM);   /* graceful: storage goes last, its queue drained */
	if (m->stopping && procs_alive(m) == 0)
		ev_break(loop, EVBREAK_ALL);
}

/* ---------------------------------------------------------------- stopping */

static void master_on_stop_timeout(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)loop;
	(void)revents;
	struct master *m = t->data;
	log_warnx("children did not stop in time: killing them");
	master_signal_role(m, ROLES_ALL, SIGKILL);
}

/* The end of a graceful stop's grace: the balancers have seen drain, so the node stops
 * accepting; the workers finish the transfers in progress and close everything else. */
static void master_on_grace_end(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)loop;
	(void)revents;
	struct master *m = t->data;
	/* The master's copies of the listening sockets go first: with them open the kernel would
	 * still complete handshakes into a backlog nobody accepts from. Once the workers close
	 * theirs too, a new connection is refused, and the balancer tries another server. */
	for (int i = 0; i < m->nlisten; i++)
		if (m->listen_fds[i] >= 0) {
			close(m->listen_fds[i]);
			m->listen_fds[i] = -1;
		}
	log_info("graceful stop: no longer accepting; %d workers finish the transfers in progress", workers_alive(m));
	master_signal_role(m, 1 << ROLE_WORKER, SIGQUIT);
	if (workers_alive(m) == 0)
		master_signal_role(m, 1 << ROLE_STORAGE, SIGTERM);
}

static void master_stop(struct master *m, int graceful)
{
	if (m->stopping == 1 || (m->stopping == 2 && graceful))
		return;
	if (m->stopping == 2) {
		/* TERM during a graceful stop: stop now. */
		log_info("fast stop requested during a graceful stop");
		m->stopping = 1;
		ev_timer_stop(m->loop, &m->grace_timer);
		master_signal_role(m, ROLES_ALL, SIGTERM);
		ev_timer_stop(m->loop, &m->stop_timer);
		ev_timer_set(&m->stop_timer, STOP_TIMEOUT, 0.);
		ev_timer_start(m->loop, &m->stop_timer);
		return;
	}
	m->stopping = graceful ? 2 : 1;
	sd_notify(0, "STOPPING=1");
	control_set_stopping(m->control);
	for (int i = 0; i < STATS_MAX_SLOTS; i++)
		ev_timer_stop(m->loop, &m->procs[i].respawn);
	if (graceful) {
		/* The agent-check answers drain from now on, while the workers go on accepting for
		 * the grace: a balancer that checks every few seconds sees drain and sends no one
		 * new before the node refuses connections. Then workers finish what is in flight
		 * (master_on_grace_end); storage stops when they are gone. */
		double grace = conf_drain_grace(m->conf);
		log_info("graceful stop: the agent answers drain; accepting for %.1f s more", grace);
		ev_timer_init(&m->grace_timer, master_on_grace_end, grace, 0.);
		m->grace_timer.data = m;
		ev_timer_start(m->loop, &m->grace_timer);
	} else {
		master_signal_role(m, ROLES_ALL, SIGTERM);
	}
	/* shutdown_timeout bounds the whole graceful stop, grace included; the workers keep to it. */
	ev_timer_init(&m->stop_timer, master_on_stop_timeout,
	    graceful ? m->conf->shutdown_timeout + STOP_TIMEOUT : STOP_TIMEOUT, 0.);
	m->stop_timer.data = m;
	ev_timer_start(m->loop, &m->stop_timer);
	if (procs_alive(m) == 0)
		ev_break(m->loop, EVBREAK_ALL);
}


/* ---------------------------------------------------------------- reload */

static void spawn_workers(struct master *m)
{
	for (int n = 1; n <= m->conf->workers; n++) {
		struct proc *p = proc_new(m, ROLE_WORKER, n);
		if (p == NULL) {
			log_error("no free process slot for worker %d", n);
			continue;
		}
		proc_spawn(p);
	}
}

/*
 * A reload is checked, then applied. The check is -t's of what the storage process needs
 * (preflight_reload_check): a storage root it cannot create would otherwise stop it for good and
 * leave every upload answered 1027. That check stats run_dir and [storage] root (access(2) too),
 * which hangs on a dead NFS server: it runs on a thread of its own (offthread.c), and the loop
 * goes on. When it has not answered within storage_timeout the reload is refused and the thread
 * left behind (it is never joined, so nothing waits for it, the master's exit included). Its
 * answer reaches the stats socket's `reload` through control_reload_done.
 */
struct reload_check {
	struct conf *next;
	char *report;                 /* preflight lines, one per problem */
	size_t len;
	int problems;                 /* -1: no memory for the report */
};

/* On the check's thread: nothing of the master's, no log. */
static void reload_check_work(void *arg)
{
	struct reload_check *rc = arg;
	FILE *f = open_memstream(&rc->report, &rc->len);
	if (f == NULL) {
		rc->problems = -1;
		return;
	}
	rc->problems = preflight_reload_check(rc->next, f);
	fclose(f);
}

static void reload_check_free(void *arg)
{
	struct reload_check *rc = arg;
	if (rc == NULL)
		return;
	free(rc->report);
	free(rc->next);
	free(rc);
}

static int master_reload_apply(struct master *m, struct conf *next, char *msg, size_t msglen);

/* The check answered (rc), or did not within storage_timeout (rc NULL: its thread keeps it). */
static void master_reload_checked(void *ctx, void *arg)
{
	struct master *m = ctx;
	struct reload_check *rc = arg;
	char msg[1024];   /* [storage] root is up to 511 bytes */
	int ok = 0;
	m->reload_check = NULL;
	if (rc == NULL) {
		log_error("reload refused, still running on the old configuration: [storage] root %s (or [server] "
		    "run_dir) did not answer within %d s ([server] storage_timeout)", m->reload_root,
		    m->conf->storage_timeout);
		snprintf(msg, sizeof(msg), "storage root %s did not answer within %d s; still running on the old "
		    "configuration", m->reload_root, m->conf->storage_timeout);
	} else if (rc->problems < 0) {
		snprintf(msg, sizeof(msg), "out of memory");
	} else if (rc->problems > 0) {
		/* One line per problem, each PREFLIGHT_PREFIX "[section] key VALUE: why": the log and the
		 * answer give the reason without the program's name. */
		snprintf(msg, sizeof(msg), "%s%s", preflight_reason(rc->report),
		    rc->problems > 1 ? " (and more: see the log)" : "");
		for (char *line = strtok(rc->report, "\n"); line; line = strtok(NULL, "\n"))
			log_error("reload refused, still running on the old configuration: %s", preflight_reason(line));
	} else if (m->stopping) {
		snprintf(msg, sizeof(msg), "stopping: reload refused");   /* a stop came during the check */
	} else {
		ok = master_reload_apply(m, rc->next, msg, sizeof(msg)) == 0;
		rc->next = NULL;   /* applied, or freed */
	}
	reload_check_free(rc);
	control_reload_done(m->control, ok, msg);
}

/* Re-reads the configuration and starts its check: 1 when the check runs (master_reload_checked
 * answers), else -1 with why in msg. */
static int master_reload(void *ctx, char *msg, size_t msglen)
{
	struct master *m = ctx;
	char err[512];
	if (m->stopping) {
		snprintf(msg, msglen, "stopping: reload refused");
		return -1;
	}
	if (m->reload_check) {
		log_warnx("reload refused: the previous reload's check of [storage] root %s has not answered yet",
		    m->reload_root);
		snprintf(msg, msglen, "a reload is being checked already (storage root %s): try again once it has "
		    "answered", m->reload_root);
		return -1;
	}
	struct conf *next = malloc(sizeof(*next));
	struct reload_check *rc = calloc(1, sizeof(*rc));
	if (next == NULL || rc == NULL) {
		free(next);
		free(rc);
		snprintf(msg, msglen, "out of memory");
		return -1;
	}
	conf_defaults(next);
	if (conf_load(next, m->conf_path, err, sizeof(err)) < 0) {
		log_error("reload refused, still running on the old configuration: %s", err);
		snprintf(msg, msglen, "%s", err);
		free(next);
		free(rc);
		return -1;
	}
	/* What a start bound, locked or switched to stays: new workers meeting another run_dir would never
	 * find the storage socket the master holds, and a stop would remove another pid file. */
	char kept[200];
	if (conf_keep_start_keys(m->conf, next, kept, sizeof(kept)) > 0)
		log_warnx("reload: %s: changes take effect at the next start (kept as they are)", kept);
	rc->next = next;
	snprintf(m->reload_root, sizeof(m->reload_root), "%s", next->root);
	m->reload_check = offthread_start(m->loop, m->conf->storage_timeout, reload_check_work, reload_check_free,
	    rc, master_reload_checked, m);
	if (m->reload_check == NULL) {
		log_error("reload refused: cannot start a thread to check the new configuration");
		snprintf(msg, msglen, "cannot start a thread to check the new configuration");
		reload_check_free(rc);
		return -1;
	}
	return 1;
}

/* Replaces the configuration with next (checked): new workers take over and the old ones retire
 * gracefully. next is the master's from now on, or freed. */
static int master_reload_apply(struct master *m, struct conf *next, char *msg, size_t msglen)
{
	char err[512];
	sd_notify(0, "RELOADING=1");
	int same_address = strcmp(next->listen_host, m->conf->listen_host) == 0 &&
	    strcmp(next->listen_port, m->conf->listen_port) == 0;
	if (master_bind_all(m, next, same_address, err, sizeof(err)) < 0) {
		log_error("reload refused: %s", err);
		snprintf(msg, msglen, "%s", err);
		free(next);
		sd_notify(0, "READY=1");
		return -1;
	}
	char storage_changes[200];
	int storage_same = conf_storage_changes(m->conf, next, storage_changes, sizeof(storage_changes)) == 0;
	if (log_open(next->log_file, next->log_level, m->foreground, err, sizeof(err)) < 0)
		log_warnx("reload: %s (keeping the old log)", err);
	if (strcmp(next->access_log, m->conf->access_log) != 0 && access_log_open(next->access_log, err, sizeof(err)) < 0)
		log_warnx("reload: %s (no access log)", err);
	struct conf *old = m->conf;
	m->conf = next;
	control_set_conf(m->control, next);
	m->generation++;
	/* Old workers retire (USR2): they stop accepting and serve their clients until
	 * these leave or shutdown_timeout passes; new connections go to the new workers. */
	for (int i = 1; i < STATS_MAX_SLOTS; i++) {
		struct proc *p = &m->procs[i];
		if (p->state != PROC_RUNNING)
			continue;
		ev_timer_stop(m->loop, &p->respawn);
		if (p->pid > 0) {
			p->state = PROC_RETIRING;
			kill(p->pid, SIGUSR2);
		} else {
			p->state = PROC_FREE;
		}
	}
	spawn_workers(m);
	struct proc *storage = &m->procs[0];
	if (!storage_same && storage->pid > 0) {
		/* It comes back with the new configuration; the workers hold requests for it meanwhile. */
		log_info("storage settings changed (%s): restarting the storage process", storage_changes);
		storage->backoff = 0;
		storage->stop_asked = 1;
		kill(storage->pid, SIGTERM);
	} else if (storage->pid == 0 && storage->state == PROC_RUNNING) {
		/* Down (a fatal exit is never respawned on its own, a crash may be backing off): the
		 * reload is the operator's fix, so it starts now rather than never or later. */
		log_info("the storage process is down: starting it with the reloaded configuration");
		ev_timer_stop(m->loop, &storage->respawn);
		storage->backoff = 0;
		proc_spawn(storage);
	}
	free(old);   /* children forked from it have their own copies */
	log_info("reloaded %s: generation %d, %d workers", m->conf_path, m->generation, m->conf->workers);
	snprintf(msg, msglen, "reloaded: %d workers", m->conf->workers);
	sd_notify(0, "READY=1");
	return 0;
}

static int master_list(void *ctx, struct control_proc *out, int max)
{
	struct master *m = ctx;
	int n = 0;
	for (int i = 0; i < STATS_MAX_SLOTS && n < max; i++) {
		const struct proc *p = &m->procs[i];
		if (p->state == PROC_FREE)
			continue;
		out[n].role = role_name(p->role);
		out[n].number = p->number;
		out[n].slot = i;
		out[n].pid = p->pid;
		out[n].started = p->started_wall;
		out[n].restarts = p->restarts;
		out[n].state = p->pid == 0 ? "down" : p->state == PROC_RETIRING ? "retiring" : "running";
		n++;
	}
	return n;
}

static void master_on_signal(struct ev_loop *loop, ev_signal *s, int revents)
{
	(void)loop;
	(void)revents;
	struct master *m = s->data;
	char msg[512];
	switch (s->signum) {
	case SIGTERM:
	case SIGINT:
		log_info("signal %d: fast stop", s->signum);
		master_stop(m, 0);
		break;
	case SIGQUIT:
		log_info("SIGQUIT: graceful stop (at most %d s)", m->conf->shutdown_timeout);
		master_stop(m, 1);
		break;
	case SIGHUP:
		log_info("SIGHUP: reloading %s", m->conf_path);
		master_reload(m, msg, sizeof(msg));
		break;
	case SIGUSR1:
		/* Said in the new file, so that logrotate's work can be seen where it is looked for. */
		if (log_reopen() < 0)
			log_warn("SIGUSR1: cannot reopen the log files %s%s%s", m->conf->log_file,
			    m->conf->access_log[0] ? " and " : "", m->conf->access_log);
		else
			log_info("SIGUSR1: log files reopened");
		master_signal_role(m, ROLES_ALL, SIGUSR1);
		break;
	}
}

int master_run(struct conf *conf, const char *conf_path, int foreground)
{
	char err[512];
	if (log_open(conf->log_file, conf->log_level, foreground, err, sizeof(err)) < 0) {
		fprintf(stderr, "resourced: %s\n", err);
		return 1;
	}
	if (mkdir(conf->run_dir, 0750) < 0 && errno != EEXIST) {
		fprintf(stderr, "resourced: mkdir(%s): %s\n", conf->run_dir, strerror(errno));
		return 1;
	}
	/* Before any socket or file of the instance is touched: one instance per
	 * configuration, and none beside another process on the same address. */
	char why[450];
	int refused = instance_lock(conf, err, sizeof(err)) < 0;
	if (!refused && preflight_addresses_free(conf, why, sizeof(why)) < 0) {
		/* Status 1 like any refusal before start, whichever listener it is (EXIT STATUS in resourced(8)). */
		snprintf(err, sizeof(err), "%s; refusing to start", why);
		refused = 1;
	}
	if (refused) {
		log_error("%s", err);
		if (!foreground || conf->log_file[0])
			fprintf(stderr, "resourced: %s\n", err);
		return 1;
	}
	static struct master m;
	/* The master owns its configuration: reloads replace it. */
	m.conf = malloc(sizeof(*conf));
	if (m.conf == NULL)
		fatalx("out of memory");
	*m.conf = *conf;
	conf = m.conf;
	m.conf_path = conf_path;
	m.foreground = foreground;
	m.shm = stats_create();
	if (m.shm == NULL)
		fatal("mmap() of the stats page failed");
	log_share_level(&m.shm->log_level);   /* before any child forks: they all follow a reload's level */
	if (master_bind_all(&m, conf, 0, err, sizeof(err)) < 0)
		fatalx("%s", err);
	m.storage_fd = bind_storage_socket(conf);
	/* Opened before privileges drop, like the log: workers inherit the descriptor. */
	if (access_log_open(conf->access_log, err, sizeof(err)) < 0)
		fatalx("%s", err);

	m.loop = ev_default_loop(EVFLAG_AUTO);
	if (m.loop == NULL)
		fatalx("cannot start the event loop");
	struct control_ops ops = { master_list, master_reload, &m };
	m.control = control_create(m.loop, conf, m.shm, &ops);
	if (m.control == NULL)
		fatalx("out of memory");
	if (conf->http_listen[0])
		m.http = http_create(m.loop, conf->http_listen, m.control);   /* bound as root: any port */
	drop_privileges(conf);

	int ready_fd = foreground ? -1 : daemonize();
	if (ready_fd >= 0)
		ev_loop_fork(m.loop);
	/* Caught before the pid file exists: a HUP or TERM sent as soon as it names this process (a
	 * reload right after a start) is queued for the loop instead of killing the master. */
	signals_watch(m.loop, master_signals, SIGNALS_COUNT(master_signals), m.sigs, &m);
	write_pid_file();
	if (ready_fd >= 0) {
		/* The pid file exists: init scripts may now read it. */
		ssize_t w = write(ready_fd, "", 1);
		(void)w;
		close(ready_fd);
	}
	proc_set_title("master");
	log_info("resourced %s started with %s: %d workers on %s:%s", PACKAGE_VERSION, conf_path,
	    conf->workers, conf->listen_host, conf->listen_port);

	/* libev reaps children on the default loop itself: watch them through it. */
	ev_child_init(&m.child_watcher, master_on_child, 0, 0);
	m.child_watcher.data = &m;
	ev_child_start(m.loop, &m.child_watcher);

	/* One lease owner per master: a storage process it restarts takes its predecessor's
	 * upload leases back at once, other nodes wait for them (lease.h). */
	if (sodium_init() < 0)
		fatalx("libsodium cannot start");
	addrlimit_init_key(m.shm);
	lease_owner_init(conf->node);
	struct proc *storage = proc_new(&m, ROLE_STORAGE, 0);
	proc_spawn(storage);
	spawn_workers(&m);
	sd_notify(0, "READY=1");

	ev_run(m.loop, 0);

	if (m.reload_check)
		offthread_abandon(m.reload_check);   /* a check stuck on the storage root is not waited for */
	ev_timer_stop(m.loop, &m.stop_timer);
	ev_timer_stop(m.loop, &m.grace_timer);
	http_destroy(m.http);
	control_destroy(m.control);
	char path[600];
	link_socket_path(m.conf->run_dir, path, sizeof(path));
	unlink(path);
	if (m.conf->pid_file[0])
		unlink(m.conf->pid_file);
	log_info("stopped");
	return 0;
}

/* pg.c: applies queued avatar icon updates to PostgreSQL and refreshes the users' Redis cache. */
#include "config.h"
#include "pg.h"
#include "conf.h"
#include "json.h"
#include "log.h"
#include "escape.h"
#include "pool.h"
#include "rds.h"
#include "stats.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PG_RETRY_INTERVAL 2.0
#define PENDING_PREFIX "icon-"

struct pg_item {
	uint64_t uid;
	struct pg_item *next;
};

/* An update applied (PostgreSQL, then Redis): its pending file goes if it still names it. */
struct pg_applied {
	uint64_t uid;
	char name[256];
	struct pg_applied *next;
};

/*
 * The pending files are read, removed and listed on the disk pool, never on the loop: a root that
 * hangs (NFS) stalls the icon queue, not every upload of the node. One disk job at a time, so a
 * read never races a rescan or a removal. The loop starts them in pg_next, in this order:
 * removals of applied updates, a rescan, the read that begins the next update.
 */
enum pg_disk_op {
	DISK_IDLE,
	DISK_REMOVE,               /* applied: remove each file that still names what was applied */
	DISK_RESCAN,               /* list the pending files */
	DISK_READ,                 /* read the name queued for uid, to send its UPDATE */
};

struct pg_disk {
	struct pool_job job;       /* first: the pool hands it back */
	struct pg *pg;
	enum pg_disk_op op;
	struct pg_applied *applied;   /* DISK_REMOVE */
	size_t removed;
	uint64_t *uids;            /* DISK_RESCAN: what was listed */
	size_t nuids, cap;
	int listed;                /* 0 when the directory could not be read */
	uint64_t uid;              /* DISK_READ */
	char name[256];
	int found;
};

struct pg {
	struct ev_loop *loop;
	const struct conf *conf;
	struct rds *redis;
	struct pool *pool;
	char pending_dir[600];
	PGconn *conn;
	int connected;
	ev_io io;
	ev_timer retry;            /* reconnect and rescan */
	ev_timer query_timer;      /* bounds one query, or one connection attempt */
	struct pg_item *head, *tail;
	uint64_t busy_uid;         /* the update in flight */
	char busy_name[256];
	int busy;
	size_t backlog;            /* pending files on disk */
	struct pg_disk disk;       /* the disk job, running unless disk.op is DISK_IDLE */
	struct pg_applied *to_remove;   /* applied updates whose files the next DISK_REMOVE checks */
	int rescan_wanted;
	struct json_writer jw;
};

struct cache_write {
	struct pg *pg;
	uint64_t uid;
	char name[256];
};

static void pg_next(struct pg *pg);
static void pg_connect(struct pg *pg);
static void pg_send_update(struct pg *pg, uint64_t uid, const char *name);

static void pending_path(const char *pending_dir, uint64_t uid, char *out, size_t outlen)
{
	snprintf(out, outlen, "%s/" PENDING_PREFIX "%" PRIu64, pending_dir, uid);
}

/*
 * Pending files are written and removed on several disk threads at once: two avatars of one user
 * published together shared one temporary name (each truncated the other's: a rename failed, so an
 * avatar that was stored got an error answer, or the file mixed both names), and a removal that
 * read the applied name could unlink a newer file renamed in between (that update lost). One
 * writer or remover at a time; only disk threads take the lock, never the loop.
 */
static pthread_mutex_t pending_lock = PTHREAD_MUTEX_INITIALIZER;

static int pending_write_locked(const char *pending_dir, uint64_t uid, const char *name, size_t name_len)
{
	char path[700], tmp[720];
	int plen = snprintf(path, sizeof(path), "%s/" PENDING_PREFIX "%" PRIu64, pending_dir, uid);
	int tlen = snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	if (plen < 0 || (size_t)plen >= sizeof(path) || tlen < 0 || (size_t)tlen >= sizeof(tmp))
		return ENAMETOOLONG;   /* cannot happen: pending_dir is bounded by [storage] root */
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
	if (fd < 0)
		return errno;
	ssize_t n = write(fd, name, name_len);
	int err = n == (ssize_t)name_len ? 0 : (n < 0 ? errno : EIO);
	if (err == 0 && fsync(fd) < 0)
		err = errno;
	close(fd);
	if (err == 0 && rename(tmp, path) < 0)
		err = errno;
	if (err) {
		unlink(tmp);
		return err;
	}
	/* The rename itself must survive a crash: flush the directory. */
	int dfd = open(pending_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0)
		return errno;
	err = fsync(dfd) < 0 ? errno : 0;
	close(dfd);
	return err;
}

int pg_pending_write(const char *pending_dir, uint64_t uid, const char *name, size_t name_len)
{
	pthread_mutex_lock(&pending_lock);
	int err = pending_write_locked(pending_dir, uid, name, name_len);
	pthread_mutex_unlock(&pending_lock);
	return err;
}

/* ---------------------------------------------------------------- on a disk thread */

/* The icon name queued for uid, or -1 when nothing is pending. */
static int pending_read(const char *pending_dir, uint64_t uid, char *name, size_t namelen)
{
	char path[700];
	pending_path(pending_dir, uid, path, sizeof(path));
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, name, namelen - 1);
	close(fd);
	if (n <= 0)
		return -1;
	name[n] = '\0';
	return 0;
}

/* Removes the pending file unless a newer avatar replaced it meanwhile; 1 when it went. */
static int pending_remove(const char *pending_dir, uint64_t uid, const char *name)
{
	char current[256], path[700];
	pthread_mutex_lock(&pending_lock);   /* no rename between the read and the unlink */
	int removed = 0;
	if (pending_read(pending_dir, uid, current, sizeof(current)) == 0 && strcmp(current, name) == 0) {
		pending_path(pending_dir, uid, path, sizeof(path));
		removed = unlink(path) == 0;
	}
	pthread_mutex_unlock(&pending_lock);
	return removed;
}

/* The uids of every pending file, in d->uids. */
static void pending_list(const char *pending_dir, struct pg_disk *d)
{
	DIR *dir = opendir(pending_dir);
	if (dir == NULL)
		return;
	d->listed = 1;
	struct dirent *de;
	while ((de = readdir(dir)) != NULL) {
		if (strncmp(de->d_name, PENDING_PREFIX, strlen(PENDING_PREFIX)) != 0)
			continue;
		const char *num = de->d_name + strlen(PENDING_PREFIX);
		if (num[0] == '\0' || strspn(num, "0123456789") != strlen(num))
			continue;
		if (d->nuids == d->cap) {
			size_t cap = d->cap ? 2 * d->cap : 64;
			uint64_t *uids = realloc(d->uids, cap * sizeof(*uids));
			if (uids == NULL)
				break;   /* the rest is found by a later rescan */
			d->uids = uids;
			d->cap = cap;
		}
		d->uids[d->nuids++] = strtoull(num, NULL, 10);
	}
	closedir(dir);
}

static void pg_disk_work(struct pool_job *job)
{
	struct pg_disk *d = (struct pg_disk *)job;
	const char *dir = d->pg->pending_dir;
	switch (d->op) {
	case DISK_REMOVE:
		for (struct pg_applied *a = d->applied; a; a = a->next)
			d->removed += (size_t)pending_remove(dir, a->uid, a->name);
		break;
	case DISK_RESCAN:
		pending_list(dir, d);
		break;
	case DISK_READ:
		d->found = pending_read(dir, d->uid, d->name, sizeof(d->name)) == 0;
		break;
	case DISK_IDLE:
		break;
	}
}

/* ---------------------------------------------------------------- back on the loop */

static void applied_free(struct pg_applied *a)
{
	while (a) {
		struct pg_applied *next = a->next;
		free(a);
		a = next;
	}
}

static void pg_queue_uid(struct pg *pg, uint64_t uid)
{
	for (struct pg_item *it = pg->head; it; it = it->next)
		if (it->uid == uid)
			return;   /* already queued: the file holds the newest name */
	struct pg_item *it = calloc(1, sizeof(*it));
	if (it == NULL)
		return;   /* the pending file stays; the next rescan picks it up */
	it->uid = uid;
	if (pg->tail)
		pg->tail->next = it;
	else
		pg->head = it;
	pg->tail = it;
	pg_next(pg);
}

void pg_icon_queue(struct pg *pg, uint64_t uid)
{
	pg->backlog++;   /* approximate until the next rescan counts the files */
	STAT_SET(retry_backlog, pg->backlog);
	pg_queue_uid(pg, uid);
}

/* The update for uid set name: its pending file goes, unless a newer avatar replaced it meanwhile. */
static void pg_applied(struct pg *pg, uint64_t uid, const char *name)
{
	struct pg_applied *a = calloc(1, sizeof(*a));
	if (a == NULL)
		return;   /* the file stays: the next rescan applies it again, which changes nothing */
	a->uid = uid;
	snprintf(a->name, sizeof(a->name), "%s", name);
	a->next = pg->to_remove;
	pg->to_remove = a;
	pg_next(pg);
}

/* Queues every pending file: at start, after a reconnect, and on the retry timer. */
static void pg_rescan(struct pg *pg)
{
	pg->rescan_wanted = 1;
	pg_next(pg);
}

static void pg_disk_done(struct pool_job *job)
{
	struct pg_disk *d = (struct pg_disk *)job;
	struct pg *pg = d->pg;
	/* What the job found is taken out first: queueing below may start the next job on d. */
	enum pg_disk_op op = d->op;
	struct pg_applied *applied = d->applied;
	uint64_t *uids = d->uids;
	size_t nuids = d->nuids, removed = d->removed;
	int listed = d->listed, found = d->found;
	uint64_t uid = d->uid;
	char name[sizeof(d->name)];
	memcpy(name, d->name, sizeof(name));
	*d = (struct pg_disk){ .pg = pg, .op = DISK_IDLE };

	if (op == DISK_REMOVE) {
		pg->backlog = pg->backlog > removed ? pg->backlog - removed : 0;
		STAT_SET(retry_backlog, pg->backlog);
		applied_free(applied);
	} else if (op == DISK_RESCAN) {
		if (listed) {
			pg->backlog = nuids;
			STAT_SET(retry_backlog, pg->backlog);
		}
		for (size_t i = 0; i < nuids; i++)
			pg_queue_uid(pg, uids[i]);
		free(uids);
	} else if (op == DISK_READ && found) {
		pg_send_update(pg, uid, name);
	}   /* a read that found nothing: already applied */
	pg_next(pg);
}

static void pg_disk_start(struct pg *pg, enum pg_disk_op op)
{
	struct pg_disk *d = &pg->disk;
	d->op = op;
	d->job.work = pg_disk_work;
	d->job.done = pg_disk_done;
	pool_submit(pg->pool, &d->job);
}

/* libpq's messages end in a newline, may span lines (DETAIL, HINT) and may quote the icon name a
 * client chose: one escaped log line each. */
#define PG_MESSAGE_MAX 600
static const char *pg_message(const char *msg, char *out, size_t cap)
{
	size_t len = strlen(msg);
	while (len > 0 && (msg[len - 1] == '\n' || msg[len - 1] == ' '))
		len--;
	escape_quoted(out, cap, msg, utf8_prefix(msg, len, PG_MESSAGE_MAX));
	return out;
}

static void pg_reset(struct pg *pg, const char *why)
{
	if (pg->conn) {
		if (why) {
			STAT_INC(pg_errors);
			char flat[ESCAPE_SIZE(PG_MESSAGE_MAX)];
			log_warnx("postgres: %s", pg_message(why, flat, sizeof(flat)));
		}
		ev_io_stop(pg->loop, &pg->io);
		PQfinish(pg->conn);
	}
	ev_timer_stop(pg->loop, &pg->query_timer);
	pg->conn = NULL;
	pg->connected = 0;
	pg->busy = 0;
}

static void cache_on_reply(redisAsyncContext *c, void *reply, void *privdata)
{
	(void)c;
	struct cache_write *cw = privdata;
	redisReply *rep = reply;
	if (rep && rep->type != REDIS_REPLY_ERROR)
		pg_applied(cw->pg, cw->uid, cw->name);
	else
		log_warnx("redis: cannot write ubaseinfo_%" PRIu64 ": the update stays queued", cw->uid);
	free(cw);
}

/* Writes the user row to Redis as ubaseinfo_<uid>; the pending file goes once that is done. */
static void pg_write_cache(struct pg *pg, PGresult *res)
{
	/* Column order of the RETURNING list in pg_next(). */
	static const char *const cols[] = { "uid", "pwd", "name", "email", "nick", "desc", "sex", "icon" };
	struct json_writer *jw = &pg->jw;
	json_begin(jw);
	for (int i = 0; i < (int)(sizeof(cols) / sizeof(cols[0])); i++) {
		const char *v = PQgetvalue(res, 0, i);
		if (i == 0 || i == 6)
			json_put_int(jw, cols[i], strtoll(v, NULL, 10));
		else
			json_put_str(jw, cols[i], v, strlen(v));
	}
	const uint8_t *body;
	size_t len;
	json_end(jw, &body, &len);

	struct cache_write *cw = calloc(1, sizeof(*cw));
	if (cw == NULL)
		return;
	cw->pg = pg;
	cw->uid = pg->busy_uid;
	snprintf(cw->name, sizeof(cw->name), "%s", pg->busy_name);
	if (rds_command(pg->redis, cache_on_reply, cw, "SET ubaseinfo_%" PRIu64 " %b", pg->busy_uid,
	    body, len) < 0) {
		log_warnx("redis down: ubaseinfo_%" PRIu64 " will be written on the next retry", pg->busy_uid);
		free(cw);
	}
}

static void pg_on_result(struct pg *pg, PGresult *res)
{
	ExecStatusType st = PQresultStatus(res);
	if (st == PGRES_TUPLES_OK) {
		if (PQntuples(res) == 0) {
			char name[ESCAPE_SIZE(sizeof(pg->busy_name))];
			escape_quoted(name, sizeof(name), pg->busy_name, strlen(pg->busy_name));
			log_warnx("postgres: no user row for uid %" PRIu64 ": icon \"%s\" not recorded",
			    pg->busy_uid, name);
			pg_applied(pg, pg->busy_uid, pg->busy_name);
		} else {
			char name[ESCAPE_SIZE(sizeof(pg->busy_name))];
			escape_quoted(name, sizeof(name), pg->busy_name, strlen(pg->busy_name));
			log_info("icon of uid %" PRIu64 " set to \"%s\"", pg->busy_uid, name);
			pg_write_cache(pg, res);
		}
	} else {
		STAT_INC(pg_errors);
		char flat[ESCAPE_SIZE(PG_MESSAGE_MAX)];
		log_warnx("postgres: icon update for uid %" PRIu64 " failed: %s", pg->busy_uid,
		    pg_message(PQresultErrorMessage(res), flat, sizeof(flat)));
	}
}

static void pg_on_io(struct ev_loop *loop, ev_io *w, int revents)
{
	(void)loop;
	(void)revents;
	struct pg *pg = w->data;
	if (!pg->connected) {
		PostgresPollingStatusType st = PQconnectPoll(pg->conn);
		if (st == PGRES_POLLING_FAILED) {
			pg_reset(pg, PQerrorMessage(pg->conn));
			return;
		}
		if (st != PGRES_POLLING_OK) {
			ev_io_stop(pg->loop, &pg->io);
			ev_io_set(&pg->io, PQsocket(pg->conn), st == PGRES_POLLING_READING ? EV_READ : EV_WRITE);
			ev_io_start(pg->loop, &pg->io);
			return;
		}
		pg->connected = 1;
		ev_timer_stop(pg->loop, &pg->query_timer);
		PQsetnonblocking(pg->conn, 1);
		ev_io_stop(pg->loop, &pg->io);
		ev_io_set(&pg->io, PQsocket(pg->conn), EV_READ);
		ev_io_start(pg->loop, &pg->io);
		log_info("postgres: connected");
		pg_rescan(pg);
		pg_next(pg);
		return;
	}
	if (PQconsumeInput(pg->conn) == 0) {
		pg_reset(pg, PQerrorMessage(pg->conn));
		return;
	}
	while (!PQisBusy(pg->conn)) {
		PGresult *res = PQgetResult(pg->conn);
		if (res == NULL) {
			/* The query is complete. */
			if (pg->busy) {
				pg->busy = 0;
				ev_timer_stop(pg->loop, &pg->query_timer);
				pg_next(pg);
			}
			break;
		}
		if (pg->busy)
			pg_on_result(pg, res);
		PQclear(res);
	}
	if (PQstatus(pg->conn) == CONNECTION_BAD)
		pg_reset(pg, "connection lost");
}

static void pg_on_query_timeout(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)loop;
	(void)revents;
	struct pg *pg = t->data;
	/* A server that accepts the connection but never answers (stopped, hung) would hold the
	 * connection attempt for ever: it is bounded like a query. */
	pg_reset(pg, pg->connected ? "query timed out: reconnecting" :
	    "connecting took longer than [postgres] timeout: trying again");
}

static void pg_on_retry(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)loop;
	(void)revents;
	struct pg *pg = t->data;
	if (pg->conn == NULL && pg->conf->pg_conninfo[0])
		pg_connect(pg);
	else if (pg->connected && pg->head == NULL && !pg->busy && pg->disk.op == DISK_IDLE && pg->backlog > 0)
		pg_rescan(pg);
}

/* Starts the next disk job when none runs: removals first, then a rescan, then the read that
 * begins the next queued update (when connected and no update is in flight). */
static void pg_next(struct pg *pg)
{
	if (pg->disk.op != DISK_IDLE)
		return;   /* its done callback comes back here */
	if (pg->to_remove) {
		pg->disk.applied = pg->to_remove;
		pg->to_remove = NULL;
		pg_disk_start(pg, DISK_REMOVE);
	} else if (pg->rescan_wanted) {
		pg->rescan_wanted = 0;
		pg_disk_start(pg, DISK_RESCAN);
	} else if (pg->connected && !pg->busy && pg->head) {
		struct pg_item *it = pg->head;
		pg->head = it->next;
		if (pg->head == NULL)
			pg->tail = NULL;
		pg->disk.uid = it->uid;
		free(it);
		pg_disk_start(pg, DISK_READ);
	}
}

/* Sends the UPDATE for uid, whose pending file names the icon name (read on a disk thread). */
static void pg_send_update(struct pg *pg, uint64_t uid, const char *name)
{
	if (!pg->connected || pg->busy) {
		pg_queue_uid(pg, uid);   /* the connection went while the file was read: later */
		return;
	}
	snprintf(pg->busy_name, sizeof(pg->busy_name), "%s", name);
	char uidtext[24];
	snprintf(uidtext, sizeof(uidtext), "%" PRIu64, uid);
	const char *params[2] = { pg->busy_name, uidtext };
	if (!PQsendQueryParams(pg->conn,
	    "UPDATE \"user\" SET icon = $1 WHERE uid = $2 "
	    "RETURNING uid, pwd, name, email, nick, \"desc\", sex, icon",
	    2, NULL, params, NULL, NULL, 0)) {
		pg_reset(pg, PQerrorMessage(pg->conn));
		pg_queue_uid(pg, uid);
		return;
	}
	PQflush(pg->conn);
	pg->busy = 1;
	pg->busy_uid = uid;
	ev_timer_set(&pg->query_timer, pg->conf->pg_timeout, 0.);
	ev_timer_start(pg->loop, &pg->query_timer);
}

static void pg_connect(struct pg *pg)
{
	pg->conn = PQconnectStart(pg->conf->pg_conninfo);
	if (pg->conn == NULL || PQstatus(pg->conn) == CONNECTION_BAD) {
		pg_reset(pg, pg->conn ? PQerrorMessage(pg->conn) : "out of memory");
		return;
	}
	ev_io_init(&pg->io, pg_on_io, PQsocket(pg->conn), EV_WRITE);
	pg->io.data = pg;
	ev_io_start(pg->loop, &pg->io);
	ev_timer_set(&pg->query_timer, pg->conf->pg_timeout, 0.);
	ev_timer_start(pg->loop, &pg->query_timer);
}

struct pg *pg_create(struct ev_loop *loop, struct pool *pool, const struct conf *conf, struct rds *redis,
    const char *pending_dir)
{
	struct pg *pg = calloc(1, sizeof(*pg));
	if (pg == NULL || json_writer_init(&pg->jw) < 0) {
		free(pg);
		return NULL;
	}
	pg->loop = loop;
	pg->pool = pool;
	pg->disk.pg = pg;
	pg->conf = conf;
	pg->redis = redis;
	snprintf(pg->pending_dir, sizeof(pg->pending_dir), "%s", pending_dir);
	ev_timer_init(&pg->retry, pg_on_retry, PG_RETRY_INTERVAL, PG_RETRY_INTERVAL);
	pg->retry.data = pg;
	ev_timer_start(loop, &pg->retry);
	ev_timer_init(&pg->query_timer, pg_on_query_timeout, conf->pg_timeout, 0.);
	pg->query_timer.data = pg;
	pg_rescan(pg);
	if (conf->pg_conninfo[0])
		pg_connect(pg);
	else
		log_warnx("postgres: no [postgres] conninfo: avatar icons are queued, not applied");
	return pg;
}

size_t pg_backlog(const struct pg *pg)
{
	return pg->backlog;
}

void pg_destroy(struct pg *pg)
{
	if (pg == NULL)
		return;
	pg_reset(pg, NULL);
	ev_timer_stop(pg->loop, &pg->retry);
	while (pg->head) {
		struct pg_item *it = pg->head;
		pg->head = it->next;
		free(it);
	}
	/* The pool is gone (pg.h): no disk job runs, and none hands this one back. */
	applied_free(pg->to_remove);
	applied_free(pg->disk.applied);
	free(pg->disk.uids);
	json_writer_free(&pg->jw);
	free(pg);
}

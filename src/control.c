/* control.c: answers the stats socket (show, disable, enable, reload) and HAProxy agent-checks. */
#include "config.h"
#include "control.h"
#include "escape.h"
#include "instance.h"
#include "buf.h"
#include "conf.h"
#include "log.h"
#include "stats.h"

#include <errno.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <yajl/yajl_gen.h>

#define CONTROL_MAX_LINE 1024
#define CONTROL_OUTPUT_CAP (1u << 20)   /* answers a stats client has not read yet */
#define CONTROL_MAX_SESSIONS 64          /* stats connections open at once */
#define CONTROL_SESSION_IDLE 60.0        /* seconds a stats connection may go without a byte either way */
#define CONTROL_MAX_PROCS STATS_MAX_SLOTS

struct control {
	struct ev_loop *loop;
	const struct conf *conf;
	struct stats_shm *shm;
	struct control_ops ops;
	int stats_fd, agent_fd;
	ev_io stats_io, agent_io;
	ev_timer stats_pause, agent_pause;   /* accepts stopped for a moment after EMFILE/ENFILE */
	int draining;
	int stopping;                 /* a stop began: drain for good, enable cannot undo it */
	double started;
	char stats_path[512];
	struct stats_session *sessions;   /* open stats connections: a forked child must close them */
	int nsessions;
	int answer_later;             /* the command just run answers later (reload) */
	struct stats_session *reload_waiter;   /* the connection whose reload has not answered yet */
};

/* One connection to the stats socket (resctl stats, socat...): lines in, answers out. */
struct stats_session {
	struct control *c;
	struct stats_session *prev, *next;
	int fd;
	ev_io io;
	ev_timer idle;
	ev_tstamp active;             /* the last byte in or out */
	struct buf in, out;
	int closing;
	int awaiting;                 /* its reload answers later: the lines after it wait */
};

static const struct {
	const char *name, *type, *help;
	size_t offset;
} counter_info[] = {
#define STATS_FIELD(n, t, h) { #n, t, h, offsetof(struct control_totals, n) },
	STATS_COUNTERS(STATS_FIELD)
#undef STATS_FIELD
};
#define NCOUNTERS (sizeof(counter_info) / sizeof(counter_info[0]))

static int is_type(size_t i, const char *type)
{
	return strcmp(counter_info[i].type, type) == 0;
}

static uint64_t slot_counter(const struct stats_proc *p, size_t i)
{
	/* struct stats_proc starts with the same fields in the same order, as atomics. */
	const _Atomic uint64_t *base = (const _Atomic uint64_t *)p;
	return atomic_load_explicit(&base[i], memory_order_relaxed);
}

static void sum_totals(const struct control *c, struct control_totals *t)
{
	memset(t, 0, sizeof(*t));
	uint64_t *fields = (uint64_t *)t;
	for (int s = 0; s < STATS_MAX_SLOTS; s++) {
		const struct stats_proc *p = &c->shm->procs[s];
		for (size_t i = 0; i < NCOUNTERS; i++)
			if (is_type(i, "counter"))
				fields[i] += slot_counter(p, i);
		for (int e = 0; e < STATS_ERR_COUNT; e++) {
			t->errors[e] += atomic_load_explicit(&p->errors[e], memory_order_relaxed);
			t->expected[e] += atomic_load_explicit(&p->expected[e], memory_order_relaxed);
		}
	}
	/* A gauge left behind by a process that exited (or by the previous generation after a reload) is stale. */
	struct control_proc procs[CONTROL_MAX_PROCS];
	int n = c->ops.list(c->ops.ctx, procs, CONTROL_MAX_PROCS);
	for (int k = 0; k < n; k++) {
		if (procs[k].pid <= 0)
			continue;
		const struct stats_proc *p = &c->shm->procs[procs[k].slot];
		for (size_t i = 0; i < NCOUNTERS; i++)
			if (is_type(i, "gauge"))
				fields[i] += slot_counter(p, i);
		int worker = strcmp(procs[k].role, "worker") == 0;
		t->processes++;
		t->workers += worker;
		t->redis_connected += atomic_load(&p->redis_up) != 0;
		t->storage_linked += worker && atomic_load(&p->storage_up) != 0;
	}
}


/* ---------------------------------------------------------------- JSON helpers */

static void gen_key(yajl_gen g, const char *k)
{
	yajl_gen_string(g, (const unsigned char *)k, strlen(k));
}

static void gen_kv_int(yajl_gen g, const char *k, long long v)
{
	gen_key(g, k);
	yajl_gen_integer(g, v);
}

static void gen_kv_str(yajl_gen g, const char *k, const char *v)
{
	gen_key(g, k);
	yajl_gen_string(g, (const unsigned char *)v, strlen(v));
}

static void gen_finish(yajl_gen g, struct buf *out)
{
	const unsigned char *p;
	size_t len;
	yajl_gen_get_buf(g, &p, &len);
	buf_append(out, p, len);
	buf_append(out, "\n", 1);
	yajl_gen_free(g);
}

/* {"1012": n, ...} of the codes counted at least once. */
static void gen_code_map(yajl_gen g, const char *key, const uint64_t *by_code)
{
	gen_key(g, key);
	yajl_gen_map_open(g);
	for (int e = 0; e < STATS_ERR_COUNT; e++) {
		if (by_code[e] == 0)
			continue;
		char code[8];
		snprintf(code, sizeof(code), "%d", STATS_ERR_BASE + e);
		gen_kv_int(g, code, (long long)by_code[e]);
	}
	yajl_gen_map_close(g);
}

/* ---------------------------------------------------------------- state */

static int storage_up(const struct control_proc *procs, int n)
{
	for (int i = 0; i < n; i++)
		if (strcmp(procs[i].role, "storage") == 0 && procs[i].pid > 0)
			return 1;
	return 0;
}

/* The storage process (slot 0) answers: its loop turned within the last STORAGE_STALL_MS (or
 * storage_timeout, if shorter), and its backend's ping neither failed nor hung (storage_process.c). A
 * storage process that is stopped (SIGSTOP), spinning, or cut off from its storage is down. */
#define STORAGE_STALL_MS 5000u
static int storage_answers(const struct control *c)
{
	const struct stats_proc *sp = &c->shm->procs[0];
	uint64_t bound = (uint64_t)c->conf->storage_timeout * 1000u;
	if (bound > STORAGE_STALL_MS)
		bound = STORAGE_STALL_MS;
	uint64_t alive = atomic_load(&sp->alive_ms), now = stats_mono_ms();
	return alive != 0 && now - alive <= bound + 1000u && atomic_load(&sp->backend_unreachable) == 0;
}

/* Every running worker reaches the backend through its own client (worker.c, "the backend
 * probe"). One that cannot fails the downloads the kernel hands it, a share of this node's
 * clients that the balancer cannot steer around (it sees nodes, not workers): the node is down
 * while any worker's probe fails, as while the storage process's does. */
static int workers_reach_backend(const struct control *c, const struct control_proc *procs, int n)
{
	for (int i = 0; i < n; i++)
		if (strcmp(procs[i].role, "worker") == 0 && procs[i].pid > 0 && procs[i].slot >= 0 &&
		    procs[i].slot < STATS_MAX_SLOTS && atomic_load(&c->shm->procs[procs[i].slot].backend_unreachable))
			return 0;
	return 1;
}

/* up, drain or down, as the agent-check and show info say it. */
static const char *service_state(const struct control *c, int *weight)
{
	struct control_proc procs[CONTROL_MAX_PROCS];
	int n = c->ops.list(c->ops.ctx, procs, CONTROL_MAX_PROCS);
	*weight = 0;
	if (!storage_up(procs, n) || !atomic_load(&c->shm->procs[0].redis_up) || !storage_answers(c) ||
	    !workers_reach_backend(c, procs, n))
		return "down";
	if (c->draining)
		return "drain";
	struct control_totals t;
	sum_totals(c, &t);
	double capacity = (double)c->conf->max_connections * c->conf->workers;
	int w = (int)(100.0 - 100.0 * (double)t.conn_current / capacity);
	*weight = w < 1 ? 1 : (w > 100 ? 100 : w);
	return "up";
}

/* ---------------------------------------------------------------- show commands */

static void show_info(struct control *c, struct buf *out, int json)
{
	struct control_totals t;
	sum_totals(c, &t);
	int weight;
	const char *state = service_state(c, &weight);
	long uptime = (long)(stats_wall_now() - c->started);
	if (json) {
		yajl_gen g = yajl_gen_alloc(NULL);
		yajl_gen_map_open(g);
		gen_kv_str(g, "name", "resourced");
		gen_kv_str(g, "version", PACKAGE_VERSION);
		gen_kv_int(g, "pid", getpid());
		gen_kv_int(g, "uptime_sec", uptime);
		gen_kv_int(g, "workers", c->conf->workers);
		gen_kv_str(g, "state", state);
		gen_kv_int(g, "weight", weight);
		gen_kv_int(g, "draining", c->draining);
		gen_kv_int(g, "processes_running", t.processes);
		gen_kv_int(g, "workers_running", t.workers);
		gen_kv_int(g, "redis_connected", t.redis_connected);
		gen_kv_int(g, "storage_linked", t.storage_linked);
		const uint64_t *fields = (const uint64_t *)&t;
		for (size_t i = 0; i < NCOUNTERS; i++)
			if (!is_type(i, "state"))
				gen_kv_int(g, counter_info[i].name, (long long)fields[i]);
		gen_code_map(g, "errors", t.errors);
		gen_code_map(g, "expected", t.expected);
		yajl_gen_map_close(g);
		gen_finish(g, out);
		return;
	}
	buf_printf(out, "Name: resourced\nVersion: %s\nPid: %d\nUptime_sec: %ld\nWorkers: %d\n",
	    PACKAGE_VERSION, (int)getpid(), uptime, c->conf->workers);
	buf_printf(out, "State: %s\nWeight: %d\nDraining: %d\n", state, weight, c->draining);
	buf_printf(out, "Processes_running: %d\nWorkers_running: %d\nRedis_connected: %d\nStorage_linked: %d\n",
	    t.processes, t.workers, t.redis_connected, t.storage_linked);
	const uint64_t *fields = (const uint64_t *)&t;
	for (size_t i = 0; i < NCOUNTERS; i++)
		if (!is_type(i, "state"))
			buf_printf(out, "%s: %llu\n", counter_info[i].name, (unsigned long long)fields[i]);
	for (int e = 0; e < STATS_ERR_COUNT; e++)
		if (t.errors[e])
			buf_printf(out, "errors_%d: %llu\n", STATS_ERR_BASE + e, (unsigned long long)t.errors[e]);
	for (int e = 0; e < STATS_ERR_COUNT; e++)
		if (t.expected[e])
			buf_printf(out, "expected_%d: %llu\n", STATS_ERR_BASE + e, (unsigned long long)t.expected[e]);
}

int control_processes(struct control *c, struct control_proc_view *out, int max)
{
	struct control_proc procs[CONTROL_MAX_PROCS];
	int n = c->ops.list(c->ops.ctx, procs, max < CONTROL_MAX_PROCS ? max : CONTROL_MAX_PROCS);
	double now = stats_wall_now();
	for (int i = 0; i < n; i++) {
		const struct control_proc *p = &procs[i];
		const struct stats_proc *sp = &c->shm->procs[p->slot];
		int worker = strcmp(p->role, "worker") == 0;
		out[i].proc = *p;
		out[i].uptime = p->pid ? (long)(now - p->started) : 0;
		out[i].connections = atomic_load(&sp->conn_current);
		/* A process that is down is connected to nothing, whatever its slot last said. */
		out[i].redis_up = p->pid > 0 && atomic_load(&sp->redis_up) != 0;
		out[i].storage_up = !worker ? -1 : p->pid > 0 && atomic_load(&sp->storage_up) != 0;
	}
	return n;
}

static void show_workers(struct control *c, struct buf *out, int json)
{
	struct control_proc_view procs[CONTROL_MAX_PROCS];
	int n = control_processes(c, procs, CONTROL_MAX_PROCS);
	yajl_gen g = NULL;
	if (json) {
		g = yajl_gen_alloc(NULL);
		yajl_gen_array_open(g);
	} else {
		buf_printf(out, "# role number slot pid state uptime_sec restarts connections redis_up storage_up\n");
	}
	for (int i = 0; i < n; i++) {
		const struct control_proc *p = &procs[i].proc;
		long uptime = procs[i].uptime;
		unsigned long long conns = procs[i].connections;
		int redis_up = procs[i].redis_up;
		int worker = procs[i].storage_up >= 0;
		int storage_up = procs[i].storage_up > 0;
		if (json) {
			yajl_gen_map_open(g);
			gen_kv_str(g, "role", p->role);
			gen_kv_int(g, "number", p->number);
			gen_kv_int(g, "slot", p->slot);
			gen_kv_int(g, "pid", p->pid);
			gen_kv_str(g, "state", p->state);
			gen_kv_int(g, "uptime_sec", uptime);
			gen_kv_int(g, "restarts", p->restarts);
			gen_kv_int(g, "connections", (long long)conns);
			gen_kv_int(g, "redis_up", redis_up);
			if (worker)
				gen_kv_int(g, "storage_up", storage_up);
			yajl_gen_map_close(g);
		} else {
			buf_printf(out, "%s %d %d %d %s %ld %d %llu %d %s\n", p->role, p->number, p->slot, (int)p->pid,
			    p->state, uptime, p->restarts, conns, redis_up, worker ? (storage_up ? "1" : "0") : "-");
		}
	}
	if (json) {
		yajl_gen_array_close(g);
		gen_finish(g, out);
	}
}

static void show_stat(struct control *c, struct buf *out, int json)
{
	struct control_proc procs[CONTROL_MAX_PROCS];
	int n = c->ops.list(c->ops.ctx, procs, CONTROL_MAX_PROCS);
	yajl_gen g = NULL;
	if (json) {
		g = yajl_gen_alloc(NULL);
		yajl_gen_array_open(g);
	} else {
		buf_printf(out, "# role,number,pid");
		for (size_t i = 0; i < NCOUNTERS; i++)
			buf_printf(out, ",%s", counter_info[i].name);
		buf_printf(out, ",errors,expected\n");
	}
	for (int i = 0; i < n; i++) {
		const struct control_proc *p = &procs[i];
		const struct stats_proc *sp = &c->shm->procs[p->slot];
		uint64_t errors[STATS_ERR_COUNT], expected[STATS_ERR_COUNT], errors_sum = 0, expected_sum = 0;
		for (int e = 0; e < STATS_ERR_COUNT; e++) {
			errors_sum += errors[e] = atomic_load_explicit(&sp->errors[e], memory_order_relaxed);
			expected_sum += expected[e] = atomic_load_explicit(&sp->expected[e], memory_order_relaxed);
		}
		if (json) {
			yajl_gen_map_open(g);
			gen_kv_str(g, "role", p->role);
			gen_kv_int(g, "number", p->number);
			gen_kv_int(g, "pid", p->pid);
			for (size_t k = 0; k < NCOUNTERS; k++)
				gen_kv_int(g, counter_info[k].name, (long long)slot_counter(sp, k));
			gen_code_map(g, "errors", errors);
			gen_code_map(g, "expected", expected);
			yajl_gen_map_close(g);
		} else {
			buf_printf(out, "%s,%d,%d", p->role, p->number, (int)p->pid);
			for (size_t k = 0; k < NCOUNTERS; k++)
				buf_printf(out, ",%llu", (unsigned long long)slot_counter(sp, k));
			buf_printf(out, ",%llu,%llu\n", (unsigned long long)errors_sum, (unsigned long long)expected_sum);
		}
	}
	if (json) {
		yajl_gen_array_close(g);
		gen_finish(g, out);
	}
}

void control_transfers(struct control *c, void (*each)(void *ctx, const struct control_transfer *t), void *ctx)
{
	double now = stats_wall_now();
	for (int s = 0; s < STATS_MAX_SLOTS; s++) {
		for (int i = 0; i < STATS_TRANSFERS; i++) {
			struct stats_transfer t;
			if (!stats_transfer_read(&c->shm->procs[s].transfers[i], &t))
				continue;
			t.name[sizeof(t.name) - 1] = '\0';
			struct control_transfer view = {
				.kind = t.kind == 'D' ? "download" : t.kind == 'A' ? "avatar" : "upload",
				.uid = t.uid, .name = t.name, .bytes = t.bytes, .total = t.total, .age = now - t.started,
			};
			view.rate = view.age > 0.001 ? (double)t.bytes / view.age : 0;
			each(ctx, &view);
		}
	}
}

struct transfer_out {
	struct buf *out;
	yajl_gen g;
};

static void show_transfer(void *ctx, const struct control_transfer *t)
{
	struct transfer_out *to = ctx;
	yajl_gen g = to->g;
	if (g) {
		yajl_gen_map_open(g);
		gen_kv_str(g, "kind", t->kind);
		gen_kv_int(g, "uid", (long long)t->uid);
		gen_kv_str(g, "name", t->name);
		gen_kv_int(g, "bytes", (long long)t->bytes);
		gen_kv_int(g, "total", (long long)t->total);
		gen_kv_int(g, "rate", (long long)t->rate);
		gen_kv_int(g, "age_sec", (long long)t->age);
		yajl_gen_map_close(g);
	} else {
		/* Quoted and escaped: names may hold spaces and quotes. */
		char name[ESCAPE_SIZE(STATS_NAME_MAX)];
		escape_quoted(name, sizeof(name), t->name, strlen(t->name));
		buf_printf(to->out, "%s %llu \"%s\" %llu %llu %.0f %.0f\n", t->kind, (unsigned long long)t->uid, name,
		    (unsigned long long)t->bytes, (unsigned long long)t->total, t->rate, t->age);
	}
}

static void show_transfers(struct control *c, struct buf *out, int json)
{
	struct transfer_out to = { out, NULL };
	if (json) {
		to.g = yajl_gen_alloc(NULL);
		yajl_gen_array_open(to.g);
	} else {
		buf_printf(out, "# kind uid name bytes total rate_bytes_per_sec age_sec\n");
	}
	control_transfers(c, show_transfer, &to);
	if (json) {
		yajl_gen_array_close(to.g);
		gen_finish(to.g, out);
	}
}

/* After a reload the old generation has the same role and number as the new one until it exits:
 * per-process series leave it out so that no two series have the same labels. */
static int retiring(const struct control_proc *p)
{
	return strcmp(p->state, "retiring") == 0;
}

static void show_metrics(struct control *c, struct buf *out)
{
	struct control_totals t;
	sum_totals(c, &t);
	struct control_proc procs[CONTROL_MAX_PROCS];
	int n = c->ops.list(c->ops.ctx, procs, CONTROL_MAX_PROCS);
	double now = stats_wall_now();
	const uint64_t *fields = (const uint64_t *)&t;
	for (size_t i = 0; i < NCOUNTERS; i++) {
		const char *name = counter_info[i].name;
		size_t nlen = strlen(name);
		int has_total = nlen > 6 && strcmp(name + nlen - 6, "_total") == 0;
		const char *suffix = is_type(i, "counter") && !has_total ? "_total" : "";
		const char *type = is_type(i, "counter") ? "counter" : "gauge";
		const char *scope = is_type(i, "counter") ? " (all processes)" : is_type(i, "gauge") ? " (running processes)" : "";
		buf_printf(out, "# HELP resourced_%s%s %s%s\n# TYPE resourced_%s%s %s\n", name, suffix, counter_info[i].help,
		    scope, name, suffix, type);
		if (!is_type(i, "state")) {
			buf_printf(out, "resourced_%s%s %llu\n", name, suffix, (unsigned long long)fields[i]);
			continue;
		}
		/* One series per process: a sum of 0/1 states would say nothing. storage_up is a worker's link. */
		for (int k = 0; k < n; k++) {
			if (retiring(&procs[k]) || (strcmp(name, "storage_up") == 0 && strcmp(procs[k].role, "worker") != 0))
				continue;
			uint64_t v = procs[k].pid > 0 ? slot_counter(&c->shm->procs[procs[k].slot], i) : 0;
			buf_printf(out, "resourced_%s{role=\"%s\",number=\"%d\"} %llu\n", name, procs[k].role,
			    procs[k].number, (unsigned long long)v);
		}
	}
	buf_printf(out, "# HELP resourced_responses_error_total Responses by error code (expected answers apart)\n"
	    "# TYPE resourced_responses_error_total counter\n");
	for (int e = 0; e < STATS_ERR_COUNT; e++)
		if (t.errors[e])
			buf_printf(out, "resourced_responses_error_total{code=\"%d\"} %llu\n", STATS_ERR_BASE + e,
			    (unsigned long long)t.errors[e]);
	buf_printf(out, "# HELP resourced_responses_expected_total Responses with a code healthy traffic gets "
	    "(1012 to a sync before a fresh upload)\n# TYPE resourced_responses_expected_total counter\n");
	for (int e = 0; e < STATS_ERR_COUNT; e++)
		if (t.expected[e])
			buf_printf(out, "resourced_responses_expected_total{code=\"%d\"} %llu\n", STATS_ERR_BASE + e,
			    (unsigned long long)t.expected[e]);
	buf_printf(out, "# HELP resourced_process_up 1 when the process is running\n# TYPE resourced_process_up gauge\n");
	for (int i = 0; i < n; i++)
		if (!retiring(&procs[i]))
			buf_printf(out, "resourced_process_up{role=\"%s\",number=\"%d\"} %d\n", procs[i].role, procs[i].number,
			    procs[i].pid > 0);
	buf_printf(out, "# HELP resourced_process_restarts_total Respawns of the process\n"
	    "# TYPE resourced_process_restarts_total counter\n");
	for (int i = 0; i < n; i++)
		if (!retiring(&procs[i]))
			buf_printf(out, "resourced_process_restarts_total{role=\"%s\",number=\"%d\"} %d\n", procs[i].role,
			    procs[i].number, procs[i].restarts);
	buf_printf(out, "# HELP resourced_process_uptime_seconds Seconds since the process started\n"
	    "# TYPE resourced_process_uptime_seconds gauge\n");
	for (int i = 0; i < n; i++)
		if (!retiring(&procs[i]))
			buf_printf(out, "resourced_process_uptime_seconds{role=\"%s\",number=\"%d\"} %.0f\n", procs[i].role,
			    procs[i].number, procs[i].pid ? now - procs[i].started : 0);
	int weight;
	const char *state = service_state(c, &weight);
	buf_printf(out, "# HELP resourced_draining 1 while disabled or stopping\n# TYPE resourced_draining gauge\n"
	    "resourced_draining %d\n# HELP resourced_up 1 when storage and Redis are available\n"
	    "# TYPE resourced_up gauge\nresourced_up %d\n", c->draining, strcmp(state, "down") != 0);
}

static void show_metrics_or_json(struct control *c, struct buf *out, int json)
{
	if (json)
		show_info(c, out, 1);   /* the same numbers as show info json */
	else
		show_metrics(c, out);
}

static void command_disable(struct control *c, struct buf *out, int json)
{
	(void)json;
	control_set_draining(c, 1);
	log_info("stats socket: disabled (draining)");
	buf_printf(out, "OK draining\n");
}

static void command_enable(struct control *c, struct buf *out, int json)
{
	(void)json;
	if (c->stopping) {
		buf_printf(out, "ERROR stopping: the agent answers drain until the server exits\n");
		return;
	}
	control_set_draining(c, 0);
	log_info("stats socket: enabled");
	buf_printf(out, "OK enabled\n");
}

static void command_reload(struct control *c, struct buf *out, int json)
{
	(void)json;
	char msg[512];
	log_info("stats socket: reloading");   /* as SIGHUP says it: the lines that follow have their cause */
	int rc = c->ops.reload(c->ops.ctx, msg, sizeof(msg));
	if (rc > 0)
		c->answer_later = 1;   /* control_reload_done */
	else
		buf_printf(out, "%s %s\n", rc == 0 ? "OK" : "ERROR", msg);
}

static void command_help(struct control *c, struct buf *out, int json);

/* How a command's words after the first are read. */
enum command_args {
	ARGS_NONE,          /* none */
	ARGS_ANY,           /* any, ignored */
	ARGS_OBJECT,        /* the object (the second word), then an optional "json" */
};

/* Every stats socket command; help is generated from this table. */
static const struct control_command {
	const char *verb;
	const char *object;           /* ARGS_OBJECT: the second word */
	enum command_args args;
	void (*run)(struct control *c, struct buf *out, int json);
	const char *help;
} commands[] = {
	{ "help", NULL, ARGS_ANY, command_help, "this list" },
	{ "show", "info", ARGS_OBJECT, show_info, "version, uptime, state and totals" },
	{ "show", "stat", ARGS_OBJECT, show_stat, "counters per process" },
	{ "show", "workers", ARGS_OBJECT, show_workers, "processes: role, pid, state, uptime, restarts, links up" },
	{ "show", "transfers", ARGS_OBJECT, show_transfers, "uploads and downloads in flight" },
	{ "show", "metrics", ARGS_OBJECT, show_metrics_or_json,
	  "Prometheus text exposition (json: same as show info json)" },
	{ "disable", NULL, ARGS_NONE, command_disable, "drain: the agent-check answers drain" },
	{ "enable", NULL, ARGS_NONE, command_enable, "undo disable" },
	{ "reload", NULL, ARGS_NONE, command_reload, "re-read the configuration (like SIGHUP)" },
};

static void command_help(struct control *c, struct buf *out, int json)
{
	(void)c;
	(void)json;
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		const struct control_command *k = &commands[i];
		char usage[64];
		snprintf(usage, sizeof(usage), "%s%s%s%s", k->verb, k->object ? " " : "", k->object ? k->object : "",
		    k->args == ARGS_OBJECT ? " [json]" : "");
		buf_printf(out, "%-21s %s\n", usage, k->help);
	}
}

static void control_command(struct control *c, char *line, struct buf *out)
{
	char *argv[4] = { 0 };
	int argc = 0;
	for (char *tok = strtok(line, " \t\r"); tok && argc < 4; tok = strtok(NULL, " \t\r"))
		argv[argc++] = tok;
	if (argc == 0)
		return;
	int json = argc >= 3 && strcmp(argv[2], "json") == 0;
	/* An object verb in a well-formed line (its object, then nothing or json) with an unknown object. */
	int unknown_object = 0;
	const struct control_command *cmd = NULL;
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]) && cmd == NULL; i++) {
		const struct control_command *k = &commands[i];
		if (strcmp(argv[0], k->verb) != 0)
			continue;
		if (k->args == ARGS_ANY || (k->args == ARGS_NONE && argc == 1))
			cmd = k;
		else if (k->args == ARGS_OBJECT && argc >= 2 && (argc == 2 || json) && strcmp(argv[1], k->object) == 0)
			cmd = k;
		else if (k->args == ARGS_OBJECT && argc >= 2 && (argc == 2 || json))
			unknown_object = 1;
	}
	if (cmd != NULL) {
		c->answer_later = 0;
		cmd->run(c, out, json);
		if (c->answer_later)
			return;   /* no answer, no empty line yet */
	} else {
		/* Echoed escaped, as every string not ours: raw bytes could drive the reader's terminal. */
		char verb[ESCAPE_SIZE(64)], object[ESCAPE_SIZE(64)];
		escape_quoted(verb, sizeof(verb), argv[0], strnlen(argv[0], 64));
		if (unknown_object) {
			escape_quoted(object, sizeof(object), argv[1], strnlen(argv[1], 64));
			buf_printf(out, "Unknown command: %s %s (try help)\n", verb, object);
		} else {
			buf_printf(out, "Unknown command: %s (try help)\n", verb);
		}
	}
	buf_append(out, "\n", 1);   /* an empty line ends every answer */
}

/* ---------------------------------------------------------------- stats socket I/O */

static void session_free(struct stats_session *ss)
{
	if (ss->c->reload_waiter == ss)
		ss->c->reload_waiter = NULL;   /* the reload goes on; its answer has nobody to go to */
	if (ss->prev)
		ss->prev->next = ss->next;
	else
		ss->c->sessions = ss->next;
	if (ss->next)
		ss->next->prev = ss->prev;
	ev_io_stop(ss->c->loop, &ss->io);
	ev_timer_stop(ss->c->loop, &ss->idle);
	ss->c->nsessions--;
	close(ss->fd);
	buf_free(&ss->in);
	buf_free(&ss->out);
	free(ss);
}

/* One line of the client's: its answer, or (reload) a wait for it. */
static void session_command(struct stats_session *ss, char *line)
{
	control_command(ss->c, line, &ss->out);
	if (ss->c->answer_later) {
		ss->c->answer_later = 0;
		ss->awaiting = 1;
		ss->c->reload_waiter = ss;
	}
}

/* Runs the complete lines buffered while the answers waiting stay under CONTROL_OUTPUT_CAP: a client
 * that pipelines commands and never reads costs that much of the master's memory, never more. A line
 * whose answer comes later (reload) holds the next ones back: answers go in the order of the lines. */
static void session_run_lines(struct stats_session *ss)
{
	uint8_t *nl;
	while (!ss->awaiting && buf_len(&ss->out) < CONTROL_OUTPUT_CAP && buf_len(&ss->in) > 0 &&
	    (nl = memchr(buf_head(&ss->in), '\n', buf_len(&ss->in))) != NULL) {
		size_t len = (size_t)(nl - buf_head(&ss->in));
		char line[CONTROL_MAX_LINE];
		if (len >= sizeof(line))
			len = sizeof(line) - 1;
		memcpy(line, buf_head(&ss->in), len);
		line[len] = '\0';
		buf_consume(&ss->in, (size_t)(nl - buf_head(&ss->in)) + 1);
		session_command(ss, line);
	}
	if (ss->awaiting || buf_len(&ss->out) >= CONTROL_OUTPUT_CAP ||
	    (buf_len(&ss->in) > 0 && memchr(buf_head(&ss->in), '\n', buf_len(&ss->in)) != NULL))
		return;   /* lines left for when the client has read */
	if (buf_len(&ss->in) >= CONTROL_MAX_LINE) {
		buf_printf(&ss->out, "Line too long\n\n");
		buf_free(&ss->in);
		ss->closing = 1;
	} else if (ss->closing && buf_len(&ss->in) > 0) {
		/* A last command without a newline. */
		char line[CONTROL_MAX_LINE];
		size_t len = buf_len(&ss->in);
		memcpy(line, buf_head(&ss->in), len);
		line[len] = '\0';
		buf_free(&ss->in);
		session_command(ss, line);
	}
}

static void session_on_io(struct ev_loop *loop, ev_io *io, int revents)
{
	struct stats_session *ss = io->data;
	if ((revents & EV_READ) && !ss->closing && buf_len(&ss->in) < CONTROL_MAX_LINE) {
		uint8_t *p = buf_reserve(&ss->in, CONTROL_MAX_LINE);
		ssize_t n = p ? recv(ss->fd, p, CONTROL_MAX_LINE, 0) : -1;
		if (n == 0) {
			ss->closing = 1;
		} else if (n < 0) {
			if (errno != EAGAIN && errno != EINTR) {
				session_free(ss);
				return;
			}
		} else {
			buf_commit(&ss->in, (size_t)n);
			ss->active = ev_now(loop);
		}
	}
	session_run_lines(ss);
	while (buf_len(&ss->out) > 0) {
		ssize_t n = send(ss->fd, buf_head(&ss->out), buf_len(&ss->out), MSG_NOSIGNAL);
		if (n > 0) {
			buf_consume(&ss->out, (size_t)n);
			ss->active = ev_now(loop);
		} else if (n < 0 && errno == EINTR) {
			continue;
		} else if (n < 0 && errno == EAGAIN) {
			break;
		} else {
			session_free(ss);
			return;
		}
		if (buf_len(&ss->out) < CONTROL_OUTPUT_CAP)
			session_run_lines(ss);   /* room again: the lines parked behind a full output */
	}
	if (ss->closing && !ss->awaiting && buf_len(&ss->out) == 0 && buf_len(&ss->in) == 0) {
		session_free(ss);
		return;
	}
	/* Reading stops while the answers are at the cap or a whole line's worth waits unrun. */
	int readable = !ss->closing && buf_len(&ss->out) < CONTROL_OUTPUT_CAP && buf_len(&ss->in) < CONTROL_MAX_LINE;
	ev_io_stop(loop, io);
	ev_io_set(io, ss->fd, (readable ? EV_READ : 0) | (buf_len(&ss->out) ? EV_WRITE : 0));
	ev_io_start(loop, io);
}

#define ACCEPT_PAUSE 0.5   /* seconds */

/* Out of descriptors, the listening socket stays readable: waiting on it again at once would spin. */
static void accept_failed(struct control *c, ev_io *io, ev_timer *pause, const char *what)
{
	if (errno != EMFILE && errno != ENFILE && errno != ENOBUFS && errno != ENOMEM)
		return;
	log_warn("accept4() on the %s failed: pausing its accepts for %.1f s", what, ACCEPT_PAUSE);
	ev_io_stop(c->loop, io);
	ev_timer_set(pause, ACCEPT_PAUSE, 0.);   /* a fired one-shot timer restarts at once otherwise */
	ev_timer_start(c->loop, pause);
}

static void on_accept_pause(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)revents;
	ev_io_start(loop, (ev_io *)t->data);
}

/* A connection that neither sends nor reads for CONTROL_SESSION_IDLE goes: idle ones cannot pile up
 * to CONTROL_MAX_SESSIONS and keep the operator out for good. */
static void session_on_idle(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)revents;
	struct stats_session *ss = t->data;
	if (ss->awaiting)
		ss->active = ev_now(loop);   /* it waits for us, not the other way round (storage_timeout bounds it) */
	double left = ss->active + CONTROL_SESSION_IDLE - ev_now(loop);
	if (left <= 0) {
		session_free(ss);
		return;
	}
	ev_timer_set(t, left, 0.);
	ev_timer_start(loop, t);
}

static void stats_on_accept(struct ev_loop *loop, ev_io *io, int revents)
{
	(void)revents;
	struct control *c = io->data;
	int fd = accept4(c->stats_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd < 0) {
		accept_failed(c, io, &c->stats_pause, "stats socket");
		return;
	}
	static const char full[] = "ERROR too many stats connections: try again later\n\n";
	struct stats_session *ss = c->nsessions < CONTROL_MAX_SESSIONS ? calloc(1, sizeof(*ss)) : NULL;
	if (ss == NULL) {
		ssize_t w = send(fd, full, sizeof(full) - 1, MSG_NOSIGNAL);
		(void)w;
		close(fd);
		return;
	}
	c->nsessions++;
	ss->c = c;
	ss->fd = fd;
	ss->active = ev_now(loop);
	ev_timer_init(&ss->idle, session_on_idle, CONTROL_SESSION_IDLE, 0.);
	ss->idle.data = ss;
	ev_timer_start(loop, &ss->idle);
	ss->next = c->sessions;
	if (c->sessions)
		c->sessions->prev = ss;
	c->sessions = ss;
	ev_io_init(&ss->io, session_on_io, fd, EV_READ);
	ss->io.data = ss;
	ev_io_start(loop, &ss->io);
}

/* The agent answers one line per connection and closes. */
static void agent_on_accept(struct ev_loop *loop, ev_io *io, int revents)
{
	(void)loop;
	(void)revents;
	struct control *c = io->data;
	int fd = accept4(c->agent_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd < 0) {
		accept_failed(c, io, &c->agent_pause, "agent listener");
		return;
	}
	int weight;
	const char *state = service_state(c, &weight);
	char line[64];
	/* HAProxy leaves DRAIN only on "ready"; "up" alone would keep a re-enabled server drained. */
	int n = strcmp(state, "up") == 0 ? snprintf(line, sizeof(line), "up ready %d%%\n", weight)
	    : snprintf(line, sizeof(line), "%s\n", state);
	ssize_t w = send(fd, line, (size_t)n, MSG_NOSIGNAL);
	(void)w;
	close(fd);
}

static int listen_unix(const char *path)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	if (snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", path) >= (int)sizeof(sun.sun_path))
		return -1;
	/* Never take a socket a live process (another instance) answers on; a stale one goes. */
	if (instance_unix_socket_live(path)) {
		errno = EADDRINUSE;
		return -1;
	}
	unlink(path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	mode_t old = umask(0117);
	int rc = bind(fd, (struct sockaddr *)&sun, sizeof(sun));
	umask(old);
	if (rc < 0 || chmod(path, 0660) < 0 || listen(fd, 64) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

const char *split_host_port(const char *hostport, char *host, size_t hostlen)
{
	const char *colon = strrchr(hostport, ':');
	if (colon == NULL)
		return NULL;
	const char *start = hostport, *end = colon;
	if (*start == '[' && end > start && end[-1] == ']') {   /* [ipv6]:port, as [server] listen takes */
		start++;
		end--;
	}
	if ((size_t)(end - start) >= hostlen)
		return NULL;
	memcpy(host, start, (size_t)(end - start));
	host[end - start] = '\0';
	return colon + 1;
}

int listen_tcp(const char *hostport)
{
	char host[256];
	const char *port = split_host_port(hostport, host, sizeof(host));
	if (port == NULL)
		return -1;
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE };
	struct addrinfo *res;
	if (getaddrinfo(host[0] ? host : NULL, port, &hints, &res) != 0)
		return -1;
	int fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	int one = 1;
	if (fd >= 0)
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (fd < 0 || bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, 64) < 0) {
		if (fd >= 0)
			close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	return fd;
}

struct control *control_create(struct ev_loop *loop, const struct conf *conf, struct stats_shm *shm,
    const struct control_ops *ops)
{
	struct control *c = calloc(1, sizeof(*c));
	if (c == NULL)
		return NULL;
	c->loop = loop;
	c->conf = conf;
	c->shm = shm;
	c->ops = *ops;
	c->stats_fd = c->agent_fd = -1;
	c->started = stats_wall_now();
	ev_timer_init(&c->stats_pause, on_accept_pause, ACCEPT_PAUSE, 0.);
	c->stats_pause.data = &c->stats_io;
	ev_timer_init(&c->agent_pause, on_accept_pause, ACCEPT_PAUSE, 0.);
	c->agent_pause.data = &c->agent_io;
	if (conf->stats_socket[0]) {
		c->stats_fd = listen_unix(conf->stats_socket);
		if (c->stats_fd < 0)
			fatal("stats socket %s%s", conf->stats_socket,
			    errno == EADDRINUSE ? ": a live process (another instance?) listens there" : "");
		snprintf(c->stats_path, sizeof(c->stats_path), "%s", conf->stats_socket);
		ev_io_init(&c->stats_io, stats_on_accept, c->stats_fd, EV_READ);
		c->stats_io.data = c;
		ev_io_start(loop, &c->stats_io);
	}
	if (conf->agent_listen[0]) {
		c->agent_fd = listen_tcp(conf->agent_listen);
		if (c->agent_fd < 0)
			fatal("agent_listen %s", conf->agent_listen);
		ev_io_init(&c->agent_io, agent_on_accept, c->agent_fd, EV_READ);
		c->agent_io.data = c;
		ev_io_start(loop, &c->agent_io);
	}
	return c;
}

void control_set_conf(struct control *c, const struct conf *conf)
{
	c->conf = conf;
}

void control_set_draining(struct control *c, int on)
{
	c->draining = on;
}

void control_reload_done(struct control *c, int ok, const char *msg)
{
	struct stats_session *ss = c->reload_waiter;
	if (ss == NULL)
		return;
	c->reload_waiter = NULL;
	ss->awaiting = 0;
	buf_printf(&ss->out, "%s %s\n\n", ok ? "OK" : "ERROR", msg);
	ss->active = ev_now(c->loop);
	/* Sent, and the lines that waited behind it run, as when the client is writable. */
	ev_feed_event(c->loop, &ss->io, EV_WRITE);
}

void control_set_stopping(struct control *c)
{
	c->stopping = 1;
	c->draining = 1;
}

void control_destroy(struct control *c)
{
	if (c == NULL)
		return;
	ev_timer_stop(c->loop, &c->stats_pause);
	ev_timer_stop(c->loop, &c->agent_pause);
	if (c->stats_fd >= 0) {
		ev_io_stop(c->loop, &c->stats_io);
		close(c->stats_fd);
		unlink(c->stats_path);
	}
	if (c->agent_fd >= 0) {
		ev_io_stop(c->loop, &c->agent_io);
		close(c->agent_fd);
	}
	while (c->sessions)
		session_free(c->sessions);
	free(c);
}

void control_close_inherited(struct control *c)
{
	if (c == NULL)
		return;
	if (c->stats_fd >= 0)
		close(c->stats_fd);
	if (c->agent_fd >= 0)
		close(c->agent_fd);
	c->stats_fd = c->agent_fd = -1;
	/* A child forked while a stats session waits (reload) would otherwise hold its connection open:
	 * its peer would never see the end of the answer.
	 * The loop is the master's: leave its watchers alone, free only this copy's memory. */
	while (c->sessions) {
		struct stats_session *ss = c->sessions;
		c->sessions = ss->next;
		close(ss->fd);
		buf_free(&ss->in);
		buf_free(&ss->out);
		free(ss);
	}
	c->nsessions = 0;
}

/* ---------------------------------------------------------------- for the HTTP listener (http.c) */

const char *control_state(struct control *c, int *weight)
{
	return service_state(c, weight);
}

void control_sum(struct control *c, struct control_totals *t)
{
	sum_totals(c, t);
}

long control_uptime(const struct control *c)
{
	return (long)(stats_wall_now() - c->started);
}

void control_report(struct control *c, enum control_report what, int json, struct buf *out)
{
	switch (what) {
	case CONTROL_INFO:
		show_info(c, out, json);
		break;
	case CONTROL_WORKERS:
		show_workers(c, out, json);
		break;
	case CONTROL_TRANSFERS:
		show_transfers(c, out, json);
		break;
	case CONTROL_METRICS:
		show_metrics(c, out);
		break;
	}
}

/* control.h: the master's stats socket (HAProxy-style commands) and HAProxy agent-check listener. */
#ifndef RESOURCED_CONTROL_H
#define RESOURCED_CONTROL_H

#include "stats.h"

#include <ev.h>
#include <stdint.h>
#include <sys/types.h>

struct buf;
struct conf;

/* One supervised process as the stats commands show it. */
struct control_proc {
	const char *role;             /* "storage" or "worker" */
	int number;                   /* worker number; 0 for storage */
	int slot;                     /* its stats slot */
	pid_t pid;                    /* 0 while down */
	double started;               /* wall-clock seconds of the current start */
	int restarts;
	const char *state;            /* running, retiring, down */
};

/* What the master lends to the control module. */
struct control_ops {
	int (*list)(void *ctx, struct control_proc *out, int max);
	/* 0 when the new config took, -1 when refused (msg says why either way); 1 when the answer
	 * comes later, through control_reload_done (the new storage root is being checked). */
	int (*reload)(void *ctx, char *msg, size_t msglen);
	void *ctx;
};

struct control;

struct control *control_create(struct ev_loop *loop, const struct conf *conf, struct stats_shm *shm,
    const struct control_ops *ops);
/* A reload may change max_connections or the agent address. */
void control_set_conf(struct control *c, const struct conf *conf);
/* Draining: agent-check says drain (disable, graceful stop). */
void control_set_draining(struct control *c, int on);
/* Stopping (graceful or not): drain until the end; `enable` is refused. */
void control_set_stopping(struct control *c);
/* The answer of a reload whose ops.reload returned 1: to the stats connection that asked, if any
 * (a reload from SIGHUP has none). */
void control_reload_done(struct control *c, int ok, const char *msg);
void control_destroy(struct control *c);
/* In a forked child: closes the inherited sockets without removing the stats socket file. */
void control_close_inherited(struct control *c);

/* ---- What the stats socket shows, for the HTTP listener (http.c) to show the same. */

/* Totals: counters over every slot (processes that exited included: counters only grow), gauges over
 * the running processes; states (redis_up, storage_up) have no sum and are left 0. */
struct control_totals {
#define STATS_FIELD(name, type, help) uint64_t name;
	STATS_COUNTERS(STATS_FIELD)
#undef STATS_FIELD
	uint64_t errors[STATS_ERR_COUNT];
	uint64_t expected[STATS_ERR_COUNT];
	/* Of the running processes: how many, and how many are connected. */
	int processes, workers, redis_connected, storage_linked;
};

/* One process as show workers prints it. */
struct control_proc_view {
	struct control_proc proc;
	long uptime;                  /* seconds; 0 while down */
	unsigned long long connections;
	int redis_up;                 /* 0 while down, whatever its slot last said */
	int storage_up;               /* a worker's link; -1 for the storage process */
};

/* One transfer in flight as show transfers prints it; name is the client's, unescaped. */
struct control_transfer {
	const char *kind;             /* upload, avatar, download */
	uint64_t uid;
	const char *name;
	uint64_t bytes, total;
	double rate, age;             /* bytes per second, seconds */
};

enum control_report { CONTROL_INFO, CONTROL_WORKERS, CONTROL_TRANSFERS, CONTROL_METRICS };

/* up, drain or down and the weight, as the agent-check answers them. */
const char *control_state(struct control *c, int *weight);
void control_sum(struct control *c, struct control_totals *t);
long control_uptime(const struct control *c);
int control_processes(struct control *c, struct control_proc_view *out, int max);
void control_transfers(struct control *c, void (*each)(void *ctx, const struct control_transfer *t), void *ctx);
/* Appends the answer of show info/workers/transfers/metrics [json] to out. */
void control_report(struct control *c, enum control_report what, int json, struct buf *out);
/* host:port split at the last colon, the host unbracketed for [ipv6]:port: the port, with the host
 * in host (empty for ":port"), or NULL when there is no colon or the host does not fit. */
const char *split_host_port(const char *hostport, char *host, size_t hostlen);
/* A listening TCP socket on host:port or [ipv6]:port (split_host_port), or -1. */
int listen_tcp(const char *hostport);

#endif

/* control.h: the master's stats socket (HAProxy-style commands) and HAProxy agent-check listener. */
#ifndef RESOURCED_CONTROL_H
#define RESOURCED_CONTROL_H

#include <ev.h>
#include <sys/types.h>

struct conf;
struct stats_shm;

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
	int (*reload)(void *ctx, char *msg, size_t msglen);   /* 0 when the new config took */
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
void control_destroy(struct control *c);
/* In a forked child: closes the inherited sockets without removing the stats socket file. */
void control_close_inherited(struct control *c);

#endif

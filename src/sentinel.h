/* sentinel.h: finds the Redis master through Redis Sentinel and reports failovers, without blocking the loop. */
#ifndef RESOURCED_SENTINEL_H
#define RESOURCED_SENTINEL_H

#include <ev.h>

struct conf;
struct sentinel;

struct sentinel_ops {
	/* The master's address, or host NULL when no sentinel could name one
	 * (the caller retries later with sentinel_discover). */
	void (*on_master)(void *data, const char *host, int port);
	/* A sentinel announced +switch-master for our master: reconnect. */
	void (*on_switch)(void *data, const char *host, int port);
	void *data;
};

/* NULL when conf has no [redis] sentinels. */
struct sentinel *sentinel_create(struct ev_loop *loop, const struct conf *conf, const struct sentinel_ops *ops);
/* Asks the sentinels in turn (SENTINEL get-master-addr-by-name); the answer
 * comes through on_master. A discovery already under way is not restarted. */
void sentinel_discover(struct sentinel *s);
void sentinel_destroy(struct sentinel *s);

#endif

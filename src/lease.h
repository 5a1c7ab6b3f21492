/* lease.h: one writer per upload across nodes: a lease in Redis with an owner value and an expiry. */
#ifndef RESOURCED_LEASE_H
#define RESOURCED_LEASE_H

#include <stddef.h>

struct rds;

/* A lease value: a random token (unguessable, so a value names exactly one holding)
 * followed by the node name and pid for messages: "<32 hex> <node> <pid>". */
#define LEASE_TOKEN_HEX 32
#define LEASE_VALUE_MAX (LEASE_TOKEN_HEX + 1 + 64 + 1 + 20 + 1)

enum lease_status {
	LEASE_ERROR = -1,   /* Redis unavailable or the script failed: nothing is known */
	LEASE_BUSY = 0,     /* another owner holds it; holder names it */
	LEASE_HELD = 1,     /* ours until its expiry (acquire, renew) or gone (release) */
};

/* holder: the other owner's value on LEASE_BUSY, else NULL; remaining_ms its time left (-1 unknown). */
typedef void lease_cb(void *data, enum lease_status status, const char *holder, long remaining_ms);

/* Fills value with a fresh token and this node's name and pid. */
void lease_value_new(char value[LEASE_VALUE_MAX], const char *node);

/* Takes key for ttl_ms unless another value holds it (taking it again with the same value
 * renews it). Returns -1 without calling cb when Redis is not connected. */
int lease_acquire(struct rds *r, const char *key, const char *value, long ttl_ms, lease_cb *cb, void *data);
/* Extends the lease if value still holds it: LEASE_HELD, or LEASE_BUSY when it was lost. */
int lease_renew(struct rds *r, const char *key, const char *value, long ttl_ms, lease_cb *cb, void *data);
/* Gives the lease up if value holds it; cb may be NULL. */
int lease_release(struct rds *r, const char *key, const char *value, lease_cb *cb, void *data);

#endif

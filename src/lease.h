/* lease.h: one writer per upload across nodes: a lease in Redis with an owner, a fence and an expiry. */
#ifndef RESOURCED_LEASE_H
#define RESOURCED_LEASE_H

#include <stddef.h>
#include <stdint.h>

struct rds;

/* The owner of this node's leases: "<32 hex> <node> <master pid>". The random part is made
 * once per master (lease_owner_init before forking), so a storage process that restarts
 * under the same master takes its predecessor's leases back at once, while another node,
 * or this node after a restart, waits for them to expire. */
#define LEASE_OWNER_MAX (32 + 1 + 64 + 1 + 20 + 1)

enum lease_status {
	LEASE_ERROR = -1,   /* Redis unavailable or the script failed: nothing is known */
	LEASE_BUSY = 0,     /* another owner holds it (holder, remaining_ms say who and how long) */
	LEASE_HELD = 1,     /* ours until its expiry (acquire, renew) or gone (release) */
};

/* fence: on LEASE_HELD from acquire or renew, the holding's fence (Redis server time in
 * microseconds when it was taken, so a later holding always has a larger one); holder:
 * the other owner on LEASE_BUSY, else NULL; remaining_ms its time left (-1 unknown). */
typedef void lease_cb(void *data, enum lease_status status, uint64_t fence, const char *holder,
    long remaining_ms);

void lease_owner_init(const char *node);
const char *lease_owner(void);

/* Fences below this are exact in Redis's Lua numbers (2^53). */
#define LEASE_FENCE_EXACT UINT64_C(9007199254740992)

/* Takes key for ttl_ms unless another owner holds it; taking it again as the same owner
 * extends it and keeps its fence, and so does taking it back after releasing it if nobody
 * else took it meanwhile, unless that fence is not above floor (0: none): then a new fence
 * above floor is taken. Each returns -1 without calling cb when Redis is not connected. */
int lease_acquire(struct rds *r, const char *key, long ttl_ms, uint64_t floor, lease_cb *cb, void *data);
/* Takes back a lease this owner gave back with fence, only if nobody took it since or Redis lost
 * it: LEASE_HELD with that fence, or LEASE_BUSY (holder "" when it is free but was taken since). */
int lease_reclaim(struct rds *r, const char *key, long ttl_ms, uint64_t fence, lease_cb *cb, void *data);
/* Extends the lease if this owner still holds it: LEASE_HELD, or LEASE_BUSY when it is lost. */
int lease_renew(struct rds *r, const char *key, long ttl_ms, lease_cb *cb, void *data);
/* Gives the lease up if this owner holds it; cb may be NULL. keep_ms > 0 keeps its fence for that
 * long: this owner taking it back before anyone else gets the same fence (nothing changed). */
int lease_release(struct rds *r, const char *key, long keep_ms, lease_cb *cb, void *data);
/* Runs a Redis command (argv) only while this owner holds key: LEASE_HELD when it ran,
 * LEASE_BUSY when the lease is not ours (the command did not run). */
int lease_fenced_command(struct rds *r, const char *key, int argc, const char **argv, const size_t *argvlen,
    lease_cb *cb, void *data);

#endif

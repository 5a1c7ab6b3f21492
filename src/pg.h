/* pg.h: avatar icon updates in PostgreSQL over async libpq, with a durable retry queue on disk. */
#ifndef RESOURCED_PG_H
#define RESOURCED_PG_H

#include <ev.h>
#include <stddef.h>
#include <stdint.h>

struct conf;
struct pool;
struct rds;
struct pg;

/* pending_dir holds one file per user whose icon update is not yet applied; pg reads, removes and
 * lists those files on pool's threads, never on loop. */
struct pg *pg_create(struct ev_loop *loop, struct pool *pool, const struct conf *conf, struct rds *redis,
    const char *pending_dir);
/* Records the update durably (the caller has written the pending file) and applies it when it can. */
void pg_icon_queue(struct pg *pg, uint64_t uid);
/* Writes the pending file for uid (from a disk thread); returns 0 or an errno. */
int pg_pending_write(const char *pending_dir, uint64_t uid, const char *name, size_t name_len);
size_t pg_backlog(const struct pg *pg);
/* After pool_destroy: a disk job of pg's may be running until then. */
void pg_destroy(struct pg *pg);

#endif

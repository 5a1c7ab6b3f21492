/* addrlimit.h: a node's connections per client address, counted across its workers in the stats page ([server] max_connections_per_address). */
#ifndef RESOURCED_ADDRLIMIT_H
#define RESOURCED_ADDRLIMIT_H

#include <sys/socket.h>

struct stats_shm;

/* Master: a fresh key for the address hash (after sodium_init). */
void addrlimit_init_key(struct stats_shm *shm);
/* Master: a process starts in slot (its counts start from zero and are summed only when it counts
 * connections), or its process has exited (its counts no longer count). */
void addrlimit_slot_start(struct stats_shm *shm, int slot, int counting);
void addrlimit_slot_end(struct stats_shm *shm, int slot);

/* Worker: the bucket an address counts in (an IPv4 address, also when mapped into IPv6; the /64
 * of any other IPv6 address), or -1 when it has none (another family, an unparsable text). The
 * text form is a peer as the PROXY protocol reader writes it: "1.2.3.4:5678" or "[::1]:5678". */
int addrlimit_bucket(const struct sockaddr *sa);
int addrlimit_bucket_text(const char *peer);
/* Counts one more connection in bucket unless the node has limit there already (then -1). Workers
 * accepting at once may each let one more in. */
int addrlimit_take(int bucket, unsigned limit);
void addrlimit_release(int bucket);

#endif

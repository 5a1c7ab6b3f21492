/* addrlimit.c: a node's connections per client address, counted across its workers in the stats page ([server] max_connections_per_address). */
#include "config.h"
#include "addrlimit.h"
#include "stats.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sodium.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

_Static_assert(sizeof(((struct stats_shm *)0)->addr_key) == crypto_shorthash_KEYBYTES,
    "addr_key holds one crypto_shorthash key");
_Static_assert(ADDR_BUCKETS <= 65536, "a bucket number fits an int and the counts stay small");

void addrlimit_init_key(struct stats_shm *shm)
{
	crypto_shorthash_keygen(shm->addr_key);
}

void addrlimit_slot_start(struct stats_shm *shm, int slot, int counting)
{
	atomic_store(&shm->addr_live[slot], 0);
	if (!counting)
		return;   /* its row is never written: left untouched, it costs no memory */
	for (size_t b = 0; b < ADDR_BUCKETS; b++)
		atomic_store_explicit(&shm->addr_conns[slot][b], 0, memory_order_relaxed);
	atomic_store(&shm->addr_live[slot], 1);
}

void addrlimit_slot_end(struct stats_shm *shm, int slot)
{
	atomic_store(&shm->addr_live[slot], 0);
}

/* A keyed hash (SipHash): a client cannot choose addresses that share a victim's bucket. */
static int bucket_of(const void *bytes, size_t len)
{
	unsigned char h[crypto_shorthash_BYTES];
	crypto_shorthash(h, bytes, len, stats_shm_self->addr_key);
	uint32_t v;
	memcpy(&v, h, sizeof(v));
	return (int)(v % ADDR_BUCKETS);
}

static int bucket_of_in6(const struct in6_addr *a)
{
	/* One subscriber gets a /64 (or more): its addresses count together. */
	return IN6_IS_ADDR_V4MAPPED(a) ? bucket_of(a->s6_addr + 12, 4) : bucket_of(a->s6_addr, 8);
}

int addrlimit_bucket(const struct sockaddr *sa)
{
	if (stats_shm_self == NULL)
		return -1;
	if (sa->sa_family == AF_INET)
		return bucket_of(&((const struct sockaddr_in *)(const void *)sa)->sin_addr, 4);
	if (sa->sa_family == AF_INET6)
		return bucket_of_in6(&((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr);
	return -1;
}

int addrlimit_bucket_text(const char *peer)
{
	if (stats_shm_self == NULL)
		return -1;
	char host[INET6_ADDRSTRLEN];
	const char *start = peer, *end;
	if (peer[0] == '[') {
		start = peer + 1;
		end = strchr(start, ']');
	} else {
		end = strrchr(peer, ':');
	}
	if (end == NULL || (size_t)(end - start) >= sizeof(host))
		return -1;
	memcpy(host, start, (size_t)(end - start));
	host[end - start] = '\0';
	struct in_addr v4;
	struct in6_addr v6;
	if (inet_pton(AF_INET, host, &v4) == 1)
		return bucket_of(&v4, 4);
	if (inet_pton(AF_INET6, host, &v6) == 1)
		return bucket_of_in6(&v6);
	return -1;
}

int addrlimit_take(int bucket, unsigned limit)
{
	struct stats_shm *shm = stats_shm_self;
	unsigned open = 0;
	for (int s = 0; s < STATS_MAX_SLOTS; s++)
		if (atomic_load_explicit(&shm->addr_live[s], memory_order_relaxed))
			open += atomic_load_explicit(&shm->addr_conns[s][bucket], memory_order_relaxed);
	if (open >= limit)
		return -1;
	atomic_fetch_add_explicit(&shm->addr_conns[stats_slot][bucket], 1, memory_order_relaxed);
	return 0;
}

void addrlimit_release(int bucket)
{
	atomic_fetch_sub_explicit(&stats_shm_self->addr_conns[stats_slot][bucket], 1, memory_order_relaxed);
}

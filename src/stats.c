/* stats.c: the shared counter page: creation in the master, per-process slots, the transfer table. */
#include "config.h"
#include "stats.h"
#include "escape.h"
#include "proto.h"

#include <string.h>
#include <sys/mman.h>
#include <time.h>

struct stats_proc *stats_self;
struct stats_shm *stats_shm_self;
int stats_slot = -1;

double stats_wall_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

uint64_t stats_mono_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

uint64_t stats_mono_ms(void)
{
	return stats_mono_us() / 1000u;
}

struct stats_shm *stats_create(void)
{
	void *p = mmap(NULL, sizeof(struct stats_shm), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	return p == MAP_FAILED ? NULL : p;
}

void stats_reset_gauges(struct stats_proc *p)
{
	atomic_store(&p->conn_current, 0);
	atomic_store(&p->storage_queue, 0);
	atomic_store(&p->redis_up, 0);
	atomic_store(&p->storage_up, 0);
	atomic_store(&p->alive_ms, 0);
	atomic_store(&p->backend_unreachable, 0);
	for (int i = 0; i < STATS_TRANSFERS; i++) {
		p->transfers[i].in_use = 0;
		atomic_store(&p->transfers[i].seq, 0);
	}
}

void stats_attach(struct stats_shm *shm, int slot)
{
	stats_self = shm ? &shm->procs[slot] : NULL;
	stats_shm_self = shm;
	stats_slot = shm ? slot : -1;
}

void stats_count_error(int code)
{
	if (stats_self && code >= STATS_ERR_BASE && code < STATS_ERR_BASE + STATS_ERR_COUNT)
		atomic_fetch_add_explicit(&stats_self->errors[code - STATS_ERR_BASE], 1, memory_order_relaxed);
}

/* A client syncs before every fresh upload, and "no upload in progress" is then the normal answer:
 * counted apart, error rates mean trouble. */
static int answer_expected(int response_id, int code)
{
	return response_id == MSG_SYNC + 1 && code == ERR_FILE_NOT_EXISTS;
}

void stats_count_answer(int response_id, int code)
{
	if (code == 0)
		return;
	if (!answer_expected(response_id, code)) {
		stats_count_error(code);
		return;
	}
	if (stats_self && code >= STATS_ERR_BASE && code < STATS_ERR_BASE + STATS_ERR_COUNT)
		atomic_fetch_add_explicit(&stats_self->expected[code - STATS_ERR_BASE], 1, memory_order_relaxed);
}

static void transfer_write_begin(struct stats_transfer *t)
{
	atomic_fetch_add_explicit(&t->seq, 1, memory_order_relaxed);
	atomic_thread_fence(memory_order_release);
}

static void transfer_write_end(struct stats_transfer *t)
{
	atomic_thread_fence(memory_order_release);
	atomic_fetch_add_explicit(&t->seq, 1, memory_order_relaxed);
}

int stats_transfer_open(char kind, uint64_t uid, const char *name, size_t name_len, uint64_t total)
{
	if (stats_self == NULL)
		return -1;
	for (int i = 0; i < STATS_TRANSFERS; i++) {
		struct stats_transfer *t = &stats_self->transfers[i];
		if (t->in_use)
			continue;
		double started = stats_wall_now();
		transfer_write_begin(t);
		t->in_use = 1;
		t->kind = kind;
		t->uid = uid;
		t->bytes = 0;
		t->total = total;
		t->started = started;
		name_len = utf8_prefix(name, name_len, STATS_NAME_MAX - 1);   /* never half a character */
		memcpy(t->name, name, name_len);
		t->name[name_len] = '\0';
		transfer_write_end(t);
		return i;
	}
	return -1;
}

void stats_transfer_update(int handle, uint64_t bytes)
{
	if (stats_self == NULL || handle < 0)
		return;
	struct stats_transfer *t = &stats_self->transfers[handle];
	transfer_write_begin(t);
	t->bytes = bytes;
	transfer_write_end(t);
}

void stats_transfer_close(int handle)
{
	if (stats_self == NULL || handle < 0)
		return;
	struct stats_transfer *t = &stats_self->transfers[handle];
	transfer_write_begin(t);
	t->in_use = 0;
	transfer_write_end(t);
}

int stats_transfer_read(const struct stats_transfer *t, struct stats_transfer *out)
{
	for (int tries = 0; tries < 100; tries++) {
		uint32_t before = atomic_load_explicit(&t->seq, memory_order_acquire);
		if (before & 1)
			continue;
		memcpy((char *)out + sizeof(out->seq), (const char *)t + sizeof(t->seq), sizeof(*t) - sizeof(t->seq));
		atomic_thread_fence(memory_order_acquire);
		if (atomic_load_explicit(&t->seq, memory_order_relaxed) == before)
			return out->in_use;
	}
	return 0;
}

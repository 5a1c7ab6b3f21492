/* shmring.c: the worker-storage shared-memory ring: a memfd, slots given out in order and reclaimed behind done flags. */
#include "config.h"
#include "shmring.h"

#include <errno.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int shmring_create(struct shmring *r, size_t size)
{
	r->fd = -1;
	r->map = NULL;
	size &= ~(size_t)(SHMRING_ALIGN - 1);   /* slots wrap to offset 0: keep them on page boundaries */
	if (size < SHMRING_MIN || size > SHMRING_MAX) {
		errno = EINVAL;
		return -1;
	}
	int fd = memfd_create("resourced-ring", MFD_CLOEXEC);
	if (fd < 0)
		return -1;
	size_t map_len = SHMRING_HEADER + size;
	if (ftruncate(fd, (off_t)map_len) < 0) {
		int err = errno;
		close(fd);
		errno = err;
		return -1;
	}
	void *map = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (map == MAP_FAILED) {
		int err = errno;
		close(fd);
		errno = err;
		return -1;
	}
	r->fd = fd;
	r->map = map;
	r->size = size;
	r->sh = map;   /* a fresh memfd reads as zeros: every flag starts at 0 */
	r->data = r->map + SHMRING_HEADER;
	r->head = r->tail = 0;
	r->first = r->count = 0;
	return 0;
}

void shmring_destroy(struct shmring *r)
{
	if (r->map != NULL)
		munmap(r->map, SHMRING_HEADER + r->size);
	if (r->fd >= 0)
		close(r->fd);
	r->map = NULL;
	r->fd = -1;
	r->count = 0;
}

/* Moves the tail past the oldest slots the storage process is done with. */
static void shmring_reclaim(struct shmring *r)
{
	while (r->count > 0 && atomic_load_explicit(&r->sh->done[r->first], memory_order_acquire)) {
		r->tail = r->end[r->first];
		r->first = (r->first + 1) % SHMRING_SLOTS;
		r->count--;
	}
	if (r->count == 0)
		r->head = r->tail = 0;   /* empty: the next slot may take the whole area */
}

/* Where a slot of len bytes would start now (a position in the never-wrapping count), or
 * UINT64_MAX when there is no room. Moves the tail past slots marked done first. */
static uint64_t shmring_place(struct shmring *r, size_t len)
{
	if (r->map == NULL || len > r->size)
		return UINT64_MAX;
	shmring_reclaim(r);
	if (r->count == SHMRING_SLOTS)
		return UINT64_MAX;
	uint64_t start = r->head;
	if (len >= SHMRING_ALIGN)
		start = (start + SHMRING_ALIGN - 1) & ~(uint64_t)(SHMRING_ALIGN - 1);
	uint64_t at = start % r->size;
	if (at + len > r->size)
		start += r->size - at;   /* one piece: skip the end of the area */
	if (start + len - r->tail > r->size)
		return UINT64_MAX;
	return start;
}

int shmring_fits(struct shmring *r, size_t len)
{
	return shmring_place(r, len) != UINT64_MAX;
}

uint8_t *shmring_reserve(struct shmring *r, size_t len, uint32_t *slot, uint64_t *offset)
{
	uint64_t start = shmring_place(r, len);
	if (start == UINT64_MAX)
		return NULL;
	uint32_t id = (r->first + r->count) % SHMRING_SLOTS;
	r->newest_prev_head = r->head;
	r->newest_start = start;
	atomic_store_explicit(&r->sh->done[id], 0, memory_order_relaxed);   /* the message that names it comes after */
	r->receiving[id] = 0;
	r->end[id] = start + len;
	r->head = start + len;
	r->count++;
	*slot = id;
	*offset = start % r->size;
	return r->data + *offset;
}

void shmring_receiving(struct shmring *r, uint32_t slot, int on)
{
	if (slot < SHMRING_SLOTS)
		r->receiving[slot] = (uint8_t)(on != 0);
}

int shmring_pinned(struct shmring *r)
{
	if (r->map == NULL)
		return 0;
	shmring_reclaim(r);
	return r->count > 0 && r->receiving[r->first];
}

void shmring_trim(struct shmring *r, uint32_t slot, size_t used)
{
	if (r->newest_start + used <= r->end[slot])
		r->head = r->end[slot] = r->newest_start + used;
}

void shmring_cancel(struct shmring *r, uint32_t slot)
{
	(void)slot;   /* always the newest */
	r->head = r->newest_prev_head;
	r->count--;
}

void shmring_abandon(struct shmring *r, uint32_t slot)
{
	if (r->map != NULL && slot < SHMRING_SLOTS)
		atomic_store_explicit(&r->sh->done[slot], 1, memory_order_release);
}

/* ---------------------------------------------------------------- the storage process's end */

int shmring_view_open(struct shmring_view *v, int fd, uint64_t size)
{
	v->map = NULL;
	struct stat sb;
	if (size < SHMRING_MIN || size > SHMRING_MAX || fstat(fd, &sb) < 0 ||
	    (uint64_t)sb.st_size != SHMRING_HEADER + size) {
		close(fd);
		return -1;
	}
	size_t map_len = SHMRING_HEADER + (size_t)size;
	void *map = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	if (map == MAP_FAILED)
		return -1;
	v->map = map;
	v->map_len = map_len;
	v->size = (size_t)size;
	v->sh = map;
	v->data = v->map + SHMRING_HEADER;
	return 0;
}

void shmring_view_close(struct shmring_view *v)
{
	if (v->map != NULL)
		munmap(v->map, v->map_len);
	v->map = NULL;
}

const uint8_t *shmring_view_at(const struct shmring_view *v, uint32_t slot, uint64_t offset, uint32_t len)
{
	if (v->map == NULL || slot >= SHMRING_SLOTS || offset > v->size || len > v->size - offset)
		return NULL;
	return v->data + offset;
}

void shmring_view_done(struct shmring_view *v, uint32_t slot)
{
	if (v->map != NULL && slot < SHMRING_SLOTS)
		atomic_store_explicit(&v->sh->done[slot], 1, memory_order_release);
}

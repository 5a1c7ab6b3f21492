/* buf.h: a growable byte buffer with a read position, allocated only while it holds data. */
#ifndef RESOURCED_BUF_H
#define RESOURCED_BUF_H

#include <stddef.h>
#include <stdint.h>

struct buf {
	uint8_t *data;
	size_t start;   /* first unread byte */
	size_t end;     /* one past the last byte */
	size_t cap;
};

static inline size_t buf_len(const struct buf *b) { return b->end - b->start; }
/* NULL while empty and unallocated (NULL + 0 is undefined behaviour in C). */
static inline uint8_t *buf_head(const struct buf *b) { return b->data ? b->data + b->start : NULL; }

/* Makes room for at least n more bytes at the end; returns the write pointer or NULL. */
uint8_t *buf_reserve(struct buf *b, size_t n);
/* The capacity buf_reserve(b, n) would leave, allocating nothing (what a read would cost). */
size_t buf_reserve_cap(const struct buf *b, size_t n);
int buf_append(struct buf *b, const void *p, size_t n);
/* Marks n bytes written at the pointer buf_reserve returned. */
static inline void buf_commit(struct buf *b, size_t n) { b->end += n; }
/* Drops n bytes from the front; frees the memory when the buffer empties. */
void buf_consume(struct buf *b, size_t n);
/* The same, but an emptied buffer keeps its memory (a busy stream of large frames would
 * otherwise grow it again, copying, for every frame). */
void buf_consume_keep(struct buf *b, size_t n);
void buf_free(struct buf *b);
/* Moves the unread bytes into a buffer of at most cap bytes when they fit and the buffer is
 * larger: a connection that received one large frame does not keep its memory for the bytes
 * after it. 0, or -1 when out of memory (the buffer is left as it was). */
int buf_shrink(struct buf *b, size_t cap);
/* Appends printf-formatted text; -1 when out of memory (the buffer keeps what it had). */
int buf_printf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif

/* buf.c: growable byte buffers that give their memory back when empty (idle connections stay small). */
#include "config.h"
#include "buf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The capacity a buffer holding len bytes grows to for n more: doubled from 4 KiB (or from cap). */
static size_t grown_cap(size_t cap, size_t len, size_t n)
{
	if (cap == 0)
		cap = 4096;
	while (cap - len < n) {
		if (cap > SIZE_MAX / 2)
			return 0;
		cap *= 2;
	}
	return cap;
}

size_t buf_reserve_cap(const struct buf *b, size_t n)
{
	if (b->cap - buf_len(b) >= n)
		return b->cap;   /* fits, or fits once the consumed prefix is dropped */
	size_t cap = grown_cap(b->cap, buf_len(b), n);
	return cap ? cap : SIZE_MAX;
}

uint8_t *buf_reserve(struct buf *b, size_t n)
{
	if (b->cap - b->end >= n)
		return b->data + b->end;
	size_t len = buf_len(b);
	if (b->start > 0 && b->cap - len >= n) {
		/* Enough room once the consumed prefix is dropped. */
		memmove(b->data, b->data + b->start, len);
		b->start = 0;
		b->end = len;
		return b->data + b->end;
	}
	size_t cap = grown_cap(b->cap, len, n);
	if (cap == 0)
		return NULL;
	uint8_t *data = malloc(cap);
	if (data == NULL)
		return NULL;
	if (len)
		memcpy(data, b->data + b->start, len);
	free(b->data);
	b->data = data;
	b->start = 0;
	b->end = len;
	b->cap = cap;
	return b->data + b->end;
}

int buf_append(struct buf *b, const void *p, size_t n)
{
	if (n == 0)
		return 0;
	uint8_t *w = buf_reserve(b, n);
	if (w == NULL)
		return -1;
	memcpy(w, p, n);
	b->end += n;
	return 0;
}

void buf_consume(struct buf *b, size_t n)
{
	b->start += n;
	if (b->start >= b->end)
		buf_free(b);
}

void buf_consume_keep(struct buf *b, size_t n)
{
	b->start += n;
	if (b->start >= b->end)
		b->start = b->end = 0;
}

void buf_free(struct buf *b)
{
	free(b->data);
	b->data = NULL;
	b->start = b->end = b->cap = 0;
}

int buf_shrink(struct buf *b, size_t cap)
{
	size_t len = buf_len(b);
	if (b->cap <= cap || len > cap)
		return 0;
	if (len == 0) {
		buf_free(b);
		return 0;
	}
	size_t small = grown_cap(0, 0, len);
	uint8_t *data = malloc(small);
	if (data == NULL)
		return -1;
	memcpy(data, b->data + b->start, len);
	free(b->data);
	b->data = data;
	b->start = 0;
	b->end = len;
	b->cap = small;
	return 0;
}

int buf_printf(struct buf *b, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n < 0)
		return -1;
	uint8_t *p = buf_reserve(b, (size_t)n + 1);   /* vsnprintf writes a NUL after the text */
	if (p == NULL)
		return -1;
	va_start(ap, fmt);
	vsnprintf((char *)p, (size_t)n + 1, fmt, ap);
	va_end(ap);
	buf_commit(b, (size_t)n);
	return 0;
}

/* fuzz_frame.c: libFuzzer target for the client framing (src/frame.c) and the
 * byte buffer a worker reads into (src/buf.c).
 *
 * The input is a byte stream as a client would send it. For several max_frame
 * values it is decoded twice:
 *   1. in one piece, frame after frame from the front, the way conn_process()
 *      does (decode, consume, stop on NEED_MORE or OVERSIZE);
 *   2. through a struct buf, fed in two steps split at a point derived from the
 *      data, each step in reads of a data-derived size into buf_reserve()d room
 *      (as worker_on_io() does with recv()), decoding after every read.
 * Both must yield the same frames (id, length, body bytes) and the same end
 * state. Every violated invariant is a __builtin_trap(). */
#include "config.h"

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "frame.h"

#include "fuzz_check.h"


#define MAX_INPUT (1u << 20)
#define MAX_FRAMES (MAX_INPUT / FRAME_HEADER_LEN + 1)

struct frame_rec {
	uint16_t id;
	uint32_t len;
	size_t at;        /* offset of the frame's header in the input */
};

struct outcome {
	struct frame_rec frames[MAX_FRAMES];
	size_t nframes;
	enum frame_status last;   /* NEED_MORE or OVERSIZE */
	size_t left;              /* undecoded bytes at the end */
};

static struct outcome one_shot, buffered;

/* Checks what frame_decode says about p[0..len) against the header bytes themselves. */
static enum frame_status decode_checked(const uint8_t *p, size_t len, uint32_t max,
    uint16_t *id, const uint8_t **body, uint32_t *blen, size_t *used)
{
	*id = 0xdead;
	*body = NULL;
	*blen = 0xdeadbeef;
	*used = 0xdeadbeef;
	enum frame_status st = frame_decode(p, len, max, id, body, blen, used);
	if (len < FRAME_HEADER_LEN) {
		CHECK(st == FRAME_NEED_MORE);
		return st;
	}
	uint32_t want = (uint32_t)p[2] << 24 | (uint32_t)p[3] << 16 | (uint32_t)p[4] << 8 | p[5];
	if (want > max) {
		CHECK(st == FRAME_OVERSIZE);
		return st;
	}
	if ((uint64_t)len < (uint64_t)FRAME_HEADER_LEN + want) {
		CHECK(st == FRAME_NEED_MORE);
		return st;
	}
	CHECK(st == FRAME_OK);
	CHECK(*id == (uint16_t)(p[0] << 8 | p[1]));
	CHECK(*blen == want);
	CHECK(*body == p + FRAME_HEADER_LEN);
	CHECK(*used == FRAME_HEADER_LEN + (size_t)want);
	CHECK(*used <= len);
	/* The header writer must give back the bytes we decoded. */
	uint8_t h[FRAME_HEADER_LEN];
	frame_put_header(h, *id, *blen);
	CHECK(memcmp(h, p, FRAME_HEADER_LEN) == 0);
	/* Touch the whole body so ASan sees any overrun. */
	volatile uint8_t sink = 0;
	for (uint32_t i = 0; i < *blen; i++)
		sink ^= (*body)[i];
	(void)sink;
	return st;
}

static void run_one_shot(const uint8_t *data, size_t size, uint32_t max)
{
	struct outcome *o = &one_shot;
	o->nframes = 0;
	size_t pos = 0;
	for (;;) {
		uint16_t id;
		const uint8_t *body;
		uint32_t blen;
		size_t used;
		enum frame_status st = decode_checked(data + pos, size - pos, max, &id, &body, &blen, &used);
		if (st != FRAME_OK) {
			o->last = st;
			o->left = size - pos;
			return;
		}
		CHECK(o->nframes < MAX_FRAMES);
		o->frames[o->nframes++] = (struct frame_rec){ id, blen, pos };
		pos += used;
		CHECK(pos <= size);
	}
}

/* conn_process(): frames from the front of the buffer until one is incomplete.
 * Returns 0, or -1 once the stream is oversize (the worker closes the connection). */
static int process(struct buf *in, const uint8_t *data, uint32_t max)
{
	struct outcome *o = &buffered;
	while (buf_len(in) > 0) {
		uint16_t id;
		const uint8_t *body;
		uint32_t blen;
		size_t used;
		enum frame_status st = decode_checked(buf_head(in), buf_len(in), max, &id, &body, &blen, &used);
		if (st == FRAME_OVERSIZE) {
			o->last = st;
			return -1;
		}
		if (st == FRAME_NEED_MORE)
			break;
		/* It must be the next frame of the one-shot decode, byte for byte. */
		CHECK(o->nframes < one_shot.nframes);
		const struct frame_rec *want = &one_shot.frames[o->nframes];
		CHECK(id == want->id && blen == want->len);
		CHECK(memcmp(body, data + want->at + FRAME_HEADER_LEN, blen) == 0);
		o->frames[o->nframes++] = *want;
		buf_consume(in, used);
	}
	o->last = FRAME_NEED_MORE;
	return 0;
}

/* Appends p[0..n) in reads of at most chunk bytes; returns -1 once the stream is closed. */
static int feed(struct buf *in, const uint8_t *p, size_t n, size_t chunk, const uint8_t *data, uint32_t max)
{
	while (n > 0) {
		size_t take = n < chunk ? n : chunk;
		uint8_t *w = buf_reserve(in, chunk);
		CHECK(w != NULL);
		CHECK(in->cap - in->end >= chunk);
		CHECK(w == in->data + in->end);
		memcpy(w, p, take);
		buf_commit(in, take);
		CHECK(in->start <= in->end && in->end <= in->cap);
		p += take;
		n -= take;
		if (process(in, data, max) < 0)
			return -1;
		/* An emptied buffer gives its memory back. */
		if (buf_len(in) == 0)
			CHECK(in->data == NULL && in->cap == 0);
	}
	return 0;
}

static void run_buffered(const uint8_t *data, size_t size, uint32_t max, size_t split, size_t chunk)
{
	struct buf in = { 0 };
	buffered.nframes = 0;
	buffered.last = FRAME_NEED_MORE;
	if (feed(&in, data, split, chunk, data, max) == 0)
		feed(&in, data + split, size - split, chunk, data, max);
	CHECK(buffered.nframes == one_shot.nframes);
	CHECK(buffered.last == one_shot.last);
	if (buffered.last == FRAME_NEED_MORE) {
		CHECK(buf_len(&in) == one_shot.left);
		if (one_shot.left > 0)
			CHECK(memcmp(buf_head(&in), data + size - one_shot.left, one_shot.left) == 0);
	}
	buf_free(&in);
	CHECK(in.data == NULL && buf_len(&in) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size > MAX_INPUT)
		return 0;
	uint32_t derived = size >= 4 ? (uint32_t)data[size - 1] << 8 | data[size - 2] : 7;
	const uint32_t maxes[] = {
		0, 1, FRAME_HEADER_LEN, 1024, 256u * 1024u, 64u << 20, UINT32_MAX, derived,
	};
	/* Split point and read size come from the data, so the fuzzer steers them. */
	size_t split = size ? ((size_t)data[0] * 131u + (size_t)data[size / 2]) % (size + 1) : 0;
	static const size_t chunks[] = { 1, 3, 64, 4096, 16384 };
	size_t chunk = chunks[size ? data[size - 1] % 5 : 0];

	for (size_t i = 0; i < sizeof(maxes) / sizeof(maxes[0]); i++) {
		run_one_shot(data, size, maxes[i]);
		run_buffered(data, size, maxes[i], split, chunk);
		/* The plain two-step feed (each half appended at once). */
		run_buffered(data, size, maxes[i], split, size ? size : 1);
	}
	return 0;
}

/* test_frame.c: unit tests of the frame codec (frame.c) and of the byte buffer (buf.c) that the reader decodes from. */
#include "config.h"
#include "unit.h"

#include "buf.h"
#include "frame.h"

#define MAX_BODY (256u * 1024u)

/* Writes header + body into out; returns the frame's size. */
static size_t make_frame(uint8_t *out, uint16_t id, const char *body)
{
	size_t n = strlen(body);
	frame_put_header(out, id, (uint32_t)n);
	memcpy(out + FRAME_HEADER_LEN, body, n);
	return FRAME_HEADER_LEN + n;
}

/* Output variables preset to values a decoder must overwrite. */
struct decoded {
	uint16_t id;
	const uint8_t *body;
	uint32_t body_len;
	size_t consumed;
};

static enum frame_status decode(const uint8_t *p, size_t len, uint32_t max, struct decoded *d)
{
	d->id = 0xdead;
	d->body = NULL;
	d->body_len = 0xdeadbeef;
	d->consumed = 0xdeadbeef;
	return frame_decode(p, len, max, &d->id, &d->body, &d->body_len, &d->consumed);
}

START_TEST(test_header_layout)
{
	uint8_t h[FRAME_HEADER_LEN];
	frame_put_header(h, 0x03eb, 0x01020304);
	const uint8_t want[FRAME_HEADER_LEN] = { 0x03, 0xeb, 0x01, 0x02, 0x03, 0x04 };
	ck_assert_mem_eq(h, want, FRAME_HEADER_LEN);
	frame_put_header(h, 0xffff, 0xffffffffu);
	const uint8_t ones[FRAME_HEADER_LEN] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	ck_assert_mem_eq(h, ones, FRAME_HEADER_LEN);
}
END_TEST

START_TEST(test_put_header_round_trip)
{
	static const uint16_t ids[] = { 0, 1, 1001, 1002, 1033, 0x00ff, 0xff00, 0xffff };
	static const uint32_t lens[] = { 0, 1, 255, 256, 65535, 65536, 0x00ffffffu, MAX_BODY };
	uint8_t buf[FRAME_HEADER_LEN];
	for (size_t i = 0; i < sizeof(ids) / sizeof(ids[0]); i++) {
		for (size_t j = 0; j < sizeof(lens) / sizeof(lens[0]); j++) {
			frame_put_header(buf, ids[i], lens[j]);
			struct decoded d;
			/* Only the header: a non-empty body is still missing. */
			enum frame_status st = decode(buf, sizeof(buf), UINT32_MAX, &d);
			if (lens[j] == 0) {
				ck_assert_int_eq(st, FRAME_OK);
				ck_assert_uint_eq(d.id, ids[i]);
				ck_assert_uint_eq(d.body_len, 0);
				ck_assert_uint_eq(d.consumed, FRAME_HEADER_LEN);
			} else {
				ck_assert_int_eq(st, FRAME_NEED_MORE);
			}
			/* A max of exactly the length accepts it; the full frame decodes back. */
			if (lens[j] <= 1024) {
				uint8_t frame[FRAME_HEADER_LEN + 1024];
				memcpy(frame, buf, FRAME_HEADER_LEN);
				memset(frame + FRAME_HEADER_LEN, 'x', lens[j]);
				st = decode(frame, FRAME_HEADER_LEN + lens[j], lens[j], &d);
				ck_assert_int_eq(st, FRAME_OK);
				ck_assert_uint_eq(d.id, ids[i]);
				ck_assert_uint_eq(d.body_len, lens[j]);
				ck_assert_ptr_eq(d.body, frame + FRAME_HEADER_LEN);
				ck_assert_uint_eq(d.consumed, FRAME_HEADER_LEN + lens[j]);
			}
		}
	}
}
END_TEST

START_TEST(test_empty_input)
{
	struct decoded d;
	uint8_t none[1] = { 0 };
	ck_assert_int_eq(decode(none, 0, MAX_BODY, &d), FRAME_NEED_MORE);
	ck_assert_uint_eq(d.consumed, 0xdeadbeef);   /* untouched */
}
END_TEST

START_TEST(test_header_one_byte_at_a_time)
{
	uint8_t frame[64];
	size_t n = make_frame(frame, 1003, "{\"a\":1}");
	struct decoded d;
	/* Every prefix short of the whole frame asks for more and reports nothing. */
	for (size_t len = 0; len < n; len++) {
		ck_assert_msg(decode(frame, len, MAX_BODY, &d) == FRAME_NEED_MORE,
		    "prefix of %zu bytes of %zu was not NEED_MORE", len, n);
		ck_assert_uint_eq(d.consumed, 0xdeadbeef);
	}
	ck_assert_int_eq(decode(frame, n, MAX_BODY, &d), FRAME_OK);
	ck_assert_uint_eq(d.id, 1003);
	ck_assert_uint_eq(d.body_len, 7);
	ck_assert_mem_eq(d.body, "{\"a\":1}", 7);
	ck_assert_uint_eq(d.consumed, n);
}
END_TEST

START_TEST(test_split_reads_through_buf)
{
	/* A reader appends whatever arrives to a buf and decodes from its head. */
	uint8_t frame[128];
	const char *body = "{\n    \"data\": \"hello\"\n}\n";
	size_t n = make_frame(frame, 1001, body);
	static const size_t splits[][3] = {
		{ 1, 1, 0 }, { 3, 3, 0 }, { 5, 2, 0 }, { 6, 0, 0 }, { 6, 1, 0 }, { 7, 5, 0 }, { 10, 10, 0 },
	};
	for (size_t s = 0; s < sizeof(splits) / sizeof(splits[0]); s++) {
		struct buf b = { 0 };
		size_t fed = 0, frames = 0;
		size_t steps[3] = { splits[s][0], splits[s][1], n };
		for (size_t k = 0; fed < n; k++) {
			size_t step = steps[k < 2 ? k : 2];
			if (step > n - fed)
				step = n - fed;
			if (step > 0)
				ck_assert_int_eq(buf_append(&b, frame + fed, step), 0);
			fed += step;
			struct decoded d;
			enum frame_status st = decode(buf_head(&b), buf_len(&b), MAX_BODY, &d);
			if (fed < n) {
				ck_assert_msg(st == FRAME_NEED_MORE, "split %zu: decoded early at %zu bytes", s, fed);
				continue;
			}
			ck_assert_int_eq(st, FRAME_OK);
			ck_assert_uint_eq(d.id, 1001);
			ck_assert_uint_eq(d.body_len, strlen(body));
			ck_assert_mem_eq(d.body, body, strlen(body));
			buf_consume(&b, d.consumed);
			frames++;
		}
		ck_assert_uint_eq(frames, 1);
		ck_assert_uint_eq(buf_len(&b), 0);
		ck_assert_ptr_null(b.data);   /* an emptied buffer gives its memory back */
	}
}
END_TEST

START_TEST(test_body_split)
{
	uint8_t frame[64];
	size_t n = make_frame(frame, 1005, "{\"md5\":\"x\"}");
	struct decoded d;
	/* Header complete, body partial. */
	ck_assert_int_eq(decode(frame, FRAME_HEADER_LEN, MAX_BODY, &d), FRAME_NEED_MORE);
	ck_assert_int_eq(decode(frame, FRAME_HEADER_LEN + 4, MAX_BODY, &d), FRAME_NEED_MORE);
	ck_assert_int_eq(decode(frame, n - 1, MAX_BODY, &d), FRAME_NEED_MORE);
	ck_assert_int_eq(decode(frame, n, MAX_BODY, &d), FRAME_OK);
	ck_assert_uint_eq(d.consumed, n);
}
END_TEST

START_TEST(test_several_frames_in_one_buffer)
{
	static const char *const bodies[] = { "{\"a\":1}", "", "{\"data\":\"xyz\"}", "{}" };
	static const uint16_t ids[] = { 1001, 1003, 1005, 1033 };
	uint8_t stream[256];
	size_t total = 0;
	for (size_t i = 0; i < 4; i++)
		total += make_frame(stream + total, ids[i], bodies[i]);
	/* Plus the first 3 bytes of a fifth frame. */
	uint8_t tail[16];
	make_frame(tail, 1001, "{}");
	memcpy(stream + total, tail, 3);
	size_t len = total + 3;

	size_t pos = 0;
	for (size_t i = 0; i < 4; i++) {
		struct decoded d;
		ck_assert_int_eq(decode(stream + pos, len - pos, MAX_BODY, &d), FRAME_OK);
		ck_assert_uint_eq(d.id, ids[i]);
		ck_assert_uint_eq(d.body_len, strlen(bodies[i]));
		ck_assert_ptr_eq(d.body, stream + pos + FRAME_HEADER_LEN);
		ck_assert_mem_eq(d.body, bodies[i], strlen(bodies[i]));
		ck_assert_uint_eq(d.consumed, FRAME_HEADER_LEN + strlen(bodies[i]));
		pos += d.consumed;
	}
	ck_assert_uint_eq(pos, total);
	struct decoded d;
	ck_assert_int_eq(decode(stream + pos, len - pos, MAX_BODY, &d), FRAME_NEED_MORE);
}
END_TEST

START_TEST(test_zero_length_body)
{
	uint8_t h[FRAME_HEADER_LEN + 1];
	frame_put_header(h, 1022, 0);
	h[FRAME_HEADER_LEN] = 0x55;   /* the next frame's first byte is not part of this one */
	struct decoded d;
	ck_assert_int_eq(decode(h, sizeof(h), MAX_BODY, &d), FRAME_OK);
	ck_assert_uint_eq(d.id, 1022);
	ck_assert_uint_eq(d.body_len, 0);
	ck_assert_ptr_eq(d.body, h + FRAME_HEADER_LEN);
	ck_assert_uint_eq(d.consumed, FRAME_HEADER_LEN);
	/* Even with a max of 0. */
	ck_assert_int_eq(decode(h, FRAME_HEADER_LEN, 0, &d), FRAME_OK);
}
END_TEST

START_TEST(test_exactly_max)
{
	uint32_t max = 1024;
	uint8_t *frame = malloc(FRAME_HEADER_LEN + max + 1);
	ck_assert_ptr_nonnull(frame);
	frame_put_header(frame, 1003, max);
	memset(frame + FRAME_HEADER_LEN, '{', max + 1);
	struct decoded d;
	ck_assert_int_eq(decode(frame, FRAME_HEADER_LEN + max - 1, max, &d), FRAME_NEED_MORE);
	ck_assert_int_eq(decode(frame, FRAME_HEADER_LEN + max, max, &d), FRAME_OK);
	ck_assert_uint_eq(d.body_len, max);
	ck_assert_uint_eq(d.consumed, FRAME_HEADER_LEN + max);
	/* One more than max is oversize. */
	frame_put_header(frame, 1003, max + 1);
	ck_assert_int_eq(decode(frame, FRAME_HEADER_LEN + max + 1, max, &d), FRAME_OVERSIZE);
	free(frame);
}
END_TEST

START_TEST(test_oversize_from_header_alone)
{
	/* The length is judged as soon as the header is in: no need to wait for the body. */
	static const uint32_t lens[] = { MAX_BODY + 1, 0x00ffffffu, 0x7fffffffu, 0x80000000u, 0xffffffffu };
	for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
		uint8_t h[FRAME_HEADER_LEN + 4] = { 0 };
		frame_put_header(h, 1003, lens[i]);
		struct decoded d;
		ck_assert_msg(decode(h, FRAME_HEADER_LEN, MAX_BODY, &d) == FRAME_OVERSIZE,
		    "len %u with max %u was not FRAME_OVERSIZE", lens[i], MAX_BODY);
		ck_assert_int_eq(decode(h, sizeof(h), MAX_BODY, &d), FRAME_OVERSIZE);
		/* Short of a whole header, nothing is known yet. */
		ck_assert_int_eq(decode(h, FRAME_HEADER_LEN - 1, MAX_BODY, &d), FRAME_NEED_MORE);
	}
}
END_TEST

START_TEST(test_len_max_uint32)
{
	uint8_t h[FRAME_HEADER_LEN];
	frame_put_header(h, 1, UINT32_MAX);
	struct decoded d;
	ck_assert_int_eq(decode(h, sizeof(h), 0, &d), FRAME_OVERSIZE);
	ck_assert_int_eq(decode(h, sizeof(h), UINT32_MAX - 1, &d), FRAME_OVERSIZE);
	/* With the largest max it is merely incomplete (no wrap-around in the length checks). */
	ck_assert_int_eq(decode(h, sizeof(h), UINT32_MAX, &d), FRAME_NEED_MORE);
}
END_TEST

START_TEST(test_buf_append_consume)
{
	struct buf b = { 0 };
	ck_assert_uint_eq(buf_len(&b), 0);
	ck_assert_int_eq(buf_append(&b, "hello", 5), 0);
	ck_assert_int_eq(buf_append(&b, " world", 6), 0);
	ck_assert_uint_eq(buf_len(&b), 11);
	ck_assert_mem_eq(buf_head(&b), "hello world", 11);
	buf_consume(&b, 6);
	ck_assert_uint_eq(buf_len(&b), 5);
	ck_assert_mem_eq(buf_head(&b), "world", 5);
	ck_assert_ptr_nonnull(b.data);
	buf_consume(&b, 5);
	ck_assert_uint_eq(buf_len(&b), 0);
	ck_assert_ptr_null(b.data);
	ck_assert_uint_eq(b.cap, 0);
	/* Usable again after being emptied. */
	ck_assert_int_eq(buf_append(&b, "x", 1), 0);
	ck_assert_mem_eq(buf_head(&b), "x", 1);
	buf_free(&b);
	ck_assert_ptr_null(b.data);
	ck_assert_uint_eq(buf_len(&b), 0);
}
END_TEST

/* buf_reserve_cap says what buf_reserve then does, without allocating. */
START_TEST(test_buf_reserve_cap)
{
	struct buf b = { 0 };
	ck_assert_uint_eq(buf_reserve_cap(&b, 10), 4096);
	ck_assert_uint_eq(buf_reserve_cap(&b, 65536), 65536);
	ck_assert_uint_eq(buf_reserve_cap(&b, 65537), 131072);
	ck_assert_ptr_null(b.data);
	for (size_t n = 1; n < (3u << 20); n = n * 3 + 7) {
		size_t want = buf_reserve_cap(&b, n);
		ck_assert_ptr_nonnull(buf_reserve(&b, n));
		ck_assert_uint_eq(b.cap, want);
		buf_commit(&b, n / 2);
	}
	/* Room behind a consumed prefix is reused, not grown. */
	size_t cap = b.cap;
	buf_consume(&b, buf_len(&b) - 1);
	ck_assert_uint_eq(buf_reserve_cap(&b, cap - 1), cap);
	buf_free(&b);
}
END_TEST

/* buf_shrink gives a large buffer's memory back once what is left fits a small one. */
START_TEST(test_buf_shrink)
{
	struct buf b = { 0 };
	uint8_t big[300000];
	for (size_t i = 0; i < sizeof(big); i++)
		big[i] = (uint8_t)(i * 7);
	ck_assert_int_eq(buf_append(&b, big, sizeof(big)), 0);
	ck_assert_uint_eq(b.cap, 524288);
	ck_assert_int_eq(buf_shrink(&b, 131072), 0);
	ck_assert_uint_eq(b.cap, 524288);   /* 300000 bytes left: they do not fit 128 KiB */
	buf_consume(&b, sizeof(big) - 5000);
	ck_assert_int_eq(buf_shrink(&b, 131072), 0);
	ck_assert_uint_eq(b.cap, 8192);
	ck_assert_uint_eq(buf_len(&b), 5000);
	ck_assert_mem_eq(buf_head(&b), big + sizeof(big) - 5000, 5000);
	ck_assert_int_eq(buf_shrink(&b, 131072), 0);   /* already small: unchanged */
	ck_assert_uint_eq(b.cap, 8192);
	buf_consume_keep(&b, 5000);
	/* An emptied, kept buffer is freed by a shrink. */
	ck_assert_int_eq(buf_append(&b, big, 200000), 0);
	buf_consume_keep(&b, 200000);
	ck_assert_int_eq(buf_shrink(&b, 131072), 0);
	ck_assert_ptr_null(b.data);
	ck_assert_uint_eq(b.cap, 0);
}
END_TEST

START_TEST(test_buf_reserve_commit)
{
	struct buf b = { 0 };
	uint8_t *w = buf_reserve(&b, 10);
	ck_assert_ptr_nonnull(w);
	ck_assert_uint_ge(b.cap - b.end, 10);
	memcpy(w, "0123456789", 10);
	buf_commit(&b, 4);   /* only 4 of them were "read" */
	ck_assert_uint_eq(buf_len(&b), 4);
	ck_assert_mem_eq(buf_head(&b), "0123", 4);
	buf_free(&b);
}
END_TEST

START_TEST(test_buf_compacts_before_growing)
{
	struct buf b = { 0 };
	uint8_t chunk[1000];
	for (size_t i = 0; i < sizeof(chunk); i++)
		chunk[i] = (uint8_t)i;
	for (int i = 0; i < 4; i++)
		ck_assert_int_eq(buf_append(&b, chunk, sizeof(chunk)), 0);
	size_t cap = b.cap;
	ck_assert_uint_ge(cap, 4000);
	buf_consume(&b, 3500);
	/* There is room once the consumed prefix goes: no new allocation. */
	uint8_t *w = buf_reserve(&b, cap - 500);
	ck_assert_ptr_nonnull(w);
	ck_assert_uint_eq(b.cap, cap);
	ck_assert_uint_eq(b.start, 0);
	ck_assert_uint_eq(buf_len(&b), 500);
	ck_assert_mem_eq(buf_head(&b), chunk + 500, 500);
	buf_free(&b);
}
END_TEST

START_TEST(test_buf_grows_keeping_data)
{
	struct buf b = { 0 };
	uint8_t big[20000];
	for (size_t i = 0; i < sizeof(big); i++)
		big[i] = (uint8_t)(i * 7);
	ck_assert_int_eq(buf_append(&b, big, 100), 0);
	buf_consume(&b, 10);
	ck_assert_int_eq(buf_append(&b, big + 100, sizeof(big) - 100), 0);
	ck_assert_uint_eq(buf_len(&b), sizeof(big) - 10);
	ck_assert_mem_eq(buf_head(&b), big + 10, sizeof(big) - 10);
	/* An impossible size fails cleanly and leaves the contents alone. */
	ck_assert_ptr_null(buf_reserve(&b, SIZE_MAX - 8));
	ck_assert_uint_eq(buf_len(&b), sizeof(big) - 10);
	ck_assert_mem_eq(buf_head(&b), big + 10, sizeof(big) - 10);
	buf_free(&b);
}
END_TEST

START_TEST(test_buf_printf)
{
	/* Formatted text is appended whole, however long (the status page's lines were cut at 1 KiB
	 * by a fixed line buffer before buf_printf), without the NUL vsnprintf writes after it. */
	struct buf b = { 0 };
	ck_assert_int_eq(buf_append(&b, "x", 1), 0);
	ck_assert_int_eq(buf_printf(&b, "%d-%s", 42, "ab"), 0);
	ck_assert_uint_eq(buf_len(&b), 6);
	ck_assert_int_eq(memcmp(buf_head(&b), "x42-ab", 6), 0);
	char long_text[10000];
	memset(long_text, 'q', sizeof(long_text) - 1);
	long_text[sizeof(long_text) - 1] = '\0';
	ck_assert_int_eq(buf_printf(&b, "[%s]", long_text), 0);
	ck_assert_uint_eq(buf_len(&b), 6 + 2 + sizeof(long_text) - 1);
	ck_assert_int_eq(buf_head(&b)[6], '[');
	ck_assert_int_eq(buf_head(&b)[buf_len(&b) - 1], ']');
	ck_assert_int_eq(buf_head(&b)[buf_len(&b) - 2], 'q');
	ck_assert_int_eq(buf_printf(&b, "%s", ""), 0);
	ck_assert_uint_eq(buf_len(&b), 6 + 2 + sizeof(long_text) - 1);
	buf_free(&b);
}
END_TEST

START_TEST(test_buf_head_after_consume)
{
	/* fuzz_ipc: a decode loop calls buf_head() again after the last message freed the
	 * buffer; that must be NULL with length 0, not NULL + start. */
	struct buf b = { 0 };
	ck_assert_ptr_null(buf_head(&b));
	ck_assert_int_eq(buf_append(&b, "abc", 3), 0);
	buf_consume(&b, 3);
	ck_assert_ptr_null(buf_head(&b));
	ck_assert_uint_eq(buf_len(&b), 0);
	uint16_t id;
	const uint8_t *body;
	uint32_t blen;
	size_t used;
	ck_assert_int_eq(frame_decode(buf_head(&b), buf_len(&b), 100, &id, &body, &blen, &used), FRAME_NEED_MORE);
}
END_TEST

START_TEST(test_buf_append_nothing)
{
	/* Appending zero bytes is not an error, whether or not the buffer holds data. */
	struct buf b = { 0 };
	ck_assert_int_eq(buf_append(&b, "", 0), 0);
	ck_assert_uint_eq(buf_len(&b), 0);
	ck_assert_int_eq(buf_append(&b, "ab", 2), 0);
	ck_assert_int_eq(buf_append(&b, "", 0), 0);
	ck_assert_uint_eq(buf_len(&b), 2);
	buf_free(&b);
}
END_TEST

static Suite *frame_suite(void)
{
	Suite *s = suite_create("frame");
	TCase *tc = tcase_create("frame");
	tcase_add_test(tc, test_header_layout);
	tcase_add_test(tc, test_put_header_round_trip);
	tcase_add_test(tc, test_empty_input);
	tcase_add_test(tc, test_header_one_byte_at_a_time);
	tcase_add_test(tc, test_split_reads_through_buf);
	tcase_add_test(tc, test_body_split);
	tcase_add_test(tc, test_several_frames_in_one_buffer);
	tcase_add_test(tc, test_zero_length_body);
	tcase_add_test(tc, test_exactly_max);
	tcase_add_test(tc, test_oversize_from_header_alone);
	tcase_add_test(tc, test_len_max_uint32);
	suite_add_tcase(s, tc);
	tc = tcase_create("buf");
	tcase_add_test(tc, test_buf_append_consume);
	tcase_add_test(tc, test_buf_reserve_commit);
	tcase_add_test(tc, test_buf_compacts_before_growing);
	tcase_add_test(tc, test_buf_reserve_cap);
	tcase_add_test(tc, test_buf_shrink);
	tcase_add_test(tc, test_buf_grows_keeping_data);
	tcase_add_test(tc, test_buf_append_nothing);
	tcase_add_test(tc, test_buf_head_after_consume);
	tcase_add_test(tc, test_buf_printf);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return unit_run(frame_suite());
}

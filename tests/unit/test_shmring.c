/* test_shmring.c: unit tests of the worker-storage shared ring (shmring.c) and its CHUNK_REF message (ipc.c). */
#include "config.h"
#include "unit.h"

#include <unistd.h>

#include "ipc.h"
#include "shmring.h"

#define RING (1u << 20)

/* Both ends in one process: the view maps the same memfd, as the storage process does. */
static void open_both(struct shmring *r, struct shmring_view *v)
{
	ck_assert_int_eq(shmring_create(r, RING), 0);
	ck_assert_int_eq(shmring_view_open(v, dup(r->fd), RING), 0);
}

START_TEST(test_bytes_cross_by_reference)
{
	struct shmring r;
	struct shmring_view v;
	open_both(&r, &v);
	uint32_t slot;
	uint64_t at;
	uint8_t *p = shmring_reserve(&r, 1000, &slot, &at);
	ck_assert_ptr_nonnull(p);
	memset(p, 0xab, 1000);
	const uint8_t *q = shmring_view_at(&v, slot, at, 1000);
	ck_assert_ptr_nonnull(q);
	ck_assert_uint_eq(q[0], 0xab);
	ck_assert_uint_eq(q[999], 0xab);
	shmring_view_close(&v);
	shmring_destroy(&r);
	shmring_destroy(&r);   /* twice is harmless */
}
END_TEST

START_TEST(test_full_until_done_in_order)
{
	struct shmring r;
	struct shmring_view v;
	open_both(&r, &v);
	uint32_t s[4];
	uint64_t at[4];
	for (int i = 0; i < 4; i++)
		ck_assert_ptr_nonnull(shmring_reserve(&r, RING / 4, &s[i], &at[i]));
	uint32_t x;
	uint64_t xat;
	ck_assert_ptr_null(shmring_reserve(&r, 1, &x, &xat));   /* full: the copy path takes it */
	/* Done out of order: nothing is reused until the oldest is done too. */
	shmring_view_done(&v, s[1]);
	ck_assert_ptr_null(shmring_reserve(&r, 1, &x, &xat));
	shmring_view_done(&v, s[0]);
	uint8_t *p = shmring_reserve(&r, RING / 2, &x, &xat);
	ck_assert_ptr_nonnull(p);
	ck_assert_uint_eq(xat, 0);   /* wrapped to the start, over the two freed quarters */
	ck_assert_ptr_null(shmring_reserve(&r, 1, &x, &xat));
	shmring_view_close(&v);
	shmring_destroy(&r);
}
END_TEST

START_TEST(test_one_piece_skips_the_end)
{
	struct shmring r;
	struct shmring_view v;
	open_both(&r, &v);
	uint32_t a, b, c, d;
	uint64_t at_a, at_b, at_c, at_d;
	ck_assert_ptr_nonnull(shmring_reserve(&r, RING - 100, &a, &at_a));
	ck_assert_ptr_nonnull(shmring_reserve(&r, 50, &d, &at_d));
	ck_assert_uint_eq(at_d, RING - 100);
	shmring_view_done(&v, a);
	/* 200 bytes do not fit in the 50 left at the end: they start at 0. */
	ck_assert_ptr_nonnull(shmring_reserve(&r, 200, &b, &at_b));
	ck_assert_uint_eq(at_b, 0);
	/* d, the skipped end and b are in use, and a large slot starts on the next page: RING - 4196
	 * are free for it, not more. */
	ck_assert_ptr_null(shmring_reserve(&r, RING - 4195, &c, &at_c));
	ck_assert_ptr_nonnull(shmring_reserve(&r, RING - 4196, &c, &at_c));
	ck_assert_uint_eq(at_c, 4096);
	shmring_view_close(&v);
	shmring_destroy(&r);
}
END_TEST

START_TEST(test_trim_cancel_abandon)
{
	struct shmring r;
	struct shmring_view v;
	open_both(&r, &v);
	uint32_t a, b, c;
	uint64_t at_a, at_b, at_c;
	ck_assert_ptr_nonnull(shmring_reserve(&r, 4096, &a, &at_a));
	shmring_trim(&r, a, 1000);   /* base64 decoded to fewer bytes than its room */
	ck_assert_ptr_nonnull(shmring_reserve(&r, 10, &b, &at_b));
	ck_assert_uint_eq(at_b, 1000);
	shmring_cancel(&r, b);   /* bad data: not sent */
	ck_assert_ptr_nonnull(shmring_reserve(&r, 10, &b, &at_b));
	ck_assert_uint_eq(at_b, 1000);
	ck_assert_ptr_nonnull(shmring_reserve(&r, 10, &c, &at_c));
	/* A slot received into that will not be sent (its connection closed) is given back by the worker. */
	shmring_abandon(&r, a);
	shmring_view_done(&v, b);
	shmring_view_done(&v, c);
	ck_assert_ptr_nonnull(shmring_reserve(&r, RING, &a, &at_a));   /* all of it again */
	shmring_view_close(&v);
	shmring_destroy(&r);
}
END_TEST

START_TEST(test_large_slots_start_on_a_page)
{
	struct shmring r;
	ck_assert_int_eq(shmring_create(&r, RING + 100), 0);
	ck_assert_uint_eq(r.size, RING);   /* rounded down: a wrapped slot starts on a page too */
	uint32_t s;
	uint64_t at;
	uint8_t *p = shmring_reserve(&r, 10, &s, &at);
	ck_assert_ptr_nonnull(p);
	ck_assert_uint_eq(at, 0);
	p = shmring_reserve(&r, 5000, &s, &at);   /* after 10 bytes: on the next page */
	ck_assert_uint_eq(at, SHMRING_ALIGN);
	ck_assert_uint_eq((uintptr_t)p % SHMRING_ALIGN, 0);
	shmring_trim(&r, s, 4097);
	p = shmring_reserve(&r, 100, &s, &at);   /* small: right behind */
	ck_assert_uint_eq(at, SHMRING_ALIGN + 4097);
	p = shmring_reserve(&r, RING - 3 * SHMRING_ALIGN, &s, &at);   /* the rest, from the next page */
	ck_assert_ptr_nonnull(p);
	ck_assert_uint_eq(at, 3 * SHMRING_ALIGN);
	shmring_destroy(&r);
}
END_TEST

/* A slot still being filled from a client pins the ring only while it is the oldest in use. */
START_TEST(test_pinned_by_the_oldest_slot)
{
	struct shmring r;
	struct shmring_view v;
	open_both(&r, &v);
	uint32_t a, b;
	uint64_t at;
	ck_assert_ptr_nonnull(shmring_reserve(&r, 8192, &a, &at));
	ck_assert_ptr_nonnull(shmring_reserve(&r, 8192, &b, &at));
	ck_assert_int_eq(shmring_pinned(&r), 0);   /* both sent: storage frees them on its own */
	shmring_receiving(&r, b, 1);
	ck_assert_int_eq(shmring_pinned(&r), 0);   /* b is behind a, which storage will free */
	shmring_view_done(&v, a);
	ck_assert_int_eq(shmring_pinned(&r), 1);   /* now b is the oldest, and its client is late */
	shmring_receiving(&r, b, 0);
	ck_assert_int_eq(shmring_pinned(&r), 0);
	shmring_view_done(&v, b);
	ck_assert_ptr_nonnull(shmring_reserve(&r, 8192, &a, &at));
	ck_assert_int_eq(shmring_pinned(&r), 0);   /* a reused slot starts not receiving */
	shmring_view_close(&v);
	shmring_destroy(&r);
}
END_TEST

START_TEST(test_slot_count_bounds)
{
	struct shmring r;
	ck_assert_int_eq(shmring_create(&r, RING), 0);
	uint32_t s;
	uint64_t at;
	for (int i = 0; i < SHMRING_SLOTS; i++)
		ck_assert_ptr_nonnull(shmring_reserve(&r, 1, &s, &at));
	ck_assert_ptr_null(shmring_reserve(&r, 1, &s, &at));
	ck_assert_ptr_null(shmring_reserve(&r, 0, &s, &at));
	shmring_destroy(&r);
}
END_TEST

START_TEST(test_view_refuses)
{
	struct shmring r;
	struct shmring_view v;
	ck_assert_int_eq(shmring_create(&r, RING), 0);
	/* A descriptor of another size is not mapped (and is closed). */
	ck_assert_int_eq(shmring_view_open(&v, dup(r.fd), RING * 2), -1);
	ck_assert_int_eq(shmring_view_open(&v, dup(r.fd), RING), 0);
	ck_assert_ptr_null(shmring_view_at(&v, SHMRING_SLOTS, 0, 1));
	ck_assert_ptr_null(shmring_view_at(&v, 0, RING, 1));
	ck_assert_ptr_null(shmring_view_at(&v, 0, RING - 10, 11));
	ck_assert_ptr_null(shmring_view_at(&v, 0, UINT64_MAX, 2));
	ck_assert_ptr_nonnull(shmring_view_at(&v, 0, RING - 10, 10));
	shmring_view_close(&v);
	shmring_destroy(&r);
	ck_assert_int_eq(shmring_create(&r, SHMRING_MIN - 1), -1);
}
END_TEST

START_TEST(test_chunk_ref_message)
{
	struct buf out = { 0 };
	struct ipc_chunk c = { .uid = 7, .seq = 3, .trans_size = 3000, .total_size = 5000, .kind = 0, .last = 0,
	    .name = "a.bin", .name_len = 5, .data_len = 1000 };
	memcpy(c.md5, "0123456789abcdef0123456789abcdef", PROTO_MD5_HEX);
	ck_assert_int_eq(ipc_encode_chunk_ref(&out, 42, &c, 17, 123456), 0);
	struct ipc_header h;
	const uint8_t *payload;
	ck_assert_int_eq(ipc_decode_header(buf_head(&out), buf_len(&out), &h, &payload), IPC_OK);
	ck_assert_uint_eq(h.type, IPC_WORKER_STORAGE_CHUNK_REF);
	ck_assert_uint_eq(h.reqid, 42);
	struct ipc_chunk d;
	uint32_t slot;
	uint64_t at;
	ck_assert_int_eq(ipc_decode_chunk_ref(payload, h.len, &d, &slot, &at), 0);
	ck_assert_uint_eq(slot, 17);
	ck_assert_uint_eq(at, 123456);
	ck_assert_uint_eq(d.data_len, 1000);
	ck_assert_uint_eq(d.seq, 3);
	ck_assert_ptr_null(d.data);
	/* Short or long by a byte, or data longer than trans_size: refused. */
	ck_assert_int_eq(ipc_decode_chunk_ref(payload, h.len - 1, &d, &slot, &at), -1);
	uint8_t longer[512];
	memcpy(longer, payload, h.len);
	longer[h.len] = 0;
	ck_assert_int_eq(ipc_decode_chunk_ref(longer, h.len + 1, &d, &slot, &at), -1);
	buf_free(&out);
	c.data_len = 4000;
	ck_assert_int_eq(ipc_encode_chunk_ref(&out, 42, &c, 0, 0), 0);
	ck_assert_int_eq(ipc_decode_header(buf_head(&out), buf_len(&out), &h, &payload), IPC_OK);
	ck_assert_int_eq(ipc_decode_chunk_ref(payload, h.len, &d, &slot, &at), -1);
	buf_free(&out);
	/* The ring offer and its answer. */
	uint64_t size;
	uint32_t error;
	ck_assert_int_eq(ipc_encode_ring(&out, RING), 0);
	ck_assert_int_eq(ipc_decode_header(buf_head(&out), buf_len(&out), &h, &payload), IPC_OK);
	ck_assert_int_eq(ipc_decode_ring(payload, h.len, &size), 0);
	ck_assert_uint_eq(size, RING);
	buf_free(&out);
	ck_assert_int_eq(ipc_encode_ring_answer(&out, 1), 0);
	ck_assert_int_eq(ipc_decode_header(buf_head(&out), buf_len(&out), &h, &payload), IPC_OK);
	ck_assert_int_eq(ipc_decode_ring_answer(payload, h.len, &error), 0);
	ck_assert_uint_eq(error, 1);
	buf_free(&out);
}
END_TEST

static Suite *shmring_suite(void)
{
	Suite *s = suite_create("shmring");
	TCase *tc = tcase_create("shmring");
	tcase_add_test(tc, test_bytes_cross_by_reference);
	tcase_add_test(tc, test_full_until_done_in_order);
	tcase_add_test(tc, test_one_piece_skips_the_end);
	tcase_add_test(tc, test_large_slots_start_on_a_page);
	tcase_add_test(tc, test_pinned_by_the_oldest_slot);
	tcase_add_test(tc, test_trim_cancel_abandon);
	tcase_add_test(tc, test_slot_count_bounds);
	tcase_add_test(tc, test_view_refuses);
	tcase_add_test(tc, test_chunk_ref_message);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return unit_run(shmring_suite());
}

/* test_backend.c: the storage interface's contract (backend.h), run against fs, and against rados when a cluster is given. */
#include "config.h"
#include "unit.h"

#include "backend.h"
#include "conf.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static struct conf conf;
static struct backend be;
static char root[64];

/* A fresh root and an opened writer backend for each test. */
static void setup(void)
{
	conf_defaults(&conf);
	snprintf(root, sizeof(root), "/tmp/resourced-unit-be-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(root));
	char err[256];
	ck_assert_int_eq(conf_set(&conf, "storage", "root", root, err, sizeof(err)), 0);
	ck_assert_int_eq(conf_set(&conf, "storage", "backend", "fs", err, sizeof(err)), 0);
	ck_assert_msg(backend_open(&be, &conf, BACKEND_WRITER, err, sizeof(err)) == 0, "%s", err);
}

static void teardown(void)
{
	backend_close(&be);
	char cmd[128];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", root);
	if (system(cmd) != 0)
		fprintf(stderr, "cannot remove %s\n", root);
}

static struct backend_meta meta_of(uint64_t uid, const char *md5, const char *name, uint64_t total)
{
	struct backend_meta m;
	memset(&m, 0, sizeof(m));
	m.uid = uid;
	snprintf(m.md5, sizeof(m.md5), "%s", md5);
	m.name_len = (uint16_t)strlen(name);
	memcpy(m.name, name, m.name_len);
	m.total_size = total;
	m.chunk_len = 4;
	return m;
}

#define MD5_A "0123456789abcdef0123456789abcdef"
#define MD5_B "fedcba9876543210fedcba9876543210"

struct listed {
	int n;
	struct backend_entry e[8];
};

static int collect(const struct backend_entry *e, void *arg)
{
	struct listed *l = arg;
	if (l->n < 8)
		l->e[l->n] = *e;
	l->n++;
	return 0;
}

static struct listed list_all(size_t *dropped)
{
	struct listed l = { 0 };
	size_t d = 0;
	ck_assert_int_eq(be.ops->staging_list(&be, collect, &l, &d), 0);
	if (dropped)
		*dropped = d;
	return l;
}

static void write_text(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0640);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
	close(fd);
}

START_TEST(test_staging_lifecycle)
{
	struct backend_meta m = meta_of(7, MD5_A, "a.bin", 10);
	struct backend_staging *s;
	ck_assert_int_eq(be.ops->staging_begin(&be, &m, BACKEND_NO_FENCE, &s), 0);
	ck_assert_int_eq(be.ops->staging_write(s, "0123", 4, 0, BACKEND_NO_FENCE), 0);
	ck_assert_int_eq(be.ops->staging_write(s, "4567", 4, 4, BACKEND_NO_FENCE), 0);
	ck_assert_int_eq(be.ops->staging_write(s, "45", 2, 4, BACKEND_NO_FENCE), 0);   /* a resent piece */
	ck_assert_int_eq(be.ops->staging_sync(s, BACKEND_SYNC_CHUNK), 0);
	ck_assert_int_eq(be.ops->staging_sync(s, BACKEND_SYNC_PUBLISH), 0);
	char buf[16];
	size_t got = 99;
	ck_assert_int_eq(be.ops->staging_read(s, buf, sizeof(buf), 0, &got), 0);
	ck_assert_uint_eq(got, 8);   /* short only at the end */
	ck_assert_int_eq(memcmp(buf, "01234567", 8), 0);
	uint64_t size = 0;
	ck_assert_int_eq(be.ops->staging_size(s, &size), 0);
	ck_assert_uint_eq(size, 8);
	be.ops->staging_close(s);

	struct listed l = list_all(NULL);
	ck_assert_int_eq(l.n, 1);
	ck_assert_uint_eq(l.e[0].size, 8);
	ck_assert_uint_eq(l.e[0].meta.uid, 7);
	ck_assert_str_eq(l.e[0].meta.md5, MD5_A);
	ck_assert_str_eq(l.e[0].meta.name, "a.bin");
	ck_assert_uint_eq(l.e[0].meta.total_size, 10);
	ck_assert_uint_eq(l.e[0].meta.chunk_len, 4);

	/* Recovery attaches without changing anything, and may cut the entry back. */
	ck_assert_int_eq(be.ops->staging_attach(&be, &l.e[0].meta, &s), 0);
	ck_assert_int_eq(be.ops->staging_read(s, buf, 4, 4, &got), 0);
	ck_assert_int_eq(memcmp(buf, "4567", 4), 0);
	ck_assert_int_eq(be.ops->staging_truncate(s, 5, BACKEND_NO_FENCE), 0);
	ck_assert_int_eq(be.ops->staging_size(s, &size), 0);
	ck_assert_uint_eq(size, 5);
	ck_assert_int_eq(be.ops->staging_discard(s, BACKEND_NO_FENCE), 0);
	be.ops->staging_close(s);
	ck_assert_int_eq(list_all(NULL).n, 0);
	be.ops->staging_close(NULL);   /* allowed */
}
END_TEST

START_TEST(test_begin_resets)
{
	struct backend_meta m = meta_of(7, MD5_A, "a.bin", 10);
	struct backend_staging *s;
	ck_assert_int_eq(be.ops->staging_begin(&be, &m, BACKEND_NO_FENCE, &s), 0);
	ck_assert_int_eq(be.ops->staging_write(s, "0123456", 7, 0, BACKEND_NO_FENCE), 0);
	be.ops->staging_close(s);
	m = meta_of(7, MD5_A, "renamed.bin", 12);
	ck_assert_int_eq(be.ops->staging_begin(&be, &m, BACKEND_NO_FENCE, &s), 0);
	uint64_t size = 99;
	ck_assert_int_eq(be.ops->staging_size(s, &size), 0);
	ck_assert_uint_eq(size, 0);
	be.ops->staging_close(s);
	struct listed l = list_all(NULL);
	ck_assert_int_eq(l.n, 1);
	ck_assert_str_eq(l.e[0].meta.name, "renamed.bin");
	ck_assert_uint_eq(l.e[0].meta.total_size, 12);
}
END_TEST

/* Publishes content under uid 9 / name through a staging entry. */
static void publish(const char *md5, const char *name, const char *content)
{
	struct backend_meta m = meta_of(9, md5, name, strlen(content));
	struct backend_staging *s;
	ck_assert_int_eq(be.ops->staging_begin(&be, &m, BACKEND_NO_FENCE, &s), 0);
	ck_assert_int_eq(be.ops->staging_write(s, content, strlen(content), 0, BACKEND_NO_FENCE), 0);
	int flags = 0;
	ck_assert_int_eq(be.ops->publish(s, BACKEND_NO_FENCE, &flags), 0);
	ck_assert_int_eq(flags, BACKEND_PUBLISHED);
	be.ops->staging_close(s);
}

START_TEST(test_publish_and_versions)
{
	publish(MD5_A, "f.txt", "old content!");
	ck_assert_int_eq(list_all(NULL).n, 0);   /* the staging entry is gone */
	struct backend_file *f1, *f2;
	uint64_t size1, size2;
	char v1[BACKEND_VERSION_MAX], v2[BACKEND_VERSION_MAX], again[BACKEND_VERSION_MAX];
	ck_assert_int_eq(be.ops->file_open(&be, 9, "f.txt", 5, &f1, &size1, v1), 0);
	ck_assert_uint_eq(size1, 12);
	ck_assert_int_gt(strlen(v1), 0);
	struct backend_file *f1b;
	ck_assert_int_eq(be.ops->file_open(&be, 9, "f.txt", 5, &f1b, &size1, again), 0);
	ck_assert_str_eq(v1, again);   /* the same file: the same version */
	be.ops->file_close(f1b);

	publish(MD5_B, "f.txt", "NEW CONTENT?");   /* same size */
	ck_assert_int_eq(be.ops->file_open(&be, 9, "f.txt", 5, &f2, &size2, v2), 0);
	ck_assert_uint_eq(size2, 12);
	ck_assert_str_ne(v1, v2);
	char buf[32];
	size_t got;
	ck_assert_int_eq(be.ops->file_read(f1, buf, sizeof(buf), 0, &got), 0);
	ck_assert_uint_eq(got, 12);
	ck_assert_int_eq(memcmp(buf, "old content!", 12), 0);   /* the opened version, to its end */
	ck_assert_int_eq(be.ops->file_read(f2, buf, 5, 4, &got), 0);
	ck_assert_int_eq(memcmp(buf, "CONTE", 5), 0);
	be.ops->file_close(f1);
	be.ops->file_close(f2);
	be.ops->file_close(NULL);
}
END_TEST

/* The content index: publish_indexed enters a file, publish_from_content links it under another
 * name (fenced, the staging entry goes), a version survives another name's link, and
 * content_collect frees content once no name uses it. */
START_TEST(test_content_index)
{
	if (be.ops->content_open == NULL)
		return;   /* a backend without an index never deduplicates */
	const char *text = "shared bytes";
	struct backend_content_key key;
	memset(&key, 0, sizeof(key));
	key.size = strlen(text);
	snprintf(key.md5, sizeof(key.md5), "%s", MD5_A);
	struct backend_file *f;
	uint64_t size;
	ck_assert_int_eq(be.ops->content_open(&be, &key, &f, &size), ENOENT);

	struct backend_meta m = meta_of(9, MD5_A, "one.txt", key.size);
	struct backend_staging *s;
	int flags = 0;
	ck_assert_int_eq(be.ops->staging_begin(&be, &m, 5, &s), 0);
	ck_assert_int_eq(be.ops->staging_write(s, text, key.size, 0, 5), 0);
	ck_assert_int_eq(be.ops->publish_indexed(s, &key, 5, &flags), 0);
	ck_assert_int_eq(flags, BACKEND_PUBLISHED);
	be.ops->staging_close(s);
	ck_assert_int_eq(be.ops->content_open(&be, &key, &f, &size), 0);
	char buf[32];
	size_t got;
	ck_assert_int_eq(be.ops->file_read(f, buf, sizeof(buf), 0, &got), 0);
	ck_assert_uint_eq(got, key.size);
	ck_assert_int_eq(memcmp(buf, text, got), 0);
	be.ops->file_close(f);
	char v1[BACKEND_VERSION_MAX], v1again[BACKEND_VERSION_MAX];
	ck_assert_int_eq(be.ops->file_open(&be, 9, "one.txt", 7, &f, &size, v1), 0);
	be.ops->file_close(f);

	/* Another uid's upload of the same content: chunk 1 staged, then published from the index. */
	struct backend_meta m2 = meta_of(10, MD5_A, "two.txt", key.size);
	ck_assert_int_eq(be.ops->staging_begin(&be, &m2, 7, &s), 0);
	ck_assert_int_eq(be.ops->staging_write(s, text, 4, 0, 7), 0);
	ck_assert_int_eq(be.ops->publish_from_content(s, &key, 6, &flags), ESTALE);   /* an older fence */
	ck_assert_int_eq(be.ops->publish_from_content(s, &key, 7, &flags), 0);
	ck_assert_int_eq(flags, BACKEND_PUBLISHED);
	be.ops->staging_close(s);
	ck_assert_int_eq(list_all(NULL).n, 0);   /* the staging entry is gone */
	ck_assert_int_eq(be.ops->file_open(&be, 10, "two.txt", 7, &f, &size, v1again), 0);
	if (be.ops->content_collect == NULL)
		ck_assert_str_eq(v1again, v1);   /* RADOS: the same immutable head, not a copy */
	ck_assert_int_eq(be.ops->file_read(f, buf, sizeof(buf), 0, &got), 0);
	ck_assert_int_eq(memcmp(buf, text, key.size), 0);
	be.ops->file_close(f);
	ck_assert_int_eq(be.ops->file_open(&be, 9, "one.txt", 7, &f, &size, v1again), 0);
	be.ops->file_close(f);
	ck_assert_str_eq(v1, v1again);   /* another name's link does not change this name's version */

	if (be.ops->content_collect == NULL) {
		/* RADOS collects on its own thread (rados_test_dedup.py): a key never indexed instead. */
		key.size++;
		goto absent;
	}
	size_t freed;
	uint64_t bytes;
	ck_assert_int_eq(be.ops->content_collect(&be, &freed, &bytes), 0);
	ck_assert_uint_eq(freed, 0);   /* two names use it */
	publish(MD5_B, "one.txt", "other bytes!");   /* uid 9's name replaced */
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "%s/10/two.txt", root);
	ck_assert_int_eq(unlink(path), 0);             /* uid 10's name removed */
	ck_assert_int_eq(be.ops->content_collect(&be, &freed, &bytes), 0);
	ck_assert_uint_eq(freed, 1);
	ck_assert_uint_eq(bytes, key.size);
	ck_assert_int_eq(be.ops->content_open(&be, &key, &f, &size), ENOENT);

	/* Gone meanwhile: publish_from_content changes nothing and says ENOENT. */
absent:
	ck_assert_int_eq(be.ops->staging_begin(&be, &m2, 8, &s), 0);
	ck_assert_int_eq(be.ops->publish_from_content(s, &key, 8, &flags), ENOENT);
	ck_assert_int_eq(flags, 0);
	ck_assert_int_eq(list_all(NULL).n, 1);   /* the staging entry stays for a normal upload */
	be.ops->staging_close(s);
}
END_TEST

START_TEST(test_file_open_refuses)
{
	struct backend_file *f;
	uint64_t size;
	char v[BACKEND_VERSION_MAX];
	ck_assert_int_eq(be.ops->file_open(&be, 9, "none", 4, &f, &size, v), ENOENT);
	publish(MD5_A, "real", "x");
	char path[PATH_MAX], target[PATH_MAX];
	snprintf(path, sizeof(path), "%s/9/dir", root);
	ck_assert_int_eq(mkdir(path, 0750), 0);
	ck_assert_int_eq(be.ops->file_open(&be, 9, "dir", 3, &f, &size, v), ENOENT);   /* not a regular file */
	snprintf(path, sizeof(path), "%s/9/link", root);
	snprintf(target, sizeof(target), "%s/9/real", root);
	ck_assert_int_eq(symlink(target, path), 0);
	ck_assert_int_eq(be.ops->file_open(&be, 9, "link", 4, &f, &size, v), ELOOP);   /* links are not followed */
}
END_TEST

START_TEST(test_meta_any_name)
{
	/* 255 bytes that JSON escaping doubles, and 255 bytes of multi-byte characters. */
	char quotes[256], utf8[256];
	memset(quotes, '"', 255);
	quotes[255] = '\0';
	size_t n = 0;
	while (n + 2 <= 254) {
		utf8[n++] = (char)0xc3;
		utf8[n++] = (char)0xa9;
	}
	utf8[n++] = '"';
	utf8[n] = '\0';
	ck_assert_uint_eq(strlen(utf8), 255);
	const char *names[] = { quotes, utf8 };
	for (int i = 0; i < 2; i++) {
		struct backend_meta m = meta_of(11, i ? MD5_B : MD5_A, names[i], 100);
		struct backend_staging *s;
		ck_assert_int_eq(be.ops->staging_begin(&be, &m, BACKEND_NO_FENCE, &s), 0);
		be.ops->staging_close(s);
	}
	size_t dropped = 9;
	struct listed l = list_all(&dropped);
	ck_assert_uint_eq(dropped, 0);
	ck_assert_int_eq(l.n, 2);
	for (int i = 0; i < 2; i++) {
		const char *want = strcmp(l.e[i].meta.md5, MD5_A) == 0 ? quotes : utf8;
		ck_assert_uint_eq(l.e[i].meta.name_len, 255);
		ck_assert_int_eq(memcmp(l.e[i].meta.name, want, 255), 0);
	}
}
END_TEST

/* Makes every staging file but keep two days old. */
static void age_all_but(const char *keep)
{
	char dir[PATH_MAX], path[PATH_MAX + 256];
	snprintf(dir, sizeof(dir), "%s/.staging", root);
	DIR *d = opendir(dir);
	ck_assert_ptr_nonnull(d);
	struct dirent *de;
	struct timeval old[2] = { { time(NULL) - 2 * 86400, 0 }, { time(NULL) - 2 * 86400, 0 } };
	while ((de = readdir(d)) != NULL) {
		if (de->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
		if (strcmp(path, keep) != 0)
			ck_assert_int_eq(utimes(path, old), 0);
	}
	closedir(d);
}

START_TEST(test_list_drops_broken)
{
	struct backend_meta m = meta_of(7, MD5_A, "keep.bin", 10);
	struct backend_staging *s;
	ck_assert_int_eq(be.ops->staging_begin(&be, &m, BACKEND_NO_FENCE, &s), 0);
	be.ops->staging_close(s);
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "%s/.staging/8-" MD5_B ".part", root);        /* no .meta */
	write_text(path, "x");
	snprintf(path, sizeof(path), "%s/.staging/9-" MD5_B ".meta", root);        /* not JSON */
	write_text(path, "{\"uid\":9,");
	snprintf(path, sizeof(path), "%s/.staging/9-" MD5_B ".part", root);
	write_text(path, "y");
	snprintf(path, sizeof(path), "%s/.staging/10-" MD5_B ".meta", root);       /* names another upload */
	write_text(path, "{\"uid\":99,\"md5\":\"" MD5_B "\",\"name\":\"n\",\"kind\":0,\"total_size\":5,\"chunk_len\":1}");
	snprintf(path, sizeof(path), "%s/.staging/10-" MD5_B ".part", root);
	write_text(path, "z");
	snprintf(path, sizeof(path), "%s/.staging/7-" MD5_A ".meta.tmp", root);    /* an interrupted meta write */
	write_text(path, "{");
	/* Broken entries go only once nobody touched them for upload_ttl: on a shared root they may be
	 * another node's begin in progress. Fresh ones stay, aged ones go. */
	snprintf(path, sizeof(path), "%s/.staging/11-" MD5_B ".part", root);       /* fresh, no .meta */
	write_text(path, "w");
	age_all_but(path);
	size_t dropped = 0;
	struct listed l = list_all(&dropped);
	ck_assert_int_eq(l.n, 1);
	ck_assert_str_eq(l.e[0].meta.name, "keep.bin");
	ck_assert_uint_eq(dropped, 3);
	snprintf(path, sizeof(path), "%s/.staging", root);
	DIR *d = opendir(path);
	ck_assert_ptr_nonnull(d);
	int left = 0;
	struct dirent *de;
	while ((de = readdir(d)) != NULL)
		left += de->d_name[0] != '.';
	closedir(d);
	ck_assert_int_eq(left, 3);   /* keep.bin's .part and .meta, and the fresh .part */
}
END_TEST

/* Descriptors of this process open on files under the staging directory. */
static int staging_fds(void)
{
	char want[PATH_MAX], link[PATH_MAX], path[300];
	snprintf(want, sizeof(want), "%s/.staging/", root);
	DIR *d = opendir("/proc/self/fd");
	ck_assert_ptr_nonnull(d);
	int n = 0;
	struct dirent *de;
	while ((de = readdir(d)) != NULL) {
		snprintf(path, sizeof(path), "/proc/self/fd/%s", de->d_name);
		ssize_t len = readlink(path, link, sizeof(link) - 1);
		if (len > 0) {
			link[len] = '\0';
			n += strncmp(link, want, strlen(want)) == 0;
		}
	}
	closedir(d);
	return n;
}

START_TEST(test_open_files_bounded)
{
	enum { HANDLES = 300, BOUND = 256 };
	static struct backend_staging *s[HANDLES];
	for (int i = 0; i < HANDLES; i++) {
		char md5[33];
		snprintf(md5, sizeof(md5), "%032x", i);
		struct backend_meta m = meta_of((uint64_t)i, md5, "idle.bin", 100);
		ck_assert_int_eq(be.ops->staging_begin(&be, &m, BACKEND_NO_FENCE, &s[i]), 0);
		ck_assert_int_eq(be.ops->staging_write(s[i], &i, sizeof(i), 0, BACKEND_NO_FENCE), 0);
	}
	ck_assert_int_le(staging_fds(), BOUND);
	for (int i = 0; i < HANDLES; i++) {   /* every handle still works: closed files reopen */
		ck_assert_int_eq(be.ops->staging_write(s[i], &i, sizeof(i), sizeof(i), BACKEND_NO_FENCE), 0);
		int back[2];
		size_t got;
		ck_assert_int_eq(be.ops->staging_read(s[i], back, sizeof(back), 0, &got), 0);
		ck_assert_uint_eq(got, sizeof(back));
		ck_assert_int_eq(back[0], i);
		ck_assert_int_eq(back[1], i);
	}
	ck_assert_int_le(staging_fds(), BOUND);
	for (int i = 0; i < HANDLES; i++)
		be.ops->staging_close(s[i]);
	ck_assert_int_eq(staging_fds(), 0);
}
END_TEST

/* Fenced chunk writes keep their lock file open between writes (backend_fs.c, fence_enter): those
 * descriptors count against the same bound, and every handle still takes its fence. */
START_TEST(test_open_files_bounded_fenced)
{
	enum { HANDLES = 300, BOUND = 256 };
	static struct backend_staging *s[HANDLES];
	for (int i = 0; i < HANDLES; i++) {
		char md5[33];
		snprintf(md5, sizeof(md5), "%032x", i + 1000);
		struct backend_meta m = meta_of((uint64_t)i, md5, "fenced.bin", 100);
		ck_assert_int_eq(be.ops->staging_begin(&be, &m, 5, &s[i]), 0);
		ck_assert_int_eq(be.ops->staging_write(s[i], &i, sizeof(i), 0, 5), 0);
		ck_assert_int_le(staging_fds(), BOUND);
	}
	for (int i = 0; i < HANDLES; i++) {
		ck_assert_int_eq(be.ops->staging_write(s[i], &i, sizeof(i), sizeof(i), 5), 0);
		ck_assert_int_eq(be.ops->staging_write(s[i], &i, sizeof(i), 0, 4), ESTALE);   /* a lower fence */
		uint64_t recorded = 0;
		ck_assert_int_eq(be.ops->staging_fence(s[i], &recorded), 0);
		ck_assert_uint_eq(recorded, 5);
	}
	ck_assert_int_le(staging_fds(), BOUND);
	for (int i = 0; i < HANDLES; i++)
		be.ops->staging_close(s[i]);
	ck_assert_int_eq(staging_fds(), 0);
}
END_TEST

/* Pages of the .part of (uid 1, MD5_A) that are in the page cache, as a string of 0 and 1. */
static void part_residency(char *out, size_t pages)
{
	char part[PATH_MAX];
	snprintf(part, sizeof(part), "%s/.staging/1-" MD5_A ".part", root);
	int fd = open(part, O_RDONLY);
	ck_assert_int_ge(fd, 0);
	void *map = mmap(NULL, pages * 4096, PROT_READ, MAP_SHARED, fd, 0);
	ck_assert_ptr_ne(map, MAP_FAILED);
	unsigned char vec[64];
	ck_assert_uint_le(pages, sizeof(vec));
	ck_assert_int_eq(mincore(map, pages * 4096, vec), 0);
	for (size_t i = 0; i < pages; i++)
		out[i] = (char)('0' + (vec[i] & 1));
	out[pages] = '\0';
	munmap(map, pages * 4096);
	close(fd);
}

/* Large chunks that start on a page of the file and lie on a page in memory go past the page cache
 * (O_DIRECT): they are not in it after their write, the others are (dirty pages stay until written
 * back), and the file reads back whole. direct_io_min = 0 sends everything through the cache. */
START_TEST(test_direct_writes)
{
	enum { CHUNK = 16384, TOTAL = 3 * CHUNK + 1000 };
	struct statfs sf;
	ck_assert_int_eq(statfs(root, &sf), 0);
	if (sf.f_type == TMPFS_MAGIC)
		return;   /* tmpfs is the page cache: nothing to tell apart */
	for (int direct = 1; direct >= 0; direct--) {
		char err[256], value[16];
		snprintf(value, sizeof(value), "%d", direct ? CHUNK : 0);
		ck_assert_int_eq(conf_set(&conf, "storage", "direct_io_min", value, err, sizeof(err)), 0);
		void *aligned = NULL;
		ck_assert_int_eq(posix_memalign(&aligned, 4096, TOTAL), 0);
		uint8_t *data = aligned, *shifted = malloc(CHUNK + 1);
		for (size_t i = 0; i < TOTAL; i++)
			data[i] = (uint8_t)(i * 7 + i / 4096);
		memcpy(shifted + 1, data + CHUNK, CHUNK);
		struct backend_meta m = meta_of(1, MD5_A, "direct.bin", TOTAL);
		struct backend_staging *s;
		ck_assert_int_eq(be.ops->staging_begin(&be, &m, 5, &s), 0);
		ck_assert_int_eq(be.ops->staging_write(s, data, CHUNK, 0, 5), 0);
		ck_assert_int_eq(be.ops->staging_write(s, shifted + 1, CHUNK, CHUNK, 5), 0);   /* not on a page */
		ck_assert_int_eq(be.ops->staging_write(s, data + 2 * CHUNK, CHUNK + 1000, 2 * CHUNK, 5), 0);
		ck_assert_int_le(staging_fds(), 3);   /* the .part twice and its lock file */
		char pages[16];
		part_residency(pages, 13);
		ck_assert_str_eq(pages, direct ? "0000111100001" : "1111111111111");
		uint8_t back[TOTAL];
		size_t got;
		ck_assert_int_eq(be.ops->staging_read(s, back, TOTAL, 0, &got), 0);
		ck_assert_uint_eq(got, TOTAL);
		ck_assert_mem_eq(back, data, TOTAL);
		/* A resent chunk over cached pages (the tail's) and a rewrite of a direct one. */
		ck_assert_int_eq(be.ops->staging_write(s, data + 2 * CHUNK, CHUNK + 1000, 2 * CHUNK, 5), 0);
		ck_assert_int_eq(be.ops->staging_write(s, data, CHUNK, 0, 5), 0);
		ck_assert_int_eq(be.ops->staging_read(s, back, TOTAL, 0, &got), 0);
		ck_assert_mem_eq(back, data, TOTAL);
		ck_assert_int_eq(be.ops->staging_write(s, data, CHUNK, 0, 4), ESTALE);   /* still fenced */
		be.ops->staging_discard(s, 5);
		be.ops->staging_close(s);
		ck_assert_int_eq(staging_fds(), 0);
		free(data);
		free(shifted);
	}
}
END_TEST

/* A holder whose lock file was removed and made again by another holder (discard, then a new
 * begin with a newer fence) between two of its writes: its kept descriptor names the old file,
 * so it locks the current one, reads the newer fence there and is refused. */
START_TEST(test_fencing_kept_lock_replaced)
{
	struct backend_meta m = meta_of(23, MD5_A, "kept.bin", 8);
	struct backend_staging *a, *b;
	ck_assert_int_eq(be.ops->staging_begin(&be, &m, 10, &a), 0);
	ck_assert_int_eq(be.ops->staging_write(a, "abcd", 4, 0, 10), 0);   /* keeps the lock file open */
	struct backend_entry e;
	ck_assert_int_eq(be.ops->staging_find(&be, 23, MD5_A, &e, &b), 0);
	ck_assert_int_eq(be.ops->staging_discard(b, 20), 0);   /* removes .part, .meta and the lock file */
	be.ops->staging_close(b);
	ck_assert_int_eq(be.ops->staging_begin(&be, &m, 30, &b), 0);   /* a new entry, a new lock file */
	ck_assert_int_eq(be.ops->staging_write(a, "XXXX", 4, 4, 10), ESTALE);
	ck_assert_int_eq(be.ops->staging_write(b, "efgh", 4, 4, 30), 0);
	uint64_t recorded = 0;
	ck_assert_int_eq(be.ops->staging_fence(b, &recorded), 0);
	ck_assert_uint_eq(recorded, 30);
	be.ops->staging_close(a);
	ck_assert_int_eq(be.ops->staging_discard(b, 30), 0);
	be.ops->staging_close(b);
}
END_TEST

START_TEST(test_unknown_backend)
{
	struct conf c = conf;
	struct backend b;
	char err[256];
	snprintf(c.backend, sizeof(c.backend), "nope");
	ck_assert_int_eq(backend_open(&b, &c, BACKEND_READER, err, sizeof(err)), -1);
	unit_assert_contains(err, "unknown storage backend 'nope' (known: fs");
	ck_assert_ptr_eq(backend_find("fs"), &backend_fs);
	ck_assert_ptr_null(backend_find("nope"));
}
END_TEST

/* Fencing (backend.h): a lower fence changes nothing; a higher one takes over; a holder that lost
 * the upload cannot write into what another holder published, nor find it again. */
START_TEST(test_fencing)
{
	struct backend_meta m = meta_of(21, MD5_A, "fenced.bin", 8);
	struct backend_staging *a, *b;
	ck_assert_int_eq(be.ops->staging_begin(&be, &m, 10, &a), 0);
	ck_assert_int_eq(be.ops->staging_write(a, "abcd", 4, 0, 10), 0);
	uint64_t recorded = 0;
	ck_assert_int_eq(be.ops->staging_fence(a, &recorded), 0);
	ck_assert_uint_eq(recorded, 10);
	ck_assert_int_eq(be.ops->staging_write(a, "XXXX", 4, 0, 9), ESTALE);
	/* Another holder takes over with a newer fence: the old one is refused from then on. */
	struct backend_entry e;
	ck_assert_int_eq(be.ops->staging_find(&be, 21, MD5_A, &e, &b), 0);
	ck_assert_uint_eq(e.size, 4);
	ck_assert_str_eq(e.meta.name, "fenced.bin");
	ck_assert_int_eq(be.ops->staging_write(b, "efgh", 4, 4, 20), 0);
	ck_assert_int_eq(be.ops->staging_write(a, "XXXX", 4, 4, 10), ESTALE);
	ck_assert_int_eq(be.ops->staging_truncate(a, 0, 10), ESTALE);
	ck_assert_int_eq(be.ops->staging_discard(a, 10), ESTALE);
	int flags = 0;
	ck_assert_int_eq(be.ops->publish(a, 10, &flags), ESTALE);
	ck_assert_int_eq(flags, 0);
	ck_assert_int_eq(be.ops->publish(b, 20, &flags), 0);
	ck_assert(flags & BACKEND_PUBLISHED);
	be.ops->staging_close(b);
	/* Published: the old holder's descriptor now names the published file; its write is refused,
	 * even though the lock that held the fence went with the entry. */
	ck_assert_int_eq(be.ops->staging_write(a, "XXXX", 4, 0, 10), ESTALE);
	struct backend_file *f;
	uint64_t size;
	char version[BACKEND_VERSION_MAX];
	ck_assert_int_eq(be.ops->file_open(&be, 21, "fenced.bin", 10, &f, &size, version), 0);
	char buf[9] = { 0 };
	size_t got = 0;
	ck_assert_int_eq(be.ops->file_read(f, buf, 8, 0, &got), 0);
	ck_assert_uint_eq(got, 8);
	ck_assert_str_eq(buf, "abcdefgh");
	be.ops->file_close(f);
	ck_assert_int_eq(be.ops->staging_find(&be, 21, MD5_A, &e, &b), ENOENT);
	be.ops->staging_close(a);
}
END_TEST

/* A publish that died between its rename and its unlinks leaves metadata without a .part: the
 * next look at the upload (under its lease) finds nothing and finishes the cleanup. */
START_TEST(test_find_finishes_interrupted_publish)
{
	struct backend_meta m = meta_of(22, MD5_A, "cut.bin", 4);
	struct backend_staging *s;
	ck_assert_int_eq(be.ops->staging_begin(&be, &m, 10, &s), 0);
	ck_assert_int_eq(be.ops->staging_write(s, "abcd", 4, 0, 10), 0);
	be.ops->staging_close(s);
	char part[PATH_MAX], meta[PATH_MAX], lock[PATH_MAX], dir[PATH_MAX], final[PATH_MAX];
	snprintf(part, sizeof(part), "%s/.staging/22-" MD5_A ".part", root);
	snprintf(meta, sizeof(meta), "%s/.staging/22-" MD5_A ".meta", root);
	snprintf(lock, sizeof(lock), "%s/.staging/22-" MD5_A ".lock", root);
	snprintf(dir, sizeof(dir), "%s/22", root);
	snprintf(final, sizeof(final), "%s/22/cut.bin", root);
	ck_assert_int_eq(access(meta, F_OK), 0);
	ck_assert_int_eq(access(lock, F_OK), 0);
	ck_assert_int_eq(mkdir(dir, 0750), 0);
	ck_assert_int_eq(rename(part, final), 0);   /* the rename of publish_locked, then the crash */
	struct backend_entry e;
	ck_assert_int_eq(be.ops->staging_find(&be, 22, MD5_A, &e, &s), ENOENT);
	ck_assert_int_eq(access(meta, F_OK), -1);
	ck_assert_int_eq(access(lock, F_OK), -1);
	ck_assert_int_eq(access(final, F_OK), 0);   /* the published file is left alone */
	/* Cut one step later: the metadata was unlinked, the lock not yet. */
	m = meta_of(22, MD5_B, "cut2.bin", 4);
	ck_assert_int_eq(be.ops->staging_begin(&be, &m, 10, &s), 0);
	ck_assert_int_eq(be.ops->staging_write(s, "efgh", 4, 0, 10), 0);
	be.ops->staging_close(s);
	snprintf(part, sizeof(part), "%s/.staging/22-" MD5_B ".part", root);
	snprintf(meta, sizeof(meta), "%s/.staging/22-" MD5_B ".meta", root);
	snprintf(lock, sizeof(lock), "%s/.staging/22-" MD5_B ".lock", root);
	snprintf(final, sizeof(final), "%s/22/cut2.bin", root);
	ck_assert_int_eq(rename(part, final), 0);
	ck_assert_int_eq(unlink(meta), 0);
	ck_assert_int_eq(be.ops->staging_find(&be, 22, MD5_B, &e, &s), ENOENT);
	ck_assert_int_eq(access(lock, F_OK), -1);
	ck_assert_int_eq(access(final, F_OK), 0);
	size_t dropped = 0;
	ck_assert_int_eq(list_all(&dropped).n, 0);
	ck_assert_uint_eq(dropped, 0);
}
END_TEST
/* A publish that the storage answered with an error may still have been applied (RADOS: a switch
 * the cluster did and answered too late); the upload is then discarded (the janitor, an expiry):
 * that discard must never delete the published file. */
START_TEST(test_discard_after_publish)
{
	struct backend_meta m = meta_of(9, MD5_A, "kept.txt", 12);
	struct backend_staging *s;
	ck_assert_int_eq(be.ops->staging_begin(&be, &m, 5, &s), 0);
	ck_assert_int_eq(be.ops->staging_write(s, "kept content", 12, 0, 5), 0);
	int flags = 0;
	ck_assert_int_eq(be.ops->publish(s, 5, &flags), 0);
	ck_assert_int_eq(be.ops->staging_discard(s, 5), 0);
	be.ops->staging_close(s);
	struct backend_file *f;
	uint64_t size;
	char v[BACKEND_VERSION_MAX], buf[16];
	size_t got = 0;
	ck_assert_int_eq(be.ops->file_open(&be, 9, "kept.txt", 8, &f, &size, v), 0);
	ck_assert_uint_eq(size, 12);
	ck_assert_int_eq(be.ops->file_read(f, buf, sizeof(buf), 0, &got), 0);
	ck_assert_uint_eq(got, 12);
	ck_assert_int_eq(memcmp(buf, "kept content", 12), 0);
	be.ops->file_close(f);
	ck_assert_int_eq(list_all(NULL).n, 0);
}
END_TEST
#ifdef HAVE_RADOS
/* ---------------------------------------------------------------- rados: RESOURCED_TEST_CEPH_CONF names a cluster
 * (tests/integration/rados_test_backend.py starts one); each test gets a namespace of its own and pieces
 * of 64 KiB, so that striping is exercised with small data. */

static void setup_rados(void)
{
	conf_defaults(&conf);
	snprintf(root, sizeof(root), "/tmp/resourced-unit-be-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(root));
	char err[256], ns[64];
	const char *pool = getenv("RESOURCED_TEST_CEPH_POOL");
	snprintf(ns, sizeof(ns), "unit-%ld-%d", (long)time(NULL), (int)getpid());
	ck_assert_int_eq(conf_set(&conf, "storage", "root", root, err, sizeof(err)), 0);
	ck_assert_int_eq(conf_set(&conf, "storage", "backend", "rados", err, sizeof(err)), 0);
	ck_assert_int_eq(conf_set(&conf, "rados", "conf", getenv("RESOURCED_TEST_CEPH_CONF"), err, sizeof(err)), 0);
	ck_assert_int_eq(conf_set(&conf, "rados", "user", "admin", err, sizeof(err)), 0);
	ck_assert_int_eq(conf_set(&conf, "rados", "pool", pool ? pool : "resourced", err, sizeof(err)), 0);
	ck_assert_int_eq(conf_set(&conf, "rados", "namespace", ns, err, sizeof(err)), 0);
	ck_assert_int_eq(conf_set(&conf, "rados", "object_size", "65536", err, sizeof(err)), 0);
	ck_assert_int_eq(conf_set(&conf, "rados", "op_timeout", "10", err, sizeof(err)), 0);
	ck_assert_msg(backend_open(&be, &conf, BACKEND_WRITER, err, sizeof(err)) == 0, "%s", err);
}

START_TEST(test_rados_missing)
{
	struct backend_file *f;
	uint64_t size;
	char v[BACKEND_VERSION_MAX];
	ck_assert_int_eq(be.ops->file_open(&be, 9, "none", 4, &f, &size, v), ENOENT);
	publish(MD5_A, "real", "x");
	ck_assert_int_eq(be.ops->file_open(&be, 9, "real", 4, &f, &size, v), 0);
	ck_assert_uint_eq(size, 1);
	be.ops->file_close(f);
	ck_assert_int_eq(be.ops->file_open(&be, 10, "real", 4, &f, &size, v), ENOENT);   /* another user's index */
}
END_TEST

/* A file across several 64 KiB pieces: written in chunks that straddle the boundaries, read back,
 * cut back across a boundary, and published. */
START_TEST(test_rados_striped)
{
	enum { TOTAL = 200000, CHUNK = 30000 };
	static char data[TOTAL], back[TOTAL];
	for (size_t i = 0; i < TOTAL; i++)
		data[i] = (char)(i * 7 + i / 251);
	struct backend_meta m = meta_of(9, MD5_A, "big.bin", TOTAL);
	struct backend_staging *s;
	ck_assert_int_eq(be.ops->staging_begin(&be, &m, BACKEND_NO_FENCE, &s), 0);
	for (size_t off = 0; off < TOTAL; off += CHUNK) {
		size_t n = TOTAL - off < CHUNK ? TOTAL - off : CHUNK;
		ck_assert_int_eq(be.ops->staging_write(s, data + off, n, off, BACKEND_NO_FENCE), 0);
	}
	uint64_t size = 0;
	ck_assert_int_eq(be.ops->staging_size(s, &size), 0);
	ck_assert_uint_eq(size, TOTAL);
	size_t got = 0;
	ck_assert_int_eq(be.ops->staging_read(s, back, TOTAL, 0, &got), 0);
	ck_assert_uint_eq(got, TOTAL);
	ck_assert_int_eq(memcmp(back, data, TOTAL), 0);
	/* Cut to 70000 (inside piece 1): pieces 2 and 3 go, and the size follows. */
	ck_assert_int_eq(be.ops->staging_truncate(s, 70000, BACKEND_NO_FENCE), 0);
	ck_assert_int_eq(be.ops->staging_size(s, &size), 0);
	ck_assert_uint_eq(size, 70000);
	ck_assert_int_eq(be.ops->staging_read(s, back, TOTAL, 0, &got), 0);
	ck_assert_uint_eq(got, 70000);
	ck_assert_int_eq(be.ops->staging_write(s, data + 70000, TOTAL - 70000, 70000, BACKEND_NO_FENCE), 0);
	int flags = 0;
	ck_assert_int_eq(be.ops->publish(s, BACKEND_NO_FENCE, &flags), 0);
	be.ops->staging_close(s);
	struct backend_file *f;
	char v[BACKEND_VERSION_MAX];
	ck_assert_int_eq(be.ops->file_open(&be, 9, "big.bin", 7, &f, &size, v), 0);
	ck_assert_uint_eq(size, TOTAL);
	memset(back, 0, TOTAL);
	ck_assert_int_eq(be.ops->file_read(f, back, TOTAL, 0, &got), 0);
	ck_assert_uint_eq(got, TOTAL);
	ck_assert_int_eq(memcmp(back, data, TOTAL), 0);
	ck_assert_int_eq(be.ops->file_read(f, back, 1000, 65000, &got), 0);   /* across a boundary */
	ck_assert_uint_eq(got, 1000);
	ck_assert_int_eq(memcmp(back, data + 65000, 1000), 0);
	be.ops->file_close(f);
}
END_TEST

/* backend.h "Fencing": a lower fence fails with ESTALE and changes nothing; a higher one is recorded. */
START_TEST(test_rados_fencing)
{
	struct backend_meta m = meta_of(9, MD5_A, "fenced.bin", 140000);
	struct backend_staging *s, *old;
	ck_assert_int_eq(be.ops->staging_begin(&be, &m, 5, &s), 0);
	ck_assert_int_eq(be.ops->staging_write(s, "AAAA", 4, 0, 5), 0);
	ck_assert_int_eq(be.ops->staging_write(s, "BBBB", 4, 4, 4), ESTALE);   /* lower */
	ck_assert_int_eq(be.ops->staging_write(s, "CCCC", 4, 4, 7), 0);        /* higher: now 7 */
	ck_assert_int_eq(be.ops->staging_write(s, "DDDD", 4, 8, 5), ESTALE);   /* 5 is stale now */
	ck_assert_int_eq(be.ops->staging_truncate(s, 2, 6), ESTALE);
	ck_assert_int_eq(be.ops->staging_discard(s, 6), ESTALE);
	ck_assert_int_eq(be.ops->staging_begin(&be, &m, 6, &old), ESTALE);    /* no reset by a stale writer */
	/* A piece past the head (64 KiB on): created by the current writer, refused to a stale one. */
	static char big[70000];
	memset(big, 'E', sizeof(big));
	ck_assert_int_eq(be.ops->staging_write(s, big, 4, 66000, 6), ESTALE);
	ck_assert_int_eq(be.ops->staging_write(s, big, sizeof(big), 8, 7), 0);
	ck_assert_int_eq(be.ops->staging_write(s, "FFFF", 4, 66000, 6), ESTALE);
	char buf[12];
	size_t got;
	ck_assert_int_eq(be.ops->staging_read(s, buf, 12, 0, &got), 0);
	ck_assert_int_eq(memcmp(buf, "AAAACCCCEEEE", 12), 0);
	uint64_t size;
	ck_assert_int_eq(be.ops->staging_size(s, &size), 0);
	ck_assert_uint_eq(size, 70008);
	int flags = 0;
	ck_assert_int_eq(be.ops->publish(s, 6, &flags), ESTALE);
	ck_assert_int_eq(flags, 0);
	struct backend_file *f;
	char v[BACKEND_VERSION_MAX];
	ck_assert_int_eq(be.ops->file_open(&be, 9, "fenced.bin", 10, &f, &size, v), ENOENT);
	ck_assert_int_eq(be.ops->publish(s, 8, &flags), 0);
	ck_assert_int_eq(flags, BACKEND_PUBLISHED);
	/* Sealed: not even the current writer changes the published bytes. */
	ck_assert_int_eq(be.ops->staging_write(s, "GGGG", 4, 0, 9), ESTALE);
	be.ops->staging_close(s);
	ck_assert_int_eq(be.ops->file_open(&be, 9, "fenced.bin", 10, &f, &size, v), 0);
	ck_assert_uint_eq(size, 70008);
	ck_assert_int_eq(be.ops->file_read(f, buf, 12, 0, &got), 0);
	ck_assert_int_eq(memcmp(buf, "AAAACCCCEEEE", 12), 0);
	be.ops->file_close(f);
}
END_TEST
/* A node taking over with staging_find and writing only past the first piece still fences the old
 * holder out of every piece, and staging_fence reports the new fence (what WORK_CHECK compares). */
START_TEST(test_rados_takeover_pieces)
{
	static char big[140000];
	memset(big, 'A', sizeof(big));
	struct backend_meta m = meta_of(9, MD5_B, "taken.bin", 200000);
	struct backend_staging *a, *b;
	ck_assert_int_eq(be.ops->staging_begin(&be, &m, 10, &a), 0);
	ck_assert_int_eq(be.ops->staging_write(a, big, sizeof(big), 0, 10), 0);   /* pieces 0, 1 and 2 */
	struct backend_entry e;
	ck_assert_int_eq(be.ops->staging_find(&be, 9, MD5_B, &e, &b), 0);
	ck_assert_uint_eq(e.size, sizeof(big));
	ck_assert_str_eq(e.meta.name, "taken.bin");
	uint64_t recorded = 0;
	ck_assert_int_eq(be.ops->staging_fence(b, &recorded), 0);
	ck_assert_uint_eq(recorded, 10);
	ck_assert_int_eq(be.ops->staging_write(b, "BBBB", 4, sizeof(big), 20), 0);   /* into piece 2 only */
	ck_assert_int_eq(be.ops->staging_fence(a, &recorded), 0);
	ck_assert_uint_eq(recorded, 20);
	ck_assert_int_eq(be.ops->staging_write(a, "XXXX", 4, 0, 10), ESTALE);        /* piece 0 */
	ck_assert_int_eq(be.ops->staging_write(a, "XXXX", 4, 70000, 10), ESTALE);    /* piece 1 */
	char buf[4];
	size_t got = 0;
	ck_assert_int_eq(be.ops->staging_read(b, buf, 4, 70000, &got), 0);
	ck_assert_int_eq(memcmp(buf, "AAAA", 4), 0);
	be.ops->staging_close(a);
	be.ops->staging_close(b);
	ck_assert_int_eq(be.ops->staging_find(&be, 9, MD5_A, &e, &b), ENOENT);
}
END_TEST
#endif

static Suite *backend_suite(void)
{
	Suite *s = suite_create("backend");
	TCase *tc = tcase_create("fs");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, test_staging_lifecycle);
	tcase_add_test(tc, test_begin_resets);
	tcase_add_test(tc, test_publish_and_versions);
	tcase_add_test(tc, test_content_index);
	tcase_add_test(tc, test_file_open_refuses);
	tcase_add_test(tc, test_meta_any_name);
	tcase_add_test(tc, test_list_drops_broken);
	tcase_add_test(tc, test_open_files_bounded);
	tcase_add_test(tc, test_open_files_bounded_fenced);
	tcase_add_test(tc, test_direct_writes);
	tcase_add_test(tc, test_unknown_backend);
	tcase_add_test(tc, test_fencing);
	tcase_add_test(tc, test_fencing_kept_lock_replaced);
	tcase_add_test(tc, test_find_finishes_interrupted_publish);
	tcase_add_test(tc, test_discard_after_publish);
	suite_add_tcase(s, tc);
#ifdef HAVE_RADOS
	if (getenv("RESOURCED_TEST_CEPH_CONF")) {
		tc = tcase_create("rados");
		tcase_set_timeout(tc, 60);
		tcase_add_checked_fixture(tc, setup_rados, teardown);
		tcase_add_test(tc, test_staging_lifecycle);
		tcase_add_test(tc, test_begin_resets);
		tcase_add_test(tc, test_publish_and_versions);
		tcase_add_test(tc, test_rados_missing);
		tcase_add_test(tc, test_content_index);
		tcase_add_test(tc, test_meta_any_name);
		tcase_add_test(tc, test_rados_striped);
		tcase_add_test(tc, test_rados_fencing);
		tcase_add_test(tc, test_fencing);
		tcase_add_test(tc, test_rados_takeover_pieces);
		tcase_add_test(tc, test_discard_after_publish);
		suite_add_tcase(s, tc);
	}
#endif
	return s;
}

int main(void)
{
	return unit_run(backend_suite());
}

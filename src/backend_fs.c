/* backend_fs.c: the local file system backend: staging in <root>/.staging, published files at <root>/<uid>/<name>. */
#include "config.h"
#include "backend.h"
#include "conf.h"
#include "log.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#define STAGING_DIR ".staging"
#define CONTENT_DIR ".content"       /* the content index: <md5>-<size> (or u<uid>-<md5>-<size>), hard links */
#define META_MAX 8192                 /* a .meta is one line of about 600 bytes at most */
/* Staging files held open at once: at most this, and at most a quarter of the process's file
 * limit. Thousands of idle uploads must not exhaust the storage process's descriptors: past
 * the bound, the least recently used idle handle closes its file and reopens it on its next
 * I/O (design.md §6). */
#define FS_STAGING_OPEN_MAX 256
#define FS_STAGING_OPEN_MIN 8
/* Memory, offset and length alignment of a direct (O_DIRECT) write: a page satisfies every block
 * size up to 4 KiB; a file system that wants more refuses with EINVAL, and writes go buffered. */
#define DIO_ALIGN 4096u
#define WRITEBACK_STEP (1u << 20)     /* bytes of a .part sent to the disk at once ahead of its fsync */
#define WRITEBACK_DROP_LAG (3u * WRITEBACK_STEP)   /* a step leaves the cache this far behind the writes */

struct fs {
	const struct conf *conf;
	char staging[PATH_MAX];       /* <root>/.staging */
	char content[PATH_MAX];       /* <root>/.content */
	pthread_mutex_t lock;         /* the list below; handles are used on several pool threads */
	struct backend_staging *mru, *lru;   /* handles whose file is open, most recently used first */
	size_t open_count;
	size_t open_max;              /* the bound on open_count */
	atomic_int dio_refused;       /* the file system refused O_DIRECT once: every write goes buffered */
};

struct backend_staging {
	struct fs *fs;
	struct backend_meta meta;
	int fd;                       /* the .part file while open (on the list); -1 while closed */
	int dio_fd;                   /* the same file opened O_DIRECT for large aligned writes, beside fd; -1: none */
	int fd_known;                 /* fd_dev and fd_ino hold fd's identity (fstat once opened: it cannot change) */
	dev_t fd_dev;
	ino_t fd_ino;
	int busy;                     /* a thread is using fd: it is not closed under it */
	struct backend_staging *prev, *next;   /* on the open list */
	char part[PATH_MAX];
	char metafile[PATH_MAX];
	char lockfile[PATH_MAX];      /* holds the highest fence seen; flocked around every fenced change */
	int lock_fd;                  /* open between fence_enter and fence_leave */
	dev_t lock_fd_dev;            /* its identity, checked against the path by fence_enter */
	ino_t lock_fd_ino;
	/* The lock file kept open between chunk writes (fs_staging_write) while fd is open, unlocked, so
	 * that a write does not open, fstat and close it again; -1: none. Closed with fd. */
	int lock_keep;
	dev_t lock_keep_dev;
	ino_t lock_keep_ino;
};

struct backend_file {
	int fd;
};

/* snprintf that reports truncation as ENAMETOOLONG instead of using a cut path. */
static int path_format(char *out, size_t outlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int path_format(char *out, size_t outlen, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(out, outlen, fmt, ap);
	va_end(ap);
	return n < 0 || (size_t)n >= outlen ? ENAMETOOLONG : 0;
}

static int fs_open(struct backend *b, enum backend_role role, char *err, size_t errlen)
{
	struct fs *fs = calloc(1, sizeof(*fs));
	if (fs == NULL) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	fs->conf = b->conf;
	pthread_mutex_init(&fs->lock, NULL);
	fs->open_max = FS_STAGING_OPEN_MAX;
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur / 4 < fs->open_max)
		fs->open_max = rl.rlim_cur / 4 > FS_STAGING_OPEN_MIN ? (size_t)(rl.rlim_cur / 4) : FS_STAGING_OPEN_MIN;
	if (path_format(fs->staging, sizeof(fs->staging), "%s/" STAGING_DIR, b->conf->root) != 0) {
		snprintf(err, errlen, "[storage] root is too long");
		free(fs);
		return -1;
	}
	if (path_format(fs->content, sizeof(fs->content), "%s/" CONTENT_DIR, b->conf->root) != 0) {
		snprintf(err, errlen, "[storage] root is too long");
		free(fs);
		return -1;
	}
	if (role == BACKEND_WRITER) {
		const char *dirs[] = { b->conf->root, fs->staging, fs->content };
		for (size_t i = 0; i < 3; i++) {
			if (mkdir(dirs[i], 0750) < 0 && errno != EEXIST) {
				snprintf(err, errlen, "mkdir(%s) failed: %s", dirs[i], strerror(errno));
				free(fs);
				return -1;
			}
		}
	}
	b->priv = fs;
	return 0;
}

static void fs_close(struct backend *b)
{
	struct fs *fs = b->priv;
	if (fs)
		pthread_mutex_destroy(&fs->lock);
	free(b->priv);
	b->priv = NULL;
}

/* ---------------------------------------------------------------- helpers */

static int write_all_at(int fd, const uint8_t *p, size_t len, uint64_t offset)
{
	while (len > 0) {
		ssize_t n = pwrite(fd, p, len, (off_t)offset);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return errno;
		p += n;
		len -= (size_t)n;
		offset += (uint64_t)n;
	}
	return 0;
}

static int read_all_at(int fd, uint8_t *p, size_t len, uint64_t offset, size_t *got)
{
	*got = 0;
	while (*got < len) {
		ssize_t n = pread(fd, p + *got, len - *got, (off_t)(offset + *got));
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return errno;
		if (n == 0)
			break;
		*got += (size_t)n;
	}
	return 0;
}

static int fsync_dir(const char *dir)
{
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return errno;
	int err = fsync(fd) < 0 ? errno : 0;
	close(fd);
	return err;
}

static struct backend_staging *staging_new(struct fs *fs, const struct backend_meta *meta, int *err)
{
	struct backend_staging *s = calloc(1, sizeof(*s));
	if (s == NULL) {
		*err = ENOMEM;
		return NULL;
	}
	s->fs = fs;
	s->meta = *meta;
	s->fd = -1;
	s->dio_fd = -1;
	*err = path_format(s->part, sizeof(s->part), "%s/%" PRIu64 "-%s.part", fs->staging, meta->uid, meta->md5);
	if (*err == 0)
		*err = path_format(s->metafile, sizeof(s->metafile), "%s/%" PRIu64 "-%s.meta", fs->staging, meta->uid,
		    meta->md5);
	if (*err == 0)
		*err = path_format(s->lockfile, sizeof(s->lockfile), "%s/%" PRIu64 "-%s.lock", fs->staging, meta->uid,
		    meta->md5);
	s->lock_fd = -1;
	s->lock_keep = -1;
	if (*err) {
		free(s);
		return NULL;
	}
	return s;
}

/* ---------------------------------------------------------------- the bounded set of open staging files */

static void open_unlink(struct fs *fs, struct backend_staging *s)
{
	if (s->prev)
		s->prev->next = s->next;
	else
		fs->mru = s->next;
	if (s->next)
		s->next->prev = s->prev;
	else
		fs->lru = s->prev;
	s->prev = s->next = NULL;
}

static void open_push(struct fs *fs, struct backend_staging *s)
{
	s->prev = NULL;
	s->next = fs->mru;
	if (fs->mru)
		fs->mru->prev = s;
	fs->mru = s;
	if (fs->lru == NULL)
		fs->lru = s;
}

/* Takes an open .part off the list and closes it, with the lock file kept open beside it (lock held). */
static void open_close(struct fs *fs, struct backend_staging *s)
{
	open_unlink(fs, s);
	close(s->fd);
	s->fd = -1;
	fs->open_count--;
	if (s->dio_fd >= 0) {
		close(s->dio_fd);
		s->dio_fd = -1;
		fs->open_count--;
	}
	if (s->lock_keep >= 0) {
		close(s->lock_keep);
		s->lock_keep = -1;
		fs->open_count--;
	}
}

/* Closes idle files from the least recently used end until at most keep are open (lock held).
 * Returns how many it closed. */
static size_t open_trim(struct fs *fs, size_t keep)
{
	size_t closed = 0;
	struct backend_staging *v = fs->lru;
	while (fs->open_count > keep && v) {
		struct backend_staging *prev = v->prev;
		if (!v->busy) {
			open_close(fs, v);
			closed++;
		}
		v = prev;
	}
	return closed;
}

/* Puts a freshly opened fd on the list, busy, and trims the list to its bound. */
static void open_register(struct backend_staging *s, int fd)
{
	struct fs *fs = s->fs;
	struct stat sb;
	int known = fstat(fd, &sb) == 0;
	pthread_mutex_lock(&fs->lock);
	s->fd = fd;
	s->fd_known = known;
	s->fd_dev = known ? sb.st_dev : 0;
	s->fd_ino = known ? sb.st_ino : 0;
	s->busy = 1;
	open_push(fs, s);
	fs->open_count++;
	open_trim(fs, fs->open_max);
	pthread_mutex_unlock(&fs->lock);
}

/* open(2) that, out of descriptors, closes idle staging files and tries once more. */
static int open_staging(struct fs *fs, const char *path, int flags)
{
	int fd = open(path, flags, 0640);
	if (fd < 0 && (errno == EMFILE || errno == ENFILE)) {
		pthread_mutex_lock(&fs->lock);
		size_t closed = open_trim(fs, fs->open_count / 2);
		pthread_mutex_unlock(&fs->lock);
		if (closed)
			fd = open(path, flags, 0640);
		else
			errno = EMFILE;
	}
	return fd;
}

/* Makes s->fd usable by this thread until staging_release (the entry exists: begin created it). */
static int staging_acquire(struct backend_staging *s)
{
	struct fs *fs = s->fs;
	pthread_mutex_lock(&fs->lock);
	if (s->fd >= 0) {
		s->busy = 1;
		open_unlink(fs, s);
		open_push(fs, s);
		pthread_mutex_unlock(&fs->lock);
		return 0;
	}
	pthread_mutex_unlock(&fs->lock);
	int fd = open_staging(fs, s->part, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return errno;
	open_register(s, fd);
	return 0;
}

static void staging_release(struct backend_staging *s)
{
	pthread_mutex_lock(&s->fs->lock);
	s->busy = 0;
	pthread_mutex_unlock(&s->fs->lock);
}

/* The metadata as one JSON line (backend_meta_encode), written to .meta.tmp and renamed. */
static int meta_write(const struct backend_staging *s)
{
	char *text = malloc(META_MAX + 1);
	size_t len = 0;
	int err = text ? backend_meta_encode(&s->meta, 0, text, META_MAX, &len) : ENOMEM;
	char tmp[PATH_MAX];
	if (err == 0) {
		text[len++] = '\n';
		err = path_format(tmp, sizeof(tmp), "%s.tmp", s->metafile);
	}
	int fd = -1;
	if (err == 0 && (fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640)) < 0)
		err = errno;
	if (fd >= 0) {
		err = write_all_at(fd, (const uint8_t *)text, len, 0);
		if (err == 0 && s->fs->conf->fsync_policy == FSYNC_ALWAYS && fsync(fd) < 0)
			err = errno;
		close(fd);
		if (err == 0 && rename(tmp, s->metafile) < 0)
			err = errno;
		if (err)
			unlink(tmp);
	}
	free(text);
	return err;
}

/* Reads and checks one .meta file; 0 when it describes an upload. */
static int meta_read(const char *path, struct backend_meta *m)
{
	memset(m, 0, sizeof(*m));
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno;
	char *text = malloc(META_MAX + 1);
	size_t n = 0;
	int err = text ? read_all_at(fd, (uint8_t *)text, META_MAX + 1, 0, &n) : ENOMEM;
	close(fd);
	if (err == 0 && n > META_MAX)
		err = EFBIG;
	if (err == 0)
		err = backend_meta_decode(text, n, m, NULL);
	free(text);
	return err;
}

/* ---------------------------------------------------------------- fencing (backend.h) */

/*
 * Nodes sharing the root take turns on an upload through its lease in Redis; the fence
 * makes a node that lost the lease harmless even if it does not know yet. <key>.lock
 * holds the highest fence seen (8 bytes, little endian). Every fenced change opens it,
 * takes an exclusive flock (NFSv4 and CephFS carry these between clients), refuses a
 * lower fence with ESTALE, records a higher one, makes the change and unlocks: the check
 * and the change are one step for every other holder. The file is opened per change (a
 * chunk write keeps it open, unlocked, for the next write while the .part stays open on the
 * bounded list of open files, and counted there), so thousands of idle uploads hold no
 * descriptor, and checked after locking to be the one
 * the path names (discard and publish remove it under the lock, with the entry). A
 * stale holder that comes back after that finds no fence to compare with, so a write
 * also checks that its descriptor is the .part the path names now: a .part published
 * (renamed) or discarded meanwhile is refused, and a new entry at that path has a newer
 * fence. (A lock file such a holder creates again is an orphan the janitor removes.)
 */
static int fence_enter(struct backend_staging *s, uint64_t fence)
{
	if (fence == BACKEND_NO_FENCE)
		return 0;
	for (int tries = 0; tries < 8; tries++) {
		/* The descriptor a previous write kept (only fs_staging_write sets it, its handle busy) is
		 * locked and checked exactly as a fresh one: a lock file removed or replaced meanwhile
		 * fails the comparison with the path below and the next try opens the current one. */
		struct stat held, named;
		pthread_mutex_lock(&s->fs->lock);   /* open_trim closes a kept descriptor under it */
		int fd = s->lock_keep;
		if (fd >= 0) {
			s->lock_keep = -1;
			s->fs->open_count--;
			held.st_dev = s->lock_keep_dev;
			held.st_ino = s->lock_keep_ino;
		}
		pthread_mutex_unlock(&s->fs->lock);
		if (fd < 0) {
			if ((fd = open(s->lockfile, O_RDWR | O_CREAT | O_CLOEXEC, 0640)) < 0)
				return errno;
			if (fstat(fd, &held) < 0) {
				int err = errno;
				close(fd);
				return err;
			}
		}
		int rc;
		while ((rc = flock(fd, LOCK_EX)) < 0 && errno == EINTR)
			;
		if (rc < 0) {
			int err = errno;
			close(fd);
			return err;
		}
		if (stat(s->lockfile, &named) < 0 || named.st_ino != held.st_ino || named.st_dev != held.st_dev) {
			close(fd);   /* removed or replaced while we waited: lock the current one */
			continue;
		}
		uint8_t b[8] = { 0 };
		ssize_t n = pread(fd, b, sizeof(b), 0);
		uint64_t recorded = 0;
		for (int i = 7; n == (ssize_t)sizeof(b) && i >= 0; i--)
			recorded = recorded << 8 | b[i];
		if (fence < recorded) {
			close(fd);
			return ESTALE;
		}
		if (fence > recorded) {
			for (int i = 0; i < 8; i++)
				b[i] = (uint8_t)(fence >> (8 * i));
			int err = write_all_at(fd, b, sizeof(b), 0);
			if (err) {
				close(fd);
				return err;
			}
		}
		s->lock_fd = fd;
		s->lock_fd_dev = held.st_dev;
		s->lock_fd_ino = held.st_ino;
		return 0;
	}
	return EAGAIN;
}

static int fs_staging_fence(struct backend_staging *s, uint64_t *recorded)
{
	*recorded = 0;
	int fd = open(s->lockfile, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? 0 : errno;
	int rc;
	while ((rc = flock(fd, LOCK_SH)) < 0 && errno == EINTR)
		;
	uint8_t b[8];
	ssize_t n = rc == 0 ? pread(fd, b, sizeof(b), 0) : -1;
	int err = rc < 0 || n < 0 ? errno : 0;
	close(fd);
	for (int i = 7; n == (ssize_t)sizeof(b) && i >= 0; i--)
		*recorded = *recorded << 8 | b[i];
	return err;
}

/* Unlocks (closing the descriptor drops the flock). */
static void fence_leave(struct backend_staging *s)
{
	if (s->lock_fd >= 0) {
		close(s->lock_fd);
		s->lock_fd = -1;
	}
}

/* fence_leave for a chunk write: unlocks the lock file and keeps it open for the next write, as
 * long as the .part is open on the list (open_trim and staging_close close both). */
static void fence_leave_keep(struct backend_staging *s)
{
	if (s->lock_fd < 0)
		return;
	if (flock(s->lock_fd, LOCK_UN) < 0) {
		fence_leave(s);
		return;
	}
	struct fs *fs = s->fs;
	pthread_mutex_lock(&fs->lock);
	if (s->fd >= 0 && s->lock_keep < 0) {
		s->lock_keep = s->lock_fd;
		s->lock_keep_dev = s->lock_fd_dev;
		s->lock_keep_ino = s->lock_fd_ino;
		s->lock_fd = -1;
		fs->open_count++;   /* counted against open_max like the .part: idle ones are closed first */
		open_trim(fs, fs->open_max);
	}
	pthread_mutex_unlock(&fs->lock);
	fence_leave(s);   /* closes it unless kept */
}

/* The root answers a stat: a hung file system (NFS, a stopped FUSE daemon) makes this hang, which
 * the storage process counts as unreachable after storage_timeout. */
static int fs_ping(struct backend *b)
{
	struct stat sb;
	return stat(((struct fs *)b->priv)->staging, &sb) < 0 ? errno : 0;
}

/* ---------------------------------------------------------------- staging */

static void fs_staging_close(struct backend_staging *s);

static int fs_staging_begin(struct backend *b, const struct backend_meta *meta, uint64_t fence,
    struct backend_staging **out)
{
	int err;
	struct backend_staging *s = staging_new(b->priv, meta, &err);
	if (s == NULL)
		return err;
	if ((err = fence_enter(s, fence)) != 0) {
		free(s);
		return err;
	}
	/* A new inode rather than truncating the old one: bytes are never written into an inode that
	 * some published name or the content index may share (instant upload). */
	if (unlink(s->part) < 0 && errno != ENOENT) {
		err = errno;
		fence_leave(s);
		free(s);
		return err;
	}
	int fd = open_staging(s->fs, s->part, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC);
	if (fd < 0) {
		err = errno;
		fence_leave(s);
		free(s);
		return err;
	}
	open_register(s, fd);
	err = meta_write(s);
	fence_leave(s);
	staging_release(s);
	if (err) {
		fs_staging_close(s);
		return err;
	}
	*out = s;
	return 0;
}

static int fs_staging_attach(struct backend *b, const struct backend_meta *meta, struct backend_staging **out)
{
	int err;
	*out = staging_new(b->priv, meta, &err);
	return err;
}

/* Metadata or a lock without its .part: a publish (or a discard) that died between its rename and
 * its unlinks. The caller holds the upload's lease, so nobody else is finishing it: finish it, under
 * the entry's lock, as publish_locked would have. (A .part without metadata is a begin that died:
 * left to the janitor.) */
static void orphan_meta_drop(struct backend_staging *s)
{
	int fd = open(s->lockfile, O_RDWR | O_CLOEXEC);
	if (fd >= 0 && flock(fd, LOCK_EX) < 0) {
		close(fd);
		return;
	}
	if (access(s->part, F_OK) < 0 && errno == ENOENT) {
		unlink(s->metafile);
		unlink(s->lockfile);
	}
	if (fd >= 0)
		close(fd);
}

static int fs_staging_find(struct backend *b, uint64_t uid, const char *md5, struct backend_entry *entry,
    struct backend_staging **out)
{
	struct backend_meta key = { .uid = uid };
	memcpy(key.md5, md5, PROTO_MD5_HEX);
	int err;
	struct backend_staging *s = staging_new(b->priv, &key, &err);
	if (s == NULL)
		return err;
	struct stat sb;
	err = meta_read(s->metafile, &entry->meta);
	if (err == 0 && (entry->meta.uid != uid || memcmp(entry->meta.md5, md5, PROTO_MD5_HEX) != 0))
		err = EINVAL;   /* not the metadata its name promises: treated as broken */
	if (err == 0 && stat(s->part, &sb) < 0)
		err = errno;
	if (err == ENOENT)
		orphan_meta_drop(s);   /* finishes a publish cut between its unlinks (meta, then lock) */
	if (err) {
		free(s);
		return err;
	}
	s->meta = entry->meta;
	entry->size = (uint64_t)sb.st_size;
	entry->mtime = sb.st_mtime;
	*out = s;
	return 0;
}

/* Opens s->dio_fd (called under the entry's fence, after fd was checked against the path): the
 * same inode as fd, or ESTALE. EINVAL: the file system does not do direct I/O. */
static int dio_open(struct backend_staging *s)
{
	int fd = open_staging(s->fs, s->part, O_RDWR | O_DIRECT | O_CLOEXEC);
	if (fd < 0)
		return errno;
	struct stat sb;
	if (fstat(fd, &sb) < 0 || sb.st_dev != s->fd_dev || sb.st_ino != s->fd_ino) {
		close(fd);
		return ESTALE;
	}
	pthread_mutex_lock(&s->fs->lock);
	s->dio_fd = fd;
	s->fs->open_count++;
	open_trim(s->fs, s->fs->open_max);   /* idle handles only: this one is busy */
	pthread_mutex_unlock(&s->fs->lock);
	return 0;
}

/* The file system refused a direct open or write: from now on every write goes through the page
 * cache, as it would with direct_io_min = 0. Said once. */
static void dio_refuse(struct fs *fs, int err)
{
	if (atomic_exchange(&fs->dio_refused, 1) == 0)
		log_warnx("the file system under %s refuses direct I/O (%s): chunks go through the page cache",
		    fs->conf->root, strerror(err));
}

/* Bytes at the start of a chunk that may be written with O_DIRECT: its page-aligned part when the
 * chunk is large enough, starts on a page of the file and lies on a page in memory (the worker's
 * ring places every chunk so); else 0. */
static size_t dio_span(const struct backend_staging *s, const uint8_t *p, size_t len, uint64_t offset)
{
	int64_t min = s->fs->conf->direct_io_min;
	if (min <= 0 || len < (uint64_t)min || !s->fd_known || atomic_load(&s->fs->dio_refused) ||
	    offset % DIO_ALIGN != 0 || (uintptr_t)p % DIO_ALIGN != 0)
		return 0;
	return len & ~(size_t)(DIO_ALIGN - 1);
}

/* With fsync = complete, the buffered bytes of an upload start going to the disk a step at a time
 * as they arrive (writeback started, not waited for), so that the fsync before publishing finds
 * little left to write: it made the final chunk of a file written in small chunks the slowest of
 * all (8 MiB files in 32 KiB chunks: docs/performance.md). Unless direct_io_min is 0, the steps
 * before that leave the page cache once written back, as direct writes never enter it: the next
 * chunks reuse the pages just freed instead of pages the machine has not touched lately, which
 * cost several times the copy on the virtual machines measured (one JSON connection: 52-79 against
 * 116-139 MB/s). Pages still dirty or under writeback are left alone by the kernel. */
static void writeback_behind(const struct backend_staging *s, uint64_t from, uint64_t to)
{
	if (s->fs->conf->fsync_policy != FSYNC_COMPLETE || to / WRITEBACK_STEP == from / WRITEBACK_STEP)
		return;
	uint64_t step = to / WRITEBACK_STEP * WRITEBACK_STEP;
	(void)sync_file_range(s->fd, (off_t)(step - WRITEBACK_STEP), WRITEBACK_STEP, SYNC_FILE_RANGE_WRITE);
	if (s->fs->conf->direct_io_min > 0 && step >= WRITEBACK_DROP_LAG)
		(void)posix_fadvise(s->fd, (off_t)(step - WRITEBACK_DROP_LAG), WRITEBACK_STEP, POSIX_FADV_DONTNEED);
}

/* Writes a chunk into the open .part. Its large aligned part skips the page cache: copying into
 * page-cache pages the machine has not touched before was most of an upload's CPU time on the
 * virtual machines measured (docs/performance.md), and an upload's bytes are not read again
 * soon. The unaligned tail (a final chunk's) goes through the page cache; the kernel keeps both
 * views of the file coherent. */
static int chunk_write(struct backend_staging *s, const uint8_t *p, size_t len, uint64_t offset)
{
	size_t direct = dio_span(s, p, len, offset);
	int err = direct > 0 && s->dio_fd < 0 ? dio_open(s) : 0;
	ssize_t n = -1;
	if (direct > 0 && err == 0) {
		do
			n = pwrite(s->dio_fd, p, direct, (off_t)offset);
		while (n < 0 && errno == EINTR);
		if (n < 0)
			err = errno;
	}
	if (err == EINVAL)
		dio_refuse(s->fs, err);
	if (err == ESTALE)
		return err;
	/* Any other failure of the direct path (out of descriptors, say) leaves the chunk to the
	 * buffered write, which reports its own errors. */
	if (n > 0) {
		/* A short write leaves the rest, from a page boundary, to the buffered write. */
		size_t done = (size_t)n & ~(size_t)(DIO_ALIGN - 1);
		p += done;
		len -= done;
		offset += done;
	}
	if ((err = write_all_at(s->fd, p, len, offset)) == 0 && len > 0)
		writeback_behind(s, offset, offset + len);
	return err;
}

static int fs_staging_write(struct backend_staging *s, const void *data, size_t len, uint64_t offset,
    uint64_t fence)
{
	int err = staging_acquire(s);
	if (err)
		return err;
	if ((err = fence_enter(s, fence)) == 0) {
		struct stat held = { .st_dev = s->fd_dev, .st_ino = s->fd_ino }, named;
		if ((!s->fd_known && fstat(s->fd, &held) < 0) || stat(s->part, &named) < 0 ||
		    held.st_ino != named.st_ino || held.st_dev != named.st_dev)
			err = ESTALE;   /* published or discarded by another holder since it was opened */
		else
			err = chunk_write(s, data, len, offset);
		fence_leave_keep(s);
	}
	staging_release(s);
	return err;
}

static int fs_staging_read(struct backend_staging *s, void *buf, size_t len, uint64_t offset, size_t *got)
{
	*got = 0;
	int err = staging_acquire(s);
	if (err)
		return err;
	err = read_all_at(s->fd, buf, len, offset, got);
	staging_release(s);
	return err;
}

static int fs_staging_sync(struct backend_staging *s, enum backend_sync_point point)
{
	int policy = s->fs->conf->fsync_policy;
	if (policy == FSYNC_NONE || (point == BACKEND_SYNC_CHUNK && policy != FSYNC_ALWAYS))
		return 0;
	int err = staging_acquire(s);
	if (err)
		return err;
	if (fsync(s->fd) < 0)
		err = errno;
	staging_release(s);
	return err;
}

static int fs_staging_size(struct backend_staging *s, uint64_t *size)
{
	struct stat sb;
	if (stat(s->part, &sb) < 0)
		return errno;
	*size = (uint64_t)sb.st_size;
	return 0;
}

static int fs_staging_truncate(struct backend_staging *s, uint64_t size, uint64_t fence)
{
	int err = fence_enter(s, fence);
	if (err)
		return err;
	err = truncate(s->part, (off_t)size) < 0 ? errno : 0;
	fence_leave(s);
	return err;
}

static int fs_staging_discard(struct backend_staging *s, uint64_t fence)
{
	int err = fence_enter(s, fence);
	if (err)
		return err;
	err = unlink(s->part) < 0 && errno != ENOENT ? errno : 0;
	if (unlink(s->metafile) < 0 && errno != ENOENT && err == 0)
		err = errno;
	unlink(s->lockfile);   /* under the lock: a waiter sees it gone and locks the next one */
	fence_leave(s);
	return err;
}

static void fs_staging_close(struct backend_staging *s)
{
	if (s == NULL)
		return;
	struct fs *fs = s->fs;
	pthread_mutex_lock(&fs->lock);
	if (s->fd >= 0)
		open_close(fs, s);   /* a lock file is kept only while the .part is open */
	pthread_mutex_unlock(&fs->lock);
	free(s);
}

/* Parses <uid>-<md5>.<ext> names; recovery keeps an entry only when .part and .meta agree. */
/* Only what nobody has touched for upload_ttl is cleaned up: on a root shared by several nodes, a
 * .part without its .meta or a .meta.tmp may be another node's begin in progress. */
static int stale(const struct fs *fs, const char *path)
{
	struct stat sb;
	return lstat(path, &sb) == 0 && time(NULL) - sb.st_mtime >= fs->conf->upload_ttl;
}

static int fs_staging_list(struct backend *b, backend_entry_cb cb, void *arg, size_t *dropped)
{
	struct fs *fs = b->priv;
	*dropped = 0;
	DIR *d = opendir(fs->staging);
	if (d == NULL)
		return errno;
	struct dirent *de;
	int stop = 0;
	while (!stop && (de = readdir(d)) != NULL) {
		const char *dot = strrchr(de->d_name, '.');
		if (dot == NULL || de->d_name[0] == '.')
			continue;
		char path[PATH_MAX], other[PATH_MAX];
		if (path_format(path, sizeof(path), "%s/%s", fs->staging, de->d_name) != 0)
			continue;   /* cannot be one of ours: our names are short */
		int stem = (int)(dot - de->d_name);
		if (strcmp(dot, ".part") == 0) {
			/* A staging file without meta never got past its first write. */
			if (path_format(other, sizeof(other), "%s/%.*s.meta", fs->staging, stem, de->d_name) == 0 &&
			    access(other, F_OK) < 0 && stale(fs, path) && unlink(path) == 0)
				(*dropped)++;   /* not counted twice when its broken .meta took it first */
			continue;
		}
		if (strcmp(dot, ".lock") == 0) {
			/* Kept while its entry exists: it holds the fence. An orphan (a begin that died
			 * before its .part) goes, but only when nobody holds it. */
			char part[PATH_MAX];
			if (path_format(part, sizeof(part), "%s/%.*s.part", fs->staging, stem, de->d_name) == 0 &&
			    path_format(other, sizeof(other), "%s/%.*s.meta", fs->staging, stem, de->d_name) == 0 &&
			    access(part, F_OK) < 0 && access(other, F_OK) < 0 && stale(fs, path)) {
				int fd = open(path, O_RDWR | O_CLOEXEC);
				if (fd >= 0 && flock(fd, LOCK_EX | LOCK_NB) == 0 && access(part, F_OK) < 0)
					unlink(path);
				if (fd >= 0)
					close(fd);
			}
			continue;
		}
		if (strcmp(dot, ".meta") != 0) {
			if (stale(fs, path))
				unlink(path);   /* leftovers of an interrupted meta write */
			continue;
		}
		struct backend_entry e;
		struct stat sb;
		int bad = path_format(other, sizeof(other), "%s/%.*s.part", fs->staging, stem, de->d_name) != 0 ||
		    meta_read(path, &e.meta) != 0 || stat(other, &sb) < 0;
		if (!bad) {
			/* The name must be the one the metadata describes, or its handle would miss the files. */
			char expect[PATH_MAX];
			bad = path_format(expect, sizeof(expect), "%" PRIu64 "-%s", e.meta.uid, e.meta.md5) != 0 ||
			    strlen(expect) != (size_t)stem || memcmp(expect, de->d_name, (size_t)stem) != 0;
		}
		if (bad && !stale(fs, path))
			continue;   /* may be a change in progress on another node: looked at again later */
		if (bad) {
			log_warnx("dropping unreadable staging entry %s", path);
			unlink(path);
			unlink(other);
			(*dropped)++;
			continue;
		}
		e.size = (uint64_t)sb.st_size;
		e.mtime = sb.st_mtime;
		stop = cb(&e, arg);
	}
	closedir(d);
	return 0;
}

/* ---------------------------------------------------------------- published files */

static int publish_locked(struct backend_staging *s, int *flags);

static int fs_publish(struct backend_staging *s, uint64_t fence, int *flags)
{
	*flags = 0;
	int err = fence_enter(s, fence);
	if (err)
		return err;
	err = publish_locked(s, flags);
	fence_leave(s);
	return err;
}

/* Makes <root>/<uid> if it is missing (flushing the root when it was made), and refuses one that
 * is not a directory of its own: a symbolic link planted there would take the published file out
 * of the root. ENOTDIR or mkdir's errno, with BACKEND_PATH_FAILED in flags. */
static int user_dir_make(const struct conf *conf, const char *dir, int *flags)
{
	if (mkdir(dir, 0750) == 0) {
		if (conf->fsync_policy != FSYNC_NONE && fsync_dir(conf->root) != 0)
			log_warn("fsync(%s) failed", conf->root);   /* rare; the directory fsync after publishing decides */
		return 0;
	}
	int err = errno;
	struct stat sb;
	if (err == EEXIST && lstat(dir, &sb) == 0)
		err = S_ISDIR(sb.st_mode) ? 0 : ENOTDIR;
	if (err) {
		if (err == ENOTDIR)
			log_warnx("%s is not a directory (a symbolic link?): nothing is published there", dir);
		*flags |= BACKEND_PATH_FAILED;
	}
	return err;
}

static int publish_locked(struct backend_staging *s, int *flags)
{
	const struct conf *conf = s->fs->conf;
	char dir[PATH_MAX], final[PATH_MAX];
	int err = path_format(dir, sizeof(dir), "%s/%" PRIu64, conf->root, s->meta.uid);
	if (err == 0)
		err = path_format(final, sizeof(final), "%s/%.*s", dir, (int)s->meta.name_len, s->meta.name);
	if (err)
		return err;
	if ((err = user_dir_make(conf, dir, flags)) != 0)
		return err;
	if (rename(s->part, final) < 0)
		return errno;
	unlink(s->metafile);
	unlink(s->lockfile);
	*flags |= BACKEND_PUBLISHED;
	/* The rename may not survive a power cut unless the directory is flushed. */
	return conf->fsync_policy != FSYNC_NONE ? fsync_dir(dir) : 0;
}

/* Opens path for reading if it is a regular file (never through a symbolic link, never waiting on a
 * FIFO); its stat goes to sb. ENOENT for anything else. */
static int file_open_regular_at(int dirfd, const char *path, struct backend_file **out, struct stat *sb)
{
	struct backend_file *f = malloc(sizeof(*f));
	if (f == NULL)
		return ENOMEM;
	f->fd = openat(dirfd, path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
	if (f->fd < 0) {
		int err = errno;
		free(f);
		return err;
	}
	if (fstat(f->fd, sb) < 0 || !S_ISREG(sb->st_mode)) {
		close(f->fd);
		free(f);
		return ENOENT;   /* only regular files are published or stored */
	}
	*out = f;
	return 0;
}

static int file_open_regular(const char *path, struct backend_file **out, struct stat *sb)
{
	return file_open_regular_at(AT_FDCWD, path, out, sb);
}

static void fs_file_close(struct backend_file *f);

static int fs_file_open(const struct backend *b, uint64_t uid, const char *name, size_t name_len,
    struct backend_file **out, uint64_t *size, char version[BACKEND_VERSION_MAX])
{
	char dir[PATH_MAX], leaf[NAME_MAX + 1];
	int err = path_format(dir, sizeof(dir), "%s/%" PRIu64, b->conf->root, uid);
	if (err == 0)
		err = path_format(leaf, sizeof(leaf), "%.*s", (int)name_len, name);
	if (err)
		return err;
	/* <root>/<uid> is opened on its own, never through a symbolic link (publishing refuses one too). */
	int dirfd = open(dir, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (dirfd < 0)
		return errno == ENOTDIR || errno == ELOOP ? ENOENT : errno;
	struct backend_file *f = NULL;
	struct stat sb;
	err = file_open_regular_at(dirfd, leaf, &f, &sb);
	close(dirfd);
	if (err)
		return err;
	/* A replacement is a new inode (rename); inode, size and modification time (ns) tell it apart
	 * even from an inode number the file system reuses later (a new file is written later). Not
	 * the change time: every instant upload of the same content links the inode again, which
	 * changes it, and the bytes under this name did not change. Not the device: nodes sharing
	 * the root over NFS or CephFS see other device numbers for the same file, and must agree on
	 * its version. */
	snprintf(version, BACKEND_VERSION_MAX, "%jx.%jx.%jx.%lx", (uintmax_t)sb.st_ino,
	    (uintmax_t)sb.st_size, (uintmax_t)sb.st_mtim.tv_sec, (unsigned long)sb.st_mtim.tv_nsec);
	*size = (uint64_t)sb.st_size;
	*out = f;
	return 0;
}

static int fs_file_read(struct backend_file *f, void *buf, size_t len, uint64_t offset, size_t *got)
{
	return read_all_at(f->fd, buf, len, offset, got);
}

static void fs_file_close(struct backend_file *f)
{
	if (f == NULL)
		return;
	close(f->fd);
	free(f);
}

/* The descriptor behind a published file: binary downloads sendfile() from it. */
static int fs_file_fd(struct backend_file *f)
{
	return f->fd;
}

/* ---------------------------------------------------------------- the content index (instant upload) */

/*
 * <root>/.content/<md5>-<size> (dedup = global) or u<uid>-<md5>-<size> (dedup = user) is one more
 * hard link of a published file: the same inode, never a copy. An instant upload links it under
 * the new name; the link count tells when no name uses it any more (only the index's link is
 * left), and the janitor removes it then. Entries are only ever made from a file already
 * published (its MD5 checked), and staging never writes into a published inode (staging_begin
 * makes a new one), so an index entry's bytes never change. Temporary links (tmp-*) are named
 * per upload and made under its fence.
 */
static int content_path(const struct fs *fs, const struct backend_content_key *key, char *out, size_t outlen)
{
	if (key->per_user)
		return path_format(out, outlen, "%s/u%" PRIu64 "-%s-%" PRIu64, fs->content, key->owner, key->md5,
		    key->size);
	return path_format(out, outlen, "%s/%s-%" PRIu64, fs->content, key->md5, key->size);
}

static int fs_content_open(const struct backend *b, const struct backend_content_key *key,
    struct backend_file **out, uint64_t *size)
{
	const struct fs *fs = b->priv;
	char path[PATH_MAX];
	int err = content_path(fs, key, path, sizeof(path));
	struct backend_file *f = NULL;
	struct stat sb;
	if (err || (err = file_open_regular(path, &f, &sb)) != 0)
		return err == ELOOP ? ENOENT : err;
	if ((uint64_t)sb.st_size != key->size) {
		fs_file_close(f);
		return ENOENT;   /* not what the key promises: treated as absent */
	}
	*size = (uint64_t)sb.st_size;
	*out = f;
	return 0;
}

/* Enters the file just published at final into the index, unless it has the key already. */
static void content_enter(struct backend_staging *s, const struct backend_content_key *key, const char *final,
    const struct stat *published)
{
	struct fs *fs = s->fs;
	char entry[PATH_MAX], tmp[PATH_MAX];
	if (content_path(fs, key, entry, sizeof(entry)) != 0 ||
	    path_format(tmp, sizeof(tmp), "%s/tmp-%" PRIu64 "-%s.idx", fs->content, s->meta.uid, s->meta.md5) != 0)
		return;
	if (access(entry, F_OK) == 0)
		return;
	unlink(tmp);
	if (link(final, tmp) < 0) {
		log_warn("content index: link(%s) failed", tmp);
		return;
	}
	/* The name may have been replaced since the rename by another upload of this user: only the
	 * inode this upload published enters the index. */
	struct stat sb;
	if (stat(tmp, &sb) == 0 && sb.st_ino == published->st_ino && sb.st_dev == published->st_dev &&
	    link(tmp, entry) < 0 && errno != EEXIST)
		log_warn("content index: link(%s) failed", entry);
	unlink(tmp);
}

static int fs_publish_indexed(struct backend_staging *s, const struct backend_content_key *key, uint64_t fence,
    int *flags)
{
	*flags = 0;
	struct stat staged;
	int err = fence_enter(s, fence);
	if (err)
		return err;
	int have = stat(s->part, &staged) == 0;
	err = publish_locked(s, flags);
	if ((*flags & BACKEND_PUBLISHED) && have) {
		char final[PATH_MAX];
		if (path_format(final, sizeof(final), "%s/%" PRIu64 "/%.*s", s->fs->conf->root, s->meta.uid,
		    (int)s->meta.name_len, s->meta.name) == 0)
			content_enter(s, key, final, &staged);
	}
	fence_leave(s);
	return err;
}

static int fs_publish_from_content(struct backend_staging *s, const struct backend_content_key *key,
    uint64_t fence, int *flags)
{
	*flags = 0;
	struct fs *fs = s->fs;
	const struct conf *conf = fs->conf;
	char entry[PATH_MAX], tmp[PATH_MAX], dir[PATH_MAX], final[PATH_MAX];
	int err = content_path(fs, key, entry, sizeof(entry));
	if (err == 0)
		err = path_format(tmp, sizeof(tmp), "%s/tmp-%" PRIu64 "-%s.pub", fs->content, s->meta.uid, s->meta.md5);
	if (err == 0)
		err = path_format(dir, sizeof(dir), "%s/%" PRIu64, conf->root, s->meta.uid);
	if (err == 0)
		err = path_format(final, sizeof(final), "%s/%.*s", dir, (int)s->meta.name_len, s->meta.name);
	if (err)
		return err;
	if ((err = fence_enter(s, fence)) != 0)
		return err;
	unlink(tmp);
	if (link(entry, tmp) < 0) {
		err = errno;   /* ENOENT: the janitor took it meanwhile; the caller uploads normally */
		fence_leave(s);
		return err;
	}
	struct stat sb;
	if (stat(tmp, &sb) < 0 || (uint64_t)sb.st_size != key->size) {
		unlink(tmp);
		fence_leave(s);
		return ENOENT;
	}
	if ((err = user_dir_make(conf, dir, flags)) != 0) {
		unlink(tmp);
		fence_leave(s);
		return err;
	}
	if (rename(tmp, final) < 0) {
		err = errno;
		unlink(tmp);
		fence_leave(s);
		return err;
	}
	*flags |= BACKEND_PUBLISHED;
	unlink(s->part);
	unlink(s->metafile);
	unlink(s->lockfile);
	fence_leave(s);
	return conf->fsync_policy != FSYNC_NONE ? fsync_dir(dir) : 0;
}

static int fs_content_collect(struct backend *b, size_t *freed, uint64_t *freed_bytes)
{
	struct fs *fs = b->priv;
	*freed = 0;
	*freed_bytes = 0;
	DIR *d = opendir(fs->content);
	if (d == NULL)
		return errno == ENOENT ? 0 : errno;
	struct dirent *de;
	while ((de = readdir(d)) != NULL) {
		if (de->d_name[0] == '.')
			continue;
		char path[PATH_MAX];
		struct stat sb;
		if (path_format(path, sizeof(path), "%s/%s", fs->content, de->d_name) != 0 || lstat(path, &sb) < 0)
			continue;
		if (strncmp(de->d_name, "tmp-", 4) == 0) {
			if (stale(fs, path))
				unlink(path);   /* a publish that died between its two links */
			continue;
		}
		/* Only the index's own link left: no published name uses these bytes. A node linking it
		 * at this moment either got its link first (the name keeps the inode; only the index
		 * entry goes) or fails with ENOENT and uploads normally. */
		if (S_ISREG(sb.st_mode) && sb.st_nlink == 1 && unlink(path) == 0) {
			(*freed)++;
			*freed_bytes += (uint64_t)sb.st_size;
		}
	}
	closedir(d);
	return 0;
}

const struct backend_ops backend_fs = {
	.name = "fs",
	.open = fs_open,
	.close = fs_close,
	.staging_begin = fs_staging_begin,
	.staging_attach = fs_staging_attach,
	.ping = fs_ping,
	.staging_find = fs_staging_find,
	.staging_fence = fs_staging_fence,
	.staging_write = fs_staging_write,
	.staging_read = fs_staging_read,
	.staging_sync = fs_staging_sync,
	.staging_size = fs_staging_size,
	.staging_truncate = fs_staging_truncate,
	.staging_discard = fs_staging_discard,
	.staging_close = fs_staging_close,
	.staging_list = fs_staging_list,
	.publish = fs_publish,
	.file_open = fs_file_open,
	.file_read = fs_file_read,
	.file_close = fs_file_close,
	.file_fd = fs_file_fd,
	.content_open = fs_content_open,
	.publish_indexed = fs_publish_indexed,
	.publish_from_content = fs_publish_from_content,
	.content_collect = fs_content_collect,
};

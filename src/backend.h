/* backend.h: the storage interface: staging entries and published files behind one table of functions chosen by name. */
#ifndef RESOURCED_BACKEND_H
#define RESOURCED_BACKEND_H

#include "proto.h"

#include <stddef.h>
#include <stdint.h>
#include <time.h>

struct conf;

/*
 * Every call below may block (disk, network): call them on pool threads, never on an
 * event loop. The exceptions: backend_open/backend_close; staging_close and file_close,
 * which only free memory and descriptors and must never block; and staging_list,
 * staging_attach and staging_truncate during the storage process's start-up, before its
 * loop runs.
 *
 * Errors are errno values (0 on success). A backend maps its own failures onto the
 * errno a caller already understands: ENOENT (no such entry or file), ENOSPC/EDQUOT/EFBIG
 * (full), EACCES/EPERM/EROFS (refused), ESTALE (fenced out: see below), EIO otherwise.
 *
 * Calls on one staging handle are never concurrent (the storage process runs one step
 * per upload at a time); calls on different handles are. A published-file handle is used
 * by one job at a time. A backend keeps whatever shared state it has thread-safe.
 *
 * Fencing. Every call that changes a staging entry (begin, write, truncate, discard) and
 * publish carry a `fence`: an opaque, increasing token of the writer's right to this
 * upload (for several nodes: the generation of the upload lease held in Redis).
 * BACKEND_NO_FENCE means a single writer, nothing to check. A backend that supports
 * fencing keeps the highest fence seen with the staging entry: a call carrying a lower
 * one fails with ESTALE and changes nothing, a higher one becomes the recorded one (a
 * node taking an upload over attaches and writes with its newer fence), and the check is
 * atomic with the change itself (RADOS: a cmpxattr in the same compound operation; a
 * shared file system: under an flock of the entry's metadata). The fs backend ignores it
 * today: one storage process per root is the only writer.
 */

#define BACKEND_NO_FENCE 0
#define BACKEND_VERSION_MAX 64    /* bytes of a version identifier, with its NUL */

enum backend_role {
	BACKEND_WRITER,   /* the storage process: creates what it needs, owns staging */
	BACKEND_READER,   /* a worker: reads published files only */
};

/* What a staging entry was started with: enough to resume it after a restart. */
struct backend_meta {
	uint64_t uid;
	char md5[PROTO_MD5_HEX + 1];
	char name[PROTO_NAME_MAX + 1];
	uint16_t name_len;
	int kind;                     /* UPLOAD_FILE or UPLOAD_AVATAR */
	uint64_t total_size;
	uint64_t chunk_len;           /* length of chunk 1, to rebuild seq */
};

/* A staging entry found by staging_list. */
struct backend_entry {
	struct backend_meta meta;
	uint64_t size;                /* bytes stored, contiguous from 0 */
	time_t mtime;                 /* last write */
};

/* Moments at which staging_sync is asked to make data durable; the backend applies the fsync policy. */
enum backend_sync_point {
	BACKEND_SYNC_CHUNK,           /* after each chunk: only with fsync = always */
	BACKEND_SYNC_PUBLISH,         /* before the content is checked and published: unless fsync = none */
};

/* Flags publish reports beside its errno. */
#define BACKEND_PUBLISHED 0x1     /* the file is visible under its name (even if an error follows) */
#define BACKEND_PATH_FAILED 0x2   /* the user's directory (or index) could not be created */

struct backend;
struct backend_staging;           /* one upload's staging entry, opaque */
struct backend_file;              /* one published file opened for reading, opaque */

/* Called by the staging_list walk for each readable entry; nonzero stops the walk. */
typedef int (*backend_entry_cb)(const struct backend_entry *entry, void *arg);

struct backend_ops {
	const char *name;             /* the [storage] backend value */
	int (*open)(struct backend *b, enum backend_role role, char *err, size_t errlen);
	void (*close)(struct backend *b);

	/* ---- staging: one entry per upload, named by (uid, md5) */
	/* Creates the entry, or resets an existing one to empty, with its metadata; returns a handle. */
	int (*staging_begin)(struct backend *b, const struct backend_meta *meta, uint64_t fence,
	    struct backend_staging **out);
	/* A handle on an existing entry (from staging_list), without changing it. */
	int (*staging_attach)(struct backend *b, const struct backend_meta *meta, struct backend_staging **out);
	int (*staging_write)(struct backend_staging *s, const void *data, size_t len, uint64_t offset,
	    uint64_t fence);
	/* Reads up to len bytes at offset; *got < len only at the end of the entry. */
	int (*staging_read)(struct backend_staging *s, void *buf, size_t len, uint64_t offset, size_t *got);
	int (*staging_sync)(struct backend_staging *s, enum backend_sync_point point);
	int (*staging_size)(struct backend_staging *s, uint64_t *size);
	/* Cuts the entry to size (recovery drops bytes that cannot count). */
	int (*staging_truncate)(struct backend_staging *s, uint64_t size, uint64_t fence);
	/* Removes the entry's data and metadata; the handle stays valid until staging_close. */
	int (*staging_discard)(struct backend_staging *s, uint64_t fence);
	/* Frees the handle (NULL is ignored); the entry stays (or is gone after discard or publish). */
	void (*staging_close)(struct backend_staging *s);
	/* Walks every entry for crash recovery and the janitor; removes broken ones itself. */
	int (*staging_list)(struct backend *b, backend_entry_cb cb, void *arg, size_t *dropped);

	/* ---- published files: <uid>/<name> */
	/* Makes the entry the file <uid>/<name> atomically (a reader sees the old file or the new one),
	 * durable per the fsync policy; the staging entry is gone afterwards. *flags: BACKEND_PUBLISHED... */
	int (*publish)(struct backend_staging *s, uint64_t fence, int *flags);
	/* Opens a published file; *size and version (a NUL-terminated identifier that changes whenever
	 * the file under that name is replaced) describe what every later read returns. */
	int (*file_open)(const struct backend *b, uint64_t uid, const char *name, size_t name_len,
	    struct backend_file **out, uint64_t *size, char version[BACKEND_VERSION_MAX]);
	int (*file_read)(struct backend_file *f, void *buf, size_t len, uint64_t offset, size_t *got);
	void (*file_close)(struct backend_file *f);   /* NULL is ignored */
};

/* One opened backend: the table and the backend's own state. */
struct backend {
	const struct backend_ops *ops;
	const struct conf *conf;
	void *priv;
};

/* The backend named name, or NULL. */
const struct backend_ops *backend_find(const char *name);
/* The known names, comma-separated, for error messages. */
const char *backend_names(void);

/* Opens the backend named in conf ([storage] backend). On error returns -1 with one line in err. */
int backend_open(struct backend *b, const struct conf *conf, enum backend_role role, char *err, size_t errlen);
void backend_close(struct backend *b);

/* The backends, each in its own file. */
extern const struct backend_ops backend_fs;
#ifdef HAVE_RADOS
extern const struct backend_ops backend_rados;   /* Ceph RADOS: built when configure found librados */
#endif

#endif

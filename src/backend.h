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
 * which only free memory and descriptors and must never block.
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
 * upload: the fence of the upload lease held in Redis (lease.h: the Redis server's clock
 * when the lease was taken, so a later holding has a larger one).
 * BACKEND_NO_FENCE means a single writer, nothing to check. A backend that supports
 * fencing keeps the highest fence seen with the staging entry: a call carrying a lower
 * one fails with ESTALE and changes nothing, a higher one becomes the recorded one (a
 * node taking an upload over attaches and writes with its newer fence), and the check is
 * atomic with the change itself (RADOS: a cmpxattr in the same compound operation; the
 * fs backend: <key>.lock holds the fence and is flocked around each change, see
 * backend_fs.c). The recorded fence lives as long as the entry: begin on a new entry
 * starts from the fence it is given.
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

/*
 * Stored content (instant upload, design.md §5 "Instant upload"). Published files are also
 * indexed by their content: (size, md5), and with [storage] dedup = user also the uid that
 * stored it (owner). A backend keeps the index with the storage itself, so every
 * node sharing it sees the same index, and frees content once no published name uses it.
 */
struct backend_content_key {
	int per_user;                 /* dedup = user: only content this owner stored */
	uint64_t owner;               /* that uid */
	uint64_t size;
	char md5[PROTO_MD5_HEX + 1];
};

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
	/* The entry of (uid, md5) if there is one: its metadata, size, mtime and a handle, without
	 * changing it (an upload taken over from another node or a restarted storage process).
	 * ENOENT when there is none, EINVAL when it is broken. */
	int (*staging_find)(struct backend *b, uint64_t uid, const char *md5, struct backend_entry *entry,
	    struct backend_staging **out);
	int (*staging_write)(struct backend_staging *s, const void *data, size_t len, uint64_t offset,
	    uint64_t fence);
	/* Reads up to len bytes at offset; *got < len only at the end of the entry. */
	int (*staging_read)(struct backend_staging *s, void *buf, size_t len, uint64_t offset, size_t *got);
	int (*staging_sync)(struct backend_staging *s, enum backend_sync_point point);
	int (*staging_size)(struct backend_staging *s, uint64_t *size);
	/* The highest fence recorded with the entry (0 when none is): a holder that took its lease back
	 * with the fence it had checks that nobody changed the entry meanwhile (Redis may have lost
	 * writes). A backend without fencing answers 0. */
	int (*staging_fence)(struct backend_staging *s, uint64_t *recorded);
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
	/* Optional (NULL when the backend has none): a descriptor of the open published file, for
	 * sendfile(2) by the binary fast path; it stays valid until file_close and never blocks. */
	int (*file_fd)(struct backend_file *f);

	/* Optional (NULL: reachable whenever the process runs): one cheap round trip to where the data
	 * lives, 0 when it answered. The storage process calls it every few seconds on a pool thread;
	 * while it fails, or does not return within storage_timeout, the agent-check answers down. */
	int (*ping)(struct backend *b);

	/* ---- stored content, by (size, md5): never a copy, always the same bytes under another name.
	 * A backend without an index leaves these NULL and uploads simply are never instant. */
	/* Opens the content of key for reading (read with file_read, closed with file_close);
	 * ENOENT when the index has none of that size. */
	int (*content_open)(const struct backend *b, const struct backend_content_key *key,
	    struct backend_file **out, uint64_t *size);
	/* publish, and the published file enters the index under key unless the index has that key
	 * already (then the file is published as it is: its bytes are never checked against the
	 * other's here). An index failure is logged, never an error: the file is published. */
	int (*publish_indexed)(struct backend_staging *s, const struct backend_content_key *key,
	    uint64_t fence, int *flags);
	/* Publishes <uid>/<name> of the staging entry s (its metadata; the data need not be there)
	 * from the stored content of key instead, atomically and fenced like publish, and removes
	 * the staging entry. ENOENT (nothing changed) when the content is gone meanwhile; ETIMEDOUT
	 * when the storage did not answer and the entry may be left closed to writes: the caller
	 * answers busy and reads the upload back (staging_find reopens it). */
	int (*publish_from_content)(struct backend_staging *s, const struct backend_content_key *key,
	    uint64_t fence, int *flags);
	/* Removes content that no published name uses any more (the janitor, on a pool thread);
	 * counts what it freed. */
	int (*content_collect)(struct backend *b, size_t *freed, uint64_t *freed_bytes);
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

/*
 * A staging entry's metadata as one JSON object (the fs backend's .meta, the RADOS head's "meta"
 * xattr), written by yajl so that any name is escaped. piece: a backend's own extra field, the
 * piece size of a striped entry; 0 leaves it out. EFBIG when it does not fit in outlen.
 */
int backend_meta_encode(const struct backend_meta *m, uint64_t piece, char *out, size_t outlen, size_t *len);
/* Parses and checks it: 0 when it describes an upload (valid md5 and name). With piece non-NULL
 * the field is required and nonzero; EINVAL otherwise. */
int backend_meta_decode(const char *text, size_t len, struct backend_meta *m, uint64_t *piece);

/* Opens the backend named in conf ([storage] backend). On error returns -1 with one line in err. */
int backend_open(struct backend *b, const struct conf *conf, enum backend_role role, char *err, size_t errlen);
void backend_close(struct backend *b);

/* The backends, each in its own file. */
extern const struct backend_ops backend_fs;
#ifdef HAVE_RADOS
extern const struct backend_ops backend_rados;   /* Ceph RADOS: built when configure found librados */
#endif

#endif

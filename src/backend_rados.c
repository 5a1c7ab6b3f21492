/* backend_rados.c: the Ceph RADOS backend: staging and published files as RADOS objects, names in per-user omap indexes. */
#include "config.h"
#include "backend.h"
#include "conf.h"
#include "log.h"
#include "stats.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <rados/librados.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/*
 * Layout, in the configured pool and namespace (design.md §6, "The RADOS backend"):
 *
 *   staging          omap "<uid>.<md5>" -> the head object of that upload's data
 *   idx.<uid>        omap <name> -> the head object of the published file (the name index)
 *   gc               omap <head> -> "<deadline> <uid> <name>": a replaced version, deleted after gc_grace
 *   d.<md5>.<rand>   head object: bytes [0, piece) and the xattrs below
 *   d.<md5>.<rand>.<k>  bytes [k * piece, (k + 1) * piece) of a larger file
 *   content          omap "<md5>.<size>" or "u<uid>.<md5>.<size>" -> a published head (instant upload)
 *
 * A published head's omap holds its references ("refs", see "stored content" below): every name
 * that was pointed at it ("n:<uid>:<name>") and the content index entry ("c:<key>"). A head is
 * deleted only when none of them still points at it.
 *
 * Head xattrs: "meta" (JSON: uid, md5, name, kind, total_size, chunk_len, piece), "fence"
 * (16 hex digits: ordered as strings as they are as numbers), "state" ("open" while staging,
 * "sealed" once publish checked its fence: no change is accepted after that) and, once sealed,
 * "layout" ("<size>:<piece>", what a reader needs), and "named" ("1" once staging_begin indexed
 * it: the sweep of unnamed objects never deletes a head a begin is indexing, see sweep_head). A
 * data object's name is never reused, so a published version never changes: replacing a file
 * points its name at another object.
 */

#define OID_MAX 64                /* a head: "d.<md5>.<16 hex>" is 51 bytes */
#define PIECE_OID_MAX (OID_MAX + 24)
#define META_MAX 8192
#define FENCE_LEN 16
#define STAGING_OBJ "staging"
#define GC_OBJ "gc"
#define CONTENT_OBJ "content"
#define REF_MAX (PROTO_NAME_MAX + 48)   /* "n:<uid>:<name>" */
#define REFS_PAGE 256             /* references read at once; a head with more counts as in use */
#define OMAP_PAGE 512
#define SWITCH_TRIES 64
/* The collector's bounded passes over "gc" and "content" (collect_page): keys read per pass, and
 * reads spent checking heads per pass (one per head, one per reference it looks up; the check of a
 * head is never cut, so a pass spends at most COLLECT_BUDGET + REFS_PAGE). */
#define COLLECT_PAGE OMAP_PAGE
#define COLLECT_BUDGET 256
#define COLLECT_KEY_MAX 96        /* "gc" keys are heads, "content" keys "u<uid>.<md5>.<size>" */
/* Writes try even on a full cluster, so that it answers ENOSPC instead of blocking. */
#define WRITE_FLAGS LIBRADOS_OPERATION_FULL_TRY

struct rados_be {
	const struct conf *conf;
	rados_t cluster;
	rados_ioctx_t io;
	uint64_t piece;               /* object_size for new uploads */
	/* The collector of replaced versions (writer only). */
	pthread_t gc_thread;
	int gc_started, gc_stop;
	pthread_mutex_t gc_lock;
	pthread_cond_t gc_cond;
	/* The sweep of unnamed data objects (gc thread only): a listing of the namespace that
	 * goes on where the previous pass stopped. */
	rados_list_ctx_t sweep_list;
	int sweep_listing;
	/* The collector's own I/O context: the version of an object it read (rados_get_last_version)
	 * is its own, whatever the other threads do. */
	rados_ioctx_t gc_io;
	/* Where the collection of replaced versions and of the content index go on: the last key
	 * each handled ("" = from the start). */
	char gc_after[COLLECT_KEY_MAX];
	char content_after[COLLECT_KEY_MAX];
};

struct backend_staging {
	struct rados_be *r;
	struct backend_meta meta;
	char head[OID_MAX];           /* "" until known (attach looks it up) */
	uint64_t piece;
	uint64_t fence_known;         /* a fence this handle already recorded on the head and its pieces */
};

struct backend_file {
	struct rados_be *r;
	char head[OID_MAX];
	uint64_t size, piece;
};

/* ---------------------------------------------------------------- helpers */

/* A librados result (-errno) as the errno backend.h promises. */
static int rerr(int r)
{
	switch (-r) {
	case 0:
		return 0;
	case ENOENT:
	case ENOSPC:
	case EDQUOT:
	case EFBIG:
	case EACCES:
	case EPERM:
	case EROFS:
	case ENOMEM:
	case ETIMEDOUT:
		return -r;
	case ENOTCONN:
	case ESHUTDOWN:
	case ECONNREFUSED:
	case EAGAIN:
	case EINTR:
		return ETIMEDOUT;   /* the cluster is unreachable: answered "busy, retry" */
	default:
		return EIO;
	}
}

static void fence_text(uint64_t fence, char out[FENCE_LEN + 1])
{
	snprintf(out, FENCE_LEN + 1, "%016" PRIx64, fence);
}

/* Adds the fence check to op: the recorded fence must not be higher than ours, which becomes
 * the recorded one. A missing fence xattr compares as "", lower than any. */
static void op_fence(rados_write_op_t op, uint64_t fence, char text[FENCE_LEN + 1])
{
	if (fence == BACKEND_NO_FENCE)
		return;
	fence_text(fence, text);
	rados_write_op_cmpxattr(op, "fence", LIBRADOS_CMPXATTR_OP_GTE, text, FENCE_LEN);
	rados_write_op_setxattr(op, "fence", text, FENCE_LEN);
}

static void piece_oid(const char *head, uint64_t k, char out[PIECE_OID_MAX])
{
	if (k == 0)
		snprintf(out, PIECE_OID_MAX, "%.*s", OID_MAX - 1, head);
	else
		snprintf(out, PIECE_OID_MAX, "%.*s.%" PRIu64, OID_MAX - 1, head, k);
}

static void staging_key(const struct backend_meta *m, char *out, size_t outlen)
{
	snprintf(out, outlen, "%" PRIu64 ".%s", m->uid, m->md5);
}

static void index_oid(uint64_t uid, char out[OID_MAX])
{
	snprintf(out, OID_MAX, "idx.%" PRIu64, uid);
}

/* One omap value by key: 0 and the value (NUL-terminated, cut to outlen), ENOENT when absent. */
static int omap_get(struct rados_be *r, const char *oid, const char *key, size_t keylen, char *out, size_t outlen)
{
	rados_read_op_t op = rados_create_read_op();
	rados_omap_iter_t it = NULL;
	int prval = 0;
	const char *keys[1] = { key };
	rados_read_op_omap_get_vals_by_keys2(op, keys, 1, &keylen, &it, &prval);
	int rc = rados_read_op_operate(op, r->io, oid, 0);
	int err = rc < 0 ? rerr(rc) : prval < 0 ? rerr(prval) : ENOENT;
	if (rc >= 0 && prval >= 0) {
		char *k, *v;
		size_t kl, vl;
		if (rados_omap_get_next2(it, &k, &v, &kl, &vl) == 0 && k != NULL) {
			size_t n = vl < outlen - 1 ? vl : outlen - 1;
			memcpy(out, v, n);
			out[n] = '\0';
			err = 0;
		}
	}
	if (it)
		rados_omap_get_end(it);
	rados_release_read_op(op);
	return err;
}

/* Removes key from oid's omap only while it still maps to value (a newer mapping stays). */
static int omap_remove_if(struct rados_be *r, const char *oid, const char *key, const char *value)
{
	rados_write_op_t op = rados_create_write_op();
	int prval = 0;
	size_t keylen = strlen(key);
	const char *keys[1] = { key };
	rados_write_op_omap_cmp(op, key, LIBRADOS_CMPXATTR_OP_EQ, value, strlen(value), &prval);
	rados_write_op_omap_rm_keys2(op, keys, &keylen, 1);
	int rc = rados_write_op_operate(op, r->io, oid, NULL, WRITE_FLAGS);
	rados_release_write_op(op);
	return rc == -ECANCELED || rc == -ENOENT ? 0 : rerr(rc);
}

/* Sets key -> value in oid's omap if key maps to expect ("" = absent); ECANCELED otherwise. */
static int omap_swap(struct rados_be *r, const char *oid, const char *key, size_t keylen, const char *expect,
    const char *value)
{
	for (int created = 0;; created = 1) {
		rados_write_op_t op = rados_create_write_op();
		int prval = 0;
		size_t vlen = strlen(value);
		const char *keys[1] = { key }, *vals[1] = { value };
		rados_write_op_omap_cmp2(op, key, LIBRADOS_CMPXATTR_OP_EQ, expect, keylen, strlen(expect), &prval);
		rados_write_op_omap_set2(op, keys, vals, &keylen, &vlen, 1);
		int rc = rados_write_op_operate(op, r->io, oid, NULL, WRITE_FLAGS);
		rados_release_write_op(op);
		if (rc == -ENOENT && !created) {
			/* The index object does not exist yet: create it (harmless if another thread did). */
			op = rados_create_write_op();
			rados_write_op_create(op, LIBRADOS_CREATE_IDEMPOTENT, NULL);
			rc = rados_write_op_operate(op, r->io, oid, NULL, WRITE_FLAGS);
			rados_release_write_op(op);
			if (rc < 0)
				return rerr(rc);
			continue;
		}
		return rc == -ECANCELED ? ECANCELED : rerr(rc);
	}
}

/* The head's xattrs this backend uses, in one read. */
struct head_attrs {
	char meta[META_MAX];
	size_t meta_len;
	char fence[FENCE_LEN + 1];
	char state[16];
	char layout[64];
	char named[4];
	char prev[OID_MAX];           /* what the name pointed at when the publish sealed it */
	int has_prev;                 /* heads sealed before "prev" existed have none */
};

static int head_read(struct rados_be *r, const char *head, struct head_attrs *h)
{
	memset(h, 0, sizeof(*h));
	rados_read_op_t op = rados_create_read_op();
	rados_xattrs_iter_t it = NULL;
	int prval = 0;
	rados_read_op_getxattrs(op, &it, &prval);
	int rc = rados_read_op_operate(op, r->io, head, 0);
	int err = rc < 0 ? rerr(rc) : prval < 0 ? rerr(prval) : 0;
	if (err == 0) {
		const char *name, *val;
		size_t len;
		while (rados_getxattrs_next(it, &name, &val, &len) == 0 && name != NULL) {
			char *dst = NULL;
			size_t cap = 0;
			if (strcmp(name, "meta") == 0) {
				dst = h->meta, cap = sizeof(h->meta);
				h->meta_len = len < cap ? len : 0;
			} else if (strcmp(name, "fence") == 0) {
				dst = h->fence, cap = sizeof(h->fence);
			} else if (strcmp(name, "state") == 0) {
				dst = h->state, cap = sizeof(h->state);
			} else if (strcmp(name, "layout") == 0) {
				dst = h->layout, cap = sizeof(h->layout);
			} else if (strcmp(name, "named") == 0) {
				dst = h->named, cap = sizeof(h->named);
			} else if (strcmp(name, "prev") == 0) {
				dst = h->prev, cap = sizeof(h->prev);
				h->has_prev = len < cap;
			}
			if (dst && len < cap) {
				if (len > 0)
					memcpy(dst, val, len);   /* an empty attribute comes with val NULL */
				dst[len] = '\0';
			}
		}
	}
	if (it)
		rados_getxattrs_end(it);
	rados_release_read_op(op);
	return err;
}

enum { LAYOUT_MAX = 64 };

static int layout_parse(const char *text, uint64_t *size, uint64_t *piece)
{
	char *end;
	errno = 0;
	unsigned long long s = strtoull(text, &end, 10);
	if (errno || *end != ':')
		return EIO;
	unsigned long long p = strtoull(end + 1, &end, 10);
	if (errno || *end != '\0' || p == 0)
		return EIO;
	*size = s;
	*piece = p;
	return 0;
}

/* A head's "layout" text, for layout_parse: ENOENT when the head or its layout is gone (never
 * sealed, or collected). */
static int head_layout(struct rados_be *r, const char *head, char layout[LAYOUT_MAX])
{
	int n = rados_getxattr(r->io, head, "layout", layout, LAYOUT_MAX - 1);
	if (n == -ENOENT || n == -ENODATA)
		return ENOENT;
	if (n < 0)
		return rerr(n);
	layout[n] = '\0';
	return 0;
}

/* Bytes stored in the pieces of head, contiguous from 0, and the latest mtime. */
static int data_size(struct rados_be *r, const char *head, uint64_t piece, uint64_t *size, time_t *mtime)
{
	*size = 0;
	if (mtime)
		*mtime = 0;
	for (uint64_t k = 0;; k++) {
		char oid[PIECE_OID_MAX];
		piece_oid(head, k, oid);
		uint64_t s = 0;
		time_t t = 0;
		int rc = rados_stat(r->io, oid, &s, &t);
		if (rc == -ENOENT && k > 0)
			return 0;
		if (rc < 0)
			return rerr(rc);
		if (mtime && t > *mtime)
			*mtime = t;
		*size = k * piece + s;
		if (s < piece)
			return 0;
	}
}

/* Reads [offset, offset + len) across pieces; *got is short only at the end of the data. */
static int data_read(struct rados_be *r, const char *head, uint64_t piece, void *buf, size_t len, uint64_t offset,
    size_t *got)
{
	*got = 0;
	while (*got < len) {
		uint64_t at = offset + *got, k = at / piece, in = at % piece;
		size_t want = len - *got;
		if (want > piece - in)
			want = (size_t)(piece - in);
		if (want > (1u << 30))
			want = 1u << 30;   /* rados_read takes an int-sized length */
		char oid[PIECE_OID_MAX];
		piece_oid(head, k, oid);
		int n = rados_read(r->io, oid, (char *)buf + *got, want, in);
		if (n == -ENOENT && k > 0)
			return 0;
		if (n < 0)
			return rerr(n);
		*got += (size_t)n;
		if ((size_t)n < want)
			return 0;
	}
	return 0;
}

/* Removes one object; FULL_TRY, so that deleting works on a full cluster (it makes room). */
static int object_remove(struct rados_be *r, const char *oid)
{
	rados_write_op_t op = rados_create_write_op();
	rados_write_op_remove(op);
	int rc = rados_write_op_operate(op, r->io, oid, NULL, WRITE_FLAGS);
	rados_release_write_op(op);
	return rc == -ENOENT ? 0 : rerr(rc);
}

/* Removes pieces [from, ...) of head, highest first, then head itself when from is 0. */
static int data_remove(struct rados_be *r, const char *head, uint64_t piece, uint64_t from)
{
	uint64_t size = 0;
	int err = data_size(r, head, piece, &size, NULL);
	if (err == ENOENT)
		return 0;
	if (err)
		return err;
	uint64_t pieces = size / piece + 1;
	for (uint64_t k = pieces; k-- > (from ? from : 1);) {
		char oid[PIECE_OID_MAX];
		piece_oid(head, k, oid);
		if ((err = object_remove(r, oid)) != 0)
			return err;
	}
	return from == 0 ? object_remove(r, head) : 0;
}

/* On ECANCELED from a fenced op on head: ESTALE if a higher fence is recorded, else why. */
static int canceled_why(struct rados_be *r, const char *head, uint64_t fence, int otherwise)
{
	struct head_attrs h;
	char mine[FENCE_LEN + 1];
	fence_text(fence, mine);
	if (head_read(r, head, &h) == 0 && fence != BACKEND_NO_FENCE && strcmp(h.fence, mine) > 0)
		return ESTALE;
	return otherwise;
}

/* ---------------------------------------------------------------- references of a published head */

/* "n:<uid>:<name>": the key of a name's reference; returns its length. */
static size_t ref_name(uint64_t uid, const char *name, size_t name_len, char out[REF_MAX])
{
	int n = snprintf(out, REF_MAX, "n:%" PRIu64 ":", uid);
	memcpy(out + n, name, name_len);
	out[(size_t)n + name_len] = '\0';
	return (size_t)n + name_len;
}

/* A reference's value: "<unix time> <random>" when made on a head that may be unnamed meanwhile
 * (young for REF_GRACE: its pointer may not be there yet), "s <random>" when the staging key
 * names the head until its pointer is made (the seal). The random part makes every value
 * unique, so that pruning a stale reference (guarded on its value) never removes a newer one. */
static size_t ref_value(int young, char out[32])
{
	uint8_t rnd[4];
	char hex[9];
	randombytes_buf(rnd, sizeof(rnd));
	sodium_bin2hex(hex, sizeof(hex), rnd, sizeof(rnd));
	int n = young ? snprintf(out, 32, "%lld %s", (long long)time(NULL), hex) : snprintf(out, 32, "s %s", hex);
	return (size_t)n;
}

/* The content index key of key: "<md5>.<size>" or "u<uid>.<md5>.<size>". */
static size_t content_keytext(const struct backend_content_key *key, char out[96])
{
	int n = key->per_user ? snprintf(out, 96, "u%" PRIu64 ".%s.%" PRIu64, key->owner, key->md5, key->size)
	                      : snprintf(out, 96, "%s.%" PRIu64, key->md5, key->size);
	return (size_t)n;
}

/* Adds a young reference to a sealed head (ENOENT: it is gone or not sealed). */
static int ref_add(struct rados_be *r, const char *head, const char *ref, size_t reflen)
{
	char val[32];
	size_t vlen = ref_value(1, val);
	const char *keys[1] = { ref }, *vals[1] = { val };
	rados_write_op_t op = rados_create_write_op();
	rados_write_op_cmpxattr(op, "state", LIBRADOS_CMPXATTR_OP_EQ, "sealed", 6);
	rados_write_op_omap_set2(op, keys, vals, &reflen, &vlen, 1);
	int rc = rados_write_op_operate(op, r->io, head, NULL, WRITE_FLAGS);
	rados_release_write_op(op);
	return rc == -ECANCELED || rc == -ENOENT ? ENOENT : rerr(rc);
}

/* ---------------------------------------------------------------- open and close */

static void *gc_main(void *arg);
static int name_switch(struct rados_be *r, uint64_t uid, const char *name, size_t name_len, const char *head,
    char *old_out, const char *only_from);
static int sealed_finish(struct rados_be *r, const char *key, const char *head, const struct backend_meta *m,
    const struct head_attrs *h);

static int rados_open(struct backend *b, enum backend_role role, char *err, size_t errlen)
{
	const struct conf *conf = b->conf;
	struct rados_be *r = calloc(1, sizeof(*r));
	if (r == NULL) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	r->conf = conf;
	r->piece = (uint64_t)conf->rados_object_size;
	int rc = rados_create(&r->cluster, conf->rados_user[0] ? conf->rados_user : NULL);
	if (rc < 0) {
		snprintf(err, errlen, "rados_create(%s): %s", conf->rados_user, strerror(-rc));
		free(r);
		return -1;
	}
	if ((rc = rados_conf_read_file(r->cluster, conf->rados_conf)) < 0) {
		snprintf(err, errlen, "cannot read [rados] conf %s: %s", conf->rados_conf, strerror(-rc));
		goto fail;
	}
	/* Every wait is bounded, so a down or full cluster is an answer (1027/1028) within
	 * storage_timeout rather than a hang: a chunk takes a few operations in turn. */
	int timeout = conf->rados_op_timeout ? conf->rados_op_timeout : conf->storage_timeout / 3;
	if (timeout < 1)
		timeout = 1;
	char t[16];
	snprintf(t, sizeof(t), "%d", timeout);
	rados_conf_set(r->cluster, "rados_osd_op_timeout", t);
	rados_conf_set(r->cluster, "rados_mon_op_timeout", t);
	rados_conf_set(r->cluster, "client_mount_timeout", t);
	if ((rc = rados_connect(r->cluster)) < 0) {
		snprintf(err, errlen, "cannot connect to the Ceph cluster of %s as client.%s: %s", conf->rados_conf,
		    conf->rados_user, strerror(-rc));
		goto fail;
	}
	/* Which process is which client, for an operator who has to blocklist one. */
	char *addrs = NULL;
	if (rados_getaddrs(r->cluster, &addrs) == 0 && addrs != NULL)
		log_info("rados: connected as client.%" PRIu64 " at %s", rados_get_instance_id(r->cluster), addrs);
	free(addrs);
	if ((rc = rados_ioctx_create(r->cluster, conf->rados_pool, &r->io)) < 0) {
		snprintf(err, errlen, "cannot open pool '%s': %s", conf->rados_pool, strerror(-rc));
		rados_shutdown(r->cluster);
		free(r);
		return -1;
	}
	rados_ioctx_set_namespace(r->io, conf->rados_namespace[0] ? conf->rados_namespace : NULL);
	if (role == BACKEND_WRITER) {
		if ((rc = rados_ioctx_create(r->cluster, conf->rados_pool, &r->gc_io)) < 0) {
			snprintf(err, errlen, "cannot open pool '%s': %s", conf->rados_pool, strerror(-rc));
			rados_ioctx_destroy(r->io);
			rados_shutdown(r->cluster);
			free(r);
			return -1;
		}
		rados_ioctx_set_namespace(r->gc_io, conf->rados_namespace[0] ? conf->rados_namespace : NULL);
	}
	pthread_mutex_init(&r->gc_lock, NULL);
	pthread_cond_init(&r->gc_cond, NULL);
	if (role == BACKEND_WRITER) {
		if (pthread_create(&r->gc_thread, NULL, gc_main, r) != 0) {
			snprintf(err, errlen, "cannot start the collector thread");
			rados_ioctx_destroy(r->gc_io);
			rados_ioctx_destroy(r->io);
			rados_shutdown(r->cluster);
			free(r);
			return -1;
		}
		r->gc_started = 1;
	}
	b->priv = r;
	return 0;
fail:
	rados_shutdown(r->cluster);
	free(r);
	return -1;
}

static void rados_close(struct backend *b)
{
	struct rados_be *r = b->priv;
	if (r == NULL)
		return;
	if (r->gc_started) {
		pthread_mutex_lock(&r->gc_lock);
		r->gc_stop = 1;
		pthread_cond_signal(&r->gc_cond);
		pthread_mutex_unlock(&r->gc_lock);
		pthread_join(r->gc_thread, NULL);
	}
	pthread_mutex_destroy(&r->gc_lock);
	pthread_cond_destroy(&r->gc_cond);
	if (r->gc_io)
		rados_ioctx_destroy(r->gc_io);
	rados_ioctx_destroy(r->io);
	rados_shutdown(r->cluster);
	free(r);
	b->priv = NULL;
}

/* ---------------------------------------------------------------- staging */

static struct backend_staging *staging_new(struct rados_be *r, const struct backend_meta *meta)
{
	struct backend_staging *s = calloc(1, sizeof(*s));
	if (s == NULL)
		return NULL;
	s->r = r;
	s->meta = *meta;
	return s;
}

/* Finds the head of s from the staging index (attach and recovery). */
static int staging_locate(struct backend_staging *s)
{
	if (s->head[0])
		return 0;
	char key[64];
	staging_key(&s->meta, key, sizeof(key));
	char head[OID_MAX];
	int err = omap_get(s->r, STAGING_OBJ, key, strlen(key), head, sizeof(head));
	if (err)
		return err;
	struct head_attrs h;
	if ((err = head_read(s->r, head, &h)) != 0)
		return err;
	struct backend_meta m;
	uint64_t piece;
	if (h.meta_len == 0 || backend_meta_decode(h.meta, h.meta_len, &m, &piece) != 0)
		return EIO;
	snprintf(s->head, sizeof(s->head), "%s", head);
	s->piece = piece;
	return 0;
}

/* Resets an existing open head to empty with new metadata; ECANCELED when it is sealed. */
static int staging_reset(struct backend_staging *s, const char *head, uint64_t fence, const char *meta,
    size_t meta_len)
{
	struct rados_be *r = s->r;
	struct head_attrs h;
	int err = head_read(r, head, &h);
	if (err)
		return err;
	uint64_t old_piece = 0;
	struct backend_meta m;
	if (h.meta_len == 0 || backend_meta_decode(h.meta, h.meta_len, &m, &old_piece) != 0)
		return ECANCELED;   /* unreadable: start a fresh object instead */
	rados_write_op_t op = rados_create_write_op();
	char ftext[FENCE_LEN + 1];
	op_fence(op, fence, ftext);
	rados_write_op_cmpxattr(op, "state", LIBRADOS_CMPXATTR_OP_EQ, "open", 4);
	rados_write_op_truncate(op, 0);
	rados_write_op_setxattr(op, "meta", meta, meta_len);
	int rc = rados_write_op_operate(op, r->io, head, NULL, WRITE_FLAGS);
	rados_release_write_op(op);
	if (rc == -ECANCELED)
		return canceled_why(r, head, fence, ECANCELED);
	if (rc < 0)
		return rerr(rc);
	/* Pieces past the head held the old data: gone, so the size counts from the head again. */
	if ((err = data_remove(r, head, old_piece, 1)) != 0)
		return err;
	/* The meta above records the piece size of this backend now: keep the head's own. */
	s->piece = old_piece;
	if (old_piece != r->piece) {
		char fixed[META_MAX];
		size_t len;
		if ((err = backend_meta_encode(&s->meta, old_piece, fixed, sizeof(fixed), &len)) == 0) {
			rados_write_op_t fix = rados_create_write_op();
			rados_write_op_setxattr(fix, "meta", fixed, len);
			err = rerr(rados_write_op_operate(fix, r->io, head, NULL, WRITE_FLAGS));
			rados_release_write_op(fix);
		}
	}
	return err;
}

static int rados_staging_begin(struct backend *b, const struct backend_meta *meta, uint64_t fence,
    struct backend_staging **out)
{
	struct rados_be *r = b->priv;
	struct backend_staging *s = staging_new(r, meta);
	if (s == NULL)
		return ENOMEM;
	char key[64], old[OID_MAX] = "", text[META_MAX];
	size_t text_len;
	staging_key(meta, key, sizeof(key));
	int err = backend_meta_encode(meta, r->piece, text, sizeof(text), &text_len);
	if (err == 0) {
		err = omap_get(r, STAGING_OBJ, key, strlen(key), old, sizeof(old));
		if (err == ENOENT) {
			old[0] = '\0';
			err = 0;
		}
	}
	if (err == 0 && old[0]) {
		err = staging_reset(s, old, fence, text, text_len);
		if (err == 0) {
			snprintf(s->head, sizeof(s->head), "%s", old);
			s->fence_known = fence;
			*out = s;
			return 0;
		}
		if (err == ECANCELED) {
			/* Not open. Sealed: a publish stopped after its seal, and its name may point at the
			 * head already: finished (which drops the key), never deleted. Linked or unreadable:
			 * replaced by a fresh head below, then deleted. */
			struct head_attrs h;
			struct backend_meta m;
			uint64_t piece;
			err = head_read(r, old, &h);
			if (err == 0 && strcmp(h.state, "sealed") == 0 && h.meta_len &&
			    backend_meta_decode(h.meta, h.meta_len, &m, &piece) == 0 && m.uid == meta->uid &&
			    memcmp(m.md5, meta->md5, PROTO_MD5_HEX) == 0 && (err = sealed_finish(r, key, old, &m, &h)) == 0)
				old[0] = '\0';
		}
		if (err == ENOENT)
			err = 0;   /* gone: a fresh object below */
	}
	if (err) {
		free(s);
		return err;
	}
	/* A fresh head under a name never used before: created complete, indexed, then marked
	 * named. A crash before the mark leaves an object nothing may point to, which the sweep of
	 * unnamed objects deletes once it is old (sweep_head); the mark is what tells this begin
	 * whether the sweep got there first. */
	for (int tries = 0;; tries++) {
		uint8_t rnd[8];
		char hex[17];
		randombytes_buf(rnd, sizeof(rnd));
		sodium_bin2hex(hex, sizeof(hex), rnd, sizeof(rnd));
		snprintf(s->head, sizeof(s->head), "d.%s.%s", meta->md5, hex);
		s->piece = r->piece;
		char ftext[FENCE_LEN + 1];
		fence_text(fence, ftext);
		rados_write_op_t op = rados_create_write_op();
		rados_write_op_create(op, LIBRADOS_CREATE_EXCLUSIVE, NULL);
		rados_write_op_setxattr(op, "meta", text, text_len);
		rados_write_op_setxattr(op, "fence", ftext, FENCE_LEN);
		rados_write_op_setxattr(op, "state", "open", 4);
		int rc = rados_write_op_operate(op, r->io, s->head, NULL, WRITE_FLAGS);
		rados_release_write_op(op);
		if (rc < 0) {
			free(s);
			return rerr(rc);
		}
		err = omap_swap(r, STAGING_OBJ, key, strlen(key), old, s->head);
		if (err) {
			object_remove(r, s->head);
			free(s);
			return err == ECANCELED ? ESTALE : err;   /* another writer started this upload meanwhile */
		}
		/* Named: from now on the sweep leaves the head alone (its delete asserts "named" is what it
		 * read, unset). Refused (the head is gone) only when this begin stalled between the create
		 * and the index for longer than the sweep's grace: undo the index and start again. */
		op = rados_create_write_op();
		rados_write_op_cmpxattr(op, "state", LIBRADOS_CMPXATTR_OP_EQ, "open", 4);
		rados_write_op_setxattr(op, "named", "1", 1);
		rc = rados_write_op_operate(op, r->io, s->head, NULL, WRITE_FLAGS);
		rados_release_write_op(op);
		if (rc == 0)
			break;
		int unindex = omap_remove_if(r, STAGING_OBJ, key, s->head);
		if ((rc != -ENOENT && rc != -ECANCELED) || unindex != 0 || tries == 1) {
			free(s);
			return rc == -ENOENT || rc == -ECANCELED ? ETIMEDOUT : rerr(rc);
		}
		log_warnx("rados: the sweep removed the head of %s before it was marked named: beginning again", key);
		old[0] = '\0';
	}
	if (old[0])
		data_remove(r, old, r->piece, 0);   /* a broken old entry: best effort */
	s->fence_known = fence;
	*out = s;
	return 0;
}

static int rados_staging_attach(struct backend *b, const struct backend_meta *meta, struct backend_staging **out)
{
	struct backend_staging *s = staging_new(b->priv, meta);
	if (s == NULL)
		return ENOMEM;
	int err = staging_locate(s);
	if (err) {
		free(s);
		return err;
	}
	*out = s;
	return 0;
}

static int fence_parse(const char *text, uint64_t *fence)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(text, &end, 16);
	if (errno || end == text || *end != '\0')
		return EIO;
	*fence = v;
	return 0;
}

/* Records fence on the head and on every existing piece before this handle changes anything
 * under it (a node taking an upload over): from then on a writer with a lower fence is refused
 * on every object of the entry, not only on the one the new holder happens to write first. */
static int fence_raise(struct backend_staging *s, uint64_t fence)
{
	if (fence == BACKEND_NO_FENCE || fence <= s->fence_known)
		return 0;
	struct rados_be *r = s->r;
	char ftext[FENCE_LEN + 1];
	rados_write_op_t op = rados_create_write_op();
	rados_write_op_cmpxattr(op, "state", LIBRADOS_CMPXATTR_OP_EQ, "open", 4);
	op_fence(op, fence, ftext);
	int rc = rados_write_op_operate(op, r->io, s->head, NULL, WRITE_FLAGS);
	rados_release_write_op(op);
	if (rc == -ECANCELED)
		return canceled_why(r, s->head, fence, ESTALE);
	if (rc < 0)
		return rerr(rc);
	uint64_t size = 0;
	int err = data_size(r, s->head, s->piece, &size, NULL);
	for (uint64_t k = 1; err == 0 && k <= size / s->piece; k++) {
		char oid[PIECE_OID_MAX];
		piece_oid(s->head, k, oid);
		op = rados_create_write_op();
		rados_write_op_assert_exists(op);
		op_fence(op, fence, ftext);
		rc = rados_write_op_operate(op, r->io, oid, NULL, WRITE_FLAGS);
		rados_release_write_op(op);
		if (rc == -ECANCELED)
			err = ESTALE;
		else if (rc < 0 && rc != -ENOENT)
			err = rerr(rc);
	}
	if (err == 0)
		s->fence_known = fence;
	return err;
}

/*
 * A "linked" entry (a publish from stored content closed it) found by staging_find. If its name
 * holds a head of its md5, the switch was done (or the name had these bytes already): EINVAL, a
 * broken entry that seq 1 replaces. Otherwise the switch never happened (the publish failed and so
 * did its reopen, or the process stopped before the switch): reopened, guarded on the state and
 * fence read, so that the upload goes on from the chunk it stored instead of starting over. A
 * publish still under way on another node may switch the name after this: the name then holds
 * the proven content, and this upload finds its entry gone (ENOENT) and its file published.
 */
static int linked_reopen(struct rados_be *r, const char *head, const struct backend_meta *m,
    const struct head_attrs *h)
{
	char idx[OID_MAX], named[OID_MAX] = "";
	index_oid(m->uid, idx);
	int err = omap_get(r, idx, m->name, m->name_len, named, sizeof(named));
	if (err && err != ENOENT)
		return err;
	if (err == 0 && strlen(named) > 3 + PROTO_MD5_HEX && strncmp(named, "d.", 2) == 0 &&
	    memcmp(named + 2, m->md5, PROTO_MD5_HEX) == 0 && named[2 + PROTO_MD5_HEX] == '.')
		return EINVAL;
	rados_write_op_t op = rados_create_write_op();
	rados_write_op_cmpxattr(op, "state", LIBRADOS_CMPXATTR_OP_EQ, "linked", 6);
	if (h->fence[0])
		rados_write_op_cmpxattr(op, "fence", LIBRADOS_CMPXATTR_OP_EQ, h->fence, strlen(h->fence));
	rados_write_op_setxattr(op, "state", "open", 4);
	int rc = rados_write_op_operate(op, r->io, head, NULL, WRITE_FLAGS);
	rados_release_write_op(op);
	if (rc == -ECANCELED)
		return ESTALE;   /* changed meanwhile: read it again */
	if (rc == -ENOENT)
		return EINVAL;   /* indexed but gone */
	if (rc < 0)
		return rerr(rc);
	log_info("rados: reopened %" PRIu64 "/%s, whose publish from stored content stopped before its name switch",
	    m->uid, m->md5);
	return 0;
}

static int rados_staging_find(struct backend *b, uint64_t uid, const char *md5, struct backend_entry *entry,
    struct backend_staging **out)
{
	struct rados_be *r = b->priv;
	struct backend_meta want = { .uid = uid };
	memcpy(want.md5, md5, PROTO_MD5_HEX);
	char key[64], head[OID_MAX];
	staging_key(&want, key, sizeof(key));
	int err = omap_get(r, STAGING_OBJ, key, strlen(key), head, sizeof(head));
	if (err)
		return err;
	struct head_attrs h;
	if ((err = head_read(r, head, &h)) != 0)
		return err == ENOENT ? EINVAL : err;   /* indexed but gone: broken, seq 1 replaces it */
	memset(entry, 0, sizeof(*entry));
	uint64_t piece = 0, recorded = 0;
	if (h.meta_len == 0 || backend_meta_decode(h.meta, h.meta_len, &entry->meta, &piece) != 0 ||
	    entry->meta.uid != uid || memcmp(entry->meta.md5, md5, PROTO_MD5_HEX) != 0 ||
	    (h.fence[0] && fence_parse(h.fence, &recorded) != 0))
		return EINVAL;
	if (strcmp(h.state, "linked") == 0 && (err = linked_reopen(r, head, &entry->meta, &h)) != 0)
		return err;
	if (strcmp(h.state, "sealed") == 0) {
		/* Its MD5 was checked and its publish sealed it: another holder is publishing it, or
		 * stopped before the key was dropped. Finishing it is idempotent (sealed_finish). */
		return (err = sealed_finish(r, key, head, &entry->meta, &h)) != 0 ? err : ENOENT;
	}
	if ((err = data_size(r, head, piece, &entry->size, &entry->mtime)) != 0)
		return err;
	struct backend_staging *s = staging_new(r, &entry->meta);
	if (s == NULL)
		return ENOMEM;
	snprintf(s->head, sizeof(s->head), "%s", head);
	s->piece = piece;
	s->fence_known = recorded;
	*out = s;
	return 0;
}

/* The fence on the head: fence_raise puts every holder's there before it changes anything. An
 * entry that is gone or sealed (published) records none any more: 0, as the fs backend's. */
static int rados_staging_fence(struct backend_staging *s, uint64_t *recorded)
{
	*recorded = 0;
	int err = staging_locate(s);
	struct head_attrs h;
	if (err == 0)
		err = head_read(s->r, s->head, &h);
	if (err == ENOENT)
		return 0;
	if (err)
		return err;
	if (strcmp(h.state, "open") != 0 || h.fence[0] == '\0')
		return 0;
	return fence_parse(h.fence, recorded);
}

/* Writes one piece's part: the fence (and, on the head, the open state) checked in the same op. */
static int piece_write(struct backend_staging *s, uint64_t k, const char *data, size_t len, uint64_t in,
    uint64_t fence)
{
	struct rados_be *r = s->r;
	char oid[PIECE_OID_MAX], ftext[FENCE_LEN + 1];
	piece_oid(s->head, k, oid);
	for (int attempt = 0; attempt < 3; attempt++) {
		rados_write_op_t op = rados_create_write_op();
		if (k == 0) {
			rados_write_op_cmpxattr(op, "state", LIBRADOS_CMPXATTR_OP_EQ, "open", 4);
			op_fence(op, fence, ftext);
		} else if (fence != BACKEND_NO_FENCE && attempt > 0) {
			/* A new piece: the head's fence was just checked; the piece starts with ours. */
			rados_write_op_create(op, LIBRADOS_CREATE_EXCLUSIVE, NULL);
			fence_text(fence, ftext);
			rados_write_op_setxattr(op, "fence", ftext, FENCE_LEN);
		} else {
			op_fence(op, fence, ftext);
		}
		rados_write_op_write(op, data, len, in);
		int rc = rados_write_op_operate(op, r->io, oid, NULL, WRITE_FLAGS);
		rados_release_write_op(op);
		if (rc == -ECANCELED)
			return k == 0 ? canceled_why(r, oid, fence, ESTALE) : ESTALE;
		if (rc == -ENOENT && k == 0)
			return ENOENT;
		if (rc == -ENOENT && fence != BACKEND_NO_FENCE && attempt == 0) {
			/* The piece is new: check (and raise) the fence on the head before creating it. */
			rados_write_op_t hop = rados_create_write_op();
			rados_write_op_cmpxattr(hop, "state", LIBRADOS_CMPXATTR_OP_EQ, "open", 4);
			op_fence(hop, fence, ftext);
			rc = rados_write_op_operate(hop, r->io, s->head, NULL, WRITE_FLAGS);
			rados_release_write_op(hop);
			if (rc == -ECANCELED)
				return canceled_why(r, s->head, fence, ESTALE);
			if (rc < 0)
				return rerr(rc);
			continue;
		}
		if (rc == -EEXIST)
			continue;   /* created meanwhile: the fenced path again */
		return rerr(rc);
	}
	return ESTALE;
}

static int rados_staging_write(struct backend_staging *s, const void *data, size_t len, uint64_t offset,
    uint64_t fence)
{
	int err = staging_locate(s);
	if (err == 0)
		err = fence_raise(s, fence);
	size_t done = 0;
	while (err == 0 && done < len) {
		uint64_t at = offset + done, k = at / s->piece, in = at % s->piece;
		size_t n = len - done;
		if (n > s->piece - in)
			n = (size_t)(s->piece - in);
		err = piece_write(s, k, (const char *)data + done, n, in, fence);
		done += n;
	}
	return err;
}

static int rados_staging_read(struct backend_staging *s, void *buf, size_t len, uint64_t offset, size_t *got)
{
	*got = 0;
	int err = staging_locate(s);
	return err ? err : data_read(s->r, s->head, s->piece, buf, len, offset, got);
}

static int rados_staging_sync(struct backend_staging *s, enum backend_sync_point point)
{
	/* A RADOS write is acknowledged once every replica holds it: nothing more to flush. */
	(void)s;
	(void)point;
	return 0;
}

static int rados_staging_size(struct backend_staging *s, uint64_t *size)
{
	int err = staging_locate(s);
	return err ? err : data_size(s->r, s->head, s->piece, size, NULL);
}

static int rados_staging_truncate(struct backend_staging *s, uint64_t size, uint64_t fence)
{
	struct rados_be *r = s->r;
	int err = staging_locate(s);
	if (err == 0)
		err = fence_raise(s, fence);
	if (err)
		return err;
	/* Fenced on the head first, so a fenced-out writer cuts nothing. */
	rados_write_op_t op = rados_create_write_op();
	char ftext[FENCE_LEN + 1];
	rados_write_op_cmpxattr(op, "state", LIBRADOS_CMPXATTR_OP_EQ, "open", 4);
	op_fence(op, fence, ftext);
	if (size < s->piece)
		rados_write_op_truncate(op, size);
	int rc = rados_write_op_operate(op, r->io, s->head, NULL, WRITE_FLAGS);
	rados_release_write_op(op);
	if (rc == -ECANCELED)
		return canceled_why(r, s->head, fence, ESTALE);
	if (rc < 0)
		return rerr(rc);
	uint64_t k = size / s->piece;
	if ((err = data_remove(r, s->head, s->piece, k + 1)) != 0)
		return err;
	if (k > 0) {
		char oid[PIECE_OID_MAX];
		piece_oid(s->head, k, oid);
		op = rados_create_write_op();
		rados_write_op_truncate(op, size % s->piece);
		rc = rados_write_op_operate(op, r->io, oid, NULL, WRITE_FLAGS);
		rados_release_write_op(op);
		if (rc < 0 && rc != -ENOENT)
			return rerr(rc);
	}
	return 0;
}

static int rados_staging_discard(struct backend_staging *s, uint64_t fence)
{
	struct rados_be *r = s->r;
	int err = staging_locate(s);
	if (err)
		return err == ENOENT ? 0 : err;
	if (fence != BACKEND_NO_FENCE) {
		/* The fence is checked (and raised) first: a fenced-out writer removes nothing. */
		rados_write_op_t op = rados_create_write_op();
		char ftext[FENCE_LEN + 1];
		op_fence(op, fence, ftext);
		int rc = rados_write_op_operate(op, r->io, s->head, NULL, WRITE_FLAGS);
		rados_release_write_op(op);
		if (rc == -ECANCELED)
			return ESTALE;
		if (rc < 0 && rc != -ENOENT)
			return rerr(rc);
	}
	char key[64];
	staging_key(&s->meta, key, sizeof(key));
	/* A sealed head passed its MD5 check and its name may point at it already (a publish whose
	 * switch the cluster applied but answered too late, then abandoned): finished, never deleted. */
	struct head_attrs h;
	if ((err = head_read(r, s->head, &h)) != 0 && err != ENOENT)
		return err;
	if (err == 0 && strcmp(h.state, "sealed") == 0)
		return sealed_finish(r, key, s->head, &s->meta, &h);
	/* Data first, then the index entry: a crash in between leaves an entry that recovery drops. */
	if ((err = data_remove(r, s->head, s->piece, 0)) != 0)
		return err;
	return omap_remove_if(r, STAGING_OBJ, key, s->head);
}

static void rados_staging_close(struct backend_staging *s)
{
	free(s);
}

/* ---------------------------------------------------------------- publishing */

/* Queues head in gc: deleted once gc_grace is over and nothing uses it any more (gc_sweep). */
static int gc_queue(struct rados_be *r, const char *head, uint64_t uid, const char *name, size_t name_len)
{
	char val[PROTO_NAME_MAX + 64];
	int n = snprintf(val, sizeof(val), "%lld %" PRIu64 " ", (long long)time(NULL) + r->conf->rados_gc_grace, uid);
	memcpy(val + n, name, name_len);
	val[n + (int)name_len] = '\0';
	const char *keys[1] = { head }, *vals[1] = { val };
	size_t kl = strlen(head), vl = (size_t)n + name_len;
	rados_write_op_t op = rados_create_write_op();
	rados_write_op_omap_set2(op, keys, vals, &kl, &vl, 1);
	int rc = rados_write_op_operate(op, r->io, GC_OBJ, NULL, WRITE_FLAGS);
	rados_release_write_op(op);
	return rerr(rc);
}

/* Points <uid>/<name> at head; a replaced version is queued for deletion first (crash-safe:
 * the collector deletes only what no name points to any more). With only_from, only while the
 * name points there (or at head already): ECANCELED when it points at anything else. */
static int name_switch(struct rados_be *r, uint64_t uid, const char *name, size_t name_len, const char *head,
    char *old_out, const char *only_from)
{
	char idx[OID_MAX];
	index_oid(uid, idx);
	for (int i = 0; i < SWITCH_TRIES; i++) {
		char old[OID_MAX] = "";
		int err = omap_get(r, idx, name, name_len, old, sizeof(old));
		if (err == ENOENT)
			old[0] = '\0';
		else if (err)
			return err;
		if (old_out)
			snprintf(old_out, OID_MAX, "%s", old);
		if (strcmp(old, head) == 0)
			return 0;   /* done before (recovery rolling a publish forward) */
		if (only_from && strcmp(old, only_from) != 0)
			return ECANCELED;
		if (old[0] && (err = gc_queue(r, old, uid, name, name_len)) != 0)
			return err;
		err = omap_swap(r, idx, name, name_len, old, head);
		if (err != ECANCELED)
			return err;
	}
	return ETIMEDOUT;   /* the name kept changing under us: busy, retry */
}

/*
 * Finishes the publish of a sealed head that its staging key still names (the process stopped
 * between the seal and the removal of the key, or the switch failed, perhaps after the cluster
 * applied it): recovery, a takeover (staging_find), a begin or a discard of the same upload. The
 * MD5 was checked, so the name goes to head, but only if it still points where it pointed at the
 * seal ("prev"): pointing at anything else, another publish replaced the name since (after this
 * one's switch, or before it was done: then that one came last), and rolling the name "forward"
 * would undo an acknowledged file. A gc entry of head says the same (the switch was done and the
 * name moved on since), even when the name came back to prev meanwhile. A head the name does not
 * get is queued in gc like any replaced version. Then the staging key goes.
 */
static int sealed_finish(struct rados_be *r, const char *key, const char *head, const struct backend_meta *m,
    const struct head_attrs *h)
{
	int err;
	if (!h->has_prev) {
		err = name_switch(r, m->uid, m->name, m->name_len, head, NULL, NULL);   /* sealed before "prev" */
	} else {
		char val[PROTO_NAME_MAX + 64];
		err = omap_get(r, GC_OBJ, head, strlen(head), val, sizeof(val));
		if (err == 0)
			err = ECANCELED;
		else if (err == ENOENT)
			err = name_switch(r, m->uid, m->name, m->name_len, head, NULL, h->prev);
		if (err == ECANCELED) {
			log_info("rados: %s was published and replaced since, or replaced before its publish was done: "
			         "its name stays", key);
			err = gc_queue(r, head, m->uid, m->name, m->name_len);
		}
	}
	if (err == 0)
		err = omap_remove_if(r, STAGING_OBJ, key, head);
	return err;
}

static int rados_publish(struct backend_staging *s, uint64_t fence, int *flags)
{
	struct rados_be *r = s->r;
	*flags = 0;
	int err = staging_locate(s);
	uint64_t size = 0;
	if (err == 0)
		err = data_size(r, s->head, s->piece, &size, NULL);
	/* Where the name points now: recorded with the seal, so that whoever finishes an interrupted
	 * publish can tell whether the name moved on since (sealed_finish). */
	char idx[OID_MAX], prev[OID_MAX] = "";
	index_oid(s->meta.uid, idx);
	if (err == 0 && (err = omap_get(r, idx, s->meta.name, s->meta.name_len, prev, sizeof(prev))) == ENOENT) {
		prev[0] = '\0';
		err = 0;
	}
	if (err)
		return err;
	/* Seal: the fence checked and the state closed in one op; nothing changes the data after. */
	char layout[64], ftext[FENCE_LEN + 1];
	int n = snprintf(layout, sizeof(layout), "%" PRIu64 ":%" PRIu64, size, s->piece);
	rados_write_op_t op = rados_create_write_op();
	rados_write_op_cmpxattr(op, "state", LIBRADOS_CMPXATTR_OP_EQ, "open", 4);
	op_fence(op, fence, ftext);
	rados_write_op_setxattr(op, "state", "sealed", 6);
	rados_write_op_setxattr(op, "layout", layout, (size_t)n);
	rados_write_op_setxattr(op, "prev", prev, strlen(prev));
	/* The name about to point here, among the head's references (never "young": until the
	 * switch is done the staging key names the head). */
	char ref[REF_MAX], refval[32];
	size_t reflen = ref_name(s->meta.uid, s->meta.name, s->meta.name_len, ref), refvlen = ref_value(0, refval);
	const char *rkeys[1] = { ref }, *rvals[1] = { refval };
	rados_write_op_omap_set2(op, rkeys, rvals, &reflen, &refvlen, 1);
	int rc = rados_write_op_operate(op, r->io, s->head, NULL, WRITE_FLAGS);
	rados_release_write_op(op);
	if (rc == -ECANCELED) {
		struct head_attrs h;
		err = canceled_why(r, s->head, fence, EIO);
		if (err == EIO && head_read(r, s->head, &h) == 0 && strcmp(h.state, "sealed") == 0 &&
		    strcmp(h.layout, layout) == 0)
			err = 0;   /* sealed by an earlier attempt whose switch failed */
		if (err)
			return err;
	} else if (rc < 0) {
		return rerr(rc);
	}
	if ((err = name_switch(r, s->meta.uid, s->meta.name, s->meta.name_len, s->head, NULL, NULL)) != 0)
		return err;
	*flags |= BACKEND_PUBLISHED;
	char key[64];
	staging_key(&s->meta, key, sizeof(key));
	if (omap_remove_if(r, STAGING_OBJ, key, s->head) != 0)
		log_warnx("rados: cannot drop the staging entry %s (recovery will)", key);
	return 0;
}

/* ---------------------------------------------------------------- recovery */

struct list_page {
	char key[64];
	char head[OID_MAX];
};

static int rados_staging_list(struct backend *b, backend_entry_cb cb, void *arg, size_t *dropped)
{
	struct rados_be *r = b->priv;
	*dropped = 0;
	char after[64] = "";
	struct list_page *page = calloc(OMAP_PAGE, sizeof(*page));
	if (page == NULL)
		return ENOMEM;
	int err = 0, stop = 0;
	unsigned char more = 1;
	while (!stop && more && err == 0) {
		rados_read_op_t op = rados_create_read_op();
		rados_omap_iter_t it = NULL;
		int prval = 0;
		rados_read_op_omap_get_vals2(op, after[0] ? after : NULL, NULL, OMAP_PAGE, &it, &more, &prval);
		int rc = rados_read_op_operate(op, r->io, STAGING_OBJ, 0);
		size_t count = 0;
		if (rc == -ENOENT) {
			more = 0;   /* nothing staged yet */
		} else if (rc < 0 || prval < 0) {
			err = rerr(rc < 0 ? rc : prval);
		} else {
			char *k, *v;
			size_t kl, vl;
			while (count < OMAP_PAGE && rados_omap_get_next2(it, &k, &v, &kl, &vl) == 0 && k != NULL) {
				if (kl < sizeof(page[count].key) && vl < sizeof(page[count].head)) {
					memcpy(page[count].key, k, kl);
					page[count].key[kl] = '\0';
					memcpy(page[count].head, v, vl);
					page[count].head[vl] = '\0';
					count++;
				}
				if (kl < sizeof(after)) {
					memcpy(after, k, kl);
					after[kl] = '\0';
				}
			}
		}
		if (it)
			rados_omap_get_end(it);
		rados_release_read_op(op);
		for (size_t i = 0; i < count && !stop && err == 0; i++) {
			struct list_page *p = &page[i];
			struct head_attrs h;
			struct backend_entry e;
			memset(&e, 0, sizeof(e));
			uint64_t piece = 0;
			int herr = head_read(r, p->head, &h);
			if (herr && herr != ENOENT) {
				err = herr;   /* the cluster, not the entry: stop rather than drop */
				break;
			}
			char expect[64];
			int bad = herr != 0 || h.meta_len == 0 || backend_meta_decode(h.meta, h.meta_len, &e.meta, &piece) != 0;
			if (!bad) {
				staging_key(&e.meta, expect, sizeof(expect));
				bad = strcmp(expect, p->key) != 0;
			}
			if (bad) {
				log_warnx("rados: dropping unreadable staging entry %s -> %s", p->key, p->head);
				if (herr == 0)
					data_remove(r, p->head, piece ? piece : r->piece, 0);
				omap_remove_if(r, STAGING_OBJ, p->key, p->head);
				(*dropped)++;
				continue;
			}
			if (strcmp(h.state, "sealed") == 0) {
				/* Sealed after its MD5 was checked, but the process stopped before the name switch
				 * was done or the entry dropped: finish the publish. */
				if ((err = sealed_finish(r, p->key, p->head, &e.meta, &h)) != 0)
					break;
				log_info("rados: finished publishing %" PRIu64 "/%s", e.meta.uid, e.meta.md5);
				continue;
			}
			if ((err = data_size(r, p->head, piece, &e.size, &e.mtime)) != 0)
				break;
			if (strcmp(h.state, "linked") == 0) {
				/* A publish from stored content that stopped after closing its entry (its name may
				 * point at the content already). Nothing resumes it (staging_find: EINVAL) and it
				 * holds chunk 1 only: dropped once as old as an abandoned upload (younger, its
				 * publish may still be running on another node), or the janitor would find it
				 * abandoned, fail to load it and keep it, every pass, for ever. */
				if (time(NULL) - e.mtime >= r->conf->upload_ttl) {
					log_info("rados: dropping %s, a publish from stored content that stopped half-way", p->key);
					if ((err = data_remove(r, p->head, piece, 0)) != 0)
						break;
					omap_remove_if(r, STAGING_OBJ, p->key, p->head);
					(*dropped)++;
				}
				continue;
			}
			stop = cb(&e, arg);
		}
	}
	free(page);
	return err;
}

/* ---------------------------------------------------------------- published files */

static int rados_file_open(const struct backend *b, uint64_t uid, const char *name, size_t name_len,
    struct backend_file **out, uint64_t *size, char version[BACKEND_VERSION_MAX])
{
	struct rados_be *r = b->priv;
	char idx[OID_MAX];
	index_oid(uid, idx);
	for (int attempt = 0; attempt < 2; attempt++) {
		char head[OID_MAX];
		int err = omap_get(r, idx, name, name_len, head, sizeof(head));
		if (err)
			return err;
		char layout[LAYOUT_MAX];
		err = head_layout(r, head, layout);
		if (err == ENOENT)
			continue;   /* replaced and collected between the two reads: look again */
		if (err)
			return err;
		struct backend_file *f = calloc(1, sizeof(*f));
		if (f == NULL)
			return ENOMEM;
		f->r = r;
		snprintf(f->head, sizeof(f->head), "%s", head);
		if ((err = layout_parse(layout, &f->size, &f->piece)) != 0) {
			free(f);
			return err;
		}
		snprintf(version, BACKEND_VERSION_MAX, "%.*s", BACKEND_VERSION_MAX - 1, head);
		*size = f->size;
		*out = f;
		return 0;
	}
	return ENOENT;
}

static int rados_file_read(struct backend_file *f, void *buf, size_t len, uint64_t offset, size_t *got)
{
	*got = 0;
	if (offset >= f->size)
		return 0;
	if (len > f->size - offset)
		len = (size_t)(f->size - offset);
	return data_read(f->r, f->head, f->piece, buf, len, offset, got);
}

static void rados_file_close(struct backend_file *f)
{
	free(f);
}

/* ---------------------------------------------------------------- the collector of replaced versions */

/*
 * A published head may be shared (instant upload: several names and the content index point at
 * it), so whoever deletes one asks its references first (head_use). Each was written on the head
 * before its pointer was made: a name's reference by the seal (while the staging key still names
 * the head) or by publish_from_content, the index's by content_enter. A reference counts while its
 * pointer points at the head, and a name's also while it is young (REF_GRACE_FACTOR x
 * storage_timeout: its pointer may be on the way). The delete asserts the head's version is the one read with the references,
 * so a reference added since (a new name) refuses it; publish_from_content checks the head still
 * exists after its switch, and undoes the switch if not (a stall past the grace).
 */
#define REF_GRACE_FACTOR 10
#define HEAD_NAMED 1              /* a name points at it, or may be about to */
#define HEAD_INDEXED 2            /* the content index points at it */

struct head_use {
	int use;                      /* HEAD_NAMED | HEAD_INDEXED */
	int refs;                     /* it records references (heads sealed before they existed do not) */
	uint64_t version;             /* as read with them, for rados_write_op_assert_version */
	uint64_t size, piece;         /* from its layout (0, 0 while it is not sealed) */
	size_t checked;               /* references checked (each at most one index read) */
};

struct ref_entry {
	char key[REF_MAX + 1];
	char val[32];
	size_t key_len, val_len;
};

/* Is reference e of head still in use? Sets *use bits; 0 or an errno from reading the pointer. */
static int ref_check(struct rados_be *r, const char *head, const struct ref_entry *e, time_t now, int *use,
    int *stale)
{
	*stale = 0;
	int kind = e->key[0] == 'c' ? HEAD_INDEXED : HEAD_NAMED;
	/* Only a name's reference is ever young: an index entry made after its head went points at
	 * nothing, which content_open and publish_from_content answer ENOENT, and the content
	 * collection drops (while a young one would keep a head the collection just unindexed). */
	if (kind == HEAD_NAMED && e->val[0] >= '0' && e->val[0] <= '9' &&
	    now - (time_t)atoll(e->val) < (time_t)REF_GRACE_FACTOR * r->conf->storage_timeout) {
		*use |= kind;
		return 0;
	}
	char val[OID_MAX], oid[OID_MAX];
	const char *key;
	size_t key_len;
	if (kind == HEAD_INDEXED) {
		snprintf(oid, sizeof(oid), CONTENT_OBJ);
		key = e->key + 2;
		key_len = e->key_len - 2;
	} else {
		char *end;
		uint64_t uid = strtoull(e->key + 2, &end, 10);
		if (*end != ':')
			return 0;   /* not ours: ignored */
		index_oid(uid, oid);
		key = end + 1;
		key_len = e->key_len - (size_t)(key - e->key);
	}
	int err = omap_get(r, oid, key, key_len, val, sizeof(val));
	if (err == 0 && strcmp(val, head) == 0)
		*use |= kind;
	else if (err == 0 || err == ENOENT)
		*stale = kind == HEAD_NAMED;
	else
		return err;
	return 0;
}

/* How head is used (struct head_use); prunes stale name references of a head still named. ENOENT
 * when it is gone. Runs on the collector thread: the version read is its own I/O context's. */
static int head_use(struct rados_be *r, const char *head, struct head_use *u)
{
	memset(u, 0, sizeof(*u));
	struct ref_entry *refs = calloc(REFS_PAGE, sizeof(*refs));
	if (refs == NULL)
		return ENOMEM;
	rados_read_op_t op = rados_create_read_op();
	rados_omap_iter_t it = NULL;
	rados_xattrs_iter_t xit = NULL;
	int prval = 0, xprval = 0;
	unsigned char more = 0;
	rados_read_op_omap_get_vals2(op, NULL, NULL, REFS_PAGE, &it, &more, &prval);
	rados_read_op_getxattrs(op, &xit, &xprval);
	int rc = rados_read_op_operate(op, r->gc_io, head, 0);
	u->version = rados_get_last_version(r->gc_io);
	int err = rc < 0 ? rerr(rc) : prval < 0 ? rerr(prval) : xprval < 0 ? rerr(xprval) : 0;
	size_t n = 0;
	if (err == 0) {
		char *k, *v;
		size_t kl, vl;
		while (n < REFS_PAGE && rados_omap_get_next2(it, &k, &v, &kl, &vl) == 0 && k != NULL) {
			if (kl > REF_MAX || vl >= sizeof(refs[n].val))
				continue;
			memcpy(refs[n].key, k, kl);
			refs[n].key[kl] = '\0';
			refs[n].key_len = kl;
			memcpy(refs[n].val, v, vl);
			refs[n].val[vl] = '\0';
			refs[n].val_len = vl;
			n++;
		}
		const char *name, *val;
		size_t len;
		while (rados_getxattrs_next(xit, &name, &val, &len) == 0 && name != NULL) {
			char layout[64];
			if (strcmp(name, "layout") == 0 && len < sizeof(layout)) {
				memcpy(layout, val, len);
				layout[len] = '\0';
				if (layout_parse(layout, &u->size, &u->piece) != 0)
					u->size = u->piece = 0;
			}
		}
	}
	if (it)
		rados_omap_get_end(it);
	if (xit)
		rados_getxattrs_end(xit);
	rados_release_read_op(op);
	u->refs = n > 0 || more;
	u->checked = n;
	if (more)
		u->use |= HEAD_NAMED;   /* more references than we read: in use, surely */
	time_t now = time(NULL);
	int any_stale = 0;
	for (size_t i = 0; err == 0 && i < n; i++) {
		int stale;
		err = ref_check(r, head, &refs[i], now, &u->use, &stale);
		if (stale)
			refs[i].key[0] = 'x', any_stale = 1;   /* marked for pruning below */
	}
	/* A name moved elsewhere leaves its reference behind: dropped while the head stays named, each
	 * only while it holds the value read (a name pointed here again has written a new one). */
	for (size_t i = 0; err == 0 && any_stale && (u->use & HEAD_NAMED) && i < n; i++) {
		if (refs[i].key[0] != 'x')
			continue;
		refs[i].key[0] = 'n';
		const char *keys[1] = { refs[i].key };
		rados_write_op_t w = rados_create_write_op();
		int cmp = 0;
		rados_write_op_omap_cmp2(w, refs[i].key, LIBRADOS_CMPXATTR_OP_EQ, refs[i].val, refs[i].key_len,
		    refs[i].val_len, &cmp);
		rados_write_op_omap_rm_keys2(w, keys, &refs[i].key_len, 1);
		rados_write_op_operate(w, r->io, head, NULL, WRITE_FLAGS);
		rados_release_write_op(w);
	}
	free(refs);
	return err;
}

/* Removes the pieces after head while they follow each other (a gap's stragglers are swept as
 * headless pieces); *removed, when given, counts them. */
static int pieces_remove(struct rados_be *r, const char *head, size_t *removed)
{
	for (uint64_t k = 1;; k++) {
		char oid[PIECE_OID_MAX];
		piece_oid(head, k, oid);
		rados_write_op_t op = rados_create_write_op();
		rados_write_op_remove(op);
		int rc = rados_write_op_operate(op, r->io, oid, NULL, WRITE_FLAGS);
		rados_release_write_op(op);
		if (rc < 0)
			return rc == -ENOENT ? 0 : rerr(rc);
		if (removed)
			(*removed)++;
	}
}

/* Removes head if its version is still the one read by head_use, then its pieces. ECANCELED when
 * it changed (a reference was added meanwhile). */
static int head_remove_unchanged(struct rados_be *r, const char *head, uint64_t version)
{
	rados_write_op_t op = rados_create_write_op();
	rados_write_op_assert_version(op, version);
	rados_write_op_remove(op);
	int rc = rados_write_op_operate(op, r->io, head, NULL, WRITE_FLAGS);
	rados_release_write_op(op);
	if (rc == -ENOENT)
		return 0;
	if (rc == -ECANCELED || rc == -ERANGE || rc == -EOVERFLOW)
		return ECANCELED;
	if (rc < 0)
		return rerr(rc);
	return pieces_remove(r, head, NULL);
}

static int gc_stopping(struct rados_be *r)
{
	pthread_mutex_lock(&r->gc_lock);
	int stop = r->gc_stop;
	pthread_mutex_unlock(&r->gc_lock);
	return stop;
}

/* A key and its value from one of the collector's omap pages. */
struct collect_pair {
	char key[COLLECT_KEY_MAX];
	char val[PROTO_NAME_MAX + 64];
};

/* One bounded pass of the collector over the omap of oid: at most COLLECT_PAGE keys after cursor,
 * each handed to handle() (which returns the reads it spent) until COLLECT_BUDGET reads are spent
 * or the process stops. The cursor is left on the last key handled, so the next pass goes on after
 * it, and goes back to the start after the last key: every key is reached, however long the omap. */
static void collect_page(struct rados_be *r, const char *oid, char cursor[COLLECT_KEY_MAX],
    size_t (*handle)(struct rados_be *r, const struct collect_pair *p, void *arg), void *arg)
{
	struct collect_pair *page = calloc(COLLECT_PAGE, sizeof(*page));
	if (page == NULL)
		return;
	rados_read_op_t op = rados_create_read_op();
	rados_omap_iter_t it = NULL;
	int prval = 0;
	unsigned char more = 0;
	rados_read_op_omap_get_vals2(op, cursor[0] ? cursor : NULL, NULL, COLLECT_PAGE, &it, &more, &prval);
	int rc = rados_read_op_operate(op, r->io, oid, 0);
	size_t count = 0;
	if (rc >= 0 && prval >= 0) {
		char *k, *v;
		size_t kl, vl;
		while (count < COLLECT_PAGE && rados_omap_get_next2(it, &k, &v, &kl, &vl) == 0 && k != NULL) {
			if (kl >= sizeof(page[0].key) || vl >= sizeof(page[0].val))
				continue;   /* not one of ours */
			memcpy(page[count].key, k, kl);
			page[count].key[kl] = '\0';
			memcpy(page[count].val, v, vl);
			page[count].val[vl] = '\0';
			count++;
		}
	}
	if (it)
		rados_omap_get_end(it);
	rados_release_read_op(op);
	if ((rc < 0 && rc != -ENOENT) || (rc >= 0 && prval < 0)) {
		free(page);
		return;   /* cannot read: the same page next pass */
	}
	size_t i = 0, spent = 0;
	for (; i < count && spent < COLLECT_BUDGET && !gc_stopping(r); i++) {
		spent += handle(r, &page[i], arg);
		memcpy(cursor, page[i].key, COLLECT_KEY_MAX);
	}
	if (i == count && !more)
		cursor[0] = '\0';   /* the end (or nothing): from the start next pass */
	free(page);
}

/* A "gc" entry: its head deleted if its grace has passed and no name points to it any more, then
 * the entry dropped. Returns the reads spent. */
static size_t gc_collect(struct rados_be *r, const struct collect_pair *p, void *arg)
{
	time_t now = *(const time_t *)arg;
	const char *head = p->key, *val = p->val;
	if (strlen(head) >= OID_MAX || atoll(val) > now)
		return 0;   /* not a head of ours, or not due */
	char *sp = strchr(val, ' ');
	char *q = sp ? strchr(sp + 1, ' ') : NULL;
	if (q == NULL) {
		omap_remove_if(r, GC_OBJ, head, val);
		return 1;
	}
	struct head_use u;
	int uerr = head_use(r, head, &u);
	size_t spent = 1 + u.checked;
	if (uerr && uerr != ENOENT)
		return spent;   /* cannot tell: next time round */
	if (uerr == 0 && u.refs) {
		/* Shared or not, its references say: named (the next replacement queues it again), only
		 * indexed (kept queued: the content collection unindexes it first), or unused (deleted
		 * unless a reference came meanwhile). */
		if ((u.use & HEAD_INDEXED) && !(u.use & HEAD_NAMED))
			return spent;
		if (!u.use && head_remove_unchanged(r, head, u.version) != 0)
			return spent;
		omap_remove_if(r, GC_OBJ, head, val);
		return spent;
	}
	/* Sealed before heads recorded references: the one name queued with it. */
	uint64_t uid = strtoull(sp + 1, NULL, 10);
	const char *name = q + 1;
	char idx[OID_MAX], now_head[OID_MAX] = "";
	index_oid(uid, idx);
	int err = omap_get(r, idx, name, strlen(name), now_head, sizeof(now_head));
	spent++;
	if (err && err != ENOENT)
		return spent;   /* cannot tell: next time round */
	if (strcmp(now_head, head) != 0) {
		char layout[LAYOUT_MAX];
		uint64_t size, piece = r->piece;
		if (head_layout(r, head, layout) == 0)
			layout_parse(layout, &size, &piece);
		if (data_remove(r, head, piece, 0) != 0)
			return spent;
	}
	omap_remove_if(r, GC_OBJ, head, val);
	return spent;
}

/* Deletes the versions queued in "gc" whose grace has passed and that no name points to: one
 * bounded page per pass (collect_page), going on where the previous pass stopped. */
static void gc_sweep(struct rados_be *r)
{
	time_t now = time(NULL);
	collect_page(r, GC_OBJ, r->gc_after, gc_collect, &now);
}

/* ---------------------------------------------------------------- stored content (instant upload) */

/*
 * The content index is the omap of "content": "<md5>.<size>" (dedup = global) or
 * "u<uid>.<md5>.<size>" (dedup = user) -> a published head. Published heads never change, so an
 * index entry is a pointer like a name, recorded among the head's references ("c:<key>"); an
 * instant upload points its name at the same head (publish_from_content), and the collector
 * (content_sweep) unindexes a head that no name uses any more, after which the collection of
 * replaced versions deletes it once its gc_grace is over (a download may still read it).
 */

static int rados_content_open(const struct backend *b, const struct backend_content_key *key,
    struct backend_file **out, uint64_t *size)
{
	struct rados_be *r = b->priv;
	char ckey[96], head[OID_MAX], layout[LAYOUT_MAX];
	size_t klen = content_keytext(key, ckey);
	int err = omap_get(r, CONTENT_OBJ, ckey, klen, head, sizeof(head));
	if (err)
		return err;
	if ((err = head_layout(r, head, layout)) != 0)
		return err;
	struct backend_file *f = calloc(1, sizeof(*f));
	if (f == NULL)
		return ENOMEM;
	f->r = r;
	snprintf(f->head, sizeof(f->head), "%s", head);
	if (layout_parse(layout, &f->size, &f->piece) != 0 || f->size != key->size) {
		free(f);
		return ENOENT;   /* not what the key promises: treated as absent */
	}
	*size = f->size;
	*out = f;
	return 0;
}

/* Enters head (just published) in the index under key unless the key is there; failures are logged. */
static void content_enter(struct rados_be *r, const struct backend_content_key *key, const char *head)
{
	char ckey[96], have[OID_MAX], ref[REF_MAX];
	size_t klen = content_keytext(key, ckey);
	int err = omap_get(r, CONTENT_OBJ, ckey, klen, have, sizeof(have));
	if (err != ENOENT)
		return;   /* indexed already (or cannot tell: the next upload of it enters it) */
	int n = snprintf(ref, sizeof(ref), "c:%s", ckey);
	if ((err = ref_add(r, head, ref, (size_t)n)) == 0)
		err = omap_swap(r, CONTENT_OBJ, ckey, klen, "", head);
	if (err && err != ECANCELED)
		log_warnx("rados: cannot enter %s in the content index: %s", ckey, strerror(err));
}

static int rados_publish_indexed(struct backend_staging *s, const struct backend_content_key *key,
    uint64_t fence, int *flags)
{
	int err = rados_publish(s, fence, flags);
	if (*flags & BACKEND_PUBLISHED)
		content_enter(s->r, key, s->head);
	return err;
}

/* The staging head back to open after a publish from content that changed no name; why is the
 * publish's own error. A head that is no longer "linked" (or gone) is not ours to reopen: why.
 * Failing (the cluster in trouble) leaves it "linked", refusing every write: ETIMEDOUT, so that
 * the caller answers busy and reads the upload back, which reopens it (staging_find). */
static int staging_reopen(struct backend_staging *s, int why)
{
	rados_write_op_t op = rados_create_write_op();
	rados_write_op_cmpxattr(op, "state", LIBRADOS_CMPXATTR_OP_EQ, "linked", 6);
	rados_write_op_setxattr(op, "state", "open", 4);
	int rc = rados_write_op_operate(op, s->r->io, s->head, NULL, WRITE_FLAGS);
	rados_release_write_op(op);
	if (rc == 0 || rc == -ECANCELED || rc == -ENOENT)
		return why;
	log_warnx("rados: cannot reopen %s after a publish from stored content failed (%s): %s", s->head,
	    strerror(why), strerror(-rc));
	return ETIMEDOUT;
}

static int rados_publish_from_content(struct backend_staging *s, const struct backend_content_key *key,
    uint64_t fence, int *flags)
{
	struct rados_be *r = s->r;
	*flags = 0;
	char ckey[96], head[OID_MAX], layout[LAYOUT_MAX];
	size_t klen = content_keytext(key, ckey);
	int err = staging_locate(s);
	if (err == 0)
		err = omap_get(r, CONTENT_OBJ, ckey, klen, head, sizeof(head));
	if (err)
		return err;
	if ((err = head_layout(r, head, layout)) != 0)
		return err;
	uint64_t size, piece;
	if (layout_parse(layout, &size, &piece) != 0 || size != key->size)
		return ENOENT;
	/* Fenced like publish: the staging entry is closed under our fence first ("linked": no write,
	 * truncate or reset is accepted on it any more), so a fenced-out node changes no name. */
	rados_write_op_t op = rados_create_write_op();
	char ftext[FENCE_LEN + 1];
	rados_write_op_cmpxattr(op, "state", LIBRADOS_CMPXATTR_OP_EQ, "open", 4);
	op_fence(op, fence, ftext);
	rados_write_op_setxattr(op, "state", "linked", 6);
	int rc = rados_write_op_operate(op, r->io, s->head, NULL, WRITE_FLAGS);
	rados_release_write_op(op);
	if (rc == -ECANCELED)
		return canceled_why(r, s->head, fence, EIO);
	if (rc < 0)
		return rerr(rc);
	/* The name's reference on the content's head, then the name. */
	char ref[REF_MAX], old[OID_MAX] = "";
	size_t reflen = ref_name(s->meta.uid, s->meta.name, s->meta.name_len, ref);
	if ((err = ref_add(r, head, ref, reflen)) != 0 ||
	    (err = name_switch(r, s->meta.uid, s->meta.name, s->meta.name_len, head, old, NULL)) != 0)
		return staging_reopen(s, err);   /* ENOENT: collected meanwhile; the upload goes on normally */
	/* Still there? Only a stall past the references' grace lets the collector take it between
	 * the reference and the switch: the name goes back to what it was. */
	uint64_t sz;
	time_t mt;
	if (rados_stat(r->io, head, &sz, &mt) == -ENOENT) {
		char idx[OID_MAX];
		index_oid(s->meta.uid, idx);
		if (old[0])
			omap_swap(r, idx, s->meta.name, s->meta.name_len, head, old);
		else
			omap_remove_if(r, idx, s->meta.name, head);
		return staging_reopen(s, ENOENT);
	}
	*flags |= BACKEND_PUBLISHED;
	/* The staging entry's data (chunk 1) goes; a failure leaves it to the janitor and the sweep. */
	char skey[64];
	staging_key(&s->meta, skey, sizeof(skey));
	if (data_remove(r, s->head, s->piece, 0) == 0)
		omap_remove_if(r, STAGING_OBJ, skey, s->head);
	return 0;
}

/* What one content collection pass freed. */
struct content_freed {
	size_t count;
	uint64_t bytes;
};

/* An index entry: unindexed if no name uses its head (guarded on its value, so a key re-pointed
 * meanwhile stays). Returns the reads spent. */
static size_t content_collect_one(struct rados_be *r, const struct collect_pair *p, void *arg)
{
	struct content_freed *freed = arg;
	if (strlen(p->val) >= OID_MAX)
		return 0;   /* not a head of ours */
	struct head_use u;
	int err = head_use(r, p->val, &u);
	size_t spent = 1 + u.checked;
	if ((err && err != ENOENT) || (err == 0 && (u.use & HEAD_NAMED)))
		return spent;
	const char *keys[1] = { p->key };
	size_t kl = strlen(p->key);
	int cmp = 0;
	rados_write_op_t w = rados_create_write_op();
	rados_write_op_omap_cmp(w, p->key, LIBRADOS_CMPXATTR_OP_EQ, p->val, strlen(p->val), &cmp);
	rados_write_op_omap_rm_keys2(w, keys, &kl, 1);
	int rc = rados_write_op_operate(w, r->io, CONTENT_OBJ, NULL, WRITE_FLAGS);
	rados_release_write_op(w);
	if (rc == 0 && err == 0) {
		freed->count++;
		freed->bytes += u.size;
	}
	return spent;
}

/* Unindexes content no name uses any more: one bounded page of index keys per pass
 * (collect_page), going on where the previous pass stopped. Its head is left to the collection of
 * replaced versions (its grace for downloads) and, failing that, to the sweep. */
static void content_sweep(struct rados_be *r)
{
	struct content_freed freed = { 0, 0 };
	collect_page(r, CONTENT_OBJ, r->content_after, content_collect_one, &freed);
	if (freed.count) {
		log_info("rados: unindexed %zu stored files no name uses any more, %" PRIu64 " bytes", freed.count,
		    freed.bytes);
		STAT_ADD(content_freed_bytes, freed.bytes);
	}
}

/* ---------------------------------------------------------------- the sweep of unnamed data objects */

/*
 * A crash can leave data objects that nothing names: a head created by staging_begin but never
 * indexed, a head whose discard or collection stopped half-way, pieces whose head is gone. The
 * gc thread lists the namespace a batch at a time (SWEEP_BATCH objects per pass, going on where the
 * previous pass stopped, so a huge pool costs each pass the same) and deletes the `d.*` objects
 * that nothing names and that nobody changed for SWEEP_GRACE_FACTOR x storage_timeout.
 *
 * What names a head: its staging key, the name index of the name in its meta, or a `gc` entry. A
 * head moves from one to the next in that order and is named at every step (publish indexes the
 * name before dropping the staging key; name_switch queues the old head in gc before switching),
 * so reading them in that order cannot miss a head on the move. The one step that names an
 * unnamed head is staging_begin's index of the head it just created: its next op sets
 * "named" = 1 on the head, and the sweep's delete asserts "named" is still what it read (unset),
 * so either the mark lands first (the delete is refused) or the delete does (the mark finds no
 * head, and the begin undoes its index and starts again). A head marked named that nothing names
 * any more cannot be named again (names are never reused), so it goes with the same assertion.
 */
#define SWEEP_BATCH 1024           /* objects listed per pass */
#define SWEEP_GRACE_FACTOR 10      /* x storage_timeout: unchanged this long before a delete */

/* Which names point at head (checked in the order a head moves through them: staging key, names
 * and the content index, gc): 1 named, 0 not; u gets the head's use and version. */
static int head_named(struct rados_be *r, const char *head, const struct head_attrs *h, struct head_use *u,
    int *named)
{
	char val[OID_MAX];
	struct backend_meta m;
	uint64_t piece;
	*named = 1;
	int meta_ok = h->meta_len && backend_meta_decode(h->meta, h->meta_len, &m, &piece) == 0;
	if (meta_ok) {
		char key[64];
		staging_key(&m, key, sizeof(key));
		int err = omap_get(r, STAGING_OBJ, key, strlen(key), val, sizeof(val));
		if (err == 0 && strcmp(val, head) == 0)
			return 0;
		if (err && err != ENOENT)
			return err;
	}
	int err = head_use(r, head, u);
	if (err)
		return err;
	if (u->use)
		return 0;
	if (meta_ok && !u->refs) {
		char idx[OID_MAX];
		index_oid(m.uid, idx);
		err = omap_get(r, idx, m.name, m.name_len, val, sizeof(val));
		if (err == 0 && strcmp(val, head) == 0)
			return 0;
		if (err && err != ENOENT)
			return err;
	}
	err = omap_get(r, GC_OBJ, head, strlen(head), val, sizeof(val));
	if (err == 0)
		return 0;
	if (err != ENOENT)
		return err;
	*named = 0;
	return 0;
}

/* Deletes head if nothing names it and it is old, then its pieces; *removed counts objects. */
static int sweep_head(struct rados_be *r, const char *head, time_t older_than, size_t *removed)
{
	uint64_t size;
	time_t mtime;
	int rc = rados_stat(r->io, head, &size, &mtime);
	if (rc == -ENOENT)
		return 0;
	if (rc < 0)
		return rerr(rc);
	if (mtime >= older_than)
		return 0;   /* changed lately: a begin may be about to index it */
	struct head_attrs h;
	struct head_use u;
	int named, err = head_read(r, head, &h);
	if (err == 0)
		err = head_named(r, head, &h, &u, &named);
	if (err)
		return err == ENOENT ? 0 : err;
	if (named)
		return 0;
	/* The decision holds only while the head is as read: "named" unchanged (begin's mark), the
	 * fence unchanged (a writer that took it over), and its version (a reference added). */
	rados_write_op_t op = rados_create_write_op();
	rados_write_op_cmpxattr(op, "named", LIBRADOS_CMPXATTR_OP_EQ, h.named, strlen(h.named));
	rados_write_op_cmpxattr(op, "fence", LIBRADOS_CMPXATTR_OP_EQ, h.fence, strlen(h.fence));
	rados_write_op_assert_version(op, u.version);
	rados_write_op_remove(op);
	rc = rados_write_op_operate(op, r->io, head, NULL, WRITE_FLAGS);
	rados_release_write_op(op);
	if (rc == -ECANCELED || rc == -ENOENT || rc == -ERANGE || rc == -EOVERFLOW)
		return 0;
	if (rc < 0)
		return rerr(rc);
	(*removed)++;
	log_info("rados: swept unnamed data object %s", head);
	return pieces_remove(r, head, removed);
}

/* Deletes a piece whose head is gone (heads are deleted after their pieces are, or alone when the
 * pieces went first: either way, a piece without its head can never be read again). */
static int sweep_piece(struct rados_be *r, const char *oid, size_t head_len, time_t older_than, size_t *removed)
{
	char head[OID_MAX];
	snprintf(head, sizeof(head), "%.*s", (int)head_len, oid);
	uint64_t size;
	time_t mtime;
	int rc = rados_stat(r->io, head, &size, &mtime);
	if (rc == 0)
		return 0;
	if (rc != -ENOENT)
		return rerr(rc);
	if ((rc = rados_stat(r->io, oid, &size, &mtime)) < 0)
		return rc == -ENOENT ? 0 : rerr(rc);
	if (mtime >= older_than)
		return 0;
	if ((rc = object_remove(r, oid)) != 0)
		return rc;
	(*removed)++;
	log_info("rados: swept data object %s, whose head is gone", oid);
	return 0;
}

/* The length of the head part of a data object's name "d.<md5>.<16 hex>[.<k>]", or 0 when oid is
 * not one; *piece is set when it names a piece. */
static size_t data_oid_parse(const char *oid, int *piece)
{
	size_t len = strlen(oid), head_len = 2 + PROTO_MD5_HEX + 1 + 16;
	*piece = 0;
	if (len < head_len || strncmp(oid, "d.", 2) != 0 || oid[2 + PROTO_MD5_HEX] != '.')
		return 0;
	for (size_t i = 2; i < head_len; i++)
		if (i != 2 + PROTO_MD5_HEX && strchr("0123456789abcdef", oid[i]) == NULL)
			return 0;
	if (len == head_len)
		return head_len;
	if (oid[head_len] != '.' || len == head_len + 1 || strspn(oid + head_len + 1, "0123456789") != len - head_len - 1)
		return 0;
	*piece = 1;
	return head_len;
}

/* One pass: up to SWEEP_BATCH objects of the namespace, from where the last pass stopped. */
static void orphan_sweep(struct rados_be *r)
{
	time_t older_than = time(NULL) - (time_t)SWEEP_GRACE_FACTOR * r->conf->storage_timeout;
	size_t removed = 0;
	int err = 0;
	if (!r->sweep_listing) {
		int rc = rados_nobjects_list_open(r->io, &r->sweep_list);
		if (rc < 0) {
			log_warnx("rados: cannot list the namespace for the sweep: %s", strerror(rerr(rc)));
			return;
		}
		r->sweep_listing = 1;
	}
	for (int n = 0; n < SWEEP_BATCH && err == 0 && !gc_stopping(r); n++) {
		const char *entry;
		int rc = rados_nobjects_list_next(r->sweep_list, &entry, NULL, NULL);
		if (rc == -ENOENT) {
			err = ENOENT;   /* the end: the next pass lists from the start */
			break;
		}
		if (rc < 0) {
			err = rerr(rc);
			break;
		}
		char oid[PIECE_OID_MAX];
		if (strlen(entry) >= sizeof(oid))
			continue;
		snprintf(oid, sizeof(oid), "%s", entry);
		int piece;
		size_t head_len = data_oid_parse(oid, &piece);
		if (head_len == 0)
			continue;
		err = piece ? sweep_piece(r, oid, head_len, older_than, &removed) : sweep_head(r, oid, older_than, &removed);
	}
	if (err) {
		if (err != ENOENT)
			log_warnx("rados: the sweep of unnamed objects stopped: %s", strerror(err));
		else
			log_debug("rados: the sweep went through the whole namespace");
		rados_nobjects_list_close(r->sweep_list);
		r->sweep_listing = 0;
	}
	if (removed) {
		log_info("rados: the sweep deleted %zu data objects that nothing named", removed);
		STAT_ADD(orphans_swept, removed);
	}
}

static void *gc_main(void *arg)
{
	struct rados_be *r = arg;
	int interval = r->conf->janitor_interval;
	pthread_mutex_lock(&r->gc_lock);
	while (!r->gc_stop) {
		struct timespec until;
		clock_gettime(CLOCK_REALTIME, &until);
		until.tv_sec += interval;
		pthread_cond_timedwait(&r->gc_cond, &r->gc_lock, &until);
		if (r->gc_stop)
			break;
		pthread_mutex_unlock(&r->gc_lock);
		gc_sweep(r);
		content_sweep(r);
		orphan_sweep(r);
		pthread_mutex_lock(&r->gc_lock);
	}
	pthread_mutex_unlock(&r->gc_lock);
	if (r->sweep_listing)
		rados_nobjects_list_close(r->sweep_list);
	return NULL;
}

/* One round trip to the OSD holding the staging index: the cluster answers, or it does not (within
 * op_timeout). */
static int rados_ping(struct backend *b)
{
	struct rados_be *r = b->priv;
	uint64_t size;
	time_t mtime;
	int rc = rados_stat(r->io, STAGING_OBJ, &size, &mtime);
	return rc == -ENOENT ? 0 : rerr(rc);
}

const struct backend_ops backend_rados = {
	.name = "rados",
	.open = rados_open,
	.close = rados_close,
	.staging_begin = rados_staging_begin,
	.staging_attach = rados_staging_attach,
	.staging_find = rados_staging_find,
	.staging_write = rados_staging_write,
	.staging_read = rados_staging_read,
	.staging_sync = rados_staging_sync,
	.staging_size = rados_staging_size,
	.staging_fence = rados_staging_fence,
	.staging_truncate = rados_staging_truncate,
	.staging_discard = rados_staging_discard,
	.staging_close = rados_staging_close,
	.staging_list = rados_staging_list,
	.publish = rados_publish,
	.file_open = rados_file_open,
	.file_read = rados_file_read,
	.file_close = rados_file_close,
	.ping = rados_ping,
	/* No file_fd: no descriptor to sendfile from. */
	.content_open = rados_content_open,
	.publish_indexed = rados_publish_indexed,
	.publish_from_content = rados_publish_from_content,
	/* content_collect stays NULL: the collector thread unindexes content (content_sweep) and
	 * counts content_freed_bytes itself. */
};

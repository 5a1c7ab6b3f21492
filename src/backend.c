/* backend.c: the table of storage backends, chosen by the [storage] backend name. */
#include "config.h"
#include "backend.h"
#include "conf.h"
#include "json.h"

#include <errno.h>

#include <stdio.h>
#include <string.h>
#include <yajl/yajl_gen.h>

/* A new backend is one file defining `const struct backend_ops backend_<name>`, listed here. */
static const struct backend_ops *const backends[] = {
	&backend_fs,
#ifdef HAVE_RADOS
	&backend_rados,
#endif
};

const struct backend_ops *backend_find(const char *name)
{
	for (size_t i = 0; i < sizeof(backends) / sizeof(backends[0]); i++)
		if (strcmp(backends[i]->name, name) == 0)
			return backends[i];
	return NULL;
}

const char *backend_names(void)
{
	static char names[128];
	if (names[0] == '\0') {
		size_t used = 0;
		for (size_t i = 0; i < sizeof(backends) / sizeof(backends[0]); i++) {
			int n = snprintf(names + used, sizeof(names) - used, "%s%s", i ? ", " : "", backends[i]->name);
			if (n < 0 || (size_t)n >= sizeof(names) - used)
				break;   /* the list is only for messages: a cut one is still useful */
			used += (size_t)n;
		}
	}
	return names;
}

int backend_open(struct backend *b, const struct conf *conf, enum backend_role role, char *err, size_t errlen)
{
	memset(b, 0, sizeof(*b));
	b->ops = backend_find(conf->backend);
	b->conf = conf;
	if (b->ops == NULL) {
		snprintf(err, errlen, "unknown storage backend '%s' (known: %s)", conf->backend, backend_names());
		return -1;
	}
	return b->ops->open(b, role, err, errlen);
}

void backend_close(struct backend *b)
{
	if (b->ops)
		b->ops->close(b);
	b->ops = NULL;
}

int backend_meta_encode(const struct backend_meta *m, uint64_t piece, char *out, size_t outlen, size_t *len)
{
	yajl_gen g = yajl_gen_alloc(NULL);
	if (g == NULL)
		return ENOMEM;
	yajl_gen_map_open(g);
	yajl_gen_string(g, (const unsigned char *)"uid", 3);
	yajl_gen_integer(g, (long long)m->uid);
	yajl_gen_string(g, (const unsigned char *)"md5", 3);
	yajl_gen_string(g, (const unsigned char *)m->md5, PROTO_MD5_HEX);
	yajl_gen_string(g, (const unsigned char *)"name", 4);
	yajl_gen_string(g, (const unsigned char *)m->name, m->name_len);
	yajl_gen_string(g, (const unsigned char *)"kind", 4);
	yajl_gen_integer(g, m->kind);
	yajl_gen_string(g, (const unsigned char *)"total_size", 10);
	yajl_gen_integer(g, (long long)m->total_size);
	yajl_gen_string(g, (const unsigned char *)"chunk_len", 9);
	yajl_gen_integer(g, (long long)m->chunk_len);
	if (piece) {
		yajl_gen_string(g, (const unsigned char *)"piece", 5);
		yajl_gen_integer(g, (long long)piece);
	}
	yajl_gen_map_close(g);
	const unsigned char *text;
	size_t n;
	int err = yajl_gen_get_buf(g, &text, &n) == yajl_gen_status_ok ? 0 : EINVAL;
	if (err == 0 && n >= outlen)
		err = EFBIG;
	if (err == 0) {
		memcpy(out, text, n);
		*len = n;
	}
	yajl_gen_free(g);
	return err;
}

int backend_meta_decode(const char *text, size_t len, struct backend_meta *m, uint64_t *piece)
{
	char why[128];
	yajl_val v = json_parse_object((const uint8_t *)text, len, why, sizeof(why));
	uint64_t kind;
	const char *md5, *name;
	size_t md5_len, name_len;
	memset(m, 0, sizeof(*m));
	int err = 0;
	if (v == NULL || json_get_u64(v, "uid", UINT64_MAX, &m->uid) ||
	    json_get_u64(v, "total_size", UINT64_MAX, &m->total_size) ||
	    json_get_u64(v, "chunk_len", UINT64_MAX, &m->chunk_len) || json_get_u64(v, "kind", 1, &kind) ||
	    (piece && (json_get_u64(v, "piece", UINT64_MAX, piece) || *piece == 0)) ||
	    json_get_str(v, "md5", &md5, &md5_len) || md5_len != PROTO_MD5_HEX ||
	    json_get_str(v, "name", &name, &name_len) || !proto_name_valid(name, name_len))
		err = EINVAL;
	if (err == 0) {
		m->kind = (int)kind;
		memcpy(m->md5, md5, PROTO_MD5_HEX);
		memcpy(m->name, name, name_len);
		m->name[name_len] = '\0';
		m->name_len = (uint16_t)name_len;
	}
	if (v)
		yajl_tree_free(v);
	return err;
}

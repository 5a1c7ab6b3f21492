/* backend.c: the table of storage backends, chosen by the [storage] backend name. */
#include "config.h"
#include "backend.h"
#include "conf.h"

#include <stdio.h>
#include <string.h>

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

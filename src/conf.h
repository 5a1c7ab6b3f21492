/* conf.h: the configuration of resourced, loaded from an INI file and checked key by key. */
#ifndef RESOURCED_CONF_H
#define RESOURCED_CONF_H

#include <stddef.h>
#include <stdint.h>

enum fsync_policy { FSYNC_NONE, FSYNC_COMPLETE, FSYNC_ALWAYS };
/* [storage] dedup: whose stored content an upload may be published from without its bytes. */
enum dedup_scope { DEDUP_OFF, DEDUP_USER, DEDUP_GLOBAL };

struct conf {
	/* [server] */
	char listen_host[256];      /* address part of listen */
	char listen_port[16];       /* port part of listen */
	int workers;                /* worker processes; `auto` resolves to the CPU count */
	char run_dir[512];          /* storage socket and other runtime files */
	char pid_file[512];         /* written by the master when daemonized */
	char user[64];              /* drop to this user after binding (when root) */
	char group[64];
	char node[64];              /* names this server in upload records; default hostname */
	int64_t max_frame;          /* largest body a client may send */
	int64_t output_cap;         /* unsent bytes per connection before reading stops */
	int64_t output_budget;      /* unsent bytes of all a worker's connections before output_cap tightens */
	int64_t input_budget;       /* large frames being received by all a worker's connections together */
	int idle_timeout;           /* seconds without a complete frame */
	int frame_timeout;          /* seconds to finish a started frame */
	int max_connections;        /* per worker */
	int auth_cache_ttl;         /* seconds a checked uid stays trusted on a connection */
	int anonymous;              /* accept requests without uid as uid 0 */
	int64_t download_chunk;     /* bytes per download chunk */
	int storage_timeout;        /* seconds a worker waits for the storage process */
	int64_t link_ring;          /* bytes of each worker's ring shared with storage; 0: chunks are copied over the link */
	int shutdown_timeout;       /* seconds a graceful stop (QUIT) or retirement may take */
	int drain_grace;            /* seconds a graceful stop keeps accepting while the agent says drain */
	char stats_socket[512];     /* the master's stats and admin socket; empty: none */
	char agent_listen[300];     /* HAProxy agent-check host:port; empty: none */
	char http_listen[300];      /* HTTP /metrics, /health and status page host:port; empty: none */
	int max_connections_per_address;   /* per client address (IPv6: per /64) on the node; 0: no limit */
	int proxy_protocol;         /* expect a PROXY v1/v2 header on every client connection */
	/* [storage] */
	char root[512];             /* published files live at <root>/<uid>/<name> */
	char backend[32];           /* storage backend by name (backend.c): fs or rados */
	int64_t max_file_size;
	int upload_ttl;             /* seconds an idle upload record lives */
	int fsync_policy;           /* enum fsync_policy */
	int64_t direct_io_min;      /* chunks of at least this many bytes bypass the page cache (fs); 0: never */
	int io_threads;             /* disk threads in the storage process */
	int janitor_interval;       /* seconds between sweeps of abandoned staging files */
	int max_uploads;            /* uploads in progress on this node (1036 beyond) */
	int max_uploads_per_user;   /* uploads in progress of one uid (1035 beyond) */
	int64_t min_free_space;     /* bytes kept free beyond what uploads in progress announced (1028) */
	int dedup;                  /* enum dedup_scope: instant upload (design.md, "Instant upload") */
	int lease_ttl;              /* seconds an upload's lease lives unless renewed (several nodes) */
	/* [rados] (backend = rados) */
	char rados_conf[512];       /* ceph.conf of the cluster */
	char rados_user[128];       /* client name without "client.": the cephx user */
	char rados_pool[128];
	char rados_namespace[128];  /* objects live in this namespace of the pool ("" = the default one) */
	int rados_op_timeout;       /* seconds a cluster operation may take; 0 = a third of storage_timeout */
	int64_t rados_object_size;  /* bytes per RADOS object of a file; larger files are split */
	int rados_gc_grace;         /* seconds a replaced file's data stays readable for downloads in flight */
	/* [redis] */
	char redis_host[256];
	int redis_port;
	char redis_socket[512];     /* overrides host/port when set */
	char redis_password[256];
	int redis_db;
	int redis_timeout;          /* seconds without an answer before the connection is dropped */
	char redis_prefix[64];      /* prefix of the file_upload_/file_download_ keys */
	char redis_sentinels[1024]; /* host:port[,host:port...]: find the master through Sentinel */
	char redis_master_name[128];/* the master's name in the sentinels' configuration */
	char redis_sentinel_password[256];   /* AUTH on the sentinels; empty: none */
	/* [postgres] */
	char pg_conninfo[1024];
	int pg_timeout;             /* seconds an icon update may take before the answer goes out */
	/* [log] */
	int log_level;
	char log_file[512];         /* empty: stderr in the foreground, syslog otherwise */
	char access_log[512];       /* one line per finished transfer; empty: none */
};

#define CONF_MAX_SENTINELS 16

struct conf_hostport {
	char host[256];
	int port;
};

/* Parses "host:port[,host:port...]" ([v6]:port allowed) into out; returns the
 * count, or -1 when an entry is malformed or there are more than max. */
int conf_parse_hostports(const char *list, struct conf_hostport *out, int max);

/* Fills *c with the defaults. */
void conf_defaults(struct conf *c);

/* Loads path over the defaults. On error returns -1 and writes one line
 * naming the file, line and key to err. */
int conf_load(struct conf *c, const char *path, char *err, size_t errlen);

/* 1 when a and b agree on every key of the storage process's scope (the scope column of conf.c's
 * table): then a reload keeps it running. */
int conf_storage_equal(const struct conf *a, const struct conf *b);

/* How many keys of the storage process's scope differ between a and b, and their names
 * ("[log] level, [storage] fsync"; never values, which may be passwords) in out, cut with
 * "..." when they do not fit. */
int conf_storage_changes(const struct conf *a, const struct conf *b, char *out, size_t outlen);

/* For a reload: gives next the running values of the keys only a start applies ([server] run_dir,
 * pid_file, user, group, stats_socket, agent_listen, http_listen: bound, locked or switched to once),
 * and names those that differed in out like conf_storage_changes. Returns how many. */
int conf_keep_start_keys(const struct conf *running, struct conf *next, char *out, size_t outlen);

/* Seconds a graceful stop keeps accepting while the agent-check answers drain:
 * drain_grace, but at most half of shutdown_timeout (the whole stop stays within it). */
double conf_drain_grace(const struct conf *c);

/* Sets one key; the same checks as a file. Used by the tests. */
int conf_set(struct conf *c, const char *section, const char *name, const char *value,
    char *err, size_t errlen);

#endif

/* http.c: the master's optional HTTP listener (libmicrohttpd): /metrics, /health, /status.json and a live status page. */
#include "config.h"
#include "http.h"
#include "buf.h"
#include "control.h"
#include "escape.h"
#include "log.h"
#include "stats.h"

#include <microhttpd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Bounds: a scraper, a balancer's check and a few browsers need far less. */
#define HTTP_MAX_CONNECTIONS 32
#define HTTP_MAX_PER_ADDRESS 8          /* so one slow address cannot hold every connection (slowloris) */
#define HTTP_TIMEOUT 10               /* seconds a connection may stay idle or half-sent */
#define HTTP_REFRESH 2                /* seconds between reloads of the status page */

/* libmicrohttpd runs in the master's loop, without a thread of its own: its sockets are
 * non-blocking and MHD_run() never waits, so a slow client costs a buffer, never the loop;
 * the pages read the master's process table, which no other thread may touch. */
struct http {
	struct ev_loop *loop;
	struct control *control;
	struct MHD_Daemon *daemon;
	int listen_fd, epoll_fd;
	ev_io io;                         /* MHD's epoll descriptor: readable when any of its sockets is */
	ev_timer timer;                   /* MHD's own timeouts, and work left over from the last run */
	int conn_fds[HTTP_MAX_CONNECTIONS + 1];   /* open connections: a forked child closes its copies */
	int nconn;
};

/* ---------------------------------------------------------------- driving MHD from libev */

static void http_run(struct http *h)
{
	/* Twice: at its connection limit MHD takes the listening socket out of its epoll set, and
	 * puts it back only at the start of the run after the one that closed a connection; with
	 * nothing else to wake the loop, connections waiting in the backlog would never be seen. */
	MHD_run(h->daemon);
	MHD_run(h->daemon);
	MHD_UNSIGNED_LONG_LONG ms;
	ev_timer_stop(h->loop, &h->timer);
	if (MHD_get_timeout(h->daemon, &ms) == MHD_YES) {
		ev_timer_set(&h->timer, (double)ms / 1000.0, 0.);
		ev_timer_start(h->loop, &h->timer);
	}
}

static void http_on_io(struct ev_loop *loop, ev_io *io, int revents)
{
	(void)loop;
	(void)revents;
	http_run(io->data);
}

static void http_on_timer(struct ev_loop *loop, ev_timer *t, int revents)
{
	(void)loop;
	(void)revents;
	http_run(t->data);
}

static void http_on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
    enum MHD_ConnectionNotificationCode code)
{
	(void)socket_context;
	struct http *h = cls;
	const union MHD_ConnectionInfo *info = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
	if (info == NULL)
		return;
	int fd = info->connect_fd;
	if (code == MHD_CONNECTION_NOTIFY_STARTED) {
		if (h->nconn < (int)(sizeof(h->conn_fds) / sizeof(h->conn_fds[0])))
			h->conn_fds[h->nconn++] = fd;
		return;
	}
	for (int i = 0; i < h->nconn; i++)
		if (h->conn_fds[i] == fd) {
			h->conn_fds[i] = h->conn_fds[--h->nconn];
			break;
		}
}

static void http_log(void *cls, const char *fmt, va_list ap)
{
	(void)cls;
	char msg[512];
	vsnprintf(msg, sizeof(msg), fmt, ap);
	size_t n = strlen(msg);
	while (n > 0 && msg[n - 1] == '\n')
		msg[--n] = '\0';
	log_warnx("http_listen: %s", msg);
}

/* ---------------------------------------------------------------- the status page */


static void out_str(struct buf *out, const char *s)
{
	buf_append(out, s, strlen(s));
}

/* The one way a string that is not ours reaches the page. */
static void out_escaped(struct buf *out, const char *s)
{
	char esc[ESCAPE_HTML_SIZE(STATS_NAME_MAX)];
	size_t len = utf8_prefix(s, strlen(s), STATS_NAME_MAX);
	escape_html(esc, sizeof(esc), s, len);
	out_str(out, esc);
}

static const char *human_bytes(char *b, size_t len, double v)
{
	static const char *units[] = { "B", "KiB", "MiB", "GiB", "TiB", "PiB" };
	int u = 0;
	while (v >= 1024 && u < 5) {
		v /= 1024;
		u++;
	}
	snprintf(b, len, u == 0 ? "%.0f %s" : "%.1f %s", v, units[u]);
	return b;
}

static const char *human_duration(char *b, size_t len, long s)
{
	if (s >= 86400)
		snprintf(b, len, "%ldd %ldh", s / 86400, s % 86400 / 3600);
	else if (s >= 3600)
		snprintf(b, len, "%ldh %02ldm", s / 3600, s % 3600 / 60);
	else if (s >= 60)
		snprintf(b, len, "%ldm %02lds", s / 60, s % 60);
	else
		snprintf(b, len, "%lds", s);
	return b;
}

static const char page_style[] =
    "body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#222}"
    "header{background:#263238;color:#fff;padding:10px 18px;display:flex;gap:18px;align-items:baseline;flex-wrap:wrap}"
    "header h1{font-size:18px;margin:0}header .meta{color:#cfd8dc}"
    "main{padding:8px 18px}h2{font-size:15px;margin:18px 0 6px}"
    ".state{font-weight:bold;padding:2px 10px;border-radius:3px;color:#fff}"
    ".up{background:#2e7d32}.drain{background:#ef6c00}.down{background:#c62828}"
    ".cards{display:flex;gap:10px;flex-wrap:wrap}.card{background:#fff;border:1px solid #ddd;border-radius:4px;"
    "padding:8px 14px;min-width:120px}.card b{display:block;font-size:20px}.card span{color:#666;font-size:12px}"
    "table{border-collapse:collapse;background:#fff;min-width:50%}"
    "th,td{border:1px solid #ddd;padding:3px 10px;text-align:left}th{background:#eceff1}"
    "td.n{text-align:right;font-variant-numeric:tabular-nums}"
    "tr.running td:first-child{border-left:4px solid #2e7d32}tr.retiring td:first-child{border-left:4px solid #ef6c00}"
    "tr.down td:first-child{border-left:4px solid #c62828}tr.down{background:#ffebee}"
    ".yes{color:#2e7d32;font-weight:bold}.no{color:#c62828;font-weight:bold}"
    "progress{width:180px;vertical-align:middle}.name{font-family:monospace;word-break:break-all}"
    ".none{color:#777;font-style:italic}footer{color:#666;font-size:12px;padding:12px 18px}"
    "footer a{color:#37474f}";

static void page_card(struct buf *out, const char *value, const char *label)
{
	buf_printf(out, "<div class=\"card\"><b>%s</b><span>%s</span></div>", value, label);
}

static void page_header(struct http *h, struct buf *out, const struct control_totals *t)
{
	int weight;
	const char *state = control_state(h->control, &weight);
	char host[256] = "", up[32], v[64];
	gethostname(host, sizeof(host) - 1);
	buf_printf(out, "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
	    "<meta http-equiv=\"refresh\" content=\"%d\"><title>", HTTP_REFRESH);
	out_str(out, "resourced on ");
	out_escaped(out, host);
	out_str(out, "</title><style>");
	out_str(out, page_style);
	buf_printf(out, "</style></head><body>\n<header><h1>resourced %s on ", PACKAGE_VERSION);
	out_escaped(out, host);
	buf_printf(out, "</h1><span class=\"state %s\" id=\"state\">%s</span>", state, state);
	if (strcmp(state, "up") == 0)
		buf_printf(out, "<span class=\"meta\">weight %d%%</span>", weight);
	buf_printf(out, "<span class=\"meta\">uptime %s</span><span class=\"meta\">master pid %d</span></header>\n<main>\n",
	    human_duration(up, sizeof(up), control_uptime(h->control)), (int)getpid());

	uint64_t errors = 0;
	for (int e = 0; e < STATS_ERR_COUNT; e++)
		errors += t->errors[e];
	out_str(out, "<div class=\"cards\">");
	snprintf(v, sizeof(v), "%llu", (unsigned long long)t->conn_current);
	page_card(out, v, "connections open");
	struct control_proc_view procs[STATS_MAX_SLOTS];
	int n = control_processes(h->control, procs, STATS_MAX_SLOTS), expected = 0;
	for (int i = 0; i < n; i++)
		expected += strcmp(procs[i].proc.role, "worker") == 0 && strcmp(procs[i].proc.state, "retiring") != 0;
	snprintf(v, sizeof(v), "%d / %d", t->workers, expected);
	page_card(out, v, "workers running / wanted");
	snprintf(v, sizeof(v), "%llu", (unsigned long long)t->uploads_in_progress);
	page_card(out, v, "uploads in progress");
	page_card(out, human_bytes(v, sizeof(v), (double)t->upload_bytes), "uploaded");
	page_card(out, human_bytes(v, sizeof(v), (double)t->download_bytes), "downloaded");
	snprintf(v, sizeof(v), "%llu", (unsigned long long)t->storage_queue);
	page_card(out, v, "storage queue");
	snprintf(v, sizeof(v), "%llu", (unsigned long long)errors);
	page_card(out, v, "error responses");
	out_str(out, "</div>\n");
}

static const char *yes_no(int v)
{
	return v ? "<span class=\"yes\">yes</span>" : "<span class=\"no\">no</span>";
}

static void page_processes(struct http *h, struct buf *out)
{
	struct control_proc_view procs[STATS_MAX_SLOTS];
	int n = control_processes(h->control, procs, STATS_MAX_SLOTS);
	out_str(out, "<h2>Processes</h2>\n<table id=\"processes\"><tr><th>role</th><th>#</th><th>pid</th><th>state</th>"
	    "<th>uptime</th><th>restarts</th><th>connections</th><th>Redis</th><th>storage link</th></tr>\n");
	for (int i = 0; i < n; i++) {
		const struct control_proc_view *p = &procs[i];
		char up[32];
		/* role and state are the master's own words, never a client's. */
		buf_printf(out, "<tr class=\"%s\"><td>%s</td><td class=\"n\">%d</td><td class=\"n\">%d</td><td>%s</td>"
		    "<td class=\"n\">%s</td><td class=\"n\">%d</td><td class=\"n\">%llu</td><td>%s</td><td>%s</td></tr>\n",
		    p->proc.state, p->proc.role, p->proc.number, (int)p->proc.pid, p->proc.state,
		    human_duration(up, sizeof(up), p->uptime), p->proc.restarts, p->connections, yes_no(p->redis_up),
		    p->storage_up < 0 ? "&ndash;" : yes_no(p->storage_up));
	}
	out_str(out, "</table>\n");
}

struct page_transfers {
	struct buf *rows;
	int count;
};

static void page_transfer(void *ctx, const struct control_transfer *t)
{
	struct page_transfers *pt = ctx;
	struct buf *out = pt->rows;
	char done[32], total[32], rate[32], age[32];
	double pct = t->total ? 100.0 * (double)t->bytes / (double)t->total : 0;
	pt->count++;
	buf_printf(out, "<tr><td>%s</td><td class=\"n\">%llu</td><td class=\"name\">", t->kind, (unsigned long long)t->uid);
	out_escaped(out, t->name);
	buf_printf(out, "</td><td><progress max=\"100\" value=\"%.0f\"></progress> %.0f%%</td>"
	    "<td class=\"n\">%s / %s</td><td class=\"n\">%s/s</td><td class=\"n\">%s</td></tr>\n",
	    pct, pct, human_bytes(done, sizeof(done), (double)t->bytes), human_bytes(total, sizeof(total), (double)t->total),
	    human_bytes(rate, sizeof(rate), t->rate), human_duration(age, sizeof(age), (long)t->age));
}

static void page_transfers(struct http *h, struct buf *out)
{
	struct buf rows = { 0 };
	struct page_transfers pt = { &rows, 0 };
	control_transfers(h->control, page_transfer, &pt);
	buf_printf(out, "<h2>Transfers in progress (%d)</h2>\n", pt.count);
	if (pt.count == 0) {
		out_str(out, "<p class=\"none\" id=\"transfers\">none</p>\n");
	} else {
		out_str(out, "<table id=\"transfers\"><tr><th>kind</th><th>uid</th><th>name</th><th>progress</th>"
		    "<th>bytes</th><th>rate</th><th>age</th></tr>\n");
		buf_append(out, buf_head(&rows), buf_len(&rows));
		out_str(out, "</table>\n");
	}
	buf_free(&rows);
}

static void page_codes(struct buf *out, const struct control_totals *t)
{
	int any = 0;
	out_str(out, "<h2>Responses by code</h2>\n");
	for (int e = 0; e < STATS_ERR_COUNT; e++) {
		if (t->errors[e] == 0 && t->expected[e] == 0)
			continue;
		if (!any)
			out_str(out, "<table id=\"codes\"><tr><th>code</th><th>errors</th><th>expected answers</th></tr>\n");
		any = 1;
		buf_printf(out, "<tr><td>%d</td><td class=\"n\">%llu</td><td class=\"n\">%llu</td></tr>\n",
		    STATS_ERR_BASE + e, (unsigned long long)t->errors[e], (unsigned long long)t->expected[e]);
	}
	out_str(out, any ? "</table>\n<p class=\"none\">Expected answers: a sync's 1012 before a fresh upload "
	    "(docs/protocol.md lists the codes).</p>\n" : "<p class=\"none\" id=\"codes\">none</p>\n");
}

static void page_counters(struct buf *out, const struct control_totals *t)
{
	static const struct { const char *name; size_t offset; int bytes; } shown[] = {
		{ "connections accepted", offsetof(struct control_totals, conn_total), 0 },
		{ "connections rejected (max_connections)", offsetof(struct control_totals, conn_rejected), 0 },
		{ "frames in / out", offsetof(struct control_totals, frames_in), 0 },
		{ "received from clients", offsetof(struct control_totals, bytes_in), 1 },
		{ "sent to clients", offsetof(struct control_totals, bytes_out), 1 },
		{ "uploads started", offsetof(struct control_totals, uploads_started), 0 },
		{ "uploads completed", offsetof(struct control_totals, uploads_completed), 0 },
		{ "upload chunks failed", offsetof(struct control_totals, uploads_failed), 0 },
		{ "uploads refused (limits, space)", offsetof(struct control_totals, uploads_refused), 0 },
		{ "downloads started", offsetof(struct control_totals, downloads_started), 0 },
		{ "downloads completed", offsetof(struct control_totals, downloads_completed), 0 },
		{ "credential failures", offsetof(struct control_totals, auth_failures), 0 },
		{ "Redis errors", offsetof(struct control_totals, redis_errors), 0 },
		{ "PostgreSQL errors", offsetof(struct control_totals, pg_errors), 0 },
		{ "avatar updates waiting for PostgreSQL", offsetof(struct control_totals, retry_backlog), 0 },
	};
	out_str(out, "<h2>Totals since start</h2>\n<table id=\"totals\">");
	for (size_t i = 0; i < sizeof(shown) / sizeof(shown[0]); i++) {
		const uint64_t *v = (const uint64_t *)((const char *)t + shown[i].offset);
		char b[32];
		if (v == &t->frames_in)
			buf_printf(out, "<tr><th>%s</th><td class=\"n\">%llu / %llu</td></tr>", shown[i].name,
			    (unsigned long long)t->frames_in, (unsigned long long)t->frames_out);
		else if (shown[i].bytes)
			buf_printf(out, "<tr><th>%s</th><td class=\"n\">%s</td></tr>", shown[i].name,
			    human_bytes(b, sizeof(b), (double)*v));
		else
			buf_printf(out, "<tr><th>%s</th><td class=\"n\">%llu</td></tr>", shown[i].name, (unsigned long long)*v);
	}
	out_str(out, "</table>\n");
}

static void status_page(struct http *h, struct buf *out)
{
	struct control_totals t;
	control_sum(h->control, &t);
	page_header(h, out, &t);
	page_processes(h, out);
	page_transfers(h, out);
	page_codes(out, &t);
	page_counters(out, &t);
	buf_printf(out, "</main>\n<footer>Refreshes every %d s. Also: <a href=\"/status.json\">/status.json</a> "
	    "&middot; <a href=\"/metrics\">/metrics</a> &middot; <a href=\"/health\">/health</a></footer>\n"
	    "</body></html>\n", HTTP_REFRESH);
}

/* show info json, show workers json and show transfers json in one object. */
static void status_json(struct http *h, struct buf *out)
{
	out_str(out, "{\"info\":");
	control_report(h->control, CONTROL_INFO, 1, out);
	out_str(out, ",\"workers\":");
	control_report(h->control, CONTROL_WORKERS, 1, out);
	out_str(out, ",\"transfers\":");
	control_report(h->control, CONTROL_TRANSFERS, 1, out);
	out_str(out, "}\n");
}

/* ---------------------------------------------------------------- requests */

static enum MHD_Result respond(struct MHD_Connection *conn, unsigned status, const char *type, struct buf *body)
{
	struct MHD_Response *r = MHD_create_response_from_buffer(buf_len(body), (void *)buf_head(body),
	    MHD_RESPMEM_MUST_COPY);
	buf_free(body);
	if (r == NULL)
		return MHD_NO;
	MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
	MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
	MHD_add_response_header(r, "X-Content-Type-Options", "nosniff");
	/* No script runs on these pages, whatever a name slipped through: inline CSS only. */
	MHD_add_response_header(r, "Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'");
	if (status == MHD_HTTP_METHOD_NOT_ALLOWED)
		MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
	enum MHD_Result rc = MHD_queue_response(conn, status, r);
	MHD_destroy_response(r);
	return rc;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
    const char *version, const char *upload_data, size_t *upload_data_size, void **req_cls)
{
	(void)version;
	(void)upload_data;
	(void)upload_data_size;
	(void)req_cls;
	struct http *h = cls;
	struct buf body = { 0 };
	static const char text[] = "text/plain; charset=utf-8";
	if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0) {
		out_str(&body, "method not allowed: GET or HEAD\n");
		return respond(conn, MHD_HTTP_METHOD_NOT_ALLOWED, text, &body);
	}
	if (strcmp(url, "/metrics") == 0) {
		control_report(h->control, CONTROL_METRICS, 0, &body);
		return respond(conn, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", &body);
	}
	if (strcmp(url, "/health") == 0) {
		/* The agent-check's answer: a balancer sends traffic on 200 only. */
		int weight;
		const char *state = control_state(h->control, &weight);
		buf_printf(&body, "%s\n", state);
		return respond(conn, strcmp(state, "up") == 0 ? MHD_HTTP_OK : MHD_HTTP_SERVICE_UNAVAILABLE, text, &body);
	}
	if (strcmp(url, "/status.json") == 0) {
		status_json(h, &body);
		return respond(conn, MHD_HTTP_OK, "application/json", &body);
	}
	if (strcmp(url, "/") == 0) {
		status_page(h, &body);
		return respond(conn, MHD_HTTP_OK, "text/html; charset=utf-8", &body);
	}
	out_str(&body, "not found: try /, /metrics, /health or /status.json\n");
	return respond(conn, MHD_HTTP_NOT_FOUND, text, &body);
}

/* ---------------------------------------------------------------- life cycle */

struct http *http_create(struct ev_loop *loop, const char *listen, struct control *control)
{
	struct http *h = calloc(1, sizeof(*h));
	if (h == NULL)
		fatalx("out of memory");
	h->loop = loop;
	h->control = control;
	h->listen_fd = listen_tcp(listen);
	if (h->listen_fd < 0)
		fatal("http_listen %s", listen);
	h->daemon = MHD_start_daemon(MHD_USE_EPOLL | MHD_USE_ERROR_LOG, 0, NULL, NULL, on_request, h,
	    MHD_OPTION_EXTERNAL_LOGGER, http_log, h,   /* first: it applies to the options after it */
	    MHD_OPTION_LISTEN_SOCKET, (MHD_socket)h->listen_fd,
	    MHD_OPTION_CONNECTION_LIMIT, (unsigned)HTTP_MAX_CONNECTIONS,
	    MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned)HTTP_MAX_PER_ADDRESS,
	    MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)HTTP_TIMEOUT,
	    MHD_OPTION_NOTIFY_CONNECTION, http_on_connection, h,
	    MHD_OPTION_END);
	if (h->daemon == NULL)
		fatalx("http_listen %s: libmicrohttpd cannot start", listen);
	const union MHD_DaemonInfo *info = MHD_get_daemon_info(h->daemon, MHD_DAEMON_INFO_EPOLL_FD);
	if (info == NULL)
		fatalx("http_listen %s: libmicrohttpd has no epoll descriptor", listen);
	h->epoll_fd = info->epoll_fd;
	ev_io_init(&h->io, http_on_io, h->epoll_fd, EV_READ);
	h->io.data = h;
	ev_io_start(loop, &h->io);
	ev_timer_init(&h->timer, http_on_timer, 0., 0.);
	h->timer.data = h;
	log_info("http_listen: /metrics, /health and the status page on %s", listen);
	return h;
}

void http_destroy(struct http *h)
{
	if (h == NULL)
		return;
	ev_io_stop(h->loop, &h->io);
	ev_timer_stop(h->loop, &h->timer);
	MHD_stop_daemon(h->daemon);   /* closes its connections and the listening socket it was lent */
	free(h);
}

void http_close_inherited(struct http *h)
{
	if (h == NULL)
		return;
	/* Only this process's copies: shutting MHD down here would cut the master's connections. */
	for (int i = 0; i < h->nconn; i++)
		close(h->conn_fds[i]);
	close(h->epoll_fd);
	close(h->listen_fd);
	h->nconn = 0;
	h->listen_fd = h->epoll_fd = -1;
}

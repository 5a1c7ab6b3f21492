/* http.h: the master's optional HTTP listener ([server] http_listen): /metrics, /health, the status page. */
#ifndef RESOURCED_HTTP_H
#define RESOURCED_HTTP_H

#include <ev.h>

struct control;

struct http;

/* Binds listen (host:port) and serves from the master's loop; exits the process when it cannot. */
struct http *http_create(struct ev_loop *loop, const char *listen, struct control *control);
void http_destroy(struct http *h);
/* In a forked child: closes the inherited sockets and leaves the master's connections alone. */
void http_close_inherited(struct http *h);

#endif

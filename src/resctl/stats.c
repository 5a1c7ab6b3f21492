/* stats.c: `resctl stats`, a client of the master's stats socket (HAProxy-style commands). */
#include "config.h"
#include "resctl.h"

#include <errno.h>
#include <getopt.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define STATS_DEFAULT_SOCKET "/run/resourced/stats.sock"
#define STATS_TIMEOUT_MS 10000
/* A reload answers once its check of the new storage root is over, which the daemon bounds by
 * [server] storage_timeout (default 30 s, at most 3600): waiting only 10 s said "no answer" while
 * a slow root was still being checked. */
#define STATS_RELOAD_TIMEOUT_MS 120000

static const char stats_usage[] =
    "usage: resctl stats [--socket PATH] [--timeout S] [COMMAND...]\n"
    "Sends one command to the stats socket of a running resourced ([server] stats_socket)\n"
    "and prints the answer. Without COMMAND: show info. Commands (see `resctl stats help`):\n"
    "  show info|stat|workers|transfers|metrics [json], disable, enable, reload\n"
    "  --socket PATH    the stats socket (default " STATS_DEFAULT_SOCKET ")\n"
    "  --timeout S      seconds to wait for the answer (default 10; 120 for reload)\n"
    "  -h, --help       this text\n";

struct stats_opts {
	const char *socket_path;
	int timeout_ms;   /* 0: the command's default */
};

enum { OPT_SOCKET = 256, OPT_TIMEOUT };

static int stats_option(void *ctx, int opt, const char *arg)
{
	struct stats_opts *o = ctx;
	if (opt == OPT_SOCKET) {
		o->socket_path = arg;
		return 0;
	}
	if (opt == OPT_TIMEOUT) {
		uint64_t ms;
		if (resctl_parse_seconds_ms(arg, 86400000, &ms) != 0 || ms == 0) {
			resctl_error("stats: --timeout wants seconds > 0, not '%s'", arg);
			return -1;
		}
		o->timeout_ms = (int)ms;
		return 0;
	}
	return -1;
}

int resctl_stats_main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "socket", required_argument, NULL, OPT_SOCKET },
		{ "timeout", required_argument, NULL, OPT_TIMEOUT },
		{ NULL, 0, NULL, 0 },
	};
	struct stats_opts o = { STATS_DEFAULT_SOCKET, 0 };
	int npos = resctl_parse_options("stats", argc, argv, longopts, stats_usage, stats_option, &o);
	if (npos < 0)
		return RESCTL_EXIT_USAGE;
	char command[1024] = "";
	size_t len = 0;
	for (int i = optind; i < argc; i++) {
		int n = snprintf(command + len, sizeof(command) - len, "%s%s", i > optind ? " " : "", argv[i]);
		if (n < 0 || (size_t)n >= sizeof(command) - len) {
			resctl_error("stats: command too long");
			return RESCTL_EXIT_USAGE;
		}
		len += (size_t)n;
	}
	if (len == 0)
		len = (size_t)snprintf(command, sizeof(command), "show info");
	int timeout_ms = o.timeout_ms ? o.timeout_ms : strcmp(command, "reload") == 0 ? STATS_RELOAD_TIMEOUT_MS :
	    STATS_TIMEOUT_MS;
	command[len++] = '\n';

	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	if (snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", o.socket_path) >= (int)sizeof(sun.sun_path)) {
		resctl_error("stats: socket path too long");
		return RESCTL_EXIT_USAGE;
	}
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
		int saved = errno;
		/* What to do next depends on why: the three an operator meets, said as such. */
		const char *hint = saved == ENOENT ? "no socket there: is resourced running, with [server] stats_socket "
		    "set to this path? (--socket PATH names another)"
		    : saved == ECONNREFUSED ? "nothing listens on it: the resourced that made it has stopped"
		    : saved == EACCES ? "the socket is mode 0660: run as root, or as the user or a member of the group "
		    "resourced runs as" : NULL;
		resctl_error("stats: cannot connect to %s: %s%s%s", o.socket_path, strerror(saved), hint ? "; " : "",
		    hint ? hint : "");
		if (fd >= 0)
			close(fd);
		return RESCTL_EXIT_FAIL;
	}
	if (send(fd, command, len, MSG_NOSIGNAL) != (ssize_t)len || shutdown(fd, SHUT_WR) < 0) {
		resctl_error("stats: cannot send to %s: %s", o.socket_path, strerror(errno));
		close(fd);
		return RESCTL_EXIT_FAIL;
	}
	/* The answer ends when the master closes; "Unknown command" and "ERROR" lines mean failure. */
	int status = RESCTL_EXIT_OK, at_line_start = 1;
	char buf[65536];
	for (;;) {
		struct pollfd pfd = { fd, POLLIN, 0 };
		int pr = poll(&pfd, 1, timeout_ms);
		if (pr == 0) {
			resctl_error("stats: no answer within %.3g s (--timeout SECONDS waits longer)", timeout_ms / 1000.0);
			status = RESCTL_EXIT_FAIL;
			break;
		}
		ssize_t n = read(fd, buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		if (at_line_start && (strncmp(buf, "Unknown command", 15) == 0 || strncmp(buf, "ERROR", 5) == 0))
			status = RESCTL_EXIT_FAIL;
		at_line_start = 0;
		fwrite(buf, 1, (size_t)n, stdout);
	}
	close(fd);
	return status;
}

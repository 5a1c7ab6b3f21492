/* link.h: one end of the worker-storage link: IPC messages queued out of and read into a Unix socket on a libev loop. */
#ifndef RESOURCED_LINK_H
#define RESOURCED_LINK_H

#include <ev.h>
#include <stddef.h>
#include <sys/types.h>

#include "buf.h"
#include "ipc.h"

/* Both ends (worker.c's storage link, storage_process.c's worker links) are one of these, in the spirit
 * of OpenBSD's imsg: messages are queued with the ipc_encode_* functions into out and sent by
 * link_flush; link_read fills in, and link_next / link_consume take messages off its front. */
struct link {
	struct ev_loop *loop;
	int fd;                       /* -1: closed */
	ev_io io;                     /* io.data is the owner's */
	struct buf in, out;
	int want_write;               /* watch writability even with nothing queued (the owner waits for room) */
};

/* What link_read got besides bytes. */
enum { LINK_AGAIN = 0, LINK_EOF = -1, LINK_ERROR = -2 };

/* Starts watching fd for reading; cb gets the io watcher, whose data is set to owner. */
void link_open(struct link *l, struct ev_loop *loop, int fd, void (*cb)(struct ev_loop *, ev_io *, int), void *owner);
/* Stops the watcher, closes the socket and frees both buffers (a closed link may be closed again). */
void link_close(struct link *l);
/* Watches writability while anything is queued or want_write is set, readability always. */
void link_update_io(struct link *l);
/* Sends what is queued as far as the socket takes it now. Returns 0, or -1 when the socket failed:
 * the queue is dropped and the read side, seeing the broken link, closes it from the loop (the
 * caller may be deep in a request). */
int link_flush(struct link *l);
/* Reads at most max bytes into in: the count, LINK_AGAIN (nothing now), LINK_EOF (the peer
 * closed), or LINK_ERROR (errno says why; ENOMEM when in could not grow). */
ssize_t link_read(struct link *l, size_t max);
/* link_read that also takes a descriptor sent along (SCM_RIGHTS): *fd, if it is -1, gets the first
 * one received; any other is closed. */
#define LINK_MAX_FDS 4
ssize_t link_read_fd(struct link *l, size_t max, int *fd);
/* Sends len bytes of a message with fd attached, on a link with nothing queued. Returns 0 (what the
 * socket did not take now is queued in out, in order), or -1 (nothing was sent: errno says why). */
int link_send_fd(struct link *l, const void *msg, size_t len, int fd);
/* The message at the front of in (ipc_decode_header's answer); link_consume drops it once handled. */
enum ipc_status link_next(const struct link *l, struct ipc_header *h, const uint8_t **payload);
void link_consume(struct link *l, const struct ipc_header *h);

/* The storage socket, IPC_SOCKET_NAME in run_dir: the master binds it, workers connect to it.
 * Returns 0, or -1 when the path does not fit in a Unix socket address (out holds it cut;
 * outlen must be at least that address's size). */
int link_socket_path(const char *run_dir, char *out, size_t outlen);

#endif

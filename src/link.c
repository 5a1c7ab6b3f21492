/* link.c: the worker-storage link's framing, sending, reading and end of stream, shared by both ends. */
#include "config.h"
#include "link.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

void link_open(struct link *l, struct ev_loop *loop, int fd, void (*cb)(struct ev_loop *, ev_io *, int), void *owner)
{
	l->loop = loop;
	l->fd = fd;
	l->want_write = 0;
	ev_io_init(&l->io, cb, fd, EV_READ);
	l->io.data = owner;
	ev_io_start(loop, &l->io);
}

void link_close(struct link *l)
{
	if (l->fd >= 0) {
		ev_io_stop(l->loop, &l->io);
		close(l->fd);
	}
	l->fd = -1;
	buf_free(&l->in);
	buf_free(&l->out);
}

void link_update_io(struct link *l)
{
	int events = EV_READ | (buf_len(&l->out) > 0 || l->want_write ? EV_WRITE : 0);
	if (ev_is_active(&l->io) && (l->io.events & (EV_READ | EV_WRITE)) == events)
		return;
	ev_io_stop(l->loop, &l->io);
	ev_io_set(&l->io, l->fd, events);
	ev_io_start(l->loop, &l->io);
}

int link_flush(struct link *l)
{
	int rc = 0;
	while (buf_len(&l->out) > 0) {
		ssize_t n = send(l->fd, buf_head(&l->out), buf_len(&l->out), MSG_NOSIGNAL);
		if (n > 0) {
			buf_consume(&l->out, (size_t)n);
		} else if (n < 0 && errno == EINTR) {
			continue;
		} else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			break;
		} else {
			buf_free(&l->out);
			rc = -1;
			break;
		}
	}
	link_update_io(l);
	return rc;
}

ssize_t link_read(struct link *l, size_t max)
{
	uint8_t *p = buf_reserve(&l->in, max);
	if (p == NULL) {
		errno = ENOMEM;
		return LINK_ERROR;
	}
	ssize_t n = recv(l->fd, p, max, 0);
	if (n > 0) {
		buf_commit(&l->in, (size_t)n);
		return n;
	}
	if (n == 0)
		return LINK_EOF;
	return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? LINK_AGAIN : LINK_ERROR;
}

ssize_t link_read_fd(struct link *l, size_t max, int *fd)
{
	uint8_t *p = buf_reserve(&l->in, max);
	if (p == NULL) {
		errno = ENOMEM;
		return LINK_ERROR;
	}
	union {
		struct cmsghdr align;
		char space[CMSG_SPACE(sizeof(int) * LINK_MAX_FDS)];
	} control;
	struct iovec iov = { p, max };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space,
	    .msg_controllen = sizeof(control.space) };
	ssize_t n = recvmsg(l->fd, &msg, MSG_CMSG_CLOEXEC);
	if (n > 0) {
		for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm != NULL; cm = CMSG_NXTHDR(&msg, cm)) {
			if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
				continue;
			size_t count = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
			for (size_t i = 0; i < count; i++) {
				int got;
				memcpy(&got, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
				if (*fd < 0)
					*fd = got;
				else
					close(got);   /* one descriptor at a time is all the link carries */
			}
		}
		buf_commit(&l->in, (size_t)n);
		return n;
	}
	if (n == 0)
		return LINK_EOF;
	return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? LINK_AGAIN : LINK_ERROR;
}

int link_send_fd(struct link *l, const void *msg, size_t len, int fd)
{
	union {
		struct cmsghdr align;
		char space[CMSG_SPACE(sizeof(int))];
	} control;
	memset(&control, 0, sizeof(control));
	struct iovec iov = { (void *)msg, len };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space,
	    .msg_controllen = sizeof(control.space) };
	struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cm), &fd, sizeof(int));
	ssize_t n;
	do
		n = sendmsg(l->fd, &mh, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -1;
	/* The descriptor went with the first byte; whatever the socket did not take follows in order. */
	if ((size_t)n < len && buf_append(&l->out, (const uint8_t *)msg + n, len - (size_t)n) < 0)
		return -1;
	return 0;
}

enum ipc_status link_next(const struct link *l, struct ipc_header *h, const uint8_t **payload)
{
	return ipc_decode_header(buf_head(&l->in), buf_len(&l->in), h, payload);
}

void link_consume(struct link *l, const struct ipc_header *h)
{
	buf_consume(&l->in, IPC_HEADER_LEN + h->len);
}

int link_socket_path(const char *run_dir, char *out, size_t outlen)
{
	int n = snprintf(out, outlen, "%s/%s", run_dir, IPC_SOCKET_NAME);
	return n < 0 || (size_t)n >= outlen || (size_t)n >= sizeof(((struct sockaddr_un *)0)->sun_path) ? -1 : 0;
}

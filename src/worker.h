/* worker.h: a worker process, which owns the client connections accepted on its own socket. */
#ifndef RESOURCED_WORKER_H
#define RESOURCED_WORKER_H

struct conf;

/* Runs the worker's loop until it is told to stop; returns the exit status. */
int worker_main(const struct conf *conf, int slot, int listen_fd);

#endif

/* storage.h: the storage process, the only writer of uploads: staging, progress, publishing. */
#ifndef RESOURCED_STORAGE_H
#define RESOURCED_STORAGE_H

struct conf;

/* Serves workers on listen_fd (a bound Unix socket) until told to stop. */
int storage_main(const struct conf *conf, int listen_fd);

#endif

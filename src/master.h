/* master.h: the master process, which binds the sockets, forks the others and supervises them. */
#ifndef RESOURCED_MASTER_H
#define RESOURCED_MASTER_H

struct conf;

/* Runs until stopped; returns the exit status. */
int master_run(struct conf *conf, const char *conf_path, int foreground);

/* Names the calling process in ps and in its log lines. */
void proc_set_title(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif

/* main.c: the resourced command line: load and check the configuration, then hand over to the master. */
#include "config.h"
#include "conf.h"
#include "log.h"
#include "master.h"

#include <bsd/unistd.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern char **environ;

static void usage(FILE *out)
{
	fprintf(out,
	    "usage: resourced [-f] [-t] [-c FILE]\n"
	    "  -c FILE  configuration file (default %s/resourced.conf)\n"
	    "  -f       stay in the foreground and log to stderr (systemd, tests)\n"
	    "  -t       check the configuration and exit: 0 if good, 1 if not\n"
	    "  -h       this help\n"
	    "  -V       print the version\n", SYSCONFDIR);
}

int main(int argc, char *argv[])
{
	const char *conf_path = SYSCONFDIR "/resourced.conf";
	int foreground = 0, test_only = 0, opt;

	setproctitle_init(argc, argv, environ);
	while ((opt = getopt(argc, argv, "c:fthV")) != -1) {
		switch (opt) {
		case 'c': conf_path = optarg; break;
		case 'f': foreground = 1; break;
		case 't': test_only = 1; break;
		case 'h': usage(stdout); return 0;
		case 'V': printf("resourced %s\n", PACKAGE_VERSION); return 0;
		default: usage(stderr); return 1;
		}
	}
	if (optind != argc) {
		usage(stderr);
		return 1;
	}

	static struct conf conf;
	char err[512];
	conf_defaults(&conf);
	if (conf_load(&conf, conf_path, err, sizeof(err)) < 0) {
		fprintf(stderr, "resourced: %s\n", err);
		return 1;
	}
	if (test_only) {
		printf("resourced: configuration file %s is valid\n", conf_path);
		return 0;
	}
	return master_run(&conf, conf_path, foreground);
}

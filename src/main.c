/* main.c: the resourced command line: load and check the configuration, then hand over to the master. */
#include "config.h"
#include "conf.h"
#include "log.h"
#include "master.h"
#include "preflight.h"

#include <bsd/unistd.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern char **environ;

static void usage(FILE *out)
{
	fprintf(out,
	    "usage: resourced [-f] [-t] [-c FILE]\n"
	    "  -c, --config FILE  configuration file (default %s/resourced.conf)\n"
	    "  -f, --foreground   stay in the foreground and log to stderr (systemd, tests)\n"
	    "  -t, --test         check the configuration and what start needs, then exit:\n"
	    "                     0 if good, 1 if not\n"
	    "  -h, --help         this help\n"
	    "  -V, --version      print the version\n", SYSCONFDIR);
}

int main(int argc, char *argv[])
{
	const char *conf_path = SYSCONFDIR "/resourced.conf";
	int foreground = 0, test_only = 0, conf_given = 0, opt;

	setproctitle_init(argc, argv, environ);
	static const struct option longopts[] = {
		{ "config", required_argument, NULL, 'c' },
		{ "foreground", no_argument, NULL, 'f' },
		{ "test", no_argument, NULL, 't' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	while ((opt = getopt_long(argc, argv, "c:fthV", longopts, NULL)) != -1) {
		switch (opt) {
		case 'c': conf_path = optarg; conf_given = 1; break;
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
	if (preflight_config_path(conf_path, err, sizeof(err)) < 0 || conf_load(&conf, conf_path, err, sizeof(err)) < 0) {
		fprintf(stderr, "resourced: %s\n", err);
		if (!conf_given && access(conf_path, F_OK) < 0)   /* a first run from a build tree */
			fprintf(stderr, "resourced: name a configuration file with -c FILE (etc/resourced.conf of the "
			    "sources documents every key; `make install` puts it at %s)\n", conf_path);
		return 1;
	}
	/* Start checks the same things -t does, so it fails with the reason instead of half-way. */
	int problems = preflight_check(&conf, stderr);
	preflight_config_secrets(&conf, conf_path, stderr);
	preflight_syslog(&conf, foreground, test_only, stderr);
	if (test_only) {
		problems += preflight_check_running(&conf, stderr);
		if (problems) {
			fprintf(stderr, "resourced: configuration file %s test failed (%d problem%s)\n", conf_path,
			    problems, problems == 1 ? "" : "s");
			return 1;
		}
		printf("resourced: configuration file %s is valid\n", conf_path);
		return 0;
	}
	if (problems) {
		fprintf(stderr, "resourced: not started: fix the problem%s above (resourced -t checks)\n",
		    problems == 1 ? "" : "s");
		return 1;
	}
	/* Reloads read it again, from / once daemonized. */
	static char conf_abs[PATH_MAX];
	if (realpath(conf_path, conf_abs) != NULL)
		conf_path = conf_abs;
	return master_run(&conf, conf_path, foreground);
}

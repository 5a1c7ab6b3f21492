/* unit.h: shared helpers for the Check unit tests: run one suite with TAP on stdout and exit non-zero on any failure. */
#ifndef RESOURCED_UNIT_H
#define RESOURCED_UNIT_H

#include <check.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Runs s, printing only TAP ("ok N - ...", then the "1..N" plan) on stdout
 * (Check 0.15 maps the file name "-" to stdout). Each test runs in its own
 * child unless CK_FORK=no is set, so a crash fails one test, not the run. */
static inline int unit_run(Suite *s)
{
	SRunner *sr = srunner_create(s);
	srunner_set_tap(sr, "-");
	/* Nothing buffered may be inherited by the forked children. */
	fflush(stdout);
	srunner_run_all(sr, CK_SILENT);
	int failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	fflush(stdout);
	return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

/* Copies up to 80 bytes of p[0..len) into out (at least 400 bytes) as printable
 * ASCII, other bytes as \xHH, so failure messages stay one clean TAP line. */
static inline const char *unit_printable(const void *p, size_t len, char *out)
{
	const unsigned char *s = p;
	size_t k = 0;
	for (size_t i = 0; i < len && i < 80; i++) {
		if (s[i] >= 0x20 && s[i] < 0x7f && s[i] != '\\')
			out[k++] = (char)s[i];
		else
			k += (size_t)sprintf(out + k, "\\x%02x", s[i]);
	}
	if (len > 80)
		k += (size_t)sprintf(out + k, "...");
	out[k] = '\0';
	return out;
}

/* Asserts that the NUL-terminated haystack contains needle. */
#define unit_assert_contains(haystack, needle) \
	ck_assert_msg(strstr((haystack), (needle)) != NULL, \
	    "expected \"%s\" to contain \"%s\"", (haystack), (needle))

#endif

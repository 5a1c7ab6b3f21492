/* fuzz_check.h: the invariant check of the fuzz targets: names the failed
 * condition and its line on stderr, then __builtin_trap() (libFuzzer saves the input). */
#ifndef RESOURCED_FUZZ_CHECK_H
#define RESOURCED_FUZZ_CHECK_H

#include <stdio.h>

#define CHECK(cond) do { \
	if (!(cond)) { \
		fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond); \
		__builtin_trap(); \
	} \
} while (0)

#endif

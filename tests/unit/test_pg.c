/* test_pg.c: unit tests of the avatar queue's pending files (pg.c): two disk threads writing one user's file at once leave one whole name. */
#include "config.h"
#include "unit.h"

#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>

#include "pg.h"

#define ROUNDS 300

static const char *const names[2] = { "a", "a-much-longer-icon-name-than-the-other-one.png" };

struct writer {
	const char *dir;
	int index;
	pthread_barrier_t *barrier;
	int errors;
};

static void *writer_main(void *arg)
{
	struct writer *w = arg;
	for (int r = 0; r < ROUNDS; r++) {
		pthread_barrier_wait(w->barrier);   /* both write at once */
		if (pg_pending_write(w->dir, 42, names[w->index], strlen(names[w->index])) != 0)
			w->errors++;
		pthread_barrier_wait(w->barrier);   /* the main thread reads what they left */
		pthread_barrier_wait(w->barrier);
	}
	return NULL;
}

/* Two avatars of one user published at once run on two disk threads: each write must succeed and the
 * file must hold one of the names whole, never a mix of both (the icon PostgreSQL would record). */
START_TEST(test_concurrent_writes_leave_one_whole_name)
{
	char dir[] = "/tmp/test_pg.XXXXXX";
	const char *base = getenv("TMPDIR");
	char path[600];
	if (base && base[0]) {
		snprintf(path, sizeof(path), "%s/test_pg.XXXXXX", base);
		ck_assert_ptr_nonnull(mkdtemp(path));
	} else {
		ck_assert_ptr_nonnull(mkdtemp(dir));
		snprintf(path, sizeof(path), "%s", dir);
	}
	pthread_barrier_t barrier;
	pthread_barrier_init(&barrier, NULL, 3);
	struct writer w[2] = { { path, 0, &barrier, 0 }, { path, 1, &barrier, 0 } };
	pthread_t tid[2];
	for (int i = 0; i < 2; i++)
		ck_assert_int_eq(pthread_create(&tid[i], NULL, writer_main, &w[i]), 0);
	char file[700];
	snprintf(file, sizeof(file), "%s/" "icon-42", path);
	int mixed = 0;
	for (int r = 0; r < ROUNDS; r++) {
		pthread_barrier_wait(&barrier);
		pthread_barrier_wait(&barrier);
		char got[256] = "";
		int fd = open(file, O_RDONLY);
		if (fd >= 0) {
			ssize_t n = read(fd, got, sizeof(got) - 1);
			got[n > 0 ? n : 0] = '\0';
			close(fd);
		}
		if (strcmp(got, names[0]) != 0 && strcmp(got, names[1]) != 0)
			mixed++;
		pthread_barrier_wait(&barrier);
	}
	for (int i = 0; i < 2; i++)
		pthread_join(tid[i], NULL);
	pthread_barrier_destroy(&barrier);
	unlink(file);
	rmdir(path);
	ck_assert_msg(w[0].errors + w[1].errors == 0, "%d writes of %d failed", w[0].errors + w[1].errors, 2 * ROUNDS);
	ck_assert_msg(mixed == 0, "%d of %d rounds left a file that is neither name", mixed, ROUNDS);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("pg");
	TCase *tc = tcase_create("pending");
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_concurrent_writes_leave_one_whole_name);
	suite_add_tcase(s, tc);
	return unit_run(s);
}

/* digest.h: MD5 of file data with OpenSSL's EVP interface (x86-64 assembly), as lower-case hex. */
#ifndef RESOURCED_DIGEST_H
#define RESOURCED_DIGEST_H

#include <stddef.h>

#define MD5_HEX_LEN 32

/* A running MD5; zero-initialise it, then md5_init. The context is allocated by
 * the first md5_init and reused by later ones; md5_free releases it. */
struct md5 {
	struct evp_md_ctx_st *ctx;
};

/* Starts (or restarts) a hash; returns 0, or -1 when OpenSSL cannot allocate. */
int md5_init(struct md5 *m);
void md5_update(struct md5 *m, const void *data, size_t len);
/* Writes 32 hex digits and a NUL; the hash must be md5_init'ed again before reuse. */
void md5_final_hex(struct md5 *m, char out[MD5_HEX_LEN + 1]);
/* dst continues from where src is (dst is initialised as needed); returns 0 or -1. */
int md5_copy(struct md5 *dst, const struct md5 *src);
void md5_free(struct md5 *m);

#endif

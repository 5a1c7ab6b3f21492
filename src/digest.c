/* digest.c: MD5 over OpenSSL EVP; errors of a fixed algorithm on memory already allocated cannot happen, so updates do not report them. */
#include "config.h"
#include "digest.h"

#include <openssl/evp.h>
#include <sodium.h>


int md5_init(struct md5 *m)
{
	if (m->ctx == NULL && (m->ctx = EVP_MD_CTX_new()) == NULL)
		return -1;
	return EVP_DigestInit_ex(m->ctx, EVP_md5(), NULL) == 1 ? 0 : -1;
}

void md5_update(struct md5 *m, const void *data, size_t len)
{
	if (len > 0)
		EVP_DigestUpdate(m->ctx, data, len);
}

void md5_final_hex(struct md5 *m, char out[MD5_HEX_LEN + 1])
{
	unsigned char d[EVP_MAX_MD_SIZE];
	unsigned n = 0;
	if (EVP_DigestFinal_ex(m->ctx, d, &n) != 1 || n != MD5_HEX_LEN / 2) {
		/* Never a valid digest (not hex): compares unequal to every expected MD5. */
		for (int i = 0; i < MD5_HEX_LEN; i++)
			out[i] = '?';
		out[MD5_HEX_LEN] = '\0';
		return;
	}
	sodium_bin2hex(out, MD5_HEX_LEN + 1, d, n);
}

int md5_copy(struct md5 *dst, const struct md5 *src)
{
	if (dst->ctx == NULL && (dst->ctx = EVP_MD_CTX_new()) == NULL)
		return -1;
	return EVP_MD_CTX_copy_ex(dst->ctx, src->ctx) == 1 ? 0 : -1;
}

void md5_free(struct md5 *m)
{
	EVP_MD_CTX_free(m->ctx);
	m->ctx = NULL;
}

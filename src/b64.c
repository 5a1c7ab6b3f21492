/* b64.c: strict decoding and fast encoding of file data over modp_b64 (libsodium's base64 is kept for nothing on the data path). */
#include "config.h"
#include "b64.h"

#include <modp_b64.h>
#include <string.h>

size_t b64_encode(char *dst, const uint8_t *src, size_t n)
{
	return modp_b64_encode(dst, (const char *)src, n);
}

int b64_decode_strict(uint8_t *dst, size_t cap, const char *src, size_t len, size_t *out_len)
{
	/* modp_b64 refuses characters outside the alphabet (bytes >= 0x80 and whitespace
	 * included), lengths that are not a multiple of 4, and '=' anywhere but the end. */
	if (len % 4 != 0 || cap < b64_decode_room(len))
		return -1;
	size_t n = modp_b64_decode((char *)dst, src, len);
	if (n == (size_t)-1)
		return -1;
	/* It ignores the unused low bits of the last character before padding ("QR==" reads
	 * as "QQ=="): two texts for one file would make the encoding malleable. Only the
	 * canonical text of the last group re-encodes to itself. */
	size_t tail = n % 3;
	if (tail != 0) {
		char again[8];
		modp_b64_encode(again, (const char *)dst + n - tail, tail);
		if (memcmp(again, src + len - 4, 4) != 0)
			return -1;
	}
	*out_len = n;
	return 0;
}

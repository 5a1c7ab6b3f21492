/* b64.h: base64 of file data (standard alphabet, padded) with modp_b64, decoded strictly. */
#ifndef RESOURCED_B64_H
#define RESOURCED_B64_H

#include <stddef.h>
#include <stdint.h>

/* Characters that n bytes encode to (no terminating NUL). */
static inline size_t b64_encoded_len(size_t n) { return (n + 2) / 3 * 4; }
/* Room b64_encode needs for n bytes: the text plus the NUL modp_b64 writes after it. */
static inline size_t b64_encode_room(size_t n) { return b64_encoded_len(n) + 1; }
/* Room b64_decode_strict needs for a text of len characters: modp_b64 stores each
 * group of 3 bytes as a 4-byte word, so up to 2 bytes past the decoded data are written. */
static inline size_t b64_decode_room(size_t len) { return len / 4 * 3 + 2; }

/* Encodes n bytes at dst (b64_encode_room(n) bytes); returns the text length. */
size_t b64_encode(char *dst, const uint8_t *src, size_t n);

/* Decodes canonical base64 only: a multiple of 4 characters of the standard alphabet,
 * '=' padding only at the end and only as much as needed, unused bits of the last
 * character zero. Whitespace, other characters, bytes >= 0x80, missing or extra
 * padding are refused. Returns 0 with *out_len set, or -1 (dst may be clobbered).
 * cap must be at least b64_decode_room(len). */
int b64_decode_strict(uint8_t *dst, size_t cap, const char *src, size_t len, size_t *out_len);

#endif

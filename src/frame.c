/* frame.c: encodes and decodes the 6-byte frame header of the client protocol. */
#include "config.h"
#include "frame.h"

enum frame_status frame_decode(const uint8_t *p, size_t len, uint32_t max_body,
    uint16_t *id, const uint8_t **body, uint32_t *body_len, size_t *consumed)
{
	if (len < FRAME_HEADER_LEN)
		return FRAME_NEED_MORE;
	uint32_t blen = frame_body_len(p);
	if (blen > max_body)
		return FRAME_OVERSIZE;
	if (len - FRAME_HEADER_LEN < blen)
		return FRAME_NEED_MORE;
	*id = (uint16_t)(p[0] << 8 | p[1]);
	*body = p + FRAME_HEADER_LEN;
	*body_len = blen;
	*consumed = FRAME_HEADER_LEN + (size_t)blen;
	return FRAME_OK;
}

void frame_put_header(uint8_t out[FRAME_HEADER_LEN], uint16_t id, uint32_t body_len)
{
	out[0] = (uint8_t)(id >> 8);
	out[1] = (uint8_t)id;
	out[2] = (uint8_t)(body_len >> 24);
	out[3] = (uint8_t)(body_len >> 16);
	out[4] = (uint8_t)(body_len >> 8);
	out[5] = (uint8_t)body_len;
}

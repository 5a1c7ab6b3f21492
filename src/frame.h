/* frame.h: the client wire framing, a 6-byte header (id uint16 BE, len uint32 BE) and a JSON body. */
#ifndef RESOURCED_FRAME_H
#define RESOURCED_FRAME_H

#include <stddef.h>
#include <stdint.h>

#define FRAME_HEADER_LEN 6

/* [server] max_frame's default: the largest body a server takes unless configured otherwise. conf.c
 * reads it as its default and resctl sizes its frames by it, so both change with it. A plain decimal
 * number: conf.c spells it as text (FRAME_MAX_DEFAULT_TEXT). */
#define FRAME_MAX_DEFAULT 262144
#define FRAME_TEXT_(n) #n
#define FRAME_TEXT(n) FRAME_TEXT_(n)
#define FRAME_MAX_DEFAULT_TEXT FRAME_TEXT(FRAME_MAX_DEFAULT)

/* The body length a frame header announces (hdr holds at least FRAME_HEADER_LEN bytes). */
static inline uint32_t frame_body_len(const uint8_t *hdr)
{
	return (uint32_t)hdr[2] << 24 | (uint32_t)hdr[3] << 16 | (uint32_t)hdr[4] << 8 | hdr[5];
}

enum frame_status {
	FRAME_NEED_MORE = 0,  /* not a whole frame yet */
	FRAME_OK = 1,         /* *id, *body, *body_len set; *consumed bytes make up the frame */
	FRAME_OVERSIZE = -1,  /* len > max: the stream cannot be resynchronised */
};

/* Looks for one frame at the start of p[0..len). */
enum frame_status frame_decode(const uint8_t *p, size_t len, uint32_t max_body,
    uint16_t *id, const uint8_t **body, uint32_t *body_len, size_t *consumed);

/* Writes the header for a body of body_len bytes. */
void frame_put_header(uint8_t out[FRAME_HEADER_LEN], uint16_t id, uint32_t body_len);

#endif

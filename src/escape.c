/* escape.c: escapes client strings for text outputs and HTML and cuts them only at UTF-8 character boundaries. */
#include "config.h"
#include "escape.h"
#include "json.h"

#include <stdint.h>
#include <string.h>

/* Length of the valid UTF-8 character at p, or 0 (json.c's checker: shortest forms, no surrogates). */
static size_t char_len(const char *p, size_t len)
{
	return json_utf8_seq((const uint8_t *)p, len);
}

size_t utf8_prefix(const char *s, size_t len, size_t max)
{
	size_t i = 0;
	while (i < len) {
		size_t n = char_len(s + i, len - i);
		if (n == 0)
			n = 1;   /* a stray byte is a unit of its own (escaped by escape_quoted) */
		if (i + n > max)
			break;
		i += n;
	}
	return i;
}

/* Characters that change how a line reads without showing: line and paragraph separators,
 * bidirectional controls, zero-width and other format characters (Unicode Zl, Zp, and the Cf
 * ones that matter in a log). A terminal or a log viewer would split or reorder the line. */
static int invisible(const unsigned char *p, size_t n)
{
	uint32_t cp = n == 2 ? (uint32_t)(p[0] & 0x1f) << 6 | (p[1] & 0x3f)
	    : n == 3 ? (uint32_t)(p[0] & 0x0f) << 12 | (uint32_t)(p[1] & 0x3f) << 6 | (p[2] & 0x3f) : 0;
	return cp == 0x00ad || cp == 0x061c || cp == 0x180e || (cp >= 0x200b && cp <= 0x200f) ||
	    (cp >= 0x2028 && cp <= 0x202e) || (cp >= 0x2060 && cp <= 0x206f) || cp == 0xfeff ||
	    (cp >= 0xfff9 && cp <= 0xfffb);
}

size_t escape_quoted(char *out, size_t cap, const char *s, size_t len)
{
	static const char hex[] = "0123456789abcdef";
	size_t o = 0;
	for (size_t i = 0; i < len;) {
		unsigned char b = (unsigned char)s[i];
		char tmp[8];
		size_t tn = 0, used = 1;
		if (b == '"' || b == '\\') {
			tmp[tn++] = '\\';
			tmp[tn++] = (char)b;
		} else if (b < 0x20 || b == 0x7f) {
			tmp[tn++] = '\\';
			tmp[tn++] = 'x';
			tmp[tn++] = hex[b >> 4];
			tmp[tn++] = hex[b & 15];
		} else if (b < 0x80) {
			tmp[tn++] = (char)b;
		} else {
			size_t n = char_len(s + i, len - i);
			/* C1 controls (U+0080..U+009F) are escaped like the C0 ones; so is each byte of an
			 * invisible character. */
			if (n == 0 || (n == 2 && b == 0xc2 && (unsigned char)s[i + 1] < 0xa0) ||
			    invisible((const unsigned char *)s + i, n)) {
				tmp[tn++] = '\\';
				tmp[tn++] = 'x';
				tmp[tn++] = hex[b >> 4];
				tmp[tn++] = hex[b & 15];
			} else {
				for (size_t k = 0; k < n; k++)
					tmp[tn++] = s[i + k];
				used = n;
			}
		}
		if (o + tn + 1 > cap)
			break;
		for (size_t k = 0; k < tn; k++)
			out[o++] = tmp[k];
		i += used;
	}
	if (cap > 0)
		out[o] = '\0';
	return o;
}

size_t escape_html(char *out, size_t cap, const char *s, size_t len)
{
	size_t o = 0;
	for (size_t i = 0; i < len;) {
		unsigned char b = (unsigned char)s[i];
		const char *rep = NULL;
		size_t used = 1;
		switch (b) {
		case '&': rep = "&amp;"; break;
		case '<': rep = "&lt;"; break;
		case '>': rep = "&gt;"; break;
		case '"': rep = "&quot;"; break;
		case '\'': rep = "&#39;"; break;
		default:
			if (b < 0x20 || b == 0x7f) {
				rep = "&#xfffd;";
			} else if (b >= 0x80) {
				size_t n = char_len(s + i, len - i);
				if (n == 0 || (n == 2 && b == 0xc2 && (unsigned char)s[i + 1] < 0xa0))
					rep = "&#xfffd;";   /* a stray byte or a C1 control */
				else
					used = n;
			}
		}
		const char *from = rep ? rep : s + i;
		size_t n = rep ? strlen(rep) : used;
		if (o + n + 1 > cap)
			break;
		memcpy(out + o, from, n);
		o += n;
		i += used;
	}
	if (cap > 0)
		out[o] = '\0';
	return o;
}

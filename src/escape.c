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

/* The code point of the valid UTF-8 character p[0, n) (n from char_len, 1 to 4). */
static uint32_t code_point(const unsigned char *p, size_t n)
{
	switch (n) {
	case 1: return p[0];
	case 2: return (uint32_t)(p[0] & 0x1f) << 6 | (p[1] & 0x3f);
	case 3: return (uint32_t)(p[0] & 0x0f) << 12 | (uint32_t)(p[1] & 0x3f) << 6 | (p[2] & 0x3f);
	default: return (uint32_t)(p[0] & 0x07) << 18 | (uint32_t)(p[1] & 0x3f) << 12 | (uint32_t)(p[2] & 0x3f) << 6 |
		    (p[3] & 0x3f);
	}
}

/* The one list of code points no output shows raw: C0 controls, DEL and C1 controls, and the
 * characters that change how a line reads without showing: line and paragraph separators,
 * bidirectional controls, zero-width and other format characters (Unicode Zl, Zp, and the Cf
 * ones that matter in a log). A terminal, a log viewer or a browser would split or reorder the
 * line. escape_quoted and escape_html both ask it. */
static int unsafe(uint32_t cp)
{
	return cp < 0x20 || (cp >= 0x7f && cp < 0xa0) || cp == 0x00ad || cp == 0x061c || cp == 0x180e ||
	    (cp >= 0x200b && cp <= 0x200f) || (cp >= 0x2028 && cp <= 0x202e) || (cp >= 0x2060 && cp <= 0x206f) ||
	    cp == 0xfeff || (cp >= 0xfff9 && cp <= 0xfffb) ||
	    /* Beyond the BMP: Egyptian hieroglyph, shorthand and musical format controls, and the tag
	     * characters, which spell hidden text after a name. */
	    (cp >= 0x13430 && cp <= 0x1343f) || (cp >= 0x1bca0 && cp <= 0x1bca3) ||
	    (cp >= 0x1d173 && cp <= 0x1d17a) || (cp >= 0xe0000 && cp <= 0xe007f);
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
		} else if (b < 0x80 && unsafe(b)) {   /* a C0 control or DEL */
			tmp[tn++] = '\\';
			tmp[tn++] = 'x';
			tmp[tn++] = hex[b >> 4];
			tmp[tn++] = hex[b & 15];
		} else if (b < 0x80) {
			tmp[tn++] = (char)b;
		} else {
			size_t n = char_len(s + i, len - i);
			/* Each byte of an unsafe character (a C1 control, an invisible one) is escaped like
			 * a C0 control. */
			if (n == 0 || unsafe(code_point((const unsigned char *)s + i, n))) {
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
	static const char hex[] = "0123456789abcdef";
	size_t o = 0;
	for (size_t i = 0; i < len;) {
		unsigned char b = (unsigned char)s[i];
		const char *rep = NULL;
		char visible[12];
		size_t used = 1;
		switch (b) {
		case '&': rep = "&amp;"; break;
		case '<': rep = "&lt;"; break;
		case '>': rep = "&gt;"; break;
		case '"': rep = "&quot;"; break;
		case '\'': rep = "&#39;"; break;
		case '\\': rep = "\\\\"; break;   /* so that a \uXXXX below cannot be forged */
		default: {
			size_t n = b < 0x80 ? 1 : char_len(s + i, len - i);
			uint32_t cp = n ? code_point((const unsigned char *)s + i, n) : 0;
			if (n == 0) {
				rep = "&#xfffd;";   /* a byte that is not UTF-8: it has no code point to show */
			} else if (unsafe(cp)) {
				/* Shown as text: a character reference (&#x202e;) would still act in a browser.
				 * \uXXXX in the BMP, \UXXXXXXXX beyond it (as in C and Python). */
				int digits = cp < 0x10000 ? 4 : 8;
				visible[0] = '\\';
				visible[1] = digits == 4 ? 'u' : 'U';
				for (int k = 0; k < digits; k++)
					visible[2 + k] = hex[cp >> (4 * (digits - 1 - k)) & 15];
				visible[2 + digits] = '\0';
				rep = visible;
				used = n;
			} else {
				used = n;
			}
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

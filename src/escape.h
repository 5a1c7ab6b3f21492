/* escape.h: the one way client strings are written into logs, the stats socket and metrics. */
#ifndef RESOURCED_ESCAPE_H
#define RESOURCED_ESCAPE_H

#include <stddef.h>

/* Room for escape_quoted of len bytes: every byte can become \xHH, plus the NUL. */
#define ESCAPE_SIZE(len) ((len) * 4 + 1)

/* The longest prefix of s[0, len) of at most max bytes that does not split a UTF-8 character. */
size_t utf8_prefix(const char *s, size_t len, size_t max);

/* Writes s[0, len) for use between double quotes: " and \ get a backslash; control characters
 * (C0, DEL, C1), invisible ones (bidirectional controls, line separators, zero-width and format
 * characters) and bytes that are not valid UTF-8 become \xHH, each byte; other valid UTF-8 and
 * spaces stay as they are.
 * So a quoted field ends at the first unescaped quote and a line at the newline that follows.
 * out (cap > 0) is always NUL-terminated; when it is too small the output stops before a whole
 * character or escape. Returns the bytes written, not counting the NUL. */
size_t escape_quoted(char *out, size_t cap, const char *s, size_t len);

/* Room for escape_html of len bytes: every byte can become &#xfffd; (8 bytes), plus the NUL. */
#define ESCAPE_HTML_SIZE(len) ((len) * 8 + 1)

/* Writes s[0, len) for HTML text or a double-quoted attribute: & < > " ' become entities and \
 * becomes \\; every code point escape_quoted escapes (C0, DEL, C1 controls and the invisible ones:
 * bidirectional controls such as U+202E, line separators, zero-width and format characters, tag
 * characters) becomes visible text, \u and four hex digits (\u202e), or \U and eight beyond the
 * BMP (\U000e0041), since a character reference would still
 * act in a browser; bytes that are not valid UTF-8 become U+FFFD (&#xfffd;). So nothing a client
 * sends can open a tag, end an attribute, reorder the page's text or hide in it; other valid UTF-8
 * stays as it is. out (cap > 0) is always NUL-terminated; when it is too small the output stops
 * before a whole character, entity or escape. Returns the bytes written, not counting the NUL. */
size_t escape_html(char *out, size_t cap, const char *s, size_t len);

#endif

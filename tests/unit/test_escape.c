/* test_escape.c: unit tests of escape.c: quoting of client strings for logs, the stats socket and HTML, and cuts at UTF-8 character boundaries. */
#include "config.h"
#include "unit.h"

#include "escape.h"

static const char *esc(const char *s, size_t len, size_t cap)
{
	static char out[2048];
	ck_assert_uint_le(cap, sizeof(out));
	size_t n = escape_quoted(out, cap, s, len);
	ck_assert_uint_eq(n, strlen(out));
	ck_assert_uint_lt(n, cap);
	return out;
}

START_TEST(test_plain_and_utf8_kept)
{
	ck_assert_str_eq(esc("a b.txt", 7, 64), "a b.txt");
	ck_assert_str_eq(esc("caf\xc3\xa9 \xe6\x96\x87 \xf0\x9f\x98\x80", 14, 64), "caf\xc3\xa9 \xe6\x96\x87 \xf0\x9f\x98\x80");
}
END_TEST

START_TEST(test_quotes_backslashes_controls)
{
	const char forged[] = "x.bin\" bytes=0 duration=0 result=1024 uid=1 name=\"y";
	ck_assert_str_eq(esc(forged, strlen(forged), 256),
	    "x.bin\\\" bytes=0 duration=0 result=1024 uid=1 name=\\\"y");
	ck_assert_str_eq(esc("a\\b", 3, 64), "a\\\\b");
	ck_assert_str_eq(esc("a\nb\r\t\x7f", 6, 64), "a\\x0ab\\x0d\\x09\\x7f");
	ck_assert_str_eq(esc("a\0b", 3, 64), "a\\x00b");
	ck_assert_str_eq(esc("\xc2\x85", 2, 64), "\\xc2\\x85");          /* C1 NEL */
	ck_assert_str_eq(esc("\xff\xc3", 2, 64), "\\xff\\xc3");          /* not UTF-8; truncated */
	ck_assert_str_eq(esc("\xed\xa0\x80", 3, 64), "\\xed\\xa0\\x80"); /* a surrogate */
	/* Characters that split or reorder a line without showing (found by a red-team pass). */
	ck_assert_str_eq(esc("a\xe2\x80\xa8" "b", 5, 64), "a\\xe2\\x80\\xa8b");           /* U+2028 line separator */
	ck_assert_str_eq(esc("\xe2\x80\xa9", 3, 64), "\\xe2\\x80\\xa9");               /* U+2029 */
	ck_assert_str_eq(esc("\xe2\x80\xae", 3, 64), "\\xe2\\x80\\xae");               /* U+202E right-to-left override */
	ck_assert_str_eq(esc("\xc2\xad", 2, 64), "\\xc2\\xad");                        /* U+00AD soft hyphen */
	ck_assert_str_eq(esc("\xef\xbb\xbf", 3, 64), "\\xef\\xbb\\xbf");               /* U+FEFF */
	ck_assert_str_eq(esc("\xe2\x80\x94", 3, 64), "\xe2\x80\x94");                   /* an em dash stays */
	/* The output never holds a raw quote without a backslash before it, nor a control byte. */
	char all[256];
	for (int i = 0; i < 256; i++)
		all[i] = (char)i;
	const char *o = esc(all, sizeof(all), 2048);
	for (size_t i = 0; o[i]; i++) {
		ck_assert_msg((unsigned char)o[i] >= 0x20 && o[i] != 0x7f, "control byte at %zu", i);
		if (o[i] == '\\')
			i++;
		else
			ck_assert_msg(o[i] != '"', "unescaped quote at %zu", i);
	}
	ck_assert_uint_le(strlen(o), ESCAPE_SIZE(sizeof(all)) - 1);
}
END_TEST

START_TEST(test_escape_cut_whole)
{
	/* Too small: stops before a character or an escape, never inside one. */
	ck_assert_str_eq(esc("ab\xe6\x96\x87", 5, 5), "ab");
	ck_assert_str_eq(esc("ab\"", 3, 4), "ab");
	ck_assert_str_eq(esc("ab\n", 3, 6), "ab");
	ck_assert_str_eq(esc("ab\n", 3, 7), "ab\\x0a");
	char one[1];
	ck_assert_uint_eq(escape_quoted(one, 1, "abc", 3), 0);
	ck_assert_str_eq(one, "");
}
END_TEST

START_TEST(test_utf8_prefix)
{
	ck_assert_uint_eq(utf8_prefix("abc", 3, 10), 3);
	ck_assert_uint_eq(utf8_prefix("abc", 3, 2), 2);
	/* 62 ASCII bytes then a 3-byte character: a cut at 63 bytes keeps 62. */
	char s[80];
	memset(s, 'a', 62);
	memcpy(s + 62, "\xe6\x96\x87", 3);
	ck_assert_uint_eq(utf8_prefix(s, 65, 63), 62);
	ck_assert_uint_eq(utf8_prefix(s, 65, 64), 62);
	ck_assert_uint_eq(utf8_prefix(s, 65, 65), 65);
	/* Every cut of a string of 4-byte characters lands on a multiple of 4. */
	char e[40];
	for (int i = 0; i < 10; i++)
		memcpy(e + 4 * i, "\xf0\x9f\x98\x80", 4);
	for (size_t max = 0; max <= 40; max++)
		ck_assert_uint_eq(utf8_prefix(e, 40, max), max / 4 * 4);
	/* A stray byte counts as one unit. */
	ck_assert_uint_eq(utf8_prefix("a\xff" "b", 3, 2), 2);
}
END_TEST

static const char *html(const char *s, size_t len, size_t cap)
{
	static char out[4096];
	ck_assert_uint_le(cap, sizeof(out));
	size_t n = escape_html(out, cap, s, len);
	ck_assert_uint_eq(n, strlen(out));
	ck_assert_uint_lt(n, cap);
	return out;
}

START_TEST(test_html_markup_escaped)
{
	const char hostile[] = "<script>alert('x')</script>\"><img src=x onerror=y>&amp;";
	ck_assert_str_eq(html(hostile, strlen(hostile), 512),
	    "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&quot;&gt;&lt;img src=x onerror=y&gt;&amp;amp;");
	ck_assert_str_eq(html("caf\xc3\xa9 \xf0\x9f\x98\x80 a b", 14, 64), "caf\xc3\xa9 \xf0\x9f\x98\x80 a b");
}
END_TEST

START_TEST(test_html_controls_and_bad_utf8)
{
	ck_assert_str_eq(html("a\nb\0c\x7f", 6, 64), "a\\u000ab\\u0000c\\u007f");
	ck_assert_str_eq(html("\xc2\x85", 2, 64), "\\u0085");                     /* C1 NEL */
	ck_assert_str_eq(html("\xff<", 2, 64), "&#xfffd;&lt;");                   /* a stray byte */
	ck_assert_str_eq(html("\xed\xa0\x80", 3, 64), "&#xfffd;&#xfffd;&#xfffd;"); /* a surrogate */
	/* Of every byte value, nothing markup-like or control-like comes out raw. */
	char all[256];
	for (int i = 0; i < 256; i++)
		all[i] = (char)i;
	const char *o = html(all, sizeof(all), 4096);
	ck_assert_uint_le(strlen(o), ESCAPE_HTML_SIZE(sizeof(all)) - 1);
	for (size_t i = 0; o[i]; i++) {
		unsigned char b = (unsigned char)o[i];
		ck_assert_msg(b >= 0x20 && b != 0x7f && b != '<' && b != '>' && b != '"' && b != '\'', "raw byte %#x at %zu", b, i);
		ck_assert_msg(b < 0x80, "a byte that is not ASCII at %zu: every byte of 0x80..0xff alone is invalid UTF-8", i);
	}
}
END_TEST

/* The code point after cp that test_html_invisible_shown checks. */
static uint32_t next_checked(uint32_t cp)
{
	static const uint32_t blocks[][2] = { { 0x13400, 0x134ff }, { 0x1bc00, 0x1bcff }, { 0x1d100, 0x1d1ff },
		{ 0xe0000, 0xe01ff }, { 0x10fff0, 0x10ffff } };
	if (cp < 0xffff)
		return cp + 1;
	for (size_t i = 0; i < sizeof(blocks) / sizeof(blocks[0]); i++) {
		if (cp < blocks[i][0])
			return blocks[i][0];
		if (cp < blocks[i][1])
			return cp + 1;
	}
	return 0x110000;
}

START_TEST(test_html_invisible_shown)
{
	/* A character reference (&#x202e;) still reorders the text in a browser: these are shown as
	 * visible escapes, the same characters escape_quoted escapes. */
	ck_assert_str_eq(html("a\xe2\x80\xae" "gpj.exe", 11, 64), "a\\u202egpj.exe");   /* U+202E RLO */
	ck_assert_str_eq(html("\xe2\x81\xa6" "x", 4, 64), "\\u2066x");                 /* U+2066 LRI */
	ck_assert_str_eq(html("\xe2\x80\xa8\xe2\x80\x8b\xc2\xad\xef\xbb\xbf\xd8\x9c", 13, 64),
	    "\\u2028\\u200b\\u00ad\\ufeff\\u061c");
	ck_assert_str_eq(html("\xe2\x80\x94 \xc2\xa0", 6, 64), "\xe2\x80\x94 \xc2\xa0"); /* em dash, NBSP stay */
	/* A backslash is doubled, so a name cannot pass itself off as an escape. */
	ck_assert_str_eq(html("a\\u202e", 7, 64), "a\\\\u202e");
	/* Tag characters (U+E0001, U+E0020..U+E007F) show nothing: a name could carry hidden text. */
	ck_assert_str_eq(html("a\xf3\xa0\x81\x81" "b", 6, 64), "a\\U000e0041b");
	char q4[ESCAPE_SIZE(4)];
	escape_quoted(q4, sizeof(q4), "\xf3\xa0\x80\x81", 4);
	ck_assert_str_eq(q4, "\\xf3\\xa0\\x80\\x81");
	/* Every character escape_quoted escapes is shown escaped here too, and no other one. */
	/* The BMP whole, and beyond it the blocks around the unsafe ones and the last code points (all
	 * 1.1 million would outlast the test's timeout under the sanitizers). */
	for (uint32_t cp = 0x80; cp <= 0x10ffff; cp = next_checked(cp)) {
		if (cp >= 0xd800 && cp <= 0xdfff)
			continue;
		char in[4], q[ESCAPE_SIZE(4)];
		size_t n = cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
		if (n == 2) {
			in[0] = (char)(0xc0 | cp >> 6);
			in[1] = (char)(0x80 | (cp & 0x3f));
		} else if (n == 3) {
			in[0] = (char)(0xe0 | cp >> 12);
			in[1] = (char)(0x80 | (cp >> 6 & 0x3f));
			in[2] = (char)(0x80 | (cp & 0x3f));
		} else {
			in[0] = (char)(0xf0 | cp >> 18);
			in[1] = (char)(0x80 | (cp >> 12 & 0x3f));
			in[2] = (char)(0x80 | (cp >> 6 & 0x3f));
			in[3] = (char)(0x80 | (cp & 0x3f));
		}
		escape_quoted(q, sizeof(q), in, n);
		const char *o = html(in, n, 64);
		int quoted_escapes = q[0] == '\\', html_escapes = o[0] == '\\';
		ck_assert_msg(quoted_escapes == html_escapes, "U+%04X: escape_quoted %s, escape_html %s", (unsigned)cp, q, o);
		if (html_escapes) {
			char want[12];
			snprintf(want, sizeof(want), cp < 0x10000 ? "\\u%04x" : "\\U%08x", (unsigned)cp);
			ck_assert_str_eq(o, want);
		}
	}
}
END_TEST

START_TEST(test_html_cut_whole)
{
	ck_assert_str_eq(html("ab<", 3, 5), "ab");         /* "&lt;" does not fit: left out whole */
	ck_assert_str_eq(html("ab<", 3, 7), "ab&lt;");
	ck_assert_str_eq(html("ab\xe6\x96\x87", 5, 5), "ab");
	ck_assert_str_eq(html("ab\xff", 3, 10), "ab");     /* "&#xfffd;" is 8 bytes */
	ck_assert_str_eq(html("ab\n", 3, 8), "ab");        /* "\u000a" is 6 */
	ck_assert_str_eq(html("ab\n", 3, 9), "ab\\u000a");
	char one[1];
	ck_assert_uint_eq(escape_html(one, 1, "<", 1), 0);
	ck_assert_str_eq(one, "");
}
END_TEST

static Suite *escape_suite(void)
{
	Suite *s = suite_create("escape");
	TCase *tc = tcase_create("escape");
	tcase_add_test(tc, test_plain_and_utf8_kept);
	tcase_add_test(tc, test_quotes_backslashes_controls);
	tcase_add_test(tc, test_escape_cut_whole);
	tcase_add_test(tc, test_utf8_prefix);
	tcase_add_test(tc, test_html_markup_escaped);
	tcase_add_test(tc, test_html_controls_and_bad_utf8);
	tcase_add_test(tc, test_html_invisible_shown);
	tcase_add_test(tc, test_html_cut_whole);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return unit_run(escape_suite());
}

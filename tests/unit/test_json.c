/* test_json.c: unit tests of json.c: strict request parsing, field readers (numbers as JSON numbers or decimal strings) and the compact response writer. */
#include "config.h"
#include "unit.h"

#include "json.h"

/* Parses a NUL-terminated body; the tree is freed by the caller (or by free_tree). */
static yajl_val parse_len(const char *body, size_t len, char *err, size_t errlen)
{
	err[0] = '\0';
	return json_parse_object((const uint8_t *)body, len, err, errlen);
}

static yajl_val parse(const char *body)
{
	char err[256];
	yajl_val v = parse_len(body, strlen(body), err, sizeof(err));
	char shown[400];
	ck_assert_msg(v != NULL, "rejected %s: %s", unit_printable(body, strlen(body), shown), err);
	return v;
}

/* Asserts the body is rejected with a message containing reason. */
static void expect_rejected_len(const char *body, size_t len, const char *reason)
{
	char err[256];
	yajl_val v = parse_len(body, len, err, sizeof(err));
	if (v != NULL)
		yajl_tree_free(v);
	char shown[400];
	ck_assert_msg(v == NULL, "accepted %s", unit_printable(body, len, shown));
	ck_assert_msg(err[0] != '\0', "no reason given for %s", unit_printable(body, len, shown));
	if (reason != NULL)
		unit_assert_contains(err, reason);
}

static void expect_rejected(const char *body, const char *reason)
{
	expect_rejected_len(body, strlen(body), reason);
}

/* json_get_u64 on {"v": <json>} with max. */
static enum json_field u64_of(const char *json, uint64_t max, uint64_t *out)
{
	char body[256];
	snprintf(body, sizeof(body), "{\"v\": %s}", json);
	yajl_val v = parse(body);
	*out = 0x5a5a5a5a5a5a5a5aull;
	enum json_field r = json_get_u64(v, "v", max, out);
	yajl_tree_free(v);
	return r;
}

static void expect_u64(const char *json, uint64_t max, uint64_t want)
{
	uint64_t got;
	enum json_field r = u64_of(json, max, &got);
	ck_assert_msg(r == JSON_FIELD_OK, "%s: got %d, not OK", json, r);
	ck_assert_msg(got == want, "%s: got %llu, want %llu", json, (unsigned long long)got,
	    (unsigned long long)want);
}

static void expect_u64_bad(const char *json, uint64_t max)
{
	uint64_t got;
	enum json_field r = u64_of(json, max, &got);
	ck_assert_msg(r == JSON_FIELD_BAD, "%s: got %d (value %llu), not BAD", json, r, (unsigned long long)got);
	ck_assert_msg(got == 0x5a5a5a5a5a5a5a5aull, "%s: *out written on failure", json);
}

START_TEST(test_u64_numbers)
{
	expect_u64("0", JSON_MAX_SAFE_INT, 0);
	expect_u64("1", JSON_MAX_SAFE_INT, 1);
	expect_u64("123", JSON_MAX_SAFE_INT, 123);
	expect_u64("4294967296", JSON_MAX_SAFE_INT, UINT64_C(4294967296));
	expect_u64("9007199254740991", JSON_MAX_SAFE_INT, JSON_MAX_SAFE_INT);   /* 2^53 - 1 */
	expect_u64("100", 100, 100);
	expect_u64("9223372036854775807", UINT64_MAX, UINT64_C(9223372036854775807));
}
END_TEST

START_TEST(test_u64_numeric_strings)
{
	expect_u64("\"123\"", JSON_MAX_SAFE_INT, 123);
	expect_u64("\"0\"", JSON_MAX_SAFE_INT, 0);
	expect_u64("\"007\"", JSON_MAX_SAFE_INT, 7);
	expect_u64("\"3000000000\"", JSON_MAX_SAFE_INT, UINT64_C(3000000000));
	expect_u64("\"9007199254740991\"", JSON_MAX_SAFE_INT, JSON_MAX_SAFE_INT);
	expect_u64("\"100\"", 100, 100);
	expect_u64("\"9999999999999999999\"", UINT64_MAX, UINT64_C(9999999999999999999));
}
END_TEST

START_TEST(test_u64_junk_strings)
{
	static const char *const junk[] = {
		"\"12a\"", "\" 12\"", "\"12 \"", "\"-1\"", "\"\"", "\"1e3\"", "\"+1\"", "\"0x10\"",
		"\"1.0\"", "\"1,000\"", "\"\\u0031\\u0032x\"", "\"\xef\xbc\x91\"", "\"12\\n\"", "\"- 1\"",
	};
	for (size_t i = 0; i < sizeof(junk) / sizeof(junk[0]); i++)
		expect_u64_bad(junk[i], JSON_MAX_SAFE_INT);
}
END_TEST

START_TEST(test_u64_negative_and_float)
{
	static const char *const bad[] = {
		"-1", "-9007199254740991", "-9223372036854775808", "1.5", "0.5", "1.0", "1e3", "1E3",
		"12.000", "-0.0", "1e-3",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		expect_u64_bad(bad[i], JSON_MAX_SAFE_INT);
}
END_TEST

START_TEST(test_u64_over_max)
{
	/* Over 2^53 - 1 as a number or a string. */
	expect_u64_bad("9007199254740992", JSON_MAX_SAFE_INT);
	expect_u64_bad("9007199254740993", JSON_MAX_SAFE_INT);
	expect_u64_bad("\"9007199254740992\"", JSON_MAX_SAFE_INT);
	expect_u64_bad("18446744073709551615", JSON_MAX_SAFE_INT);
	expect_u64_bad("\"18446744073709551615\"", JSON_MAX_SAFE_INT);
	expect_u64_bad("\"99999999999999999999999\"", JSON_MAX_SAFE_INT);
	expect_u64_bad("100000000000000000000000000000", UINT64_MAX);
	/* Over a small max, just past it. */
	expect_u64_bad("101", 100);
	expect_u64_bad("\"101\"", 100);
	expect_u64_bad("2", 1);
	expect_u64("1", 1, 1);
	expect_u64_bad("1", 0);
}
END_TEST

START_TEST(test_u64_missing_and_wrong_type)
{
	yajl_val v = parse("{\"a\": [1], \"o\": {\"x\": 1}, \"t\": true, \"f\": false, \"n\": null, \"s\": \"5\"}");
	uint64_t out = 42;
	ck_assert_int_eq(json_get_u64(v, "missing", JSON_MAX_SAFE_INT, &out), JSON_FIELD_MISSING);
	ck_assert_int_eq(json_get_u64(v, "S", JSON_MAX_SAFE_INT, &out), JSON_FIELD_MISSING);   /* case matters */
	ck_assert_int_eq(json_get_u64(v, "a", JSON_MAX_SAFE_INT, &out), JSON_FIELD_BAD);
	ck_assert_int_eq(json_get_u64(v, "o", JSON_MAX_SAFE_INT, &out), JSON_FIELD_BAD);
	ck_assert_int_eq(json_get_u64(v, "t", JSON_MAX_SAFE_INT, &out), JSON_FIELD_BAD);
	ck_assert_int_eq(json_get_u64(v, "f", JSON_MAX_SAFE_INT, &out), JSON_FIELD_BAD);
	ck_assert_int_eq(json_get_u64(v, "n", JSON_MAX_SAFE_INT, &out), JSON_FIELD_BAD);
	ck_assert_uint_eq(out, 42);
	ck_assert_int_eq(json_get_u64(v, "s", JSON_MAX_SAFE_INT, &out), JSON_FIELD_OK);
	ck_assert_uint_eq(out, 5);
	/* Members of nested objects are not members of the top one. */
	ck_assert_int_eq(json_get_u64(v, "x", JSON_MAX_SAFE_INT, &out), JSON_FIELD_MISSING);
	ck_assert_ptr_null(json_member(v, "x"));
	ck_assert_ptr_nonnull(json_member(v, "o"));
	yajl_tree_free(v);
}
END_TEST

START_TEST(test_get_str)
{
	yajl_val v = parse("{\"s\": \"hello\", \"e\": \"\", \"u\": \"caf\\u00e9 \\\"q\\\" \\\\ \\/\","
	    " \"raw\": \"\xe6\x96\x87\xe4\xbb\xb6.txt\", \"n\": 5, \"z\": null, \"a\": [\"x\"]}");
	const char *s = NULL;
	size_t len = 99;
	ck_assert_int_eq(json_get_str(v, "s", &s, &len), JSON_FIELD_OK);
	ck_assert_str_eq(s, "hello");
	ck_assert_uint_eq(len, 5);
	ck_assert_int_eq(json_get_str(v, "e", &s, &len), JSON_FIELD_OK);
	ck_assert_str_eq(s, "");
	ck_assert_uint_eq(len, 0);
	ck_assert_int_eq(json_get_str(v, "u", &s, &len), JSON_FIELD_OK);
	ck_assert_str_eq(s, "caf\xc3\xa9 \"q\" \\ /");
	ck_assert_uint_eq(len, strlen("caf\xc3\xa9 \"q\" \\ /"));
	ck_assert_int_eq(json_get_str(v, "raw", &s, &len), JSON_FIELD_OK);
	ck_assert_str_eq(s, "\xe6\x96\x87\xe4\xbb\xb6.txt");
	s = NULL;
	ck_assert_int_eq(json_get_str(v, "n", &s, &len), JSON_FIELD_BAD);
	ck_assert_int_eq(json_get_str(v, "z", &s, &len), JSON_FIELD_BAD);
	ck_assert_int_eq(json_get_str(v, "a", &s, &len), JSON_FIELD_BAD);
	ck_assert_int_eq(json_get_str(v, "nope", &s, &len), JSON_FIELD_MISSING);
	ck_assert_ptr_null(s);
	yajl_tree_free(v);
}
END_TEST

START_TEST(test_get_str_escaped_nul)
{
	/* "\u0000" decodes to a NUL byte, which a C string cannot carry: it is read
	 * as U+0001 instead, a control character every field check refuses, and the
	 * value keeps its full length (never silently cut short at the NUL). An
	 * escaped backslash before "u0000" is ordinary text and stays as it is. */
	char err[256];
	const char *body = "{\"s\": \"ab\\u0000cd\", \"t\": \"x\\\\u0000\"}";
	ck_assert_ptr_null(parse_len(body, strlen(body), err, sizeof(err)));   /* plain objects refuse it */
	unit_assert_contains(err, "u0000");
	yajl_val v = json_parse_request((const uint8_t *)body, strlen(body), err, sizeof(err));
	ck_assert_msg(v != NULL, "refused: %s", err);
	const char *s = NULL;
	size_t len = 0;
	ck_assert_int_eq(json_get_str(v, "s", &s, &len), JSON_FIELD_OK);
	ck_assert_uint_eq(len, 5);
	ck_assert_mem_eq(s, "ab\x01" "cd", 5);
	ck_assert_int_eq(json_get_str(v, "t", &s, &len), JSON_FIELD_OK);
	ck_assert_str_eq(s, "x\\u0000");
	yajl_tree_free(v);
}
END_TEST

START_TEST(test_unpaired_surrogates)
{
	char err[256];
	static const char *const bad[] = {
		"{\"s\": \"x\\ud800y\"}", "{\"s\": \"x\\udc00\"}", "{\"s\": \"\\ud800\\u0041\"}", "{\"s\": \"\\uDBFF\"}",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		ck_assert_msg(parse_len(bad[i], strlen(bad[i]), err, sizeof(err)) == NULL, "accepted %s", bad[i]);
		unit_assert_contains(err, "surrogate");
	}
	const char *good = "{\"s\": \"\\ud83d\\ude00\"}";   /* a pair: U+1F600 */
	yajl_val v = parse_len(good, strlen(good), err, sizeof(err));
	ck_assert_msg(v != NULL, "refused a surrogate pair: %s", err);
	const char *s;
	size_t len;
	ck_assert_int_eq(json_get_str(v, "s", &s, &len), JSON_FIELD_OK);
	ck_assert_mem_eq(s, "\xf0\x9f\x98\x80", 4);
	yajl_tree_free(v);
}
END_TEST

START_TEST(test_get_flag)
{
	yajl_val v = parse("{\"t\": true, \"f\": false, \"one\": 1, \"zero\": 0, \"s1\": \"1\", \"s0\": \"0\","
	    " \"two\": 2, \"s2\": \"2\", \"yes\": \"yes\", \"n\": null, \"fl\": 1.0, \"neg\": -1, \"a\": []}");
	static const struct { const char *key; int want; } good[] = {
		{ "t", 1 }, { "f", 0 }, { "one", 1 }, { "zero", 0 }, { "s1", 1 }, { "s0", 0 },
	};
	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		int out = -1;
		ck_assert_msg(json_get_flag(v, good[i].key, &out) == JSON_FIELD_OK, "%s", good[i].key);
		ck_assert_int_eq(out, good[i].want);
	}
	static const char *const bad[] = { "two", "s2", "yes", "n", "fl", "neg", "a" };
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		int out = -1;
		ck_assert_msg(json_get_flag(v, bad[i], &out) == JSON_FIELD_BAD, "%s", bad[i]);
		ck_assert_int_eq(out, -1);
	}
	int out = -1;
	ck_assert_int_eq(json_get_flag(v, "missing", &out), JSON_FIELD_MISSING);
	yajl_tree_free(v);
}
END_TEST

START_TEST(test_parse_rejects_non_objects)
{
	static const char *const bodies[] = {
		"[]", "[{\"a\":1}]", "1", "0", "-1", "1.5", "\"str\"", "true", "false", "null", " [ ] ",
	};
	for (size_t i = 0; i < sizeof(bodies) / sizeof(bodies[0]); i++)
		expect_rejected(bodies[i], "not a JSON object");
}
END_TEST

START_TEST(test_parse_rejects_invalid_json)
{
	static const char *const bodies[] = {
		"", " ", "{", "}", "{\"a\":}", "{\"a\" 1}", "{\"a\":1,}", "{a:1}", "{'a':1}", "{\"a\":01}",
		"{\"a\":1} {\"b\":2}", "{\"a\":1}x", "{\"a\":\"unterminated}", "{\"a\":[1,2}", "{\"a\":\"\\x41\"}",
		"{\"a\":NaN}", "{\"a\":\"tab\there\"}", "{\"a\":1}]",
	};
	for (size_t i = 0; i < sizeof(bodies) / sizeof(bodies[0]); i++)
		expect_rejected(bodies[i], "not valid JSON");
}
END_TEST

START_TEST(test_parse_rejects_nul)
{
	static const char body[] = "{\"a\":\"x\0y\"}";
	expect_rejected_len(body, sizeof(body) - 1, "NUL");
	/* A C string's terminator sent along with the body. */
	static const char term[] = "{\"a\":1}";
	expect_rejected_len(term, sizeof(term), "NUL");
	/* Outside strings, too. */
	static const char ws[] = "{\"a\":\0 1}";
	expect_rejected_len(ws, sizeof(ws) - 1, "NUL");
	/* The length given is honoured: what follows it is not part of the body. */
	char err[256];
	yajl_val v = parse_len(term, sizeof(term) - 1, err, sizeof(err));
	ck_assert_ptr_nonnull(v);
	yajl_tree_free(v);
}
END_TEST

START_TEST(test_parse_rejects_invalid_utf8)
{
	static const char *const bodies[] = {
		"{\"a\":\"\xff\"}",               /* never valid */
		"{\"a\":\"\xfe\xff\"}",
		"{\"a\":\"\x80\"}",               /* lone continuation */
		"{\"a\":\"\xc3\"}",               /* truncated 2-byte */
		"{\"a\":\"\xe2\x82\"}",           /* truncated 3-byte */
		"{\"a\":\"\xf0\x9f\x98\"}",       /* truncated 4-byte */
		"{\"a\":\"\xc3(\"}",              /* bad continuation */
		"{\"\xff\":\"key\"}",             /* in a key */
	};
	for (size_t i = 0; i < sizeof(bodies) / sizeof(bodies[0]); i++)
		expect_rejected(bodies[i], NULL);
}
END_TEST

START_TEST(test_parse_rejects_non_shortest_utf8)
{
	/* Overlong forms, UTF-16 surrogates and code points past U+10FFFF are not
	 * UTF-8 either (RFC 3629); yajl's lexer only checks the byte pattern, so
	 * without our own check these would reach fields such as client_path and token. */
	static const char *const bodies[] = {
		"{\"a\":\"\xc0\x80\"}",             /* overlong NUL */
		"{\"a\":\"\xc1\xbf\"}",             /* overlong U+007F */
		"{\"a\":\"\xe0\x80\xaf\"}",         /* overlong '/' */
		"{\"a\":\"\xed\xa0\x80\"}",         /* U+D800 */
		"{\"a\":\"\xed\xbf\xbf\"}",         /* U+DFFF */
		"{\"a\":\"\xf4\x90\x80\x80\"}",     /* U+110000 */
		"{\"a\":\"\xf5\x80\x80\x80\"}",
	};
	for (size_t i = 0; i < sizeof(bodies) / sizeof(bodies[0]); i++)
		expect_rejected(bodies[i], NULL);
}
END_TEST

START_TEST(test_parse_accepts_utf8)
{
	yajl_val v = parse("{\"name\":\"\xc3\xa9\xe6\x96\x87\xf0\x9f\x98\x80\xef\xbf\xbd\xf4\x8f\xbf\xbf\"}");
	const char *s;
	size_t len;
	ck_assert_int_eq(json_get_str(v, "name", &s, &len), JSON_FIELD_OK);
	ck_assert_uint_eq(len, 2 + 3 + 4 + 3 + 4);
	yajl_tree_free(v);
}
END_TEST

/* "{" "\"k\":" then depth-1 arrays around 1, then closers. */
static char *nested(int depth)
{
	char *b = malloc((size_t)depth * 2 + 16);
	ck_assert_ptr_nonnull(b);
	size_t k = (size_t)sprintf(b, "{\"k\":");
	for (int i = 1; i < depth; i++)
		b[k++] = '[';
	b[k++] = '1';
	for (int i = 1; i < depth; i++)
		b[k++] = ']';
	b[k++] = '}';
	b[k] = '\0';
	return b;
}

START_TEST(test_depth_limit)
{
	char *ok = nested(JSON_MAX_DEPTH);
	yajl_val v = parse(ok);
	yajl_tree_free(v);
	free(ok);
	char *deep = nested(JSON_MAX_DEPTH + 1);
	char want[64];
	snprintf(want, sizeof(want), "nested deeper than %d levels", JSON_MAX_DEPTH);
	expect_rejected(deep, want);
	free(deep);
	deep = nested(100000);
	expect_rejected(deep, want);
	free(deep);
	/* Objects count as much as arrays. */
	expect_rejected("{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":"
	    "{\"a\":{\"a\":{\"a\":{\"a\":1}}}}}}}}}}}}}}}}}", want);
	/* Brackets inside strings, escaped quotes included, are not nesting. */
	v = parse("{\"a\":\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\", \"b\":\"\\\"[[[[[[[[[[[[[[[[[[[[[[[[[[\\\\\"}");
	yajl_tree_free(v);
}
END_TEST

START_TEST(test_depth_limit_not_bypassed_by_comments)
{
	/* yajl_tree_parse allows comments; a quote inside one must not hide the
	 * nesting that follows from the depth check (if it did, at a few MB of
	 * brackets yajl_tree_free's recursion would overflow the stack). */
	static char b[64 + 2 * 1000];
	size_t k = (size_t)sprintf(b, "{\"a\":/*\"*/");
	for (int i = 0; i < 1000; i++)
		b[k++] = '[';
	for (int i = 0; i < 1000; i++)
		b[k++] = ']';
	b[k++] = '}';
	b[k] = '\0';
	expect_rejected(b, NULL);
}
END_TEST

START_TEST(test_qt_indented_json)
{
	/* What QJsonDocument::toJson() (Indented) produces for an upload chunk. */
	static const char body[] =
	    "{\n"
	    "    \"data\": \"aGVsbG8=\",\n"
	    "    \"last\": 1,\n"
	    "    \"last_seq\": 1,\n"
	    "    \"md5\": \"5d41402abc4b2a76b9719d911017c592\",\n"
	    "    \"name\": \"hello.txt\",\n"
	    "    \"seq\": 1,\n"
	    "    \"total_size\": \"5\",\n"
	    "    \"trans_size\": \"5\",\n"
	    "    \"nested\": {\n"
	    "        \"list\": [\n"
	    "            1,\n"
	    "            2\n"
	    "        ]\n"
	    "    }\n"
	    "}\n";
	yajl_val v = parse(body);
	uint64_t n;
	ck_assert_int_eq(json_get_u64(v, "seq", JSON_MAX_SAFE_INT, &n), JSON_FIELD_OK);
	ck_assert_uint_eq(n, 1);
	ck_assert_int_eq(json_get_u64(v, "total_size", JSON_MAX_SAFE_INT, &n), JSON_FIELD_OK);
	ck_assert_uint_eq(n, 5);
	const char *s;
	size_t len;
	ck_assert_int_eq(json_get_str(v, "name", &s, &len), JSON_FIELD_OK);
	ck_assert_str_eq(s, "hello.txt");
	int flag;
	ck_assert_int_eq(json_get_flag(v, "last", &flag), JSON_FIELD_OK);
	ck_assert_int_eq(flag, 1);
	yajl_tree_free(v);
	/* CRLF line ends and leading whitespace are whitespace too. */
	v = parse("\r\n  {\r\n    \"a\": 1\r\n}\r\n");
	ck_assert_int_eq(json_get_u64(v, "a", 10, &n), JSON_FIELD_OK);
	ck_assert_uint_eq(n, 1);
	yajl_tree_free(v);
}
END_TEST

static const char *written(struct json_writer *w, size_t *len)
{
	const uint8_t *out;
	json_end(w, &out, len);
	return (const char *)out;
}

START_TEST(test_writer_compact)
{
	struct json_writer w;
	ck_assert_int_eq(json_writer_init(&w), 0);
	json_begin(&w);
	json_put_int(&w, "error", 0);
	json_put_int(&w, "seq", 3);
	json_put_u64_str(&w, "total_size", UINT64_C(5000000000));
	json_put_str(&w, "name", "a.txt", 5);
	json_put_bool(&w, "is_last", 1);
	json_put_bool(&w, "more", 0);
	json_put_int(&w, "neg", -1);
	json_put_int(&w, "big", INT64_MAX);
	size_t len;
	const char *out = written(&w, &len);
	const char *want = "{\"error\":0,\"seq\":3,\"total_size\":\"5000000000\",\"name\":\"a.txt\","
	    "\"is_last\":true,\"more\":false,\"neg\":-1,\"big\":9223372036854775807}";
	ck_assert_uint_eq(len, strlen(want));
	ck_assert_mem_eq(out, want, len);
	json_writer_free(&w);
	ck_assert_ptr_null(w.gen);
	json_writer_free(&w);   /* twice is harmless */
}
END_TEST

START_TEST(test_writer_escaping)
{
	struct json_writer w;
	ck_assert_int_eq(json_writer_init(&w), 0);
	json_begin(&w);
	static const char s[] = "q\"b\\s/n\nt\tr\rc\x01" "d\x1f" "e\xc3\xa9z";
	json_put_str(&w, "k\"ey", s, sizeof(s) - 1);
	size_t len;
	const char *out = written(&w, &len);
	/* Whatever the escapes, the output is valid compact JSON that reads back exactly. */
	char err[256], shown[400];
	yajl_val v = parse_len(out, len, err, sizeof(err));
	ck_assert_msg(v != NULL, "writer output %s does not parse: %s", unit_printable(out, len, shown), err);
	ck_assert_ptr_null(memchr(out, '\n', len));   /* one line */
	ck_assert_ptr_null(memchr(out, '\x01', len));
	ck_assert_ptr_null(memchr(out, '\x1f', len));
	const char *got;
	size_t glen;
	ck_assert_int_eq(json_get_str(v, "k\"ey", &got, &glen), JSON_FIELD_OK);
	ck_assert_uint_eq(glen, sizeof(s) - 1);
	ck_assert_mem_eq(got, s, glen);
	ck_assert_ptr_nonnull(strstr(out, "{\"k\\\"ey\":\"q\\\"b\\\\s/n\\nt\\tr\\rc\\u0001d\\u001"));
	ck_assert_ptr_nonnull(strstr(out, "e\xc3\xa9z\"}"));   /* UTF-8 passes through */
	yajl_tree_free(v);
	/* A NUL byte inside the given length is escaped, not a terminator. */
	json_begin(&w);
	json_put_str(&w, "s", "a\0b", 3);
	out = written(&w, &len);
	ck_assert_ptr_null(memchr(out, '\0', len));
	ck_assert_uint_eq(len, strlen("{\"s\":\"a\\u0000b\"}"));
	ck_assert_mem_eq(out, "{\"s\":\"a\\u0000b\"}", len);
	json_writer_free(&w);
}
END_TEST

START_TEST(test_writer_number_as_string)
{
	struct json_writer w;
	ck_assert_int_eq(json_writer_init(&w), 0);
	json_begin(&w);
	json_put_u64_str(&w, "zero", 0);
	json_put_u64_str(&w, "max", UINT64_MAX);
	json_put_u64_str(&w, "current_size", 32768);
	size_t len;
	const char *out = written(&w, &len);
	const char *want = "{\"zero\":\"0\",\"max\":\"18446744073709551615\",\"current_size\":\"32768\"}";
	ck_assert_uint_eq(len, strlen(want));
	ck_assert_mem_eq(out, want, len);
	/* And it reads back with json_get_u64 (strings are accepted). */
	char err[256];
	yajl_val v = parse_len(out, len, err, sizeof(err));
	ck_assert_ptr_nonnull(v);
	uint64_t n;
	ck_assert_int_eq(json_get_u64(v, "current_size", JSON_MAX_SAFE_INT, &n), JSON_FIELD_OK);
	ck_assert_uint_eq(n, 32768);
	yajl_tree_free(v);
	json_writer_free(&w);
}
END_TEST

START_TEST(test_writer_reuse)
{
	struct json_writer w;
	ck_assert_int_eq(json_writer_init(&w), 0);
	for (int round = 0; round < 3; round++) {
		json_begin(&w);
		json_put_int(&w, "error", 1001 + round);
		size_t len;
		const char *out = written(&w, &len);
		char want[64];
		snprintf(want, sizeof(want), "{\"error\":%d}", 1001 + round);
		ck_assert_uint_eq(len, strlen(want));
		ck_assert_mem_eq(out, want, len);
	}
	/* An empty object too. */
	json_begin(&w);
	size_t len;
	const char *out = written(&w, &len);
	ck_assert_uint_eq(len, 2);
	ck_assert_mem_eq(out, "{}", 2);
	json_writer_free(&w);
}
END_TEST

START_TEST(test_writer_put_value)
{
	/* Any parsed value is copied as it came, compactly (1001 echoes its data). */
	yajl_val v = parse("{\"data\": {\"s\": \"x\\\"y\", \"n\": -1.5e3, \"i\": 12345678901234567890,"
	    " \"t\": true, \"f\": false, \"z\": null, \"a\": [1, [], {}, [\"\xc3\xa9\"]]}, \"str\": \"hi\"}");
	struct json_writer w;
	ck_assert_int_eq(json_writer_init(&w), 0);
	json_begin(&w);
	json_put_int(&w, "error", 0);
	json_put_value(&w, "data", json_member(v, "data"));
	json_put_value(&w, "str", json_member(v, "str"));
	json_put_value(&w, "none", json_member(v, "missing"));   /* absent: null */
	size_t len;
	const char *out = written(&w, &len);
	const char *want = "{\"error\":0,\"data\":{\"s\":\"x\\\"y\",\"n\":-1.5e3,\"i\":12345678901234567890,"
	    "\"t\":true,\"f\":false,\"z\":null,\"a\":[1,[],{},[\"\xc3\xa9\"]]},\"str\":\"hi\",\"none\":null}";
	char shown[400];
	ck_assert_msg(len == strlen(want) && memcmp(out, want, len) == 0, "got %s", unit_printable(out, len, shown));
	yajl_tree_free(v);
	/* The deepest value json_parse_object accepts is copied whole. */
	char *deep = nested(JSON_MAX_DEPTH);
	v = parse(deep);
	json_begin(&w);
	json_put_value(&w, "k", json_member(v, "k"));
	out = written(&w, &len);
	ck_assert_uint_eq(len, strlen(deep));
	ck_assert_mem_eq(out, deep, len);
	yajl_tree_free(v);
	free(deep);
	json_writer_free(&w);
}
END_TEST

static Suite *json_suite(void)
{
	Suite *s = suite_create("json");
	TCase *tc = tcase_create("fields");
	tcase_add_test(tc, test_u64_numbers);
	tcase_add_test(tc, test_u64_numeric_strings);
	tcase_add_test(tc, test_u64_junk_strings);
	tcase_add_test(tc, test_u64_negative_and_float);
	tcase_add_test(tc, test_u64_over_max);
	tcase_add_test(tc, test_u64_missing_and_wrong_type);
	tcase_add_test(tc, test_get_str);
	tcase_add_test(tc, test_get_str_escaped_nul);
	tcase_add_test(tc, test_get_flag);
	tcase_add_test(tc, test_unpaired_surrogates);
	suite_add_tcase(s, tc);
	tc = tcase_create("parse");
	tcase_add_test(tc, test_parse_rejects_non_objects);
	tcase_add_test(tc, test_parse_rejects_invalid_json);
	tcase_add_test(tc, test_parse_rejects_nul);
	tcase_add_test(tc, test_parse_rejects_invalid_utf8);
	tcase_add_test(tc, test_parse_rejects_non_shortest_utf8);
	tcase_add_test(tc, test_parse_accepts_utf8);
	tcase_add_test(tc, test_depth_limit);
	tcase_add_test(tc, test_depth_limit_not_bypassed_by_comments);
	tcase_add_test(tc, test_qt_indented_json);
	suite_add_tcase(s, tc);
	tc = tcase_create("writer");
	tcase_add_test(tc, test_writer_compact);
	tcase_add_test(tc, test_writer_escaping);
	tcase_add_test(tc, test_writer_number_as_string);
	tcase_add_test(tc, test_writer_reuse);
	tcase_add_test(tc, test_writer_put_value);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return unit_run(json_suite());
}

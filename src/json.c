/* json.c: strict field extraction over yajl trees and a reusable compact response generator. */
#include "config.h"
#include "json.h"

#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

size_t json_utf8_seq(const uint8_t *p, size_t left)
{
	uint8_t c = p[0];
	size_t n;
	uint32_t cp;
	if (c < 0x80)
		return 1;
	if (c >= 0xc2 && c <= 0xdf) { n = 2; cp = c & 0x1f; }
	else if (c >= 0xe0 && c <= 0xef) { n = 3; cp = c & 0x0f; }
	else if (c >= 0xf0 && c <= 0xf4) { n = 4; cp = c & 0x07; }
	else return 0;
	if (left < n)
		return 0;
	for (size_t i = 1; i < n; i++) {
		if ((p[i] & 0xc0) != 0x80)
			return 0;
		cp = cp << 6 | (p[i] & 0x3f);
	}
	if ((n == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (n == 4 && (cp < 0x10000 || cp > 0x10ffff)))
		return 0;
	return n;
}

/* The value of 4 hex digits, or 0x110000 when they are not hex (yajl reports those). */
static unsigned hex4(const uint8_t *p)
{
	unsigned v = 0;
	for (int k = 0; k < 4; k++) {
		uint8_t c = p[k];
		unsigned d = c >= '0' && c <= '9' ? (unsigned)(c - '0') : c >= 'a' && c <= 'f' ? (unsigned)(c - 'a' + 10)
		    : c >= 'A' && c <= 'F' ? (unsigned)(c - 'A' + 10) : 16;
		if (d == 16)
			return 0x110000;
		v = v << 4 | d;
	}
	return v;
}

/* What yajl lets through but we must not: comments (they hide brackets from the depth count),
 * nesting that yajl would free recursively, and non-shortest or out-of-range UTF-8; it also
 * notes \\u0000 escapes, which json_parse_object turns into U+0001. */
static const char *json_precheck(const uint8_t *p, size_t len, int *has_nul_escape)
{
	int depth = 0, in_string = 0;
	for (size_t i = 0; i < len;) {
		uint8_t c = p[i];
		if (c >= 0x80) {
			size_t n = json_utf8_seq(p + i, len - i);
			if (n == 0)
				return "body is not valid UTF-8";
			i += n;
			continue;
		}
		if (in_string) {
			/* Most of a body is base64 inside one string: skip plain ASCII quickly. */
			if (c != '\\' && c != '"') {
				i++;
				while (i < len && p[i] < 0x80 && p[i] != '\\' && p[i] != '"')
					i++;
				continue;
			}
			if (c == '\\') {
				if (len - i >= 6 && p[i + 1] == 'u') {
					unsigned cp = hex4(p + i + 2);
					if (cp == 0)
						*has_nul_escape = 1;
					if (cp >= 0xdc00 && cp <= 0xdfff)
						return "body is not valid JSON (unpaired surrogate escape)";
					if (cp >= 0xd800 && cp <= 0xdbff) {
						/* yajl would turn a lone high surrogate into '?': two names, one file. */
						unsigned low = len - i >= 12 && p[i + 6] == '\\' && p[i + 7] == 'u' ? hex4(p + i + 8) : 0;
						if (low < 0xdc00 || low > 0xdfff)
							return "body is not valid JSON (unpaired surrogate escape)";
						i += 12;
						continue;
					}
				}
				i += 2;
				continue;
			}
			if (c == '"')
				in_string = 0;
		} else if (c == '"') {
			in_string = 1;
		} else if (c == '/') {
			return "body is not valid JSON (comments are not allowed)";
		} else if (c == '{' || c == '[') {
			if (++depth > JSON_MAX_DEPTH)
				return "JSON nested deeper than " JSON_MAX_DEPTH_TEXT " levels";
		} else if (c == '}' || c == ']') {
			depth--;
		}
		i++;
	}
	return NULL;
}

static yajl_val json_parse(const uint8_t *body, size_t len, int nul_as_control, char *err, size_t errlen)
{
	if (memchr(body, '\0', len) != NULL) {
		snprintf(err, errlen, "body contains a NUL byte");
		return NULL;
	}
	int has_nul_escape = 0;
	const char *why = json_precheck(body, len, &has_nul_escape);
	if (why == NULL && has_nul_escape && !nul_as_control)
		why = "strings may not contain \\u0000";
	if (why != NULL) {
		snprintf(err, errlen, "%s", why);
		return NULL;
	}
	char *text = malloc(len + 1);
	if (text == NULL) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	memcpy(text, body, len);
	text[len] = '\0';
	if (has_nul_escape) {
		/* yajl would cut C strings short at the NUL; as U+0001 it stays a control
		 * character that the field checks refuse (a name gets 1023, not a shorter name). */
		for (char *q = text; (q = strstr(q, "\\u0000")) != NULL; q += 6) {
			size_t backslashes = 0;
			while (q - (ptrdiff_t)backslashes > text && q[-1 - (ptrdiff_t)backslashes] == '\\')
				backslashes++;
			if (backslashes % 2 == 0)
				q[5] = '1';
		}
	}
	char yerr[128];
	yajl_val v = yajl_tree_parse(text, yerr, sizeof(yerr));
	free(text);
	if (v == NULL) {
		/* yajl's message spans lines; keep the first. */
		yerr[strcspn(yerr, "\n")] = '\0';
		snprintf(err, errlen, "body is not valid JSON (%s)", yerr[0] ? yerr : "parse error");
		return NULL;
	}
	if (!YAJL_IS_OBJECT(v)) {
		yajl_tree_free(v);
		snprintf(err, errlen, "body is not a JSON object");
		return NULL;
	}
	return v;
}

yajl_val json_parse_object(const uint8_t *body, size_t len, char *err, size_t errlen)
{
	return json_parse(body, len, 0, err, errlen);
}

yajl_val json_parse_request(const uint8_t *body, size_t len, char *err, size_t errlen)
{
	return json_parse(body, len, 1, err, errlen);
}

yajl_val json_member(yajl_val obj, const char *key)
{
	for (size_t i = 0; i < obj->u.object.len; i++)
		if (strcmp(obj->u.object.keys[i], key) == 0)
			return obj->u.object.values[i];
	return NULL;
}

enum json_field json_get_u64(yajl_val obj, const char *key, uint64_t max, uint64_t *out)
{
	yajl_val v = json_member(obj, key);
	if (v == NULL)
		return JSON_FIELD_MISSING;
	if (YAJL_IS_NUMBER(v)) {
		if (!(v->u.number.flags & YAJL_NUMBER_INT_VALID) || v->u.number.i < 0 ||
		    (uint64_t)v->u.number.i > max)
			return JSON_FIELD_BAD;
		*out = (uint64_t)v->u.number.i;
		return JSON_FIELD_OK;
	}
	if (YAJL_IS_STRING(v)) {
		const char *s = v->u.string;
		size_t n = strlen(s);
		if (n == 0 || n > 19 || strspn(s, "0123456789") != n)
			return JSON_FIELD_BAD;
		uint64_t value = strtoull(s, NULL, 10);   /* 19 digits cannot overflow */
		if (value > max)
			return JSON_FIELD_BAD;
		*out = value;
		return JSON_FIELD_OK;
	}
	return JSON_FIELD_BAD;
}

enum json_field json_get_str(yajl_val obj, const char *key, const char **out, size_t *len)
{
	yajl_val v = json_member(obj, key);
	if (v == NULL)
		return JSON_FIELD_MISSING;
	if (!YAJL_IS_STRING(v))
		return JSON_FIELD_BAD;
	*out = v->u.string;
	*len = strlen(v->u.string);
	return JSON_FIELD_OK;
}

enum json_field json_get_flag(yajl_val obj, const char *key, int *out)
{
	yajl_val v = json_member(obj, key);
	if (v == NULL)
		return JSON_FIELD_MISSING;
	if (YAJL_IS_TRUE(v) || YAJL_IS_FALSE(v)) {
		*out = YAJL_IS_TRUE(v);
		return JSON_FIELD_OK;
	}
	uint64_t n;
	if (json_get_u64(obj, key, 1, &n) != JSON_FIELD_OK)
		return JSON_FIELD_BAD;
	*out = (int)n;
	return JSON_FIELD_OK;
}

int json_writer_init(struct json_writer *w)
{
	w->gen = yajl_gen_alloc(NULL);
	return w->gen ? 0 : -1;
}

void json_writer_free(struct json_writer *w)
{
	if (w->gen)
		yajl_gen_free(w->gen);
	w->gen = NULL;
}

void json_begin(struct json_writer *w)
{
	yajl_gen_clear(w->gen);
	yajl_gen_reset(w->gen, NULL);
	yajl_gen_map_open(w->gen);
}

static void json_key(struct json_writer *w, const char *key)
{
	yajl_gen_string(w->gen, (const unsigned char *)key, strlen(key));
}

void json_put_int(struct json_writer *w, const char *key, int64_t v)
{
	json_key(w, key);
	yajl_gen_integer(w->gen, v);
}

void json_put_u64_str(struct json_writer *w, const char *key, uint64_t v)
{
	char num[24];
	int n = snprintf(num, sizeof(num), "%" PRIu64, v);
	json_key(w, key);
	yajl_gen_string(w->gen, (const unsigned char *)num, (size_t)n);
}

void json_put_str(struct json_writer *w, const char *key, const char *s, size_t len)
{
	json_key(w, key);
	yajl_gen_string(w->gen, (const unsigned char *)s, len);
}

void json_put_bool(struct json_writer *w, const char *key, int v)
{
	json_key(w, key);
	yajl_gen_bool(w->gen, v);
}

static void json_gen_value(yajl_gen g, yajl_val v)
{
	if (v == NULL || YAJL_IS_NULL(v)) {
		yajl_gen_null(g);
	} else if (YAJL_IS_STRING(v)) {
		yajl_gen_string(g, (const unsigned char *)v->u.string, strlen(v->u.string));
	} else if (YAJL_IS_NUMBER(v)) {
		yajl_gen_number(g, v->u.number.r, strlen(v->u.number.r));
	} else if (YAJL_IS_TRUE(v) || YAJL_IS_FALSE(v)) {
		yajl_gen_bool(g, YAJL_IS_TRUE(v));
	} else if (YAJL_IS_ARRAY(v)) {
		yajl_gen_array_open(g);
		for (size_t i = 0; i < v->u.array.len; i++)
			json_gen_value(g, v->u.array.values[i]);
		yajl_gen_array_close(g);
	} else if (YAJL_IS_OBJECT(v)) {
		yajl_gen_map_open(g);
		for (size_t i = 0; i < v->u.object.len; i++) {
			const char *k = v->u.object.keys[i];
			yajl_gen_string(g, (const unsigned char *)k, strlen(k));
			json_gen_value(g, v->u.object.values[i]);
		}
		yajl_gen_map_close(g);
	}
}

void json_put_value(struct json_writer *w, const char *key, yajl_val v)
{
	json_key(w, key);
	json_gen_value(w->gen, v);
}

void json_end(struct json_writer *w, const uint8_t **out, size_t *len)
{
	yajl_gen_map_close(w->gen);
	const unsigned char *p;
	size_t n;
	yajl_gen_get_buf(w->gen, &p, &n);
	*out = p;
	*len = n;
}

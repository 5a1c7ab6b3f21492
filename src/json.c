/* json.c: strict field extraction over yajl trees and a reusable compact response generator. */
#include "config.h"
#include "json.h"

#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yajl/yajl_parse.h>

#define FLAT_REFUSED "requests are flat JSON objects: arrays and nested objects are not allowed"

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

/* The first index from i on holding a byte >= 0x80, a control character, a backslash or a
 * quote, or len. Eight bytes a step (a chunk's base64 is most of every upload body): a byte of
 * a word equals n when the word XOR n has a zero byte, and some byte is below n (n <= 0x80)
 * when (v - n * 0x01..) & ~v & 0x80.. is not 0; a word with any of them is then read a byte
 * at a time. */
static size_t skip_plain(const uint8_t *p, size_t i, size_t len)
{
	const uint64_t ones = UINT64_C(0x0101010101010101), highs = UINT64_C(0x8080808080808080);
	const uint64_t quotes = ones * '"', backslashes = ones * '\\', spaces = ones * ' ';
	while (len - i >= 8) {
		uint64_t v;
		memcpy(&v, p + i, 8);
		uint64_t q = v ^ quotes, b = v ^ backslashes;
		if (((q - ones) & ~q & highs) | ((b - ones) & ~b & highs) | ((v - spaces) & ~v & highs) | (v & highs))
			break;
		i += 8;
	}
	while (i < len && p[i] < 0x80 && p[i] >= ' ' && p[i] != '\\' && p[i] != '"')
		i++;
	return i;
}

/* A string of printable ASCII without escapes: its value is its bytes [start, start + len). */
struct json_plain {
	size_t start, len;
};

size_t json_elide_min = 512;

/* What yajl lets through but we must not: comments (they hide brackets from the depth count),
 * nesting that yajl would free recursively, and non-shortest or out-of-range UTF-8; it also
 * notes \\u0000 escapes, which json_parse_request turns into U+0001 (json_parse_object
 * refuses them and json_read_flat keeps them, for the field checks to refuse). */
static const char *json_precheck(const uint8_t *p, size_t len, int flat, int *has_nul_escape,
    struct json_plain *longest)
{
	int depth = 0, in_string = 0, plain = 0;
	size_t opened = 0;
	*longest = (struct json_plain){ 0, 0 };
	for (size_t i = 0; i < len;) {
		uint8_t c = p[i];
		if (c >= 0x80) {
			size_t n = json_utf8_seq(p + i, len - i);
			if (n == 0)
				return "body is not valid UTF-8";
			plain = 0;
			i += n;
			continue;
		}
		if (in_string) {
			/* Most of a body is base64 inside one string: skip plain ASCII quickly. */
			if (c != '\\' && c != '"') {
				if (c < ' ')
					plain = 0;   /* yajl refuses it */
				i = skip_plain(p, i + 1, len);
				continue;
			}
			plain = plain && c == '"';
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
			if (c == '"') {
				in_string = 0;
				if (plain && i - opened - 1 > longest->len)
					*longest = (struct json_plain){ opened + 1, i - opened - 1 };
			}
		} else if (c == '"') {
			in_string = 1;
			plain = 1;
			opened = i;
		} else if (c == '/') {
			return "body is not valid JSON (comments are not allowed)";
		} else if (c == '{' || c == '[') {
			/* A request is one object of scalars: the first bracket of anything else ends it here,
			 * before the parser spends anything on the rest. */
			if (flat && (c == '[' || depth > 0))
				return FLAT_REFUSED;
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
	struct json_plain longest;
	const char *why = json_precheck(body, len, 0, &has_nul_escape, &longest);
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

/* State of json_read_flat's callbacks. */
struct flat_reader {
	yajl_handle parser;
	uint8_t *body;
	size_t len;
	const char *const *keys;
	size_t nkeys;
	struct json_scalar *values;
	struct json_scalar *current;   /* where the value of the last key goes; NULL: ignored */
	struct json_scalar *raw_slot;  /* the one field that may hold an array or object, or NULL */
	int depth;                     /* of the request object: 0 outside, 1 inside */
	int raw_depth;                 /* nesting inside a raw value, 0 when not in one */
	int raw_record;                /* the raw value in progress is the field's first value */
	size_t raw_start;
	size_t raw_values;
	size_t members;
	size_t base;                   /* where in body the text yajl is reading starts */
	struct json_plain elided;      /* a string left out of yajl's view, or len 0 */
	int elided_next;               /* the next string or key yajl reports is the elided one */
	const char *why;               /* why the callbacks stopped the parser */
};

/* Bytes of body yajl has read: it counts from the start of the text it was last given. */
static size_t flat_consumed(const struct flat_reader *r)
{
	return r->base + yajl_get_bytes_consumed(r->parser);
}

/* yajl saw the elided string as ""; its callbacks get the string from the body instead. */
static void flat_unelide(struct flat_reader *r, const unsigned char **s, size_t *len)
{
	if (r->elided_next) {
		r->elided_next = 0;
		*s = r->body + r->elided.start;
		*len = r->elided.len;
	}
}

/* Inside a raw value every token only counts: the value is echoed as its text. */
static int raw_count(struct flat_reader *r)
{
	if (++r->raw_values > JSON_MAX_RAW_VALUES) {
		r->why = "1001 data holds more than " JSON_MAX_RAW_VALUES_TEXT " values";
		return 0;
	}
	return 1;
}

static int flat_value(struct flat_reader *r, enum json_kind kind, const char *s, size_t len)
{
	if (r->raw_depth > 0)
		return raw_count(r);
	if (r->depth != 1) {
		r->why = "body is not a JSON object";
		return 0;
	}
	struct json_scalar *v = r->current;
	r->current = NULL;
	if (v == NULL || v->kind != JSON_NONE)
		return 1;   /* unknown key, or a repeated one: the first value counts */
	v->kind = kind;
	v->s = s;
	v->len = len;
	return 1;
}

static int flat_null(void *ctx) { return flat_value(ctx, JSON_NULL, NULL, 0); }
static int flat_bool(void *ctx, int b) { return flat_value(ctx, b ? JSON_TRUE : JSON_FALSE, NULL, 0); }
static int flat_number(void *ctx, const char *s, size_t len) { return flat_value(ctx, JSON_NUMBER, s, len); }

static int flat_string(void *ctx, const unsigned char *s, size_t len)
{
	struct flat_reader *r = ctx;
	flat_unelide(r, &s, &len);
	const uint8_t *p = s;
	if (r->raw_depth > 0)
		return raw_count(r);   /* never decoded in place: the raw text is echoed */
	if (r->current != NULL && r->current->kind == JSON_NONE && !(p >= r->body && p + len <= r->body + r->len)) {
		/* yajl decoded escapes into its own buffer, which the next string reuses. The
		 * decoded text is never longer than the escaped one, so it fits at the end of
		 * the string's own bytes, just before its closing quote. */
		size_t end = flat_consumed(r);
		if (end < 1 + len || end > r->len) {
			r->why = "body is not valid JSON";
			return 0;
		}
		uint8_t *dst = r->body + end - 1 - len;
		memmove(dst, s, len);
		p = dst;
	}
	return flat_value(r, JSON_STRING, (const char *)p, len);
}

/* '{' or '[': the request object itself, the start of the raw field's value, or refused. */
static int flat_open(struct flat_reader *r, int is_map)
{
	if (r->raw_depth > 0) {
		r->raw_depth++;
		return raw_count(r);
	}
	if (r->depth == 0 && is_map) {
		r->depth = 1;
		return 1;
	}
	if (r->depth == 1 && r->current != NULL && r->current == r->raw_slot) {
		r->raw_depth = 1;
		r->raw_record = r->current->kind == JSON_NONE;
		r->raw_start = flat_consumed(r) - 1;   /* the bracket itself */
		return raw_count(r);
	}
	r->why = FLAT_REFUSED;
	return 0;
}

static int flat_close(struct flat_reader *r)
{
	if (r->raw_depth > 0) {
		if (--r->raw_depth == 0) {
			size_t end = flat_consumed(r);
			if (r->raw_record) {
				r->current->kind = JSON_RAW;
				r->current->s = (const char *)r->body + r->raw_start;
				r->current->len = end - r->raw_start;
			}
			r->current = NULL;
		}
		return 1;
	}
	r->depth--;
	return 1;
}

static int flat_start_map(void *ctx) { return flat_open(ctx, 1); }
static int flat_start_array(void *ctx) { return flat_open(ctx, 0); }
static int flat_end_map(void *ctx) { return flat_close(ctx); }
static int flat_end_array(void *ctx) { return flat_close(ctx); }

static int flat_key(void *ctx, const unsigned char *key, size_t len)
{
	struct flat_reader *r = ctx;
	flat_unelide(r, &key, &len);
	if (r->raw_depth > 0)
		return raw_count(r);
	if (++r->members > JSON_MAX_MEMBERS) {
		r->why = "request objects have at most " JSON_MAX_MEMBERS_TEXT " fields";
		return 0;
	}
	r->current = NULL;
	for (size_t i = 0; i < r->nkeys; i++)
		if (strlen(r->keys[i]) == len && memcmp(r->keys[i], key, len) == 0) {
			r->current = &r->values[i];
			break;
		}
	return 1;
}

static const yajl_callbacks flat_callbacks = {
	.yajl_null = flat_null,
	.yajl_boolean = flat_bool,
	.yajl_number = flat_number,
	.yajl_string = flat_string,
	.yajl_start_map = flat_start_map,
	.yajl_map_key = flat_key,
	.yajl_end_map = flat_end_map,
	.yajl_start_array = flat_start_array,
	.yajl_end_array = flat_end_array,
};

int json_read_flat(uint8_t *body, size_t len, const char *const *keys, size_t nkeys,
    struct json_scalar *values, char *err, size_t errlen)
{
	return json_read_flat_raw(body, len, keys, nkeys, values, -1, err, errlen);
}

int json_read_flat_raw(uint8_t *body, size_t len, const char *const *keys, size_t nkeys,
    struct json_scalar *values, int raw_key, char *err, size_t errlen)
{
	memset(values, 0, nkeys * sizeof(*values));
	if (len > 0 && memchr(body, '\0', len) != NULL) {
		snprintf(err, errlen, "body contains a NUL byte");
		return -1;
	}
	int has_nul_escape = 0;
	struct json_plain longest;
	/* Without a raw field the first bracket inside the object ends it here; with one,
	 * the depth limit applies and the callbacks refuse brackets anywhere else. */
	const char *why = json_precheck(body, len, raw_key < 0, &has_nul_escape, &longest);
	if (why != NULL) {
		snprintf(err, errlen, "%s", why);
		return -1;
	}
	struct flat_reader r = { .body = body, .len = len, .keys = keys, .nkeys = nkeys, .values = values,
	    .raw_slot = raw_key >= 0 && (size_t)raw_key < nkeys ? &values[raw_key] : NULL };
	r.parser = yajl_alloc(&flat_callbacks, NULL, &r);
	if (r.parser == NULL) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	yajl_status st;
	if (longest.len > 0 && longest.len >= json_elide_min) {
		/* yajl's lexer reads a string a byte at a time (an eighth of the workers' CPU time on 64
		 * JSON uploads): the longest string, a chunk's base64, is left out of what it reads. It is
		 * plain (checked above), so yajl would have found it valid and given its bytes as they
		 * are: yajl reads its quotes as "", and the callbacks take the bytes from the body. */
		st = yajl_parse(r.parser, body, longest.start);   /* up to the opening quote */
		if (st == yajl_status_ok) {
			r.elided = longest;
			r.elided_next = 1;
			r.base = longest.start + longest.len;            /* from the closing quote */
			st = yajl_parse(r.parser, body + r.base, len - r.base);
		}
	} else {
		st = yajl_parse(r.parser, body, len);
	}
	if (st == yajl_status_ok)
		st = yajl_complete_parse(r.parser);
	if (st != yajl_status_ok) {
		if (r.why != NULL) {
			snprintf(err, errlen, "%s", r.why);
		} else {
			/* yajl's message spans lines; keep the first. */
			unsigned char *ye = yajl_get_error(r.parser, 0, body, len);
			char first[128];
			snprintf(first, sizeof(first), "%s", ye ? (const char *)ye : "parse error");
			first[strcspn(first, "\n")] = '\0';
			snprintf(err, errlen, "body is not valid JSON (%s)", first);
			if (ye)
				yajl_free_error(r.parser, ye);
		}
		yajl_free(r.parser);
		return -1;
	}
	yajl_free(r.parser);
	return 0;
}

static enum json_field u64_text(const char *s, size_t n, uint64_t max, uint64_t *out)
{
	/* Digits only: no sign, fraction or exponent; 19 digits cannot overflow. */
	if (n == 0 || n > 19)
		return JSON_FIELD_BAD;
	uint64_t value = 0;
	for (size_t i = 0; i < n; i++) {
		if (s[i] < '0' || s[i] > '9')
			return JSON_FIELD_BAD;
		value = value * 10 + (uint64_t)(s[i] - '0');
	}
	if (value > max)
		return JSON_FIELD_BAD;
	*out = value;
	return JSON_FIELD_OK;
}

enum json_field json_scalar_u64(const struct json_scalar *v, uint64_t max, uint64_t *out)
{
	if (v->kind == JSON_NONE)
		return JSON_FIELD_MISSING;
	if (v->kind == JSON_NUMBER) {
		/* yajl reads "-0" as the integer 0: so does this. */
		if (v->len == 2 && v->s[0] == '-' && v->s[1] == '0')
			return u64_text("0", 1, max, out);
		return u64_text(v->s, v->len, max, out);
	}
	if (v->kind == JSON_STRING)
		return u64_text(v->s, v->len, max, out);
	return JSON_FIELD_BAD;
}

enum json_field json_scalar_str(const struct json_scalar *v, const char **out, size_t *len)
{
	if (v->kind == JSON_NONE)
		return JSON_FIELD_MISSING;
	if (v->kind != JSON_STRING)
		return JSON_FIELD_BAD;
	*out = v->s;
	*len = v->len;
	return JSON_FIELD_OK;
}

enum json_field json_scalar_flag(const struct json_scalar *v, int *out)
{
	if (v->kind == JSON_NONE)
		return JSON_FIELD_MISSING;
	if (v->kind == JSON_TRUE || v->kind == JSON_FALSE) {
		*out = v->kind == JSON_TRUE;
		return JSON_FIELD_OK;
	}
	uint64_t n;
	if (json_scalar_u64(v, 1, &n) != JSON_FIELD_OK)
		return JSON_FIELD_BAD;
	*out = (int)n;
	return JSON_FIELD_OK;
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

void json_put_scalar(struct json_writer *w, const char *key, const struct json_scalar *v)
{
	json_key(w, key);
	switch (v->kind) {
	case JSON_STRING:
		yajl_gen_string(w->gen, (const unsigned char *)v->s, v->len);
		break;
	case JSON_NUMBER:
		yajl_gen_number(w->gen, v->s, v->len);
		break;
	case JSON_TRUE:
	case JSON_FALSE:
		yajl_gen_bool(w->gen, v->kind == JSON_TRUE);
		break;
	default:
		yajl_gen_null(w->gen);
		break;
	}
}

void json_put_value(struct json_writer *w, const char *key, yajl_val v)
{
	json_key(w, key);
	json_gen_value(w->gen, v);
}

void json_open_fields(struct json_writer *w, const uint8_t **out, size_t *len)
{
	const unsigned char *p;
	size_t n;
	yajl_gen_get_buf(w->gen, &p, &n);
	*out = p;
	*len = n;
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

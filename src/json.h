/* json.h: request bodies parsed with yajl, fields read strictly, responses written compactly. */
#ifndef RESOURCED_JSON_H
#define RESOURCED_JSON_H

#include <stddef.h>
#include <stdint.h>
#include <yajl/yajl_gen.h>
#include <yajl/yajl_tree.h>

#define JSON_MAX_DEPTH 16
#define JSON_MAX_DEPTH_TEXT "16"
#define JSON_MAX_SAFE_INT ((UINT64_C(1) << 53) - 1)   /* larger sizes lose precision in clients */
#define JSON_MAX_MEMBERS 64      /* fields of one request object: the largest request has 11 */
#define JSON_MAX_MEMBERS_TEXT "64"
#define JSON_MAX_RAW_VALUES 1024  /* values inside the one field that may nest (1001's data) */
#define JSON_MAX_RAW_VALUES_TEXT "1024"

enum json_field { JSON_FIELD_OK = 0, JSON_FIELD_MISSING = -1, JSON_FIELD_BAD = -2 };

/* Parses one JSON object (the whole body). Rejects NUL bytes and \u0000, invalid
 * UTF-8 and unpaired surrogate escapes, comments, nesting deeper than
 * JSON_MAX_DEPTH, and anything that is not an object. Returns NULL with a
 * reason in err. Free with yajl_tree_free(). */
yajl_val json_parse_object(const uint8_t *body, size_t len, char *err, size_t errlen);
/* The same for requests whose fields are checked afterwards: \u0000 is read as
 * U+0001, a control character every field check refuses (a name with NUL gets
 * 1023 instead of being cut short at the NUL). */
yajl_val json_parse_request(const uint8_t *body, size_t len, char *err, size_t errlen);

/* One value of a flat request object. Strings are decoded; s points into the body. */
enum json_kind { JSON_NONE = 0, JSON_STRING, JSON_NUMBER, JSON_TRUE, JSON_FALSE, JSON_NULL, JSON_RAW };
struct json_scalar {
	enum json_kind kind;     /* JSON_NONE: the key was absent */
	const char *s;           /* JSON_STRING: the decoded bytes; JSON_NUMBER: its text;
	                          * JSON_RAW: the text of an array or object, as sent */
	size_t len;
};

/* Reads a request: one JSON object whose values are strings, numbers, true, false
 * or null, without building a tree. Arrays and nested objects are refused by a
 * linear scan before the parser starts, and so are more than JSON_MAX_MEMBERS
 * fields, so the work a body causes is bounded by its length. For each of the
 * nkeys keys, values[i] receives the first value given for keys[i]; other keys
 * are ignored. Strings with escapes are decoded in place over their own text
 * (the body is modified), so every s points into body. The same byte checks as
 * json_parse_object apply, except that \u0000 is allowed (it decodes to a NUL
 * inside a counted string, which every field check refuses). Returns 0, or -1
 * with the reason in err. */
int json_read_flat(uint8_t *body, size_t len, const char *const *keys, size_t nkeys,
    struct json_scalar *values, char *err, size_t errlen);
/* json_read_flat leaves a body's longest string that holds only printable ASCII
 * without escapes out of yajl's view, and reads it from the body, when it is at least
 * this long (512; the fuzzer and unit tests set 1, so that it always does). */
extern size_t json_elide_min;

/* The same, except that keys[raw_key] may also hold an array or object: nested at
 * most JSON_MAX_DEPTH levels (with the request object) and JSON_MAX_RAW_VALUES
 * values, never decoded, handed out as JSON_RAW text (1001 echoes its data so).
 * Arrays and objects anywhere else are refused as by json_read_flat. */
int json_read_flat_raw(uint8_t *body, size_t len, const char *const *keys, size_t nkeys,
    struct json_scalar *values, int raw_key, char *err, size_t errlen);

/* The same field rules as json_get_u64, json_get_str and json_get_flag, on scalars. */
enum json_field json_scalar_u64(const struct json_scalar *v, uint64_t max, uint64_t *out);
enum json_field json_scalar_str(const struct json_scalar *v, const char **out, size_t *len);
enum json_field json_scalar_flag(const struct json_scalar *v, int *out);

/* Length of one well-formed UTF-8 sequence at p (no overlongs, surrogates or > U+10FFFF), else 0. */
size_t json_utf8_seq(const uint8_t *p, size_t left);

yajl_val json_member(yajl_val obj, const char *key);

/* A non-negative integer up to max, as a JSON number or a decimal string. */
enum json_field json_get_u64(yajl_val obj, const char *key, uint64_t max, uint64_t *out);
/* A string; *out points into the tree. */
enum json_field json_get_str(yajl_val obj, const char *key, const char **out, size_t *len);
/* 0 or 1 as a number or string, or a JSON bool. */
enum json_field json_get_flag(yajl_val obj, const char *key, int *out);

/* Response writer: one yajl_gen reused for every response of a process. */
struct json_writer {
	yajl_gen gen;
};
int json_writer_init(struct json_writer *w);
void json_writer_free(struct json_writer *w);
void json_begin(struct json_writer *w);                 /* clears and opens an object */
void json_put_int(struct json_writer *w, const char *key, int64_t v);
void json_put_u64_str(struct json_writer *w, const char *key, uint64_t v);  /* a number as a string */
void json_put_str(struct json_writer *w, const char *key, const char *s, size_t len);
void json_put_bool(struct json_writer *w, const char *key, int v);
/* Writes a scalar as it was sent (numbers keep their text). */
void json_put_scalar(struct json_writer *w, const char *key, const struct json_scalar *v);
/* Copies any JSON value (depth is bounded by json_parse_object). */
void json_put_value(struct json_writer *w, const char *key, yajl_val v);
/* The object so far, left open ("{" and the fields, no "}"): for a caller that
 * appends the last field itself. *out stays valid until the next json_begin. */
void json_open_fields(struct json_writer *w, const uint8_t **out, size_t *len);
/* Closes the object; *out stays valid until the next json_begin. */
void json_end(struct json_writer *w, const uint8_t **out, size_t *len);

#endif

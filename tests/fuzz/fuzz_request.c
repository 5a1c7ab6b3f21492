/* fuzz_request.c: libFuzzer target for request bodies: json_parse_object
 * (src/json.c), the request parsers of src/proto.c and the response writer.
 *
 * The input is one frame body. It goes through:
 *   - proto_name_valid on the raw bytes, against an independent implementation
 *     of the Names rules of PROTOCOL.md;
 *   - proto_read_request (what worker.c uses for every request: a flat object
 *     read without a tree; plain strings past yajl for odd sizes, through it
 *     for even ones), checked against json_parse_request's tree as the
 *     reference: it accepts exactly the bodies whose tree is one object of at
 *     most JSON_MAX_MEMBERS scalars, with the same first value per key; then
 *     every request parser: proto_parse_chunk and proto_decode_chunk (1003 and
 *     1031, anonymous on and off, several max_file_size values, a roomy and a
 *     tiny data buffer), proto_parse_sync and proto_parse_download; on ERR_OK
 *     the checked struct must obey what the rest of the server relies on;
 *   - json_parse_object (1001 and everything else), which must agree with
 *     json_parse_request except that it refuses \u0000;
 *   - the json_writer: every member of the parsed object copied with
 *     json_put_value (as 1001 echoes data) and the whole tree nested under a
 *     key; the output must parse again to the same tree.
 * Every violated invariant is a __builtin_trap(). */
#include "config.h"

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sodium.h>

#include "escape.h"
#include "json.h"
#include "proto.h"

#include "fuzz_check.h"


static struct json_writer jw;

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	if (sodium_init() < 0 || json_writer_init(&jw) < 0)
		abort();
	return 0;
}

/* ---------------------------------------------------------------- references */

/* One UTF-8 scalar value at p, strictly (RFC 3629); returns its length or 0. */
static size_t ref_utf8(const uint8_t *p, size_t left, uint32_t *cp)
{
	uint8_t b = p[0];
	size_t n;
	uint32_t min;
	if (b < 0x80) {
		*cp = b;
		return 1;
	} else if ((b & 0xe0) == 0xc0) {
		n = 2; *cp = b & 0x1f; min = 0x80;
	} else if ((b & 0xf0) == 0xe0) {
		n = 3; *cp = b & 0x0f; min = 0x800;
	} else if ((b & 0xf8) == 0xf0) {
		n = 4; *cp = b & 0x07; min = 0x10000;
	} else {
		return 0;
	}
	if (left < n)
		return 0;
	for (size_t i = 1; i < n; i++) {
		if ((p[i] & 0xc0) != 0x80)
			return 0;
		*cp = *cp << 6 | (p[i] & 0x3f);
	}
	if (*cp < min || *cp > 0x10ffff || (*cp >= 0xd800 && *cp <= 0xdfff))
		return 0;
	return n;
}

static int ref_utf8_valid(const uint8_t *p, size_t len)
{
	for (size_t i = 0; i < len;) {
		uint32_t cp;
		size_t n = ref_utf8(p + i, len - i, &cp);
		if (n == 0)
			return 0;
		i += n;
	}
	return 1;
}

/* PROTOCOL.md, Names: 1 to 255 bytes of valid UTF-8; no /, \, NUL or other
 * control characters (C0, DEL, C1); not . or ..; not starting with a dot. */
static int ref_name_valid(const uint8_t *p, size_t len)
{
	if (len < 1 || len > 255 || p[0] == '.')
		return 0;
	for (size_t i = 0; i < len;) {
		uint32_t cp;
		size_t n = ref_utf8(p + i, len - i, &cp);
		if (n == 0)
			return 0;
		if (cp < 0x20 || cp == 0x7f || (cp >= 0x80 && cp <= 0x9f) || cp == '/' || cp == '\\')
			return 0;
		i += n;
	}
	return 1;
}

static int b64_value(uint8_t c)
{
	if (c >= 'A' && c <= 'Z') return c - 'A';
	if (c >= 'a' && c <= 'z') return c - 'a' + 26;
	if (c >= '0' && c <= '9') return c - '0' + 52;
	if (c == '+') return 62;
	if (c == '/') return 63;
	return -1;
}

/* Standard base64 with padding, canonical (unused bits zero). Returns the
 * decoded length or -1. out must hold len / 4 * 3 bytes. */
static long ref_b64_decode(const char *s, size_t len, uint8_t *out)
{
	if (len % 4 != 0)
		return -1;
	size_t n = 0;
	for (size_t i = 0; i < len; i += 4) {
		int v[4];
		int pad = 0;
		for (int k = 0; k < 4; k++) {
			uint8_t c = (uint8_t)s[i + k];
			if (c == '=' && i + 4 == len && k >= 2) {
				pad++;
				v[k] = 0;
				continue;
			}
			if (pad)   /* a digit after '=' */
				return -1;
			v[k] = b64_value(c);
			if (v[k] < 0)
				return -1;
		}
		uint32_t acc = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 | (uint32_t)v[3];
		out[n++] = (uint8_t)(acc >> 16);
		if (pad < 2)
			out[n++] = (uint8_t)(acc >> 8);
		if (pad < 1)
			out[n++] = (uint8_t)acc;
		if ((pad == 1 && (acc & 0xff) != 0) || (pad == 2 && (acc & 0xffff) != 0))
			return -1;   /* non-zero unused bits */
	}
	return (long)n;
}

/* What json_get_u64 should make of member key: 1 and *out, or 0. */
static int ref_u64(yajl_val obj, const char *key, uint64_t max, uint64_t *out)
{
	yajl_val v = json_member(obj, key);
	if (YAJL_IS_NUMBER(v)) {
		if (!(v->u.number.flags & YAJL_NUMBER_INT_VALID) || v->u.number.i < 0 ||
		    (uint64_t)v->u.number.i > max)
			return 0;
		*out = (uint64_t)v->u.number.i;
		return 1;
	}
	if (YAJL_IS_STRING(v)) {
		const char *s = v->u.string;
		size_t n = strlen(s);
		if (n == 0 || n > 19)
			return 0;
		uint64_t r = 0;
		for (size_t i = 0; i < n; i++) {
			if (s[i] < '0' || s[i] > '9')
				return 0;
			r = r * 10 + (uint64_t)(s[i] - '0');
		}
		if (r > max)
			return 0;
		*out = r;
		return 1;
	}
	return 0;
}

static int tree_equal(yajl_val a, yajl_val b)
{
	if (a == NULL || b == NULL)
		return a == b;
	if (a->type != b->type)
		return 0;
	switch (a->type) {
	case yajl_t_string:
		return strcmp(a->u.string, b->u.string) == 0;
	case yajl_t_number:
		return strcmp(a->u.number.r, b->u.number.r) == 0 && a->u.number.flags == b->u.number.flags;
	case yajl_t_object:
		if (a->u.object.len != b->u.object.len)
			return 0;
		for (size_t i = 0; i < a->u.object.len; i++)
			if (strcmp(a->u.object.keys[i], b->u.object.keys[i]) != 0 ||
			    !tree_equal(a->u.object.values[i], b->u.object.values[i]))
				return 0;
		return 1;
	case yajl_t_array:
		if (a->u.array.len != b->u.array.len)
			return 0;
		for (size_t i = 0; i < a->u.array.len; i++)
			if (!tree_equal(a->u.array.values[i], b->u.array.values[i]))
				return 0;
		return 1;
	default:
		return 1;
	}
}

static int tree_depth(yajl_val v)
{
	int d = 0;
	if (YAJL_IS_OBJECT(v)) {
		for (size_t i = 0; i < v->u.object.len; i++) {
			int c = tree_depth(v->u.object.values[i]);
			d = c > d ? c : d;
		}
		return d + 1;
	}
	if (YAJL_IS_ARRAY(v)) {
		for (size_t i = 0; i < v->u.array.len; i++) {
			int c = tree_depth(v->u.array.values[i]);
			d = c > d ? c : d;
		}
		return d + 1;
	}
	return 0;
}

/* 1 when every string and key in the tree is valid UTF-8. */
static int tree_utf8_valid(yajl_val v)
{
	if (YAJL_IS_STRING(v))
		return ref_utf8_valid((const uint8_t *)v->u.string, strlen(v->u.string));
	if (YAJL_IS_OBJECT(v)) {
		for (size_t i = 0; i < v->u.object.len; i++)
			if (!ref_utf8_valid((const uint8_t *)v->u.object.keys[i], strlen(v->u.object.keys[i])) ||
			    !tree_utf8_valid(v->u.object.values[i]))
				return 0;
	}
	if (YAJL_IS_ARRAY(v)) {
		for (size_t i = 0; i < v->u.array.len; i++)
			if (!tree_utf8_valid(v->u.array.values[i]))
				return 0;
	}
	return 1;
}

/* 1 when a JSON string escape \u0000 occurs in p (an odd run of backslashes before u0000). */
static int has_nul_escape(const uint8_t *p, size_t len)
{
	for (size_t i = 0; i + 6 <= len; i++) {
		if (p[i] != '\\' || memcmp(p + i + 1, "u0000", 5) != 0)
			continue;
		size_t run = 0;
		while (run < i && p[i - 1 - run] == '\\')
			run++;
		if (run % 2 == 0)
			return 1;
	}
	return 0;
}

/* ---------------------------------------------------------------- invariants */

static void check_msg(int rc, const char *msg, size_t msglen)
{
	static const int known[] = {
		ERR_OK, ERR_JSON, ERR_SEQ_INVALID, ERR_NAME_INVALID, ERR_TOO_LARGE,
	};
	int ok = 0;
	for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++)
		ok |= rc == known[i];
	CHECK(ok);
	if (rc != ERR_OK)
		CHECK(memchr(msg, '\0', msglen) != NULL && msg[0] != '\0');
}

static void check_md5(yajl_val tree, const char md5[PROTO_MD5_HEX + 1])
{
	yajl_val v = json_member(tree, "md5");
	CHECK(YAJL_IS_STRING(v) && strlen(v->u.string) == PROTO_MD5_HEX);
	for (size_t i = 0; i < PROTO_MD5_HEX; i++) {
		char c = md5[i];
		CHECK((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'));
		char s = v->u.string[i];
		CHECK(s == c || (s >= 'A' && s <= 'F' && s + ('a' - 'A') == c));
	}
	CHECK(md5[PROTO_MD5_HEX] == '\0');
}

/* The reader's counted string equals the tree's C string (where the tree holds
 * U+0001 for \u0000, the reader has the NUL itself). */
static int same_text(const char *got, size_t len, const char *want)
{
	if (strlen(want) != len)
		return 0;
	for (size_t i = 0; i < len; i++)
		if (got[i] != want[i] && !(got[i] == '\0' && want[i] == '\1'))
			return 0;
	return 1;
}

/* Every string the reader hands out is a view of the body. */
static const uint8_t *body_start;
static size_t body_len;
static int in_body(const char *p, size_t len)
{
	return (const uint8_t *)p >= body_start && (const uint8_t *)p + len <= body_start + body_len;
}

static void check_name(yajl_val tree, const char *key, const char *name, size_t len)
{
	yajl_val v = json_member(tree, key);
	CHECK(YAJL_IS_STRING(v) && same_text(name, len, v->u.string) && in_body(name, len));
	CHECK(proto_name_valid(name, len));
	CHECK(ref_name_valid((const uint8_t *)name, len));
}

static void check_cred(yajl_val tree, const struct proto_limits *lim, int uid_required,
    const struct proto_credentials *c)
{
	if (c->anonymous) {
		CHECK(lim->anonymous && !uid_required);
		CHECK(json_member(tree, "uid") == NULL);
		CHECK(c->uid == 0 && c->token == NULL && c->token_len == 0);
		return;
	}
	uint64_t uid;
	CHECK(ref_u64(tree, "uid", JSON_MAX_SAFE_INT, &uid) && uid == c->uid);
	yajl_val t = json_member(tree, "token");
	CHECK(YAJL_IS_STRING(t) && same_text(c->token, c->token_len, t->u.string) && in_body(c->token, c->token_len));
	CHECK(c->token_len >= 1 && c->token_len <= PROTO_TOKEN_MAX);
}

static void run_chunk(yajl_val tree, const struct proto_fields *f, int kind, const struct proto_limits *lim,
    size_t cap)
{
	uint8_t *data = malloc(cap ? cap : 1);
	CHECK(data != NULL);
	struct proto_chunk ch;
	char msg[256];
	msg[0] = '\0';
	int rc = proto_parse_chunk(f, kind, lim, &ch, msg, sizeof(msg));
	if (rc == ERR_OK) {
		CHECK(in_body(ch.data_b64, ch.data_b64_len));
		rc = proto_decode_chunk(&ch, data, cap, msg, sizeof(msg));
	}
	check_msg(rc, msg, sizeof(msg));
	if (rc == ERR_OK) {
		check_md5(tree, ch.md5);
		check_name(tree, "name", ch.name, ch.name_len);
		uint64_t v;
		CHECK(ref_u64(tree, "seq", JSON_MAX_SAFE_INT, &v) && v == ch.seq && ch.seq >= 1);
		CHECK(ref_u64(tree, "trans_size", JSON_MAX_SAFE_INT, &v) && v == ch.trans_size);
		CHECK(ref_u64(tree, "total_size", JSON_MAX_SAFE_INT, &v) && v == ch.total_size);
		CHECK(ch.total_size <= lim->max_file_size);
		CHECK(ch.trans_size <= ch.total_size);
		CHECK(ch.data_len <= cap);
		CHECK(ch.data_len <= ch.trans_size);
		CHECK(ch.offset + ch.data_len == ch.trans_size);
		CHECK(ch.seq != 1 || ch.offset == 0);
		CHECK(ch.last == 0 || ch.last == 1);
		CHECK(!ch.last || ch.trans_size == ch.total_size);
		if (ch.has_last_seq)
			CHECK(ref_u64(tree, "last_seq", JSON_MAX_SAFE_INT, &v) && v == ch.last_seq);
		else
			CHECK(json_member(tree, "last_seq") == NULL);
		/* The decoded bytes are the base64 text, decoded strictly. */
		yajl_val d = json_member(tree, "data");
		CHECK(YAJL_IS_STRING(d));
		size_t dlen = strlen(d->u.string);
		uint8_t *ref = malloc(dlen / 4 * 3 + 1);
		CHECK(ref != NULL);
		long n = ref_b64_decode(d->u.string, dlen, ref);
		CHECK(n >= 0 && (size_t)n == ch.data_len);
		CHECK(n == 0 || memcmp(ref, data, (size_t)n) == 0);
		free(ref);
		check_cred(tree, lim, kind == UPLOAD_AVATAR, &ch.cred);
		if (kind == UPLOAD_AVATAR)
			CHECK(!ch.cred.anonymous);
	}
	free(data);
}

static void run_sync(yajl_val tree, const struct proto_fields *f, const struct proto_limits *lim)
{
	struct proto_sync s;
	char msg[256];
	msg[0] = '\0';
	int rc = proto_parse_sync(f, lim, &s, msg, sizeof(msg));
	check_msg(rc, msg, sizeof(msg));
	if (rc == ERR_OK) {
		check_md5(tree, s.md5);
		check_cred(tree, lim, 0, &s.cred);
	}
}

static void run_download(yajl_val tree, const struct proto_fields *f, const struct proto_limits *lim)
{
	struct proto_download d;
	char msg[256];
	msg[0] = '\0';
	int rc = proto_parse_download(f, lim, &d, msg, sizeof(msg));
	check_msg(rc, msg, sizeof(msg));
	/* Whatever the result, name, seq and client_path (echoed by error answers too) are the
	 * request's when they have their form, else empty. */
	yajl_val nv = json_member(tree, "name"), pv = json_member(tree, "client_path");
	CHECK(YAJL_IS_STRING(nv) ? d.name && same_text(d.name, d.name_len, nv->u.string) && in_body(d.name, d.name_len)
	    : d.name == NULL && d.name_len == 0);
	CHECK(YAJL_IS_STRING(pv) ? d.client_path && same_text(d.client_path, d.client_path_len, pv->u.string) &&
	    in_body(d.client_path, d.client_path_len) : d.client_path == NULL && d.client_path_len == 0);
	uint64_t sv;
	CHECK(ref_u64(tree, "seq", JSON_MAX_SAFE_INT, &sv) ? d.seq == sv : d.seq == 0);
	if (rc == ERR_OK) {
		check_name(tree, "name", d.name, d.name_len);
		uint64_t v;
		CHECK(ref_u64(tree, "seq", JSON_MAX_SAFE_INT, &v) && v == d.seq && d.seq >= 1);
		yajl_val cp = json_member(tree, "client_path");
		if (cp == NULL) {
			CHECK(d.client_path == NULL);
		} else {
			CHECK(YAJL_IS_STRING(cp) && same_text(d.client_path, d.client_path_len, cp->u.string));
			CHECK(in_body(d.client_path, d.client_path_len));
		}
		check_cred(tree, lim, 0, &d.cred);
	}
}

/* The output of the writer must parse, to the same tree. */
static void reparse(const uint8_t *out, size_t len, yajl_val want_members, const char *key, yajl_val want_value)
{
	char err[256];
	yajl_val back = json_parse_object(out, len, err, sizeof(err));
	CHECK(back != NULL);
	if (want_members != NULL)
		CHECK(tree_equal(back, want_members));
	if (key != NULL)
		CHECK(back->u.object.len == 1 && strcmp(back->u.object.keys[0], key) == 0 &&
		    tree_equal(back->u.object.values[0], want_value));
	yajl_tree_free(back);
}

/* One object of at most JSON_MAX_MEMBERS scalar members. */
static int tree_is_flat(yajl_val tree)
{
	if (!YAJL_IS_OBJECT(tree) || tree->u.object.len > JSON_MAX_MEMBERS)
		return 0;
	for (size_t i = 0; i < tree->u.object.len; i++)
		if (YAJL_IS_OBJECT(tree->u.object.values[i]) || YAJL_IS_ARRAY(tree->u.object.values[i]))
			return 0;
	return 1;
}

/* Each known field holds the first value the tree has for its key. */
static void check_fields(yajl_val tree, const struct proto_fields *f)
{
	static const char *const keys[PF_COUNT] = {
		[PF_DATA] = "data", [PF_MD5] = "md5", [PF_NAME] = "name", [PF_SEQ] = "seq",
		[PF_TRANS_SIZE] = "trans_size", [PF_TOTAL_SIZE] = "total_size", [PF_LAST] = "last",
		[PF_LAST_SEQ] = "last_seq", [PF_UID] = "uid", [PF_TOKEN] = "token", [PF_CLIENT_PATH] = "client_path",
	};
	for (int i = 0; i < PF_COUNT; i++) {
		yajl_val v = json_member(tree, keys[i]);
		const struct json_scalar *s = &f->v[i];
		if (v == NULL) {
			CHECK(s->kind == JSON_NONE);
		} else if (YAJL_IS_STRING(v)) {
			CHECK(s->kind == JSON_STRING && same_text(s->s, s->len, v->u.string) && in_body(s->s, s->len));
		} else if (YAJL_IS_NUMBER(v)) {
			CHECK(s->kind == JSON_NUMBER && strlen(v->u.number.r) == s->len &&
			    memcmp(v->u.number.r, s->s, s->len) == 0 && in_body(s->s, s->len));
		} else if (YAJL_IS_TRUE(v)) {
			CHECK(s->kind == JSON_TRUE);
		} else if (YAJL_IS_FALSE(v)) {
			CHECK(s->kind == JSON_FALSE);
		} else {
			CHECK(YAJL_IS_NULL(v) && s->kind == JSON_NULL);
		}
	}
}

static void run_writer(yajl_val tree)
{
	const uint8_t *out;
	size_t len;
	/* Each member copied, as 1001 echoes data: the same depth as the request. */
	json_begin(&jw);
	for (size_t i = 0; i < tree->u.object.len; i++)
		json_put_value(&jw, tree->u.object.keys[i], tree->u.object.values[i]);
	json_end(&jw, &out, &len);
	reparse(out, len, tree, NULL, NULL);

	/* The whole tree one level down, while that stays within the depth limit. */
	if (tree_depth(tree) < JSON_MAX_DEPTH) {
		json_begin(&jw);
		json_put_value(&jw, "data", tree);
		json_end(&jw, &out, &len);
		reparse(out, len, NULL, "data", tree);
	}

	/* The 1001 answer itself. */
	json_begin(&jw);
	json_put_int(&jw, "error", 0);
	yajl_val data = json_member(tree, "data");
	if (data)
		json_put_value(&jw, "data", data);
	else
		json_put_str(&jw, "data", "", 0);
	json_end(&jw, &out, &len);
	reparse(out, len, NULL, NULL, NULL);
}

/* escape.c on any bytes: the output is one quoted field (no raw quote, a backslash only before an
 * escape, no control byte), it gives back the input when unescaped, and utf8_prefix never splits a
 * valid character. */
static void check_escape(const uint8_t *data, size_t size)
{
	static char out[ESCAPE_SIZE(4096)];
	static uint8_t back[4096];
	if (size > 4096)
		size = 4096;
	size_t n = escape_quoted(out, sizeof(out), (const char *)data, size);
	CHECK(n < sizeof(out) && out[n] == '\0');
	size_t k = 0;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)out[i];
		CHECK(c >= 0x20 && c != 0x7f && c != '"');
		if (c != '\\') {
			back[k++] = c;
			continue;
		}
		CHECK(i + 1 < n);
		if (out[i + 1] == 'x') {
			CHECK(i + 3 < n);
			char hex[3] = { out[i + 2], out[i + 3], 0 };
			back[k++] = (uint8_t)strtoul(hex, NULL, 16);
			i += 3;
		} else {
			CHECK(out[i + 1] == '"' || out[i + 1] == '\\');
			back[k++] = (uint8_t)out[++i];
		}
	}
	CHECK(k == size && memcmp(back, data, size) == 0);
	/* Boundaries: a valid character is one unit, any other byte is one unit. */
	for (size_t max = 0; max <= size && max < 80; max++) {
		size_t cut = utf8_prefix((const char *)data, size, max), i = 0;
		CHECK(cut <= max);
		while (i < cut) {
			size_t u = json_utf8_seq(data + i, size - i);
			i += u ? u : 1;
		}
		CHECK(i == cut);   /* the cut is on a boundary */
		if (cut < size) {
			size_t u = json_utf8_seq(data + cut, size - cut);
			CHECK(cut + (u ? u : 1) > max);   /* and the longest one within max */
		}
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	/* Half the inputs have json_read_flat read every plain string past yajl (json.c
	 * json_read_flat_raw), half none: both must agree with the tree below. */
	json_elide_min = size % 2 ? 1 : SIZE_MAX;

	/* The raw bytes as a name. */
	CHECK(proto_name_valid((const char *)data, size) == ref_name_valid(data, size));
	check_escape(data, size);

	char err[256], err2[256];
	err[0] = err2[0] = '\0';
	yajl_val tree = json_parse_request(data, size, err, sizeof(err));
	yajl_val plain = json_parse_object(data, size, err2, sizeof(err2));
	if (plain != NULL) {
		/* The two parsers differ only on \u0000. */
		CHECK(tree != NULL && tree_equal(tree, plain));
		CHECK(!has_nul_escape(data, size));
		CHECK(YAJL_IS_OBJECT(plain) && tree_utf8_valid(plain) && tree_depth(plain) <= JSON_MAX_DEPTH);
		run_writer(plain);
		yajl_tree_free(plain);
	} else {
		CHECK(memchr(err2, '\0', sizeof(err2)) != NULL && err2[0] != '\0');
		if (tree != NULL)
			CHECK(has_nul_escape(data, size));
	}
	/* The flat reader, on a copy (it decodes escaped strings in place). */
	uint8_t *copy = malloc(size ? size : 1);
	CHECK(copy != NULL);
	memcpy(copy, data, size);
	body_start = copy;
	body_len = size;
	struct proto_fields f;
	char err3[256];
	err3[0] = '\0';
	int flat_ok = proto_read_request(copy, size, &f, err3, sizeof(err3)) == ERR_OK;
	CHECK(flat_ok || (memchr(err3, '\0', sizeof(err3)) != NULL && err3[0] != '\0'));
	CHECK(flat_ok == (tree != NULL && tree_is_flat(tree)));
	if (tree == NULL) {
		CHECK(memchr(err, '\0', sizeof(err)) != NULL && err[0] != '\0');
		free(copy);
		return 0;
	}
	if (flat_ok)
		check_fields(tree, &f);
	CHECK(YAJL_IS_OBJECT(tree));
	/* What the parser promises: no NUL in the body or its strings, valid UTF-8
	 * throughout (no unpaired surrogate escapes), nesting within the limit. */
	CHECK(memchr(data, '\0', size) == NULL);
	CHECK(tree_depth(tree) <= JSON_MAX_DEPTH);
	CHECK(ref_utf8_valid(data, size));
	CHECK(tree_utf8_valid(tree));

	static const uint64_t max_sizes[] = { 4294967296u, 16 };
	/* The worker's scratch buffer holds any chunk of a max_frame body; also try one that is too small. */
	const size_t caps[] = { proto_b64_decoded_max(size), 4 };
	for (int kind = UPLOAD_FILE; flat_ok && kind <= UPLOAD_AVATAR; kind++)
		for (int anon = 0; anon <= 1; anon++)
			for (size_t m = 0; m < sizeof(max_sizes) / sizeof(max_sizes[0]); m++)
				for (size_t c = 0; c < sizeof(caps) / sizeof(caps[0]); c++) {
					struct proto_limits lim = { .max_file_size = max_sizes[m], .anonymous = anon };
					run_chunk(tree, &f, kind, &lim, caps[c]);
				}
	for (int anon = 0; flat_ok && anon <= 1; anon++) {
		struct proto_limits lim = { .max_file_size = 4294967296u, .anonymous = anon };
		run_sync(tree, &f, &lim);
		run_download(tree, &f, &lim);
	}
	{
		/* 1001's reader: it accepts whatever the flat reader does, only what the tree
		 * parser accepts, and its raw data is the text of the tree's data. */
		uint8_t *copy2 = malloc(size ? size : 1);
		CHECK(copy2 != NULL);
		memcpy(copy2, data, size);
		struct proto_fields t;
		int test_ok = proto_read_test(copy2, size, &t, err3, sizeof(err3)) == ERR_OK;
		CHECK(!flat_ok || test_ok);
		CHECK(!test_ok || tree != NULL);
		if (test_ok && t.v[PF_DATA].kind == JSON_RAW) {
			char e[256];
			yajl_val raw = json_parse_request((const uint8_t *)t.v[PF_DATA].s, t.v[PF_DATA].len, e, sizeof(e));
			yajl_val sent = json_member(tree, "data");
			if (raw != NULL)   /* an object parses alone; an array is checked inside one below */
				CHECK(tree_equal(raw, sent));
			yajl_tree_free(raw);
			char *wrapped = malloc(t.v[PF_DATA].len + 16);
			CHECK(wrapped != NULL);
			int n = sprintf(wrapped, "{\"data\":");
			memcpy(wrapped + n, t.v[PF_DATA].s, t.v[PF_DATA].len);
			wrapped[n + t.v[PF_DATA].len] = '}';
			yajl_val back = json_parse_request((const uint8_t *)wrapped, (size_t)n + t.v[PF_DATA].len + 1, e, sizeof(e));
			CHECK(back != NULL && tree_equal(json_member(back, "data"), sent));
			yajl_tree_free(back);
			free(wrapped);
		}
		free(copy2);
	}
	if (flat_ok) {
		/* The 1001 answer as the worker writes it: it parses, with data as sent. */
		const uint8_t *out;
		size_t len;
		json_begin(&jw);
		json_put_int(&jw, "error", 0);
		if (f.v[PF_DATA].kind != JSON_NONE)
			json_put_scalar(&jw, "data", &f.v[PF_DATA]);
		else
			json_put_str(&jw, "data", "", 0);
		json_end(&jw, &out, &len);
		char e[256];
		yajl_val back = json_parse_request(out, len, e, sizeof(e));
		CHECK(back != NULL);
		yajl_val sent = json_member(tree, "data");
		if (sent != NULL)
			CHECK(tree_equal(json_member(back, "data"), sent));
		yajl_tree_free(back);
	}
	free(copy);
	/* The writer on the request tree too (it may hold U+0001 for \u0000). */
	run_writer(tree);
	yajl_tree_free(tree);
	return 0;
}

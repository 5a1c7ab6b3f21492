# test_hostile.py: a table of hostile and malformed inputs against one running daemon; after each one the server must still serve.
"""Each input is sent on a fresh connection and has one expected outcome: a response with id = request id + 1
carrying an error code of PROTOCOL.md (and then the same connection must still answer a 1001), or the
connection closed (framing errors). After each input a fresh connection must still get 1001 answered.
Meanwhile a background thread uploads a 4 MB file in 16 KiB chunks on its own connection, paced so that its
chunks are spread over the whole table; it must end byte-identical. Nothing may appear outside the storage
root, nothing refused may be published, and no daemon process may die."""
import base64
import glob
import itertools
import json
import os
import sys
import threading
import time

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=170)

MAX_FRAME = 262144
MAX_FILE = 64 * 1024 * 1024
FRAME_TIMEOUT = 2
CH = 16384                       # chunk size of the uploads made here
A, B, BG = 3001, 3002, 3003      # users with tokens; BG runs the background upload
NOKEY = 3999                     # a uid without a utoken_ key
TOK = {A: "tok-A-3001-secret", B: "tok-B-3002-other", BG: "tok-BG-3003-bg"}
BIG_UID = 2 ** 53 + 1            # 9007199254740993: not a double; 2^53 gets a token as a trap
TRAP_UID = 2 ** 53
TRAP_TOKEN = "tok-trap-2-53"
rand = __import__("random").Random(4242)


def rbytes(n):
    return rand.randbytes(n)


# ---------------------------------------------------------------- servers
redis = h.RedisServer().start()
for uid, tok in TOK.items():
    redis.set_token(uid, tok)
redis.set_token(TRAP_UID, TRAP_TOKEN)

d = h.Daemon(workers=2, redis=redis, settings={
    "server": {"max_frame": MAX_FRAME, "frame_timeout": FRAME_TIMEOUT, "idle_timeout": 300,
               "storage_timeout": 10, "download_chunk": 4096},
    "storage": {"max_file_size": MAX_FILE},
})
tap.context.append(lambda: d.log_tail(12))
d.start_or_finish(tap)
tap.ok(d.wait_redis_connected(15), "daemon started; workers and storage connected to Redis")
pids_at_start = (sorted(d.worker_pids()), d.storage_pid())


def published(uid, name):
    return h.published(d, uid, name)   # with RESOURCED_TEST_BACKEND=rados: a copy fetched from RADOS


def outside_tree():
    """Everything in the daemon's temp dir except the storage root and the log."""
    return {p for p in h.file_tree(d.dir) if not (p == "root/" or p.startswith("root/") or p == "daemon.log"
                                                  or p.startswith("rados-view/"))}


def passwd_state():
    st = os.stat("/etc/passwd")
    return st.st_size, st.st_mtime_ns, h.file_md5("/etc/passwd")


# ---------------------------------------------------------------- fixtures: published files, an upload in progress
fixtures_ok = True
mine = h.Upload(rbytes(3 * 4096 + 5), "mine.bin", A, TOK[A], chunk_size=CH)
secret = h.Upload(rbytes(5000), "secret-b.bin", B, TOK[B], chunk_size=CH)
for up in (mine, secret):
    with h.Client(d.port) as c:
        r, _, _ = up.run(c)
    fixtures_ok &= tap.ok(r.get("error") == 0 and h.read_file(published(up.uid, up.name)) == up.data,
                          "fixture: uid %d's %s published" % (up.uid, up.name), repr(r))

pending = h.Upload(rbytes(4 * CH), "pending-a.bin", A, TOK[A], chunk_size=CH)   # 2 of 4 chunks in, kept
with h.Client(d.port) as c:
    r, _, _ = pending.run(c, max_chunks=2)
    s = pending.sync(c)
fixtures_ok &= tap.ok(r.get("error") == 0 and s.get("error") == 0 and s.get("trans_size") == 2 * CH,
                      "fixture: uid %d's upload %s in progress at %d bytes" % (A, pending.name, 2 * CH), repr(s))
staging = sorted(glob.glob(os.path.join(d.root, ".staging", "*%s*" % pending.md5)))
if h.uses_rados(d):
    tap.ok(h.staging_entries(d, A, pending.md5), "fixture: %s has a staging entry in RADOS" % pending.name,
           repr(h.rados_staging(d)))
else:
    tap.ok(staging, "fixture: the staging files of %s are under <root>/.staging" % pending.name,
           "found %r; .staging holds %r" % (staging, sorted(os.listdir(os.path.join(d.root, ".staging")))
                                            if os.path.isdir(os.path.join(d.root, ".staging")) else "(no .staging)"))
staging_names = [os.path.basename(p) for p in staging] or ["%d-%s.part" % (A, pending.md5)]
if not fixtures_ok:
    tap.finish()

tree_before = outside_tree()
passwd_before = passwd_state()


# ---------------------------------------------------------------- the background upload
class Background:
    """Uploads 4 MB in 16 KiB chunks on one connection, chunk k only once the table is k/n of the way through."""

    def __init__(self):
        self.up = h.Upload(rbytes(4 * 1024 * 1024), "background.bin", BG, TOK[BG], chunk_size=CH)
        self.n = self.up.last_seq
        self.cond = threading.Condition()
        self.progress = 0.0
        self.table_done = False
        self.sent_during_table = 0
        self.result = None
        self.error = None
        self.thread = threading.Thread(target=self.run, daemon=True)

    def advance(self, fraction, done=False):
        with self.cond:
            self.progress = fraction
            self.table_done = self.table_done or done
            self.cond.notify_all()

    def run(self):
        try:
            with h.Client(d.port, timeout=30) as c:
                offset, seq = 0, 1
                for k in range(self.n):
                    with self.cond:
                        self.cond.wait_for(lambda: self.table_done or self.progress >= k / self.n, 150)
                        during = not self.table_done
                    r = self.up.send_chunk(c, offset, seq, timeout=30)
                    if during:
                        self.sent_during_table += 1
                    if r.get("error") != 0:
                        self.result = r
                        return
                    offset, seq = self.up.next_offset(offset), seq + 1
                self.result = r
        except Exception as e:
            self.error = e


bg = Background()
bg.thread.start()


# ---------------------------------------------------------------- the table
CLOSED = "closed"
DEL = object()


class Case:
    """One hostile input: data to send; want is an error code, a tuple of acceptable codes, CLOSED, or a
    callable(client, label) -> (ok, diag) doing its own exchange; post(client, response) -> (ok, diag) checks
    that nothing changed."""

    def __init__(self, label, data, rid, want, post=None, send=None):
        self.label, self.data, self.rid, self.want, self.post, self.send = label, data, rid, want, post, send


cases = []
counter = itertools.count(1)


def add(label, data, rid, want, post=None, send=None):
    cases.append(Case(label, data, rid, want, post, send))


def raw_frame(msg_id, body_bytes, length=None):
    return h.HEADER.pack(msg_id, len(body_bytes) if length is None else length) + body_bytes


def nothing_started(up):
    """post check of a refused 1003: no upload record for (uid, md5), nothing published."""
    def post(c, r):
        s = c.request(h.MSG_SYNC, {"md5": up.md5, "uid": A, "token": TOK[A]})
        pub = os.path.exists(published(up.uid, up.name))
        return s.get("error") == 1012 and not pub, "sync after it: %r; published: %r" % (s, pub)
    return post


def fresh_upload(size=100, uid=A):
    return h.Upload(rbytes(size), "hostile-%03d.bin" % next(counter), uid, TOK.get(uid, "x"), chunk_size=CH)


def upload(label, want, override=None, delete=(), msg_id=h.MSG_UPLOAD, up=None, check=True):
    """A valid single-chunk upload of a fresh 100-byte file with fields replaced or removed."""
    up = up or fresh_upload()
    body = up.body(0, 1)
    for k, v in (override or {}).items():
        if v is DEL:
            body.pop(k, None)
        else:
            body[k] = v
    for k in delete:
        body.pop(k, None)
    add(label, h.frame(msg_id, body), msg_id + 1, want, nothing_started(up) if check else None)


def upload_raw_name(label, want, name_json_bytes):
    """A valid single-chunk upload whose "name" value is the given raw JSON text."""
    up = fresh_upload()
    body = json.dumps(up.body(0, 1, name="@@NAME@@")).encode()
    body = body.replace(b'"@@NAME@@"', name_json_bytes)
    add(label, raw_frame(h.MSG_UPLOAD, body), h.MSG_UPLOAD + 1, want, nothing_started(up))


def pending_unchanged(c, r):
    s = pending.sync(c)
    ok = s.get("error") == 0 and s.get("trans_size") == 2 * CH and s.get("seq") == 2
    return ok, "sync of %s afterwards: %r" % (pending.name, s)


def dl_body(name, uid=A, token=None, seq=1, **extra):
    b = {"name": name, "seq": seq, "uid": uid, "token": TOK[A] if token is None else token,
         "client_path": "C:/Users/x/Downloads/" + (name if isinstance(name, str) else "x"),
         "trans_size": "0", "total_size": "0"}
    b.update(extra)
    return b


def download(label, want, name, **kw):
    add(label, h.frame(h.MSG_DOWNLOAD, dl_body(name, **kw)), h.MSG_DOWNLOAD + 1, want)


# ---- framing
add("header length max_frame + 1 (header only)", raw_frame(h.MSG_TEST, b"", MAX_FRAME + 1), None, CLOSED)
add("header length 2^32-1", raw_frame(h.MSG_TEST, b"", 2 ** 32 - 1), None, CLOSED)
add("header length 2^31 on a 1003", raw_frame(h.MSG_UPLOAD, b"", 2 ** 31), None, CLOSED)
add("header length max_frame + 1 with the whole body sent",
    raw_frame(h.MSG_TEST, b'{"data":"' + b"x" * (MAX_FRAME - 10) + b'"}'), None, CLOSED)
add("length 0 body on 1001", raw_frame(h.MSG_TEST, b""), h.MSG_TEST + 1, 1001)
add("length 0 body on 1003", raw_frame(h.MSG_UPLOAD, b""), h.MSG_UPLOAD + 1, 1001)
add("body of whitespace only", raw_frame(h.MSG_TEST, b"  \n\t "), h.MSG_TEST + 1, 1001)


def one_byte_writes(c, label):
    fr = h.frame(h.MSG_TEST, {"data": "dribbled"})
    for i in range(len(fr)):
        c.send_raw(fr[i:i + 1])
        time.sleep(0.003)
    r = c.recv_json(h.MSG_TEST + 1)
    return r.get("error") == 0 and r.get("data") == "dribbled", repr(r)


def split_header(c, label):
    fr = h.frame(h.MSG_TEST, {"data": "split"})
    for part in (fr[:1], fr[1:3], fr[3:5], fr[5:6], fr[6:]):
        c.send_raw(part)
        time.sleep(0.1)
    r = c.recv_json(h.MSG_TEST + 1)
    return r.get("error") == 0 and r.get("data") == "split", repr(r)


def exact_max_frame(c, label):
    head = b'{"data":"'
    body = head + b"y" * (MAX_FRAME - len(head) - 2) + b'"}'
    assert len(body) == MAX_FRAME
    c.send_raw(raw_frame(h.MSG_TEST, body))
    r = c.recv_json(h.MSG_TEST + 1)
    return r.get("error") == 0 and r.get("data") == "y" * (MAX_FRAME - len(head) - 2), \
        "error %r, data length %d" % (r.get("error"), len(r.get("data") or ""))


def half_frame_then_close(c, label):
    fr = h.frame(h.MSG_UPLOAD, fresh_upload(5000).body(0, 1))
    c.send_raw(fr[:len(fr) // 2])
    c.close()
    return True, ""


def slow_drip(c, label):
    fr = h.frame(h.MSG_TEST, {"data": "never finished"})
    t0 = time.monotonic()
    c.send_raw(fr[:10])
    closed = c.wait_closed(FRAME_TIMEOUT + 4)
    took = time.monotonic() - t0
    return closed and took >= FRAME_TIMEOUT - 0.5, "closed %r after %.1f s (frame_timeout %d s)" % (
        closed, took, FRAME_TIMEOUT)


def pipelined_bad_then_good(c, label):
    c.send_raw(raw_frame(h.MSG_UPLOAD, b"{not json") + h.frame(h.MSG_TEST, {"data": "after"}) +
               h.frame(9999, {"data": "x"}) + h.frame(h.MSG_TEST, {"data": "last"}))
    got = [c.recv_json(h.MSG_UPLOAD + 1).get("error"), c.recv_json(h.MSG_TEST + 1).get("data"),
           c.recv_json(10000).get("error"), c.recv_json(h.MSG_TEST + 1).get("data")]
    return got == [1001, "after", 1022, "last"], "answers in order: %r" % got


add("header and body in 1-byte writes, then a valid 1001 answered", None, None, one_byte_writes)
add("header split over 4 writes 0.1 s apart", None, None, split_header)
add("body of exactly max_frame bytes is served", None, None, exact_max_frame)
add("half a 1003 frame, then the client closes", None, None, half_frame_then_close)
add("a started frame never finished (slow drip) closed after frame_timeout", None, None, slow_drip)
add("bad frame, ping, unknown id, ping in one write: answered in order", None, None, pipelined_bad_then_good)

# ---- bodies that are not a JSON object
add("body not JSON (plain text)", raw_frame(h.MSG_UPLOAD, b"hello, server"), h.MSG_UPLOAD + 1, 1001)
add("body a JSON array", raw_frame(h.MSG_UPLOAD, b"[1,2,3]"), h.MSG_UPLOAD + 1, 1001)
add("body a JSON string", raw_frame(h.MSG_UPLOAD, b'"md5"'), h.MSG_UPLOAD + 1, 1001)
add("body a JSON number", raw_frame(h.MSG_TEST, b"42"), h.MSG_TEST + 1, 1001)
add("body JSON true", raw_frame(h.MSG_DOWNLOAD, b"true"), h.MSG_DOWNLOAD + 1, 1001)
add("body JSON null", raw_frame(h.MSG_SYNC, b"null"), h.MSG_SYNC + 1, 1001)
add("truncated JSON object", raw_frame(h.MSG_TEST, b'{"data": "x",'), h.MSG_TEST + 1, 1001)
add("single-quoted pseudo JSON", raw_frame(h.MSG_TEST, b"{'data': 'x'}"), h.MSG_TEST + 1, 1001)
add("trailing garbage after the object", raw_frame(h.MSG_TEST, b'{"data": "x"} junk'), h.MSG_TEST + 1, 1001)
add("two objects in one body", raw_frame(h.MSG_TEST, b'{"data": "x"}{"data": "y"}'), h.MSG_TEST + 1, 1001)
add("10000 unclosed '['", raw_frame(h.MSG_UPLOAD, b"[" * 10000), h.MSG_UPLOAD + 1, 1001)
add("10000 '[' closed again", raw_frame(h.MSG_UPLOAD, b"[" * 10000 + b"]" * 10000), h.MSG_UPLOAD + 1, 1001)
add("50000 unclosed '{\"a\":' (250000 bytes)", raw_frame(h.MSG_TEST, b'{"a":' * 50000), h.MSG_TEST + 1, 1001)


def nested_echo(c, label):
    depth = 10000
    c.send_raw(raw_frame(h.MSG_TEST, b'{"data":' + b"[" * depth + b"]" * depth + b"}"))
    r = c.recv_json(h.MSG_TEST + 1)
    if r.get("error") == 0:
        v, n = r.get("data"), 0
        while isinstance(v, list) and v:
            v, n = v[0], n + 1
        return n + 1 == depth and v == [], "echoed %d levels" % (n + 1)
    return r.get("error") == 1001, repr(r)[:200]


add("an object holding 10000 nested arrays on 1001 (refused 1001 or echoed whole)", None, None, nested_echo)
body = json.dumps(fresh_upload().body(0, 1), indent=2)
add("JSON with a // comment", raw_frame(h.MSG_UPLOAD, body.replace("{\n", "{\n  // hi\n", 1).encode()),
    h.MSG_UPLOAD + 1, 1001)
add("JSON with a /* comment */", raw_frame(h.MSG_TEST, b'{"data": /* ] ] } */ "x"}'), h.MSG_TEST + 1, 1001)
add("raw NUL byte inside a string", raw_frame(h.MSG_TEST, b'{"data": "a\x00b"}'), h.MSG_TEST + 1, 1001)
add("raw NUL byte after the object", raw_frame(h.MSG_TEST, b'{"data": "ab"}\x00'), h.MSG_TEST + 1, 1001)
add("invalid UTF-8 (0xff) in a string", raw_frame(h.MSG_TEST, b'{"data": "a\xffb"}'), h.MSG_TEST + 1, 1001)
add("overlong UTF-8 (C0 AF) in a string", raw_frame(h.MSG_TEST, b'{"data": "a\xc0\xafb"}'), h.MSG_TEST + 1, 1001)
add("UTF-8-encoded surrogate (ED A0 80)", raw_frame(h.MSG_TEST, b'{"data": "\xed\xa0\x80"}'), h.MSG_TEST + 1, 1001)
add("truncated UTF-8 sequence at the end of a string", raw_frame(h.MSG_TEST, b'{"data": "a\xe2\x82"}'),
    h.MSG_TEST + 1, 1001)


def nul_escape_echo(c, label):
    c.send(h.MSG_TEST, {"data": "a\x00b"})
    r = c.recv_json(h.MSG_TEST + 1)
    if r.get("error") == 0:
        return r.get("data") == "a\x00b", "1001 data \"a\\u0000b\" echoed as %r (raw %r)" % (r.get("data"), c.last_raw)
    return r.get("error") == 1001, repr(r)


def escaped_backslash_echo(c, label):
    c.send_raw(raw_frame(h.MSG_TEST, b'{"data": "\\\\u0000 and \\\\\\u0041"}'))
    r = c.recv_json(h.MSG_TEST + 1)
    return r.get("error") == 0 and r.get("data") == "\\u0000 and \\A", "raw answer %r" % c.last_raw


add("\\u0000 escape in 1001 data: echoed exactly or refused 1001", None, None, nul_escape_echo)
add("escaped backslash before u0000 (\\\\u0000) is plain text, echoed", None, None, escaped_backslash_echo)

# ---- huge fields
add("1001 data of max_frame - 100 bytes echoed", None, None,
    lambda c, l: (lambda r: (r.get("error") == 0 and r.get("data") == "z" * (MAX_FRAME - 100),
                             "error %r, %d bytes" % (r.get("error"), len(r.get("data") or ""))))(
        c.request(h.MSG_TEST, {"data": "z" * (MAX_FRAME - 100)})))
upload("name of 250000 bytes", 1023, {"name": "n" * 250000})
upload("md5 of 250000 bytes", 1001, {"md5": "a" * 250000})
upload("token of 250000 bytes", (1001, 1010), {"token": "t" * 250000})
upload("data of 250000 base64 characters with trans_size 100", 1001,
       {"data": base64.b64encode(b"d" * 187500).decode()})
download("1033 name of 250000 bytes", 1023, "m" * 250000, client_path="C:/x")

# ---- NUL and control characters, bad UTF-8 in names
upload("name with \\u0000 escape", 1023, {"name": "a\x00b.bin"})
upload("md5 with \\u0000 escape", 1001, {"md5": "0" * 31 + "\x00"})
upload_raw_name("name with invalid UTF-8 byte 0xff", (1001, 1023), b'"bad\xff.bin"')
upload_raw_name("name with a lone high surrogate escape \\ud800", (1001, 1023), b'"x\\ud800y.bin"')
upload_raw_name("name with a lone low surrogate escape \\udc00", (1001, 1023), b'"x\\udc00y.bin"')
upload("name '..'", 1023, {"name": ".."})
upload("name '.'", 1023, {"name": "."})
upload("name 'a/b'", 1023, {"name": "a/b"})
upload("name '/etc/passwd'", 1023, {"name": "/etc/passwd"})
upload("name '../escape-hostile'", 1023, {"name": "../escape-hostile"})
upload("name '../../escape-hostile'", 1023, {"name": "../../escape-hostile"})
upload("name '.hidden'", 1023, {"name": ".hidden"})
upload("name '.staging'", 1023, {"name": ".staging"})
upload("name 'a\\\\b'", 1023, {"name": "a\\b"})
upload("name of 256 ASCII bytes", 1023, {"name": "x" * 256})
upload("name of 256 bytes in 128 two-byte characters", 1023, {"name": "\u00e9" * 128})
upload("name empty", 1023, {"name": ""})
upload("name with \\u0001", 1023, {"name": "a\x01b"})
upload("name with \\u001f", 1023, {"name": "a\x1fb"})
upload("name with a raw DEL (0x7f) byte", 1023, {"name": "a\x7fb"})
upload_raw_name("name with \\u007f escape", 1023, b'"a\\u007fb"')
upload("name with a newline", 1023, {"name": "a\nb"})
upload("name with C1 control U+0085", 1023, {"name": "a\u0085b"})
upload("avatar 1031 with name '../x.png'", 1023, {"name": "../x.png"}, msg_id=h.MSG_AVATAR)

# ---- every 1003 field missing in turn
for field in ("md5", "name", "seq", "trans_size", "total_size", "last", "data", "uid", "token"):
    upload("1003 without %s" % field, 1001, delete=(field,))
upload("1031 avatar without token", 1001, delete=("token",), msg_id=h.MSG_AVATAR)
upload("1003 with every field null", 1001, {k: None for k in fresh_upload().body(0, 1)})

# ---- wrong types
upload("seq \"abc\"", 1001, {"seq": "abc"})
upload("name an array", 1001, {"name": ["a.bin"]})
upload("uid an object", 1001, {"uid": {"uid": A}})
upload("seq 1.5", 1001, {"seq": 1.5})
upload("total_size true", 1001, {"total_size": True})
upload("trans_size null", 1001, {"trans_size": None})
upload("data a number", 1001, {"data": 12345})
upload("md5 a number", 1001, {"md5": 12345678901234567890123456789012})
upload("last \"maybe\"", 1001, {"last": "maybe"})
upload("last 2", 1001, {"last": 2})

# ---- negative and huge numbers
upload("seq -1", 1001, {"seq": -1})
upload("trans_size -100", 1001, {"trans_size": -100})
upload("total_size -1", 1001, {"total_size": -1})
upload("uid -5", 1001, {"uid": -5})
upload("uid \"-3001\" as a string", 1001, {"uid": "-%d" % A})
upload("seq 2^64 (over 64 bits)", 1001, {"seq": 2 ** 64})
up_e = fresh_upload()
add("trans_size 1e400 (overflows a double)",
    raw_frame(h.MSG_UPLOAD, json.dumps(up_e.body(0, 1, trans_size="@@")).encode().replace(b'"@@"', b"1e400")),
    h.MSG_UPLOAD + 1, 1001, nothing_started(up_e))
upload("total_size 2^53 + 1 (over max_file_size and 2^53)", (1001, 1025), {"total_size": 2 ** 53 + 1, "last": 0})
upload("uid 2^64 + 1", 1001, {"uid": 2 ** 64 + 1})
upload("uid 2^53 - 1 (no token key)", 1011, {"uid": 2 ** 53 - 1}, check=False)
upload("uid 2^53 + 1 (no token key; 2^53 has one) with 2^53's token", (1001, 1011),
       {"uid": BIG_UID, "token": TRAP_TOKEN}, check=False)
upload("uid \"9007199254740993\" as a string with 2^53's token", (1001, 1011),
       {"uid": str(BIG_UID), "token": TRAP_TOKEN}, check=False)

# ---- numeric strings with junk
upload("seq \"12a\"", 1001, {"seq": "12a"})
upload("total_size \" 100\" (leading space)", 1001, {"total_size": " 100"})
upload("seq \"+1\"", 1001, {"seq": "+1"})
upload("uid \"0x0bb9\"", 1001, {"uid": "0x0bb9"})
upload("trans_size \"\" (empty string)", 1001, {"trans_size": ""})
upload("seq \"1.0\"", 1001, {"seq": "1.0"})
upload("total_size \"100 \" (trailing space)", 1001, {"total_size": "100 "})

# ---- ranges and consistency
upload("seq 0", 1017, {"seq": 0})
upload("trans_size > total_size", 1001, {"trans_size": 100, "total_size": 50})
upload("last 1 before the end (total_size 200, trans_size 100)", 1001, {"total_size": 200})
upload("data not base64", 1001, {"data": "!!not*base64!!"})
upload("data base64 without padding", 1001, {"data": base64.b64encode(b"abcd").decode().rstrip("=")})
upload("data base64 with an embedded newline", 1001,
       {"data": base64.b64encode(rbytes(100)).decode()[:40] + "\n" + base64.b64encode(rbytes(100)).decode()[40:]})
upload("data URL-safe base64 alphabet", 1001, {"data": base64.urlsafe_b64encode(b"\xfb\xff" * 50).decode()})
upload("data decoding to 100 bytes with trans_size 50 (offset -50)", 1001, {"trans_size": 50, "last": 0})
upload("total_size over max_file_size", 1025, {"total_size": MAX_FILE + 1, "last": 0})
upload("md5 not hex", 1001, {"md5": "z" * 32})
upload("md5 of 33 hex digits", 1001, {"md5": "a" * 33})
upload("md5 of 31 hex digits", 1001, {"md5": "a" * 31})
upload("md5 with a leading space", 1001, {"md5": " " + "a" * 31})
upload("seq 1 not at offset 0 (trans_size 150, 100 bytes)", (1001, 1017, 1018),
       {"trans_size": 150, "total_size": 200, "last": 0})
upload("seq 2 of an upload never started", 1012, {"seq": 2})
upload("seq 7 of an upload never started", 1012, {"seq": 7, "total_size": 1000, "trans_size": 700, "last": 0})
up_mm = fresh_upload()
upload("single chunk whose md5 does not match its bytes", 1024, {"md5": h.md5_hex(b"something else")}, up=up_mm)


def past_committed(c, label):
    c.send_raw(pending.frame(3 * CH, 4))
    r = c.recv_json(h.MSG_UPLOAD + 1)
    ok = r.get("error") == 1018 and r.get("trans_size") == 2 * CH and r.get("seq") == 2
    ok2, diag2 = pending_unchanged(c, r)
    return ok and ok2, "answer %r; %s" % (r, diag2)


def mismatch_name(c, label):
    c.send_raw(pending.frame(2 * CH, 3, name="other-name.bin"))
    r = c.recv_json(h.MSG_UPLOAD + 1)
    ok2, diag2 = pending_unchanged(c, r)
    return r.get("error") == 1026 and ok2, "answer %r; %s" % (r, diag2)


def mismatch_total(c, label):
    c.send_raw(pending.frame(2 * CH, 3, total_size=5 * CH))
    r = c.recv_json(h.MSG_UPLOAD + 1)
    ok2, diag2 = pending_unchanged(c, r)
    return r.get("error") == 1026 and ok2, "answer %r; %s" % (r, diag2)


add("chunk 4 past the committed size of an upload at chunk 2: 1018 with trans_size and seq 2", None, None,
    past_committed)
add("chunk 3 of an upload under another name: 1026", None, None, mismatch_name)
add("chunk 3 of an upload with another total_size: 1026", None, None, mismatch_total)

# ---- credentials
upload("uid %d with uid %d's token" % (B, A), 1010, {"uid": B, "token": TOK[A]}, check=False)
upload("uid %d without a utoken_ key" % NOKEY, 1011, {"uid": NOKEY}, check=False)
upload("empty token", (1001, 1010), {"token": ""})
upload("token differing in case", 1010, {"token": TOK[A].upper()})
upload("token with a trailing NUL escape", 1010, {"token": TOK[A] + "\x00"})
upload("token one byte short", 1010, {"token": TOK[A][:-1]})
add("1005 sync with uid %d and uid %d's token" % (B, A),
    h.frame(h.MSG_SYNC, {"md5": pending.md5, "uid": B, "token": TOK[A]}), h.MSG_SYNC + 1, 1010)


def sync_other_users(md5_of, what):
    def run(c, label):
        r = c.request(h.MSG_SYNC, {"md5": md5_of(), "uid": B, "token": TOK[B]})
        leak = {k: r.get(k) for k in ("trans_size", "total_size", "seq", "name") if r.get(k) not in (None, 0, "")}
        return r.get("error") == 1012 and not leak, "answer %r; fields of the other upload: %r" % (r, leak)
    add("1005 sync of %s with uid %d's own valid credentials: 1012, no progress" % (what, B), None, None, run)


sync_other_users(lambda: pending.md5, "uid %d's upload in progress" % A)
sync_other_users(lambda: bg.up.md5, "the running background upload of uid %d" % BG)
add("1005 with md5 not hex", h.frame(h.MSG_SYNC, {"md5": "q" * 32, "uid": A, "token": TOK[A]}), h.MSG_SYNC + 1, 1001)
add("1005 without md5", h.frame(h.MSG_SYNC, {"uid": A, "token": TOK[A]}), h.MSG_SYNC + 1, 1001)

# ---- unknown message ids
for mid in (0, 1002, 1004, 1034, 9999, 65535):
    add("unknown message id %d" % mid, h.frame(mid, {"data": "x"}), (mid + 1) & 0xffff, 1022)

# ---- downloads of things that are not one's own published files
download("1033 name '.staging'", 1023, ".staging")
for sname in staging_names:
    download("1033 name '../.staging/%s'" % sname, 1023, "../.staging/" + sname)
    download("1033 name '.staging/%s'" % sname, 1023, ".staging/" + sname)
    download("1033 name '.%s' (leading dot)" % sname, 1023, "." + sname)
    download("1033 the staging file's base name %s (resolves under the uid only)" % sname, 1012, sname)
download("1033 name '../%d/%s'" % (B, secret.name), 1023, "../%d/%s" % (B, secret.name))
download("1033 name '..'", 1023, "..")
download("1033 name '/etc/passwd'", 1023, "/etc/passwd")
download("1033 name with \\u0000", 1023, "mine.bin\x00")
download("1033 uid %d's file with uid %d's own credentials" % (B, A), 1012, secret.name)
download("1033 uid %d's file as uid %d with uid %d's token" % (B, B, A), 1010, secret.name, uid=B)
download("1033 bad token", 1010, mine.name, token="not-the-token")
download("1033 uid without a token key", 1011, mine.name, uid=NOKEY)
download("1033 seq \"abc\"", 1001, mine.name, seq="abc")
download("1033 name a number", 1001, 42)
add("1033 without name", h.frame(h.MSG_DOWNLOAD, {k: v for k, v in dl_body("x").items() if k != "name"}),
    h.MSG_DOWNLOAD + 1, 1001)
download("1033 seq past the end of the file", 1018, mine.name, seq=5)


# ---------------------------------------------------------------- run the table
def expect_text(want):
    return "closed" if want is CLOSED else "one of %r" % (want,) if isinstance(want, tuple) else "%d" % want


def run_case(i, case):
    diag = ""
    try:
        with h.Client(d.port, timeout=10) as c:
            if callable(case.want):
                ok, diag = case.want(c, case.label)
                if ok and c.sock is not None and case.want not in (slow_drip,):
                    r = c.request(h.MSG_TEST, {"data": "open-%d" % i})
                    ok = r.get("data") == "open-%d" % i
                    diag += "; connection afterwards: %r" % r
                tap.ok(ok, "input %d: %s" % (i, case.label), diag)
                return
            if case.want is CLOSED:
                try:
                    c.send_raw(case.data)
                except (BrokenPipeError, ConnectionResetError):
                    pass   # the server closed while the rest of the frame was still being sent
                closed = c.wait_closed(5)
                tap.ok(closed, "input %d: %s: connection closed" % (i, case.label),
                       "still open after 5 s; received %r" % c.buf[:200])
                return
            c.send_raw(case.data)
            r = c.recv_json(case.rid)
            raw = c.last_raw
            wants = case.want if isinstance(case.want, tuple) else (case.want,)
            ok = r.get("error") in wants and isinstance(r.get("error"), int)
            diag = "answer %r" % raw[:300]
            if ok and case.post:
                ok, more = case.post(c, r)
                diag += "; " + more
            if ok:
                r2 = c.request(h.MSG_TEST, {"data": "open-%d" % i})
                ok = r2.get("data") == "open-%d" % i
                diag += "; connection afterwards: %r" % r2
            tap.ok(ok, "input %d: %s: response %d with error %s, connection open%s"
                   % (i, case.label, case.rid, expect_text(case.want), ", nothing changed" if case.post else ""),
                   diag)
    except Exception as e:
        tap.ok(False, "input %d: %s: %s" % (i, case.label, expect_text(case.want)),
               "%s: %s; %s" % (type(e).__name__, e, diag))


tap.diag("%d hostile inputs" % len(cases))
t_table = time.monotonic()
with tap.section("hostile table"):
    for i, case in enumerate(cases, 1):
        run_case(i, case)
        tap.ok(d.ping(), "after input %d: a fresh connection gets 1001 answered" % i)
        bg.advance(i / len(cases))
bg.advance(1.0, done=True)
tap.diag("table took %.1f s" % (time.monotonic() - t_table))

# ---------------------------------------------------------------- afterwards
with tap.section("background upload and side effects"):
    bg.thread.join(60)
    r = bg.result or {}
    tap.ok(bg.error is None and r.get("error") == 0 and r.get("last") == 1,
           "the background upload (%d chunks, %d of them sent while the table ran) completed"
           % (bg.n, bg.sent_during_table), "result %r, exception %r" % (bg.result, bg.error))
    tap.ok(bg.sent_during_table >= bg.n // 2, "the background upload ran throughout the table",
           "%d of %d chunks during the table" % (bg.sent_during_table, bg.n))
    path = published(BG, bg.up.name)
    tap.ok(os.path.exists(path) and h.read_file(path) == bg.up.data,
           "the background upload is byte-identical (%d bytes)" % len(bg.up.data),
           "on disk: %s" % (h.file_md5(path) if os.path.exists(path) else "missing"))

    after = outside_tree()
    tap.eq(sorted(after - tree_before), [], "nothing was created outside the storage root")
    tap.eq(sorted(tree_before - after), [], "nothing was removed outside the storage root")
    tap.ok(passwd_state() == passwd_before, "/etc/passwd untouched")
    escapes = [p for p in (os.path.join(os.path.dirname(d.dir), "escape-hostile"),
                           os.path.join(d.dir, "escape-hostile"), os.path.join(d.root, "escape-hostile"),
                           os.path.join(d.root, "x.png"))
               if os.path.lexists(p)]
    tap.eq(escapes, [], "no file named by a ../ input exists anywhere near the root")

    pub = h.rados_published_tree(d) if h.uses_rados(d) else {p for p in h.file_tree(d.root) if not p.startswith(".")}
    want_pub = {"%d/" % A, "%d/%s" % (A, mine.name), "%d/" % B, "%d/%s" % (B, secret.name),
                "%d/" % BG, "%d/%s" % (BG, bg.up.name)}
    tap.eq(sorted(pub), sorted(want_pub), "the published files are exactly the three uploaded on purpose")
    top = sorted(os.listdir(d.root))
    tap.ok(all(n.isdigit() or n in (".staging", ".pending", ".content") for n in top),
           "the root holds only uid directories, .staging, .pending and .content (instant upload)", repr(top))
    s = None
    with h.Client(d.port) as c:
        s = pending.sync(c)
    tap.ok(s.get("error") == 0 and s.get("trans_size") == 2 * CH, "the upload in progress is still at %d bytes"
           % (2 * CH), repr(s))
    tap.eq(h.read_file(published(A, mine.name)), mine.data, "uid %d's published file is unchanged" % A)
    tap.eq(h.read_file(published(B, secret.name)), secret.data, "uid %d's published file is unchanged" % B)
    tap.eq(redis.cmd("KEYS", "file_download_*"), [], "no refused download left a file_download_ key")
    tap.eq(redis.cmd("KEYS", "*%d*" % BIG_UID) + redis.cmd("KEYS", "*%d*" % TRAP_UID),
           ["utoken_%d" % TRAP_UID], "no Redis key was written for uid 2^53 or 2^53 + 1")

with tap.section("daemon still healthy"):
    pids_now = (sorted(d.worker_pids()), d.storage_pid())
    tap.eq(pids_now, pids_at_start, "no worker or storage process died or was replaced")
    died = [l for l in d.log_text().splitlines() if "killed by signal" in l or "exited with status" in l]
    tap.eq(died, [], "the log shows no child death")
    tap.ok(d.ping(), "1001 still answered at the end")
    rc, left = d.stop()
    tap.ok(rc == 0 and not left, "TERM stops the daemon cleanly", "exit %r, left %r" % (rc, left))

tap.finish()

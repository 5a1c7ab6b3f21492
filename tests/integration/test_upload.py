# test_upload.py: resumable chunked uploads (1003, 1005, 1031) against real Redis and PostgreSQL servers started here.
import base64
import glob
import json
import os
import stat
import signal
import sys
import threading
import time

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=280)

CH = 65536                      # chunk size of most uploads
MAX_FILE = 4 * 1024 ** 3        # max_file_size (the default, set explicitly)
UPLOAD_TTL = 3600
REDIS_TIMEOUT = 2               # [redis] timeout: seconds without an answer before a connection is dropped
USERS = {1001: "tok-1001-secret", 1002: "tok-1002-secret", 1003: "tok-1003-secret", 1004: "tok-1004-secret"}
AVATAR_USERS = {2001: "alice", 2002: "bob", 2003: "carol"}
NO_TOKEN_UID = 1999             # a uid with no utoken_ key in Redis
rand = __import__("random").Random(20240611)


def rbytes(n):
    return rand.randbytes(n)


# ---------------------------------------------------------------- servers
redis = h.RedisServer().start()
pg = h.PostgresServer().start()
pg.load_schema()
for uid, name in AVATAR_USERS.items():
    pg.sql("INSERT INTO \"user\" (uid, name, email, pwd, nick, \"desc\", sex) VALUES "
           "(%d, '%s', '%s@example.org', 'pw%d', 'nick-%s', 'desc of %s', 1)" % (uid, name, name, uid, name, name))


def set_tokens():
    for uid, tok in list(USERS.items()) + [(u, "tok-%d-avatar" % u) for u in AVATAR_USERS]:
        redis.set_token(uid, tok)


USERS.update({u: "tok-%d-avatar" % u for u in AVATAR_USERS})
set_tokens()

d = h.Daemon(workers=2, redis=redis, pg=pg, stats=True, settings={
    "server": {"storage_timeout": 10},
    "redis": {"timeout": REDIS_TIMEOUT},
    "storage": {"max_file_size": MAX_FILE, "upload_ttl": UPLOAD_TTL},
    "postgres": {"timeout": 3},
})
tap.context.append(lambda: d.log_tail(12))
d.start_or_finish(tap)
tap.ok(d.wait_redis_connected(15), "daemon started; workers and storage connected to Redis")
tap.ok(h.wait_for(lambda: "postgres: connected" in d.log_text(), 10), "storage connected to PostgreSQL")


# ---------------------------------------------------------------- helpers

def published(uid, name):
    return h.published(d, uid, name)   # with RESOURCED_TEST_BACKEND=rados: a copy fetched from RADOS


def record_key(uid, md5):
    return "file_upload_%d_%s" % (uid, md5)


def staging_files(uid, md5):
    return h.staging_entries(d, uid, md5)


def new_upload(size, name, uid=1001, chunk=CH, **kw):
    return h.Upload(rbytes(size), name, uid, USERS.get(uid, "nobody"), chunk_size=chunk, **kw)


def check_published(up, what):
    """The file is at <root>/<uid>/<name> with the same bytes, its record and staging files are gone."""
    path = published(up.uid, up.name)
    try:
        data = h.read_file(path)
    except OSError as e:
        tap.ok(False, "%s: published at <root>/<uid>/<name>" % what, repr(e))
        return False
    good = data == up.data and h.file_md5(path) == up.md5
    tap.ok(good, "%s: published file identical (%d bytes, md5 %s)" % (what, len(up.data), up.md5),
           "on disk %d bytes md5 %s" % (len(data), h.md5_hex(data)))
    if h.uses_rados(d):
        tap.skip("%s: file and directory modes" % what, "RADOS objects have no modes (pool caps instead)")
    else:
        modes = (stat.S_IMODE(os.stat(path).st_mode), stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode))
        tap.ok(modes[0] & 0o027 == 0 and modes[1] & 0o027 == 0,
               "%s: file and directory are not group-writable or world-accessible (0640/0750)" % what,
               "modes %o %o" % modes)
    gone = h.wait_for(lambda: not h.record_in_progress(redis, record_key(up.uid, up.md5)), 5)
    tap.ok(gone and not staging_files(up.uid, up.md5),
           "%s: upload record and staging files are gone" % what,
           "record %r, staging %r" % (redis.cmd("GET", record_key(up.uid, up.md5)), staging_files(up.uid, up.md5)))
    return good


def upload_whole(up, what, window=1):
    with h.Client(d.port) as c:
        if window > 1:
            rs = up.run_pipelined(c, window)
            r = rs[-1]
            bad = [x for x in rs if x.get("error") != 0]
            tap.ok(not bad, "%s: every chunk answered with error 0" % what, repr(bad[:3]))
        else:
            r, _, _ = up.run(c)
    tap.ok(r.get("error") == 0 and r.get("trans_size") == len(up.data) and r.get("last") == 1,
           "%s: last chunk answered error 0, trans_size %d, last 1" % (what, len(up.data)), repr(r))
    return check_published(up, what)


def is_num(v):
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------------------------------------------------------- round trips
with tap.section("round trips"):
    for size, label in [(0, "empty file"), (1, "1 byte"), (CH, "exactly one chunk"), (CH + 1, "one chunk + 1")]:
        up = new_upload(size, "rt-%d.bin" % size)
        upload_whole(up, label)
        tap.eq(len(up.responses), up.last_seq, "%s: %d chunk(s) sent" % (label, up.last_seq))
    # Download the small ones back with 1033.
    for size in (0, 1, CH + 1):
        with h.Client(d.port) as c:
            data, rs = h.download(c, "rt-%d.bin" % size, 1001, USERS[1001], client_path="C:/x/rt-%d" % size)
        tap.ok(data == h.read_file(published(1001, "rt-%d.bin" % size)), "download of the %d-byte file matches" % size)
        last = rs[-1]
        tap.ok(isinstance(last.get("total_size"), str) and isinstance(last.get("current_size"), str)
               and last.get("is_last") is True and is_num(last.get("seq")) and last.get("total_size") == str(size),
               "1034: total_size/current_size are strings, is_last a bool, seq a number", repr(last)[:300])

with tap.section("50 MB"):
    big = new_upload(50 * 1024 * 1024, "big-50M.bin", chunk=128 * 1024)
    t0 = time.monotonic()
    upload_whole(big, "50 MB random file in 128 KiB chunks")
    tap.diag("50 MB upload took %.1f s" % (time.monotonic() - t0))
    big.data = None   # free it

with tap.section("pipelined and Qt-style bodies"):
    up = new_upload(10 * CH + 17, "pipelined.bin")
    upload_whole(up, "11 chunks sent 8 at a time without waiting", window=8)
    up = new_upload(3 * CH + 5, "indented.bin", indent=4)
    upload_whole(up, "Qt's indented JSON bodies")
    up = new_upload(2 * CH + 3, "strings.bin", as_strings=True)
    upload_whole(up, "numbers sent as strings (\"seq\":\"1\", sizes, uid)")
    up = new_upload(CH + 9, "upper.bin")
    up.md5 = up.md5.upper()
    with h.Client(d.port) as c:
        r, _, _ = up.run(c)
    tap.eq(r.get("error"), 0, "an upper-case md5 is accepted")
    up.md5 = up.md5.lower()
    check_published(up, "upper-case md5")


# ---------------------------------------------------------------- response types and the Redis record
with tap.section("response types and the Redis record"):
    up = new_upload(3 * CH + 100, "typed.bin", uid=1002)
    key = record_key(up.uid, up.md5)
    with h.Client(d.port) as c:
        r = up.send_chunk(c, 0, 1)
        tap.eq(r.get("error"), 0, "chunk 1 accepted")
        raw = json.loads(c.last_raw)
        nums = ["error", "total_size", "seq", "trans_size", "last", "uid"]
        tap.ok(all(is_num(raw.get(f)) for f in nums) and isinstance(raw.get("name"), str)
               and isinstance(raw.get("md5"), str),
               "1004: error, total_size, seq, trans_size, last, uid are JSON numbers; name, md5 strings",
               c.last_raw)
        tap.ok(raw.get("total_size") == len(up.data) and raw.get("seq") == 1 and raw.get("trans_size") == CH
               and raw.get("last") == 0 and raw.get("uid") == 1002 and raw.get("name") == up.name
               and raw.get("md5") == up.md5, "1004: values are right", c.last_raw)
        # The record of seq 1 is stored before its answer.
        rec = redis.get_json(key)
        ttl = redis.cmd("TTL", key)
        tap.ok(rec is not None and 0 < ttl <= UPLOAD_TTL, "record %s exists with a TTL (%r) right after chunk 1" % (key, ttl))
        rec = rec or {}
        tap.ok(rec.get("name") == up.name and rec.get("uid") == 1002 and rec.get("md5") == up.md5
               and rec.get("seq") == 1 and rec.get("total_size") == len(up.data) and rec.get("trans_size") == CH,
               "record JSON has name, uid, md5, seq, total_size, trans_size of chunk 1", repr(rec))
        r = up.send_chunk(c, CH, 2)
        tap.eq(r.get("error"), 0, "chunk 2 accepted")
        rec = h.wait_for(lambda: (lambda x: x if x and x.get("trans_size") == 2 * CH else None)(redis.get_json(key)), 5)
        tap.ok(rec and rec.get("seq") == 2 and 0 < redis.cmd("TTL", key) <= UPLOAD_TTL,
               "the record follows to trans_size %d, seq 2, with a TTL" % (2 * CH), repr(redis.get_json(key)))
        s = up.sync(c)
        tap.ok(s.get("error") == 0 and all(is_num(s.get(f)) for f in ("error", "total_size", "seq", "trans_size"))
               and s.get("trans_size") == 2 * CH and s.get("seq") == 2 and s.get("total_size") == len(up.data)
               and s.get("name") == up.name and s.get("md5") == up.md5,
               "1006: numbers are JSON numbers; trans_size %d, seq 2, name, md5" % (2 * CH), c.last_raw)
        r, _, _ = up.run(c, 2 * CH, 3)
        tap.eq(r.get("error"), 0, "rest of the upload accepted")
    check_published(up, "typed upload")
    with h.Client(d.port) as c:
        s = up.sync(c)
    tap.eq(s.get("error"), 1012, "1005 after completion answers 1012")
    with h.Client(d.port) as c:
        s = c.request(h.MSG_SYNC, {"md5": "0" * 32, "uid": 1002, "token": USERS[1002]})
        tap.eq(s.get("error"), 1012, "1005 of an upload never started answers 1012")
        s = c.request(h.MSG_SYNC, {"md5": "xyz", "uid": 1002, "token": USERS[1002]})
        tap.eq(s.get("error"), 1001, "1005 with a malformed md5 answers 1001")


# ---------------------------------------------------------------- resume
def resume_case(k, mode):
    """Sends k chunks and drops the connection, then resumes on a new one.

    mode: 'answered' (all k answers read), 'unread' (the k-th chunk's answer is not read), 'half-frame' (half
    of chunk k + 1 sent too), 'pipelined' (k chunks sent at once, no answer read)."""
    up = new_upload(5 * CH + 1234, "resume-%s-%d.bin" % (mode, k), uid=1003)
    what = "resume after %d chunk(s), %s" % (k, mode)
    with h.Client(d.port) as c:
        off, seq = 0, 1
        n = 0 if mode == "pipelined" else k - 1 if mode == "unread" else k
        if n:
            r, off, seq = up.run(c, max_chunks=n)
            if r.get("error") != 0:
                tap.ok(False, "%s: first chunks accepted" % what, repr(r))
                return
        for _ in range(k - n):
            c.send_raw(up.frame(off, seq))
            off, seq = up.next_offset(off), seq + 1
        if mode == "half-frame":
            fr = up.frame(off, seq)
            c.send_raw(fr[:len(fr) // 2])
    # The connection is gone; a new one syncs and goes on where the server says.
    with h.Client(d.port) as c:
        s = up.sync(c)
        err, trans = s.get("error"), s.get("trans_size")
        if mode in ("answered", "half-frame"):
            good = err == 0 and trans == k * CH and s.get("seq") == k
            allowed = "trans_size %d, seq %d" % (k * CH, k)
        else:
            # Chunks whose answers were never read may or may not have been applied.
            lo = n
            good = (err == 0 and trans in [j * CH for j in range(max(lo, 1), k + 1)] and s.get("seq") == trans // CH) \
                or (err == 1012 and (k == up.last_seq or lo == 0))
            allowed = "whole chunks from %d to %d (or 1012)" % (lo, k)
        tap.ok(good and (err != 0 or (s.get("total_size") == len(up.data) and s.get("name") == up.name)),
               "%s: 1005 answers %s" % (what, allowed), repr(s))
        if err == 1012 and k == up.last_seq:
            check_published(up, what + " (completed before the drop)")
            return
        off, seq = (trans, s.get("seq") + 1) if err == 0 else (0, 1)
        r, _, _ = up.run(c, off, seq)
        tap.eq(r.get("error"), 0, "%s: the rest is accepted from offset %d, seq %d" % (what, off, seq))
    check_published(up, what)


with tap.section("resume"):
    for k in (1, 2, 4, 5):
        resume_case(k, "answered")
    resume_case(6, "unread")
    resume_case(3, "unread")
    resume_case(1, "unread")
    resume_case(2, "half-frame")
    resume_case(4, "pipelined")

with tap.section("resent chunks, offsets past the committed size"):
    up = new_upload(4 * CH + 10, "resent.bin", uid=1003)
    with h.Client(d.port) as c:
        r, off, seq = up.run(c, max_chunks=3)
        r = up.send_chunk(c, CH, 2)
        tap.ok(r.get("error") == 0 and r.get("trans_size") == 3 * CH,
               "a resent chunk 2 is accepted and the committed size stays %d" % (3 * CH), repr(r))
        r = up.send_chunk(c, 2 * CH, 3)
        tap.eq(r.get("error"), 0, "chunk 3 resent too")
        r = up.send_chunk(c, 4 * CH, 5)
        tap.ok(r.get("error") == 1018 and r.get("trans_size") == 3 * CH and r.get("seq") == 3,
               "a chunk past the committed size gets 1018 with trans_size %d, seq 3" % (3 * CH), repr(r))
        r = up.send_chunk(c, 3 * CH, 4, data=base64.b64encode(b"\0" * CH).decode())
        tap.eq(r.get("error"), 0, "chunk 4 with wrong bytes is stored (then resent right below)")
        r = up.send_chunk(c, 3 * CH, 4)
        tap.eq(r.get("error"), 0, "chunk 4 resent with the right bytes")
        r, _, _ = up.run(c, 4 * CH, 5)
        tap.eq(r.get("error"), 0, "the upload completes after resends and a 1018")
    check_published(up, "resent chunks")

    # A chunk resent with other bytes: the file must match md5 to be published.
    up = new_upload(3 * CH + 1, "resent-garbage.bin", uid=1003)
    with h.Client(d.port) as c:
        up.run(c, max_chunks=2)
        r = up.send_chunk(c, CH, 2, data=base64.b64encode(b"\xaa" * CH).decode())
        tap.eq(r.get("error"), 0, "chunk 2 resent with other bytes is accepted")
        r, _, _ = up.run(c, 2 * CH, 3)
    path = published(up.uid, up.name)
    on_disk = h.read_file(path) if os.path.exists(path) else None
    tap.ok(r.get("error") == 1024 and on_disk is None,
           "a file whose bytes no longer match md5 gets 1024 and is not published",
           "answer %r; published: %s" % (r, "no" if on_disk is None else "%d bytes, md5 %s (declared %s)"
                                         % (len(on_disk), h.md5_hex(on_disk), up.md5)))

    # A chunk straddling the committed end: chunk 2 sent again, longer (a client that changed its chunk
    # size); it starts where chunk 2 starts, so its seq fits. The next chunk goes on from the committed
    # size with the answered seq + 1.
    for label, garble in (("same bytes", False), ("other bytes in the stored part", True)):
        up = new_upload(4 * CH, "straddle-%d.bin" % garble, uid=1003)
        with h.Client(d.port) as c:
            up.run(c, max_chunks=2)
            piece = bytearray(up.data[CH:2 * CH + CH // 2])
            if garble:
                piece[:16] = b"\x55" * 16
            r = up.send_chunk(c, 0, 2, data=base64.b64encode(bytes(piece)).decode(),
                              trans_size=2 * CH + CH // 2, last=0)
            tap.ok(r.get("error") == 0 and r.get("trans_size") == 2 * CH + CH // 2 and r.get("seq") == 2,
                   "straddling chunk (%s) is accepted; committed %d" % (label, 2 * CH + CH // 2), repr(r))
            r, _, _ = up.run(c, 2 * CH + CH // 2, 3)
        path = published(up.uid, up.name)
        if not garble:
            tap.eq(r.get("error"), 0, "upload with a straddling chunk of the same bytes completes")
            check_published(up, "straddling chunk")
        else:
            on_disk = h.read_file(path) if os.path.exists(path) else None
            tap.ok(r.get("error") == 1024 and on_disk is None,
                   "a straddling chunk that changed stored bytes ends in 1024, nothing published",
                   "answer %r; published: %s" % (r, on_disk is not None))

    # A published name is replaced whole by the next upload to it; staging is never visible.
    first = new_upload(2 * CH + 1, "replaced.bin", uid=1003)
    upload_whole(first, "first upload to a name")
    second = new_upload(CH + 7, "replaced.bin", uid=1003)
    with h.Client(d.port) as c:
        second.run(c, max_chunks=1)
        got, _ = h.download(c, "replaced.bin", 1003, USERS[1003])
        tap.ok(got == first.data, "mid-upload, a download of that name still gets the old file")
        r = c.request(h.MSG_DOWNLOAD, {"name": "in-progress.bin", "seq": 1, "uid": 1003, "token": USERS[1003]})
        third = new_upload(2 * CH, "in-progress.bin", uid=1003)
        third.run(c, max_chunks=1)
        r = c.request(h.MSG_DOWNLOAD, {"name": "in-progress.bin", "seq": 1, "uid": 1003, "token": USERS[1003]})
        tap.eq(r.get("error"), 1012, "a download of a name whose first upload is in progress gets 1012")
        r, _, _ = second.run(c, CH, 2)
    check_published(second, "second upload to the same name")

    up = new_upload(3 * CH, "restart-seq1.bin", uid=1003)
    with h.Client(d.port) as c:
        up.run(c, max_chunks=2)
        r = up.send_chunk(c, 0, 1)
        tap.ok(r.get("error") == 0 and r.get("trans_size") == CH,
               "seq 1 again starts the upload over (trans_size %d)" % CH, repr(r))
        s = up.sync(c)
        tap.ok(s.get("trans_size") == CH and s.get("seq") == 1, "1005 agrees: trans_size %d, seq 1" % CH, repr(s))
        r = up.send_chunk(c, 2 * CH, 3)
        tap.eq(r.get("error"), 1018, "the old chunk 3 is now past the committed size: 1018")
        r, _, _ = up.run(c, CH, 2)
        tap.eq(r.get("error"), 0, "the restarted upload completes")
    check_published(up, "restarted upload")

    up = new_upload(2 * CH, "no-start.bin", uid=1003)
    with h.Client(d.port) as c:
        r = up.send_chunk(c, CH, 2)
        tap.eq(r.get("error"), 1012, "seq 2 of an upload never started gets 1012")


# ---------------------------------------------------------------- checksum and mismatches
with tap.section("wrong md5"):
    up = new_upload(2 * CH + 50, "bad-md5.bin", uid=1004)
    up.md5 = h.md5_hex(b"something else")
    with h.Client(d.port) as c:
        r, _, _ = up.run(c)
        tap.ok(r.get("error") == 1024 and r.get("last") == 1 and len(up.responses) == 3,
               "a wrong md5 gets 1024 on the last chunk (and 0 before)", repr([x.get("error") for x in up.responses]))
        s = up.sync(c)
        tap.eq(s.get("error"), 1012, "1005 after 1024 answers 1012")
    tap.ok(not os.path.exists(published(1004, "bad-md5.bin")), "nothing is published for a wrong md5")
    tap.ok(h.wait_for(lambda: not staging_files(1004, up.md5) and redis.cmd("EXISTS", record_key(1004, up.md5)) == 0, 5),
           "staging files and record are gone after 1024", repr(staging_files(1004, up.md5)))
    up.md5 = h.md5_hex(up.data)
    upload_whole(up, "the same file with the right md5 afterwards")

with tap.section("name or total_size changed mid-upload"):
    up = new_upload(3 * CH, "mismatch.bin", uid=1004)
    with h.Client(d.port) as c:
        up.run(c, max_chunks=1)
        r = up.send_chunk(c, CH, 2, name="other-name.bin")
        tap.eq(r.get("error"), 1026, "a different name in chunk 2 gets 1026")
        r = up.send_chunk(c, CH, 2, total_size=3 * CH + 1)
        tap.eq(r.get("error"), 1026, "a different total_size in chunk 2 gets 1026")
        a = new_upload(3 * CH, "mismatch.bin", uid=1004, msg_id=h.MSG_AVATAR)
        a.data, a.md5 = up.data, up.md5
        r = a.send_chunk(c, CH, 2)
        tap.eq(r.get("error"), 1026, "chunk 2 sent as 1031 to a 1003 upload gets 1026")
        s = up.sync(c)
        tap.ok(s.get("error") == 0 and s.get("trans_size") == CH, "the upload is untouched by the refused chunks", repr(s))
        r, _, _ = up.run(c, CH, 2)
        tap.eq(r.get("error"), 0, "it completes")
    check_published(up, "after 1026s")
    tap.ok(not os.path.exists(published(1004, "other-name.bin")), "nothing published under the other name")


# ---------------------------------------------------------------- names
with tap.section("names"):
    before = h.file_tree(d.dir)
    passwd = os.stat("/etc/passwd")
    bad_names = [("..", ".."), (".", "."), ("a/b", "a/b"), ("/etc/passwd", "/etc/passwd"), (".hidden", ".hidden"),
                 ("256 bytes", "n" * 256), ("control char \\x01", "a\x01b"), ("newline", "a\nb"), ("DEL", "a\x7fb"),
                 ("NUL", "a\x00b"), ("C1 control U+0085", "a\u0085b"), ("backslash", "a\\b"), ("empty", ""),
                 ("../escape", "../escape"), ("../../etc/x", "../../etc/x"), ("256 bytes of 2-byte chars", "\u00e9" * 128)]
    for label, name in bad_names:
        for msg_id in (h.MSG_UPLOAD, h.MSG_AVATAR):
            up = h.Upload(b"evil", name, 1004, USERS[1004], msg_id=msg_id)
            with h.Client(d.port) as c:
                r = up.send_chunk(c, 0, 1)
            tap.eq(r.get("error"), 1023, "name %s (%d): 1023" % (label, msg_id))
    # Escapes decode before the check.
    with h.Client(d.port) as c:
        body = json.dumps(h.Upload(b"evil", "aXb", 1004, USERS[1004]).body(0, 1)).replace("aXb", "a\\u002fb")
        c.send(h.MSG_UPLOAD, body)
        r = c.recv_json(h.MSG_UPLOAD + 1)
        tap.eq(r.get("error"), 1023, "name a\\u002fb (an escaped slash): 1023")
        # Invalid UTF-8 cannot be JSON: 1001.
        good = json.dumps(h.Upload(b"evil", "NAME", 1004, USERS[1004]).body(0, 1)).encode()
        for label, raw in [("\\xff\\xfe", b"\xff\xfe"), ("lone continuation \\x80", b"a\x80b"),
                           ("truncated \\xe2\\x82", b"a\xe2\x82"), ("overlong / \\xc0\\xaf", b"a\xc0\xafb")]:
            c.send(h.MSG_UPLOAD, good.replace(b"NAME", raw))
            r = c.recv_json(h.MSG_UPLOAD + 1)
            tap.ok(r.get("error") in (1001, 1023) if b"\xc0" in raw else r.get("error") == 1001,
                   "name with invalid UTF-8 %s: 1001" % label, repr(r))
        r = c.request(h.MSG_TEST, {"data": "alive"})
        tap.eq(r.get("data"), "alive", "the connection serves on after bad names")
    after = h.file_tree(d.dir)
    tap.eq(sorted(after - before), [], "nothing was created anywhere in the daemon's directory by bad names")
    st = os.stat("/etc/passwd")
    tap.ok((st.st_mtime_ns, st.st_size) == (passwd.st_mtime_ns, passwd.st_size), "/etc/passwd untouched")
    for label, name in [("255 bytes", "m" * 255), ("UTF-8", "\u00e9t\u00e9 \u2713 \u6587\u4ef6.txt"),
                        ("spaces and quotes", "my \"quoted\" file (1).txt"), ("dot inside", "a..b"),
                        ("254 bytes of 2-byte chars", "\u00e9" * 127)]:
        up = new_upload(100, name, uid=1004)
        upload_whole(up, "valid name: %s" % label)


# ---------------------------------------------------------------- credentials
with tap.section("credentials"):
    def first_chunk(uid, token, conn=None, **kw):
        up = h.Upload(b"secret data", "cred.bin", uid, token)
        body = up.body(0, 1)
        body.update(kw)
        if conn:
            return conn.request(h.MSG_UPLOAD, body)
        with h.Client(d.port) as c:
            return c.request(h.MSG_UPLOAD, body)
    tap.eq(first_chunk(1001, "wrong-token").get("error"), 1010, "a bad token gets 1010")
    tap.eq(first_chunk(NO_TOKEN_UID, "anything").get("error"), 1011, "a uid without utoken_ key gets 1011")
    tap.eq(first_chunk(1002, USERS[1001]).get("error"), 1010, "uid 1002 with uid 1001's token gets 1010")
    tap.eq(first_chunk(NO_TOKEN_UID, USERS[1001]).get("error"), 1011, "a token for a uid without key gets 1011")
    tap.eq(first_chunk(1001, USERS[1001] + "x").get("error"), 1010, "the token with one extra byte gets 1010")
    tap.eq(first_chunk(1001, USERS[1001][:-1]).get("error"), 1010, "the token short of one byte gets 1010")
    with h.Client(d.port) as c:
        body = h.Upload(b"x", "cred.bin", 1001, USERS[1001]).body(0, 1)
        del body["token"]
        tap.eq(c.request(h.MSG_UPLOAD, body).get("error"), 1001, "no token field gets 1001")
        del body["uid"]
        tap.eq(c.request(h.MSG_UPLOAD, body).get("error"), 1001, "no uid (anonymous off) gets 1001")
        s = c.request(h.MSG_SYNC, {"md5": "0" * 32, "uid": 1001, "token": "bad"})
        tap.eq(s.get("error"), 1010, "1005 with a bad token gets 1010")
    # A connection trusted for one uid is not trusted for another.
    with h.Client(d.port) as c:
        tap.eq(first_chunk(1001, USERS[1001], conn=c, name="cred-ok.bin").get("error"), 0, "a good token is accepted")
        tap.eq(first_chunk(1002, "wrong", conn=c).get("error"), 1010,
               "on the same connection, another uid with a bad token still gets 1010")
        tap.eq(first_chunk(1001, "wrong", conn=c).get("error"), 1010,
               "on the same connection, the trusted uid with another token gets 1010")
    # Nobody touches another user's upload.
    victim = new_upload(3 * CH, "victim.bin", uid=1001)
    with h.Client(d.port) as c:
        victim.run(c, max_chunks=1)
    with h.Client(d.port) as c:
        s = c.request(h.MSG_SYNC, {"md5": victim.md5, "uid": 1002, "token": USERS[1002]})
        tap.eq(s.get("error"), 1012, "uid 1002 syncing uid 1001's md5 gets 1012")
        thief = h.Upload(victim.data, victim.name, 1002, USERS[1002])
        r = thief.send_chunk(c, CH, 2)
        tap.eq(r.get("error"), 1012, "uid 1002 sending chunk 2 of uid 1001's upload gets 1012")
    with h.Client(d.port) as c:
        s = victim.sync(c)
        tap.ok(s.get("error") == 0 and s.get("trans_size") == CH, "uid 1001's upload is untouched", repr(s))
        r, _, _ = victim.run(c, CH, 2)
    check_published(victim, "victim upload")
    tap.ok(not os.path.exists(published(1002, victim.name)), "nothing published for uid 1002")


# ---------------------------------------------------------------- field types and sizes
with tap.section("field checks"):
    base = h.Upload(b"0123456789", "fields.bin", 1001, USERS[1001])
    cases = [
        ("seq \"abc\"", {"seq": "abc"}, 1001), ("trans_size \"12abc\"", {"trans_size": "12abc"}, 1001),
        ("seq -1", {"seq": -1}, 1001), ("seq 1.5", {"seq": 1.5}, 1001), ("uid \"x\"", {"uid": "x"}, 1001),
        ("total_size null", {"total_size": None}, 1001), ("data not base64", {"data": "!!!"}, 1001),
        ("data without padding", {"data": "YWJjZA"}, 1001), ("md5 31 hex digits", {"md5": "a" * 31}, 1001),
        ("md5 not hex", {"md5": "g" * 32}, 1001), ("trans_size > total_size", {"trans_size": 11, "total_size": 10}, 1001),
        ("seq 0", {"seq": 0}, (1001, 1017)),
        ("seq 1 not at offset 0", {"trans_size": 11, "total_size": 20, "last": 0}, (1001, 1017, 1018)),
        ("last 1 with trans_size short of total_size", {"total_size": 20}, (1001,)),
        ("total_size over max_file_size", {"total_size": MAX_FILE + 1, "last": 0}, 1025),
        ("total_size 2^40 over max_file_size", {"total_size": 2 ** 40, "last": 0}, 1025),
        ("total_size 2^64 as a string", {"total_size": str(2 ** 64), "last": 0}, (1001, 1025)),
    ]
    with h.Client(d.port) as c:
        for label, override, want in cases:
            body = base.body(0, 1)
            body.update(override)
            r = c.request(h.MSG_UPLOAD, body)
            if isinstance(want, tuple):
                tap.ok(r.get("error") in want, "%s: one of %r" % (label, want), repr(r))
            else:
                tap.eq(r.get("error"), want, "%s: %d" % (label, want))
        for label, raw in [("JSON array body", b"[1,2,3]"), ("JSON string body", b'"x"'), ("JSON null", b"null"),
                           ("truncated JSON", b'{"md5":'), ("empty body", b"")]:
            c.send(h.MSG_UPLOAD, raw)
            r = c.recv_json(h.MSG_UPLOAD + 1)
            tap.eq(r.get("error"), 1001, "%s: 1001" % label)
        tap.eq(c.request(h.MSG_TEST, {"data": "still"}).get("data"), "still", "the server keeps serving the connection")
    tap.ok(not os.path.exists(published(1001, "fields.bin")), "no refused request published anything")
    for total, label in [(2 ** 31 + 5, "2^31 + 5 as a number"), (2 ** 32, "2^32 (= max_file_size) as a number"),
                         (3 * 2 ** 30 + 7, "3 * 2^30 + 7 as a string")]:
        up = h.Upload(rbytes(CH), "huge-%d.bin" % total, 1001, USERS[1001], total_size=total)
        body = up.body(0, 1, last=0)
        if "string" in label:
            body["total_size"] = str(total)
        with h.Client(d.port) as c:
            r = c.request(h.MSG_UPLOAD, body)
            raw = c.last_raw
            s = up.sync(c)
        tap.ok(r.get("error") == 0 and r.get("total_size") == total and is_num(json.loads(raw)["total_size"]),
               "total_size %s is accepted and echoed as a number" % label, raw)
        tap.ok(s.get("error") == 0 and s.get("total_size") == total and s.get("trans_size") == CH,
               "1005 reports total_size %d" % total, repr(s))


# ---------------------------------------------------------------- Redis outage
with tap.section("Redis outage"):
    up = new_upload(4 * CH + 77, "redis-outage.bin", uid=1002)
    key = record_key(up.uid, up.md5)
    held = h.Client(d.port)
    r, off, seq = up.run(held, max_chunks=2)
    tap.eq(r.get("error"), 0, "two chunks in before Redis stops")
    lost_before = d.log_count("redis: connection lost")
    redis.stop()
    if not h.wait_for(lambda: d.log_count("redis: connection lost") >= lost_before + d.workers + 1, 5):
        tap.diag("not every process logged 'redis: connection lost' within 5 s")
    other = new_upload(CH + 5, "during-outage.bin", uid=1002)
    with h.Client(d.port) as c:
        r = other.send_chunk(c, 0, 1)
    tap.eq(r.get("error"), 1027, "a new upload on a new connection gets 1027 while Redis is down")
    r = other.send_chunk(held, 0, 1)
    tap.eq(r.get("error"), 1027, "a new upload on a trusted connection gets 1027 while Redis is down")
    # The upload in progress may go on (its record trails) or be refused with 1027; either way what was
    # acknowledged is what the server must report once Redis is back.
    r = up.send_chunk(held, 2 * CH, 3)
    tap.ok(r.get("error") in (0, 1027), "chunk 3 of the running upload during the outage: 0 or 1027", repr(r))
    acked = 3 if r.get("error") == 0 else 2
    tap.diag("chunk 3 during the outage answered %r" % r.get("error"))
    held.close()
    redis.start()   # empty: tokens and records are gone
    tap.eq(redis.cmd("EXISTS", "utoken_1002"), 0, "(Redis came back empty)")
    set_tokens()
    rec = h.wait_for(lambda: (lambda x: x if x and x.get("trans_size") == acked * CH else None)(
        redis.get_json(key)), 10)
    tap.ok(rec and rec.get("seq") == acked and 0 < redis.cmd("TTL", key),
           "the storage process records the upload again in the empty Redis (trans_size %d)" % (acked * CH),
           repr(redis.get_json(key)))
    def synced():
        with h.Client(d.port, timeout=5) as c:
            s = up.sync(c)
            return s if s.get("error") == 0 else None
    s = h.wait_for(synced, 10, 0.1)
    tap.ok(s and s.get("trans_size") == acked * CH and s.get("seq") == acked,
           "1005 answers 0 with trans_size %d after the restart" % (acked * CH), repr(s))
    with h.Client(d.port) as c:
        r, _, _ = up.run(c, acked * CH, acked + 1)
    tap.eq(r.get("error"), 0, "the upload completes after the Redis restart")
    check_published(up, "upload across a Redis restart")
    other = new_upload(CH + 5, "after-outage.bin", uid=1002)
    upload_whole(other, "a new upload after the Redis restart")


# ---------------------------------------------------------------- Redis hangs
def service_state():
    return h.stats_info(d).get("state")


with tap.section("Redis hangs (SIGSTOP): requests fail after [redis] timeout instead of waiting"):
    up = new_upload(4 * CH + 11, "redis-hang.bin", uid=1002)
    key = record_key(up.uid, up.md5)
    held = h.Client(d.port, timeout=30)
    r, off, seq = up.run(held, max_chunks=2)
    tap.eq(r.get("error"), 0, "two chunks in before Redis hangs")
    tap.eq(service_state(), "up", "the service is up before")
    dropped_before = d.log_count("redis: no answer for %d s" % REDIS_TIMEOUT)
    redis.pause()
    try:
        other = new_upload(CH + 5, "during-hang.bin", uid=1002)
        started = time.monotonic()
        with h.Client(d.port, timeout=30) as c:
            r = other.send_chunk(c, 0, 1)
        waited = time.monotonic() - started
        tap.eq(r.get("error"), 1027, "a new upload while Redis hangs is answered 1027 (retry)")
        tap.ok(waited < 20, "... within the timeout rather than after Redis comes back (%.1f s)" % waited)
        tap.ok(h.wait_for(lambda: d.log_count("redis: no answer for %d s" % REDIS_TIMEOUT) > dropped_before, 15),
               "the log says the connection was dropped for giving no answer", d.log_tail(8))
        tap.ok(h.wait_for(lambda: service_state() == "down", 15), "show info (and the agent check) say down")
    finally:
        redis.resume()
    tap.ok(h.wait_for(lambda: service_state() == "up", 20), "up again once Redis answers")
    tap.ok(h.wait_for(lambda: h.redis_up_everywhere(d), 20), "every process is connected to Redis again")
    r = up.send_chunk(held, 2 * CH, 3)
    tap.ok(r.get("error") in (0, 1027), "chunk 3 on the connection held through the hang: 0 or 1027", repr(r))
    acked = 3 if r.get("error") == 0 else 2
    held.close()
    def synced():
        with h.Client(d.port, timeout=10) as c:
            s = up.sync(c)
            return s if s.get("error") == 0 and s.get("trans_size") == acked * CH else None
    tap.ok(h.wait_for(synced, 15, 0.1), "1005 reports the %d chunks acknowledged" % acked)
    with h.Client(d.port) as c:
        r, _, _ = up.run(c, acked * CH, acked + 1)
    tap.eq(r.get("error"), 0, "the upload completes after the hang")
    check_published(up, "upload across a Redis hang")

    # An idle daemon notices a hang too (its PING gets no answer), before any request meets it.
    dropped_before = d.log_count("redis: no answer for %d s" % REDIS_TIMEOUT)
    redis.pause()
    try:
        tap.ok(h.wait_for(lambda: service_state() == "down", 4 * REDIS_TIMEOUT + 10),
               "an idle daemon says down once its PING goes unanswered")
        tap.ok(d.log_count("redis: no answer for %d s" % REDIS_TIMEOUT) > dropped_before,
               "... and logs why", d.log_tail(8))
    finally:
        redis.resume()
    tap.ok(h.wait_for(lambda: service_state() == "up", 20), "up again once Redis answers")
    tap.ok(h.wait_for(lambda: h.redis_up_everywhere(d), 20), "every process is connected to Redis again")
    upload_whole(new_upload(CH + 9, "after-hang.bin", uid=1002), "a new upload after the hang")


# ---------------------------------------------------------------- avatars and PostgreSQL
def icon_of(uid):
    return pg.sql("SELECT icon FROM \"user\" WHERE uid = %d" % uid)


with tap.section("avatar"):
    av = new_upload(3 * CH + 300, "alice-face.png", uid=2001, msg_id=h.MSG_AVATAR)
    with h.Client(d.port) as c:
        r, _, _ = av.run(c)
        raw = json.loads(c.last_raw)
    tap.ok(r.get("error") == 0 and is_num(raw.get("last_seq")) and raw.get("last_seq") == av.last_seq,
           "1031 completes; 1032 echoes last_seq %d as a number" % av.last_seq, c.last_raw)
    check_published(av, "avatar")
    icon = h.wait_for(lambda: icon_of(2001) == av.name and icon_of(2001), 10, 0.1)
    tap.eq(icon, av.name, "\"user\".icon of uid 2001 is updated")
    tap.eq(icon_of(2002), "", "other users' icons are untouched")
    info = h.wait_for(lambda: (lambda x: x if x and x.get("icon") == av.name else None)(
        redis.get_json("ubaseinfo_2001")), 10, 0.1)
    tap.ok(isinstance(info, dict) and info.get("uid") == 2001 and info.get("name") == "alice"
           and info.get("icon") == av.name and info.get("email") == "alice@example.org" and info.get("nick") == "nick-alice"
           and info.get("desc") == "desc of alice" and info.get("pwd") == "pw2001" and info.get("sex") == 1,
           "ubaseinfo_2001 is the user row as JSON (uid, pwd, name, email, nick, desc, sex, icon)", repr(info))
    nobody = new_upload(CH + 3, "ghost.png", uid=1004, msg_id=h.MSG_AVATAR)
    upload_whole(nobody, "avatar of a uid without a user row")
    tap.eq(pg.sql("SELECT count(*) FROM \"user\" WHERE icon = 'ghost.png' OR uid = 1004"), "0",
           "no user row is created or changed for it")
    tap.ok(d.ping(), "the daemon serves on after an avatar without a user row")
    quoted = new_upload(CH + 5, "bob's \"face\"; DROP TABLE user;--.png", uid=2003, msg_id=h.MSG_AVATAR)
    upload_whole(quoted, "avatar whose name holds SQL quotes")
    icon = h.wait_for(lambda: icon_of(2003) == quoted.name and icon_of(2003), 10, 0.1)
    tap.eq(icon, quoted.name, "a name with quotes reaches \"user\".icon unchanged (parameters, not SQL text)")
    av2 = new_upload(CH, "no-uid.png", uid=2001, msg_id=h.MSG_AVATAR)
    with h.Client(d.port) as c:
        body = av2.body(0, 1)
        del body["uid"]
        tap.eq(c.request(h.MSG_AVATAR, body).get("error"), 1001, "1031 without uid gets 1001")

with tap.section("PostgreSQL outage"):
    av = new_upload(2 * CH + 1, "bob-face.png", uid=2002, msg_id=h.MSG_AVATAR)
    with h.Client(d.port) as c:
        r, off, seq = av.run(c, max_chunks=1)
        tap.eq(r.get("error"), 0, "chunk 1 of an avatar before PostgreSQL stops")
        tap.ok(pg.stop("fast"), "PostgreSQL stopped during the avatar upload")
        r, _, _ = av.run(c, off, seq)
    tap.eq(r.get("error"), 0, "the avatar upload succeeds while PostgreSQL is down")
    check_published(av, "avatar during the outage")
    av3 = new_upload(CH + 1, "carol-face.png", uid=2003, msg_id=h.MSG_AVATAR)
    with h.Client(d.port) as c:
        r, _, _ = av3.run(c)
    tap.eq(r.get("error"), 0, "a second avatar during the outage succeeds")
    # The queued updates must survive a storage crash too.
    old = d.storage_pid()
    os.kill(old, signal.SIGKILL)
    tap.ok(h.wait_for(lambda: d.storage_pid() not in (None, old), 10), "storage process respawned while PostgreSQL is down")
    pg.start()
    icon = h.wait_for(lambda: icon_of(2002) == av.name and icon_of(2002), 30, 0.2)
    tap.eq(icon, av.name, "after PostgreSQL is back, uid 2002's icon appears")
    icon = h.wait_for(lambda: icon_of(2003) == av3.name and icon_of(2003), 15, 0.2)
    tap.eq(icon, av3.name, "uid 2003's icon (queued before the storage crash) appears too")
    info = h.wait_for(lambda: (lambda x: x if x and x.get("icon") == av.name else None)(
        redis.get_json("ubaseinfo_2002")), 10, 0.1)
    tap.ok(info and info.get("uid") == 2002 and info.get("name") == "bob", "ubaseinfo_2002 is written", repr(info))
    info = h.wait_for(lambda: (lambda x: x if x and x.get("icon") == av3.name else None)(
        redis.get_json("ubaseinfo_2003")), 10, 0.1)
    tap.ok(info and info.get("uid") == 2003 and info.get("name") == "carol", "ubaseinfo_2003 is written", repr(info))
    tap.eq(icon_of(2001), "alice-face.png", "uid 2001's icon unchanged")

with tap.section("PostgreSQL hangs while the storage process reconnects"):
    with open(os.path.join(pg.data, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    connected_before = d.log_count("postgres: connected")
    slow_before = d.log_count("connecting took longer than [postgres] timeout")
    # The daemon's connection ends, and the postmaster stops: the kernel still accepts the next
    # connection, which then waits for a startup answer that never comes.
    pg.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
           "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")
    os.kill(postmaster, signal.SIGSTOP)
    try:
        av = new_upload(CH + 7, "bob-face-2.png", uid=2002, msg_id=h.MSG_AVATAR)
        with h.Client(d.port, timeout=30) as c:
            r, _, _ = av.run(c)
        tap.eq(r.get("error"), 0, "an avatar uploaded while PostgreSQL hangs succeeds")
        tap.ok(h.wait_for(lambda: d.log_count("connecting took longer than [postgres] timeout") > slow_before, 20),
               "the connection attempt that gets no answer is given up after [postgres] timeout", d.log_tail(8))
    finally:
        os.kill(postmaster, signal.SIGCONT)
    tap.ok(h.wait_for(lambda: d.log_count("postgres: connected") > connected_before, 20),
           "the storage process connects again once PostgreSQL answers")
    icon = h.wait_for(lambda: icon_of(2002) == av.name and icon_of(2002), 20, 0.2)
    tap.eq(icon, av.name, "the queued icon update is applied")


def fifo_open_waiters(pid):
    """The threads of pid blocked opening a FIFO that has no writer (their kernel wait channel)."""
    tids = []
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/wchan" % (pid, tid)) as f:
                wchan = f.read()
        except OSError:
            continue
        if wchan in ("wait_for_partner", "fifo_open"):
            tids.append(int(tid))
    return tids


with tap.section("a pending icon file that hangs does not stall the storage process"):
    # A FIFO in place of a pending file blocks whoever opens it until a writer comes: a root on a
    # hung NFS server, without one. The pending files are read on a disk thread, so uploads go on.
    pg.sql("INSERT INTO \"user\" (uid, name, email, pwd, nick, \"desc\", sex) VALUES "
           "(2004, 'dave', 'dave@example.org', 'pw2004', 'nick-dave', 'desc of dave', 1)")
    hung = os.path.join(d.root, ".pending", "icon-2004")
    os.mkfifo(hung, 0o640)
    spid = d.storage_pid()
    connected_before = d.log_count("postgres: connected")
    # A reconnection rescans the pending files and reads the first one queued: the FIFO.
    pg.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
           "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")
    tap.ok(h.wait_for(lambda: d.log_count("postgres: connected") > connected_before, 20),
           "the storage process reconnects to PostgreSQL and rescans the pending files")
    waiters = h.wait_for(lambda: fifo_open_waiters(spid), 10)
    tap.ok(waiters and spid not in waiters,
           "the pending file is read on a disk thread (tid %r), not the loop's (pid %d)" % (waiters, spid))
    try:
        during = new_upload(3 * CH + 11, "while-icon-hangs.bin", uid=1001)
        try:
            with h.Client(d.port, timeout=15) as c:
                r, _, _ = during.run(c)
        except Exception as e:
            r = {"exception": repr(e)}
        tap.eq(r.get("error"), 0, "an upload completes while the pending icon file hangs", repr(r))
        tap.eq(icon_of(2004), "", "the icon update waits for its file (the read really hangs)")
    finally:
        # The hung open returns once a writer opens the FIFO; the name written is what it reads. A
        # regular file with the same name takes the FIFO's place first, for the removal that follows.
        tmp = hung + ".test"
        with open(tmp, "w") as f:
            f.write("dave-face.png")
        fd = os.open(hung, os.O_RDWR)
        os.rename(tmp, hung)
        os.write(fd, b"dave-face.png")
        os.close(fd)
    if r.get("error") == 0:
        check_published(during, "the upload while the icon file hung")
    tap.eq(h.wait_for(lambda: icon_of(2004) == "dave-face.png" and icon_of(2004), 20, 0.2), "dave-face.png",
           "once the file answers, its icon update is applied")
    tap.ok(h.wait_for(lambda: not os.path.exists(hung), 10), "and its pending file is removed")


# ---------------------------------------------------------------- concurrency
def upload_thread(up, barrier=None):
    with h.Client(d.port, timeout=60) as c:
        if barrier:
            barrier.wait(30)   # every client connected: start together
        r, _, _ = up.run(c, timeout=60)
    return r


with tap.section("concurrent uploads"):
    a = new_upload(20 * CH + 3, "concurrent-a.bin", uid=1001)
    b = new_upload(17 * CH + 9, "concurrent-b.bin", uid=1002)
    res = h.run_threads(upload_thread, [(a,), (b,)], 60)
    tap.ok(all(e is None and r.get("error") == 0 for r, e in res), "two clients upload concurrently", repr(res))
    check_published(a, "concurrent a")
    check_published(b, "concurrent b")

    ups = [new_upload(rand.randrange(2 * CH, 12 * CH), "many-%02d.bin" % i, uid=1001 + i % 4) for i in range(32)]
    t0 = time.monotonic()
    barrier = threading.Barrier(len(ups))
    res = h.run_threads(upload_thread, [(u, barrier) for u in ups], 90)
    tap.ok(all(e is None and r.get("error") == 0 for r, e in res),
           "32 concurrent uploads complete (%.1f s)" % (time.monotonic() - t0),
           repr([(u.name, r, e) for u, (r, e) in zip(ups, res) if e or r.get("error")][:5]))
    bad = [u.name for u in ups if not os.path.exists(published(u.uid, u.name))
           or h.read_file(published(u.uid, u.name)) != u.data]
    tap.eq(bad, [], "all 32 files are byte-identical")

    # The same file name from two uploads of one user: the last complete one wins, no mix.
    x = new_upload(8 * CH, "same-name.bin", uid=1003)
    y = new_upload(8 * CH, "same-name.bin", uid=1003)
    res = h.run_threads(upload_thread, [(x,), (y,)], 60)
    tap.ok(all(e is None and r.get("error") == 0 for r, e in res), "two uploads to one name both complete", repr(res))
    final = h.read_file(published(1003, "same-name.bin"))
    tap.ok(final in (x.data, y.data), "the published file is one of them, not a mix")


with tap.section("storage killed during 8 uploads"):
    ups = [new_upload(48 * CH + i, "crash-%d.bin" % i, uid=1001 + i % 4, chunk=32 * 1024) for i in range(8)]
    deadline = time.monotonic() + 120
    results = [None] * len(ups)

    def crash_thread(i):
        try:
            results[i] = ups[i].complete(d.port, deadline)
        except Exception as e:
            results[i] = e

    # One more upload sits idle with 3 acknowledged chunks: the crash must not lose them.
    quiet = new_upload(5 * CH + 99, "crash-quiet.bin", uid=1004)
    with h.Client(d.port) as c:
        r, _, _ = quiet.run(c, max_chunks=3)
    tap.eq(r.get("error"), 0, "3 chunks of an idle upload acknowledged before the crash")
    threads = [threading.Thread(target=crash_thread, args=(i,), daemon=True) for i in range(len(ups))]
    for t in threads:
        t.start()
    total = sum(u.last_seq for u in ups)
    h.wait_for(lambda: sum(len(u.responses) for u in ups) >= total // 3, 60, 0.005)
    done_at_kill = sum(1 for u in ups if u.responses and u.responses[-1].get("last") == 1
                       and u.responses[-1].get("error") == 0)
    old = d.storage_pid()
    os.kill(old, signal.SIGKILL)
    tap.ok(done_at_kill < len(ups), "the storage process was killed mid-upload (%d of 8 complete then)" % done_at_kill)
    for t in threads:
        t.join(max(0, deadline - time.monotonic()))
    tap.ok(d.storage_pid() not in (None, old), "a new storage process runs")
    with h.Client(d.port) as c:
        s = h.wait_for(lambda: (lambda x: x if x.get("error") != 1027 else None)(quiet.sync(c)), 10, 0.05)
    tap.ok(s and s.get("error") == 0 and s.get("trans_size") == 3 * CH and s.get("seq") == 3,
           "after the crash 1005 still reports the 3 acknowledged chunks of the idle upload", repr(s))
    rec = h.wait_for(lambda: (lambda x: x if x and x.get("trans_size") == 3 * CH else None)(
        redis.get_json(record_key(quiet.uid, quiet.md5))), 10, 0.05)
    tap.ok(rec and rec.get("seq") == 3 and 0 < redis.cmd("TTL", record_key(quiet.uid, quiet.md5)),
           "the new storage process records the recovered upload in Redis", repr(rec))
    with h.Client(d.port) as c:
        r, _, _ = quiet.run(c, 3 * CH, 4)
    tap.eq(r.get("error"), 0, "the idle upload completes after the crash")
    check_published(quiet, "idle upload across the crash")
    errors = [(u.name, r) for u, r in zip(ups, results) if not isinstance(r, dict) or r.get("error") != 0]
    tap.eq(errors, [], "every client completes after retrying (1027 or dropped, then 1005)")
    disrupted = sum(1 for u in ups if any(e[0] in ("1027", "dropped") for e in getattr(u, "events", [])))
    tap.diag("%d of 8 uploads saw 1027 or a dropped connection" % disrupted)
    # The workers hold the chunks the dead storage process left unanswered and send them to the new one.
    tap.ok(disrupted == 0, "the kill was invisible: no upload saw 1027 or a dropped connection")
    bad = [u.name for u in ups if not os.path.exists(published(u.uid, u.name))
           or h.file_md5(published(u.uid, u.name)) != u.md5]
    tap.eq(bad, [], "all 8 files are byte-identical")
    tap.ok(h.wait_for(lambda: not [f for u in ups for f in staging_files(u.uid, u.md5)], 5),
           "no staging files are left for them")


with tap.section("daemon still healthy"):
    tap.ok(d.ping(), "1001 still answered at the end")
    warn = [l for l in d.log_text().splitlines() if " error: " in l or "fatal" in l.lower()]
    tap.diag("error-level log lines: %d" % len(warn))
    for l in warn[:10]:
        tap.diag(l)
    rc, left = d.stop()
    tap.ok(rc == 0 and not left, "TERM stops the daemon cleanly", "exit %r, left %r" % (rc, left))

tap.finish()

# test_abuse.py: hostile numbers, sequence numbers, resent final chunks and names in text outputs against a running daemon (issue 12, items 3, 6, 7, 8).
"""Sections:
- arithmetic: download seq and upload numbers at 0, 1, 2^31, 2^32, 2^48, 2^49+1, 2^53, 2^63, 2^64-1, 2^64, as
  numbers and as strings: the documented code, never a wrapped offset, nothing started.
- seq: what seq means for uploads (chunk n starts at (n-1) x chunk 1's length, or at the committed size with
  the answered seq + 1); contradictions get 1017 and change nothing; a restart at a non-boundary resumes.
- completion: the final chunk resent after publishing answers 0 with trans_size = total_size while the name
  holds that file (also after a storage restart and from a second daemon sharing Redis and the root); 1012
  once the name holds other bytes or nothing; seq 1 of the same (uid, md5) starts afresh.
- names in text outputs: forged fields, spaces, quotes and multi-byte characters at the 63-byte cut in the
  access log, the error log, show transfers (text and json) and the metrics."""
import base64
import json
import os
import re
import signal
import subprocess
import sys

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=170)
rand = __import__("random").Random(1212)
U1, U2 = 4101, 4102
TOK = {U1: "tok-abuse-4101", U2: "tok-abuse-4102"}
DL_CHUNK = 4096

redis = h.RedisServer().start()
for uid, tok in TOK.items():
    redis.set_token(uid, tok)

d = h.Daemon(workers=2, redis=redis, settings={
    "server": {"download_chunk": DL_CHUNK, "storage_timeout": 10, "node": "node-a"},
    "storage": {"max_file_size": 64 * 1024 * 1024, "upload_ttl": 600},
}, stats=True)
ACCESS = os.path.join(d.dir, "access.log")
d.settings["log"]["access_log"] = ACCESS
h.Daemon.write_config(d.conf_path, d.settings)
tap.context.append(lambda: d.log_tail(10))
d.start_or_finish(tap)
tap.ok(d.wait_redis_connected(15) and d.wait_workers(10), "daemon started; workers and storage connected to Redis")


def published(uid, name):
    return os.path.join(d.root, str(uid), name)


def record_key(uid, md5):
    return "file_upload_%d_%s" % (uid, md5)


def upload(data, name, uid=U1, chunk=1000, **kw):
    return h.Upload(data, name, uid, TOK[uid], chunk_size=chunk, **kw)


def whole(up):
    with h.Client(d.port) as c:
        r, _, _ = up.run(c)
    return r


def download(c, name, seq, uid=U1):
    return c.request(h.MSG_DOWNLOAD, {"name": name, "seq": seq, "uid": uid, "token": TOK[uid]})


def resctl_stats(*cmd):
    r = subprocess.run([h.RESCTL_BIN, "stats", "--socket", d.stats_socket] + list(cmd), stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20)
    return r.stdout


# ---------------------------------------------------------------- (1) arithmetic on client numbers
with tap.section("arithmetic"):
    fixture = upload(rand.randbytes(3 * DL_CHUNK + 5), "numbers.bin", chunk=8192)
    tap.eq(whole(fixture).get("error"), 0, "fixture numbers.bin (3 chunks + 5 bytes of download) published")
    ok_seq = {1: fixture.data[:DL_CHUNK], 4: fixture.data[3 * DL_CHUNK:]}
    seqs = [(0, 1017), (1, 0), (4, 0), (5, 1018), (2 ** 31, 1018), (2 ** 32, 1018), (2 ** 48 - 1, 1018),
            (2 ** 48, 1018), (2 ** 49 + 1, 1018), (2 ** 49 + 2, 1018), (2 ** 53 - 1, 1018), (2 ** 53, 1001),
            (2 ** 63, 1001), (2 ** 64 - 1, 1001), (2 ** 64, 1001), (-1, 1001)]
    bad = []
    with h.Client(d.port) as c:
        for seq, want in seqs:
            for form in (seq, str(seq)):
                r = download(c, "numbers.bin", form)
                got = r.get("error")
                data = base64.b64decode(r["data"]) if got == 0 else None
                if got != want or (got == 0 and data != ok_seq[seq]):
                    bad.append((form, got, r.get("message"), r.get("current_size")))
    tap.ok(not bad, "download seq at every boundary, as number and string: 0 -> 1017, past the end "
           "(2^31 ... 2^53-1, 2^49+1 included) -> 1018, over 2^53-1 -> 1001, never a wrapped chunk", repr(bad))

    # Upload numbers: each field at each boundary in an otherwise valid single-chunk upload of a fresh file.
    bounds = [0, 1, 2 ** 31, 2 ** 32, 2 ** 53 - 1, 2 ** 53, 2 ** 63, 2 ** 64 - 1, 2 ** 64]
    size = 100

    def expect(field, v):
        if v > 2 ** 53 - 1:
            return 1001
        if field == "seq":
            return 1017 if v == 0 else 0 if v == 1 else 1012
        if field == "total_size":
            return 1025 if v > 64 * 1024 * 1024 else 1001 if v != size else 0
        if field == "trans_size":
            return 1001 if v != size else 0
        if field == "uid":
            return 1011   # no utoken_ key for these uids
        return 0   # last_seq is only echoed

    bad = []
    n = 0
    for field in ("seq", "trans_size", "total_size", "last_seq", "uid"):
        for v in bounds:
            for form in (v, str(v)):
                n += 1
                up = upload(rand.randbytes(size), "bound-%03d.bin" % n)
                want = expect(field, v)
                with h.Client(d.port) as c:
                    body = up.body(0, 1)
                    body[field] = form
                    r = c.request(h.MSG_UPLOAD, body)
                    s = up.sync(c)
                pub = os.path.exists(published(U1, up.name))
                if r.get("error") != want or (want != 0 and (pub or s.get("error") != 1012)) or \
                        (want == 0 and not pub):
                    bad.append((field, form, r.get("error"), want, pub, s.get("error")))
    tap.ok(not bad, "%d uploads with seq, trans_size, total_size, last_seq, uid at the boundaries: the documented code, "
           "and a refused one starts nothing" % n, repr(bad))


# ---------------------------------------------------------------- (2) what seq means
with tap.section("seq"):
    L = 1000
    up = upload(rand.randbytes(5 * L + 300), "seq.bin")
    with h.Client(d.port) as c:
        r1 = up.send_chunk(c, 0, 1)
        r2 = up.send_chunk(c, L, 2)
        tap.ok(r1.get("error") == 0 and r2.get("error") == 0, "chunks 1 and 2 stored")
        bad = []
        # Offsets at or before the committed size (so not 1018) with a seq that contradicts them.
        for offset, seq in ((2 * L, 99), (0, 2), (L, 3), (L, 1 + 2 ** 40), (L // 2, 2), (2 * L, 2)):
            piece = up.data[offset:offset + L]
            r = up.send_chunk(c, offset, seq, data=base64.b64encode(piece).decode(),
                              trans_size=offset + len(piece))
            s = up.sync(c)
            if r.get("error") != 1017 or (r.get("trans_size"), r.get("seq")) != (2 * L, 2) or \
                    (s.get("trans_size"), s.get("seq")) != (2 * L, 2):
                bad.append((seq, offset, r.get("error"), r.get("trans_size"), s.get("trans_size"), s.get("seq")))
        tap.ok(not bad, "chunk 99 at the committed size, chunk 2 at 0, chunk 3 at chunk 2's offset, mid-chunk "
               "offsets: 1017 with the committed position, and nothing changes", repr(bad))
        r = up.send_chunk(c, L, 2)
        tap.ok(r.get("error") == 0 and r.get("trans_size") == 2 * L, "chunk 2 resent: 0 (writes are idempotent)",
               repr(r))
        r = up.send_chunk(c, 4 * L, 5)
        tap.ok(r.get("error") == 1018 and r.get("trans_size") == 2 * L and r.get("seq") == 2,
               "a chunk past the committed size still gets 1018 first (the client resyncs)", repr(r))
        r, _, _ = up.run(c, 2 * L, 3)
    tap.ok(r.get("error") == 0 and h.read_file(published(U1, "seq.bin")) == up.data,
           "the upload goes on from chunk 3 and is published identical")

    # The report: chunk 99 then chunk 2 of the same upload.
    up = upload(rand.randbytes(3 * L), "seq99.bin")
    with h.Client(d.port) as c:
        up.send_chunk(c, 0, 1)
        r99 = up.send_chunk(c, L, 99)
        r2 = up.send_chunk(c, L, 2)
        r3 = up.send_chunk(c, 2 * L, 3)
    tap.ok((r99.get("error"), r2.get("error"), r3.get("error")) == (1017, 0, 0) and
           h.read_file(published(U1, "seq99.bin")) == up.data,
           "chunk 99 after chunk 1: 1017; chunk 2 and 3 then complete the file", repr((r99, r2.get("error"))))

    # Pipelined chunks of the original client's shape.
    up = upload(rand.randbytes(20 * L + 1), "seq-pipe.bin")
    with h.Client(d.port) as c:
        out = up.run_pipelined(c, window=8)
    tap.ok(all(x.get("error") == 0 for x in out) and h.read_file(published(U1, "seq-pipe.bin")) == up.data,
           "21 chunks sent 8 at a time: all 0, published identical")

    # A chunk longer than chunk 1 moves the committed size off the grid: the client goes on from there
    # with the answered seq + 1, and the chunks after it follow from that point.
    up = upload(rand.randbytes(6 * L), "seq-grid.bin")
    with h.Client(d.port) as c:
        up.send_chunk(c, 0, 1)
        piece = up.data[L:2 * L + L // 2]
        r = up.send_chunk(c, L, 2, data=base64.b64encode(piece).decode(), trans_size=2 * L + L // 2)
        tap.ok(r.get("error") == 0 and (r.get("seq"), r.get("trans_size")) == (2, 2 * L + L // 2),
               "a longer chunk 2 is stored: committed %d, seq 2" % (2 * L + L // 2), repr(r))
        ra = up.send_chunk(c, 2 * L + L // 2, 3)
        rb = up.send_chunk(c, 2 * L + L // 2, 3)
        rc = up.send_chunk(c, 3 * L + L // 2, 4)
        tap.ok((ra.get("error"), rb.get("error"), rc.get("error")) == (0, 0, 0),
               "chunk 3 at the committed size, resent, then chunk 4 one chunk later: all 0",
               repr((ra, rb, rc)))
        r = up.send_chunk(c, 2 * L, 3)
        tap.ok(r.get("error") == 1017 and r.get("trans_size") == 4 * L + L // 2,
               "chunk 3 at (3-1) x chunk now contradicts where chunk 3 went: 1017, nothing changes", repr(r))
        r, _, _ = up.run(c, 4 * L + L // 2, 5)
    tap.ok(r.get("error") == 0 and h.read_file(published(U1, "seq-grid.bin")) == up.data,
           "published identical")

    # After a storage restart the committed size is every byte the staging file holds.
    up = upload(rand.randbytes(5 * L), "seq-restart.bin")
    with h.Client(d.port) as c:
        up.send_chunk(c, 0, 1)
        piece = up.data[L:2 * L + 300]
        up.send_chunk(c, L, 2, data=base64.b64encode(piece).decode(), trans_size=2 * L + 300)
    old = d.storage_pid()
    os.kill(old, signal.SIGKILL)
    tap.ok(h.wait_for(lambda: d.storage_pid() not in (None, old), 10), "storage process killed and respawned")
    s = None

    def synced():
        global s
        try:
            with h.Client(d.port) as c:
                s = up.sync(c)
        except Exception:
            return False
        return s.get("error") == 0

    h.wait_for(synced, 15, 0.2)
    tap.ok(s and s.get("trans_size") == 2 * L + 300 and s.get("seq") == 2,
           "sync after the restart: trans_size %d, seq 2" % (2 * L + 300), repr(s))
    with h.Client(d.port) as c:
        r, _, _ = up.run(c, 2 * L + 300, 3)
    tap.ok(r.get("error") == 0 and h.read_file(published(U1, "seq-restart.bin")) == up.data,
           "resumed at the committed size with seq 3 and published identical", repr(r))


# ---------------------------------------------------------------- (3) the final chunk resent after publishing
def final_chunk(up):
    n = up.last_seq
    return (n - 1) * up.chunk_size, n


with tap.section("completion"):
    up = upload(rand.randbytes(3 * 1000 + 7), "done.bin")
    tap.eq(whole(up).get("error"), 0, "done.bin published")
    st = os.stat(published(U1, "done.bin"))
    # The published record's SETEX leaves with the answer, not before it: it may land just after.
    rec = h.wait_for(lambda: (lambda x: x if x and x.get("state") == "published" else None)(
        redis.get_json(record_key(U1, up.md5))), 5)
    tap.ok(rec and 0 < redis.cmd("TTL", record_key(U1, up.md5)) <= 600,
           "the record stays with state published and a TTL of upload_ttl",
           repr(redis.get_json(record_key(U1, up.md5))))
    off, seq = final_chunk(up)
    with h.Client(d.port) as c:
        r = up.send_chunk(c, off, seq)
    tap.ok(r.get("error") == 0 and r.get("trans_size") == len(up.data) and r.get("total_size") == len(up.data) and
           r.get("seq") == seq and r.get("name") == "done.bin",
           "the final chunk resent: error 0, trans_size = total_size", repr(r))
    st2 = os.stat(published(U1, "done.bin"))
    tap.ok((st2.st_ino, st2.st_mtime_ns) == (st.st_ino, st.st_mtime_ns) and
           h.read_file(published(U1, "done.bin")) == up.data, "the published file is untouched")
    with h.Client(d.port) as c:
        r_name = up.send_chunk(c, off, seq, name="other.bin")
        r_mid = up.send_chunk(c, 1000, 2)
    tap.ok(r_name.get("error") == 1012 and r_mid.get("error") == 1012,
           "the same final chunk under another name, or a middle chunk: 1012", repr((r_name, r_mid)))

    # After a storage restart, the record in Redis is what answers.
    old = d.storage_pid()
    os.kill(old, signal.SIGKILL)
    h.wait_for(lambda: d.storage_pid() not in (None, old), 10)
    r = None

    def resent():
        global r
        try:
            with h.Client(d.port) as c:
                r = up.send_chunk(c, off, seq)
        except Exception:
            return False
        return r.get("error") != 1027
    h.wait_for(resent, 15, 0.2)
    tap.ok(r and r.get("error") == 0 and r.get("trans_size") == len(up.data),
           "after a storage restart the resent final chunk still answers 0", repr(r))

    # A second daemon (another node) sharing Redis and the storage root answers it too.
    d2 = h.Daemon(workers=1, redis=redis, settings={"server": {"node": "node-b"},
                                                    "storage": {"root": d.root, "upload_ttl": 600}})
    try:
        d2.start()
        d2.wait_redis_connected(15)
        with h.Client(d2.port) as c:
            r = up.send_chunk(c, off, seq)
        tap.ok(r.get("error") == 0 and r.get("trans_size") == len(up.data),
               "another node sharing Redis and the root answers the resent final chunk 0", repr(r))
    except Exception as e:
        tap.ok(False, "another node sharing Redis and the root answers the resent final chunk 0", str(e))
    finally:
        d2.stop()

    # seq 1 of the same (uid, md5) starts afresh, then completes again.
    with h.Client(d.port) as c:
        r1 = up.send_chunk(c, 0, 1)
        s = up.sync(c)
        rec = redis.get_json(record_key(U1, up.md5))
        tap.ok(r1.get("error") == 0 and s.get("error") == 0 and s.get("trans_size") == 1000 and
               rec.get("state") == "uploading", "seq 1 of the same (uid, md5) starts a fresh upload", repr((s, rec)))
        r, _, _ = up.run(c, 1000, 2)
        tap.eq(r.get("error"), 0, "... which completes")
        r = up.send_chunk(c, off, seq)
        tap.eq(r.get("error"), 0, "... and its final chunk resent answers 0 again")

    # A storage process killed between publishing and recording it leaves the record "uploading"
    # with no staging entry: the resent final chunk is answered from the file's own MD5.
    def crash_window(u):
        rec = redis.get_json(record_key(U1, u.md5))
        rec["state"] = "uploading"
        rec.pop("version", None)
        redis.cmd("SETEX", record_key(U1, u.md5), 600, json.dumps(rec))
    crash_window(up)
    with h.Client(d.port) as c:
        r = up.send_chunk(c, off, seq)
    # The record's SETEX leaves with the answer: it may land just after it.
    h.wait_for(lambda: (redis.get_json(record_key(U1, up.md5)) or {}).get("state") == "published", 5)
    rec = redis.get_json(record_key(U1, up.md5)) or {}
    tap.ok(r.get("error") == 0 and r.get("trans_size") == len(up.data) and rec.get("state") == "published",
           "record left 'uploading' by a crash after publishing: the resent final chunk is checked by MD5, "
           "answered 0, and the record says published again", repr((r, rec)))

    # The name replaced by other bytes, or removed: 1012 as before.
    other = upload(rand.randbytes(len(up.data)), "done.bin")
    tap.eq(whole(other).get("error"), 0, "done.bin replaced by another file of the same size")
    with h.Client(d.port) as c:
        r = up.send_chunk(c, off, seq)
    tap.eq(r.get("error"), 1012, "the first file's final chunk resent: 1012 (the name holds other bytes)")
    crash_window(up)
    with h.Client(d.port) as c:
        r = up.send_chunk(c, off, seq)
    tap.eq(r.get("error"), 1012, "... also while the record says uploading: the name's MD5 differs from the chunk's")
    # Read once, then forgotten: a record that names a file holding other bytes must not make every
    # later final chunk read the whole file again (red team: a 185-byte request read 512 MiB each time).
    tap.ok(h.wait_for(lambda: redis.cmd("EXISTS", record_key(U1, up.md5)) == 0, 10, 0.05),
           "... and that record is deleted: the next resend is answered 1012 without reading the file")
    tap.ok(h.read_file(published(U1, "done.bin")) == other.data, "the replacement is untouched")
    os.remove(published(U1, "done.bin"))
    with h.Client(d.port) as c:
        r = other.send_chunk(c, *final_chunk(other))
    tap.eq(r.get("error"), 1012, "the final chunk resent after the file was removed: 1012")
    tap.ok(not os.path.exists(published(U1, "done.bin")), "nothing is published by it")


# ---------------------------------------------------------------- (4) names in text outputs
FORGED = 'x.bin" bytes=0 duration=0 result=1024 uid=1 name="y'
NAMES = [FORGED, "a name with  spaces.txt", 'say "hi".txt', "a" * 62 + "\u6587\u4ef6.txt",
         "b" * 61 + "\U0001F600" * 3, "\u00e9" * 100]
QUOTED = r'"((?:[^"\\]|\\.)*)"'
ACCESS_RE = re.compile(r'^(\S+) (\S+) uid=(\d+) (upload|download|avatar) name=' + QUOTED +
                       r' bytes=(\d+) duration=(\d+\.\d{3}) result=(\d+)$')


def unescape(s):
    out = bytearray()
    i = 0
    b = s.encode()
    while i < len(b):
        if b[i] == 0x5c:
            if b[i + 1] == ord("x"):
                out.append(int(b[i + 2:i + 4], 16))
                i += 4
            else:
                out.append(b[i + 1])
                i += 2
        else:
            out.append(b[i])
            i += 1
    return out.decode()


with tap.section("names in text outputs"):
    ups = [upload(rand.randbytes(1500 + i), n, chunk=1000) for i, n in enumerate(NAMES)]
    with h.Client(d.port) as c:
        # Leave each upload in progress at chunk 1 to see them in show transfers.
        for up in ups:
            up.send_chunk(c, 0, 1)
    js = resctl_stats("show", "transfers", "json")
    try:
        entries = json.loads(js)
        parsed = True
    except ValueError as e:
        entries, parsed = [], False
        tap.diag("invalid JSON: %s: %r" % (e, js[:400]))
    tap.ok(parsed, "show transfers json parses with names cut at 63 bytes")
    shown = {e.get("name") for e in entries if e.get("uid") == U1}
    want = set()
    for n in NAMES:
        b = n.encode()
        cut = b[:63]
        while True:
            try:
                want.add(cut.decode())
                break
            except UnicodeDecodeError:
                cut = cut[:-1]
    tap.eq(shown, want, "each name is shown whole or cut before the character that would pass 63 bytes")
    text = resctl_stats("show", "transfers").decode()
    rows = [l for l in text.splitlines() if l and not l.startswith("#")]
    row_re = re.compile(r'^(upload|avatar|download) (\d+) ' + QUOTED + r' (\d+) (\d+) (\d+) (\d+)$')
    got = set()
    bad = []
    for l in rows:
        m = row_re.match(l)
        if not m:
            bad.append(l)
        elif int(m.group(2)) == U1:
            got.add(unescape(m.group(3)))
    tap.ok(not bad and got == want, "show transfers text: every row has 7 columns, the name quoted and escaped",
           repr((bad, got ^ want)))
    metrics = resctl_stats("show", "metrics").decode()
    mbad = [l for l in metrics.splitlines() if l and not re.match(r'^(# (HELP|TYPE) \S+ .*|[a-z_]+(\{[a-z_]+="[^"\\]*"'
                                                                  r'(,[a-z_]+="[^"\\]*")*\})? -?[0-9.e+]+)$', l)]
    tap.ok(not mbad and "x.bin" not in metrics, "show metrics: every line is Prometheus text, no client name in it",
           repr(mbad[:5]))

    with h.Client(d.port) as c:
        for up in ups:
            r, _, _ = up.run(c, 1000, 2)
        for up in ups:
            h.download(c, up.name, U1, TOK[U1])
    tap.ok(all(h.read_file(published(U1, n)) == up.data for n, up in zip(NAMES, ups)), "all published identical")

    def access():
        try:
            with open(ACCESS, encoding="utf-8") as f:
                return f.read().splitlines()
        except OSError:
            return []
    h.wait_for(lambda: sum(1 for l in access() if "uid=%d" % U1 in l and "download" in l) >= len(NAMES), 5)
    lines = [l for l in access() if " uid=%d " % U1 in l]
    parsed = [ACCESS_RE.match(l) for l in lines]
    tap.ok(lines and all(parsed), "every access log line parses with the documented format",
           repr([l for l, m in zip(lines, parsed) if not m][:3]))
    seen = {}
    for m in parsed:
        if m:
            seen.setdefault(unescape(m.group(5)), []).append((m.group(4), int(m.group(6)), int(m.group(8))))
    bad = [(n, seen.get(n)) for n, up in zip(NAMES, ups)
           if ("upload", len(up.data), 0) not in seen.get(n, []) or ("download", len(up.data), 0) not in seen.get(n, [])]
    tap.ok(not bad, "each name comes back whole from its quoted field; the forged one cannot set bytes or result",
           repr(bad))
    tap.ok(not any(m and m.group(8) == "1024" for m in parsed), "no line reads result=1024")
    log = d.log_text()
    comp = re.compile(r'upload %d/[0-9a-f]{32} complete: ' % U1 + QUOTED + r', (\d+) bytes$', re.M)
    names_logged = {unescape(m.group(1)) for m in comp.finditer(log)}
    tap.ok(set(NAMES) <= names_logged, "error log: 'complete' lines carry each name quoted and escaped",
           repr(set(NAMES) - names_logged))

tap.ok(d.proc.poll() is None, "daemon still running")
d.stop()
tap.finish()

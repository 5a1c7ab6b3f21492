# test_download.py: chunked downloads (1033 -> 1034) and resctl download against the real daemon and Redis.
import base64
import json
import os
import subprocess
import sys

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=170)

DL = 1000                        # download_chunk
UPLOAD_TTL = 3600
U, V = 4001, 4002
NOKEY = 4999
TOK = {U: "tok-4001-download", V: "tok-4002-other"}
rand = __import__("random").Random(1033)


def rbytes(n):
    return rand.randbytes(n)


def is_num(v):
    return isinstance(v, int) and not isinstance(v, bool)


def nchunks(size):
    return max(1, -(-size // DL))


# ---------------------------------------------------------------- servers
redis = h.RedisServer().start()
for uid, tok in TOK.items():
    redis.set_token(uid, tok)

d = h.Daemon(workers=2, redis=redis, settings={
    "server": {"download_chunk": DL, "storage_timeout": 10},
    "storage": {"upload_ttl": UPLOAD_TTL},
})
tap.context.append(lambda: d.log_tail(12))
d.start_or_finish(tap)
tap.ok(d.wait_redis_connected(15), "daemon started; workers and storage connected to Redis")


def published(uid, name):
    return h.published(d, uid, name)   # with RESOURCED_TEST_BACKEND=rados: a copy fetched from RADOS


def upload(data, name, uid=U, what=None):
    up = h.Upload(data, name, uid, TOK[uid], chunk_size=65536)
    with h.Client(d.port) as c:
        r, _, _ = up.run(c)
    ok = r.get("error") == 0 and os.path.exists(published(uid, name)) and h.read_file(published(uid, name)) == data
    tap.ok(ok, what or "uploaded %s (%d bytes) for uid %d" % (name, len(data), uid), repr(r))
    return ok


def dl_request(c, name, seq, uid=U, token=None, client_path="C:/Users/u/Downloads/file", **extra):
    body = {"name": name, "seq": seq, "uid": uid, "token": TOK[U] if token is None else token,
            "client_path": client_path, "trans_size": "0", "total_size": "0"}
    body.update(extra)
    r = c.request(h.MSG_DOWNLOAD, body)
    return r, json.loads(c.last_raw)


def dl_key(uid, name):
    return "file_download_%d_%s" % (uid, name)


def redis_barrier(c):
    """Returns once every Redis write the worker serving c issued before now has landed: it starts a download
    of barrier.bin on c (a SETEX queued behind them on the worker's Redis connection) and polls for its key."""
    key = dl_key(U, "barrier.bin")
    redis.cmd("DEL", key)
    r, raw = dl_request(c, "barrier.bin", 1)
    landed = raw.get("error") == 0 and h.wait_for(lambda: redis.cmd("EXISTS", key) == 1, 5)
    redis.cmd("DEL", key)
    if not landed:
        tap.diag("redis barrier: no %s key appeared (%r)" % (key, raw))
    return landed


# ---------------------------------------------------------------- files
SIZES = [0, 1, 999, 1000, 1001, 2500, 10000, 123457]
files = {"dl-%d.bin" % n: rbytes(n) for n in SIZES}
files["résumé 文件 (1).txt"] = rbytes(3333)
with tap.section("uploads"):
    for name, data in files.items():
        upload(data, name)
    upload(rbytes(1500), "only-v.bin", uid=V)
    upload(rbytes(2 * DL), "barrier.bin")


# ---------------------------------------------------------------- whole downloads, field types
def check_download(name, data, client_path):
    """seq 1..n on one connection; every answer checked for types and values; returns the bytes."""
    out = []
    problems = []
    n = nchunks(len(data))
    with h.Client(d.port) as c:
        for seq in range(1, n + 1):
            r, raw = dl_request(c, name, seq, client_path=client_path)
            off = (seq - 1) * DL
            want_len = min(DL, len(data) - off)
            try:
                chunk = base64.b64decode(raw.get("data"), validate=True)
            except Exception as e:
                problems.append("seq %d: data not base64 (%r)" % (seq, e))
                break
            out.append(chunk)
            want = {"error": 0, "seq": seq, "total_size": str(len(data)), "current_size": str(off + want_len),
                    "is_last": seq == n, "name": name, "client_path": client_path}
            got = {k: raw.get(k) for k in want}
            if got != want or not is_num(raw.get("error")) or not is_num(raw.get("seq")) \
                    or len(chunk) != want_len:
                problems.append("seq %d: got %r (%d bytes), want %r (%d bytes)" % (seq, got, len(chunk), want, want_len))
            if raw.get("error") != 0:
                break
        # One past the end.
        r, raw = dl_request(c, name, n + 1, client_path=client_path)
        past = raw.get("error")
    body = b"".join(out)
    tap.ok(not problems, "%s: %d answer(s): error, seq numbers; total_size, current_size strings; is_last a bool; "
           "name and client_path echoed; current_size = offset + bytes" % (name, n), "\n".join(problems[:5]))
    tap.ok(body == data, "%s: seq 1..%d reassemble byte-identical (%d bytes)" % (name, n, len(data)),
           "got %d bytes, md5 %s; want md5 %s" % (len(body), h.md5_hex(body), h.md5_hex(data)))
    tap.ok(past == 1018 and is_num(past), "%s: seq %d (offset %d, at or past the end) answers 1018"
           % (name, n + 1, n * DL), repr(raw))
    return body


with tap.section("whole downloads"):
    for name, data in files.items():
        check_download(name, data, "D:/下载/%s.part" % name)

with tap.section("empty file"):
    with h.Client(d.port) as c:
        r, raw = dl_request(c, "dl-0.bin", 1, client_path="/home/u/empty")
        tap.ok(raw.get("error") == 0 and raw.get("data") == "" and raw.get("is_last") is True
               and raw.get("seq") == 1 and raw.get("total_size") == "0" and raw.get("current_size") == "0",
               "empty file: seq 1 answers data \"\", is_last true, total_size \"0\", current_size \"0\"", c.last_raw)
        r, raw = dl_request(c, "dl-0.bin", 2)
        tap.eq(raw.get("error"), 1018, "empty file: seq 2 answers 1018")
        redis_barrier(c)
    tap.eq(redis.cmd("EXISTS", dl_key(U, "dl-0.bin")), 0, "empty file: no download key left")

# ---------------------------------------------------------------- errors
with tap.section("errors"):
    with h.Client(d.port) as c:
        for label, kw, want in [
            ("a missing file", {"name": "no-such-file.bin"}, 1012),
            ("uid %d's file asked by uid %d with its own credentials" % (V, U), {"name": "only-v.bin"}, 1012),
            ("name '..'", {"name": ".."}, 1023),
            ("name 'a/b'", {"name": "a/b"}, 1023),
            ("name '.hidden'", {"name": ".hidden"}, 1023),
            ("name '../%d/only-v.bin'" % V, {"name": "../%d/only-v.bin" % V}, 1023),
            ("name empty", {"name": ""}, 1023),
            ("a bad token", {"name": "dl-1000.bin", "token": "wrong"}, 1010),
            ("uid %d with uid %d's token" % (V, U), {"name": "only-v.bin", "uid": V}, 1010),
            ("a uid without a token key", {"name": "dl-1000.bin", "uid": NOKEY}, 1011),
            ("seq 1000000 of a 1000-byte file", {"name": "dl-1000.bin", "seq": 1000000}, 1018),
            ("seq 2 of a 1000-byte file (offset = size)", {"name": "dl-1000.bin", "seq": 2}, 1018),
            ("seq \"x\"", {"name": "dl-1000.bin", "seq": "x"}, 1001),
            ("seq 0", {"name": "dl-1000.bin", "seq": 0}, 1017),
            ("client_path 42", {"name": "dl-1000.bin", "seq": 3, "client_path": 42}, 1001),
            ("name 42", {"name": 42, "seq": 4}, 1001),
        ]:
            name = kw.pop("name")
            seq = kw.pop("seq", 1)
            # Each request its own seq and client_path: an echo cannot come from another one.
            kw.setdefault("client_path", "C:/Users/u/Downloads/%s %s" % (seq, label))
            if seq == 1:
                seq = "%d" % (1 + len(label))   # a string form: echoed as a number
            r, raw = dl_request(c, name, seq, **kw)
            tap.ok(raw.get("error") == want and is_num(raw.get("error")),
                   "1033 of %s answers 1034 with error %d" % (label, want), c.last_raw)
            # Answers are matched to requests by seq, name and client_path (the Qt client reads seq):
            # errors echo them too, each as sent when it has its form, else 0 or "".
            echo = {"seq": int(seq) if str(seq).isdigit() else 0, "name": name if isinstance(name, str) else "",
                    "client_path": kw["client_path"] if isinstance(kw["client_path"], str) else ""}
            got = {k: raw.get(k) for k in echo}
            tap.ok(got == echo and is_num(raw.get("seq")) and isinstance(raw.get("message"), str)
                   and "data" not in raw and "is_last" not in raw,
                   "... and echoes seq, name and client_path %r" % (echo,), c.last_raw)
        # A body that is not JSON: nothing was read, so nothing is echoed; a clean 1001.
        c.send_raw(h.frame(h.MSG_DOWNLOAD, b'{"name": "dl-1000.bin", "seq": 2, "client_path": "x",'))
        raw = c.recv_json(h.MSG_DOWNLOAD + 1)
        tap.ok(raw.get("error") == 1001 and set(raw) == {"error", "message"} and "JSON" in raw.get("message", ""),
               "a malformed 1033 answers 1034 with only error 1001 and a message", c.last_raw)
        tap.eq(c.request(h.MSG_TEST, {"data": "open"}).get("data"), "open", "the connection stays open after errors")
        redis_barrier(c)
    tap.ok(not redis.cmd("KEYS", "file_download_*"), "refused downloads leave no download key",
           repr(redis.cmd("KEYS", "file_download_*")))
    # A file being uploaded is not visible until it is published.
    up = h.Upload(rbytes(3 * 4096), "in-progress.bin", U, TOK[U], chunk_size=4096)
    with h.Client(d.port) as c:
        r, _, _ = up.run(c, max_chunks=2)
        r2, raw = dl_request(c, "in-progress.bin", 1)
    tap.ok(r.get("error") == 0 and raw.get("error") == 1012,
           "1033 of a file whose upload is in progress answers 1012", "upload %r, download %r" % (r, raw))

# ---------------------------------------------------------------- stateless, request forms
with tap.section("stateless by offset"):
    data = files["dl-10000.bin"]
    with h.Client(d.port) as c:
        order = [3, 1, 3, 10, 2, 7, 7, 1]
        bad = []
        for seq in order:
            r, raw = dl_request(c, "dl-10000.bin", seq)
            got = base64.b64decode(raw.get("data") or "")
            if raw.get("error") != 0 or got != data[(seq - 1) * DL:seq * DL] or raw.get("seq") != seq:
                bad.append((seq, raw.get("error"), len(got)))
        tap.eq(bad, [], "seqs %r asked in that order on one connection all answer their own bytes" % order)
    with h.Client(d.port) as c:
        r, raw = dl_request(c, "dl-10000.bin", 5)
        tap.ok(raw.get("error") == 0 and base64.b64decode(raw["data"]) == data[4000:5000]
               and raw.get("current_size") == "5000", "a fresh connection may start at seq 5", c.last_raw[:200])
    with h.Client(d.port) as c:
        r, raw = dl_request(c, "dl-2500.bin", "3", uid=str(U))
        tap.ok(raw.get("error") == 0 and base64.b64decode(raw["data"]) == files["dl-2500.bin"][2000:]
               and raw.get("seq") == 3 and raw.get("is_last") is True,
               "seq and uid as decimal strings are accepted; seq echoed as a number", c.last_raw[:200])
        body = {"client_path": "C:/q", "name": "dl-1001.bin", "seq": 2, "token": TOK[U], "total_size": "0",
                "trans_size": "0", "uid": U}
        c.send_raw(h.frame(h.MSG_DOWNLOAD, json.dumps(body, indent=4)))
        raw = c.recv_json(h.MSG_DOWNLOAD + 1)
        tap.ok(raw.get("error") == 0 and base64.b64decode(raw["data"]) == files["dl-1001.bin"][1000:]
               and raw.get("is_last") is True, "a Qt-indented request body is accepted", c.last_raw[:200])

# ---------------------------------------------------------------- the download key in Redis
with tap.section("download key"):
    name = "dl-10000.bin"
    key = dl_key(U, name)
    redis.cmd("DEL", key)
    with h.Client(d.port) as c:
        dl_request(c, name, 1)
        rec = h.wait_for(lambda: redis.get_json(key), 5)
        ttl = redis.cmd("TTL", key)
        tap.ok(rec is not None and 0 < ttl <= UPLOAD_TTL,
               "after seq 1 of 10, %s exists with a TTL (%r, upload_ttl %d)" % (key, ttl, UPLOAD_TTL))
        rec = rec or {}
        tap.ok(rec.get("name") == name and rec.get("seq") == 1 and str(rec.get("total_size")) == "10000"
               and str(rec.get("trans_size")) == "1000",
               "its JSON holds name, seq 1, total_size 10000, trans_size 1000", repr(rec))
        for seq in range(2, 6):
            dl_request(c, name, seq)
        rec = h.wait_for(lambda: (lambda x: x if x and x.get("seq") == 5 else None)(redis.get_json(key)), 5)
        tap.ok(rec and str(rec.get("trans_size")) == "5000" and 0 < redis.cmd("TTL", key) <= UPLOAD_TTL,
               "after seq 5 it follows: seq 5, trans_size 5000, TTL set", repr(redis.get_json(key)))
        for seq in range(6, 11):
            r, raw = dl_request(c, name, seq)
        tap.ok(raw.get("is_last") is True, "seq 10 is the last chunk")
        gone = h.wait_for(lambda: redis.cmd("EXISTS", key) == 0, 5)
        tap.ok(gone, "after the last chunk the key is removed", repr(redis.cmd("GET", key)))
    # A single-chunk file leaves no key either.
    with h.Client(d.port) as c:
        r, raw = dl_request(c, "dl-999.bin", 1)
        tap.ok(raw.get("error") == 0 and raw.get("is_last") is True, "dl-999.bin comes in one chunk")
        redis_barrier(c)
    tap.eq(redis.cmd("EXISTS", dl_key(U, "dl-999.bin")), 0, "a single-chunk download leaves no key")

# ---------------------------------------------------------------- replacement during a download
def provenance(got, old, new):
    """Which download chunks of got came from the old and which from the new content."""
    src = []
    for i in range(0, len(got), DL):
        piece = got[i:i + DL]
        src.append("old" if piece == old[i:i + DL] else "new" if piece == new[i:i + DL] else "?")
    runs = []
    for k, tag in enumerate(src, 1):
        if runs and runs[-1][0] == tag:
            runs[-1][2] = k
        else:
            runs.append([tag, k, k])
    return "chunks " + ", ".join("%d-%d %s" % (a, b, t) for t, a, b in runs)


def replacement_case(label, old_size, new_size, first_chunks, interleave=None):
    """Downloads first_chunks of a file on one connection (then, with interleave, seq 1 of that other file on the
    same connection, as a client fetching two files over its one file connection would), replaces the file on
    another connection, then continues the first download on the same connection to the end."""
    name = "replace-%s.bin" % label
    old = rbytes(old_size)
    new = rbytes(new_size)
    if not upload(old, name, what="%s: old content (%d bytes) published" % (label, old_size)):
        return
    with h.Client(d.port) as c:
        parts = []
        last = None
        for seq in range(1, first_chunks + 1):
            r, raw = dl_request(c, name, seq)
            if raw.get("error") != 0:
                tap.ok(False, "%s: first %d chunks downloaded" % (label, first_chunks), repr(raw))
                return
            parts.append(base64.b64decode(raw["data"]))
        if interleave:
            r, raw = dl_request(c, interleave, 1)
            if raw.get("error") != 0:
                tap.ok(False, "%s: seq 1 of %s in between" % (label, interleave), repr(raw))
                return
        upload(new, name, what="%s: new content (%d bytes) uploaded to the same name on another connection"
               % (label, new_size))
        seq = first_chunks
        answers = []
        while seq < 10000:
            seq += 1
            r, raw = dl_request(c, name, seq)
            answers.append((seq, raw.get("error"), raw.get("total_size"), raw.get("current_size"), raw.get("is_last")))
            if raw.get("error") != 0:
                break
            parts.append(base64.b64decode(raw["data"]))
            last = raw
            if raw.get("is_last") is True:
                break
    got = b"".join(parts)
    which = "old" if got == old else "new" if got == new else "a mix"
    tap.ok(which != "a mix" and last is not None and last.get("is_last") is True,
           "%s: the download continued on the same connection ends with the old or the new content entirely (%s)"
           % (label, which),
           "got %d bytes md5 %s; old %d bytes md5 %s; new %d bytes md5 %s; %s; answers after the replacement %r"
           % (len(got), h.md5_hex(got), len(old), h.md5_hex(old), len(new), h.md5_hex(new), provenance(got, old, new),
              answers[:3] + ["..."] + answers[-3:]))
    with h.Client(d.port) as c:
        fresh, _ = h.download(c, name, U, TOK[U])
    tap.ok(fresh == new, "%s: a new download gets the new content" % label)


with tap.section("replacement during a download"):
    replacement_case("same-size", 20000, 20000, 5)
    replacement_case("shrinks", 20000, 7500, 4)
    replacement_case("grows", 9000, 25000, 3)
    replacement_case("interleaved", 20000, 20000, 5, interleave="dl-2500.bin")

# ---------------------------------------------------------------- resctl download
def resctl(*args, timeout=60):
    r = subprocess.run([h.RESCTL_BIN] + list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=timeout, text=True)
    return r.returncode, r.stdout, r.stderr


with tap.section("resctl download"):
    work = h.temp_dir("dl-out")
    addr = "127.0.0.1:%d" % d.port
    cred = ["--uid", str(U), "--token", TOK[U]]
    name = "dl-123457.bin"
    data = files[name]
    out = os.path.join(work, "out.bin")
    rc, so, se = resctl("download", addr, name, out, *cred)
    tap.ok(rc == 0 and os.path.exists(out) and h.read_file(out) == data,
           "resctl download fetches %s (%d bytes) byte-identical, exit 0" % (name, len(data)),
           "exit %r\nstdout %s\nstderr %s" % (rc, so, se))
    tap.ok(h.md5_hex(data) in so, "it prints the md5", so)
    # An existing OUTFILE is never resumed into nor overwritten without --force (test_resctl.py resumes).
    with open(out, "r+b") as f:
        f.truncate(54321)
    rc, so, se = resctl("download", addr, name, out, *cred)
    tap.ok(rc == 1 and "--force" in se and os.path.getsize(out) == 54321,
           "a second run refuses to overwrite the existing output, exit 1", "exit %r\n%s%s" % (rc, so, se))
    rc, so, se = resctl("download", addr, name, out, "--force", *cred)
    tap.ok(rc == 0 and h.read_file(out) == data, "with --force it replaces it byte-identical",
           "exit %r\n%s%s" % (rc, so, se))
    tap.ok(not os.path.exists(out + ".resctl-part") and not os.path.exists(out + ".resctl-state"),
           "no partial or state file is left after success")
    missing = os.path.join(work, "missing.bin")
    rc, so, se = resctl("download", addr, "no-such-name.bin", missing, *cred)
    tap.ok(rc == 1, "resctl download of a missing name exits 1", "exit %r\nstdout %s\nstderr %s" % (rc, so, se))
    tap.ok(not os.path.exists(missing) and not os.path.exists(missing + ".resctl-part"),
           "and leaves no output or partial file behind")
    rc, so, se = resctl("download", addr, name, os.path.join(work, "badtok.bin"), "--uid", str(U), "--token", "bad")
    tap.ok(rc == 1, "resctl download with a bad token exits 1", "exit %r\n%s%s" % (rc, so, se))
    empty_out = os.path.join(work, "empty.bin")
    rc, so, se = resctl("download", addr, "dl-0.bin", empty_out, *cred)
    tap.ok(rc == 0 and os.path.exists(empty_out) and os.path.getsize(empty_out) == 0,
           "resctl download of the empty file makes an empty file", "exit %r\n%s%s" % (rc, so, se))

if h.TEST_BACKEND == "rados":
    tap.skip("a symbolic link as <root>/<uid>", "the file system backend's directories")
else:
    with tap.section("a symbolic link as <root>/<uid>"):
        # Someone with write access to the root plants <root>/<uid> -> a directory elsewhere: the
        # server must neither serve from there nor publish into it.
        W = 4009
        TOK[W] = "tok-%d" % W
        redis.set_token(W, TOK[W])
        outside = h.temp_dir("outside")
        with open(os.path.join(outside, "secret.txt"), "wb") as f:
            f.write(b"not under the root")
        link = os.path.join(d.root, str(W))
        os.symlink(outside, link)
        with h.Client(d.port) as c:
            r, _ = dl_request(c, "secret.txt", 1, uid=W, token=TOK[W])
        tap.eq(r.get("error"), 1012, "a download through the link is 1012 (no such file), not the file outside")
        up = h.Upload(rbytes(70000), "planted.bin", W, TOK[W], chunk_size=65536)
        with h.Client(d.port) as c:
            r, _, _ = up.run(c)
        tap.eq(r.get("error"), 1014, "an upload whose user directory is a link ends in 1014")
        tap.eq(sorted(os.listdir(outside)), ["secret.txt"], "nothing was written through the link")
        tap.ok(d.log_count("is not a directory") >= 1, "the log says why", d.log_tail(5))
        os.unlink(link)
        upload(rbytes(70000), "after-link.bin", uid=W, what="with the link gone, the same user uploads normally")


with tap.section("daemon still healthy"):
    tap.ok(d.ping(), "1001 still answered at the end")
    died = [l for l in d.log_text().splitlines() if "killed by signal" in l or "exited with status" in l]
    tap.eq(died, [], "the log shows no child death")
    rc, left = d.stop()
    tap.ok(rc == 0 and not left, "TERM stops the daemon cleanly", "exit %r, left %r" % (rc, left))

tap.finish()

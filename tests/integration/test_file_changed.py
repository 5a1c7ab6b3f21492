# test_file_changed.py: a file replaced during its download is never delivered as a mix: old to its end, or 1029.
import base64
import json
import os
import sys

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=150)

DL = 1000                        # download_chunk
CHUNKS = 8                       # every test file is CHUNKS download chunks
U = 4101
TOK = {U: "tok-4101-changed"}
FILE_CHANGED = 1029
rand = __import__("random").Random(1029)


def rbytes(n):
    return rand.randbytes(n)


# ---------------------------------------------------------------- servers
redis = h.RedisServer().start()
redis.set_token(U, TOK[U])
d = h.Daemon(workers=2, redis=redis, settings={
    "server": {"download_chunk": DL, "storage_timeout": 5},
})
tap.context.append(lambda: d.log_tail(12))
d.start_or_finish(tap)
tap.ok(d.wait_redis_connected(15), "daemon started; workers and storage connected to Redis")


def upload(data, name):
    up = h.Upload(data, name, U, TOK[U], chunk_size=65536)
    with h.Client(d.port) as c:
        r, _, _ = up.run(c)
    return r.get("error") == 0 and h.read_file(h.published(d, U, name)) == data


def dl(c, name, seq):
    body = {"name": name, "seq": seq, "uid": U, "token": TOK[U], "client_path": "/tmp/x",
            "trans_size": "0", "total_size": "0"}
    c.request(h.MSG_DOWNLOAD, body)
    raw = json.loads(c.last_raw)
    data = base64.b64decode(raw["data"]) if raw.get("error") == 0 else None
    return raw, data


def dl_key(name):
    return "file_download_%d_%s" % (U, name)


def record_at(name, seq):
    """Waits until the download record of name says seq (the worker writes it after answering); returns it."""
    return h.wait_for(lambda: (lambda r: r if r and r.get("seq") == seq else None)(redis.get_json(dl_key(name))), 5)


def verdict(got, old, new):
    """'old' or 'new' when got is a prefix of one of them (the whole of it when complete), else 'a mix'."""
    if old[:len(got)] == got:
        return "old"
    if new[:len(got)] == got:
        return "new"
    return "a mix"


def replace_all(names, new):
    ok = all(upload(new[n], n) for n in names)
    tap.ok(ok, "all %d files replaced by new content of the same size on another connection" % len(names))


# ---------------------------------------------------------------- record
with tap.section("the download record carries the version"):
    name = "rec.bin"
    data = rbytes(CHUNKS * DL)
    tap.ok(upload(data, name), "uploaded %s" % name)
    with h.Client(d.port) as c:
        dl(c, name, 1)
        r1 = record_at(name, 1)
        dl(c, name, 2)
        r2 = record_at(name, 2)
    v = (r1 or {}).get("version")
    tap.ok(isinstance(v, str) and v != "", "chunk 1 records the version it started from", repr(r1))
    tap.ok(r2 is not None and r2.get("version") == v, "chunk 2 keeps that version in the record", repr(r2))

# ---------------------------------------------------------------- one connection, many files
with tap.section("one connection, six files in turn, all replaced"):
    names = ["turn-%d.bin" % i for i in range(6)]
    old = {n: rbytes(CHUNKS * DL) for n in names}
    new = {n: rbytes(CHUNKS * DL) for n in names}
    tap.ok(all(upload(old[n], n) for n in names), "uploaded %d files" % len(names))
    got = {n: b"" for n in names}
    errors = {n: [] for n in names}
    with h.Client(d.port) as c:
        # Round robin: chunk k of every file, then chunk k + 1. A connection holds 4 files open, so
        # chunk 2 of each of six files is read from a freshly opened file and checked against its record.
        for seq in range(1, CHUNKS + 1):
            if seq == 3:
                for n in names:
                    record_at(n, 2)
                replace_all(names, new)
            for n in names:
                if errors[n]:
                    continue
                raw, data = dl(c, n, seq)
                if raw.get("error") == 0:
                    got[n] += data
                else:
                    errors[n].append((seq, raw.get("error")))
        verdicts = {n: verdict(got[n], old[n], new[n]) for n in names}
        tap.ok(all(v != "a mix" for v in verdicts.values()), "no file came back as a mix of old and new bytes",
               repr(verdicts))
        # The connection holds the four files it read last before the replacement (turn-2..5); a 1029
        # answer opens nothing new, so they stay held to their end.
        evicted, held = names[:2], names[2:]
        tap.ok(all(errors[n] == [(3, FILE_CHANGED)] for n in evicted),
               "the files no longer held open answer 1029 at their first chunk after the replacement",
               repr(errors))
        tap.ok(all(got[n] == old[n][:2 * DL] for n in evicted), "the chunks before it were the old bytes")
        tap.ok(all(not errors[n] and got[n] == old[n] for n in held),
               "the files still held open come back old, whole", repr({n: errors[n] for n in held}))
        # Told to start over, the client gets the new file whole, on the same connection.
        restarted = {}
        for n in names:
            body = b""
            for seq in range(1, CHUNKS + 1):
                raw, data = dl(c, n, seq)
                if raw.get("error") != 0:
                    break
                body += data
            restarted[n] = body == new[n]
        tap.ok(all(restarted.values()), "starting again at seq 1 gives the new content byte for byte",
               repr(restarted))

with tap.section("one connection, five files in turn: the ones held open end old, the other says 1029"):
    names = ["held-%d.bin" % i for i in range(5)]
    old = {n: rbytes(CHUNKS * DL) for n in names}
    new = {n: rbytes(CHUNKS * DL) for n in names}
    tap.ok(all(upload(old[n], n) for n in names), "uploaded %d files" % len(names))
    got = {n: b"" for n in names}
    errors = {n: [] for n in names}
    with h.Client(d.port) as c:
        for n in names:                     # three chunks of each file, one file after the other
            for seq in range(1, 4):
                raw, data = dl(c, n, seq)
                got[n] += data or b""
        for n in names:
            record_at(n, 3)
        replace_all(names, new)
        for n in names:                     # then each file to its end, in the same order
            for seq in range(4, CHUNKS + 1):
                raw, data = dl(c, n, seq)
                if raw.get("error") != 0:
                    errors[n].append((seq, raw.get("error")))
                    break
                got[n] += data
    tap.ok(all(verdict(got[n], old[n], new[n]) != "a mix" for n in names), "no file came back as a mix")
    tap.eq(errors[names[0]], [(4, FILE_CHANGED)], "the first file (no longer held open) answers 1029")
    tap.ok(all(got[n] == old[n] and not errors[n] for n in names[1:]),
           "the four files the connection still held came back old, whole", repr({n: errors[n] for n in names}))

# ---------------------------------------------------------------- a new connection
with tap.section("a download resumed on a new connection"):
    name = "resume.bin"
    old = rbytes(CHUNKS * DL)
    new = rbytes(CHUNKS * DL)
    tap.ok(upload(old, name), "uploaded %s" % name)
    got = b""
    with h.Client(d.port) as c:
        for seq in range(1, 4):
            got += dl(c, name, seq)[1] or b""
    record_at(name, 3)
    with h.Client(d.port) as c:            # not replaced: the resume goes on
        raw, data = dl(c, name, 4)
        tap.ok(raw.get("error") == 0 and data == old[3 * DL:4 * DL],
               "resumed at seq 4 on a new connection, the unchanged file is served", c.last_raw[:200])
        got += data or b""
    record_at(name, 4)
    tap.ok(upload(new, name), "replaced by new content of the same size")
    answers = []
    with h.Client(d.port) as c:
        for seq in range(5, CHUNKS + 1):
            raw, data = dl(c, name, seq)
            answers.append(raw.get("error"))
            if raw.get("error") != 0:
                break
            got += data
    tap.eq(answers, [FILE_CHANGED], "resumed at seq 5 on another new connection after the replacement: 1029")
    tap.ok(verdict(got, old, new) == "old" and len(got) == 4 * DL, "what was delivered is the old file's first chunks")
    tap.ok(raw.get("error") == FILE_CHANGED and "seq 1" in (raw.get("message") or ""),
           "the 1029 answer's message tells the client to start again at seq 1", json.dumps(raw)[:200])
    with h.Client(d.port) as c:
        fresh, _ = h.download(c, name, U, TOK[U])
    tap.ok(fresh == new, "a download from seq 1 gets the new file")

with tap.section("two devices on one name: a replace between their starts is never served as a mix"):
    # Device A starts on the old file, the file is replaced, device B starts on the new one (its
    # record is written after A's). A then resumes on a new connection: it must hear 1029, never get
    # the new file's chunks after the old one's.
    name = "twodev.bin"
    old = rbytes(CHUNKS * DL)
    new = rbytes(CHUNKS * DL)
    tap.ok(upload(old, name), "uploaded %s" % name)
    got_a = b""
    with h.Client(d.port) as a:
        for seq in range(1, 4):
            got_a += dl(a, name, seq)[1] or b""
    record_at(name, 3)
    tap.ok(upload(new, name), "replaced by new content of the same size")
    got_b = b""
    with h.Client(d.port) as b:
        for seq in range(1, 3):
            got_b += dl(b, name, seq)[1] or b""
    record_at(name, 2)
    answers = []
    with h.Client(d.port) as a:
        for seq in range(4, CHUNKS + 1):
            raw, data = dl(a, name, seq)
            answers.append(raw.get("error"))
            if raw.get("error") != 0:
                break
            got_a += data
    tap.eq(answers, [FILE_CHANGED], "device A resumed at seq 4 on a new connection after B started the new file: 1029")
    tap.ok(verdict(got_a, old, new) == "old", "device A holds only old bytes", verdict(got_a, old, new))

with tap.section("without a record: the current file is served and recorded"):
    name = "norecord.bin"
    data = rbytes(CHUNKS * DL)
    tap.ok(upload(data, name), "uploaded %s" % name)
    redis.cmd("DEL", dl_key(name))
    with h.Client(d.port) as c:
        raw, got = dl(c, name, 3)
    tap.ok(raw.get("error") == 0 and got == data[2 * DL:3 * DL], "seq 3 with no record is served", c.last_raw[:200])
    rec = record_at(name, 3)
    tap.ok(rec is not None and isinstance(rec.get("version"), str), "and its version is recorded", repr(rec))

with tap.section("Redis down: a later chunk that cannot be checked is 1027, not a guess"):
    name = "redisdown.bin"
    data = rbytes(CHUNKS * DL)
    tap.ok(upload(data, name), "uploaded %s" % name)
    fill = ["fill-%d.bin" % i for i in range(4)]
    tap.ok(all(upload(rbytes(DL), n) for n in fill), "uploaded four one-chunk files")
    with h.Client(d.port) as c, h.Client(d.port) as stranger:
        dl(c, name, 1)
        record_at(name, 1)
        for n in fill:                      # push the file out of what the connection holds open
            dl(c, n, 1)
        dl(stranger, fill[0], 1)            # its credentials are trusted before Redis goes
        redis.stop()
        raw, _ = dl(stranger, name, 2)
        tap.eq(raw.get("error"), 1027, "seq 2 on another connection (a freshly opened file it has no view of) while "
               "Redis is down answers 1027")
        raw, got = dl(c, name, 2)
        tap.ok(raw.get("error") == 0 and got == data[DL:2 * DL],
               "seq 2 on the connection that started it, reopened at the version it remembers, needs no Redis: "
               "served", repr(raw.get("error")))
        redis.start()
        redis.set_token(U, TOK[U])
        ok = h.wait_for(lambda: dl(stranger, name, 2)[0].get("error") == 0, 15, 0.2)
        tap.ok(ok, "after Redis is back, the other connection's chunk is served")

tap.ok(d.log_count("AddressSanitizer") == 0 and d.log_count("fatal") == 0, "no crash or fatal error in the log")
d.stop()
redis.stop()
tap.finish()

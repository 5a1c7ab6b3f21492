# test_direct_answer.py: chunks answered by the storage process's disk threads (design.md, "The direct answer"): answers whole and in order per upload and per link with many uploads on one worker, and none lost or wrong when storage is killed right after one.
import hashlib
import os
import signal
import struct
import sys
import threading

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=170)

UID, TOKEN = 4301, "tok-4301-direct"
rand = __import__("random").Random(20261201)
HELLO, OPEN, CHUNK = 1041, 1043, 1045
SMALL = 16 * 1024        # under DIRECT_MAX: answered by the disk thread when nothing waits behind it
BIG = 192 * 1024         # over it: answered by the loop


def bin_upload(d, data, name, chunk, window):
    """A fast-path upload with a window of chunks in flight; returns the acknowledgements in arrival order."""
    c = d.connect()
    try:
        r = c.request(HELLO, {"uid": UID, "token": TOKEN})
        assert r.get("error") == 0, r
        n = name.encode()
        c.send_raw(h.HEADER.pack(OPEN, 43 + len(n)) + struct.pack(">QB", len(data), 0) +
                   hashlib.md5(data).hexdigest().encode() + struct.pack(">H", len(n)) + n)
        mid, body = c.recv_frame(30)
        assert mid == OPEN + 1 and struct.unpack(">I", body[:4])[0] == 0, (mid, body[:80])
        offsets = list(range(0, len(data), chunk))
        acks, sent = [], 0
        while len(acks) < len(offsets):
            while sent < len(offsets) and sent - len(acks) < window:
                off = offsets[sent]
                piece = data[off:off + chunk]
                flags = 1 if off + len(piece) == len(data) else 0
                c.send_raw(h.HEADER.pack(CHUNK, 16 + len(piece)) + struct.pack(">QII", off, len(piece), flags) + piece)
                sent += 1
            mid, body = c.recv_frame(30)
            assert mid == CHUNK + 1, (mid, body[:200])
            err, off, length, committed, total = struct.unpack(">IQIQQ", body[:32])
            acks.append((err, off, length, committed))
        return acks
    finally:
        c.close()


redis = h.RedisServer().start()
redis.set_token(UID, TOKEN)
# One worker: every connection below shares its one link to the storage process.
d = h.Daemon(workers=1, redis=redis, settings={"server": {"storage_timeout": 10, "max_frame": 1 << 20}}, stats=True)
tap.context.append(lambda: d.log_tail(15))
d.start_or_finish(tap)
tap.ok(d.wait_redis_connected(15), "daemon started and connected to Redis")


def published(name):
    return h.published_bytes(d, UID, name)


tap.section("many uploads on one link: every answer whole, in order, naming its own chunk")
# Stop-and-wait JSON uploads of small chunks (answered by disk threads), JSON uploads sending 4 at a
# time and large chunks (answered by the loop), and binary windows of small chunks (both, mixed), all
# at once through one worker: the answers of disk threads and of the loop share one link.
jobs = []
for i in range(4):
    jobs.append(("json-wait-%d" % i, rand.randbytes(40 * SMALL + 777), SMALL, 1, "json"))
for i in range(2):
    jobs.append(("json-window-%d" % i, rand.randbytes(24 * SMALL + 3), SMALL, 4, "json"))
jobs.append(("json-big", rand.randbytes(6 * BIG + 11), BIG, 1, "json"))
for i in range(3):
    jobs.append(("bin-small-%d" % i, rand.randbytes(48 * SMALL + 5), SMALL, 8, "binary"))
results = {}


def run(job):
    name, data, chunk, window, proto = job
    try:
        if proto == "binary":
            acks = bin_upload(d, data, name, chunk, window)
            want = [(0, off, min(chunk, len(data) - off), min(off + chunk, len(data)))
                    for off in range(0, len(data), chunk)]
            results[name] = (acks == want, "%d acks, first wrong: %r" % (
                len(acks), next(((a, w) for a, w in zip(acks, want) if a != w), None)))
            return
        up = h.Upload(data, name, UID, TOKEN, chunk_size=chunk)
        with d.connect(timeout=30) as c:
            if window == 1:
                up.run(c)
            else:
                up.run_pipelined(c, window=window)
        got = [(r.get("error"), r.get("seq"), r.get("trans_size")) for r in up.responses]
        want = [(0, i + 1, min((i + 1) * chunk, len(data))) for i in range(-(-len(data) // chunk))]
        results[name] = (got == want, "%d answers, first wrong: %r" % (
            len(got), next(((a, w) for a, w in zip(got, want) if a != w), None)))
    except Exception as e:   # noqa: BLE001 - reported as a failure below
        results[name] = (False, repr(e))


threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
for t in threads:
    t.start()
for t in threads:
    t.join(120)
for name, data, chunk, window, proto in jobs:
    ok, why = results.get(name, (False, "no result"))
    tap.ok(ok, "%s (%s, %d KiB chunks, %d in flight): every answer in order with its chunk's seq and size"
           % (name, proto, chunk // 1024, window), why)
tap.ok(all(published(j[0]) == j[1] for j in jobs), "all %d files are published byte-identical" % len(jobs))
direct = h.stats_info(d).get("chunks_answered_direct", 0)
tap.ok(direct >= 4 * 30, "disk threads answered most stop-and-wait chunks themselves (%d)" % direct)

tap.section("storage killed right after a chunk's answer")
# A stop-and-wait upload of small chunks: each answer comes from the disk thread, before the loop has
# taken the write's completion. SIGKILL right after an answer; whatever was acknowledged must be in
# the staging file and be reported by the next storage process.
data = rand.randbytes(30 * SMALL + 99)
md5 = hashlib.md5(data).hexdigest()
up = h.Upload(data, "killed.bin", UID, TOKEN, chunk_size=SMALL)
part = os.path.join(d.root, ".staging", "%d-%s.part" % (UID, md5))


def synced():
    """1005 once the new storage process answers it (1027 while its link comes up)."""
    try:
        with d.connect(timeout=15) as c:
            s = up.sync(c)
            return s if s.get("error") == 0 else None
    except (OSError, h.ProtocolError):
        return None


offset, seq, acked = 0, 1, 0
for round_no, stop_after in enumerate((3, 5, 9)):
    if seq > 1:
        s = h.wait_for(synced, 20) or {}
        tap.ok(s.get("trans_size", -1) >= acked,
               "kill %d: the new storage process reports at least the %d bytes acknowledged" % (round_no, acked), str(s))
        offset, seq = s.get("trans_size", 0), s.get("seq", 0) + 1
    with d.connect(timeout=30) as c:
        r, offset, seq = up.run(c, offset, seq, max_chunks=stop_after)
        acked = r.get("trans_size", 0)
        old = d.storage_pid()
        os.kill(old, signal.SIGKILL)
    tap.ok(r.get("error") == 0 and acked > 0, "kill %d: chunks acknowledged up to %d" % (round_no, acked), str(r))
    held = h.read_file(part) if os.path.exists(part) else b""
    tap.ok(len(held) >= acked and held[:acked] == data[:acked],
           "kill %d: the staging file holds every acknowledged byte" % round_no,
           "staging file %d bytes, acknowledged %d" % (len(held), acked))
    tap.ok(h.wait_for(lambda: d.storage_pid() not in (None, old) and d.ping(), 15),
           "kill %d: a new storage process runs" % round_no)
s = h.wait_for(synced, 20) or {}
tap.ok(s.get("trans_size", -1) >= acked, "after the last kill, 1005 reports the acknowledged bytes", str(s))
with d.connect(timeout=30) as c:
    r, _, _ = up.run(c, s.get("trans_size", 0), s.get("seq", 0) + 1)
tap.ok(r.get("error") == 0 and published("killed.bin") == data, "the upload finishes byte-identical", str(r))
tap.section("a middle chunk after a publish that failed")
# The final chunk's publish fails but keeps the upload (here: <root>/<uid> is a file, so the rename
# fails); committed then equals total_size. A middle chunk resent after that must not be answered
# "0, trans_size == total_size" by a disk thread while nothing is published (the review found it was,
# and the loop then published and answered the same request a second time).
UID2, TOKEN2 = 4302, "tok-4302-direct"
redis.set_token(UID2, TOKEN2)
with open(os.path.join(d.root, str(UID2)), "w") as f:
    f.write("not a directory\n")
data = rand.randbytes(4 * SMALL + 5)
up = h.Upload(data, "unpublishable.bin", UID2, TOKEN2, chunk_size=SMALL)
with d.connect(timeout=30) as c:
    r, _, _ = up.run(c)
    tap.ok(r.get("error") not in (None, 0), "the final chunk's publish fails (%r)" % r.get("error"), str(r))
    r2 = up.send_chunk(c, SMALL, 2)
    tap.ok(not (r2.get("error") == 0 and r2.get("trans_size") == len(data)),
           "a middle chunk resent then is not answered 'complete' (%r)" % r2.get("error"), str(r2))
    s = up.sync(c)
tap.ok(s.get("trans_size", 0) == len(data) and not os.path.exists(os.path.join(d.root, str(UID2), "unpublishable.bin")),
       "nothing was published; 1005 still reports the whole file staged", str(s))
tap.ok("AddressSanitizer" not in d.log_text() and "runtime error" not in d.log_text(), "no sanitizer report in the log")
d.stop()
tap.finish()

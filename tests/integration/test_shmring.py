# test_shmring.py: the shared ring between a worker and the storage process ([server] link_ring): uploads byte-identical through it, a stalled chunk that holds it, storage and worker killed with chunks in it, and link_ring = 0.
import hashlib
import os
import signal
import struct
import sys

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=150)

UID, TOKEN = 4201, "tok-4201-ring"
rand = __import__("random").Random(20261202)
HELLO, OPEN, CHUNK = 1041, 1043, 1045
CHUNK_LAST = 1
RING = 1 << 20          # the smallest ring: a few chunks fill it
CH = 256 * 1024          # received straight into the ring (at least 64 KiB)


class Bin:
    """A fast-path client on one connection (docs/protocol.md §13)."""

    def __init__(self, daemon):
        self.c = daemon.connect()
        r = self.c.request(HELLO, {"uid": UID, "token": TOKEN})
        assert r.get("error") == 0, r

    def close(self):
        self.c.close()

    def open(self, data, name):
        n = name.encode()
        md5 = hashlib.md5(data).hexdigest()
        self.c.send_raw(h.HEADER.pack(OPEN, 43 + len(n)) + struct.pack(">QB", len(data), 0) + md5.encode() +
                        struct.pack(">H", len(n)) + n)
        mid, body = self.c.recv_frame(30)
        assert mid == OPEN + 1, mid
        err, committed, total, mlen = struct.unpack(">IQQH", body[:22])
        return {"error": err, "committed": committed, "message": body[22:22 + mlen].decode()}

    @staticmethod
    def frame(data, off, chunk=CH):
        piece = data[off:off + chunk]
        flags = CHUNK_LAST if off + len(piece) == len(data) else 0
        return h.HEADER.pack(CHUNK, 16 + len(piece)) + struct.pack(">QII", off, len(piece), flags) + piece

    def ack(self, timeout=30):
        mid, body = self.c.recv_frame(timeout)
        assert mid == CHUNK + 1, (mid, body[:200])
        err, off, length, committed, total, mlen = struct.unpack(">IQIQQH", body[:34])
        return {"error": err, "offset": off, "committed": committed, "message": body[34:34 + mlen].decode()}

    def upload(self, data, start, window=8, chunk=CH):
        """Sends data[start:] in pipelined chunks; returns the acknowledgements."""
        offsets = list(range(start, len(data), chunk)) or [start]
        acks, sent = [], 0
        while len(acks) < len(offsets):
            while sent < len(offsets) and sent - len(acks) < window:
                self.c.send_raw(self.frame(data, offsets[sent], chunk))
                sent += 1
            acks.append(self.ack())
        return acks

    def resume(self, data, name):
        """Opens the upload again and sends the rest from what the server holds."""
        o = self.open(data, name)
        if o["error"] != 0:
            return [o]
        return self.upload(data, o["committed"])


def ring_maps(pid):
    """How many shared rings the process maps (the memfd's name shows in /proc/PID/maps)."""
    try:
        with open("/proc/%d/maps" % pid) as f:
            return sum(1 for line in f if "resourced-ring" in line)
    except (OSError, TypeError):
        return 0


redis = h.RedisServer().start()
redis.set_token(UID, TOKEN)
# One worker: every connection below shares its one ring.
d = h.Daemon(workers=1, redis=redis, settings={"server": {"storage_timeout": 10, "link_ring": RING}}, stats=True)
tap.context.append(lambda: d.log_tail(15))
d.start_or_finish(tap)
tap.ok(d.wait_redis_connected(15), "daemon started and connected to Redis")


def published(name):
    return h.published_bytes(d, UID, name)


tap.section("through the ring")
tap.ok(h.wait_for(lambda: ring_maps(d.storage_pid()) == 1, 15), "the storage process maps the worker's ring",
       str(ring_maps(d.storage_pid())))
tap.ok(h.wait_for(lambda: all(ring_maps(p) == 1 for p in d.worker_pids()), 5), "and so does the worker")
data = rand.randbytes(6 * CH + 12345)
b = Bin(d)
o = b.open(data, "ring.bin")
acks = b.upload(data, o["committed"])
tap.ok(all(a["error"] == 0 for a in acks) and published("ring.bin") == data,
       "a binary upload of chunks received straight into the ring: published byte-identical",
       str([a for a in acks if a["error"]][:3]))
small = rand.randbytes(40 * 1024 + 7)
o = b.open(small, "small.bin")
acks = b.upload(small, 0, chunk=4096)
tap.ok(all(a["error"] == 0 for a in acks) and published("small.bin") == small,
       "small chunks (copied into the ring from their frame): byte-identical")
b.close()
jdata = rand.randbytes(300 * 1024 + 3)
with d.connect() as c:
    rs = h.Upload(jdata, "json.bin", UID, TOKEN, chunk_size=65536).run_pipelined(c)
tap.ok(all(r.get("error") == 0 for r in rs) and published("json.bin") == jdata,
       "a JSON upload (base64 decoded into the ring): byte-identical")
counts = h.stats_info(d)
by_ring, copied = counts.get("chunks_by_ring", 0), counts.get("chunks_copied", 0)
tap.ok(by_ring + copied == 7 + 11 + 5 and by_ring > copied,
       "the stats page counts each of those 23 chunks once, most through the ring (%d, %d copied)" % (by_ring, copied),
       repr(counts))

# Several connections at once: together they want more than the worker lets go to storage
# unanswered (half the ring), so they take turns.
import threading  # noqa: E402
files = [rand.randbytes(8 * CH + i) for i in range(6)]
results = [None] * len(files)


def one(i):
    try:
        c = Bin(d)
        o = c.open(files[i], "many-%d.bin" % i)
        results[i] = c.upload(files[i], o["committed"])
        c.close()
    except Exception as e:   # reported below
        results[i] = e


threads = [threading.Thread(target=one, args=(i,)) for i in range(len(files))]
for t in threads:
    t.start()
for t in threads:
    t.join(60)
tap.ok(all(isinstance(r, list) and all(x["error"] == 0 for x in r) for r in results) and
       all(published("many-%d.bin" % i) == f for i, f in enumerate(files)),
       "6 connections uploading 2 MiB each at once, windows of 2 MiB: all byte-identical",
       str([r for r in results if not isinstance(r, list)][:2]))

tap.section("a stalled chunk holds the ring")
# Connection A sends the headers and a part of a chunk, then stops: its slot stays taken, so the
# ring cannot be reused past it. Connection B must still get through (its chunks are copied).
a_data = rand.randbytes(3 * CH)
a = Bin(d)
tap.eq(a.open(a_data, "stalled.bin")["error"], 0, "A opens its upload")
frame_a = Bin.frame(a_data, 0)
a.c.send_raw(frame_a[:len(frame_a) // 3])
b_data = rand.randbytes(12 * CH + 99)
b = Bin(d)
o = b.open(b_data, "beside.bin")
acks = b.upload(b_data, o["committed"])
tap.ok(all(x["error"] == 0 for x in acks) and published("beside.bin") == b_data,
       "B uploads 3 MiB through a 1 MiB ring that A holds: byte-identical", str([x for x in acks if x["error"]][:3]))
counts = h.stats_info(d)
tap.ok(counts.get("chunks_ring_waits", 0) >= 1,
       "B's first chunk waited in its socket for room in the ring (%r waits)" % counts.get("chunks_ring_waits"))
tap.ok(counts.get("chunks_copied", 0) >= 1,
       "and, the ring pinned, B's chunks went over the link instead (%r copied)" % counts.get("chunks_copied"))
a.c.send_raw(frame_a[len(frame_a) // 3:])
first = a.ack()
tap.eq(first["error"], 0, "A's chunk, completed later, is acknowledged")
rest = a.upload(a_data, CH)
tap.ok(all(x["error"] == 0 for x in rest) and published("stalled.bin") == a_data, "and A's file is byte-identical")
a.close()
b.close()
# A client that leaves in the middle of a chunk gives its slot back: the ring is usable afterwards.
for i in range(3):
    q = Bin(d)
    q.open(a_data, "left-%d.bin" % i)
    q.c.send_raw(frame_a[:len(frame_a) // 2])
    q.close()
b = Bin(d)
o = b.open(data, "after-leavers.bin")
acks = b.upload(data, o["committed"])
tap.ok(all(x["error"] == 0 for x in acks) and published("after-leavers.bin") == data,
       "after three clients left in the middle of a chunk, uploads go on: byte-identical")
b.close()

tap.section("storage killed with a chunk half received")
s_data = rand.randbytes(6 * CH + 5)
b = Bin(d)
tap.eq(b.open(s_data, "storage-kill.bin")["error"], 0, "the upload opens")
b.c.send_raw(Bin.frame(s_data, 0))
tap.eq(b.ack()["error"], 0, "chunk 1 is acknowledged")
frame2 = Bin.frame(s_data, CH)
b.c.send_raw(frame2[:len(frame2) // 2])
old = d.storage_pid()
os.kill(old, signal.SIGKILL)
tap.ok(h.wait_for(lambda: d.storage_pid() not in (None, old), 15), "a new storage process runs")
tap.ok(h.wait_for(lambda: ring_maps(d.storage_pid()) == 1, 15), "and maps the worker's new ring")
b.c.send_raw(frame2[len(frame2) // 2:])
x = b.ack()
tap.ok(x["error"] in (0, 1027), "the half-received chunk is answered once complete (0, or 1027 if its link broke)",
       str(x))
acks = b.resume(s_data, "storage-kill.bin")
tap.ok(all(y["error"] == 0 for y in acks) and published("storage-kill.bin") == s_data,
       "opened again, the upload finishes byte-identical", str(acks[-1:]))
b.close()

tap.section("worker killed with chunks in the ring")
w_data = rand.randbytes(16 * CH + 77)
b = Bin(d)
tap.eq(b.open(w_data, "worker-kill.bin")["error"], 0, "the upload opens")
for off in range(0, 8 * CH, CH):
    b.c.send_raw(Bin.frame(w_data, off))
spid = d.storage_pid()
victim = list(d.worker_pids())[0]
os.kill(victim, signal.SIGKILL)
b.close()
tap.ok(h.wait_for(lambda: d.worker_pids() and victim not in d.worker_pids(), 15), "a new worker replaces the killed one")
tap.ok(h.wait_for(lambda: ring_maps(d.storage_pid()) >= 1 and d.ping(), 15), "and offers its ring")


def resumed():
    try:
        c = Bin(d)
    except (OSError, AssertionError, h.ProtocolError):
        return None
    try:
        return c.resume(w_data, "worker-kill.bin")
    finally:
        c.close()


acks = h.wait_for(lambda: (lambda r: r if r and all(y.get("error") == 0 for y in r) else None)(resumed()), 30)
tap.ok(acks and published("worker-kill.bin") == w_data, "opened again on a new connection, the upload finishes byte-identical",
       str(acks and acks[-1:]))
tap.eq(d.storage_pid(), spid, "the storage process lived through the worker's death")
tap.ok(h.wait_for(lambda: ring_maps(d.storage_pid()) == 1, 15),
       "once the dead worker's chunks are done, storage maps only the live worker's ring",
       str(ring_maps(d.storage_pid())))
tap.ok("AddressSanitizer" not in d.log_text() and "runtime error" not in d.log_text(), "no sanitizer report in the log")
d.stop()

tap.section("link_ring = 0 and bad values")
d0 = h.Daemon(workers=1, redis=redis, settings={"server": {"link_ring": 0}}, stats=True)
tap.context.append(lambda: d0.log_tail(10))
d0.start()
tap.ok(d0.wait_redis_connected(15), "a daemon with link_ring = 0 starts")
b = Bin(d0)
o = b.open(data, "copied.bin")
acks = b.upload(data, o["committed"])
p = os.path.join(d0.root, str(UID), "copied.bin")
tap.ok(all(x["error"] == 0 for x in acks) and os.path.exists(p) and h.read_file(p) == data,
       "link_ring = 0: a binary upload over the copy path is byte-identical")
b.close()
with d0.connect() as c:
    rs = h.Upload(jdata, "json0.bin", UID, TOKEN, chunk_size=65536).run_pipelined(c)
p = os.path.join(d0.root, str(UID), "json0.bin")
tap.ok(all(r.get("error") == 0 for r in rs) and h.read_file(p) == jdata, "and so is a JSON upload")
counts = h.stats_info(d0)
tap.ok(counts.get("chunks_by_ring") == 0 and counts.get("chunks_copied") == 7 + 5,
       "without a ring every chunk (12) is counted as copied", repr(counts))
tap.eq(ring_maps(d0.storage_pid()), 0, "no ring is mapped")
d0.stop()
bad = os.path.join(h.temp_dir("ring-conf"), "bad.conf")
settings = dict(d0.settings)
settings["server"] = dict(settings["server"], link_ring="65536")
h.Daemon.write_config(bad, settings)
rc, out = d0.check_config(bad)
tap.ok(rc != 0 and "link_ring" in out, "link_ring below 1 MiB (and not 0) is refused at start", out)
tap.finish()

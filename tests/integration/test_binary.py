# test_binary.py: the binary fast path (1041-1048): uploads and ranges byte-identical, resume across paths both ways, refusals that change nothing.
import hashlib
import json
import os
import struct
import subprocess
import sys

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=240)

UID, TOKEN = 4101, "tok-4101-binary"
OTHER_UID, OTHER_TOKEN = 4102, "tok-4102-binary"
rand = __import__("random").Random(20261201)

HELLO, OPEN, CHUNK, DOWNLOAD = 1041, 1043, 1045, 1047
CHUNK_LAST, OPEN_RESTART = 1, 1


class Bin:
    """A fast-path client on one connection (raw frames; answers parsed per docs/protocol.md §13)."""

    def __init__(self, daemon, uid=UID, token=TOKEN, hello=True):
        self.c = daemon.connect()
        self.hello_answer = self.c.request(HELLO, {"uid": uid, "token": token}) if hello else None

    def close(self):
        self.c.close()

    def open_frame(self, md5, name, total, flags=0):
        n = name.encode()
        return h.HEADER.pack(OPEN, 43 + len(n)) + struct.pack(">QB", total, flags) + md5.encode() + \
            struct.pack(">H", len(n)) + n

    def open(self, md5, name, total, flags=0):
        self.c.send_raw(self.open_frame(md5, name, total, flags))
        return self.open_answer()

    def open_answer(self):
        mid, body = self.c.recv_frame()
        assert mid == OPEN + 1, mid
        err, committed, total, mlen = struct.unpack(">IQQH", body[:22])
        return {"error": err, "committed": committed, "total": total, "message": body[22:22 + mlen].decode()}

    @staticmethod
    def chunk_frame(offset, data, flags=0, length=None):
        length = len(data) if length is None else length
        return h.HEADER.pack(CHUNK, 16 + len(data)) + struct.pack(">QII", offset, length, flags) + data

    def ack(self, timeout=30):
        mid, body = self.c.recv_frame(timeout)
        assert mid == CHUNK + 1, (mid, body[:200])
        err, off, length, committed, total, mlen = struct.unpack(">IQIQQH", body[:34])
        return {"error": err, "offset": off, "length": length, "committed": committed, "total": total,
                "message": body[34:34 + mlen].decode()}

    def upload(self, data, start, chunk=256 * 1024, stop_at=None, window=16):
        """Sends data[start:stop_at] in pipelined chunks; returns the acknowledgements."""
        end = len(data) if stop_at is None else stop_at
        offsets = list(range(start, end, chunk)) or [start]
        acks, sent = [], 0
        while len(acks) < len(offsets):
            while sent < len(offsets) and sent - len(acks) < window:
                off = offsets[sent]
                piece = data[off:min(off + chunk, end)]
                last = CHUNK_LAST if off + len(piece) == len(data) else 0
                self.c.send_raw(self.chunk_frame(off, piece, last))
                sent += 1
            acks.append(self.ack())
        return acks

    def download(self, name, offset=0, length=0, version=b""):
        n = name.encode()
        self.c.send_raw(h.HEADER.pack(DOWNLOAD, 19 + len(n) + len(version)) +
                        struct.pack(">QQHB", offset, length, len(n), len(version)) + n + version)
        mid, body = self.c.recv_frame(60)
        assert mid == DOWNLOAD + 1, mid
        err, size, off, length = struct.unpack(">IQQQ", body[:28])
        vlen = body[28]
        ver = body[29:29 + vlen]
        mlen = struct.unpack(">H", body[29 + vlen:31 + vlen])[0]
        msg = body[31 + vlen:31 + vlen + mlen].decode()
        data = body[31 + vlen + mlen:]
        return {"error": err, "size": size, "offset": off, "length": length, "version": ver, "message": msg,
                "data": data}


redis = h.RedisServer().start()
redis.set_token(UID, TOKEN)
redis.set_token(OTHER_UID, OTHER_TOKEN)
ACCESS = os.path.join(h.temp_dir("binary-access"), "access.log")
d = h.Daemon(workers=2, redis=redis, settings={"server": {"storage_timeout": 10}, "log": {"access_log": ACCESS}})


def access_lines(needle):
    try:
        with open(ACCESS) as f:
            return [line for line in f if needle in line]
    except OSError:
        return []
tap.context.append(lambda: d.log_tail(12))
d.start_or_finish(tap)
tap.ok(d.wait_redis_connected(15), "daemon started and connected to Redis")


def published(name, uid=UID):
    p = os.path.join(d.root, str(uid), name)
    return h.read_file(p) if os.path.exists(p) else None


def record(md5, uid=UID):
    return redis.get_json("file_upload_%d_%s" % (uid, md5))


# ---------------------------------------------------------------- negotiation
tap.section("hello")
b = Bin(d)
a = b.hello_answer
tap.ok(a.get("error") == 0 and a.get("version") == 1 and a.get("window", 0) > 0 and a.get("max_chunk", 0) > 0,
       "1041 with good credentials answers 1042 with version, window and limits", str(a))
b.close()
c = d.connect()
r = c.request(HELLO, {"uid": UID, "token": "wrong"})
tap.eq(r.get("error"), 1010, "1041 with a wrong token: 1010")
r = c.request(HELLO, {"uid": 4999, "token": "x"})
tap.eq(r.get("error"), 1011, "1041 for a uid without a token: 1011")
c.send_raw(Bin.chunk_frame(0, b"abc"))
mid, body = c.recv_frame()
tap.ok(mid == CHUNK + 1 and b'"error":1022' in body, "a fast-path id before a successful hello: 1022, as any unknown id",
       repr(body[:200]))
r = c.request(h.MSG_TEST, {"data": "still json"})
tap.eq(r.get("data"), "still json", "the connection still speaks JSON after refused binary frames")
c.close()

# ---------------------------------------------------------------- upload and download
tap.section("upload and download")
data = rand.randbytes(5 * 1024 * 1024 + 12345)
md5 = h.md5_hex(data)
b = Bin(d)
o = b.open(md5, "big.bin", len(data))
tap.ok(o["error"] == 0 and o["committed"] == 0, "1043 on a new upload: committed 0", str(o))
acks = b.upload(data, 0)
tap.ok(all(x["error"] == 0 for x in acks), "every chunk acknowledged with 0",
       str([x for x in acks if x["error"]][:2]))
tap.ok(all(acks[i]["committed"] >= acks[i - 1]["committed"] for i in range(1, len(acks))),
       "committed sizes only grow")
tap.eq(acks[-1]["committed"], len(data), "the last acknowledgement commits the whole file")
tap.ok(published("big.bin") == data, "the published file is byte-identical")
rec = record(md5)
tap.ok(rec is not None and rec.get("state") == "published", "the Redis record is the JSON path's published record",
       str(rec))
r = b.download("big.bin")
tap.ok(r["error"] == 0 and r["size"] == len(data) and r["data"] == data and r["version"],
       "1047 of the whole file: byte-identical, with its size and version", str({k: v for k, v in r.items() if k != "data"}))
ver = r["version"]
r2 = b.download("big.bin", offset=1000, length=5000, version=ver)
tap.ok(r2["error"] == 0 and r2["data"] == data[1000:6000] and r2["length"] == 5000, "a range with the version: those bytes")
r3 = b.download("big.bin", offset=len(data), version=ver)
tap.ok(r3["error"] == 0 and r3["length"] == 0, "a range at the very end: 0 bytes")
r4 = b.download("big.bin", offset=len(data) + 1, version=ver)
tap.eq(r4["error"], 1018, "a range past the end: 1018")
r5 = b.download("missing.bin")
tap.eq(r5["error"], 1012, "a file that does not exist: 1012")
# JSON download of the same file still works on the same connection
jr = b.c.request(h.MSG_DOWNLOAD, {"name": "big.bin", "seq": 1, "uid": UID, "token": TOKEN})
tap.eq(jr.get("error"), 0, "a JSON 1033 on a binary connection still works")
# Empty file
b.open(h.md5_hex(b""), "empty.bin", 0)
e = b.upload(b"", 0)
tap.ok(e[0]["error"] == 0 and published("empty.bin") == b"", "an empty file: one empty last chunk publishes it", str(e))
b.close()

# ---------------------------------------------------------------- versions
tap.section("a download never mixes versions")
v1 = rand.randbytes(300000)
b = Bin(d)
b.open(h.md5_hex(v1), "ver.bin", len(v1))
b.upload(v1, 0)
first = b.download("ver.bin", 0, 100000)
b2 = Bin(d)
v2 = rand.randbytes(300000)
b2.open(h.md5_hex(v2), "ver.bin", len(v2))
b2.upload(v2, 0)
b2.close()
same = b.download("ver.bin", 100000, 0, version=first["version"])
tap.ok(same["error"] == 0 and first["data"] + same["data"] == v1,
       "the connection that holds the old version finishes it from that very file")
b3 = Bin(d)
changed = b3.download("ver.bin", 100000, 0, version=first["version"])
tap.eq(changed["error"], 1029, "another connection asking the old version gets 1029 FileChanged")
fresh = b3.download("ver.bin")
tap.ok(fresh["error"] == 0 and fresh["data"] == v2, "without a version: the current file")
b.close()
b3.close()

# ---------------------------------------------------------------- resume across paths
tap.section("resume across paths")
CH = 65536
data = rand.randbytes(40 * CH + 777)
md5 = h.md5_hex(data)
up = h.Upload(data, "j2b.bin", UID, TOKEN, chunk_size=CH)
with d.connect() as c:
    r, off, seq = up.run(c, max_chunks=9)
tap.ok(r.get("error") == 0 and off == 9 * CH, "JSON path: 9 chunks in", str(r))
b = Bin(d)
o = b.open(md5, "j2b.bin", len(data))
tap.ok(o["error"] == 0 and o["committed"] == 9 * CH, "1043 resumes where the JSON upload stands", str(o))
acks = b.upload(data, o["committed"], chunk=100000)
tap.ok(acks[-1]["error"] == 0 and acks[-1]["committed"] == len(data) and published("j2b.bin") == data,
       "the binary path finishes it, with another chunk size: byte-identical",
       str([x for x in acks if x["error"]][:2]))
b.close()

data = rand.randbytes(30 * CH + 5)
md5 = h.md5_hex(data)
b = Bin(d)
b.open(md5, "b2j.bin", len(data))
acks = b.upload(data, 0, chunk=CH, stop_at=11 * CH)
tap.ok(acks[-1]["error"] == 0 and acks[-1]["committed"] == 11 * CH, "binary path: 11 chunks in")
b.close()
up = h.Upload(data, "b2j.bin", UID, TOKEN, chunk_size=CH)
with d.connect() as c:
    s = up.sync(c)
    tap.ok(s.get("error") == 0 and s.get("trans_size") == 11 * CH, "JSON 1005 sees the binary upload", str(s))
    r, off, seq = up.run(c, offset=s["trans_size"], seq=s["seq"] + 1)
tap.ok(r.get("error") == 0 and off is None and published("b2j.bin") == data,
       "the JSON path finishes it: byte-identical", str(r))

# JSON client with another chunk size resumes a binary upload
data = rand.randbytes(20 * 50000 + 3)
md5 = h.md5_hex(data)
b = Bin(d)
b.open(md5, "b2j-odd.bin", len(data))
b.upload(data, 0, chunk=50000, stop_at=7 * 50000)
b.close()
up = h.Upload(data, "b2j-odd.bin", UID, TOKEN, chunk_size=CH)
with d.connect() as c:
    s = up.sync(c)
    off, seq = s["trans_size"], s["seq"] + 1
    ok = True
    while off is not None:
        piece_end = min(off + CH, len(data))
        r = up.send_chunk(c, off, seq)
        if r.get("error") != 0:
            ok = False
            break
        off = None if piece_end >= len(data) else piece_end
        seq += 1
tap.ok(ok and published("b2j-odd.bin") == data, "a JSON client with its own chunk size goes on from the binary seq",
       str(r))

# ---------------------------------------------------------------- refusals
tap.section("refusals change nothing")
data = rand.randbytes(8 * CH)
md5 = h.md5_hex(data)
b = Bin(d)
b.open(md5, "bad.bin", len(data))
b.upload(data, 0, chunk=CH, stop_at=2 * CH)
# The record may trail the answers by one write (docs/protocol.md §8): let it settle first.
tap.ok(h.wait_for(lambda: (record(md5) or {}).get("trans_size") == 2 * CH, 10), "the record reaches the acknowledged size")
before = record(md5)
# offset past the window end
b.c.send_raw(Bin.chunk_frame(5 * CH, data[5 * CH:6 * CH]))
a = b.ack()
tap.ok(a["error"] == 1018 and a["committed"] == 2 * CH and "expected" in a["message"],
       "a chunk out of order (offset past the end of the previous one): 1018 with the committed size", str(a))
# wrong length field
b2 = Bin(d)
b2.open(md5, "bad.bin", len(data))
b2.c.send_raw(Bin.chunk_frame(2 * CH, data[2 * CH:3 * CH], length=CH + 5))
a = b2.ack()
tap.ok(a["error"] == 1001 and "length" in a["message"], "a length that differs from the frame: 1001", str(a))
b2.c.send_raw(Bin.chunk_frame(2 * CH, data[2 * CH:3 * CH], flags=CHUNK_LAST))
a = b2.ack()
tap.ok(a["error"] == 1001 and "last" in a["message"], "the last flag before the end: 1001", str(a))
b2.c.send_raw(Bin.chunk_frame(2 * CH, data[2 * CH:3 * CH], flags=0x80))
a = b2.ack()
tap.eq(a["error"], 1001, "unknown chunk flags: 1001")
b2.c.send_raw(h.HEADER.pack(CHUNK, 7) + b"1234567")
a = b2.ack()
tap.ok(a["error"] == 1001 and "shorter" in a["message"], "a chunk header cut short: 1001", str(a))
b2.c.send_raw(h.HEADER.pack(OPEN, 10) + b"0123456789")
o = b2.open_answer()
tap.eq(o["error"], 1001, "a 1043 cut short: 1001")
o = b2.open("zz" * 16, "bad.bin", len(data))
tap.eq(o["error"], 1001, "a 1043 with a bad md5: 1001")
o = b2.open(md5, ".hidden", len(data))
tap.eq(o["error"], 1023, "a 1043 with a bad name: 1023")
o = b2.open(md5, "bad.bin", 1 << 60)
tap.eq(o["error"], 1025, "a 1043 over max_file_size: 1025")
o = b2.open(md5, "other-name.bin", len(data))
tap.eq(o["error"], 1026, "a 1043 naming the upload in progress differently: 1026")
# The kind is part of the upload as name and size are: an open that said resume here was followed by
# 1026 for every chunk, and the next open said resume again.
o = b2.open(md5, "bad.bin", len(data), flags=2)
tap.ok(o["error"] == 1026 and o["committed"] == 2 * CH,
       "a 1043 with the avatar flag for a file upload in progress: 1026 with its committed size", str(o))
tap.eq(record(md5), before, "after all these, the Redis record is unchanged")
tap.eq(sorted(os.listdir(os.path.join(d.root, str(UID)))).count("bad.bin"), 0, "nothing was published")
b2.close()
b.close()
# bad credentials in a later open: a token removed in Redis fails once the connection's trust expires
b = Bin(d, uid=OTHER_UID, token=OTHER_TOKEN)
c = d.connect()
r = c.request(HELLO, {"uid": OTHER_UID, "token": "nope"})
tap.eq(r.get("error"), 1010, "a second connection with a wrong token for that uid: 1010")
c.close()
b.close()
# another user cannot reach this user's upload: its open sees no upload
b = Bin(d, uid=OTHER_UID, token=OTHER_TOKEN)
o = b.open(md5, "bad.bin", len(data))
tap.ok(o["error"] == 0 and o["committed"] == 0, "another uid opening the same md5 starts its own upload", str(o))
b.close()
tap.eq(record(md5), before, "the first user's record is untouched")

# ---------------------------------------------------------------- resctl
tap.section("resctl")
src = os.path.join(d.dir, "resctl-src.bin")
data = rand.randbytes(3 * 1024 * 1024 + 99)
with open(src, "wb") as f:
    f.write(data)
ep = "127.0.0.1:%d" % d.port
resctl = os.environ.get("RESCTL_BIN")
env = dict(os.environ, RESCTL_TOKEN=TOKEN)
p = subprocess.run([resctl, "upload", ep, src, "--name", "via-resctl.bin", "--uid", str(UID)],
                   capture_output=True, text=True, env=env, timeout=60)
tap.ok(p.returncode == 0 and published("via-resctl.bin") == data, "resctl upload (binary by default) publishes the file",
       p.stdout + p.stderr)
out = os.path.join(d.dir, "resctl-out.bin")
p = subprocess.run([resctl, "download", ep, "via-resctl.bin", out, "--uid", str(UID)],
                   capture_output=True, text=True, env=env, timeout=60)
tap.ok(p.returncode == 0 and h.read_file(out) == data, "resctl download (binary by default): byte-identical",
       p.stdout + p.stderr)
out2 = os.path.join(d.dir, "resctl-out2.bin")
p = subprocess.run([resctl, "download", ep, "via-resctl.bin", out2, "--uid", str(UID), "--compat"],
                   capture_output=True, text=True, env=env, timeout=60)
tap.ok(p.returncode == 0 and h.read_file(out2) == data, "resctl download --compat: byte-identical", p.stdout + p.stderr)
p = subprocess.run([resctl, "upload", ep, src, "--name", "via-compat.bin", "--uid", str(UID), "--compat"],
                   capture_output=True, text=True, env=env, timeout=60)
tap.ok(p.returncode == 0 and published("via-compat.bin") == data, "resctl upload --compat publishes the file",
       p.stdout + p.stderr)
up_lines = access_lines('name="via-resctl.bin"')
tap.ok(any("upload" in x and "binary=1" in x for x in up_lines) and
       any("download" in x and "binary=1" in x for x in up_lines),
       "the access log shows resctl's default upload and download on the fast path", "".join(up_lines))
tap.ok(not any("binary=1" in x for x in access_lines('name="via-compat.bin"')),
       "and --compat on the JSON path")

def run_bench(*args):
    """resctl bench against the daemon as UID with --json: the process and its parsed result ({} if none)."""
    p = subprocess.run([resctl, "bench", ep, *args, "--json", "--uid", str(UID), "--token", TOKEN],
                       capture_output=True, text=True, env=env, timeout=120)
    try:
        return p, json.loads(p.stdout)
    except ValueError:
        return p, {}


# resctl bench on the fast path checks every range's bytes as they arrive (bench.c bin_range_take):
# several connections, ranges many receive buffers long, uploads beside them.
p, res = run_bench("--protocol", "binary", "--mode", "mixed", "--connections", "6", "--size", str(5 * 1024 * 1024 + 7),
                   "--duration", "2")
tap.ok(p.returncode == 0 and res.get("errors_total") == 0 and (res.get("download") or {}).get("bytes", 0) > 0 and
       (res.get("upload") or {}).get("bytes", 0) > 0,
       "resctl bench --protocol binary --mode mixed: uploads and checked downloads, no errors",
       p.stdout[-1500:] + p.stderr[-1500:])

# A file larger than BENCH_PERIOD (8 MiB) repeats the bench's random buffer (bench.c struct
# bench_source): the server refuses a chunk whose bytes differ from the MD5 the bench sent, and the
# bench refuses downloaded bytes that differ from its own, so errors show any slip of the period,
# on both protocols, with chunks that divide the period (32 KiB: base64 tables reused each period)
# and that do not (10,000 bytes: encoded and checked chunk by chunk).
for proto, chunk in (("json", 32768), ("json", 10000), ("binary", 1000000)):
    # --files 2: one whole file each way however slowly a loaded or sanitizer build runs (the duration
    # is only a bound); a run of fixed length was sometimes too short for one 9 MiB file under ASan.
    p, res = run_bench("--protocol", proto, "--mode", "mixed", "--connections", "2", "--size", str(9 * 1024 * 1024 + 7),
                       "--chunk", str(chunk), "--files", "2", "--duration", "90")
    tap.ok(p.returncode == 0 and res.get("errors_total") == 0 and (res.get("download") or {}).get("bytes", 0) > 0 and
           (res.get("upload") or {}).get("files", 0) > 0,
           "resctl bench --protocol %s --chunk %d of a 9 MiB file (its content repeats): whole files up, checked "
           "downloads, no errors" % (proto, chunk), p.stdout[-1500:] + p.stderr[-1500:])

# A bench upload keeps its window full (bench.c bin_fill_window): each acknowledgement sends the next
# chunk at once, so a connection's chunks are never all acknowledged before its file's last one is
# out. window_drains counts the times they were; a bench that sent a window of chunks and waited for
# all their acknowledgements before the next ran dry once per window (twice per file of 21 chunks).
BENCH_SIZE = 20 * 1024 * 1024 + 7   # 21 chunks of 1 MiB; the window is 8 of them (8 MiB)
p, res = run_bench("--protocol", "binary", "--mode", "upload", "--connections", "2", "--files", "3", "--size",
                   str(BENCH_SIZE), "--duration", "0")
tap.ok(p.returncode == 0 and res.get("errors_total") == 0 and res.get("files") == 3 and
       res.get("bytes") == 3 * BENCH_SIZE and res.get("chunks") == 3 * 21,
       "resctl bench --protocol binary --mode upload: 3 files, each chunk acknowledged once, no errors",
       p.stdout[-1500:] + p.stderr[-1500:])
places = res.get("upload_rtt_ms_by_place") or {}
tap.ok([(places.get(k) or {}).get("count") for k in ("first", "middle", "last")] == [3, 3 * 19, 3],
       "and it times each file's first, middle and last chunks apart (3, 57 and 3 of them)", repr(places))
tap.ok(res.get("max_in_flight") == 8 and res.get("window_drains") == 0,
       "and its window slides: 8 chunks in flight, never all acknowledged before a file's last chunk was sent",
       p.stdout[-1500:])

# ---------------------------------------------------------------- old clients
tap.section("an old client on the same server")
data = rand.randbytes(10 * CH + 1)
up = h.Upload(data, "old.bin", UID, TOKEN, chunk_size=CH)
with d.connect() as c:
    rs = up.run_pipelined(c)
    tap.ok(all(x.get("error") == 0 for x in rs) and published("old.bin") == data,
           "a JSON client uploads as before")
    got, _ = h.download(c, "old.bin", UID, TOKEN)
    tap.ok(got == data, "and downloads as before")
tap.ok("AddressSanitizer" not in d.log_text(), "no sanitizer report in the log")
d.stop()

# ---------------------------------------------------------------- frame_timeout and a held window
# A client that sends past its window is slowed down, never cut: while the server holds its next
# frame back (chunks in flight that storage has not answered), frame_timeout does not run. A client
# that stops in the middle of a chunk with nothing in flight is still cut.
tap.section("frame_timeout while the window is held")
FT = 2
dt = h.Daemon(workers=1, redis=redis, settings={"server": {"frame_timeout": FT, "storage_timeout": 10,
                                                           "auth_cache_ttl": 1}})
tap.context.append(lambda: dt.log_tail(12))
dt.start()
tap.ok(dt.wait_redis_connected(15), "a daemon with frame_timeout = %d s started" % FT)
STALL_CH, STALL_N = 65536, 100   # 6.25 MiB: more chunks than max_inflight (64), so frames wait
stall = rand.randbytes(STALL_CH * STALL_N)
b = Bin(dt)
o = b.open(hashlib.md5(stall).hexdigest(), "held.bin", len(stall))
storage = dt.storage_pid()
os.kill(storage, __import__("signal").SIGSTOP)   # storage stops answering, as a stalled disk would
try:
    sender_errors = []

    def send_all():
        try:
            for i in range(STALL_N):
                piece = stall[i * STALL_CH:(i + 1) * STALL_CH]
                b.c.send_raw(Bin.chunk_frame(i * STALL_CH, piece, CHUNK_LAST if i == STALL_N - 1 else 0))
        except OSError as e:
            sender_errors.append(repr(e))
    sender = __import__("threading").Thread(target=send_all, daemon=True)
    sender.start()
    cut = h.wait_for(lambda: dt.log_count("frame not completed") > 0, FT + 3)
finally:
    os.kill(storage, __import__("signal").SIGCONT)
tap.ok(not cut, "a frame held behind a full window is not cut by frame_timeout while storage is stalled",
       dt.log_tail(5))
acks = []
try:
    acks = [b.ack(60)["error"] for _ in range(STALL_N)]
except (h.ProtocolError, TimeoutError, OSError) as e:
    acks.append(repr(e))
sender.join(30)
p = os.path.join(dt.root, str(UID), "held.bin")
tap.ok(o["error"] == 0 and acks == [0] * STALL_N and not sender_errors and h.read_file(p) == stall,
       "once storage answers again, every chunk is acknowledged and the file is byte-identical",
       "open %r, acks %r, sender %r" % (o, sorted(set(map(str, acks))), sender_errors))
b.close()
b = Bin(dt)
half = rand.randbytes(300000)
b.open(hashlib.md5(half).hexdigest(), "drip.bin", len(half))
b.c.send_raw(Bin.chunk_frame(0, half, CHUNK_LAST)[:100000])   # half a chunk, nothing in flight
tap.ok(b.c.wait_closed(FT + 10) and dt.log_count("frame not completed") == 1,
       "a client that stops in the middle of a chunk is still cut at frame_timeout")
b.close()

# ---------------------------------------------------------------- a token removed during an upload
# Chunks carry no credentials: once auth_cache_ttl (1 s here) has passed, the hello's are checked
# again before the next chunk, as every JSON chunk's are, so a token removed or changed in Redis
# stops an upload in progress too.
tap.section("credentials checked again during a fast-path upload")
rv = rand.randbytes(300000)
rv_md5 = hashlib.md5(rv).hexdigest()
b = Bin(dt)
o = b.open(rv_md5, "revoked.bin", len(rv))
b.c.send_raw(Bin.chunk_frame(0, rv[:100000]))
a1 = b.ack()
tap.ok(o["error"] == 0 and a1["error"] == 0, "an upload starts on a fast-path connection", repr((o, a1)))
redis.cmd("DEL", "utoken_%d" % UID)
t_del = __import__("time").monotonic()
h.wait_for(lambda: __import__("time").monotonic() - t_del > 1.5, 5)   # past auth_cache_ttl (1 s)
b.c.send_raw(Bin.chunk_frame(100000, rv[100000:200000]))
b.c.send_raw(Bin.chunk_frame(200000, rv[200000:], CHUNK_LAST))
a2, a3 = b.ack(), b.ack()
tap.ok(a2["error"] == 1011 and a3["error"] == 1018,
       "token removed: once auth_cache_ttl has passed the next chunk gets 1011, the one behind it 1018",
       repr((a2, a3)))
o = b.open(rv_md5, "revoked.bin", len(rv))
tap.eq(o["error"], 1011, "and a 1043 on that connection gets 1011 too")
tap.ok(published("revoked.bin") is None and not os.path.exists(os.path.join(dt.root, str(UID), "revoked.bin"))
       and (redis.get_json("file_upload_%d_%s" % (UID, rv_md5)) or {}).get("trans_size") == 100000,
       "nothing more was stored and nothing was published")
redis.set_token(UID, "another-token")
b.close()
b = Bin(dt, token="another-token")
o = b.open(rv_md5, "revoked.bin", len(rv))
b.c.send_raw(Bin.chunk_frame(o["committed"], rv[o["committed"]:200000]))
a4 = b.ack()
redis.set_token(UID, TOKEN)   # the token changes again: the connection's ("another-token") is now wrong
t_set = __import__("time").monotonic()
h.wait_for(lambda: __import__("time").monotonic() - t_set > 1.5, 5)
b.c.send_raw(Bin.chunk_frame(200000, rv[200000:], CHUNK_LAST))
a5 = b.ack()
tap.ok(o["error"] == 0 and o["committed"] == 100000 and a4["error"] == 0 and a5["error"] == 1010,
       "a token changed in Redis: the next chunk after auth_cache_ttl gets 1010", repr((o, a4, a5)))
b.close()
b = Bin(dt)
o = b.open(rv_md5, "revoked.bin", len(rv))
b.c.send_raw(Bin.chunk_frame(o["committed"], rv[o["committed"]:], CHUNK_LAST))
a6 = b.ack()
p = os.path.join(dt.root, str(UID), "revoked.bin")
tap.ok(o["committed"] == 200000 and a6["error"] == 0 and h.read_file(p) == rv,
       "with the current token the upload resumes where it stood and is byte-identical", repr((o, a6)))
b.close()
tap.ok("AddressSanitizer" not in dt.log_text() and "runtime error" not in dt.log_text(),
       "no sanitizer report in the log")
dt.stop()

# ---------------------------------------------------------------- a storage process that stops answering
# The server's hold on a window stops the connection's clocks for storage_timeout at most: a storage
# process that stopped answering (its link still up) must not keep connections, and what they hold,
# forever. And a refusal of the credentials' new check that came while the window was full belongs
# to the upload that broke, not to the one opened next on that connection.
tap.section("a stalled storage process and the window's hold")
ST = 8   # part 2 kills storage about 2 s into the hold: a wide margin under load
ds = h.Daemon(workers=1, redis=redis, settings={"server": {"frame_timeout": 2, "storage_timeout": ST,
                                                           "auth_cache_ttl": 1}})
tap.context.append(lambda: ds.log_tail(12))
ds.start()
tap.ok(ds.wait_redis_connected(15), "a daemon with storage_timeout = %d s started" % ST)
SIGNAL = __import__("signal")
monotonic = __import__("time").monotonic


def send_chunks(client, data, count):
    try:
        for i in range(count):
            client.c.send_raw(Bin.chunk_frame(i * STALL_CH, data[i * STALL_CH:(i + 1) * STALL_CH]))
    except OSError:
        pass   # the server closed the connection: what this part checks


b = Bin(ds)
o = b.open(hashlib.md5(stall).hexdigest(), "stalled.bin", len(stall))
storage = ds.storage_pid()
os.kill(storage, SIGNAL.SIGSTOP)
try:
    sender = __import__("threading").Thread(target=send_chunks, args=(b, stall, STALL_N - 1), daemon=True)
    sender.start()
    closed = b.c.wait_closed(ST + 2 + 20)
finally:
    os.kill(storage, SIGNAL.SIGCONT)
tap.ok(o["error"] == 0 and closed,
       "chunks storage does not answer hold the connection's clocks for storage_timeout, not forever",
       ds.log_tail(5))
sender.join(10)
b.close()

st2 = rand.randbytes(STALL_CH * 70)
st2_md5 = hashlib.md5(st2).hexdigest()
b = Bin(ds)
o = b.open(st2_md5, "stalled2.bin", len(st2))
storage = ds.storage_pid()
os.kill(storage, SIGNAL.SIGSTOP)
try:
    send_chunks(b, st2, 64)   # max_inflight chunks in flight: the window is full
    redis.set_token(UID, "changed-meanwhile")
    t_set = monotonic()
    h.wait_for(lambda: monotonic() - t_set > 1.5, 5)   # past auth_cache_ttl
    # Checked again in Redis (refused: another token), then held behind the full window.
    bad_before = ds.log_count("bad token for uid %d" % UID)
    b.c.send_raw(Bin.chunk_frame(64 * STALL_CH, st2[64 * STALL_CH:65 * STALL_CH]))
    refused = h.wait_for(lambda: ds.log_count("bad token for uid %d" % UID) > bad_before, 10)
finally:
    os.kill(storage, SIGNAL.SIGKILL)   # the link breaks: the chunks in flight are failed
acks = [b.ack(30)["error"] for _ in range(65)]
redis.set_token(UID, TOKEN)
tap.ok(refused and acks == [1027] * 64 + [1018],
       "a broken link answers the window 1027, and the chunk held behind it (refused by Redis) 1018",
       repr((refused, sorted(set(acks)))))
o = {"error": None}


def reopened():
    o.update(b.open(st2_md5, "stalled2.bin", len(st2)))
    return o["error"] == 0


h.wait_for(reopened, 30)
b.c.send_raw(Bin.chunk_frame(o["committed"], st2[o["committed"]:o["committed"] + STALL_CH]))
a = b.ack()
tap.ok(o["error"] == 0 and a["error"] == 0,
       "once storage is back, the upload opened again on that connection takes its chunks (no stale refusal)",
       repr((o, a)))
b.close()
tap.ok("AddressSanitizer" not in ds.log_text() and "runtime error" not in ds.log_text(),
       "no sanitizer report in the log")
ds.stop()

# ---------------------------------------------------------------- auth_cache_ttl = 0
# 0 trusts credentials for no time: every chunk is checked in Redis. The check's answer must let
# the chunk that waited for it through, not ask Redis again for ever.
tap.section("auth_cache_ttl = 0: every chunk checked, and taken")
dz = h.Daemon(workers=1, redis=redis, settings={"server": {"frame_timeout": 5, "auth_cache_ttl": 0}})
tap.context.append(lambda: dz.log_tail(12))
dz.start()
tap.ok(dz.wait_redis_connected(15), "a daemon with auth_cache_ttl = 0 started")
zero = rand.randbytes(4 * 65536 + 77)
b = Bin(dz)
o = b.open(hashlib.md5(zero).hexdigest(), "ttl0.bin", len(zero))
try:
    acks = b.upload(zero, 0, chunk=65536, window=2)
except (h.ProtocolError, OSError, AssertionError) as e:
    acks = [{"error": repr(e)}]
tap.ok(o["error"] == 0 and [a["error"] for a in acks] == [0] * 5 and acks[-1]["committed"] == len(zero),
       "5 chunks are acknowledged, the last one committing the whole file", repr((o, acks[-2:])))
tap.ok(h.wait_for(lambda: h.published_bytes(dz, UID, "ttl0.bin") == zero, 10), "and the file is published")
try:
    b.close()
    b = Bin(dz)
    o = b.open(hashlib.md5(zero[:1000]).hexdigest(), "ttl0-refused.bin", 1000)
    redis.cmd("DEL", "utoken_%d" % UID)
    b.c.send_raw(Bin.chunk_frame(0, zero[:1000], CHUNK_LAST))
    a = b.ack()
except (h.ProtocolError, OSError, AssertionError) as e:
    a = {"error": repr(e)}
redis.set_token(UID, TOKEN)
tap.eq(a["error"], 1011, "a token removed from Redis: the very next chunk is refused (1011)")
b.close()
dz.stop()
tap.finish()

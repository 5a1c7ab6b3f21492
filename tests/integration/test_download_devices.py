# test_download_devices.py: several devices of one user downloading one name while it is replaced, on new connections, two nodes and the binary path: every completed download is exactly one version.
"""Each "device" is a client that downloads a name the way the Qt client does: it asks seq after seq,
and after losing its connection it asks again on a new one from where it was (the next seq, or the
last one again when it lost that answer); told 1029 it throws its bytes away and starts again at seq 1.
Between their steps the file is replaced (same size or not), in every order for two devices and in
random orders for three, on two daemons that share one Redis and one storage root. What must hold:
every download that completes is byte for byte one version of the file, never a mix; a device that
starts over finishes; with no replacement of that name (or only of another name) no device ever
hears 1029. The binary fast path (1047) pins ranges to a version the client carries: the same holds."""
import base64
import itertools
import os
import random
import struct
import sys

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=240)

DL = 1000                        # download_chunk
U = 4201
TOK = "tok-4201-devices"
FILE_CHANGED = 1029
rand = random.Random(4201)

# ---------------------------------------------------------------- servers: two nodes, one Redis, one root
redis = h.RedisServer().start()
redis.set_token(U, TOK)
root = h.temp_dir("devices-root")
SETTINGS = {"server": {"download_chunk": DL, "storage_timeout": 10}, "storage": {"root": root}}
nodes = []
for i in range(2):
    s = {k: dict(v) for k, v in SETTINGS.items()}
    s["server"]["node"] = "devnode%d" % (i + 1)
    nodes.append(h.Daemon(workers=2, redis=redis, settings=s))
tap.context.append(lambda: "\n".join(n.log_tail(8) for n in nodes))
try:
    for n in nodes:
        n.start()
except Exception as e:
    tap.ok(False, "both daemons start", str(e))
    tap.finish()
tap.ok(all(n.wait_redis_connected(15) for n in nodes), "two daemons sharing Redis and the storage root started")


def node():
    return rand.choice(nodes)


def upload(data, name):
    up = h.Upload(data, name, U, TOK, chunk_size=65536)
    with node().connect() as c:
        r, _, _ = up.run(c)
    return r.get("error") == 0 and h.read_file(os.path.join(root, str(U), name)) == data


def chunk(c, name, seq):
    c.request(h.MSG_DOWNLOAD, {"name": name, "seq": seq, "uid": U, "token": TOK, "client_path": "/tmp/x",
                               "trans_size": "0", "total_size": "0"})
    import json
    raw = json.loads(c.last_raw)
    return raw, (base64.b64decode(raw["data"]) if raw.get("error") == 0 else None)


class Device:
    """One download of name by one device over JSON (1033), driven step by step."""

    def __init__(self, name, label):
        self.name, self.label = name, label
        self.conn = None
        self.got = {}                 # seq -> bytes
        self.last_seq = 0             # the last seq answered
        self.done = False
        self.restarts = 0
        self.changed = 0              # 1029 answers heard
        self.log = []

    def body(self):
        return b"".join(self.got[s] for s in sorted(self.got))

    def reconnect(self):
        self.drop()
        self.conn = node().connect()

    def drop(self):
        if self.conn:
            self.conn.close()
            self.conn = None

    def step(self, n, new_conn=True, resend_last=False):
        """Up to n chunks; on a new connection unless told to keep the one it has."""
        if self.done:
            return
        if new_conn or self.conn is None:
            self.reconnect()
        seq = self.last_seq if resend_last and self.last_seq > 0 else self.last_seq + 1
        for _ in range(n):
            raw, data = chunk(self.conn, self.name, seq)
            err = raw.get("error")
            self.log.append((seq, err))
            if err == FILE_CHANGED:
                self.changed += 1
                self.restarts += 1
                self.got, self.last_seq, seq = {}, 0, 1
                if self.restarts > 8:
                    return
                continue
            if err != 0:
                raise AssertionError("%s: seq %d answered %r" % (self.label, seq, raw))
            self.got[seq] = data
            self.last_seq = seq
            if raw.get("is_last"):
                self.done = True
                self.drop()
                return
            seq += 1

    def finish(self):
        """To the end, on a new connection (restarting there if told to)."""
        self.step(10 ** 6)


def versions_check(devs, versions, what):
    """Every device completed, each with exactly one version's bytes."""
    bad = {d.label: (d.done, len(d.body()), [i for i, v in enumerate(versions) if v == d.body()], d.log[-6:])
           for d in devs if not d.done or d.body() not in versions}
    tap.ok(not bad, what, repr(bad))


def versions_hash(name):
    """The versions hash of name: version -> "time started completed born"."""
    flat = redis.cmd("HGETALL", "file_dlversions_%d_%s" % (U, name)) or []
    return dict(zip(flat[::2], flat[1::2]))


def sized(n_chunks):
    return rand.randbytes(n_chunks * DL - rand.randrange(0, DL // 2))


# ---------------------------------------------------------------- two devices, every order
with tap.section("two devices, one replace, every order of their starts, resumes and the replace"):
    # Events: A starts (2 chunks, then its connection drops), B starts, R (replace), A finishes on a
    # new connection, B finishes on a new connection; every order with each start before its finish.
    events = ["As", "Bs", "R", "Af", "Bf"]
    orders = [o for o in itertools.permutations(events)
              if o.index("As") < o.index("Af") and o.index("Bs") < o.index("Bf")]
    results = {"same size": [], "other size": []}
    no_change_bad = []
    for kind in results:
        for k, order in enumerate(orders):
            name = "two-%s-%d.bin" % (kind.replace(" ", ""), k)
            old = sized(6)
            new = sized(6) if kind == "other size" else rand.randbytes(len(old))
            if kind == "other size":
                while len(new) == len(old):
                    new = sized(rand.choice([4, 8]))
            if not upload(old, name):
                results[kind].append((order, "upload failed"))
                continue
            devs = {"A": Device(name, "A"), "B": Device(name, "B")}
            for ev in order:
                if ev == "R":
                    if not upload(new, name):
                        results[kind].append((order, "replace failed"))
                elif ev[1] == "s":
                    devs[ev[0]].step(2)
                    devs[ev[0]].drop()
                else:
                    devs[ev[0]].finish()
            bad = {d.label: (d.done, d.log) for d in devs.values() if not d.done or d.body() not in (old, new)}
            if bad:
                results[kind].append((order, bad))
            # The replace before both starts, or after both finished: nobody was told 1029.
            if (order.index("R") < min(order.index("As"), order.index("Bs")) or
                    order.index("R") > max(order.index("Af"), order.index("Bf"))):
                if any(d.changed for d in devs.values()):
                    no_change_bad.append((order, {d.label: d.log for d in devs.values()}))
    for kind, bad in results.items():
        tap.ok(not bad, "%s: in all %d orders both downloads completed, each exactly the old or the new file"
               % (kind, len(orders)), repr(bad[:3]))
    tap.ok(not no_change_bad, "when the replace comes before both starts or after both ends, nobody hears 1029",
           repr(no_change_bad[:3]))

with tap.section("the red team's order: A old, replace, B new, A resumes on a new connection"):
    name = "f4.bin"
    old, new = sized(6), None
    new = rand.randbytes(len(old))
    tap.ok(upload(old, name), "uploaded %s" % name)
    a, b = Device(name, "A"), Device(name, "B")
    a.step(3)
    a.drop()
    tap.ok(upload(new, name), "replaced by content of the same size")
    b.step(2)
    b.drop()
    a.step(1)
    tap.eq(a.log[3], (4, FILE_CHANGED), "A's resume at seq 4 hears 1029 (B's start does not hide A's version)")
    a.finish()
    b.finish()
    tap.ok(a.body() == new and b.body() == new, "both then complete with the new file, byte for byte")

# ---------------------------------------------------------------- three devices, random orders
with tap.section("three devices, two replaces, random orders, resumes on new or kept connections, both nodes"):
    bad, completed, told = [], 0, 0
    for k in range(24):
        name = "three-%d.bin" % k
        versions = [sized(5)]
        for _ in range(2):
            versions.append(rand.randbytes(len(versions[0])) if rand.random() < 0.5 else sized(rand.choice([3, 5, 7])))
        if not upload(versions[0], name):
            bad.append((name, "upload failed"))
            continue
        devs = [Device(name, "ABC"[i]) for i in range(3)]
        events = ["s%d" % i for i in range(3)] + ["m%d" % i for i in range(3)] + ["R1", "R2"]
        rand.shuffle(events)
        # each device starts before its middle step
        for i in range(3):
            si, mi = events.index("s%d" % i), events.index("m%d" % i)
            if si > mi:
                events[si], events[mi] = events[mi], events[si]
        replaced = 0
        for ev in events:
            if ev[0] == "R":
                replaced += 1
                if not upload(versions[replaced], name):
                    bad.append((name, "replace failed"))
            elif ev[0] == "s":
                devs[int(ev[1])].step(rand.choice([1, 2, 3]), new_conn=True)
                if rand.random() < 0.5:
                    devs[int(ev[1])].drop()
            else:
                devs[int(ev[1])].step(rand.choice([1, 2]), new_conn=rand.random() < 0.7,
                                      resend_last=rand.random() < 0.3)
        for dv in devs:
            dv.finish()
            completed += dv.done
            told += dv.changed > 0
            if not dv.done or dv.body() not in versions:
                bad.append((name, dv.label, dv.done, dv.log))
    tap.ok(not bad, "24 rounds of three devices: every download completed as exactly one version", repr(bad[:2]))
    tap.eq(completed, 72, "all 72 downloads completed (a device told 1029 starts over and finishes)")
    tap.ok(told > 0, "some were told 1029 (the orders did put replaces inside downloads)", str(told))

# ---------------------------------------------------------------- no false alarms
with tap.section("honest resumes with no replace of that name are never answered 1029"):
    name, other = "steady.bin", "churn.bin"
    data = sized(8)
    tap.ok(upload(data, name) and upload(sized(3), other), "uploaded %s and %s" % (name, other))
    me = Device(name, "me")
    twin = Device(name, "twin")           # the same user on another device, same file, no replace
    churn = []
    while not me.done:
        me.step(1, new_conn=True, resend_last=rand.random() < 0.3)   # a new connection, either node, every chunk
        twin.step(1, new_conn=rand.random() < 0.5)
        up_ok = upload(sized(3), other)   # another name of the same user replaced meanwhile...
        o = Device(other, "o")
        o.step(1)                           # ...and downloads of it started and left behind
        o.drop()
        churn.append(up_ok)
    twin.finish()
    tap.ok(all(churn), "%s replaced %d times meanwhile" % (other, len(churn)))
    tap.ok(me.done and me.body() == data and me.changed == 0,
           "a download resumed on a new connection at every chunk, on both nodes: never 1029, the file whole",
           repr(me.log))
    tap.ok(twin.done and twin.body() == data and twin.changed == 0,
           "a second device downloading the same unchanged file: never 1029 either", repr(twin.log))

with tap.section("a completed download of the old file does not stop a resumed download of the new one"):
    # The phone on a flaky network: it downloaded the old file whole (on one connection), the file
    # was replaced, and it downloads the new one losing its connection every few chunks. The old
    # version has no download left to resume: it is not live, and no resume hears 1029.
    name = "after.bin"
    old, new = sized(6), sized(30)
    tap.ok(upload(old, name), "uploaded %s" % name)
    a = Device(name, "A")
    a.finish()
    tap.ok(a.done and a.body() == old, "the old file downloaded whole on one connection")
    tap.ok(upload(new, name), "replaced by a 30-chunk file")
    b = Device(name, "phone")
    while not b.done and b.restarts <= 8:
        b.step(rand.choice([1, 2, 3]), new_conn=True, resend_last=rand.random() < 0.3)
    tap.ok(b.done and b.body() == new, "the new file, resumed on a new connection every 1-3 chunks on both nodes, "
           "arrived byte for byte", repr(b.log[-6:]))
    tap.eq(b.changed, 0, "and none of its %d resumes heard 1029" % sum(1 for s, _ in b.log if s > 1))
    # The same once more with two completed downloads of the old file (two devices, both finished)
    # and one of them sending its last chunk again on a new connection (a lost answer): still no 1029.
    name = "after2.bin"
    old, new = sized(5), sized(12)
    tap.ok(upload(old, name), "uploaded %s" % name)
    x, y = Device(name, "X"), Device(name, "Y")
    x.step(2, new_conn=True)
    y.step(2, new_conn=True)
    x.step(10 ** 6, new_conn=False)
    y.step(10 ** 6, new_conn=False)
    with node().connect() as c:
        raw, _ = chunk(c, name, 5)
    tap.ok(x.body() == old and y.body() == old and raw.get("error") == 0,
           "two devices finished the old file on their connections; a resent last chunk elsewhere served")
    tap.eq(versions_hash(name), {}, "every download of it completed: the versions hash holds nothing for it")
    tap.ok(upload(new, name), "replaced")
    p = Device(name, "phone2")
    while not p.done and p.restarts <= 8:
        p.step(2, new_conn=True)
    tap.ok(p.done and p.body() == new and p.changed == 0, "the new file resumed every 2 chunks: never 1029",
           repr(p.log))

with tap.section("a device mid-way in the old version still makes a resume of the new one hear 1029"):
    # Two devices started the old file, one finished: the old version is still live (started 2,
    # completed 1), because the other may resume it anywhere; the counts never hide it.
    name = "midway.bin"
    old = sized(8)
    new = rand.randbytes(len(old))
    tap.ok(upload(old, name), "uploaded %s" % name)
    done, mid = Device(name, "done"), Device(name, "mid")
    done.step(2, new_conn=True)
    mid.step(3, new_conn=True)
    mid.drop()
    done.step(5, new_conn=False)
    resent = [chunk(done.conn, name, 8)[0].get("error") for _ in range(2)]   # its last answer lost, asked again
    done.step(10 ** 6, new_conn=False)
    tap.ok(done.done and done.body() == old and resent == [0, 0],
           "one device finished the old file on its connection, asking for its last chunk twice more there")
    with node().connect() as c:           # its last chunk resent on a new connection: not a second completion
        raw, _ = chunk(c, name, 8)
    tap.eq(raw.get("error"), 0, "its last chunk resent elsewhere is served")
    tap.ok(upload(new, name), "replaced by content of the same size")
    p = Device(name, "new")
    p.step(2, new_conn=True)
    p.step(1, new_conn=True)
    tap.eq(p.log[-1], (3, FILE_CHANGED), "a download of the new file resumed on a new connection hears 1029")
    mid.step(1, new_conn=True)
    tap.eq(mid.log[-1], (4, FILE_CHANGED), "the device mid-way in the old file resumes: 1029, never new bytes")
    mid.finish()
    p.finish()
    tap.ok(mid.body() == new and p.body() == new, "both, started again, finish with the new file whole")

with tap.section("a device that restarted at seq 1 mid-way counts as two starts"):
    # Started twice (seq 1 again on its connection) and completed once: one download may still be
    # out there, so the version stays live; nothing tells the server otherwise.
    name = "restart.bin"
    old = sized(6)
    new = rand.randbytes(len(old))
    tap.ok(upload(old, name), "uploaded %s" % name)
    r = Device(name, "r")
    r.step(3, new_conn=True)
    r.got, r.last_seq = {}, 0              # the app restarts the download on the same connection
    r.step(10 ** 6, new_conn=False)
    tap.ok(r.done and r.body() == old, "it finished the old file")
    tap.ok(upload(new, name), "replaced")
    p = Device(name, "p")
    p.step(2, new_conn=True)
    p.step(1, new_conn=True)
    tap.eq(p.log[-1], (3, FILE_CHANGED), "a resume of the new file hears 1029 (an unfinished start of the old one)")

with tap.section("a resume past the end of a shorter replacement hears 1029, not 1018"):
    name = "shrunk.bin"
    old, new = sized(8), sized(3)
    tap.ok(upload(old, name), "uploaded %s (8 chunks)" % name)
    a = Device(name, "A")
    a.step(6)
    tap.ok(upload(new, name), "replaced by a 3-chunk file")
    a.step(1)
    tap.eq(a.log[-1], (7, FILE_CHANGED), "A's seq 7 on a new connection: 1029 (its download started on the longer file)")
    a.finish()
    tap.ok(a.body() == new, "started again, A gets the new file whole")
    with node().connect() as c:
        raw, _ = chunk(c, "steady.bin", 9)
    tap.eq(raw.get("error"), 1018, "a seq past the end of a name that was not replaced: 1018")


with tap.section("many versions: the oldest fold into one that matches nothing"):
    name = "many.bin"
    starts = []
    for i in range(20):
        data = sized(3)
        if not upload(data, name):
            break
        dv = Device(name, "v%d" % i)
        dv.step(1)                        # a download of each version started and left
        dv.drop()
        starts.append(dv)
    live = versions_hash(name)
    tap.eq(len(starts), 20, "20 versions uploaded, a download of each started")
    tap.ok(len(live) <= 16 and "*" in live, "the versions hash holds at most 16 fields, the oldest folded into \"*\"",
           repr(sorted(live)))
    ttl = redis.cmd("TTL", "file_dlversions_%d_%s" % (U, name))
    tap.ok(0 < ttl <= 3600, "it expires with upload_ttl", str(ttl))
    first = starts[0]
    first.step(1)
    tap.eq(first.log[-1], (2, FILE_CHANGED), "the first version's download (folded away) still hears 1029")
    first.finish()
    tap.ok(first.done and first.body() == data, "and, started again, finishes with the current file")

with tap.section("counts: a completed version leaves the hash; a completion of another lifetime counts nothing"):
    name = "counts.bin"
    old = sized(4)
    new = rand.randbytes(len(old))
    tap.ok(upload(old, name), "uploaded %s" % name)
    a = Device(name, "A")
    a.step(1, new_conn=True)
    (ver, f0), = versions_hash(name).items()
    tap.eq(f0.split()[1:3], ["1", "0"], "seq 1 counted one download started", f0)
    # A's field ages out (as after upload_ttl with no chunk): a new start of the same version gets a new
    # lifetime, and A's completion, which belongs to the old one, must not count against it.
    now = int(redis.cmd("TIME")[0])
    redis.cmd("HSET", "file_dlversions_%d_%s" % (U, name), ver, "%d 1 0 %s" % (now - 4000, f0.split()[3]))
    b = Device(name, "B")
    b.step(1, new_conn=True)
    f1 = versions_hash(name).get(ver, "")
    tap.ok(f1.split()[1:3] == ["1", "0"] and f1.split()[3] != f0.split()[3],
           "a start after the field aged out opens a new lifetime", repr((f0, f1)))
    a.step(10 ** 6, new_conn=False)
    tap.ok(a.done and a.body() == old, "A finished on its connection")
    f2 = versions_hash(name).get(ver, "")
    tap.eq(f2.split()[1:3], ["1", "0"], "its completion was not counted against B's lifetime", repr(f2))
    tap.ok(upload(new, name), "replaced")
    b.step(1, new_conn=True)
    tap.eq(b.log[-1], (2, FILE_CHANGED), "B, still mid-way, resumes elsewhere: 1029")
    b.finish()
    tap.ok(b.body() == new, "and started again gets the new file whole")
    # A field written before the counts (a bare time) reads as one download in progress.
    tap.ok(upload(sized(4), name), "replaced again")
    redis.cmd("HSET", "file_dlversions_%d_%s" % (U, name), "legacy-version", str(int(redis.cmd("TIME")[0])))
    c3 = Device(name, "C")
    c3.step(1, new_conn=True)
    c3.step(1, new_conn=True)
    tap.eq(c3.log[-1], (2, FILE_CHANGED), "a field in the old format (a bare time) keeps its version live")


# ---------------------------------------------------------------- the binary path
HELLO, DOWNLOAD = 1041, 1047


class BinDevice:
    """A fast-path download pinned to the version of its first answer, resumed on new connections."""

    def __init__(self, name, label):
        self.name, self.label = name, label
        self.version = b""
        self.data = b""
        self.size = None
        self.done = False
        self.changed = 0
        self.log = []

    def body(self):
        return self.data

    def step(self, n, length=1500):
        c = node().connect()
        try:
            a = c.request(HELLO, {"uid": U, "token": TOK})
            if a.get("error") != 0:
                raise AssertionError("1041: %r" % a)
            for _ in range(n):
                if self.done:
                    return
                nm = self.name.encode()
                c.send_raw(h.HEADER.pack(DOWNLOAD, 19 + len(nm) + len(self.version)) +
                           struct.pack(">QQHB", len(self.data), length, len(nm), len(self.version)) + nm + self.version)
                mid, body = c.recv_frame(30)
                err, size, off, ln = struct.unpack(">IQQQ", body[:28])
                vlen = body[28]
                ver = body[29:29 + vlen]
                mlen = struct.unpack(">H", body[29 + vlen:31 + vlen])[0]
                self.log.append((off, err))
                if err == FILE_CHANGED:
                    self.changed += 1
                    self.version, self.data = b"", b""
                    continue
                if err != 0 or (self.version and ver != self.version):
                    raise AssertionError("%s: %d at %d, version %r after %r" % (self.label, err, off, ver, self.version))
                self.version, self.size = ver, size
                self.data += body[31 + vlen + mlen:]
                if len(self.data) >= size:
                    self.done = True
        finally:
            c.close()

    def finish(self):
        while not self.done and self.changed < 8:
            self.step(50)


with tap.section("binary path: devices on ranges pinned to versions, replaced between them, both nodes"):
    bad = []
    for k in range(12):
        name = "bin-%d.bin" % k
        versions = [sized(6)]
        versions.append(rand.randbytes(len(versions[0])) if k % 2 == 0 else sized(rand.choice([4, 8])))
        if not upload(versions[0], name):
            bad.append((name, "upload failed"))
            continue
        devs = [BinDevice(name, "bA"), BinDevice(name, "bB"), Device(name, "jC")]   # two binary, one JSON
        events = ["s0", "s1", "s2", "R", "f0", "f1", "f2"]
        rand.shuffle(events)
        for i in range(3):
            si, fi = events.index("s%d" % i), events.index("f%d" % i)
            if si > fi:
                events[si], events[fi] = events[fi], events[si]
        for ev in events:
            if ev == "R":
                if not upload(versions[1], name):
                    bad.append((name, "replace failed"))
            elif ev[0] == "s":
                devs[int(ev[1])].step(2)
                if isinstance(devs[int(ev[1])], Device):
                    devs[int(ev[1])].drop()
            else:
                devs[int(ev[1])].finish()
        for dv in devs:
            if not dv.done or dv.body() not in versions:
                bad.append((name, dv.label, dv.done, dv.log))
    tap.ok(not bad, "12 rounds: every binary and JSON download completed as exactly one version", repr(bad[:2]))

    name = "bin-f4.bin"
    old = sized(6)
    new = rand.randbytes(len(old))
    tap.ok(upload(old, name), "uploaded %s" % name)
    a, b = BinDevice(name, "A"), BinDevice(name, "B")
    a.step(2)
    tap.ok(upload(new, name), "replaced by content of the same size")
    b.step(2)
    a.step(1)
    tap.eq(a.log[-1][1], FILE_CHANGED, "A's range with its old version on a new connection after B started: 1029")
    a.finish()
    b.finish()
    tap.ok(a.body() == new and b.body() == new, "both then complete with the new file")

with tap.section("stale versions age out after upload_ttl: a resume in doubt is served again"):
    short = h.Daemon(workers=1, redis=redis, settings={"server": {"download_chunk": DL},
                                                        "storage": {"root": root, "upload_ttl": 2}})
    short.start()
    nodes.append(short)
    name = "aging.bin"
    old, new = sized(5), sized(5)
    tap.ok(upload(old, name), "uploaded %s" % name)
    with short.connect() as c:
        chunk(c, name, 1)                 # a download of the old version, left after seq 1
    tap.ok(upload(new, name), "replaced")
    got = b""
    with short.connect() as c:
        raw, data = chunk(c, name, 1)     # a download of the new file...
        got += data or b""
    with short.connect() as c:
        raw, _ = chunk(c, name, 2)        # ...resumed elsewhere while the old version is live
    tap.eq(raw.get("error"), FILE_CHANGED, "resumed on another connection while the old version is live: 1029")

    def resumed():
        with short.connect() as c:
            r, data = chunk(c, name, 2)
        return data if r.get("error") == 0 else None
    later = h.wait_for(resumed, 20, 0.25)
    tap.ok(later == new[DL:2 * DL], "once the old version is older than upload_ttl (2 s), the resume is served")

with tap.section("a slow download held on its connection keeps its version live past upload_ttl"):
    name = "slow.bin"
    old, new = sized(40), sized(40)
    tap.ok(upload(old, name), "uploaded %s (40 chunks)" % name)
    a = Device(name, "A")
    a.conn = short.connect()
    a.step(1, new_conn=False)
    (v1, f0), = versions_hash(name).items()
    t0 = int(f0.split()[0])
    tap.eq(f0.split()[1:3], ["1", "0"], "its field counts one download started, none completed", f0)

    def refreshed_past_ttl():
        a.step(1, new_conn=False)         # one more chunk from the file the connection holds
        return int(versions_hash(name).get(v1, "0").split()[0]) >= t0 + 2 or a.done
    tap.ok(h.wait_for(refreshed_past_ttl, 20, 0.3) and not a.done,
           "chunks read from the kept file refresh its version's time past seq 1's + upload_ttl",
           repr((t0, versions_hash(name), len(a.log))))
    tap.ok(upload(new, name), "replaced")
    a.drop()
    a.conn = short.connect()
    a.step(1, new_conn=False)
    tap.eq(a.log[-1][1], FILE_CHANGED, "its resume on a new connection after the replace hears 1029")
    a.finish()
    tap.ok(a.body() == new, "started again, it gets the new file whole")

tap.ok(all(n.log_count("AddressSanitizer") == 0 and n.log_count("fatal") == 0 for n in nodes),
       "no crash or fatal error in either daemon's log")
tap.ok(all(n.log_count("download versions script failed") == 0 for n in nodes), "the versions script never failed")
for n in nodes:
    n.stop()
redis.stop()
tap.finish()

# test_dedup.py: instant upload (issue 14): content already stored is published under a new name after a proof of possession, never sent again.
import os
import struct
import sys

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=240)

CH = 65536
rand = __import__("random").Random(20261201)


def rbytes(n):
    return rand.randbytes(n)


# ---------------------------------------------------------------- servers
redis = h.RedisServer().start()
pg = h.PostgresServer().start()
pg.load_schema()
AVATAR_UID = 2101
pg.sql("INSERT INTO \"user\" (uid, name, email, pwd, nick, \"desc\", sex) VALUES "
       "(%d, 'dora', 'dora@example.org', 'pw', 'nick-dora', 'desc of dora', 1)" % AVATAR_UID)

USER_UIDS = [1101, 1102, AVATAR_UID]          # the daemon with dedup = user
GLOBAL_UIDS = [3101, 3102, 3103, 3104]        # dedup = global
OFF_UIDS = [4101]                             # dedup = off
TOK = {uid: "tok-%d-secret" % uid for uid in USER_UIDS + GLOBAL_UIDS + OFF_UIDS}
for uid, tok in TOK.items():
    redis.set_token(uid, tok)


def daemon(scope, pg_server=None):
    d = h.Daemon(workers=1, redis=redis, pg=pg_server, settings={
        "server": {"storage_timeout": 10},
        "storage": {"dedup": scope, "upload_ttl": 600, "janitor_interval": 1},
        "postgres": {"timeout": 3},
    }, stats=True)
    d.access = os.path.join(d.dir, "access.log")
    d.settings["log"]["access_log"] = d.access
    h.Daemon.write_config(d.conf_path, d.settings)
    tap.context.append(lambda: d.log_tail(10))
    return d


du, dg, doff = daemon("user", pg), daemon("global"), daemon("off")
try:
    for d in (du, dg, doff):
        d.start()
except Exception as e:
    tap.ok(False, "daemons start", str(e))
    tap.finish()
tap.diag("backend: %s" % ("rados" if h.uses_rados(du) else "fs"))
tap.ok(all(d.wait_redis_connected(15) for d in (du, dg, doff)), "three daemons (dedup user, global, off) started")


def qt_upload(d, data, name, uid, msg_id=h.MSG_UPLOAD, lie=None, md5=None, ch=CH):
    """Uploads the way the original Qt client does: every answer with error 0 says where to go on
    (it seeks to trans_size and sends seq + 1) until trans_size = total_size.

    lie(offset) may return bytes to send instead of the real chunk at that offset.
    Returns (last answer, answers, file bytes sent, offsets sent)."""
    up = h.Upload(data, name, uid, TOK[uid], chunk_size=ch, msg_id=msg_id, md5=md5)
    offset, seq, answers, sent, offsets = 0, 1, 0, 0, []
    with d.connect() as c:
        while True:
            piece = data[offset:offset + ch]
            fake = lie(offset) if lie else None
            override = {}
            if fake is not None:
                override["data"] = __import__("base64").b64encode(fake).decode()
            r = up.send_chunk(c, offset, seq, **override)
            answers += 1
            sent += len(piece)
            offsets.append(offset)
            if r.get("error") != 0 or r.get("trans_size") == r.get("total_size"):
                return r, answers, sent, offsets
            if answers > 4 * (len(data) // ch + 2):
                return r, answers, sent, offsets   # a loop: fails below
            offset, seq = r["trans_size"], r["seq"] + 1


def asked_chunk(r):
    """The chunk an answer asks for (its number), or None when it asks for nothing (not a challenge)."""
    if r.get("error") == 0 and r.get("message", "").startswith("challenge: "):
        return r["seq"] + 1
    return None


def stored(d, uid, name):
    """The MD5 of a published file (None when absent): compared with h.md5_hex of the data."""
    p = h.published(d, uid, name)
    return h.file_md5(p) if os.path.exists(p) else None


def content_dir(d):
    return os.path.join(d.root, ".content")


def rados_omap(d, oid):
    """{key: value} of the omap of oid in d's RADOS namespace ({} when it does not exist)."""
    rados = h._import_rados()
    io = d.ceph.ioctx(h.rados_namespace(d))
    try:
        with rados.ReadOpCtx() as op:
            it, _ = io.get_omap_vals(op, "", "", 100000)
            io.operate_read_op(op, oid)
            return {k: v.decode(errors="replace") for k, v in it}
    except rados.ObjectNotFound:
        return {}
    finally:
        io.close()


def content_entries(d):
    """The content index as the fs backend names its entries: [u<uid>-]<md5>-<size> (RADOS: the keys
    [u<uid>.]<md5>.<size> of the "content" omap)."""
    if h.uses_rados(d):
        return sorted(k.replace(".", "-") for k in rados_omap(d, "content"))
    p = content_dir(d)
    return sorted(os.listdir(p)) if os.path.isdir(p) else []


def ident(d, uid, name):
    """Which stored bytes <uid>/<name> is: its inode (fs), the data object its name points at (RADOS)."""
    if h.uses_rados(d):
        return rados_omap(d, "idx.%d" % uid).get(name)
    return os.stat(h.published(d, uid, name)).st_ino


def links(d, uid, name):
    """How many names and index entries use the bytes of <uid>/<name>: its link count (fs), the references
    of its data object that still point at it (RADOS)."""
    if not h.uses_rados(d):
        return os.stat(h.published(d, uid, name)).st_nlink
    head = ident(d, uid, name)
    content = rados_omap(d, "content")
    n = 0
    for ref in rados_omap(d, head):
        kind, _, rest = ref.partition(":")
        if kind == "c" and content.get(rest) == head:
            n += 1
        elif kind == "n":
            ruid, _, rname = rest.partition(":")
            n += rados_omap(d, "idx.%s" % ruid).get(rname) == head
    return n


def access_lines(d, needle):
    try:
        with open(d.access) as f:
            return [line for line in f if needle in line]
    except OSError:
        return []


# ---------------------------------------------------------------- dedup = user
tap.section("dedup = user")
F = rbytes(16 * CH + 1234)                    # 17 chunks
U1, U2 = USER_UIDS[0], USER_UIDS[1]
r, n, sent, _ = qt_upload(du, F, "first.bin", U1)
tap.ok(r.get("error") == 0 and n == 17, "the first upload of a file sends every chunk", repr((r, n)))
entries = content_entries(du)
tap.eq(entries, ["u%d-%s-%d" % (U1, h.md5_hex(F), len(F))], "the content index holds the file under its owner")
first_ident = ident(du, U1, "first.bin")
tap.eq(links(du, U1, "first.bin"), 2, "the published file and the index share one inode (link count 2)")

r, n, sent, offsets = qt_upload(du, F, "second.bin", U1)
tap.ok(r.get("error") == 0 and r.get("trans_size") == len(F) and n <= 3,
       "the same content under a second name completes after at most 3 answered chunks", repr((r, n, offsets)))
tap.ok(sent <= 3 * CH, "at most 3 chunks of the file were sent (%d bytes of %d)" % (sent, len(F)))
tap.ok(all(o % CH == 0 for o in offsets) and offsets[0] == 0 and len(set(offsets)) == len(offsets),
       "chunk 1, then chunks at other chunk boundaries the server asked for", repr(offsets))
tap.eq(stored(du, U1, "second.bin"), h.md5_hex(F), "the second name holds identical bytes")
tap.ok(ident(du, U1, "second.bin") == first_ident and links(du, U1, "second.bin") == 3,
       "published by a hard link, not a copy (one inode, link count 3)")
tap.ok("instant upload" in r.get("message", ""), "the answer says it was an instant upload", repr(r))
tap.ok(h.wait_for(lambda: access_lines(du, "second.bin") and "instant=1" in access_lines(du, "second.bin")[-1], 5),
       "the access log marks the instant upload", repr(access_lines(du, "second.bin")))
info = h.stats_info(du)
tap.ok(info.get("uploads_instant") == 1 and info.get("instant_bytes_saved") == len(F) - sent,
       "show info counts the instant upload and the bytes not transferred",
       repr({k: v for k, v in info.items() if "instant" in k}))
rec = redis.get_json("file_upload_%d_%s" % (U1, h.md5_hex(F)))
tap.ok(rec and rec.get("state") == "published" and rec.get("name") == "second.bin",
       "the Redis record says published, as for any upload", repr(rec))

# Another user: scope user never uses U1's content.
r, n, sent, _ = qt_upload(du, F, "theirs.bin", U2)
tap.ok(r.get("error") == 0 and n == 17 and sent == len(F),
       "with dedup = user, another user's upload of the same content sends every byte", repr((r, n)))
tap.eq(stored(du, U2, "theirs.bin"), h.md5_hex(F), "and is stored")

# Right first chunk, wrong challenged chunks: falls back to a full upload.
asked = []


def wrong_challenges(offset):
    if offset != 0 and not asked:
        asked.append(offset)
        return rbytes(min(CH, len(F) - offset))
    return None


r, n, sent, offsets = qt_upload(du, F, "fallback.bin", U1, lie=wrong_challenges)
tap.ok(r.get("error") == 0 and r.get("trans_size") == len(F) and n == 1 + 1 + 16,
       "right chunk 1 but a wrong challenged chunk: the upload goes on in full (chunk 1, the challenge, then 2..17)",
       repr((r, n, offsets[:4])))
tap.eq(stored(du, U1, "fallback.bin"), h.md5_hex(F), "and the file is published from the bytes sent")
tap.ok(ident(du, U1, "fallback.bin") != first_ident,
       "that file is its own copy: the failed proof linked nothing")

# A file of one chunk is compared whole and shares the stored content.
S = rbytes(5000)
r1, n1, _, _ = qt_upload(du, S, "small-1.txt", U1)
r2, n2, _, _ = qt_upload(du, S, "small-2.txt", U1)
tap.ok(r1.get("error") == 0 and r2.get("error") == 0 and n2 == 1, "a file of one chunk is uploaded twice")
tap.ok(ident(du, U1, "small-1.txt") == ident(du, U1, "small-2.txt"),
       "its second name shares the first one's inode after a full comparison")

# Replacing the only name of some content frees it once the janitor runs.
G = rbytes(3 * CH + 7)
r, _, _, _ = qt_upload(du, G, "replace-me.bin", U1)
g_entry = "u%d-%s-%d" % (U1, h.md5_hex(G), len(G))
tap.ok(r.get("error") == 0 and g_entry in content_entries(du), "a file enters the index when published")
g_ident = ident(du, U1, "replace-me.bin")
r, _, _, _ = qt_upload(du, rbytes(2 * CH), "replace-me.bin", U1)
tap.ok(r.get("error") == 0, "its only name is replaced by other content")
tap.ok(h.wait_for(lambda: g_entry not in content_entries(du), 10, 0.1),
       "the janitor frees the content no name uses any more", repr(content_entries(du)))
tap.ok(h.wait_for(lambda: h.stats_info(du).get("content_freed_bytes", 0) >= len(G), 5, 0.1),
       "show info counts the bytes freed")
tap.ok("u%d-%s-%d" % (U1, h.md5_hex(F), len(F)) in content_entries(du), "content still named stays")
if h.uses_rados(du):
    # Unindexed, its data object is a replaced version like any other: deleted after gc_grace (5 s here).
    tap.ok(h.wait_for(lambda: g_ident not in h.rados_objects(du), 30, 0.5),
           "RADOS: the unindexed data object is deleted once its gc_grace is over", repr(g_ident))
    tap.ok(first_ident in h.rados_objects(du) and links(du, U1, "first.bin") == 3,
           "RADOS: the shared data object stays, with its names and index entry", repr(first_ident))

# An avatar deduplicated this way updates PostgreSQL and ubaseinfo.
A = rbytes(4 * CH + 99)
r, n, _, _ = qt_upload(du, A, "avatar-1.png", AVATAR_UID, msg_id=h.MSG_AVATAR)
tap.ok(r.get("error") == 0 and n == 5, "an avatar is uploaded in full the first time", repr((r, n)))


def icon_of(uid):
    return pg.sql("SELECT icon FROM \"user\" WHERE uid = %d" % uid)


tap.ok(h.wait_for(lambda: icon_of(AVATAR_UID) == "avatar-1.png", 10, 0.1), "its icon reaches PostgreSQL")
r, n, _, _ = qt_upload(du, A, "avatar-2.png", AVATAR_UID, msg_id=h.MSG_AVATAR)
tap.ok(r.get("error") == 0 and r.get("trans_size") == len(A) and n <= 3,
       "the same avatar under a new name is an instant upload", repr((r, n)))
tap.eq(stored(du, AVATAR_UID, "avatar-2.png"), h.md5_hex(A), "the new avatar name holds the bytes")
tap.ok(h.wait_for(lambda: icon_of(AVATAR_UID) == "avatar-2.png", 10, 0.1), "\"user\".icon names the new avatar",
       icon_of(AVATAR_UID))
info = h.wait_for(lambda: (lambda x: x if x and x.get("icon") == "avatar-2.png" else None)(
    redis.get_json("ubaseinfo_%d" % AVATAR_UID)), 10, 0.1)
tap.ok(info and info.get("email") == "dora@example.org", "ubaseinfo names the new avatar", repr(info))

# resctl follows the server's answers and says what it saved.
R = rbytes(40 * CH + 5)
src = os.path.join(h.temp_dir("dedup-resctl"), "r.bin")
with open(src, "wb") as f:
    f.write(R)


def resctl_upload(name, d=None, uid=U2):
    r = __import__("subprocess").run(
        # --compat: the JSON path of the Qt client.
        [h.RESCTL_BIN, "upload", "127.0.0.1:%d" % (d or du).port, src, "--name", name, "--chunk", str(CH),
         "--compat", "--uid", str(uid), "--token", TOK[uid]], stdin=__import__("subprocess").DEVNULL,
        capture_output=True, timeout=60, text=True)
    return r.returncode, r.stdout, r.stderr


rc1, so1, se1 = resctl_upload("resctl-1.bin")
rc2, so2, se2 = resctl_upload("resctl-2.bin")
tap.ok(rc1 == 0 and "already on the server" not in so1, "resctl uploads a new file in full", so1 + se1)
tap.ok(rc2 == 0 and "already on the server: published without sending (" in so2 and "MB saved)" in so2,
       "resctl says the second upload was already on the server and what it saved", so2 + se2)
tap.eq(stored(du, U2, "resctl-2.bin"), h.md5_hex(R), "resctl's instant upload is stored identical")
# Three chunks: chunks 2 and 3 are both asked for, in a random order; when the last chunk comes first,
# its answer asks for chunk 2 and the upload is not over yet.
with open(src, "wb") as f:
    f.write(R[:3 * CH])
outs = [resctl_upload("three-%d.bin" % i) for i in range(5)]
tap.ok(all(rc == 0 for rc, _, _ in outs) and all("already on the server" in so for _, so, _ in outs[1:]),
       "resctl completes five uploads of a three-chunk file, the last four instant", repr(outs))
tap.ok(all(stored(du, U2, "three-%d.bin" % i) == h.md5_hex(R[:3 * CH]) for i in range(5)),
       "each is published identical, whichever chunk was asked for first")

# ---------------------------------------------------------------- the binary fast path (1043 INSTANT, 1049)
tap.section("instant upload over the binary fast path")
HELLO, OPEN, CHUNK = 1041, 1043, 1045
OPEN_INSTANT, CHUNK_LAST, ERR_CHALLENGE = 4, 1, 1049


class Bin:
    """A fast-path client (docs/protocol.md §13) on one connection."""

    def __init__(self, d, uid):
        self.c = d.connect()
        self.hello = self.c.request(HELLO, {"uid": uid, "token": TOK[uid]})

    def open(self, data, name, flags):
        n = name.encode()
        self.c.send_raw(h.HEADER.pack(OPEN, 43 + len(n)) + struct.pack(">QB", len(data), flags) +
                        h.md5_hex(data).encode() + struct.pack(">H", len(n)) + n)
        mid, body = self.c.recv_frame()
        err, committed, total, mlen = struct.unpack(">IQQH", body[:22])
        return {"error": err, "committed": committed, "message": body[22:22 + mlen].decode()}

    def send(self, data, offset, piece=None):
        piece = data[offset:offset + CH] if piece is None else piece
        last = CHUNK_LAST if offset + len(piece) == len(data) else 0
        self.c.send_raw(h.HEADER.pack(CHUNK, 16 + len(piece)) + struct.pack(">QII", offset, len(piece), last) + piece)

    def ack(self):
        mid, body = self.c.recv_frame(30)
        err, off, length, committed, total, mlen = struct.unpack(">IQIQQH", body[:34])
        return {"error": err, "offset": off, "committed": committed, "message": body[34:34 + mlen].decode()}

    def close(self):
        self.c.close()


def resctl_binary(name, path=src, uid=U2, d=None):
    r = __import__("subprocess").run(
        [h.RESCTL_BIN, "upload", "127.0.0.1:%d" % (d or du).port, path, "--name", name, "--chunk", str(CH),
         "--uid", str(uid), "--token", TOK[uid]], stdin=__import__("subprocess").DEVNULL,
        capture_output=True, timeout=60, text=True)
    return r.returncode, r.stdout, r.stderr


with open(src, "wb") as f:
    f.write(R)
rc, so, se = resctl_binary("resctl-bin.bin")
tap.ok(rc == 0 and "already on the server: published without sending (" in so and "MB saved)" in so,
       "resctl over the binary fast path: already on the server, and what it saved", so + se)
tap.eq(stored(du, U2, "resctl-bin.bin"), h.md5_hex(R), "stored identical")
tap.ok(ident(du, U2, "resctl-bin.bin") == ident(du, U2, "resctl-1.bin"),
       "by a link of the stored content")
tap.ok(h.wait_for(lambda: any("binary=1" in line and "instant=1" in line
                              for line in access_lines(du, "resctl-bin.bin")), 5),
       "the access log marks the binary upload instant", repr(access_lines(du, "resctl-bin.bin")))
with open(src, "wb") as f:
    f.write(R[:3 * CH - 100])   # three chunks, the last one short: it may be asked for too
outs = [resctl_binary("bin-three-%d.bin" % i) for i in range(4)]
tap.ok(all(rc == 0 for rc, _, _ in outs) and "already on the server" not in outs[0][1] and
       all("already on the server" in so for _, so, _ in outs[1:]),
       "four binary uploads of a three-chunk file with a short last chunk, the last three instant", repr(outs))
tap.ok(all(stored(du, U2, "bin-three-%d.bin" % i) == h.md5_hex(R[:3 * CH - 100]) for i in range(4)),
       "each is published identical, whichever chunk was asked for")

# A client that pipelines (no INSTANT flag) gets ordinary acknowledgements: nothing is asked of it.
b = Bin(du, U2)
o = b.open(R, "pipelined.bin", 0)
for off in range(0, len(R), CH):
    b.send(R, off)
acks = [b.ack() for _ in range(0, len(R), CH)]
b.close()
tap.ok(o["error"] == 0 and all(a["error"] == 0 and a["committed"] == min(a["offset"] + CH, len(R)) for a in acks),
       "without the INSTANT flag, pipelined chunks of stored content are acknowledged as usual",
       repr([(a["error"], a["committed"]) for a in acks[:3]]))
tap.eq(stored(du, U2, "pipelined.bin"), h.md5_hex(R), "and published")

# The INSTANT flag with wrong bytes for the asked chunk: the answer sends the client back to chunk 2.
b = Bin(du, U2)
o = b.open(R, "bin-wrong.bin", OPEN_INSTANT)
b.send(R, 0)
a1 = b.ack()
asked = a1["committed"]
tap.ok(o["error"] == 0 and o["committed"] == 0 and a1["error"] == ERR_CHALLENGE and asked % CH == 0 and
       CH <= asked < len(R) and a1["message"].startswith("challenge: "),
       "chunk 1 of stored content: 1049 with the offset of the chunk asked for as committed", repr(a1))
b.send(R, asked, rbytes(min(CH, len(R) - asked)))
a2 = b.ack()
tap.ok(a2["error"] == 0 and a2["committed"] == CH, "a wrong chunk: error 0, go on from what is stored (chunk 2)",
       repr(a2))
for off in range(CH, len(R), CH):
    b.send(R, off)
acks = [b.ack() for _ in range(CH, len(R), CH)]
b.close()
tap.ok(all(a["error"] == 0 for a in acks) and acks[-1]["committed"] == len(R) and not acks[-1]["message"],
       "the rest is pipelined and the file is published from the bytes sent", repr(acks[-1]))
tap.ok(stored(du, U2, "bin-wrong.bin") == h.md5_hex(R) and
       ident(du, U2, "bin-wrong.bin") != ident(du, U2, "resctl-1.bin"),
       "as its own copy")

# ---------------------------------------------------------------- dedup = global
tap.section("dedup = global")
G1, G2, G3, G4 = GLOBAL_UIDS
r, n, _, offsets = qt_upload(dg, F, "original.bin", G1)
tap.ok(r.get("error") == 0 and n == 19 and offsets[3:] == [i * CH for i in range(1, 17)],
       "user A uploads a file in full: chunk 1, two decoy chunks asked, then chunks 2..17", repr((r, n, offsets[:4])))
tap.ok(h.wait_for(lambda: redis.cmd("EXISTS", "file_challenge_%d_%s" % (G1, h.md5_hex(F))) == 0, 5, 0.05),
       "the completed upload leaves no draw behind (its decoys would refuse the next instant upload)")
r, n, sent, _ = qt_upload(dg, F, "forwarded.bin", G2)
tap.ok(r.get("error") == 0 and r.get("trans_size") == len(F) and n <= 3 and sent <= 3 * CH,
       "user B holding the whole file completes after at most 3 answered chunks", repr((r, n)))
tap.eq(stored(dg, G2, "forwarded.bin"), h.md5_hex(F), "B's file is identical")

# C knows only (size, md5): every byte it sends is garbage.
r, n, sent, offsets = qt_upload(dg, F, "stolen.bin", G3, lie=lambda off: rbytes(min(CH, len(F) - off)))
tap.ok(r.get("error") == 1024 and n == 19 and offsets[0] == 0 and offsets[3:] == [i * CH for i in range(1, 17)],
       "a client knowing only (size, md5) is asked two chunks like a holder, then uploads every chunk and fails "
       "its MD5 (1024)", repr((r, n, offsets[:4])))
tap.ok(not os.path.exists(h.published(dg, G3, "stolen.bin")), "nothing is published for it")

# D knows chunk 1 (a common header) but not the rest.
r, n, sent, offsets = qt_upload(dg, F, "guessed.bin", G4,
                                lie=lambda off: None if off == 0 else rbytes(min(CH, len(F) - off)))
tap.ok(r.get("error") == 1024 and n == 19 and offsets[3:] == [i * CH for i in range(1, 17)],
       "right chunk 1 and garbage for the challenged chunks: both asked, then a full upload of its own bytes, "
       "refused by MD5", repr((r, n, offsets[:4])))
tap.ok(not os.path.exists(h.published(dg, G4, "guessed.bin")), "nothing of A's file is published for it")
staging = os.path.join(dg.root, ".staging")
if h.uses_rados(dg):
    leftovers = sorted(h.rados_staging(dg))
else:
    leftovers = [f for f in os.listdir(staging) if f.endswith(".part")] if os.path.isdir(staging) else []
tap.eq(leftovers, [], "no staging file is left behind")
tap.eq(content_entries(dg), ["%s-%d" % (h.md5_hex(F), len(F))], "the global index holds the content once")

# ---------------------------------------------------------------- the proof a client cannot shrink, guess or probe
tap.section("red team: tiny chunks, guessable chunks, chunk 1 as an oracle")
RT = list(range(3201, 3213))
for uid in RT:
    TOK[uid] = "tok-%d-secret" % uid
    redis.set_token(uid, TOK[uid])
import base64  # noqa: E402


def b64(b):
    return base64.b64encode(b).decode()


def send_raw_chunk(c, uid, data, total, md5, seq, offset, piece, name="probe.bin"):
    c.send(h.MSG_UPLOAD, {"md5": md5, "name": name, "seq": seq, "trans_size": offset + len(piece),
                          "total_size": total, "last": 1 if offset + len(piece) == total else 0,
                          "data": b64(piece), "uid": uid, "token": TOK[uid]})
    return c.recv_json(h.MSG_UPLOAD + 1, 30)


# F1: a sparse file (90 % zero bytes) whose first byte is known; chunks of 1 byte answered with 0x00.
sparse = bytearray(4 * CH)
sparse[:8] = b"%PDF-1.7"
for i in range(8, len(sparse)):
    if rand.random() < 0.10:
        sparse[i] = rand.randrange(1, 256)
sparse = bytes(sparse)
SM = h.md5_hex(sparse)
r, _, _, _ = qt_upload(dg, sparse, "secret.pdf", G1)
tap.ok(r.get("error") == 0, "a sparse document is stored", repr(r))
wins, asked_any = 0, 0
for uid in RT[:4]:
    with dg.connect() as c:
        a = send_raw_chunk(c, uid, sparse, len(sparse), SM, 1, 0, sparse[:1], "stolen.pdf")
        asked_any += asked_chunk(a) is not None
        for _ in range(3):
            if asked_chunk(a) is None:
                break
            a = send_raw_chunk(c, uid, sparse, len(sparse), SM, a["seq"] + 1, a["trans_size"], b"\x00", "stolen.pdf")
    wins += os.path.exists(h.published(dg, uid, "stolen.pdf"))
tap.ok(asked_any == 0 and wins == 0, "a chunk 1 of 1 byte is never challenged and nothing is published "
       "(the red team's a1: 16 of 20 accounts got the file)", repr((asked_any, wins)))
with dg.connect() as c:
    a = send_raw_chunk(c, RT[4], sparse, len(sparse), SM, 1, 0, sparse[:8192], "half.pdf")
tap.ok(a.get("error") == 0 and asked_chunk(a) is None and a.get("trans_size") == 8192,
       "a right chunk 1 of 8 KiB (below 16 KiB) is a normal upload: nothing asked", repr(a))
r, n, sent, _ = qt_upload(dg, sparse, "floor.pdf", RT[5], ch=16384)
tap.ok(r.get("error") == 0 and "instant upload" in r.get("message", "") and n <= 3,
       "a holder with 16 KiB chunks (the floor) still gets an instant upload", repr((r, n)))
# A holder of chunk 1 (a common header) answering zeros for the sparse chunks asked.
r, n, _, _ = qt_upload(dg, sparse, "zeros.pdf", RT[6], lie=lambda off: None if off == 0 else bytes(CH))
tap.ok(r.get("error") == 1024 and not os.path.exists(h.published(dg, RT[6], "zeros.pdf")),
       "right chunk 1 and zero bytes for the sparse chunks asked: nothing of the file is published", repr(r))

# Binary path (the red team's a2): 1043 INSTANT and a first chunk of 1 byte is not challenged.
b = Bin(dg, RT[7])
o = b.open(sparse, "mine.pdf", OPEN_INSTANT)
b.send(sparse, 0, sparse[:1])
a = b.ack()
b.close()
tap.ok(o["error"] == 0 and a["error"] == 0 and a["committed"] == 1,
       "binary: a first chunk of 1 byte is acknowledged as a normal upload, no 1049", repr(a))

# Guessable chunks prove nothing: one byte value, or chunk 1 repeated.
Z = rbytes(CH) + bytes(4 * CH)
P = rbytes(CH) * 5
for label, data in (("zero bytes", Z), ("chunk 1 repeated", P)):
    r1, n1, _, _ = qt_upload(du, data, "weak-1.bin", U1)
    r2, n2, sent2, offs = qt_upload(du, data, "weak-2.bin", U1)
    tap.ok(r1.get("error") == 0 and r2.get("error") == 0 and "instant" not in r2.get("message", "") and
           n2 == 1 + 2 + 4 and stored(du, U1, "weak-2.bin") == h.md5_hex(data),
           "a file whose chunks 2..5 are %s: a holder is asked two chunks, and then uploads in full" % label,
           repr((r2, n2, offs[:3])))
# One weak chunk among the two asked does not refuse a holder when the other carries the floor.
W = rbytes(2 * CH) + bytes(CH)
qt_upload(du, W, "mixed-1.bin", U1)
r, n, _, _ = qt_upload(du, W, "mixed-2.bin", U1)
tap.ok(r.get("error") == 0 and "instant upload" in r.get("message", "") and n == 3,
       "chunks 2 (random) and 3 (zeros) both asked: instant, chunk 2 carries the proof", repr((r, n)))

# F2: chunk 1 is no oracle. A right and a wrong chunk 1 are answered alike until the proof ends.
X = rbytes(6 * CH + 5)
XM = h.md5_hex(X)
qt_upload(dg, X, "private.key", G1)
wrong1 = X[:CH - 1] + bytes([X[CH - 1] ^ 1])
shapes = {}
for uid, first in ((RT[8], X[:CH]), (RT[9], wrong1)):
    with dg.connect() as c:
        a1 = send_raw_chunk(c, uid, X, len(X), XM, 1, 0, first)
        k1 = asked_chunk(a1)
        a2 = send_raw_chunk(c, uid, X, len(X), XM, k1, (k1 - 1) * CH, rbytes(len(X[(k1 - 1) * CH:k1 * CH]))) \
            if k1 else {}
        k2 = asked_chunk(a2)
        a3 = send_raw_chunk(c, uid, X, len(X), XM, k2, (k2 - 1) * CH, rbytes(len(X[(k2 - 1) * CH:k2 * CH]))) \
            if k2 else {}
    shapes[uid] = (sorted(a1.keys()), a1.get("error"), k1 is not None, k2 is not None and k2 != k1,
                   a3.get("error"), a3.get("seq"), a3.get("trans_size"), asked_chunk(a3), "message" in a3)
tap.ok(shapes[RT[8]] == shapes[RT[9]] and shapes[RT[8]][2] and shapes[RT[8]][3],
       "a right and a wrong chunk 1 get the same answers: two chunks asked, then chunk 2", repr(shapes))
tap.ok(h.wait_for(lambda: all(redis.cmd("HGET", "file_challenge_%d_%s" % (u, XM), "failed") == "1"
                             for u in RT[8:10]), 5, 0.05),
       "both draws are marked failed in Redis")
tap.eq(redis.cmd("HGET", "file_challenge_%d_%s" % (RT[10], XM), "failed"), None, "(no draw for an account never seen)")
with dg.connect() as c:
    a = send_raw_chunk(c, RT[10], X, len(X), XM, 1, 0, wrong1)
tap.ok(asked_chunk(a) is not None and redis.cmd("HGET", "file_challenge_%d_%s" % (RT[10], XM), "failed") == "1",
       "a wrong chunk 1 alone records a failed draw for (uid, md5)", repr(a))
r, n, _, _ = qt_upload(dg, X, "after-guess.key", RT[10])
tap.ok(r.get("error") == 0 and "instant" not in r.get("message", "") and n == 1 + 2 + 6,
       "after it, the whole file and right answers get no instant upload for upload_ttl: a full upload",
       repr((r, n)))
tap.ok(h.wait_for(lambda: redis.cmd("EXISTS", "file_challenge_%d_%s" % (RT[10], XM)) == 0, 5, 0.05),
       "and its completion ends the draw")
r, n, _, _ = qt_upload(dg, X, "again.key", RT[10])
tap.ok(r.get("error") == 0 and "instant upload" in r.get("message", "") and n == 3,
       "so its next upload of the file is instant", repr((r, n)))
# Growing prefixes (the red team's a7): 1..8 bytes, right or wrong, all answered alike (below the floor).
answers = set()
for j, uid in enumerate(RT[:8], start=1):
    for g in (X[j - 1], X[j - 1] ^ 0x55):
        with dg.connect() as c:
            a = send_raw_chunk(c, uid, X, len(X), XM, 1, 0, X[:j - 1] + bytes([g]), "prefix.bin")
        answers.add((a.get("error"), a.get("seq"), a.get("trans_size") - j, "message" in a))
tap.eq(answers, {(0, 1, 0, False)}, "prefixes of 1..8 bytes, right or wrong: one answer shape, nothing asked")

# Binary path: a wrong chunk 1 with the INSTANT flag is asked like a right one; an honest holder completes.
b = Bin(dg, RT[11])
o = b.open(X, "bin-guess.key", OPEN_INSTANT)
b.send(X, 0, wrong1)
a = b.ack()
b.close()
tap.ok(a["error"] == ERR_CHALLENGE and a["message"].startswith("challenge: "),
       "binary: a wrong chunk 1 is answered 1049 like a right one", repr(a))
b = Bin(dg, G2)
o = b.open(X, "bin-holder.key", OPEN_INSTANT)
b.send(X, 0)
a, rounds = b.ack(), 1
while a["error"] == ERR_CHALLENGE and rounds < 4:
    b.send(X, a["committed"])
    a, rounds = b.ack(), rounds + 1
b.close()
tap.ok(a["error"] == 0 and a["committed"] == len(X) and a["message"].startswith("instant upload") and rounds == 3,
       "binary: another user holding the file completes after 3 answered chunks", repr((a, rounds)))

# A binary client that pipelines (no INSTANT flag) uploads new files under global with no 1018: its
# decoys are never chunk 2, the chunk it sends next, so that chunk ends the proof and is stored.
errors = []
for i in range(6):
    NF = rbytes(5 * CH + i)
    b = Bin(dg, RT[11])
    o = b.open(NF, "piped-%d.bin" % i, 0)
    for off in range(0, len(NF), CH):
        b.send(NF, off)
    acks = [b.ack() for _ in range(0, len(NF), CH)]
    b.close()
    errors += [a["error"] for a in acks if a["error"]]
    errors += [] if stored(dg, RT[11], "piped-%d.bin" % i) == h.md5_hex(NF) else ["not stored"]
tap.eq(errors, [], "six new files pipelined over the binary path without INSTANT: every chunk acknowledged, "
       "all published")

# resctl, JSON and binary, under global: a new file goes through its decoys, the next user's is instant.
Q = rbytes(7 * CH + 11)
with open(src, "wb") as f:
    f.write(Q)
outs = [resctl_upload("q-json-1.bin", dg, G3), resctl_upload("q-json-2.bin", dg, G4),
        resctl_binary("q-bin-1.bin", uid=G2, d=dg)]
tap.ok(outs[0][0] == 0 and "already on the server" not in outs[0][1] and
       all(rc == 0 and "already on the server" in so for rc, so, _ in outs[1:]),
       "resctl --compat uploads a new file in full past its decoys; the next users' JSON and binary are instant",
       repr(outs))
tap.ok(all(stored(dg, u, n) == h.md5_hex(Q) for u, n in ((G3, "q-json-1.bin"), (G4, "q-json-2.bin"),
                                                         (G2, "q-bin-1.bin"))), "all three identical")
with open(src, "wb") as f:
    f.write(Q[::-1])
rc, so, se = resctl_binary("q-bin-new.bin", uid=G3, d=dg)
tap.ok(rc == 0 and "already on the server" not in so and stored(dg, G3, "q-bin-new.bin") == h.md5_hex(Q[::-1]),
       "resctl over the binary path uploads a new file in full past its decoys (1049 twice, then chunk 2)", so + se)

# ---------------------------------------------------------------- two nodes sharing a root (issue 9)
tap.section("two nodes sharing the root and Redis")
shared = h.temp_dir("dedup-shared")
MN_UIDS = [5101, 5102, 5103]
for uid in MN_UIDS:
    TOK[uid] = "tok-%d-secret" % uid
    redis.set_token(uid, TOK[uid])
nodes = []
for i in range(2):
    n = daemon("global")
    n.settings["storage"]["root"] = shared
    n.root = shared
    if h.uses_rados(n) and nodes:
        n.settings["rados"]["namespace"] = h.rados_namespace(nodes[0])   # one storage, as the root
    n.settings["server"]["node"] = "node%d" % (i + 1)
    h.Daemon.write_config(n.conf_path, n.settings)
    n.start()
    nodes.append(n)
na, nb = nodes
tap.ok(all(n.wait_redis_connected(15) for n in nodes), "two nodes with dedup = global share one root")
# Whole chunks only: the strong bytes a proof has shown are counted per node (design.md), so a proof
# that moves to another node must carry the floor there; a short last chunk drawn second would not.
M = rbytes(10 * CH)
r, n, _, _ = qt_upload(na, M, "on-a.bin", MN_UIDS[0])
tap.ok(r.get("error") == 0 and n == 12, "a file uploaded in full through node 1 (two decoys asked)", repr(n))
r, n, sent, _ = qt_upload(nb, M, "on-b.bin", MN_UIDS[1])
tap.ok(r.get("error") == 0 and r.get("trans_size") == len(M) and n <= 3,
       "another user's upload of it through node 2 is instant: the index lives with the storage", repr((r, n)))
tap.eq(stored(nb, MN_UIDS[1], "on-b.bin"), h.md5_hex(M), "and identical")

# The proof lives in Redis under the upload's lease (challenge.h): the client may go on through any node.
def send_asked(up, c, k, **override):
    return up.send_chunk(c, (k - 1) * CH, k, **override)


MNX = MN_UIDS[2]
up = h.Upload(M, "moved.bin", MNX, TOK[MNX], chunk_size=CH)
ckey = "file_challenge_%d_%s" % (MNX, h.md5_hex(M))
with na.connect() as c:
    first = up.send_chunk(c, 0, 1)
k1 = asked_chunk(first)
tap.ok(k1 is not None and first.get("trans_size") == (k1 - 1) * CH,
       "node 1 asks for a chunk after chunk 1 (seek to trans_size, send seq + 1)", repr(first))
ttl = redis.cmd("PTTL", ckey)
tap.ok(isinstance(ttl, int) and 0 < ttl <= 600 * 1000,
       "the draw is in Redis and expires with the upload (upload_ttl)", repr(ttl))
with nb.connect() as c:
    s = up.sync(c)
    tap.ok(s.get("error") == 0 and s.get("trans_size") == CH and s.get("seq") == 1,
           "node 2's sync reports what is stored (chunk 1), as 1006 promises", repr(s))
    again = up.send_chunk(c, 0, 1)
tap.eq(asked_chunk(again), k1, "starting over at chunk 1 on node 2 asks for the same chunk: no fresh draw to guess against")
with na.connect() as c:
    second = send_asked(up, c, k1)
k2 = asked_chunk(second)
tap.ok(k2 is not None and k2 != k1, "node 1 takes the asked chunk and asks for another one", repr(second))
with nb.connect() as c:
    done = send_asked(up, c, k2)
tap.ok(done.get("error") == 0 and done.get("trans_size") == len(M) and "instant upload" in done.get("message", ""),
       "node 2 takes the last asked chunk: published without the rest of the file", repr(done))
tap.ok(stored(nb, MNX, "moved.bin") == h.md5_hex(M) and
       ident(nb, MNX, "moved.bin") == ident(na, MN_UIDS[0], "on-a.bin"),
       "identical, and the same inode as the stored content")
tap.ok(h.wait_for(lambda: redis.cmd("EXISTS", ckey) == 0, 5, 0.1), "the proof is deleted once it was used")

# A wrong answer on one node is known to the others, and starting over does not undo it.
MNW = MN_UIDS[1]
wkey = "file_challenge_%d_%s" % (MNW, h.md5_hex(M))
up = h.Upload(M, "wrong.bin", MNW, TOK[MNW], chunk_size=CH)
with na.connect() as c:
    k = asked_chunk(up.send_chunk(c, 0, 1))
with nb.connect() as c:
    # As long as the chunk asked for (the last one is short): the wrong bytes, not a wrong length.
    garbage = __import__("base64").b64encode(rbytes(len(M[(k - 1) * CH:k * CH]) if k else CH)).decode()
    fb = send_asked(up, c, k, data=garbage) if k else {}
    kb = asked_chunk(fb)
    last = send_asked(up, c, kb) if kb else {}
tap.ok(k is not None and kb is not None and kb != k,
       "a wrong answer on node 2 is not told: the second chunk is asked all the same", repr(fb))
tap.ok(last.get("error") == 0 and last.get("trans_size") == CH and asked_chunk(last) is None,
       "after it (even answered right) the upload goes on as a normal one from chunk 2", repr(last))
tap.ok(h.wait_for(lambda: redis.cmd("HGET", wkey, "failed") == "1", 5, 0.05), "Redis remembers the wrong answer")
for node, label in ((na, "node 1"), (nb, "node 2")):
    with node.connect() as c:
        r = up.send_chunk(c, 0, 1)
        ka = asked_chunk(r)
        r2 = send_asked(up, c, ka) if ka else {}
        kb2 = asked_chunk(r2)
        r3 = send_asked(up, c, kb2) if kb2 else {}
    tap.ok(ka == k and kb2 == kb and r3.get("error") == 0 and r3.get("trans_size") == CH and asked_chunk(r3) is None,
           "starting over on %s asks the same chunks, and right answers get no instant upload: no second guess"
           % label, repr((k, kb, ka, kb2, r3)))
with na.connect() as c:
    r, _, _ = up.run(c, CH, 2)
tap.ok(r.get("error") == 0 and stored(na, MNW, "wrong.bin") == h.md5_hex(M) and
       ident(na, MNW, "wrong.bin") != ident(na, MN_UIDS[0], "on-a.bin"),
       "the full upload is published as its own copy", repr(r))
# The binary path: a client that loses its connection mid-proof opens again elsewhere (RESTART) and is asked the same.
MNB = 5104
TOK[MNB] = "tok-%d-secret" % MNB
redis.set_token(MNB, TOK[MNB])
b = Bin(na, MNB)
o = b.open(M, "bin-moved.bin", OPEN_INSTANT)
b.send(M, 0)
a1 = b.ack()
b.close()
b = Bin(nb, MNB)
o2 = b.open(M, "bin-moved.bin", OPEN_INSTANT | 1)   # RESTART: only chunk 1 is stored
b.send(M, 0)
a2 = b.ack()
tap.ok(a1["error"] == ERR_CHALLENGE and a2["error"] == ERR_CHALLENGE and a1["committed"] == a2["committed"],
       "binary: chunk 1 again on node 2 after RESTART is asked for the same chunk as on node 1", repr((a1, o2, a2)))
a = a2
for _ in range(3):
    if a["error"] != ERR_CHALLENGE:
        break
    b.send(M, a["committed"])
    a = b.ack()
b.close()
tap.ok(a["error"] == 0 and a["committed"] == len(M) and a["message"].startswith("instant upload"),
       "and the proof completes there: published without the rest", repr(a))
tap.eq(stored(nb, MNB, "bin-moved.bin"), h.md5_hex(M), "identical")
for n in nodes:
    n.stop()

# ---------------------------------------------------------------- dedup = off
tap.section("dedup = off")
O1 = OFF_UIDS[0]
r1, n1, _, _ = qt_upload(doff, F, "one.bin", O1)
r2, n2, sent2, _ = qt_upload(doff, F, "two.bin", O1)
tap.ok(r1.get("error") == 0 and r2.get("error") == 0 and n1 == 17 and n2 == 17 and sent2 == len(F),
       "with dedup = off the same content is sent in full every time", repr((n1, n2)))
tap.ok(ident(doff, O1, "one.bin") != ident(doff, O1, "two.bin"),
       "two copies, no links")
tap.eq(content_entries(doff), [], "no content index is kept")
tap.eq(h.stats_info(doff).get("uploads_instant"), 0, "no instant upload counted")

tap.finish()

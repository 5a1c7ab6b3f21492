#!/usr/bin/env python3
# rados_test_collect.py: the RADOS collector reaches every queued entry in bounded passes, and an upload whose entry a failed instant upload left closed resumes.
import json
import os
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

# The collector takes one page of the "gc" queue and of the "content" index per pass (512 keys,
# and a budget of reads checking heads), going on after the last key handled the pass before and
# back to the start at the end. Queued here: more entries that are not due than one page holds,
# sorted before due ones (a pass that always began at the start would never reach those), more
# due ones than one pass may check, and more dangling content keys than a page.
#
# A publish from stored content (instant upload) closes the staging entry ("linked") before its
# name switch and reopens it when the switch fails; when the reopen fails too (the cluster in
# trouble), the entry stays linked. The next read of the upload (staging_find) reopens it unless
# its name holds its content already: the client resumes where it was instead of at seq 1.
h.use_rados()
tap = h.Tap(deadline=150)
U, TOKEN = 4501, "tok-4501-collect"
PIECE = 64 << 20
NOT_DUE, DUE, CONTENT = 520, 300, 600

redis = h.RedisServer().start()
redis.set_token(U, TOKEN)
d = h.Daemon(workers=1, redis=redis, settings={"storage": {"janitor_interval": 1}})
rados = h._import_rados()
d.start()
io = d.ceph.ioctx(h.rados_namespace(d))
h.at_cleanup(io.close)


def omap_keys(oid):
    try:
        with rados.ReadOpCtx() as op:
            it, _ = io.get_omap_vals(op, "", "", 100000)
            io.operate_read_op(op, oid)
            return {k: v for k, v in it}
    except rados.ObjectNotFound:
        return {}


def set_omap(oid, pairs):
    with rados.WriteOpCtx() as op:
        io.set_omap(op, tuple(k for k, _ in pairs), tuple(v.encode() for _, v in pairs))
        io.operate_write_op(op, oid)


def exists(oid):
    try:
        io.stat(oid)
        return True
    except rados.ObjectNotFound:
        return False


# (a) The gc queue. Due heads are sealed replaced versions that no name points at: half record a
# (stale) name reference, half none (sealed before references existed).
now = int(time.time())
not_due = [("d.%s.%016x" % ("0" * 32, i), "%d %d kept%d" % (now + 86400, U, i)) for i in range(NOT_DUE)]
due = []
for i in range(DUE):
    md5 = "f" * 32
    head = "d.%s.%016x" % (md5, i)
    meta = json.dumps({"uid": U, "md5": md5, "name": "gone%d" % i, "kind": 0, "total_size": 10,
                       "chunk_len": 10, "piece": PIECE}).encode()
    with rados.WriteOpCtx() as op:
        op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
        for k, v in (("meta", meta), ("fence", b"0000000000000001"), ("state", b"sealed"),
                     ("layout", b"10:%d" % PIECE), ("named", b"1")):
            op.set_xattr(k, v)
        op.write(b"x" * 10, 0)
        if i % 2:
            io.set_omap(op, ("n:%d:gone%d" % (U, i),), (b"1000",))
        io.operate_write_op(op, head)
    due.append((head, "%d %d gone%d" % (now - 10, U, i)))
set_omap("gc", not_due + due)

# (b) Content index keys whose heads are gone: every one is unindexed.
content = [("%032x.%d" % (i, 1000 + i), "d.%s.%016x" % ("e" * 32, i)) for i in range(CONTENT)]
set_omap("content", content)

due_heads = {k for k, _ in due}


def gc_done():
    q = omap_keys("gc")
    return not (due_heads & set(q)) and not any(exists(k) for k in sorted(due_heads)[:5] + sorted(due_heads)[-5:])


tap.ok(h.wait_for(gc_done, 90, interval=0.5), "(a) every due gc entry past the first pages is collected",
       "%d of %d left" % (len(due_heads & set(omap_keys("gc"))), DUE))
left = [k for k in sorted(due_heads) if exists(k)]
tap.eq(left, [], "(a) with its head, referenced or not")
tap.eq(sorted(k for k in omap_keys("gc") if k.startswith("d." + "0" * 32)), sorted(k for k, _ in not_due),
       "(a) the entries not due stay queued")
tap.ok(h.wait_for(lambda: not omap_keys("content"), 90, interval=0.5),
       "(b) every dangling content index key is dropped, %d keys over several pages" % CONTENT,
       "%d left" % len(omap_keys("content")))


# (c) chunk 1 of an upload stored, then its entry left "linked" by a failed instant upload whose
# name switch never happened: the client goes on from chunk 2.
def staged_head(md5):
    return h.rados_staging(d)["%d.%s" % (U, md5)]


def set_linked(head):
    with rados.WriteOpCtx() as op:
        op.set_xattr("state", b"linked")
        io.operate_write_op(op, head)


data = os.urandom(90000)
up = h.Upload(data, "resume.bin", U, TOKEN, chunk_size=32768)
with d.connect() as c:
    r, offset, seq = up.run(c, max_chunks=1)
tap.eq((r.get("error"), seq), (0, 2), "(c) chunk 1 of an upload is stored")
set_linked(staged_head(up.md5))
with d.connect() as c:
    r, offset, _ = up.run(c, offset=offset, seq=seq)
tap.eq(r.get("error"), 0, "(c) the upload goes on from chunk 2 and is published", repr(r))
tap.ok(h.rados_read_file(d, U, "resume.bin") == data, "(c) the name holds the uploaded bytes")
tap.ok("reopened %d/%s" % (U, up.md5) in d.log_text(), "(c) the storage process reopened the linked entry")

# (d) The same, but the name already holds a head of this content: the switch was done, nothing to
# resume (seq 1 starts it again).
data2 = os.urandom(90000)
up2 = h.Upload(data2, "held.bin", U, TOKEN, chunk_size=32768)
with d.connect() as c:
    r, offset, seq = up2.run(c, max_chunks=1)
tap.eq(r.get("error"), 0, "(d) chunk 1 of another upload is stored")
head2 = staged_head(up2.md5)
set_omap("idx.%d" % U, [("held.bin", "d.%s.%016x" % (up2.md5, 7))])
set_linked(head2)
with d.connect() as c:
    r = up2.send_chunk(c, offset, seq)
tap.eq(r.get("error"), 1012, "(d) a linked entry whose name switch was done is not resumed", repr(r))

tap.finish()

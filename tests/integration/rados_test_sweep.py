#!/usr/bin/env python3
# rados_test_sweep.py: the RADOS collector deletes data objects a crash left unnamed, and nothing any name, upload or begin still uses.
import json
import os
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

h.use_rados()
tap = h.Tap(deadline=180)
U, TOKEN = 4301, "tok-4301-sweep"
PIECE = 64 << 20
OLD = int(time.time()) - 86400   # a day ago: far past the grace (10 x storage_timeout)

redis = h.RedisServer().start()
redis.set_token(U, TOKEN)
d = h.Daemon(workers=1, redis=redis, log_level="debug", settings={"storage": {"janitor_interval": 1}}, stats=True)
rados = h._import_rados()


def ioctx():
    io = d.ceph.ioctx(h.rados_namespace(d))
    h.at_cleanup(io.close)
    return io


def write(oid, data=b"", xattrs=(), mtime=OLD, create=True, remove_xattrs=()):
    """One compound write on oid, stamped with mtime (what a crash a day ago would have left)."""
    with rados.WriteOpCtx() as op:
        if create:
            op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
        for k, v in xattrs:
            op.set_xattr(k, v)
        for k in remove_xattrs:
            op.rm_xattr(k)
        if data:
            op.write(data, 0)
        io.operate_write_op(op, oid, mtime=mtime)


def head_attrs(md5, name, state=b"open", named=None, fence=b"0000000000000001"):
    meta = json.dumps({"uid": U, "md5": md5, "name": name, "kind": 0, "total_size": 1000, "chunk_len": 1000,
                       "piece": PIECE}).encode()
    out = [("meta", meta), ("fence", fence), ("state", state)]
    if named is not None:
        out.append(("named", named))
    return out


def exists(oid):
    try:
        io.stat(oid)
        return True
    except rados.ObjectNotFound:
        return False


def swept():
    return h.stats_info(d).get("orphans_swept", 0)


d.start()
io = ioctx()

# What users have: a published file and an upload in progress (chunk 1 of 3 stored).
published = os.urandom(50000)
with d.connect() as c:
    r, _, _ = h.Upload(published, "kept.bin", U, TOKEN, chunk_size=32768).run(c)
tap.eq(r.get("error"), 0, "a file is published")
live = h.Upload(os.urandom(90000), "live.bin", U, TOKEN, chunk_size=32768)
with d.connect() as c:
    r, live_offset, live_seq = live.run(c, max_chunks=1)
tap.eq(r.get("error"), 0, "an upload has its chunk 1 stored")
with rados.ReadOpCtx() as op:
    it, _ = io.get_omap_vals_by_keys(op, ("kept.bin",))
    io.operate_read_op(op, "idx.%d" % U)
    published_head = dict(it)["kept.bin"].decode()
live_head = h.rados_staging(d)["%d.%s" % (U, live.md5)]
# Aged a day, so that only their names keep them (the live head also loses its "named" mark, as
# a head indexed before the mark existed, or by a begin that stopped between the index and the mark).
write(published_head, xattrs=[("test_aged", b"1")], create=False)
write(live_head, xattrs=[("test_aged", b"1")], create=False, remove_xattrs=["named"])
tap.ok(io.stat(published_head)[1] < time.localtime(OLD + 3600), "the published head now looks a day old",
       repr(io.stat(published_head)))

# What crashes leave: nothing names these.
lost_begin = "d.%s.%s" % ("a" * 32, "0123456789abcdef")      # created, never indexed
write(lost_begin, b"x" * 1000, head_attrs("a" * 32, "lost.bin"))
lost_discard = "d.%s.%s" % ("b" * 32, "0123456789abcdef")    # indexed once, its staging key dropped
write(lost_discard, b"y" * 1000, head_attrs("b" * 32, "gone.bin", named=b"1"))
write(lost_discard + ".1", b"y" * 10, [("fence", b"0000000000000001")])
headless = "d.%s.%s" % ("c" * 32, "0123456789abcdef")        # a collection stopped after the head went
write(headless + ".1", b"z" * 10)
write(headless + ".2", b"z" * 10)
doomed = [lost_begin, lost_discard, lost_discard + ".1", headless + ".1", headless + ".2"]

# What must stay besides: a head just created (a begin about to index it), a replaced version
# waiting in gc, an object that is not resourced's data.
fresh = "d.%s.%s" % ("d" * 32, "0123456789abcdef")
write(fresh, b"w" * 1000, head_attrs("d" * 32, "new.bin"), mtime=int(time.time()))
queued = "d.%s.%s" % ("e" * 32, "0123456789abcdef")
write(queued, b"v" * 1000, head_attrs("e" * 32, "old.bin", state=b"sealed", named=b"1") + [("layout", b"1000:%d" % PIECE)])
with rados.WriteOpCtx() as op:
    io.set_omap(op, (queued,), (b"%d %d old.bin" % (int(time.time()) + 3600, U),))
    io.operate_write_op(op, "gc")
other = "d.not-ours"
write(other, b"u")
kept = [published_head, live_head, fresh, queued, other]
tap.ok(all(exists(o) for o in kept), "the objects are in place")

tap.ok(h.wait_for(lambda: swept() >= len(doomed), 60, 0.5), "the collector deletes the unnamed objects",
       "orphans_swept %r; objects %r" % (swept(), h.rados_objects(d)))
tap.ok(not any(exists(o) for o in doomed), "heads never indexed, heads no key names and pieces without a head are gone",
       repr([o for o in doomed if exists(o)]))
# Two more passes through the whole namespace, and nothing else goes.
mark = d.log_count("the sweep went through the whole namespace")
tap.ok(h.wait_for(lambda: d.log_count("the sweep went through the whole namespace") >= mark + 2, 30, 0.5),
       "the sweep goes on through the namespace")
tap.eq(swept(), len(doomed), "orphans_swept counts what it deleted, once")
tap.ok(all(exists(o) for o in kept), "the published head, the live upload's, a fresh head, a queued version and "
       "another object stay", repr([o for o in kept if not exists(o)]))
tap.ok(d.log_count("swept unnamed data object") == 2 and d.log_count("whose head is gone") == 2,
       "each deletion is logged")

# The users' files still work: the published file downloads, the upload resumes and publishes.
with d.connect() as c:
    got, _ = h.download(c, "kept.bin", U, TOKEN)
tap.ok(got == published, "the published file downloads whole", "%d bytes" % len(got))
with d.connect() as c:
    r, _, _ = live.run(c, offset=live_offset, seq=live_seq)
tap.eq(r.get("error"), 0, "the upload in progress resumes and is published")
tap.ok(h.rados_read_file(d, U, "live.bin") == live.data, "with its bytes")

tap.finish()

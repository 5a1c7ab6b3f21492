#!/usr/bin/env python3
# rados_test_interrupted.py: a RADOS publish cut after its seal is finished without deleting or rolling back what a name points at.
import json
import os
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

# A publish seals its head (the MD5 was checked), switches the name to it, then drops its staging
# key. Cut between the last two (a crash, or the key's removal failing: it is only logged), or with
# a switch the cluster applied but answered too late, the staging key still names a sealed head
# that a name may already point at. Whoever meets that key next (a begin of the same content, the
# recovery of a restarted storage process, the janitor's listing) must finish the publish, never
# delete the head nor point the name back at it once another version replaced it. (A discard of
# such an entry: the contract test, test_discard_after_publish.) A publish from stored content
# (instant upload) cut after it closed its entry ("linked") leaves a key nothing resumes: the
# janitor drops it once it is as old as an abandoned upload, and not before.
h.use_rados()
tap = h.Tap(deadline=240)
U, TOKEN = 4401, "tok-4401-cut"

redis = h.RedisServer().start()
redis.set_token(U, TOKEN)
# A long gc_grace: the versions replaced below stay in place for the whole test, as they do in
# production for an hour.
d = h.Daemon(workers=1, redis=redis, settings={"storage": {"janitor_interval": 1}, "rados": {"gc_grace": 3600}})
rados = h._import_rados()


def ioctx(daemon):
    io = daemon.ceph.ioctx(h.rados_namespace(daemon))
    h.at_cleanup(io.close)
    return io


def name_head(io, name):
    with rados.ReadOpCtx() as op:
        it, _ = io.get_omap_vals_by_keys(op, (name,))
        io.operate_read_op(op, "idx.%d" % U)
        return dict(it)[name].decode()


def set_omap(io, oid, key, value):
    with rados.WriteOpCtx() as op:
        io.set_omap(op, (key,), (value.encode() if isinstance(value, str) else value,))
        io.operate_write_op(op, oid)


def publish(daemon, data, name):
    with daemon.connect() as c:
        r, _, _ = h.Upload(data, name, U, TOKEN, chunk_size=32768).run(c)
    return r.get("error")


def fetch(daemon, name):
    """The bytes a download of name gets, or the error it ends with."""
    try:
        with daemon.connect() as c:
            got, _ = h.download(c, name, U, TOKEN)
        return got
    except h.ProtocolError as err:
        return str(err)


d.start()
io = ioctx(d)

# (a) The same content again (another name) while the key of its interrupted publish is left: the
# begin finds a sealed head, which the name already points at.
x = os.urandom(50000)
tap.eq(publish(d, x, "kept.bin"), 0, "(a) a file is published")
kept_head = name_head(io, "kept.bin")
set_omap(io, "staging", "%d.%s" % (U, h.md5_hex(x)), kept_head)   # its key, as the cut left it
tap.eq(publish(d, x, "copy.bin"), 0, "(a) the same bytes are published under another name")
got = fetch(d, "kept.bin")
tap.ok(got == x, "(a) the first name still downloads whole (its head was finished, not deleted)", got[:200])
tap.ok(h.rados_read_file(d, U, "copy.bin") == x, "(a) and the second name holds the bytes")
tap.ok("%d.%s" % (U, h.md5_hex(x)) not in h.rados_staging(d), "(a) no staging key is left")

# (b) A version whose key was left, replaced (acknowledged) since: the recovery of a restarted
# storage process must not point the name back at it.
v1, v2 = os.urandom(40000), os.urandom(45000)
tap.eq(publish(d, v1, "doc.bin"), 0, "(b) version 1 is published")
set_omap(io, "staging", "%d.%s" % (U, h.md5_hex(v1)), name_head(io, "doc.bin"))
tap.eq(publish(d, v2, "doc.bin"), 0, "(b) version 2 replaces it, acknowledged")
old = d.storage_pid()
os.kill(old, 9)
tap.ok(h.wait_for(lambda: d.storage_pid() not in (None, old), 30), "(b) a new storage process runs")
tap.ok(h.wait_for(lambda: "%d.%s" % (U, h.md5_hex(v1)) not in h.rados_staging(d), 30),
       "(b) its recovery drops the key of version 1")
tap.ok(h.wait_for(lambda: d.ping(), 30), "(b) the daemon answers again")
got = fetch(d, "doc.bin")
tap.ok(got == v2, "(b) the name still gives version 2", "version 1" if got == v1 else got[:200])

# (c) Keys of publishes from stored content cut after their entry was closed ("linked"): one a day
# old (dropped by the janitor's listing), one fresh (its publish may be running on another node).
def linked_entry(md5, mtime):
    head = "d.%s.%s" % (md5, "0123456789abcdef")
    meta = json.dumps({"uid": U, "md5": md5, "name": "linked.bin", "kind": 0, "total_size": 100000,
                       "chunk_len": 32768, "piece": 64 << 20}).encode()
    with rados.WriteOpCtx() as op:
        op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
        for k, v in (("meta", meta), ("fence", b"0000000000000001"), ("state", b"linked"), ("named", b"1")):
            op.set_xattr(k, v)
        op.write(b"c" * 32768, 0)
        io.operate_write_op(op, head, mtime=mtime)
    set_omap(io, "staging", "%d.%s" % (U, md5), head)
    return head


old_key, young_key = "%d.%s" % (U, "a" * 32), "%d.%s" % (U, "b" * 32)
old_head = linked_entry("a" * 32, int(time.time()) - 86400)
young_head = linked_entry("b" * 32, int(time.time()))
tap.ok(h.wait_for(lambda: old_key not in h.rados_staging(d), 30), "(c) the janitor drops the old linked entry")
tap.ok(old_head not in h.rados_objects(d), "(c) with its data")
tap.ok(young_key in h.rados_staging(d) and young_head in h.rados_objects(d),
       "(c) a fresh one stays (the same listing saw it)")

tap.finish()

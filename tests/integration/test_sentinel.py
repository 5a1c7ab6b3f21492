# test_sentinel.py: Redis through Sentinel: discovery, a failover during uploads loses no acknowledged byte, tokens are checked on the new master.
import os
import sys
import threading

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=200)

UID, TOKEN = 4201, "sentinel-token"
CHUNK = 32768
WORKERS = 2

ss = h.SentinelSet()
try:
    ss.start()
except Exception as e:
    tap.ok(False, "a master, a replica and three sentinels start and settle", str(e))
    tap.finish()
tap.ok(True, "a master, a replica and three sentinels start and settle")
first_master, first_replica = ss.master, ss.replica
ss.master.set_token(UID, "sentinel-token")
tap.ok(h.wait_for(lambda: ss.synced("utoken_%d" % UID, TOKEN), 10), "the token reached the replica")

# The first sentinel listed is dead: the others are asked in turn. host/port point
# nowhere: with sentinels they are not used.
dead_sentinel = h.free_port()
d = h.Daemon(workers=WORKERS, settings={
    "redis": {"host": "127.0.0.1", "port": h.free_port(),
              "sentinels": "127.0.0.1:%d, %s" % (dead_sentinel, ss.addresses), "master_name": ss.name},
    "server": {"storage_timeout": 10},
})
tap.context.append(lambda: d.log_tail(20))
tap.context.append(lambda: "sentinels: %r" % ss.state())


def connected_to(server):
    return d.log_count("redis: connected to the master 127.0.0.1:%d" % server.port)


try:
    d.start()
except Exception as e:
    tap.ok(False, "resourced starts with [redis] sentinels", str(e))
    tap.finish()
tap.ok(h.wait_for(lambda: connected_to(first_master) >= WORKERS + 1, 15),
       "every worker and the storage process connect to the master the sentinels name")


def record(server, up):
    try:
        return server.get_json("file_upload_%d_%s" % (UID, up.md5))
    except Exception:
        return None


def new_upload(name, size):
    return h.Upload(os.urandom(size), name, UID, TOKEN, chunk_size=CHUNK)


def published_ok(up):
    path = h.published(d, UID, up.name)
    return os.path.exists(path) and h.read_file(path) == up.data


with tap.section("upload through the sentinels' master"):
    up = new_upload("before.bin", 200000)
    with h.Client(d.port) as c:
        r, _, _ = up.run(c)
    tap.eq(r.get("error"), 0, "an upload completes")
    tap.ok(published_ok(up), "and is published byte-identical")
    with h.Client(d.port) as c:
        bad = c.request(h.MSG_UPLOAD, new_upload("bad.bin", 1000).body(0, 1, token="wrong"))
    tap.ok(bad.get("error") not in (0, None), "a wrong token is refused (tokens read through Sentinel)", repr(bad))

with tap.section("a restarted worker takes its first connections once the sentinels' master answers"):
    # Through sentinels a worker's Redis is ready only after asking them and the master's ROLE: a
    # worker restarted after a crash that accepted at once answered the connections queued for its
    # slot 1027. It accepts once ready now (or after [redis] timeout, if Redis is away).
    probe = h.Upload(os.urandom(1000), "never-sent.bin", UID, TOKEN)
    with h.Client(d.port, timeout=10) as c:
        healthy = probe.sync(c).get("error")
    tap.ok(healthy not in (None, 1027), "1005 for an upload never started: %r" % healthy)
    for round_no in range(3):
        codes = h.answers_queued_during_restart(d, min(d.worker_pids()), h.MSG_SYNC,
                                                {"md5": probe.md5, "uid": UID, "token": TOKEN}, 12)
        tap.eq(codes, [healthy] * len(codes),
               "round %d: requests queued while a worker restarted are answered as by a running one" % round_no)
        tap.ok(h.wait_for(lambda: len(d.worker_pids()) == WORKERS, 10), "round %d: the worker is back" % round_no)

with tap.section("failover during uploads"):
    # Paused uploads: a third of each is acknowledged before the failover, the rest after.
    paused = [new_upload("paused-%d.bin" % i, 1500000) for i in range(3)]
    paused_at = []
    for up in paused:
        with h.Client(d.port) as c:
            r, offset, seq = up.run(c, max_chunks=15)
        paused_at.append((offset, seq))
    tap.ok(all(o == 15 * CHUNK for o, _ in paused_at), "the paused uploads have 15 chunks acknowledged")
    # A record is written after its chunk is answered (only seq 1 waits for it).
    tap.ok(h.wait_for(lambda: all((record(first_master, up) or {}).get("trans_size") == 15 * CHUNK
                                  for up in paused), 10),
           "their progress records are on the first master", repr([record(first_master, up) for up in paused]))

    # Running uploads: half of each goes before the failover, the third quarter
    # while it runs and the rest after resourced followed it, on a new connection
    # every 4 chunks (1005, and a token check in Redis).
    running = [new_upload("running-%d.bin" % i, 3000000) for i in range(3)]
    deadline = h.time.monotonic() + 60
    results = [None] * len(running)
    failover_started = threading.Event()
    failover_followed = threading.Event()

    def run_one(i):
        up = running[i]
        calls = [0]

        def before_chunk(offset):
            if offset < len(up.data) // 2:
                return False
            failover_started.wait(30)
            if offset >= len(up.data) * 3 // 4:
                failover_followed.wait(30)
            calls[0] += 1
            return calls[0] % 5 == 0
        try:
            results[i] = (up.complete(d.port, deadline, before_chunk=before_chunk), None)
        except Exception as e:
            results[i] = (None, e)
    threads = [threading.Thread(target=run_one, args=(i,), daemon=True) for i in range(len(running))]
    for t in threads:
        t.start()
    # Writes the master acknowledged but had not replicated yet are lost in a
    # failover: delete the paused uploads' records on the replica to be sure
    # resourced writes them again on the new master.
    tap.ok(h.wait_for(lambda: all((record(ss.replica, up) or {}).get("trans_size") == 15 * CHUNK
                                  for up in paused), 10), "the records reached the replica")
    ss.replica.cmd("CONFIG", "SET", "replica-read-only", "no")
    for up in paused:
        ss.replica.cmd("DEL", "file_upload_%d_%s" % (UID, up.md5))
    tap.ok(not any(record(ss.replica, up) for up in paused), "the paused uploads' records are gone on the replica")
    tap.ok(h.wait_for(lambda: all(u.sent_bytes >= len(u.data) // 2 for u in running), 20),
           "the running uploads are half done before the failover")
    old = ss.failover()
    failover_started.set()
    new = ss.replica if old is ss.master else ss.master
    tap.ok(h.wait_for(lambda: ss.current_master() is new and new.role() == "master", 30),
           "the sentinels promote the replica")
    tap.ok(h.wait_for(lambda: connected_to(new) >= WORKERS + 1, 30),
           "every worker and the storage process follow the failover to the new master")
    failover_followed.set()
    tap.ok(h.wait_for(lambda: all((record(new, up) or {}).get("trans_size") == 15 * CHUNK for up in paused), 15),
           "the paused uploads' progress is recorded again on the new master",
           repr([record(new, up) for up in paused]))
    for t in threads:
        t.join(max(0.0, deadline - h.time.monotonic()))
    for i, up in enumerate(running):
        events = [e[0] for e in getattr(up, "events", [])]
        tap.diag("running upload %d: %d bytes sent for %d; %d reconnects, %d answered 1027, %d dropped"
                 % (i, up.sent_bytes, len(up.data), events.count("reconnect"), events.count("1027"),
                    events.count("dropped")))
        r, e = results[i]
        tap.ok(e is None and r and r.get("error") == 0, "running upload %d completes through the failover" % i,
               "%r %r" % (e, getattr(up, "events", None)))
        tap.ok(published_ok(up), "running upload %d is published byte-identical" % i)
        tap.ok(up.sent_bytes < 1.5 * len(up.data), "running upload %d sent %d bytes for %d: no restart from zero"
               % (i, up.sent_bytes, len(up.data)), repr(getattr(up, "events", None)))

    # The paused ones resume on new connections: 1005 answers from the record, then the rest.
    for i, up in enumerate(paused):
        with h.Client(d.port) as c:
            s = up.sync(c)
            ok = s.get("error") == 0 and s.get("trans_size") == 15 * CHUNK
            r, _, _ = up.run(c, offset=s.get("trans_size", 0), seq=s.get("seq", 0) + 1) if ok else (s, 0, 0)
        tap.ok(ok, "paused upload %d: 1005 after the failover answers the acknowledged offset" % i, repr(s))
        tap.ok(r.get("error") == 0 and published_ok(up), "paused upload %d completes byte-identical" % i, repr(r))
        tap.ok(up.sent_bytes < 1.5 * len(up.data), "paused upload %d resent nothing acknowledged" % i)

with tap.section("tokens after the failover"):
    new.set_token(UID + 1, "after-failover")
    fresh = h.Upload(os.urandom(100000), "fresh.bin", UID + 1, "after-failover", chunk_size=CHUNK)
    with h.Client(d.port) as c:
        r, _, _ = fresh.run(c)
    tap.eq(r.get("error"), 0, "a token written on the new master is accepted")
    new.set_token(UID + 1, "changed")
    with h.Client(d.port) as c:
        r = c.request(h.MSG_UPLOAD, h.Upload(b"x" * 100, "refused.bin", UID + 1, "after-failover").body(0, 1))
    tap.ok(r.get("error") not in (0, None), "a token changed on the new master is checked again: the old one "
           "is refused", repr(r))
    tap.ok(old.role() == "slave" or h.wait_for(lambda: old.role() == "slave", 40),
           "the old master became a replica (its writes would answer READONLY)")

with tap.section("master killed"):
    # The new master dies: the connections drop, the sentinels elect the old one again.
    victim = ss.current_master()
    survivor = ss.replica if victim is ss.master else ss.master
    tap.ok(h.wait_for(lambda: ss.settled(), 40), "the sentinels settle before the kill")
    up = new_upload("across-kill.bin", 1500000)
    with h.Client(d.port) as c:
        r, offset, seq = up.run(c, max_chunks=10)
    before = connected_to(survivor)
    victim.kill()
    tap.ok(h.wait_for(lambda: ss.current_master() is survivor and survivor.role() == "master", 40),
           "the sentinels fail over to the survivor")
    tap.ok(h.wait_for(lambda: connected_to(survivor) >= before + WORKERS + 1, 30),
           "resourced follows to the survivor")
    with h.Client(d.port) as c:
        s = h.wait_for(lambda: (lambda x: x if x.get("error") == 0 else None)(up.sync(c)), 15) or up.sync(c)
        tap.eq(s.get("trans_size"), 10 * CHUNK, "1005 answers the acknowledged offset after the kill", repr(s))
        r, _, _ = up.run(c, offset=s.get("trans_size", 0), seq=s.get("seq", 0) + 1)
    tap.ok(r.get("error") == 0 and published_ok(up), "the upload completes byte-identical after the kill", repr(r))
    tap.ok(up.sent_bytes < 1.5 * len(up.data), "without a restart from zero (%d bytes sent)" % up.sent_bytes)
    victim.start()   # comes back empty; the sentinels make it a replica of the survivor

with tap.section("master turned read-only"):
    # The master becomes a replica behind the sentinels' back (they would count
    # it down only after down-after + 20 s): the storage process's next write
    # answers READONLY, it asks the sentinels again, and ROLE refuses their
    # stale answer until the server is a master again.
    ro = h.wait_for(lambda: (lambda m: m if m and m.role() == "master" else None)(ss.current_master()), 15)
    tap.ok(ro, "the sentinels name a master")
    up = new_upload("across-readonly.bin", 1000000)
    with h.Client(d.port) as c:
        r, offset, seq = up.run(c, max_chunks=5)
        before = connected_to(ro)
        ro.cmd("REPLICAOF", "127.0.0.1", h.free_port())
        r, offset, seq = up.run(c, offset=offset, seq=seq, max_chunks=1)
        tap.eq(r.get("error"), 0, "a chunk written while the master is read-only is acknowledged (it is on disk)")
        tap.ok(h.wait_for(lambda: d.log_count("became read-only (a failover)"), 10),
               "the storage process notices READONLY and leaves that server")
        tap.ok(h.wait_for(lambda: d.log_count("127.0.0.1:%d is not a master (slave)" % ro.port), 10),
               "ROLE keeps it from using the server while it is a replica")
        ro.cmd("REPLICAOF", "NO", "ONE")
        tap.ok(h.wait_for(lambda: connected_to(ro) > before, 15), "the storage process is back once it is a master")
        tap.ok(h.wait_for(lambda: (record(ro, up) or {}).get("trans_size") == 6 * CHUNK, 15),
               "the acknowledged progress is recorded", repr(record(ro, up)))
        r, _, _ = up.run(c, offset=offset, seq=seq)
    tap.ok(r.get("error") == 0 and published_ok(up), "the upload completes byte-identical", repr(r))
    tap.ok(up.sent_bytes < 1.5 * len(up.data), "without a restart from zero (%d bytes sent)" % up.sent_bytes)

with tap.section("stop"):
    rc, left = d.stop()
    tap.eq(rc, 0, "resourced stops cleanly")

tap.finish()

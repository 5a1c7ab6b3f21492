# test_process.py: the process model of resourced: master, workers and storage, respawn, framing limits, timeouts, -t and stop.
import os
import signal
import socket
import struct
import sys
import time

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=240)

WORKERS = 3
MAX_FRAME = 65536

d = h.Daemon(workers=WORKERS, settings={
    "server": {"idle_timeout": 2, "frame_timeout": 2, "max_frame": MAX_FRAME},
})
tap.context.append(lambda: d.log_tail(15))

try:
    d.start()
    started = True
except Exception as e:
    started = False
    tap.ok(False, "daemon starts and answers 1001", str(e))
    tap.finish()
tap.ok(True, "daemon starts and answers 1001")


def titles_of(procs):
    return sorted(t for t, _ in procs.values())


# ---------------------------------------------------------------- the process tree
with tap.section("process tree"):
    # A child just forked still carries the master's title until it sets its own: wait for the
    # titles to settle, then check them.
    want = sorted(["resourced: master", "resourced: storage"] + ["resourced: worker %d" % i
                                                                 for i in range(1, WORKERS + 1)])
    h.wait_for(lambda: titles_of(d.processes()) == want, 10)
    procs = d.processes()
    master = d.master_pid
    tap.eq(h.proc_title(master), "resourced: master", "the started process is titled 'resourced: master'")
    tap.eq(d.by_title("resourced: master"), [master], "exactly one master")
    tap.eq(titles_of(procs), want, "one master, workers 1..%d and one storage process, nothing else" % WORKERS,
           diag=repr(procs))
    children = {pid: t for pid, (t, ppid) in procs.items() if pid != master}
    tap.ok(children and all(procs[pid][1] == master for pid in children),
           "workers and storage are children of the master", repr(procs))
    try:
        with open(d.pid_file) as f:
            pid_in_file = int(f.read().strip())
    except (OSError, ValueError) as e:
        pid_in_file = repr(e)
    tap.eq(pid_in_file, master, "the pid file holds the master's pid")


# ---------------------------------------------------------------- 1001
with tap.section("1001 on concurrent connections"):
    conns = [h.Client(d.port) for _ in range(20)]
    payloads = ["ping %d" % i for i in range(20)]
    for c, p in zip(conns, payloads):
        c.send(h.MSG_TEST, {"data": p})
    answers = []
    for c in conns:
        try:
            answers.append(c.recv_json(h.MSG_TEST + 1, timeout=10))
        except Exception as e:
            answers.append(repr(e))
    good = [isinstance(a, dict) and a.get("error") == 0 and a.get("data") == p for a, p in zip(answers, payloads)]
    tap.ok(all(good), "20 concurrent connections each get 1002 with error 0 and their own data echoed",
           "bad: %r" % [a for a, g in zip(answers, good) if not g][:5])
    for c in conns:
        c.close()

    with h.Client(d.port) as c:
        # Several frames in one write: answered in order.
        c.send_raw(b"".join(h.frame(h.MSG_TEST, {"data": "p%d" % i}) for i in range(10)))
        got = []
        for i in range(10):
            try:
                got.append(c.recv_json(h.MSG_TEST + 1, 10).get("data"))
            except Exception as e:
                got.append(repr(e))
        tap.eq(got, ["p%d" % i for i in range(10)], "10 pipelined 1001 frames are answered in order")

        # A frame split in pieces (the header byte by byte), with Qt's indented JSON.
        raw = h.frame(h.MSG_TEST, '{\n    "data": "split \u00e9\u2713"\n}\n')
        for i in range(0, len(raw), 3):
            c.send_raw(raw[i:i + 3])
            time.sleep(0.005)
        r = c.recv_json(h.MSG_TEST + 1, 10)
        tap.eq(r.get("data"), "split \u00e9\u2713", "a frame arriving in 3-byte pieces with indented JSON is answered")

        r = c.request(h.MSG_TEST, {"data": {"nested": [1, 2.5, None, True, "x"]}})
        tap.eq(r.get("data"), {"nested": [1, 2.5, None, True, "x"]}, "1001 echoes a structured data value")

        raw = c.request(h.MSG_TEST, {"data": "typed"}) and c.last_raw
        tap.ok(b'"error":0' in raw.replace(b" ", b""), "1002's error is the JSON number 0", raw)

        # Exactly max_frame bytes of body is allowed.
        filler = "x" * (MAX_FRAME - len('{"data":""}'))
        body = ('{"data":"%s"}' % filler).encode()
        tap.eq(len(body), MAX_FRAME, "(the boundary frame is max_frame bytes)")
        c.send_raw(struct.pack(">HI", h.MSG_TEST, len(body)) + body)
        try:
            r = c.recv_json(h.MSG_TEST + 1, 10)
            tap.ok(r.get("error") == 0 and r.get("data") == filler, "a frame of exactly max_frame bytes is served")
        except Exception as e:
            tap.ok(False, "a frame of exactly max_frame bytes is served", repr(e))


# ---------------------------------------------------------------- unknown ids and bad bodies
with tap.section("unknown message id"):
    with h.Client(d.port) as c:
        c.send(4242, {"data": "?"})
        mid, body = c.recv_frame(10)
        tap.eq(mid, 4243, "unknown id 4242 is answered with id 4243")
        try:
            r = h.json.loads(body)
        except ValueError:
            r = {}
        tap.eq(r.get("error"), 1022, "... with error 1022", body)
        r = c.request(h.MSG_TEST, {"data": "still here"})
        tap.eq(r.get("data"), "still here", "the connection stays open after 1022")
        c.send(0xFFFF, b"not even json")
        mid, body = c.recv_frame(10)
        tap.ok(mid == 0 and b"1022" in body, "unknown id 65535 is answered with id 0 (wraps) and 1022",
               "id %d body %r" % (mid, body))
        c.send(h.MSG_TEST, b"{not json")
        r = c.recv_json(h.MSG_TEST + 1, 10)
        tap.eq(r.get("error"), 1001, "1001 with a body that is not JSON gets error 1001")
        c.send(h.MSG_TEST, b"[1,2]")
        r = c.recv_json(h.MSG_TEST + 1, 10)
        tap.eq(r.get("error"), 1001, "1001 with a JSON array body gets error 1001")
        r = c.request(h.MSG_TEST, {"data": "after errors"})
        tap.eq(r.get("data"), "after errors", "the connection still serves after bad bodies")


# ---------------------------------------------------------------- worker respawn
with tap.section("worker respawn"):
    before = d.wait_workers()
    victim = next((pid for pid, t in before.items() if t == "resourced: worker 2"), None)
    tap.ok(victim is not None, "worker 2 is running before the kill", repr(before))
    os.kill(victim, signal.SIGKILL)
    tap.ok(h.wait_for(lambda: not h.pid_alive(victim), 5), "worker 2 died of SIGKILL")
    # Connections made while the slot is empty wait in its queue (the master keeps the socket).
    early = []
    for i in range(20):
        try:
            early.append(h.Client(d.port, timeout=10))
            early[-1].send(h.MSG_TEST, {"data": "early %d" % i})
        except OSError as e:
            early.append(e)
    def replaced():
        w = d.worker_pids()
        new = [pid for pid, t in w.items() if t == "resourced: worker 2"]
        return new if len(w) == WORKERS and new and new[0] != victim else None
    new = h.wait_for(replaced, 10)
    tap.ok(bool(new), "a new 'resourced: worker 2' appears with a different pid",
           "before %r, now %r" % (before, d.worker_pids()))
    if new:
        tap.eq(d.processes().get(new[0], (None, None))[1], d.master_pid, "the new worker is a child of the master")
    ok_early = 0
    for c in early:
        try:
            r = c.recv_json(h.MSG_TEST + 1, 10)
            ok_early += r.get("error") == 0
        except Exception:
            pass
        if isinstance(c, h.Client):
            c.close()
    tap.eq(ok_early, len(early), "connections opened right after the kill are all answered")
    fresh_ok = 0
    for i in range(60):
        try:
            with h.Client(d.port, timeout=5) as c:
                r = c.request(h.MSG_TEST, {"data": "fresh %d" % i}, timeout=5)
                fresh_ok += r.get("error") == 0 and r.get("data") == "fresh %d" % i
        except Exception:
            pass
    tap.eq(fresh_ok, 60, "1001 works on 60 fresh connections after the respawn")
    tap.ok(d.storage_pid() is not None and len(d.by_title("resourced: master")) == 1,
           "storage and master untouched by the worker's death")


# ---------------------------------------------------------------- max_frame
with tap.section("oversized frame header"):
    with h.Client(d.port) as keep, h.Client(d.port) as bad:
        tap.eq(keep.request(h.MSG_TEST, {"data": "before"}).get("data"), "before", "bystander connection served")
        bad.send_raw(struct.pack(">HI", h.MSG_TEST, MAX_FRAME + 1) + b'{"data":"')
        t0 = time.monotonic()
        closed = bad.wait_closed(5)
        tap.ok(closed, "a header announcing max_frame + 1 bytes gets the connection closed (in %.2f s)"
               % (time.monotonic() - t0))
        tap.ok(not bad.buf, "nothing was answered on it", repr(bad.buf[:200]))
        tap.eq(keep.request(h.MSG_TEST, {"data": "after"}).get("data"), "after",
               "another open connection still gets 1001 answers")
    with h.Client(d.port) as huge:
        huge.send_raw(struct.pack(">HI", 4444, 0xFFFFFFFF))
        tap.ok(huge.wait_closed(5), "a header announcing 4 GiB (unknown id) is closed too")


# ---------------------------------------------------------------- idle and frame timeouts
with tap.section("idle_timeout"):
    with h.Client(d.port) as idle:
        t0 = time.monotonic()
        closed = idle.wait_closed(8)
        took = time.monotonic() - t0
        tap.ok(closed and 1.5 <= took <= 4.5, "an idle connection is closed after idle_timeout = 2 s (took %.2f s)" % took)
    with h.Client(d.port) as busy:
        # Complete frames keep it alive past the timeout.
        t0 = time.monotonic()
        alive = True
        while time.monotonic() - t0 < 3.6 and alive:
            time.sleep(0.9)
            try:
                alive = busy.request(h.MSG_TEST, {"data": "tick"}, timeout=3).get("data") == "tick"
            except Exception:
                alive = False
        tap.ok(alive, "a connection sending a frame every 0.9 s outlives idle_timeout (3.6 s)")

with tap.section("frame_timeout"):
    with h.Client(d.port) as half:
        raw = h.frame(h.MSG_TEST, {"data": "never finished"})
        half.send_raw(raw[:len(raw) // 2])
        t0 = time.monotonic()
        closed = half.wait_closed(8)
        took = time.monotonic() - t0
        tap.ok(closed and took <= 4.5, "a connection that sent half a frame is closed (took %.2f s)" % took)
        tap.ok(not half.buf, "nothing was answered to the half frame", repr(half.buf[:100]))

# frame_timeout on its own: a daemon whose idle_timeout is long.
with tap.section("frame_timeout alone"):
    d2 = h.Daemon(workers=1, settings={"server": {"idle_timeout": 60, "frame_timeout": 2}})
    d2.start()
    with (tap.diagnostics(lambda: d2.log_tail(8)), h.Client(d2.port) as idle,
          h.Client(d2.port) as half, h.Client(d2.port) as drip):
        raw = h.frame(h.MSG_TEST, {"data": "x" * 100})
        half.send_raw(raw[:3])   # not even a whole header
        drip.send_raw(raw[:10])
        t0 = time.monotonic()
        # A slow drip does not reset the frame clock.
        closed_drip = False
        for i in range(10, 40):
            if not drip.is_open(0.3):
                closed_drip = True
                break
            try:
                drip.send_raw(raw[i:i + 1])
            except OSError:
                closed_drip = True
                break
        took_drip = time.monotonic() - t0
        closed = half.wait_closed(6)
        took = time.monotonic() - t0
        tap.ok(closed and 1.5 <= took <= 4.5,
               "with idle_timeout 60, half a header is closed after frame_timeout = 2 s (took %.2f s)" % took)
        tap.ok(closed_drip and took_drip <= 4.5,
               "a frame dripped one byte every 0.3 s is closed by frame_timeout (took %.2f s)" % took_drip)
        tap.ok(idle.is_open(0.1), "an idle connection (no bytes) is still open then")
        tap.eq(idle.request(h.MSG_TEST, {"data": "idle ok"}).get("data"), "idle ok", "... and served")
    # The master dies hard: its children must not outlive it.
    children = [pid for pid in d2.processes() if pid != d2.master_pid]
    os.kill(d2.master_pid, signal.SIGKILL)
    gone = h.wait_for(lambda: not [p for p in children if h.pid_alive(p)], 5)
    tap.ok(gone, "after SIGKILL of the master its workers and storage exit by themselves",
           repr({p: h.proc_title(p) for p in children if h.pid_alive(p)}))
    d2.kill()


# ---------------------------------------------------------------- -t
with tap.section("resourced -t"):
    rc, out = d.check_config(d.conf_path)
    tap.eq(rc, 0, "-t on the running configuration exits 0", out)
    cases = [
        ("server", "no_such_key", "1", "no_such_key"),
        ("server", "workers", "lots", "workers"),
        ("server", "idle_timeout", "0", "idle_timeout"),
        ("server", "max_frame", "12k", "max_frame"),
        ("server", "listen", "127.0.0.1:99999", "listen"),
        ("storage", "fsync", "sometimes", "fsync"),
        ("storage", "backend", "cephfs", "'cephfs' is not a storage backend (known: fs"),
        ("redis", "port", "-1", "port"),
        ("log", "level", "loud", "level"),
        ("bogus_section", "key", "1", "key"),
    ]
    for section, key, value, named in cases:
        settings = {s: dict(kv) for s, kv in d.settings.items()}
        settings.setdefault(section, {})[key] = value
        path = os.path.join(d.dir, "bad-%s-%s.conf" % (section, key))
        h.Daemon.write_config(path, settings)
        rc, out = d.check_config(path)
        tap.ok(rc == 1 and named in out,
               "-t with [%s] %s = %s exits 1 and names %s" % (section, key, value, named),
               "exit %r, output %r" % (rc, out))
    rc, out = d.check_config(os.path.join(d.dir, "missing.conf"))
    tap.eq(rc, 1, "-t on a missing file exits 1", out)
    tap.ok(h.pid_alive(d.master_pid) and d.ping(), "the running daemon is not disturbed by -t runs")


# ---------------------------------------------------------------- stop
with tap.section("TERM"):
    held = [h.Client(d.port) for _ in range(3)]
    pids = set(d.processes())
    tap.eq(len(pids), WORKERS + 2, "(%d processes before the stop)" % (WORKERS + 2))
    t0 = time.monotonic()
    rc, left = d.stop(timeout=15)
    took = time.monotonic() - t0
    tap.eq(rc, 0, "TERM: the master exits with status 0 (in %.2f s)" % took)
    tap.ok(took < 10, "TERM: the stop takes less than 10 s")
    tap.eq(left, [], "TERM: no resourced process is left")
    tap.ok(not [p for p in pids if h.pid_alive(p)], "TERM: none of the pids seen before is alive")
    tap.ok(not os.path.exists(d.pid_file), "TERM: the pid file is removed")
    tap.ok(all(c.wait_closed(5) for c in held), "TERM: open client connections are closed")
    for c in held:
        c.close()
    try:
        socket.create_connection(("127.0.0.1", d.port), timeout=2).close()
        refused = False
    except OSError:
        refused = True
    tap.ok(refused, "TERM: the port no longer accepts connections")

tap.finish()

#!/usr/bin/env python3
# test_storage_down.py: the agent-check answers down while the storage process or its backend cannot answer, and up again after.
import os
import re
import signal
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=240)
U, TOKEN = 4101, "tok-4101-down"
STORAGE_TIMEOUT = 6   # RADOS: op_timeout 2 s; a stopped storage loop is down after at most 5 s

redis = h.RedisServer().start()
redis.set_token(U, TOKEN)
AGENT_PORT = h.free_port()
d = h.Daemon(workers=2, redis=redis, settings={
    "server": {"storage_timeout": STORAGE_TIMEOUT, "agent_listen": "127.0.0.1:%d" % AGENT_PORT},
})
RADOS = h.uses_rados(d)
d.start()
tap.diag("backend: %s" % ("rados" if RADOS else "fs"))


def agent():
    try:
        return h.agent_answer(AGENT_PORT, timeout=3)
    except OSError as e:
        return "error %s" % e


def wait_agent(prefix, timeout):
    return h.wait_for(lambda: (lambda a: a if a.startswith(prefix) else None)(agent()), timeout, 0.2)


def upload_ok(name):
    up = h.Upload(os.urandom(70000), name, U, TOKEN, chunk_size=32768)
    with h.Client(d.port) as c:
        r, _, _ = up.run(c, timeout=60)
    return r.get("error") == 0, r


tap.ok(wait_agent("up ", 15), "agent answers up once the daemon runs", repr(agent()))

# ---------------------------------------------------------------- the storage process stopped (SIGSTOP)
with tap.section("storage process stopped"):
    pid = d.storage_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        a = wait_agent("down", 20)
        tap.ok(a, "agent answers down while the storage process is stopped (SIGSTOP): it answers no worker",
               repr(agent()))
        tap.ok(d.storage_pid() == pid, "the master did not replace it (it is alive, only stopped)")
    finally:
        os.kill(pid, signal.SIGCONT)
    tap.ok(wait_agent("up ", 20), "agent answers up again once it runs (SIGCONT)", repr(agent()))
    ok, r = upload_ok("after-stop.bin")
    tap.ok(ok, "uploads work afterwards", repr(r))

# ---------------------------------------------------------------- the backend unreachable
with tap.section("backend unreachable"):
    if RADOS:
        what = "the OSD is stopped (SIGSTOP): every operation times out"
        d.ceph.signal("osd.0", signal.SIGSTOP)
        restore = lambda: d.ceph.signal("osd.0", signal.SIGCONT)  # noqa: E731
    else:
        # The fs backend's ping is a stat of <root>/.staging: gone, the backend does not answer.
        what = "<root>/.staging is gone"
        staging = os.path.join(d.root, ".staging")
        os.rename(staging, staging + ".away")
        restore = lambda: os.rename(staging + ".away", staging)  # noqa: E731
    try:
        a = wait_agent("down", STORAGE_TIMEOUT * 3 + 10)
        tap.ok(a, "agent answers down while %s" % what, repr(agent()))
        # The workers ping their own clients too, and one of them may say down first.
        tap.ok(h.wait_for(lambda: d.log_count("storage warn: storage backend") > 0, STORAGE_TIMEOUT * 3 + 10),
               "the storage process logs that its backend is unreachable")
        tap.ok(d.storage_pid() is not None and d.ping(), "the daemon itself still answers 1001")
    finally:
        restore()
    if RADOS:
        h.wait_for(d.ceph.osd_up, 60, 0.2)
    a = wait_agent("up ", STORAGE_TIMEOUT * 6 + 30)
    tap.ok(a, "agent answers up again once the backend answers", repr(agent()))
    tap.ok(h.wait_for(lambda: d.log_count("storage info: storage backend") > 0, 10),
           "the storage process logs that its backend answers again")
    ok, r = upload_ok("after-backend.bin")
    tap.ok(ok, "uploads work afterwards", repr(r))

# ---------------------------------------------------------------- one worker's own client cut off
# Downloads read through each worker's own librados client, which the storage process's ping does
# not cover: the cluster blocklists one worker's client (as it does a client it fences out).
if RADOS:
    with tap.section("one worker cut off from the cluster"):
        wpid = sorted(d.worker_pids())[0]
        m = re.search(r"\[%d\] worker \d+ info: rados: connected as client\.\d+ at \S*?(\d+\.\d+\.\d+\.\d+:\d+/\d+)"
                      % wpid, d.log_text(since_start=False))
        tap.ok(m, "the worker logs its client's address", d.log_tail())
        addr = m.group(1) if m else "none"
        rc, out = d.ceph.ceph("osd", "blocklist", "add", addr)
        tap.ok(rc == 0, "the cluster blocklists the worker's client %s" % addr, out)
        try:
            a = wait_agent("down", STORAGE_TIMEOUT * 3 + 10)
            tap.ok(a, "agent answers down while a worker cannot reach the cluster", repr(agent()))
            tap.ok(h.wait_for(lambda: d.log_count("unreachable from this worker") > 0, 5),
                   "the worker logs that the backend is unreachable from it")
        finally:
            d.ceph.ceph("osd", "blocklist", "rm", addr)
        a = wait_agent("up ", STORAGE_TIMEOUT * 6 + 30)
        tap.ok(a, "agent answers up again once the worker's client is let in", repr(agent()))
        ok, r = upload_ok("after-blocklist.bin")
        tap.ok(ok, "uploads work afterwards", repr(r))
        with d.connect() as c:
            try:
                got, _ = h.download(c, "after-blocklist.bin", U, TOKEN)
            except h.ProtocolError as e:
                got = repr(e)
        tap.ok(isinstance(got, bytes) and len(got) == 70000, "downloads work afterwards", repr(got)[:200])

tap.ok(d.log_count("AddressSanitizer") == 0 and d.log_count("runtime error") == 0, "no sanitizer report in the log")
d.stop()
redis.stop()
tap.finish()

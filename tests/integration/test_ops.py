# test_ops.py: operations: the stats socket, agent-check, signals (QUIT, HUP, USR1), access log, PROXY protocol, init script.
import json
import os
import random
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=240)

USERS = {3001: "tok-3001-ops", 3002: "tok-3002-ops", 3003: "tok-3003-bench"}
NO_TOKEN_UID = 3999             # a uid with no utoken_ key in Redis
LONG_SHUTDOWN = 30              # shutdown_timeout until the QUIT test: old workers may hold connections that long
SHUTDOWN_TIMEOUT = 4            # shutdown_timeout of the QUIT test
rand = random.Random(20261123)


def rbytes(n):
    return rand.randbytes(n)


# ---------------------------------------------------------------- servers
redis = h.RedisServer().start()


def set_tokens():
    for uid, tok in USERS.items():
        redis.set_token(uid, tok)


set_tokens()

d = h.Daemon(workers=2, redis=redis, settings={
    "server": {"shutdown_timeout": LONG_SHUTDOWN, "storage_timeout": 10},
})
STATS = os.path.join(d.run_dir, "stats.sock")
AGENT_PORT = h.free_port()
LOG = os.path.join(d.dir, "resourced.log")
ACCESS = os.path.join(d.dir, "access.log")
d.settings["server"].update({"stats_socket": STATS, "agent_listen": "127.0.0.1:%d" % AGENT_PORT})
d.settings["log"].update({"file": LOG, "access_log": ACCESS})
h.Daemon.write_config(d.conf_path, d.settings)


def size_of(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def log_tail(n=15, path=LOG):
    return "%s (last %d lines):\n%s" % (path, n, "\n".join(h.read_text(path).splitlines()[-n:]))


tap.context.append(lambda: log_tail(12))
tap.context.append(lambda: d.log_tail(5))   # stderr: what came before the log file was open


# ---------------------------------------------------------------- helpers

def stats_raw(text, path=None, answers=1, timeout=5.0):
    """Sends text (one or more command lines) to the stats socket; returns the answers (each without its empty line)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path or STATS)
        s.sendall(text.encode())
        buf = b""
        while buf.count(b"\n\n") < answers:
            data = s.recv(65536)
            if not data:
                break
            buf += data
    finally:
        s.close()
    parts = buf.decode(errors="replace").split("\n\n")
    return [p + "\n" if p else p for p in parts[:answers]]


def stats(cmd, path=None):
    return stats_raw(cmd + "\n", path)[0]


def stats_json(cmd, path=None):
    return json.loads(stats(cmd + " json", path))


def info(path=None):
    return stats_json("show info", path)


def resctl(*args, timeout=30):
    r = subprocess.run([h.RESCTL_BIN] + list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=timeout, text=True)
    return r.returncode, r.stdout, r.stderr


def agent(port=None, timeout=3.0):
    return h.agent_answer(port or AGENT_PORT, timeout=timeout)


def upload(data, name, uid=3001, chunk=65536, port=None):
    up = h.Upload(data, name, uid, USERS.get(uid, "nobody"), chunk_size=chunk)
    with h.Client(port or d.port) as c:
        r, _, _ = up.run(c)
    return r


def download(name, uid=3001, port=None):
    with h.Client(port or d.port) as c:
        return h.download(c, name, uid, USERS[uid])


def published(uid, name, daemon=None):
    return os.path.join((daemon or d).root, str(uid), name)


def daemon_pids(daemon):
    return set(daemon.processes())


def fds_pointing_to(pids, paths):
    """(pid, fd target) for every fd of pids whose target is one of paths."""
    out = []
    for pid in pids:
        try:
            fds = os.listdir("/proc/%d/fd" % pid)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            except OSError:
                continue
            if target in paths:
                out.append((pid, target))
    return out


def worker_set(daemon=None):
    return set((daemon or d).worker_pids())


def parse_kv(text):
    out = {}
    for line in text.splitlines():
        if ": " in line:
            k, v = line.split(": ", 1)
            out[k] = v
    return out


def wait_state_up(timeout=15):
    """Every process of the daemon is connected to Redis and the storage link is up."""
    def ready():
        rows = stats_json("show stat")
        return rows and all(r["redis_up"] == 1 for r in rows) and \
            all(r["storage_up"] == 1 for r in rows if r["role"] == "worker") and info()["state"] == "up"
    return h.wait_for(ready, timeout, 0.05)


ACCESS_RE = re.compile(r'^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) (\S+) uid=(\d+) (upload|download|avatar) '
                       r'name="([^"]*)" bytes=(\d+) duration=(\d+\.\d{3}) result=(\d+)$')


def access_lines(path=ACCESS, offset=0):
    out = []
    for line in h.read_text(path, offset).splitlines():
        m = ACCESS_RE.match(line)
        out.append(m.groups() if m else ("BAD", line, "", "", "", "", "", ""))
    return out


# ---------------------------------------------------------------- start
try:
    d.start()
except Exception as e:
    tap.ok(False, "daemon starts with stats_socket, agent_listen, log file and access_log", str(e))
    tap.finish()
tap.ok(True, "daemon starts with stats_socket, agent_listen, log file and access_log")
tap.ok(bool(h.wait_for(lambda: os.path.exists(STATS), 5)), "the stats socket exists")
tap.ok(bool(wait_state_up()), "every process is connected to Redis and the state is up",
       repr(h.wait_for(lambda: stats("show stat"), 1)))
d.wait_workers()


# ---------------------------------------------------------------- stats socket basics
with tap.section("stats socket basics"):
    st = os.stat(STATS)
    tap.ok(stat.S_ISSOCK(st.st_mode), "stats_socket is a Unix socket")
    tap.eq(oct(st.st_mode & 0o777), oct(0o660), "stats socket mode is 0660")
    text = stats("help")
    for cmd in ("show info", "show stat", "show workers", "show transfers", "show metrics",
                "disable", "enable", "reload"):
        tap.ok(cmd in text, "help lists '%s'" % cmd, text)
    rc, out, err = resctl("stats", "--socket", STATS, "help")
    tap.ok(rc == 0 and out.rstrip("\n") == text.rstrip("\n"), "resctl stats help exits 0 and prints the same text",
           "rc %r out %r err %r" % (rc, out, err))

    text = stats("frobnicate")
    tap.ok(text.startswith("Unknown command"), "an unknown command answers 'Unknown command'", repr(text))
    rc, out, err = resctl("stats", "--socket", STATS, "frobnicate")
    tap.eq(rc, 1, "resctl stats with an unknown command exits 1", out + err)
    text = stats("show bogus")
    tap.ok(text.startswith("Unknown command"), "'show bogus' answers 'Unknown command'", repr(text))
    rc, out, err = resctl("stats", "--socket", STATS, "show", "bogus")
    tap.eq(rc, 1, "resctl stats show bogus exits 1", out + err)
    rc, out, err = resctl("stats", "--socket", STATS)
    tap.ok(rc == 0 and "Name: resourced" in out and "State: up" in out,
           "resctl stats without a command prints show info", "rc %r out %r err %r" % (rc, out, err))
    rc, out, err = resctl("stats", "--socket", os.path.join(d.dir, "nope.sock"), "help")
    tap.ok(rc != 0 and "nope.sock" in err, "resctl stats on a missing socket fails and names it", "rc %r err %r" % (rc, err))

    # Several commands on one connection: one answer each, each ended by an empty line.
    answers = stats_raw("show info json\nhelp\nshow workers json\n", answers=3)
    try:
        a1, a3 = json.loads(answers[0]), json.loads(answers[2])
        ok3 = a1.get("name") == "resourced" and "show info" in answers[1] and isinstance(a3, list)
    except (ValueError, IndexError) as e:
        ok3 = False
    tap.ok(ok3, "three commands on one connection get three answers in order", repr(answers)[:600])


# ---------------------------------------------------------------- show info
with tap.section("show info"):
    master = d.master_pid
    text = stats("show info")
    kv = parse_kv(text)
    for key in ("Name", "Version", "Pid", "Uptime_sec", "Workers", "State", "Weight", "Draining",
                "conn_total", "conn_current", "uploads_completed", "downloads_completed", "bytes_in",
                "frames_in", "auth_failures"):
        tap.ok(key in kv, "show info has %s" % key, text)
    tap.eq(kv.get("Pid"), str(master), "show info Pid is the master's pid")
    tap.eq(kv.get("Workers"), "2", "show info Workers: 2")
    tap.eq(kv.get("State"), "up", "show info State: up")
    tap.eq(kv.get("Draining"), "0", "show info Draining: 0")
    raw = stats("show info json")
    try:
        j = json.loads(raw)
    except ValueError as e:
        j = {}
        tap.ok(False, "show info json parses", "%s: %r" % (e, raw))
    else:
        tap.ok(isinstance(j, dict), "show info json parses as one object")
    for key in ("name", "version", "pid", "uptime_sec", "workers", "state", "weight", "draining", "conn_total",
                "conn_current", "frames_in", "frames_out", "bytes_in", "bytes_out", "uploads_started",
                "uploads_completed", "uploads_failed", "upload_bytes", "downloads_started", "downloads_completed",
                "download_bytes", "auth_failures", "redis_errors", "errors"):
        tap.ok(key in j, "show info json has %s" % key, raw)
    tap.ok(j.get("pid") == master and j.get("state") == "up" and j.get("workers") == 2 and
           isinstance(j.get("errors"), dict) and isinstance(j.get("conn_total"), int),
           "show info json: pid, state up, workers 2, errors an object, numbers are numbers", raw)
    tap.eq(str(j.get("version")), kv.get("Version"), "text and json agree on the version")
    tap.eq(str(j.get("uploads_completed")), kv.get("uploads_completed"), "text and json agree on uploads_completed")
    tap.ok(isinstance(j.get("weight"), int) and 1 <= j["weight"] <= 100, "show info json weight is 1..100", raw)


# ---------------------------------------------------------------- show workers / show stat
with tap.section("show workers and show stat"):
    procs = d.processes()
    expected = {pid: t for pid, (t, _) in procs.items() if pid != d.master_pid}
    raw = stats("show workers json")
    try:
        rows = json.loads(raw)
    except ValueError:
        rows = []
        tap.ok(False, "show workers json parses", raw)
    tap.ok(isinstance(rows, list) and len(rows) == 3, "show workers json lists 3 processes", raw)
    roles = sorted((r.get("role"), r.get("number")) for r in rows)
    tap.eq(roles, [("storage", 0), ("worker", 1), ("worker", 2)], "1 storage (number 0) and workers 1 and 2")
    for r in rows:
        for key in ("role", "number", "slot", "pid", "state", "uptime_sec", "restarts", "connections"):
            if key not in r:
                tap.ok(False, "show workers json entry has %s" % key, repr(r))
    want_titles = {r.get("pid"): ("resourced: storage" if r.get("role") == "storage" else
                                  "resourced: worker %d" % r.get("number")) for r in rows}
    got_titles = {pid: h.proc_title(pid) for pid in want_titles}
    tap.eq(got_titles, want_titles, "every pid in show workers json has the matching /proc title")
    tap.eq(sorted(want_titles), sorted(expected), "show workers json pids are exactly the daemon's children")
    tap.ok(all(r.get("state") == "running" and r.get("restarts") == 0 for r in rows),
           "all are running with 0 restarts", raw)

    text = stats("show workers")
    lines = [l for l in text.splitlines() if l]
    tap.ok(lines and lines[0].startswith("#"), "show workers text starts with a # header", text)
    trows = [l.split() for l in lines[1:]]
    tap.ok(len(trows) == 3 and all(len(r) == 10 for r in trows), "show workers text: 3 rows of 10 fields", text)
    tap.eq(sorted(int(r[3]) for r in trows if len(r) > 3), sorted(want_titles), "text and json list the same pids")

    raw = stats("show stat json")
    try:
        srows = json.loads(raw)
    except ValueError:
        srows = []
        tap.ok(False, "show stat json parses", raw)
    tap.ok(isinstance(srows, list) and len(srows) == 3, "show stat json lists 3 processes", raw[:300])
    tap.eq(sorted(r.get("pid") for r in srows), sorted(want_titles), "show stat json pids match show workers")
    tap.ok(all(all(k in r for k in ("role", "number", "pid", "conn_total", "frames_in", "bytes_in",
                                     "uploads_completed", "redis_up")) for r in srows),
           "every show stat json row has role, number, pid and the counters", raw[:400])
    text = stats("show stat")
    lines = [l for l in text.splitlines() if l]
    header = lines[0].lstrip("# ").split(",") if lines else []
    tap.ok(lines and lines[0].startswith("#") and header[:3] == ["role", "number", "pid"] and "frames_in" in header,
           "show stat text has a CSV header role,number,pid,...", text[:300])
    tap.ok(len(lines) == 4 and all(len(l.split(",")) == len(header) for l in lines[1:]),
           "show stat text: 3 CSV rows with as many fields as the header", text[:600])


# ---------------------------------------------------------------- counters with traffic
F1 = rbytes(300000)
with tap.section("counters move with traffic"):
    before = info()
    acc0 = size_of(ACCESS)
    r = upload(F1, "f1.bin")
    tap.eq(r.get("error"), 0, "upload of f1.bin (300000 bytes in 5 chunks) succeeds", repr(r))
    got, _ = download("f1.bin")
    tap.ok(got == F1, "download of f1.bin returns the same bytes")
    after = h.wait_for(lambda: (lambda a: a if a["downloads_completed"] > before["downloads_completed"] else None)(info()), 3) or info()

    def delta(k):
        return after.get(k, 0) - before.get(k, 0)
    tap.eq(delta("uploads_completed"), 1, "uploads_completed +1")
    tap.eq(delta("uploads_started"), 1, "uploads_started +1")
    tap.eq(delta("upload_bytes"), 300000, "upload_bytes +300000")
    tap.eq(delta("downloads_completed"), 1, "downloads_completed +1")
    tap.eq(delta("downloads_started"), 1, "downloads_started +1")
    tap.eq(delta("download_bytes"), 300000, "download_bytes +300000")
    tap.ok(delta("bytes_in") >= 400000, "bytes_in grew by at least the base64 upload (%d)" % delta("bytes_in"))
    tap.ok(delta("bytes_out") >= 400000, "bytes_out grew by at least the base64 download (%d)" % delta("bytes_out"))
    tap.eq(delta("frames_in"), 5 + 10, "frames_in +15 (5 upload chunks, 10 download chunks of 32768)")
    tap.eq(delta("frames_out"), 15, "frames_out +15")
    tap.eq(delta("conn_total"), 2, "conn_total +2")
    tap.eq(delta("auth_failures"), 0, "auth_failures unchanged")
    tap.ok(delta("publish_us") > 0 and delta("publish_wait_us") >= 0 and "publish_wait_us" in after,
           "publish_us grew with the publish (%d us), publish_wait_us is counted (+%d us)"
           % (delta("publish_us"), delta("publish_wait_us")))

    lines = h.wait_for(lambda: (lambda l: l if len(l) >= 2 else None)(access_lines(offset=acc0)), 3) or access_lines(offset=acc0)
    tap.eq(len(lines), 2, "two access log lines: the upload and the download", repr(lines))
    ups = [l for l in lines if l[3] == "upload"]
    dls = [l for l in lines if l[3] == "download"]
    tap.ok(ups and re.match(r"^127\.0\.0\.1:\d+$", ups[0][1]) and ups[0][2:6] == ("3001", "upload", "f1.bin", "300000")
           and ups[0][7] == "0", "access log: 127.0.0.1:port uid=3001 upload name=\"f1.bin\" bytes=300000 ... result=0",
           h.read_text(ACCESS, acc0))
    tap.ok(dls and dls[0][2:6] == ("3001", "download", "f1.bin", "300000") and dls[0][7] == "0",
           "access log: uid=3001 download name=\"f1.bin\" bytes=300000 ... result=0", h.read_text(ACCESS, acc0))
    if ups:
        ts = time.strftime("%Y-%m-%dT%H", time.gmtime())
        tap.ok(ups[0][0][:13] in (ts, time.strftime("%Y-%m-%dT%H", time.gmtime(time.time() - 60))),
               "access log time is UTC now", ups[0][0])

    # Credentials refused: 1010 twice (upload, download), 1011 once.
    before = info()
    with h.Client(d.port) as c:
        bad = h.Upload(b"x" * 100, "nope.bin", 3001, "wrong-token")
        r1 = bad.send_chunk(c, 0, 1)
    with h.Client(d.port) as c:
        r2 = c.request(h.MSG_DOWNLOAD, {"name": "f1.bin", "seq": 1, "uid": 3001, "token": "wrong-token",
                                         "client_path": "/x", "trans_size": "0", "total_size": "0"})
    with h.Client(d.port) as c:
        r3 = c.request(h.MSG_SYNC, {"md5": h.md5_hex(b"zz"), "uid": NO_TOKEN_UID, "token": "whatever"})
    tap.eq((r1.get("error"), r2.get("error"), r3.get("error")), (1010, 1010, 1011),
           "wrong token on 1003 and 1033: 1010; uid without token: 1011")
    after = info()
    tap.eq(after["auth_failures"] - before["auth_failures"], 3, "auth_failures +3")
    tap.eq(after["errors"].get("1010", 0) - before["errors"].get("1010", 0), 2, "show info json errors[\"1010\"] +2",
           repr(after["errors"]))
    tap.eq(after["errors"].get("1011", 0) - before["errors"].get("1011", 0), 1, "show info json errors[\"1011\"] +1")
    kv = parse_kv(stats("show info"))
    tap.eq(kv.get("errors_1010"), str(after["errors"].get("1010")), "show info text has errors_1010 with the same count")
    tap.ok(not os.path.exists(published(3001, "nope.bin")), "the refused upload stored nothing")

    rows = stats_json("show stat")
    now = info()
    for k in ("frames_in", "bytes_in", "conn_total", "uploads_completed", "auth_failures"):
        tap.eq(sum(r[k] for r in rows), now[k], "show stat per-process %s sums to show info's total" % k)


# ---------------------------------------------------------------- show transfers
with tap.section("show transfers"):
    text = stats("show transfers")
    tap.ok(text.startswith("#") and len([l for l in text.splitlines() if l]) == 1,
           "show transfers with nothing in flight: only the header", text)
    tap.eq(stats_json("show transfers"), [], "show transfers json with nothing in flight: []")

    data = rbytes(1 << 20)
    up = h.Upload(data, "xfer.bin", 3002, USERS[3002], chunk_size=65536)
    with h.Client(d.port) as c:
        r, off, seq = up.run(c, max_chunks=4)
        tap.ok(r.get("error") == 0 and off == 262144, "4 chunks of xfer.bin stored, then the client pauses")

        def entry():
            for t in stats_json("show transfers"):
                if t.get("name") == "xfer.bin":
                    return t
        t = h.wait_for(lambda: (lambda e: e if e and e.get("bytes") == 262144 else None)(entry()), 3) or entry()
        tap.ok(t is not None, "show transfers json lists the paused upload", repr(stats_json("show transfers")))
        if t:
            tap.eq((t.get("kind"), t.get("uid"), t.get("bytes"), t.get("total")), ("upload", 3002, 262144, 1 << 20),
                   "... kind upload, uid 3002, bytes 262144, total 1048576")
            tap.ok(all(k in t for k in ("rate", "age_sec")), "... with rate and age_sec", repr(t))
        text = stats("show transfers")
        tap.ok(re.search(r'^upload 3002 "xfer\.bin" 262144 1048576 \d+ \d+$', text, re.M),
               "show transfers text: 'upload 3002 \"xfer.bin\" 262144 1048576 RATE AGE'", text)
        r, off, seq = up.run(c, offset=off, seq=seq)
        tap.eq((r.get("error"), off), (0, None), "the upload is finished after the look")
    tap.ok(h.wait_for(lambda: entry() is None, 3), "the finished upload leaves show transfers",
           repr(stats_json("show transfers")))
    tap.ok(h.read_file(published(3002, "xfer.bin")) == data, "xfer.bin published intact")

    with h.Client(d.port) as c:
        for seq in (1, 2):
            r = c.request(h.MSG_DOWNLOAD, {"name": "xfer.bin", "seq": seq, "uid": 3002, "token": USERS[3002],
                                            "client_path": "/c", "trans_size": "0", "total_size": "0"})
        t = h.wait_for(lambda: (lambda e: e if e and e.get("kind") == "download" else None)(entry()), 3)
        tap.ok(t and t.get("uid") == 3002 and t.get("bytes") == 65536 and t.get("total") == 1 << 20,
               "a paused download shows as download 3002 xfer.bin 65536 of 1048576", repr(stats_json("show transfers")))
    tap.ok(h.wait_for(lambda: entry() is None, 3), "the download leaves show transfers when its connection closes",
           repr(stats_json("show transfers")))


# ---------------------------------------------------------------- show metrics
with tap.section("show metrics"):
    text = stats("show metrics")
    j = info()
    lines = [l for l in text.splitlines() if l]
    types = {}
    dup_types = []
    undeclared = []
    bad = []
    samples = {}
    for l in lines:
        if l.startswith("# TYPE "):
            parts = l.split()
            if parts[2] in types:
                dup_types.append(parts[2])
            types[parts[2]] = parts[3] if len(parts) > 3 else None
        elif l.startswith("# HELP "):
            continue
        elif l.startswith("#"):
            bad.append(l)
        else:
            m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (-?[0-9.eE+]+|NaN|[+-]Inf)$', l)
            if not m:
                bad.append(l)
                continue
            if m.group(1) not in types:
                undeclared.append(m.group(1))
            samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    tap.ok(len(types) >= 10, "show metrics has # TYPE lines (%d)" % len(types), text[:500])
    tap.eq(types.get("resourced_uploads_completed_total"), "counter", "# TYPE resourced_uploads_completed_total counter")
    tap.eq(samples.get("resourced_uploads_completed_total"), float(j["uploads_completed"]),
           "resourced_uploads_completed_total equals show info uploads_completed")
    tap.eq(bad, [], "every metrics line is a comment or 'name{labels} value'")
    tap.eq(undeclared, [], "every sample's family has a # TYPE line before it")
    tap.eq(dup_types, [], "no family is declared twice")
    tap.ok(all(v in ("counter", "gauge") for v in types.values()), "types are counter or gauge", repr(types))
    tap.eq(samples.get('resourced_responses_error_total{code="1010"}'), float(j["errors"].get("1010", -1)),
           "resourced_responses_error_total{code=\"1010\"} matches show info errors")
    tap.eq(samples.get('resourced_process_up{role="worker",number="1"}'), 1.0, "resourced_process_up for worker 1 is 1")
    tap.eq(samples.get('resourced_process_up{role="storage",number="0"}'), 1.0, "resourced_process_up for storage is 1")
    tap.eq((samples.get("resourced_up"), samples.get("resourced_draining")), (1.0, 0.0), "resourced_up 1, resourced_draining 0")
    try:
        mj = json.loads(stats("show metrics json"))
        tap.ok(isinstance(mj, dict) and "uploads_completed" in mj, "show metrics json parses and has uploads_completed")
    except ValueError as e:
        tap.ok(False, "show metrics json parses", repr(e))
    rc, out, err = resctl("stats", "--socket", STATS, "show", "metrics")
    tap.ok(rc == 0 and "# TYPE resourced_uploads_completed_total counter" in out, "resctl stats show metrics exits 0",
           "rc %r err %r" % (rc, err))
    for what in ("info", "stat", "workers", "transfers", "metrics"):
        rc, out, err = resctl("stats", "--socket", STATS, "show", what, "json")
        try:
            json.loads(out)
            parsed = True
        except ValueError:
            parsed = False
        tap.ok(rc == 0 and parsed, "resctl stats show %s json exits 0 and prints one JSON document" % what,
               "rc %r out %r err %r" % (rc, out[:200], err))


# ---------------------------------------------------------------- agent-check
with tap.section("agent-check"):
    a = agent()
    m = re.match(r"^up ready (\d+)%\n$", a)
    tap.ok(m and 1 <= int(m.group(1)) <= 100, "agent answers 'up ready N%' with N in 1..100", repr(a))
    with h.Client(d.port), h.Client(d.port):
        a2 = agent()
    tap.ok(re.match(r"^up ready (\d+)%\n$", a2), "agent still 'up ready N%%' with connections open (%r)" % a2)
    tap.eq(stats("disable"), "OK draining\n", "'disable' answers OK draining")
    tap.eq(agent(), "drain\n", "agent answers 'drain' after disable")
    j = info()
    tap.eq((j["state"], j["draining"]), ("drain", 1), "show info: state drain, draining 1")
    tap.ok(d.ping(), "the daemon still serves 1001 while draining")
    rc, out, err = resctl("stats", "--socket", STATS, "enable")
    tap.ok(rc == 0 and out.startswith("OK"), "resctl stats enable exits 0 and answers OK", out + err)
    a = agent()
    tap.ok(re.match(r"^up ready \d+%\n$", a), "agent answers 'up ready N%' again after enable", repr(a))
    tap.eq(info()["state"], "up", "show info state up after enable")

    redis.stop()
    a = h.wait_for(lambda: (lambda x: x if x == "down\n" else None)(agent()), 10)
    tap.eq(a, "down\n", "agent answers 'down' after Redis stops", repr(agent()))
    tap.eq(info()["state"], "down", "show info state down without Redis")
    tap.ok(re.search(r"^resourced_up 0$", stats("show metrics"), re.M), "metrics: resourced_up 0 without Redis")
    stats("disable")
    tap.eq(agent(), "down\n", "down wins over drain (disabled while Redis is down)")
    stats("enable")
    redis.start()
    set_tokens()
    a = h.wait_for(lambda: (lambda x: x if x.startswith("up ") else None)(agent()), 15)
    tap.ok(a and re.match(r"^up ready \d+%\n$", a), "agent answers 'up ready N%' again once Redis is back", repr(agent()))
    tap.ok(bool(wait_state_up(15)), "every process reconnected to Redis")
    r = upload(rbytes(5000), "after-redis.bin")
    tap.eq(r.get("error"), 0, "uploads work again after the Redis restart", repr(r))


# ---------------------------------------------------------------- USR1
with tap.section("USR1 reopens the logs"):
    os.rename(LOG, LOG + ".1")
    os.rename(ACCESS, ACCESS + ".1")
    old_paths = {LOG + ".1", ACCESS + ".1"}
    pids = daemon_pids(d)
    tap.ok(fds_pointing_to(pids, old_paths), "(before USR1 the daemon writes to the moved files)")
    d.send_signal(signal.SIGUSR1)
    reopened = h.wait_for(lambda: not fds_pointing_to(pids, old_paths) and os.path.exists(LOG), 5)
    tap.ok(reopened, "after USR1 no process holds the moved log or access log open",
           repr(fds_pointing_to(pids, old_paths)))
    tap.ok(os.path.exists(LOG), "a new log file is created")
    tap.ok(h.wait_for(lambda: "SIGUSR1: log files reopened" in h.read_text(LOG), 5),
           "the new log file says the logs were reopened (what logrotate's operator looks for)", h.read_text(LOG))
    workers_now = worker_set()
    tap.ok(h.wait_for(lambda: len(fds_pointing_to(workers_now, {ACCESS})) == len(workers_now), 3),
           "every worker has the new access log open", repr(fds_pointing_to(workers_now, {ACCESS})))
    old_sizes = (size_of(LOG + ".1"), size_of(ACCESS + ".1"))

    stats("disable")
    stats("enable")
    names = ["rot-%d.bin" % i for i in range(10)]
    for n in names:
        upload(rbytes(1000), n)
    seen_pids = set()
    for i in range(40):
        with h.Client(d.port) as c:
            h.Upload(b"y", "badtok.bin", 3001, "bad-%d" % i).send_chunk(c, 0, 1)
        seen_pids = set(int(p) for p in re.findall(r"\[(\d+)\] worker \d+ info: \S+ bad token", h.read_text(LOG)))
        if workers_now <= seen_pids:
            break
    lines = access_lines(ACCESS)
    tap.eq(sorted(l[4] for l in lines if l[4].startswith("rot-")), sorted(names),
           "the new access log gets the 10 uploads made after USR1", h.read_text(ACCESS))
    tap.ok(all(l[0] != "BAD" for l in lines), "every new access log line has the documented format", h.read_text(ACCESS))
    new_log = h.read_text(LOG)
    tap.ok("stats socket: disabled" in new_log, "the master writes to the new log file")
    tap.ok(re.search(r"storage info: upload 3001/\S+ complete: \"rot-0\.bin\"", new_log),
           "the storage process writes to the new log file")
    tap.ok(workers_now <= seen_pids, "both workers write to the new log file",
           "workers %r, seen %r" % (workers_now, seen_pids))
    tap.eq((size_of(LOG + ".1"), size_of(ACCESS + ".1")), old_sizes, "the moved files get no more lines")
    tap.ok("rot-0.bin" not in h.read_text(ACCESS + ".1"), "none of the new uploads went to the moved access log")


# ---------------------------------------------------------------- HUP with a broken config, reload via the socket
GOOD = {s: dict(kv) for s, kv in d.settings.items()}
with tap.section("HUP with a broken config"):
    before = d.wait_workers()
    storage_before = d.storage_pid()
    bad = {s: dict(kv) for s, kv in GOOD.items()}
    bad["server"]["no_such_key"] = "1"
    h.Daemon.write_config(d.conf_path, bad)
    mark = size_of(LOG)
    d.send_signal(signal.SIGHUP)
    logged = h.wait_for(lambda: re.search(r"reload refused.*no_such_key", h.read_text(LOG, mark)), 5)
    tap.ok(logged, "HUP with an unknown key: the log says the reload is refused and names no_such_key",
           h.read_text(LOG, mark))
    # The master logs the refusal on the path that returns before it forks anything, and it
    # answers the stats socket from the same loop: an answer means the HUP is behind it.
    stats("show info")
    tap.eq(worker_set(), set(before), "old workers keep their pids")
    tap.eq(d.storage_pid(), storage_before, "storage keeps its pid")
    tap.ok(all(r["state"] == "running" for r in stats_json("show workers")) and len(stats_json("show workers")) == 3,
           "show workers: still 3 running processes")
    tap.ok(d.ping(), "1001 still answered")
    got, _ = download("f1.bin")
    tap.ok(got == F1, "downloads still served by the old workers")

    rc, out, err = resctl("stats", "--socket", STATS, "reload")
    tap.ok(rc == 1 and out.startswith("ERROR") and "no_such_key" in out,
           "stats 'reload' with the broken config answers ERROR naming the key, resctl exits 1",
           "rc %r out %r err %r" % (rc, out, err))
    # (The ERROR answer is sent after the refused reload returned, before any fork.)
    tap.eq(worker_set(), set(before), "workers unchanged after the refused socket reload")

    # What -t checks for the storage process is checked by a reload before anything is replaced:
    # a root whose parent is missing used to stop storage for good (every upload 1027).
    bad = {s: dict(kv) for s, kv in GOOD.items()}
    bad["storage"]["root"] = os.path.join(d.dir, "no-such-parent", "root")
    h.Daemon.write_config(d.conf_path, bad)
    rc, out, err = resctl("stats", "--socket", STATS, "reload")
    # The reason as -t gives it, without -t's "resourced: " before it (here and in the log).
    tap.ok(rc == 1 and out.startswith("ERROR [storage] root ") and "no-such-parent" in out,
           "stats 'reload' with a storage root start cannot create answers ERROR naming [storage] root",
           "rc %r out %r err %r" % (rc, out, err))
    tap.eq(d.storage_pid(), storage_before, "storage keeps its pid (not stopped for a root it cannot use)")
    tap.eq(worker_set(), set(before), "workers unchanged after the refused reload")
    tap.ok(re.search(r"reload refused, still running on the old configuration: \[storage\] root \S*no-such-parent",
                     h.read_text(LOG, mark)),
           "the log says the reload is refused and names [storage] root", h.read_text(LOG, mark))
    tap.ok(not os.path.exists(os.path.join(d.dir, "no-such-parent")), "the refused reload created nothing")
    tap.ok(d.ping(), "1001 still answered")

    h.Daemon.write_config(d.conf_path, GOOD)
    c_before = info()["conn_total"]
    mark = size_of(LOG)
    ans = stats("reload")
    tap.ok(ans.startswith("OK"), "stats 'reload' with a good config answers OK", repr(ans))
    tap.ok(re.search(r"2 workers", ans), "... and says 2 workers", repr(ans))
    changed = h.wait_for(lambda: (lambda w: w if len(w) == 2 and not (w & set(before)) else None)(worker_set()), 10)
    tap.ok(changed, "two new workers replace the old ones", "before %r now %r" % (before, d.worker_pids()))
    tap.ok(h.wait_for(lambda: not [p for p in before if h.pid_alive(p)], 5),
           "the old workers (no connections open) exit")
    tap.eq(d.storage_pid(), storage_before, "storage keeps its pid (storage settings unchanged)")
    # The retired workers say goodbye on their storage links: their close is no loss to storage.
    tap.ok(not re.search(r" warn: .*link", h.read_text(LOG, mark)),
           "no warning about a storage link: the retired workers closed theirs in order", h.read_text(LOG, mark))
    tap.ok(h.wait_for(lambda: len(stats_json("show workers")) == 3, 3),
           "show workers lists storage + 2 workers again", stats("show workers"))
    tap.ok(info()["conn_total"] >= c_before, "counters do not go back after a reload")
    tap.ok(wait_state_up(10), "new workers are connected to Redis and storage")
    got, _ = download("f1.bin")
    tap.ok(got == F1, "the new workers serve downloads")


# ---------------------------------------------------------------- [log] level by reload, storage kept
with tap.section("a reload that changes only [log] level"):
    # The storage process follows the level through the shared stats page: no restart.
    storage_before = d.storage_pid()
    quiet = {s: dict(kv) for s, kv in GOOD.items()}
    quiet["log"]["level"] = "warn"
    h.Daemon.write_config(d.conf_path, quiet)
    mark = size_of(LOG)
    ans = stats("reload")
    tap.ok(ans.startswith("OK"), "reload to level warn answers OK", repr(ans))
    tap.ok(wait_state_up(10), "the new workers are up")
    tap.eq(d.storage_pid(), storage_before, "storage keeps its pid")
    WARN_ONLY = rbytes(50000)
    tap.eq(upload(WARN_ONLY, "quiet.bin").get("error"), 0, "an upload completes at level warn")
    tap.ok(not re.search(r" storage info: upload 3001/\S+ complete", h.read_text(LOG, mark)),
           "at level warn the storage process logs no info line for it", h.read_text(LOG, mark))
    h.Daemon.write_config(d.conf_path, GOOD)
    mark = size_of(LOG)
    tap.ok(stats("reload").startswith("OK") and wait_state_up(10), "reload back to level info answers OK")
    tap.eq(upload(rbytes(50000), "loud.bin").get("error"), 0, "an upload completes at level info")
    tap.ok(h.wait_for(lambda: re.search(r"\[%d\] storage info: upload 3001/\S+ complete: \"loud.bin\"" % storage_before,
                                        h.read_text(LOG, mark)), 5),
           "... and the same storage process logs it at info again", h.read_text(LOG, mark))
    tap.eq(d.storage_pid(), storage_before, "storage still keeps its pid")


# ---------------------------------------------------------------- a reload brings back a storage process that exited fatally
with tap.section("reload after a fatal storage exit"):
    # A storage process whose root vanished (an unmounted share) exits fatally and is not
    # respawned; the reload that follows the operator's fix used to answer OK and leave it down.
    share = os.path.join(d.dir, "share")
    os.makedirs(share)
    moved = {s: dict(kv) for s, kv in GOOD.items()}
    moved["storage"]["root"] = os.path.join(share, "root")
    h.Daemon.write_config(d.conf_path, moved)
    old_storage = d.storage_pid()
    mark = size_of(LOG)
    # A client connection held open keeps its (retiring) worker linked to the old storage process.
    with h.Client(d.port) as held:
        tap.eq(held.request(h.MSG_TEST, {"data": "hold"}).get("error"), 0, "a client connection is open")
        tap.ok(stats("reload").startswith("OK"), "reload onto a root inside share/ answers OK")
        tap.ok(h.wait_for(lambda: d.storage_pid() not in (None, old_storage), 10) and wait_state_up(15),
               "storage restarted on the new root and the state is up", stats("show workers"))
        # A storage process stopped for a reload says goodbye: the retiring worker logs the close at info.
        tap.ok(h.wait_for(lambda: re.search(r"worker \d+ info: storage link closed: the storage process stopped in "
                                            r"order", h.read_text(LOG, mark)), 10)
               and not re.search(r" warn: .*link", h.read_text(LOG, mark)),
               "the restart's link close is logged at info by the worker, and no warning about a link",
               h.read_text(LOG, mark))
    # Without a goodbye a close is a loss, a warning: a worker killed, as seen by storage (one of the
    # new workers, linked: the retiring one, its client gone, exits in order meanwhile).
    tap.ok(h.wait_for(lambda: len(worker_set()) == 2, 10) and wait_state_up(15),
           "the retiring worker is gone and the two new ones are linked", repr(worker_set()))
    victim = min(worker_set())
    os.kill(victim, signal.SIGKILL)
    tap.ok(h.wait_for(lambda: "storage warn: link to worker pid %d lost: closed without a goodbye" % victim
                      in h.read_text(LOG, mark), 10),
           "a killed worker's link: storage warns, naming its pid", h.read_text(LOG, mark))
    tap.ok(h.wait_for(lambda: len(worker_set()) == 2 and victim not in worker_set(), 10) and wait_state_up(15),
           "the killed worker is respawned and the state is up")
    mark = size_of(LOG)
    subprocess.run(["rm", "-rf", share], check=True)
    os.kill(d.storage_pid(), signal.SIGKILL)
    tap.ok(h.wait_for(lambda: "storage 0 failed fatally" in h.read_text(LOG, mark), 10),
           "with its root's parent gone the respawned storage exits fatally", h.read_text(LOG, mark))
    tap.ok(re.search(r"worker \d+ warn: storage link lost: storage process closed the link", h.read_text(LOG, mark)),
           "a storage process killed (no goodbye): the workers warn that the link was lost", h.read_text(LOG, mark))
    tap.ok(h.wait_for(lambda: [r for r in stats_json("show workers") if r["role"] == "storage" and r["state"] == "down"], 5),
           "show workers: storage down", stats("show workers"))
    os.makedirs(share)
    ans = stats("reload")
    tap.ok(ans.startswith("OK"), "after the fix, stats 'reload' answers OK", repr(ans))
    tap.ok(h.wait_for(lambda: [r for r in stats_json("show workers") if r["role"] == "storage" and r["state"] == "running"], 10),
           "the reload started the storage process again", stats("show workers") + h.read_text(LOG, mark))
    tap.ok(wait_state_up(15), "the state is up again")
    BACK = rbytes(100000)
    tap.eq(upload(BACK, "back.bin").get("error"), 0, "an upload completes after the reload")
    back_path = os.path.join(share, "root", "3001", "back.bin")
    tap.ok(h.wait_for(lambda: os.path.exists(back_path) and h.read_file(back_path) == BACK, 5),
           "... and is published on the restored root")
    on_share = d.storage_pid()
    h.Daemon.write_config(d.conf_path, GOOD)
    tap.ok(stats("reload").startswith("OK"), "reload back onto the original root answers OK")
    tap.ok(h.wait_for(lambda: d.storage_pid() not in (None, on_share), 10) and wait_state_up(15),
           "storage restarted on the original root and the state is up", stats("show workers"))
    got, _ = download("f1.bin")
    tap.ok(got == F1, "downloads from the original root are served")


# ---------------------------------------------------------------- HUP under load
bench = None
with tap.section("HUP during a 64-connection bench"):
    CH_DATA = rbytes(200000)
    tap.eq(upload(CH_DATA, "chunk.bin").get("error"), 0, "chunk.bin uploaded")

    def seq1():
        with h.Client(d.port) as c:
            return c.request(h.MSG_DOWNLOAD, {"name": "chunk.bin", "seq": 1, "uid": 3001, "token": USERS[3001],
                                               "client_path": "/c", "trans_size": "0", "total_size": "0"})
    r = seq1()
    tap.eq((r.get("current_size"), r.get("total_size")), ("32768", "200000"), "before: seq 1 current_size is 32768")
    big_body = ('{"data":"%s"}' % ("z" * 199990)).encode()
    with h.Client(d.port) as c:
        c.send_raw(struct.pack(">HI", h.MSG_TEST, len(big_body)) + big_body)
        r = c.recv_json(h.MSG_TEST + 1, 10)
        tap.eq(r.get("error"), 0, "before: a 200000-byte frame is served (max_frame 262144)")

    def start_bench(seconds):
        b = subprocess.Popen([h.RESCTL_BIN, "bench", "127.0.0.1:%d" % d.port, "--connections", "64",
                              "--size", "1048576", "--duration", str(seconds), "--mode", "mixed", "--json",
                              "--uid", "3003", "--token", USERS[3003]],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        h.at_cleanup(lambda: b.poll() is None and b.kill())
        return b

    def bench_result(b, timeout=40):
        try:
            out, err = b.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            b.kill()
            out, err = b.communicate()
        try:
            return json.loads(out), out, err
        except ValueError:
            return {}, out, err

    # Control: the same load without a reload.
    res, out, err = bench_result(start_bench(2))
    # Chunks, not whole files: under a sanitizer build 2 s may not finish a 1 MB file.
    tap.ok(res.get("errors_total") == 0 and res.get("chunks", 0) > 0,
           "control: a 2 s 64-connection mixed bench without a reload has zero errors (%r chunks)" % res.get("chunks"),
           "errors %r out %r err %r" % (res.get("errors"), out[:300], err[-800:]))

    new = {s: dict(kv) for s, kv in GOOD.items()}
    new["server"].update({"download_chunk": "65536", "max_frame": "131072"})
    h.Daemon.write_config(d.conf_path, new)
    before = d.wait_workers()
    storage_before = d.storage_pid()
    i0 = info()
    t0 = time.monotonic()
    bench = start_bench(8)
    flowing = h.wait_for(lambda: info()["downloads_completed"] - i0["downloads_completed"] >= 5 and
                         info()["uploads_completed"] - i0["uploads_completed"] >= 5, 8, 0.1)
    tap.ok(flowing, "bench traffic is flowing (uploads and downloads completing)")
    time.sleep(max(0.0, t0 + 3.0 - time.monotonic()))
    mark = size_of(LOG)
    d.send_signal(signal.SIGHUP)
    hup_at = time.monotonic() - t0
    changed = h.wait_for(lambda: (lambda w: w if len(w) == 2 and not (w & set(before)) else None)(worker_set()), 10)
    tap.ok(changed, "HUP at %.1f s into the bench: two new workers" % hup_at,
           "before %r now %r" % (before, d.worker_pids()))
    tap.ok(re.search(r"reloaded .*generation", h.read_text(LOG, mark)), "the log says reloaded")
    res, out, err = bench_result(bench)
    retired = h.wait_for(lambda: not [p for p in before if h.pid_alive(p)], 5)
    tap.ok(retired, "old workers are gone once the bench is over", repr([p for p in before if h.pid_alive(p)]))
    tap.ok(bool(res), "bench printed its JSON result", "out %r err %r" % (out[:500], err[-1500:]))
    tap.ok(bench.returncode == 0 and res.get("errors_total") == 0,
           "bench across the HUP: exit 0 and zero errors",
           "rc %r errors %r upload %r download %r\nstderr: %s" % (
               bench.returncode, res.get("errors"), (res.get("upload") or {}).get("errors"),
               (res.get("download") or {}).get("errors"), err[-1500:]))
    tap.ok((res.get("upload") or {}).get("files", 0) > 0 and (res.get("download") or {}).get("files", 0) > 0,
           "bench completed uploads and downloads (%r up, %r down)" % (
               (res.get("upload") or {}).get("files"), (res.get("download") or {}).get("files")))
    tap.eq(d.storage_pid(), storage_before, "storage kept its pid through the HUP")
    r = seq1()
    tap.eq((r.get("error"), r.get("current_size"), r.get("total_size")), (0, "65536", "200000"),
           "after HUP: seq 1 current_size is the new download_chunk 65536")
    with h.Client(d.port) as c:
        c.send_raw(struct.pack(">HI", h.MSG_TEST, len(big_body)) + big_body)
        tap.ok(c.wait_closed(5) and not c.buf, "after HUP: a 200000-byte frame is over the new max_frame 131072: closed")
    tap.ok(d.ping(), "the daemon serves after the reload")


# ---------------------------------------------------------------- QUIT with uploads in flight
def server_rx_queue(client):
    """Bytes the daemon has not read yet on its end of client's connection (from /proc/net/tcp)."""
    port = client.sock.getsockname()[1]
    want_local, want_remote = "0100007F:%04X" % d.port, "0100007F:%04X" % port
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == want_local and fields[2] == want_remote:
                return int(fields[4].split(":")[1], 16)
    return None


def stalled_reader():
    """A client that asks for the whole of big.bin (12 MiB) and reads nothing: its worker cannot finish."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", d.port))
    sock.sendall(b"".join(h.frame(h.MSG_DOWNLOAD, {"name": "big.bin", "seq": s, "uid": 3001, "token": USERS[3001],
                                                    "client_path": "/s", "trans_size": "0", "total_size": "0"})
                          for s in range(1, 193)))
    return sock


with tap.section("QUIT with uploads in flight"):
    quick = {s: dict(kv) for s, kv in new.items()}
    quick["server"]["shutdown_timeout"] = str(SHUTDOWN_TIMEOUT)
    h.Daemon.write_config(d.conf_path, quick)
    before = d.wait_workers()
    tap.ok(stats("reload").startswith("OK"), "reload with shutdown_timeout = %d" % SHUTDOWN_TIMEOUT)
    tap.ok(h.wait_for(lambda: (lambda w: len(w) == 2 and not (w & set(before)))(worker_set()), 10) and
           h.wait_for(lambda: not [p for p in before if h.pid_alive(p)], 5), "(workers replaced)")
    tap.ok(wait_state_up(10), "(new workers ready)")
    BIG = rbytes(12 << 20)
    with h.Client(d.port) as c:
        up = h.Upload(BIG, "big.bin", 3001, USERS[3001], chunk_size=65536)
        rs = up.run_pipelined(c, window=16)
        tap.ok(all(r.get("error") == 0 for r in rs), "big.bin (12 MiB) uploaded for a stalled reader")

    stalled = stalled_reader()
    idle = h.Client(d.port)
    idle.request(h.MSG_TEST, {"data": "idle"})

    ups = [h.Upload(rbytes(6 << 20), "quit-%d.bin" % i, 3001 + (i % 2), USERS[3001 + (i % 2)], chunk_size=65536)
           for i in range(4)]
    states = [dict(acked=0, answers=0, bad=[], closed=None, complete=False, sent=0) for _ in ups]

    def uploader(i):
        up, st = ups[i], states[i]
        pipelined = i >= 2
        chunks = []
        off, seq = 0, 1
        while True:
            chunks.append((off, seq))
            if up.next_offset(off) >= len(up.data):
                break
            off, seq = up.next_offset(off), seq + 1
        c = h.Client(d.port, timeout=30)

        def record(r, want_seq):
            st["answers"] += 1
            if r.get("error") != 0 or r.get("seq") != want_seq:
                st["bad"].append(r)
                return False
            st["acked"] = max(st["acked"], r.get("trans_size", 0))
            if r.get("trans_size") == len(up.data):
                st["complete"] = True
            return True
        try:
            if not pipelined:
                for off, seq in chunks:
                    c.send_raw(up.frame(off, seq))
                    st["sent"] += 1
                    if not record(c.recv_json(h.MSG_UPLOAD + 1, 20), seq):
                        break
                    time.sleep(0.01)
            else:
                sent = got = 0
                while got < len(chunks):
                    while sent < len(chunks) and sent - got < 4:
                        c.send_raw(up.frame(*chunks[sent]))
                        sent += 1
                        st["sent"] = sent
                        time.sleep(0.004)
                    if not record(c.recv_json(h.MSG_UPLOAD + 1, 20), chunks[got][1]):
                        break
                    got += 1
        except (OSError, h.ProtocolError) as e:
            st["closed"] = repr(e)
        finally:
            c.close()

    threads = [threading.Thread(target=uploader, args=(i,), daemon=True) for i in range(len(ups))]
    for t in threads:
        t.start()
    going = h.wait_for(lambda: all(s["acked"] >= 8 * 65536 for s in states), 15)
    tap.ok(going, "4 uploads (2 stop-and-wait, 2 pipelined) are under way", repr(states))
    # A request certainly in flight: its token check waits for Redis, which is paused for 1.5 s.
    inflight_up = h.Upload(rbytes(100000), "inflight.bin", 3002, USERS[3002], chunk_size=65536)
    inflight = h.Client(d.port, timeout=15)
    redis.cmd("CLIENT", "PAUSE", "1500")
    inflight.send_raw(inflight_up.frame(0, 1))
    # The worker has read the whole frame (and so asked Redis for the token) once nothing of it is
    # left in the receive queue of the daemon's end of the connection.
    tap.ok(h.wait_for(lambda: server_rx_queue(inflight) == 0, 10),
           "(the worker read the in-flight frame)")
    procs_before = daemon_pids(d)
    quit_workers = worker_set()
    pid_master = d.master_pid
    t_quit = time.monotonic()
    mark = size_of(LOG)
    d.send_signal(signal.SIGQUIT)
    acked_at_quit = [s["acked"] for s in states]
    # Probe the agent once the master has taken the signal, until it exits.
    h.wait_for(lambda: "SIGQUIT: graceful stop" in h.read_text(LOG, mark), 2, 0.005)
    agent_answers = []   # (seconds after QUIT, answer, a worker still alive after the answer)
    while d.proc.poll() is None and time.monotonic() - t_quit < SHUTDOWN_TIMEOUT + 12:
        try:
            a = agent(timeout=1)
            agent_answers.append(("%.2f" % (time.monotonic() - t_quit), a,
                                  any(h.pid_alive(q) for q in quit_workers)))
        except OSError:
            pass
        time.sleep(0.05)
    try:
        rc = d.proc.wait(1)
    except subprocess.TimeoutExpired:
        rc = None
    took = time.monotonic() - t_quit
    tap.eq(rc, 0, "QUIT: the master exits with status 0")
    # The stalled reader would hold the stop for ever without shutdown_timeout; the margin is for a
    # loaded machine or a sanitizer build, which take seconds to stop the processes and reap them.
    tap.ok(took <= SHUTDOWN_TIMEOUT + 6, "QUIT: the stop takes at most shutdown_timeout (%d s) + 6 s: took %.2f s"
           % (SHUTDOWN_TIMEOUT, took))
    tap.ok(took >= SHUTDOWN_TIMEOUT - 0.5, "(the stalled reader held its worker until shutdown_timeout: %.2f s)" % took)
    kinds = [a for _, a, _ in agent_answers]
    tap.ok(kinds and kinds[0] == "drain\n" and "up" not in "".join(kinds),
           "agent answers drain during the graceful stop, never up", repr(agent_answers))
    tap.ok(all(a == "drain\n" for _, a, alive in agent_answers if alive),
           "agent says drain (not down) as long as workers are finishing", repr(agent_answers))
    if "fast stop" in h.read_text(LOG, mark):
        tap.diag("note: something else sent the master a fast-stop signal during the graceful stop")
    left = h.wait_for(lambda: not [p for p in procs_before if h.pid_alive(p)], 5)
    tap.ok(left, "QUIT: no process of the daemon is left",
           repr({p: h.proc_title(p) for p in procs_before if h.pid_alive(p)}))
    tap.ok(not os.path.exists(d.pid_file), "QUIT: the pid file is removed")
    tap.ok(not os.path.exists(STATS), "QUIT: the stats socket is removed")
    tap.ok(re.search(r"worker \d+ warn: graceful stop: connections still open after shutdown_timeout", h.read_text(LOG)),
           "the log says a connection was cut at shutdown_timeout")
    tap.ok(idle.wait_closed(1), "the idle connection was closed")
    idle.close()
    tap.ok(h.drained_until_cut(stalled), "the stalled reader's connection was cut")
    for t in threads:
        t.join(10)
    tap.ok(not [t for t in threads if t.is_alive()], "every uploader saw its connection end")
    for i, st in enumerate(states):
        tap.ok(not st["bad"], "upload %d: no error answer during the graceful stop" % i, repr(st["bad"][:3]))
    tap.diag("acked at QUIT %r, acked in the end %r, complete %r" % (
        acked_at_quit, [s["acked"] for s in states], [s["complete"] for s in states]))
    try:
        r = inflight.recv_json(h.MSG_UPLOAD + 1, 5)
    except Exception as e:
        r = {"exception": repr(e)}
    tap.ok(r.get("error") == 0 and r.get("trans_size") == 65536,
           "a request waiting for Redis when QUIT came is answered with error 0", repr(r))
    tap.ok(inflight.wait_closed(2), "... and then its connection is closed")
    inflight.close()

    # Every acknowledged byte is in the staging file (or the file is published).
    for i, (up, st) in enumerate(zip(ups, states)):
        if st["complete"]:
            tap.ok(h.read_file(published(up.uid, up.name)) == up.data, "upload %d: completed and published" % i)
            continue
        part = os.path.join(d.root, ".staging", "%d-%s.part" % (up.uid, up.md5))
        try:
            with open(part, "rb") as f:
                disk = f.read()
        except OSError as e:
            disk = b""
        tap.ok(len(disk) >= st["acked"] and disk[:st["acked"]] == up.data[:st["acked"]],
               "upload %d: the %d acknowledged bytes are in the staging file" % (i, st["acked"]),
               "staging has %d bytes" % len(disk))

    mark = size_of(LOG)
    try:
        d.start()
        restarted = True
    except Exception as e:
        restarted = False
        tap.ok(False, "the daemon restarts on the same directories", str(e))
    if restarted:
        tap.ok(wait_state_up(15), "the daemon restarts on the same directories and is up")
        with h.Client(d.port) as c:
            s = inflight_up.sync(c)
            tap.eq((s.get("error"), s.get("trans_size"), s.get("seq")), (0, 65536, 1),
                   "the request answered during the stop is persisted: sync says 65536 bytes, seq 1")
            if s.get("error") == 0:
                r, off, _ = inflight_up.run(c, offset=s["trans_size"], seq=s["seq"] + 1)
        tap.ok(os.path.exists(published(3002, "inflight.bin")) and
               h.read_file(published(3002, "inflight.bin")) == inflight_up.data, "inflight.bin finished intact")
        for i, (up, st) in enumerate(zip(ups, states)):
            with h.Client(d.port) as c:
                s = up.sync(c)
                if st["complete"]:
                    tap.eq(s.get("error"), 1012, "upload %d: completed before the stop, sync says 1012" % i)
                    continue
                tap.ok(s.get("error") == 0 and s.get("trans_size", -1) <= len(up.data),
                       "upload %d: sync after the restart answers its progress" % i, repr(s))
                if s.get("error") != 0:
                    continue
                if s["trans_size"] < st["acked"]:
                    tap.diag("upload %d: sync says %d but %d bytes were acknowledged (the record trailed)"
                             % (i, s["trans_size"], st["acked"]))
                r, off, _ = up.run(c, offset=s["trans_size"], seq=s["seq"] + 1)
                tap.ok(r.get("error") == 0 and off is None, "upload %d: resumed at %d and finished" % (i, s["trans_size"]),
                       repr(r))
            tap.ok(h.read_file(published(up.uid, up.name)) == up.data if os.path.exists(published(up.uid, up.name))
                   else False, "upload %d: the published file is byte-identical" % i)


# ---------------------------------------------------------------- TERM
with tap.section("TERM"):
    if d.proc and d.proc.poll() is None:
        pids = daemon_pids(d)
        rc, left = d.stop(timeout=15)
        tap.eq((rc, left), (0, []), "TERM: exit 0 and nothing left")
        tap.ok(not os.path.exists(d.pid_file) and not os.path.exists(STATS), "TERM: pid file and stats socket removed")
        try:
            agent(timeout=1)
            agent_gone = False
        except OSError:
            agent_gone = True
        tap.ok(agent_gone, "TERM: the agent port is closed")
    else:
        tap.skip("TERM", "the daemon is not running")

with tap.section("TERM during a graceful stop"):
    # A long shutdown_timeout, so that the fast stop TERM asks for is told apart from the graceful
    # one by a wide margin, however slowly a loaded machine (or a sanitizer build) stops.
    slow = {s: dict(kv) for s, kv in quick.items()}
    slow["server"]["shutdown_timeout"] = str(LONG_SHUTDOWN)
    slow["server"]["drain_grace"] = "2"   # the workers get their QUIT as soon as with shutdown_timeout 4
    h.Daemon.write_config(d.conf_path, slow)
    d.start()
    tap.ok(wait_state_up(15), "(daemon restarted)")
    stalled = stalled_reader()
    tap.ok(h.wait_for(lambda: any(t.get("kind") == "download" and t.get("name") == "big.bin"
                                  for t in stats_json("show transfers")), 10),
           "(the stalled reader's download is in progress)")
    pids = daemon_pids(d)
    mark = size_of(LOG)
    d.send_signal(signal.SIGQUIT)
    held = h.wait_for(lambda: len(re.findall(r"graceful stop: \d+ connections open", h.read_text(LOG, mark))) >= 2, 10)
    time.sleep(0.3)
    tap.ok(held and d.proc.poll() is None, "QUIT with a stalled reader: the daemon is still stopping after 0.3 s")
    t0 = time.monotonic()
    d.send_signal(signal.SIGTERM)
    try:
        rc = d.proc.wait(LONG_SHUTDOWN + 12)
    except subprocess.TimeoutExpired:
        rc = None
    took = time.monotonic() - t0
    tap.ok(rc == 0 and took < LONG_SHUTDOWN / 3,
           "TERM during a graceful stop turns it into a fast stop: exit 0 in %.2f s (shutdown_timeout %d s)"
           % (took, LONG_SHUTDOWN), h.read_text(LOG, mark)[-1500:])
    tap.ok(h.wait_for(lambda: not [q for q in pids if h.pid_alive(q)], 5), "no process left")
    tap.ok(not os.path.exists(d.pid_file), "pid file removed")
    stalled.close()


# ---------------------------------------------------------------- PROXY protocol
class ProxyDaemon(h.Daemon):
    """A daemon with proxy_protocol = on: its readiness probe sends a PROXY header first."""

    def ping(self, timeout=2.0):
        try:
            with h.Client(self.port, timeout=timeout) as c:
                c.send_raw(b"PROXY TCP4 192.0.2.250 192.0.2.1 1 2\r\n")
                r = c.request(h.MSG_TEST, {"data": "ready?"}, timeout=timeout)
                return r.get("error") == 0 and r.get("data") == "ready?"
        except (OSError, h.ProtocolError):
            return False


V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(src, sport, dst="192.0.2.1", dport=9090, cmd=0x21, tlv=b""):
    if ":" in src:
        addrs = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
        body = addrs + struct.pack(">HH", sport, dport) + tlv
        return V2_SIG + bytes([cmd, 0x21]) + struct.pack(">H", len(body)) + body
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack(">HH", sport, dport) + tlv
    return V2_SIG + bytes([cmd, 0x11]) + struct.pack(">H", len(body)) + body


with tap.section("PROXY protocol"):
    p = ProxyDaemon(workers=1, redis=redis, settings={"server": {"proxy_protocol": "on"}})
    P_ACCESS = os.path.join(p.dir, "access.log")
    p.settings["log"]["access_log"] = P_ACCESS
    h.Daemon.write_config(p.conf_path, p.settings)
    with tap.diagnostics(lambda: p.log_tail(10)):
        p.start()
        tap.ok(h.wait_for(lambda: p.log_count("redis: connected") >= 2, 10), "proxy daemon up and connected to Redis")

        def proxied_upload(header, name, pieces=False):
            data = rbytes(70000)
            with h.Client(p.port) as c:
                if pieces:
                    for i in range(len(header)):
                        c.send_raw(header[i:i + 1])
                        time.sleep(0.002)
                else:
                    c.send_raw(header)
                up = h.Upload(data, name, 3001, USERS[3001], chunk_size=65536)
                r, _, _ = up.run(c)
                if r.get("error") == 0:
                    got, _ = h.download(c, name, 3001, USERS[3001])
                    if got != data:
                        r = {"error": "downloaded bytes differ"}
            return r

        def access_for(name):
            return [l for l in access_lines(P_ACCESS) if l[4] == name]

        cases = [
            ("v1 TCP4", b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 9090\r\n", "pv1.bin", "203.0.113.7:51234", False),
            ("v1 TCP6", b"PROXY TCP6 2001:db8::5 2001:db8::1 6000 9090\r\n", "pv1-6.bin", "[2001:db8::5]:6000", False),
            ("v1 in 1-byte pieces", b"PROXY TCP4 203.0.113.8 192.0.2.1 41000 9090\r\n", "pv1-split.bin",
             "203.0.113.8:41000", True),
            ("v2 TCP4", v2_header("198.51.100.9", 40000), "pv2.bin", "198.51.100.9:40000", False),
            ("v2 TCP4 with a TLV", v2_header("198.51.100.10", 40001, tlv=b"\x04\x00\x03abc"), "pv2-tlv.bin",
             "198.51.100.10:40001", False),
            ("v2 TCP6", v2_header("2001:db8::9", 7000), "pv2-6.bin", "[2001:db8::9]:7000", False),
            ("v2 in 1-byte pieces", v2_header("198.51.100.11", 40002), "pv2-split.bin", "198.51.100.11:40002", True),
        ]
        for what, header, name, addr, pieces in cases:
            r = proxied_upload(header, name, pieces)
            tap.eq(r.get("error"), 0, "%s: upload and download through the header work" % what, repr(r))
            lines = h.wait_for(lambda: (lambda l: l if len(l) >= 2 else None)(access_for(name)), 3) or access_for(name)
            tap.eq(sorted((l[1], l[3]) for l in lines), [(addr, "download"), (addr, "upload")],
                   "%s: the access log shows %s for the upload and the download" % (what, addr),
                   h.read_text(P_ACCESS)[-800:])
        # LOCAL (a health check by the balancer): the real peer address stays.
        with h.Client(p.port) as c:
            c.send_raw(V2_SIG + bytes([0x20, 0x00]) + b"\x00\x00")
            up = h.Upload(rbytes(1000), "plocal.bin", 3001, USERS[3001])
            r, _, _ = up.run(c)
            port_local = c.sock.getsockname()[1]
        tap.eq(r.get("error"), 0, "v2 LOCAL: the connection is served")
        lines = h.wait_for(lambda: access_for("plocal.bin"), 3) or []
        tap.eq([l[1] for l in lines], ["127.0.0.1:%d" % port_local], "v2 LOCAL: the access log shows the real peer")

        with h.Client(p.port) as good:
            good.send_raw(b"PROXY TCP4 203.0.113.20 192.0.2.1 50000 9090\r\n")
            tap.eq(good.request(h.MSG_TEST, {"data": "a"}).get("data"), "a", "a proxied connection is served")
            bads = [
                ("no header (a bare 1001 frame)", h.frame(h.MSG_TEST, {"data": "x"})),
                ("an HTTP request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
                ("v1 with a bad address", b"PROXY TCP4 999.0.0.1 192.0.2.1 1 2\r\n" + h.frame(h.MSG_TEST, {"data": "x"})),
                ("v1 without CR", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n" + h.frame(h.MSG_TEST, {"data": "x"})),
                ("v1 with a port over 65535", b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 2\r\n"),
                ("v1 longer than 107 bytes", b"PROXY TCP4 " + b"1" * 120 + b"\r\n"),
                ("v2 with version 1", V2_SIG + bytes([0x11, 0x11]) + b"\x00\x0c" + b"\x00" * 12),
                ("v2 over UDP", V2_SIG + bytes([0x21, 0x12]) + b"\x00\x0c" + b"\x00" * 12),
                ("v2 TCP4 with a short address block", V2_SIG + bytes([0x21, 0x11]) + b"\x00\x04" + b"\x01\x02\x03\x04"),
            ]
            for what, raw in bads:
                with h.Client(p.port) as c:
                    c.send_raw(raw)
                    closed = c.wait_closed(3)
                    tap.ok(closed and not c.buf, "bad PROXY header (%s): closed without an answer" % what,
                           "closed %r buf %r" % (closed, c.buf[:100]))
                tap.eq(good.request(h.MSG_TEST, {"data": what}).get("data"), what,
                       "... while the proxied connection keeps working")
        tap.ok("no valid PROXY protocol header" in p.log_text(), "the log says why bad headers are closed")
        rc, left = p.stop()
        tap.eq((rc, left), (0, []), "proxy daemon stops cleanly")


# ---------------------------------------------------------------- init script
INIT = os.path.join(h.SRCDIR, "contrib", "resourced.init")
with tap.section("init script"):
    if not os.path.exists(INIT):
        tap.skip("init script start/status/reload/stop", "contrib/resourced.init does not exist (yet)")
    else:
        i = h.Daemon(workers=2, redis=redis)
        I_LOG = os.path.join(i.dir, "resourced.log")
        i.settings["log"]["file"] = I_LOG
        i.settings["server"]["stats_socket"] = os.path.join(i.run_dir, "stats.sock")
        h.Daemon.write_config(i.conf_path, i.settings)
        env = dict(os.environ, DAEMON=h.RESOURCED_BIN, CONF=i.conf_path)

        def init(action, timeout=60):
            r = subprocess.run(["sh", INIT, action], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=timeout, text=True)
            return r.returncode, r.stdout

        def pid_from_file():
            try:
                with open(i.pid_file) as f:
                    return int(f.read().strip())
            except (OSError, ValueError):
                return None

        def tree(master):
            return [pid for pid in h.all_pids() if (h.proc_stat(pid) or (0, 0, 0))[1] == master]

        def kill_init_daemon():
            m = pid_from_file()
            if m and h.pid_alive(m) and h.proc_title(m) == "resourced: master":
                for pid in tree(m) + [m]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        h.at_cleanup(kill_init_daemon)
        with tap.diagnostics(lambda: log_tail(10, I_LOG)):
            rc, out = init("status")
            tap.eq(rc, 3, "init status before start: exit 3 (not running)", out)
            rc, out = init("start")
            tap.eq(rc, 0, "init start: exit 0", out)
            master = h.wait_for(pid_from_file, 10)
            tap.ok(master and h.proc_title(master) == "resourced: master",
                   "the pid file from the config names a running 'resourced: master'", repr(master))
            workers = h.wait_for(lambda: (lambda w: w if len(w) == 2 else None)(
                {p for p in tree(master) if (h.proc_title(p) or "").startswith("resourced: worker")}), 10) or set()
            tap.eq(len(workers), 2, "it runs 2 workers")
            tap.ok(h.wait_for(i.ping, 10), "the daemon started by the init script answers 1001")
            rc, out = init("status")
            tap.eq(rc, 0, "init status while running: exit 0", out)
            rc, out = init("start")
            tap.eq(rc, 0, "init start when already running: exit 0", out)
            tap.eq(pid_from_file(), master, "... and the same master keeps running")
            rc, out = init("reload")
            tap.eq(rc, 0, "init reload: exit 0", out)
            new = h.wait_for(lambda: (lambda w: w if len(w) == 2 and not (w & workers) else None)(
                {p for p in tree(master) if (h.proc_title(p) or "").startswith("resourced: worker")}), 10)
            tap.ok(new, "init reload replaces the workers (HUP)")
            tap.eq(pid_from_file(), master, "init reload keeps the master")
            everything = set(tree(master)) | {master}
            rc, out = init("stop")
            tap.eq(rc, 0, "init stop: exit 0", out)
            tap.ok(h.wait_for(lambda: not [q for q in everything if h.pid_alive(q)], 10),
                   "init stop: no process left", repr([q for q in everything if h.pid_alive(q)]))
            tap.ok(not os.path.exists(i.pid_file), "init stop: the pid file is removed")
            rc, out = init("status")
            tap.eq(rc, 3, "init status after stop: exit 3", out)
            rc, out = init("stop")
            tap.eq(rc, 0, "init stop when not running: exit 0", out)
            rc, out = init("start")
            tap.eq(rc, 0, "init start again: exit 0", out)
            master = h.wait_for(pid_from_file, 10)
            everything = set(tree(master)) | {master} if master else set()
            rc, out = init("graceful-stop")
            tap.eq(rc, 0, "init graceful-stop: exit 0", out)
            tap.ok(h.wait_for(lambda: not [q for q in everything if h.pid_alive(q)], 15),
                   "init graceful-stop: no process left")

tap.finish()

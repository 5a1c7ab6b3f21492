# test_operator.py: what operators meet first: the reload answer over the stats socket, --help/--version, -t checks, per-process gauges and expected answers apart from errors.
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=150)

UID, TOKEN = 4101, "tok-4101-operator"


def run(argv, timeout=20, env=None):
    """(exit status, stdout, stderr, seconds) of a command."""
    t0 = time.monotonic()
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=timeout, text=True, env=env)
    return r.returncode, r.stdout, r.stderr, time.monotonic() - t0


def stats(d, *command, timeout=20):
    return run([h.RESCTL_BIN, "stats", "--socket", d.stats_socket] + list(command), timeout)


redis = h.RedisServer().start()
redis.set_token(UID, TOKEN)
d = h.Daemon(workers=2, redis=redis, stats=True)
d.start()
d.wait_workers()
d.wait_redis_connected()

# ---------------------------------------------------------------- item 3: reload over the stats socket
tap.section("reload over the stats socket ends its answer")
log_mark = len(d.log_text())
rc, out, err, secs = stats(d, "reload")
tap.eq(rc, 0, "resctl stats reload exits 0", err)
tap.ok(out.startswith("OK"), "the answer is OK", out)
tap.ok("stats socket: reloading" in d.log_text()[log_mark:], "the log says where the reload came from",
       d.log_text()[log_mark:])
# The old answer came at once and then the connection stayed open in the forked children for 10 s.
tap.diag("resctl stats reload took %.1f s" % secs)
tap.ok("no answer within" not in err, "no timeout message", err)
d.wait_workers(20)
rc, out, err, secs = stats(d, "reload")
tap.ok(rc == 0 and "no answer within" not in err, "a second reload answers the same way (exit %d)" % rc, err)
d.wait_workers(20)
# The reload's checks run on a thread and its answer comes later: a client that sends its lines at
# once and closes its side gets every answer, in order.
answers = h.stats_lines(d.stats_socket, ["reload", "help"])
tap.ok(len(answers) == 2 and answers[0].startswith("OK reloaded") and answers[1].startswith("help "),
       "pipelined reload and help over a half-closed connection: both answers, in order", repr(answers)[:300])
d.wait_workers(20)

# ---------------------------------------------------------------- item 7: long options
tap.section("--help and --version")
for binary, name in ((h.RESOURCED_BIN, "resourced"), (h.RESCTL_BIN, "resctl")):
    rc, out, err, _ = run([binary, "--help"])
    tap.ok(rc == 0 and out.startswith("usage: %s" % name), "%s --help prints the usage and exits 0" % name, out + err)
    for flag in ("--version", "-V"):
        rc, out, err, _ = run([binary, flag])
        tap.ok(rc == 0 and out.strip().startswith(name + " ") and out.strip()[len(name) + 1:][:1].isdigit(),
               "%s %s prints the version and exits 0" % (name, flag), out + err)
rc, out, err, _ = run([h.RESOURCED_BIN, "--config", d.conf_path, "--test"])
tap.ok(rc == 0 and "is valid" in out, "resourced --config FILE --test is -c FILE -t", out + err)
rc, out, err, _ = run([h.RESOURCED_BIN, "--no-such-option"])
tap.ok(rc == 1 and "usage" in err, "an unknown long option is refused with the usage", out + err)
rc, out, err, _ = run([h.RESOURCED_BIN, "-t"])
if "cannot read configuration file" in err and "No such file" in err:   # nothing installed at the default path
    tap.ok(rc == 1 and "-c FILE" in err and "etc/resourced.conf" in err,
           "-t without -c and nothing at the default path: says to name one with -c", err)
else:
    tap.skip("-t without -c: the hint to use -c", "a configuration is installed at the default path")


# ---------------------------------------------------------------- item 6: -t checks what start needs
tap.section("resourced -t checks what start needs")
case_dir = h.temp_dir("operator-conf")
SUN_PATH_MAX = 107


def check_with(changes, tag):
    settings = {s: dict(kv) for s, kv in d.settings.items()}
    for section, kv in changes.items():
        settings.setdefault(section, {}).update(kv)
    path = os.path.join(case_dir, tag + ".conf")
    h.Daemon.write_config(path, settings)
    return path, d.check_config(path)


missing = os.path.join(case_dir, "no-such-dir")
a_file = os.path.join(case_dir, "plain-file")
with open(a_file, "w") as f:
    f.write("not a directory\n")
long_sock = os.path.join(case_dir, "s" * (SUN_PATH_MAX + 5 - len(case_dir)) + ".sock")
cases = [
    ("storage root whose parent does not exist", {"storage": {"root": os.path.join(missing, "root")}},
     "[storage] root", missing),
    ("storage root that is a file", {"storage": {"root": a_file}}, "[storage] root", "not a directory"),
    ("stats socket in a directory that does not exist",
     {"server": {"stats_socket": os.path.join(missing, "stats.sock")}}, "[server] stats_socket", missing),
    ("stats socket path longer than sun_path", {"server": {"stats_socket": long_sock}},
     "[server] stats_socket", "longer than a Unix socket path"),
    ("stats socket path that is a regular file", {"server": {"stats_socket": a_file}},
     "[server] stats_socket", "not a socket"),
    ("run_dir whose parent does not exist",
     {"server": {"run_dir": os.path.join(missing, "run"), "pid_file": os.path.join(missing, "run", "r.pid")}},
     "[server] run_dir", missing),
    ("run_dir too long for the storage socket",
     {"server": {"run_dir": os.path.join(case_dir, "r" * 100)}}, "storage socket", "longer than a Unix socket"),
    ("pid file in a directory that does not exist",
     {"server": {"pid_file": os.path.join(missing, "r.pid")}}, "[server] pid_file", missing),
    ("log file in a directory that does not exist", {"log": {"file": os.path.join(missing, "r.log")}},
     "[log] file", missing),
    ("access log that is a directory", {"log": {"access_log": case_dir}}, "[log] access_log", "is a directory"),
    ("agent_listen without a port", {"server": {"agent_listen": "127.0.0.1"}}, "[server] agent_listen",
     "host:port"),
    ("agent_listen on the listen port", {"server": {"agent_listen": "127.0.0.1:%d" % d.port}},
     "[server] agent_listen", "the same port as [server] listen"),
    ("http_listen on the agent_listen port (any address)",
     {"server": {"agent_listen": "127.0.0.1:%d" % (d.port + 1), "http_listen": "0.0.0.0:%d" % (d.port + 1)}},
     "[server] http_listen", "the same port as [server] agent_listen"),
    ("user that does not exist", {"server": {"user": "no-such-user-4101"}}, "[server] user", "no such user"),
    ("group that does not exist", {"server": {"group": "no-such-group-4101"}}, "[server] group",
     "no such group"),
]
for i, (desc, changes, key, why) in enumerate(cases):
    path, (rc, out) = check_with(changes, "case%d" % i)
    # Each line of the report begins with the program's name (PREFLIGHT_PREFIX), which a reload's log
    # line leaves out (test_ops.py): "resourced: [section] key VALUE: why".
    named = [line for line in out.splitlines() if key in line]
    if key in ("[server] user", "[server] group") and os.geteuid() != 0:
        tap.ok(rc == 0 and why in out and named and all(line.startswith("resourced: warning: [") for line in named),
               "-t warns (not root): %s" % desc, out)
        continue
    tap.ok(rc == 1 and why in out and named and all(line.startswith("resourced: [") for line in named),
           "-t exits 1 naming %s: %s" % (key, desc), "exit %r, output %r" % (rc, out))
# Writable is what root cannot be refused: check as nobody, with every path in a tree nobody can read.
nobody_runs = os.geteuid() == 0 and \
    run(["runuser", "-u", "nobody", "--", h.RESOURCED_BIN, "--version"])[0] == 0   # the build tree may be private
if nobody_runs:
    shared = tempfile.mkdtemp(prefix="resourced-it-operator-nobody-")
    h.at_cleanup(lambda: shutil.rmtree(shared, ignore_errors=True))
    os.chmod(shared, 0o755)
    locked = os.path.join(shared, "locked")
    os.mkdir(locked, 0o755)
    settings = {"server": {"listen": "127.0.0.1:%d" % d.port, "run_dir": os.path.join(shared, "run"),
                           "pid_file": os.path.join(shared, "run", "r.pid")},
                "storage": {"root": os.path.join(locked, "root")},
                "log": {"file": os.path.join(locked, "r.log")}}
    os.chmod(shared, 0o777)           # run_dir may be created; nothing in locked/ may
    path = os.path.join(shared, "nobody.conf")
    h.Daemon.write_config(path, settings)
    os.chmod(path, 0o644)
    rc, out, err, _ = run(["runuser", "-u", "nobody", "--", h.RESOURCED_BIN, "-t", "-c", path])
    tap.ok(rc == 1 and "[storage] root" in err and "%s is not writable" % locked in err and "[log] file" in err
           and "[server] run_dir" not in err, "-t as nobody: a storage root and a log nobody may create are named",
           "exit %r, %s%s" % (rc, out, err))
else:
    tap.skip("-t as another user: a directory that is not writable",
             "needs root, and a build tree the user nobody can reach")
rc, out = d.check_config(case_dir)
tap.ok(rc == 1 and "is a directory" in out, "-t on a directory as the configuration file exits 1", out)
two, (rc, out) = check_with({"storage": {"root": os.path.join(missing, "root")},
                             "log": {"file": os.path.join(missing, "r.log")}}, "two")
tap.ok(rc == 1 and "[storage] root" in out and "[log] file" in out and "2 problems" in out,
       "-t reports every problem, not only the first", out)
tap.ok(not os.path.exists(missing), "-t created nothing")
# Addresses taken by another process: start refuses them, so -t names them (with the holder's pid).
# The running daemon's own configuration is not "in use" by itself: -t names its pid for a reload.
rc, out = d.check_config(d.conf_path)
tap.ok(rc == 0 and "pid %d" % d.master_pid in out and "kill -HUP" in out,
       "-t of the running daemon's configuration: valid, and a note naming its pid", out)
other_run = os.path.join(case_dir, "other-run")
holders = []
for _ in range(2):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    holders.append(holder)
held = ["127.0.0.1:%d" % holder.getsockname()[1] for holder in holders]
_, (rc, out) = check_with({"server": {"run_dir": other_run, "pid_file": os.path.join(other_run, "r.pid"),
                                      "agent_listen": held[0], "http_listen": held[1]}}, "taken")
tap.ok(rc == 1 and "[server] listen 127.0.0.1:%d" % d.port in out and "already listens there" in out
       and any("pid %d" % p in out for p in d.processes()),
       "-t names a listen address another instance holds, and a process of it", out)
tap.ok("[server] agent_listen %s" % held[0] in out and "[server] http_listen %s" % held[1] in out
       and "pid %d" % os.getpid() in out,
       "-t names agent_listen and http_listen held by another process, with its pid", out)
# The running daemon's stats socket, which this file shares: start would refuse it too.
tap.ok("[server] stats_socket %s: a live process" % d.settings["server"]["stats_socket"] in out
       and "4 problems" in out, "-t names a stats_socket a live process answers on", out)
for holder in holders:
    holder.close()
tap.ok(not os.path.exists(other_run), "... and created nothing (not the run_dir it probed)")
# [ipv6]:port, as [server] listen takes it, for the agent and HTTP listeners too.
_, (rc, out) = check_with({"server": {"agent_listen": "[::1]:%d" % h.free_port(),
                                      "http_listen": "[::1]:%d" % h.free_port()}}, "ipv6")
tap.ok(rc == 0, "-t accepts [::1]:port for agent_listen and http_listen", out)
_, (rc, out) = check_with({"postgres": {"conninfo": "host=/run/postgresql password='s3cret"}}, "conninfo")
tap.ok(rc == 1 and "[postgres] conninfo" in out and "unterminated quoted string" in out,
       "-t: a conninfo libpq cannot parse is a problem naming the key and libpq's reason", out)
tap.ok("s3cret" not in out, "... and the conninfo (it may hold a password) is not echoed", out)
# libpq quotes what it could not parse: a password written without its "password=" (or a URI that
# holds one) must not reach -t's report, nor a refused reload's log line and answer.
for bad in ("host=/run/postgresql hunter2pw", "postgresql://u:hunter2pw@[::1/db"):
    _, (rc, out) = check_with({"postgres": {"conninfo": bad}}, "conninfo-quoted")
    tap.ok(rc == 1 and "[postgres] conninfo" in out and "libpq cannot parse it" in out and "hunter2pw" not in out,
           "-t: libpq's reason for %r is given without the words it quotes" % bad.split()[0][:12], out)

# resourced.conf(5): a file with a password should not be readable by everyone.
secret, _ = check_with({"redis": {"password": "pw-4101"}}, "secret")
os.chmod(secret, 0o644)
rc, out = d.check_config(secret)
tap.ok(rc == 0 and "warning" in out and "[redis] password" in out and "chmod o-r" in out and "pw-4101" not in out,
       "-t warns (exit 0) that a file holding a password is readable by everyone, without showing it", out)
os.chmod(secret, 0o640)
rc, out = d.check_config(secret)
tap.ok(rc == 0 and "chmod" not in out, "... and not once it is chmod 0640", out)
uri, _ = check_with({"postgres": {"conninfo": "postgresql://chat@localhost/chat"}}, "uri-no-secret")
os.chmod(uri, 0o644)
rc, out = d.check_config(uri)
tap.ok(rc == 0 and "holds a password" not in out, "a conninfo URI with a user and no password is no secret", out)

# Logs to syslog where nothing receives them would be lost without a word.
to_syslog, _ = check_with({"log": {"file": "syslog"}}, "syslog")
rc, out = d.check_config(to_syslog)
if os.path.exists("/dev/log"):
    tap.ok(rc == 0 and "/dev/log" not in out, "-t: [log] file = syslog with a syslog here: no warning", out)
else:
    tap.ok(rc == 0 and "warning" in out and "/dev/log does not exist" in out and "[log] file" in out,
           "-t warns (exit 0) that logs to syslog would be lost: no /dev/log on this machine", out)

# Start runs the same checks: it fails at once with the reason instead of a stale error half-way.
path, _ = check_with({"server": {"stats_socket": long_sock}}, "start")
rc, out, err, _ = run([h.RESOURCED_BIN, "-f", "-c", path], timeout=30)
tap.ok(rc == 1 and "longer than a Unix socket path" in err and "not started" in err,
       "start with an over-long stats socket path exits 1 naming it", out + err)
tap.ok(h.pid_alive(d.master_pid) and d.ping(), "the running daemon is not disturbed")


# ---------------------------------------------------------------- items 4 and 5: per-process gauges, expected answers
tap.section("gauges per process, sums only where they mean something")


def info():
    return h.stats_info(d)


def metrics():
    rc, out, err, _ = stats(d, "show", "metrics")
    return out


def series(text, name):
    """{labels string: value} of one metric in a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            key, value = line.rsplit(" ", 1)
            out[key[len(name):]] = float(value)
    return out


def all_connected():
    i = info()
    return i if i["redis_connected"] == 3 and i["storage_linked"] == 2 else None


# Two reloads above left two old generations behind: their slots must not count.
i = h.wait_for(all_connected, 20)
tap.ok(i, "show info: redis_connected 3 and storage_linked 2 with 2 workers after two reloads", repr(info()))
i = i or info()
tap.eq((i.get("processes_running"), i.get("workers_running")), (3, 2), "show info: 3 processes, 2 workers running")
tap.ok("redis_up" not in i and "storage_up" not in i, "show info has no sum of per-process states", repr(i))
rc, text, err, _ = stats(d, "show", "info")
tap.ok("Redis_connected: 3" in text and "redis_up" not in text, "show info text says Redis_connected: 3", text)
rc, out, err, _ = stats(d, "show", "stat", "json")
rows = json.loads(out)
running = [r for r in rows if r["pid"] > 0]
tap.ok(all(r["redis_up"] == 1 for r in running), "show stat: redis_up is 1 per running process", out)
rc, out, err, _ = stats(d, "show", "workers")
rows = [l.split() for l in out.splitlines() if l and not l.startswith("#")]
tap.ok(out.startswith("# role number slot pid state uptime_sec restarts connections redis_up storage_up") and
       len(rows) == 3 and all(r[8] == "1" for r in rows) and
       sorted(r[9] for r in rows) == ["-", "1", "1"], "show workers: redis_up and storage_up per process", out)
rc, out, err, _ = stats(d, "show", "workers", "json")
wj = json.loads(out)
tap.ok(all(w["redis_up"] == 1 for w in wj) and all(w.get("storage_up") == 1 for w in wj if w["role"] == "worker")
       and all("storage_up" not in w for w in wj if w["role"] == "storage"), "show workers json: the same", out)
m = metrics()
up = series(m, "resourced_redis_up")
tap.ok(len(up) == 3 and set(up.values()) == {1.0} and all("role=" in k for k in up),
       "metrics: resourced_redis_up is one series per process, each 1", repr(up))
tap.ok("" not in up, "metrics: no unlabelled resourced_redis_up sum", repr(up))
link = series(m, "resourced_storage_up")
tap.ok(len(link) == 2 and all('role="worker"' in k for k in link) and set(link.values()) == {1.0},
       "metrics: resourced_storage_up per worker", repr(link))
tap.ok("# HELP resourced_redis_up 1 when the process is connected to Redis" in m,
       "metrics: the HELP of redis_up speaks of one process, as its series do")
up_series = series(m, "resourced_process_up")
tap.eq(len(up_series), 3, "metrics: process_up has one series per current process (no duplicate labels)",
       repr(up_series))

with h.Client(d.port) as c1, h.Client(d.port) as c2:
    c1.request(h.MSG_TEST, {"data": "x"})
    c2.request(h.MSG_TEST, {"data": "y"})
    tap.ok(h.wait_for(lambda: info()["conn_current"] == 2, 10), "conn_current sums the running workers' connections",
           repr(info()["conn_current"]))

tap.section("a sync's 1012 before a fresh upload is an expected answer, not an error")
before = info()
data = os.urandom(100000)
up = h.Upload(data, "operator-fresh.bin", UID, TOKEN)
with h.Client(d.port) as c:
    s = up.sync(c)
    tap.eq(s.get("error"), 1012, "sync before a fresh upload answers 1012")
    r, _, _ = up.run(c)
    tap.eq(r.get("error"), 0, "the upload completes")
    bad = c.request(h.MSG_UPLOAD, up.body(0, 3))     # seq 3 of an upload that is done: a real 1012
    tap.eq(bad.get("error"), 1012, "a chunk of an upload not in progress answers 1012")
after = info()


def count(i, kind, code="1012"):
    return i.get(kind, {}).get(code, 0)


tap.eq(count(after, "expected") - count(before, "expected"), 1, "show info: expected 1012 counts the sync's answer")
tap.eq(count(after, "errors") - count(before, "errors"), 1, "show info: errors 1012 counts only the upload chunk's")
rc, text, err, _ = stats(d, "show", "info")
tap.ok("expected_1012: %d" % count(after, "expected") in text, "show info text has expected_1012", text)
rc, out, err, _ = stats(d, "show", "stat", "json")
rows = json.loads(out)
tap.eq(sum(r.get("expected", {}).get("1012", 0) for r in rows), count(after, "expected"),
       "show stat json: expected per process adds up to the total")
rc, out, err, _ = stats(d, "show", "stat")
tap.ok(out.splitlines()[0].endswith(",errors,expected"), "show stat text has errors and expected columns", out[:300])
m = metrics()
tap.eq(series(m, "resourced_responses_expected_total").get('{code="1012"}'), float(count(after, "expected")),
       "metrics: resourced_responses_expected_total{code=\"1012\"}")
tap.eq(series(m, "resourced_responses_error_total").get('{code="1012"}'), float(count(after, "errors")),
       "metrics: resourced_responses_error_total{code=\"1012\"} leaves the sync's answer out")


# ---------------------------------------------------------------- a reload keeps what only a start applies
tap.section("a reload keeps run_dir, the pid file and the sockets a start bound")
# A reload that took a new run_dir started new workers looking for the storage socket there, where
# nothing listens (the master holds it in the old one): every upload was answered 1027 until a restart.
moved = h.temp_dir("operator-moved")
old_storage = d.storage_pid()
mark = len(d.log_text())
d.settings["server"].update({"run_dir": moved, "pid_file": os.path.join(moved, "r.pid"),
                             "stats_socket": os.path.join(moved, "stats.sock")})
h.Daemon.write_config(d.conf_path, d.settings)
d.send_signal(signal.SIGHUP)
tap.ok(h.wait_for(lambda: "reloaded" in d.log_text()[mark:], 20), "the reload is applied", d.log_text()[mark:])
logged = d.log_text()[mark:]
tap.ok("[server] run_dir, [server] pid_file, [server] stats_socket: changes take effect at the next start" in logged,
       "the log names the keys a reload cannot change", logged)
data = os.urandom(70000)
try:
    d.wait_workers(20)
    with h.Client(d.port, timeout=60) as c:
        r, _, _ = h.Upload(data, "operator-after-move.bin", UID, TOKEN).run(c)
except Exception as e:   # a worker that never finds the storage socket: no answer, or 1027
    r = {"exception": repr(e)}
tap.eq(r.get("error"), 0, "an upload through the new workers completes", r)
tap.eq(d.storage_pid(), old_storage, "the storage process kept running (its run_dir did not change)")
rc, out, err, _ = stats(d, "show", "info")
tap.ok(rc == 0 and "Pid: %d" % d.master_pid in out, "the stats socket answers where it was bound", out + err)
tap.eq(sorted(os.listdir(moved)), [], "nothing was created in the new run_dir")


# ---------------------------------------------------------------- a daemon runs from /
tap.section("daemonized: runs from /, and reloads a configuration named relative to where it started")
bg = h.Daemon(workers=1, redis=redis)
bg.settings["log"]["file"] = bg.log_path
h.Daemon.write_config(bg.conf_path, bg.settings)
r = subprocess.run([h.RESOURCED_BIN, "-c", os.path.basename(bg.conf_path)], cwd=bg.dir, stdin=subprocess.DEVNULL,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30, text=True)
tap.eq(r.returncode, 0, "resourced -c NAME (relative, no -f) starts and detaches", r.stdout)
bg_pid = int(h.read_text(bg.pid_file).strip() or 0) if h.wait_for(lambda: h.read_text(bg.pid_file).strip(), 15) else 0
h.at_cleanup(lambda: bg_pid and h.pid_alive(bg_pid) and os.kill(bg_pid, signal.SIGKILL))
tap.ok(bg_pid and os.readlink("/proc/%d/cwd" % bg_pid) == "/", "the master's working directory is /",
       bg_pid and os.readlink("/proc/%d/cwd" % bg_pid))
mark = len(h.read_text(bg.log_path))
if bg_pid:
    os.kill(bg_pid, signal.SIGHUP)
tap.ok(h.wait_for(lambda: "reloaded %s" % bg.conf_path in h.read_text(bg.log_path)[mark:], 20),
       "a HUP reloads the file by its absolute path", h.read_text(bg.log_path)[mark:])
if bg_pid:
    os.kill(bg_pid, signal.SIGTERM)
tap.ok(h.wait_for(lambda: not h.pid_alive(bg_pid), 20), "it stops on TERM")
rel = os.path.join(bg.dir, "relative.conf")
h.Daemon.write_config(rel, dict(bg.settings, server=dict(bg.settings["server"], pid_file="r.pid")))
rc, out = d.check_config(rel)
tap.ok(rc == 1 and "[server] pid_file 'r.pid' is not an absolute path" in out, "-t refuses a relative pid_file", out)

tap.finish()

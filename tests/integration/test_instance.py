# test_instance.py: one instance per configuration: a second resourced is refused and the running one is untouched; stale leftovers of a dead one are not.
import os
import re
import signal
import subprocess
import sys

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=150)

UID, TOKEN = 4101, "instance-token"
redis = h.RedisServer().start()
redis.set_token(UID, TOKEN)

d = h.Daemon(workers=2, redis=redis)
AGENT_PORT = h.free_port()
d.stats_socket = os.path.join(d.run_dir, "stats.sock")
d.settings["server"].update({"stats_socket": d.stats_socket, "agent_listen": "127.0.0.1:%d" % AGENT_PORT})
d.write_config(d.conf_path, d.settings)
tap.context.append(lambda: d.log_tail(15))

d.start_or_finish(tap)


def upload_ok(port, name, size=300000):
    data = os.urandom(size)
    up = h.Upload(data, name, UID, TOKEN)
    with h.Client(port) as c:
        r, _, _ = up.run(c)
    path = h.published(d, UID, name)
    return r.get("error") == 0 and os.path.exists(path) and h.read_file(path) == data


def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        return repr(e)


def snapshot():
    """What a second instance must not change: the pid file, the sockets' inodes, the agent's answer."""
    sock = os.path.join(d.run_dir, "storage.sock")
    return {"pid_file": read_text(d.pid_file),
            "storage_socket": os.stat(sock).st_ino if os.path.exists(sock) else None,
            "stats_socket": os.stat(d.stats_socket).st_ino if os.path.exists(d.stats_socket) else None}


def running_one_untouched(what):
    """The running instance still works in every way a second instance used to break."""
    tap.eq(snapshot(), before, "%s: pid file and socket files of the running instance unchanged" % what)
    tap.eq(d.proc.poll(), None, "%s: the running master is still alive" % what)
    tap.ok(h.agent_answer(AGENT_PORT).startswith("up ready"), "%s: its agent still answers up" % what,
           repr(h.agent_answer(AGENT_PORT)))
    info = h.stats_info(d)
    tap.eq(info.get("pid"), d.master_pid, "%s: its stats socket still answers (pid %r)" % (what, info.get("pid")))
    tap.ok(upload_ok(d.port, "after-%s.bin" % what.replace(" ", "-")), "%s: an upload still completes" % what)
    # A new worker must still reach the storage socket: kill one and upload through its successor.
    workers = d.wait_workers()
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    tap.ok(h.wait_for(lambda: len(d.wait_workers(1)) == d.workers and victim not in d.worker_pids(), 10),
           "%s: a killed worker is respawned" % what)
    tap.ok(all(upload_ok(d.port, "respawned-%s-%d.bin" % (what.replace(" ", "-"), i), 100000) for i in range(4)),
           "%s: uploads through the respawned workers complete (they reach the storage socket)" % what)


with tap.section("setup"):
    tap.ok(upload_ok(d.port, "first.bin"), "an upload completes on the first instance")
    before = snapshot()
    tap.ok(before["storage_socket"] and before["stats_socket"], "the storage and stats sockets exist", repr(before))
    tap.ok(before["pid_file"].strip() == str(d.master_pid), "the pid file names the master", repr(before))

with tap.section("same configuration"):
    rc, out = d.run_again()
    tap.ok(rc not in (0, None), "a second instance with the same configuration exits with an error (%r)" % rc, out)
    tap.ok("pid %d" % d.master_pid in out and "refusing to start" in out,
           "its message names the running master's pid %d" % d.master_pid, out)
    running_one_untouched("same config")

with tap.section("another configuration, same port"):
    other = h.Daemon(workers=1, redis=redis)
    other.settings["server"]["listen"] = "127.0.0.1:%d" % d.port
    other.write_config(other.conf_path, other.settings)
    rc, out = other.run_again()
    tap.eq(rc, 1, "another configuration on the same port is refused with status 1", out)
    m = re.search(r"another process \(pid (\d+)\) already listens", out)
    tap.ok(m and int(m.group(1)) in d.processes(), "its message names a process of the running instance", out)
    tap.eq(read_text(other.pid_file)[:1], "", "the refused instance wrote no pid", read_text(other.pid_file))
    running_one_untouched("same port")

with tap.section("another configuration, same agent or HTTP port"):
    # Every listener another process holds is refused the same way, before anything is bound:
    # status 1 and the key (once agent_listen and http_listen failed at bind, fatally, with 2).
    for key, value in (("agent_listen", "127.0.0.1:%d" % AGENT_PORT), ("http_listen", "127.0.0.1:%d" % AGENT_PORT)):
        other = h.Daemon(workers=1, redis=redis)
        other.settings["server"][key] = value
        other.write_config(other.conf_path, other.settings)
        rc, out = other.run_again()
        tap.ok(rc == 1 and "[server] %s %s: another process (pid %d) already listens there" % (key, value, d.master_pid)
               in out and "refusing to start" in out,
               "-f: a taken %s is refused with status 1, naming the key and the master" % key, out)
        tap.eq(read_text(other.pid_file)[:1], "", "... and wrote no pid", read_text(other.pid_file))
    # Started in the background the same refusal exits 1, as the background process did.
    other.settings["log"]["file"] = other.log_path
    other.settings["server"]["http_listen"] = ""
    other.settings["server"]["agent_listen"] = "127.0.0.1:%d" % AGENT_PORT
    other.write_config(other.conf_path, other.settings)
    r = subprocess.run([h.RESOURCED_BIN, "-c", other.conf_path], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=30, text=True)
    tap.ok(r.returncode == 1 and "[server] agent_listen" in r.stdout,
           "daemonized: a taken agent_listen exits 1 with the reason", "%r %s" % (r.returncode, r.stdout))
    running_one_untouched("same agent port")

with tap.section("another configuration, same run_dir, no pid file"):
    # The foreground case without a pid file: the run_dir lock identifies the instance.
    shared = h.Daemon(workers=1, redis=redis)
    shared.settings["server"].update({"run_dir": d.run_dir, "pid_file": "",
                                      "stats_socket": d.stats_socket})
    shared.write_config(shared.conf_path, shared.settings)
    rc, out = shared.run_again()
    tap.ok(rc not in (0, None), "an instance sharing run_dir is refused (%r)" % rc, out)
    tap.ok("pid %d" % d.master_pid in out and "run_dir lock" in out,
           "its message names the running master's pid and the run_dir lock", out)
    running_one_untouched("same run_dir")

with tap.section("stats socket of a live instance"):
    # A different run_dir and port but the same stats socket: it is not taken over.
    third = h.Daemon(workers=1, redis=redis)
    third.settings["server"]["stats_socket"] = d.stats_socket
    third.write_config(third.conf_path, third.settings)
    rc, out = third.run_again()
    tap.ok(rc == 1 and "[server] stats_socket %s: a live process" % d.stats_socket in out,
           "an instance naming a live stats socket is refused with status 1", out)
    running_one_untouched("same stats socket")

with tap.section("children of a killed master"):
    # The storage process outlives a SIGKILLed master until its pending SIGTERM
    # (PR_SET_PDEATHSIG) is handled: stopped here, it keeps the instance locked.
    master = d.master_pid
    storage = d.storage_pid()
    os.kill(storage, signal.SIGSTOP)
    os.kill(master, signal.SIGKILL)
    d.proc.wait(5)
    rc, out = d.run_again()
    tap.ok(rc not in (0, None) and "pid %d" % master in out and "is gone" in out,
           "while a child of the killed master lives, a new instance is refused and says the master is gone", out)
    os.kill(storage, signal.SIGCONT)
    tap.ok(h.wait_for(lambda: not d.processes(), 15), "the storage process then stops (SIGTERM from the master's death)")

with tap.section("stale leftovers of a dead instance"):
    tap.ok(read_text(d.pid_file).strip() == str(master) and os.path.exists(d.stats_socket) and
           os.path.exists(os.path.join(d.run_dir, "storage.sock")),
           "its pid file and socket files are left behind", repr(snapshot()))
    try:
        d.start()
        started = True
    except Exception as e:
        started = False
        tap.ok(False, "a new instance starts over the stale pid file and sockets", str(e))
    if started:
        tap.ok(True, "a new instance starts over the stale pid file and sockets")
        tap.eq(read_text(d.pid_file).strip(), str(d.master_pid), "the pid file names the new master")
        tap.eq(h.stats_info(d).get("pid"), d.master_pid, "the new stats socket answers")
        tap.ok(upload_ok(d.port, "after-restart.bin"), "an upload completes on the new instance")
        rc, out = d.run_again()
        tap.ok(rc not in (0, None) and "pid %d" % d.master_pid in out, "and it is locked in turn", out)
        rc, left = d.stop()
        tap.eq(rc, 0, "it stops cleanly")
        tap.ok(not os.path.exists(d.pid_file), "a clean stop removes the pid file")

tap.finish()

# test_reload_hang.py: a reload whose new storage root does not answer (strace delays every system call on it) is refused after storage_timeout, while the master serves on.
import os
import shutil
import signal
import socket
import subprocess
import sys

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=120)
# The master is traced by strace here, and LeakSanitizer cannot run in a traced process: at its exit
# it stops with a fatal error (a sanitizer report, exit status 1). Leaks are checked in every other
# suite; this one's daemon runs without that check.
if os.environ.get("RESOURCED_SANITIZED"):
    os.environ["ASAN_OPTIONS"] = ":".join(filter(None, [os.environ.get("ASAN_OPTIONS", ""), "detect_leaks=0"]))

STORAGE_TIMEOUT = 2       # [server] storage_timeout: bounds the reload's check of the new root
DELAY_US = 30 * 1000000   # each system call on the hung root waits this long: far past it


class Hang:
    """strace holding every system call the master's threads make on path for DELAY_US: a storage root
    on an NFS server that stopped answering, without NFS (nothing else of the master is slowed)."""

    def __init__(self, pid, path):
        self.proc = subprocess.Popen(["strace", "-f", "-o", "/dev/null", "-p", str(pid), "-P", path,
                                      "-e", "inject=all:delay_enter=%d" % DELAY_US],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.err = b""
        # strace says "Process N attached" on stderr once it holds the master.
        os.set_blocking(self.proc.stderr.fileno(), False)

        def attached():
            try:
                self.err += self.proc.stderr.read() or b""
            except (BlockingIOError, TypeError):
                pass
            return b"attached" in self.err or self.proc.poll() is not None
        h.wait_for(attached, 10)
        self.ok = self.proc.poll() is None and b"attached" in self.err

    def release(self):
        self.proc.terminate()   # detaching lets the delayed calls go on
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


redis = h.RedisServer().start()
d = h.Daemon(workers=1, redis=redis, stats=True, settings={"server": {"storage_timeout": STORAGE_TIMEOUT}})
tap.context.append(lambda: d.log_tail(15))
d.start_or_finish(tap)
tap.ok(d.wait_workers(15), "daemon started")

if shutil.which("strace") is None:
    tap.skip("a reload whose storage root hangs is refused", "no strace on this machine")
    d.stop()
    tap.finish()
    sys.exit(0)

hung_root = h.temp_dir("hung-root")
d.settings["storage"]["root"] = hung_root
h.Daemon.write_config(d.conf_path, d.settings)
hang = Hang(d.master_pid, hung_root)
if not hang.ok:
    tap.skip("a reload whose storage root hangs is refused", "strace cannot trace the master: %r" % hang.err[-200:])
    hang.release()
    d.stop()
    tap.finish()
    sys.exit(0)

with tap.section("a reload whose storage root hangs"):
    old_storage = d.storage_pid()
    mark = len(d.log_text())
    try:
        with socket.socket(socket.AF_UNIX) as waiting:
            waiting.settimeout(STORAGE_TIMEOUT + 20)
            waiting.connect(d.stats_socket)
            waiting.sendall(b"reload\n")
            # While the check hangs, the master answers another connection, and refuses a second reload.
            tap.ok(h.wait_for(lambda: "stats socket: reloading" in d.log_text()[mark:], 10), "the reload began")
            answers = h.stats_lines(d.stats_socket, ["show info", "reload"])
            tap.ok(len(answers) == 2 and answers[0].startswith("Name: resourced\n"),
                   "show info is answered while the check hangs", repr(answers)[:300])
            tap.ok(len(answers) == 2 and answers[1].startswith("ERROR a reload is being checked already"),
                   "a second reload is refused while the first one's check runs", repr(answers)[-300:])
            data = b""
            while not data.endswith(b"\n\n"):
                chunk = waiting.recv(4096)
                if not chunk:
                    break
                data += chunk
        answer = data.decode(errors="replace").strip()
        tap.eq(answer, "ERROR storage root %s did not answer within %d s; still running on the old configuration"
               % (hung_root, STORAGE_TIMEOUT), "the reload is refused once storage_timeout has passed")
        log = d.log_text()[mark:]
        tap.ok("reload refused, still running on the old configuration: [storage] root %s (or [server] run_dir) "
               "did not answer within %d s" % (hung_root, STORAGE_TIMEOUT) in log, "the log says why", log)
        tap.ok("reloaded" not in log and d.storage_pid() == old_storage,
               "nothing changed: no new generation, the same storage process")
        tap.ok(hang.proc.poll() is None, "the check was still held when the answer came (strace attached)")
    finally:
        hang.release()

with tap.section("after the root answers again"):
    d.settings["storage"]["root"] = d.root
    h.Daemon.write_config(d.conf_path, d.settings)
    # The abandoned check returns on its own: a reload can be checked again once it has.
    answer = h.wait_for(lambda: (lambda a: a if a and not a[0].startswith("ERROR a reload is being checked")
                                 else None)(h.stats_lines(d.stats_socket, ["reload"])), 20, 0.2)
    tap.ok(answer and answer[0].startswith("OK reloaded"), "a reload of a root that answers succeeds", repr(answer))
    tap.ok(d.wait_workers(20), "the new workers run")

with tap.section("a stop while a check hangs"):
    d.settings["storage"]["root"] = hung_root
    h.Daemon.write_config(d.conf_path, d.settings)
    hang = Hang(d.master_pid, hung_root)
    try:
        mark = len(d.log_text())
        d.send_signal(signal.SIGHUP)
        tap.ok(h.wait_for(lambda: "SIGHUP: reloading" in d.log_text()[mark:], 10), "a reload by SIGHUP began")
        d.send_signal(signal.SIGTERM)
        # The master does not wait for the thread: it is through (its last line logged) while the
        # check is still held. The process's exit itself then waits for strace to let that thread go
        # (ptrace holds it; a thread in an NFS call is killed by the exit).
        tap.ok(h.wait_for(lambda: "master info: stopped" in d.log_text()[mark:], 15) and hang.proc.poll() is None,
               "on TERM the master stops although the check has not answered", d.log_text()[mark:])
    finally:
        hang.release()
    rc, left = d.stop()
    tap.ok(rc == 0 and not left, "the master exits with status 0 (exit %r)" % rc, left)

tap.finish()

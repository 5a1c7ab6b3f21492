# harness.py: shared helpers of the integration tests: TAP output, private Redis and PostgreSQL servers, the daemon, and a protocol client.
"""Helpers for tests/integration/test_*.py (Python 3.11 standard library only).

Every server a test starts (redis-server, a PostgreSQL cluster, resourced) is
registered for cleanup: it is killed at exit (Ctrl-C included), on SIGTERM or
SIGHUP, and when the script's deadline passes, so no process outlives a failed test.
Set RESOURCED_TEST_KEEP=1 to keep the temp dirs (configs, daemon logs) for a post-mortem.
"""

import atexit
import base64
import contextlib
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid

RESOURCED_BIN = os.environ.get("RESOURCED_BIN", "resourced")
RESCTL_BIN = os.environ.get("RESCTL_BIN", "resctl")
SRCDIR = os.environ.get(
    "RESOURCED_SRCDIR",
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
PG_BINDIR = os.environ.get("PG_BINDIR", "/usr/lib/postgresql/15/bin")
KEEP = os.environ.get("RESOURCED_TEST_KEEP", "") not in ("", "0")   # keep temp dirs for post-mortems

MSG_TEST, MSG_UPLOAD, MSG_SYNC, MSG_AVATAR, MSG_DOWNLOAD = 1001, 1003, 1005, 1031, 1033


# ---------------------------------------------------------------- cleanup

_cleanups = []
_cleanup_lock = threading.Lock()


def at_cleanup(fn):
    """Runs fn (once) at exit, last registered first."""
    with _cleanup_lock:
        _cleanups.append(fn)
    return fn


def cleanup_all():
    with _cleanup_lock:
        fns = list(reversed(_cleanups))
        _cleanups.clear()
    for fn in fns:
        try:
            fn()
        except Exception:   # cleanup must go on with the others
            traceback.print_exc(file=sys.stderr)


atexit.register(cleanup_all)


def _on_fatal_signal(signum, frame):
    sys.stdout.write("# caught signal %d: cleaning up\n" % signum)
    sys.stdout.flush()
    cleanup_all()
    os._exit(128 + signum)


signal.signal(signal.SIGTERM, _on_fatal_signal)
signal.signal(signal.SIGHUP, _on_fatal_signal)


def temp_dir(prefix):
    path = tempfile.mkdtemp(prefix="resourced-it-%s-" % prefix)
    if not KEEP:
        at_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))
    return path


# ---------------------------------------------------------------- polling

def wait_for(cond, timeout, interval=0.02):
    """Polls cond() until it returns something true or timeout seconds pass; returns its last value.

    An exception in cond counts as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except Exception:
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            return value
        time.sleep(interval)


_ports_used = set()
_ports_lock = threading.Lock()


def free_port():
    """A loopback TCP port nobody listens on (the kernel picks it), never the same twice in one run."""
    with _ports_lock:
        for _ in range(100):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            if port not in _ports_used:
                _ports_used.add(port)
                return port
    raise RuntimeError("no free port")


def md5_hex(data):
    return hashlib.md5(data).hexdigest()


def file_md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def file_tree(top):
    """Every path under top (relative, directories marked with a trailing /)."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(top):
        rel = os.path.relpath(dirpath, top)
        for d in dirnames:
            out.add(os.path.normpath(os.path.join(rel, d)) + "/")
        for f in filenames:
            out.add(os.path.normpath(os.path.join(rel, f)))
    return out


# ---------------------------------------------------------------- TAP

class Tap:
    """TAP producer: ok/skip/diag, the plan printed at the end, exit status 1 on any failure."""

    def __init__(self, deadline=None):
        self.count = 0
        self.failed = []
        self.lock = threading.Lock()
        self.context = []          # callables giving extra diagnostics on a failure
        if deadline:
            self.set_deadline(deadline)

    @staticmethod
    def _clean(desc):
        return " ".join(str(desc).replace("#", "no.").split())

    def _emit(self, line, diag=None):
        lines = [line]
        if diag:
            lines += ["# " + d for d in str(diag).splitlines()]
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()

    def ok(self, cond, desc, diag=None):
        with self.lock:
            self.count += 1
            n = self.count
            if not cond:
                self.failed.append("%d - %s" % (n, desc))
        extra = []
        if not cond:
            if diag:
                extra.append(str(diag))
            for fn in self.context:
                try:
                    extra.append(str(fn()))
                except Exception as e:
                    extra.append("(diagnostics failed: %r)" % e)
        self._emit("%s %d - %s" % ("ok" if cond else "not ok", n, self._clean(desc)),
                   "\n".join(extra) if extra else None)
        return bool(cond)

    def eq(self, got, want, desc, diag=None):
        msg = "got:  %r\nwant: %r" % (got, want)
        return self.ok(got == want, desc, msg + ("\n" + str(diag) if diag else ""))

    def skip(self, desc, reason):
        with self.lock:
            self.count += 1
            n = self.count
        self._emit("ok %d - %s # SKIP %s" % (n, self._clean(desc), self._clean(reason)))

    def diag(self, msg):
        self._emit("# " + str(msg).replace("\n", "\n# "))

    @contextlib.contextmanager
    def diagnostics(self, fn):
        """Adds fn's text to every failure reported inside the block."""
        self.context.append(fn)
        try:
            yield
        finally:
            self.context.remove(fn)

    @contextlib.contextmanager
    def section(self, name):
        """Runs a group of checks; an exception in it is one failed test, and the script goes on."""
        t0 = time.monotonic()
        try:
            yield
        except Exception:
            self.ok(False, "%s: no exception" % name, traceback.format_exc())
        finally:
            self.diag("%s: %.1f s" % (name, time.monotonic() - t0))

    def set_deadline(self, seconds):
        """Past this, the script reports a failure, kills everything it started and exits."""
        def on_alarm(signum, frame):
            self.ok(False, "script finished within its deadline of %d s" % seconds,
                    "".join(traceback.format_stack(frame)))
            self.finish()
        signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(int(seconds))

    def finish(self):
        signal.alarm(0)
        sys.stdout.write("1..%d\n" % self.count)
        if self.failed:
            sys.stdout.write("# %d of %d failed:\n" % (len(self.failed), self.count))
            for f in self.failed:
                sys.stdout.write("#   %s\n" % f)
        sys.stdout.flush()
        cleanup_all()
        os._exit(1 if self.failed or self.count == 0 else 0)


# ---------------------------------------------------------------- Redis

class RedisError(Exception):
    pass


class RedisClient:
    """A minimal RESP2 client: cmd("SET", "k", "v") returns str/int/list/None (bulk strings decoded as UTF-8 when they can be)."""

    def __init__(self, port, host="127.0.0.1", timeout=5.0):
        self.addr = (host, port)
        self.timeout = timeout
        self.sock = None
        self.buf = b""
        self.lock = threading.Lock()

    def close(self):
        if self.sock:
            self.sock.close()
        self.sock = None
        self.buf = b""

    def _line(self):
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("redis closed the connection")
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("redis closed the connection")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n + 2:]
        return out

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            raw = self._exact(n)
            try:
                return raw.decode()
            except UnicodeDecodeError:
                return raw
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise RedisError("bad reply %r" % line)

    def cmd(self, *args):
        parts = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
        with self.lock:
            for attempt in (1, 2):
                try:
                    if self.sock is None:
                        self.sock = socket.create_connection(self.addr, timeout=self.timeout)
                    self.sock.sendall(b"".join(parts))
                    return self._reply()
                except (OSError, ConnectionError):
                    self.close()
                    if attempt == 2:
                        raise

    def get_json(self, key):
        v = self.cmd("GET", key)
        return None if v is None else json.loads(v)


class RedisServer:
    """A private redis-server on a free loopback port, without persistence (a restart comes back empty)."""

    def __init__(self):
        self.dir = temp_dir("redis")
        self.port = free_port()
        self.proc = None
        self.client = RedisClient(self.port)
        at_cleanup(self.kill)

    def start(self, timeout=15):
        self.client.close()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--daemonize", "no",
             "--logfile", os.path.join(self.dir, "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_for(self.ping, timeout):
            raise RuntimeError("redis-server on port %d did not answer PING within %d s" % (self.port, timeout))
        return self

    def ping(self):
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            probe = RedisClient(self.port, timeout=1.0)
            try:
                return probe.cmd("PING") == "PONG"
            finally:
                probe.close()
        except (OSError, ConnectionError, RedisError):
            return False

    def stop(self, timeout=10):
        self.client.close()
        self.resume()   # a paused server would never act on SIGTERM
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def pause(self):
        """SIGSTOP: the server hangs with its connections open (the kernel still accepts new ones)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def restart(self):
        """Stops and starts again on the same port, empty."""
        self.stop()
        return self.start()

    def kill(self):
        self.client.close()
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def cmd(self, *args):
        return self.client.cmd(*args)

    def get_json(self, key):
        return self.client.get_json(key)

    def set_token(self, uid, token):
        self.cmd("SET", "utoken_%d" % uid, token)


class RedisConfServer(RedisServer):
    """A redis-server (or redis-sentinel) run from a config file of its own, so that CONFIG REWRITE,
    which Sentinel sends on a failover, works. lines: extra config lines."""

    def __init__(self, lines=(), sentinel=False):
        super().__init__()
        self.sentinel = sentinel
        self.conf_path = os.path.join(self.dir, "sentinel.conf" if sentinel else "redis.conf")
        self.lines = list(lines)

    def start(self, timeout=15):
        self.client.close()
        base = ["port %d" % self.port, "bind 127.0.0.1", "daemonize no", "dir %s" % self.dir,
                "logfile %s" % os.path.join(self.dir, "redis.log")]
        if not self.sentinel:
            base += ['save ""', "appendonly no"]
        if not os.path.exists(self.conf_path):   # a restart keeps what Sentinel rewrote
            with open(self.conf_path, "w") as f:
                f.write("\n".join(base + self.lines) + "\n")
        args = ["redis-server", self.conf_path] + (["--sentinel"] if self.sentinel else [])
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        if not wait_for(self.ping, timeout):
            raise RuntimeError("%s on port %d did not answer PING within %d s"
                               % ("redis-sentinel" if self.sentinel else "redis-server", self.port, timeout))
        return self

    def role(self):
        try:
            return self.cmd("ROLE")[0]
        except (OSError, ConnectionError, RedisError, IndexError, TypeError):
            return None

    def log_tail(self, n=15):
        try:
            with open(os.path.join(self.dir, "redis.log"), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


class SentinelSet:
    """One Redis master, one replica and `count` sentinels watching them as `name`, all on loopback.

    down_after_ms: how long a silent master takes to count as down (kept short for the tests)."""

    def __init__(self, name="mymaster", count=3, down_after_ms=1000, failover_timeout_ms=5000):
        self.name = name
        self.master = RedisConfServer()
        self.replica = RedisConfServer(["replicaof 127.0.0.1 %d" % self.master.port])
        self.sentinels = []
        for _ in range(count):
            self.sentinels.append(RedisConfServer([
                "sentinel monitor %s 127.0.0.1 %d 2" % (name, self.master.port),
                "sentinel down-after-milliseconds %s %d" % (name, down_after_ms),
                "sentinel failover-timeout %s %d" % (name, failover_timeout_ms),
                "sentinel parallel-syncs %s 1" % name], sentinel=True))

    @property
    def servers(self):
        return [self.master, self.replica]

    @property
    def addresses(self):
        """The value of [redis] sentinels."""
        return ",".join("127.0.0.1:%d" % s.port for s in self.sentinels)

    def start(self, timeout=30):
        self.master.start()
        self.replica.start()
        for s in self.sentinels:
            s.start()
        if not wait_for(self.settled, timeout, 0.1):
            raise RuntimeError("the sentinels did not settle within %d s: %r" % (timeout, self.state()))
        return self

    def state(self):
        out = {}
        for s in self.sentinels:
            try:
                out[s.port] = {"master": s.cmd("SENTINEL", "get-master-addr-by-name", self.name),
                               "replicas": len(s.cmd("SENTINEL", "replicas", self.name)),
                               "sentinels": len(s.cmd("SENTINEL", "sentinels", self.name))}
            except (OSError, ConnectionError, RedisError) as e:
                out[s.port] = repr(e)
        return out

    def settled(self):
        """Every sentinel agrees on the master, knows a replica in sync and the other sentinels."""
        master = self.current_master()
        if master is None or master.role() != "master":
            return False
        for s in self.sentinels:
            if s.proc is None or s.proc.poll() is not None:
                continue
            if s.cmd("SENTINEL", "get-master-addr-by-name", self.name) != ["127.0.0.1", str(master.port)]:
                return False
            replicas = [dict(zip(r[::2], r[1::2])) for r in s.cmd("SENTINEL", "replicas", self.name)]
            if not any(r.get("flags") == "slave" and r.get("master-link-status") == "ok" for r in replicas):
                return False
            if len(s.cmd("SENTINEL", "sentinels", self.name)) < len(self.sentinels) - 1:
                return False
        return True

    def current_master(self):
        """The server the first live sentinel names as master (a RedisConfServer), or None."""
        for s in self.sentinels:
            if s.proc is None or s.proc.poll() is not None:
                continue
            try:
                addr = s.cmd("SENTINEL", "get-master-addr-by-name", self.name)
            except (OSError, ConnectionError, RedisError):
                continue
            for r in self.servers:
                if addr and int(addr[1]) == r.port:
                    return r
        return None

    def failover(self):
        """SENTINEL FAILOVER: promotes the replica; returns the server that was master."""
        old = self.current_master()
        self.sentinels[0].cmd("SENTINEL", "FAILOVER", self.name)
        return old

    def synced(self, key, value):
        """True when every live data server holds key = value (replication caught up)."""
        return all(r.cmd("GET", key) == value for r in self.servers if r.proc and r.proc.poll() is None)


# ---------------------------------------------------------------- PostgreSQL

class PostgresServer:
    """A private PostgreSQL cluster run by the postgres user, reachable on a Unix socket in its temp dir."""

    def __init__(self):
        self.dir = temp_dir("pg")
        self.data = os.path.join(self.dir, "data")
        self.logfile = os.path.join(self.dir, "pg.log")
        self.port = free_port()
        self.initialized = False
        shutil.chown(self.dir, "postgres", "postgres")
        os.chmod(self.dir, 0o755)   # root's psql needs the socket; postgres needs the data dir
        at_cleanup(self.kill)

    @property
    def conninfo(self):
        return "host=%s port=%d dbname=postgres user=postgres" % (self.dir, self.port)

    def _as_postgres(self, args, timeout=60):
        return subprocess.run(["runuser", "-u", "postgres", "--"] + args, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, text=True)

    def init(self):
        r = self._as_postgres([os.path.join(PG_BINDIR, "initdb"), "-D", self.data, "-U", "postgres",
                               "--auth=trust", "-E", "UTF8", "--locale=C", "-N"], timeout=120)
        if r.returncode != 0:
            raise RuntimeError("initdb failed:\n" + r.stdout)
        self.initialized = True
        return self

    def start(self, timeout=60):
        if not self.initialized:
            self.init()
        opts = "-k %s -p %d -c listen_addresses='' -c fsync=off -c synchronous_commit=off" % (self.dir, self.port)
        r = self._as_postgres([os.path.join(PG_BINDIR, "pg_ctl"), "-D", self.data, "-l", self.logfile,
                               "-w", "-t", str(timeout), "-o", opts, "start"], timeout=timeout + 10)
        if r.returncode != 0:
            raise RuntimeError("pg_ctl start failed:\n" + r.stdout + self.log_tail())
        return self

    def stop(self, mode="fast", timeout=60):
        r = self._as_postgres([os.path.join(PG_BINDIR, "pg_ctl"), "-D", self.data, "-m", mode, "-w",
                               "-t", str(timeout), "stop"], timeout=timeout + 10)
        return r.returncode == 0

    def running(self):
        return os.path.exists(os.path.join(self.data, "postmaster.pid"))

    def kill(self):
        if not self.initialized or not self.running():
            return
        if not self.stop("immediate", timeout=20):
            try:
                with open(os.path.join(self.data, "postmaster.pid")) as f:
                    os.kill(int(f.readline()), signal.SIGKILL)
            except (OSError, ValueError):
                pass

    def sql(self, query, check=True):
        """Runs SQL as the superuser; returns psql's unaligned, tuples-only output."""
        r = subprocess.run(["psql", "-X", "-h", self.dir, "-p", str(self.port), "-U", "postgres", "-d", "postgres",
                            "-v", "ON_ERROR_STOP=1", "-At", "-c", query],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=60, text=True)
        if check and r.returncode != 0:
            raise RuntimeError("psql failed (%d): %s" % (r.returncode, r.stderr))
        return r.stdout.strip()

    def load_schema(self):
        with open(os.path.join(SRCDIR, "contrib", "schema.sql")) as f:
            self.sql(f.read())

    def log_tail(self, n=20):
        try:
            with open(self.logfile, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


# ---------------------------------------------------------------- processes

def proc_title(pid):
    """The first NUL-separated field of /proc/PID/cmdline, or None."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return None


def proc_stat(pid):
    """(state, ppid, pgrp) from /proc/PID/stat, or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1]), int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


def pid_alive(pid):
    st = proc_stat(pid)
    return st is not None and st[0] != "Z"


def all_pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def read_text(path, offset=0):
    """The text of a file (a log) from byte offset on, "" when it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def drained_until_cut(sock, timeout=5.0):
    """Reads sock until the server closes or resets it: True then, False if it stays open timeout s.
    Closes sock either way."""
    sock.settimeout(timeout)
    try:
        while sock.recv(1 << 20):
            pass
        cut = True
    except socket.timeout:
        cut = False
    except OSError:
        cut = True
    sock.close()
    return cut


# ---------------------------------------------------------------- the daemon

class Daemon:
    """resourced in the foreground (-f) with a private config, run dir, storage root and log file."""

    def __init__(self, workers=2, redis=None, pg=None, settings=None, log_level="info", host="127.0.0.1",
                 stats=False):
        self.dir = temp_dir("daemon")
        self.host = host           # another loopback address (127.0.0.2...) for multi-node setups
        self.port = free_port()
        self.workers = workers
        self.run_dir = os.path.join(self.dir, "run")
        self.pid_file = os.path.join(self.run_dir, "resourced.pid")
        self.root = os.path.join(self.dir, "root")
        self.conf_path = os.path.join(self.dir, "resourced.conf")
        self.log_path = os.path.join(self.dir, "daemon.log")
        self.proc = None
        self.pgid = None
        self.log_offset = 0
        self.settings = {
            "server": {"listen": "%s:%d" % (host, self.port), "workers": str(workers),
                       "run_dir": self.run_dir, "pid_file": self.pid_file},
            # The test clients send chunks in order and do not follow an instant upload's
            # challenge (the Qt client does): suites about instant upload turn it on themselves.
            "storage": {"root": self.root, "fsync": "complete", "dedup": "off"},
            "redis": {"host": "127.0.0.1", "port": str(redis.port if redis else free_port())},
            "postgres": {"conninfo": pg.conninfo if pg else ""},
            "log": {"level": log_level},
        }
        backend_settings(self)   # [storage] backend from RESOURCED_TEST_BACKEND (the RADOS section below)
        for section, kv in (settings or {}).items():
            self.settings.setdefault(section, {}).update({k: str(v) for k, v in kv.items()})
        # stats=True: a stats socket in the run dir (self.stats_socket), for stats_info() and resctl stats.
        self.stats_socket = os.path.join(self.run_dir, "stats.sock") if stats else None
        if stats:
            self.settings["server"]["stats_socket"] = self.stats_socket
        self.write_config(self.conf_path, self.settings)
        at_cleanup(self.kill)

    @staticmethod
    def write_config(path, settings):
        lines = ["# written by the integration tests"]
        for section, kv in settings.items():
            lines.append("[%s]" % section)
            lines += ["%s = %s" % (k, v) for k, v in kv.items()]
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def start_or_finish(self, tap):
        """Starts the daemon for a suite; a start that fails is the suite's one failure and ends it."""
        try:
            self.start()
        except Exception as e:
            tap.ok(False, "daemon starts", str(e))
            tap.finish()

    def start(self, timeout=20):
        logf = open(self.log_path, "ab")
        self.log_offset = logf.tell()
        self.proc = subprocess.Popen([RESOURCED_BIN, "-f", "-c", self.conf_path], stdin=subprocess.DEVNULL,
                                     stdout=logf, stderr=logf, start_new_session=True)
        logf.close()
        self.pgid = self.proc.pid
        if not wait_for(lambda: self.proc.poll() is not None or self.ping(), timeout, 0.05) or \
                self.proc.poll() is not None:
            raise RuntimeError("resourced did not answer 1001 within %d s (exit %r)\n%s"
                               % (timeout, self.proc.poll(), self.log_tail()))
        return self

    def connect(self, timeout=10.0):
        """A client connection straight to this daemon (with a PROXY v1 header when proxy_protocol is on)."""
        c = Client(self.port, host=self.host, timeout=timeout)
        if self.settings["server"].get("proxy_protocol") in ("on", "yes", "true", "1"):
            c.send_raw(b"PROXY TCP4 192.0.2.250 %s 1 %d\r\n" % (self.host.encode(), self.port))
        return c

    def ping(self, timeout=2.0):
        try:
            with self.connect(timeout=timeout) as c:
                r = c.request(MSG_TEST, {"data": "ready?"}, timeout=timeout)
                return r.get("error") == 0 and r.get("data") == "ready?"
        except (OSError, ProtocolError):
            return False

    @property
    def master_pid(self):
        return self.proc.pid if self.proc else None

    def processes(self):
        """{pid: (title, ppid)} for every live process of this daemon (its process group)."""
        out = {}
        if self.pgid is None:
            return out
        for pid in all_pids():
            st = proc_stat(pid)
            if st and st[2] == self.pgid and st[0] != "Z":
                out[pid] = (proc_title(pid), st[1])
        return out

    def by_title(self, title):
        return sorted(pid for pid, (t, _) in self.processes().items() if t == title)

    def worker_pids(self):
        return {pid: t for pid, (t, _) in self.processes().items() if t and t.startswith("resourced: worker ")}

    def storage_pid(self):
        pids = self.by_title("resourced: storage")
        return pids[0] if len(pids) == 1 else None

    def wait_workers(self, timeout=10):
        """Waits until the full set of workers and one storage process run; returns the worker pids by title."""
        def full():
            w = self.worker_pids()
            return w if len(w) == self.workers and self.storage_pid() else None
        return wait_for(full, timeout) or {}

    def log_text(self, since_start=True):
        try:
            with open(self.log_path, "rb") as f:
                if since_start:
                    f.seek(self.log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n=25):
        return "daemon log (last %d lines):\n" % n + "\n".join(self.log_text().splitlines()[-n:])

    def log_count(self, needle):
        return self.log_text().count(needle)

    def wait_redis_connected(self, timeout=10, since=0):
        """Waits until every worker and the storage process logged a Redis connection (after `since` earlier ones)."""
        need = since + self.workers + 1
        return bool(wait_for(lambda: self.log_count("redis: connected") >= need, timeout, 0.05))

    def send_signal(self, sig):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout=15, sig=signal.SIGTERM):
        """Sends sig to the master; returns (master exit status, pids still alive after the wait)."""
        if self.proc is None:
            return None, []
        seen = set(self.processes())
        self.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        left = wait_for(lambda: not [p for p in seen | set(self.processes()) if pid_alive(p)], 5, 0.05)
        still = [] if left else [p for p in seen | set(self.processes()) if pid_alive(p)]
        return rc, still

    def kill(self):
        """SIGKILLs the master and everything in its process group (the cleanup of a failed test)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.thaw()   # a frozen node (freeze) could not act on the TERM below
            # A fast stop first lets the master reap its children; whatever is left then gets SIGKILL.
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(3)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        wait_for(lambda: not self.processes(), 5, 0.05)
        self.proc = None

    def kill9(self, timeout=10):
        """kill -9 of the whole node, as a crash or a power loss would leave it: SIGKILL to the master named
        by the pid file (the process this object started when the file is gone) and to every process of its
        process group at once. Returns the pids killed; the stale pid file stays."""
        if self.proc is None:
            return []
        master = self.proc.pid
        with contextlib.suppress(OSError, ValueError):
            with open(self.pid_file) as f:
                master = int(f.read().split()[0])
        pgid = (proc_stat(master) or (None, None, self.pgid))[2]
        if pgid != self.pgid:   # a pid file naming another process: only what this object started is killed
            master, pgid = self.proc.pid, self.pgid
        pids = sorted(set(self.processes()) | {master})
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        wait_for(lambda: not self.processes(), timeout, 0.02)
        return pids

    def freeze(self):
        """SIGSTOP to every process of the node at once: a node that hangs (or is cut off) without dying."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGSTOP)

    def thaw(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGCONT)

    def run_again(self, conf_path=None, timeout=20):
        """Starts a second resourced -f with this (or another) configuration and waits for it to exit:
        (exit status or None if it was still running after timeout, its output). Killed if it stays."""
        p = subprocess.Popen([RESOURCED_BIN, "-f", "-c", conf_path or self.conf_path], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = p.communicate(timeout=timeout)
            return p.returncode, out.decode(errors="replace")
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate(timeout=10)
            return None, out.decode(errors="replace")

    def check_config(self, path):
        """Runs resourced -t -c path: (exit status, stdout + stderr)."""
        r = subprocess.run([RESOURCED_BIN, "-t", "-c", path], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=20, text=True)
        return r.returncode, r.stdout


_known_keys = {}


def daemon_knows(section, key, value):
    """True when RESOURCED_BIN accepts `key = value` in [section] (resourced -t on a minimal file): lets a
    suite use a setting that only newer builds have, and run without it against older ones."""
    if (section, key, value) not in _known_keys:
        d = temp_dir("probe")
        path = os.path.join(d, "probe.conf")
        settings = {"server": {"listen": "127.0.0.1:%d" % free_port()},
                    "storage": {"root": os.path.join(d, "root")}}
        settings.setdefault(section, {})[key] = value
        Daemon.write_config(path, settings)
        r = subprocess.run([RESOURCED_BIN, "-t", "-c", path], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=20, text=True)
        _known_keys[(section, key, value)] = r.returncode == 0
    return _known_keys[(section, key, value)]


# ---------------------------------------------------------------- several nodes behind HAProxy

HAPROXY_BIN = os.environ.get("HAPROXY_BIN", "/usr/sbin/haproxy")


class HAProxy:
    """A real HAProxy (Debian's) in front of daemons, run from contrib/haproxy.cfg with the test's addresses.

    The shipped file is used as is (mode tcp, send-proxy-v2, check-send-proxy, the 1001 tcp-check,
    agent-check, maxconn) except for: the addresses and ports, the admin socket and stats page paths,
    no syslog, roundrobin without stickiness unless sticky=True, and checks every 300 ms instead of 2 s
    without slowstart so that the tests do not wait."""

    def __init__(self, nodes, balance="roundrobin", sticky=False):
        self.nodes = list(nodes)
        self.dir = temp_dir("haproxy")
        self.port = free_port()
        self.stats_port = free_port()
        self.admin = os.path.join(self.dir, "admin.sock")
        self.conf_path = os.path.join(self.dir, "haproxy.cfg")
        self.log_path = os.path.join(self.dir, "haproxy.log")
        self.proc = None
        self.write_config(balance, sticky)
        at_cleanup(self.kill)

    @staticmethod
    def _sub(text, old, new):
        if old not in text:
            raise RuntimeError("contrib/haproxy.cfg changed: %r not found (update harness.HAProxy)" % old)
        return text.replace(old, new)

    def write_config(self, balance, sticky):
        with open(os.path.join(SRCDIR, "contrib", "haproxy.cfg")) as f:
            text = f.read()
        sub = self._sub
        text = sub(text, "\tlog /dev/log local0\n", "")
        text = sub(text, "\tlog global\n", "")
        text = sub(text, "\toption tcplog\n", "")
        text = sub(text, "/run/haproxy/admin.sock", self.admin)
        text = sub(text, "bind :9090", "bind 127.0.0.1:%d" % self.port)
        text = sub(text, "bind 127.0.0.1:8404", "bind 127.0.0.1:%d" % self.stats_port)
        text = sub(text, "balance leastconn", "balance %s" % balance)
        if not sticky:
            text = sub(text, "\tstick-table type ip size 1m expire 2h\n", "")
            text = sub(text, "\tstick on src\n", "")
        text = sub(text, "check inter 2s", "check inter 300ms")
        text = sub(text, "agent-inter 2s", "agent-inter 300ms")
        text = sub(text, " slowstart 30s", "")
        lines = []
        for i, n in enumerate(self.nodes):
            agent = n.settings["server"].get("agent_listen", "")
            agent_port = agent.rsplit(":", 1)[1] if agent else None
            lines.append("\tserver node%d %s:%d%s" % (i + 1, n.host, n.port,
                                                        " agent-port %s agent-addr %s" % (agent_port, n.host)
                                                        if agent_port else " no-agent-check"))
        servers = [l for l in text.splitlines() if l.startswith("\tserver res")]
        if len(servers) != 3:
            raise RuntimeError("contrib/haproxy.cfg changed: expected 3 'server resN' lines")
        text = text.replace("\n".join(servers), "\n".join(lines))
        with open(self.conf_path, "w") as f:
            f.write(text)

    def check(self):
        """haproxy -c on the generated file: (exit status, output)."""
        r = subprocess.run([HAPROXY_BIN, "-c", "-f", self.conf_path], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=20, text=True)
        return r.returncode, r.stdout

    def start(self, timeout=20, all_up=True):
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen([HAPROXY_BIN, "-db", "-f", self.conf_path], stdin=subprocess.DEVNULL,
                                     stdout=logf, stderr=logf, start_new_session=True)
        logf.close()
        if not wait_for(lambda: self.proc.poll() is not None or os.path.exists(self.admin), timeout, 0.05) \
                or self.proc.poll() is not None:
            raise RuntimeError("haproxy did not start (exit %r)\n%s" % (self.proc.poll(), self.log_tail()))
        if all_up and not wait_for(lambda: self.up_servers() == self.server_names(), timeout, 0.05):
            raise RuntimeError("not every server came UP in haproxy within %d s: %r\n%s"
                               % (timeout, self.servers(), self.log_tail()))
        return self

    def server_names(self):
        return ["node%d" % (i + 1) for i in range(len(self.nodes))]

    def admin_cmd(self, line):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(self.admin)
            s.sendall(line.encode() + b"\n")
            out = b""
            while True:
                data = s.recv(65536)
                if not data:
                    break
                out += data
        return out.decode(errors="replace")

    def servers(self):
        """{server name: {"status": "UP"/"DOWN"/"DRAIN"/"MAINT"..., "stot": sessions so far, ...}} from show stat."""
        lines = self.admin_cmd("show stat").splitlines()
        if not lines or not lines[0].startswith("# "):
            return {}
        head = lines[0][2:].split(",")
        out = {}
        for line in lines[1:]:
            row = dict(zip(head, line.split(",")))
            if row.get("pxname") == "resourced" and row.get("svname") not in ("BACKEND", "FRONTEND", None):
                out[row["svname"]] = row
        return out

    def up_servers(self):
        return sorted(n for n, row in self.servers().items() if row.get("status") == "UP")

    def sessions(self):
        """{server name: total sessions routed to it so far}."""
        return {n: int(row.get("stot") or 0) for n, row in self.servers().items()}

    def connect(self, timeout=10.0):
        return Client(self.port, timeout=timeout)

    def log_tail(self, n=20):
        try:
            with open(self.log_path, errors="replace") as f:
                return "haproxy log:\n" + "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def kill(self):
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        self.proc = None


class Cluster:
    """n resourced nodes on 127.0.0.2, 127.0.0.3, ... sharing one Redis and one storage root, each with
    proxy_protocol on and an agent_listen port, behind one HAProxy. Every process is cleaned up by pid."""

    def __init__(self, n=3, redis=None, pg=None, workers=1, settings=None, balance="roundrobin", sticky=False,
                 node_settings=None, lease_ttl=None):
        """settings: for every node; node_settings: a list of n dicts applied after it, one per node.
        lease_ttl: [storage] lease_ttl in seconds, one number for every node or a list with one per node,
        set only when RESOURCED_BIN knows the key (self.lease_ttl is then the list, else None)."""
        self.redis = redis or RedisServer().start()
        ttls = lease_ttl if isinstance(lease_ttl, (list, tuple)) else [lease_ttl] * n
        self.lease_ttl = None
        if lease_ttl is not None and all(daemon_knows("storage", "lease_ttl", str(t)) for t in ttls if t is not None):
            self.lease_ttl = list(ttls)
            node_settings = [dict(x) for x in (node_settings or [{}] * n)]
            for i, t in enumerate(ttls):
                if t is not None:
                    node_settings[i]["storage"] = dict(node_settings[i].get("storage", {}), lease_ttl=str(t))
        self.root = temp_dir("shared-root")
        self.nodes = []
        for i in range(n):
            host = "127.0.0.%d" % (i + 2)
            this = {"server": {"proxy_protocol": "on", "agent_listen": "%s:%d" % (host, free_port()),
                               "node": "node%d" % (i + 1)},
                    "storage": {"root": self.root}}
            for extra in (settings or {}, (node_settings or [{}] * n)[i]):
                for section, kv in extra.items():
                    this.setdefault(section, {}).update(kv)
            self.nodes.append(Daemon(workers=workers, redis=self.redis, pg=pg, settings=this, host=host))
        if uses_rados(self.nodes[0]):
            # One storage for every node: the first node's RADOS namespace is everybody's.
            for node in self.nodes[1:]:
                node.settings["rados"]["namespace"] = rados_namespace(self.nodes[0])
                Daemon.write_config(node.conf_path, node.settings)
        self.haproxy = HAProxy(self.nodes, balance=balance, sticky=sticky)

    def start(self, timeout=30):
        for node in self.nodes:
            node.start(timeout)
        self.haproxy.start(timeout)
        return self

    def published(self, uid, name):
        if uses_rados(self.nodes[0]):
            return published(self.nodes[0], uid, name)
        return os.path.join(self.root, str(uid), name)

    def staging_entries(self, uid, md5):
        """The staging entry of (uid, md5) in the shared storage: its files under <root>/.staging, or its
        RADOS staging key and objects. Empty: none."""
        if uses_rados(self.nodes[0]):
            return staging_entries(self.nodes[0], uid, md5)
        try:
            return [n for n in os.listdir(os.path.join(self.root, ".staging")) if md5 in n]
        except FileNotFoundError:
            return []

    def published_files(self, uid):
        """{where: bytes} of every file published for uid, versions and temporaries included: the regular
        files under <root>/<uid>/, or with RADOS every sealed data object whose metadata names uid."""
        if uses_rados(self.nodes[0]):
            return rados_published_versions(self.nodes[0], uid)
        out = {}
        for dirpath, _, names in os.walk(os.path.join(self.root, str(uid))):
            for n in names:
                path = os.path.join(dirpath, n)
                if os.path.isfile(path) and not os.path.islink(path):
                    out[path] = read_file(path)
        return out

    def diagnostics(self):
        out = [self.haproxy.log_tail(10)]
        try:
            out.append("haproxy servers: %r" % {n: (r.get("status"), r.get("stot"))
                                                for n, r in self.haproxy.servers().items()})
        except OSError as e:
            out.append("haproxy admin socket: %r" % e)
        for i, node in enumerate(self.nodes):
            out.append("node%d %s" % (i + 1, node.log_tail(6)))
        return "\n".join(out)


# ---------------------------------------------------------------- protocol client

def agent_answer(port, host="127.0.0.1", timeout=3.0):
    """The one line the master's agent_listen port answers (HAProxy agent-check), as text."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        buf = b""
        while True:
            data = s.recv(256)
            if not data:
                break
            buf += data
    return buf.decode(errors="replace")


def stats_info(d):
    """`show info json` of a daemon started with [server] stats_socket (d.stats_socket), via resctl stats."""
    r = subprocess.run([RESCTL_BIN, "stats", "--socket", d.stats_socket, "show", "info", "json"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20, text=True)
    if r.returncode != 0:
        raise RuntimeError("resctl stats failed (%d): %s" % (r.returncode, r.stderr))
    return json.loads(r.stdout)


def stats_lines(sock_path, lines, timeout=20):
    """Sends lines on one connection, closes our side, returns every answer (split at empty lines)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall("".join(l + "\n" for l in lines).encode())
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace").split("\n\n")[:-1]


def answers_queued_during_restart(d, victim, request_id, body, n, timeout=20):
    """SIGKILLs the worker `victim` of d, then sends n requests on new connections while its slot is empty
    (those hashed to it wait in the queue the master keeps for the slot): the answers' error codes, in order
    (an exception's repr where none came)."""
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not pid_alive(victim), 5)
    early = []
    for _ in range(n):
        c = Client(d.port, timeout=timeout)
        c.send(request_id, body)
        early.append(c)
    codes = []
    for c in early:
        try:
            codes.append(c.recv_json(request_id + 1, timeout).get("error"))
        except Exception as e:
            codes.append(repr(e))
        c.close()
    return codes


def redis_up_everywhere(d):
    """True when every running process of d (workers and the storage process) answers `redis_up` in
    `show info json`: after Redis comes back, each process reconnects on its own back-off, and a
    worker still reconnecting answers its requests 1027. (The state "up" follows the storage
    process only.)"""
    i = stats_info(d)
    return i.get("processes_running", 0) > 0 and i.get("redis_connected") == i.get("processes_running")


def record_in_progress(redis, key):
    """True while key holds an upload record of an upload in progress. After publishing, the record stays
    for upload_ttl with state "published" (so a resent final chunk is answered 0): that one does not count."""
    rec = redis.get_json(key)
    return rec is not None and rec.get("state") != "published"


def published(d, uid, name):
    """Where a finished upload lives: <root>/<uid>/<name> (with the RADOS backend: a local copy of
    the version its name index points to, fetched now; a path that does not exist if there is none)."""
    if d.settings.get("storage", {}).get("backend") == "rados":
        return rados_published_copy(d, uid, name)
    return os.path.join(d.root, str(uid), name)


def published_bytes(d, uid, name):
    """The bytes of a finished upload (published() says where), or None when there is none."""
    p = published(d, uid, name)
    return read_file(p) if os.path.exists(p) else None


class ProtocolError(Exception):
    pass


class ConnectionClosed(ProtocolError):
    pass


HEADER = struct.Struct(">HI")


def frame(msg_id, body):
    """One frame: body is a dict/list (compact JSON), str or bytes."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body, ensure_ascii=False).encode()
    elif isinstance(body, str):
        body = body.encode()
    return HEADER.pack(msg_id, len(body)) + body


class Client:
    """One TCP connection speaking the framed protocol."""

    def __init__(self, port, host="127.0.0.1", timeout=10.0, source=None):
        """source: the local address to connect from (another loopback address: another client address)."""
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.last_raw = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.sock:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None

    def send_raw(self, data):
        self.sock.sendall(data)

    def send(self, msg_id, body):
        self.sock.sendall(frame(msg_id, body))

    def _fill(self, need, deadline):
        while len(self.buf) < need:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no complete frame in time (have %d bytes)" % len(self.buf))
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                raise TimeoutError("no complete frame in time (have %d bytes)" % len(self.buf))
            except ConnectionResetError:
                raise ConnectionClosed("connection reset by the server")
            if not data:
                raise ConnectionClosed("connection closed by the server")
            self.buf += data

    def recv_frame(self, timeout=10.0):
        """The next frame as (id, body bytes)."""
        deadline = time.monotonic() + timeout
        self._fill(HEADER.size, deadline)
        msg_id, length = HEADER.unpack(self.buf[:HEADER.size])
        self._fill(HEADER.size + length, deadline)
        body = self.buf[HEADER.size:HEADER.size + length]
        self.buf = self.buf[HEADER.size + length:]
        return msg_id, body

    def recv_json(self, expect_id, timeout=10.0):
        msg_id, body = self.recv_frame(timeout)
        self.last_raw = body
        if msg_id != expect_id:
            raise ProtocolError("response id %d, expected %d: %r" % (msg_id, expect_id, body[:300]))
        try:
            obj = json.loads(body)
        except ValueError:
            raise ProtocolError("response body is not JSON: %r" % body[:300])
        if not isinstance(obj, dict):
            raise ProtocolError("response body is not an object: %r" % body[:300])
        return obj

    def request(self, msg_id, body, timeout=10.0):
        """Sends one request and returns the parsed response (whose id must be msg_id + 1)."""
        self.send(msg_id, body)
        return self.recv_json(msg_id + 1, timeout)

    def wait_closed(self, timeout):
        """True once the server closed the connection (EOF or reset) within timeout; data read meanwhile is kept."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return False
            except (ConnectionResetError, BrokenPipeError):
                return True
            if not data:
                return True
            self.buf += data

    def is_open(self, wait=0.05):
        """False when the server has closed the connection (nothing is consumed but pending data)."""
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return True
        except (ConnectionResetError, BrokenPipeError):
            return False
        if not data:
            return False
        self.buf += data
        return True


# ---------------------------------------------------------------- uploads and downloads

class Upload:
    """A file upload shaped like the Qt client's: chunks from offset 0, seq from 1, trans_size = offset + len."""

    def __init__(self, data, name, uid, token, chunk_size=65536, msg_id=MSG_UPLOAD, md5=None,
                 total_size=None, as_strings=False, indent=None):
        self.data = data
        self.name = name
        self.uid = uid
        self.token = token
        self.chunk_size = chunk_size
        self.msg_id = msg_id
        self.md5 = md5 or md5_hex(data)
        self.total_size = len(data) if total_size is None else total_size
        self.as_strings = as_strings
        self.indent = indent
        self.last_seq = max(1, -(-len(data) // chunk_size))
        self.responses = []
        self.sent_bytes = 0        # file bytes sent in chunks, resends included

    def body(self, offset, seq, **override):
        piece = self.data[offset:offset + self.chunk_size]
        trans = offset + len(piece)
        num = (lambda v: str(v)) if self.as_strings else (lambda v: v)
        b = {"md5": self.md5, "name": self.name, "seq": num(seq), "trans_size": num(trans),
             "total_size": num(self.total_size), "last": 1 if trans >= len(self.data) else 0,
             "data": base64.b64encode(piece).decode(), "last_seq": num(self.last_seq),
             "uid": num(self.uid), "token": self.token}
        b.update(override)
        return b

    def frame(self, offset, seq, **override):
        body = self.body(offset, seq, **override)
        if self.indent:
            return frame(self.msg_id, json.dumps(body, indent=self.indent))
        return frame(self.msg_id, body)

    def next_offset(self, offset):
        return min(offset + self.chunk_size, len(self.data))

    def send_chunk(self, client, offset, seq, timeout=30.0, **override):
        client.send_raw(self.frame(offset, seq, **override))
        self.sent_bytes += len(self.data[offset:offset + self.chunk_size])
        r = client.recv_json(self.msg_id + 1, timeout)
        self.responses.append(r)
        return r

    def sync(self, client, timeout=30.0):
        return client.request(MSG_SYNC, {"md5": self.md5, "uid": self.uid, "token": self.token}, timeout)

    def run(self, client, offset=0, seq=1, max_chunks=None, timeout=30.0):
        """Sends chunks one at a time from (offset, seq) until the last one or an error.

        Returns (last response, next offset, next seq)."""
        sent = 0
        r = None
        while max_chunks is None or sent < max_chunks:
            r = self.send_chunk(client, offset, seq, timeout)
            sent += 1
            if r.get("error") != 0:
                return r, offset, seq
            if self.next_offset(offset) >= len(self.data):
                return r, None, None
            offset, seq = self.next_offset(offset), seq + 1
        return r, offset, seq

    def run_pipelined(self, client, window=8, timeout=60.0):
        """Sends every chunk keeping up to window requests in flight; returns the responses in order."""
        chunks = []
        offset, seq = 0, 1
        while True:
            chunks.append((offset, seq))
            if self.next_offset(offset) >= len(self.data):
                break
            offset, seq = self.next_offset(offset), seq + 1
        out = []
        sent = 0
        while len(out) < len(chunks):
            while sent < len(chunks) and sent - len(out) < window:
                client.send_raw(self.frame(*chunks[sent]))
                sent += 1
            out.append(client.recv_json(self.msg_id + 1, timeout))
        self.responses += out
        return out

    def complete(self, port, deadline, on_event=None, before_chunk=None):
        """Uploads to the end through whatever happens: reconnects, resyncs and retries on 1027,
        dropped connections, 1012 (starts over) and 1018. Returns the final response, or raises.

        before_chunk(offset), when given, runs before every chunk; when it returns true the
        client closes the connection and resumes on a new one (1005 first)."""
        offset, seq, started = 0, 1, False
        events = []
        while time.monotonic() < deadline:
            try:
                with Client(port, timeout=10) as c:
                    if started:
                        s = self.sync(c)
                        events.append(("sync", s.get("error"), s.get("trans_size")))
                        if s.get("error") == 0:
                            offset, seq = s["trans_size"], s["seq"] + 1
                        elif s.get("error") == 1012:
                            offset, seq = 0, 1
                        else:
                            time.sleep(0.05)
                            continue
                    while time.monotonic() < deadline:
                        if before_chunk and before_chunk(offset):
                            events.append(("reconnect", offset))
                            break
                        r = self.send_chunk(c, offset, seq)
                        started = True
                        err = r.get("error")
                        if err == 0:
                            if self.next_offset(offset) >= len(self.data):
                                self.events = events
                                return r
                            offset, seq = self.next_offset(offset), seq + 1
                        elif err == 1018:
                            events.append(("1018", r.get("trans_size")))
                            offset, seq = r["trans_size"], r["seq"] + 1
                        elif err == 1012:
                            events.append(("1012",))
                            offset, seq = 0, 1
                        elif err == 1027:
                            events.append(("1027",))
                            time.sleep(0.05)
                            break
                        else:
                            raise ProtocolError("upload %s: unexpected answer %r" % (self.name, r))
            except (OSError, ConnectionClosed, TimeoutError) as e:
                events.append(("dropped", str(e)))
                if on_event:
                    on_event(e)
                time.sleep(0.05)
        self.events = events
        raise TimeoutError("upload %s did not complete in time; events %r" % (self.name, events[-10:]))


def download(client, name, uid, token, client_path="/tmp/client/file", max_chunks=1 << 20, timeout=30.0):
    """Fetches a published file with 1033 from seq 1 until is_last; returns (bytes, responses)."""
    out = []
    responses = []
    seq = 1
    while seq <= max_chunks:
        r = client.request(MSG_DOWNLOAD, {"name": name, "seq": seq, "uid": uid, "token": token,
                                          "client_path": client_path, "trans_size": "0", "total_size": "0"},
                           timeout)
        responses.append(r)
        if r.get("error") != 0:
            raise ProtocolError("download %s seq %d: %r" % (name, seq, r))
        out.append(base64.b64decode(r["data"]))
        if r.get("is_last") is True:
            return b"".join(out), responses
        seq += 1
    raise ProtocolError("download %s: no is_last after %d chunks" % (name, max_chunks))


def run_threads(fn, args_list, timeout):
    """Runs fn(*args) in one thread each; returns [(result, exception)] in order."""
    results = [(None, TimeoutError("thread did not finish"))] * len(args_list)

    def body(i, args):
        try:
            results[i] = (fn(*args), None)
        except Exception as e:
            results[i] = (None, e)

    threads = [threading.Thread(target=body, args=(i, a), daemon=True) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return results


# ---------------------------------------------------------------- the RADOS backend: a throwaway Ceph cluster

CEPH_BINS = ("ceph-mon", "ceph-osd", "ceph", "monmaptool")


def _import_rados():
    """python3-rados (installed with ceph-common) lives in Debian's dist-packages, which a python3
    other than /usr/bin/python3 (pyenv, a venv) of the same version does not search."""
    try:
        import rados
    except ImportError:
        sys.path.append("/usr/lib/python3/dist-packages")
        import rados
    return rados


def ceph_missing():
    """The Ceph programs this machine lacks (empty: a cluster can start)."""
    return [b for b in CEPH_BINS if shutil.which(b) is None]


def run_on_rados(suite):
    """Runs the fs suite file `suite` (beside this file) against the RADOS backend, each on a throwaway
    Ceph cluster; a TAP skip when the build has no librados, under the sanitizers, or without Ceph."""
    use_rados()
    import runpy
    runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), suite), run_name="__main__")


def use_rados():
    """Every Daemon made after this uses the RADOS backend on a throwaway Ceph cluster (a suite about
    RADOS only); exits with a TAP skip when the build has no librados, under the sanitizers, or without Ceph."""
    if os.environ.get("RESOURCED_HAVE_RADOS", "yes") != "yes":
        print("1..0 # SKIP resourced was built without librados (apt-get install librados-dev; configure again)")
        sys.exit(0)
    if os.environ.get("RESOURCED_SANITIZED") and not os.environ.get("RESOURCED_TEST_RADOS_SANITIZED"):
        # CI builds its sanitizer pass without librados (.ci/run); a sanitizer build with it runs
        # these suites only when RESOURCED_TEST_RADOS_SANITIZED=1 says so (they are slow there).
        print("1..0 # SKIP the RADOS suites run once, without the sanitizers (RESOURCED_TEST_RADOS_SANITIZED=1 runs it)")
        sys.exit(0)
    if ceph_missing():
        print("1..0 # SKIP Ceph is not installed (%s): run contrib/deps.sh" % ", ".join(ceph_missing()))
        sys.exit(0)
    global TEST_BACKEND
    os.environ["RESOURCED_TEST_BACKEND"] = "rados"
    TEST_BACKEND = "rados"


def _ceph_alive(pid):
    """pid is a live ceph-* process (a reused pid of something else never counts)."""
    title = proc_title(pid) or ""
    st = proc_stat(pid)
    return st is not None and st[0] != "Z" and "ceph-" in os.path.basename(title)


class CephCluster:
    """One ceph-mon and one ceph-osd (Debian's Ceph 16) on 127.0.0.1, everything in a temp dir, no
    cephx, no mgr; pool `pool` of size 1. memstore by default (RAM, gone at a restart of the OSD: the
    OSD kill test uses store="bluestore", a sparse file). Started in ~3 s, stopped by pid."""

    def __init__(self, pool="resourced", store="memstore", osd_bytes=1 << 30):
        self.dir = temp_dir("ceph")
        self.pool = pool
        self.store = store
        self.osd_bytes = osd_bytes
        self.conf = os.path.join(self.dir, "ceph.conf")
        self.run = os.path.join(self.dir, "run")
        self.logs = os.path.join(self.dir, "log")
        self.port = None
        self.osd_uuid = None
        at_cleanup(self.kill)

    def _write_conf(self):
        fsid = str(uuid.uuid4())
        self.fsid = fsid
        d = self.dir
        with open(self.conf, "w") as f:
            f.write("""[global]
fsid = %(fsid)s
mon host = v2:127.0.0.1:%(port)d
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
osd crush chooseleaf type = 0
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
run dir = %(run)s
pid file = %(run)s/$name.pid
admin socket = %(run)s/$name.asok
log file = %(logs)s/$name.log
mon cluster log file = %(logs)s/cluster.log
crash dir = %(d)s/crash
keyring = /dev/null

[client]
log file = /dev/null
admin socket =

[mon]
mon data = %(d)s/mon/$cluster-$id
ms bind retry count = 1
mon data avail crit = 0
mon data avail warn = 1
# each osdmap change (osd new, boot, pool create) otherwise waits ~1 s
paxos propose interval = 0.05

[osd]
osd data = %(d)s/osd/$cluster-$id
osd objectstore = %(store)s
memstore device bytes = %(bytes)d
bluestore block path = %(d)s/osd/block
bluestore block create = true
bluestore block size = %(bytes)d
bluestore block db create = false
bluestore block wal create = false
bluestore fsck on mount = false
bluestore cache autotune = false
bluestore cache size = 67108864
osd memory target = 536870912
""" % {"fsid": fsid, "port": self.port, "run": self.run, "logs": self.logs, "d": d, "store": self.store,
                "bytes": self.osd_bytes})

    def ceph(self, *args, timeout=20):
        """The ceph CLI, bounded in time (it can block forever when the mon is away): (rc, stdout)."""
        try:
            r = subprocess.run(["ceph", "--conf", self.conf] + list(args), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
            return r.returncode, r.stdout
        except subprocess.TimeoutExpired:
            return None, ""

    def _daemon(self, args, log):
        with open(os.path.join(self.logs, log), "ab") as out:
            return subprocess.run(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=60).returncode

    def start(self, timeout=60):
        if ceph_missing():
            raise RuntimeError("Ceph is not installed (%s): run contrib/deps.sh" % ", ".join(ceph_missing()))
        for sub in ("run", "log", "mon/ceph-a", "osd/ceph-0", "crash"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        for attempt in range(3):   # a port taken between the pick and the bind: another one
            self.port = free_port()
            self._write_conf()
            monmap = os.path.join(self.dir, "monmap")
            subprocess.run(["monmaptool", "--create", "--clobber", "--fsid", self.fsid, "--addv", "a",
                            "[v2:127.0.0.1:%d]" % self.port, monmap], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=True)
            shutil.rmtree(os.path.join(self.dir, "mon/ceph-a"), ignore_errors=True)
            os.makedirs(os.path.join(self.dir, "mon/ceph-a"))
            if self._daemon(["ceph-mon", "--conf", self.conf, "-i", "a", "--mkfs", "--monmap", monmap],
                            "mon-mkfs.out") != 0:
                raise RuntimeError("ceph-mon --mkfs failed:\n" + self.log_tail())
            if self._daemon(["ceph-mon", "--conf", self.conf, "-i", "a"], "mon-start.out") == 0:
                break
        if not wait_for(lambda: self.ceph("mon", "stat", timeout=5)[0] == 0, timeout, 0.2):
            raise RuntimeError("ceph-mon did not answer:\n" + self.log_tail())
        self.osd_uuid = str(uuid.uuid4())
        rc, out = self.ceph("osd", "new", self.osd_uuid)
        if rc != 0 or out.strip() != "0":
            raise RuntimeError("ceph osd new: %r %r" % (rc, out))
        if self._daemon(["ceph-osd", "--conf", self.conf, "-i", "0", "--mkfs", "--osd-uuid", self.osd_uuid],
                        "osd-mkfs.out") != 0:
            raise RuntimeError("ceph-osd --mkfs failed:\n" + self.log_tail())
        self.start_osd(timeout)
        if self.ceph("osd", "pool", "create", self.pool, "8", "8", "replicated")[0] != 0:
            raise RuntimeError("cannot create pool %s" % self.pool)
        # the first I/O waits until the placement groups are active
        if not wait_for(self._round_trip, timeout, 0.2):
            raise RuntimeError("no put/get round trip in pool %s:\n%s" % (self.pool, self.log_tail()))
        return self

    def _round_trip(self):
        io = self.ioctx()
        io.write_full("harness-probe", b"ok")
        return io.read("harness-probe") == b"ok"

    def osd_up(self):
        rc, out = self.ceph("osd", "stat", "-f", "json", timeout=5)
        return rc == 0 and json.loads(out).get("num_up_osds") == 1

    def start_osd(self, timeout=60):
        if self._daemon(["ceph-osd", "--conf", self.conf, "-i", "0"], "osd-start.out") != 0:
            raise RuntimeError("ceph-osd did not start:\n" + self.log_tail())
        if not wait_for(self.osd_up, timeout, 0.2):
            raise RuntimeError("osd.0 did not come up:\n" + self.log_tail())

    def pid(self, name):
        """The pid of mon.a or osd.0 from its pid file, if that process is alive."""
        try:
            with open(os.path.join(self.run, "%s.pid" % name)) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        return pid if _ceph_alive(pid) else None

    def signal(self, name, sig):
        pid = self.pid(name)
        if pid:
            os.kill(pid, sig)
        return pid

    def kill_osd(self):
        """SIGKILL of the OSD; returns once it is gone."""
        pid = self.signal("osd.0", signal.SIGKILL)
        wait_for(lambda: not (pid and _ceph_alive(pid)), 10)
        wait_for(lambda: self.ceph("osd", "down", "0", timeout=5)[0] == 0, 10)

    def kill(self):
        """Stops both daemons by pid (OSD first), SIGKILL after 10 s."""
        for name in ("osd.0", "mon.a"):
            pid = self.pid(name)
            if not pid:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)   # a stopped one (outage test) cannot exit otherwise
                os.kill(pid, signal.SIGTERM)
            if not wait_for(lambda: not _ceph_alive(pid), 10, 0.05):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                wait_for(lambda: not _ceph_alive(pid), 5, 0.05)

    stop = kill

    def fresh_client_answers(self, timeout=3):
        """A new `rados` client (a process of its own) stats an object within timeout seconds."""
        try:
            r = subprocess.run(["rados", "-c", self.conf, "-p", self.pool, "stat", "no-such-object",
                                "--rados-osd-op-timeout", str(timeout), "--rados-mon-op-timeout", str(timeout)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=timeout * 3)
        except subprocess.TimeoutExpired:
            return False
        return r.returncode == 0 or "No such file" in r.stdout

    def osd_diagnostics(self):
        """The OSD's own view (admin socket: status, ops in flight) and the end of its log."""
        out = []
        asok = os.path.join(self.run, "osd.0.asok")
        for cmd in (["status"], ["dump_ops_in_flight"], ["dump_blocked_ops"]):
            try:
                r = subprocess.run(["ceph", "--admin-daemon", asok] + cmd, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=10)
                out.append("%s: %s" % (cmd[0], " ".join(r.stdout.split())[:1500]))
            except subprocess.TimeoutExpired:
                out.append("%s: no answer" % cmd[0])
        try:
            with open(os.path.join(self.logs, "osd.0.log"), errors="replace") as f:
                out.append("osd.0.log: " + " | ".join(l.strip()[:300] for l in f.readlines()[-25:]))
        except OSError as e:
            out.append("osd.0.log: %s" % e)
        return "\n# ".join(out)

    def ioctx(self, namespace=""):
        """A librados I/O context on the pool (python3-rados, installed with ceph-common)."""
        if getattr(self, "_cluster", None) is None:
            rados = _import_rados()
            self._cluster = rados.Rados(conffile=self.conf, conf={"rados_osd_op_timeout": "10",
                                                                  "rados_mon_op_timeout": "10"})
            self._cluster.connect(timeout=10)
            at_cleanup(self._cluster.shutdown)
        io = self._cluster.open_ioctx(self.pool)
        io.set_namespace(namespace)
        return io

    def log_tail(self, n=15):
        out = []
        for name in sorted(os.listdir(self.logs)) if os.path.isdir(self.logs) else []:
            try:
                with open(os.path.join(self.logs, name), errors="replace") as f:
                    lines = f.readlines()[-n:]
            except OSError:
                continue
            out.append("----- %s\n%s" % (name, "".join(lines)))
        return "\n".join(out)


# The backend every Daemon uses: RESOURCED_TEST_BACKEND=rados runs a suite against RADOS. One cluster
# per test process, started by the first Daemon (or given by RESOURCED_TEST_CEPH_CONF and _POOL),
# and one RADOS namespace per Daemon, so daemons of one suite never see each other's files.
TEST_BACKEND = os.environ.get("RESOURCED_TEST_BACKEND", "fs")
_shared_ceph = None
_namespaces = [0]


def shared_ceph():
    global _shared_ceph
    if _shared_ceph is None:
        conf = os.environ.get("RESOURCED_TEST_CEPH_CONF")
        if conf:
            _shared_ceph = CephCluster(pool=os.environ.get("RESOURCED_TEST_CEPH_POOL", "resourced"))
            _shared_ceph.conf = conf
        else:
            _shared_ceph = CephCluster(store=os.environ.get("RESOURCED_TEST_CEPH_STORE", "memstore")).start()
    return _shared_ceph


def backend_settings(d):
    """Points d at the test backend: nothing to do for fs; for rados, the shared cluster and a fresh namespace."""
    if TEST_BACKEND != "rados":
        return
    ceph = shared_ceph()
    _namespaces[0] += 1
    d.ceph = ceph
    d.settings["storage"]["backend"] = "rados"
    d.settings["rados"] = {"conf": ceph.conf, "user": "admin", "pool": ceph.pool,
                           "namespace": "t%d-%d" % (os.getpid(), _namespaces[0]), "gc_grace": "5"}


def uses_rados(d):
    return d.settings.get("storage", {}).get("backend") == "rados"


def staging_entries(d, uid, md5):
    """The staging entry of upload (uid, md5) in d's backend: its files under <root>/.staging, or
    its key in the RADOS staging index and the data objects it points to. Empty: none."""
    if not uses_rados(d):
        return glob.glob(os.path.join(d.root, ".staging", "%d-%s.*" % (uid, md5)))
    entries = rados_staging(d)
    key = "%d.%s" % (uid, md5)
    return [key] + [o for o in rados_objects(d) if o.startswith(entries[key])] if key in entries else []


def rados_namespace(d):
    return d.settings["rados"]["namespace"]


def rados_read_file(d, uid, name):
    """The bytes of <uid>/<name> as a reader of the name index sees them, or None."""
    rados = _import_rados()
    io = d.ceph.ioctx(rados_namespace(d))
    try:
        with rados.ReadOpCtx() as op:
            it, _ = io.get_omap_vals_by_keys(op, (name,))
            io.operate_read_op(op, "idx.%d" % uid)
            vals = dict(it)
        head = vals.get(name)
        if head is None:
            return None
        head = head.decode()
        size, piece = (int(x) for x in io.get_xattr(head, "layout").decode().split(":"))
        out = []
        for k in range((size + piece - 1) // piece or 1):
            oid = head if k == 0 else "%s.%d" % (head, k)
            out.append(io.read(oid, min(piece, size - k * piece)) if size else b"")
        return b"".join(out)
    except rados.ObjectNotFound:
        return None
    finally:
        io.close()


def _rados_read_head(io, head):
    size, piece = (int(x) for x in io.get_xattr(head, "layout").decode().split(":"))
    out = []
    for k in range((size + piece - 1) // piece or 1):
        oid = head if k == 0 else "%s.%d" % (head, k)
        out.append(io.read(oid, min(piece, size - k * piece)) if size else b"")
    return b"".join(out)


def rados_published_versions(d, uid):
    """{head: bytes} of every sealed (published or being published) data object of uid in d's namespace."""
    rados = _import_rados()
    io = d.ceph.ioctx(rados_namespace(d))
    out = {}
    try:
        for oid in rados_objects(d):
            if not oid.startswith("d.") or oid.count(".") != 2:
                continue   # not a head (pieces are <head>.<k>)
            try:
                if io.get_xattr(oid, "state") != b"sealed":
                    continue
                if json.loads(io.get_xattr(oid, "meta").decode()).get("uid") != uid:
                    continue
                out[oid] = _rados_read_head(io, oid)
            except rados.ObjectNotFound:
                pass   # collected meanwhile
    finally:
        io.close()
    return out


def rados_published_copy(d, uid, name):
    """A local copy of the published <uid>/<name> (see published()), refreshed at every call."""
    path = os.path.join(d.dir, "rados-view", str(uid), name)
    data = rados_read_file(d, uid, name)
    if data is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return path


def rados_published_tree(d):
    """The published files of d's namespace as file_tree() would list <root>: "<uid>/" and "<uid>/<name>"."""
    rados = _import_rados()
    io = d.ceph.ioctx(rados_namespace(d))
    out = set()
    try:
        for oid in (o for o in rados_objects(d) if o.startswith("idx.")):
            with rados.ReadOpCtx() as op:
                it, _ = io.get_omap_vals(op, "", "", 100000)
                io.operate_read_op(op, oid)
                names = [k for k, _ in it]
            if names:
                out.add(oid[4:] + "/")
                out.update("%s/%s" % (oid[4:], n) for n in names)
    finally:
        io.close()
    return out


def rados_objects(d):
    """Every object name in d's namespace."""
    io = d.ceph.ioctx(rados_namespace(d))
    try:
        return sorted(o.key for o in io.list_objects())
    finally:
        io.close()


def rados_staging(d):
    """{"<uid>.<md5>": head} of d's staging index."""
    rados = _import_rados()
    io = d.ceph.ioctx(rados_namespace(d))
    try:
        with rados.ReadOpCtx() as op:
            it, _ = io.get_omap_vals(op, "", "", 10000)
            io.operate_read_op(op, "staging")
            return {k: v.decode() for k, v in it}
    except rados.ObjectNotFound:
        return {}
    finally:
        io.close()

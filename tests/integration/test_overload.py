# test_overload.py: overload: max_connections, thousands of slow-drip and idle connections beside a normal upload, clients that never read their answers.
"""Three daemons, one per part:

(a) workers=1, max_connections=200: 250 connections; the 50 over the limit are closed at once, the
    stats socket counts them (conn_rejected), the first 200 are served.
(b) workers=2: OVERLOAD_CONNECTIONS (default 2000) slow-drip connections (a frame header announcing a
    body, then one byte a second) and as many idle ones, while 4 MB uploads in 32 KiB chunks run: the
    uploads complete byte-identical; slow ones are cut at frame_timeout (3 s), idle ones at idle_timeout
    (5 s). The chunk round-trip p99 without and with that load is printed, not asserted (speed is
    measured, not asserted).
(c) workers=1, output_cap=262144: a client pipelining 1003 chunks and one pipelining 1033 requests, both
    never reading (200 MB worth each): the worker's RSS grows by less than 64 MB, another client's 1001
    and a small upload still work.
"""
import base64
import json
import os
import random
import resource
import select
import socket
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

if os.environ.get("RESOURCED_SANITIZED"):
    # ASan keeps freed memory in a quarantine (256 MB by default) that would show up as RSS growth in (c);
    # a small one keeps the measurement about the daemon's own buffers.
    os.environ["ASAN_OPTIONS"] = ":".join(x for x in (os.environ.get("ASAN_OPTIONS", ""), "quarantine_size_mb=16") if x)

tap = h.Tap(deadline=235)

CH = 32 * 1024
MB = 1024 * 1024
USERS = {7001: "tok-7001-overload", 7002: "tok-7002-overload", 7003: "tok-7003-overload"}
FRAME_TIMEOUT = 3
IDLE_TIMEOUT = 5
OUTPUT_CAP = 262144
RSS_LIMIT = 64 * MB
rand = random.Random(20261125)
T0 = time.monotonic()

# ---------------------------------------------------------------- file descriptors
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if hard != resource.RLIM_INFINITY and soft < hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))   # the daemon inherits it
nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
N_WANTED = int(os.environ.get("OVERLOAD_CONNECTIONS", "2000"))
# This process holds 2N sockets; each of the 2 workers about N of them.
N = N_WANTED if nofile == resource.RLIM_INFINITY else min(N_WANTED, (nofile - 300) // 2)
tap.diag("RLIMIT_NOFILE %s; %d slow-drip + %d idle connections%s" % (
    nofile, N, N, "" if N == N_WANTED else " (%d wanted: not enough file descriptors)" % N_WANTED))


def rbytes(n):
    return rand.randbytes(n)


# ---------------------------------------------------------------- servers
redis = h.RedisServer().start()
for uid, tok in USERS.items():
    redis.set_token(uid, tok)


def new_daemon(workers, server):
    d = h.Daemon(workers=workers, redis=redis, settings={"server": server}, stats=True)
    d.start()
    if not d.wait_redis_connected(15) or not d.wait_workers(10):
        raise RuntimeError("workers and storage did not all come up\n" + d.log_tail())
    return d




def check_published(d, up, what):
    path = h.published(d, up.uid, up.name)
    try:
        good = h.read_file(path) == up.data and h.file_md5(path) == up.md5
    except OSError as e:
        return tap.ok(False, "%s: published byte-identical" % what, repr(e))
    return tap.ok(good, "%s: published byte-identical (%d bytes)" % (what, len(up.data)))


def vm_rss(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS for %d" % pid)


def percentile(values, p):
    v = sorted(values)
    if not v:
        return float("nan")
    k = min(len(v) - 1, max(0, int(round(p / 100.0 * len(v) + 0.5)) - 1))
    return v[k]


def timed_upload(d, up):
    """Uploads up one chunk at a time on one connection; returns (last response, [round trips in s])."""
    rtts = []
    with h.Client(d.port, timeout=30) as c:
        off, seq = 0, 1
        while True:
            t = time.perf_counter()
            r = up.send_chunk(c, off, seq, timeout=30)
            rtts.append(time.perf_counter() - t)
            if r.get("error") != 0 or up.next_offset(off) >= len(up.data):
                return r, rtts
            off, seq = up.next_offset(off), seq + 1


# ---------------------------------------------------------------- (a) max_connections
with tap.section("(a) max_connections"):
    A = new_daemon(1, {"max_connections": 200, "idle_timeout": 120})
    tap.context.append(lambda: A.log_tail(10))
    h.wait_for(lambda: h.stats_info(A).get("conn_current") == 0, 5)   # the start-up ping has gone
    before = h.stats_info(A).get("conn_rejected", 0)
    conns = []
    t0 = time.monotonic()
    for i in range(250):
        conns.append(h.Client(A.port, timeout=10))
    t_open = time.monotonic() - t0
    excess = conns[200:]
    t0 = time.monotonic()
    closed = [c.wait_closed(5) for c in excess]
    t_closed = time.monotonic() - t0
    tap.ok(all(closed), "(a): the 50 connections over max_connections=200 are closed at once (EOF; %.2f s for all)"
           % t_closed, "%d of 50 still open after 5 s each" % closed.count(False))
    answers = 0
    for i, c in enumerate(conns[:200]):
        try:
            r = c.request(h.MSG_TEST, {"data": "conn-%d" % i}, timeout=10)
            answers += r.get("error") == 0 and r.get("data") == "conn-%d" % i
        except (OSError, h.ProtocolError):
            pass
    tap.eq(answers, 200, "(a): the first 200 connections still answer 1001")
    info = h.stats_info(A)
    tap.ok(info.get("conn_rejected", 0) - before >= 50,
           "(a): resctl stats show info json: conn_rejected >= 50 (%r)" % info.get("conn_rejected"),
           json.dumps(info)[:500])
    tap.eq(info.get("conn_current"), 200, "(a): conn_current is 200")
    for c in conns:
        c.close()
    tap.ok(h.wait_for(lambda: h.stats_info(A).get("conn_current") == 0, 10), "(a): the 200 closed connections are let go")
    tap.ok(A.ping(), "(a): a new connection is served once there is room again")
    tap.diag("(a): opening 250 connections took %.2f s" % t_open)
    rc, left = A.stop()
    tap.ok(rc == 0 and not left, "(a): daemon stops cleanly", "exit %r, left %r" % (rc, left))
    tap.context.pop()


# ---------------------------------------------------------------- (b) slow-drip and idle connections
class Load:
    """n_slow slow-drip and n_idle idle connections; one thread drips and notices when the server closes them."""

    def __init__(self, port, n_slow, n_idle):
        self.port = port
        self.n_slow, self.n_idle = n_slow, n_idle
        self.socks = {}          # fd -> [socket, kind, t_start, t_closed]
        self.unexpected = []     # (kind, data) the server should never send
        self.open_errors = []
        self.ep = select.epoll()
        self.stop = False
        self.lock = threading.Lock()
        self.thread = None

    def open(self):
        """Opens the connections, alternating kinds; a slow one sends a header announcing 1000 bytes and 1 byte."""
        header = h.HEADER.pack(h.MSG_TEST, 1000)
        m = min(self.n_slow, self.n_idle)
        kinds = ["slow", "idle"] * m + ["slow"] * (self.n_slow - m) + ["idle"] * (self.n_idle - m)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        for kind in kinds:
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                if kind == "slow":
                    s.sendall(header + b"{")
                s.setblocking(False)
            except OSError as e:
                self.open_errors.append(repr(e))
                continue
            with self.lock:
                self.socks[s.fileno()] = [s, kind, time.monotonic(), None]
            self.ep.register(s.fileno(), select.EPOLLIN | select.EPOLLRDHUP)

    def closed(self, fd, when):
        with self.lock:
            e = self.socks.get(fd)
            if e is None or e[3] is not None:
                return
            e[3] = when
        try:
            self.ep.unregister(fd)
        except OSError:
            pass
        e[0].close()

    def run(self):
        next_drip = time.monotonic() + 1.0
        while not self.stop:
            for fd, ev in self.ep.poll(0.1):
                now = time.monotonic()
                with self.lock:
                    e = self.socks.get(fd)
                if e is None or e[3] is not None:
                    continue
                try:
                    data = e[0].recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    self.unexpected.append((e[1], data[:100]))
                else:
                    self.closed(fd, now)
            if time.monotonic() >= next_drip:
                next_drip += 1.0
                with self.lock:
                    slow = [(fd, e[0]) for fd, e in self.socks.items() if e[1] == "slow" and e[3] is None]
                for fd, s in slow:
                    try:
                        s.send(b" ")
                    except BlockingIOError:
                        pass
                    except OSError:
                        self.closed(fd, time.monotonic())

    def open_count(self, kind=None):
        with self.lock:
            return sum(1 for e in self.socks.values() if e[3] is None and (kind is None or e[1] == kind))

    def lifetimes(self, kind):
        with self.lock:
            return [e[3] - e[2] for e in self.socks.values() if e[1] == kind and e[3] is not None]

    def shutdown(self):
        self.stop = True
        if self.thread:
            self.thread.join(5)
        with self.lock:
            for e in self.socks.values():
                if e[3] is None:
                    e[0].close()
        self.ep.close()


with tap.section("(b) slow-drip and idle connections"):
    B = new_daemon(2, {"max_connections": 100000, "frame_timeout": FRAME_TIMEOUT, "idle_timeout": IDLE_TIMEOUT,
                       "storage_timeout": 10})
    tap.context.append(lambda: B.log_tail(10))
    workers_before = sorted(B.worker_pids())
    # Unloaded first.
    unloaded = []
    for i in range(2):
        up = h.Upload(rbytes(4 * MB), "quiet-%d.bin" % i, 7001, USERS[7001], chunk_size=CH)
        r, rtts = timed_upload(B, up)
        tap.ok(r.get("error") == 0 and r.get("trans_size") == len(up.data),
               "(b): unloaded 4 MB upload %d completes" % i, repr(r))
        check_published(B, up, "(b): unloaded upload %d" % i)
        unloaded += rtts
    # Then under load.
    load = Load(B.port, N, N)
    t0 = time.monotonic()
    load.open()
    t_open = time.monotonic() - t0
    tap.ok(not load.open_errors, "(b): %d + %d connections opened (%.1f s)" % (N, N, t_open),
           "%d failed, e.g. %s" % (len(load.open_errors), load.open_errors[:3]))
    open_now = load.open_count()
    loaded, n_loaded = [], 0
    # Uploads one after the other until the server has closed every load connection (at most 40).
    while n_loaded < 40 and (n_loaded == 0 or load.open_count() > 0):
        up = h.Upload(rbytes(4 * MB), "loaded-%d.bin" % n_loaded, 7002, USERS[7002], chunk_size=CH)
        open_before = load.open_count()
        r, rtts = timed_upload(B, up)
        tap.ok(r.get("error") == 0 and r.get("trans_size") == len(up.data),
               "(b): 4 MB upload %d under load completes (%d load connections open when it started)"
               % (n_loaded, open_before), repr(r))
        check_published(B, up, "(b): loaded upload %d" % n_loaded)
        loaded += rtts
        n_loaded += 1
    slow_gone = h.wait_for(lambda: load.open_count("slow") == 0, FRAME_TIMEOUT + 60, 0.1)
    tap.ok(slow_gone, "(b): all %d slow-drip connections are closed by the server" % N,
           "%d still open" % load.open_count("slow"))
    idle_gone = h.wait_for(lambda: load.open_count("idle") == 0, IDLE_TIMEOUT + 60, 0.1)
    tap.ok(idle_gone, "(b): all %d idle connections are closed by the server" % N,
           "%d still open" % load.open_count("idle"))
    slow_t, idle_t = load.lifetimes("slow"), load.lifetimes("idle")
    # Never before their timeout (0.5 s of slack for the server's cached loop time).
    early_slow = [t for t in slow_t if t < FRAME_TIMEOUT - 0.5]
    early_idle = [t for t in idle_t if t < IDLE_TIMEOUT - 0.5]
    tap.ok(not early_slow, "(b): no slow-drip connection is cut before frame_timeout (%d s)" % FRAME_TIMEOUT,
           "%d cut early, e.g. after %r s" % (len(early_slow), sorted(early_slow)[:5]))
    tap.ok(not early_idle, "(b): no idle connection is cut before idle_timeout (%d s)" % IDLE_TIMEOUT,
           "%d cut early, e.g. after %r s" % (len(early_idle), sorted(early_idle)[:5]))
    cut = B.log_count("frame not completed within %d s" % FRAME_TIMEOUT)
    tap.ok(cut >= N, "(b): the slow-drip ones were cut by frame_timeout, not idle_timeout (%d log lines)" % cut)
    tap.ok(not load.unexpected, "(b): the server sent nothing to the slow and idle connections",
           repr(load.unexpected[:3]))
    load.shutdown()
    tap.ok(h.wait_for(lambda: h.stats_info(B).get("conn_current") == 0, 10), "(b): conn_current back to 0",
           repr(h.stats_info(B).get("conn_current")))
    tap.eq(sorted(B.worker_pids()), workers_before, "(b): the same workers run (none crashed)")
    tap.ok(B.ping(), "(b): 1001 answered afterwards")
    p_un, p_lo = percentile(unloaded, 99), percentile(loaded, 99)
    tap.diag("(b): slow-drip closed after %.1f-%.1f s, idle after %.1f-%.1f s (frame_timeout %d, idle_timeout %d)"
             % (min(slow_t or [0]), max(slow_t or [0]), min(idle_t or [0]), max(idle_t or [0]),
                FRAME_TIMEOUT, IDLE_TIMEOUT))
    tap.diag("(b): chunk round trip p50 unloaded %.2f ms, loaded %.2f ms (%d and %d chunks, %d uploads under load, "
             "%d connections open at the first)" % (1e3 * percentile(unloaded, 50), 1e3 * percentile(loaded, 50),
                                                   len(unloaded), len(loaded), n_loaded, open_now))
    tap.diag("(b): chunk round trip p99 unloaded %.2f ms, loaded %.2f ms, ratio %.2f"
             % (1e3 * p_un, 1e3 * p_lo, p_lo / p_un if p_un else float("nan")))
    rc, left = B.stop()
    tap.ok(rc == 0 and not left, "(b): daemon stops cleanly", "exit %r, left %r" % (rc, left))
    tap.context.pop()


# ---------------------------------------------------------------- (c) clients that never read
class NonReader:
    """Pipelines frames from make(i) without ever reading, with a small receive buffer, until `total` request
    bytes (or `count` frames) are out or the socket stays blocked for `stall` seconds."""

    def __init__(self, port, make, count, stall=3.0):
        self.s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.s.connect(("127.0.0.1", port))
        self.s.setblocking(False)
        self.make, self.count, self.stall = make, count, stall
        self.frames = 0          # frames sent whole
        self.bytes = 0
        self.blocked = False
        self.error = None
        self.done = threading.Event()

    def run(self):
        try:
            pending = b""
            last_progress = time.monotonic()
            while True:
                if not pending:
                    if self.frames >= self.count:
                        break
                    pending = self.make(self.frames)
                try:
                    n = self.s.send(pending)
                except BlockingIOError:
                    n = 0
                if n:
                    self.bytes += n
                    pending = pending[n:]
                    if not pending:
                        self.frames += 1
                    last_progress = time.monotonic()
                    continue
                if time.monotonic() - last_progress > self.stall:
                    self.blocked = True
                    break
                select.select([], [self.s], [], 0.2)
        except OSError as e:
            self.error = e
        finally:
            self.done.set()


with tap.section("(c) clients that never read"):
    C = new_daemon(1, {"output_cap": OUTPUT_CAP, "idle_timeout": 120, "storage_timeout": 10})
    tap.context.append(lambda: C.log_tail(10))
    wpid = next(iter(C.worker_pids()))
    spid = C.storage_pid()
    # Warm-up: a file to download, a download, a small upload.
    src = h.Upload(rbytes(2 * MB), "dl-source.bin", 7003, USERS[7003], chunk_size=CH)
    with h.Client(C.port, timeout=30) as c:
        rs = src.run_pipelined(c, window=8)
        tap.ok(rs[-1].get("error") == 0, "(c): a 2 MB file to download is uploaded")
        got, _ = h.download(c, src.name, src.uid, src.token)
        tap.ok(got == src.data, "(c): it downloads back")
    time.sleep(0.5)
    rss0, srss0 = vm_rss(wpid), vm_rss(spid)
    info0 = h.stats_info(C)

    # 200 MB worth of requests each. The uploader's chunks are 2 KiB: its answers (about 180 bytes each) must
    # outgrow what the kernel buffers (a few MB) plus output_cap, or the worker never has to stop reading.
    WORTH = 200 * MB
    UCH = 2048
    n_up = WORTH // UCH
    block = rbytes(UCH)
    blob = base64.b64encode(block).decode()
    fake_md5 = h.md5_hex(b"never completed")

    def up_frame(i):
        body = {"md5": fake_md5, "name": "never-read.bin", "seq": i + 1, "trans_size": (i + 1) * UCH,
                "total_size": WORTH + 1, "last": 0, "data": blob, "last_seq": n_up + 1, "uid": 7001,
                "token": USERS[7001]}
        return h.frame(h.MSG_UPLOAD, body)
    n_dl_chunks = len(src.data) // CH

    def dl_frame(i):
        return h.frame(h.MSG_DOWNLOAD, {"name": src.name, "seq": i % n_dl_chunks + 1, "uid": src.uid,
                                        "token": src.token, "client_path": "/tmp/x", "trans_size": "0",
                                        "total_size": "0"})
    uploader = NonReader(C.port, up_frame, n_up)
    downloader = NonReader(C.port, dl_frame, WORTH // CH)
    peak = [rss0, srss0]
    sampling = [True]

    def sample():
        while sampling[0]:
            try:
                peak[0] = max(peak[0], vm_rss(wpid))
                peak[1] = max(peak[1], vm_rss(spid))
            except (OSError, RuntimeError):
                pass
            time.sleep(0.05)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    ths = [threading.Thread(target=x.run, daemon=True) for x in (uploader, downloader)]
    for t in ths:
        t.start()
    # Meanwhile another client is served.
    during = []
    while not (uploader.done.is_set() and downloader.done.is_set()) and time.monotonic() - t0 < 90:
        try:
            during.append(h.wait_for(C.ping, 5, 0.1))
        except Exception:
            during.append(False)
        time.sleep(0.5)
    for t in ths:
        t.join(5)
    t_send = time.monotonic() - t0
    tap.ok(uploader.error is None and downloader.error is None,
           "(c): the non-reading clients stay connected while they push", "%r %r" % (uploader.error, downloader.error))
    tap.ok(all(during), "(c): another client's 1001 is answered all the while (%d pings)" % len(during))
    ok_small = False
    small = h.Upload(rbytes(5 * CH + 7), "small-meanwhile.bin", 7002, USERS[7002], chunk_size=CH)
    try:
        with h.Client(C.port, timeout=30) as c:
            tap.eq(c.request(h.MSG_TEST, {"data": "still here"}, timeout=10).get("data"), "still here",
                   "(c): 1001 with both non-readers stuck")
            r, _, _ = small.run(c, timeout=30)
            ok_small = r.get("error") == 0
    except (OSError, h.ProtocolError) as e:
        r = repr(e)
    tap.ok(ok_small, "(c): a small upload completes with both non-readers stuck", repr(r))
    if ok_small:
        check_published(C, small, "(c): small upload")
    time.sleep(0.5)
    rss1, srss1 = vm_rss(wpid), vm_rss(spid)
    sampling[0] = False
    sampler.join(2)
    peak[0], peak[1] = max(peak[0], rss1), max(peak[1], srss1)
    info1 = h.stats_info(C)
    served_dl = info1.get("download_bytes", 0) - info0.get("download_bytes", 0)
    stored_up = info1.get("upload_bytes", 0) - info0.get("upload_bytes", 0) - len(small.data)
    growth = peak[0] - rss0
    tap.ok(growth < RSS_LIMIT, "(c): the worker's RSS grows by less than %d MB (%.1f MB: %.1f -> peak %.1f MB)"
           % (RSS_LIMIT // MB, growth / MB, rss0 / MB, peak[0] / MB))
    tap.ok(served_dl < WORTH // 2,
           "(c): the worker stopped reading the non-reading downloader (%.1f MB of %d MB requested were read out)"
           % (served_dl / MB, WORTH // MB))
    tap.ok(uploader.blocked and stored_up < WORTH,
           "(c): the worker stopped reading the non-reading uploader (%.1f MB of %d MB stored, the client blocked)"
           % (stored_up / MB, WORTH // MB))
    tap.diag("(c): uploader pushed %.1f MB (%d whole 1003 frames, %s), storage stored %.1f MB of it"
             % (uploader.bytes / MB, uploader.frames, "blocked" if uploader.blocked else "not blocked", stored_up / MB))
    tap.diag("(c): downloader pushed %d 1033 requests (%.1f MB worth of chunks, %s), %.1f MB served"
             % (downloader.frames, downloader.frames * CH / MB, "blocked" if downloader.blocked else "not blocked",
                served_dl / MB))
    tap.diag("(c): worker VmRSS %.1f MB before, %.1f MB peak, %.1f MB after; storage %.1f -> peak %.1f MB; "
             "%.1f s of pushing" % (rss0 / MB, peak[0] / MB, rss1 / MB, srss0 / MB, peak[1] / MB, t_send))
    uploader.s.close()
    downloader.s.close()
    tap.ok(h.wait_for(lambda: h.stats_info(C).get("conn_current") == 0, 10), "(c): both are let go once closed",
           repr(h.stats_info(C).get("conn_current")))
    tap.ok(C.ping() and C.storage_pid() == spid and wpid in C.worker_pids(),
           "(c): the same worker and storage process serve on", repr(C.processes()))
    tap.diag("(c): worker VmRSS %.1f MB once they are gone" % (vm_rss(wpid) / MB))
    rc, left = C.stop()
    tap.ok(rc == 0 and not left, "(c): daemon stops cleanly", "exit %r, left %r" % (rc, left))
    tap.context.pop()

tap.diag("test_overload.py total %.1f s" % (time.monotonic() - T0))
tap.finish()

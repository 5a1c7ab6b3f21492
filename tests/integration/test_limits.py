# test_limits.py: one user cannot starve the others: limits on uploads in progress, free space against what uploads announce, accept loops under a low file limit (issue 12, item 1).
"""Sections:
- per user: one uid starting many seq-1 uploads with distinct md5 hits max_uploads_per_user (1035, nothing
  started) while another user's upload completes byte-identical; finishing one makes room.
- per node: max_uploads over several users (1036); stats count the refusals and the uploads in progress.
- free space: chunk 1 is refused with 1028 when the bytes still to come of the uploads in progress plus its
  total_size plus min_free_space exceed the free space, or when a uid's uploads in progress besides its first
  would announce more than half of the room above min_free_space.
- descriptors: the storage process, the master (stats socket, agent listener) and a worker run out of file
  descriptors (RLIMIT_NOFILE lowered with prlimit, then connections held open); none of them spins (CPU
  time stays low), and after a HUP the new workers link to storage once descriptors are free again.
- output_budget: clients that pipeline 1001 echoes and never read; the first is read until output_cap of
  answers pass output_budget, the next until 64 KiB; once they close, past the budget again.
- input_budget: clients that stop one byte short of 1 MiB frames; two are admitted whole, the others are
  not read past their first reads, and every one is answered in turn once it finishes; input_held is 0 after.
  Two connections whose next frame was read ahead behind a request waiting for storage (the storage
  process stopped) each hold room and need more for that frame: they do not wait for each other. Binary
  uploads on the copy path (link_ring = 0) give their 2 MiB buffers back once their chunks are answered."""
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import time

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=220)
rand = __import__("random").Random(1201)
USERS = {uid: "tok-limits-%d" % uid for uid in range(4201, 4210)}
A, B = 4201, 4202
PER_USER, TOTAL = 5, 8

redis = h.RedisServer().start()
for uid, tok in USERS.items():
    redis.set_token(uid, tok)


def new_daemon(storage=None, server=None, workers=2):
    d = h.Daemon(workers=workers, redis=redis, settings={
        "server": dict({"storage_timeout": 10}, **(server or {})),
        "storage": dict({"max_uploads_per_user": PER_USER, "max_uploads": TOTAL, "upload_ttl": 600},
                        **(storage or {})),
    }, stats=True)
    d.start()
    if not (d.wait_redis_connected(15) and d.wait_workers(10)):
        raise RuntimeError("daemon not ready\n" + d.log_tail())
    return d


def upload(uid, size=3000, chunk=1000, name=None):
    return h.Upload(rand.randbytes(size), name or "f-%d.bin" % rand.randrange(1 << 30), uid, USERS[uid],
                    chunk_size=chunk)


def staging(d, up):
    st = os.path.join(d.root, ".staging")
    return [n for n in os.listdir(st) if up.md5 in n] if os.path.isdir(st) else []


def info(d):
    return h.stats_info(d)


def counter(d, name):
    i = info(d)
    for k in (name,):
        if k in i:
            return i[k]
        for v in i.values():
            if isinstance(v, dict) and k in v:
                return v[k]
    return None


try:
    d = new_daemon()
except Exception as e:
    tap.ok(False, "daemon starts", str(e))
    tap.finish()
tap.context.append(lambda: d.log_tail(10))
tap.ok(True, "daemon started with max_uploads_per_user %d, max_uploads %d" % (PER_USER, TOTAL))


# ---------------------------------------------------------------- per user
with tap.section("per user"):
    mine = [upload(A) for _ in range(PER_USER)]
    with h.Client(d.port) as c:
        rs = [u.send_chunk(c, 0, 1) for u in mine]
    tap.ok(all(r.get("error") == 0 for r in rs), "uid %d starts %d uploads (chunk 1 each)" % (A, PER_USER),
           repr([r.get("error") for r in rs]))
    extra = [upload(A) for _ in range(20)]
    with h.Client(d.port) as c:
        rs = [u.send_chunk(c, 0, 1) for u in extra]
        syncs = [u.sync(c) for u in extra]
    tap.ok(all(r.get("error") == 1035 and "too many uploads" in r.get("message", "") for r in rs),
           "20 more with distinct md5: each 1035 with a message", repr({r.get("error") for r in rs}))
    tap.ok(all(s.get("error") == 1012 for s in syncs) and not any(staging(d, u) for u in extra),
           "... and none of them started: sync 1012, no staging files")
    other = upload(B, size=200000, chunk=16384)
    with h.Client(d.port) as c:
        r, _, _ = other.run(c)
    tap.ok(r.get("error") == 0 and h.read_file(h.published(d, B, other.name)) == other.data,
           "meanwhile uid %d uploads 200 KB in 13 chunks, published byte-identical" % B, repr(r))
    with h.Client(d.port) as c:
        r, _, _ = mine[0].run(c, 1000, 2)
        tap.eq(r.get("error"), 0, "uid %d finishes one of its uploads" % A)
        r = extra[0].send_chunk(c, 0, 1)
        tap.eq(r.get("error"), 0, "... and may start another")
        r = mine[1].send_chunk(c, 0, 1)
        tap.eq(r.get("error"), 0, "chunk 1 of an upload in progress (a restart) is not refused at the limit")
        r = extra[1].send_chunk(c, 0, 1)
        tap.eq(r.get("error"), 1035, "the sixth is refused again")


# ---------------------------------------------------------------- per node
with tap.section("per node"):
    # A has 5 in progress, B none; 3 more from other users reach TOTAL = 8.
    others = [upload(4203 + i) for i in range(TOTAL - PER_USER)]
    with h.Client(d.port) as c:
        rs = [u.send_chunk(c, 0, 1) for u in others]
        tap.ok(all(r.get("error") == 0 for r in rs), "3 more users start one upload each: %d in progress" % TOTAL,
               repr([r.get("error") for r in rs]))
        late = upload(4208)
        r = late.send_chunk(c, 0, 1)
        tap.ok(r.get("error") == 1036 and "too many uploads" in r.get("message", ""),
               "a user with no upload in progress gets 1036 at the node's limit", repr(r))
        tap.eq(late.sync(c).get("error"), 1012, "... nothing started")
        r, _, _ = others[0].run(c, 1000, 2)
        tap.eq(r.get("error"), 0, "one upload completes")
        r, _, _ = late.run(c)
        tap.ok(r.get("error") == 0 and h.read_file(h.published(d, 4208, late.name)) == late.data,
               "then the late user's upload goes through, byte-identical")
    i = info(d)
    flat = json.dumps(i)
    tap.ok(counter(d, "uploads_in_progress") == TOTAL - 1, "stats: uploads_in_progress %d" % (TOTAL - 1), flat[:600])
    refused = counter(d, "uploads_refused")
    tap.ok(refused is not None and refused >= 22, "stats: uploads_refused counts the 1035 and 1036 answers (%r)"
           % refused)
    metrics = subprocess.run([h.RESCTL_BIN, "stats", "--socket", d.stats_socket, "show", "metrics"],
                             stdout=subprocess.PIPE, timeout=20, text=True).stdout
    tap.ok('resourced_responses_error_total{code="1035"}' in metrics and
           'resourced_responses_error_total{code="1036"}' in metrics,
           "metrics count responses 1035 and 1036 by code")
d.stop()


# ---------------------------------------------------------------- free space
with tap.section("free space"):
    probe = h.temp_dir("space")
    sv = os.statvfs(probe)
    free = sv.f_bavail * sv.f_frsize
    MB = 1 << 20
    # min_free_space leaves 1 GB for uploads in progress to announce (margins of 200 MB or more below, as
    # other programs on this machine may write or delete meanwhile).
    s = new_daemon(storage={"min_free_space": max(0, free - 1024 * MB), "max_uploads": 100,
                            "max_uploads_per_user": 100})
    with h.Client(s.port) as c:
        def announce(up, total):
            body = up.body(0, 1)
            body["total_size"] = total
            body["last"] = 0
            return c.request(h.MSG_UPLOAD, body)
        r1 = announce(upload(A), 600 * MB)
        r2 = announce(upload(B), 600 * MB)
        r3 = announce(upload(B), 100 * MB)
        tap.ok(r1.get("error") == 0, "an upload announcing 600 MB starts (1 GB above min_free_space)", repr(r1))
        tap.ok(r2.get("error") == 1028 and "storage full" in r2.get("message", ""),
               "a second announcing 600 MB gets 1028: 1.2 GB would not fit", repr(r2))
        tap.ok(r3.get("error") == 0, "one announcing 100 MB fits and starts", repr(r3))
        # A holds 600 MB announced; 200 MB more would fit the node (900 MB of 1 GB) but not half of it for
        # one user: a user cannot refuse everyone else's uploads with announced sizes alone.
        r4 = announce(upload(A), 200 * MB)
        tap.ok(r4.get("error") == 1028 and "for this user" in r4.get("message", ""),
               "a user's second upload past half the room above min_free_space gets 1028", repr(r4))
        r5 = announce(upload(B), 100 * MB)
        tap.ok(r5.get("error") == 0, "and another user's upload still starts", repr(r5))
        r = announce(upload(B), 1 << 40)
        tap.eq(r.get("error"), 1025, "1 TiB is over max_file_size first (1025)")
    s.stop()


# ---------------------------------------------------------------- out of file descriptors
def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_over(pid, seconds):
    t0 = cpu_seconds(pid)
    time.sleep(seconds)   # measuring CPU use over an interval: nothing to wait for
    return cpu_seconds(pid) - t0


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def clamp_nofile(pid, room):
    """Lowers the soft RLIMIT_NOFILE of pid to its open descriptors + room; returns (limit, old limits)."""
    n = fd_count(pid) + room
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (n, old[1]))
    return n, old


with tap.section("descriptors"):
    agent_port = h.free_port()
    e = new_daemon(server={"agent_listen": "127.0.0.1:%d" % agent_port, "max_connections": 10000}, workers=1)
    tap.context.append(lambda: e.log_tail(10))
    held = []

    def hold(make, n):
        for _ in range(n):
            try:
                held.append(make())
            except OSError:
                break

    def unix(path):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(path)
        return s

    storage_pid = e.storage_pid()
    limit, storage_old = clamp_nofile(storage_pid, 8)
    hold(lambda: unix(os.path.join(e.run_dir, "storage.sock")), limit + 40)
    tap.ok(h.wait_for(lambda: e.log_count("accept4() on the storage socket failed") > 0, 10),
           "the storage process runs out of descriptors (limit %d) and says it pauses accepts" % limit)
    used = cpu_over(storage_pid, 2.0)
    tap.ok(used < 0.5, "... and does not spin: %.2f s of CPU in 2 s" % used)

    master = e.master_pid
    mlimit, master_old = clamp_nofile(master, 8)
    nstorage = len(held)
    hold(lambda: unix(e.stats_socket), mlimit + 40)
    tap.ok(h.wait_for(lambda: e.log_count("accept4() on the stats socket failed") > 0, 10),
           "the master runs out of descriptors on the stats socket (limit %d) and pauses it" % mlimit)
    try:
        socket.create_connection(("127.0.0.1", agent_port), timeout=2).close()
    except OSError:
        pass
    tap.ok(h.wait_for(lambda: e.log_count("accept4() on the agent listener failed") > 0, 10),
           "... the agent listener as well")
    used = cpu_over(master, 2.0)
    tap.ok(used < 0.5, "... and the master does not spin: %.2f s of CPU in 2 s" % used)

    worker = list(e.worker_pids())[0]
    wlimit, _ = clamp_nofile(worker, 8)
    nmaster = len(held)
    hold(lambda: socket.create_connection(("127.0.0.1", e.port), timeout=2), wlimit + 40)
    tap.ok(h.wait_for(lambda: e.log_count("accept4() failed: pausing accepts") > 0, 10),
           "the worker runs out of descriptors (limit %d) and pauses accepts" % wlimit)
    used = cpu_over(worker, 2.0)
    tap.ok(used < 0.5, "... and does not spin: %.2f s of CPU in 2 s" % used)

    # Free the master and the worker, keep storage exhausted, reload: new workers cannot link yet.
    for s_ in held[nstorage:]:
        s_.close()
    del held[nstorage:]
    resource.prlimit(master, resource.RLIMIT_NOFILE, master_old)
    old_workers = set(e.worker_pids())
    e.send_signal(signal.SIGHUP)
    tap.ok(h.wait_for(lambda: set(e.worker_pids()) - old_workers, 15), "HUP: a new worker is started",
           e.log_tail(8))
    used = cpu_over(storage_pid, 1.0)
    tap.ok(used < 0.3, "storage still out of descriptors with a new worker knocking: %.2f s of CPU in 1 s" % used)
    for s_ in held:
        s_.close()
    held.clear()
    up = upload(A, size=50000, chunk=16384)

    def uploaded():
        try:
            with h.Client(e.port, timeout=5) as c:
                r, _, _ = up.run(c)
            return r.get("error") == 0
        except Exception:
            return False
    tap.ok(h.wait_for(uploaded, 20, 0.3), "once descriptors are free the new worker links to storage and an "
           "upload goes through", e.log_tail(8))
    tap.ok(h.read_file(h.published(e, A, up.name)) == up.data, "... byte-identical")
    tap.ok(e.proc.poll() is None and e.storage_pid() == storage_pid, "no process died (same storage process)")
    e.stop()


# ---------------------------------------------------------------- output_budget
# Clients that send requests and never read their answers: each may make the worker hold output_cap
# of answers, but all of them together only output_budget; past it, a connection is read no more once
# 64 KiB of its answers wait. Seen from outside as how many bytes of requests the worker took from a
# connection before it stopped reading it (what it sent, less what waits in the kernel's queues).
def tcp_queues(local_port, remote_port):
    """(tx_queue, rx_queue) of the loopback socket local_port -> remote_port, from /proc/net/tcp."""
    want = ("0100007F:%04X" % local_port, "0100007F:%04X" % remote_port)
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if (fields[1], fields[2]) == want:
                tx, rx = fields[4].split(":")
                return int(tx, 16), int(rx, 16)
    return 0, 0


def never_reader(port, reply_len):
    """Pipelines 1001 echoes without reading until the daemon stops reading; returns (socket, the bytes of
    answers the worker holds for it): the answers to what it took, less what waits in the kernels."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # answers stay in the daemon, not in our kernel
    s.connect(("127.0.0.1", port))
    s.setblocking(False)
    request = h.frame(h.MSG_TEST, {"data": "p" * 2000})
    blob = request * 6000   # about 12 MB of requests
    sent = 0
    deadline = time.monotonic() + 30
    while sent < len(blob) and time.monotonic() < deadline:
        try:
            sent += s.send(blob[sent:])
        except BlockingIOError:
            if not __import__("select").select([], [s], [], 2.5)[1]:
                break   # not writable for 2.5 s: the daemon stopped reading (a loaded one may pause)
    mine = s.getsockname()[1]
    client_tx, client_rx = tcp_queues(mine, port)
    server_tx, server_rx = tcp_queues(port, mine)
    answered = (sent - client_tx - server_rx) // len(request)   # the read-ahead (< one frame) aside
    return s, answered * reply_len - server_tx - client_rx


def never_reader_after(port, reply_len):
    s, held = never_reader(port, reply_len)
    s.close()
    return held


with tap.section("output_budget: clients that never read"):
    # output_cap (4 MiB) above output_budget (1 MiB); a small max_frame keeps the read-ahead small.
    ob = new_daemon(server={"output_cap": 4194304, "output_budget": 1048576, "max_frame": 16384}, workers=1)
    with h.Client(ob.port, timeout=10) as c:
        c.send(h.MSG_TEST, {"data": "p" * 2000})
        reply_len = h.HEADER.size + len(c.recv_frame()[1])
    x, held_x = never_reader(ob.port, reply_len)
    y, held_y = never_reader(ob.port, reply_len)
    tap.ok(held_x >= 1000000, "the first never-reading client is read until its answers pass output_budget "
           "(1 MiB): the worker holds %d bytes of answers for it" % held_x)
    tap.ok(held_y < 200000, "with output_budget passed, the next one is read no more once 64 KiB of its answers "
           "wait: %d bytes held" % held_y)
    with h.Client(ob.port, timeout=10) as c:
        tap.eq(c.request(h.MSG_TEST, {"data": "still here"}).get("data"), "still here",
               "a client that reads is still answered")
    x.close()
    y.close()
    tap.ok(h.wait_for(lambda: never_reader_after(ob.port, reply_len) >= 1000000, 30, 0.5),
           "once they are gone, their answers leave the budget: a new never-reading client is read past 1 MB again")
    tap.ok(ob.proc.poll() is None, "the daemon is still running")
    ob.stop()


# ---------------------------------------------------------------- input_budget
# Clients that stop one byte short of a large frame: without a bound each made its worker hold the
# frame's buffer (max_frame here, about 1 MiB per binary fast-path connection), max_connections
# times. A large frame is admitted whole from input_budget before its body is read; the others wait
# unread, their bytes in the kernel, and go on, oldest first, as room comes back.
class Staller:
    """A client that sends a large frame but its last byte."""
    def __init__(self, port, whole):
        self.port, self.whole, self.sent = port, whole, 0
        self.sock = socket.socket()
        self.sock.connect(("127.0.0.1", port))
        self.sock.setblocking(False)
        deadline = time.monotonic() + 2
        while self.sent < len(whole) - 1 and time.monotonic() < deadline:   # as far as the kernels take it
            try:
                self.sent += self.sock.send(whole[self.sent:len(whole) - 1])
            except BlockingIOError:
                __import__("select").select([], [self.sock], [], 0.2)

    def taken(self):
        """Bytes the worker read: what was sent, less what waits in the two sockets' queues."""
        mine = self.sock.getsockname()[1]
        return self.sent - tcp_queues(mine, self.port)[0] - tcp_queues(self.port, mine)[1]

    def finish(self, timeout):
        """Sends the rest and returns the answer's data."""
        self.sock.setblocking(True)
        self.sock.settimeout(timeout)
        self.sock.sendall(self.whole[self.sent:])
        c = h.Client.__new__(h.Client)
        c.sock, c.buf = self.sock, b""
        return c.recv_json(h.MSG_TEST + 1, timeout).get("data", "")


with tap.section("input_budget: clients that stop one byte short of a large frame"):
    BIG = 1 << 20   # a body of 1 MiB takes a 2 MiB buffer
    STALLERS = 10
    ib = new_daemon(server={"max_frame": 2 * BIG, "input_budget": 4 * BIG}, workers=1)
    tap.context.append(lambda: ib.log_tail(8))
    waits_before = counter(ib, "input_waits") or 0
    stallers = [Staller(ib.port, h.frame(h.MSG_TEST, {"data": "%02d" % i + "s" * BIG})) for i in range(STALLERS)]
    def settled():
        taken = [st.taken() for st in stallers]
        return taken if sum(t > BIG for t in taken) >= 2 else None
    taken = h.wait_for(settled, 10, 0.2) or [st.taken() for st in stallers]
    tap.eq(sum(t > BIG for t in taken), 2,
           "two stallers' frames fit input_budget (4 MiB of 2 MiB buffers) and are read whole", repr(taken))
    tap.ok(sum(taken) < 2 * (BIG + 1000) + (STALLERS - 2) * 140000,
           "the %d others are not read past their first reads: %d bytes taken in all" % (STALLERS - 2, sum(taken)),
           repr(taken))
    tap.ok((counter(ib, "input_waits") or 0) - waits_before >= STALLERS - 2, "input_waits counts the waiting ones")
    with h.Client(ib.port, timeout=10) as c:
        tap.eq(c.request(h.MSG_TEST, {"data": "small"}).get("data"), "small", "a small request is still served")
    # Every staller finishes its frame: the admitted ones first by nature, the others as room comes back.
    answers = {}
    def finish(i, st):
        try:
            got = st.finish(60)
            answers[i] = got[:2] == "%02d" % i and len(got) == BIG + 2
        except Exception as e:
            answers[i] = repr(e)
    threads = [__import__("threading").Thread(target=finish, args=(i, st)) for i, st in enumerate(stallers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    tap.eq([answers.get(i) for i in range(STALLERS)], [True] * STALLERS,
           "every staller that completes its frame is answered in turn (no frame waits half read)")
    for st in stallers:
        st.sock.close()
    tap.ok(ib.proc.poll() is None, "the daemon is still running")
    tap.ok(h.wait_for(lambda: counter(ib, "input_held") == 0, 10),
           "input_held is back to 0 once every connection is closed", repr(counter(ib, "input_held")))
    ib.stop()

# Room held by waiters: a request that waits for storage lets its client's next frame be read ahead into
# its buffer, which stays counted once the request is done (its start is in it). Two such connections, each
# then needing a larger buffer for that frame, waited for each other's room with their timers held: for ever,
# and every later large frame of the worker behind them.
with tap.section("input_budget: connections that wait while holding room do not wait for each other"):
    BIG = 1 << 20
    ib = new_daemon(server={"max_frame": 2 * BIG, "input_budget": 2 * BIG}, workers=1)   # its log: see above
    storage = ib.storage_pid()
    os.kill(storage, signal.SIGSTOP)   # each first frame's answer waits, the next frame is read behind it
    pairs = []
    try:
        for uid in (A, B):
            up = upload(uid, size=450 << 10, chunk=450 << 10)
            first, second = up.frame(0, 1), h.frame(h.MSG_TEST, {"data": "%d" % uid + "n" * (1200 << 10)})
            st = Staller(ib.port, first + second)   # a 1 MiB buffer, 420 KiB of the second frame fit behind
            pairs.append((st, len(first)))
        behind = h.wait_for(lambda: all(st.taken() > first_len + (256 << 10) for st, first_len in pairs), 10, 0.1)
        tap.ok(behind, "each connection's next frame is read past 256 KiB behind its first",
               repr([st.taken() - first_len for st, first_len in pairs]))
    finally:
        os.kill(storage, signal.SIGCONT)
    answers = {}
    def finish(uid, st):
        try:
            st.sock.setblocking(True)
            st.sock.settimeout(20)
            st.sock.sendall(st.whole[st.sent:])
            c = h.Client.__new__(h.Client)
            c.sock, c.buf = st.sock, b""
            got = [c.recv_json(h.MSG_UPLOAD + 1, 20).get("error"), c.recv_json(h.MSG_TEST + 1, 20).get("data", "")]
            answers[uid] = got[0] == 0 and got[1][:4] == "%d" % uid and len(got[1]) == (1200 << 10) + 4
        except Exception as e:
            answers[uid] = repr(e)
    threads = [__import__("threading").Thread(target=finish, args=(uid, st)) for uid, (st, _) in zip((A, B), pairs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    tap.eq([answers.get(A), answers.get(B)], [True, True],
           "both first frames are answered, then both second frames, which needed 2 MiB buffers each")
    for st, _ in pairs:
        st.sock.close()
    tap.ok(h.wait_for(lambda: counter(ib, "input_held") == 0, 10),
           "input_held is back to 0 once they are closed", repr(counter(ib, "input_held")))
    ib.stop()

# A binary upload whose chunks cross the buffer (link_ring = 0: the copy path) keeps its 2 MiB buffer for the
# next chunk while chunks are in flight. Once they are all answered the connection gave it back only at its
# next frame: idle connections kept it counted until idle_timeout, and large frames of others waited as long.
with tap.section("input_budget: a binary upload's buffer goes back once its chunks are answered"):
    BIG = 1 << 20
    ib = new_daemon(server={"max_frame": 2 * BIG, "input_budget": 4 * BIG, "link_ring": 0}, workers=1)
    idle = []
    for uid in (A, B):
        c = h.Client(ib.port, timeout=20)
        idle.append(c)
        c.request(1041, {"uid": uid, "token": USERS[uid]})
        data, name = rand.randbytes(3 * BIG), ("idle-%d" % uid).encode()
        c.send_raw(h.HEADER.pack(1043, 43 + len(name)) + struct.pack(">QB", len(data), 0) +
                   h.md5_hex(data).encode() + struct.pack(">H", len(name)) + name)
        c.recv_frame(20)
        for off in range(0, len(data), BIG):   # 1 MiB chunks, all sent at once
            last = 1 if off + BIG == len(data) else 0
            c.send_raw(h.HEADER.pack(1045, 16 + BIG) + struct.pack(">QII", off, BIG, last) +
                       data[off:off + BIG])
        acks = [c.recv_frame(20) for _ in range(3)]
        tap.ok(all(mid == 1046 and body[:4] == b"\0\0\0\0" for mid, body in acks),
               "uid %d uploads 3 MiB in 1 MiB chunks on the copy path" % uid)
    tap.ok(h.wait_for(lambda: counter(ib, "input_held") == 0, 5),
           "input_held is 0 while both connections stay open, idle", repr(counter(ib, "input_held")))
    try:
        with h.Client(ib.port, timeout=10) as c:
            got = c.request(h.MSG_TEST, {"data": "l" * (600 << 10)}, 10).get("data", "")
    except (OSError, TimeoutError, h.ConnectionClosed) as e:
        got = repr(e)
    tap.eq(len(got), 600 << 10, "another client's 600 KiB frame is read and answered at once")
    for c in idle:
        c.close()
    ib.stop()


# ---------------------------------------------------------------- per client address
def served(port, source=None, proxy=None):
    """A connection that gets its 1001 answered: the client, else None (closed at once)."""
    c = None
    try:
        c = h.Client(port, timeout=10, source=source)
        if proxy:
            c.send_raw(proxy)
        if c.request(h.MSG_TEST, {"data": "here"}).get("data") == "here":
            return c
    except (OSError, h.ConnectionClosed, TimeoutError):
        pass
    if c:
        c.close()
    return None


def open_up_to(n, port, **kw):
    clients = [served(port, **kw) for _ in range(n)]
    return [c for c in clients if c]


def close_all(clients):
    for c in clients:
        c.close()


with tap.section("max_connections_per_address"):
    LIMIT = 4
    pa = new_daemon(server={"max_connections_per_address": LIMIT})
    one = open_up_to(LIMIT, pa.port)
    tap.eq(len(one), LIMIT, "%d connections from 127.0.0.1 are served (spread over 2 workers)" % LIMIT)
    tap.ok(served(pa.port) is None, "the next one from 127.0.0.1 is closed at once")
    tap.ok(all(c.request(h.MSG_TEST, {"data": "x"}).get("data") == "x" for c in one),
           "the %d already open are still served" % LIMIT)
    two = open_up_to(LIMIT, pa.port, source="127.0.0.2")
    tap.eq(len(two), LIMIT, "another address (127.0.0.2) gets its own %d" % LIMIT)
    tap.ok(pa.log_count("max_connections_per_address") >= 1, "the log names the setting", pa.log_tail(5))
    tap.ok((counter(pa, "conn_rejected") or 0) >= 1, "conn_rejected counts the refusal")
    one.pop().close()
    again = h.wait_for(lambda: served(pa.port), 10, 0.1)
    tap.ok(again is not None, "once one of them closes, 127.0.0.1 is served again")
    if again:
        one.append(again)
    # A worker that dies takes its counts with it (the master stops summing its row, and a new
    # worker in that row starts from zero): kill the one holding most of 127.0.0.1's connections.
    close_all(two)
    def workers():
        out = subprocess.run([h.RESCTL_BIN, "stats", "--socket", pa.stats_socket, "show", "workers", "json"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, timeout=20, text=True).stdout
        rows = json.loads(out)
        rows = rows.get("processes", rows) if isinstance(rows, dict) else rows
        return [r for r in rows if r.get("role") == "worker"]
    held = h.wait_for(lambda: (lambda ws: ws if sum(w["connections"] for w in ws) == LIMIT else None)(workers()), 10)
    victim = max(held or workers(), key=lambda w: w["connections"])
    tap.diag("killing worker %d, which holds %d of 127.0.0.1's %d connections" % (victim["pid"], victim["connections"],
                                                                                LIMIT))
    os.kill(victim["pid"], signal.SIGKILL)
    tap.ok(h.wait_for(lambda: (lambda w: len(w) == 2 and victim["pid"] not in w)(pa.worker_pids()), 15),
           "a new worker replaces the killed one")
    close_all(one)
    fresh = h.wait_for(lambda: (lambda cs: cs if len(cs) == LIMIT else close_all(cs))(open_up_to(LIMIT, pa.port)),
                       15, 0.2)
    tap.ok(fresh is not None, "after a worker was killed holding connections from 127.0.0.1, %d can open again "
           "(its counts went with it)" % LIMIT)
    close_all(fresh or [])
    pa.stop()

    # Behind a load balancer the PROXY header's address counts, an IPv6 one by its /64.
    pp = new_daemon(server={"max_connections_per_address": 2, "proxy_protocol": "on"})
    def hdr(src, v6=False):
        if v6:
            return b"PROXY TCP6 %s ::1 40000 %d\r\n" % (src.encode(), pp.port)
        return b"PROXY TCP4 %s 127.0.0.1 40000 %d\r\n" % (src.encode(), pp.port)
    a = open_up_to(2, pp.port, proxy=hdr("192.0.2.7"))
    tap.eq(len(a), 2, "two connections whose PROXY header says 192.0.2.7 are served")
    tap.ok(served(pp.port, proxy=hdr("192.0.2.7")) is None, "a third from 192.0.2.7 is closed at once")
    b = open_up_to(2, pp.port, proxy=hdr("192.0.2.8"))
    tap.eq(len(b), 2, "192.0.2.8, through the same balancer address, gets its own two")
    six = [served(pp.port, proxy=hdr("2001:db8:0:5::1", True)), served(pp.port, proxy=hdr("2001:db8:0:5::2", True))]
    tap.ok(all(six), "two from one IPv6 /64 (2001:db8:0:5::/64) are served",
           "served: %s; rejected so far: %s; log: %s" % ([c is not None for c in six], counter(pp, "conn_rejected"),
                                                        pp.log_tail(8)))
    tap.ok(served(pp.port, proxy=hdr("2001:db8:0:5:ffff::9", True)) is None,
           "a third address of the same /64 is closed at once")
    other = served(pp.port, proxy=hdr("2001:db8:0:6::1", True))
    tap.ok(other is not None, "an address of the next /64 is served")
    unknown = [served(pp.port, proxy=b"PROXY UNKNOWN\r\n") for _ in range(3)]
    tap.ok(all(unknown), "PROXY UNKNOWN (a balancer's own health check) is never counted: 3 served")
    close_all(a + b + [c for c in six + [other] + unknown if c])
    pp.stop()

tap.finish()

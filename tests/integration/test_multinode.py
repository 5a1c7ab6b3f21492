# test_multinode.py: three resourced nodes with one shared storage root and one Redis behind a real HAProxy: uploads hop across nodes, one writer at a time, nothing silently corrupted.
"""Issue 9, "How it is shown". Every client connection goes through HAProxy (roundrobin, no
stickiness, send-proxy-v2, agent-check) unless a check forces two nodes at once; every file is
compared byte for byte with what is on disk under the shared root. Uploads are driven like the Qt
client: on every new connection it syncs (1005) and goes on at seq = answered seq + 1 from offset
trans_size; 1012 and 1024 make it start over at seq 1; 1027 and storage errors make it reconnect and
sync. "No restart from zero" means the client sent less than 1.5x the file and no sync answered 1012.

What holds with a shared root whatever the lease:
  - an upload on one connection through HAProxy completes byte-identical, and every node serves a
    download of it; HAProxy's checks see every node UP and roundrobin spreads connections;
  - a second instance of any node is refused and HAProxy keeps routing to all three;
  - Redis is found through three sentinels; a failover while uploads run through HAProxy (each on one
    connection) loses nothing, every node follows it, tokens are read from the new master;
  - a node stopped with QUIT: its agent says drain, HAProxy routes to the others.

What needs the upload lease (issue 9 items 1-3; on a build without it these fail, mostly by restarting
from zero because 1005 on another node answers 1012):
  - an upload that disconnects and reconnects five times, hopping across nodes, completes identical,
    no sync answers less than what was acknowledged (beyond the Redis record's documented lag of at
    most two chunks), and the client sends < 1.5x the file;
  - one client whose every 3 chunks go to another node completes identical without a restart;
    a client whose connections go A, B, A (straight to two nodes) never gets a corrupt file published;
  - two clients uploading the same (uid, md5) at once through two nodes (straight, and through HAProxy),
    both honest, or one sending garbage under the honest md5: every file published under <root>/<uid>/
    is the honest data (also when both hop across nodes every 3 chunks through HAProxy), the garbage
    client never gets error 0 on its last chunk unless the intact file
    of that md5 is already published (the answer to a final chunk resent after publication), and the
    honest client finishes identical (the loser may see 1027, 1024 or 1012 and retries);
  - a node frozen (SIGSTOP) past its lease while a client sends garbage through it: another node takes
    the upload over for the honest client; thawed, the frozen node refuses its old client's next chunk
    (fenced), and only the honest data is published;
  - kill -9 of the node serving an upload (master and every child): the client resumes through HAProxy
    on another node within 15 s (the time is printed), without restarting, identical, and neither a
    staging entry of it in <root>/.staging nor its lease in Redis is left;
  - kill -9 of the worker serving an upload: its node gives the lease back as soon as the worker's link
    closes (within lease_ttl, not after lease_ttl * 2 idle), and the client resumes on another node;
  - a node restarted (TERM, then the same configuration again; its upload_ttl is 6 s and its janitor
    runs every second, so that a wrongly adopted upload would be removed while the test watches) while
    uploads run on the two others never removes or adopts them: they complete identical with no error
    answer and their staging entries stay in place;
  - Redis that lost a holding (the lease put back as it was before another node's holding, as a
    replica promoted too early would have it): the node given its old fence back takes one above the
    fence recorded with the entry and goes on, instead of being refused until the lease expires;
  - a Redis master failover through Sentinel while uploads hop across nodes every 3 chunks (half
    before it, a quarter while the nodes switch, the rest after) loses no acknowledged byte (no sync
    answers less than what was acknowledged beyond the record's lag, < 1.5x sent, identical); an
    upload parked on a node before it keeps a free lease (no node takes it on reconnecting) and
    resumes on another node.

[storage] lease_ttl is set to 4 s on every node (RESOURCED_TEST_LEASE_TTL overrides it) when the
binary knows the key (resourced -t), and left out otherwise; [server] storage_timeout is 8 s, so a node waiting for a lease held elsewhere
answers 1027 well within the clients' timeouts. The throughput side of issue 9 (through HAProxy with 1
and 3 nodes against one node directly) is measured, not tested: contrib/bench.sh, its last section.
"""
import os
import signal
import sys
import threading
import time

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=240)

UID, TOKEN = 4301, "multinode-token"
RACE_UIDS = [4310 + i for i in range(6)]   # one per race scenario: everything published there must be honest
NODES = 3
LEASE_TTL = int(os.environ.get("RESOURCED_TEST_LEASE_TTL", "4"))   # 6 is the daemon's default
RESTARTED_UPLOAD_TTL, RESTARTED_JANITOR = 6, 1

if not os.access(h.HAPROXY_BIN, os.X_OK):
    tap.skip("multi-node suite", "%s is not installed (contrib/deps.sh installs haproxy)" % h.HAPROXY_BIN)
    tap.finish()

# One Redis for all nodes, found through three sentinels (a master and a replica).
ss = h.SentinelSet()
try:
    ss.start()
except Exception as e:
    tap.ok(False, "Redis master, replica and three sentinels start", str(e))
    tap.finish()
for uid in [UID] + RACE_UIDS:
    ss.master.set_token(uid, TOKEN)
common = {"redis": {"sentinels": ss.addresses, "master_name": ss.name},
          "server": {"storage_timeout": "8"}}
# node1 is the one restarted while others upload: a short upload_ttl and a janitor every second make
# it act on anything it wrongly adopted while the test still watches.
per_node = [{"storage": {"upload_ttl": str(RESTARTED_UPLOAD_TTL), "janitor_interval": str(RESTARTED_JANITOR)}},
            {}, {}]
cluster = h.Cluster(NODES, redis=ss.master, settings=common, node_settings=per_node, lease_ttl=LEASE_TTL)
if cluster.lease_ttl:
    tap.diag("[storage] lease_ttl = %d on every node" % LEASE_TTL)
else:
    tap.diag("%s does not know [storage] lease_ttl: the nodes run without it" % h.RESOURCED_BIN)
tap.context.append(cluster.diagnostics)
tap.diag("backend: %s" % ("rados, one namespace for the three nodes" if h.uses_rados(cluster.nodes[0]) else "fs, one root"))

rc, out = cluster.haproxy.check()
tap.eq(rc, 0, "haproxy -c accepts the configuration made from contrib/haproxy.cfg", out)
try:
    cluster.start()
except Exception as e:
    tap.ok(False, "three nodes and HAProxy start, every node UP in HAProxy", str(e))
    tap.finish()
tap.ok(True, "three nodes and HAProxy start, every node UP in HAProxy")
hap = cluster.haproxy


def upload_through(port_client, name, size, chunk=65536):
    up = h.Upload(os.urandom(size), name, UID, TOKEN, chunk_size=chunk)
    with port_client() as c:
        r, _, _ = up.run(c)
    return up, r


def published_ok(up):
    path = cluster.published(UID, up.name)
    return os.path.exists(path) and h.read_file(path) == up.data


def ping_through_haproxy():
    with hap.connect() as c:
        r = c.request(h.MSG_TEST, {"data": "hop"})
    return r.get("error") == 0 and r.get("data") == "hop"


def via_haproxy(seen=None):
    """A connection through HAProxy; with seen, appends the node it was routed to (sequential use only:
    the server whose session count moved)."""
    before = hap.sessions() if seen is not None else None
    c = hap.connect()
    if seen is not None:
        seen.append(h.wait_for(lambda: next((n for n, v in hap.sessions().items() if v > before.get(n, 0)), None),
                               3))
    return c


def staging_of(up):
    """The staging entries of an upload in the shared storage (fs: <root>/.staging; RADOS: the staging index)."""
    return cluster.staging_entries(up.uid, up.md5)


def published_files(uid):
    """{where: bytes} of every file published for uid (versions, temporaries and all)."""
    return cluster.published_files(uid)


class QtClient:
    """Drives an h.Upload as the Qt client does, over as many connections as it takes.

    route: (connect, chunks) pairs used in turn, each a new connection on which at most `chunks`
    chunks are sent before the client hangs up and reconnects (None: no limit); once it is used up,
    connect() is used with no limit. After its first chunk, every new connection starts with 1005:
    error 0 continues at seq = answered seq + 1 from trans_size (the last chunk again when
    trans_size = total_size), 1012 starts over; any other answer reconnects and syncs again.
    A chunk answered 1012 or 1024 starts over at seq 1 on the same connection; 1017 and 1018 continue
    from the answered seq and trans_size; 1027, 1035, 1036, 1014, 1015 and 1028 reconnect and sync.
    It counts what it sends (up.sent_bytes), start-overs after progress (restarts), syncs that answered
    less than what had been acknowledged (lost), and the answers to its last chunk (last_answers).
    hold(offset), when given, runs before every chunk (it may block); on_last_ok(), when given, runs as
    soon as the last chunk is answered 0 and its result is kept in last_ok_checks."""

    def __init__(self, up, connect, route=(), timeout=40.0, max_restarts=5, max_connections=80, hold=None,
                 on_last_ok=None):
        self.up, self.connect, self.route = up, connect, list(route)
        self.deadline = time.monotonic() + timeout
        self.max_restarts, self.max_connections, self.hold = max_restarts, max_connections, hold
        self.on_last_ok, self.last_ok_checks = on_last_ok, []
        self.span = [None, None]   # when its first chunk was sent, when its last answer came
        self.offset, self.seq, self.acked, self.started = 0, 1, 0, False
        self.restarts, self.connections = 0, 0
        self.lost, self.events, self.last_answers, self.ok_at = [], [], [], []
        self.final = None

    def resume_from(self, offset, seq):
        """Goes on after chunks acknowledged elsewhere: up to offset, the next one being seq."""
        self.offset, self.seq, self.acked, self.started = offset, seq, offset, True
        return self

    def _start_over(self, why):
        self.events.append(why)
        if self.offset or self.seq != 1:
            self.restarts += 1
        self.offset, self.seq, self.acked = 0, 1, 0

    def _at(self, trans, seq):
        if trans >= len(self.up.data):   # complete but not published: resend the last chunk
            self.offset, self.seq = (self.up.last_seq - 1) * self.up.chunk_size, self.up.last_seq
        else:
            self.offset, self.seq = trans, seq + 1

    def _sync(self, c):
        s = self.up.sync(c)
        err = s.get("error")
        self.events.append(("sync", err, s.get("trans_size")))
        if err == 0:
            if s["trans_size"] < self.acked:
                self.lost.append((self.acked, s["trans_size"]))
            self._at(s["trans_size"], s["seq"])
            return True
        if err == 1012:
            self._start_over("sync 1012")
            return True
        return False

    def _chunks(self, c, budget):
        """Sends chunks on c; True when the upload is over (final answer or given up), False to reconnect."""
        sent = 0
        while time.monotonic() < self.deadline:
            if budget is not None and sent >= budget:
                self.events.append("hop")
                return False
            if self.hold:
                self.hold(self.offset)
            nxt = self.up.next_offset(self.offset)
            last = nxt >= len(self.up.data)
            self.span[0] = self.span[0] or time.monotonic()
            r = self.up.send_chunk(c, self.offset, self.seq)
            self.span[1] = time.monotonic()
            sent += 1
            self.started = True
            err = r.get("error")
            if last:
                self.last_answers.append(err)
                if err == 0 and self.on_last_ok:
                    self.last_ok_checks.append(self.on_last_ok())
            if err == 0:
                self.ok_at.append(time.monotonic())
                self.acked = max(self.acked, nxt)
                if last:
                    self.final = r
                    return True
                self.offset, self.seq = nxt, self.seq + 1
            elif err in (1017, 1018):
                self.events.append((err, r.get("trans_size")))
                self._at(r["trans_size"], r["seq"])
            elif err in (1012, 1024):
                self._start_over(err)
                if self.restarts > self.max_restarts:
                    self.final = r
                    return True
            elif err in (1027, 1035, 1036, 1014, 1015, 1028):
                self.events.append(err)
                time.sleep(0.05)   # a retry's pace
                return False
            else:
                self.events.append(("unexpected", r))
                self.final = r
                return True
        return False

    def run(self):
        while time.monotonic() < self.deadline and self.connections < self.max_connections:
            connect, budget = self.route.pop(0) if self.route else (self.connect, None)
            try:
                with connect() as c:
                    self.connections += 1
                    if self.started and not self._sync(c):
                        time.sleep(0.05)   # a retry's pace, not a wait for a condition
                        continue
                    if self._chunks(c, budget):
                        return self.final
            except (OSError, h.ProtocolError, TimeoutError) as e:
                self.events.append(("dropped", str(e)[:60]))
                time.sleep(0.05)
        self.events.append("gave up after %d connections" % self.connections)
        return self.final

    def ok(self):
        return self.final is not None and self.final.get("error") == 0

    def report(self):
        return "final %r, sent %d of %d bytes, %d connections, restarts %d, lost %r, events %r" % (
            self.final, self.up.sent_bytes, len(self.up.data), self.connections, self.restarts, self.lost,
            self.events[-25:])


def check_resumed(qt, what):
    """The checks every hopping upload gets: done, identical on disk, nothing lost, no restart."""
    up = qt.up
    tap.ok(qt.ok(), "%s: the last chunk is answered error 0" % what, qt.report())
    tap.ok(published_ok(up), "%s: the published file is byte-identical" % what, qt.report())
    # The record may lag behind the answers by the SETEX in flight and the one queued behind it
    # (protocol.md 8): a sync may answer up to two chunks less than acknowledged, never more.
    worst = max([acked - trans for acked, trans in qt.lost] or [0])
    tap.ok(worst <= 2 * up.chunk_size,
           "%s: no sync answered less than what had been acknowledged, beyond the record's lag (%d bytes)"
           % (what, worst), qt.report())
    tap.ok(qt.restarts == 0 and up.sent_bytes < 1.5 * len(up.data),
           "%s: resumed, never restarted from zero (sent %.2fx the file)" % (what, up.sent_bytes / len(up.data)),
           qt.report())


with tap.section("upload through HAProxy, downloads from every node"):
    up, r = upload_through(hap.connect, "shared.bin", 2000000)
    shared = up
    tap.eq(r.get("error"), 0, "an upload through HAProxy on one connection completes")
    tap.ok(published_ok(up), "it is published byte-identical in the shared root")
    for i, node in enumerate(cluster.nodes):
        with node.connect() as c:
            data, _ = h.download(c, up.name, UID, TOKEN)
        tap.ok(data == up.data, "node%d serves a byte-identical download of it" % (i + 1))
    before = hap.sessions()
    results = []
    for i in range(3 * NODES):
        with hap.connect() as c:
            data, _ = h.download(c, up.name, UID, TOKEN)
        results.append(data == up.data)
    after = hap.sessions()
    tap.ok(all(results), "%d downloads through HAProxy are byte-identical" % len(results))
    tap.ok(all(after[n] > before.get(n, 0) for n in hap.server_names()),
           "roundrobin sent connections to every node", repr((before, after)))

with tap.section("second instance per node"):
    for i, node in enumerate(cluster.nodes):
        rc, out = node.run_again()
        tap.ok(rc not in (0, None) and "pid %d" % node.master_pid in out,
               "a second instance of node%d is refused naming pid %d" % (i + 1, node.master_pid), out)
    tap.eq(hap.up_servers(), hap.server_names(), "HAProxy still sees every node UP")
    ups = [upload_through(hap.connect, "after-second-%d.bin" % i, 300000) for i in range(NODES)]
    tap.ok(all(r.get("error") == 0 and published_ok(up) for up, r in ups),
           "uploads through HAProxy on %d connections (one per node) complete byte-identical" % NODES)

with tap.section("Redis failover behind HAProxy"):
    # Uploads through HAProxy, each on one connection: half before the failover, the rest after every
    # node followed it. Sentinel itself is covered in depth by test_sentinel.py.
    ups = [h.Upload(os.urandom(1000000), "failover-%d.bin" % i, UID, TOKEN, chunk_size=65536)
           for i in range(NODES)]
    conns = [hap.connect() for _ in ups]
    halfway = []
    for up, c in zip(ups, conns):
        halfway.append(up.run(c, max_chunks=8))
    tap.ok(all(r.get("error") == 0 for r, _, _ in halfway), "uploads through HAProxy are half done")
    old = ss.failover()
    new = ss.replica if old is ss.master else ss.master
    tap.ok(h.wait_for(lambda: all(n.log_count("redis: connected to the master 127.0.0.1:%d" % new.port) >=
                                  n.workers + 1 for n in cluster.nodes), 30),
           "every process of every node follows the failover")
    for i, (up, c, (r, offset, seq)) in enumerate(zip(ups, conns, halfway)):
        r, _, _ = up.run(c, offset=offset, seq=seq)
        c.close()
        tap.ok(r.get("error") == 0 and published_ok(up) and up.sent_bytes < 1.5 * len(up.data),
               "upload %d completes byte-identical across the failover, nothing resent" % i, repr(r))
    new.set_token(UID + 1, "new-master")
    ok = []
    for i in range(NODES):
        with hap.connect() as c:
            r = c.request(h.MSG_UPLOAD, h.Upload(b"y" * 1000, "t%d.bin" % i, UID + 1, "new-master").body(0, 1))
            ok.append(r.get("error") == 0)
    tap.ok(all(ok), "tokens written on the new master are checked through every node", repr(ok))
    tap.ok(h.wait_for(lambda: hap.up_servers() == hap.server_names(), 15), "HAProxy sees every node UP")

with tap.section("a node stopped with QUIT"):
    gone = cluster.nodes[0]
    gone.send_signal(signal.SIGQUIT)
    try:
        gone.proc.wait(20)
    except Exception:
        pass
    tap.eq(gone.proc.poll(), 0, "node1 stops gracefully with QUIT")
    tap.ok(h.wait_for(lambda: "node1" not in hap.up_servers(), 10), "HAProxy takes node1 out",
           repr(hap.servers().get("node1", {}).get("status")))
    served = [ping_through_haproxy() for _ in range(3 * NODES)]
    tap.ok(all(served), "every new connection through HAProxy is served by the others (%d of %d)"
           % (sum(served), len(served)))
    ups = [upload_through(hap.connect, "after-quit-%d.bin" % i, 300000) for i in range(NODES)]
    tap.ok(all(r.get("error") == 0 and published_ok(up) for up, r in ups),
           "uploads through HAProxy complete byte-identical without node1")
    with h.Client(hap.port) as c:
        data, _ = h.download(c, "shared.bin", UID, TOKEN)
    tap.ok(data == shared.data, "the first file is still served byte-identical")
    tap.ok(not os.path.exists(gone.pid_file), "node1 removed its pid file")
    try:
        gone.start()
        restarted = True
    except Exception as e:
        restarted = False
        tap.ok(False, "node1 starts again", str(e))
    if restarted:
        tap.ok(h.wait_for(lambda: hap.up_servers() == hap.server_names(), 15), "HAProxy takes node1 back")

with tap.section("an upload reconnecting five times through HAProxy"):
    up = h.Upload(os.urandom(1500000), "hop5.bin", UID, TOKEN, chunk_size=65536)   # 23 chunks
    seen = []
    qt = QtClient(up, lambda: via_haproxy(seen), route=[(lambda: via_haproxy(seen), 4)] * 6)
    qt.run()
    tap.diag("connections went to %s" % seen)
    tap.ok(qt.connections >= 6, "the client connected %d times (at least 5 reconnections)" % qt.connections,
           qt.report())
    tap.ok(len(set(seen) - {None}) >= 2, "its connections hopped across nodes", repr(seen))
    check_resumed(qt, "upload reconnecting five times")

with tap.section("every 3 chunks on another node"):
    up = h.Upload(os.urandom(1000000), "hop3.bin", UID, TOKEN, chunk_size=32768)   # 31 chunks
    seen = []
    qt = QtClient(up, lambda: via_haproxy(seen), route=[(lambda: via_haproxy(seen), 3)] * 12)
    qt.run()
    tap.diag("connections went to %s" % seen)
    tap.ok(len(set(seen) - {None}) == NODES, "the upload used every node", repr(seen))
    check_resumed(qt, "upload hopping every 3 chunks")

with tap.section("a client going A, B, A"):
    # The corruption of the issue: on the shared root, B truncated the staging at seq 1 and A then
    # published a file with zeros in the middle with error 0. Straight to two nodes to force the order.
    a, b = cluster.nodes[1], cluster.nodes[2]
    up = h.Upload(os.urandom(600000), "aba.bin", UID, TOKEN, chunk_size=65536)   # 10 chunks
    qt = QtClient(up, a.connect, route=[(a.connect, 4), (b.connect, 1), (a.connect, None)])
    qt.run()
    tap.ok(not qt.ok() or published_ok(up), "an error-0 answer means the published file is byte-identical",
           qt.report())
    check_resumed(qt, "upload going A, B, A")


def race(uid, connects, garbage, name, head_start=0, hop=None):
    """Two clients send the same (uid, md5) at once through connects[0] and connects[1]; the second one
    sends random bytes under the first one's md5 when garbage, and sends head_start chunks before the
    honest one begins (then both go on together); with hop, both hang up and reconnect every hop chunks.
    Returns (honest QtClient, other QtClient)."""
    data = os.urandom(1000000)
    honest = h.Upload(data, "race.bin", uid, TOKEN, chunk_size=32768)
    other = h.Upload(os.urandom(len(data)) if garbage else data, "race.bin", uid, TOKEN, chunk_size=32768,
                     md5=honest.md5)
    # A final chunk resent after the file was published is answered 0 while the published file is
    # unchanged (protocol.md 6): for the garbage client that answer is right only when the file of that
    # md5 is already published intact, which is checked the moment the answer arrives.
    routes = [[(c, hop)] * 20 if hop else [] for c in connects]
    clients = [QtClient(honest, connects[0], route=routes[0], timeout=30, max_restarts=6, max_connections=60),
               QtClient(other, connects[1], route=routes[1], timeout=20, max_restarts=1 if garbage else 6,
                        max_connections=60, on_last_ok=lambda: published_ok_at(uid, honest))]
    start = threading.Barrier(2)
    honest_sent = threading.Event()

    def honest_hold(offset):
        honest_sent.set()

    def other_hold(offset):
        if offset >= head_start * other.chunk_size:
            honest_sent.wait(10)   # the honest client's first chunk is on its way: go on together

    clients[0].hold = honest_hold
    clients[1].hold = other_hold if head_start else None

    def drive(qt, wait_other):
        start.wait(10)
        if wait_other:
            h.wait_for(lambda: clients[1].acked >= head_start * other.chunk_size or clients[1].final, 10)
        return qt.run()

    h.run_threads(drive, [(clients[0], head_start > 0), (clients[1], False)], 60)
    spans = [c.span for c in clients]
    if all(a and b for a, b in spans):
        tap.diag("%s: both clients were sending at once for %.2f s" % (
            name, max(0.0, min(spans[0][1], spans[1][1]) - max(spans[0][0], spans[1][0]))))
    files = published_files(uid)
    tap.diag("%s: honest: %s" % (name, clients[0].report()))
    tap.diag("%s: other: %s" % (name, clients[1].report()))
    tap.ok(files and all(v == data for v in files.values()),
           "%s: every file published under <root>/%d/ is the honest data (%d files)" % (name, uid, len(files)),
           repr({p: (len(v), h.md5_hex(v)) for p, v in files.items()}) + " want md5 " + honest.md5)
    tap.ok(clients[0].ok() and published_ok_at(uid, honest),
           "%s: the honest client finishes with error 0, its file byte-identical" % name, clients[0].report())
    if garbage:
        tap.ok(all(clients[1].last_ok_checks),
               "%s: the garbage client gets error 0 on its last chunk only for the intact published file" % name,
               "answers to its last chunk: %r, published intact at each 0: %r"
               % (clients[1].last_answers, clients[1].last_ok_checks))
    else:
        tap.ok(clients[1].ok(), "%s: the second honest client finishes with error 0 too" % name,
               clients[1].report())
    return clients


def published_ok_at(uid, up):
    path = cluster.published(uid, up.name)
    return os.path.exists(path) and h.read_file(path) == up.data


with tap.section("two clients, same upload, two nodes at once"):
    a, b = cluster.nodes[0], cluster.nodes[1]
    race(RACE_UIDS[0], (a.connect, b.connect), False, "two honest clients on node1 and node2")
    race(RACE_UIDS[1], (a.connect, b.connect), True, "honest on node1, garbage on node2")
    race(RACE_UIDS[2], (b.connect, a.connect), True, "garbage on node1 first, then honest on node2", head_start=12)
    race(RACE_UIDS[3], (hap.connect, hap.connect), True, "garbage first, then honest, through HAProxy",
         head_start=12)
    race(RACE_UIDS[5], (hap.connect, hap.connect), True, "honest and garbage both hopping every 3 chunks",
         hop=3)

with tap.section("a frozen node's upload taken over"):
    # A node that hangs past its lease (SIGSTOP of all its processes) while a client sends garbage under
    # an honest md5 through it; the honest client goes to another node, which takes the upload over.
    # Thawed, the frozen node must not write for its old client any more (fencing): its next chunk is
    # refused, and the honest file is published intact. Straight to the nodes: HAProxy would keep
    # routing to the frozen node until its checks time out.
    uid = RACE_UIDS[4]
    frozen, other = cluster.nodes[1], cluster.nodes[2]
    data = os.urandom(1000000)
    honest = h.Upload(data, "frozen.bin", uid, TOKEN, chunk_size=32768)
    garbage = h.Upload(os.urandom(len(data)), "frozen.bin", uid, TOKEN, chunk_size=32768, md5=honest.md5)
    g = frozen.connect(timeout=30)
    r, g_offset, g_seq = garbage.run(g, max_chunks=10)
    tap.ok(r.get("error") == 0, "the garbage client has 10 chunks acknowledged by node2", repr(r))
    at_last, go_on = threading.Event(), threading.Event()

    def before_last(offset):
        if honest.next_offset(offset) >= len(data) and not go_on.is_set():
            at_last.set()
            go_on.wait(30)

    qt = QtClient(honest, other.connect, timeout=40, max_restarts=3, hold=before_last)
    thread = threading.Thread(target=qt.run, daemon=True)
    frozen.freeze()
    try:
        t_freeze = time.monotonic()
        thread.start()
        tap.ok(h.wait_for(at_last.is_set, 25), "the honest client gets all but its last chunk acknowledged by node3",
               qt.report())
        tap.diag("node3 took the upload over %.2f s after node2 froze" % (time.monotonic() - t_freeze))
    finally:
        frozen.thaw()
    # The garbage chunk goes out first, the honest last chunk right behind it: the honest client stays
    # active (its node keeps the lease) while the thawed node handles its old client's chunk.
    g.send_raw(garbage.frame(g_offset, g_seq))
    go_on.set()
    thread.join(40)
    try:
        after = g.recv_json(h.MSG_UPLOAD + 1, timeout=30)
    except (OSError, h.ProtocolError) as e:
        after = {"error": None, "dropped": str(e)}
    g.close()
    tap.diag("node2's answer to its old client after the thaw: %r" % after)
    tap.ok(after.get("error") != 0, "thawed, node2 refuses its old client's next chunk (answer %r)"
           % after.get("error"), repr(after))
    tap.ok(qt.ok() and published_ok_at(uid, honest), "the honest client finishes, its file byte-identical",
           qt.report())
    files = published_files(uid)
    tap.ok(files and all(v == data for v in files.values()),
           "every file published under <root>/%d/ is the honest data (%d files)" % (uid, len(files)),
           repr({p: (len(v), h.md5_hex(v)) for p, v in files.items()}))

with tap.section("kill -9 of the node serving an upload"):
    up = h.Upload(os.urandom(3000000), "killed.bin", UID, TOKEN, chunk_size=65536)   # 46 chunks
    seen = []
    c = via_haproxy(seen)
    r, offset, seq = up.run(c, max_chunks=30)
    victim = cluster.nodes[int(seen[0][4:]) - 1] if seen[0] else None
    tap.ok(r.get("error") == 0 and victim is not None, "30 chunks acknowledged by %s" % seen[0], repr(r))
    if victim is not None:
        pids = victim.kill9()
        t_kill = time.monotonic()
        c.close()
        tap.diag("killed %s: pids %s" % (seen[0], pids))
        tap.ok(not victim.processes() and victim.proc.poll() is not None,
               "every process of %s is gone" % seen[0], repr(victim.processes()))
        qt = QtClient(up, hap.connect, timeout=40).resume_from(offset, seq)
        qt.run()
        resumed = qt.ok_at[0] - t_kill if qt.ok_at else None
        tap.diag("the client's first chunk acknowledged after the kill: %s"
                 % ("%.2f s" % resumed if resumed is not None else "never"))
        tap.ok(resumed is not None and resumed < 15, "the client resumes on another node within 15 s",
               qt.report())
        check_resumed(qt, "upload whose node was killed")
        tap.ok(h.wait_for(lambda: not staging_of(up), 5), "no staging entry of it is left in <root>/.staging",
               repr(staging_of(up)))
        lease_key = "file_lease_%d_%s" % (UID, up.md5)
        tap.ok(h.wait_for(lambda: ss.current_master().cmd("EXISTS", lease_key) == 0, 5),
               "no lease of it is left in Redis", repr(ss.current_master().cmd("TTL", lease_key)))
        victim.start()
        tap.ok(h.wait_for(lambda: hap.up_servers() == hap.server_names(), 15),
               "%s starts again and HAProxy takes it back" % seen[0])

with tap.section("kill -9 of the worker serving an upload"):
    # A dead worker sends no release for its connections; its storage process sees the link close
    # and must give the upload's lease back then, as when a client leaves, not after lease_ttl * 2
    # of idleness (the node the client resumes on waited that long before the fix).
    served, other = cluster.nodes[1], cluster.nodes[2]
    up = h.Upload(os.urandom(1000000), "worker-killed.bin", UID, TOKEN, chunk_size=32768)
    lease_key = "file_lease_%d_%s" % (UID, up.md5)
    c = served.connect()
    r, offset, seq = up.run(c, max_chunks=10)
    tap.ok(r.get("error") == 0, "node2 acknowledges 10 chunks", repr(r))
    worker = next(iter(served.worker_pids()))
    connected = served.log_count("redis: connected")
    os.kill(worker, signal.SIGKILL)
    c.close()
    tap.ok(h.wait_for(lambda: ss.current_master().cmd("HGET", lease_key, "owner") == "", LEASE_TTL * 0.75),
           "node2 gives the lease back as soon as its worker is gone (within lease_ttl)",
           repr(ss.current_master().cmd("HGETALL", lease_key)))
    qt = QtClient(up, other.connect, timeout=40).resume_from(offset, seq)
    qt.run()
    check_resumed(qt, "upload whose worker was killed, resumed on node3")
    # The next section wants no 1027: the new worker answers credentials once it reached Redis.
    tap.ok(h.wait_for(lambda: len(served.worker_pids()) == served.workers and
                      served.log_count("redis: connected") > connected, 10),
           "node2 has its worker again, connected to Redis")

with tap.section("a node restarted while uploads run on the others"):
    restarted = cluster.nodes[0]
    # Two uploads through HAProxy on connections that landed on node2 and node3.
    conns, seen = {}, []
    for _ in range(3 * NODES):
        c = via_haproxy(seen)
        if seen[-1] in ("node2", "node3") and seen[-1] not in conns:
            conns[seen[-1]] = c
        else:
            c.close()
        if len(conns) == 2:
            break
    live = [(h.Upload(os.urandom(1500000), "live-%s.bin" % n, UID, TOKEN, chunk_size=8192), c)
            for n, c in sorted(conns.items())]
    pos = [[0, 1] for _ in live]
    answers = []

    def step(i):
        """One more chunk of live upload i (the last one only when finish); False once it is done."""
        up, c = live[i]
        off, seq = pos[i]
        if off is None:
            return False
        r = up.send_chunk(c, off, seq)
        if r.get("error") != 0:
            answers.append((up.name, off, r))
            pos[i] = [None, None]
            return False
        nxt = up.next_offset(off)
        pos[i] = [None, None] if nxt >= len(up.data) else [nxt, seq + 1]
        return True

    tap.eq(len(live), 2, "two uploads run through HAProxy on node2 and node3", repr(seen))
    for _ in range(8):
        for i in range(len(live)):
            step(i)
    present = all(staging_of(up) for up, _ in live)
    tap.ok(present, "their staging entries are in the shared storage", repr([staging_of(up) for up, _ in live]))
    rc, left = restarted.stop(sig=signal.SIGTERM)
    tap.eq((rc, left), (0, []), "node1 stops with TERM")
    restarted.start()
    t_back = time.monotonic()
    tap.ok(h.wait_for(lambda: hap.up_servers() == hap.server_names(), 15), "node1 is back with the same configuration")
    # Keep both uploads running (never idle, never finished) for longer than node1's upload_ttl plus two
    # janitor passes: what node1 would wrongly adopt it would remove in that window.
    window = RESTARTED_UPLOAD_TTL + 2 * RESTARTED_JANITOR + 1
    missing = []
    while time.monotonic() - t_back < window:
        for i, (up, _) in enumerate(live):
            if pos[i][0] is not None and up.next_offset(pos[i][0]) < len(up.data):
                step(i)
            if present and pos[i][0] is not None and not staging_of(up):
                missing.append((up.name, round(time.monotonic() - t_back, 1)))
        time.sleep(0.1)   # paces the uploads through the window; no condition to wait for
    for i in range(len(live)):
        while step(i):
            pass
    for up, c in live:
        c.close()
    tap.eq(answers, [], "no chunk of the live uploads got an error answer (no 1012, no restart)")
    tap.eq(missing[:4], [], "their staging entries were never removed while they ran")
    tap.ok(all(published_ok(up) and up.sent_bytes == len(up.data) for up, _ in live),
           "both complete byte-identical, each byte sent once")
    removals = [l for l in restarted.log_text().splitlines()
                if "removing abandoned upload" in l and any(up.md5 in l for up, _ in live)]
    tap.eq(removals, [], "node1 logged no removal of them")
    # The sections below want no short upload_ttl: a failover's pause must not look abandoned to node1.
    rc, left = restarted.stop(sig=signal.SIGTERM)
    for key in ("upload_ttl", "janitor_interval"):
        restarted.settings["storage"].pop(key, None)
    h.Daemon.write_config(restarted.conf_path, restarted.settings)
    restarted.start()
    tap.ok(rc == 0 and h.wait_for(lambda: hap.up_servers() == hap.server_names(), 15),
           "node1 restarts with the common upload_ttl and HAProxy takes it back")

with tap.section("Redis that lost a holding: the fence recorded with the entry wins"):
    # node2 takes an upload, node3 takes it over (a higher fence is recorded with the entry), and then
    # the lease in Redis is put back as it was before node3's holding: what a replica promoted before
    # it saw that holding would say. node2 is given its old fence back; the entry carries a higher one.
    # Writing under the old fence would be refused every time (1027 until the lease expires): node2
    # must take a fence above the recorded one and go on.
    first, second = cluster.nodes[1], cluster.nodes[2]
    up = h.Upload(os.urandom(600000), "lost-holding.bin", UID, TOKEN, chunk_size=32768)
    lease = "file_lease_%d_%s" % (UID, up.md5)
    redis_now = ss.current_master()
    with first.connect() as c:
        r = [up.send_chunk(c, off, seq) for seq, off in enumerate(range(0, 5 * 32768, 32768), 1)]
    tap.ok(all(x.get("error") == 0 for x in r), "node2 stores the first 5 chunks", repr(r[-1]))
    tap.ok(h.wait_for(lambda: redis_now.cmd("HGET", lease, "owner") == "", 10),
           "node2 gives the lease back when its client leaves", repr(redis_now.cmd("HGETALL", lease)))
    before = redis_now.cmd("HGETALL", lease)
    with second.connect() as c:
        s1 = up.sync(c)
        r = up.send_chunk(c, 5 * 32768, 6) if s1.get("error") == 0 else s1
    tap.ok(s1.get("trans_size") == 5 * 32768 and r.get("error") == 0, "node3 resumes it and stores chunk 6",
           repr((s1, r)))
    tap.ok(h.wait_for(lambda: redis_now.cmd("HGET", lease, "owner") == "", 10),
           "node3 gives the lease back when its client leaves", repr(redis_now.cmd("HGETALL", lease)))
    redis_now.cmd("DEL", lease)
    redis_now.cmd("HSET", lease, *before)
    redis_now.cmd("PEXPIRE", lease, 60000)
    answers = []
    with first.connect() as c:
        s2 = up.sync(c)
        off, seq = s2.get("trans_size", 0), s2.get("seq", 0) + 1
        while s2.get("error") == 0 and off < len(up.data):
            r = up.send_chunk(c, off, seq)
            answers.append(r.get("error"))
            if r.get("error") != 0:
                break
            off, seq = up.next_offset(off), seq + 1
    tap.ok(s2.get("trans_size") == 6 * 32768, "node2 answers the sync with what node3 stored", repr(s2))
    tap.ok(answers and set(answers) == {0}, "every chunk node2 is sent next is answered 0 (no 1027 loop)",
           repr(answers) + " " + repr(first.log_tail(8)))
    tap.ok(published_ok(up) and up.sent_bytes == len(up.data), "published byte-identical, each byte sent once")
    tap.ok(first.log_count("(Redis lost writes): taking a higher one") >= 1,
           "node2 logs that it took a fence above the one recorded with the entry")

with tap.section("Redis failover while uploads hop across nodes"):
    tap.ok(h.wait_for(ss.settled, 20, 0.1), "the sentinels agree on the master and an up-to-date replica",
           repr(ss.state()))
    # One upload parked on node2 (its client left, the lease given back): after the failover no node
    # may take its lease on its own, or the node its client comes back to waits for it.
    parked = h.Upload(os.urandom(300000), "failover-parked.bin", UID, TOKEN, chunk_size=32768)
    parked_lease = "file_lease_%d_%s" % (UID, parked.md5)
    with cluster.nodes[1].connect() as c:
        r = [parked.send_chunk(c, off, seq) for seq, off in enumerate(range(0, 3 * 32768, 32768), 1)]
    tap.ok(all(x.get("error") == 0 for x in r) and
           h.wait_for(lambda: all(s.cmd("HGET", parked_lease, "owner") == "" for s in ss.servers), 10),
           "an upload parked on node2 before the failover: its lease is free on master and replica",
           repr([s.cmd("HGETALL", parked_lease) for s in ss.servers]))
    ups = [h.Upload(os.urandom(1000000), "failover-hop-%d.bin" % i, UID, TOKEN, chunk_size=32768)
           for i in range(NODES)]
    go = threading.Event()
    followed = threading.Event()
    halfway = [threading.Event() for _ in ups]

    def hold_at_half(i):
        """Half the upload before the failover, the next quarter while the nodes switch, the rest after."""
        def hold(offset):
            if offset >= len(ups[i].data) // 2 and not go.is_set():
                halfway[i].set()
                go.wait(30)
            if offset >= 3 * len(ups[i].data) // 4:
                followed.wait(30)
        return hold

    qts = [QtClient(up, hap.connect, route=[(hap.connect, 3)] * 12, timeout=60, hold=hold_at_half(i))
           for i, up in enumerate(ups)]
    threads = [threading.Thread(target=qt.run, daemon=True) for qt in qts]
    for t in threads:
        t.start()
    tap.ok(h.wait_for(lambda: all(e.is_set() for e in halfway), 30), "the uploads are half done, hopping")
    new = ss.replica if ss.current_master() is ss.master else ss.master
    needle = "redis: connected to the master 127.0.0.1:%d" % new.port
    before = [n.log_count(needle) for n in cluster.nodes]
    ss.failover()
    go.set()   # the uploads go on while the master switches
    tap.ok(h.wait_for(lambda: all(n.log_count(needle) >= b + n.workers + 1
                                  for n, b in zip(cluster.nodes, before)), 30),
           "every process of every node follows the failover to port %d" % new.port)
    # Only its last holder (node2) may take the parked upload's lease back, to record it again, and it
    # gives it back at once; a node that kept it would keep it for seconds (until idle).
    owners = set()

    def parked_free():
        o = new.cmd("HGET", parked_lease, "owner")
        owners.add(o.split(" ")[1] if o else o)
        return o == ""
    tap.ok(h.wait_for(parked_free, 2, 0.02) and owners <= {"", "node2"},
           "only node2 takes the parked upload's lease after the failover, and gives it back at once",
           repr((owners, new.cmd("HGETALL", parked_lease))))
    followed.set()
    for t in threads:
        t.join(60)
    for i, qt in enumerate(qts):
        check_resumed(qt, "hopping upload %d across the failover" % i)
    qt = QtClient(parked, cluster.nodes[2].connect, timeout=30).resume_from(3 * 32768, 4)
    qt.run()
    check_resumed(qt, "the parked upload, resumed on node3 after the failover")

if h.uses_rados(cluster.nodes[0]):
    # The nodes shared one RADOS namespace, not the root: nothing was published on the local disk.
    local = [n for n in os.listdir(cluster.root) if n.isdigit()]
    tap.ok(local == [] and cluster.published_files(UID),
           "RADOS: every file was published in the shared namespace, none under the local root",
           "local %r" % local)

with tap.section("a second node under a name already in use"):
    # node1..3 each hold a lease on their [server] node name; a fourth node calling itself node2
    # (its own root and port, the same Redis) sees a live holder renew it and logs an error.
    CLASH = "another live node uses this name"
    dup = h.Daemon(workers=1, redis=ss.master, settings={
        "redis": dict(common["redis"]), "server": {"node": "node2"},
        "storage": {"lease_ttl": str(LEASE_TTL)} if cluster.lease_ttl else {}})
    tap.context.append(lambda: dup.log_tail(10))
    dup.start()
    ttl = LEASE_TTL if cluster.lease_ttl else 6
    tap.ok(h.wait_for(lambda: "error: [server] node node2: %s" % CLASH in dup.log_text(), 3 * ttl + 10),
           "a node started as node2 beside the live node2 logs an error naming the clash", dup.log_tail(10))
    tap.ok(CLASH not in cluster.nodes[1].log_text(), "the live node2, which held the name first, logs none")
    rc, left = dup.stop()
    tap.eq((rc, left), (0, []), "the duplicate stops")
    # Restarts (TERM, kill -9) meet their previous instance's lease, which runs out: no clash.
    tap.eq([i + 1 for i, node in enumerate(cluster.nodes) if CLASH in node.log_text(since_start=False)], [],
           "no node logged a clash for its own restarts (node1 twice, the killed node once)")

with tap.section("stop"):
    for i, node in enumerate(cluster.nodes):
        rc, left = node.stop()
        tap.eq((rc, left), (0, []), "node%d stops cleanly" % (i + 1))

tap.finish()

# test_multinode.py: three resourced nodes with one shared storage root and one Redis behind a real HAProxy: what holds before the upload lease.
"""What already holds with a shared root (every client connection goes through HAProxy
unless a check is about one node):
  - an upload on one connection through HAProxy completes byte-identical, and every
    node serves a download of it;
  - HAProxy's checks (the 1001 tcp-check with check-send-proxy, agent-check) see every
    node UP, and roundrobin spreads connections over all of them;
  - a second instance of any node is refused and HAProxy keeps routing to all three;
  - Redis is found through three sentinels; a failover while uploads run through
    HAProxy (each on one connection) loses nothing, every node follows it, and
    tokens are read from the new master;
  - a node stopped with QUIT: its agent says drain, HAProxy routes to the others, and
    every new connection is served.

TODO for the upload lease work (issue 9, "How it is shown"); each of these fails today:
  - an upload that disconnects and reconnects five times, hopping across nodes
    through HAProxy, completes identical, and the client sends < 1.5x the file
    (today: 1005 on another node answers 1012, the upload restarts from zero);
  - kill -9 of the node serving an upload: within 15 s the client resumes through
    HAProxy on another node, identical, no restart from zero, no staging left
    (a dead node's leases must not block longer);
  - one client whose every few chunks go to a different node, and two clients
    uploading the same (uid, md5) through two nodes at once: never a published file
    that differs from its MD5, never an error-0 answer for a corrupt file (today: A,
    B, A truncates the shared staging and A publishes zeros with error 0);
  - a node restarted while uploads run elsewhere never removes or adopts a live
    upload (today its recovery and janitor take the other node's staging);
  - a Redis master failover through Sentinel during uploads that hop across nodes
    loses no acknowledged byte (today each upload stays on one connection, and the
    shared record must then be the truth: see the first item);
  - contrib/bench.sh: aggregate upload throughput through HAProxy with 1 and 3
    nodes against one node directly (the lease may cost at most 10%).
"""
import os
import signal
import sys

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=150)

UID, TOKEN = 4301, "multinode-token"
NODES = 3

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
ss.master.set_token(UID, TOKEN)
cluster = h.Cluster(NODES, redis=ss.master,
                    settings={"redis": {"sentinels": ss.addresses, "master_name": ss.name}})
tap.context.append(cluster.diagnostics)

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

with tap.section("stop"):
    for i, node in enumerate(cluster.nodes):
        rc, left = node.stop()
        tap.eq((rc, left), (0, []), "node%d stops cleanly" % (i + 1))

tap.finish()

# test_prelogin.py: bodies that cost CPU before any token check (issue 12 item 5) are refused with 1001, and other clients are served meanwhile.
"""Four connections without credentials pipeline large bodies that a tree parser pays for in full: a
256 KiB {"data":[0,0,...]} on 1001 and 1003, 100000 nested arrays, nested objects, and an object of
thousands of fields. Every one must be answered 1001 (never echoed, never a crash) while a fifth
client keeps echoing on the same worker: all its echoes must come back, exact and in order. Timings
are printed as TAP diagnostics only (never asserted: the machine is shared)."""
import json
import os
import sys
import threading
import time

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=110)

MAX_FRAME = 262144
FRAMES_EACH = 12                 # pipelined hostile frames per connection and body kind

redis = h.RedisServer().start()
redis.set_token(1, "tok-1")
# One worker: the attackers and the echoing client share its event loop.
d = h.Daemon(workers=1, redis=redis, settings={"server": {"max_frame": MAX_FRAME, "idle_timeout": 120}})
tap.context.append(lambda: d.log_tail(12))
d.start_or_finish(tap)
tap.ok(d.wait_redis_connected(15), "daemon started with one worker")


def zeros_array(msg_id, size):
    """{"data":[0,0,...]} of about size bytes, with the fields of a chunk when msg_id is 1003."""
    head = b'{"md5":"5d41402abc4b2a76b9719d911017c592","name":"x.bin","seq":1,"trans_size":1,' \
           b'"total_size":1,"last":1,"data":[' if msg_id == h.MSG_UPLOAD else b'{"data":['
    n = (size - len(head) - 2) // 2
    return head + b"0," * (n - 1) + b"0]}"


def many_fields(size):
    parts, n, total = [], 0, 2
    while total < size - 20:
        p = b'"k%d":%d' % (n, n)
        parts.append(p)
        total += len(p) + 1
        n += 1
    return b"{" + b",".join(parts) + b"}"


HOSTILE = [
    ("1001 {\"data\":[0,0,...]} of 256 KiB", h.MSG_TEST, zeros_array(h.MSG_TEST, MAX_FRAME - 100)),
    ("1003 chunk whose data is [0,0,...], 256 KiB", h.MSG_UPLOAD, zeros_array(h.MSG_UPLOAD, MAX_FRAME - 100)),
    ("1001 data of 100000 nested arrays", h.MSG_TEST, b'{"data":' + b"[" * 100000 + b"]" * 100000 + b"}"),
    ("1033 of 20000 nested objects", h.MSG_DOWNLOAD, b'{"a":' * 20000 + b"1" + b"}" * 20000),
    ("1005 object of thousands of fields", h.MSG_SYNC, many_fields(MAX_FRAME - 100)),
]
for label, _, body in HOSTILE:
    assert len(body) <= MAX_FRAME, label


def echo_round_trips(c, n, tag):
    """n echoes on c; returns (latencies in ms, problems)."""
    lat, problems = [], []
    for i in range(n):
        want = "%s-%d" % (tag, i)
        t0 = time.perf_counter()
        r = c.request(h.MSG_TEST, {"data": want}, timeout=20)
        lat.append((time.perf_counter() - t0) * 1000)
        if r.get("error") != 0 or r.get("data") != want:
            problems.append(r)
    return lat, problems


def pct(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p / 100))] if s else float("nan")


with tap.section("a quiet server"):
    with h.Client(d.port) as c:
        quiet, problems = echo_round_trips(c, 200, "quiet")
    tap.eq(problems, [], "200 echoes answered exactly")
    tap.diag("echo round trip, quiet: p50 %.3f ms, p99 %.3f ms" % (pct(quiet, 50), pct(quiet, 99)))

with tap.section("each hostile body is refused with 1001"):
    for label, msg_id, body in HOSTILE:
        with h.Client(d.port) as c:
            t0 = time.perf_counter()
            c.send_raw(h.HEADER.pack(msg_id, len(body)) + body)
            r = c.recv_json(msg_id + 1, timeout=20)
            ms = (time.perf_counter() - t0) * 1000
            tap.ok(r.get("error") == 1001 and "data" not in r, "%s: refused with 1001" % label, repr(r)[:200])
            tap.diag("%s: answered in %.2f ms (%r)" % (label, ms, r.get("message")))
            tap.eq(c.request(h.MSG_TEST, {"data": "after"}).get("data"), "after", "... and the connection goes on")

with tap.section("four attackers and one echoing client on one worker"):
    results = {}
    stop = threading.Event()

    def attacker(k):
        refused, other = 0, []
        try:
            with h.Client(d.port, timeout=30) as c:
                for label, msg_id, body in HOSTILE:
                    frame = h.HEADER.pack(msg_id, len(body)) + body
                    c.send_raw(frame * FRAMES_EACH)   # pipelined
                    for _ in range(FRAMES_EACH):
                        r = c.recv_json(msg_id + 1, timeout=30)
                        if r.get("error") == 1001:
                            refused += 1
                        else:
                            other.append((label, repr(r)[:120]))
        except Exception as e:  # noqa: BLE001 - reported through the result
            other.append(("exception", repr(e)))
        results[k] = (refused, other)

    threads = [threading.Thread(target=attacker, args=(k,)) for k in range(4)]
    busy, problems, rounds = [], [], 0
    with h.Client(d.port) as good:
        t_start = time.perf_counter()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads) or rounds == 0:
            lat, bad = echo_round_trips(good, 10, "busy%d" % rounds)
            busy += lat
            problems += bad
            rounds += 1
        elapsed = time.perf_counter() - t_start
    for t in threads:
        t.join()
    want = len(HOSTILE) * FRAMES_EACH
    for k in range(4):
        refused, other = results.get(k, (0, [("thread", "no result")]))
        tap.ok(refused == want and not other, "attacker %d: all %d hostile frames refused with 1001" % (k, want),
               "refused %d, other %r" % (refused, other[:3]))
    tap.ok(problems == [] and len(busy) == rounds * 10 and len(busy) > 0,
           "meanwhile all %d echoes of the other client came back exactly" % len(busy), repr(problems[:3]))
    tap.diag("attack of 4 x %d frames (%.1f MiB) took %.2f s" % (
        want, 4 * FRAMES_EACH * sum(len(b) for _, _, b in HOSTILE) / 2 ** 20, elapsed))
    tap.diag("echo round trip during the attack: p50 %.3f ms, p99 %.3f ms, max %.3f ms (%d echoes)" % (
        pct(busy, 50), pct(busy, 99), max(busy), len(busy)))

with tap.section("the daemon is healthy"):
    tap.ok(d.ping(), "1001 still answered")
    died = [l for l in d.log_text().splitlines() if "killed by signal" in l or "exited with status" in l]
    tap.eq(died, [], "no child died")
    rc, left = d.stop()
    tap.ok(rc == 0 and not left, "TERM stops the daemon cleanly", "exit %r, left %r" % (rc, left))

tap.finish()

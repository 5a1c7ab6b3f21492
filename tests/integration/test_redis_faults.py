# test_redis_faults.py: Redis that refuses, hangs or answers slowly: resourced backs off, recovers, and loses no acknowledged byte.
import os
import signal
import sys
import time

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=150)
WORKERS = 2
REDIS_TIMEOUT = 2

redis = h.RedisServer()
redis.start()


def connections_received():
    info = redis.cmd("INFO", "stats")
    info = info.decode() if isinstance(info, bytes) else info
    for line in info.split("\r\n"):
        if line.startswith("total_connections_received:"):
            return int(line.split(":")[1])
    return 0


# ---------------------------------------------------------------- a wrong password
with tap.section("a wrong [redis] password: the processes back off, and come up once it is right"):
    redis.cmd("CONFIG", "SET", "requirepass", "the-right-one")
    redis.client.close()
    redis.client = h.RedisClient(redis.port)
    redis.client.cmd("AUTH", "the-right-one")
    d = h.Daemon(workers=WORKERS, redis=redis, stats=True,
                 settings={"redis": {"password": "a-wrong-one", "timeout": REDIS_TIMEOUT}})
    tap.context.append(lambda: d.log_tail(10))
    d.start()
    # Every process (the workers and storage) connects, is refused, and tries again with a back-off
    # that grows to 2 s: over 8 s that is a handful of connections each, not one every 0.1 s.
    before, started = connections_received(), time.monotonic()
    h.wait_for(lambda: time.monotonic() - started >= 8, 20, 0.5)
    made = connections_received() - before
    bound = (WORKERS + 1) * 12
    tap.ok(made <= bound, "%d processes refused by Redis made %d connections in 8 s (at most %d: a back-off)"
           % (WORKERS + 1, made, bound))
    refusals = d.log_count("AUTH/SELECT failed")
    tap.ok(refusals <= bound, "the refusal is logged %d times (at most %d)" % (refusals, bound))
    tap.eq(h.stats_info(d).get("state"), "down", "show info says down while Redis refuses")
    redis.client.cmd("CONFIG", "SET", "requirepass", "")
    tap.ok(h.wait_for(lambda: h.stats_info(d).get("state") == "up", 20), "up once Redis takes the daemon's commands")
    d.stop()



# ---------------------------------------------------------------- a final chunk sent again while Redis hangs
# Whether a resent final chunk belongs to a published upload is in its Redis record: while Redis
# cannot be read, the answer is 1027 (retry), not 1012, which sends the client back to seq 1 to
# upload the whole file again.
with tap.section("a final chunk sent again while Redis hangs: 1027, then 0 once Redis answers"):
    UID, TOKEN = 8101, "tok-8101"
    redis.set_token(UID, TOKEN)
    d = h.Daemon(workers=1, redis=redis, stats=True,
                 settings={"redis": {"timeout": REDIS_TIMEOUT}, "server": {"storage_timeout": 10}})
    tap.context.append(lambda: d.log_tail(10))
    d.start()
    data = os.urandom(65536 + 999)
    up = h.Upload(data, "resent-final.bin", UID, TOKEN)
    with h.Client(d.port, timeout=30) as c:
        r, _, _ = up.run(c)   # the credentials are now cached in the worker (auth_cache_ttl)
    tap.ok(r.get("error") == 0 and h.wait_for(lambda: h.published_bytes(d, UID, up.name) == data, 10),
           "a two-chunk upload is published", repr(r))

    def answered_0():
        with h.Client(d.port, timeout=30) as c:
            return up.send_chunk(c, 65536, 2).get("error") == 0

    # A new storage process knows nothing of the upload: only the record can say it was published.
    old_storage = d.storage_pid()
    os.kill(old_storage, signal.SIGKILL)
    tap.ok(h.wait_for(lambda: d.storage_pid() not in (None, old_storage) and answered_0(), 20, 0.2),
           "a new storage process answers the resent final chunk 0 from the record")
    os.kill(d.storage_pid(), signal.SIGKILL)
    tap.ok(h.wait_for(lambda: d.storage_pid() not in (None, old_storage) and
                      d.log_count("storage info: redis: connected") >= 3, 20, 0.2),
           "and so does the next one, once connected to Redis", d.log_tail(5))
    answers = []
    redis.pause()
    try:
        with h.Client(d.port, timeout=30) as c:
            answers.append(up.send_chunk(c, 65536, 2).get("error"))   # waits for the lookup's drop
            answers.append(up.send_chunk(c, 65536, 2).get("error"))   # Redis is down by now
    finally:
        redis.resume()
    tap.eq(answers, [1027, 1027], "the final chunk sent again, while Redis hangs and once it is dropped: 1027")
    tap.ok(h.wait_for(answered_0, 20, 0.2), "once Redis answers, the same chunk gets 0 (the file was published)")
    d.stop()

# ---------------------------------------------------------------- a worker restarted
# A worker started after a crash (or by a reload) meets clients at once: the connections that
# waited in its slot's queue while it was down were accepted before its Redis connection was made,
# and every request that needs Redis was answered 1027. It now accepts once connected (or after
# [redis] timeout, if Redis is away).
with tap.section("a restarted worker takes its first connections once connected to Redis: none answered 1027"):
    UID, TOKEN = 8201, "tok-8201"
    redis.set_token(UID, TOKEN)
    d = h.Daemon(workers=1, redis=redis, stats=True, settings={"redis": {"timeout": REDIS_TIMEOUT}})
    tap.context.append(lambda: d.log_tail(10))
    d.start()
    tap.ok(d.wait_redis_connected(15), "a daemon with one worker started")
    probe = h.Upload(os.urandom(1000), "never-sent.bin", UID, TOKEN)
    with h.Client(d.port, timeout=10) as c:
        healthy = probe.sync(c).get("error")
    tap.ok(healthy not in (None, 1027), "1005 for an upload never started, on a running worker: %r" % healthy)
    for round_no in range(3):
        codes = h.answers_queued_during_restart(d, next(iter(d.worker_pids())), h.MSG_SYNC,
                                                {"md5": probe.md5, "uid": UID, "token": TOKEN}, 8)
        tap.eq(codes, [healthy] * len(codes),
               "round %d: requests queued while the worker restarted are answered as by a running one" % round_no)
        tap.ok(h.wait_for(lambda: len(d.worker_pids()) == 1, 10), "round %d: the worker is back" % round_no)
    d.stop()

tap.finish()

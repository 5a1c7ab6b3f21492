# test_redis_faults.py: Redis that refuses, hangs or answers slowly: resourced backs off, recovers, and loses no acknowledged byte.
import os
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

tap.finish()

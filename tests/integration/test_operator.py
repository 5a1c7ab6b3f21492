# test_operator.py: what operators meet first: the reload answer over the stats socket, --help/--version, -t checks, per-process gauges and expected answers apart from errors.
import json
import os
import subprocess
import sys
import time

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=150)

UID, TOKEN = 4101, "tok-4101-operator"


def run(argv, timeout=20, env=None):
    """(exit status, stdout, stderr, seconds) of a command."""
    t0 = time.monotonic()
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=timeout, text=True, env=env)
    return r.returncode, r.stdout, r.stderr, time.monotonic() - t0


def stats(d, *command, timeout=20):
    return run([h.RESCTL_BIN, "stats", "--socket", d.stats_socket] + list(command), timeout)


redis = h.RedisServer().start()
redis.set_token(UID, TOKEN)
d = h.Daemon(workers=2, redis=redis)
d.stats_socket = os.path.join(d.run_dir, "stats.sock")
d.settings["server"]["stats_socket"] = d.stats_socket
h.Daemon.write_config(d.conf_path, d.settings)
d.start()
d.wait_workers()
d.wait_redis_connected()

# ---------------------------------------------------------------- item 3: reload over the stats socket
tap.section("reload over the stats socket ends its answer")
rc, out, err, secs = stats(d, "reload")
tap.eq(rc, 0, "resctl stats reload exits 0", err)
tap.ok(out.startswith("OK"), "the answer is OK", out)
# The old answer came at once and then the connection stayed open in the forked children for 10 s.
tap.diag("resctl stats reload took %.1f s" % secs)
tap.ok("no answer within" not in err, "no timeout message", err)
d.wait_workers(20)
rc, out, err, secs = stats(d, "reload")
tap.ok(rc == 0 and "no answer within" not in err, "a second reload answers the same way (exit %d)" % rc, err)
d.wait_workers(20)

tap.finish()

# test_idle_uploads.py: many idle uploads do not hold a staging file open each, so they cannot exhaust the storage process's file limit.
import os
import resource
import sys

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=150)

U, V = 4301, 4302
TOK = {U: "tok-4301-idle", V: "tok-4302-other"}
CHUNK = 1024
FILE_LIMIT = 256                 # the daemon's RLIMIT_NOFILE in this test
OPEN_BOUND = FILE_LIMIT // 4     # staging files the fs backend keeps open: a quarter of the limit (design.md §6)
IDLE = 320                       # more idle uploads than the whole file limit
rand = __import__("random").Random(4301)

redis = h.RedisServer().start()
for uid, tok in TOK.items():
    redis.set_token(uid, tok)
# One user's 320 uploads: above the default max_uploads_per_user (100), which is not what this tests.
d = h.Daemon(workers=1, redis=redis, settings={"server": {"storage_timeout": 10},
                                               "storage": {"max_uploads_per_user": 1000}})
tap.context.append(lambda: d.log_tail(12))
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (FILE_LIMIT, hard))   # inherited by the daemon, restored below
try:
    d.start()
except Exception as e:
    tap.ok(False, "daemon starts", str(e))
    tap.finish()
finally:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
tap.ok(d.wait_redis_connected(15), "daemon started with a file limit of %d" % FILE_LIMIT)


def staging_fds(pid):
    """Descriptors of pid that point into the staging directory."""
    staging = os.path.join(d.root, ".staging")
    n = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith(staging):
                n += 1
        except OSError:
            pass
    return n


ups = []
with tap.section("%d idle uploads" % IDLE):
    bad = []
    with h.Client(d.port) as c:
        for i in range(IDLE):
            up = h.Upload(rand.randbytes(3 * CHUNK + i), "idle-%03d.bin" % i, U, TOK[U], chunk_size=CHUNK)
            r, off, seq = up.run(c, max_chunks=1)
            if r.get("error") != 0:
                bad.append((i, r.get("error"), r.get("message")))
            ups.append((up, off, seq))
    tap.eq(bad[:5], [], "all %d uploads accepted their first chunk (none refused for want of descriptors)" % IDLE)
    parts = [f for f in os.listdir(os.path.join(d.root, ".staging")) if f.endswith(".part")]
    tap.eq(len(parts), IDLE, "%d staging files exist" % IDLE)
    held = staging_fds(d.storage_pid())
    tap.ok(held <= OPEN_BOUND, "the storage process holds %d of them open (bound %d)" % (held, OPEN_BOUND))

with tap.section("another user is not starved"):
    other = h.Upload(rand.randbytes(5 * CHUNK), "other.bin", V, TOK[V], chunk_size=CHUNK)
    with h.Client(d.port) as c:
        r, _, _ = other.run(c)
    path = h.published(d, V, "other.bin")
    tap.ok(r.get("error") == 0 and os.path.exists(path) and h.read_file(path) == other.data,
           "another user's upload completes byte-identical", repr(r))

with tap.section("every idle upload resumes and completes"):
    bad = []
    with h.Client(d.port) as c:
        for up, off, seq in ups:            # in the order they started: the least recently used first
            r, _, _ = up.run(c, offset=off, seq=seq)
            path = h.published(d, U, up.name)
            if r.get("error") != 0 or not os.path.exists(path) or h.read_file(path) != up.data:
                bad.append((up.name, r.get("error"), r.get("message")))
    tap.eq(bad[:5], [], "all %d complete byte-identical after their files were closed and reopened" % IDLE)
    tap.ok(staging_fds(d.storage_pid()) == 0, "no staging file stays open once they are published")
    tap.eq(os.listdir(os.path.join(d.root, ".staging")), [], "no staging entry is left")

tap.ok(d.log_count("Too many open files") == 0 and d.log_count("AddressSanitizer") == 0,
       "no 'Too many open files' and no sanitizer report in the log")
d.stop()
redis.stop()
tap.finish()

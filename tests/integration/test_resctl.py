# test_resctl.py: resctl as people use it: downloads into a partial file that resumes safely, announced retries, words instead of message ids, tokens kept out of ps, PROXY v2, and a peer that is not resourced.
import os
import socket
import subprocess
import sys
import threading

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=170)

UID, TOKEN = 4201, "tok-4201-resctl"
CHUNK = 4096                     # download_chunk of the daemon
SIZE = 200000                    # 49 chunks
CRED = ["--uid", str(UID), "--token", TOKEN]

redis = h.RedisServer().start()
redis.set_token(UID, TOKEN)
d = h.Daemon(workers=1, redis=redis, settings={"server": {"download_chunk": CHUNK}})
d.start()
ADDR = "127.0.0.1:%d" % d.port
work = h.temp_dir("resctl")


def resctl(*args, env=None, timeout=60):
    r = subprocess.run([h.RESCTL_BIN] + [str(a) for a in args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=timeout, text=True, env=env)
    return r.returncode, r.stdout, r.stderr


def put_file(name, data):
    path = os.path.join(work, "src-" + name)
    with open(path, "wb") as f:
        f.write(data)
    rc, so, se = resctl("upload", ADDR, path, "--name", name, *CRED)
    if rc != 0:
        raise RuntimeError("upload of %s failed: %s%s" % (name, so, se))
    return path


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def files_of(out):
    return [p for p in (out, out + ".resctl-part", out + ".resctl-state") if os.path.exists(p)]


NAME = "resctl-200k.bin"
data = os.urandom(SIZE)
put_file(NAME, data)

# ---------------------------------------------------------------- item 9: partial file, resume, --force
tap.section("download into OUTFILE.resctl-part, resume only our own part")
out = os.path.join(work, "out.bin")
rc, so, se = resctl("download", ADDR, NAME, out, "--stop-after", 10, *CRED)
tap.eq(rc, 3, "--stop-after 10 stops the download with status 3", so + se)
tap.ok(not os.path.exists(out), "an interrupted download does not sit under the final name")
tap.eq(os.path.getsize(out + ".resctl-part") if os.path.exists(out + ".resctl-part") else None, 10 * CHUNK,
       "the received bytes are in OUTFILE.resctl-part")
state = h.read_file(out + ".resctl-state").decode() if os.path.exists(out + ".resctl-state") else ""
tap.ok("name %s\n" % NAME in state and "total_size %d\n" % SIZE in state and "uid %d\n" % UID in state,
       "OUTFILE.resctl-state names the server's file, its size and the user", state)
rc, so, se = resctl("download", ADDR, NAME, out, *CRED)
tap.ok(rc == 0 and h.read_file(out) == data, "the same command again completes it byte-identical", so + se)
tap.ok("resuming at 0.0 MB (20%)" in se, "the resume is announced with where it starts", se)
tap.ok("received %d" % (SIZE - 10 * CHUNK) in so, "only the missing bytes were received (the rate counts them)", so)
tap.eq(files_of(out), [out], "the part and state files are gone after success")

tap.section("an existing OUTFILE is not overwritten without --force")
other = os.path.join(work, "other.bin")
junk = os.urandom(1 << 20)
with open(other, "wb") as f:
    f.write(junk)
rc, so, se = resctl("download", ADDR, NAME, other, *CRED)
tap.ok(rc == 1 and "--force" in se and h.read_file(other) == junk,
       "1 MB of unrelated bytes at OUTFILE: refused, exit 1, file unchanged", so + se)
tap.eq(files_of(other), [other], "and nothing was created beside it")
rc, so, se = resctl("download", ADDR, NAME, other, "--force", *CRED)
tap.ok(rc == 0 and h.read_file(other) == data, "--force replaces it with the server's bytes", so + se)

tap.section("a part file that is not ours, or of another version, starts over")
stray = os.path.join(work, "stray.bin")
with open(stray + ".resctl-part", "wb") as f:
    f.write(os.urandom(100000))
rc, so, se = resctl("download", ADDR, NAME, stray, *CRED)
tap.ok(rc == 0 and h.read_file(stray) == data and "resuming" not in se,
       "a part file without its state is not trusted: a full download, byte-identical", so + se)

resized = os.path.join(work, "resized.bin")
rc, so, se = resctl("download", ADDR, NAME, resized, "--stop-after", 5, *CRED)
st = h.read_file(resized + ".resctl-state").decode()
with open(resized + ".resctl-state", "w") as f:
    f.write(st.replace("total_size %d" % SIZE, "total_size %d" % (SIZE + 1)))
rc, so, se = resctl("download", ADDR, NAME, resized, *CRED)
tap.ok(rc == 0 and h.read_file(resized) == data and "different file" in se and "resuming" not in se,
       "a state that describes another file: starts over, byte-identical", so + se)

UID2, TOKEN2 = 4202, "tok-4202-resctl"
redis.set_token(UID2, TOKEN2)
theirs = os.path.join(work, "theirs.bin")
rc, so, se = resctl("upload", ADDR, os.path.join(work, "src-" + NAME), "--name", NAME, "--uid", UID2, "--token", TOKEN2)
rc, so, se = resctl("download", ADDR, NAME, theirs, "--stop-after", 5, *CRED)
rc, so, se = resctl("download", ADDR, NAME, theirs, "--uid", UID2, "--token", TOKEN2)
tap.ok(rc == 0 and h.read_file(theirs) == data and "different file" in se and "resuming" not in se,
       "another user's file of the same name: not resumed from the first user's part", so + se)

torn = os.path.join(work, "torn.bin")
rc, so, se = resctl("download", ADDR, NAME, torn, "--stop-after", 12, *CRED)
with open(torn + ".resctl-part", "r+b") as f:     # what a power cut can leave: a tail never written
    f.seek(11 * CHUNK)
    f.write(bytes(CHUNK))
rc, so, se = resctl("download", ADDR, NAME, torn, *CRED)
tap.ok(rc == 0 and h.read_file(torn) == data and "does not hold the server's bytes" in se,
       "a part whose last kept chunk differs from the server's starts over, byte-identical", so + se)

changed = os.path.join(work, "changed.bin")
NAME2 = "resctl-changes.bin"
put_file(NAME2, data)
rc, so, se = resctl("download", ADDR, NAME2, changed, "--stop-after", 5, *CRED)
new = os.urandom(SIZE)             # same name, same size, other bytes
put_file(NAME2, new)
rc, so, se = resctl("download", ADDR, NAME2, changed, *CRED)
tap.ok(rc == 0 and h.read_file(changed) == new, "the file replaced on the server (same size): the result is the new file",
       "exit %d, %s" % (rc, "old bytes" if h.read_file(changed)[:CHUNK * 5] == data[:CHUNK * 5] else se))
tap.ok("changed on the server" in se, "and it says why it started over", se)

# ---------------------------------------------------------------- item 10: announced retries, the hint to rerun
tap.section("reconnects are announced; a failure says how to resume")
dead = "127.0.0.1:%d" % closed_port()
closer = socket.socket()           # accepts and hangs up at once: a connection lost mid-transfer
closer.bind(("127.0.0.1", 0))
closer.listen(16)
h.at_cleanup(closer.close)


def hang_up():
    while True:
        try:
            conn, _ = closer.accept()
        except OSError:
            return
        conn.close()


threading.Thread(target=hang_up, daemon=True).start()
rc, so, se = resctl("download", "127.0.0.1:%d" % closer.getsockname()[1], NAME, os.path.join(work, "lost.bin"),
                    "--retries", 2, *CRED)
tap.ok(rc == 1 and "connection lost" in se and "retrying (1/2) in 0.1 s" in se and "retrying (2/2) in 0.2 s" in se
       and "giving up after 2" in se, "each retry is announced: connection lost, retrying (n/N) in s", se)
rc, so, se = resctl("upload", "127.0.0.1:%d" % closer.getsockname()[1], os.path.join(work, "src-" + NAME),
                    "--retries", 1, *CRED)
tap.ok(rc == 1 and "resctl: upload: connection lost" in se and "retrying (1/1) in 0.1 s" in se,
       "upload announces its retries the same way", se)
rc, so, se = resctl("download", dead, NAME, os.path.join(work, "dead.bin"), "--retries", 2, *CRED)
tap.ok(rc == 1 and "Connection refused" in se and "retrying" not in se and "connection lost" not in se
       and not os.path.exists(os.path.join(work, "dead.bin.resctl-part")),
       "a refused first connection fails at once (binary path: no retries, nothing 'lost') and leaves no part file", se)
for path_args, path_name in (([], "binary"), (["--compat"], "JSON")):
    rc, so, se = resctl("upload", dead, os.path.join(work, "src-" + NAME), "--retries", 2, *CRED, *path_args)
    tap.ok(rc == 1 and "cannot connect" in se and "retrying" not in se,
           "an upload's refused first connection fails at once (%s path)" % path_name, se)
part_out = os.path.join(work, "hint.bin")
resctl("download", ADDR, NAME, part_out, "--stop-after", 7, *CRED)
rc, so, se = resctl("download", dead, NAME, part_out, "--retries", 1, *CRED)
tap.ok(rc == 1 and "run the same command again to resume" in se and part_out + ".resctl-part" in se,
       "a download that gives up with a part says to rerun the same command", se)
tap.ok(os.path.exists(part_out + ".resctl-part") and os.path.exists(part_out + ".resctl-state"),
       "and keeps the part and its state")
rc, so, se = resctl("download", ADDR, NAME, part_out, *CRED)
tap.ok(rc == 0 and h.read_file(part_out) == data and "resuming at" in se, "which then resumes and completes", so + se)

up_data = os.urandom(150000)
up_path = os.path.join(work, "up.bin")
with open(up_path, "wb") as f:
    f.write(up_data)
rc, so, se = resctl("upload", ADDR, up_path, "--chunk", 10000, "--stop-after", 6, *CRED)
tap.eq(rc, 3, "upload --stop-after 6 stops with status 3", so + se)
rc, so, se = resctl("upload", ADDR, up_path, "--chunk", 10000, "--retries", 1, "--name", "up.bin",
                    "--uid", UID, "--token", TOKEN)
tap.ok(rc == 0 and "resuming at 0.1 MB (40%)" in se, "an upload resume is announced: resuming at 0.1 MB (40%)", so + se)
# A JSON chunk over the server's max_frame: the server closes without an answer, so the retries
# alone said only "connection reset"; the last word now names the cause.
frames_path = os.path.join(work, "big-frames.bin")
with open(frames_path, "wb") as f:
    f.write(os.urandom(300000))
rc, so, se = resctl("upload", ADDR, frames_path, "--compat", "--chunk", "256K", "--retries", 1, *CRED)
tap.ok(rc != 0 and "max_frame (262144)" in se and "try --chunk 128K" in se,
       "upload --compat --chunk 256K: giving up names max_frame and a chunk that fits", so + se)
rc, so, se = resctl("upload", ADDR, frames_path, "--compat", "--chunk", "128K", *CRED)
tap.ok(rc == 0 and "max_frame" not in se, "... and --chunk 128K uploads without the hint", so + se)

# ---------------------------------------------------------------- item 11: words, not ids
tap.section("output speaks to people; ids with --verbose")
rc, so, se = resctl("ping", ADDR)
tap.ok(rc == 0 and so.startswith("reply from 127.0.0.1:") and "1002" not in so, "ping: reply from ADDR", so + se)
rc, so, se = resctl("ping", ADDR, "--verbose")
tap.ok(rc == 0 and so.startswith("1002 from "), "ping --verbose shows the message id", so + se)
rc, so, se = resctl("sync", ADDR, "0" * 32, *CRED)
tap.ok(rc == 1 and "no upload in progress" in so and "1012" not in so + se, "sync of an unknown upload says so in words",
       so + se)
rc, so, se = resctl("sync", ADDR, "0" * 32, "--verbose", *CRED)
tap.ok("error=1012" in so, "sync --verbose adds the raw fields", so)
# New bytes: up.bin's would be published at once from the stored content (instant upload).
sync_data = os.urandom(150000)
sync_path = os.path.join(work, "sync-me.bin")
with open(sync_path, "wb") as f:
    f.write(sync_data)
resctl("upload", ADDR, sync_path, "--chunk", 10000, "--stop-after", 3, "--name", "sync-me.bin", *CRED)
rc, so, se = resctl("sync", ADDR, h.md5_hex(sync_data), *CRED)
tap.ok(rc == 0 and "sync-me.bin: upload in progress, 30000 of 150000 bytes received (20%)" in so,
       "sync of an upload in progress: name, bytes and percentage", so + se)
rc, so, se = resctl("download", ADDR, NAME, os.path.join(work, "badtok.bin"), "--uid", UID, "--token", "wrong")
tap.ok(rc == 1 and "token is wrong" in se and "1010" not in se, "a bad token: said in words, no code", se)
rc, so, se = resctl("download", ADDR, NAME, os.path.join(work, "badtok.bin"), "--uid", UID, "--token", "wrong",
                    "--verbose")
tap.ok("1010" in se and "TokenInvalid" in se, "--verbose adds the code and its name", se)
# With --uid the download takes the binary path: its errors are said the same way as JSON's.
for path_args, path_name in (([], "binary"), (["--compat"], "JSON")):
    rc, so, se = resctl("download", ADDR, "no-such-name.bin", os.path.join(work, "nosuch.bin"), *CRED, *path_args)
    tap.ok(rc == 1 and "no such file on the server" in se and "1012" not in se and "FileNotExists" not in se,
           "download of a missing name (%s path): said in words, no code" % path_name, se)
rc, so, se = resctl("download", ADDR, "no-such-name.bin", os.path.join(work, "nosuch.bin"), *CRED, "--verbose")
tap.ok(rc == 1 and "1012" in se and "FileNotExists" in se, "... and --verbose adds the code on the binary path", se)
rc, so, se = resctl("upload", ADDR, os.path.join(work, "sync-me.bin"), "--name", "anon.bin",
                    env={k: v for k, v in os.environ.items() if k != "RESCTL_TOKEN"})
tap.ok(rc == 1 and "needs credentials" in se and "--uid" in se and "--token" in se,
       "an upload without --uid to a server that wants one says which options to give", se)
rc, so, se = resctl("download", dead, NAME, os.path.join(work, "notoken.bin"), "--uid", UID,
                    env={k: v for k, v in os.environ.items() if k != "RESCTL_TOKEN"})
tap.ok(rc == 2 and "--uid needs" in se and "retrying" not in se,
       "--uid without a token is caught by resctl (exit 2, before connecting)", se)
rc, so, se = resctl("--help")
tap.ok(not any(i in so for i in ("1001", "1003", "1005", "1031", "1033")), "resctl --help names no message ids", so)
leaked = [c for c in ("ping", "upload", "sync", "download") if any(i in resctl(c, "--help")[1]
                                                                   for i in ("1001", "1003", "1005", "1031", "1033"))]
tap.eq(leaked, [], "no command's --help names message ids")

# resctl stats that cannot connect says why in the operator's terms.
rc, so, se = resctl("stats", "--socket", os.path.join(work, "no-stats.sock"), "show", "info")
tap.ok(rc == 1 and "[server] stats_socket" in se and "--socket" in se,
       "stats with no socket at the path: points at [server] stats_socket and --socket", se)
stale = os.path.join(work, "stale-stats.sock")
s = socket.socket(socket.AF_UNIX)
s.bind(stale)
s.close()   # the file stays, nothing listens: what a killed daemon leaves
rc, so, se = resctl("stats", "--socket", stale, "show", "info")
tap.ok(rc == 1 and "has stopped" in se, "stats on a socket nobody listens on: says the daemon has stopped", se)
# A socket that takes the command and never answers (a reload checking a hung root answers only
# after storage_timeout): --timeout bounds the wait and the message says how to wait longer.
mute = os.path.join(work, "mute-stats.sock")
ms = socket.socket(socket.AF_UNIX)
ms.bind(mute)
ms.listen(4)
rc, so, se = resctl("stats", "--socket", mute, "--timeout", "0.3", "show", "info")
tap.ok(rc == 1 and "no answer within 0.3 s" in se and "--timeout" in se,
       "stats --timeout 0.3 on a socket that never answers: exit 1, says how long it waited", se)
rc, so, se = resctl("stats", "--socket", mute, "--timeout", "0", "show", "info")
tap.ok(rc == 2 and "--timeout" in se, "stats --timeout 0 is refused as a usage error", se)
ms.close()

# ---------------------------------------------------------------- item 12: not a resourced server
tap.section("a peer that is not resourced is named as such")
http = socket.socket()
http.bind(("127.0.0.1", 0))
http.listen(8)
HTTP_ADDR = "127.0.0.1:%d" % http.getsockname()[1]


def http_server():
    while True:
        try:
            conn, _ = http.accept()
        except OSError:
            return
        try:
            conn.settimeout(5)
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/html\r\nContent-Length: 11\r\n\r\n"
                         b"Bad Request")
        except OSError:
            pass
        conn.close()


threading.Thread(target=http_server, daemon=True).start()
h.at_cleanup(http.close)
rc, so, se = resctl("ping", HTTP_ADDR, "--timeout", 5)
tap.ok(rc == 1 and "is not a resourced server" in se and "HTTP/1.1 400" in se and "larger than" not in se,
       "an HTTP server: 'not a resourced server' and how it answered", se)
rc, so, se = resctl("download", HTTP_ADDR, NAME, os.path.join(work, "http.bin"), "--retries", 1, *CRED)
tap.ok(rc == 1 and "not a resourced server" in se and "retrying" not in se,
       "download gives up at once: retrying would not help", se)

# ---------------------------------------------------------------- item 13: token out of ps
tap.section("the token from RESCTL_TOKEN or --token-file")
env = dict(os.environ, RESCTL_TOKEN=TOKEN)
out = os.path.join(work, "env.bin")
rc, so, se = resctl("download", ADDR, NAME, out, "--uid", UID, env=env)
tap.ok(rc == 0 and h.read_file(out) == data, "RESCTL_TOKEN with --uid", so + se)
token_file = os.path.join(work, "token")
with open(token_file, "w") as f:
    f.write(TOKEN + "\n")
os.chmod(token_file, 0o600)
out = os.path.join(work, "file.bin")
rc, so, se = resctl("download", ADDR, NAME, out, "--uid", UID, "--token-file", token_file)
tap.ok(rc == 0 and h.read_file(out) == data, "--token-file (first line, newline stripped)", so + se)
empty = os.path.join(work, "empty-token")
open(empty, "w").close()
rc, so, se = resctl("sync", ADDR, "0" * 32, "--uid", UID, "--token-file", empty)
tap.ok(rc == 2 and "--token-file" in se, "an empty token file is refused (exit 2)", se)
rc, so, se = resctl("sync", ADDR, "0" * 32, "--uid", UID, "--token-file", os.path.join(work, "nope"))
tap.ok(rc == 2 and "nope" in se, "a missing token file is named (exit 2)", se)

# ---------------------------------------------------------------- item 14: --proxy-v2
tap.section("--proxy-v2 talks to a node with proxy_protocol = on")
p = h.Daemon(workers=1, redis=redis, settings={"server": {"proxy_protocol": "on"}})
P_ADDR = "127.0.0.1:%d" % p.port
p.ping = lambda timeout=2.0: resctl("ping", P_ADDR, "--proxy-v2", "--timeout", timeout)[0] == 0
p.start()
rc, so, se = resctl("ping", P_ADDR, "--proxy-v2")
tap.ok(rc == 0 and "reply from" in so, "ping --proxy-v2 is answered", so + se)
rc, so, se = resctl("ping", P_ADDR, "--timeout", 3)
tap.ok(rc == 1, "ping without it is not (the node waits for a PROXY header)", so + se)
rc, so, se = resctl("upload", P_ADDR, up_path, "--name", "via-proxy.bin", "--proxy-v2", *CRED)
tap.ok(rc == 0 and h.read_file(h.published(p, UID, "via-proxy.bin")) == up_data,
       "upload --proxy-v2 publishes the file", so + se)

tap.ok(d.ping(), "the daemon still answers")
tap.finish()

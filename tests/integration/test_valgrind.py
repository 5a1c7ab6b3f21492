# test_valgrind.py: runs the daemon under valgrind through an upload/download cycle: no memory errors, no definite leaks.
import base64
import glob
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Client, Daemon, RedisServer, Tap, Upload, wait_for  # noqa: E402


class ValgrindDaemon(Daemon):
    """The daemon with every process (master, storage, worker) under memcheck, one log per pid."""

    def start(self, timeout=120):
        self.vg_dir = os.path.join(self.dir, "valgrind")
        os.makedirs(self.vg_dir, exist_ok=True)
        logf = open(self.log_path, "ab")
        cmd = ["valgrind", "--leak-check=full", "--show-leak-kinds=definite",
               "--errors-for-leak-kinds=definite", "--track-fds=no", "--child-silent-after-fork=no",
               "--log-file=%s/vg.%%p" % self.vg_dir, harness.RESOURCED_BIN, "-f", "-c", self.conf_path]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                     start_new_session=True)
        logf.close()
        self.pgid = self.proc.pid
        if not wait_for(lambda: self.proc.poll() is not None or self.ping(), timeout, 0.2):
            raise RuntimeError("resourced under valgrind did not answer:\n" + self.log_tail())
        return self


def main():
    tap = Tap(deadline=600)
    if os.environ.get("RESOURCED_SANITIZED"):
        tap.skip("valgrind run", "the binaries are built with sanitizers, which valgrind cannot run")
        return tap.finish()
    if subprocess.run(["sh", "-c", "command -v valgrind"], capture_output=True).returncode != 0:
        tap.skip("valgrind run", "valgrind is not installed")
        return tap.finish()
    redis = RedisServer().start()
    redis.set_token(7, "vg-token")
    d = ValgrindDaemon(workers=1, redis=redis, settings={"log": {"level": "warn"}, "storage": {"dedup": "user"}})
    d.start()
    data = os.urandom(300000)
    with Client(d.port, timeout=60) as c:
        up = Upload(data, "vg.bin", 7, "vg-token", chunk_size=32768)
        last, _, _ = up.run(c, timeout=60)
        tap.ok(last is not None and last.get("error") == 0, "upload under valgrind completes", diag=repr(last))
        got = b""
        seq = 1
        while True:
            r = c.request(harness.MSG_DOWNLOAD, {"name": "vg.bin", "seq": seq, "uid": 7, "token": "vg-token",
                                                 "client_path": "/tmp/x"}, timeout=60)
            if r.get("error") != 0:
                break
            got += base64.b64decode(r["data"])
            if r.get("is_last"):
                break
            seq += 1
        tap.ok(got == data, "download under valgrind is byte-identical")
        # Instant upload (dedup = user by default): the same bytes under a new name, following the
        # server's answers as the Qt client does, then once more with a wrong challenged chunk.
        for name, lie in (("vg-instant.bin", False), ("vg-fallback.bin", True)):
            up2 = Upload(data, name, 7, "vg-token", chunk_size=32768)
            offset, seq, r = 0, 1, None
            for _ in range(40):
                fake = {"data": base64.b64encode(os.urandom(len(data[offset:offset + 32768]))).decode()} \
                    if lie and offset else {}
                lie = lie and not offset
                r = up2.send_chunk(c, offset, seq, timeout=60, **fake)
                if r.get("error") != 0 or r.get("trans_size") == len(data):
                    break
                offset, seq = r["trans_size"], r["seq"] + 1
            tap.ok(r is not None and r.get("error") == 0 and r.get("trans_size") == len(data),
                   "%s under valgrind completes" % name, diag=repr(r))
        bad = c.request(harness.MSG_UPLOAD, {"md5": "x"}, timeout=60)
        tap.ok(bad.get("error") == 1001, "a bad request under valgrind gets 1001")
    d.stop(timeout=120)
    logs = sorted(glob.glob(os.path.join(d.vg_dir, "vg.*")))
    tap.ok(len(logs) >= 3, "valgrind logs for master, storage and worker (%d files)" % len(logs))
    for path in logs:
        text = open(path, errors="replace").read()
        definite = re.search(r"definitely lost: ([\d,]+) bytes", text)
        errors = re.search(r"ERROR SUMMARY: (\d+) errors", text)
        name = os.path.basename(path)
        freed = "All heap blocks were freed" in text
        tap.ok(freed or (definite is not None and definite.group(1) == "0"), "%s: no definite leaks" % name,
               diag=text[-3000:])
        tap.ok(errors is not None and errors.group(1) == "0", "%s: no memory errors" % name, diag=text[-3000:])
    return tap.finish()


if __name__ == "__main__":
    sys.exit(main())

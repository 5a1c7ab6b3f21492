# test_graceful.py: a graceful stop (QUIT) lets transfers finish behind a drain grace, and a restart of the storage process (HUP, kill -9) is invisible to clients.
import base64
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=170)

USERS = {5101: "tok-5101-graceful", 5102: "tok-5102-graceful", 5103: "tok-5103-graceful"}
GRACE = 3                # [server] drain_grace of the stop tests
SHUTDOWN = 20            # [server] shutdown_timeout of the first stop: long enough for every transfer
SHORT_SHUTDOWN = 5       # ... of the stop with stalled clients (the grace takes at most half of it)
PACE = 0.05              # seconds between a client's chunks: transfers that outlast the grace
rand = random.Random(5101)

redis = h.RedisServer().start()
for uid, tok in USERS.items():
    redis.set_token(uid, tok)


def new_daemon(server):
    d = h.Daemon(workers=2, redis=redis, settings={"server": server})
    d.log_file = os.path.join(d.dir, "resourced.log")
    d.settings["log"]["file"] = d.log_file
    h.Daemon.write_config(d.conf_path, d.settings)
    tap.context.append(lambda: "%s (last lines):\n%s" % (d.log_file, "\n".join(h.read_text(d.log_file).splitlines()[-15:])))
    return d


def paced_upload(d, up, st, pace=PACE):
    """Stop-and-wait, one chunk every pace seconds, as the Qt client does; records every answer in st."""
    try:
        with h.Client(d.port, timeout=40) as c:
            off, seq = 0, 1
            while True:
                r = up.send_chunk(c, off, seq, timeout=40)
                st["answers"].append(r)
                if r.get("error") != 0:
                    return
                st["acked"] = r.get("trans_size", 0)
                if up.next_offset(off) >= len(up.data):
                    st["done"] = True
                    return
                off, seq = up.next_offset(off), seq + 1
                time.sleep(pace)
    except (OSError, h.ProtocolError) as e:
        st["error"] = repr(e)


def paced_download(d, name, uid, st, pace=PACE):
    """Downloads name chunk by chunk from seq 1 until is_last; the bytes land in st["data"]."""
    try:
        with h.Client(d.port, timeout=40) as c:
            seq, parts = 1, []
            while True:
                r = c.request(h.MSG_DOWNLOAD, {"name": name, "seq": seq, "uid": uid, "token": USERS[uid],
                                               "client_path": "/c", "trans_size": "0", "total_size": "0"}, 40)
                if r.get("error") != 0:
                    st["answers"].append(r)
                    return
                parts.append(base64.b64decode(r["data"]))
                st["acked"] = int(r["current_size"])
                if r.get("is_last") is True:
                    st["data"] = b"".join(parts)
                    st["done"] = True
                    return
                seq += 1
                time.sleep(pace)
    except (OSError, h.ProtocolError) as e:
        st["error"] = repr(e)


def new_state():
    return dict(answers=[], acked=0, done=False, error=None, data=None)


def start_threads(fn, args_list):
    threads = [threading.Thread(target=fn, args=a, daemon=True) for a in args_list]
    for t in threads:
        t.start()
    return threads


def bad_answers(st):
    return [r for r in st["answers"] if r.get("error") != 0]


def log_time(path, offset, needle):
    """Seconds (of the day) of the first log line after offset that contains needle, or None."""
    for line in h.read_text(path, offset).splitlines():
        if needle in line:
            hms = line.split()[1]
            hh, mm, ss = hms.split(":")
            return int(hh) * 3600 + int(mm) * 60 + float(ss)
    return None


def stats_command(path, cmd):
    """One command on the stats socket; its answer (up to the empty line that ends it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(cmd.encode() + b"\n")
        buf = b""
        while b"\n\n" not in buf:
            data = s.recv(65536)
            if not data:
                break
            buf += data
    return buf.decode(errors="replace").strip()


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- QUIT: drain, grace, transfers finish
with tap.section("QUIT lets transfers finish"):
    agent_port = h.free_port()
    d = new_daemon({"shutdown_timeout": SHUTDOWN, "drain_grace": GRACE, "storage_timeout": 10,
                    "agent_listen": "127.0.0.1:%d" % agent_port, "download_chunk": 32768})
    stats_sock = os.path.join(d.run_dir, "stats.sock")
    d.settings["server"]["stats_socket"] = stats_sock
    h.Daemon.write_config(d.conf_path, d.settings)
    d.start()
    tap.ok(h.wait_for(lambda: h.agent_answer(agent_port).startswith("up"), 15), "(daemon up, the agent says up)")
    source = rand.randbytes(4 << 20)
    with h.Client(d.port) as c:
        r, off, _ = h.Upload(source, "source.bin", 5103, USERS[5103]).run(c)
    tap.ok(r.get("error") == 0 and off is None, "(a 4 MiB file to download during the stop)", repr(r))

    ups = [h.Upload(rand.randbytes(6 << 20), "quit-%d.bin" % i, 5101 + i, USERS[5101 + i]) for i in range(2)]
    ust = [new_state() for _ in ups]
    dst = new_state()
    threads = start_threads(paced_upload, [(d, up, st) for up, st in zip(ups, ust)])
    threads += start_threads(paced_download, [(d, "source.bin", 5103, dst)])
    idle = h.Client(d.port)
    r = idle.request(h.MSG_TEST, {"data": "idle"})
    tap.ok(h.wait_for(lambda: all(s["acked"] >= 4 * 65536 for s in ust) and dst["acked"] >= 4 * 32768, 20),
           "two 6 MiB uploads and a 4 MiB download are under way", repr([s["acked"] for s in ust + [dst]]))
    mark = len(h.read_text(d.log_file))
    t_quit = time.monotonic()
    d.send_signal(signal.SIGQUIT)
    drain = h.wait_for(lambda: h.agent_answer(agent_port, timeout=1) == "drain\n", 1.5, 0.05)
    drain_at = time.monotonic() - t_quit
    tap.ok(drain, "the agent answers drain right after QUIT (%.2f s)" % drain_at)
    try:
        with h.Client(d.port, timeout=5) as c:
            r = c.request(h.MSG_TEST, {"data": "during the grace"}, 5)
    except (OSError, h.ProtocolError) as e:
        r = {"exception": repr(e)}
    served_at = time.monotonic() - t_quit
    accepting = "no longer accepting" not in h.read_text(d.log_file, mark)
    tap.ok(r.get("error") == 0 and r.get("data") == "during the grace" and accepting,
           "a connection arriving during the grace is served (%.2f s after QUIT)" % served_at, repr(r))
    tap.ok(idle.is_open(), "the idle connection stays open during the grace")
    try:
        answer = stats_command(stats_sock, "enable")
    except OSError as e:
        answer = repr(e)
    tap.ok(answer.startswith("ERROR") and h.agent_answer(agent_port, timeout=1) == "drain\n",
           "enable on the stats socket during a graceful stop is refused: the agent still says drain", answer)
    tap.ok(h.wait_for(lambda: "no longer accepting" in h.read_text(d.log_file, mark), GRACE + 5),
           "after drain_grace the master stops accepting (the log says so)")
    tap.ok(h.wait_for(lambda: refused(d.port), 5), "after the grace a new connection is refused")
    tap.ok(idle.wait_closed(5), "the idle connection is closed once the grace is over")
    idle.close()
    tap.ok(h.agent_answer(agent_port, timeout=1) == "drain\n", "the agent still answers drain while transfers finish")
    for t in threads:
        t.join(SHUTDOWN + 5)
    for i, (up, st) in enumerate(zip(ups, ust)):
        tap.ok(st["done"] and not bad_answers(st) and st["error"] is None,
               "upload %d (6 MiB) finished through the stop with no error answer" % i,
               repr((st["acked"], st["error"], bad_answers(st)[:2])))
        tap.ok(h.read_file(h.published(d, up.uid, up.name)) == up.data if os.path.exists(h.published(d, up.uid, up.name))
               else False, "upload %d: the published file is byte-identical" % i)
    tap.ok(dst["done"] and dst["data"] == source, "the download finished through the stop, byte-identical",
           repr((dst["acked"], dst["error"], dst["answers"][:2])))
    try:
        rc = d.proc.wait(SHUTDOWN + 5)
    except subprocess.TimeoutExpired:
        rc = None
    took = time.monotonic() - t_quit
    tap.eq(rc, 0, "the master exits with status 0 once the transfers are done (%.2f s after QUIT)" % took)
    tap.ok("connections still open after shutdown_timeout" not in h.read_text(d.log_file, mark),
           "nothing was cut: every connection ended on its own")


# ---------------------------------------------------------------- QUIT: a stalled client is cut at shutdown_timeout
with tap.section("QUIT with stalled clients"):
    d = new_daemon({"shutdown_timeout": SHORT_SHUTDOWN, "drain_grace": GRACE, "storage_timeout": 10})
    d.start()
    with h.Client(d.port) as c:
        big = rand.randbytes(8 << 20)
        r = h.Upload(big, "big.bin", 5101, USERS[5101]).run_pipelined(c, window=16)
    tap.ok(all(x.get("error") == 0 for x in r), "(an 8 MiB file for a reader that reads nothing)")
    stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", d.port))
    stalled.sendall(b"".join(h.frame(h.MSG_DOWNLOAD, {"name": "big.bin", "seq": s, "uid": 5101, "token": USERS[5101],
                                                      "client_path": "/s", "trans_size": "0", "total_size": "0"})
                             for s in range(1, 257)))
    # An upload whose client goes silent after its third chunk: a transfer in progress that never ends.
    silent_up = h.Upload(rand.randbytes(1 << 20), "silent.bin", 5102, USERS[5102])
    silent = h.Client(d.port, timeout=10)
    r, _, _ = silent_up.run(silent, max_chunks=3)
    tap.ok(r.get("error") == 0, "(an upload stops after 3 of 16 chunks and keeps its connection)")
    procs = d.processes()
    # Workers stopped (SIGSTOP) through the grace: a connection made then waits in the kernel's
    # queue when accepting stops. It must be taken and answered, not reset with the socket.
    workers = d.worker_pids()
    for p in workers:
        os.kill(p, signal.SIGSTOP)
    mark = len(h.read_text(d.log_file))
    t_quit = time.monotonic()
    try:
        d.send_signal(signal.SIGQUIT)
        queued = h.Client(d.port, timeout=10)
        queued.send(h.MSG_TEST, {"data": "queued"})
        ended = h.wait_for(lambda: "no longer accepting" in h.read_text(d.log_file, mark), GRACE + 5)
    finally:
        for p in workers:
            os.kill(p, signal.SIGCONT)
    tap.ok(ended, "(the grace ended while the workers were stopped)")
    try:
        r = queued.recv_json(h.MSG_TEST + 1, 5)
    except (OSError, h.ProtocolError) as e:
        r = {"exception": repr(e)}
    tap.ok(r.get("error") == 0 and r.get("data") == "queued",
           "a connection still queued when accepting stopped is taken and answered", repr(r))
    tap.ok(queued.wait_closed(5), "... and then closed")
    queued.close()
    tap.ok(silent.is_open(0.3), "after the grace the silent upload's connection is still open (a transfer in progress)")
    try:
        rc = d.proc.wait(SHORT_SHUTDOWN + 8)
    except subprocess.TimeoutExpired:
        rc = None
    took = time.monotonic() - t_quit
    tap.eq(rc, 0, "the master exits with status 0")
    # The cut comes from the workers' timer at shutdown_timeout; leaving takes what process exit takes
    # (more under sanitizers), well before the master's own SIGKILL at shutdown_timeout + 10 s.
    quit_at = log_time(d.log_file, mark, "SIGQUIT: graceful stop")
    cut_at = log_time(d.log_file, mark, "connections still open after shutdown_timeout: closing them")
    tap.ok(quit_at is not None and cut_at is not None and cut_at - quit_at <= SHORT_SHUTDOWN + 1,
           "the stalled connections are cut at shutdown_timeout (%d s) after QUIT: %s s"
           % (SHORT_SHUTDOWN, "%.2f" % (cut_at - quit_at) if quit_at and cut_at else "?"))
    tap.ok(took <= SHORT_SHUTDOWN + 5, "the master exits soon after: %.2f s after QUIT" % took)
    tap.ok(silent.wait_closed(3), "the silent upload's connection was cut")
    silent.close()
    tap.ok(h.drained_until_cut(stalled), "the stalled reader's connection was cut")
    tap.ok(h.wait_for(lambda: not [p for p in procs if h.pid_alive(p)], 5), "no process of the daemon is left")


# ---------------------------------------------------------------- storage restarts are invisible
def uploads_through(d, label, fault, n=3, size=3 << 20):
    """n paced uploads; fault() is called once all are under way; every one must finish with no error answer."""
    ups = [h.Upload(rand.randbytes(size), "%s-%d.bin" % (label, i), 5101 + i, USERS[5101 + i]) for i in range(n)]
    sts = [new_state() for _ in ups]
    threads = start_threads(paced_upload, [(d, up, st, 0.01) for up, st in zip(ups, sts)])
    going = h.wait_for(lambda: all(s["acked"] >= 4 * 65536 for s in sts), 20)
    tap.ok(going, "%s: %d uploads of %d MiB under way" % (label, n, size >> 20), repr([s["acked"] for s in sts]))
    fault()
    for t in threads:
        t.join(60)
    for i, (up, st) in enumerate(zip(ups, sts)):
        tap.ok(st["done"] and not bad_answers(st) and st["error"] is None,
               "%s: upload %d finished with no error answer at all" % (label, i),
               repr((st["acked"], st["error"], bad_answers(st)[:2])))
        path = h.published(d, up.uid, up.name)
        tap.ok(os.path.exists(path) and h.read_file(path) == up.data, "%s: upload %d is byte-identical" % (label, i))
    return sts


with tap.section("storage restarts"):
    d = new_daemon({"storage_timeout": 10, "shutdown_timeout": 10})
    d.settings["storage"]["io_threads"] = "2"
    h.Daemon.write_config(d.conf_path, d.settings)
    d.start()
    tap.ok(h.wait_for(lambda: h.read_text(d.log_file).count("storage link up") >= 2, 15), "(daemon started)")

    def hup_io_threads():
        before = d.storage_pid()
        d.settings["storage"]["io_threads"] = "3"
        h.Daemon.write_config(d.conf_path, d.settings)
        mark = len(h.read_text(d.log_file))
        d.send_signal(signal.SIGHUP)
        tap.ok(h.wait_for(lambda: d.storage_pid() not in (None, before), 10),
               "HUP with io_threads 2 -> 3 restarts the storage process")
        tap.ok(h.wait_for(lambda: "storage settings changed ([storage] io_threads)" in h.read_text(d.log_file, mark),
                          5), "the log says why, naming the key that changed", h.read_text(d.log_file, mark))
        tap.ok(h.wait_for(lambda: "stopped for the reload" in h.read_text(d.log_file, mark), 5)
               and "exited with status" not in h.read_text(d.log_file, mark),
               "the restart it asked for is logged as such, not as an exit to worry about",
               h.read_text(d.log_file, mark))

    uploads_through(d, "hup", hup_io_threads)

    def kill9_storage():
        pid = d.storage_pid()
        # The storage process has run for more than 2 s: the master respawns it at once.
        os.kill(pid, signal.SIGKILL)
        tap.ok(h.wait_for(lambda: d.storage_pid() not in (None, pid), 10), "kill -9 of the storage process: respawned")

    uploads_through(d, "kill9", kill9_storage)
    tap.ok("held requests sent" in h.read_text(d.log_file),
           "the log shows requests held across a lost storage link and sent again")

    # A storage process that does not come back within storage_timeout: the master is stopped
    # (SIGSTOP), so nobody respawns the killed one; the worker answers 1027 after storage_timeout.
    d.settings["server"]["storage_timeout"] = "2"
    h.Daemon.write_config(d.conf_path, d.settings)
    old_workers = set(d.worker_pids())
    d.send_signal(signal.SIGHUP)
    tap.ok(h.wait_for(lambda: len(d.worker_pids()) == 2 and not (set(d.worker_pids()) & old_workers), 10),
           "(reload with storage_timeout = 2: new workers)")
    up = h.Upload(rand.randbytes(5 * 65536), "late.bin", 5101, USERS[5101])
    c = h.Client(d.port, timeout=15)
    r, off, seq = up.run(c, max_chunks=2)
    tap.ok(r.get("error") == 0, "(an upload under way: 2 of 5 chunks)")
    storage = d.storage_pid()
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        os.kill(storage, signal.SIGKILL)
        t0 = time.monotonic()
        r = up.send_chunk(c, off, seq, timeout=10)
        waited = time.monotonic() - t0
    except (OSError, h.ProtocolError) as e:
        r, waited = {"exception": repr(e)}, None
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    tap.eq(r.get("error"), 1027, "storage killed and not back within storage_timeout: the held chunk is answered 1027")
    tap.ok(waited is not None and waited >= 1.5, "... after the worker waited for a new storage process (%s s)"
           % ("%.2f" % waited if waited is not None else "?"))
    tap.ok(h.wait_for(lambda: d.storage_pid() not in (None, storage), 10), "the master, continued, respawns storage")
    s = h.wait_for(lambda: (lambda x: x if x.get("error") == 0 else None)(up.sync(c)), 10, 0.1)
    tap.ok(s and s.get("trans_size") in (2 * 65536, 3 * 65536),
           "sync after the outage reports the stored chunks", repr(s))
    if s:
        r, off, _ = up.run(c, offset=s["trans_size"], seq=s["seq"] + 1)
        tap.ok(r.get("error") == 0 and off is None and h.read_file(h.published(d, up.uid, up.name)) == up.data,
               "the client resumes and the file is byte-identical", repr(r))
    c.close()
    rc, left = d.stop()
    tap.eq((rc, left), (0, []), "(the daemon stops cleanly)")

tap.finish()

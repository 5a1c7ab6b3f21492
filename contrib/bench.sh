#!/bin/bash
# bench.sh: measures resourced from the build tree against this machine's limits (dd, loopback TCP), in one run.
#
# Usage: contrib/bench.sh [BUILD_DIR]   (default: the source tree, i.e. an in-tree build)
# Starts a private redis-server and resourced on loopback, runs the scenarios of
# the README's Performance section, prints a summary and stops everything.
# Nothing here is a pass/fail test: it records numbers.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$top}
resourced=$build/src/resourced
resctl=$build/src/resctl
[ -x "$resourced" ] && [ -x "$resctl" ] || { echo "bench.sh: build first (missing $resourced or $resctl)" >&2; exit 1; }

work=$(mktemp -d /var/tmp/resourced-bench.XXXXXX)
port=$((20000 + RANDOM % 20000))
rport=$((port + 1))
cleanup() {
	[ -f "$work/run/resourced.pid" ] && kill -TERM "$(cat "$work/run/resourced.pid")" 2>/dev/null || true
	[ -f "$work/redis.pid" ] && kill "$(cat "$work/redis.pid")" 2>/dev/null || true
	sleep 1
	rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/run" "$work/root"

redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
	--pidfile "$work/redis.pid" --logfile "$work/redis.log" --dir "$work"
for _ in $(seq 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.05; done
redis-cli -p "$rport" set utoken_1 bench >/dev/null

cat > "$work/bench.conf" <<CONF
[server]
listen = 127.0.0.1:$port
workers = auto
run_dir = $work/run
pid_file = $work/run/resourced.pid
max_connections = 20000
idle_timeout = 600
stats_socket = $work/run/stats.sock
[storage]
root = $work/root
max_file_size = 1073741824
[redis]
port = $rport
[log]
level = warn
file = $work/resourced.log
CONF
ulimit -n 65536 2>/dev/null || true
"$resourced" -f -c "$work/bench.conf" &
for _ in $(seq 100); do "$resctl" ping "127.0.0.1:$port" --timeout 1 >/dev/null 2>&1 && break; sleep 0.05; done

rss_kib() {   # total resident memory of every resourced process
	local total=0 pid
	for pid in $(pgrep -f '^resourced: '); do
		total=$((total + $(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)))
	done
	echo "$total"
}

echo "== machine: $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB, $(date -u +%Y-%m-%d), file system of $work: $(df -T "$work" | awk 'NR == 2 {print $2}')"

echo "== limit: dd of 256 MiB in 32 KiB blocks to the same file system (with fsync)"
dd if=/dev/urandom of="$work/random.bin" bs=1M count=256 status=none
dd if="$work/random.bin" of="$work/root/dd.bin" bs=32k conv=fsync 2>&1 | tail -n 1
rm -f "$work/root/dd.bin"

echo "== limit: raw loopback TCP copy of 1 GiB (one connection, 32 KiB writes)"
python3 - <<'PY'
import socket, threading, time
N, CH = 1 << 30, 32768
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
def sink():
    c, _ = srv.accept(); buf = bytearray(1 << 20); got = 0
    while got < N:
        n = c.recv_into(buf)
        if not n: break
        got += n
t = threading.Thread(target=sink); t.start()
s = socket.create_connection(srv.getsockname()); data = b"x" * CH; t0 = time.time(); sent = 0
while sent < N:
    s.sendall(data); sent += CH
s.close(); t.join(); dt = time.time() - t0
print(f"loopback: {N / dt / 1e6:.0f} MB/s")
PY

echo "== 1: one connection uploading a 256 MiB file, 32 KiB chunks (bench: base64 prepared in advance)"
"$resctl" bench "127.0.0.1:$port" --connections 1 --size 268435456 --files 1 --chunk 32768 --mode upload --duration 120 --uid 1 --token bench

echo "== 1b: the same with one connection downloading, 30 s"
"$resctl" bench "127.0.0.1:$port" --connections 1 --size 268435456 --chunk 32768 --mode download --duration 30 --uid 1 --token bench

echo "== 1c: resctl upload and download of a 256 MiB file (the client encodes as it goes)"
"$resctl" upload "127.0.0.1:$port" "$work/random.bin" --name one.bin --uid 1 --token bench --chunk 32768
"$resctl" download "127.0.0.1:$port" one.bin "$work/one.out" --uid 1 --token bench
cmp "$work/random.bin" "$work/one.out" && echo "identical"
rm -f "$work/one.out"

echo "== 2: 64 connections uploading 8 MiB files for 20 s"
"$resctl" bench "127.0.0.1:$port" --connections 64 --size 8388608 --chunk 32768 --mode upload --duration 20 --uid 1 --token bench

echo "== 3: 64 connections downloading 8 MiB files for 20 s"
"$resctl" bench "127.0.0.1:$port" --connections 64 --size 8388608 --chunk 32768 --mode download --duration 20 --uid 1 --token bench

echo "== 4: 10,000 idle connections"
before=$(rss_kib)
python3 - "$port" "$before" <<'PY'
import socket, sys, time, subprocess
port, before = int(sys.argv[1]), int(sys.argv[2])
socks = []
for i in range(10000):
    s = socket.create_connection(("127.0.0.1", port)); socks.append(s)
time.sleep(2)  # let the workers accept every connection before measuring
out = subprocess.run(["bash", "-c", "t=0; for p in $(pgrep -f '^resourced: '); do t=$((t + $(awk '/^VmRSS/ {print $2}' /proc/$p/status))); done; echo $t"],
                     capture_output=True, text=True).stdout.strip()
after = int(out)
print(f"RSS before {before} KiB, with 10000 idle connections {after} KiB: {(after - before) * 1024 / 10000:.0f} bytes per connection")
for s in socks: s.close()
PY
"$resctl" stats --socket "$work/run/stats.sock" show info | grep -E '^(conn_total|conn_rejected|errors_)' || true

# ---------------------------------------------------------------- the RADOS backend beside `rados bench`
# (BENCH_RADOS=0 skips it.) A throwaway one-OSD cluster (tests/integration/harness.py CephCluster,
# memstore: RAM, so these are the engine's CPU limits on this machine, not a disk's); first
# `rados bench` (4 MiB writes 16 in flight, 32 KiB writes one at a time and 64 in flight), then the
# same resourced scenarios as above with [storage] backend = rados against the same pool, in one run.
if [ "${BENCH_RADOS:-1}" != 0 ] && command -v ceph-osd >/dev/null && command -v rados >/dev/null; then
	echo "== RADOS: one mon, one OSD (memstore) on loopback"
	kill -TERM "$(cat "$work/run/resourced.pid")" 2>/dev/null || true   # the fs daemon: its CPU is not needed now
	for _ in $(seq 100); do [ -f "$work/run/resourced.pid" ] || break; sleep 0.1; done
	RESOURCED_BIN="$resourced" BENCH_WORK="$work" BENCH_RESCTL="$resctl" BENCH_REDIS_PORT="$rport" \
	python3 - "$top/tests/integration" <<'PY'
import os, subprocess, sys
sys.path.insert(0, sys.argv[1])
import harness as h
work, resctl, rport = os.environ["BENCH_WORK"], os.environ["BENCH_RESCTL"], os.environ["BENCH_REDIS_PORT"]
ceph = h.CephCluster(osd_bytes=6 << 30).start()

def sh(*args):
    print("$ " + " ".join(args), flush=True)
    subprocess.run(args, check=False)

def rados_bench(block, threads, seconds=10):
    out = subprocess.run(["rados", "-c", ceph.conf, "-p", ceph.pool, "bench", str(seconds), "write", "-b", str(block),
                          "-t", str(threads)], stdout=subprocess.PIPE, text=True).stdout
    bw = [l for l in out.splitlines() if l.startswith(("Bandwidth (MB/sec)", "Average IOPS", "Average Latency(s)"))]
    print("rados bench write %d B x %d in flight: %s" % (block, threads, "; ".join(" ".join(l.split()) for l in bw)), flush=True)

rados_bench(4 << 20, 16)
rados_bench(32768, 1)
rados_bench(32768, 64)
port = h.free_port()
conf = os.path.join(work, "bench-rados.conf")
with open(conf, "w") as f:
    f.write("""[server]
listen = 127.0.0.1:%d
workers = auto
run_dir = %s/run-rados
pid_file = %s/run-rados/resourced.pid
max_connections = 20000
idle_timeout = 600
[storage]
root = %s/root-rados
backend = rados
max_file_size = 1073741824
# each pool thread waits for one RADOS operation at a time: enough of them to keep the cluster busy
io_threads = 32
[rados]
conf = %s
user = admin
pool = %s
namespace = bench
[redis]
port = %s
[log]
level = warn
file = %s/resourced-rados.log
""" % (port, work, work, work, ceph.conf, ceph.pool, rport, work))
os.makedirs(os.path.join(work, "run-rados"), exist_ok=True)
d = subprocess.Popen([os.environ["RESOURCED_BIN"], "-f", "-c", conf], start_new_session=True)
h.at_cleanup(lambda: (d.poll() is None and d.terminate(), d.wait(10)))
addr = "127.0.0.1:%d" % port
h.wait_for(lambda: subprocess.run([resctl, "ping", addr, "--timeout", "1"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL).returncode == 0, 20, 0.1)
common = ["--uid", "1", "--token", "bench", "--chunk", "32768"]
print("== RADOS 1: one connection uploading, 32 KiB chunks (compare: rados bench 32768 x 1)", flush=True)
sh(resctl, "bench", addr, "--connections", "1", "--size", "268435456", "--files", "1", "--mode", "upload", "--duration", "30", *common)
print("== RADOS 1b: one connection downloading it, 32 KiB chunks", flush=True)
sh(resctl, "bench", addr, "--connections", "1", "--size", "268435456", "--mode", "download", "--duration", "15", *common)
print("== RADOS 2: 64 connections uploading 8 MiB files for 20 s (compare: rados bench 32768 x 64)", flush=True)
sh(resctl, "bench", addr, "--connections", "64", "--size", "8388608", "--mode", "upload", "--duration", "20", *common)
print("== RADOS 3: 64 connections downloading 8 MiB files for 20 s", flush=True)
sh(resctl, "bench", addr, "--connections", "64", "--size", "8388608", "--mode", "download", "--duration", "20", *common)
d.terminate()
d.wait(20)
PY
fi

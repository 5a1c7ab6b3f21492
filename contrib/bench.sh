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
resctl=$build/src/resctl/resctl
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
# 256 connections of one user in the sweep below
max_uploads_per_user = 1000
[redis]
port = $rport
[log]
level = warn
file = $work/resourced.log
CONF
ulimit -n 65536 2>/dev/null || true
"$resourced" -f -c "$work/bench.conf" &
for _ in $(seq 100); do "$resctl" ping "127.0.0.1:$port" --timeout 1 >/dev/null 2>&1 && break; sleep 0.05; done

rss_kib() {   # total resident memory of this daemon: its master and the master's children
	local total=0 pid master
	master=$(cat "$work/run/resourced.pid")
	for pid in "$master" $(pgrep -P "$master"); do
		total=$((total + $(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)))
	done
	echo "$total"
}

echo "== machine: $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB, $(date -u +%Y-%m-%d), file system of $work: $(df -T "$work" | awk 'NR == 2 {print $2}')"

echo "== limit: dd of 256 MiB in 32 KiB blocks to the same file system (with fsync)"
dd if=/dev/urandom of="$work/random.bin" bs=1M count=256 status=none
dd if="$work/random.bin" of="$work/root/dd.bin" bs=32k conv=fsync 2>&1 | tail -n 1 | tee "$work/dd.txt"
rm -f "$work/root/dd.bin"
# The same past the page cache, as the server writes large chunks (direct_io_min): on a virtual
# machine the buffered figure above depends on whether the page cache gets pages touched lately.
echo "== limit: the same in 1 MiB blocks with O_DIRECT (with fsync)"
dd if="$work/random.bin" of="$work/root/dd.bin" bs=1M oflag=direct conv=fsync 2>&1 | tail -n 1 | tee "$work/dd_direct.txt"
rm -f "$work/root/dd.bin"

echo "== limit: raw loopback TCP copy of 1 GiB (one connection, 32 KiB writes)"
(python3 - <<'PY'
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
) | tee "$work/loopback.txt"

# BENCH_ONLY="sweep binary ..." runs only those sections (main, binary, sweep, idle, multinode,
# dedup, rados); the limits are always measured.
section() { [ -z "${BENCH_ONLY:-}" ] || [[ " $BENCH_ONLY " == *" $1 "* ]]; }

if section main; then
echo "== 1: one connection uploading a 256 MiB file, 32 KiB chunks (bench: base64 prepared in advance)"
"$resctl" bench "127.0.0.1:$port" --connections 1 --size 268435456 --files 1 --chunk 32768 --mode upload --duration 120 --uid 1 --token bench

echo "== 1b: the same with one connection downloading, 30 s"
"$resctl" bench "127.0.0.1:$port" --connections 1 --size 268435456 --chunk 32768 --mode download --duration 30 --uid 1 --token bench

echo "== 1c: resctl upload and download --compat of a 256 MiB file (the client encodes as it goes)"
"$resctl" upload "127.0.0.1:$port" "$work/random.bin" --name one.bin --uid 1 --token bench --chunk 32768 --compat
"$resctl" download "127.0.0.1:$port" one.bin "$work/one.out" --uid 1 --token bench --compat
cmp "$work/random.bin" "$work/one.out" && echo "identical"
rm -f "$work/one.out"

echo "== 2: 64 connections uploading 8 MiB files for 20 s"
"$resctl" bench "127.0.0.1:$port" --connections 64 --size 8388608 --chunk 32768 --mode upload --duration 20 --uid 1 --token bench

echo "== 3: 64 connections downloading 8 MiB files for 20 s"
"$resctl" bench "127.0.0.1:$port" --connections 64 --size 8388608 --chunk 32768 --mode download --duration 20 --uid 1 --token bench
fi

# ---------------------------------------------------------------- binary fast path (issue 11, item 2)
# The same scenarios over the fast path (1041-1048), and CPU per byte of this daemon's processes
# (the master's children, not other resourced instances on the machine) for 64 connections on both
# paths. BIN_DURATION (default 20) is the length of each timed run in seconds.
bench_binary() {
	local dur=${BIN_DURATION:-20} master
	master=$(cat "$work/run/resourced.pid")
	cpu_ticks() {   # user + system clock ticks of the master and its children
		local total=0 pid
		for pid in "$master" $(pgrep -P "$master"); do
			total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
		done
		echo "$total"
	}
	field() {   # key of resctl bench --json output on stdin
		python3 -c "import json, sys; d = json.load(sys.stdin); print(d$1)"
	}
	local hz u; hz=$(getconf CLK_TCK)
	# Each run as its own user: runs stopped by --duration leave uploads in progress, and one
	# user's would reach max_uploads_per_user.
	for u in 11 12 13 14 15 16; do redis-cli -p "$rport" set "utoken_$u" bench >/dev/null; done
	echo "== 6: binary fast path (load: $(uptime | sed 's/.*load average: //'))"
	local dd_mbs
	local dd_direct_mbs dd_rate='{v = $(NF - 1); u = $NF; if (u == "GB/s") v *= 1000; if (u == "kB/s") v /= 1000; print v}'
	dd_mbs=$(awk "$dd_rate" "$work/dd.txt")
	dd_direct_mbs=$(awk "$dd_rate" "$work/dd_direct.txt")
	local up dl json_up bin_up json_dl bin_dl t0 t1
	up=$("$resctl" bench "127.0.0.1:$port" --connections 1 --size 268435456 --files 1 --mode upload --duration 120 \
		--uid 11 --token bench --protocol binary --json || true)
	dl=$("$resctl" bench "127.0.0.1:$port" --connections 1 --size 268435456 --mode download --duration "$dur" \
		--uid 12 --token bench --protocol binary --json || true)
	local row=() uid=12   # 13 to 16
	for proto in json binary; do
		uid=$((uid + 1))
		t0=$(cpu_ticks)
		# 256 KiB chunks on the fast path here: 64 windows of 1 MiB chunks stall (docs/performance.md).
		row+=("$("$resctl" bench "127.0.0.1:$port" --connections 64 --size 8388608 --mode upload --duration "$dur" \
			--uid "$uid" --token bench --protocol "$proto" $([ "$proto" = binary ] && echo --chunk 262144) --json || true)")
		t1=$(cpu_ticks)
		row+=("$((t1 - t0))")
		uid=$((uid + 1))
		t0=$(cpu_ticks)
		row+=("$("$resctl" bench "127.0.0.1:$port" --connections 64 --size 8388608 --mode download --duration "$dur" \
			--uid "$uid" --token bench --protocol "$proto" --json || true)")
		t1=$(cpu_ticks)
		row+=("$((t1 - t0))")
	done
	printf '%-44s %10s %12s %8s\n' scenario "MB/s" "server CPU" "ms/MB"
	local up_mbs dl_mbs
	up_mbs=$(field "['mb_per_s']" <<<"$up")
	dl_mbs=$(field "['mb_per_s']" <<<"$dl")
	printf '%-44s %10s %12s %8s   (%.0f%% of dd with fsync, %s MB/s; %.0f%% of dd direct, %s MB/s)\n' \
		"binary, 1 connection upload, 256 MiB" "$up_mbs" - - \
		"$(awk -v a="$up_mbs" -v b="$dd_mbs" 'BEGIN {print (b > 0 ? 100 * a / b : 0)}')" "$dd_mbs" \
		"$(awk -v a="$up_mbs" -v b="$dd_direct_mbs" 'BEGIN {print (b > 0 ? 100 * a / b : 0)}')" "$dd_direct_mbs"
	printf '%-44s %10s %12s %8s\n' "binary, 1 connection download, $dur s" "$dl_mbs" - -
	local i=0 proto kind cpu json_up_cpu=0 binary_up_cpu=0
	for proto in json binary; do
		for kind in upload download; do
			local out=${row[$i]} ticks=${row[$((i + 1))]} mbs bytes
			mbs=$(field "['mb_per_s']" <<<"$out")
			bytes=$(field "['bytes']" <<<"$out")
			cpu=$(awk -v t="$ticks" -v h="$hz" -v b="$bytes" 'BEGIN {print (b > 0 ? 1000 * t / h / (b / 1e6) : 0)}')
			[ "$kind" = upload ] && printf -v "${proto}_up_cpu" '%s' "$cpu"
			printf '%-44s %10s %11.1fs %8.2f   errors %s\n' "$proto, 64 connections $kind, $dur s" "$mbs" \
				"$(awk -v t="$ticks" -v h="$hz" 'BEGIN {print t / h}')" "$cpu" "$(field "['errors_total']" <<<"$out")"
			i=$((i + 2))
		done
	done
	printf 'binary against JSON server CPU per MB uploaded, 64 connections: %.2f (issue 11: at most 0.33)\n' \
		"$(awk -v a="$binary_up_cpu" -v b="$json_up_cpu" 'BEGIN {print (b > 0 ? a / b : 0)}')"
	echo "== 6b: resctl upload and download of a 256 MiB file over the fast path (the default)"
	# Content the server does not hold yet: random.bin went up in 1c, and would be an instant upload.
	dd if=/dev/urandom of="$work/random2.bin" bs=1M count=256 status=none
	"$resctl" upload "127.0.0.1:$port" "$work/random2.bin" --name two.bin --uid 1 --token bench
	"$resctl" download "127.0.0.1:$port" two.bin "$work/two.out" --uid 1 --token bench
	cmp "$work/random2.bin" "$work/two.out" && echo "identical"
	rm -f "$work/two.out" "$work/random2.bin"
}
section binary && bench_binary

# ---------------------------------------------------------------- throughput against connections (issue 11, item 3)
# Uploads and downloads of 8 MiB files over both protocols with 1, 4, 16, 64 and 256 connections
# (SWEEP_DURATION seconds each, default 5; each run as its own user), written with this run's limits
# to $BENCH_OUT/bench.json (default ./bench-out) and drawn as $BENCH_OUT/throughput.svg with gnuplot,
# so that a change that loses speed is seen at a glance. Compare two runs' bench.json side by side.
out=${BENCH_OUT:-$PWD/bench-out}
bench_sweep() {
	local dur=${SWEEP_DURATION:-5} proto mode n uid=100 r chunk
	mkdir -p "$out"
	: > "$work/sweep.jsonl"
	echo "== 7: throughput against connections, $dur s each (load: $(uptime | sed 's/.*load average: //'))"
	for proto in json binary; do
		for mode in upload download; do
			for n in 1 4 16 64 256; do
				uid=$((uid + 1))
				redis-cli -p "$rport" set "utoken_$uid" bench >/dev/null
				chunk=()   # 256 KiB chunks on the fast path: 64 windows of 1 MiB chunks stall (README)
				[ "$proto" = binary ] && [ "$mode" = upload ] && chunk=(--chunk 262144)
				r=$("$resctl" bench "127.0.0.1:$port" --connections "$n" --size 8388608 --mode "$mode" \
					--duration "$dur" --uid "$uid" --token bench --protocol "$proto" "${chunk[@]}" --json || true)
				printf '{"protocol": "%s", "mode": "%s", "connections": %d, "result": %s}\n' \
					"$proto" "$mode" "$n" "${r:-null}" >> "$work/sweep.jsonl"
			done
		done
	done
	python3 - "$work" "$out" "$(nproc)" "$(uptime | sed 's/.*load average: //')" <<'PY'
import json, os, re, sys, time
work, out, cores, load = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

def mbs(path, pattern):
    """The first MB/s figure a limit's output line gives (dd may say GB/s or kB/s)."""
    try:
        m = re.search(pattern, open(path).read())
    except OSError:
        return None
    if not m:
        return None
    v, unit = float(m.group(1)), m.group(2)
    return v * {"GB/s": 1000, "MB/s": 1, "kB/s": 0.001}[unit]

runs = [json.loads(line) for line in open(os.path.join(work, "sweep.jsonl"))]
doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cores": cores, "load_average": load,
       "limits": {"dd_fsync_mb_per_s": mbs(os.path.join(work, "dd.txt"), r"([\d.]+) ([kMG]B/s)"),
                  "dd_direct_mb_per_s": mbs(os.path.join(work, "dd_direct.txt"), r"([\d.]+) ([kMG]B/s)"),
                  "loopback_mb_per_s": mbs(os.path.join(work, "loopback.txt"), r"loopback: ([\d.]+) (MB/s)")},
       "sweep": [{"protocol": r["protocol"], "mode": r["mode"], "connections": r["connections"],
                  "mb_per_s": (r["result"] or {}).get("mb_per_s"),
                  "rtt_ms": (r["result"] or {}).get("rtt_ms"),
                  "errors": (r["result"] or {}).get("errors")} for r in runs]}
with open(os.path.join(out, "bench.json"), "w") as f:
    json.dump(doc, f, indent=1)
series = {}
print("%-8s %-9s %6s %10s %10s  %s" % ("protocol", "mode", "conns", "MB/s", "p99 ms", "errors"))
for r in doc["sweep"]:
    series.setdefault((r["protocol"], r["mode"]), []).append((r["connections"], r["mb_per_s"] or 0))
    errors = ", ".join("%s x%d" % kv for kv in (r["errors"] or {}).items()) or "none"
    print("%-8s %-9s %6d %10.1f %10.2f  %s" % (r["protocol"], r["mode"], r["connections"], r["mb_per_s"] or 0,
                                              ((r["rtt_ms"] or {}).get("p99") or 0), errors))
with open(os.path.join(work, "sweep.dat"), "w") as f:   # one gnuplot data block per series
    for (proto, mode), points in series.items():
        f.write('"%s %s"\n' % (proto, mode))
        f.writelines("%d %.2f\n" % p for p in points)
        f.write("\n\n")
print("written: %s" % os.path.join(out, "bench.json"))
PY
	if command -v gnuplot >/dev/null 2>&1; then
		gnuplot <<GP
set terminal svg size 800,480 dynamic background rgb "white"
set output "$out/throughput.svg"
set title "resourced: throughput against connections ($(nproc) cores, $(date -u +%Y-%m-%d))"
set xlabel "connections"
set ylabel "MB/s"
set logscale x 2
set xtics (1, 4, 16, 64, 256)
set key outside right
set grid
plot for [i=0:3] "$work/sweep.dat" index i using 1:2 with linespoints title columnheader(1)
GP
		echo "written: $out/throughput.svg"
	else
		echo "bench.sh: gnuplot not found (apt-get install gnuplot-nox): no chart drawn" >&2
	fi
}
section sweep && bench_sweep

if section idle; then
echo "== 4: 10,000 idle connections"
before=$(rss_kib)
# Opens the connections, waits until the workers have accepted every one (conn_current on the
# stats socket), then measures; the script's own RSS is not counted (only this daemon's processes).
python3 - "$port" "$before" "$resctl" "$work/run/stats.sock" "$work/run/resourced.pid" <<'PY'
import socket, sys, time, subprocess
port, before, resctl, stats, pidfile = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(10000)]
def current():
    out = subprocess.run([resctl, "stats", "--socket", stats, "show", "info"], capture_output=True, text=True).stdout
    return next((int(l.split()[1]) for l in out.splitlines() if l.startswith("conn_current:")), -1)
deadline = time.monotonic() + 30
while current() < len(socks) and time.monotonic() < deadline:
    time.sleep(0.1)
master = int(open(pidfile).read())
pids = [master] + [int(p) for p in subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()]
after = 0
for pid in pids:
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmRSS:"):
            after += int(line.split()[1])
print(f"RSS before {before} KiB, with {current()} idle connections {after} KiB: {(after - before) * 1024 / len(socks):.0f} bytes per connection")
for s in socks: s.close()
PY
"$resctl" stats --socket "$work/run/stats.sock" show info | grep -E '^(conn_total|conn_rejected|errors_)' || true
fi

# ---------------------------------------------------------------- multi-node (issue 9)
# Aggregate upload throughput through HAProxy with 1 and 3 nodes against one node directly: the nodes
# share one storage root and the Redis above, HAProxy runs from contrib/haproxy.cfg with the local
# addresses (no stickiness: every connection comes from 127.0.0.1). Kept apart from the scenarios
# above so that it merges on its own. MN_DURATION (default 15) is the length of each run in seconds.
bench_multinode() {
	local haproxy=${HAPROXY_BIN:-/usr/sbin/haproxy}
	[ -x "$haproxy" ] || { echo "== multi-node: skipped ($haproxy is not installed)"; return 0; }
	local dur=${MN_DURATION:-15} hport=$((port + 10)) i
	mn=$work/mn   # global: the EXIT trap below needs it
	local load=(--connections 32 --size 8388608 --chunk 32768 --mode upload --duration "$dur" --uid 1 --token bench --json)
	mkdir -p "$mn/root"
	mn_node_conf() {   # node number, proxy_protocol on|off
		local n=$1
		mkdir -p "$mn/run$n"
		cat > "$mn/node$n.conf" <<NODE
[server]
listen = 127.0.0.$((n + 1)):$((port + 20))
workers = auto
run_dir = $mn/run$n
pid_file = $mn/run$n/resourced.pid
max_connections = 20000
idle_timeout = 600
proxy_protocol = $2
agent_listen = 127.0.0.$((n + 1)):$((port + 21))
node = bench$n
[storage]
root = $mn/root
max_file_size = 1073741824
[redis]
port = $rport
[log]
level = warn
file = $mn/node$n.log
NODE
	}
	mn_start() {   # node number: starts it and waits until it answers
		"$resourced" -f -c "$mn/node$1.conf" &
		local line=""   # the agent answers "up" once the workers and the storage process run
		for _ in $(seq 200); do
			{ exec 3<>"/dev/tcp/127.0.0.$(($1 + 1))/$((port + 21))" && read -r -t 1 line <&3; exec 3<&-; } 2>/dev/null || true
			case $line in up*) return 0 ;; esac
			sleep 0.05
		done
		echo "bench.sh: node $1 did not come up" >&2
	}
	mn_stop() {   # node number
		local pid
		pid=$(cat "$mn/run$1/resourced.pid" 2>/dev/null) || return 0
		kill -TERM "$pid" 2>/dev/null || return 0
		for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.05; done
	}
	mn_haproxy() {   # number of nodes: writes the configuration and starts HAProxy, waits for every server UP
		local n=$1 servers=""
		for i in $(seq "$n"); do
			servers+="	server node$i 127.0.0.$((i + 1)):$((port + 20)) agent-port $((port + 21)) agent-addr 127.0.0.$((i + 1))\n"
		done
		sed -e '/^\tlog \/dev\/log/d' -e '/^\tlog global/d' -e '/^\toption tcplog/d' \
			-e "s|/run/haproxy/admin.sock|$mn/haproxy.sock|" -e "s|bind :9090|bind 127.0.0.1:$hport|" \
			-e "s|bind 127.0.0.1:8404|bind 127.0.0.1:$((hport + 1))|" \
			-e '/^\tstick-table /d' -e '/^\tstick on src/d' -e 's/ slowstart 30s//' \
			-e 's/check inter 2s/check inter 300ms/' -e 's/agent-inter 2s/agent-inter 300ms/' \
			-e '/^\tserver res[23] /d' -e "s|^\tserver res1 .*|$servers|" \
			"$top/contrib/haproxy.cfg" > "$mn/haproxy.cfg"
		"$haproxy" -db -f "$mn/haproxy.cfg" > "$mn/haproxy.log" 2>&1 &
		echo $! > "$mn/haproxy.pid"
		python3 - "$mn/haproxy.sock" "$n" <<'PY'
import socket, sys, time
path, want = sys.argv[1], int(sys.argv[2])
for _ in range(600):
    try:
        s = socket.socket(socket.AF_UNIX); s.connect(path); s.sendall(b"show stat\n")
        out = b""
        while True:
            d = s.recv(65536)
            if not d: break
            out += d
        up = [l for l in out.decode().splitlines() if l.startswith("resourced,node") and ",UP," in l]
        if len(up) == want: sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit("haproxy: not every server came UP within 60 s: %s" % [l.split(",")[1:2] + l.split(",")[17:18]
                                                                  for l in out.decode().splitlines()[1:]])
PY
	}
	mn_haproxy_stop() {
		[ -f "$mn/haproxy.pid" ] && kill "$(cat "$mn/haproxy.pid")" 2>/dev/null || true
		rm -f "$mn/haproxy.pid"
		sleep 0.2
	}
	mn_cleanup() {
		mn_haproxy_stop
		for i in 1 2 3; do mn_stop "$i"; done
	}
	trap 'mn_cleanup; cleanup' EXIT
	mn_line() {   # label, resctl bench JSON (its MB/s is kept in $mn/mbs, one "label<TAB>MB/s" a line)
		python3 - "$1" "$2" "$mn/mbs" <<'PY'
import json, sys
r = json.loads(sys.argv[2])
with open(sys.argv[3], "a") as f:
    f.write("%s\t%.2f\n" % (sys.argv[1], r["mb_per_s"]))
errors = ", ".join("%s x%d" % kv for kv in r["errors"].items()) or "none"
print("%-22s %9.2f %7d %9.3f %9.3f  %s" % (sys.argv[1], r["mb_per_s"], r["files"], r["rtt_ms"]["p50"],
                                            r["rtt_ms"]["p99"], errors))
PY
	}

	echo "== 5: multi-node (issue 9): 32 connections uploading 8 MiB files for $dur s each, shared root, one Redis"
	printf '%-22s %9s %7s %9s %9s  %s\n' setup "MB/s" files "p50 ms" "p99 ms" errors
	mn_node_conf 1 off
	mn_start 1
	mn_line "one node directly" "$("$resctl" bench "127.0.0.2:$((port + 20))" "${load[@]}" || true)"
	mn_stop 1
	for i in 1 2 3; do mn_node_conf "$i" on; done
	mn_start 1
	if mn_haproxy 1; then
		mn_line "HAProxy, 1 node" "$("$resctl" bench "127.0.0.1:$hport" "${load[@]}" || true)"
	fi
	mn_haproxy_stop
	mn_start 2
	mn_start 3
	if mn_haproxy 3; then
		mn_line "HAProxy, 3 nodes" "$("$resctl" bench "127.0.0.1:$hport" "${load[@]}" || true)"
	fi
	# Issue 9: through the balancer, the lease and the shared records may cost at most 10% against one
	# node directly (with 3 nodes on one machine the nodes share its cores: that line is for the record).
	awk -F '\t' '{v[$1] = $2} END {
		d = v["one node directly"]
		if (d > 0) for (k in v) if (k != "one node directly")
			printf "%-22s %8.1f%% of one node directly\n", k, 100 * v[k] / d
	}' "$mn/mbs" 2>/dev/null | sort || true
	mn_cleanup
	trap cleanup EXIT
}
section multinode && bench_multinode

# Instant upload (issue 14): DEDUP_USERS (default 100) users each upload the same DEDUP_MIB (default 64)
# MiB file, one after the other, with resctl: to a node with [storage] dedup = global over the binary
# fast path (1043 INSTANT, 1049), the same over the JSON messages of the Qt client (--compat, 64 KiB
# chunks), and to a node with dedup = off. Prints the time of all uploads, the bytes that crossed the
# wire (show info bytes_in), and where an instant upload's time goes: the client's MD5 of the file
# (md5sum, once) and the server's part (the access log's duration, open to publish, averaged). Needs
# about DEDUP_USERS x DEDUP_MIB MiB free under /var/tmp for the off run (the size shrinks to fit).
# Bounded: each upload gets DEDUP_TIMEOUT (default 120) seconds. Kept apart so that it merges on its own.
bench_dedup() {
	local users=${DEDUP_USERS:-100} mib=${DEDUP_MIB:-64} dd=$work/dedup i
	local free_mib
	free_mib=$(df -Pm "$work" | awk 'NR == 2 {print $4}')
	while [ "$mib" -gt 1 ] && [ $((users * mib + 1024)) -gt "$free_mib" ]; do mib=$((mib / 2)); done
	mkdir -p "$dd"
	head -c $((mib * 1048576)) /dev/urandom > "$dd/same.bin"
	for i in $(seq "$users"); do echo "SET utoken_$((100000 + i)) bench-$i"; done | redis-cli -p "$rport" >/dev/null
	dedup_run() {   # label, dedup scope, resctl options...: prints one summary line
		local label=$1 scope=$2 dport=$((port + 40)) start end stats
		shift 2
		rm -rf "$dd/root" "$dd/run" "$dd/access.log"
		mkdir -p "$dd/root" "$dd/run"
		cat > "$dd/node.conf" <<NODE
[server]
listen = 127.0.0.1:$dport
workers = auto
run_dir = $dd/run
pid_file = $dd/run/resourced.pid
stats_socket = $dd/run/stats.sock
[storage]
root = $dd/root
max_file_size = 1073741824
dedup = $scope
[redis]
port = $rport
prefix = dedup-$label-
[log]
level = warn
file = $dd/node.log
access_log = $dd/access.log
NODE
		"$resourced" -f -c "$dd/node.conf" &
		for _ in $(seq 200); do "$resctl" ping "127.0.0.1:$dport" --timeout 1 >/dev/null 2>&1 && break; sleep 0.05; done
		start=$(date +%s.%N)
		for i in $(seq "$users"); do
			timeout "${DEDUP_TIMEOUT:-120}" "$resctl" upload "127.0.0.1:$dport" "$dd/same.bin" --name "forwarded-$i.bin" \
				--uid $((100000 + i)) --token "bench-$i" "$@" >/dev/null || echo "bench.sh: upload $i failed" >&2
		done
		end=$(date +%s.%N)
		stats=$("$resctl" stats --socket "$dd/run/stats.sock" show info json |
			python3 -c 'import json, sys; i = json.load(sys.stdin); print("%.1f %d %.1f" % (i["bytes_in"] / 1e6, i.get("uploads_instant", 0), i.get("instant_bytes_saved", 0) / 1e6))') ||
			stats="- - -"   # the daemon did not answer: the line still prints
		local server_ms
		server_ms=$(awk '/instant=1/ { for (f = 1; f <= NF; f++) if ($f ~ /^duration=/) { sub("duration=", "", $f); t += $f; n++ } }
			END { if (n) printf "%.1f", 1000 * t / n; else printf "-" }' "$dd/access.log" 2>/dev/null || echo -)
		# shellcheck disable=SC2086
		printf '%-15s %8.2f s %10s MB %8s %10s MB %10s ms %8s MiB\n' "$label" \
			"$(awk -v a="$start" -v b="$end" 'BEGIN {print b - a}')" $stats "$server_ms" "$(du -sm "$dd/root" | cut -f1)"
		kill -TERM "$(cat "$dd/run/resourced.pid")" 2>/dev/null || true
		for _ in $(seq 200); do [ -e "$dd/run/resourced.pid" ] || break; sleep 0.05; done
		sleep 0.5
	}
	echo "== 6: instant upload (issue 14): $users users upload the same $mib MiB file, one after the other"
	local t0 t1
	t0=$(date +%s.%N); md5sum "$dd/same.bin" >/dev/null; t1=$(date +%s.%N)
	echo "   the client's MD5 of the file (md5sum, page cache warm): $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.0f", 1000 * (b - a)}') ms per upload"
	printf '%-15s %10s %13s %8s %13s %13s %12s\n' run time "bytes in" instant "bytes saved" "server/inst." "on disk"
	dedup_run global-binary global
	dedup_run global-json global --compat --chunk 65536
	dedup_run off-binary off
	rm -rf "$dd"
}
section dedup && bench_dedup

# ---------------------------------------------------------------- both backends beside `rados bench`
# (BENCH_RADOS=0 skips it.) A throwaway one-OSD cluster (tests/integration/harness.py CephCluster,
# memstore: RAM, so these are the engine's CPU limits on this machine, not a disk's); first
# `rados bench` (4 MiB writes 16 in flight, 32 KiB writes one at a time and 64 in flight), then the
# same four resourced scenarios (32 KiB chunks, the JSON protocol) against a daemon with
# [storage] backend = fs and one with backend = rados on that pool, one table, in one run.
# RADOS_SECONDS (default 15) is the length of each scenario.
if section rados && [ "${BENCH_RADOS:-1}" != 0 ] && command -v ceph-osd >/dev/null && command -v rados >/dev/null; then
	echo "== 7: both backends beside rados bench: one mon, one OSD (memstore) on loopback"
	kill -TERM "$(cat "$work/run/resourced.pid")" 2>/dev/null || true   # the fs daemon above: its CPU is not needed now
	for _ in $(seq 100); do [ -f "$work/run/resourced.pid" ] || break; sleep 0.1; done
	RESOURCED_BIN="$resourced" BENCH_WORK="$work" BENCH_RESCTL="$resctl" BENCH_REDIS_PORT="$rport" \
	python3 - "$top/tests/integration" <<'PY'
import json, os, re, subprocess, sys
sys.path.insert(0, sys.argv[1])
import harness as h
work, resctl, rport = os.environ["BENCH_WORK"], os.environ["BENCH_RESCTL"], os.environ["BENCH_REDIS_PORT"]
seconds = int(os.environ.get("RADOS_SECONDS", "15"))
ceph = h.CephCluster(osd_bytes=8 << 30).start()


def rados_bench(block, threads):
    out = subprocess.run(["rados", "-c", ceph.conf, "-p", ceph.pool, "bench", str(seconds), "write", "-b", str(block),
                          "-t", str(threads), "--no-cleanup"], stdout=subprocess.PIPE, text=True).stdout
    m = re.search(r"^Bandwidth \(MB/sec\):\s+([\d.]+)", out, re.M)
    lat = re.search(r"^Average Latency\(s\):\s+([\d.]+)", out, re.M)
    mbs = float(m.group(1)) * 1.048576 if m else 0.0   # rados bench says MB for MiB: in 10^6 bytes like resctl
    print("rados bench write %8d B x %2d in flight: %8.2f MB/s, average latency %.2f ms"
          % (block, threads, mbs, float(lat.group(1)) * 1000 if lat else 0), flush=True)
    return mbs


limits = {"4m16": rados_bench(4 << 20, 16), "32k1": rados_bench(32768, 1), "32k64": rados_bench(32768, 64)}
subprocess.run(["rados", "-c", ceph.conf, "-p", ceph.pool, "cleanup"], stdout=subprocess.DEVNULL, check=False)


def start(backend):
    port = h.free_port()
    conf = os.path.join(work, "bench-%s.conf" % backend)
    run = os.path.join(work, "run-%s" % backend)
    os.makedirs(run, exist_ok=True)
    with open(conf, "w") as f:
        f.write("""[server]
listen = 127.0.0.1:%d
workers = auto
run_dir = %s
pid_file = %s/resourced.pid
max_connections = 20000
idle_timeout = 600
[storage]
root = %s/root-%s
backend = %s
max_file_size = 1073741824
dedup = off
# each pool thread waits for one RADOS operation at a time: enough of them to keep the cluster busy
io_threads = 32
[rados]
conf = %s
user = admin
pool = %s
namespace = bench
gc_grace = 5
[redis]
port = %s
[log]
level = warn
file = %s/resourced-%s.log
""" % (port, run, run, work, backend, backend, ceph.conf, ceph.pool, rport, work, backend))
    d = subprocess.Popen([os.environ["RESOURCED_BIN"], "-f", "-c", conf], start_new_session=True)
    h.at_cleanup(lambda: (d.poll() is None and d.terminate(), d.wait(10)))
    addr = "127.0.0.1:%d" % port
    h.wait_for(lambda: subprocess.run([resctl, "ping", addr, "--timeout", "1"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL).returncode == 0, 30, 0.1)
    return d, addr


SCENARIOS = [   # label, resctl bench arguments, the rados bench figure it is compared with
    ("1 conn upload 256 MiB", ["--connections", "1", "--size", "268435456", "--files", "1", "--mode", "upload"], "32k1"),
    ("1 conn download", ["--connections", "1", "--size", "268435456", "--mode", "download"], None),
    ("64 conns upload 8 MiB", ["--connections", "64", "--size", "8388608", "--mode", "upload"], "32k64"),
    ("64 conns download", ["--connections", "64", "--size", "8388608", "--mode", "download"], None),
]
results = {}
for backend in ("fs", "rados"):
    d, addr = start(backend)
    for label, args, _ in SCENARIOS:
        out = subprocess.run([resctl, "bench", addr, *args, "--duration", str(seconds), "--uid", "1", "--token", "bench",
                              "--chunk", "32768", "--json"], stdout=subprocess.PIPE, text=True).stdout
        try:
            r = json.loads(out)
        except ValueError:
            r = {"mb_per_s": 0, "rtt_ms": {"p50": 0}, "errors": {"no answer": 1}}
        results[(backend, label)] = r
    d.terminate()
    d.wait(30)

print("%-24s %9s %9s %9s %12s %9s  %s" % ("scenario (32 KiB chunks)", "fs MB/s", "rados", "p50 ms", "rados bench",
                                          "rados %", "errors (rados)"))
for label, _, limit in SCENARIOS:
    f, r = results[("fs", label)], results[("rados", label)]
    lim = limits.get(limit) if limit else None
    errors = ", ".join("%s x%d" % kv for kv in r.get("errors", {}).items()) or "none"
    print("%-24s %9.2f %9.2f %9.3f %12s %9s  %s" % (
        label, f["mb_per_s"], r["mb_per_s"], r["rtt_ms"]["p50"], "%.2f" % lim if lim else "-",
        "%.0f%%" % (100 * r["mb_per_s"] / lim) if lim else "-", errors), flush=True)
print("rados bench 4 MiB x 16 in flight (the engine's large-write limit): %.2f MB/s" % limits["4m16"])
ceph.kill()
PY
fi

#!/bin/bash
# quickstart.sh: installs, builds and starts resourced in the foreground with private Redis and PostgreSQL.
#
# Everything lives under ./dev (config, files, logs, the stats socket) and
# /var/tmp/resourced-dev-<id of this clone> (the PostgreSQL cluster, which must
# be owned by the postgres user), so two clones do not meet. Ctrl-C stops the
# server and both databases, and removes those two directories when this run
# created them; RESOURCED_KEEP=1 keeps them (uploaded files, the database), and
# the next run uses them again. A failure on the way stops what was started and
# keeps the directories, whose logs say why. A demo user uid 1
# with token "demo" is created, so this works at once:
#   src/resctl/resctl upload 127.0.0.1:9090 FILE --uid 1 --token demo
# The port is 9090 unless RESOURCED_PORT says otherwise; a port already in use
# is reported before anything starts.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
port=${RESOURCED_PORT:-9090}
keep=${RESOURCED_KEEP:-}

say() { echo "quickstart: $*" >&2; }

# Before anything is started: a taken port would only fail at the very end.
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
	say "port $port on 127.0.0.1 is in use (another quickstart, or another server);"
	say "choose another one: RESOURCED_PORT=9191 $0"
	exit 1
fi

# One quickstart per clone: a second one would take over the first one's Redis socket (and remove
# it when it stops) and fail on its PostgreSQL cluster. The lock is this shell's alone (fd 9 is
# closed for what it starts), so it goes with it.
dev_created=
[ -d "$top/dev" ] || dev_created=1
mkdir -p "$top/dev"
exec 9>"$top/dev/.quickstart.lock"
if ! flock -n 9; then
	say "a quickstart of this clone is already running: use that one, stop it first (Ctrl-C in its"
	say "shell), or run this from another clone"
	exit 1
fi

sh contrib/deps.sh --run   # what building and running needs; `sh contrib/deps.sh` adds the test tools
[ -x configure ] || ./autogen.sh
[ -f Makefile ] || ./configure
make -j"$(nproc)"

dev=$top/dev
clone_id=$(printf '%s' "$top" | md5sum | cut -c1-8)
pgdir=/var/tmp/resourced-dev-$clone_id
mkdir -p "$dev/files" "$dev/run" "$dev/redis"
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)

# Stops what this run started, whatever the reason for leaving; after a stop (Ctrl-C: status 0
# from resourced, or a signal's 128+n) also removes the directories this run created, unless
# RESOURCED_KEEP is set. After a failure they stay: their logs say what went wrong.
redis_started=
pg_started=
pg_created=
stop_all() {
	status=$?
	if [ -n "$pg_started" ]; then
		runuser -u postgres -- "$pgbin/pg_ctl" -D "$pgdir/data" -m fast stop >/dev/null 2>&1 || true
	fi
	if [ -n "$redis_started" ] && [ -f "$dev/redis/redis.pid" ]; then
		kill "$(cat "$dev/redis/redis.pid")" 2>/dev/null || true
		# Gone before its directory is: redis-server writes nothing there on its way out.
		for _ in $(seq 50); do
			[ -f "$dev/redis/redis.pid" ] || break
			sleep 0.1
		done
	fi
	local created=()
	[ -n "$pg_created" ] && created+=("$pgdir")
	[ -n "$dev_created" ] && created+=("$dev")
	[ ${#created[@]} -gt 0 ] || return 0
	if [ "$status" -ne 0 ] && [ "$status" -lt 128 ]; then
		say "kept for a look at what failed: ${created[*]} (rm -rf them when done)"
	elif [ -n "$keep" ]; then
		say "RESOURCED_KEEP is set: kept ${created[*]} (the next run uses them again)"
	else
		rm -rf "${created[@]}"
		say "removed ${created[*]} (RESOURCED_KEEP=1 keeps them)"
	fi
}
trap stop_all EXIT
# Ctrl-C while a command other than resourced runs (the build, initdb): bash exits through the EXIT trap.
trap 'exit 130' INT
trap 'exit 143' TERM

rm -f "$dev/redis/redis.pid"   # a stale one could name somebody else's process by now
if ! redis-server 9>&- --port 0 --unixsocket "$dev/redis/redis.sock" --unixsocketperm 700 \
	--save '' --appendonly no --dir "$dev/redis" --daemonize yes \
	--pidfile "$dev/redis/redis.pid" --logfile "$dev/redis/redis.log"; then
	say "redis-server did not start; see $dev/redis/redis.log"
	exit 1
fi
redis_started=1
for _ in $(seq 50); do
	redis-cli -s "$dev/redis/redis.sock" PING >/dev/null 2>&1 && break
	sleep 0.1
done
if ! redis-cli -s "$dev/redis/redis.sock" PING >/dev/null 2>&1; then
	say "redis-server does not answer on $dev/redis/redis.sock; see $dev/redis/redis.log"
	exit 1
fi

if [ ! -f "$pgdir/data/PG_VERSION" ]; then
	[ -d "$pgdir" ] || pg_created=1
	mkdir -p "$pgdir"
	chown postgres: "$pgdir"
	runuser -u postgres -- "$pgbin/initdb" -D "$pgdir/data" -A trust -U postgres >/dev/null
fi
if ! runuser 9>&- -u postgres -- "$pgbin/pg_ctl" -D "$pgdir/data" -l "$pgdir/pg.log" -w \
	-o "-c listen_addresses='' -c unix_socket_directories=$pgdir" start >/dev/null; then
	say "PostgreSQL did not start; its log is $pgdir/pg.log:"
	tail -n 15 "$pgdir/pg.log" >&2 || true
	exit 1
fi
pg_started=1
# The schema is idempotent; its "already exists, skipping" notices are noise on a rerun.
export PGOPTIONS='-c client_min_messages=warning'
psql -q -v ON_ERROR_STOP=1 -h "$pgdir" -U postgres -d postgres -f contrib/schema.sql
psql -q -v ON_ERROR_STOP=1 -h "$pgdir" -U postgres -d postgres -c \
	"INSERT INTO \"user\" (uid, name, nick) VALUES (1, 'demo', 'Demo') ON CONFLICT (uid) DO NOTHING"
redis-cli -s "$dev/redis/redis.sock" SET utoken_1 demo >/dev/null

cat > "$dev/resourced.conf" <<CONF
# Written by contrib/quickstart.sh: a private development setup.
[server]
listen = 127.0.0.1:$port
workers = auto
run_dir = $dev/run
pid_file = $dev/run/resourced.pid
stats_socket = $dev/run/stats.sock
[storage]
root = $dev/files
[redis]
socket = $dev/redis/redis.sock
[postgres]
conninfo = host=$pgdir dbname=postgres user=postgres
[log]
level = info
CONF
# Its report only when it fails: its warnings are about a start without -f, not this one.
if ! src/resourced -t -c "$dev/resourced.conf" >"$dev/check.out" 2>&1; then
	cat "$dev/check.out" >&2
	exit 1
fi
cat >&2 <<EOF
resourced: listening on 127.0.0.1:$port (uid 1, token demo); Ctrl-C stops it. From a second shell:
  src/resctl/resctl upload 127.0.0.1:$port FILE --uid 1 --token demo
  src/resctl/resctl download 127.0.0.1:$port NAME OUTFILE --uid 1 --token demo
  src/resctl/resctl stats --socket $dev/run/stats.sock show info      (also: show workers, show metrics, help)
  kill -HUP \$(cat $dev/run/resourced.pid)                      (reload; QUIT: graceful stop)
EOF
if [ -n "$pg_created$dev_created" ] && [ -z "$keep" ]; then
	say "Ctrl-C also removes what this run created (RESOURCED_KEEP=1 keeps it for the next run)"
fi
src/resourced -f -c "$dev/resourced.conf" 9>&-

#!/bin/bash
# quickstart.sh: installs, builds and starts resourced in the foreground with private Redis and PostgreSQL.
#
# Everything lives under ./dev (config, files, logs) and /var/tmp/resourced-dev
# (the PostgreSQL cluster, which must be owned by the postgres user). Ctrl-C
# stops the server and both databases. A demo user uid 1 with token "demo" is
# created, so this works at once:
#   src/resctl upload 127.0.0.1:9090 FILE --uid 1 --token demo
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
sh contrib/deps.sh
[ -x configure ] || ./autogen.sh
[ -f Makefile ] || ./configure
make -j"$(nproc)"

dev=$top/dev
pgdir=/var/tmp/resourced-dev
mkdir -p "$dev/files" "$dev/run" "$dev/redis"
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)

redis-server --port 0 --unixsocket "$dev/redis/redis.sock" --unixsocketperm 700 \
	--save '' --appendonly no --dir "$dev/redis" --daemonize yes \
	--pidfile "$dev/redis/redis.pid" --logfile "$dev/redis/redis.log"

if [ ! -f "$pgdir/data/PG_VERSION" ]; then
	mkdir -p "$pgdir"
	chown postgres: "$pgdir"
	runuser -u postgres -- "$pgbin/initdb" -D "$pgdir/data" -A trust -U postgres >/dev/null
fi
runuser -u postgres -- "$pgbin/pg_ctl" -D "$pgdir/data" -l "$pgdir/pg.log" -w \
	-o "-c listen_addresses='' -c unix_socket_directories=$pgdir" start >/dev/null
stop_all() {
	runuser -u postgres -- "$pgbin/pg_ctl" -D "$pgdir/data" -m fast stop >/dev/null 2>&1 || true
	[ -f "$dev/redis/redis.pid" ] && kill "$(cat "$dev/redis/redis.pid")" 2>/dev/null || true
}
trap stop_all EXIT
psql -q -h "$pgdir" -U postgres -d postgres -f contrib/schema.sql
psql -q -h "$pgdir" -U postgres -d postgres -c \
	"INSERT INTO \"user\" (uid, name, nick) VALUES (1, 'demo', 'Demo') ON CONFLICT (uid) DO NOTHING"
redis-cli -s "$dev/redis/redis.sock" SET utoken_1 demo >/dev/null

cat > "$dev/resourced.conf" <<CONF
# Written by contrib/quickstart.sh: a private development setup.
[server]
listen = 127.0.0.1:9090
workers = auto
run_dir = $dev/run
pid_file = $dev/run/resourced.pid
[storage]
root = $dev/files
[redis]
socket = $dev/redis/redis.sock
[postgres]
conninfo = host=$pgdir dbname=postgres user=postgres
[log]
level = info
CONF
echo "resourced: listening on 127.0.0.1:9090 (uid 1, token demo); Ctrl-C stops it"
src/resourced -f -c "$dev/resourced.conf"

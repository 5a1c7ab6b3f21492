#!/bin/sh
# deps.sh: installs the Debian 12 packages needed to build, run and test resourced (run as root; --run: build and run only).
set -e
# Building and running the server (what contrib/quickstart.sh needs: `deps.sh --run`).
RUN_PACKAGES="build-essential autoconf automake pkg-config
  libev-dev libyajl-dev libhiredis-dev libpq-dev libsodium-dev libinih-dev libssl-dev libmodpbase64-dev libbsd-dev libmicrohttpd-dev
  uthash-dev libsystemd-dev redis-server postgresql procps"
# Testing, packaging and benchmarking it (the whole of `make check`, .ci/run, contrib/bench.sh).
PACKAGES="$RUN_PACKAGES
  check python3 valgrind haproxy
  clang libclang-rt-14-dev
  chromium debhelper adduser
  librados-dev ceph-mon ceph-osd ceph-common python3-rados
  gnuplot-nox"
# chromium: test_http.py renders the status page in it headless (skipped without it).
# debhelper, adduser: test_deb.py builds and installs the .deb.
# ceph-*, librados-dev, python3-rados: the RADOS backend and its suites (rados_test_*.py).
# gnuplot-nox: contrib/bench.sh draws throughput against connections as an SVG.
# --run: only RUN_PACKAGES (no browser, Ceph or compilers for the sanitizers to download).
if [ "${1:-}" = "--run" ]; then
	PACKAGES=$RUN_PACKAGES
	shift
fi
if [ "${1:-}" = "--print" ]; then
	echo $PACKAGES
	exit 0
fi
missing=$(dpkg-query -W -f='${Package} ${Status}\n' $PACKAGES 2>/dev/null | awk '$4 != "installed" {print $1}')
# Packages dpkg has never heard of are missing too.
for p in $PACKAGES; do dpkg-query -W "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$(echo $missing)" ]; then
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q
	apt-get install -y -q --no-install-recommends $PACKAGES
fi
# The packaged servers are not needed as system services: tests and the
# quickstart run private instances.

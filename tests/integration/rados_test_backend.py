#!/usr/bin/env python3
# rados_test_backend.py: the storage interface's contract test (tests/unit/test_backend) against RADOS, on a throwaway Ceph cluster.
import os
import subprocess
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

# The unit test lives in the build tree beside src/resourced.
unit = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(h.RESOURCED_BIN))), "tests", "unit", "test_backend")
if os.environ.get("RESOURCED_HAVE_RADOS", "yes") != "yes":
    print("1..0 # SKIP resourced was built without librados (apt-get install librados-dev; configure again)")
    sys.exit(0)
if h.ceph_missing() or not os.access(unit, os.X_OK):
    print("1..0 # SKIP needs Ceph (contrib/deps.sh) and the unit tests (the check library): %s"
          % ", ".join(h.ceph_missing() or [unit]))
    sys.exit(0)
ceph = h.CephCluster().start()
env = dict(os.environ, RESOURCED_TEST_CEPH_CONF=ceph.conf, RESOURCED_TEST_CEPH_POOL=ceph.pool)
rc = subprocess.run([unit], env=env, stdin=subprocess.DEVNULL, timeout=300).returncode
ceph.stop()
h.cleanup_all()
sys.exit(rc)

#!/usr/bin/env python3
# rados_test_crash.py: test_crash.py against the RADOS backend, on a throwaway Ceph cluster (harness.CephCluster).
import os
import runpy
import sys

sys.dont_write_bytecode = True
here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
import harness as h  # noqa: E402

if os.environ.get("RESOURCED_HAVE_RADOS", "yes") != "yes":
    print("1..0 # SKIP resourced was built without librados (apt-get install librados-dev; configure again)")
    sys.exit(0)
if os.environ.get("RESOURCED_SANITIZED") and not os.environ.get("RESOURCED_TEST_RADOS_SANITIZED"):
    # CI time: the sanitizer pass runs backend_rados.c through rados_test_backend.py, and the fs run
    # covers the code the backends share; RESOURCED_TEST_RADOS_SANITIZED=1 runs this one too
    print("1..0 # SKIP the RADOS suites run once, without the sanitizers (RESOURCED_TEST_RADOS_SANITIZED=1 runs it)")
    sys.exit(0)
if h.ceph_missing():
    print("1..0 # SKIP Ceph is not installed (%s): run contrib/deps.sh" % ", ".join(h.ceph_missing()))
    sys.exit(0)
os.environ["RESOURCED_TEST_BACKEND"] = "rados"
h.TEST_BACKEND = "rados"
runpy.run_path(os.path.join(here, "test_crash.py"), run_name="__main__")

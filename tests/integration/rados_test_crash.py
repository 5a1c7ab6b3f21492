#!/usr/bin/env python3
# rados_test_crash.py: test_crash.py against the RADOS backend, on a throwaway Ceph cluster (harness.CephCluster).
import os
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

h.run_on_rados("test_crash.py")

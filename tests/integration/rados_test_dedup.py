#!/usr/bin/env python3
# rados_test_dedup.py: test_dedup.py (instant upload) against the RADOS backend's content index, on a throwaway Ceph cluster.
import os
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

h.run_on_rados("test_dedup.py")

#!/usr/bin/env python3
# rados_test_multinode.py: test_multinode.py against the RADOS backend: three nodes on one pool and namespace behind HAProxy.
import os
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

h.run_on_rados("test_multinode.py")

#!/usr/bin/env python3
"""gen_seeds.py: writes the seed corpora of the fuzz targets (tests/fuzz/corpus/<target>/).

Run once from anywhere; the seeds it writes are committed. Bodies are laid out
as Qt's QJsonDocument::toJson() writes them (keys sorted, 4-space indent,
"key": value, a trailing newline); IPC messages are in the host byte order of
x86-64 (little-endian), as src/ipc.c writes them.
"""
import base64
import hashlib
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def qt_json(obj, indent=0):
    """QJsonDocument::toJson(QJsonDocument::Indented) for objects of scalars, arrays and objects."""
    pad = "    " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{\n" + "    " * indent + "}"
        items = [pad + '"%s": %s' % (k, qt_json(obj[k], indent + 1)) for k in sorted(obj)]
        return "{\n" + ",\n".join(items) + "\n" + "    " * indent + "}"
    if isinstance(obj, list):
        if not obj:
            return "[\n" + "    " * indent + "]"
        items = [pad + qt_json(v, indent + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + "    " * indent + "]"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if obj is None:
        return "null"
    if isinstance(obj, (int, float)):
        return repr(obj)
    s = obj.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + s + '"'


def body(obj):
    return (qt_json(obj) + "\n").encode("utf-8")


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


FILE = b"hello, resourced\n" * 3
MD5 = hashlib.md5(FILE).hexdigest()
AVATAR = bytes(range(256))[:90]
AVATAR_MD5 = hashlib.md5(AVATAR).hexdigest()


def b64(b):
    return base64.b64encode(b).decode()


BODIES = {
    # 1001 test, with nested data to echo
    "1001_test": (1001, {"data": {"ping": [1, 2.5, "x", True, None], "n": "十"}}),
    # 1003: the first of two chunks, sizes as numbers
    "1003_first": (1003, {"md5": MD5, "name": "notes.txt", "seq": 1, "trans_size": 30,
                          "total_size": len(FILE), "last": 0, "last_seq": 2, "uid": 1001,
                          "token": "6f1ed002ab5595859014ebf0951522d9", "data": b64(FILE[:30])}),
    # 1003: the last chunk, sizes as strings (later clients), upper-case md5
    "1003_last_strings": (1003, {"md5": MD5.upper(), "name": "notes.txt", "seq": "2",
                                 "trans_size": str(len(FILE)), "total_size": str(len(FILE)),
                                 "last": 1, "last_seq": 2, "uid": "1001",
                                 "token": "6f1ed002ab5595859014ebf0951522d9",
                                 "data": b64(FILE[30:])}),
    # 1003 from the original demo client: no credentials (anonymous mode)
    "1003_anonymous": (1003, {"md5": MD5, "name": "报告 2024.txt", "seq": 1,
                              "trans_size": len(FILE), "total_size": len(FILE), "last": 1,
                              "data": b64(FILE)}),
    # 1005 sync
    "1005_sync": (1005, {"md5": MD5, "uid": 1001, "token": "6f1ed002ab5595859014ebf0951522d9"}),
    # 1031 avatar, one chunk
    "1031_avatar": (1031, {"md5": AVATAR_MD5, "name": "head_1001.png", "seq": 1,
                           "trans_size": len(AVATAR), "total_size": len(AVATAR), "last": 1,
                           "last_seq": 1, "uid": 1001, "token": "6f1ed002ab5595859014ebf0951522d9",
                           "data": b64(AVATAR)}),
    # 1033 download
    "1033_download": (1033, {"name": "notes.txt", "seq": 1, "uid": 1001,
                             "token": "6f1ed002ab5595859014ebf0951522d9",
                             "client_path": "C:/Users/me/Downloads/notes.txt",
                             "trans_size": 0, "total_size": 0}),
    # 1033 with sizes as strings and a later chunk
    "1033_download_seq3": (1033, {"name": "video.mp4", "seq": "3", "uid": "7",
                                  "token": "t", "client_path": "/home/me/video.mp4",
                                  "trans_size": "65536", "total_size": "1000000"}),
}


def frame(msg_id, b):
    return struct.pack(">HI", msg_id, len(b)) + b


IPC_VERSION = 3   # src/ipc.h


def ipc_header(typ, reqid, payload):
    return struct.pack("<HHIQ", typ, IPC_VERSION, len(payload), reqid) + payload


def ipc_chunk(reqid, uid, seq, trans, total, kind, last, md5, name, data):
    n = name.encode()
    p = struct.pack("<QQQQBB", uid, seq, trans, total, kind, last) + md5.encode()
    p += struct.pack("<H", len(n)) + n + struct.pack("<I", len(data)) + data
    return ipc_header(3, reqid, p)


def ipc_chunk_ref(reqid, uid, seq, trans, total, kind, last, md5, name, data_len, slot, offset):
    n = name.encode()
    p = struct.pack("<QQQQBB", uid, seq, trans, total, kind, last) + md5.encode()
    p += struct.pack("<H", len(n)) + n + struct.pack("<IIQ", data_len, slot, offset)
    return ipc_header(9, reqid, p)


def ipc_sync(reqid, uid, md5):
    return ipc_header(4, reqid, struct.pack("<Q", uid) + md5.encode())


def ipc_result(reqid, error, seq, trans, total, name, message, kind=0):
    n, m = name.encode(), message.encode()
    p = struct.pack("<IQQQB", error, seq, trans, total, kind) + struct.pack("<H", len(n)) + n
    p += struct.pack("<H", len(m)) + m
    return ipc_header(5, reqid, p)


def main():
    # fuzz_request: bodies alone
    for name, (_, obj) in BODIES.items():
        write("fuzz_request", name + ".json", body(obj))
    write("fuzz_request", "compact_1005.json",
          b'{"md5":"%s","uid":1001,"token":"abc"}' % MD5.encode())

    # fuzz_frame: whole frames, a pipelined upload, a cut-off frame, an oversize header
    for name, (msg_id, obj) in BODIES.items():
        write("fuzz_frame", name + ".bin", frame(msg_id, body(obj)))
    pipelined = frame(1003, body(BODIES["1003_first"][1])) + frame(1003, body(BODIES["1003_last_strings"][1]))
    write("fuzz_frame", "pipelined_upload.bin", pipelined)
    write("fuzz_frame", "partial.bin", pipelined[: len(pipelined) - 17])
    write("fuzz_frame", "oversize.bin", frame(1001, b"{}")[:2] + struct.pack(">I", 300000) + b"{}")
    write("fuzz_frame", "unknown_id_empty.bin", frame(4242, b"") + frame(1001, b'{"data":""}'))

    # fuzz_ipc: one message of each type, and a stream of several
    c1 = ipc_chunk(1, 1001, 1, 30, len(FILE), 0, 0, MD5, "notes.txt", FILE[:30])
    c2 = ipc_chunk(2, 1001, 2, len(FILE), len(FILE), 0, 1, MD5, "notes.txt", FILE[30:])
    av = ipc_chunk(3, 1001, 1, len(AVATAR), len(AVATAR), 1, 1, AVATAR_MD5, "head_1001.png", AVATAR)
    sy = ipc_sync(4, 1001, MD5)
    ok = ipc_result(1, 0, 1, 30, len(FILE), "notes.txt", "")
    bad = ipc_result(5, 1024, 0, 0, len(FILE), "notes.txt", "checksum mismatch: start again")
    ping = ipc_header(1, 9, b"")
    pong = ipc_header(2, 9, b"")
    write("fuzz_ipc", "chunk_first.bin", c1)
    write("fuzz_ipc", "chunk_last.bin", c2)
    write("fuzz_ipc", "chunk_avatar.bin", av)
    write("fuzz_ipc", "sync.bin", sy)
    write("fuzz_ipc", "result_ok.bin", ok)
    write("fuzz_ipc", "result_error.bin", bad)
    write("fuzz_ipc", "ping_pong.bin", ping + pong)
    ref = ipc_chunk_ref(6, 1001, 2, len(FILE), len(FILE), 0, 1, MD5, "notes.txt", len(FILE) - 30, 3, 65536)
    ring = ipc_header(7, 0, struct.pack("<Q", 32 << 20))
    ring_ok = ipc_header(8, 0, struct.pack("<I", 0))
    write("fuzz_ipc", "chunk_ref.bin", ref)
    write("fuzz_ipc", "ring_offer_answer.bin", ring + ring_ok)
    write("fuzz_ipc", "worker_to_storage_stream.bin", ping + c1 + sy + c2)
    write("fuzz_ipc", "worker_to_storage_ring_stream.bin", ring + ping + c1 + ref)
    write("fuzz_ipc", "storage_to_worker_stream.bin", pong + ok + bad)

    # fuzz_config: the shipped file, a minimal one and one that changes everything
    with open(os.path.join(HERE, "..", "..", "etc", "resourced.conf"), "rb") as f:
        write("fuzz_config", "resourced.conf", f.read())
    write("fuzz_config", "minimal.conf", b"[storage]\nroot = /srv/files\n")
    write("fuzz_config", "everything.conf", b"""; every key, none at its default
[server]
listen = [::1]:9191
workers = 3
run_dir = /tmp/resourced-run
pid_file = /tmp/resourced-run/pid
user = resourced
group = resourced
node = node-a
max_frame = 1048576
output_cap = 4096
idle_timeout = 86400
frame_timeout = 1
max_connections = 1000000
auth_cache_ttl = 0
anonymous = yes
download_chunk = 16777216
storage_timeout = 3600
shutdown_timeout = 1
stats_socket = /tmp/resourced-run/stats.sock
agent_listen = 127.0.0.1:9091
proxy_protocol = on

[storage]
root = /srv/resourced
max_file_size = 1125899906842624
upload_ttl = 2592000
fsync = always
io_threads = 64
janitor_interval = 1

[redis]
host = redis.internal
port = 6380
socket = /run/redis/redis.sock
password = s3cret
db = 65535
prefix = chat:

[postgres]
conninfo = host=/run/postgresql dbname=chat user=resourced
timeout = 3600

[log]
level = debug
file = /var/log/resourced.log
access_log = /var/log/resourced-access.log
""")
    write("fuzz_config", "bad_value.conf", b"[server]\nlisten = 9090\nworkers = 0\n")
    write("fuzz_config", "bare_port_fsync_none.conf", b"[server]\nlisten = 9090\n[storage]\nfsync = none\n[log]\nlevel = warn\n")


if __name__ == "__main__":
    main()

# test_meta_names.py: names of every allowed byte and JSON escape at the 255-byte limit survive staging metadata and a storage kill -9.
import json
import os
import signal
import sys

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=150)

U = 4201
TOK = "tok-4201-names"
CHUNK = 4096
NAME_MAX = 255
rand = __import__("random").Random(255)


def pack(chars, pad='"'):
    """Names of exactly NAME_MAX bytes holding every char of chars, in order, padded with pad."""
    names, cur = [], ""
    for ch in chars:
        if len((cur + ch).encode()) > NAME_MAX:
            names.append(cur)
            cur = ""
        cur += ch
    names.append(cur)
    out = []
    for n in names:
        if n.startswith("."):
            n = pad + n[:-1] if len(n.encode()) >= NAME_MAX else pad + n
        while len(n.encode()) < NAME_MAX:
            n += pad
        while len(n.encode()) > NAME_MAX:   # a multi-byte char pushed past the limit by the leading pad
            n = n[:-1]
            while len(n.encode()) < NAME_MAX:
                n += pad
        out.append(n)
    return out


def build_names():
    ascii_ok = [chr(b) for b in range(0x20, 0x7f) if chr(b) not in "/\\"]
    multi = [chr(cp) for cp in range(0xA0, 0x100)]                 # C2 A0-BF and C3 80-BF: every continuation byte
    multi += [chr((lead & 0x1F) << 6) for lead in range(0xC4, 0xE0)]                       # leads C4-DF
    multi += [chr(((lead & 0x0F) << 12) | (0x800 if lead == 0xE0 else 0)) for lead in range(0xE0, 0xF0)]  # E0-EF
    multi += [chr(max((lead & 0x07) << 18, 0x10000)) for lead in range(0xF0, 0xF5)]       # F0-F4
    multi += ["\u2028", "\u2029", "\ufeff", "\ufffd", "\uffff", "\U0010ffff", "\U0001f600"]
    names = {"quotes": '"' * NAME_MAX}                            # the original overflow: every byte escaped
    for i, n in enumerate(pack(ascii_ok)):
        names["ascii-%d" % i] = n
    for i, n in enumerate(pack(multi)):
        names["utf8-%d" % i] = n
    names["quote-e9"] = ('"\u00e9' * 200).encode()[:NAME_MAX].decode("utf-8", "ignore")
    while len(names["quote-e9"].encode()) < NAME_MAX:
        names["quote-e9"] += '"'
    names["space-lead"] = " " + "'" * (NAME_MAX - 1)
    return names


NAMES = build_names()
used = set()
for label, n in NAMES.items():
    for b in n.encode():
        used.add(b)
allowed = set(range(0x20, 0x7f)) - {ord("/"), ord("\\")} | set(range(0x80, 0xC0)) | set(range(0xC2, 0xF5))
tap.ok(allowed <= used, "the names use every byte value a name may hold (%d values)" % len(allowed),
       repr(sorted(allowed - used)))
tap.ok(all(len(n.encode()) == NAME_MAX for n in NAMES.values()), "every name is exactly %d bytes" % NAME_MAX,
       repr({k: len(n.encode()) for k, n in NAMES.items() if len(n.encode()) != NAME_MAX}))


def escaped_everything(s):
    """s as a JSON string literal with every character escaped: \\" for quotes, \\uXXXX (surrogate pairs above
    U+FFFF) for everything else."""
    out = []
    for ch in s:
        cp = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append("\\u%04x\\u%04x" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF)))
        else:
            out.append("\\u%04X" % cp if cp % 2 else "\\u%04x" % cp)   # both hex cases
    return '"' + "".join(out) + '"'


# ---------------------------------------------------------------- servers
redis = h.RedisServer().start()
redis.set_token(U, TOK)
d = h.Daemon(workers=1, redis=redis, settings={"server": {"storage_timeout": 10}})
tap.context.append(lambda: d.log_tail(12))
d.start_or_finish(tap)
tap.ok(d.wait_redis_connected(15), "daemon started; worker and storage connected to Redis")


class Escaped(h.Upload):
    """An upload whose name goes on the wire with every character escaped (or as raw UTF-8 when raw)."""
    raw = False

    def frame(self, offset, seq, **override):
        body = self.body(offset, seq, **override)
        name = body.pop("name")
        text = json.dumps(body, ensure_ascii=False)
        lit = json.dumps(name, ensure_ascii=False) if self.raw else escaped_everything(name)
        return h.frame(self.msg_id, "{\"name\":" + lit + "," + text[1:])


ups = {}
with tap.section("three chunks of each upload, names escaped on the wire"):
    bad = []
    with h.Client(d.port) as c:
        for label, name in NAMES.items():
            up = Escaped(rand.randbytes(5 * CHUNK + 123), name, U, TOK, chunk_size=CHUNK)
            r, off, seq = up.run(c, max_chunks=3)
            if r.get("error") != 0 or r.get("trans_size") != str(3 * CHUNK) and r.get("trans_size") != 3 * CHUNK:
                bad.append((label, r))
            ups[label] = (up, off, seq)
    tap.eq(bad, [], "%d uploads accepted their first three chunks" % len(NAMES))
    metas = [f for f in os.listdir(os.path.join(d.root, ".staging")) if f.endswith(".meta")]
    parsed = {}
    for f in metas:
        try:
            m = json.loads(h.read_file(os.path.join(d.root, ".staging", f)))
            parsed[m["md5"]] = m["name"]
        except (ValueError, KeyError) as e:
            parsed[f] = "unparsable: %r" % e
    want = {up.md5: up.name for up, _, _ in ups.values()}
    tap.ok(parsed == want, "every .meta is one JSON object naming its upload exactly",
           repr({k: v for k, v in parsed.items() if want.get(k) != v})[:600])

with tap.section("kill -9 of the storage process, then sync and resume"):
    old = d.storage_pid()
    os.kill(old, signal.SIGKILL)
    tap.ok(h.wait_for(lambda: d.storage_pid() not in (None, old), 15), "a new storage process runs")
    progress = {}
    with h.Client(d.port) as c:
        for label, (up, off, seq) in ups.items():
            r = h.wait_for(lambda: (lambda x: x if x.get("error") != 1027 else None)(up.sync(c)), 20, 0.1)
            progress[label] = r
    lost = {k: r for k, r in progress.items() if not r or r.get("error") != 0 or int(r.get("trans_size", -1)) != 3 * CHUNK}
    tap.eq(lost, {}, "after the restart sync reports the progress of all %d uploads (trans_size %d)"
           % (len(ups), 3 * CHUNK))
    tap.ok(all(r and r.get("name") == ups[k][0].name for k, r in progress.items()),
           "and names each upload exactly", repr({k: (r or {}).get("name") for k, r in progress.items()
                                                  if (r or {}).get("name") != ups[k][0].name})[:600])
    done = {}
    with h.Client(d.port) as c:
        for label, (up, off, seq) in ups.items():
            up.raw = True                   # the rest of the chunks name it in plain UTF-8
            r, _, _ = up.run(c, offset=off, seq=seq)
            path = h.published(d, U, up.name)
            done[label] = r.get("error") == 0 and os.path.exists(path) and h.read_file(path) == up.data
    tap.ok(all(done.values()), "every upload completes byte-identical under its exact name",
           repr([k for k, ok in done.items() if not ok]))
    tap.eq(sorted(os.listdir(os.path.join(d.root, ".staging"))), [], "no staging entry is left")
    tap.eq(d.log_count("dropping unreadable staging entry"), 0, "recovery dropped no staging entry")

tap.ok(d.log_count("AddressSanitizer") == 0 and d.log_count("runtime error") == 0, "no sanitizer report in the log")
d.stop()
redis.stop()
tap.finish()

# test_http.py: the master's HTTP listener (http_listen): /metrics as show metrics, /health as the agent-check, the status page with hostile names escaped (markup, and bidirectional controls shown as visible escapes), 404/405, slow clients that block nothing (slowloris from one address included), and a stats socket client that never reads.
import html
import html.parser
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

tap = h.Tap(deadline=240)

UID, TOKEN = 4201, "tok-4201-http"
# Valid names (PROTOCOL.md: no / \ or control characters) that are markup if written raw.
HOSTILE = ['<script>alert(1)<script>.txt', '<img src=x onerror=alert(1)>"\'&amp;.bin']
# A valid name whose right-to-left override (U+202E) and left-to-right isolate (U+2066) would make a
# browser show "invoice exe.pdf": the page must show them as visible escapes, never act on them.
BIDI = "invoice \u2066x\u202efdp.exe"
BIDI_SHOWN = "invoice \\u2066x\\u202efdp.exe"

redis = h.RedisServer().start()
redis.set_token(UID, TOKEN)
http_port = h.free_port()
d = h.Daemon(workers=2, redis=redis, stats=True)
d.settings["server"]["http_listen"] = "127.0.0.1:%d" % http_port
h.Daemon.write_config(d.conf_path, d.settings)
tap.context.append(lambda: d.log_tail(10))
d.start_or_finish(tap)
tap.ok(d.wait_redis_connected(15) and d.wait_workers(10), "daemon started; workers and storage connected to Redis")


def get(path, method="GET", timeout=10, body=None):
    """(status, headers dict with lower-case names, body bytes) of one request on a new connection."""
    c = http.client.HTTPConnection("127.0.0.1", http_port, timeout=timeout)
    try:
        c.request(method, path, body=body)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def master_rss():
    """The master's resident set in KiB."""
    with open("/proc/%d/status" % d.master_pid) as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def stats(*command):
    r = subprocess.run([h.RESCTL_BIN, "stats", "--socket", d.stats_socket] + list(command), stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20, text=True)
    return r.returncode, r.stdout


def listening_holders(port):
    """Pids that hold the listening TCP socket of 127.0.0.1:port (from /proc)."""
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(":%04X" % port) and fields[3] == "0A":   # 0A: LISTEN
                inodes.add("socket:[%s]" % fields[9])
    pids = set()
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            fds = os.listdir("/proc/%d/fd" % pid)
            if any(os.readlink("/proc/%d/fd/%s" % (pid, fd)) in inodes for fd in fds):
                pids.add(pid)
        except OSError:
            pass
    return pids


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})? '
                    r'(-?[0-9.e+]+|NaN|[+-]Inf)$')


def prometheus(text):
    """{(name, labels): value} of Prometheus text exposition 0.0.4, or raises ValueError on a bad line."""
    series, typed = {}, set()
    for line in text.splitlines():
        if not line:
            continue
        m = re.match(r'^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.+)$', line)
        if m:
            if m.group(1) == "TYPE":
                if m.group(3) not in ("counter", "gauge", "histogram", "summary", "untyped"):
                    raise ValueError("bad TYPE: %r" % line)
                typed.add(m.group(2))
            continue
        m = SAMPLE.match(line)
        if not m:
            raise ValueError("not a sample: %r" % line)
        if m.group(1) not in typed:
            raise ValueError("sample before its TYPE: %r" % line)
        key = (m.group(1), m.group(2) or "")
        if key in series:
            raise ValueError("duplicate series: %r" % line)
        series[key] = float(m.group(3))
    return series


# ---------------------------------------------------------------- /metrics
with tap.section("/metrics"):
    status, hdr, body = get("/metrics")
    tap.eq(status, 200, "GET /metrics: 200")
    tap.ok(hdr.get("content-type", "").startswith("text/plain; version=0.0.4"), "Prometheus text content type",
           repr(hdr))
    try:
        over_http = prometheus(body.decode())
        rc, text = stats("show", "metrics")
        over_socket = prometheus(text)
        parsed = True
    except ValueError as e:
        parsed, over_http, over_socket = False, {}, {}
        tap.diag(str(e))
    tap.ok(parsed and len(over_http) > 20, "it parses as Prometheus text (%d series)" % len(over_http))
    tap.eq(sorted(over_http), sorted(over_socket), "the same series as show metrics on the stats socket")
    # States do not move between the two reads; counters may, but never backwards.
    same = [k for k in over_http if k[0] in ("resourced_up", "resourced_draining", "resourced_process_up",
                                             "resourced_redis_up", "resourced_storage_up")]
    tap.ok(same and all(over_http[k] == over_socket.get(k) for k in same),
           "states equal in both (%d series)" % len(same), repr([(k, over_http[k], over_socket.get(k)) for k in same]))
    tap.eq(over_http.get(("resourced_up", "")), 1.0, "resourced_up 1")
    tap.ok(over_socket.get(("resourced_conn_total", ""), -1) >= over_http.get(("resourced_conn_total", ""), 0),
           "a counter read later is not smaller")
    # The Grafana dashboard in contrib/ asks only for metrics that exist.
    with open(os.path.join(os.environ.get("RESOURCED_SRCDIR", "."), "contrib", "grafana-resourced.json")) as f:
        used = set(re.findall(r'\bresourced_[a-z_]+', json.dumps([p.get("targets") for p in json.load(f)["panels"]])))
    typed = set(re.findall(r'^# TYPE (\S+)', body.decode(), re.M))
    tap.ok(len(used) > 10 and used <= typed, "every metric of contrib/grafana-resourced.json is exposed (%d)" % len(used),
           repr(sorted(used - typed)))
    status, hdr, body = get("/metrics", "HEAD")
    tap.ok(status == 200 and body == b"", "HEAD /metrics: 200 without a body", repr((status, body[:80])))

# ---------------------------------------------------------------- /health
with tap.section("/health"):
    status, _, body = get("/health")
    tap.ok(status == 200 and body == b"up\n", "GET /health: 200 up", repr((status, body)))
    rc, out = stats("disable")
    tap.ok(rc == 0 and out.startswith("OK"), "resctl stats disable", out)
    status, _, body = get("/health")
    tap.ok(status == 503 and body == b"drain\n", "after disable: 503 drain", repr((status, body)))
    status, _, body = get("/health", "HEAD")
    tap.ok(status == 503 and body == b"", "HEAD /health after disable: 503 without a body", repr((status, body)))
    rc, out = stats("enable")
    status, _, body = get("/health")
    tap.ok(rc == 0 and status == 200 and body == b"up\n", "after enable: 200 up", repr((status, body)))


# ---------------------------------------------------------------- the status page
class Page(html.parser.HTMLParser):
    """Tags seen, and the text of each cell of the transfers table."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.names, self.refresh = [], [], None
        self.table, self.in_name = None, False
        self.text = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "table":
            self.table = a.get("id")
        if tag == "meta" and a.get("http-equiv") == "refresh":
            self.refresh = a.get("content")
        if tag == "td" and self.table == "transfers" and a.get("class") == "name":
            self.in_name = True
            self.names.append("")

    def handle_endtag(self, tag):
        if tag == "td":
            self.in_name = False
        if tag == "table":
            self.table = None

    def handle_data(self, data):
        self.text.append(data)
        if self.in_name:
            self.names[-1] += data


with tap.section("status page"):
    ups = [h.Upload(os.urandom(3000), n, UID, TOKEN, chunk_size=1000) for n in HOSTILE + [BIDI]]
    holder = d.connect()
    for up in ups:
        r = up.send_chunk(holder, 0, 1)
        tap.eq(r.get("error"), 0, "chunk 1 of %r stored: the upload is in progress" % up.name)
    status, hdr, body = get("/")
    page = body.decode()
    tap.ok(status == 200 and hdr.get("content-type") == "text/html; charset=utf-8", "GET /: 200 HTML",
           repr((status, hdr)))
    tap.ok("script-src" not in hdr.get("content-security-policy", "x") and
           hdr.get("content-security-policy", "").startswith("default-src 'none'"),
           "a Content-Security-Policy that allows no script", repr(hdr))
    p = Page()
    p.feed(page)
    p.close()
    tap.ok("script" not in p.tags and "img" not in p.tags, "no script or img element on the page", repr(set(p.tags)))
    tap.eq(sorted(n for n in p.names if n in HOSTILE), sorted(HOSTILE),
           "both hostile names shown as text in the transfers table")
    tap.ok(all(n not in page for n in HOSTILE) and "&lt;script&gt;alert(1)&lt;script&gt;.txt" in page,
           "the raw names are not in the HTML source, their escaped forms are")
    tap.ok(BIDI_SHOWN in p.names, "the name with U+202E and U+2066 is shown with them as visible \\u escapes",
           repr(p.names))
    decoded = html.unescape(page)
    tap.ok("\u202e" not in decoded and "\u2066" not in decoded,
           "neither U+202E nor U+2066 is on the page, raw or as a character reference",
           repr([line for line in page.splitlines() if "fdp.exe" in line]))
    tap.ok("<progress" in page and p.refresh and int(p.refresh) > 0, "progress bars and an automatic refresh")
    text = " ".join(" ".join(p.text).split())
    tap.ok("Processes" in text and "storage" in text and "worker" in text and "uptime" in text,
           "the process table and the uptime are there", text[:300])
    status, hdr, body = get("/status.json")
    try:
        js = json.loads(body)
        ok = status == 200 and {"info", "workers", "transfers"} <= set(js)
    except ValueError:
        js, ok = {}, False
    tap.ok(ok, "GET /status.json: info, workers and transfers", body[:200])
    names = {t.get("name") for t in js.get("transfers", [])}
    tap.ok(set(HOSTILE) <= names and js.get("info", {}).get("state") == "up" and
           len(js.get("workers", [])) == 3, "with the names, state up and three processes", repr(js)[:400])

    chromium = shutil.which("chromium")
    if chromium is None:
        tap.skip("headless Chromium renders the page", "chromium not installed (apt-get install chromium)")
    else:
        with tempfile.TemporaryDirectory() as profile:
            r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--user-data-dir=" + profile,
                                "--dump-dom", "http://127.0.0.1:%d/" % http_port], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=90, text=True)
        dom = Page()
        dom.feed(r.stdout)
        tap.ok(r.returncode == 0 and "script" not in dom.tags and set(HOSTILE + [BIDI_SHOWN]) <= set(dom.names),
               "headless Chromium: the DOM has the names as text (bidirectional controls as escapes) and no script or "
               "img element",
               repr((r.returncode, r.stdout[:300])))
    holder.close()

# ---------------------------------------------------------------- 404, 405
with tap.section("404 and 405"):
    for path in ("/nope", "/metrics/x", "/index.html"):
        status, _, _ = get(path)
        tap.eq(status, 404, "GET %s: 404" % path)
    for method, path in (("POST", "/"), ("PUT", "/metrics"), ("DELETE", "/health"), ("OPTIONS", "/")):
        status, hdr, _ = get(path, method, body=b"x=1" if method in ("POST", "PUT") else None)
        tap.ok(status == 405 and hdr.get("allow") == "GET, HEAD", "%s %s: 405 with Allow: GET, HEAD" % (method, path),
               repr((status, hdr)))

# ---------------------------------------------------------------- slow clients
with tap.section("slow clients"):
    silent = socket.create_connection(("127.0.0.1", http_port))      # sends nothing
    partial = socket.create_connection(("127.0.0.1", http_port))     # half a request, then nothing
    partial.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    rc, out = stats("show", "info")
    tap.ok(rc == 0 and "State: up" in out, "the stats socket answers while two HTTP clients hang")
    status, _, body = get("/health", timeout=5)
    tap.ok(status == 200 and body == b"up\n", "another HTTP request is answered meanwhile")
    # A reload forks new workers while both hang: it neither waits for them nor hands them over.
    rc, out = stats("reload")
    tap.ok(rc == 0 and out.startswith("OK"), "reload (new workers forked) while they hang", out)
    d.wait_workers(20)
    children = set(d.processes()) - {d.master_pid}
    holders = listening_holders(http_port)
    tap.ok(holders == {d.master_pid} and children,
           "only the master holds the HTTP listening socket, none of its %d children" % len(children),
           repr((holders, d.master_pid)))
    # The server ends them itself (its connection timeout), rather than holding them forever.
    for name, s in (("silent", silent), ("partial", partial)):
        s.settimeout(30)
        try:
            closed = s.recv(4096) == b""
        except (ConnectionResetError, socket.timeout):
            closed = False if isinstance(sys.exc_info()[1], socket.timeout) else True
        tap.ok(closed, "the %s connection is closed by the server after its timeout" % name)
        s.close()

    # Slowloris: MHD's timeout counts only silence, so connections that each drip a header line now and
    # then were kept for good, and 32 of them took every slot. At most 8 come from one address: requests
    # from another (the balancer's, the scraper's) are served for as long as the drip goes on, past the
    # 10 s timeout.
    def from_address(addr):
        s = socket.socket()
        s.bind((addr, 0))
        s.settimeout(5)
        s.connect(("127.0.0.1", http_port))
        return s
    drips = []
    for _ in range(40):
        try:
            drips.append(from_address("127.0.0.2"))
            drips[-1].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        except OSError:
            pass
    answered, rounds, deadline = 0, 0, time.monotonic() + 13
    while time.monotonic() < deadline:
        for s in drips:
            try:
                s.sendall(b"X-Drip: 1\r\n")
            except OSError:
                pass
        rounds += 1
        try:
            answered += get("/health", timeout=5)[0] == 200
        except (ConnectionError, http.client.HTTPException, socket.timeout):
            pass
        time.sleep(2)   # the attacker's pace (under the 10 s timeout), not a wait for the server
    tap.ok(rounds >= 4 and answered == rounds,
           "40 connections from one address dripping headers for 13 s: /health from another answered every time",
           "%d of %d" % (answered, rounds))
    for s in drips:
        s.close()

    # Past the connection limit new connections are turned away, and the rest keeps working.
    idle = [from_address("127.0.0.%d" % (2 + i // 8)) for i in range(40)]   # 8 per address, 32 slots
    rc, out = stats("show", "info")
    tap.ok(rc == 0 and "State: up" in out, "the stats socket answers with 40 idle HTTP connections open")
    try:
        status, _, _ = get("/health", timeout=5)
        refused = False
    except (ConnectionError, http.client.HTTPException, socket.timeout):
        refused = True
    tap.ok(refused, "a request beyond the connection limit is turned away")
    for s in idle:
        s.close()

    def served():
        try:
            return get("/health", timeout=5)[0] == 200
        except (ConnectionError, http.client.HTTPException, socket.timeout):
            return False
    tap.ok(h.wait_for(served, 15), "once they close, requests are served again")

# ---------------------------------------------------------------- stats socket: a client that never reads
with tap.section("stats socket: pipelined commands from a client that never reads"):
    # Every line was run at once and its answer kept until sent: a client writing "show info" lines and
    # reading nothing grew the master without bound (300 MB in 20 s). The answers now wait up to 1 MiB;
    # past it the master stops reading that client, and answers all of its commands once it reads.
    rss_before = master_rss()
    pig = socket.socket(socket.AF_UNIX)
    pig.connect(d.stats_socket)
    pig.setblocking(False)
    LINE = b"show info\n"
    pending, sent = LINE * 200, 0
    progress = [time.monotonic()]

    def stalled():
        global pending, sent
        try:
            n = pig.send(pending)
            sent += n
            pending = pending[n:] or LINE * 200
            progress[0] = time.monotonic()
        except BlockingIOError:
            pass
        return time.monotonic() - progress[0] > 2   # the master has stopped reading this client
    stalled_ok = h.wait_for(stalled, 90, 0.005)
    grown = master_rss() - rss_before
    tap.ok(stalled_ok, "the master stops reading the client", "%d bytes sent" % sent)
    tap.ok(grown < 100 << 10, "the master grew by %d KiB (bound: output cap, not the commands sent)" % grown)
    complete = sent // len(LINE)
    pig.setblocking(True)
    pig.settimeout(30)
    if sent % len(LINE):
        pig.sendall(LINE[sent % len(LINE):])
        complete += 1
    pig.shutdown(socket.SHUT_WR)
    got = b""
    try:
        while True:
            more = pig.recv(1 << 20)
            if not more:
                break
            got += more
    except socket.timeout:
        pass
    pig.close()
    tap.eq(got.count(b"\nState: up\n"), complete, "every one of the %d commands is answered once read" % complete)
    rc, out = stats("show", "info")
    tap.ok(rc == 0 and "State: up" in out, "the stats socket answers other clients")

    # An unknown command is echoed escaped: raw, its bytes (ESC sequences, bytes that are not UTF-8) went
    # back to the operator's terminal as they came.
    odd = socket.socket(socket.AF_UNIX)
    odd.settimeout(20)
    odd.connect(d.stats_socket)
    odd.sendall(b"\xff\x1b[31mred\x07 show\n" + b"show \x1b]0;title\x07\n")
    odd.shutdown(socket.SHUT_WR)
    echo = b""
    while True:
        more = odd.recv(4096)
        if not more:
            break
        echo += more
    odd.close()
    tap.ok(b"\x1b" not in echo and b"\x07" not in echo and b"\xff" not in echo and
           echo.count(b"Unknown command: ") == 2 and b"\\x1b[31mred\\x07" in echo and b"\\xff" in echo,
           "unknown commands are echoed with control bytes and bytes that are not UTF-8 escaped", repr(echo))

# ---------------------------------------------------------------- stats socket: connections held open
with tap.section("stats socket: at most 64 connections"):
    # Sessions had no limit: idle ones took a descriptor of the master each (3000 held 3000 of them).
    held = []
    for _ in range(64):
        s = socket.socket(socket.AF_UNIX)
        s.connect(d.stats_socket)
        held.append(s)
    extra = socket.socket(socket.AF_UNIX)
    extra.settimeout(20)
    extra.connect(d.stats_socket)
    try:
        turned = extra.recv(4096)
    except OSError as e:
        turned = repr(e).encode()
    extra.close()
    tap.ok(turned.startswith(b"ERROR too many stats connections"), "the 65th connection is told so and closed",
           repr(turned))
    held[0].settimeout(20)
    held[0].sendall(b"show info\n")
    first = b""
    while b"\n\n" not in first:
        more = held[0].recv(4096)
        if not more:
            break
        first += more
    tap.ok(b"State: up" in first, "the 64 held ones are served")
    for s in held:
        s.close()
    tap.ok(h.wait_for(lambda: "State: up" in stats("show", "info")[1], 20), "once they close, resctl stats is served again")

rc = d.proc.poll()
tap.ok(rc is None, "the master is still running", "exit %r" % rc)
tap.finish()

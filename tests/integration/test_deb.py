# test_deb.py: the Debian package: built with dpkg-buildpackage, installed (nothing started), run by its init script against a private Redis, purged without a trace.
"""Builds the .deb from a copy of the source tree, installs it on this machine
with dpkg -i, starts the service with /etc/init.d/resourced (the packaged
configuration, pointed at a private redis-server and a free loopback port),
checks the pid, `resctl ping`, an upload and `resctl stats`, stops it, and
purges the package.

Needs root, dpkg-buildpackage and debhelper, and a machine where resourced is
not installed. The package build takes minutes, so the test runs only with
RESOURCED_TEST_DEB=1 (.ci/run sets it for one of its passes); otherwise it
skips. It never leaves the package installed: the purge runs at exit whatever
happened, and any process still running from /usr/sbin/resourced is killed.
While it runs, /etc/resourced.conf, /etc/init.d/resourced and /run/resourced
exist; the other tests use none of them (they pass -c and private run dirs).
"""
import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time

sys.dont_write_bytecode = True   # keep the source tree clean (make distcheck)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

PACKAGE = "resourced"
DAEMON = "/usr/sbin/resourced"
RESCTL = "/usr/bin/resctl"
INIT = "/etc/init.d/resourced"
CONF = "/etc/resourced.conf"
PID_FILE = "/run/resourced/resourced.pid"
STATS = "/run/resourced/stats.sock"
STATE_DIR = "/var/lib/resourced"
# Left by the package or its service, and gone after the purge (STATE_DIR when empty).
PACKAGE_PATHS = [DAEMON, RESCTL, INIT, CONF, "/etc/default/resourced", "/etc/logrotate.d/resourced",
                 "/lib/systemd/system/resourced.service", "/usr/lib/sysusers.d/resourced.conf",
                 "/run/resourced", "/var/log/resourced"]
# The init script's settings: none may leak in from the environment of `make check`.
INIT_SETTINGS = ["DAEMON", "CONF", "PIDFILE", "DAEMON_OPTS", "START_TIMEOUT", "STOP_TIMEOUT",
                 "GRACEFUL_TIMEOUT", "NOFILE", "USE_START_STOP_DAEMON", "RESOURCED_DEFAULTS"]
UID, TOKEN = 4301, "deb-token"

tap = h.Tap(deadline=900)


def run(cmd, timeout=120, env=None, **kw):
    """Runs cmd; returns (exit status, stdout + stderr)."""
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=timeout, env=env, **kw)
    except subprocess.TimeoutExpired as e:
        return -1, "timed out after %d s: %s\n%s" % (timeout, cmd, e.output or "")
    return r.returncode, r.stdout


def init_env():
    env = {k: v for k, v in os.environ.items() if k not in INIT_SETTINGS}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    return env


def init_script(action, timeout=90):
    return run([INIT, action], timeout=timeout, env=init_env())


def installed():
    rc, out = run(["dpkg-query", "-W", "-f", "${Status}", PACKAGE])
    return rc == 0 and out.strip().endswith(" installed")


def known_to_dpkg():
    """Installed, or its conffiles still there (removed but not purged)."""
    rc, out = run(["dpkg-query", "-W", "-f", "${Status}", PACKAGE])
    return rc == 0 and "not-installed" not in out


def packaged_processes():
    """Pids of every process running the packaged binary (also after dpkg removed it: "(deleted)")."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            exe = os.readlink("/proc/%s/exe" % entry)
        except OSError:
            continue
        if exe == DAEMON or exe == DAEMON + " (deleted)":
            pids.append(int(entry))
    return pids


def kill_packaged_processes():
    for pid in packaged_processes():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def read_pid():
    with open(PID_FILE) as f:
        return int(f.read().split()[0])


def proc_uid(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    return None


def skip_all(reason):
    tap.skip("Debian package: build, install, start and stop, purge", reason)
    tap.finish()


def preconditions():
    """None when the test may run here, else why not."""
    if os.environ.get("RESOURCED_TEST_DEB", "") in ("", "0"):
        return "RESOURCED_TEST_DEB=1 not set (the package build takes minutes)"
    if os.geteuid() != 0:
        return "needs root (dpkg -i)"
    for tool in ("dpkg-buildpackage", "dh", "dpkg", "git"):
        if shutil.which(tool) is None:
            return "%s not found (contrib/deps.sh installs debhelper)" % tool
    if known_to_dpkg():
        return "the package %s is already on this machine: the test would replace it" % PACKAGE
    for path in (CONF, INIT, "/run/resourced", STATE_DIR):
        if os.path.lexists(path):
            return "%s exists already: the test would mix with what it belongs to" % path
    if not os.path.isdir(os.path.join(h.SRCDIR, ".git")) and not os.path.isfile(os.path.join(h.SRCDIR, ".git")):
        return "the source tree %s is not a git checkout (the copy to build is taken from git ls-files)" % h.SRCDIR
    return None


def copy_source(dest):
    """The tracked and untracked-but-not-ignored files of the source tree: no build products."""
    rc, out = run(["git", "-C", h.SRCDIR, "ls-files", "-z", "--cached", "--others", "--exclude-standard"])
    if rc != 0:
        raise RuntimeError("git ls-files failed: %s" % out)
    for rel in filter(None, out.split("\0")):
        src = os.path.join(h.SRCDIR, rel)
        if not os.path.lexists(src):      # deleted in the work tree, not yet in git
            continue
        dst = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)


def build():
    """Builds the binary package; returns the path of the .deb."""
    top = h.temp_dir("deb")
    src = os.path.join(top, "resourced")
    copy_source(src)
    env = dict(os.environ)
    # The unit tests run in CI's own passes; the build here checks the packaging.
    env["DEB_BUILD_OPTIONS"] = "nocheck noautodbgsym parallel=2"
    env["DEB_BUILD_PROFILES"] = "nocheck"
    for k in ("CFLAGS", "LDFLAGS", "CPPFLAGS", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"):
        env.pop(k, None)
    t0 = time.monotonic()
    rc, out = run(["dpkg-buildpackage", "-b", "-us", "-uc"], timeout=780, env=env, cwd=src)
    tap.diag("dpkg-buildpackage: %.0f s" % (time.monotonic() - t0))
    debs = [f for f in os.listdir(top) if re.match(r"resourced_.*\.deb$", f)]
    if not tap.ok(rc == 0 and len(debs) == 1, "dpkg-buildpackage builds one resourced .deb",
                  "exit %d, files %s\n%s" % (rc, os.listdir(top), out[-4000:])):
        return None
    return os.path.join(top, debs[0])


def check_contents(deb):
    rc, out = run(["dpkg-deb", "-c", deb])
    files = {line.split()[-1].lstrip(".") for line in out.splitlines() if line.strip()}
    conf_line = [line for line in out.splitlines() if line.endswith("." + CONF)]
    tap.ok(conf_line and conf_line[0].split()[:2] == ["-rw-r-----", "root/root"],
           "the .deb ships %s 0640 root:root (postinst gives it to the resourced group)" % CONF, repr(conf_line))
    want = {DAEMON, RESCTL, CONF, INIT, "/etc/default/resourced", "/etc/logrotate.d/resourced",
            "/lib/systemd/system/resourced.service", "/usr/lib/sysusers.d/resourced.conf",
            "/usr/share/man/man8/resourced.8.gz", "/usr/share/man/man5/resourced.conf.5.gz",
            "/usr/share/man/man1/resctl.1.gz", "/usr/share/doc/resourced/copyright",
            "/usr/share/doc/resourced/changelog.gz", "/usr/share/doc/resourced/README.Debian"}
    # dh_compress gzips a README.Debian of more than 4 KiB.
    files = {f[:-3] if f == "/usr/share/doc/resourced/README.Debian.gz" else f for f in files}
    tap.eq(sorted(want - files), [], "the .deb holds the binaries, config, unit, init script, sysusers, "
           "logrotate, man pages, copyright, changelog, README.Debian")
    rc, out = run(["dpkg-deb", "-f", deb, "Depends"])
    tap.ok(rc == 0 and "libev4" in out and "libhiredis" in out and "adduser" in out,
           "Depends has the shared libraries and adduser", out)
    tmp = h.temp_dir("deb-control")
    rc, out = run(["dpkg-deb", "-e", deb, tmp])
    with open(os.path.join(tmp, "conffiles")) as f:
        conffiles = f.read().split()
    tap.eq(sorted(c for c in conffiles if c in (CONF, INIT, "/etc/default/resourced", "/etc/logrotate.d/resourced")),
           sorted([CONF, INIT, "/etc/default/resourced", "/etc/logrotate.d/resourced"]),
           "the configuration, init script, its defaults and the logrotate file are conffiles")


def purge_at_exit():
    """Never leaves the package installed, nor its service running."""
    if packaged_processes() and os.path.exists(INIT):
        init_script("stop", timeout=40)
    if known_to_dpkg():
        run(["dpkg", "--purge", PACKAGE], timeout=120)
    kill_packaged_processes()
    # Absent before the test (preconditions): whatever is there now is the test's.
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    shutil.rmtree("/run/resourced", ignore_errors=True)


def check_conf_perms(when):
    """/etc/resourced.conf: 0640 root:resourced (it may hold a password; the service's group reads it)."""
    st = os.stat(CONF)
    try:
        gid = grp.getgrnam("resourced").gr_gid
    except KeyError:
        gid = None
    tap.ok(st.st_mode & 0o7777 == 0o640 and st.st_uid == 0 and st.st_gid == gid,
           "%s: %s is mode 0640, owner root, group resourced" % (when, CONF),
           "mode %o uid %d gid %d (resourced: %r)" % (st.st_mode & 0o7777, st.st_uid, st.st_gid, gid))


def write_test_config(redis_port, port):
    """The packaged /etc/resourced.conf, edited as an operator would: a loopback port, 2 workers, the test's Redis."""
    with open(CONF) as f:
        text = f.read()
    edits = [(r"(?m)^listen = .*$", "listen = 127.0.0.1:%d" % port),
             (r"(?m)^workers = .*$", "workers = 2"),
             (r"(?m)^port = 6379$", "port = %d" % redis_port)]
    for pattern, repl in edits:
        text, n = re.subn(pattern, repl, text)
        if n != 1:
            raise RuntimeError("%s: %d matches for %s" % (CONF, n, pattern))
    with open(CONF, "w") as f:
        f.write(text)


def main():
    reason = preconditions()
    if reason:
        return skip_all(reason)

    deb = build()
    if deb is None:
        return tap.finish()
    check_contents(deb)

    h.at_cleanup(purge_at_exit)
    with tap.section("install"):
        rc, out = run(["dpkg", "-i", deb], timeout=180)
        if not tap.ok(rc == 0 and installed(), "dpkg -i installs the package", out):
            return tap.finish()
        tap.eq(packaged_processes(), [], "installing starts no resourced")
        try:
            user = pwd.getpwnam("resourced")
        except KeyError:
            user = None
        tap.ok(user is not None and user.pw_dir == STATE_DIR and user.pw_shell == "/usr/sbin/nologin",
               "the system user resourced exists (home %s, no shell)" % STATE_DIR, repr(user))
        st = os.stat(STATE_DIR)
        tap.ok(user is not None and st.st_uid == user.pw_uid and st.st_mode & 0o777 == 0o750,
               "%s belongs to resourced, mode 0750" % STATE_DIR, "uid %d mode %o" % (st.st_uid, st.st_mode))
        check_conf_perms("after install")
        rc, out = run([DAEMON, "-t", "-c", CONF])
        tap.ok(rc == 0, "the packaged configuration passes resourced -t", out)
        rc, out = init_script("status")
        tap.eq(rc, 3, "init script status: 3 (not running) after install", out)

    redis = h.RedisServer().start()
    redis.set_token(UID, TOKEN)
    port = h.free_port()
    write_test_config(redis.port, port)
    endpoint = "127.0.0.1:%d" % port
    uid = pwd.getpwnam("resourced").pw_uid

    with tap.section("start with the init script"):
        rc, out = init_script("start")
        tap.ok(rc == 0, "/etc/init.d/resourced start succeeds", out)
        pid = h.wait_for(read_pid, 10)
        tap.ok(pid and pid in packaged_processes(), "the pid file names a running /usr/sbin/resourced", repr(pid))
        tap.ok(pid and proc_uid(pid) == uid, "the master runs as resourced (switched from root)",
               "uid %r" % (proc_uid(pid) if pid else None))
        rc, out = init_script("status")
        tap.ok(rc == 0 and str(pid) in out, "init script status: 0 and the pid", out)
        rc, out = h.wait_for(lambda: (lambda r: r if r[0] == 0 else None)(run([RESCTL, "ping", endpoint])), 20) \
            or run([RESCTL, "ping", endpoint])
        tap.ok(rc == 0, "resctl ping %s answers" % endpoint, out)

        data = os.urandom(200000)
        src = os.path.join(h.temp_dir("deb-upload"), "deb-test.bin")
        with open(src, "wb") as f:
            f.write(data)
        rc, out = run([RESCTL, "upload", endpoint, src, "--uid", str(UID), "--token", TOKEN], timeout=60)
        published = os.path.join(STATE_DIR, str(UID), "deb-test.bin")
        tap.ok(rc == 0 and os.path.exists(published) and h.read_file(published) == data,
               "an upload checked against the private Redis is published under %s" % STATE_DIR, out)
        tap.ok(os.path.exists(published) and os.stat(published).st_uid == uid,
               "the published file belongs to resourced")
        rc, out = run([RESCTL, "stats", "show", "info"], timeout=20)
        tap.ok(rc == 0 and out.strip() != "", "resctl stats reaches the packaged stats socket %s" % STATS, out)

        rc, out = init_script("reload")
        tap.ok(rc == 0, "init script reload succeeds", out)
        tap.ok(h.wait_for(lambda: run([RESCTL, "ping", endpoint])[0] == 0, 20) and pid in packaged_processes(),
               "after the reload the same master serves ping")

    with tap.section("stop with the init script"):
        children = [p for p in packaged_processes() if p != pid]
        tap.ok(len(children) >= 3, "the master has a storage process and 2 workers", repr(children))
        rc, out = init_script("stop")
        tap.ok(rc == 0, "/etc/init.d/resourced stop succeeds", out)
        h.wait_for(lambda: not packaged_processes(), 15)
        tap.eq(packaged_processes(), [], "no resourced process is left (master, storage, workers)")
        tap.ok(not os.path.exists(PID_FILE), "the pid file is gone")
        rc, out = init_script("status")
        tap.eq(rc, 3, "init script status: 3 (not running) after stop", out)
        rc, out = init_script("stop")
        tap.ok(rc == 0, "a second stop succeeds (nothing to stop)", out)

    with tap.section("start without Redis"):
        redis.stop()
        rc, out = init_script("start")
        tap.ok(rc == 0, "start succeeds while Redis is down (workers answer 1027 until it is back)", out)
        rc, out = h.wait_for(lambda: (lambda r: r if r[0] == 0 else None)(run([RESCTL, "ping", endpoint])), 20) \
            or run([RESCTL, "ping", endpoint])
        tap.ok(rc == 0, "resctl ping answers without Redis", out)
        rc, out = init_script("stop")
        tap.ok(rc == 0 and h.wait_for(lambda: not packaged_processes(), 15),
               "stop succeeds and leaves no process", out)

    with tap.section("reinstall keeps the edited configuration"):
        with open(CONF) as f:
            edited = f.read()
        rc, out = run(["dpkg", "-i", deb], timeout=180)
        tap.ok(rc == 0 and installed(), "dpkg -i over the installed package succeeds", out)
        tap.ok(h.read_text(CONF) == edited, "the edited %s is kept (a conffile)" % CONF)
        check_conf_perms("after the reinstall")
        # A group the administrator chose stays.
        os.chmod(CONF, 0o600)
        admin = grp.getgrnam("adm").gr_gid if "adm" in [g.gr_name for g in grp.getgrall()] else None
        if admin is not None:
            os.chown(CONF, 0, admin)
            rc, out = run(["dpkg-reconfigure", "-fnoninteractive", PACKAGE], timeout=120)
            st = os.stat(CONF)
            tap.ok(rc == 0 and st.st_gid == admin and st.st_mode & 0o7777 == 0o600,
                   "a group and mode the administrator set are kept by a reconfigure",
                   "rc %d mode %o gid %d\n%s" % (rc, st.st_mode & 0o7777, st.st_gid, out))

    with tap.section("purge"):
        rc, out = run(["dpkg", "--purge", PACKAGE], timeout=120)
        tap.ok(rc == 0 and not known_to_dpkg(), "dpkg --purge removes the package", out)
        left = [p for p in PACKAGE_PATHS if os.path.lexists(p)]
        tap.eq(left, [], "the purge leaves none of the package's files (modified conffile included)")
        tap.ok(os.path.exists(published) and h.read_file(published) == data,
               "the purge keeps the uploaded file in %s" % STATE_DIR)
        tap.eq(packaged_processes(), [], "nothing is left running")

    tap.finish()


if __name__ == "__main__":
    main()

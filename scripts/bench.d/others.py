"""Sections 5 (scale), 6 (the SSH pipe) and 7 (the process)."""

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time

from harness import ROOT, bounded_parallel, depth_chain, end_process, log, median, pct, proc_number, vm_hwm_kib

# --------------------------------------------------------------------------- 5. scale


def section_scale(h, cfg, row):
    rows, notes, data = [], [], {"list": {}, "cleanup": None}
    cloud = h.cloud
    sizes = [1, 10] if cfg.quick else [1, 10, 50]
    # Setup is not measured: no delay, instant `running`, and boxes that never finish booting (no
    # sshd or watchdog per box: `list` only needs the EC2 records).
    cloud.configure(delay_ms=0, pending_seconds=0, boot_seconds=3600)
    made = []
    # Each session gets its own /32: sessions from one address share one SSH rule and add a
    # reference tag each, which is not what this section measures.
    # A launch connects once (the box makes its own host key) and these boxes never boot: each is
    # killed right before that connection, with its instance, group and record made.
    def launch_one(index):
        ip = f"198.51.100.{10 + index}"
        before = set(os.listdir(os.path.join(h.home, "state/ephemeral-admin/sessions"))) \
            if os.path.isdir(os.path.join(h.home, "state/ephemeral-admin/sessions")) else set()
        env = dict(h.env, EPHEMERAL_ADMIN_ABORT_AFTER="connecting")
        p = h.popen([h.bin, "launch", "--detach", "--my-ip", ip, "--user", h.user, "--proxy-command", h.proxy,
                     "-q"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
        p.wait(timeout=120)
        made_now = set(os.listdir(os.path.join(h.home, "state/ephemeral-admin/sessions"))) - before
        if len(made_now) != 1:
            raise RuntimeError(f"launch {index} left {len(made_now)} new session record(s)")
        session = made_now.pop()
        h.sessions.add(session)
        return session

    try:
        for n in sizes:
            want = n - len(made)
            t0 = time.monotonic()
            log(f"scale: launching {want} detached session(s) (total {n})")
            got = bounded_parallel(launch_one, list(range(len(made), n)), 1)  # one at a time: records tell them apart
            failures = [g for g in got if isinstance(g, Exception)]
            made += [g for g in got if isinstance(g, str)]
            if failures:
                notes.append(f"{len(failures)} launch(es) failed while making {n} sessions: {failures[0]}")
            log(f"  made in {time.monotonic() - t0:.1f}s")
            cloud.configure(delay_ms=cfg.delay_ms)
            walls, ncalls, listed, actions, server = [], [], None, None, []
            for _ in range(3):
                cloud.clear_log()
                cp, wall = h.run(["list", "--output", "json"], timeout=60)
                calls = [c for c in cloud.calls() if c["t_end"] is not None]
                walls.append(wall)
                ncalls.append(len(calls))
                listed = len(json.loads(cp.stdout)["sessions"])
                actions = sorted(f"{c['service']}:{c['action']}" for c in calls)
                server += [c["t_end"] - c["t_start"] for c in calls if c["action"] == "DescribeInstances"]
            cloud.configure(delay_ms=0)
            data["list"][n] = {"sessions_listed": listed, "sessions_made": len(made), "calls": ncalls,
                               "wall_s": walls, "actions": actions,
                               "describe_instances_s": server}
        base = data["list"][sizes[0]]["calls"][0]
        for n in sizes:
            d = data["list"][n]
            const = all(c == base for c in d["calls"])
            rows.append(row(f"list with {n} live session(s): AWS calls", f"constant ({base})",
                            f"{max(d['calls'])} ({d['sessions_listed']} listed)", const, values=d["calls"]))
            rows.append(row(f"  list with {n}: wall time (median of 3)", "-",
                            f"{median(d['wall_s']):.3f} s (DescribeInstances answered in "
                            f"{median(d['describe_instances_s']):.3f} s)", None, values=d["wall_s"]))
        notes.append(f"list calls: {', '.join(data['list'][sizes[-1]]['actions'])}; at {cfg.delay_ms} ms per call")
    finally:
        log(f"scale: terminating {len(made)} session(s)")
        cloud.configure(delay_ms=0)
        bounded_parallel(h.terminate, made, 3)
        cloud.configure(boot_seconds=cfg.boot_seconds)

    r, n, d = cleanup_all_regions(h, cfg, row)
    rows += r
    notes += n
    data["cleanup"] = d
    return rows, notes, data


SLOW = {"eu-west-1": 500, "ap-southeast-2": 300}


def cleanup_all_regions(h, cfg, row):
    cloud = h.cloud
    cp, _ = h.run(["cleanup", "--help"], check=False)
    if "--all-regions" not in cp.stdout:
        return [row("cleanup --all-regions, slowed regions", "~ slowest region", "not built yet", None)], [], None
    # Unmeasured warm-up at no delay: moto builds each region's backend (default VPC, subnets) on
    # first use, which takes far longer than any delay we inject.
    cloud.configure(delay_ms=0)
    log("cleanup --all-regions: warm-up (moto seeds every region)")
    t0 = time.monotonic()
    cp, _ = h.run(["cleanup", "--all-regions", "--dry-run", "-q"], timeout=300, check=False)
    if "not built yet" in (cp.stderr + cp.stdout):
        return [row("cleanup --all-regions, slowed regions", "~ slowest region", "not built yet", None)], [], None
    log(f"  warm-up took {time.monotonic() - t0:.1f}s")
    cloud.configure(delay_ms=cfg.delay_ms)
    cloud.control("PUT", "rules", {"rules": [{"region": r, "delay_ms": ms} for r, ms in SLOW.items()]})
    walls, per = [], []
    try:
        for _ in range(1 if cfg.quick else 3):
            cloud.clear_log()
            cp, wall = h.run(["cleanup", "--all-regions", "--output", "json"], timeout=300, check=False)
            calls = [c for c in cloud.calls() if c["t_end"] is not None]
            walls.append(wall)
            per.append((cp.returncode, calls))
    finally:
        cloud.control("DELETE", "rules")
        cloud.configure(delay_ms=0)
    rc, calls = per[-1]
    regions = {}
    for c in calls:
        regions.setdefault(c["region"], []).append(c)
    span = {r: max(c["t_end"] for c in cs) - min(c["t_start"] for c in cs) for r, cs in regions.items()}
    depth = {r: max(depth_chain(cs)[1]) for r, cs in regions.items()}
    slowest = max(SLOW, key=lambda r: span.get(r, 0))
    t_first = min(c["t_start"] for c in calls)
    # The slowest region's sweep, measured from the command's first call (identity and region list
    # come before the sweep can start).
    floor = max(c["t_end"] for c in regions.get(slowest, calls)) - t_first
    wall = median(walls)
    slack = 0.5
    rows = [row(f"cleanup --all-regions ({len(regions)} regions, {len(SLOW)} slowed)",
                f"<= slowest region + {slack} s", f"{wall:.3f} s (slowest region {slowest}: {span.get(slowest, 0):.3f} s, "
                f"done {floor:.3f} s after the first call)", wall <= floor + slack, values=walls)]
    rows.append(row("  if the regions were swept one after another", "-",
                    f"{sum(span.values()):.3f} s (sum of per-region spans)", None))
    rows.append(row("  AWS calls", "-", f"{len(calls)} ({len(calls) // max(1, len(regions))} per region; "
                    f"{depth.get(slowest)} sequential in {slowest})", None))
    notes = [f"cleanup exit status {rc}"] if rc != 0 else []
    notes.append("slowed by fault rules on top of the global delay: " + ", ".join(
        f"{r} +{ms} ms per call" for r, ms in SLOW.items()))
    per_region_actions = sorted({f"{c['service']}:{c['action']}" for c in regions.get(slowest, [])})
    notes.append(f"calls in {slowest}: {', '.join(per_region_actions)}")
    return rows, notes, {"wall_s": walls, "regions": len(regions), "span_s": span, "depth": depth,
                         "slowest": slowest, "slowest_done_s": floor, "exit": rc}


# --------------------------------------------------------------------------- 6. the SSH pipe


class PipeSession:
    """One detached session for the pipe measurements, with an OpenSSH config for it."""

    def __init__(self, h, cfg):
        self.h = h
        h.cloud.configure(delay_ms=0, pending_seconds=0, boot_seconds=0)
        doc, _ = h.launch_detached(extra=["--idle-grace", "30m"])
        self.id = doc["session_id"]
        cp, _ = h.run(["ssh-config", self.id])
        self.ssh_config = os.path.join(h.work, f"ssh_config-{self.id}")
        with open(self.ssh_config, "w") as f:
            f.write(cp.stdout)
        self.host = f"ephemeral-admin-{self.id}"
        self.instance_id = doc["instance_id"]
        # Wait (bounded) until sshd answers, so no measurement includes the boot.
        cp, _ = h.run(["connect", self.id, "--", "true"], timeout=60)

    def config_with_proxy(self, proxy):
        """The session's OpenSSH config, reaching the box through `proxy` (%i = instance id)."""
        path = f"{self.ssh_config}.{abs(hash(proxy))}"
        with open(self.ssh_config) as f, open(path, "w") as g:
            lines = [line for line in f if not line.strip().startswith("ProxyCommand")]
            g.write("".join(lines).rstrip("\n") + f"\n    ProxyCommand {proxy.replace('%i', self.instance_id)}\n")
        return path

    def ea(self, *cmd):
        return [self.h.bin, "connect", self.id, "--", *cmd] if cmd else [self.h.bin, "connect", self.id]

    def ssh(self, *cmd, tty=False):
        return ["ssh", "-F", self.ssh_config, "-o", "BatchMode=yes", *(["-tt"] if tty else []), self.host, *cmd]

    def close(self):
        self.h.terminate(self.id)


def pipe_once(h, argv, size, timeout, stall_s=10):
    """`head -c size /dev/zero | argv | wc -c`. Returns a dict: wall seconds, bytes that came out,
    peak RSS (VmHWM of argv's own process, KiB), and `stalled` (bytes fed in so far) when nothing
    moved for `stall_s` seconds, in which case the pipeline is ended."""
    t0 = time.perf_counter()
    src = h.popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
    mid = h.popen(argv, stdin=src.stdout, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    src.stdout.close()
    sink = h.popen(["wc", "-c"], stdin=mid.stdout, stdout=subprocess.PIPE)
    mid.stdout.close()
    hwm, end = 0, time.monotonic() + timeout
    fed, moved_at = -1, time.monotonic()
    stalled = None
    while True:
        pid, status, _ = os.wait4(mid.pid, os.WNOHANG)
        if pid == mid.pid:
            mid.returncode = os.waitstatus_to_exitcode(status)
            break
        hwm = max(hwm, vm_hwm_kib(mid.pid) or 0)
        now_fed = written_bytes(src.pid)
        if now_fed != fed:
            fed, moved_at = now_fed, time.monotonic()
        elif time.monotonic() - moved_at > stall_s:
            stalled = fed
        if stalled is not None or time.monotonic() > end:
            for p in (src, mid, sink):
                end_process(p, grace=3)
            if stalled is None:
                raise RuntimeError(f"{argv[0]} pipe of {size} bytes took more than {timeout}s")
            break
        time.sleep(0.02)
    out, _ = sink.communicate(timeout=30)
    wall = time.perf_counter() - t0
    src.wait(timeout=10)
    got = int(out.split()[0]) if out.split() else 0
    return {"wall_s": wall, "bytes": got, "peak_rss_kib": hwm, "stalled_after_bytes": stalled}


def written_bytes(pid):
    """How much `head` has written so far (its wchar); -1 once it has exited."""
    n = proc_number(pid, "io", "wchar")
    return -1 if n is None else n


def echo_latency(h, argv, keys, timeout=60):
    """Runs argv on a fresh pty; after the prompt, types `keys` single characters (each followed by
    a backspace) and times each until its echo comes back. Returns the list of seconds."""
    pid, fd = pty.fork()
    if pid == 0:  # child: exec at once
        try:
            os.execve(argv[0] if os.path.isabs(argv[0]) else _which(argv[0]), argv, h.env)
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    deadline = time.monotonic() + timeout
    lat = []

    def read_until(pred, limit):
        buf = b""
        end = min(time.monotonic() + limit, deadline)
        while time.monotonic() < end:
            r, _, _ = select.select([fd], [], [], max(0, end - time.monotonic()))
            if not r:
                break
            try:
                data = os.read(fd, 65536)
            except OSError:
                return buf, None
            if not data:
                return buf, None
            buf += data
            t = time.perf_counter()
            if pred(buf):
                return buf, t
        return buf, None

    try:
        # The prompt: some output, then 0.7 s of quiet (bounded by 30 s).
        seen = b""
        t_end = time.monotonic() + 30
        while time.monotonic() < t_end:
            r, _, _ = select.select([fd], [], [], 0.7)
            if not r:
                if seen:
                    break
                continue
            seen += os.read(fd, 65536)
        if not seen:
            raise RuntimeError(f"no prompt from {argv[0]}")
        for _ in range(keys):
            t0 = time.perf_counter()
            os.write(fd, b"x")
            _, t = read_until(lambda b: b"x" in b, 3)
            if t is None:
                break
            lat.append(t - t0)
            os.write(fd, b"\x7f")
            read_until(lambda b: b"\x08" in b or b"\x1b[K" in b, 3)
            time.sleep(0.02)  # a typist's pause; lets delayed ACKs settle
        os.write(fd, b"\x15exit\r")  # ^U clears the line first
        read_until(lambda b: False, 3)
    finally:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            p, _ = os.waitpid(pid, os.WNOHANG)
            if p == pid:
                break
            time.sleep(0.05)
        else:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                    time.sleep(1)
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        break
                except ChildProcessError:
                    break
        os.close(fd)
    return lat


def _which(name):
    for d in os.environ.get("PATH", "/usr/bin:/bin").split(":"):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return name


RELAY = os.path.join(ROOT, "scripts/bench.d/relay.py")
RELAY_PYTHON = sys.executable


def throughput(h, name, argv, size, runs, notes):
    setup = [pipe_once(h, argv, 0, 60)["wall_s"] for _ in range(3)]
    walls, rss, stalled = [], [], None
    for i in range(runs):
        log(f"pipe: {name}, {size >> 20} MiB, run {i + 1}/{runs}")
        r = pipe_once(h, argv, size, 600)
        rss.append(r["peak_rss_kib"])
        if r["stalled_after_bytes"] is not None:
            stalled = r["stalled_after_bytes"]
            break
        if r["bytes"] != size:
            notes.append(f"{name}: {r['bytes']} of {size} bytes came back")
        walls.append(r["wall_s"])
    out = {"setup_s": setup, "wall_s": walls, "peak_rss_kib": rss, "stalled_after_bytes": stalled}
    if walls:
        out["mib_s"] = size / 2**20 / max(1e-6, median(walls) - median(setup))
    return out


def describe_tp(d):
    if d["stalled_after_bytes"] is not None:
        return f"STALLED: no progress for 10 s after {d['stalled_after_bytes'] / 2**20:.1f} MiB fed in"
    return f"{d['mib_s']:.0f} MiB/s ({median(d['wall_s']):.2f} s, setup {median(d['setup_s']):.2f} s)"


def section_pipe(h, cfg, row, shared):
    rows, notes, data = [], [], {}
    size = (128 if cfg.quick else 1024) * 1024 * 1024
    runs = 1 if cfg.quick else 3
    keys = 100 if cfg.quick else 200
    s = shared.get("pipe_session") or PipeSession(h, cfg)
    shared["pipe_session"] = s
    relay = f"{RELAY_PYTHON} {RELAY} {h.cloud.url} %i"
    paths = {"direct TCP": {"ephemeral-admin": s.ea("cat"), "ssh": s.ssh("cat")}}
    for path, proxy in (("box-connect", h.proxy), ("threaded relay", relay)):
        paths[path] = {"ephemeral-admin": [h.bin, "connect", s.id, "--proxy-command", proxy, "--", "cat"],
                       "ssh": ["ssh", "-F", s.config_with_proxy(proxy), "-o", "BatchMode=yes", s.host, "cat"]}
    for path, tools in paths.items():
        data[path] = {name: throughput(h, f"{name} via {path}", argv, size, runs, notes)
                      for name, argv in tools.items()}
        ea, ssh = data[path]["ephemeral-admin"], data[path]["ssh"]
        rows.append(row(f"{size >> 20} MiB through `connect ID -- cat`, via {path}", "-", describe_tp(ea), None,
                        values=ea["wall_s"]))
        rows.append(row(f"  same through OpenSSH `ssh -F cfg HOST cat`, via {path}", "-", describe_tp(ssh), None,
                        values=ssh["wall_s"]))
        if "mib_s" in ea and "mib_s" in ssh:
            ratio = ea["mib_s"] / ssh["mib_s"]
            data[path]["ratio"] = ratio
            rows.append(row(f"  throughput ratio ephemeral-admin / ssh, via {path}", ">= 0.8", f"{ratio:.2f}",
                            ratio >= 0.8))
        else:
            rows.append(row(f"  throughput ratio ephemeral-admin / ssh, via {path}", ">= 0.8",
                            "no ratio: a transfer stalled", False))
        shared.setdefault("connect_peak_rss_kib", max(ea["peak_rss_kib"], default=0))
        shared.setdefault("ssh_peak_rss_kib", max(ssh["peak_rss_kib"], default=0))
        if "mib_s" in ea:
            shared["connect_peak_rss_kib"] = max(ea["peak_rss_kib"])
            shared["ssh_peak_rss_kib"] = max(ssh["peak_rss_kib"])

    # Alternating blocks, so a drift in the machine's load (the simulator, the page cache) does
    # not land on one client only.
    lat = {"ephemeral-admin": [], "ssh": []}
    blocks = 4
    for block in range(blocks):
        for name, argv in (("ephemeral-admin", s.ea()), ("ssh", s.ssh(tty=True))):
            want = keys // blocks
            log(f"echo: {name}, {want} keystrokes (block {block + 1}/{blocks})")
            got = echo_latency(h, argv, want)
            lat[name] += got
            if len(got) < want:
                notes.append(f"{name}: only {len(got)} of {want} keystrokes echoed within 3 s")
    le, ls = lat["ephemeral-admin"], lat["ssh"]
    data["echo_s"] = lat
    if le and ls:
        r_med, r_p95 = median(le) / median(ls), pct(le, 95) / pct(ls, 95)
        rows.append(row("keystroke echo in a PTY, `connect ID` (direct TCP)", "-",
                        f"median {median(le) * 1000:.2f} ms, p95 {pct(le, 95) * 1000:.2f} ms (n={len(le)})", None,
                        values=le))
        rows.append(row("  same, `ssh -tt -F cfg HOST`", "-",
                        f"median {median(ls) * 1000:.2f} ms, p95 {pct(ls, 95) * 1000:.2f} ms (n={len(ls)})", None,
                        values=ls))
        rows.append(row("  echo latency ratio ephemeral-admin / ssh (median)", "<= 1.2",
                        f"{r_med:.2f} (p95: {r_p95:.2f})", r_med <= 1.2))
        data["echo_ratio_median"], data["echo_ratio_p95"] = r_med, r_p95
    else:
        rows.append(row("keystroke echo latency ratio", "<= 1.2", "no data", False))
    notes.append("both clients reach the same sshd by the same route: direct TCP to the box's public IP (what "
                 "a launch uses), or a ProxyCommand: box-connect (the repo's single-threaded Python relay) or "
                 "relay.py (scripts/bench.d: the same with one thread per direction, like `ssh -W`, nc or the SSM "
                 "plugin). MiB/s counts the data phase: wall time minus the median wall time of the same pipeline "
                 "with 0 bytes. AWS delay is 0 here.")
    notes.append(f"echo: {keys} keystrokes per client, in {blocks} alternating blocks of a fresh connection each; "
                 "time from writing the key to the pty until its echo is read back")
    return rows, notes, data


# --------------------------------------------------------------------------- 7. the process


def spawn_time(path, args, env, n):
    fa = [(os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
          (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0)]
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        pid = os.posix_spawn(path, [path, *args], env, file_actions=fa)
        os.waitpid(pid, 0)
        out.append(time.perf_counter() - t0)
    return out


def section_process(h, cfg, row, shared, launch_data):
    rows, notes, data = [], [], {}
    for _ in range(5):  # page cache
        spawn_time(h.bin, ["--version"], h.env, 1)
    v = spawn_time(h.bin, ["--version"], h.env, 50)
    base = spawn_time("/bin/true", [], h.env, 50)
    data["version_s"], data["true_s"] = v, base
    rows.append(row("`ephemeral-admin --version` start to exit (median of 50)", "< 10 ms",
                    f"{median(v) * 1000:.2f} ms (p95 {pct(v, 95) * 1000:.2f} ms; /bin/true {median(base) * 1000:.2f} ms)",
                    verdict_ms(median(v))))
    size = os.path.getsize(h.bin)
    data["binary_bytes"] = size
    rows.append(row("release binary size", "-", f"{size / 2**20:.1f} MiB ({size} bytes)", None))
    rss_launch = [r["maxrss_kib"] for sc in ("warm", "cold") for r in (launch_data or {}).get(sc, [])]
    if not rss_launch:
        # --only process: one small launch of our own (no delay, no boot) for the RSS.
        from launches import one_launch
        cfg2 = cfg.copy(delay_ms=0, pending_seconds=0, boot_seconds=0)
        rss_launch = [one_launch(h, "warm", cfg2)["maxrss_kib"]]
    data["launch_peak_rss_kib"] = rss_launch
    rows.append(row("peak RSS of `launch` (whole session: provision, shell command, teardown)", "-",
                    f"{max(rss_launch) / 1024:.1f} MiB (max of {len(rss_launch)})", None))
    if "connect_peak_rss_kib" not in shared:
        s = shared.get("pipe_session") or PipeSession(h, cfg)
        shared["pipe_session"] = s
        r = pipe_once(h, s.ea("cat"), 64 * 2**20, 120)
        shared["connect_peak_rss_kib"] = r["peak_rss_kib"]
        shared["ssh_peak_rss_kib"] = pipe_once(h, s.ssh("cat"), 64 * 2**20, 120)["peak_rss_kib"]
    data["connect_peak_rss_kib"] = shared["connect_peak_rss_kib"]
    rows.append(row("peak RSS of `connect ID -- cat` while piping", "-",
                    f"{shared['connect_peak_rss_kib'] / 1024:.1f} MiB (OpenSSH ssh: "
                    f"{shared['ssh_peak_rss_kib'] / 1024:.1f} MiB)", None))
    notes.append("peak RSS: VmHWM from /proc/PID/status, polled every 20 ms while the process runs "
                 "(not ru_maxrss: that also counts the reaped ProxyCommand, a Python process).")
    return rows, notes, data


def verdict_ms(x):
    return None if x is None else x < 0.010

"""Sections 1-4 share one data set: full interactive-style launches (`launch ... -- sh -c 'echo
first-byte'`), each timed from the outside, with the proxy's call log and the box simulator's
view of the box. One run gives the time to first prompt (1), the round trips on the critical path
(2), the detection lags (3) and the teardown (4).
"""

import os
import pwd
import select
import subprocess
import tempfile
import time

from harness import (BoxWatcher, chain_of, depth_chain, end_process, log, median, overlap,
                     spread, vm_hwm_kib, wait4_with_timeout)

REMOTE = ["sh", "-c", "echo first-byte"]


def is_wait_poll(c):
    """A DescribeInstances by instance id: wait_running's poll (listing uses tag filters)."""
    return c["action"] == "DescribeInstances" and "InstanceId.1" in (c.get("params") or {})


def one_launch(h, scenario, cfg, trace=False):
    """One measured launch. Returns a dict of raw timestamps and derived numbers."""
    cloud = h.cloud
    if scenario == "cold":
        cloud.reset()  # forgets every resource; also resets delay, pending and boot time
    cloud.configure(delay_ms=0, pending_seconds=0, boot_seconds=cfg.boot_seconds)
    # A cold account is one an admin just ran `setup roles` in (a launch never makes IAM): not
    # measured.
    if scenario == "cold":
        h.run(["setup", "roles", "-q"], timeout=120)
    # Touch the region at no delay (moto seeds a region's VPCs, AMIs and SSM parameters on first
    # use) so that seeding is not measured. It creates no security group or IAM profile.
    h.run(["prices", "-q"], timeout=120)
    cloud.configure(delay_ms=cfg.delay_ms, pending_seconds=cfg.pending_seconds)
    before = {b["instance_id"] for b in (cloud.control("GET", "box") or {}).get("boxes", [])}
    cloud.clear_log()
    err_path = os.path.join(h.work, f"launch-{scenario}-{time.time():.0f}.stderr")
    verbose = ["-vv"] if trace else []
    argv = [h.bin, *verbose, "launch", *h.launch_args(), "--timings", "--", *REMOTE]
    out, err_lines = b"", []
    with BoxWatcher(cloud) as watcher, open(err_path, "wb") as err_file:
        t0 = time.time()
        p = h.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        fds = {p.stdout.fileno(): "out", p.stderr.fileno(): "err"}
        t_first = t_last = None
        err_buf = b""
        hwm = 0
        deadline = time.monotonic() + cfg.launch_timeout
        while fds:
            if time.monotonic() > deadline:
                end_process(p)
                raise RuntimeError(f"launch did not finish within {cfg.launch_timeout}s (see {err_path})")
            ready, _, _ = select.select(list(fds), [], [], 0.02)
            hwm = max(hwm, vm_hwm_kib(p.pid) or 0)
            for fd in ready:
                data = os.read(fd, 65536)
                now = time.time()
                if not data:
                    del fds[fd]
                    continue
                if fds[fd] == "out":
                    if t_first is None:
                        t_first = now
                    t_last = now
                    out += data
                else:
                    err_file.write(data)
                    err_buf += data
                    while b"\n" in err_buf:
                        line, err_buf = err_buf.split(b"\n", 1)
                        err_lines.append((now - t0, line.decode(errors="replace")))
        t_exit, ru = wait4_with_timeout(p, 60)
    calls = cloud.calls()
    new = [iid for iid in watcher.up_at if iid not in before]
    iid = new[0] if new else None
    box = cloud.control("GET", f"box/{iid}") if iid else None
    if p.returncode != 0 or t_first is None:
        raise RuntimeError(f"launch exited {p.returncode} (stdout {out[:200]!r}; see {err_path})")
    return analyse(dict(
        scenario=scenario, t0=t0, t_first=t_first, t_last=t_last, t_exit=t_exit, stdout=out.decode(errors="replace"),
        maxrss_kib=hwm, calls=calls, instance_id=iid, up_at=watcher.up_at.get(iid),
        conn_at=watcher.conn_at.get(iid), sshd_log=(box or {}).get("sshd_log", []),
        stderr=err_lines, exit_code=p.returncode), cfg)


def analyse(r, cfg):
    calls = [c for c in r["calls"] if c["t_end"] is not None]
    t0, t_first, t_exit = r["t0"], r["t_first"], r["t_exit"]
    launch_calls = [c for c in calls if c["t_start"] < t_first]
    teardown_calls = [c for c in calls if c["t_start"] >= t_first]
    lc, ld = depth_chain(launch_calls)
    runs = [i for i, c in enumerate(lc) if c["action"] == "RunInstances"]
    ok_runs = [i for i in runs if c_ok(lc[i])] or runs
    run_i = ok_runs[-1] if ok_runs else None
    run = lc[run_i] if run_i is not None else None
    d = {}
    d["ttfp_s"] = t_first - t0
    d["cli_overhead_s"] = d["ttfp_s"] - (cfg.pending_seconds + cfg.boot_seconds)
    d["launch_calls"] = len(launch_calls)
    d["launch_calls_by_action"] = count_actions(launch_calls)
    d["wait_polls"] = sum(1 for c in launch_calls if is_wait_poll(c))
    d["round_trips_before_run"] = (ld[run_i] - 1) if run is not None else None
    d["chain_before_run"] = chain_of(lc, ld, run_i)[:-1] if run is not None else []
    d["round_trips_total"] = max(ld, default=0)
    nopoll = [c for c in launch_calls if not is_wait_poll(c)]
    d["round_trips_total_without_polls"] = max(depth_chain(nopoll)[1], default=0)
    d["run_instances_attempts"] = len(runs)
    auth = [c for c in launch_calls if c["action"] == "AuthorizeSecurityGroupIngress"]
    d["authorize_vs_run"] = overlap(auth[0], run) if auth and run else ("no-authorize" if run else "no-run")
    if run is not None:
        d["provision_s"] = run["t_end"] - t0  # launch start -> RunInstances answered
        flip = run["t_end"] + cfg.pending_seconds  # localcloud starts the pending timer as it answers
        d["flip_at"] = flip
        polls = sorted((c for c in launch_calls if is_wait_poll(c)), key=lambda c: c["t_start"])
        # The delay is slept *before* moto reads the state, so a poll sees `running` when its
        # start + delay is after the flip.
        noticing = [c for c in polls if c["t_start"] + c["delay_ms"] / 1000 >= flip]
        d["noticed_at"] = noticing[0]["t_end"] if noticing else None
        d["detection_lag_s"] = (d["noticed_at"] - flip) if noticing else None
        gaps = [b["t_start"] - a["t_end"] for a, b in zip(polls, polls[1:])]
        d["poll_gap_s"] = median(gaps)
        d["poll_period_s"] = median([b["t_start"] - a["t_start"] for a, b in zip(polls, polls[1:])])
        if r["up_at"] is not None:
            d["sim_boot_s"] = r["up_at"] - flip  # flip -> sshd accepting (boot_seconds + simulator)
    if r["up_at"] is not None and r["conn_at"] is not None:
        d["ssh_accept_lag_s"] = r["conn_at"] - r["up_at"]
        d["handshake_to_first_byte_s"] = t_first - r["conn_at"]
    if d.get("noticed_at") is not None and r["conn_at"] is not None:
        d["noticed_to_handshake_s"] = r["conn_at"] - d["noticed_at"]
    d["ssh_connections"] = sum(1 for ln in r["sshd_log"] if "Connection from" in ln)
    # Teardown: the remote command exits right after its echo, so remote exit ~ first byte.
    d["teardown_s"] = t_exit - t_first
    d["teardown_calls"] = len(teardown_calls)
    d["teardown_calls_by_action"] = count_actions(teardown_calls)
    tc, td = depth_chain(teardown_calls)
    d["teardown_round_trips"] = max(td, default=0)
    d["teardown_chain"] = chain_of(tc, td, td.index(max(td))) if td else []
    if teardown_calls:
        d["teardown_ssh_close_s"] = min(c["t_start"] for c in teardown_calls) - t_first
        d["teardown_aws_s"] = max(c["t_end"] for c in teardown_calls) - min(c["t_start"] for c in teardown_calls)
        d["teardown_after_aws_s"] = t_exit - max(c["t_end"] for c in teardown_calls)
    d["maxrss_kib"] = r["maxrss_kib"]
    d["timings"] = parse_timings(r["stderr"])
    d["instance_id"] = r["instance_id"]
    d["sshd_log_has_timestamps"] = any(ln[:4].isdigit() or ln[:3] in MONTHS for ln in r["sshd_log"])
    d["sshd_log_sample"] = r["sshd_log"][:6]
    d["call_log"] = [{k: c.get(k) for k in ("seq", "service", "region", "action", "t_start", "t_end", "status")}
                     | {"t_start_rel": c["t_start"] - t0, "t_end_rel": c["t_end"] - t0} for c in calls]
    d["t_rel"] = {"first_byte": t_first - t0, "exit": t_exit - t0,
                  "up": (r["up_at"] - t0) if r["up_at"] else None,
                  "conn": (r["conn_at"] - t0) if r["conn_at"] else None,
                  "flip": (d["flip_at"] - t0) if d.get("flip_at") else None,
                  "noticed": (d["noticed_at"] - t0) if d.get("noticed_at") else None}
    d["stderr"] = [f"{t:7.3f} {line}" for t, line in r["stderr"]]
    return d


MONTHS = {"Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"}


def c_ok(c):
    return c.get("status") == 200


def count_actions(calls):
    out = {}
    for c in calls:
        key = f"{c['service']}:{c['action']}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def parse_timings(err_lines):
    for _, line in err_lines:
        if "timings:" in line:
            out = {}
            for part in line.split("timings:", 1)[1].split():
                if "=" in part and part.endswith("ms"):
                    k, v = part.split("=", 1)
                    try:
                        out[k] = int(v[:-2])
                    except ValueError:
                        pass
            return out
    return {}


def collect(h, cfg):
    """Warm-up, then `runs` cold and `runs` warm launches, then the SSH reference on a box that is
    already up. Returns {"cold": [..], "warm": [..], "reference": {..}}."""
    log("launch runs: 1 warm-up, then cold and warm")
    one_launch(h, "cold", cfg)  # unmeasured: file caches, sshd, and a warm account afterwards
    data = {"cold": [], "warm": []}
    for scenario in ("cold", "warm"):
        for i in range(cfg.runs):
            r = one_launch(h, scenario, cfg, trace=cfg.trace)
            log(f"  {scenario} run {i + 1}/{cfg.runs}: first byte {r['ttfp_s']:.2f}s, "
                f"teardown {r['teardown_s']:.2f}s, {r['launch_calls']} calls")
            data[scenario].append(r)
    try:
        data["reference"] = reference(h, cfg)
    except Exception as e:  # noqa: BLE001 - the reference only explains; it is not a target
        log(f"SSH reference failed: {e}")
        data["reference"] = None
    return data


def first_byte(h, argv, timeout=60):
    """Seconds from spawning argv to its first stdout byte, and to its exit."""
    t0 = time.perf_counter()
    p = h.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    fd, first = p.stdout.fileno(), None
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            data = os.read(fd, 65536)
            if first is None and data:
                first = time.perf_counter() - t0
            if not data:
                break
    else:
        end_process(p)
    p.wait(timeout=30)
    p.stdout.close()
    return first, time.perf_counter() - t0


def reference(h, cfg, n=5):
    """How long a connection to a box that is already up takes to print its first byte, with the
    embedded client (`connect`) and with OpenSSH by the same route, and how much of it is the
    box's login shell starting (`bash -c` under sshd sources ~/.bashrc). No AWS delay."""
    h.cloud.configure(delay_ms=0, pending_seconds=0, boot_seconds=0)
    doc, _ = h.launch_detached()
    sid = doc["session_id"]
    try:
        cp, _ = h.run(["ssh-config", sid])
        conf = os.path.join(h.work, f"ssh_config-{sid}")
        with open(conf, "w") as f:
            f.write(cp.stdout)
        h.run(["connect", sid, "--", "true"], timeout=60)  # the box is up
        ea = [first_byte(h, [h.bin, "connect", sid, "--", *REMOTE])[0] for _ in range(n)]
        ssh = [first_byte(h, ["ssh", "-F", conf, "-o", "BatchMode=yes", f"ephemeral-admin-{sid}", *REMOTE])[0]
               for _ in range(n)]
    finally:
        h.terminate(sid)
        h.cloud.configure(boot_seconds=cfg.boot_seconds)
    # The box's login shell: sshd runs `$SHELL -c CMD` with SSH_CLIENT set, so bash reads ~/.bashrc;
    # the simulator gives each box's login an empty home, as on a fresh instance.
    shell = pwd.getpwnam(h.user).pw_shell or "/bin/sh"
    home = tempfile.mkdtemp(prefix="ea-bench-home-")
    env = {"HOME": home, "USER": h.user, "PATH": "/usr/bin:/bin", "SSH_CLIENT": "127.0.0.1 50000 22"}
    login = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([shell, "-c", "sh -c 'echo first-byte'"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30)
        login.append(time.perf_counter() - t0)
    return {"connect_first_byte_s": ea, "ssh_first_byte_s": ssh, "login_shell_s": login, "shell": shell}


# --------------------------------------------------------------------------- sections 1-4


def fmt_s(x):
    return "-" if x is None else f"{x:.3f} s"


def fmt_spread(xs, unit="s", digits=3):
    s = spread(xs)
    if s["median"] is None:
        return "no data"
    f = f"{{:.{digits}f}}"
    return f"{f.format(s['median'])} {unit} (min {f.format(s['min'])}, max {f.format(s['max'])}, n={s['n']})"


def verdict(med, worst, ok):
    """'yes' if median and worst both meet, 'partly' if only the median does, else 'NO'."""
    if med is None:
        return None
    if ok(med) and (worst is None or ok(worst)):
        return True
    return "partly" if ok(med) else False


def section_ttfp(data, cfg, row):
    rows, notes = [], []
    for sc in ("warm", "cold"):
        rs = data[sc]
        ttfp = [r["ttfp_s"] for r in rs]
        ovh = [r["cli_overhead_s"] for r in rs]
        rows.append(row(f"time to first prompt, {sc}", "-", fmt_spread(ttfp), None, values=ttfp))
        target = "< 0.5 s" if sc == "warm" else "(none; warm is the target)"
        ok = verdict(median(ovh), max(ovh, default=None), lambda v: v < 0.5) if sc == "warm" else None
        rows.append(row(f"CLI overhead, {sc} = TTFP - (pending {cfg.pending_seconds:g} s + boot "
                        f"{cfg.boot_seconds:g} s)", target, fmt_spread(ovh), ok, values=ovh))
    notes.append("where the time goes (warm, medians): " + ", ".join(
        f"{name} {fmt_s(median([r.get(k) for r in data['warm']]))}" for name, k in (
            ("launch->RunInstances answered", "provision_s"),
            ("pending->noticed (detection lag)", "detection_lag_s"),
            ("pending->sshd up (boot + simulator)", "sim_boot_s"),
            ("sshd up->handshake starts", "ssh_accept_lag_s"),
            ("handshake->first byte", "handshake_to_first_byte_s"))))
    sim_extra = [r["sim_boot_s"] - cfg.boot_seconds for r in data["warm"] if r.get("sim_boot_s") is not None]
    ref = data.get("reference")
    if ref:
        rows.append(row("  reference: box already up, `connect ID -- sh -c 'echo ..'` to first byte", "-",
                        fmt_spread(ref["connect_first_byte_s"]), None, values=ref["connect_first_byte_s"]))
        rows.append(row("  reference: same with OpenSSH `ssh -F cfg HOST` (same route, same sshd)", "-",
                        fmt_spread(ref["ssh_first_byte_s"]), None, values=ref["ssh_first_byte_s"]))
        rows.append(row(f"  reference: the box's login shell ({ref['shell']} -c, empty home, as under the simulated sshd)", "-",
                        fmt_spread(ref["login_shell_s"]), None, values=ref["login_shell_s"]))
    if sim_extra:
        own = [r["cli_overhead_s"] - (r["sim_boot_s"] - cfg.boot_seconds)
               - (median(ref["login_shell_s"]) if ref else 0)
               for r in data["warm"] if r.get("sim_boot_s") is not None]
        rows.append(row("  CLI overhead, warm, without the simulator's own time" + (" and the login shell" if ref else ""),
                        "(informative)", fmt_spread(own), None, values=own))
        notes.append(f"the box simulator itself adds ~{median(sim_extra):.3f} s between `running` and sshd "
                     f"accepting beyond boot_seconds (its 25 ms instance poll + starting sshd); that is not "
                     f"the CLI's doing, nor is the box's login shell start-up")
    return rows, notes


def section_roundtrips(data, cfg, row):
    rows, notes = [], []
    for sc in ("warm", "cold"):
        rs = data[sc]
        before = [r["round_trips_before_run"] for r in rs]
        worst = max((b for b in before if b is not None), default=None)
        target = "<= 2" if sc == "warm" else "(none)"
        ok = (worst is not None and worst <= 2) if sc == "warm" else None
        rows.append(row(f"sequential round trips before RunInstances, {sc}", target,
                        f"{worst} (per run: {', '.join(map(str, before))})", ok, values=before))
        total = [r["round_trips_total_without_polls"] for r in rs]
        rows.append(row(f"sequential round trips to running, {sc} (without status polls)", "-",
                        f"{max(total)} (+ {median([r['wait_polls'] for r in rs]):g} DescribeInstances polls)",
                        None, values=total))
        calls = [r["launch_calls"] for r in rs]
        rows.append(row(f"AWS calls until the first byte, {sc}", "-", f"{max(calls)} (min {min(calls)})",
                        None, values=calls))
        rel = [r["authorize_vs_run"] for r in rs]
        n_conc = sum(1 for x in rel if x == "concurrent")
        rows.append(row(f"AuthorizeSecurityGroupIngress vs RunInstances, {sc}", "concurrent",
                        f"concurrent in {n_conc}/{len(rel)} runs" + (
                            "" if n_conc == len(rel) else f" (others: {', '.join(sorted(set(rel) - {'concurrent'}))})"),
                        n_conc == len(rel), values=rel))
        chain = max(rs, key=lambda r: r["round_trips_before_run"] or 0)["chain_before_run"]
        notes.append(f"{sc}: a longest chain before RunInstances: {' -> '.join(chain) or '(none)'}")
    notes.append("warm calls by action (one run): " + ", ".join(
        f"{k} x{v}" for k, v in data["warm"][-1]["launch_calls_by_action"].items()))
    return rows, notes


def under_row(row, metric, xs, limit):
    """A row whose target is "< limit seconds", judged on the median and the worst run."""
    worst = max((x for x in xs if x is not None), default=None)
    return row(metric, f"< {limit:g} s", fmt_spread(xs), verdict(median(xs), worst, lambda v: v < limit), values=xs)


def section_detection(data, cfg, row):
    rows, notes = [], []
    rs = data["warm"] + data["cold"]
    lag = [r.get("detection_lag_s") for r in rs]
    rows.append(under_row(row, "running in EC2 -> CLI noticed (DescribeInstances answer)", lag, 1.0))
    period = [r.get("poll_period_s") for r in rs]
    rows.append(row("  status poll period (start to start)", "-", fmt_spread(period), None, values=period))
    acc = [r.get("ssh_accept_lag_s") for r in rs]
    rows.append(under_row(row, "sshd accepting -> SSH handshake starts", acc, 0.5))
    nth = [r.get("noticed_to_handshake_s") for r in rs]
    rows.append(row("  CLI noticed running -> handshake starts", "-", fmt_spread(nth), None, values=nth))
    conns = [r["ssh_connections"] for r in rs]
    rows.append(row("  SSH connections sshd saw per launch", "1", f"{max(conns, default=0)}", None, values=conns))
    has_ts = any(r["sshd_log_has_timestamps"] for r in rs)
    notes.append("method: 'running' = RunInstances answered + pending_seconds (localcloud starts the "
                 "pending timer as it answers); 'noticed' = end of the first DescribeInstances whose "
                 "start + injected delay (moto reads the state after the delay) is after that moment.")
    notes.append("method: sshd runs with -e and its log lines have " + ("timestamps" if has_ts else "NO timestamps")
                 + ", so the benchmark polls GET /_localcloud/box every 20 ms: 'accepting' = first poll "
                 "that shows the box `up` (boxsim sets it right after sshd printed 'Server listening'); "
                 "'handshake starts' = first poll whose sshd_log has 'Connection from'. Resolution "
                 "about +/-20 ms (plus one HTTP round trip to the control API).")
    return rows, notes


def section_teardown(data, cfg, row):
    rows, notes = [], []
    budget = 2 * cfg.delay_ms / 1000 + 0.1
    for sc in ("warm", "cold"):
        rs = data[sc]
        tw = [r["teardown_s"] for r in rs]
        rows.append(row(f"remote exit -> CLI exited, {sc}", f"< {budget:.2f} s (2 x {cfg.delay_ms} ms + 0.1 s local)",
                        fmt_spread(tw), verdict(median(tw), max(tw), lambda v: v < budget), values=tw))
        rt = [r["teardown_round_trips"] for r in rs]
        rows.append(row(f"  sequential AWS round trips in teardown, {sc}", "<= 2", f"{max(rt)}",
                        max(rt) <= 2, values=rt))
        n = [r["teardown_calls"] for r in rs]
        rows.append(row(f"  AWS calls in teardown, {sc}", "-", f"{max(n)}", None, values=n))
    rs = data["warm"]
    notes.append("warm teardown split (medians): SSH close (remote exit -> first AWS call) "
                 f"{fmt_s(median([r.get('teardown_ssh_close_s') for r in rs]))}, AWS calls "
                 f"{fmt_s(median([r.get('teardown_aws_s') for r in rs]))}, after the last AWS answer "
                 f"{fmt_s(median([r.get('teardown_after_aws_s') for r in rs]))}")
    notes.append("teardown chain: " + " -> ".join(rs[-1]["teardown_chain"]) + "; calls: " + ", ".join(
        f"{k} x{v}" for k, v in rs[-1]["teardown_calls_by_action"].items()))
    notes.append("remote exit is taken as the arrival of the command's only output byte (`sh -c 'echo "
                 "first-byte'` exits right after it).")
    return rows, notes

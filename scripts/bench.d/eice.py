"""Section 8: the EC2 Instance Connect Endpoint tunnel (`connect = "eice"`) beside direct TCP.

Both sessions run on the same local cloud and box simulator: one launched with `--connect eice`
(SSH inside the local endpoint's ws:// relay, which checks the SigV4 query signature and pipes
to the box's resume relay on port 2022, which holds the connection to its sshd), one reached by
TCP at its public IP. Time to first byte is from starting
`connect ID -- echo x` until its first output byte arrives (a new tunnel or TCP connection, the
SSH handshake, the channel); throughput is `connect ID -- cat` as in section 6. Last, the resume gap: with the endpoint
forced to close every tunnel after 2 s, a command printing a line every 20 ms for 10 s, and the
longest silence between lines as they arrive here (the time SSH's stream spends moving to a new
tunnel), beside the longest silence with no tunnel closed.
"""

import json
import subprocess
import time

from harness import log, median
from others import PipeSession, describe_tp, throughput

# The local endpoint knows the tests' static key (it verifies signatures with its secret).
EICE_KEYS = ["AWS_ACCESS_KEY_ID=testing", "AWS_SECRET_ACCESS_KEY=testing"]


class EiceSession:
    """`setup eice`, then one detached session in eice mode."""

    def __init__(self, h):
        self.h = h
        h.cloud.control("PUT", "eice", {"create_seconds": 0})
        ws = h.cloud.control("GET", "eice")["ws_url"]
        self.prefix = ["env", *EICE_KEYS, f"EPHEMERAL_ADMIN_EICE_ENDPOINT_URL={ws}"]
        self.run("setup", "eice", "-q")
        out = self.run("launch", "--detach", "--connect", "eice", "--user", h.user, "--idle-grace", "30m",
                       "--output", "json", "-q")
        doc = json.loads(out)
        self.id = doc["session_id"]
        h.sessions.add(self.id)
        self.run("connect", self.id, "--", "true")  # the box is up before anything is measured

    def run(self, *args, timeout=180):
        p = self.h.popen([*self.prefix, self.h.bin, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"`ephemeral-admin {' '.join(args)}` exited {p.returncode}: {err.decode()[-800:]}")
        return out.decode()

    def ea(self, *cmd):
        return [*self.prefix, self.h.bin, "connect", self.id, "--", *cmd]


def first_byte(h, argv, runs):
    """Seconds from starting argv until the first byte on its stdout, per run."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        p = h.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        got = p.stdout.read(1)
        times.append(time.perf_counter() - t0)
        p.communicate(timeout=60)
        if not got or p.returncode != 0:
            raise RuntimeError(f"{argv[-3:]} printed nothing (exit {p.returncode})")
    return times


def section_eice(h, cfg, row, shared):
    rows, notes, data = [], [], {}
    size = (16 if cfg.quick else 512) * 1024 * 1024
    runs, ttfb_runs = (1, 3) if cfg.quick else (3, 10)
    direct = shared.get("pipe_session") or PipeSession(h, cfg)
    shared["pipe_session"] = direct
    log("eice: setup eice and an eice session")
    eice = EiceSession(h)
    routes = {"direct TCP": direct.ea, "EICE relay": eice.ea}
    for route, ea in routes.items():
        log(f"eice: time to first byte via {route}")
        ttfb = first_byte(h, ea("echo", "x"), ttfb_runs)
        tp = throughput(h, f"ephemeral-admin via {route}", ea("cat"), size, runs, notes)
        data[route] = {"first_byte_s": ttfb, "throughput": tp}
        rows.append(row(f"time to first byte, `connect ID -- echo x`, via {route}", "-",
                        f"median {median(ttfb) * 1000:.0f} ms (n={len(ttfb)})", None, values=ttfb))
        rows.append(row(f"  {size >> 20} MiB through `connect ID -- cat`, via {route}", "-", describe_tp(tp), None,
                        values=tp["wall_s"]))
    log("eice: the resume gap across tunnels the endpoint closes")
    steady = longest_silence(h, eice.ea("sh", "-c", TICKER))
    h.cloud.control("PUT", "eice", {"tunnel_limit_seconds": 2})
    try:
        gaps = longest_silence(h, eice.ea("sh", "-c", TICKER))
    finally:
        h.cloud.control("PUT", "eice", {"tunnel_limit_seconds": 3600})
    data["resume"] = {"steady_gap_s": steady, "resume_gap_s": gaps}
    rows.append(row("longest silence in a 10 s command, tunnels closed every 2 s (resumed)", "-",
                    f"{gaps * 1000:.0f} ms (no tunnel closed: {steady * 1000:.0f} ms)", None))
    notes.append("the EICE relay is the local cloud's stand-in (Python, ws:// on loopback, one thread per "
                 "tunnel): it shows the client's framing cost and the extra hop, not AWS's endpoint. Each "
                 "`connect` opens a new tunnel with a fresh SigV4 signature.")
    return rows, notes, data


# A line every 20 ms for 10 s.
TICKER = "i=0; while [ $i -lt 500 ]; do i=$((i+1)); echo tick-$i; sleep 0.02; done"


def longest_silence(h, argv):
    """The longest time between two lines of argv's stdout, as they arrive; checks all came."""
    p = h.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    last, longest, count = time.perf_counter(), 0.0, 0
    for _ in p.stdout:
        now = time.perf_counter()
        longest, last, count = max(longest, now - last) if count else 0.0, now, count + 1
    p.communicate(timeout=60)
    if p.returncode != 0 or count != 500:
        raise RuntimeError(f"the ticker printed {count} of 500 lines (exit {p.returncode})")
    return longest

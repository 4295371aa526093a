"""The benchmark's harness: the local cloud, a private environment for the CLI, bounded child
processes, and the call-log arithmetic every section shares.

Everything here talks to 127.0.0.1 only, every wait has a deadline, and every process started is
remembered so that `Harness.close()` can end it by pid.
"""

import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOCALCLOUD = os.path.join(ROOT, "tests/support/localcloud/localcloud.py")
BOX_CONNECT = os.path.join(ROOT, "tests/support/localcloud/box-connect")
MY_IP = "203.0.113.7"


def log(msg):
    """Progress on stderr (results go to stdout)."""
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------- statistics


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def pct(xs, p):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))
    return xs[k]


def spread(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


# --------------------------------------------------------------------------- call-log arithmetic


def depth_chain(calls):
    """Calls sorted by start, and for each the longest chain of strictly sequential calls that ends
    with it (1 = nothing finished before it started)."""
    calls = sorted(calls, key=lambda c: c["t_start"])
    depth = []
    for i, c in enumerate(calls):
        before = [depth[j] for j in range(i) if calls[j]["t_end"] is not None
                  and calls[j]["t_end"] <= c["t_start"] + 1e-4]
        depth.append(1 + max(before, default=0))
    return calls, depth


def chain_of(calls, depth, index):
    """One longest sequential chain ending at calls[index], as action names (for diagnosis)."""
    chain = [calls[index]]
    i = index
    while depth[i] > 1:
        for j in range(i - 1, -1, -1):
            if depth[j] == depth[i] - 1 and calls[j]["t_end"] is not None \
                    and calls[j]["t_end"] <= calls[i]["t_start"] + 1e-4:
                chain.append(calls[j])
                i = j
                break
        else:
            break
    return [f"{c['service']}:{c['action']}" for c in reversed(chain)]


def overlap(a, b):
    """'concurrent' when the two calls overlap in time, else 'before'/'after' (a relative to b)."""
    if a["t_end"] <= b["t_start"] + 1e-4:
        return "before"
    if a["t_start"] >= b["t_end"] - 1e-4:
        return "after"
    return "concurrent"


# --------------------------------------------------------------------------- the local cloud


class Cloud:
    """localcloud.py --box-sim, on a free port, ended with SIGTERM (or stdin EOF if we die)."""

    def __init__(self, stderr_path):
        self.stderr_path = stderr_path
        self.stderr = open(stderr_path, "ab")
        wrap = os.environ.get("BENCH_CLOUD_WRAP", "").split()  # debugging aid, e.g. strace
        self.proc = subprocess.Popen(
            [*wrap, sys.executable, LOCALCLOUD, "--port", "0", "--box-sim", "--exit-on-stdin-eof"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline().decode() if ready else ""
        if "url=" not in line:
            self.stop()
            raise RuntimeError(f"localcloud did not start (see {stderr_path}): {line!r}")
        self.url = line.split("url=")[1].split()[0]
        # Boxes listen at their own (loopback) public IP on this port: 22 unless it was taken.
        port = [w.split("=", 1)[1] for w in line.split() if w.startswith("box_ssh_port=")]
        self.box_ssh_port = int(port[0]) if port else 22
        self.drop_syns_while_booting = False
        # Let the background warm-up (botocore models) finish before anything is measured.
        time.sleep(1.0)

    def control(self, method, path, body=None, timeout=30):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}/_localcloud/{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise
        except urllib.error.URLError as e:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the local cloud exited ({self.proc.returncode}); its stderr ends: "
                                   f"{self.stderr_tail()}") from e
            raise

    def stderr_tail(self, n=2000):
        self.stderr.flush()
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return "?"

    def configure(self, delay_ms=None, pending_seconds=None, boot_seconds=None, drop_syns_while_booting=None):
        doc = {}
        if delay_ms is not None:
            doc["delay_ms"] = delay_ms
        if pending_seconds is not None:
            doc["pending_seconds"] = pending_seconds
        if doc:
            self.control("PUT", "config", doc)
        if drop_syns_while_booting is not None:
            self.drop_syns_while_booting = drop_syns_while_booting
        if boot_seconds is not None:
            # (a reset forgets the box config: it is sent whole every time)
            self.control("PUT", "box-config", {"boot_seconds": boot_seconds,
                                               "drop_syns_while_booting": self.drop_syns_while_booting})

    def reset(self):
        self.control("POST", "reset")

    def calls(self):
        return self.control("GET", "log")["calls"]

    def clear_log(self):
        self.control("DELETE", "log")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.stderr.close()


class BoxWatcher:
    """Polls the box simulator while a launch runs, to timestamp (to within `interval`) when each
    box turns `up` (its sshd accepts: boxsim sets `up` right after sshd printed "Server listening")
    and when the first "Connection from" appears in its sshd log (the client's handshake starts).
    sshd runs with -e, so its log lines carry no timestamps: polling is the clock."""

    def __init__(self, cloud, interval=0.02, limit_s=180):
        self.cloud, self.interval, self.limit_s = cloud, interval, limit_s
        self.up_at, self.conn_at, self.listening_seen = {}, {}, {}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join(timeout=5)

    def _run(self):
        end = time.monotonic() + self.limit_s
        while not self.stop_event.is_set() and time.monotonic() < end:
            try:
                boxes = (self.cloud.control("GET", "box", timeout=5) or {}).get("boxes", [])
                now = time.time()
                for b in boxes:
                    iid = b["instance_id"]
                    if b["state"] == "up" and iid not in self.up_at:
                        self.up_at[iid] = now
                    if iid in self.up_at and iid not in self.conn_at:
                        info = self.cloud.control("GET", f"box/{iid}", timeout=5) or {}
                        lines = info.get("sshd_log") or []
                        t = time.time()
                        if any("Connection from" in ln for ln in lines):
                            self.conn_at[iid] = t
                        if any("Server listening" in ln for ln in lines):
                            self.listening_seen[iid] = True
            except Exception:  # noqa: BLE001 (a missed tick is fine)
                pass
            self.stop_event.wait(self.interval)


# --------------------------------------------------------------------------- the CLI


class Harness:
    def __init__(self, binary, workdir, route="direct", drop_syns_while_booting=True):
        self.bin = os.path.abspath(binary)
        self.route = route
        self.drop_syns_while_booting = drop_syns_while_booting
        self.work = workdir
        self.cloud = None
        self.sessions = set()  # detached sessions we launched and must terminate
        self.procs = []  # every Popen we started, ended by pid in close()
        self.user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
        self.home = os.path.join(workdir, "home")
        os.makedirs(self.home, exist_ok=True)

    def start_cloud(self):
        self.cloud = Cloud(os.path.join(self.work, "localcloud.stderr"))
        self.cloud.drop_syns_while_booting = self.drop_syns_while_booting
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": self.home,
            "XDG_STATE_HOME": f"{self.home}/state",
            "XDG_CONFIG_HOME": f"{self.home}/config",
            "XDG_CACHE_HOME": f"{self.home}/cache",
            "XDG_DATA_HOME": f"{self.home}/data",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.cloud.url,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": f"{self.home}/none",
            "AWS_SHARED_CREDENTIALS_FILE": f"{self.home}/none",
            "LANG": "C.UTF-8",
            "TERM": "xterm-256color",
        }
        if self.cloud.box_ssh_port != 22:
            self.env["EPHEMERAL_ADMIN_SSH_PORT"] = str(self.cloud.box_ssh_port)
        # The account's standing IAM, made once by an admin (a launch only reads it).
        self.run(["setup", "roles", "-q"], timeout=120)
        return self.cloud

    @property
    def proxy(self):
        # The venv's interpreter with -S: a pyenv shim in front of `python3` costs ~90 ms per
        # spawn, and the CLI spawns the proxy command on every connection attempt.
        return f"{sys.executable} -S {BOX_CONNECT} {self.cloud.url} %i"

    def launch_args(self):
        via = ["--proxy-command", self.proxy] if self.route == "box-connect" else []
        return ["--my-ip", MY_IP, "--user", self.user, *via]

    def popen(self, argv, **kw):
        kw.setdefault("env", self.env)
        p = subprocess.Popen(argv, **kw)
        self.procs.append(p)
        return p

    def run(self, args, timeout=120, check=True, input=None):
        """The CLI with `args`; returns (CompletedProcess, wall seconds)."""
        t0 = time.perf_counter()
        p = self.popen([self.bin, *args], stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = p.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            end_process(p)
            out, err = p.communicate()
            raise RuntimeError(f"`ephemeral-admin {' '.join(args)}` took more than {timeout}s")
        wall = time.perf_counter() - t0
        cp = subprocess.CompletedProcess(p.args, p.returncode, out.decode(errors="replace"),
                                         err.decode(errors="replace"))
        if check and cp.returncode != 0:
            raise RuntimeError(f"`ephemeral-admin {' '.join(args)}` exited {cp.returncode}: "
                               f"{cp.stderr.strip()[-800:]}")
        return cp, wall

    def launch_detached(self, extra=(), timeout=120):
        cp, wall = self.run(["launch", "--detach", *self.launch_args(), *extra, "--output", "json", "-q"],
                            timeout=timeout)
        doc = json.loads(cp.stdout)
        self.sessions.add(doc["session_id"])
        return doc, wall

    def terminate(self, session_id, timeout=60):
        cp, _ = self.run(["terminate", session_id, "-q"], timeout=timeout, check=False)
        if cp.returncode == 0:
            self.sessions.discard(session_id)
        return cp.returncode == 0

    def terminate_all(self, parallel=3):
        ids = sorted(self.sessions)
        bounded_parallel(lambda sid: self.terminate(sid), ids, parallel)

    def close(self):
        """Terminate our sessions, sweep what a killed launch may have left, stop the cloud, and
        end any child still running (by pid)."""
        try:
            if self.cloud is not None and self.cloud.proc.poll() is None:
                self.cloud.configure(delay_ms=0, pending_seconds=0)
                if self.sessions:
                    log(f"terminating {len(self.sessions)} session(s)")
                    self.terminate_all()
                self.run(["cleanup", "--all", "-q"], timeout=120, check=False)
        except Exception as e:  # noqa: BLE001
            log(f"cleanup trouble: {e}")
        for p in self.procs:
            if p.poll() is None:
                end_process(p)
        if self.cloud is not None:
            self.cloud.stop()


def end_process(p, grace=10):
    """SIGTERM (the CLI tears down on it), then SIGKILL after `grace` seconds; by pid only."""
    if p.poll() is not None:
        return
    try:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        p.kill()
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    except OSError:
        pass


def bounded_parallel(fn, items, parallel):
    """fn(item) for every item, at most `parallel` at once; returns results in order."""
    results = [None] * len(items)
    lock = threading.Lock()
    todo = list(enumerate(items))

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i, item = todo.pop(0)
            try:
                results[i] = fn(item)
            except Exception as e:  # noqa: BLE001
                results[i] = e

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, parallel))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def wait4_with_timeout(p, timeout):
    """Waits for Popen `p` with os.wait4 (to get its rusage); returns (t_exit, rusage) or raises
    TimeoutError. Sets p.returncode."""
    end = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid == p.pid:
            t = time.time()
            p.returncode = os.waitstatus_to_exitcode(status)
            return t, ru
        if time.monotonic() > end:
            raise TimeoutError
        time.sleep(0.002)


def proc_number(pid, file, key):
    """The number after `key:` in /proc/PID/FILE; None if the process or the line is gone."""
    try:
        with open(f"/proc/{pid}/{file}") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def vm_hwm_kib(pid):
    return proc_number(pid, "status", "VmHWM")


def git_describe():
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return {"commit": head, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def make_workdir():
    return tempfile.mkdtemp(prefix="ea-bench-")


def remove_workdir(path):
    shutil.rmtree(path, ignore_errors=True)

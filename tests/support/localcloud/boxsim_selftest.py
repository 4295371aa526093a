#!/usr/bin/env python3
"""Self-test of boxsim + the real watchdog (src/userdata/watchdog.sh).

    .venv/bin/python tests/support/localcloud/boxsim_selftest.py [--harness auto|localcloud|standin]

Harness: with ``localcloud`` it starts ``localcloud.py --box-sim --port 0
--exit-on-stdin-eof`` (plus $BOXSIM_SELFTEST_LOCALCLOUD_ARGS), reads its
``LOCALCLOUD READY url=...`` line and talks to it over HTTP; with ``standin`` it builds a minimal in-process cloud (moto's WSGI app
plus the /_localcloud routes) and attaches boxsim to it. ``auto`` (the default)
uses localcloud.py when it exists and answers, else the stand-in, loudly.

Everything goes through HTTP on 127.0.0.1 (boto3 for EC2, urllib for the control
routes, the real ssh client for SSH), so both harnesses run the same checks.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import getpass
import gzip
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
WATCHDOG = os.path.join(REPO, "src", "userdata", "watchdog.sh")
UNIT = os.path.join(REPO, "src", "userdata", "watchdog.service")
RESUME = os.path.join(REPO, "src", "userdata", "resume.py")
RESUME_UNIT = os.path.join(REPO, "src", "userdata", "resume.service")
BOX_CONNECT = os.path.join(HERE, "box-connect")
LOCALCLOUD = os.path.join(HERE, "localcloud.py")
TAG = "ephemeral-admin:expires-at"
INTERVAL, IDLE_GRACE, BOOT_GRACE, BOOT_SECONDS = 1, 3, 4, 1.0
MARK = b"EA_BOXSIM_BOX="


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rfc3339(epoch):
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Failure(AssertionError):
    pass


def check(cond, msg):
    if not cond:
        raise Failure(msg)


# --------------------------------------------------------------------------- harnesses


class StandInCloud:
    """The part of localcloud's interface boxsim uses, over moto's WSGI app."""

    def __init__(self):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        self.routes = []
        self.shutdown_fns = []
        self.moto_app = DomainDispatcherApplication(create_backend_app)
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def app(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path.startswith("/_localcloud/"):
            method = environ["REQUEST_METHOD"]
            n = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(n) if n else b""
            for m, prefix, handler in sorted(self.routes, key=lambda r: -len(r[1])):
                if m == method and path.startswith(prefix):
                    status, obj = handler(environ, body)
                    break
            else:
                status, obj = 404, {"error": "no route"}
            data = json.dumps(obj).encode()
            start_response(f"{status} X", [("Content-Type", "application/json"),
                                           ("Content-Length", str(len(data)))])
            return [data]
        return self.moto_app(environ, start_response)

    def ec2_backend(self, region):
        from moto.ec2.models import ec2_backends

        return ec2_backends["123456789012"][region]

    def add_route(self, method, prefix, handler):
        self.routes.append((method, prefix, handler))

    def on_shutdown(self, fn):
        self.shutdown_fns.append(fn)

    def terminate_instance(self, region, iid):
        self.ec2_backend(region).terminate_instances([iid])

    def close(self):
        for fn in self.shutdown_fns:
            fn()
        self.server.shutdown()


class StandInHarness:
    name = "standin"

    def __init__(self):
        sys.path.insert(0, HERE)
        import boxsim

        self.cloud = StandInCloud()
        boxsim.attach(self.cloud)
        self.base_url = self.cloud.base_url

    def close(self):
        self.cloud.close()


class LocalcloudHarness:
    name = "localcloud"

    def __init__(self):
        extra = shlex.split(os.environ.get("BOXSIM_SELFTEST_LOCALCLOUD_ARGS", ""))
        cmd = [sys.executable, LOCALCLOUD, "--box-sim", "--port", "0", "--exit-on-stdin-eof", *extra]
        self.log = tempfile.NamedTemporaryFile(prefix="localcloud-", suffix=".log", delete=False)
        log(f"starting {' '.join(cmd)} (log {self.log.name})")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log,
                                     stdin=subprocess.PIPE, start_new_session=True, text=True)
        ready = []
        reader = threading.Thread(target=lambda: ready.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(30)
        line = ready[0] if ready else ""
        if not line.startswith("LOCALCLOUD READY url="):
            self.close()
            raise RuntimeError(f"localcloud.py did not get ready ({line!r}); see {self.log.name}")
        self.base_url = line.split()[2].split("=", 1)[1]
        status, _ = http("GET", self.base_url + "/_localcloud/box")
        if status != 200:
            self.close()
            raise RuntimeError(f"localcloud.py has no /_localcloud/box ({status}): boxsim not attached?")

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f:
                f.close()


# --------------------------------------------------------------------------- helpers


def http(method, url, body=None, timeout=5):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")


def keygen(path, comment):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path],
                   check=True)
    with open(path) as f:
        private = f.read()
    with open(path + ".pub") as f:
        public = f.read().strip()
    return private, public


def indent(text, n):
    pad = " " * n
    return "".join(pad + line + "\n" if line else "\n" for line in text.splitlines())


def render_user_data(host_priv, host_pub, client_pub, env, encoded=False, resume=False):
    """The CLI's #cloud-config shape; encoded=True ships the files as b64/gz+b64; resume=True
    adds the resume relay (connect = "eice"): its script, its unit and the runcmd enabling it."""
    with open(WATCHDOG) as f:
        script = f.read()
    with open(UNIT) as f:
        unit = f.read()
    env_text = "".join(f"{k}={v}\n" for k, v in env.items())

    def entry(path, content, perms=None, enc=None):
        out = f"  - path: {path}\n"
        if perms:
            out += f"    permissions: '{perms}'\n"
        if enc == "b64":
            return out + "    encoding: b64\n" + f"    content: {base64.b64encode(content.encode()).decode()}\n"
        if enc == "gz+b64":
            data = base64.b64encode(gzip.compress(content.encode())).decode()
            return out + "    encoding: gz+b64\n" + f"    content: {data}\n"
        return out + "    content: |\n" + indent(content, 6)

    return (
        "#cloud-config\n"
        "ssh_pwauth: false\n"
        "ssh_deletekeys: true\n"
        "ssh_genkeytypes: []\n"
        "ssh_keys:\n"
        "  ed25519_private: |\n" + indent(host_priv, 4)
        + f"  ed25519_public: {host_pub}\n"
        "ssh_authorized_keys:\n"
        f"  - {client_pub}\n"
        "packages: [tmux]\n"
        "write_files:\n"
        + entry("/etc/ephemeral-admin/watchdog.env", env_text, "0644", "b64" if encoded else None)
        + entry("/usr/local/sbin/ephemeral-admin-watchdog", script, "0755", "gz+b64" if encoded else None)
        + entry("/etc/systemd/system/ephemeral-admin-watchdog.service", unit)
        + (entry("/usr/local/lib/ephemeral-admin/resume.py", open(RESUME).read(), "0644",
                 "gz+b64" if encoded else None)
           + entry("/etc/systemd/system/ephemeral-admin-resume.service", open(RESUME_UNIT).read())
           if resume else "")
        + "runcmd:\n"
        "  - [systemctl, daemon-reload]\n"
        "  - [systemctl, enable, --now, ephemeral-admin-watchdog.service]\n"
        + ("  - [systemctl, enable, --now, ephemeral-admin-resume.service]\n" if resume else "")
    )


# Instance ids this run launched: the machine may be shared with other localclouds whose
# boxes carry the same mark, so the leak checks only count processes of our own boxes.
LAUNCHED: set[str] = set()


def marked_pids():
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                entries = f.read().split(b"\0")
        except OSError:
            continue
        boxes = {e[len(MARK):].decode(errors="replace") for e in entries if e.startswith(MARK)}
        if boxes & LAUNCHED:
            pids.append(int(name))
    return pids


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Env:
    """Shared test context: keys, clients, harness."""

    def __init__(self, base_url, work):
        import boto3

        self.base = base_url
        self.work = work
        self.user = getpass.getuser()
        self.host_priv, self.host_pub = keygen(os.path.join(work, "host"), "ephemeral-admin-host")
        _, self.client_pub = keygen(os.path.join(work, "client"), "ephemeral-admin-selftest")
        self.client_key = os.path.join(work, "client")
        _, other_pub = keygen(os.path.join(work, "other"), "not-the-host")
        self.known = os.path.join(work, "known_hosts")
        self.wrong_known = os.path.join(work, "wrong_known_hosts")
        with open(self.known, "w") as f:
            f.write(f"ea-box {self.host_pub}\n")
        with open(self.wrong_known, "w") as f:
            f.write(f"ea-box {other_pub}\n")
        self.ec2 = {r: boto3.client("ec2", region_name=r, endpoint_url=base_url,
                                    aws_access_key_id="testing", aws_secret_access_key="testing")
                    for r in ("us-east-1", "eu-west-1")}
        # moto's server mode checks the AMI: take one of its stock images per region
        self.ami = {r: c.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
                    for r, c in self.ec2.items()}

    def launch(self, region="us-east-1", env=None, tags=None, encoded=False, resume=False):
        e = {"EA_SESSION_ID": "selftest", "EA_DEADLINE": int(time.time()) + 3600,
             "EA_IDLE_GRACE": IDLE_GRACE, "EA_BOOT_GRACE": BOOT_GRACE, "EA_INTERVAL": INTERVAL}
        e.update(env or {})
        ud = render_user_data(self.host_priv, self.host_pub, self.client_pub, e, encoded, resume)
        kw = {}
        if tags:
            kw["TagSpecifications"] = [{"ResourceType": "instance",
                                        "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]
        r = self.ec2[region].run_instances(ImageId=self.ami[region], MinCount=1, MaxCount=1,
                                           InstanceType="t3.micro", UserData=ud,
                                           InstanceInitiatedShutdownBehavior="terminate", **kw)
        LAUNCHED.add(r["Instances"][0]["InstanceId"])
        return r["Instances"][0]["InstanceId"]

    def box(self, iid):
        status, body = http("GET", f"{self.base}/_localcloud/box/{iid}")
        return body if status == 200 else None

    def wait_box(self, iid, states, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            b = self.box(iid)
            if b and b["state"] in states:
                return b
            time.sleep(0.05)
        raise Failure(f"{iid}: box not in {states} after {timeout}s: {self.box(iid)}")

    def ec2_state(self, region, iid):
        r = self.ec2[region].describe_instances(InstanceIds=[iid])
        return r["Reservations"][0]["Instances"][0]["State"]["Name"]

    def wait_terminated(self, region, iid, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.ec2_state(region, iid) == "terminated":
                return time.monotonic()
            time.sleep(0.05)
        raise Failure(f"{iid}: not terminated after {timeout}s; box={self.box(iid)}")

    def ssh(self, iid, *cmd, known=None, extra=(), **popen):
        args = ["ssh", "-F", "/dev/null", "-i", self.client_key, "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={known or self.known}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "HostKeyAlias=ea-box",
                "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR",
                "-o", f"ProxyCommand={BOX_CONNECT} {self.base} %h", *extra,
                f"{self.user}@{iid}", *cmd]
        return args

    def run_ssh(self, iid, *cmd, known=None, timeout=15):
        return subprocess.run(self.ssh(iid, *cmd, known=known), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def wait_log(self, iid, needle, timeout, key="watchdog_log"):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            b = self.box(iid)
            if b and any(needle in line for line in b.get(key, [])):
                return b
            time.sleep(0.1)
        raise Failure(f"{iid}: {needle!r} not in {key} after {timeout}s: {self.box(iid)}")

    def hold(self, iid):
        """ssh -N kept open in the background; returns the Popen."""
        p = subprocess.Popen(self.ssh(iid, "-N"), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.wait_log(iid, "ssh connections=1", 8)
        return p


def box_connect_rc(base, iid):
    t = time.monotonic()
    p = subprocess.run([BOX_CONNECT, base, iid], stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=10)
    return p.returncode, time.monotonic() - t


# --------------------------------------------------------------------------- scenarios


def scenario_never_connected(E):
    iid = E.launch()
    b = E.wait_box(iid, {"booting", "up"}, 5)
    if b["state"] == "booting":
        rc, took = box_connect_rc(E.base, iid)
        check(rc == 1 and took < 3, f"box-connect while booting: rc={rc} took={took:.1f}s")
        log(f"never-connected: box-connect while booting exits 1 in {took:.2f}s")
    b = E.wait_box(iid, {"up"}, 10)
    t_up = time.monotonic()
    # IMDSv2 contract, straight at the fake IMDS.
    imds = b["imds_url"]
    st, _ = http("GET", f"{imds}/latest/meta-data/instance-id")
    check(st == 401, f"IMDS GET without token: {st}")
    st, _ = http("PUT", f"{imds}/latest/api/token")
    check(st == 400, f"IMDS PUT without TTL header: {st}")
    req = urllib.request.Request(f"{imds}/latest/api/token", method="PUT",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    tok = urllib.request.urlopen(req, timeout=3).read().decode()

    def get(path):
        r = urllib.request.Request(f"{imds}/latest/meta-data/{path}",
                                   headers={"X-aws-ec2-metadata-token": tok})
        try:
            with urllib.request.urlopen(r, timeout=3) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, ""

    check(get("instance-id") == (200, iid), "IMDS instance-id")
    E.ec2["us-east-1"].create_tags(Resources=[iid], Tags=[{"Key": "Name", "Value": "nc"}])
    check(get("tags/instance") == (200, "Name"), f"IMDS tags/instance: {get('tags/instance')}")
    check(get("tags/instance/Name") == (200, "nc"), "IMDS tag value (live)")
    check(get(f"tags/instance/{TAG}")[0] == 404, "IMDS absent tag -> 404")
    check(get("spot/instance-action")[0] == 404, "IMDS spot -> 404 without notice")
    t_end = E.wait_terminated("us-east-1", iid, BOOT_GRACE + 8)
    took = t_end - t_up
    b = E.wait_box(iid, {"powered-off"}, 3)
    check(b["poweroff_reason"] == "never-connected", f"reason: {b['poweroff_reason']}")
    check(took >= BOOT_GRACE - 0.2, f"terminated {took:.1f}s after up: before the boot grace")
    check(took <= BOOT_GRACE + 4, f"terminated {took:.1f}s after up: too late")
    check(any("poweroff reason=never-connected" in x for x in b["watchdog_log"]), "watchdog log")
    rc, _ = box_connect_rc(E.base, iid)
    check(rc == 1, f"box-connect to a powered-off box: rc={rc}")
    return f"never-connected: terminated {took:.1f}s after up (boot grace {BOOT_GRACE}s); IMDSv2 token/tags/spot ok"


def scenario_hostkey_idle(E):
    region = "eu-west-1"
    iid = E.launch(region=region)
    E.wait_box(iid, {"up"}, 10)
    bad = E.run_ssh(iid, "true", known=E.wrong_known)
    check(bad.returncode == 255 and ("IDENTIFICATION HAS CHANGED" in bad.stderr
                                     or "verification failed" in bad.stderr),
          f"ssh with a wrong pinned key must fail: rc={bad.returncode} {bad.stderr!r}")
    ok = E.run_ssh(iid, "echo", "pinned-ok")
    check(ok.returncode == 0 and "pinned-ok" in ok.stdout, f"ssh with pinned key: {ok!r}")
    # direct (no proxy) too, with the port from the control API
    port = E.box(iid)["ssh_port"]
    direct = subprocess.run(["ssh", "-F", "/dev/null", "-i", E.client_key, "-p", str(port),
                             "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                             "-o", f"UserKnownHostsFile={E.known}", "-o", "HostKeyAlias=ea-box",
                             "-o", "LogLevel=ERROR", f"{E.user}@127.0.0.1", "true"],
                            capture_output=True, text=True, timeout=15, stdin=subprocess.DEVNULL)
    check(direct.returncode == 0, f"direct ssh: {direct.stderr!r}")
    p = E.hold(iid)
    time.sleep(IDLE_GRACE + 2 * INTERVAL + 1)
    check(E.ec2_state(region, iid) == "running", "terminated while an SSH connection was open")
    p.terminate()
    p.wait(5)
    t_close = time.monotonic()
    t_end = E.wait_terminated(region, iid, IDLE_GRACE + 8)
    took = t_end - t_close
    b = E.wait_box(iid, {"powered-off"}, 3)
    check(b["poweroff_reason"] == "idle", f"reason: {b['poweroff_reason']}")
    check(took >= IDLE_GRACE, f"terminated {took:.1f}s after close: before the idle grace")
    check(took <= IDLE_GRACE + 3 * INTERVAL + 1.5, f"terminated {took:.1f}s after close: too late")
    check(any("poweroff reason=idle idle_for=" in x for x in b["watchdog_log"]), "watchdog log")
    check(any("ephemeral-admin:" in x for x in b["wall"]), "idle poweroff broadcast")
    return f"pinned host key presented (wrong pin refused); idle: terminated {took:.1f}s after close (grace {IDLE_GRACE}s)"


def scenario_deadline(E):
    iid = E.launch()
    E.wait_box(iid, {"up"}, 10)
    out = os.path.join(E.work, "pty.out")
    with open(out, "wb") as f:
        pty = subprocess.Popen(E.ssh(iid, "sleep", "60", extra=("-tt",)), stdin=subprocess.PIPE,
                               stdout=f, stderr=subprocess.STDOUT)
    E.wait_log(iid, "ssh connections=1", 8)
    ec2 = E.ec2["us-east-1"]
    ec2.create_tags(Resources=[iid], Tags=[{"Key": TAG, "Value": rfc3339(time.time() + 45)}])
    b = E.wait_log(iid, "warn deadline in=", 5)
    check(any("deadline source=imds" in x for x in b["watchdog_log"]), "deadline from the tag")
    E.wait_log(iid, "powers off in", 3, key="wall")

    def warns():
        return sum("warn deadline in=" in x for x in E.box(iid)["watchdog_log"])

    # A later deadline re-arms the warnings; an earlier (still future) one does not.
    ec2.create_tags(Resources=[iid], Tags=[{"Key": TAG, "Value": rfc3339(time.time() + 55)}])
    end = time.monotonic() + 4
    while warns() < 2 and time.monotonic() < end:
        time.sleep(0.1)
    check(warns() == 2, f"extended deadline did not re-arm the warning: {E.box(iid)['watchdog_log']}")
    ec2.create_tags(Resources=[iid], Tags=[{"Key": TAG, "Value": rfc3339(time.time() + 40)}])
    time.sleep(2.5 * INTERVAL)
    check(warns() == 2, f"earlier deadline warned again: {E.box(iid)['watchdog_log']}")
    check(E.ec2_state("us-east-1", iid) == "running", "terminated before the deadline")
    t_tag = time.monotonic()
    ec2.create_tags(Resources=[iid], Tags=[{"Key": TAG, "Value": rfc3339(time.time() - 60)}])
    took = E.wait_terminated("us-east-1", iid, 6) - t_tag
    b = E.wait_box(iid, {"powered-off"}, 3)
    check(b["poweroff_reason"] == "deadline", f"reason: {b['poweroff_reason']}")
    check(any("poweroff reason=deadline" in x for x in b["watchdog_log"]), "watchdog log")
    check(len(b["wall"]) >= 2, f"wall lines: {b['wall']}")
    try:
        pty.wait(5)
    except subprocess.TimeoutExpired:
        pty.kill()
        raise Failure("the ssh session survived the box")
    with open(out, "rb") as f:
        seen = f.read().decode(errors="replace")
    check("ephemeral-admin: this box powers off in" in seen, f"PTY user did not see the warning: {seen!r}")
    check("reason: deadline" in seen, f"PTY user did not see the power-off: {seen!r}")
    return f"deadline: warned (wall + PTY), re-armed on extend, tag moved into the past -> terminated {took:.1f}s later with a session open"


def scenario_imds_down(E):
    baked = int(time.time() + BOOT_SECONDS) + 7
    iid = E.launch(env={"EA_DEADLINE": baked}, tags={TAG: rfc3339(time.time() + 3600)})
    b = E.wait_box(iid, {"booting", "up"}, 5)
    check(b["state"] == "booting", "box already up: cannot switch IMDS off before the watchdog")
    st, body = http("POST", f"{E.base}/_localcloud/box/{iid}/imds", {"available": False})
    check(st == 200 and body["imds_available"] is False, f"imds switch: {st} {body}")
    b = E.wait_box(iid, {"up"}, 10)
    r = subprocess.run(["curl", "-s", "-m", "2", "-X", "PUT", "-H",
                        "X-aws-ec2-metadata-token-ttl-seconds: 60", f"{b['imds_url']}/latest/api/token"],
                       capture_output=True)
    check(r.returncode != 0, "IMDS should drop the connection while unavailable")
    p = E.hold(iid)
    E.wait_terminated("us-east-1", iid, baked - time.time() + 5)
    check(time.time() >= baked - 1,
          f"terminated {baked - time.time():.1f}s before the baked deadline: {E.box(iid)}")
    b = E.wait_box(iid, {"powered-off"}, 3)
    check(b["poweroff_reason"] == "deadline", f"reason: {b['poweroff_reason']}")
    wl = b["watchdog_log"]
    check(any(f"deadline source=baked value={baked}" in x for x in wl), f"baked deadline: {wl}")
    check(not any("source=imds" in x for x in wl), "IMDS was down, yet the tag was read")
    p.wait(5)
    return "IMDS unavailable: connection dropped; terminated at the baked EA_DEADLINE (tag ignored)"


def scenario_spot_external(E):
    iid = E.launch(encoded=True)
    b = E.wait_box(iid, {"up"}, 10)
    p = E.hold(iid)
    when = rfc3339(time.time() + 120)
    st, _ = http("POST", f"{E.base}/_localcloud/box/{iid}/spot-notice", {"action": "terminate", "time": when})
    check(st == 200, "spot-notice route")
    E.wait_log(iid, f"spot-notice action=terminate time={when}", 5)
    b = E.wait_log(iid, "spot interruption", 3, key="wall")
    time.sleep(2.5 * INTERVAL)
    b = E.box(iid)
    n = sum("spot interruption" in x for x in b["wall"])
    check(n == 1, f"spot notice walled {n} times")
    check(E.ec2_state("us-east-1", iid) == "running", "spot notice must not power off")
    with open(os.path.join(b["dir"], "sshd.pid")) as f:
        sshd = [int(f.read())]
    t0 = time.monotonic()
    E.ec2["us-east-1"].terminate_instances(InstanceIds=[iid])
    E.wait_box(iid, {"gone"}, 2)
    took = time.monotonic() - t0
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        p.kill()
        raise Failure("ssh -N survived TerminateInstances")
    time.sleep(0.5)
    check(not any(pid_alive(x) for x in sshd), "sshd still alive after TerminateInstances")
    check(b["poweroff_reason"] is None, "external termination has no poweroff reason")
    return f"spot notice walled once (gz+b64/b64 write_files); TerminateInstances -> box gone in {took:.2f}s, sessions cut"


def scenario_spot_reclaim(E):
    iid = E.launch(region="eu-west-1")
    E.wait_box(iid, {"up"}, 10)
    p = E.hold(iid)
    st, body = http("POST", f"{E.base}/_localcloud/box/{iid}/spot-notice", {"terminate_in": 1.5})
    check(st == 200 and body["spot_notice"]["action"] == "terminate", f"spot-notice: {st} {body}")
    E.wait_log(iid, "spot interruption", 4, key="wall")
    E.wait_box(iid, {"gone"}, 5)
    check(E.ec2_state("eu-west-1", iid) == "terminated", "spot reclaim did not terminate")
    p.wait(5)
    return "spot notice with terminate_in: walled, then reclaimed (terminated, box gone)"


def _http_get(host, port, path):
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.decode(errors="replace")


def scenario_private_service(E):
    """The box's private service: 403 to us, the token through OpenSSH's own -L."""
    iid = E.launch()
    E.wait_box(iid, {"up"}, 10)
    listed = E.run_ssh(iid, "cat", '"$HOME/private-service"')
    check(listed.returncode == 0, f"reading the service's address on the box: {listed.stderr!r}")
    host, _, port = listed.stdout.splitlines()[0].rpartition(":")
    token = E.box(iid)["private_service_token"]
    check(bool(token), "the control API shows the token")
    direct = _http_get(host, int(port), "/direct")
    check(direct.startswith("HTTP/1.0 403") and token not in direct, f"direct: {direct!r}")
    local = free_port()
    tunnel = subprocess.Popen(E.ssh(iid, "-N", extra=("-o", "ExitOnForwardFailure=yes",
                                                       "-L", f"{local}:{host}:{port}")),
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        end, answer = time.monotonic() + 10, ""
        while time.monotonic() < end and "token=" not in answer:
            try:
                answer = _http_get("127.0.0.1", local, "/tunnel")
            except OSError:
                time.sleep(0.1)
        check(f"token={token}\n" in answer and "path=/tunnel" in answer, f"through ssh -L: {answer!r}")
    finally:
        tunnel.terminate()
        tunnel.wait(5)
    check(E.box(iid)["resume_port"] is None, "no resume relay without its unit in the user-data")
    return f"403 directly, token through ssh -L ({host}:{port})"


def _relay_hello(port):
    """A new EAR1 stream through a box's resume relay: (WELCOME, the first stream bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"EAR1" + os.urandom(16) + bytes(8))
        data = b""
        while len(data) < 13 + 5 + 8:  # WELCOME, then a DATA frame with sshd's banner
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data[:13], data[18:]


def scenario_resume_relay(E):
    """A box whose user-data carries the resume relay runs it in front of its sshd; it restarts
    when it exits (Restart=always) and dies with the box."""
    iid = E.launch(resume=True, encoded=True)
    b = E.wait_box(iid, {"up"}, 10)
    port = b["resume_port"]
    check(port, f"resume_port in the summary of a box with the relay: {b}")
    welcome, stream = _relay_hello(port)
    check(welcome == b"EAR1\0" + bytes(8), f"HELLO for a new token: WELCOME NEW have 0, got {welcome!r}")
    check(stream.startswith(b"SSH-2.0-"), f"the relay's stream is the box's sshd: {stream[:40]!r}")
    b = E.wait_log(iid, " new from ", 5, key="resume_log")
    pid = b["resume_pid"]
    os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + 6
    while time.monotonic() < end and not (E.box(iid)["resume_restarts"] == 1 and E.box(iid)["resume_pid"]):
        time.sleep(0.1)
    b = E.box(iid)
    check(b["resume_restarts"] == 1 and b["resume_pid"] not in (None, pid), f"relay restarted: {b}")
    end = time.monotonic() + 5
    while True:  # the restarted relay binds its port a moment after it started
        try:
            welcome, _ = _relay_hello(b["resume_port"])
            break
        except ConnectionRefusedError:
            check(time.monotonic() < end, "the restarted relay listens within 5 s")
            time.sleep(0.05)
    check(welcome == b"EAR1\0" + bytes(8), f"the restarted relay answers: {welcome!r}")
    E.ec2["us-east-1"].terminate_instances(InstanceIds=[iid])
    E.wait_box(iid, {"gone"}, 5)
    time.sleep(0.2)
    check(not pid_alive(b["resume_pid"]), "the relay died with the box")
    check(E.box(iid)["resume_port"] is None, "no resume_port once the box is gone")
    return f"relay on 127.0.0.1:{port} answers NEW with sshd's banner; restarted after SIGKILL; killed with the box"


SCENARIOS = [scenario_never_connected, scenario_hostkey_idle, scenario_deadline,
             scenario_imds_down, scenario_spot_external, scenario_spot_reclaim, scenario_private_service,
             scenario_resume_relay]


# --------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--harness", choices=["auto", "localcloud", "standin"], default="auto")
    ap.add_argument("--only", action="append", help="run only scenarios whose name contains this")
    args = ap.parse_args()
    t_start = time.monotonic()
    failures = []

    sc = subprocess.run(["shellcheck", "-s", "sh", WATCHDOG], capture_output=True, text=True)
    if sc.returncode != 0:
        failures.append(f"shellcheck:\n{sc.stdout}{sc.stderr}")
    else:
        log(f"shellcheck -s sh watchdog.sh: clean ({os.path.getsize(WATCHDOG)} bytes)")

    leaked_before = set(marked_pids())
    harness = None
    if args.harness in ("auto", "localcloud") and os.path.exists(LOCALCLOUD):
        try:
            harness = LocalcloudHarness()
        except Exception as e:  # noqa: BLE001
            if args.harness == "localcloud":
                raise
            log(f"WARNING: localcloud.py --box-sim unusable ({e}); using the stand-in harness")
    elif args.harness == "localcloud":
        sys.exit("localcloud.py not found")
    if harness is None:
        if args.harness == "auto":
            log("WARNING: testing boxsim with the stand-in harness, not localcloud.py")
        harness = StandInHarness()
    log(f"harness={harness.name} base_url={harness.base_url}")

    work = tempfile.mkdtemp(prefix="boxsim-selftest-")
    results = {}
    try:
        E = Env(harness.base_url, work)
        st, cfg = http("PUT", f"{E.base}/_localcloud/box-config", {"boot_seconds": BOOT_SECONDS})
        if st != 200 or cfg.get("boot_seconds") != BOOT_SECONDS:
            raise Failure(f"box-config: {st} {cfg}")
        todo = [s for s in SCENARIOS if not args.only or any(o in s.__name__ for o in args.only)]

        def run(fn):
            t = time.monotonic()
            try:
                results[fn.__name__] = ("ok", fn(E), time.monotonic() - t)
            except Exception as e:  # noqa: BLE001
                detail = traceback.format_exc() if not isinstance(e, Failure) else str(e)
                results[fn.__name__] = ("FAIL", detail, time.monotonic() - t)

        threads = [threading.Thread(target=run, args=(fn,)) for fn in todo]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for name in [s.__name__ for s in todo]:
            status, msg, took = results[name]
            log(f"{status:4} {name} ({took:.1f}s): {msg}")
            if status != "ok":
                failures.append(f"{name}: {msg}")

        st, listing = http("GET", f"{E.base}/_localcloud/box")
        states = sorted(b["state"] for b in listing["boxes"])
        log(f"boxes: {states}")
        if len(listing["boxes"]) != len(todo):
            failures.append(f"box list has {len(listing['boxes'])} boxes, expected {len(todo)}")
        st, _ = http("POST", f"{E.base}/_localcloud/box-reset")
        st, listing = http("GET", f"{E.base}/_localcloud/box")
        if listing["boxes"]:
            failures.append(f"box-reset left boxes: {listing}")
        time.sleep(0.3)
        leaked = set(marked_pids()) - leaked_before
        if leaked:
            failures.append(f"processes left after box-reset: {sorted(leaked)}")
        # Leave one box running to prove shutdown kills it.
        iid = E.launch()
        E.wait_box(iid, {"up"}, 10)
    except Exception:  # noqa: BLE001
        failures.append(traceback.format_exc())
    finally:
        harness.close()
    time.sleep(0.5)
    leaked = set(marked_pids()) - leaked_before
    if leaked:
        failures.append(f"processes left after shutdown: {sorted(leaked)}")
    else:
        log("no box processes left after shutdown")

    log(f"total {time.monotonic() - t_start:.1f}s")
    if failures:
        print("\nFAILED:\n" + "\n".join(failures), file=sys.stderr)
        print(f"(work dir kept: {work})", file=sys.stderr)
        sys.exit(1)
    shutil.rmtree(work, ignore_errors=True)
    if isinstance(harness, LocalcloudHarness):
        os.unlink(harness.log.name)
    log("boxsim selftest: all passed")


if __name__ == "__main__":
    main()

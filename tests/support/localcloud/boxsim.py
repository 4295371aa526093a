"""boxsim: the "box" side of localcloud.

localcloud (moto in-process) only keeps EC2 *records*. With ``--box-sim`` it calls
``boxsim.attach(cloud)`` and every instance that reaches ``running`` becomes a
simulated box:

* its user-data (``#cloud-config``, as rendered by the CLI) is parsed;
* a real OpenSSH ``sshd`` listens on 127.0.0.1:<free port> (what box-connect relays to)
  and on the instance's public IP (localcloud hands out loopback addresses) at the
  direct SSH port: 22 when it can bind it, else one free port shared by every box
  (``box_ssh_port`` in the READY line and box-config). It uses the host key and
  authorized keys from the user-data (``ssh_keys`` / ``ssh_authorized_keys``);
* the real watchdog script and its env file are taken from ``write_files`` and run
  with ``sh`` the way the systemd unit would run it, talking to a fake IMDSv2, with
  ``EA_SSHD_PIDFILE`` naming this box's ``sshd.pid`` (it counts the sessions under that sshd);
  its power-off POSTs back to localcloud, which terminates the instance in moto;
* the resume relay (``src/userdata/resume.py``, what lets an EICE client resume its SSH byte
  stream over a new tunnel) runs when ``write_files`` carry its unit
  (``ephemeral-admin-resume.service``) and script and ``runcmd`` enables the unit: the unit's
  ExecStart with this interpreter, ``--listen 127.0.0.1:<free port>`` and ``--to 127.0.0.1:<the
  box's sshd port>`` in place of the unit's (its other flags kept), restarted a second after it
  exits (Restart=always), killed with the box; its stderr goes to ``resume.log`` in the box dir.
  The box's sshd sets EA_RESUME_ADDRESS and EA_RESUME_SCRIPT for its sessions, so the client's
  exec of ``resume.py --attach`` (through an outer SSH connection, as on a real box, where the
  relay listens on the box's own 127.0.0.1:2022) reaches this box's relay;
* the host-key rotation (``src/userdata/hostkey.sh``, which the client runs as root over its
  first connection: the box makes its own host key and sshd switches to it): the box's sshd
  sets EA_HOSTKEY_SCRIPT (the box's copy of the script, run with sh: boxes have no sudo, and
  everything of a box runs as this machine's user, standing in for root), EA_SSH_DIR (the box
  dir, where its sshd's HostKey is), EA_SSHD_PIDFILE (reload = SIGHUP to the box's sshd,
  which re-executes itself with the new key; connections already open stay up) and EA_SSH_PORT
  (where the script waits for sshd to offer the new key);
* user-data may be gzip'd, as cloud-init accepts it;
* a ``runcmd`` entry that runs a written file (the CLI's setup runner) runs as cloud-init would,
  with stub ``apt-get``/``dnf``/``yum`` that record package installs (see ``_start_setup``).

Interface expected from ``cloud``::

    cloud.add_route(method, path_prefix, handler)  # handler(environ, body) -> (status, dict)
    cloud.base_url                             # read lazily, when a box boots
    cloud.on_shutdown(fn)
    cloud.terminate_instance(region, instance_id[, reason="shutdown"])
  used when present:
    cloud.moto_lock                            # held while reading moto
    cloud.on_reset(fn)                         # -> boxsim.reset()
    cloud.on_instances_terminated(fn)          # faster than the 100 ms poll
    cloud.ready_extras                         # gets boxsim_imds=<url>, box_ssh_port=<port>

moto must run in the same process: boxes are found by scanning
``moto.ec2.models.ec2_backends`` (every account and region that exists).

Control routes (JSON; registered for GET, POST and PUT under ``/_localcloud/box``,
``/_localcloud/box-config`` and ``/_localcloud/box-reset``; the handler re-reads
``environ["PATH_INFO"]``)::

    GET  /_localcloud/box                      {"boxes": [summary, ...]}
    GET  /_localcloud/box/<iid>                summary + watchdog_log, wall, sshd_log, notes
    POST /_localcloud/box/<iid>/poweroff       what the watchdog calls; terminates in moto
    POST /_localcloud/box/<iid>/spot-notice    {"action": "terminate", "time": "...Z"}
                                               ({} -> terminate, time now+120 s; {"clear": true};
                                               "terminate_in": S -> terminate_instance(reason="spot")
                                               S seconds later)
    POST /_localcloud/box/<iid>/imds           {"available": false}
    GET|PUT /_localcloud/box-config            {"boot_seconds": 2.5, "drop_syns_while_booting": false,
                                               "watchdog": true, "resume_relay": true}  (false: boxes
                                               boot without it, as if its unit failed or the image
                                               had no python3)
                                               (GET adds ssh_port: the direct port).
                                               "sftp": "hostile" boots boxes whose sshd's
                                               ``Subsystem sftp`` is hostile_sftp.py (a server
                                               that lists ``../escape``, setuid modes, escape
                                               sequences: see that file); "internal" (the
                                               default) is OpenSSH's internal-sftp. With
                                               drop_syns_while_booting, a booting box's public
                                               address silently drops SYNs (a full accept queue),
                                               like a real box before its network is up.
                                               "hostkey_rotation": false: boxes booted while it
                                               is off refuse the host-key rotation as a box
                                               without passwordless sudo does.
    POST /_localcloud/box-reset                stop every box, forget them (= boxsim.reset())

summary = {instance_id, region, account_id, state, ssh_port, public_ip, direct, private_ip,
           private_direct, dir, poweroff_reason, imds_url, imds_available, error, resume_port};
           resume_port is the relay's port while it runs, else null; the box's own GET adds
           resume_log (the relay's stderr) and resume_restarts; state is
           booting|up|powered-off|gone; direct is "<public ip>:<port>" while sshd listens there,
           else null; private_direct likewise for a box without a public IP (below)
(or failed, with error, when the user-data cannot make a box).

A box without a public IP (a private subnet) is reached at its private IP, as over a VPN into
its VPC: on Linux as root, boxsim adds that address to ``lo`` while the box lives (``ip addr add
IP/32 dev lo``; removed when the box stops, resets or localcloud exits) and its sshd also listens
there at the direct SSH port. An address that is already local is never taken over.
Private service: every simulated box also runs a small HTTP service that only the box can reach,
standing in for a private database or web console behind it. It listens on a random loopback
address (127.77.x.y) and on [::1], both at ports chosen then; the addresses are handed only to the
box, in ``$HOME/private-service`` (one ``host:port`` a line). It answers a request from one of the
box's own processes (its sshd and their children, e.g. a forwarded connection) with
``token=<secret>`` and the path asked for, and anyone else with 403, so a test that gets the token
went through the box. ``GET /_localcloud/box/<iid>`` shows the token as ``private_service_token``.

Module functions: attach(cloud), reset(), shutdown(), port_target(instance_id, port) (the
(host, port) on this machine of an up box's port 22 = its sshd, else None; for localcloud's EC2
Instance Connect Endpoint relay), ssh_target(instance_id)
(= port_target(instance_id, 22)). Set BOXSIM_KEEP_DIRS=1 to keep the box directories (logs) after
shutdown.

Real-VM mode (``BOXSIM_REAL_VM=1`` or an image directory, or box-config ``{"real_vm": true}``):
an instance launched while it is on boots a real Debian cloud VM under QEMU
(``tests/support/realbox/``) with the instance's real user-data, instead of the sshd + watchdog
stand-ins. Real cloud-init, systemd, sshd and watchdog; the fake IMDSv2 is its metadata service
(meta-data, user-data, identity document, tags); the box's public IP at the direct SSH port and
127.0.0.1:<ssh_port> are QEMU port forwards to the guest's port 22; the guest's own poweroff ends
QEMU (-no-reboot), which terminates the instance in moto; terminating the instance stops QEMU.
box-config ``vm_kernel_args`` (e.g. ``systemd.mask=ephemeral-admin-watchdog.service``) is appended
to the kernel command line of VMs launched while it is set. The summary of a VM box adds
``vm: true``, ``accel``, ``vm_started_at`` (Unix time) and ``boot`` (seconds from QEMU start:
``sshd``, the first SSH banner; ``poweroff``, QEMU's exit);
its ``watchdog_log`` is the watchdog's lines from the serial console (journald forwards there),
and ``poweroff_reason`` comes from the watchdog's last ``poweroff reason=`` line, else
``cap-fallback`` (the user-data's boot-time timer fired) or ``guest-poweroff``.
"""

from __future__ import annotations

import atexit
import base64
import datetime as _dt
import gzip
import json
import os
import queue
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "realbox"))
import realbox  # noqa: E402

SSHD = os.environ.get("BOXSIM_SSHD", "/usr/sbin/sshd")
POLL_SECONDS = 0.025  # how soon a new instance "boots" (kept small: it adds to measured launch times)
MARK = "EA_BOXSIM_BOX"  # set in the env of every process of a box (and its SSH sessions)
DEFAULT_UNIT = "/etc/systemd/system/ephemeral-admin-watchdog.service"
DEFAULT_SCRIPT = "/usr/local/sbin/ephemeral-admin-watchdog"
DEFAULT_ENVFILE = "/etc/ephemeral-admin/watchdog.env"
RESUME_UNIT = "/etc/systemd/system/ephemeral-admin-resume.service"
RESUME_SCRIPT = "/usr/local/lib/ephemeral-admin/resume.py"
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GONE_STATES = {"shutting-down", "terminated", "stopping", "stopped"}
WATCHDOG_MARK = "ephemeral-admin-watchdog: "
VM_BOOT_LIMIT = float(os.environ.get("BOXSIM_VM_BOOT_LIMIT", "300"))

# apt-get, dnf and yum on a simulated box's setup PATH: nothing can be installed here.
PACKAGE_STUB = """#!/bin/sh
echo "$(basename "$0") $*" >> __LOG__
for a in "$@"; do
    case "$a" in
        no-such-*) echo "E: Unable to locate package $a" >&2; exit 100 ;;
    esac
done
echo "boxsim: $(basename "$0") $* (recorded in packages.log; nothing installed)"
"""

_SIM: "BoxSim | None" = None


def attach(cloud):
    """Start the simulator against ``cloud``; returns the BoxSim."""
    global _SIM
    if _SIM is not None:
        _SIM.shutdown()
    _SIM = BoxSim(cloud)
    _SIM.start()
    return _SIM


def reset():
    """Stop and forget every box (localcloud's own reset should call this)."""
    if _SIM is not None:
        _SIM.reset()


def shutdown():
    if _SIM is not None:
        _SIM.shutdown()


def port_target(instance_id, port):
    """(host, port) on this machine of what listens at ``port`` on a box that is up (what a
    connection to the instance's port from inside its VPC reaches): 22 its sshd; else None (the
    resume relay listens on the box's own loopback, out of the VPC's reach)."""
    sim = _SIM
    if sim is None:
        return None
    with sim.lock:
        box = sim.boxes.get(instance_id)
    if box is None or box.state != "up":
        return None
    if port == 22 and box.ssh_port:
        return ("127.0.0.1", box.ssh_port)
    return None


def ssh_target(instance_id):
    """(host, port) where the sshd of a box that is up listens on this machine, else None."""
    return port_target(instance_id, 22)


# --------------------------------------------------------------------------- helpers


def _now_iso(offset=0.0):
    t = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(seconds=offset)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _direct_port():
    """The port every box's sshd also listens on at the box's own (loopback) public IP: 22, as
    on a real box, when this process may bind it and nothing listens on *:22; else a free port
    (a successful bind on 127.0.0.1 means no wildcard listener has it), which the CLI then
    dials through EPHEMERAL_ADMIN_SSH_PORT."""
    override = os.environ.get("BOXSIM_SSH_PORT")
    if override:
        return int(override)
    try:
        with socket.socket() as s:
            s.bind(("127.15.255.254", 22))
        return 22
    except OSError:
        return _free_port()


class _SynBlackhole:
    """A listener with a full accept queue (backlog 0, one queued connection): the kernel
    drops every further SYN to the address, so a client's connect hangs and resends."""

    def __init__(self, addr):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(addr)
        self.listener.listen(0)
        self.queued = socket.create_connection(addr, timeout=2)

    def close(self):
        for s in (self.queued, self.listener):
            try:
                s.close()
            except OSError:
                pass


def _is_local(ip):
    """Is ``ip`` already an address of this machine (a bind to it succeeds)?"""
    try:
        with socket.socket() as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False


def _safe_attr(obj, name):
    try:
        return getattr(obj, name)
    except Exception:  # noqa: BLE001  (a moto property that raises on a half-made instance)
        return None


def _decode_user_data(ud):
    if ud is None:
        return b""
    if isinstance(ud, (list, tuple)):  # older moto kept a list
        ud = ud[0] if ud else ""
    if isinstance(ud, bytes):
        raw = ud
    elif isinstance(ud, str):
        try:
            raw = base64.b64decode(ud, validate=True)
        except Exception:
            raw = ud.encode()
    else:  # moto's Base64EncodedString
        raw = base64.b64decode(str(ud))
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw


def _file_content(entry):
    content = entry.get("content", "")
    enc = str(entry.get("encoding", "") or "").lower()
    data = content if isinstance(content, bytes) else str(content).encode()
    if enc in ("b64", "base64"):
        data = base64.b64decode(data)
    elif enc in ("gz+b64", "gzip+base64", "gz+base64", "gzip+b64"):
        data = gzip.decompress(base64.b64decode(data))
    elif enc in ("gz", "gzip"):
        data = gzip.decompress(data)
    return data


def _parse_env_file(text):
    """systemd EnvironmentFile= semantics, simplified: KEY=VALUE, # comments, quotes."""
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, val = line.partition("=")
        if not sep:
            continue
        val = val.strip()
        if len(val) >= 2 and val[0] == val[-1] and val[0] in "'\"":
            val = val[1:-1]
        env[key.strip()] = val
    return env


def _proc_table():
    """{pid: ppid} for every process."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            table[int(name)] = int(stat.rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    return table


def _descendants(roots, table=None):
    table = _proc_table() if table is None else table
    found, todo = set(), [r for r in roots if r]
    while todo:
        pid = todo.pop()
        for child, parent in table.items():
            if parent == pid and child not in found:
                found.add(child)
                todo.append(child)
    return found


def _marked(iid, table):
    needle = f"{MARK}={iid}\0".encode()
    pids = set()
    for pid in table:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read() + b"\0":
                    pids.add(pid)
        except OSError:
            pass
    return pids


def _kill(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


class _Spawner:
    """Starts children from one long-lived thread: PR_SET_PDEATHSIG (via setpriv)
    fires when the *thread* that forked dies, so this keeps children alive exactly
    as long as localcloud and kills them if localcloud is SIGKILLed."""

    def __init__(self):
        self.q = queue.Queue()
        self.closed = False
        self.prefix = []
        setpriv = shutil.which("setpriv")
        if setpriv and subprocess.run([setpriv, "--pdeathsig", "KILL", "true"],
                                      capture_output=True).returncode == 0:
            self.prefix = [setpriv, "--pdeathsig", "KILL", "--"]
        self.thread = threading.Thread(target=self._run, name="boxsim-spawner", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            args, kwargs, box = item
            try:
                box.put(("ok", subprocess.Popen(self.prefix + args, **kwargs)))
            except Exception as e:  # noqa: BLE001
                box.put(("err", e))

    def popen(self, args, **kwargs):
        if self.closed:
            raise RuntimeError("boxsim is shutting down")
        reply = queue.Queue(1)
        self.q.put((args, kwargs, reply))
        try:
            kind, value = reply.get(timeout=30)
        except queue.Empty:
            raise RuntimeError("boxsim spawner did not answer") from None
        if kind == "err":
            raise value
        return value

    def stop(self):
        self.closed = True
        self.q.put(None)


WALL_SCRIPT = r'''#!__PYTHON__
# boxsim's stand-in for wall(1): $EA_WALL_CMD "message" (or the message on stdin).
import os, sys, time
D = __DIR__
msg = " ".join(sys.argv[1:]) if len(sys.argv) > 1 else sys.stdin.read()
ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
with open(os.path.join(D, "wall.log"), "a") as f:
    for line in msg.rstrip("\n").splitlines() or [""]:
        f.write(ts + " " + line + "\n")
table = {}
for p in os.listdir("/proc"):
    try:
        table[int(p)] = int(open("/proc/%s/stat" % p, "rb").read().rsplit(b")", 1)[1].split()[1])
    except Exception:
        pass
try:
    roots = {int(open(os.path.join(D, "sshd.pid")).read().split()[0])}
except Exception:
    roots = set()
pids, todo = set(), list(roots)
while todo:
    pid = todo.pop()
    for c, pp in table.items():
        if pp == pid and c not in pids:
            pids.add(c)
            todo.append(c)
ttys = set()
for pid in pids:
    try:
        for fd in os.listdir("/proc/%d/fd" % pid):
            t = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            if t.startswith("/dev/pts/"):
                ttys.add(t)
    except OSError:
        pass
text = ("\r\nBroadcast message from root (boxsim) (%s):\r\n\r\n%s\r\n\r\n"
        % (ts, msg.rstrip("\n").replace("\n", "\r\n"))).encode()
for t in ttys:
    try:
        fd = os.open(t, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            os.write(fd, text)
        finally:
            os.close(fd)
    except OSError:
        pass
'''


# --------------------------------------------------------------------------- boxes


class Box:
    def __init__(self, iid, region, account):
        self.iid, self.region, self.account = iid, region, account
        self.state = "booting"
        self.dir = None
        self.ssh_port = None
        self.public_ip = None
        self.direct = None
        self.private_ip = None
        self.private_direct = None  # "<private ip>:<port>" while sshd listens there, else None
        self.private_alias = None  # the private IP boxsim added to lo (removed when the box stops)
        self.sshd = None
        self.watchdog = None
        self.setup = None  # the setup runner cloud-init's runcmd would start
        self.watchdog_cmd = None
        self.watchdog_env = None
        self.watchdog_restarts = 0
        self.watchdog_exited_at = None
        self.resume = None  # the resume relay process (Popen)
        self.resume_cmd = None
        self.resume_port = None
        self.resume_restarts = 0
        self.resume_exited_at = None
        self.poweroff_reason = None
        self.error = None
        self.notes = []
        self.imds_available = True
        self.spot_notice = None
        self.tokens = {}
        self.stopped = False
        self.lock = threading.RLock()
        self.wake = threading.Event()
        self.real_vm = None  # image directory when this box is a QEMU VM
        self.kernel_args = ""
        self.vm = None
        self.boot_times = {}
        self.vm_started_at = None  # Unix time QEMU was started
        self.meta = {}  # instance facts served by the IMDS
        self.user_data = b""
        self.service = None  # the _PrivateService only this box reaches

    def note(self, msg):
        self.notes.append(msg)
        if self.dir:
            try:
                with open(os.path.join(self.dir, "boxsim.log"), "a") as f:
                    f.write(f"{_now_iso()} {msg}\n")
            except OSError:
                pass

    def resume_running(self):
        return self.resume is not None and self.resume.poll() is None and not self.stopped

    def read_lines(self, name, tail=None):
        if not self.dir:
            return []
        try:
            with open(os.path.join(self.dir, name), errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return []
        return lines[-tail:] if tail else lines

    def summary(self, imds_base):
        return {
            "instance_id": self.iid,
            "region": self.region,
            "account_id": self.account,
            "state": self.state,
            "ssh_port": self.ssh_port,
            "public_ip": self.public_ip,
            "direct": self.direct,
            "private_ip": self.private_ip,
            "private_direct": self.private_direct,
            "dir": self.dir,
            "poweroff_reason": self.poweroff_reason,
            "imds_url": f"{imds_base}/{self.iid}",
            "imds_available": self.imds_available,
            "error": self.error,
            "vm": self.real_vm is not None,
            "accel": self.vm.accel if self.vm else None,
            "boot": dict(self.boot_times),
            "vm_started_at": self.vm_started_at,
            "resume_port": self.resume_port if self.resume_running() else None,
        }

    def console_lines(self):
        return self.vm.console_text().splitlines() if self.vm else []

    def watchdog_lines(self):
        """A VM's watchdog log: its lines on the serial console, from the marker on."""
        return [line[line.index(WATCHDOG_MARK):] for line in self.console_lines() if WATCHDOG_MARK in line]


class BoxSim:
    def __init__(self, cloud):
        self.cloud = cloud
        self.lock = threading.RLock()
        self.boxes: dict[str, Box] = {}
        self.ignored: set[str] = set()
        self.boot_seconds = 0.0
        self.drop_syns_while_booting = False
        # False: boxes boot without their watchdog (as if its unit failed), so only the layers
        # outside the box can end them.
        self.watchdog = True
        # False: boxes boot without their resume relay (nothing answers on port 2022).
        self.resume_relay = True
        # "hostile": boxes boot with hostile_sftp.py as their SFTP server.
        self.sftp = "internal"
        # False: boxes refuse the host-key rotation (a custom image without passwordless sudo).
        self.hostkey_rotation = True
        self.real_vm = None
        self.vm_kernel_args = ""
        if os.environ.get("BOXSIM_REAL_VM"):
            self._set_real_vm(True)
        self.direct_port = _direct_port()
        self.root = tempfile.mkdtemp(prefix="localcloud-boxsim-")
        self.spawner = _Spawner()
        self.stop_event = threading.Event()
        self.imds = None
        self.poller = None
        self._shut = False
        self.moto_lock = getattr(cloud, "moto_lock", None) or threading.RLock()

    # ---- lifecycle

    def start(self):
        try:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        except OSError:
            pass  # not root: sshd then runs unprivileged, which is fine
        self.imds = _QuietServer(("127.0.0.1", 0), _ImdsHandler)
        self.imds.daemon_threads = True
        self.imds.sim = self
        threading.Thread(target=self.imds.serve_forever, name="boxsim-imds", daemon=True).start()
        self.imds_base = f"http://127.0.0.1:{self.imds.server_address[1]}"
        for method in ("GET", "POST", "PUT"):
            for prefix in ("/_localcloud/box-config", "/_localcloud/box-reset", "/_localcloud/box"):
                self.cloud.add_route(method, prefix, self._route_for(prefix))
        self.cloud.on_shutdown(self.shutdown)
        if hasattr(self.cloud, "on_reset"):
            self.cloud.on_reset(self.reset)
        if hasattr(self.cloud, "on_instances_terminated"):
            self.cloud.on_instances_terminated(self._on_terminated)
        extras = getattr(self.cloud, "ready_extras", None)
        if isinstance(extras, dict):
            extras["boxsim_imds"] = self.imds_base
            extras["box_ssh_port"] = str(self.direct_port)
        atexit.register(self.shutdown)
        self.poller = threading.Thread(target=self._poll_loop, name="boxsim-poller", daemon=True)
        self.poller.start()

    def reset(self):
        current = [i[2] for i in self._instances()]  # (lock order: moto, then ours)
        with self.lock:
            boxes = list(self.boxes.values())
            self.ignored.update(self.boxes)
            self.ignored.update(current)
            self.boxes.clear()
            self.boot_seconds = 0.0
            self.drop_syns_while_booting = False
            self.watchdog = True
            self.resume_relay = True
            self.sftp = "internal"
            self.hostkey_rotation = True
        for box in boxes:
            self._stop_box(box, None)

    def shutdown(self):
        with self.lock:
            if self._shut:
                return
            self._shut = True
        self.stop_event.set()
        self.reset()
        if self.imds:
            self.imds.shutdown()
            self.imds.server_close()
        self.spawner.stop()
        if not os.environ.get("BOXSIM_KEEP_DIRS"):
            shutil.rmtree(self.root, ignore_errors=True)

    def _set_real_vm(self, on):
        if not on:
            self.real_vm = None
            return
        image = os.environ.get("BOXSIM_REAL_VM", "")
        self.real_vm = image if os.path.isdir(image) else realbox.build_image()

    # ---- moto scanning

    def _backends(self):
        from moto.ec2.models import ec2_backends

        for account, per_account in list(dict.items(ec2_backends)):
            for region, backend in list(dict.items(per_account)):
                yield account, region, backend

    def _backend(self, account, region):
        from moto.ec2.models import ec2_backends

        per_account = dict.get(ec2_backends, account)
        return dict.get(per_account, region) if per_account is not None else None

    def _instances(self):
        """(account, region, instance_id, instance) for every instance in moto."""
        out = []
        with self.moto_lock:
            for account, region, backend in self._backends():
                try:
                    for inst in backend.all_instances():
                        out.append((account, region, inst.id, inst, inst.state))
                except Exception:  # noqa: BLE001  (moto mutating under us: next tick)
                    continue
        return out

    def _poll_loop(self):
        while not self.stop_event.wait(POLL_SECONDS):
            try:
                self._poll_once()
            except Exception as e:  # noqa: BLE001
                print(f"boxsim: poll error: {e!r}", file=sys.stderr)

    def _poll_once(self):
        present = {}
        for account, region, iid, inst, state in self._instances():
            present[iid] = state
            with self.lock:
                known = iid in self.boxes or iid in self.ignored
                if not known and state == "running" and not self._shut:
                    box = Box(iid, region, account)
                    box.real_vm, box.kernel_args = self.real_vm, self.vm_kernel_args
                    self.boxes[iid] = box
                    threading.Thread(target=self._boot, args=(box, inst),
                                     name=f"boxsim-boot-{iid}", daemon=True).start()
        with self.lock:
            boxes = list(self.boxes.values())
        for box in boxes:
            if box.stopped:
                continue
            state = present.get(box.iid)
            if state is None or state in GONE_STATES:
                self._stop_box(box, "gone")
            else:
                self._check_watchdog(box)
                self._check_resume(box)

    def _on_terminated(self, region, instance_ids):
        for iid in instance_ids:
            with self.lock:
                box = self.boxes.get(iid)
            # a powered-off box is stopped by _poweroff once its reply is out
            if box is not None and box.state != "powered-off":
                self._stop_box(box, "gone")

    # ---- boot

    def _boot(self, box, inst):
        hole = None
        try:
            with self.moto_lock:
                ud = getattr(inst, "user_data", None)
                public_ip = _safe_attr(inst, "public_ip")
                private_ip = _safe_attr(inst, "private_ip")
                box.meta = _instance_meta(inst)
            if not public_ip and private_ip:
                self._route_private(box, str(private_ip))
            if public_ip and str(public_ip).startswith("127."):
                box.public_ip = str(public_ip)
                if self.drop_syns_while_booting and self.boot_seconds > 0:
                    try:
                        hole = _SynBlackhole((box.public_ip, self.direct_port))
                    except OSError as e:
                        box.note(f"cannot drop SYNs on {box.public_ip}:{self.direct_port}: {e}")
            if self.boot_seconds > 0 and box.wake.wait(self.boot_seconds):
                return  # stopped while booting
            if hole is not None:
                hole.close()  # "the network is up": refused until sshd listens
            box.dir = tempfile.mkdtemp(prefix=f"{box.iid}-", dir=self.root)
            raw = _decode_user_data(ud)
            box.user_data = raw
            with open(os.path.join(box.dir, "user-data"), "wb") as f:
                f.write(raw)
            if box.real_vm:
                return self._boot_vm(box)
            cfg = yaml.safe_load(raw.decode()) if raw.strip() else None
            if not isinstance(cfg, dict):
                raise ValueError("user-data is not a #cloud-config mapping")
            files = self._write_files(box, cfg)
            # Before sshd here (runcmd comes later on a real box), so the launch's follower never
            # looks before the runner made its log: on a host with cloud-init of its own, the
            # follower's `cloud-init status` would say done and it would give up.
            self._start_setup(box, cfg, files)
            # The relay's port first: the box's sshd tells the exec'd attach where it is.
            box.resume_port = _free_port()
            self._start_sshd(box, cfg)
            self._start_resume(box, cfg, files)
            box.service = _PrivateService.start(box)
            self._start_watchdog(box, cfg, files)
            with box.lock:
                if not box.stopped:
                    box.state = "up"
                    box.note(f"up ssh_port={box.ssh_port} direct={box.direct}")
        except Exception as e:  # noqa: BLE001
            with box.lock:
                if not box.stopped:
                    box.state, box.error = "failed", str(e)
            box.note(f"boot failed: {e}")
            self._stop_box(box, None)
        finally:
            if hole is not None:
                hole.close()

    def _boot_vm(self, box):
        """Real-VM mode: QEMU boots the image with this instance's user-data from the IMDS."""
        box.ssh_port = realbox.free_port()
        fwds = [("127.0.0.1", box.ssh_port)]
        if box.public_ip:
            fwds.append((box.public_ip, self.direct_port))
        elif box.private_alias:
            fwds.append((box.private_alias, self.direct_port))
        imds_port = self.imds.server_address[1]
        vm = realbox.Vm(box.real_vm, box.dir, fwds, ("127.0.0.1", imds_port, box.iid),
                        kernel_args=box.kernel_args, popen=self.spawner.popen)
        with box.lock:
            if box.stopped:
                return
            box.vm = vm.start()
            box.vm_started_at = time.time()
        box.note(f"vm started accel={vm.accel} pid={vm.proc.pid} kernel_args={box.kernel_args!r}")
        threading.Thread(target=self._watch_vm, args=(box,), name=f"boxsim-vm-{box.iid}", daemon=True).start()
        took = realbox.wait_ssh("127.0.0.1", box.ssh_port, vm.proc, VM_BOOT_LIMIT)
        if took is None:
            if box.stopped or vm.proc.poll() is not None:
                return  # stopped, or powered off while booting: _watch_vm says which
            raise RuntimeError(f"the VM's sshd did not answer within {VM_BOOT_LIMIT:.0f} s")
        with box.lock:
            box.boot_times["sshd"] = round(took, 2)
            if not box.stopped:
                box.state = "up"
                box.direct = f"{box.public_ip}:{self.direct_port}" if box.public_ip else None
                if box.private_alias:
                    box.private_direct = f"{box.private_alias}:{self.direct_port}"
                box.note(f"up ssh_port={box.ssh_port} direct={box.direct} sshd_after={took:.1f}s")

    def _watch_vm(self, box):
        """QEMU exiting on its own is the guest powering off: terminate the instance."""
        code = box.vm.proc.wait()
        if box.stopped:
            return
        lines = box.watchdog_lines()
        reason = next((ln.split("poweroff reason=", 1)[1].split()[0] for ln in reversed(lines)
                       if "poweroff reason=" in ln), None)
        if reason is None:
            text = box.vm.console_text()
            reason = "cap-fallback" if "Started ephemeral-admin-cap.service" in text else "guest-poweroff"
        box.boot_times["poweroff"] = round(time.monotonic() - box.vm.started_at, 2)
        box.note(f"qemu exited rc={code}: guest powered off")
        with box.lock:
            if box.state in ("booting", "up"):
                box.state = "powered-off"
                box.poweroff_reason = reason
        box.note(f"poweroff reason={reason}")
        try:
            self.cloud.terminate_instance(box.region, box.iid, reason="shutdown")
        except Exception as e:  # noqa: BLE001
            box.note(f"terminate_instance failed: {e!r}")
        self._stop_box(box, "powered-off")

    def _write_files(self, box, cfg):
        files = {}
        for entry in cfg.get("write_files") or []:
            path = str(entry.get("path", ""))
            if not path:
                continue
            data = _file_content(entry)
            files[path] = data
            dest = os.path.join(box.dir, "files", path.lstrip("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(data)
            perms = entry.get("permissions")
            if perms is not None:
                os.chmod(dest, int(str(perms), 8) & 0o7777)
        return files

    def _start_sshd(self, box, cfg):
        d = box.dir
        keys = cfg.get("ssh_keys") or {}
        host_key = keys.get("ed25519_private")
        if not host_key:
            raise ValueError("user-data has no ssh_keys.ed25519_private")
        authorized = cfg.get("ssh_authorized_keys") or []
        if not authorized:
            raise ValueError("user-data has no ssh_authorized_keys")
        key_path = os.path.join(d, "ssh_host_ed25519_key")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(host_key if host_key.endswith("\n") else host_key + "\n")
        if keys.get("ed25519_public"):
            with open(key_path + ".pub", "w") as f:
                f.write(keys["ed25519_public"].strip() + "\n")
        with open(os.path.join(d, "authorized_keys"), "w") as f:
            f.write("".join(str(k).strip() + "\n" for k in authorized))
        if not self.hostkey_rotation:
            # What the client's `sudo -n` gets on an image without passwordless sudo.
            with open(os.path.join(d, "refused"), "w") as f:
                f.write('echo "sudo: a password is required" >&2\nexit 1\n')

        last_err = "sshd did not start"
        for _attempt in range(3):
            port = _free_port()
            conf = os.path.join(d, "sshd_config")
            direct = f"{box.public_ip}:{self.direct_port}" if box.public_ip else None
            private = f"{box.private_alias}:{self.direct_port}" if box.private_alias else None
            with open(conf, "w") as f:
                f.write(_sshd_config(d, port, box.iid, direct or private, box.resume_port, self.sftp,
                                     self.hostkey_rotation))
            # The box's user starts with an empty home, like on a fresh instance: this machine's
            # own ~/.bashrc (pyenv init and its rehash lock) has no business in a box's login.
            os.makedirs(os.path.join(d, "home"), mode=0o700, exist_ok=True)
            log = open(os.path.join(d, "sshd.log"), "ab")
            env = dict(os.environ, **{MARK: box.iid})
            with box.lock:
                if box.stopped:
                    log.close()
                    raise RuntimeError("stopped while booting")
                box.sshd = self.spawner.popen(
                    [SSHD, "-D", "-e", "-f", conf], stdin=subprocess.DEVNULL,
                    stdout=log, stderr=log, env=env, start_new_session=True)
            log.close()
            with open(os.path.join(d, "sshd.pid"), "w") as f:
                f.write(f"{box.sshd.pid}\n")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if box.stopped:
                    raise RuntimeError("stopped while booting")
                if box.sshd.poll() is not None:
                    break
                log_text = "\n".join(box.read_lines("sshd.log"))
                if f"Server listening on 127.0.0.1 port {port}" in log_text:
                    # sshd binds in ListenAddress order and carries on past a failed bind.
                    box.ssh_port = port
                    if direct and f"Server listening on {box.public_ip} port {self.direct_port}" in log_text:
                        box.direct = direct
                    elif direct:
                        box.note(f"sshd could not listen on {direct}: only box-connect reaches this box")
                    if private and f"Server listening on {box.private_alias} port {self.direct_port}" in log_text:
                        box.private_direct = private
                    elif private:
                        box.note(f"sshd could not listen on {private}: only box-connect reaches this box")
                    return
                time.sleep(0.02)
            last_err = "sshd failed: " + " | ".join(box.read_lines("sshd.log", tail=5))
            self._kill_procs(box)
        raise RuntimeError(last_err)

    def _start_watchdog(self, box, cfg, files):
        """Do what cloud-init + systemd would: the unit from write_files, enabled by
        runcmd, runs ExecStart with EnvironmentFile."""
        if not self.watchdog:
            box.note("no watchdog: box-config watchdog=false")
            return
        runcmd = json.dumps(cfg.get("runcmd") or [])
        unit = files.get(DEFAULT_UNIT)
        if unit is None or "ephemeral-admin-watchdog" not in runcmd:
            box.note("no watchdog: unit not in write_files or not enabled by runcmd")
            return
        unit_text = unit.decode(errors="replace")
        exec_start, env_path = None, DEFAULT_ENVFILE
        for line in unit_text.splitlines():
            k, _, v = line.strip().partition("=")
            if k.strip() == "ExecStart":
                exec_start = shlex.split(v.strip().lstrip("-@+!"))
            elif k.strip() == "EnvironmentFile":
                env_path = v.strip().lstrip("-")
        script_path = next((a for a in (exec_start or []) if a in files), DEFAULT_SCRIPT)
        if script_path not in files:
            raise ValueError(f"watchdog script {script_path} not in write_files")
        script = os.path.join(box.dir, "watchdog.sh")
        with open(script, "wb") as f:
            f.write(files[script_path])
        wall = os.path.join(box.dir, "wall.py")
        with open(wall, "w") as f:
            f.write(WALL_SCRIPT.replace("__PYTHON__", sys.executable).replace("__DIR__", repr(box.dir)))
        os.chmod(wall, 0o755)
        base = str(self.cloud.base_url).rstrip("/")
        env = {"PATH": SYSTEMD_PATH + ":" + os.environ.get("PATH", ""), "LANG": "C.UTF-8", MARK: box.iid}
        env.update(_parse_env_file(files.get(env_path, b"").decode(errors="replace")))
        env.update({
            "EA_IMDS_URL": f"{self.imds_base}/{box.iid}",
            # Many boxes share this machine: only sessions under this box's own sshd count.
            "EA_SSHD_PIDFILE": os.path.join(box.dir, "sshd.pid"),
            "EA_POWEROFF_CMD": "curl -fsS -o /dev/null -m 10 -X POST -H 'Content-Type: application/json' -d '{}' "
                               + shlex.quote(f"{base}/_localcloud/box/{box.iid}/poweroff"),
            "EA_WALL_CMD": shlex.quote(sys.executable) + " " + shlex.quote(wall),
            "EA_STATE_DIR": os.path.join(box.dir, "state"),
        })
        box.watchdog_cmd, box.watchdog_env = ["sh", script], env
        self._spawn_watchdog(box)

    def _start_setup(self, box, cfg, files):
        """What cloud-init's runcmd would do with a command that runs a file of write_files
        (the CLI's setup runner): run it, as a box process, with every argument that names a
        written file pointing at the box's copy. Packages cannot be installed here: apt-get,
        dnf and yum on the runner's PATH are stubs that record the call in ``packages.log``
        and say so, and refuse package names starting with ``no-such-`` as apt does an
        unknown package (exit 100). The runner logs to the box's ``setup/`` (EA_SETUP_DIR,
        also set in the box's SSH sessions)."""
        for entry in cfg.get("runcmd") or []:
            argv = entry if isinstance(entry, list) else None
            if not argv or str(argv[0]) not in files or "ephemeral-admin-setup" not in str(argv[0]):
                continue
            local = [os.path.join(box.dir, "files", str(a).lstrip("/")) if str(a) in files else str(a)
                     for a in argv]
            stubs = os.path.join(box.dir, "sim-bin")
            os.makedirs(stubs, exist_ok=True)
            os.makedirs(os.path.join(box.dir, "home"), mode=0o700, exist_ok=True)
            for tool in ("apt-get", "dnf", "yum"):
                path = os.path.join(stubs, tool)
                with open(path, "w") as f:
                    f.write(PACKAGE_STUB.replace("__LOG__", shlex.quote(os.path.join(box.dir, "packages.log"))))
                os.chmod(path, 0o755)
            env = {"PATH": stubs + ":" + SYSTEMD_PATH + ":" + os.environ.get("PATH", ""), "LANG": "C.UTF-8",
                   "HOME": os.path.join(box.dir, "home"), "EA_SETUP_DIR": os.path.join(box.dir, "setup"),
                   MARK: box.iid}
            with box.lock:
                if box.stopped:
                    return
                with open(os.path.join(box.dir, "runcmd.log"), "ab") as log:
                    box.setup = self.spawner.popen(
                        ["sh"] + local, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                        env=env, cwd=box.dir, start_new_session=True)
            box.note(f"setup runner started: {' '.join(shlex.quote(str(a)) for a in argv)}")

    def _start_resume(self, box, cfg, files):
        """The resume relay, as systemd would run ephemeral-admin-resume.service once runcmd
        enabled it: its ExecStart with --listen/--to pointing at this machine's loopback."""
        unit = files.get(RESUME_UNIT)
        if unit is None or "ephemeral-admin-resume.service" not in json.dumps(cfg.get("runcmd") or []):
            if unit is not None:
                box.note("no resume relay: its unit is written but runcmd does not enable it")
            return
        if not self.resume_relay:
            box.note("no resume relay: box-config resume_relay=false")
            return
        exec_start = []
        for line in unit.decode(errors="replace").splitlines():
            k, _, v = line.strip().partition("=")
            if k.strip() == "ExecStart":
                exec_start = shlex.split(v.strip().lstrip("-@+!"))
        script_path = next((a for a in exec_start if a in files), RESUME_SCRIPT)
        if script_path not in files:
            raise ValueError(f"resume relay script {script_path} not in write_files")
        script = os.path.join(box.dir, "resume.py")
        with open(script, "wb") as f:
            f.write(files[script_path])
        flags, args = [], exec_start[exec_start.index(script_path) + 1:] if script_path in exec_start else []
        while args:
            a = args.pop(0)
            if a in ("--listen", "--to"):
                args[:1] = []  # and its value
            elif not a.startswith(("--listen=", "--to=")):
                flags.append(a)
        for attempt in range(3):
            # The port sshd announced first; another only if that one was taken meanwhile.
            port = box.resume_port if attempt == 0 and box.resume_port else _free_port()
            box.resume_port = port
            box.resume_cmd = [sys.executable, script, "--listen", f"127.0.0.1:{port}",
                              "--to", f"127.0.0.1:{box.ssh_port}"] + flags
            self._spawn_resume(box)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and box.resume is not None and box.resume.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    box.note(f"resume relay up on 127.0.0.1:{port}: {shlex.join(box.resume_cmd)}")
                    return
                except OSError:
                    time.sleep(0.02)
            if box.stopped:
                return
            self._kill_proc(box.resume)
        raise RuntimeError("resume relay failed: " + " | ".join(box.read_lines("resume.log", tail=5)))

    def _spawn_resume(self, box):
        env = {"PATH": SYSTEMD_PATH + ":" + os.environ.get("PATH", ""), "LANG": "C.UTF-8", MARK: box.iid}
        with box.lock:
            if box.stopped:
                return
            with open(os.path.join(box.dir, "resume.log"), "ab") as log:
                box.resume = self.spawner.popen(
                    box.resume_cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    env=env, cwd=box.dir, start_new_session=True)
            box.resume_exited_at = None

    def _check_resume(self, box):
        """Restart=always, RestartSec=1: rerun a relay that exited (its sessions are lost)."""
        r = box.resume
        if r is None or box.state != "up" or r.poll() is None:
            return
        if box.resume_exited_at is None:
            box.resume_exited_at = time.monotonic()
            box.note(f"resume relay exited rc={r.returncode}; restarting (Restart=always)")
        elif time.monotonic() - box.resume_exited_at >= 1.0:
            box.resume_restarts += 1
            self._spawn_resume(box)

    @staticmethod
    def _kill_proc(p):
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            p.wait()

    def _spawn_watchdog(self, box):
        with box.lock:
            if box.stopped:
                return
            with open(os.path.join(box.dir, "watchdog.log"), "ab") as log:
                box.watchdog = self.spawner.popen(
                    box.watchdog_cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    env=box.watchdog_env, cwd=box.dir, start_new_session=True)
            box.watchdog_exited_at = None

    def _check_watchdog(self, box):
        """Restart=always: rerun a watchdog that exited, after a second."""
        w = box.watchdog
        if w is None or box.state != "up" or w.poll() is None:
            return
        if box.watchdog_exited_at is None:
            box.watchdog_exited_at = time.monotonic()
            box.note(f"watchdog exited rc={w.returncode}; restarting (Restart=always)")
        elif time.monotonic() - box.watchdog_exited_at >= 1.0:
            box.watchdog_restarts += 1
            self._spawn_watchdog(box)

    # ---- stopping

    def _stop_box(self, box, state):
        with box.lock:
            if state and box.state in ("booting", "up"):
                box.state = state
            already = box.stopped
            box.stopped = True
            box.wake.set()
        if not already and state:
            box.note(f"stopped state={box.state}")
        self._kill_procs(box)
        self._unroute_private(box)

    # ---- private addresses (a box without a public IP, reached with connect = "private-ip")

    def _route_private(self, box, ip):
        """Make a box's private IP lead to its sshd, as a VPN into its VPC would: the address is
        added to this machine's loopback interface (Linux, root) for the box's life. Only boxes
        without a public IP get this; one already local (another box's) is not taken over."""
        box.private_ip = ip
        if _is_local(ip):
            box.note(f"private ip {ip} is already an address of this machine: not routed to this box")
            return
        if not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("ip"):
            box.note(f"private ip {ip} not routed: needs Linux, root and iproute2")
            return
        done = subprocess.run(["ip", "addr", "add", f"{ip}/32", "dev", "lo"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            box.note(f"private ip {ip} not routed: ip addr add: {done.stderr.strip()}")
            return
        box.private_alias = ip
        box.note(f"private ip {ip} added to lo")

    def _unroute_private(self, box):
        with box.lock:
            ip, box.private_alias = box.private_alias, None
        if ip:
            subprocess.run(["ip", "addr", "del", f"{ip}/32", "dev", "lo"], capture_output=True)

    def _kill_procs(self, box):
        if box.service is not None:
            box.service.stop()
        if box.vm is not None:
            box.vm.stop()
        procs = [p for p in (box.sshd, box.watchdog, box.setup, box.resume) if p is not None]
        roots = {p.pid for p in procs if p.poll() is None}
        table = _proc_table()
        pids = roots | _descendants(roots, table) | _marked(box.iid, table)
        pids.discard(os.getpid())
        for pid in roots:
            try:
                os.killpg(pid, signal.SIGTERM)
            except OSError:
                pass
        _kill(pids, signal.SIGTERM)
        end = time.monotonic() + 1.0
        while time.monotonic() < end and any(p.poll() is None for p in procs):
            time.sleep(0.02)
        table = _proc_table()
        left = (pids & set(table)) | _marked(box.iid, table)
        left.discard(os.getpid())
        for pid in roots:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        _kill(left, signal.SIGKILL)
        for p in procs:
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass

    # ---- control routes

    def _route_for(self, prefix):
        def handler(environ, body):
            path = environ.get("PATH_INFO") or "/"
            if not path.startswith("/_localcloud/"):  # router stripped the prefix
                path = prefix + path
            try:
                data = json.loads(body) if body and body.strip() else {}
            except ValueError:
                return 400, {"error": "body is not JSON"}
            method = (environ.get("REQUEST_METHOD") or "GET").upper()
            try:
                return self._control(method, path.rstrip("/"), data if isinstance(data, dict) else {})
            except Exception as e:  # noqa: BLE001
                return 500, {"error": repr(e)}

        return handler

    def _control(self, method, path, data):
        if path == "/_localcloud/box" and method == "GET":
            with self.lock:
                boxes = list(self.boxes.values())
            return 200, {"boxes": [b.summary(self.imds_base) for b in boxes]}
        if path == "/_localcloud/box-config":
            if method in ("PUT", "POST") and "boot_seconds" in data:
                self.boot_seconds = max(0.0, float(data["boot_seconds"]))
            if method in ("PUT", "POST") and "drop_syns_while_booting" in data:
                self.drop_syns_while_booting = bool(data["drop_syns_while_booting"])
            if method in ("PUT", "POST") and "real_vm" in data:
                self._set_real_vm(bool(data["real_vm"]))
            if method in ("PUT", "POST") and "vm_kernel_args" in data:
                self.vm_kernel_args = str(data["vm_kernel_args"] or "")
            if method in ("PUT", "POST") and "watchdog" in data:
                self.watchdog = bool(data["watchdog"])
            if method in ("PUT", "POST") and "resume_relay" in data:
                self.resume_relay = bool(data["resume_relay"])
            if method in ("PUT", "POST") and "sftp" in data:
                if data["sftp"] not in ("internal", "hostile"):
                    return 400, {"error": "sftp: internal or hostile"}
                self.sftp = data["sftp"]
            if method in ("PUT", "POST") and "hostkey_rotation" in data:
                self.hostkey_rotation = bool(data["hostkey_rotation"])
            return 200, {"boot_seconds": self.boot_seconds, "ssh_port": self.direct_port,
                         "watchdog": self.watchdog, "resume_relay": self.resume_relay, "sftp": self.sftp,
                         "hostkey_rotation": self.hostkey_rotation,
                         "drop_syns_while_booting": self.drop_syns_while_booting,
                         "real_vm": self.real_vm, "vm_kernel_args": self.vm_kernel_args}
        if path == "/_localcloud/box-reset" and method == "POST":
            self.reset()
            return 200, {"reset": True}
        if not path.startswith("/_localcloud/box/"):
            return 404, {"error": f"no route {method} {path}"}
        iid, _, action = path[len("/_localcloud/box/"):].partition("/")
        with self.lock:
            box = self.boxes.get(iid)
        if box is None:
            return 404, {"error": f"no box for {iid}"}
        if action == "" and method == "GET":
            out = box.summary(self.imds_base)
            out.update({
                "spot_notice": json.loads(box.spot_notice) if box.spot_notice else None,
                "watchdog_pid": box.watchdog.pid if box.watchdog else None,
                "watchdog_restarts": box.watchdog_restarts,
                "watchdog_log": box.watchdog_lines() if box.vm else box.read_lines("watchdog.log"),
                "resume_pid": box.resume.pid if box.resume is not None and box.resume_running() else None,
                "resume_restarts": box.resume_restarts,
                "resume_log": box.read_lines("resume.log", tail=200),
                "wall": box.read_lines("wall.log"),
                "sshd_log": box.read_lines("sshd.log", tail=200),
                "notes": list(box.notes),
                "private_service_token": box.service.token if box.service else None,
                "console": box.console_lines()[-400:] if box.vm else [],
            })
            return 200, out
        if action == "poweroff" and method == "POST":
            return self._poweroff(box, data)
        if action == "spot-notice" and method == "POST":
            if data.get("clear") or ("action" in data and data["action"] is None):
                box.spot_notice = None
            else:
                box.spot_notice = json.dumps({"action": data.get("action") or "terminate",
                                              "time": data.get("time") or _now_iso(120)})
                if data.get("terminate_in") is not None:  # then AWS reclaims the box
                    threading.Timer(float(data["terminate_in"]), self._spot_reclaim, args=(box,)).start()
            box.note(f"spot notice {box.spot_notice}")
            return 200, {"spot_notice": json.loads(box.spot_notice) if box.spot_notice else None}
        if action == "imds" and method == "POST":
            if "available" in data:
                box.imds_available = bool(data["available"])
                box.note(f"imds available={box.imds_available}")
            return 200, {"imds_available": box.imds_available}
        return 404, {"error": f"no route {method} {path}"}

    def _spot_reclaim(self, box):
        if box.stopped:
            return
        box.note("spot: reclaimed")
        try:
            try:
                self.cloud.terminate_instance(box.region, box.iid, reason="spot")
            except TypeError:
                self.cloud.terminate_instance(box.region, box.iid)
        except Exception as e:  # noqa: BLE001
            box.note(f"terminate_instance failed: {e!r}")
        self._stop_box(box, "gone")

    def _poweroff(self, box, data):
        reason = None
        if box.dir:
            try:
                with open(os.path.join(box.dir, "state", "poweroff-reason")) as f:
                    reason = f.read().strip() or None
            except OSError:
                pass
        reason = reason or data.get("reason") or "manual"
        with box.lock:
            if box.state in ("booting", "up"):
                box.state = "powered-off"
                box.poweroff_reason = reason
        box.note(f"poweroff reason={reason}")
        try:
            try:
                self.cloud.terminate_instance(box.region, box.iid, reason="shutdown")
            except TypeError:  # a cloud without the reason parameter
                self.cloud.terminate_instance(box.region, box.iid)
        except Exception as e:  # noqa: BLE001
            box.note(f"terminate_instance failed: {e!r}")
        # Let the reply reach the caller (the watchdog's curl) before killing it.
        threading.Timer(0.2, self._stop_box, args=(box, "powered-off")).start()
        return 200, {"instance_id": box.iid, "state": box.state, "poweroff_reason": box.poweroff_reason}


_SSHD_VERSION = None


def _sshd_version():
    """(major, minor) of SSHD, e.g. (9, 2); (0, 0) if unknown."""
    global _SSHD_VERSION
    if _SSHD_VERSION is None:
        import re

        try:
            out = subprocess.run([SSHD, "-V"], capture_output=True, text=True, timeout=5)
            m = re.search(r"OpenSSH_(\d+)\.(\d+)", out.stderr + out.stdout)
            _SSHD_VERSION = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        except (OSError, subprocess.SubprocessError):
            _SSHD_VERSION = (0, 0)
    return _SSHD_VERSION


def _sshd_config(d, port, iid, direct=None, resume_port=None, sftp="internal", hostkey_rotation=True):
    # The box's home is {d}/home (HOME below): SFTP starts there too, as it would in the login
    # user's home on a real box.
    # OpenSSH >= 9.8 penalises sources whose connections fail or close early; every
    # test connects from 127.0.0.1, so switch that off where it exists.
    extra = "PerSourcePenalties no\n" if _sshd_version() >= (9, 8) else ""
    if direct:
        extra += f"ListenAddress {direct}\n"
    # Where the client's exec of the resume attach finds this box's relay and its script (on a
    # real box: 127.0.0.1:2022 and /usr/local/lib/ephemeral-admin/resume.py).
    resume = (f" EA_RESUME_ADDRESS=127.0.0.1:{resume_port} EA_RESUME_SCRIPT={d}/resume.py"
              if resume_port else "")
    subsystem = f"internal-sftp -d {d}/home"
    if sftp == "hostile":
        here = os.path.dirname(os.path.abspath(__file__))
        subsystem = f"{sys.executable} -S {os.path.join(here, 'hostile_sftp.py')}"
    # The host-key rotation the client runs over its first connection (on a real box as root via
    # sudo, on /etc/ssh and sshd's unit): here this box's copy of the script, on this box's key
    # file (HostKey below), a SIGHUP to this box's sshd (it re-executes itself with the new key;
    # open connections stay). The box's processes all run as this machine's user, as its root.
    script = f"{d}/files/usr/local/sbin/ephemeral-admin-hostkey" if hostkey_rotation else f"{d}/refused"
    hostkey = (f"EA_HOSTKEY_SCRIPT={script}"
               f" EA_SSH_DIR={d} EA_SSHD_PIDFILE={d}/sshd.pid EA_SSH_PORT={port}")
    return extra + f"""# boxsim: one box's sshd
ListenAddress 127.0.0.1:{port}
HostKey {d}/ssh_host_ed25519_key
AuthorizedKeysFile {d}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
PidFile {d}/sshd.daemon.pid
AllowTcpForwarding yes
PrintMotd no
Subsystem sftp {subsystem}
LogLevel VERBOSE
SetEnv {MARK}={iid} HOME={d}/home EA_SETUP_DIR={d}/setup{resume} {hostkey}
"""


# --------------------------------------------------------------------------- private service


def _proc_net_addr(text):
    """An address as /proc/net/tcp{,6} writes it (hex, 32-bit words in host order) -> bytes."""
    raw = bytes.fromhex(text)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return raw


def _tcp_socket_inode(local, remote):
    """The inode of the TCP socket from ``local`` to ``remote`` ((host, port) each), or None."""
    want = [(socket.inet_pton(socket.AF_INET6 if ":" in h else socket.AF_INET, h), p) for h, p in (local, remote)]
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            ends = []
            for end in fields[1:3]:
                host, port = end.split(":")
                ends.append((_proc_net_addr(host), int(port, 16)))
            if ends == want:
                return fields[9]
    return None


class _PrivateHandler(BaseHTTPRequestHandler):
    server_version = "boxsim-private"
    protocol_version = "HTTP/1.0"

    def log_message(self, fmt, *args):
        pass

    def do_GET(self):
        svc = self.server.service
        if svc.from_box(self.client_address[:2], self.server.server_address[:2]):
            status = 200
            body = f"boxsim private service of {svc.iid}\ntoken={svc.token}\npath={self.path}\n"
        else:
            status, body = 403, "denied: only the box reaches this service\n"
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _PrivateServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many forwarded connections may arrive at once

    def handle_error(self, request, client_address):
        pass


class _PrivateServer6(_PrivateServer):
    address_family = socket.AF_INET6


class _PrivateService:
    """The box's private HTTP service (see the module docstring)."""

    def __init__(self, box):
        self.box, self.iid = box, box.iid
        self.token = secrets.token_hex(16)
        self.servers = []

    @classmethod
    def start(cls, box):
        svc = cls(box)
        rand = secrets.randbelow
        for server_class, host in ((_PrivateServer, f"127.77.{1 + rand(254)}.{1 + rand(254)}"),
                                   (_PrivateServer6, "::1")):
            try:
                server = server_class((host, 0), _PrivateHandler)
            except OSError as e:  # no IPv6 loopback here: IPv4 only
                box.note(f"private service: cannot listen on {host}: {e}")
                continue
            server.service = svc
            svc.servers.append(server)
            threading.Thread(target=server.serve_forever, name=f"boxsim-private-{box.iid}", daemon=True).start()
        lines = []
        for server in svc.servers:
            host, port = server.server_address[:2]
            lines.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        with open(os.path.join(box.dir, "home", "private-service"), "w") as f:
            f.write("".join(line + "\n" for line in lines))
        box.note(f"private service on {' '.join(lines)}")
        return svc

    def from_box(self, peer, ours):
        """Whether the connection from ``peer`` is held by one of the box's processes."""
        inode = _tcp_socket_inode(peer, ours)
        sshd = self.box.sshd
        if inode is None or sshd is None:
            return False
        needle = f"socket:[{inode}]"
        for pid in {sshd.pid} | _descendants({sshd.pid}):
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == needle:
                        return True
                except OSError:
                    pass
        return False

    def stop(self):
        servers, self.servers = self.servers, []
        for server in servers:  # shutdown() waits for serve_forever's poll: not on this thread
            threading.Thread(target=lambda s=server: (s.shutdown(), s.server_close()), daemon=True).start()


# --------------------------------------------------------------------------- IMDS


class _QuietServer(ThreadingHTTPServer):
    """A watchdog's curl that gives up (timeout) or a box that goes away mid-request is
    normal here: don't print a traceback for a client that hung up."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class _ImdsHandler(BaseHTTPRequestHandler):
    server_version = "boxsim-imds"
    protocol_version = "HTTP/1.0"

    def log_message(self, fmt, *args):  # quiet; per-box imds.log instead
        pass

    def _reply(self, box, status, text="", ctype="text/plain"):
        body = text if isinstance(text, bytes) else text.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if box is not None and box.dir:
            try:
                with open(os.path.join(box.dir, "imds.log"), "a") as f:
                    f.write(f"{_now_iso()} {self.command} {self.path} {status}\n")
            except OSError:
                pass

    def do_PUT(self):
        self._handle()

    def do_GET(self):
        self._handle()

    def _handle(self):
        sim = self.server.sim
        _, iid, rest = (self.path.split("?", 1)[0] + "/").split("/", 2)
        rest = "/" + rest.rstrip("/")
        with sim.lock:
            box = sim.boxes.get(iid)
        if box is None:
            return self._reply(None, 404, "Not Found")
        if not box.imds_available:
            self.close_connection = True  # "unavailable": drop without a reply
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if self.command == "PUT":
            if rest != "/latest/api/token":
                return self._reply(box, 403, "Forbidden")
            try:
                ttl = int(self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", ""))
            except ValueError:
                ttl = 0
            if not 1 <= ttl <= 21600:
                return self._reply(box, 400, "Bad Request")
            token = secrets.token_urlsafe(32)
            box.tokens[token] = time.time() + ttl
            return self._reply(box, 200, token)
        token = self.headers.get("X-aws-ec2-metadata-token", "")
        if not token or box.tokens.get(token, 0) < time.time():
            return self._reply(box, 401, "Unauthorized")
        version, _, path = rest[1:].partition("/")
        if version != "latest" and not (len(version) == 10 and version[4] == version[7] == "-"):
            return self._reply(box, 404, "Not Found")
        if path == "user-data":
            return self._reply(box, 200, box.user_data, "application/octet-stream") if box.user_data \
                else self._reply(box, 404, "Not Found")
        if path in ("dynamic", "dynamic/instance-identity"):
            return self._reply(box, 200, "instance-identity/" if path == "dynamic" else "document")
        if path == "dynamic/instance-identity/document":
            return self._reply(box, 200, json.dumps(_identity_document(box), indent=2), "application/json")
        prefix = "meta-data/"
        if not (path + "/").startswith(prefix):
            return self._reply(box, 404, "Not Found")
        key = path[len(prefix):]
        if box.meta and (key == "" or key in _META_DIRS or key in box.meta):
            return self._reply(box, 200, _meta_listing(box, key))
        if key == "instance-id":
            return self._reply(box, 200, box.iid)
        if key == "placement/region":
            return self._reply(box, 200, box.region)
        if key == "spot/instance-action":
            if box.spot_notice:
                return self._reply(box, 200, box.spot_notice, "application/json")
            return self._reply(box, 404, "Not Found")
        if key == "tags/instance" or key.startswith("tags/instance/"):
            with sim.moto_lock:
                backend = sim._backend(box.account, box.region)
                tags = dict(getattr(backend, "tags", {}).get(box.iid, {})) if backend else {}
            if key == "tags/instance":
                return self._reply(box, 200, "\n".join(sorted(tags)))
            name = unquote(key[len("tags/instance/"):])
            if name in tags:
                return self._reply(box, 200, str(tags[name]))
        return self._reply(box, 404, "Not Found")


# --------------------------------------------------------------------------- instance metadata
# What cloud-init's EC2 datasource crawls on a real VM (the simulated boxes only read tags).

_META_DIRS = {"placement", "services", "tags"}


def _instance_meta(inst):
    """meta-data leaves of one moto instance (call with moto_lock held)."""
    az = _safe_attr(_safe_attr(inst, "placement"), "zone") or "us-east-1a"
    private_ip = str(_safe_attr(inst, "private_ip") or "10.0.0.10")
    meta = {
        "ami-id": str(_safe_attr(inst, "image_id") or ""),
        "ami-launch-index": "0",
        "instance-id": inst.id,
        "instance-type": str(_safe_attr(inst, "instance_type") or ""),
        "instance-life-cycle": "spot" if _safe_attr(inst, "lifecycle") == "spot" else "on-demand",
        "local-ipv4": private_ip,
        "local-hostname": "ip-" + private_ip.replace(".", "-") + ".ec2.internal",
        "hostname": "ip-" + private_ip.replace(".", "-") + ".ec2.internal",
        "placement/availability-zone": az,
        "placement/region": az[:-1],
        "services/domain": "amazonaws.com",
        "services/partition": "aws",
    }
    public_ip = _safe_attr(inst, "public_ip")
    if public_ip:
        meta["public-ipv4"] = str(public_ip)
    launch = _safe_attr(inst, "launch_time")
    meta["_launch_time"] = str(launch or _now_iso())
    meta["_account"] = str(_safe_attr(inst, "owner_id") or "123456789012")
    return meta


def _meta_listing(box, key):
    """The IMDS answer for ``meta-data/<key>``: a leaf's value, or a directory's entries (one a
    line, subdirectories with a trailing slash)."""
    leaves = {k: v for k, v in box.meta.items() if not k.startswith("_")}
    if key in leaves:
        return leaves[key]
    leaves["tags/instance"] = None  # a directory (see the tags branch)
    prefix = key + "/" if key else ""
    names = set()
    for k in leaves:
        if k.startswith(prefix):
            head, sep, _ = k[len(prefix):].partition("/")
            names.add(head + "/" if sep or k == "tags/instance" else head)
    return "\n".join(sorted(names))


def _identity_document(box):
    m = box.meta
    return {
        "accountId": m.get("_account"), "architecture": "x86_64",
        "availabilityZone": m.get("placement/availability-zone"), "imageId": m.get("ami-id"),
        "instanceId": box.iid, "instanceType": m.get("instance-type"), "pendingTime": m.get("_launch_time"),
        "privateIp": m.get("local-ipv4"), "region": m.get("placement/region"), "version": "2017-09-30",
    }

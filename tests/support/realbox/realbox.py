"""realbox: boots the real-box test image (see build-image) as an EC2 instance under QEMU.

Used by the box simulator's real-VM mode (``boxsim.py``) and by ``scripts/bench --real-box``.
One VM = one ``qemu-system-x86_64`` process on a copy-on-write qcow2 overlay of the cached
image, booting the image's own kernel and initrd. To cloud-init it is an EC2 instance: SMBIOS
type 1 uuid and serial start with ``ec2``, and 169.254.169.254:80 reaches an IMDS through QEMU's
user network (``guestfwd ... cmd:`` runs ``imds-relay`` once per connection). The network is
``restrict=on``: the guest reaches nothing but the forwarded IMDS, and the host reaches the
guest's sshd only through the ``hostfwd`` rules given. ``-no-reboot``: the guest's own poweroff
(or reboot) ends QEMU.

Acceleration: KVM when /dev/kvm can run the image's stock kernel (tried once per host boot,
result cached), else TCG with a 256 MB translation cache. Some hosts' /dev/kvm (PVM) cannot.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import socket
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.environ.get("REALBOX_CACHE", "/var/tmp/ephemeral-admin-realbox")
QEMU = os.environ.get("REALBOX_QEMU", "qemu-system-x86_64")
MEMORY_MB = int(os.environ.get("REALBOX_MEMORY_MB", "1024"))
CPUS = int(os.environ.get("REALBOX_CPUS", "1"))
IMDS_ADDR = "169.254.169.254"


def build_image():
    """The image directory, building it first if needed (root, minutes the first time)."""
    out = subprocess.run([os.path.join(HERE, "build-image")], stdout=subprocess.PIPE, check=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def accel(image_dir):
    """"kvm" if /dev/kvm boots the image's kernel to its first panic (no root given), else "tcg".
    Cached per host boot and kernel."""
    forced = os.environ.get("REALBOX_ACCEL")
    if forced:
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    kernel = os.path.join(image_dir, "vmlinuz")
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    with open(kernel, "rb") as f:
        kh = hashlib.sha256(f.read()).hexdigest()[:12]
    marker = os.path.join(CACHE, f"accel-{boot}-{kh}")
    try:
        with open(marker) as f:
            return f.read().strip()
    except OSError:
        pass
    result = "tcg"
    try:
        out = subprocess.run(
            [QEMU, "-accel", "kvm", "-cpu", "host", "-m", "256", "-display", "none", "-nodefaults",
             "-no-reboot", "-serial", "stdio", "-kernel", kernel, "-append", "console=ttyS0 panic=-1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=20)
        if b"Kernel panic" in out.stdout or b"VFS: Unable to mount root" in out.stdout:
            result = "kvm"
    except (OSError, subprocess.TimeoutExpired):
        pass
    os.makedirs(CACHE, exist_ok=True)
    with open(marker, "w") as f:
        f.write(result + "\n")
    return result


def ec2_uuid():
    """A UUID whose text starts with "ec2", like a Nitro/Xen instance's SMBIOS uuid."""
    return "ec2" + str(uuid.uuid4())[3:]


class Vm:
    """One QEMU process. ``hostfwds``: [(host_ip, host_port)] each forwarded to guest port 22.
    ``imds``: (host, port, instance_id) of the fake IMDS (paths under /<instance_id>/)."""

    def __init__(self, image_dir, workdir, hostfwds, imds, kernel_args="", popen=subprocess.Popen):
        self.image_dir, self.dir = image_dir, workdir
        self.hostfwds, self.imds, self.kernel_args = hostfwds, imds, kernel_args
        self.popen = popen
        self.proc = None
        self.accel = None
        self.started_at = None
        self.console = os.path.join(workdir, "console.log")

    def argv(self):
        host, port, iid = self.imds
        relay = " ".join(shlex.quote(a) for a in (sys.executable, os.path.join(HERE, "imds-relay"),
                                                  host, str(port), iid))
        if "," in relay:
            raise ValueError(f"QEMU option values cannot hold a comma: {relay}")
        fwds = "".join(f",hostfwd=tcp:{h}:{p}-:22" for h, p in self.hostfwds)
        net = f"user,id=n0,net=169.254.169.0/24,restrict=on{fwds},guestfwd=tcp:{IMDS_ADDR}:80-cmd:{relay}"
        ident = ec2_uuid()
        self.accel = accel(self.image_dir)
        cpu = ["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else \
            ["-accel", "tcg,tb-size=256", "-cpu", os.environ.get("REALBOX_TCG_CPU", "qemu64")]
        # /dev/console is the virtio console (the last console=): journald forwards every log
        # line there. Through the emulated 16550 (ttyS0, kernel messages only) that much output
        # froze TCG guests (tty writes waiting on a UART interrupt that never came).
        append = ("root=/dev/vda rw console=ttyS0 console=hvc0 systemd.journald.forward_to_console=1 "
                  + self.kernel_args)
        return [QEMU, "-name", iid, "-machine", "q35", *cpu, "-m", str(MEMORY_MB), "-smp", str(CPUS),
                "-display", "none", "-nodefaults", "-no-reboot", "-monitor", "none",
                "-serial", f"file:{os.path.join(self.dir, 'serial.log')}",
                "-device", "virtio-serial-pci", "-chardev", f"file,id=con,path={self.console}",
                "-device", "virtconsole,chardev=con",
                "-kernel", os.path.join(self.image_dir, "vmlinuz"),
                "-initrd", os.path.join(self.image_dir, "initrd.img"),
                "-append", append.strip(),
                "-drive", f"file={self.overlay},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
                "-netdev", net, "-device", "virtio-net-pci,netdev=n0",
                "-device", "virtio-rng-pci",
                "-smbios", f"type=1,manufacturer=Amazon EC2,product=realbox,uuid={ident},serial={ident}"]

    def start(self):
        self.overlay = os.path.join(self.dir, "overlay.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                        os.path.join(self.image_dir, "disk.img"), self.overlay], check=True)
        argv = self.argv()
        with open(os.path.join(self.dir, "qemu.log"), "ab") as log:
            log.write((" ".join(shlex.quote(a) for a in argv) + "\n").encode())
            log.flush()
            self.started_at = time.monotonic()
            self.proc = self.popen(["nice", "-n", os.environ.get("REALBOX_NICE", "10"), *argv],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        return self

    def console_text(self):
        try:
            with open(self.console, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def ssh_banner(host, port, timeout=2.0):
    """True when an SSH server answers there (QEMU's hostfwd accepts TCP even while the guest's
    sshd is not up yet, then closes: only a banner shows sshd is accepting)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def wait_ssh(host, port, proc, limit):
    """Seconds until an SSH banner, or None if QEMU exits or ``limit`` passes first."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if proc.poll() is not None:
            return None
        if ssh_banner(host, port):
            return time.monotonic() - start
        time.sleep(0.25)
    return None


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]

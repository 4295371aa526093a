"""`scripts/bench --real-box`: what our cloud-config costs a real box at boot.

Two VMs of the real-box test image (tests/support/realbox/), one after the other, booted by the
local cloud's box simulator in real-VM mode: one launched by the CLI (our user-data: pinned host
key, sshd drop-in, cap timer, watchdog), one by RunInstances with a bare cloud-config that only
authorizes a key. For each it prints, from QEMU's start: sshd accepting (its first SSH banner
through the box's public IP) and the first byte of an interactive shell (OpenSSH client, retried
until it gets one). It measures and prints; it asserts nothing. On TCG a boot takes about a
minute; the goal (our cloud-config under 1 s slower than the bare one) is about KVM.

    python scripts/bench.d/realbox.py --bin target/release/ephemeral-admin [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOGIN = "debian"
BOOT_LIMIT = 420


def http(url, method="GET", body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"{}")


class Cloud:
    def __init__(self):
        env = dict(os.environ, BOXSIM_REAL_VM="1")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "tests/support/localcloud/localcloud.py"), "--port", "0",
             "--box-sim", "--exit-on-stdin-eof"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        line = self.proc.stdout.readline().decode()
        words = dict(w.split("=", 1) for w in line.split() if "=" in w)
        if "url" not in words:
            raise SystemExit(f"localcloud did not start: {line!r}")
        self.url, self.port = words["url"], int(words.get("box_ssh_port", "22"))

    def box(self, iid):
        return http(f"{self.url}/_localcloud/box/{iid}")

    def wait_up(self, iid):
        start = time.monotonic()
        while time.monotonic() - start < BOOT_LIMIT:
            try:
                info = self.box(iid)
            except urllib.error.HTTPError as e:  # not noticed by the box simulator yet
                if e.code != 404:
                    raise
                time.sleep(0.1)
                continue
            if info["state"] != "booting":
                return info
            time.sleep(0.5)
        raise SystemExit(f"{iid}: no sshd after {BOOT_LIMIT} s")

    def ec2(self):
        import boto3

        return boto3.client("ec2", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def first_shell_byte(ip, port, key, known_hosts, limit=BOOT_LIMIT):
    """Unix time of the first byte an interactive shell sends (ssh -tt in a pty), retrying."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        argv = ["ssh", "-F", "/dev/null", "-tt", "-i", key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=10", "-p", str(port), f"{LOGIN}@{ip}"]
        argv += (["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}"] if known_hosts
                 else ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
        pid, fd = pty.fork()
        if pid == 0:
            os.execvp(argv[0], argv)
        got = None
        try:
            while time.monotonic() - start < limit:
                ready, _, _ = select.select([fd], [], [], 15)
                if not ready:
                    break
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    break
                if not data:
                    break
                # ssh's own warnings also arrive on the pty: wait for the remote shell's bytes.
                if b"Warning:" in data or b"Permission denied" in data or b"Connection" in data:
                    continue
                got = time.time()
                break
        finally:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
            os.waitpid(pid, 0)
            os.close(fd)
        if got:
            return got
        time.sleep(0.5)
    return None


def measure(cloud, iid, key, known_hosts):
    info = cloud.wait_up(iid)
    ip, port = info["direct"].rsplit(":", 1)
    byte = first_shell_byte(ip, int(port), key, known_hosts)
    info = cloud.box(iid)
    started = info["vm_started_at"]
    return {
        "instance": iid,
        "accel": info["accel"],
        "sshd_s": info["boot"].get("sshd"),
        "first_shell_byte_s": round(byte - started, 2) if byte else None,
    }


def run_ours(cloud, bin_path, home):
    os.makedirs(os.path.join(home, "config/ephemeral-admin"), exist_ok=True)
    with open(os.path.join(home, "config/ephemeral-admin/config.toml"), "w") as f:
        f.write('watchdog_interval = "1s"\nconnect_timeout = "6m"\nboot_grace = "10m"\n')
    env = {"PATH": os.environ["PATH"], "HOME": home, "XDG_STATE_HOME": os.path.join(home, "state"),
           "XDG_CONFIG_HOME": os.path.join(home, "config"), "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_ENDPOINT_URL": cloud.url}
    if cloud.port != 22:
        env["EPHEMERAL_ADMIN_SSH_PORT"] = str(cloud.port)
    out = subprocess.run([bin_path, "launch", "--detach", "--output", "json", "--my-ip", "203.0.113.7",
                          "--user", LOGIN], env=env, capture_output=True, text=True, check=True)
    launched = json.loads(out.stdout)
    sdir = os.path.join(home, "state/ephemeral-admin/sessions", launched["session_id"])
    record = open(os.path.join(sdir, "session.toml")).read()
    pinned = next(line.split("=", 1)[1].strip().strip('"') for line in record.splitlines()
                  if line.startswith("host_key_public"))
    host = launched["public_ip"] if cloud.port == 22 else f"[{launched['public_ip']}]:{cloud.port}"
    known = os.path.join(home, "known_hosts")
    with open(known, "w") as f:
        f.write(f"{host} {pinned}\n")
    state = http(f"{cloud.url}/_localcloud/state?region=us-east-1")
    user_data = next(i for i in state["instances"] if i["id"] == launched["instance_id"])["user_data"]
    result = measure(cloud, launched["instance_id"], os.path.join(sdir, "id_ed25519"), known)
    result.update(case="our user-data", user_data_bytes=len(user_data.encode()))
    cloud.ec2().terminate_instances(InstanceIds=[launched["instance_id"]])
    return result, launched


def run_bare(cloud, home, image_id):
    key = os.path.join(home, "bare_ed25519")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    user_data = f"#cloud-config\nssh_authorized_keys: [{open(key + '.pub').read().strip()}]\n"
    ec2 = cloud.ec2()
    iid = ec2.run_instances(ImageId=image_id, MinCount=1, MaxCount=1, InstanceType="t3.small",
                            UserData=user_data)["Instances"][0]["InstanceId"]
    result = measure(cloud, iid, key, None)
    result.update(case="bare cloud-config", user_data_bytes=len(user_data.encode()))
    ec2.terminate_instances(InstanceIds=[iid])
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    subprocess.run([os.path.join(REPO, "tests/support/realbox/build-image")], check=True, stdout=subprocess.DEVNULL)
    home = tempfile.mkdtemp(prefix="ea-bench-realbox-")
    cloud = Cloud()
    try:
        ours, launched = run_ours(cloud, os.path.abspath(args.bin), home)
        state = http(f"{cloud.url}/_localcloud/state?region=us-east-1")
        image_id = next(i for i in state["instances"] if i["id"] == launched["instance_id"])["image_id"]
        bare = run_bare(cloud, home, image_id)
    finally:
        cloud.close()
        shutil.rmtree(home, ignore_errors=True)
    rows = [ours, bare]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"real box ({ours['accel']}), seconds from QEMU start")
    print(f"{'case':<20} {'user-data':>10} {'sshd accepting':>15} {'first shell byte':>17}")
    for r in rows:
        print(f"{r['case']:<20} {r['user_data_bytes']:>9}B {r['sshd_s'] or '-':>15} {r['first_shell_byte_s'] or '-':>17}")
    if ours["first_shell_byte_s"] and bare["first_shell_byte_s"]:
        cost = ours["first_shell_byte_s"] - bare["first_shell_byte_s"]
        print(f"our cloud-config costs {cost:+.2f} s to the first shell byte (goal under 1 s on KVM;"
              f" this run: {ours['accel']})")


if __name__ == "__main__":
    main()

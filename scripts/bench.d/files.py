"""Section 8 (cp): `ephemeral-admin cp` throughput, up and down, against OpenSSH `scp` and `sftp`
on the same route (direct TCP to the box simulator's sshd, the same session keys)."""

import hashlib
import os
import subprocess
import time

from harness import log, median


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _timed(h, argv, timeout=600):
    t0 = time.perf_counter()
    p = h.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise RuntimeError(f"{argv[0]} took more than {timeout}s")
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` exited {p.returncode}: {err.decode(errors='replace')[-400:]}")
    return wall


def _tools(h, s, local, remote):
    """For each tool, (upload argv, download argv) moving `local` <-> `remote` on the box."""
    ssh_opts = ["-F", s.ssh_config, "-o", "BatchMode=yes"]

    def sftp(command):
        batch = f"{local}.{abs(hash(command))}.batch"
        with open(batch, "w") as f:
            f.write(command + "\n")
        return ["sftp", "-q", *ssh_opts, "-b", batch, s.host]

    return {
        "ephemeral-admin cp": ([h.bin, "cp", local, f"{s.id}:{remote}"], [h.bin, "cp", f"{s.id}:{remote}", local]),
        "scp": (["scp", "-q", *ssh_opts, local, f"{s.host}:{remote}"], ["scp", "-q", *ssh_opts, f"{s.host}:{remote}", local]),
        "sftp": (sftp(f"put {local} {remote}"), sftp(f"get {remote} {local}")),
    }


def _rate(size, walls, setups):
    return size / 2**20 / max(1e-6, median(walls) - median(setups))


def section_cp(h, cfg, row, shared, session_factory):
    rows, notes, data = [], [], {}
    size = (32 if cfg.quick else 256) * 1024 * 1024
    runs = 1 if cfg.quick else 3
    s = shared.get("pipe_session") or session_factory(h, cfg)
    shared["pipe_session"] = s
    box_side = os.path.join(h.work, "cp-box-side")  # the box simulator's sshd runs on this machine
    os.makedirs(box_side, exist_ok=True)
    here = os.path.join(h.work, "cp-here")
    os.makedirs(here, exist_ok=True)
    original = os.path.join(here, "original.bin")
    with open(original, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    empty = os.path.join(here, "empty.bin")
    open(empty, "wb").close()
    want = _sha256(original)
    names = ("ephemeral-admin cp", "scp", "sftp")
    for direction, index in (("upload", 0), ("download", 1)):
        data[direction] = {}
        paths = {n: (os.path.join(here, f"{direction}-{n.split()[0]}.bin"),
                     os.path.join(box_side, f"{direction}-{n.split()[0]}.bin")) for n in names}
        # Setup cost (connect, handshake, for us also the session lookup): the same copy of 0 bytes.
        setups = {}
        for name, (local, remote) in paths.items():
            subprocess.run(["cp", empty, local if direction == "upload" else remote], check=True)
            setups[name] = [_timed(h, _tools(h, s, local, remote)[name][index]) for _ in range(3)]
            subprocess.run(["cp", original, local if direction == "upload" else remote], check=True)
        # The tools take turns within each run, so a drift in the machine's load hits all alike.
        walls = {name: [] for name in names}
        for i in range(runs):
            for name, (local, remote) in paths.items():
                log(f"cp: {name} {direction}, {size >> 20} MiB, run {i + 1}/{runs}")
                walls[name].append(_timed(h, _tools(h, s, local, remote)[name][index]))
        for name, (local, remote) in paths.items():
            if _sha256(remote if direction == "upload" else local) != want:
                notes.append(f"{name} {direction}: the copy differs from the original")
            data[direction][name] = {"setup_s": setups[name], "wall_s": walls[name],
                                     "mib_s": _rate(size, walls[name], setups[name])}
            for path in (local, remote):
                os.unlink(path)
    for direction in ("upload", "download"):
        d = data[direction]
        ours = d["ephemeral-admin cp"]
        for name, m in d.items():
            rows.append(row(f"{size >> 20} MiB {direction}: {name}", "-",
                            f"{m['mib_s']:.0f} MiB/s ({median(m['wall_s']):.2f} s, setup {median(m['setup_s']):.2f} s)",
                            None, values=m["wall_s"]))
        best = max(("scp", "sftp"), key=lambda n: d[n]["mib_s"])
        ratio = ours["mib_s"] / d[best]["mib_s"]
        d["ratio"] = ratio
        rows.append(row(f"  {direction} ratio ephemeral-admin cp / {best} (the faster OpenSSH client)", ">= 0.8",
                        f"{ratio:.2f}", ratio >= 0.8))
    notes.append("all three reach the same sshd (the box simulator's, internal-sftp) by direct TCP with the "
                 "session's key; MiB/s counts the data phase: wall time minus the median wall time of the same "
                 "copy of an empty file (connection setup, and for ephemeral-admin its session lookup). "
                 f"{runs} run(s) each; random data; every copy checked by SHA-256.")
    os.unlink(original)
    return rows, notes, data

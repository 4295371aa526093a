#!/usr/bin/env python3
"""ephemeral-admin benchmark against the local cloud (moto + fault/latency proxy + box simulator
with a real sshd per box). It measures and prints; it asserts nothing. Every row says its target,
what was measured, and whether the target was met.

Sections (for --only, by number or name; comma-separated for several):
  1 ttfp        time to first prompt, warm and cold account, and the CLI's own overhead
  2 roundtrips  sequential AWS round trips on the critical path, calls, SSH rule vs RunInstances
  3 detection   running -> noticed by the CLI; sshd accepting -> SSH handshake
  4 teardown    remote exit -> CLI exit, with the AWS calls it makes
  5 scale       `list` with 1/10/50 sessions; `cleanup --all-regions` with slowed regions
  6 pipe        `connect ID -- cat` throughput and PTY keystroke echo vs OpenSSH
  7 process     --version start time, binary size, peak RSS
  8 eice        time to first byte and `connect ID -- cat` through the local EICE relay vs direct TCP
  9 cp          `cp` throughput up and down vs OpenSSH `scp` and `sftp`

Sections 1-4 share one set of launches. Use scripts/bench (it builds the release binary).
"""

import argparse
import json
import os
import signal
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.d"))

import harness  # noqa: E402
import eice  # noqa: E402
import launches  # noqa: E402
import files  # noqa: E402
import others  # noqa: E402
from harness import log  # noqa: E402

SECTIONS = [
    (1, "ttfp", "time to first prompt"),
    (2, "roundtrips", "sequential AWS round trips on the critical path"),
    (3, "detection", "detection lag"),
    (4, "teardown", "teardown"),
    (5, "scale", "scale"),
    (6, "pipe", "the SSH pipe"),
    (7, "process", "process"),
    (8, "eice", "the EC2 Instance Connect Endpoint tunnel"),
    (9, "cp", "file copies"),
]


class Config:
    def __init__(self, **kw):
        self.__dict__.update(kw)

    def copy(self, **kw):
        return Config(**{**self.__dict__, **kw})


def parse_only(text):
    if not text:
        return [n for n, _, _ in SECTIONS]
    chosen = []
    for part in text.split(","):
        part = part.strip().lower()
        for n, name, _ in SECTIONS:
            if part in (str(n), name):
                chosen.append(n)
                break
        else:
            names = ", ".join(f"{n}/{name}" for n, name, _ in SECTIONS)
            raise SystemExit(f"--only: unknown section {part!r} (one of {names})")
    return sorted(set(chosen))


def row(metric, target, measured, met, **extra):
    return {"metric": metric, "target": target, "measured": measured,
            "met": met, **({"values": extra["values"]} if "values" in extra else {})}


def met_text(met):
    if met is None:
        return "-"
    if met is True:
        return "yes"
    if met is False:
        return "NO"
    return str(met)  # "partly": the median meets, the worst run does not


def render(report):
    out = []
    cfg = report["config"]
    out.append(f"ephemeral-admin benchmark: {cfg['delay_ms']} ms per AWS call, pending "
               f"{cfg['pending_seconds']:g} s, boot {cfg['boot_seconds']:g} s"
               f"{' (SYNs dropped while booting)' if cfg.get('drop_syns_while_booting') else ''}, launches via "
               f"{'TCP to the public IP' if cfg.get('route', 'direct') == 'direct' else 'box-connect'}, "
               f"{cfg['runs']} runs per scenario{' (quick)' if cfg['quick'] else ''}; commit {report['git']['commit'] or '?'}"
               f"{' + local changes' if report['git']['dirty'] else ''}")
    missed = []
    for sec in report["sections"]:
        out.append("")
        out.append(f"== {sec['number']}. {sec['title']} ==")
        if sec.get("error"):
            out.append(f"   FAILED TO MEASURE: {sec['error']}")
            missed.append(f"{sec['number']}. {sec['title']}: could not be measured")
            continue
        rows = sec["rows"]
        head = ("metric", "target", "measured", "met?")
        cells = [(r["metric"], r["target"], r["measured"], met_text(r["met"])) for r in rows]
        widths = [min(70, max(len(head[i]), *(len(c[i]) for c in cells))) for i in range(3)]
        out.append(f"{head[0]:<{widths[0]}}  {head[1]:<{widths[1]}}  {head[2]:<{widths[2]}}  {head[3]}")
        for c in cells:
            out.append(f"{c[0]:<{widths[0]}}  {c[1]:<{widths[1]}}  {c[2]:<{widths[2]}}  {c[3]}")
        for r in rows:
            if r["met"] not in (None, True):
                missed.append(f"{sec['number']}. {r['metric'].strip()}: target {r['target']}, measured "
                              f"{r['measured']} ({met_text(r['met'])})")
        for note in sec.get("notes", []):
            out.append(f"   * {note}")
    out.append("")
    if missed:
        out.append(f"TARGETS MISSED ({len(missed)}):")
        out.extend(f"  - {m}" for m in missed)
    else:
        out.append("every target with a verdict was met")
    out.append(f"benchmark wall time: {report['wall_s']:.0f} s")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="the release binary")
    ap.add_argument("--runs", type=int, default=None, help="launches per scenario (default 5; 2 with --quick)")
    ap.add_argument("--delay-ms", type=int, default=50, help="latency added to every AWS call (default 50)")
    ap.add_argument("--boot-seconds", type=float, default=2.0, help="simulated boot time (default 2)")
    ap.add_argument("--pending-seconds", type=float, default=3.0, help="time in `pending` (default 3)")
    ap.add_argument("--route", choices=("direct", "box-connect"), default="direct",
                    help="how launches reach the box: TCP to its public IP, the default and what a real "
                         "launch does (default), or the box-connect ProxyCommand")
    ap.add_argument("--answer-syns-while-booting", action="store_true",
                    help="let a booting box refuse connections at once; by default it drops SYNs until "
                         "the boot ends, like a real box before its network is up")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    ap.add_argument("--quick", action="store_true",
                    help="fewer runs, 1 and 10 sessions, 128 MiB, 100 keystrokes: a couple of minutes")
    ap.add_argument("--only", metavar="SECTION", help="only these sections (number or name, comma-separated)")
    ap.add_argument("--trace-cli", action="store_true",
                    help="run the measured launches with -vv and keep their timestamped stderr in the JSON")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the private HOME and logs")
    args = ap.parse_args()
    if not os.access(args.bin, os.X_OK):
        raise SystemExit(f"{args.bin}: not an executable (build with `cargo build --release`)")
    cfg = Config(runs=args.runs or (2 if args.quick else 5), delay_ms=args.delay_ms, boot_seconds=args.boot_seconds,
                 pending_seconds=args.pending_seconds, quick=args.quick, trace=args.trace_cli, route=args.route,
                 drop_syns_while_booting=not args.answer_syns_while_booting,
                 launch_timeout=max(120, 30 + 3 * (args.boot_seconds + args.pending_seconds)))
    only = parse_only(args.only)

    def on_signal(signum, _frame):  # clean up (sessions, local cloud) on SIGTERM too
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    work = harness.make_workdir()
    h = harness.Harness(args.bin, work, route=args.route,
                        drop_syns_while_booting=not args.answer_syns_while_booting)
    report = {"config": {**{k: v for k, v in cfg.__dict__.items()}, "sections": only},
              "git": harness.git_describe(), "binary": os.path.abspath(args.bin), "workdir": work,
              "sections": []}
    shared = {}
    launch_data = None
    try:
        log(f"starting the local cloud (work dir {work})")
        h.start_cloud()
        launch_error = None
        if any(n in only for n in (1, 2, 3, 4)):
            try:
                launch_data = launches.collect(h, cfg)
            except Exception as e:  # noqa: BLE001
                launch_error = f"the launches failed: {type(e).__name__}: {e}"
                log(f"launch runs failed:\n{traceback.format_exc()}")
        for n, name, title in SECTIONS:
            if n not in only:
                continue
            sec = {"number": n, "name": name, "title": title, "rows": [], "notes": [], "data": None}
            report["sections"].append(sec)
            try:
                if n <= 4 and launch_error:
                    raise RuntimeError(launch_error)
                if n == 1:
                    sec["rows"], sec["notes"] = launches.section_ttfp(launch_data, cfg, row)
                elif n == 2:
                    sec["rows"], sec["notes"] = launches.section_roundtrips(launch_data, cfg, row)
                elif n == 3:
                    sec["rows"], sec["notes"] = launches.section_detection(launch_data, cfg, row)
                elif n == 4:
                    sec["rows"], sec["notes"] = launches.section_teardown(launch_data, cfg, row)
                elif n == 5:
                    sec["rows"], sec["notes"], sec["data"] = others.section_scale(h, cfg, row)
                elif n == 6:
                    sec["rows"], sec["notes"], sec["data"] = others.section_pipe(h, cfg, row, shared)
                elif n == 7:
                    sec["rows"], sec["notes"], sec["data"] = others.section_process(h, cfg, row, shared, launch_data)
                elif n == 8:
                    sec["rows"], sec["notes"], sec["data"] = eice.section_eice(h, cfg, row, shared)
                elif n == 9:
                    sec["rows"], sec["notes"], sec["data"] = files.section_cp(h, cfg, row, shared, others.PipeSession)
            except Exception as e:  # noqa: BLE001 - one section failing must not hide the others
                sec["error"] = f"{type(e).__name__}: {e}"
                log(f"section {n} failed:\n{traceback.format_exc()}")
        if launch_data is not None:
            report["launch_runs"] = launch_data
    finally:
        log("cleaning up: sessions, then the local cloud")
        if shared.get("pipe_session"):
            try:
                shared["pipe_session"].close()
            except Exception as e:  # noqa: BLE001
                log(f"terminating the pipe session: {e}")
        h.close()
        if not args.keep_workdir:
            harness.remove_workdir(work)
    report["wall_s"] = time.monotonic() - started
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print(render(report))
    # A missed target is a result; a section that could not be measured is a broken benchmark.
    return 1 if any(sec.get("error") for sec in report["sections"]) else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Launch benchmark against the local cloud with a fixed added delay per AWS call.

Measures, for a cold account (nothing exists) and a warm one (security group and IAM profile
exist): the wall time of `launch --detach`, the AWS calls made, and the number of *sequential*
round trips on the critical path (the longest chain of calls where each starts only after the
previous one ended), before RunInstances and in total. Prints a table, or JSON with --json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def control(url, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{url}/_localcloud/{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def depth_chain(calls):
    """Longest chain of strictly sequential calls ending at each call (1 = no predecessor)."""
    calls = sorted(calls, key=lambda c: c["t_start"])
    depth = []
    for i, c in enumerate(calls):
        before = [depth[j] for j in range(i) if calls[j]["t_end"] <= c["t_start"] + 1e-4]
        depth.append(1 + max(before, default=0))
    return calls, depth


def critical_path(calls):
    calls, depth = depth_chain(calls)
    run = [d for c, d in zip(calls, depth) if c["action"] == "RunInstances"]
    before_run = (run[0] - 1) if run else None
    return before_run, max(depth, default=0)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--delay-ms", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    cloud = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests/support/localcloud/localcloud.py"), "--port", "0",
         "--exit-on-stdin-eof"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    url = cloud.stdout.readline().split("url=")[1].split()[0]
    home = tempfile.mkdtemp(prefix="ea-bench-")
    env = {"PATH": os.environ["PATH"], "HOME": home, "XDG_STATE_HOME": f"{home}/state",
           "XDG_CONFIG_HOME": f"{home}/config", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": url, "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": f"{home}/none", "AWS_SHARED_CREDENTIALS_FILE": f"{home}/none"}
    results = {}
    try:
        for scenario in ("cold", "warm"):
            walls, before, total_depth, calls_n = [], [], [], []
            for _ in range(args.runs):
                if scenario == "cold":
                    control(url, "POST", "reset")
                control(url, "PUT", "config", {"delay_ms": 0})
                # Warm the moto backends outside the measurement.
                subprocess.run([args.bin, "prices"], env=env, capture_output=True, check=True)
                control(url, "PUT", "config", {"delay_ms": args.delay_ms})
                control(url, "DELETE", "log")
                t0 = time.monotonic()
                subprocess.run([args.bin, "launch", "--detach", "--my-ip", "203.0.113.7", "-q"], env=env,
                               capture_output=True, check=True)
                walls.append(time.monotonic() - t0)
                calls = control(url, "GET", "log")["calls"]
                b, d = critical_path(calls)
                before.append(b)
                total_depth.append(d)
                calls_n.append(len(calls))
            results[scenario] = {
                "launch_wall_s": {"median": statistics.median(walls), "min": min(walls), "max": max(walls)},
                "round_trips_before_run_instances": max(before),
                "round_trips_total": max(total_depth),
                "aws_calls": max(calls_n),
            }
    finally:
        cloud.terminate()
        cloud.wait(timeout=10)
    report = {"delay_ms_per_call": args.delay_ms, "runs": args.runs, "launch_detach": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"launch --detach against the local cloud, {args.delay_ms} ms added per AWS call, {args.runs} runs")
    print(f"{'account':8} {'wall median':>12} {'min':>7} {'max':>7} {'seq. trips before RunInstances':>31} "
          f"{'seq. trips total':>17} {'AWS calls':>10}")
    for name, r in results.items():
        w = r["launch_wall_s"]
        print(f"{name:8} {w['median']:>11.3f}s {w['min']:>6.3f}s {w['max']:>6.3f}s "
              f"{r['round_trips_before_run_instances']:>31} {r['round_trips_total']:>17} {r['aws_calls']:>10}")


if __name__ == "__main__":
    main()

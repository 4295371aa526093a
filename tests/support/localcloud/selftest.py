#!/usr/bin/env python3
"""Self-test for localcloud.py: start it as a subprocess and exercise every feature
with boto3. No pytest; exits non-zero if any check fails.

    .venv/bin/python tests/support/localcloud/selftest.py [-v]
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
LOCALCLOUD = os.path.join(HERE, "localcloud.py")
PY = sys.executable
REGION = "us-east-1"

os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_SESSION_TOKEN="testing", AWS_DEFAULT_REGION=REGION)
os.environ.pop("AWS_PROFILE", None)

import boto3  # noqa: E402
import botocore.exceptions  # noqa: E402
import botocore.session  # noqa: E402
from botocore.config import Config  # noqa: E402

VERBOSE = "-v" in sys.argv
# botocore's "max_attempts" counts retries (max_attempts=1 still retries once);
# total_max_attempts=1 means exactly one attempt, i.e. no retries at all.
NO_RETRY = Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=5,
                  read_timeout=20)

passed = 0
failed: list[str] = []
timings: dict[str, float] = {}


def check(cond: bool, what: str, detail: object = "") -> bool:
    global passed
    if cond:
        passed += 1
        if VERBOSE:
            print(f"  ok   {what}")
    else:
        failed.append(what)
        print(f"  FAIL {what} {detail}")
    return cond


def section(name: str):
    """Decorator: run a test section; an exception fails it instead of aborting."""
    def deco(fn):
        def run(*args, **kwargs):
            print(f"- {name}")
            try:
                fn(*args, **kwargs)
            except Exception:
                check(False, f"{name}: raised", "\n" + traceback.format_exc())
        return run
    return deco


# ---------------------------------------------------------------------------
# process and control-API helpers
# ---------------------------------------------------------------------------
class Cloud:
    def __init__(self, *args: str, script: str = LOCALCLOUD, stdin_pipe: bool = True):
        self.stderr = tempfile.TemporaryFile()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [PY, script, "--port", "0", *args], stdin=subprocess.PIPE if stdin_pipe else None,
            stdout=subprocess.PIPE, stderr=self.stderr)
        line = self._readline(timeout=30)
        self.startup = time.monotonic() - t0
        if not line.startswith("LOCALCLOUD READY url="):
            raise RuntimeError(f"bad READY line {line!r}; stderr:\n{self.stderr_text()}")
        self.ready_line = line
        self.url = line.split()[2].split("=", 1)[1]

    def _readline(self, timeout: float) -> str:
        box: list[bytes] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        return box[0].decode().rstrip("\n") if box else ""

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def api(self, method: str, path: str, body: object = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=20) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def client(self, service: str, region: str = REGION, session=None):
        maker = session.client if session else boto3.client
        return maker(service, endpoint_url=self.url, region_name=region, config=NO_RETRY)

    def log(self, **filters: str) -> list[dict]:
        query = "&".join(f"{k}={v}" for k, v in filters.items())
        return self.api("GET", "/_localcloud/log" + (f"?{query}" if query else ""))[1]["calls"]

    def state(self, region: str = REGION) -> dict:
        return self.api("GET", f"/_localcloud/state?region={region}")[1]

    def reset(self) -> None:
        status, _ = self.api("POST", "/_localcloud/reset")
        assert status == 200

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -999


def error_code(exc: Exception) -> str | None:
    if isinstance(exc, botocore.exceptions.ClientError):
        return exc.response.get("Error", {}).get("Code")
    return None


def http_status(exc: Exception) -> int | None:
    if isinstance(exc, botocore.exceptions.ClientError):
        return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def expect_error(fn, *args, **kwargs) -> Exception | None:
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


def ami(region: str = REGION) -> str:
    """The AL2023 x86_64 AMI id, resolved like the CLI will (via SSM)."""
    return CLOUD.client("ssm", region).get_parameter(
        Name="/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
    )["Parameter"]["Value"]


def run_one(ec2, **extra):
    kwargs = dict(ImageId=ami(), MinCount=1, MaxCount=1, InstanceType="t3.micro")
    kwargs.update(extra)
    return ec2.run_instances(**kwargs)["Instances"][0]


# ---------------------------------------------------------------------------
# the checks
# ---------------------------------------------------------------------------
@section("startup, health and default VPCs")
def t_basics():
    status, doc = CLOUD.api("GET", "/_localcloud/health")
    check(status == 200 and doc.get("ok") is True, "health ok", doc)
    check(CLOUD.ready_line.startswith("LOCALCLOUD READY url=http://127.0.0.1:"),
          "READY line format", CLOUD.ready_line)
    for region in ("us-east-1", "eu-west-1"):
        vpcs = CLOUD.client("ec2", region).describe_vpcs(
            Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
        check(len(vpcs) == 1, f"one default VPC in {region}", vpcs)
        subnets = CLOUD.client("ec2", region).describe_subnets(
            Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
        check(len(subnets) >= 3, f"default subnets in {region}", len(subnets))
    sts = CLOUD.client("sts").get_caller_identity()
    check(sts["Account"] == "123456789012", "STS account is moto's default", sts)


@section("InsufficientInstanceCapacity, times=2, matched on InstanceType")
def t_ice():
    CLOUD.reset()
    ec2 = CLOUD.client("ec2")
    status, _ = CLOUD.api("PUT", "/_localcloud/rules", {"rules": [{
        "service": "ec2", "action": "RunInstances", "match": {"InstanceType": "t3.small"},
        "error": "InsufficientInstanceCapacity", "times": 2}]})
    check(status == 200, "PUT rules")
    # A t3.micro launch does not match the rule.
    check(run_one(ec2, InstanceType="t3.micro")["InstanceType"] == "t3.micro",
          "non-matching request passes")
    for attempt in (1, 2):
        exc = expect_error(run_one, ec2, InstanceType="t3.small")
        check(error_code(exc) == "InsufficientInstanceCapacity",
              f"attempt {attempt}: InsufficientInstanceCapacity", exc)
        check(http_status(exc) == 500, f"attempt {attempt}: HTTP 500", http_status(exc))
    inst = run_one(ec2, InstanceType="t3.small")
    check(inst["InstanceType"] == "t3.small", "third attempt succeeds")
    rules = CLOUD.api("GET", "/_localcloud/rules")[1]["rules"]
    check(rules[0]["times"] == 0 and rules[0]["hits"] == 2, "rule shows times=0, hits=2", rules)
    injected = [c["injected"] for c in CLOUD.log(action="RunInstances")]
    check(injected == [None, "error:InsufficientInstanceCapacity",
                       "error:InsufficientInstanceCapacity", None], "log marks injections",
          injected)


@section("RequestLimitExceeded every=3 (deterministic)")
def t_every():
    CLOUD.reset()
    ec2 = CLOUD.client("ec2")
    CLOUD.api("POST", "/_localcloud/rules", {"rule": {
        "action": "DescribeInstances", "error": "RequestLimitExceeded", "every": 3}})
    outcomes = []
    for _ in range(7):
        exc = expect_error(ec2.describe_instances)
        outcomes.append(error_code(exc) if exc else "ok")
        if exc:
            check(http_status(exc) == 503, "RequestLimitExceeded is HTTP 503", http_status(exc))
    check(outcomes == ["ok", "ok", "RequestLimitExceeded", "ok", "ok", "RequestLimitExceeded",
                       "ok"], "fails exactly every 3rd call", outcomes)


@section("drop closes the connection without a response")
def t_drop():
    CLOUD.reset()
    ec2 = CLOUD.client("ec2")
    CLOUD.api("POST", "/_localcloud/rules", {"rule": {
        "action": "DescribeVpcs", "drop": True, "times": 1}})
    exc = expect_error(ec2.describe_vpcs)
    check(isinstance(exc, (botocore.exceptions.ConnectionError,
                           botocore.exceptions.HTTPClientError)),
          "boto3 sees a connection error", repr(exc))
    check(len(ec2.describe_vpcs()["Vpcs"]) >= 1, "next call works")
    calls = CLOUD.log(action="DescribeVpcs")
    check([c["injected"] for c in calls] == ["drop", None], "log marks drop", calls)
    status, doc = CLOUD.api("GET", "/_localcloud/health")
    check(doc.get("internal_errors") == 0, "drop is not an internal error", doc)


@section("drop_after: moto acts, the answer is lost; ClientToken makes the retry safe")
def t_drop_after():
    CLOUD.reset()
    ec2 = CLOUD.client("ec2")
    CLOUD.api("POST", "/_localcloud/rules", {"rule": {
        "action": "RunInstances", "drop_after": True, "times": 1}})
    exc = expect_error(run_one, ec2, ClientToken="tok-1")
    check(isinstance(exc, (botocore.exceptions.ConnectionError,
                           botocore.exceptions.HTTPClientError)),
          "boto3 sees a connection error", repr(exc))
    check(len(CLOUD.state()["instances"]) == 1, "the dropped request launched the instance")
    again = run_one(ec2, ClientToken="tok-1")
    instances = CLOUD.state()["instances"]
    check(len(instances) == 1 and again["InstanceId"] == instances[0]["id"],
          "the same ClientToken answers with the same instance, launching nothing", instances)
    exc = expect_error(run_one, ec2, ClientToken="tok-1", InstanceType="t3.small")
    check(error_code(exc) == "IdempotentParameterMismatch",
          "the same token with other parameters: IdempotentParameterMismatch", repr(exc))
    run_one(ec2, ClientToken="tok-2")
    check(len(CLOUD.state()["instances"]) == 2, "another token launches another instance")
    calls = CLOUD.log(action="RunInstances")
    check(calls[0]["injected"] == "drop_after" and calls[0].get("processed_status") == 200,
          "log marks drop_after and what moto answered", calls[0])
    status, doc = CLOUD.api("POST", "/_localcloud/rules", {"rule": {
        "action": "RunInstances", "drop_after": True, "error": "InternalError"}})
    check(status == 400, "drop_after with error is refused", doc)


@section("latency: global delay_ms and per-rule delay_ms")
def t_delay():
    CLOUD.reset()
    ec2 = CLOUD.client("ec2")
    CLOUD.api("PUT", "/_localcloud/config", {"delay_ms": 300})
    t0 = time.monotonic()
    ec2.describe_regions()
    took = time.monotonic() - t0
    entry = CLOUD.log(action="DescribeRegions")[-1]
    check(entry["t_end"] - entry["t_start"] >= 0.3, "t_end - t_start >= delay",
          entry["t_end"] - entry["t_start"])
    check(took >= 0.3, "client observes the delay", took)
    CLOUD.api("PUT", "/_localcloud/config", {"delay_ms": 0})
    CLOUD.api("POST", "/_localcloud/rules", {"rule": {"action": "DescribeVpcs",
                                                      "delay_ms": 250}})
    ec2.describe_vpcs()
    ec2.describe_regions()
    vpc_entry = CLOUD.log(action="DescribeVpcs")[-1]
    reg_entry = CLOUD.log(action="DescribeRegions")[-1]
    check(vpc_entry["t_end"] - vpc_entry["t_start"] >= 0.25, "rule delay applies")
    check(reg_entry["t_end"] - reg_entry["t_start"] < 0.25, "rule delay is per action",
          reg_entry["t_end"] - reg_entry["t_start"])
    check(vpc_entry["injected"] is None, "delay-only rule injects nothing")
    # Parallel requests overlap: 6 calls x 300 ms delay must take well under 1.8 s.
    CLOUD.api("PUT", "/_localcloud/config", {"delay_ms": 300})
    errors: list[Exception] = []

    def worker():
        try:
            CLOUD.client("ec2").describe_instances()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    check(not errors, "parallel requests all succeed", errors)
    check(took < 1.5, "delays overlap for parallel requests", took)
    CLOUD.api("PUT", "/_localcloud/config", {"delay_ms": 0})


@section("call log: order, service, region, params, JSON bodies")
def t_log():
    CLOUD.reset()
    ec2 = CLOUD.client("ec2")
    CLOUD.api("DELETE", "/_localcloud/log")
    sg = ec2.create_security_group(GroupName="log-test", Description="for the log")["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[{
        "IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
        "IpRanges": [{"CidrIp": "203.0.113.7/32", "Description": "ssh from me"}]}])
    ec2.describe_security_groups(GroupIds=[sg])
    CLOUD.client("ssm").get_parameter(
        Name="/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64")
    calls = CLOUD.log()
    check([c["action"] for c in calls] == ["CreateSecurityGroup",
                                           "AuthorizeSecurityGroupIngress",
                                           "DescribeSecurityGroups", "GetParameter"],
          "actions in order", [c["action"] for c in calls])
    check([c["seq"] for c in calls] == sorted(c["seq"] for c in calls), "seq increases")
    check(calls[0]["service"] == "ec2" and calls[0]["region"] == REGION, "service/region")
    check(calls[0]["params"].get("GroupName") == "log-test", "query params flattened",
          calls[0]["params"])
    check(calls[1]["params"].get("IpPermissions.1.IpRanges.1.CidrIp") == "203.0.113.7/32",
          "nested params flattened", calls[1]["params"])
    check(calls[3]["service"] == "ssm" and calls[3]["json"]["Name"].endswith("x86_64"),
          "JSON body logged", calls[3])
    check(all(c["status"] == 200 for c in calls), "statuses recorded")
    check(len(CLOUD.log(action="GetParameter")) == 1, "log filter by action")


@section("spot prices: seeded per AZ, filters, overrides, regions")
def t_spot_prices():
    CLOUD.reset()
    ec2 = CLOUD.client("ec2")
    hist = ec2.describe_spot_price_history(
        InstanceTypes=["t3.small"], ProductDescriptions=["Linux/UNIX"])["SpotPriceHistory"]
    prices = {h["AvailabilityZone"]: float(h["SpotPrice"]) for h in hist}
    check(len(prices) == len(hist) >= 4, "one newest price per AZ", hist)
    check(len(set(prices.values())) == len(prices), "AZ prices differ", prices)
    check(min(prices, key=prices.get) == "us-east-1c", "cheapest t3.small is us-east-1c", prices)
    check("us-east-1e" not in prices, "us-east-1e offers no t3.small (as in moto's offerings)")
    check(all(0.004 < p < 0.0208 for p in prices.values()), "prices below on-demand", prices)
    check(all(h["InstanceType"] == "t3.small" and h["ProductDescription"] == "Linux/UNIX"
              and h["Timestamp"].year >= 2026 for h in hist), "fields and timestamp")
    one = ec2.describe_spot_price_history(InstanceTypes=["t3.small", "t4g.small"],
                                          AvailabilityZone="us-east-1b",
                                          ProductDescriptions=["Linux/UNIX"])["SpotPriceHistory"]
    check(sorted((h["InstanceType"], h["AvailabilityZone"]) for h in one) ==
          [("t3.small", "us-east-1b"), ("t4g.small", "us-east-1b")], "AZ + types filter", one)
    filt = ec2.describe_spot_price_history(Filters=[
        {"Name": "availability-zone", "Values": ["us-east-1a"]},
        {"Name": "instance-type", "Values": ["t3*"]},
        {"Name": "product-description", "Values": ["Linux/UNIX (Amazon VPC)"]}])["SpotPriceHistory"]
    check(len(filt) == 6 and all(h["AvailabilityZone"] == "us-east-1a" for h in filt),
          "Filter.N with wildcard", len(filt))
    pager = ec2.get_paginator("describe_spot_price_history")
    paged = [h for page in pager.paginate(PaginationConfig={"PageSize": 7})
             for h in page["SpotPriceHistory"]]
    everything = ec2.describe_spot_price_history()["SpotPriceHistory"]
    check(len(paged) == len(everything) > 7, "MaxResults/NextToken pagination",
          (len(paged), len(everything)))
    # override
    CLOUD.api("PUT", "/_localcloud/config", {"spot_prices": {
        "us-east-1": {"us-east-1a": {"t3.small": 0.0031}, "us-east-1b": {"t3.small": None}}}})
    hist = ec2.describe_spot_price_history(
        InstanceTypes=["t3.small"], ProductDescriptions=["Linux/UNIX"])["SpotPriceHistory"]
    prices2 = {h["AvailabilityZone"]: float(h["SpotPrice"]) for h in hist}
    check(prices2.get("us-east-1a") == 0.0031, "override applies", prices2)
    check("us-east-1b" not in prices2, "null override removes the offer", prices2)
    check(prices2.get("us-east-1c") == prices["us-east-1c"], "other AZs unchanged")
    status, table = CLOUD.api("GET", "/_localcloud/spot-prices?region=us-east-1")
    check(table["prices"]["us-east-1a"]["t3.small"] == 0.0031, "GET spot-prices shows override")
    for region in ("us-east-2", "us-west-2", "eu-west-1", "eu-central-1"):
        hist = CLOUD.client("ec2", region).describe_spot_price_history(
            InstanceTypes=["t3.small"], ProductDescriptions=["Linux/UNIX"])["SpotPriceHistory"]
        azs = {h["AvailabilityZone"]: float(h["SpotPrice"]) for h in hist}
        check(len(azs) >= 3 and len(set(azs.values())) == len(azs)
              and min(azs, key=azs.get) == f"{region}c", f"prices in {region}", azs)


@section("pending_seconds: pending, then running")
def t_pending():
    CLOUD.reset()
    ec2 = CLOUD.client("ec2")
    CLOUD.api("PUT", "/_localcloud/config", {"pending_seconds": 1.0})
    inst = run_one(ec2)
    check(inst["State"]["Name"] == "pending", "RunInstances says pending", inst["State"])
    state = ec2.describe_instances(InstanceIds=[inst["InstanceId"]])[
        "Reservations"][0]["Instances"][0]["State"]
    check(state == {"Code": 0, "Name": "pending"}, "DescribeInstances says pending", state)
    time.sleep(1.4)
    state = ec2.describe_instances(InstanceIds=[inst["InstanceId"]])[
        "Reservations"][0]["Instances"][0]["State"]
    check(state == {"Code": 16, "Name": "running"}, "running after pending_seconds", state)
    waiter_inst = run_one(ec2)
    t0 = time.monotonic()
    ec2.get_waiter("instance_running").wait(InstanceIds=[waiter_inst["InstanceId"]],
                                            WaiterConfig={"Delay": 1, "MaxAttempts": 10})
    check(time.monotonic() - t0 >= 0.5, "instance_running waiter had to wait")
    # Terminated while pending: stays terminated.
    CLOUD.api("PUT", "/_localcloud/config", {"pending_seconds": 0.5})
    doomed = run_one(ec2)
    ec2.terminate_instances(InstanceIds=[doomed["InstanceId"]])
    time.sleep(0.8)
    state = ec2.describe_instances(InstanceIds=[doomed["InstanceId"]])[
        "Reservations"][0]["Instances"][0]["State"]["Name"]
    check(state == "terminated", "terminate during pending sticks", state)
    CLOUD.api("PUT", "/_localcloud/config", {"pending_seconds": 0})
    inst = run_one(ec2)
    state = ec2.describe_instances(InstanceIds=[inst["InstanceId"]])[
        "Reservations"][0]["Instances"][0]["State"]["Name"]
    check(state == "running", "pending_seconds=0 keeps moto's instant running", state)


@section("DeleteSecurityGroup in use -> DependencyViolation")
def t_sg_dependency():
    CLOUD.reset()
    ec2 = CLOUD.client("ec2")
    sg = ec2.create_security_group(GroupName="in-use", Description="d")["GroupId"]
    inst = run_one(ec2, SecurityGroupIds=[sg])
    exc = expect_error(ec2.delete_security_group, GroupId=sg)
    check(error_code(exc) == "DependencyViolation" and http_status(exc) == 400,
          "DependencyViolation 400", exc)
    ec2.terminate_instances(InstanceIds=[inst["InstanceId"]])
    ec2.delete_security_group(GroupId=sg)
    groups = [g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]]
    check(sg not in groups, "deletable after the instance terminated")


@section("security group rules: every rule answered; terminating twice (section 6 fixes)")
def t_sg_rules_and_terminate_twice():
    CLOUD.reset()
    ec2 = CLOUD.client("ec2")
    sg = ec2.create_security_group(GroupName="two-rules", Description="d")["GroupId"]
    perms = [{"IpProtocol": "tcp", "FromPort": p, "ToPort": p, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}
             for p in (22, 2022)]
    made = ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=perms)["SecurityGroupRules"]
    check(sorted(r["FromPort"] for r in made) == [22, 2022], "ingress: a rule per permission answered", made)
    made = ec2.authorize_security_group_egress(GroupId=sg, IpPermissions=perms)["SecurityGroupRules"]
    check(sorted(r["FromPort"] for r in made) == [22, 2022], "egress: a rule per permission answered", made)
    subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
    inst = run_one(ec2, NetworkInterfaces=[{"DeviceIndex": 0, "SubnetId": subnet, "Groups": [sg],
                                            "AssociatePublicIpAddress": False}])
    ec2.terminate_instances(InstanceIds=[inst["InstanceId"]])
    try:
        again = ec2.terminate_instances(InstanceIds=[inst["InstanceId"]])["TerminatingInstances"][0]
        # (moto's answer always says CurrentState shutting-down; AWS would say terminated.)
        check(again["PreviousState"]["Name"] == "terminated",
              "terminating a terminated instance answers its state", again)
    except Exception as exc:  # noqa: BLE001
        check(False, "terminating a terminated instance answers its state", exc)


@section("spot requests: unknown ids, RunInstances spot, cancel, max price")
def t_spot_requests():
    CLOUD.reset()
    ec2 = CLOUD.client("ec2")
    for fn in (ec2.describe_spot_instance_requests, ec2.cancel_spot_instance_requests):
        exc = expect_error(fn, SpotInstanceRequestIds=["sir-12345678"])
        check(error_code(exc) == "InvalidSpotInstanceRequestID.NotFound"
              and http_status(exc) == 400, f"{fn.__name__}: NotFound 400", exc)
    inst = run_one(ec2, InstanceType="t3.small", Placement={"AvailabilityZone": "us-east-1c"},
                   InstanceMarketOptions={"MarketType": "spot", "SpotOptions": {
                       "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate",
                       "MaxPrice": "0.0100"}},
                   TagSpecifications=[{"ResourceType": "spot-instances-request",
                                       "Tags": [{"Key": "purpose", "Value": "selftest"}]}])
    sir = inst.get("SpotInstanceRequestId")
    check(bool(sir and sir.startswith("sir-")), "RunInstances response has SpotInstanceRequestId",
          inst)
    check(inst.get("InstanceLifecycle") == "spot", "InstanceLifecycle spot")
    described = ec2.describe_instances(InstanceIds=[inst["InstanceId"]])[
        "Reservations"][0]["Instances"][0]
    check(described.get("SpotInstanceRequestId") == sir, "DescribeInstances has it too")
    reqs = ec2.describe_spot_instance_requests(SpotInstanceRequestIds=[sir])[
        "SpotInstanceRequests"]
    check(len(reqs) == 1 and reqs[0]["State"] == "active"
          and reqs[0]["InstanceId"] == inst["InstanceId"]
          and reqs[0]["Status"]["Code"] == "fulfilled", "spot request active/fulfilled", reqs)
    check({t["Key"]: t["Value"] for t in reqs[0].get("Tags", [])} == {"purpose": "selftest"},
          "spot request tags", reqs[0].get("Tags"))
    check(len(ec2.describe_instances()["Reservations"]) == 1, "no extra instance launched")
    cancelled = ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=[sir])[
        "CancelledSpotInstanceRequests"]
    check(cancelled == [{"SpotInstanceRequestId": sir, "State": "cancelled"}], "cancel", cancelled)
    reqs = ec2.describe_spot_instance_requests(SpotInstanceRequestIds=[sir])[
        "SpotInstanceRequests"]
    check(reqs[0]["State"] == "cancelled"
          and reqs[0]["Status"]["Code"] == "request-canceled-and-instance-running",
          "cancelled request is still described", reqs[0])
    # one-time request closes when its instance terminates
    inst2 = run_one(ec2, InstanceMarketOptions={"MarketType": "spot"})
    ec2.terminate_instances(InstanceIds=[inst2["InstanceId"]])
    req2 = ec2.describe_spot_instance_requests(
        SpotInstanceRequestIds=[inst2["SpotInstanceRequestId"]])["SpotInstanceRequests"][0]
    check(req2["State"] == "closed" and req2["Status"]["Code"] == "instance-terminated-by-user",
          "one-time request closed on terminate", req2)
    exc = expect_error(run_one, ec2, InstanceType="t3.small",
                       Placement={"AvailabilityZone": "us-east-1a"},
                       InstanceMarketOptions={"MarketType": "spot",
                                              "SpotOptions": {"MaxPrice": "0.001"}})
    check(error_code(exc) == "SpotMaxPriceTooLow", "MaxPrice below spot price", exc)
    # RequestSpotInstances: moto's own path, plus the instance's SpotInstanceRequestId
    out = ec2.request_spot_instances(InstanceCount=1, LaunchSpecification={
        "ImageId": ami(), "InstanceType": "t3.micro"})["SpotInstanceRequests"][0]
    inst3 = ec2.describe_instances(InstanceIds=[out["InstanceId"]])[
        "Reservations"][0]["Instances"][0]
    check(inst3.get("SpotInstanceRequestId") == out["SpotInstanceRequestId"],
          "RequestSpotInstances instance knows its request")


@section("SSM public parameters resolve to AMIs DescribeImages knows")
def t_ssm_amis():
    CLOUD.reset()
    names = {
        "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id":
            ("x86_64", "099720109477", "ubuntu-noble-24.04-amd64"),
        "/aws/service/canonical/ubuntu/server/24.04/stable/current/arm64/hvm/ebs-gp3/ami-id":
            ("arm64", "099720109477", "ubuntu-noble-24.04-arm64"),
        "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64":
            ("x86_64", None, "al2023"),
        "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64":
            ("arm64", None, "al2023"),
    }
    seen_ids = {}
    for region in ("us-east-1", "eu-west-1", "eu-central-1"):
        ssm, ec2 = CLOUD.client("ssm", region), CLOUD.client("ec2", region)
        for name, (arch, owner, fragment) in names.items():
            param = ssm.get_parameter(Name=name)["Parameter"]
            images = ec2.describe_images(ImageIds=[param["Value"]])["Images"]
            ok = (len(images) == 1 and images[0]["Architecture"] == arch
                  and fragment in images[0]["Name"]
                  and (owner is None or images[0]["OwnerId"] == owner))
            check(ok, f"{region} {name.split('/')[-1] if 'amazon' in name else name.split('/')[-5]}"
                  f" -> {param['Value']}", images)
            seen_ids[(region, name)] = param["Value"]
        ubuntu = ec2.describe_images(Owners=["099720109477"], Filters=[
            {"Name": "name", "Values": ["ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-*"]}])["Images"]
        check(len(ubuntu) == 2, f"{region}: Ubuntu noble found by owner+name filter", len(ubuntu))
    ubuntu_amd = "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
    check(seen_ids[("us-east-1", ubuntu_amd)] != seen_ids[("eu-west-1", ubuntu_amd)],
          "AMI ids differ per region")
    by_path = CLOUD.client("ssm").get_parameters_by_path(
        Path="/aws/service/canonical/ubuntu/server/24.04/stable/current", Recursive=True)
    check(len(by_path["Parameters"]) == 2, "GetParametersByPath finds both Ubuntu params")
    inst = run_one(CLOUD.client("ec2"), ImageId=seen_ids[("us-east-1", ubuntu_amd)])
    check(inst["ImageId"] == seen_ids[("us-east-1", ubuntu_amd)], "can launch the Ubuntu AMI")
    exc = expect_error(run_one, CLOUD.client("ec2"), ImageId="ami-0000000000000dead")
    check(error_code(exc) == "InvalidAMIID.NotFound", "unknown AMI is rejected (validation on)", exc)


@section("JSON and query protocol errors parse in boto3")
def t_protocol_errors():
    CLOUD.reset()
    CLOUD.api("PUT", "/_localcloud/rules", {"rules": [
        {"service": "ssm", "action": "GetParameter", "match": {"Name": "/x/throttle"},
         "error": "ThrottlingException", "message": "Rate exceeded"},
        {"service": "ssm", "action": "GetParameter", "error": "InternalServerError",
         "status": 500, "times": 1},
        {"service": "iam", "action": "GetRole", "error": "NoSuchEntity",
         "message": "The role with name x cannot be found.", "status": 404},
        {"service": "sts", "action": "GetCallerIdentity", "error": "ExpiredToken"},
        {"service": "cloudwatch", "action": "PutMetricAlarm", "error": "LimitExceeded",
         "times": 2},
    ]})
    ssm = CLOUD.client("ssm")
    exc = expect_error(ssm.get_parameter, Name="/x/throttle")
    check(error_code(exc) == "ThrottlingException" and http_status(exc) == 400
          and "Rate exceeded" in str(exc), "SSM JSON error (matched on JSON field)", exc)
    exc = expect_error(ssm.get_parameter, Name="/x/other")
    check(error_code(exc) == "InternalServerError" and http_status(exc) == 500,
          "SSM JSON 500 error", exc)
    exc = expect_error(ssm.get_parameter, Name="/x/other")
    check(error_code(exc) == "ParameterNotFound", "moto answers once the rule is used up", exc)
    exc = expect_error(CLOUD.client("iam").get_role, RoleName="x")
    check(error_code(exc) == "NoSuchEntity" and http_status(exc) == 404, "IAM query error", exc)
    exc = expect_error(CLOUD.client("sts").get_caller_identity)
    check(error_code(exc) == "ExpiredToken", "STS query error", exc)
    alarm = dict(AlarmName="a", MetricName="m", Namespace="n", Statistic="Average", Period=60,
                 EvaluationPeriods=1, Threshold=1.0, ComparisonOperator="GreaterThanThreshold")
    exc = expect_error(CLOUD.client("cloudwatch").put_metric_alarm, **alarm)
    check(error_code(exc) == "LimitExceeded", "CloudWatch JSON-protocol error", exc)
    exc = expect_error(cloudwatch_query_client().put_metric_alarm, **alarm)
    check(error_code(exc) == "LimitExceeded", "CloudWatch awsQuery error", exc)


_QUERY_SESSION = None


def cloudwatch_query_client():
    """A boto3 CloudWatch client forced onto the awsQuery protocol, which is what the
    Rust CLI's pinned aws-sdk-cloudwatch speaks (boto3 would pick JSON)."""
    global _QUERY_SESSION
    if _QUERY_SESSION is None:
        base = botocore.session.get_session()
        model = copy.deepcopy(base.get_component("data_loader").load_service_model(
            "cloudwatch", "service-2"))
        model["metadata"]["protocol"] = "query"
        model["metadata"]["protocols"] = ["query"]
        tmp = tempfile.mkdtemp(prefix="cwquery-")
        version = model["metadata"]["apiVersion"]
        os.makedirs(os.path.join(tmp, "cloudwatch", version))
        with open(os.path.join(tmp, "cloudwatch", version, "service-2.json"), "w") as f:
            json.dump(model, f)
        session = botocore.session.get_session()
        session.get_component("data_loader").search_paths.insert(0, tmp)
        _QUERY_SESSION = boto3.Session(botocore_session=session)
    return CLOUD.client("cloudwatch", session=_QUERY_SESSION)


@section("state dump: instances, volumes, SGs, alarms, metrics, logs, IAM, SSM")
def t_state():
    CLOUD.reset()
    ec2, iam = CLOUD.client("ec2"), CLOUD.client("iam")
    iam.create_role(RoleName="box-role", AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                "Principal": {"Service": "ec2.amazonaws.com"}}]}))
    iam.put_role_policy(RoleName="box-role", PolicyName="logs", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "logs:*",
                                                "Resource": "*"}]}))
    iam.attach_role_policy(RoleName="box-role",
                           PolicyArn="arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore")
    iam.create_instance_profile(InstanceProfileName="box-profile")
    iam.add_role_to_instance_profile(InstanceProfileName="box-profile", RoleName="box-role")
    sg = ec2.create_security_group(GroupName="box", Description="box",
                                   TagSpecifications=[{"ResourceType": "security-group",
                                                       "Tags": [{"Key": "k", "Value": "v"}]}])
    ec2.authorize_security_group_ingress(GroupId=sg["GroupId"], IpPermissions=[{
        "IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
        "IpRanges": [{"CidrIp": "198.51.100.9/32", "Description": "ssh"}]}])
    user_data = "#cloud-config\nruncmd:\n  - echo hello\n"
    inst = run_one(
        ec2, InstanceType="t3.small", SecurityGroupIds=[sg["GroupId"]], UserData=user_data,
        IamInstanceProfile={"Name": "box-profile"},
        InstanceInitiatedShutdownBehavior="terminate",
        MetadataOptions={"HttpTokens": "required", "HttpPutResponseHopLimit": 1,
                         "HttpEndpoint": "enabled"},
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {
            "VolumeSize": 20, "VolumeType": "gp3", "Encrypted": True,
            "DeleteOnTermination": True}}],
        InstanceMarketOptions={"MarketType": "spot", "SpotOptions": {
            "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}},
        TagSpecifications=[{"ResourceType": "instance", "Tags": [
            {"Key": "Name", "Value": "box-1"}, {"Key": "ephemeral-admin", "Value": "true"}]},
            {"ResourceType": "volume", "Tags": [{"Key": "ephemeral-admin", "Value": "true"}]}])
    gz_inst = run_one(ec2, UserData=gzip.compress(b"#!/bin/sh\necho gz\n"))
    cw = CLOUD.client("cloudwatch")
    cw.put_metric_alarm(AlarmName="box-1-idle", Namespace="AWS/EC2", MetricName="CPUUtilization",
                        Dimensions=[{"Name": "InstanceId", "Value": inst["InstanceId"]}],
                        Statistic="Average", Period=300, EvaluationPeriods=6, Threshold=2.0,
                        ComparisonOperator="LessThanThreshold", TreatMissingData="breaching",
                        AlarmActions=[f"arn:aws:automate:{REGION}:ec2:terminate"])
    cw.put_metric_data(Namespace="EphemeralAdmin", MetricData=[{
        "MetricName": "Heartbeat", "Value": 1.0, "Unit": "Count",
        "Dimensions": [{"Name": "InstanceId", "Value": inst["InstanceId"]}]}])
    cwq = cloudwatch_query_client()
    cwq.put_metric_alarm(AlarmName="via-query", Namespace="AWS/EC2", MetricName="CPUUtilization",
                         Statistic="Maximum", Period=60, EvaluationPeriods=1, Threshold=90.0,
                         ComparisonOperator="GreaterThanThreshold")
    cwq.put_metric_data(Namespace="EphemeralAdmin", MetricData=[{
        "MetricName": "QueryBeat", "Value": 7.0}])
    cw.put_dashboard(DashboardName="boxes", DashboardBody=json.dumps({"widgets": []}))
    logs = CLOUD.client("logs")
    logs.create_log_group(logGroupName="/ephemeral-admin/box-1")
    logs.put_retention_policy(logGroupName="/ephemeral-admin/box-1", retentionInDays=7)
    logs.create_log_stream(logGroupName="/ephemeral-admin/box-1", logStreamName="boot")
    logs.put_log_events(logGroupName="/ephemeral-admin/box-1", logStreamName="boot",
                        logEvents=[{"timestamp": int(time.time() * 1000), "message": "booted"}])
    CLOUD.client("ssm").put_parameter(Name="/ephemeral-admin/test", Value="v", Type="String")

    state = CLOUD.state()
    by_id = {i["id"]: i for i in state["instances"]}
    i = by_id.get(inst["InstanceId"], {})
    check(i.get("tags") == {"Name": "box-1", "ephemeral-admin": "true"}, "instance tags",
          i.get("tags"))
    check(i.get("user_data") == user_data, "user_data decoded", i.get("user_data"))
    check(by_id.get(gz_inst["InstanceId"], {}).get("user_data") == "#!/bin/sh\necho gz\n",
          "gzip user_data decoded")
    check(i.get("instance_type") == "t3.small" and i.get("az", "").startswith(REGION)
          and i.get("subnet_id") and i.get("vpc_id") == state["default_vpc_id"],
          "type/az/subnet/vpc", i)
    check(i.get("lifecycle") == "spot" and i.get("market") == "spot"
          and (i.get("spot_instance_request_id") or "").startswith("sir-"), "spot fields")
    check(i.get("instance_initiated_shutdown_behavior") == "terminate", "shutdown behaviour")
    check((i.get("metadata_options") or {}).get("http_tokens") == "required"
          and i["metadata_options"].get("http_put_response_hop_limit") == 1, "metadata options",
          i.get("metadata_options"))
    check((i.get("iam_instance_profile") or {}).get("name") == "box-profile", "instance profile",
          i.get("iam_instance_profile"))
    bdm = {b["device_name"]: b for b in i.get("block_device_mappings", [])}
    root = bdm.get("/dev/xvda", {})
    check(root.get("size") == 20 and root.get("volume_type") == "gp3" and root.get("encrypted")
          and root.get("delete_on_termination") and root.get("volume_id", "").startswith("vol-"),
          "root volume", bdm)
    check(root.get("tags") == {"ephemeral-admin": "true"}, "volume tags", root.get("tags"))
    check(i.get("security_group_ids") == [sg["GroupId"]], "security groups",
          i.get("security_group_ids"))
    check(bool(i.get("public_ip")) and bool(i.get("private_ip")) and bool(i.get("launch_time")),
          "ips and launch time")
    octets = [int(x) for x in str(i.get("public_ip")).split(".")] if i.get("public_ip") else []
    check(len(octets) == 4 and octets[0] == 127 and octets[1] >= 16,
          "the public IP is a loopback address outside 127.0.0.0/12", i.get("public_ip"))
    check((i.get("launch_request") or {}).get(
        "InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior") == "terminate",
        "launch_request keeps what moto drops")
    vols = {v["id"]: v for v in state["volumes"]}
    check(vols.get(root.get("volume_id"), {}).get("attached_instance") == inst["InstanceId"],
          "volume attachment")
    groups = {g["id"]: g for g in state["security_groups"]}
    g = groups.get(sg["GroupId"], {})
    ingress = g.get("ingress", [])
    check(g.get("tags") == {"k": "v"} and len(ingress) == 1
          and ingress[0]["cidr_ipv4"] == "198.51.100.9/32" and ingress[0]["from_port"] == 22
          and ingress[0]["description"] == "ssh" and ingress[0]["protocol"] == "tcp"
          and ingress[0]["security_group_rule_id"].startswith("sgr-"), "SG ingress rule", g)
    check(any(r["id"] == i.get("spot_instance_request_id") for r in state["spot_requests"]),
          "spot request in dump")
    alarms = {a["name"]: a for a in state["alarms"]}
    a = alarms.get("box-1-idle", {})
    check(a.get("metric_name") == "CPUUtilization" and a.get("namespace") == "AWS/EC2"
          and a.get("dimensions") == {"InstanceId": inst["InstanceId"]}
          and a.get("threshold") == 2.0 and a.get("evaluation_periods") == 6
          and a.get("period") == 300 and a.get("statistic") == "Average"
          and a.get("comparison_operator") == "LessThanThreshold"
          and a.get("treat_missing_data") == "breaching"
          and a.get("alarm_actions") == [f"arn:aws:automate:{REGION}:ec2:terminate"],
          "alarm via PutMetricAlarm (JSON protocol)", a)
    check(alarms.get("via-query", {}).get("statistic") == "Maximum",
          "alarm via PutMetricAlarm (awsQuery)", alarms.get("via-query"))
    metrics = {m["name"]: m for m in state["metrics"]}
    m = metrics.get("Heartbeat", {})
    check(m.get("namespace") == "EphemeralAdmin" and float(m.get("value")) == 1.0
          and m.get("dimensions") == {"InstanceId": inst["InstanceId"]} and m.get("timestamp"),
          "custom metric via PutMetricData", m)
    check(float(metrics.get("QueryBeat", {}).get("value", 0)) == 7.0, "metric via awsQuery")
    check(state["dashboards"] == [{"name": "boxes", "body": json.dumps({"widgets": []}),
                                   "body_json": {"widgets": []}}], "dashboard",
          state["dashboards"])
    lg = {x["name"]: x for x in state["log_groups"]}.get("/ephemeral-admin/box-1", {})
    check(lg.get("retention_in_days") == 7
          and lg.get("streams", [{}])[0].get("events", [{}])[0].get("message") == "booted",
          "log group, retention, events", lg)
    roles = {r["name"]: r for r in state["iam"]["roles"]}
    r = roles.get("box-role", {})
    check(r.get("assume_role_policy_document", {}).get("Statement", [{}])[0].get("Principal")
          == {"Service": "ec2.amazonaws.com"}, "role trust policy", r)
    check("logs" in r.get("inline_policies", {}) and
          r["inline_policies"]["logs"]["Statement"][0]["Action"] == "logs:*", "inline policy")
    check(r.get("attached_policies") == ["arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"],
          "attached policy", r.get("attached_policies"))
    profiles = {p["name"]: p for p in state["iam"]["instance_profiles"]}
    check(profiles.get("box-profile", {}).get("roles") == ["box-role"], "instance profile roles")
    check([p["name"] for p in state["ssm_parameters"]] == ["/ephemeral-admin/test"],
          "SSM parameters (own, not public)", state["ssm_parameters"])
    check(len(state["ssm_public_parameters"]) == 4, "public SSM parameters listed")
    eu = CLOUD.state("eu-west-1")
    check(eu["instances"] == [] and eu["region"] == "eu-west-1"
          and eu["iam"]["roles"] == state["iam"]["roles"], "other region; IAM is global")
    status, health = CLOUD.api("GET", "/_localcloud/health")
    check(health.get("internal_errors") == 0, "no internal errors so far", CLOUD.stderr_text())


ENFORCED_POLICY = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": ["ec2:Describe*", "ssm:GetParameter", "iam:CreateRole",
                                   "logs:CreateLogGroup", "access-analyzer:ValidatePolicy"],
     "Resource": "*"},
    {"Effect": "Allow", "Action": "ec2:RunInstances",
     "Resource": ["arn:aws:ec2:*::image/*", "arn:aws:ec2:*:*:subnet/*",
                  "arn:aws:ec2:*:*:network-interface/*", "arn:aws:ec2:*:*:security-group/*"]},
    {"Effect": "Allow", "Action": ["ec2:RunInstances", "ec2:CreateTags"],
     "Resource": ["arn:aws:ec2:*:*:instance/*", "arn:aws:ec2:*:*:volume/*"],
     "Condition": {"StringEquals": {"aws:RequestTag/Project": "EphemeralContainer"}}},
    {"Effect": "Allow", "Action": "ec2:TerminateInstances", "Resource": "*",
     "Condition": {"StringEquals": {"ec2:ResourceTag/Project": "EphemeralContainer"}}}]}


@section("IAM enforcement: the loaded policy, AWS-shaped denials, admin keys, simulate")
def t_enforcement():
    CLOUD.reset()
    status, _ = CLOUD.api("PUT", "/_localcloud/policy", {"policy": ENFORCED_POLICY})
    check(status == 200, "load a policy")
    ec2 = CLOUD.client("ec2")
    tags = [{"ResourceType": t, "Tags": [{"Key": "Project", "Value": "EphemeralContainer"}]}
            for t in ("instance", "volume")]
    inst = run_one(ec2, TagSpecifications=tags)
    check(inst["InstanceId"].startswith("i-"), "RunInstances with the required tags is allowed")
    exc = expect_error(run_one, ec2)
    check(error_code(exc) == "UnauthorizedOperation" and http_status(exc) == 403,
          "RunInstances without tags: UnauthorizedOperation 403", exc)
    message = exc.response["Error"]["Message"] if exc else ""
    check(message.startswith("You are not authorized to perform this operation. User: "
                             "arn:aws:iam::123456789012:user/moto is not authorized to perform: "
                             "ec2:RunInstances on resource: arn:aws:ec2:us-east-1:123456789012:instance/*")
          and "Encoded authorization failure message: " in message, "EC2 denial message", message)
    exc = expect_error(ec2.terminate_instances, InstanceIds=[inst["InstanceId"]], DryRun=True)
    check(error_code(exc) == "DryRunOperation", "a dry run of an allowed call: DryRunOperation", exc)
    admin = boto3.client("ec2", endpoint_url=CLOUD.url, region_name=REGION, config=NO_RETRY,
                         aws_access_key_id="other", aws_secret_access_key="other")
    admin.create_tags(Resources=[inst["InstanceId"]], Tags=[{"Key": "Project", "Value": "x"}])
    check(True, "other access keys are not enforced (the tests' administrator)")
    exc = expect_error(ec2.terminate_instances, InstanceIds=[inst["InstanceId"]])
    check(error_code(exc) == "UnauthorizedOperation", "a resource tag condition bites after a retag", exc)
    exc = expect_error(CLOUD.client("iam").create_role, RoleName="r", AssumeRolePolicyDocument="{}",
                       Tags=[{"Key": "Project", "Value": "EphemeralContainer"}])
    check(error_code(exc) == "AccessDenied" and http_status(exc) == 403 and "iam:TagRole" in str(exc),
          "IAM: CreateRole with tags needs iam:TagRole (AccessDenied 403)", exc)
    exc = expect_error(CLOUD.client("logs").create_log_group, logGroupName="/g", tags={"a": "b"})
    check(error_code(exc) == "AccessDeniedException" and http_status(exc) == 403 and
          "logs:TagResource" in str(exc), "Logs: AccessDeniedException, names logs:TagResource", exc)
    exc = expect_error(CLOUD.client("cloudwatch").delete_alarms, AlarmNames=["x"])
    check(error_code(exc) == "AccessDenied" and http_status(exc) == 403,
          "CloudWatch (JSON, query-compatible): AccessDenied", exc)
    check(CLOUD.client("sts").get_caller_identity()["Account"] == "123456789012",
          "GetCallerIdentity needs no permission")
    denials = CLOUD.api("GET", "/_localcloud/policy")[1]["denials"]
    check([d["action"] for d in denials] == ["ec2:RunInstances", "ec2:TerminateInstances", "iam:TagRole",
                                             "logs:TagResource", "cloudwatch:DeleteAlarms"],
          "denials are listed in order", denials)
    log = [c for c in CLOUD.log(action="TerminateInstances") if c.get("denied")]
    check(len(log) == 1 and log[0]["status"] == 403, "the call log marks the denied call", log)
    status, sim = CLOUD.api("POST", "/_localcloud/policy/simulate", {
        "service": "ec2", "action": "TerminateInstances", "params": {"InstanceId.1": inst["InstanceId"]}})
    check(status == 200 and sim["allowed"] is False and sim["checks"][0]["resource"].endswith(inst["InstanceId"]),
          "simulate maps a call like enforcement does", sim)
    # Access Analyzer ValidatePolicy (moto lacks it: a documented minimal validator).
    aa = CLOUD.client("accessanalyzer")
    clean = aa.validate_policy(policyDocument=json.dumps(ENFORCED_POLICY), policyType="IDENTITY_POLICY")
    check(clean["findings"] == [], "ValidatePolicy: a sound policy has no findings", clean["findings"])
    bad = {"Statement": [{"Effect": "Allow", "Action": ["iam:PassRole", "nosuch"], "Resource": "*",
                          "Condition": {"StringEqualz": {"a": "b"}}}]}
    found = aa.validate_policy(policyDocument=json.dumps(bad), policyType="IDENTITY_POLICY")["findings"]
    codes = sorted(f["issueCode"] for f in found)
    check(codes == ["INVALID_ACTION", "INVALID_OPERATOR", "MISSING_VERSION", "PASS_ROLE_WITH_STAR_IN_RESOURCE"],
          "ValidatePolicy: findings for a bad policy", codes)
    CLOUD.api("DELETE", "/_localcloud/policy")
    check(error_code(expect_error(run_one, ec2)) is None, "DELETE turns enforcement off")


@section("control API validation and errors")
def t_control():
    status, doc = CLOUD.api("PUT", "/_localcloud/rules", {"rules": [{"acton": "X"}]})
    check(status == 400 and "acton" in doc.get("error", ""), "typo in a rule is rejected", doc)
    status, doc = CLOUD.api("PUT", "/_localcloud/config", {"delay": 1})
    check(status == 400, "unknown config key rejected", doc)
    status, doc = CLOUD.api("GET", "/_localcloud/nope")
    check(status == 404, "unknown route is 404", doc)
    status, doc = CLOUD.api("GET", "/_localcloud/config")
    check(status == 200 and "delay_ms" in doc, "GET config", doc)
    CLOUD.api("PUT", "/_localcloud/rules", {"rules": [{"action": "DescribeVpcs", "error": "X1"}]})
    CLOUD.api("DELETE", "/_localcloud/rules")
    check(CLOUD.api("GET", "/_localcloud/rules")[1]["rules"] == [], "DELETE rules")
    CLOUD.client("ec2").describe_vpcs()
    n = len(CLOUD.log())
    CLOUD.api("GET", "/_localcloud/health")
    check(len(CLOUD.log()) == n, "control calls are not logged")
    CLOUD.api("DELETE", "/_localcloud/log")
    check(CLOUD.log() == [], "DELETE log")


@section("reset clears everything, quickly")
def t_reset():
    ec2 = CLOUD.client("ec2")
    run_one(ec2)
    CLOUD.client("iam").create_role(RoleName="r", AssumeRolePolicyDocument="{}")
    CLOUD.client("cloudwatch").put_metric_alarm(
        AlarmName="x", MetricName="m", Namespace="n", Statistic="Average", Period=60,
        EvaluationPeriods=1, Threshold=1.0, ComparisonOperator="GreaterThanThreshold")
    CLOUD.api("POST", "/_localcloud/rules", {"rule": {"action": "X", "error": "Y"}})
    CLOUD.api("PUT", "/_localcloud/config", {"delay_ms": 5, "pending_seconds": 3,
                                             "spot_prices": {"us-east-1": {"us-east-1a": {
                                                 "t3.small": 1}}}})
    times = []
    for _ in range(3):
        t0 = time.monotonic()
        CLOUD.reset()
        times.append(time.monotonic() - t0)
    # Measured and printed, not asserted: a loaded CI machine makes any bound flaky.
    timings["reset (3 runs, s)"] = max(times)
    state = CLOUD.state()
    check(state["instances"] == [] and state["alarms"] == [] and state["iam"]["roles"] == []
          and state["spot_requests"] == [], "state is empty after reset", state["instances"])
    check(CLOUD.api("GET", "/_localcloud/rules")[1]["rules"] == [], "rules cleared")
    check(CLOUD.log() == [], "log cleared")
    config = CLOUD.api("GET", "/_localcloud/config")[1]
    check(config == {"delay_ms": 0.0, "pending_seconds": 0.0, "spot_prices": {}},
          "config back to startup values", config)
    check(ami().startswith("ami-"), "public parameters reseeded")
    t0 = time.monotonic()
    run_one(ec2)
    timings["first RunInstances after reset (s)"] = time.monotonic() - t0
    check(CLOUD.log()[0]["seq"] == 1, "seq restarts at 1")


@section("stdout carries only the READY line; SIGTERM exits cleanly")
def t_sigterm(cloud: Cloud):
    rc = cloud.stop()
    rest = cloud.proc.stdout.read()
    check(rc == 0, "SIGTERM exit code 0", (rc, cloud.stderr_text()[-2000:]))
    check(rest == b"", "nothing else on stdout", rest)


@section("--exit-on-stdin-eof")
def t_stdin_eof():
    cloud = Cloud("--exit-on-stdin-eof")
    timings["startup (s)"] = cloud.startup
    cloud.proc.stdin.close()
    try:
        rc = cloud.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        cloud.proc.kill()
        rc = None
    check(rc == 0, "exits with 0 when stdin closes", rc)


@section("--box-sim hook (with a throw-away boxsim.py in a temp copy)")
def t_boxsim():
    real = os.path.join(HERE, "boxsim.py")
    if not os.path.exists(real):
        cloud_proc = subprocess.run([PY, LOCALCLOUD, "--box-sim", "--port", "0"],
                                    stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        check(cloud_proc.returncode != 0 and b"boxsim.py" in cloud_proc.stderr
              and cloud_proc.stdout == b"", "--box-sim without boxsim.py is an error",
              cloud_proc.stderr[-500:])
    tmp = tempfile.mkdtemp(prefix="localcloud-boxsim-")
    try:
        shutil.copy(LOCALCLOUD, tmp)
        shutil.copy(os.path.join(HERE, "iampolicy.py"), tmp)  # localcloud imports it
        shutil.copy(os.path.join(HERE, "scheduler.py"), tmp)  # and this
        shutil.copy(os.path.join(HERE, "eice.py"), tmp)  # and this
        marker = os.path.join(tmp, "shutdown-ran")
        with open(os.path.join(tmp, "boxsim.py"), "w") as f:
            f.write(FAKE_BOXSIM.replace("@MARKER@", marker))
        cloud = Cloud("--box-sim", script=os.path.join(tmp, "localcloud.py"))
        check(" box=fake" in cloud.ready_line
              and cloud.ready_line.split()[:2] == ["LOCALCLOUD", "READY"],
              "READY line keeps its first words and gets extras", cloud.ready_line)
        global CLOUD
        saved, CLOUD = CLOUD, cloud
        try:
            inst = run_one(cloud.client("ec2"))
            status, doc = cloud.api("POST", "/_localcloud/box/kill",
                                    {"region": REGION, "instance_id": inst["InstanceId"]})
            check(status == 200 and doc.get("launched") == [inst["InstanceId"]],
                  "boxsim route + launch hook", doc)
            state = cloud.client("ec2").describe_instances(InstanceIds=[inst["InstanceId"]])[
                "Reservations"][0]["Instances"][0]
            check(state["State"]["Name"] == "terminated"
                  and state["StateReason"]["Code"] == "Server.SpotInstanceTermination",
                  "terminate_instance(reason='spot')", state.get("StateReason"))
            status, doc = cloud.api("GET", "/_localcloud/box/info")
            check(doc.get("base_url") == cloud.url and doc.get("vpc", "").startswith("vpc-"),
                  "base_url and ec2_backend()", doc)
        finally:
            CLOUD = saved
        rc = cloud.stop()
        check(rc == 0 and os.path.exists(marker), "on_shutdown hook ran", rc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


FAKE_BOXSIM = '''
import json
launched = []

def attach(cloud):
    cloud.ready_extras["box"] = "fake"
    cloud.on_instances_launched(lambda region, ids: launched.extend(ids))

    def kill(environ, body):
        doc = json.loads(body)
        cloud.terminate_instance(doc["region"], doc["instance_id"], reason="spot")
        return 200, {"launched": launched}

    def info(environ, body):
        with cloud.moto_lock:
            vpc = cloud.ec2_backend("us-east-1").get_default_vpc().id
        return 200, {"base_url": cloud.base_url, "vpc": vpc}

    cloud.add_route("POST", "/_localcloud/box/kill", kill)
    cloud.add_route("GET", "/_localcloud/box/info", info)
    cloud.on_shutdown(lambda: open("@MARKER@", "w").write("ok"))
'''


CLOUD: Cloud = None  # type: ignore[assignment]  # set by main()


@section("EventBridge Scheduler: schedules run as their role, on a clock tests move")
def t_scheduler():
    CLOUD.reset()
    kw = dict(endpoint_url=CLOUD.url, region_name=REGION, config=NO_RETRY,
              aws_access_key_id="other", aws_secret_access_key="other")
    ec2, iam, sch = (boto3.client(n, **kw) for n in ("ec2", "iam", "scheduler"))
    tags = [{"ResourceType": "instance", "Tags": [{"Key": "Project", "Value": "EphemeralContainer"}]}]
    ours, theirs = run_one(ec2, TagSpecifications=tags)["InstanceId"], run_one(ec2)["InstanceId"]
    trust = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Service": "scheduler.amazonaws.com"}, "Action": "sts:AssumeRole",
        "Condition": {"StringEquals": {"aws:SourceAccount": "123456789012"}}}]}
    allow = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "ec2:TerminateInstances", "Resource": "arn:aws:ec2:*:*:instance/*",
        "Condition": {"StringEquals": {"ec2:ResourceTag/Project": "EphemeralContainer"}}}]}
    role = iam.create_role(RoleName="sched", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    iam.put_role_policy(RoleName="sched", PolicyName="p", PolicyDocument=json.dumps(allow))
    ec2_trust = json.loads(json.dumps(trust).replace("scheduler.amazonaws.com", "ec2.amazonaws.com"))
    untrusting = iam.create_role(RoleName="ec2only", AssumeRolePolicyDocument=json.dumps(ec2_trust))["Role"]["Arn"]
    iam.put_role_policy(RoleName="ec2only", PolicyName="p", PolicyDocument=json.dumps(allow))
    at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + 3600))

    def create(name, instance, role_arn, retries=0):
        sch.create_schedule(
            Name=name, ScheduleExpression=f"at({at})", ScheduleExpressionTimezone="UTC",
            FlexibleTimeWindow={"Mode": "OFF"}, ActionAfterCompletion="DELETE",
            Target={"Arn": "arn:aws:scheduler:::aws-sdk:ec2:terminateInstances", "RoleArn": role_arn,
                    "Input": json.dumps({"InstanceIds": [instance]}),
                    "RetryPolicy": {"MaximumRetryAttempts": retries, "MaximumEventAgeInSeconds": 60}})

    create("ours", ours, role)
    create("theirs", theirs, role)
    create("untrusted", ours, untrusting)
    time.sleep(0.6)
    check(CLOUD.api("GET", "/_localcloud/scheduler")[1]["invocations"] == [], "nothing fires before its time")
    status, body = CLOUD.api("POST", "/_localcloud/scheduler/advance", {"seconds": 3601})
    check(status == 200 and body["offset_seconds"] == 3601, "advance the clock", body)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(CLOUD.api("GET", "/_localcloud/scheduler")[1]["invocations"]) < 3:
        time.sleep(0.1)
    fired = {i["name"]: i for i in CLOUD.api("GET", "/_localcloud/scheduler")[1]["invocations"]}
    check(fired.get("ours", {}).get("ok") is True, "the role terminates a tagged instance", fired)
    check(not fired.get("theirs", {}).get("ok") and "ec2:TerminateInstances" in str(fired.get("theirs")),
          "the role's policy is evaluated: an untagged instance is refused", fired)
    check("does not trust" in str(fired.get("untrusted", {}).get("error")),
          "a role that does not trust the scheduler cannot be assumed", fired)
    states = {i["InstanceId"]: i["State"]["Name"] for r in ec2.describe_instances()["Reservations"]
              for i in r["Instances"]}
    check(states[ours] == "terminated" and states[theirs] == "running", "only the allowed call acted", states)
    left = [x["Name"] for x in sch.list_schedules()["Schedules"]]
    check(left == [], "ActionAfterCompletion=DELETE: run (or spent) schedules are gone", left)

    CLOUD.api("PUT", "/_localcloud/policy", {"policy": {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "scheduler:CreateSchedule",
        "Resource": "arn:aws:scheduler:*:*:schedule/default/ok-*"}]}})
    user = CLOUD.client("scheduler")
    exc = expect_error(user.create_schedule, Name="ok-1", ScheduleExpression=f"at({at})",
                       FlexibleTimeWindow={"Mode": "OFF"},
                       Target={"Arn": "arn:aws:scheduler:::aws-sdk:ec2:terminateInstances", "RoleArn": role})
    check(error_code(exc) == "AccessDeniedException" and "iam:PassRole" in str(exc),
          "CreateSchedule also needs iam:PassRole on the target's role", exc)
    exc = expect_error(user.create_schedule, Name="no-1", ScheduleExpression=f"at({at})",
                       FlexibleTimeWindow={"Mode": "OFF"},
                       Target={"Arn": "arn:aws:scheduler:::aws-sdk:ec2:terminateInstances", "RoleArn": role})
    check(error_code(exc) == "AccessDeniedException" and "schedule/default/no-1" in str(exc),
          "schedule actions are scoped to the schedule's ARN", exc)
    CLOUD.api("DELETE", "/_localcloud/policy")
    CLOUD.reset()
    check(CLOUD.api("GET", "/_localcloud/scheduler")[1]["offset_seconds"] == 0, "reset rewinds the clock")


# ---------------------------------------------------------------------------
# EC2 Instance Connect Endpoint (eice.py): a tiny stdlib WebSocket client, a presigner
# that does exactly what the AWS CLI's eicesigner.py does, and the checks.
# ---------------------------------------------------------------------------
class WsClient:
    """RFC 6455 client over a plain socket: masked frames out, (opcode, payload) in."""

    def __init__(self, ws_url: str, presigned: str, host: str | None = None):
        import base64
        import socket
        from urllib.parse import urlsplit

        target = urlsplit(presigned)
        addr = urlsplit(ws_url)
        self.sock = socket.create_connection((addr.hostname, addr.port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {target.path}?{target.query} HTTP/1.1\r\n"
                           f"Host: {host or target.hostname}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            head += chunk
        head, _, self.buf = head.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1]) if head else 0
        self.body = self.buf.decode(errors="replace") if self.status != 101 else ""

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self) -> tuple[int, bytes]:
        import struct
        b1, b2 = self._exact(2)
        n = b2 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._exact(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._exact(8))[0]
        return b1 & 0x0F, self._exact(n)

    def send(self, opcode: int, payload: bytes) -> None:
        import struct
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        head += bytes([0x80 | n]) if n < 126 else (bytes([0x80 | 126]) + struct.pack("!H", n)
                                                   if n < 65536 else bytes([0x80 | 127]) + struct.pack("!Q", n))
        self.sock.sendall(head + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(payload)))

    def read_until_close(self, timeout: float) -> tuple[bytes, int | None, str]:
        """Binary data received until the server's close frame: (data, code, reason)."""
        import struct
        self.sock.settimeout(timeout)
        data = b""
        while True:
            try:
                op, payload = self.recv()
            except (EOFError, OSError):
                return data, None, "no close frame"
            if op == 2:
                data += payload
            elif op == 8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                try:
                    self.send(8, payload[:2])
                except OSError:
                    pass
                return data, code, payload[2:].decode(errors="replace")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def eice_presign(dns: str, eice_id: str, ip: str, port: int = 22, duration: int | None = 3600,
                 expires: int = 60, key: str = "testing", secret: str = "testing",
                 token: str | None = "testing", region: str = REGION) -> str:
    """What awscli/customizations/ec2instanceconnect/eicesigner.py does, with botocore's
    RequestSigner for the ec2-instance-connect service model."""
    from urllib.parse import urlencode

    from botocore.credentials import Credentials
    from botocore.signers import RequestSigner

    session = botocore.session.get_session()
    model = session.get_service_model("ec2-instance-connect")
    signer = RequestSigner(model.service_id, region, model.signing_name, model.signature_version,
                           Credentials(key, secret, token), session.get_component("event_emitter"))
    qs = {"instanceConnectEndpointId": eice_id, "remotePort": port, "privateIpAddress": ip}
    if duration:
        qs["maxTunnelDuration"] = duration
    request = {"url": f"wss://{dns}/openTunnel?{urlencode(qs)}", "body": {},
               "headers": {"host": dns}, "method": "GET", "query_string": "", "url_path": "/",
               "context": {}}
    return signer.generate_presigned_url(request_dict=request, operation_name="openTunnel",
                                         expires_in=expires)


def eice_proxy(ws_url: str, presigned: str) -> int:
    """ssh's ProxyCommand: stdin/stdout <-> the tunnel (binary frames of at most 65000 bytes,
    as the AWS CLI sends). Exit 0 on close 1000, 1 otherwise."""
    ws = WsClient(ws_url, presigned)
    if ws.status != 101:
        sys.stderr.write(f"eice proxy: HTTP {ws.status}: {ws.body}")
        return 1

    def up() -> None:
        while True:
            data = os.read(0, 65000)
            if not data:
                break
            ws.send(2, data)

    threading.Thread(target=up, daemon=True).start()
    data, code, reason = b"", None, ""
    while True:
        try:
            op, payload = ws.recv()
        except (EOFError, OSError):
            break
        if op == 2:
            os.write(1, payload)
        elif op == 8:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            reason = payload[2:].decode(errors="replace")
            break
    if code != 1000:
        sys.stderr.write(f"eice proxy: closed {code} {reason}\n")
    return 0 if code == 1000 else 1


def box_user_data(tmp: str) -> str:
    keys = {}
    for name in ("host", "client"):
        path = os.path.join(tmp, name)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True)
        keys[name] = (open(path).read(), open(path + ".pub").read().strip())
    with open(os.path.join(tmp, "known_hosts"), "w") as f:
        f.write(f"ea-box {keys['host'][1]}\n")
    host_priv = "".join("    " + line + "\n" for line in keys["host"][0].splitlines())
    return ("#cloud-config\nssh_keys:\n  ed25519_private: |\n" + host_priv
            + f"  ed25519_public: {keys['host'][1]}\nssh_authorized_keys:\n  - {keys['client'][1]}\n")


@section("EC2 Instance Connect Endpoint: API states, SigV4 tunnel to a box's sshd, refusals")
def t_eice():
    tmp = tempfile.mkdtemp(prefix="eice-selftest-")
    cloud = Cloud("--box-sim")
    try:
        _t_eice(cloud, tmp)
    finally:
        cloud.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _t_eice(cloud: "Cloud", tmp: str) -> None:
    ws_url = dict(kv.split("=", 1) for kv in cloud.ready_line.split()[2:]).get("eice_ws", "")
    check(ws_url.startswith("ws://127.0.0.1:"), "READY line carries eice_ws=ws://127.0.0.1:PORT", cloud.ready_line)
    status, conf = cloud.api("PUT", "/_localcloud/eice", {"create_seconds": 1.5})
    check(status == 200 and conf["ws_url"] == ws_url and conf["create_seconds"] == 1.5
          and conf["tunnel_limit_seconds"] == 3600, "GET/PUT /_localcloud/eice", conf)
    check(cloud.api("PUT", "/_localcloud/eice", {"bogus": 1})[0] == 400, "unknown eice config key -> 400")
    cloud.api("PUT", "/_localcloud/box-config", {"watchdog": False})
    ec2 = cloud.client("ec2")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    subnet = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"][0]["SubnetId"]
    eice_sg = ec2.create_security_group(GroupName="eice", Description="eice", VpcId=vpc)["GroupId"]
    box_sg = ec2.create_security_group(GroupName="box", Description="box", VpcId=vpc)["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=box_sg, IpPermissions=[{
        "IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "UserIdGroupPairs": [{"GroupId": eice_sg}]}])
    tags = [{"ResourceType": "instance-connect-endpoint", "Tags": [{"Key": "Name", "Value": "ea-eice"}]}]
    made = ec2.create_instance_connect_endpoint(SubnetId=subnet, SecurityGroupIds=[eice_sg],
                                                TagSpecifications=tags, ClientToken="tok-1")
    ep = made["InstanceConnectEndpoint"]
    eid, dns = ep["InstanceConnectEndpointId"], ep["DnsName"]
    check(ep["State"] == "create-in-progress" and ep["VpcId"] == vpc and ep["SubnetId"] == subnet
          and ep["SecurityGroupIds"] == [eice_sg] and ep["NetworkInterfaceIds"][0].startswith("eni-")
          and {"Key": "Name", "Value": "ea-eice"} in ep["Tags"] and made.get("ClientToken") == "tok-1",
          "CreateInstanceConnectEndpoint: create-in-progress, subnet, group, ENI, tags", ep)
    import re as _re
    check(_re.fullmatch(r"eice-[0-9a-f]{17}\.[0-9a-f]{8}\.ec2-instance-connect-endpoint\.us-east-1\.amazonaws\.com", dns)
          is not None and ep["InstanceConnectEndpointArn"].endswith(f":instance-connect-endpoint/{eid}"),
          "DnsName and ARN in AWS's form", dns)
    again = ec2.create_instance_connect_endpoint(SubnetId=subnet, SecurityGroupIds=[eice_sg],
                                                 TagSpecifications=tags, ClientToken="tok-1")
    check(again["InstanceConnectEndpoint"]["InstanceConnectEndpointId"] == eid, "same ClientToken: same endpoint")
    exc = expect_error(ec2.create_instance_connect_endpoint, SubnetId=subnet)
    check(error_code(exc) == "ResourceLimitExceeded", "a second endpoint in the VPC is refused", exc)
    exc = expect_error(ec2.delete_security_group, GroupId=eice_sg)
    check(error_code(exc) == "DependencyViolation", "the endpoint's group cannot be deleted while it exists", exc)
    exc = expect_error(ec2.create_instance_connect_endpoint, SubnetId="subnet-00000000")
    check(error_code(exc) == "InvalidSubnetID.NotFound", "unknown subnet", exc)

    image = cloud.client("ssm").get_parameter(
        Name="/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64")["Parameter"]["Value"]

    def run_one(ec2, **extra):
        return ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.micro",
                                 **extra)["Instances"][0]

    ud = box_user_data(tmp)
    iid = run_one(ec2, SecurityGroupIds=[box_sg], SubnetId=subnet, UserData=ud)["InstanceId"]
    stranger = run_one(ec2, SubnetId=subnet, UserData=ud)["InstanceId"]  # default group only
    inst = {i["InstanceId"]: i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]}
    ip, stranger_ip = inst[iid]["PrivateIpAddress"], inst[stranger]["PrivateIpAddress"]

    early = WsClient(ws_url, eice_presign(dns, eid, ip))
    check(early.status == 404 and "create-in-progress" in early.body,
          "a tunnel through an endpoint still being created: 404", (early.status, early.body))
    early.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if ec2.describe_instance_connect_endpoints(InstanceConnectEndpointIds=[eid])[
                "InstanceConnectEndpoints"][0]["State"] == "create-complete":
            break
        time.sleep(0.2)
    found = ec2.describe_instance_connect_endpoints(Filters=[
        {"Name": "vpc-id", "Values": [vpc]}, {"Name": "state", "Values": ["create-complete"]}])
    check([e["InstanceConnectEndpointId"] for e in found["InstanceConnectEndpoints"]] == [eid],
          "Describe with vpc-id and state filters finds it create-complete", found)
    none = ec2.describe_instance_connect_endpoints(Filters=[{"Name": "tag:Name", "Values": ["other"]}])
    check(none["InstanceConnectEndpoints"] == [], "tag filter excludes it")
    exc = expect_error(ec2.describe_instance_connect_endpoints, InstanceConnectEndpointIds=["eice-0123456789abcdef0"])
    check(error_code(exc) == "InvalidInstanceConnectEndpointId.NotFound", "unknown id -> NotFound", exc)

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        box = cloud.api("GET", f"/_localcloud/box/{iid}")[1]
        if box.get("state") in ("up", "failed"):
            break
        time.sleep(0.1)
    check(box.get("state") == "up", "the box's sshd is up", box)

    ws = WsClient(ws_url, eice_presign(dns, eid, ip))
    check(ws.status == 101, "a URL presigned like the AWS CLI's opens the tunnel (101)", (ws.status, ws.body))
    if ws.status == 101:
        op, banner = ws.recv()
        check(op == 2 and banner.startswith(b"SSH-2.0-"), "the box's SSH banner arrives in a binary frame", banner)
        ws.send(2, b"SSH-2.0-eice-selftest\r\n")
        op, more = ws.recv()  # the server's KEXINIT: it understood our banner
        check(op == 2 and len(more) > 20, "bytes flow both ways (the server answers our banner)", (op, more[:40]))
        ws.send(9, b"are you there")
        check(ws.recv() == (10, b"are you there"), "a ping is answered with a pong")
        ws.send(8, b"\x03\xe8")
        _, code, _ = ws.read_until_close(5)
        check(code == 1000, "client close -> close 1000", code)
    ws.close()
    # As the CLI launches in eice mode: no public IP, the group on the network interface.
    private = run_one(ec2, UserData=ud, NetworkInterfaces=[{
        "DeviceIndex": 0, "SubnetId": subnet, "Groups": [box_sg], "AssociatePublicIpAddress": False}])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and cloud.api("GET", f"/_localcloud/box/{private['InstanceId']}")[1].get(
            "state") not in ("up", "failed"):
        time.sleep(0.1)
    ws = WsClient(ws_url, eice_presign(dns, eid, private["PrivateIpAddress"]))
    got = ws.recv() if ws.status == 101 else (None, b"")
    check(not private.get("PublicIpAddress") and got[0] == 2 and got[1].startswith(b"SSH-2.0-"),
          "an instance without a public IP, its group on the network interface, is reached", (private, got))
    ws.close()
    many = [WsClient(ws_url, eice_presign(dns, eid, ip)) for _ in range(6)]
    banners = [w.recv() if w.status == 101 else (None, b"") for w in many]
    check(all(op == 2 and b.startswith(b"SSH-2.0-") for op, b in banners),
          "six tunnels open at once each reach the box's sshd", banners)
    for w in many:
        w.close()
    # remotePort: AWS's endpoint tunnels to 22 (SSH) and 3389 (RDP) only.
    odd = WsClient(ws_url, eice_presign(dns, eid, ip, port=2022))
    check(odd.status == 400, "remotePort 2022 is refused (400): only 22 and 3389", odd.status)
    odd.close()
    rdp = WsClient(ws_url, eice_presign(dns, eid, ip, port=3389))
    _, code, reason = rdp.read_until_close(5) if rdp.status == 101 else (b"", None, "")
    check(rdp.status == 101 and code == 1011, "remotePort 3389 is taken, and nothing listens there: closed 1011",
          (rdp.status, code, reason))
    rdp.close()
    ws = WsClient(ws_url, eice_presign(dns, eid, ip))
    ws.send(1, b"hello")
    _, code, _ = ws.read_until_close(5)
    check(code == 1003, "a text frame from the client is refused (close 1003)", code)
    ws.close()

    proxy = f"{PY} {os.path.abspath(__file__)} --eice-proxy {ws_url} '{eice_presign(dns, eid, ip)}'".replace("%", "%%")
    import getpass
    ssh = subprocess.run(
        ["ssh", "-F", "/dev/null", "-i", os.path.join(tmp, "client"), "-o", "IdentitiesOnly=yes",
         "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={os.path.join(tmp, 'known_hosts')}", "-o", "HostKeyAlias=ea-box",
         "-o", "GlobalKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", f"ProxyCommand={proxy}",
         f"{getpass.getuser()}@{iid}", "head -c 3000000 /dev/zero | sha256sum; echo $EA_BOXSIM_BOX"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    import hashlib
    want = hashlib.sha256(b"\0" * 3000000).hexdigest()
    check(ssh.returncode == 0 and want in ssh.stdout and iid in ssh.stdout,
          "OpenSSH through the tunnel (ProxyCommand) runs a command on the box, 3 MB back intact",
          (ssh.returncode, ssh.stdout, ssh.stderr))

    url = eice_presign(dns, eid, ip)
    sig = url.rsplit("X-Amz-Signature=", 1)[1]
    tampered = url.replace(sig, ("0" if sig[0] != "0" else "1") + sig[1:])
    bad = WsClient(ws_url, tampered)
    check(bad.status == 403 and "signature" in bad.body, "a tampered signature: 403", (bad.status, bad.body))
    bad.close()
    bad = WsClient(ws_url, url.replace("remotePort=22", "remotePort=2222"))
    check(bad.status == 403, "a parameter changed after signing: 403", (bad.status, bad.body))
    bad.close()
    bad = WsClient(ws_url, eice_presign(dns, eid, ip, key="nobody", secret="x"))
    check(bad.status == 403, "an unknown access key: 403", (bad.status, bad.body))
    bad.close()
    bad = WsClient(ws_url, url, host="eice-other.example.com")
    check(bad.status == 403, "a Host other than the endpoint's DnsName: 403", (bad.status, bad.body))
    bad.close()
    short = eice_presign(dns, eid, ip, expires=1)
    time.sleep(2.2)
    bad = WsClient(ws_url, short)
    check(bad.status == 403 and "expired" in bad.body.lower(), "an expired URL: 403", (bad.status, bad.body))
    bad.close()
    bad = WsClient(ws_url, eice_presign(dns, eid, ip, duration=7200))
    check(bad.status == 400, "maxTunnelDuration above 3600: 400", (bad.status, bad.body))
    bad.close()

    refused = WsClient(ws_url, eice_presign(dns, eid, stranger_ip))
    _, code, reason = refused.read_until_close(5) if refused.status == 101 else (b"", None, "")
    check(refused.status == 101 and code == 1011 and "Unable to connect" in reason,
          "groups that do not admit the endpoint's group: closed 1011 'Unable to connect to target'",
          (refused.status, code, reason))
    refused.close()
    other_vpc = ec2.create_vpc(CidrBlock="10.231.0.0/16")["Vpc"]["VpcId"]
    other_subnet = ec2.create_subnet(VpcId=other_vpc, CidrBlock="10.231.1.0/24")["Subnet"]["SubnetId"]
    outside = run_one(ec2, SubnetId=other_subnet)
    refused = WsClient(ws_url, eice_presign(dns, eid, outside["PrivateIpAddress"]))
    _, code, reason = refused.read_until_close(5) if refused.status == 101 else (b"", None, "")
    check(refused.status == 101 and code == 1011, "an instance outside the endpoint's VPC: closed 1011",
          (refused.status, code, reason))
    refused.close()

    cloud.api("PUT", "/_localcloud/eice", {"tunnel_limit_seconds": 1.5})
    ws = WsClient(ws_url, eice_presign(dns, eid, ip))
    t0 = time.monotonic()
    data, code, reason = ws.read_until_close(30) if ws.status == 101 else (b"", None, "")
    took = time.monotonic() - t0
    check(code == 1000 and data.startswith(b"SSH-2.0-") and 1.0 <= took < 30,
          "tunnel_limit_seconds: the endpoint closes with 1000 after the limit", (code, reason, took))
    ws.close()
    cloud.api("PUT", "/_localcloud/eice", {"tunnel_limit_seconds": 3600})

    arn = f"arn:aws:ec2:{REGION}:123456789012:instance-connect-endpoint/{eid}"
    cloud.api("PUT", "/_localcloud/policy", {"policy": {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "ec2-instance-connect:OpenTunnel", "Resource": arn,
        "Condition": {"NumericEquals": {"ec2-instance-connect:remotePort": "22"},
                      "NumericLessThanEquals": {"ec2-instance-connect:maxTunnelDuration": "3600"},
                      "IpAddress": {"ec2-instance-connect:privateIpAddress": ip + "/32"}}}]}})
    ok = WsClient(ws_url, eice_presign(dns, eid, ip))
    check(ok.status == 101, "policy allows OpenTunnel on the endpoint for port 22 and this IP", (ok.status, ok.body))
    ok.close()
    no = WsClient(ws_url, eice_presign(dns, eid, ip, port=3389))
    check(no.status == 403 and "ec2-instance-connect:OpenTunnel" in no.body,
          "policy refuses another remotePort: 403 naming OpenTunnel", (no.status, no.body))
    no.close()
    no = WsClient(ws_url, eice_presign(dns, eid, stranger_ip))
    check(no.status == 403, "policy refuses another private IP (IpAddress condition)", (no.status, no.body))
    no.close()
    denials = cloud.api("GET", "/_localcloud/policy")[1]["denials"]
    check(any(d["action"] == "ec2-instance-connect:OpenTunnel" and d["resource"] == arn for d in denials),
          "the refusal is recorded among the policy's denials", denials)
    exc = expect_error(ec2.delete_instance_connect_endpoint, InstanceConnectEndpointId=eid)
    check(error_code(exc) == "UnauthorizedOperation" and "ec2:DeleteInstanceConnectEndpoint" in str(exc),
          "DeleteInstanceConnectEndpoint is enforced on the endpoint's ARN", exc)
    sim = cloud.api("POST", "/_localcloud/policy/simulate", {
        "service": "ec2", "action": "CreateInstanceConnectEndpoint",
        "params": {"SubnetId": subnet, "TagSpecification.1.ResourceType": "instance-connect-endpoint",
                   "TagSpecification.1.Tag.1.Key": "Name", "TagSpecification.1.Tag.1.Value": "x"}})[1]
    actions = {c["action"] for c in sim["checks"]}
    check({"ec2:CreateInstanceConnectEndpoint", "ec2:CreateTags", "ec2:CreateNetworkInterface",
           "iam:CreateServiceLinkedRole"} <= actions, "CreateInstanceConnectEndpoint maps to its IAM checks", sim)
    cloud.api("DELETE", "/_localcloud/policy")

    gone = ec2.delete_instance_connect_endpoint(InstanceConnectEndpointId=eid)["InstanceConnectEndpoint"]
    check(gone["State"] == "delete-in-progress", "Delete: delete-in-progress", gone["State"])
    bad = WsClient(ws_url, eice_presign(dns, eid, ip))
    check(bad.status == 404, "no tunnel through an endpoint being deleted", (bad.status, bad.body))
    bad.close()
    time.sleep(1.7)
    state = ec2.describe_instance_connect_endpoints(InstanceConnectEndpointIds=[eid])["InstanceConnectEndpoints"][0]
    check(state["State"] == "delete-complete", "then delete-complete", state["State"])
    ec2.delete_security_group(GroupId=eice_sg)  # no DependencyViolation once delete-complete
    check(not any(g["id"] == eice_sg for g in cloud.state()["security_groups"]),
          "after delete-complete the endpoint's group can be deleted")
    dump = cloud.state()["instance_connect_endpoints"]
    check(len(dump) == 1 and dump[0]["id"] == eid and dump[0]["state"] == "delete-complete",
          "state dump lists instance_connect_endpoints", dump)
    log = cloud.api("GET", "/_localcloud/eice")[1]["tunnels"]
    opened = [t for t in log if t["refused"] is None and t["close_code"] == 1000 and t["instance_id"] == iid]
    check(opened and opened[0]["bytes_out"] > 0 and opened[0]["bytes_in"] > 0,
          "tunnel log: instance, close code, bytes both ways", log[:3])
    check(any(t["http_status"] == 403 for t in log), "tunnel log records refusals with their status")
    cloud.reset()
    check(cloud.api("GET", "/_localcloud/eice")[1]["tunnels"] == [] and cloud.state()["instance_connect_endpoints"] == [],
          "reset forgets endpoints and tunnels")


def main() -> int:
    global CLOUD
    t0 = time.monotonic()
    CLOUD = Cloud()
    timings["startup to READY (s)"] = CLOUD.startup
    try:
        for test in (t_basics, t_ice, t_every, t_drop, t_drop_after, t_delay, t_log, t_spot_prices,
                     t_pending, t_sg_dependency, t_sg_rules_and_terminate_twice, t_spot_requests, t_ssm_amis, t_protocol_errors,
                     t_state, t_enforcement, t_scheduler, t_control, t_reset):
            test()
    finally:
        t_sigterm(CLOUD)
    t_stdin_eof()
    t_boxsim()
    t_eice()
    if failed and not VERBOSE:
        print("---- localcloud stderr (tail) ----")
        print(CLOUD.stderr_text()[-6000:])
    for name, value in timings.items():
        print(f"timing: {name}: {value:.3f}")
    print(f"total: {time.monotonic() - t0:.1f} s")
    print(f"{passed} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--eice-proxy"]:
        sys.exit(eice_proxy(sys.argv[2], sys.argv[3]))
    sys.exit(main())

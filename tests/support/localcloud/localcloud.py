#!/usr/bin/env python3
"""localcloud: a local stand-in for the part of AWS that ephemeral-admin talks to.

It runs moto (in server mode, in this same process) behind our own WSGI
middleware, on a threaded werkzeug server bound to 127.0.0.1. The middleware
adds the things a plain moto server lacks:

* a call log (which AWS actions were called, with what parameters, when),
* added latency, per request or per rule,
* fault injection (AWS-shaped error responses, or dropped connections),
* fixes for the places where moto behaves differently from real AWS
  (see the section "Where moto differs from AWS"),
* IAM enforcement: with a policy loaded, requests are allowed or denied as IAM
  would for a user holding it (iampolicy.py beside this file),
* a JSON control API under /_localcloud/ (reset, rules, config, log, state, policy).

Usage:
    .venv/bin/python tests/support/localcloud/localcloud.py [--port 0]
        [--delay-ms N] [--pending-seconds F] [--box-sim]
        [--exit-on-stdin-eof] [--policy FILE] [-v]

When it is ready it prints exactly one line to stdout:
    LOCALCLOUD READY url=http://127.0.0.1:PORT [key=value ...]
and nothing else ever goes to stdout. It runs until SIGTERM/SIGINT, or until
stdin reaches EOF when started with --exit-on-stdin-eof. README.md next to
this file documents the control API and the --box-sim hook.

Sections of this file:
  1. Bootstrap (moto settings, imports, constants)
  2. Small helpers (time, XML/JSON bodies, AWS request parsing)
  3. Fault rules
  4. Spot price model
  5. Middleware: the fault and latency proxy
  5b. IAM enforcement (the loaded policy, via iampolicy.py)
  6. Where moto differs from AWS (all moto-gap fixes)
  7. Control API
  8. State dump
  9. LocalCloud: the central object (combines 5-8; reset; the boxsim hook API)
 10. CLI / server bootstrap
"""

from __future__ import annotations

# ---------------------------------------------------------------------------
# 1. Bootstrap
# ---------------------------------------------------------------------------
import argparse
import base64
import datetime as dt
import gzip
import hashlib
import importlib.util
import io
import copy
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote
from xml.sax.saxutils import escape as _xml_escape

# moto reads these settings when it is imported, so they must be set first.
# Real AWS rejects unknown AMIs, unknown key pairs and unknown instance types;
# so do we. A harness can still override them through the environment.
os.environ.setdefault("MOTO_ENABLE_AMI_VALIDATION", "true")
os.environ.setdefault("MOTO_ENABLE_KEYPAIR_VALIDATION", "true")
os.environ.setdefault("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true")
# AWS-managed IAM policies (AmazonSSMManagedInstanceCore, ...) exist on AWS; moto
# only loads them when asked (costs ~0.1 s per reset, on the first IAM call).
os.environ.setdefault("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
# moto's internal botocore sessions must never go looking for real credentials.
for _k, _v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
               ("AWS_SESSION_TOKEN", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
    os.environ.setdefault(_k, _v)

from moto.core.utils import utcnow  # noqa: E402
from moto.ec2.models.spot_requests import SpotInstanceRequest  # noqa: E402
from moto.ec2.utils import random_spot_request_id  # noqa: E402
from moto.moto_api._internal.models import moto_api_backend  # noqa: E402
from moto.moto_server.werkzeug_app import (  # noqa: E402
    DomainDispatcherApplication,
    create_backend_app,
)
from werkzeug.serving import WSGIRequestHandler, make_server  # noqa: E402


ACCOUNT_ID = "123456789012"  # moto's default account (any non-numeric access key maps to it)
CANONICAL_OWNER_ID = "099720109477"  # owner of the official Ubuntu AMIs
AMAZON_OWNER_ID = "137112412989"  # owner of the official Amazon Linux AMIs
EC2_XMLNS = "http://ec2.amazonaws.com/doc/2016-11-15/"
QUERY_XMLNS = {
    "iam": "https://iam.amazonaws.com/doc/2010-05-08/",
    "sts": "https://sts.amazonaws.com/doc/2011-06-15/",
    "monitoring": "http://monitoring.amazonaws.com/doc/2010-08-01/",
}
# Services we build a moto app for at startup, so the first request is not slow.
PREWARM_SERVICES = ("ec2", "iam", "sts", "cloudwatch", "ssm", "logs", "budgets")
# Regions whose backends are created (and seeded) at startup and after reset.
PREWARM_REGIONS = ("us-east-1",)

log = logging.getLogger("localcloud")


# ---------------------------------------------------------------------------
# 2. Small helpers
# ---------------------------------------------------------------------------
def xml_escape(value: Any) -> str:
    return _xml_escape(str(value), {'"': "&quot;"})


def aws_timestamp(epoch: float) -> str:
    """ISO 8601 UTC with milliseconds, the way EC2 prints timestamps."""
    t = dt.datetime.fromtimestamp(epoch, dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def iso(value: Any) -> str | None:
    """Best-effort ISO 8601 for datetimes, epoch numbers and strings."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.isoformat()
    if isinstance(value, (int, float)):
        # CloudWatch Logs uses milliseconds, most others seconds.
        secs = value / 1000.0 if value > 1e11 else float(value)
        return dt.datetime.fromtimestamp(secs, dt.timezone.utc).isoformat()
    return str(value)


def parse_json_maybe(value: Any) -> Any:
    """Policy documents are kept by moto as strings (sometimes URL-encoded)."""
    if not isinstance(value, str):
        return value
    for candidate in (value, unquote(value)):
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    return value


def list_param(params: dict[str, str], prefix: str) -> list[str]:
    """Values of Prefix.1, Prefix.2, ... from flattened query parameters, in order."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)$")
    found = []
    for key, value in params.items():
        m = pattern.match(key)
        if m:
            found.append((int(m.group(1)), value))
    return [v for _, v in sorted(found)]


def filters_param(params: dict[str, str]) -> dict[str, list[str]]:
    """EC2 Filter.N.Name / Filter.N.Value.M -> {name: [values]}."""
    names: dict[int, str] = {}
    values: dict[int, list[tuple[int, str]]] = {}
    for key, value in params.items():
        m = re.match(r"Filter\.(\d+)\.Name$", key)
        if m:
            names[int(m.group(1))] = value
            continue
        m = re.match(r"Filter\.(\d+)\.Value\.(\d+)$", key)
        if m:
            values.setdefault(int(m.group(1)), []).append((int(m.group(2)), value))
    return {name: [v for _, v in sorted(values.get(i, []))] for i, name in names.items()}


def tag_specs_param(params: dict[str, str]) -> dict[str, dict[str, str]]:
    """TagSpecification.N.ResourceType / .Tag.M.Key / .Tag.M.Value -> {type: {k: v}}."""
    out: dict[str, dict[str, str]] = {}
    indexes = {int(m.group(1)) for k in params
               if (m := re.match(r"TagSpecification\.(\d+)\.ResourceType$", k))}
    for i in sorted(indexes):
        rtype = params[f"TagSpecification.{i}.ResourceType"]
        tags = out.setdefault(rtype, {})
        j = 1
        while f"TagSpecification.{i}.Tag.{j}.Key" in params:
            tags[params[f"TagSpecification.{i}.Tag.{j}.Key"]] = params.get(
                f"TagSpecification.{i}.Tag.{j}.Value", "")
            j += 1
    return out


class Resp:
    """A complete HTTP response (we always buffer; AWS API bodies are small)."""

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def with_body(self, body: bytes) -> "Resp":
        headers = [(k, v) for k, v in self.headers if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(body))))
        return Resp(self.status, headers, body)

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


HTTP_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
                409: "Conflict", 429: "Too Many Requests", 500: "Internal Server Error",
                502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


def status_line(code: int) -> str:
    return f"{code} {HTTP_REASONS.get(code, 'Status')}"


class AwsRequest:
    """What we learn from an incoming AWS API request before handing it to moto."""

    def __init__(self, environ: dict[str, Any], body: bytes):
        self.environ = environ
        self.body = body
        self.service: str | None = None
        self.region: str | None = None
        self.action: str | None = None
        self.protocol = "rest"  # ec2 | query | json | rest
        self.params: dict[str, str] | None = None
        self.json: Any = None
        self.content_type = environ.get("CONTENT_TYPE", "") or ""
        self.access_key: str | None = None
        self._parse_scope()
        self._parse_action()

    def _parse_scope(self) -> None:
        # SigV4: "AWS4-HMAC-SHA256 Credential=AKID/20261122/us-east-1/ec2/aws4_request, ..."
        auth = self.environ.get("HTTP_AUTHORIZATION", "")
        m = re.search(r"Credential=([^,\s]+)", auth)
        scope = m.group(1) if m else None
        if scope is None:  # presigned URL
            qs = dict(parse_qsl(self.environ.get("QUERY_STRING", "")))
            scope = qs.get("X-Amz-Credential")
        if scope:
            parts = scope.split("/")
            if len(parts) >= 5:
                self.region, self.service = parts[-3], parts[-2].lower()
                self.access_key = parts[0]

    def _parse_action(self) -> None:
        target = self.environ.get("HTTP_X_AMZ_TARGET")
        body = self.body
        if self.environ.get("HTTP_CONTENT_ENCODING", "").lower() == "gzip" and body:
            try:  # SDKs gzip large PutMetricData bodies; moto unzips itself.
                body = gzip.decompress(body)
            except OSError:
                pass
        if self.service == "access-analyzer" and self.environ.get("PATH_INFO") == "/policy/validation":
            # restJson1: the operation is the route; errors are JSON with x-amzn-ErrorType.
            self.protocol, self.action = "json", "ValidatePolicy"
            try:
                self.json = json.loads(body or b"{}")
            except ValueError:
                self.json = {}
            return
        if self.service == "scheduler":
            # restJson1 as well (section 6, scheduler.py): the operation is the route.
            self.protocol = "json"
            self.action, self.json = scheduler_gap.parse_request(
                self.environ.get("REQUEST_METHOD", "GET"), self.environ.get("PATH_INFO", ""),
                self.environ.get("QUERY_STRING", ""), body)
            return
        if target:
            self.protocol = "json"
            self.action = target.split(".", 1)[-1]
            if body:
                try:
                    self.json = json.loads(body)
                except ValueError:
                    self.json = body.decode("utf-8", "replace")
            else:
                self.json = {}
            return
        params: dict[str, str] = dict(parse_qsl(self.environ.get("QUERY_STRING", ""),
                                                keep_blank_values=True))
        if "x-www-form-urlencoded" in self.content_type and body:
            params.update(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        for k in [k for k in params if k.startswith("X-Amz-")]:  # presigning noise
            del params[k]
        if "Action" in params:
            self.action = params["Action"]
            self.params = params
            self.protocol = "ec2" if self.service == "ec2" else "query"
        elif params:
            self.params = params

    def field(self, name: str) -> Any:
        """A flattened form field, or a top-level JSON field."""
        if self.params is not None and name in self.params:
            return self.params[name]
        if isinstance(self.json, dict):
            return self.json.get(name)
        return None


def error_response(req: AwsRequest, code: str, message: str, status: int) -> Resp:
    """An error body in the shape the AWS SDKs parse for this request's protocol."""
    rid = str(uuid.uuid4())
    kind = "Sender" if status < 500 else "Receiver"
    if req.protocol == "json":
        ctype = req.content_type if req.content_type.startswith("application/x-amz-json") \
            else "application/x-amz-json-1.1"
        body = json.dumps({"__type": code, "message": message}).encode()
        headers = [("Content-Type", ctype), ("x-amzn-ErrorType", code),
                   ("x-amzn-RequestId", rid)]
        if req.service == "monitoring":  # CloudWatch's JSON protocol is awsQueryCompatible
            headers.append(("x-amzn-query-error", f"{code};{kind}"))
    elif req.protocol == "ec2":
        body = ('<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Response><Errors><Error><Code>{xml_escape(code)}</Code>"
                f"<Message>{xml_escape(message)}</Message></Error></Errors>"
                f"<RequestID>{rid}</RequestID></Response>").encode()
        headers = [("Content-Type", "text/xml;charset=UTF-8"), ("x-amzn-RequestId", rid)]
    elif req.protocol == "query":
        xmlns = QUERY_XMLNS.get(req.service or "", f"https://{req.service}.amazonaws.com/doc/")
        body = (f'<ErrorResponse xmlns="{xmlns}"><Error><Type>{kind}</Type>'
                f"<Code>{xml_escape(code)}</Code><Message>{xml_escape(message)}</Message>"
                f"</Error><RequestId>{rid}</RequestId></ErrorResponse>").encode()
        headers = [("Content-Type", "text/xml"), ("x-amzn-RequestId", rid)]
    else:  # REST-XML style (S3 and friends)
        body = ('<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{xml_escape(code)}</Code><Message>{xml_escape(message)}"
                f"</Message><RequestId>{rid}</RequestId></Error>").encode()
        headers = [("Content-Type", "application/xml"), ("x-amzn-RequestId", rid)]
    headers.append(("Content-Length", str(len(body))))
    return Resp(status, headers, body)


def ec2_response(action: str, inner_xml: str) -> Resp:
    """A successful EC2 response that we built ourselves."""
    rid = str(uuid.uuid4())
    body = ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<{action}Response xmlns="{EC2_XMLNS}"><requestId>{rid}</requestId>'
            f"{inner_xml}</{action}Response>").encode()
    return Resp(200, [("Content-Type", "text/xml;charset=UTF-8"), ("x-amzn-RequestId", rid),
                      ("Content-Length", str(len(body)))], body)


class _DropConnection(Exception):
    """Raised inside the middleware to close the client socket without a response."""


# ---------------------------------------------------------------------------
# 3. Fault rules
# ---------------------------------------------------------------------------
# Default HTTP status per AWS error code (anything else: 400, like AWS client errors).
DEFAULT_ERROR_STATUS = {
    "RequestLimitExceeded": 503, "Throttling": 503, "ServiceUnavailable": 503,
    "Unavailable": 503, "InsufficientInstanceCapacity": 500, "InternalError": 500,
    "InternalFailure": 500,
}
SERVICE_ALIASES = {"cloudwatch": "monitoring"}  # rule "service" may use either name


def default_message(code: str, req: AwsRequest) -> str:
    """Messages worded like the real ones, so logs and CLI output look familiar."""
    if code == "InsufficientInstanceCapacity":
        itype = req.field("InstanceType") or "the requested instance type"
        az = req.field("Placement.AvailabilityZone") or "the Availability Zone you requested"
        return (f"We currently do not have sufficient {itype} capacity in {az}. Our system "
                "will be working on provisioning additional capacity.")
    if code == "RequestLimitExceeded":
        return "Request limit exceeded."
    if code in ("Throttling", "ThrottlingException"):
        return "Rate exceeded"
    if code in ("InternalError", "InternalFailure"):
        return "An internal error has occurred"
    return f"Injected fault ({code}) by localcloud"


class FaultRule:
    KEYS = {"service", "region", "action", "match", "error", "status", "message", "drop",
            "drop_after", "delay_ms", "times", "every"}

    def __init__(self, spec: Any):
        if not isinstance(spec, dict):
            raise ValueError("a rule must be a JSON object")
        unknown = set(spec) - self.KEYS - {"hits", "seen"}
        if unknown:
            raise ValueError(f"unknown rule keys: {sorted(unknown)}")
        service = spec.get("service")
        self.service = SERVICE_ALIASES.get(service, service) if service else None
        self.region = spec.get("region")
        self.action = spec.get("action") or "*"
        self.match = spec.get("match") or {}
        if not isinstance(self.match, dict):
            raise ValueError("rule 'match' must be an object")
        self.error = spec.get("error")
        self.message = spec.get("message")
        self.drop = bool(spec.get("drop", False))
        # Process the request (moto acts on it), then drop the connection: a lost answer.
        self.drop_after = bool(spec.get("drop_after", False))
        if self.drop_after and (self.drop or self.error):
            raise ValueError("rule 'drop_after' cannot be combined with 'drop' or 'error'")
        self.delay_ms = float(spec.get("delay_ms") or 0)
        self.times = spec.get("times")
        if self.times is not None:
            self.times = int(self.times)
        self.every = spec.get("every")
        if self.every is not None:
            self.every = int(self.every)
            if self.every < 1:
                raise ValueError("rule 'every' must be >= 1")
        status = spec.get("status")
        if status is None and self.error:
            status = DEFAULT_ERROR_STATUS.get(self.error, 400)
        self.status = int(status) if status is not None else None
        self.seen = 0  # eligible requests so far (drives "every")
        self.hits = 0  # times this rule fired

    def applies_to(self, req: AwsRequest) -> bool:
        if self.service and self.service != req.service:
            return False
        if self.region and self.region != req.region:
            return False
        if self.action != "*" and self.action != req.action:
            return False
        for key, expected in self.match.items():
            actual = req.field(key)
            if actual is None or _norm(actual) != _norm(expected):
                return False
        return True

    def to_json(self) -> dict[str, Any]:
        return {"service": self.service, "region": self.region, "action": self.action,
                "match": self.match, "error": self.error, "status": self.status,
                "message": self.message, "drop": self.drop, "drop_after": self.drop_after,
                "delay_ms": self.delay_ms,
                "times": self.times, "every": self.every, "seen": self.seen,
                "hits": self.hits}


def _norm(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ---------------------------------------------------------------------------
# 4. Spot price model
# ---------------------------------------------------------------------------
# On-demand Linux prices in us-east-1, USD per hour.
ON_DEMAND_USD = {
    "t3.micro": 0.0104, "t3.small": 0.0208, "t3.medium": 0.0416,
    "t3a.micro": 0.0094, "t3a.small": 0.0188, "t3a.medium": 0.0376,
    "t4g.micro": 0.0084, "t4g.small": 0.0168, "t4g.medium": 0.0336,
    "m5.large": 0.096, "m6i.large": 0.096, "c5.large": 0.085,
}
# Spot price = on-demand x region factor x AZ factor. The AZ factor is picked by
# the AZ's letter, so in every region the "c" zone is the cheapest, then "e",
# "a", "b", "d", "f":   a=0.32 b=0.34 c=0.28 d=0.36 e=0.30 f=0.38
AZ_FACTORS = {"a": 0.32, "b": 0.34, "c": 0.28, "d": 0.36, "e": 0.30, "f": 0.38}
AZ_FACTOR_FALLBACK = 0.40
REGION_FACTORS = {"us-east-1": 1.0, "us-east-2": 1.0, "us-west-2": 1.0,
                  "eu-west-1": 1.08, "eu-central-1": 1.15}
REGION_FACTOR_FALLBACK = 1.10
# Real AWS reports both descriptions for Linux; both carry the same price here.
PRODUCT_DESCRIPTIONS = ("Linux/UNIX", "Linux/UNIX (Amazon VPC)")


def on_demand_price(region: str, itype: str) -> float | None:
    base = ON_DEMAND_USD.get(itype)
    if base is None:
        return None
    return round(base * REGION_FACTORS.get(region, REGION_FACTOR_FALLBACK), 4)


def seeded_spot_price(region: str, az: str, itype: str) -> float | None:
    od = on_demand_price(region, itype)
    if od is None:
        return None
    factor = AZ_FACTORS.get(az[-1:], AZ_FACTOR_FALLBACK)
    return round(od * factor, 4)


# ---------------------------------------------------------------------------
# 5. Middleware: the fault and latency proxy
# ---------------------------------------------------------------------------
class Middleware:
    """The WSGI entry point. Every AWS request (anything not under /_localcloud/)
    is parsed, logged, delayed, possibly failed or dropped by a fault rule, and
    otherwise handed to moto, through a fix from section 6 where one exists.
    (Mixed into LocalCloud, section 9, which owns the state used here.)"""

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> list[bytes]:
        path = environ.get("PATH_INFO", "") or ""
        is_control = path == "/_localcloud" or path.startswith("/_localcloud/")
        try:
            if is_control:
                resp = self._control(environ)
            else:
                resp = self._handle_aws(environ)
        except _DropConnection:
            # werkzeug treats ConnectionError as "client went away" and stays quiet.
            raise ConnectionAbortedError("localcloud: injected connection drop")
        except Exception as exc:
            with self.state_lock:
                self.internal_errors += 1
            sys.stderr.write(f"localcloud: internal error on {environ.get('REQUEST_METHOD')} "
                             f"{path}:\n{traceback.format_exc()}")
            sys.stderr.flush()
            body = json.dumps({"error": "localcloud internal error",
                               "detail": f"{type(exc).__name__}: {exc}"}).encode()
            resp = Resp(500, [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))], body)
        start_response(status_line(resp.status), resp.headers)
        return [resp.body]

    def _handle_aws(self, environ: dict[str, Any]) -> Resp:
        body = self._read_body(environ)
        req = AwsRequest(environ, body)
        t_start = time.time()
        with self.state_lock:
            self.seq += 1
            entry: dict[str, Any] = {
                "seq": self.seq, "service": req.service, "region": req.region,
                "action": req.action, "t_start": t_start, "t_end": None, "status": None,
                "injected": None, "delay_ms": 0.0}
            if req.protocol == "json":
                entry["json"] = req.json
            else:
                entry["params"] = req.params
            if req.protocol == "rest":
                entry["method"] = environ.get("REQUEST_METHOD")
                entry["path"] = environ.get("PATH_INFO")
            self.calls.append(entry)
            rule = self._match_rule(req)
            delay_ms = self.delay_ms + (rule.delay_ms if rule else 0.0)
            entry["delay_ms"] = delay_ms
            if rule is not None and rule.drop:
                entry["injected"] = "drop"
            elif rule is not None and rule.drop_after:
                entry["injected"] = "drop_after"
            elif rule is not None and rule.error:
                entry["injected"] = f"error:{rule.error}"
        try:
            if delay_ms > 0:
                time.sleep(delay_ms / 1000.0)
            if rule is not None and rule.drop:
                self._drop(environ)
            if rule is not None and rule.error:
                resp = error_response(req, rule.error, rule.message
                                      or default_message(rule.error, req), rule.status or 400)
            else:
                resp = self._authorize(req, entry) or self._forward(req, environ)
            if rule is not None and rule.drop_after:
                with self.state_lock:
                    entry["processed_status"] = resp.status
                self._drop(environ)
        except _DropConnection:
            self._finish(entry, status=None)
            raise
        except Exception as exc:
            with self.state_lock:
                self.internal_errors += 1
            self._finish(entry, status=500, localcloud_error=f"{type(exc).__name__}: {exc}")
            sys.stderr.write(f"localcloud: internal error in {req.service}:{req.action}:\n"
                             f"{traceback.format_exc()}")
            sys.stderr.flush()
            return error_response(req, "InternalError",
                                  f"localcloud internal error: {type(exc).__name__}: {exc}", 500)
        self._finish(entry, status=resp.status)
        return resp

    def _finish(self, entry: dict[str, Any], **fields: Any) -> None:
        """Complete a call-log entry (under the lock: GET /log may be copying it)."""
        with self.state_lock:
            entry.update(fields, t_end=time.time())
        if self.verbose:
            took = (entry["t_end"] - entry["t_start"]) * 1000 if entry["t_end"] else 0
            log.info("#%s %s %s %s -> %s%s (%.0f ms)", entry["seq"], entry["region"],
                     entry["service"], entry["action"], entry["status"],
                     f" [{entry['injected']}]" if entry["injected"] else "", took)

    @staticmethod
    def _read_body(environ: dict[str, Any]) -> bytes:
        """Read the whole body and give moto a fresh, rewindable copy."""
        stream = environ.get("wsgi.input")
        body = b""
        if stream is not None:
            if environ.get("wsgi.input_terminated"):
                body = stream.read()
            else:
                try:
                    length = int(environ.get("CONTENT_LENGTH") or 0)
                except ValueError:
                    length = 0
                if length > 0:
                    body = stream.read(length)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("wsgi.input_terminated", None)
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        return body

    def _match_rule(self, req: AwsRequest) -> FaultRule | None:
        """First matching rule wins; caller holds state_lock."""
        for rule in self.rules:
            if rule.times is not None and rule.times <= 0:
                continue
            if not rule.applies_to(req):
                continue
            rule.seen += 1
            if rule.every and rule.seen % rule.every != 0:
                continue  # deterministic: only every Nth eligible request
            if rule.times is not None:
                rule.times -= 1
            rule.hits += 1
            return rule
        return None

    @staticmethod
    def _drop(environ: dict[str, Any]) -> None:
        """Close the TCP connection without sending a byte back."""
        # werkzeug's dev server exposes the client socket. We only shut it down;
        # the server closes it once our handler returns (closing it here would make
        # the server's own cleanup trip over a dead file descriptor). The client
        # sees the connection end with no response bytes at all.
        sock = environ.get("werkzeug.socket")
        if isinstance(sock, socket.socket):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        raise _DropConnection()

    def _call_moto(self, environ: dict[str, Any]) -> Resp:
        captured: dict[str, Any] = {}
        chunks: list[bytes] = []

        def start_response(status: str, headers: list, exc_info: Any = None) -> Callable:
            captured["status"], captured["headers"] = status, list(headers)
            return chunks.append

        with self.moto_lock:
            result = self.moto_app(environ, start_response)
            try:
                for chunk in result:
                    chunks.append(chunk)
            finally:
                close = getattr(result, "close", None)
                if close:
                    close()
        return Resp(int(captured["status"].split()[0]), captured["headers"], b"".join(chunks))

    def _forward(self, req: AwsRequest, environ: dict[str, Any]) -> Resp:
        with self.moto_lock:
            self.ensure_region(req.region)
            fix = MOTO_FIXES.get((req.service, req.action))
            if fix is None:
                return self._call_moto(environ)
            return fix(self, req, environ)


# ---------------------------------------------------------------------------
# 5b. IAM enforcement (iampolicy.py): the user's policy, applied as AWS would
# ---------------------------------------------------------------------------
# Off until a policy is loaded (--policy FILE or PUT /_localcloud/policy). Then
# every request signed with one of the enforced access keys (default: the
# CLI's "testing") is mapped to the IAM checks AWS makes for it and answered
# with AWS's denial when one fails, before moto sees it. Other keys (the tests'
# own boto3 clients, "other") act as an administrator.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import iampolicy  # noqa: E402
import scheduler as scheduler_gap  # noqa: E402  (section 6: EventBridge Scheduler runs schedules)
import eice as eice_gap  # noqa: E402  (section 6: EC2 Instance Connect Endpoints and their tunnels)

PRINCIPAL_ARN = f"arn:aws:iam::{ACCOUNT_ID}:user/moto"
PRINCIPAL_USERID = "AIDAMOTOUSER0000000001"


@dataclass
class Principal:
    """Who signs with an access key: GetCallerIdentity's answer, and the values IAM fills in
    for ${aws:userid} and ${aws:username} (IAM users only) when it evaluates their policy."""
    arn: str          # as GetCallerIdentity answers it
    userid: str       # aws:userid: AIDA... for a user, AROA...:SESSION for an assumed role
    username: str | None = None


# The CLI's key ("testing") and teammates' keys, all enforced with the same policy: two IAM
# users, and two people on one shared (non-SSO) role, told apart by their session names only.
PRINCIPALS: dict[str, Principal] = {
    "testing": Principal(f"arn:aws:sts::{ACCOUNT_ID}:user/moto", PRINCIPAL_USERID, "moto"),
    "testing-bob": Principal(f"arn:aws:iam::{ACCOUNT_ID}:user/bob", "AIDABOBUSER00000000002", "bob"),
    "testing-shared-alice": Principal(f"arn:aws:sts::{ACCOUNT_ID}:assumed-role/SharedAdmin/alice",
                                      "AROASHAREDADMIN0000003:alice"),
    "testing-shared-bob": Principal(f"arn:aws:sts::{ACCOUNT_ID}:assumed-role/SharedAdmin/bob",
                                    "AROASHAREDADMIN0000003:bob"),
}


class MotoWorld:
    """What the evaluator asks the cloud: resource tags and instance profile roles
    (read from moto; the caller holds moto_lock)."""
    account = ACCOUNT_ID

    def __init__(self, cloud: "LocalCloud"):
        self.cloud = cloud

    def resource_tags(self, service: str, region: str, resource_id: str) -> dict[str, str] | None:
        try:
            if service == "ec2" and resource_id.startswith("eice-") and self.cloud.eice:
                return self.cloud.eice.tags_of(region, resource_id)
            if service == "ec2":
                tags = _tags(self.cloud.ec2_backend(region), resource_id)
                return tags or None
            if service == "cloudwatch":
                from moto.cloudwatch.models import cloudwatch_backends
                return dict(cloudwatch_backends[ACCOUNT_ID][region].tagger.get_tag_dict_for_resource(resource_id)) or None
            if service == "iam":
                from moto.iam.models import iam_backends
                iam = iam_backends[ACCOUNT_ID]["global"]
                kind, _, name = resource_id.rpartition(":")[2].partition("/")
                obj = iam.get_role(name) if kind == "role" else iam.get_instance_profile(name)
                return {k: v["Value"] for k, v in (obj.tags or {}).items()}
        except Exception:
            return None
        return None

    def role_boundary(self, name: str) -> str | None:
        from moto.iam.models import iam_backends
        try:
            return iam_backends[ACCOUNT_ID]["global"].get_role(name).permissions_boundary_arn or None
        except Exception:
            return None

    def instance_profile_roles(self, name: str) -> list[str]:
        from moto.iam.models import iam_backends
        try:
            return [r.name for r in iam_backends[ACCOUNT_ID]["global"].get_instance_profile(name).roles]
        except Exception:
            return []


class PolicyEnforcement:
    """Evaluates requests against the loaded policy (mixed into LocalCloud)."""

    def enforce(self, policy: dict[str, Any] | None, access_keys: list[str] | None = None) -> None:
        with self.state_lock:
            self.enforced_policy = policy
            self.enforced_keys = list(access_keys or PRINCIPALS)
            self.denials = []

    def _principal(self, key: str) -> Principal:
        """Who signs with `key`: one of PRINCIPALS, or a role session moto's STS issued (its
        AROA…:SESSION user id, as GetCallerIdentity answers it)."""
        if key in PRINCIPALS:
            return PRINCIPALS[key]
        from moto.sts.models import sts_backends
        with self.moto_lock:
            for account in list(sts_backends):
                for backend in sts_backends[account].values():
                    role = backend.get_assumed_role_from_access_key(key)
                    if role is not None:
                        return Principal(role.arn, role.user_id)
        return PRINCIPALS["testing"]

    def _checks_for(self, req: AwsRequest) -> list[iampolicy.Check]:
        call = iampolicy.Call(service=req.service or "", region=req.region or "us-east-1",
                              action=req.action or "", params=dict(req.params or {}),
                              json=req.json if isinstance(req.json, dict) else {})
        with self.moto_lock:
            self.ensure_region(req.region)
            checks = iampolicy.authorizations(call, MotoWorld(self))
        who = self._principal(req.access_key or "")
        for check in checks:
            if who.username:
                check.context.setdefault("aws:username", who.username)
            check.context.setdefault("aws:userid", who.userid)
            check.context.setdefault("aws:PrincipalArn", who.arn.replace(":sts::", ":iam::") if ":user/" in who.arn else who.arn)
            check.context.setdefault("aws:RequestedRegion", req.region or "us-east-1")
        return checks

    def _authorize(self, req: AwsRequest, entry: dict[str, Any]) -> Resp | None:
        """None when allowed (or not enforced); else AWS's denial."""
        policy = self.enforced_policy
        if policy is None or req.access_key not in self.enforced_keys or not req.action:
            return None
        denied = iampolicy.first_denied(policy, self._checks_for(req))
        if denied is None:
            return None
        check, decision = denied
        # CloudWatch's JSON protocol is awsQuery-compatible: its code stays AccessDenied.
        protocol = "query" if req.service == "monitoring" else req.protocol
        who = self._principal(req.access_key or "")
        arn = PRINCIPAL_ARN if req.access_key == "testing" else who.arn
        code, message, status = iampolicy.denial(check, decision, arn, protocol)
        with self.state_lock:
            entry["denied"] = {"action": check.action, "resource": check.resource}
            self.denials.append({"seq": entry["seq"], "service": req.service, "api": req.action,
                                 "action": check.action, "resource": check.resource})
        return error_response(req, code, message, status)

    def _policy_control(self, method: str, path: str, raw: bytes) -> tuple[int, Any]:
        if path == "/_localcloud/policy":
            if method == "GET":
                with self.state_lock:
                    return 200, {"policy": self.enforced_policy, "access_keys": self.enforced_keys,
                                 "denials": list(self.denials)}
            if method == "PUT":
                body = _json_body(raw)
                if not isinstance(body.get("policy"), dict):
                    raise ControlError(400, "'policy' must be a policy document")
                self.enforce(body["policy"], body.get("access_keys"))
                return 200, {"ok": True}
            if method == "DELETE":
                self.enforce(None)
                return 200, {"ok": True}
        if path == "/_localcloud/policy/simulate" and method == "POST":
            body = _json_body(raw)
            req = AwsRequest({"HTTP_AUTHORIZATION": ""}, b"")
            req.service, req.region, req.action = body.get("service"), body.get("region", "us-east-1"), body.get("action")
            req.params, req.json = body.get("params") or {}, body.get("json") or {}
            checks = self._checks_for(req)
            policy = self.enforced_policy or {}
            results = [{"action": c.action, "resource": c.resource,
                        "allowed": iampolicy.evaluate(policy, c).allowed} for c in checks]
            return 200, {"allowed": all(r["allowed"] for r in results), "checks": results}
        raise ControlError(404, f"no such control route: {method} {path}")


# ---------------------------------------------------------------------------
# 6. Where moto differs from AWS
# ---------------------------------------------------------------------------
# Everything that makes moto behave more like the real AWS lives here:
#  * moto settings (AMI/key pair/instance type validation, AWS-managed IAM
#    policies) are set in section 1, before moto is imported;
#  * public SSM parameters and their AMIs: Ubuntu 24.04 is seeded, AL2023 checked;
#  * DescribeSpotPriceHistory answers seeded, per-AZ prices;
#  * RunInstances: ClientToken idempotency, SpotMaxPriceTooLow, spot requests for spot launches,
#    "pending" for pending_seconds, request parameters kept for the state dump;
#  * TerminateInstances closes one-time spot requests;
#  * Describe/CancelSpotInstanceRequests: NotFound errors; cancel keeps the request;
#  * DeleteSecurityGroup: DependencyViolation while an instance uses the group;
#  * DescribeInstances understands the `iam-instance-profile.arn` filter;
#  * Budgets: UpdateBudget (moto lacks it);
#  * public IPs are loopback addresses, so an instance's public IP leads to its
#    simulated box on this machine (boxsim listens there on the SSH port);
#  * the default VPC has an internet gateway and a 0.0.0.0/0 route to it in its main
#    route table, as on AWS (moto's has neither);
#  * EC2 Instance Connect Endpoints (eice.py): Create/Describe/DeleteInstanceConnectEndpoint
#    with states on a clock, and the openTunnel WebSocket (SigV4-checked) relaying to boxsim;
#  * AuthorizeSecurityGroupIngress/Egress with several IpPermissions answer every rule they
#    made, as AWS does (moto answers only the last permission's);
#  * TerminateInstances on an instance already terminated succeeds, as on AWS (moto deleted its
#    network interface again and failed with InvalidNetworkInterfaceID.NotFound);
#  * two speed fixes: a faster reset and cheaper AWS-managed IAM policies.
# The fix functions run with moto_lock held, instead of handing the request
# straight to moto; each either answers itself, checks something first, or
# patches up moto's result afterwards.


def _patch_moto_iam_managed_policies() -> None:
    """Speed: moto builds the ~1500 AWS-managed IAM policies for every partition
    (aws, aws-cn, aws-us-gov, ...) the first time any request after a reset looks
    up its account, re-parsing a 3 MB JSON string each time (~0.6 s). We build
    them for the "aws" partition only, from JSON parsed once."""
    try:
        from moto.iam import models as iam_models
        from moto.settings import load_iam_aws_managed_policies
    except ImportError:
        return
    if not hasattr(iam_models.IAMBackend, "_init_aws_policies"):
        return
    parsed: dict[str, Any] = {}

    def _init_aws_policies(self: Any) -> list:
        if not load_iam_aws_managed_policies() or self.region_name != "aws":
            return []
        if not parsed:
            parsed.update(json.loads(iam_models.aws_managed_policies_data))
        return [iam_models.AWSManagedPolicy.from_data(name, self.account_id, self.region_name, d)
                for name, d in parsed.items()]

    iam_models.IAMBackend._init_aws_policies = _init_aws_policies


_patch_moto_iam_managed_policies()


def _patch_moto_instance_profile_filter() -> None:
    """AWS filters DescribeInstances by `iam-instance-profile.arn`; moto raises
    NotImplementedError for it. Teach moto's filter table the attribute."""
    try:
        from moto.ec2 import utils as ec2_utils
        from moto.ec2.models.instances import Instance
    except ImportError:
        return

    def profile_arn(self: Any) -> Any:
        profile = getattr(self, "iam_instance_profile", None)
        if isinstance(profile, dict):
            return profile.get("Arn")
        return str(profile) if profile else None

    Instance.iam_instance_profile_arn = property(profile_arn)
    ec2_utils.filter_dict_attribute_mapping["iam-instance-profile.arn"] = "iam_instance_profile_arn"


_patch_moto_instance_profile_filter()


_loopback_ips_used: set[str] = set()
_loopback_ips_lock = threading.Lock()


def loopback_public_ip() -> str:
    """A public IP for a new instance: a loopback address not used before in this process,
    random across processes (parallel test clouds share the host's loopback), and clear of
    127.0.0.0/12, where 127.0.0.1 and the usual host aliases live. Linux routes all of
    127.0.0.0/8 to lo, so boxsim's sshd can listen on it and the CLI can dial it directly."""
    import random

    with _loopback_ips_lock:
        while True:
            ip = f"127.{random.randint(16, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
            if ip not in _loopback_ips_used:
                _loopback_ips_used.add(ip)
                return ip


def _patch_moto_authorize_answers_every_rule() -> None:
    """AWS's AuthorizeSecurityGroupIngress/Egress answer ``securityGroupRuleSet`` with every
    rule the call added (API reference: "Information about the inbound/outbound security group
    rules that were added"); moto's response loops over the IpPermissions and keeps only the
    last one's rules. Here the rules of every permission are answered."""
    try:
        from moto.core.responses import ActionResult
        from moto.ec2.responses.security_groups import SecurityGroups
    except ImportError:
        return

    def answer(direction: str):
        def handler(self):  # type: ignore[no-untyped-def]
            self.error_on_dryrun()
            made = []
            backend = getattr(self.ec2_backend, f"authorize_security_group_{direction}")
            for kwargs in self._process_rules_from_querystring():
                rules, _ = backend(**kwargs)
                made.extend(rules)
            return ActionResult({"Return": True, "SecurityGroupRules": made})
        return handler

    SecurityGroups.authorize_security_group_ingress = answer("ingress")
    SecurityGroups.authorize_security_group_egress = answer("egress")


_patch_moto_authorize_answers_every_rule()


def _patch_moto_terminate_terminated() -> None:
    """AWS: terminating an instance that is already terminated succeeds and reports
    ``terminated`` as both its previous and current state ("TerminateInstances": "Terminated
    instances remain visible after termination (for approximately one hour)" and the call is
    idempotent). moto's Instance.terminate tears the instance's network interfaces down again,
    and one created from a NetworkInterface spec is gone the second time: the call failed with
    InvalidNetworkInterfaceID.NotFound. Here a terminated instance just answers its state."""
    try:
        from moto.ec2.models.instances import Instance
    except ImportError:
        return
    original = Instance.terminate

    def terminate(self):  # type: ignore[no-untyped-def]
        if getattr(getattr(self, "_state", None), "name", None) == "terminated":
            return copy.copy(self._state)
        return original(self)

    Instance.terminate = terminate


_patch_moto_terminate_terminated()


def _patch_moto_public_ips() -> None:
    try:
        from moto.ec2.models import elastic_network_interfaces as eni
    except ImportError:
        return
    eni.random_public_ip = loopback_public_ip


_patch_moto_public_ips()


def _patch_moto_default_vpc_gateway() -> None:
    """AWS's default VPC comes with an internet gateway and a main route table that sends
    0.0.0.0/0 to it ("Default VPCs": "Create an internet gateway and connect it to your default
    VPC"; "Add a route to the main route table that points all traffic (0.0.0.0/0) to the
    internet gateway"). moto's default VPC has neither, so its subnets would look private to
    anyone reading route tables. Here the default VPC gets both, whenever moto creates it (a
    region's first request, or CreateDefaultVpc)."""
    try:
        from moto.ec2.models.vpcs import VPCBackend
    except ImportError:
        return
    original = VPCBackend.create_default_vpc

    def create_default_vpc(self: Any) -> Any:
        vpc = original(self)
        igw = self.create_internet_gateway()
        self.attach_internet_gateway(igw.id, vpc.id)
        main = next((t for t in self.route_tables.values()
                     if t.vpc_id == vpc.id and t.main_association_id), None)
        if main is not None:
            self.create_route(main.id, "0.0.0.0/0", gateway_id=igw.id)
        return vpc

    VPCBackend.create_default_vpc = create_default_vpc


_patch_moto_default_vpc_gateway()


def _reset_moto() -> None:
    """Forget all moto state, like POST /moto-api/reset, but faster.

    moto's own reset re-initialises every region backend that was ever used (for
    EC2 that reloads ~1200 AMIs per region) and then throws them away. We drop
    them instead; they are re-created lazily on next use. Backends that release
    resources in reset() (s3 file handles, batch threads) still get it called.
    """
    try:
        from moto.core.base_backend import BackendDict, BaseBackend, backend_lock
        from moto.core.model_instances import reset_model_data
    except ImportError:  # a moto whose internals moved: take the slow, official path
        moto_api_backend.reset()
        return
    with backend_lock:
        for backend_dict in list(BackendDict._instances):
            for account_backend in backend_dict.values():
                for region_backend in list(account_backend.values()):
                    if type(region_backend).reset is not BaseBackend.reset:
                        region_backend.reset()
                account_backend.clear()
            backend_dict.clear()
        BackendDict._instances.clear()
    reset_model_data()


class LinkedSpotInstanceRequest(SpotInstanceRequest):
    """The spot request that RunInstances with MarketType=spot implies.

    Real AWS creates a one-time (or persistent) spot request for every instance
    launched with InstanceMarketOptions.MarketType=spot and reports its id as the
    instance's SpotInstanceRequestId; moto only marks the instance as spot. This
    moto SpotInstanceRequest points at the already launched instance instead of
    launching one of its own.
    """

    __module__ = SpotInstanceRequest.__module__  # moto files models by module path
    created_by = "RunInstances"

    def __init__(self, backend: Any, instance: Any, price: str | None,
                 spot_type: str | None, interruption: str | None,
                 tags: dict[str, str] | None):
        self._linked_instance = instance
        super().__init__(
            ec2_backend=backend, spot_request_id=random_spot_request_id(), price=price,
            image_id=instance.image_id, spot_instance_type=spot_type or "one-time",
            valid_from=None, valid_until=None, launch_group=None,
            availability_zone_group=None, key_name=instance.key_name,
            security_groups=[g.id for g in (instance.security_groups or [])],
            user_data=instance.user_data, instance_type=instance.instance_type,
            placement=instance.placement.zone, kernel_id=None, ramdisk_id=None,
            monitoring_enabled=False, subnet_id=instance.subnet_id,
            tags={"spot-instances-request": tags or {}}, spot_fleet_id=None,
            instance_interruption_behaviour=interruption or "terminate")

    def launch_instance(self) -> Any:
        return self._linked_instance


class MotoFixes:
    """moto-gap fixes (mixed into LocalCloud, section 9)."""

    # -- public SSM parameters and AMIs ---------------------------------------
    def ensure_region(self, region: str | None) -> None:
        """Seed the public SSM parameters and their AMIs into a region (once per reset).

        moto creates a region's backends lazily; we seed lazily too, on the first
        request (or state dump) that names the region, which keeps reset fast.
        """
        if not region or region in self.seeded_regions:
            return
        from moto.ec2.models import ec2_backends
        from moto.ssm.models import ssm_backends

        with self.moto_lock:
            if region in self.seeded_regions:
                return
            if region not in ec2_backends[ACCOUNT_ID].regions:
                return  # not an EC2 region (e.g. "aws" for global services)
            ec2 = ec2_backends[ACCOUNT_ID][region]
            params = ssm_backends[ACCOUNT_ID][region]._parameters
            seeded: dict[str, str] = {}
            # Ubuntu 24.04 (noble): moto ships neither the AMIs nor the parameters.
            for arch, machine in (("amd64", "x86_64"), ("arm64", "arm64")):
                ami_id = self._register_ami(
                    ec2, region, key=f"ubuntu-noble/{arch}",
                    name=f"ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-{arch}-server-20261101",
                    description=f"Canonical, Ubuntu, 24.04, {arch} noble image",
                    owner=CANONICAL_OWNER_ID, alias=None, arch=machine,
                    root_device="/dev/sda1", created="2026-11-01T00:00:00.000Z")
                name = (f"/aws/service/canonical/ubuntu/server/24.04/stable/current/"
                        f"{arch}/hvm/ebs-gp3/ami-id")
                self._put_public_param(params, name, ami_id)
                seeded[name] = ami_id
            # Amazon Linux 2023: moto ships these for its known regions (lazily
            # loaded on first access, which the membership test triggers).
            for machine in ("x86_64", "arm64"):
                name = f"/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{machine}"
                value = params[name][-1].value if name in params and params[name] else None
                if not value or value not in ec2.amis:
                    value = self._register_ami(
                        ec2, region, key=f"al2023/{machine}",
                        name=f"al2023-ami-2023.9.20261101.0-kernel-6.1-{machine}",
                        description="Amazon Linux 2023 AMI", owner=AMAZON_OWNER_ID,
                        alias="amazon", arch=machine, root_device="/dev/xvda",
                        created="2026-11-01T00:00:00.000Z")
                    self._put_public_param(params, name, value)
                seeded[name] = value
            self.public_params[region] = seeded
            self.seeded_regions.add(region)

    @staticmethod
    def _register_ami(ec2: Any, region: str, key: str, name: str, description: str,
                      owner: str, alias: str | None, arch: str, root_device: str,
                      created: str) -> str:
        from moto.core.parse import default_timestamp_parser
        from moto.ec2.models.amis import Ami

        # Deterministic per region, so repeated runs see the same ids.
        ami_id = "ami-0" + hashlib.sha256(f"localcloud/{key}/{region}".encode()).hexdigest()[:16]
        if ami_id not in ec2.amis:
            ec2.amis[ami_id] = Ami(
                ec2, ami_id, name=name, description=description, owner_id=owner,
                owner_alias=alias, public=True, virtualization_type="hvm",
                architecture=arch, root_device_type="ebs", root_device_name=root_device,
                hypervisor="xen", image_location=f"{owner}/{name}",
                creation_date=default_timestamp_parser(created), region_name=f"{region}a",
                boot_mode="uefi-preferred" if arch == "x86_64" else "uefi")
        return ami_id

    @staticmethod
    def _put_public_param(params: Any, name: str, value: str) -> None:
        from moto.ssm.models import Parameter

        # moto refuses PutParameter under /aws/, so write into its store directly.
        params[name].clear()
        params[name].append(Parameter(
            account_id=ACCOUNT_ID, name=name, value=value, parameter_type="String",
            description=None, allowed_pattern=None, keyid=None,
            last_modified_date=time.time(), version=1, data_type="aws:ec2:image"))

    # -- spot prices ------------------------------------------------------------
    def availability_zones(self, region: str) -> list[str]:
        if region not in self._az_cache:
            with self.moto_lock:
                zones = self.ec2_backend(region).describe_availability_zones()
                self._az_cache[region] = [z.name for z in zones]
        return self._az_cache[region]

    def _offered_types(self, region: str) -> dict[str, set[str]] | None:
        """{az: instance types moto says are offered there}, or None if moto doesn't know."""
        if region not in self._offerings_cache:
            from moto.ec2.models.instance_types import INSTANCE_TYPE_OFFERINGS

            rows = INSTANCE_TYPE_OFFERINGS.get("availability-zone", {}).get(region)
            table: dict[str, set[str]] | None = None
            if rows:
                table = {}
                for row in rows:
                    table.setdefault(row["Location"], set()).add(row["InstanceType"])
            self._offerings_cache[region] = table
        return self._offerings_cache[region]

    def spot_price_table(self, region: str) -> dict[tuple[str, str], tuple[float, float]]:
        """{(az, instance_type): (price, timestamp)}: the seeded prices plus overrides.

        An AZ only gets a price for the types moto offers there (DescribeInstanceType-
        Offerings); e.g. us-east-1e offers none of the t3/t4g/m5/c5 types above.
        """
        offered = self._offered_types(region)
        table: dict[tuple[str, str], tuple[float, float]] = {}
        for az in self.availability_zones(region):
            for itype in ON_DEMAND_USD:
                if offered is not None and itype not in offered.get(az, set()):
                    continue
                price = seeded_spot_price(region, az, itype)
                if price is not None:
                    table[(az, itype)] = (price, self.prices_epoch)
        with self.state_lock:
            for az, types in self.price_overrides.get(region, {}).items():
                for itype, (price, stamp) in types.items():
                    if price is None:
                        table.pop((az, itype), None)  # null override = no spot offer there
                    else:
                        table[(az, itype)] = (price, stamp)
        return table

    def _fix_describe_spot_price_history(self, req: AwsRequest, environ: dict) -> Resp:
        """moto answers a constant 0.00001 for everything; we answer seeded prices.

        Honoured: InstanceType.N, ProductDescription.N, AvailabilityZone,
        Filter.N (availability-zone, instance-type, product-description,
        spot-price; '*' and '?' wildcards), MaxResults/NextToken. Only the newest
        price per AZ, type and product is returned (StartTime/EndTime are ignored).
        """
        p = req.params or {}
        region = req.region or "us-east-1"
        types = set(list_param(p, "InstanceType"))
        products = set(list_param(p, "ProductDescription"))
        zone = p.get("AvailabilityZone")
        filters = filters_param(p)
        rows = []
        for (az, itype), (price, stamp) in sorted(self.spot_price_table(region).items(),
                                                  key=lambda kv: (kv[0][1], kv[0][0])):
            for product in PRODUCT_DESCRIPTIONS:
                row = {"availability-zone": az, "instance-type": itype,
                       "product-description": product, "spot-price": f"{price:.6f}",
                       "timestamp": aws_timestamp(stamp)}
                if types and itype not in types:
                    continue
                if products and product not in products:
                    continue
                if zone and az != zone:
                    continue
                if any(not any(fnmatchcase(row.get(name, ""), v) for v in values)
                       for name, values in filters.items() if name in row):
                    continue
                rows.append(row)
        try:
            start = int(p.get("NextToken") or 0)
        except ValueError:
            return error_response(req, "InvalidNextToken", "The specified token is invalid.", 400)
        try:
            max_results = max(1, min(1000, int(p.get("MaxResults") or 1000)))
        except ValueError:
            max_results = 1000
        page = rows[start:start + max_results]
        items = "".join(
            f"<item><instanceType>{r['instance-type']}</instanceType>"
            f"<productDescription>{xml_escape(r['product-description'])}</productDescription>"
            f"<spotPrice>{r['spot-price']}</spotPrice><timestamp>{r['timestamp']}</timestamp>"
            f"<availabilityZone>{r['availability-zone']}</availabilityZone></item>"
            for r in page)
        inner = f"<spotPriceHistorySet>{items}</spotPriceHistorySet>"
        if start + max_results < len(rows):
            inner += f"<nextToken>{start + max_results}</nextToken>"
        return ec2_response("DescribeSpotPriceHistory", inner)

    # -- instances ------------------------------------------------------------
    def _launch_az(self, backend: Any, p: dict[str, str]) -> str:
        """The AZ a RunInstances request lands in, as moto will decide it."""
        if p.get("Placement.AvailabilityZone"):
            return p["Placement.AvailabilityZone"]
        subnet_id = p.get("SubnetId") or p.get("NetworkInterface.1.SubnetId")
        if subnet_id:
            try:
                return backend.get_subnet(subnet_id).availability_zone
            except Exception:
                pass
        return f"{backend.region_name}a"

    def _fix_run_instances(self, req: AwsRequest, environ: dict) -> Resp:
        """RunInstances, made to look more like AWS:

        * a spot MaxPrice below the current spot price fails with
          SpotMaxPriceTooLow, as on AWS (moto ignores MaxPrice);
        * spot launches (InstanceMarketOptions.MarketType=spot) get a spot
          instance request and SpotInstanceRequestId, as on AWS;
        * with pending_seconds > 0 the new instances stay "pending" that long
          (moto makes them "running" at once; its response already says pending);
        * the request parameters are kept per instance for the state dump, since
          moto drops many of them (SpotOptions, CreditSpecification, ...).
        """
        p = req.params or {}
        region = req.region or "us-east-1"
        backend = self.ec2_backend(region)
        token_key, repeated = self._client_token_answer(req)
        if repeated is not None:
            return repeated
        spot = p.get("InstanceMarketOptions.MarketType") == "spot"
        max_price = p.get("InstanceMarketOptions.SpotOptions.MaxPrice")
        itype = p.get("InstanceType", "m1.small")
        if spot and max_price:
            az = self._launch_az(backend, p)
            current = self.spot_price_table(region).get((az, itype))
            try:
                too_low = current is not None and float(max_price) < current[0]
            except ValueError:
                too_low = False
            if too_low:
                return error_response(
                    req, "SpotMaxPriceTooLow",
                    f"Your Spot request price of {max_price} is lower than the minimum "
                    f"required Spot request fulfillment price of {current[0]:.4f}.", 400)
        resp = self._call_moto(environ)
        if resp.status != 200:
            return resp
        ids = re.findall(r"<instanceId>(i-[0-9a-f]+)</instanceId>", resp.text())
        text = resp.text()
        for instance_id in ids:
            self.launch_requests[instance_id] = dict(p)
            if spot:
                instance = backend.get_instance(instance_id)
                price = max_price
                if not price:
                    od = on_demand_price(region, itype)
                    price = f"{od}" if od is not None else None
                request = LinkedSpotInstanceRequest(
                    backend, instance, price=price,
                    spot_type=p.get("InstanceMarketOptions.SpotOptions.SpotInstanceType"),
                    interruption=p.get(
                        "InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"),
                    tags=tag_specs_param(p).get("spot-instances-request"))
                backend.spot_instance_requests[request.id] = request
                instance.spot_instance_request_id = request.id
                text = text.replace(
                    f"<instanceId>{instance_id}</instanceId>",
                    f"<instanceId>{instance_id}</instanceId>"
                    f"<spotInstanceRequestId>{request.id}</spotInstanceRequestId>", 1)
        self._hold_pending(region, ids)
        if spot:
            resp = resp.with_body(text.encode())
        if token_key is not None:
            self.client_tokens[token_key] = (self._idempotent_params(p), resp)
        self._fire(self._launch_hooks, region, ids)
        return resp

    @staticmethod
    def _idempotent_params(p: dict[str, str]) -> dict[str, str]:
        """The parameters a repeated ClientToken must repeat (AWS: all but region and zone)."""
        return {k: v for k, v in p.items() if k not in ("Placement.AvailabilityZone", "Version")}

    def _client_token_answer(self, req: AwsRequest) -> tuple[Any, Resp | None]:
        """EC2 idempotency (moto ignores ClientToken): a RunInstances that repeats the
        ClientToken of one that succeeded, in the same account and region, launches nothing
        and answers with the first one's reservation; with other parameters it fails with
        IdempotentParameterMismatch. Returns (key to remember a success under, answer)."""
        p = req.params or {}
        token = p.get("ClientToken")
        if not token:
            return None, None
        from moto.iam.models import get_account_id_from
        key = (get_account_id_from(req.access_key or ""), req.region or "us-east-1", token)
        known = self.client_tokens.get(key)
        if known is None:
            return key, None
        params, resp = known
        if params != self._idempotent_params(p):
            return key, error_response(
                req, "IdempotentParameterMismatch",
                "Arguments on this idempotent request are inconsistent with arguments used in "
                "previous request(s).", 400)
        return key, resp

    def _fix_request_spot_instances(self, req: AwsRequest, environ: dict) -> Resp:
        """moto launches the instances but does not set their SpotInstanceRequestId."""
        resp = self._call_moto(environ)
        if resp.status != 200:
            return resp
        region = req.region or "us-east-1"
        backend = self.ec2_backend(region)
        ids = []
        for request_id in re.findall(r"<spotInstanceRequestId>(sir-[0-9a-z]+)<", resp.text()):
            request = backend.spot_instance_requests.get(request_id)
            instance = getattr(request, "instance", None)
            if instance is not None:
                instance.spot_instance_request_id = request_id
                ids.append(instance.id)
        self._hold_pending(region, ids)
        self._fire(self._launch_hooks, region, ids)
        return resp

    def _hold_pending(self, region: str, instance_ids: list[str]) -> None:
        """Keep new instances 'pending' for pending_seconds, then make them 'running'."""
        with self.state_lock:
            seconds = self.pending_seconds
        if seconds <= 0 or not instance_ids:
            return
        backend = self.ec2_backend(region)
        for instance_id in instance_ids:
            instance = backend.get_instance(instance_id)
            instance._state.name, instance._state.code = "pending", 0
        generation = self.generation

        def to_running() -> None:
            with self.moto_lock:
                self.timers.discard(timer)
                if generation != self.generation:
                    return
                for instance_id in instance_ids:
                    try:
                        instance = backend.get_instance(instance_id)
                    except Exception:
                        continue
                    if instance.state == "pending":  # not terminated/stopped meanwhile
                        instance._state.name, instance._state.code = "running", 16

        timer = threading.Timer(seconds, to_running)
        timer.daemon = True
        self.timers.add(timer)
        timer.start()

    def _fix_terminate_instances(self, req: AwsRequest, environ: dict) -> Resp:
        """AWS closes a one-time spot request when its instance terminates; moto doesn't."""
        resp = self._call_moto(environ)
        if resp.status == 200:
            region = req.region or "us-east-1"
            ids = list_param(req.params or {}, "InstanceId")
            self._close_spot_requests(self.ec2_backend(region), ids, None)
            self._fire(self._terminate_hooks, region, ids)
        return resp

    @staticmethod
    def _set_termination_reason(instance: Any, reason: str | None) -> None:
        from moto.ec2.models.instances import StateReason

        stamp = utcnow().strftime("%Y-%m-%d %H:%M:%S GMT")
        if reason == "spot":
            instance._reason = f"Service initiated ({stamp})"
            instance.state_reason = StateReason(
                "Server.SpotInstanceTermination: Spot instance termination",
                "Server.SpotInstanceTermination")
        elif reason == "shutdown":
            instance._reason = f"User initiated ({stamp})"
            instance.state_reason = StateReason(
                "Client.InstanceInitiatedShutdown: Instance initiated shutdown",
                "Client.InstanceInitiatedShutdown")

    @staticmethod
    def _close_spot_requests(backend: Any, instance_ids: list[str], reason: str | None) -> None:
        status = ("instance-terminated-by-price" if reason == "spot"
                  else "instance-terminated-by-user")
        for request in backend.spot_instance_requests.values():
            instance = getattr(request, "instance", None)
            if instance is None or instance.id not in instance_ids:
                continue
            if request.state in ("cancelled", "closed"):
                continue
            request.state = "closed" if request.type == "one-time" else "open"
            request._status_code = status
            request.status_message = "Spot Instance terminated."

    # -- spot requests ------------------------------------------------------------
    def _unknown_spot_request(self, req: AwsRequest) -> Resp | None:
        """AWS answers InvalidSpotInstanceRequestID.NotFound (400) for unknown ids;
        moto gives an empty list (Describe) or an HTTP 500 (Cancel)."""
        backend = self.ec2_backend(req.region or "us-east-1")
        for request_id in list_param(req.params or {}, "SpotInstanceRequestId"):
            if request_id not in backend.spot_instance_requests:
                return error_response(
                    req, "InvalidSpotInstanceRequestID.NotFound",
                    f"The spot instance request ID '{request_id}' does not exist", 400)
        return None

    def _fix_describe_spot_instance_requests(self, req: AwsRequest, environ: dict) -> Resp:
        return self._unknown_spot_request(req) or self._call_moto(environ)

    def _fix_cancel_spot_instance_requests(self, req: AwsRequest, environ: dict) -> Resp:
        """Also: AWS keeps a cancelled request (state "cancelled", instance left
        running); moto deletes it. We answer ourselves and keep it."""
        error = self._unknown_spot_request(req)
        if error:
            return error
        backend = self.ec2_backend(req.region or "us-east-1")
        items = []
        for request_id in list_param(req.params or {}, "SpotInstanceRequestId"):
            request = backend.spot_instance_requests[request_id]
            if request.state not in ("closed", "cancelled"):
                instance = getattr(request, "instance", None)
                running = instance is not None and instance.state in ("pending", "running")
                request.state = "cancelled"
                request._status_code = ("request-canceled-and-instance-running" if running
                                        else "canceled-before-fulfillment")
                request.status_message = "Spot Instance request canceled by user."
            items.append(f"<item><spotInstanceRequestId>{request_id}</spotInstanceRequestId>"
                         f"<state>{request.state}</state></item>")
        return ec2_response("CancelSpotInstanceRequests",
                            f"<spotInstanceRequestSet>{''.join(items)}</spotInstanceRequestSet>")

    # -- security groups ------------------------------------------------------------
    def _fix_delete_security_group(self, req: AwsRequest, environ: dict) -> Resp:
        """AWS refuses to delete a group that a non-terminated instance uses
        (DependencyViolation, 400); moto deletes it."""
        p = req.params or {}
        backend = self.ec2_backend(req.region or "us-east-1")
        group = None
        if p.get("GroupId"):
            group = backend.get_security_group_from_id(p["GroupId"])
        elif p.get("GroupName"):
            group = backend.get_security_group_by_name_or_id(p["GroupName"])
        if group is not None:
            for instance in backend.all_instances():
                if instance.state == "terminated":
                    continue
                if group.id in _instance_group_ids(instance):
                    return error_response(
                        req, "DependencyViolation",
                        f"resource {group.id} has a dependent object", 400)
            # An EC2 Instance Connect Endpoint's network interface holds its groups until the
            # endpoint's delete completes (eice.py).
            if self.eice is not None and self.eice.uses_group(req.region or "us-east-1", group.id):
                return error_response(req, "DependencyViolation",
                                      f"resource {group.id} has a dependent object", 400)
        return self._call_moto(environ)


    # -- budgets ---------------------------------------------------------------------
    def _fix_update_budget(self, req: AwsRequest, environ: dict) -> Resp:
        """AWS Budgets' UpdateBudget replaces a budget's definition and keeps its
        notifications; moto does not implement it."""
        from moto.budgets.models import budgets_backends

        body = req.json if isinstance(req.json, dict) else {}
        account = body.get("AccountId") or ACCOUNT_ID
        new = body.get("NewBudget") or {}
        backend = budgets_backends[account]["global"]
        existing = backend.budgets[account].get(new.get("BudgetName", ""))
        if existing is None:
            return error_response(req, "NotFoundException",
                                  f"Unable to update budget: {new.get('BudgetName')} - the budget doesn't exist.", 400)
        kept = {k: v for k, v in existing.budget.items() if k in ("TimePeriod", "CalculatedSpend")}
        existing.budget = {**new, **kept, "LastUpdatedTime": time.time()}
        out = b"{}"
        return Resp(200, [("Content-Type", "application/x-amz-json-1.1"), ("Content-Length", str(len(out)))], out)


    def _fix_get_caller_identity(self, req: AwsRequest, environ: dict) -> Resp:
        """Who signs with the key, as policy evaluation sees them (`_principal`): the tests'
        PRINCIPALS, a role session moto's STS issued, else the default user. (moto answers one
        default user, with an access key id for its user id, for any key it did not issue.)"""
        who = self._principal(req.access_key or "")
        body = (f'<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
                f'<GetCallerIdentityResult><Arn>{who.arn}</Arn><UserId>{who.userid}</UserId>'
                f'<Account>{who.arn.split(":")[4] or ACCOUNT_ID}</Account></GetCallerIdentityResult>'
                f'<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata>'
                f'</GetCallerIdentityResponse>').encode()
        return Resp(200, [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))], body)

    def _fix_eice(self, req: AwsRequest, environ: dict) -> Resp:
        """moto has no EC2 Instance Connect Endpoints: eice.py answers (moto_lock is held)."""
        if self.eice is None:
            return self._call_moto(environ)
        try:
            inner = self.eice.api(req.action or "", req.region or "us-east-1", dict(req.params or {}))
        except eice_gap.EiceError as exc:
            return error_response(req, exc.code, exc.message, exc.status)
        return ec2_response(req.action or "", inner)

    def _fix_validate_policy(self, req: AwsRequest, environ: dict) -> Resp:
        """IAM Access Analyzer ValidatePolicy (moto has no Access Analyzer): a documented
        minimal validator, see validate_policy() and README, "Where moto differs"."""
        body = req.json if isinstance(req.json, dict) else {}
        findings = validate_policy(body.get("policyDocument") or "", body.get("policyType") or "")
        out = json.dumps({"findings": findings}).encode()
        return Resp(200, [("Content-Type", "application/json"), ("Content-Length", str(len(out)))], out)


LEARN_MORE = "https://docs.aws.amazon.com/IAM/latest/UserGuide/access-analyzer-reference-policy-checks.html"
KNOWN_SERVICES = {"ec2", "iam", "sts", "ssm", "ssmmessages", "ec2messages", "cloudwatch", "logs", "scheduler",
                  "budgets", "access-analyzer", "s3", "kms", "events", "ec2-instance-connect"}
KNOWN_OPERATORS = re.compile(r"^(ForAllValues:|ForAnyValue:)?(String(Not)?Equals(IgnoreCase)?|String(Not)?Like|"
                             r"Arn(Not)?(Equals|Like)|Numeric\w+|Date\w+|Bool|BinaryEquals|"
                             r"(Not)?IpAddress)(IfExists)?$|^Null$")


def validate_policy(document: str, policy_type: str) -> list[dict[str, Any]]:
    """A few of Access Analyzer's checks, with its finding shape and issue codes:
    ERROR for unparsable JSON, a missing Statement, an action without a service
    prefix, an unknown service, an unknown condition operator; SECURITY_WARNING
    for iam:PassRole on Resource "*"; WARNING for Allow with NotAction or
    NotResource; SUGGESTION for a missing or old Version."""
    def finding(kind: str, code: str, details: str) -> dict[str, Any]:
        return {"findingType": kind, "issueCode": code, "findingDetails": details,
                "learnMoreLink": f"{LEARN_MORE}#access-analyzer-reference-policy-checks-{code.lower()}",
                "locations": []}

    try:
        doc = json.loads(document)
    except ValueError as exc:
        return [finding("ERROR", "JSON_SYNTAX_ERROR", f"The policy is not valid JSON: {exc}")]
    out = []
    if doc.get("Version") != "2012-10-17":
        out.append(finding("SUGGESTION", "MISSING_VERSION",
                           "Specify Version 2012-10-17 for the latest policy language."))
    statements = doc.get("Statement")
    if not statements:
        return out + [finding("ERROR", "MISSING_STATEMENT", "Add a Statement element.")]
    for st in statements if isinstance(statements, list) else [statements]:
        actions = st.get("Action", st.get("NotAction", []))
        for action in actions if isinstance(actions, list) else [actions]:
            if action == "*":
                continue
            service, sep, _ = action.partition(":")
            if not sep:
                out.append(finding("ERROR", "INVALID_ACTION", f"The action {action} does not exist."))
            elif service.lower() not in KNOWN_SERVICES:
                out.append(finding("ERROR", "INVALID_SERVICE", f"The service {service} does not exist."))
        resources = st.get("Resource", [])
        resources = resources if isinstance(resources, list) else [resources]
        acts = actions if isinstance(actions, list) else [actions]
        if st.get("Effect") == "Allow" and "*" in resources and \
                any(a.lower() in ("iam:passrole", "iam:*", "*") for a in acts) and "Action" in st:
            out.append(finding("SECURITY_WARNING", "PASS_ROLE_WITH_STAR_IN_RESOURCE",
                               "Using iam:PassRole with a wildcard in the resource can be overly permissive."))
        if st.get("Effect") == "Allow" and ("NotAction" in st or "NotResource" in st):
            out.append(finding("WARNING", "ALLOW_WITH_NOT_ACTION" if "NotAction" in st
                               else "ALLOW_WITH_NOT_RESOURCE",
                               "Allow with NotAction/NotResource can grant more than intended."))
        for operator in (st.get("Condition") or {}):
            if not KNOWN_OPERATORS.match(operator):
                out.append(finding("ERROR", "INVALID_OPERATOR", f"The condition operator {operator} is not valid."))
    return out


MOTO_FIXES: dict[tuple[str, str], Callable[[LocalCloud, AwsRequest, dict], Resp]] = {
    ("budgets", "UpdateBudget"): MotoFixes._fix_update_budget,
    ("ec2", "DescribeSpotPriceHistory"): MotoFixes._fix_describe_spot_price_history,
    ("ec2", "RunInstances"): MotoFixes._fix_run_instances,
    ("ec2", "RequestSpotInstances"): MotoFixes._fix_request_spot_instances,
    ("ec2", "TerminateInstances"): MotoFixes._fix_terminate_instances,
    ("ec2", "DescribeSpotInstanceRequests"): MotoFixes._fix_describe_spot_instance_requests,
    ("ec2", "CancelSpotInstanceRequests"): MotoFixes._fix_cancel_spot_instance_requests,
    ("ec2", "DeleteSecurityGroup"): MotoFixes._fix_delete_security_group,
    ("access-analyzer", "ValidatePolicy"): MotoFixes._fix_validate_policy,
    ("ec2", "CreateInstanceConnectEndpoint"): MotoFixes._fix_eice,
    ("ec2", "DescribeInstanceConnectEndpoints"): MotoFixes._fix_eice,
    ("ec2", "DeleteInstanceConnectEndpoint"): MotoFixes._fix_eice,
    ("sts", "GetCallerIdentity"): MotoFixes._fix_get_caller_identity,
}


def _instance_group_ids(instance: Any) -> list[str]:
    ids = [g.id for g in (getattr(instance, "security_groups", None) or [])]
    for nic in (getattr(instance, "nics", None) or {}).values():
        for group in getattr(nic, "group_set", None) or []:
            gid = getattr(group, "id", group)
            if gid not in ids:
                ids.append(gid)
    return ids


# ---------------------------------------------------------------------------
# 7. Control API (JSON in/out under /_localcloud/; not logged, not delayed)
# ---------------------------------------------------------------------------
class ControlError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _json_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ControlError(400, f"body is not JSON: {exc}")
    if not isinstance(doc, dict):
        raise ControlError(400, "body must be a JSON object")
    return doc


class ControlAPI:
    """GET/POST/PUT/DELETE /_localcloud/... (mixed into LocalCloud, section 9)."""

    def _control(self, environ: dict[str, Any]) -> Resp:
        method = environ.get("REQUEST_METHOD", "GET").upper()
        path = (environ.get("PATH_INFO", "") or "").rstrip("/")
        query = dict(parse_qsl(environ.get("QUERY_STRING", "")))
        raw = self._read_body(environ)
        try:
            status, doc = self._dispatch_control(method, path, query, raw, environ)
        except ControlError as exc:
            status, doc = exc.status, {"error": str(exc)}
        except ValueError as exc:
            status, doc = 400, {"error": str(exc)}
        body = json.dumps(doc, default=str, indent=None).encode()
        return Resp(status, [("Content-Type", "application/json"),
                             ("Content-Length", str(len(body)))], body)

    def _dispatch_control(self, method: str, path: str, query: dict[str, str],
                          raw: bytes, environ: dict[str, Any]) -> tuple[int, Any]:
        if path == "/_localcloud/health" and method == "GET":
            with self.state_lock:
                return 200, {"ok": True, "url": self.base_url, "calls": len(self.calls),
                             "internal_errors": self.internal_errors}

        if path.startswith("/_localcloud/policy"):
            return self._policy_control(method, path, raw)

        if path == "/_localcloud/reset" and method == "POST":
            took = self.reset()
            return 200, {"ok": True, "seconds": round(took, 4)}

        if path == "/_localcloud/rules":
            if method == "GET":
                with self.state_lock:
                    return 200, {"rules": [r.to_json() for r in self.rules]}
            if method == "PUT":
                specs = _json_body(raw).get("rules", [])
                if not isinstance(specs, list):
                    raise ControlError(400, "'rules' must be a list")
                rules = [FaultRule(s) for s in specs]
                with self.state_lock:
                    self.rules = rules
                    return 200, {"rules": [r.to_json() for r in self.rules]}
            if method == "POST":
                rule = FaultRule(_json_body(raw).get("rule"))
                with self.state_lock:
                    self.rules.append(rule)
                    return 200, {"rules": [r.to_json() for r in self.rules]}
            if method == "DELETE":
                with self.state_lock:
                    self.rules = []
                return 200, {"rules": []}

        if path == "/_localcloud/config":
            if method == "PUT":
                doc = _json_body(raw)
                unknown = set(doc) - {"delay_ms", "pending_seconds", "spot_prices"}
                if unknown:
                    raise ControlError(400, f"unknown config keys: {sorted(unknown)}")
                prices = doc.get("spot_prices") or {}
                if not isinstance(prices, dict):
                    raise ControlError(400, "'spot_prices' must be {region: {az: {type: price}}}")
                now = time.time()
                with self.state_lock:
                    if "delay_ms" in doc:
                        self.delay_ms = float(doc["delay_ms"] or 0)
                    if "pending_seconds" in doc:
                        self.pending_seconds = float(doc["pending_seconds"] or 0)
                    for region, zones in prices.items():
                        for az, types in (zones or {}).items():
                            for itype, price in (types or {}).items():
                                value = None if price is None else float(price)
                                self.price_overrides.setdefault(region, {}).setdefault(az, {})[
                                    itype] = (value, now)
            if method in ("PUT", "GET"):
                with self.state_lock:
                    return 200, {
                        "delay_ms": self.delay_ms, "pending_seconds": self.pending_seconds,
                        "spot_prices": {r: {az: {t: v[0] for t, v in types.items()}
                                            for az, types in zones.items()}
                                        for r, zones in self.price_overrides.items()}}

        if path == "/_localcloud/log":
            if method == "GET":
                with self.state_lock:
                    calls = [dict(c) for c in self.calls]
                for key in ("service", "action", "region"):
                    if key in query:
                        calls = [c for c in calls if c.get(key) == query[key]]
                return 200, {"calls": calls}
            if method == "DELETE":
                with self.state_lock:
                    self.calls = []
                return 200, {"calls": []}

        if path == "/_localcloud/spot-prices" and method == "GET":
            region = query.get("region", "us-east-1")
            with self.moto_lock:
                table = self.spot_price_table(region)
            prices: dict[str, dict[str, float]] = {}
            for (az, itype), (price, _) in sorted(table.items()):
                prices.setdefault(az, {})[itype] = price
            return 200, {"region": region, "prices": prices,
                         "on_demand": {t: on_demand_price(region, t) for t in ON_DEMAND_USD}}

        if path == "/_localcloud/state" and method == "GET":
            return 200, self.state_dump(query.get("region", "us-east-1"))

        for route_method, prefix, handler in self.routes:
            if method == route_method and (path == prefix.rstrip("/") or
                                           (path + "/").startswith(prefix.rstrip("/") + "/")):
                result = handler(environ, raw)
                status, doc = result
                return int(status), doc

        raise ControlError(404, f"no control route {method} {path}")


# ---------------------------------------------------------------------------
# 8. State dump
# ---------------------------------------------------------------------------
# Read straight from moto's backends. Every field is fetched defensively:
# whatever moto does not keep comes back as null instead of failing the dump.
# Read straight from moto's backends. Every field is fetched defensively:
# whatever moto does not keep comes back as null instead of failing the dump.
def _get(obj: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        try:
            value = getattr(obj, name)
        except Exception:
            continue
        if value is not None:
            return value
    return default


def _safe(fn: Callable[[], Any], default: Any = None) -> Any:
    try:
        return fn()
    except Exception:
        log.debug("state dump field failed:\n%s", traceback.format_exc())
        return default


def _tags(backend: Any, resource_id: str) -> dict[str, str]:
    tags = getattr(backend, "tags", None)
    if isinstance(tags, dict):
        return dict(tags.get(resource_id, {}))
    return {}


def _user_data(instance: Any) -> tuple[str | None, str | None]:
    """(text, base64) of an instance's user data. gzip is unpacked."""
    data = getattr(instance, "user_data", None)
    if data is None:
        return None, None
    if isinstance(data, list):  # older moto kept a list
        data = data[0] if data else None
        if data is None:
            return None, None
    if hasattr(data, "_encoded_string"):
        encoded = data._encoded_string
    elif isinstance(data, bytes):
        encoded = data.decode("ascii", "replace")
    else:
        encoded = str(data)
    try:
        raw = base64.b64decode(encoded)
    except Exception:
        return encoded, encoded
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except OSError:
            pass
    return raw.decode("utf-8", "replace"), encoded


def _dims(dimensions: Any) -> dict[str, Any]:
    out = {}
    for d in dimensions or []:
        if isinstance(d, dict):
            out[d.get("Name") or d.get("name")] = d.get("Value") or d.get("value")
        else:
            out[_get(d, "name")] = _get(d, "value")
    return out


def _dump_instance(cloud: LocalCloud, backend: Any, inst: Any) -> dict[str, Any]:
    text, b64 = _safe(lambda: _user_data(inst), (None, None))
    profile = _get(inst, "iam_instance_profile")
    profile_doc = None
    if profile:
        arn = profile.get("Arn") if isinstance(profile, dict) else str(profile)
        profile_doc = {"arn": arn, "name": arn.rsplit("/", 1)[-1] if arn else None,
                       "association_id": profile.get("Id") if isinstance(profile, dict)
                       else None}
    mo = _get(inst, "metadata_options")
    metadata = None
    if mo is not None:
        metadata = {"state": _get(mo, "state"), "http_tokens": _get(mo, "http_tokens"),
                    "http_put_response_hop_limit": _get(mo, "http_put_response_hop_limit"),
                    "http_endpoint": _get(mo, "http_endpoint"),
                    "http_protocol_ipv6": _get(mo, "http_protocol_ipv6"),
                    "instance_metadata_tags": _get(mo, "instance_metadata_tags")}
    bdms = []
    for device, bdt in _safe(lambda: list(inst.block_device_mapping.items()), []):
        volume = _safe(lambda: backend.get_volume(bdt.volume_id))
        bdms.append({
            "device_name": device, "volume_id": bdt.volume_id,
            "delete_on_termination": bool(_get(bdt, "delete_on_termination", default=False)),
            "size": _get(volume, "size") if volume else _get(bdt, "size"),
            "volume_type": _get(volume, "volume_type") if volume else None,
            "encrypted": bool(_get(volume, "encrypted", default=False)) if volume else None,
            "kms_key_id": _get(volume, "kms_key_id") if volume else None,
            "iops": _get(volume, "iops") if volume else None,
            "throughput": _get(volume, "throughput") if volume else None,
            "tags": _tags(backend, bdt.volume_id)})
    state_reason = _get(inst, "state_reason")
    lifecycle = _get(inst, "lifecycle")
    groups = _safe(lambda: _instance_group_ids(inst), [])
    return {
        "id": inst.id,
        "state": _safe(lambda: inst.state),
        "state_code": _safe(lambda: inst.state_code),
        "instance_type": _get(inst, "instance_type"),
        "az": _safe(lambda: inst.placement.zone),
        "subnet_id": _safe(lambda: inst.subnet_id),
        "vpc_id": _safe(lambda: inst.vpc_id),
        "image_id": _get(inst, "image_id"),
        "key_name": _get(inst, "key_name"),
        "lifecycle": lifecycle,
        "market": "spot" if lifecycle == "spot" else "on-demand",
        "spot_instance_request_id": _get(inst, "spot_instance_request_id"),
        "instance_initiated_shutdown_behavior": _get(inst, "instance_initiated_shutdown_behavior"),
        "disable_api_termination": _get(inst, "disable_api_termination"),
        "ebs_optimized": _get(inst, "ebs_optimized"),
        "monitoring": _get(inst, "monitoring_state"),
        "metadata_options": metadata,
        "iam_instance_profile": profile_doc,
        "block_device_mappings": bdms,
        "tags": _tags(backend, inst.id),
        "user_data": text,
        "user_data_base64": b64,
        "security_group_ids": groups,
        "security_group_names": [g.name for g in (_get(inst, "security_groups") or [])],
        "public_ip": _safe(lambda: inst.public_ip),
        "private_ip": _safe(lambda: inst.private_ip),
        "public_dns_name": _safe(lambda: inst.public_dns_name),
        "architecture": _get(inst, "architecture"),
        "launch_time": iso(_get(inst, "launch_time")),
        "state_transition_reason": _safe(lambda: inst.state_transition_reason),
        "state_reason": ({"code": _get(state_reason, "code"),
                          "message": _get(state_reason, "message")}
                         if state_reason is not None else None),
        # Everything the RunInstances call asked for, as flattened query params
        # (null for instances not launched through RunInstances).
        "launch_request": cloud.launch_requests.get(inst.id),
    }


def _dump_security_group(backend: Any, group: Any) -> dict[str, Any]:
    def rule(r: Any) -> dict[str, Any]:
        ref = _safe(lambda: r.referenced_group_info)
        return {"security_group_rule_id": _get(r, "id"),
                "protocol": _get(r, "ip_protocol"),
                "from_port": _get(r, "from_port"), "to_port": _get(r, "to_port"),
                "cidr_ipv4": _safe(lambda: r.cidr_ipv4),
                "cidr_ipv6": _safe(lambda: r.cidr_ipv6),
                "referenced_group_id": (ref or {}).get("GroupId") if isinstance(ref, dict)
                else None,
                "prefix_list_id": _get(r, "prefix_list_id"),
                "description": _safe(lambda: r.description),
                "tags": _tags(backend, _get(r, "id", default=""))}

    return {"id": group.id, "name": _get(group, "name"), "description": _get(group, "description"),
            "vpc_id": _get(group, "vpc_id"), "tags": _tags(backend, group.id),
            "ingress": [rule(r) for r in _get(group, "ingress_rules", default=[])],
            "egress": [rule(r) for r in _get(group, "egress_rules", default=[])]}


def _dump_spot_request(backend: Any, req: Any) -> dict[str, Any]:
    spec = _get(req, "launch_specification")
    status = _safe(lambda: req.status) or {}
    return {"id": req.id, "state": _get(req, "state"),
            "status_code": status.get("Code") if isinstance(status, dict) else None,
            "type": _get(req, "type"), "price": _get(req, "price"),
            "instance_id": _safe(lambda: req.instance.id),
            "instance_interruption_behavior": _get(req, "instance_interruption_behaviour"),
            "instance_type": _get(spec, "instance_type") if spec else None,
            "az": _get(spec, "availability_zone") if spec else None,
            "image_id": _get(spec, "image_id") if spec else None,
            "created_by": getattr(req, "created_by", "RequestSpotInstances"),
            "tags": _tags(backend, req.id)}


class StateDump:
    """GET /_localcloud/state (mixed into LocalCloud, section 9)."""

    def state_dump(self, region: str) -> dict[str, Any]:
        from moto.budgets.models import budgets_backends
        from moto.cloudwatch.models import cloudwatch_backends
        from moto.iam.models import iam_backends
        from moto.logs.models import logs_backends
        from moto.ssm.models import ssm_backends

        with self.moto_lock:
            backend = self.ec2_backend(region)
            doc: dict[str, Any] = {"region": region, "account_id": ACCOUNT_ID}
            doc["instances"] = [_dump_instance(self, backend, i) for i in backend.all_instances()]
            doc["volumes"] = [{
                "id": v.id, "tags": _tags(backend, v.id), "encrypted": bool(_get(v, "encrypted")),
                "type": _get(v, "volume_type"), "size": _get(v, "size"),
                "az": _safe(lambda: v.zone.name), "state": _safe(lambda: v.status),
                "kms_key_id": _get(v, "kms_key_id"), "iops": _get(v, "iops"),
                "throughput": _get(v, "throughput"),
                "attached_instance": _safe(lambda: v.attachment.instance.id),
                "device": _safe(lambda: v.attachment.device),
            } for v in backend.volumes.values()]
            doc["security_groups"] = [_dump_security_group(backend, g)
                                      for groups in backend.groups.values()
                                      for g in groups.values()]
            doc["spot_requests"] = [_dump_spot_request(backend, r)
                                    for r in backend.spot_instance_requests.values()]
            doc["key_pairs"] = _safe(lambda: [{"name": k.name if hasattr(k, "name") else name,
                                               "id": _get(k, "id"), "tags": _tags(backend, _get(k, "id", default=""))}
                                              for name, k in backend.key_pairs.items()], [])
            doc["default_vpc_id"] = _safe(lambda: backend.get_default_vpc().id)

            cw = cloudwatch_backends[ACCOUNT_ID][region]
            doc["alarms"] = [{
                "name": a.name, "arn": _get(a, "alarm_arn"), "namespace": _get(a, "namespace"),
                "metric_name": _get(a, "metric_name"), "dimensions": _dims(_get(a, "dimensions")),
                "statistic": _get(a, "statistic"), "extended_statistic": _get(a, "extended_statistic"),
                "period": _get(a, "period"), "evaluation_periods": _get(a, "evaluation_periods"),
                "datapoints_to_alarm": _get(a, "datapoints_to_alarm"),
                "threshold": _get(a, "threshold"), "comparison_operator": _get(a, "comparison_operator"),
                "alarm_actions": list(_get(a, "alarm_actions", default=[])),
                "ok_actions": list(_get(a, "ok_actions", default=[])),
                "insufficient_data_actions": list(_get(a, "insufficient_data_actions", default=[])),
                "treat_missing_data": _get(a, "treat_missing_data"), "unit": _get(a, "unit"),
                "description": _get(a, "description"), "actions_enabled": _get(a, "actions_enabled"),
                "state": _get(a, "state_value"),
            } for a in cw.alarms.values()]
            doc["metrics"] = [{
                "namespace": _get(m, "namespace"), "name": _get(m, "name"),
                "dimensions": _dims(_get(m, "dimensions")), "value": _get(m, "value"),
                "unit": _get(m, "unit"), "timestamp": iso(_get(m, "timestamp")),
                "statistic_values": ({"min": m.min, "max": m.max, "sum": m.sum,
                                      "sample_count": m.sample_count}
                                     if hasattr(m, "sample_count") else None),
            } for m in cw.metric_data]
            doc["dashboards"] = [{"name": d.name, "body": d.body,
                                  "body_json": parse_json_maybe(d.body)}
                                 for d in cw.dashboards.values()]

            logs = logs_backends[ACCOUNT_ID][region]
            doc["log_groups"] = [{
                "name": g.name, "retention_in_days": _get(g, "retention_in_days"),
                "kms_key_id": _get(g, "kms_key_id"), "tags": _safe(lambda: dict(g.tags or {})),
                "streams": [{"name": s_name, "events": [
                    {"timestamp": _get(e, "timestamp"), "message": _get(e, "message")}
                    for e in _get(s, "events", default=[])]}
                    for s_name, s in g.streams.items()],
            } for g in logs.groups.values()]

            iam = iam_backends[ACCOUNT_ID]["global"]
            doc["iam"] = {
                "roles": [{
                    "name": r.name, "arn": _get(r, "arn"), "path": _get(r, "path"),
                    "assume_role_policy_document": parse_json_maybe(
                        _get(r, "assume_role_policy_document")),
                    "inline_policies": {n: parse_json_maybe(d) for n, d in r.policies.items()},
                    "attached_policies": list(r.managed_policies.keys()),
                    "tags": _safe(lambda: {k: v["Value"] for k, v in r.tags.items()}, {}),
                    "max_session_duration": _get(r, "max_session_duration"),
                    "description": _get(r, "description"),
                    "permissions_boundary": _get(r, "permissions_boundary_arn"),
                } for r in iam.roles.values()],
                "instance_profiles": [{
                    "name": p.name, "arn": _get(p, "arn"), "path": _get(p, "path"),
                    "roles": [r.name for r in p.roles],
                    "tags": _safe(lambda: {k: v["Value"] for k, v in p.tags.items()}, {}),
                } for p in iam.instance_profiles.values()],
                "policies": [{
                    "name": p.name, "arn": p.arn,
                    "document": _safe(lambda: parse_json_maybe(p.default_version.document)),
                } for p in iam.managed_policies.values()
                    if not p.arn.startswith("arn:aws:iam::aws:policy")],
            }

            ssm = ssm_backends[ACCOUNT_ID][region]
            params = []
            for name in list(dict.keys(ssm._parameters)):
                versions = dict.get(ssm._parameters, name) or []
                if name.startswith("/aws/") or not versions:
                    continue
                latest = versions[-1]
                params.append({"name": name, "type": _get(latest, "parameter_type"),
                               "value": _safe(lambda: latest.decrypt(latest.value)),
                               "version": _get(latest, "version")})
            doc["ssm_parameters"] = params
            doc["ssm_public_parameters"] = dict(self.public_params.get(region, {}))

            budgets = _safe(lambda: budgets_backends[ACCOUNT_ID]["global"].budgets[ACCOUNT_ID], {})
            doc["budgets"] = [_safe(lambda: b.to_dict(), {"name": n}) for n, b in budgets.items()]

            from moto.scheduler.models import scheduler_backends
            groups = scheduler_backends[ACCOUNT_ID][region].schedule_groups
            doc["instance_connect_endpoints"] = self.eice.dump(region) if self.eice else []
            doc["schedules"] = [{
                "name": s.name, "group": g.name, "arn": s.arn,
                "expression": s.schedule_expression, "timezone": s.schedule_expression_timezone,
                "state": s.state, "action_after_completion": s.action_after_completion,
                "flexible_time_window": s.flexible_time_window,
                "target": s.target, "input": parse_json_maybe(s.target.get("Input")),
                "description": s.description,
            } for g in groups.values() for s in g.schedules.values()]
        return doc


# ---------------------------------------------------------------------------
# 9. LocalCloud: the central object
# ---------------------------------------------------------------------------
class LocalCloud(Middleware, PolicyEnforcement, MotoFixes, ControlAPI, StateDump):
    """Owns moto, the fault rules, the call log and the control API.
    
    boxsim.py (see README.md) gets this object through attach(cloud) and may use:
    base_url, ec2_backend(region), add_route(), on_shutdown(), on_reset(),
    on_instances_launched(), on_instances_terminated(), terminate_instance(),
    spawn()/register_child(), moto_lock, ready_extras.
    """

    def __init__(self, delay_ms: float = 0.0, pending_seconds: float = 0.0,
                 verbose: bool = False):
        self.verbose = verbose
        self.base_url = ""
        self.moto_app = DomainDispatcherApplication(create_backend_app)
        # moto's backends are not thread-safe: every touch of them (requests,
        # seeding, state dumps, timers) holds this lock. Delays happen outside it,
        # so parallel requests still overlap in time the way they do against AWS.
        self.moto_lock = threading.RLock()
        self.state_lock = threading.Lock()  # rules, log and config
        self.start_delay_ms = float(delay_ms)
        self.start_pending_seconds = float(pending_seconds)
        self.delay_ms = float(delay_ms)
        self.pending_seconds = float(pending_seconds)
        self.rules: list[FaultRule] = []
        self.enforced_policy: dict[str, Any] | None = None  # section 5b
        self.enforced_keys: list[str] = list(PRINCIPALS)
        self.denials: list[dict[str, Any]] = []
        self.calls: list[dict[str, Any]] = []
        self.seq = 0
        self.internal_errors = 0
        self.price_overrides: dict[str, dict[str, dict[str, tuple[float | None, float]]]] = {}
        self.prices_epoch = time.time()
        self.generation = 0  # bumped on reset; stale timers check it
        self.timers: set[threading.Timer] = set()
        self.seeded_regions: set[str] = set()
        self.public_params: dict[str, dict[str, str]] = {}
        self.launch_requests: dict[str, dict[str, str]] = {}  # instance id -> RunInstances params
        # (account, region, ClientToken) -> (parameters, answer) of successful RunInstances
        self.client_tokens: dict[tuple[str, str, str], tuple[dict[str, str], Resp]] = {}
        self.routes: list[tuple[str, str, Callable[[dict, bytes], tuple[int, Any]]]] = []
        self.ready_extras: dict[str, str] = {}
        self.eice: Any = None  # eice.Eice once attached (section 6)
        self._shutdown_hooks: list[Callable[[], None]] = []
        self._reset_hooks: list[Callable[[], None]] = []
        self._launch_hooks: list[Callable[[str, list[str]], None]] = []
        self._terminate_hooks: list[Callable[[str, list[str]], None]] = []
        self._children: list[subprocess.Popen] = []
        self._az_cache: dict[str, list[str]] = {}
        self._offerings_cache: dict[str, dict[str, set[str]] | None] = {}

    # -- API for boxsim and the control API --------------------------------
    def ec2_backend(self, region: str) -> Any:
        """moto's EC2 backend for the default account (hold moto_lock to mutate it)."""
        from moto.ec2.models import ec2_backends

        self.ensure_region(region)
        return ec2_backends[ACCOUNT_ID][region]

    def add_route(self, method: str, path_prefix: str,
                  handler: Callable[[dict, bytes], tuple[int, Any]]) -> None:
        """Route METHOD /_localcloud/<...>prefix to handler(environ, body) -> (status, json)."""
        if not path_prefix.startswith("/_localcloud/"):
            raise ValueError("extra routes must live under /_localcloud/")
        self.routes.append((method.upper(), path_prefix, handler))
        self.routes.sort(key=lambda r: -len(r[1]))  # longest prefix wins

    def on_shutdown(self, fn: Callable[[], None]) -> None:
        self._shutdown_hooks.append(fn)

    def on_reset(self, fn: Callable[[], None]) -> None:
        self._reset_hooks.append(fn)

    def on_instances_launched(self, fn: Callable[[str, list[str]], None]) -> None:
        """fn(region, instance_ids) after a successful RunInstances/RequestSpotInstances."""
        self._launch_hooks.append(fn)

    def on_instances_terminated(self, fn: Callable[[str, list[str]], None]) -> None:
        """fn(region, instance_ids) after TerminateInstances or terminate_instance()."""
        self._terminate_hooks.append(fn)

    def spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start a child process that is killed when localcloud exits."""
        proc = subprocess.Popen(argv, **kwargs)
        self.register_child(proc)
        return proc

    def register_child(self, proc: subprocess.Popen) -> None:
        self._children.append(proc)

    def terminate_instance(self, region: str, instance_id: str,
                           reason: str | None = None) -> None:
        """Terminate as if from outside the API (e.g. spot interruption, in-guest shutdown).

        reason: None / "user" (user-initiated), "spot" (Server.SpotInstanceTermination)
        or "shutdown" (Client.InstanceInitiatedShutdown).
        """
        with self.moto_lock:
            backend = self.ec2_backend(region)
            backend.terminate_instances([instance_id])
            instance = backend.get_instance(instance_id)
            self._set_termination_reason(instance, reason)
            self._close_spot_requests(backend, [instance_id], reason)
        self._fire(self._terminate_hooks, region, [instance_id])

    # -- startup ---------------------------------------------------------------
    def warm_up(self) -> None:
        """Build moto's per-service apps and the default region up front."""
        for service in PREWARM_SERVICES:
            with self.moto_app.lock:
                if service not in self.moto_app.app_instances:
                    self.moto_app.app_instances[service] = create_backend_app(service)
        self._prewarm_backends()

    def _prewarm_backends(self) -> None:
        """Create the backends every test needs now, not in its first request."""
        from moto.iam.models import iam_backends

        with self.moto_lock:
            iam_backends[ACCOUNT_ID]["global"]  # noqa: B018 - creates it (~0.05 s)
            for region in PREWARM_REGIONS:
                self.ensure_region(region)
                self.availability_zones(region)

    def warm_up_background(self) -> None:
        """After READY: send moto one harmless call per service, straight to moto
        (not logged), so botocore's service models are loaded before a test needs
        them (the first EC2 call otherwise takes ~0.6 s)."""
        from werkzeug.test import EnvironBuilder

        calls = [("ec2", "Action=DescribeRegions&Version=2016-11-15", None),
                 ("sts", "Action=GetCallerIdentity&Version=2011-06-15", None),
                 ("iam", "Action=ListRoles&Version=2010-05-08", None),
                 ("monitoring", "Action=DescribeAlarms&Version=2010-08-01", None),
                 ("ssm", "{}", "AmazonSSM.DescribeParameters"),
                 ("logs", "{}", "Logs_20140328.DescribeLogGroups")]

        def run() -> None:
            for service, body, target in calls:
                headers = {"Authorization": "AWS4-HMAC-SHA256 Credential=localcloud/20260101/"
                           f"us-east-1/{service}/aws4_request, SignedHeaders=host, Signature=0"}
                ctype = "application/x-www-form-urlencoded"
                if target:
                    headers["X-Amz-Target"] = target
                    ctype = "application/x-amz-json-1.1"
                environ = EnvironBuilder(method="POST", path="/", headers=headers,
                                         data=body.encode(), content_type=ctype).get_environ()
                try:
                    self._call_moto(environ)
                except Exception:
                    log.warning("warm-up call to %s failed:\n%s", service, traceback.format_exc())

        threading.Thread(target=run, name="warm-up", daemon=True).start()

    # -- reset / shutdown -----------------------------------------------------
    def reset(self) -> float:
        t0 = time.monotonic()
        with self.moto_lock:
            self._cancel_timers()
            self.generation += 1
            _reset_moto()
            self.seeded_regions.clear()
            self.public_params.clear()
            self.launch_requests.clear()
            self.client_tokens.clear()
            with self.state_lock:
                self.rules = []
                self.calls = []
                self.seq = 0
                self.internal_errors = 0
                self.denials = []
                self.delay_ms = self.start_delay_ms
                self.pending_seconds = self.start_pending_seconds
                self.price_overrides = {}
                self.prices_epoch = time.time()
            self._prewarm_backends()
        for hook in self._reset_hooks:
            self._call_hook(hook)
        return time.monotonic() - t0

    def shutdown(self) -> None:
        for hook in list(self._shutdown_hooks):
            self._call_hook(hook)
        self._cancel_timers()
        for proc in self._children:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 3
        for proc in self._children:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _cancel_timers(self) -> None:
        for timer in list(self.timers):
            timer.cancel()
        self.timers.clear()

    def _call_hook(self, fn: Callable, *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.error("hook %r failed:\n%s", fn, traceback.format_exc())

    def _fire(self, hooks: list[Callable], *args: Any) -> None:
        for hook in hooks:
            self._call_hook(hook, *args)


# ---------------------------------------------------------------------------
# 10. CLI / server bootstrap
# ---------------------------------------------------------------------------
class _RequestHandler(WSGIRequestHandler):
    """werkzeug's handler, with its per-request access log silenced unless -v."""

    verbose = False

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        if self.verbose:
            super().log_request(code, size)


def _load_boxsim(cloud: LocalCloud) -> None:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "boxsim.py")
    if not os.path.exists(path):
        raise SystemExit(f"localcloud: --box-sim given but {path} does not exist")
    spec = importlib.util.spec_from_file_location("boxsim", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["boxsim"] = module
    spec.loader.exec_module(module)
    module.attach(cloud)


def _detach_stdout() -> io.TextIOWrapper:
    """Keep the real stdout for the READY line only; everything else that writes to
    fd 1 (moto's stray prints, libraries) goes to stderr instead."""
    sys.stdout.flush()
    ready = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return ready


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="moto + fault/latency proxy for ephemeral-admin tests")
    ap.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = pick a free one)")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="latency added to every AWS request")
    ap.add_argument("--pending-seconds", type=float, default=0.0,
                    help="keep new instances 'pending' this long (0 = moto's instant 'running')")
    ap.add_argument("--box-sim", action="store_true", help="load boxsim.py next to this file")
    ap.add_argument("--exit-on-stdin-eof", action="store_true",
                    help="exit when stdin reaches EOF (the harness died or closed it)")
    ap.add_argument("--policy", metavar="FILE",
                    help="enforce this IAM policy document on requests signed with access key 'testing'")
    ap.add_argument("-v", "--verbose", action="store_true", help="log each request to stderr")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, format="localcloud: %(message)s",
                        level=logging.INFO if args.verbose else logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.INFO if args.verbose else logging.ERROR)
    ready_out = _detach_stdout()

    cloud = LocalCloud(delay_ms=args.delay_ms, pending_seconds=args.pending_seconds,
                       verbose=args.verbose)
    if args.policy:
        with open(args.policy) as f:
            cloud.enforce(json.load(f))
    _RequestHandler.verbose = args.verbose
    server = make_server("127.0.0.1", args.port, cloud, threaded=True,
                         request_handler=_RequestHandler)
    cloud.base_url = f"http://127.0.0.1:{server.server_port}"

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():
            os._exit(1)  # second signal: give up on a clean exit
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.exit_on_stdin_eof:
        def watch_stdin() -> None:
            try:
                # os.read, not sys.stdin: a daemon thread blocked inside a buffered reader makes
                # the interpreter abort at shutdown ("could not acquire lock").
                while os.read(0, 4096):
                    pass
            except (OSError, ValueError):
                pass
            stop.set()

        threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()

    try:
        # Section 6: moto stores schedules but never runs them; this runs the due ones.
        scheduler_gap.Firing(cloud).attach()
        # Section 6: EC2 Instance Connect Endpoints; READY gains eice_ws=ws://127.0.0.1:PORT.
        eice_gap.Eice(cloud, ACCOUNT_ID).attach()
        if args.box_sim:
            _load_boxsim(cloud)
        cloud.warm_up()
    except BaseException:
        cloud.shutdown()
        server.server_close()
        raise

    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                     name="http", daemon=True).start()
    extras = "".join(f" {k}={v}" for k, v in cloud.ready_extras.items())
    ready_out.write(f"LOCALCLOUD READY url={cloud.base_url}{extras}\n")
    ready_out.flush()
    cloud.warm_up_background()

    while not stop.wait(0.1):
        pass
    log.info("shutting down")
    cloud.shutdown()
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

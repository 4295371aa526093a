"""EventBridge Scheduler where moto stops short (a gap fix of section 6 of localcloud.py).

moto stores schedules but never runs them. Here:

* ``parse_request``: the operation name and parameters of a Scheduler request (restJson1: the
  operation is the route), so the call log, fault rules and IAM enforcement see it (its IAM
  checks are ``iampolicy._scheduler``).
* ``Firing``: a background loop that runs due one-time schedules (``at(...)`` expressions) the
  way EventBridge Scheduler does: it assumes the schedule's execution role (the role must trust
  ``scheduler.amazonaws.com``, with its conditions evaluated), evaluates the role's own policies
  for the target call with the same request-to-IAM mapping the user's policy is enforced with
  (``iampolicy.authorizations``), then calls the universal target
  (``arn:aws:scheduler:::aws-sdk:SERVICE:apiAction``, Input = the API's parameters as JSON)
  through localcloud itself, as the assumed role, so every other gap fix applies (a group still
  used by an instance answers DependencyViolation, boxsim sees the termination). A failed call
  is retried until the schedule's RetryPolicy is spent (MaximumRetryAttempts,
  MaximumEventAgeInSeconds from the scheduled time). With ActionAfterCompletion = DELETE the
  schedule is deleted once it has run.

  The loop's clock is the real clock plus an offset that tests move forward
  (``POST /_localcloud/scheduler/advance {"seconds": N}``), so a test sees a deadline hours
  away fire in a second. ``GET /_localcloud/scheduler`` answers ``{"offset_seconds", "now",
  "invocations": [...]}``; each invocation is ``{name, group, account, region, target, input,
  scheduled_at, fired_at, attempt, ok, error}``.

Not modelled: rate()/cron() schedules, flexible time windows (treated as OFF), dead-letter
queues, KMS keys, schedule start and end dates.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
from typing import Any
from urllib.parse import parse_qsl, unquote

import iampolicy

SERVICE_PRINCIPAL = "scheduler.amazonaws.com"
TICK_SECONDS = 0.25
RETRY_SECONDS = 1.0

_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"^/schedules$"), "ListSchedules"),
    ("POST", re.compile(r"^/schedules/([^/]+)$"), "CreateSchedule"),
    ("GET", re.compile(r"^/schedules/([^/]+)$"), "GetSchedule"),
    ("PUT", re.compile(r"^/schedules/([^/]+)$"), "UpdateSchedule"),
    ("DELETE", re.compile(r"^/schedules/([^/]+)$"), "DeleteSchedule"),
    ("GET", re.compile(r"^/schedule-groups$"), "ListScheduleGroups"),
    ("POST", re.compile(r"^/schedule-groups/([^/]+)$"), "CreateScheduleGroup"),
    ("GET", re.compile(r"^/schedule-groups/([^/]+)$"), "GetScheduleGroup"),
    ("DELETE", re.compile(r"^/schedule-groups/([^/]+)$"), "DeleteScheduleGroup"),
    ("GET", re.compile(r"^/tags/(.+)$"), "ListTagsForResource"),
    ("POST", re.compile(r"^/tags/(.+)$"), "TagResource"),
    ("DELETE", re.compile(r"^/tags/(.+)$"), "UntagResource"),
]


def parse_request(method: str, path: str, query: str, body: bytes) -> tuple[str | None, dict[str, Any]]:
    """(operation, parameters): the JSON body with the route's and query's fields merged in."""
    try:
        params = json.loads(body or b"{}")
    except ValueError:
        params = {}
    if not isinstance(params, dict):
        params = {}
    for key, value in parse_qsl(query or "", keep_blank_values=True):
        # groupName, NamePrefix, clientToken, ...: the API's member names, capitalised.
        params.setdefault(key[:1].upper() + key[1:], value)
    for verb, pattern, operation in _ROUTES:
        m = pattern.match(path)
        if verb == method and m:
            if m.groups():
                key = "ResourceArn" if operation.endswith(("Resource", "ForResource")) else "Name"
                params[key] = unquote(m.group(1))
            return operation, params
    return None, params


def parse_at(expression: str, timezone: str | None) -> float | None:
    """Epoch seconds of an ``at(yyyy-mm-ddThh:mm:ss)`` expression; None for rate()/cron()."""
    m = re.fullmatch(r"at\((\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\)", expression or "")
    if not m:
        return None
    naive = dt.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")
    if timezone in (None, "", "UTC", "Etc/UTC"):
        return naive.replace(tzinfo=dt.timezone.utc).timestamp()
    from zoneinfo import ZoneInfo

    return naive.replace(tzinfo=ZoneInfo(timezone)).timestamp()


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _wire_params(service: str, value: dict[str, Any]) -> dict[str, str]:
    """The SDK-shaped Input as the query protocol's flattened fields, for the IAM mapping
    (EC2 names list members in the singular: InstanceIds -> InstanceId.1; CloudWatch uses
    AlarmNames.member.1)."""
    out: dict[str, str] = {}
    for key, v in value.items():
        if isinstance(v, list):
            for i, item in enumerate(v, 1):
                if service == "ec2":
                    out[f"{key[:-1] if key.endswith('s') else key}.{i}"] = str(item)
                else:
                    out[f"{key}.member.{i}"] = str(item)
        elif not isinstance(v, dict):
            out[key] = str(v)
    return out


class Firing:
    """Runs due one-time schedules against the local cloud (see the module docstring)."""

    def __init__(self, cloud: Any):
        self.cloud = cloud
        self.lock = threading.Lock()
        self.offset = 0.0
        self.invocations: list[dict[str, Any]] = []
        self.attempts: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        self.wake = threading.Event()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)

    # -- wiring ------------------------------------------------------------
    def attach(self) -> None:
        cloud = self.cloud
        cloud.add_route("GET", "/_localcloud/scheduler", self._control)
        cloud.add_route("POST", "/_localcloud/scheduler", self._control)
        cloud.on_reset(self.reset)
        cloud.on_shutdown(self.stop)
        self.thread.start()

    def reset(self) -> None:
        with self.lock:
            self.offset = 0.0
            self.invocations = []
            self.attempts = {}

    def stop(self) -> None:
        self.stopped.set()
        self.wake.set()

    def now(self) -> float:
        with self.lock:
            return time.time() + self.offset

    def _control(self, environ: dict[str, Any], body: bytes) -> tuple[int, Any]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") == "POST":
            if path != "/_localcloud/scheduler/advance":
                return 404, {"error": f"no route {path}"}
            try:
                seconds = float(json.loads(body or b"{}").get("seconds", 0))
            except (ValueError, AttributeError, TypeError):
                return 400, {"error": "expected {\"seconds\": N}"}
            with self.lock:
                self.offset += seconds
            self.wake.set()
        elif path != "/_localcloud/scheduler":
            return 404, {"error": f"no route {path}"}
        with self.lock:
            return 200, {"offset_seconds": self.offset, "now": _iso(time.time() + self.offset),
                         "invocations": list(self.invocations)}

    # -- the loop ----------------------------------------------------------
    def _loop(self) -> None:
        while not self.stopped.is_set():
            try:
                for job in self._due():
                    self._fire(job)
            except Exception as exc:  # the loop must outlive one bad schedule
                import sys
                import traceback

                sys.stderr.write(f"localcloud scheduler: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            self.wake.wait(TICK_SECONDS)
            self.wake.clear()

    def _due(self) -> list[dict[str, Any]]:
        from moto.scheduler.models import scheduler_backends

        now = self.now()
        due = []
        with self.cloud.moto_lock:
            for account, per_account in list(dict.items(scheduler_backends)):
                for region, backend in list(dict.items(per_account)):
                    for group in list(backend.schedule_groups.values()):
                        for s in list(group.schedules.values()):
                            at = parse_at(s.schedule_expression, s.schedule_expression_timezone)
                            if s.state != "ENABLED" or at is None or at > now:
                                continue
                            key = (account, region, group.name, s.name)
                            tried = self.attempts.get(key)
                            if tried and (tried["at"] != at or tried["next"] > now):
                                if tried["at"] != at:  # moved by UpdateSchedule: a new event
                                    self.attempts.pop(key, None)
                                else:
                                    continue
                            due.append({"key": key, "at": at, "target": json.loads(json.dumps(s.target)),
                                        "delete_after": s.action_after_completion == "DELETE"})
        return due

    def _fire(self, job: dict[str, Any]) -> None:
        account, region, group, name = job["key"]
        target = job["target"]
        tried = self.attempts.setdefault(job["key"], {"count": 0, "at": job["at"], "next": 0.0})
        tried["count"] += 1
        ok, error = self._invoke(account, region, target)
        now = self.now()
        with self.lock:
            self.invocations.append({
                "name": name, "group": group, "account": account, "region": region,
                "target": target.get("Arn"), "input": target.get("Input"),
                "scheduled_at": _iso(job["at"]), "fired_at": _iso(now), "attempt": tried["count"],
                "ok": ok, "error": error})
        policy = target.get("RetryPolicy") or {}
        spent = tried["count"] > int(policy.get("MaximumRetryAttempts", 185)) \
            or now - job["at"] > float(policy.get("MaximumEventAgeInSeconds", 86400))
        if ok or spent:
            self.attempts.pop(job["key"], None)
            if job["delete_after"]:
                self._delete(account, region, group, name)
        else:
            tried["next"] = now + RETRY_SECONDS

    def _delete(self, account: str, region: str, group: str, name: str) -> None:
        from moto.scheduler.models import scheduler_backends

        with self.cloud.moto_lock:
            try:
                scheduler_backends[account][region].schedule_groups[group].schedules.pop(name, None)
            except KeyError:
                pass

    # -- one invocation ----------------------------------------------------
    def _invoke(self, account: str, region: str, target: dict[str, Any]) -> tuple[bool, str | None]:
        m = re.fullmatch(r"arn:aws[\w-]*:scheduler:::aws-sdk:([a-z0-9-]+):([A-Za-z0-9]+)", target.get("Arn", ""))
        if not m:
            return False, f"unsupported target {target.get('Arn')!r} (only universal aws-sdk targets)"
        service, api = m.group(1), m.group(2)
        operation = api[:1].upper() + api[1:]
        try:
            params = json.loads(target.get("Input") or "{}")
        except ValueError:
            return False, "Input is not JSON"
        role_arn = target.get("RoleArn") or ""
        refused = self._role_refuses(account, region, role_arn, service, operation, params)
        if refused:
            return False, refused
        try:
            client = self._client_as(role_arn, region, service)
            getattr(client, _snake(operation))(**params)
            return True, None
        except Exception as exc:  # botocore ClientError carries the AWS code
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            return False, f"{code}: {exc}" if code else f"{type(exc).__name__}: {exc}"

    def _role_refuses(self, account: str, region: str, role_arn: str, service: str,
                      operation: str, params: dict[str, Any]) -> str | None:
        """Why EventBridge Scheduler could not make the call as the role, or None."""
        from moto.iam.models import iam_backends

        m = re.fullmatch(r"arn:aws[\w-]*:iam::(\d{12}):role/(?:.*/)?([\w+=,.@-]+)", role_arn)
        if not m or m.group(1) != account:
            return f"AccessDenied: cannot assume {role_arn!r} (not a role of account {account})"
        with self.cloud.moto_lock:
            try:
                role = iam_backends[account]["global"].get_role(m.group(2))
            except Exception:
                return f"AccessDenied: role {role_arn} does not exist"
            trust = json.loads(role.assume_role_policy_document)
            documents = [json.loads(doc) if isinstance(doc, str) else doc for doc in role.policies.values()]
            documents += [json.loads(p.document) if isinstance(p.document, str) else p.document
                          for p in getattr(role, "managed_policies", {}).values()
                          if getattr(p, "document", None)]
            boundary = _boundary_document(iam_backends[account]["global"], role)
        if not _trusts_scheduler(trust, account):
            return f"AccessDenied: role {role_arn} does not trust {SERVICE_PRINCIPAL} for account {account}"
        sig_service = "monitoring" if service == "cloudwatch" else service
        call = iampolicy.Call(service=sig_service, region=region, action=operation,
                              params=_wire_params(service, params), json=params)
        world = _RoleWorld(self.cloud, account)
        with self.cloud.moto_lock:
            checks = iampolicy.authorizations(call, world)
        statements = [st for doc in documents for st in iampolicy._as_list(doc.get("Statement"))]
        denied = iampolicy.first_denied({"Version": "2012-10-17", "Statement": statements}, checks)
        if denied:
            check, _ = denied
            return (f"AccessDenied: role {role_arn} is not authorized to perform: {check.action} "
                    f"on resource: {check.resource}")
        # IAM: a role with a permissions boundary may do only what both its policies and the
        # boundary allow.
        denied = iampolicy.first_denied(boundary, checks) if boundary is not None else None
        if denied:
            check, _ = denied
            return (f"AccessDenied: role {role_arn} is not authorized to perform: {check.action} "
                    f"on resource: {check.resource} because no permissions boundary allows it")
        return None

    def _client_as(self, role_arn: str, region: str, service: str) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(retries={"total_max_attempts": 1})
        sts = boto3.client("sts", endpoint_url=self.cloud.base_url, region_name=region,
                           aws_access_key_id="scheduler", aws_secret_access_key="scheduler", config=config)
        creds = sts.assume_role(RoleArn=role_arn, RoleSessionName="ephemeral-admin-scheduler")["Credentials"]
        return boto3.client(service, endpoint_url=self.cloud.base_url, region_name=region,
                            aws_access_key_id=creds["AccessKeyId"],
                            aws_secret_access_key=creds["SecretAccessKey"],
                            aws_session_token=creds["SessionToken"], config=config)


def _boundary_document(iam: Any, role: Any) -> dict[str, Any] | None:
    """The default version of the role's permissions boundary; a boundary that is gone allows
    nothing. None when the role has no boundary."""
    arn = getattr(role, "permissions_boundary_arn", None)
    if not arn:
        return None
    try:
        policy = iam.get_policy(arn)
        version = next(v for v in policy.versions if v.version_id == policy.default_version_id)
        doc = version.document
        return json.loads(doc) if isinstance(doc, str) else doc
    except Exception:
        return {"Version": "2012-10-17", "Statement": []}


def _trusts_scheduler(trust: dict[str, Any], account: str) -> bool:
    context = {"aws:SourceAccount": account}
    for st in iampolicy._as_list(trust.get("Statement")):
        principals = iampolicy._as_list((st.get("Principal") or {}).get("Service"))
        actions = iampolicy._as_list(st.get("Action"))
        if st.get("Effect") == "Allow" and SERVICE_PRINCIPAL in principals \
                and any(a in ("sts:AssumeRole", "sts:*", "*") for a in actions) \
                and iampolicy._conditions_hold(st.get("Condition"), context):
            return True
    return False


class _RoleWorld:
    """iampolicy's view of resources, in the schedule's account."""

    def __init__(self, cloud: Any, account: str):
        self.cloud = cloud
        self.account = account

    def resource_tags(self, service: str, region: str, resource_id: str) -> dict[str, str] | None:
        if service != "ec2":
            return None
        from moto.ec2.models import ec2_backends

        backend = dict.get(dict.get(ec2_backends, self.account) or {}, region)
        if backend is None:
            return None
        tags = getattr(backend, "tags", None)
        return dict(tags.get(resource_id, {})) or None if isinstance(tags, dict) else None

    def role_boundary(self, name: str) -> str | None:
        return None

    def instance_profile_roles(self, name: str) -> list[str]:
        return []

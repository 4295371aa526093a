"""iampolicy: the part of IAM's policy evaluation that ephemeral-admin relies on.

localcloud uses it to enforce one identity-based policy on the requests signed
with chosen access keys (the CLI's), the way AWS would for an IAM user holding
exactly that policy. Two halves:

* evaluate(policy, check): IAM's decision for one (action, resource, context)
  check. An explicit Deny wins; otherwise some Allow statement must match the
  action (Action/NotAction, case-insensitive wildcards), the resource
  (Resource/NotResource, wildcards, ${policy:variables}) and every condition.
  Condition operators: String{Equals,NotEquals,EqualsIgnoreCase,Like,NotLike},
  Arn{Equals,Like,NotEquals,NotLike}, Bool, Null, Numeric{Equals,NotEquals,LessThan,
  LessThanEquals,GreaterThan,GreaterThanEquals}, IpAddress, NotIpAddress, each with IfExists and the
  ForAllValues:/ForAnyValue: set prefixes. Keys are case-insensitive; values
  of the tag-key part (aws:RequestTag/Project) keep their case as AWS does.

* authorizations(call, world): the checks one API request needs, as AWS's
  Service Authorization Reference lists them for the operations the tool
  calls: every resource a request touches (RunInstances: image, subnet,
  security group, network interface, instance, volume, spot request), the
  condition keys AWS fills for each (aws:RequestTag/*, aws:TagKeys,
  aws:ResourceTag/* and ec2:ResourceTag/*, ec2:CreateAction,
  iam:AWSServiceName, iam:PassedToService, cloudwatch:namespace), and the
  extra actions a request implies: tags on create need the service's tag
  action (ec2:CreateTags with ec2:CreateAction, iam:TagRole,
  iam:TagInstanceProfile, cloudwatch:TagResource, logs:TagResource); an
  instance profile on RunInstances, or a role added to a profile, needs
  iam:PassRole on the role; an alarm with an EC2 action needs
  iam:CreateServiceLinkedRole for CloudWatch's events role.
  An operation the table does not know is checked on Resource "*".

`world` answers what only the cloud knows (the account, a resource's tags,
the role inside an instance profile). denial() builds AWS's error for a
denied check. Self-tests: iampolicy_selftest.py.
"""
from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------
@dataclass
class Check:
    """One authorization IAM makes for a request."""
    action: str                      # "ec2:RunInstances"
    resource: str                    # an ARN, or "*"
    context: dict[str, Any] = field(default_factory=dict)  # condition key -> str | list[str]
    # Where AWS accepts any one of several actions (CreateLogGroup with tags: logs:TagResource
    # or the older logs:TagLogGroup), the others; the check passes if one of them is allowed.
    alternatives: list[str] = field(default_factory=list)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _glob(pattern: str, value: str, ignore_case: bool = False) -> bool:
    """IAM wildcards: * any run of characters (also across ':' and '/'), ? one."""
    if ignore_case:
        pattern, value = pattern.lower(), value.lower()
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.DOTALL) is not None


_VAR = re.compile(r"\$\{([^}]+)\}")


def _substitute(text: str, context: dict[str, Any]) -> str:
    """${aws:username} and friends; ${*} ${?} ${$} are the escaped characters."""
    def one(m: re.Match) -> str:
        name = m.group(1)
        if name in ("*", "?", "$"):
            return name
        value = _lookup(context, name)
        return value if isinstance(value, str) else "\x00unresolved\x00"
    return _VAR.sub(one, text)


def _lookup(context: dict[str, Any], key: str) -> Any:
    """Condition keys are case-insensitive in the prefix and key name; the tag key after
    the '/' of aws:RequestTag/K, aws:ResourceTag/K ... keeps its case."""
    prefix, _, rest = key.partition("/")
    for k, v in context.items():
        kp, _, kr = k.partition("/")
        if kp.lower() == prefix.lower() and kr == rest:
            return v
    return None


def _string_op(base: str, actual: str, expected: str) -> bool:
    if base in ("StringEquals", "ArnEquals"):
        return actual == expected if base == "StringEquals" else _glob(expected, actual)
    if base == "StringEqualsIgnoreCase":
        return actual.lower() == expected.lower()
    if base in ("StringLike", "ArnLike"):
        return _glob(expected, actual)
    raise KeyError(base)


_NEGATED = {"StringNotEquals": "StringEquals", "StringNotLike": "StringLike",
            "ArnNotEquals": "ArnEquals", "ArnNotLike": "ArnLike",
            "StringNotEqualsIgnoreCase": "StringEqualsIgnoreCase"}


def _condition_holds(operator: str, key: str, expected: Any, context: dict[str, Any]) -> bool:
    qualifier, _, op = operator.rpartition(":")
    if_exists = op.endswith("IfExists")
    if if_exists:
        op = op[: -len("IfExists")]
    actual = _lookup(context, key)
    expected_values = [str(v) for v in _as_list(expected)]
    expected_values = [_substitute(v, context) for v in expected_values]
    if op == "Null":
        missing = actual is None or actual == []
        return any((v.lower() == "true") == missing for v in expected_values)
    if actual is None or (qualifier and actual == []):
        if qualifier == "ForAllValues":
            return True  # vacuously true, as AWS documents
        return if_exists
    if op == "Bool":
        return any(str(a).lower() == v.lower() for a in _as_list(actual) for v in expected_values)
    if op.startswith("Numeric") or op in ("IpAddress", "NotIpAddress"):
        return _typed_condition(qualifier, op, actual, expected_values)
    negated = op in _NEGATED
    base = _NEGATED.get(op, op)
    if base not in ("StringEquals", "StringEqualsIgnoreCase", "StringLike", "ArnEquals", "ArnLike"):
        raise ValueError(f"condition operator {operator} is not supported by iampolicy")

    def matches(value: str) -> bool:
        hit = any(_string_op(base, value, e) for e in expected_values)
        return not hit if negated else hit

    actual_values = [str(a) for a in _as_list(actual)]
    if qualifier == "ForAllValues":
        return all(matches(a) for a in actual_values)
    if qualifier == "ForAnyValue":
        return any(matches(a) for a in actual_values)
    if len(actual_values) != 1:
        # A multivalued key needs a set operator; plain operators do not match it.
        return False
    return matches(actual_values[0])


_NUMERIC = {"NumericEquals": lambda a, e: a == e, "NumericNotEquals": lambda a, e: a != e,
            "NumericLessThan": lambda a, e: a < e, "NumericLessThanEquals": lambda a, e: a <= e,
            "NumericGreaterThan": lambda a, e: a > e,
            "NumericGreaterThanEquals": lambda a, e: a >= e}


def _typed_condition(qualifier: str, op: str, actual: Any, expected: list[str]) -> bool:
    """Numeric* and IpAddress/NotIpAddress (CIDR or single address). A value that does not
    parse as a number or address does not match, as in IAM."""
    import ipaddress

    def one(value: str) -> bool:
        try:
            if op in ("IpAddress", "NotIpAddress"):
                addr = ipaddress.ip_address(value)
                hit = any(addr in ipaddress.ip_network(e, strict=False) for e in expected)
                return hit if op == "IpAddress" else not hit
            if op not in _NUMERIC:
                raise ValueError(f"condition operator {op} is not supported by iampolicy")
            a = float(value)
            if op == "NumericNotEquals":
                return all(_NUMERIC[op](a, float(e)) for e in expected)
            return any(_NUMERIC[op](a, float(e)) for e in expected)
        except ValueError as exc:
            if "not supported" in str(exc):
                raise
            return False

    values = [str(a) for a in _as_list(actual)]
    if qualifier == "ForAllValues":
        return all(one(v) for v in values)
    if qualifier == "ForAnyValue":
        return any(one(v) for v in values)
    return len(values) == 1 and one(values[0])


def _conditions_hold(block: dict[str, Any] | None, context: dict[str, Any]) -> bool:
    for operator, pairs in (block or {}).items():
        for key, expected in pairs.items():
            if not _condition_holds(operator, key, expected, context):
                return False
    return True


def _statement_matches(st: dict[str, Any], check: Check) -> bool:
    if "Action" in st:
        if not any(_glob(a, check.action, ignore_case=True) for a in _as_list(st["Action"])):
            return False
    elif any(_glob(a, check.action, ignore_case=True) for a in _as_list(st.get("NotAction"))):
        return False
    resources = [_substitute(r, check.context) for r in _as_list(st.get("Resource", st.get("NotResource")))]
    hit = any(_glob(r, check.resource) for r in resources)
    if ("Resource" in st) != hit:
        return False
    return _conditions_hold(st.get("Condition"), check.context)


@dataclass
class Decision:
    allowed: bool
    explicit_deny: bool = False
    sid: str | None = None


def evaluate(policy: dict[str, Any], check: Check) -> Decision:
    """IAM's answer for one check against one identity-based policy."""
    allow: Decision | None = None
    for st in _as_list(policy.get("Statement")):
        if not _statement_matches(st, check):
            continue
        if st.get("Effect") == "Deny":
            return Decision(False, explicit_deny=True, sid=st.get("Sid"))
        if st.get("Effect") == "Allow" and allow is None:
            allow = Decision(True, sid=st.get("Sid"))
    return allow or Decision(False)


def first_denied(policy: dict[str, Any], checks: Iterable[Check]) -> tuple[Check, Decision] | None:
    for check in checks:
        decision = evaluate(policy, check)
        if not decision.allowed and not any(
                evaluate(policy, Check(alt, check.resource, check.context)).allowed
                for alt in check.alternatives):
            return check, decision
    return None


# ---------------------------------------------------------------------------
# Requests -> checks
# ---------------------------------------------------------------------------
class World(Protocol):
    account: str

    def resource_tags(self, service: str, region: str, resource_id: str) -> dict[str, str] | None:
        """Tags of an existing resource (EC2 id, IAM role name ...); None if unknown."""

    def role_boundary(self, name: str) -> str | None:
        """The ARN of the role's permissions boundary, if it has one."""

    def instance_profile_roles(self, name: str) -> list[str]:
        """Role names inside an instance profile."""


@dataclass
class Call:
    """What localcloud parsed from a request: SigV4 service, region, API action, and the
    flattened query parameters or the JSON body."""
    service: str
    region: str
    action: str
    params: dict[str, str] = field(default_factory=dict)
    json: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> Any:
        if name in self.params:
            return self.params[name]
        return self.json.get(name) if isinstance(self.json, dict) else None

    def members(self, prefix: str) -> list[str]:
        """Query list members (Prefix.1, Prefix.member.1, ...) or a JSON list."""
        out = []
        for pat in (rf"{re.escape(prefix)}\.(\d+)$", rf"{re.escape(prefix)}\.member\.(\d+)$"):
            found = sorted(((int(m.group(1)), v) for k, v in self.params.items()
                            if (m := re.match(pat, k))))
            out.extend(v for _, v in found)
        if not out and isinstance(self.json, dict):
            out = [str(v) for v in _as_list(self.json.get(prefix))]
        return out

    def query_tags(self, prefix: str) -> dict[str, str]:
        """Tags.member.N.Key/Value (IAM, CloudWatch) or Tag.N.Key/Value (EC2 CreateTags)."""
        tags: dict[str, str] = {}
        for k, v in self.params.items():
            m = re.match(rf"{re.escape(prefix)}\.(?:member\.)?(\d+)\.Key$", k)
            if m:
                n = m.group(1)
                value = self.params.get(f"{prefix}.member.{n}.Value", self.params.get(f"{prefix}.{n}.Value", ""))
                tags[v] = value
        if not tags and isinstance(self.json, dict) and isinstance(self.json.get(prefix), list):
            tags = {t.get("Key"): t.get("Value", "") for t in self.json[prefix]}
        return tags

    def tag_specifications(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for k, rtype in self.params.items():
            m = re.match(r"TagSpecification\.(\d+)\.ResourceType$", k)
            if not m:
                continue
            i, j = m.group(1), 1
            tags = out.setdefault(rtype, {})
            while f"TagSpecification.{i}.Tag.{j}.Key" in self.params:
                tags[self.params[f"TagSpecification.{i}.Tag.{j}.Key"]] = \
                    self.params.get(f"TagSpecification.{i}.Tag.{j}.Value", "")
                j += 1
        return out


def request_tag_context(tags: dict[str, str]) -> dict[str, Any]:
    ctx: dict[str, Any] = {f"aws:RequestTag/{k}": v for k, v in tags.items()}
    ctx["aws:TagKeys"] = list(tags)
    return ctx


def resource_tag_context(tags: dict[str, str] | None, service: str) -> dict[str, Any]:
    ctx: dict[str, Any] = {f"aws:ResourceTag/{k}": v for k, v in (tags or {}).items()}
    if service == "ec2":
        ctx.update({f"ec2:ResourceTag/{k}": v for k, v in (tags or {}).items()})
    return ctx


# Which IAM action authorizes an API operation, where the names differ.
BUDGETS_VIEW = ("Describe", "View")


def iam_action(service: str, action: str) -> str:
    if service == "monitoring":
        return f"cloudwatch:{action}"
    if service == "budgets":
        return "budgets:ViewBudget" if action.startswith(BUDGETS_VIEW) else "budgets:ModifyBudget"
    if service == "access-analyzer":
        return f"access-analyzer:{action}"
    return f"{service}:{action}"


EC2_ID_TYPES = {"i": "instance", "vol": "volume", "sg": "security-group",
                "sgr": "security-group-rule", "sir": "spot-instances-request",
                "ami": "image", "subnet": "subnet", "vpc": "vpc", "eni": "network-interface",
                "eice": "instance-connect-endpoint",
                "key": "key-pair"}

# Operations that need no permission at all (AWS: "No permissions are required").
FREE = {("sts", "GetCallerIdentity")}


def authorizations(call: Call, world: World) -> list[Check]:
    """Every check AWS makes for this request, in the order it reports the first failure."""
    if (call.service, call.action) in FREE:
        return []
    mapper = _MAPPERS.get((call.service, call.action)) or _MAPPERS.get((call.service, "*"))
    checks = mapper(call, world) if mapper else [Check(iam_action(call.service, call.action), "*")]
    return checks


# --- EC2 ---------------------------------------------------------------------
def _ec2_arn(call: Call, world: World, rtype: str, rid: str) -> str:
    if rtype == "image":
        return f"arn:aws:ec2:{call.region}::image/{rid}"
    return f"arn:aws:ec2:{call.region}:{world.account}:{rtype}/{rid}"


def _ec2_existing(call: Call, world: World, action: str, rid: str, extra: dict | None = None) -> Check:
    rtype = EC2_ID_TYPES.get(rid.split("-", 1)[0], "resource")
    ctx = resource_tag_context(world.resource_tags("ec2", call.region, rid), "ec2")
    ctx.update(extra or {})
    return Check(action, _ec2_arn(call, world, rtype, rid), ctx)


def _ec2_created(call: Call, world: World, action: str, rtype: str,
                 tags: dict[str, str] | None) -> list[Check]:
    """A resource the request creates: the action with its request tags, and when it
    carries tags, ec2:CreateTags with ec2:CreateAction = the creating operation."""
    arn = _ec2_arn(call, world, rtype, "*")
    checks = [Check(action, arn, request_tag_context(tags or {}))]
    if tags:
        ctx = request_tag_context(tags)
        ctx["ec2:CreateAction"] = call.action
        checks.append(Check("ec2:CreateTags", arn, ctx))
    return checks


def _ec2_run_instances(call: Call, world: World) -> list[Check]:
    a = "ec2:RunInstances"
    specs = call.tag_specifications()
    checks = [Check(a, _ec2_arn(call, world, "image", call.get("ImageId") or "*"))]
    # Groups and subnet at the top level, or in the primary network interface's spec.
    groups = call.members("SecurityGroupId") + call.members("NetworkInterface.1.SecurityGroupId")
    for sg in groups:
        checks.append(_ec2_existing(call, world, a, sg))
    subnet = call.get("SubnetId") or call.get("NetworkInterface.1.SubnetId")
    checks.append(_ec2_existing(call, world, a, subnet) if subnet
                  else Check(a, _ec2_arn(call, world, "subnet", "*")))
    checks.append(Check(a, _ec2_arn(call, world, "network-interface", "*")))
    if call.get("KeyName"):
        checks.append(Check(a, _ec2_arn(call, world, "key-pair", call.get("KeyName"))))
    created = ["instance", "volume"]
    if call.get("InstanceMarketOptions.MarketType") == "spot":
        created.append("spot-instances-request")
    for rtype in created:
        checks.extend(_ec2_created(call, world, a, rtype, specs.get(rtype)))
    profile = call.get("IamInstanceProfile.Name")
    if profile:
        for role in world.instance_profile_roles(profile):
            checks.append(Check("iam:PassRole", f"arn:aws:iam::{world.account}:role/{role}",
                                {"iam:PassedToService": "ec2.amazonaws.com"}))
    return checks


def _ec2_each(member: str) -> Any:
    def mapper(call: Call, world: World) -> list[Check]:
        return [_ec2_existing(call, world, f"ec2:{call.action}", rid) for rid in call.members(member)]
    return mapper


def _ec2_tags(call: Call, world: World) -> list[Check]:
    tags = call.query_tags("Tag")
    extra = request_tag_context(tags)
    if call.action == "DeleteTags":
        extra = {"aws:TagKeys": list(tags)}
    return [_ec2_existing(call, world, f"ec2:{call.action}", rid, extra)
            for rid in call.members("ResourceId")]


def _ec2_create_security_group(call: Call, world: World) -> list[Check]:
    a = "ec2:CreateSecurityGroup"
    checks = [Check(a, _ec2_arn(call, world, "vpc", call.get("VpcId") or "*"))]
    checks.extend(_ec2_created(call, world, a, "security-group",
                               call.tag_specifications().get("security-group")))
    return checks


def _ec2_group_rules(call: Call, world: World) -> list[Check]:
    a = f"ec2:{call.action}"
    checks = [_ec2_existing(call, world, a, call.get("GroupId") or "sg-unknown")]
    if call.action == "AuthorizeSecurityGroupIngress":
        # The new rule is authorized too (with its request tags, if any): a policy that
        # requires tags on rules refuses an untagged one.
        tags = call.tag_specifications().get("security-group-rule")
        checks.extend(_ec2_created(call, world, a, "security-group-rule", tags))
    return checks


def _ec2_create_instance_connect_endpoint(call: Call, world: World) -> list[Check]:
    """AWS: "Permissions to create, describe, modify, and delete EC2 Instance Connect
    Endpoints": ec2:CreateInstanceConnectEndpoint (on the endpoint with its request tags, the
    subnet, each named group), ec2:CreateTags with ec2:CreateAction when tagged,
    ec2:CreateNetworkInterface (the endpoint's interface in the subnet) and
    iam:CreateServiceLinkedRole for ec2-instance-connect.amazonaws.com."""
    a = "ec2:CreateInstanceConnectEndpoint"
    subnet = call.get("SubnetId") or "*"
    checks = _ec2_created(call, world, a, "instance-connect-endpoint",
                          call.tag_specifications().get("instance-connect-endpoint"))
    checks.append(_ec2_existing(call, world, a, subnet) if subnet != "*"
                  else Check(a, _ec2_arn(call, world, "subnet", "*")))
    for sg in call.members("SecurityGroupId"):
        checks.append(_ec2_existing(call, world, a, sg))
    checks.append(Check("ec2:CreateNetworkInterface", _ec2_arn(call, world, "subnet", subnet)))
    checks.append(Check("ec2:CreateNetworkInterface", _ec2_arn(call, world, "network-interface", "*")))
    checks.append(service_linked_role_check(world, "ec2-instance-connect.amazonaws.com"))
    return checks


# --- IAM ---------------------------------------------------------------------
def _iam_role_arn(world: World, name: str) -> str:
    return f"arn:aws:iam::{world.account}:role/{name}"


def _iam_profile_arn(world: World, name: str) -> str:
    return f"arn:aws:iam::{world.account}:instance-profile/{name}"


# The role each service's CreateServiceLinkedRole makes (IAM authorizes on its ARN).
SERVICE_LINKED_ROLES = {"events.amazonaws.com": "AWSServiceRoleForCloudWatchEvents",
                        "ec2-instance-connect.amazonaws.com": "AWSServiceRoleForEC2InstanceConnect"}


def service_linked_role_check(world: World, service: str) -> Check:
    name = SERVICE_LINKED_ROLES.get(service) or "AWSServiceRoleFor" + service.split(".")[0].capitalize()
    return Check("iam:CreateServiceLinkedRole",
                 f"arn:aws:iam::{world.account}:role/aws-service-role/{service}/{name}",
                 {"iam:AWSServiceName": service})


# The IAM actions whose authorization carries iam:PermissionsBoundary (Service Authorization
# Reference): the boundary a role is created or put under, or the role's current one.
BOUNDARY_FROM_REQUEST = {"CreateRole", "PutRolePermissionsBoundary"}
BOUNDARY_OF_ROLE = {"PutRolePolicy", "DeleteRolePolicy", "AttachRolePolicy", "DetachRolePolicy",
                    "DeleteRolePermissionsBoundary"}


def _iam_policy(call: Call, world: World) -> list[Check]:
    """Customer-managed policies: CreatePolicy names one, the others take its ARN."""
    a = f"iam:{call.action}"
    arn = call.get("PolicyArn") or f"arn:aws:iam::{world.account}:policy{call.get('Path') or '/'}{call.get('PolicyName')}"
    checks = [Check(a, arn)]
    tags = call.query_tags("Tags")
    if tags and call.action == "CreatePolicy":
        checks[0].context.update(request_tag_context(tags))
        checks.append(Check("iam:TagPolicy", arn, request_tag_context(tags)))
    return checks


def _iam(call: Call, world: World) -> list[Check]:
    a = f"iam:{call.action}"
    role, profile = call.get("RoleName"), call.get("InstanceProfileName")
    if call.action == "CreateServiceLinkedRole":
        service = call.get("AWSServiceName") or ""
        return [service_linked_role_check(world, service)]
    if call.get("PolicyArn") and not role or call.action == "CreatePolicy":
        return _iam_policy(call, world)
    if profile:
        arn = _iam_profile_arn(world, profile)
        tags_action = "iam:TagInstanceProfile"
    elif role:
        arn = _iam_role_arn(world, role)
        tags_action = "iam:TagRole"
    else:
        return [Check(a, "*")]
    existing = world.resource_tags("iam", call.region, arn) or {}
    ctx = resource_tag_context(existing, "iam")
    tags = call.query_tags("Tags")
    if tags:
        ctx.update(request_tag_context(tags))
    if role and call.action in BOUNDARY_FROM_REQUEST and call.get("PermissionsBoundary"):
        ctx["iam:PermissionsBoundary"] = call.get("PermissionsBoundary")
    elif role and call.action in BOUNDARY_OF_ROLE:
        boundary = world.role_boundary(role)
        if boundary:
            ctx["iam:PermissionsBoundary"] = boundary
    checks = [Check(a, arn, ctx)]
    if tags and call.action.startswith("Create"):
        checks.append(Check(tags_action, arn, request_tag_context(tags)))
    if call.action == "AddRoleToInstanceProfile" and role:
        # AWS: the caller must be allowed iam:PassRole on the role it adds.
        checks.append(Check("iam:PassRole", _iam_role_arn(world, role)))
    return checks


# --- CloudWatch ----------------------------------------------------------------
def _alarm_arn(call: Call, world: World, name: str) -> str:
    return f"arn:aws:cloudwatch:{call.region}:{world.account}:alarm:{name}"


def _cw_put_metric_alarm(call: Call, world: World) -> list[Check]:
    arn = _alarm_arn(call, world, call.get("AlarmName") or "")
    tags = call.query_tags("Tags")
    # Overwriting an existing alarm is authorized with its tags too (aws:ResourceTag).
    ctx = {**request_tag_context(tags), **resource_tag_context(world.resource_tags("cloudwatch", call.region, arn),
                                                                "cloudwatch")}
    checks = [Check("cloudwatch:PutMetricAlarm", arn, ctx)]
    if tags:
        checks.append(Check("cloudwatch:TagResource", arn, request_tag_context(tags)))
    actions = call.members("AlarmActions") + call.members("OKActions") + \
        call.members("InsufficientDataActions")
    if any(x.startswith("arn:aws:automate:") and ":ec2:" in x for x in actions):
        # AWS: alarms with EC2 actions need iam:CreateServiceLinkedRole for
        # AWSServiceRoleForCloudWatchEvents (events.amazonaws.com).
        checks.append(service_linked_role_check(world, "events.amazonaws.com"))
    return checks


def _cw_delete_alarms(call: Call, world: World) -> list[Check]:
    arns = [_alarm_arn(call, world, n) for n in call.members("AlarmNames")]
    return [Check("cloudwatch:DeleteAlarms", arn,
                  resource_tag_context(world.resource_tags("cloudwatch", call.region, arn), "cloudwatch"))
            for arn in arns]


def _cw_put_metric_data(call: Call, world: World) -> list[Check]:
    return [Check("cloudwatch:PutMetricData", "*",
                  {"cloudwatch:namespace": call.get("Namespace") or ""})]


def _cw_put_dashboard(call: Call, world: World) -> list[Check]:
    name = call.get("DashboardName") or ""
    return [Check("cloudwatch:PutDashboard", f"arn:aws:cloudwatch::{world.account}:dashboard/{name}")]


# --- CloudWatch Logs -----------------------------------------------------------
def _log_group_arn(call: Call, world: World, name: str) -> str:
    return f"arn:aws:logs:{call.region}:{world.account}:log-group:{name}"


def _logs(call: Call, world: World) -> list[Check]:
    a = f"logs:{call.action}"
    name = call.get("logGroupName")
    if call.action == "DescribeLogGroups" or not name:
        return [Check(a, f"arn:aws:logs:{call.region}:{world.account}:log-group:*")]
    arn = _log_group_arn(call, world, name)
    if call.action == "PutLogEvents":
        arn = f"{arn}:log-stream:{call.get('logStreamName') or ''}"
    # AWS: "To assign tags when you create a log group, you must have either the
    # logs:TagResource or logs:TagLogGroup permission"; CloudWatch Logs does not offer the
    # aws:RequestTag / aws:TagKeys condition keys for it.
    checks = [Check(a, arn)]
    if call.action == "CreateLogGroup" and call.get("tags"):
        checks.append(Check("logs:TagResource", arn, alternatives=["logs:TagLogGroup"]))
    return checks


# --- Budgets -------------------------------------------------------------------
def _budgets(call: Call, world: World) -> list[Check]:
    name = call.get("BudgetName")
    if name is None and isinstance(call.get("Budget"), dict):
        name = call.get("Budget").get("BudgetName")
    if name is None and isinstance(call.get("NewBudget"), dict):
        name = call.get("NewBudget").get("BudgetName")
    account = call.get("AccountId") or world.account
    arn = f"arn:aws:budgets::{account}:budget/{name}" if name else "*"
    return [Check(iam_action("budgets", call.action), arn)]


# --- SSM -----------------------------------------------------------------------
def _ssm_start_session(call: Call, world: World) -> list[Check]:
    target = call.get("Target") or ""
    tags = world.resource_tags("ec2", call.region, target)
    ctx = resource_tag_context(tags, "ec2")
    ctx.update({f"ssm:resourceTag/{k}": v for k, v in (tags or {}).items()})
    document = call.get("DocumentName") or "SSM-SessionManagerRunShell"
    doc_account = "" if document.startswith("AWS-") else world.account
    return [Check("ssm:StartSession", f"arn:aws:ec2:{call.region}:{world.account}:instance/{target}", ctx),
            Check("ssm:StartSession", f"arn:aws:ssm:{call.region}:{doc_account}:document/{document}")]


def _ssm_get_parameter(call: Call, world: World) -> list[Check]:
    name = (call.get("Name") or "").lstrip("/")
    account = "" if name.startswith("aws/service/") else world.account
    return [Check("ssm:GetParameter", f"arn:aws:ssm:{call.region}:{account}:parameter/{name}")]


# --- EventBridge Scheduler ------------------------------------------------------
SCHEDULER_PRINCIPAL = "scheduler.amazonaws.com"


def _scheduler(call: Call, world: World) -> list[Check]:
    """Schedule operations on the schedule's ARN; creating or updating one also passes its
    execution role (iam:PassRole with iam:PassedToService = scheduler.amazonaws.com); the
    list operations have no resource type (*)."""
    action = f"scheduler:{call.action}"
    if call.action in ("ListSchedules", "ListScheduleGroups"):
        return [Check(action, "*")]
    if call.action.endswith("Schedule"):
        group = call.get("GroupName") or "default"
        arn = f"arn:aws:scheduler:{call.region}:{world.account}:schedule/{group}/{call.get('Name') or ''}"
        checks = [Check(action, arn)]
        target = call.get("Target")
        if call.action in ("CreateSchedule", "UpdateSchedule") and isinstance(target, dict) \
                and target.get("RoleArn"):
            checks.append(Check("iam:PassRole", target["RoleArn"],
                                {"iam:PassedToService": SCHEDULER_PRINCIPAL}))
        return checks
    arn = f"arn:aws:scheduler:{call.region}:{world.account}:schedule-group/{call.get('Name') or ''}"
    return [Check(action, arn)]


_MAPPERS: dict[tuple[str, str], Any] = {
    ("ec2", "RunInstances"): _ec2_run_instances,
    ("ec2", "TerminateInstances"): _ec2_each("InstanceId"),
    ("ec2", "CancelSpotInstanceRequests"): _ec2_each("SpotInstanceRequestId"),
    ("ec2", "CreateTags"): _ec2_tags,
    ("ec2", "DeleteTags"): _ec2_tags,
    ("ec2", "CreateSecurityGroup"): _ec2_create_security_group,
    ("ec2", "AuthorizeSecurityGroupIngress"): _ec2_group_rules,
    ("ec2", "RevokeSecurityGroupIngress"): _ec2_group_rules,
    ("ec2", "AuthorizeSecurityGroupEgress"): _ec2_group_rules,
    ("ec2", "RevokeSecurityGroupEgress"): _ec2_group_rules,
    ("ec2", "DeleteSecurityGroup"): _ec2_group_rules,
    ("ec2", "CreateInstanceConnectEndpoint"): _ec2_create_instance_connect_endpoint,
    ("ec2", "DeleteInstanceConnectEndpoint"): lambda call, world: [_ec2_existing(
        call, world, "ec2:DeleteInstanceConnectEndpoint",
        call.get("InstanceConnectEndpointId") or "eice-unknown")],
    ("iam", "*"): _iam,
    ("monitoring", "PutMetricAlarm"): _cw_put_metric_alarm,
    ("monitoring", "DeleteAlarms"): _cw_delete_alarms,
    ("monitoring", "PutMetricData"): _cw_put_metric_data,
    ("monitoring", "PutDashboard"): _cw_put_dashboard,
    ("logs", "*"): _logs,
    ("budgets", "*"): _budgets,
    ("ssm", "StartSession"): _ssm_start_session,
    ("ssm", "GetParameter"): _ssm_get_parameter,
    ("scheduler", "*"): _scheduler,
}


# ---------------------------------------------------------------------------
# Denials, shaped as AWS answers them
# ---------------------------------------------------------------------------
def denial(check: Check, decision: Decision, principal_arn: str, protocol: str) -> tuple[str, str, int]:
    """(error code, message, HTTP status) for a denied check, per protocol:
    EC2 UnauthorizedOperation with an encoded authorization failure message;
    query services AccessDenied; JSON services AccessDeniedException."""
    why = (f"with an explicit deny in an identity-based policy" if decision.explicit_deny
           else f"because no identity-based policy allows the {check.action} action")
    core = f"User: {principal_arn} is not authorized to perform: {check.action} on resource: {check.resource} {why}"
    if protocol == "ec2":
        encoded = base64.urlsafe_b64encode(json.dumps({
            "allowed": False, "explicitDeny": decision.explicit_deny,
            "context": {"principal": {"arn": principal_arn}, "action": check.action,
                        "resource": check.resource, "conditions": check.context}},
            sort_keys=True).encode()).decode().rstrip("=")
        return ("UnauthorizedOperation",
                f"You are not authorized to perform this operation. {core}. "
                f"Encoded authorization failure message: {encoded}", 403)
    if protocol == "json":
        return "AccessDeniedException", core, 403
    return "AccessDenied", core, 403


def decode_failure_message(encoded: str) -> dict[str, Any]:
    """The inverse of the encoded part of an EC2 denial (AWS: sts:DecodeAuthorizationMessage)."""
    return json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))


__all__ = ["Check", "Call", "Decision", "World", "evaluate", "first_denied", "authorizations",
           "denial", "decode_failure_message", "iam_action"]

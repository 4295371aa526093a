#!/usr/bin/env python3
"""Self-test for iampolicy.py: IAM's decisions for the calls ephemeral-admin makes, including
the ones IAM denies (a wrong tag, a missing tag action, a wrong resource, a missing PassRole).
No process, no moto: a fake world answers tag and profile lookups. Exits non-zero on failure.

    python3 tests/support/localcloud/iampolicy_selftest.py [-v]
"""
from __future__ import annotations

import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import iampolicy as iam  # noqa: E402
from iampolicy import Call, Check  # noqa: E402

VERBOSE = "-v" in sys.argv
passed = 0
failed: list[str] = []
ACCOUNT = "123456789012"
PROJECT = {"Project": "EphemeralContainer"}


def check(cond: bool, what: str, detail: object = "") -> None:
    global passed
    if cond:
        passed += 1
        if VERBOSE:
            print(f"  ok   {what}")
    else:
        failed.append(what)
        print(f"  FAIL {what} {detail}")


class FakeWorld:
    account = ACCOUNT

    def __init__(self, tags: dict[str, dict[str, str]] | None = None,
                 profiles: dict[str, list[str]] | None = None,
                 boundaries: dict[str, str] | None = None):
        self.tags = tags or {}
        self.profiles = profiles or {}
        self.boundaries = boundaries or {}

    def role_boundary(self, name):
        return self.boundaries.get(name)

    def resource_tags(self, service, region, resource_id):
        return self.tags.get(resource_id)

    def instance_profile_roles(self, name):
        return self.profiles.get(name, [])


def ec2_arns(*types: str) -> list[str]:
    return [f"arn:aws:ec2:*:*:{t}/*" for t in types]


# The shape of ephemeral-admin's own policy (the real one is enforced by the e2e suite).
POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {"Sid": "Read", "Effect": "Allow", "Action": ["ec2:Describe*"], "Resource": "*"},
        {"Sid": "Shared", "Effect": "Allow", "Action": "ec2:RunInstances",
         "Resource": ["arn:aws:ec2:*::image/*"] + ec2_arns("subnet", "security-group", "network-interface")},
        {"Sid": "Create", "Effect": "Allow",
         "Action": ["ec2:RunInstances", "ec2:CreateSecurityGroup", "ec2:AuthorizeSecurityGroupIngress"],
         "Resource": ec2_arns("instance", "volume", "spot-instances-request", "security-group",
                              "security-group-rule"),
         "Condition": {"StringEquals": {"aws:RequestTag/Project": "EphemeralContainer"}}},
        {"Sid": "TagOnCreate", "Effect": "Allow", "Action": "ec2:CreateTags",
         "Resource": ec2_arns("instance", "volume", "spot-instances-request", "security-group",
                              "security-group-rule"),
         "Condition": {"StringEquals": {"ec2:CreateAction": ["RunInstances", "CreateSecurityGroup"],
                                        "aws:RequestTag/Project": "EphemeralContainer"}}},
        {"Sid": "Own", "Effect": "Allow",
         "Action": ["ec2:TerminateInstances", "ec2:CreateTags", "ec2:CancelSpotInstanceRequests"],
         "Resource": ec2_arns("instance", "spot-instances-request"),
         "Condition": {"StringEquals": {"ec2:ResourceTag/Project": "EphemeralContainer"}}},
        {"Sid": "Role", "Effect": "Allow",
         "Action": ["iam:CreateRole", "iam:TagRole", "iam:PassRole", "iam:AddRoleToInstanceProfile"],
         "Resource": ["arn:aws:iam::*:role/BoxRole", "arn:aws:iam::*:instance-profile/BoxRole"]},
        {"Sid": "Slr", "Effect": "Allow", "Action": "iam:CreateServiceLinkedRole",
         "Resource": "arn:aws:iam::*:role/aws-service-role/events.amazonaws.com/AWSServiceRoleForCloudWatchEvents*",
         "Condition": {"StringEquals": {"iam:AWSServiceName": "events.amazonaws.com"}}},
        {"Sid": "Alarms", "Effect": "Allow",
         "Action": ["cloudwatch:PutMetricAlarm", "cloudwatch:TagResource", "cloudwatch:DeleteAlarms"],
         "Resource": "arn:aws:cloudwatch:*:*:alarm:ephemeral-admin-*"},
        {"Sid": "Logs", "Effect": "Allow", "Action": ["logs:CreateLogGroup", "logs:DeleteLogGroup",
                                                      "logs:PutLogEvents", "logs:TagResource"],
         "Resource": "arn:aws:logs:*:*:log-group:/aws/ephemeral-container/*"},
        {"Sid": "Metrics", "Effect": "Allow", "Action": "cloudwatch:PutMetricData", "Resource": "*",
         "Condition": {"StringEquals": {"cloudwatch:namespace": "EphemeralAdmin"}}},
        {"Sid": "Ssm", "Effect": "Allow", "Action": "ssm:StartSession", "Resource": ec2_arns("instance"),
         "Condition": {"StringEquals": {"ssm:resourceTag/Project": "EphemeralContainer"}}},
        {"Sid": "SsmDoc", "Effect": "Allow", "Action": ["ssm:StartSession", "ssm:TerminateSession"],
         "Resource": ["arn:aws:ssm:*::document/AWS-StartSSHSession",
                      "arn:aws:ssm:*:*:session/${aws:userid}-*"]},
    ],
}


def without(sid: str, action: str | None = None) -> dict:
    """POLICY with one statement (or one action of it) removed."""
    statements = []
    for st in POLICY["Statement"]:
        if st["Sid"] != sid:
            statements.append(st)
        elif action is not None:
            actions = [a for a in iam._as_list(st["Action"]) if a != action]
            if actions:
                statements.append({**st, "Action": actions})
    return {"Version": "2012-10-17", "Statement": statements}


def decide(policy: dict, call: Call, world: FakeWorld | None = None):
    """None when every check passes, else the first denied Check."""
    denied = iam.first_denied(policy, iam.authorizations(call, world or FakeWorld()))
    return None if denied is None else denied[0]


def tag_params(rtype: str, index: int, tags: dict[str, str]) -> dict[str, str]:
    out = {f"TagSpecification.{index}.ResourceType": rtype}
    for j, (k, v) in enumerate(tags.items(), 1):
        out[f"TagSpecification.{index}.Tag.{j}.Key"] = k
        out[f"TagSpecification.{index}.Tag.{j}.Value"] = v
    return out


def run_instances(tags: dict[str, str], spot: bool = False, profile: str | None = "BoxRole") -> Call:
    params = {"Action": "RunInstances", "ImageId": "ami-0123", "SecurityGroupId.1": "sg-1",
              "MinCount": "1", "MaxCount": "1"}
    params.update(tag_params("instance", 1, tags))
    params.update(tag_params("volume", 2, tags))
    if spot:
        params["InstanceMarketOptions.MarketType"] = "spot"
        params.update(tag_params("spot-instances-request", 3, tags))
    if profile:
        params["IamInstanceProfile.Name"] = profile
    return Call("ec2", "us-east-1", "RunInstances", params)


WORLD = FakeWorld(tags={"i-ours": PROJECT, "i-theirs": {"Project": "Other"}, "sir-ours": PROJECT,
                        "sg-1": PROJECT},
                  profiles={"BoxRole": ["BoxRole"], "Other": ["AdminRole"]})


def t_run_instances() -> None:
    tags = {**PROJECT, "Name": "ephemeral-admin-x"}
    check(decide(POLICY, run_instances(tags, spot=True), WORLD) is None, "RunInstances with the tags is allowed")
    denied = decide(POLICY, run_instances({"Project": "Other"}), WORLD)
    check(denied is not None and denied.action == "ec2:RunInstances" and denied.resource.endswith(":instance/*"),
          "RunInstances with a wrong tag is denied on instance/*", denied)
    denied = decide(POLICY, run_instances({}), WORLD)
    check(denied is not None and denied.resource.endswith(":instance/*"), "RunInstances without tags is denied")
    denied = decide(without("TagOnCreate"), run_instances(tags), WORLD)
    check(denied is not None and denied.action == "ec2:CreateTags" and
          denied.context.get("ec2:CreateAction") == "RunInstances",
          "tags on create need ec2:CreateTags (ec2:CreateAction=RunInstances)", denied)
    denied = decide(POLICY, run_instances(tags, profile="Other"), WORLD)
    check(denied is not None and denied.action == "iam:PassRole" and denied.resource.endswith(":role/AdminRole"),
          "an instance profile needs iam:PassRole on its role", denied)
    denied = decide(without("Role", "iam:PassRole"), run_instances(tags), WORLD)
    check(denied is not None and denied.action == "iam:PassRole", "no PassRole statement: denied")
    denied = decide(without("Shared"), run_instances(tags), WORLD)
    check(denied is not None and ":image/ami-0123" in denied.resource, "the image is checked too", denied)


def t_own_resources() -> None:
    term = lambda i: Call("ec2", "us-east-1", "TerminateInstances", {"InstanceId.1": i})  # noqa: E731
    check(decide(POLICY, term("i-ours"), WORLD) is None, "terminate an instance tagged ours")
    check(decide(POLICY, term("i-theirs"), WORLD) is not None, "terminate an instance tagged otherwise: denied")
    check(decide(POLICY, term("i-unknown"), WORLD) is not None, "terminate an untagged/unknown instance: denied")
    cancel = Call("ec2", "us-east-1", "CancelSpotInstanceRequests", {"SpotInstanceRequestId.1": "sir-ours"})
    check(decide(POLICY, cancel, WORLD) is None, "cancel our spot request")
    # ec2:CreateTags outside a create call needs the resource to be ours already.
    retag = Call("ec2", "us-east-1", "CreateTags",
                 {"ResourceId.1": "i-theirs", "Tag.1.Key": "Project", "Tag.1.Value": "EphemeralContainer"})
    check(decide(POLICY, retag, WORLD) is not None, "CreateTags cannot claim someone else's instance")
    retag.params["ResourceId.1"] = "i-ours"
    check(decide(POLICY, retag, WORLD) is None, "CreateTags on our instance (extend)")


def t_security_group_rules() -> None:
    policy = {"Statement": [
        {"Effect": "Allow", "Action": "ec2:AuthorizeSecurityGroupIngress", "Resource": "arn:aws:ec2:*:*:security-group/*",
         "Condition": {"StringEquals": {"ec2:ResourceTag/Project": "EphemeralContainer"}}},
        {"Effect": "Allow", "Action": ["ec2:AuthorizeSecurityGroupIngress", "ec2:CreateTags"],
         "Resource": "arn:aws:ec2:*:*:security-group-rule/*",
         "Condition": {"StringEquals": {"aws:RequestTag/Project": "EphemeralContainer"}}}]}
    params = {"GroupId": "sg-1", "IpPermissions.1.IpProtocol": "tcp"}
    tagged = Call("ec2", "us-east-1", "AuthorizeSecurityGroupIngress",
                  {**params, **tag_params("security-group-rule", 1, PROJECT)})
    check(decide(policy, tagged, WORLD) is None, "a tagged rule in our group")
    denied = decide(policy, Call("ec2", "us-east-1", "AuthorizeSecurityGroupIngress", params), WORLD)
    check(denied is not None and denied.resource.endswith(":security-group-rule/*"),
          "an untagged rule is refused where rules must be tagged", denied)
    other = Call("ec2", "us-east-1", "AuthorizeSecurityGroupIngress",
                 {**tagged.params, "GroupId": "sg-theirs"})
    denied = decide(policy, other, WORLD)
    check(denied is not None and denied.resource.endswith(":security-group/sg-theirs"),
          "a rule in someone else's group is refused", denied)


def t_tag_actions_of_other_services() -> None:
    alarm = Call("monitoring", "us-east-1", "PutMetricAlarm", {
        "AlarmName": "ephemeral-admin-s1-i-1", "Tags.member.1.Key": "Project",
        "Tags.member.1.Value": "EphemeralContainer",
        "AlarmActions.member.1": "arn:aws:automate:us-east-1:ec2:terminate"})
    check(decide(POLICY, alarm) is None, "PutMetricAlarm with tags and a terminate action")
    denied = decide(without("Alarms", "cloudwatch:TagResource"), alarm)
    check(denied is not None and denied.action == "cloudwatch:TagResource",
          "PutMetricAlarm with Tags needs cloudwatch:TagResource", denied)
    denied = decide(without("Slr"), alarm)
    check(denied is not None and denied.action == "iam:CreateServiceLinkedRole",
          "an alarm with an EC2 action needs iam:CreateServiceLinkedRole", denied)
    alarm.params["AlarmName"] = "someone-elses-alarm"
    denied = decide(POLICY, alarm)
    check(denied is not None and denied.resource.endswith(":alarm:someone-elses-alarm"),
          "an alarm outside the prefix is denied")
    delete = Call("monitoring", "us-east-1", "DeleteAlarms",
                  {"AlarmNames.member.1": "ephemeral-admin-a", "AlarmNames.member.2": "prod-alarm"})
    denied = decide(POLICY, delete)
    check(denied is not None and denied.resource.endswith(":alarm:prod-alarm"), "DeleteAlarms checks every name")
    role = Call("iam", "us-east-1", "CreateRole", {"RoleName": "BoxRole", "Tags.member.1.Key": "Project",
                                                  "Tags.member.1.Value": "EphemeralContainer"})
    check(decide(POLICY, role) is None, "CreateRole with tags")
    denied = decide(without("Role", "iam:TagRole"), role)
    check(denied is not None and denied.action == "iam:TagRole", "CreateRole with tags needs iam:TagRole")
    group = Call("logs", "us-east-1", "CreateLogGroup",
                 json={"logGroupName": "/aws/ephemeral-container/i-1", "tags": PROJECT})
    check(decide(POLICY, group) is None, "CreateLogGroup with tags")
    denied = decide(without("Logs", "logs:TagResource"), group)
    check(denied is not None and denied.action == "logs:TagResource", "CreateLogGroup with tags needs logs:TagResource")
    older = without("Logs", "logs:TagResource")
    older["Statement"].append({"Effect": "Allow", "Action": "logs:TagLogGroup", "Resource": "*"})
    check(decide(older, group) is None, "... or the older logs:TagLogGroup (AWS accepts either)")
    other = Call("logs", "us-east-1", "DeleteLogGroup", json={"logGroupName": "/prod/app"})
    check(decide(POLICY, other) is not None, "DeleteLogGroup outside the prefix is denied")
    put = Call("logs", "us-east-1", "PutLogEvents",
               json={"logGroupName": "/aws/ephemeral-container/i-1", "logStreamName": "cli"})
    check(decide(POLICY, put) is None, "PutLogEvents on a stream of our group (log-stream ARN under the group)")
    metrics = Call("monitoring", "us-east-1", "PutMetricData", {"Namespace": "Prod"})
    check(decide(POLICY, metrics) is not None, "PutMetricData in another namespace is denied")


def t_service_linked_role_condition() -> None:
    slr = Call("iam", "us-east-1", "CreateServiceLinkedRole", {"AWSServiceName": "events.amazonaws.com"})
    check(decide(POLICY, slr) is None, "CreateServiceLinkedRole for events.amazonaws.com")
    slr.params["AWSServiceName"] = "elasticbeanstalk.amazonaws.com"
    check(decide(POLICY, slr) is not None, "CreateServiceLinkedRole for another service is denied")


def t_ssm() -> None:
    start = Call("ssm", "us-east-1", "StartSession", json={"Target": "i-ours", "DocumentName": "AWS-StartSSHSession"})
    check(decide(POLICY, start, WORLD) is None, "StartSession to our instance with the SSH document")
    start.json["Target"] = "i-theirs"
    check(decide(POLICY, start, WORLD) is not None, "StartSession to another instance is denied")
    start.json.update(Target="i-ours", DocumentName="AWS-RunShellScript")
    check(decide(POLICY, start, WORLD) is not None, "StartSession with another document is denied")
    term = Check("ssm:TerminateSession", f"arn:aws:ssm:us-east-1:{ACCOUNT}:session/AIDA1-abc",
                 {"aws:userid": "AIDA1"})
    check(iam.evaluate(POLICY, term).allowed, "${aws:userid} in a resource")
    term.context["aws:userid"] = "AIDA2"
    check(not iam.evaluate(POLICY, term).allowed, "${aws:userid} of someone else")


def t_operators() -> None:
    def allowed(condition: dict, context: dict, action: str = "s3:GetObject") -> bool:
        policy = {"Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*", "Condition": condition}]}
        return iam.evaluate(policy, Check(action, "arn:aws:s3:::b/k", context)).allowed

    keys = {"aws:TagKeys": ["Project", "Name"]}
    check(allowed({"ForAllValues:StringEquals": {"aws:TagKeys": ["Project", "Name", "X"]}}, keys),
          "ForAllValues: every key in the set")
    check(not allowed({"ForAllValues:StringEquals": {"aws:TagKeys": ["Project"]}}, keys),
          "ForAllValues: an extra key denies")
    check(allowed({"ForAllValues:StringEquals": {"aws:TagKeys": ["Project"]}}, {}),
          "ForAllValues: a missing key is vacuously true")
    check(allowed({"ForAnyValue:StringLike": {"aws:TagKeys": ["Proj*"]}}, keys), "ForAnyValue:StringLike")
    check(not allowed({"ForAnyValue:StringEquals": {"aws:TagKeys": ["X"]}}, keys), "ForAnyValue: none matches")
    check(not allowed({"StringEquals": {"aws:TagKeys": "Project"}}, keys),
          "a plain operator on a multivalued key does not match")
    check(allowed({"StringLike": {"aws:RequestTag/Name": "ephemeral-*"}}, {"aws:RequestTag/Name": "ephemeral-1"}),
          "StringLike with *")
    check(not allowed({"StringEquals": {"aws:RequestTag/Name": "a"}}, {"aws:requesttag/name": "a"}),
          "the tag key after the slash keeps its case")
    check(allowed({"StringEquals": {"AWS:RequestTag/Name": "a"}}, {"aws:RequestTag/Name": "a"}),
          "the key prefix is case-insensitive")
    check(not allowed({"StringEquals": {"aws:RequestTag/Name": "a"}}, {}), "a missing key fails StringEquals")
    check(allowed({"StringEqualsIfExists": {"aws:RequestTag/Name": "a"}}, {}), "IfExists passes a missing key")
    check(allowed({"StringNotEquals": {"aws:RequestTag/Name": "a"}}, {"aws:RequestTag/Name": "b"}),
          "StringNotEquals")
    check(allowed({"Null": {"aws:RequestTag/Name": "true"}}, {}), "Null true on a missing key")
    check(not allowed({"Null": {"aws:RequestTag/Name": "true"}}, {"aws:RequestTag/Name": "x"}), "Null true, present")
    check(allowed({"StringEquals": {"aws:RequestTag/A": "1", "aws:RequestTag/B": ["2", "3"]}},
                  {"aws:RequestTag/A": "1", "aws:RequestTag/B": "3"}), "keys AND, values OR")
    check(not allowed({"StringEquals": {"aws:RequestTag/A": "1"}, "StringLike": {"aws:RequestTag/B": "x*"}},
                      {"aws:RequestTag/A": "1", "aws:RequestTag/B": "y"}), "operators AND")
    check(allowed({"ArnLike": {"aws:SourceArn": "arn:aws:s3:::b*"}}, {"aws:SourceArn": "arn:aws:s3:::bucket"}),
          "ArnLike")
    check(allowed({"Bool": {"aws:SecureTransport": "true"}}, {"aws:SecureTransport": "true"}), "Bool")
    port = {"ec2-instance-connect:remotePort": "22"}
    check(allowed({"NumericEquals": {"ec2-instance-connect:remotePort": "22"}}, port), "NumericEquals")
    check(not allowed({"NumericEquals": {"ec2-instance-connect:remotePort": "22"}},
                      {"ec2-instance-connect:remotePort": "2222"}), "NumericEquals: another number denies")
    check(not allowed({"NumericEquals": {"ec2-instance-connect:remotePort": "22"}}, {}),
          "NumericEquals: a missing key denies")
    check(allowed({"NumericLessThanEquals": {"ec2-instance-connect:maxTunnelDuration": "3600"}},
                  {"ec2-instance-connect:maxTunnelDuration": "3600"}), "NumericLessThanEquals at the bound")
    check(not allowed({"NumericLessThan": {"x": "3600"}}, {"x": "3600"}), "NumericLessThan is strict")
    check(allowed({"NumericGreaterThan": {"x": "1"}}, {"x": "2"}), "NumericGreaterThan")
    check(not allowed({"NumericEquals": {"x": "1"}}, {"x": "one"}), "a value that is not a number does not match")
    check(allowed({"NumericLessThanEqualsIfExists": {"x": "5"}}, {}), "Numeric…IfExists passes a missing key")
    ip = {"ec2-instance-connect:privateIpAddress": "172.31.5.9"}
    check(allowed({"IpAddress": {"ec2-instance-connect:privateIpAddress": "172.31.0.0/16"}}, ip), "IpAddress CIDR")
    check(allowed({"IpAddress": {"ec2-instance-connect:privateIpAddress": "172.31.5.9"}}, ip), "IpAddress single")
    check(not allowed({"IpAddress": {"ec2-instance-connect:privateIpAddress": "10.0.0.0/8"}}, ip),
          "IpAddress outside the range denies")
    check(allowed({"NotIpAddress": {"ec2-instance-connect:privateIpAddress": "10.0.0.0/8"}}, ip), "NotIpAddress")
    try:
        allowed({"DateLessThan": {"aws:CurrentTime": "2030-01-01T00:00:00Z"}}, {"aws:CurrentTime": "x"})
        check(False, "an unsupported operator is an error, never a silent allow")
    except ValueError:
        check(True, "an unsupported operator is an error, never a silent allow")


def t_instance_connect_endpoint() -> None:
    """AWS: "Permissions to create, describe, modify, and delete EC2 Instance Connect Endpoints"."""
    tags = {"Project": "EphemeralContainer", "Name": "ephemeral-admin-eice"}
    params = {"SubnetId": "subnet-1", "SecurityGroupId.1": "sg-e",
              **tag_params("instance-connect-endpoint", 1, tags)}
    call = Call("ec2", "us-east-1", "CreateInstanceConnectEndpoint", params)
    checks = iam.authorizations(call, FakeWorld())
    got = [(c.action, c.resource) for c in checks]
    base = "arn:aws:ec2:us-east-1:123456789012"
    check(got == [("ec2:CreateInstanceConnectEndpoint", f"{base}:instance-connect-endpoint/*"),
                  ("ec2:CreateTags", f"{base}:instance-connect-endpoint/*"),
                  ("ec2:CreateInstanceConnectEndpoint", f"{base}:subnet/subnet-1"),
                  ("ec2:CreateInstanceConnectEndpoint", f"{base}:security-group/sg-e"),
                  ("ec2:CreateNetworkInterface", f"{base}:subnet/subnet-1"),
                  ("ec2:CreateNetworkInterface", f"{base}:network-interface/*"),
                  ("iam:CreateServiceLinkedRole", "arn:aws:iam::123456789012:role/aws-service-role/"
                   "ec2-instance-connect.amazonaws.com/AWSServiceRoleForEC2InstanceConnect")],
          "CreateInstanceConnectEndpoint: endpoint, tags, subnet, group, ENI, service-linked role", got)
    check(checks[0].context.get("aws:RequestTag/Name") == "ephemeral-admin-eice"
          and checks[1].context.get("ec2:CreateAction") == "CreateInstanceConnectEndpoint",
          "request tags and ec2:CreateAction are filled", [c.context for c in checks[:2]])
    allow = {"Statement": [
        {"Effect": "Allow", "Action": ["ec2:CreateInstanceConnectEndpoint", "ec2:CreateNetworkInterface"],
         "Resource": "*"},
        {"Effect": "Allow", "Action": "ec2:CreateTags", "Resource": "*",
         "Condition": {"StringEquals": {"ec2:CreateAction": "CreateInstanceConnectEndpoint"}}},
        {"Effect": "Allow", "Action": "iam:CreateServiceLinkedRole", "Resource": "*",
         "Condition": {"StringEquals": {"iam:AWSServiceName": "ec2-instance-connect.amazonaws.com"}}}]}
    check(decide(allow, call) is None, "the documented permissions allow the create")
    no_slr = {"Statement": allow["Statement"][:2]}
    denied = decide(no_slr, call)
    check(denied is not None and denied.action == "iam:CreateServiceLinkedRole",
          "without iam:CreateServiceLinkedRole the create is denied", denied)
    world = FakeWorld(tags={"eice-1": {"Project": "EphemeralContainer"}})
    delete = Call("ec2", "us-east-1", "DeleteInstanceConnectEndpoint", {"InstanceConnectEndpointId": "eice-1"})
    checks = iam.authorizations(delete, world)
    check([(c.action, c.resource) for c in checks] == [
        ("ec2:DeleteInstanceConnectEndpoint", f"{base}:instance-connect-endpoint/eice-1")]
          and checks[0].context.get("ec2:ResourceTag/Project") == "EphemeralContainer",
          "DeleteInstanceConnectEndpoint: on the endpoint's ARN with its tags", checks)
    describe = Call("ec2", "us-east-1", "DescribeInstanceConnectEndpoints", {})
    check([(c.action, c.resource) for c in iam.authorizations(describe, world)] == [
        ("ec2:DescribeInstanceConnectEndpoints", "*")], "Describe: on *")


def t_evaluation_logic() -> None:
    policy = {"Statement": [
        {"Effect": "Allow", "Action": "ec2:*", "Resource": "*"},
        {"Effect": "Deny", "Action": "ec2:TerminateInstances", "Resource": "*"},
        {"Effect": "Allow", "NotAction": "iam:*", "Resource": "arn:aws:s3:::*"},
        {"Effect": "Allow", "Action": "logs:*", "NotResource": "arn:aws:logs:*:*:log-group:/prod*"}]}
    ev = lambda a, r="*": iam.evaluate(policy, Check(a, r))  # noqa: E731
    check(ev("ec2:RunInstances").allowed, "wildcard action")
    check(ev("EC2:runinstances").allowed, "actions are case-insensitive")
    d = ev("ec2:TerminateInstances")
    check(not d.allowed and d.explicit_deny, "an explicit Deny wins over an Allow")
    check(ev("s3:GetObject", "arn:aws:s3:::b").allowed, "NotAction allows what it does not name")
    check(not ev("iam:PassRole", "arn:aws:s3:::b").allowed, "NotAction excludes what it names")
    check(ev("logs:DeleteLogGroup", "arn:aws:logs:us-east-1:1:log-group:/x").allowed, "NotResource allows others")
    check(not ev("logs:DeleteLogGroup", "arn:aws:logs:us-east-1:1:log-group:/prod/a").allowed,
          "NotResource excludes what it names")
    check(not ev("sqs:SendMessage").allowed, "nothing allows it: implicit deny")
    check(iam.authorizations(Call("sts", "us-east-1", "GetCallerIdentity"), FakeWorld()) == [],
          "sts:GetCallerIdentity needs no permission")
    check(iam.iam_action("monitoring", "DescribeAlarms") == "cloudwatch:DescribeAlarms",
          "CloudWatch is signed as monitoring, authorized as cloudwatch")
    check(iam.iam_action("budgets", "DescribeBudget") == "budgets:ViewBudget" and
          iam.iam_action("budgets", "UpdateBudget") == "budgets:ModifyBudget", "Budgets' two actions")


def t_denials() -> None:
    denied = Check("ec2:RunInstances", "arn:aws:ec2:us-east-1:1:instance/*", {"aws:RequestTag/Project": "x"})
    code, message, status = iam.denial(denied, iam.Decision(False), "arn:aws:iam::1:user/u", "ec2")
    check(code == "UnauthorizedOperation" and status == 403, "EC2: UnauthorizedOperation, 403")
    check(message.startswith("You are not authorized to perform this operation. User: arn:aws:iam::1:user/u "
                             "is not authorized to perform: ec2:RunInstances on resource: "
                             "arn:aws:ec2:us-east-1:1:instance/* because no identity-based policy allows "
                             "the ec2:RunInstances action. Encoded authorization failure message: "),
          "EC2 message as AWS words it", message)
    decoded = iam.decode_failure_message(message.rsplit(" ", 1)[1])
    check(decoded["context"]["action"] == "ec2:RunInstances" and
          decoded["context"]["conditions"]["aws:RequestTag/Project"] == "x", "the encoded message decodes")
    code, message, status = iam.denial(Check("iam:TagRole", "arn:aws:iam::1:role/R"), iam.Decision(False),
                                       "arn:aws:iam::1:user/u", "query")
    check((code, status) == ("AccessDenied", 403) and message == (
        "User: arn:aws:iam::1:user/u is not authorized to perform: iam:TagRole on resource: "
        "arn:aws:iam::1:role/R because no identity-based policy allows the iam:TagRole action"),
        "query services: AccessDenied", message)
    code, _, status = iam.denial(Check("logs:TagResource", "x"), iam.Decision(False), "u", "json")
    check((code, status) == ("AccessDeniedException", 403), "JSON services: AccessDeniedException")


def t_permissions_boundary() -> None:
    """iam:PermissionsBoundary: from the request where a role is put under one, from the role
    itself where its policies change; a customer-managed policy is authorized on its ARN."""
    boundary = f"arn:aws:iam::{ACCOUNT}:policy/ephemeral-admin-boundary"
    bounded = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": ["iam:CreateRole", "iam:PutRolePolicy"],
        "Resource": "arn:aws:iam::*:role/R-*",
        "Condition": {"ArnLike": {"iam:PermissionsBoundary": "arn:aws:iam::*:policy/ephemeral-admin-boundary"}}}]}
    world = FakeWorld(boundaries={"R-bounded": boundary})
    create = Call("iam", "us-east-1", "CreateRole", {"RoleName": "R-x", "PermissionsBoundary": boundary})
    check(iam.first_denied(bounded, iam.authorizations(create, world)) is None, "CreateRole under the boundary")
    create.params.pop("PermissionsBoundary")
    check(iam.first_denied(bounded, iam.authorizations(create, world)) is not None, "CreateRole without it is denied")
    create.params["PermissionsBoundary"] = f"arn:aws:iam::{ACCOUNT}:policy/AdministratorAccess"
    check(iam.first_denied(bounded, iam.authorizations(create, world)) is not None, "CreateRole under another is denied")
    put = Call("iam", "us-east-1", "PutRolePolicy", {"RoleName": "R-bounded", "PolicyName": "p"})
    check(iam.first_denied(bounded, iam.authorizations(put, world)) is None, "PutRolePolicy on a bounded role")
    put.params["RoleName"] = "R-free"
    check(iam.first_denied(bounded, iam.authorizations(put, world)) is not None,
          "PutRolePolicy on a role without the boundary is denied")
    version = Call("iam", "us-east-1", "CreatePolicyVersion", {"PolicyArn": boundary, "SetAsDefault": "true"})
    checks = iam.authorizations(version, world)
    check([(c.action, c.resource) for c in checks] == [("iam:CreatePolicyVersion", boundary)],
          "CreatePolicyVersion is authorized on the policy's ARN", checks)
    made = Call("iam", "us-east-1", "CreatePolicy", {"PolicyName": "ephemeral-admin-boundary",
                                                     "Tags.member.1.Key": "Project", "Tags.member.1.Value": "E"})
    checks = iam.authorizations(made, world)
    check([(c.action, c.resource) for c in checks] == [("iam:CreatePolicy", boundary), ("iam:TagPolicy", boundary)],
          "CreatePolicy with tags needs iam:TagPolicy too", checks)


def main() -> int:
    for test in (t_run_instances, t_own_resources, t_security_group_rules, t_tag_actions_of_other_services,
                 t_service_linked_role_condition, t_ssm, t_operators, t_instance_connect_endpoint,
                 t_evaluation_logic, t_denials, t_permissions_boundary):
        print(f"- {test.__name__[2:].replace('_', ' ')}")
        try:
            test()
        except Exception:
            check(False, f"{test.__name__} raised", "\n" + traceback.format_exc())
    print(f"{passed} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Lints IAM policy documents: parliament (exits 1 on any MEDIUM or worse finding) and
cloudsplaining's privilege-escalation scan with every risky action flagged (`-aR`: it reads no
resource or condition).

Usage: lint-policies.py NAME=FILE [NAME=FILE ...]

Each escalation cloudsplaining reports must be in BOUNDED below: a route the policy closes with a
resource or condition cloudsplaining does not read, with the end-to-end test that tries the
route against the local cloud enforcing the policy and sees it denied. Anything else fails.

Two refinements of parliament. Its UNKNOWN_CONDITION_FOR_ACTION for ssm:SessionDocumentAccessCheck on
ssm:StartSession is dropped (that pair only): AWS documents the key there, parliament's data does
not have it yet. And of its RESOURCE_MISMATCH ("no resources match for the given action"):
parliament wants each statement to name every resource type an action requires, but AWS's own
tag-on-create examples split RunInstances (and CreateSecurityGroup) over two statements, one
for the resources the call creates (with aws:RequestTag conditions) and one for those it only
uses (image, subnet, VPC ...). Such a finding is dropped only when, across the policy's Allow
statements, every required resource type of that action is matched by some statement that
grants the action (parliament's own ARN matcher decides); anything else stays a finding.
"""
import json
import sys

from parliament import analyze_policy_string, enhance_finding, is_arn_strictly_valid
from parliament.cli import is_finding_filtered

BLOCKING = "MEDIUM"
# The one condition key parliament does not know for its action (see lint()).
KNOWN_CONDITION = "Unknown condition ssm:SessionDocumentAccessCheck for action ssm:StartSession"


def as_list(value):
    return value if isinstance(value, list) else [value]


def covered_elsewhere(doc: dict, action: str, arn_format: str) -> bool:
    resource_type = arn_format.split(":", 5)[-1]
    for st in as_list(doc.get("Statement", [])):
        if st.get("Effect") != "Allow" or action not in as_list(st.get("Action", [])):
            continue
        for resource in as_list(st.get("Resource", [])):
            if resource == "*" or is_arn_strictly_valid(resource_type, arn_format, resource):
                return True
    return False


def lint(name: str, text: str) -> int:
    doc = json.loads(text)
    policy = analyze_policy_string(text)
    bad = 0
    for finding in map(enhance_finding, policy.findings):
        if finding.issue == "UNKNOWN_CONDITION_FOR_ACTION" and KNOWN_CONDITION in str(finding.detail):
            # parliament's action data predates it; AWS's Session Manager quickstart end-user
            # policy puts it on ssm:StartSession exactly so (BoolIfExists).
            print(f"{name}: {finding.issue} dropped ({KNOWN_CONDITION}): known to AWS, "
                  "not yet to parliament")
            continue
        if finding.issue == "RESOURCE_MISMATCH" and isinstance(finding.detail, list):
            rest = [d for d in finding.detail
                    if not covered_elsewhere(doc, d["action"], d["required_format"])]
            if not rest:
                continue
            finding.detail = rest
        if is_finding_filtered(finding, BLOCKING):
            print(f"{name}: {finding.severity} {finding.issue} (below {BLOCKING}): {finding.detail}")
            continue
        bad += 1
        print(f"{name}: {finding.severity} {finding.issue}: {finding.title}: {finding.detail} "
              f"at {finding.location}")
    print(f"{name}: {'clean' if bad == 0 else f'{bad} finding(s) at {BLOCKING} or worse'}")
    return bad


# (policy name, cloudsplaining method) -> why it is closed, and the test that proves it.
BOUNDED = {
    ("user", "CreateEC2WithExistingIP"):
        "iam:PassRole names only the Session Manager box role (to ec2.amazonaws.com, iam:PassedToService), "
        "whose policy a daily user cannot change, the scheduler role (to scheduler.amazonaws.com only) and, "
        "only when an admin configures `instance_profile`, that profile's role (to EC2 only): "
        "escalation::a_daily_user_cannot_write_a_role_or_pass_one_the_tool_did_not_make",
    ("bootstrap", "PutRolePolicy"):
        "iam:PutRolePolicy/CreateRole/PutRolePermissionsBoundary only with iam:PermissionsBoundary = the tool's "
        "boundary, which the same policy denies changing or removing: "
        "escalation::the_bootstrap_policy_writes_roles_only_under_the_boundary_and_never_widens_it",
}


def escalations(name: str, doc: dict) -> int:
    from cloudsplaining.scan.policy_document import PolicyDocument

    found = PolicyDocument(doc, flag_conditional_statements=True,
                           flag_resource_arn_statements=True).allows_privilege_escalation
    bad = 0
    for item in found:
        why = BOUNDED.get((name, item["type"]))
        if why:
            print(f"{name}: escalation {item['type']} ({', '.join(item['actions'])}) is closed by {why}")
        else:
            bad += 1
            print(f"{name}: ESCALATION {item['type']} ({', '.join(item['actions'])}): not closed")
    print(f"{name}: {'no open escalation' if bad == 0 else f'{bad} open escalation(s)'}")
    return bad


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    bad = 0
    for arg in argv:
        name, _, path = arg.partition("=")
        with open(path or name) as f:
            text = f.read()
        bad += lint(name, text)
        bad += escalations(name, json.loads(text))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

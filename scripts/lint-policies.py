#!/usr/bin/env python3
"""Lints IAM policy documents with parliament; exits 1 on any MEDIUM or worse finding.

Usage: lint-policies.py NAME=FILE [NAME=FILE ...]

One refinement of parliament's RESOURCE_MISMATCH ("no resources match for the given action"):
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


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    bad = 0
    for arg in argv:
        name, _, path = arg.partition("=")
        with open(path or name) as f:
            bad += lint(name, f.read())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

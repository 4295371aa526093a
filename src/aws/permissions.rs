//! Every AWS action the tool calls, why, and how narrowly it can be granted.
//!
//! `ephemeral-admin policy` prints the IAM policy built from this list, and the end-to-end tests
//! check every action the local cloud saw against it, so the policy cannot drift from the code.

use serde_json::{Value, json};

use crate::session::tags;

/// How narrowly an action can be scoped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Read-only or not resource-scoped in IAM: `Resource: *`.
    Anywhere,
    /// Only on resources tagged `Project=EphemeralContainer`.
    OwnResources,
    /// Only on the tool's own IAM role and instance profile.
    OwnRole,
    /// Tagging only while creating the tool's resources.
    TagOnCreate,
}

#[derive(Debug, Clone, Copy)]
pub struct Permission {
    pub service: &'static str,
    pub action: &'static str,
    pub scope: Scope,
    pub why: &'static str,
}

const fn p(service: &'static str, action: &'static str, scope: Scope, why: &'static str) -> Permission {
    Permission { service, action, scope, why }
}

use Scope::*;

/// The complete list. Order groups them by command for readability.
pub const PERMISSIONS: &[Permission] = &[
    p("sts", "GetCallerIdentity", Anywhere, "who owns a session (owner tag); doctor"),
    p("ec2", "DescribeRegions", Anywhere, "doctor; cleanup --all-regions"),
    p("ec2", "DescribeAvailabilityZones", Anywhere, "zones to price and launch in"),
    p("ec2", "DescribeVpcs", Anywhere, "find the default VPC"),
    p("ec2", "DescribeSubnets", Anywhere, "doctor: a subnet exists"),
    p("ec2", "DescribeSecurityGroups", Anywhere, "find the tool's security group"),
    p("ec2", "DescribeSecurityGroupRules", Anywhere, "find per-session SSH rules"),
    p("ec2", "DescribeImages", Anywhere, "check an explicit --ami"),
    p("ssm", "GetParameter", Anywhere, "resolve an AMI alias from AWS's public parameters"),
    p("ec2", "DescribeSpotPriceHistory", Anywhere, "prices; the cheapest zone"),
    p("ec2", "DescribeInstances", Anywhere, "wait for running; list; status; cleanup"),
    p("ec2", "DescribeSpotInstanceRequests", Anywhere, "cleanup: open spot requests"),
    p("ec2", "CancelSpotInstanceRequests", Anywhere, "teardown and cleanup of spot requests"),
    p("ec2", "RunInstances", Anywhere, "launch the box"),
    p("ec2", "CreateSecurityGroup", Anywhere, "create the tool's security group once"),
    p(
        "ec2",
        "CreateTags",
        TagOnCreate,
        "tag instances, volumes, spot requests, groups and rules at creation",
    ),
    p("ec2", "CreateTags", OwnResources, "extend: move a session's deadline tag"),
    p("ec2", "DeleteTags", OwnResources, "release a shared SSH rule"),
    p("ec2", "TerminateInstances", OwnResources, "teardown, terminate, cleanup"),
    p("ec2", "AuthorizeSecurityGroupIngress", OwnResources, "open SSH for the caller's address only"),
    p("ec2", "RevokeSecurityGroupIngress", OwnResources, "close SSH at teardown"),
    p("ec2", "DeleteSecurityGroup", OwnResources, "cleanup --purge"),
    p("iam", "GetRole", OwnRole, "find the box's role"),
    p("iam", "CreateRole", OwnRole, "create the box's role once"),
    p("iam", "PutRolePolicy", OwnRole, "the box's least-privilege inline policy"),
    p("iam", "GetInstanceProfile", OwnRole, "find the box's instance profile"),
    p("iam", "CreateInstanceProfile", OwnRole, "create the instance profile once"),
    p("iam", "AddRoleToInstanceProfile", OwnRole, "link role and profile"),
    p("iam", "PassRole", OwnRole, "launch with the instance profile"),
    p("iam", "RemoveRoleFromInstanceProfile", OwnRole, "cleanup --purge"),
    p("iam", "DeleteInstanceProfile", OwnRole, "cleanup --purge"),
    p("iam", "DeleteRolePolicy", OwnRole, "cleanup --purge"),
    p("iam", "DeleteRole", OwnRole, "cleanup --purge"),
    p("cloudwatch", "PutMetricAlarm", Anywhere, "the outside fail-safe alarm per box"),
    p("cloudwatch", "DescribeAlarms", Anywhere, "cleanup: find leftover alarms"),
    p("cloudwatch", "DeleteAlarms", Anywhere, "teardown and cleanup of the alarm"),
    p("cloudwatch", "PutMetricData", Anywhere, "session metrics"),
    p("cloudwatch", "PutDashboard", Anywhere, "dashboard"),
    p("logs", "CreateLogGroup", Anywhere, "session event log"),
    p("logs", "PutRetentionPolicy", Anywhere, "keep session logs briefly"),
    p("logs", "CreateLogStream", Anywhere, "session event log"),
    p("logs", "PutLogEvents", Anywhere, "session event log"),
    p("logs", "DescribeLogGroups", Anywhere, "cleanup of ended sessions' logs"),
    p("logs", "DeleteLogGroup", Anywhere, "cleanup of ended sessions' logs"),
    p("budgets", "ViewBudget", Anywhere, "budget"),
    p("budgets", "ModifyBudget", Anywhere, "budget"),
    p(
        "iam",
        "CreateServiceLinkedRole",
        Anywhere,
        "CloudWatch alarm EC2 actions need their service-linked role, created once",
    ),
];

/// True when the policy grants `service:action` in some scope.
pub fn is_granted(service: &str, action: &str) -> bool {
    PERMISSIONS.iter().any(|p| p.service == service && p.action == action)
}

/// The IAM action that authorizes an API call, as `service:Action`. Mostly the same name; the
/// exceptions are CloudWatch (signed as `monitoring`) and AWS Budgets, whose API operations are
/// authorized by two coarse actions.
pub fn iam_action_for(signing_service: &str, api_action: &str) -> String {
    match (signing_service, api_action) {
        ("monitoring", action) => format!("cloudwatch:{action}"),
        ("budgets", action) if action.starts_with("Describe") || action.starts_with("View") => {
            "budgets:ViewBudget".into()
        }
        ("budgets", _) => "budgets:ModifyBudget".into(),
        (service, action) => format!("{service}:{action}"),
    }
}

fn actions(scope: Scope) -> Vec<String> {
    let mut list: Vec<String> = PERMISSIONS
        .iter()
        .filter(|p| p.scope == scope)
        .map(|p| format!("{}:{}", p.service, p.action))
        .collect();
    list.sort();
    list.dedup();
    list
}

/// The IAM policy document a user needs to run every command.
pub fn policy_document(role_name: &str) -> Value {
    json!({
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ReadAndLaunch",
                "Effect": "Allow",
                "Action": actions(Anywhere),
                "Resource": "*"
            },
            {
                "Sid": "TagOnlyWhileCreating",
                "Effect": "Allow",
                "Action": actions(TagOnCreate),
                "Resource": "*",
                "Condition": {"StringEquals": {"ec2:CreateAction": [
                    "RunInstances", "CreateSecurityGroup", "AuthorizeSecurityGroupIngress"
                ]}}
            },
            {
                "Sid": "ChangeOnlyOwnResources",
                "Effect": "Allow",
                "Action": actions(OwnResources),
                "Resource": "*",
                "Condition": {"StringEquals": {
                    format!("ec2:ResourceTag/{}", tags::PROJECT): tags::PROJECT_VALUE
                }}
            },
            {
                "Sid": "OwnRoleOnly",
                "Effect": "Allow",
                "Action": actions(OwnRole),
                "Resource": [
                    format!("arn:aws:iam::*:role/{role_name}"),
                    format!("arn:aws:iam::*:instance-profile/{role_name}")
                ]
            }
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_lands_in_exactly_the_statement_of_its_scope() {
        let doc = policy_document("SystemAdminTestingRole");
        let listed: usize =
            doc["Statement"].as_array().unwrap().iter().map(|s| s["Action"].as_array().unwrap().len()).sum();
        assert_eq!(listed, PERMISSIONS.len());
        assert!(is_granted("ec2", "RunInstances"));
        assert!(!is_granted("ec2", "DeleteVpc"));
    }
}

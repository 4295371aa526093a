//! Every AWS permission the tool needs, statement by statement, scoped to the tool's own resources.
//!
//! `ephemeral-admin policy` prints the user policy built here; `policy --box` prints the box role's
//! policy, which is the very document `iam` attaches. The end-to-end suite runs against a local
//! cloud that enforces the printed user policy with IAM's rules (tags on create need the tag
//! action, instance profiles need `iam:PassRole`, conditions on request and resource tags), so a
//! permission missing here fails a test. README, "AWS permissions", explains each statement.

use serde_json::{Value, json};

use crate::aws::{alarm, budgets, iam, metrics, schedule};
use crate::session::tags;

/// One statement of the user policy and why the tool needs it.
#[derive(Debug, Clone)]
pub struct Statement {
    pub sid: &'static str,
    pub why: &'static str,
    pub actions: &'static [&'static str],
    pub resources: Vec<String>,
    pub condition: Option<Value>,
}

/// The session-manager document `connect = "ssm"` starts (see `attach::ssm_proxy_command`).
pub const SSM_DOCUMENT: &str = "AWS-StartSSHSession";
/// The service-linked role CloudWatch uses to run an alarm's EC2 action (terminate).
pub const ALARM_ACTIONS_SERVICE: &str = "events.amazonaws.com";
/// The service a box's role is passed to.
pub const EC2_SERVICE: &str = "ec2.amazonaws.com";
/// The service whose service-linked role an EC2 Instance Connect Endpoint runs as.
pub const EICE_SERVICE: &str = "ec2-instance-connect.amazonaws.com";

fn project_is_ours(key: &str) -> Value {
    json!({"StringEquals": {format!("{key}/{}", tags::PROJECT): tags::PROJECT_VALUE}})
}

/// The caller's own aws:userid, as IAM fills it in.
pub const USERID_VARIABLE: &str = "${aws:userid}";

/// A resource (or, on create, the request) tagged as the tool's and as the caller's own.
fn owned(key: &str) -> Value {
    json!({"StringEquals": {
        format!("{key}/{}", tags::PROJECT): tags::PROJECT_VALUE,
        format!("{key}/{}", tags::OWNER_ID): USERID_VARIABLE,
    }})
}

/// The tool's alarms, by name.
fn alarms() -> String {
    format!("arn:aws:cloudwatch:*:*:alarm:{}*", alarm::ALARM_PREFIX)
}

fn owned_on_create() -> Value {
    owned("aws:RequestTag")
}

/// The EC2 Instance Connect Endpoint and its group: standing parts, nobody's in particular.
fn standing_eice(key: &str) -> Value {
    json!({"StringEquals": {
        format!("{key}/{}", tags::PROJECT): tags::PROJECT_VALUE,
        format!("{key}/{}", tags::STANDING): tags::STANDING_EICE,
    }})
}

fn ec2(types: &[&str]) -> Vec<String> {
    types.iter().map(|t| format!("arn:aws:ec2:*:*:{t}/*")).collect()
}

/// The statements of the user policy, for the box role named `role_name` (and its SSM twin), and
/// for the user's own `instance_profile` when one is configured.
pub fn statements(role_name: &str, instance_profile: Option<&str>) -> Vec<Statement> {
    let mut out = vec![
        Statement {
            sid: "ReadOnly",
            why: "find the default VPC, subnets (and whether their route tables reach an internet gateway), the tool's group, images, prices, instances, spot requests, alarms, log groups and schedules; validate policies",
            actions: &[
                "ec2:DescribeRegions",
                "ec2:DescribeAvailabilityZones",
                "ec2:DescribeVpcs",
                "ec2:DescribeSubnets",
                "ec2:DescribeRouteTables",
                "ec2:DescribeSecurityGroups",
                "ec2:DescribeSecurityGroupRules",
                "ec2:DescribeImages",
                "ec2:DescribeSpotPriceHistory",
                "ec2:DescribeInstances",
                "ec2:DescribeSpotInstanceRequests",
                "ec2:DescribeInstanceConnectEndpoints",
                "cloudwatch:DescribeAlarms",
                "logs:DescribeLogGroups",
                "scheduler:ListSchedules",
                "access-analyzer:ValidatePolicy",
            ],
            resources: vec!["*".into()],
            condition: None,
        },
        Statement {
            sid: "ReadPublicImageParameters",
            why: "resolve an AMI alias (ubuntu-24.04, al2023) from AWS's public SSM parameters",
            actions: &["ssm:GetParameter"],
            resources: vec!["arn:aws:ssm:*:*:parameter/aws/service/*".into()],
            condition: None,
        },
        Statement {
            sid: "LaunchFromSharedResources",
            why: "RunInstances also touches the image, subnet, security group, network interface and key pair; none of them is created or changed",
            actions: &["ec2:RunInstances"],
            resources: [
                vec!["arn:aws:ec2:*::image/*".to_string()],
                ec2(&["subnet", "security-group", "network-interface", "key-pair"]),
            ]
            .concat(),
            condition: None,
        },
        Statement {
            sid: "CreateOnlyOwnTaggedResources",
            why: "the box's instance, volume and spot request and the session's security group may only be created carrying Project=EphemeralContainer and the creator's own aws:userid as owner-id",
            actions: &["ec2:RunInstances", "ec2:CreateSecurityGroup"],
            resources: ec2(&["instance", "volume", "spot-instances-request", "security-group"]),
            condition: Some(owned_on_create()),
        },
        Statement {
            sid: "CreateOnlyOwnTaggedRules",
            why: "an SSH rule may only be created carrying the same two tags (the group it goes into must be the caller's own: ChangeOnlyOwnResources)",
            actions: &["ec2:AuthorizeSecurityGroupIngress"],
            resources: ec2(&["security-group-rule"]),
            condition: Some(owned_on_create()),
        },
        Statement {
            sid: "CreateOnlyTheToolsEndpointGroup",
            why: "`setup eice`: the endpoint's own security group, a standing part (tagged ephemeral-admin:standing=eice, no owner)",
            actions: &["ec2:CreateSecurityGroup"],
            resources: ec2(&["security-group"]),
            condition: Some(standing_eice("aws:RequestTag")),
        },
        Statement {
            sid: "CreateSecurityGroupInAnyVpc",
            why: "CreateSecurityGroup also authorizes on the VPC the group goes into (the default VPC, or the chosen subnet's)",
            actions: &["ec2:CreateSecurityGroup"],
            resources: ec2(&["vpc"]),
            condition: None,
        },
        Statement {
            sid: "TagOnlyWhileCreating",
            why: "create-with-tags needs ec2:CreateTags too; allowed only inside the four creating calls",
            actions: &["ec2:CreateTags"],
            resources: ec2(&[
                "instance",
                "volume",
                "spot-instances-request",
                "security-group",
                "security-group-rule",
                "instance-connect-endpoint",
            ]),
            condition: Some(json!({
                "StringEquals": {
                    "ec2:CreateAction": ["RunInstances", "CreateSecurityGroup", "AuthorizeSecurityGroupIngress", "CreateInstanceConnectEndpoint"],
                    format!("aws:RequestTag/{}", tags::PROJECT): tags::PROJECT_VALUE
                }
            })),
        },
        Statement {
            sid: "ChangeOnlyOwnResources",
            why: "terminate one's own boxes, cancel their spot requests, open and close SSH on one's own session groups, move their deadlines, delete them: only resources tagged Project=EphemeralContainer whose owner-id is the caller's own aws:userid",
            actions: &[
                "ec2:TerminateInstances",
                "ec2:CancelSpotInstanceRequests",
                "ec2:CreateTags",
                "ec2:AuthorizeSecurityGroupIngress",
                "ec2:RevokeSecurityGroupIngress",
                "ec2:DeleteSecurityGroup",
            ],
            resources: ec2(&["instance", "spot-instances-request", "security-group", "security-group-rule"]),
            condition: Some(owned("ec2:ResourceTag")),
        },
        Statement {
            sid: "ChangeOnlyTheToolsEndpoints",
            why: "`setup eice` narrows the endpoint group's egress; `cleanup --purge` deletes the endpoint and its group: only standing parts tagged ephemeral-admin:standing=eice",
            actions: &[
                "ec2:AuthorizeSecurityGroupEgress",
                "ec2:RevokeSecurityGroupEgress",
                "ec2:DeleteSecurityGroup",
                "ec2:DeleteInstanceConnectEndpoint",
            ],
            resources: ec2(&["security-group", "instance-connect-endpoint"]),
            condition: Some(standing_eice("ec2:ResourceTag")),
        },
        Statement {
            sid: "ReadStandingRoles",
            why: "find the scheduler role and the Session Manager box role and profile that `setup roles` made (a daily user never writes IAM)",
            actions: &["iam:GetRole", "iam:GetInstanceProfile"],
            resources: standing_roles(role_name),
            condition: None,
        },
        Statement {
            sid: "PassSsmBoxRoleToEc2Only",
            why: "`connect = \"ssm\"`: launch with the Session Manager box role, to EC2 only; its policy is the SSM agent's, under the boundary, and no daily user can change it",
            actions: &["iam:PassRole"],
            resources: vec![format!("arn:aws:iam::*:role/{}", iam::ssm_role_name(role_name))],
            condition: Some(json!({"StringEquals": {"iam:PassedToService": EC2_SERVICE}})),
        },
        Statement {
            sid: "OwnSchedulesOnly",
            why: "the scheduled deadline: a session's one-time schedules (terminate at the deadline, sweep its group and alarm after), moved by `extend`, deleted at teardown",
            actions: &[
                "scheduler:CreateSchedule",
                "scheduler:UpdateSchedule",
                "scheduler:GetSchedule",
                "scheduler:DeleteSchedule",
            ],
            resources: vec![format!(
                "arn:aws:scheduler:*:*:schedule/{}/{}*",
                schedule::GROUP,
                schedule::PREFIX
            )],
            condition: None,
        },
        Statement {
            sid: "PassSchedulerRoleToSchedulerOnly",
            why: "a schedule names the role it runs as: pass that one role, to EventBridge Scheduler only",
            actions: &["iam:PassRole"],
            resources: vec![format!("arn:aws:iam::*:role/{}", iam::scheduler_role_name(role_name))],
            condition: Some(json!({"StringEquals": {"iam:PassedToService": schedule::SERVICE}})),
        },
        Statement {
            sid: "AlarmActionsServiceLinkedRole",
            why: "an alarm that terminates an instance needs CloudWatch's events service-linked role, created by AWS on first use",
            actions: &["iam:CreateServiceLinkedRole"],
            resources: vec![format!(
                "arn:aws:iam::*:role/aws-service-role/{ALARM_ACTIONS_SERVICE}/AWSServiceRoleForCloudWatchEvents*"
            )],
            condition: Some(json!({"StringEquals": {"iam:AWSServiceName": ALARM_ACTIONS_SERVICE}})),
        },
        Statement {
            sid: "OwnAlarmsOnly",
            why: "the per-box fail-safe alarm, created with tags (so also cloudwatch:TagResource) carrying the creator's own aws:userid, and never over another person's alarm",
            actions: &["cloudwatch:PutMetricAlarm", "cloudwatch:TagResource"],
            resources: vec![alarms()],
            condition: Some(json!({
                "StringEquals": {format!("aws:RequestTag/{}", tags::OWNER_ID): USERID_VARIABLE},
                "StringEqualsIfExists": {format!("aws:ResourceTag/{}", tags::OWNER_ID): USERID_VARIABLE},
            })),
        },
        Statement {
            sid: "DeleteOwnAlarmsOnly",
            why: "delete one's own sessions' alarms only (owner-id tag)",
            actions: &["cloudwatch:DeleteAlarms"],
            resources: vec![alarms()],
            condition: Some(
                json!({"StringEquals": {format!("aws:ResourceTag/{}", tags::OWNER_ID): USERID_VARIABLE}}),
            ),
        },
        Statement {
            sid: "OwnMetricsOnly",
            why: "session metrics, only in the tool's namespace",
            actions: &["cloudwatch:PutMetricData"],
            resources: vec!["*".into()],
            condition: Some(json!({"StringEquals": {"cloudwatch:namespace": metrics::NAMESPACE}})),
        },
        Statement {
            sid: "OwnDashboardOnly",
            why: "`dashboard`: the tool's one dashboard",
            actions: &["cloudwatch:PutDashboard"],
            resources: vec![format!("arn:aws:cloudwatch::*:dashboard/{}", metrics::DASHBOARD_NAME)],
            condition: None,
        },
        Statement {
            sid: "OwnLogGroupsOnly",
            why: "the session event logs (created with tags, so also logs:TagResource), their retention, and their cleanup",
            actions: &[
                "logs:CreateLogGroup",
                "logs:TagResource",
                "logs:PutRetentionPolicy",
                "logs:CreateLogStream",
                "logs:PutLogEvents",
                "logs:DeleteLogGroup",
            ],
            resources: vec![format!("arn:aws:logs:*:*:log-group:{}*", iam::LOG_GROUP_PREFIX)],
            condition: None,
        },
        Statement {
            sid: "OwnBudgetOnly",
            why: "`budget` and `cost`: the tool's one monthly budget",
            actions: &["budgets:ViewBudget", "budgets:ModifyBudget"],
            resources: vec![format!("arn:aws:budgets::*:budget/{}", budgets::BUDGET_NAME)],
            condition: None,
        },
        Statement {
            sid: "SessionManagerToOwnBoxesOnly",
            why: "`connect = \"ssm\"`: start a Session Manager session only on one's own boxes (Project and owner-id tags), and only with a document the caller may use (ssm:SessionDocumentAccessCheck)",
            actions: &["ssm:StartSession"],
            resources: ec2(&["instance"]),
            condition: Some({
                let mut c = owned("ssm:resourceTag");
                c["BoolIfExists"] = json!({"ssm:SessionDocumentAccessCheck": "true"});
                c
            }),
        },
    ];
    out.extend(instance_connect_endpoint());
    out.push(Statement {
        sid: "SessionManagerSshDocumentOnly",
        why: "`connect = \"ssm\"`: the SSH-over-Session-Manager document, and ending or resuming one's own sessions",
        actions: &["ssm:StartSession", "ssm:TerminateSession", "ssm:ResumeSession"],
        // Session ids start with the IAM user's name, or the caller's user id when federated.
        resources: vec![
            format!("arn:aws:ssm:*:*:document/{SSM_DOCUMENT}"),
            "arn:aws:ssm:*:*:session/${aws:username}-*".into(),
            "arn:aws:ssm:*:*:session/${aws:userid}-*".into(),
        ],
        condition: None,
    });
    if let Some(profile) = instance_profile {
        out.extend(configured_profile(profile));
    }
    out
}

/// `connect = "eice"`: tunnels to port 22 through an endpoint, and `setup eice` creating the
/// tool's endpoint (tagged; AWS makes its network interface and, on first use, its
/// service-linked role). Deleting it is in `ChangeOnlyTheToolsEndpoints`.
fn instance_connect_endpoint() -> [Statement; 4] {
    [
        Statement {
            sid: "InstanceConnectTunnelToSshOnly",
            why: "`connect = \"eice\"`: open a tunnel through an EC2 Instance Connect Endpoint, to port 22 only",
            actions: &["ec2-instance-connect:OpenTunnel"],
            resources: ec2(&["instance-connect-endpoint"]),
            // OpenTunnel's condition keys name the port, the private address, the duration and
            // the endpoint's tags, never the target instance's tags, so "the tool's instances"
            // cannot be said here; the box's group admits the endpoint only for the session. Not
            // the endpoint's tags either: AWS allows one endpoint per VPC, so a VPC that already
            // has one (not ours) must be usable. No maxTunnelDuration condition: AWS caps tunnels
            // at an hour anyway, and its two spellings in the Service Authorization Reference trip
            // policy linters.
            condition: Some(json!({"NumericEquals": {"ec2-instance-connect:remotePort": "22"}})),
        },
        Statement {
            sid: "CreateOnlyTaggedInstanceConnectEndpoint",
            why: "`setup eice`: the endpoint may only be created carrying Project=EphemeralContainer",
            actions: &["ec2:CreateInstanceConnectEndpoint"],
            resources: ec2(&["instance-connect-endpoint"]),
            condition: Some(project_is_ours("aws:RequestTag")),
        },
        Statement {
            sid: "InstanceConnectEndpointPlacement",
            why: "`setup eice`: the endpoint goes into a subnet with the tool's group, and AWS gives it a network interface there",
            actions: &["ec2:CreateInstanceConnectEndpoint", "ec2:CreateNetworkInterface"],
            resources: ec2(&["subnet", "security-group", "network-interface"]),
            condition: None,
        },
        Statement {
            sid: "InstanceConnectServiceLinkedRole",
            why: "`setup eice`: the endpoint's service-linked role, created by AWS on the first endpoint of the account",
            actions: &["iam:CreateServiceLinkedRole"],
            resources: vec![format!(
                "arn:aws:iam::*:role/aws-service-role/{EICE_SERVICE}/AWSServiceRoleForEC2InstanceConnect*"
            )],
            condition: Some(json!({"StringEquals": {"iam:AWSServiceName": EICE_SERVICE}})),
        },
    ]
}

/// `instance_profile`: read that one profile (to check it exists and name its role) and pass its
/// role to EC2. The role is taken to have the profile's name, as the IAM console creates them;
/// a profile holding a differently named role needs `iam:PassRole` on that role instead (launch
/// says so).
fn configured_profile(profile: &str) -> [Statement; 2] {
    [
        Statement {
            sid: "ReadConfiguredInstanceProfile",
            why: "`instance_profile`: check the configured profile exists and find its role",
            actions: &["iam:GetInstanceProfile"],
            resources: vec![format!("arn:aws:iam::*:instance-profile/{profile}")],
            condition: None,
        },
        Statement {
            sid: "PassConfiguredInstanceProfileRole",
            why: "`instance_profile`: launch boxes with the configured profile's role, to EC2 only",
            actions: &["iam:PassRole"],
            resources: vec![format!("arn:aws:iam::*:role/{profile}")],
            condition: Some(json!({"StringEquals": {"iam:PassedToService": EC2_SERVICE}})),
        },
    ]
}

/// The standing roles' and the SSM profile's ARNs (any account).
fn standing_roles(role_name: &str) -> Vec<String> {
    let ssm = iam::ssm_role_name(role_name);
    vec![
        format!("arn:aws:iam::*:role/{ssm}"),
        format!("arn:aws:iam::*:instance-profile/{ssm}"),
        format!("arn:aws:iam::*:role/{}", iam::scheduler_role_name(role_name)),
    ]
}

/// `policy --bootstrap`: what an account admin needs besides the daily policy to run `setup
/// roles` (and `cleanup --purge`), once. Every role write is bound to the tool's permissions
/// boundary, which nothing here may widen or remove, so even a holder of this policy can give a
/// role no more than the boundary: the SSM agent's channels and ending the tool's boxes.
pub fn bootstrap_statements(role_name: &str) -> Vec<Statement> {
    let ssm = iam::ssm_role_name(role_name);
    let scheduler = iam::scheduler_role_name(role_name);
    let role_arns: Vec<String> =
        [&ssm, &scheduler].iter().map(|r| format!("arn:aws:iam::*:role/{r}")).collect();
    // Roles made by older versions (the plain box role, unbounded) are only ever removed.
    let mut upkeep = role_arns.clone();
    upkeep.push(format!("arn:aws:iam::*:role/{role_name}"));
    upkeep.extend([role_name, ssm.as_str()].iter().map(|r| format!("arn:aws:iam::*:instance-profile/{r}")));
    let boundary = format!("arn:aws:iam::*:policy/{}", iam::BOUNDARY_POLICY_NAME);
    vec![
        Statement {
            sid: "StandingRolesOnlyUnderTheBoundary",
            why: "create the scheduler role and the Session Manager box role, set their policies, and put older ones under the boundary: only with the tool's permissions boundary",
            actions: &["iam:CreateRole", "iam:PutRolePolicy", "iam:PutRolePermissionsBoundary"],
            resources: role_arns.clone(),
            condition: Some(json!({"ArnLike": {"iam:PermissionsBoundary": boundary}})),
        },
        Statement {
            sid: "StandingRolesUpkeep",
            why: "tag the roles and the profile at creation, link the role into its profile, and (`cleanup --purge`) remove them; none of these can widen what a role may do",
            actions: &[
                "iam:GetRole",
                "iam:TagRole",
                "iam:DeleteRolePolicy",
                "iam:DeleteRole",
                "iam:GetInstanceProfile",
                "iam:CreateInstanceProfile",
                "iam:TagInstanceProfile",
                "iam:AddRoleToInstanceProfile",
                "iam:RemoveRoleFromInstanceProfile",
                "iam:DeleteInstanceProfile",
            ],
            resources: upkeep,
            condition: None,
        },
        Statement {
            sid: "PassSsmBoxRoleIntoItsProfile",
            why: "adding a role to an instance profile needs iam:PassRole on it: the Session Manager box role only",
            actions: &["iam:PassRole"],
            resources: vec![format!("arn:aws:iam::*:role/{ssm}")],
            condition: None,
        },
        Statement {
            sid: "CreateTheBoundaryOnce",
            why: "create the permissions boundary if the account has none yet (tagged), and read it",
            actions: &["iam:CreatePolicy", "iam:TagPolicy", "iam:GetPolicy", "iam:GetPolicyVersion"],
            resources: vec![boundary],
            condition: None,
        },
    ]
}

/// `policy --team-admin`: what a team admin adds to the daily policy to end anyone's box
/// (`terminate --force`, `cleanup --all-owners`): the same writes as `ChangeOnlyOwnResources`
/// that end a session, on any resource of the tool's, whoever's owner-id it carries.
pub fn team_admin_statements() -> Vec<Statement> {
    vec![
        Statement {
            sid: "TeamAdminEndsAnyonesBoxes",
            why: "end any teammate's session: terminate its box, cancel its spot request, close its SSH rules and delete its group, whoever made it",
            actions: &[
                "ec2:TerminateInstances",
                "ec2:CancelSpotInstanceRequests",
                "ec2:RevokeSecurityGroupIngress",
                "ec2:DeleteSecurityGroup",
            ],
            resources: ec2(&["instance", "spot-instances-request", "security-group", "security-group-rule"]),
            condition: Some(project_is_ours("ec2:ResourceTag")),
        },
        Statement {
            sid: "TeamAdminDeletesAnyonesAlarms",
            why: "delete the fail-safe alarm of a session it ended, whoever made it",
            actions: &["cloudwatch:DeleteAlarms"],
            resources: vec![alarms()],
            condition: None,
        },
    ]
}

/// `policy --team-admin` as a document.
pub fn team_admin_document() -> Value {
    to_json(&team_admin_statements(), "Allow")
}

/// The explicit denials of `policy --bootstrap`: they hold whatever else the holder is allowed.
pub fn bootstrap_denials(role_name: &str) -> Vec<Statement> {
    let roles = [iam::ssm_role_name(role_name), iam::scheduler_role_name(role_name)];
    vec![Statement {
        sid: "NeverWidenOrRemoveTheBoundary",
        why: "explicit deny: no new version, default version or deletion of the boundary, and no role taken out from under it",
        actions: &[
            "iam:CreatePolicyVersion",
            "iam:SetDefaultPolicyVersion",
            "iam:DeletePolicy",
            "iam:DeleteRolePermissionsBoundary",
        ],
        resources: std::iter::once(format!("arn:aws:iam::*:policy/{}", iam::BOUNDARY_POLICY_NAME))
            .chain(roles.iter().map(|r| format!("arn:aws:iam::*:role/{r}")))
            .collect(),
        condition: None,
    }]
}

/// `policy --bootstrap` as a document: its allows, then its denials.
pub fn bootstrap_document(role_name: &str) -> Value {
    let mut doc = to_json(&bootstrap_statements(role_name), "Allow");
    let denials = to_json(&bootstrap_denials(role_name), "Deny");
    let list = doc["Statement"].as_array_mut().expect("a list");
    list.extend(denials["Statement"].as_array().cloned().unwrap_or_default());
    doc
}

fn to_json(statements: &[Statement], effect: &str) -> Value {
    let list: Vec<Value> = statements
        .iter()
        .map(|s| {
            let mut v = json!({
                "Sid": s.sid,
                "Effect": effect,
                "Action": s.actions,
                "Resource": s.resources,
            });
            if let Some(c) = &s.condition {
                v["Condition"] = c.clone();
            }
            v
        })
        .collect();
    json!({"Version": "2012-10-17", "Statement": list})
}

/// The IAM policy document a user needs to run every command.
pub fn policy_document(role_name: &str, instance_profile: Option<&str>) -> Value {
    to_json(&statements(role_name, instance_profile), "Allow")
}

/// `service:Action` of every statement, deduplicated (for tests and the README).
pub fn granted_actions(role_name: &str) -> Vec<String> {
    let mut all: Vec<String> =
        statements(role_name, None).iter().flat_map(|s| s.actions.iter().map(|a| a.to_string())).collect();
    all.sort();
    all.dedup();
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_have_unique_sids_and_only_own_resources_are_written() {
        let list = statements("SystemAdminTestingRole", Some("AdminWork"));
        let mut sids: Vec<&str> = list.iter().map(|s| s.sid).collect();
        sids.sort();
        sids.dedup();
        assert_eq!(sids.len(), list.len());
        let star_writes: Vec<&str> = list
            .iter()
            .filter(|s| s.resources == ["*"] && s.condition.is_none())
            .flat_map(|s| s.actions.iter().copied())
            .filter(|a| {
                !a.contains(":Describe") && !a.contains(":List") && *a != "access-analyzer:ValidatePolicy"
            })
            .collect();
        assert!(star_writes.is_empty(), "unscoped writes: {star_writes:?}");
        let doc = policy_document("R", None);
        assert!(doc.to_string().contains("arn:aws:iam::*:role/R-ssm"));
        assert!(!doc.to_string().contains("PassConfiguredInstanceProfileRole"));
        let doc = policy_document("R", Some("AdminWork")).to_string();
        assert!(doc.contains("arn:aws:iam::*:role/AdminWork") && doc.contains("instance-profile/AdminWork"));
    }

    #[test]
    fn no_daily_statement_writes_iam_and_every_bootstrap_role_write_needs_the_boundary() {
        let daily = statements("R", Some("AdminWork"));
        let iam_writes: Vec<&str> = daily
            .iter()
            .flat_map(|s| s.actions.iter().copied())
            .filter(|a| a.starts_with("iam:") && !a.starts_with("iam:Get"))
            .filter(|a| *a != "iam:PassRole" && *a != "iam:CreateServiceLinkedRole")
            .collect();
        assert!(iam_writes.is_empty(), "daily IAM writes: {iam_writes:?}");
        // Every PassRole names its one service.
        for s in daily.iter().filter(|s| s.actions.contains(&"iam:PassRole")) {
            assert!(
                s.condition.as_ref().is_some_and(|c| c.to_string().contains("iam:PassedToService")),
                "{}",
                s.sid
            );
        }
        let doc = bootstrap_document("R");
        for st in doc["Statement"].as_array().unwrap() {
            let actions = st["Action"].to_string();
            if st["Effect"] == "Allow"
                && (actions.contains("iam:PutRolePolicy") || actions.contains("iam:CreateRole"))
            {
                assert_eq!(
                    st["Condition"]["ArnLike"]["iam:PermissionsBoundary"],
                    "arn:aws:iam::*:policy/ephemeral-admin-boundary"
                );
            }
        }
        let deny = doc["Statement"].as_array().unwrap().iter().find(|s| s["Effect"] == "Deny").unwrap();
        assert!(deny["Action"].to_string().contains("iam:DeleteRolePermissionsBoundary"));
    }

    #[test]
    fn readme_explains_every_statement() {
        let readme = include_str!("../../README.md");
        let all = [
            statements("SystemAdminTestingRole", Some("AdminWork")),
            bootstrap_statements("SystemAdminTestingRole"),
            bootstrap_denials("SystemAdminTestingRole"),
            team_admin_statements(),
        ];
        for s in all.iter().flatten() {
            assert!(readme.contains(&format!("`{}`", s.sid)), "README lacks statement {}", s.sid);
        }
    }
}

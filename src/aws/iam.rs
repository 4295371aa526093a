//! The tool's standing IAM: the role EventBridge Scheduler runs the deadlines as, the role and
//! instance profile of Session Manager boxes, and the permissions boundary that bounds both.
//!
//! Nothing here runs on a daily user's behalf: `setup roles` (an account admin, once, holding
//! `policy --bootstrap`) creates and repairs these, and `cleanup --purge` removes them. A daily
//! user's policy may only read them and pass them to their one service, so no daily user can
//! write a role policy. Every role is created with the boundary, whose document is the union of
//! what the roles need: whatever is put on a role later (by a bootstrap holder), it can do no
//! more. Boxes reached by SSH get no role at all: nothing on them uses AWS, so IMDS holds no
//! credentials. Session Manager boxes (`connect = "ssm"`) get `{name}-ssm`, which holds only
//! what the SSM agent needs.

use aws_sdk_iam::types::Tag;
use serde_json::json;

use super::{Aws, AwsError, AwsResultExt, code_of};
use crate::session::tags;

pub const INLINE_POLICY_NAME: &str = "ephemeral-admin-box";
pub const METRIC_NAMESPACE: &str = "EphemeralAdmin";
pub const LOG_GROUP_PREFIX: &str = "/aws/ephemeral-container/";
/// The customer-managed policy every standing role is created with as its permissions boundary.
pub const BOUNDARY_POLICY_NAME: &str = "ephemeral-admin-boundary";

/// The boundary's ARN in an account.
pub fn boundary_arn(partition: &str, account: &str) -> String {
    format!("arn:{partition}:iam::{account}:policy/{BOUNDARY_POLICY_NAME}")
}

/// The instance profile the box launches with.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstanceProfile {
    pub name: String,
    /// True when this call created the profile (or linked its role). EC2 may not see a profile
    /// for a few seconds, whoever made it: RunInstances waits for it either way (see `launch`).
    pub fresh: bool,
}

pub fn trust_policy() -> String {
    json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": {"Service": "ec2.amazonaws.com"},
            "Action": "sts:AssumeRole"
        }]
    })
    .to_string()
}

/// The role and instance profile name for SSM boxes.
pub fn ssm_role_name(name: &str) -> String {
    format!("{name}-ssm")
}

/// What the SSM agent needs for Session Manager (the session part of AWS's managed
/// `AmazonSSMManagedInstanceCore`): register the instance, and the control and data channels.
pub const SESSION_MANAGER_AGENT_ACTIONS: &[&str] = &[
    "ssm:UpdateInstanceInformation",
    "ssmmessages:CreateControlChannel",
    "ssmmessages:CreateDataChannel",
    "ssmmessages:OpenControlChannel",
    "ssmmessages:OpenDataChannel",
    "ec2messages:AcknowledgeMessage",
    "ec2messages:DeleteMessage",
    "ec2messages:FailMessage",
    "ec2messages:GetEndpoint",
    "ec2messages:GetMessages",
    "ec2messages:SendReply",
];

fn session_manager_agent() -> serde_json::Value {
    json!({
        "Sid": "SessionManagerAgent",
        "Effect": "Allow",
        "Action": SESSION_MANAGER_AGENT_ACTIONS,
        "Resource": "*"
    })
}

/// The Session Manager box role's inline policy (`policy --box` prints this very document):
/// the agent's channels and nothing else. Boxes reached by SSH get no role.
pub fn box_policy_document() -> serde_json::Value {
    json!({"Version": "2012-10-17", "Statement": [session_manager_agent()]})
}

pub fn box_policy() -> String {
    box_policy_document().to_string()
}

/// The permissions boundary of every standing role: what the SSM box role and the scheduler role
/// need together, and nothing more. A role created under it can never exceed it, whatever inline
/// policy is put on it later.
pub fn boundary_policy_document() -> serde_json::Value {
    let mut statements = vec![session_manager_agent()];
    statements.extend(scheduler_policy_document()["Statement"].as_array().cloned().unwrap_or_default());
    json!({"Version": "2012-10-17", "Statement": statements})
}

/// `setup roles`: the boundary, then the scheduler role and the SSM box role with its profile,
/// each created under the boundary (or, made by an older version without one, put under it) with
/// its policy set again. Safe to repeat and against a concurrent run. Answers the names of what
/// it created or repaired.
pub async fn bootstrap(
    aws: &Aws,
    base: &str,
    caller: &super::identity::Caller,
) -> Result<Vec<String>, AwsError> {
    let boundary = boundary_arn(caller.partition(), &caller.account);
    let mut done = Vec::new();
    if ensure_boundary(aws, &boundary).await? {
        done.push(format!("created permissions boundary {BOUNDARY_POLICY_NAME}"));
    }
    let scheduler = Role {
        name: scheduler_role_name(base),
        description: "ephemeral-admin: EventBridge Scheduler ends the tool's boxes at their deadline",
        trust: scheduler_trust_policy(&caller.account),
        policy_name: SCHEDULER_POLICY_NAME,
        policy: scheduler_policy_document().to_string(),
    };
    let ssm = Role {
        name: ssm_role_name(base),
        description: "ephemeral-admin Session Manager boxes: the SSM agent's channels only",
        trust: trust_policy(),
        policy_name: INLINE_POLICY_NAME,
        policy: box_policy(),
    };
    for role in [&scheduler, &ssm] {
        let verb = if ensure_role(aws, role, &boundary).await? { "created" } else { "checked" };
        done.push(format!("{verb} role {} (boundary {BOUNDARY_POLICY_NAME})", role.name));
    }
    if ensure_profile(aws, &ssm.name).await? {
        done.push(format!("created instance profile {}", ssm.name));
    }
    Ok(done)
}

/// A standing role as `bootstrap` makes it.
struct Role {
    name: String,
    description: &'static str,
    trust: String,
    policy_name: &'static str,
    policy: String,
}

/// Answers whether this call created the boundary. An existing one is left as it is: the
/// bootstrap policy may not write a policy version, so nobody holding it can widen the boundary.
async fn ensure_boundary(aws: &Aws, arn: &str) -> Result<bool, AwsError> {
    match aws.iam.get_policy().policy_arn(arn).send().await {
        Ok(_) => return Ok(false),
        Err(e) if code_of(&e) == Some("NoSuchEntity") => {}
        Err(e) => return Err(AwsError::new(format!("looking up policy {BOUNDARY_POLICY_NAME}"), e)),
    }
    let created = aws
        .iam
        .create_policy()
        .policy_name(BOUNDARY_POLICY_NAME)
        .description("ephemeral-admin: the most any of the tool's roles may ever do")
        .policy_document(boundary_policy_document().to_string())
        .set_tags(Some(iam_tags()))
        .send()
        .await;
    match created {
        Ok(_) => Ok(true),
        Err(e) if code_of(&e) == Some("EntityAlreadyExists") => Ok(false),
        Err(e) => Err(AwsError::new(format!("creating policy {BOUNDARY_POLICY_NAME}"), e)),
    }
}

/// Answers whether this call created the role. Either way the role ends up under the boundary
/// with its policy as this version writes it.
async fn ensure_role(aws: &Aws, role: &Role, boundary: &str) -> Result<bool, AwsError> {
    let name = &role.name;
    let created = aws
        .iam
        .create_role()
        .role_name(name)
        .description(role.description)
        .assume_role_policy_document(&role.trust)
        .permissions_boundary(boundary)
        .set_tags(Some(iam_tags()))
        .send()
        .await;
    let fresh = match created {
        Ok(_) => true,
        Err(e) if code_of(&e) == Some("EntityAlreadyExists") => {
            aws.iam
                .put_role_permissions_boundary()
                .role_name(name)
                .permissions_boundary(boundary)
                .send()
                .await
                .doing(format!("putting IAM role {name} under the boundary"))?;
            false
        }
        Err(e) => return Err(AwsError::new(format!("creating IAM role {name}"), e)),
    };
    aws.iam
        .put_role_policy()
        .role_name(name)
        .policy_name(role.policy_name)
        .policy_document(&role.policy)
        .send()
        .await
        .doing(format!("setting the policy of IAM role {name}"))?;
    Ok(fresh)
}

/// The instance profile of the same name holding the role. Answers whether this call created or
/// linked anything.
async fn ensure_profile(aws: &Aws, name: &str) -> Result<bool, AwsError> {
    let mut changed = false;
    let roles = match profile_roles(aws, name).await? {
        Some(roles) => roles,
        None => {
            let created = aws
                .iam
                .create_instance_profile()
                .instance_profile_name(name)
                .set_tags(Some(iam_tags()))
                .send()
                .await;
            match created {
                Ok(_) => changed = true,
                Err(e) if code_of(&e) == Some("EntityAlreadyExists") => {}
                Err(e) => return Err(AwsError::new(format!("creating instance profile {name}"), e)),
            }
            Vec::new()
        }
    };
    if roles.iter().any(|r| r == name) {
        return Ok(changed);
    }
    match aws.iam.add_role_to_instance_profile().instance_profile_name(name).role_name(name).send().await {
        Ok(_) => Ok(true),
        // Already linked (by a concurrent run): an instance profile holds one role.
        Err(e) if code_of(&e) == Some("LimitExceeded") => Ok(changed),
        Err(e) => Err(AwsError::new(format!("adding role {name} to its instance profile"), e)),
    }
}

/// What a launch needs of the standing parts, read with a daily user's permissions: the
/// scheduler role's ARN, and for Session Manager boxes their instance profile (holding its
/// role). A missing part is named in `missing`; `launch` refuses then, naming `setup roles`.
#[derive(Debug, Clone, Default)]
pub struct Standing {
    pub scheduler_role_arn: Option<String>,
    pub ssm_profile: Option<InstanceProfile>,
    pub missing: Vec<String>,
}

pub async fn standing(aws: &Aws, base: &str, ssm: bool) -> Result<Standing, AwsError> {
    let scheduler = scheduler_role_name(base);
    let role = async {
        match aws.iam.get_role().role_name(&scheduler).send().await {
            Ok(out) => Ok(out.role().map(|r| r.arn().to_string())),
            Err(e) if code_of(&e) == Some("NoSuchEntity") => Ok(None),
            Err(e) => Err(AwsError::new(format!("looking up IAM role {scheduler}"), e)),
        }
    };
    let profile_name = ssm_role_name(base);
    let profile = async {
        if !ssm {
            return Ok(None);
        }
        let roles = profile_roles(aws, &profile_name).await?.unwrap_or_default();
        Ok(roles.contains(&profile_name).then(|| profile_name.clone()))
    };
    let (role, profile) = tokio::try_join!(role, profile)?;
    let mut missing = Vec::new();
    if role.is_none() {
        missing.push(format!("role {scheduler}"));
    }
    if ssm && profile.is_none() {
        missing.push(format!("instance profile {profile_name} (with its role)"));
    }
    Ok(Standing {
        scheduler_role_arn: role,
        ssm_profile: profile.map(|name| InstanceProfile { name, fresh: false }),
        missing,
    })
}

fn iam_tags() -> Vec<Tag> {
    tags::shared_resource_tags()
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build().expect("key and value are set"))
        .collect()
}

/// The role EventBridge Scheduler assumes to run the session schedules (`aws::schedule`).
pub fn scheduler_role_name(base: &str) -> String {
    format!("{base}-scheduler")
}

pub const SCHEDULER_POLICY_NAME: &str = "ephemeral-admin-scheduler";

/// Trusts EventBridge Scheduler, and only on behalf of schedules in this account (AWS's
/// confused-deputy guard).
pub fn scheduler_trust_policy(account: &str) -> String {
    json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": {"Service": super::schedule::SERVICE},
            "Action": "sts:AssumeRole",
            "Condition": {"StringEquals": {"aws:SourceAccount": account}}
        }]
    })
    .to_string()
}

/// What the schedules may do: end the tool's instances, delete its groups and alarms. Nothing
/// else, and nothing that is not tagged (or named) as the tool's.
pub fn scheduler_policy_document() -> serde_json::Value {
    let ours = json!({"StringEquals": {format!("ec2:ResourceTag/{}", tags::PROJECT): tags::PROJECT_VALUE}});
    json!({
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "EndOwnBoxesOnly",
                "Effect": "Allow",
                "Action": "ec2:TerminateInstances",
                "Resource": "arn:aws:ec2:*:*:instance/*",
                "Condition": ours
            },
            {
                "Sid": "SweepOwnGroupsOnly",
                "Effect": "Allow",
                "Action": "ec2:DeleteSecurityGroup",
                "Resource": "arn:aws:ec2:*:*:security-group/*",
                "Condition": ours
            },
            {
                "Sid": "SweepOwnAlarmsOnly",
                "Effect": "Allow",
                "Action": "cloudwatch:DeleteAlarms",
                "Resource": format!("arn:aws:cloudwatch:*:*:alarm:{}*", super::alarm::ALARM_PREFIX)
            }
        ]
    })
}

/// Removes the scheduler role (cleanup --purge). Answers whether there was one.
pub async fn delete_scheduler_role(aws: &Aws, base: &str) -> Result<bool, AwsError> {
    let name = &scheduler_role_name(base);
    match aws.iam.delete_role_policy().role_name(name).policy_name(SCHEDULER_POLICY_NAME).send().await {
        Ok(_) => {}
        Err(e) if code_of(&e) == Some("NoSuchEntity") => {}
        Err(e) => return Err(AwsError::new(format!("deleting the policy of role {name}"), e)),
    }
    match aws.iam.delete_role().role_name(name).send().await {
        Ok(_) => Ok(true),
        Err(e) if code_of(&e) == Some("NoSuchEntity") => Ok(false),
        Err(e) => Err(AwsError::new(format!("deleting role {name}"), e)),
    }
}

/// The roles in an existing instance profile (`instance_profile`), or None when there is no
/// such profile.
pub async fn profile_roles(aws: &Aws, name: &str) -> Result<Option<Vec<String>>, AwsError> {
    match aws.iam.get_instance_profile().instance_profile_name(name).send().await {
        Ok(out) => Ok(Some(
            out.instance_profile()
                .map(|p| p.roles().iter().map(|r| r.role_name().to_string()).collect())
                .unwrap_or_default(),
        )),
        Err(e) if code_of(&e) == Some("NoSuchEntity") => Ok(None),
        Err(e) => Err(AwsError::new(format!("looking up instance profile {name}"), e)),
    }
}

/// Removes the profile and role (cleanup --purge). Missing pieces are fine; answers whether
/// there was anything to remove.
pub async fn delete_instance_profile_and_role(aws: &Aws, name: &str) -> Result<bool, AwsError> {
    let mut found = false;
    let mut step = |r: Result<(), AwsError>| match r {
        Err(e) if e.code() == Some("NoSuchEntity") => Ok(()),
        other => {
            found |= other.is_ok();
            other
        }
    };
    step(
        aws.iam
            .remove_role_from_instance_profile()
            .instance_profile_name(name)
            .role_name(name)
            .send()
            .await
            .map(|_| ())
            .doing(format!("unlinking role {name}")),
    )?;
    step(
        aws.iam
            .delete_instance_profile()
            .instance_profile_name(name)
            .send()
            .await
            .map(|_| ())
            .doing(format!("deleting instance profile {name}")),
    )?;
    step(
        aws.iam
            .delete_role_policy()
            .role_name(name)
            .policy_name(INLINE_POLICY_NAME)
            .send()
            .await
            .map(|_| ())
            .doing(format!("deleting the policy of role {name}")),
    )?;
    step(
        aws.iam.delete_role().role_name(name).send().await.map(|_| ()).doing(format!("deleting role {name}")),
    )?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_box_role_holds_the_agent_only_and_the_boundary_covers_every_role() {
        let ssm = box_policy_document();
        let sids: Vec<&str> =
            ssm["Statement"].as_array().unwrap().iter().map(|s| s["Sid"].as_str().unwrap()).collect();
        assert_eq!(sids, ["SessionManagerAgent"]);
        assert!(!ssm.to_string().contains("logs:") && !ssm.to_string().contains("cloudwatch:"));
        assert_eq!(serde_json::from_str::<serde_json::Value>(&box_policy()).unwrap(), ssm);
        // The boundary is exactly the union of what the two roles hold: no role can do less
        // than its job under it, and none can ever do more than the union.
        let boundary = boundary_policy_document();
        let mut union: Vec<serde_json::Value> = ssm["Statement"].as_array().unwrap().clone();
        union.extend(scheduler_policy_document()["Statement"].as_array().unwrap().iter().cloned());
        assert_eq!(boundary["Statement"].as_array().unwrap(), &union);
        assert_eq!(
            boundary_arn("aws", "123456789012"),
            "arn:aws:iam::123456789012:policy/ephemeral-admin-boundary"
        );
    }
}

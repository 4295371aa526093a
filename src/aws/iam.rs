//! The box's IAM role and instance profile, created once and reused.
//!
//! The role trusts only EC2, and its one inline policy allows only what the box itself may do:
//! publish metrics in the tool's namespace and write to its own log groups. Nothing on the box
//! can touch other AWS resources (the watchdog ends the box by powering off, which needs no IAM).
//! Boxes reached through Session Manager (`connect = "ssm"`) get a second role and profile,
//! `{name}-ssm`, whose policy adds what the SSM agent needs, so other boxes stay minimal.

use aws_sdk_iam::types::Tag;
use serde_json::json;

use super::{Aws, AwsError, AwsResultExt, code_of};
use crate::session::tags;

pub const INLINE_POLICY_NAME: &str = "ephemeral-admin-box";
pub const METRIC_NAMESPACE: &str = "EphemeralAdmin";
pub const LOG_GROUP_PREFIX: &str = "/aws/ephemeral-container/";

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

/// The role (and profile) a session's box uses.
pub fn box_role_name(name: &str, ssm: bool) -> String {
    if ssm { ssm_role_name(name) } else { name.to_string() }
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

/// The box role's inline policy (`policy --box` prints this very document).
pub fn box_policy_document(ssm: bool) -> serde_json::Value {
    let mut doc = json!({
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "OwnMetricsOnly",
                "Effect": "Allow",
                "Action": "cloudwatch:PutMetricData",
                "Resource": "*",
                "Condition": {"StringEquals": {"cloudwatch:namespace": METRIC_NAMESPACE}}
            },
            {
                "Sid": "OwnLogsOnly",
                "Effect": "Allow",
                "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
                "Resource": format!("arn:aws:logs:*:*:log-group:{LOG_GROUP_PREFIX}*")
            }
        ]
    });
    if ssm {
        let statements = doc["Statement"].as_array_mut().expect("a list");
        statements.push(json!({
            "Sid": "SessionManagerAgent",
            "Effect": "Allow",
            "Action": SESSION_MANAGER_AGENT_ACTIONS,
            "Resource": "*"
        }));
    }
    doc
}

pub fn box_policy(ssm: bool) -> String {
    box_policy_document(ssm).to_string()
}

/// Finds the profile (one call when it exists and has its role), else creates what is missing.
/// Safe against a concurrent launch doing the same.
pub async fn ensure_instance_profile(aws: &Aws, base: &str, ssm: bool) -> Result<InstanceProfile, AwsError> {
    let name = &box_role_name(base, ssm);
    let found = aws.iam.get_instance_profile().instance_profile_name(name).send().await;
    let has_role = match found {
        Ok(out) => {
            let linked =
                out.instance_profile().is_some_and(|p| p.roles().iter().any(|r| r.role_name() == name));
            if linked {
                return Ok(InstanceProfile { name: name.into(), fresh: false });
            }
            true
        }
        Err(e) if code_of(&e) == Some("NoSuchEntity") => false,
        Err(e) => return Err(AwsError::new(format!("looking up instance profile {name}"), e)),
    };
    // Cold account: role and profile at once, then the role's policy and the link at once.
    let (role, profile) = tokio::join!(create_role(aws, name), async {
        if has_role { Ok(()) } else { create_profile(aws, name).await }
    });
    role?;
    profile?;
    let link = async {
        match aws.iam.add_role_to_instance_profile().instance_profile_name(name).role_name(name).send().await
        {
            Ok(_) => Ok(()),
            // Already linked (by a concurrent launch): an instance profile holds one role.
            Err(e) if code_of(&e) == Some("LimitExceeded") => Ok(()),
            Err(e) => Err(AwsError::new(format!("adding role {name} to its instance profile"), e)),
        }
    };
    let (policy, linked) = tokio::join!(put_role_policy(aws, name, ssm), link);
    policy?;
    linked?;
    Ok(InstanceProfile { name: name.into(), fresh: true })
}

async fn create_role(aws: &Aws, name: &str) -> Result<(), AwsError> {
    let created = aws
        .iam
        .create_role()
        .role_name(name)
        .description("ephemeral-admin boxes: own metrics and logs only")
        .assume_role_policy_document(trust_policy())
        .set_tags(Some(iam_tags()))
        .send()
        .await;
    match created {
        Ok(_) => {}
        Err(e) if code_of(&e) == Some("EntityAlreadyExists") => {}
        Err(e) => return Err(AwsError::new(format!("creating IAM role {name}"), e)),
    }
    Ok(())
}

/// Idempotent: also repairs a role whose policy someone edited.
async fn put_role_policy(aws: &Aws, name: &str, ssm: bool) -> Result<(), AwsError> {
    aws.iam
        .put_role_policy()
        .role_name(name)
        .policy_name(INLINE_POLICY_NAME)
        .policy_document(box_policy(ssm))
        .send()
        .await
        .doing(format!("setting the policy of IAM role {name}"))?;
    Ok(())
}

async fn create_profile(aws: &Aws, name: &str) -> Result<(), AwsError> {
    let created =
        aws.iam.create_instance_profile().instance_profile_name(name).set_tags(Some(iam_tags())).send().await;
    match created {
        Ok(_) => Ok(()),
        Err(e) if code_of(&e) == Some("EntityAlreadyExists") => Ok(()),
        Err(e) => Err(AwsError::new(format!("creating instance profile {name}"), e)),
    }
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

/// The scheduler role's ARN: one GetRole when it exists, else created with its policy. Safe
/// against a concurrent launch doing the same.
pub async fn ensure_scheduler_role(
    aws: &Aws,
    base: &str,
    caller: &super::identity::Caller,
) -> Result<String, AwsError> {
    let name = &scheduler_role_name(base);
    let account = &caller.account;
    match aws.iam.get_role().role_name(name).send().await {
        Ok(out) => {
            if let Some(arn) = out.role().map(|r| r.arn()) {
                return Ok(arn.to_string());
            }
            return Err(AwsError::missing(format!("looking up IAM role {name}"), "role"));
        }
        Err(e) if code_of(&e) == Some("NoSuchEntity") => {}
        Err(e) => return Err(AwsError::new(format!("looking up IAM role {name}"), e)),
    }
    let created = aws
        .iam
        .create_role()
        .role_name(name)
        .description("ephemeral-admin: EventBridge Scheduler ends the tool's boxes at their deadline")
        .assume_role_policy_document(scheduler_trust_policy(account))
        .set_tags(Some(iam_tags()))
        .send()
        .await;
    let arn = match created {
        Ok(out) => out.role().map(|r| r.arn().to_string()),
        Err(e) if code_of(&e) == Some("EntityAlreadyExists") => None,
        Err(e) => return Err(AwsError::new(format!("creating IAM role {name}"), e)),
    };
    aws.iam
        .put_role_policy()
        .role_name(name)
        .policy_name(SCHEDULER_POLICY_NAME)
        .policy_document(scheduler_policy_document().to_string())
        .send()
        .await
        .doing(format!("setting the policy of IAM role {name}"))?;
    match arn {
        Some(arn) => Ok(arn),
        // Made by a concurrent launch: its ARN follows from the name.
        None => Ok(format!("arn:{}:iam::{account}:role/{name}", caller.partition())),
    }
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
    fn only_ssm_boxes_get_session_manager_permissions_and_their_own_role() {
        let plain = box_policy_document(false);
        let ssm = box_policy_document(true);
        let sids = |doc: &serde_json::Value| -> Vec<String> {
            doc["Statement"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["Sid"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(sids(&plain), ["OwnMetricsOnly", "OwnLogsOnly"]);
        assert_eq!(sids(&ssm), ["OwnMetricsOnly", "OwnLogsOnly", "SessionManagerAgent"]);
        assert!(!plain.to_string().contains("ssm"));
        assert_eq!(box_role_name("R", false), "R");
        assert_eq!(box_role_name("R", true), "R-ssm");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&box_policy(true)).unwrap(), ssm);
    }
}

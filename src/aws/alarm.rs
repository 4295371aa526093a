//! The outside fail-safe: a CloudWatch alarm per box that terminates it when its network has
//! been quiet for a long time, in case the on-box watchdog itself is broken.
//!
//! Threshold: an attached session sends an SSH keepalive every 15 s, about 150 bytes in with
//! TCP/IP overhead, so at least ~3,000 bytes per 5 minutes reach the box even when the user types
//! nothing. The alarm fires below 1,500 bytes per 5 minutes (half that floor) for three periods
//! in a row, 15 minutes: an attached session never trips it; a box nobody talks to does.

use aws_sdk_cloudwatch::types::{ComparisonOperator, Dimension, Statistic, Tag};

use super::{Aws, AwsError, AwsResultExt, code_of};

pub const ALARM_PREFIX: &str = "ephemeral-admin-";
pub const THRESHOLD_BYTES: f64 = 1500.0;
pub const PERIOD_SECS: i32 = 300;
pub const EVALUATION_PERIODS: i32 = 3;

pub fn alarm_name(session_id: &str, instance_id: &str) -> String {
    format!("{ALARM_PREFIX}{session_id}-{instance_id}")
}

/// The action ARN that makes CloudWatch terminate the instance itself.
pub fn terminate_action(region: &str) -> String {
    format!("arn:aws:automate:{region}:ec2:terminate")
}

/// Creates (or overwrites) the session's alarm and returns its name.
pub async fn create_failsafe(
    aws: &Aws,
    session_id: &str,
    instance_id: &str,
    tags: &[(String, String)],
) -> Result<String, AwsError> {
    let name = alarm_name(session_id, instance_id);
    aws.cloudwatch
        .put_metric_alarm()
        .alarm_name(&name)
        .alarm_description(format!(
            "ephemeral-admin session {session_id}: terminates {instance_id} if its network stays quiet (the on-box watchdog should have ended it first)"
        ))
        .namespace("AWS/EC2")
        .metric_name("NetworkIn")
        .dimensions(Dimension::builder().name("InstanceId").value(instance_id).build())
        .statistic(Statistic::Sum)
        .period(PERIOD_SECS)
        .evaluation_periods(EVALUATION_PERIODS)
        .datapoints_to_alarm(EVALUATION_PERIODS)
        .threshold(THRESHOLD_BYTES)
        .comparison_operator(ComparisonOperator::LessThanThreshold)
        .treat_missing_data("missing")
        .alarm_actions(terminate_action(&aws.region))
        .set_tags(Some(tags.iter().map(|(k, v)| Tag::builder().key(k).value(v).build()).collect()))
        .send()
        .await
        .doing(format!("creating the fail-safe alarm for {instance_id}"))?;
    Ok(name)
}

/// Deletes alarms by name; names already gone are fine (DeleteAlarms ignores them).
pub async fn delete(aws: &Aws, names: &[String]) -> Result<(), AwsError> {
    if names.is_empty() {
        return Ok(());
    }
    match aws.cloudwatch.delete_alarms().set_alarm_names(Some(names.to_vec())).send().await {
        Ok(_) => Ok(()),
        Err(e) if code_of(&e) == Some("ResourceNotFound") => Ok(()),
        Err(e) => Err(AwsError::new("deleting the fail-safe alarm", e)),
    }
}

/// One of the tool's alarms.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Alarm {
    pub name: String,
    pub session_id: Option<String>,
    pub instance_id: Option<String>,
}

/// Every alarm the tool made in the region.
pub async fn list_ours(aws: &Aws) -> Result<Vec<Alarm>, AwsError> {
    let mut alarms = Vec::new();
    let mut pages = aws.cloudwatch.describe_alarms().alarm_name_prefix(ALARM_PREFIX).into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.doing("listing fail-safe alarms")?;
        for alarm in page.metric_alarms() {
            let Some(name) = alarm.alarm_name() else { continue };
            let rest = name.trim_start_matches(ALARM_PREFIX);
            let (session_id, instance_id) = match rest.split_once('-') {
                Some((session, instance)) => (Some(session.to_string()), Some(instance.to_string())),
                None => (None, None),
            };
            alarms.push(Alarm { name: name.to_string(), session_id, instance_id });
        }
    }
    Ok(alarms)
}

//! The session's event log in CloudWatch Logs: `/aws/ephemeral-container/{instance-id}`, one
//! `cli` stream with start, connect, extend and end events, kept for a week.

use aws_sdk_cloudwatchlogs::types::InputLogEvent;

use super::{Aws, AwsError, AwsResultExt, code_of};
use crate::aws::iam::LOG_GROUP_PREFIX;
use crate::session::tags;

pub const RETENTION_DAYS: i32 = 7;
pub const STREAM: &str = "cli";

pub fn group_name(instance_id: &str) -> String {
    format!("{LOG_GROUP_PREFIX}{instance_id}")
}

/// Appends one event, creating the group (with its retention) and the stream the first time.
pub async fn event(aws: &Aws, instance_id: &str, message: &str) -> Result<(), AwsError> {
    let group = group_name(instance_id);
    let put = || {
        aws.logs
            .put_log_events()
            .log_group_name(&group)
            .log_stream_name(STREAM)
            .log_events(
                InputLogEvent::builder()
                    .timestamp(now_millis())
                    .message(message)
                    .build()
                    .expect("timestamp and message are set"),
            )
            .send()
    };
    match put().await {
        Ok(_) => return Ok(()),
        Err(e) if code_of(&e) == Some("ResourceNotFoundException") => {}
        Err(e) => return Err(AwsError::new("writing the session log", e)),
    }
    // Tagged like every resource of the tool (which needs logs:TagResource too).
    let create = tags::shared_resource_tags()
        .into_iter()
        .fold(aws.logs.create_log_group().log_group_name(&group), |c, (k, v)| c.tags(k, v));
    match create.send().await {
        Ok(_) => {
            aws.logs
                .put_retention_policy()
                .log_group_name(&group)
                .retention_in_days(RETENTION_DAYS)
                .send()
                .await
                .doing("setting the session log's retention")?;
        }
        Err(e) if code_of(&e) == Some("ResourceAlreadyExistsException") => {}
        Err(e) => return Err(AwsError::new("creating the session log group", e)),
    }
    match aws.logs.create_log_stream().log_group_name(&group).log_stream_name(STREAM).send().await {
        Ok(_) => {}
        Err(e) if code_of(&e) == Some("ResourceAlreadyExistsException") => {}
        Err(e) => return Err(AwsError::new("creating the session log stream", e)),
    }
    put().await.doing("writing the session log")?;
    Ok(())
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A session log group and when it was created (Unix milliseconds).
#[derive(Debug, Clone)]
pub struct LogGroup {
    pub name: String,
    pub instance_id: String,
    pub created_ms: i64,
}

/// Every session log group in the region.
pub async fn list(aws: &Aws) -> Result<Vec<LogGroup>, AwsError> {
    let mut groups = Vec::new();
    let mut pages =
        aws.logs.describe_log_groups().log_group_name_prefix(LOG_GROUP_PREFIX).into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.doing("listing session logs")?;
        for g in page.log_groups() {
            let Some(name) = g.log_group_name() else { continue };
            groups.push(LogGroup {
                name: name.to_string(),
                instance_id: name.trim_start_matches(LOG_GROUP_PREFIX).to_string(),
                created_ms: g.creation_time().unwrap_or(0),
            });
        }
    }
    Ok(groups)
}

pub async fn delete(aws: &Aws, name: &str) -> Result<(), AwsError> {
    match aws.logs.delete_log_group().log_group_name(name).send().await {
        Ok(_) => Ok(()),
        Err(e) if code_of(&e) == Some("ResourceNotFoundException") => Ok(()),
        Err(e) => Err(AwsError::new(format!("deleting log group {name}"), e)),
    }
}

/// Writes a session's events in order, in the background, off the critical path.
pub struct Writer {
    tx: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Writer {
    pub fn spawn(aws: &Aws, instance_id: &str) -> Writer {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let aws = aws.clone();
        let instance_id = instance_id.to_string();
        let task = tokio::spawn(async move {
            let mut failures = Vec::new();
            while let Some(message) = rx.recv().await {
                if let Err(e) = event(&aws, &instance_id, &message).await {
                    failures.push(e.to_string());
                }
            }
            failures
        });
        Writer { tx: Some(tx), task }
    }

    pub fn send(&self, message: impl Into<String>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(message.into());
        }
    }

    /// Waits until every event is written; returns the failures.
    pub async fn finish(mut self) -> Vec<String> {
        self.tx = None;
        (&mut self.task).await.unwrap_or_default()
    }
}

//! The fourth layer that ends a box: EventBridge Scheduler one-time schedules, outside the box
//! and outside the laptop, that call AWS at fixed times whatever else has failed.
//!
//! At launch three schedules are armed (concurrently with the instance starting, so the launch's
//! critical path does not grow): `…-end` terminates the instance at the hard deadline (plus
//! [`END_AFTER`], so the watchdog's own orderly power-off comes first) through the universal
//! target `aws-sdk:ec2:terminateInstances`; `…-sweep-group` and `…-sweep-alarm`,
//! [`SWEEP_AFTER`] later, delete what a crash would leave (the session's security group and its
//! alarm). Each runs as the tool's scheduler role ([`super::iam::bootstrap`], made once by `setup roles`), which
//! may only do exactly that to resources tagged as the tool's, and deletes itself once it has run
//! (`ActionAfterCompletion = DELETE`). `extend` moves them, teardown and `cleanup` delete them.
//! Schedules carry no tags (AWS supports tags on schedule groups only): they are ours by name.

use std::time::Duration;

use aws_sdk_scheduler::types::{
    ActionAfterCompletion, FlexibleTimeWindow, FlexibleTimeWindowMode, RetryPolicy, ScheduleState, Target,
};
use futures::future::join_all;
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::FormatItem;
use time::macros::format_description;

use super::{Aws, AwsError, AwsResultExt, code_of};

/// Every schedule the tool makes is named `ephemeral-admin-<session>-<job>`.
pub const PREFIX: &str = "ephemeral-admin-";
/// The schedule group: the account's default one (no extra resource to create or leak).
pub const GROUP: &str = "default";
/// How long after the deadline the terminate runs: the watchdog powers the box off at the
/// deadline itself (after warning whoever is logged in), so the schedule is the backstop and
/// the session ends, and is recorded, as ended by its deadline.
pub const END_AFTER: Duration = Duration::from_secs(60);
/// How long after the deadline the sweeps run: the instance has had time to terminate and let
/// go of its group. A sweep that still meets `DependencyViolation` is retried by the scheduler.
pub const SWEEP_AFTER: Duration = Duration::from_secs(15 * 60);
/// The principal the scheduler role trusts.
pub const SERVICE: &str = "scheduler.amazonaws.com";

const AT: &[FormatItem<'static>] = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");

/// What one schedule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Job {
    /// Terminates the instance at the deadline.
    End,
    /// Deletes the session's security group after the deadline.
    SweepGroup,
    /// Deletes the session's fail-safe alarm after the deadline.
    SweepAlarm,
}

impl Job {
    pub const ALL: [Job; 3] = [Job::End, Job::SweepGroup, Job::SweepAlarm];

    fn suffix(self) -> &'static str {
        match self {
            Job::End => "end",
            Job::SweepGroup => "sweep-group",
            Job::SweepAlarm => "sweep-alarm",
        }
    }

    /// The universal target (`arn:aws:scheduler:::aws-sdk:SERVICE:ACTION`) the job calls.
    pub fn target_arn(self) -> &'static str {
        match self {
            Job::End => "arn:aws:scheduler:::aws-sdk:ec2:terminateInstances",
            Job::SweepGroup => "arn:aws:scheduler:::aws-sdk:ec2:deleteSecurityGroup",
            Job::SweepAlarm => "arn:aws:scheduler:::aws-sdk:cloudwatch:deleteAlarms",
        }
    }

    fn delay(self) -> Duration {
        if self == Job::End { END_AFTER } else { SWEEP_AFTER }
    }
}

pub fn schedule_name(session_id: &str, job: Job) -> String {
    format!("{PREFIX}{session_id}-{}", job.suffix())
}

/// The session and job a schedule name stands for, if it is one of ours.
pub fn parse_name(name: &str) -> Option<(String, Job)> {
    let rest = name.strip_prefix(PREFIX)?;
    Job::ALL.into_iter().find_map(|job| {
        let session = rest.strip_suffix(job.suffix())?.strip_suffix('-')?;
        (!session.is_empty()).then(|| (session.to_string(), job))
    })
}

/// `at(2026-11-30T14:00:00)`, in UTC (the schedules say `ScheduleExpressionTimezone = UTC`).
pub fn at_expression(when: OffsetDateTime) -> String {
    let utc = when.to_offset(time::UtcOffset::UTC);
    format!("at({})", utc.format(AT).expect("a valid date"))
}

/// The time of an `at(…)` expression in UTC.
pub fn parse_at(expression: &str) -> Option<OffsetDateTime> {
    let inner = expression.strip_prefix("at(")?.strip_suffix(')')?;
    time::PrimitiveDateTime::parse(inner, AT).ok().map(|t| t.assume_utc())
}

/// What a session's schedules act on.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    pub session_id: &'a str,
    pub instance_id: &'a str,
    pub group_id: Option<&'a str>,
    pub alarm_name: &'a str,
    pub role_arn: &'a str,
    pub deadline: OffsetDateTime,
}

impl Plan<'_> {
    /// The names [`arm`] creates.
    pub fn names(&self) -> Vec<String> {
        self.jobs().into_iter().map(|(job, _)| schedule_name(self.session_id, job)).collect()
    }

    /// (job, the API call's input as JSON) for every job that has something to act on.
    fn jobs(&self) -> Vec<(Job, String)> {
        let mut jobs = vec![(Job::End, serde_json::json!({"InstanceIds": [self.instance_id]}).to_string())];
        if let Some(group) = self.group_id {
            jobs.push((Job::SweepGroup, serde_json::json!({"GroupId": group}).to_string()));
        }
        jobs.push((Job::SweepAlarm, serde_json::json!({"AlarmNames": [self.alarm_name]}).to_string()));
        jobs
    }
}

fn target(job: Job, role_arn: &str, input: &str) -> Target {
    Target::builder()
        .arn(job.target_arn())
        .role_arn(role_arn)
        .input(input)
        // A day of retries (AWS's maximum): a sweep waits out a slowly terminating instance.
        .retry_policy(
            RetryPolicy::builder().maximum_event_age_in_seconds(86_400).maximum_retry_attempts(185).build(),
        )
        .build()
        .expect("arn and role are set")
}

fn window() -> FlexibleTimeWindow {
    FlexibleTimeWindow::builder().mode(FlexibleTimeWindowMode::Off).build().expect("mode is set")
}

/// Arms every job of the plan at once; answers the names created. A retried call reuses its
/// client token, and a schedule that already exists (an earlier attempt whose answer was lost)
/// counts as created.
pub async fn arm(aws: &Aws, plan: &Plan<'_>) -> Result<Vec<String>, AwsError> {
    let calls = plan.jobs().into_iter().map(|(job, input)| {
        let token = format!("{}-{}", plan.session_id, job.suffix());
        create(aws, plan.session_id, job, plan.role_arn, input, plan.deadline + job.delay(), token)
    });
    join_all(calls).await.into_iter().collect()
}

/// A group sweep a few minutes from `now`, for a group that teardown found still in use (its
/// instance shutting down): the group goes then, with no `cleanup`.
pub async fn sweep_group_at(
    aws: &Aws,
    session_id: &str,
    group_id: &str,
    role_arn: &str,
    at: OffsetDateTime,
) -> Result<String, AwsError> {
    let input = serde_json::json!({"GroupId": group_id}).to_string();
    let token = format!("{session_id}-sweep-group-{}", at.unix_timestamp());
    create(aws, session_id, Job::SweepGroup, role_arn, input, at, token).await
}

async fn create(
    aws: &Aws,
    session_id: &str,
    job: Job,
    role_arn: &str,
    input: String,
    at: OffsetDateTime,
    token: String,
) -> Result<String, AwsError> {
    let name = schedule_name(session_id, job);
    let created = aws
        .scheduler
        .create_schedule()
        .name(&name)
        .group_name(GROUP)
        .description(format!("ephemeral-admin session {session_id}: {}", describe(job)))
        .schedule_expression(at_expression(at))
        .schedule_expression_timezone("UTC")
        .flexible_time_window(window())
        .target(target(job, role_arn, &input))
        .action_after_completion(ActionAfterCompletion::Delete)
        .state(ScheduleState::Enabled)
        .client_token(token)
        .send()
        .await;
    match created {
        Ok(_) => Ok(name),
        Err(e) if code_of(&e) == Some("ConflictException") => Ok(name),
        Err(e) => Err(AwsError::new(format!("arming the scheduled deadline ({name})"), e)),
    }
}

fn describe(job: Job) -> &'static str {
    match job {
        Job::End => "terminates the instance at the session's deadline",
        Job::SweepGroup => "deletes the session's security group after the deadline",
        Job::SweepAlarm => "deletes the session's fail-safe alarm after the deadline",
    }
}

/// Moves a session's schedules to a new deadline (each keeps its delay after it). Answers how
/// many were moved (0 when the session has none, e.g. launched before this layer existed).
pub async fn move_to(aws: &Aws, session_id: &str, deadline: OffsetDateTime) -> Result<usize, AwsError> {
    let moves = Job::ALL
        .into_iter()
        .map(|job| reschedule(aws, schedule_name(session_id, job), deadline + job.delay()));
    let moved: Vec<bool> = join_all(moves).await.into_iter().collect::<Result<_, _>>()?;
    Ok(moved.into_iter().filter(|m| *m).count())
}

/// Points one schedule at a new time, keeping its target. False when it does not exist.
pub async fn reschedule(aws: &Aws, name: String, at: OffsetDateTime) -> Result<bool, AwsError> {
    let current = match aws.scheduler.get_schedule().name(&name).group_name(GROUP).send().await {
        Ok(out) => out,
        Err(e) if code_of(&e) == Some("ResourceNotFoundException") => return Ok(false),
        Err(e) => return Err(AwsError::new(format!("reading schedule {name}"), e)),
    };
    let Some(target) = current.target().cloned() else {
        return Err(AwsError::missing(format!("reading schedule {name}"), "target"));
    };
    // UpdateSchedule replaces the whole definition: everything but the time is kept as it was.
    aws.scheduler
        .update_schedule()
        .name(&name)
        .group_name(GROUP)
        .set_description(current.description().map(str::to_string))
        .schedule_expression(at_expression(at))
        .schedule_expression_timezone("UTC")
        .flexible_time_window(window())
        .target(target)
        .action_after_completion(ActionAfterCompletion::Delete)
        .state(ScheduleState::Enabled)
        .send()
        .await
        .doing(format!("moving schedule {name}"))?;
    Ok(true)
}

/// Deletes schedules by name; ones already gone (run, or deleted) are fine.
pub async fn delete(aws: &Aws, names: &[String]) -> Result<(), AwsError> {
    let calls = names.iter().map(|name| async move {
        match aws.scheduler.delete_schedule().name(name).group_name(GROUP).send().await {
            Ok(_) => Ok(()),
            Err(e) if code_of(&e) == Some("ResourceNotFoundException") => Ok(()),
            Err(e) => Err(AwsError::new(format!("deleting schedule {name}"), e)),
        }
    });
    join_all(calls).await.into_iter().collect()
}

/// One of the tool's schedules.
#[derive(Debug, Clone, Serialize)]
pub struct Armed {
    pub name: String,
    pub session_id: String,
    pub job: Job,
    /// When it was created (to leave alone one that a launch is arming right now).
    #[serde(skip)]
    pub created: Option<OffsetDateTime>,
}

/// Every schedule of the tool's in the region.
pub async fn list_ours(aws: &Aws) -> Result<Vec<Armed>, AwsError> {
    let mut out = Vec::new();
    let mut pages =
        aws.scheduler.list_schedules().group_name(GROUP).name_prefix(PREFIX).into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.doing("listing the scheduled deadlines")?;
        for summary in page.schedules() {
            let Some(name) = summary.name() else { continue };
            let Some((session_id, job)) = parse_name(name) else { continue };
            let created =
                summary.creation_date().and_then(|d| OffsetDateTime::from_unix_timestamp(d.secs()).ok());
            out.push(Armed { name: name.to_string(), session_id, job, created });
        }
    }
    Ok(out)
}

/// When a session's `…-end` schedule fires, or None when it has none.
pub async fn deadline_of(aws: &Aws, session_id: &str) -> Result<Option<OffsetDateTime>, AwsError> {
    let name = schedule_name(session_id, Job::End);
    match aws.scheduler.get_schedule().name(&name).group_name(GROUP).send().await {
        Ok(out) => Ok(out.schedule_expression().and_then(parse_at)),
        Err(e) if code_of(&e) == Some("ResourceNotFoundException") => Ok(None),
        Err(e) => Err(AwsError::new(format!("reading schedule {name}"), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_foreign_names_are_not_ours() {
        for job in Job::ALL {
            assert_eq!(parse_name(&schedule_name("k3x9q2ab", job)), Some(("k3x9q2ab".to_string(), job)));
        }
        assert_eq!(parse_name("ephemeral-admin--end"), None);
        assert_eq!(parse_name("someone-else-k3x9q2ab-end"), None);
        assert_eq!(parse_name("ephemeral-admin-k3x9q2ab-backup"), None);
        assert!(schedule_name("k3x9q2ab", Job::SweepAlarm).len() <= 64, "AWS's limit on schedule names");
    }

    #[test]
    fn at_expressions_are_utc_to_the_second() {
        let t = crate::session::parse_rfc3339("2026-11-30T15:04:05+01:00").unwrap();
        assert_eq!(at_expression(t), "at(2026-11-30T14:04:05)");
        assert_eq!(parse_at("at(2026-11-30T14:04:05)"), Some(t));
        assert_eq!(parse_at("rate(5 minutes)"), None);
    }

    #[test]
    fn a_plan_without_a_group_sweeps_only_the_alarm() {
        let deadline = OffsetDateTime::UNIX_EPOCH;
        let plan = Plan {
            session_id: "s",
            instance_id: "i-1",
            group_id: None,
            alarm_name: "ephemeral-admin-s-i-1",
            role_arn: "arn:aws:iam::1:role/r",
            deadline,
        };
        let jobs: Vec<Job> = plan.jobs().into_iter().map(|(j, _)| j).collect();
        assert_eq!(jobs, vec![Job::End, Job::SweepAlarm]);
        assert_eq!(plan.jobs()[0].1, r#"{"InstanceIds":["i-1"]}"#);
    }
}

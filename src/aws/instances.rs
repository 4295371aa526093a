//! Session instances: find them by tag, wait for them to run, move their deadline, end them.
//!
//! Listing is one paginated DescribeInstances filtered by tags, so it costs the same number of
//! calls whatever the number of sessions.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_ec2::types::{Filter, Instance, InstanceLifecycleType, Tag};

use super::{Aws, AwsError, AwsResultExt, code_of};
use crate::session::tags;

/// What AWS knows about one session's instance.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstanceInfo {
    pub instance_id: String,
    pub session_id: Option<String>,
    /// The session's name (`launch --name`).
    pub name: Option<String>,
    pub owner: Option<String>,
    /// The creator's aws:userid (`tags::OWNER_ID`); None on boxes of older versions.
    pub owner_id: Option<String>,
    pub state: String,
    pub instance_type: String,
    pub availability_zone: Option<String>,
    pub market: &'static str,
    pub spot_request_id: Option<String>,
    pub public_ip: Option<String>,
    pub private_ip: Option<String>,
    pub launch_time: Option<String>,
    pub expires_at: Option<String>,
    pub kept: bool,
    pub state_reason: Option<String>,
    /// e.g. `Client.InstanceInitiatedShutdown`, `Server.SpotInstanceTermination`.
    pub state_reason_code: Option<String>,
    /// e.g. "User initiated (2026-11-22 10:00:00 GMT)".
    pub state_transition_reason: Option<String>,
    pub tags: BTreeMap<String, String>,
}

impl InstanceInfo {
    /// `None` for an instance without an id (never sent by EC2; never defaulted to "").
    pub fn from_sdk(i: &Instance) -> Option<InstanceInfo> {
        let instance_id = i.instance_id()?.to_string();
        let tags: BTreeMap<String, String> = i
            .tags()
            .iter()
            .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or_default().to_string())))
            .collect();
        Some(InstanceInfo {
            instance_id,
            session_id: tags.get(tags::SESSION).cloned(),
            name: tags.get(tags::SESSION_NAME).cloned(),
            owner: tags.get(tags::OWNER).cloned(),
            owner_id: tags.get(tags::OWNER_ID).cloned(),
            state: i.state().and_then(|s| s.name()).map(|n| n.as_str().to_string()).unwrap_or_default(),
            instance_type: i.instance_type().map(|t| t.as_str().to_string()).unwrap_or_default(),
            availability_zone: i.placement().and_then(|p| p.availability_zone()).map(str::to_string),
            market: match i.instance_lifecycle() {
                Some(InstanceLifecycleType::Spot) => "spot",
                _ if i.spot_instance_request_id().is_some() => "spot",
                _ => "on-demand",
            },
            spot_request_id: i.spot_instance_request_id().map(str::to_string),
            public_ip: i.public_ip_address().map(str::to_string),
            private_ip: i.private_ip_address().map(str::to_string),
            launch_time: i
                .launch_time()
                .and_then(|t| t.fmt(aws_smithy_types::date_time::Format::DateTime).ok()),
            expires_at: tags.get(tags::EXPIRES_AT).cloned(),
            kept: tags.get(tags::MODE).is_some_and(|m| m == "kept"),
            state_reason: i.state_reason().and_then(|r| r.message()).map(str::to_string),
            state_reason_code: i.state_reason().and_then(|r| r.code()).map(str::to_string),
            state_transition_reason: i
                .state_transition_reason()
                .filter(|r| !r.is_empty())
                .map(str::to_string),
            tags,
        })
    }

    pub fn is_live(&self) -> bool {
        matches!(self.state.as_str(), "pending" | "running")
    }
}

/// Every state an instance can be in before it is gone.
fn not_terminated() -> Filter {
    let states = ["pending", "running", "shutting-down", "stopping", "stopped"];
    Filter::builder().name("instance-state-name").set_values(Some(states.map(String::from).to_vec())).build()
}

/// Which session instances to find.
#[derive(Debug, Clone, Default)]
pub struct Query<'a> {
    /// Only this owner's (the caller's ARN), or anyone's.
    pub owner: Option<&'a str>,
    pub session_id: Option<&'a str>,
    /// Only the session with this name (`launch --name`).
    pub name: Option<&'a str>,
    /// Include terminated instances (AWS keeps them visible for about an hour).
    pub include_terminated: bool,
}

/// Session instances matching the query, newest first.
pub async fn find(aws: &Aws, query: Query<'_>) -> Result<Vec<InstanceInfo>, AwsError> {
    let mut request = aws
        .ec2
        .describe_instances()
        .filters(Filter::builder().name(format!("tag:{}", tags::PROJECT)).values(tags::PROJECT_VALUE).build())
        .filters(Filter::builder().name("tag-key").values(tags::SESSION).build());
    if let Some(owner) = query.owner {
        request =
            request.filters(Filter::builder().name(format!("tag:{}", tags::OWNER)).values(owner).build());
    }
    if let Some(session) = query.session_id {
        request =
            request.filters(Filter::builder().name(format!("tag:{}", tags::SESSION)).values(session).build());
    }
    if let Some(name) = query.name {
        request = request
            .filters(Filter::builder().name(format!("tag:{}", tags::SESSION_NAME)).values(name).build());
    }
    if !query.include_terminated {
        request = request.filters(not_terminated());
    }
    let mut found = Vec::new();
    let mut pages = request.into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.doing("listing session instances")?;
        for reservation in page.reservations() {
            found.extend(reservation.instances().iter().filter_map(InstanceInfo::from_sdk));
        }
    }
    found.sort_by(|a, b| b.launch_time.cmp(&a.launch_time));
    Ok(found)
}

/// One instance by id, or None if AWS does not know it (yet, or any more).
pub async fn describe(aws: &Aws, instance_id: &str) -> Result<Option<InstanceInfo>, AwsError> {
    match aws.ec2.describe_instances().instance_ids(instance_id).send().await {
        Ok(out) => Ok(out.reservations().iter().flat_map(|r| r.instances()).find_map(InstanceInfo::from_sdk)),
        // Just launched and not yet visible (EC2 is eventually consistent), or long gone.
        Err(e) if code_of(&e) == Some("InvalidInstanceID.NotFound") => Ok(None),
        Err(e) => Err(AwsError::new(format!("checking instance {instance_id}"), e)),
    }
}

/// ": REASON" when EC2 gave one.
fn because(reason: Option<&str>) -> String {
    match reason {
        Some(r) => format!(": {r}"),
        None => String::new(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// Not transparent: the AWS error stays a node of the chain, where `exit_codes::report` finds it.
    #[error("{0}")]
    Aws(#[from] AwsError),
    #[error("instance {instance_id} ended while starting ({state}{}); run `ephemeral-admin launch` again", because(reason.as_deref()))]
    Ended { instance_id: String, state: String, reason: Option<String> },
    #[error("instance {instance_id} did not start within {}; it will be terminated", humantime::format_duration(*.waited))]
    TimedOut { instance_id: String, waited: Duration },
}

/// How often to ask whether the instance runs yet.
pub const POLL_INTERVAL: Duration = Duration::from_millis(300);

/// Polls until the instance runs and has the address we will connect to.
pub async fn wait_running(
    aws: &Aws,
    instance_id: &str,
    need_public_ip: bool,
    timeout: Duration,
    on_state: &(dyn Fn(&str) + Sync),
) -> Result<InstanceInfo, WaitError> {
    let started = tokio::time::Instant::now();
    let mut last_state = String::new();
    loop {
        if let Some(info) = describe(aws, instance_id).await? {
            if info.state != last_state {
                on_state(&info.state);
                last_state = info.state.clone();
            }
            match info.state.as_str() {
                "running" if !need_public_ip || info.public_ip.is_some() => return Ok(info),
                "pending" | "running" => {}
                _ => {
                    return Err(WaitError::Ended {
                        instance_id: instance_id.into(),
                        state: info.state,
                        reason: info.state_reason,
                    });
                }
            }
        }
        if started.elapsed() >= timeout {
            return Err(WaitError::TimedOut { instance_id: instance_id.into(), waited: timeout });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// EC2 keeps a terminated instance visible for about an hour, then forgets it. An instance that
/// was launched (or seen) less than this long ago and that EC2 does not know is not visible *yet*
/// (EC2 is eventually consistent), never gone.
pub const FORGOTTEN_AFTER: time::Duration = time::Duration::hours(1);

/// True when EC2 must know an instance launched at `launched_at` (RFC 3339): "not found" then
/// means "not visible yet". False when it may have been forgotten, or the time is unknown.
pub fn must_be_known(launched_at: Option<&str>, now: time::OffsetDateTime) -> bool {
    launched_at.and_then(crate::session::parse_rfc3339).is_some_and(|t| now - t < FORGOTTEN_AFTER)
}

/// How long TerminateInstances keeps retrying ids EC2 does not know yet.
pub const VISIBILITY_WAIT: Duration = Duration::from_secs(30);

/// Terminates instances. `known`: EC2 must know these ids (just launched, or just described), so
/// `InvalidInstanceID.NotFound` means "not visible yet": retried with backoff (TerminateInstances
/// is idempotent) until EC2 sees them or [`VISIBILITY_WAIT`] passes, then reported as a failure,
/// never as terminated. Otherwise (an old record's id) NotFound means EC2 forgot it: done.
pub async fn terminate(aws: &Aws, instance_ids: &[String], known: bool) -> Result<(), AwsError> {
    if instance_ids.is_empty() {
        return Ok(());
    }
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(500);
    loop {
        let error =
            match aws.ec2.terminate_instances().set_instance_ids(Some(instance_ids.to_vec())).send().await {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
        let not_found = code_of(&error) == Some("InvalidInstanceID.NotFound");
        if not_found && !known {
            return Ok(());
        }
        let ids = instance_ids.join(", ");
        if !not_found {
            return Err(AwsError::new(format!("terminating {ids}"), error));
        }
        if started.elapsed() + pause > VISIBILITY_WAIT {
            return Err(AwsError::new(
                format!(
                    "terminating {ids}: EC2 still does not see it after {}s (eventual consistency); \
                     its watchdog and alarm end it at its deadline, and `cleanup` retries",
                    VISIBILITY_WAIT.as_secs()
                ),
                error,
            ));
        }
        tracing::info!("EC2 does not see {ids} yet; retrying the termination in {pause:?}");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// Cancels spot requests so a one-time request cannot start another instance.
pub async fn cancel_spot_requests(aws: &Aws, request_ids: &[String]) -> Result<(), AwsError> {
    if request_ids.is_empty() {
        return Ok(());
    }
    match aws
        .ec2
        .cancel_spot_instance_requests()
        .set_spot_instance_request_ids(Some(request_ids.to_vec()))
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if code_of(&e) == Some("InvalidSpotInstanceRequestID.NotFound") => Ok(()),
        Err(e) => Err(AwsError::new("cancelling the spot request", e)),
    }
}

/// Rewrites the deadline tag the watchdog reads (extend).
pub async fn set_expiry(aws: &Aws, instance_id: &str, expires_at: &str) -> Result<(), AwsError> {
    aws.ec2
        .create_tags()
        .resources(instance_id)
        .tags(Tag::builder().key(tags::EXPIRES_AT).value(expires_at).build())
        .send()
        .await
        .doing(format!("moving the deadline of {instance_id}"))?;
    Ok(())
}

/// A spot request of the tool's, from its tags.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SpotRequestInfo {
    pub id: String,
    pub session_id: Option<String>,
    pub owner: Option<String>,
    pub owner_id: Option<String>,
    pub instance_id: Option<String>,
    pub state: String,
}

/// The tool's spot requests that are still open or active (a one-time request that is open can
/// still start an instance).
pub async fn open_spot_requests(aws: &Aws) -> Result<Vec<SpotRequestInfo>, AwsError> {
    let out = aws
        .ec2
        .describe_spot_instance_requests()
        .filters(Filter::builder().name(format!("tag:{}", tags::PROJECT)).values(tags::PROJECT_VALUE).build())
        .filters(Filter::builder().name("state").values("open").values("active").build())
        .send()
        .await
        .doing("listing spot requests")?;
    Ok(out
        .spot_instance_requests()
        .iter()
        .filter_map(|r| {
            let tag = |key: &str| {
                r.tags().iter().find(|t| t.key() == Some(key)).and_then(|t| t.value()).map(str::to_string)
            };
            Some(SpotRequestInfo {
                id: r.spot_instance_request_id()?.to_string(),
                session_id: tag(tags::SESSION),
                owner: tag(tags::OWNER),
                owner_id: tag(tags::OWNER_ID),
                instance_id: r.instance_id().map(str::to_string),
                state: r.state().map(|s| s.as_str().to_string()).unwrap_or_default(),
            })
        })
        .collect())
}

/// Instances (of anyone, in any state but terminated) that match one filter, e.g. everything in
/// a security group (`instance.group-id`) or with an instance profile (`iam-instance-profile.arn`).
pub async fn users_of(aws: &Aws, filter_name: &str, value: &str) -> Result<Vec<InstanceInfo>, AwsError> {
    let out = aws
        .ec2
        .describe_instances()
        .filters(Filter::builder().name(filter_name).values(value).build())
        .filters(not_terminated())
        .send()
        .await
        .doing("checking what still uses the shared resources")?;
    Ok(out.reservations().iter().flat_map(|r| r.instances()).filter_map(InstanceInfo::from_sdk).collect())
}

//! The single way a session ends: terminate the instance (and its spot request), revoke the
//! session's SSH rules, delete the alarm, delete the private key, mark the local record ended,
//! take its host block out of the user's OpenSSH config (`ssh-config --install`), then delete the
//! session's own security group (or leave the empty group to its scheduled sweep, brought
//! forward to a few minutes from now, while AWS still sees the instance shutting down in it),
//! and disarm the session's scheduled deadline once the instance is sure to end.
//!
//! Every step runs even when another fails; independent steps run concurrently. Nothing waits
//! for the instance to reach `terminated`: the user gets the prompt back at once.

use serde::Serialize;

use crate::aws::network::{GroupDeletion, Release};
use crate::aws::schedule::{self, Job};
use crate::aws::{Aws, alarm, instances, logs, metrics, network};
use crate::ledger;
use crate::session::Clock;
use crate::session::store::{SessionRecord, Store};

/// What a session owns in AWS, from its local record, its tags, or both.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SessionResources {
    pub session_id: String,
    pub instance_ids: Vec<String>,
    pub spot_request_ids: Vec<String>,
    pub security_group_id: Option<String>,
    pub rule_ids: Vec<String>,
    pub alarm_names: Vec<String>,
    /// The scheduled deadline and sweeps (`aws::schedule`), and the role they run as.
    pub schedule_names: Vec<String>,
    pub schedule_role_arn: Option<String>,
    /// The OpenSSH config file holding the session's host block, if one was installed.
    pub ssh_config_file: Option<std::path::PathBuf>,
    /// When the instance was launched (RFC 3339): EC2 must know an instance younger than an hour,
    /// so its "not found" means "not visible yet" (see [`instances::terminate`]).
    pub launched_at: Option<String>,
}

impl SessionResources {
    pub fn from_record(record: &SessionRecord) -> SessionResources {
        SessionResources {
            session_id: record.id.clone(),
            instance_ids: record.instance_id.iter().cloned().collect(),
            spot_request_ids: record.spot_request_id.iter().cloned().collect(),
            security_group_id: record.security_group_id.clone(),
            rule_ids: record.ingress_rule_ids.clone(),
            alarm_names: record.alarm_name.iter().cloned().collect(),
            schedule_names: record.schedule_names.clone(),
            schedule_role_arn: record.schedule_role_arn.clone(),
            ssh_config_file: record.ssh_config_file.clone(),
            launched_at: record.launched_at.clone(),
        }
    }

    /// Adds what AWS knows that the record does not (e.g. a record from before a crash).
    pub fn merge(&mut self, other: SessionResources) {
        fn add(into: &mut Vec<String>, from: Vec<String>) {
            for item in from {
                if !into.contains(&item) {
                    into.push(item);
                }
            }
        }
        add(&mut self.instance_ids, other.instance_ids);
        add(&mut self.spot_request_ids, other.spot_request_ids);
        add(&mut self.rule_ids, other.rule_ids);
        add(&mut self.alarm_names, other.alarm_names);
        add(&mut self.schedule_names, other.schedule_names);
        if self.schedule_role_arn.is_none() {
            self.schedule_role_arn = other.schedule_role_arn;
        }
        if self.security_group_id.is_none() {
            self.security_group_id = other.security_group_id;
        }
        if self.ssh_config_file.is_none() {
            self.ssh_config_file = other.ssh_config_file;
        }
        if self.launched_at.is_none() {
            self.launched_at = other.launched_at;
        }
    }
}

/// What teardown did, for the summary line and `--output json`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TeardownReport {
    pub session_id: String,
    pub terminated: Vec<String>,
    pub cancelled_spot_requests: Vec<String>,
    pub rules: Vec<(String, Release)>,
    /// The session's security group: deleted, or left empty for `cleanup` (still in use).
    pub group: Option<GroupDeletion>,
    pub alarms_deleted: Vec<String>,
    pub schedules_deleted: Vec<String>,
    pub key_deleted: bool,
    /// The session's host block left the user's OpenSSH config.
    pub ssh_host_removed: bool,
    /// What the session ran for and cost, as written to the ledger.
    pub duration_seconds: Option<i64>,
    pub cost: Option<f64>,
    /// Steps that failed; their resources may remain (the watchdog and `cleanup` are the net).
    pub errors: Vec<String>,
    /// Reporting that failed (metrics, session log); nothing is left behind because of these.
    pub warnings: Vec<String>,
}

impl TeardownReport {
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if !self.terminated.is_empty() {
            parts.push(format!("terminated {}", self.terminated.join(", ")));
        }
        if self.rules.iter().any(|(_, r)| *r == Release::Revoked) {
            parts.push("closed SSH".into());
        }
        match self.group {
            Some(GroupDeletion::Deleted) => parts.push("deleted its security group".into()),
            Some(GroupDeletion::StillInUse) => parts
                .push("left its empty security group for `cleanup` (the instance is shutting down)".into()),
            None => {}
        }
        if !self.alarms_deleted.is_empty() {
            parts.push("deleted the alarm".into());
        }
        if !self.schedules_deleted.is_empty() {
            parts.push("disarmed the scheduled deadline".into());
        }
        if self.key_deleted {
            parts.push("deleted the key".into());
        }
        if self.ssh_host_removed {
            parts.push("removed its ssh host".into());
        }
        if parts.is_empty() {
            parts.push("nothing was left to remove".into());
        }
        let mut line = format!("session {}: {}", self.session_id, parts.join(", "));
        if let (Some(seconds), Some(cost)) = (self.duration_seconds, self.cost) {
            line.push_str(&format!(
                "; ran {}, cost about {}",
                crate::output::short_duration(std::time::Duration::from_secs(seconds.max(0) as u64)),
                crate::output::usd(cost)
            ));
        }
        if !self.errors.is_empty() {
            line.push_str(&format!(
                "; FAILED: {} (run `ephemeral-admin cleanup {}`)",
                self.errors.join("; "),
                self.session_id
            ));
        }
        line
    }
}

/// Ends a session and everything it owns. `reason` goes into the local record.
pub async fn teardown(
    aws: &Aws,
    store: &Store,
    resources: &SessionResources,
    reason: &str,
    clock: &dyn Clock,
) -> TeardownReport {
    let mut report = TeardownReport { session_id: resources.session_id.clone(), ..Default::default() };
    // The ledger line first: it is local, and its figures feed the metrics sent below.
    let entry = match ledger::record_end(
        &crate::ledger::Ledger::beside(store),
        store,
        &resources.session_id,
        reason,
        clock.now(),
    ) {
        Ok(entry) => entry,
        Err(e) => {
            report.errors.push(format!("{e:#}"));
            None
        }
    };
    // Everything in AWS at once; the group goes right after its instance (AWS refuses while the
    // instance is still in it), so the whole wait stays two round trips.
    let release_rules = futures::future::join_all(resources.security_group_id.iter().flat_map(|group| {
        resources
            .rule_ids
            .iter()
            .map(move |rule| async move { (rule.clone(), network::revoke_rule(aws, group, rule).await) })
    }));
    let report_end = async {
        match &entry {
            Some(entry) => report_end(aws, entry).await,
            None => Vec::new(),
        }
    };
    // Once the instance is sure to end and its rules are revoked (so the summary says what was
    // closed, and nothing races the group away under them): the group can go, and the alarm
    // (the box's second net).
    let known = instances::must_be_known(resources.launched_at.as_deref(), clock.now());
    let terminate_then_group = async {
        let (terminated, released) =
            tokio::join!(instances::terminate(aws, &resources.instance_ids, known), release_rules);
        // A box that may still run keeps its scheduled deadline: it is one of its nets.
        let (group, alarms, schedules) = match &terminated {
            Ok(()) => {
                let group = async {
                    match &resources.security_group_id {
                        Some(group) => Some(network::delete_security_group(aws, group).await),
                        None => None,
                    }
                };
                let (group, alarms, disarmed) = tokio::join!(
                    group,
                    alarm::delete(aws, &resources.alarm_names),
                    schedule::delete(aws, &resources.schedule_names),
                );
                let disarmed = match disarmed {
                    Ok(()) => keep_sweeping(aws, resources, group.as_ref(), clock).await,
                    Err(e) => Err(e),
                };
                (group, Some(alarms), Some(disarmed))
            }
            Err(_) => (None, None, None),
        };
        (terminated, released, group, alarms, schedules)
    };
    let ((terminated, released, group, alarms, schedules), cancelled, warnings) = tokio::join!(
        terminate_then_group,
        // A one-time spot request closes when its instance ends; cancelling makes sure.
        instances::cancel_spot_requests(aws, &resources.spot_request_ids),
        report_end,
    );
    report.warnings = warnings;
    if let Some(entry) = &entry {
        report.duration_seconds = Some(entry.duration_seconds);
        report.cost = Some(entry.cost.total);
    }
    let instance_ended = terminated.is_ok();
    match terminated {
        Ok(()) => report.terminated = resources.instance_ids.clone(),
        Err(e) => report.errors.push(e.to_string()),
    }
    match cancelled {
        Ok(()) => report.cancelled_spot_requests = resources.spot_request_ids.clone(),
        Err(e) => report.errors.push(e.to_string()),
    }
    for (rule, result) in released {
        match result {
            Ok(release) => report.rules.push((rule, release)),
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    match alarms {
        Some(Ok(())) => report.alarms_deleted = resources.alarm_names.clone(),
        Some(Err(e)) => report.errors.push(e.to_string()),
        None => {}
    }
    match schedules {
        Some(Ok(())) => report.schedules_deleted = resources.schedule_names.clone(),
        Some(Err(e)) => report.errors.push(e.to_string()),
        None => {}
    }
    // A box that may still run keeps its key and its ssh host: the user can still reach it.
    if instance_ended {
        match store.delete_private_key(&resources.session_id) {
            Ok(()) => report.key_deleted = true,
            Err(e) => report.errors.push(format!("{e:#}")),
        }
        if let Some(file) = &resources.ssh_config_file {
            match crate::ssh::config_file::remove(file, &resources.session_id) {
                Ok(removed) => report.ssh_host_removed = removed,
                Err(e) => report.errors.push(format!("{e:#}")),
            }
        }
    }
    match group {
        Some(Ok(deletion)) => {
            report.group = Some(deletion);
            if deletion == GroupDeletion::Deleted {
                // Nothing left for the launch sweep or `cleanup` to retry.
                let _ = store.update(&resources.session_id, |r| r.security_group_id = None);
            }
        }
        Some(Err(e)) => report.errors.push(e.to_string()),
        None => {}
    }
    report
}

/// How soon a session's group sweep runs when teardown finds the group still in use (the
/// instance is shutting down): the schedule deletes it then, with no `cleanup` needed.
pub const GROUP_SWEEP_SOON: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// A group AWS still holds (its instance shutting down) gets a fresh sweep a few minutes from
/// now ([`GROUP_SWEEP_SOON`]), so it goes with no `cleanup`; only then is a third round trip
/// spent. Without the schedules' role (a session from before them) `cleanup` stays the net.
pub async fn keep_sweeping(
    aws: &Aws,
    resources: &SessionResources,
    group: Option<&Result<GroupDeletion, crate::aws::AwsError>>,
    clock: &dyn Clock,
) -> Result<(), crate::aws::AwsError> {
    let still_there = matches!(group, Some(Ok(GroupDeletion::StillInUse)) | Some(Err(_)));
    let had_sweep = resources
        .schedule_names
        .iter()
        .any(|n| schedule::parse_name(n).is_some_and(|(_, job)| job == Job::SweepGroup));
    match (&resources.security_group_id, &resources.schedule_role_arn) {
        (Some(group_id), Some(role)) if still_there && had_sweep => {
            let at = clock.now() + GROUP_SWEEP_SOON;
            schedule::sweep_group_at(aws, &resources.session_id, group_id, role, at).await.map(|_| ())
        }
        _ => Ok(()),
    }
}

/// Takes an ended session's host block out of the OpenSSH config its record names (sessions
/// that ended on their own, or that `cleanup` removes). Answers whether there was one.
pub fn remove_ssh_host(store: &Store, session_id: &str) -> anyhow::Result<bool> {
    match store.load(session_id)?.and_then(|r| r.ssh_config_file) {
        Some(file) => crate::ssh::config_file::remove(&file, session_id),
        None => Ok(false),
    }
}

/// Publishes an ended session's metrics and its last log event. Returns what failed.
pub async fn report_end(aws: &Aws, entry: &ledger::Entry) -> Vec<String> {
    let log_end = async {
        match entry.instance_id.as_deref() {
            Some(instance) => {
                let message = format!(
                    "end session={} reason={} duration={}s cost={:.4}",
                    entry.session_id, entry.ended_by, entry.duration_seconds, entry.cost.total
                );
                logs::event(aws, instance, &message).await
            }
            None => Ok(()),
        }
    };
    let (metrics, logged) = tokio::join!(metrics::put_session_metrics(aws, entry), log_end);
    metrics.err().into_iter().chain(logged.err()).map(|e| e.to_string()).collect()
}

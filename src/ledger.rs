//! The local ledger: `$XDG_STATE_HOME/ephemeral-admin/ledger.jsonl`, one JSON line per session
//! that ran, with what it cost and how it ended. `cost` and the budget guard read it.
//!
//! Writes take an exclusive lock and replace the file atomically, so concurrent commands never
//! interleave or lose lines, and a session is never written twice. Sessions that ended on the box
//! (idle, deadline, spot interruption) while no CLI was running are settled from AWS by
//! [`settle`] the next time a command runs.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use aws_sdk_ec2::types::Filter;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::aws::instances::InstanceInfo;
use crate::aws::{Aws, AwsResultExt};
use crate::pricing::{self, Estimate};
use crate::session::Scope;
use crate::session::lifecycle::{self, Launcher};
use crate::session::store::{FileLock, SessionRecord, Store, write_atomic};
use crate::session::{self, Clock};

/// How a session ended.
pub mod ended_by {
    pub const EXIT: &str = "exit";
    pub const IDLE: &str = "idle";
    pub const DEADLINE: &str = "deadline";
    pub const INTERRUPTION: &str = "interruption";
    pub const TERMINATE: &str = "terminate";
    pub const CLEANUP: &str = "cleanup";
    pub const INTERRUPTED: &str = "interrupted";
    /// Provisioned, but no shell or command ever ran (a rejected key, a box that never answered).
    pub const LAUNCH_FAILED: &str = "launch-failed";
    /// The SSH connection broke while the shell or command ran.
    pub const CONNECTION_LOST: &str = "connection-lost";
    pub const UNKNOWN: &str = "unknown";
}

/// One session that ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub session_id: String,
    /// The AWS account the session ran in: spending and the budget are per account. Absent in
    /// lines written before entries said so (they count for every account).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    pub region: String,
    pub availability_zone: Option<String>,
    pub instance_type: Option<String>,
    pub market: Option<String>,
    /// USD per hour for compute.
    pub price_per_hour: Option<f64>,
    /// RFC 3339 (any offset; read back in UTC).
    pub start: String,
    pub end: String,
    pub duration_seconds: i64,
    pub cost: Estimate,
    pub ended_by: String,
    /// RunInstances calls the launch took (1 when the first candidate started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_attempts: Option<u32>,
    /// Launch phases in milliseconds since the launch started.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub timings_ms: BTreeMap<String, u64>,
}

impl Entry {
    /// The entry for a session from its record, ending at `end`, or at its deadline if that came
    /// first: the watchdog and the alarm end the box there, so a late teardown or settlement of a
    /// stale record does not bill the time after it.
    pub fn from_record(record: &SessionRecord, end: OffsetDateTime, ended_by: &str) -> Option<Entry> {
        let start = session::parse_rfc3339(record.launched_at.as_deref()?)?;
        let end = session::parse_rfc3339(&record.expires_at).map_or(end, |deadline| end.min(deadline));
        let end = end.max(start);
        let duration = (end - start).whole_seconds();
        let cost = pricing::estimate_with(
            record.price_per_hour.unwrap_or(0.0),
            Duration::from_secs(duration as u64),
            record.root_volume(),
            record.connect.as_deref() != Some("eice"),
        );
        Some(Entry {
            session_id: record.id.clone(),
            account: record.partition_and_account().1.map(str::to_string),
            instance_id: record.instance_id.clone(),
            region: record.region.clone(),
            availability_zone: record.availability_zone.clone(),
            instance_type: record.instance_type.clone(),
            market: record.market.clone(),
            price_per_hour: record.price_per_hour,
            start: session::rfc3339(start),
            end: session::rfc3339(end),
            duration_seconds: duration,
            cost,
            ended_by: ended_by.to_string(),
            launch_attempts: record.launch_attempts,
            timings_ms: record.timings_ms.clone(),
        })
    }

    /// Whether this line counts for `account` (`None`: the account is not known, count all).
    pub fn belongs_to(&self, account: Option<&str>) -> bool {
        match (account, self.account.as_deref()) {
            (Some(wanted), Some(mine)) => wanted == mine,
            _ => true,
        }
    }

    fn interval(&self) -> Option<(OffsetDateTime, OffsetDateTime)> {
        Some((session::parse_rfc3339(&self.start)?, session::parse_rfc3339(&self.end)?))
    }

    /// The part of this session's cost that falls in `[from, to)`, in proportion to time.
    pub fn cost_between(&self, from: OffsetDateTime, to: OffsetDateTime) -> f64 {
        let Some((start, end)) = self.interval() else { return 0.0 };
        if end <= start {
            return if start >= from && start < to { self.cost.total } else { 0.0 };
        }
        let overlap = (end.min(to) - start.max(from)).as_seconds_f64().max(0.0);
        self.cost.total * overlap / (end - start).as_seconds_f64()
    }
}

/// The ledger file.
#[derive(Debug, Clone)]
pub struct Ledger {
    path: PathBuf,
}

impl Ledger {
    pub fn new(path: impl Into<PathBuf>) -> Ledger {
        Ledger { path: path.into() }
    }

    /// The ledger beside the session records: `$XDG_STATE_HOME/ephemeral-admin/ledger.jsonl`.
    pub fn beside(store: &Store) -> Ledger {
        Ledger::new(store.state_dir().join("ledger.jsonl"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every entry; damaged lines are skipped with a warning.
    pub fn entries(&self) -> Result<Vec<Entry>> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        Ok(text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .filter_map(|(i, line)| match serde_json::from_str(line) {
                Ok(entry) => Some(entry),
                Err(e) => {
                    tracing::warn!("{}:{}: skipping a damaged ledger line ({e})", self.path.display(), i + 1);
                    None
                }
            })
            .collect())
    }

    /// Adds the entry unless the session already has one. Returns whether it was added.
    pub fn append(&self, entry: &Entry) -> Result<bool> {
        let dir = self.path.parent().context("the ledger has a directory")?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let _lock = FileLock::acquire(&dir.join(".ledger.lock"))?;
        let mut text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        let already = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Entry>(l).ok())
            .any(|e| e.session_id == entry.session_id);
        if already {
            return Ok(false);
        }
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&serde_json::to_string(entry)?);
        text.push('\n');
        write_atomic(&self.path, text.as_bytes())?;
        Ok(true)
    }

    /// Spend in the calendar month (UTC) that contains `now`, up to `now`.
    /// This month's spending so far of `account`'s sessions (every line's if `None`).
    pub fn month_to_date(&self, now: OffsetDateTime, account: Option<&str>) -> Result<f64> {
        let (from, to) = month_bounds(now);
        Ok(self
            .entries()?
            .iter()
            .filter(|e| e.belongs_to(account))
            .map(|e| e.cost_between(from, to.min(now)))
            .sum())
    }
}

/// `[first instant of the UTC month, first instant of the next)`.
pub fn month_bounds(t: OffsetDateTime) -> (OffsetDateTime, OffsetDateTime) {
    let t = t.to_offset(time::UtcOffset::UTC);
    let from = t.replace_day(1).expect("day 1 exists").replace_time(time::Time::MIDNIGHT);
    let (year, month) = match t.month() {
        time::Month::December => (t.year() + 1, time::Month::January),
        m => (t.year(), m.next()),
    };
    let to = from.replace_year(year).and_then(|d| d.replace_month(month)).expect("valid month");
    (from, to)
}

/// Writes the ledger entry of a session that ends now (teardown) and marks the record ended.
pub fn record_end(
    ledger: &Ledger,
    store: &Store,
    session_id: &str,
    ended_by: &str,
    end: OffsetDateTime,
) -> Result<Option<Entry>> {
    let entry = store.update(session_id, |record| {
        if record.ended_at.is_some() {
            return Ok(None);
        }
        let entry = Entry::from_record(record, end, ended_by);
        if let Some(entry) = &entry {
            ledger.append(entry)?;
        }
        record.ended_at = Some(session::rfc3339(end));
        record.end_reason = Some(ended_by.to_string());
        anyhow::Ok(entry)
    })?;
    let entry = match entry {
        Some(result) => result?,
        None => None,
    };
    Ok(entry)
}

/// How an instance that is gone ended, from EC2's state reason and the session's deadline.
fn classify_end(info: &InstanceInfo, record: &SessionRecord, end: OffsetDateTime) -> &'static str {
    let code = info.state_reason_code.as_deref().unwrap_or_default();
    match code {
        "Server.SpotInstanceTermination" | "Server.SpotInstanceShutdown" => ended_by::INTERRUPTION,
        "Client.InstanceInitiatedShutdown" => {
            let deadline = session::parse_rfc3339(info.expires_at.as_deref().unwrap_or(&record.expires_at));
            // The watchdog powers off at the deadline, or earlier when idle.
            if deadline.is_some_and(|d| end >= d - time::Duration::seconds(30)) {
                ended_by::DEADLINE
            } else {
                ended_by::IDLE
            }
        }
        "Client.UserInitiatedShutdown" => ended_by::TERMINATE,
        _ => ended_by::UNKNOWN,
    }
}

/// When EC2 says the instance changed state: "User initiated (2026-11-22 10:00:00 GMT)".
fn transition_time(reason: Option<&str>) -> Option<OffsetDateTime> {
    let reason = reason?;
    let open = reason.find('(')?;
    let stamp = reason.get(open + 1..open + 20)?;
    let iso = format!("{}T{}Z", stamp.get(0..10)?, stamp.get(11..19)?);
    session::parse_rfc3339(&iso)
}

/// Settles sessions that ended while no CLI was watching: kept sessions whose launcher is gone
/// and whose instance AWS reports terminated (or no longer knows). One DescribeInstances for all
/// of them; none at all when there is nothing to settle. Returns the entries written.
pub async fn settle(aws: &Aws, store: &Store, ledger: &Ledger, clock: &dyn Clock) -> Result<Vec<Entry>> {
    let open = unsettled(store, &aws.caller().await?.scope(&aws.region));
    if open.is_empty() {
        return Ok(Vec::new());
    }
    let mut filter = Filter::builder().name("instance-id");
    // `unsettled` keeps only records with an instance id.
    for id in open.iter().filter_map(|r| r.instance_id.as_deref()) {
        filter = filter.values(id);
    }
    let out =
        aws.ec2.describe_instances().filters(filter.build()).send().await.doing("settling ended sessions")?;
    let found: Vec<InstanceInfo> =
        out.reservations().iter().flat_map(|r| r.instances()).filter_map(InstanceInfo::from_sdk).collect();
    settle_from(open, &found, store, ledger, clock)
}

/// The regions where this (partition, account)'s local records may have ended while no CLI
/// watched (each needs one DescribeInstances to settle), in name order.
pub fn unsettled_regions(store: &Store, partition: &str, account: &str) -> Vec<String> {
    let mut regions: Vec<String> = store.all().into_iter().map(|r| r.region).collect();
    regions.sort();
    regions.dedup();
    regions.retain(|region| {
        let scope = Scope { partition: partition.into(), account: account.into(), region: region.clone() };
        !unsettled(store, &scope).is_empty()
    });
    regions
}

/// Records of this (partition, account, region) that may have ended while no CLI watched: not
/// ended, with an instance, and no live client. Another account's records are never touched:
/// its instances are invisible from here, which would look like "gone".
fn unsettled(store: &Store, scope: &Scope) -> Vec<SessionRecord> {
    store
        .in_scope(scope)
        .into_iter()
        .filter(|r| r.ended_at.is_none() && r.instance_id.is_some())
        .filter(|r| lifecycle::launcher_of(r) != Launcher::Alive)
        .collect()
}

/// [`settle`] with instances the caller already described (every state, terminated included),
/// so a command that lists instances anyway settles at no extra AWS call.
pub fn settle_known(
    scope: &Scope,
    found: &[InstanceInfo],
    store: &Store,
    ledger: &Ledger,
    clock: &dyn Clock,
) -> Result<Vec<Entry>> {
    settle_from(unsettled(store, scope), found, store, ledger, clock)
}

fn settle_from(
    open: Vec<SessionRecord>,
    found: &[InstanceInfo],
    store: &Store,
    ledger: &Ledger,
    clock: &dyn Clock,
) -> Result<Vec<Entry>> {
    let now = clock.now();
    let mut settled = Vec::new();
    for record in open {
        let info = found.iter().find(|i| Some(&i.instance_id) == record.instance_id.as_ref());
        let (end, how) = match info {
            Some(info) if matches!(info.state.as_str(), "terminated" | "shutting-down") => {
                let end = transition_time(info.state_transition_reason.as_deref()).unwrap_or(now);
                (end, classify_end(info, &record, end))
            }
            Some(_) => continue, // still running: nothing to settle
            // Launched less than an hour ago: EC2 must know it, so it is not visible yet.
            None if crate::aws::instances::must_be_known(record.launched_at.as_deref(), now) => continue,
            None => {
                // Gone from EC2's view (terminated more than about an hour ago): it ran at most
                // until its deadline.
                let deadline = session::parse_rfc3339(&record.expires_at).unwrap_or(now);
                (deadline.min(now), ended_by::UNKNOWN)
            }
        };
        if let Some(entry) = record_end(ledger, store, &record.id, how, end)? {
            let _ = store.delete_private_key(&record.id);
            settled.push(entry);
        }
    }
    Ok(settled)
}

/// What sessions still running (per the local records) have cost so far, in every region. A
/// session runs until its deadline at most (the watchdog and the alarm end it there), so a record
/// nobody settled never counts past it.
pub fn live_cost(store: &Store, now: OffsetDateTime, account: Option<&str>) -> f64 {
    store
        .all()
        .iter()
        .filter(|r| r.ended_at.is_none())
        .filter(|r| account.is_none() || r.partition_and_account().1 == account)
        .filter_map(|r| {
            let start = session::parse_rfc3339(r.launched_at.as_deref()?)?;
            let end = session::parse_rfc3339(&r.expires_at).map_or(now, |deadline| deadline.min(now));
            let seconds = (end - start).whole_seconds().max(0) as u64;
            let ipv4 = r.connect.as_deref() != Some("eice");
            Some(
                pricing::estimate_with(
                    r.price_per_hour?,
                    Duration::from_secs(seconds),
                    r.root_volume(),
                    ipv4,
                )
                .total,
            )
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, start: &str, end: &str, total: f64) -> Entry {
        Entry {
            account: None,
            session_id: id.into(),
            instance_id: None,
            region: "us-east-1".into(),
            availability_zone: None,
            instance_type: Some("t3.small".into()),
            market: Some("spot".into()),
            price_per_hour: Some(0.01),
            start: start.into(),
            end: end.into(),
            duration_seconds: 0,
            cost: Estimate { compute: total, ipv4: 0.0, ebs: 0.0, total },
            ended_by: "exit".into(),
            launch_attempts: None,
            timings_ms: BTreeMap::new(),
        }
    }

    #[test]
    fn month_bounds_are_utc_and_roll_over_the_year() {
        let (from, to) = month_bounds(session::parse_rfc3339("2026-12-31T23:30:00-02:00").unwrap());
        assert_eq!(session::rfc3339(from), "2027-01-01T00:00:00Z");
        assert_eq!(session::rfc3339(to), "2027-02-01T00:00:00Z");
    }

    #[test]
    fn a_session_across_midnight_of_the_month_is_split_by_time() {
        // 23:00 local +02:00 on Nov 30 = 21:00Z: the whole hour is in November (UTC).
        let e = entry("a", "2026-11-30T23:00:00+02:00", "2026-12-01T00:00:00+02:00", 0.12);
        let nov = month_bounds(session::parse_rfc3339("2026-11-15T00:00:00Z").unwrap());
        assert!((e.cost_between(nov.0, nov.1) - 0.12).abs() < 1e-12);
        // 23:30Z to 00:30Z crosses into December: half each.
        let e = entry("b", "2026-11-30T23:30:00Z", "2026-12-01T00:30:00Z", 0.10);
        let dec = month_bounds(session::parse_rfc3339("2026-12-02T00:00:00Z").unwrap());
        assert!((e.cost_between(nov.0, nov.1) - 0.05).abs() < 1e-12);
        assert!((e.cost_between(dec.0, dec.1) - 0.05).abs() < 1e-12);
    }

    #[test]
    fn the_ledger_never_holds_a_session_twice() {
        let dir = std::env::temp_dir().join(format!("ea-ledger-{}", std::process::id()));
        let ledger = Ledger::new(dir.join("ledger.jsonl"));
        let e = entry("a", "2026-11-01T00:00:00Z", "2026-11-01T01:00:00Z", 0.1);
        assert!(ledger.append(&e).unwrap());
        assert!(!ledger.append(&e).unwrap());
        assert!(ledger.append(&entry("b", "2026-11-02T00:00:00Z", "2026-11-02T01:00:00Z", 0.2)).unwrap());
        assert_eq!(ledger.entries().unwrap().len(), 2);
        let mtd =
            ledger.month_to_date(session::parse_rfc3339("2026-11-20T00:00:00Z").unwrap(), None).unwrap();
        assert!((mtd - 0.3).abs() < 1e-12);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn transition_times_parse_from_ec2s_reason() {
        let t = transition_time(Some("User initiated (2026-11-22 10:00:05 GMT)")).unwrap();
        assert_eq!(session::rfc3339(t), "2026-11-22T10:00:05Z");
        assert!(transition_time(Some("")).is_none());
    }
}

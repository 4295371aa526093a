//! How a session is shown: one view built from the local record, AWS's view of its instance, or
//! both, with time left and cost so far worked out.

use serde::Serialize;
use time::OffsetDateTime;

use crate::aws::instances::InstanceInfo;
use crate::output::{short_duration, table, usd};
use crate::pricing;
use crate::session::store::SessionRecord;
use crate::session::{self};

#[derive(Debug, Clone, Serialize)]
pub struct SessionView {
    pub session_id: String,
    /// The name given with `launch --name`.
    pub name: Option<String>,
    pub instance_id: Option<String>,
    pub state: String,
    pub region: Option<String>,
    pub instance_type: Option<String>,
    pub availability_zone: Option<String>,
    pub market: Option<String>,
    pub price_per_hour: Option<f64>,
    pub public_ip: Option<String>,
    pub private_ip: Option<String>,
    pub user: Option<String>,
    pub launched_at: Option<String>,
    pub expires_at: Option<String>,
    pub time_left_seconds: Option<i64>,
    pub age_seconds: Option<i64>,
    #[serde(serialize_with = "crate::output::money_opt")]
    pub cost_so_far: Option<f64>,
    pub host_key_fingerprint: Option<String>,
    pub kept: bool,
    /// How long the box stays up with no SSH connection (the kept or the attached policy).
    pub idle_grace_seconds: Option<u64>,
    /// Whether this machine has the session's record and key (needed to connect).
    pub local_record: bool,
    /// When and why it ended, once it has.
    pub ended_at: Option<String>,
    pub end_reason: Option<String>,
    /// Whether the session's scheduled deadline (`aws::schedule`, outside the box) is armed;
    /// None when it was not looked up.
    pub deadline_schedule_armed: Option<bool>,
    /// When that schedule terminates the box (`status` only).
    pub deadline_schedule_at: Option<String>,
}

impl SessionView {
    pub fn build(
        record: Option<&SessionRecord>,
        instance: Option<&InstanceInfo>,
        now: OffsetDateTime,
    ) -> SessionView {
        let pick = |from_instance: Option<String>, from_record: Option<String>| from_instance.or(from_record);
        let launched_at = pick(
            instance.and_then(|i| i.launch_time.clone()),
            record.and_then(|r| r.launched_at.clone().or(Some(r.created_at.clone()))),
        );
        let expires_at =
            pick(instance.and_then(|i| i.expires_at.clone()), record.map(|r| r.expires_at.clone()));
        let state = match (instance, record) {
            (Some(i), _) => i.state.clone(),
            (None, Some(r)) if r.ended_at.is_some() => "ended".into(),
            (None, Some(r)) if r.instance_id.is_some() => "gone".into(),
            (None, _) => "launching".into(),
        };
        let live = matches!(state.as_str(), "pending" | "running");
        let started = launched_at.as_deref().and_then(session::parse_rfc3339);
        let age_seconds = started.map(|t| (now - t).whole_seconds().max(0));
        let time_left_seconds = expires_at
            .as_deref()
            .and_then(session::parse_rfc3339)
            .filter(|_| live)
            .map(|t| (t - now).whole_seconds());
        let price_per_hour = record.and_then(|r| r.price_per_hour);
        let cost_so_far = match (price_per_hour, age_seconds) {
            (Some(price), Some(age)) if live => {
                let volume = record.map(|r| r.root_volume()).unwrap_or_default();
                Some(pricing::estimate(price, std::time::Duration::from_secs(age as u64), volume).total)
            }
            _ => None,
        };
        let (ended_at, end_reason) = match record.filter(|r| r.ended_at.is_some()) {
            Some(r) => (r.ended_at.clone(), r.end_reason.clone()),
            None if !live && instance.is_some() => {
                let i = instance.expect("checked");
                (None, i.state_reason.clone().or(i.state_transition_reason.clone()))
            }
            None => (None, None),
        };
        SessionView {
            ended_at,
            end_reason,
            session_id: instance
                .and_then(|i| i.session_id.clone())
                .or_else(|| record.map(|r| r.id.clone()))
                .unwrap_or_default(),
            name: pick(instance.and_then(|i| i.name.clone()), record.and_then(|r| r.name.clone())),
            instance_id: pick(
                instance.map(|i| i.instance_id.clone()),
                record.and_then(|r| r.instance_id.clone()),
            ),
            state,
            region: record.map(|r| r.region.clone()),
            instance_type: pick(
                instance.map(|i| i.instance_type.clone()),
                record.and_then(|r| r.instance_type.clone()),
            ),
            availability_zone: pick(
                instance.and_then(|i| i.availability_zone.clone()),
                record.and_then(|r| r.availability_zone.clone()),
            ),
            market: pick(instance.map(|i| i.market.to_string()), record.and_then(|r| r.market.clone())),
            price_per_hour,
            public_ip: pick(
                instance.and_then(|i| i.public_ip.clone()),
                record.and_then(|r| r.public_ip.clone()),
            ),
            private_ip: pick(
                instance.and_then(|i| i.private_ip.clone()),
                record.and_then(|r| r.private_ip.clone()),
            ),
            user: record.map(|r| r.user.clone()),
            launched_at,
            expires_at,
            time_left_seconds,
            age_seconds,
            cost_so_far,
            host_key_fingerprint: record.map(|r| r.host_key_fingerprint.clone()),
            kept: instance.map(|i| i.kept).or(record.map(|r| r.kept)).unwrap_or(false),
            idle_grace_seconds: record.and_then(|r| r.idle_grace_secs),
            local_record: record.is_some(),
            deadline_schedule_armed: None,
            deadline_schedule_at: None,
        }
    }

    /// "terminates the box at …" / "not armed", for `status`.
    fn deadline_schedule(&self) -> Option<String> {
        match (self.deadline_schedule_armed?, &self.deadline_schedule_at) {
            (true, Some(at)) => Some(format!("EventBridge Scheduler terminates the box at {at}")),
            (true, None) => Some("armed".into()),
            (false, _) => Some("not armed (the watchdog and the alarm still end the box)".into()),
        }
    }

    /// "kept: off after 30m without SSH" / "attached: off after 2m without SSH".
    fn idle_policy(&self) -> String {
        let mode = if self.kept { "kept" } else { "attached" };
        match self.idle_grace_seconds {
            Some(s) => {
                format!("{mode}: off after {} without SSH", short_duration(std::time::Duration::from_secs(s)))
            }
            None => mode.to_string(),
        }
    }

    fn time_left(&self) -> String {
        match self.time_left_seconds {
            Some(s) if s > 0 => short_duration(std::time::Duration::from_secs(s as u64)),
            Some(_) => "expired".into(),
            None => "-".into(),
        }
    }

    /// Several lines for `launch` and `status`.
    pub fn describe(&self) -> String {
        let dash = || "-".to_string();
        let mut rows = vec![
            ("session", self.session_id.clone()),
            ("name", self.name.clone().unwrap_or_else(dash)),
            ("instance", self.instance_id.clone().unwrap_or_else(dash)),
            ("state", self.state.clone()),
            (
                "type",
                format!(
                    "{} {} in {}",
                    self.instance_type.clone().unwrap_or_else(dash),
                    self.market.clone().unwrap_or_else(dash),
                    self.availability_zone.clone().unwrap_or_else(dash)
                ),
            ),
            ("price", self.price_per_hour.map(|p| format!("{}/h", usd(p))).unwrap_or_else(dash)),
            ("address", self.public_ip.clone().or(self.private_ip.clone()).unwrap_or_else(dash)),
            ("user", self.user.clone().unwrap_or_else(dash)),
            match (&self.ended_at, &self.end_reason) {
                (Some(at), reason) => {
                    ("ended", format!("{at} ({})", reason.as_deref().unwrap_or("reason not recorded")))
                }
                (None, Some(reason)) => ("ended", reason.clone()),
                (None, None) => (
                    "expires",
                    format!("{} ({} left)", self.expires_at.clone().unwrap_or_else(dash), self.time_left()),
                ),
            },
            ("host key", self.host_key_fingerprint.clone().unwrap_or_else(dash)),
            ("idle", self.idle_policy()),
        ];
        if let Some(cost) = self.cost_so_far {
            rows.push(("cost so far", usd(cost)));
        }
        if let Some(outside) = self.deadline_schedule() {
            rows.push(("outside", outside));
        }
        rows.iter().map(|(k, v)| format!("{k:<12}{v}\n")).collect()
    }
}

/// The `list` table.
pub fn list_table(views: &[SessionView]) -> String {
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            vec![
                v.session_id.clone(),
                v.name.clone().unwrap_or_default(),
                v.state.clone(),
                v.instance_type.clone().unwrap_or_default(),
                v.market.clone().unwrap_or_default(),
                v.availability_zone.clone().unwrap_or_default(),
                v.public_ip.clone().or(v.private_ip.clone()).unwrap_or_default(),
                v.age_seconds
                    .map(|s| short_duration(std::time::Duration::from_secs(s as u64)))
                    .unwrap_or_default(),
                v.time_left(),
                v.cost_so_far.map(usd).unwrap_or_default(),
                v.idle_policy(),
                match v.deadline_schedule_armed {
                    Some(true) => "armed".into(),
                    Some(false) => "no".into(),
                    None => "?".into(),
                },
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "NAME",
            "STATE",
            "TYPE",
            "MARKET",
            "ZONE",
            "ADDRESS",
            "AGE",
            "LEFT",
            "COST",
            "IDLE",
            "SCHEDULED",
        ],
        &rows,
    )
}

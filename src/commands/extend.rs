//! `extend ID --by DUR | --until TIME`: moves a session's hard deadline by rewriting its
//! `ephemeral-admin:expires-at` tag. No SSH needed: the watchdog on the box reads the tag through
//! instance metadata and picks the new deadline up within one interval, so this works even when
//! the box is unreachable. The session's scheduled deadline (`aws::schedule`) moves with it.

use std::time::Duration;

use anyhow::{Result, bail};
use serde::Serialize;
use time::OffsetDateTime;

use super::Context;
use crate::aws::{instances, schedule};
use crate::cli::ExtendArgs;
use crate::error::{ExitStatus, UsageError};
use crate::output::{short_duration, usd};
use crate::pricing;
use crate::session::store::Store;
use crate::session::{self, Clock, SystemClock};

#[derive(Serialize)]
struct Extended {
    session_id: String,
    instance_id: String,
    previous_expires_at: String,
    expires_at: String,
    time_left_seconds: i64,
    added_seconds: i64,
    /// How many of the session's schedules (`aws::schedule`) moved with it.
    schedules_moved: usize,
    #[serde(serialize_with = "crate::output::money_opt")]
    added_cost_estimate: Option<f64>,
}

/// `--until` accepts RFC 3339 with or without seconds: 2026-11-22T18:00Z, 2026-11-22T18:00:00+01:00.
pub fn parse_deadline(text: &str) -> Option<OffsetDateTime> {
    if let Some(t) = session::parse_rfc3339(text) {
        return Some(t);
    }
    // Insert ":00" seconds after HH:MM when they were left out.
    let (date_time, zone) = match text.find(['Z', 'z', '+']).or_else(|| text.rfind('-').filter(|&i| i > 10)) {
        Some(i) => text.split_at(i),
        None => (text, "Z"),
    };
    if date_time.len() == 16 {
        return session::parse_rfc3339(&format!("{date_time}:00{zone}"));
    }
    None
}

enum Change {
    By(Duration),
    Until(OffsetDateTime),
}

pub async fn run(ctx: &Context, args: &ExtendArgs) -> Result<ExitStatus> {
    // Validate the request before any AWS call.
    let change = match (&args.by, &args.until) {
        (Some(by), _) => Change::By(
            crate::settings::parse_duration_value(by)
                .map_err(|why| UsageError::new(format!("invalid --by {by:?}: {why}")))?,
        ),
        (None, Some(until)) => Change::Until(parse_deadline(until).ok_or_else(|| {
            UsageError::new(format!("invalid --until {until:?}: expected a time like 2026-11-22T18:00Z"))
        })?),
        (None, None) => unreachable!("clap requires --by or --until"),
    };
    let id = &super::resolve_session(ctx, &args.session.id).await?;
    let s = &ctx.settings;
    let clock = SystemClock;
    let aws = ctx.aws().await?;
    let store = Store::new(s.sessions_dir());
    let query = instances::Query { session_id: Some(id), include_terminated: true, ..Default::default() };
    let found = instances::find(&aws, query).await?;
    let Some(instance) = found.iter().find(|i| i.is_live()).or(found.first()) else {
        bail!("no session {id} in {}: `ephemeral-admin list` shows live sessions", aws.region);
    };
    if instance.state != "running" {
        bail!(
            "session {id} is {} (not running): there is nothing to extend; launch a new one",
            instance.state
        );
    }
    let now = clock.now();
    let current = instance.expires_at.as_deref().and_then(session::parse_rfc3339).unwrap_or(now);
    let wanted = match change {
        Change::By(by) => current + by,
        Change::Until(until) => until,
    };
    let launched = instance.launch_time.as_deref().and_then(session::parse_rfc3339).unwrap_or(now);
    let cap = launched + s.max_runtime_cap;
    if wanted < current && !args.shorten {
        return Err(UsageError::new(format!(
            "{} is earlier than the current deadline {}: add --shorten to move it earlier, or give a later time",
            session::rfc3339(wanted),
            session::rfc3339(current)
        ))
        .into());
    }
    if wanted > cap {
        return Err(UsageError::new(format!(
            "{} is past the hard cap of {} after launch ({}): extend to at most that, or raise max_runtime_cap in the config",
            session::rfc3339(wanted),
            short_duration(s.max_runtime_cap),
            session::rfc3339(cap)
        ))
        .into());
    }
    if wanted <= now {
        return Err(UsageError::new(format!(
            "{} is already past: that would end the session now; use `ephemeral-admin terminate {id}`",
            session::rfc3339(wanted)
        ))
        .into());
    }
    let expires_at = session::rfc3339(wanted);
    // The box's tag (the watchdog's deadline) and the schedule outside it move together.
    let (tagged, moved) = tokio::join!(
        instances::set_expiry(&aws, &instance.instance_id, &expires_at),
        schedule::move_to(&aws, id, wanted),
    );
    tagged?;
    let schedules_moved = moved.map_err(|e| {
        anyhow::Error::from(e).context(format!(
            "the box's deadline moved to {expires_at} but its scheduled deadline did not: run this `extend` again"
        ))
    })?;
    let record = store.update(id, |record| {
        record.expires_at = expires_at.clone();
        record.clone()
    })?;
    let added_seconds = (wanted - current).whole_seconds();
    let price = record.as_ref().and_then(|r| r.price_per_hour);
    let volume = record.as_ref().map(|r| r.root_volume()).unwrap_or_default();
    let added_cost_estimate = price
        .filter(|_| added_seconds > 0)
        .map(|p| pricing::estimate(p, Duration::from_secs(added_seconds as u64), volume).total);
    if let Some(added) = added_cost_estimate {
        let account = aws.caller().await?.account;
        let spent = crate::ledger::Ledger::beside(&store).month_to_date(now, Some(&account))?
            + crate::ledger::live_cost(&store, now, Some(&account));
        let committed = spent + added;
        if committed > s.monthly_budget {
            ctx.printer.warn(format!(
                "this extension can take the month to {} against a monthly budget of {} ({} spent so far)",
                usd(committed),
                usd(s.monthly_budget),
                usd(spent)
            ));
        }
    }
    let event =
        format!("extend session={id} from={} to={}", session::rfc3339(current), session::rfc3339(wanted));
    if let Err(e) = crate::aws::logs::event(&aws, &instance.instance_id, &event).await {
        ctx.printer.warn(format!("the session log did not take the extension: {e}"));
    }
    let result = Extended {
        session_id: id.clone(),
        instance_id: instance.instance_id.clone(),
        previous_expires_at: session::rfc3339(current),
        time_left_seconds: (wanted - now).whole_seconds(),
        expires_at,
        added_seconds,
        schedules_moved,
        added_cost_estimate,
    };
    ctx.printer.result(&result, || {
        let left = short_duration(Duration::from_secs(result.time_left_seconds.max(0) as u64));
        let cost = result.added_cost_estimate.map(|c| format!("; adds up to {}", usd(c))).unwrap_or_default();
        format!("session {id} now ends at {} ({left} left){cost}", result.expires_at)
    });
    Ok(ExitStatus::Success)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_parse_with_or_without_seconds() {
        let t = |s: &str| parse_deadline(s).map(session::rfc3339);
        assert_eq!(t("2026-11-22T18:00Z").as_deref(), Some("2026-11-22T18:00:00Z"));
        assert_eq!(t("2026-11-22T18:00:30Z").as_deref(), Some("2026-11-22T18:00:30Z"));
        assert_eq!(t("2026-11-22T19:00+01:00").as_deref(), Some("2026-11-22T18:00:00Z"));
        assert_eq!(t("2026-11-22T13:00-05:00").as_deref(), Some("2026-11-22T18:00:00Z"));
        assert_eq!(t("tomorrow"), None);
    }
}

//! `cost`, `dashboard` and `budget`: what sessions cost, against the monthly budget; the
//! CloudWatch dashboard of session metrics; an AWS Budgets budget with e-mail alerts.

use anyhow::{Result, bail};
use serde::Serialize;
use time::OffsetDateTime;

use super::Context;
use crate::aws::{budgets, identity, metrics};
use crate::cli::{BudgetArgs, CostArgs};
use crate::error::{ExitStatus, UsageError};
use crate::ledger::{Entry, month_bounds};
use crate::output::{short_duration, table, usd};
use crate::session;
use crate::session::store::Store;

#[derive(Serialize)]
struct SessionCost {
    session_id: String,
    /// Named as in `list` and `status`.
    launched_at: String,
    ended_at: Option<String>,
    instance_type: Option<String>,
    market: Option<String>,
    ended_by: Option<String>,
    duration_seconds: i64,
    /// The part of the session's cost that falls in the month.
    #[serde(serialize_with = "crate::output::money")]
    cost: f64,
}

#[derive(Serialize)]
struct CostReport {
    month: String,
    #[serde(serialize_with = "crate::output::money")]
    budget: f64,
    #[serde(serialize_with = "crate::output::money")]
    spent: f64,
    #[serde(serialize_with = "crate::output::money")]
    remaining: f64,
    /// Sessions still running, counted at their cost so far.
    #[serde(serialize_with = "crate::output::money")]
    live: f64,
    sessions: Vec<SessionCost>,
}

/// `2026-11` → the instant the month starts (UTC).
fn parse_month(text: &str) -> Option<OffsetDateTime> {
    session::parse_rfc3339(&format!("{text}-01T00:00:00Z")).filter(|_| text.len() == 7)
}

pub async fn cost(ctx: &Context, args: &CostArgs) -> Result<ExitStatus> {
    let clock = session::clock();
    let now = clock.now();
    let at = match &args.month {
        Some(month) => parse_month(month).ok_or_else(|| {
            UsageError::new(format!("invalid --month {month:?}: expected YYYY-MM, like 2026-11"))
        })?,
        None => now,
    };
    let store = Store::new(ctx.settings.sessions_dir());
    let ledger = crate::ledger::Ledger::beside(&store);
    // Settle sessions that ended on their own, if AWS is configured; the ledger is enough otherwise.
    // This account's spending when the credentials say which account; every line otherwise.
    let mut account = None;
    if let Ok(aws) = ctx.aws().await {
        ctx.settle(&aws).await;
        account = aws.caller().await.ok().map(|c| c.account);
    }
    let (from, to) = month_bounds(at);
    let until = to.min(now);
    let mut sessions: Vec<SessionCost> = ledger
        .entries()?
        .iter()
        .filter(|e| e.belongs_to(account.as_deref()))
        .filter_map(|e: &Entry| {
            let cost = e.cost_between(from, until);
            let start = session::parse_rfc3339(&e.start)?;
            let end = session::parse_rfc3339(&e.end)?;
            (end > from && start < until).then(|| SessionCost {
                session_id: e.session_id.clone(),
                launched_at: session::rfc3339(start),
                ended_at: Some(session::rfc3339(end)),
                instance_type: e.instance_type.clone(),
                market: e.market.clone(),
                ended_by: Some(e.ended_by.clone()),
                duration_seconds: e.duration_seconds,
                cost,
            })
        })
        .collect();
    let live_in_month = from <= now && now < to;
    let mut live = 0.0;
    if live_in_month {
        let open = store.all().into_iter().filter(|r| r.ended_at.is_none());
        for record in open.filter(|r| account.is_none() || r.partition_and_account().1 == account.as_deref())
        {
            let Some(entry) = Entry::from_record(&record, now, "running") else { continue };
            let cost = entry.cost_between(from, until);
            live += cost;
            sessions.push(SessionCost {
                session_id: entry.session_id,
                launched_at: entry.start,
                ended_at: None,
                instance_type: entry.instance_type,
                market: entry.market,
                ended_by: None,
                duration_seconds: entry.duration_seconds,
                cost,
            });
        }
    }
    sessions.sort_by(|a, b| a.launched_at.cmp(&b.launched_at));
    let spent: f64 = sessions.iter().map(|s| s.cost).sum();
    let budget = ctx.settings.monthly_budget;
    let report = CostReport {
        month: format!("{:04}-{:02}", from.year(), u8::from(from.month())),
        budget,
        spent,
        remaining: budget - spent,
        live,
        sessions,
    };
    ctx.printer.result(&report, || {
        let rows: Vec<Vec<String>> = report
            .sessions
            .iter()
            .map(|s| {
                vec![
                    s.session_id.clone(),
                    s.launched_at.clone(),
                    short_duration(std::time::Duration::from_secs(s.duration_seconds.max(0) as u64)),
                    format!(
                        "{} {}",
                        s.instance_type.as_deref().unwrap_or("?"),
                        s.market.as_deref().unwrap_or("?")
                    ),
                    s.ended_by.clone().unwrap_or_else(|| "running".into()),
                    usd(s.cost),
                ]
            })
            .collect();
        let mut text = if rows.is_empty() {
            String::new()
        } else {
            table(&["SESSION", "START (UTC)", "RAN", "TYPE", "ENDED BY", "COST"], &rows)
        };
        text.push_str(&format!(
            "{}: {} spent of {} ({} left){}\n",
            report.month,
            usd(report.spent),
            usd(report.budget),
            usd(report.remaining),
            if report.remaining < 0.0 { " — OVER BUDGET" } else { "" }
        ));
        text
    });
    Ok(ExitStatus::Success)
}

pub async fn dashboard(ctx: &Context) -> Result<ExitStatus> {
    let aws = ctx.aws().await?;
    metrics::put_dashboard(&aws).await?;
    let name = metrics::DASHBOARD_NAME;
    let url = format!(
        "https://{0}.console.aws.amazon.com/cloudwatch/home?region={0}#dashboards:name={name}",
        aws.region
    );
    ctx.printer.result(&serde_json::json!({ "dashboard": name, "region": aws.region, "url": url }), || {
        format!("dashboard {name} is up to date: {url}")
    });
    Ok(ExitStatus::Success)
}

pub async fn budget(ctx: &Context, args: &BudgetArgs) -> Result<ExitStatus> {
    let limit = args.limit.unwrap_or(ctx.settings.monthly_budget);
    if !(limit > 0.0 && limit.is_finite()) {
        return Err(UsageError::new(format!(
            "invalid --limit {limit}: expected US dollars above zero, like 2"
        ))
        .into());
    }
    let email = args.email.trim();
    if !email.contains('@') || email.contains(char::is_whitespace) {
        return Err(UsageError::new(format!(
            "invalid --email {email:?}: expected an address like ops@example.com"
        ))
        .into());
    }
    let aws = ctx.aws().await?;
    let caller = identity::whoami(&aws).await?;
    if caller.account.is_empty() {
        bail!("AWS did not say which account these credentials belong to");
    }
    let report = budgets::ensure(&aws, &caller.account, limit, email).await?;
    ctx.printer.result(&report, || {
        format!(
            "budget {} {}: {} a month for costs tagged {}, alerts to {} at {}",
            report.budget_name,
            if report.created { "created" } else { "updated" },
            usd(report.limit_usd),
            report.cost_filter,
            report.email,
            budgets::ALERT_PERCENTAGES.map(|p| format!("{p:.0}%")).join(" and "),
        )
    });
    Ok(ExitStatus::Success)
}

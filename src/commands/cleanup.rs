//! `cleanup`: finds everything the tool made for the caller, from AWS tags (the source of truth)
//! joined with local records, and removes what is over or orphaned, in dependency order.
//!
//! By default only the caller's sessions that are over (past their deadline, instance gone,
//! ended) or orphaned (attached, and the process that launched it is gone) go; sessions kept on
//! purpose with time left, or with a live client, stay unless named or `--all` is given.
//! Idempotent: running it twice, or twice at once, is harmless.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, bail};
use serde::Serialize;
use time::OffsetDateTime;

use super::Context;
use crate::aws::instances::{self, InstanceInfo, SpotRequestInfo};
use crate::aws::network;
use crate::aws::network::GroupDeletion;
use crate::aws::{Aws, alarm, iam, identity, logs, schedule};
use crate::cli::CleanupArgs;
use crate::error::{ExitStatus, UsageError};
use crate::output::{short_duration, table, usd};
use crate::pricing;
use crate::session::lifecycle::{self, Instance, Phase};
use crate::session::store::{SessionRecord, Store};
use crate::session::{self, SystemClock};

/// A schedule younger than this with nothing else of its session visible is left alone.
const ARMING: Duration = Duration::from_secs(10 * 60);

/// How long `--purge` waits for terminating instances to let go of the group and profile.
const PURGE_WAIT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owners {
    Me,
    Any,
}

/// What cleanup decided for one session, and what it did.
#[derive(Debug, Clone, Serialize)]
pub struct SessionOutcome {
    pub session_id: String,
    pub region: String,
    /// "removed", "would-remove" (dry run) or "kept".
    pub action: &'static str,
    pub reason: String,
    pub owner: Option<String>,
    pub resources: Vec<String>,
    /// Estimated money not spent: time left until the deadline × the hourly price.
    #[serde(serialize_with = "crate::output::money")]
    pub saved: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub dry_run: bool,
    pub regions: Vec<String>,
    pub sessions: Vec<SessionOutcome>,
    pub purged: Vec<String>,
    /// Session log groups of instances long gone (older than their retention, so empty).
    pub log_groups_removed: Vec<String>,
    pub errors: Vec<String>,
    #[serde(serialize_with = "crate::output::money")]
    pub saved: f64,
}

/// Everything found for one session id.
#[derive(Debug, Default)]
struct Found {
    record: Option<SessionRecord>,
    instances: Vec<InstanceInfo>,
    spot_requests: Vec<SpotRequestInfo>,
    /// (group id, rule id) of the session's SSH rules.
    rules: Vec<(String, String)>,
    groups: Vec<network::OwnGroup>,
    alarms: Vec<String>,
    schedules: Vec<schedule::Armed>,
}

impl Found {
    fn owner(&self) -> Option<String> {
        self.instances
            .iter()
            .find_map(|i| i.owner.clone())
            .or_else(|| self.record.as_ref().map(|r| r.owner_arn.clone()).filter(|o| !o.is_empty()))
            .or_else(|| self.spot_requests.iter().find_map(|s| s.owner.clone()))
            .or_else(|| self.groups.iter().find_map(|g| g.owner.clone()))
    }

    /// The creator's aws:userid, from any of the session's resources that carries it.
    fn owner_id(&self) -> Option<String> {
        self.instances
            .iter()
            .find_map(|i| i.owner_id.clone())
            .or_else(|| self.spot_requests.iter().find_map(|s| s.owner_id.clone()))
            .or_else(|| self.groups.iter().find_map(|g| g.owner_id.clone()))
    }

    fn live(&self) -> Vec<&InstanceInfo> {
        self.instances.iter().filter(|i| i.state != "terminated" && i.state != "shutting-down").collect()
    }

    fn expires_at(&self) -> Option<OffsetDateTime> {
        self.instances
            .iter()
            .find_map(|i| i.expires_at.clone())
            .or_else(|| self.record.as_ref().map(|r| r.expires_at.clone()))
            .and_then(|t| session::parse_rfc3339(&t))
    }

    /// Only schedules, made moments ago: a launch (perhaps on another machine, whose instance
    /// EC2 does not list yet) is arming them. Schedules carry no owner tag to tell.
    fn arming(&self, now: OffsetDateTime) -> bool {
        self.record.is_none()
            && self.instances.is_empty()
            && !self.schedules.is_empty()
            && self.schedules.iter().all(|a| a.created.is_some_and(|t| now - t < ARMING))
    }

    /// Nothing left in AWS (terminated instances stay visible for an hour but cost nothing).
    fn is_empty(&self) -> bool {
        self.live().is_empty()
            && self.spot_requests.is_empty()
            && self.rules.is_empty()
            && self.groups.is_empty()
            && self.alarms.is_empty()
            && self.schedules.is_empty()
    }
}

pub async fn run(ctx: &Context, args: &CleanupArgs) -> Result<ExitStatus> {
    let mut ids = Vec::new();
    for text in &args.ids {
        ids.push(super::resolve_session(ctx, text).await?);
    }
    let args = &CleanupArgs { ids, ..args.clone() };
    let owners = match args.owner.as_deref() {
        None | Some("me") => Owners::Me,
        Some("any") => Owners::Any,
        Some(other) => {
            return Err(UsageError::new(format!("invalid --owner {other:?}: expected me or any")).into());
        }
    };
    let aws = ctx.aws().await?;
    let caller = identity::me(&aws, ctx.settings.owner.as_deref()).await?;
    if !args.dry_run {
        ctx.settle(&aws).await;
    }
    if owners == Owners::Any {
        ctx.printer.warn("--owner any: acting on EVERY owner's ephemeral-admin sessions in this account");
    }
    let regions = if args.all_regions { enabled_regions(&aws).await? } else { vec![aws.region.clone()] };
    let aws = &aws;
    let sweeps = regions.iter().map(|region| {
        let caller = caller.clone();
        async move {
            let regional = if *region == aws.region {
                aws.clone()
            } else {
                aws.in_region(&ctx.settings.aws, region).await
            };
            sweep(ctx, &regional, &caller, owners, args).await
        }
    });
    let mut report = Report { dry_run: args.dry_run, regions: regions.clone(), ..Default::default() };
    for (region, result) in regions.iter().zip(futures::future::join_all(sweeps).await) {
        match result {
            Ok(part) => {
                report.sessions.extend(part.sessions);
                report.purged.extend(part.purged);
                report.log_groups_removed.extend(part.log_groups_removed);
                report.errors.extend(part.errors);
            }
            Err(e) => report.errors.push(format!("{region}: {}", crate::exit_codes::one_line(&e))),
        }
    }
    if args.purge && !args.dry_run {
        // IAM is global: its roles go only when no region of the account still uses them.
        match purge_global(ctx, aws, &caller.account).await {
            Ok(purged) => report.purged.extend(purged),
            Err(e) => report.errors.push(crate::exit_codes::one_line(&e)),
        }
    }
    for id in &args.ids {
        if !report.sessions.iter().any(|s| &s.session_id == id) {
            report.errors.push(format!(
                "no session {id} in {} (neither AWS nor this machine knows it; --all-regions looks everywhere)",
                regions.join(", ")
            ));
        }
    }
    report.saved = report.sessions.iter().map(|s| s.saved).sum();
    ctx.printer.result(&report, || render(&report));
    Ok(if report.errors.is_empty() { ExitStatus::Success } else { ExitStatus::Failure })
}

async fn enabled_regions(aws: &Aws) -> Result<Vec<String>> {
    let out = aws
        .ec2
        .describe_regions()
        .send()
        .await
        .map_err(|e| crate::aws::AwsError::new("listing regions", e))?;
    let mut regions: Vec<String> =
        out.regions().iter().filter_map(|r| r.region_name().map(str::to_string)).collect();
    regions.sort();
    Ok(regions)
}

fn render(report: &Report) -> String {
    let rows: Vec<Vec<String>> = report
        .sessions
        .iter()
        .map(|s| {
            vec![
                s.session_id.clone(),
                s.region.clone(),
                s.action.to_string(),
                s.reason.clone(),
                s.resources.join(" "),
                if s.saved > 0.0 { usd(s.saved) } else { String::new() },
            ]
        })
        .collect();
    let mut text = if rows.is_empty() {
        format!("nothing to clean up in {}\n", report.regions.join(", "))
    } else {
        table(&["SESSION", "REGION", "ACTION", "WHY", "RESOURCES", "SAVED"], &rows)
    };
    for purged in &report.purged {
        text.push_str(&format!("purged {purged}\n"));
    }
    if report.purged.iter().any(|p| p.starts_with("IAM role")) {
        // The bootstrap policy may never delete (or widen) the boundary; it grants nothing.
        text.push_str(&format!(
            "kept the permissions boundary policy {}: it grants nothing; an account admin deletes it with `aws iam delete-policy` once the tool is gone for good\n",
            crate::aws::iam::BOUNDARY_POLICY_NAME
        ));
    }
    if !report.log_groups_removed.is_empty() {
        let verb = if report.dry_run { "would delete" } else { "deleted" };
        text.push_str(&format!("{verb} {} expired session log group(s)\n", report.log_groups_removed.len()));
    }
    let removed = report.sessions.iter().filter(|s| s.action != "kept").count();
    if removed > 0 {
        let verb = if report.dry_run { "would remove" } else { "removed" };
        text.push_str(&format!("{verb} {removed} session(s); saved about {}\n", usd(report.saved)));
    }
    for error in &report.errors {
        text.push_str(&format!("FAILED: {error}\n"));
    }
    text
}

/// One region: gather, decide, remove, purge.
async fn sweep(
    ctx: &Context,
    aws: &Aws,
    caller: &identity::Caller,
    owners: Owners,
    args: &CleanupArgs,
) -> Result<Report> {
    let s = &ctx.settings;
    let store = Store::new(s.sessions_dir());
    let now = session::clock().now();
    let (found_instances, spot_requests, groups, rules, alarms, log_groups, schedules) = tokio::try_join!(
        instances::find(aws, instances::Query { include_terminated: true, ..Default::default() }),
        instances::open_spot_requests(aws),
        network::own_groups(aws),
        network::own_ssh_rules(aws),
        alarm::list_ours(aws),
        logs::list(aws),
        schedule::list_ours(aws),
    )?;
    // A session's log group outlives it by its retention; once that has passed it is empty.
    let retention_ms = i64::from(logs::RETENTION_DAYS) * 86_400_000;
    let now_ms = (now.unix_timestamp_nanos() / 1_000_000) as i64;
    let stale_logs: Vec<String> = log_groups
        .iter()
        .filter(|g| now_ms - g.created_ms > retention_ms)
        .filter(|g| {
            !found_instances.iter().any(|i| i.instance_id == g.instance_id && i.state != "terminated")
        })
        .map(|g| g.name.clone())
        .collect();

    let mut sessions: BTreeMap<String, Found> = BTreeMap::new();
    let scope = aws.caller().await?.scope(&aws.region);
    for record in store.in_scope(&scope) {
        let id = record.id.clone();
        sessions.entry(id).or_default().record = Some(record);
    }
    for instance in found_instances {
        if let Some(id) = instance.session_id.clone() {
            sessions.entry(id).or_default().instances.push(instance);
        }
    }
    for request in spot_requests {
        if let Some(id) = request.session_id.clone() {
            sessions.entry(id).or_default().spot_requests.push(request);
        }
    }
    for rule in rules {
        if let Some(id) = rule.session_id.clone() {
            sessions.entry(id).or_default().rules.push((rule.group_id, rule.rule_id));
        }
    }
    for group in groups {
        if let Some(id) = group.session_id.clone() {
            sessions.entry(id).or_default().groups.push(group);
        }
    }
    for a in alarms {
        if let Some(id) = a.session_id.clone() {
            sessions.entry(id).or_default().alarms.push(a.name);
        }
    }
    for armed in schedules {
        sessions.entry(armed.session_id.clone()).or_default().schedules.push(armed);
    }
    // Terminated instances only matter when something else of the session is left.
    sessions.retain(|_, f| f.record.is_some() || !f.is_empty());

    let mut report = Report { dry_run: args.dry_run, ..Default::default() };
    let mut doomed: Vec<(String, Found, String)> = Vec::new();
    for (id, found) in sessions {
        let owner = found.owner();
        // Another person's session (by the owner-id AWS enforces, so even on one shared role):
        // not ours to judge, not even to list.
        if owners == Owners::Me && !caller.may_change(found.owner_id().as_deref(), owner.as_deref()) {
            continue;
        }
        match decide(&id, &found, args, now) {
            Decision::Remove(reason) => doomed.push((id, found, reason)),
            Decision::Keep(reason) => report.sessions.push(SessionOutcome {
                session_id: id,
                region: aws.region.clone(),
                action: "kept",
                reason,
                owner,
                resources: Vec::new(),
                saved: 0.0,
            }),
        }
    }

    let mut outcomes: Vec<SessionOutcome> = doomed
        .iter()
        .map(|(id, found, reason)| SessionOutcome {
            session_id: id.clone(),
            region: aws.region.clone(),
            action: if args.dry_run { "would-remove" } else { "removed" },
            reason: reason.clone(),
            owner: found.owner(),
            resources: describe_resources(found),
            saved: saved(ctx, &aws.region, found, now),
        })
        .collect();
    if !args.dry_run && !doomed.is_empty() {
        report.errors.extend(remove(aws, &store, &doomed, now).await);
    }
    if !args.dry_run {
        for name in &stale_logs {
            match logs::delete(aws, name).await {
                Ok(()) => report.log_groups_removed.push(name.clone()),
                Err(e) => report.errors.push(e.to_string()),
            }
        }
    } else {
        report.log_groups_removed = stale_logs;
    }
    if args.purge && !args.dry_run {
        match purge_regional(aws).await {
            Ok(purged) => report.purged = purged,
            Err(e) => report.errors.push(format!("{}: {}", aws.region, crate::exit_codes::one_line(&e))),
        }
    }
    report.sessions.append(&mut outcomes);
    Ok(report)
}

enum Decision {
    Remove(String),
    Keep(String),
}

fn decide(id: &str, found: &Found, args: &CleanupArgs, now: OffsetDateTime) -> Decision {
    if args.ids.iter().any(|named| named == id) {
        return Decision::Remove("named".into());
    }
    if !args.ids.is_empty() {
        return Decision::Keep("not named".into());
    }
    if found.arming(now) {
        return Decision::Keep("its scheduled deadline is being armed by a launch right now".into());
    }
    let live = found.live();
    let instance = if live.iter().any(|i| matches!(i.state.as_str(), "pending" | "running")) {
        Instance::Live
    } else if found.instances.is_empty() {
        // Not in EC2's answer at all: gone, or (launched moments ago) not visible yet.
        Instance::Unseen
    } else if live.is_empty() {
        Instance::Gone
    } else {
        Instance::Stuck
    };
    let kept_tag = found.instances.iter().any(|i| i.kept);
    let phase = lifecycle::phase(found.record.as_ref(), instance, kept_tag, found.expires_at(), now);
    if phase.is_abandoned() {
        return Decision::Remove(phase.describe());
    }
    if args.all && instance == Instance::Live {
        return Decision::Remove("--all".into());
    }
    let left = found
        .expires_at()
        .map(|t| short_duration(Duration::from_secs((t - now).whole_seconds().max(0) as u64)))
        .unwrap_or_else(|| "?".into());
    Decision::Keep(match phase {
        Phase::Attached { pid: None } => {
            format!("attached elsewhere (no local record), {left} left; name it or pass --all")
        }
        other => format!("{}, {left} left", other.describe()),
    })
}

fn describe_resources(found: &Found) -> Vec<String> {
    let mut list = Vec::new();
    list.extend(found.live().iter().map(|i| i.instance_id.clone()));
    list.extend(found.spot_requests.iter().map(|s| s.id.clone()));
    list.extend(found.rules.iter().map(|(_, rule)| rule.clone()));
    list.extend(found.groups.iter().map(|g| g.id.clone()));
    list.extend(found.alarms.iter().map(|_| "alarm".to_string()));
    if !found.schedules.is_empty() {
        list.push(format!("{} schedule(s)", found.schedules.len()));
    }
    if found.record.is_some() {
        list.push("local record".into());
    }
    list
}

/// Time left × hourly cost, for sessions whose instance was still up.
fn saved(ctx: &Context, region: &str, found: &Found, now: OffsetDateTime) -> f64 {
    let Some(instance) = found.live().first().copied() else { return 0.0 };
    let Some(expires) = found.expires_at() else { return 0.0 };
    let left = (expires - now).whole_seconds();
    if left <= 0 {
        return 0.0;
    }
    let price = found
        .record
        .as_ref()
        .and_then(|r| r.price_per_hour)
        .or_else(|| pricing::on_demand_price(&ctx.settings, region, &instance.instance_type));
    let volume = found.record.as_ref().map(|r| r.root_volume()).unwrap_or_default();
    price.map(|p| pricing::estimate(p, Duration::from_secs(left as u64), volume).total).unwrap_or(0.0)
}

/// Removes in dependency order: instances and spot requests, then rules and alarms, then the
/// local keys and records. Every step runs even if another fails; returns the failures.
async fn remove(
    aws: &Aws,
    store: &Store,
    doomed: &[(String, Found, String)],
    now: OffsetDateTime,
) -> Vec<String> {
    let mut errors = Vec::new();
    let instance_ids: Vec<String> =
        doomed.iter().flat_map(|(_, f, _)| f.live().into_iter().map(|i| i.instance_id.clone())).collect();
    let spot_ids: Vec<String> =
        doomed.iter().flat_map(|(_, f, _)| f.spot_requests.iter().map(|s| s.id.clone())).collect();
    // Each rule is its own session's (its own group): revoking it cuts no one else off.
    let revoke = futures::future::join_all(
        doomed
            .iter()
            .flat_map(|(_, f, _)| f.rules.iter())
            .map(|(group, rule)| network::revoke_rule(aws, group, rule)),
    );
    let alarm_names: Vec<String> = doomed.iter().flat_map(|(_, f, _)| f.alarms.clone()).collect();
    let (terminated, cancelled, revoked, alarms) = tokio::join!(
        // Found by DescribeInstances moments ago: EC2 knows them, "not found" is not "gone".
        instances::terminate(aws, &instance_ids, true),
        instances::cancel_spot_requests(aws, &spot_ids),
        revoke,
        alarm::delete(aws, &alarm_names),
    );
    let ended = terminated.is_ok();
    errors.extend(terminated.err().map(|e| e.to_string()));
    errors.extend(cancelled.err().map(|e| e.to_string()));
    errors.extend(revoked.into_iter().filter_map(|r| r.err()).map(|e| e.to_string()));
    errors.extend(alarms.err().map(|e| e.to_string()));
    // Then the empty groups; one AWS still sees a shutting-down instance in stays for the next
    // run, and its scheduled sweep. Schedules go only once the instances are sure to end.
    let groups = futures::future::join_all(doomed.iter().map(|(_, f, _)| async move {
        let deletions =
            futures::future::join_all(f.groups.iter().map(|g| network::delete_security_group(aws, &g.id)))
                .await;
        let mut errors: Vec<String> = Vec::new();
        let mut group = None;
        for deletion in deletions {
            match deletion {
                Ok(d) if group != Some(GroupDeletion::StillInUse) => group = Some(d),
                Ok(_) => {}
                Err(e) => {
                    errors.push(e.to_string());
                    group = Some(GroupDeletion::StillInUse);
                }
            }
        }
        if ended {
            // A group still held keeps its sweep: it goes then, or with the next `cleanup`.
            let held = group == Some(GroupDeletion::StillInUse);
            let names: Vec<String> = f
                .schedules
                .iter()
                .filter(|a| !(held && a.job == schedule::Job::SweepGroup))
                .map(|a| a.name.clone())
                .collect();
            if let Err(e) = schedule::delete(aws, &names).await {
                errors.push(e.to_string());
            }
        }
        errors
    }));
    errors.extend(groups.await.into_iter().flatten());

    for (id, found, _) in doomed {
        if found.record.is_some() {
            match crate::ledger::record_end(
                &crate::ledger::Ledger::beside(store),
                store,
                id,
                crate::ledger::ended_by::CLEANUP,
                now,
            ) {
                Ok(Some(entry)) => {
                    for warning in crate::teardown::report_end(aws, &entry).await {
                        tracing::warn!("{warning}");
                    }
                }
                Ok(None) => {}
                Err(e) => errors.push(format!("{e:#}")),
            }
            if let Err(e) = crate::teardown::remove_ssh_host(store, id) {
                errors.push(format!("{e:#}"));
            }
            if let Err(e) = store.delete_private_key(id).and_then(|_| store.forget(id)) {
                errors.push(format!("{e:#}"));
            }
        }
    }
    errors
}

/// `--purge`: the IAM roles and instance profiles, once nothing uses them. (Security groups are
/// per session and go with their session.)
/// `--purge`, per region: the Instance Connect Endpoints `setup eice` made, where no box of the
/// tool's is left.
async fn purge_regional(aws: &Aws) -> Result<Vec<String>> {
    let (purged, waiting) = super::eice::purge(aws).await?;
    if !waiting.is_empty() {
        bail!("not purged: {}", waiting.join("; "));
    }
    Ok(purged)
}

/// `--purge`, once: the IAM roles (global), each only when no instance in any enabled region of
/// the account runs with it, and no schedule in any region runs as it. A region that cannot be
/// checked keeps them.
async fn purge_global(ctx: &Context, aws: &Aws, account: &str) -> Result<Vec<String>> {
    let s = &ctx.settings;
    let regions = enabled_regions(aws).await?;
    let clients = futures::future::join_all(regions.iter().map(|region| async move {
        if *region == aws.region { aws.clone() } else { aws.in_region(&s.aws, region).await }
    }))
    .await;
    let mut purged = Vec::new();
    let mut refusals = Vec::new();
    for name in [s.iam_role_name.clone(), iam::ssm_role_name(&s.iam_role_name)] {
        let profile_arn = format!("arn:aws:iam::{account}:instance-profile/{name}");
        let checks = clients.iter().map(|regional| profile_users(regional, &profile_arn));
        match first_refusal(futures::future::join_all(checks).await) {
            None => {
                if iam::delete_instance_profile_and_role(aws, &name).await? {
                    purged.push(format!("IAM role and instance profile {name}"));
                }
            }
            Some(why) => refusals.push(format!("IAM role and instance profile {name} {why}")),
        }
    }
    // The schedules' role, once no schedule of the tool's is left to run as it.
    let scheduler_role = iam::scheduler_role_name(&s.iam_role_name);
    let listed = futures::future::join_all(clients.iter().map(schedule::list_ours)).await;
    let mut left = 0;
    for (region, found) in regions.iter().zip(listed) {
        match found {
            Ok(found) => left += found.len(),
            Err(e) => {
                refusals.push(format!(
                    "IAM role {scheduler_role}: the schedules of {region} could not be listed ({e})"
                ));
                left = usize::MAX;
                break;
            }
        }
    }
    match left {
        0 => {
            if iam::delete_scheduler_role(aws, &s.iam_role_name).await? {
                purged.push(format!("IAM role {scheduler_role}"));
            }
        }
        usize::MAX => {}
        n => refusals.push(format!(
            "IAM role {scheduler_role} still used by {n} schedule(s) of live sessions: end them first, or run `cleanup --all --purge --all-regions`"
        )),
    }
    if !refusals.is_empty() {
        bail!("not purged: {}", refusals.join("; "));
    }
    Ok(purged)
}

/// The first region's reason to keep a shared resource, if any.
fn first_refusal(checks: Vec<Result<()>>) -> Option<String> {
    checks.into_iter().find_map(|c| c.err()).map(|e| crate::exit_codes::one_line(&e))
}

/// Whether instances in `aws`'s region still run with the instance profile `arn`: waits for those
/// shutting down (bounded); an error names the ones that block.
async fn profile_users(aws: &Aws, arn: &str) -> Result<()> {
    let start = tokio::time::Instant::now();
    loop {
        let users = instances::users_of(aws, "iam-instance-profile.arn", arn).await?;
        let blocking: Vec<&InstanceInfo> = users.iter().filter(|i| i.state != "shutting-down").collect();
        if !blocking.is_empty() {
            let named: Vec<String> = blocking
                .iter()
                .map(|i| {
                    format!(
                        "{} in {} (session {})",
                        i.instance_id,
                        aws.region,
                        i.session_id.as_deref().unwrap_or("not ours")
                    )
                })
                .collect();
            bail!("still used by {}: terminate it first, or run `cleanup --all --purge`", named.join(", "));
        }
        if users.is_empty() {
            return Ok(());
        }
        if start.elapsed() > PURGE_WAIT {
            bail!(
                "instances in {} are still shutting down after {}: run `cleanup --purge` again shortly",
                aws.region,
                short_duration(PURGE_WAIT)
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// The sweep `launch` runs before it provisions: local records only (so it costs no AWS call
/// when there is nothing to do), this region only, bounded in time. Returns what it removed.
pub async fn quick_sweep(ctx: &Context, aws: &Aws) -> Vec<String> {
    let store = Store::new(ctx.settings.sessions_dir());
    let now = session::clock().now();
    // Only this account's records: another account's sessions are not ours to judge.
    let Ok(caller) = aws.caller().await else { return Vec::new() };
    let dead: Vec<SessionRecord> = store
        .in_scope(&caller.scope(&aws.region))
        .into_iter()
        .filter(|r| r.ended_at.is_none())
        .filter(|r| {
            let expires = session::parse_rfc3339(&r.expires_at);
            lifecycle::phase(Some(r), Instance::NotAsked, false, expires, now).is_abandoned()
        })
        .collect();
    // Groups that AWS still held when their session was torn down (its instance shutting down).
    let pending_groups: Vec<(String, String)> = store
        .in_scope(&caller.scope(&aws.region))
        .into_iter()
        .filter(|r| r.ended_at.is_some())
        .filter_map(|r| Some((r.id, r.security_group_id?)))
        .collect();
    for (id, group) in pending_groups {
        if let Ok(network::GroupDeletion::Deleted) = network::delete_security_group(aws, &group).await {
            tracing::info!("deleted security group {group} of ended session {id}");
            let _ = store.update(&id, |r| r.security_group_id = None);
            // Its scheduled sweep (brought forward at teardown) has nothing left to do.
            let sweep = schedule::schedule_name(&id, schedule::Job::SweepGroup);
            if let Err(e) = schedule::delete(aws, &[sweep]).await {
                tracing::warn!("{e}");
            }
        }
    }
    if dead.is_empty() {
        return Vec::new();
    }
    let sweep = async {
        let mut removed = Vec::new();
        for record in dead {
            let resources = crate::teardown::SessionResources::from_record(&record);
            let report = crate::teardown::teardown(aws, &store, &resources, "cleanup", &SystemClock).await;
            if report.is_clean() {
                let _ = store.forget(&record.id);
                removed.push(record.id);
            }
        }
        removed
    };
    tokio::time::timeout(Duration::from_secs(15), sweep).await.unwrap_or_default()
}

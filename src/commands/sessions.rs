//! `list`, `status ID` and `terminate ID`: sessions as AWS tags and local records see them.

use anyhow::{Result, bail};
use serde::Serialize;

use super::Context;
use super::view::{SessionView, list_table};
use crate::aws::{Aws, alarm, identity, instances, network, schedule};
use crate::error::ExitStatus;
use crate::session::store::{SessionRecord, Store};
use crate::session::{Clock, SystemClock};
use crate::teardown::{self, SessionResources, TeardownReport};

#[derive(Serialize)]
struct ListReport {
    region: String,
    sessions: Vec<SessionView>,
    /// Live sessions this machine holds for other AWS accounts (not shown, never touched).
    other_accounts: usize,
}

/// One DescribeInstances (filtered by tags), one GetCallerIdentity and one ListSchedules, at
/// once, whatever the number of sessions.
pub async fn list(ctx: &Context) -> Result<ExitStatus> {
    let aws = ctx.aws().await?;
    let store = Store::new(ctx.settings.sessions_dir());
    let every_state = instances::Query { include_terminated: true, ..Default::default() };
    let (caller, found, armed) = tokio::join!(
        async { identity::me(&aws, ctx.settings.owner.as_deref()).await.map_err(anyhow::Error::from) },
        async { instances::find(&aws, every_state).await.map_err(anyhow::Error::from) },
        schedule::list_ours(&aws),
    );
    let (caller, found) = (caller?, found?);
    // Not knowing whether a schedule is armed does not hide the sessions: shown as "?".
    let armed: Option<Vec<String>> = armed
        .ok()
        .map(|list| list.into_iter().filter(|a| a.job == schedule::Job::End).map(|a| a.session_id).collect());
    // The same answer settles sessions that ended while no CLI ran: no extra call.
    let scope = caller.scope(&aws.region);
    ctx.settle_known(&aws, &scope, &found).await;
    let found: Vec<_> = found.into_iter().filter(|i| i.state != "terminated").collect();
    let records = store.in_scope(&scope);
    let elsewhere = store.elsewhere(&scope);
    let now = SystemClock.now();
    let sessions: Vec<SessionView> = found
        .iter()
        .filter(|i| i.owner.as_deref().is_some_and(|o| caller.is_mine(o)))
        .map(|i| {
            let record = records.iter().find(|r| Some(&r.id) == i.session_id.as_ref());
            let mut view = SessionView::build(record, Some(i), now);
            view.deadline_schedule_armed = armed.as_ref().map(|ids| ids.contains(&view.session_id));
            view
        })
        .collect();
    let report = ListReport { region: aws.region.clone(), sessions, other_accounts: elsewhere };
    ctx.printer.result(&report, || {
        let mut text = if report.sessions.is_empty() {
            format!("no live sessions in {}", report.region)
        } else {
            list_table(&report.sessions)
        };
        if report.other_accounts > 0 {
            text.push_str(&format!(
                "\n({} session(s) of other AWS accounts are recorded on this machine; switch credentials to see them)",
                report.other_accounts
            ));
        }
        text
    });
    Ok(ExitStatus::Success)
}

pub async fn status(ctx: &Context, id: &str) -> Result<ExitStatus> {
    let aws = ctx.aws().await?;
    ctx.settle(&aws).await;
    let store = Store::new(ctx.settings.sessions_dir());
    let record = store.load(id)?;
    let query = instances::Query { session_id: Some(id), include_terminated: true, ..Default::default() };
    let found = instances::find(&aws, query).await?;
    if record.is_none() && found.is_empty() {
        bail!(
            "no session {id} in {} (neither AWS nor this machine knows it); `ephemeral-admin list` shows live ones",
            aws.region
        );
    }
    let mut view = SessionView::build(record.as_ref(), found.first(), SystemClock.now());
    if matches!(view.state.as_str(), "pending" | "running") {
        let at = schedule::deadline_of(&aws, id).await?;
        view.deadline_schedule_armed = Some(at.is_some());
        view.deadline_schedule_at = at.map(crate::session::rfc3339);
    }
    ctx.printer.result(&view, || view.describe());
    Ok(ExitStatus::Success)
}

pub async fn terminate(ctx: &Context, id: &str, force: bool) -> Result<ExitStatus> {
    let aws = ctx.aws().await?;
    let store = Store::new(ctx.settings.sessions_dir());
    let record = store.load(id)?;
    let (resources, owner) = discover(&aws, id, record.as_ref()).await?;
    if !force {
        refuse_anothers(&aws, ctx, id, &owner).await?;
    }
    if record.is_none()
        && resources.instance_ids.is_empty()
        && resources.rule_ids.is_empty()
        && resources.alarm_names.is_empty()
    {
        bail!("no session {id} in {}: nothing to terminate", aws.region);
    }
    let report = teardown::teardown(&aws, &store, &resources, "terminate", &SystemClock).await;
    print_teardown(ctx, &report);
    Ok(if report.is_clean() { ExitStatus::Success } else { ExitStatus::Failure })
}

pub fn print_teardown(ctx: &Context, report: &TeardownReport) {
    ctx.printer.result(report, || report.summary());
}

/// Who launched a session, as its resources' tags say: the owner-id AWS enforces and the owner.
#[derive(Debug, Default)]
pub struct SessionOwner {
    pub owner_id: Option<String>,
    pub owner: Option<String>,
}

/// The tool never ends another person's box unless told to (`--force`), even where IAM would
/// let it (a team admin's policy): one line naming the owner, exit 2, nothing touched.
async fn refuse_anothers(aws: &Aws, ctx: &Context, id: &str, owner: &SessionOwner) -> Result<()> {
    let caller = crate::aws::identity::me(aws, ctx.settings.owner.as_deref()).await?;
    if caller.may_change(owner.owner_id.as_deref(), owner.owner.as_deref()) {
        return Ok(());
    }
    let whose = owner.owner_id.as_deref().or(owner.owner.as_deref()).unwrap_or("someone else");
    // The same role under another session name is another aws:userid to AWS.
    let same_role = owner.owner_id.as_deref().and_then(|o| o.split_once(':')).map(|(role, _)| role)
        == caller.user_id.split_once(':').map(|(role, _)| role)
        && caller.user_id.contains(':');
    let hint = if same_role {
        " (it is your role under another session name: set `role_session_name` in your AWS profile to keep one)"
    } else {
        ""
    };
    Err(crate::error::UsageError::new(format!(
        "session {id} was launched by {whose}, not by you ({}){hint}: `terminate {id} --force` ends it anyway, with a team admin's permissions (`ephemeral-admin policy --team-admin`)",
        caller.user_id
    ))
    .into())
}

/// Everything AWS and the local record know a session owns: its live instances, its security
/// group and SSH rules, its alarms (all by tag, at once), and who launched it.
pub async fn discover(
    aws: &Aws,
    id: &str,
    record: Option<&SessionRecord>,
) -> Result<(SessionResources, SessionOwner)> {
    let query = instances::Query { session_id: Some(id), ..Default::default() };
    let (found, groups, rules, alarms) = tokio::try_join!(
        async { instances::find(aws, query).await.map_err(anyhow::Error::from) },
        async { network::own_groups(aws).await.map_err(anyhow::Error::from) },
        async { network::own_ssh_rules(aws).await.map_err(anyhow::Error::from) },
        async { alarm::list_ours(aws).await.map_err(anyhow::Error::from) },
    )?;
    let group_id = record
        .and_then(|r| r.security_group_id.clone())
        .or_else(|| groups.iter().find(|g| g.session_id.as_deref() == Some(id)).map(|g| g.id.clone()));
    let mut resources = record.map(SessionResources::from_record).unwrap_or_default();
    resources.session_id = id.to_string();
    resources.merge(SessionResources {
        session_id: id.to_string(),
        instance_ids: found.iter().map(|i| i.instance_id.clone()).collect(),
        spot_request_ids: found.iter().filter_map(|i| i.spot_request_id.clone()).collect(),
        security_group_id: group_id,
        rule_ids: rules
            .iter()
            .filter(|r| r.session_id.as_deref() == Some(id))
            .map(|r| r.rule_id.clone())
            .collect(),
        alarm_names: alarms
            .iter()
            .filter(|a| a.session_id.as_deref() == Some(id))
            .map(|a| a.name.clone())
            .collect(),
        // Schedules are ours by name (they carry no tags); deleting one that is not there is fine.
        schedule_names: schedule::Job::ALL.into_iter().map(|job| schedule::schedule_name(id, job)).collect(),
        schedule_role_arn: None,
        ssh_config_file: None,
        launched_at: found.iter().find_map(|i| i.launch_time.clone()),
    });
    let group = groups.iter().find(|g| g.session_id.as_deref() == Some(id));
    let owner = SessionOwner {
        owner_id: found
            .iter()
            .find_map(|i| i.owner_id.clone())
            .or_else(|| group.and_then(|g| g.owner_id.clone())),
        owner: found.iter().find_map(|i| i.owner.clone()).or_else(|| group.and_then(|g| g.owner.clone())),
    };
    Ok((resources, owner))
}

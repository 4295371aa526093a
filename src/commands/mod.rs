//! One module per subcommand, each a thin script over the modules that do the work.

pub(crate) mod attach;
mod cleanup;
mod completions;
mod connect;
mod cost;
mod cp;
mod doctor;
mod eice;
mod extend;
mod hostkey;
mod init;
mod launch;
mod policy;
mod prices;
mod roles;
mod sessions;
mod setup;
mod view;

pub use view::SessionView;

use anyhow::Result;

use crate::aws::Aws;
use crate::aws::instances::InstanceInfo;
use crate::cli::{Cli, Command};
use crate::error::ExitStatus;
use crate::ledger;
use crate::output::Printer;
use crate::session::{self, store::Store};
use crate::settings::Settings;

/// What every command gets: validated settings and the printer.
pub struct Context {
    pub settings: Settings,
    pub printer: Printer,
}

impl Context {
    /// AWS clients for the configured region (reads local config only; no network call).
    pub async fn aws(&self) -> Result<Aws> {
        Ok(Aws::connect(&self.settings.aws).await?)
    }

    /// Writes the ledger lines of sessions that ended on their own (idle, deadline, spot) while
    /// no CLI ran, in every region this machine has records for (a stale record elsewhere would
    /// otherwise count against the budget forever). Costs one AWS call per region with something
    /// to settle, none otherwise.
    pub async fn settle(&self, aws: &Aws) {
        let store = Store::new(self.settings.sessions_dir());
        let caller = match aws.caller().await {
            Ok(caller) => caller,
            Err(e) => return self.printer.warn(format!("could not settle ended sessions: {e}")),
        };
        let regions = ledger::unsettled_regions(&store, caller.partition(), &caller.account);
        let settles = regions.iter().map(|region| {
            let store = &store;
            async move {
                let regional = match *region == aws.region {
                    true => aws.clone(),
                    false => aws.in_region(&self.settings.aws, region).await,
                };
                let ledger = crate::ledger::Ledger::beside(store);
                let settled = ledger::settle(&regional, store, &ledger, session::clock().as_ref()).await;
                self.report_settled(&regional, settled).await;
            }
        });
        futures::future::join_all(settles).await;
    }

    /// [`Context::settle`] from instances the command described anyway (every state): no AWS call.
    pub async fn settle_known(&self, aws: &Aws, scope: &session::Scope, found: &[InstanceInfo]) {
        let store = Store::new(self.settings.sessions_dir());
        let settled = ledger::settle_known(
            scope,
            found,
            &store,
            &crate::ledger::Ledger::beside(&store),
            session::clock().as_ref(),
        );
        self.report_settled(aws, settled).await;
    }

    /// Publishes the settled sessions' metrics and end events; a failure is only a warning.
    async fn report_settled(&self, aws: &Aws, settled: Result<Vec<ledger::Entry>>) {
        let store = Store::new(self.settings.sessions_dir());
        match settled {
            Ok(entries) => {
                for entry in entries {
                    // `ssh NAME` must not point at a box that is gone.
                    if let Err(e) = crate::teardown::remove_ssh_host(&store, &entry.session_id) {
                        self.printer.warn(format!("{e:#}"));
                    }
                    tracing::info!("session {} ended ({}) while away", entry.session_id, entry.ended_by);
                    for warning in crate::teardown::report_end(aws, &entry).await {
                        tracing::warn!("{warning}");
                    }
                }
            }
            Err(e) => self.printer.warn(format!("could not settle ended sessions: {e:#}")),
        }
    }
}

/// The caller's live sessions (instance not ending or gone) in the region, newest first; only
/// those named `name` when one is given.
pub async fn live_sessions(
    aws: &Aws,
    caller: &crate::aws::identity::Caller,
    name: Option<&str>,
) -> Result<Vec<InstanceInfo>> {
    let query = crate::aws::instances::Query { name, ..Default::default() };
    let found = crate::aws::instances::find(aws, query).await?;
    Ok(found
        .into_iter()
        .filter(|i| i.state != "shutting-down" && i.session_id.is_some())
        .filter(|i| i.owner.as_deref().is_some_and(|o| caller.is_mine(o)))
        .collect())
}

/// The session id a user meant: a session id as typed; the session an instance id belongs to
/// (from the local record, else from the instance's tags); the caller's live session with that
/// name; or, for `last`, the caller's most recently launched live session in the region. Bad
/// syntax, an unknown or ambiguous name, and `last` with no live session are exit 2; an
/// instance that is not one of ours is an error that says so.
pub async fn resolve_session(ctx: &Context, text: &str) -> Result<String> {
    match session::SessionRef::parse(text)? {
        session::SessionRef::Id(id) => Ok(id),
        session::SessionRef::Name(name) => {
            let aws = ctx.aws().await?;
            let caller = crate::aws::identity::whoami(&aws).await?;
            let found = live_sessions(&aws, &caller, Some(&name)).await?;
            let mut ids: Vec<String> = found.iter().filter_map(|i| i.session_id.clone()).collect();
            ids.sort();
            ids.dedup();
            match ids.as_slice() {
                [id] => Ok(id.clone()),
                [] => Err(crate::error::UsageError::new(format!(
                    "no live session named {name:?} in {}: `ephemeral-admin list` shows your sessions",
                    aws.region
                ))
                .into()),
                many => Err(crate::error::UsageError::new(format!(
                    "the name {name:?} is ambiguous in {}: sessions {} carry it; use a session id",
                    aws.region,
                    many.join(", ")
                ))
                .into()),
            }
        }
        session::SessionRef::Last => {
            let aws = ctx.aws().await?;
            let caller = crate::aws::identity::whoami(&aws).await?;
            let found = live_sessions(&aws, &caller, None).await?;
            // Newest first; launch times have whole seconds, and among sessions launched in the
            // same second the one EC2 lists last is the newest.
            let live: Vec<&InstanceInfo> = found.iter().collect();
            let newest = live.first().map(|i| i.launch_time.clone());
            live.iter()
                .rev()
                .find(|i| Some(&i.launch_time) == newest.as_ref())
                .and_then(|i| i.session_id.clone())
                .ok_or_else(|| {
                    crate::error::UsageError::new(format!(
                        "`last`: you have no live session in {}; `ephemeral-admin launch` starts one",
                        aws.region
                    ))
                    .into()
                })
        }
        session::SessionRef::Instance(instance_id) => {
            let store = Store::new(ctx.settings.sessions_dir());
            if let Some(record) =
                store.all().into_iter().find(|r| r.instance_id.as_deref() == Some(&instance_id))
            {
                return Ok(record.id);
            }
            let aws = ctx.aws().await?;
            match crate::aws::instances::describe(&aws, &instance_id).await? {
                Some(info) => info.session_id.ok_or_else(|| {
                    anyhow::anyhow!(
                        "instance {instance_id} is not an ephemeral-admin box (it has no session tag)"
                    )
                }),
                None => Err(crate::error::UsageError::new(format!(
                    "no instance {instance_id} in {}: check the id and --region",
                    aws.region
                ))
                .into()),
            }
        }
    }
}

pub async fn dispatch(cli: Cli, settings: Settings) -> Result<ExitStatus> {
    let printer = Printer::new(&settings);
    let ctx = Context { settings, printer };
    match cli.command {
        Command::Doctor => doctor::run(&ctx).await,
        Command::Setup(args) => match &args.what {
            crate::cli::SetupWhat::Eice(args) => eice::setup(&ctx, args).await,
            crate::cli::SetupWhat::Roles => roles::setup(&ctx).await,
        },
        Command::Prices(_) => prices::run(&ctx).await,
        Command::Policy(args) => policy::run(&ctx, &args).await,
        Command::Completions(args) => completions::run(args),
        Command::Init(args) => init::run(&ctx, args),
        Command::Launch(args) => launch::run(&ctx, &args).await,
        Command::Connect(args) => connect::connect(&ctx, &args).await,
        Command::Cp(args) => cp::run(&ctx, &args).await,
        Command::Extend(args) => extend::run(&ctx, &args).await,
        Command::List => sessions::list(&ctx).await,
        Command::Status(args) => sessions::status(&ctx, &resolve_session(&ctx, &args.id).await?).await,
        Command::Terminate(args) => {
            sessions::terminate(&ctx, &resolve_session(&ctx, &args.session.id).await?, args.force).await
        }
        Command::Cleanup(args) => cleanup::run(&ctx, &args).await,
        Command::Cost(args) => cost::cost(&ctx, &args).await,
        Command::Dashboard => cost::dashboard(&ctx).await,
        Command::Budget(args) => cost::budget(&ctx, &args).await,
        Command::Proxy(args) => connect::proxy(&ctx, &resolve_session(&ctx, &args.id).await?).await,
        Command::SshConfig(args) => {
            connect::ssh_config(&ctx, &resolve_session(&ctx, &args.session.id).await?, args.install).await
        }
    }
}

//! One module per subcommand, each a thin script over the modules that do the work.

mod attach;
mod cleanup;
mod completions;
mod connect;
mod cost;
mod doctor;
mod extend;
mod init;
mod launch;
mod policy;
mod prices;
mod sessions;
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
        match settled {
            Ok(entries) => {
                for entry in entries {
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

/// The session id a user meant: a session id as typed, or the session an instance id belongs to
/// (from the local record, else from the instance's tags). Bad syntax is exit 2; an instance
/// that is not one of ours is an error that says so.
pub async fn resolve_session(ctx: &Context, text: &str) -> Result<String> {
    match session::SessionRef::parse(text)? {
        session::SessionRef::Id(id) => Ok(id),
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
        Command::Prices(_) => prices::run(&ctx).await,
        Command::Policy(args) => policy::run(&ctx, &args).await,
        Command::Completions(args) => completions::run(args),
        Command::Init(args) => init::run(&ctx, args),
        Command::Launch(args) => launch::run(&ctx, &args).await,
        Command::Connect(args) => connect::connect(&ctx, &args).await,
        Command::Extend(args) => extend::run(&ctx, &args).await,
        Command::List => sessions::list(&ctx).await,
        Command::Status(args) => sessions::status(&ctx, &resolve_session(&ctx, &args.id).await?).await,
        Command::Terminate(args) => sessions::terminate(&ctx, &resolve_session(&ctx, &args.id).await?).await,
        Command::Cleanup(args) => cleanup::run(&ctx, &args).await,
        Command::Cost(args) => cost::cost(&ctx, &args).await,
        Command::Dashboard => cost::dashboard(&ctx).await,
        Command::Budget(args) => cost::budget(&ctx, &args).await,
        Command::SshConfig(args) => connect::ssh_config(&ctx, &resolve_session(&ctx, &args.id).await?).await,
    }
}

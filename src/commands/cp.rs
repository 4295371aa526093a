//! `cp SRC… DST`: files and directories between this machine and a running session's box, over
//! SFTP on the session's pinned SSH connection. Exit 0 when everything arrived, 1 when anything
//! failed (each failure named on its own line), 2 for input that cannot mean a copy.

use std::time::Instant;

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::Context;
use super::attach::Route;
use crate::cli::CpArgs;
use crate::error::{ExitStatus, Interrupted, UsageError};
use crate::files::{self, BoxEnd, Direction, Outcome, Transfer};
use crate::signals::Signals;

#[derive(Serialize)]
struct CpResult {
    session_id: String,
    direction: Direction,
    #[serde(flatten)]
    outcome: Outcome,
    seconds: f64,
}

pub async fn run(ctx: &Context, args: &CpArgs) -> Result<ExitStatus> {
    let transfer = Transfer::parse(&args.sources, &args.dest)?;
    if let Transfer::Upload { sources, .. } = &transfer {
        check_local_sources(sources, args.recursive)?;
    }
    let id = super::resolve_session(ctx, transfer.session()).await?;
    let (store, mut record) = super::connect::running_session(ctx, &id).await?;
    let signals = Signals::install().context("listening for Ctrl-C")?;
    let route = Route::resolve(ctx, &record, args.connect, args.proxy_command.as_deref());
    let (_, session) = super::hostkey::open(ctx, &store, &mut record, &route, &signals).await?;
    let started = Instant::now();
    let label = transfer.session().to_string();
    let copying = async {
        let sftp = session.sftp().await?;
        let remote = BoxEnd { sftp: &sftp, label: &label, user: &record.user, lasts: true };
        let outcome = match &transfer {
            Transfer::Upload { sources, dest, .. } => {
                let bar = ctx.printer.transfer_bar(format!("{label}:{dest}"));
                files::upload(&remote, sources, dest, args.recursive, args.preserve, bar).await
            }
            Transfer::Download { sources, dest, .. } => {
                let bar = ctx.printer.transfer_bar(dest.display().to_string());
                files::download(&remote, sources, dest, args.recursive, args.preserve, bar).await
            }
        };
        let _ = sftp.close().await;
        anyhow::Ok(outcome)
    };
    let outcome = tokio::select! {
        outcome = copying => outcome,
        stop = signals.stopped() => Err(Interrupted {
            what: stop.name(),
            done: "stopped copying; the file being copied is incomplete".into(),
            code: stop.exit_code(),
        }.into()),
    };
    session.close().await;
    let outcome = outcome?;
    let direction = match transfer {
        Transfer::Upload { .. } => Direction::Upload,
        Transfer::Download { .. } => Direction::Download,
    };
    let seconds = started.elapsed().as_secs_f64();
    report(ctx, CpResult { session_id: id, direction, outcome, seconds })
}

/// Local sources are checked before anything is contacted: a directory without `-r` is bad input.
fn check_local_sources(sources: &[std::path::PathBuf], recursive: bool) -> Result<()> {
    for source in sources {
        if !recursive && std::fs::metadata(source).is_ok_and(|m| m.is_dir()) {
            return Err(UsageError::new(format!(
                "{}: is a directory; pass -r to copy it with everything in it",
                source.display()
            ))
            .into());
        }
    }
    Ok(())
}

/// Prints the summary (JSON, or a line on stderr) and turns failures into exit 1.
fn report(ctx: &Context, result: CpResult) -> Result<ExitStatus> {
    let failures = result.outcome.failures.clone();
    if ctx.printer.json() {
        ctx.printer.result(&result, String::new);
    } else if failures.is_empty() || result.outcome.files > 0 {
        let files = result.outcome.files;
        ctx.printer.status(format!(
            "copied {files} file{} ({}) in {:.1}s",
            if files == 1 { "" } else { "s" },
            indicatif::BinaryBytes(result.outcome.bytes),
            result.seconds
        ));
    }
    match failures.as_slice() {
        [] => Ok(ExitStatus::Success),
        [one] => Err(anyhow::anyhow!("{one}")),
        many => {
            for line in many {
                crate::output::error_line(line);
            }
            Err(anyhow::anyhow!(
                "{} of the paths above could not be copied; fix them and run the same cp again",
                many.len()
            ))
        }
    }
}

/// `launch --upload`: copies each LOCAL to its REMOTE on the freshly connected box, before the
/// shell or command starts. Any failure fails the launch, which then tears the box down (so the
/// messages do not suggest looking around on it).
pub(super) async fn upload_before(
    ctx: &Context,
    session: &crate::ssh::Session,
    record: &crate::session::store::SessionRecord,
    uploads: &[files::spec::Upload],
    signals: &Signals,
) -> Result<()> {
    if uploads.is_empty() {
        return Ok(());
    }
    let copying = async {
        let sftp = session.sftp().await?;
        let remote = BoxEnd { sftp: &sftp, label: &record.id, user: &record.user, lasts: false };
        let mut total = Outcome::default();
        for upload in uploads {
            let bar = ctx.printer.transfer_bar(format!("{}:{}", record.id, upload.remote));
            let done =
                files::upload(&remote, std::slice::from_ref(&upload.local), &upload.remote, true, false, bar)
                    .await;
            total.files += done.files;
            total.bytes += done.bytes;
            total.failures.extend(done.failures);
        }
        let _ = sftp.close().await;
        anyhow::Ok(total)
    };
    let total = tokio::select! {
        total = copying => total?,
        stop = signals.stopped() => return Err(Interrupted {
            what: stop.name(),
            done: "stopped while uploading".into(),
            code: stop.exit_code(),
        }.into()),
    };
    match total.failures.as_slice() {
        [] => {
            let files = total.files;
            ctx.printer.status(format!(
                "uploaded {files} file{} ({})",
                if files == 1 { "" } else { "s" },
                indicatif::BinaryBytes(total.bytes)
            ));
            Ok(())
        }
        [one] => Err(anyhow::anyhow!("--upload failed: {one}; fix --upload and launch again")),
        many => {
            for line in many {
                crate::output::error_line(line);
            }
            Err(anyhow::anyhow!("--upload failed for the {} paths above; nothing was run", many.len()))
        }
    }
}

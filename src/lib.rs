//! ephemeral-admin: a throw-away AWS admin box in one command, and the guarantee that the box and
//! everything made for it are gone afterwards.
//!
//! The binary is a thin shell over this library so that integration tests can reach the pieces.
//! Start at [`run`]: it resolves [`settings`] (no AWS call before they validate), then hands the
//! command to its module in [`commands`].

pub mod aws;
pub mod cli;
pub mod commands;
pub mod crash;
pub mod error;
pub mod exit_codes;
pub mod files;
pub mod ip;
pub mod keys;
pub mod ledger;

pub mod logging;
pub mod output;
pub mod pricing;
pub mod session;
pub mod settings;
pub mod signals;
pub mod ssh;
pub mod teardown;
pub mod userdata;

use cli::Cli;
use error::ExitStatus;

/// Resolves settings, then runs the command on a single-threaded tokio runtime: the work is
/// waiting on AWS and SSH, and one thread keeps the SSH data path free of cross-thread wake-ups
/// (with two workers, `connect -- cat` ran at 0.78x OpenSSH's throughput; see README, Speed).
/// Key generation and anything else that blocks goes to the blocking pool.
pub fn run(cli: Cli) -> anyhow::Result<ExitStatus> {
    let settings = settings::resolve(&cli, &settings::ProcessEnv)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(commands::dispatch(cli, settings))
}

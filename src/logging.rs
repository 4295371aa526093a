//! Logging to stderr through `tracing`: warnings by default, more with -v, errors only with -q.
//!
//! `RUST_LOG` overrides the level for anyone debugging the SDK itself.

use tracing_subscriber::EnvFilter;

pub fn init(verbose: u8, quiet: bool) {
    let ours = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        (false, _) => "trace",
    };
    let theirs = if verbose >= 3 { "debug" } else { "error" };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{theirs},ephemeral_admin={ours}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::output::Stream::Stderr.writer())
        .with_target(verbose >= 2)
        .without_time()
        .try_init();
}

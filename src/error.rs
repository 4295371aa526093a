//! Exit codes and the few error kinds that choose one.
//!
//! Everything else is an `anyhow::Error` whose chain `main` prints once, on one line. An error
//! that should end with a code other than 1 carries one of the types below somewhere in its
//! chain; [`crate::exit_codes::exit_code_for`] finds it. This module imports nothing of ours, so
//! every layer can use it.

use std::process::ExitCode;

/// How a run ended, as the shell will see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// 0: everything worked.
    Success,
    /// 1: something failed; the message says what.
    Failure,
    /// 2: bad flags, environment or config; nothing was created.
    Usage,
    /// 3: every instance type, zone and market in the fallback chain was out of capacity.
    CapacityExhausted,
    /// 4: the launch would exceed the monthly budget and `--over-budget` was not given.
    OverBudget,
    /// 130: interrupted by Ctrl-C.
    Interrupted,
    /// The remote command's own exit status, passed through.
    Remote(u8),
}

impl ExitStatus {
    pub fn code(self) -> u8 {
        match self {
            ExitStatus::Success => 0,
            ExitStatus::Failure => 1,
            ExitStatus::Usage => 2,
            ExitStatus::CapacityExhausted => 3,
            ExitStatus::OverBudget => 4,
            ExitStatus::Interrupted => 130,
            ExitStatus::Remote(code) => code,
        }
    }
}

impl From<ExitStatus> for ExitCode {
    fn from(status: ExitStatus) -> Self {
        ExitCode::from(status.code())
    }
}

/// Bad input: flags, environment, config file. Exit 2, and no AWS call was made.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl UsageError {
    pub fn new(message: impl Into<String>) -> Self {
        UsageError(message.into())
    }
}

/// Every candidate in the fallback chain failed for lack of capacity.
#[derive(Debug, thiserror::Error)]
#[error("no capacity anywhere: tried {tried}; try other --instance-type values, another --region, or later")]
pub struct CapacityExhausted {
    /// What was tried, in order, e.g. "t3.small spot us-east-1c (InsufficientInstanceCapacity)".
    pub tried: String,
}

/// The budget guard refused the launch.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OverBudget(pub String);

/// The user pressed Ctrl-C (or the process got SIGTERM/SIGHUP) and we stopped cleanly.
#[derive(Debug, thiserror::Error)]
#[error("{what}; {done}")]
pub struct Interrupted {
    /// "interrupted", "terminated (SIGTERM)", ...
    pub what: &'static str,
    /// What was cleaned up.
    pub done: String,
    /// 130 for Ctrl-C, 128 + the signal number otherwise.
    pub code: u8,
}

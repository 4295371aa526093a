//! From a failed run to what the shell sees: the exit status ([`exit_code_for`]) and the one
//! line `main` prints ([`report`]). Lives above `error` and `aws` so that both stay free of each
//! other: the error types are declared low, the decision about them is made here.

use crate::aws::AwsError;
use crate::aws::network::NetworkError;
use crate::error::{CapacityExhausted, ExitStatus, Interrupted, OverBudget, UsageError};

/// The exit status an error should produce.
pub fn exit_code_for(error: &anyhow::Error) -> ExitStatus {
    for cause in error.chain() {
        if cause.is::<UsageError>() {
            return ExitStatus::Usage;
        }
        // The caller's environment, not our input, but the same promise: nothing was created.
        if cause.downcast_ref::<AwsError>().is_some_and(|e| e.is_environment())
            || cause.downcast_ref::<NetworkError>().is_some_and(NetworkError::is_bad_input)
        {
            return ExitStatus::Usage;
        }
        if cause.is::<CapacityExhausted>() {
            return ExitStatus::CapacityExhausted;
        }
        if cause.is::<OverBudget>() {
            return ExitStatus::OverBudget;
        }
        if let Some(stop) = cause.downcast_ref::<Interrupted>() {
            return if stop.code == 130 { ExitStatus::Interrupted } else { ExitStatus::Remote(stop.code) };
        }
    }
    ExitStatus::Failure
}

/// What `main` prints for a failed run. One line: our own context down to the first error that
/// already says what to do (an [`AwsError`]: AWS's answer turned into a sentence); the SDK's
/// chain below it (often kilobytes of HTTP detail) appears only with `-v`, one cause per line.
pub fn report(error: &anyhow::Error, verbose: bool) -> String {
    let line = one_line(error);
    if !verbose {
        return line;
    }
    let mut text = line;
    for cause in error.chain().skip_while(|c| !c.is::<AwsError>()).skip(1) {
        text.push_str(&format!("\n  caused by: {cause}"));
    }
    text
}

/// The chain on one line, "what happened: because: because", stopping after an AWS error (its
/// SDK causes are noise to the reader; `report` with `-v` shows them).
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    let explained = error.chain().position(|c| c.is::<AwsError>());
    for (i, cause) in error.chain().enumerate().take(explained.map_or(usize::MAX, |n| n + 1)) {
        let text = cause.to_string();
        if i > 0 {
            // Some SDK errors repeat their source in their own message; don't print it twice.
            if line.contains(&text) {
                continue;
            }
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

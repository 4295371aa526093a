//! `completions SHELL`: shell completion scripts from the clap definition.

use anyhow::Result;
use clap::CommandFactory;

use crate::cli::{Cli, CompletionsArgs};
use crate::error::ExitStatus;

pub fn run(args: CompletionsArgs) -> Result<ExitStatus> {
    let mut command = Cli::command();
    // Through a buffer: clap_complete panics on a failed write (`head -1` closing the pipe).
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "ephemeral-admin", &mut script);
    crate::output::Stream::Stdout.put(&script);
    Ok(ExitStatus::Success)
}

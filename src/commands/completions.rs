//! `completions SHELL`: shell completion scripts from the clap definition.

use anyhow::Result;
use clap::CommandFactory;

use crate::cli::{Cli, CompletionsArgs};
use crate::error::ExitStatus;

pub fn run(args: CompletionsArgs) -> Result<ExitStatus> {
    let mut command = Cli::command();
    clap_complete::generate(args.shell, &mut command, "ephemeral-admin", &mut std::io::stdout());
    Ok(ExitStatus::Success)
}

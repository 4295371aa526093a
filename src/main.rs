//! Entry point: parse, set up logging, run, and turn the outcome into an exit code.

use std::process::ExitCode;

use clap::Parser;

use ephemeral_admin::{cli::Cli, error, logging, run};

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.global.verbose, cli.global.quiet);
    match run(cli) {
        Ok(status) => status.into(),
        Err(e) => {
            eprintln!("error: {}", error::one_line(&e));
            error::exit_code_for(&e).into()
        }
    }
}

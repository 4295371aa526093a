//! Entry point: parse, set up logging, run, and turn the outcome into an exit code.

use std::process::ExitCode;

use clap::Parser;

use ephemeral_admin::{cli::Cli, exit_codes, logging, output, run};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return output::clap_exit(&e),
    };
    let verbose = cli.global.verbose;
    logging::init(verbose, cli.global.quiet);
    match run(cli) {
        Ok(status) => status.into(),
        Err(e) => {
            output::error_line(&exit_codes::report(&e, verbose > 0));
            exit_codes::exit_code_for(&e).into()
        }
    }
}

//! `cargo bench`: the launch benchmark (`scripts/bench`, see README, Speed) against the binary
//! cargo just built with the release settings. Arguments after `--` go to the benchmark:
//! `cargo bench --bench launch -- --quick --only pipe`.
//!
//! It measures and prints; it asserts nothing. Under `cargo test --all-targets`, which runs bench
//! targets without `--bench`, it does nothing: the benchmark is not a test.

use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        eprintln!("the launch benchmark runs under `cargo bench` or scripts/bench, not as a test");
        return ExitCode::SUCCESS;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench");
    let status = Command::new(script)
        .env("EPHEMERAL_ADMIN_BENCH_BIN", env!("CARGO_BIN_EXE_ephemeral-admin"))
        .args(args.iter().filter(|a| *a != "--bench"))
        .status();
    match status {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("{script} ended with {status}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("cannot run {script}: {e}");
            ExitCode::FAILURE
        }
    }
}

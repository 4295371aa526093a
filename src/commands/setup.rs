//! Waiting for the box's setup (packages and setup script) before the shell or command starts.
//!
//! cloud-init runs the setup runner (`src/userdata/setup.sh`), which logs to `setup.log` and
//! writes `setup.status` when done. Over the pinned SSH connection, the launch follows that log
//! to our stderr until the status file appears (GNU `tail --pid` makes a last read after the
//! status watcher ends, so no line is lost), and takes the status as the waiter's exit status.
//! A failure is one line with the status, then the log's last lines. The log is root's (0600):
//! the login user reads it with `sudo -n` (passwordless on the cloud images) unless it can read
//! it itself (root, or the box simulator, where the runner runs as the login user).

use anyhow::{Context as _, Result};

use super::Context;
use crate::error::Interrupted;
use crate::output::short_duration;
use crate::signals::Signals;
use crate::ssh::{self, Captured, ExecIo, RemoteExit};
use crate::userdata::SETUP_DIR;

/// How many of the log's last lines a failure shows.
pub const TAIL_LINES: usize = 20;

/// The setup on the box ended with a non-zero status, or did not end in time.
#[derive(Debug, thiserror::Error)]
#[error("setup {what} (log: {log}); its last lines:\n{tail}")]
pub struct SetupFailed {
    /// "failed on the box with exit status 3", "did not finish within 30m (setup_timeout)".
    pub what: String,
    pub log: String,
    pub tail: String,
}

/// The setup directory on the box: `$EA_SETUP_DIR` where the box sets it (the simulator).
fn dir() -> String {
    format!("${{EA_SETUP_DIR:-{SETUP_DIR}}}")
}

/// Follows the log until the status appears; exits with that status. A box whose cloud-init
/// finished without starting the runner exits 125 with a line saying so.
fn follow_command() -> String {
    let d = dir();
    format!(
        r#"d="{d}"
until [ -e "$d/setup.log" ] || [ -e "$d/setup.status" ]; do
  if command -v cloud-init >/dev/null 2>&1 && cloud-init status 2>/dev/null | grep -Eq 'status: (done|error|disabled)' && [ ! -e "$d/setup.log" ]; then
    echo "ephemeral-admin: cloud-init finished without running the setup (see /var/log/cloud-init-output.log)" >&2; exit 125
  fi
  sleep 0.5
done
(while [ ! -e "$d/setup.status" ]; do sleep 0.2; done) & w=$!
r=; [ -r "$d/setup.log" ] || r="sudo -n"
$r tail -n +1 -s 0.2 --pid="$w" -f "$d/setup.log" ||
  echo "ephemeral-admin: cannot read $d/setup.log (root's, and sudo -n refused): waiting for the status only" >&2
wait "$w"
exit "$(cat "$d/setup.status")""#
    )
}

/// Waits for the setup, streaming its log to stderr (unless quiet). Ctrl-C stops waiting.
pub async fn wait(ctx: &Context, session: &ssh::Session, signals: &Signals) -> Result<()> {
    ctx.printer.status("waiting for the box's setup (packages, setup script); its log follows");
    let argv = ["sh".to_string(), "-c".to_string(), follow_command()];
    let quiet = ctx.settings.verbosity == 0;
    let follow = async {
        if quiet {
            let mut ignored = Captured::default();
            session.exec(&argv, ExecIo::Capture { stdin: Vec::new(), output: &mut ignored }).await
        } else {
            session.exec(&argv, ExecIo::Stderr).await
        }
    };
    let limit = ctx.settings.setup_timeout;
    let exit = tokio::select! {
        exit = follow => exit.context("following the box's setup log")?,
        stop = signals.stopped() => {
            return Err(Interrupted { what: stop.name(), done: "stopped waiting for the setup".into(), code: stop.exit_code() }.into());
        }
        () = tokio::time::sleep(limit) => {
            let what = format!("did not finish within {} (setup_timeout)", short_duration(limit));
            return Err(SetupFailed { what, log: log_path(), tail: tail(session).await }.into());
        }
    };
    match exit {
        RemoteExit::Status(0) => {
            ctx.printer.status("setup done");
            Ok(())
        }
        RemoteExit::Status(status) => {
            let what = format!("failed on the box with exit status {status}");
            Err(SetupFailed { what, log: log_path(), tail: tail(session).await }.into())
        }
        RemoteExit::Signal { name } => anyhow::bail!("following the box's setup log ended by signal {name}"),
        RemoteExit::Lost => anyhow::bail!("the SSH connection dropped while waiting for the box's setup"),
    }
}

fn log_path() -> String {
    format!("{SETUP_DIR}/setup.log")
}

/// The log's last lines, indented; what went wrong reading them if they cannot be read.
async fn tail(session: &ssh::Session) -> String {
    let command = format!(
        r#"l="{}/setup.log"; if [ -r "$l" ]; then tail -n {TAIL_LINES} "$l"; else sudo -n tail -n {TAIL_LINES} "$l"; fi"#,
        dir()
    );
    let argv = ["sh".to_string(), "-c".to_string(), command];
    let mut out = Captured::default();
    let read = session.exec(&argv, ExecIo::Capture { stdin: Vec::new(), output: &mut out }).await;
    let text = match read {
        Ok(_) if !out.stdout.is_empty() => String::from_utf8_lossy(&out.stdout).into_owned(),
        Ok(_) => "(the log is empty or missing)".to_string(),
        Err(e) => format!("(cannot read the log: {e})"),
    };
    // Box text: its escape sequences are shown, not run.
    crate::output::box_log(text.trim_end()).lines().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The follower, run here against a fake setup dir: it prints the whole log, including what
    /// was written just before the status, and exits with the status.
    #[test]
    fn follows_the_log_to_the_end_and_exits_with_the_status() {
        let dir = std::env::temp_dir().join(format!("ea-setup-follow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let writer = format!(
            "d={}; echo first > \"$d/setup.log\"; sleep 0.5; echo last >> \"$d/setup.log\"; echo 3 > \"$d/setup.status\"",
            dir.display()
        );
        let child = std::process::Command::new("sh").args(["-c", &writer]).spawn().unwrap();
        let out = std::process::Command::new("sh")
            .args(["-c", &follow_command()])
            .env("EA_SETUP_DIR", &dir)
            .output()
            .unwrap();
        let _ = child.wait_with_output();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "first\nlast\n");
        assert_eq!(out.status.code(), Some(3));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

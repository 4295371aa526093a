//! Copying files and directories between this machine and a session's box (`cp`, and
//! `launch --upload`), over SFTP on the session's one pinned SSH connection.
//!
//! [`spec`] reads what the user typed (`ID:PATH` or a local path) into one direction; [`copy`]
//! walks the source, resolves the target as `cp`/`scp` do (into an existing directory, else to
//! that name), and streams each file in fixed-size chunks, so memory stays flat whatever the
//! size. What the box lists is untrusted: hostile names are refused, nothing is written through a
//! symlink below the destination, and modes are the source's less the umask, without setuid,
//! setgid or sticky bits (`--preserve`: kept, but for setuid and setgid); see [`copy`]. A file
//! that fails is reported and the rest carry on; the caller turns any failure into a non-zero
//! exit.

mod copy;
mod fs;
pub mod spec;

use std::path::PathBuf;

use indicatif::ProgressBar;
use russh_sftp::client::SftpSession;

pub use spec::{Direction, Side, Transfer};

use fs::{Local, Remote};

/// The box end of a transfer.
pub struct BoxEnd<'a> {
    pub sftp: &'a SftpSession,
    /// How the user named the session (shown in paths: `k3x9q2ab:/tmp/x`).
    pub label: &'a str,
    /// The login user (named when the box refuses a path).
    pub user: &'a str,
    /// Whether the box outlives the copy, so messages may suggest `connect` to look around.
    pub lasts: bool,
}

/// What a transfer did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Outcome {
    /// Files copied completely.
    pub files: u64,
    /// Bytes of those files.
    pub bytes: u64,
    /// One line per failure, naming the path and what to do.
    pub failures: Vec<String>,
}

/// Copies local `sources` to `dest` on the box.
pub async fn upload(
    remote: &BoxEnd<'_>,
    sources: &[PathBuf],
    dest: &str,
    recursive: bool,
    preserve: bool,
    bar: Option<ProgressBar>,
) -> Outcome {
    let sources: Vec<String> = sources.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let to = Remote { sftp: remote.sftp, label: remote.label, user: remote.user, lasts: remote.lasts };
    copy::copy_all(&Local, &to, &sources, dest, recursive, preserve, bar).await
}

/// Copies `sources` on the box to local `dest`.
pub async fn download(
    remote: &BoxEnd<'_>,
    sources: &[String],
    dest: &std::path::Path,
    recursive: bool,
    preserve: bool,
    bar: Option<ProgressBar>,
) -> Outcome {
    let from = Remote { sftp: remote.sftp, label: remote.label, user: remote.user, lasts: remote.lasts };
    copy::copy_all(&from, &Local, sources, &dest.to_string_lossy(), recursive, preserve, bar).await
}

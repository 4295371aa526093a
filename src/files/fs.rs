//! The two ends of a copy behind one small interface: this machine's file system ([`Local`]) and
//! the box's, through SFTP ([`Remote`]). Paths are `/`-separated strings on both sides; each end
//! names its paths and explains its failures in its own terms (on this machine, on the box).
//!
//! Names and messages from the box are untrusted: every path shown is escaped
//! ([`crate::output::box_text`]). This machine's end never follows a symlink below the path the
//! user typed (`O_NOFOLLOW`, `lstat` of every parent): a link in the destination's tree, which
//! may point anywhere, is refused rather than written through.

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::pin::Pin;
use std::task::{Context, Poll};

use russh_sftp::client::SftpSession;
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::protocol::{FileAttributes, OpenFlags, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::output::box_text;

/// Why a symlink under the destination is not written through.
const LINK: &str = "is a symbolic link on this machine, and cp does not write through links under the destination (they may point anywhere): remove it or copy elsewhere";

/// What the copy needs to know about a path (symlinks followed).
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    pub dir: bool,
    pub size: u64,
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
}

/// Why an operation on one end failed.
#[derive(Debug)]
pub enum FsError {
    NotFound,
    Denied,
    /// The connection to the box is gone: nothing further can work.
    Lost(String),
    /// What the file system or the SFTP server said.
    Other(String),
    /// Our own finding, already a sentence that says what to do.
    Said(String),
}

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::NotFound => FsError::NotFound,
            std::io::ErrorKind::PermissionDenied => FsError::Denied,
            // Errors of an SFTP file handle arrive as io::Error; the session's own state tells
            // whether the connection went.
            std::io::ErrorKind::TimedOut => FsError::Lost("the box stopped answering".into()),
            _ => FsError::Other(e.to_string()),
        }
    }
}

impl From<SftpError> for FsError {
    fn from(e: SftpError) -> Self {
        match e {
            SftpError::Status(s) => match s.status_code {
                StatusCode::NoSuchFile => FsError::NotFound,
                StatusCode::PermissionDenied => FsError::Denied,
                StatusCode::NoConnection | StatusCode::ConnectionLost => {
                    FsError::Lost("the connection to the box was lost".into())
                }
                code if s.error_message.is_empty() => FsError::Other(code.to_string()),
                _ => FsError::Other(s.error_message),
            },
            SftpError::Timeout => FsError::Lost("the box stopped answering".into()),
            SftpError::UnexpectedBehavior(text) if text.contains("closed") || text.contains("Error") => {
                FsError::Lost(format!("the connection to the box was lost ({text})"))
            }
            other => FsError::Other(other.to_string()),
        }
    }
}

/// One end of a copy.
pub trait End {
    type Reader: AsyncRead + Unpin + Send;
    type Writer: AsyncWrite + Unpin + Send;

    /// The path as the user would write it on the command line.
    fn name(&self, path: &str) -> String;
    /// One line: what went wrong with `path`, and what to do.
    fn explain(&self, path: &str, error: &FsError) -> String;
    /// `None` when nothing is there.
    async fn stat(&self, path: &str) -> Result<Option<Meta>, FsError>;
    /// The names in a directory (without `.` and `..`), sorted, each with what the listing
    /// already tells about it (`None` for a symlink or when it tells nothing: then stat it).
    async fn list(&self, path: &str) -> Result<Vec<(String, Option<Meta>)>, FsError>;
    async fn open(&self, path: &str) -> Result<Self::Reader, FsError>;
    /// Creates (or truncates) a file for writing; a new one gets `mode` less the umask (of this
    /// process, or of the box's SFTP server), an existing one keeps its mode. `follow`: the path
    /// is the one the user typed, whose symlinks are theirs to follow.
    async fn create(&self, path: &str, mode: u32, follow: bool) -> Result<Self::Writer, FsError>;
    /// Makes everything written durable enough to report success, closes, and sets `mode` (on
    /// the open file, never through a path) when given.
    async fn finish(&self, writer: Self::Writer, path: &str, mode: Option<u32>) -> Result<(), FsError>;
    /// Creates a directory with the default mode less the umask, and tells that mode; `None`
    /// when a directory is there already (fine: its mode is left alone).
    async fn mkdir(&self, path: &str, follow: bool) -> Result<Option<u32>, FsError>;
    /// Sets a directory's mode.
    async fn set_mode(&self, path: &str, mode: u32) -> Result<(), FsError>;
    /// Checks that `root/rel` stays under `root`: every name in `rel` a plain one and, where it
    /// matters, every directory between them a real one, not a symlink.
    async fn guard(&self, root: &str, rel: &str) -> Result<(), FsError> {
        let _ = root;
        match rel.split('/').all(|part| !matches!(part, "" | "." | "..")) {
            true => Ok(()),
            false => Err(FsError::Said("it would land outside the destination; nothing was written".into())),
        }
    }
}

/// This machine.
pub struct Local;

/// A local file read and written in place on the runtime's worker (`block_in_place`): a local
/// disk or the page cache answers in microseconds, and tokio's own `File` would hand every
/// chunk to the blocking pool and back, in turn with the network side.
pub struct Direct(std::fs::File);

fn in_place<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl AsyncRead for Direct {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let file = &mut self.get_mut().0;
        let n = in_place(|| file.read(buf.initialize_unfilled()))?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Direct {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let file = &mut self.get_mut().0;
        Poll::Ready(in_place(|| file.write(data)))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl End for Local {
    type Reader = Direct;
    type Writer = Direct;

    fn name(&self, path: &str) -> String {
        box_text(path)
    }

    fn explain(&self, path: &str, error: &FsError) -> String {
        let path = self.name(path);
        match error {
            FsError::NotFound => format!("{path}: no such file or directory on this machine; check the path"),
            FsError::Denied => format!("{path}: permission denied on this machine; check its permissions"),
            FsError::Said(text) => format!("{path}: {text}"),
            FsError::Lost(why) | FsError::Other(why) => {
                format!("{path}: {why} (on this machine); check the path and the disk's free space")
            }
        }
    }

    async fn stat(&self, path: &str) -> Result<Option<Meta>, FsError> {
        match tokio::fs::metadata(path).await {
            Ok(m) => Ok(Some(Meta { dir: m.is_dir(), size: m.len(), mode: m.permissions().mode() & 0o7777 })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn list(&self, path: &str) -> Result<Vec<(String, Option<Meta>)>, FsError> {
        let mut dir = tokio::fs::read_dir(path).await?;
        let mut names = Vec::new();
        while let Some(entry) = dir.next_entry().await? {
            match entry.file_name().into_string() {
                // A local stat costs nothing worth saving.
                Ok(name) => names.push((name, None)),
                Err(raw) => {
                    return Err(FsError::Said(format!(
                        "{raw:?} in it is not valid UTF-8, which SFTP paths must be: rename it"
                    )));
                }
            }
        }
        names.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(names)
    }

    async fn open(&self, path: &str) -> Result<Direct, FsError> {
        Ok(Direct(in_place(|| std::fs::File::open(path))?))
    }

    async fn create(&self, path: &str, mode: u32, follow: bool) -> Result<Direct, FsError> {
        let mut options = std::fs::OpenOptions::new();
        // The kernel applies the umask to a new file; a file being created is writable through
        // this descriptor whatever its mode. O_NONBLOCK: a FIFO there fails instead of hanging.
        let flags = libc::O_NONBLOCK | if follow { 0 } else { libc::O_NOFOLLOW };
        options.write(true).create(true).truncate(true).mode(mode & 0o777).custom_flags(flags);
        let file = in_place(|| options.open(path)).map_err(link_error)?;
        if !file.metadata()?.is_file() {
            return Err(FsError::Said(
                "it exists and is not a regular file; remove it or copy elsewhere".into(),
            ));
        }
        Ok(Direct(file))
    }

    async fn finish(&self, writer: Direct, _path: &str, mode: Option<u32>) -> Result<(), FsError> {
        // Written straight to the file: nothing is buffered here. The mode goes on the open
        // descriptor (fchmod), so no symlink swapped in meanwhile can redirect it.
        if let Some(mode) = mode {
            writer.0.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    }

    async fn mkdir(&self, path: &str, follow: bool) -> Result<Option<u32>, FsError> {
        match tokio::fs::create_dir(path).await {
            Ok(()) => Ok(Some(tokio::fs::symlink_metadata(path).await?.permissions().mode() & 0o7777)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let meta = match follow {
                    true => tokio::fs::metadata(path).await?,
                    false => tokio::fs::symlink_metadata(path).await?,
                };
                match meta.file_type() {
                    kind if kind.is_symlink() => Err(FsError::Said(LINK.into())),
                    kind if kind.is_dir() => Ok(None),
                    _ => Err(FsError::Said(
                        "it exists and is not a directory; remove it or copy elsewhere".into(),
                    )),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn set_mode(&self, path: &str, mode: u32) -> Result<(), FsError> {
        // On the directory itself, opened without following a link (fchmod).
        let mut options = std::fs::OpenOptions::new();
        options.read(true).custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW);
        let dir = in_place(|| options.open(path)).map_err(link_error)?;
        Ok(dir.set_permissions(std::fs::Permissions::from_mode(mode))?)
    }

    async fn guard(&self, root: &str, rel: &str) -> Result<(), FsError> {
        let parts: Vec<&str> = rel.split('/').collect();
        if parts.iter().any(|part| matches!(*part, "" | "." | "..")) {
            return Err(FsError::Said("it would land outside the destination; nothing was written".into()));
        }
        let mut path = std::path::PathBuf::from(root);
        for part in &parts[..parts.len() - 1] {
            path.push(part);
            let meta = tokio::fs::symlink_metadata(&path).await?;
            if !meta.is_dir() {
                return Err(FsError::Said(format!(
                    "{} above it {}",
                    box_text(&path.to_string_lossy()),
                    if meta.file_type().is_symlink() { LINK } else { "is not a directory" }
                )));
            }
        }
        Ok(())
    }
}

/// ELOOP from `O_NOFOLLOW`: the last name is a symlink.
fn link_error(e: std::io::Error) -> FsError {
    match e.raw_os_error() {
        Some(libc::ELOOP) => FsError::Said(LINK.into()),
        _ => e.into(),
    }
}

/// The box, through SFTP.
pub struct Remote<'a> {
    pub sftp: &'a SftpSession,
    pub label: &'a str,
    pub user: &'a str,
    /// The box outlives the copy: hints may suggest `connect`.
    pub lasts: bool,
}

fn mode_only(mode: u32) -> FileAttributes {
    FileAttributes { permissions: Some(mode), ..FileAttributes::empty() }
}

impl End for Remote<'_> {
    type Reader = russh_sftp::client::fs::File;
    type Writer = russh_sftp::client::fs::File;

    fn name(&self, path: &str) -> String {
        format!("{}:{}", self.label, box_text(path))
    }

    fn explain(&self, path: &str, error: &FsError) -> String {
        let name = self.name(path);
        let parent = match path.rsplit_once('/') {
            Some(("", _)) => "/",
            Some((dir, _)) => dir,
            None => ".",
        };
        let parent = box_text(parent);
        let look = |command: &str| match self.lasts {
            true => format!(" (`ephemeral-admin connect {} -- {command} {parent}`)", self.label),
            false => String::new(),
        };
        match error {
            FsError::NotFound => {
                format!("{name}: no such file or directory on the box; check the path{}", look("ls -la"))
            }
            FsError::Denied => format!(
                "{name}: permission denied on the box (you log in as {}); use a path {} can write, such as its home or /tmp",
                self.user, self.user
            ),
            FsError::Lost(why) => format!(
                "{name}: {why}; check the session with `ephemeral-admin status {}` and copy again",
                self.label
            ),
            FsError::Said(text) => format!("{name}: {text}"),
            FsError::Other(why) => format!(
                "{name}: the box answered \"{}\"; check that {parent} exists there and its disk has room{}",
                box_text(why),
                look("df -h")
            ),
        }
    }

    async fn stat(&self, path: &str) -> Result<Option<Meta>, FsError> {
        match self.sftp.metadata(path).await {
            Ok(attrs) => {
                let bits = attrs.permissions.unwrap_or(0);
                Ok(Some(Meta {
                    dir: bits & 0o170000 == 0o040000,
                    size: attrs.size.unwrap_or(0),
                    mode: bits & 0o7777,
                }))
            }
            Err(e) => match FsError::from(e) {
                FsError::NotFound => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn list(&self, path: &str) -> Result<Vec<(String, Option<Meta>)>, FsError> {
        // READDIR carries each entry's attributes (not following symlinks): one round trip for
        // the whole directory instead of one per entry.
        let mut names: Vec<(String, Option<Meta>)> = self
            .sftp
            .read_dir(path)
            .await?
            .map(|e| {
                let attrs = e.metadata();
                let meta = attrs.permissions.filter(|bits| bits & 0o170000 != 0o120000).map(|bits| Meta {
                    dir: bits & 0o170000 == 0o040000,
                    size: attrs.size.unwrap_or(0),
                    mode: bits & 0o7777,
                });
                (e.file_name(), meta)
            })
            .collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(names)
    }

    async fn open(&self, path: &str) -> Result<Self::Reader, FsError> {
        Ok(self.sftp.open(path).await?)
    }

    async fn create(&self, path: &str, mode: u32, _follow: bool) -> Result<Self::Writer, FsError> {
        // The server creates it with this mode less its umask, as OpenSSH's `sftp put` does.
        let flags = OpenFlags::CREATE | OpenFlags::TRUNCATE | OpenFlags::WRITE;
        Ok(self.sftp.open_with_flags_and_attributes(path, flags, mode_only(mode & 0o777)).await?)
    }

    async fn finish(&self, mut writer: Self::Writer, _path: &str, mode: Option<u32>) -> Result<(), FsError> {
        // The server applies requests in order: the mode lands after the data, before the close.
        if let Some(mode) = mode {
            writer.set_metadata(mode_only(mode)).await?;
        }
        // Waits for every write's acknowledgement, then the close's.
        writer.shutdown().await?;
        Ok(())
    }

    async fn mkdir(&self, path: &str, _follow: bool) -> Result<Option<u32>, FsError> {
        match self.sftp.create_dir(path).await {
            // The mode it got tells the server's umask.
            Ok(()) => Ok(Some(self.stat(path).await?.map_or(0o700, |meta| meta.mode))),
            Err(e) => match self.stat(path).await? {
                Some(meta) if meta.dir => Ok(None),
                Some(_) => {
                    Err(FsError::Said("it exists and is not a directory; remove it or copy elsewhere".into()))
                }
                None => Err(e.into()),
            },
        }
    }

    async fn set_mode(&self, path: &str, mode: u32) -> Result<(), FsError> {
        self.sftp.set_metadata(path, mode_only(mode)).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn said(result: Result<impl Sized, FsError>) -> String {
        match result {
            Err(FsError::Said(text)) => text,
            Err(other) => panic!("not our finding: {other:?}"),
            Ok(_) => panic!("not refused"),
        }
    }

    #[tokio::test]
    async fn this_machine_never_writes_through_a_symlink_below_the_destination() {
        let root = std::env::temp_dir().join(format!("ea-fs-links-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (dest, outside) = (root.join("dest"), root.join("outside"));
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("keep"), "mine").unwrap();
        std::os::unix::fs::symlink(&outside, dest.join("dir")).unwrap();
        std::os::unix::fs::symlink(outside.join("keep"), dest.join("file")).unwrap();
        let p = |name: &str| dest.join(name).to_string_lossy().into_owned();
        assert!(said(Local.create(&p("file"), 0o644, false).await).contains("symbolic link"));
        assert!(said(Local.mkdir(&p("dir"), false).await).contains("symbolic link"));
        let root_str = dest.to_string_lossy();
        assert!(said(Local.guard(&root_str, "dir/x").await).contains("symbolic link"));
        assert!(said(Local.guard(&root_str, "../x").await).contains("outside"));
        assert_eq!(std::fs::read_to_string(outside.join("keep")).unwrap(), "mine");
        // The path the user typed is theirs: its links are followed.
        assert_eq!(Local.mkdir(&p("dir"), true).await.unwrap(), None);
        // A new file gets the mode less the umask; an existing directory is left alone.
        let made = Local.mkdir(&p("new"), false).await.unwrap().unwrap();
        assert_eq!(made & 0o7000, 0);
        assert_eq!(Local.mkdir(&p("new"), false).await.unwrap(), None);
        Local.guard(&root_str, "new/x").await.unwrap();
        let file = Local.create(&p("new/x"), 0o4777, false).await.unwrap();
        Local.finish(file, &p("new/x"), None).await.unwrap();
        let mode = std::fs::metadata(p("new/x")).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o777 & made, "setuid dropped, umask applied");
        std::fs::remove_dir_all(&root).unwrap();
    }
}

//! The user's OpenSSH config: `ssh-config --install` puts a live session's `Host` block into one
//! file of the tool's own, `~/.ssh/ephemeral-admin/config` (0600), and includes that file once
//! from the top of `~/.ssh/config`; teardown and cleanup take the block out again, so `ssh NAME`
//! (and editors that read the config, like VS Code Remote-SSH) never point at a dead box.
//!
//! Each block sits between marker comments naming its session, so removing one touches nothing
//! else in the file. `~/.ssh/config` is changed at most once: the `Include` line goes on top
//! (OpenSSH applies an `Include` inside a `Host` section only to that host), and the file as it
//! was is kept as `~/.ssh/config.ephemeral-admin.bak` the first time. Changes are made under a
//! lock and written atomically.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::session::store::{FileLock, write_atomic};

/// The line `~/.ssh/config` gets. OpenSSH expands `~` in `Include` itself.
pub const INCLUDE_LINE: &str = "Include ~/.ssh/ephemeral-admin/config";
/// The backup of `~/.ssh/config` taken before the tool first changes it.
pub const BACKUP_NAME: &str = "config.ephemeral-admin.bak";

/// What `install` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Installed {
    /// `~/.ssh/ephemeral-admin/config`.
    pub config_file: PathBuf,
    /// True when this call added the `Include` line to `~/.ssh/config`.
    pub include_added: bool,
    /// The backup of `~/.ssh/config`, when this call made one.
    pub backup: Option<PathBuf>,
}

/// `~/.ssh/ephemeral-admin/config` for the `.ssh` directory `ssh_dir`.
pub fn own_file(ssh_dir: &Path) -> PathBuf {
    ssh_dir.join("ephemeral-admin").join("config")
}

fn begin_marker(session_id: &str) -> String {
    format!("# ephemeral-admin session {session_id}: removed when the session ends")
}

fn end_marker(session_id: &str) -> String {
    format!("# end of ephemeral-admin session {session_id}")
}

/// Writes (or replaces) the session's block, dropping any other block that claims the same host
/// alias (an earlier session of the same name), then makes sure `~/.ssh/config` includes the file.
pub fn install(ssh_dir: &Path, session_id: &str, alias: &str, block: &str) -> Result<Installed> {
    private_dir(ssh_dir)?;
    let file = own_file(ssh_dir);
    private_dir(file.parent().expect("has a parent"))?;
    let _lock = lock(&file)?;
    let text = read_or_empty(&file)?;
    let mut blocks: Vec<Block> =
        parse(&text).into_iter().filter(|b| !b.is_session(session_id) && !b.has_alias(alias)).collect();
    blocks.push(Block::Session {
        id: session_id.to_string(),
        text: format!("{}\n{}{}\n", begin_marker(session_id), block, end_marker(session_id)),
    });
    write_atomic(&file, render(&blocks).as_bytes())?;
    let (include_added, backup) = include_from_user_config(ssh_dir)?;
    Ok(Installed { config_file: file, include_added, backup })
}

/// Takes the session's block out of `file`. Answers whether there was one; a missing file is
/// nothing to do.
pub fn remove(file: &Path, session_id: &str) -> Result<bool> {
    if !file.exists() {
        return Ok(false);
    }
    let _lock = lock(file)?;
    let text = read_or_empty(file)?;
    let blocks = parse(&text);
    let kept: Vec<Block> = blocks.iter().filter(|b| !b.is_session(session_id)).cloned().collect();
    if kept.len() == blocks.len() {
        return Ok(false);
    }
    write_atomic(file, render(&kept).as_bytes())?;
    Ok(true)
}

/// Adds the `Include` line on top of `~/.ssh/config` unless it is there, backing the file up the
/// first time. A symlinked config (dotfile managers) is written through, not replaced.
fn include_from_user_config(ssh_dir: &Path) -> Result<(bool, Option<PathBuf>)> {
    let link = ssh_dir.join("config");
    let path = fs::canonicalize(&link).unwrap_or(link);
    let text = read_or_empty(&path)?;
    let present = text.lines().any(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        words.len() == 2
            && words[0].eq_ignore_ascii_case("include")
            && matches!(words[1], "~/.ssh/ephemeral-admin/config" | "ephemeral-admin/config")
    });
    if present {
        return Ok((false, None));
    }
    let mut backup = None;
    let mode = match fs::metadata(&path) {
        Ok(meta) => {
            let copy = ssh_dir.join(BACKUP_NAME);
            if !copy.exists() {
                fs::copy(&path, &copy).with_context(|| format!("backing up {}", path.display()))?;
                backup = Some(copy);
            }
            meta.permissions().mode() & 0o777
        }
        Err(_) => 0o600,
    };
    let mut new = format!("{INCLUDE_LINE}\n");
    if !text.is_empty() {
        new.push('\n');
        new.push_str(&text);
    }
    write_atomic(&path, new.as_bytes())?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok((true, backup))
}

/// One argument of an ssh-config directive (`User`, `HostName`, `HostKeyAlias`), written so that
/// OpenSSH's config tokenizer reads back exactly `value`: plain text as it is, anything else in
/// double quotes with `\\` and `"` escaped. A control character (a newline would start a
/// directive of its own) or an empty value cannot be written at all.
pub fn config_arg(what: &str, value: &str) -> Result<String> {
    no_control(what, value)?;
    anyhow::ensure!(!value.is_empty(), "{what} is empty, and an ssh-config line needs a value");
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:@+,%".contains(c);
    if !value.is_empty() && value.chars().all(plain) {
        return Ok(value.to_string());
    }
    Ok(format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\"")))
}

/// A file path for `IdentityFile` or `UserKnownHostsFile`, which OpenSSH also expands `%`-tokens
/// and `${VAR}` in: `%` is doubled; `${` cannot be escaped there, so such a path is refused.
pub fn config_path(what: &str, path: &Path) -> Result<String> {
    let text = path.to_str().with_context(|| format!("{what} {} is not UTF-8", path.display()))?;
    anyhow::ensure!(
        !text.contains("${"),
        "{what} {text} holds \"${{\", which OpenSSH would expand in an ssh-config line: set a state directory without it"
    );
    config_arg(what, &text.replace('%', "%%"))
}

/// A `ProxyCommand` value: OpenSSH runs the rest of the line with the user's shell (so the
/// command's own quoting is the shell's), but first splits it with its config tokenizer and
/// refuses the line when that finds an unclosed quote; and a control character would end it.
pub fn config_command(command: &str) -> Result<String> {
    no_control("the proxy command", command)?;
    anyhow::ensure!(
        quotes_balanced(command),
        "the proxy command {command:?} has quotes that OpenSSH's config parser reads as unclosed: write it without a backslash before a quote"
    );
    Ok(command.to_string())
}

fn no_control(what: &str, value: &str) -> Result<()> {
    anyhow::ensure!(
        !value.chars().any(char::is_control),
        "{what} {value:?} holds a control character (a newline, a tab...), which an ssh-config line cannot carry"
    );
    Ok(())
}

/// OpenSSH's `argv_split` quote rules: `'` and `"` open and close quotes; a backslash escapes a
/// quote, a backslash, or (outside quotes) a space. Answers whether every quote is closed.
fn quotes_balanced(line: &str) -> bool {
    let mut quote = None;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quote) {
            ('\\', _) if matches!(chars.peek(), Some('\'' | '"' | '\\')) => {
                chars.next();
            }
            ('\'' | '"', None) => quote = Some(c),
            (c, Some(q)) if c == q => quote = None,
            _ => {}
        }
    }
    quote.is_none()
}

/// The file as a list of the tool's session blocks and whatever else is in it, in order.
#[derive(Debug, Clone, PartialEq)]
enum Block {
    Session { id: String, text: String },
    Other(String),
}

impl Block {
    fn is_session(&self, session_id: &str) -> bool {
        matches!(self, Block::Session { id, .. } if id == session_id)
    }

    fn has_alias(&self, alias: &str) -> bool {
        match self {
            Block::Session { text, .. } => text.lines().any(|l| {
                let mut words = l.split_whitespace();
                words.next().is_some_and(|w| w.eq_ignore_ascii_case("host")) && words.any(|w| w == alias)
            }),
            Block::Other(_) => false,
        }
    }
}

fn parse(text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut lines = text.split_inclusive('\n').peekable();
    let mut other = String::new();
    while let Some(line) = lines.next() {
        let id = line
            .trim_end()
            .strip_prefix("# ephemeral-admin session ")
            .and_then(|rest| rest.split(':').next())
            .filter(|id| crate::session::is_valid_id(id));
        let Some(id) = id else {
            other.push_str(line);
            continue;
        };
        if !other.is_empty() {
            blocks.push(Block::Other(std::mem::take(&mut other)));
        }
        let mut text = line.to_string();
        let end = end_marker(id);
        for line in lines.by_ref() {
            text.push_str(line);
            if line.trim_end() == end {
                break;
            }
        }
        blocks.push(Block::Session { id: id.to_string(), text });
    }
    if !other.is_empty() {
        blocks.push(Block::Other(other));
    }
    blocks
}

fn render(blocks: &[Block]) -> String {
    blocks
        .iter()
        .map(|b| match b {
            Block::Session { text, .. } | Block::Other(text) => text.as_str(),
        })
        .collect()
}

fn read_or_empty(path: &Path) -> Result<String> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

fn lock(file: &Path) -> Result<FileLock> {
    FileLock::acquire(&file.with_file_name(".config.lock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ea-sshcfg-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn blocks_come_and_go_and_the_include_is_added_once_with_a_backup() {
        let ssh = dir("cycle");
        fs::create_dir_all(&ssh).unwrap();
        fs::write(ssh.join("config"), "Host work\n    User me\n").unwrap();
        let first = install(&ssh, "k3x9q2ab", "db-fix", "Host db-fix\n    User ubuntu\n").unwrap();
        assert!(first.include_added);
        assert_eq!(first.backup, Some(ssh.join(BACKUP_NAME)));
        let second =
            install(&ssh, "m4n5p6qr", "ephemeral-admin-m4n5p6qr", "Host ephemeral-admin-m4n5p6qr\n").unwrap();
        assert!(!second.include_added && second.backup.is_none());
        let user = fs::read_to_string(ssh.join("config")).unwrap();
        assert_eq!(user, format!("{INCLUDE_LINE}\n\nHost work\n    User me\n"));
        assert_eq!(fs::read_to_string(ssh.join(BACKUP_NAME)).unwrap(), "Host work\n    User me\n");
        let own = own_file(&ssh);
        assert_eq!(fs::metadata(&own).unwrap().permissions().mode() & 0o777, 0o600);
        // Same name again (an earlier session's block never removed): the old block goes.
        install(&ssh, "s7t8u9vw", "db-fix", "Host db-fix\n    User ec2-user\n").unwrap();
        let text = fs::read_to_string(&own).unwrap();
        assert!(
            !text.contains("k3x9q2ab") && text.contains("s7t8u9vw") && text.contains("m4n5p6qr"),
            "{text}"
        );
        assert!(remove(&own, "s7t8u9vw").unwrap());
        assert!(!remove(&own, "s7t8u9vw").unwrap(), "removing twice is harmless");
        let text = fs::read_to_string(&own).unwrap();
        assert!(!text.contains("db-fix") && text.contains("Host ephemeral-admin-m4n5p6qr\n"), "{text}");
    }

    #[test]
    fn a_missing_ssh_dir_is_created_private() {
        let home = dir("fresh");
        let ssh = home.join(".ssh");
        install(&ssh, "k3x9q2ab", "x", "Host x\n").unwrap();
        assert_eq!(fs::metadata(&ssh).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(fs::read_to_string(ssh.join("config")).unwrap(), format!("{INCLUDE_LINE}\n"));
        assert!(!ssh.join(BACKUP_NAME).exists(), "nothing to back up");
    }
}

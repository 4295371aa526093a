//! What the user typed for `cp SRC… DST` and `launch --upload LOCAL[:REMOTE]`, checked before
//! anything is contacted.
//!
//! A side is on the box when it reads `ID:PATH` with no `/` before the colon, as with `scp`
//! (`ID` is a session id, name, instance id or `last`); anything else is a local path, and
//! `./a:b` names a local file with a colon in it. Exactly one side of a `cp` is on a box.

use std::path::PathBuf;

use crate::error::UsageError;
use crate::session::SessionRef;

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Side {
    Local(PathBuf),
    /// `session` as typed (resolved later); `path` is `.` (the login user's home) when empty.
    Remote {
        session: String,
        path: String,
    },
}

impl Side {
    pub fn parse(text: &str) -> Result<Side, UsageError> {
        let Some((before, after)) = text.split_once(':') else { return Ok(Side::Local(text.into())) };
        if before.is_empty() || before.contains('/') {
            return Ok(Side::Local(text.into()));
        }
        SessionRef::parse(before).map_err(|e| {
            UsageError::new(format!(
                "{text:?}: {e} (for a local file with a colon in its name, write ./{text})"
            ))
        })?;
        let path = if after.is_empty() { ".".to_string() } else { after.to_string() };
        Ok(Side::Remote { session: before.to_string(), path })
    }
}

/// Which way the bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Upload,
    Download,
}

/// A whole `cp`: one session, one direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transfer {
    Upload { session: String, sources: Vec<PathBuf>, dest: String },
    Download { session: String, sources: Vec<String>, dest: PathBuf },
}

impl Transfer {
    /// Reads `SRC… DST`; both sides local, both on boxes, or sources on different boxes are
    /// bad input.
    pub fn parse(sources: &[String], dest: &str) -> Result<Transfer, UsageError> {
        let example =
            "e.g. `ephemeral-admin cp ./dump.sql last:/tmp/` or `ephemeral-admin cp last:/var/log/syslog .`";
        let dest = Side::parse(dest)?;
        let sources = sources.iter().map(|s| Side::parse(s)).collect::<Result<Vec<_>, _>>()?;
        match dest {
            Side::Remote { session, path } => {
                let mut local = Vec::new();
                for source in sources {
                    match source {
                        Side::Local(p) => local.push(p),
                        Side::Remote { .. } => {
                            return Err(UsageError::new(format!(
                                "both sides are on boxes: copy down to this machine, then up ({example})"
                            )));
                        }
                    }
                }
                Ok(Transfer::Upload { session, sources: local, dest: path })
            }
            Side::Local(dest) => {
                let mut session = None::<String>;
                let mut remote = Vec::new();
                for source in sources {
                    match source {
                        Side::Local(_) => {
                            return Err(UsageError::new(format!(
                                "both sides are on this machine: one side must be ID:PATH, where ID is a session id, name, instance id or `last` ({example})"
                            )));
                        }
                        Side::Remote { session: s, path } => {
                            if session.as_ref().is_some_and(|first| *first != s) {
                                return Err(UsageError::new(format!(
                                    "the sources are on different sessions ({} and {s}): copy from one box at a time",
                                    session.unwrap_or_default()
                                )));
                            }
                            session = Some(s);
                            remote.push(path);
                        }
                    }
                }
                let session = session.ok_or_else(|| UsageError::new("nothing to copy: give SRC… DST"))?;
                Ok(Transfer::Download { session, sources: remote, dest })
            }
        }
    }

    pub fn session(&self) -> &str {
        match self {
            Transfer::Upload { session, .. } | Transfer::Download { session, .. } => session,
        }
    }
}

/// One `launch --upload LOCAL[:REMOTE]`: the first colon splits; REMOTE defaults to the local
/// file's name in the login user's home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub local: PathBuf,
    pub remote: String,
}

impl Upload {
    /// Parses and checks that LOCAL exists (exit 2 before any AWS call otherwise).
    pub fn parse(text: &str) -> Result<Upload, UsageError> {
        let (local, remote) = match text.split_once(':') {
            Some((local, remote)) if !remote.is_empty() => (local, Some(remote)),
            Some((local, _)) => (local, None),
            None => (text, None),
        };
        if local.is_empty() {
            return Err(UsageError::new(format!(
                "--upload {text:?}: give LOCAL[:REMOTE], e.g. --upload ./fix.sh"
            )));
        }
        if std::fs::metadata(local).is_err() {
            return Err(UsageError::new(format!(
                "--upload {text:?}: {local} does not exist on this machine (or cannot be read): check the path"
            )));
        }
        let remote = match remote {
            Some(remote) => remote.to_string(),
            None => {
                let name =
                    std::path::Path::new(local).file_name().and_then(|n| n.to_str()).ok_or_else(|| {
                        UsageError::new(format!(
                            "--upload {text:?}: name the target on the box: --upload {local}:REMOTE"
                        ))
                    })?;
                name.to_string()
            }
        };
        Ok(Upload { local: local.into(), remote })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn sides_read_like_scp() {
        assert_eq!(
            Side::parse("last:/tmp/x").unwrap(),
            Side::Remote { session: "last".into(), path: "/tmp/x".into() }
        );
        assert_eq!(
            Side::parse("db-fix:").unwrap(),
            Side::Remote { session: "db-fix".into(), path: ".".into() }
        );
        assert_eq!(Side::parse("./a:b").unwrap(), Side::Local("./a:b".into()));
        assert_eq!(Side::parse("/abs/a:b").unwrap(), Side::Local("/abs/a:b".into()));
        assert_eq!(Side::parse("plain").unwrap(), Side::Local("plain".into()));
        let bad = Side::parse("Not_A_Name:x").unwrap_err().to_string();
        assert!(bad.contains("./Not_A_Name:x"), "{bad}");
    }

    #[test]
    fn exactly_one_side_is_on_a_box() {
        assert!(
            matches!(Transfer::parse(&s(&["a", "b"]), "c"), Err(e) if e.0.contains("both sides are on this machine"))
        );
        assert!(
            matches!(Transfer::parse(&s(&["last:a"]), "last:b"), Err(e) if e.0.contains("both sides are on boxes"))
        );
        assert!(
            matches!(Transfer::parse(&s(&["last:a", "db-fix:b"]), "."), Err(e) if e.0.contains("different sessions"))
        );
        assert_eq!(
            Transfer::parse(&s(&["a", "b"]), "last:").unwrap(),
            Transfer::Upload {
                session: "last".into(),
                sources: vec!["a".into(), "b".into()],
                dest: ".".into()
            }
        );
        assert_eq!(
            Transfer::parse(&s(&["last:/x", "last:y"]), "out").unwrap(),
            Transfer::Download { session: "last".into(), sources: s(&["/x", "y"]), dest: "out".into() }
        );
    }

    #[test]
    fn uploads_default_to_the_same_name_in_home() {
        let dir = std::env::temp_dir().join(format!("ea-upload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("fix.sh");
        std::fs::write(&file, "x").unwrap();
        let text = file.to_str().unwrap();
        assert_eq!(Upload::parse(text).unwrap().remote, "fix.sh");
        assert_eq!(Upload::parse(&format!("{text}:/tmp/y")).unwrap().remote, "/tmp/y");
        assert!(Upload::parse("/no/such/file").unwrap_err().0.contains("does not exist"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}

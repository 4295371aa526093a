//! The local session record: `$XDG_STATE_HOME/ephemeral-admin/sessions/<id>/session.toml`.
//!
//! Directories are 0700 and files 0600. Every write goes to a temporary file that is renamed
//! over the old one, so a crash leaves either the old record or the new one, never half of one.
//! AWS tags stay the source of truth; the record makes reconnect, teardown and cleanup fast and
//! remembers what tags cannot (the launching process, the private key).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Everything known locally about one session. Optional fields fill in as launch proceeds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SessionRecord {
    pub id: String,
    pub region: String,
    /// The session's owner as tagged (`aws::identity::owner_of` the caller, or the `owner`
    /// setting); the name is kept from when it was always the caller's full ARN.
    pub owner_arn: String,
    pub created_at: String,
    pub expires_at: String,
    /// Kept on purpose (`--keep`/`--detach`): not an orphan when its launcher is gone.
    pub kept: bool,
    pub user: String,
    /// How `connect` reaches the box unless told otherwise: the mode and proxy command template
    /// the session was launched with.
    pub connect: Option<String>,
    pub proxy_command: Option<String>,
    /// The process that launched or last attached to the session, and its start time (clock
    /// ticks since boot) so a recycled pid is not mistaken for it.
    pub pid: Option<u32>,
    pub pid_start: Option<u64>,
    pub host_key_public: String,
    pub host_key_fingerprint: String,
    pub client_key_public: String,
    pub security_group_id: Option<String>,
    pub ingress_rule_ids: Vec<String>,
    pub instance_profile_name: Option<String>,
    pub instance_id: Option<String>,
    pub spot_request_id: Option<String>,
    pub instance_type: Option<String>,
    pub availability_zone: Option<String>,
    pub market: Option<String>,
    pub price_per_hour: Option<f64>,
    pub public_ip: Option<String>,
    pub private_ip: Option<String>,
    pub alarm_name: Option<String>,
    pub launched_at: Option<String>,
    pub launch_attempts: Option<u32>,
    /// Launch phases, milliseconds since the launch started (for the ledger).
    #[serde(default)]
    pub timings_ms: std::collections::BTreeMap<String, u64>,
    pub ended_at: Option<String>,
    pub end_reason: Option<String>,
}

/// The sessions directory and the files in it.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn new(sessions_dir: impl Into<PathBuf>) -> Store {
        Store { root: sessions_dir.into() }
    }

    /// The ledger beside the sessions directory: `$XDG_STATE_HOME/ephemeral-admin/ledger.jsonl`.
    pub fn ledger(&self) -> crate::ledger::Ledger {
        crate::ledger::Ledger::new(self.root.parent().unwrap_or(&self.root).join("ledger.jsonl"))
    }

    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    pub fn record_path(&self, id: &str) -> PathBuf {
        self.dir(id).join("session.toml")
    }

    pub fn key_path(&self, id: &str) -> PathBuf {
        self.dir(id).join("id_ed25519")
    }

    /// Writes the record atomically, creating the session directory (0700) on first use.
    pub fn save(&self, record: &SessionRecord) -> anyhow::Result<()> {
        let dir = self.dir(&record.id);
        create_private_dir(&dir)?;
        let text = toml::to_string_pretty(record).context("serializing the session record")?;
        write_atomic(&self.record_path(&record.id), text.as_bytes())
    }

    pub fn load(&self, id: &str) -> anyhow::Result<Option<SessionRecord>> {
        let path = self.record_path(id);
        match fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map(Some).with_context(|| {
                format!(
                    "reading {}: the file is damaged; delete it and run `ephemeral-admin cleanup`",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Every session with a record, in id order. Unreadable records are skipped with a warning.
    pub fn all(&self) -> Vec<SessionRecord> {
        let Ok(entries) = fs::read_dir(&self.root) else { return Vec::new() };
        let mut ids: Vec<String> =
            entries.filter_map(|e| e.ok()).filter_map(|e| e.file_name().into_string().ok()).collect();
        ids.sort();
        ids.iter()
            .filter(|id| super::is_valid_id(id))
            .filter_map(|id| match self.load(id) {
                Ok(record) => record,
                Err(e) => {
                    tracing::warn!("{e:#}");
                    None
                }
            })
            .collect()
    }

    /// Writes the session's private key (0600) and returns its path.
    pub fn save_private_key(&self, id: &str, openssh_pem: &str) -> anyhow::Result<PathBuf> {
        create_private_dir(&self.dir(id))?;
        let path = self.key_path(id);
        write_atomic(&path, openssh_pem.as_bytes())?;
        Ok(path)
    }

    pub fn delete_private_key(&self, id: &str) -> anyhow::Result<()> {
        match fs::remove_file(self.key_path(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("deleting the private key of session {id}"))
            }
            _ => Ok(()),
        }
    }

    /// Removes the whole session directory (record and key).
    pub fn forget(&self, id: &str) -> anyhow::Result<()> {
        match fs::remove_dir_all(self.dir(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing the local record of session {id}"))
            }
            _ => Ok(()),
        }
    }
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Writes `bytes` to a 0600 temporary file beside `path`, syncs it, and renames it into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("a file path has a parent")?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// This process's start time in clock ticks since boot (Linux), to tell a live launcher from a
/// recycled pid.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after the last ')' are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// True when the process that recorded (pid, start) still runs.
pub fn process_alive(pid: u32, start: Option<u64>) -> bool {
    match (process_start_ticks(pid), start) {
        (Some(now), Some(then)) => now == then,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn records_round_trip_privately() {
        let root = std::env::temp_dir().join(format!("ea-store-{}", std::process::id()));
        let store = Store::new(&root);
        let record =
            SessionRecord { id: "abcdefgh".into(), region: "us-east-1".into(), ..Default::default() };
        store.save(&record).unwrap();
        assert_eq!(store.load("abcdefgh").unwrap().unwrap(), record);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&store.dir("abcdefgh")), 0o700);
        assert_eq!(mode(&store.record_path("abcdefgh")), 0o600);
        let key = store.save_private_key("abcdefgh", "KEY").unwrap();
        assert_eq!(mode(&key), 0o600);
        store.delete_private_key("abcdefgh").unwrap();
        assert!(!key.exists());
        assert_eq!(store.all().len(), 1);
        store.forget("abcdefgh").unwrap();
        assert!(store.load("abcdefgh").unwrap().is_none());
    }

    #[test]
    fn this_process_is_alive() {
        let me = std::process::id();
        let start = process_start_ticks(me);
        assert!(start.is_some());
        assert!(process_alive(me, start));
        assert!(!process_alive(me, start.map(|s| s + 1)));
    }
}

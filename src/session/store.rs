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
    /// The name given with `launch --name`, if any.
    pub name: Option<String>,
    pub region: String,
    /// The AWS account and partition the session was launched in (see [`super::Scope`]).
    pub account: String,
    pub partition: String,
    /// The session's owner as tagged (`aws::identity::owner_of` the caller, or the `owner`
    /// setting); the name is kept from when it was always the caller's full ARN.
    pub owner_arn: String,
    pub created_at: String,
    pub expires_at: String,
    /// Kept on purpose (`--keep`/`--detach`/`--tmux`, or left running by `connect`): not an
    /// orphan when its launcher is gone.
    pub kept: bool,
    /// How long its box stays up without an SSH connection (`idle_grace`, or `kept_idle_grace`
    /// for a kept session), as baked into its watchdog.
    pub idle_grace_secs: Option<u64>,
    pub user: String,
    /// How `connect` reaches the box unless told otherwise: the mode and proxy command template
    /// the session was launched with.
    pub connect: Option<String>,
    pub proxy_command: Option<String>,
    /// `connect = "eice"`: the endpoint the box is reached through, and its DnsName.
    pub eice_endpoint_id: Option<String>,
    pub eice_dns_name: Option<String>,
    /// The port of the resume relay on the box's loopback (`connect = "eice"` boxes from this
    /// version on): SSH rides out the end of a tunnel through it. None: straight to sshd, one
    /// tunnel per connection.
    pub resume_port: Option<u16>,
    /// The process that launched or last attached to the session, and its start time
    /// (`lifecycle::process_start`) so a recycled pid is not mistaken for it.
    pub pid: Option<u32>,
    pub pid_start: Option<u64>,
    /// The host key every connection pins (`ssh-ed25519 AAAA… comment`) and its fingerprint.
    pub host_key_public: String,
    pub host_key_fingerprint: String,
    /// Where that key came from (`crate::commands::hostkey`): the user-data until the first
    /// connection has the box make its own. None: a record from before the rotation (its box
    /// keeps the user-data key).
    pub host_key_state: Option<HostKeyState>,
    /// While [`HostKeyState::Rotating`]: the key the box made (it may offer either until the
    /// rotation is finished).
    pub host_key_next: Option<String>,
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
    /// The session's EventBridge Scheduler schedules (`aws::schedule`): the deadline outside
    /// the box and the sweeps after it.
    pub schedule_names: Vec<String>,
    /// The role those schedules run as (to re-arm a group sweep at teardown).
    pub schedule_role_arn: Option<String>,
    pub launched_at: Option<String>,
    pub launch_attempts: Option<u32>,
    /// Launch phases, milliseconds since the launch started (for the ledger).
    #[serde(default)]
    pub timings_ms: std::collections::BTreeMap<String, u64>,
    pub ended_at: Option<String>,
    pub end_reason: Option<String>,
    /// The root volume's size and type (absent in records written before they were settings).
    pub root_volume_gb: Option<u32>,
    pub root_volume_type: Option<String>,
    /// The OpenSSH config file `ssh-config --install` wrote this session's host block into;
    /// teardown and cleanup remove the block from it.
    pub ssh_config_file: Option<std::path::PathBuf>,
}

/// The rotation of a session's host key away from the one its user-data carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostKeyState {
    /// The pinned key is the user-data's: the first connection rotates it.
    UserData,
    /// The box made `host_key_next` and may have switched sshd to it: the next connection accepts
    /// either key and finishes the rotation.
    Rotating,
    /// The pinned key is the box's own, made on the box.
    Box,
}

impl SessionRecord {
    /// The root volume the box was launched with (8 GB gp3 for older records).
    pub fn root_volume(&self) -> crate::settings::RootVolume {
        let default = crate::settings::RootVolume::default();
        crate::settings::RootVolume {
            gb: self.root_volume_gb.unwrap_or(default.gb),
            kind: self
                .root_volume_type
                .as_deref()
                .and_then(crate::settings::VolumeKind::from_name)
                .unwrap_or(default.kind),
        }
    }

    /// (partition, account), from the fields or, for older records, from the owner ARN
    /// (`arn:PARTITION:sts::ACCOUNT:…`).
    pub fn partition_and_account(&self) -> (&str, Option<&str>) {
        let arn: Vec<&str> = self.owner_arn.split(':').collect();
        let partition =
            if self.partition.is_empty() { arn.get(1).copied().unwrap_or("aws") } else { &self.partition };
        let account = if self.account.is_empty() {
            arn.get(4).copied().filter(|a| !a.is_empty())
        } else {
            Some(self.account.as_str())
        };
        (partition, account)
    }
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

    /// The state directory the sessions directory lives in (`$XDG_STATE_HOME/ephemeral-admin`).
    /// The record knows nothing of the ledger; `ledger::Ledger::beside` puts it here.
    pub fn state_dir(&self) -> &Path {
        self.root.parent().unwrap_or(&self.root)
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

    /// Read-modify-write of one record under an exclusive lock (`flock` on `<id>/.lock`, held
    /// until the new record is in place), so `launch`, `connect`, `extend` and teardown running at
    /// once never lose each other's changes. `None` when there is no record.
    pub fn update<T>(
        &self,
        id: &str,
        change: impl FnOnce(&mut SessionRecord) -> T,
    ) -> anyhow::Result<Option<T>> {
        let _lock = self.lock(id)?;
        let Some(mut record) = self.load(id)? else { return Ok(None) };
        let out = change(&mut record);
        self.save(&record)?;
        Ok(Some(out))
    }

    /// Writes a new record, or applies `change` to the one on disk, under the record's lock.
    pub fn create_or_update(
        &self,
        initial: &SessionRecord,
        change: impl FnOnce(&mut SessionRecord),
    ) -> anyhow::Result<()> {
        let _lock = self.lock(&initial.id)?;
        let mut record = self.load(&initial.id)?.unwrap_or_else(|| initial.clone());
        change(&mut record);
        self.save(&record)
    }

    fn lock(&self, id: &str) -> anyhow::Result<FileLock> {
        create_private_dir(&self.dir(id))?;
        FileLock::acquire(&self.dir(id).join(".lock"))
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

    /// The records of one (partition, account, region): the only ones a command may change.
    pub fn in_scope(&self, scope: &super::Scope) -> Vec<SessionRecord> {
        self.all().into_iter().filter(|r| scope.holds(r)).collect()
    }

    /// How many live (not ended) records belong to other accounts, for `list` to mention.
    pub fn elsewhere(&self, scope: &super::Scope) -> usize {
        self.all()
            .iter()
            .filter(|r| r.ended_at.is_none() && r.partition_and_account().1 != Some(scope.account.as_str()))
            .count()
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

/// An exclusive `flock` on a lock file (created 0600), held until dropped: closing the file
/// releases it. Guards read-modify-write of the tool's local files against concurrent commands.
pub struct FileLock(#[allow(dead_code)] fs::File);

impl FileLock {
    pub fn acquire(path: &Path) -> anyhow::Result<FileLock> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; it blocks until the lock is ours.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", path.display()));
        }
        Ok(FileLock(file))
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
}

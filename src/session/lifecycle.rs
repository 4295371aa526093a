//! Where a session is in its life: the one definition `list`, `cleanup`, the launch sweep and
//! the ledger's settling all use, so they can never disagree about whether a session is over.
//!
//! - **launching**: a record, no instance yet, and its launcher is not known to be gone;
//! - **attached**: its instance lives and the process that launched (or last attached to) it is
//!   alive, or cannot be checked;
//! - **kept**: its instance lives and the user meant it to outlive the client (`--keep`,
//!   `--detach`, `--tmux`, or left running by `connect`);
//! - **orphaned**: its instance lives, it was not kept, and its launcher is certainly gone
//!   without having torn it down (the only live phase `cleanup` removes unasked);
//! - **over**: ended, its instance gone, past its deadline, or half-made by a launcher that died.
//!
//! "Is the launcher alive" must work where there is no `/proc` (macOS), and "cannot tell" is never
//! "dead": a session whose launcher cannot be checked is treated as attached.

use time::OffsetDateTime;

use super::store::SessionRecord;

/// Whether a session's client process is still there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    Alive,
    /// No such process, or the pid now belongs to a process that started later.
    Gone,
    /// It exists but its start time cannot be read (to rule out a recycled pid), or no check
    /// is possible: treated as alive.
    Unknown,
}

/// What AWS says about a session's instance, when the caller asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instance {
    /// `pending` or `running`.
    Live,
    /// `stopping`, `stopped`: it will not come back on its own.
    Stuck,
    /// Terminated or shutting down.
    Gone,
    /// Not in EC2's answer at all: forgotten (terminated over an hour ago), or launched moments
    /// ago and not visible yet (EC2 is eventually consistent); the launch time tells which.
    Unseen,
    /// Nothing was asked (the launch sweep reads local records only).
    NotAsked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Launching,
    Attached { pid: Option<u32> },
    Kept,
    Orphaned { pid: u32 },
    Over(String),
}

impl Phase {
    /// Whether `cleanup` (without `--all` or naming it) and the launch sweep remove it.
    pub fn is_abandoned(&self) -> bool {
        matches!(self, Phase::Orphaned { .. } | Phase::Over(_))
    }

    pub fn describe(&self) -> String {
        match self {
            Phase::Launching => "launching".into(),
            Phase::Attached { pid: Some(pid) } => format!("in use by pid {pid}"),
            Phase::Attached { pid: None } => "attached elsewhere (no local record)".into(),
            Phase::Kept => "kept on purpose".into(),
            Phase::Orphaned { pid } => format!("orphaned: its client (pid {pid}) is gone"),
            Phase::Over(why) => why.clone(),
        }
    }
}

/// The one definition. `record` is this machine's record (if any), `instance` what AWS said,
/// `kept_tag` the instance's mode tag, `expires` the deadline from the tag or the record.
pub fn phase(
    record: Option<&SessionRecord>,
    instance: Instance,
    kept_tag: bool,
    expires: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> Phase {
    if let Some(reason) = record.and_then(|r| r.ended_at.as_ref().and(r.end_reason.as_ref())) {
        return Phase::Over(format!("ended ({reason})"));
    }
    let launcher = record.map(launcher_of);
    let has_instance = record.is_some_and(|r| r.instance_id.is_some());
    let instance = match instance {
        Instance::Unseen
            if has_instance
                && crate::aws::instances::must_be_known(
                    record.and_then(|r| r.launched_at.as_deref()),
                    now,
                ) =>
        {
            return Phase::Launching;
        }
        Instance::Unseen => Instance::Gone,
        other => other,
    };
    match instance {
        Instance::Gone if has_instance || record.is_none() => {
            return Phase::Over("its instance is gone".into());
        }
        Instance::Stuck => return Phase::Over("its instance is stopped".into()),
        Instance::Gone | Instance::NotAsked if !has_instance => {
            return match launcher {
                Some(Launcher::Gone) => Phase::Over("half-made: its launcher died before an instance".into()),
                _ => Phase::Launching,
            };
        }
        _ => {}
    }
    if expires.is_some_and(|t| t <= now) {
        return Phase::Over("past its deadline".into());
    }
    if kept_tag || record.is_some_and(|r| r.kept) {
        return Phase::Kept;
    }
    let pid = record.and_then(|r| r.pid);
    match (launcher, pid) {
        (Some(Launcher::Gone), Some(pid)) => Phase::Orphaned { pid },
        _ => Phase::Attached { pid },
    }
}

/// Whether the record's client process still runs.
pub fn launcher_of(record: &SessionRecord) -> Launcher {
    match record.pid {
        Some(pid) => process_state(pid, record.pid_start),
        None => Launcher::Gone,
    }
}

/// A portable check: `kill(pid, 0)` says whether the pid exists (ESRCH: certainly not); the
/// process's start time, where it can be read, rules out a recycled pid.
pub fn process_state(pid: u32, recorded_start: Option<u64>) -> Launcher {
    let Ok(raw) = libc::pid_t::try_from(pid) else { return Launcher::Unknown };
    // SAFETY: kill with signal 0 only checks whether the process exists; no memory is involved.
    let exists = unsafe { libc::kill(raw, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    if !exists {
        return Launcher::Gone;
    }
    match (process_start(pid), recorded_start) {
        (Some(now), Some(then)) if now == then => Launcher::Alive,
        (Some(_), Some(_)) => Launcher::Gone,
        _ => Launcher::Unknown,
    }
}

/// An opaque token for when a process started, stable for its lifetime: clock ticks since boot
/// on Linux (`/proc/PID/stat`), seconds and microseconds since the epoch on macOS
/// (`proc_pidinfo`). `None` where it cannot be read (no `/proc`, another OS, no permission).
pub fn process_start(pid: u32) -> Option<u64> {
    platform::process_start(pid)
}

#[cfg(target_os = "linux")]
mod platform {
    pub fn process_start(pid: u32) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may contain spaces; fields after the last ')' are fixed.
        let rest = &stat[stat.rfind(')')? + 2..];
        rest.split_whitespace().nth(19)?.parse().ok()
    }
}

#[cfg(target_os = "macos")]
mod platform {
    pub fn process_start(pid: u32) -> Option<u64> {
        let mut info: libc::proc_bsdinfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::proc_bsdinfo>() as libc::c_int;
        // SAFETY: `info` is a writable buffer of exactly `size` bytes.
        let n = unsafe {
            libc::proc_pidinfo(
                pid as libc::c_int,
                libc::PROC_PIDTBSDINFO,
                0,
                (&mut info as *mut libc::proc_bsdinfo).cast(),
                size,
            )
        };
        (n == size).then(|| info.pbi_start_tvsec * 1_000_000 + info.pbi_start_tvusec)
    }
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
mod platform {
    pub fn process_start(_pid: u32) -> Option<u64> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kept: bool, instance: bool, pid: Option<u32>, start: Option<u64>) -> SessionRecord {
        SessionRecord {
            id: "abcdefgh".into(),
            kept,
            instance_id: instance.then(|| "i-0123456789abcdef0".into()),
            pid,
            pid_start: start,
            ..Default::default()
        }
    }

    #[test]
    fn this_process_is_alive_and_a_recycled_pid_is_not() {
        let me = std::process::id();
        let start = process_start(me);
        assert!(start.is_some());
        assert_eq!(process_state(me, start), Launcher::Alive);
        assert_eq!(process_state(me, start.map(|s| s + 1)), Launcher::Gone);
        // Exists, but nothing to compare against: cannot tell, never "dead".
        assert_eq!(process_state(me, None), Launcher::Unknown);
    }

    #[test]
    fn a_pid_that_does_not_exist_is_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert_eq!(process_state(pid, Some(1)), Launcher::Gone);
    }

    #[test]
    fn one_definition_of_each_phase() {
        let now = OffsetDateTime::now_utc();
        let later = Some(now + time::Duration::hours(1));
        let me = std::process::id();
        let alive = record(false, true, Some(me), process_start(me));
        assert_eq!(phase(Some(&alive), Instance::Live, false, later, now), Phase::Attached { pid: Some(me) });
        let dead_pid = {
            let mut c = std::process::Command::new("true").spawn().unwrap();
            let pid = c.id();
            c.wait().unwrap();
            pid
        };
        let orphan = record(false, true, Some(dead_pid), Some(1));
        assert_eq!(
            phase(Some(&orphan), Instance::Live, false, later, now),
            Phase::Orphaned { pid: dead_pid }
        );
        assert_eq!(phase(Some(&orphan), Instance::Live, true, later, now), Phase::Kept, "kept by tag");
        let unknown = record(false, true, Some(me), None);
        assert_eq!(
            phase(Some(&unknown), Instance::Live, false, later, now),
            Phase::Attached { pid: Some(me) }
        );
        assert!(phase(Some(&alive), Instance::Live, false, Some(now), now).is_abandoned(), "deadline");
        assert!(phase(Some(&alive), Instance::Gone, false, later, now).is_abandoned());
        let launching = record(false, false, Some(me), process_start(me));
        assert_eq!(phase(Some(&launching), Instance::Gone, false, later, now), Phase::Launching);
        let half = record(false, false, Some(dead_pid), Some(1));
        assert!(phase(Some(&half), Instance::NotAsked, false, later, now).is_abandoned());
        assert_eq!(phase(None, Instance::Live, false, later, now), Phase::Attached { pid: None });
    }

    #[test]
    fn an_instance_ec2_does_not_show_is_gone_only_once_it_could_have_been_forgotten() {
        let now = OffsetDateTime::now_utc();
        let later = Some(now + time::Duration::hours(4));
        let launched = |ago: time::Duration| SessionRecord {
            launched_at: Some(crate::session::rfc3339(now - ago)),
            ..record(true, true, None, None)
        };
        let young = launched(time::Duration::seconds(5));
        assert_eq!(phase(Some(&young), Instance::Unseen, false, later, now), Phase::Launching);
        let old = launched(time::Duration::hours(2));
        assert!(phase(Some(&old), Instance::Unseen, false, later, now).is_abandoned());
        assert!(phase(Some(&young), Instance::Gone, false, later, now).is_abandoned(), "terminated");
    }
}

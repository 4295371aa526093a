//! The copy itself, the same in both directions: walk every source first (so the progress bar
//! knows the total), resolve each target, then create directories, stream files and set modes.
//!
//! A failing file or directory is recorded and the copy goes on with the rest; a lost connection
//! stops it (every further request would fail the same way).
//!
//! The source's listings are untrusted (a box may be compromised): a name that is empty, `.`,
//! `..`, holds `/` or NUL, is longer than a file system allows or is listed twice is refused
//! (CVE-2019-6111 was scp trusting such names), so every target is its root plus plain names.
//! Modes: a new file or directory gets the source's permission bits less the umask, without
//! setuid, setgid or sticky; `--preserve` keeps them exactly but for setuid and setgid, never
//! copied. A directory that was already there keeps its mode.

use std::collections::HashSet;

use indicatif::ProgressBar;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::output::{box_name, box_text};

use super::Outcome;
use super::fs::{End, FsError, Meta};

/// Bytes read from the source and handed to the destination at a time.
const CHUNK: usize = 1024 * 1024;
/// Deeper than this is taken for a symlink loop.
const MAX_DEPTH: usize = 64;

/// One thing to copy, relative to its source root (`""` is the root itself).
struct Entry {
    rel: String,
    meta: Meta,
}

/// A source, walked, with the target it goes to.
struct Job {
    source: String,
    target: String,
    /// The target is the path the user typed (its own symlinks are followed, as `cp` does);
    /// else it is a name under it.
    typed: bool,
    entries: Vec<Entry>,
}

/// Longest name most file systems hold (NAME_MAX), in bytes.
const NAME_MAX: usize = 255;

/// Why a name from a directory listing cannot be copied, if it cannot.
fn bad_name(name: &str) -> Option<&'static str> {
    match name {
        "" => Some("an empty name"),
        "." | ".." => Some("it names a directory, not an entry in it"),
        _ if name.contains('/') => Some("a `/` in a name would put it in another directory"),
        _ if name.contains('\0') => Some("a NUL byte, which no path can hold"),
        _ if name.len() > NAME_MAX => Some("longer than 255 bytes, which no file system here holds"),
        _ => None,
    }
}

/// The mode a new file or directory gets from its source's `mode`; `created` is what a new one
/// gets by default (the umask of the end that creates it, applied to 0777).
fn new_mode(mode: u32, preserve: bool, created: u32) -> u32 {
    match preserve {
        true => mode & 0o1777,
        false => mode & 0o777 & created,
    }
}

fn join(dir: &str, name: &str) -> String {
    match (dir, name) {
        (_, "") => dir.to_string(),
        ("" | ".", _) => name.to_string(),
        (d, _) if d.ends_with('/') => format!("{d}{name}"),
        _ => format!("{dir}/{name}"),
    }
}

/// The last component of a path (`dir/` gives `dir`); `None` for `.`, `..` and `/`.
fn base_name(path: &str) -> Option<&str> {
    let trimmed = path.trim_end_matches('/');
    let base = trimmed.rsplit('/').next().unwrap_or(trimmed);
    (!matches!(base, "" | "." | "..")).then_some(base)
}

struct Copy<'a, S: End, D: End> {
    from: &'a S,
    to: &'a D,
    bar: Option<ProgressBar>,
    outcome: Outcome,
    /// Set once the connection is gone: the copy stops.
    lost: bool,
    /// `--preserve`: modes as the source has them (never setuid or setgid), not the umask.
    preserve: bool,
}

/// Copies `sources` (on `from`) to `dest` (on `to`).
pub async fn copy_all<S: End, D: End>(
    from: &S,
    to: &D,
    sources: &[String],
    dest: &str,
    recursive: bool,
    preserve: bool,
    bar: Option<ProgressBar>,
) -> Outcome {
    let mut copy = Copy { from, to, bar, outcome: Outcome::default(), lost: false, preserve };
    let jobs = copy.plan(sources, dest, recursive).await;
    if let Some(bar) = &copy.bar {
        bar.set_length(
            jobs.iter().flat_map(|j| &j.entries).filter(|e| !e.meta.dir).map(|e| e.meta.size).sum(),
        );
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    }
    for job in &jobs {
        if copy.lost {
            break;
        }
        copy.run(job).await;
    }
    if let Some(bar) = &copy.bar {
        bar.finish_and_clear();
    }
    copy.outcome
}

impl<S: End, D: End> Copy<'_, S, D> {
    fn fail(&mut self, line: String) {
        self.outcome.failures.push(line);
    }

    fn fail_from(&mut self, path: &str, error: FsError) {
        self.lost |= matches!(error, FsError::Lost(_));
        let line = self.from.explain(path, &error);
        self.fail(line);
    }

    fn fail_to(&mut self, path: &str, error: FsError) {
        self.lost |= matches!(error, FsError::Lost(_));
        let line = self.to.explain(path, &error);
        self.fail(line);
    }

    /// Walks each source and finds its target; failures are recorded, those sources skipped.
    async fn plan(&mut self, sources: &[String], dest: &str, recursive: bool) -> Vec<Job> {
        let dest_meta = match self.to.stat(dest).await {
            Ok(meta) => meta,
            Err(e) => {
                self.fail_to(dest, e);
                return Vec::new();
            }
        };
        let into_dir = dest_meta.is_some_and(|m| m.dir);
        if !into_dir && (sources.len() > 1 || dest.ends_with('/')) {
            let why = match dest_meta {
                Some(_) => {
                    FsError::Said("not a directory, and several sources can only go into a directory".into())
                }
                None => FsError::NotFound,
            };
            self.fail_to(dest, why);
            return Vec::new();
        }
        let mut jobs = Vec::new();
        for source in sources {
            let Some(entries) = self.walk(source, recursive).await else { continue };
            let (target, typed) = match (into_dir, base_name(source)) {
                (true, Some(base)) => (join(dest, base), false),
                // `cp -r dir/. dest`: the contents go into dest itself.
                _ => (dest.to_string(), true),
            };
            jobs.push(Job { source: source.clone(), target, typed, entries });
            if self.lost {
                break;
            }
        }
        jobs
    }

    /// The source and, with `recursive`, everything under it (directories before their contents).
    async fn walk(&mut self, source: &str, recursive: bool) -> Option<Vec<Entry>> {
        let meta = match self.from.stat(source).await {
            Ok(Some(meta)) => meta,
            Ok(None) => {
                self.fail_from(source, FsError::NotFound);
                return None;
            }
            Err(e) => {
                self.fail_from(source, e);
                return None;
            }
        };
        if meta.dir && !recursive {
            let line = format!(
                "{}: is a directory; pass -r to copy it with everything in it",
                self.from.name(source)
            );
            self.fail(line);
            return None;
        }
        let mut entries = vec![Entry { rel: String::new(), meta }];
        let mut next = 0;
        while next < entries.len() && !self.lost {
            let (rel, dir) = (entries[next].rel.clone(), entries[next].meta.dir);
            next += 1;
            if !dir {
                continue;
            }
            if rel.matches('/').count() >= MAX_DEPTH {
                let line = format!(
                    "{}: more than {MAX_DEPTH} levels deep (a symlink loop?); skipped",
                    self.from.name(&join(source, &rel))
                );
                self.fail(line);
                continue;
            }
            let path = join(source, &rel);
            let names = match self.from.list(&path).await {
                Ok(names) => names,
                Err(e) => {
                    self.fail_from(&path, e);
                    continue;
                }
            };
            for (name, known) in self.checked(&path, names) {
                let child = join(&rel, &name);
                if let Some(meta) = known {
                    entries.push(Entry { rel: child, meta });
                    continue;
                }
                match self.from.stat(&join(source, &child)).await {
                    Ok(Some(meta)) => entries.push(Entry { rel: child, meta }),
                    // Gone since the listing, or a dangling symlink: nothing to copy.
                    Ok(None) => tracing::debug!("{} vanished or dangles; skipped", box_text(&child)),
                    Err(e) => self.fail_from(&join(source, &child), e),
                }
            }
        }
        Some(entries)
    }

    /// The entries of one listing of `dir` that can be copied; the others are refused, each
    /// with a line naming it (escaped).
    fn checked(&mut self, dir: &str, mut names: Vec<(String, Option<Meta>)>) -> Vec<(String, Option<Meta>)> {
        // Sorted by name: a name listed twice (a file and a directory?) is two neighbours.
        let twice: HashSet<String> =
            names.windows(2).filter(|w| w[0].0 == w[1].0).map(|w| w[0].0.clone()).collect();
        names.dedup_by(|a, b| a.0 == b.0);
        let mut good = Vec::with_capacity(names.len());
        for (name, known) in names {
            let listed_twice =
                twice.contains(&name).then_some("listed twice, so which one is meant is unknown");
            match bad_name(&name).or(listed_twice) {
                None => good.push((name, known)),
                Some(why) => {
                    let line = format!(
                        "{}: refused the entry {} listed in it: {why}; nothing was written for it (a box that lists such a name may be compromised: look before trusting what it sends)",
                        self.from.name(dir),
                        box_name(&name)
                    );
                    self.fail(line);
                }
            }
        }
        good
    }

    /// Copies one walked source: directories, then files, then the modes of the directories it
    /// made (deepest first, so a read-only directory is closed only once its contents are in).
    async fn run(&mut self, job: &Job) {
        let mut made = Vec::new();
        let mut failed_dirs: Vec<&str> = Vec::new();
        for entry in &job.entries {
            if self.lost {
                return;
            }
            let under_failed =
                failed_dirs.iter().any(|d| entry.rel.starts_with(&format!("{d}/")) || d.is_empty());
            if under_failed {
                continue;
            }
            let (from, to) = (join(&job.source, &entry.rel), join(&job.target, &entry.rel));
            // Below what the user typed, no symlink is followed and no name leaves the target.
            let follow = job.typed && entry.rel.is_empty();
            if !entry.rel.is_empty()
                && let Err(e) = self.to.guard(&job.target, &entry.rel).await
            {
                self.fail_to(&to, e);
                failed_dirs.push(&entry.rel);
                continue;
            }
            if entry.meta.dir {
                match self.dir(&to, entry.meta.mode, follow).await {
                    Ok(Some(mode)) => made.push((to, mode)),
                    Ok(None) => {}
                    Err(()) => failed_dirs.push(&entry.rel),
                }
            } else if self.file(&from, &to, entry.meta, follow).await {
                self.outcome.files += 1;
                self.outcome.bytes += entry.meta.size;
            }
        }
        for (dir, mode) in made.into_iter().rev() {
            if let Err(e) = self.to.set_mode(&dir, mode).await {
                self.fail_to(&dir, e);
            }
        }
    }

    /// Makes one directory; `Some(mode)` when the mode it must end with differs from the one it
    /// got. One that was there already keeps its mode: it is its owner's business.
    async fn dir(&mut self, to: &str, mode: u32, follow: bool) -> Result<Option<u32>, ()> {
        match self.to.mkdir(to, follow).await {
            Ok(Some(created)) => {
                let mode = new_mode(mode, self.preserve, created);
                Ok((mode != created).then_some(mode))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.fail_to(to, e);
                Err(())
            }
        }
    }

    /// Streams one file; true when it arrived whole.
    async fn file(&mut self, from: &str, to: &str, meta: Meta, follow: bool) -> bool {
        let mut reader = match self.from.open(from).await {
            Ok(r) => r,
            Err(e) => {
                self.fail_from(from, e);
                return false;
            }
        };
        let mut writer = match self.to.create(to, meta.mode, follow).await {
            Ok(w) => w,
            Err(e) => {
                self.fail_to(to, e);
                return false;
            }
        };
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match reader.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    self.fail_from(from, e.into());
                    return false;
                }
            };
            if let Err(e) = writer.write_all(&buf[..n]).await {
                self.fail_to(to, e.into());
                return false;
            }
            if let Some(bar) = &self.bar {
                bar.inc(n as u64);
            }
        }
        drop(reader);
        let mode = self.preserve.then_some(meta.mode & 0o1777);
        match self.to.finish(writer, to, mode).await {
            Ok(()) => true,
            Err(e) => {
                self.fail_to(to, e);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_join_and_name_like_cp() {
        assert_eq!(join("/tmp", "a"), "/tmp/a");
        assert_eq!(join("/tmp/", "a"), "/tmp/a");
        assert_eq!(join(".", "a"), "a");
        assert_eq!(join("", "a"), "a");
        assert_eq!(join("/tmp/x", ""), "/tmp/x");
        assert_eq!(base_name("dir/"), Some("dir"));
        assert_eq!(base_name("/var/log/syslog"), Some("syslog"));
        assert_eq!(base_name("."), None);
        assert_eq!(base_name("/"), None);
        assert_eq!(base_name("a/.."), None);
    }

    #[test]
    fn hostile_names_are_refused() {
        for bad in ["", ".", "..", "../x", "a/b", "/etc/passwd", "nul\0x", &"x".repeat(256)] {
            assert!(bad_name(bad).is_some(), "{bad:?}");
        }
        for good in ["a", "..a", "a..", ".hidden", "with space", "\x1b[31mred", "é", &"x".repeat(255)] {
            assert_eq!(bad_name(good), None, "{good:?}");
        }
    }

    #[test]
    fn modes_lose_the_umask_and_special_bits_unless_preserved() {
        assert_eq!(new_mode(0o4755, false, 0o755), 0o755);
        assert_eq!(new_mode(0o2775, false, 0o750), 0o750);
        assert_eq!(new_mode(0o1777, false, 0o755), 0o755);
        assert_eq!(new_mode(0o600, false, 0o755), 0o600);
        assert_eq!(new_mode(0o6755, true, 0o700), 0o755);
        assert_eq!(new_mode(0o1777, true, 0o700), 0o1777);
        assert_eq!(new_mode(0o666, true, 0o755), 0o666);
    }
}

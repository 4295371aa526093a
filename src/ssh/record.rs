//! Session recording in asciicast v2 (the asciinema format): a JSON header line, then one JSON
//! array per event: `[seconds, "o", text]` for terminal output and `[seconds, "r", "WxH"]` for a
//! resize. Output arrives in arbitrary byte chunks, so a UTF-8 sequence cut at a chunk edge is
//! held back until the next chunk completes it; bytes that can never be UTF-8 become U+FFFD.
//!
//! A recording holds whatever was typed and shown (passwords echoed, secrets printed), so its
//! file is the user's alone: created 0600, an existing file narrowed to at most 0600 (never
//! widened), and a symbolic link or anything but a regular file refused rather than followed.

use std::io::Write;
use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::{Map, Value, json};

/// What the header says about the recording.
pub struct Header<'a> {
    pub width: u16,
    pub height: u16,
    /// Unix time the recording started.
    pub timestamp: u64,
    /// The remote command, when it was not the login shell.
    pub command: Option<&'a str>,
    pub term: &'a str,
    /// The `SHELL` to note in the header's `env` (asciinema records the local one).
    pub shell: Option<&'a str>,
}

/// Writes one asciicast v2 recording. Each event is flushed as it is written, so a recording cut
/// short by a crash is still readable up to that point.
pub struct Recorder<W: Write> {
    out: W,
    started: Instant,
    /// The start of a UTF-8 sequence that the next chunk should complete (at most 3 bytes).
    pending: Vec<u8>,
}

impl Recorder<std::io::BufWriter<std::fs::File>> {
    /// Creates (or truncates) `path`, private to the user (see the module), and writes the header.
    pub fn create(path: &Path, header: &Header<'_>) -> anyhow::Result<Self> {
        let file = open_private(path)
            .with_context(|| format!("cannot create the recording file {}", path.display()))?;
        Recorder::new(std::io::BufWriter::new(file), header)
            .with_context(|| format!("cannot write the recording file {}", path.display()))
    }
}

/// Whether `path` can take a recording, asked before anything is launched: nothing there yet
/// (in a directory that exists), or a regular file. The reason when not.
pub fn check_path(path: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => Err("it is a symbolic link: name a plain file".into()),
        Ok(meta) if !meta.is_file() => Err("it is not a regular file: name a plain file".into()),
        Ok(_) => Ok(()),
        Err(_) => match path.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(dir) if !dir.is_dir() => Err(format!("there is no directory {}", dir.display())),
            _ => Ok(()),
        },
    }
}

/// Opens `path` for writing from its start, mode 0600 at most: a new file is created 0600 (no
/// moment with a wider mode); an existing regular file is narrowed before it is truncated. A
/// symbolic link, a directory, a FIFO or a device is refused (O_NOFOLLOW guards the race too).
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let refuse = |why: &str| std::io::Error::other(format!("it is {why}: name a plain file"));
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => return Err(refuse("a symbolic link")),
        Ok(meta) if !meta.is_file() => return Err(refuse("not a regular file")),
        _ => {}
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| if e.raw_os_error() == Some(libc::ELOOP) { refuse("a symbolic link") } else { e })?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(refuse("not a regular file"));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & !0o600 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o600))?;
    }
    file.set_len(0)?;
    Ok(file)
}

impl<W: Write> Recorder<W> {
    /// Starts a recording on `out`: writes the header line now; event times count from here.
    pub fn new(mut out: W, header: &Header<'_>) -> std::io::Result<Self> {
        let mut env = Map::new();
        env.insert("TERM".into(), Value::from(header.term));
        if let Some(shell) = header.shell {
            env.insert("SHELL".into(), Value::from(shell));
        }
        let mut line = json!({
            "version": 2,
            "width": header.width,
            "height": header.height,
            "timestamp": header.timestamp,
        });
        if let Some(command) = header.command {
            line["command"] = Value::from(command);
        }
        line["env"] = Value::Object(env);
        writeln!(out, "{line}")?;
        out.flush()?;
        Ok(Recorder { out, started: Instant::now(), pending: Vec::new() })
    }

    /// Records a chunk of terminal output.
    pub fn output(&mut self, data: &[u8]) -> std::io::Result<()> {
        let text = self.decode(data);
        if text.is_empty() {
            return Ok(());
        }
        self.event("o", &text)
    }

    /// Records a terminal resize to `width` columns by `height` rows.
    pub fn resize(&mut self, width: u16, height: u16) -> std::io::Result<()> {
        self.event("r", &format!("{width}x{height}"))
    }

    /// Writes out anything still held back (as U+FFFD: the stream ended mid-character) and
    /// flushes. Returns the writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        if !self.pending.is_empty() {
            let text = String::from_utf8_lossy(&std::mem::take(&mut self.pending)).into_owned();
            self.event("o", &text)?;
        }
        self.out.flush()?;
        Ok(self.out)
    }

    fn event(&mut self, kind: &str, text: &str) -> std::io::Result<()> {
        let seconds = (self.started.elapsed().as_secs_f64() * 1e6).round() / 1e6;
        let line = serde_json::to_string(&(seconds, kind, text)).map_err(std::io::Error::other)?;
        writeln!(self.out, "{line}")?;
        self.out.flush()
    }

    /// Turns `data` (after whatever was held back) into text, holding back an incomplete UTF-8
    /// sequence at the end and replacing invalid bytes elsewhere.
    fn decode(&mut self, data: &[u8]) -> String {
        let joined;
        let bytes: &[u8] = if self.pending.is_empty() {
            data
        } else {
            joined = [std::mem::take(&mut self.pending).as_slice(), data].concat();
            &joined
        };
        let mut text = String::with_capacity(bytes.len());
        let mut rest = bytes;
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    text.push_str(valid);
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        None => {
                            // An incomplete sequence at the very end: wait for the rest.
                            self.pending = after.to_vec();
                            break;
                        }
                    }
                }
            }
        }
        text
    }
}

/// Seconds since the Unix epoch, for [`Header::timestamp`].
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recording_file_is_private_never_widened_and_never_a_followed_link() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ea-record-mode-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let fresh = dir.join("new.cast");
        Recorder::create(&fresh, &header()).unwrap();
        assert_eq!(mode(&fresh), 0o600);
        let open = dir.join("open.cast");
        std::fs::write(&open, "old secrets").unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
        Recorder::create(&open, &header()).unwrap();
        assert_eq!(mode(&open), 0o600, "narrowed");
        assert!(!std::fs::read_to_string(&open).unwrap().contains("old secrets"), "truncated");
        let narrow = dir.join("narrow.cast");
        std::fs::write(&narrow, "").unwrap();
        std::fs::set_permissions(&narrow, std::fs::Permissions::from_mode(0o400)).unwrap();
        let _ = Recorder::create(&narrow, &header());
        assert_eq!(mode(&narrow), 0o400, "never widened");
        let target = dir.join("target");
        std::fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, dir.join("link.cast")).unwrap();
        let err = Recorder::create(&dir.join("link.cast"), &header()).err().expect("a link is refused");
        assert!(format!("{err:#}").contains("symbolic link"), "{err:#}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn header() -> Header<'static> {
        Header {
            width: 120,
            height: 40,
            timestamp: 1_700_000_000,
            command: Some("tmux new -A -s ea"),
            term: "xterm-256color",
            shell: Some("/bin/bash"),
        }
    }

    fn lines(out: Vec<u8>) -> Vec<Value> {
        String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn event(line: &Value) -> (f64, String, String) {
        let array = line.as_array().expect("an event is a JSON array");
        assert_eq!(array.len(), 3);
        (array[0].as_f64().unwrap(), array[1].as_str().unwrap().into(), array[2].as_str().unwrap().into())
    }

    #[test]
    fn header_is_asciicast_v2() {
        let out = Recorder::new(Vec::new(), &header()).unwrap().finish().unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert_eq!(
            lines(out)[0],
            json!({
                "version": 2, "width": 120, "height": 40, "timestamp": 1_700_000_000u64,
                "command": "tmux new -A -s ea",
                "env": {"TERM": "xterm-256color", "SHELL": "/bin/bash"}
            })
        );
        let bare = Header { command: None, shell: None, ..header() };
        let out = Recorder::new(Vec::new(), &bare).unwrap().finish().unwrap();
        let first = &lines(out)[0];
        assert!(first.get("command").is_none());
        assert_eq!(first["env"], json!({"TERM": "xterm-256color"}));
    }

    #[test]
    fn output_and_resize_events_in_order_with_rising_times() {
        let mut rec = Recorder::new(Vec::new(), &header()).unwrap();
        rec.output(b"$ ls\r\n").unwrap();
        rec.resize(100, 30).unwrap();
        rec.output(b"\x1b[1mbold\x1b[0m \"q\"\n").unwrap();
        let all = lines(rec.finish().unwrap());
        assert_eq!(all.len(), 4);
        let events: Vec<_> = all[1..].iter().map(event).collect();
        assert_eq!((events[0].1.as_str(), events[0].2.as_str()), ("o", "$ ls\r\n"));
        assert_eq!((events[1].1.as_str(), events[1].2.as_str()), ("r", "100x30"));
        assert_eq!((events[2].1.as_str(), events[2].2.as_str()), ("o", "\u{1b}[1mbold\u{1b}[0m \"q\"\n"));
        assert!(events.windows(2).all(|w| w[0].0 <= w[1].0));
        assert!(events[0].0 >= 0.0);
    }

    #[test]
    fn a_character_split_across_chunks_is_held_back_until_complete() {
        let euro = "€".as_bytes(); // e2 82 ac
        let crab = "🦀".as_bytes(); // f0 9f a6 80
        let mut rec = Recorder::new(Vec::new(), &header()).unwrap();
        rec.output(&[b'a', euro[0]]).unwrap();
        rec.output(&euro[1..2]).unwrap(); // still incomplete: no event at all
        rec.output(&[euro[2], b'b', crab[0], crab[1]]).unwrap();
        rec.output(&crab[2..]).unwrap();
        let events: Vec<_> = lines(rec.finish().unwrap())[1..].iter().map(event).collect();
        let texts: Vec<&str> = events.iter().map(|e| e.2.as_str()).collect();
        assert_eq!(texts, ["a", "€b", "🦀"]);
    }

    #[test]
    fn invalid_bytes_become_replacement_characters_and_a_dangling_tail_is_flushed() {
        let mut rec = Recorder::new(Vec::new(), &header()).unwrap();
        rec.output(b"x\xffy").unwrap();
        rec.output(b"z\xe2\x82").unwrap();
        let events: Vec<_> = lines(rec.finish().unwrap())[1..].iter().map(event).collect();
        let texts: Vec<&str> = events.iter().map(|e| e.2.as_str()).collect();
        assert_eq!(texts, ["x\u{fffd}y", "z", "\u{fffd}"]);
    }

    #[test]
    fn create_writes_a_file() {
        let path = std::env::temp_dir().join(format!("ea-record-test-{}.cast", std::process::id()));
        let mut rec = Recorder::create(&path, &header()).unwrap();
        rec.output("héllo".as_bytes()).unwrap();
        drop(rec.finish().unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let all = lines(text.into_bytes());
        assert_eq!(all[0]["version"], 2);
        assert_eq!(event(&all[1]).2, "héllo");
    }
}

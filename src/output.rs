//! What reaches the user: results on stdout (text or one JSON document), progress on stderr.
//!
//! Spinners appear only when stderr is a terminal and progress is on; elsewhere progress degrades
//! to plain lines, and `-q` silences it. Nothing but results ever goes to stdout.
//!
//! Every byte the program writes to its own stdout or stderr goes through [`Stream`] (or the
//! [`Printer`] built on it). A reader that went away (`| head`: EPIPE) or a terminal that hung up
//! (EIO, ENXIO) is not a crash: the stream is marked gone, later writes to it are dropped, and the
//! command carries on to its normal end (teardown included) and exits quietly, as ripgrep and fd
//! do. `println!`/`eprintln!` panic on those errors and are used nowhere else.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::cli::OutputFormat;
use crate::settings::Settings;

/// The program's own stdout or stderr, written without ever panicking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

static STDOUT_GONE: AtomicBool = AtomicBool::new(false);
static STDERR_GONE: AtomicBool = AtomicBool::new(false);

impl Stream {
    fn gone_flag(self) -> &'static AtomicBool {
        match self {
            Stream::Stdout => &STDOUT_GONE,
            Stream::Stderr => &STDERR_GONE,
        }
    }

    /// True once a write found nobody reading (closed pipe, hung-up terminal).
    pub fn is_gone(self) -> bool {
        self.gone_flag().load(Ordering::Relaxed)
    }

    /// Writes and flushes all of `data`. `Err` only for a reader that went away (see
    /// [`is_reader_gone`]) or another I/O error; the caller decides what that means (the SSH
    /// data path closes the remote channel). Once gone, writes fail at once without a syscall.
    pub fn write_all(self, data: &[u8]) -> std::io::Result<()> {
        if self.is_gone() {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        let result = match self {
            Stream::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(data).and_then(|_| out.flush())
            }
            Stream::Stderr => {
                let mut err = std::io::stderr().lock();
                err.write_all(data).and_then(|_| err.flush())
            }
        };
        if let Err(e) = &result
            && is_reader_gone(e)
        {
            self.gone_flag().store(true, Ordering::Relaxed);
        }
        result
    }

    /// Writes `data`, dropping it silently when nobody reads any more.
    pub fn put(self, data: &[u8]) {
        let _ = self.write_all(data);
    }

    /// One line (a newline is added), dropped silently when nobody reads any more.
    pub fn line(self, text: &str) {
        let mut bytes = Vec::with_capacity(text.len() + 1);
        bytes.extend_from_slice(text.as_bytes());
        bytes.push(b'\n');
        self.put(&bytes);
    }

    /// An `io::Write` for code that writes through a generic writer (clap_complete, tracing):
    /// a gone reader looks like a successful write, so such code never panics or retries.
    pub fn writer(self) -> Quiet {
        Quiet(self)
    }
}

/// The writer of [`Stream::writer`].
#[derive(Debug, Clone, Copy)]
pub struct Quiet(Stream);

impl Write for Quiet {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.write_all(buf) {
            Err(e) if !is_reader_gone(&e) => Err(e),
            _ => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Quiet {
    type Writer = Quiet;

    fn make_writer(&'a self) -> Quiet {
        *self
    }
}

/// EPIPE (the pipe's reader exited), EIO or ENXIO (the terminal hung up): nobody will read what
/// follows.
pub fn is_reader_gone(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::BrokenPipe
        || matches!(error.raw_os_error(), Some(libc::EPIPE | libc::EIO | libc::ENXIO))
}

/// Help, version or a usage error from clap, printed without panicking on a closed pipe (clap's
/// own `exit` would do the same printing; this keeps the exit in `main`).
pub fn clap_exit(error: &clap::Error) -> std::process::ExitCode {
    let _ = error.print();
    std::process::ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2))
}

/// The last line of a failed run: `error: …` on stderr.
pub fn error_line(text: &str) {
    Stream::Stderr.line(&format!("error: {text}"));
}

/// Text that came from a box, shown on one line: a file name, a message of its SFTP server.
/// Every control character is shown escaped ([`box_log`] keeps line breaks and tabs).
pub fn box_text(text: &str) -> String {
    escape(text, false)
}

/// Lines of text from a box (its setup log): as [`box_text`], but `\n` and `\t` stay.
pub fn box_log(text: &str) -> String {
    escape(text, true)
}

/// A name the box gave, quoted: as [`box_text`], with `\` and `"` escaped too so the quotes
/// cannot be faked; past 100 characters it is cut (`…`).
pub fn box_name(name: &str) -> String {
    let mut shown: String = name.chars().take(100).collect();
    if shown.len() < name.len() {
        shown.push('…');
    }
    format!("\"{}\"", escape(&shown.replace('\\', "\\\\").replace('"', "\\\""), false))
}

/// A box is untrusted: what it sends must not drive the terminal of whoever reads our output.
/// C0 controls (but `\n` and `\t` in `lines`) and DEL become `\xNN`; C1 controls and the characters that reorder or break lines
/// (bidirectional overrides, U+2028/U+2029) become `\u{NNNN}`. An escape sequence is thereby
/// shown as text (`\x1b[2J`) instead of clearing the screen.
fn escape(text: &str, lines: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\t' if lines => out.push(c),
            '\0'..='\x1f' | '\x7f' => out.push_str(&format!("\\x{:02x}", c as u32)),
            '\u{80}'..='\u{9f}'
            | '\u{200e}'
            | '\u{200f}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}' => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
            _ => out.push(c),
        }
    }
    out
}

/// [`box_log`] over a byte stream that arrives in chunks (a setup log followed live): a UTF-8
/// character cut between chunks waits for its rest; bytes that are not UTF-8 show as `\xNN`.
#[derive(Debug, Default)]
pub struct BoxLog {
    pending: Vec<u8>,
}

impl BoxLog {
    /// The escaped text of everything complete so far.
    pub fn feed(&mut self, chunk: &[u8]) -> String {
        self.pending.extend_from_slice(chunk);
        let (text, kept) = escape_bytes(&self.pending, false);
        let done = self.pending.len() - kept;
        self.pending.drain(..done);
        text
    }

    /// Whatever was left (a cut character at the very end), escaped.
    pub fn finish(&mut self) -> String {
        let (text, _) = escape_bytes(&std::mem::take(&mut self.pending), true);
        text
    }
}

/// Escapes `bytes` as [`box_log`]; returns the text and how many bytes at the end were kept
/// back as the start of a character still to come (none when `last`).
fn escape_bytes(mut bytes: &[u8], last: bool) -> (String, usize) {
    let mut out = String::new();
    loop {
        match std::str::from_utf8(bytes) {
            Ok(text) => {
                out.push_str(&box_log(text));
                return (out, 0);
            }
            Err(e) => {
                let (good, bad) = bytes.split_at(e.valid_up_to());
                out.push_str(&box_log(std::str::from_utf8(good).unwrap_or_default()));
                let invalid = match e.error_len() {
                    Some(n) => n,
                    None if !last => return (out, bad.len()),
                    None => bad.len(),
                };
                for byte in &bad[..invalid] {
                    out.push_str(&format!("\\x{byte:02x}"));
                }
                bytes = &bad[invalid..];
            }
        }
    }
}

/// Gates every line the program prints.
#[derive(Debug, Clone)]
pub struct Printer {
    format: OutputFormat,
    verbosity: u8,
    spinners: bool,
}

impl Printer {
    pub fn new(settings: &Settings) -> Self {
        Printer {
            format: settings.output,
            verbosity: settings.verbosity,
            spinners: settings.progress && std::io::stderr().is_terminal(),
        }
    }

    pub fn json(&self) -> bool {
        self.format == OutputFormat::Json
    }

    /// Prints a command's result: `value` as JSON, or the text `render` builds.
    pub fn result<T: Serialize>(&self, value: &T, render: impl FnOnce() -> String) {
        let text = match self.format {
            OutputFormat::Json => serde_json::to_string_pretty(value).expect("results serialize"),
            OutputFormat::Text => render(),
        };
        Stream::Stdout.line(text.trim_end_matches('\n'));
    }

    /// Raw text on stdout whatever the output format (a policy document, completions).
    pub fn raw(&self, text: &str) {
        Stream::Stdout.line(text.trim_end_matches('\n'));
    }

    /// A progress line on stderr (hidden with -q).
    pub fn status(&self, message: impl AsRef<str>) {
        if self.verbosity >= 1 {
            Stream::Stderr.line(message.as_ref());
        }
    }

    /// A warning on stderr (hidden with -q).
    pub fn warn(&self, message: impl AsRef<str>) {
        if self.verbosity >= 1 {
            Stream::Stderr.line(&format!("warning: {}", message.as_ref()));
        }
    }

    /// A spinner on a terminal; a plain status line elsewhere.
    pub fn step(&self, message: impl Into<String>) -> Step {
        let message = message.into();
        if self.spinners {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} {elapsed:.dim}").expect("valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(100));
            bar.set_message(message);
            Step { bar: Some(bar), printer: self.clone() }
        } else {
            self.status(format!("{message}…"));
            Step { bar: None, printer: self.clone() }
        }
    }
}

/// A byte-count bar (bytes, rate, ETA) for a copy on a terminal; nothing elsewhere. It starts
/// hidden: the copy shows it (on stderr) once it knows the total.
impl Printer {
    pub fn transfer_bar(&self, target: String) -> Option<ProgressBar> {
        if !self.spinners || self.verbosity == 0 {
            return None;
        }
        let bar = ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::hidden());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(format!("→ {target}"));
        Some(bar)
    }
}

/// One phase of a long operation.
pub struct Step {
    bar: Option<ProgressBar>,
    printer: Printer,
}

impl Step {
    /// Changes the phase shown (e.g. pending → running → ssh).
    pub fn set(&self, message: impl Into<String>) {
        let message = message.into();
        match &self.bar {
            Some(bar) => bar.set_message(message),
            None => self.printer.status(format!("{message}…")),
        }
    }

    pub fn finish(self, message: impl AsRef<str>) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        self.printer.status(message);
    }

    /// Prints a line above the spinner without garbling it.
    pub fn println(&self, message: impl AsRef<str>) {
        match &self.bar {
            Some(bar) => bar.suspend(|| self.printer.status(message)),
            None => self.printer.status(message),
        }
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Left-aligned columns separated by two spaces; numbers are pre-formatted by the caller.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// Dollars with enough digits to see a cent's fraction: $0.0062, $0.12, $1.94. Never `$-0.0000`.
pub fn usd(amount: f64) -> String {
    let amount = round_money(amount);
    if amount.abs() < 1.0 { format!("${amount:.4}") } else { format!("${amount:.2}") }
}

/// A dollar amount rounded as [`usd`] shows it (4 decimals below $1, else 2), with no negative
/// zero: what JSON output carries, so text and JSON agree.
pub fn round_money(amount: f64) -> f64 {
    let places = if amount.abs() < 1.0 { 1e4 } else { 1e2 };
    let rounded = (amount * places).round() / places;
    if rounded == 0.0 { 0.0 } else { rounded }
}

/// `#[serde(serialize_with = "crate::output::money")]` for dollar fields.
pub fn money<S: serde::Serializer>(amount: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(round_money(*amount))
}

/// The same for optional dollar fields.
pub fn money_opt<S: serde::Serializer>(amount: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match amount {
        Some(a) => s.serialize_some(&round_money(*a)),
        None => s.serialize_none(),
    }
}

/// Ordered `(name, value)` pairs as one JSON object (`{"prepare": 310, "ssh": 2210}`), so JSON
/// readers get names while text keeps the order.
pub fn pairs_as_object<S: serde::Serializer, V: Serialize>(
    pairs: &[(String, V)],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(pairs.len()))?;
    for (k, v) in pairs {
        map.serialize_entry(k, v)?;
    }
    map.end()
}

/// A duration in the largest two units, for humans: 3h 59m, 1m 30s, 45s.
pub fn short_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    match (h, m, s) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m {s}s"),
        (h, 0, _) => format!("{h}h"),
        (h, m, _) => format!("{h}h {m}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(&["A", "LONG"], &[vec!["xyz".into(), "1".into()], vec!["q".into(), "22".into()]]);
        assert_eq!(t, "A    LONG\nxyz  1\nq    22\n");
    }

    #[test]
    fn box_text_shows_control_characters_escaped() {
        assert_eq!(box_text("a\x1b]0;pwned\x07b\x1b[31m"), "a\\x1b]0;pwned\\x07b\\x1b[31m");
        assert_eq!(box_text("nul\0 del\x7f c1\u{9b}2J"), "nul\\x00 del\\x7f c1\\u{009b}2J");
        assert_eq!(box_text("tab\there\nline\r"), "tab\\x09here\\x0aline\\x0d");
        assert_eq!(box_text("bidi\u{202e}txt.exe é ☃"), "bidi\\u{202e}txt.exe é ☃");
        assert_eq!(box_log("one\n\ttwo\r\x1b[2J\n"), "one\n\ttwo\\x0d\\x1b[2J\n");
        assert_eq!(box_name("../x"), "\"../x\"");
        assert_eq!(box_name("a\"b\\c\x1b"), "\"a\\\"b\\\\c\\x1b\"");
        assert_eq!(box_name(""), "\"\"");
        assert_eq!(box_name(&"x".repeat(300)), format!("\"{}…\"", "x".repeat(100)));
    }

    #[test]
    fn box_log_escapes_a_stream_cut_anywhere() {
        let text = "é\x1b[31m☃\n".as_bytes();
        for cut in 0..text.len() {
            let mut log = BoxLog::default();
            let mut out = log.feed(&text[..cut]);
            out.push_str(&log.feed(&text[cut..]));
            out.push_str(&log.finish());
            assert_eq!(out, "é\\x1b[31m☃\n", "cut at {cut}");
        }
        let mut log = BoxLog::default();
        assert_eq!(log.feed(b"a\xff\xc2\x9bb\xe2\x98"), "a\\xff\\u{009b}b");
        assert_eq!(log.finish(), "\\xe2\\x98");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(short_duration(Duration::from_secs(14_340)), "3h 59m");
        assert_eq!(short_duration(Duration::from_secs(90)), "1m 30s");
        assert_eq!(short_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(usd(0.00621), "$0.0062");
        assert_eq!(usd(1.944), "$1.94");
        assert_eq!(usd(-0.00001), "$0.0000");
        assert_eq!(round_money(0.000061627), 0.0001);
        assert_eq!(round_money(1.9999383), 2.0);
        assert!(round_money(-0.00001).is_sign_positive());
    }
}

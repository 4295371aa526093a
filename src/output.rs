//! What reaches the user: results on stdout (text or one JSON document), progress on stderr.
//!
//! Spinners appear only when stderr is a terminal and progress is on; elsewhere progress degrades
//! to plain lines, and `-q` silences it. Nothing but results ever goes to stdout.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::cli::OutputFormat;
use crate::settings::Settings;

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
        let mut out = std::io::stdout().lock();
        let text = match self.format {
            OutputFormat::Json => serde_json::to_string_pretty(value).expect("results serialize"),
            OutputFormat::Text => render(),
        };
        let _ = writeln!(out, "{}", text.trim_end_matches('\n'));
        let _ = out.flush();
    }

    /// A progress line on stderr (hidden with -q).
    pub fn status(&self, message: impl AsRef<str>) {
        if self.verbosity >= 1 {
            eprintln!("{}", message.as_ref());
        }
    }

    /// A warning on stderr (hidden with -q).
    pub fn warn(&self, message: impl AsRef<str>) {
        if self.verbosity >= 1 {
            eprintln!("warning: {}", message.as_ref());
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

/// Dollars with enough digits to see a cent's fraction: $0.0062, $0.12, $1.94.
pub fn usd(amount: f64) -> String {
    if amount.abs() < 1.0 { format!("${amount:.4}") } else { format!("${amount:.2}") }
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
    fn durations_read_naturally() {
        assert_eq!(short_duration(Duration::from_secs(14_340)), "3h 59m");
        assert_eq!(short_duration(Duration::from_secs(90)), "1m 30s");
        assert_eq!(short_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(usd(0.00621), "$0.0062");
        assert_eq!(usd(1.944), "$1.94");
    }
}

//! Ctrl-C, SIGTERM and SIGHUP as values: the first one asks the running command to stop and tear
//! down cleanly; a second Ctrl-C exits at once (the box's watchdog and `cleanup` remain the
//! safety net for whatever was not removed).

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// Which signal ended (or is ending) the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Interrupt,
    Terminate,
    Hangup,
}

impl Stop {
    /// The conventional exit status: 128 + signal number (130 for Ctrl-C).
    pub fn exit_code(self) -> u8 {
        match self {
            Stop::Interrupt => 130,
            Stop::Terminate => 143,
            Stop::Hangup => 129,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Stop::Interrupt => "interrupted",
            Stop::Terminate => "terminated (SIGTERM)",
            Stop::Hangup => "hung up (SIGHUP)",
        }
    }
}

/// A handle to the first stop request.
#[derive(Clone)]
pub struct Signals {
    rx: watch::Receiver<Option<Stop>>,
}

impl Signals {
    /// Starts listening. Call once, early, from inside the runtime.
    pub fn install() -> std::io::Result<Signals> {
        let (tx, rx) = watch::channel(None);
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::spawn(async move {
            loop {
                let stop = tokio::select! {
                    _ = int.recv() => Stop::Interrupt,
                    _ = term.recv() => Stop::Terminate,
                    _ = hup.recv() => Stop::Hangup,
                };
                if tx.borrow().is_some() && stop == Stop::Interrupt {
                    // Second Ctrl-C: the user wants out now.
                    let _ = crossterm::terminal::disable_raw_mode();
                    crate::output::Stream::Stderr.line(
                        "\nsecond interrupt: exiting now; anything not yet removed ends by its watchdog, or run `ephemeral-admin cleanup`",
                    );
                    std::process::exit(130);
                }
                if tx.borrow().is_none() {
                    let _ = tx.send(Some(stop));
                }
            }
        });
        Ok(Signals { rx })
    }

    /// The stop request, if one came.
    pub fn received(&self) -> Option<Stop> {
        *self.rx.borrow()
    }

    /// Resolves when a stop is requested.
    pub async fn stopped(&self) -> Stop {
        let mut rx = self.rx.clone();
        loop {
            if let Some(stop) = *rx.borrow_and_update() {
                return stop;
            }
            if rx.changed().await.is_err() {
                // The listener is gone: never resolve.
                std::future::pending::<()>().await;
            }
        }
    }
}

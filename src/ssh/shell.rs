//! The interactive terminal: a PTY on the box sized like ours, our terminal in raw mode for the
//! duration, keystrokes forwarded from a stdin thread, output streamed unbuffered, window size
//! changes (SIGWINCH) passed on, and optionally an asciicast recording.
//!
//! Raw mode is held by a guard that restores the terminal on every way out: normal return, error,
//! cancellation (the caller drops the future on SIGTERM/SIGHUP, which drops the guard) and panic
//! (a panic hook, installed once, restores the terminal before the panic message is printed; the
//! unwinding drop then finds nothing left to do).

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};

use anyhow::Context;
use russh::{ChannelMsg, Pty};

use super::record::{Header, Recorder};
use super::{RemoteExit, Session};

/// What to open.
#[derive(Debug, Clone)]
pub struct ShellOptions {
    /// `$TERM` for the remote PTY.
    pub term: String,
    /// Run this instead of the login shell (e.g. `tmux new -A -s ea`); passed to the remote shell
    /// as is.
    pub command: Option<String>,
    /// Record the session to this asciicast v2 file.
    pub record: Option<PathBuf>,
}

type FileRecorder = Recorder<std::io::BufWriter<std::fs::File>>;

impl Session {
    /// Opens an interactive terminal on the box and runs until the remote side ends it.
    ///
    /// Returns how the remote shell (or command) ended; `Lost` if the connection dropped first.
    /// Cancel-safe: dropping the future restores the terminal.
    pub async fn shell(&self, opts: ShellOptions) -> anyhow::Result<RemoteExit> {
        let interactive = is_terminal(libc::STDIN_FILENO);
        let (cols, rows) = terminal_size();
        let local_shell = std::env::var("SHELL").ok();
        let recorder = match &opts.record {
            Some(path) => Some(Recorder::create(
                path,
                &Header {
                    width: cols,
                    height: rows,
                    timestamp: super::record::unix_now(),
                    command: opts.command.as_deref(),
                    term: &opts.term,
                    shell: local_shell.as_deref(),
                },
            )?),
            None => None,
        };
        let recorder = Mutex::new(recorder);

        let mut channel =
            self.handle.channel_open_session().await.context("cannot open an SSH channel on the box")?;
        self.request_agent(&channel).await;
        let modes = if interactive { local_pty_modes() } else { Vec::new() };
        channel
            .request_pty(true, &opts.term, cols.into(), rows.into(), 0, 0, &modes)
            .await
            .context("the SSH connection dropped while asking for a terminal")?;
        loop {
            match channel.wait().await {
                Some(ChannelMsg::Success) => break,
                Some(ChannelMsg::Failure) => anyhow::bail!("the box refused to allocate a terminal (PTY)"),
                Some(ChannelMsg::Close) | None => {
                    anyhow::bail!("the SSH channel closed while asking for a terminal")
                }
                Some(_) => {}
            }
        }
        let what = match &opts.command {
            Some(command) => {
                channel.exec(true, command.as_bytes()).await.context("the SSH connection dropped")?;
                format!("`{command}`")
            }
            None => {
                channel.request_shell(true).await.context("the SSH connection dropped")?;
                "a shell".to_string()
            }
        };

        let mut guard = if interactive { Some(RawTerminal::enter()?) } else { None };
        let alt_screen = guard.as_ref().map(|g| g.alt_screen.clone()).unwrap_or_default();
        let (mut reader, writer) = channel.split();

        let output = async {
            let mut exit = None;
            let mut started = false;
            while let Some(msg) = reader.wait().await {
                match msg {
                    ChannelMsg::Data { data } => {
                        super::mark_first_output();
                        track_alt_screen(&data, &alt_screen);
                        super::exec::write_now(false, &data).context("cannot write to the terminal")?;
                        record(&recorder, |r| r.output(&data));
                    }
                    ChannelMsg::ExtendedData { data, ext: 1 } => {
                        super::mark_first_output();
                        super::exec::write_now(true, &data).context("cannot write to stderr")?;
                        record(&recorder, |r| r.output(&data));
                    }
                    ChannelMsg::ExitStatus { exit_status } => exit = Some(RemoteExit::Status(exit_status)),
                    ChannelMsg::ExitSignal { signal_name, .. } => {
                        exit = Some(RemoteExit::Signal { name: super::signal_name(&signal_name) });
                    }
                    ChannelMsg::Success => started = true,
                    ChannelMsg::Failure if !started => anyhow::bail!("the box refused to start {what}"),
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
            Ok(exit.unwrap_or(RemoteExit::Lost))
        };
        let input = async {
            super::exec::forward_stdin(&writer).await;
            std::future::pending::<Infallible>().await
        };
        let resize = async {
            use tokio::signal::unix::{SignalKind, signal};
            if let Ok(mut winch) = signal(SignalKind::window_change()) {
                let mut last = (cols, rows);
                while winch.recv().await.is_some() {
                    let now = terminal_size();
                    if now == last {
                        continue;
                    }
                    last = now;
                    if writer.window_change(now.0.into(), now.1.into(), 0, 0).await.is_err() {
                        break;
                    }
                    record(&recorder, |r| r.resize(now.0, now.1));
                }
            }
            std::future::pending::<Infallible>().await
        };
        let result = tokio::select! {
            result = output => result,
            never = input => match never {},
            never = resize => match never {},
        };

        if let (Some(guard), Ok(RemoteExit::Status(_) | RemoteExit::Signal { .. })) = (&mut guard, &result) {
            guard.ended_cleanly();
        }
        drop(guard);
        if let Some(recorder) = recorder.into_inner().unwrap_or_else(|p| p.into_inner())
            && let Err(e) = recorder.finish()
        {
            tracing::warn!("the session recording may be incomplete: {e}");
        }
        result
    }
}

/// Runs `event` on the recorder, if any; a recording that cannot be written is dropped with one
/// warning rather than ending the session.
fn record(
    recorder: &Mutex<Option<FileRecorder>>,
    event: impl FnOnce(&mut FileRecorder) -> std::io::Result<()>,
) {
    let mut slot = recorder.lock().unwrap_or_else(|p| p.into_inner());
    let failed = match slot.as_mut() {
        Some(rec) => event(rec).err(),
        None => None,
    };
    if let Some(e) = failed {
        tracing::warn!("stopped recording the session: {e}");
        *slot = None;
    }
}

/// Our terminal in raw mode until this is dropped.
struct RawTerminal {
    /// Whether the remote last switched the terminal to the alternate screen (and not back).
    alt_screen: Arc<AtomicBool>,
    /// False until the remote side ended with an exit status: if the session was cut short, the
    /// remote program never got to undo its screen modes, so we do.
    clean: bool,
}

impl RawTerminal {
    fn enter() -> anyhow::Result<RawTerminal> {
        install_panic_hook();
        crossterm::terminal::enable_raw_mode().context("cannot switch the terminal to raw mode")?;
        Ok(RawTerminal { alt_screen: Arc::default(), clean: false })
    }

    fn ended_cleanly(&mut self) {
        self.clean = true;
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if !self.clean {
            let mut reset = String::new();
            if self.alt_screen.load(Ordering::Relaxed) {
                reset.push_str("\x1b[?1049l");
            }
            // Mouse reporting, bracketed paste off; cursor visible.
            reset.push_str("\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1006l\x1b[?2004l\x1b[?25h");
            crate::output::Stream::Stdout.put(reset.as_bytes());
        }
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

/// Restores the terminal before any panic message is printed, then defers to the previous hook.
/// Installed once per process, the first time raw mode is entered.
fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if crossterm::terminal::is_raw_mode_enabled().unwrap_or(false) {
                let _ = crossterm::terminal::disable_raw_mode();
            }
            previous(info);
        }));
    });
}

/// Notes whether `data` last entered or left the alternate screen (xterm's 1049 mode).
fn track_alt_screen(data: &[u8], alt_screen: &AtomicBool) {
    const ENTER: &[u8] = b"\x1b[?1049h";
    const LEAVE: &[u8] = b"\x1b[?1049l";
    let last = |needle: &[u8]| data.windows(needle.len()).rposition(|w| w == needle);
    match (last(ENTER), last(LEAVE)) {
        (Some(enter), Some(leave)) => alt_screen.store(enter > leave, Ordering::Relaxed),
        (Some(_), None) => alt_screen.store(true, Ordering::Relaxed),
        (None, Some(_)) => alt_screen.store(false, Ordering::Relaxed),
        (None, None) => {}
    }
}

fn is_terminal(fd: libc::c_int) -> bool {
    // SAFETY: isatty(3) only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// Our terminal's size in columns and rows; 80x24 when there is no terminal to ask.
pub(super) fn terminal_size() -> (u16, u16) {
    match crossterm::terminal::size() {
        Ok((cols, rows)) if cols > 0 && rows > 0 => (cols, rows),
        _ => (80, 24),
    }
}

/// Our terminal's special characters and main flags, for the remote PTY (as OpenSSH sends them),
/// so that e.g. erase and UTF-8 line editing behave the same on the box.
fn local_pty_modes() -> Vec<(Pty, u32)> {
    // SAFETY: a zeroed termios is a valid out-parameter for tcgetattr(3).
    let mut tio: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `tio` is a valid termios to fill in.
    if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut tio) } != 0 {
        return Vec::new();
    }
    let chars = [
        (Pty::VINTR, libc::VINTR),
        (Pty::VQUIT, libc::VQUIT),
        (Pty::VERASE, libc::VERASE),
        (Pty::VKILL, libc::VKILL),
        (Pty::VEOF, libc::VEOF),
        (Pty::VEOL, libc::VEOL),
        (Pty::VEOL2, libc::VEOL2),
        (Pty::VSTART, libc::VSTART),
        (Pty::VSTOP, libc::VSTOP),
        (Pty::VSUSP, libc::VSUSP),
        (Pty::VREPRINT, libc::VREPRINT),
        (Pty::VWERASE, libc::VWERASE),
        (Pty::VLNEXT, libc::VLNEXT),
        (Pty::VDISCARD, libc::VDISCARD),
    ];
    let flag = |set: libc::tcflag_t, bit: libc::tcflag_t| u32::from(set & bit != 0);
    let mut modes: Vec<(Pty, u32)> = chars
        .iter()
        // A disabled character is 0 locally and 255 on the wire.
        .map(|&(pty, index)| (pty, if tio.c_cc[index] == 0 { 255 } else { u32::from(tio.c_cc[index]) }))
        .collect();
    modes.extend([
        (Pty::ICRNL, flag(tio.c_iflag, libc::ICRNL)),
        (Pty::IXON, flag(tio.c_iflag, libc::IXON)),
        (Pty::IXANY, flag(tio.c_iflag, libc::IXANY)),
        (Pty::IXOFF, flag(tio.c_iflag, libc::IXOFF)),
        (Pty::IMAXBEL, flag(tio.c_iflag, libc::IMAXBEL)),
        (Pty::IUTF8, flag(tio.c_iflag, libc::IUTF8)),
        (Pty::ISIG, flag(tio.c_lflag, libc::ISIG)),
        (Pty::ICANON, flag(tio.c_lflag, libc::ICANON)),
        (Pty::ECHO, flag(tio.c_lflag, libc::ECHO)),
        (Pty::ECHOE, flag(tio.c_lflag, libc::ECHOE)),
        (Pty::ECHOK, flag(tio.c_lflag, libc::ECHOK)),
        (Pty::ECHONL, flag(tio.c_lflag, libc::ECHONL)),
        (Pty::NOFLSH, flag(tio.c_lflag, libc::NOFLSH)),
        (Pty::TOSTOP, flag(tio.c_lflag, libc::TOSTOP)),
        (Pty::IEXTEN, flag(tio.c_lflag, libc::IEXTEN)),
        (Pty::ECHOCTL, flag(tio.c_lflag, libc::ECHOCTL)),
        (Pty::ECHOKE, flag(tio.c_lflag, libc::ECHOKE)),
        (Pty::OPOST, flag(tio.c_oflag, libc::OPOST)),
        (Pty::ONLCR, flag(tio.c_oflag, libc::ONLCR)),
    ]);
    modes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alt_screen_tracking_follows_the_last_switch() {
        let flag = AtomicBool::new(false);
        track_alt_screen(b"plain output", &flag);
        assert!(!flag.load(Ordering::Relaxed));
        track_alt_screen(b"\x1b[?1049h\x1b[H", &flag);
        assert!(flag.load(Ordering::Relaxed));
        track_alt_screen(b"more", &flag);
        assert!(flag.load(Ordering::Relaxed));
        track_alt_screen(b"\x1b[?1049hx\x1b[?1049l", &flag);
        assert!(!flag.load(Ordering::Relaxed));
        track_alt_screen(b"\x1b[?1049lx\x1b[?1049h", &flag);
        assert!(flag.load(Ordering::Relaxed));
    }
}

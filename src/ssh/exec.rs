//! Running one command on the box without a PTY (`connect ID -- cmd …`): the argv is
//! shell-quoted into one command line, remote stdout and stderr stream to local stdout and stderr
//! as they arrive, and local stdin is forwarded until EOF. With `--record`, that output is also
//! written to an asciicast recording (both streams, as a terminal would have shown them).
//!
//! Reading the channel and writing to it run as two concurrent futures: a writer waiting for the
//! remote window must never stop us draining output, or a command like `cat` that echoes its
//! input could stall both directions.

use std::convert::Infallible;
use std::future::Future;

use anyhow::Context;
use russh::client::Msg;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf};

use crate::output::{BoxLog, Stream, is_reader_gone};

use super::record::{Header, Recorder};
use super::stdin::StdinPump;
use super::{RemoteExit, Session, shell_quote};

/// Where the remote command's standard streams go.
pub enum ExecIo<'a> {
    /// The process's own stdin, stdout and stderr: stdin is forwarded until local EOF, output is
    /// written and flushed chunk by chunk.
    Inherit,
    /// Send `stdin` followed by EOF; collect stdout and stderr into `output`.
    Capture { stdin: Vec<u8>, output: &'a mut Captured },
    /// No stdin; both remote streams to our stderr (output that is progress, not a result), as
    /// box text: control characters shown escaped ([`crate::output::box_log`]), as this is a
    /// log, not a terminal session.
    Stderr,
    /// Like [`ExecIo::Inherit`], and the output is recorded to this asciicast file too.
    InheritRecorded(&'a std::path::Path),
}

/// What an [`ExecIo::Capture`] run printed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Captured {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Session {
    /// Runs `argv` on the box without a PTY and waits for it to end.
    ///
    /// Each argument is quoted for the remote shell ([`shell_quote`]), so `["sh", "-c", "exit 7"]`
    /// runs exactly that and yields `Status(7)`. If local stdout is closed early (`| head`), the
    /// channel is closed and the result is `Signal { name: "PIPE" }` unless the remote reported
    /// its own status first.
    pub async fn exec(&self, argv: &[String], io: ExecIo<'_>) -> anyhow::Result<RemoteExit> {
        anyhow::ensure!(!argv.is_empty(), "no remote command given");
        // The recording file first: one that cannot be written stops us before the command runs.
        let recorder = match &io {
            ExecIo::InheritRecorded(path) => Some(command_recorder(path, &shell_quote(argv))?),
            _ => None,
        };
        let channel =
            self.handle.channel_open_session().await.context("cannot open an SSH channel on the box")?;
        self.request_agent(&channel).await;
        channel
            .exec(true, shell_quote(argv))
            .await
            .context("the SSH connection dropped before the command started")?;
        let (mut reader, writer) = channel.split();
        match io {
            ExecIo::Inherit => {
                let mut sink = Sink::Inherit;
                pump(&mut reader, &writer, forward_stdin(&writer), &mut sink).await
            }
            ExecIo::InheritRecorded(_) => {
                let mut sink = Sink::Recorded(recorder);
                let exit = pump(&mut reader, &writer, forward_stdin(&writer), &mut sink).await;
                if let Sink::Recorded(Some(recorder)) = sink
                    && let Err(e) = recorder.finish()
                {
                    tracing::warn!("the recording may be incomplete: {e}");
                }
                exit
            }
            ExecIo::Capture { stdin, output } => {
                let input = async {
                    if writer.data_bytes(stdin).await.is_ok() {
                        let _ = writer.eof().await;
                    }
                };
                pump(&mut reader, &writer, input, &mut Sink::Capture(output)).await
            }
            ExecIo::Stderr => {
                let input = async {
                    let _ = writer.eof().await;
                };
                let mut sink = Sink::Stderr([BoxLog::default(), BoxLog::default()]);
                let exit = pump(&mut reader, &writer, input, &mut sink).await;
                if let Sink::Stderr(logs) = &mut sink {
                    let rest: String = logs.iter_mut().map(BoxLog::finish).collect();
                    let _ = write_now(true, rest.as_bytes());
                }
                exit
            }
        }
    }
}

enum Sink<'a> {
    Inherit,
    Capture(&'a mut Captured),
    /// Box text on our stderr: one escaper per remote stream (stdout, stderr).
    Stderr([BoxLog; 2]),
    /// Inherit, and into the recording while it can be written.
    Recorded(Option<FileRecorder>),
}

type FileRecorder = Recorder<std::io::BufWriter<std::fs::File>>;

/// The recording of a command run without a PTY: the local terminal's size, the command line.
fn command_recorder(path: &std::path::Path, command: &str) -> anyhow::Result<FileRecorder> {
    let (width, height) = super::shell::terminal_size();
    let term =
        std::env::var("TERM").ok().filter(|t| !t.is_empty()).unwrap_or_else(|| "xterm-256color".into());
    let header = Header {
        width,
        height,
        timestamp: super::record::unix_now(),
        command: Some(command),
        term: &term,
        shell: None,
    };
    Recorder::create(path, &header)
}

/// Output without a PTY has bare `\n` line ends, which a terminal (and an asciicast player)
/// shows as a staircase: each gets the `\r` a PTY would have added.
fn with_carriage_returns(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16);
    let mut last = 0u8;
    for &b in data {
        if b == b'\n' && last != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        last = b;
    }
    out
}

impl Sink<'_> {
    async fn write(&mut self, to_stderr: bool, data: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Inherit => write_now(to_stderr, data),
            // Progress only: a closed stderr drops it, the remote side carries on.
            Sink::Stderr(logs) => match write_now(true, logs[usize::from(to_stderr)].feed(data).as_bytes()) {
                Err(e) if is_reader_gone(&e) => Ok(()),
                other => other,
            },
            Sink::Recorded(recorder) => {
                let shown = write_now(to_stderr, data);
                if let Some(rec) = recorder
                    && let Err(e) = rec.output(&with_carriage_returns(data))
                {
                    tracing::warn!("stopped recording the command: {e}");
                    *recorder = None;
                }
                shown
            }
            Sink::Capture(captured) => {
                let out = if to_stderr { &mut captured.stderr } else { &mut captured.stdout };
                out.extend_from_slice(data);
                Ok(())
            }
        }
    }
}

/// Writes `data` to our stdout (or stderr) and flushes it, straight to the file descriptor from
/// this task, not through tokio's stdout: that hands every chunk to the blocking pool and back,
/// which costs a third of the pipe's throughput at SSH's 32 KiB packets and a thread hand-off on
/// every echoed keystroke. `block_in_place` tells the runtime this worker may block on a slow
/// reader.
pub(super) fn write_now(to_stderr: bool, data: &[u8]) -> std::io::Result<()> {
    let stream = if to_stderr { Stream::Stderr } else { Stream::Stdout };
    let write = || stream.write_all(data);
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(write),
        _ => write(),
    }
}

/// Local stdin to the channel until EOF, then the channel's EOF.
pub(super) async fn forward_stdin(writer: &ChannelWriteHalf<Msg>) {
    match StdinPump::start() {
        Ok(mut stdin) => {
            while let Some(chunk) = stdin.recv().await {
                match chunk {
                    Ok(bytes) => {
                        if writer.data_bytes(bytes).await.is_err() {
                            return; // the channel is gone; the output side will say how
                        }
                    }
                    Err(e) => {
                        tracing::warn!("reading local stdin: {e}; sending EOF to the remote command");
                        break;
                    }
                }
            }
        }
        Err(e) => tracing::warn!("cannot start reading local stdin: {e}; sending EOF to the remote command"),
    }
    let _ = writer.eof().await;
}

/// Drains the channel into `sink` while `input` feeds it, until the channel closes.
async fn pump(
    reader: &mut ChannelReadHalf,
    writer: &ChannelWriteHalf<Msg>,
    input: impl Future<Output = ()>,
    sink: &mut Sink<'_>,
) -> anyhow::Result<RemoteExit> {
    let output = async {
        let mut exit = None;
        let mut started = false;
        let mut stdout_gone = false;
        while let Some(msg) = reader.wait().await {
            let (to_stderr, data) = match msg {
                ChannelMsg::Data { data } => {
                    super::mark_first_output();
                    (false, data)
                }
                ChannelMsg::ExtendedData { data, ext: 1 } => {
                    super::mark_first_output();
                    (true, data)
                }
                ChannelMsg::ExitStatus { exit_status } => {
                    exit = Some(RemoteExit::Status(exit_status));
                    continue;
                }
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    exit = Some(RemoteExit::Signal { name: super::signal_name(&signal_name) });
                    continue;
                }
                ChannelMsg::Success => {
                    started = true;
                    continue;
                }
                ChannelMsg::Failure if !started => anyhow::bail!("the box refused to run the command"),
                ChannelMsg::Close => break,
                _ => continue,
            };
            match sink.write(to_stderr, &data).await {
                Ok(()) => {}
                // Nobody reads our stderr any more (a hung-up terminal): drop its bytes.
                Err(e) if to_stderr && is_reader_gone(&e) => {}
                Err(e) if is_reader_gone(&e) => {
                    // Like a local pipeline: the reader went away, so stop the writer. Close the
                    // channel and return at once: a command like `yes` may never notice, and
                    // waiting for the box's close would hang.
                    stdout_gone = true;
                    let _ = writer.close().await;
                    break;
                }
                Err(e) => {
                    let stream = if to_stderr { "stderr" } else { "stdout" };
                    return Err(e)
                        .with_context(|| format!("cannot write the remote command's output to {stream}"));
                }
            }
        }
        Ok(exit.unwrap_or(if stdout_gone {
            RemoteExit::Signal { name: "PIPE".into() }
        } else {
            RemoteExit::Lost
        }))
    };
    let input = async {
        input.await;
        std::future::pending::<Infallible>().await
    };
    tokio::select! {
        result = output => result,
        never = input => match never {},
    }
}

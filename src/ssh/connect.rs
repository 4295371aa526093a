//! Getting an authenticated connection: the readiness loop that waits for a freshly booted box's
//! sshd, the transports (TCP or a ProxyCommand child), and the host-key pin.
//!
//! Each attempt opens the transport, runs the SSH handshake and authenticates. Transient failures
//! (refused, reset, unreachable, early EOF, timeouts, the proxy command exiting) are retried with a
//! short capped backoff until `connect_timeout`; a wrong host key or a rejected client key stops at
//! once, since neither fixes itself.

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::client::{self, Handle};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

use super::{ConnectOptions, Session, SshError, Transport};

/// First pause between attempts; doubled after each failure up to the cap.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Retries stay tight: a box whose sshd starts accepting is noticed within about a tenth of a
/// second (a refused SYN costs nothing). A proxy attempt spawns a process whose own start-up
/// (and, for SSM, API calls) already paces the retries; the cap only matters for one that fails
/// at once.
const BACKOFF_CAP: Duration = Duration::from_millis(100);
/// How long one TCP attempt may go unanswered before it counts as failed.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_millis(2500);
/// While a booting box silently drops SYNs (its network is not up yet), the kernel would only
/// resend ours after 1 s, then 3 s: so a fresh connect starts beside the pending ones this often,
/// and the first to be answered wins.
const TCP_STAGGER: Duration = Duration::from_millis(200);
/// How long the SSH handshake plus authentication may take on one attempt.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Bytes read from the connection at a time.
const READ_BUFFER: usize = 256 * 1024;
/// Capacity asked for the pipes to and from a proxy command (Linux; the unprivileged maximum).
#[cfg(target_os = "linux")]
const PROXY_PIPE_BYTES: libc::c_int = 1024 * 1024;
/// Lines of proxy-command stderr kept to explain a failure.
const PROXY_STDERR_LINES: usize = 5;

/// Connects to the box, retrying until sshd is ready or `opts.connect_timeout` runs out.
///
/// `on_attempt(n, error)` is called after each failed attempt that will be retried, with the
/// attempt's number (from 1) and what went wrong, so the caller can show progress.
pub async fn connect(
    opts: &ConnectOptions,
    on_attempt: &(dyn Fn(u32, &str) + Sync),
) -> Result<Session, SshError> {
    let started = Instant::now();
    let deadline = started + opts.connect_timeout;
    let target = opts.transport.to_string();
    let config = Arc::new(client_config(opts));
    let key = Arc::new(opts.client_key.clone());
    let cap = BACKOFF_CAP;
    let mut backoff = BACKOFF_START;
    let mut attempts = 0u32;
    let mut last = String::from("no attempt was made");
    // Since when the box's resume relay has not answered (an eice box without it: a custom image
    // without python3, say): after a third of the wait, straight to sshd instead.
    let mut silent_since: Option<Instant> = None;
    let relay_grace = opts.connect_timeout / 3;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(SshError::TimedOut {
                target,
                waited: format_duration(opts.connect_timeout),
                attempts,
                last,
            });
        }
        attempts += 1;
        let straight = silent_since.is_some_and(|t| t.elapsed() >= relay_grace);
        match tokio::time::timeout(remaining, attempt(opts, &config, &key, straight)).await {
            Ok(Ok(session)) => {
                tracing::debug!(attempts, elapsed = ?started.elapsed(), "ssh connected to {target}");
                return Ok(session);
            }
            Ok(Err(Failure::Fatal(error))) => return Err(error),
            Ok(Err(Failure::Retry(why))) => {
                tracing::debug!(attempt = attempts, "ssh attempt failed: {why}");
                last = why;
            }
            Ok(Err(Failure::Silent(why))) => {
                tracing::debug!(attempt = attempts, "ssh attempt failed: {why}");
                silent_since.get_or_insert_with(Instant::now);
                last = why;
            }
            Err(_) if attempts == 1 => last = format!("no answer from {target} yet"),
            Err(_) => last = format!("{last} (and attempt {attempts} was cut off by the deadline)"),
        }
        let now = Instant::now();
        if now < deadline {
            on_attempt(attempts, &last);
            tokio::time::sleep(backoff.min(deadline - now)).await;
            backoff = (backoff * 2).min(cap);
        }
    }
}

fn client_config(opts: &ConnectOptions) -> client::Config {
    // Ask only for the pinned key's algorithm, so a box with several host keys presents ours.
    let host_key_algorithms = match opts.host_key.algorithm() {
        russh::keys::Algorithm::Rsa { .. } => vec![
            russh::keys::Algorithm::Rsa { hash: Some(HashAlg::Sha512) },
            russh::keys::Algorithm::Rsa { hash: Some(HashAlg::Sha256) },
        ],
        algorithm => vec![algorithm],
    };
    let preferred = russh::Preferred { key: host_key_algorithms.into(), ..Default::default() };
    client::Config {
        inactivity_timeout: None,
        keepalive_interval: (!opts.keepalive_interval.is_zero()).then_some(opts.keepalive_interval),
        keepalive_max: opts.keepalive_max,
        // Keystrokes should not wait for Nagle.
        nodelay: true,
        preferred,
        ..Default::default()
    }
}

enum Failure {
    /// Worth another attempt; the text says what happened.
    Retry(String),
    /// Worth another attempt: nothing answered on the resume relay's port.
    Silent(String),
    Fatal(SshError),
}

/// One try at a session; `straight`: past a resume relay that does not answer, to sshd itself.
async fn attempt(
    opts: &ConnectOptions,
    config: &Arc<client::Config>,
    key: &Arc<PrivateKey>,
    straight: bool,
) -> Result<Session, Failure> {
    let inbound = Arc::new(super::forward::Inbound::default());
    let pinned = Pinned::new(opts, inbound.clone());
    let presented = pinned.presented.clone();
    let mut tunnel = None;
    let (handshake, proxy) = match &opts.transport {
        Transport::ProxyCommand(command) => {
            let (mut proxy, stream) = ProxyProcess::spawn(command).map_err(Failure::Fatal)?;
            let result = handshake(opts, config.clone(), stream, pinned, key).await;
            if let Err(Failure::Retry(why)) = &result {
                // Most handshake failures over a proxy are the proxy giving up: say so.
                if let Some(exit) = proxy.exited().await {
                    return Err(Failure::Retry(format!("proxy command {exit}")));
                }
                return Err(Failure::Retry(format!("{why} (via the proxy command)")));
            }
            (result, Some(proxy))
        }
        _ => {
            let (stream, ending) = open_stream(opts, config, key, straight).await?;
            tunnel = ending;
            (handshake(opts, config.clone(), stream, pinned, key).await, None)
        }
    };
    let handle = handshake?;
    let relay_skipped = straight && matches!(&opts.transport, Transport::Eice(t) if t.resumable);
    let host_key = presented.lock().expect("presented key").clone().unwrap_or_else(|| opts.host_key.clone());
    Ok(Session { handle, proxy, inbound, tunnel, relay_skipped, host_key })
}

/// The byte stream to the box's sshd over TCP or an EICE tunnel (through the box's resume relay
/// unless `straight`), and, for a tunnel straight to sshd, how it ends. (A proxy command's
/// stream comes with its process: see [`attempt`].)
async fn open_stream(
    opts: &ConnectOptions,
    config: &Arc<client::Config>,
    key: &Arc<PrivateKey>,
    straight: bool,
) -> Result<(Box<dyn super::resume::Io>, Option<super::eice::Ending>), Failure> {
    let transport = &opts.transport;
    match transport {
        Transport::Tcp { host, port } => {
            let stream = tcp_connect_staggered(host, *port, TCP_STAGGER, TCP_CONNECT_TIMEOUT)
                .await
                .map_err(|why| Failure::Retry(format!("TCP connect to {transport}: {why}")))?;
            let _ = stream.set_nodelay(true);
            // russh reads each packet's length and then its body with separate reads: through a
            // buffer, one system call takes in whatever has arrived (an echo, or many packets).
            // (A proxy's stdout is already read in large chunks by `Drained`.)
            Ok((Box::new(tokio::io::BufReader::with_capacity(READ_BUFFER, stream)), None))
        }
        Transport::Eice(target) if target.resumable && !straight => {
            let dial = resumable_dial(opts, config, key, target);
            Ok((Box::new(super::resume::open(dial).await.map_err(failure)?), None))
        }
        Transport::Eice(target) => {
            let stream = super::eice::open(target).await.map_err(|e| failure(eice_fault(e)))?;
            let ending = stream.ending();
            Ok((Box::new(stream), Some(ending)))
        }
        Transport::ProxyCommand(_) => {
            Err(Failure::Fatal(SshError::Other("a proxy command is its own stream".into())))
        }
    }
}

/// `proxy`: one byte stream to the box's sshd for another SSH client (OpenSSH's ProxyCommand),
/// by the same route as [`connect`]; through an eice box's relay it rides out tunnel ends. A
/// relay that does not answer is passed by (the answer's `bool`: the stream then ends with its
/// tunnel).
pub async fn stream_to_sshd(opts: &ConnectOptions) -> Result<(Box<dyn super::resume::Io>, bool), SshError> {
    let config = Arc::new(client_config(opts));
    let key = Arc::new(opts.client_key.clone());
    let to_error = |f: Failure| match f {
        Failure::Fatal(e) => e,
        Failure::Retry(why) | Failure::Silent(why) => {
            SshError::Other(format!("reaching {}: {why}", opts.transport))
        }
    };
    match open_stream(opts, &config, &key, false).await {
        Ok((stream, _)) => Ok((stream, false)),
        Err(Failure::Silent(_)) => {
            open_stream(opts, &config, &key, true).await.map(|(stream, _)| (stream, true)).map_err(to_error)
        }
        Err(other) => Err(to_error(other)),
    }
}

fn failure(fault: super::resume::Fault) -> Failure {
    match fault {
        super::resume::Fault::Retry(why) => Failure::Retry(why),
        super::resume::Fault::Silent(why) => Failure::Silent(why),
        super::resume::Fault::Fatal(why) => Failure::Fatal(SshError::Other(why)),
    }
}

/// A tunnel that could not be opened: a refusal is final, anything else worth another try.
fn eice_fault(e: super::eice::EiceError) -> super::resume::Fault {
    match e {
        super::eice::EiceError::Transient(why) => super::resume::Fault::Retry(why),
        fatal => super::resume::Fault::Fatal(fatal.to_string()),
    }
}

/// Each call: a fresh tunnel (fresh credentials and signature) to the box's sshd, a short-lived
/// outer SSH connection over it (same key, same pinned host key), and on that one exec channel
/// piping to the box's resume relay ([`crate::userdata::RESUME_ATTACH`]). The endpoint only
/// tunnels to ports 22 and 3389, so the relay listens on the box's loopback alone.
fn resumable_dial(
    opts: &ConnectOptions,
    config: &Arc<client::Config>,
    key: &Arc<PrivateKey>,
    target: &super::eice::EiceTarget,
) -> super::resume::Dial {
    let opts =
        Arc::new(ConnectOptions { transport: Transport::Eice(target.straight_to_sshd()), ..opts.clone() });
    let (config, key) = (config.clone(), key.clone());
    Box::new(move || {
        let (opts, config, key) = (opts.clone(), config.clone(), key.clone());
        Box::pin(async move {
            let Transport::Eice(target) = &opts.transport else { unreachable!("built above") };
            let tunnel = super::eice::open(target).await.map_err(eice_fault)?;
            let pinned = Pinned::new(&opts, Arc::default());
            let handle = handshake(&opts, config, tunnel, pinned, &key).await.map_err(|f| match f {
                Failure::Fatal(e) => super::resume::Fault::Fatal(e.to_string()),
                Failure::Retry(why) | Failure::Silent(why) => super::resume::Fault::Retry(why),
            })?;
            let retry =
                |e: russh::Error| super::resume::Fault::Retry(format!("the tunnel's SSH channel: {e}"));
            let channel = handle.channel_open_session().await.map_err(retry)?;
            channel.exec(false, crate::userdata::RESUME_ATTACH).await.map_err(retry)?;
            Ok(Box::new(Outer { stream: channel.into_stream(), _connection: handle })
                as Box<dyn super::resume::Io>)
        })
    })
}

/// One tunnel's outer SSH connection and its channel to the relay: the stream, kept alive with
/// the connection it runs on.
struct Outer {
    stream: russh::ChannelStream<client::Msg>,
    _connection: Handle<Pinned>,
}

impl tokio::io::AsyncRead for Outer {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Outer {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Connects to `host:port`, starting another connect every `stagger` while earlier ones are
/// unanswered, for at most `window`. The first stream to connect wins (the others are dropped);
/// a refusal or any other error ends the attempt at once, since it means the box's network is up
/// and the caller's retry loop handles it.
async fn tcp_connect_staggered(
    host: &str,
    port: u16,
    stagger: Duration,
    window: Duration,
) -> Result<tokio::net::TcpStream, String> {
    let started = tokio::time::Instant::now();
    let end = started + window;
    let mut pending = tokio::task::JoinSet::new();
    let mut next_start = started;
    loop {
        if tokio::time::Instant::now() >= next_start && next_start < end {
            let host = host.to_string();
            pending.spawn(async move { tokio::net::TcpStream::connect((host.as_str(), port)).await });
            next_start += stagger;
        }
        let wake = next_start.min(end);
        tokio::select! {
            Some(joined) = pending.join_next() => match joined {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(e)) => return Err(e.to_string()),
                Err(e) => return Err(format!("connect task failed: {e}")),
            },
            _ = tokio::time::sleep_until(wake) => {
                if tokio::time::Instant::now() >= end {
                    return Err(format!("no answer within {}", format_duration(window)));
                }
            }
        }
    }
}

async fn handshake<S>(
    opts: &ConnectOptions,
    config: Arc<client::Config>,
    stream: S,
    pinned: Pinned,
    key: &Arc<PrivateKey>,
) -> Result<Handle<Pinned>, Failure>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let steps = async {
        let mut handle = client::connect_stream(config, stream, pinned).await.map_err(|e| match e {
            HandlerError::HostKeyMismatch { presented } => Failure::Fatal(SshError::HostKeyMismatch {
                target: opts.transport.to_string(),
                expected: super::fingerprint(&opts.host_key),
                presented,
            }),
            HandlerError::Russh(e) => Failure::Retry(format!("SSH handshake: {}", describe(&e))),
        })?;
        let hash = match handle.best_supported_rsa_hash().await {
            Ok(hash) => hash.flatten(),
            Err(e) => return Err(Failure::Retry(format!("SSH handshake: {}", describe(&e)))),
        };
        let auth = handle
            .authenticate_publickey(opts.user.clone(), PrivateKeyWithHashAlg::new(key.clone(), hash))
            .await
            .map_err(|e| Failure::Retry(format!("SSH authentication: {}", describe(&e))))?;
        match auth {
            client::AuthResult::Success => Ok(handle),
            // The reply channel closes (and reads as a failure) when the connection dropped.
            _ if handle.is_closed() => {
                Err(Failure::Retry("the connection closed during authentication".to_string()))
            }
            client::AuthResult::Failure { remaining_methods, partial_success } => {
                let methods: Vec<&str> = remaining_methods.iter().map(<&str>::from).collect();
                let detail = if partial_success {
                    "it wants a further authentication step".to_string()
                } else if methods.is_empty() {
                    "public key refused".to_string()
                } else {
                    format!("public key refused; it offers: {}", methods.join(", "))
                };
                Err(Failure::Fatal(SshError::AuthRejected { user: opts.user.clone(), detail }))
            }
        }
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, steps).await {
        Ok(result) => result,
        Err(_) => Err(Failure::Retry(format!(
            "SSH handshake with {} timed out after {}",
            opts.transport,
            format_duration(HANDSHAKE_TIMEOUT)
        ))),
    }
}

/// Russh's errors, in words that say what happened on the wire.
fn describe(error: &russh::Error) -> String {
    match error {
        russh::Error::IO(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the connection closed before the handshake finished".to_string()
        }
        russh::Error::Disconnect => "the connection closed before the handshake finished".to_string(),
        other => other.to_string(),
    }
}

/// The client handler: accepts exactly the pinned host key (or, during an unfinished rotation,
/// one of the two pinned), remembers which one the box presented, and hands the channels the box
/// opens (`-R` connections, the agent) to the session's forwarding.
pub(crate) struct Pinned {
    expected: Vec<PublicKey>,
    presented: Arc<Mutex<Option<PublicKey>>>,
    inbound: Arc<super::forward::Inbound>,
}

impl Pinned {
    fn new(opts: &ConnectOptions, inbound: Arc<super::forward::Inbound>) -> Pinned {
        let repinned = opts.repinned.lock().expect("repinned key").clone();
        let expected = match repinned {
            Some(key) => vec![key],
            None => std::iter::once(&opts.host_key).chain(&opts.also_accept).cloned().collect(),
        };
        Pinned { expected, presented: Arc::default(), inbound }
    }
}

#[derive(Debug)]
pub(crate) enum HandlerError {
    Russh(russh::Error),
    HostKeyMismatch { presented: String },
}

impl From<russh::Error> for HandlerError {
    fn from(e: russh::Error) -> Self {
        HandlerError::Russh(e)
    }
}

impl client::Handler for Pinned {
    type Error = HandlerError;

    async fn check_server_key(&mut self, server: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        match server {
            PublicKeyOrCertificate::PublicKey { key, .. }
                if self.expected.iter().any(|e| e.key_data() == key.key_data()) =>
            {
                *self.presented.lock().expect("presented key") = Some(key.clone());
                Ok(true)
            }
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                Err(HandlerError::HostKeyMismatch { presented: super::fingerprint(key) })
            }
            PublicKeyOrCertificate::Certificate(cert) => Err(HandlerError::HostKeyMismatch {
                presented: format!("a certificate for {}", cert.public_key().fingerprint(HashAlg::Sha256)),
            }),
        }
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.inbound.forwarded_tcpip(channel, connected_address, connected_port, reply);
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.inbound.agent_channel(channel, reply);
        Ok(())
    }
}

/// The running proxy command: its stdin/stdout carry the SSH stream (owned by russh), its stderr
/// is logged and the last lines kept to explain a failure. Killed when dropped.
pub(crate) struct ProxyProcess {
    child: Child,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

type ProxyStream = tokio::io::Join<Drained, tokio::process::ChildStdin>;

/// The proxy command's stdout, read continuously by a task of its own.
///
/// russh stops reading while it flushes what it has queued for writing. Over a socket that is
/// harmless, but a proxy command may be a simple relay that blocks writing its stdout until
/// somebody reads it, and then no longer reads its stdin either: both sides wait forever (a
/// `connect ID -- cat` of a few MiB stalled that way). Draining stdout into memory decouples the
/// two directions; the SSH window bounds how much can pile up.
pub(crate) struct Drained {
    chunks: tokio::sync::mpsc::UnboundedReceiver<std::io::Result<Vec<u8>>>,
    pending: Vec<u8>,
    offset: usize,
}

impl Drained {
    fn spawn(mut stdout: tokio::process::ChildStdout) -> Drained {
        use tokio::io::AsyncReadExt;
        let (tx, chunks) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                // A fresh buffer each time, handed over whole: no copy, no zeroing.
                let mut buf = Vec::with_capacity(READ_BUFFER);
                match stdout.read_buf(&mut buf).await {
                    Ok(0) => break,
                    Ok(_) => {
                        if tx.send(Ok(buf)).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        break;
                    }
                }
            }
        });
        Drained { chunks, pending: Vec::new(), offset: 0 }
    }
}

impl tokio::io::AsyncRead for Drained {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        loop {
            if self.offset < self.pending.len() {
                let n = out.remaining().min(self.pending.len() - self.offset);
                let start = self.offset;
                out.put_slice(&self.pending[start..start + n]);
                self.offset += n;
                return Poll::Ready(Ok(()));
            }
            match self.chunks.poll_recv(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    self.pending = chunk;
                    self.offset = 0;
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())), // EOF
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl ProxyProcess {
    fn spawn(command: &str) -> Result<(ProxyProcess, ProxyStream), SshError> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| SshError::Other(format!("cannot start the proxy command with sh -c: {e}")))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(SshError::Other("the proxy command started without its pipes".to_string()));
        };
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // Room for a burst each way (64 KiB by default): a relay that writes while we are busy
            // encrypting or writing our own stdout does not stall, and so keeps reading its side.
            for fd in [stdin.as_raw_fd(), stdout.as_raw_fd()] {
                // SAFETY: F_SETPIPE_SZ on a pipe we own; failure (a lower limit) is harmless.
                unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, PROXY_PIPE_BYTES) };
            }
        }
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let keep = tail.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::debug!("proxy command: {line}");
                let mut kept = keep.lock().unwrap_or_else(|p| p.into_inner());
                if kept.len() == PROXY_STDERR_LINES {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
        });
        Ok((ProxyProcess { child, stderr: tail }, tokio::io::join(Drained::spawn(stdout), stdin)))
    }

    /// If the proxy has exited (or does so within a moment), how: e.g. "exited with exit status:
    /// 1: nc: connection refused".
    async fn exited(&mut self) -> Option<String> {
        let status = tokio::time::timeout(Duration::from_millis(300), self.child.wait()).await.ok()?.ok()?;
        // Let the stderr reader catch up with the last lines.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let kept = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        let said = kept.iter().map(String::as_str).collect::<Vec<_>>().join(" / ");
        Some(if said.is_empty() {
            format!("exited ({status})")
        } else {
            format!("exited ({status}): {said}")
        })
    }

    pub(crate) async fn shutdown(mut self) {
        if tokio::time::timeout(Duration::from_secs(1), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// `2.5s`, `20s`, `3m`, `2m30s`.
pub(crate) fn format_duration(d: Duration) -> String {
    let millis = d.as_millis();
    if millis < 10_000 && !millis.is_multiple_of(1000) {
        return format!("{:.1}s", d.as_secs_f64());
    }
    let secs = d.as_secs();
    match (secs / 60, secs % 60) {
        (0, s) => format!("{s}s"),
        (m, 0) => format!("{m}m"),
        (m, s) => format!("{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(format_duration(Duration::from_millis(2500)), "2.5s");
        assert_eq!(format_duration(Duration::from_secs(20)), "20s");
        assert_eq!(format_duration(Duration::from_secs(180)), "3m");
        assert_eq!(format_duration(Duration::from_secs(150)), "2m30s");
    }

    /// A listener whose accept queue is full: the kernel drops further SYNs, as a booting box
    /// does before its network is up (the client only resends after 1 s).
    struct SynBlackhole {
        fd: libc::c_int,
        _queued: std::net::TcpStream,
    }

    impl SynBlackhole {
        fn bind(addr: std::net::SocketAddrV4) -> SynBlackhole {
            // SAFETY: plain socket calls on a descriptor we own; the sockaddr outlives them.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                assert!(fd >= 0);
                let one: libc::c_int = 1;
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_REUSEADDR,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
                let sa = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: addr.port().to_be(),
                    sin_addr: libc::in_addr { s_addr: u32::from(*addr.ip()).to_be() },
                    sin_zero: [0; 8],
                };
                let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
                assert_eq!(libc::bind(fd, (&sa as *const libc::sockaddr_in).cast(), len), 0);
                assert_eq!(libc::listen(fd, 0), 0);
                // Backlog 0 holds one connection: fill it, so every later SYN is dropped.
                let queued = std::net::TcpStream::connect(addr).unwrap();
                SynBlackhole { fd, _queued: queued }
            }
        }
    }

    impl Drop for SynBlackhole {
        fn drop(&mut self) {
            // SAFETY: our descriptor, closed once.
            unsafe { libc::close(self.fd) };
        }
    }

    fn free_loopback_addr() -> std::net::SocketAddrV4 {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let pid = std::process::id();
        std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(127, 3, (pid >> 8) as u8, pid as u8 | 1), port)
    }

    #[tokio::test]
    async fn staggered_connect_gives_up_when_every_syn_is_dropped() {
        let addr = free_loopback_addr();
        let _hole = SynBlackhole::bind(addr);
        let err = tcp_connect_staggered(
            &addr.ip().to_string(),
            addr.port(),
            Duration::from_millis(100),
            Duration::from_millis(500),
        )
        .await
        .unwrap_err();
        assert_eq!(err, "no answer within 0.5s");
    }

    /// A single connect whose first SYN was dropped would only be answered at the kernel's resend
    /// after 1 s, outside this 800 ms window; a connect started after sshd came up is answered.
    #[tokio::test]
    async fn staggered_connect_reaches_a_listener_that_replaces_dropped_syns() {
        let addr = free_loopback_addr();
        let hole = SynBlackhole::bind(addr);
        let connecting = tokio::spawn(async move {
            let host = addr.ip().to_string();
            tcp_connect_staggered(&host, addr.port(), Duration::from_millis(100), Duration::from_millis(800))
                .await
        });
        tokio::time::sleep(Duration::from_millis(250)).await;
        drop(hole);
        // The closed blackhole's queued connection can hold the address for a moment on a loaded
        // machine (CI saw AddrInUse): bind again shortly, well inside the 800 ms window.
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 20 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("binding {addr}: {e}"),
            }
        };
        let stream = connecting.await.unwrap().expect("a later connect is answered within the window");
        let (_accepted, peer) = listener.accept().await.unwrap();
        assert_eq!(stream.local_addr().unwrap(), peer);
    }

    /// A relay writing to us while we are busy must not stall on a 64 KiB pipe (a 1 GiB transfer
    /// through a single-threaded relay ran at 0.75x OpenSSH's speed that way).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn proxy_pipes_get_room_for_a_burst() {
        use tokio::io::AsyncReadExt;
        let max: usize =
            std::fs::read_to_string("/proc/sys/fs/pipe-max-size").unwrap().trim().parse().unwrap();
        let (proxy, mut stream) = ProxyProcess::spawn(
            "exec python3 -c 'import fcntl; print(fcntl.fcntl(0, 1032), fcntl.fcntl(1, 1032))'", // F_GETPIPE_SZ
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        let want = (PROXY_PIPE_BYTES as usize).min(max);
        assert_eq!(out.trim(), format!("{want} {want}"), "pipe sizes seen by the proxy (stdin, stdout)");
        proxy.shutdown().await;
    }

    #[tokio::test]
    async fn staggered_connect_reports_a_refusal_at_once() {
        let addr = free_loopback_addr();
        let err = tcp_connect_staggered(
            &addr.ip().to_string(),
            addr.port(),
            Duration::from_millis(100),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(err.contains("refused"), "{err}");
    }
}

//! One byte stream that outlives the tunnels it rides on. An EC2 Instance Connect Endpoint ends
//! every tunnel at its maximum duration (one hour), and an SSH connection over a tunnel would
//! end with it, taking a shell or a running command along. An eice box therefore runs a small
//! relay (`src/userdata/resume.py`, on its loopback at [`RELAY_PORT`]) that holds the TCP
//! connection to its own sshd. The endpoint tunnels to ports 22 and 3389 only, so each tunnel
//! carries a short-lived outer SSH connection whose one exec channel pipes to the relay (see
//! `connect::resumable_dial`); the client speaks the EAR1 protocol to the relay over successive
//! tunnels and the SSH connection inside (end-to-end encrypted, host key pinned) never notices.
//!
//! EAR1, both integers big-endian: the client sends `EAR1` + a 16-byte token (one per SSH
//! connection) + u64 bytes it has received; the relay answers `EAR1` + status (0 new, 1 resumed,
//! 2 refused: u16 length + reason follow) + u64 bytes it has received. Each side then resends
//! what the other lacks and sends frames: `1` DATA (u32 length + bytes), `2` ACK (u64 total
//! received; the sender may forget bytes up to it), `3` EOF (the sender's stream ended).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The relay's port on an eice box's loopback.
pub const RELAY_PORT: u16 = 2022;
const MAGIC: &[u8; 4] = b"EAR1";
const DATA: u8 = 1;
const ACK: u8 = 2;
const EOF: u8 = 3;
const NEW: u8 = 0;
const RESUMED: u8 = 1;
const REFUSED: u8 = 2;
/// The largest DATA frame the relay accepts.
const MAX_DATA: usize = 65_536;
/// DATA frames this side sends: one WebSocket frame each, header included.
const SEND_CHUNK: usize = 32 * 1024;
/// Acknowledge after this many bytes, or [`ACK_DELAY`] after the first unacknowledged one.
const ACK_EVERY: u64 = 64 * 1024;
const ACK_DELAY: Duration = Duration::from_millis(500);
/// Sent but unacknowledged bytes kept for a resend; reading from SSH pauses above it.
const BUFFER: usize = 4 * 1024 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a broken stream keeps trying new tunnels before the connection counts as lost
/// (sshd drops a silent client after about 30 s anyway).
pub const RESUME_WINDOW: Duration = Duration::from_secs(45);

/// Why a tunnel could not carry the stream.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Worth another attempt (the relay or sshd not up yet, a network error).
    Retry(String),
    /// Not worth one (a refused signature, say).
    Fatal(String),
    /// Nothing answered on the relay's port: the tunnel ended, or stayed silent, before the
    /// first byte of a WELCOME (a box still booting, or one without the relay).
    Silent(String),
}

pub type Tunnel = Box<dyn Io>;
/// Anything a tunnel can be.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Opens a new tunnel to the relay each time it is called.
pub type Dial = Box<dyn Fn() -> Pin<Box<dyn Future<Output = Result<Tunnel, Fault>> + Send>> + Send + Sync>;

/// Opens a stream through the relay: the first tunnel, the handshake, then a task that carries
/// the bytes and moves to a new tunnel whenever one ends. The returned end is what SSH runs on;
/// it reads EOF when the box's sshd closed the connection or no tunnel could be had within
/// [`RESUME_WINDOW`].
pub async fn open(dial: Dial) -> Result<DuplexStream, Fault> {
    let token: [u8; 16] = rand::random();
    let mut tunnel = dial().await?;
    match hello(&mut tunnel, &token, 0).await? {
        Welcome::New => {}
        Welcome::Resumed(_) => {
            return Err(Fault::Retry("the resume relay resumed a stream it should not know".into()));
        }
        Welcome::Refused(why) => return Err(Fault::Retry(format!("the box's resume relay refused: {why}"))),
    }
    // As roomy as a TCP socket's buffers, beyond SSH's channel window: SSH never waits on this
    // pipe for long while the pump waits on SSH.
    let (ours, theirs) = tokio::io::duplex(BUFFER);
    let pump = Pump { dial, token, unacked: VecDeque::new(), unacked_base: 0, received: 0, acked: 0 };
    tokio::spawn(pump.run(theirs, tunnel, 0));
    Ok(ours)
}

enum Welcome {
    New,
    Resumed(u64),
    Refused(String),
}

/// Sends HELLO and reads WELCOME, within [`HANDSHAKE_TIMEOUT`].
async fn hello(tunnel: &mut Tunnel, token: &[u8; 16], have: u64) -> Result<Welcome, Fault> {
    let exchange = async {
        let mut out = Vec::with_capacity(28);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(token);
        out.extend_from_slice(&have.to_be_bytes());
        tunnel.write_all(&out).await?;
        tunnel.flush().await?;
        let mut head = [0u8; 5];
        if tunnel.read(&mut head[..1]).await.unwrap_or(0) == 0 {
            return Ok(None); // nothing answered
        }
        tunnel.read_exact(&mut head[1..]).await?;
        if &head[..4] != MAGIC {
            return Err(std::io::Error::other("the box's resume relay does not speak EAR1".to_string()));
        }
        if head[4] == REFUSED {
            let length = tunnel.read_u16().await?;
            let mut reason = vec![0u8; length as usize];
            tunnel.read_exact(&mut reason).await?;
            // Box text, shown in messages: escaped.
            let reason = crate::output::box_text(&String::from_utf8_lossy(&reason));
            return Ok(Some(Welcome::Refused(reason)));
        }
        let theirs = tunnel.read_u64().await?;
        match head[4] {
            NEW => Ok(Some(Welcome::New)),
            RESUMED => Ok(Some(Welcome::Resumed(theirs))),
            other => Err(std::io::Error::other(format!("unknown EAR1 status {other}"))),
        }
    };
    let silent = || Fault::Silent("the box's resume relay did not answer".to_string());
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange).await {
        Ok(Ok(Some(welcome))) => Ok(welcome),
        Ok(Ok(None)) | Err(_) => Err(silent()),
        Ok(Err(e)) => Err(Fault::Retry(format!("the box's resume relay: {e}"))),
    }
}

/// One frame from the relay.
enum Frame {
    Data(Vec<u8>),
    Ack(u64),
    Eof,
}

/// Reads frames from one tunnel into a channel (so reading is never cut off halfway by the
/// pump's other work); the channel closes with the tunnel, carrying why.
fn read_frames(mut reader: tokio::io::ReadHalf<Tunnel>) -> Frames {
    let (tx, rx) = mpsc::channel(8);
    let task = tokio::spawn(async move {
        loop {
            let frame = async {
                match reader.read_u8().await? {
                    DATA => {
                        let length = reader.read_u32().await? as usize;
                        if length == 0 || length > MAX_DATA {
                            return Err(std::io::Error::other(format!("a DATA frame of {length} bytes")));
                        }
                        let mut data = vec![0u8; length];
                        reader.read_exact(&mut data).await?;
                        Ok(Frame::Data(data))
                    }
                    ACK => Ok(Frame::Ack(reader.read_u64().await?)),
                    EOF => Ok(Frame::Eof),
                    other => Err(std::io::Error::other(format!("unknown frame type {other}"))),
                }
            }
            .await;
            let failed = frame.is_err();
            if tx.send(frame.map_err(|e| e.to_string())).await.is_err() || failed {
                return;
            }
        }
    });
    Frames { rx, reader: task.abort_handle() }
}

/// The frames of one tunnel; dropping it stops their reader, so a tunnel given up on is closed
/// (with the outer SSH connection it carries) even if it never said goodbye.
struct Frames {
    rx: mpsc::Receiver<Result<Frame, String>>,
    reader: tokio::task::AbortHandle,
}

impl Drop for Frames {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The bytes in flight, and where each direction has got to.
struct Pump {
    dial: Dial,
    token: [u8; 16],
    /// Sent to the relay and not yet acknowledged, starting at stream offset `unacked_base`.
    unacked: VecDeque<u8>,
    unacked_base: u64,
    /// Bytes received from the relay, and how many of them we have acknowledged.
    received: u64,
    acked: u64,
}

/// How serving one tunnel ended.
enum Served {
    /// The stream is over (sshd closed it, or SSH did): nothing to resume.
    Finished,
    /// The tunnel ended under a live stream.
    Broken(String),
}

impl Pump {
    async fn run(mut self, local: DuplexStream, mut tunnel: Tunnel, mut their_have: u64) {
        let (mut local_r, mut local_w) = tokio::io::split(local);
        loop {
            match self.serve(&mut local_r, &mut local_w, tunnel, their_have).await {
                Served::Finished => return,
                Served::Broken(why) => {
                    tracing::info!("the EICE tunnel ended ({why}); resuming the SSH stream on a new one");
                    match self.reconnect().await {
                        Some((next, have)) => (tunnel, their_have) = (next, have),
                        None => {
                            tracing::warn!("no new tunnel resumed the SSH stream within {RESUME_WINDOW:?}");
                            return; // dropping `local_w` ends SSH's stream
                        }
                    }
                }
            }
        }
    }

    /// Drops what the relay has acknowledged.
    fn acknowledged(&mut self, upto: u64) {
        let upto = upto.min(self.unacked_base + self.unacked.len() as u64);
        if upto > self.unacked_base {
            self.unacked.drain(..(upto - self.unacked_base) as usize);
            self.unacked_base = upto;
        }
    }

    /// Carries bytes over one tunnel until it or the stream ends.
    async fn serve(
        &mut self,
        local_r: &mut tokio::io::ReadHalf<DuplexStream>,
        local_w: &mut tokio::io::WriteHalf<DuplexStream>,
        tunnel: Tunnel,
        their_have: u64,
    ) -> Served {
        let (reader, mut writer) = tokio::io::split(tunnel);
        let mut frames = read_frames(reader);
        if their_have < self.unacked_base {
            // Bytes it acknowledged are gone from the relay: nothing can mend that stream.
            tracing::warn!(
                "the box's resume relay has {their_have} bytes, but {} were acknowledged",
                self.unacked_base
            );
            return Served::Finished;
        }
        self.acknowledged(their_have);
        let resend: Vec<u8> = self.unacked.iter().copied().collect();
        for chunk in resend.chunks(SEND_CHUNK) {
            if let Err(e) = send(&mut writer, DATA, chunk).await {
                return Served::Broken(e.to_string());
            }
        }
        let mut ack_due: Option<Instant> = None;
        let mut buf = vec![0u8; SEND_CHUNK];
        loop {
            // The relay stops reading beyond this much unacknowledged (its --buffer).
            let room = self.unacked.len() + SEND_CHUNK <= BUFFER;
            let due = ack_due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                frame = frames.rx.recv() => {
                    if let Some(end) = self.take(frame, local_w, &mut writer, &mut ack_due).await {
                        return end;
                    }
                }
                read = local_r.read(&mut buf), if room => match read {
                    Ok(0) | Err(_) => {
                        // SSH is done with the connection: tell the relay, which closes sshd's side.
                        let _ = send(&mut writer, EOF, &[]).await;
                        let _ = writer.shutdown().await;
                        return Served::Finished;
                    }
                    Ok(n) => {
                        self.unacked.extend(&buf[..n]);
                        if let Err(e) = send(&mut writer, DATA, &buf[..n]).await {
                            return Served::Broken(e.to_string());
                        }
                    }
                },
                _ = tokio::time::sleep_until(due), if ack_due.is_some() => {
                    ack_due = None;
                    self.acked = self.received;
                    if let Err(e) = send(&mut writer, ACK, &self.received.to_be_bytes()).await {
                        return Served::Broken(e.to_string());
                    }
                }
            }
        }
    }

    /// What one frame from the relay (or the tunnel's end) does: bytes on to SSH (and an
    /// acknowledgement scheduled), acknowledged bytes forgotten, or the end of this tunnel or of
    /// the whole stream.
    async fn take(
        &mut self,
        frame: Option<Result<Frame, String>>,
        local_w: &mut tokio::io::WriteHalf<DuplexStream>,
        writer: &mut tokio::io::WriteHalf<Tunnel>,
        ack_due: &mut Option<Instant>,
    ) -> Option<Served> {
        match frame {
            Some(Ok(Frame::Data(data))) => {
                if local_w.write_all(&data).await.is_err() {
                    // SSH has gone: the relay closes sshd's side at once.
                    let _ = send(writer, EOF, &[]).await;
                    return Some(Served::Finished);
                }
                self.received += data.len() as u64;
                if self.received - self.acked >= ACK_EVERY {
                    *ack_due = Some(Instant::now());
                } else {
                    ack_due.get_or_insert_with(|| Instant::now() + ACK_DELAY);
                }
                None
            }
            Some(Ok(Frame::Ack(upto))) => {
                self.acknowledged(upto);
                None
            }
            Some(Ok(Frame::Eof)) => {
                // sshd closed the connection: SSH reads the end; the relay forgets us.
                let _ = send(writer, ACK, &self.received.to_be_bytes()).await;
                let _ = local_w.shutdown().await;
                Some(Served::Finished)
            }
            Some(Err(why)) => Some(Served::Broken(why)),
            None => Some(Served::Broken("the tunnel closed".into())),
        }
    }

    /// New tunnels until one resumes the stream, for at most [`RESUME_WINDOW`]. A relay that no
    /// longer knows the stream (or starts a new one) ends it.
    async fn reconnect(&mut self) -> Option<(Tunnel, u64)> {
        let give_up = Instant::now() + RESUME_WINDOW;
        let mut pause = Duration::from_millis(200);
        while Instant::now() < give_up {
            let attempt = async {
                let mut tunnel = (self.dial)().await?;
                let welcome = hello(&mut tunnel, &self.token, self.received).await?;
                Ok::<_, Fault>((tunnel, welcome))
            };
            match tokio::time::timeout_at(give_up, attempt).await {
                Ok(Ok((tunnel, Welcome::Resumed(have)))) => {
                    tracing::info!(
                        "resumed the SSH stream on a new tunnel ({have} bytes had reached the box)"
                    );
                    self.acked = self.received;
                    return Some((tunnel, have));
                }
                Ok(Ok((_, Welcome::New))) => {
                    tracing::warn!("the box's resume relay no longer knew the stream");
                    return None;
                }
                Ok(Ok((_, Welcome::Refused(why)))) => {
                    tracing::warn!("the box's resume relay refused to resume: {why}");
                    return None;
                }
                Ok(Err(Fault::Fatal(why))) => {
                    tracing::warn!("a new tunnel was refused: {why}");
                    return None;
                }
                Ok(Err(Fault::Retry(why) | Fault::Silent(why))) => tracing::info!("no new tunnel yet: {why}"),
                Err(_) => break,
            }
            tokio::time::sleep(pause.min(give_up.saturating_duration_since(Instant::now()))).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
        None
    }
}

/// Writes one frame and flushes it (a tunnel sends what it is given only on a flush).
async fn send(writer: &mut tokio::io::WriteHalf<Tunnel>, kind: u8, body: &[u8]) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(body.len() + 5);
    frame.push(kind);
    if kind == DATA {
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    }
    frame.extend_from_slice(body);
    writer.write_all(&frame).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests;

//! The EC2 Instance Connect Endpoint transport: SSH to the box's private address with no public
//! IP and no port open to the caller. The client opens a WebSocket to the endpoint
//! (`wss://<DnsName>/openTunnel?…`, presigned with SigV4 in the query string for the service
//! `ec2-instance-connect`, as the AWS CLI's `ec2-instance-connect open-tunnel` does); AWS relays
//! the raw TCP bytes of the box's port 22 as binary frames, and russh runs over [`WsIo`], which
//! turns the WebSocket back into a byte stream. A text frame or a close code other than 1000
//! ends the stream with the endpoint's reason; close 1000 is a normal end (the endpoint also
//! sends it when the tunnel reaches its maximum duration, at most one hour).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{SignableBody, SignableRequest, SignatureLocation, SigningSettings, sign};
use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The signing name of the endpoint's API.
pub const SERVICE: &str = "ec2-instance-connect";
/// How long a presigned URL is good for (the AWS CLI's value).
pub const URL_EXPIRES: Duration = Duration::from_secs(60);
/// The longest tunnel AWS allows (and its default).
pub const MAX_TUNNEL: Duration = Duration::from_secs(3600);
/// The largest binary frame a client sends.
pub const MAX_FRAME: usize = 65_000;

/// Where one tunnel goes: the endpoint, the box's private address, and how to sign.
#[derive(Clone)]
pub struct EiceTarget {
    pub endpoint_id: String,
    /// The endpoint's `DnsName`: the `Host` that is signed and sent.
    pub dns_name: String,
    pub region: String,
    pub private_ip: String,
    pub port: u16,
    /// `port` is the box's resume relay ([`super::resume`]): SSH runs over a stream that moves to
    /// a new tunnel whenever one ends, instead of straight over one tunnel to sshd.
    pub resumable: bool,
    pub max_duration: Duration,
    /// Dial this base URL (`ws://127.0.0.1:PORT` for the local cloud) instead of `wss://DnsName`.
    pub dial_url: Option<String>,
    pub credentials: SharedCredentialsProvider,
}

impl EiceTarget {
    /// The same box's sshd itself (port 22), one tunnel per connection: for a box whose resume
    /// relay does not answer.
    pub fn straight_to_sshd(&self) -> EiceTarget {
        EiceTarget { port: 22, resumable: false, ..self.clone() }
    }
}

impl std::fmt::Debug for EiceTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::fmt::Display for EiceTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = if self.resumable { " (resumable)" } else { "" };
        write!(f, "{}:{}{how} via {}", self.private_ip, self.port, self.endpoint_id)
    }
}

/// Why a tunnel could not be opened, or ended badly.
#[derive(Debug, thiserror::Error)]
pub enum EiceError {
    /// The endpoint refused the handshake with an HTTP status: not worth retrying.
    #[error("{}", refusal(*status, body))]
    Refused { status: u16, body: String },
    /// The network, TLS, or a 5xx: worth another attempt.
    #[error("opening the tunnel: {0}")]
    Transient(String),
    #[error("signing the tunnel request: {0}")]
    Signing(String),
}

fn refusal(status: u16, body: &str) -> String {
    let body = body.trim();
    let said = if body.is_empty() { String::new() } else { format!(": {body}") };
    let hint = match status {
        403 => {
            "; check that your policy allows ec2-instance-connect:OpenTunnel on the endpoint (`ephemeral-admin policy`) and that your clock is right"
        }
        404 => "; the endpoint is gone: `ephemeral-admin setup eice` creates one",
        _ => "",
    };
    format!("the Instance Connect Endpoint refused the tunnel (HTTP {status}{said}){hint}")
}

/// The query string of an `openTunnel` request, before signing.
fn tunnel_query(target: &EiceTarget) -> String {
    format!(
        "instanceConnectEndpointId={}&remotePort={}&privateIpAddress={}&maxTunnelDuration={}",
        target.endpoint_id,
        target.port,
        target.private_ip,
        target.max_duration.as_secs().clamp(1, MAX_TUNNEL.as_secs())
    )
}

/// The presigned `wss://DnsName/openTunnel?…` URL, signed at `now` with `credentials`.
pub fn presign(
    target: &EiceTarget,
    credentials: aws_credential_types::Credentials,
    now: SystemTime,
) -> Result<String, EiceError> {
    let url = format!("wss://{}/openTunnel?{}", target.dns_name, tunnel_query(target));
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(URL_EXPIRES);
    let identity = credentials.into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(&target.region)
        .name(SERVICE)
        .time(now)
        .settings(settings)
        .build()
        .map_err(|e| EiceError::Signing(e.to_string()))?
        .into();
    let headers = [("host", target.dns_name.as_str())];
    let request = SignableRequest::new("GET", &url, headers.into_iter(), SignableBody::Bytes(&[]))
        .map_err(|e| EiceError::Signing(e.to_string()))?;
    let (instructions, _) =
        sign(request, &params).map_err(|e| EiceError::Signing(e.to_string()))?.into_parts();
    let mut signed = url;
    for (name, value) in instructions.params() {
        signed.push_str(&format!("&{name}={}", encode(value)));
    }
    Ok(signed)
}

/// RFC 3986 query encoding, as SigV4 canonicalises it.
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The URL actually dialled: the presigned one, with its scheme and authority replaced by the
/// configured base URL when there is one (the local cloud's plain `ws://` listener).
fn dial_url(signed: &str, target: &EiceTarget) -> String {
    match &target.dial_url {
        None => signed.to_string(),
        Some(base) => {
            let path = signed.split_once("/openTunnel").map(|(_, rest)| rest).unwrap_or("");
            format!("{}/openTunnel{path}", base.trim_end_matches('/'))
        }
    }
}

/// Opens one tunnel: fresh credentials, a fresh signature, the WebSocket upgrade with `Host`
/// set to the endpoint's DnsName.
pub async fn open(target: &EiceTarget) -> Result<WsIo, EiceError> {
    let credentials = target
        .credentials
        .provide_credentials()
        .await
        .map_err(|e| EiceError::Signing(format!("no AWS credentials: {e}")))?;
    let signed = presign(target, credentials, SystemTime::now())?;
    open_signed(&dial_url(&signed, target), &target.dns_name).await
}

/// Opens a tunnel at an already signed URL (also how a test sends a tampered one).
pub async fn open_signed(url: &str, host: &str) -> Result<WsIo, EiceError> {
    let mut request =
        url.into_client_request().map_err(|e| EiceError::Signing(format!("bad tunnel URL: {e}")))?;
    let host = host.parse().map_err(|_| EiceError::Signing(format!("bad endpoint host {host:?}")))?;
    request.headers_mut().insert("host", host);
    match tokio_tungstenite::connect_async_tls_with_config(request, None, true, None).await {
        Ok((ws, _response)) => Ok(WsIo::new(ws)),
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = response.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            let body: String = body.chars().take(300).collect();
            match status {
                400..=499 => Err(EiceError::Refused { status, body }),
                _ => Err(EiceError::Transient(refusal(status, &body))),
            }
        }
        Err(e) => Err(EiceError::Transient(e.to_string())),
    }
}

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// How a tunnel ended, as the endpoint said (shared with the session, so a dropped connection
/// can tell a tunnel at its maximum duration from a broken network).
#[derive(Debug, Clone, Default)]
pub struct Ending(Arc<Mutex<Option<String>>>);

impl Ending {
    /// `Some("closed normally")`, or the endpoint's reason; None while open or when unknown.
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether the endpoint ended the tunnel normally (close 1000: done, or its max duration).
    pub fn normal(&self) -> bool {
        self.get().as_deref() == Some(NORMAL)
    }

    fn set(&self, why: String) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(why);
    }
}

const NORMAL: &str = "closed normally";

/// A WebSocket as a byte stream: binary frames in, binary frames (at most [`MAX_FRAME`]) out.
pub struct WsIo {
    ws: Ws,
    pending: tungstenite::Bytes,
    ending: Ending,
}

impl WsIo {
    fn new(ws: Ws) -> WsIo {
        WsIo { ws, pending: tungstenite::Bytes::new(), ending: Ending::default() }
    }

    /// The handle that later tells how the tunnel ended.
    pub fn ending(&self) -> Ending {
        self.ending.clone()
    }

    fn failed(&self, why: String) -> std::io::Error {
        self.ending.set(why.clone());
        std::io::Error::new(std::io::ErrorKind::ConnectionAborted, why)
    }

    /// What one incoming message means: bytes, nothing (control frames), end, or failure.
    fn take(&mut self, message: Message) -> Poll<std::io::Result<bool>> {
        match message {
            Message::Binary(data) => {
                self.pending = data;
                Poll::Ready(Ok(true))
            }
            Message::Text(text) => Poll::Ready(Err(self.failed(format!("the endpoint said: {text}")))),
            Message::Close(frame) => self.closed(frame),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Poll::Ready(Ok(true)),
        }
    }

    fn closed(&mut self, frame: Option<CloseFrame>) -> Poll<std::io::Result<bool>> {
        match frame {
            Some(frame) if frame.code != CloseCode::Normal => Poll::Ready(Err(self.failed(format!(
                "the endpoint closed the tunnel (code {}): {}",
                u16::from(frame.code),
                frame.reason
            )))),
            _ => {
                self.ending.set(NORMAL.to_string());
                Poll::Ready(Ok(false))
            }
        }
    }
}

fn io_error(e: tungstenite::Error) -> std::io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        other => std::io::Error::other(other),
    }
}

impl AsyncRead for WsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = out.remaining().min(self.pending.len());
                out.put_slice(&self.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            let next = ready!(Pin::new(&mut self.ws).poll_next(cx));
            let more = match next {
                Some(Ok(message)) => ready!(self.take(message))?,
                Some(Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed))
                | None => false,
                Some(Err(e)) => return Poll::Ready(Err(self.failed(format!("the tunnel broke: {e}")))),
            };
            if !more {
                return Poll::Ready(Ok(())); // EOF
            }
        }
    }
}

impl AsyncWrite for WsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(io_error)?;
        let n = buf.len().min(MAX_FRAME);
        let frame = Message::Binary(tungstenite::Bytes::copy_from_slice(&buf[..n]));
        Pin::new(&mut self.ws).start_send(frame).map_err(io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match ready!(Pin::new(&mut self.ws).poll_close(cx)) {
            Ok(()) | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(io_error(e))),
        }
    }
}

#[cfg(test)]
mod tests;

//! The embedded SSH client: reaches the box over TCP or a ProxyCommand, insists on the host key
//! pinned for this session, and then either runs one command without a PTY ([`Session::exec`]) or
//! opens an interactive terminal ([`Session::shell`]), optionally recorded as an asciicast.
//!
//! No known_hosts, no trust on first use: the session made both keys, so the box either presents
//! exactly the host key we gave it or we stop. Port and agent forwarding ride on the same
//! connection ([`forward`]).

pub mod config_file;
mod connect;
pub mod eice;
mod exec;
pub mod forward;
mod pipe;
mod quote;
#[cfg(test)]
mod quote_props;
pub mod record;
pub mod resume;
mod sftp;
mod shell;
mod stdin;

use std::time::Duration;

use russh::client;

pub use connect::{connect, stream_to_sshd};
pub use exec::{Captured, ExecIo};
pub use pipe::pipe_stdio;
pub use quote::{
    ProxyWord, expand_instance_token, expand_proxy_command, proxy_template, proxy_word, shell_quote,
};
pub use shell::ShellOptions;

/// How to reach the box.
#[derive(Debug, Clone)]
pub enum Transport {
    Tcp {
        host: String,
        port: u16,
    },
    /// OpenSSH-style ProxyCommand, already expanded; SSH runs over its stdin/stdout (spawned via
    /// `sh -c`).
    ProxyCommand(String),
    /// Through an EC2 Instance Connect Endpoint's WebSocket tunnel ([`eice`]).
    Eice(eice::EiceTarget),
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Transport::Tcp { host, port } => write!(f, "{host}:{port}"),
            Transport::ProxyCommand(command) => write!(f, "proxy command `{command}`"),
            Transport::Eice(target) => write!(f, "{target}"),
        }
    }
}

/// Everything [`connect`] needs.
#[derive(Clone)]
pub struct ConnectOptions {
    pub transport: Transport,
    pub user: String,
    pub client_key: russh::keys::PrivateKey,
    /// The pinned host key: any other key aborts at once with [`SshError::HostKeyMismatch`] (no
    /// retry, no known_hosts, no TOFU).
    pub host_key: russh::keys::PublicKey,
    /// A second key accepted as well, only while the session's host-key rotation is unfinished
    /// (`crate::commands::hostkey`): the box may offer the user-data key or the one it made.
    pub also_accept: Option<russh::keys::PublicKey>,
    /// Set once the box's host key is rotated over a connection made with these options: from
    /// then on every handshake made with them (or a clone), an EICE resume's new tunnel
    /// included, pins that key alone.
    pub repinned: Repinned,
    /// Overall readiness deadline (3 min in the product; tests use seconds).
    pub connect_timeout: Duration,
    /// Keepalive interval (~15 s); zero turns keepalives off.
    pub keepalive_interval: Duration,
    /// How many unanswered keepalives end the session.
    pub keepalive_max: usize,
}

/// The key a rotation pinned, shared by a connection's options and their clones.
pub type Repinned = std::sync::Arc<std::sync::Mutex<Option<russh::keys::PublicKey>>>;

/// Why [`connect`] gave up. Every message is one actionable line.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The box presented a key other than the pinned one. Never retried.
    #[error(
        "host key mismatch: possible interception: {target} presented {presented}, but this session \
         pinned {expected}; not connecting (terminate the box if you did not expect this)"
    )]
    HostKeyMismatch { target: String, expected: String, presented: String },
    /// sshd answered but refused our key. Never retried.
    #[error(
        "the box rejected the session's key for user {user:?} ({detail}): a custom AMI often has \
         another login user: pass --user NAME (ubuntu on Ubuntu, ec2-user on Amazon Linux, admin on Debian)"
    )]
    AuthRejected { user: String, detail: String },
    /// sshd was not reachable before the deadline.
    #[error("could not reach sshd on {target} within {waited} ({attempts} attempts); last failure: {last}")]
    TimedOut { target: String, waited: String, attempts: u32, last: String },
    /// Anything else that makes retrying pointless (e.g. the proxy command cannot be spawned).
    #[error("{0}")]
    Other(String),
}

/// How the remote command or shell ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteExit {
    /// It exited with this status.
    Status(u32),
    /// It was killed by this signal (SSH name without `SIG`, e.g. `TERM`).
    Signal { name: String },
    /// The connection dropped (or the channel closed) without an exit status.
    Lost,
}

impl RemoteExit {
    /// The exit code to pass on to our own caller, shell style:
    /// - `Status(n)`: `n` itself (255 if it does not fit in a byte);
    /// - `Signal`: 128 + the Linux signal number for the common signals (`TERM` → 143), 255 for
    ///   names we do not know;
    /// - `Lost`: 255, as OpenSSH's `ssh` does when the connection breaks.
    pub fn exit_code(&self) -> u8 {
        match self {
            RemoteExit::Status(n) => u8::try_from(*n).unwrap_or(255),
            RemoteExit::Signal { name } => signal_number(name).map_or(255, |n| 128 + n),
            RemoteExit::Lost => 255,
        }
    }
}

impl std::fmt::Display for RemoteExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RemoteExit::Status(n) => write!(f, "exit status {n}"),
            RemoteExit::Signal { name } => write!(f, "killed by SIG{name}"),
            RemoteExit::Lost => write!(f, "connection lost before an exit status arrived"),
        }
    }
}

/// When the first byte of remote output arrived in this process (the launch's "first prompt").
static FIRST_OUTPUT: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

fn mark_first_output() {
    let _ = FIRST_OUTPUT.set(std::time::Instant::now());
}

/// The instant the first remote output byte arrived, if any has.
pub fn first_output_at() -> Option<std::time::Instant> {
    FIRST_OUTPUT.get().copied()
}

/// `SHA256:…`, as `ssh-keygen -l` prints it.
fn fingerprint(key: &russh::keys::PublicKey) -> String {
    key.fingerprint(russh::keys::HashAlg::Sha256).to_string()
}

fn signal_number(name: &str) -> Option<u8> {
    Some(match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ILL" => 4,
        "TRAP" => 5,
        "ABRT" => 6,
        "BUS" => 7,
        "FPE" => 8,
        "KILL" => 9,
        "USR1" => 10,
        "SEGV" => 11,
        "USR2" => 12,
        "PIPE" => 13,
        "ALRM" => 14,
        "TERM" => 15,
        _ => return None,
    })
}

fn signal_name(sig: &russh::Sig) -> String {
    use russh::Sig;
    match sig {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        // The box names it: shown escaped.
        Sig::Custom(name) => return crate::output::box_text(name),
    }
    .to_string()
}

/// An authenticated connection to the box. Open as many commands on it as you like; drop it or
/// [`close`](Session::close) it when done.
pub struct Session {
    handle: client::Handle<connect::Pinned>,
    /// The proxy command, when there is one: killed when the session goes.
    proxy: Option<connect::ProxyProcess>,
    /// What the client handler needs for channels the box opens (`-R`, the agent).
    inbound: std::sync::Arc<forward::Inbound>,
    /// How an EICE tunnel ended, when the session runs straight through one.
    tunnel: Option<eice::Ending>,
    /// The box's resume relay did not answer, so the session went straight to sshd.
    relay_skipped: bool,
    /// The host key the box presented (one of the pinned ones).
    host_key: russh::keys::PublicKey,
}

impl Session {
    /// Whether the connection ran through an EICE tunnel that the endpoint closed normally (at
    /// its maximum duration): a new tunnel reaches the same box.
    pub fn tunnel_expired(&self) -> bool {
        self.tunnel.as_ref().is_some_and(eice::Ending::normal)
    }

    /// Whether the session runs straight to sshd because the box's resume relay did not answer
    /// (it then ends with its tunnel).
    pub fn relay_skipped(&self) -> bool {
        self.relay_skipped
    }

    /// The host key the box presented on this connection (the pinned one, or during an unfinished
    /// rotation either of the two accepted).
    pub fn host_key(&self) -> &russh::keys::PublicKey {
        &self.host_key
    }

    /// Says goodbye to sshd and waits (briefly) for the connection to wind down.
    pub async fn close(self) {
        let Session { handle, proxy, inbound, .. } = self;
        inbound.shutdown();
        if handle.disconnect(russh::Disconnect::ByApplication, "", "en").await.is_ok() {
            // The handle resolves when the session task has sent the disconnect and ended.
            let _ = tokio::time::timeout(Duration::from_secs(2), handle).await;
        }
        if let Some(proxy) = proxy {
            proxy.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_shell_conventions() {
        assert_eq!(RemoteExit::Status(0).exit_code(), 0);
        assert_eq!(RemoteExit::Status(7).exit_code(), 7);
        assert_eq!(RemoteExit::Status(300).exit_code(), 255);
        assert_eq!(RemoteExit::Signal { name: "TERM".into() }.exit_code(), 143);
        assert_eq!(RemoteExit::Signal { name: "KILL".into() }.exit_code(), 137);
        assert_eq!(RemoteExit::Signal { name: "INT".into() }.exit_code(), 130);
        assert_eq!(RemoteExit::Signal { name: "WINCH".into() }.exit_code(), 255);
        assert_eq!(RemoteExit::Lost.exit_code(), 255);
    }

    #[test]
    fn transport_names_the_target() {
        assert_eq!(Transport::Tcp { host: "10.0.0.1".into(), port: 22 }.to_string(), "10.0.0.1:22");
        assert_eq!(Transport::Tcp { host: "::1".into(), port: 22 }.to_string(), "[::1]:22");
        assert_eq!(Transport::ProxyCommand("nc x 22".into()).to_string(), "proxy command `nc x 22`");
    }
}

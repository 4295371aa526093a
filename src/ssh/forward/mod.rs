//! Port and agent forwarding on the session's one pinned connection, as OpenSSH's `-L`, `-R`,
//! `-D` and `-A` do it.
//!
//! Local listeners (`-L`, `-D`) are bound before anything else happens, so a taken port fails
//! first; once connected, [`Session::serve`] accepts on them and carries each connection over a
//! `direct-tcpip` channel (the box connects to the target). `-R` asks the box's sshd for a
//! `tcpip-forward`; the connections it then opens arrive as `forwarded-tcpip` channels in the
//! client handler, which connects them to the local target. Agent channels are carried to
//! `$SSH_AUTH_SOCK` the same way. Everything ends with the session: `serve` is a future the
//! caller drops when the work ends (closing the listeners and every connection on them), and
//! the handler's connections are tasks [`Inbound::shutdown`] aborts when the session closes.

mod socks;
pub mod spec;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use russh::ChannelOpenFailure;
use russh::client::{ChannelOpenHandle, Msg};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

pub use spec::{Bind, Dynamic, Forwards, PortForward, host_port};

use super::Session;

/// Bytes moved per read in each direction of a forwarded connection.
const RELAY_BUFFER: usize = 64 * 1024;

/// The local listeners of `-L` and `-D`, bound and not yet serving.
#[derive(Default)]
pub struct Listeners {
    entries: Vec<Listener>,
}

struct Listener {
    socket: TcpListener,
    kind: Kind,
    spec: String,
}

enum Kind {
    /// `-L`: every connection goes to this host and port, as the box sees them.
    Local { host: String, port: u16 },
    /// `-D`: each connection says where it goes, in SOCKS5.
    Socks,
}

impl Listeners {
    /// Binds every `-L` and `-D` listener: on 127.0.0.1 unless the spec names an address (all
    /// the addresses a name resolves to). The first that cannot be bound is the error.
    pub async fn bind(forwards: &Forwards) -> Result<Listeners, String> {
        let mut entries = Vec::new();
        let wanted = forwards
            .local
            .iter()
            .map(|f| (&f.bind, Kind::Local { host: f.host.clone(), port: f.port }, &f.spec, 'L'))
            .chain(forwards.dynamic.iter().map(|d| (&d.bind, Kind::Socks, &d.spec, 'D')));
        for (bind, kind, spec, flag) in wanted {
            let addr = match bind.addr.as_deref() {
                None => "127.0.0.1",
                Some("") => "0.0.0.0",
                Some(addr) => addr,
            };
            let fail = |why: String| {
                format!("cannot listen on {} for -{flag} {spec}: {why}", host_port(addr, bind.port))
            };
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((addr, bind.port)).await.map_err(|e| fail(e.to_string()))?.collect();
            if addrs.is_empty() {
                return Err(fail("the address resolves to nothing".into()));
            }
            for addr in &addrs {
                let socket = TcpListener::bind(addr).await.map_err(|e| fail(e.to_string()))?;
                entries.push(Listener { socket, kind: clone_kind(&kind), spec: spec.clone() });
            }
        }
        Ok(Listeners { entries })
    }

    /// One line per listener: where it listens and where its connections go.
    pub fn describe(&self) -> Vec<String> {
        self.entries
            .iter()
            .map(|l| {
                let at = l.socket.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
                match &l.kind {
                    Kind::Local { host, port } => {
                        format!("forwarding {at} to {} (as the box sees it)", host_port(host, *port))
                    }
                    Kind::Socks => format!("SOCKS5 proxy on {at}: connections go out from the box"),
                }
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn clone_kind(kind: &Kind) -> Kind {
    match kind {
        Kind::Local { host, port } => Kind::Local { host: host.clone(), port: *port },
        Kind::Socks => Kind::Socks,
    }
}

/// What the client handler needs to take channels the box opens: the `-R` routes, the agent
/// socket, and the tasks carrying those channels (aborted when the session closes).
#[derive(Default)]
pub(crate) struct Inbound {
    routes: Mutex<Vec<Route>>,
    agent: Mutex<Option<PathBuf>>,
    tasks: Mutex<JoinSet<()>>,
}

/// One granted `-R`: the box listens at `addr:port`; connections go to `host:target_port` here.
struct Route {
    addr: String,
    port: u32,
    host: String,
    target_port: u16,
}

impl Inbound {
    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }

    /// A connection to one of our `-R` ports on the box: connect it to its local target.
    pub(crate) fn forwarded_tcpip(
        &self,
        channel: russh::Channel<Msg>,
        addr: &str,
        port: u32,
        reply: ChannelOpenHandle,
    ) {
        let target = {
            let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            // sshd names the address as it was asked for; the port alone identifies it anyway.
            let route = routes.iter().find(|r| r.addr == addr && r.port == port);
            route.or_else(|| routes.iter().find(|r| r.port == port)).map(|r| (r.host.clone(), r.target_port))
        };
        let Some((host, target_port)) = target else {
            tracing::warn!(
                "the box opened a forwarded connection for {addr}:{port}, which was never asked for"
            );
            return; // dropping `reply` refuses it
        };
        self.spawn(async move {
            match TcpStream::connect((host.as_str(), target_port)).await {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    reply.accept().await;
                    relay(tcp, channel).await;
                }
                Err(e) => {
                    tracing::warn!(
                        "-R: a connection from the box could not reach {} here: {e}",
                        host_port(&host, target_port)
                    );
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                }
            }
        });
    }

    /// The box's sshd opening our agent: carry it to `$SSH_AUTH_SOCK`.
    pub(crate) fn agent_channel(&self, channel: russh::Channel<Msg>, reply: ChannelOpenHandle) {
        let Some(path) = self.agent.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return; // agent forwarding was not asked for: refused
        };
        self.spawn(async move {
            match tokio::net::UnixStream::connect(&path).await {
                Ok(agent) => {
                    reply.accept().await;
                    relay(agent, channel).await;
                }
                Err(e) => {
                    tracing::warn!("cannot reach your ssh-agent at {}: {e}", path.display());
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                }
            }
        });
    }

    /// Ends every connection the box opened: the session is over.
    pub(crate) fn shutdown(&self) {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).abort_all();
    }
}

/// Copies both ways until both sides are done; an EOF on one side is passed on as an EOF.
async fn relay<S: AsyncRead + AsyncWrite + Unpin>(mut local: S, channel: russh::Channel<Msg>) {
    let mut remote = channel.into_stream();
    let _ =
        tokio::io::copy_bidirectional_with_sizes(&mut local, &mut remote, RELAY_BUFFER, RELAY_BUFFER).await;
}

impl Session {
    /// Asks the box to listen for `-R`; answers the port it listens on (chosen by the box for
    /// port 0).
    pub async fn request_remote(&self, forward: &PortForward) -> Result<u16, String> {
        // As OpenSSH sends it: no address means the box's loopback, `*` or empty every interface.
        let addr = forward.bind.addr.clone().unwrap_or_else(|| "localhost".to_string());
        let asked = u32::from(forward.bind.port);
        let granted = self.handle.tcpip_forward(addr.clone(), asked).await.map_err(|e| match e {
            russh::Error::RequestDenied => {
                format!("the box refused -R {}: the port may be taken there, or below 1024", forward.spec)
            }
            e => format!("-R {}: {e}", forward.spec),
        })?;
        let port = if asked == 0 { granted } else { asked };
        self.inbound.routes.lock().unwrap_or_else(|p| p.into_inner()).push(Route {
            addr,
            port,
            host: forward.host.clone(),
            target_port: forward.port,
        });
        u16::try_from(port).map_err(|_| format!("-R {}: the box answered port {port}", forward.spec))
    }

    /// From now on, shells and commands ask for agent forwarding, carried to `socket`.
    pub fn forward_agent(&self, socket: PathBuf) {
        *self.inbound.agent.lock().unwrap_or_else(|p| p.into_inner()) = Some(socket);
    }

    /// Asks for agent forwarding on a session channel, when it is on.
    pub(super) async fn request_agent(&self, channel: &russh::Channel<Msg>) {
        if self.inbound.agent.lock().unwrap_or_else(|p| p.into_inner()).is_some()
            && let Err(e) = channel.agent_forward(false).await
        {
            tracing::warn!("could not ask the box to forward your agent: {e}");
        }
    }

    /// Resolves when the connection to the box is gone.
    pub async fn closed(&self) {
        while !self.handle.is_closed() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Accepts on every listener and carries each connection through the box, as many at once
    /// as come. Never returns: drop it to close the listeners and every connection.
    pub async fn serve(&self, listeners: &Listeners) -> Infallible {
        if listeners.entries.is_empty() {
            return std::future::pending().await;
        }
        let mut connections = FuturesUnordered::new();
        loop {
            let accepts =
                listeners.entries.iter().map(|l| Box::pin(async move { (l, l.socket.accept().await) }));
            tokio::select! {
                ((listener, accepted), _, _) = futures::future::select_all(accepts) => match accepted {
                    Ok((stream, peer)) => connections.push(self.carry(listener, stream, peer)),
                    Err(e) => {
                        // Out of file descriptors, say: let some connections finish.
                        tracing::warn!("-{} {}: accept failed: {e}", listener.flag(), listener.spec);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(()) = connections.next(), if !connections.is_empty() => {}
            }
        }
    }

    /// One accepted connection, through a `direct-tcpip` channel to wherever it goes.
    async fn carry(&self, listener: &Listener, mut stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let (host, port) = match &listener.kind {
            Kind::Local { host, port } => (host.clone(), *port),
            Kind::Socks => match socks::handshake(&mut stream).await {
                Ok(target) => target,
                Err(why) => {
                    tracing::info!("-D {}: {peer}: {why}", listener.spec);
                    return;
                }
            },
        };
        let opened = self
            .handle
            .channel_open_direct_tcpip(
                host.clone(),
                u32::from(port),
                peer.ip().to_string(),
                u32::from(peer.port()),
            )
            .await;
        let channel = match opened {
            Ok(channel) => channel,
            Err(e) => {
                let target = host_port(&host, port);
                tracing::warn!(
                    "-{} {}: the box could not connect to {target}: {}",
                    listener.flag(),
                    listener.spec,
                    describe(&e)
                );
                if matches!(listener.kind, Kind::Socks) {
                    let _ = socks::reply(&mut stream, socks_code(&e)).await;
                }
                return;
            }
        };
        if matches!(listener.kind, Kind::Socks) && socks::reply(&mut stream, socks::SUCCEEDED).await.is_err()
        {
            return;
        }
        relay(stream, channel).await;
    }
}

impl Listener {
    fn flag(&self) -> char {
        match self.kind {
            Kind::Local { .. } => 'L',
            Kind::Socks => 'D',
        }
    }
}

fn describe(error: &russh::Error) -> String {
    match error {
        russh::Error::ChannelOpenFailure(ChannelOpenFailure::ConnectFailed) => "connection failed".into(),
        russh::Error::ChannelOpenFailure(ChannelOpenFailure::AdministrativelyProhibited) => {
            "forwarding is not allowed by the box's sshd".into()
        }
        other => other.to_string(),
    }
}

fn socks_code(error: &russh::Error) -> u8 {
    match error {
        russh::Error::ChannelOpenFailure(ChannelOpenFailure::ConnectFailed) => socks::CONNECTION_REFUSED,
        russh::Error::ChannelOpenFailure(ChannelOpenFailure::AdministrativelyProhibited) => {
            socks::NOT_ALLOWED
        }
        russh::Error::ChannelOpenFailure(_) => socks::HOST_UNREACHABLE,
        _ => socks::GENERAL_FAILURE,
    }
}

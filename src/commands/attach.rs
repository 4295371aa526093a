//! Reaching a session's box and using it: SSH with the session's own key and pinned host key,
//! then one command or an interactive shell. Shared by `launch` and `connect`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use super::Context;
use crate::cli::ConnectMode;
use crate::error::Interrupted;
use crate::output::{short_duration, usd};
use crate::session::store::{SessionRecord, Store};
use crate::session::{self, Clock, SystemClock};
use crate::signals::Signals;
use crate::ssh::forward::{Listeners, host_port};
use crate::ssh::{self, ConnectOptions, ExecIo, RemoteExit, ShellOptions, Transport};

pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
pub const KEEPALIVE_MAX: usize = 4;
/// The tmux session `--tmux` attaches to (or creates).
pub const TMUX_SESSION: &str = "ephemeral-admin";

/// How to reach the box, resolved from flags, the session record and settings.
pub struct Route {
    pub mode: ConnectMode,
    pub proxy_command: Option<String>,
}

impl Route {
    /// Flags first, then what the session was launched with, then the settings.
    pub fn resolve(
        ctx: &Context,
        record: &SessionRecord,
        flag_mode: Option<ConnectMode>,
        flag_proxy: Option<&str>,
    ) -> Route {
        let s = &ctx.settings;
        let proxy_command = flag_proxy
            .map(str::to_string)
            .or_else(|| record.proxy_command.clone())
            .or_else(|| s.proxy_command.clone());
        let mode = flag_mode
            .or_else(|| flag_proxy.map(|_| ConnectMode::ProxyCommand))
            .or_else(|| record.connect.as_deref().and_then(ConnectMode::from_name))
            .unwrap_or(s.connect);
        Route { mode, proxy_command }
    }
}

/// The SSM preset: OpenSSH's usual Session Manager proxy, for users with the plugin installed.
/// A template for [`ssh::expand_proxy_command`] (or OpenSSH): the region and profile are data,
/// quoted, never shell text.
pub fn ssm_proxy_command(region: &str, profile: Option<&str>) -> String {
    use ssh::ProxyWord::{Data, Token};
    let mut words = vec![
        Token(
            "aws ssm start-session --target %i --document-name AWS-StartSSHSession --parameters portNumber=%p",
        ),
        Token("--region"),
        Data(region),
    ];
    if let Some(profile) = profile {
        words.extend([Token("--profile"), Data(profile)]);
    }
    ssh::proxy_template(&words)
}

/// Builds the SSH options for a session from its record and local key file.
pub async fn connect_options(
    ctx: &Context,
    store: &Store,
    record: &SessionRecord,
    route: &Route,
) -> Result<ConnectOptions> {
    let key_path = store.key_path(&record.id);
    let key_text = std::fs::read_to_string(&key_path).with_context(|| {
        format!(
            "session {}'s private key {} is gone (the session was torn down, or launched on another machine)",
            record.id,
            key_path.display()
        )
    })?;
    let client_key =
        russh::keys::PrivateKey::from_openssh(&key_text).context("the session's private key is damaged")?;
    let host_key = crate::keys::parse_public(&record.host_key_public)?;
    // An unfinished rotation (`super::hostkey`): the box may offer the key it made instead.
    let also_accept = match (record.host_key_state, &record.host_key_next) {
        (Some(crate::session::store::HostKeyState::Rotating), Some(next)) => {
            Some(crate::keys::parse_public(next)?)
        }
        _ => None,
    };
    let instance_id = record.instance_id.as_deref().with_context(|| {
        format!("session {} has no instance id: `ephemeral-admin cleanup {}`", record.id, record.id)
    })?;
    let address = match route.mode {
        ConnectMode::PrivateIp => record.private_ip.clone(),
        _ => record.public_ip.clone().or(record.private_ip.clone()),
    };
    let transport = match route.mode {
        ConnectMode::PublicIp | ConnectMode::PrivateIp => {
            let Some(host) = address else {
                bail!(
                    "session {} has no {} address: try --connect private-ip, or --proxy-command",
                    record.id,
                    route.mode.as_str()
                );
            };
            Transport::Tcp { host, port: ctx.settings.ssh_port }
        }
        ConnectMode::ProxyCommand | ConnectMode::Ssm => {
            let template = match route.mode {
                ConnectMode::Ssm => ssm_proxy_command(&record.region, ctx.settings.aws.profile.as_deref()),
                _ => {
                    route.proxy_command.clone().context("connect mode proxy-command needs --proxy-command")?
                }
            };
            let host = address.unwrap_or_else(|| instance_id.to_string());
            Transport::ProxyCommand(ssh::expand_proxy_command(
                &template,
                &host,
                ctx.settings.ssh_port,
                instance_id,
                &record.user,
            ))
        }
        ConnectMode::Eice => eice_transport(ctx, record).await?,
    };
    Ok(ConnectOptions {
        transport,
        user: record.user.clone(),
        client_key,
        host_key,
        also_accept,
        repinned: Default::default(),
        connect_timeout: ctx.settings.connect_timeout,
        keepalive_interval: KEEPALIVE_INTERVAL,
        keepalive_max: KEEPALIVE_MAX,
    })
}

/// The tunnel through the session's Instance Connect Endpoint to port 22 of its private address
/// (`ssh_port` is for port-mapped routes; the endpoint reaches the box's own sshd), signed with
/// the caller's credentials (asked afresh for every tunnel).
async fn eice_transport(ctx: &Context, record: &SessionRecord) -> Result<Transport> {
    let (Some(endpoint_id), Some(dns_name)) = (&record.eice_endpoint_id, &record.eice_dns_name) else {
        bail!(
            "session {} was not launched with connect = \"eice\", so no endpoint admits it: use its own --connect mode",
            record.id
        );
    };
    let private_ip =
        record.private_ip.clone().with_context(|| format!("session {} has no private address", record.id))?;
    let aws = ctx.aws().await?;
    let credentials =
        aws.config.credentials_provider().context("no AWS credentials to sign the EICE tunnel with")?;
    Ok(Transport::Eice(ssh::eice::EiceTarget {
        endpoint_id: endpoint_id.clone(),
        dns_name: dns_name.clone(),
        region: record.region.clone(),
        private_ip,
        port: crate::aws::network::SSH_PORT as u16,
        resumable: record.resume_port.is_some(),
        max_duration: ssh::eice::MAX_TUNNEL,
        dial_url: ctx.settings.aws.eice_endpoint_url.clone(),
        credentials,
    }))
}

/// Connects, showing progress, until sshd answers, the timeout passes, or a signal arrives.
pub async fn open(ctx: &Context, options: &ConnectOptions, signals: &Signals) -> Result<ssh::Session> {
    let step = ctx.printer.step(format!("waiting for ssh on {}", options.transport));
    let on_attempt = |n: u32, last: &str| {
        if n > 1 {
            step.set(format!("waiting for ssh (attempt {n}: {last})"));
        }
    };
    let session = tokio::select! {
        session = ssh::connect(options, &on_attempt) => session?,
        stop = signals.stopped() => {
            return Err(Interrupted { what: stop.name(), done: "stopped while connecting".into(), code: stop.exit_code() }.into());
        }
    };
    drop(step);
    if session.relay_skipped() {
        ctx.printer.warn(
            "the box's resume relay did not answer, so this connection goes straight to sshd and ends when its tunnel does (at most an hour); `--tmux` keeps the work",
        );
    }
    Ok(session)
}

/// `--record FILE` that cannot take a recording (a symbolic link, a directory, no such
/// directory), or with `-N` (no shell or command to record), is bad input, refused before any
/// AWS call.
pub fn check_record(ctx: &Context, path: Option<&std::path::Path>) -> Result<()> {
    let Some(path) = path else { return Ok(()) };
    let why = match ssh::record::check_path(path) {
        Err(why) => why,
        Ok(()) if ctx.settings.forwarding.no_command => {
            "-N runs no shell or command, so there is nothing to record: drop one of them".to_string()
        }
        Ok(()) => return Ok(()),
    };
    Err(crate::error::UsageError::new(format!("--record {}: {why}", path.display())).into())
}

/// Binds the `-L` and `-D` listeners before any AWS call: a port that is taken is bad input.
pub async fn bind_forwards(ctx: &Context) -> Result<Listeners> {
    Listeners::bind(&ctx.settings.forwarding.forwards)
        .await
        .map_err(|why| crate::error::UsageError::new(format!("{why}: pick another port")).into())
}

/// Once connected, before the command or shell: asks the box for the `-R` ports, turns on agent
/// forwarding, and says in one line each what is forwarded.
pub async fn start_forwards(ctx: &Context, session: &ssh::Session, listeners: &Listeners) -> Result<()> {
    let forwarding = &ctx.settings.forwarding;
    for forward in &forwarding.forwards.remote {
        let port = session.request_remote(forward).await.map_err(anyhow::Error::msg)?;
        let on_box = match forward.bind.addr.as_deref() {
            None => "localhost",
            Some("") => "*",
            Some(addr) => addr,
        };
        ctx.printer.status(format!(
            "forwarding {} on the box to {} here",
            host_port(on_box, port),
            host_port(&forward.host, forward.port)
        ));
    }
    for line in listeners.describe() {
        ctx.printer.status(line);
    }
    if forwarding.agent {
        match &forwarding.agent_socket {
            Some(socket) => {
                session.forward_agent(socket.clone());
                ctx.printer.warn("forwarding your ssh-agent: root on the box can use it (not copy your keys) while you are connected");
            }
            None => {
                ctx.printer.warn("forward_agent is on, but SSH_AUTH_SOCK is not set: no agent to forward")
            }
        }
    }
    if forwarding.no_command {
        ctx.printer.status("no shell (-N): forwarding until Ctrl-C");
    }
    Ok(())
}

/// What to do once connected.
pub struct Work<'a> {
    pub command: &'a [String],
    pub tmux: bool,
    pub record: Option<PathBuf>,
    /// The `-L` and `-D` listeners, served while the command or shell runs (the caller closes
    /// them after).
    pub listeners: &'a Listeners,
    /// `-N`: no command or shell; only the forwards, until a signal or the connection ends.
    pub no_command: bool,
}

/// Runs the command or the shell, serving the forwards meanwhile; returns how it ended, or the
/// signal that stopped it. The forwards end with it.
pub async fn work(session: &ssh::Session, work: Work<'_>, signals: &Signals) -> Result<Outcome> {
    let Work { command, tmux, record, listeners, no_command } = work;
    let run = async {
        if no_command {
            session.closed().await;
            return Ok(RemoteExit::Lost);
        }
        if !command.is_empty() {
            let io = match &record {
                Some(path) => ExecIo::InheritRecorded(path),
                None => ExecIo::Inherit,
            };
            return session.exec(command, io).await;
        }
        let term =
            std::env::var("TERM").ok().filter(|t| !t.is_empty()).unwrap_or_else(|| "xterm-256color".into());
        let command = tmux.then(|| format!("tmux new-session -A -s {TMUX_SESSION}"));
        session.shell(ShellOptions { term, command, record }).await
    };
    tokio::select! {
        exit = run => Ok(Outcome::Exited(exit?)),
        never = session.serve(listeners) => match never {},
        stop = signals.stopped() => Ok(Outcome::Stopped(stop)),
    }
}

/// [`work`], riding out the end of an EICE tunnel on a box reached without its resume relay (a
/// session recorded by an earlier version; through the relay, [`ssh::resume`] carries the SSH
/// connection itself across tunnels and this loop never runs). The endpoint closes every tunnel
/// at its maximum duration (one hour), and the SSH connection ends with it. A `--tmux` shell is then
/// reattached on a new tunnel and a new connection (same pinned host key), with no keystroke
/// from the user; the forwards are set up again on the new connection (`-L`/`-D` keep their
/// listeners, `-R` and `-A` are asked for again); `--record` ends with the first connection.
/// A plain shell, a command or `-N` that outlives the tunnel ends as a lost connection (exit
/// 255), with a line saying why and that `--tmux` survives it.
pub async fn work_resuming(
    ctx: &Context,
    options: &ConnectOptions,
    session: &mut ssh::Session,
    work: Work<'_>,
    signals: &Signals,
) -> Result<Outcome> {
    let tmux = work.tmux && work.command.is_empty() && !work.no_command;
    let listeners = work.listeners;
    let mut outcome = self::work(session, work, signals).await?;
    while matches!(outcome, Outcome::Exited(RemoteExit::Lost)) && session.tunnel_expired() {
        if !tmux {
            ctx.printer.warn(
                "the Instance Connect Endpoint closed the tunnel (it does at the tunnel's maximum duration, one hour), ending the connection: `--tmux` keeps the work and reattaches by itself",
            );
            break;
        }
        ctx.printer
            .status("the Instance Connect Endpoint closed the tunnel (maximum duration); reattaching tmux over a new one");
        let fresh = open(ctx, options, signals).await?;
        std::mem::replace(session, fresh).close().await;
        // The work in tmux matters more than a forward: one the box now refuses is a warning.
        if let Err(e) = start_forwards(ctx, session, listeners).await {
            ctx.printer
                .warn(format!("after the reattach: {} (the shell goes on)", crate::exit_codes::one_line(&e)));
        }
        let again = Work { command: &[], tmux: true, record: None, listeners, no_command: false };
        outcome = self::work(session, again, signals).await?;
    }
    Ok(outcome)
}

pub enum Outcome {
    Exited(RemoteExit),
    Stopped(crate::signals::Stop),
}

/// The line shown before a shell opens: where, what it costs, how long is left.
pub fn banner(record: &SessionRecord, keep: bool) -> String {
    let now = SystemClock.now();
    let left = session::parse_rfc3339(&record.expires_at)
        .map(|t| short_duration(Duration::from_secs((t - now).whole_seconds().max(0) as u64)))
        .unwrap_or_else(|| "?".into());
    let price = record.price_per_hour.map(|p| format!(", {}/h", usd(p))).unwrap_or_default();
    let what = format!(
        "{} {} in {}",
        record.instance_type.as_deref().unwrap_or("?"),
        record.market.as_deref().unwrap_or("?"),
        record.availability_zone.as_deref().unwrap_or("?")
    );
    let after = if keep {
        format!("the box stays up when you leave; `ephemeral-admin connect {}` comes back", record.id)
    } else {
        "leaving the shell ends the session and removes everything".to_string()
    };
    format!("session {} ({what}{price}): {left} left until {}; {after}", record.id, record.expires_at)
}

//! `connect ID [-- CMD]` and `ssh-config ID`: back to a running session with the same pinned
//! keys, through the embedded client or through the user's own OpenSSH.

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::Context;
use super::attach::{self, Outcome, Route, Work};
use crate::aws::instances;
use crate::cli::{ConnectArgs, ConnectMode};
use crate::error::{ExitStatus, Interrupted};
use crate::output::short_duration;
use crate::session::lifecycle::{self, Launcher};
use crate::session::store::{SessionRecord, Store, write_atomic};
use crate::signals::Signals;
use crate::ssh::config_file;

/// The local record of a session that is still running, with its address refreshed from AWS.
pub(super) async fn running_session(ctx: &Context, id: &str) -> Result<(Store, SessionRecord)> {
    let store = Store::new(ctx.settings.sessions_dir());
    let Some(mut record) = store.load(id)? else {
        bail!("this machine has no record of session {id}: only the machine that launched it holds its key");
    };
    if record.ended_at.is_some() {
        bail!(
            "session {id} has ended ({}); launch a new one",
            record.end_reason.as_deref().unwrap_or("ended")
        );
    }
    let instance_id =
        record.instance_id.clone().with_context(|| format!("session {id} never got an instance"))?;
    let aws = ctx.aws().await?;
    let info = instances::describe(&aws, &instance_id).await?;
    match info {
        Some(info) if info.state == "running" => {
            record.public_ip = info.public_ip.or(record.public_ip);
            record.private_ip = info.private_ip.or(record.private_ip);
            if let Some(expires) = info.expires_at {
                record.expires_at = expires;
            }
        }
        Some(info) => bail!("session {id}'s instance {instance_id} is {}: nothing to connect to", info.state),
        // EC2 is eventually consistent: a young instance it does not show is not visible yet.
        None if instances::must_be_known(record.launched_at.as_deref(), crate::session::clock().now()) => {
            bail!(
                "session {id}'s instance {instance_id} is not visible to EC2 yet: try again in a few seconds"
            )
        }
        None => bail!("session {id}'s instance {instance_id} no longer exists"),
    }
    Ok((store, record))
}

pub async fn connect(ctx: &Context, args: &ConnectArgs) -> Result<ExitStatus> {
    // Local ports first: one that is taken fails before anything else.
    attach::check_record(ctx, args.record.as_deref())?;
    let listeners = attach::bind_forwards(ctx).await?;
    let id = &super::resolve_session(ctx, &args.session.id).await?;
    let (store, mut record) = running_session(ctx, id).await?;
    // With its launcher gone, this process becomes the session's client, so cleanup does not
    // take the session for an orphan while we use it. A live launcher stays the owner.
    let took_over = lifecycle::launcher_of(&record) != Launcher::Alive;
    if took_over {
        let (pid, start) = (std::process::id(), lifecycle::process_start(std::process::id()));
        store.update(id, |r| (r.pid, r.pid_start) = (Some(pid), start))?;
        (record.pid, record.pid_start) = (Some(pid), start);
    }

    let signals = Signals::install().context("listening for Ctrl-C")?;
    let route = Route::resolve(ctx, &record, args.connect, args.proxy_command.as_deref());
    let (options, mut session) = super::hostkey::open(ctx, &store, &mut record, &route, &signals).await?;
    let instance_id = record.instance_id.as_deref().context("the session record has no instance id")?;
    let log = crate::aws::logs::Writer::spawn(&ctx.aws().await?, instance_id);
    log.send(format!("connect session={id} via={}", options.transport));
    let no_command = ctx.settings.forwarding.no_command;
    let outcome = async {
        attach::start_forwards(ctx, &session, &listeners).await?;
        if args.command.is_empty() && !no_command {
            ctx.printer.status(attach::banner(&record, true));
        }
        let work = Work {
            command: &args.command,
            tmux: args.tmux,
            record: args.record.clone(),
            listeners: &listeners,
            no_command,
        };
        attach::work_resuming(ctx, &options, &mut session, work, &signals).await
    }
    .await;
    drop(listeners);
    session.close().await;
    for failure in log.finish().await {
        ctx.printer.warn(failure);
    }
    match outcome? {
        Outcome::Exited(exit) => {
            // The user came back to a session whose launcher was gone and left it running on
            // purpose: from now on it is kept, not an orphan for the next launch to sweep.
            if took_over {
                store.update(id, |r| r.kept = true)?;
            }
            if args.command.is_empty() && !no_command {
                ctx.printer.status(format!(
                    "left session {id} running: it ends after {} idle or at {}; `ephemeral-admin terminate {id}` ends it now",
                    short_duration(std::time::Duration::from_secs(
                        record.idle_grace_secs.unwrap_or(ctx.settings.idle_grace.as_secs())
                    )),
                    record.expires_at
                ));
            }
            Ok(ExitStatus::Remote(exit.exit_code()))
        }
        // `-N` ends by a signal by design: a status line, not an error; the exit code still
        // says which signal (128+n).
        Outcome::Stopped(stop) if no_command => {
            ctx.printer.status(format!(
                "stopped forwarding ({}); session {id} keeps running until idle or its deadline",
                stop.name()
            ));
            Ok(match stop.exit_code() {
                130 => ExitStatus::Interrupted,
                code => ExitStatus::Remote(code),
            })
        }
        Outcome::Stopped(stop) => Err(Interrupted {
            what: stop.name(),
            done: format!("disconnected; session {id} keeps running until idle or its deadline"),
            code: stop.exit_code(),
        }
        .into()),
    }
}

#[derive(Serialize)]
struct SshConfig {
    session_id: String,
    instance_id: Option<String>,
    host: String,
    known_hosts_file: String,
    config: String,
    /// Where `--install` put the block.
    #[serde(skip_serializing_if = "Option::is_none")]
    installed: Option<config_file::Installed>,
}

/// The `Host` alias of a session: its name, else `ephemeral-admin-<id>`.
pub fn host_alias(record: &SessionRecord) -> String {
    record.name.clone().unwrap_or_else(|| format!("ephemeral-admin-{}", record.id))
}

/// `ephemeral-admin proxy ID` as a ProxyCommand: this very binary (by its full path: ssh's
/// PATH may differ), with the session's region and the profile it was asked with.
fn proxy_command(ctx: &Context, record: &SessionRecord) -> Result<String> {
    let exe = std::env::current_exe().context("finding this program's path for the ProxyCommand")?;
    let mut words = vec![exe.display().to_string(), "--region".into(), record.region.clone()];
    if let Some(profile) = &ctx.settings.aws.profile {
        words.extend(["--profile".into(), profile.clone()]);
    }
    words.extend(["-q".into(), "proxy".into(), record.id.clone()]);
    // OpenSSH runs it through the shell and expands %-tokens in it: quoted, every % doubled.
    let words: Vec<crate::ssh::ProxyWord> = words.iter().map(|w| crate::ssh::ProxyWord::Data(w)).collect();
    Ok(crate::ssh::proxy_template(&words))
}

/// `proxy ID`: the box's sshd on stdin and stdout, by the route `connect` takes (an eice box
/// through its resume relay, so the stream outlives the endpoint's tunnels). Nothing but the
/// stream goes to stdout.
pub async fn proxy(ctx: &Context, id: &str) -> Result<ExitStatus> {
    let (store, record) = running_session(ctx, id).await?;
    let route = Route::resolve(ctx, &record, None, None);
    if matches!(route.mode, ConnectMode::ProxyCommand | ConnectMode::Ssm) {
        return Err(crate::error::UsageError::new(format!(
            "session {id} is reached through a proxy command already: use that one (`ephemeral-admin ssh-config {id}` prints it)"
        ))
        .into());
    }
    let options = attach::connect_options(ctx, &store, &record, &route).await?;
    let (stream, relay_skipped) = crate::ssh::stream_to_sshd(&options).await?;
    if relay_skipped {
        ctx.printer.warn(
            "the box's resume relay did not answer: straight to sshd, so this connection ends with its tunnel (at most an hour)",
        );
    }
    match crate::ssh::pipe_stdio(stream).await {
        // The SSH client went away first (it closed our stdout): the end, not a failure.
        Err(e) if crate::output::is_reader_gone(&e) => Ok(ExitStatus::Success),
        done => done.map(|()| ExitStatus::Success).context("carrying the SSH stream"),
    }
}

pub async fn ssh_config(ctx: &Context, id: &str, install: bool) -> Result<ExitStatus> {
    let (store, mut record) = running_session(ctx, id).await?;
    let route = Route::resolve(ctx, &record, None, None);
    // The known-hosts line pins the box's own key: an unfinished rotation is finished first.
    super::hostkey::ensure_rotated(ctx, &store, &mut record, &route).await?;
    let instance_id = record.instance_id.as_deref().context("the session record has no instance id")?;
    let alias = host_alias(&record);
    let known_hosts = store.dir(id).join("known_hosts");
    write_atomic(&known_hosts, format!("{alias} {}\n", record.host_key_public.trim()).as_bytes())?;
    let address = match route.mode {
        ConnectMode::PrivateIp => record.private_ip.clone(),
        _ => record.public_ip.clone().or(record.private_ip.clone()),
    };
    let mut lines = vec![
        format!("Host {}", config_file::config_arg("the host alias", &alias)?),
        format!(
            "    HostName {}",
            config_file::config_arg("the address", address.as_deref().unwrap_or(instance_id))?
        ),
        format!("    User {}", config_file::config_arg("the user", &record.user)?),
        format!("    Port {}", ctx.settings.ssh_port),
        format!("    IdentityFile {}", config_file::config_path("the key file", &store.key_path(id))?),
        "    IdentitiesOnly yes".to_string(),
        format!("    HostKeyAlias {}", config_file::config_arg("the host alias", &alias)?),
        format!("    UserKnownHostsFile {}", config_file::config_path("the known_hosts file", &known_hosts)?),
        "    StrictHostKeyChecking yes".to_string(),
    ];
    // OpenSSH expands %h, %p and %r itself; %i is ours.
    let proxy = match route.mode {
        ConnectMode::Ssm => Some(crate::ssh::expand_instance_token(
            &attach::ssm_proxy_command(&record.region, ctx.settings.aws.profile.as_deref()),
            instance_id,
        )),
        ConnectMode::ProxyCommand => {
            route.proxy_command.as_ref().map(|t| crate::ssh::expand_instance_token(t, instance_id))
        }
        // OpenSSH has no WebSocket: this binary opens the tunnel, through the box's resume relay.
        ConnectMode::Eice => Some(proxy_command(ctx, &record)?),
        _ => None,
    };
    if let Some(command) = proxy {
        lines.push(format!("    ProxyCommand {}", config_file::config_command(&command)?));
    }
    let config = lines.join("\n") + "\n";
    let installed = if install { Some(install_block(ctx, &store, &record, &alias, &config)?) } else { None };
    let result = SshConfig {
        session_id: id.to_string(),
        instance_id: record.instance_id.clone(),
        host: alias,
        known_hosts_file: known_hosts.display().to_string(),
        config,
        installed,
    };
    ctx.printer.result(&result, || match &result.installed {
        None => result.config.clone(),
        Some(done) => {
            let mut text = format!(
                "installed host {} in {} (removed when the session ends): `ssh {}`",
                result.host,
                done.config_file.display(),
                result.host
            );
            if done.include_added {
                text.push_str(&format!("\nadded `{}` on top of ~/.ssh/config", config_file::INCLUDE_LINE));
            }
            if let Some(backup) = &done.backup {
                text.push_str(&format!(" (the file as it was: {})", backup.display()));
            }
            text
        }
    });
    Ok(ExitStatus::Success)
}

/// Writes the block into `~/.ssh/ephemeral-admin/config` and remembers the file in the record,
/// so teardown and cleanup can take the block out again.
fn install_block(
    ctx: &Context,
    store: &Store,
    record: &SessionRecord,
    alias: &str,
    config: &str,
) -> Result<config_file::Installed> {
    let ssh_dir = ctx.settings.ssh_dir.as_deref().ok_or_else(|| {
        crate::error::UsageError::new("HOME is not set, so there is no ~/.ssh to install into: set HOME, or print the block without --install")
    })?;
    let file = config_file::own_file(ssh_dir);
    // Recorded first: a crash between the two leaves a record that points at no block (harmless),
    // never a block nothing will remove.
    store.update(&record.id, |r| r.ssh_config_file = Some(file.clone()))?;
    config_file::install(ssh_dir, &record.id, alias, config)
}

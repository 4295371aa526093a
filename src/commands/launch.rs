//! `launch`: provision a locked-down spot box for this caller, fast, tagged, and never half-made.
//!
//! Independent steps run at once (caller identity, IP, security group, IAM profile, keys, AMI,
//! spot prices); the SSH rule is opened while RunInstances is in flight; the alarm is created
//! while the instance boots. Every resource is tagged at creation and written to the local record
//! before the next step starts, so a crash at any point leaves nothing `cleanup` cannot find.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context as _, Result};
use base64::Engine;
use ipnet::IpNet;
use serde::Serialize;
use time::Duration as TimeDuration;

use super::attach::{self, Outcome, Route, Work};
use super::setup;
use super::{Context, SessionView};
use crate::aws::launch::Candidate;
use crate::aws::launch::{self as ec2_launch, LaunchEvent, LaunchSpec};
use crate::aws::{alarm, ami, eice, iam, identity, instances, logs, network, schedule, spot, vpc};
use crate::cli::{ConnectMode, LaunchArgs};
use crate::error::{ExitStatus, Interrupted, OverBudget, UsageError};
use crate::files::spec::Upload;
use crate::keys::SessionKeys;
use crate::ledger::ended_by;
use crate::output::{short_duration, usd};
use crate::session::lifecycle;
use crate::session::store::{SessionRecord, Store};
use crate::session::{self, Clock, SystemClock, tags};
use crate::signals::Signals;
use crate::teardown::{self, SessionResources};
use crate::{crash, ip, ledger, pricing, userdata};

/// The local record, saved atomically after every change.
#[derive(Clone)]
struct Recorder {
    store: Store,
    record: Arc<Mutex<SessionRecord>>,
    /// RunInstances was sent: an instance may exist even if no answer said so.
    requested: Arc<std::sync::atomic::AtomicBool>,
}

impl Recorder {
    /// Applies `change` to the launch's own copy and, under the record's lock, to the record on
    /// disk (where `extend` or `connect` may have changed other fields meanwhile).
    fn update(&self, change: impl Fn(&mut SessionRecord)) -> Result<()> {
        let mut record = self.record.lock().expect("record lock");
        change(&mut record);
        self.store.create_or_update(&record, |on_disk| change(on_disk))
    }

    fn snapshot(&self) -> SessionRecord {
        self.record.lock().expect("record lock").clone()
    }
}

#[derive(Serialize)]
struct Launched {
    #[serde(flatten)]
    session: SessionView,
    estimate: Option<pricing::Estimate>,
    launch_attempts: u32,
    #[serde(serialize_with = "crate::output::pairs_as_object")]
    timings_ms: Vec<(String, u64)>,
    #[serde(skip)]
    started: Instant,
}

pub async fn run(ctx: &Context, args: &LaunchArgs) -> Result<ExitStatus> {
    let signals = Signals::install().context("listening for Ctrl-C")?;
    // User-data AWS would refuse is bad input: refused before any AWS call.
    check_user_data(&ctx.settings, args)?;
    attach::check_record(ctx, args.record.as_deref())?;
    let uploads = args.upload.iter().map(|u| Upload::parse(u)).collect::<Result<Vec<_>, _>>()?;
    for cidr in &ctx.settings.allow_cidrs {
        let whom = if cidr.prefix_len() == 0 {
            "every address on the internet".to_string()
        } else {
            format!("{} addresses", crate::settings::address_count(cidr))
        };
        ctx.printer.warn(format!(
            "--allow-cidr {cidr}: SSH on this session's box is open to {whom} (the session key is still required)"
        ));
    }
    // Local ports first: one that is taken fails before anything is made.
    let mut listeners = Some(attach::bind_forwards(ctx).await?);
    let (aws, store, mut record, mut result) = provision(ctx, args, &signals).await?;
    let instance_id = record.instance_id.clone().context("the launch recorded no instance id")?;
    let log = logs::Writer::spawn(&aws, &instance_id);
    log.send(format!(
        "start session={} owner={} type={} market={} zone={} price={} expires={} kept={}",
        record.id,
        record.owner_arn,
        record.instance_type.as_deref().unwrap_or("?"),
        record.market.as_deref().unwrap_or("?"),
        record.availability_zone.as_deref().unwrap_or("?"),
        record.price_per_hour.map(|p| format!("{p}")).unwrap_or_else(|| "?".into()),
        record.expires_at,
        record.kept
    ));
    if args.detach && has_setup(&ctx.settings) {
        ctx.printer.status(format!(
            "the setup runs on the box now; `ephemeral-admin connect {} -- sudo cat {}/setup.log` shows how far it got (the log is root's)",
            record.id,
            userdata::SETUP_DIR
        ));
    }
    if args.detach {
        // The first connection gives the box its own host key (`super::hostkey`): a detached box
        // is not left on the user-data's. A box that cannot be reached or rotated is undone.
        let ready = first_connection(ctx, &store, &mut record, &signals).await;
        let session = match ready {
            Ok(session) => session,
            Err(e) => {
                for failure in log.finish().await {
                    ctx.printer.warn(failure);
                }
                return Err(undo_detached(ctx, &aws, &store, &record, e).await);
            }
        };
        result.session.host_key_fingerprint = Some(record.host_key_fingerprint.clone());
        let uploaded = super::cp::upload_before(ctx, &session, &record, &uploads, &signals).await;
        session.close().await;
        for failure in log.finish().await {
            ctx.printer.warn(failure);
        }
        ctx.printer.result(&result, || {
            let mut text = result.session.describe();
            if args.timings {
                text.push_str(&timings_line(&result.timings_ms));
            }
            text
        });
        uploaded?;
        return Ok(ExitStatus::Success);
    }
    let keep = record.kept;
    let clock = SystemClock;
    let mut attached = false;
    let outcome = async {
        let route = Route::resolve(ctx, &record, None, None);
        crash::point("connecting");
        let (options, mut session) = super::hostkey::open(ctx, &store, &mut record, &route, &signals).await?;
        attached = true;
        result.timings_ms.push(("ssh".into(), result.started.elapsed().as_millis() as u64));
        if has_setup(&ctx.settings) {
            if let Err(e) = setup::wait(ctx, &session, &signals).await {
                session.close().await;
                return Err(e);
            }
            result.timings_ms.push(("setup".into(), result.started.elapsed().as_millis() as u64));
        }
        if let Err(e) = super::cp::upload_before(ctx, &session, &record, &uploads, &signals).await {
            session.close().await;
            return Err(e);
        }
        log.send(format!("connect session={} via={}", record.id, options.transport));
        let listeners = listeners.take().unwrap_or_default();
        let no_command = ctx.settings.forwarding.no_command;
        let outcome = match attach::start_forwards(ctx, &session, &listeners).await {
            Ok(()) => {
                if args.command.is_empty() && !no_command {
                    ctx.printer.status(attach::banner(&record, keep));
                }
                let record = args.record.clone();
                let listeners = &listeners;
                let work = Work { command: &args.command, tmux: args.tmux, record, listeners, no_command };
                attach::work_resuming(ctx, &options, &mut session, work, &signals).await
            }
            Err(e) => Err(e),
        };
        drop(listeners);
        session.close().await;
        outcome
    }
    .await;
    if let Some(first) = crate::ssh::first_output_at() {
        let ms = first.saturating_duration_since(result.started).as_millis() as u64;
        result.timings_ms.push(("first_output".into(), ms));
    }
    let _ = store.update(&record.id, |saved| saved.timings_ms = result.timings_ms.iter().cloned().collect());
    for failure in log.finish().await {
        ctx.printer.warn(failure);
    }
    if args.timings {
        ctx.printer.status(timings_line(&result.timings_ms).trim_start());
    }
    let setup_failed = matches!(&outcome, Err(e) if e.is::<setup::SetupFailed>());
    if keep && setup_failed {
        ctx.printer.status(format!(
            "left session {} running (--keep) to look into the setup: `ephemeral-admin connect {}`; `ephemeral-admin terminate {}` ends it",
            record.id, record.id, record.id
        ));
    } else if keep && matches!(outcome, Ok(Outcome::Exited(_))) {
        ctx.printer.status(format!(
            "left session {} running (--keep): it ends after {} idle or at {}; `ephemeral-admin terminate {}` ends it now",
            record.id,
            short_duration(std::time::Duration::from_secs(record.idle_grace_secs.unwrap_or(0))),
            record.expires_at,
            record.id
        ));
    } else {
        let reason = match &outcome {
            Ok(Outcome::Exited(_)) => ended_by::EXIT,
            Ok(Outcome::Stopped(_)) => ended_by::INTERRUPTED,
            Err(e) if e.is::<Interrupted>() => ended_by::INTERRUPTED,
            Err(e) if e.is::<setup::SetupFailed>() => ended_by::LAUNCH_FAILED,
            // Never got a shell: a rejected key, a box that never answered.
            Err(_) if !attached => ended_by::LAUNCH_FAILED,
            Err(_) => ended_by::CONNECTION_LOST,
        };
        let resources = SessionResources::from_record(&store.load(&record.id)?.unwrap_or(record.clone()));
        let report = teardown::teardown(&aws, &store, &resources, reason, &clock).await;
        if report.is_clean() {
            ctx.printer.status(report.summary());
        } else {
            ctx.printer.warn(report.summary());
        }
    }
    match outcome? {
        Outcome::Exited(exit) => Ok(ExitStatus::Remote(exit.exit_code())),
        Outcome::Stopped(stop) => Err(Interrupted {
            what: stop.name(),
            done: "the session was torn down".into(),
            code: stop.exit_code(),
        }
        .into()),
    }
}

fn has_setup(s: &crate::settings::Settings) -> bool {
    !s.packages.is_empty() || s.setup.is_some()
}

/// The box's cloud-config for this session.
fn render_user_data(
    s: &crate::settings::Settings,
    session_id: &str,
    keys: &SessionKeys,
    (expires, cap): (time::OffsetDateTime, time::OffsetDateTime),
    kept: bool,
) -> String {
    let idle_grace = if kept { s.kept_idle_grace } else { s.idle_grace };
    userdata::render(&userdata::BoxConfig {
        session_id,
        host_key_private: &keys.host.private_openssh,
        host_key_public: &keys.host.public_openssh,
        client_key_public: &keys.client.public_openssh,
        deadline_epoch: expires.unix_timestamp(),
        cap_epoch: cap.unix_timestamp(),
        idle_grace_secs: idle_grace.as_secs(),
        boot_grace_secs: s.boot_grace.as_secs(),
        interval_secs: s.watchdog_interval.as_secs().max(1),
        install_tmux: s.tmux,
        resume_relay: s.connect == ConnectMode::Eice,
        packages: &s.packages,
        setup_script: s.setup.as_ref().map(|setup| setup.text.as_str()),
    })
}

/// Renders the user-data with throw-away keys of the real size and checks that AWS would take
/// it (gzip'd if need be): exit 2 before any AWS call if not.
fn check_user_data(s: &crate::settings::Settings, args: &LaunchArgs) -> Result<()> {
    if !has_setup(s) && s.connect != ConnectMode::Eice {
        return Ok(());
    }
    let id = session::new_id();
    let keys = SessionKeys::generate(&id)?;
    let now = SystemClock.now();
    let kept = args.detach || args.keep || s.tmux;
    let text = render_user_data(s, &id, &keys, (now, now), kept);
    userdata::encode(&text).map(drop).map_err(|e| {
        let script = s
            .setup
            .as_ref()
            .map(|setup| format!(" (the setup script {} is {} bytes)", setup.origin, setup.text.len()));
        UsageError::new(format!("{e}{}", script.unwrap_or_default())).into()
    })
}

/// `launch --detach`: the first connection (which rotates the host key), kept for the uploads.
async fn first_connection(
    ctx: &Context,
    store: &Store,
    record: &mut SessionRecord,
    signals: &Signals,
) -> Result<crate::ssh::Session> {
    let route = Route::resolve(ctx, record, None, None);
    crash::point("connecting");
    let (_, session) = super::hostkey::open(ctx, store, record, &route, signals).await?;
    Ok(session)
}

/// A detached box that could not be reached or given its own host key goes, then the error is
/// reported.
async fn undo_detached(
    ctx: &Context,
    aws: &crate::aws::Aws,
    store: &Store,
    record: &SessionRecord,
    error: anyhow::Error,
) -> anyhow::Error {
    let resources =
        SessionResources::from_record(&store.load(&record.id).ok().flatten().unwrap_or(record.clone()));
    let reason = if error.is::<Interrupted>() { ended_by::INTERRUPTED } else { ended_by::LAUNCH_FAILED };
    let report = teardown::teardown(aws, store, &resources, reason, &SystemClock).await;
    if report.is_clean() {
        ctx.printer.status(report.summary());
    } else {
        ctx.printer.warn(report.summary());
    }
    error
}

fn timings_line(timings: &[(String, u64)]) -> String {
    let mut text = String::from("\ntimings:");
    for (name, ms) in timings {
        text.push_str(&format!(" {name}={ms}ms"));
    }
    text
}

/// Stops provisioning at a step boundary when a signal came, undoing what was made.
async fn checkpoint(
    ctx: &Context,
    aws: &crate::aws::Aws,
    recorder: &Recorder,
    signals: &Signals,
    clock: &dyn Clock,
) -> Result<()> {
    match signals.received() {
        None => Ok(()),
        Some(stop) => {
            let error = Interrupted {
                what: stop.name(),
                done: "removed what the launch had made".into(),
                code: stop.exit_code(),
            };
            Err(undo(ctx, aws, &recorder.store, recorder, error.into(), clock).await)
        }
    }
}

/// Provisions the box; on any failure or signal, removes what it made before returning.
async fn provision(
    ctx: &Context,
    args: &LaunchArgs,
    signals: &Signals,
) -> Result<(crate::aws::Aws, Store, SessionRecord, Launched)> {
    let s = &ctx.settings;
    let started = Instant::now();
    let mut timings: Vec<(String, u64)> = Vec::new();
    let mark = |name: &str, timings: &mut Vec<(String, u64)>| {
        timings.push((name.to_string(), started.elapsed().as_millis() as u64));
    };
    let aws = ctx.aws().await?;
    let clock = SystemClock;
    let store = Store::new(s.sessions_dir());
    let session_id = session::new_id();
    let created = clock.now();
    let expires = created + TimeDuration::try_from(s.max_runtime).context("max_runtime is too long")?;
    let cap = created + TimeDuration::try_from(s.max_runtime_cap).context("max_runtime_cap is too long")?;
    // A tmux session exists to survive a dropped connection: it is a kept session.
    let kept = args.detach || args.keep || s.tmux;
    let need_ingress = needs_caller_ingress(s.connect);
    mark("settings", &mut timings);
    // A taken name or a missing instance profile is bad input: refused before anything exists
    // (missing standing roles too, in `prepare`, before its one creation).
    let own_profile = preflight(ctx, &aws).await?;

    let expires_at = session::rfc3339(expires);
    let Prepared { caller, group, net, endpoint, my_ip, profile, keys, image, prices, standing } =
        prepare(ctx, &aws, &session_id, &expires_at, kept, own_profile).await?;
    mark("prepare", &mut timings);

    let session_tags = tags::session_tags(
        &session_id,
        (&caller.owner, &caller.user_id),
        &expires_at,
        kept,
        s.name.as_deref(),
        &s.tags,
    );
    let recorder = Recorder {
        store: store.clone(),
        record: Arc::new(Mutex::new(SessionRecord {
            id: session_id.clone(),
            created_at: session::rfc3339(created),
            expires_at: expires_at.clone(),
            kept,
            idle_grace_secs: Some(if kept { s.kept_idle_grace } else { s.idle_grace }.as_secs()),
            security_group_id: Some(group.id.clone()),
            instance_profile_name: profile.as_ref().map(|p| p.name.clone()),
            eice_endpoint_id: endpoint.as_ref().map(|e| e.id.clone()),
            eice_dns_name: endpoint.as_ref().and_then(|e| e.dns_name.clone()),
            resume_port: endpoint.is_some().then_some(crate::ssh::resume::RELAY_PORT),
            ..first_record(s, &aws.region, &caller, &keys)
        })),
        requested: Arc::default(),
    };
    store.save_private_key(&session_id, &keys.client.private_openssh)?;
    recorder.update(|_| {})?;
    crash::point("prepare");
    checkpoint(ctx, &aws, &recorder, signals, &clock).await?;

    let candidates = plan_candidates(s, &aws.region, &prices, &net);
    announce(ctx, &session_id, candidates.first());
    if let Err(refusal) =
        budget_guard(ctx, &store, &caller.account, &candidates, args.over_budget, clock.now())
    {
        return Err(undo(ctx, &aws, &store, &recorder, refusal, &clock).await);
    }

    let user_data = match userdata::encode(&render_user_data(s, &session_id, &keys, (expires, cap), kept)) {
        Ok(bytes) => bytes,
        Err(e) => {
            return Err(
                undo(ctx, &aws, &store, &recorder, UsageError::new(e.to_string()).into(), &clock).await
            );
        }
    };
    let spec = LaunchSpec {
        session_id: session_id.clone(),
        image_id: image.id.clone(),
        root_device_name: image.root_device_name.clone(),
        security_group_id: group.id.clone(),
        extra_security_group_ids: net.extra_groups.clone(),
        subnet_id: net.subnet.as_ref().map(|subnet| subnet.id.clone()),
        associate_public_ip: net.public_ip() && endpoint.is_none(),
        instance_profile_name: profile.as_ref().map(|p| p.name.clone()),
        user_data: base64::engine::general_purpose::STANDARD.encode(user_data),
        tags: session_tags.clone(),
        root_volume: s.root_volume,
    };

    // Phase 2: the SSH rule(s) while RunInstances is in flight.
    let step = ctx.printer.step("requesting the instance");
    let sources: Vec<IpNet> = my_ip.into_iter().chain(s.allow_cidrs.iter().copied()).collect();
    let sources: Vec<IpNet> = if need_ingress { sources } else { s.allow_cidrs.clone() };
    let open_ssh =
        open_ssh_rules(&aws, &recorder, &group.id, &sources, endpoint.as_ref(), &session_id, &session_tags);
    let run_instance = request_instance(&aws, &recorder, &spec, &candidates, &step, &clock);
    let (opened, launched) = tokio::join!(open_ssh, run_instance);
    drop(step);
    mark("run-instances", &mut timings);
    let launched = match (opened, launched) {
        (Ok(_), Ok(launched)) => launched,
        (opened, launched) => {
            let error = launched.err().or(opened.err()).expect("one side failed");
            return Err(undo(ctx, &aws, &store, &recorder, error, &clock).await);
        }
    };
    checkpoint(ctx, &aws, &recorder, signals, &clock).await?;

    // Phase 3: the fail-safe alarm and the scheduled deadline while the instance starts.
    let started_up =
        start_instance(ctx, &aws, &recorder, &launched, &standing, &session_tags, expires, signals);
    let running = match started_up.await {
        Ok(running) => running,
        Err(error) => return Err(undo(ctx, &aws, &store, &recorder, error, &clock).await),
    };
    mark("running", &mut timings);
    recorder.update(|r| {
        r.public_ip = running.public_ip.clone();
        r.private_ip = running.private_ip.clone();
        if r.spot_request_id.is_none() {
            r.spot_request_id = running.spot_request_id.clone();
        }
        r.launch_attempts = Some(launched.attempts);
        r.timings_ms = timings.iter().cloned().collect();
    })?;

    checkpoint(ctx, &aws, &recorder, signals, &clock).await?;
    let record = recorder.snapshot();
    let view = SessionView::build(Some(&record), Some(&running), clock.now());
    let result = Launched {
        estimate: launched.price_per_hour.map(|p| {
            pricing::estimate_with(p, s.max_runtime, s.root_volume, s.connect != ConnectMode::Eice).rounded()
        }),
        launch_attempts: launched.attempts,
        timings_ms: timings.clone(),
        started,
        session: view,
    };
    Ok((aws, store, record, result))
}

/// What the record says from the start, beside the session's own ids and times: who launched it
/// from where, with which settings and keys.
fn first_record(
    s: &crate::settings::Settings,
    region: &str,
    caller: &identity::Caller,
    keys: &SessionKeys,
) -> SessionRecord {
    let pid = std::process::id();
    SessionRecord {
        name: s.name.clone(),
        root_volume_gb: Some(s.root_volume.gb),
        root_volume_type: Some(s.root_volume.kind.as_str().to_string()),
        region: region.to_string(),
        account: caller.account.clone(),
        partition: caller.partition().to_string(),
        owner_arn: caller.owner.clone(),
        user: s.user.clone(),
        pid: Some(pid),
        pid_start: lifecycle::process_start(pid),
        host_key_public: keys.host.public_openssh.clone(),
        host_key_fingerprint: keys.host.fingerprint.clone(),
        host_key_state: Some(crate::session::store::HostKeyState::UserData),
        client_key_public: keys.client.public_openssh.clone(),
        connect: Some(s.connect.as_str().to_string()),
        proxy_command: s.proxy_command.clone(),
        ..Default::default()
    }
}

/// The fallback chain (zones by price, then types, then on-demand), pinned to the subnet's zone
/// when a subnet was chosen.
fn plan_candidates(
    s: &crate::settings::Settings,
    region: &str,
    prices: &[spot::SpotPrice],
    net: &vpc::Network,
) -> Vec<Candidate> {
    let mut candidates = ec2_launch::plan(
        &s.instance_types,
        prices,
        ec2_launch::Markets::of(s.on_demand, s.on_demand_fallback),
        |t| pricing::spot_max_price(s, region, t),
        |t| pricing::on_demand_price(s, region, t),
    );
    if let Some(zone) = net.fixed_zone() {
        // The subnet's zone is the only one: every candidate says so (and asks for no other).
        candidates.retain(|c| c.availability_zone.as_deref().is_none_or(|az| az == zone));
        for candidate in &mut candidates {
            candidate.availability_zone = Some(zone.to_string());
        }
    }
    candidates
}

/// "session k3x9q2ab: t3.small spot in us-east-1a at $0.0071/h, at most $0.03 for 4h".
fn announce(ctx: &Context, session_id: &str, first: Option<&Candidate>) {
    let s = &ctx.settings;
    let Some(first) = first else { return };
    let price = first.expected_price.map(|p| format!(" at {}/h", usd(p))).unwrap_or_default();
    let estimate = first
        .expected_price
        .map(|p| {
            let cost =
                pricing::estimate_with(p, s.max_runtime, s.root_volume, s.connect != ConnectMode::Eice);
            format!(", at most {} for {}", usd(cost.total), short_duration(s.max_runtime))
        })
        .unwrap_or_default();
    let profile = s.profile_name.as_ref().map(|p| format!(" (profile {p})")).unwrap_or_default();
    ctx.printer.status(format!("session {session_id}{profile}: {first}{price}{estimate}"));
}

/// The session's SSH rules (each recorded the moment it exists): from the caller's address and
/// `allow_cidr`s, and from an Instance Connect Endpoint's groups.
async fn open_ssh_rules(
    aws: &crate::aws::Aws,
    recorder: &Recorder,
    group_id: &str,
    sources: &[IpNet],
    endpoint: Option<&eice::Endpoint>,
    session_id: &str,
    session_tags: &[(String, String)],
) -> Result<()> {
    for cidr in sources {
        let rule = network::authorize_ssh(aws, group_id, *cidr, session_id, session_tags).await?;
        recorder.update(|r| r.ingress_rule_ids.push(rule.rule_id.clone()))?;
        crash::point("rule");
    }
    // sshd only: the endpoint tunnels to ports 22 and 3389 alone, and the resume relay listens on
    // the box's loopback (`crate::ssh::resume`).
    let ports = [network::SSH_PORT as u16];
    for from in endpoint.iter().flat_map(|e| &e.security_group_ids) {
        let rules = eice::admit_endpoint(aws, group_id, from, &ports, session_id, session_tags).await?;
        recorder.update(|r| r.ingress_rule_ids.extend(rules.iter().cloned()))?;
        crash::point("rule");
    }
    Ok(())
}

/// RunInstances down the fallback chain, the progress line following it; what launched is
/// recorded at once.
async fn request_instance(
    aws: &crate::aws::Aws,
    recorder: &Recorder,
    spec: &LaunchSpec,
    candidates: &[Candidate],
    step: &crate::output::Step,
    clock: &dyn Clock,
) -> Result<ec2_launch::Launched> {
    let on_event = |event: LaunchEvent| match event {
        LaunchEvent::Trying(c) => step.set(format!("requesting {c}")),
        LaunchEvent::NoCapacity { candidate, code } => {
            step.println(format!("no capacity: {candidate} ({code}); trying the next"))
        }
        LaunchEvent::Retrying { candidate, why, after } => {
            step.println(format!("{candidate}: {why}; retrying in {}", humantime::format_duration(after)))
        }
    };
    recorder.requested.store(true, std::sync::atomic::Ordering::SeqCst);
    let launched =
        ec2_launch::run_first_available(aws, spec, candidates, &on_event).await.map_err(|e| match e {
            // Keep the typed error at the top of the chain: it chooses the exit code.
            ec2_launch::LaunchError::Capacity(c) => anyhow::Error::from(c),
            ec2_launch::LaunchError::Aws(a) => anyhow::Error::from(a),
        })?;
    recorder.update(|r| {
        r.instance_id = Some(launched.instance_id.clone());
        r.spot_request_id = launched.spot_request_id.clone();
        r.instance_type = Some(launched.instance_type.clone());
        r.availability_zone = launched.availability_zone.clone();
        r.market = Some(launched.market.as_str().into());
        r.price_per_hour = launched.price_per_hour;
        r.launched_at = Some(session::rfc3339(clock.now()));
    })?;
    crash::point("run-instances");
    Ok(launched)
}

/// Phase 3: the fail-safe alarm and the scheduled deadline while the instance starts, then the
/// running instance (or the first failure; a Ctrl-C stops the wait).
#[allow(clippy::too_many_arguments)]
async fn start_instance(
    ctx: &Context,
    aws: &crate::aws::Aws,
    recorder: &Recorder,
    launched: &ec2_launch::Launched,
    standing: &iam::Standing,
    session_tags: &[(String, String)],
    expires: time::OffsetDateTime,
    signals: &Signals,
) -> Result<instances::InstanceInfo> {
    let s = &ctx.settings;
    let session_id = recorder.snapshot().id;
    let step = ctx.printer.step(format!("starting {} ({})", launched.instance_id, launched.instance_type));
    let create_alarm = async {
        let name = alarm::create_failsafe(aws, &session_id, &launched.instance_id, session_tags).await?;
        recorder.update(|r| r.alarm_name = Some(name.clone()))?;
        crash::point("alarm");
        anyhow::Ok(name)
    };
    let need_public_ip = s.connect == ConnectMode::PublicIp;
    let on_state = |state: &str| step.set(format!("instance {} is {state}", launched.instance_id));
    let wait = async {
        tokio::select! {
            running = instances::wait_running(aws, &launched.instance_id, need_public_ip, s.connect_timeout, &on_state) => {
                running.map_err(anyhow::Error::from)
            }
            stop = signals.stopped() => Err(Interrupted {
                what: stop.name(),
                done: "removed what the launch had made".into(),
                code: stop.exit_code(),
            }.into()),
        }
    };
    let arm_deadline = arm_scheduled_deadline(aws, recorder, standing, &launched.instance_id, expires);
    let (alarm_result, running, armed) = tokio::join!(create_alarm, wait, arm_deadline);
    drop(step);
    if let Err(e) = armed {
        // The watchdog, the alarm and `cleanup` still end the box: a warning, not a failure.
        ctx.printer.warn(format!(
            "the scheduled deadline is not armed (the watchdog and the alarm still end the box): {}",
            crate::exit_codes::one_line(&e)
        ));
    }
    match (alarm_result, running) {
        (Ok(_), Ok(running)) => Ok(running),
        (alarm_result, running) => Err(running.err().or(alarm_result.err()).expect("one side failed")),
    }
}

/// The fourth layer (`aws::schedule`): the session's schedules, run as the scheduler role that
/// `setup roles` made (found by the preflight). Runs while the instance starts, off the critical
/// path. The names are recorded before the schedules exist, so a crash in between leaves nothing
/// the record does not name.
async fn arm_scheduled_deadline(
    aws: &crate::aws::Aws,
    recorder: &Recorder,
    standing: &iam::Standing,
    instance_id: &str,
    deadline: time::OffsetDateTime,
) -> Result<Vec<String>> {
    let record = recorder.snapshot();
    let role = standing.scheduler_role_arn.clone().context("the scheduler role was not found")?;
    let alarm_name = alarm::alarm_name(&record.id, instance_id);
    let plan = schedule::Plan {
        session_id: &record.id,
        instance_id,
        group_id: record.security_group_id.as_deref(),
        alarm_name: &alarm_name,
        role_arn: &role,
        deadline,
    };
    recorder.update(|r| {
        r.schedule_names = plan.names();
        r.schedule_role_arn = Some(role.clone());
    })?;
    let names = schedule::arm(aws, &plan).await?;
    crash::point("schedule");
    Ok(names)
}

/// `connect = "eice"`: the ready endpoint of the box's VPC, found before anything is made; none
/// is bad input (exit 2) naming `setup eice`.
async fn eice_endpoint(
    aws: &crate::aws::Aws,
    connect: ConnectMode,
    net: &vpc::Network,
) -> Result<Option<eice::Endpoint>> {
    if connect != ConnectMode::Eice {
        return Ok(None);
    }
    let subnet = net.subnet.as_ref().map(|s| s.id.as_str());
    match eice::usable(aws, &net.vpc_id, subnet).await? {
        Some(e) if e.security_group_ids.is_empty() => Err(UsageError::new(format!(
            "EC2 Instance Connect Endpoint {} has no security group, so the box's group cannot admit it: delete it and run `ephemeral-admin setup eice`",
            e.id
        ))
        .into()),
        Some(e) => Ok(Some(e)),
        None => Err(UsageError::new(format!(
            "connect = \"eice\" needs an EC2 Instance Connect Endpoint in {} (state create-complete), and there is none: `ephemeral-admin setup eice` creates one (once per VPC; it takes a few minutes)",
            net.vpc_id
        ))
        .into()),
    }
}

/// One line about a network other than the default VPC's: where the box goes, and what else it joins.
fn network_line(net: &vpc::Network) -> Option<String> {
    let place = match &net.subnet {
        Some(subnet) if subnet.public => {
            format!("subnet {} ({}, {}, public)", subnet.id, subnet.vpc_id, subnet.availability_zone)
        }
        Some(subnet) => format!(
            "subnet {} ({}, {}, private: no public IP)",
            subnet.id, subnet.vpc_id, subnet.availability_zone
        ),
        None if net.extra_groups.is_empty() => return None,
        None => format!("the default VPC {}", net.vpc_id),
    };
    let groups = match net.extra_groups.as_slice() {
        [] => String::new(),
        groups => format!(", also in security group(s) {}", groups.join(", ")),
    };
    Some(format!("the box goes into {place}{groups}"))
}

/// Phase 1 failed (a denied call, a bad subnet, Ctrl-C): the session's group, if it was made
/// already, goes before the error is reported; nothing else exists yet.
async fn undo_prepare(
    ctx: &Context,
    aws: &crate::aws::Aws,
    group: Option<String>,
    error: anyhow::Error,
) -> anyhow::Error {
    if let Some(group) = group
        && let Err(e) = network::delete_security_group(aws, &group).await
    {
        ctx.printer
            .warn(format!("the session's security group {group} is left for `ephemeral-admin cleanup`: {e}"));
    }
    error
}

/// Whether SSH is opened to the caller's address: through SSM no inbound port is needed at all,
/// through an Instance Connect Endpoint only the endpoint's group is admitted.
fn needs_caller_ingress(connect: ConnectMode) -> bool {
    !matches!(connect, ConnectMode::Ssm | ConnectMode::Eice)
}

/// What phase 1 found and made.
struct Prepared {
    caller: identity::Caller,
    group: network::SecurityGroup,
    net: vpc::Network,
    endpoint: Option<eice::Endpoint>,
    my_ip: Option<IpNet>,
    /// None for a box reached by SSH: it gets no role, so IMDS holds no credentials.
    profile: Option<iam::InstanceProfile>,
    /// The standing IAM the launch uses (`setup roles`'s).
    standing: iam::Standing,
    keys: SessionKeys,
    image: ami::Image,
    prices: Vec<spot::SpotPrice>,
}

/// Phase 1: everything independent, at once (who we are, the network check and the session's
/// group in it, the caller's address, the instance profile, keys, image, prices), beside the
/// sweep of earlier leftovers. A failure removes the group if it was made already.
async fn prepare(
    ctx: &Context,
    aws: &crate::aws::Aws,
    session_id: &str,
    expires_at: &str,
    kept: bool,
    own_profile: Option<iam::InstanceProfile>,
) -> Result<Prepared> {
    let s = &ctx.settings;
    let need_ingress = needs_caller_ingress(s.connect);
    let step = ctx.printer.step("preparing (identity, address, security group, keys, image, prices)");
    let detect_ip = async {
        match (s.my_ip, need_ingress) {
            (Some(net), _) => Ok(Some(net)),
            (None, false) => Ok(None),
            (None, true) => {
                // Nothing is made without knowing whom to let in: fix the environment, exit 2.
                ip::detect(&ip_services(), ip::TIMEOUT)
                    .await
                    .map(Some)
                    .map_err(|e| crate::error::UsageError::new(e.to_string()).into())
            }
        }
    };
    let keys = {
        let id = session_id.to_string();
        async move {
            tokio::task::spawn_blocking(move || SessionKeys::generate(&id)).await.context("key generation")?
        }
    };
    // The network is checked before anything is made: the steps that create (the role) or
    // depend on the zone (prices) wait for it; a wrong subnet or group fails the launch first.
    let (network_tx, network_rx) = tokio::sync::watch::channel(None::<vpc::Network>);
    let network_checked = || {
        let mut rx = network_rx.clone();
        async move {
            let network = rx.wait_for(Option::is_some).await.context("the network check did not finish")?;
            anyhow::Ok(network.clone().expect("checked"))
        }
    };
    // The one thing phase 1 creates before the record exists: removed if another step fails.
    let made_group = Arc::new(tokio::sync::Mutex::new(None::<String>));
    let prepare = async {
        tokio::try_join!(
            // Who we are and where the box goes, then the session's own security group in that
            // VPC, tagged as the session's.
            async {
                // The standing roles are read beside them (a launch never makes IAM): one missing
                // is bad input, refused before anything is made.
                let (caller, net, standing) = tokio::try_join!(
                    async { identity::me(aws, s.owner.as_deref()).await.map_err(anyhow::Error::from) },
                    async {
                        vpc::resolve(aws, s.subnet.as_deref(), &s.security_groups, s.connect)
                            .await
                            .map_err(anyhow::Error::from)
                    },
                    standing_parts(ctx, aws),
                )?;
                let endpoint = eice_endpoint(aws, s.connect, &net).await?;
                network_tx.send_replace(Some(net.clone()));
                let vpc = net.vpc_id.clone();
                let session_tags = tags::session_tags(
                    session_id,
                    (&caller.owner, &caller.user_id),
                    expires_at,
                    kept,
                    s.name.as_deref(),
                    &s.tags,
                );
                // Created in a task of its own, holding the slot's lock until the answer is in:
                // another step failing cancels this branch, never a CreateSecurityGroup already
                // sent, and the undo waits for the lock to learn whether a group exists.
                let mut slot = made_group.clone().lock_owned().await;
                let create = {
                    let (aws, name) = (aws.clone(), s.security_group_name.clone());
                    let (id, tags) = (session_id.to_string(), session_tags.clone());
                    async move {
                        let group = network::create_session_group(&aws, &vpc, &name, &id, &tags).await?;
                        *slot = Some(group.id.clone());
                        anyhow::Ok(group)
                    }
                };
                let group = tokio::spawn(create).await.context("creating the session's group")??;
                crash::point("security-group");
                anyhow::Ok((caller, group, net, endpoint, standing))
            },
            detect_ip,
            keys,
            async { ami::resolve(aws, &s.ami, s.arch()).await.map_err(anyhow::Error::from) },
            async {
                if s.on_demand {
                    return Ok(Vec::new());
                }
                // A chosen subnet fixes the zone: only its prices matter.
                let zone = match &s.subnet {
                    Some(_) => network_checked().await?.fixed_zone().map(str::to_string),
                    None => None,
                };
                spot::current_prices(aws, &s.instance_types, zone.as_deref())
                    .await
                    .map_err(anyhow::Error::from)
            },
        )
    };
    // Leftovers of this user's earlier crashed sessions go first, off the critical path.
    let housekeeping = async {
        // Sessions that ended on their own while no CLI ran get their ledger line first...
        ctx.settle(aws).await;
        // ...then this user's crashed sessions go.
        super::cleanup::quick_sweep(ctx, aws).await
    };
    let (prepared, swept) = tokio::join!(prepare, housekeeping);
    let ((caller, group, net, endpoint, standing), my_ip, keys, image, prices) = match prepared {
        Ok(prepared) => prepared,
        Err(error) => {
            let made = made_group.lock().await.clone();
            return Err(undo_prepare(ctx, aws, made, error).await);
        }
    };
    drop(step);
    if let Some(line) = network_line(&net) {
        ctx.printer.status(line);
    }
    if !swept.is_empty() {
        ctx.printer.status(format!(
            "removed {} leftover session(s) of earlier runs whose launcher is gone: {}",
            swept.len(),
            swept.join(", ")
        ));
    }
    let profile = own_profile.or(standing.ssm_profile.clone());
    Ok(Prepared { caller, group, net, endpoint, my_ip, profile, standing, keys, image, prices })
}

/// What must hold before anything is created, checked at once: the name is not taken by one of
/// the caller's live sessions in the region, and the instance profile asked for exists (with a
/// role in it). Either failing is bad input (exit 2). Answers the profile to launch with, if the
/// user named one.
async fn preflight(ctx: &Context, aws: &crate::aws::Aws) -> Result<Option<iam::InstanceProfile>> {
    let s = &ctx.settings;
    let name_free = async {
        let Some(name) = s.name.as_deref() else { return anyhow::Ok(()) };
        let caller = identity::whoami(aws).await?;
        let taken = super::live_sessions(aws, &caller, Some(name)).await?;
        // A launch of this machine still provisioning has no instance for AWS to show yet.
        let launching =
            Store::new(s.sessions_dir()).in_scope(&caller.scope(&aws.region)).into_iter().find(|r| {
                r.name.as_deref() == Some(name)
                    && r.ended_at.is_none()
                    && r.instance_id.is_none()
                    && lifecycle::launcher_of(r) == lifecycle::Launcher::Alive
            });
        let holder = taken.first().and_then(|i| i.session_id.clone()).or(launching.map(|r| r.id));
        if let Some(other) = holder {
            return Err(crate::error::UsageError::new(format!(
                "the name {name:?} is taken by your live session {other} in {}: pick another --name, or end that one with `ephemeral-admin terminate {other}`",
                aws.region
            ))
            .into());
        }
        Ok(())
    };
    let profile = async {
        let Some(name) = s.instance_profile.as_deref() else { return anyhow::Ok(None) };
        let roles = iam::profile_roles(aws, name).await?.ok_or_else(|| {
            crate::error::UsageError::new(format!(
                "instance profile {name:?} does not exist in this account: create it (with a role EC2 may assume), or check --instance-profile"
            ))
        })?;
        let Some(role) = roles.first() else {
            return Err(crate::error::UsageError::new(format!(
                "instance profile {name:?} holds no role: add one (`aws iam add-role-to-instance-profile`) or pick another profile"
            ))
            .into());
        };
        if role != name {
            ctx.printer.warn(format!(
                "instance profile {name} holds role {role}: the policy `ephemeral-admin policy` prints lets you pass role {name} only, so your administrator must allow iam:PassRole on {role}"
            ));
        }
        ctx.printer.status(format!(
            "the box gets instance profile {name} (role {role}), which the tool did not make: it can do whatever that role allows"
        ));
        Ok(Some(iam::InstanceProfile { name: name.to_string(), fresh: false }))
    };
    let ((), profile) = tokio::try_join!(name_free, profile)?;
    Ok(profile)
}

/// The standing parts a launch uses but never makes (a daily user may not write IAM): the
/// scheduler role, and for Session Manager boxes without their own profile, the SSM profile.
/// Missing ones are bad input naming `setup roles` (exit 2, nothing made).
async fn standing_parts(ctx: &Context, aws: &crate::aws::Aws) -> Result<iam::Standing> {
    let s = &ctx.settings;
    let ssm = s.connect == ConnectMode::Ssm && s.instance_profile.is_none();
    let standing = iam::standing(aws, &s.iam_role_name, ssm).await?;
    if standing.missing.is_empty() {
        return Ok(standing);
    }
    Err(crate::error::UsageError::new(format!(
        "this account lacks the tool's {}: an account admin runs `ephemeral-admin setup roles` once (with the permissions `ephemeral-admin policy --bootstrap` prints)",
        standing.missing.join(" and ")
    ))
    .into())
}

/// A failed launch removes what it made so far, then reports the original error.
async fn undo(
    ctx: &Context,
    aws: &crate::aws::Aws,
    store: &Store,
    recorder: &Recorder,
    error: anyhow::Error,
    clock: &dyn Clock,
) -> anyhow::Error {
    let record = recorder.snapshot();
    let mut resources = SessionResources::from_record(&record);
    if record.instance_id.is_none() && recorder.requested.load(std::sync::atomic::Ordering::SeqCst) {
        resources.merge(unanswered_launch(ctx, aws, &record.id).await);
    }
    let interrupted = error.downcast_ref::<Interrupted>().is_some();
    let reason = if interrupted { ended_by::INTERRUPTED } else { ended_by::LAUNCH_FAILED };
    let report = teardown::teardown(aws, store, &resources, reason, clock).await;
    if report.is_clean() {
        let _ = store.forget(&record.id);
        // An interruption's own message already says that what was made is gone: one line.
        if !interrupted {
            ctx.printer.status(format!("launch failed; removed what it had made ({})", report.summary()));
        }
    } else {
        ctx.printer.warn(report.summary());
    }
    error
}

/// The instance a RunInstances whose answer never came may have started anyway, found by the
/// session's tag (it was created carrying it).
async fn unanswered_launch(ctx: &Context, aws: &crate::aws::Aws, session_id: &str) -> SessionResources {
    let query = instances::Query { session_id: Some(session_id), ..Default::default() };
    match instances::find(aws, query).await {
        Ok(found) => SessionResources {
            session_id: session_id.to_string(),
            instance_ids: found.iter().map(|i| i.instance_id.clone()).collect(),
            spot_request_ids: found.iter().filter_map(|i| i.spot_request_id.clone()).collect(),
            launched_at: found.iter().find_map(|i| i.launch_time.clone()),
            ..Default::default()
        },
        Err(e) => {
            ctx.printer.warn(format!(
                "could not check whether the unanswered launch started an instance ({e}): run `ephemeral-admin cleanup`"
            ));
            SessionResources::default()
        }
    }
}

/// The IP echo services: `EPHEMERAL_ADMIN_IP_SERVICES` (comma-separated URLs) replaces the
/// defaults, for networks that block them and for tests.
fn ip_services() -> Vec<String> {
    match std::env::var("EPHEMERAL_ADMIN_IP_SERVICES") {
        Ok(list) if !list.trim().is_empty() => list.split(',').map(|u| u.trim().to_string()).collect(),
        _ => ip::DEFAULT_SERVICES.iter().map(|u| u.to_string()).collect(),
    }
}

/// Refuses a launch whose worst case (running to its deadline) would take this month's spending
/// past the monthly budget, unless `--over-budget`.
fn budget_guard(
    ctx: &Context,
    store: &Store,
    account: &str,
    candidates: &[Candidate],
    over_budget: bool,
    now: time::OffsetDateTime,
) -> Result<()> {
    let s = &ctx.settings;
    let Some(first) = candidates.first() else { return Ok(()) };
    let Some(price) = first.expected_price else {
        ctx.printer
            .warn(format!("no price known for {first}: the budget guard cannot estimate this session"));
        return Ok(());
    };
    let estimate =
        pricing::estimate_with(price, s.max_runtime, s.root_volume, s.connect != ConnectMode::Eice).total;
    // This account's spending: the budget is the account's, not the machine's.
    let account = Some(account);
    let spent = crate::ledger::Ledger::beside(store).month_to_date(now, account)?
        + ledger::live_cost(store, now, account);
    let left = s.monthly_budget - spent;
    if spent + estimate <= s.monthly_budget {
        return Ok(());
    }
    let message = format!(
        "this session could cost up to {} ({} of {first} at {}/h, with IPv4 and EBS), but {} of the {} monthly budget is spent this month and {} is left: pass --over-budget to launch anyway, or raise monthly_budget in the config",
        usd(estimate),
        short_duration(s.max_runtime),
        usd(price),
        usd(spent),
        usd(s.monthly_budget),
        usd(left.max(0.0)),
    );
    if over_budget {
        ctx.printer.warn(format!("over budget (--over-budget given): {message}"));
        return Ok(());
    }
    Err(OverBudget(message).into())
}

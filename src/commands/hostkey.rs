//! The box's own host key (issue #31). The first host key travels in the user-data, which root on
//! the box and anyone allowed `ec2:DescribeInstanceAttribute` can read. So the first pinned
//! connection after a launch has the box make another one, on the box (`userdata/hostkey.sh`,
//! run as root; its private half never leaves the box), reads its public half back over that
//! authenticated connection, has sshd use it (a reload: the connection stays up) with the
//! user-data key's file replaced, and pins it in the session record. Every connection after that
//! (`connect`, `cp`, `ssh-config`'s known-hosts line, `proxy`, EICE) pins the box's own key.
//!
//! Crash-safe in recorded steps, each written under the record's lock: `user-data` (pinned: the
//! user-data key; the box may already hold an unused new key, which `new` hands out again),
//! `rotating` (the box made `host_key_next` and may offer either key), `box`. A connection in
//! `rotating` accepts exactly those two keys. If it met the new key, the box switched and only
//! the record was behind. If it met the old one, the box is switched over it and then reached
//! again pinning the new key alone, before anything is done there: a half-rotated box is never
//! trusted on the old key's word. A rotation that fails fails the command (a launch is undone)
//! rather than go on with the key the user-data carried.

use anyhow::{Context as _, Result, bail};
use russh::keys::PublicKey;

use super::Context;
use super::attach::{self, Route};
use crate::session::store::{HostKeyState, SessionRecord, Store};
use crate::signals::Signals;
use crate::ssh::{self, Captured, ConnectOptions, ExecIo, RemoteExit};
use crate::{crash, keys, userdata};

/// Connects to the session's box pinning its recorded key, finishing the host-key rotation
/// first if the record says it is not done. Answers the options every later connection of this
/// command must use (they pin the box's own key) and the open session.
pub async fn open(
    ctx: &Context,
    store: &Store,
    record: &mut SessionRecord,
    route: &Route,
    signals: &Signals,
) -> Result<(ConnectOptions, ssh::Session)> {
    let mut options = attach::connect_options(ctx, store, record, route).await?;
    let session = attach::open(ctx, &options, signals).await?;
    let rotated = match record.host_key_state {
        Some(HostKeyState::UserData) => rotate(ctx, store, record, &mut options, session).await,
        Some(HostKeyState::Rotating) => finish(ctx, store, record, &mut options, session, signals).await,
        None | Some(HostKeyState::Box) => return Ok((options, session)),
    };
    rotated.map(|session| (options, session))
}

/// Finishes a rotation the record says is not done (a connection that rotates, then closes);
/// nothing to do otherwise.
pub async fn ensure_rotated(
    ctx: &Context,
    store: &Store,
    record: &mut SessionRecord,
    route: &Route,
) -> Result<()> {
    if matches!(record.host_key_state, None | Some(HostKeyState::Box)) {
        return Ok(());
    }
    let signals = Signals::install().context("listening for Ctrl-C")?;
    let (_, session) = open(ctx, store, record, route, &signals).await?;
    session.close().await;
    Ok(())
}

/// From the user-data key to the box's own, over the connection that pinned the former.
async fn rotate(
    ctx: &Context,
    store: &Store,
    record: &mut SessionRecord,
    options: &mut ConnectOptions,
    session: ssh::Session,
) -> Result<ssh::Session> {
    let step = ctx.printer.step("giving the box a host key of its own");
    let next = match new_key(&session).await {
        Ok(next) => next,
        Err(e) => return Err(closing(session, e).await),
    };
    let text = next.to_openssh().context("encoding the box's host key")?;
    let rotating = |r: &mut SessionRecord| {
        r.host_key_state = Some(HostKeyState::Rotating);
        r.host_key_next = Some(text.clone());
    };
    if let Err(e) = store.update(&record.id, rotating) {
        return Err(closing(session, e).await);
    }
    rotating(record);
    crash::point("host-key-made");
    if let Err(e) = switch(&session, &text).await {
        return Err(closing(session, e).await);
    }
    crash::point("host-key-switched");
    if let Err(e) = pin(store, record, options, &next) {
        return Err(closing(session, e).await);
    }
    drop(step);
    Ok(session)
}

/// A rotation the record says was cut off: the box made `host_key_next` and may or may not
/// offer it yet.
async fn finish(
    ctx: &Context,
    store: &Store,
    record: &mut SessionRecord,
    options: &mut ConnectOptions,
    session: ssh::Session,
    signals: &Signals,
) -> Result<ssh::Session> {
    let Some(text) = record.host_key_next.clone() else {
        bail!(
            "session {}'s record says its host key is being rotated but names no new key: terminate it (`ephemeral-admin terminate {}`)",
            record.id,
            record.id
        );
    };
    let next = keys::parse_public(&text)?;
    let step = ctx.printer.step("finishing the box's host-key rotation");
    if let Err(e) = switch(&session, &text).await {
        return Err(closing(session, e).await);
    }
    let session = if session.host_key().key_data() == next.key_data() {
        session
    } else {
        // It answered with the user-data key: trust nothing it said until the box proves it
        // holds the new key's private half.
        session.close().await;
        let pinned = ConnectOptions { host_key: next.clone(), also_accept: None, ..options.clone() };
        attach::open(ctx, &pinned, signals).await?
    };
    if let Err(e) = pin(store, record, options, &next) {
        return Err(closing(session, e).await);
    }
    drop(step);
    Ok(session)
}

/// Pins `key` alone: in the record (under its lock) and in the options of later connections.
fn pin(
    store: &Store,
    record: &mut SessionRecord,
    options: &mut ConnectOptions,
    key: &PublicKey,
) -> Result<()> {
    let public = key.to_openssh().context("encoding the box's host key")?;
    let fingerprint = keys::fingerprint(key);
    let pinned = |r: &mut SessionRecord| {
        r.host_key_public = public.clone();
        r.host_key_fingerprint = fingerprint.clone();
        r.host_key_state = Some(HostKeyState::Box);
        r.host_key_next = None;
    };
    store.update(&record.id, pinned)?.with_context(|| format!("session {}'s record is gone", record.id))?;
    pinned(record);
    options.host_key = key.clone();
    options.also_accept = None;
    // An EICE resume of this very connection dials a new tunnel with the options it was made
    // with: from now on it pins the box's own key too.
    *options.repinned.lock().expect("repinned key") = Some(key.clone());
    Ok(())
}

/// `hostkey new` on the box: the public half of the key it made (the same one if it made one
/// already).
async fn new_key(session: &ssh::Session) -> Result<PublicKey> {
    let out = on_box(session, "make its own host key", &["new"]).await?;
    let line = out.lines().next().unwrap_or_default();
    let key = PublicKey::from_openssh(line)
        .with_context(|| format!("the box answered {line:?} instead of its new host key"))?;
    if key.algorithm() != russh::keys::Algorithm::Ed25519 {
        bail!("the box made a {} host key, not an Ed25519 one", key.algorithm());
    }
    Ok(key)
}

/// `hostkey switch KEY` on the box: sshd uses `key` from now on.
async fn switch(session: &ssh::Session, key: &str) -> Result<()> {
    let out = on_box(session, "switch sshd to its own host key", &["switch", key]).await?;
    if out.trim() != "switched" {
        bail!("the box answered {:?} when asked to switch sshd to its own host key", out.trim());
    }
    Ok(())
}

/// Runs the rotation script as root on the box; its stdout, or an error saying what failed.
async fn on_box(session: &ssh::Session, what: &str, args: &[&str]) -> Result<String> {
    let mut argv: Vec<String> =
        ["sh", "-c", userdata::HOSTKEY_RUN, "ephemeral-admin-hostkey"].map(String::from).into();
    argv.extend(args.iter().map(|a| a.to_string()));
    let mut output = Captured::default();
    let io = ExecIo::Capture { stdin: Vec::new(), output: &mut output };
    let exit = session.exec(&argv, io).await.with_context(|| format!("asking the box to {what}"))?;
    if exit != RemoteExit::Status(0) {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let said = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("no message");
        bail!(
            "the box could not {what} ({exit}: {said}): the login user needs passwordless sudo and the image ssh-keygen, as on the stock Debian, Ubuntu and Amazon Linux images"
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Closes the session, then hands back the error that ended it.
async fn closing(session: ssh::Session, error: anyhow::Error) -> anyhow::Error {
    session.close().await;
    error
}

//! `setup eice`, and the EC2 Instance Connect Endpoint's place in `doctor` and `cleanup --purge`.
//!
//! `setup eice` creates the one endpoint a VPC needs for `connect = "eice"`, with a security
//! group of its own (no ingress) that each session's group admits on port 22. It takes AWS
//! minutes: a progress line shows the state and the elapsed time. Running it again finds the
//! endpoint (ready, or still creating: then it waits) and changes nothing.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::Context;
use crate::aws::eice::{self, Endpoint};
use crate::aws::{Aws, instances, network, vpc};
use crate::cli::{ConnectMode, SetupEiceArgs};
use crate::error::{ExitStatus, UsageError};
use crate::output::short_duration;

/// How long `setup eice` waits for the endpoint (AWS usually needs a few minutes).
const CREATE_WAIT: Duration = Duration::from_secs(20 * 60);
/// How long `cleanup --purge` waits for a deleted endpoint to let go of its group.
const GROUP_WAIT: Duration = Duration::from_secs(120);
/// Without a terminal, a progress line at most this often (and on every state change).
const PROGRESS_EVERY: Duration = Duration::from_secs(15);

#[derive(Serialize)]
struct SetupResult {
    /// False when the VPC already had an endpoint.
    created: bool,
    endpoint: Endpoint,
}

pub async fn setup(ctx: &Context, args: &SetupEiceArgs) -> Result<ExitStatus> {
    let aws = ctx.aws().await?;
    let (vpc_id, subnet_id) = place(ctx, &aws, args.subnet.as_deref()).await?;
    let existing = eice::endpoints(&aws, Some(&vpc_id)).await?.into_iter().next();
    let (created, endpoint) = match existing {
        Some(found) if found.ready() => (false, found),
        Some(found) => (false, wait(ctx, &aws, &found).await?),
        None => create(ctx, &aws, &vpc_id, &subnet_id).await?,
    };
    let result = SetupResult { created, endpoint };
    ctx.printer.result(&result, || match result.created {
        true => format!(
            "created EC2 Instance Connect Endpoint {}: `connect = \"eice\"` (or --connect eice) now reaches boxes in {} with no public IP and no open port",
            result.endpoint.describe(),
            result.endpoint.vpc_id
        ),
        false => format!(
            "{} already has EC2 Instance Connect Endpoint {}: nothing to do",
            result.endpoint.vpc_id,
            result.endpoint.describe()
        ),
    });
    Ok(ExitStatus::Success)
}

/// Creates the endpoint and waits for it. Another `setup eice` that won the race (AWS allows one
/// endpoint per VPC: `ResourceLimitExceeded`) is waited for instead.
async fn create(ctx: &Context, aws: &Aws, vpc_id: &str, subnet_id: &str) -> Result<(bool, Endpoint)> {
    let group = eice::create_group(aws, vpc_id).await?;
    let ports = [crate::aws::network::SSH_PORT as u16];
    eice::restrict_egress(aws, &group, vpc_id, &ports).await?;
    let token = format!("ephemeral-admin-{}", crate::session::new_id());
    match eice::create(aws, subnet_id, &group, &token).await {
        Ok(asked) => Ok((true, wait(ctx, aws, &asked).await?)),
        Err(e) if e.code() == Some("ResourceLimitExceeded") => {
            match eice::endpoints(aws, Some(vpc_id)).await?.into_iter().next() {
                Some(other) => Ok((false, wait(ctx, aws, &other).await?)),
                None => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// The VPC and subnet: `--subnet` (or `subnet` in the config), else the default VPC's subnet in
/// its first zone.
async fn place(ctx: &Context, aws: &Aws, subnet: Option<&str>) -> Result<(String, String)> {
    if let Some(subnet) = subnet.or(ctx.settings.subnet.as_deref()) {
        let net = vpc::resolve(aws, Some(subnet), &[], ConnectMode::Eice).await.map_err(|e| match e {
            network::NetworkError::Aws(e) => anyhow::Error::from(e),
            bad => UsageError::new(bad.to_string()).into(),
        })?;
        return Ok((net.vpc_id, subnet.to_string()));
    }
    let vpc = network::default_vpc(aws).await?.ok_or_else(|| {
        UsageError::new(format!(
            "{} has no default VPC: pass --subnet SUBNET_ID for the endpoint",
            aws.region
        ))
    })?;
    let first = network::default_subnets(aws, &vpc).await?.into_iter().next().ok_or_else(|| {
        UsageError::new(format!("the default VPC {vpc} has no default subnet: pass --subnet SUBNET_ID"))
    })?;
    Ok((vpc, first.id))
}

/// Waits for create-complete with a progress line: the state and the elapsed time.
async fn wait(ctx: &Context, aws: &Aws, endpoint: &Endpoint) -> Result<Endpoint> {
    let step = ctx.printer.step(format!("creating EC2 Instance Connect Endpoint {}", endpoint.id));
    let last = Mutex::new((String::new(), Instant::now()));
    let progress = |state: &str, elapsed: Duration| {
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        if last.0 != state || last.1.elapsed() >= PROGRESS_EVERY {
            *last = (state.to_string(), Instant::now());
            step.set(format!(
                "EC2 Instance Connect Endpoint {}: {state}, {} elapsed (AWS takes a few minutes)",
                endpoint.id,
                short_duration(elapsed)
            ));
        }
    };
    let ready = eice::wait_ready(aws, endpoint, CREATE_WAIT, &progress).await?;
    drop(step);
    Ok(ready)
}

/// `doctor`: whether the VPC launches go into has a ready endpoint. Only a failure when the
/// configured connect mode is `eice`.
pub async fn doctor_detail(ctx: &Context, aws: &Aws) -> (bool, String, Option<String>) {
    let needed = ctx.settings.connect == ConnectMode::Eice;
    let fix = || Some("`ephemeral-admin setup eice` creates one".to_string());
    let vpc = match &ctx.settings.subnet {
        Some(subnet) => vpc::resolve(aws, Some(subnet), &[], ConnectMode::Eice).await.ok().map(|n| n.vpc_id),
        None => network::default_vpc(aws).await.ok().flatten(),
    };
    let Some(vpc) = vpc else {
        return (!needed, "no VPC to look in (see the network check)".into(), None);
    };
    match eice::endpoints(aws, Some(&vpc)).await {
        Ok(found) => match found.iter().find(|e| e.ready()).or(found.first()) {
            Some(e) if e.ready() => (true, format!("endpoint {}", e.describe()), None),
            Some(e) => (!needed, format!("endpoint {} is not ready yet", e.describe()), fix()),
            None if needed => (false, format!("no EC2 Instance Connect Endpoint in {vpc}"), fix()),
            None => (
                true,
                format!("none in {vpc} (only connect = \"eice\" needs one: `ephemeral-admin setup eice`)"),
                None,
            ),
        },
        Err(e) => (!needed, e.to_string(), e.hint().map(str::to_string)),
    }
}

/// `cleanup --purge`: the tool's endpoints and their groups, in VPCs where no box of the tool's
/// is left. Answers what went, and why something stayed.
pub async fn purge(aws: &Aws) -> Result<(Vec<String>, Vec<String>)> {
    let (mut purged, mut refusals, mut kept) = (Vec::new(), Vec::new(), Vec::new());
    for endpoint in eice::endpoints(aws, None).await?.into_iter().filter(|e| e.ours) {
        let users = boxes_in(aws, &endpoint.vpc_id).await?;
        if !users.is_empty() {
            refusals.push(format!(
                "EC2 Instance Connect Endpoint {} still serves {}: end those sessions first, or run `cleanup --all --purge`",
                endpoint.id,
                users.join(", ")
            ));
            kept.extend(endpoint.security_group_ids);
            continue;
        }
        eice::delete(aws, &endpoint.id).await?;
        purged.push(format!("EC2 Instance Connect Endpoint {}", endpoint.id));
    }
    purged.extend(delete_groups(aws, &kept).await?);
    Ok((purged, refusals))
}

/// The tool's live boxes in a VPC.
async fn boxes_in(aws: &Aws, vpc_id: &str) -> Result<Vec<String>> {
    Ok(instances::users_of(aws, "vpc-id", vpc_id)
        .await?
        .into_iter()
        .filter(|i| i.session_id.is_some() && i.state != "shutting-down")
        .map(|i| i.instance_id)
        .collect())
}

/// The endpoints' own groups (by name), once no endpoint holds them: AWS keeps a group in use
/// until its endpoint's deletion completes, so this waits for that, bounded; a group still held
/// after that goes with the next `cleanup --purge` (it costs nothing).
async fn delete_groups(aws: &Aws, kept: &[String]) -> Result<Vec<String>> {
    let prefix = format!("{}-", eice::NAME);
    let groups: Vec<_> = network::own_groups(aws)
        .await?
        .into_iter()
        .filter(|g| g.name.starts_with(&prefix) && !kept.contains(&g.id))
        .collect();
    let mut deleted = Vec::new();
    let started = Instant::now();
    for group in groups {
        loop {
            match eice::delete_group(aws, &group.id).await.context("deleting an endpoint's group")? {
                network::GroupDeletion::Deleted => {
                    deleted.push(format!("security group {} ({})", group.name, group.id));
                    break;
                }
                network::GroupDeletion::StillInUse if started.elapsed() < GROUP_WAIT => {
                    tokio::time::sleep(Duration::from_secs(2)).await
                }
                network::GroupDeletion::StillInUse => break,
            }
        }
    }
    Ok(deleted)
}

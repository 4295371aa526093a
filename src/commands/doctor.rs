//! `doctor`: checks everything a launch needs, in parallel, and says how to fix what fails.

use anyhow::Result;
use aws_sdk_ec2::types::{InstanceType, IpPermission, IpRange, ResourceType};
use serde::Serialize;

use super::Context;
use crate::aws::{Aws, AwsError, ami, code_of, identity, instances, network};
use crate::error::ExitStatus;
use crate::output::table;
use crate::session::tags;

#[derive(Debug, Serialize)]
struct Check {
    name: &'static str,
    ok: bool,
    /// Not run: a check it depends on failed.
    skipped: bool,
    detail: String,
    /// What to do when it failed.
    fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check { name, ok: true, skipped: false, detail: detail.into(), fix: None }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { name, ok: false, skipped: false, detail: detail.into(), fix: Some(fix.into()) }
    }

    /// A failed AWS call: its own advice when the error carries one (credentials, a denial,
    /// throttling…), else `fix`, the advice for what this check looks at.
    fn aws_failure(name: &'static str, error: &AwsError, fix: &str) -> Check {
        Check::fail(name, error.summary(), error.hint().unwrap_or(fix))
    }

    fn skip(self, why: &str) -> Check {
        if self.name == "config" || self.name == "credentials" {
            return self;
        }
        Check { ok: false, skipped: true, detail: why.to_string(), fix: None, ..self }
    }

    fn status(&self) -> &'static str {
        match (self.ok, self.skipped) {
            (true, _) => "OK",
            (false, true) => "SKIP",
            (false, false) => "FAIL",
        }
    }
}

#[derive(Serialize)]
struct Report {
    ok: bool,
    region: String,
    checks: Vec<Check>,
}

pub async fn run(ctx: &Context) -> Result<ExitStatus> {
    let s = &ctx.settings;
    let config = match &s.config_path {
        Some(path) => Check::ok("config", format!("{} parses and validates", path.display())),
        None => Check::ok("config", "no config file; using defaults (`ephemeral-admin init` writes one)"),
    };
    let aws = ctx.aws().await?;
    let step = ctx.printer.step("checking");
    let (credentials, region, vpc, (image, probes), endpoint, roles) = tokio::join!(
        check_credentials(&aws),
        check_region(&aws),
        check_network(ctx, &aws),
        async {
            let (check, image) = check_image(ctx, &aws).await;
            (check, check_permissions(ctx, &aws, image.as_deref()).await)
        },
        check_eice(ctx, &aws),
        check_roles(ctx, &aws)
    );
    drop(step);
    // Without working credentials every other AWS check fails for that one reason: say it once.
    let no_credentials = !credentials.ok;
    let mut checks = vec![credentials, region, config, vpc, image];
    checks.extend(probes);
    checks.push(endpoint);
    checks.push(roles);
    if no_credentials {
        checks = checks.into_iter().map(|c| c.skip("not checked: needs working credentials")).collect();
    }
    let report = Report { ok: checks.iter().all(|c| c.ok), region: aws.region.clone(), checks };
    ctx.printer.result(&report, || {
        let rows: Vec<Vec<String>> = report
            .checks
            .iter()
            .map(|c| {
                let detail = match &c.fix {
                    Some(fix) => format!("{} (fix: {fix})", c.detail),
                    None => c.detail.clone(),
                };
                vec![c.name.to_string(), c.status().to_string(), detail]
            })
            .collect();
        table(&["CHECK", "STATUS", "DETAIL"], &rows)
    });
    Ok(match (report.ok, no_credentials) {
        (true, _) => ExitStatus::Success,
        // Like every command: no usable credentials is the environment's to fix (exit 2).
        (false, true) => ExitStatus::Usage,
        (false, false) => ExitStatus::Failure,
    })
}

/// Whether the VPC has an EC2 Instance Connect Endpoint (a failure only in `eice` mode).
async fn check_eice(ctx: &Context, aws: &Aws) -> Check {
    let (ok, detail, fix) = super::eice::doctor_detail(ctx, aws).await;
    Check { name: "eice", ok, skipped: false, detail, fix }
}

/// The standing IAM a launch reads but never makes (`setup roles`), as the launch reads it.
async fn check_roles(ctx: &Context, aws: &Aws) -> Check {
    let s = &ctx.settings;
    let ssm = s.connect == crate::cli::ConnectMode::Ssm && s.instance_profile.is_none();
    match crate::aws::iam::standing(aws, &s.iam_role_name, ssm).await {
        Ok(found) if found.missing.is_empty() => {
            Check::ok("roles", "the tool's standing roles exist (`setup roles`)")
        }
        Ok(found) => Check::fail(
            "roles",
            format!("missing: {}", found.missing.join(", ")),
            "an account admin runs `ephemeral-admin setup roles` once (with `ephemeral-admin policy --bootstrap`)",
        ),
        Err(e) => Check::aws_failure("roles", &e, "see `ephemeral-admin policy`"),
    }
}

async fn check_credentials(aws: &Aws) -> Check {
    match identity::whoami(aws).await {
        Ok(caller) => Check::ok("credentials", caller.arn),
        Err(e) => Check::aws_failure(
            "credentials",
            &e,
            "configure credentials (`aws configure`, `aws sso login`) or pass --profile",
        ),
    }
}

async fn check_region(aws: &Aws) -> Check {
    let out = aws.ec2.describe_regions().send().await;
    match out {
        Ok(out) if out.regions().iter().any(|r| r.region_name() == Some(aws.region.as_str())) => {
            Check::ok("region", format!("{} is enabled", aws.region))
        }
        Ok(_) => Check::fail(
            "region",
            format!("{} is not an enabled region of this account", aws.region),
            "pick another --region, or enable it in the AWS console",
        ),
        Err(e) => Check::aws_failure("region", &AwsError::new("listing regions", e), "check --region"),
    }
}

async fn check_network(ctx: &Context, aws: &Aws) -> Check {
    let s = &ctx.settings;
    if s.subnet.is_some() || !s.security_groups.is_empty() {
        // The launch's own check, so doctor and launch agree.
        return match crate::aws::vpc::resolve(aws, s.subnet.as_deref(), &s.security_groups, s.connect).await {
            Ok(net) => Check::ok(
                "network",
                match &net.subnet {
                    Some(subnet) => format!("subnet {}", subnet.describe()),
                    None => format!("default VPC {}", net.vpc_id),
                },
            ),
            Err(network::NetworkError::Aws(e)) => {
                Check::aws_failure("network", &e, "see `ephemeral-admin policy`")
            }
            Err(e) => Check::fail("network", e.to_string(), "set `subnet` / `security_groups` in the config"),
        };
    }
    let vpc = match network::default_vpc(aws).await {
        Ok(Some(vpc)) => vpc,
        Ok(None) => {
            return Check::fail(
                "network",
                format!("no default VPC in {}", aws.region),
                "set `subnet` in the config (`ephemeral-admin launch` lists the subnets), run `aws ec2 create-default-vpc`, or pick another --region",
            );
        }
        Err(e) => return Check::aws_failure("network", &e, "see `ephemeral-admin policy`"),
    };
    match network::default_subnets(aws, &vpc).await {
        Ok(subnets) if !subnets.is_empty() => {
            Check::ok("network", format!("default VPC {vpc} with {} subnets", subnets.len()))
        }
        Ok(_) => Check::fail(
            "network",
            format!("default VPC {vpc} has no default subnets"),
            "run `aws ec2 create-default-subnet --availability-zone ZONE`",
        ),
        Err(e) => Check::aws_failure("network", &e, "see `ephemeral-admin policy`"),
    }
}

async fn check_image(ctx: &Context, aws: &Aws) -> (Check, Option<String>) {
    let s = &ctx.settings;
    match ami::resolve(aws, &s.ami, s.arch()).await {
        Ok(image) => {
            (Check::ok("ami", format!("{} → {} ({})", s.ami, image.id, image.source)), Some(image.id))
        }
        Err(ami::AmiError::Aws(e)) => (Check::aws_failure("ami", &e, "see `ephemeral-admin policy`"), None),
        Err(e) => (Check::fail("ami", e.to_string(), "pass another --ami, or set `ami` in the config"), None),
    }
}

/// EC2 `DryRun` probes: AWS answers `DryRunOperation` when the call would be allowed and
/// `UnauthorizedOperation` when it would not, without doing anything. The policy scopes these
/// calls to the tool's tagged resources, so each probe looks like the real call: RunInstances
/// carries the tool's tags and the caller's owner-id, and terminate and authorize are tried on a
/// resource of the caller's own (not probed while there is none: a made-up id has no tags, and
/// the policy rightly refuses it, as it refuses a teammate's).
async fn check_permissions(ctx: &Context, aws: &Aws, image: Option<&str>) -> Vec<Check> {
    let instance_type = InstanceType::from(ctx.settings.instance_types[0].as_str());
    let caller = identity::whoami(aws).await.ok();
    let mut ours = tags::shared_resource_tags();
    ours.extend(caller.as_ref().map(|c| (tags::OWNER_ID.to_string(), c.user_id.clone())));
    let mine = |owner_id: Option<&str>, owner: Option<&str>| {
        caller.as_ref().is_some_and(|c| owner_id.is_some() && c.may_change(owner_id, owner))
    };
    let run = aws
        .ec2
        .run_instances()
        .dry_run(true)
        .image_id(image.unwrap_or("ami-00000000000000000"))
        .instance_type(instance_type)
        .min_count(1)
        .max_count(1)
        .tag_specifications(network::tag_spec(ResourceType::Instance, &ours))
        .tag_specifications(network::tag_spec(ResourceType::Volume, &ours))
        .send();
    let (group, own_instance) = tokio::join!(
        async {
            network::own_groups(aws).await.map(|groups| {
                groups.into_iter().find(|g| mine(g.owner_id.as_deref(), g.owner.as_deref())).map(|g| g.id)
            })
        },
        instances::find(aws, instances::Query::default())
    );
    let own_instance = own_instance
        .ok()
        .and_then(|found| found.into_iter().find(|i| mine(i.owner_id.as_deref(), i.owner.as_deref())))
        .map(|i| i.instance_id);
    let terminate = async {
        let id = own_instance?;
        Some(aws.ec2.terminate_instances().dry_run(true).instance_ids(id).send().await)
    };
    let authorize = async {
        let group = group.ok().flatten()?;
        let rule = IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(22)
            .to_port(22)
            .ip_ranges(IpRange::builder().cidr_ip("192.0.2.1/32").build())
            .build();
        Some(
            aws.ec2
                .authorize_security_group_ingress()
                .dry_run(true)
                .group_id(group)
                .ip_permissions(rule)
                .tag_specifications(network::tag_spec(ResourceType::SecurityGroupRule, &ours))
                .send()
                .await,
        )
    };
    let (run, terminate, authorize) = tokio::join!(run, terminate, authorize);
    let not_probed =
        |name| Check::ok(name, "not probed: allowed only on the tool's own resources, and there is none yet");
    vec![
        probe("permission:RunInstances", run.err().as_ref().and_then(code_of)),
        match terminate {
            Some(result) => probe("permission:TerminateInstances", result.err().as_ref().and_then(code_of)),
            None => not_probed("permission:TerminateInstances"),
        },
        match authorize {
            Some(result) => {
                probe("permission:AuthorizeSecurityGroupIngress", result.err().as_ref().and_then(code_of))
            }
            None => not_probed("permission:AuthorizeSecurityGroupIngress"),
        },
    ]
}

fn probe(name: &'static str, code: Option<&str>) -> Check {
    match code {
        Some("DryRunOperation") => Check::ok(name, "allowed (dry run)"),
        Some(code @ ("UnauthorizedOperation" | "AccessDenied" | "AuthFailure")) => Check::fail(
            name,
            format!("denied ({code})"),
            "attach the policy printed by `ephemeral-admin policy`",
        ),
        Some(other) => Check::ok(name, format!("not denied (dry run answered {other})")),
        None => Check::fail(name, "the dry run got no AWS answer", "check your network and --endpoint-url"),
    }
}

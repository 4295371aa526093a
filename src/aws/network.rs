//! Where the box lives and who may reach it: the default VPC, the tool's security group, and
//! per-session SSH rules for the caller's address only.
//!
//! One rule per source address. Two sessions from the same address share it by reference
//! counting: each session adds an `ephemeral-admin:ref:<id>` tag to the rule, and the rule is
//! revoked only when the last reference goes, so ending one session never cuts another off.

use aws_sdk_ec2::types::{Filter, IpPermission, IpRange, Ipv6Range, ResourceType, Tag, TagSpecification};
use std::time::Duration;

use ipnet::IpNet;
use time::OffsetDateTime;

use super::{Aws, AwsError, AwsResultExt, code_of};
use crate::session::{self, tags};

pub const SSH_PORT: i32 = 22;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Subnet {
    pub id: String,
    pub availability_zone: String,
}

/// The account's default VPC in the region, if it has one.
pub async fn default_vpc(aws: &Aws) -> Result<Option<String>, AwsError> {
    let out = aws
        .ec2
        .describe_vpcs()
        .filters(Filter::builder().name("is-default").values("true").build())
        .send()
        .await
        .doing("looking for the default VPC")?;
    Ok(out.vpcs().first().and_then(|v| v.vpc_id()).map(str::to_string))
}

/// The default VPC's subnets (one per zone).
pub async fn default_subnets(aws: &Aws, vpc_id: &str) -> Result<Vec<Subnet>, AwsError> {
    let out = aws
        .ec2
        .describe_subnets()
        .filters(Filter::builder().name("vpc-id").values(vpc_id).build())
        .filters(Filter::builder().name("default-for-az").values("true").build())
        .send()
        .await
        .doing("listing the default VPC's subnets")?;
    let mut subnets: Vec<Subnet> = out
        .subnets()
        .iter()
        .filter_map(|s| {
            Some(Subnet {
                id: s.subnet_id()?.to_string(),
                availability_zone: s.availability_zone()?.to_string(),
            })
        })
        .collect();
    subnets.sort_by(|a, b| a.availability_zone.cmp(&b.availability_zone));
    Ok(subnets)
}

/// The tool's security group.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SecurityGroup {
    pub id: String,
    /// True when this call created it.
    pub created: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// Not transparent: the AWS error stays a node of the chain, where `exit_codes::report` finds it.
    #[error("{0}")]
    Aws(#[from] AwsError),
    #[error(
        "region {0} has no default VPC: create one with `aws ec2 create-default-vpc`, or pick another --region"
    )]
    NoDefaultVpc(String),
}

/// Finds the tool's security group by name and tag, creating it in the default VPC if missing.
/// One call when it exists; a concurrent creator is tolerated.
pub async fn ensure_security_group(aws: &Aws, name: &str) -> Result<SecurityGroup, NetworkError> {
    if let Some(id) = find_security_group(aws, name).await? {
        return Ok(SecurityGroup { id, created: false });
    }
    let vpc_id = default_vpc(aws).await?.ok_or_else(|| NetworkError::NoDefaultVpc(aws.region.clone()))?;
    let created = aws
        .ec2
        .create_security_group()
        .group_name(name)
        .description("ephemeral-admin: SSH from the launching caller only, per session")
        .vpc_id(&vpc_id)
        .tag_specifications(tag_spec(ResourceType::SecurityGroup, &tags::shared_resource_tags()))
        .send()
        .await;
    match created {
        Ok(out) => Ok(SecurityGroup { id: out.group_id().unwrap_or_default().to_string(), created: true }),
        // Someone else created it between our lookup and our create.
        Err(e) if code_of(&e) == Some("InvalidGroup.Duplicate") => {
            let id = find_security_group(aws, name).await?.unwrap_or_default();
            Ok(SecurityGroup { id, created: false })
        }
        Err(e) => Err(AwsError::new(format!("creating security group {name}"), e).into()),
    }
}

/// The tool's security group id, if it exists.
pub async fn find_security_group(aws: &Aws, name: &str) -> Result<Option<String>, AwsError> {
    let out = aws
        .ec2
        .describe_security_groups()
        .filters(Filter::builder().name("group-name").values(name).build())
        .filters(Filter::builder().name(format!("tag:{}", tags::PROJECT)).values(tags::PROJECT_VALUE).build())
        .send()
        .await
        .doing(format!("looking up security group {name}"))?;
    Ok(out.security_groups().first().and_then(|g| g.group_id()).map(str::to_string))
}

/// A per-session SSH rule.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IngressRule {
    pub rule_id: String,
    pub cidr: String,
    /// True when another session already had this rule and we added a reference to it.
    pub shared: bool,
}

/// Opens TCP 22 from `cidr` for this session, tagged with the session's tags and a reference.
pub async fn authorize_ssh(
    aws: &Aws,
    group_id: &str,
    cidr: IpNet,
    session_id: &str,
    session_tags: &[(String, String)],
) -> Result<IngressRule, AwsError> {
    let since = session::rfc3339(OffsetDateTime::now_utc());
    let mut rule_tags = session_tags.to_vec();
    rule_tags.push((tags::rule_ref_key(session_id), since.clone()));
    let out = aws
        .ec2
        .authorize_security_group_ingress()
        .group_id(group_id)
        .ip_permissions(ssh_permission(cidr, session_id))
        .tag_specifications(tag_spec(ResourceType::SecurityGroupRule, &rule_tags))
        .send()
        .await;
    match out {
        Ok(out) => {
            let rule_id = out
                .security_group_rules()
                .first()
                .and_then(|r| r.security_group_rule_id())
                .unwrap_or_default()
                .to_string();
            Ok(IngressRule { rule_id, cidr: cidr.to_string(), shared: false })
        }
        Err(e) if code_of(&e) == Some("InvalidPermission.Duplicate") => {
            // Another session from this address holds the rule: take a reference to it.
            let rule_id = find_ssh_rule(aws, group_id, cidr)
                .await?
                .ok_or_else(|| AwsError::new(format!("opening SSH from {cidr}"), e))?;
            aws.ec2
                .create_tags()
                .resources(&rule_id)
                .tags(Tag::builder().key(tags::rule_ref_key(session_id)).value(since).build())
                .send()
                .await
                .doing(format!("sharing SSH rule {rule_id}"))?;
            Ok(IngressRule { rule_id, cidr: cidr.to_string(), shared: true })
        }
        Err(e) => Err(AwsError::new(format!("opening SSH from {cidr}"), e)),
    }
}

fn ssh_permission(cidr: IpNet, session_id: &str) -> IpPermission {
    let description = format!("ephemeral-admin session {session_id}");
    let permission = IpPermission::builder().ip_protocol("tcp").from_port(SSH_PORT).to_port(SSH_PORT);
    match cidr {
        IpNet::V4(_) => permission
            .ip_ranges(IpRange::builder().cidr_ip(cidr.to_string()).description(description).build())
            .build(),
        IpNet::V6(_) => permission
            .ipv6_ranges(Ipv6Range::builder().cidr_ipv6(cidr.to_string()).description(description).build())
            .build(),
    }
}

/// The SSH ingress rule for `cidr` in the group, if any.
async fn find_ssh_rule(aws: &Aws, group_id: &str, cidr: IpNet) -> Result<Option<String>, AwsError> {
    let rules = ssh_rules(aws, group_id).await?;
    let wanted = cidr.to_string();
    Ok(rules.into_iter().find(|r| r.cidr == wanted).map(|r| r.rule_id))
}

/// An SSH rule in the tool's group and the sessions that hold references to it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SshRule {
    pub rule_id: String,
    pub cidr: String,
    pub refs: Vec<SessionRef>,
}

/// One session's reference to a shared rule, and when it took it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionRef {
    pub session_id: String,
    pub since: Option<String>,
}

/// Every SSH ingress rule in the group with its references.
pub async fn ssh_rules(aws: &Aws, group_id: &str) -> Result<Vec<SshRule>, AwsError> {
    let out = aws
        .ec2
        .describe_security_group_rules()
        .filters(Filter::builder().name("group-id").values(group_id).build())
        .send()
        .await
        .doing("listing SSH rules")?;
    Ok(out
        .security_group_rules()
        .iter()
        .filter(|r| r.is_egress() != Some(true) && r.from_port() == Some(SSH_PORT))
        .filter_map(|r| {
            let cidr = r.cidr_ipv4().or(r.cidr_ipv6())?.to_string();
            let refs = r
                .tags()
                .iter()
                .filter_map(|t| {
                    let session_id = t.key()?.strip_prefix(tags::RULE_REF_PREFIX)?.to_string();
                    Some(SessionRef { session_id, since: t.value().map(str::to_string) })
                })
                .collect();
            Some(SshRule { rule_id: r.security_group_rule_id()?.to_string(), cidr, refs })
        })
        .collect())
}

/// What happened to a rule when a session let go of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Release {
    Revoked,
    /// Other live sessions still hold references; only ours was removed.
    StillShared,
    AlreadyGone,
}

/// A reference from a session still launching (no instance yet) counts for this long.
const LAUNCHING_REF_GRACE: Duration = Duration::from_secs(600);

/// Drops this session's reference to the rule and revokes the rule when no other live session
/// holds one. Another session counts as live while its instance is pending or running, or while
/// its reference is younger than a launch can take (it may still be starting).
pub async fn release_ssh(
    aws: &Aws,
    group_id: &str,
    rule_id: &str,
    session_id: &str,
) -> Result<Release, AwsError> {
    let rules = ssh_rules(aws, group_id).await?;
    let Some(rule) = rules.into_iter().find(|r| r.rule_id == rule_id) else {
        return Ok(Release::AlreadyGone);
    };
    let others: Vec<&SessionRef> = rule.refs.iter().filter(|r| r.session_id != session_id).collect();
    if !others.is_empty() && any_live(aws, &others).await? {
        aws.ec2
            .delete_tags()
            .resources(rule_id)
            .tags(Tag::builder().key(tags::rule_ref_key(session_id)).build())
            .send()
            .await
            .doing(format!("releasing shared SSH rule {rule_id}"))?;
        return Ok(Release::StillShared);
    }
    revoke_rule(aws, group_id, rule_id).await
}

async fn any_live(aws: &Aws, refs: &[&SessionRef]) -> Result<bool, AwsError> {
    let now = OffsetDateTime::now_utc();
    let recent = refs.iter().any(|r| {
        r.since.as_deref().and_then(session::parse_rfc3339).is_some_and(|t| now - t < LAUNCHING_REF_GRACE)
    });
    if recent {
        return Ok(true);
    }
    let mut filter = Filter::builder().name(format!("tag:{}", tags::SESSION));
    for r in refs {
        filter = filter.values(&r.session_id);
    }
    let out = aws
        .ec2
        .describe_instances()
        .filters(filter.build())
        .filters(Filter::builder().name("instance-state-name").values("pending").values("running").build())
        .send()
        .await
        .doing("checking who else uses the SSH rule")?;
    Ok(out.reservations().iter().any(|r| !r.instances().is_empty()))
}

/// Revokes one rule by id; a rule already gone is fine.
pub async fn revoke_rule(aws: &Aws, group_id: &str, rule_id: &str) -> Result<Release, AwsError> {
    let out = aws
        .ec2
        .revoke_security_group_ingress()
        .group_id(group_id)
        .security_group_rule_ids(rule_id)
        .send()
        .await;
    match out {
        Ok(_) => Ok(Release::Revoked),
        Err(e)
            if matches!(
                code_of(&e),
                Some(
                    "InvalidSecurityGroupRuleId.NotFound"
                        | "InvalidPermission.NotFound"
                        | "InvalidGroup.NotFound"
                )
            ) =>
        {
            Ok(Release::AlreadyGone)
        }
        Err(e) => Err(AwsError::new(format!("closing SSH rule {rule_id}"), e)),
    }
}

/// Deletes the tool's security group (cleanup --purge). AWS refuses while an instance uses it.
pub async fn delete_security_group(aws: &Aws, group_id: &str) -> Result<(), AwsError> {
    match aws.ec2.delete_security_group().group_id(group_id).send().await {
        Ok(_) => Ok(()),
        Err(e) if code_of(&e) == Some("InvalidGroup.NotFound") => Ok(()),
        Err(e) => Err(AwsError::new(format!("deleting security group {group_id}"), e)),
    }
}

/// Tags for one resource type at creation time.
pub fn tag_spec(resource_type: ResourceType, pairs: &[(String, String)]) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(resource_type)
        .set_tags(Some(pairs.iter().map(|(k, v)| Tag::builder().key(k).value(v).build()).collect()))
        .build()
}

//! Where the box lives and who may reach it: the default VPC, and for every session its own
//! security group holding SSH rules for that session's sources only.
//!
//! A group per session, not one shared group: a rule made for one session (even an
//! `--allow-cidr 0.0.0.0/0`) reaches that session's box and no other, and ending a session revokes
//! its rules without asking who else might use them (nobody can). The empty group is deleted at
//! teardown, or by `cleanup` once AWS lets go of it (not while its instance shuts down).

use aws_sdk_ec2::types::{Filter, IpPermission, IpRange, Ipv6Range, ResourceType, Tag, TagSpecification};

use ipnet::IpNet;

use super::{Aws, AwsError, AwsResultExt, code_of};
use crate::session::tags;

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

/// A session's own security group: SSH from that session's sources only, attached to that
/// session's box only.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SecurityGroup {
    pub id: String,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// Not transparent: the AWS error stays a node of the chain, where `exit_codes::report` finds it.
    #[error("{0}")]
    Aws(#[from] AwsError),
    /// No subnet set and no default VPC: the message lists the region's subnets to pick from.
    #[error("{}", no_default_vpc(region, subnets))]
    NoDefaultVpc { region: String, subnets: Vec<super::vpc::SubnetInfo> },
    #[error(
        "subnet {subnet} does not exist in {region}: check --subnet (or `subnet` in the config), or pick the subnet's --region"
    )]
    SubnetNotFound { subnet: String, region: String },
    #[error(
        "subnet {subnet} (in {vpc}) is private (no route to an internet gateway), so the box gets no public IP and `connect = \"public-ip\"` cannot reach it: pass --connect private-ip (over a VPN), --connect ssm or --proxy-command, or pick a public --subnet"
    )]
    PrivateSubnet { subnet: String, vpc: String },
    #[error(
        "security group {group} does not exist in {region}: check --security-group (or `security_groups` in the config)"
    )]
    GroupNotFound { group: String, region: String },
    #[error(
        "security group {group} is in {group_vpc}, but the box goes into {vpc}: pick a group of {vpc}, or a --subnet of {group_vpc}"
    )]
    GroupInOtherVpc { group: String, group_vpc: String, vpc: String },
    /// A group with the session group's name exists and is not the tool's.
    #[error(
        "security group {name} ({id}) already exists in {vpc} and is not this tool's: set another \
         `security_group_name` prefix in the config, or remove that group"
    )]
    NameTaken { name: String, id: String, vpc: String },
}

impl NetworkError {
    /// Bad input or environment found before anything was made (exit 2), not a failed AWS call.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, NetworkError::Aws(_))
    }
}

fn no_default_vpc(region: &str, subnets: &[super::vpc::SubnetInfo]) -> String {
    if subnets.is_empty() {
        return format!(
            "region {region} has no default VPC and no subnets: create a VPC with a subnet (or `aws ec2 create-default-vpc`), or pick another --region"
        );
    }
    let mut text = format!(
        "region {region} has no default VPC: pick a subnet with --subnet SUBNET_ID (or `subnet = \"SUBNET_ID\"` in the config); its subnets (id, VPC, zone, CIDR, reach):"
    );
    const SHOWN: usize = 40;
    for subnet in subnets.iter().take(SHOWN) {
        text.push_str("\n  ");
        text.push_str(&subnet.describe());
    }
    if subnets.len() > SHOWN {
        text.push_str(&format!(
            "\n  … and {} more (`aws ec2 describe-subnets --region {region}`)",
            subnets.len() - SHOWN
        ));
    }
    text
}

/// The name of a session's group: the configured prefix and the session id.
pub fn session_group_name(prefix: &str, session_id: &str) -> String {
    format!("{prefix}-{session_id}")
}

/// Creates the session's own group in the box's VPC (the subnet's, or the default one), tagged as the session's (so only the
/// tool's scoped permissions can change it and `cleanup` finds it by tag). It starts with no
/// ingress at all.
pub async fn create_session_group(
    aws: &Aws,
    vpc_id: &str,
    prefix: &str,
    session_id: &str,
    session_tags: &[(String, String)],
) -> Result<SecurityGroup, NetworkError> {
    let vpc_id = vpc_id.to_string();
    let name = session_group_name(prefix, session_id);
    let created = aws
        .ec2
        .create_security_group()
        .group_name(&name)
        .description(format!("ephemeral-admin session {session_id}: SSH from its caller only"))
        .vpc_id(&vpc_id)
        .tag_specifications(tag_spec(ResourceType::SecurityGroup, session_tags))
        .send()
        .await;
    match created {
        Ok(out) => {
            let id = out
                .group_id()
                .map(str::to_string)
                .ok_or_else(|| AwsError::missing(format!("creating security group {name}"), "a group id"))?;
            Ok(SecurityGroup { id, name })
        }
        Err(e) if code_of(&e) == Some("InvalidGroup.Duplicate") => {
            let id = group_id_by_name(aws, &vpc_id, &name).await?.unwrap_or_else(|| "id unknown".into());
            Err(NetworkError::NameTaken { name, id, vpc: vpc_id })
        }
        Err(e) => Err(AwsError::new(format!("creating security group {name}"), e).into()),
    }
}

pub(crate) async fn group_id_by_name(
    aws: &Aws,
    vpc_id: &str,
    name: &str,
) -> Result<Option<String>, AwsError> {
    let out = aws
        .ec2
        .describe_security_groups()
        .filters(Filter::builder().name("group-name").values(name).build())
        .filters(Filter::builder().name("vpc-id").values(vpc_id).build())
        .send()
        .await
        .doing(format!("looking up security group {name}"))?;
    Ok(out.security_groups().first().and_then(|g| g.group_id()).map(str::to_string))
}

/// One of the tool's groups, found by its tags.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OwnGroup {
    pub id: String,
    pub name: String,
    pub session_id: Option<String>,
    pub owner: Option<String>,
    pub owner_id: Option<String>,
}

/// Every security group tagged as the tool's in the region (one paginated call).
pub async fn own_groups(aws: &Aws) -> Result<Vec<OwnGroup>, AwsError> {
    let mut pages = aws
        .ec2
        .describe_security_groups()
        .filters(Filter::builder().name(format!("tag:{}", tags::PROJECT)).values(tags::PROJECT_VALUE).build())
        .into_paginator()
        .send();
    let mut groups = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.doing("listing the tool's security groups")?;
        for g in page.security_groups() {
            let Some(id) = g.group_id() else { continue };
            let tag = |key: &str| g.tags().iter().find(|t| t.key() == Some(key)).and_then(|t| t.value());
            groups.push(OwnGroup {
                id: id.to_string(),
                name: g.group_name().unwrap_or("?").to_string(),
                session_id: tag(tags::SESSION).map(str::to_string),
                owner: tag(tags::OWNER).map(str::to_string),
                owner_id: tag(tags::OWNER_ID).map(str::to_string),
            });
        }
    }
    Ok(groups)
}

/// A per-session SSH rule.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IngressRule {
    pub rule_id: String,
    pub cidr: String,
}

/// Opens TCP 22 from `cidr` in the session's own group, tagged with the session's tags.
/// Idempotent: a rule that exists already (a retried call) is found and returned.
pub async fn authorize_ssh(
    aws: &Aws,
    group_id: &str,
    cidr: IpNet,
    session_id: &str,
    session_tags: &[(String, String)],
) -> Result<IngressRule, AwsError> {
    let doing = || format!("opening SSH from {cidr}");
    let out = aws
        .ec2
        .authorize_security_group_ingress()
        .group_id(group_id)
        .ip_permissions(ssh_permission(cidr, session_id))
        .tag_specifications(tag_spec(ResourceType::SecurityGroupRule, session_tags))
        .send()
        .await;
    let rule_id = match out {
        Ok(out) => {
            out.security_group_rules().first().and_then(|r| r.security_group_rule_id()).map(str::to_string)
        }
        Err(e) if code_of(&e) == Some("InvalidPermission.Duplicate") => {
            let wanted = cidr.to_string();
            ssh_rules(aws, group_id).await?.into_iter().find(|r| r.cidr == wanted).map(|r| r.rule_id)
        }
        Err(e) => return Err(AwsError::new(doing(), e)),
    };
    let rule_id = rule_id.ok_or_else(|| AwsError::missing(doing(), "a security group rule id"))?;
    Ok(IngressRule { rule_id, cidr: cidr.to_string() })
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

/// An SSH rule in one of the tool's groups.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SshRule {
    pub rule_id: String,
    pub group_id: String,
    pub cidr: String,
    pub session_id: Option<String>,
}

/// Every SSH ingress rule in the group.
pub async fn ssh_rules(aws: &Aws, group_id: &str) -> Result<Vec<SshRule>, AwsError> {
    rules_where(aws, Filter::builder().name("group-id").values(group_id).build()).await
}

/// Every SSH rule the tool made in the region, in any group (found by tag, one call).
pub async fn own_ssh_rules(aws: &Aws) -> Result<Vec<SshRule>, AwsError> {
    rules_where(
        aws,
        Filter::builder().name(format!("tag:{}", tags::PROJECT)).values(tags::PROJECT_VALUE).build(),
    )
    .await
}

async fn rules_where(aws: &Aws, filter: Filter) -> Result<Vec<SshRule>, AwsError> {
    let out =
        aws.ec2.describe_security_group_rules().filters(filter).send().await.doing("listing SSH rules")?;
    Ok(out
        .security_group_rules()
        .iter()
        .filter(|r| r.is_egress() != Some(true) && r.from_port() == Some(SSH_PORT))
        .filter_map(|r| {
            let cidr = r.cidr_ipv4().or(r.cidr_ipv6())?.to_string();
            let session_id = r
                .tags()
                .iter()
                .find(|t| t.key() == Some(tags::SESSION))
                .and_then(|t| t.value())
                .map(str::to_string);
            Some(SshRule {
                rule_id: r.security_group_rule_id()?.to_string(),
                group_id: r.group_id()?.to_string(),
                cidr,
                session_id,
            })
        })
        .collect())
}

/// What happened to a session's SSH access at teardown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Release {
    Revoked,
    AlreadyGone,
}

/// Ends a session's SSH access: revokes its rule. The rule lives in the session's own group, so
/// no other session can depend on it: nothing to ask, nothing to race.
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

/// Whether a group could be deleted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupDeletion {
    Deleted,
    /// AWS still sees an instance (shutting down) in it: `cleanup` deletes it later.
    StillInUse,
}

/// Deletes a session's group. AWS refuses (`DependencyViolation`) while its instance is still
/// shutting down; that is not a failure, the group is empty of rules and costs nothing.
pub async fn delete_security_group(aws: &Aws, group_id: &str) -> Result<GroupDeletion, AwsError> {
    match aws.ec2.delete_security_group().group_id(group_id).send().await {
        Ok(_) => Ok(GroupDeletion::Deleted),
        Err(e) if code_of(&e) == Some("InvalidGroup.NotFound") => Ok(GroupDeletion::Deleted),
        Err(e) if code_of(&e) == Some("DependencyViolation") => Ok(GroupDeletion::StillInUse),
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

//! EC2 Instance Connect Endpoints: the one endpoint per VPC that `connect = "eice"` tunnels
//! through. `setup eice` creates it (tagged as the tool's, with a security group of its own that
//! box groups admit on port 22, and whose egress reaches only port 22 inside the VPC), a launch finds it before anything is made, `doctor` reports it,
//! and `cleanup --purge` deletes it (and its group) when no session needs it.

use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{Ec2InstanceConnectEndpoint, Ec2InstanceConnectEndpointState as State, Filter};
use aws_sdk_ec2::types::{IpPermission, IpRange, Ipv6Range, ResourceType, UserIdGroupPair};

use super::network::{self, tag_spec};
use super::{Aws, AwsError, AwsResultExt, code_of};
use crate::session::tags;

/// The `Name` tag of the tool's endpoint and of its security group.
pub const NAME: &str = "ephemeral-admin-eice";
/// How often `setup eice` asks whether the endpoint is ready.
const POLL: Duration = Duration::from_secs(1);

/// One endpoint, as the tool uses it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Endpoint {
    pub id: String,
    /// Where tunnels are opened; AWS may not name it before the endpoint is ready.
    pub dns_name: Option<String>,
    pub vpc_id: String,
    pub subnet_id: Option<String>,
    pub state: String,
    pub security_group_ids: Vec<String>,
    /// Tagged Project=EphemeralContainer: made by `setup eice`.
    pub ours: bool,
}

impl Endpoint {
    fn from_sdk(e: &Ec2InstanceConnectEndpoint) -> Option<Endpoint> {
        Some(Endpoint {
            id: e.instance_connect_endpoint_id()?.to_string(),
            dns_name: e.dns_name().map(str::to_string),
            vpc_id: e.vpc_id()?.to_string(),
            subnet_id: e.subnet_id().map(str::to_string),
            state: e.state().map(|s| s.as_str().to_string()).unwrap_or_default(),
            security_group_ids: e.security_group_ids().to_vec(),
            ours: e
                .tags()
                .iter()
                .any(|t| t.key() == Some(tags::PROJECT) && t.value() == Some(tags::PROJECT_VALUE)),
        })
    }

    pub fn ready(&self) -> bool {
        self.state == State::CreateComplete.as_str() && self.dns_name.is_some()
    }

    /// "eice-0ab… in subnet-0cd… (vpc-0ef…)".
    pub fn describe(&self) -> String {
        let subnet = self.subnet_id.as_deref().unwrap_or("no subnet named");
        format!("{} in {subnet} ({}, {})", self.id, self.vpc_id, self.state)
    }
}

/// The endpoints of a VPC (every state but deleted), or of the whole region.
pub async fn endpoints(aws: &Aws, vpc_id: Option<&str>) -> Result<Vec<Endpoint>, AwsError> {
    let mut request = aws.ec2.describe_instance_connect_endpoints();
    if let Some(vpc) = vpc_id {
        request = request.filters(Filter::builder().name("vpc-id").values(vpc).build());
    }
    let out = request.send().await.doing("looking for EC2 Instance Connect Endpoints")?;
    Ok(out
        .instance_connect_endpoints()
        .iter()
        .filter_map(Endpoint::from_sdk)
        .filter(|e| e.state != State::DeleteComplete.as_str())
        .collect())
}

/// The endpoint a box in `vpc_id` (and `subnet_id`, when known) tunnels through: a ready one,
/// preferring the same subnet.
pub async fn usable(aws: &Aws, vpc_id: &str, subnet_id: Option<&str>) -> Result<Option<Endpoint>, AwsError> {
    Ok(pick(endpoints(aws, Some(vpc_id)).await?, subnet_id))
}

fn pick(mut found: Vec<Endpoint>, subnet_id: Option<&str>) -> Option<Endpoint> {
    found.retain(Endpoint::ready);
    found.sort_by_key(|e| (e.subnet_id.as_deref() != subnet_id, !e.ours, e.id.clone()));
    found.into_iter().next()
}

/// Creates the endpoint's own security group: no ingress; box groups admit SSH from it.
pub async fn create_group(aws: &Aws, vpc_id: &str) -> Result<String, AwsError> {
    let name = format!("{NAME}-{vpc_id}");
    let tags = endpoint_tags();
    let out = aws
        .ec2
        .create_security_group()
        .group_name(&name)
        .description("ephemeral-admin EC2 Instance Connect Endpoint: boxes admit SSH from this group")
        .vpc_id(vpc_id)
        .tag_specifications(tag_spec(ResourceType::SecurityGroup, &tags))
        .send()
        .await;
    match out {
        Ok(out) => out
            .group_id()
            .map(str::to_string)
            .ok_or_else(|| AwsError::missing("creating the EICE group", "a group id")),
        Err(e) if code_of(&e) == Some("InvalidGroup.Duplicate") => own_group_id(aws, vpc_id, &name).await,
        Err(e) => Err(AwsError::new(format!("creating security group {name}"), e)),
    }
}

/// Makes the endpoint's group a way in and nowhere else: its egress is sshd (`ports`) inside its
/// VPC, in place of AWS's default allow-all. Idempotent (a rule already
/// there, or a default already gone, is fine), so `setup eice` also narrows a group made before.
pub async fn restrict_egress(aws: &Aws, group_id: &str, vpc_id: &str, ports: &[u16]) -> Result<(), AwsError> {
    let doing = || format!("limiting the EICE group {group_id}'s egress to its VPC");
    let vpcs = aws.ec2.describe_vpcs().vpc_ids(vpc_id).send().await.doing(doing())?;
    let mut cidrs: Vec<String> = vpcs
        .vpcs()
        .iter()
        .flat_map(|v| v.cidr_block_association_set())
        .filter(|a| a.cidr_block_state().and_then(|s| s.state()).is_none_or(|s| s.as_str() == "associated"))
        .filter_map(|a| a.cidr_block().map(str::to_string))
        .collect();
    if cidrs.is_empty() {
        cidrs.extend(vpcs.vpcs().iter().filter_map(|v| v.cidr_block().map(str::to_string)));
    }
    if cidrs.is_empty() {
        return Err(AwsError::missing(doing(), "the VPC's IPv4 CIDR"));
    }
    let ranges: Vec<IpRange> = cidrs
        .iter()
        .map(|c| IpRange::builder().cidr_ip(c).description("ephemeral-admin: boxes' sshd").build())
        .collect();
    let permissions = ports.iter().map(|port| {
        IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(i32::from(*port))
            .to_port(i32::from(*port))
            .set_ip_ranges(Some(ranges.clone()))
            .build()
    });
    let out = aws
        .ec2
        .authorize_security_group_egress()
        .group_id(group_id)
        .set_ip_permissions(Some(permissions.collect()))
        .send()
        .await;
    match out {
        Ok(_) => {}
        Err(e) if code_of(&e) == Some("InvalidPermission.Duplicate") => {}
        Err(e) => return Err(AwsError::new(doing(), e)),
    }
    // AWS's default rules: all IPv4, and all IPv6 in a VPC with an IPv6 block.
    let all_v4 =
        IpPermission::builder().ip_protocol("-1").ip_ranges(IpRange::builder().cidr_ip("0.0.0.0/0").build());
    let all_v6 =
        IpPermission::builder().ip_protocol("-1").ipv6_ranges(Ipv6Range::builder().cidr_ipv6("::/0").build());
    for default in [all_v4.build(), all_v6.build()] {
        let out =
            aws.ec2.revoke_security_group_egress().group_id(group_id).ip_permissions(default).send().await;
        match out {
            Ok(_) => {}
            Err(e) if code_of(&e) == Some("InvalidPermission.NotFound") => {}
            Err(e) => return Err(AwsError::new(doing(), e)),
        }
    }
    Ok(())
}

async fn own_group_id(aws: &Aws, vpc_id: &str, name: &str) -> Result<String, AwsError> {
    super::network::group_id_by_name(aws, vpc_id, name)
        .await?
        .ok_or_else(|| AwsError::missing(format!("looking up security group {name}"), "a group id"))
}

fn endpoint_tags() -> Vec<(String, String)> {
    let mut tags = tags::shared_resource_tags();
    tags.push((tags::NAME.into(), NAME.into()));
    tags.push((tags::STANDING.into(), tags::STANDING_EICE.into()));
    tags
}

/// Asks for the endpoint in `subnet_id` with `group_id`; `token` makes a retried call idempotent.
pub async fn create(aws: &Aws, subnet_id: &str, group_id: &str, token: &str) -> Result<Endpoint, AwsError> {
    let doing = || format!("creating an EC2 Instance Connect Endpoint in {subnet_id}");
    let out = aws
        .ec2
        .create_instance_connect_endpoint()
        .subnet_id(subnet_id)
        .security_group_ids(group_id)
        .preserve_client_ip(false)
        .client_token(token)
        .tag_specifications(tag_spec(ResourceType::InstanceConnectEndpoint, &endpoint_tags()))
        .send()
        .await
        .doing(doing())?;
    out.instance_connect_endpoint()
        .and_then(Endpoint::from_sdk)
        .ok_or_else(|| AwsError::missing(doing(), "an endpoint"))
}

/// Polls until the endpoint is `create-complete` (or failed, or `timeout` passes), calling
/// `progress(state, elapsed)` on each answer.
pub async fn wait_ready(
    aws: &Aws,
    endpoint: &Endpoint,
    timeout: Duration,
    progress: &(dyn Fn(&str, Duration) + Sync),
) -> Result<Endpoint, WaitError> {
    let started = Instant::now();
    loop {
        let current = endpoints(aws, Some(&endpoint.vpc_id)).await?.into_iter().find(|e| e.id == endpoint.id);
        let state = current.as_ref().map(|e| e.state.clone()).unwrap_or_else(|| "not visible yet".into());
        progress(&state, started.elapsed());
        match current {
            Some(e) if e.ready() => return Ok(e),
            Some(e) if e.state == State::CreateFailed.as_str() => return Err(WaitError::Failed(e.id)),
            _ if started.elapsed() >= timeout => return Err(WaitError::TimedOut(endpoint.id.clone(), state)),
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("{0}")]
    Aws(#[from] AwsError),
    #[error(
        "endpoint {0} failed to create (create-failed): delete it with `ephemeral-admin cleanup --purge` and run `ephemeral-admin setup eice` again"
    )]
    Failed(String),
    #[error("endpoint {0} is still {1}: run `ephemeral-admin setup eice` again later to wait for it")]
    TimedOut(String, String),
}

/// Deletes one endpoint; one already gone counts as deleted.
pub async fn delete(aws: &Aws, endpoint_id: &str) -> Result<(), AwsError> {
    match aws.ec2.delete_instance_connect_endpoint().instance_connect_endpoint_id(endpoint_id).send().await {
        Ok(_) => Ok(()),
        Err(e) if code_of(&e) == Some("InvalidInstanceConnectEndpointId.NotFound") => Ok(()),
        Err(e) => Err(AwsError::new(format!("deleting EC2 Instance Connect Endpoint {endpoint_id}"), e)),
    }
}

/// Opens TCP 22 in a session's group from the endpoint's group, tagged with the session's tags.
pub async fn admit_endpoint(
    aws: &Aws,
    group_id: &str,
    endpoint_group: &str,
    ports: &[u16],
    session_id: &str,
    session_tags: &[(String, String)],
) -> Result<Vec<String>, AwsError> {
    let doing = || format!("opening SSH from the EICE group {endpoint_group}");
    let pair = UserIdGroupPair::builder()
        .group_id(endpoint_group)
        .description(format!("ephemeral-admin session {session_id} via EICE"))
        .build();
    let permissions = ports.iter().map(|port| {
        IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(i32::from(*port))
            .to_port(i32::from(*port))
            .user_id_group_pairs(pair.clone())
            .build()
    });
    let out = aws
        .ec2
        .authorize_security_group_ingress()
        .group_id(group_id)
        .set_ip_permissions(Some(permissions.collect()))
        .tag_specifications(tag_spec(ResourceType::SecurityGroupRule, session_tags))
        .send()
        .await
        .doing(doing())?;
    let ids: Vec<String> = out
        .security_group_rules()
        .iter()
        .filter_map(|r| r.security_group_rule_id())
        .map(str::to_string)
        .collect();
    if ids.len() < ports.len() {
        return Err(AwsError::missing(doing(), "a security group rule id for every port"));
    }
    Ok(ids)
}

/// Deletes the endpoint's group (AWS refuses while the endpoint's interface still holds it).
pub async fn delete_group(aws: &Aws, group_id: &str) -> Result<network::GroupDeletion, AwsError> {
    network::delete_security_group(aws, group_id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(id: &str, subnet: &str, state: &str, ours: bool) -> Endpoint {
        Endpoint {
            id: id.into(),
            dns_name: Some(format!("{id}.example")),
            vpc_id: "vpc-1".into(),
            subnet_id: Some(subnet.into()),
            state: state.into(),
            security_group_ids: vec![],
            ours,
        }
    }

    #[test]
    fn a_ready_endpoint_in_the_same_subnet_wins() {
        let found = vec![
            endpoint("eice-a", "subnet-1", "create-complete", true),
            endpoint("eice-b", "subnet-2", "create-complete", false),
            endpoint("eice-c", "subnet-2", "create-in-progress", true),
        ];
        assert_eq!(pick(found.clone(), Some("subnet-2")).unwrap().id, "eice-b");
        assert_eq!(pick(found.clone(), None).unwrap().id, "eice-a");
        assert_eq!(pick(found[2..].to_vec(), None), None);
    }

    #[test]
    fn an_endpoint_aws_gave_no_dns_name_is_never_dialled() {
        let mut nameless = endpoint("eice-a", "subnet-1", "create-complete", true);
        nameless.dns_name = None;
        assert!(!nameless.ready());
        assert_eq!(pick(vec![nameless], Some("subnet-1")), None);
    }
}

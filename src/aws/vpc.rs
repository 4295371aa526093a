//! Which network the box joins: the configured subnet (its VPC follows) or the default VPC, and
//! the extra existing security groups it is attached to. Everything here only reads, and it is
//! all decided before anything is created, so a wrong subnet or group is bad input (exit 2).
//!
//! A subnet is public when its route table (its own association, else its VPC's main table) sends
//! 0.0.0.0/0 to an internet gateway: only there can a public IP reach the box. A box in a
//! private subnet gets no public IP and is reached by `private-ip`, `proxy-command` or `ssm`.

use std::collections::BTreeMap;

use aws_sdk_ec2::types::{Filter, RouteTable};

use super::network::{self, NetworkError};
use super::{Aws, AwsError, AwsResultExt, code_of};
use crate::cli::ConnectMode;

/// One subnet, as the launch and the no-default-VPC listing need it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SubnetInfo {
    pub id: String,
    pub vpc_id: String,
    pub availability_zone: String,
    pub cidr: String,
    /// Its route table sends 0.0.0.0/0 to an internet gateway.
    pub public: bool,
    /// New instances get a public IP by default (`MapPublicIpOnLaunch`).
    pub map_public_ip: bool,
}

impl SubnetInfo {
    /// "subnet-0ab… vpc-0cd… us-east-1a 10.0.1.0/24 public (maps public IPs)".
    pub fn describe(&self) -> String {
        let reach = if self.public { "public" } else { "private" };
        let map = if self.map_public_ip { " (maps public IPs on launch)" } else { "" };
        format!("{} {} {} {} {reach}{map}", self.id, self.vpc_id, self.availability_zone, self.cidr)
    }
}

/// Where the box goes.
#[derive(Debug, Clone)]
pub struct Network {
    /// The VPC its own security group is created in.
    pub vpc_id: String,
    /// The chosen subnet; None = the default VPC (EC2 picks the zone's default subnet).
    pub subnet: Option<SubnetInfo>,
    /// Existing groups attached besides the session's own, all in `vpc_id`.
    pub extra_groups: Vec<String>,
}

impl Network {
    /// The zone every candidate must use, when a subnet fixes it.
    pub fn fixed_zone(&self) -> Option<&str> {
        self.subnet.as_ref().map(|s| s.availability_zone.as_str())
    }

    /// Whether RunInstances asks for a public IP (only meaningful with a subnet): in a public
    /// subnet yes, as the default VPC would; in a private one never (it could not be reached).
    pub fn public_ip(&self) -> bool {
        self.subnet.as_ref().is_none_or(|s| s.public)
    }
}

/// Resolves and checks the network before anything is made: the subnet exists in the region
/// (else the default VPC exists, else the error lists the region's subnets), the extra groups
/// exist in that VPC, and a public-ip connection is not asked of a private subnet.
pub async fn resolve(
    aws: &Aws,
    subnet: Option<&str>,
    extra_groups: &[String],
    connect: ConnectMode,
) -> Result<Network, NetworkError> {
    let (vpc_id, subnet) = match subnet {
        Some(id) => {
            let subnet = subnet_info(aws, id).await?;
            (subnet.vpc_id.clone(), Some(subnet))
        }
        None => match network::default_vpc(aws).await? {
            Some(vpc) => (vpc, None),
            None => {
                let subnets = all_subnets(aws).await?;
                return Err(NetworkError::NoDefaultVpc { region: aws.region.clone(), subnets });
            }
        },
    };
    if let Some(subnet) = subnet.as_ref().filter(|s| !s.public)
        && connect == ConnectMode::PublicIp
    {
        return Err(NetworkError::PrivateSubnet { subnet: subnet.id.clone(), vpc: subnet.vpc_id.clone() });
    }
    check_groups(aws, &vpc_id, extra_groups).await?;
    Ok(Network { vpc_id, subnet, extra_groups: extra_groups.to_vec() })
}

/// The subnet `id`, with whether it is public. `InvalidSubnetID.NotFound`: bad input.
async fn subnet_info(aws: &Aws, id: &str) -> Result<SubnetInfo, NetworkError> {
    let out = match aws.ec2.describe_subnets().subnet_ids(id).send().await {
        Ok(out) => out,
        Err(e) if matches!(code_of(&e), Some("InvalidSubnetID.NotFound" | "InvalidSubnetID.Malformed")) => {
            return Err(NetworkError::SubnetNotFound { subnet: id.into(), region: aws.region.clone() });
        }
        Err(e) => return Err(AwsError::new(format!("looking up subnet {id}"), e).into()),
    };
    let Some(subnet) = out.subnets().iter().find(|s| s.subnet_id() == Some(id)) else {
        return Err(NetworkError::SubnetNotFound { subnet: id.into(), region: aws.region.clone() });
    };
    let vpc_id =
        subnet.vpc_id().ok_or_else(|| AwsError::missing(format!("looking up subnet {id}"), "a VPC id"))?;
    let tables = route_tables(aws, Some(vpc_id)).await?;
    classify(subnet, &tables)
        .ok_or_else(|| AwsError::missing(format!("looking up subnet {id}"), "a zone and a CIDR").into())
}

/// Every subnet of the region, public ones first, then by VPC and zone.
pub async fn all_subnets(aws: &Aws) -> Result<Vec<SubnetInfo>, AwsError> {
    let mut pages = aws.ec2.describe_subnets().into_paginator().send();
    let mut raw = Vec::new();
    while let Some(page) = pages.next().await {
        raw.extend(page.doing("listing the region's subnets")?.subnets().iter().cloned());
    }
    let tables = route_tables(aws, None).await?;
    let mut subnets: Vec<SubnetInfo> = raw.iter().filter_map(|s| classify(s, &tables)).collect();
    subnets.sort_by(|a, b| {
        (!a.public, &a.vpc_id, &a.availability_zone, &a.id).cmp(&(
            !b.public,
            &b.vpc_id,
            &b.availability_zone,
            &b.id,
        ))
    });
    Ok(subnets)
}

/// The route tables of one VPC, or of the whole region.
async fn route_tables(aws: &Aws, vpc_id: Option<&str>) -> Result<Vec<RouteTable>, AwsError> {
    let mut request = aws.ec2.describe_route_tables();
    if let Some(vpc) = vpc_id {
        request = request.filters(Filter::builder().name("vpc-id").values(vpc).build());
    }
    let mut pages = request.into_paginator().send();
    let mut tables = Vec::new();
    while let Some(page) = pages.next().await {
        tables.extend(page.doing("reading route tables")?.route_tables().iter().cloned());
    }
    Ok(tables)
}

fn classify(subnet: &aws_sdk_ec2::types::Subnet, tables: &[RouteTable]) -> Option<SubnetInfo> {
    let id = subnet.subnet_id()?;
    let vpc_id = subnet.vpc_id()?;
    Some(SubnetInfo {
        id: id.to_string(),
        vpc_id: vpc_id.to_string(),
        availability_zone: subnet.availability_zone()?.to_string(),
        cidr: subnet.cidr_block().unwrap_or("?").to_string(),
        public: is_public(id, vpc_id, tables),
        map_public_ip: subnet.map_public_ip_on_launch() == Some(true),
    })
}

/// The subnet's own route table, else its VPC's main one, routes 0.0.0.0/0 to an internet gateway.
pub fn is_public(subnet_id: &str, vpc_id: &str, tables: &[RouteTable]) -> bool {
    let associated = |t: &&RouteTable| t.associations().iter().any(|a| a.subnet_id() == Some(subnet_id));
    let main = |t: &&RouteTable| {
        t.vpc_id() == Some(vpc_id) && t.associations().iter().any(|a| a.main() == Some(true))
    };
    let table = tables.iter().find(associated).or_else(|| tables.iter().find(main));
    table.is_some_and(|t| {
        t.routes().iter().any(|r| {
            r.destination_cidr_block() == Some("0.0.0.0/0")
                && r.gateway_id().is_some_and(|g| g.starts_with("igw-"))
        })
    })
}

/// Every extra group exists and lives in the box's VPC (EC2 would refuse a mix at RunInstances,
/// after the session's own group exists; here nothing is made yet).
async fn check_groups(aws: &Aws, vpc_id: &str, groups: &[String]) -> Result<(), NetworkError> {
    if groups.is_empty() {
        return Ok(());
    }
    // A filter, not GroupIds: an unknown id is then simply absent, and named in our own error.
    let out = aws
        .ec2
        .describe_security_groups()
        .filters(Filter::builder().name("group-id").set_values(Some(groups.to_vec())).build())
        .send()
        .await
        .doing("looking up the extra security groups")?;
    let found: BTreeMap<&str, Option<&str>> =
        out.security_groups().iter().filter_map(|g| Some((g.group_id()?, g.vpc_id()))).collect();
    for group in groups {
        match found.get(group.as_str()) {
            None => {
                return Err(NetworkError::GroupNotFound { group: group.clone(), region: aws.region.clone() });
            }
            Some(vpc) if *vpc != Some(vpc_id) => {
                return Err(NetworkError::GroupInOtherVpc {
                    group: group.clone(),
                    group_vpc: vpc.unwrap_or("no VPC").to_string(),
                    vpc: vpc_id.to_string(),
                });
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use aws_sdk_ec2::types::{Route, RouteTableAssociation};

    use super::*;

    fn table(vpc: &str, main: bool, subnets: &[&str], gateway: Option<&str>) -> RouteTable {
        let mut t = RouteTable::builder().vpc_id(vpc);
        if main {
            t = t.associations(RouteTableAssociation::builder().main(true).build());
        }
        for s in subnets {
            t = t.associations(RouteTableAssociation::builder().main(false).subnet_id(*s).build());
        }
        t = t.routes(Route::builder().destination_cidr_block("10.0.0.0/16").gateway_id("local").build());
        if let Some(g) = gateway {
            t = t.routes(Route::builder().destination_cidr_block("0.0.0.0/0").gateway_id(g).build());
        }
        t.build()
    }

    #[test]
    fn a_subnet_is_public_by_its_own_table_else_the_main_one() {
        let tables = vec![
            table("vpc-1", true, &[], Some("igw-1")),
            table("vpc-1", false, &["subnet-private"], None),
            table("vpc-1", false, &["subnet-nat"], Some("nat-1")),
            table("vpc-2", true, &[], None),
        ];
        assert!(is_public("subnet-unassociated", "vpc-1", &tables));
        assert!(!is_public("subnet-private", "vpc-1", &tables));
        assert!(!is_public("subnet-nat", "vpc-1", &tables), "a NAT route is not an internet gateway");
        assert!(!is_public("subnet-other", "vpc-2", &tables));
        assert!(!is_public("subnet-x", "vpc-unknown", &tables));
    }
}

//! RunInstances with the fallback chain: cheapest zone first, then the next zone, then the next
//! instance type, then on-demand (if allowed).
//!
//! RunInstances does its own retry classification instead of the SDK's: AWS reports capacity
//! problems as HTTP 500, which standard retry would repeat against the same full zone. Here
//! capacity errors move to the next candidate, throttling, transient failures and lost answers
//! retry the same candidate with backoff (safely: every request of a candidate carries the same
//! idempotency token, so a request whose answer was lost yields its one instance, not a second), an
//! instance profile that EC2 cannot see yet is waited for, and anything else stops at once.

use std::time::{Duration, Instant};

use aws_config::retry::RetryConfig;
use aws_sdk_ec2::error::SdkError;
use aws_sdk_ec2::operation::run_instances::RunInstancesError;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, HttpTokensState, IamInstanceProfileSpecification,
    InstanceInterruptionBehavior, InstanceMarketOptionsRequest, InstanceMetadataEndpointState,
    InstanceMetadataOptionsRequest, InstanceMetadataTagsState, InstanceNetworkInterfaceSpecification,
    InstanceType, MarketType, Placement, ResourceType, ShutdownBehavior, SpotInstanceType, SpotMarketOptions,
    VolumeType,
};

use super::network::tag_spec;
use super::spot::SpotPrice;
use super::{Aws, AwsError, code_of, is_transport_error};
use crate::error::CapacityExhausted;
use crate::settings::{RootVolume, VolumeKind};

/// Spot or on-demand.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Market {
    Spot,
    OnDemand,
}

impl Market {
    pub fn as_str(self) -> &'static str {
        match self {
            Market::Spot => "spot",
            Market::OnDemand => "on-demand",
        }
    }
}

/// One place the box could start.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub instance_type: String,
    /// None lets EC2 pick the zone.
    pub availability_zone: Option<String>,
    pub market: Market,
    /// The spot bid (spot only).
    pub max_price: Option<f64>,
    /// What we expect to pay per hour, for estimates.
    pub expected_price: Option<f64>,
}

impl std::fmt::Display for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.instance_type, self.market.as_str())?;
        if let Some(az) = &self.availability_zone {
            write!(f, " in {az}")?;
        }
        Ok(())
    }
}

/// Which markets the chain may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Markets {
    /// Spot only (`on_demand_fallback = false`).
    SpotOnly,
    /// Spot first, then on-demand (the default).
    SpotThenOnDemand,
    /// On-demand only (`--on-demand`): spot is skipped entirely.
    OnDemandOnly,
}

impl Markets {
    pub fn of(on_demand: bool, on_demand_fallback: bool) -> Markets {
        match (on_demand, on_demand_fallback) {
            (true, _) => Markets::OnDemandOnly,
            (false, true) => Markets::SpotThenOnDemand,
            (false, false) => Markets::SpotOnly,
        }
    }
}

/// The order to try: for each type in preference order, its zones by ascending spot price
/// (skipping zones whose price is already above our bid); then on-demand for each type.
pub fn plan(
    instance_types: &[String],
    prices: &[SpotPrice],
    markets: Markets,
    spot_max_price: impl Fn(&str) -> Option<f64>,
    on_demand_price: impl Fn(&str) -> Option<f64>,
) -> Vec<Candidate> {
    let mut candidates = Vec::new();
    let spot_types = if markets == Markets::OnDemandOnly { &[][..] } else { instance_types };
    for instance_type in spot_types {
        let max_price = spot_max_price(instance_type);
        let mut zones: Vec<&SpotPrice> =
            prices.iter().filter(|p| &p.instance_type == instance_type).collect();
        zones.sort_by(|a, b| {
            a.price.total_cmp(&b.price).then_with(|| a.availability_zone.cmp(&b.availability_zone))
        });
        if zones.is_empty() {
            // No price data: let EC2 choose the zone.
            candidates.push(Candidate {
                instance_type: instance_type.clone(),
                availability_zone: None,
                market: Market::Spot,
                max_price,
                expected_price: None,
            });
        }
        for zone in zones {
            if max_price.is_some_and(|max| zone.price > max) {
                continue;
            }
            candidates.push(Candidate {
                instance_type: instance_type.clone(),
                availability_zone: Some(zone.availability_zone.clone()),
                market: Market::Spot,
                max_price,
                expected_price: Some(zone.price),
            });
        }
    }
    if markets != Markets::SpotOnly {
        for instance_type in instance_types {
            candidates.push(Candidate {
                instance_type: instance_type.clone(),
                availability_zone: None,
                market: Market::OnDemand,
                max_price: None,
                expected_price: on_demand_price(instance_type),
            });
        }
    }
    candidates
}

/// Everything about the box that does not change between candidates.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub session_id: String,
    pub image_id: String,
    pub root_device_name: String,
    pub security_group_id: String,
    /// Existing groups attached besides the session's own.
    pub extra_security_group_ids: Vec<String>,
    /// The subnet to launch into; None = the default VPC's subnet of the zone.
    pub subnet_id: Option<String>,
    /// With a subnet: ask for a public IP (a public subnet) or not (a private one).
    pub associate_public_ip: bool,
    /// None: the box gets no role (boxes reached by SSH use no AWS API).
    pub instance_profile_name: Option<String>,
    pub user_data: String,
    pub tags: Vec<(String, String)>,
    pub root_volume: RootVolume,
}

/// The instance that started.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Launched {
    pub instance_id: String,
    pub instance_type: String,
    pub availability_zone: Option<String>,
    pub market: Market,
    pub price_per_hour: Option<f64>,
    pub spot_request_id: Option<String>,
    /// RunInstances calls made, including retries.
    pub attempts: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Capacity(#[from] CapacityExhausted),
    /// Not transparent: the AWS error stays a node of the chain, where `exit_codes::report` finds it.
    #[error("{0}")]
    Aws(#[from] AwsError),
}

/// Progress reports, one line each.
#[derive(Debug, Clone)]
pub enum LaunchEvent<'a> {
    Trying(&'a Candidate),
    NoCapacity { candidate: &'a Candidate, code: &'a str },
    Retrying { candidate: &'a Candidate, why: &'a str, after: Duration },
}

/// Capacity problems: move on to the next candidate.
const CAPACITY_CODES: &[&str] = &[
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "InsufficientHostCapacity",
    "SpotMaxPriceTooLow",
    "MaxSpotInstanceCountExceeded",
    "Unsupported",
    "capacity-not-available",
];

/// Throttling and transient server trouble: retry the same candidate.
const TRANSIENT_CODES: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "Unavailable",
];

const MAX_TRANSIENT_RETRIES: u32 = 6;
/// How long to keep retrying an instance profile EC2 cannot see yet (IAM propagation).
const PROFILE_PROPAGATION: Duration = Duration::from_secs(30);

/// Is this EC2's "the instance profile is not visible (yet)" answer? EC2 gives it no code of its
/// own: it is `InvalidParameterValue` with "Value (NAME) for parameter iamInstanceProfile.name is
/// invalid. Invalid IAM Instance Profile name", and the same code means any other bad parameter
/// (which no wait can fix). So, and only here, the message decides: it must name the instance
/// profile. Who created the profile does not matter: another launch may have made it seconds ago,
/// and GetInstanceProfile (IAM) seeing it says nothing about EC2 seeing it.
fn is_profile_not_visible(error: &SdkError<RunInstancesError>) -> bool {
    use aws_sdk_ec2::error::ProvideErrorMetadata;
    let Some(service_error) = error.as_service_error() else { return false };
    let message = service_error.message().unwrap_or_default().to_ascii_lowercase();
    service_error.code() == Some("InvalidParameterValue")
        && (message.contains("iaminstanceprofile") || message.contains("iam instance profile"))
}

enum Outcome {
    Capacity(String),
    Transient(String),
    ProfileNotReady,
    Fatal,
}

fn classify(error: &SdkError<RunInstancesError>, started: Instant) -> Outcome {
    if is_transport_error(error) {
        return Outcome::Transient("no answer from EC2".into());
    }
    match code_of(error) {
        Some(code) if CAPACITY_CODES.contains(&code) => Outcome::Capacity(code.to_string()),
        Some(code) if TRANSIENT_CODES.contains(&code) => Outcome::Transient(code.to_string()),
        // An instance profile EC2 cannot see yet: waited for, for a bounded time.
        Some(_) if is_profile_not_visible(error) && started.elapsed() < PROFILE_PROPAGATION => {
            Outcome::ProfileNotReady
        }
        None if matches!(error, SdkError::ServiceError(e) if e.raw().status().is_server_error()) => {
            Outcome::Transient("server error".into())
        }
        _ => Outcome::Fatal,
    }
}

/// Tries each candidate in order until one starts.
pub async fn run_first_available(
    aws: &Aws,
    spec: &LaunchSpec,
    candidates: &[Candidate],
    on_event: &(dyn Fn(LaunchEvent) + Sync),
) -> Result<Launched, LaunchError> {
    let started = Instant::now();
    let mut tried: Vec<(&Candidate, String)> = Vec::new();
    let mut attempts = 0;
    let mut spot_quota_reached = false;
    for (index, candidate) in candidates.iter().enumerate() {
        if spot_quota_reached && candidate.market == Market::Spot {
            continue;
        }
        on_event(LaunchEvent::Trying(candidate));
        let token = format!("ea-{}-{index}", spec.session_id);
        let mut transient_retries = 0;
        loop {
            attempts += 1;
            let result = request(aws, spec, candidate, &token).send().await;
            let error = match result {
                Ok(out) => {
                    let instance = out.instances().first();
                    let Some(instance_id) = instance.and_then(|i| i.instance_id()) else {
                        return Err(AwsError::missing(format!("launching {candidate}"), "instance id").into());
                    };
                    return Ok(Launched {
                        instance_id: instance_id.to_string(),
                        instance_type: candidate.instance_type.clone(),
                        availability_zone: instance
                            .and_then(|i| i.placement())
                            .and_then(|p| p.availability_zone())
                            .map(str::to_string)
                            .or_else(|| candidate.availability_zone.clone()),
                        market: candidate.market,
                        price_per_hour: candidate.expected_price,
                        spot_request_id: instance
                            .and_then(|i| i.spot_instance_request_id())
                            .map(str::to_string),
                        attempts,
                    });
                }
                Err(error) => error,
            };
            match classify(&error, started) {
                Outcome::Capacity(code) => {
                    on_event(LaunchEvent::NoCapacity { candidate, code: &code });
                    if code == "MaxSpotInstanceCountExceeded" {
                        spot_quota_reached = true;
                    }
                    tried.push((candidate, code));
                    break;
                }
                Outcome::Transient(why) if transient_retries < MAX_TRANSIENT_RETRIES => {
                    let after = backoff(transient_retries);
                    transient_retries += 1;
                    on_event(LaunchEvent::Retrying { candidate, why: &why, after });
                    tokio::time::sleep(after).await;
                }
                Outcome::ProfileNotReady => {
                    let after = Duration::from_secs(2);
                    on_event(LaunchEvent::Retrying {
                        candidate,
                        why: "instance profile not visible to EC2 yet",
                        after,
                    });
                    tokio::time::sleep(after).await;
                }
                Outcome::Transient(_) | Outcome::Fatal => {
                    return Err(AwsError::new(format!("launching {candidate}"), error).into());
                }
            }
        }
    }
    Err(CapacityExhausted { tried: summarize(&tried) }.into())
}

/// "t3.small spot in us-east-1c, us-east-1a (InsufficientInstanceCapacity); t3.small on-demand (…)":
/// consecutive zones of one type, market and error read as one item.
fn summarize(tried: &[(&Candidate, String)]) -> String {
    if tried.is_empty() {
        return "nothing (no candidates)".into();
    }
    let mut items: Vec<(String, Vec<String>, String)> = Vec::new();
    for (candidate, code) in tried {
        let head = format!("{} {}", candidate.instance_type, candidate.market.as_str());
        let zone = candidate.availability_zone.clone();
        match items.last_mut() {
            Some((last_head, zones, last_code)) if *last_head == head && last_code == code => {
                zones.extend(zone)
            }
            _ => items.push((head, zone.into_iter().collect(), code.clone())),
        }
    }
    items
        .into_iter()
        .map(|(head, zones, code)| match zones.is_empty() {
            true => format!("{head} ({code})"),
            false => format!("{head} in {} ({code})", zones.join(", ")),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// 200 ms, 400 ms, 800 ms … capped at 3 s.
fn backoff(retry: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << retry.min(4))).min(Duration::from_secs(3))
}

fn request(
    aws: &Aws,
    spec: &LaunchSpec,
    candidate: &Candidate,
    token: &str,
) -> aws_sdk_ec2::client::customize::CustomizableOperation<
    aws_sdk_ec2::operation::run_instances::RunInstancesOutput,
    RunInstancesError,
    aws_sdk_ec2::operation::run_instances::builders::RunInstancesFluentBuilder,
> {
    let mut builder = aws
        .ec2
        .run_instances()
        .client_token(token)
        .image_id(&spec.image_id)
        .instance_type(InstanceType::from(candidate.instance_type.as_str()))
        .min_count(1)
        .max_count(1)
        .set_iam_instance_profile(
            spec.instance_profile_name
                .as_ref()
                .map(|name| IamInstanceProfileSpecification::builder().name(name).build()),
        )
        .user_data(&spec.user_data)
        .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
        .metadata_options(
            InstanceMetadataOptionsRequest::builder()
                .http_endpoint(InstanceMetadataEndpointState::Enabled)
                .http_tokens(HttpTokensState::Required)
                .http_put_response_hop_limit(1)
                .instance_metadata_tags(InstanceMetadataTagsState::Enabled)
                .build(),
        )
        .block_device_mappings(
            BlockDeviceMapping::builder()
                .device_name(&spec.root_device_name)
                .ebs(
                    EbsBlockDevice::builder()
                        .volume_type(match spec.root_volume.kind {
                            VolumeKind::Gp3 => VolumeType::Gp3,
                            VolumeKind::Gp2 => VolumeType::Gp2,
                        })
                        .volume_size(i32::try_from(spec.root_volume.gb).unwrap_or(i32::MAX))
                        .encrypted(true)
                        .delete_on_termination(true)
                        .build(),
                )
                .build(),
        )
        .tag_specifications(tag_spec(ResourceType::Instance, &spec.tags))
        .tag_specifications(tag_spec(ResourceType::Volume, &spec.tags));
    let groups = std::iter::once(&spec.security_group_id).chain(&spec.extra_security_group_ids).cloned();
    builder = match &spec.subnet_id {
        // In a chosen subnet the network interface says whether the box gets a public IP: never
        // in a private subnet, whatever the subnet's MapPublicIpOnLaunch says. In the default
        // VPC it says so only when there must be none (`eice`): the zone's default subnet.
        subnet if subnet.is_some() || !spec.associate_public_ip => builder.network_interfaces(
            InstanceNetworkInterfaceSpecification::builder()
                .device_index(0)
                .set_subnet_id(subnet.clone())
                .set_groups(Some(groups.collect()))
                .associate_public_ip_address(spec.associate_public_ip)
                .delete_on_termination(true)
                .build(),
        ),
        _ => builder.set_security_group_ids(Some(groups.collect())),
    };
    if let Some(az) = &candidate.availability_zone {
        builder = builder.placement(Placement::builder().availability_zone(az).build());
    }
    if candidate.market == Market::Spot {
        builder = builder
            .instance_market_options(
                InstanceMarketOptionsRequest::builder()
                    .market_type(MarketType::Spot)
                    .spot_options(
                        SpotMarketOptions::builder()
                            .spot_instance_type(SpotInstanceType::OneTime)
                            .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate)
                            .set_max_price(candidate.max_price.map(format_price))
                            .build(),
                    )
                    .build(),
            )
            .tag_specifications(tag_spec(ResourceType::SpotInstancesRequest, &spec.tags));
    }
    // Our own classification above replaces the SDK's retries for this one call.
    builder
        .customize()
        .config_override(aws_sdk_ec2::config::Builder::default().retry_config(RetryConfig::disabled()))
}

/// A price as AWS expects it: plain decimal, no trailing zeros.
pub fn format_price(price: f64) -> String {
    let text = format!("{price:.5}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(t: &str, az: &str, p: f64) -> SpotPrice {
        SpotPrice { instance_type: t.into(), availability_zone: az.into(), price: p, timestamp: None }
    }

    #[test]
    fn plan_orders_zones_by_price_then_types_then_on_demand() {
        let prices = vec![
            price("t3.small", "us-east-1a", 0.0067),
            price("t3.small", "us-east-1c", 0.0058),
            price("t3.small", "us-east-1d", 0.0200), // above the bid: skipped
            price("t3.micro", "us-east-1b", 0.0035),
        ];
        let types = vec!["t3.small".to_string(), "t3.micro".to_string()];
        let bid = |t: &str| Some(if t == "t3.small" { 0.0104 } else { 0.0052 });
        let od = |t: &str| Some(if t == "t3.small" { 0.0208 } else { 0.0104 });
        let plan = plan(&types, &prices, Markets::SpotThenOnDemand, bid, od);
        let shown: Vec<String> = plan.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            shown,
            [
                "t3.small spot in us-east-1c",
                "t3.small spot in us-east-1a",
                "t3.micro spot in us-east-1b",
                "t3.small on-demand",
                "t3.micro on-demand"
            ]
        );
        assert_eq!(plan[0].max_price, Some(0.0104));
        assert_eq!(plan[3].expected_price, Some(0.0208));
        assert!(
            super::plan(&types, &prices, Markets::SpotOnly, bid, od).iter().all(|c| c.market == Market::Spot)
        );
        let on_demand: Vec<String> = super::plan(&types, &prices, Markets::OnDemandOnly, bid, od)
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(on_demand, ["t3.small on-demand", "t3.micro on-demand"]);
    }

    #[test]
    fn prices_print_plainly() {
        assert_eq!(format_price(0.0104), "0.0104");
        assert_eq!(format_price(0.1), "0.1");
        assert_eq!(format_price(0.000015), "0.00002");
    }
}

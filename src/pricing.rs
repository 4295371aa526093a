//! Money: the shipped on-demand price table, the spot max price, and session cost estimates.
//!
//! A session costs compute (spot or on-demand price per hour), its public IPv4 address, and its
//! root volume, for as long as it runs. Estimates assume the session runs to its deadline. A box
//! reached through an EC2 Instance Connect Endpoint (`connect = "eice"`) has no public IPv4
//! address, so no IPv4 charge.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use serde::Deserialize;

use crate::settings::{RootVolume, Settings, VolumeKind};

/// AWS charges for every public IPv4 address, in use or not (since 2024-02).
pub const PUBLIC_IPV4_PER_HOUR: f64 = 0.005;
/// gp3 storage, USD per GB-month (us-east-1; other regions differ by cents).
pub const GP3_PER_GB_MONTH: f64 = 0.08;
/// gp2 storage, USD per GB-month (us-east-1).
pub const GP2_PER_GB_MONTH: f64 = 0.10;
const HOURS_PER_MONTH: f64 = 730.0;

#[derive(Debug, Deserialize)]
struct Table {
    as_of: String,
    prices: BTreeMap<String, BTreeMap<String, f64>>,
}

fn shipped() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        toml::from_str(include_str!("../data/on-demand-prices.toml")).expect("the shipped price table parses")
    })
}

/// When the shipped table was taken from AWS's price pages.
pub fn table_date() -> &'static str {
    &shipped().as_of
}

/// On-demand USD/hour of a type in a region: the config's override, else the shipped table.
pub fn on_demand_price(settings: &Settings, region: &str, instance_type: &str) -> Option<f64> {
    settings
        .on_demand_prices
        .get(region)
        .and_then(|types| types.get(instance_type))
        .or_else(|| shipped().prices.get(region).and_then(|types| types.get(instance_type)))
        .copied()
}

/// The most we bid for spot: `spot_price_ratio` × on-demand, rounded up to a tenth of a cent's
/// hundredth so the string AWS sees is short and never below the ratio.
pub fn spot_max_price(settings: &Settings, region: &str, instance_type: &str) -> Option<f64> {
    on_demand_price(settings, region, instance_type)
        .map(|od| (od * settings.spot_price_ratio * 100_000.0).ceil() / 100_000.0)
}

impl Estimate {
    /// Each amount as `output::usd` shows it, for results a person or a script reads.
    pub fn rounded(self) -> Estimate {
        let r = crate::output::round_money;
        Estimate { compute: r(self.compute), ipv4: r(self.ipv4), ebs: r(self.ebs), total: r(self.total) }
    }
}

/// The cost of running one box for `runtime` at `compute_per_hour`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Estimate {
    // Full precision: the ledger keeps these. Shown to people through `Estimate::rounded`.
    pub compute: f64,
    pub ipv4: f64,
    pub ebs: f64,
    pub total: f64,
}

/// USD per GB-month of a root volume type.
pub fn per_gb_month(kind: VolumeKind) -> f64 {
    match kind {
        VolumeKind::Gp3 => GP3_PER_GB_MONTH,
        VolumeKind::Gp2 => GP2_PER_GB_MONTH,
    }
}

/// The cost of running one box with `volume` as its root volume for `runtime` at `compute_per_hour`.
pub fn estimate(compute_per_hour: f64, runtime: Duration, volume: RootVolume) -> Estimate {
    estimate_with(compute_per_hour, runtime, volume, true)
}

/// [`estimate`], for a box with or without a public IPv4 address.
pub fn estimate_with(
    compute_per_hour: f64,
    runtime: Duration,
    volume: RootVolume,
    public_ipv4: bool,
) -> Estimate {
    let hours = runtime.as_secs_f64() / 3600.0;
    let compute = compute_per_hour * hours;
    let ipv4 = if public_ipv4 { PUBLIC_IPV4_PER_HOUR * hours } else { 0.0 };
    let ebs = f64::from(volume.gb) * per_gb_month(volume.kind) / HOURS_PER_MONTH * hours;
    Estimate { compute, ipv4, ebs, total: compute + ipv4 + ebs }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_hours_of_t3_small_spot_fit_the_session_target() {
        let e = estimate(0.0065, Duration::from_secs(4 * 3600), RootVolume::default());
        assert!((e.compute - 0.026).abs() < 1e-9);
        assert!((e.ipv4 - 0.02).abs() < 1e-9);
        assert!((e.ebs - 8.0 * 0.08 / 730.0 * 4.0).abs() < 1e-9);
        assert!(e.total < 0.33);
    }

    #[test]
    fn a_box_without_a_public_address_pays_no_ipv4() {
        let e = estimate_with(0.0065, Duration::from_secs(4 * 3600), RootVolume::default(), false);
        assert_eq!(e.ipv4, 0.0);
        assert!((e.total - e.compute - e.ebs).abs() < 1e-12);
    }

    #[test]
    fn the_estimate_grows_with_the_volume_and_its_type() {
        let four_hours = Duration::from_secs(4 * 3600);
        let big = estimate(0.0065, four_hours, RootVolume { gb: 100, kind: VolumeKind::Gp2 });
        assert!((big.ebs - 100.0 * 0.10 / 730.0 * 4.0).abs() < 1e-9);
        assert!(big.total > estimate(0.0065, four_hours, RootVolume::default()).total);
    }

    #[test]
    fn shipped_table_covers_the_defaults() {
        assert_eq!(shipped().prices["us-east-1"]["t3.small"], 0.0208);
        assert!(!table_date().is_empty());
    }
}

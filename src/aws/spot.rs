//! Current spot prices per availability zone, from EC2's spot price history.

use std::collections::BTreeMap;

use aws_sdk_ec2::types::InstanceType;

use super::{Aws, AwsError, AwsResultExt};

/// The newest spot price of one instance type in one zone.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SpotPrice {
    pub instance_type: String,
    pub availability_zone: String,
    /// USD per hour.
    pub price: f64,
    pub timestamp: Option<String>,
}

/// The current Linux spot price of each type in every zone of the region, cheapest first.
///
/// With `StartTime` = now, EC2 returns the price in effect now for each zone, so one page
/// normally holds the answer; later pages are followed in case it does not.
/// With `zone`, only that zone's prices are asked for (a chosen subnet fixes the zone).
pub async fn current_prices(
    aws: &Aws,
    instance_types: &[String],
    zone: Option<&str>,
) -> Result<Vec<SpotPrice>, AwsError> {
    let now = aws_smithy_types::DateTime::from(std::time::SystemTime::now());
    let mut newest: BTreeMap<(String, String), SpotPrice> = BTreeMap::new();
    let mut pages = aws
        .ec2
        .describe_spot_price_history()
        .set_instance_types(Some(instance_types.iter().map(|t| InstanceType::from(t.as_str())).collect()))
        .product_descriptions("Linux/UNIX")
        .start_time(now)
        .set_availability_zone(zone.map(str::to_string))
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.doing("reading spot prices")?;
        for entry in page.spot_price_history() {
            let (Some(t), Some(az), Some(price)) =
                (entry.instance_type(), entry.availability_zone(), entry.spot_price())
            else {
                continue;
            };
            let Ok(price) = price.parse::<f64>() else { continue };
            let timestamp = entry.timestamp().map(|t| t.to_string());
            let key = (t.as_str().to_string(), az.to_string());
            let newer = newest.get(&key).is_none_or(|old| timestamp > old.timestamp);
            if newer {
                newest.insert(
                    key,
                    SpotPrice {
                        instance_type: t.as_str().into(),
                        availability_zone: az.into(),
                        price,
                        timestamp,
                    },
                );
            }
        }
    }
    let mut prices: Vec<SpotPrice> = newest.into_values().collect();
    sort_cheapest_first(&mut prices);
    Ok(prices)
}

/// Cheapest first; ties broken by zone name so the order is stable.
pub fn sort_cheapest_first(prices: &mut [SpotPrice]) {
    prices.sort_by(|a, b| {
        a.price
            .total_cmp(&b.price)
            .then_with(|| a.availability_zone.cmp(&b.availability_zone))
            .then_with(|| a.instance_type.cmp(&b.instance_type))
    });
}

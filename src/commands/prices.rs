//! `prices`: the current spot price of each candidate type in every zone, cheapest first, with
//! what a session of `max_runtime` would cost there.

use anyhow::Result;
use serde::Serialize;

use super::Context;
use crate::aws::spot;
use crate::error::ExitStatus;
use crate::output::{short_duration, table, usd};
use crate::pricing;

#[derive(Serialize)]
struct PriceRow {
    instance_type: String,
    availability_zone: String,
    spot_price: f64,
    on_demand_price: Option<f64>,
    /// Spot price as a fraction of on-demand.
    savings: Option<f64>,
    session_estimate: pricing::Estimate,
}

#[derive(Serialize)]
struct PricesReport {
    region: String,
    max_runtime_seconds: u64,
    prices: Vec<PriceRow>,
}

pub async fn run(ctx: &Context) -> Result<ExitStatus> {
    let s = &ctx.settings;
    let aws = ctx.aws().await?;
    let prices = spot::current_prices(&aws, &s.instance_types, None).await?;
    if prices.is_empty() {
        anyhow::bail!(
            "no spot prices for {} in {}: these types may not be offered here; try other --instance-type values",
            s.instance_types.join(", "),
            aws.region
        );
    }
    let rows: Vec<PriceRow> = prices
        .into_iter()
        .map(|p| {
            let on_demand = pricing::on_demand_price(s, &aws.region, &p.instance_type);
            PriceRow {
                session_estimate: pricing::estimate_with(
                    p.price,
                    s.max_runtime,
                    s.root_volume,
                    s.connect != crate::cli::ConnectMode::Eice,
                ),
                savings: on_demand.map(|od| 1.0 - p.price / od),
                on_demand_price: on_demand,
                spot_price: p.price,
                availability_zone: p.availability_zone,
                instance_type: p.instance_type,
            }
        })
        .collect();
    let report = PricesReport {
        region: aws.region.clone(),
        max_runtime_seconds: s.max_runtime.as_secs(),
        prices: rows,
    };
    ctx.printer.result(&report, || {
        let rows: Vec<Vec<String>> = report
            .prices
            .iter()
            .map(|r| {
                vec![
                    r.instance_type.clone(),
                    r.availability_zone.clone(),
                    format!("{}/h", usd(r.spot_price)),
                    r.on_demand_price.map(|p| format!("{}/h", usd(p))).unwrap_or_else(|| "?".into()),
                    r.savings.map(|f| format!("{:.0}%", f * 100.0)).unwrap_or_else(|| "?".into()),
                    usd(r.session_estimate.total),
                ]
            })
            .collect();
        let session = format!("{} SESSION", short_duration(s.max_runtime));
        table(&["TYPE", "ZONE", "SPOT", "ON-DEMAND", "SAVES", &session], &rows)
    });
    Ok(ExitStatus::Success)
}

//! Session metrics in CloudWatch (namespace `EphemeralAdmin`) and the dashboard that shows them.

use aws_sdk_cloudwatch::types::{Dimension, MetricDatum, StandardUnit};
use serde_json::json;

use super::{Aws, AwsError, AwsResultExt};
use crate::ledger::Entry;

pub const NAMESPACE: &str = "EphemeralAdmin";
pub const DASHBOARD_NAME: &str = "ephemeral-admin";
pub const SESSION_DURATION: &str = "SessionDuration";
pub const SESSION_COST: &str = "SessionCost";
pub const TIME_TO_SHELL: &str = "TimeToShell";
pub const LAUNCH_ATTEMPTS: &str = "LaunchAttempts";

/// Publishes one ended session's metrics, with Region, InstanceType and Market dimensions.
pub async fn put_session_metrics(aws: &Aws, entry: &Entry) -> Result<(), AwsError> {
    let dimensions = vec![
        Dimension::builder().name("Region").value(&entry.region).build(),
        Dimension::builder()
            .name("InstanceType")
            .value(entry.instance_type.as_deref().unwrap_or("unknown"))
            .build(),
        Dimension::builder().name("Market").value(entry.market.as_deref().unwrap_or("unknown")).build(),
    ];
    let datum = |name: &str, value: f64, unit: StandardUnit| {
        MetricDatum::builder()
            .metric_name(name)
            .value(value)
            .unit(unit)
            .set_dimensions(Some(dimensions.clone()))
            .build()
    };
    let mut data = vec![
        datum(SESSION_DURATION, entry.duration_seconds as f64, StandardUnit::Seconds),
        datum(SESSION_COST, entry.cost.total, StandardUnit::None),
    ];
    let to_shell = entry.timings_ms.get("first_output").or(entry.timings_ms.get("ssh"));
    if let Some(ms) = to_shell {
        data.push(datum(TIME_TO_SHELL, *ms as f64, StandardUnit::Milliseconds));
    }
    if let Some(attempts) = entry.launch_attempts {
        data.push(datum(LAUNCH_ATTEMPTS, f64::from(attempts), StandardUnit::Count));
    }
    aws.cloudwatch
        .put_metric_data()
        .namespace(NAMESPACE)
        .set_metric_data(Some(data))
        .send()
        .await
        .doing("publishing session metrics")?;
    Ok(())
}

/// The dashboard body: one graph per metric, split by the dimensions.
pub fn dashboard_body(region: &str) -> String {
    let graph = |title: &str, metric: &str, stat: &str, x: u32, y: u32| {
        json!({
            "type": "metric",
            "x": x, "y": y, "width": 12, "height": 6,
            "properties": {
                "title": title,
                "region": region,
                "stat": stat,
                "period": 86400,
                "view": "timeSeries",
                "metrics": [[{
                    "expression": format!(
                        "SEARCH('{{{NAMESPACE},Region,InstanceType,Market}} MetricName=\"{metric}\"', '{stat}', 86400)"
                    ),
                    "id": "e1"
                }]]
            }
        })
    };
    json!({
        "widgets": [
            graph("Session cost (USD per day)", SESSION_COST, "Sum", 0, 0),
            graph("Session duration (s)", SESSION_DURATION, "Average", 12, 0),
            graph("Time to shell (ms)", TIME_TO_SHELL, "Average", 0, 6),
            graph("Launch attempts", LAUNCH_ATTEMPTS, "Sum", 12, 6),
        ]
    })
    .to_string()
}

/// Creates or replaces the dashboard (PutDashboard does both).
pub async fn put_dashboard(aws: &Aws) -> Result<(), AwsError> {
    aws.cloudwatch
        .put_dashboard()
        .dashboard_name(DASHBOARD_NAME)
        .dashboard_body(dashboard_body(&aws.region))
        .send()
        .await
        .doing("creating the dashboard")?;
    Ok(())
}

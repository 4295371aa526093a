//! An AWS Budgets monthly cost budget for the tool's resources, with e-mail alerts at 80% and
//! 100% of actual spend. AWS Budgets lives in us-east-1 for every account.

use aws_sdk_budgets::types::{
    Budget, BudgetType, ComparisonOperator, Expression, MatchOption, Notification, NotificationType,
    NotificationWithSubscribers, Spend, Subscriber, SubscriptionType, TagValues, ThresholdType, TimeUnit,
};

use super::{Aws, AwsError, AwsResultExt, code_of};
use crate::session::tags;

pub const BUDGET_NAME: &str = "ephemeral-admin-monthly";
pub const ALERT_PERCENTAGES: [f64; 2] = [80.0, 100.0];

/// What `budget` set up.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BudgetReport {
    pub budget_name: String,
    pub limit_usd: f64,
    pub email: String,
    pub created: bool,
    pub alerts_added: Vec<f64>,
    /// The filter: only costs tagged Project=EphemeralContainer (a cost allocation tag).
    pub cost_filter: String,
}

/// Cost allocation tags appear in billing as `user:<key>`.
fn cost_filter() -> String {
    format!("user:{}={}", tags::PROJECT, tags::PROJECT_VALUE)
}

fn budget(limit: f64) -> Budget {
    Budget::builder()
        .budget_name(BUDGET_NAME)
        .budget_type(BudgetType::Cost)
        .time_unit(TimeUnit::Monthly)
        .budget_limit(
            Spend::builder().amount(format!("{limit:.2}")).unit("USD").build().expect("amount and unit"),
        )
        .filter_expression(
            Expression::builder()
                .tags(
                    TagValues::builder()
                        .key(format!("user:{}", tags::PROJECT))
                        .values(tags::PROJECT_VALUE)
                        .match_options(MatchOption::Equals)
                        .build(),
                )
                .build(),
        )
        .build()
        .expect("name, type and time unit are set")
}

fn notification(percent: f64) -> Notification {
    Notification::builder()
        .notification_type(NotificationType::Actual)
        .comparison_operator(ComparisonOperator::GreaterThan)
        .threshold(percent)
        .threshold_type(ThresholdType::Percentage)
        .build()
        .expect("type, operator and threshold are set")
}

fn subscriber(email: &str) -> Subscriber {
    Subscriber::builder()
        .subscription_type(SubscriptionType::Email)
        .address(email)
        .build()
        .expect("type and address are set")
}

/// Creates the budget, or updates its limit and adds any missing alert.
pub async fn ensure(aws: &Aws, account_id: &str, limit: f64, email: &str) -> Result<BudgetReport, AwsError> {
    let existing = aws.budgets.describe_budget().account_id(account_id).budget_name(BUDGET_NAME).send().await;
    let mut report = BudgetReport {
        budget_name: BUDGET_NAME.into(),
        limit_usd: limit,
        email: email.into(),
        created: false,
        alerts_added: Vec::new(),
        cost_filter: cost_filter(),
    };
    match existing {
        Err(e) if code_of(&e) == Some("NotFoundException") => {
            let mut create = aws.budgets.create_budget().account_id(account_id).budget(budget(limit));
            for percent in ALERT_PERCENTAGES {
                create = create.notifications_with_subscribers(
                    NotificationWithSubscribers::builder()
                        .notification(notification(percent))
                        .subscribers(subscriber(email))
                        .build()
                        .expect("notification and subscriber are set"),
                );
            }
            create.send().await.doing("creating the monthly budget")?;
            report.created = true;
            report.alerts_added = ALERT_PERCENTAGES.to_vec();
            return Ok(report);
        }
        Err(e) => return Err(AwsError::new("looking up the monthly budget", e)),
        Ok(_) => {}
    }
    aws.budgets
        .update_budget()
        .account_id(account_id)
        .new_budget(budget(limit))
        .send()
        .await
        .doing("updating the monthly budget")?;
    let current = aws
        .budgets
        .describe_notifications_for_budget()
        .account_id(account_id)
        .budget_name(BUDGET_NAME)
        .send()
        .await
        .doing("reading the budget's alerts")?;
    for percent in ALERT_PERCENTAGES {
        let present = current.notifications().iter().any(|n| (n.threshold() - percent).abs() < 1e-9);
        if !present {
            aws.budgets
                .create_notification()
                .account_id(account_id)
                .budget_name(BUDGET_NAME)
                .notification(notification(percent))
                .subscribers(subscriber(email))
                .send()
                .await
                .doing("adding a budget alert")?;
            report.alerts_added.push(percent);
        }
    }
    Ok(report)
}

//! The AWS side: one place builds the SDK configuration; each concern is a thin module below
//! with intention-revealing functions that return our own types.
//!
//! Errors are classified by their typed AWS error code ([`code_of`]), never by message text, and
//! turned into one actionable line by [`AwsError`].

pub mod alarm;
pub mod ami;
pub mod budgets;
pub mod iam;

pub mod identity;
pub mod instances;
pub mod launch;
pub mod logs;
pub mod metrics;

pub mod network;
pub mod permissions;
pub mod spot;

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_types::error::display::DisplayErrorContext;

use crate::error::UsageError;
use crate::settings::AwsSettings;

/// Attempts for ordinary calls (the SDK's standard mode: throttling, 5xx and transient network
/// errors back off and retry). RunInstances classifies its own errors; see [`launch`].
const MAX_ATTEMPTS: u32 = 5;

/// Every client a command may need, built from one `SdkConfig`.
#[derive(Clone, Debug)]
pub struct Aws {
    pub region: String,
    pub config: SdkConfig,
    pub ec2: aws_sdk_ec2::Client,
    pub iam: aws_sdk_iam::Client,
    pub sts: aws_sdk_sts::Client,
    pub ssm: aws_sdk_ssm::Client,
    pub cloudwatch: aws_sdk_cloudwatch::Client,
    pub logs: aws_sdk_cloudwatchlogs::Client,
    pub budgets: aws_sdk_budgets::Client,
}

impl Aws {
    /// Loads credentials, region and endpoint through the SDK's usual chain, with our overrides.
    /// Reads local files only; makes no network call.
    pub async fn connect(settings: &AwsSettings) -> Result<Aws, UsageError> {
        let config = load_sdk_config(settings, settings.region.clone()).await;
        let region = config.region().map(|r| r.to_string()).ok_or_else(|| {
            UsageError::new("no AWS region: pass --region, set `region` in the config, or export AWS_REGION")
        })?;
        Ok(Aws::from_config(config, region))
    }

    /// The same account and endpoint in another region (for `cleanup --all-regions`).
    pub async fn in_region(&self, settings: &AwsSettings, region: &str) -> Aws {
        let config = load_sdk_config(settings, Some(region.to_string())).await;
        Aws::from_config(config, region.to_string())
    }

    fn from_config(config: SdkConfig, region: String) -> Aws {
        Aws {
            region,
            ec2: aws_sdk_ec2::Client::new(&config),
            iam: aws_sdk_iam::Client::new(&config),
            sts: aws_sdk_sts::Client::new(&config),
            ssm: aws_sdk_ssm::Client::new(&config),
            cloudwatch: aws_sdk_cloudwatch::Client::new(&config),
            logs: aws_sdk_cloudwatchlogs::Client::new(&config),
            // AWS Budgets has one endpoint, in us-east-1, whatever the session's region.
            budgets: aws_sdk_budgets::Client::from_conf(
                aws_sdk_budgets::config::Builder::from(&config).region(Region::new("us-east-1")).build(),
            ),
            config,
        }
    }
}

async fn load_sdk_config(settings: &AwsSettings, region: Option<String>) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(MAX_ATTEMPTS)
                .with_initial_backoff(Duration::from_millis(50)),
        )
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(20))
                .operation_timeout(Duration::from_secs(60))
                .build(),
        );
    if let Some(profile) = &settings.profile {
        loader = loader.profile_name(profile);
    }
    if let Some(region) = region {
        loader = loader.region(Region::new(region));
    }
    if let Some(url) = &settings.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

/// The AWS error code of a failed call, if AWS (or the local cloud) answered with one.
pub fn code_of<E, R>(error: &SdkError<E, R>) -> Option<&str>
where
    E: ProvideErrorMetadata,
{
    match error {
        SdkError::ServiceError(e) => e.err().code(),
        _ => None,
    }
}

/// True when the request never got an answer (connection refused, dropped, timed out).
pub fn is_transport_error<E, R>(error: &SdkError<E, R>) -> bool {
    matches!(error, SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_))
}

/// A failed AWS call, told as what we were doing, what AWS said, and what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("{doing}: {said}{hint}")]
pub struct AwsError {
    pub doing: String,
    pub code: Option<String>,
    said: String,
    hint: String,
}

impl AwsError {
    pub fn new<E, R>(doing: impl Into<String>, error: SdkError<E, R>) -> AwsError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        let code = code_of(&error).map(str::to_string);
        let said = match &error {
            SdkError::ServiceError(e) => match (e.err().code(), e.err().message()) {
                (Some(code), Some(message)) => format!("{code}: {message}"),
                (Some(code), None) => code.to_string(),
                _ => DisplayErrorContext(&error).to_string(),
            },
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
                format!("no answer from AWS ({})", DisplayErrorContext(&error))
            }
            _ => DisplayErrorContext(&error).to_string(),
        };
        let hint = hint_for(code.as_deref(), is_transport_error(&error));
        AwsError { doing: doing.into(), code, said, hint: hint.map(|h| format!("; {h}")).unwrap_or_default() }
    }

    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }
}

fn hint_for(code: Option<&str>, transport: bool) -> Option<&'static str> {
    if transport {
        return Some("check your network, or --endpoint-url / AWS_ENDPOINT_URL if you set one");
    }
    match code? {
        "UnauthorizedOperation" | "AccessDenied" | "AccessDeniedException" | "AuthFailure" => {
            Some("your credentials lack a permission: `ephemeral-admin policy` prints the policy to attach")
        }
        "ExpiredToken" | "ExpiredTokenException" | "RequestExpired" => {
            Some("your credentials expired: refresh them (e.g. `aws sso login`) and try again")
        }
        "InvalidClientTokenId" | "UnrecognizedClientException" | "SignatureDoesNotMatch" => {
            Some("AWS does not recognise these credentials: check --profile and your access keys")
        }
        "OptInRequired" => Some("this region is not enabled for your account: pick another --region"),
        "RequestLimitExceeded" | "Throttling" | "ThrottlingException" => {
            Some("AWS is throttling this account: wait a minute and try again")
        }
        _ => None,
    }
}

/// Shorthand for mapping an SDK result into our error with a description of the step.
pub trait AwsResultExt<T> {
    fn doing(self, what: impl Into<String>) -> Result<T, AwsError>;
}

impl<T, E, R> AwsResultExt<T> for Result<T, SdkError<E, R>>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    fn doing(self, what: impl Into<String>) -> Result<T, AwsError> {
        self.map_err(|e| AwsError::new(what, e))
    }
}

//! The AWS side: one place builds the SDK configuration; each concern is a thin module below
//! with intention-revealing functions that return our own types.
//!
//! Errors are classified by their typed AWS error code ([`code_of`]), never by message text, and
//! turned into one actionable line by [`AwsError`].

pub mod alarm;
pub mod ami;
pub mod budgets;
pub mod eice;
pub mod iam;

pub mod identity;
pub mod instances;
pub mod launch;
pub mod logs;
pub mod metrics;

pub mod network;
pub mod permissions;
pub mod schedule;
pub mod spot;
pub mod vpc;

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};

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
    pub scheduler: aws_sdk_scheduler::Client,
    /// Who the credentials belong to, asked once per process (shared by every region's clients:
    /// the same credentials are the same caller everywhere).
    caller: std::sync::Arc<tokio::sync::OnceCell<identity::Caller>>,
}

impl Aws {
    /// Loads credentials, region and endpoint through the SDK's usual chain, with our overrides.
    /// Reads local files only; makes no network call.
    pub async fn connect(settings: &AwsSettings) -> Result<Aws, UsageError> {
        let config = load_sdk_config(settings, settings.region.clone()).await;
        let region = config.region().map(|r| r.to_string()).ok_or_else(|| {
            UsageError::new("no AWS region: pass --region, set `region` in the config, or export AWS_REGION")
        })?;
        crate::settings::check_region(&region)?;
        let _ = ENDPOINT.set(match &settings.endpoint_url {
            Some(url) => url.clone(),
            None => format!("AWS in {region}"),
        });
        Ok(Aws::from_config(config, region))
    }

    /// The same account and endpoint in another region (for `cleanup --all-regions`).
    pub async fn in_region(&self, settings: &AwsSettings, region: &str) -> Aws {
        let config = load_sdk_config(settings, Some(region.to_string())).await;
        Aws { caller: self.caller.clone(), ..Aws::from_config(config, region.to_string()) }
    }

    /// The caller (STS GetCallerIdentity), asked at most once per process.
    pub async fn caller(&self) -> Result<identity::Caller, AwsError> {
        self.caller.get_or_try_init(|| identity::ask(self)).await.cloned()
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
            scheduler: aws_sdk_scheduler::Client::new(&config),
            // AWS Budgets has one endpoint, in us-east-1, whatever the session's region.
            budgets: aws_sdk_budgets::Client::from_conf(
                aws_sdk_budgets::config::Builder::from(&config).region(Region::new("us-east-1")).build(),
            ),
            config,
            caller: Default::default(),
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
    environment: bool,
    /// The SDK's own error, for `-v`.
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// An IAM action the daily policy does not grant is the bootstrap policy's (`setup roles`,
/// `cleanup --purge`): a daily user never holds it.
fn is_bootstrap_action(action: &str) -> bool {
    action.starts_with("iam:") && !permissions::granted_actions("-").iter().any(|a| a == action)
}

impl AwsError {
    pub fn new<E, R>(doing: impl Into<String>, error: SdkError<E, R>) -> AwsError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        let code = code_of(&error).map(str::to_string);
        let environment =
            code.as_deref().is_some_and(is_credentials_code) || credentials_problem(&error).is_some();
        let (said, hint) = match &error {
            SdkError::ServiceError(e) => {
                let action = iam_action_of::<E>();
                let said = match (e.err().code(), e.err().message()) {
                    (Some(code), Some(message)) => format!("{code} ({action}): {}", short_message(message)),
                    (Some(code), None) => format!("{code} ({action})"),
                    // An answer without an AWS error code (an HTML error page from a proxy…).
                    _ => format!("an error answer without an AWS error code ({action})"),
                };
                let hint = match code.as_deref() {
                    Some(c) if is_denial(c) && is_bootstrap_action(&action) => Some(format!(
                        "your credentials lack {action}, which only an account admin's one-time `setup roles` or `cleanup --purge` needs: `ephemeral-admin policy --bootstrap` prints what to add"
                    )),
                    Some(c) if is_denial(c) => Some(format!(
                        "your credentials lack {action} or a permission it needs (named above): `ephemeral-admin policy` prints the policy to attach"
                    )),
                    c => hint_for(c).map(str::to_string),
                };
                (said, hint)
            }
            _ => match credentials_problem(&error) {
                Some(problem) => problem,
                None if is_transport_error(&error) => unreachable_endpoint(&error),
                None => (innermost(&error), None),
            },
        };
        AwsError {
            doing: doing.into(),
            code,
            said,
            hint: hint.map(|h| format!("; {h}")).unwrap_or_default(),
            environment,
            source: Some(Box::new(error)),
        }
    }

    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// AWS answered without something it always sends (an id): never default it to "".
    pub fn missing(doing: impl Into<String>, what: &str) -> AwsError {
        AwsError {
            doing: doing.into(),
            code: None,
            said: format!("AWS's answer had no {what}"),
            hint: "; try again, and report it if it repeats".into(),
            environment: false,
            source: None,
        }
    }

    /// What to do about it, when we know.
    pub fn hint(&self) -> Option<&str> {
        self.hint.strip_prefix("; ")
    }

    /// What happened, without the hint.
    pub fn summary(&self) -> String {
        format!("{}: {}", self.doing, self.said)
    }

    /// The caller's environment is at fault (no, expired or unknown credentials): nothing was
    /// created and retrying as is cannot help. Exit 2.
    pub fn is_environment(&self) -> bool {
        self.environment
    }
}

/// Codes that mean the credentials themselves are unusable.
fn is_credentials_code(code: &str) -> bool {
    matches!(
        code,
        "ExpiredToken"
            | "ExpiredTokenException"
            | "RequestExpired"
            | "InvalidClientTokenId"
            | "UnrecognizedClientException"
            | "SignatureDoesNotMatch"
            | "AuthFailure"
    )
}

impl AwsError {}

/// The endpoint requests go to, for messages: the override, or AWS in the region. Set once by
/// [`Aws::connect`]; a process talks to one endpoint.
static ENDPOINT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn endpoint_label() -> String {
    ENDPOINT.get().cloned().unwrap_or_else(|| "AWS".to_string())
}

/// Missing or unusable credentials, found by type in the SDK's chain of causes.
fn credentials_problem(error: &(dyn std::error::Error + 'static)) -> Option<(String, Option<String>)> {
    use aws_credential_types::provider::error::CredentialsError;
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(problem) = e.downcast_ref::<CredentialsError>() {
            return Some(match problem {
                CredentialsError::CredentialsNotLoaded(_) => (
                    "no AWS credentials found".to_string(),
                    Some(
                        "run `aws configure`, or pick a profile with --profile / AWS_PROFILE, or `aws sso login` for SSO"
                            .to_string(),
                    ),
                ),
                _ => (
                    format!("the AWS credentials could not be loaded ({})", innermost(problem)),
                    Some("for SSO run `aws sso login`; otherwise check --profile / AWS_PROFILE and ~/.aws/config".into()),
                ),
            });
        }
        cause = e.source();
    }
    None
}

/// No answer at all: one line naming the endpoint and the lowest-level reason.
fn unreachable_endpoint(error: &(dyn std::error::Error + 'static)) -> (String, Option<String>) {
    let endpoint = endpoint_label();
    let hint = if ENDPOINT.get().is_some_and(|e| e.contains("://")) {
        "check --endpoint-url / AWS_ENDPOINT_URL".to_string()
    } else {
        "check your network or proxy settings".to_string()
    };
    (format!("no answer from {endpoint} ({})", innermost(error)), Some(hint))
}

/// The deepest cause's text: "Connection refused (os error 111)" rather than "dispatch failure".
fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut last = error;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}

/// The IAM action of the operation whose error type is `E`, from the SDK's type name:
/// `aws_sdk_ec2::operation::run_instances::RunInstancesError` is `ec2:RunInstances`.
pub fn iam_action_of<E>() -> String {
    let name = std::any::type_name::<E>();
    let mut parts = name.split("::");
    let service = match parts.next().unwrap_or_default().trim_start_matches("aws_sdk_") {
        "cloudwatchlogs" => "logs",
        other => other,
    };
    let operation = name.rsplit("::").next().unwrap_or(name).trim_end_matches("Error");
    match (service, operation) {
        // AWS Budgets authorizes its API through two coarse actions.
        ("budgets", op) if op.starts_with("Describe") || op.starts_with("View") => {
            "budgets:ViewBudget".into()
        }
        ("budgets", _) => "budgets:ModifyBudget".into(),
        (service, op) => format!("{service}:{op}"),
    }
}

/// Access denied, in each service's words.
pub fn is_denial(code: &str) -> bool {
    matches!(code, "UnauthorizedOperation" | "AccessDenied" | "AccessDeniedException")
}

/// EC2 appends a long encoded blob to denials; the reader needs only the sentence before it.
fn short_message(message: &str) -> String {
    const ENCODED: &str = " Encoded authorization failure message:";
    match message.find(ENCODED) {
        Some(at) => format!(
            "{} (the encoded details: `aws sts decode-authorization-message`, shown with -v)",
            message[..at].trim_end()
        ),
        None => message.to_string(),
    }
}

fn hint_for(code: Option<&str>) -> Option<&'static str> {
    match code? {
        "ExpiredToken" | "ExpiredTokenException" | "RequestExpired" => {
            Some("your credentials expired: refresh them (e.g. `aws sso login`) and try again")
        }
        "InvalidClientTokenId" | "UnrecognizedClientException" | "SignatureDoesNotMatch" | "AuthFailure" => {
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
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    fn doing(self, what: impl Into<String>) -> Result<T, AwsError> {
        self.map_err(|e| AwsError::new(what, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_iam_action_comes_from_the_operation_type() {
        use aws_sdk_cloudwatchlogs::operation::create_log_group::CreateLogGroupError;
        use aws_sdk_ec2::operation::run_instances::RunInstancesError;
        use aws_sdk_iam::operation::get_instance_profile::GetInstanceProfileError;
        assert_eq!(iam_action_of::<RunInstancesError>(), "ec2:RunInstances");
        assert_eq!(iam_action_of::<CreateLogGroupError>(), "logs:CreateLogGroup");
        assert_eq!(iam_action_of::<GetInstanceProfileError>(), "iam:GetInstanceProfile");
        assert_eq!(
            iam_action_of::<aws_sdk_budgets::operation::describe_budget::DescribeBudgetError>(),
            "budgets:ViewBudget"
        );
    }

    #[test]
    fn ec2_denials_lose_only_the_encoded_blob() {
        let m = "You are not authorized to perform this operation. User: arn:x is not authorized to perform: iam:PassRole on resource: arn:r Encoded authorization failure message: AbC123";
        let short = short_message(m);
        assert!(short.contains("iam:PassRole") && !short.contains("AbC123"), "{short}");
        assert_eq!(short_message("plain"), "plain");
    }
}

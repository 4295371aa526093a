//! Who is calling: the caller's account and ARN (the owner tag of every session), and the
//! (partition, account, region) every local record belongs to.

use super::{Aws, AwsError, AwsResultExt};
use crate::session::Scope;

/// The identity behind the credentials.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Caller {
    pub account: String,
    pub arn: String,
}

impl Caller {
    /// `aws`, `aws-cn`, `aws-us-gov`: the second field of the ARN.
    pub fn partition(&self) -> &str {
        self.arn.split(':').nth(1).unwrap_or("aws")
    }

    /// Where this caller's local records live in `region`.
    pub fn scope(&self, region: &str) -> Scope {
        Scope {
            partition: self.partition().to_string(),
            account: self.account.clone(),
            region: region.into(),
        }
    }
}

/// STS GetCallerIdentity (once per process): proves the credentials work and names their owner.
pub async fn whoami(aws: &Aws) -> Result<Caller, AwsError> {
    aws.caller().await
}

pub(super) async fn ask(aws: &Aws) -> Result<Caller, AwsError> {
    let doing = "checking your AWS credentials";
    let out = aws.sts.get_caller_identity().send().await.doing(doing)?;
    Ok(Caller {
        account: out.account().ok_or_else(|| AwsError::missing(doing, "account"))?.to_string(),
        arn: out.arn().ok_or_else(|| AwsError::missing(doing, "caller ARN"))?.to_string(),
    })
}

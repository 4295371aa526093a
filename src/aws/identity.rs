//! Who is calling: the caller's account and ARN (the owner tag of every session).

use super::{Aws, AwsError, AwsResultExt};

/// The identity behind the credentials.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Caller {
    pub account: String,
    pub arn: String,
}

/// STS GetCallerIdentity: proves the credentials work and names their owner.
pub async fn whoami(aws: &Aws) -> Result<Caller, AwsError> {
    let out = aws.sts.get_caller_identity().send().await.doing("checking your AWS credentials")?;
    Ok(Caller {
        account: out.account().unwrap_or_default().to_string(),
        arn: out.arn().unwrap_or_default().to_string(),
    })
}

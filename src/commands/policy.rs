//! `policy`: the least-privilege IAM policy a user needs, built from the action list the code uses.

use anyhow::Result;

use super::Context;
use crate::aws::permissions;
use crate::error::ExitStatus;

pub fn run(ctx: &Context) -> Result<ExitStatus> {
    let document = permissions::policy_document(&ctx.settings.iam_role_name);
    // The policy is JSON in either output format: it is meant to be pasted or piped into IAM.
    ctx.printer.raw(&serde_json::to_string_pretty(&document)?);
    Ok(ExitStatus::Success)
}

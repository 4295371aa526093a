//! `setup roles`: the tool's standing IAM, made once per account by someone holding the
//! bootstrap policy (`policy --bootstrap`), so that no daily user ever needs an IAM write.
//!
//! It makes (or repairs) the permissions boundary, the scheduler role and the Session Manager
//! box role with its profile ([`iam::bootstrap`]); running it again changes nothing but a role
//! policy someone edited. `launch` only reads these, and refuses, naming this command, when one
//! is missing.

use anyhow::Result;
use serde::Serialize;

use super::Context;
use crate::aws::{iam, identity};
use crate::error::ExitStatus;

#[derive(Serialize)]
struct RolesResult {
    account: String,
    boundary: String,
    steps: Vec<String>,
}

pub async fn setup(ctx: &Context) -> Result<ExitStatus> {
    let aws = ctx.aws().await?;
    let caller = identity::whoami(&aws).await?;
    let step =
        ctx.printer.step("creating the tool's standing IAM (boundary, scheduler role, Session Manager role)");
    let steps = iam::bootstrap(&aws, &ctx.settings.iam_role_name, &caller).await?;
    drop(step);
    let result = RolesResult {
        boundary: iam::boundary_arn(caller.partition(), &caller.account),
        account: caller.account,
        steps,
    };
    ctx.printer.result(&result, || {
        let mut text = result.steps.join("\n");
        text.push_str(&format!(
            "\naccount {} is ready: daily users need only the policy `ephemeral-admin policy` prints",
            result.account
        ));
        text
    });
    Ok(ExitStatus::Success)
}

//! `policy`: the least-privilege IAM policy a daily user needs; `--bootstrap`, what an account
//! admin needs besides it, once, for `setup roles` and `cleanup --purge`; `--box`, the Session
//! Manager box role's policy (the very document `setup roles` attaches; boxes reached by SSH get
//! no role); and `--validate`: IAM Access Analyzer's findings on the chosen one.

use anyhow::Result;
use aws_sdk_accessanalyzer::types::{PolicyType, ValidatePolicyFindingType};
use serde_json::Value;

use super::Context;
use crate::aws::{AwsResultExt, iam, permissions};
use crate::cli::PolicyArgs;
use crate::error::ExitStatus;
use crate::output::table;

/// The document `policy` prints for these flags and settings.
pub fn document(ctx: &Context, args: &PolicyArgs) -> Value {
    if args.box_role {
        iam::box_policy_document()
    } else if args.team_admin {
        permissions::team_admin_document()
    } else if args.bootstrap {
        permissions::bootstrap_document(&ctx.settings.iam_role_name)
    } else {
        permissions::policy_document(&ctx.settings.iam_role_name, ctx.settings.instance_profile.as_deref())
    }
}

/// One Access Analyzer finding.
#[derive(Debug, serde::Serialize)]
struct Finding {
    finding_type: String,
    issue_code: String,
    details: String,
    learn_more: String,
}

pub async fn run(ctx: &Context, args: &PolicyArgs) -> Result<ExitStatus> {
    let document = document(ctx, args);
    if !args.validate {
        // The policy is JSON in either output format: it is meant to be pasted or piped into IAM.
        let text = serde_json::to_string_pretty(&document)?;
        ctx.printer.result(&document, || text.clone());
        return Ok(ExitStatus::Success);
    }
    let aws = ctx.aws().await?;
    let analyzer = aws_sdk_accessanalyzer::Client::new(&aws.config);
    let mut findings = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let page = analyzer
            .validate_policy()
            .policy_document(document.to_string())
            .policy_type(PolicyType::IdentityPolicy)
            .set_next_token(next.take())
            .send()
            .await
            .doing("validating the policy with IAM Access Analyzer")?;
        findings.extend(page.findings().iter().map(|f| Finding {
            finding_type: f.finding_type().as_str().to_string(),
            issue_code: f.issue_code().to_string(),
            details: f.finding_details().to_string(),
            learn_more: f.learn_more_link().to_string(),
        }));
        match page.next_token() {
            Some(token) if !token.is_empty() => next = Some(token.to_string()),
            _ => break,
        }
    }
    let blocking = findings.iter().any(|f| {
        f.finding_type == ValidatePolicyFindingType::Error.as_str()
            || f.finding_type == ValidatePolicyFindingType::SecurityWarning.as_str()
    });
    let report = serde_json::json!({ "findings": findings, "ok": !blocking });
    ctx.printer.result(&report, || {
        if findings.is_empty() {
            return "IAM Access Analyzer: no findings".to_string();
        }
        let rows: Vec<Vec<String>> = findings
            .iter()
            .map(|f| vec![f.finding_type.clone(), f.issue_code.clone(), f.details.clone()])
            .collect();
        table(&["TYPE", "ISSUE", "DETAILS"], &rows)
    });
    Ok(if blocking { ExitStatus::Failure } else { ExitStatus::Success })
}

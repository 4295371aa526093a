//! The tag scheme: AWS tags are the source of truth for what belongs to which session.
//!
//! Keys stay within the instance-metadata tag character set (letters, digits, `+ - = . , _ : @`)
//! so the box's watchdog can read them through IMDS.

use std::collections::BTreeMap;

pub const NAME: &str = "Name";
pub const PROJECT: &str = "Project";
pub const PROJECT_VALUE: &str = "EphemeralContainer";
pub const AUTO_MANAGED: &str = "AutoManaged";
pub const SESSION: &str = "ephemeral-admin:session";
pub const OWNER: &str = "ephemeral-admin:owner";
/// The creator's IAM `aws:userid`: the printed policy requires it on every create
/// (`aws:RequestTag`) and lets a caller change only resources carrying their own
/// (`ec2:ResourceTag`), so owner isolation is AWS's, not the tool's, to enforce.
pub const OWNER_ID: &str = "ephemeral-admin:owner-id";
pub const EXPIRES_AT: &str = "ephemeral-admin:expires-at";
/// `attached` (ends with the shell) or `kept` (`--keep`/`--detach`: ends by its watchdog).
pub const MODE: &str = "ephemeral-admin:mode";
/// Marks a standing part (`eice`: the Instance Connect Endpoint and its group), nobody's own.
pub const STANDING: &str = "ephemeral-admin:standing";
pub const STANDING_EICE: &str = "eice";
/// The session's name (`launch --name`), a DNS label; absent for unnamed sessions.
pub const SESSION_NAME: &str = "ephemeral-admin:name";

/// Keys the tool sets itself; user tags may not use them.
pub fn is_reserved(key: &str) -> bool {
    matches!(key, NAME | PROJECT | AUTO_MANAGED) || key.starts_with("ephemeral-admin:")
}

/// The tags of the tool's shared resources (security group, IAM role).
pub fn shared_resource_tags() -> Vec<(String, String)> {
    vec![(PROJECT.into(), PROJECT_VALUE.into()), (AUTO_MANAGED.into(), "true".into())]
}

/// Everything a session's resources carry, user tags last.
pub fn session_tags(
    session_id: &str,
    (owner, owner_id): (&str, &str),
    expires_at: &str,
    kept: bool,
    name: Option<&str>,
    extra: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut tags = vec![
        (NAME.to_string(), format!("ephemeral-admin-{session_id}")),
        (PROJECT.to_string(), PROJECT_VALUE.to_string()),
        (AUTO_MANAGED.to_string(), "true".to_string()),
        (SESSION.to_string(), session_id.to_string()),
        (OWNER.to_string(), owner.to_string()),
        (OWNER_ID.to_string(), owner_id.to_string()),
        (EXPIRES_AT.to_string(), expires_at.to_string()),
        (MODE.to_string(), if kept { "kept" } else { "attached" }.to_string()),
    ];
    tags.extend(name.map(|n| (SESSION_NAME.to_string(), n.to_string())));
    tags.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    tags
}

/// A character AWS allows in a tag value (letters, digits, spaces, `_ . : / = + - @`).
pub fn valid_tag_value_char(c: char) -> bool {
    c.is_alphanumeric() || c == ' ' || "_.:/=+-@".contains(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_readable_through_imds() {
        let tags = session_tags(
            "k3x9q2ab",
            ("arn:aws:iam::1:user/a", "AIDAEXAMPLE"),
            "2026-11-22T18:00:00Z",
            false,
            Some("db-fix"),
            &BTreeMap::new(),
        );
        assert!(tags.iter().any(|(k, v)| k == SESSION_NAME && v == "db-fix"));
        for (key, _) in &tags {
            assert!(crate::settings::valid_tag_key(key), "{key}");
        }
    }
}

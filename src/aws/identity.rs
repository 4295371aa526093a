//! Who is calling: the caller's account and ARN, the (partition, account, region) every local
//! record belongs to, and the owner of the sessions they launch.
//!
//! The owner tag must name the same human across logins. A caller ARN does not always: under an
//! assumed role (`arn:aws:sts::ACCT:assumed-role/ROLE/SESSION`) the session name is whatever the
//! client chose at login (a timestamp, a pipeline id, "botocore-session-…"), so it changes between
//! logins. [`owner_of`] keeps the role and drops that part, except under IAM Identity Center
//! (SSO), whose permission-set roles (`AWSReservedSSO_…`) name the person in the session name.
//! The `owner` setting overrides all this. Every owner comparison (list, cleanup, sweep) goes
//! through [`is_mine`], which also recognises tags written with the full ARN.

use super::{Aws, AwsError, AwsResultExt};
use crate::session::Scope;

/// The identity behind the credentials.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Caller {
    pub account: String,
    pub arn: String,
    /// The owner tag of the sessions this caller launches: [`owner_of`] the ARN, or the `owner`
    /// setting.
    pub owner: String,
    /// IAM's `aws:userid` (`AIDA…` for a user, `AROA…:SESSION` for an assumed role): every
    /// resource a launch makes carries it as its owner-id tag, and the printed policy lets a
    /// caller change only resources whose owner-id is theirs. Per person even on a shared role.
    pub user_id: String,
}

impl Caller {
    /// Is a session tagged with `owner` this caller's?
    pub fn is_mine(&self, owner: &str) -> bool {
        is_mine(owner, &self.owner)
    }

    /// May this caller change a session whose resources carry `owner_id` (their owner-id tag)?
    /// The same rule the printed policy makes AWS enforce: only its owner-id's own. Sessions
    /// from before owner-ids (`None`) go by the owner tag.
    pub fn may_change(&self, owner_id: Option<&str>, owner: Option<&str>) -> bool {
        match owner_id {
            Some(id) => id == self.user_id,
            None => owner.is_none_or(|o| self.is_mine(o)),
        }
    }
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
    let arn = out.arn().ok_or_else(|| AwsError::missing(doing, "caller ARN"))?.to_string();
    Ok(Caller {
        account: out.account().ok_or_else(|| AwsError::missing(doing, "account"))?.to_string(),
        user_id: out
            .user_id()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| AwsError::missing(doing, "user id"))?
            .to_string(),
        owner: owner_of(&arn),
        arn,
    })
}

/// [`whoami`], with the `owner` setting (if any) as the owner.
pub async fn me(aws: &Aws, owner_setting: Option<&str>) -> Result<Caller, AwsError> {
    let mut caller = whoami(aws).await?;
    if let Some(owner) = owner_setting {
        caller.owner = owner.to_string();
    }
    Ok(caller)
}

/// IAM Identity Center's permission-set roles: their session name is the user's name or email.
const SSO_ROLE_PREFIX: &str = "AWSReservedSSO_";

/// The stable owner of a caller ARN: for an assumed role, the role's ARN (plus the session name
/// when it names a person: SSO); any other ARN (IAM user, root, federated user) as it is.
/// Characters a tag value cannot hold become `_`.
pub fn owner_of(arn: &str) -> String {
    let owner = assumed_role(arn)
        .map(|(partition, account, role, session)| {
            let role_arn = format!("arn:{partition}:iam::{account}:role/{role}");
            match role.starts_with(SSO_ROLE_PREFIX) {
                true => format!("{role_arn}/{session}"),
                false => role_arn,
            }
        })
        .unwrap_or_else(|| arn.to_string());
    owner.chars().map(|c| if crate::session::tags::valid_tag_value_char(c) { c } else { '_' }).collect()
}

/// (partition, account, role, session) of `arn:PARTITION:sts::ACCOUNT:assumed-role/ROLE/SESSION`.
fn assumed_role(arn: &str) -> Option<(&str, &str, &str, &str)> {
    let mut parts = arn.splitn(6, ':');
    let (prefix, partition, service, _region, account, resource) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if prefix != "arn" || service != "sts" {
        return None;
    }
    let mut path = resource.strip_prefix("assumed-role/")?.splitn(2, '/');
    Some((partition, account, path.next()?, path.next()?))
}

/// Is a session tagged `tagged` owned by `me`? Tags written before owners were stable hold the
/// full caller ARN; they count as the owner that ARN stands for today.
pub fn is_mine(tagged: &str, me: &str) -> bool {
    tagged == me || owner_of(tagged) == me
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assumed_role_is_owned_by_its_role_whatever_the_session_name() {
        let a = owner_of("arn:aws:sts::111122223333:assumed-role/Admin/alice-1700000000");
        let b = owner_of("arn:aws:sts::111122223333:assumed-role/Admin/botocore-session-42");
        assert_eq!(a, "arn:aws:iam::111122223333:role/Admin");
        assert_eq!(a, b);
    }

    #[test]
    fn an_sso_role_keeps_the_person_in_the_session_name() {
        let arn = "arn:aws:sts::111122223333:assumed-role/AWSReservedSSO_Admin_0123abcd/alice@example.com";
        assert_eq!(
            owner_of(arn),
            "arn:aws:iam::111122223333:role/AWSReservedSSO_Admin_0123abcd/alice@example.com"
        );
        let bob = "arn:aws:sts::111122223333:assumed-role/AWSReservedSSO_Admin_0123abcd/bob@example.com";
        assert_ne!(owner_of(arn), owner_of(bob));
    }

    #[test]
    fn other_identities_stay_as_they_are_and_fit_a_tag_value() {
        for arn in [
            "arn:aws:iam::111122223333:user/alice",
            "arn:aws:iam::111122223333:root",
            "arn:aws:sts::111122223333:federated-user/alice",
            "arn:aws-cn:iam::111122223333:user/alice",
        ] {
            assert_eq!(owner_of(arn), arn);
        }
        assert_eq!(
            owner_of("arn:aws-us-gov:sts::111122223333:assumed-role/AWSReservedSSO_X/a,b"),
            "arn:aws-us-gov:iam::111122223333:role/AWSReservedSSO_X/a_b"
        );
    }

    #[test]
    fn old_full_arn_tags_are_still_recognised() {
        let me = owner_of("arn:aws:sts::1:assumed-role/Admin/today");
        assert!(is_mine("arn:aws:sts::1:assumed-role/Admin/yesterday", &me));
        assert!(is_mine(&me, &me));
        assert!(!is_mine("arn:aws:sts::1:assumed-role/Other/today", &me));
        assert!(is_mine("alice@example.com", "alice@example.com"));
    }
}

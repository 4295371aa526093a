//! A session: one box and everything made for it, from launch to teardown.
//!
//! Ids are short and random; [`tags`] is the scheme that ties AWS resources to a session;
//! [`store`] keeps the local record (written atomically, before the next step starts) and the
//! session's private key.

pub mod lifecycle;
pub mod store;
pub mod tags;

use rand::RngExt;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Id alphabet: lowercase letters and digits, minus look-alikes (0/o, 1/l/i).
const ID_ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
const ID_LEN: usize = 8;

/// A fresh session id: 8 characters, about 39 bits, safe in tags, file names and DNS labels.
pub fn new_id() -> String {
    let mut rng = rand::rng();
    (0..ID_LEN).map(|_| ID_ALPHABET[rng.random_range(0..ID_ALPHABET.len())] as char).collect()
}

/// True for strings `new_id` could have made: guards paths built from user input.
pub fn is_valid_id(id: &str) -> bool {
    id.len() == ID_LEN && id.bytes().all(|b| ID_ALPHABET.contains(&b))
}

/// What a local record belongs to: commands act only on the records of the account (and
/// partition and region) their credentials are in, so a second AWS account never settles,
/// sweeps or deletes the keys of the first one's sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub partition: String,
    pub account: String,
    pub region: String,
}

impl Scope {
    /// True for records of this scope. A record that does not say its account (written before
    /// records did) is judged by its owner ARN; one that cannot be placed belongs to no scope.
    pub fn holds(&self, record: &store::SessionRecord) -> bool {
        let (partition, account) = record.partition_and_account();
        record.region == self.region && account == Some(self.account.as_str()) && partition == self.partition
    }
}

/// What the characters of an id are, for messages.
pub const ID_RULE: &str = "8 characters from a-z and 2-9, without i, l, o, 0 and 1";

/// How a user names a session on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionRef {
    /// The session id `launch` printed.
    Id(String),
    /// The EC2 instance id (`i-` and 8 or 17 hex digits).
    Instance(String),
    /// The name given with `launch --name`.
    Name(String),
    /// `last`: the caller's most recently launched live session in the region.
    Last,
}

/// The word that means the caller's most recent live session.
pub const LAST: &str = "last";

impl SessionRef {
    /// Parses a session id, an instance id, `last` or a session name; anything else is bad
    /// input (exit 2). A name can never be read as an id: [`validate_name`] refuses those.
    pub fn parse(text: &str) -> Result<SessionRef, crate::error::UsageError> {
        if is_valid_id(text) {
            return Ok(SessionRef::Id(text.to_string()));
        }
        if is_instance_id(text) {
            return Ok(SessionRef::Instance(text.to_string()));
        }
        if text == LAST {
            return Ok(SessionRef::Last);
        }
        if validate_name(text).is_ok() {
            return Ok(SessionRef::Name(text.to_string()));
        }
        Err(crate::error::UsageError::new(format!(
            "{text:?} is not a session id ({ID_RULE}, as `list` shows), a session name, an instance id (i-…) or `last`"
        )))
    }
}

/// The longest session name: one DNS label.
pub const NAME_MAX: usize = 63;

/// A session name is a DNS label (lowercase letters, digits and inner hyphens, starting with a
/// letter, at most 63 characters), so it works as an SSH host alias and within the instance
/// metadata tag character set. It may not read as a session id (nor have an id's shape, 8
/// letters and digits, so a mistyped id is reported as one), an instance id or `last`, and may
/// not start with `ephemeral-admin-` (the unnamed sessions' host aliases).
pub fn validate_name(name: &str) -> Result<(), String> {
    let label = !name.is_empty()
        && name.len() <= NAME_MAX
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !label {
        return Err(format!(
            "{name:?} is not a valid name: use 1 to {NAME_MAX} lowercase letters, digits and hyphens, starting with a letter and not ending with a hyphen (like db-fix)"
        ));
    }
    let id_shaped = name.len() == ID_LEN && name.bytes().all(|b| b.is_ascii_alphanumeric());
    if id_shaped || is_instance_id(name) || name == LAST || name.starts_with("ephemeral-admin-") {
        return Err(format!(
            "{name:?} reads as a session id (8 letters and digits), an instance id, `last` or an unnamed session's host alias: pick another name"
        ));
    }
    Ok(())
}

/// `i-` and 8 or 17 lowercase hex digits.
pub fn is_instance_id(text: &str) -> bool {
    text.strip_prefix("i-").is_some_and(|hex| {
        matches!(hex.len(), 8 | 17) && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The wall clock, injectable so tests can pin "now".
pub trait Clock: Send + Sync {
    fn now(&self) -> OffsetDateTime;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// A clock stopped at one instant.
pub struct FixedClock(pub OffsetDateTime);

impl Clock for FixedClock {
    fn now(&self) -> OffsetDateTime {
        self.0
    }
}

/// The clock commands use: the system's, or the instant in `EPHEMERAL_ADMIN_NOW` (RFC 3339), a
/// testing aid for reports that depend on the date (`cost`).
pub fn clock() -> Box<dyn Clock> {
    match std::env::var("EPHEMERAL_ADMIN_NOW").ok().as_deref().and_then(parse_rfc3339) {
        Some(now) => Box::new(FixedClock(now)),
        None => Box::new(SystemClock),
    }
}

/// RFC 3339 in UTC at whole seconds: `2026-11-22T18:00:00Z`.
pub fn rfc3339(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC).replace_nanosecond(0).expect("0 ns is valid");
    t.format(&Rfc3339).expect("UTC times format")
}

pub fn parse_rfc3339(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels_that_never_read_as_ids() {
        for good in ["db-fix", "a", "web2", "web-host", "webhost12", &"a".repeat(63)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Db",
            "2db",
            "db-",
            "db_fix",
            "db.fix",
            &"a".repeat(64),
            "abcd2345",
            "webhost1",
            "i-0123abcd",
            "last",
            "ephemeral-admin-x",
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_are_short_and_safe() {
        for _ in 0..100 {
            let id = new_id();
            assert!(is_valid_id(&id), "{id}");
        }
        assert!(!is_valid_id("../etc/x"));
        assert!(!is_valid_id("abcd1234"), "1 is not in the alphabet");
        assert_eq!(SessionRef::parse("abcd2345").unwrap(), SessionRef::Id("abcd2345".into()));
        assert_eq!(
            SessionRef::parse("i-0123456789abcdef0").unwrap(),
            SessionRef::Instance("i-0123456789abcdef0".into())
        );
        let refused = SessionRef::parse("abcd1234").unwrap_err().to_string();
        assert!(refused.contains("without i, l, o, 0 and 1"), "{refused}");
        assert_eq!(SessionRef::parse("db-fix").unwrap(), SessionRef::Name("db-fix".into()));
        assert_eq!(SessionRef::parse("last").unwrap(), SessionRef::Last);
        assert!(SessionRef::parse("db_fix").is_err());
        assert_eq!(rfc3339(parse_rfc3339("2026-11-22T19:00:00.5+01:00").unwrap()), "2026-11-22T18:00:00Z");
    }
}

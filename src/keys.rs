//! The session's two fresh Ed25519 keys: the client key we log in with and the host key the box
//! must present. Both are made here, for this session only, with `russh::keys` (ssh-key).

use anyhow::{Context, Result};
use russh::keys::ssh_key::{Algorithm, HashAlg, LineEnding};
use russh::keys::{PrivateKey, PublicKey};
use zeroize::Zeroizing;

/// One Ed25519 key pair in the forms the rest of the tool needs.
pub struct KeyPair {
    pub private: PrivateKey,
    /// OpenSSH private key text (for the key file, or the box's user-data).
    pub private_openssh: Zeroizing<String>,
    /// `ssh-ed25519 AAAA… comment`.
    pub public_openssh: String,
    /// `SHA256:…`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
}

impl KeyPair {
    pub fn generate(comment: &str) -> Result<KeyPair> {
        let mut private =
            PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).context("generating an Ed25519 key")?;
        private.set_comment(comment);
        let private_openssh = private.to_openssh(LineEnding::LF).context("encoding the private key")?;
        let public_openssh = private.public_key().to_openssh().context("encoding the public key")?;
        let fingerprint = private.public_key().fingerprint(HashAlg::Sha256).to_string();
        Ok(KeyPair { private, private_openssh, public_openssh, fingerprint })
    }
}

/// The session's keys: generated together, off the async runtime (it's CPU work).
pub struct SessionKeys {
    pub client: KeyPair,
    pub host: KeyPair,
}

impl SessionKeys {
    pub fn generate(session_id: &str) -> Result<SessionKeys> {
        Ok(SessionKeys {
            client: KeyPair::generate(&format!("ephemeral-admin-{session_id}"))?,
            host: KeyPair::generate("ephemeral-admin-host")?,
        })
    }
}

/// Parses an OpenSSH public key line (as stored in the session record).
pub fn parse_public(openssh: &str) -> Result<PublicKey> {
    PublicKey::from_openssh(openssh).context("the session record holds a malformed host key")
}

/// The SHA256 fingerprint of a public key.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fresh_ed25519_and_round_trip() {
        let keys = SessionKeys::generate("abcdefgh").unwrap();
        assert!(keys.client.public_openssh.starts_with("ssh-ed25519 "));
        assert!(keys.client.public_openssh.ends_with(" ephemeral-admin-abcdefgh"));
        assert_ne!(keys.client.fingerprint, keys.host.fingerprint);
        let parsed = parse_public(&keys.host.public_openssh).unwrap();
        assert_eq!(fingerprint(&parsed), keys.host.fingerprint);
        assert!(keys.host.private_openssh.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        let reread = PrivateKey::from_openssh(keys.client.private_openssh.as_bytes()).unwrap();
        assert_eq!(reread.public_key(), keys.client.private.public_key());
    }
}

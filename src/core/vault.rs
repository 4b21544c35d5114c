//! What may be shown of a key, and how a key is kept recoverable (SPEC §8, "View full key").
//!
//! [`key_hint`] is the masked form a listing shows (new-api's: `sk-abcd**********wxyz`).
//! [`Vault`] seals a key with XChaCha20-Poly1305 under the vault secret, with the key's id
//! bound as associated data, and opens it again; a sealed value edited by hand, sealed under
//! another secret or moved to another id fails authentication and is never decrypted to
//! garbage. Pure: the caller reads the secret (from the environment, `crate::sync::vault`) and
//! hands over its bytes.
//!
//! The sealed text form is `v1:` + base64 (RFC 4648, padded) of a 24-byte random nonce followed
//! by the ciphertext and its 16-byte tag.

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use std::fmt;
use zeroize::Zeroizing;

/// The version tag every sealed value starts with.
pub const SEALED_PREFIX: &str = "v1:";
/// Bytes of vault secret.
pub const SECRET_BYTES: usize = 32;
const NONCE_BYTES: usize = 24;
const TAG_BYTES: usize = 16;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The masked form of a key for listings, as new-api shows it: the part after `sk-` keeps its
/// first and last 4 characters around ten `*` (`sk-abcd**********wxyz`); a part of 5 to 8
/// characters keeps 2 and 2 around `****`, a shorter one is all `*`.
pub fn key_hint(key: &str) -> String {
    let body = key.strip_prefix("sk-").unwrap_or(key);
    let chars: Vec<char> = body.chars().collect();
    let n = chars.len();
    let keep = |head: usize, stars: usize, tail: usize| -> String {
        let mut s = String::from("sk-");
        s.extend(&chars[..head]);
        s.extend(std::iter::repeat_n('*', stars));
        s.extend(&chars[n - tail..]);
        s
    };
    match n {
        0..=4 => keep(0, n, 0),
        5..=8 => keep(2, 4, 2),
        _ => keep(4, 10, 4),
    }
}

/// Why a vault secret could not be used, or a sealed value could not be opened. No variant
/// ever holds a secret or a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    /// The secret is not 64 hex characters.
    #[error("the vault secret must be 64 hex characters (32 random bytes), got {length} characters{what}")]
    SecretFormat {
        /// How many characters were given (after trimming whitespace).
        length: usize,
        /// `""`, or what else is wrong (not hex).
        what: &'static str,
    },
    /// The sealed value is not `v1:<base64>` of a nonce, a ciphertext and a tag.
    #[error("key {id}: sealed value is malformed: {why}")]
    Malformed {
        /// The key id.
        id: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The tag does not verify: the value was edited, sealed under another secret, or
    /// belongs to another key id.
    #[error("key {id}: sealed value fails authentication")]
    Authentication {
        /// The key id.
        id: u64,
    },
    /// The system's random source failed.
    #[error("cannot draw a random nonce: {0}")]
    Random(String),
    /// The cipher refused the key (only a message over its 256 GiB limit can be).
    #[error("key {id}: cannot seal its key")]
    Seal {
        /// The key id.
        id: u64,
    },
}

/// A vault secret ready to seal and open keys. Its `Debug` never shows the secret.
#[derive(Clone)]
pub struct Vault {
    cipher: XChaCha20Poly1305,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Vault { secret: <redacted> }")
    }
}

/// The associated data of key `id`'s sealed value: the id, and what the value is, so a sealed
/// value opens only under the id it was sealed for.
fn associated_data(id: u64) -> [u8; 27] {
    let mut ad = [0u8; 27];
    ad[..19].copy_from_slice(b"keygate key_sealed ");
    ad[19..].copy_from_slice(&id.to_be_bytes());
    ad
}

impl Vault {
    /// A vault from the 32 secret bytes.
    pub fn from_bytes(secret: &[u8; SECRET_BYTES]) -> Vault {
        Vault {
            cipher: XChaCha20Poly1305::new(secret.into()),
        }
    }

    /// A vault from the secret as 64 hex characters (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Vault, VaultError> {
        let text = text.trim();
        let length = text.chars().count();
        if length != SECRET_BYTES * 2 {
            return Err(VaultError::SecretFormat { length, what: "" });
        }
        let mut bytes = Zeroizing::new([0u8; SECRET_BYTES]);
        hex::decode_to_slice(text, &mut bytes[..]).map_err(|_| VaultError::SecretFormat {
            length,
            what: " that are not all hex digits",
        })?;
        Ok(Vault::from_bytes(&bytes))
    }

    /// Seal key `id`'s `key` under a fresh random nonce.
    pub fn seal(&self, id: u64, key: &str) -> Result<String, VaultError> {
        let mut nonce = [0u8; NONCE_BYTES];
        getrandom::fill(&mut nonce).map_err(|e| VaultError::Random(e.to_string()))?;
        self.seal_with_nonce(id, key, &nonce)
    }

    /// Seal with a given nonce. A nonce must never be used twice under one secret: outside
    /// tests, use [`Vault::seal`].
    pub fn seal_with_nonce(
        &self,
        id: u64,
        key: &str,
        nonce: &[u8; NONCE_BYTES],
    ) -> Result<String, VaultError> {
        let payload = Payload {
            msg: key.as_bytes(),
            aad: &associated_data(id),
        };
        let sealed = self
            .cipher
            .encrypt(XNonce::from_slice(nonce), payload)
            .map_err(|_| VaultError::Seal { id })?;
        let mut raw = Vec::with_capacity(NONCE_BYTES + sealed.len());
        raw.extend_from_slice(nonce);
        raw.extend_from_slice(&sealed);
        Ok(format!("{SEALED_PREFIX}{}", B64.encode(raw)))
    }

    /// Open key `id`'s sealed value; refused unless it was sealed under this secret for this id
    /// and not changed since.
    pub fn open(&self, id: u64, sealed: &str) -> Result<String, VaultError> {
        let malformed = |why| VaultError::Malformed { id, why };
        let body = sealed
            .strip_prefix(SEALED_PREFIX)
            .ok_or_else(|| malformed("it does not start with \"v1:\""))?;
        let raw = B64
            .decode(body)
            .map_err(|_| malformed("it is not base64 after \"v1:\""))?;
        if raw.len() < NONCE_BYTES + TAG_BYTES {
            return Err(malformed("it is too short to hold a nonce and a tag"));
        }
        let (nonce, ciphertext) = raw.split_at(NONCE_BYTES);
        let payload = Payload {
            msg: ciphertext,
            aad: &associated_data(id),
        };
        let plain = self
            .cipher
            .decrypt(XNonce::from_slice(nonce), payload)
            .map_err(|_| VaultError::Authentication { id })?;
        String::from_utf8(plain).map_err(|_| malformed("it does not hold text"))
    }
}

/// Before sealing new keys into `file`: refuse when `vault` does not open the key already
/// sealed there first, so that one file never holds keys sealed under two secrets.
pub fn check_same_secret(
    file: &crate::core::config::SyncFile,
    vault: &Vault,
) -> Result<(), String> {
    let Some(k) = file.keys.iter().find(|k| k.key_sealed.is_some()) else {
        return Ok(());
    };
    let sealed = k.key_sealed.as_deref().unwrap_or("");
    vault.open(k.id, sealed).map(|_| ()).map_err(|e| {
        format!(
            "vault secret does not open key {}'s sealed value ({e}): the keys in this file were \
             sealed under another secret; nothing was written",
            k.id
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    const KEY: &str = "sk-abcdEFGHijklMNOPqrstUVWXyz0123456789ABCDEFGHwxyz";

    #[test]
    fn hints_follow_new_api() {
        assert_eq!(key_hint(KEY), "sk-abcd**********wxyz");
        assert_eq!(key_hint("abcdefghij"), "sk-abcd**********ghij");
        assert_eq!(key_hint("sk-abcdef"), "sk-ab****ef");
        assert_eq!(key_hint("sk-abc"), "sk-***");
        assert!(!key_hint(KEY).contains("EFGH"));
    }

    #[test]
    fn sealed_keys_open_only_under_their_secret_and_id() {
        let v = Vault::from_hex(SECRET).unwrap();
        let sealed = v.seal(17, KEY).unwrap();
        assert!(sealed.starts_with("v1:") && !sealed.contains("abcd"));
        assert_eq!(v.open(17, &sealed).unwrap(), KEY);
        assert_ne!(v.seal(17, KEY).unwrap(), sealed, "a fresh nonce per seal");
        assert_eq!(
            v.open(18, &sealed).unwrap_err(),
            VaultError::Authentication { id: 18 }
        );
        let other = Vault::from_bytes(&[7; 32]);
        assert_eq!(
            other.open(17, &sealed).unwrap_err().to_string(),
            "key 17: sealed value fails authentication"
        );
    }

    #[test]
    fn every_edited_byte_is_refused() {
        let v = Vault::from_hex(SECRET).unwrap();
        let sealed = v.seal_with_nonce(3, KEY, &[9; 24]).unwrap();
        let raw = B64.decode(&sealed[3..]).unwrap();
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 0x01;
            let text = format!("v1:{}", B64.encode(&bad));
            assert_eq!(
                v.open(3, &text).unwrap_err(),
                VaultError::Authentication { id: 3 },
                "byte {i}"
            );
        }
        for (text, why) in [
            ("v2:AAAA", "does not start"),
            ("v1:not base64!", "not base64"),
            ("v1:AAAA", "too short"),
            (&sealed[..sealed.len() - 1], "not base64"),
        ] {
            let e = v.open(3, text).unwrap_err().to_string();
            assert!(
                e.starts_with("key 3: sealed value is malformed") && e.contains(why),
                "{e}"
            );
        }
    }

    #[test]
    fn secrets_must_be_64_hex_and_never_show() {
        for bad in ["", "abc", &SECRET[..63], &format!("{}g", &SECRET[..63])] {
            let e = Vault::from_hex(bad).unwrap_err().to_string();
            assert!(e.contains("64 hex characters"), "{e}");
            assert!(bad.is_empty() || !e.contains(bad), "{e}");
        }
        assert!(Vault::from_hex(&format!(" {SECRET}\n")).is_ok());
        let v = Vault::from_hex(SECRET).unwrap();
        let shown = format!("{v:?} {v:#?}");
        assert!(
            !shown.contains(SECRET) && !shown.contains("0011"),
            "{shown}"
        );
    }
}

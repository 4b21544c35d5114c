//! The `admin:` section of the config (SPEC §8): the admin API's listener, who may call it, and
//! where its audit log goes. Plain data; `crate::admin` resolves the tokens at start.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// What a token may do.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read and write.
    Admin,
    /// Read only.
    Viewer,
}

impl Role {
    /// As written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }
}

/// One admin token: its secret comes from an environment variable or is given as a SHA-256.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminTokenConfig {
    /// Who this token is (audit log, metrics); never the secret.
    pub name: String,
    /// The variable holding the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    /// Hex SHA-256 of the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    /// `admin` or `viewer`.
    pub role: Role,
    /// Sees and changes only this account's keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
}

/// `admin:` (SPEC §8).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `IP:port` of the admin listener.
    pub listen: String,
    /// Who may call it.
    pub tokens: Vec<AdminTokenConfig>,
    /// One JSON line per write and per reveal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_log: Option<PathBuf>,
}

impl AdminConfig {
    /// Check what serde cannot: the address, one secret source per token, unique names.
    pub fn validate(&self) -> Result<(), String> {
        self.listen
            .parse::<std::net::SocketAddr>()
            .map_err(|_| format!("admin.listen: {:?} is not an IP:port address", self.listen))?;
        if self.tokens.is_empty() {
            return Err("admin.tokens: at least one token is needed".into());
        }
        let mut names = std::collections::HashSet::new();
        for t in &self.tokens {
            let what = format!("admin.tokens: {:?}", t.name);
            if t.name.is_empty() {
                return Err("admin.tokens: a token needs a name".into());
            }
            if !names.insert(t.name.as_str()) {
                return Err(format!("{what}: the name is used twice"));
            }
            match (&t.token_env, &t.token_sha256) {
                (Some(_), None) => {}
                (None, Some(h)) => {
                    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(format!("{what}: token_sha256 must be 64 hex characters"));
                    }
                }
                _ => {
                    return Err(format!(
                        "{what}: give exactly one of token_env and token_sha256"
                    ))
                }
            }
            if t.account.as_deref() == Some("") {
                return Err(format!("{what}: account must not be empty"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(env: Option<&str>, sha: Option<&str>) -> AdminTokenConfig {
        AdminTokenConfig {
            name: "ops".into(),
            token_env: env.map(Into::into),
            token_sha256: sha.map(Into::into),
            role: Role::Admin,
            account: None,
        }
    }

    #[test]
    fn each_token_has_one_secret_source() {
        let mut c = AdminConfig {
            listen: "127.0.0.1:0".into(),
            tokens: vec![token(Some("T"), None)],
            audit_log: None,
        };
        assert!(c.validate().is_ok());
        c.tokens = vec![token(Some("T"), Some(&"a".repeat(64)))];
        assert!(c.validate().unwrap_err().contains("exactly one"));
        c.tokens = vec![token(None, Some("abc"))];
        assert!(c.validate().unwrap_err().contains("64 hex"));
        c.tokens = vec![token(Some("T"), None), token(Some("U"), None)];
        assert!(c.validate().unwrap_err().contains("used twice"));
        c.tokens = vec![token(Some("T"), None)];
        c.listen = "nowhere".into();
        assert!(c.validate().unwrap_err().contains("admin.listen"));
    }
}

//! The audit log (SPEC §8): one JSON line per write and per reveal — when, who (the token's
//! name), what, on which target, which fields, from where. Never a secret: only field names are
//! written, never their values.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;

/// Appends audit lines to a file (or nowhere).
pub struct Audit {
    file: Option<Mutex<File>>,
}

/// One audited action.
pub struct Entry<'a> {
    /// The token's name.
    pub token_name: &'a str,
    /// `key.create`, `key.update`, `key.reveal`, …
    pub action: &'a str,
    /// `key:17`, `account:acme`.
    pub target: String,
    /// The names of the fields the write set.
    pub changed: Vec<String>,
    /// The caller's address.
    pub client_ip: IpAddr,
}

impl Audit {
    /// Open (create, append to) `path`; `None` audits nothing.
    pub fn open(path: Option<&Path>) -> std::io::Result<Audit> {
        let file = match path {
            Some(p) => {
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
                Some(Mutex::new(f))
            }
            None => None,
        };
        Ok(Audit { file })
    }

    /// Write one line (one `write` call, so lines never interleave). A failure is logged.
    pub fn record(&self, e: Entry<'_>) {
        let Some(file) = &self.file else { return };
        let line = serde_json::json!({
            "time": crate::core::clock::unix_now(),
            "token_name": e.token_name,
            "action": e.action,
            "target": e.target,
            "changed": e.changed,
            "client_ip": e.client_ip.to_string(),
        });
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        let mut f = file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(err) = f.write_all(&bytes) {
            log::error!("audit log: cannot write: {err}");
        }
    }
}

//! The checks: status, expiry, client IP and model/group policy, as pure functions over plain
//! data (a key record, a time, an `IpAddr`, a model name). Also how the client IP is found.

use crate::core::config::KeyStatus;
use crate::core::errors::{Denial, Reason};
#[cfg(test)]
use crate::core::net::parse_cidr;
use crate::core::table::{Group, KeyRecord};
use ipnet::IpNet;
use std::net::IpAddr;

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as the IPv4 address it stands for.
#[inline]
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The client IP: the socket peer, or, when the peer is a trusted proxy, the right-most
/// `X-Forwarded-For` entry that is not itself a trusted proxy. Unparseable entries stop the walk
/// (what lies left of them cannot be trusted either) and the last trusted hop is used.
pub fn client_ip(peer: IpAddr, forwarded_for: &[&[u8]], trusted: &[IpNet]) -> IpAddr {
    let peer = canonical_ip(peer);
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if trusted.is_empty() || !is_trusted(&peer) {
        return peer;
    }
    let mut current = peer;
    // Later header lines are appended by closer proxies: walk them right to left.
    for line in forwarded_for.iter().rev() {
        for entry in line.rsplit(|&b| b == b',') {
            let Some(ip) = std::str::from_utf8(entry)
                .ok()
                .and_then(|s| s.trim().parse::<IpAddr>().ok())
            else {
                return current;
            };
            current = canonical_ip(ip);
            if !is_trusted(&current) {
                return current;
            }
        }
    }
    current
}

/// Status and expiry: `key_disabled`, then `key_expired`.
#[inline]
pub fn check_key_state(key: &KeyRecord, now_unix: i64) -> Result<(), Denial> {
    if key.status == KeyStatus::Disabled {
        return Err(Denial::new(Reason::KeyDisabled));
    }
    if let Some(exp) = key.expires_at {
        if now_unix >= exp {
            return Err(Denial::new(Reason::KeyExpired));
        }
    }
    Ok(())
}

/// The key's IP whitelist.
#[inline]
pub fn check_ip(key: &KeyRecord, ip: IpAddr) -> Result<(), Denial> {
    match &key.allow_ips {
        None => Ok(()),
        Some(nets) => {
            let ip = canonical_ip(ip);
            if nets.iter().any(|n| n.contains(&ip)) {
                Ok(())
            } else {
                Err(Denial::with_message(
                    Reason::IpNotAllowed,
                    format!("This API key may not be used from {ip}."),
                ))
            }
        }
    }
}

/// Whether the key and its group both allow `model`.
#[inline]
pub fn model_allowed(key: &KeyRecord, group: &Group, model: &str) -> bool {
    key.models.as_ref().is_none_or(|m| m.allows(model))
        && group.models.as_ref().is_none_or(|m| m.allows(model))
}

/// The key's and its group's model restrictions.
#[inline]
pub fn check_model(key: &KeyRecord, group: &Group, model: &str) -> Result<(), Denial> {
    if model_allowed(key, group, model) {
        Ok(())
    } else {
        Err(Denial::with_message(
            Reason::ModelNotAllowed,
            format!(
                "This API key may not use the model {:?}.",
                model.chars().take(64).collect::<String>()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::table::{key_digest, KeyTable};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_peers() {
        let trusted = vec![parse_cidr("10.0.0.0/8").unwrap()];
        let xff: &[&[u8]] = &[b"1.1.1.1, 203.0.113.9, 10.0.0.2"];
        assert_eq!(client_ip(ip("10.0.0.1"), xff, &trusted), ip("203.0.113.9"));
        assert_eq!(client_ip(ip("192.0.2.1"), xff, &trusted), ip("192.0.2.1"));
        assert_eq!(client_ip(ip("10.0.0.1"), &[], &trusted), ip("10.0.0.1"));
        assert_eq!(
            client_ip(ip("10.0.0.1"), &[b"garbage"], &trusted),
            ip("10.0.0.1")
        );
        assert_eq!(client_ip(ip("10.0.0.1"), xff, &[]), ip("10.0.0.1"));
    }

    #[test]
    fn mapped_v6_peer_matches_v4_cidr() {
        let t = KeyTable::from_json(
            br#"{"keys":[{"id":1,"key":"a","allow_ips":["203.0.113.0/24","2001:db8::/32"]}]}"#,
            "t",
        )
        .unwrap();
        let k = t.lookup(&key_digest(b"a")).unwrap();
        assert!(check_ip(k, ip("::ffff:203.0.113.7")).is_ok());
        assert!(check_ip(k, ip("2001:db8::1")).is_ok());
        assert_eq!(
            check_ip(k, ip("198.51.100.1")).unwrap_err().reason,
            Reason::IpNotAllowed
        );
    }

    #[test]
    fn state_checks() {
        let t = KeyTable::from_json(
            br#"{"keys":[{"id":1,"key":"a","status":"disabled","expires_at":10},{"id":2,"key":"b","expires_at":10}]}"#,
            "t",
        )
        .unwrap();
        let a = t.lookup(&key_digest(b"a")).unwrap();
        let b = t.lookup(&key_digest(b"b")).unwrap();
        assert_eq!(
            check_key_state(a, 100).unwrap_err().reason,
            Reason::KeyDisabled
        );
        assert_eq!(
            check_key_state(b, 100).unwrap_err().reason,
            Reason::KeyExpired
        );
        assert!(check_key_state(b, 9).is_ok());
    }

    #[test]
    fn group_narrows_key_models() {
        let t = KeyTable::from_json(
            br#"{"groups":{"default":{"models":["gpt-4o*"]}},"keys":[{"id":1,"key":"a","models":["gpt-4o-mini","o1"]}]}"#,
            "t",
        )
        .unwrap();
        let k = t.lookup(&key_digest(b"a")).unwrap();
        let g = t.group_of(k);
        assert!(check_model(k, g, "gpt-4o-mini").is_ok());
        assert!(check_model(k, g, "o1").is_err());
        assert!(check_model(k, g, "gpt-4o").is_err());
    }
}

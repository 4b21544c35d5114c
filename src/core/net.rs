//! Parsing the IP lists of the config and the sync file. Pure.

use ipnet::IpNet;
use std::net::IpAddr;

/// Parse an IP or a CIDR (v4 or v6); a bare IP becomes a /32 or /128.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    // A network has a `/`, an address has none: the network parser is slow to refuse an
    // address, and a sync file may hold a million of them.
    let net = if t.contains('/') {
        t.parse::<IpNet>().map(|net| net.trunc()).ok()
    } else {
        t.parse::<IpAddr>().map(IpNet::from).ok()
    };
    net.ok_or_else(|| format!("bad CIDR {s:?}"))
}

//! Parsing the IP lists of the config and the sync file. Pure.

use ipnet::IpNet;
use std::net::IpAddr;

/// Parse an IP or a CIDR (v4 or v6); a bare IP becomes a /32 or /128.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    if let Ok(net) = t.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    t.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("bad CIDR {s:?}"))
}

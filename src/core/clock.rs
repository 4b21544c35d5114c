//! The wall clock in unix seconds. Pure (reads the system clock, nothing else).

use std::time::{SystemTime, UNIX_EPOCH};

/// Current unix time in seconds.
pub fn unix_now() -> i64 {
    unix_secs(SystemTime::now())
}

/// `t` in unix seconds.
pub fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

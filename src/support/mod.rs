//! Leaf helpers any layer may use. They import nothing from the crate, except `sync_file`,
//! which opens a sync file on the disk for the pure loader in `core::table` (so the startup
//! load in `gate`, the reloader in `sync` and the CLI read it one way).

pub mod fsutil;
pub mod memory;
pub mod sync_file;

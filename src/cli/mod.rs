//! What the `keygate` binary's commands are built from besides the gateway itself: the new-api
//! import, the demo and its built-in mock backend, the key vault's commands, and the usage
//! store's report.

pub mod accounts;
pub mod demo;
pub mod import;
pub mod keys;
pub mod mock;
pub mod mock_faults;
mod mock_routes;
pub mod usage;
pub mod vault;

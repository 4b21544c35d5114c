//! What the `keygate` binary's commands are built from besides the gateway itself: the new-api
//! import, the demo and its built-in mock backend, the key vault's commands.

pub mod accounts;
pub mod demo;
pub mod import;
pub mod mock;
pub mod mock_faults;
mod mock_routes;
pub mod vault;

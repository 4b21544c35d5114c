//! The sync file's life after startup: reloading it when it changes, and editing it safely
//! (locked, validated, atomic) for the CLI, and the key vault's use of it.

pub mod accounts;
pub mod edit;
pub mod reload;
pub mod spending;
pub mod vault;

//! The sync file's life after startup: reloading it when it changes, and editing it safely
//! (locked, validated, atomic) for the CLI.

pub mod accounts;
pub mod edit;
pub mod reload;
pub mod spending;

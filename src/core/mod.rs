//! The pure core: the config and sync-file schema as plain data, the compiled key table, the
//! checks, pricing, credential and model extraction, the error answers and the metric series.
//! Nothing here knows Pingora, tokio or the disk (the one exception: [`config::Config::load`]
//! reads the file it is given; a sync file is read through a reader the caller opens,
//! `crate::support::sync_file`).

pub mod accounts;
pub mod admin_config;
pub mod admission;
pub mod alerts;
pub mod budget;
pub mod clock;
pub mod config;
pub mod credential;
pub mod errors;
pub mod journal;
pub mod json_scan;
pub mod limits;
pub mod metrics;
pub mod models;
pub mod net;
pub mod policy;
pub mod pools;
pub mod pricing;
pub mod request_json;
pub mod store_config;
pub mod sync_schema;
pub mod table;
pub mod url;
pub mod vault;

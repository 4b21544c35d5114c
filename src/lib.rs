//! keygate: an edge gateway for LLM APIs, as a Pingora plugin and a ready reverse proxy.
//!
//! On every request keygate decides whether this API key may make this call (status, expiry,
//! client IP, model and group), and passes the call through with the client's key swapped for
//! the upstream's own. The key table comes from a sync file (SPEC §2), compiled into an immutable
//! table and published through `arc-swap`; a request keeps the snapshot it started with.
//!
//! # Layers
//!
//! The folders are the layers, bottom first. **Every import points down a layer** (or stays in
//! its own), never up, and no modules import each other around a loop; `tests/layers.rs`
//! fails on either.
//!
//! 0. [`core`]: pure. The config and sync-file schema as plain data, the compiled key table,
//!    the checks, pricing, credential and model extraction, the refusals, the metric series,
//!    key hints and the key vault's seal and open.
//!    Nothing of Pingora, tokio or the disk. [`support`]: leaf helpers (atomic file writes,
//!    giving memory back).
//! 1. [`ledger`]: reserve, settle, persist (local, or leases on Redis); the only place
//!    counters change. [`usage`]: usage read from responses; the usage log.
//! 2. [`upstream`]: the upstream pools: which pool serves a model, choosing a target, retry
//!    policy and budget, cooldowns, health.
//! 3. [`gate`]: [`Gate`], the Pingora phases, one concern per file, and the answers keygate
//!    gives itself.
//! 4. [`ops`]: the server, connection limits, the metrics listener, the ready proxy;
//!    [`sync`]: reloading and editing the sync file, the key vault's secret, reveal and rekey.
//! 5. [`cli`]: the import, the demo and its mock backend; [`admin`]: the admin API and the
//!    console; [`fuzzing`]: fuzz entry points.
//!
//! # Embedding `Gate` in your own Pingora proxy
//!
//! [`Gate`] has one method per Pingora phase. Call them from yours; everything else in your
//! `ProxyHttp` stays your own. `fail_to_connect` and `error_while_proxy` are what make a
//! pool retry a failed attempt on another target: Pingora's defaults never retry a POST once
//! connected, so without the gate's a failed attempt ends the request with a 502.
//!
//! ```no_run
//! use async_trait::async_trait;
//! use bytes::Bytes;
//! use keygate::{Gate, GateCtx, GateOptions, KeyTable, Upstreams};
//! use keygate::config::PoolConfig;
//! use pingora::http::{RequestHeader, ResponseHeader};
//! use pingora::prelude::*;
//! use pingora::proxy::{FailToProxy, ProxyHttp, Session};
//! use std::time::Duration;
//!
//! struct MyProxy { gate: Gate }
//!
//! #[async_trait]
//! impl ProxyHttp for MyProxy {
//!     type CTX = GateCtx;
//!     fn new_ctx(&self) -> GateCtx { self.gate.new_ctx() }
//!     async fn request_filter(&self, s: &mut Session, ctx: &mut GateCtx) -> Result<bool> {
//!         // your own checks may run before or after keygate's
//!         self.gate.request_filter(s, ctx).await
//!     }
//!     // Called again for each retry: the pool's next target.
//!     async fn upstream_peer(&self, _s: &mut Session, ctx: &mut GateCtx) -> Result<Box<HttpPeer>> {
//!         self.gate.upstream_peer(ctx)
//!     }
//!     async fn upstream_request_filter(&self, s: &mut Session, r: &mut RequestHeader, ctx: &mut GateCtx) -> Result<()> {
//!         self.gate.upstream_request_filter(s, r, ctx).await
//!     }
//!     // Replays the whole body on a retry.
//!     async fn request_body_filter(&self, s: &mut Session, b: &mut Option<Bytes>, eos: bool, ctx: &mut GateCtx) -> Result<()> {
//!         self.gate.request_body_filter(s, b, eos, ctx).await
//!     }
//!     // Takes Retry-After as a cooldown, and turns a retryable status into a retry.
//!     async fn response_filter(&self, s: &mut Session, r: &mut ResponseHeader, ctx: &mut GateCtx) -> Result<()> {
//!         self.gate.response_filter(s, r, ctx).await
//!     }
//!     // Reads the usage the call is charged for.
//!     fn response_body_filter(&self, s: &mut Session, b: &mut Option<Bytes>, eos: bool, ctx: &mut GateCtx) -> Result<Option<Duration>> {
//!         self.gate.response_body_filter(s, b, eos, ctx)
//!     }
//!     // Retries: marks the error retryable when the pool's policy and budget allow.
//!     fn fail_to_connect(&self, s: &mut Session, peer: &HttpPeer, ctx: &mut GateCtx, e: Box<Error>) -> Box<Error> {
//!         self.gate.fail_to_connect(s, peer, ctx, e)
//!     }
//!     // Retries after connecting, only while nothing of the answer reached the client.
//!     fn error_while_proxy(&self, peer: &HttpPeer, s: &mut Session, e: Box<Error>, ctx: &mut GateCtx, reused: bool) -> Box<Error> {
//!         self.gate.error_while_proxy(peer, s, e, ctx, reused)
//!     }
//!     // keygate's own 502/504/429 in the client's error shape, or an in-band stream error.
//!     async fn fail_to_proxy(&self, s: &mut Session, e: &Error, ctx: &mut GateCtx) -> FailToProxy {
//!         self.gate.fail_to_proxy(s, e, ctx).await
//!     }
//!     // Settles the quota once, writes the usage record and the metrics.
//!     async fn logging(&self, s: &mut Session, e: Option<&Error>, ctx: &mut GateCtx) {
//!         self.gate.logging(s, e, ctx).await
//!     }
//!     // Error logs without credentials.
//!     fn request_summary(&self, s: &Session, _ctx: &GateCtx) -> String {
//!         keygate::gate::request_summary(s.req_header())
//!     }
//! }
//!
//! fn main() {
//!     let table = KeyTable::load(std::path::Path::new("conf/keys.json")).unwrap();
//!     // A pool as in the config file (SPEC §11): two replicas, a failed attempt retried on
//!     // the other before the first byte of the answer.
//!     let pool: PoolConfig = serde_norway::from_str(
//!         "name: vllm
//! models: ['*']
//! targets:
//!   - { url: 'http://127.0.0.1:8000' }
//!   - { url: 'http://127.0.0.1:8001' }
//! retry: { attempts: 2, on: [connect, timeout, 502, 503], budget_percent: 20 }
//! health: { path: /v1/models, interval_seconds: 10 }",
//!     )
//!     .unwrap();
//!     let upstreams = Upstreams::from_pools(&[pool]).unwrap();
//!     let gate = Gate::new(table, upstreams, GateOptions::default()).unwrap();
//!     // The active health checks of the pools with `health:` (a thread of their own).
//!     let _health = gate.upstreams().start_health_checks().unwrap();
//!     let mut server = Server::new(None).unwrap();
//!     server.bootstrap();
//!     let mut svc = pingora::proxy::http_proxy_service(&server.configuration, MyProxy { gate });
//!     svc.add_tcp("127.0.0.1:8080");
//!     server.add_service(svc);
//!     server.run_forever();
//! }
//! ```

// No panics on input: `unwrap`/`expect` are for tests only (CI runs clippy with -D warnings).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod cli;
pub mod core;
pub mod fuzzing;
pub mod gate;
pub mod ledger;
pub mod ops;
pub mod support;
pub mod sync;
pub mod upstream;
pub mod usage;

pub use crate::cli::mock;
pub use crate::core::config;
pub use crate::core::errors::{Denial, ErrorShape, Reason};
pub use crate::core::table::KeyTable;
pub use crate::gate::{Gate, GateCtx, GateOptions, Outcome};
pub use crate::ops::proxy::KeygateProxy;
pub use crate::ops::server;
pub use crate::upstream::Upstreams;

//! `Gate`: the plugin API. One method per Pingora phase, called from a host's own `ProxyHttp`
//! (or from [`crate::proxy::KeygateProxy`]); plus the pure admission core they are built on.
//!
//! A request's path: [`Gate::request_filter`] takes one table snapshot, finds the credential,
//! checks the key (status, expiry, IP), reads the body up to the cap, finds the model, checks it
//! against the key and its group, and picks the upstream. A refusal is written there and the
//! phase returns `Ok(true)`. [`Gate::upstream_request_filter`] swaps the client's credential for
//! the upstream's; [`Gate::request_body_filter`] forwards the buffered body;
//! [`Gate::logging`] records the outcome. The quota reservation (SPEC §4) is taken at the end of
//! `request_filter` and settled in `logging`.

use crate::config::Config;
use crate::credential::{self, CredentialStyle, ModelField};
use crate::errors::{Denial, ErrorShape, Reason};
use crate::ledger::{Ledger, Reservation, ReserveError};
use crate::metrics::{model_label, CallSeries, Metrics};
use crate::policy;
use crate::pricing::{self, PriceRule, Usage};
use crate::proxy::Upstreams;
use crate::table::{key_digest, Digest, KeyRecord, KeyTable};
use crate::usage::{PartialUsage, SseTracker, UsageLog, UsageRecord};
use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, Session};
use pingora::{Error, ErrorType, Result};
use prometheus::Histogram;
use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Pingora's retry buffer holds this much of a request body; a body read early must reach the
/// upstream through it (see [`Gate::request_filter`]).
const RETRY_BUFFER_LIMIT: usize = 64 * 1024;

/// A refused request whose unread body is at most this large is drained so the connection can
/// be kept alive; a larger one closes the connection.
const DRAIN_LIMIT: u64 = 64 * 1024;
/// How long that drain may take.
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// A JSON response larger than this is not parsed for usage (the call is charged an estimate).
const MAX_USAGE_BODY: usize = 16 * 1024 * 1024;

/// Current unix time in seconds.
pub fn unix_now() -> i64 {
    unix_secs(SystemTime::now())
}

/// `t` in unix seconds.
fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A key that passed the header-only checks (credential, lookup, status, expiry, IP).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyAdmission {
    /// The key's digest in the table snapshot.
    pub digest: Digest,
    /// Its slot in that snapshot ([`KeyTable::at_slot`]).
    pub slot: u32,
    /// The key's id.
    pub key_id: u64,
    /// Where the client put the key.
    pub style: CredentialStyle,
    /// The client IP the checks used.
    pub client_ip: IpAddr,
}

impl std::fmt::Debug for KeyAdmission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAdmission")
            .field("key_id", &self.key_id)
            .field("style", &self.style)
            .field("client_ip", &self.client_ip)
            .finish()
    }
}

/// The header-only checks, in the spec's order: credential, lookup, status, expiry, IP.
/// Pure: no I/O, no Pingora types.
#[inline]
pub fn admit_key(
    table: &KeyTable,
    headers: &HeaderMap,
    query: Option<&str>,
    peer: IpAddr,
    trusted_proxies: &[IpNet],
    now_unix: i64,
) -> std::result::Result<KeyAdmission, Denial> {
    admit_key_for(table, headers, query, peer, trusted_proxies, Some(now_unix))
}

/// [`admit_key`], with the expiry check skipped when `now_unix` is `None` (the read-only usage
/// endpoints, which expired keys may still read).
pub fn admit_key_for(
    table: &KeyTable,
    headers: &HeaderMap,
    query: Option<&str>,
    peer: IpAddr,
    trusted_proxies: &[IpNet],
    now_unix: Option<i64>,
) -> std::result::Result<KeyAdmission, Denial> {
    let cred = credential::find_credential(headers, query).ok_or(Reason::MissingApiKey)?;
    let digest = key_digest(&cred.secret);
    let (slot, key) = table.lookup_slot(&digest).ok_or(Reason::InvalidApiKey)?;
    policy::check_key_state(key, now_unix.unwrap_or(i64::MIN))?;
    let client_ip = if trusted_proxies.is_empty() {
        policy::canonical_ip(peer)
    } else {
        let xff: Vec<&[u8]> = headers
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        policy::client_ip(peer, &xff, trusted_proxies)
    };
    policy::check_ip(key, client_ip)?;
    Ok(KeyAdmission {
        digest,
        slot,
        key_id: key.id,
        style: cred.style,
        client_ip,
    })
}

/// The model checks: allowed for the key and its group, then served by an upstream.
/// Returns the upstream's index. Pure.
#[inline]
pub fn admit_model(
    table: &KeyTable,
    key: &KeyRecord,
    upstreams: &Upstreams,
    model: &str,
) -> std::result::Result<usize, Denial> {
    policy::check_model(key, table.group_of(key), model)?;
    upstreams.route(model).ok_or_else(|| {
        Denial::with_message(
            Reason::ModelNotFound,
            format!(
                "The model {:?} is not served by this gateway.",
                model.chars().take(64).collect::<String>()
            ),
        )
    })
}

/// The model a request names: a Gemini path, the JSON body's `model`, a multipart `model`
/// field, or `?model=`, in that order. `Ok(None)` when there is none.
pub fn find_model<'a>(
    path: &'a str,
    query: Option<&'a str>,
    content_type: Option<&str>,
    body: &'a [u8],
) -> std::result::Result<(Option<Cow<'a, str>>, BodyFacts), Denial> {
    let mut facts = BodyFacts::default();
    let ct = content_type.unwrap_or("").trim_start().to_ascii_lowercase();
    // Percent-decoded, as the upstream will read it (`gemini-1.5-pr%6F` is `gemini-1.5-pro`).
    let mut model = credential::gemini_model(path)
        .map(|m| percent_encoding::percent_decode_str(m).decode_utf8_lossy());
    if model.is_some() {
        // The model is in the path; the body is the upstream's business.
    } else if ct.starts_with("multipart/form-data") {
        model = credential::multipart_model(content_type.unwrap_or(""), body)?.map(Cow::Owned);
    } else if ct.contains("json") || body.trim_ascii_start().first() == Some(&b'{') {
        let fields = credential::parse_json_fields(body)?;
        facts = BodyFacts {
            stream: fields.stream,
            include_usage: fields.include_usage,
            max_tokens: fields.max_tokens,
            has_stream_options: fields.has_stream_options,
            is_json: true,
        };
        match fields.model {
            ModelField::Str(s) => model = Some(s),
            ModelField::NotAString => return Err(Denial::new(Reason::InvalidModel)),
            ModelField::Absent => {}
        }
    } else if !body.is_empty() && ct.is_empty() {
        // A body with no content type that is not a JSON object.
        credential::parse_json_fields(body)?;
    }
    if model.is_none() && body.is_empty() {
        // `?model=` names the model only for requests without a body (realtime): a body that
        // names none must not be routed and priced by the query while it says otherwise.
        model = query.and_then(|q| credential::query_param(q, "model"));
    }
    match model {
        Some(m) if m.len() > credential::MAX_MODEL_LEN => Err(Denial::with_message(
            Reason::InvalidModel,
            format!(
                "The model name is longer than {} bytes.",
                credential::MAX_MODEL_LEN
            ),
        )),
        Some(m) if m.is_empty() => Ok((None, facts)),
        m => Ok((m, facts)),
    }
}

/// What the body says about the call, for the quota reservation and usage accounting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BodyFacts {
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage` as the client sent it.
    pub include_usage: Option<bool>,
    /// The completion budget the client asked for.
    pub max_tokens: Option<u64>,
    /// The body has a top-level `stream_options`.
    pub has_stream_options: bool,
    /// The body was read as JSON.
    pub is_json: bool,
}

/// How a request ended, for metrics and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Outcome {
    /// Not decided yet.
    #[default]
    Pending,
    /// Forwarded upstream.
    Admitted,
    /// Refused by keygate.
    Denied(Reason),
    /// Answered by keygate itself (`/v1/models`).
    Local,
    /// Admitted, but the upstream failed.
    Failed(Reason),
}

impl Outcome {
    fn label(self) -> (&'static str, Option<Reason>) {
        match self {
            Outcome::Pending => ("pending", None),
            Outcome::Admitted => ("admitted", None),
            Outcome::Denied(r) => ("denied", Some(r)),
            Outcome::Local => ("local", None),
            Outcome::Failed(r) => ("failed", Some(r)),
        }
    }
}

/// Per-request state. Create with [`Gate::new_ctx`]; read it from any phase.
#[derive(Default)]
pub struct GateCtx {
    request_id: Option<HeaderValue>,
    shape: ErrorShape,
    table: Option<Arc<KeyTable>>,
    key: Option<KeyAdmission>,
    model: Option<String>,
    upstream: Option<usize>,
    body: Option<Bytes>,
    facts: BodyFacts,
    outcome: Outcome,
    gate_time: Duration,
    started: Option<Instant>,
    /// The wall-clock time at `started`.
    started_at: Option<SystemTime>,
    upstream_started: Option<Instant>,
    first_byte: Option<Instant>,
    reservation: Option<Reservation>,
    price: Option<PriceRule>,
    estimate: Usage,
    strip_usage: bool,
    status: u16,
    sse: Option<SseTracker>,
    json_body: Vec<Bytes>,
    json_len: usize,
    charged: Option<(Usage, i64)>,
    /// The series the settled call was counted in.
    series: Option<Arc<CallSeries>>,
    embedding: bool,
    json_response: bool,
}

impl Drop for GateCtx {
    /// A request dropped with its reservation still held (its task was cancelled: a shutdown
    /// past the grace period) was being answered: charge what was streamed rather than refund.
    fn drop(&mut self) {
        let Some(r) = self.reservation.take() else {
            return;
        };
        if !(200..400).contains(&self.status) {
            return; // dropped unsettled: the reservation refunds itself
        }
        let (Some(table), Some(key)) = (self.table.as_ref(), self.key_record()) else {
            return;
        };
        let (usage, _) = final_usage(self, true);
        r.settle(price_of(table, key, self.price, usage));
    }
}

impl GateCtx {
    /// The request id sent upstream and back to the client.
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_ref().and_then(|v| v.to_str().ok())
    }
    /// The admitted key's id.
    pub fn key_id(&self) -> Option<u64> {
        self.key.map(|k| k.key_id)
    }
    /// The model the request names.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
    /// The chosen upstream's index.
    pub fn upstream(&self) -> Option<usize> {
        self.upstream
    }
    /// How the request ended (so far).
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }
    /// What the body said (stream, include_usage, max_tokens).
    pub fn body_facts(&self) -> BodyFacts {
        self.facts
    }
    /// The client IP used for the checks.
    pub fn client_ip(&self) -> Option<IpAddr> {
        self.key.map(|k| k.client_ip)
    }
    /// Time spent in keygate's own logic so far (I/O excluded).
    pub fn gate_time(&self) -> Duration {
        self.gate_time
    }
    /// The units reserved for this call, while the reservation is outstanding.
    pub fn reserved(&self) -> Option<i64> {
        self.reservation.as_ref().map(|r| r.amount())
    }
    /// What the call was charged once settled: tokens and quota units.
    pub fn charged(&self) -> Option<(Usage, i64)> {
        self.charged
    }
    fn path_hint(&self) -> bool {
        self.embedding
    }
    fn key_record(&self) -> Option<&KeyRecord> {
        let key = self.key.as_ref()?;
        self.table.as_ref()?.at_slot(key.slot)
    }
}

/// Settings the gate needs besides the key table and the upstreams.
#[derive(Clone, Debug)]
pub struct GateOptions {
    /// Largest request body accepted, bytes.
    pub max_body_bytes: u64,
    /// Time the whole request body may take to arrive (408 after it).
    pub body_read_timeout: Duration,
    /// Seconds a kept-alive client connection may idle before its next request, set on each
    /// session as Pingora's keep-alive timeout; `None` leaves it to the connection layer (the
    /// keygate server's [`crate::limits::Limited`] times it; Pingora alone has no limit once a
    /// request has been served).
    pub keepalive_timeout_seconds: Option<u64>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Completion tokens reserved when a call names no `max_tokens`.
    pub default_max_tokens: u64,
    /// Where consumed quota is persisted; `None` keeps it in memory only. With a shared
    /// ledger, only read: what it holds is added to Redis once (see [`Ledger::redis`]).
    pub state_dir: Option<PathBuf>,
    /// Keep the counters in Redis, shared with other gateways, instead of this process.
    pub shared_ledger: Option<crate::ledger::RedisSettings>,
    /// The usage log; `None` for none.
    pub usage_log: Option<PathBuf>,
    /// One access-log line per request.
    pub access_log: bool,
    /// Per-key metric series.
    pub per_key_metrics: bool,
    /// This process is the new binary of an upgrade (see [`Ledger::open_with`]).
    pub upgrade: bool,
}

impl Default for GateOptions {
    fn default() -> Self {
        GateOptions {
            max_body_bytes: 10 * 1024 * 1024,
            body_read_timeout: Duration::from_secs(60),
            keepalive_timeout_seconds: Some(60),
            trusted_proxies: Vec::new(),
            default_max_tokens: 1024,
            state_dir: None,
            shared_ledger: None,
            usage_log: None,
            access_log: false,
            per_key_metrics: false,
            upgrade: false,
        }
    }
}

struct Inner {
    table: Arc<ArcSwap<KeyTable>>,
    upstreams: Upstreams,
    options: GateOptions,
    metrics: Arc<Metrics>,
    /// `keygate_upstream_duration_seconds` of each upstream, in their order.
    upstream_durations: Vec<Histogram>,
    ledger: Ledger,
    usage_log: Option<UsageLog>,
    access_log: Option<crate::usage::LineSink>,
    id_prefix: String,
    id_counter: AtomicU64,
    draining: std::sync::atomic::AtomicBool,
}

/// The gate. Cheap to clone; all clones share the table, upstreams and metrics.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<Inner>,
}

enum BodyError {
    Denied(Denial),
    Fault(Box<Error>),
}

impl Gate {
    /// A gate over `table` routing to `upstreams`; opens the ledger in `options.state_dir`
    /// (in memory when `None`) and the usage log.
    pub fn new(
        table: KeyTable,
        upstreams: Upstreams,
        options: GateOptions,
    ) -> std::result::Result<Gate, String> {
        let ledger = match (&options.shared_ledger, &options.state_dir) {
            (Some(settings), dir) => Ledger::redis(settings.clone(), dir.as_deref())
                .map_err(|e| format!("ledger: {e}"))?,
            (None, Some(dir)) => Ledger::open_with(dir, options.upgrade)
                .map_err(|e| format!("state_dir {}: {e}", dir.display()))?,
            (None, None) => Ledger::in_memory(),
        };
        let usage_log = match &options.usage_log {
            Some(p) => {
                Some(UsageLog::open(p).map_err(|e| format!("usage_log {}: {e}", p.display()))?)
            }
            None => None,
        };
        let access_log = if options.access_log {
            Some(crate::usage::LineSink::stderr().map_err(|e| format!("access log: {e}"))?)
        } else {
            None
        };
        let mut seed = [0u8; 4];
        let _ = getrandom::fill(&mut seed);
        let metrics = Metrics::new();
        metrics.observe_table(&table, unix_now());
        for u in upstreams.iter() {
            for kind in ["connect", "timeout", "broken", "status_5xx"] {
                metrics
                    .upstream_errors
                    .with_label_values(&[u.name.as_str(), kind]);
            }
        }
        metrics.reloads.with_label_values(&["ok"]).inc();
        let upstream_durations = upstreams
            .iter()
            .map(|u| {
                metrics
                    .upstream_duration
                    .with_label_values(&[u.name.as_str()])
            })
            .collect();
        Ok(Gate {
            inner: Arc::new(Inner {
                table: Arc::new(ArcSwap::from_pointee(table)),
                upstreams,
                options,
                metrics,
                upstream_durations,
                ledger,
                usage_log,
                access_log,
                id_prefix: hex::encode(seed),
                id_counter: AtomicU64::new(0),
                draining: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// From now on every response closes its connection (`Connection: close`), so clients move
    /// to the new process of an upgrade (or go away before a shutdown) without racing a close.
    pub fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::Release);
    }

    fn draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// The quota ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.inner.ledger
    }

    /// The usage log, when configured.
    pub fn usage_log(&self) -> Option<&UsageLog> {
        self.inner.usage_log.as_ref()
    }

    /// After the server stopped: flush the usage log and write exact ledger values; after a
    /// binary upgrade (`handed_over`), hand them to the new process instead.
    pub fn shutdown(&self, handed_over: bool) {
        if let Some(log) = &self.inner.usage_log {
            log.flush(Duration::from_secs(5));
        }
        let done = if handed_over {
            self.inner.ledger.handoff()
        } else {
            self.inner.ledger.shutdown()
        };
        if let Err(e) = done {
            log::error!("ledger: final write failed: {e}");
        }
    }

    /// A gate from a loaded config: reads the sync file, builds the upstreams.
    pub fn from_config(config: &Config) -> std::result::Result<Gate, String> {
        Gate::from_config_with(config, false)
    }

    /// [`Gate::from_config`], as the new binary of an upgrade when `upgrade`.
    pub fn from_config_with(config: &Config, upgrade: bool) -> std::result::Result<Gate, String> {
        // Loaded on a thread that then exits, as reloads are: an allocator returns a table's
        // memory to the system only through a thread that collects (see `memory`), and the
        // thread calling this one parks in the server for good.
        let path = &config.sync_file;
        let table = std::thread::scope(|s| s.spawn(|| KeyTable::load(path)).join())
            .map_err(|_| "loading the sync file failed".to_string())?
            .map_err(|e| e.to_string())?;
        let upstreams = Upstreams::from_config(&config.upstreams)?;
        let trusted_proxies = config
            .trusted_proxies
            .iter()
            .map(|c| policy::parse_cidr(c))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Gate::new(
            table,
            upstreams,
            GateOptions {
                max_body_bytes: config.max_body_bytes,
                body_read_timeout: Duration::from_secs(config.body_read_timeout_seconds),
                // The server's connection guard times it (see `server::conn_limits`).
                keepalive_timeout_seconds: None,
                trusted_proxies,
                default_max_tokens: config.default_max_tokens,
                state_dir: Some(config.state_dir.clone()),
                shared_ledger: crate::ledger::RedisSettings::from_config(&config.ledger),
                usage_log: config.usage_log.clone(),
                access_log: config.access_log,
                per_key_metrics: config.metrics.per_key,
                upgrade,
            },
        )
    }

    /// The current table snapshot.
    pub fn table(&self) -> Arc<KeyTable> {
        self.inner.table.load_full()
    }

    /// The shared handle the table is published through.
    pub fn table_handle(&self) -> Arc<ArcSwap<KeyTable>> {
        self.inner.table.clone()
    }

    /// Publish a new table; requests already running keep the one they started with.
    pub fn swap_table(&self, table: KeyTable) {
        self.inner.metrics.observe_table(&table, unix_now());
        self.inner.table.store(Arc::new(table));
    }

    /// The metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.inner.metrics.clone()
    }

    /// The upstreams.
    pub fn upstreams(&self) -> &Upstreams {
        &self.inner.upstreams
    }

    /// A fresh per-request context.
    pub fn new_ctx(&self) -> GateCtx {
        GateCtx::default()
    }

    fn request_id_for(&self, req: &RequestHeader) -> HeaderValue {
        if let Some(v) = req.headers.get("x-request-id") {
            if credential::sane_request_id(v.as_bytes()) {
                return v.clone();
            }
        }
        self.new_request_id()
    }

    /// A fresh request id (`kg-{process}-{n}`), for answers given outside a request's phases.
    pub fn new_request_id(&self) -> HeaderValue {
        let n = self.inner.id_counter.fetch_add(1, Ordering::Relaxed);
        let mut id = [0u8; 64];
        let len = request_id_text(self.inner.id_prefix.as_bytes(), n, &mut id);
        HeaderValue::from_bytes(&id[..len]).unwrap_or(HeaderValue::from_static("kg"))
    }

    /// Phase `request_filter`: every check, the body read, the model and the upstream.
    /// Returns `Ok(true)` when keygate has answered (a refusal or a local endpoint).
    pub async fn request_filter(&self, session: &mut Session, ctx: &mut GateCtx) -> Result<bool> {
        let started = Instant::now();
        let now = SystemTime::now();
        ctx.started = Some(started);
        ctx.started_at = Some(now);
        // Pingora keeps an HTTP/1.1 connection open without limit once a request is read.
        if let Some(idle) = self.inner.options.keepalive_timeout_seconds {
            if session.get_keepalive().is_some() {
                session.set_keepalive(Some(idle));
            }
        }
        let req = session.req_header();
        ctx.request_id = Some(self.request_id_for(req));
        ctx.shape = ErrorShape::for_path(req.uri.path());
        ctx.embedding = req.uri.path().ends_with("/embeddings");
        let table = self.inner.table.load_full();
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
        let req = session.req_header();
        let read_only = req.method == http::Method::GET && is_usage_path(req.uri.path());
        let admitted = admit_key_for(
            &table,
            &req.headers,
            req.uri.query(),
            peer,
            &self.inner.options.trusted_proxies,
            (!read_only).then(|| unix_secs(now)),
        );
        ctx.table = Some(table);
        match admitted {
            Ok(k) => ctx.key = Some(k),
            Err(d) => {
                ctx.gate_time += started.elapsed();
                return self.deny(session, ctx, d).await;
            }
        }

        if read_only {
            if let Some(id) = ctx.key_id() {
                if !self.inner.ledger.refresh(id).await {
                    // Usage that only this gateway knows of would be wrong, not stale.
                    let d = Denial::new(Reason::QuotaBackendUnavailable);
                    return self.deny(session, ctx, d).await;
                }
            }
        }
        if let Some(answer) = self.local_answer(session.req_header(), ctx) {
            ctx.outcome = Outcome::Local;
            ctx.gate_time += started.elapsed();
            self.write_answer(session, ctx, 200, answer).await?;
            return Ok(true);
        }

        // Time spent waiting for the body is not keygate's: it is taken out of the gate time.
        let mut waited = Duration::ZERO;
        let body = match self.read_body(session, &mut waited).await {
            Ok(b) => b,
            Err(e) => {
                ctx.gate_time += started.elapsed().saturating_sub(waited);
                match e {
                    BodyError::Denied(d) => return self.deny(session, ctx, d).await,
                    BodyError::Fault(e) => return Err(e),
                }
            }
        };
        let decided = self.admit_call(session.req_header(), &body, ctx);
        if let Err(d) = decided {
            ctx.gate_time += started.elapsed().saturating_sub(waited);
            return self.deny(session, ctx, d).await;
        }
        let body = self.maybe_ask_for_usage(session.req_header(), body, ctx);
        if !body.is_empty() {
            ctx.body = Some(body);
        }
        ctx.gate_time += started.elapsed().saturating_sub(waited);
        match self.reserve(ctx).await {
            Ok(()) => {
                ctx.outcome = Outcome::Admitted;
                Ok(false)
            }
            Err(d) => self.deny(session, ctx, d).await,
        }
    }

    /// Price the call and reserve its estimate on the key's counter (one atomic operation).
    async fn reserve(&self, ctx: &mut GateCtx) -> std::result::Result<(), Denial> {
        // The table is shared (an `Arc`): the key is borrowed from it, not copied.
        let (Some(table), Some(slot), Some(model)) = (
            ctx.table.clone(),
            ctx.key.map(|k| k.slot),
            ctx.model.as_deref(),
        ) else {
            return Err(Denial::new(Reason::InvalidApiKey));
        };
        let Some(key) = table.at_slot(slot) else {
            return Err(Denial::new(Reason::InvalidApiKey));
        };
        let rule = table.price(model).and_then(PriceRule::from_entry);
        if rule.is_none() && !key.unlimited_quota {
            return Err(Denial::with_message(
                Reason::ModelNotPriced,
                format!(
                    "The model {:?} has no price on this gateway.",
                    model.chars().take(64).collect::<String>()
                ),
            ));
        }
        ctx.price = rule;
        let default_completion = if ctx.path_hint() {
            0
        } else {
            self.inner.options.default_max_tokens
        };
        let body_len = ctx.body.as_ref().map_or(0, |b| b.len());
        ctx.estimate = pricing::estimate(
            body_len,
            ctx.facts.is_json,
            ctx.facts.max_tokens,
            default_completion,
        );
        let amount = price_of(&table, key, ctx.price, ctx.estimate);
        let limit = (!key.unlimited_quota).then(|| key.quota.saturating_sub(key.used));
        match self.inner.ledger.reserve(key.id, limit, amount).await {
            Ok(r) => {
                ctx.reservation = Some(r);
                Ok(())
            }
            Err(ReserveError::Insufficient { remaining }) => Err(Denial::with_message(
                Reason::InsufficientQuota,
                format!(
                    "This API key has {} quota units left; this call needs up to {amount}.",
                    remaining.max(0)
                ),
            )),
            Err(ReserveError::NotDurable | ReserveError::BackendUnavailable) => {
                Err(Denial::new(Reason::QuotaBackendUnavailable))
            }
        }
    }

    /// A streaming chat call whose client did not ask for the usage chunk gets
    /// `stream_options.include_usage` set, so the call can be charged exactly; the chunk is
    /// removed again from the response (see [`SseTracker`]).
    fn maybe_ask_for_usage(&self, req: &RequestHeader, body: Bytes, ctx: &mut GateCtx) -> Bytes {
        let path = req.uri.path();
        if !ctx.facts.stream
            || !ctx.facts.is_json
            || ctx.facts.include_usage == Some(true)
            || !(path == "/v1/chat/completions" || path == "/v1/completions")
        {
            return body;
        }
        let rewritten = if ctx.facts.has_stream_options {
            // Rare: a stream_options object without include_usage:true. Re-serialize.
            serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|mut v| {
                    let so = v.get_mut("stream_options")?;
                    if !so.is_object() {
                        *so = serde_json::json!({});
                    }
                    so["include_usage"] = serde_json::Value::Bool(true);
                    serde_json::to_vec(&v).ok()
                })
        } else {
            // Splice the member in after the opening brace; the object has at least `model`.
            body.iter().position(|&b| b == b'{').map(|i| {
                let mut v = Vec::with_capacity(body.len() + 40);
                v.extend_from_slice(&body[..=i]);
                v.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
                v.extend_from_slice(&body[i + 1..]);
                v
            })
        };
        match rewritten {
            Some(v) => {
                ctx.strip_usage = true;
                Bytes::from(v)
            }
            None => body,
        }
    }

    /// Model, key/group policy and routing for a request whose body has been read.
    fn admit_call(
        &self,
        req: &RequestHeader,
        body: &[u8],
        ctx: &mut GateCtx,
    ) -> std::result::Result<(), Denial> {
        let content_type = req
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let (model, facts) = find_model(req.uri.path(), req.uri.query(), content_type, body)?;
        ctx.facts = facts;
        let model = model.ok_or(Reason::ModelRequired)?;
        // Kept even when refused below, for the metrics (folded to `other` when unknown).
        ctx.model = Some(model.clone().into_owned());
        let (Some(table), Some(key)) = (ctx.table.as_ref(), ctx.key_record()) else {
            return Err(Denial::new(Reason::InvalidApiKey));
        };
        let upstream = admit_model(table, key, &self.inner.upstreams, &model)?;
        ctx.upstream = Some(upstream);
        Ok(())
    }

    /// Read the whole request body, up to `max_body_bytes`.
    ///
    /// Pingora forwards a body that was read before the upstream was chosen only through its
    /// retry buffer, which holds 64 KiB; a larger early-read body would never reach the
    /// upstream. So retry buffering is switched on just before the last 64 KiB of a body with a
    /// Content-Length: the buffer then holds that tail untruncated, Pingora replays it through
    /// `request_body_filter`, and [`Gate::request_body_filter`] swaps in the whole body. A
    /// chunked body has no known tail, so it is buffered from the start and must fit in 64 KiB
    /// (411 `length_required` above that).
    ///
    /// The time spent waiting for the body to arrive is added to `waited`.
    async fn read_body(
        &self,
        session: &mut Session,
        waited: &mut Duration,
    ) -> std::result::Result<Bytes, BodyError> {
        let cap = self.inner.options.max_body_bytes;
        let headers = &session.req_header().headers;
        // Whether there is a body is Pingora's call (it frames the request); any
        // Transfer-Encoding means the length is unknown, whatever the Content-Length says.
        let has_te = headers.contains_key(http::header::TRANSFER_ENCODING);
        let declared = match headers.get(http::header::CONTENT_LENGTH) {
            _ if has_te => None,
            None => None,
            Some(v) => Some(
                std::str::from_utf8(v.as_bytes())
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| {
                        BodyError::Denied(Denial::with_message(
                            Reason::InvalidJson,
                            "The Content-Length header is not a number.",
                        ))
                    })?,
            ),
        };
        if let Some(len) = declared {
            if len > cap {
                return Err(BodyError::Denied(Denial::with_message(
                    Reason::RequestTooLarge,
                    format!("The request body is {len} bytes; this gateway accepts at most {cap}."),
                )));
            }
        }
        let expects_continue = headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if session.is_body_empty() {
            return Ok(Bytes::new());
        }
        if expects_continue {
            session
                .write_continue_response()
                .await
                .map_err(BodyError::Fault)?;
        }

        let capacity = declared.map_or(RETRY_BUFFER_LIMIT as u64, |l| l.min(cap));
        let mut buf = BytesMut::with_capacity(usize::try_from(capacity).unwrap_or(0));
        let mut buffering = false;
        let timeout = self.inner.options.body_read_timeout;
        // When a read first had to wait: a small body has come with the head, and its read
        // needs no timer (nor a clock read).
        let mut waiting_since: Option<tokio::time::Instant> = None;
        loop {
            let remaining = declared.map(|l| l.saturating_sub(buf.len() as u64));
            if !buffering && remaining.is_none_or(|r| r <= RETRY_BUFFER_LIMIT as u64) {
                session.enable_retry_buffering();
                buffering = true;
            }
            let read = {
                let mut read = std::pin::pin!(session.read_request_body());
                match futures_util::poll!(read.as_mut()) {
                    Poll::Ready(r) => Ok(r),
                    Poll::Pending => {
                        let since = *waiting_since.get_or_insert_with(tokio::time::Instant::now);
                        tokio::time::timeout_at(since + timeout, read).await
                    }
                }
            };
            if let Some(since) = waiting_since {
                *waited = since.elapsed();
            }
            let Ok(read) = read else {
                return Err(BodyError::Denied(Denial::with_message(
                    Reason::RequestTimeout,
                    format!(
                        "The request body was not received within {} s.",
                        timeout.as_secs_f64()
                    ),
                )));
            };
            match read {
                Ok(Some(chunk)) => {
                    if (buf.len() + chunk.len()) as u64 > cap {
                        return Err(BodyError::Denied(Denial::with_message(
                            Reason::RequestTooLarge,
                            format!("The request body is larger than {cap} bytes."),
                        )));
                    }
                    buf.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(BodyError::Denied(Denial::with_message(
                        Reason::IncompleteBody,
                        format!("The request body could not be read: {:?}", e.etype()),
                    )))
                }
            }
        }
        if session.retry_buffer_truncated() {
            return Err(BodyError::Denied(Denial::new(Reason::LengthRequired)));
        }
        if !buf.is_empty() && session.get_retry_buffer().is_none() {
            // The whole body came in one read with an oversized head, before the tail could be
            // buffered: Pingora could not forward it. Refuse rather than hang the upstream.
            return Err(BodyError::Denied(Denial::new(Reason::HeadersTooLarge)));
        }
        Ok(buf.freeze())
    }

    /// Answers keygate gives itself for an admitted key: `GET /v1/models[/{id}]`.
    fn local_answer(&self, req: &RequestHeader, ctx: &GateCtx) -> Option<Vec<u8>> {
        if req.method != http::Method::GET {
            return None;
        }
        let path = req.uri.path();
        let (table, key) = (ctx.table.as_ref()?, ctx.key_record()?);
        if is_usage_path(path) {
            return Some(self.usage_answer(path, table, key));
        }
        if path == "/v1/models" || path == "/v1/models/" {
            let data: Vec<_> = self
                .models_for(table, key)
                .into_iter()
                .map(|(id, owner)| model_object(&id, owner))
                .collect();
            let v = serde_json::json!({"object": "list", "data": data});
            return Some(v.to_string().into_bytes());
        }
        let id = path.strip_prefix("/v1/models/")?;
        if id.contains(':') || id.is_empty() {
            return None;
        }
        let owner = self
            .models_for(table, key)
            .into_iter()
            .find(|(m, _)| m == id)
            .map(|(_, owner)| owner);
        Some(match owner {
            Some(owner) => model_object(id, owner).to_string().into_bytes(),
            None => Denial::with_message(
                Reason::ModelNotFound,
                format!(
                    "The model {:?} does not exist or you do not have access to it.",
                    id
                ),
            )
            .body(ctx.shape),
        })
    }

    /// `/api/usage/token/` (byte-compatible with new-api: Go's sorted map keys, no trailing
    /// newline) and the OpenAI legacy billing answers (USD = units / quota_per_unit).
    fn usage_answer(&self, path: &str, table: &KeyTable, key: &KeyRecord) -> Vec<u8> {
        let consumed = self.inner.ledger.consumed(key.id);
        let used = key.used.saturating_add(consumed);
        let qpu = table.quota_per_unit;
        let expires = key.expires_at.unwrap_or(0);
        if path.starts_with("/api/usage/token") {
            let limits: serde_json::Map<String, serde_json::Value> = key
                .models
                .as_ref()
                .map(|m| m.names())
                .unwrap_or_default()
                .into_iter()
                .map(|n| (n, serde_json::Value::Bool(true)))
                .collect();
            let v = serde_json::json!({
                "code": true,
                "message": "ok",
                "data": {
                    "object": "token_usage",
                    "name": &*key.name,
                    "total_granted": key.quota,
                    "total_used": used,
                    "total_available": key.quota.saturating_sub(used),
                    "unlimited_quota": key.unlimited_quota,
                    "model_limits": limits,
                    "model_limits_enabled": key.models.is_some(),
                    "expires_at": expires,
                }
            });
            return go_escape(v.to_string());
        }
        if path.ends_with("/subscription") {
            let amount = if key.unlimited_quota {
                100_000_000.0
            } else {
                key.quota as f64 / qpu
            };
            let a = go_float(amount);
            return format!(
                "{{\"object\":\"billing_subscription\",\"has_payment_method\":true,\"soft_limit_usd\":{a},\"hard_limit_usd\":{a},\"system_hard_limit_usd\":{a},\"access_until\":{expires}}}"
            )
            .into_bytes();
        }
        format!(
            "{{\"object\":\"list\",\"total_usage\":{}}}",
            go_float(used as f64 / qpu * 100.0)
        )
        .into_bytes()
    }

    /// The models a key may use and that an upstream serves, with the upstream's name. Only
    /// exact names can be listed: wildcards are expanded against every name the sync file and
    /// the upstreams mention.
    pub fn models_for<'a>(
        &'a self,
        table: &'a KeyTable,
        key: &'a KeyRecord,
    ) -> Vec<(String, &'a str)> {
        let group = table.group_of(key);
        let mut names: std::collections::BTreeSet<&str> = table.priced_models().collect();
        if let Some(m) = &key.models {
            names.extend(m.exact_names());
        }
        if let Some(m) = &group.models {
            names.extend(m.exact_names());
        }
        for u in self.inner.upstreams.iter() {
            names.extend(u.exact_models());
        }
        names
            .into_iter()
            .filter(|m| policy::model_allowed(key, group, m))
            .filter_map(|m| {
                let u = self.inner.upstreams.route(m)?;
                let name = self
                    .inner
                    .upstreams
                    .get(u)
                    .map_or("keygate", |u| u.name.as_str());
                Some((m.to_string(), name))
            })
            .collect()
    }

    async fn deny(&self, session: &mut Session, ctx: &mut GateCtx, d: Denial) -> Result<bool> {
        log::debug!("request {} denied: {d}", ctx.request_id().unwrap_or("-"));
        ctx.outcome = Outcome::Denied(d.reason);
        self.write_answer(session, ctx, d.status(), d.body(ctx.shape))
            .await?;
        Ok(true)
    }

    /// Write a JSON answer. An unread request body of up to 64 KiB is drained first so the
    /// connection stays usable; a larger or unbounded one closes it.
    async fn write_answer(
        &self,
        session: &mut Session,
        ctx: &GateCtx,
        status: u16,
        body: Vec<u8>,
    ) -> Result<()> {
        let mut keep_alive = true;
        if !session.is_body_done() {
            let declared = session
                .req_header()
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| {
                    std::str::from_utf8(v.as_bytes())
                        .ok()?
                        .trim()
                        .parse::<u64>()
                        .ok()
                });
            // A client that stalls its body does not hold the answer back.
            keep_alive = match declared {
                Some(len) if len <= DRAIN_LIMIT => matches!(
                    tokio::time::timeout(DRAIN_TIME, session.drain_request_body()).await,
                    Ok(Ok(()))
                ),
                _ => false,
            };
        }
        if self.draining() {
            keep_alive = false;
        }
        if !keep_alive {
            session.set_keepalive(None);
        }
        let mut resp = ResponseHeader::build(status, Some(4))?;
        resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
        if let Some(id) = &ctx.request_id {
            resp.insert_header(&X_REQUEST_ID, id.clone())?;
        }
        if !keep_alive {
            resp.insert_header(http::header::CONNECTION, "close")?;
        }
        session.write_response_header(Box::new(resp), false).await?;
        session
            .write_response_body(Some(Bytes::from(body)), true)
            .await?;
        if !keep_alive {
            linger(session).await;
        }
        Ok(())
    }

    /// Phase `upstream_peer`: where the admitted request goes.
    pub fn upstream_peer(&self, ctx: &GateCtx) -> Result<Box<HttpPeer>> {
        ctx.upstream
            .and_then(|i| self.inner.upstreams.get(i))
            .map(|u| u.peer())
            .ok_or_else(|| {
                Error::explain(
                    ErrorType::InternalError,
                    "upstream_peer called for a request the gate did not admit",
                )
            })
    }

    /// Phase `upstream_request_filter`: remove every client credential (headers and query), set
    /// the upstream's own in the client's style, the upstream `Host`, the request id and the
    /// length of the buffered body.
    pub async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut GateCtx,
    ) -> Result<()> {
        strip_client_credentials(req)?;
        drop_header(req, &http::header::EXPECT);
        // Usage is read from the response body: ask for it uncompressed.
        drop_header(req, &http::header::ACCEPT_ENCODING);
        let upstream = ctx
            .upstream
            .and_then(|i| self.inner.upstreams.get(i))
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no upstream chosen"))?;
        let style = ctx.key.map(|k| k.style).unwrap_or_default();
        upstream.prepare_request(req, style)?;
        if let Some(id) = &ctx.request_id {
            req.insert_header(&X_REQUEST_ID, id.clone())?;
        }
        if let Some(body) = &ctx.body {
            // Kept as it is only when it is the one framing header and states this body.
            let mut lengths = req.headers.get_all(http::header::CONTENT_LENGTH).iter();
            let framed = lengths
                .next()
                .is_some_and(|v| states_length(v.as_bytes(), body.len()))
                && lengths.next().is_none();
            let framed = drop_header(req, &http::header::TRANSFER_ENCODING).is_none() && framed;
            if !framed {
                req.insert_header(http::header::CONTENT_LENGTH, body.len())?;
            }
        }
        ctx.upstream_started = Some(Instant::now());
        Ok(())
    }

    /// Phase `request_body_filter`: the body was read in `request_filter`; Pingora replays only
    /// its tail (see [`Gate::read_body`]), which is replaced here by the whole body.
    pub async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut GateCtx,
    ) -> Result<()> {
        if let Some(full) = &ctx.body {
            *body = Some(if end_of_stream {
                full.clone()
            } else {
                Bytes::new()
            });
        }
        Ok(())
    }

    /// Phase `response_filter`: the request id on the response.
    pub async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut GateCtx,
    ) -> Result<()> {
        if let Some(id) = &ctx.request_id {
            resp.insert_header(&X_REQUEST_ID, id.clone())?;
        }
        if self.draining() {
            session.set_keepalive(None);
            resp.insert_header(http::header::CONNECTION, "close")?;
        }
        if ctx.reservation.is_none() {
            return Ok(());
        }
        ctx.first_byte = Some(Instant::now());
        ctx.status = resp.status.as_u16();
        let content_type = resp.headers.get(http::header::CONTENT_TYPE);
        let sse = content_type.is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        ctx.json_response =
            content_type.is_some_and(|v| memchr::memmem::find(v.as_bytes(), b"json").is_some());
        if sse && ctx.status < 400 {
            let strip = ctx.strip_usage;
            if strip {
                // The body changes length when the usage chunk is removed.
                resp.remove_header(&http::header::CONTENT_LENGTH);
            }
            ctx.sse = Some(SseTracker::new(strip));
        }
        Ok(())
    }

    /// Phase `response_body_filter`: passes the body through as it arrives (never buffered),
    /// reading usage on the way: SSE events line by line, a JSON body by keeping references to
    /// its chunks (no copy until the end).
    pub fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut GateCtx,
    ) -> Result<Option<Duration>> {
        if ctx.reservation.is_none() || ctx.status >= 400 {
            return Ok(None);
        }
        if let Some(tracker) = ctx.sse.as_mut() {
            // Timed: the events are read here. A JSON body's chunks are only kept here (no
            // clock read for that); its usage is read in `logging`, after the gate time.
            let started = Instant::now();
            if let Some(chunk) = body.take() {
                *body = Some(tracker.feed(chunk));
            }
            if end_of_stream {
                let rest = tracker.finish();
                if !rest.is_empty() {
                    let mut all = BytesMut::from(&body.take().unwrap_or_default()[..]);
                    all.extend_from_slice(&rest);
                    *body = Some(all.freeze());
                }
            }
            ctx.gate_time += started.elapsed();
        } else if let Some(chunk) = body.as_ref() {
            ctx.json_len += chunk.len();
            if ctx.json_response && ctx.json_len <= MAX_USAGE_BODY {
                ctx.json_body.push(chunk.clone());
            }
        }
        Ok(None)
    }
}

/// The price of `u` for `key` under `rule` (0 when the model has no price).
fn price_of(table: &KeyTable, key: &KeyRecord, rule: Option<PriceRule>, u: Usage) -> i64 {
    rule.map_or(0, |r| {
        pricing::quota_for(r, table.group_of(key).ratio, table.quota_per_unit, u)
    })
}

/// What the call used: the usage the upstream reported, else an estimate from what was
/// streamed (one token per SSE event; a quarter of a JSON body's bytes; nothing for other
/// bodies). When the stream was `cut_short` (the client left), a reported completion count is
/// only a lower bound (Anthropic reports 1 output token at the start), so the larger of the two
/// is used. The flag says whether usage was reported.
fn final_usage(ctx: &GateCtx, cut_short: bool) -> (Usage, bool) {
    {
        let reported = match &ctx.sse {
            Some(t) => t.usage(),
            None if ctx.json_len > 0 && ctx.json_len <= MAX_USAGE_BODY => {
                if ctx.json_body.len() == 1 {
                    crate::usage::usage_from_json(&ctx.json_body[0])
                } else {
                    crate::usage::usage_from_json(&ctx.json_body.concat())
                }
            }
            None => PartialUsage::default(),
        };
        let streamed = match &ctx.sse {
            // One token per streamed event is close for OpenAI-style streams.
            Some(t) => t.events(),
            None if ctx.json_response => (ctx.json_len as u64) / 4,
            None => 0,
        };
        if let Some(mut u) = reported.usage() {
            if cut_short {
                u.completion_tokens = u.completion_tokens.max(streamed);
            }
            return (u, true);
        }
        (
            Usage {
                prompt_tokens: ctx.estimate.prompt_tokens,
                completion_tokens: streamed,
            },
            false,
        )
    }
}

impl Gate {
    /// Settle the reservation exactly once: a refund when the upstream failed or answered with
    /// an error, otherwise the price of what was used; then the usage record and the metrics.
    fn settle(&self, e: Option<&Error>, ctx: &mut GateCtx, finished: Instant) {
        let Some(reservation) = ctx.reservation.take() else {
            return;
        };
        // The table is shared (an `Arc`): the key and its group are borrowed from it.
        let (Some(table), Some(slot)) = (ctx.table.clone(), ctx.key.map(|k| k.slot)) else {
            return;
        };
        let Some(key) = table.at_slot(slot) else {
            return;
        };
        let client_gone = e.is_some_and(is_client_gone);
        let m = &self.inner.metrics;
        let group = &*table.group_of(key).name;
        let (usage, quota, status) = if ctx.status == 0 || ctx.status >= 400 {
            drop(reservation);
            let status = match (ctx.status, ctx.outcome) {
                (0, Outcome::Failed(r)) => r.status(),
                (0, _) if client_gone => 499,
                (0, _) => 502,
                (s, _) => s,
            };
            (Usage::default(), 0, status)
        } else {
            let (usage, reported) = final_usage(ctx, client_gone || e.is_some());
            if !reported && !client_gone && e.is_none() {
                m.usage_missing.inc();
            }
            let quota = price_of(&table, key, ctx.price, usage);
            reservation.settle(quota);
            let status = if client_gone { 499 } else { ctx.status };
            (usage, quota, status)
        };
        ctx.charged = Some((usage, quota));
        let series = m.call_series(model_label(&table, ctx.model.as_deref()), group);
        series.quota.inc_by(quota.max(0) as u64);
        series.prompt_tokens.inc_by(usage.prompt_tokens);
        series.completion_tokens.inc_by(usage.completion_tokens);
        ctx.series = Some(series);
        if let Some(log) = &self.inner.usage_log {
            let since = |t: Option<Instant>| {
                t.zip(ctx.started)
                    .map(|(t, s)| t.saturating_duration_since(s).as_millis() as u64)
            };
            // From the clock reads the call made anyway.
            let created_at = ctx
                .started_at
                .zip(ctx.started)
                .map_or_else(unix_now, |(at, s)| {
                    unix_secs(at + finished.saturating_duration_since(s))
                });
            log.record(&UsageRecord {
                created_at,
                request_id: ctx
                    .request_id
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or(""),
                key_id: key.id,
                key_name: &key.name,
                group,
                model: ctx.model.as_deref().unwrap_or(""),
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                quota,
                is_stream: ctx.sse.is_some(),
                status,
                duration_ms: since(Some(finished)).unwrap_or(0),
                first_byte_ms: since(ctx.first_byte),
            });
        }
    }

    /// Phase `fail_to_proxy`: an upstream that cannot be reached or fails before answering gets
    /// a 502 (504 on a timeout) in the client's error shape, with the request id.
    pub async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut GateCtx,
    ) -> FailToProxy {
        let reason = match e.etype() {
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                Some(Reason::UpstreamTimeout)
            }
            _ if matches!(e.esource(), pingora::ErrorSource::Upstream) => {
                Some(Reason::UpstreamError)
            }
            _ => None,
        };
        let code = match (reason, e.etype()) {
            (Some(r), _) => {
                ctx.outcome = Outcome::Failed(r);
                if session.response_written().is_none() {
                    let d = Denial::new(r);
                    if self
                        .write_answer(session, ctx, d.status(), d.body(ctx.shape))
                        .await
                        .is_err()
                    {
                        log::debug!("could not send the error answer downstream");
                    }
                }
                r.status()
            }
            (None, ErrorType::HTTPStatus(code)) => {
                let _ = session.respond_error(*code).await;
                *code
            }
            (None, ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed) => 0,
            (None, _) => {
                let status = if matches!(e.esource(), pingora::ErrorSource::Downstream) {
                    400
                } else {
                    500
                };
                if session.response_written().is_none() {
                    let _ = session.respond_error(status).await;
                }
                status
            }
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// Phase `logging`: settles the reservation, writes the usage record, the metrics and the
    /// access-log line.
    pub async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut GateCtx) {
        let finished = Instant::now();
        self.settle(e, ctx, finished);
        if let (Some(id), Some(_)) = (ctx.key_id(), ctx.charged) {
            self.inner.ledger.make_committed_durable(id).await;
        }
        let m = &self.inner.metrics;
        m.gate_duration.observe(ctx.gate_time.as_secs_f64());
        if let (Some(started), Some(timer)) = (
            ctx.upstream_started,
            ctx.upstream
                .and_then(|i| self.inner.upstream_durations.get(i)),
        ) {
            timer.observe(finished.saturating_duration_since(started).as_secs_f64());
        }
        if ctx.outcome == Outcome::Admitted && e.is_some_and(|e| !is_client_gone(e)) {
            ctx.outcome = Outcome::Failed(Reason::UpstreamError);
        }
        let upstream = ctx.upstream.and_then(|i| self.inner.upstreams.get(i));
        if let Some(u) = upstream {
            let kind = match (ctx.outcome, ctx.status) {
                (Outcome::Failed(Reason::UpstreamTimeout), _) => Some("timeout"),
                (Outcome::Failed(_), 0) => Some("connect"),
                (Outcome::Failed(_), _) => Some("broken"),
                (_, s) if s >= 500 => Some("status_5xx"),
                _ => None,
            };
            if let Some(kind) = kind {
                m.upstream_errors
                    .with_label_values(&[u.name.as_str(), kind])
                    .inc();
            }
        }
        let (outcome, reason) = ctx.outcome.label();
        match (&ctx.series, ctx.outcome) {
            (Some(series), Outcome::Admitted) => series.admitted.inc(),
            _ => {
                let (model, group) = match ctx.table.as_ref() {
                    Some(t) => (
                        model_label(t, ctx.model.as_deref()),
                        ctx.key_record().map_or("", |k| &*t.group_of(k).name),
                    ),
                    None => ("", ""),
                };
                m.count_request(outcome, reason, model, group);
            }
        }
        if self.inner.options.per_key_metrics {
            if let Some(k) = ctx.key_record() {
                let id = k.id.to_string();
                m.key_requests
                    .with_label_values(&[id.as_str(), &*k.name, outcome])
                    .inc();
                if let Some((_, quota)) = ctx.charged {
                    m.key_quota
                        .with_label_values(&[id.as_str(), &*k.name])
                        .inc_by(quota.max(0) as u64);
                }
            }
        }
        if let Some(sink) = &self.inner.access_log {
            let status = session.response_written().map_or(0, |r| r.status.as_u16());
            let ms = |t: Option<Instant>| t.map(|t| t.elapsed().as_secs_f64() * 1000.0);
            let line = serde_json::json!({
                "time": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
                "request_id": ctx.request_id(),
                "method": session.req_header().method.as_str(),
                "path": session.req_header().uri.path(),
                "client_ip": ctx.client_ip().map(|ip| ip.to_string()),
                "key_id": ctx.key_id(),
                "model": ctx.model.as_deref(),
                "upstream": upstream.map(|u| u.name.as_str()),
                "status": status,
                "outcome": outcome,
                "reason": reason.map(|r| r.code()),
                "quota": ctx.charged.map(|(_, q)| q),
                "duration_ms": ms(ctx.started),
                "upstream_ms": ms(ctx.upstream_started),
                "gate_us": ctx.gate_time.as_secs_f64() * 1e6,
            });
            let mut bytes = b"keygate::access ".to_vec();
            if serde_json::to_writer(&mut bytes, &line).is_ok() {
                sink.line(bytes);
            }
        }
    }
}

/// A request's summary for Pingora's error and retry logs without any credential: method and
/// path only (the query may hold `key=`). Hosts embedding [`Gate`] should return this from
/// `ProxyHttp::request_summary`.
pub fn request_summary(req: &RequestHeader) -> String {
    format!("{} {}", req.method, req.uri.path())
}

/// Whether `e` means the client went away (closed, reset, or stopped reading).
pub fn is_client_gone(e: &Error) -> bool {
    matches!(e.esource(), pingora::ErrorSource::Downstream)
        && matches!(
            e.etype(),
            ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
        )
}

/// The read-only usage endpoints (SPEC §3), answered by keygate; expired and exhausted keys may
/// read them.
pub fn is_usage_path(path: &str) -> bool {
    matches!(
        path,
        "/api/usage/token/"
            | "/api/usage/token"
            | "/v1/dashboard/billing/subscription"
            | "/v1/dashboard/billing/usage"
            | "/dashboard/billing/subscription"
            | "/dashboard/billing/usage"
    )
}

/// A number the way Go's `encoding/json` writes a float64 (new-api's billing answers): integral
/// values without a decimal point, shortest round-trip digits, exponent form outside
/// [1e-6, 1e21).
pub fn go_float(x: f64) -> String {
    if !x.is_finite() {
        return "0".into();
    }
    let a = x.abs();
    if a == 0.0 || (1e-6..1e21).contains(&a) {
        return format!("{x}");
    }
    let e = format!("{x:e}");
    match e.split_once('e') {
        Some((m, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{m}e{sign}{digits:0>2}")
        }
        None => e,
    }
}

/// `kg-{prefix}-{n:x}` into `out`, written by hand (no formatting machinery: this runs for
/// every request without an id); returns the length. The prefix is cut to fit.
fn request_id_text(prefix: &[u8], n: u64, out: &mut [u8; 64]) -> usize {
    let prefix = &prefix[..prefix.len().min(out.len() - 3 - 1 - 16)];
    let head = 3 + prefix.len() + 1;
    out[..3].copy_from_slice(b"kg-");
    out[3..head - 1].copy_from_slice(prefix);
    out[head - 1] = b'-';
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1) as usize;
    for i in 0..digits {
        let nibble = (n >> (4 * (digits - 1 - i))) & 0xf;
        out[head + i] = b"0123456789abcdef"[nibble as usize];
    }
    head + digits
}

/// Go's `encoding/json` escapes `<`, `>`, `&`, U+2028 and U+2029 inside strings.
fn go_escape(json: String) -> Vec<u8> {
    if !json.contains(['<', '>', '&', '\u{2028}', '\u{2029}']) {
        return json.into_bytes();
    }
    json.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
        .into_bytes()
}

/// After refusing a request whose body is still arriving, read and discard it for a bounded
/// time before the connection is closed (a lingering close, as nginx does): closing with unread
/// data makes the kernel reset the connection, and a client still sending would see a broken
/// pipe instead of the answer.
async fn linger(session: &mut Session) {
    const LINGER_TIME: Duration = Duration::from_secs(2);
    const LINGER_BYTES: usize = 64 * 1024 * 1024;
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut discarded = 0usize;
    while discarded < LINGER_BYTES && !session.is_body_done() {
        match tokio::time::timeout_at(deadline, session.read_request_body()).await {
            Ok(Ok(Some(chunk))) => discarded += chunk.len(),
            _ => break,
        }
    }
}

fn model_object(id: &str, owner: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": owner})
}

static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
static X_GOOG_API_KEY: HeaderName = HeaderName::from_static("x-goog-api-key");
static AZURE_API_KEY: HeaderName = HeaderName::from_static("api-key");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Remove a header when present. Pingora's removal converts the name and updates its
/// case-preserving name map even for an absent header; most requests carry none of these, and
/// a lookup is much cheaper.
fn drop_header(req: &mut RequestHeader, name: &HeaderName) -> Option<HeaderValue> {
    if req.headers.contains_key(name) {
        req.remove_header(name)
    } else {
        None
    }
}

/// Whether a Content-Length value states exactly `len`, written canonically (no sign, no
/// leading zero, no space): then it can be forwarded as it is.
fn states_length(v: &[u8], len: usize) -> bool {
    crate::usage::canonical_u64(v) == Some(len as u64)
}

/// Remove every place a client credential can be: `Authorization`, `x-api-key`,
/// `x-goog-api-key`, the key part of `Sec-WebSocket-Protocol`, and `?key=`.
pub fn strip_client_credentials(req: &mut RequestHeader) -> Result<()> {
    drop_header(req, &http::header::AUTHORIZATION);
    drop_header(req, &X_API_KEY);
    drop_header(req, &X_GOOG_API_KEY);
    // Azure OpenAI's header: never a keygate credential, but a client key must not ride along.
    drop_header(req, &AZURE_API_KEY);
    if let Some(v) = drop_header(req, &http::header::SEC_WEBSOCKET_PROTOCOL) {
        if let Some(kept) = credential::strip_ws_key_protocol(v.as_bytes()) {
            req.insert_header(http::header::SEC_WEBSOCKET_PROTOCOL, kept)?;
        }
    }
    if let Some(q) = req.uri.query() {
        if let Some(stripped) = credential::strip_query_key(q) {
            let path = req.uri.path();
            let pq = if stripped.is_empty() {
                path.to_string()
            } else {
                format!("{path}?{stripped}")
            };
            let uri = pq
                .parse::<http::Uri>()
                .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "bad request target"))?;
            req.set_uri(uri);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_canonical_content_length_is_forwarded_as_it_is() {
        assert!(states_length(b"106", 106));
        assert!(states_length(b"0", 0));
        for (v, len) in [
            (&b"105"[..], 106),
            (b"0106", 106),
            (b"+106", 106),
            (b" 106", 106),
            (b"106 ", 106),
            (b"", 0),
            (b"99999999999999999999", 0),
        ] {
            assert!(!states_length(v, len), "{:?}", String::from_utf8_lossy(v));
        }
    }

    #[test]
    fn request_ids_read_like_the_format() {
        for n in [0u64, 1, 9, 10, 255, 256, 0xdead_beef, u64::MAX] {
            let mut out = [0u8; 64];
            let len = request_id_text(b"228d056c", n, &mut out);
            assert_eq!(&out[..len], format!("kg-228d056c-{n:x}").as_bytes());
        }
        let mut out = [0u8; 64];
        let len = request_id_text(&[b'a'; 100], u64::MAX, &mut out);
        assert_eq!(len, 64);
    }

    #[test]
    fn model_sources_in_order() {
        let (m, _) = find_model(
            "/v1beta/models/gemini-pro:generateContent",
            None,
            None,
            b"{\"model\":\"x\"}",
        )
        .unwrap();
        assert_eq!(m.as_deref(), Some("gemini-pro"));
        let (m, f) = find_model(
            "/v1/chat/completions",
            None,
            Some("application/json"),
            br#"{"model":"gpt-4o","stream":true}"#,
        )
        .unwrap();
        assert_eq!(m.as_deref(), Some("gpt-4o"));
        assert!(f.stream);
        let (m, _) = find_model("/v1/realtime", Some("model=gpt-4o-realtime"), None, b"").unwrap();
        assert_eq!(m.as_deref(), Some("gpt-4o-realtime"));
        let (m, _) = find_model(
            "/v1/chat/completions",
            None,
            Some("application/json"),
            b"{}",
        )
        .unwrap();
        assert_eq!(m, None);
        let long = format!("{{\"model\":\"{}\"}}", "x".repeat(100_000));
        assert_eq!(
            find_model(
                "/v1/chat/completions",
                None,
                Some("application/json"),
                long.as_bytes()
            )
            .unwrap_err()
            .reason,
            Reason::InvalidModel
        );
        // Found by fuzzing: the path is bounded like the body.
        let path = format!("/v1beta/models/{}:generateContent", "g".repeat(300));
        assert_eq!(
            find_model(&path, None, None, b"{}").unwrap_err().reason,
            Reason::InvalidModel
        );
        assert_eq!(
            find_model("/v1/x", None, Some("application/json"), b"[\"gpt-4o\"]")
                .unwrap_err()
                .reason,
            Reason::InvalidJson
        );
    }

    #[test]
    fn credentials_are_stripped_from_headers_and_query() {
        let mut req = RequestHeader::build("GET", b"/v1/x?key=sk-secret&a=1", None).unwrap();
        req.insert_header("authorization", "Bearer sk-secret")
            .unwrap();
        req.insert_header("x-api-key", "sk-secret").unwrap();
        req.insert_header("x-goog-api-key", "sk-secret").unwrap();
        req.insert_header(
            "sec-websocket-protocol",
            "realtime, openai-insecure-api-key.sk-secret",
        )
        .unwrap();
        strip_client_credentials(&mut req).unwrap();
        assert_eq!(req.uri.to_string(), "/v1/x?a=1");
        assert!(req.headers.get("authorization").is_none());
        assert!(req.headers.get("x-api-key").is_none());
        assert!(req.headers.get("x-goog-api-key").is_none());
        assert_eq!(
            req.headers.get("sec-websocket-protocol").unwrap(),
            "realtime"
        );
    }
}

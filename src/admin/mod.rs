//! The admin API (SPEC §8): a listener of its own, off by default, where Bearer tokens manage
//! keys and accounts over HTTP. Reads come from the sync file as it is, its edit journal folded
//! in (parsed once per change); writes go through [`writes::Writer`], the same locked,
//! validated edit as `keygate keys` (journaled: one line appended beside the file, folded into
//! it a second later), and answer once the new table is in force.
//!
//! The router is the `route` function below: a table to read top to bottom. The console's pages
//! and files ([`assets`]) are served to anyone (they hold no data); everything they show comes
//! from the API behind the same Bearer tokens.

pub mod accounts;
pub mod assets;
pub mod audit;
pub mod auth;
pub mod http;
pub mod key_body;
pub mod key_view;
pub mod keys;
pub mod newapi;
pub mod openapi;
pub mod usage;
pub mod writes;

use self::auth::{Caller, Throttle, Tokens};
use self::http::{ApiError, Body, Reply, Req, MAX_BODY};
use crate::core::config::{Config, KeyEntry, KeyStatus, SyncFile};
use crate::core::vault::Vault;
use crate::gate::Gate;
use crate::sync::edit::SyncEditor;
use crate::sync::reload::Reloader;
use ::http::{Method, StatusCode};
use http_body_util::BodyExt;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Reveals one token may make per minute (SPEC §8).
const REVEALS_PER_MINUTE: usize = 10;

/// The admin API's state.
pub struct Admin {
    gate: Gate,
    editor: SyncEditor,
    writer: writes::Writer,
    /// Which sync file is in force (the fleet route serves only that one).
    reloader: Arc<Reloader>,
    tokens: Tokens,
    throttle: Throttle,
    audit: audit::Audit,
    reveals: Mutex<HashMap<String, VecDeque<Instant>>>,
    vault: Option<Arc<Vault>>,
    /// The last sync file served to a follower, serialized, and the parse it is of.
    sync_cache: Arc<Mutex<SyncCache>>,
}

type SyncCache = Option<(std::sync::Weak<SyncFile>, bytes::Bytes)>;

/// Start the admin listener when `config.admin` is set: binds now (so a bad address or a missing
/// token is a startup error), serves on a thread of its own. Returns the bound address.
pub fn start(
    config: &Config,
    gate: Gate,
    reloader: Arc<Reloader>,
    vault: Option<Vault>,
) -> anyhow::Result<Option<SocketAddr>> {
    let Some(ac) = &config.admin else {
        return Ok(None);
    };
    let tokens = Tokens::resolve(&ac.tokens).map_err(anyhow::Error::msg)?;
    let audit = audit::Audit::open(ac.audit_log.as_deref())
        .map_err(|e| anyhow::anyhow!("admin.audit_log: {e}"))?;
    let listener = std::net::TcpListener::bind(&ac.listen)
        .map_err(|e| anyhow::anyhow!("admin.listen {}: {e}", ac.listen))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    // One editor for reads and writes: the parse a write leaves is what the next list reads.
    let editor = SyncEditor::keeping(&config.sync_file);
    let writer = writes::Writer::start(editor.clone(), reloader.clone())?;
    let admin = Arc::new(Admin {
        gate,
        editor,
        writer,
        reloader,
        tokens,
        throttle: Throttle::default(),
        audit,
        reveals: Mutex::new(HashMap::new()),
        vault: vault.map(Arc::new),
        sync_cache: Arc::default(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("keygate-admin")
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("keygate-admin".into())
        .spawn(move || runtime.block_on(serve(admin, listener)))?;
    println!("keygate: admin on http://{addr}");
    Ok(Some(addr))
}

async fn serve(admin: Arc<Admin>, listener: std::net::TcpListener) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("admin listener: {e}");
            return;
        }
    };
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                log::warn!("admin listener: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, std::convert::Infallible>(admin.handle(req, peer.ip()).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(15))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

impl Admin {
    async fn handle(
        &self,
        req: ::http::Request<hyper::body::Incoming>,
        ip: IpAddr,
    ) -> ::http::Response<Body> {
        let response = match self.read(req, ip).await {
            Ok(req) => match self.route(&req).await {
                Ok(r) => r,
                Err(e) => self.refusal(e),
            },
            Err(e) => self.refusal(e),
        };
        self.gate
            .metrics()
            .admin_requests
            .with_label_values(&[response.status().as_str()])
            .inc();
        response
    }

    fn refusal(&self, e: ApiError) -> ::http::Response<Body> {
        if e.status == StatusCode::INTERNAL_SERVER_ERROR {
            log::error!("admin: {}", e.message);
        }
        e.into_response()
    }

    async fn read(
        &self,
        req: ::http::Request<hyper::body::Incoming>,
        ip: IpAddr,
    ) -> Result<Req, ApiError> {
        let (parts, mut body) = req.into_parts();
        let declared = parts
            .headers
            .get(::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        // A client that asked to be told before it sends (`Expect: 100-continue`, curl's way
        // above 1 MiB) is told now: reading its body would invite the whole upload first.
        let waits = parts
            .headers
            .get(::http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if let Some(n) = declared.filter(|&n| n > MAX_BODY as u64) {
            if !waits && n <= DRAIN_MAX as u64 {
                drain(&mut body, 0).await;
            }
            return Err(ApiError::too_large());
        }
        let body = read_body(body).await?;
        Ok(Req {
            method: parts.method,
            path: parts.uri.path().to_string(),
            query: http::parse_query(parts.uri.query()),
            headers: parts.headers,
            body,
            ip,
        })
    }

    /// Who is calling: 401 (after a delay, for an address that keeps failing) when nobody.
    async fn caller(&self, req: &Req) -> Result<Caller, ApiError> {
        let presented = req
            .headers
            .get(::http::header::AUTHORIZATION)
            .map(|v| v.as_bytes())
            .map(|v| v.strip_prefix(b"Bearer ").unwrap_or(v))
            .map(<[u8]>::trim_ascii)
            .filter(|v| !v.is_empty());
        if let Some(c) = presented.and_then(|t| self.tokens.check(t)) {
            return Ok(c.clone());
        }
        self.gate.metrics().admin_auth_failures.inc();
        let (delay, n) = self.throttle.failed(req.ip, Instant::now());
        log::warn!(
            "admin: refused {} {} from {}: {} token ({n} failures from there in the last minute)",
            req.method,
            req.path,
            req.ip,
            if presented.is_some() { "unknown" } else { "no" }
        );
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Err(ApiError::unauthorized())
    }

    /// The routes.
    async fn route(&self, req: &Req) -> Reply {
        let path = req.path.trim_end_matches('/');
        let segs: Vec<&str> = path.split('/').skip(1).collect();
        let m = &req.method;
        if (m == Method::GET || m == Method::HEAD) && assets::is_console_path(&req.path) {
            return Ok(assets::response(&req.path, m == Method::HEAD));
        }
        if let ["admin", "v1", "openapi.json"] = segs.as_slice() {
            return openapi::document(req);
        }
        if segs.starts_with(&["api", "usage", "token"])
            || segs.starts_with(&["api", "log", "token"])
        {
            return usage::key_holder(self, req).await;
        }
        let native = segs.starts_with(&["admin", "v1"]);
        let compat = segs.starts_with(&["api", "token"]);
        if !native && !compat {
            return Err(ApiError::not_found(format!("no route {}", req.path)));
        }
        let caller = self.caller(req).await?;
        if compat {
            return newapi::route(self, &caller, req, &segs[2..]).await;
        }
        use keys as k;
        match (m.clone(), &segs[2..]) {
            (Method::GET, ["session"]) => self.session(&caller).await,
            (Method::GET, ["sync"]) => self.sync(&caller, req).await,
            (Method::GET, ["logs"]) => usage::logs(self, &caller, req).await,
            (Method::GET, ["logs.csv"]) => usage::csv(self, &caller, req).await,
            (Method::GET, ["stats"]) => usage::stats(self, &caller, req).await,
            (Method::GET, ["keys"]) => k::list(self, &caller, req).await,
            (Method::POST, ["keys"]) => k::create(self, &caller, req).await,
            (_, ["keys"]) => Err(ApiError::method("GET, POST")),
            (Method::POST, ["keys", "batch-delete"]) => k::batch_delete(self, &caller, req).await,
            (Method::GET, ["keys", id]) => k::get(self, &caller, k::parse_id(id)?).await,
            (Method::PATCH, ["keys", id]) => k::patch(self, &caller, req, k::parse_id(id)?).await,
            (Method::DELETE, ["keys", id]) => k::delete(self, &caller, req, k::parse_id(id)?).await,
            (_, ["keys", _]) => Err(ApiError::method("GET, PATCH, DELETE")),
            (Method::POST, ["keys", id, action]) => {
                let id = k::parse_id(id)?;
                match *action {
                    "enable" => k::set_status(self, &caller, req, id, KeyStatus::Enabled).await,
                    "disable" => k::set_status(self, &caller, req, id, KeyStatus::Disabled).await,
                    "rotate" => k::rotate(self, &caller, req, id).await,
                    "reveal" => k::reveal(self, &caller, req, id).await,
                    _ => Err(ApiError::not_found(format!("no route {}", req.path))),
                }
            }
            (Method::GET, ["accounts"]) => accounts::list(self, &caller, req).await,
            (Method::POST, ["accounts"]) => accounts::create(self, &caller, req).await,
            (_, ["accounts"]) => Err(ApiError::method("GET, POST")),
            (Method::GET, ["accounts", id]) => accounts::get(self, &caller, id).await,
            (Method::PATCH, ["accounts", id]) => accounts::patch(self, &caller, req, id).await,
            (Method::DELETE, ["accounts", id]) => accounts::delete(self, &caller, req, id).await,
            (_, ["accounts", _]) => Err(ApiError::method("GET, PATCH, DELETE")),
            _ => Err(ApiError::not_found(format!("no route {}", req.path))),
        }
    }

    /// `GET /admin/v1/session`: who the token is and what the console needs to know.
    async fn session(&self, caller: &Caller) -> Reply {
        let table = self.gate.table();
        http::ok(&serde_json::json!({
            "name": caller.name,
            "role": caller.role,
            "account": caller.account,
            "quota_per_unit": table.quota_per_unit,
            "revision": table.revision,
            "vault": self.vault_enabled(),
        }))
    }

    /// `GET /admin/v1/sync?after=<revision>&wait=<seconds>` (SPEC §8, fleets): the whole sync
    /// file in force, as soon as its revision is above `after`; held up to `wait` seconds
    /// (default and most 30), then 304. Unscoped tokens only (it holds every key's hash).
    async fn sync(&self, caller: &Caller, req: &Req) -> Reply {
        if caller.account.is_some() {
            return Err(ApiError::forbidden(
                "an account-scoped token cannot follow the whole sync file",
            ));
        }
        let after = req.query_i64("after")?.unwrap_or(-1);
        let wait = req.query_i64("wait")?.unwrap_or(30);
        if !(0..=30).contains(&wait) {
            return Err(ApiError::field("wait", "wait: 0 to 30 seconds"));
        }
        let deadline = Instant::now() + Duration::from_secs(wait.unsigned_abs());
        loop {
            // The revision sent and the bytes are those of one and the same parse (the file
            // with its journal folded in), and only the one in force (by content, not only by
            // revision): not one the gateway has yet to load, or rejected.
            let in_force = self.gate.table().revision;
            let newer = i64::try_from(in_force).unwrap_or(i64::MAX) > after;
            let file = match newer {
                true => self.file_in_force().await?,
                false => None,
            };
            if let Some(file) = file {
                let in_force = file.revision;
                let bytes = self.serialized(file).await?;
                return Ok(::http::Response::builder()
                    .status(StatusCode::OK)
                    .header(::http::header::CONTENT_TYPE, "application/json")
                    .header("x-keygate-revision", in_force)
                    .header(::http::header::CACHE_CONTROL, "no-store")
                    .body(http::full(bytes))
                    .unwrap_or_default());
            }
            if Instant::now() >= deadline {
                return Ok(::http::Response::builder()
                    .status(StatusCode::NOT_MODIFIED)
                    .header("x-keygate-revision", in_force)
                    .body(http::full(Vec::new()))
                    .unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `file` as a sync file's bytes, serialized once per parse: the cache names the parse
    /// without keeping it (a kept parse would make the next edit copy it whole), and a parse
    /// edited in place is a new one for it (`Arc::make_mut` moves it away from a `Weak`).
    async fn serialized(&self, file: Arc<SyncFile>) -> Result<bytes::Bytes, ApiError> {
        let cache = self.sync_cache.clone();
        tokio::task::spawn_blocking(move || {
            let mut cache = cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((_, bytes)) = cache
                .as_ref()
                .filter(|(of, _)| of.upgrade().is_some_and(|f| Arc::ptr_eq(&f, &file)))
            {
                return Ok(bytes.clone());
            }
            let mut bytes = serde_json::to_vec_pretty(&*file)
                .map_err(|e| ApiError::internal(format!("serializing the sync file: {e}")))?;
            bytes.push(b'\n');
            let bytes = bytes::Bytes::from(bytes);
            *cache = Some((Arc::downgrade(&file), bytes.clone()));
            Ok(bytes)
        })
        .await
        .map_err(|e| ApiError::crashed("serializing the sync file", e))?
    }

    /// The gate this API manages.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// The sync file as it is now, parsed (once per change of the file).
    pub async fn file(&self) -> Result<Arc<SyncFile>, ApiError> {
        let editor = self.editor.clone();
        tokio::task::spawn_blocking(move || editor.snapshot())
            .await
            .map_err(|e| ApiError::crashed("reading the sync file", e))?
            .map_err(ApiError::internal)
    }

    /// The sync file as it is now, parsed, if it is the one in force on this gateway.
    async fn file_in_force(&self) -> Result<Option<Arc<SyncFile>>, ApiError> {
        let editor = self.editor.clone();
        let (file, digest) = tokio::task::spawn_blocking(move || editor.snapshot_digest())
            .await
            .map_err(|e| ApiError::crashed("reading the sync file", e))?
            .map_err(ApiError::internal)?;
        Ok(digest.filter(|d| self.reloader.holds(*d)).map(|_| file))
    }

    /// What this gateway's ledger charged, by counter id.
    pub fn consumed_fn(&self) -> impl Fn(u64) -> i64 + '_ {
        let ledger = self.gate.ledger();
        move |id| ledger.consumed(id)
    }

    /// Queue a write; answers once it is in force.
    pub async fn write(&self, if_match: Option<u64>, change: writes::Change) -> writes::Written {
        self.writer.write(if_match, change).await
    }

    /// Append to the audit log.
    pub fn audit(
        &self,
        caller: &Caller,
        req: &Req,
        action: &str,
        target: String,
        changed: Vec<String>,
    ) {
        self.audit.record(audit::Entry {
            token_name: &caller.name,
            action,
            target,
            changed,
            client_ip: req.ip,
        });
    }

    /// Is there a key vault?
    pub fn vault_enabled(&self) -> bool {
        self.vault.is_some()
    }

    /// The key vault, for a write to seal with.
    pub fn vault(&self) -> Option<Arc<Vault>> {
        self.vault.clone()
    }

    /// Can `k`'s full key be shown again?
    pub fn revealable(&self, k: &KeyEntry) -> bool {
        k.key.is_some() || (self.vault.is_some() && k.key_sealed.is_some())
    }

    /// `k`'s full key from the vault; 409 `not_recoverable` without one or for a key stored
    /// only as a hash, 409 `sealed_value_invalid` for a sealed value that does not open (edited
    /// by hand, moved to another key, sealed under another secret).
    pub fn reveal_key(&self, k: &KeyEntry) -> Result<String, ApiError> {
        crate::sync::vault::reveal_entry(k, self.vault.as_deref()).map_err(|e| {
            let code = e.code();
            ApiError::conflict(code, e.to_string())
        })
    }

    /// 429 past [`REVEALS_PER_MINUTE`] reveals by this token in the last minute.
    pub fn reveal_allowed(&self, caller: &Caller) -> Result<(), ApiError> {
        let now = Instant::now();
        let mut map = self
            .reveals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let q = map.entry(caller.name.clone()).or_default();
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            q.pop_front();
        }
        if q.len() >= REVEALS_PER_MINUTE {
            return Err(ApiError::too_many(format!(
                "at most {REVEALS_PER_MINUTE} reveals a minute per token"
            )));
        }
        q.push_back(now);
        Ok(())
    }
}

/// A body over [`MAX_BODY`] of at most this many bytes is read to its end before the 413 (see
/// [`read_body`]); a larger one is refused at once and the connection closed under it.
const DRAIN_MAX: usize = 8 * MAX_BODY;
/// How long that reading may take.
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// The request's body, at most [`MAX_BODY`] bytes; 413 above. An over-size body is still read
/// to its end ([`drain`]) before the answer: a server that answers and closes while the client
/// is still sending makes the client's next write fail (the kernel resets the connection), and
/// most clients then report the broken pipe, not the 413. (This reading comes before the
/// caller is known: anyone may make the listener read up to 8 MiB per request.)
async fn read_body(mut body: hyper::body::Incoming) -> Result<bytes::Bytes, ApiError> {
    let unreadable = |e: hyper::Error| ApiError::bad(format!("cannot read the body: {e}"));
    let mut kept = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(unreadable)?.into_data() else {
            continue;
        };
        if kept.len() + data.len() > MAX_BODY {
            drain(&mut body, kept.len() + data.len()).await;
            return Err(ApiError::too_large());
        }
        kept.extend_from_slice(&data);
    }
    Ok(kept.freeze())
}

/// Read and drop the rest of `body`, `seen` bytes of it read already: until its end, past
/// [`DRAIN_MAX`] bytes, an error, or [`DRAIN_TIME`].
async fn drain(body: &mut hyper::body::Incoming, mut seen: usize) {
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > DRAIN_MAX {
                break;
            }
        }
    })
    .await;
}

//! [`GateCtx`], the per-request state every phase reads and writes, and [`Outcome`].

use super::response::{final_usage, price_of};
use crate::core::admission::{BodyFacts, KeyAdmission};
use crate::core::errors::{ErrorShape, Reason};
use crate::core::metrics::CallSeries;
use crate::core::pricing::{PriceRule, Usage};
use crate::core::table::{KeyRecord, KeyTable};
use crate::ledger::Reservation;
use crate::usage::SseTracker;
use bytes::Bytes;
use http::HeaderValue;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

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
    pub(super) fn label(self) -> (&'static str, Option<Reason>) {
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
    pub(super) request_id: Option<HeaderValue>,
    pub(super) shape: ErrorShape,
    pub(super) table: Option<Arc<KeyTable>>,
    pub(super) key: Option<KeyAdmission>,
    pub(super) model: Option<String>,
    pub(super) upstream: Option<usize>,
    /// The target of the attempt under way (or chosen for the first one).
    pub(super) target: Option<usize>,
    /// The first attempt's target, chosen in `request_filter`.
    pub(super) first_target: Option<usize>,
    /// The targets tried so far, a bit each.
    pub(super) tried: u64,
    /// Attempts made so far.
    pub(super) attempts: u32,
    /// The body with the model renamed for the attempt's target (`model_map`).
    pub(super) attempt_body: Option<Bytes>,
    /// Seconds for a `Retry-After` on keygate's own 429.
    pub(super) retry_after: Option<u64>,
    pub(super) body: Option<Bytes>,
    pub(super) facts: BodyFacts,
    pub(super) outcome: Outcome,
    pub(super) gate_time: Duration,
    pub(super) started: Option<Instant>,
    /// The wall-clock time at `started`.
    pub(super) started_at: Option<SystemTime>,
    pub(super) upstream_started: Option<Instant>,
    pub(super) first_byte: Option<Instant>,
    pub(super) reservation: Option<Reservation>,
    pub(super) price: Option<PriceRule>,
    pub(super) estimate: Usage,
    pub(super) strip_usage: bool,
    pub(super) status: u16,
    pub(super) sse: Option<SseTracker>,
    pub(super) json_body: Vec<Bytes>,
    pub(super) json_len: usize,
    pub(super) charged: Option<(Usage, i64)>,
    /// The status the settled call is recorded with.
    pub(super) settled_status: Option<u16>,
    /// The series the settled call was counted in.
    pub(super) series: Option<Arc<CallSeries>>,
    pub(super) embedding: bool,
    pub(super) json_response: bool,
    /// Seconds for the `Retry-After` of a refusal (any status).
    pub(super) denial_retry_after: Option<u64>,
    /// The rate-limit headers of an admitted or refused call, as numbers until the answer is
    /// written.
    pub(super) rate: crate::ledger::limits::RateHeaders,
    /// This attempt's request body has been handed to Pingora in full.
    pub(super) body_sent: bool,
    /// The upstream's answer was taken: no attempt follows.
    pub(super) answer_final: bool,
    /// The rate-limit tokens and concurrency slots this call holds (SPEC §7).
    pub(super) limit_hold: Option<crate::ledger::limits::LimitHold>,
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
    /// Drop the request body once nothing can send it again: the answer is final and this
    /// attempt's body is handed over. A long call (a stream of minutes) then does not hold the
    /// prompt (Pingora's retry buffer keeps its own copy of the body's last 64 KiB at most).
    pub(super) fn release_body(&mut self) {
        if self.body_sent && self.answer_final {
            self.body = None;
            self.attempt_body = None;
        }
    }
    /// Milliseconds from the request's start to `t` (the usage log's and the store's timings).
    pub(super) fn ms_since_start(&self, t: Option<Instant>) -> Option<u64> {
        t.zip(self.started)
            .map(|(t, s)| t.saturating_duration_since(s).as_millis() as u64)
    }
    /// The wall-clock unix seconds at `finished`, from the clock reads the call made anyway.
    pub(super) fn unix_at(&self, finished: Instant) -> i64 {
        self.started_at
            .zip(self.started)
            .map_or_else(crate::core::clock::unix_now, |(at, s)| {
                crate::core::clock::unix_secs(at + finished.saturating_duration_since(s))
            })
    }
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
    /// The target (its index in the pool) of the attempt that answered, or of the last one.
    pub fn target(&self) -> Option<usize> {
        self.target
    }
    /// Attempts made so far (tries of a target).
    pub fn attempts(&self) -> u32 {
        self.attempts
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
    pub(super) fn path_hint(&self) -> bool {
        self.embedding
    }
    pub(super) fn key_record(&self) -> Option<&KeyRecord> {
        let key = self.key.as_ref()?;
        self.table.as_ref()?.at_slot(key.slot)
    }
}

//! The rate limits' worker thread: owns its Redis connection and the scopes this gateway holds
//! leases for; tops leases up, serves waiting calls, reports debts, gives idle leases and
//! spare slots back and renews this gateway's concurrency records.

use super::rates::{
    lease_size, rate_key, Ask, Msg, RateLeases, CONCURRENT_CALLS, FLUSH_EVERY, IDLE, RATE_SCRIPT,
    WINDOW_US,
};
use super::scripts::{connect, next_messages, ping, unreachable, Conn, Script};
use super::slot::{spare_slots, CONC, KINDS, RPM};
use super::RedisSettings;
use crate::ledger::limits::{mono_ns, ScopeLive};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

// Here, not beside `RateLeases`, so that the worker is imported by no one it imports.
impl RateLeases {
    /// Start the worker thread (its own connection, made in the background).
    pub(crate) fn start(settings: RedisSettings) -> std::io::Result<Arc<RateLeases>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let leases = Arc::new(RateLeases {
            mode: settings.on_unavailable,
            ttl: settings.lease_ttl,
            up: AtomicBool::new(true),
            timeout: settings.timeout,
            ops: AtomicU64::new(0),
            tx,
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let worker = Worker::new(leases.clone(), settings, Script::new(RATE_SCRIPT));
        std::thread::Builder::new()
            .name("keygate-rates".into())
            .spawn(move || runtime.block_on(worker.run(rx)))?;
        Ok(leases)
    }
}

/// One script call: per kind, what to want and what was taken out to give back; and, when
/// `slots`, the concurrency slots this gateway has once `give` is back (restated each call).
/// `renew`: made for the concurrency record's sake alone.
struct Call {
    ask: Ask,
    want: [i64; KINDS],
    give: [i64; KINDS],
    slots: bool,
    has: i64,
    renew: bool,
}

/// The worker thread: owns the connection and the scopes it holds leases for.
pub(super) struct Worker {
    leases: Arc<RateLeases>,
    settings: RedisSettings,
    conn: Option<Conn>,
    script: Script,
    /// Scopes with a lease: the live state and their last limits.
    known: HashMap<u64, (Arc<ScopeLive>, [u32; KINDS])>,
    /// This gateway's name in the concurrency records.
    gateway: String,
}

impl Worker {
    pub(super) fn new(leases: Arc<RateLeases>, settings: RedisSettings, script: Script) -> Worker {
        Worker {
            leases,
            settings,
            conn: None,
            script,
            known: HashMap::new(),
            gateway: super::gateway_id(),
        }
    }

    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut next_flush = Instant::now() + FLUSH_EVERY;
        loop {
            let Some(msgs) = next_messages(&mut rx, next_flush).await else {
                return;
            };
            let mut asks: HashMap<u64, Ask> = HashMap::new();
            let mut shutdown = None;
            for m in msgs {
                let m = match m {
                    Msg::Spare(id) => match self.known.get(&id) {
                        Some((live, limits)) => Msg::Fill(Ask {
                            id,
                            live: live.clone(),
                            limits: *limits,
                            need: [0; KINDS],
                            replies: Vec::new(),
                        }),
                        None => continue,
                    },
                    m => m,
                };
                match m {
                    Msg::Fill(a) => {
                        a.live.lease.queued.store(false, Ordering::Release);
                        self.known.insert(a.id, (a.live.clone(), a.limits));
                        match asks.get_mut(&a.id) {
                            Some(b) => {
                                for k in 0..KINDS {
                                    b.need[k] = b.need[k].saturating_add(a.need[k]);
                                }
                                b.limits = a.limits;
                                b.replies.extend(a.replies);
                            }
                            None => {
                                asks.insert(a.id, a);
                            }
                        }
                    }
                    Msg::Shutdown(done) => shutdown = Some(done),
                    Msg::Spare(_) => {}
                }
            }
            let flush = Instant::now() >= next_flush || shutdown.is_some();
            let closing = shutdown.is_some();
            // Closing: what a waiting scope holds goes back rather than asking for more.
            let mut calls: Vec<Call> = asks.into_values().map(|a| self.plan(a, closing)).collect();
            if flush {
                calls.extend(self.flush(&calls, closing));
                next_flush = Instant::now() + FLUSH_EVERY;
            }
            calls.retain(|c| {
                c.want != [0; KINDS]
                    || c.give != [0; KINDS]
                    || !c.ask.replies.is_empty()
                    || c.renew
                    || (c.slots && c.has != c.ask.live.lease.recorded.load(Ordering::Acquire))
            });
            if !calls.is_empty() {
                self.send(calls).await;
            } else if flush && !closing && !self.leases.is_up() {
                self.probe().await;
            }
            if let Some(done) = shutdown {
                let _ = done.send(());
                return;
            }
        }
    }

    /// What to ask for a scope: the waiting calls' need plus a lease; a debt goes along, and
    /// spare slots beyond what the scope keeps go back.
    fn plan(&self, ask: Ask, give_back: bool) -> Call {
        let mut call = Call {
            want: [0; KINDS],
            give: [0; KINDS],
            slots: false,
            has: 0,
            renew: false,
            ask,
        };
        let lease = &call.ask.live.lease;
        let limit = call.ask.limits[CONC];
        let owned = lease.owned.load(Ordering::Acquire);
        if limit > 0 || owned > 0 || lease.recorded.load(Ordering::Acquire) != 0 {
            let spare = lease.held[CONC].load(Ordering::Acquire).max(0);
            let target = if give_back {
                0
            } else {
                call.ask.need[CONC] + spare_slots(limit)
            };
            if spare > target {
                call.give[CONC] = lease.take_out_up_to(CONC, spare - target);
            } else if limit > 0 {
                call.want[CONC] = (target - spare).min(i64::from(limit));
            }
            call.slots = true;
            call.has = owned - call.give[CONC];
        }
        for k in 0..2 {
            let limit = call.ask.limits[k];
            if limit == 0 {
                continue;
            }
            call.give[k] = lease.take_out(k, false);
            if give_back {
                call.give[k] += lease.take_out(k, true);
                continue;
            }
            let held = lease.held[k].load(Ordering::Acquire).max(0);
            let target = call.ask.need[k].saturating_add(lease_size(limit));
            call.want[k] = (target - held).max(0).min(i64::from(limit));
        }
        call
    }

    /// Scopes not asked about this round with a debt to report, an idle lease or spare slots
    /// to give back, or a concurrency record to renew.
    fn flush(&mut self, asked: &[Call], closing: bool) -> Vec<Call> {
        let now = mono_ns();
        let idle_ns = IDLE.as_nanos() as i64;
        let renew_ns = (self.leases.ttl / 3).as_nanos() as i64;
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for (id, (live, limits)) in &self.known {
            if asked.iter().any(|c| c.ask.id == *id) {
                continue;
            }
            let lease = &live.lease;
            let held = [0, 1, 2].map(|k| lease.held[k].load(Ordering::Acquire));
            let idle = closing || now - lease.last_use.load(Ordering::Relaxed) >= idle_ns;
            let owned = lease.owned.load(Ordering::Acquire);
            let stale = owned != lease.recorded.load(Ordering::Acquire)
                || (owned > 0 && now - lease.renewed.load(Ordering::Acquire) >= renew_ns);
            let extra = held[CONC] > spare_slots(limits[CONC]);
            if held == [0; KINDS] && !stale {
                // Forgotten only when no call holds it (here and in the book): a call still
                // running (a long stream) may settle beyond its estimate, and that debt must
                // be reported by a later flush.
                if idle && owned == 0 && Arc::strong_count(live) <= 2 {
                    gone.push(*id);
                }
                continue;
            }
            if !(idle || stale || extra || held.iter().any(|h| *h < 0)) {
                continue;
            }
            let ask = Ask {
                id: *id,
                live: live.clone(),
                limits: *limits,
                need: [0; KINDS],
                replies: Vec::new(),
            };
            let mut call = self.plan(ask, idle);
            call.renew = stale;
            if !idle {
                // Only the debt, extra slots and the record: the lease stays as it is.
                call.want = [0; KINDS];
            }
            out.push(call);
        }
        for id in gone {
            self.known.remove(&id);
        }
        out
    }

    async fn ensure_conn(&mut self) -> bool {
        if self.conn.is_none() {
            match tokio::time::timeout(self.settings.timeout * 2, connect(&self.settings)).await {
                Ok(Ok(c)) => self.conn = Some(c),
                Ok(Err(e)) => return self.failed(&format!("connect: {e}")),
                Err(_) => return self.failed("connect: timed out"),
            }
        }
        true
    }

    /// While Redis is away and no call asks it (`deny` refuses and `allow` admits without
    /// asking), one PING a flush tells when it is back.
    async fn probe(&mut self) {
        if !self.ensure_conn().await {
            return;
        }
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        self.leases.ops.fetch_add(1, Ordering::Relaxed);
        match ping(conn, self.settings.timeout).await {
            Ok(()) => self.reached(),
            Err(why) => {
                self.failed(&why);
            }
        }
    }

    fn reached(&self) {
        if !self.leases.up.swap(true, Ordering::AcqRel) {
            log::info!("rate limits: Redis reachable again");
        }
    }

    fn failed(&self, why: &str) -> bool {
        if self.leases.up.swap(false, Ordering::AcqRel) {
            log::error!(
                "rate limits: Redis unreachable ({why}); on_unavailable: {:?}",
                self.leases.mode
            );
        }
        false
    }

    /// Make the calls (several at once) and apply the answers.
    async fn send(&mut self, mut calls: Vec<Call>) {
        if !self.ensure_conn().await {
            for c in calls {
                undo(c);
            }
            return;
        }
        while !calls.is_empty() {
            let rest = calls.split_off(calls.len().min(CONCURRENT_CALLS));
            let batch = std::mem::replace(&mut calls, rest);
            let answers = futures_util::future::join_all(batch.iter().map(|c| {
                let mut conn = self.conn.clone();
                let script = &self.script;
                let timeout = self.settings.timeout;
                let gateway = self.gateway.as_str();
                let key = rate_key(c.ask.id);
                let mut args = [0i64; 10];
                for k in 0..2 {
                    args[k * 3] = i64::from(c.ask.limits[k]);
                    args[k * 3 + 1] = c.want[k];
                    args[k * 3 + 2] = c.give[k];
                }
                args[6] = i64::from(c.ask.limits[CONC]);
                args[7] = c.has;
                args[8] = c.want[CONC];
                args[9] = self.leases.ttl.as_millis() as i64;
                async move {
                    let conn = conn.as_mut()?;
                    let keys = [key.as_str()];
                    type Answer = (i64, i64, i64, i64, i64, i64);
                    let call = script.call::<Answer>(conn, &keys, &args, Some(gateway));
                    match tokio::time::timeout(timeout, call).await {
                        Ok(Ok((a, b, c, d, e, f))) => Some(Ok([a, b, c, d, e, f])),
                        Ok(Err(e)) if !unreachable(&e) => Some(Err(e)),
                        Ok(Err(e)) => {
                            log::debug!("rate limits: {e}");
                            None
                        }
                        Err(_) => None,
                    }
                }
            }))
            .await;
            self.leases
                .ops
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            let reached = answers.iter().any(Option::is_some);
            for (call, answer) in batch.into_iter().zip(answers) {
                match answer {
                    Some(Ok(v)) => apply(call, v),
                    Some(Err(e)) => {
                        log::error!("rate limits: scope {}: Redis refused: {e}", call.ask.id);
                        undo(call);
                    }
                    None => undo(call),
                }
            }
            if reached {
                self.reached();
            } else {
                self.failed("script calls failed or timed out");
                for c in std::mem::take(&mut calls) {
                    undo(c);
                }
            }
        }
    }
}

/// Credit an answer `[granted rpm, ahead rpm µs, granted tpm, ahead tpm µs, granted slots,
/// room]`: the tokens go to the lease, the local bucket mirrors the Redis one, and a grant
/// short of what was asked marks the bucket empty until its next token. Slots go to the lease
/// too; when the live records hold more than the limit (it was lowered, or this gateway's
/// record had lapsed), spare slots go back at the next round.
fn apply(call: Call, v: [i64; 6]) {
    let now = mono_ns();
    let live = &call.ask.live;
    if call.slots {
        let lease = &live.lease;
        let (granted, room) = (v[4], v[5]);
        lease.give(CONC, granted);
        lease
            .slots_full
            .store(granted < call.want[CONC], Ordering::Release);
        let has = call.has + granted;
        lease.recorded.store(has, Ordering::Release);
        lease.renewed.store(now, Ordering::Release);
        let over = lease.take_out_up_to(CONC, -room);
        lease.owned.store(has - over, Ordering::Release);
    }
    for k in 0..2 {
        let limit = call.ask.limits[k];
        if limit == 0 {
            continue;
        }
        let (granted, ahead_ns) = (v[k * 2], v[k * 2 + 1].saturating_mul(1_000));
        live.lease.give(k, granted);
        let bucket = if k == RPM { &live.rpm } else { &live.tpm };
        bucket.set_tat(now.saturating_add(ahead_ns));
        if call.want[k] == 0 {
            continue;
        }
        // Less than asked: the bucket is empty until its next token (calls that the lease
        // cannot cover are refused here until then); all of it: not empty.
        let until = if granted < call.want[k] {
            let token_ns = WINDOW_US * 1_000 / i64::from(limit);
            now + (ahead_ns + token_ns - WINDOW_US * 1_000).max(1_000_000)
        } else {
            0
        };
        live.lease.empty_until[k].store(until, Ordering::Release);
    }
    for r in call.ask.replies {
        let _ = r.send(true);
    }
}

/// A call without an answer: what was taken out to send goes back to the lease (a lost answer
/// that Redis applied leaves the bucket stricter, never looser, except for a give-back), and
/// the waiting calls are told.
fn undo(call: Call) {
    for k in 0..KINDS {
        call.ask.live.lease.give(k, call.give[k]);
    }
    for r in call.ask.replies {
        let _ = r.send(false);
    }
}

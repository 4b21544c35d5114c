//! The ledger thread's worker: owns the Redis connection and what it knows of each key;
//! refills leases, gives back idle ones and reports consumption.

use super::scripts::{next_messages, ping, redis_keys, unreachable, Conn, Scripts};
use super::*;
use crate::core::pricing::MAX_AMOUNT;

/// What one sync call asks for a key.
pub(super) struct Ask {
    pub(super) key_id: u64,
    pub(super) slot: Arc<Slot>,
    /// What this gateway believes Redis granted it (its record's `granted`).
    pub(super) known: i64,
    /// A give-back whose answer was lost: held back from `avail` until an answer shows
    /// whether Redis applied it.
    pub(super) pending: i64,
    pub(super) need: i64,
    pub(super) want: i64,
    pub(super) give: i64,
    pub(super) deficit: i64,
    /// [`KeyState::record_valid`].
    pub(super) record_valid: i64,
    pub(super) held: i64,
    pub(super) waiters: Waiters,
}

/// What the sync script answered (see [`super::scripts::SYNC_SCRIPT`]).
pub(super) struct Answer {
    /// Redis applied the call (the gateway's word matched its record).
    pub(super) applied: bool,
    /// The record's `granted` after the call.
    pub(super) granted: i64,
    pub(super) committed: i64,
    /// `committed` less what live gateways hold.
    pub(super) consumption: i64,
    /// The record's `valid_until_ms` after the call (0: no record).
    pub(super) valid: i64,
}

/// One script call's outcome.
pub(super) enum Outcome {
    Answered(Answer),
    /// Redis (or the key's node) could not be reached in time.
    Unreachable,
    /// Redis refused this call (a script error, a wrong type at the key).
    Refused,
}

/// The ledger thread: owns the connection and what it knows of each key.
pub(super) struct Worker {
    pub(super) ledger: Arc<LeaseLedger>,
    pub(super) settings: RedisSettings,
    pub(super) conn: Option<Conn>,
    pub(super) gateway: String,
    /// Per counter: units charged before this gateway used Redis, and when it ends.
    pub(super) seed: HashMap<u64, (i64, i64)>,
    pub(super) keys: HashMap<u64, KeyState>,
    pub(super) scripts: Arc<Scripts>,
}

/// What the worker knows of one key.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct KeyState {
    /// What Redis granted this gateway, as far as it knows (its record's `granted`).
    pub(super) known: i64,
    /// A give-back sent without an answer (see [`Ask::pending`]).
    pub(super) pending_give: i64,
    /// The rate mark: units debited at `rate_at` (ms).
    pub(super) rate_debited: i64,
    pub(super) rate_at: u64,
    /// When the record was last written (ms).
    pub(super) synced_at: u64,
    /// Until when the record was valid in the last answer that showed it (ms on Redis's
    /// clock; 0: none): Redis tells by it whether a missing record was removed for age or lost.
    pub(super) record_valid: i64,
}

/// A waiting reservation gets another round (a grant taken by a faster call, an answer that
/// corrected this gateway instead of granting) this many times before it is refused.
pub(super) const WAIT_ROUNDS: u8 = 3;

impl Worker {
    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut next_flush = Instant::now() + FLUSH_EVERY;
        if self.ensure_ready().await {
            self.probe().await;
        }
        loop {
            let Some(msgs) = next_messages(&mut rx, next_flush).await else {
                return;
            };
            if !self.ensure_ready().await {
                self.answer_unavailable(msgs);
                next_flush = Instant::now() + FLUSH_EVERY;
                continue;
            }
            let mut shutdown = None;
            let mut needs: HashMap<u64, (Arc<Slot>, Waiters)> = HashMap::new();
            let mut refills = Vec::new();
            for m in msgs {
                match m {
                    Msg::Need {
                        key_id,
                        slot,
                        amount,
                        reply,
                        rounds,
                    } => needs
                        .entry(key_id)
                        .or_insert_with(|| (slot, Vec::new()))
                        .1
                        .push((amount, reply, rounds)),
                    Msg::Refill(id) => refills.push(id),
                    Msg::Read(id, done) => self.spawn_read(id, done),
                    Msg::Shutdown(done) => shutdown = Some(done),
                }
            }
            let flush = Instant::now() >= next_flush || shutdown.is_some();
            let (urgent, background) = self.plan(needs, refills, flush, shutdown.is_some());
            if urgent.is_empty() && background.is_empty() && flush && !self.ledger.is_up() {
                self.probe().await;
            }
            // Calls that wait go first, in their own round.
            self.sync(urgent).await;
            self.sync(background).await;
            if flush {
                next_flush = Instant::now() + FLUSH_EVERY;
            }
            if let Some(done) = shutdown {
                let _ = done.send(());
                return;
            }
        }
    }

    /// Connect and seed, if not done yet. False while Redis cannot be reached.
    pub(super) async fn ensure_ready(&mut self) -> bool {
        if self.conn.is_none() {
            match tokio::time::timeout(self.settings.timeout * 2, connect(&self.settings)).await {
                Ok(Ok(c)) => self.conn = Some(c),
                Ok(Err(e)) => return self.failed(&format!("connect: {e}")),
                Err(_) => return self.failed("connect: timed out"),
            }
        }
        if !self.seed.is_empty() {
            let seed: Vec<(u64, (i64, i64))> = self.seed.iter().map(|(k, v)| (*k, *v)).collect();
            for chunk in seed.chunks(CONCURRENT_CALLS) {
                let calls = chunk.iter().map(|(id, (v, until))| {
                    let conn = self.conn.clone();
                    let script = &self.scripts.seed;
                    let timeout = self.settings.timeout;
                    async move {
                        let mut conn = conn?;
                        let (k, _) = redis_keys(*id);
                        let (keys, args) = ([k.as_str()], [*v, *until]);
                        let call = script.call::<i64>(&mut conn, &keys, &args, None);
                        Some(tokio::time::timeout(timeout, call).await)
                    }
                });
                let results = futures_util::future::join_all(calls).await;
                self.ledger
                    .stats
                    .ops
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                let mut applied = 0;
                for ((id, _), r) in chunk.iter().zip(results) {
                    match r {
                        Some(Ok(Ok(1))) => applied += 1,
                        Some(Ok(Ok(_))) => {}
                        Some(Ok(Err(e))) if !unreachable(&e) => {
                            // This key cannot be seeded (say, a foreign value at its Redis
                            // key); the others can.
                            log::error!("ledger: seeding key {id}: {e}");
                        }
                        _ => return self.failed("seeding from the local ledger failed"),
                    }
                    self.seed.remove(id);
                }
                log::info!(
                    "ledger: seeded {applied} of {} keys from the local ledger",
                    chunk.len()
                );
            }
        }
        true
    }

    /// A `PING`, to learn whether Redis is back when there is nothing else to send.
    pub(super) async fn probe(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        self.ledger.stats.ops.fetch_add(1, Ordering::Relaxed);
        match ping(conn, self.settings.timeout).await {
            Ok(()) => self.reached(),
            Err(why) => {
                self.failed(&why);
            }
        }
    }

    pub(super) fn reached(&self) {
        self.ledger.reached.store(true, Ordering::Release);
        if !self.ledger.up.swap(true, Ordering::AcqRel) {
            log::info!("ledger: Redis reachable again");
        }
    }

    pub(super) fn failed(&self, why: &str) -> bool {
        self.ledger.stats.errors.fetch_add(1, Ordering::Relaxed);
        if self.ledger.up.swap(false, Ordering::AcqRel) {
            log::error!(
                "ledger: Redis unreachable ({why}); on_unavailable: {:?}",
                self.ledger.mode
            );
        }
        false
    }

    /// Answer waiting calls while Redis is away, as `on_unavailable` says.
    pub(super) fn answer_unavailable(&self, msgs: Vec<Msg>) {
        for m in msgs {
            match m {
                Msg::Need {
                    slot,
                    amount,
                    reply,
                    ..
                } => self.admit_without_redis(&slot, amount, reply),
                Msg::Refill(id) => {
                    if let Some(s) = self.ledger.slots.get(&id) {
                        s.queued.store(false, Ordering::Release);
                    }
                }
                Msg::Read(_, done) => {
                    let _ = done.send(());
                }
                Msg::Shutdown(done) => {
                    let _ = done.send(());
                }
            }
        }
    }

    /// A waiting call without Redis: admitted and counted locally with `allow`, else refused.
    pub(super) fn admit_without_redis(&self, slot: &Arc<Slot>, amount: i64, reply: Reply) {
        let answer = if self.ledger.mode == OnUnavailable::Allow {
            self.ledger.debit(slot, amount);
            Ok(self.granted(slot, amount))
        } else {
            Err(ReserveError::BackendUnavailable)
        };
        let _ = reply.send(answer);
    }

    /// Units already debited for a waiting call, refunded if the call gave up meanwhile.
    pub(super) fn granted(&self, slot: &Arc<Slot>, amount: i64) -> Granted {
        Granted {
            slot: slot.clone(),
            ledger: self.ledger.clone(),
            amount,
            claimed: false,
        }
    }

    pub(super) fn spawn_read(&self, key_id: u64, done: oneshot::Sender<()>) {
        let Some(mut conn) = self.conn.clone() else {
            let _ = done.send(());
            return;
        };
        let ledger = self.ledger.clone();
        let timeout = self.settings.timeout;
        let scripts = self.scripts.clone();
        tokio::spawn(async move {
            let (k, leases) = redis_keys(key_id);
            let keys = [k.as_str(), leases.as_str()];
            let deadline = tokio::time::Instant::now() + timeout;
            // A connection broken by a Redis restart fails its first command and reconnects:
            // one more try, within the same time.
            for _ in 0..2 {
                ledger.stats.ops.fetch_add(1, Ordering::Relaxed);
                let call = scripts.read.call::<i64>(&mut conn, &keys, &[], None);
                match tokio::time::timeout_at(deadline, call).await {
                    Ok(Ok(v)) => {
                        if let Some(slot) = ledger.slots.get(&key_id) {
                            slot.consumption.store(v, Ordering::Release);
                            slot.consumption_read.store(true, Ordering::Release);
                        }
                        break;
                    }
                    Ok(Err(_)) => {
                        ledger.stats.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        ledger.stats.errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
            let _ = done.send(());
        });
    }

    /// This round's sync calls: first the keys with waiting calls, then keys whose lease ran
    /// low and, on a flush, every key with something to report, renew or give back.
    pub(super) fn plan(
        &mut self,
        needs: HashMap<u64, (Arc<Slot>, Waiters)>,
        refills: Vec<u64>,
        flush: bool,
        closing: bool,
    ) -> (Vec<Ask>, Vec<Ask>) {
        let now = self.ledger.now_ms();
        let ttl = self.settings.lease_ttl.as_millis() as u64;
        let renew_after = ttl / 3;
        let idle_after = IDLE_MS.min(ttl);
        let mut urgent = Vec::new();
        let mut planned = std::collections::HashSet::new();
        for (key_id, (slot, waiters)) in needs {
            let total = waiters
                .iter()
                .fold(0i64, |sum, (a, _, _)| sum.saturating_add(*a));
            let mut ask = self.ask(key_id, slot, now);
            ask.need = total.saturating_sub(ask.held.max(0)).max(0);
            ask.want = ask
                .need
                .saturating_add(self.lease_size(key_id, &ask.slot, now))
                .min(MAX_AMOUNT);
            ask.waiters = waiters;
            planned.insert(key_id);
            urgent.push(ask);
        }
        let mut background = Vec::new();
        for key_id in refills {
            let Some(slot) = self.ledger.slots.get(&key_id).map(|s| s.clone()) else {
                continue;
            };
            slot.queued.store(false, Ordering::Release);
            if !planned.insert(key_id) {
                continue;
            }
            let mut ask = self.ask(key_id, slot, now);
            // Top the lease up to its size, not beyond.
            ask.want = (self.lease_size(key_id, &ask.slot, now) - ask.held.max(0)).max(0);
            background.push(ask);
        }
        if flush {
            let unix_now = crate::core::clock::unix_now();
            let slots: Vec<(u64, Arc<Slot>)> = self
                .ledger
                .slots
                .iter()
                .map(|e| (*e.key(), e.value().clone()))
                .collect();
            for (key_id, slot) in slots {
                if planned.contains(&key_id) {
                    continue;
                }
                let avail = slot.avail.load(Ordering::Acquire);
                let idle = now.saturating_sub(slot.last_use.load(Ordering::Relaxed)) >= idle_after;
                let state = self.keys.get(&key_id).copied().unwrap_or_default();
                let stale = avail != 0 && now.saturating_sub(state.synced_at) >= renew_after;
                let dirty = slot.dirty.swap(false, Ordering::AcqRel);
                let give_back = (idle || closing) && avail > 0;
                if !(dirty || avail < 0 || stale || give_back || state.pending_give != 0) {
                    drop(slot);
                    self.forget_if_ended(key_id, unix_now);
                    continue;
                }
                let mut ask = self.ask(key_id, slot, now);
                if give_back {
                    // Taken out of `avail` first, so it is not spent meanwhile.
                    let taken =
                        ask.slot
                            .avail
                            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                                (a > 0).then_some(0)
                            });
                    ask.give = taken.unwrap_or(0).max(0);
                    ask.held = ask.slot.avail.load(Ordering::Acquire);
                    ask.deficit = (-ask.held).max(0);
                }
                background.push(ask);
            }
        }
        (urgent, background)
    }

    /// Forget `key_id`'s slot when its counter ended at `now` (unix seconds) and this gateway
    /// has nothing left of it: no lease, nothing to report, no call holding it (under the map's
    /// lock, where no new holder can appear). Its Redis keys expire by themselves.
    pub(super) fn forget_if_ended(&mut self, key_id: u64, now: i64) {
        let ended = |s: &Arc<Slot>| {
            let until = s.until.load(Ordering::Relaxed);
            until != 0
                && until <= now
                && Arc::strong_count(s) == 1
                && s.avail.load(Ordering::Acquire) == 0
                && !s.dirty.load(Ordering::Acquire)
        };
        if self
            .ledger
            .slots
            .remove_if(&key_id, |_, s| ended(s))
            .is_some()
        {
            self.keys.remove(&key_id);
        }
    }

    pub(super) fn ask(&mut self, key_id: u64, slot: Arc<Slot>, now: u64) -> Ask {
        let debited = slot.debited.load(Ordering::Relaxed);
        let state = self.keys.entry(key_id).or_insert(KeyState {
            rate_debited: debited,
            rate_at: now,
            ..KeyState::default()
        });
        let held = slot.avail.load(Ordering::Acquire);
        Ask {
            key_id,
            known: state.known,
            pending: state.pending_give,
            need: 0,
            want: 0,
            give: 0,
            deficit: (-held).max(0),
            record_valid: state.record_valid,
            held,
            waiters: Vec::new(),
            slot,
        }
    }

    /// The lease to hold beyond what waiting calls need: about `LEASE_COVERS` of the key's
    /// spending over the last second or more, at least four of its last reservations. Redis
    /// caps what it grants near the limit.
    pub(super) fn lease_size(&mut self, key_id: u64, slot: &Slot, now: u64) -> i64 {
        let debited = slot.debited.load(Ordering::Relaxed);
        let last = slot.last_amount.load(Ordering::Relaxed).max(1);
        let state = self.keys.entry(key_id).or_default();
        let elapsed = now.saturating_sub(state.rate_at);
        let spent = (debited - state.rate_debited).max(0);
        let window = elapsed.max(1_000) as f64;
        let by_rate = (spent as f64 * LEASE_COVERS.as_millis() as f64 / window) as i64;
        if elapsed >= 1_000 {
            state.rate_debited = debited;
            state.rate_at = now;
        }
        let size = by_rate.max(last.saturating_mul(4)).min(MAX_AMOUNT);
        slot.low_water.store(size / 2, Ordering::Relaxed);
        size
    }

    /// Run script calls (several at once) and apply their answers. Once Redis proves
    /// unreachable, the rest are not sent this round.
    pub(super) async fn sync(&mut self, asks: Vec<Ask>) {
        let mut asks = asks;
        while !asks.is_empty() {
            let rest = asks.split_off(asks.len().min(CONCURRENT_CALLS));
            let batch = std::mem::replace(&mut asks, rest);
            let calls = batch.iter().map(|a| {
                let conn = self.conn.clone();
                let script = &self.scripts.sync;
                let gateway = self.gateway.as_str();
                let timeout = self.settings.timeout;
                let args = [
                    a.known,
                    a.slot.limit.load(Ordering::Relaxed),
                    a.need,
                    a.want,
                    a.give,
                    a.deficit,
                    a.held,
                    self.settings.lease_ttl.as_millis() as i64,
                    a.slot.until.load(Ordering::Relaxed),
                    a.record_valid,
                    a.pending,
                ];
                async move {
                    let Some(mut conn) = conn else {
                        return Outcome::Unreachable;
                    };
                    let (k, leases) = redis_keys(a.key_id);
                    let keys = [k.as_str(), leases.as_str()];
                    let call = script.call::<(i64, i64, i64, i64, i64)>(
                        &mut conn,
                        &keys,
                        &args,
                        Some(gateway),
                    );
                    match tokio::time::timeout(timeout, call).await {
                        Ok(Ok((x, granted, committed, consumption, valid))) => {
                            Outcome::Answered(Answer {
                                applied: x == 1,
                                granted,
                                committed,
                                consumption,
                                valid,
                            })
                        }
                        Ok(Err(e)) if !unreachable(&e) => {
                            log::error!("ledger: key {}: Redis refused: {e}", a.key_id);
                            Outcome::Refused
                        }
                        Ok(Err(e)) => {
                            log::debug!("ledger: key {}: {e}", a.key_id);
                            Outcome::Unreachable
                        }
                        Err(_) => Outcome::Unreachable,
                    }
                }
            });
            let results = futures_util::future::join_all(calls).await;
            self.ledger
                .stats
                .ops
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            let reached = results.iter().any(|r| !matches!(r, Outcome::Unreachable));
            for (ask, result) in batch.into_iter().zip(results) {
                match result {
                    Outcome::Answered(answer) => self.apply(ask, answer),
                    outcome => self.abandon(ask, matches!(outcome, Outcome::Refused)),
                }
            }
            if reached {
                self.reached();
            } else {
                self.failed("script calls failed or timed out");
                for ask in std::mem::take(&mut asks) {
                    self.abandon(ask, false);
                }
            }
        }
    }

    /// Apply one answer: credit what Redis granted beyond what this gateway knew (a grant, an
    /// overdraft turned into committed quota, a lost earlier answer) and settle a give-back
    /// whose answer was lost, then serve the waiting calls in order.
    pub(super) fn apply(&mut self, ask: Ask, answer: Answer) {
        let Answer {
            applied,
            granted,
            committed,
            consumption,
            valid,
        } = answer;
        let slot = ask.slot;
        let state = self.keys.entry(ask.key_id).or_default();
        state.known = granted;
        state.pending_give -= ask.pending;
        state.synced_at = self.ledger.now_ms();
        // Applied: `granted − known` is −give + deficit + grant, so this adds deficit + grant
        // (the give was taken out of `avail` beforehand). Not applied: it restores the give and
        // corrects `avail` by what Redis shows. A lost give-back (`pending`) is restored here
        // and taken off again by `granted − known` if Redis had applied it.
        let delta = granted - ask.known + ask.give + ask.pending;
        slot.avail.fetch_add(delta, Ordering::AcqRel);
        if ask.pending != 0 {
            // Redis's record does not show the restored give-back yet.
            slot.dirty.store(true, Ordering::Release);
        }
        if valid > 0 {
            state.record_valid = valid;
        }
        if applied {
            slot.recorded
                .store(ask.held + delta - ask.pending, Ordering::Release);
            let got = delta - ask.pending - ask.deficit;
            if ask.want > 0 && got < ask.want {
                // Redis capped the lease near the limit: ask again only once half of what it
                // gave is spent, not at every call.
                slot.low_water.store(got / 2, Ordering::Relaxed);
            }
        } else {
            // The record was ahead of this gateway (a lost answer). It is corrected now;
            // report again next round.
            slot.dirty.store(true, Ordering::Release);
        }
        slot.consumption.store(consumption, Ordering::Release);
        slot.consumption_read.store(true, Ordering::Release);
        let limit = slot.limit.load(Ordering::Relaxed);
        for (amount, reply, rounds) in ask.waiters {
            if self.ledger.take(&slot, amount).is_some() {
                let _ = reply.send(Ok(self.granted(&slot, amount)));
                continue;
            }
            let room = limit < 0 || limit.saturating_sub(committed) >= amount;
            if (room || !applied) && rounds < WAIT_ROUNDS {
                // There is room, or this answer only corrected the gateway: one more round.
                let _ = self.ledger.tx.send(Msg::Need {
                    key_id: ask.key_id,
                    slot: slot.clone(),
                    amount,
                    reply,
                    rounds: rounds + 1,
                });
                continue;
            }
            let _ = reply.send(Err(ReserveError::Insufficient {
                remaining: limit.saturating_sub(committed).max(0),
            }));
        }
    }

    /// A call without an answer: a give-back stays held back until an answer shows whether
    /// Redis applied it; waiting calls are answered as `on_unavailable` says (or refused, when
    /// Redis refused the call); the report is retried next round.
    pub(super) fn abandon(&mut self, ask: Ask, refused: bool) {
        if ask.give > 0 {
            self.keys.entry(ask.key_id).or_default().pending_give += ask.give;
        }
        ask.slot.dirty.store(true, Ordering::Release);
        for (amount, reply, _) in ask.waiters {
            if refused {
                let _ = reply.send(Err(ReserveError::BackendUnavailable));
            } else {
                self.admit_without_redis(&ask.slot, amount, reply);
            }
        }
    }
}

//! The ledger's writer thread: raises keys' durable ceilings ahead of use (one journal append
//! and fsync per round, never on the request path) and measures each key's rate for its
//! headroom; drops the counters of ended budget periods.

use super::files::{open_journal, COMPACT_AFTER_BYTES, JOURNAL};
use super::*;

impl Ledger {
    pub(super) fn writer_loop(&self) {
        let Some(dir) = self.shared.dir.clone() else {
            return;
        };
        let mut journal = match open_journal(&dir) {
            Ok(f) => f,
            Err(e) => {
                log::error!("ledger: cannot open {}: {e}", dir.join(JOURNAL).display());
                return;
            }
        };
        let mut generation = 0u64;
        let mut last_report = std::time::Instant::now();
        let mut last_forget = last_report;
        loop {
            if last_forget.elapsed() >= FORGET_EVERY {
                last_forget = std::time::Instant::now();
                self.forget_ended_now();
            }
            if last_report.elapsed() >= Duration::from_secs(1) {
                last_report = std::time::Instant::now();
                self.apply_handoff(&dir);
                let now = self.now_ms();
                for entry in self.shared.counters.iter() {
                    measure_rate(entry.value(), now);
                }
                if let Err(e) = self.write_consumed_report(&dir, false) {
                    log::warn!("ledger: consumed report: {e}");
                }
            }
            let batch: Vec<u64> = {
                let Ok(mut q) = self.shared.queue.lock() else {
                    return;
                };
                if q.is_empty() && !self.shared.stop.load(Ordering::Acquire) {
                    q = match self.shared.wake.wait_timeout(q, Duration::from_millis(500)) {
                        Ok((q, _)) => q,
                        Err(_) => return,
                    };
                }
                std::mem::take(&mut *q)
            };
            if batch.is_empty() {
                if self.shared.stop.load(Ordering::Acquire) {
                    return;
                }
                continue;
            }
            let mut lines = String::new();
            let mut raised = Vec::with_capacity(batch.len());
            let mut raised_ids = Vec::with_capacity(batch.len());
            let now = self.now_ms();
            for id in batch {
                let Some(c) = self.shared.counters.get(&id).map(|c| c.clone()) else {
                    continue;
                };
                c.queued.store(false, Ordering::SeqCst);
                // A key asking for a raise is measured now, not only at the next tick, so the
                // headroom of a key speeding up grows with it.
                measure_rate(&c, now);
                let target = c.wanted.load(Ordering::SeqCst).max(c.committed());
                if target > c.durable.load(Ordering::SeqCst) {
                    // Before the ceiling: a line torn by a crash is the last one.
                    let until = c.until();
                    if until != c.until_logged.load(Ordering::Relaxed) {
                        lines.push_str(&format!("until {id} {until}\n"));
                    }
                    lines.push_str(&format!("{id} {target}\n"));
                    raised.push((c, target, until));
                    raised_ids.push(id);
                }
            }
            if raised.is_empty() {
                continue;
            }
            let appended = match self.shared.disk.lock() {
                Ok(_disk) => self.with_lock(false, || {
                    journal
                        .write_all(lines.as_bytes())
                        .and_then(|_| journal.sync_data())
                }),
                Err(_) => return,
            };
            match appended {
                Ok(()) => {
                    for (c, target, until) in raised {
                        c.durable.fetch_max(target, Ordering::AcqRel);
                        c.until_logged.store(until, Ordering::Relaxed);
                    }
                    generation += 1;
                    self.shared.flushed.send_replace(generation);
                }
                Err(e) => {
                    self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
                    log::error!("ledger: journal write failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    // Put the ids back so they are tried again (their `queued` flags are set).
                    if let Ok(mut q) = self.shared.queue.lock() {
                        for (c, _, _) in &raised {
                            c.queued.store(true, Ordering::SeqCst);
                        }
                        q.extend(raised_ids);
                    }
                }
            }
            if journal.metadata().map(|m| m.len()).unwrap_or(0) > COMPACT_AFTER_BYTES {
                let now = crate::core::clock::unix_now();
                let dropped = self.drop_ended(now);
                if let Err(e) = self.compact(&dir, now, &dropped) {
                    self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
                    log::error!("ledger: compaction failed: {e}");
                }
            }
        }
    }

    /// [`Ledger::forget_ended`] at the clock's time, logged.
    fn forget_ended_now(&self) {
        match self.forget_ended(crate::core::clock::unix_now()) {
            Ok(0) => {}
            Ok(n) => log::info!("ledger: dropped {n} counters of ended budget periods"),
            Err(e) => {
                self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
                log::error!("ledger: dropping the counters of ended budget periods: {e}");
            }
        }
    }

    /// Milliseconds since the ledger started (the clock of the rate windows).
    pub(super) fn now_ms(&self) -> u64 {
        self.shared.started.elapsed().as_millis() as u64
    }

    /// Stop the writer thread and wait for it, so the final write races nothing.
    pub(super) fn stop_writer(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_all();
        let handle = self.shared.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// The writer measures `c`'s spending for its headroom: how much its committed amount grew
/// since its window began (reservations count when they are taken, not when they settle: a
/// burst of long calls is seen at once, not seconds later), over the window's length or one
/// second if shorter, times [`HEADROOM_COVERS`]. A window of a
/// second or more sets `rate_room` and starts the next window; a shorter one only raises it (a
/// key speeding up is seen within its window, one slowing down at the window's end).
pub(super) fn measure_rate(c: &KeyCounter, now_ms: u64) {
    let committed = c.committed();
    let elapsed = now_ms.saturating_sub(c.rate_since.load(Ordering::Relaxed));
    let spent = committed
        .saturating_sub(c.rate_mark.load(Ordering::Relaxed))
        .max(0);
    let covers = HEADROOM_COVERS.as_millis() as i128;
    let room = (spent as i128 * covers / elapsed.max(1_000) as i128).min(MAX_AMOUNT as i128) as i64;
    if elapsed >= 1_000 {
        c.rate_room.store(room, Ordering::Relaxed);
        c.rate_mark.store(committed, Ordering::Relaxed);
        c.rate_since.store(now_ms, Ordering::Relaxed);
    } else {
        c.rate_room.fetch_max(room, Ordering::Relaxed);
    }
}

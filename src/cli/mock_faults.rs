//! Failure modes for one [`super::mock::MockBackend`], set at run time (for tests of upstream
//! pools, where one backend of several must fail): a fixed status with `Retry-After`, a delay
//! before the first byte, a stream cut after some events, a 200 with a broken JSON body.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A backend's failure modes; all off by default.
#[derive(Debug, Default)]
pub struct MockFaults {
    status: AtomicU16,
    retry_after: Mutex<Option<String>>,
    first_byte_delay_ms: AtomicU64,
    cut_after: AtomicUsize,
    broken_body: AtomicBool,
}

impl MockFaults {
    /// Answer every request with `status` and an OpenAI-shaped error (0: answer normally).
    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }
    /// Send this `Retry-After` with the fixed status (`None`: none).
    pub fn set_retry_after(&self, value: Option<&str>) {
        *self.retry_after.lock().unwrap_or_else(|p| p.into_inner()) = value.map(str::to_string);
    }
    /// Wait this long before the response head.
    pub fn set_first_byte_delay(&self, d: Duration) {
        self.first_byte_delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }
    /// Cut a stream's connection after `events` events (0: never).
    pub fn set_cut_after(&self, events: usize) {
        self.cut_after.store(events, Ordering::SeqCst);
    }
    /// Answer 200 with a JSON body that ends in the middle.
    pub fn set_broken_body(&self, on: bool) {
        self.broken_body.store(on, Ordering::SeqCst);
    }

    pub(super) fn status(&self) -> u16 {
        self.status.load(Ordering::SeqCst)
    }
    pub(super) fn retry_after(&self) -> Option<String> {
        self.retry_after
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    pub(super) fn first_byte_delay(&self) -> Duration {
        Duration::from_millis(self.first_byte_delay_ms.load(Ordering::SeqCst))
    }
    pub(super) fn cut_after(&self) -> usize {
        self.cut_after.load(Ordering::SeqCst)
    }
    pub(super) fn broken_body(&self) -> bool {
        self.broken_body.load(Ordering::SeqCst)
    }
}

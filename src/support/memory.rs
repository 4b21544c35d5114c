//! Giving freed memory back to the system after a large, short-lived allocation burst.
//!
//! A sync-file load allocates for a while what it then frees (each key as read, the previous
//! table once a reload replaces it, a rejected table), and an allocator keeps freed pages for
//! reuse, so the process would stay at its peak size. The binary installs its allocator's
//! collection function here ([`set_release_hook`]); the library calls it after each load.

use std::sync::OnceLock;

static HOOK: OnceLock<fn()> = OnceLock::new();

/// Install the function that returns free memory to the system (once; later calls are
/// ignored).
pub fn set_release_hook(hook: fn()) {
    let _ = HOOK.set(hook);
}

/// Return free memory to the system, if a hook is installed.
pub fn release_free_memory() {
    if let Some(hook) = HOOK.get() {
        hook();
    }
}

//! Giving freed memory back to the system after a large, short-lived allocation burst.
//!
//! Loading a sync file parses it whole before compiling the table: at 1M keys the parsed form
//! takes several times the table's memory, and an allocator keeps the freed pages for reuse, so
//! the process would stay at its peak size. The binary installs its allocator's collection
//! function here ([`set_release_hook`]); the library calls it after each load.

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

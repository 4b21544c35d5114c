//! Leaf helpers any layer may use; they import nothing from the crate.

pub mod fsutil;
pub mod memory;

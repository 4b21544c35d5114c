//! The admin listener's parts: the console's embedded assets (SPEC §10).

pub mod assets;

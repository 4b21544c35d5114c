//! Reading usage from upstream responses (JSON bodies and SSE streams, in the OpenAI, Anthropic
//! and Gemini dialects), removing the usage chunk keygate asked for on a client's behalf, and the
//! usage log (one JSON line per settled call, formatted on the request path and written to the
//! file by a background thread); the usage store (every call in SQLite, with hourly roll-ups
//! and the queries over them).

mod json;
mod log;
mod sse;
pub mod store;

pub use self::json::{canonical_u64, usage_from_json, usage_from_json_parsed, PartialUsage};
pub use self::log::{LineSink, UsageLog, UsageRecord};
pub use self::sse::{feed_in_pieces, SseTracker};

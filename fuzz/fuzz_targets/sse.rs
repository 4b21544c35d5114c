//! Fuzz target `sse`: see `keygate::fuzzing::sse`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| keygate::fuzzing::sse(data));

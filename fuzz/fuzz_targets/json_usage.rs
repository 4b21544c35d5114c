//! Fuzz target `json_usage`: see `keygate::fuzzing::json_usage`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| keygate::fuzzing::json_usage(data));

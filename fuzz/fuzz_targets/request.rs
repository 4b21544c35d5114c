//! Fuzz target `request`: see `keygate::fuzzing::request`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| keygate::fuzzing::request(data));

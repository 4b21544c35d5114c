//! Fuzz target `sync_file`: see `keygate::fuzzing::sync_file`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| keygate::fuzzing::sync_file(data));

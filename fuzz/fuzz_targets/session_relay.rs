#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| domsock_migration::fuzzing::session_relay(data));

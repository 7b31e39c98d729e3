#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| domsock_guest::fuzzing::bus_member(data));

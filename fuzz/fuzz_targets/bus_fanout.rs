#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| domsock_proto::fuzzing::bus_fanout(data));

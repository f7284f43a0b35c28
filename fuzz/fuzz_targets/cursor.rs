#![no_main]
//! See `quickim_gateway::fuzzing::cursor`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| quickim_gateway::fuzzing::cursor(data));

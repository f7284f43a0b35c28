#![no_main]
//! See `quickim_gateway::fuzzing::request_head`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| quickim_gateway::fuzzing::request_head(data));

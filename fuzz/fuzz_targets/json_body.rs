#![no_main]
//! See `quickim_gateway::fuzzing::json_body`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| quickim_gateway::fuzzing::json_body(data));

#![no_main]
//! See `quickim_gateway::fuzzing::ws_frame`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| quickim_gateway::fuzzing::ws_frame(data));

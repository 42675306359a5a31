#![no_main]
//! `cargo fuzz run sse_streams`: see llm_worker::fuzzing::sse_streams.

libfuzzer_sys::fuzz_target!(|data: &[u8]| llm_worker::fuzzing::sse_streams(data));
